//! Parity of `ClipTokenizer` with transformers' `CLIPTokenizer`, on the reference ids recorded by
//! `tools/fixturegen/tokenizer.py` in `tests/fixtures/tokenizer/refs.json` (for the tokenizer folder in
//! `tests/fixtures/tiny-sd/tokenizer/`), plus its error reporting.
//!
//! Fixtures are read from `$SKETCHX_FIXTURES` when that variable is set (for builds whose manifest is not the
//! repository root), else from `tests/fixtures` next to this crate's `Cargo.toml`.

mod common;
use common::fixtures;

use std::path::{Path, PathBuf};

use serde_json::Value;
use sketchx::models::tokenizer::ClipTokenizer;
use sketchx::Error;

fn tokenizer_dir() -> PathBuf {
    fixtures().join("tiny-sd").join("tokenizer")
}

fn refs() -> Value {
    let path = fixtures().join("tokenizer").join("refs.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).expect("refs.json parses")
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .expect("an array of ids")
        .iter()
        .map(|v| v.as_u64().expect("an id") as u32)
        .collect()
}

/// A scratch directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("sketchx-tokenizer-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    /// Copies the fixture's vocab.json and merges.txt into this directory.
    fn with_vocab(self) -> Self {
        for file in ["vocab.json", "merges.txt"] {
            std::fs::copy(tokenizer_dir().join(file), self.0.join(file))
                .expect("copy fixture file");
        }
        self
    }

    fn write(&self, file: &str, contents: &str) {
        std::fs::write(self.0.join(file), contents).expect("write temp file");
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Compares every reference case; returns a description of each mismatch.
fn mismatches(tok: &ClipTokenizer, cases: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let cases = cases.as_array().expect("cases array");
    assert!(
        cases.len() >= 30,
        "expected the full prompt list, got {} cases",
        cases.len()
    );
    for case in cases {
        let prompt = case["prompt"].as_str().expect("prompt");
        let plain = tok.encode(prompt);
        let expected_plain = ids(&case["ids_no_special"]);
        if plain != expected_plain {
            out.push(format!(
                "encode({prompt:?}):\n   got {plain:?}\n  want {expected_plain:?}"
            ));
        }
        let mut with_special = vec![tok.bos_id()];
        with_special.extend(&plain);
        with_special.push(tok.eos_id());
        let expected_special = ids(&case["input_ids"]);
        if with_special != expected_special {
            out.push(format!("[bos]+encode+[eos] ({prompt:?}):\n   got {with_special:?}\n  want {expected_special:?}"));
        }
        let padded = tok.encode_padded(prompt);
        let expected_padded = ids(&case["input_ids_padded"]);
        if padded != expected_padded {
            out.push(format!(
                "encode_padded({prompt:?}):\n   got {padded:?}\n  want {expected_padded:?}"
            ));
        }
    }
    out
}

#[test]
fn loads_the_sd15_tokenizer_folder() {
    let tok = ClipTokenizer::from_dir(&tokenizer_dir()).expect("load tokenizer");
    let refs = refs();
    assert_eq!(tok.max_length(), 77);
    assert_eq!(
        tok.max_length() as u64,
        refs["model_max_length"].as_u64().unwrap()
    );
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id()),
        (49406, 49407, 49407)
    );
    assert_eq!(tok.bos_id() as u64, refs["bos_id"].as_u64().unwrap());
    assert_eq!(tok.eos_id() as u64, refs["eos_id"].as_u64().unwrap());
    assert_eq!(tok.pad_id() as u64, refs["pad_id"].as_u64().unwrap());
    assert_eq!(
        tok.encode("a photo of a cat"),
        vec![320, 1125, 539, 320, 2368]
    );
}

#[test]
fn matches_transformers_on_every_reference_prompt() {
    let tok = ClipTokenizer::from_dir(&tokenizer_dir()).expect("load tokenizer");
    let bad = mismatches(&tok, &refs()["cases"]);
    assert!(
        bad.is_empty(),
        "{} mismatches:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

#[test]
fn matches_transformers_with_bang_padding() {
    let refs = refs();
    let bang = &refs["pad_bang"];
    let dir = TempDir::new("bang").with_vocab();
    dir.write(
        "tokenizer_config.json",
        &bang["tokenizer_config"].to_string(),
    );
    dir.write(
        "special_tokens_map.json",
        &bang["special_tokens_map"].to_string(),
    );
    let tok = ClipTokenizer::from_dir(dir.path()).expect("load tokenizer");
    assert_eq!(tok.pad_id() as u64, bang["pad_id"].as_u64().unwrap());
    assert_eq!(tok.pad_id(), 0, "'!' is token 0");
    assert_eq!((tok.bos_id(), tok.eos_id()), (49406, 49407));
    let bad = mismatches(&tok, &bang["cases"]);
    assert!(
        bad.is_empty(),
        "{} mismatches:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

#[test]
fn truncation_keeps_the_end_token_and_padding_uses_the_pad_id() {
    let tok = ClipTokenizer::from_dir(&tokenizer_dir()).expect("load tokenizer");
    let n = tok.max_length();

    let long = "cat ".repeat(200);
    assert_eq!(tok.encode(&long).len(), 200);
    let padded = tok.encode_padded(&long);
    assert_eq!(padded.len(), n);
    assert_eq!(padded[0], tok.bos_id());
    assert_eq!(padded[n - 1], tok.eos_id());
    assert!(
        padded[1..n - 1].iter().all(|&id| id == 2368),
        "body is 75 x 'cat</w>'"
    );

    let short = tok.encode_padded("a cat");
    assert_eq!(&short[..4], &[tok.bos_id(), 320, 2368, tok.eos_id()]);
    assert!(short[4..].iter().all(|&id| id == tok.pad_id()));
    assert_eq!(short.len(), n);

    let empty = tok.encode_padded("");
    assert_eq!(&empty[..2], &[tok.bos_id(), tok.eos_id()]);
    assert_eq!(empty.len(), n);

    // SD2-style folder: pad '!' (id 0) differs from eos.
    let dir = TempDir::new("pad").with_vocab();
    dir.write("special_tokens_map.json", r#"{"pad_token": "!"}"#);
    dir.write("tokenizer_config.json", r#"{"model_max_length": 10}"#);
    let tok = ClipTokenizer::from_dir(dir.path()).expect("load tokenizer");
    assert_eq!(tok.max_length(), 10);
    assert_eq!(
        tok.encode_padded("a cat"),
        vec![49406, 320, 2368, 49407, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(
        tok.encode_padded(&long),
        [vec![49406], vec![2368; 8], vec![49407]].concat()
    );
}

#[test]
fn special_tokens_may_be_objects_and_default_when_absent() {
    let dir = TempDir::new("objects").with_vocab();
    let tok = ClipTokenizer::from_dir(dir.path()).expect("load without configs");
    assert_eq!(
        (tok.max_length(), tok.bos_id(), tok.eos_id(), tok.pad_id()),
        (77, 49406, 49407, 49407)
    );
    dir.write(
        "special_tokens_map.json",
        r#"{"bos_token": {"content": "<|startoftext|>", "normalized": true}, "pad_token": {"content": "!"}}"#,
    );
    let tok = ClipTokenizer::from_dir(dir.path()).expect("load with object tokens");
    assert_eq!((tok.bos_id(), tok.pad_id()), (49406, 0));
}

#[test]
fn tokenizer_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<ClipTokenizer>();
}

#[test]
fn missing_vocab_is_a_missing_file_error() {
    let dir = TempDir::new("missing");
    std::fs::copy(
        tokenizer_dir().join("merges.txt"),
        dir.path().join("merges.txt"),
    )
    .unwrap();
    match ClipTokenizer::from_dir(dir.path()) {
        Err(Error::MissingFile { path }) => assert!(path.ends_with("vocab.json"), "{path}"),
        other => panic!("expected MissingFile for vocab.json, got {other:?}"),
    }
    let dir = TempDir::new("missing-merges");
    std::fs::copy(
        tokenizer_dir().join("vocab.json"),
        dir.path().join("vocab.json"),
    )
    .unwrap();
    match ClipTokenizer::from_dir(dir.path()) {
        Err(Error::MissingFile { path }) => assert!(path.ends_with("merges.txt"), "{path}"),
        other => panic!("expected MissingFile for merges.txt, got {other:?}"),
    }
}

#[test]
fn malformed_files_are_malformed_file_errors() {
    let expect_malformed = |dir: &Path, file: &str| match ClipTokenizer::from_dir(dir) {
        Err(Error::MalformedFile { path, message }) => {
            assert!(path.ends_with(file), "error names {path}, expected {file}");
            assert!(!message.is_empty());
        }
        other => panic!("expected MalformedFile for {file}, got {other:?}"),
    };

    let dir = TempDir::new("bad-merges").with_vocab();
    dir.write("merges.txt", "#version: 0.2\ni n\nthis line has three\n");
    expect_malformed(dir.path(), "merges.txt");
    dir.write("merges.txt", "#version: 0.2\ni n\nzz\u{4e00} q\n");
    expect_malformed(dir.path(), "merges.txt");

    let dir = TempDir::new("bad-vocab").with_vocab();
    dir.write("vocab.json", "{\"a\": 0, ");
    expect_malformed(dir.path(), "vocab.json");

    let dir = TempDir::new("bad-config").with_vocab();
    dir.write("tokenizer_config.json", "[not json");
    expect_malformed(dir.path(), "tokenizer_config.json");

    let dir = TempDir::new("bad-special").with_vocab();
    dir.write(
        "special_tokens_map.json",
        r#"{"pad_token": "<|not-a-token|>"}"#,
    );
    expect_malformed(dir.path(), "special_tokens_map.json");
}

/// The tokenizer compiled into sketchx for single-file checkpoints (no tokenizer folder, no Hub) is SD1.5's: its
/// vocabulary, derived from the embedded merges, equals `vocab.json` entry for entry, the embedded merges equal
/// `merges.txt`, and it encodes every reference prompt as transformers does.
#[test]
fn the_built_in_sd15_tokenizer_is_the_real_one() {
    let built_in = ClipTokenizer::sd15().expect("built-in tokenizer");
    let text = std::fs::read_to_string(tokenizer_dir().join("vocab.json")).unwrap();
    let vocab: std::collections::HashMap<String, u32> = serde_json::from_str(&text).unwrap();
    assert_eq!(vocab.len(), 49408);
    assert!(built_in.vocab() == &vocab, "the derived vocabulary differs");
    let from_dir = ClipTokenizer::from_dir(&tokenizer_dir()).unwrap();
    assert_eq!(format!("{built_in:?}"), format!("{from_dir:?}"));
    let bad = mismatches(&built_in, &refs()["cases"]);
    assert!(
        bad.is_empty(),
        "{} mismatches:\n{}",
        bad.len(),
        bad.join("\n")
    );
}
