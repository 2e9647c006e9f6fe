//! Parity of `sketchx::sampling::rng::TorchRng` with `torch.randn` on a CPU generator.
//!
//! References come from `tools/fixturegen/sampling.py` (`tests/fixtures/sampling/rng.json`): draws for several
//! seeds and shapes, and consecutive draws from one generator, recorded with torch's dispatched CPU kernels (AVX2 /
//! AVX-512 on x86-64) and with its scalar kernels (`ATEN_CPU_CAPABILITY=default`).

mod common;
use common::fixtures as fixtures_dir;

use candle_core::{DType, Device};
use serde_json::Value;
use sketchx::sampling::rng::{FloatNormalPath, TorchRng};

fn load() -> Value {
    let path = fixtures_dir().join("sampling/rng.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).expect("rng.json is valid JSON")
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn shape(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

fn path_for(capability: &str) -> FloatNormalPath {
    match capability {
        "DEFAULT" => FloatNormalPath::Scalar,
        _ => FloatNormalPath::Avx2,
    }
}

/// Replays every case of one fixture set; returns (max abs difference, values compared, values not bit-identical).
fn replay(set: &Value) -> (f32, usize, usize) {
    let path = path_for(set["capability"].as_str().unwrap());
    let (mut max_diff, mut count, mut inexact) = (0f32, 0usize, 0usize);
    for case in set["cases"].as_array().unwrap() {
        let seed = case["seed"].as_u64().unwrap();
        let mut rng = TorchRng::with_float_path(seed, path);
        for draw in case["draws"].as_array().unwrap() {
            let shape = shape(&draw["shape"]);
            let expected = f32s(&draw["values"]);
            let got = rng.randn_vec(shape.iter().product());
            assert_eq!(got.len(), expected.len(), "seed {seed} shape {shape:?}");
            for (g, e) in got.iter().zip(&expected) {
                let d = (g - e).abs();
                assert!(d <= 1e-6, "seed {seed} shape {shape:?}: got {g}, torch {e}");
                max_diff = max_diff.max(d);
                inexact += usize::from(g.to_bits() != e.to_bits());
                count += 1;
            }
        }
    }
    (max_diff, count, inexact)
}

#[test]
fn randn_matches_torch_dispatched_kernels() {
    let fixtures = load();
    let set = &fixtures["dispatched"];
    let (max_diff, count, inexact) = replay(set);
    println!(
        "capability {}: {count} values, max abs diff {max_diff:e}, {inexact} not bit-identical",
        set["capability"]
    );
    // The AVX2 path is pure float arithmetic: it must be bit-exact on every platform.
    if path_for(set["capability"].as_str().unwrap()) == FloatNormalPath::Avx2 {
        assert_eq!(inexact, 0);
    }
}

#[test]
fn randn_matches_torch_scalar_kernels() {
    let fixtures = load();
    let (max_diff, count, inexact) = replay(&fixtures["scalar"]);
    println!("capability DEFAULT: {count} values, max abs diff {max_diff:e}, {inexact} not bit-identical");
}

#[test]
fn randn_half_matches_torch() {
    let fixtures = load();
    let set = &fixtures["dispatched"];
    let path = path_for(set["capability"].as_str().unwrap());
    let mut count = 0;
    for case in set["half_cases"].as_array().unwrap() {
        let seed = case["seed"].as_u64().unwrap();
        let dtype = match case["dtype"].as_str().unwrap() {
            "float16" => DType::F16,
            _ => DType::BF16,
        };
        let mut rng = TorchRng::with_float_path(seed, path);
        for draw in case["draws"].as_array().unwrap() {
            let shape = shape(&draw["shape"]);
            let got: Vec<f32> = rng
                .randn_dtype(&shape, dtype, &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(
                got,
                f32s(&draw["values"]),
                "seed {seed} {dtype:?} shape {shape:?}"
            );
            count += got.len();
        }
    }
    println!("{count} float16/bfloat16 values bit-identical");
}

#[test]
fn randn_tensor_has_shape_and_stream_continues() {
    let device = Device::Cpu;
    let mut a = TorchRng::new(42);
    let t = a.randn(&[2, 4, 8, 8], &device).unwrap();
    assert_eq!(t.dims(), &[2, 4, 8, 8]);
    assert_eq!(t.dtype(), DType::F32);
    let flat: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    let mut b = TorchRng::new(42);
    assert_eq!(flat, b.randn_vec(512));
    // Clones continue identically; the originals keep going.
    let mut c = a.clone();
    assert_eq!(a.randn_vec(7), c.randn_vec(7));
    assert_eq!(a.randn_vec(100), c.randn_vec(100));
    assert!(TorchRng::new(1).randn_vec(0).is_empty());
}

#[test]
fn seeds_reduce_to_low_32_bits() {
    let a = TorchRng::new(5).randn_vec(40);
    let b = TorchRng::new((1 << 32) + 5).randn_vec(40);
    assert_eq!(a, b);
    assert_ne!(a, TorchRng::new(6).randn_vec(40));
}
