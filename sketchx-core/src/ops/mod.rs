//! The CPU kernels behind the networks' layers, as candle custom ops, and their instrumentation.
//!
//! [`gemm`] is the matrix product they share (AVX-512 micro-kernels in f32 and bf16 over packed operands, AMX
//! tiles for bf16 where the CPU has them (`amx`), the `gemm` crate elsewhere). [`linear`] and [`conv`] (im2col +
//! GEMM, bf16 kernels packed once at load; large f32 3x3 convolutions by Winograd's F(4x4, 3x3) in `winograd`; in
//! the bf16 mode without AMX, 3x3 convolutions of 16 channels or more by F(2x2, 3x3) in `winograd_bf16`) hold their
//! weights as the network's [`Precision`](crate::precision::Precision) says; [`attention`] (tiled, without the full
//! score matrix), [`norm`] (group norm fused with SiLU), [`geglu`], [`add`] (residual additions) and [`layout`]
//! (image <-> token layout) run on f32. Each falls back to candle for other dtypes and devices. `simd` has the
//! vectorised element-wise helpers, `cpu` the plumbing they all share, and [`profile`] times each kind of
//! operation, inside the op types, to show where a denoising step's time goes.

use std::sync::OnceLock;

/// Whether the custom kernels run; `SKETCHX_PLAIN_CANDLE=1` in the environment turns them off (everything then
/// runs on candle's own CPU implementations), to measure what they gain.
pub fn kernels_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var_os("SKETCHX_PLAIN_CANDLE").is_none_or(|v| v.is_empty() || v == "0")
    })
}

/// Whether convolutions and linear layers built in `precision` keep packed bf16 weights: the CPU bf16 mode with the
/// kernels on.
pub(crate) fn packs_bf16(precision: crate::precision::Precision) -> bool {
    precision == crate::precision::Precision::CpuBf16 && kernels_enabled()
}

pub mod add;
pub(crate) mod amx;
pub mod attention;
pub mod conv;
pub(crate) mod cpu;
pub use cpu::on_pool;
pub mod geglu;
pub mod gemm;
pub mod layout;
pub mod linear;
pub mod norm;
pub mod profile;
pub(crate) mod simd;
#[cfg(target_arch = "x86_64")]
pub(crate) mod winograd;
pub(crate) mod winograd_bf16;

/// Whether the Winograd convolutions run; `SKETCHX_NO_WINOGRAD=1` turns them off (to measure what they gain).
fn winograd_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var_os("SKETCHX_NO_WINOGRAD").is_none_or(|v| v.is_empty() || v == "0")
    })
}

/// Largest absolute element-wise difference of two tensors (the kernels' unit tests compare against candle).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

/// Largest absolute value of a tensor (the unit tests' scale for a bound).
#[cfg(test)]
pub(crate) fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
