//! End-to-end parity with diffusers' `StableDiffusionControlNetPipeline` on the tiny fixture models: the same
//! request (prompt, seed, scale, size, scheduler, sketch) must give the same pixels. Bound per image: mean
//! |difference| <= 0.25 and 99.9th percentile <= 4 (0..255 units). Also proves the fixtures are sensitive: the
//! sketch, prompt, seed and scale each change the image far beyond that bound. With `vae_tiling`, the same holds
//! against diffusers' pipeline after `vae.enable_tiling()` (`reference/e2e_vae_tiling`).

mod common;
use common::*;

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use candle_core::DType;
use serde_json::Value;
use sketchx::engine::{Engine, EngineConfig, Generated};
use sketchx::request::GenerationRequest;
use sketchx::sketch::Sketch;

/// The engine for a (model, controlnet) pair of fixture directories in f32, loaded once per test binary.
fn engine_for(model: &str, controlnet: &str) -> &'static Engine {
    engine_with(model, controlnet, DType::F32, false)
}

/// As [`engine_for`], in `dtype` and with [`EngineConfig::vae_tiling`] set to `vae_tiling`.
fn engine_with(model: &str, controlnet: &str, dtype: DType, vae_tiling: bool) -> &'static Engine {
    type Key = (String, String, DType, bool);
    static ENGINES: OnceLock<Mutex<HashMap<Key, &'static Engine>>> = OnceLock::new();
    let mut map = ENGINES.get_or_init(Default::default).lock().unwrap();
    map.entry((model.to_string(), controlnet.to_string(), dtype, vae_tiling))
        .or_insert_with(|| {
            let f = fixtures();
            let mut cfg = EngineConfig::new(
                f.join(model).to_str().unwrap(),
                f.join(controlnet).to_str().unwrap(),
            )
            .unwrap();
            cfg.dtype = dtype;
            cfg.vae_tiling = vae_tiling;
            let engine = Engine::load(&cfg).expect("fixture models load");
            assert_eq!(engine.vae_tiling(), vae_tiling);
            Box::leak(Box::new(engine))
        })
}

fn engine() -> &'static Engine {
    engine_for("tiny-sd", "tiny-controlnet")
}

fn request_for(case: &Value) -> GenerationRequest {
    case_request(case)
}

fn generate(req: &GenerationRequest, sketch: &str) -> Generated {
    let sketch = Sketch::open(&fixtures().join("sketches").join(sketch)).unwrap();
    engine().generate(req, &sketch, &mut |_| true).unwrap()
}

fn cases() -> Vec<Value> {
    cases_in("e2e")
}

fn cases_in(dir: &str) -> Vec<Value> {
    let text =
        std::fs::read_to_string(fixtures().join("reference").join(dir).join("cases.json")).unwrap();
    serde_json::from_str::<Value>(&text)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// Runs every case in `dtype`; calls `check(case name, image index, ours, diffusers' f32 reference)`.
fn for_every_case(dtype: DType, mut check: impl FnMut(&str, usize, &[u8], &[u8])) {
    for case in cases() {
        let name = case["name"].as_str().unwrap().to_string();
        let req = request_for(&case);
        let sketch = Sketch::open(
            &fixtures()
                .join("sketches")
                .join(case["sketch"].as_str().unwrap()),
        )
        .unwrap();
        let engine = engine_with(
            case["model"].as_str().unwrap(),
            case["controlnet"].as_str().unwrap(),
            dtype,
            false,
        );
        let out = engine.generate(&req, &sketch, &mut |_| true).unwrap();
        let refs = case["images"].as_array().unwrap();
        assert_eq!(out.images.len(), refs.len(), "{name}: image count");
        for (i, (ours, file)) in out.images.iter().zip(refs).enumerate() {
            let theirs = image::open(
                fixtures()
                    .join("reference/e2e")
                    .join(file.as_str().unwrap()),
            )
            .unwrap()
            .to_rgb8();
            assert_eq!(
                (theirs.width(), theirs.height()),
                (out.width, out.height),
                "{name}: size"
            );
            check(&name, i, ours, theirs.as_raw());
        }
    }
}

#[test]
fn every_case_matches_diffusers() {
    let mut report = Vec::new();
    for_every_case(DType::F32, |name, i, ours, theirs| {
        let (mean, p999) = diff_stats(ours, theirs);
        report.push(format!("{name}[{i}]: mean {mean:.4}, p99.9 {p999}"));
        assert!(
            mean <= 0.25 && p999 <= 4.0,
            "{name}[{i}]: mean {mean}, p99.9 {p999}"
        );
    });
    eprintln!("{}", report.join("\n"));
}

/// The CPU bf16 mode rounds the inputs of every matrix product, so it cannot match the f32 references exactly.
/// Its bound is diffusers' own: per image, sketchx in bf16 must be about as close to the f32 reference as
/// diffusers' bf16 pipeline is (`reference/e2e/bf16.json`, written by `tools/fixturegen/bf16.py`): mean |diff| and
/// 99.9th percentile at most diffusers' (0..255 units). (sketchx rounds only the inputs of matrix products, so it
/// lands about twice as close.) The images must differ from the f32 ones somewhere, or the bf16 kernels did not
/// run.
#[test]
fn cpu_bf16_stays_as_close_to_the_f32_references_as_diffusers_bf16() {
    let text = std::fs::read_to_string(fixtures().join("reference/e2e/bf16.json")).unwrap();
    let yardstick: Value = serde_json::from_str(&text).unwrap();
    let (mut report, mut total) = (Vec::new(), 0.0);
    for_every_case(DType::BF16, |name, i, ours, theirs| {
        let d = &yardstick["cases"][name][i];
        let (their_mean, their_p999) = (d["mean"].as_f64().unwrap(), d["p999"].as_f64().unwrap());
        let (mean, p999) = diff_stats(ours, theirs);
        total += mean;
        report.push(format!(
            "{name}[{i}]: sketchx bf16 mean {mean:.3}, p99.9 {p999}; diffusers bf16 mean {their_mean:.3}, \
             p99.9 {their_p999}"
        ));
        assert!(
            mean <= their_mean && p999 <= their_p999,
            "{name}[{i}]: sketchx bf16 mean {mean}, p99.9 {p999}; diffusers bf16 mean {their_mean}, p99.9 \
             {their_p999}"
        );
    });
    eprintln!("{}", report.join("\n"));
    assert!(
        total > 0.0,
        "bf16 gave the f32 images exactly: the bf16 kernels did not run"
    );
}

#[test]
fn control_images_match_the_python_preprocessing() {
    for case in cases() {
        let name = case["name"].as_str().unwrap();
        let sketch = Sketch::open(
            &fixtures()
                .join("sketches")
                .join(case["sketch"].as_str().unwrap()),
        )
        .unwrap();
        let req = request_for(&case);
        let ours = sketch.to_control(req.width.unwrap(), req.height.unwrap(), req.preprocess);
        let theirs = image::open(fixtures().join(format!("reference/e2e/{name}.control.png")))
            .unwrap()
            .to_rgb8();
        let differing = ours
            .rgb
            .iter()
            .zip(theirs.as_raw())
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            ours.rgb.len(),
            theirs.as_raw().len(),
            "{name}: control image size"
        );
        assert_eq!(
            differing, 0,
            "{name}: {differing} control image bytes differ"
        );
    }
}

#[test]
fn sketch_prompt_seed_and_scale_each_change_the_image() {
    let base = GenerationRequest {
        prompt: Some("a cozy house, watercolor".into()),
        seed: Some(42),
        steps: 4,
        width: Some(64),
        height: Some(64),
        ..Default::default()
    };
    let a = generate(&base, "house_black_on_white.png");
    let variants: [(&str, GenerationRequest, &str); 4] = [
        ("sketch", base.clone(), "house_transparent.png"),
        (
            "prompt",
            GenerationRequest {
                prompt: Some("a spaceship in orbit".into()),
                ..base.clone()
            },
            "house_black_on_white.png",
        ),
        (
            "seed",
            GenerationRequest {
                seed: Some(43),
                ..base.clone()
            },
            "house_black_on_white.png",
        ),
        (
            "scale",
            GenerationRequest {
                temperature: 0.0,
                ..base.clone()
            },
            "house_black_on_white.png",
        ),
    ];
    for (what, req, sketch) in variants {
        let b = generate(&req, sketch);
        let (mean, _) = diff_stats(&a.images[0], &b.images[0]);
        eprintln!("changing the {what}: mean |diff| {mean:.2}");
        assert!(
            mean > 2.5,
            "changing the {what} barely changed the image (mean |diff| {mean})"
        );
    }
    // And the same request twice is bit-identical.
    let again = generate(&base, "house_black_on_white.png");
    assert_eq!(a.images, again.images);
}

#[test]
fn cancel_from_the_observer_stops_with_cancelled() {
    let req = GenerationRequest {
        prompt: Some("x".into()),
        seed: Some(1),
        steps: 10,
        width: Some(64),
        height: Some(64),
        ..Default::default()
    };
    let sketch = Sketch::open(&fixtures().join("sketches/house_black_on_white.png")).unwrap();
    let mut calls = 0;
    let err = engine()
        .generate(&req, &sketch, &mut |s| {
            calls += 1;
            s.step < 3
        })
        .unwrap_err();
    assert!(matches!(err, sketchx::Error::Cancelled), "{err}");
    assert_eq!(calls, 3);
}

#[test]
fn no_seed_draws_a_json_safe_random_seed_and_reports_it() {
    let req = GenerationRequest {
        prompt: Some("x".into()),
        steps: 1,
        width: Some(64),
        height: Some(64),
        ..Default::default()
    };
    let a = generate(&req, "house_black_on_white.png");
    let b = generate(
        &GenerationRequest {
            seed: Some(a.seed),
            ..req.clone()
        },
        "house_black_on_white.png",
    );
    assert!(a.seed < (1u64 << 53));
    assert_eq!(
        a.images, b.images,
        "the reported seed reproduces the images"
    );
}

fn reference_image(dir: &str, file: &Value) -> image::RgbImage {
    image::open(
        fixtures()
            .join("reference")
            .join(dir)
            .join(file.as_str().unwrap()),
    )
    .unwrap()
    .to_rgb8()
}

fn generate_case(case: &Value, vae_tiling: bool) -> Generated {
    let sketch = Sketch::open(
        &fixtures()
            .join("sketches")
            .join(case["sketch"].as_str().unwrap()),
    )
    .unwrap();
    let model = case["model"].as_str().unwrap();
    let controlnet = case["controlnet"].as_str().unwrap();
    engine_with(model, controlnet, DType::F32, vae_tiling)
        .generate(&request_for(case), &sketch, &mut |_| true)
        .unwrap()
}

#[test]
fn vae_tiling_cases_match_diffusers_with_enable_tiling() {
    let cases = cases_in("e2e_vae_tiling");
    assert_eq!(cases.len(), 2);
    let mut report = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap().to_string();
        assert_eq!(case["vae_tiling"], Value::Bool(true), "{name}");
        let tiled = generate_case(&case, true);
        let untiled = generate_case(&case, false);
        let refs = case["images"].as_array().unwrap();
        assert_eq!(tiled.images.len(), refs.len(), "{name}: image count");
        for (i, file) in refs.iter().enumerate() {
            let theirs = reference_image("e2e_vae_tiling", file);
            assert_eq!(
                (theirs.width(), theirs.height()),
                (tiled.width, tiled.height)
            );
            let (mean, p999) = diff_stats(&tiled.images[i], theirs.as_raw());
            let (umean, up999) = diff_stats(&untiled.images[i], theirs.as_raw());
            report.push(format!(
                "{name}[{i}]: tiled mean {mean:.4}, p99.9 {p999}; untiled mean {umean:.4}, p99.9 {up999}"
            ));
            assert!(
                mean <= 0.25 && p999 <= 4.0,
                "{name}[{i}]: mean {mean}, p99.9 {p999}"
            );
            // Without tiling the seams are missing: the reference tells tiled from untiled decoding.
            assert!(
                up999 > 4.0,
                "{name}[{i}]: the untiled image is within the bound too (p99.9 {up999})"
            );
        }
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn vae_tiling_leaves_images_within_one_tile_unchanged() {
    // 64x64 on tiny-sd: 8x8 latents, exactly one tile (diffusers tiles only latents larger than a tile).
    let case = cases()
        .into_iter()
        .find(|c| c["name"] == "square_cfg")
        .unwrap();
    let tiled = generate_case(&case, true);
    assert_eq!(tiled.images, generate_case(&case, false).images);
}

#[test]
fn pipeline_with_vae_tiling_matches_diffusers_with_enable_tiling() {
    use sketchx::{JobState, Pipeline, PipelineConfig};
    let case = cases_in("e2e_vae_tiling")
        .into_iter()
        .find(|c| c["name"] == "tiled_nonsquare")
        .unwrap();
    let (model, controlnet) = tiny_models();
    let mut config = PipelineConfig::new(&model, &controlnet).unwrap();
    config.engine.vae_tiling = true;
    config.cleanup_interval = None;
    let out = scratch_dir("vae-tiling");
    config.output_dir = out.clone();
    let pipe = Pipeline::new(config).unwrap();
    let sketch = fixtures()
        .join("sketches")
        .join(case["sketch"].as_str().unwrap());
    let id = pipe.submit(request_for(&case), sketch.as_path()).unwrap();
    let status = pipe
        .wait(&id, Some(std::time::Duration::from_secs(300)))
        .unwrap();
    assert_eq!(status.state, JobState::Completed, "{}", status.message);
    let ours = image::open(&status.images[0]).unwrap().to_rgb8();
    let theirs = reference_image("e2e_vae_tiling", &case["images"][0]);
    let (mean, p999) = diff_stats(ours.as_raw(), theirs.as_raw());
    assert!(
        mean <= 0.25 && p999 <= 4.0,
        "pipeline with vae_tiling: mean {mean}, p99.9 {p999}"
    );
    pipe.shutdown();
    std::fs::remove_dir_all(out).unwrap();
}
