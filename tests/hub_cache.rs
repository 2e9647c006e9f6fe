//! Hub sources resolve through the standard Hugging Face cache: a model already in the cache (as diffusers or
//! huggingface_hub leave it) loads with `HF_HUB_OFFLINE=1` and no network, and an uncached one is a typed error.
//! One test in its own binary, because it sets process-wide environment variables.

mod common;
use common::*;

use std::path::Path;

use sketchx::engine::{Engine, EngineConfig};
use sketchx::Error;

/// Lays `src` out as `repo` would be in `$HF_HOME/hub`: `models--owner--name/{refs/main, snapshots/<commit>/...}`.
fn cache_repo(hf_home: &Path, repo: &str, src: &Path) {
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let root = hf_home
        .join("hub")
        .join(format!("models--{}", repo.replace('/', "--")));
    std::fs::create_dir_all(root.join("refs")).unwrap();
    std::fs::write(root.join("refs/main"), commit).unwrap();
    copy_dir(src, &root.join("snapshots").join(commit));
}

#[test]
fn cached_hub_models_load_offline_and_uncached_ones_are_named() {
    let home = std::env::temp_dir().join(format!("sketchx-hf-home-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    cache_repo(&home, "sketchx-test/tiny-sd", &fixtures().join("tiny-sd"));
    cache_repo(
        &home,
        "sketchx-test/tiny-controlnet",
        &fixtures().join("tiny-controlnet"),
    );
    // SAFETY: this binary has this one test, so no other thread reads the environment concurrently.
    unsafe {
        std::env::set_var("HF_HOME", &home);
        std::env::set_var("HF_HUB_OFFLINE", "1");
    }
    let cfg = EngineConfig::new("sketchx-test/tiny-sd", "sketchx-test/tiny-controlnet").unwrap();
    let engine = Engine::load(&cfg).expect("a cached model loads offline");
    assert_eq!(engine.vae_scale_factor(), 8);

    let cfg = EngineConfig::new("sketchx-test/not-cached", "sketchx-test/tiny-controlnet").unwrap();
    let err = Engine::load(&cfg)
        .err()
        .expect("an uncached model cannot load offline");
    assert!(
        matches!(err, Error::MissingFile { ref path } if path.contains("sketchx-test/not-cached")),
        "{err}"
    );
    std::fs::remove_dir_all(&home).unwrap();
}
