//! CLIP byte-level BPE tokenizer: turns a prompt into the token ids Stable Diffusion's text encoder expects.
//!
//! It reproduces transformers' `CLIPTokenizer` (the tokenizers-backed one diffusers uses) on a diffusers
//! `tokenizer/` folder (`vocab.json`, `merges.txt`, `tokenizer_config.json`, `special_tokens_map.json`):
//!
//! 1. special ("added") tokens are split out of the raw text (those with `normalized: false`), each remaining
//!    segment is normalized (NFC, every run of Unicode whitespace to one space, per-character lowercase) and
//!    split again on the special tokens with `normalized: true`;
//! 2. each segment is pre-tokenized with CLIP's pattern
//!    (`<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+`, whitespace dropped),
//!    each piece split again with GPT-2's byte-level pattern, and its UTF-8 bytes mapped to GPT-2's printable
//!    byte alphabet;
//! 3. each piece is BPE-merged, its last symbol carrying the `</w>` end-of-word suffix.
//!
//! [`ClipTokenizer::encode_padded`] then adds the start/end tokens, truncates and pads to `model_max_length`
//! exactly as `tokenizer(text, padding="max_length", max_length=model_max_length, truncation=True)` does.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::path::Path;
use std::sync::Mutex;

use regex::Regex;
use serde_json::Value;
use unicode_normalization::UnicodeNormalization;

use super::config::{read_json, read_text, ConfigFile};
use super::loader::Resolver;
use crate::error::{Error, Result};

/// Suffix BPE appends to the last symbol of every word.
const END_OF_WORD: &str = "</w>";
/// CLIP's context length, used when `tokenizer_config.json` does not give `model_max_length`.
const DEFAULT_MAX_LENGTH: usize = 77;
/// transformers writes ~1e30 ("no limit") when a tokenizer has no `model_max_length`; anything this large is treated as unset.
const MAX_SANE_LENGTH: u64 = 1 << 20;
/// Cached BPE results are dropped once the cache holds this many words.
const CACHE_CAPACITY: usize = 16_384;

/// CLIP's pre-tokenizer pattern (transformers' `CLIPTokenizer` split regex); regex's alternation is
/// leftmost-first, like the Oniguruma engine tokenizers uses.
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+";
/// GPT-2's byte-level pattern as it acts on whitespace-free text (its whitespace alternatives and optional
/// leading spaces never match there, so no look-ahead is needed).
const BYTE_LEVEL_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+";

/// A special or added token matched in the text before BPE.
#[derive(Debug, Clone)]
struct AddedToken {
    /// The token as given (a key of transformers' `added_tokens_encoder`).
    content: String,
    /// What is matched: `content`, normalized when `normalized` (set by [`AddedToken::set_pattern`]).
    pattern: String,
    id: u32,
    /// Matched in the normalized text (`true`) or in the raw text (`false`).
    normalized: bool,
}

impl AddedToken {
    fn new(content: String, id: u32, normalized: bool) -> Self {
        let mut t = Self {
            pattern: String::new(),
            content,
            id,
            normalized,
        };
        t.set_pattern();
        t
    }

    /// Normalized tokens are matched in normalized text, so their normalized form is what is matched.
    fn set_pattern(&mut self) {
        self.pattern = if self.normalized {
            normalize(&self.content)
        } else {
            self.content.clone()
        };
    }
}

/// A merge rule: its priority and the id of the merged symbol.
#[derive(Debug, Clone, Copy)]
struct Merge {
    rank: u32,
    new_id: u32,
}

/// CLIP's BPE tokenizer, loaded from a diffusers `tokenizer/` folder. Cheap to share (`Send + Sync`).
pub struct ClipTokenizer {
    vocab: HashMap<String, u32>,
    merges: HashMap<(u32, u32), Merge>,
    /// Id of each byte's symbol, without and with the end-of-word suffix.
    byte_ids: [[Option<u32>; 2]; 256],
    /// Printable character standing for each byte.
    byte_chars: [char; 256],
    added: Vec<AddedToken>,
    clip_re: Regex,
    byte_level_re: Regex,
    max_length: usize,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    unk_id: u32,
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.vocab.len())
            .field("merges", &self.merges.len())
            .field("max_length", &self.max_length)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish_non_exhaustive()
    }
}

/// GPT-2/CLIP's reversible byte -> printable character table.
fn bytes_to_unicode() -> [char; 256] {
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let b = b as u32;
        *slot = if printable(b) {
            char::from_u32(b).unwrap_or('\0')
        } else {
            let c = char::from_u32(next).unwrap_or('\0');
            next += 1;
            c
        };
    }
    table
}

/// SD1.5's `tokenizer/merges.txt` (OpenAI CLIP ViT-L/14), zlib-compressed; see [`ClipTokenizer::sd15`].
const SD15_MERGES_ZLIB: &[u8] = include_bytes!("clip_tokenizer/merges.txt.zlib");
/// SD1.5's `tokenizer/tokenizer_config.json`.
const SD15_TOKENIZER_CONFIG: &str = include_str!("clip_tokenizer/tokenizer_config.json");
/// SD1.5's `tokenizer/special_tokens_map.json`.
const SD15_SPECIAL_TOKENS: &str = include_str!("clip_tokenizer/special_tokens_map.json");

/// CLIP's vocabulary from its merges, as `CLIPTokenizer` / OpenAI's `SimpleTokenizer` build it: the byte symbols in
/// the byte table's order, the same with `</w>`, each merge's result, then the start and end tokens.
fn clip_vocab(merges: &str) -> std::result::Result<HashMap<String, u32>, String> {
    let table = bytes_to_unicode();
    // The table's order: the printable bytes first (as bytes_to_unicode lists them), then the rest.
    let mut order: Vec<(u8, char)> = (0..=255u8).map(|b| (b, table[b as usize])).collect();
    order.sort_by_key(|&(_, c)| c as u32);
    let mut tokens: Vec<String> = order.iter().map(|&(_, c)| c.to_string()).collect();
    tokens.extend(order.iter().map(|&(_, c)| format!("{c}{END_OF_WORD}")));
    for (n, line) in merges.lines().enumerate() {
        if (n == 0 && line.starts_with("#version")) || line.trim().is_empty() {
            continue;
        }
        let (a, b) = line
            .split_once(' ')
            .ok_or_else(|| format!("merges line {}: {line:?} is not a pair", n + 1))?;
        tokens.push(format!("{a}{b}"));
    }
    tokens.push("<|startoftext|>".into());
    tokens.push("<|endoftext|>".into());
    let mut vocab = HashMap::with_capacity(tokens.len());
    for (id, t) in tokens.into_iter().enumerate() {
        // As `dict(zip(vocab, range(len(vocab))))`: a repeated token keeps its last id.
        vocab.insert(t, id as u32);
    }
    Ok(vocab)
}

/// Whitespace as the normalizer's `\s+` sees it (Unicode `White_Space`).
fn is_whitespace(c: char) -> bool {
    matches!(
        c,
        '\u{9}'..='\u{d}'
            | ' '
            | '\u{85}'
            | '\u{a0}'
            | '\u{1680}'
            | '\u{2000}'..='\u{200a}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202f}'
            | '\u{205f}'
            | '\u{3000}'
    )
}

/// CLIP's normalizer: NFC, each whitespace run to one space, per-character lowercase (no final-sigma rule).
fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_space = false;
    for c in text.nfc() {
        if is_whitespace(c) {
            if !in_space {
                out.push(' ');
            }
            in_space = true;
        } else {
            in_space = false;
            out.extend(c.to_lowercase());
        }
    }
    out
}

/// Splits `text` on the leftmost-longest occurrences of `tokens`, yielding text segments and token ids.
fn split_on_tokens<'a>(text: &'a str, tokens: &[(&str, u32)], out: &mut Vec<Segment<'a>>) {
    if tokens.is_empty() {
        if !text.is_empty() {
            out.push(Segment::Text(text));
        }
        return;
    }
    let mut start = 0;
    let mut pos = 0;
    while pos < text.len() {
        let rest = &text[pos..];
        let best = tokens
            .iter()
            .filter(|(t, _)| !t.is_empty() && rest.starts_with(t))
            .max_by_key(|(t, _)| t.len());
        if let Some(&(t, id)) = best {
            if start < pos {
                out.push(Segment::Text(&text[start..pos]));
            }
            out.push(Segment::Token(id));
            pos += t.len();
            start = pos;
        } else {
            pos += rest.chars().next().map_or(1, char::len_utf8);
        }
    }
    if start < text.len() {
        out.push(Segment::Text(&text[start..]));
    }
}

enum Segment<'a> {
    Text(&'a str),
    Token(u32),
}

/// Reads an optional JSON object file: `None` when it does not exist.
fn optional_config(path: &Path) -> Result<Option<ConfigFile>> {
    if path.exists() {
        ConfigFile::read(path).map(Some)
    } else {
        Ok(None)
    }
}

/// `vocab.json`: token -> id, not empty.
fn read_vocab(path: &Path) -> Result<HashMap<String, u32>> {
    let vocab: HashMap<String, u32> = read_json(path)?;
    if vocab.is_empty() {
        return Err(Error::malformed(path.display(), "the vocabulary is empty"));
    }
    Ok(vocab)
}

/// The printable character of each byte and its symbols' ids, without and with the end-of-word suffix.
fn byte_symbols(vocab: &HashMap<String, u32>) -> ([char; 256], [[Option<u32>; 2]; 256]) {
    let byte_chars = bytes_to_unicode();
    let mut byte_ids = [[None; 2]; 256];
    for (ids, &c) in byte_ids.iter_mut().zip(byte_chars.iter()) {
        ids[0] = vocab.get(c.to_string().as_str()).copied();
        ids[1] = vocab.get(format!("{c}{END_OF_WORD}").as_str()).copied();
    }
    (byte_chars, byte_ids)
}

/// `model_max_length` from `tokenizer_config.json` ([`DEFAULT_MAX_LENGTH`] when absent, or when transformers'
/// "unbounded" sentinel is written).
fn max_length(config: Option<&ConfigFile>) -> Result<usize> {
    let Some((c, v)) = config.and_then(|c| Some((c, c.present("model_max_length")?))) else {
        return Ok(DEFAULT_MAX_LENGTH);
    };
    match v
        .as_u64()
        .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
    {
        Some(n) if n > MAX_SANE_LENGTH => Ok(DEFAULT_MAX_LENGTH),
        Some(n) if n >= 2 => Ok(n as usize),
        _ => Err(Error::malformed(
            c.origin(),
            format!("model_max_length must be an integer >= 2, got {v}"),
        )),
    }
}

/// The tokens listed in `added_tokens_decoder` (configs saved by recent transformers), with their own flags.
fn decoder_tokens(
    config: Option<&ConfigFile>,
    vocab: &HashMap<String, u32>,
) -> Result<Vec<AddedToken>> {
    let mut added = Vec::new();
    let Some(c) = config else {
        return Ok(added);
    };
    let Some(Value::Object(decoder)) = c.present("added_tokens_decoder") else {
        return Ok(added);
    };
    for (key, entry) in decoder {
        let content = entry
            .get("content")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                Error::malformed(
                    c.origin(),
                    format!("added_tokens_decoder[{key}] has no content"),
                )
            })?;
        let id = match vocab.get(content) {
            Some(&id) => id,
            None => key.parse().map_err(|_| {
                Error::malformed(
                    c.origin(),
                    format!("added_tokens_decoder key {key:?} is not an id"),
                )
            })?,
        };
        let special = entry
            .get("special")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let normalized = entry
            .get("normalized")
            .and_then(Value::as_bool)
            .unwrap_or(!special);
        added.push(AddedToken::new(content.to_string(), id, normalized));
    }
    Ok(added)
}

/// The ids of bos, eos, unk and pad, in transformers' order, from `files` (later files override earlier ones;
/// defaults `<|startoftext|>` and `<|endoftext|>`). Each is added to `added` unless `added_tokens_decoder`
/// (the first `from_decoder` entries) already lists it; a later token with the same content sets its flag.
fn special_tokens(
    files: [Option<&ConfigFile>; 2],
    vocab: &HashMap<String, u32>,
    vocab_path: &Path,
    added: &mut Vec<AddedToken>,
) -> Result<[u32; 4]> {
    let from_decoder = added.len();
    let mut ids = [0u32; 4];
    let defaults = [
        "<|startoftext|>",
        "<|endoftext|>",
        "<|endoftext|>",
        "<|endoftext|>",
    ];
    for (i, key) in ["bos_token", "eos_token", "unk_token", "pad_token"]
        .into_iter()
        .enumerate()
    {
        let mut chosen: Option<((String, bool), String)> = None;
        for file in files.into_iter().flatten() {
            if let Some(value) = file.present(key) {
                if let Some(token) = parse_token(value, file.origin(), key)? {
                    chosen = Some((token, file.origin().to_string()));
                }
            }
        }
        let ((content, normalized), source) = chosen.unwrap_or((
            (defaults[i].to_string(), false),
            vocab_path.display().to_string(),
        ));
        let id = *vocab.get(&content).ok_or_else(|| {
            Error::malformed(
                source,
                format!("{key} {content:?} is not in the vocabulary"),
            )
        })?;
        ids[i] = id;
        if added[..from_decoder].iter().any(|t| t.content == content) {
            continue;
        }
        match added[from_decoder..]
            .iter_mut()
            .find(|t| t.content == content)
        {
            Some(t) => {
                t.normalized = normalized;
                t.set_pattern();
            }
            None => added.push(AddedToken::new(content, id, normalized)),
        }
    }
    Ok(ids)
}

/// A special token's value: a plain string (matched in the raw text) or a `{"content": ..., "normalized": ...}` object.
fn parse_token(value: &Value, origin: &str, key: &str) -> Result<Option<(String, bool)>> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some((s.clone(), false))),
        Value::Object(map) => {
            let content = map.get("content").and_then(Value::as_str).ok_or_else(|| {
                Error::malformed(origin, format!("{key} has no string \"content\""))
            })?;
            // transformers' AddedToken defaults `normalized` to `not special`; these objects do not say `special`.
            let normalized = map
                .get("normalized")
                .and_then(Value::as_bool)
                .unwrap_or(true);
            Ok(Some((content.to_string(), normalized)))
        }
        _ => Err(Error::malformed(
            origin,
            format!("{key} must be a string or an object"),
        )),
    }
}

impl ClipTokenizer {
    /// Loads `vocab.json` + `merges.txt` (+ optional `tokenizer_config.json` / `special_tokens_map.json` for
    /// model_max_length and the bos/eos/pad/unk tokens, which may be plain strings or `{"content": ...}`
    /// objects) from a diffusers `tokenizer/` folder.
    ///
    /// Defaults: `model_max_length` 77, bos `<|startoftext|>`, eos/unk/pad `<|endoftext|>`; values in
    /// `special_tokens_map.json` override those in `tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        let vocab = read_vocab(&vocab_path)?;
        let merges = read_text(&merges_path)?;
        let config = optional_config(&dir.join("tokenizer_config.json"))?;
        let map = optional_config(&dir.join("special_tokens_map.json"))?;
        Self::from_parts(vocab, &vocab_path, &merges, &merges_path, config, map)
    }

    /// The `tokenizer/` folder of a model folder or Hub repository (`vocab.json` and `merges.txt`, with the optional
    /// config files beside them fetched too, so that a Hub download has everything [`ClipTokenizer::from_dir`]
    /// reads).
    pub fn from_resolver(base: &Resolver) -> Result<Self> {
        let vocab = base.get("tokenizer/vocab.json")?;
        base.get("tokenizer/merges.txt")?;
        for f in ["tokenizer_config.json", "special_tokens_map.json"] {
            let rel = format!("tokenizer/{f}");
            if base.exists(&rel) {
                base.get(&rel)?;
            }
        }
        let dir = vocab.parent().ok_or_else(|| Error::MissingFile {
            path: base.describe("tokenizer"),
        })?;
        Self::from_dir(dir)
    }

    /// The tokenizer of Stable Diffusion 1.x (OpenAI CLIP ViT-L/14's, as in `stable-diffusion-v1-5/tokenizer`),
    /// built from data compiled into sketchx: for a single-file checkpoint, which holds no tokenizer, with no Hub
    /// access at all. Only the merge rules are stored (compressed, about 200 KB); the vocabulary is derived from
    /// them as CLIP builds it: the 256 byte symbols, the same with `</w>`, every merge's result in rank order, then
    /// `<|startoftext|>` and `<|endoftext|>` (49408 tokens). The tokenizer and special-token configs are SD1.5's.
    pub fn sd15() -> Result<Self> {
        let origin = Path::new("<sketchx's built-in SD1.5 tokenizer>");
        let bad = |m: String| Error::malformed(origin.display(), m);
        let mut merges = String::new();
        std::io::Read::read_to_string(
            &mut flate2::read::ZlibDecoder::new(SD15_MERGES_ZLIB),
            &mut merges,
        )
        .map_err(|e| bad(format!("cannot inflate the merges: {e}")))?;
        let vocab = clip_vocab(&merges).map_err(bad)?;
        let config = ConfigFile::parse(SD15_TOKENIZER_CONFIG, "<built-in tokenizer_config.json>")?;
        let map = ConfigFile::parse(SD15_SPECIAL_TOKENS, "<built-in special_tokens_map.json>")?;
        Self::from_parts(vocab, origin, &merges, origin, Some(config), Some(map))
    }

    /// Builds the tokenizer from a vocabulary, the merges text and the optional configs (`vocab_path` and
    /// `merges_path` name them in errors).
    fn from_parts(
        vocab: HashMap<String, u32>,
        vocab_path: &Path,
        merges: &str,
        merges_path: &Path,
        config: Option<ConfigFile>,
        map: Option<ConfigFile>,
    ) -> Result<Self> {
        let merges = Self::parse_merges(merges, &vocab, merges_path)?;
        let (byte_chars, byte_ids) = byte_symbols(&vocab);
        let max_length = max_length(config.as_ref())?;
        let mut added = decoder_tokens(config.as_ref(), &vocab)?;
        let [bos_id, eos_id, unk_id, pad_id] = special_tokens(
            [config.as_ref(), map.as_ref()],
            &vocab,
            vocab_path,
            &mut added,
        )?;
        Ok(Self {
            vocab,
            merges,
            byte_ids,
            byte_chars,
            added,
            clip_re: Regex::new(CLIP_PATTERN).expect("valid CLIP pattern"),
            byte_level_re: Regex::new(BYTE_LEVEL_PATTERN).expect("valid byte-level pattern"),
            max_length,
            bos_id,
            eos_id,
            pad_id,
            unk_id,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The vocabulary (token -> id).
    pub fn vocab(&self) -> &HashMap<String, u32> {
        &self.vocab
    }

    fn parse_merges(
        text: &str,
        vocab: &HashMap<String, u32>,
        path: &Path,
    ) -> Result<HashMap<(u32, u32), Merge>> {
        let mut merges = HashMap::new();
        let mut rank = 0u32;
        for (n, line) in text.lines().enumerate() {
            if (n == 0 && line.starts_with("#version")) || line.trim().is_empty() {
                continue;
            }
            let bad = |message: String| {
                Error::malformed(path.display(), format!("line {}: {message}", n + 1))
            };
            let mut parts = line.split(' ');
            let (Some(a), Some(b), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(bad(format!(
                    "expected two symbols separated by one space, got {line:?}"
                )));
            };
            if a.is_empty() || b.is_empty() {
                return Err(bad(format!(
                    "expected two symbols separated by one space, got {line:?}"
                )));
            }
            let id = |s: &str| {
                vocab
                    .get(s)
                    .copied()
                    .ok_or_else(|| bad(format!("{s:?} is not in vocab.json")))
            };
            let (a_id, b_id, new_id) = (id(a)?, id(b)?, id(&format!("{a}{b}"))?);
            merges.entry((a_id, b_id)).or_insert(Merge { rank, new_id });
            rank += 1;
        }
        Ok(merges)
    }

    /// Token ids without special tokens (like `tokenizer(text, add_special_tokens=False)`).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let raw_tokens: Vec<(&str, u32)> = self
            .added
            .iter()
            .filter(|t| !t.normalized)
            .map(|t| (t.pattern.as_str(), t.id))
            .collect();
        let norm_tokens: Vec<(&str, u32)> = self
            .added
            .iter()
            .filter(|t| t.normalized)
            .map(|t| (t.pattern.as_str(), t.id))
            .collect();

        let mut raw_segments = Vec::new();
        split_on_tokens(text, &raw_tokens, &mut raw_segments);
        let mut ids = Vec::new();
        for segment in raw_segments {
            match segment {
                Segment::Token(id) => ids.push(id),
                Segment::Text(raw) => {
                    let normalized = normalize(raw);
                    let mut segments = Vec::new();
                    split_on_tokens(&normalized, &norm_tokens, &mut segments);
                    for segment in segments {
                        match segment {
                            Segment::Token(id) => ids.push(id),
                            Segment::Text(text) => self.encode_normalized(text, &mut ids),
                        }
                    }
                }
            }
        }
        ids
    }

    /// Pre-tokenizes normalized text and appends the BPE ids of every piece.
    fn encode_normalized(&self, text: &str, ids: &mut Vec<u32>) {
        for clip_piece in self.clip_re.find_iter(text) {
            for piece in self.byte_level_re.find_iter(clip_piece.as_str()) {
                let piece = piece.as_str();
                let cached = self.cache.lock().ok().and_then(|c| c.get(piece).cloned());
                let word_ids = match cached {
                    Some(w) => w,
                    None => {
                        let w = self.bpe(piece.as_bytes());
                        if let Ok(mut cache) = self.cache.lock() {
                            if cache.len() >= CACHE_CAPACITY {
                                cache.clear();
                            }
                            cache.insert(piece.to_string(), w.clone());
                        }
                        w
                    }
                };
                ids.extend_from_slice(&word_ids);
            }
        }
    }

    /// BPE-merges one word (its UTF-8 bytes), lowest merge rank first, leftmost first among equal ranks.
    fn bpe(&self, bytes: &[u8]) -> Vec<u32> {
        struct Symbol {
            id: u32,
            prev: Option<usize>,
            next: Option<usize>,
            alive: bool,
        }
        let last = bytes.len().saturating_sub(1);
        let mut symbols: Vec<Symbol> = bytes
            .iter()
            .enumerate()
            .map(|(i, &b)| Symbol {
                id: self.byte_ids[b as usize][usize::from(i == last)].unwrap_or(self.unk_id),
                prev: i.checked_sub(1),
                next: (i < last).then_some(i + 1),
                alive: true,
            })
            .collect();

        let mut heap = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<_>, symbols: &[Symbol], pos: usize| {
            if let Some(next) = symbols[pos].next {
                if let Some(m) = self.merges.get(&(symbols[pos].id, symbols[next].id)) {
                    heap.push(Reverse((m.rank, pos, m.new_id)));
                }
            }
        };
        for pos in 0..symbols.len() {
            push(&mut heap, &symbols, pos);
        }
        while let Some(Reverse((rank, pos, new_id))) = heap.pop() {
            let Some(next) = symbols[pos].next.filter(|_| symbols[pos].alive) else {
                continue;
            };
            // Skip stale entries: the pair at `pos` changed since this merge was queued.
            match self.merges.get(&(symbols[pos].id, symbols[next].id)) {
                Some(m) if m.rank == rank && m.new_id == new_id => {}
                _ => continue,
            }
            symbols[pos].id = new_id;
            symbols[next].alive = false;
            symbols[pos].next = symbols[next].next;
            if let Some(after) = symbols[next].next {
                symbols[after].prev = Some(pos);
            }
            if let Some(prev) = symbols[pos].prev {
                push(&mut heap, &symbols, prev);
            }
            push(&mut heap, &symbols, pos);
        }
        symbols.iter().filter(|s| s.alive).map(|s| s.id).collect()
    }

    /// `[bos] + ids (truncated so that the total is max_length) + [eos] + padding to max_length`, i.e. what
    /// diffusers' pipeline passes to the text encoder.
    pub fn encode_padded(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        let body = self.encode(text);
        let keep = body.len().min(self.max_length - 2);
        ids.extend_from_slice(&body[..keep]);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        ids
    }

    /// The padded sequence length (`model_max_length`, 77 for CLIP).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Id of the start-of-text token.
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// Id of the end-of-text token.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Id of the padding token (`<|endoftext|>` for SD1.x, `!` for SD2.x).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Size of the vocabulary in `vocab.json`.
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// Whether `token` is a token of the vocabulary or an added token, as given (transformers' `token in
    /// tokenizer.get_vocab()`): BPE entries such as `cat</w>` as well as special and added tokens.
    pub fn contains_token(&self, token: &str) -> bool {
        self.vocab.contains_key(token) || self.added.iter().any(|t| t.content == token)
    }

    /// The id [`ClipTokenizer::add_token`] gives the next new token, as the tokenizers library numbers added
    /// tokens: the vocabulary's size, or one past the largest added id when that is not below it (49408 for CLIP).
    pub fn next_added_id(&self) -> u32 {
        let size = u32::try_from(self.vocab.len()).unwrap_or(u32::MAX);
        match self.added.iter().map(|t| t.id).max() {
            Some(max) if max >= size => max.saturating_add(1),
            _ => size,
        }
    }

    /// Adds `token` as transformers' `tokenizer.add_tokens(token)` does (a plain, non-special token: matched
    /// in the normalized text, so in any letter case, before BPE) and returns its id: its existing id when it
    /// is already a vocabulary or added token, else [`ClipTokenizer::next_added_id`].
    pub fn add_token(&mut self, token: &str) -> u32 {
        if let Some(&id) = self.vocab.get(token) {
            return id;
        }
        if let Some(t) = self.added.iter().find(|t| t.content == token) {
            return t.id;
        }
        let id = self.next_added_id();
        self.added
            .push(AddedToken::new(token.to_string(), id, true));
        id
    }

    /// diffusers' `maybe_convert_prompt` for multi-vector textual inversion tokens: every added token `T` found
    /// in the tokenized `prompt` that has siblings `T_1`, `T_2`, ... among the added tokens is replaced in the
    /// prompt's text by `T T_1 T_2 ...` (every occurrence, as Python's `str.replace`, also inside longer words).
    ///
    /// As in diffusers, the lookup uses the text the tokenizer matched, which is the normalized (lowercased)
    /// form of a token matched in normalized text, and the replacement is case-sensitive: a token with
    /// upper-case letters, or written in the prompt in another case, is not expanded and gets its first vector
    /// only. The prompt comes back unchanged (borrowed) when no token expands.
    pub fn expand_multi_vector_tokens<'a>(&self, prompt: &'a str) -> Cow<'a, str> {
        let has_siblings = |t: &str| {
            let first = format!("{t}_1");
            self.added.iter().any(|a| a.content == first)
        };
        if !self.added.iter().any(|t| has_siblings(&t.content)) {
            return Cow::Borrowed(prompt);
        }
        let ids = self.encode(prompt);
        // The text each added token found in the prompt was matched as, once each, in the added tokens' order.
        let mut matched: Vec<&str> = Vec::new();
        for t in &self.added {
            if ids.contains(&t.id) && !matched.contains(&t.pattern.as_str()) {
                matched.push(&t.pattern);
            }
        }
        let mut out = Cow::Borrowed(prompt);
        for text in matched {
            if !self.added.iter().any(|a| a.content == text) {
                continue;
            }
            let mut replacement = text.to_string();
            let mut i = 1;
            loop {
                let sibling = format!("{text}_{i}");
                if !self.added.iter().any(|a| a.content == sibling) {
                    break;
                }
                replacement.push(' ');
                replacement.push_str(&sibling);
                i += 1;
            }
            if i > 1 && out.contains(text) {
                out = Cow::Owned(out.replace(text, &replacement));
            }
        }
        out
    }

    /// Maps token ids back to text (special tokens dropped, `</w>` as word breaks); for diagnostics.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut by_id: HashMap<u32, &str> = HashMap::with_capacity(self.vocab.len());
        for (token, &id) in &self.vocab {
            by_id.insert(id, token);
        }
        let mut char_to_byte = HashMap::with_capacity(256);
        for (b, &c) in self.byte_chars.iter().enumerate() {
            char_to_byte.insert(c, b as u8);
        }
        let mut bytes = Vec::new();
        for id in ids {
            if self.added.iter().any(|t| t.id == *id) {
                continue;
            }
            let Some(token) = by_id.get(id) else { continue };
            let (body, eow) = match token.strip_suffix(END_OF_WORD) {
                Some(body) => (body, true),
                None => (*token, false),
            };
            bytes.extend(body.chars().filter_map(|c| char_to_byte.get(&c).copied()));
            if eow {
                bytes.push(b' ');
            }
        }
        String::from_utf8_lossy(&bytes).trim().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The compressed merges are SD1.5's `merges.txt` byte for byte (the fixture folder is the real tokenizer).
    #[test]
    fn embedded_merges_are_sd15s() {
        let fixture = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/tiny-sd/tokenizer/merges.txt"
        );
        let expected = std::fs::read_to_string(fixture).unwrap();
        let mut merges = String::new();
        std::io::Read::read_to_string(
            &mut flate2::read::ZlibDecoder::new(SD15_MERGES_ZLIB),
            &mut merges,
        )
        .unwrap();
        assert!(merges == expected);
    }
}
