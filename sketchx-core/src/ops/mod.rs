//! CPU kernels for the networks' hot spots, as candle custom ops in this crate, and instrumentation.
//!
//! [`conv`] (im2col + GEMM convolution), [`attention`] (tiled attention without the full score matrix) and
//! [`norm`] (group norm fused with SiLU) replace candle's CPU implementations for f32 and fall back to candle
//! for other dtypes and devices; [`profile`] times each kind of operation when enabled, to show where a
//! denoising step's time goes.

use std::sync::OnceLock;

/// Whether the custom kernels run; `SKETCHX_PLAIN_CANDLE=1` in the environment turns them off (everything then
/// runs on candle's own CPU implementations), to measure what they gain.
pub fn kernels_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var_os("SKETCHX_PLAIN_CANDLE").is_none_or(|v| v.is_empty() || v == "0")
    })
}

pub mod attention;
pub mod conv;
pub mod gemm;
pub mod linear;
pub mod norm;
pub mod profile;
pub(crate) mod simd;

/// Largest absolute element-wise difference of two tensors (the kernels' unit tests compare against candle).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
