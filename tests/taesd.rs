//! TAESD (diffusers' `AutoencoderTiny`): the decoder against diffusers on the tiny fixture model
//! (`reference/fewstep/components.safetensors`), the engine's `vae: tiny` choice, its live-preview decode against
//! diffusers' TAESD previews (`reference/e2e_fewstep`), and the errors of a missing or unfit tiny VAE.
//!
//! Image bounds are those of `tests/e2e_parity.rs`: per image, mean |difference| <= 0.25 and 99.9th percentile
//! <= 4 (0..255 units).

mod common;
use common::*;

use std::collections::HashMap;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use sketchx::engine::{Engine, EngineConfig};
use sketchx::models::config::ConfigFile;
use sketchx::models::loader::{weights, ModelSource};
use sketchx::models::taesd::TinyVae;
use sketchx::precision::Precision;
use sketchx::request::{GenerationRequest, VaeKind};
use sketchx::sketch::Sketch;
use sketchx::{Error, Pipeline, PipelineConfig};

fn tiny_vae(precision: Precision) -> TinyVae {
    let dir = fixtures().join("tiny-taesd");
    let config = ConfigFile::read(&dir.join("config.json")).unwrap();
    let w = weights(
        &dir.join("diffusion_pytorch_model.safetensors"),
        precision,
        &Device::Cpu,
    )
    .unwrap();
    TinyVae::load(w, &config).unwrap()
}

fn components() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join("reference/fewstep/components.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

/// (max |diff|, max |reference|).
fn max_diff(ours: &Tensor, theirs: &Tensor) -> (f32, f32) {
    assert_eq!(ours.dims(), theirs.dims(), "shape mismatch");
    let v = |t: &Tensor| {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let (a, b) = (v(ours), v(theirs));
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    (d, b.iter().map(|y| y.abs()).fold(0f32, f32::max))
}

/// (mean |diff|, 99.9th percentile |diff|) between two RGB8 images.
fn diff_stats(a: &[u8], b: &[u8]) -> (f64, f64) {
    assert_eq!(a.len(), b.len(), "image sizes differ");
    let mut d: Vec<u8> = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).collect();
    let mean = d.iter().map(|&x| x as f64).sum::<f64>() / d.len() as f64;
    d.sort_unstable();
    let idx = ((d.len() as f64) * 0.999).ceil() as usize - 1;
    (mean, d[idx.min(d.len() - 1)] as f64)
}

fn assert_within_bound(what: &str, ours: &[u8], theirs: &[u8]) {
    let (mean, p999) = diff_stats(ours, theirs);
    eprintln!("{what}: mean |diff| {mean:.4}, p99.9 {p999}");
    assert!(
        mean <= 0.25 && p999 <= 4.0,
        "{what}: mean {mean}, p99.9 {p999}"
    );
}

#[test]
fn tiny_vae_decode_matches_diffusers() {
    let r = components();
    let vae = tiny_vae(Precision::F32);
    assert_eq!((vae.scale_factor, vae.latent_channels), (8, 4));
    assert_eq!(vae.scaling_factor, 1.0);
    assert_eq!((vae.latent_magnitude, vae.latent_shift), (3.0, 0.5));
    assert!(!vae.force_upcast);
    let out = vae.decode(&r["taesd.latents"]).unwrap();
    let (d, m) = max_diff(&out, &r["taesd.image"]);
    eprintln!("tiny VAE decode: max |diff| = {d:.3e} (max |ref| = {m:.3e})");
    assert!(d <= 1e-5 * m.max(1.0), "max |diff| {d}");
}

#[test]
fn tiny_vae_decode_in_cpu_bf16_stays_close() {
    // The CPU bf16 mode rounds every convolution's inputs and kernels to bf16: close, not equal.
    let r = components();
    let out = tiny_vae(Precision::CpuBf16)
        .decode(&r["taesd.latents"])
        .unwrap();
    let (d, m) = max_diff(&out, &r["taesd.image"]);
    eprintln!("tiny VAE decode, CPU bf16: max |diff| = {d:.3e} (max |ref| = {m:.3e})");
    assert!(d > 0.0 && d <= 5e-2 * m.max(1.0), "max |diff| {d}");
}

/// The fixture engine (tiny-sd + tiny-controlnet) with the tiny TAESD, loaded once.
fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let (model, controlnet) = tiny_models();
        let mut cfg = EngineConfig::new(&model, &controlnet).unwrap();
        cfg.tiny_vae = Some(ModelSource::Local(fixtures().join("tiny-taesd")));
        let engine = Engine::load(&cfg).expect("fixture models load");
        assert!(engine.tiny_vae().is_some());
        engine
    })
}

fn fewstep_cases() -> Value {
    let text =
        std::fs::read_to_string(fixtures().join("reference/e2e_fewstep/cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn case(name: &str) -> Value {
    fewstep_cases()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("case {name}"))
        .clone()
}

fn reference_png(file: &str) -> Vec<u8> {
    image::open(fixtures().join("reference/e2e_fewstep").join(file))
        .unwrap()
        .to_rgb8()
        .into_raw()
}

/// The request of a few-step case (its LoRAs belong to the engine), decoded by `vae`.
fn request_for(case: &Value, vae: VaeKind) -> GenerationRequest {
    GenerationRequest {
        eta: case["eta"].as_f64().unwrap_or(0.0),
        timestep_spacing: case["timestep_spacing"]
            .as_str()
            .map(|t| t.parse().unwrap()),
        vae,
        ..case_request(case)
    }
}

/// diffusers' TAESD cases end to end: LoRA + LCM decoded by TAESD, and live previews (the tiny VAE's decode of
/// each step's x0, as `Generator::preview` gives them to the job executor) at every step, LCM and Euler-a.
#[test]
fn taesd_cases_match_diffusers_end_to_end_with_live_previews() {
    use sketchx::models::lora::LoraSpec;
    use sketchx::pipeline::Generator;
    let mut previews_checked = 0;
    for name in ["taesd_decode", "taesd_preview_lcm", "taesd_preview_euler_a"] {
        let case = case(name);
        let (model, controlnet) = tiny_models();
        let mut cfg = EngineConfig::new(&model, &controlnet).unwrap();
        cfg.tiny_vae = Some(ModelSource::Local(fixtures().join("tiny-taesd")));
        for l in case["loras"].as_array().unwrap() {
            cfg.loras.push(LoraSpec::file(
                fixtures().join(l["file"].as_str().unwrap()),
                l["scale"].as_f64().unwrap(),
            ));
        }
        let engine = Engine::load(&cfg).unwrap();
        let vae: VaeKind = case["vae"].as_str().unwrap().parse().unwrap();
        let mut previews = Vec::new();
        let out = engine
            .generate(&request_for(&case, vae), &sketch_of(&case), &mut |info| {
                if info.latents.is_some() {
                    previews.push(Generator::preview(&engine, info).expect("a preview"));
                }
                true
            })
            .unwrap();
        for (i, (img, file)) in out
            .images
            .iter()
            .zip(case["images"].as_array().unwrap())
            .enumerate()
        {
            assert_within_bound(
                &format!("{name}[{i}]"),
                img,
                &reference_png(file.as_str().unwrap()),
            );
        }
        for p in case["previews"].as_array().into_iter().flatten() {
            let k = p["step_index"].as_u64().unwrap() as usize;
            let ours = &previews[k];
            assert_eq!(ours.step, k + 1, "{name}: preview step");
            assert_eq!(
                (ours.width, ours.height),
                (out.width, out.height),
                "{name}: preview size"
            );
            assert_within_bound(
                &format!("{name} live preview step {k}"),
                &ours.rgb,
                &reference_png(p["images"][0].as_str().unwrap()),
            );
            previews_checked += 1;
        }
    }
    assert!(
        previews_checked >= 8,
        "only {previews_checked} previews checked"
    );
}

fn sketch_of(case: &Value) -> Sketch {
    Sketch::open(
        &fixtures()
            .join("sketches")
            .join(case["sketch"].as_str().unwrap()),
    )
    .unwrap()
}

#[test]
fn previews_of_diffusers_x0_match_diffusers_taesd_previews() {
    let x0s = candle_core::safetensors::load(
        fixtures().join("reference/e2e_fewstep/preview_x0.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut checked = 0;
    for case in fewstep_cases()["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let Some(previews) = case["previews"].as_array() else {
            continue;
        };
        for p in previews {
            let k = p["step_index"].as_u64().unwrap();
            let x0 = &x0s[&format!("{name}.step{k}.x0")];
            let ours = engine().decode_preview(x0).unwrap();
            let files = p["images"].as_array().unwrap();
            assert_eq!(ours.len(), files.len(), "{name} step {k}: image count");
            for (i, (img, file)) in ours.iter().zip(files).enumerate() {
                assert_within_bound(
                    &format!("{name} preview step {k} [{i}]"),
                    img,
                    &reference_png(file.as_str().unwrap()),
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 8, "only {checked} previews checked");
}

#[test]
fn vae_tiny_decodes_the_final_latents_with_taesd() {
    // Euler-a's last step has sigma_down = sigma_up = 0, so its result is that step's x0: the tiny decode of the
    // final latents is diffusers' TAESD preview of the last step. The full decode is diffusers' final image.
    let case = case("taesd_preview_euler_a");
    let sketch = sketch_of(&case);
    let full = engine()
        .generate(&request_for(&case, VaeKind::Full), &sketch, &mut |_| true)
        .unwrap();
    let tiny = engine()
        .generate(&request_for(&case, VaeKind::Tiny), &sketch, &mut |_| true)
        .unwrap();
    assert_eq!((tiny.width, tiny.height), (full.width, full.height));
    assert_eq!(tiny.images.len(), 1);
    assert_eq!(
        tiny.images[0].len(),
        (tiny.width * tiny.height * 3) as usize
    );
    assert_within_bound(
        "full VAE final image",
        &full.images[0],
        &reference_png(case["images"][0].as_str().unwrap()),
    );
    let last = case["previews"].as_array().unwrap().last().unwrap().clone();
    assert_within_bound(
        "tiny VAE final image vs diffusers' last TAESD preview",
        &tiny.images[0],
        &reference_png(last["images"][0].as_str().unwrap()),
    );
    let (mean, _) = diff_stats(&tiny.images[0], &full.images[0]);
    eprintln!("tiny vs full VAE: mean |diff| {mean:.3}");
    assert!(mean > 5.0, "the tiny VAE barely changed the image ({mean})");
}

#[test]
fn vae_tiny_without_a_tiny_vae_names_the_field() {
    let (model, controlnet) = tiny_models();
    let engine = Engine::load(&EngineConfig::new(&model, &controlnet).unwrap()).unwrap();
    assert!(engine.tiny_vae().is_none());
    let case = case("taesd_preview_euler_a");
    let req = request_for(&case, VaeKind::Tiny);
    match engine.generate(&req, &sketch_of(&case), &mut |_| panic!("no step may run")) {
        Err(Error::InvalidRequest { field, .. }) => assert_eq!(field, "vae"),
        other => panic!("{:?}", other.err()),
    }
    let x0 = Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        engine.decode_preview(&x0),
        Err(Error::InvalidRequest { field: "vae", .. })
    ));
}

#[test]
fn a_pipeline_without_a_tiny_vae_refuses_vae_tiny_at_submit() {
    let (model, controlnet) = tiny_models();
    let mut cfg = PipelineConfig::new(&model, &controlnet).unwrap();
    cfg.output_dir = scratch_dir("taesd-pipeline");
    cfg.cleanup_interval = None;
    let dir = cfg.output_dir.clone();
    let pipe = Pipeline::new(cfg).unwrap();
    let case = case("taesd_preview_euler_a");
    let bytes = std::fs::read(
        fixtures()
            .join("sketches")
            .join(case["sketch"].as_str().unwrap()),
    )
    .unwrap();
    let err = pipe
        .submit(request_for(&case, VaeKind::Tiny), bytes)
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidRequest { field: "vae", .. }),
        "{err}"
    );
    assert_eq!(pipe.queued(), 0);
    pipe.shutdown();
    let _ = std::fs::remove_dir_all(dir);
}

fn load_with_tiny(dir: &std::path::Path) -> sketchx::Result<Engine> {
    let (model, controlnet) = tiny_models();
    let mut cfg = EngineConfig::new(&model, &controlnet).unwrap();
    cfg.tiny_vae = Some(ModelSource::Local(dir.to_path_buf()));
    Engine::load(&cfg)
}

/// A copy of the tiny TAESD whose config has `key` set to `value` (or removed when `None`).
fn taesd_copy(
    name: &str,
    edit: impl FnOnce(&mut serde_json::Map<String, Value>),
) -> std::path::PathBuf {
    let dir = scratch_dir(name);
    copy_dir(&fixtures().join("tiny-taesd"), &dir);
    let path = dir.join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(config.as_object_mut().unwrap());
    std::fs::write(&path, config.to_string()).unwrap();
    dir
}

#[test]
fn unfit_tiny_vaes_are_refused_naming_file_and_key() {
    // Upsampling 1x: loads, but its images would be 8x too small for the model's latents.
    let dir = taesd_copy("taesd-scale", |c| {
        c.insert("upsampling_scaling_factor".into(), 1.into());
    });
    match load_with_tiny(&dir) {
        Err(Error::UnsupportedModel { path, message }) => {
            assert!(path.ends_with("config.json"), "{path}");
            assert!(message.contains("upsamples 1x"), "{message}");
        }
        other => panic!("{:?}", other.err()),
    }
    let dir = taesd_copy("taesd-act", |c| {
        c.insert("act_fn".into(), "silu".into());
    });
    assert!(matches!(
        load_with_tiny(&dir),
        Err(Error::UnsupportedModel { ref message, .. }) if message.contains("act_fn")
    ));
    let dir = taesd_copy("taesd-nokey", |c| {
        c.remove("num_decoder_blocks");
    });
    assert!(matches!(
        load_with_tiny(&dir),
        Err(Error::MalformedFile { ref message, .. }) if message.contains("num_decoder_blocks")
    ));
    // Weights that do not match the config: the error names the weights file.
    let dir = taesd_copy("taesd-wide", |c| {
        c.insert("decoder_block_out_channels".into(), vec![16; 4].into());
    });
    match load_with_tiny(&dir) {
        Err(Error::MalformedFile { path, .. }) => {
            assert!(
                path.ends_with("diffusion_pytorch_model.safetensors"),
                "{path}"
            )
        }
        other => panic!("{:?}", other.err()),
    }
    // The full VAE is no tiny one.
    assert!(matches!(
        load_with_tiny(&fixtures().join("tiny-sd/vae")),
        Err(Error::UnsupportedModel { ref message, .. }) if message.contains("_class_name")
    ));
    // No weights at all.
    let dir = scratch_dir("taesd-empty");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        fixtures().join("tiny-taesd/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    assert!(matches!(
        load_with_tiny(&dir),
        Err(Error::MissingFile { .. })
    ));
    let _ = std::fs::remove_dir_all(&dir);
    for name in ["taesd-scale", "taesd-act", "taesd-nokey", "taesd-wide"] {
        let _ = std::fs::remove_dir_all(scratch_dir(name));
    }
}
