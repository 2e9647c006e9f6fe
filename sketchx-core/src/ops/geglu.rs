//! diffusers' GEGLU (`hidden * gelu(gate)` over the two halves of the feed-forward projection) in one pass.
//!
//! candle's formulation takes two strided views of the projection, runs the exact GELU over one (scalar `erf`)
//! and multiplies the views: three passes and two temporaries of the feed-forward's width. Here rows run in
//! parallel and each output element is computed once, with a vectorised `erf`: Abramowitz and Stegun's 7.1.26
//! (absolute error below 1.5e-7), the formula torch's CPU GELU uses, in torch's order of operations
//! (`(g * 0.5) * (1 + erf(g / sqrt 2))`, then `hidden *`). Non-f32 or non-CPU tensors use candle.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};
use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::simd::geglu_row;

/// `h[..., :n] * gelu(h[..., n:])` for `h` whose last dimension is `2n`. Timed as `geglu`.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    super::profile::scope("geglu", || {
        if super::kernels_enabled() && h.device().is_cpu() && h.dtype() == DType::F32 {
            return h.contiguous()?.apply_op1_no_bwd(&GegluOp);
        }
        reference(h)
    })
}

/// candle's GEGLU: what [`geglu`] computes, the slow way.
pub fn reference(h: &Tensor) -> Result<Tensor> {
    let half = h.dim(D::Minus1)? / 2;
    h.narrow(D::Minus1, 0, half)? * h.narrow(D::Minus1, half, half)?.gelu_erf()?
}

/// The fused kernel (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct GegluOp;

impl CustomOp1 for GegluOp {
    fn name(&self) -> &'static str {
        "sketchx-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = super::cpu::contiguous_f32(s, l, "GEGLU input")?;
        let mut dims = l.shape().dims().to_vec();
        let width = dims.last().copied().unwrap_or(0);
        if width % 2 != 0 {
            candle_core::bail!("GEGLU: last dimension {width} is odd");
        }
        let half = width / 2;
        if let Some(last) = dims.last_mut() {
            *last = half;
        }
        let len = h.len() / 2;
        let mut out = super::cpu::output_uninit_f32(len);
        geglu_rows(h, &mut out.spare_capacity_mut()[..len], half, half);
        // SAFETY: geglu_rows wrote all `len` values (h holds len / half rows).
        unsafe { out.set_len(len) };
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// The kernel on rows of `2 * half` values in `h`, into rows of `half` in `out`, in parallel: every value of
/// `out` is written when it holds `h.len() / 2` (it may start uninitialised). A row's hidden and gate values
/// alternate in runs of `run` (a divisor of `half`): `run = half` is diffusers' layout (the two halves), a smaller
/// one a projection whose columns were packed in pairs of runs (see [`super::linear::GegluLinear`]).
pub(crate) fn geglu_rows(h: &[f32], out: &mut [MaybeUninit<f32>], half: usize, run: usize) {
    in_blocks(
        h,
        out,
        (half, run),
        || (),
        |_, (a, g), o| geglu_row(a, g, o),
    );
}

/// [`geglu_rows`] into bf16 bit patterns (each row computed in f32, then rounded to nearest even: the same bits
/// as rounding `geglu_rows`' output), for a consumer that rounds its input to bf16 anyway. `out` holds
/// `h.len() / 2` values.
pub(crate) fn geglu_rows_bf16(h: &[f32], out: &mut [u16], half: usize, run: usize) {
    in_blocks(
        h,
        out,
        (half, run),
        || vec![MaybeUninit::<f32>::uninit(); run],
        |row, (a, g), o| {
            geglu_row(a, g, row);
            // SAFETY: geglu_row wrote all `half` values of `row`.
            let row = unsafe { &*(row.as_slice() as *const [MaybeUninit<f32>] as *const [f32]) };
            super::gemm::convert_bf16(row, o);
        },
    );
}

/// `each(scratch, (hidden, gate), out)` for every run of `run` values of every row of `h` (`2 * half` values,
/// hidden and gate runs alternating) and of `out` (`half`), in parallel blocks of rows, each task with its own
/// scratch from `init`.
fn in_blocks<O: Send, S>(
    h: &[f32],
    out: &mut [O],
    (half, run): (usize, usize),
    init: impl Fn() -> S + Send + Sync,
    each: impl Fn(&mut S, (&[f32], &[f32]), &mut [O]) + Send + Sync,
) {
    let width = 2 * half;
    if half == 0 {
        return;
    }
    assert!(
        run > 0 && half % run == 0,
        "GEGLU runs of {run} in rows of {half}"
    );
    // Enough rows per task to amortise it (at least 16 K outputs), few enough to balance the threads.
    let rows = (16_384 / half).max(1);
    out.par_chunks_mut(rows * half)
        .zip(h.par_chunks(rows * width))
        .for_each_init(init, |scratch, (o, h)| {
            for (o, h) in o.chunks_exact_mut(run).zip(h.chunks_exact(2 * run)) {
                each(scratch, h.split_at(run), o);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candle_geglu() {
        let dev = Device::Cpu;
        for shape in [(2, 5, 34), (1, 77, 2560), (3, 1, 2), (1, 300, 64)] {
            let h = (Tensor::randn(0f32, 1.5, shape, &dev).unwrap() + 0.3).unwrap();
            let want = reference(&h).unwrap();
            let got = geglu(&h).unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff = crate::ops::max_abs_diff(&want, &got);
            // erf within 1.5e-7 of the exact value, times |hidden * gate| / 2 (up to about 30 here).
            assert!(diff < 1e-5, "{shape:?}: max diff {diff}");
        }
        // The tails: erf saturates to +-1 (gelu(g) = g, or 0) without NaN or overflow.
        let h = Tensor::new(&[[1f32, 1., 1., 1., 9., -9., 1e30, -1e30]], &dev).unwrap();
        let got: Vec<f32> = geglu(&h).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(&got[..2], &[9.0, 0.0]);
        assert_eq!(got[2], 1e30);
        assert_eq!(got[3], 0.0);
    }

    #[test]
    fn odd_widths_are_errors() {
        let h = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(h.apply_op1_no_bwd(&GegluOp).is_err());
    }
}
