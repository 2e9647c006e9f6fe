//! Group normalisation fused with the SiLU that follows it in every resnet, in one pass per group; layer
//! normalisation (the transformers') row by row on rayon's threads.
//!
//! candle's `GroupNorm` runs about ten tensor operations (mean, subtract, square, mean, sqrt, divide, scale,
//! shift), each a full pass over memory, and the SiLU is one more. Here each (image, group) is one parallel task:
//! the sum and the sum of squares accumulated in f64 in one pass (a VAE's groups at 512x512 are 4 MiB, past the
//! L2 cache, so every pass is one over memory), then `y = x * a_c + b_c` per channel with the SiLU applied in the
//! same write. Non-f32 or non-CPU tensors use candle. A convolution that runs channels last takes the norm's
//! per-channel parameters instead ([`ChannelNorm`]) and applies them while it reads its input, as does a
//! transformer's projection in, whose tokens are written from the input with the norm applied.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::{GroupNorm, VarBuilder};
use rayon::prelude::*;

use super::gemm::convert_bf16_uninit;
use super::simd::{affine_silu_into, layer_norm_row, sum_sq_f64};

/// diffusers' `GroupNorm` (affine), optionally followed by SiLU.
#[derive(Debug, Clone)]
pub struct FastGroupNorm {
    weight: Tensor,
    bias: Tensor,
    inner: GroupNorm,
    groups: usize,
    eps: f64,
}

impl FastGroupNorm {
    /// Loads `weight` and `bias` of `channels` channels from `vb`, like `candle_nn::group_norm`.
    pub fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
        let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
        let inner = GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
        Ok(Self {
            weight,
            bias,
            inner,
            groups,
            eps,
        })
    }

    /// Normalises `xs` `(b, c, ...)`, then applies SiLU.
    pub fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        self.run(xs, true)
    }

    /// Normalises `xs` `(b, c, ...)`; applies SiLU afterwards when `silu`. Timed as `group_norm`.
    pub fn run(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        super::profile::scope("group_norm", || self.run_untimed(xs, silu))
    }

    fn run_untimed(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        if super::kernels_enabled()
            && xs.device().is_cpu()
            && xs.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
        {
            let op = GroupNormOp {
                groups: self.groups,
                eps: self.eps,
                silu,
            };
            return xs
                .contiguous()?
                .apply_op3_no_bwd(&self.weight, &self.bias, &op);
        }
        self.reference(xs, silu)
    }

    /// This norm as the per-channel parameters a consumer applies on the fly (with the SiLU after it,
    /// [`super::conv::FastConv2d::forward_norm_silu`]; without, [`Self::forward_tokens_bf16`]); `None`
    /// where [`Self::run`] would not run the CPU kernel.
    pub(crate) fn channel_norm(&self) -> Result<Option<ChannelNorm>> {
        if !super::kernels_enabled()
            || self.weight.dtype() != DType::F32
            || self.bias.dtype() != DType::F32
            || !self.weight.device().is_cpu()
        {
            return Ok(None);
        }
        Ok(Some(ChannelNorm {
            weight: self.weight.flatten_all()?.to_vec1()?,
            bias: self.bias.flatten_all()?.to_vec1()?,
            groups: self.groups,
            eps: self.eps,
        }))
    }

    /// [`Module::forward`] of `xs` `(b, c, h, w)` as tokens `(b, h * w, c)` rounded to bf16, for a layer that takes
    /// bf16 ([`super::linear::FastLinear::takes_bf16`]): the statistics, then the normalised values written
    /// straight into the tokens ([`super::layout::to_tokens_normed_bf16`]) instead of the norm, the transpose and
    /// the layer's rounding apart, with the same bits. `None` where the CPU kernel would not run (then the caller
    /// takes those three steps). Timed as `group_norm`.
    pub fn forward_tokens_bf16(&self, xs: &Tensor) -> Result<Option<Tensor>> {
        super::profile::scope("group_norm", || {
            let Some(norm) = self.channel_norm()? else {
                return Ok(None);
            };
            if !xs.device().is_cpu() || xs.dtype() != DType::F32 || xs.rank() != 4 {
                return Ok(None);
            }
            super::layout::to_tokens_normed_bf16(xs, &norm).map(Some)
        })
    }

    /// candle's group norm (and SiLU): what [`Self::run`] computes, the slow way.
    pub fn reference(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        let y = self.inner.forward(xs)?;
        if silu {
            candle_nn::ops::silu(&y)
        } else {
            Ok(y)
        }
    }
}

impl Module for FastGroupNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.run(xs, false)
    }
}

/// A group norm (affine), with the SiLU after it where the consumer says so, for a consumer that applies it while
/// it reads its input, so that the normalised tensor is never stored.
#[derive(Debug, Clone)]
pub(crate) struct ChannelNorm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    groups: usize,
    eps: f64,
}

impl ChannelNorm {
    /// `(a, b)` for every (image, channel) of `x` (`b` images of `c` channels of `spatial` values), so that the
    /// normalised value is `x * a + b` (then SiLU, [`affine_silu`](super::simd::affine_silu)): the statistics pass of [`GroupNormOp`], one
    /// parallel task per (image, group), with the same arithmetic.
    pub(crate) fn channel_affine(
        &self,
        x: &[f32],
        b: usize,
        c: usize,
        spatial: usize,
    ) -> Result<Vec<(f32, f32)>> {
        let shape = || format!("{} values for {b}x{c}x{spatial}", x.len());
        let params = (self.weight.len(), self.bias.len(), self.groups);
        let cpg = channels_per_group(c, params, x.len() != b * c * spatial, shape)?;
        let glen = cpg * spatial;
        let mut out = vec![(0f32, 0f32); b * c];
        if glen == 0 {
            return Ok(out);
        }
        out.par_chunks_mut(cpg)
            .zip(x.par_chunks(glen))
            .enumerate()
            .for_each(|(gi, (ab, src))| {
                let g = gi % self.groups;
                let (mean, rstd) = group_stats(src, self.eps);
                for (ci, ab) in ab.iter_mut().enumerate() {
                    *ab = channel_ab(
                        mean,
                        rstd,
                        self.weight[g * cpg + ci],
                        self.bias[g * cpg + ci],
                    );
                }
            });
        Ok(out)
    }

    /// [`Self::channel_affine`] of `x` laid out channels last (`b` images of `spatial` positions of `c` channels):
    /// the same statistics (sums in f64), summed per channel over runs of positions in parallel and then per
    /// group, so only the order of the f64 additions differs.
    pub(crate) fn channel_affine_last(
        &self,
        x: &[f32],
        b: usize,
        c: usize,
        spatial: usize,
    ) -> Result<Vec<(f32, f32)>> {
        let shape = || format!("{} values for {b}x{spatial}x{c} (channels last)", x.len());
        let params = (self.weight.len(), self.bias.len(), self.groups);
        let cpg = channels_per_group(c, params, x.len() != b * c * spatial, shape)?;
        let mut out = vec![(0f32, 0f32); b * c];
        if cpg == 0 || spatial == 0 {
            return Ok(out);
        }
        // Runs of positions small enough to spread over the threads, large enough that the per-run sums are few.
        let run = spatial
            .div_ceil(4 * rayon::current_num_threads().max(1))
            .max(64);
        for (bi, ab) in out.chunks_mut(c).enumerate() {
            let img = &x[bi * spatial * c..(bi + 1) * spatial * c];
            let sums = img
                .par_chunks(run * c)
                .map(|rows| {
                    let mut s = vec![0f64; 2 * c];
                    let (s1, s2) = s.split_at_mut(c);
                    for row in rows.chunks_exact(c) {
                        for ((a, a2), &v) in s1.iter_mut().zip(s2.iter_mut()).zip(row) {
                            let v = v as f64;
                            *a += v;
                            *a2 += v * v;
                        }
                    }
                    s
                })
                .reduce(
                    || vec![0f64; 2 * c],
                    |mut a, b| {
                        a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                        a
                    },
                );
            let n = (cpg * spatial) as f64;
            for g in 0..self.groups {
                let range = g * cpg..(g + 1) * cpg;
                let sum: f64 = sums[range.clone()].iter().sum();
                let sum_sq: f64 = sums[c + range.start..c + range.end].iter().sum();
                let (mean, rstd) = stats_from_sums(sum, sum_sq, n, self.eps);
                for ci in range {
                    ab[ci] = channel_ab(mean, rstd, self.weight[ci], self.bias[ci]);
                }
            }
        }
        Ok(out)
    }
}

/// The channels per group of a group norm over `c` channels with `(weights, biases, groups)`; an error that names
/// the input (`shape()`) where they do not fit (or `mismatch` says the input's values do not).
fn channels_per_group(
    c: usize,
    (weights, biases, groups): (usize, usize, usize),
    mismatch: bool,
    shape: impl FnOnce() -> String,
) -> Result<usize> {
    if mismatch || groups == 0 || c != weights || c != biases || !c.is_multiple_of(groups) {
        candle_core::bail!(
            "group norm: input {}, {weights} weights, {biases} biases, {groups} groups",
            shape()
        );
    }
    Ok(c / groups)
}

/// The mean and `1 / sqrt(var + eps)` of a group's values (sums in f64, one pass).
fn group_stats(src: &[f32], eps: f64) -> (f64, f64) {
    let (sum, sum_sq) = sum_sq_f64(src);
    stats_from_sums(sum, sum_sq, src.len() as f64, eps)
}

/// The mean and `1 / sqrt(var + eps)` of `n` values from their sum and sum of squares.
fn stats_from_sums(sum: f64, sum_sq: f64, n: f64, eps: f64) -> (f64, f64) {
    let mean = sum / n;
    let var = (sum_sq / n - mean * mean).max(0.0);
    (mean, 1.0 / (var + eps).sqrt())
}

/// A channel's `(a, b)` of `x * a + b` from its group's statistics and its weight and bias.
fn channel_ab(mean: f64, rstd: f64, w: f32, bias: f32) -> (f32, f32) {
    let a = rstd * w as f64;
    (a as f32, (bias as f64 - mean * a) as f32)
}

/// The fused kernel (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct GroupNormOp {
    /// Number of groups the channels are split into.
    pub groups: usize,
    /// Added to the variance.
    pub eps: f64,
    /// Whether SiLU follows.
    pub silu: bool,
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "sketchx-group-norm"
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
        let x = super::cpu::contiguous_f32(s1, l1, "group norm input")?;
        let w = super::cpu::contiguous_f32(s2, l2, "group norm weight")?;
        let bias = super::cpu::contiguous_f32(s3, l3, "group norm bias")?;
        let dims = l1.shape().dims();
        let c = dims.get(1).copied().unwrap_or(0);
        let params = (w.len(), bias.len(), self.groups);
        let cpg = channels_per_group(c, params, dims.len() < 2, || format!("{dims:?}"))?;
        let spatial: usize = dims[2..].iter().product();
        let glen = cpg * spatial;
        if glen == 0 {
            // No channels or no positions: nothing to normalise (and no values).
            return Ok((CpuStorage::F32(Vec::new()), l1.shape().clone()));
        }
        // Never zeroed: every group's values are written below.
        let mut out = super::cpu::output_uninit_f32(x.len());
        out.spare_capacity_mut()[..x.len()]
            .par_chunks_mut(glen)
            .zip(x.par_chunks(glen))
            .enumerate()
            .for_each(|(gi, (dst, src))| {
                let g = gi % self.groups;
                let (mean, rstd) = group_stats(src, self.eps);
                for ci in 0..cpg {
                    let ch = g * cpg + ci;
                    let (a, b) = channel_ab(mean, rstd, w[ch], bias[ch]);
                    let r = ci * spatial..(ci + 1) * spatial;
                    affine_silu_into(&src[r.clone()], &mut dst[r], a, b, self.silu);
                }
            });
        // SAFETY: the groups (x.len() / glen of them, glen values each) cover the x.len() values, all written.
        unsafe { out.set_len(x.len()) };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// diffusers' `LayerNorm` over the last dimension (affine). f32 CPU tensors use [`LayerNormOp`]: candle's runs
/// one task per row with its sums in one f32 accumulator (not vectorised, and `E[x^2] - E[x]^2`); others candle's.
#[derive(Debug, Clone)]
pub struct FastLayerNorm {
    weight: Tensor,
    bias: Tensor,
    inner: candle_nn::LayerNorm,
    eps: f64,
}

impl FastLayerNorm {
    /// Loads `weight` and `bias` of `dim` values from `vb`, like `candle_nn::layer_norm`.
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let inner = candle_nn::layer_norm(dim, eps, vb)?;
        let bias = match inner.bias() {
            Some(b) => b.clone(),
            None => inner.weight().zeros_like()?,
        };
        Ok(Self {
            weight: inner.weight().clone(),
            bias,
            inner,
            eps,
        })
    }

    /// candle's layer norm: what [`Module::forward`] computes, the slow way.
    pub fn reference(&self, xs: &Tensor) -> Result<Tensor> {
        self.inner.forward(xs)
    }
}

impl FastLayerNorm {
    /// [`Module::forward`], its values rounded to bf16 (a BF16 tensor, the same bits as rounding the f32 result)
    /// where the kernel runs: for consumers that round their input to bf16 anyway
    /// ([`super::linear::FastLinear::takes_bf16`]). Elsewhere the f32 result.
    pub fn forward_bf16(&self, xs: &Tensor) -> Result<Tensor> {
        self.run(xs, true)
    }

    fn run(&self, xs: &Tensor, bf16: bool) -> Result<Tensor> {
        super::profile::scope("layer_norm", || {
            if super::kernels_enabled()
                && xs.device().is_cpu()
                && xs.dtype() == DType::F32
                && self.weight.dtype() == DType::F32
                && self.bias.dtype() == DType::F32
            {
                let op = LayerNormOp {
                    eps: self.eps,
                    bf16,
                };
                let out = xs
                    .contiguous()?
                    .apply_op3_no_bwd(&self.weight, &self.bias, &op)?;
                return if bf16 {
                    super::cpu::lined_view(&out, xs.dims())
                } else {
                    Ok(out)
                };
            }
            self.reference(xs)
        })
    }
}

impl Module for FastLayerNorm {
    /// Normalises `xs` over its last dimension. Timed as `layer_norm`.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.run(xs, false)
    }
}

/// The layer norm kernel: blocks of rows in parallel, each row by [`layer_norm_row`].
#[derive(Debug, Clone, Copy)]
pub struct LayerNormOp {
    /// Added to the variance.
    pub eps: f64,
    /// Output in bf16 (each row computed in f32, then rounded to nearest even), lined for the AMX products that
    /// read it ([`super::cpu::Out`]: the result is the whole vector, [`FastLayerNorm::forward_bf16`] its view).
    pub bf16: bool,
}

/// Values per parallel task (enough to amortise a task, few enough to balance the threads).
const LAYER_NORM_BLOCK: usize = 1 << 14;

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "sketchx-layer-norm"
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
        let x = super::cpu::contiguous_f32(s1, l1, "layer norm input")?;
        let w = super::cpu::contiguous_f32(s2, l2, "layer norm weight")?;
        let bias = super::cpu::contiguous_f32(s3, l3, "layer norm bias")?;
        let dim = l1.shape().dims().last().copied().unwrap_or(0);
        if dim == 0 || w.len() != dim || bias.len() != dim {
            candle_core::bail!(
                "layer norm: input {:?}, {} weights, {} biases",
                l1.shape(),
                w.len(),
                bias.len()
            );
        }
        let rows = (LAYER_NORM_BLOCK / dim).max(1) * dim;
        let eps = self.eps as f32;
        if self.bf16 {
            // Never zeroed: every row is written (below).
            let mut out = super::cpu::Out::<half::bf16>::uninit(x.len(), true);
            let spare = out.spare();
            // SAFETY: bf16 is a u16 bit pattern (the same size and alignment); nothing is read through the view.
            let spare = unsafe {
                &mut *(spare as *mut [std::mem::MaybeUninit<half::bf16>]
                    as *mut [std::mem::MaybeUninit<u16>])
            };
            spare
                .par_chunks_mut(rows)
                .zip(x.par_chunks(rows))
                .for_each_init(
                    || vec![0f32; dim],
                    |row, (dst, src)| {
                        for (d, s) in dst.chunks_exact_mut(dim).zip(src.chunks_exact(dim)) {
                            layer_norm_row(s, row, w, bias, eps);
                            convert_bf16_uninit(row, d);
                        }
                    },
                );
            // SAFETY: every row of the output was written above (the chunks cover all `x.len()` values).
            let (v, shape) = unsafe { out.finish(l1.shape().clone()) };
            return Ok((CpuStorage::BF16(v), shape));
        }
        let mut out = super::cpu::output_f32(x.len());
        out.par_chunks_mut(rows)
            .zip(x.par_chunks(rows))
            .for_each(|(dst, src)| {
                for (d, s) in dst.chunks_exact_mut(dim).zip(src.chunks_exact(dim)) {
                    layer_norm_row(s, d, w, bias, eps);
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    /// A group norm of `c` channels in `groups` groups with random weights (around 1) and biases (around 0).
    fn random_group_norm(groups: usize, c: usize) -> FastGroupNorm {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let mut gn = FastGroupNorm::new(groups, c, 1e-5, vb).unwrap();
        gn.weight = Tensor::randn(1f32, 0.5, c, &dev).unwrap();
        gn.bias = Tensor::randn(0f32, 0.5, c, &dev).unwrap();
        gn.inner = GroupNorm::new(gn.weight.clone(), gn.bias.clone(), c, groups, 1e-5).unwrap();
        gn
    }

    #[test]
    fn matches_group_norm_in_f64() {
        let dev = Device::Cpu;
        for (groups, c, h, w, silu, offset) in [
            (4, 8, 5, 7, false, 3.0),
            (4, 8, 5, 7, true, 3.0),
            (32, 64, 3, 3, true, 3.0),
            (2, 6, 1, 1, true, 3.0),
            (4, 8, 16, 16, false, 100.0),
        ] {
            let gn = random_group_norm(groups, c);
            // An offset mean checks the variance's cancellation (at 100, an f32 E[x^2] - E[x]^2 would be off by
            // ~1e-3; the affine form x a + b, torch's too, by up to ~2e-5). The reference runs in f64.
            let xs = (Tensor::randn(0f32, 2., (2, c, h, w), &dev).unwrap() + offset).unwrap();
            let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let mut exact = gn.clone();
            exact.inner =
                GroupNorm::new(f64s(&gn.weight), f64s(&gn.bias), c, groups, 1e-5).unwrap();
            let want = exact
                .reference(&f64s(&xs), silu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let got = gn.run(&xs, silu).unwrap();
            let diff = crate::ops::max_abs_diff(&want, &got);
            // The affine form's roundings grow with the offset (x a and b are ~offset in size).
            let bound = 1e-5 + 3e-7 * offset as f32;
            assert!(
                diff < bound,
                "groups {groups} c {c} {h}x{w} silu {silu}: max diff {diff}"
            );
        }
    }

    /// The norm written straight into bf16 tokens gives the bits of the norm, the transpose and the rounding
    /// apart: on whole 16 x 16 blocks, on channels and positions that fill none (the scalar edges), and on the
    /// portable path.
    #[test]
    fn tokens_from_the_norm_are_the_three_steps() {
        let dev = Device::Cpu;
        for (groups, c, h, w) in [
            (32, 64, 8, 8),
            (4, 40, 5, 7),
            (32, 320, 16, 16),
            (2, 18, 4, 5),
        ] {
            let gn = random_group_norm(groups, c);
            let xs = (Tensor::randn(0f32, 2., (2, c, h, w), &dev).unwrap() + 0.7).unwrap();
            let bits = |t: &Tensor| {
                assert_eq!(t.dtype(), DType::BF16);
                t.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>()
            };
            let check = |what: &str| {
                let normed = gn.forward(&xs).unwrap();
                let want = crate::ops::layout::to_tokens(&normed)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap();
                let got = gn
                    .forward_tokens_bf16(&xs)
                    .unwrap()
                    .expect("the kernel runs");
                assert_eq!(got.dims(), [2, h * w, c]);
                assert!(
                    bits(&got) == bits(&want),
                    "{what}: {groups} groups, {c} channels, {h}x{w}"
                );
            };
            crate::ops::cpu::detected_only(|| check("detected"));
            crate::ops::cpu::force_portable(|| check("portable"));
        }
    }

    /// Parameters that do not fit the input (channels, weights, biases, groups, zero groups, values) are errors
    /// naming the shapes, from the op and from the fused norm alike, never a panic.
    #[test]
    fn mismatched_group_norms_are_errors() {
        let dev = Device::Cpu;
        let xs = Tensor::zeros((2, 8, 3, 3), DType::F32, &dev).unwrap();
        let v = |n: usize| Tensor::ones(n, DType::F32, &dev).unwrap();
        for (groups, w, b) in [(4, 6, 8), (4, 8, 6), (3, 8, 8), (0, 8, 8)] {
            let op = GroupNormOp {
                groups,
                eps: 1e-5,
                silu: true,
            };
            let err = xs
                .apply_op3_no_bwd(&v(w), &v(b), &op)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("group norm") && err.contains("[2, 8, 3, 3]"),
                "{err}"
            );
            let norm = ChannelNorm {
                weight: vec![1.0; w],
                bias: vec![0.0; b],
                groups,
                eps: 1e-5,
            };
            assert!(norm.channel_affine(&[0.0; 144], 2, 8, 9).is_err());
        }
        let norm = ChannelNorm {
            weight: vec![1.0; 8],
            bias: vec![0.0; 8],
            groups: 4,
            eps: 1e-5,
        };
        assert!(norm.channel_affine(&[0.0; 144], 2, 8, 9).is_ok());
        let err = norm
            .channel_affine(&[0.0; 143], 2, 8, 9)
            .unwrap_err()
            .to_string();
        assert!(err.contains("143 values for 2x8x9"), "{err}");
    }

    /// The statistics of a channels-last input are those of the same values channels first (only the f64 sums'
    /// order differs); mismatched inputs are errors there too.
    #[test]
    fn channels_last_statistics_match() {
        let dev = Device::Cpu;
        for (groups, c, h, w, offset) in [
            (4, 8, 5, 7, 3.0),
            (32, 64, 3, 3, 0.0),
            (7, 21, 33, 6, 100.0),
        ] {
            let norm = ChannelNorm {
                weight: Tensor::randn(1f32, 0.5, c, &dev)
                    .unwrap()
                    .to_vec1()
                    .unwrap(),
                bias: Tensor::randn(0f32, 0.5, c, &dev)
                    .unwrap()
                    .to_vec1()
                    .unwrap(),
                groups,
                eps: 1e-5,
            };
            let xs = (Tensor::randn(0f32, 2., (2, c, h, w), &dev).unwrap() + offset).unwrap();
            let planar: Vec<f32> = xs.flatten_all().unwrap().to_vec1().unwrap();
            let last = xs.permute((0, 2, 3, 1)).unwrap().flatten_all().unwrap();
            let last: Vec<f32> = last.to_vec1().unwrap();
            let want = norm.channel_affine(&planar, 2, c, h * w).unwrap();
            let got = norm.channel_affine_last(&last, 2, c, h * w).unwrap();
            for (i, ((a0, b0), (a1, b1))) in want.iter().zip(&got).enumerate() {
                let close =
                    |x: f32, y: f32| (x - y).abs() <= 1e-6 * (1.0 + x.abs() * offset as f32);
                assert!(
                    close(*a0, *a1) && close(*b0, *b1),
                    "channel {i}: {:?} vs {:?}",
                    (a0, b0),
                    (a1, b1)
                );
            }
            let err = norm
                .channel_affine_last(&last[1..], 2, c, h * w)
                .unwrap_err();
            assert!(err.to_string().contains("channels last"), "{err}");
        }
    }

    #[test]
    fn layer_norm_matches_f64() {
        let dev = Device::Cpu;
        for (rows, dim, offset) in [(3, 5, 0.0), (70, 320, 3.0), (2, 17, 100.0), (1, 1, 0.0)] {
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
            let mut ln = FastLayerNorm::new(dim, 1e-5, vb).unwrap();
            ln.weight = Tensor::randn(1f32, 0.5, dim, &dev).unwrap();
            ln.bias = Tensor::randn(0f32, 0.5, dim, &dev).unwrap();
            let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let xs = (Tensor::randn(0f32, 2., (2, rows, dim), &dev).unwrap() + offset).unwrap();
            // The definition, in f64 (candle's own kernel has no f64).
            let x = f64s(&xs);
            let dev_ = x.broadcast_sub(&x.mean_keepdim(2).unwrap()).unwrap();
            let var = dev_.sqr().unwrap().mean_keepdim(2).unwrap();
            let want = dev_
                .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
                .unwrap()
                .broadcast_mul(&f64s(&ln.weight))
                .unwrap()
                .broadcast_add(&f64s(&ln.bias))
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let got = ln.forward(&xs).unwrap();
            // Rounded to bf16: the f32 result's values, rounded to nearest even, bit for bit.
            let got16 = ln.forward_bf16(&xs).unwrap();
            assert_eq!(got16.dtype(), DType::BF16);
            let bits = |t: &Tensor| {
                let v = t.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap();
                v.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            assert_eq!(bits(&got16), bits(&got.to_dtype(DType::BF16).unwrap()));
            let diff = crate::ops::max_abs_diff(&want, &got);
            // The f32 mean of values near `offset` is off by a few of their ulps (E[x^2] - E[x]^2 in f32, as candle
            // computes it, would be off by ~1e-3 at offset 100).
            let bound = 2e-5 + 1e-6 * offset as f32;
            assert!(
                diff < bound,
                "{rows}x{dim} offset {offset}: max diff {diff}"
            );
        }
    }
}
