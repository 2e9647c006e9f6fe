//! What each fuzz target checks: one function per target, taking the raw input. The cargo-fuzz targets
//! (`fuzz/fuzz_targets/`) call them, and so do the stable regression tests (`tests/fuzz_regressions.rs` includes
//! this file), so that an input committed under `tests/fixtures/fuzz/<target>/` replays exactly what the fuzzer
//! ran. A check panics only on a bug: a panic inside sketchx, an error of the wrong kind or naming the wrong
//! thing, a broken invariant, a result that differs from the reference reader, or (with the counting allocator of
//! [`crate::alloc`] installed) an allocation beyond the limit.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde_json::Value;
use sketchx::models::config::ConfigFile;
use sketchx::models::lora::{self, LoraSpec};
use sketchx::models::pickle::{Entry, TorchFile};
use sketchx::models::tokenizer::ClipTokenizer;
use sketchx::models::weights::SafetensorsFile;
use sketchx::models::{clip, controlnet, taesd, unet, vae};
use sketchx::precision::{Precision, Weights};
use sketchx::request::{
    GenerationRequest, ETA_RANGE, GUIDANCE_RANGE, MAX_PROMPT_BYTES, NUM_IMAGES_RANGE,
    SIZE_MULTIPLE, SIZE_RANGE, STEPS_RANGE, TEMPERATURE_RANGE,
};
use sketchx::sampling::rng::TorchRng;
use sketchx::sampling::schedulers::{Scheduler, SchedulerConfig, SchedulerKind};
use sketchx::sketch::{Preprocess, Sketch, SketchLimits};
use sketchx::Error;

/// Every target: its name (the cargo-fuzz target's, and the directory of its seeds in `fuzz/seeds/` and of its
/// regressions in `tests/fixtures/fuzz/`) and its check.
pub const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("sketch", sketch),
    ("safetensors", safetensors),
    ("configs", configs),
    ("scheduler_config", scheduler_config),
    ("tokenizer_files", tokenizer_files),
    ("tokenizer_text", tokenizer_text),
    ("request", request),
    ("lora", lora),
    ("pickle", pickle),
];

/// The repository root (this file is compiled by the fuzz crate in `fuzz/` and by the root package's tests).
pub fn repo() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    if manifest.join("tests/fixtures").is_dir() {
        manifest.to_path_buf()
    } else {
        manifest.parent().expect("fuzz/ has a parent").to_path_buf()
    }
}

/// A fresh directory for the files one check writes (under `TMPDIR`), removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sketchx-fuzz-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("creating a scratch directory");
        Scratch(dir)
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).expect("writing a scratch file");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Asserts that `bytes` heap bytes at once (measured by [`crate::alloc::peak_during`]) are within `bound`.
fn assert_allocated_within(peak: Option<usize>, bound: usize, what: &str) {
    if let Some(peak) = peak {
        assert!(
            peak <= bound,
            "{what}: {peak} bytes allocated at once, beyond the bound of {bound}"
        );
    }
}

/// The bytes of a tensor's values (their bit patterns, so NaNs compare too), in its own dtype.
fn tensor_bits(t: &Tensor) -> Vec<u8> {
    let t = t.flatten_all().expect("flatten");
    match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()
            .expect("f32")
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()
            .expect("f16")
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()
            .expect("bf16")
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        other => panic!("tensor_bits: {other:?} is not a dtype the checks load"),
    }
}

// -----------------------------------------------------------------------------------------------------------
// sketch: decoding (every format, the size limits) and preprocessing.
// -----------------------------------------------------------------------------------------------------------

/// The input: 4 control bytes (limits, output size and mode), then the image file's bytes. Decoding either
/// succeeds within the limits or is [`Error::InvalidSketch`]; the control image has the asked size, and the
/// scribble mode leaves only black and white.
pub fn sketch(data: &[u8]) {
    let Some((ctl, bytes)) = data.split_first_chunk::<4>() else {
        return;
    };
    let limits = SketchLimits {
        max_side: 1 + u32::from(u16::from_le_bytes([ctl[0], ctl[1]])) % 4096,
        max_pixels: (u64::from(ctl[2]) + 1) << 14,
        max_alloc: 64 << 20,
    };
    let sketch = match Sketch::decode_with_limits(bytes, &limits) {
        Ok(s) => s,
        Err(Error::InvalidSketch(_)) => return,
        Err(e) => panic!("a bad sketch must be InvalidSketch, got {e:?}"),
    };
    let (w, h) = (sketch.width(), sketch.height());
    assert!(w >= 1 && h >= 1, "{w}x{h}");
    assert!(
        w <= limits.max_side
            && h <= limits.max_side
            && u64::from(w) * u64::from(h) <= limits.max_pixels,
        "{w}x{h} decoded beyond {limits:?}"
    );
    assert_eq!(sketch.rgb().len(), w as usize * h as usize * 3);

    // The default output size: each side a multiple of 64 in 64..=1024; one side given: the other a multiple of
    // 8 in 64..=2048.
    let (tw, th) = sketch.target_size(None, None);
    for side in [tw, th] {
        assert!(
            (64..=1024).contains(&side) && side % 64 == 0,
            "{w}x{h} -> {tw}x{th}"
        );
    }
    let given = *SIZE_RANGE.start() + SIZE_MULTIPLE * u32::from(ctl[3]);
    let (given_w, derived_h) = sketch.target_size(Some(given), None);
    let (derived_w, given_h) = sketch.target_size(None, Some(given));
    assert_eq!((given_w, given_h), (given, given));
    for side in [derived_h, derived_w] {
        assert!(
            SIZE_RANGE.contains(&side) && side % SIZE_MULTIPLE == 0,
            "{w}x{h}, {given} -> {side}"
        );
    }

    // Preprocessing to a small size (the resampler is the same at every size; small keeps the fuzzer fast).
    let (ow, oh) = (1 + u32::from(ctl[3] & 0x1f), 1 + u32::from(ctl[2] & 0x1f));
    let mode = if ctl[3] & 0x80 == 0 {
        Preprocess::Scribble
    } else {
        Preprocess::None
    };
    let control = sketch.to_control(ow, oh, mode);
    assert_eq!((control.width, control.height), (ow, oh));
    assert_eq!(control.rgb.len(), ow as usize * oh as usize * 3);
    if mode == Preprocess::Scribble {
        assert!(control.rgb.iter().all(|&v| v == 0 || v == 255));
    }
    if (ow, oh) == (w, h) && mode == Preprocess::None {
        assert_eq!(
            control.rgb,
            sketch.rgb(),
            "resizing to the same size is a copy"
        );
    }
}

// -----------------------------------------------------------------------------------------------------------
// safetensors: the header and the pread reader, against the safetensors crate and candle.
// -----------------------------------------------------------------------------------------------------------

/// What reading a file of `len` bytes may allocate at once: a bounded multiple of its size (the JSON header
/// parsed into shapes and names; a tensor read and converted to a wider dtype, up to 5x for 8-bit data read as
/// f32 through candle), plus fixed scratch space (the conversion buffers of a few threads).
pub fn read_bound(len: usize) -> usize {
    8 * len + (8 << 20)
}

/// Whether the elements of `shape` can be counted in a `usize` (in any order: candle multiplies the dimensions
/// one by one, zeros included, when it computes strides).
fn countable(shape: &[usize]) -> bool {
    shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .is_some()
}

/// Whether the file's header (when its length field fits the file and it is a JSON object) has a key twice.
fn duplicate_names(data: &[u8]) -> bool {
    use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
    struct Keys(Vec<String>);
    impl<'de> Deserialize<'de> for Keys {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Keys;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Keys, A::Error> {
                    let mut keys = Vec::new();
                    while let Some(k) = map.next_key::<String>()? {
                        map.next_value::<IgnoredAny>()?;
                        keys.push(k);
                    }
                    Ok(Keys(keys))
                }
            }
            d.deserialize_map(V)
        }
    }
    let Some((n, rest)) = data.split_first_chunk::<8>() else {
        return false;
    };
    let Some(header) = usize::try_from(u64::from_le_bytes(*n))
        .ok()
        .and_then(|n| rest.get(..n))
    else {
        return false;
    };
    serde_json::from_slice::<Keys>(header).is_ok_and(|Keys(mut keys)| {
        keys.sort();
        keys.windows(2).any(|w| w[0] == w[1])
    })
}

/// The input is the whole file. sketchx's reader must accept exactly the files the safetensors crate accepts
/// (except shapes whose element count overflows and tensors listed twice, which it refuses), refuse the rest with
/// [`Error::MalformedFile`] naming the file, and read every tensor into f32, f16 and bf16 exactly as candle's own
/// loading and conversion do (or fail where they fail), within [`read_bound`].
pub fn safetensors(data: &[u8]) {
    let scratch = Scratch::new();
    let path = scratch.write("model.safetensors", data);
    let bound = read_bound(data.len());
    let (ours, peak) = crate::alloc::peak_during(|| SafetensorsFile::open(&path));
    assert_allocated_within(peak, bound, "opening the file");
    let reference = candle_core::safetensors::SliceSafetensors::new(data);
    let reference_ok = !duplicate_names(data)
        && reference
            .as_ref()
            .is_ok_and(|r| r.tensors().iter().all(|(_, v)| countable(v.shape())));
    let file = match ours {
        Ok(file) => {
            assert!(
                reference_ok,
                "sketchx reads a file the safetensors crate refuses or candle cannot shape"
            );
            file
        }
        Err(Error::MalformedFile { path: named, .. }) => {
            assert_eq!(
                named,
                path.display().to_string(),
                "the error names the file"
            );
            assert!(
                !reference_ok,
                "sketchx refuses a file the safetensors crate reads"
            );
            return;
        }
        Err(e) => panic!("a bad weights file must be MalformedFile, got {e:?}"),
    };
    let reference = reference.expect("checked above");
    let mut names = file.names();
    names.sort();
    let mut reference_names: Vec<String> =
        reference.tensors().into_iter().map(|(n, _)| n).collect();
    reference_names.sort();
    assert_eq!(names, reference_names);
    let cpu = &Device::Cpu;
    for name in &names {
        let view = reference.get(name).expect("listed");
        assert_eq!(file.shape(name), Some(view.shape()), "{name}");
        let stored = candle_core::safetensors::Load::load(&view, cpu);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let (got, peak) = crate::alloc::peak_during(|| file.load(name, dtype, cpu));
            assert_allocated_within(peak, bound, name);
            let want = stored
                .as_ref()
                .map_err(|e| e.to_string())
                .and_then(|t| t.to_dtype(dtype).map_err(|e| e.to_string()));
            match (got, want) {
                (Ok(got), Ok(want)) => {
                    assert_eq!(got.dims(), view.shape(), "{name}");
                    assert_eq!(got.dtype(), dtype, "{name}");
                    assert!(
                        tensor_bits(&got) == tensor_bits(&want),
                        "{name} as {dtype:?} differs from candle's"
                    );
                }
                (Err(_), Err(_)) => {}
                (Ok(_), Err(e)) => {
                    panic!("{name} as {dtype:?}: sketchx reads what candle refuses ({e})")
                }
                (Err(e), Ok(_)) => {
                    panic!("{name} as {dtype:?}: sketchx fails where candle reads: {e}")
                }
            }
        }
        // A network asking for another shape gets an error, never a reinterpretation.
        let mut other = view.shape().to_vec();
        other.push(1);
        let asked = file.get(
            Shape::from(other),
            name,
            candle_nn::Init::Const(0.),
            DType::F32,
            cpu,
        );
        assert!(asked.is_err(), "{name}: a wrong shape was accepted");
    }
}

// -----------------------------------------------------------------------------------------------------------
// configs and scheduler_config: config.json of every network, scheduler_config.json.
// -----------------------------------------------------------------------------------------------------------

/// Elements the networks built from one fuzzed config may get from [`Zeros`] (16 MiB of f32).
const ZEROS_BUDGET: usize = 4 << 20;

/// Weights for a network built from a fuzzed config: zeros of whatever shape it asks for, within a budget of
/// elements (beyond it, an error, as a real file without such a tensor gives), so that any consistent config
/// builds its network without a weights file.
struct Zeros {
    left: std::sync::Mutex<usize>,
}

impl SimpleBackend for Zeros {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let n = if countable(s.dims()) {
            s.elem_count()
        } else {
            usize::MAX
        };
        let mut left = self.left.lock().unwrap_or_else(|e| e.into_inner());
        match left.checked_sub(n) {
            Some(rest) => *left = rest,
            None => candle_core::bail!("{name}: {s:?} is beyond the fuzzer's budget of elements"),
        }
        Tensor::zeros(s, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::CannotFindTensor {
            path: name.to_string(),
        })
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

fn zeros() -> Weights<'static> {
    let backend = Zeros {
        left: std::sync::Mutex::new(ZEROS_BUDGET),
    };
    Weights::new(
        VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu),
        Precision::F32,
    )
}

/// The input is one JSON file, read as every network's `config.json`. Each network is built (from [`Zeros`]) or
/// refused with an error, allocating nothing beyond the weights it asked for (plus 16 MiB).
pub fn configs(data: &[u8]) {
    let scratch = Scratch::new();
    let path = scratch.write("config.json", data);
    let config = match ConfigFile::read(&path) {
        Ok(c) => c,
        Err(e) => {
            assert_names_file(&e, &path);
            return;
        }
    };
    let bound = 4 * ZEROS_BUDGET + (16 << 20);
    let builders: [(&str, fn(&ConfigFile) -> sketchx::Result<()>); 5] = [
        ("unet", |c| unet::UNet::load(zeros(), c).map(drop)),
        ("controlnet", |c| {
            controlnet::ControlNet::load(zeros(), c).map(drop)
        }),
        ("vae", |c| vae::Vae::load(zeros(), c).map(drop)),
        ("taesd", |c| taesd::TinyVae::load(zeros(), c).map(drop)),
        ("text_encoder", |c| {
            let config = clip::ClipTextConfig::from_config(c)?;
            clip::ClipTextModel::load(zeros(), &config, c.origin()).map(drop)
        }),
    ];
    for (what, build) in builders {
        let (_, peak) = crate::alloc::peak_during(|| build(&config));
        assert_allocated_within(peak, bound, what);
    }
}

/// The input is a `scheduler_config.json`. It is read or refused with a file error naming it; each scheduler kind
/// is built from it for several step counts (within 64 MiB plus a multiple of the file: `trained_betas`) or
/// refused with a typed error, and a built one has a schedule of the promised shape and steps through it (up to 3
/// steps) without error.
pub fn scheduler_config(data: &[u8]) {
    let scratch = Scratch::new();
    let path = scratch.write("scheduler_config.json", data);
    let config = match SchedulerConfig::from_file(&path) {
        Ok(c) => c,
        Err(e) => {
            assert_names_file(&e, &path);
            return;
        }
    };
    let bound = 64 * data.len() + (64 << 20);
    for kind in SchedulerKind::ALL {
        for steps in [1, 2, 3, 25, 150] {
            for eta in [0.0, 0.7] {
                let (_, peak) = crate::alloc::peak_during(|| schedule(kind, &config, steps, eta));
                assert_allocated_within(peak, bound, kind.as_str());
            }
        }
    }
}

/// Asserts that `e` is a file error naming `path`.
fn assert_names_file(e: &Error, path: &Path) {
    let shown = path.display().to_string();
    match e {
        Error::MalformedFile { path: p, .. } | Error::UnsupportedModel { path: p, .. } => {
            assert_eq!(p, &shown, "{e}")
        }
        Error::Io { path: p, .. } => assert_eq!(p, path, "{e}"),
        other => panic!("a bad file must be a file error naming it, got {other:?}"),
    }
}

fn schedule(kind: SchedulerKind, config: &SchedulerConfig, steps: usize, eta: f64) {
    let mut s = match Scheduler::with_eta(kind, config, steps, eta) {
        Ok(s) => s,
        Err(Error::UnsupportedModel { .. }) | Err(Error::InvalidRequest { .. }) => return,
        Err(e) => panic!("{kind:?} x {steps}: not a typed config error: {e:?}"),
    };
    let n = s.timesteps().len();
    assert!(n >= 1, "{kind:?} x {steps}: no timesteps");
    if matches!(kind, SchedulerKind::Euler | SchedulerKind::EulerAncestral) {
        assert_eq!(s.sigmas().len(), n + 1, "{kind:?} x {steps}");
    }
    if n > 3 {
        return;
    }
    let cpu = &Device::Cpu;
    let eps = Tensor::full(0.5f32, (1, 4, 2, 2), cpu).expect("tensor");
    let mut sample = (Tensor::ones((1, 4, 2, 2), DType::F32, cpu).expect("tensor")
        * s.init_noise_sigma())
    .expect("scale");
    let mut rng = TorchRng::new(0);
    for i in 0..n {
        let input = s.scale_model_input(&sample, i);
        assert!(input.is_ok(), "{kind:?} step {i}: {input:?}");
        sample = s
            .step(&eps, i, &sample, &mut rng)
            .unwrap_or_else(|e| panic!("{kind:?} step {i} of {n}: {e}"));
        assert_eq!(sample.dims(), [1, 4, 2, 2]);
    }
    assert!(
        s.step(&eps, n, &sample, &mut rng).is_err(),
        "a step past the end"
    );
}

// -----------------------------------------------------------------------------------------------------------
// tokenizer_files and tokenizer_text: the CLIP tokenizer's files, and the tokenizer on arbitrary text.
// -----------------------------------------------------------------------------------------------------------

/// What every encoding must be: `max_length` ids, the start token first, the end token after the (truncated)
/// text's ids, padding after; the same ids again (the BPE cache returns what BPE computed). `decode` also decodes
/// them (it indexes the whole vocabulary per call: too slow for CLIP's on every input).
fn check_encoding(t: &ClipTokenizer, text: &str, decode: bool) {
    let ids = t.encode_padded(text);
    let max = t.max_length();
    assert_eq!(ids.len(), max);
    assert_eq!(ids[0], t.bos_id());
    let body = t.encode(text);
    let kept = body.len().min(max - 2);
    assert_eq!(&ids[1..1 + kept], &body[..kept]);
    assert_eq!(ids[1 + kept], t.eos_id());
    assert!(ids[2 + kept..].iter().all(|&id| id == t.pad_id()));
    assert_eq!(
        t.encode_padded(text),
        ids,
        "encoding again (from the cache)"
    );
    if decode {
        let _ = t.decode(&ids);
    }
}

/// The input: `vocab.json`, `merges.txt`, `tokenizer_config.json`, `special_tokens_map.json` and a prompt,
/// separated by 0xFF bytes (an empty config or map: no such file). The tokenizer loads or is refused with a file
/// error naming one of its files; a loaded one encodes the prompt as [`check_encoding`] requires.
pub fn tokenizer_files(data: &[u8]) {
    let mut parts = data.splitn(5, |&b| b == 0xFF);
    let mut next = || parts.next().unwrap_or_default();
    let (vocab, merges, config, map, text) = (next(), next(), next(), next(), next());
    let scratch = Scratch::new();
    scratch.write("vocab.json", vocab);
    scratch.write("merges.txt", merges);
    if !config.is_empty() {
        scratch.write("tokenizer_config.json", config);
    }
    if !map.is_empty() {
        scratch.write("special_tokens_map.json", map);
    }
    match ClipTokenizer::from_dir(&scratch.0) {
        Ok(t) => check_encoding(&t, &String::from_utf8_lossy(text), true),
        Err(e) => {
            let named = match &e {
                Error::MalformedFile { path, .. } | Error::UnsupportedModel { path, .. } => {
                    path.clone()
                }
                Error::Io { path, .. } => path.display().to_string(),
                other => panic!("a bad tokenizer file must be a file error, got {other:?}"),
            };
            assert!(
                named.starts_with(&scratch.0.display().to_string()),
                "the error names a tokenizer file: {e}"
            );
        }
    }
}

/// The tokenizer of the fixture model (CLIP's full vocabulary and merges), loaded once.
fn clip_tokenizer() -> &'static ClipTokenizer {
    static T: OnceLock<ClipTokenizer> = OnceLock::new();
    T.get_or_init(|| {
        ClipTokenizer::from_dir(&repo().join("tests/fixtures/tiny-sd/tokenizer"))
            .expect("the fixture tokenizer loads")
    })
}

/// The input is a prompt (bytes as the bindings' strings hold them: invalid UTF-8 replaced); CLIP's tokenizer
/// encodes it as [`check_encoding`] requires, every id from the vocabulary.
pub fn tokenizer_text(data: &[u8]) {
    let t = clip_tokenizer();
    let text = String::from_utf8_lossy(data);
    check_encoding(t, &text, false);
    let vocab = t.vocab_size() as u32;
    assert!(t.encode(&text).iter().all(|&id| id < vocab));
}

// -----------------------------------------------------------------------------------------------------------
// request: the REST form's fields as the REST examples parse them.
// -----------------------------------------------------------------------------------------------------------

/// The input is a JSON object of form fields (strings, or any JSON value standing for its text). Each field
/// either sets the request ([`GenerationRequest::set_form_field`]), is unknown, or is an error naming it; a
/// request that then validates has every field within its range and its texts within the prompt limit.
pub fn request(data: &[u8]) {
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let mut req = GenerationRequest::DEFAULT;
    for (name, value) in &fields {
        let text = match value {
            Value::String(s) => s.clone(),
            v => v.to_string(),
        };
        match req.set_form_field(name, &text) {
            Ok(true) => {}
            Ok(false) => return,
            Err(Error::InvalidRequest { field, .. }) => {
                assert_eq!(field, name.as_str(), "the error names the field");
                return;
            }
            Err(e) => panic!("{name}: a bad field must be InvalidRequest, got {e:?}"),
        }
    }
    match req.validate() {
        Ok(()) => {}
        Err(Error::InvalidRequest { .. }) => return,
        Err(e) => panic!("a bad request must be InvalidRequest, got {e:?}"),
    }
    for text in [req.prompt_text(), req.negative_prompt_text()] {
        assert!(text.len() <= MAX_PROMPT_BYTES && !text.contains('\0'));
    }
    assert!(TEMPERATURE_RANGE.contains(&req.temperature));
    assert!(GUIDANCE_RANGE.contains(&req.guidance_scale));
    assert!(ETA_RANGE.contains(&req.eta));
    assert!(NUM_IMAGES_RANGE.contains(&req.num_images));
    assert!(STEPS_RANGE.contains(&req.steps));
    for side in [req.width, req.height].into_iter().flatten() {
        assert!(SIZE_RANGE.contains(&side) && side % SIZE_MULTIPLE == 0);
    }
    assert!(req.conditioning_scale().is_finite());
}

// -----------------------------------------------------------------------------------------------------------
// lora: a LoRA file's keys and shapes mapped onto a network's layers.
// -----------------------------------------------------------------------------------------------------------

/// The layers of the synthetic base networks the LoRA target fuses into: a few of each kind the real UNet and
/// text encoder have (linear, 1x1 and 3x3 convolutions, attention projections, an embedding, biases), and two
/// layers whose kohya names collide.
pub const LORA_BASE_UNET: &[(&str, &[usize])] = &[
    ("conv_in.weight", &[8, 4, 3, 3]),
    ("conv_in.bias", &[8]),
    ("time_embedding.linear_1.weight", &[16, 8]),
    ("down_blocks.0.resnets.0.conv1.weight", &[8, 8, 3, 3]),
    ("down_blocks.0.attentions.0.proj_in.weight", &[8, 8, 1, 1]),
    (
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        &[8, 8],
    ),
    (
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight",
        &[8, 8],
    ),
    (
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        &[8, 12],
    ),
    ("mid_block.a_b.weight", &[4, 4]),
    ("mid_block.a.b.weight", &[4, 4]),
];

/// The synthetic text encoder's layers (see [`LORA_BASE_UNET`]).
pub const LORA_BASE_TEXT_ENCODER: &[(&str, &[usize])] = &[
    ("text_model.embeddings.token_embedding.weight", &[16, 12]),
    (
        "text_model.encoder.layers.0.self_attn.q_proj.weight",
        &[12, 12],
    ),
    ("text_model.encoder.layers.0.mlp.fc1.weight", &[24, 12]),
];

/// A safetensors file of f32 tensors with deterministic values.
pub fn safetensors_bytes(tensors: &[(&str, &[usize])]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, shape) in tensors {
        let n: usize = shape.iter().product();
        let start = data.len();
        for i in 0..n {
            data.extend_from_slice(&((i % 17) as f32 * 0.125 - 1.0).to_le_bytes());
        }
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let header = Value::Object(header).to_string();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&data);
    bytes
}

/// The input is a LoRA `.safetensors` file, fused at scale 0.8 into the synthetic base networks
/// ([`LORA_BASE_UNET`], [`LORA_BASE_TEXT_ENCODER`]). It is refused with [`Error::Lora`] or
/// [`Error::MalformedFile`], or fused: every fused parameter is a parameter of the base with its shape.
pub fn lora(data: &[u8]) {
    let scratch = Scratch::new();
    let unet = scratch.write("unet.safetensors", &safetensors_bytes(LORA_BASE_UNET));
    let text_encoder = scratch.write(
        "text_encoder.safetensors",
        &safetensors_bytes(LORA_BASE_TEXT_ENCODER),
    );
    let path = scratch.write("lora.safetensors", data);
    let spec = LoraSpec::file(&path, 0.8);
    match lora::fuse(&[spec], &unet, &text_encoder, Precision::F32) {
        Ok(fused) => {
            for (base, params) in [
                (LORA_BASE_UNET, &fused.unet),
                (LORA_BASE_TEXT_ENCODER, &fused.text_encoder),
            ] {
                for (name, t) in params {
                    let shape = base
                        .iter()
                        .find(|(n, _)| *n == name.as_str())
                        .map(|(_, s)| *s)
                        .unwrap_or_else(|| panic!("fused {name}, not a base parameter"));
                    assert_eq!(t.dims(), shape, "{name}");
                    assert_eq!(t.dtype(), DType::F32, "{name}");
                }
            }
        }
        Err(Error::Lora { path: named, .. }) | Err(Error::MalformedFile { path: named, .. }) => {
            assert_eq!(
                named,
                path.display().to_string(),
                "the error names the LoRA file"
            );
        }
        Err(e) => panic!("a bad LoRA must be Lora or MalformedFile, got {e:?}"),
    }
}

// -----------------------------------------------------------------------------------------------------------
// pickle: torch checkpoints (zip, legacy and bare pickles) read without running them.
// -----------------------------------------------------------------------------------------------------------

/// What interpreting a pickle of `len` bytes may allocate at once: the reader promises memory proportional to the
/// pickle (every opcode adds at most one value or container); this is the factor allowed, plus fixed space.
pub fn pickle_bound(len: usize) -> usize {
    64 * len + (8 << 20)
}

/// Asserts that `e` is one of the errors a bad checkpoint may give, naming `path`.
fn assert_checkpoint_error(e: &Error, path: &Path) {
    let shown = path.display().to_string();
    match e {
        Error::MalformedFile { path: p, .. }
        | Error::UnsupportedModel { path: p, .. }
        | Error::Checkpoint { path: p, .. } => assert_eq!(p, &shown, "{e}"),
        other => panic!("a bad checkpoint must be a typed file error, got {other:?}"),
    }
}

/// The input is the whole file (`.ckpt`/`.pt`/`.bin`). Opening it interprets its pickle within [`pickle_bound`]
/// and gives a checkpoint or a typed error naming the file; every value and dict reachable from the root reads
/// without panicking; every tensor of the state dict (and of any top-level dict) reads in its stored dtype and as
/// f32/f16/bf16 with its shape, the same values either way, allocating at most a few times its size (plus what a
/// deflated storage inflates to), or fails with an error.
pub fn pickle(data: &[u8]) {
    let scratch = Scratch::new();
    let path = scratch.write("model.ckpt", data);
    let (opened, peak) = crate::alloc::peak_during(|| TorchFile::open(&path));
    assert_allocated_within(peak, pickle_bound(data.len()), "interpreting the pickle");
    let file = match opened {
        Ok(f) => f,
        Err(e) => return assert_checkpoint_error(&e, &path),
    };
    let mut dicts: Vec<Vec<String>> = vec![Vec::new()];
    if let Ok(keys) = file.keys_at(&[]) {
        for k in keys.into_iter().take(16) {
            match file.get(&[k.as_str()]) {
                Ok(Entry::Dict(_)) => dicts.push(vec![k]),
                Ok(_) => {}
                Err(e) => assert_checkpoint_error(&e, &path),
            }
        }
    }
    let read_bound = |bytes: usize| 6 * bytes + 1100 * data.len() + (16 << 20);
    let cpu = &Device::Cpu;
    let mut states = vec![file.state_dict()];
    for keys in &dicts {
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        states.push(file.tensors_at(&keys));
    }
    for state in states {
        let state = match state {
            Ok(s) => s,
            Err(e) => {
                assert_checkpoint_error(&e, &path);
                continue;
            }
        };
        for name in state.names() {
            let info = state.info(name).expect("listed").clone();
            assert_eq!(state.shape(name), Some(&info.shape[..]));
            let bytes = info
                .shape
                .iter()
                .try_fold(info.dtype.size(), |n, &d| n.checked_mul(d))
                .expect("a tensor inside its storage has a countable size");
            let (stored, peak) = crate::alloc::peak_during(|| state.tensor(name));
            assert_allocated_within(peak, read_bound(bytes), name);
            let stored = match stored {
                Ok(t) => t,
                Err(e) => {
                    assert_checkpoint_error(&e, &path);
                    continue;
                }
            };
            assert_eq!(stored.dims(), &info.shape[..], "{name}");
            assert_eq!(stored.dtype(), info.dtype.dtype(), "{name}");
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let (got, peak) = crate::alloc::peak_during(|| state.load(name, dtype, cpu));
                assert_allocated_within(peak, read_bound(bytes), name);
                let want = stored.to_dtype(dtype);
                match (got, want) {
                    (Ok(got), Ok(want)) => {
                        assert_eq!(got.dims(), &info.shape[..], "{name}");
                        assert!(
                            tensor_bits(&got) == tensor_bits(&want),
                            "{name} as {dtype:?} differs from its stored values converted"
                        );
                    }
                    (Err(_), Err(_)) => {}
                    (Ok(_), Err(e)) => {
                        panic!("{name} as {dtype:?}: read, but candle cannot convert it: {e}")
                    }
                    (Err(e), Ok(_)) => {
                        panic!("{name} as {dtype:?}: read in its dtype, not in this one: {e}")
                    }
                }
            }
        }
    }
}
