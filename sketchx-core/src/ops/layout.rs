//! Layout changes between the networks' image layout `(b, c, h, w)` and the transformers' token layout
//! `(b, h * w, c)`: a blocked transpose of each image's matrix on rayon's threads (candle's strided copy of a
//! permuted view walks the source with a large stride on one thread). Other dtypes and devices use candle.

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
        let mut out = vec![0f32; x.len()];
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
}
