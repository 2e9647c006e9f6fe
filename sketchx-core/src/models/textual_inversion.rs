//! Textual inversion: embeddings bound to new tokens of the tokenizer, as diffusers' `load_textual_inversion`
//! does.
//!
//! Three file layouts are read, whatever their extension (diffusers, too, tries safetensors first and falls back
//! to a torch pickle):
//! - diffusers' `learned_embeds.safetensors` / `.bin`: one entry `{token: vectors}`, bound to that token unless
//!   another is given;
//! - A1111's `.safetensors`: one entry `emb_params`. diffusers reads it as `{token: vectors}` and would bind the
//!   token `emb_params`; sketchx asks for the token instead (A1111 uses the file name);
//! - A1111's `.pt` (a torch pickle, parsed by [`TorchFile`], never run): `string_to_param['*']` (a dict, or the
//!   original textual inversion code's `ParameterDict`), bound to the file's `name` unless a token is given.
//!
//! A torch file holding a bare tensor (which diffusers binds to the given token) is refused: the pickle reader
//! reads tensors of dicts only.
//!
//! An embedding of `n` vectors adds the tokens `T`, `T_1`, ..., `T_{n-1}`, with ids from the tokenizer's size on
//! (49408 for CLIP) in load order, and their vectors as new rows of the text encoder's token embedding table; the
//! prompt and the negative prompt expand `T` into `T T_1 ...` before tokenizing
//! ([`ClipTokenizer::expand_multi_vector_tokens`], with diffusers' quirks). A token that is already in the
//! vocabulary (or added by an earlier embedding), or whose `T_1` is, is refused as diffusers refuses it (and so
//! is one whose later `T_i` is, which diffusers would write over that token's vector); so is a width other than
//! the text encoder's. Every such problem is an [`Error::Embedding`] naming the file and the key
//! or token.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::loader::{ModelSource, Resolver};
use super::lora::LoraSource;
use super::pickle::{Entry, TorchFile};
use super::tokenizer::ClipTokenizer;
use super::weights::SafetensorsFile;
use crate::error::{Error, Result};

/// The weights name diffusers looks for in a directory or Hub repository, safetensors first.
const LEARNED_EMBEDS: [&str; 2] = ["learned_embeds.safetensors", "learned_embeds.bin"];
/// The one key of an A1111 `.safetensors` embedding.
const A1111_KEY: &str = "emb_params";

/// Where an embedding comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmbeddingSource {
    /// A local file (safetensors or torch pickle).
    File(PathBuf),
    /// A local directory or a Hub repository holding `learned_embeds.safetensors` or `learned_embeds.bin`
    /// (diffusers' names; the Stable Diffusion concepts library's layout).
    Repo(ModelSource),
    /// A file of a Hugging Face Hub repository, downloaded once into the HF cache like the models.
    HubFile {
        /// `owner/name`.
        repo: String,
        /// Branch, tag or commit (`main` when `None`).
        revision: Option<String>,
        /// The file's path inside the repository.
        file: String,
    },
}

impl EmbeddingSource {
    /// Interprets a user-supplied location: an existing file, an existing directory, a Hub file
    /// `owner/name[@revision]/path/in/repo` or a Hub repository `owner/name[@revision]`. Anything else is
    /// [`Error::MissingFile`] naming it.
    pub fn parse(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_file() {
            return Ok(Self::File(path.to_path_buf()));
        }
        if path.is_dir() {
            return Ok(Self::Repo(ModelSource::Local(path.to_path_buf())));
        }
        if let Ok(LoraSource::Hub {
            repo,
            revision,
            file,
        }) = LoraSource::parse(spec)
        {
            return Ok(Self::HubFile {
                repo,
                revision,
                file,
            });
        }
        match ModelSource::parse(spec) {
            Ok(repo @ ModelSource::Hub { .. }) => Ok(Self::Repo(repo)),
            _ => Err(Error::MissingFile {
                path: format!(
                    "embedding {spec} (neither an existing file or directory nor a Hub file or repo like \
                     owner/name[/file])"
                ),
            }),
        }
    }

    /// A human-readable name for messages.
    pub fn display(&self) -> String {
        match self {
            Self::File(p) => p.display().to_string(),
            Self::Repo(source) => source.display(),
            Self::HubFile {
                repo,
                revision,
                file,
            } => match revision {
                Some(r) => format!("{repo}@{r}/{file}"),
                None => format!("{repo}/{file}"),
            },
        }
    }

    /// The local path of the file (downloading it into the HF cache first if needed) and its name for messages.
    fn resolve(&self) -> Result<(PathBuf, String)> {
        match self {
            Self::File(p) if p.is_file() => Ok((p.clone(), p.display().to_string())),
            Self::File(p) => Err(Error::MissingFile {
                path: p.display().to_string(),
            }),
            Self::Repo(source) => {
                let resolver = Resolver::new(source.clone())?;
                match LEARNED_EMBEDS.iter().find(|f| resolver.exists(f)) {
                    Some(f) => Ok((resolver.get(f)?, resolver.describe(f))),
                    None => Err(Error::MissingFile {
                        path: format!(
                            "{} (looked for {})",
                            resolver.describe("."),
                            LEARNED_EMBEDS.join(", ")
                        ),
                    }),
                }
            }
            Self::HubFile {
                repo,
                revision,
                file,
            } => {
                let resolver = Resolver::new(ModelSource::Hub {
                    repo: repo.clone(),
                    revision: revision.clone(),
                })?;
                Ok((resolver.get(file)?, self.display()))
            }
        }
    }
}

/// One embedding to load and the token to bind it to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddingSpec {
    /// The file.
    pub source: EmbeddingSource,
    /// The token written in prompts (diffusers' `token=`); `None`: the file's own (the key of a
    /// `{token: vectors}` file, the `name` of an A1111 `.pt`), which an A1111 `.safetensors` file does not have.
    pub token: Option<String>,
}

impl EmbeddingSpec {
    /// A local file, bound to `token` (or the file's own when `None`).
    pub fn file(path: impl Into<PathBuf>, token: Option<&str>) -> Self {
        Self {
            source: EmbeddingSource::File(path.into()),
            token: token.map(str::to_string),
        }
    }

    /// Splits a `PATH[:TOKEN]` argument (the CLI's `--embedding`, the C options' strings): the text after the
    /// last `:` is the token unless the whole argument names an existing file or directory, the token would be
    /// empty or contain a `/` or `\`, or nothing precedes the `:`.
    pub fn split_arg(arg: &str) -> (&str, Option<&str>) {
        if Path::new(arg).exists() {
            return (arg, None);
        }
        match arg.rsplit_once(':') {
            Some((location, token))
                if !location.is_empty() && !token.is_empty() && !token.contains(['/', '\\']) =>
            {
                (location, Some(token))
            }
            _ => (arg, None),
        }
    }

    /// An embedding from its location ([`EmbeddingSource::parse`]) and optional token; an empty or blank token
    /// is [`Error::InvalidRequest`] for `embeddings.token`.
    pub fn from_location(location: &str, token: Option<&str>) -> Result<Self> {
        if token.is_some_and(|t| t.trim().is_empty()) {
            return Err(Error::invalid(
                "embeddings.token",
                format!("the token for embedding {location} is empty"),
            ));
        }
        Ok(Self {
            source: EmbeddingSource::parse(location)?,
            token: token.map(str::to_string),
        })
    }

    /// Parses a `PATH[:TOKEN]` argument: [`EmbeddingSpec::split_arg`] then [`EmbeddingSpec::from_location`].
    pub fn parse(arg: &str) -> Result<Self> {
        let (location, token) = Self::split_arg(arg);
        Self::from_location(location, token)
    }

    /// A human-readable name for messages.
    pub fn display(&self) -> String {
        match &self.token {
            Some(t) => format!("{} as {t:?}", self.source.display()),
            None => self.source.display(),
        }
    }
}

/// What an embedding file holds, as diffusers' `_retrieve_tokens_and_embeddings` tells the layouts apart.
#[derive(Debug)]
enum Payload {
    /// A state dict with one entry: `{token: vectors}` (diffusers; A1111 safetensors with the key `emb_params`).
    Single { key: String, vectors: Tensor },
    /// An A1111 `.pt`: `string_to_param['*']`, and the `name` entry when it is a string.
    A1111 {
        name: Option<String>,
        vectors: Tensor,
    },
}

/// One embedding read from its file and bound to its token.
#[derive(Debug, Clone)]
pub struct Embedding {
    /// The file, for messages.
    pub path: String,
    /// The token written in prompts.
    pub token: String,
    /// The vectors, `(n, width)` in f32 on the CPU; `n >= 1`.
    pub vectors: Tensor,
}

impl Embedding {
    /// Reads the file of `spec` and binds its vectors to `spec`'s token or the file's own. A file in no known
    /// layout, a missing token, or vectors that are not `(width)` or `(n, width)` are [`Error::Embedding`]; a
    /// missing file is [`Error::MissingFile`].
    pub fn read(spec: &EmbeddingSpec) -> Result<Self> {
        let (path, name) = spec.source.resolve()?;
        let payload = read_payload(&path, &name)?;
        let bad = |key: &str, message: String| Error::Embedding {
            path: name.clone(),
            key: key.to_string(),
            message,
        };
        let given = spec.token.clone();
        let (key, token, vectors) = match payload {
            Payload::Single { key, vectors } => {
                let token = match given {
                    Some(t) => t,
                    None if key == A1111_KEY => {
                        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
                        return Err(bad(
                            &key,
                            format!(
                                "an A1111 embedding names no token: give one (A1111 uses the file name{})",
                                stem.map(|s| format!(", {s:?}")).unwrap_or_default()
                            ),
                        ));
                    }
                    None => key.clone(),
                };
                (key, token, vectors)
            }
            Payload::A1111 { name, vectors } => {
                let key = "string_to_param/*".to_string();
                let token = given.or(name).ok_or_else(|| {
                    bad(
                        "name",
                        "the A1111 embedding has no string name: give a token".into(),
                    )
                })?;
                (key, token, vectors)
            }
        };
        let vectors = match *vectors.dims() {
            [width] if width > 0 => vectors.reshape((1, width))?,
            [n, width] if n > 0 && width > 0 => vectors,
            _ => {
                return Err(bad(
                    &key,
                    format!(
                        "expected vectors of shape (width) or (n, width), got {:?}",
                        vectors.dims()
                    ),
                ))
            }
        };
        Ok(Self {
            path: name,
            token,
            vectors: vectors.to_dtype(DType::F32)?,
        })
    }

    /// Number of vectors (tokens this embedding adds).
    pub fn len(&self) -> usize {
        self.vectors.dim(0).unwrap_or(0)
    }

    /// Whether it holds no vector (never true for an embedding that [`Embedding::read`] returned).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Width of every vector.
    pub fn width(&self) -> usize {
        self.vectors.dim(1).unwrap_or(0)
    }

    /// The tokens it adds: `T`, then `T_1` ... `T_{n-1}` for `n` vectors (diffusers' names).
    pub fn tokens(&self) -> Vec<String> {
        (0..self.len())
            .map(|i| match i {
                0 => self.token.clone(),
                i => format!("{}_{i}", self.token),
            })
            .collect()
    }
}

/// Embeddings bound to new tokens of a tokenizer: the rows to append to the text encoder's token embedding table.
#[derive(Debug, Clone)]
pub struct AddedEmbeddings {
    /// The id of the first added token; the others follow.
    pub first_id: u32,
    /// Every added token's vector, in id order: `(tokens, width)` in f32 on the CPU.
    pub vectors: Tensor,
    /// Each embedding's token and the ids of its tokens (`T`, `T_1`, ...), in load order.
    pub tokens: Vec<(String, Vec<u32>)>,
}

/// Reads every embedding of `specs` and adds their tokens to `tokenizer`, in order, as diffusers'
/// `load_textual_inversion` does; `width` is the text encoder's hidden size. Returns the rows for
/// [`ClipTextModel::append_token_embeddings`](super::clip::ClipTextModel::append_token_embeddings), or `None`
/// when `specs` is empty. On error the tokenizer may hold some of the tokens and must be discarded.
pub fn add_embeddings(
    specs: &[EmbeddingSpec],
    tokenizer: &mut ClipTokenizer,
    width: usize,
) -> Result<Option<AddedEmbeddings>> {
    if specs.is_empty() {
        return Ok(None);
    }
    let first_id = tokenizer.next_added_id();
    let mut rows = Vec::with_capacity(specs.len());
    let mut tokens = Vec::with_capacity(specs.len());
    for spec in specs {
        let e = Embedding::read(spec)?;
        check_token(&e, tokenizer)?;
        if e.width() != width {
            return Err(Error::Embedding {
                path: e.path.clone(),
                key: e.token.clone(),
                message: format!(
                    "vectors of width {} do not fit the text encoder, whose width is {width}",
                    e.width()
                ),
            });
        }
        let ids = e
            .tokens()
            .iter()
            .map(|t| tokenizer.add_token(t))
            .collect::<Vec<_>>();
        tokens.push((e.token.clone(), ids));
        rows.push(e.vectors);
    }
    // Added tokens are numbered consecutively, so the rows are in id order.
    let vectors = Tensor::cat(&rows, 0)?;
    Ok(Some(AddedEmbeddings {
        first_id,
        vectors,
        tokens,
    }))
}

/// diffusers' refusals: an empty token, a token already in the vocabulary (BPE entries, special tokens, tokens
/// added by earlier embeddings), or one whose `T_1` is; also one whose later `T_i` is.
fn check_token(e: &Embedding, tokenizer: &ClipTokenizer) -> Result<()> {
    let refuse = |message: String| Error::Embedding {
        path: e.path.clone(),
        key: e.token.clone(),
        message,
    };
    if e.token.trim().is_empty() {
        return Err(refuse("the token is empty".into()));
    }
    if tokenizer.contains_token(&e.token) {
        return Err(refuse(
            "the token is already in the tokenizer's vocabulary (a word, a special token or an earlier \
             embedding's): choose another"
                .into(),
        ));
    }
    let first = format!("{}_1", e.token);
    if tokenizer.contains_token(&first) {
        return Err(refuse(format!(
            "the multi-vector token {first:?} is already in the tokenizer's vocabulary: choose another"
        )));
    }
    // diffusers checks `T_1` only and would then write a later `T_i` that exists over that token's vector;
    // refusing keeps every added token's row its own.
    if let Some(taken) = e.tokens()[1..].iter().find(|t| tokenizer.contains_token(t)) {
        return Err(refuse(format!(
            "the multi-vector token {taken:?} is already in the tokenizer's vocabulary: choose another"
        )));
    }
    Ok(())
}

/// Reads `path` as safetensors, else as a torch checkpoint (parsed by [`TorchFile`], never run), as diffusers
/// tries safetensors first and falls back to `torch.load`; anything else is [`Error::Embedding`].
fn read_payload(path: &Path, name: &str) -> Result<Payload> {
    let not_safetensors = match SafetensorsFile::open(path) {
        Ok(f) => return safetensors_payload(&f, name),
        Err(Error::MalformedFile { message, .. }) => message,
        Err(e) => return Err(e),
    };
    let not_torch = match TorchFile::open(path) {
        Ok(f) => return torch_payload(&f, name),
        Err(Error::MalformedFile { message, .. }) => message,
        Err(e) => return Err(e),
    };
    Err(Error::Embedding {
        path: name.to_string(),
        key: "(file)".into(),
        message: format!(
            "neither a safetensors file ({not_safetensors}) nor a torch checkpoint ({not_torch})"
        ),
    })
}

/// A safetensors file: one tensor, `{token: vectors}`.
fn safetensors_payload(f: &SafetensorsFile, name: &str) -> Result<Payload> {
    let names = f.names();
    match names.as_slice() {
        [key] => {
            let vectors = f
                .load(key, DType::F32, &Device::Cpu)
                .map_err(|e| Error::Embedding {
                    path: name.to_string(),
                    key: key.clone(),
                    message: e.to_string(),
                })?;
            Ok(Payload::Single {
                key: key.clone(),
                vectors,
            })
        }
        _ => Err(Error::Embedding {
            path: name.to_string(),
            key: names.join(", "),
            message: format!(
                "expected one tensor ({{token: vectors}}, or A1111's {A1111_KEY}), found {}",
                names.len()
            ),
        }),
    }
}

/// A torch checkpoint's embedding, as diffusers' `_retrieve_tokens_and_embeddings` reads a `torch.load`ed
/// dict: one entry `{token: vectors}`, else A1111's `string_to_param['*']` (a plain dict, or the
/// `torch.nn.ParameterDict` of the original textual inversion code) with its `name`.
fn torch_payload(f: &TorchFile, name: &str) -> Result<Payload> {
    let bad = |key: &str, message: String| Error::Embedding {
        path: name.to_string(),
        key: key.to_string(),
        message,
    };
    let keys = match f.get(&[])? {
        Entry::Dict(keys) => keys,
        Entry::Tensor(_) => return Err(bad(
            "(tensor)",
            "the file holds a bare tensor, which sketchx does not read: save it as {token: tensor}"
                .into(),
        )),
        other => {
            return Err(bad(
                "(root)",
                format!("expected a dict of embeddings, found {}", describe(&other)),
            ))
        }
    };
    if let [key] = keys.as_slice() {
        let vectors = torch_tensor(f, &[], key, name)?;
        return Ok(Payload::Single {
            key: key.clone(),
            vectors,
        });
    }
    if keys.iter().any(|k| k == "string_to_param") {
        let dict: &[&str] = match f.get(&["string_to_param", "_parameters"]) {
            Ok(Entry::Dict(_)) => &["string_to_param", "_parameters"],
            _ => &["string_to_param"],
        };
        let vectors = torch_tensor(f, dict, "*", name)?;
        let name = match f.get(&["name"]) {
            Ok(Entry::Str(s)) => Some(s),
            _ => None,
        };
        return Ok(Payload::A1111 { name, vectors });
    }
    Err(bad(
        &keys.join(", "),
        "expected one entry {token: vectors} or A1111's string_to_param".into(),
    ))
}

/// The tensor `key` of the dict at `dict` in f32; anything else there is [`Error::Embedding`] naming it.
fn torch_tensor(f: &TorchFile, dict: &[&str], key: &str, name: &str) -> Result<Tensor> {
    let path: Vec<&str> = dict.iter().copied().chain([key]).collect();
    let entry = f.get(&path)?;
    if !matches!(entry, Entry::Tensor(_)) {
        return Err(Error::Embedding {
            path: name.to_string(),
            key: path.join("/"),
            message: format!("expected the vectors, found {}", describe(&entry)),
        });
    }
    f.tensors_at(dict)?
        .load(key, DType::F32, &Device::Cpu)
        .map_err(|e| Error::Embedding {
            path: name.to_string(),
            key: path.join("/"),
            message: e.to_string(),
        })
}

/// A checkpoint value for messages.
fn describe(entry: &Entry) -> String {
    match entry {
        Entry::None => "None".into(),
        Entry::Bool(b) => format!("the bool {b}"),
        Entry::Int(i) => format!("the integer {i}"),
        Entry::Float(x) => format!("the float {x}"),
        Entry::Str(s) => format!("the string {s:?}"),
        Entry::Bytes(b) => format!("{} bytes", b.len()),
        Entry::Tensor(_) => "a tensor".into(),
        Entry::Dict(keys) => format!("a dict ({})", keys.join(", ")),
        Entry::List(n) => format!("a list of {n}"),
        Entry::Other(what) => format!("an object built by {what} (never run)"),
    }
}
