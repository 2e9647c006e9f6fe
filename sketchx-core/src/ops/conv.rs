//! Convolution as im2col + one GEMM per image, replacing candle's CPU conv2d for f32.
//!
//! candle 0.11's CPU conv2d re-flattens the kernel on every call, converts the input to NHWC serially and scatters
//! its im2col tiles; here the kernel is used as stored (`[c_out, c_in * kh * kw]` is already the GEMM's left
//! matrix), im2col writes whole shifted rows in parallel (`[c_in * kh * kw, h_out * w_out]`, output lands in NCHW
//! directly), and the bias is the GEMM's initial destination. Other dtypes and devices use candle's conv2d.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::Conv2d;
use rayon::prelude::*;

/// A 2-D convolution (with bias) that runs [`Conv2dOp`] on f32 CPU tensors and candle's conv2d otherwise.
#[derive(Debug, Clone)]
pub struct FastConv2d {
    inner: Conv2d,
    op: Option<Conv2dOp>,
}

impl FastConv2d {
    /// Wraps a candle convolution (groups 1, dilation 1; others always use candle).
    pub fn new(inner: Conv2d) -> Self {
        let cfg = inner.config();
        let op =
            (cfg.groups == 1 && cfg.dilation == 1 && inner.bias().is_some()).then_some(Conv2dOp {
                stride: cfg.stride,
                padding: cfg.padding,
            });
        Self { inner, op }
    }

    /// The kernel `[c_out, c_in, kh, kw]`.
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    /// The wrapped candle convolution.
    pub fn inner(&self) -> &Conv2d {
        &self.inner
    }
}

impl Module for FastConv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match (&self.op, self.inner.bias()) {
            (Some(op), Some(bias))
                if super::kernels_enabled()
                    && xs.device().is_cpu()
                    && xs.dtype() == DType::F32
                    && self.inner.weight().dtype() == DType::F32 =>
            {
                xs.contiguous()?
                    .apply_op3_no_bwd(self.inner.weight(), bias, op)
            }
            _ => self.inner.forward(xs),
        }
    }
}

/// The im2col + GEMM convolution of an f32 input `(b, c_in, h, w)` with a kernel and a bias.
#[derive(Debug, Clone, Copy)]
pub struct Conv2dOp {
    /// Stride along both axes.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: expected f32");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "sketchx-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "conv input")?;
        let w = f32_slice(s2, l2, "conv kernel")?;
        let bias = f32_slice(s3, l3, "conv bias")?;
        let (b, cin, h, wd) = l1.shape().dims4()?;
        let (cout, wcin, kh, kw) = l2.shape().dims4()?;
        if wcin != cin || bias.len() != cout {
            candle_core::bail!(
                "conv: input has {cin} channels, kernel {wcin}, bias {}",
                bias.len()
            );
        }
        let (s, p) = (self.stride, self.padding);
        if h + 2 * p < kh || wd + 2 * p < kw {
            candle_core::bail!("conv: kernel larger than the padded input");
        }
        let oh = (h + 2 * p - kh) / s + 1;
        let ow = (wd + 2 * p - kw) / s + 1;
        let n = oh * ow;
        let k = cin * kh * kw;
        let direct = kh == 1 && kw == 1 && s == 1 && p == 0;
        let mut col = if direct {
            Vec::new()
        } else {
            vec![0f32; k * n]
        };
        let mut out = vec![0f32; b * cout * n];
        for bi in 0..b {
            let xb = &x[bi * cin * h * wd..(bi + 1) * cin * h * wd];
            let rhs: &[f32] = if direct {
                xb
            } else {
                im2col(xb, &mut col, (cin, h, wd), (kh, kw), (s, p), (oh, ow));
                &col
            };
            let ob = &mut out[bi * cout * n..(bi + 1) * cout * n];
            ob.par_chunks_mut(n)
                .zip(bias.par_iter())
                .for_each(|(row, &bv)| row.fill(bv));
            // SAFETY: the slices have the sizes the strides describe: dst [cout, n], lhs [cout, k], rhs [k, n].
            unsafe {
                gemm::gemm(
                    cout,
                    n,
                    k,
                    ob.as_mut_ptr(),
                    1,
                    n as isize,
                    true,
                    w.as_ptr(),
                    1,
                    k as isize,
                    rhs.as_ptr(),
                    1,
                    n as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism(),
                );
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, cout, oh, ow))))
    }
}

/// gemm's parallelism over candle's thread count.
pub(crate) fn parallelism() -> gemm::Parallelism {
    let t = candle_core::utils::get_num_threads();
    if t > 1 {
        gemm::Parallelism::Rayon(t)
    } else {
        gemm::Parallelism::None
    }
}

/// Writes the patches of one image `x` `(cin, h, w)` into `col` `[cin * kh * kw, oh * ow]`, zeros for padding.
fn im2col(
    x: &[f32],
    col: &mut [f32],
    (_, h, w): (usize, usize, usize),
    (kh, kw): (usize, usize),
    (s, p): (usize, usize),
    (oh, ow): (usize, usize),
) {
    let n = oh * ow;
    col.par_chunks_mut(n).enumerate().for_each(|(r, row)| {
        let c = r / (kh * kw);
        let dy = (r / kw) % kh;
        let dx = r % kw;
        let plane = &x[c * h * w..(c + 1) * h * w];
        // Output columns whose input column ix = ox * s + dx - p lies inside [0, w).
        let ox_lo = p.saturating_sub(dx).div_ceil(s).min(ow);
        let ox_hi = if w + p > dx {
            ((w + p - dx - 1) / s + 1).min(ow)
        } else {
            0
        }
        .max(ox_lo);
        for oy in 0..oh {
            let dst = &mut row[oy * ow..(oy + 1) * ow];
            let iy = (oy * s + dy) as isize - p as isize;
            if iy < 0 || iy >= h as isize {
                dst.fill(0.0);
                continue;
            }
            let src = &plane[iy as usize * w..(iy as usize + 1) * w];
            dst[..ox_lo].fill(0.0);
            dst[ox_hi..].fill(0.0);
            if s == 1 {
                let ix0 = ox_lo + dx - p;
                dst[ox_lo..ox_hi].copy_from_slice(&src[ix0..ix0 + (ox_hi - ox_lo)]);
            } else {
                for (ox, d) in dst.iter_mut().enumerate().take(ox_hi).skip(ox_lo) {
                    *d = src[ox * s + dx - p];
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::{Conv2dConfig, VarBuilder, VarMap};

    fn check(cin: usize, cout: usize, k: usize, stride: usize, padding: usize, h: usize, w: usize) {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let cfg = Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        let conv = candle_nn::conv2d(cin, cout, k, cfg, vb).unwrap();
        // A non-zero bias so that it is checked too.
        let conv = Conv2d::new(
            conv.weight().clone(),
            Some(Tensor::randn(0f32, 1., cout, &dev).unwrap()),
            cfg,
        );
        let xs = Tensor::randn(0f32, 1., (2, cin, h, w), &dev).unwrap();
        let want = conv.forward(&xs).unwrap();
        let got = FastConv2d::new(conv).forward(&xs).unwrap();
        assert_eq!(want.dims(), got.dims());
        let diff = crate::ops::max_abs_diff(&want, &got);
        assert!(
            diff < 1e-4,
            "cin {cin} cout {cout} k {k} s {stride} p {padding} {h}x{w}: max diff {diff}"
        );
    }

    #[test]
    fn matches_candle_conv2d() {
        check(5, 7, 3, 1, 1, 9, 11);
        check(5, 7, 3, 2, 1, 9, 11);
        check(5, 7, 3, 2, 0, 10, 10);
        check(4, 6, 1, 1, 0, 7, 5);
        check(3, 8, 3, 1, 1, 1, 1);
        check(16, 32, 3, 2, 1, 16, 16);
    }
}
