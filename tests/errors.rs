//! Bad input gets a specific, typed error naming what is wrong: every request field, and model directories with a
//! component missing, a malformed config, mismatched weights, or an unsupported option.

mod common;
use common::*;

use std::path::{Path, PathBuf};

use sketchx::engine::{Engine, EngineConfig};
use sketchx::request::GenerationRequest;
use sketchx::Error;

fn field_of(req: GenerationRequest) -> (&'static str, String) {
    match req.validate() {
        Err(Error::InvalidRequest { field, message }) => (field, message),
        other => panic!("expected InvalidRequest, got {other:?}"),
    }
}

#[test]
fn every_invalid_field_is_named() {
    let d = GenerationRequest::default;
    let cases: Vec<(GenerationRequest, &str)> = vec![
        (
            GenerationRequest {
                temperature: -0.1,
                ..d()
            },
            "temperature",
        ),
        (
            GenerationRequest {
                temperature: 1.5,
                ..d()
            },
            "temperature",
        ),
        (
            GenerationRequest {
                temperature: f64::NAN,
                ..d()
            },
            "temperature",
        ),
        (
            GenerationRequest {
                guidance_scale: 31.0,
                ..d()
            },
            "guidance_scale",
        ),
        (
            GenerationRequest {
                guidance_scale: -1.0,
                ..d()
            },
            "guidance_scale",
        ),
        (
            GenerationRequest {
                guidance_scale: f64::INFINITY,
                ..d()
            },
            "guidance_scale",
        ),
        (
            GenerationRequest {
                num_images: 0,
                ..d()
            },
            "num_images",
        ),
        (
            GenerationRequest {
                num_images: 9,
                ..d()
            },
            "num_images",
        ),
        (GenerationRequest { steps: 0, ..d() }, "steps"),
        (GenerationRequest { steps: 151, ..d() }, "steps"),
        (
            GenerationRequest {
                width: Some(100),
                ..d()
            },
            "width",
        ),
        (
            GenerationRequest {
                width: Some(56),
                ..d()
            },
            "width",
        ),
        (
            GenerationRequest {
                height: Some(4096),
                ..d()
            },
            "height",
        ),
        (
            GenerationRequest {
                controlnet_scale: Some(-0.5),
                ..d()
            },
            "controlnet_scale",
        ),
        (
            GenerationRequest {
                control_guidance_start: 0.8,
                control_guidance_end: 0.5,
                ..d()
            },
            "control_guidance_start",
        ),
        (
            GenerationRequest {
                control_guidance_end: 1.5,
                ..d()
            },
            "control_guidance_end",
        ),
        (
            GenerationRequest {
                prompt: Some("a\0b".into()),
                ..d()
            },
            "prompt",
        ),
        (
            GenerationRequest {
                negative_prompt: Some("x".repeat(20_000)),
                ..d()
            },
            "negative_prompt",
        ),
    ];
    for (req, want) in cases {
        let (field, message) = field_of(req);
        assert_eq!(field, want, "{message}");
        assert!(!message.is_empty());
    }
    let (_, message) = field_of(GenerationRequest { steps: 500, ..d() });
    assert!(
        message.contains("1..=150"),
        "the message names the range: {message}"
    );
    GenerationRequest::default().validate().unwrap();
}

#[test]
fn unknown_scheduler_and_preprocess_names_are_errors() {
    let e = "karras"
        .parse::<sketchx::sampling::schedulers::SchedulerKind>()
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidRequest {
                field: "scheduler",
                ..
            }
        ),
        "{e}"
    );
    let e = "hed".parse::<sketchx::sketch::Preprocess>().unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidRequest {
                field: "preprocess",
                ..
            }
        ),
        "{e}"
    );
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sketchx-errors-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn load(model: &Path, controlnet: &Path) -> Result<Engine, Error> {
    Engine::load(&EngineConfig::new(
        model.to_str().unwrap(),
        controlnet.to_str().unwrap(),
    )?)
}

#[test]
fn a_missing_component_is_named() {
    let f = fixtures();
    for (component, needle) in [
        ("vae", "vae"),
        ("unet/config.json", "unet/config.json"),
        ("tokenizer/merges.txt", "merges.txt"),
        ("scheduler", "scheduler_config.json"),
        ("text_encoder/model.safetensors", "text_encoder"),
    ] {
        let dir = temp_dir("missing");
        copy_dir(&f.join("tiny-sd"), &dir);
        let p = dir.join(component);
        if p.is_dir() {
            std::fs::remove_dir_all(&p).unwrap();
        } else {
            std::fs::remove_file(&p).unwrap();
        }
        let err = load(&dir, &f.join("tiny-controlnet"))
            .err()
            .expect("load must fail");
        assert!(
            matches!(err, Error::MissingFile { .. }),
            "{component}: {err}"
        );
        assert!(err.to_string().contains(needle), "{component}: {err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn malformed_and_unsupported_configs_are_typed_errors() {
    let f = fixtures();
    let dir = temp_dir("malformed");
    copy_dir(&f.join("tiny-sd"), &dir);
    std::fs::write(dir.join("unet/config.json"), "{ not json").unwrap();
    let err = load(&dir, &f.join("tiny-controlnet")).err().unwrap();
    assert!(
        matches!(err, Error::MalformedFile { ref path, .. } if path.contains("unet")),
        "{err}"
    );

    let cfg = std::fs::read_to_string(f.join("tiny-sd/unet/config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v["addition_embed_type"] = "text_time".into();
    std::fs::write(dir.join("unet/config.json"), v.to_string()).unwrap();
    let err = load(&dir, &f.join("tiny-controlnet")).err().unwrap();
    assert!(
        matches!(err, Error::UnsupportedModel { ref message, .. } if message.contains("addition_embed_type")),
        "{err}"
    );

    // Sizes in the config that do not match the weights: an error naming the weights file.
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v["block_out_channels"] = serde_json::json!([32, 32, 32]);
    std::fs::write(dir.join("unet/config.json"), v.to_string()).unwrap();
    let err = load(&dir, &f.join("tiny-controlnet")).err().unwrap();
    assert!(
        matches!(err, Error::MalformedFile { ref path, .. } if path.contains("diffusion_pytorch_model")),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn damaged_weights_files_are_typed_errors_naming_the_file() {
    let f = fixtures();
    let dir = temp_dir("damaged");
    copy_dir(&f.join("tiny-sd"), &dir);
    let cn = temp_dir("damaged-cn");
    copy_dir(&f.join("tiny-controlnet"), &cn);

    // A UNet cut short (an interrupted download or copy).
    let unet = dir.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&unet).unwrap();
    std::fs::write(&unet, &bytes[..bytes.len() / 2]).unwrap();
    let err = load(&dir, &cn).err().unwrap();
    assert!(
        matches!(err, Error::MalformedFile { ref path, ref message }
            if path.ends_with("unet/diffusion_pytorch_model.safetensors") && message.contains("truncated")),
        "{err}"
    );
    std::fs::write(&unet, &bytes).unwrap();

    // A ControlNet that is not safetensors at all.
    let weights = cn.join("diffusion_pytorch_model.safetensors");
    std::fs::write(&weights, b"<html>404 Not Found</html>").unwrap();
    let err = load(&dir, &cn).err().unwrap();
    assert!(
        matches!(err, Error::MalformedFile { ref path, .. } if path.ends_with("diffusion_pytorch_model.safetensors") && path.contains("damaged-cn")),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&cn).unwrap();
}

#[test]
fn a_path_that_is_neither_dir_nor_repo_id_is_refused() {
    let err = EngineConfig::new("./no/such/dir", "lllyasviel/sd-controlnet-scribble").unwrap_err();
    assert!(matches!(err, Error::MissingFile { .. }), "{err}");
}
