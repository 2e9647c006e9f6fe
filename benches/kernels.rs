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
        b.iter(|| attention(&q, &k, &v, 8, scale).unwrap())
    });
    g.bench_function("candle", |b| {
        b.iter(|| reference(&q, &k, &v, 8, scale).unwrap())
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
    g.bench_function("sketchx", |b| b.iter(|| gn.forward(&xs, true).unwrap()));
    g.bench_function("candle", |b| b.iter(|| gn.reference(&xs, true).unwrap()));
    g.finish();
}

criterion_group!(benches, conv, attn, group_norm);
criterion_main!(benches);
