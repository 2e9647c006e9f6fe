//! Single-file checkpoints, original-format ControlNets and VAE overrides (issue 14), through the real candle
//! networks: every case of `tests/fixtures/formats/reference/cases.json` that loads such files matches diffusers'
//! `from_single_file` images (mean |diff| <= 0.25, p99.9 <= 4 in 0..255, as tests/e2e_parity.rs); the tensors the
//! key maps hand out equal the diffusers-layout tensors bit for bit; the `.yaml` route builds tiny-sd's configs;
//! every bad file of `formats/bad/` is a typed error naming the file and the key.

mod common;
use common::*;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde_json::Value;
use sketchx::engine::{Engine, EngineConfig};
use sketchx::models::config::ConfigFile;
use sketchx::models::loader::{ModelSource, WeightsSource};
use sketchx::models::single_file::{self, SingleFileOptions};
use sketchx::models::weights::SafetensorsFile;
use sketchx::request::GenerationRequest;
use sketchx::sketch::Sketch;
use sketchx::Error;

fn formats() -> PathBuf {
    fixtures().join("formats")
}

fn local(p: &Path) -> ModelSource {
    if p.is_file() {
        ModelSource::File(p.to_path_buf())
    } else {
        ModelSource::Local(p.to_path_buf())
    }
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

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(formats().join("reference/cases.json")).unwrap();
    serde_json::from_str::<Value>(&text)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn case(name: &str) -> Value {
    cases()
        .into_iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case {name}"))
}

/// The engine config of a reference case: the files it names (with the diffusers folders as their configs, as
/// the references were made with `config=`), else the fixture folders.
fn config_for(case: &Value) -> EngineConfig {
    let f = fixtures();
    let s = |k: &str| case[k].as_str();
    let model = match s("model_file") {
        Some(file) => formats().join(file.trim_start_matches("formats/")),
        None => f.join(s("model").unwrap()),
    };
    let controlnet = match s("controlnet_file") {
        Some(file) => formats().join(file.trim_start_matches("formats/")),
        None => f.join(s("controlnet").unwrap()),
    };
    let mut cfg = EngineConfig::new(model.to_str().unwrap(), controlnet.to_str().unwrap()).unwrap();
    if model.is_file() {
        cfg.single_file.config = Some(ModelSource::Local(f.join(s("model").unwrap())));
    }
    if controlnet.is_file() {
        cfg.controlnet_config = Some(ModelSource::Local(f.join(s("controlnet").unwrap())));
    }
    cfg.single_file.extract_ema = case["extract_ema"].as_bool().unwrap_or(false);
    if let Some(vae) = s("vae") {
        cfg.vae = Some(local(&formats().join(vae.trim_start_matches("formats/"))));
    }
    if let Some(vae) = s("vae_file") {
        cfg.vae = Some(local(&formats().join(vae.trim_start_matches("formats/"))));
    }
    cfg
}

fn request_for(case: &Value) -> GenerationRequest {
    GenerationRequest {
        preprocess: case["preprocess"].as_str().unwrap().parse().unwrap(),
        ..case_request(case)
    }
}

/// Generates `case` with `cfg` and returns (mean, p99.9) against each of its reference images.
fn run_case(case: &Value, cfg: &EngineConfig) -> Vec<(f64, f64)> {
    let engine = Engine::load(cfg).unwrap_or_else(|e| panic!("{}: {e}", case["name"]));
    let sketch = Sketch::open(
        &fixtures()
            .join("sketches")
            .join(case["sketch"].as_str().unwrap()),
    )
    .unwrap();
    let out = engine
        .generate(&request_for(case), &sketch, &mut |_| true)
        .unwrap();
    let refs = case["images"].as_array().unwrap();
    assert_eq!(out.images.len(), refs.len());
    out.images
        .iter()
        .zip(refs)
        .map(|(ours, file)| {
            let theirs = image::open(formats().join("reference").join(file.as_str().unwrap()))
                .unwrap()
                .to_rgb8();
            diff_stats(ours, theirs.as_raw())
        })
        .collect()
}

/// Every reference case of the loader's part, against diffusers' images of the same files.
#[test]
fn every_single_file_case_matches_diffusers() {
    let mine = [
        "single_file_f32",
        "single_file_fp16",
        "ckpt_default_non_ema",
        "ckpt_extract_ema",
        "controlnet_pth",
        "vae_override_single_file",
        "vae_override_folder",
    ];
    let mut report = Vec::new();
    for name in mine {
        let case = case(name);
        for (i, (mean, p999)) in run_case(&case, &config_for(&case)).into_iter().enumerate() {
            report.push(format!("{name}[{i}]: mean {mean:.4}, p99.9 {p999}"));
            assert!(
                mean <= 0.25 && p999 <= 4.0,
                "{name}[{i}]: mean {mean}, p99.9 {p999}"
            );
        }
    }
    eprintln!("{}", report.join("\n"));
}

/// The ControlNet's config derived from the UNet's (no `controlnet_config`), the model's tokenizer compiled into
/// sketchx (a config folder without `tokenizer/`) and the original `.yaml` instead of a config folder: each gives
/// the same images.
#[test]
fn derived_controlnet_config_built_in_tokenizer_and_yaml_give_the_same_images() {
    let case = case("single_file_f32");
    // ControlNet config derived from the UNet's.
    let mut cfg = config_for(&case);
    cfg.controlnet_config = None;
    let stats = run_case(&case, &cfg);
    assert!(
        stats.iter().all(|&(m, p)| m <= 0.25 && p <= 4.0),
        "derived ControlNet config: {stats:?}"
    );
    // A config folder with no tokenizer: the built-in SD1.5 tokenizer.
    let dir = scratch_dir("no-tokenizer");
    copy_dir(&fixtures().join("tiny-sd"), &dir);
    std::fs::remove_dir_all(dir.join("tokenizer")).unwrap();
    let mut cfg = config_for(&case);
    cfg.single_file.config = Some(ModelSource::Local(dir.clone()));
    let stats = run_case(&case, &cfg);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        stats.iter().all(|&(m, p)| m <= 0.25 && p <= 4.0),
        "built-in tokenizer: {stats:?}"
    );
    // The original yaml (tiny-sd.yaml) instead of the folder.
    let mut cfg = config_for(&case);
    cfg.single_file.config = None;
    cfg.single_file.original_config = Some(formats().join("single_file/tiny-sd.yaml"));
    let stats = run_case(&case, &cfg);
    assert!(
        stats.iter().all(|&(m, p)| m <= 0.25 && p <= 4.0),
        "yaml: {stats:?}"
    );
}

/// Every tensor a key map hands a network equals the diffusers-layout tensor of the same name, bit for bit (f16
/// files: the f32 tensor rounded to f16), and the maps cover exactly the diffusers files' tensors.
#[test]
fn mapped_tensors_equal_the_diffusers_layout_tensors() {
    let tiny = fixtures().join("tiny-sd");
    let config = SingleFileOptions {
        config: Some(ModelSource::Local(tiny.clone())),
        ..Default::default()
    };
    for (file, rounded, ema) in [
        ("tiny-sd.safetensors", false, false),
        ("tiny-sd.fp16.safetensors", true, false),
        ("tiny-sd-ema.ckpt", true, false),
    ] {
        let mut opts = config.clone();
        opts.extract_ema = ema;
        let m =
            single_file::open_checkpoint(&formats().join("single_file").join(file), &opts, true)
                .unwrap();
        let parts = [
            (
                &m.unet.1,
                tiny.join("unet/diffusion_pytorch_model.safetensors"),
            ),
            (
                m.vae.as_ref().unwrap(),
                tiny.join("vae/diffusion_pytorch_model.safetensors"),
            ),
            (
                &m.text_encoder.2,
                tiny.join("text_encoder/model.safetensors"),
            ),
        ];
        for (source, reference) in parts {
            assert_same_tensors(source, &reference, rounded, file);
        }
    }
    let cn = fixtures().join("tiny-controlnet/diffusion_pytorch_model.safetensors");
    let unet_config = ConfigFile::read(&fixtures().join("tiny-sd/unet/config.json")).unwrap();
    for file in ["tiny-controlnet.safetensors", "tiny-controlnet.pth"] {
        let (_, source) = single_file::open_controlnet(
            &formats().join("single_file").join(file),
            None,
            &unet_config,
        )
        .unwrap();
        assert_same_tensors(&source, &cn, false, file);
    }
    let vae_config = ConfigFile::read(&formats().join("tiny-vae-alt/config.json")).unwrap();
    let source = single_file::open_vae(
        &formats().join("single_file/tiny-vae-alt.safetensors"),
        &vae_config,
    )
    .unwrap();
    assert_same_tensors(
        &source,
        &formats().join("tiny-vae-alt/diffusion_pytorch_model.safetensors"),
        false,
        "tiny-vae-alt.safetensors",
    );
}

fn assert_same_tensors(source: &WeightsSource, reference: &Path, rounded: bool, what: &str) {
    let WeightsSource::Mapped(m) = source else {
        panic!("{what}: not a mapped source")
    };
    let reference = SafetensorsFile::open(reference).unwrap();
    // transformers writes the text encoder with or without `text_model.`; the maps always add it.
    let ours_name = |n: &str| {
        if m.names()[0].starts_with("text_model.") && !n.starts_with("text_model.") {
            format!("text_model.{n}")
        } else {
            n.to_string()
        }
    };
    let mut theirs = reference.names();
    theirs.retain(|n| !n.ends_with("position_ids"));
    let mut expected_names: Vec<String> = theirs.iter().map(|n| ours_name(n)).collect();
    expected_names.sort();
    assert_eq!(m.names(), expected_names, "{what}: the mapped names differ");
    for name in &theirs {
        let ours = m.load(&ours_name(name), DType::F32, &Device::Cpu).unwrap();
        let mut expected = reference.load(name, DType::F32, &Device::Cpu).unwrap();
        if rounded {
            expected = expected
                .to_dtype(DType::F16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
        }
        assert_eq!(ours.dims(), expected.dims(), "{what}: {name}");
        let bits = |t: candle_core::Tensor| -> Vec<u32> {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(f32::to_bits)
                .collect()
        };
        assert!(bits(ours) == bits(expected), "{what}: {name} differs");
    }
}

/// The EMA copy is other weights (the references differ by mean 13.6), taken only with `extract_ema`.
#[test]
fn extract_ema_takes_the_ema_copy() {
    let path = formats().join("single_file/tiny-sd-ema.ckpt");
    let opts = SingleFileOptions {
        config: Some(ModelSource::Local(fixtures().join("tiny-sd"))),
        extract_ema: true,
        ..Default::default()
    };
    let m = single_file::open_checkpoint(&path, &opts, true).unwrap();
    let WeightsSource::Mapped(unet) = &m.unet.1 else {
        panic!()
    };
    assert_eq!(
        unet.file_key("conv_in.weight"),
        Some("model_ema.diffusion_modelinput_blocks00weight")
    );
    // A file without EMA weights refuses extract_ema by name.
    let err = single_file::open_checkpoint(
        &formats().join("single_file/tiny-sd.safetensors"),
        &opts,
        true,
    )
    .err()
    .unwrap();
    assert!(
        matches!(err, Error::Checkpoint { ref key, .. } if key == "model_ema.*"),
        "{err}"
    );
}

/// tiny-sd.yaml gives tiny-sd's diffusers configs, field for field (those diffusers' own yaml conversion was
/// checked on, see the manifest), and its text encoder and scheduler configs.
#[test]
fn the_yaml_builds_the_folder_configs() {
    let c = sketchx::models::ldm_yaml::read(&formats().join("single_file/tiny-sd.yaml")).unwrap();
    let folder = |rel: &str| -> Value {
        serde_json::from_str(
            &std::fs::read_to_string(fixtures().join("tiny-sd").join(rel)).unwrap(),
        )
        .unwrap()
    };
    let unet = folder("unet/config.json");
    for key in [
        "in_channels",
        "out_channels",
        "down_block_types",
        "up_block_types",
        "block_out_channels",
        "layers_per_block",
        "cross_attention_dim",
        "attention_head_dim",
        "norm_num_groups",
        "use_linear_projection",
        "transformer_layers_per_block",
    ] {
        assert_eq!(c.unet[key], unet[key], "unet {key}");
    }
    let vae = folder("vae/config.json");
    for key in [
        "in_channels",
        "out_channels",
        "down_block_types",
        "up_block_types",
        "block_out_channels",
        "layers_per_block",
        "latent_channels",
        "norm_num_groups",
        "scaling_factor",
    ] {
        assert_eq!(c.vae[key], vae[key], "vae {key}");
    }
    let te = folder("text_encoder/config.json");
    for key in [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "hidden_act",
    ] {
        assert_eq!(c.text_encoder[key], te[key], "text encoder {key}");
    }
    let sched = folder("scheduler/scheduler_config.json");
    for key in [
        "beta_start",
        "beta_end",
        "beta_schedule",
        "num_train_timesteps",
    ] {
        assert_eq!(
            c.scheduler[key].as_f64().map(|x| x as f32),
            sched[key].as_f64().map(|x| x as f32),
            "{key}"
        );
    }
    assert_eq!(c.scheduler["prediction_type"], "epsilon");
}

/// The derived ControlNet config is tiny-controlnet's (the fields the network reads).
#[test]
fn controlnet_config_derived_from_the_unet_is_the_folders() {
    let unet = ConfigFile::read(&fixtures().join("tiny-sd/unet/config.json")).unwrap();
    let file =
        single_file::TensorFile::open(&formats().join("single_file/tiny-controlnet.pth")).unwrap();
    let derived = single_file::controlnet_config_from_unet(&file, "", &unet).unwrap();
    let folder = ConfigFile::read(&fixtures().join("tiny-controlnet/config.json")).unwrap();
    for key in [
        "in_channels",
        "block_out_channels",
        "down_block_types",
        "layers_per_block",
        "cross_attention_dim",
        "attention_head_dim",
        "norm_num_groups",
        "conditioning_channels",
        "conditioning_embedding_out_channels",
        "use_linear_projection",
        "transformer_layers_per_block",
    ] {
        assert_eq!(derived.present(key), folder.present(key), "{key}");
    }
}

/// LoRAs fuse into a single-file model's UNet and text encoder exactly as into the folder's: the same pixels.
#[test]
fn a_lora_fuses_into_a_single_file_model_as_into_its_folder() {
    let case = case("single_file_f32");
    let lora =
        sketchx::models::lora::LoraSpec::file(fixtures().join("lora/kohya.safetensors"), 0.8);
    let sketch = Sketch::open(
        &fixtures()
            .join("sketches")
            .join(case["sketch"].as_str().unwrap()),
    )
    .unwrap();
    let image = |cfg: &mut EngineConfig| {
        cfg.loras = vec![lora.clone()];
        let engine = Engine::load(cfg).unwrap();
        engine
            .generate(&request_for(&case), &sketch, &mut |_| true)
            .unwrap()
            .images
    };
    let from_file = image(&mut config_for(&case));
    let mut folders = EngineConfig::new(
        fixtures().join("tiny-sd").to_str().unwrap(),
        fixtures().join("tiny-controlnet").to_str().unwrap(),
    )
    .unwrap();
    let from_folder = image(&mut folders);
    assert_eq!(from_file, from_folder);
    let mut plain = config_for(&case);
    plain.loras.clear();
    let engine = Engine::load(&plain).unwrap();
    let without = engine
        .generate(&request_for(&case), &sketch, &mut |_| true)
        .unwrap()
        .images;
    assert_ne!(without, from_file, "the LoRA changed nothing");
}

/// The file of `formats/bad/` with the manifest's explanation.
fn bad(name: &str) -> PathBuf {
    formats().join("bad").join(name)
}

/// Loads the engine with `model` (a file) and the given ControlNet, tiny-sd's configs.
fn load_model(model: &Path, controlnet: &Path) -> Error {
    let mut cfg = EngineConfig::new(model.to_str().unwrap(), controlnet.to_str().unwrap()).unwrap();
    cfg.single_file.config = Some(ModelSource::Local(fixtures().join("tiny-sd")));
    match Engine::load(&cfg) {
        Ok(_) => panic!("{} loaded", model.display()),
        Err(e) => e,
    }
}

fn assert_checkpoint_error(e: Error, file: &str, key: &str, words: &str) {
    match e {
        Error::Checkpoint {
            path,
            key: k,
            message,
        } => {
            assert!(path.ends_with(file), "{path} is not {file}");
            assert_eq!(k, key, "{file}: {message}");
            assert!(message.contains(words), "{file}: {message}");
        }
        other => panic!("{file}: expected Error::Checkpoint, got {other:?}"),
    }
}

#[test]
fn other_families_and_payloads_are_refused_by_file_and_key() {
    let cn = fixtures().join("tiny-controlnet");
    assert_checkpoint_error(
        load_model(&bad("sd2.safetensors"), &cn),
        "sd2.safetensors",
        "cond_stage_model.model.ln_final.weight",
        "SD2",
    );
    assert_checkpoint_error(
        load_model(&bad("sdxl.safetensors"), &cn),
        "sdxl.safetensors",
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
        "SDXL",
    );
    let e = load_model(&bad("lora.safetensors"), &cn);
    let Error::Checkpoint {
        ref key,
        ref message,
        ..
    } = e
    else {
        panic!("{e:?}")
    };
    assert!(key.starts_with("lora_"), "{key}");
    assert!(message.contains("LoRA"), "{message}");
    assert_checkpoint_error(
        load_model(&bad("inpainting_9ch.safetensors"), &cn),
        "inpainting_9ch.safetensors",
        "model.diffusion_model.input_blocks.0.0.weight",
        "inpainting",
    );
    for file in ["pickle_os_system.ckpt", "pickle_os_system_raw.ckpt"] {
        assert_checkpoint_error(
            load_model(&bad(file), &cn),
            file,
            "state_dict/model.diffusion_model.input_blocks.0.0.weight",
            "os.system",
        );
    }
    // A ControlNet given as the model, and a model given as the ControlNet.
    let tiny_cn = formats().join("single_file/tiny-controlnet.safetensors");
    let e = load_model(&tiny_cn, &cn);
    assert!(
        matches!(e, Error::Checkpoint { ref message, .. } if message.contains("a ControlNet, not a model")),
        "{e}"
    );
    let e = load_model(
        &formats().join("single_file/tiny-sd.safetensors"),
        &formats().join("single_file/tiny-sd.safetensors"),
    );
    assert!(
        matches!(e, Error::Checkpoint { ref message, .. } if message.contains("not a ControlNet")),
        "{e}"
    );
    // A VAE given as the model.
    let e = load_model(&formats().join("single_file/tiny-vae-alt.safetensors"), &cn);
    assert!(
        matches!(e, Error::Checkpoint { ref message, .. } if message.contains("a VAE, not a model")),
        "{e}"
    );
}

/// Damaged safetensors headers: a typed error naming the file (and the tensor where the header names one).
#[test]
fn damaged_safetensors_are_malformed_files() {
    let cn = fixtures().join("tiny-controlnet");
    for (file, words) in [
        ("truncated_header.safetensors", "header length"),
        ("header_len_past_end.safetensors", "header length"),
        ("truncated_data.safetensors", "truncated or a lying header"),
        ("header_offsets_past_end.safetensors", "b.weight"),
        ("header_overlap.safetensors", "b.weight"),
        ("header_shape_mismatch.safetensors", "b.weight"),
    ] {
        match load_model(&bad(file), &cn) {
            Error::MalformedFile { path, message } => {
                assert!(path.ends_with(file), "{path}");
                assert!(message.contains(words), "{file}: {message}");
            }
            other => panic!("{file}: {other:?}"),
        }
    }
}

/// A ControlNet whose sizes do not fit the UNet: named by its first key that does not fit, whether its config
/// is derived from the UNet or given (tiny-controlnet's, built for tiny-sd).
#[test]
fn a_controlnet_that_does_not_fit_the_unet_is_refused_by_key() {
    let model = formats().join("single_file/tiny-sd.safetensors");
    let file = bad("controlnet_mismatch.safetensors");
    for given in [None, Some(fixtures().join("tiny-controlnet"))] {
        let mut cfg = EngineConfig::new(model.to_str().unwrap(), file.to_str().unwrap()).unwrap();
        cfg.single_file.config = Some(ModelSource::Local(fixtures().join("tiny-sd")));
        cfg.controlnet_config = given.map(ModelSource::Local);
        let e = Engine::load(&cfg)
            .err()
            .expect("the mismatched ControlNet loaded");
        assert_checkpoint_error(
            e,
            "controlnet_mismatch.safetensors",
            "input_blocks.0.0.weight",
            "does not fit",
        );
    }
    // Its own (matching) config makes it load as a network that then does not fit the UNet: refused by config.
    let mut cfg = EngineConfig::new(model.to_str().unwrap(), file.to_str().unwrap()).unwrap();
    cfg.single_file.config = Some(ModelSource::Local(fixtures().join("tiny-sd")));
    cfg.controlnet_config = Some(ModelSource::Local(fixtures().join("tiny-controlnet-alt")));
    match Engine::load(&cfg) {
        Err(Error::UnsupportedModel { path, message }) => {
            assert!(path.contains("tiny-controlnet-alt"), "{path}");
            assert!(message.contains("residual"), "{message}");
        }
        other => panic!("{:?}", other.err()),
    }
}

/// SD1.5's built-in configs on the tiny file: refused at the first tensor whose shape does not fit, by key.
#[test]
fn built_in_configs_refuse_a_differently_sized_file_by_key() {
    let model = formats().join("single_file/tiny-sd.safetensors");
    let cfg = EngineConfig::new(
        model.to_str().unwrap(),
        fixtures().join("tiny-controlnet").to_str().unwrap(),
    )
    .unwrap();
    match Engine::load(&cfg) {
        Err(Error::Checkpoint { path, key, message }) => {
            assert!(path.ends_with("tiny-sd.safetensors"));
            assert!(
                key.starts_with("model.diffusion_model.")
                    || key.starts_with("cond_stage_model.")
                    || key.starts_with("first_stage_model."),
                "{key}"
            );
            assert!(message.contains("built-in SD1.5"), "{message}");
        }
        other => panic!("{:?}", other.err()),
    }
}
