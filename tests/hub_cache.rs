//! Hub sources resolve through the standard Hugging Face cache: a model already in the cache (as diffusers or
//! huggingface_hub leave it) loads with `HF_HUB_OFFLINE=1` and no network, and an uncached one is a typed error;
//! the same for a LoRA file from the Hub.
//! One test in its own binary, because it sets process-wide environment variables.

mod common;
use common::*;

use std::path::Path;

use sketchx::engine::{Engine, EngineConfig};
use sketchx::models::loader::ModelSource;
use sketchx::models::lora::{fuse_for_model, LoraSpec};
use sketchx::precision::Precision;
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

    // A LoRA from the Hub resolves through the same cache, and fuses exactly as the same file read locally.
    cache_repo(&home, "sketchx-test/tiny-lora", &fixtures().join("lora"));
    let model = ModelSource::Local(fixtures().join("tiny-sd"));
    let from_hub = fuse_for_model(
        &model,
        None,
        &[LoraSpec::hub(
            "sketchx-test/tiny-lora",
            "kohya.safetensors",
            0.6,
        )],
        Precision::F32,
    )
    .expect("a cached LoRA loads offline");
    let local = fuse_for_model(
        &model,
        None,
        &[LoraSpec::file(
            fixtures().join("lora/kohya.safetensors"),
            0.6,
        )],
        Precision::F32,
    )
    .unwrap();
    assert_eq!(from_hub.unet.len(), local.unet.len());
    for (name, t) in &local.unet {
        let a = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = from_hub.unet[name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(a, b, "{name}");
    }
    let mut cfg =
        EngineConfig::new("sketchx-test/tiny-sd", "sketchx-test/tiny-controlnet").unwrap();
    cfg.loras = vec![LoraSpec::hub(
        "sketchx-test/tiny-lora",
        "peft.safetensors",
        1.0,
    )];
    Engine::load(&cfg).expect("an engine with a cached Hub LoRA loads offline");
    cfg.loras = vec![LoraSpec::hub(
        "sketchx-test/tiny-lora",
        "none.safetensors",
        1.0,
    )];
    let err = Engine::load(&cfg).err().expect("an uncached LoRA file");
    assert!(
        matches!(err, Error::MissingFile { ref path } if path.contains("sketchx-test/tiny-lora/none.safetensors")),
        "{err}"
    );
    std::fs::remove_dir_all(&home).unwrap();
}
