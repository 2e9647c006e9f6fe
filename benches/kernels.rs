//! Criterion benchmarks of sketchx's CPU kernels against candle's own implementation of the same operation, at
//! SD1.5 shapes for a 256x256 image with classifier-free guidance (batch 2, 32x32 latents):
//! `cargo bench --bench kernels`. Each group has a `sketchx` and a `candle` entry.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, Criterion};
use sketchx::ops::attention::{attention, reference};
use sketchx::ops::conv::FastConv2d;
use sketchx::ops::norm::FastGroupNorm;

fn conv(c: &mut Criterion) {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let inner = candle_nn::conv2d(320, 320, 3, cfg, vb).unwrap();
    let fast = FastConv2d::new(inner.clone());
    let xs = Tensor::randn(0f32, 1., (2, 320, 32, 32), &dev).unwrap();
    let mut g = c.benchmark_group("conv3x3_320x32x32_b2");
    g.sample_size(10);
    g.bench_function("sketchx", |b| b.iter(|| fast.forward(&xs).unwrap()));
    g.bench_function("candle", |b| b.iter(|| inner.forward(&xs).unwrap()));
    g.finish();
    // The CPU bf16 mode at the UNet's four resolutions (throughput in FLOP/s).
    for (ch, hw) in [(320, 32), (640, 16), (1280, 8), (1280, 4)] {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let inner = candle_nn::conv2d(ch, ch, 3, cfg, vb).unwrap();
        let fast = FastConv2d::new(inner).into_cpu_bf16().unwrap();
        let xs = Tensor::randn(0f32, 1., (2, ch, hw, hw), &dev).unwrap();
        let mut g = c.benchmark_group(format!("conv3x3_bf16_{ch}x{hw}x{hw}_b2"));
        g.sample_size(10);
        g.throughput(criterion::Throughput::Elements(
            (2 * 2 * ch * ch * 9 * hw * hw) as u64,
        ));
        g.bench_function("sketchx", |b| b.iter(|| fast.forward(&xs).unwrap()));
        g.finish();
    }
    // The VAE decoder's at 512x512 (one image).
    for (ch, hw) in [(512, 64), (512, 128), (256, 256), (128, 512)] {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let inner = candle_nn::conv2d(ch, ch, 3, cfg, vb).unwrap();
        let fast = FastConv2d::new(inner).into_cpu_bf16().unwrap();
        let xs = Tensor::randn(0f32, 1., (1, ch, hw, hw), &dev).unwrap();
        let mut g = c.benchmark_group(format!("conv3x3_bf16_vae_{ch}x{hw}x{hw}"));
        g.sample_size(10);
        g.throughput(criterion::Throughput::Elements(
            (2 * ch * ch * 9 * hw * hw) as u64,
        ));
        g.bench_function("sketchx", |b| b.iter(|| fast.forward(&xs).unwrap()));
        g.finish();
    }
}

fn attn(c: &mut Criterion) {
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1., (2, 1024, 320), &dev).unwrap();
    let k = Tensor::randn(0f32, 1., (2, 1024, 320), &dev).unwrap();
    let v = Tensor::randn(0f32, 1., (2, 1024, 320), &dev).unwrap();
    let scale = 40f64.powf(-0.5);
    let mut g = c.benchmark_group("self_attention_1024x320_8heads_b2");
    g.sample_size(10);
    g.bench_function("sketchx", |b| {
        b.iter(|| attention(&q, &k, &v, 8, scale, false).unwrap())
    });
    g.bench_function("candle", |b| {
        b.iter(|| reference(&q, &k, &v, 8, scale).unwrap())
    });
    g.finish();
    // The CPU bf16 mode (throughput in FLOP/s: two products of 1024 x 1024 x 40 per head).
    let mut g = c.benchmark_group("self_attention_bf16_1024x320_8heads_b2");
    g.sample_size(10);
    g.throughput(criterion::Throughput::Elements(4 * 2 * 1024 * 1024 * 320));
    g.bench_function("sketchx", |b| {
        b.iter(|| attention(&q, &k, &v, 8, scale, true).unwrap())
    });
    g.finish();
}

fn group_norm(c: &mut Criterion) {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let gn = FastGroupNorm::new(32, 320, 1e-5, vb).unwrap();
    let xs = Tensor::randn(0f32, 1., (2, 320, 32, 32), &dev).unwrap();
    let mut g = c.benchmark_group("group_norm_silu_320x32x32_b2");
    g.sample_size(10);
    g.bench_function("sketchx", |b| b.iter(|| gn.forward_silu(&xs).unwrap()));
    g.bench_function("candle", |b| b.iter(|| gn.reference(&xs, true).unwrap()));
    g.finish();
}

/// sketchx's GEMM in bf16 (inputs rounded to bf16, f32 accumulation) and f32 against the f32 GEMM of the `gemm` crate
/// that candle uses, at the shapes of a 3x3 convolution (640 channels, 16x16) and of a feed-forward linear layer
/// (2 x 1024 tokens, 320 -> 1280).
fn matmul(c: &mut Criterion) {
    use sketchx::ops::gemm::{gemm_bf16, gemm_f32, gemm_packed, to_bf16, Format, PackedA, PackedB};
    for (name, m, n, k) in [
        ("conv3x3_640x16x16", 640, 256, 5760),
        ("linear_2048x320_to_1280", 2048, 1280, 320),
        ("linear_2048x1280_to_320", 2048, 320, 1280),
    ] {
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 104729) % 1000) as f32 / 1000.0)
            .collect();
        let a16 = to_bf16(&a);
        let rows = |p| {
            PackedB::from_rows(k, n, p, |r, row| {
                row.copy_from_slice(&b[r * n..(r + 1) * n])
            })
        };
        let (packed, packed32) = (rows(Format::Bf16), rows(Format::F32));
        let mut out = vec![0f32; m * n];
        let mut g = c.benchmark_group(format!("gemm_{name}"));
        g.sample_size(10);
        g.throughput(criterion::Throughput::Elements((2 * m * n * k) as u64));
        g.bench_function("sketchx_bf16", |bch| {
            bch.iter(|| gemm_bf16(m, &a16, k, &packed, &mut out, n))
        });
        let (pa16, pa32) = (
            PackedA::new(&a, m, k, Format::Bf16),
            PackedA::new(&a, m, k, Format::F32),
        );
        g.bench_function("sketchx_bf16_packed_a", |bch| {
            bch.iter(|| gemm_packed(&pa16, &packed, &mut out, n))
        });
        g.bench_function("sketchx_f32_packed_a", |bch| {
            bch.iter(|| gemm_packed(&pa32, &packed32, &mut out, n))
        });
        g.bench_function("sketchx_f32", |bch| {
            bch.iter(|| gemm_f32(m, &a, k, &packed32, &mut out, n))
        });
        g.bench_function("sketchx_bf16_with_packing", |bch| {
            bch.iter(|| gemm_bf16(m, &to_bf16(&a), k, &rows(Format::Bf16), &mut out, n))
        });
        let ta = Tensor::from_vec(a.clone(), (m, k), &Device::Cpu).unwrap();
        let tb = Tensor::from_vec(b.clone(), (k, n), &Device::Cpu).unwrap();
        g.bench_function("candle_f32", |bch| bch.iter(|| ta.matmul(&tb).unwrap()));
        g.finish();
    }
}

criterion_group!(benches, conv, attn, group_norm, matmul);
criterion_main!(benches);
