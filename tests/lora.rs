//! LoRA fusion against diffusers: for every file of `reference/lora_fused` (diffusers' `load_lora_weights` +
//! `fuse_lora`, several LoRAs through `set_adapters`), the fused parameters of tiny-sd equal diffusers' within f32
//! rounding; every bad file of `lora/bad` fails with the typed error naming what the manifest says; scale 0 leaves
//! the weights (and the image) unchanged; a LoRA visibly changes the image; in the CPU bf16 mode the layers receive
//! the fused f32 weights (fusion before any bf16 rounding).

mod common;
use common::*;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use sketchx::engine::{Engine, EngineConfig};
use sketchx::models::loader::{weights_fused, ModelSource};
use sketchx::models::lora::{fuse_for_model, FusedWeights, LoraSpec};
use sketchx::models::weights::SafetensorsFile;
use sketchx::precision::Precision;
use sketchx::request::GenerationRequest;
use sketchx::sketch::Sketch;
use sketchx::Error;

fn tiny_sd() -> ModelSource {
    ModelSource::Local(fixtures().join("tiny-sd"))
}

fn spec(file: &str, scale: f64) -> LoraSpec {
    LoraSpec::file(fixtures().join(file), scale)
}

fn read_tensors(path: &Path) -> HashMap<String, Tensor> {
    let f = SafetensorsFile::open(path).unwrap();
    f.names()
        .into_iter()
        .map(|n| {
            let t = f.load(&n, DType::F32, &Device::Cpu).unwrap();
            (n, t)
        })
        .collect()
}

/// The fused tensor of a reference key (`unet.<param>` / `text_encoder.<param>`).
fn fused_param<'a>(fused: &'a FusedWeights, key: &str) -> Option<&'a Tensor> {
    if let Some(p) = key.strip_prefix("unet.") {
        fused.unet.get(p)
    } else if let Some(p) = key.strip_prefix("text_encoder.") {
        fused.text_encoder.get(p)
    } else {
        panic!("unexpected reference key {key}")
    }
}

/// max |a - b| / max |b|.
fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = b.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    diff / scale
}

fn index() -> Vec<Value> {
    let text = std::fs::read_to_string(fixtures().join("reference/lora_fused/index.json")).unwrap();
    serde_json::from_str::<Value>(&text)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn specs_of(entry: &Value) -> Vec<LoraSpec> {
    entry["loras"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| spec(l["file"].as_str().unwrap(), l["scale"].as_f64().unwrap()))
        .collect()
}

/// Bound on max |ours - diffusers| / max |diffusers| per parameter: both are W + delta rounded to f32 once
/// (diffusers adds in f32, sketchx in f64), so a few f32 ulps (measured: 1.1e-7).
const BOUND: f64 = 1e-6;

/// Compares every reference parameter of every reference file with the fused weights for `precision`.
fn check_references(precision: Precision) -> f64 {
    let mut worst = 0f64;
    let entries = index();
    assert_eq!(entries.len(), 7, "reference files");
    for entry in entries {
        let file = entry["file"].as_str().unwrap();
        let fused = fuse_for_model(&tiny_sd(), None, &specs_of(&entry), precision).unwrap();
        let reference = read_tensors(&fixtures().join(file));
        assert_eq!(reference.len(), entry["params"].as_array().unwrap().len());
        for (key, theirs) in &reference {
            let ours =
                fused_param(&fused, key).unwrap_or_else(|| panic!("{file}: {key} not fused"));
            assert_eq!(ours.dtype(), DType::F32, "{file}: {key}");
            let d = rel_diff(ours, theirs);
            println!("{file} {key}: max rel diff {d:.3e}");
            assert!(d <= BOUND, "{file}: {key}: max rel diff {d:e}");
            worst = worst.max(d);
        }
    }
    worst
}

#[test]
fn fused_weights_match_diffusers_fuse_lora() {
    let worst = check_references(Precision::F32);
    println!("worst max rel diff over every reference parameter: {worst:.3e}");
}

/// Every parameter the manifest lists as changed by diffusers is fused, and no other.
#[test]
fn every_changed_parameter_and_only_those_is_fused() {
    let text = std::fs::read_to_string(fixtures().join("lora/manifest.json")).unwrap();
    let manifest: Value = serde_json::from_str(&text).unwrap();
    for (name, entry) in manifest["files"].as_object().unwrap() {
        let file = entry["file"].as_str().unwrap();
        let fused = fuse_for_model(&tiny_sd(), None, &[spec(file, 1.0)], Precision::F32).unwrap();
        let mut ours: Vec<String> = fused
            .unet
            .keys()
            .map(|k| format!("unet.{k}"))
            .chain(
                fused
                    .text_encoder
                    .keys()
                    .map(|k| format!("text_encoder.{k}")),
            )
            .collect();
        ours.sort();
        let mut theirs: Vec<String> = entry["params_changed"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        theirs.sort();
        assert_eq!(ours, theirs, "{name}");
    }
}

/// In the CPU bf16 mode the fused weights stay f32 until the layers round them: the fused map and the tensors
/// the network constructors read through [`weights_fused`] both equal diffusers' f32 fusion (a bf16 rounding
/// would be ~4e-3 relative).
#[test]
fn cpu_bf16_mode_fuses_before_rounding() {
    let precision = Precision::new(&Device::Cpu, DType::BF16);
    assert_eq!(precision, Precision::CpuBf16);
    let worst = check_references(precision);
    println!("CPU bf16 mode: worst max rel diff of the fused map {worst:.3e}");

    let entry = &index()[0];
    let fused = fuse_for_model(&tiny_sd(), None, &specs_of(entry), precision).unwrap();
    let reference = read_tensors(&fixtures().join(entry["file"].as_str().unwrap()));
    let dir = fixtures().join("tiny-sd");
    let unet = weights_fused(
        &dir.join("unet/diffusion_pytorch_model.safetensors"),
        precision,
        &Device::Cpu,
        fused.unet.clone(),
    )
    .unwrap();
    let te = weights_fused(
        &dir.join("text_encoder/model.safetensors"),
        precision,
        &Device::Cpu,
        fused.text_encoder.clone(),
    )
    .unwrap();
    let mut worst_read = 0f64;
    for (key, theirs) in &reference {
        let (w, name) = match key.strip_prefix("unet.") {
            Some(p) => (&unet, p),
            None => (&te, key.strip_prefix("text_encoder.").unwrap()),
        };
        let read = w.vb().get(theirs.dims(), name).unwrap();
        assert_eq!(read.dtype(), DType::F32, "{key}");
        let d = rel_diff(&read, theirs);
        assert!(d <= BOUND, "{key} as the layers read it: {d:e}");
        worst_read = worst_read.max(d);
    }
    println!("CPU bf16 mode: worst max rel diff as the layers read the weights {worst_read:.3e}");
}

/// In a reduced precision (f16, as on GPUs) the fused weights are handed out in that dtype, rounded once from the
/// f64 sum: within half an f16 ulp of diffusers' f32 fusion.
#[test]
fn reduced_precision_rounds_the_fused_weights_once() {
    let precision = Precision::Reduced(DType::F16);
    let mut worst = 0f64;
    for entry in index() {
        let fused = fuse_for_model(&tiny_sd(), None, &specs_of(&entry), precision).unwrap();
        for (key, theirs) in read_tensors(&fixtures().join(entry["file"].as_str().unwrap())) {
            let ours = fused_param(&fused, &key).unwrap();
            assert_eq!(ours.dtype(), DType::F16, "{key}");
            let d = rel_diff(&ours.to_dtype(DType::F32).unwrap(), &theirs);
            assert!(d <= 1e-3, "{key}: {d:e}");
            worst = worst.max(d);
        }
    }
    println!("f16: worst max rel diff {worst:.3e}");
}

/// Scale 0 leaves every adapted weight bit for bit as stored.
#[test]
fn scale_zero_leaves_the_weights_unchanged() {
    let fused = fuse_for_model(
        &tiny_sd(),
        None,
        &[spec("lora/kohya.safetensors", 0.0)],
        Precision::F32,
    )
    .unwrap();
    let dir = fixtures().join("tiny-sd");
    for (map, file) in [
        (&fused.unet, "unet/diffusion_pytorch_model.safetensors"),
        (&fused.text_encoder, "text_encoder/model.safetensors"),
    ] {
        assert!(!map.is_empty());
        let base = read_tensors(&dir.join(file));
        for (name, t) in map {
            let a = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = base[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(a, b, "{name}");
        }
    }
}

/// The error of fusing `file` at scale 1 into tiny-sd.
fn error_of(file: &str) -> Error {
    fuse_for_model(&tiny_sd(), None, &[spec(file, 1.0)], Precision::F32).expect_err(file)
}

#[test]
fn bad_files_fail_with_typed_errors_naming_the_key_layer_or_file() {
    let text = std::fs::read_to_string(fixtures().join("lora/manifest.json")).unwrap();
    let manifest: Value = serde_json::from_str(&text).unwrap();
    let bad = manifest["bad"].as_array().unwrap();
    assert_eq!(bad.len(), 6);
    for entry in bad {
        let file = entry["file"].as_str().unwrap();
        let err = error_of(file);
        let message = err.to_string();
        println!("{file}: {message}");
        let stem = Path::new(file).file_stem().unwrap().to_str().unwrap();
        match stem {
            "truncated" => {
                assert!(
                    matches!(&err, Error::MalformedFile { path, .. } if path.ends_with("truncated.safetensors")),
                    "{err:?}"
                );
            }
            "sdxl_keys" => {
                let Error::Lora { key, .. } = &err else {
                    panic!("{err:?}")
                };
                assert!(
                    key.starts_with("lora_te1_") || key.starts_with("lora_te2_"),
                    "{key}"
                );
                assert!(message.contains("SDXL"), "{message}");
            }
            "wrong_shape" | "rank_mismatch" => {
                let Error::Lora { key, .. } = &err else {
                    panic!("{err:?}")
                };
                assert_eq!(key, entry["expected_error_names"].as_str().unwrap());
            }
            "nan_alpha" | "unknown_key" => {
                let Error::Lora { key, .. } = &err else {
                    panic!("{err:?}")
                };
                let expected = entry["expected_error_names"].as_str().unwrap();
                assert!(key.starts_with(expected), "{key} vs {expected}");
            }
            other => panic!("unexpected bad file {other}"),
        }
        if let Error::Lora { path, .. } = &err {
            assert!(path.ends_with(&format!("{stem}.safetensors")), "{path}");
        }
    }
}

#[test]
fn a_missing_file_and_an_invalid_scale_are_refused() {
    let err = error_of("lora/none.safetensors");
    assert!(
        matches!(&err, Error::MissingFile { path } if path.ends_with("none.safetensors")),
        "{err:?}"
    );
    for scale in [f64::NAN, f64::INFINITY, 10.5, -11.0] {
        let s = spec("lora/kohya.safetensors", scale);
        let err = s.validate().unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidRequest {
                    field: "loras.scale",
                    ..
                }
            ),
            "{scale}: {err:?}"
        );
        let err = fuse_for_model(&tiny_sd(), None, &[s], Precision::F32).unwrap_err();
        assert!(matches!(err, Error::InvalidRequest { .. }), "{err:?}");
    }
    assert!(spec("lora/kohya.safetensors", -10.0).validate().is_ok());
}

/// Engine::load refuses a bad LoRA with the same error (nothing is built).
#[test]
fn engine_load_refuses_a_bad_lora() {
    let (model, controlnet) = tiny_models();
    let mut cfg = EngineConfig::new(&model, &controlnet).unwrap();
    cfg.loras = vec![spec("lora/bad/unknown_key.safetensors", 1.0)];
    let err = Engine::load(&cfg).err().expect("a bad LoRA fails");
    assert!(matches!(err, Error::Lora { .. }), "{err:?}");
    cfg.loras = vec![spec("lora/kohya.safetensors", 20.0)];
    let err = Engine::load(&cfg).err().expect("a bad scale fails");
    assert!(
        matches!(
            err,
            Error::InvalidRequest {
                field: "loras.scale",
                ..
            }
        ),
        "{err:?}"
    );
}

fn generate_with(loras: Vec<LoraSpec>, dtype: DType) -> Vec<u8> {
    let (model, controlnet) = tiny_models();
    let mut cfg = EngineConfig::new(&model, &controlnet).unwrap();
    cfg.loras = loras;
    cfg.dtype = dtype;
    let engine = Engine::load(&cfg).unwrap();
    let sketch = Sketch::open(&fixtures().join("sketches/house_black_on_white.png")).unwrap();
    let req = GenerationRequest {
        prompt: Some("a house".into()),
        steps: 2,
        seed: Some(7),
        width: Some(64),
        height: Some(64),
        scheduler: "euler_a".parse().unwrap(),
        ..Default::default()
    };
    let out = engine.generate(&req, &sketch, &mut |_| true).unwrap();
    out.images.concat()
}

fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y) as f64)
        .sum::<f64>()
        / a.len() as f64
}

/// A LoRA changes the image far beyond the e2e parity bound (0.25), two LoRAs differ from one, and scale 0 gives
/// the image without LoRA exactly; also in the CPU bf16 mode.
#[test]
fn a_lora_changes_the_image_and_scale_zero_does_not() {
    for dtype in [DType::F32, DType::BF16] {
        let plain = generate_with(Vec::new(), dtype);
        let kohya = generate_with(vec![spec("lora/kohya.safetensors", 1.0)], dtype);
        let zero = generate_with(vec![spec("lora/kohya.safetensors", 0.0)], dtype);
        let two = generate_with(
            vec![
                spec("lora/kohya.safetensors", 0.6),
                spec("lora/peft.safetensors", 0.8),
            ],
            dtype,
        );
        let d = mean_abs_diff(&plain, &kohya);
        let d2 = mean_abs_diff(&kohya, &two);
        println!("{dtype:?}: mean |diff| LoRA vs none {d:.2}, two vs one {d2:.2}");
        assert!(d > 1.0, "{dtype:?}: a LoRA changes the image: {d}");
        assert!(d2 > 1.0, "{dtype:?}: a second LoRA changes the image: {d2}");
        assert_eq!(plain, zero, "{dtype:?}: scale 0");
    }
}
