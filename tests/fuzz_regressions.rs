//! The fuzz targets' checks on stable: every committed seed (`fuzz/seeds/<target>/`) and every input that once
//! made a fuzz target fail (`tests/fixtures/fuzz/<target>/`, each with its fix) replayed through the target's
//! check (`fuzz/src/checks.rs`, included here as it is in the fuzz crate), so that the fixes stay fixed without
//! a nightly toolchain. The named tests below state what each of those inputs did and what it must do now.

#[path = "../fuzz/src/alloc.rs"]
#[allow(dead_code)] // the counting allocator is not installed here (tests run in parallel)
mod alloc;
#[path = "../fuzz/src/checks.rs"]
#[allow(dead_code, clippy::type_complexity)] // the fuzz crate's tables of checks, as they are there
mod checks;

use std::path::PathBuf;

/// The inputs of `target`: its seeds, then its regressions.
fn inputs(target: &str) -> Vec<PathBuf> {
    let repo = checks::repo();
    let mut files = Vec::new();
    for dir in [
        repo.join("fuzz/seeds").join(target),
        repo.join("tests/fixtures/fuzz").join(target),
    ] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut found: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
        found.sort();
        files.extend(found);
    }
    files
}

/// Runs `target`'s check on each of its inputs; fails naming every input whose check panicked.
fn replay(target: &str) {
    let (_, check) = checks::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .expect("a target of checks::TARGETS");
    let files = inputs(target);
    assert!(!files.is_empty(), "no seeds for {target}");
    let failed: Vec<String> = files
        .iter()
        .filter(|path| {
            let data = std::fs::read(path).unwrap();
            std::panic::catch_unwind(|| check(&data)).is_err()
        })
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        failed.is_empty(),
        "{target}: the check fails on {failed:#?}"
    );
}

#[test]
fn every_target_has_a_test_here() {
    let this = include_str!("fuzz_regressions.rs");
    for (name, _) in checks::TARGETS {
        assert!(
            this.contains(&format!("fn replays_{name}()")),
            "no replay test for {name}"
        );
    }
}

#[test]
fn replays_sketch() {
    replay("sketch");
}

#[test]
fn replays_safetensors() {
    replay("safetensors");
}

#[test]
fn replays_configs() {
    replay("configs");
}

#[test]
fn replays_scheduler_config() {
    replay("scheduler_config");
}

#[test]
fn replays_tokenizer_files() {
    replay("tokenizer_files");
}

#[test]
fn replays_tokenizer_text() {
    replay("tokenizer_text");
}

#[test]
fn replays_request() {
    replay("request");
}

#[test]
fn replays_lora() {
    replay("lora");
}

#[test]
fn replays_pickle() {
    replay("pickle");
}
