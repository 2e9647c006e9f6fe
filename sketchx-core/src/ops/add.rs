//! Residual additions (`a + b`, optionally divided by a scale) on rayon's threads.
//!
//! candle runs its element-wise CPU operations on a pool of its own whose workers spin for a while after every
//! operation; beside the kernels' rayon threads on a few cores, that spinning takes time from the next product.
//! The networks' residual additions (two same-shaped tensors) and the resnets' per-channel time-embedding shift
//! run here instead; other shapes, dtypes and devices use candle.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `(a + b) / divisor` for same-shaped tensors (`divisor` 1: a plain sum). Timed as `elementwise`.
pub fn add(a: &Tensor, b: &Tensor, divisor: f64) -> Result<Tensor> {
    super::profile::scope("elementwise", || {
        if super::kernels_enabled()
            && a.device().is_cpu()
            && b.device().is_cpu()
            && a.dtype() == DType::F32
            && b.dtype() == DType::F32
            && a.dims() == b.dims()
        {
            let op = AddOp(Divisor::new(divisor));
            return a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &op);
        }
        reference(a, b, divisor)
    })
}

/// `h + t[:, :, None, None]`: a per-image, per-channel shift of `h` `(b, c, ...)` by `t` `(b, c)` (the time
/// embedding's projection in every resnet). Timed as `elementwise`.
pub fn add_channels(h: &Tensor, t: &Tensor) -> Result<Tensor> {
    super::profile::scope("elementwise", || {
        let dims = h.dims();
        if super::kernels_enabled()
            && h.device().is_cpu()
            && t.device().is_cpu()
            && h.dtype() == DType::F32
            && t.dtype() == DType::F32
            && dims.len() >= 2
            && t.dims() == &dims[..2]
        {
            return h
                .contiguous()?
                .apply_op2_no_bwd(&t.contiguous()?, &ChannelAddOp);
        }
        let mut shape = t.dims().to_vec();
        shape.resize(dims.len(), 1);
        h.broadcast_add(&t.reshape(shape)?)
    })
}

/// The per-channel shift: one parallel task per (image, channel) plane.
#[derive(Debug, Clone, Copy)]
struct ChannelAddOp;

impl CustomOp2 for ChannelAddOp {
    fn name(&self) -> &'static str {
        "sketchx-add-channels"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let h = super::cpu::contiguous_f32(s1, l1, "shifted tensor")?;
        let t = super::cpu::contiguous_f32(s2, l2, "per-channel shift")?;
        if t.is_empty() || h.len() % t.len() != 0 {
            candle_core::bail!(
                "per-channel shift: {} values for {} elements",
                t.len(),
                h.len()
            );
        }
        let plane = h.len() / t.len();
        // Never zeroed: every plane is written (below).
        let mut out = super::cpu::output_uninit_f32(h.len());
        if plane > 0 {
            out.spare_capacity_mut()[..h.len()]
                .par_chunks_mut(plane)
                .zip(h.par_chunks(plane))
                .zip(t.par_iter())
                .for_each(|((o, h), &t)| {
                    for (o, &h) in o.iter_mut().zip(h) {
                        o.write(h + t);
                    }
                });
        }
        // SAFETY: the planes cover all `h.len()` values (t.len() planes of `plane`), each written in full.
        unsafe { out.set_len(h.len()) };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// candle's `(a + b) / divisor`: what [`add`] computes.
pub fn reference(a: &Tensor, b: &Tensor, divisor: f64) -> Result<Tensor> {
    let sum = (a + b)?;
    if divisor == 1.0 {
        Ok(sum)
    } else {
        sum / divisor
    }
}

/// The kernel: one pass, in parallel chunks.
#[derive(Debug, Clone, Copy)]
struct AddOp(Divisor);

/// `(a + b) / divisor` as candle computes it (a multiplication by the inverse, skipped for a divisor of 1): for
/// [`add`] and the additions fused into other ops' outputs, so that both give the same bits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Divisor {
    scale: f32,
    divide: bool,
}

impl Divisor {
    pub(crate) fn new(divisor: f64) -> Self {
        Self {
            scale: (1.0 / divisor) as f32,
            divide: divisor != 1.0,
        }
    }

    /// `(a + b) / divisor`.
    #[inline(always)]
    pub(crate) fn sum(self, a: f32, b: f32) -> f32 {
        if self.divide {
            (a + b) * self.scale
        } else {
            a + b
        }
    }
}

impl CustomOp2 for AddOp {
    fn name(&self) -> &'static str {
        "sketchx-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = super::cpu::contiguous_f32(s1, l1, "addition's left operand")?;
        let b = super::cpu::contiguous_f32(s2, l2, "addition's right operand")?;
        if a.len() != b.len() {
            candle_core::bail!("addition: {} and {} elements", a.len(), b.len());
        }
        // Never zeroed: every value is written (below).
        let mut out = super::cpu::output_uninit_f32(a.len());
        const CHUNK: usize = 1 << 15;
        let d = self.0;
        out.spare_capacity_mut()[..a.len()]
            .par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
            .for_each(|(o, (a, b))| {
                for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                    o.write(d.sum(a, b));
                }
            });
        // SAFETY: the chunks cover all `a.len()` values (as many as `b`), each written.
        unsafe { out.set_len(a.len()) };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candle() {
        let dev = Device::Cpu;
        for (shape, divisor) in [
            ((2, 3, 5, 7), 1.0),
            ((1, 320, 33, 17), 2.0),
            ((2, 1, 1, 1), 1.0 / 3.0),
        ] {
            let a = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
            let want = reference(&a, &b, divisor).unwrap();
            let got = add(&a, &b, divisor).unwrap();
            assert_eq!(got.dims(), want.dims());
            assert_eq!(
                crate::ops::max_abs_diff(&want, &got),
                0.0,
                "{shape:?} / {divisor}"
            );
        }
        let h = Tensor::randn(0f32, 1.0, (2, 5, 3, 7), &dev).unwrap();
        let t = Tensor::randn(0f32, 1.0, (2, 5), &dev).unwrap();
        let want = h
            .broadcast_add(&t.unsqueeze(2).unwrap().unsqueeze(3).unwrap())
            .unwrap();
        assert_eq!(
            crate::ops::max_abs_diff(&want, &add_channels(&h, &t).unwrap()),
            0.0
        );
        // A strided operand is made contiguous first.
        let a = Tensor::randn(0f32, 1.0, (4, 6), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (6, 4), &dev).unwrap().t().unwrap();
        let want = reference(&a, &b, 1.0).unwrap();
        assert_eq!(
            crate::ops::max_abs_diff(&want, &add(&a, &b, 1.0).unwrap()),
            0.0
        );
    }
}
