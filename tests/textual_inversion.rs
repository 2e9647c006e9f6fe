//! Textual inversion and clip skip against diffusers on the tiny fixture models (`formats/` fixtures, written by
//! `tools/fixturegen/formats.py`):
//! - the tokenizer and text encoder with and without embeddings (`reference/text_encoder.{safetensors,json}`: the
//!   converted prompts, token ids, last hidden state and clip-skip-1 state);
//! - whole generations (`reference/cases.json`: `ti_*` and `clip_skip_*` cases), bound per image: mean |diff| <=
//!   0.25 and 99.9th percentile <= 4 (0..255 units);
//! - sensitivity: each embedding and clip skip change the image as much as they changed diffusers' (the cases'
//!   `compare` entries);
//! - bad input: typed errors naming the file, key, token or field.

mod common;
use common::*;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use sketchx::engine::{Engine, EngineConfig, Generated};
use sketchx::models::clip::{ClipTextConfig, ClipTextModel};
use sketchx::models::loader::{read_json, weights, ModelSource, Resolver};
use sketchx::models::textual_inversion::{add_embeddings, Embedding, EmbeddingSpec};
use sketchx::models::tokenizer::ClipTokenizer;
use sketchx::precision::Precision;
use sketchx::request::GenerationRequest;
use sketchx::sketch::Sketch;
use sketchx::Error;

/// The names of the cases of `formats/reference/cases.json` this file checks.
const CASES: [&str; 6] = [
    "ti_a1111_pt_prompt",
    "ti_a1111_safetensors_negative",
    "ti_diffusers_prompt",
    "ti_all_three",
    "clip_skip_1",
    "clip_skip_1_ti_euler",
];

fn formats() -> PathBuf {
    fixtures().join("formats")
}

/// `(mean |diff|, 99.9th percentile |diff|)` between two RGB8 images.
fn diff_stats(a: &[u8], b: &[u8]) -> (f64, f64) {
    assert_eq!(a.len(), b.len(), "image sizes differ");
    let mut d: Vec<u8> = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).collect();
    let mean = d.iter().map(|&x| x as f64).sum::<f64>() / d.len() as f64;
    d.sort_unstable();
    let idx = ((d.len() as f64) * 0.999).ceil() as usize - 1;
    (mean, d[idx.min(d.len() - 1)] as f64)
}

// ---------------------------------------------------------------------------------------------------------------
// Tokenizer and text encoder

/// The tiny model's tokenizer and text encoder (f32, CPU), and the encoder config's origin.
fn text_model() -> (ClipTokenizer, ClipTextModel, String) {
    let sd = Resolver::new(ModelSource::Local(fixtures().join("tiny-sd"))).unwrap();
    let tokenizer = ClipTokenizer::from_dir(&fixtures().join("tiny-sd/tokenizer")).unwrap();
    let config_path = sd.get("text_encoder/config.json").unwrap();
    let config: ClipTextConfig = read_json(&config_path).unwrap();
    let w = sd.weights("text_encoder", None).unwrap();
    let origin = config_path.display().to_string();
    let model = ClipTextModel::load(
        weights(&w, Precision::F32, &Device::Cpu).unwrap(),
        &config,
        &origin,
    )
    .unwrap();
    (tokenizer, model, origin)
}

/// The embeddings of a manifest entry's `textual_inversion` list, each bound to its token.
fn specs(list: &Value) -> Vec<EmbeddingSpec> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            EmbeddingSpec::file(
                fixtures().join(e["file"].as_str().unwrap()),
                Some(e["token"].as_str().unwrap()),
            )
        })
        .collect()
}

/// Largest |difference| between two tensors, and the largest |reference| value.
fn max_diff(ours: &Tensor, theirs: &Tensor) -> (f32, f32) {
    assert_eq!(ours.dims(), theirs.dims(), "shape mismatch");
    let flat = |t: &Tensor| {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let (a, b) = (flat(ours), flat(theirs));
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    (d, b.iter().map(|y| y.abs()).fold(0f32, f32::max))
}

#[test]
fn tokenizer_and_text_encoder_match_transformers_with_and_without_embeddings() {
    let refs = candle_core::safetensors::load(
        formats().join("reference/text_encoder.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(formats().join("reference/text_encoder.json")).unwrap(),
    )
    .unwrap();
    for entry in manifest["entries"].as_array().unwrap() {
        let name = entry["name"].as_str().unwrap();
        let (mut tokenizer, mut model, origin) = text_model();
        let hidden = model.config().hidden_size;
        let added = add_embeddings(&specs(&entry["textual_inversion"]), &mut tokenizer, hidden)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        if let Some(a) = &added {
            model
                .append_token_embeddings(a.first_id as usize, &a.vectors, &origin)
                .unwrap();
        }
        for (token, id) in entry["added_token_ids"].as_object().unwrap() {
            assert_eq!(
                tokenizer.encode(token),
                [id.as_u64().unwrap() as u32],
                "{name}: id of {token}"
            );
        }

        let prompt = entry["prompt"].as_str().unwrap();
        let converted = tokenizer.expand_multi_vector_tokens(prompt);
        assert_eq!(
            converted,
            entry["converted_prompt"].as_str().unwrap(),
            "{name}"
        );
        let ids = tokenizer.encode_padded(&converted);
        let want: Vec<u32> = refs[&format!("{name}.input_ids")]
            .flatten_all()
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|i| i as u32)
            .collect();
        assert_eq!(ids, want, "{name}: token ids");

        let ids = Tensor::from_vec(ids, (1, want.len()), &Device::Cpu).unwrap();
        for (key, clip_skip) in [("hidden", 0), ("clip_skip_1", 1)] {
            let ours = model.forward_clip_skip(&ids, clip_skip).unwrap();
            let (d, m) = max_diff(&ours, &refs[&format!("{name}.{key}")]);
            eprintln!("{name}.{key}: max |diff| {d:.2e} (max |ref| {m:.2e})");
            assert!(d <= 1e-5 * m.max(1.0), "{name}.{key}: max |diff| {d}");
        }
    }
}

#[test]
fn files_bind_their_own_token_when_none_is_given() {
    for (file, token, vectors) in [
        ("tiny-style.pt", "tiny-style", 2),
        ("learned_embeds.safetensors", "<tiny-cat>", 1),
    ] {
        let e = Embedding::read(&EmbeddingSpec::file(ti(file), None)).unwrap();
        assert_eq!((e.token.as_str(), e.len(), e.width()), (token, vectors, 32));
        assert_eq!(
            e.tokens(),
            (0..vectors)
                .map(|i| match i {
                    0 => token.to_string(),
                    i => format!("{token}_{i}"),
                })
                .collect::<Vec<_>>()
        );
    }
    // A given token wins.
    let e = Embedding::read(&EmbeddingSpec::file(ti("tiny-style.pt"), Some("<s>"))).unwrap();
    assert_eq!(e.token, "<s>");
}

#[test]
fn embeddings_take_ids_from_the_vocabulary_size_on_in_load_order() {
    let (mut tokenizer, model, _) = text_model();
    let first = tokenizer.next_added_id();
    assert_eq!(first as usize, tokenizer.vocab_size());
    let list = serde_json::json!([
        {"file": "formats/textual_inversion/tiny-neg.safetensors", "token": "tinyneg"},
        {"file": "formats/textual_inversion/learned_embeds.safetensors", "token": "<tiny-cat>"},
    ]);
    let added = add_embeddings(&specs(&list), &mut tokenizer, model.config().hidden_size)
        .unwrap()
        .unwrap();
    assert_eq!(added.first_id, first);
    assert_eq!(added.vectors.dims(), [4, 32]);
    assert_eq!(
        added.tokens,
        [
            ("tinyneg".to_string(), vec![first, first + 1, first + 2]),
            ("<tiny-cat>".to_string(), vec![first + 3]),
        ]
    );
    assert_eq!(tokenizer.next_added_id(), first + 4);
    // Tokens are matched in the normalized (lowercased) text, in any case and inside words, as transformers
    // matches added tokens; only the exact spelling expands (diffusers' `str.replace`).
    assert_eq!(tokenizer.encode("TinyNeg"), [first]);
    assert_eq!(tokenizer.expand_multi_vector_tokens("TinyNeg"), "TinyNeg");
    assert_eq!(
        tokenizer.expand_multi_vector_tokens("tinynegs, tinyneg"),
        "tinyneg tinyneg_1 tinyneg_2s, tinyneg tinyneg_1 tinyneg_2"
    );
    assert!(matches!(
        tokenizer.expand_multi_vector_tokens("no token here"),
        std::borrow::Cow::Borrowed(_)
    ));
}

#[test]
fn clip_skip_runs_fewer_layers_up_to_the_embeddings() {
    let (tokenizer, model, _) = text_model();
    let ids = tokenizer.encode_padded("a cozy house");
    let ids = Tensor::from_vec(ids, (1, 77), &Device::Cpu).unwrap();
    let layers = model.config().num_hidden_layers;
    let outs: Vec<Tensor> = (0..=layers)
        .map(|skip| model.forward_clip_skip(&ids, skip).unwrap())
        .collect();
    let (d, _) = max_diff(&outs[0], &model.forward(&ids).unwrap());
    assert_eq!(d, 0.0, "clip skip 0 is the last hidden state");
    for (a, b) in outs.iter().zip(&outs[1..]) {
        assert!(
            max_diff(a, b).0 > 1e-3,
            "each skipped layer changes the state"
        );
    }
    assert!(matches!(
        model.forward_clip_skip(&ids, layers + 1),
        Err(Error::InvalidRequest {
            field: "clip_skip",
            ..
        })
    ));
}

// ---------------------------------------------------------------------------------------------------------------
// Generations

/// The engine for the tiny models with `embeddings` (each a file and a token), loaded once per list.
fn engine_with(embeddings: &[(PathBuf, Option<String>)]) -> &'static Engine {
    type Key = Vec<(PathBuf, Option<String>)>;
    static ENGINES: OnceLock<Mutex<HashMap<Key, &'static Engine>>> = OnceLock::new();
    let mut map = ENGINES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    map.entry(embeddings.to_vec()).or_insert_with(|| {
        let (model, controlnet) = tiny_models();
        let mut cfg = EngineConfig::new(&model, &controlnet).unwrap();
        cfg.embeddings = embeddings
            .iter()
            .map(|(p, t)| EmbeddingSpec::file(p, t.as_deref()))
            .collect();
        Box::leak(Box::new(Engine::load(&cfg).expect("fixture models load")))
    })
}

/// A case's embeddings as (file, token) pairs.
fn case_embeddings(case: &Value) -> Vec<(PathBuf, Option<String>)> {
    case["textual_inversion"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                fixtures().join(e["file"].as_str().unwrap()),
                Some(e["token"].as_str().unwrap().to_string()),
            )
        })
        .collect()
}

fn case(name: &str) -> Value {
    let text = std::fs::read_to_string(formats().join("reference/cases.json")).unwrap();
    let cases: Vec<Value> = serde_json::from_str(&text).unwrap();
    cases
        .into_iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("case {name} in formats/reference/cases.json"))
}

fn request_for(case: &Value) -> GenerationRequest {
    GenerationRequest {
        preprocess: case["preprocess"].as_str().unwrap().parse().unwrap(),
        clip_skip: case["clip_skip"].as_u64().unwrap_or(0) as u32,
        ..case_request(case)
    }
}

fn generate(engine: &Engine, case: &Value) -> Generated {
    let sketch = Sketch::open(
        &fixtures()
            .join("sketches")
            .join(case["sketch"].as_str().unwrap()),
    )
    .unwrap();
    engine
        .generate(&request_for(case), &sketch, &mut |_| true)
        .unwrap()
}

/// A reference image (a path under `formats/reference`, or one from `tests/fixtures`) as RGB8.
fn reference(file: &str) -> Vec<u8> {
    let path = if file.contains('/') {
        fixtures().join(file)
    } else {
        formats().join("reference").join(file)
    };
    image::open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
        .into_raw()
}

#[test]
fn every_case_matches_diffusers() {
    let mut report = Vec::new();
    for name in CASES {
        let case = case(name);
        let out = generate(engine_with(&case_embeddings(&case)), &case);
        let refs = case["images"].as_array().unwrap();
        assert_eq!(out.images.len(), refs.len(), "{name}: image count");
        for (i, (ours, file)) in out.images.iter().zip(refs).enumerate() {
            let (mean, p999) = diff_stats(ours, &reference(file.as_str().unwrap()));
            report.push(format!("{name}[{i}]: mean {mean:.4}, p99.9 {p999}"));
            assert!(
                mean <= 0.25 && p999 <= 4.0,
                "{name}[{i}]: mean {mean}, p99.9 {p999}"
            );
        }
    }
    eprintln!("{}", report.join("\n"));
}

/// Writes `{token: -vectors}` for every embedding of `embeddings` into `dir` (diffusers' "TI vectors negated"
/// comparisons) and returns the new list.
fn negated(embeddings: &[(PathBuf, Option<String>)], dir: &Path) -> Vec<(PathBuf, Option<String>)> {
    std::fs::create_dir_all(dir).unwrap();
    embeddings
        .iter()
        .enumerate()
        .map(|(i, (path, token))| {
            let e = Embedding::read(&EmbeddingSpec::file(path, token.as_deref())).unwrap();
            let token = token.clone().unwrap();
            let out = dir.join(format!("negated_{i}.safetensors"));
            let neg = e.vectors.neg().unwrap();
            candle_core::safetensors::save(&HashMap::from([(token.clone(), neg)]), &out).unwrap();
            (out, Some(token))
        })
        .collect()
}

#[test]
fn embeddings_and_clip_skip_change_the_image_as_they_changed_diffusers() {
    let dir = scratch_dir("ti-negated");
    let mut report = Vec::new();
    for name in CASES {
        let case = case(name);
        for compare in case["compare"].as_array().unwrap() {
            let with = compare["with"].as_str().unwrap();
            let theirs = compare["mean_abs_diff"].as_f64().unwrap();
            let (ours, reference_image) = if with.contains("negated") {
                let embeddings = negated(&case_embeddings(&case), &dir.join(name));
                let out = generate(engine_with(&embeddings), &case);
                (out, reference(case["images"][0].as_str().unwrap()))
            } else {
                let out = generate(engine_with(&case_embeddings(&case)), &case);
                (out, reference(with))
            };
            let (mean, p999) = diff_stats(&ours.images[0], &reference_image);
            report.push(format!(
                "{name} vs {with}: mean {mean:.3}, p99.9 {p999} (diffusers: mean {theirs}, p99.9 {})",
                compare["p999"]
            ));
            // Both images are within the parity bound of diffusers' own, so the difference is diffusers'.
            assert!(
                mean > 1.0,
                "{name}: {} barely changed the image",
                compare["what"]
            );
            assert!(
                (mean - theirs).abs() <= 0.5,
                "{name} vs {with}: mean {mean}, diffusers' {theirs}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("{}", report.join("\n"));
}

#[test]
fn each_of_several_embeddings_changes_the_image() {
    let case = case("ti_all_three");
    let all = case_embeddings(&case);
    let reference_image = reference(case["images"][0].as_str().unwrap());
    for left_out in 0..all.len() {
        let mut some = all.clone();
        let (file, _) = some.remove(left_out);
        let out = generate(engine_with(&some), &case);
        let (mean, _) = diff_stats(&out.images[0], &reference_image);
        eprintln!("ti_all_three without {}: mean {mean:.3}", file.display());
        assert!(
            mean > 1.0,
            "leaving out {} barely changed the image (mean {mean})",
            file.display()
        );
    }
}

#[test]
fn the_prompt_cache_keeps_clip_skips_apart_and_the_negative_prompt_uses_the_last_layer() {
    let engine = engine_with(&[]);
    let text = "a cozy house, watercolor";
    let last = engine.encode_prompt(text).unwrap();
    let skip = engine.encode_prompt_clip_skip(text, 1).unwrap();
    assert!(max_diff(&last, &skip).0 > 1e-3);
    assert_eq!(max_diff(&engine.encode_prompt(text).unwrap(), &last).0, 0.0);
    assert_eq!(
        max_diff(&engine.encode_prompt_clip_skip(text, 1).unwrap(), &skip).0,
        0.0
    );

    // clip skip beyond the encoder's layers is refused when the request is checked against the model.
    let sketch = Sketch::open(&fixtures().join("sketches/house_black_on_white.png")).unwrap();
    let layers = engine.text_encoder().config().num_hidden_layers as u32;
    let req = |clip_skip| GenerationRequest {
        clip_skip,
        width: Some(64),
        height: Some(64),
        ..Default::default()
    };
    engine.output_size(&req(layers), &sketch).unwrap();
    assert!(matches!(
        engine.output_size(&req(layers + 1), &sketch),
        Err(Error::InvalidRequest {
            field: "clip_skip",
            ..
        })
    ));
    assert!(matches!(
        req(13).validate(),
        Err(Error::InvalidRequest {
            field: "clip_skip",
            ..
        })
    ));
}

// ---------------------------------------------------------------------------------------------------------------
// Bad input

/// Loads `specs` into a fresh copy of the tiny tokenizer (width 32) and returns the error.
fn add_error(specs: &[EmbeddingSpec]) -> Error {
    let (mut tokenizer, model, _) = text_model();
    add_embeddings(specs, &mut tokenizer, model.config().hidden_size).unwrap_err()
}

/// The parts of an [`Error::Embedding`].
fn embedding_error(e: Error) -> (String, String, String) {
    match e {
        Error::Embedding { path, key, message } => (path, key, message),
        other => panic!("expected Error::Embedding, got {other:?}"),
    }
}

fn ti(file: &str) -> PathBuf {
    formats().join("textual_inversion").join(file)
}

/// Writes `tensors` as a safetensors file `name` in `dir`.
fn write_safetensors(dir: &Path, name: &str, tensors: &[(&str, Tensor)]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(name);
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| (k.to_string(), t.clone()))
        .collect();
    candle_core::safetensors::save(&map, &path).unwrap();
    path
}

#[test]
fn a_width_other_than_the_text_encoders_names_the_file_and_both_widths() {
    let dir = scratch_dir("ti-width");
    let wide = Tensor::zeros((2, 16), DType::F32, &Device::Cpu).unwrap();
    let path = write_safetensors(&dir, "narrow.safetensors", &[("<narrow>", wide)]);
    let (p, key, message) = embedding_error(add_error(&[EmbeddingSpec::file(&path, None)]));
    assert_eq!(p, path.display().to_string());
    assert_eq!(key, "<narrow>");
    assert!(
        message.contains("16") && message.contains("32"),
        "{message}"
    );
    // The same through the engine: nothing loads.
    let (model, controlnet) = tiny_models();
    let mut cfg = EngineConfig::new(&model, &controlnet).unwrap();
    cfg.embeddings = vec![EmbeddingSpec::file(&path, None)];
    let e = Engine::load(&cfg)
        .err()
        .expect("a wrong width fails the load");
    assert!(e.to_string().contains("narrow.safetensors"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn files_in_no_embedding_layout_are_refused_by_name() {
    let dir = scratch_dir("ti-layout");
    std::fs::create_dir_all(&dir).unwrap();
    // Not safetensors, not a pickle.
    let text = dir.join("notes.pt");
    std::fs::write(&text, "just some text, not an embedding").unwrap();
    let (p, _, message) = embedding_error(add_error(&[EmbeddingSpec::file(&text, Some("tok"))]));
    assert_eq!(p, text.display().to_string());
    assert!(message.contains("neither"), "{message}");
    // Safetensors with two tensors (a model, a LoRA): the keys are named.
    let v = Tensor::zeros((1, 32), DType::F32, &Device::Cpu).unwrap();
    let two = write_safetensors(
        &dir,
        "two.safetensors",
        &[("a", v.clone()), ("b", v.clone())],
    );
    let (_, key, _) = embedding_error(add_error(&[EmbeddingSpec::file(&two, Some("tok"))]));
    assert!(key.contains('a') && key.contains('b'), "{key}");
    // A LoRA file from the fixtures, and a 3-d tensor.
    let lora = formats().join("bad/lora.safetensors");
    embedding_error(add_error(&[EmbeddingSpec::file(&lora, Some("tok"))]));
    let cube = Tensor::zeros((1, 2, 32), DType::F32, &Device::Cpu).unwrap();
    let cube = write_safetensors(&dir, "cube.safetensors", &[("<cube>", cube)]);
    let (_, key, message) = embedding_error(add_error(&[EmbeddingSpec::file(&cube, None)]));
    assert_eq!(key, "<cube>");
    assert!(message.contains("[1, 2, 32]"), "{message}");
    // A truncated safetensors embedding.
    let bytes = std::fs::read(ti("learned_embeds.safetensors")).unwrap();
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 8]).unwrap();
    embedding_error(add_error(&[EmbeddingSpec::file(&cut, None)]));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A bare pickle (protocol 2) of `{"string_to_param": {"*": <value>}, "name": "x"}`, `value` being pickle opcodes
/// that push one value.
fn a1111_pickle(value: &[u8]) -> Vec<u8> {
    let text = |s: &str| {
        let mut b = vec![b'X'];
        b.extend_from_slice(&(s.len() as u32).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
        b
    };
    let mut p = vec![0x80, 2, b'}', b'('];
    p.extend(text("string_to_param"));
    p.push(b'}');
    p.extend(text("*"));
    p.extend_from_slice(value);
    p.push(b's');
    p.extend(text("name"));
    p.extend(text("x"));
    p.extend_from_slice(b"u.");
    p
}

#[test]
fn torch_files_whose_embedding_is_not_a_tensor_are_refused_by_key_and_never_run() {
    let dir = scratch_dir("ti-pickle");
    std::fs::create_dir_all(&dir).unwrap();
    // os.system("echo ...") as the vectors: named, never called.
    let mut call = b"cos\nsystem\nX".to_vec();
    let arg = "echo sketchx-ti-payload-ran";
    call.extend_from_slice(&(arg.len() as u32).to_le_bytes());
    call.extend_from_slice(arg.as_bytes());
    call.extend_from_slice(&[0x85, b'R']);
    let system = dir.join("system.pt");
    std::fs::write(&system, a1111_pickle(&call)).unwrap();
    let e = add_error(&[EmbeddingSpec::file(&system, None)]);
    let text = e.to_string();
    assert!(
        text.contains("system.pt")
            && text.contains("string_to_param/*")
            && text.contains("os.system"),
        "{text}"
    );
    // A string as the vectors.
    let string = dir.join("string.pt");
    let mut value = vec![b'X', 3, 0, 0, 0];
    value.extend_from_slice(b"abc");
    std::fs::write(&string, a1111_pickle(&value)).unwrap();
    let (p, key, message) = embedding_error(add_error(&[EmbeddingSpec::file(&string, None)]));
    assert_eq!(p, string.display().to_string());
    assert_eq!(key, "string_to_param/*");
    assert!(message.contains("\"abc\""), "{message}");
    // The fixtures' os.system checkpoints: one entry, a dict, is not an embedding.
    for file in ["pickle_os_system.ckpt", "pickle_os_system_raw.ckpt"] {
        let path = formats().join("bad").join(file);
        let (p, key, _) = embedding_error(add_error(&[EmbeddingSpec::file(&path, Some("tok"))]));
        assert_eq!(
            (p, key.as_str()),
            (path.display().to_string(), "state_dict")
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_files_are_missing_files() {
    let missing = fixtures().join("formats/textual_inversion/absent.pt");
    assert!(matches!(
        EmbeddingSpec::from_location(missing.to_str().unwrap(), Some("tok")),
        Err(Error::MissingFile { .. })
    ));
    match add_error(&[EmbeddingSpec::file(&missing, Some("tok"))]) {
        Error::MissingFile { path } => assert!(path.contains("absent.pt"), "{path}"),
        other => panic!("{other:?}"),
    }
    // A directory without learned_embeds.*.
    let spec =
        EmbeddingSpec::from_location(fixtures().join("tiny-sd").to_str().unwrap(), None).unwrap();
    match add_error(&[spec]) {
        Error::MissingFile { path } => assert!(path.contains("learned_embeds"), "{path}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn tokens_already_in_the_vocabulary_are_refused_as_diffusers_refuses_them() {
    let cat = ti("learned_embeds.safetensors");
    let neg = ti("tiny-neg.safetensors");
    // A word of the vocabulary, a special token, a BPE entry.
    for token in ["cat", "<|endoftext|>", "cat</w>"] {
        let (p, key, message) =
            embedding_error(add_error(&[EmbeddingSpec::file(&cat, Some(token))]));
        assert_eq!((p.as_str(), key.as_str()), (cat.to_str().unwrap(), token));
        assert!(message.contains("vocabulary"), "{message}");
    }
    // The same token twice, and a token that an earlier embedding's expansion took.
    let (_, key, _) = embedding_error(add_error(&[
        EmbeddingSpec::file(&cat, None),
        EmbeddingSpec::file(&neg, Some("<tiny-cat>")),
    ]));
    assert_eq!(key, "<tiny-cat>");
    let (_, key, _) = embedding_error(add_error(&[
        EmbeddingSpec::file(&neg, Some("tinyneg")),
        EmbeddingSpec::file(&cat, Some("tinyneg_2")),
    ]));
    assert_eq!(key, "tinyneg_2");
    // A token whose `T_1` exists.
    let (_, key, message) = embedding_error(add_error(&[
        EmbeddingSpec::file(&neg, Some("tinyneg")),
        EmbeddingSpec::file(&cat, Some("tinyneg_1")),
    ]));
    assert_eq!(key, "tinyneg_1");
    assert!(message.contains("vocabulary"), "{message}");
    let (_, key, message) = embedding_error(add_error(&[
        EmbeddingSpec::file(&cat, Some("<q>_1")),
        EmbeddingSpec::file(&neg, Some("<q>")),
    ]));
    assert_eq!(key, "<q>");
    assert!(message.contains("\"<q>_1\""), "{message}");
    // A token whose `T_2` exists (diffusers would overwrite that token's vector).
    let (_, key, message) = embedding_error(add_error(&[
        EmbeddingSpec::file(&cat, Some("<q>_2")),
        EmbeddingSpec::file(&neg, Some("<q>")),
    ]));
    assert_eq!(key, "<q>");
    assert!(message.contains("\"<q>_2\""), "{message}");
    // An empty token.
    assert!(matches!(
        EmbeddingSpec::from_location(cat.to_str().unwrap(), Some(" ")),
        Err(Error::InvalidRequest {
            field: "embeddings.token",
            ..
        })
    ));
}

#[test]
fn an_a1111_safetensors_embedding_needs_a_token() {
    let neg = ti("tiny-neg.safetensors");
    let (p, key, message) = embedding_error(add_error(&[EmbeddingSpec::file(&neg, None)]));
    assert_eq!(
        (p.as_str(), key.as_str()),
        (neg.to_str().unwrap(), "emb_params")
    );
    assert!(message.contains("tiny-neg"), "{message}");
}

#[test]
fn path_token_arguments_split_at_the_last_colon_unless_the_path_exists() {
    let cat = ti("learned_embeds.safetensors");
    let arg = format!("{}:<my-cat>", cat.display());
    assert_eq!(
        EmbeddingSpec::split_arg(&arg),
        (cat.to_str().unwrap(), Some("<my-cat>"))
    );
    assert_eq!(
        EmbeddingSpec::split_arg(cat.to_str().unwrap()),
        (cat.to_str().unwrap(), None)
    );
    assert_eq!(EmbeddingSpec::split_arg("owner/name"), ("owner/name", None));
    assert_eq!(EmbeddingSpec::split_arg("a:b/c"), ("a:b/c", None));
    let spec = EmbeddingSpec::parse(&arg).unwrap();
    assert_eq!(spec.token.as_deref(), Some("<my-cat>"));
}
