//! sketchx's safetensors reader (`models::weights`) against candle's own (`MmapedSafetensors` + `to_dtype`, what
//! `VarBuilder::from_mmaped_safetensors` does): bit-identical tensors from f32, f16 and bf16 files loaded as f32,
//! f16 and bf16 (every fixture file, f16 and bf16 copies of them, and a hand-made file whose tensors span several
//! parallel read pieces, start at odd offsets and hold NaNs, infinities and subnormals); damaged files give a
//! typed error naming the file; and the engine, which loads its networks as rayon tasks, loads from inside a
//! one-thread rayon pool.

mod common;
use common::*;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sketchx::engine::{Engine, EngineConfig};
use sketchx::models::loader::var_builder;
use sketchx::models::weights::SafetensorsFile;
use sketchx::Error;

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// A tensor's dtype, shape and values as f32 bits (f16, bf16 and the integer fixtures widen exactly).
fn bits(t: &Tensor) -> (DType, Vec<usize>, Vec<u32>) {
    let v = t
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    (
        t.dtype(),
        t.dims().to_vec(),
        v.into_iter().map(f32::to_bits).collect(),
    )
}

/// Reads every tensor of `path` into every dtype with sketchx's reader and with candle's; asserts they are
/// identical. Returns how many tensors the file holds.
fn assert_same_as_candle(path: &Path) -> usize {
    let ours = SafetensorsFile::open(path).unwrap();
    // SAFETY: the test's files are not modified while mapped.
    let theirs = unsafe { MmapedSafetensors::new(path) }.unwrap();
    let names = ours.names();
    assert_eq!(names.len(), theirs.tensors().len(), "{}", path.display());
    for name in &names {
        let stored = theirs.load(name, &Device::Cpu).unwrap();
        assert_eq!(ours.shape(name), Some(stored.dims()), "{name}");
        for dt in DTYPES {
            let a = ours.load(name, dt, &Device::Cpu).unwrap();
            let b = stored.to_dtype(dt).unwrap();
            assert!(a.is_contiguous());
            assert_eq!(bits(&a), bits(&b), "{} {name} as {dt:?}", path.display());
        }
    }
    names.len()
}

fn fixture_weights() -> Vec<PathBuf> {
    let f = fixtures();
    let mut v: Vec<PathBuf> = [
        "tiny-sd/text_encoder/model.safetensors",
        "tiny-sd/unet/diffusion_pytorch_model.safetensors",
        "tiny-sd/vae/diffusion_pytorch_model.safetensors",
        "tiny-sd-alt/text_encoder/model.safetensors",
        "tiny-sd-alt/unet/diffusion_pytorch_model.safetensors",
        "tiny-sd-alt/vae/diffusion_pytorch_model.safetensors",
        "tiny-controlnet/diffusion_pytorch_model.safetensors",
        "tiny-controlnet-alt/diffusion_pytorch_model.safetensors",
    ]
    .iter()
    .map(|p| f.join(p))
    .collect();
    // Parity references: an i64 tensor among f32 ones (read as stored, converted by candle).
    v.push(f.join("reference/components.safetensors"));
    v
}

#[test]
fn fixtures_read_like_candle_in_every_dtype() {
    let mut n = 0;
    for p in fixture_weights() {
        n += assert_same_as_candle(&p);
    }
    assert!(n > 1500, "{n} tensors");
}

#[test]
fn f16_and_bf16_files_read_like_candle() {
    let dir = scratch_dir("weights-half");
    std::fs::create_dir_all(&dir).unwrap();
    for (i, p) in fixture_weights().iter().take(8).enumerate() {
        // SAFETY: as above.
        let st = unsafe { MmapedSafetensors::new(p) }.unwrap();
        for dt in [DType::F16, DType::BF16] {
            let converted: HashMap<String, Tensor> = st
                .tensors()
                .into_iter()
                .map(|(name, _)| {
                    let t = st.load(&name, &Device::Cpu).unwrap().to_dtype(dt).unwrap();
                    (name, t)
                })
                .collect();
            let out = dir.join(format!("{i}-{dt:?}.safetensors"));
            candle_core::safetensors::save(&converted, &out).unwrap();
            assert_same_as_candle(&out);
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Values covering every class of float: normal of all magnitudes, subnormal, zero of both signs, infinities and
/// NaNs, and halfway cases of f16/bf16 rounding.
fn special_values(n: usize) -> Vec<f32> {
    let specials = [
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MIN_POSITIVE,
        1e-40,
        -1e-45,
        65504.0,
        65520.0,
        1e-8,
        f32::MAX,
        f32::from_bits(0x3F80_8000),
        f32::from_bits(0x3F81_8000),
        f32::from_bits(0x3F80_1000),
    ];
    let mut x = 0x2545_F491u32;
    (0..n)
        .map(|i| {
            if i % 97 < specials.len() {
                specials[i % 97]
            } else {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                // Random finite values over many magnitudes.
                f32::from_bits((x & 0x807F_FFFF) | (((x >> 23) % 60 + 97) << 23))
            }
        })
        .collect()
}

/// Writes a safetensors file by hand (tensors in the given order, no alignment padding), so that tensors start at
/// odd offsets.
fn write_safetensors(path: &Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, dtype, shape, data) in tensors {
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + data.len()]}),
        );
        offset += data.len();
    }
    let header = serde_json::Value::Object(header).to_string();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    for (_, _, _, data) in tensors {
        bytes.extend_from_slice(data);
    }
    std::fs::write(path, bytes).unwrap();
}

fn le_bytes(t: &Tensor) -> Vec<u8> {
    match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn large_unaligned_and_special_tensors_read_like_candle() {
    let dir = scratch_dir("weights-large");
    std::fs::create_dir_all(&dir).unwrap();
    // 3,000,001 f32 (11.4 MiB: two 8 MiB read pieces, the second partial) and 200,003 halves (four conversion
    // pieces of 64 Ki elements), each starting at an odd offset.
    let big = Tensor::new(special_values(3_000_001), &Device::Cpu).unwrap();
    let halves = Tensor::new(special_values(200_003), &Device::Cpu).unwrap();
    let f16 = halves.to_dtype(DType::F16).unwrap();
    let bf16 = halves.to_dtype(DType::BF16).unwrap();
    let path = dir.join("large.safetensors");
    write_safetensors(
        &path,
        &[
            ("odd", "U8", vec![3], vec![1, 2, 3]),
            ("big", "F32", vec![1, 3_000_001], le_bytes(&big)),
            ("f16", "F16", vec![200_003], le_bytes(&f16)),
            ("one", "U8", vec![1], vec![7]),
            ("bf16", "BF16", vec![200_003, 1], le_bytes(&bf16)),
            (
                "ids",
                "I64",
                vec![2],
                [5i64, -9].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
        ],
    );
    assert_eq!(assert_same_as_candle(&path), 6);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn var_builder_gets_what_candles_var_builder_gets() {
    let p = fixtures().join("tiny-sd/unet/diffusion_pytorch_model.safetensors");
    let name = "conv_in.weight";
    for dt in DTYPES {
        let ours = var_builder(&p, dt, &Device::Cpu).unwrap();
        // The CPU bf16 mode hands out f32 tensors (its matrix layers round and pack their own weights).
        let dt = if dt == DType::BF16 { DType::F32 } else { dt };
        // SAFETY: as above.
        let theirs =
            unsafe { VarBuilder::from_mmaped_safetensors(&[&p], dt, &Device::Cpu) }.unwrap();
        let shape = theirs.get_unchecked(name).unwrap().dims().to_vec();
        let a = ours.get(shape.clone(), name).unwrap();
        let b = theirs.get(shape.clone(), name).unwrap();
        assert_eq!(bits(&a), bits(&b));
        assert_eq!(a.dtype(), dt);
        assert!(ours.contains_tensor(name));
        assert!(!ours.contains_tensor("no.such.tensor"));
        let wrong = ours.get((1, 2), name).unwrap_err().to_string();
        assert!(
            wrong.contains("shape mismatch for conv_in.weight"),
            "{wrong}"
        );
        let missing = ours.get(1, "no.such.tensor").unwrap_err().to_string();
        assert!(missing.contains("no.such.tensor"), "{missing}");
    }
}

/// `SafetensorsFile::open` on a file with `bytes`: the error, which must be MalformedFile naming the file.
fn malformed(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    match SafetensorsFile::open(&p) {
        Err(Error::MalformedFile { path, message }) => {
            assert!(path.contains(name), "{path}");
            message
        }
        other => panic!("{name}: expected MalformedFile, got {other:?}"),
    }
}

#[test]
fn damaged_files_are_typed_errors_naming_the_file() {
    let dir = scratch_dir("weights-damaged");
    std::fs::create_dir_all(&dir).unwrap();
    let good =
        std::fs::read(fixtures().join("tiny-sd/vae/diffusion_pytorch_model.safetensors")).unwrap();

    let m = malformed(&dir, "truncated.safetensors", &good[..good.len() - 10]);
    assert!(m.contains("truncated"), "{m}");
    let m = malformed(&dir, "header-cut.safetensors", &good[..100]);
    assert!(m.contains("header length"), "{m}");
    let m = malformed(&dir, "empty.safetensors", &[]);
    assert!(m.contains("too short"), "{m}");
    let mut trailing = good.clone();
    trailing.extend_from_slice(b"extra");
    let m = malformed(&dir, "trailing.safetensors", &trailing);
    assert!(m.contains("5 bytes follow the last tensor"), "{m}");
    let mut garbage = 16u64.to_le_bytes().to_vec();
    garbage.extend_from_slice(b"{ not json at al");
    let m = malformed(&dir, "garbage.safetensors", &garbage);
    assert!(m.contains("invalid safetensors header"), "{m}");
    let m = malformed(&dir, "huge-header.safetensors", &u64::MAX.to_le_bytes());
    assert!(m.contains("header length"), "{m}");
    // Offsets that overlap (the safetensors crate's own validation).
    let mut overlap = Vec::new();
    let header = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
    overlap.extend_from_slice(&(header.len() as u64).to_le_bytes());
    overlap.extend_from_slice(header);
    overlap.extend_from_slice(&[0; 8]);
    malformed(&dir, "overlap.safetensors", &overlap);

    let missing = dir.join("missing.safetensors");
    assert!(matches!(
        SafetensorsFile::open(&missing),
        Err(Error::MissingFile { ref path }) if path.contains("missing.safetensors")
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_engine_loads_inside_a_one_thread_rayon_pool() {
    // The networks load as tasks on the caller's rayon pool and read in parallel pieces on it: a caller that is
    // itself the only thread of its pool must still get its engine (no task waits for a thread that never comes).
    let (model, controlnet) = tiny_models();
    let config = EngineConfig::new(&model, &controlnet).unwrap();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let engine = pool.install(|| Engine::load(&config)).unwrap();
    assert_eq!(engine.vae_scale_factor(), 8);
}
