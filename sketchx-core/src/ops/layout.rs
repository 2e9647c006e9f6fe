//! Layout changes between the networks' image layout `(b, c, h, w)` and the transformers' token layout
//! `(b, h * w, c)`: a blocked transpose of each image's matrix on rayon's threads (candle's strided copy of a
//! permuted view walks the source with a large stride on one thread); and nearest-neighbour upsampling by an
//! integer factor, one parallel task per plane (candle's computes a source index per pixel on one thread).
//! Other dtypes and devices use candle.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::SendPtr;

/// `(b, c, h, w)` to `(b, h * w, c)`. Timed as `layout`.
pub fn to_tokens(x: &Tensor) -> Result<Tensor> {
    super::profile::scope("layout", || {
        let (b, c, h, w) = x.dims4()?;
        if fast(x) {
            let op = Transpose {
                rows: c,
                cols: h * w,
            };
            return x
                .contiguous()?
                .apply_op1_no_bwd(&op)?
                .reshape((b, h * w, c));
        }
        // (The reshape of the permuted view copies it into a contiguous tensor.)
        x.permute((0, 2, 3, 1))?.reshape((b, h * w, c))
    })
}

/// `(b, h * w, c)` to `(b, c, h, w)`. Timed as `layout`.
pub fn to_image(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    super::profile::scope("layout", || {
        let (b, hw, c) = x.dims3()?;
        if hw != h * w {
            candle_core::bail!("to_image: {hw} tokens for a {h}x{w} image");
        }
        if fast(x) {
            let op = Transpose { rows: hw, cols: c };
            return x.contiguous()?.apply_op1_no_bwd(&op)?.reshape((b, c, h, w));
        }
        x.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()
    })
}

/// Nearest-neighbour upsampling of `(b, c, h, w)` by the integer factor `s` along both sides, as
/// `F.interpolate(scale_factor=s, mode="nearest")`: every pixel repeated `s x s` times. Timed as `layout`.
pub fn upsample_nearest(x: &Tensor, s: usize) -> Result<Tensor> {
    super::profile::scope("layout", || {
        let (b, c, h, w) = x.dims4()?;
        if s == 1 {
            return Ok(x.clone());
        }
        if fast(x) {
            return x.contiguous()?.apply_op1_no_bwd(&Upsample { s, h, w });
        }
        // Broadcasting rather than index arithmetic: exact for any factor.
        x.reshape((b, c, h, 1, w, 1))?
            .broadcast_as((b, c, h, s, w, s))?
            .contiguous()?
            .reshape((b, c, h * s, w * s))
    })
}

fn fast(x: &Tensor) -> bool {
    super::kernels_enabled() && x.device().is_cpu() && x.dtype() == DType::F32
}

/// Each of the input's `rows x cols` matrices (the last two dimensions flattened as such) transposed: output
/// `(b, cols, rows)`.
struct Transpose {
    rows: usize,
    cols: usize,
}

/// Side of the square blocks moved at a time (a block of source rows and one of destination rows stay in L1).
const BLOCK: usize = 32;

impl CustomOp1 for Transpose {
    fn name(&self) -> &'static str {
        "sketchx-transpose"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::cpu::contiguous_f32(s, l, "transpose input")?;
        let (rows, cols) = (self.rows, self.cols);
        let per = rows * cols;
        if per == 0 || x.len() % per != 0 {
            candle_core::bail!("transpose: {} values for {rows}x{cols} matrices", x.len());
        }
        let b = x.len() / per;
        let mut out = super::cpu::output_f32(x.len());
        let stripes = cols.div_ceil(BLOCK);
        let dst = SendPtr(out.as_mut_ptr());
        // One task per stripe of BLOCK destination rows (source columns) of one image.
        (0..b * stripes).into_par_iter().for_each(|t| {
            let dst = &dst;
            let (bi, s) = (t / stripes, t % stripes);
            let (c0, c1) = (s * BLOCK, ((s + 1) * BLOCK).min(cols));
            let src = &x[bi * per..][..per];
            for r0 in (0..rows).step_by(BLOCK) {
                let r1 = (r0 + BLOCK).min(rows);
                for c in c0..c1 {
                    // SAFETY: destination row c of image bi (columns r0..r1 < rows) belongs to this task's
                    // stripe only, and lies inside `out` (b * cols * rows values).
                    let d = unsafe {
                        std::slice::from_raw_parts_mut(dst.0.add(bi * per + c * rows + r0), r1 - r0)
                    };
                    for (v, r) in d.iter_mut().zip(r0..r1) {
                        *v = src[r * cols + c];
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, cols, rows))))
    }
}

/// Nearest-neighbour upsampling of `h x w` planes by `s` (see [`upsample_nearest`]).
struct Upsample {
    s: usize,
    h: usize,
    w: usize,
}

impl CustomOp1 for Upsample {
    fn name(&self) -> &'static str {
        "sketchx-upsample-nearest"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::cpu::contiguous_f32(st, l, "upsample input")?;
        let (b, c, h, w) = l.shape().dims4()?;
        let (s, ow) = (self.s, self.w * self.s);
        if (h, w) != (self.h, self.w) || s == 0 {
            candle_core::bail!("upsample: input {h}x{w}, expected {}x{}", self.h, self.w);
        }
        let mut out = super::cpu::output_f32(x.len() * s * s);
        if !out.is_empty() {
            out.par_chunks_mut(h * s * ow)
                .zip(x.par_chunks(h * w))
                .for_each(|(dst, src)| {
                    for (rows, row) in dst.chunks_exact_mut(s * ow).zip(src.chunks_exact(w)) {
                        let (first, rest) = rows.split_at_mut(ow);
                        for (d, &v) in first.chunks_exact_mut(s).zip(row) {
                            d.fill(v);
                        }
                        for r in rest.chunks_exact_mut(ow) {
                            r.copy_from_slice(first);
                        }
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from((b, c, h * s, ow))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn round_trips_and_matches_candle() {
        let dev = Device::Cpu;
        for (b, c, h, w) in [(2, 5, 3, 7), (1, 33, 1, 1), (3, 64, 9, 5), (1, 1, 40, 2)] {
            let x = Tensor::randn(0f32, 1., (b, c, h, w), &dev).unwrap();
            let want = x
                .permute((0, 2, 3, 1))
                .unwrap()
                .reshape((b, h * w, c))
                .unwrap();
            let tokens = to_tokens(&x).unwrap();
            assert_eq!(tokens.dims(), want.dims());
            assert_eq!(crate::ops::max_abs_diff(&tokens, &want), 0.0);
            let back = to_image(&tokens, h, w).unwrap();
            assert_eq!(back.dims(), x.dims());
            assert_eq!(crate::ops::max_abs_diff(&back, &x), 0.0);
        }
        let t = Tensor::zeros((1, 6, 2), DType::F32, &dev).unwrap();
        assert!(to_image(&t, 2, 2).is_err(), "6 tokens are not a 2x2 image");
    }

    #[test]
    fn upsampling_repeats_each_pixel() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 6.0, &dev)
            .unwrap()
            .reshape((1, 1, 2, 3))
            .unwrap();
        let v = upsample_nearest(&x, 3).unwrap();
        assert_eq!(v.dims4().unwrap(), (1, 1, 6, 9));
        let v = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for y in 0..6 {
            for xx in 0..9 {
                assert_eq!(v[y * 9 + xx], ((y / 3) * 3 + xx / 3) as f32);
            }
        }
        for (b, c, h, w, s) in [
            (1, 3, 4, 5, 2),
            (2, 2, 1, 1, 3),
            (1, 1, 7, 3, 1),
            (2, 3, 3, 2, 4),
        ] {
            let x = Tensor::randn(0f32, 1., (b, c, h, w), &dev).unwrap();
            let got = upsample_nearest(&x, s).unwrap();
            // candle's broadcasting path (taken for f64) and, for factor 2 where its index arithmetic is exact,
            // candle's own upsampling.
            let plain = upsample_nearest(&x.to_dtype(DType::F64).unwrap(), s).unwrap();
            let plain = plain.to_dtype(DType::F32).unwrap();
            assert_eq!(got.dims(), &[b, c, h * s, w * s]);
            assert_eq!(
                crate::ops::max_abs_diff(&got, &plain),
                0.0,
                "{b}x{c}x{h}x{w} by {s}"
            );
            if s == 2 {
                let want = x.upsample_nearest2d(h * s, w * s).unwrap();
                assert_eq!(
                    crate::ops::max_abs_diff(&got, &want),
                    0.0,
                    "candle's upsampling"
                );
            }
        }
        let empty = Tensor::zeros((1, 0, 2, 2), DType::F32, &dev).unwrap();
        assert_eq!(upsample_nearest(&empty, 2).unwrap().dims(), &[1, 0, 4, 4]);
    }
}
