//! Convolution as im2col + one GEMM per image, replacing candle's CPU conv2d for f32.
//!
//! candle 0.11's CPU conv2d re-flattens the kernel on every call, converts the input to NHWC serially and scatters
//! its im2col tiles; here the kernel is used as stored (`[c_out, c_in * kh * kw]` is already the GEMM's left
//! matrix), im2col writes whole shifted rows in parallel (`[c_in * kh * kw, h_out * w_out]`, output lands in NCHW
//! directly), and the bias is the GEMM's initial destination. In the CPU bf16 mode the kernel is stored in bf16 and
//! im2col rows are rounded and packed two at a time for [`super::gemm::gemm_packed`] (the f32 im2col matrix is never
//! built); 3x3 convolutions of stride 1 read the input in place instead, tap by tap (channels first, or on AMX
//! channels last). Large f32 3x3 convolutions of stride 1 go to [`super::winograd`] instead, and in the bf16 mode without
//! AMX those of 16 channels or more hold only Winograd's transformed filters and run [`super::winograd_bf16`].
//! Other dtypes and devices use candle's conv2d.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::{Conv2d, Conv2dConfig};

use crate::precision::Weights;
use rayon::prelude::*;

use super::add::Divisor;
use super::cpu::{Kept, Out, SendPtr};
use super::gemm::{
    convert_bf16, gemm_f32_from, gemm_packed_from, gemm_shifted, pair_words, plain_gemm_f32,
    Format, PackedA, PackedB, Shifted, Start, NR,
};
use super::layout::transpose_32;
use super::norm::{ChannelNorm, FastGroupNorm};
use super::simd::{affine_silu, affine_silu_channels_bf16};
use super::winograd_bf16::{self, Filters};

/// Whether a channels-last 3x3 convolution over `positions` outputs, whose padded layout gives `padded` product
/// rows, runs on the positions' gathered taps instead: when they fit one pass of 32 rows and the padded rows
/// take more (the small images, whose kernels come from memory: one pass reads each byte once).
fn gather_pays(positions: usize, padded: usize) -> bool {
    positions <= 32 && padded > 32
}

/// A 2-D convolution (with bias) that runs [`Conv2dOp`] on f32 CPU tensors and candle's conv2d otherwise.
#[derive(Debug, Clone)]
pub struct FastConv2d {
    /// `[c_out, c_in, kh, kw]`.
    kernel: [usize; 4],
    imp: ConvImpl,
}

#[derive(Debug, Clone)]
enum ConvImpl {
    /// candle's convolution, and the op that replaces it for f32 CPU inputs when it can.
    Candle { inner: Conv2d, op: Option<Conv2dOp> },
    /// The CPU bf16 mode: the kernel packed in bf16 inside the op, the bias in f32; and for a convolution that
    /// Winograd's f32 path may run (faster than the bf16 product there, and closer to f32), its f32 kernel.
    Packed {
        op: Conv2dOp,
        bias: Tensor,
        winograd: Option<Tensor>,
    },
}

impl FastConv2d {
    /// Wraps a candle convolution (groups 1, dilation 1; others always use candle).
    pub fn new(inner: Conv2d) -> Self {
        let cfg = inner.config();
        let op =
            (cfg.groups == 1 && cfg.dilation == 1 && inner.bias().is_some()).then_some(Conv2dOp {
                stride: cfg.stride,
                padding: cfg.padding,
                packed: None,
                band: BAND_ELEMS,
            });
        let d = inner.weight().dims();
        let kernel = [d[0], d[1], d[2], d[3]];
        Self {
            kernel,
            imp: ConvImpl::Candle { inner, op },
        }
    }

    /// Loads a convolution's `weight` and `bias` from `w`, kept in bf16 when its precision packs bf16 (unless
    /// `w` keeps the convolutions Winograd can run in f32: [`Weights::winograd_in_f32`]).
    pub fn load(cin: usize, cout: usize, k: usize, cfg: Conv2dConfig, w: &Weights) -> Result<Self> {
        Self::new(candle_nn::conv2d(cin, cout, k, cfg, w.vb())?).held_as(w)
    }

    /// This convolution as `w`'s precision holds it.
    fn held_as(self, w: &Weights) -> Result<Self> {
        let winograd_f32 = w.keeps_winograd_f32()
            && match &self.imp {
                ConvImpl::Candle { op: Some(op), .. } => f32_winograd_pays_in_bf16(self.kernel, op),
                _ => false,
            };
        if super::packs_bf16(w.precision()) && !winograd_f32 {
            self.into_cpu_bf16()
        } else {
            Ok(self)
        }
    }

    /// Loads a convolution that has only a `weight` (PyTorch's `bias=False`). It is held with a zero bias so that
    /// the crate's kernels (which start the GEMM from the bias) run it too; adding zero changes no value.
    pub fn load_without_bias(
        cin: usize,
        cout: usize,
        k: usize,
        cfg: Conv2dConfig,
        w: &Weights,
    ) -> Result<Self> {
        let weight = w.vb().get((cout, cin / cfg.groups, k, k), "weight")?;
        let bias = Tensor::zeros(cout, weight.dtype(), weight.device())?;
        Self::new(Conv2d::new(weight, Some(bias), cfg)).held_as(w)
    }

    /// For the CPU bf16 mode: the kernel rounded to bf16 and packed for the bf16 GEMM (the f32 copy is dropped;
    /// the bias stays f32). A convolution the op cannot run stays as it is.
    pub fn into_cpu_bf16(self) -> Result<Self> {
        self.into_packed(Format::Bf16)
    }

    /// The kernel packed for the crate's GEMM in `format` (the f32 copy is dropped; the bias stays f32). A
    /// convolution the op cannot run stays as it is.
    pub fn into_packed(self, format: Format) -> Result<Self> {
        self.packed_with(format, true)
    }

    /// [`Self::into_packed`]; with `winograd` false, never as Winograd's filters (the direct product's kernel
    /// wherever it would be).
    fn packed_with(self, format: Format, winograd: bool) -> Result<Self> {
        let ConvImpl::Candle {
            inner,
            op: Some(op),
        } = &self.imp
        else {
            return Ok(self);
        };
        let (Some(bias), true) = (inner.bias(), inner.weight().device().is_cpu()) else {
            return Ok(self);
        };
        let [cout, cin, kh, kw] = self.kernel;
        let w = inner
            .weight()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let taps = direct_applies(self.kernel, op);
        let packed = if taps
            && winograd
            && format == Format::Bf16
            && !super::amx::available()
            && winograd_bf16::keeps_filters(self.kernel)
        {
            Packed::Winograd(Filters::new(&w, cout, cin))
        } else if taps && format == Format::Bf16 && super::amx::available() {
            Packed::Channels(PackedB::from_transposed(
                &tap_major(&w, self.kernel),
                cout,
                kh * kw * cin.next_multiple_of(2),
                format,
            ))
        } else if taps {
            Packed::Taps(PackedA::new(
                &tap_major(&w, self.kernel),
                cout,
                kh * kw * cin.next_multiple_of(2),
                format,
            ))
        } else {
            Packed::Rows(PackedA::new(&w, cout, cin * kh * kw, format))
        };
        let winograd_f32 = (format == Format::Bf16 && may_run_winograd(self.kernel, op))
            .then(|| inner.weight().to_dtype(DType::F32))
            .transpose()?;
        Ok(Self {
            kernel: self.kernel,
            imp: ConvImpl::Packed {
                op: Conv2dOp {
                    packed: Some(Arc::new(PackedKernel {
                        kernel: packed,
                        shape: self.kernel,
                    })),
                    ..op.clone()
                },
                bias: bias.to_dtype(DType::F32)?,
                winograd: winograd_f32,
            },
        })
    }

    /// The kernel's shape `[c_out, c_in, kh, kw]`.
    #[cfg(any(test, feature = "bench-internals"))]
    pub fn kernel_shape(&self) -> [usize; 4] {
        self.kernel
    }
}

impl Module for FastConv2d {
    /// The convolution, timed as `conv1x1` or `conv3x3` (any other kernel size counts as `conv3x3`).
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let kind = if self.kernel[2] == 1 && self.kernel[3] == 1 {
            "conv1x1"
        } else {
            "conv3x3"
        };
        let kind = super::profile::shaped(kind, || format!("{:?} {:?}", xs.dims(), self.kernel));
        super::profile::scope_flops(kind, || self.flops(xs.dims()), || self.forward_untimed(xs))
    }
}

impl FastConv2d {
    /// `self.forward(&norm.forward_silu(xs))`, in one pass where the convolution runs channels last (bf16 on AMX):
    /// the normalised values are made while the input is written as bf16 rows and never stored, which saves a
    /// write and a read of a tensor the input's size (the VAE decoder's are 128 MiB at 512x512). Timed as the
    /// convolution; elsewhere the two ops as they are.
    pub fn forward_norm_silu(&self, norm: &FastGroupNorm, xs: &Tensor) -> Result<Tensor> {
        match self.fused(norm, xs, None)? {
            Some(out) => Ok(out),
            None => self.forward(&norm.forward_silu(xs)?),
        }
    }

    /// `add(skip, self.forward_norm_silu(norm, xs), divisor)` (a resnet's end, [`super::add::add`]), the addition
    /// made as the convolution writes its output where the norm is fused: one tensor the output's size less.
    pub fn forward_norm_silu_add(
        &self,
        norm: &FastGroupNorm,
        xs: &Tensor,
        skip: &Tensor,
        divisor: f64,
    ) -> Result<Tensor> {
        match self.fused(norm, xs, Some((skip, divisor)))? {
            Some(out) => Ok(out),
            None => super::add::add(skip, &self.forward(&norm.forward_silu(xs)?)?, divisor),
        }
    }

    /// `self.forward(&upsample_nearest(xs, 2))` (an upsampler: nearest 2x, then this convolution), in one pass
    /// where the convolution runs channels last (bf16 on AMX): each input value is written twice into the bf16
    /// rows, and the upsampled tensor (256 MiB in the VAE decoder at 512x512) is never made. Timed as the
    /// convolution; elsewhere the two ops as they are.
    pub fn forward_upsampled(&self, xs: &Tensor) -> Result<Tensor> {
        let Some((op, bias)) = self.channels_last(xs) else {
            return self.forward(&super::layout::upsample_nearest(xs, 2)?);
        };
        let dims = match xs.dims() {
            &[b, c, h, w] => vec![b, c, 2 * h, 2 * w],
            d => d.to_vec(),
        };
        super::profile::scope_flops(
            super::profile::shaped("conv3x3", || {
                format!("{:?} {:?} upsampled", dims, self.kernel)
            }),
            || self.flops(&dims),
            || {
                let out = xs
                    .contiguous()?
                    .apply_op2_no_bwd(bias, &UpsampledOp(op.clone()))?;
                super::cpu::lined_view(&out, &planar_out(&dims, self.kernel[0]))
            },
        )
    }

    /// The op and bias of a convolution that runs channels last (bf16 on AMX) on `xs` (f32 on the CPU, kernels
    /// on): where the fused forms ([`Self::forward_norm_silu`], [`Self::forward_upsampled`]) apply.
    fn channels_last(&self, xs: &Tensor) -> Option<(&Conv2dOp, &Tensor)> {
        let ConvImpl::Packed { op, bias, .. } = &self.imp else {
            return None;
        };
        let channels_last = op
            .packed
            .as_ref()
            .is_some_and(|p| matches!(p.kernel, Packed::Channels(_)));
        (channels_last
            && super::kernels_enabled()
            && xs.device().is_cpu()
            && xs.dtype() == DType::F32)
            .then_some((op, bias))
    }

    /// The fused op of [`Self::forward_norm_silu`] and [`Self::forward_norm_silu_add`]; `None` where it does not
    /// apply.
    fn fused(
        &self,
        norm: &FastGroupNorm,
        xs: &Tensor,
        residual: Option<(&Tensor, f64)>,
    ) -> Result<Option<Tensor>> {
        let Some((op, bias)) = self.channels_last(xs) else {
            return Ok(None);
        };
        if residual.is_some_and(|(r, _)| !(r.device().is_cpu() && r.dtype() == DType::F32)) {
            return Ok(None);
        }
        let Some(norm) = norm.channel_norm()? else {
            return Ok(None);
        };
        let op = FusedOp {
            op: op.clone(),
            norm,
            divisor: residual.map(|(_, d)| Divisor::new(d)),
            last: Last::Neither,
        };
        super::profile::scope_flops(
            super::profile::shaped("conv3x3", || {
                format!("{:?} {:?} fused", xs.dims(), self.kernel)
            }),
            || self.flops(xs.dims()),
            || {
                let xs = xs.contiguous()?;
                let out = match residual {
                    Some((r, _)) => xs.apply_op3_no_bwd(bias, &r.contiguous()?, &op)?,
                    None => xs.apply_op2_no_bwd(bias, &op)?,
                };
                super::cpu::lined_view(&out, &planar_out(xs.dims(), self.kernel[0]))
            },
        )
        .map(Some)
    }

    /// A resnet's two 3x3 convolutions and what lies between them: `skip + conv2(silu(norm2(h)))` divided by
    /// `divisor` ([`super::add::add`]), with `h = self(silu(norm1(xs))) + t` (`t`: `(b, c)` values per image and
    /// channel, the time embedding's projection). Where both convolutions run channels last (bf16 on AMX), `h` is
    /// kept channels last between them: the first writes each position's channels in a row (adding `t` as it
    /// does), the second reads those rows as its bf16 input rows with the norm and SiLU applied, so `h` is never
    /// transposed and `t` needs no pass of its own. `None` where that does not apply (the caller then runs the ops
    /// one by one). Each convolution is timed as `conv3x3`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_resnet(
        &self,
        norm1: &FastGroupNorm,
        xs: &Tensor,
        t: Option<&Tensor>,
        norm2: &FastGroupNorm,
        conv2: &FastConv2d,
        skip: &Tensor,
        divisor: f64,
    ) -> Result<Option<Tensor>> {
        let (Some((op1, bias1)), Some((op2, bias2))) =
            (self.channels_last(xs), conv2.channels_last(xs))
        else {
            return Ok(None);
        };
        let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        let batch = xs.dims().first().copied().unwrap_or(0);
        if self.kernel[0] < RESNET_LAST_MIN_CHANNELS
            || !cpu_f32(skip)
            || t.is_some_and(|t| !cpu_f32(t) || t.dims() != [batch, self.kernel[0]])
        {
            return Ok(None);
        }
        let (Some(n1), Some(n2)) = (norm1.channel_norm()?, norm2.channel_norm()?) else {
            return Ok(None);
        };
        let first = FusedOp {
            op: op1.clone(),
            norm: n1,
            divisor: None,
            last: Last::Output,
        };
        let second = FusedOp {
            op: op2.clone(),
            norm: n2,
            divisor: Some(Divisor::new(divisor)),
            last: Last::Input,
        };
        let h = super::profile::scope_flops(
            super::profile::shaped("conv3x3", || {
                format!(
                    "{:?} {:?} fused, output channels last",
                    xs.dims(),
                    self.kernel
                )
            }),
            || self.flops(xs.dims()),
            || {
                let xs = xs.contiguous()?;
                let out = match t {
                    Some(t) => xs.apply_op3_no_bwd(bias1, &t.contiguous()?, &first)?,
                    None => xs.apply_op2_no_bwd(bias1, &first)?,
                };
                // Channels last: (b, h, w, c_out).
                let [b, c, hh, w] = planar_out(xs.dims(), self.kernel[0])[..] else {
                    candle_core::bail!("conv: input {:?}", xs.dims());
                };
                super::cpu::lined_view(&out, &[b, hh, w, c])
            },
        )?;
        // The second convolution's flops on `h`'s planar dimensions.
        let planar = match h.dims() {
            &[b, hh, w, c] => vec![b, c, hh, w],
            d => d.to_vec(),
        };
        super::profile::scope_flops(
            super::profile::shaped("conv3x3", || {
                format!("{:?} {:?} fused, input channels last", planar, conv2.kernel)
            }),
            || conv2.flops(&planar),
            || {
                let out = h.apply_op3_no_bwd(bias2, &skip.contiguous()?, &second)?;
                super::cpu::lined_view(&out, &planar_out(&planar, conv2.kernel[0]))
            },
        )
        .map(Some)
    }

    /// Multiply-adds x 2 of the convolution on an input of shape `dims` `(b, c_in, h, w)` (0 when unknown).
    fn flops(&self, dims: &[usize]) -> u64 {
        let [cout, cin, kh, kw] = self.kernel;
        let (stride, padding) = match &self.imp {
            ConvImpl::Candle { inner, .. } => (inner.config().stride, inner.config().padding),
            ConvImpl::Packed { op, .. } => (op.stride, op.padding),
        };
        match dims {
            &[b, _, h, w] => Geometry::new(h, w, kh, kw, stride, padding)
                .map_or(0, |g| (2 * b * cout * cin * kh * kw * g.oh * g.ow) as u64),
            _ => 0,
        }
    }

    fn forward_untimed(&self, xs: &Tensor) -> Result<Tensor> {
        let fast = super::kernels_enabled() && xs.device().is_cpu() && xs.dtype() == DType::F32;
        match &self.imp {
            ConvImpl::Candle {
                inner,
                op: Some(op),
            } if fast && inner.weight().dtype() == DType::F32 => {
                let bias = inner.bias().expect("an op only exists with a bias");
                xs.contiguous()?.apply_op3_no_bwd(inner.weight(), bias, op)
            }
            ConvImpl::Candle { inner, .. } => inner.forward(xs),
            ConvImpl::Packed {
                op,
                bias,
                winograd: Some(w),
            } if fast && winograd_applies(self.kernel, op, xs.dims()) => {
                xs.contiguous()?.apply_op3_no_bwd(w, bias, op)
            }
            ConvImpl::Packed { op, bias, .. } => xs
                .to_dtype(DType::F32)?
                .contiguous()?
                .apply_op2_no_bwd(bias, op),
        }
    }
}

/// The fewest channels between a resnet's convolutions for which [`FastConv2d::forward_resnet`] keeps them
/// channels last: at 128 (the VAE decoder's 512x512 level) the planar path measured faster.
const RESNET_LAST_MIN_CHANNELS: usize = 256;

/// The largest channel count for which the CPU bf16 mode also keeps a convolution's f32 kernel for the Winograd
/// path (the wide, deep layers run on small images, where it does not apply).
const WINOGRAD_KEEP_MAX_CHANNELS: usize = 256;

/// The planar output dimensions `(b, c_out, h, w)` of a 3x3 "same" convolution of an input `dims` `(b, c_in, h,
/// w)`.
fn planar_out(dims: &[usize], cout: usize) -> Vec<usize> {
    let mut d = dims.to_vec();
    if let Some(c) = d.get_mut(1) {
        *c = cout;
    }
    d
}

/// Whether the CPU bf16 mode keeps the f32 kernel of a convolution of this kernel `[c_out, c_in, kh, kw]`
/// besides its bf16 one: narrow enough, and f32 Winograd pays for it.
fn may_run_winograd(kernel: [usize; 4], op: &Conv2dOp) -> bool {
    let [cout, cin, ..] = kernel;
    cin.max(cout) <= WINOGRAD_KEEP_MAX_CHANNELS && f32_winograd_pays_in_bf16(kernel, op)
}

/// Whether the CPU bf16 mode may hold a convolution of this kernel in f32 for Winograd's f32 path: that path
/// runs it on some input, and the CPU has no AMX (whose bf16 product is faster than f32 Winograd).
fn f32_winograd_pays_in_bf16(kernel: [usize; 4], op: &Conv2dOp) -> bool {
    !super::amx::available() && winograd_on_some_input(kernel, op)
}

/// Whether Winograd's path runs a convolution of this kernel on some input (one large enough: a 4096 x 4096
/// image).
fn winograd_on_some_input(kernel: [usize; 4], op: &Conv2dOp) -> bool {
    winograd_applies(kernel, op, &[1, kernel[1], 4096, 4096])
}

/// Whether Winograd's path runs this convolution on an input of shape `dims` (`(b, c_in, h, w)`).
#[allow(unused_variables)]
fn winograd_applies(kernel: [usize; 4], op: &Conv2dOp, dims: &[usize]) -> bool {
    let [cout, cin, kh, kw] = kernel;
    let &[b, _, h, w] = dims else {
        return false;
    };
    #[cfg(target_arch = "x86_64")]
    if let Some(g) = Geometry::new(h, w, kh, kw, op.stride, op.padding) {
        return super::winograd::applies(b, cin, cout, &g);
    }
    false
}

/// The im2col + GEMM convolution of an f32 input `(b, c_in, h, w)` with a kernel and a bias: a custom op on
/// (input, kernel, bias), or on (input, bias) when the kernel is packed inside it.
#[derive(Debug, Clone)]
pub struct Conv2dOp {
    /// Stride along both axes.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
    /// The kernel packed for the GEMM (CPU bf16 mode).
    packed: Option<Arc<PackedKernel>>,
    /// Most values of the unrolled input built at once ([`BAND_ELEMS`]; smaller in tests).
    band: usize,
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
        let (cout, cin, kh, kw) = l2.shape().dims4()?;
        let w = super::cpu::contiguous_f32(s2, l2, "conv kernel")?;
        self.run(s1, l1, Weight::F32(w), [cout, cin, kh, kw], s3, l3)
    }
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "sketchx-conv2d-packed"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Some(packed) = &self.packed else {
            candle_core::bail!("conv: no packed kernel");
        };
        let weight = match &packed.kernel {
            Packed::Rows(a) => Weight::Packed(a),
            Packed::Taps(a) => Weight::Taps(a),
            Packed::Channels(b) => Weight::Channels(b),
            Packed::Winograd(f) => {
                let (x, bias, (b, cin, h, wd), g) = self.operands(s1, l1, packed.shape, s2, l2)?;
                let out = winograd_bf16::conv3x3(x, f, bias, (b, cin, h, wd));
                let cout = packed.shape[0];
                return Ok((CpuStorage::F32(out), Shape::from((b, cout, g.oh, g.ow))));
            }
        };
        self.run(s1, l1, weight, packed.shape, s2, l2)
    }
}

/// A convolution's input and bias as f32 slices, the input's dimensions `(b, c_in, h, w)` and the geometry.
type Operands<'a> = (&'a [f32], &'a [f32], (usize, usize, usize, usize), Geometry);

impl Conv2dOp {
    /// The input `s1` and bias `s3` of a convolution with a kernel `[c_out, c_in, kh, kw]`, checked against it.
    fn operands<'a>(
        &self,
        s1: &'a CpuStorage,
        l1: &Layout,
        [cout, wcin, kh, kw]: [usize; 4],
        s3: &'a CpuStorage,
        l3: &Layout,
    ) -> Result<Operands<'a>> {
        let x = super::cpu::contiguous_f32(s1, l1, "conv input")?;
        let bias = super::cpu::contiguous_f32(s3, l3, "conv bias")?;
        let (b, cin, h, wd) = l1.shape().dims4()?;
        if wcin != cin || bias.len() != cout {
            candle_core::bail!(
                "conv: input has {cin} channels, kernel {wcin}, bias {}",
                bias.len()
            );
        }
        let Some(g) = Geometry::new(h, wd, kh, kw, self.stride, self.padding) else {
            candle_core::bail!("conv: kernel larger than the padded input, or stride 0");
        };
        Ok((x, bias, (b, cin, h, wd), g))
    }

    fn run(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        weight: Weight,
        kernel: [usize; 4],
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, bias, (b, cin, h, wd), g) = self.operands(s1, l1, kernel, s3, l3)?;
        let cout = kernel[0];
        let Geometry {
            s,
            p,
            oh,
            ow,
            kh,
            kw,
            ..
        } = g;
        #[cfg(target_arch = "x86_64")]
        if let Weight::F32(w) = weight {
            if super::winograd::applies(b, cin, cout, &g) {
                let mut out = super::cpu::output_f32(b * cout * oh * ow);
                super::winograd::conv3x3(x, w, bias, &mut out, b, cin, cout, h, wd);
                return Ok((CpuStorage::F32(out), Shape::from((b, cout, oh, ow))));
            }
        }
        if let Weight::Channels(bm) = weight {
            return Self::channels_last_storage(
                x,
                bm,
                bias,
                (b, cin, h, wd),
                Fused::default(),
                false,
            );
        }
        let taps_wide = wd >= TAPS_MIN_WIDTH;
        if let (Weight::Taps(a), true) = (weight, taps_wide) {
            let out = SCRATCH.take_with(|(out_band, words)| {
                self.taps_3x3(x, a, bias, (b, cin, h, wd), cout, words, out_band)
            });
            return Ok((CpuStorage::F32(out), Shape::from((b, cout, oh, ow))));
        }
        if let Weight::Packed(a) = weight {
            if kh == 1
                && kw == 1
                && s == 1
                && p == 0
                && a.format() == Format::Bf16
                && oh * ow >= POINTWISE_MIN
            {
                let out = SCRATCH.take_with(|(_, words)| {
                    pointwise_bf16(x, a, bias, (b, cin, h * wd), cout, words)
                });
                return Ok((CpuStorage::F32(out), Shape::from((b, cout, oh, ow))));
            }
        }
        let n = oh * ow;
        // A tap-major kernel on a narrow input: im2col rows in its order, channels rounded up to even.
        let tap_rows = matches!(weight, Weight::Taps(_)).then_some(cin.next_multiple_of(2));
        let k = tap_rows.map_or(cin, |c| c) * kh * kw;
        let direct = kh == 1 && kw == 1 && s == 1 && p == 0;
        // The unrolled input is built for a band of output rows at a time: at most BAND_ELEMS values (64 MiB in
        // f32), instead of k x n (9 GiB for a 256-channel 3x3 convolution at 1024x1024).
        let band_rows = if direct {
            oh
        } else {
            (self.band / (k * ow).max(1)).clamp(1, oh)
        };
        // The unrolled input's memory is kept between calls (each call overwrites what it uses): fresh buffers
        // of this size come straight from the OS and fault in page by page every time.
        let out = SCRATCH.take_with(|(col, packed)| {
            // Small images: one product over all of them, so that the kernel is read once, not once per image
            // (and the product has enough columns for whole micro-kernel blocks); its columns are then spread
            // over the images.
            let small = n < BATCH_BELOW && band_rows == oh;
            let batch = match weight {
                Weight::Packed(w) | Weight::Taps(w) if small && b > 1 => Some(Batched::Packed(w)),
                // An f32 kernel as stored is the left operand of the crate's f32 product (the `gemm` crate's,
                // image by image, gained nothing on larger images and lost on a few output channels); one image
                // too, so that an image's values do not depend on the batch (see `blocks::twice`).
                Weight::F32(w) if small && Format::F32.has_fast_kernel() => Some(Batched::F32(w)),
                _ => None,
            };
            if let (Weight::F32(_), false, None) = (weight, direct, batch) {
                col.resize(col.len().max(k * band_rows * ow), 0.0);
            }
            let len = b * cout * n;
            // The batched product's output is copied into every position of `out`, so that one is never zeroed.
            let mut out = if batch.is_some() {
                super::cpu::output_uninit_f32(len)
            } else {
                super::cpu::output_f32(len)
            };
            if let Some(w) = batch {
                let cols = b * n;
                let format = match w {
                    Batched::Packed(w) => w.format(),
                    Batched::F32(_) => Format::F32,
                };
                let rhs = pack(
                    std::mem::take(packed),
                    x,
                    b,
                    (direct, tap_rows),
                    k,
                    &g,
                    0..oh,
                    format,
                );
                // From a cache line: the product's tiles load and store whole lines (the start is written first).
                let all = super::cpu::line_aligned(col, cout * cols);
                match w {
                    Batched::Packed(w) => gemm_packed_from(w, &rhs, all, cols, Start::Rows(bias)),
                    Batched::F32(w) => {
                        gemm_f32_from(cout, w, k, &rhs, all, cols, Start::Rows(bias))
                    }
                }
                let all = &*all;
                let optr = SendPtr(out.as_mut_ptr());
                (0..b * cout).into_par_iter().for_each(|t| {
                    let optr = &optr;
                    let (bi, co) = (t / cout, t % cout);
                    // SAFETY: plane t (image bi, channel co) of `out`'s buffer, `n` values, is written by this task
                    // only; `all` is another buffer.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            all[co * cols + bi * n..][..n].as_ptr(),
                            optr.0.add(t * n),
                            n,
                        )
                    };
                });
                // SAFETY: the b * cout planes of n values, all of `out`, were written just above.
                unsafe { out.set_len(len) };
                *packed = rhs.into_buffer();
            }
            for bi in (0..b).filter(|_| batch.is_none()) {
                let xb = &x[bi * cin * h * wd..(bi + 1) * cin * h * wd];
                let ob = &mut out[bi * cout * n..(bi + 1) * cout * n];
                if let Weight::F32(_) = weight {
                    ob.par_chunks_mut(n)
                        .zip(bias.par_iter())
                        .for_each(|(row, &bv)| row.fill(bv));
                }
                for oy0 in (0..oh).step_by(band_rows) {
                    let rows = oy0..(oy0 + band_rows).min(oh);
                    let nb = rows.len() * ow;
                    // Columns oy0 * ow.. of every output channel (row stride n).
                    let dst = &mut ob[oy0 * ow..];
                    match weight {
                        Weight::F32(w) => {
                            let rhs: &[f32] = if direct {
                                xb
                            } else {
                                im2col(xb, &mut col[..k * nb], &g, rows);
                                &col[..k * nb]
                            };
                            plain_gemm_f32(cout, nb, k, w, rhs, dst, n);
                        }
                        Weight::Packed(w) | Weight::Taps(w) => {
                            let rhs = pack(
                                std::mem::take(packed),
                                xb,
                                1,
                                (direct, tap_rows),
                                k,
                                &g,
                                rows,
                                w.format(),
                            );
                            gemm_packed_from(w, &rhs, dst, n, Start::Rows(bias));
                            *packed = rhs.into_buffer();
                        }
                        Weight::Channels(_) => {
                            unreachable!("channels-last kernels run taps_channels_last")
                        }
                    }
                }
            }
            out
        });
        Ok((CpuStorage::F32(out), Shape::from((b, cout, oh, ow))))
    }
}

/// Sizes `words` for `rows` rows of channel-pair words at least `min_stride` words long and returns their stride:
/// a multiple of [`NR`], but not of 256 (rows 1 KiB apart would share the L1 cache's sets). The kept buffer is not
/// cleared: the callers write every word.
fn word_rows(words: &mut Vec<u32>, rows: usize, min_stride: usize) -> usize {
    let mut stride = min_stride.next_multiple_of(NR);
    if stride.is_multiple_of(256) {
        stride += NR;
    }
    if words.len() < rows * stride {
        words.resize(rows * stride, 0);
    }
    words.truncate(rows * stride);
    stride
}

/// What a channels-last convolution fuses: a group norm and SiLU on its input (`(a, b)` per image and channel),
/// a residual added to its output (`(skip + y) / divisor` as [`super::add::add`] computes it).
#[derive(Clone, Copy, Default)]
struct Fused<'a> {
    norm: Option<&'a [(f32, f32)]>,
    residual: Option<(&'a [f32], Divisor)>,
    /// The input is the convolution's input at half its height and width, upsampled 2x (nearest) as it is written.
    upsample: bool,
    /// The input is laid out channels last, `(b, h, w, c_in)`, instead of `(b, c_in, h, w)`.
    input_last: bool,
    /// The output is written channels last, `(b, h, w, c_out)` (no residual then), plus `(b, c_out)` values per
    /// image and channel when given (a resnet's time embedding, as [`super::add::add_channels`] adds it).
    output_last: Option<Option<&'a [f32]>>,
}

/// A channels-last convolution with its input's group norm and SiLU ([`FastConv2d::forward_norm_silu`]): a
/// custom op on (input, bias), or on (input, bias, residual) with the residual added to the output
/// ([`FastConv2d::forward_norm_silu_add`]).
struct FusedOp {
    /// The convolution, with its kernel packed channels last.
    op: Conv2dOp,
    norm: ChannelNorm,
    /// What the sum with the residual is divided by.
    divisor: Option<Divisor>,
    /// Which side of the convolution is laid out channels last, if any.
    last: Last,
}

/// The layouts of a [`FusedOp`]: a resnet's first convolution writes its output channels last for its second to
/// read (the tensor between them is never transposed, and the time embedding is added as it is written).
#[derive(Clone, Copy, PartialEq)]
enum Last {
    /// Both sides `(b, c, h, w)`; the third operand, if any, is the residual.
    Neither,
    /// The output is `(b, h, w, c_out)`; the third operand, if any, is `(b, c_out)` values to add per image and
    /// channel.
    Output,
    /// The input is `(b, h, w, c_in)` (its norm's statistics taken in that layout); the third operand, if any, is
    /// the residual, `(b, c_out, h, w)` as the output.
    Input,
}

impl FusedOp {
    fn run(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        third: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let (bm, shape) = self.op.channels_kernel("a fused group norm")?;
        let (x, bias, (b, cin, h, w)) = if self.last == Last::Input {
            // The operands' checks of `Conv2dOp::operands` on the channels-last dimensions.
            let x = super::cpu::contiguous_f32(s1, l1, "conv input")?;
            let bias = super::cpu::contiguous_f32(s2, l2, "conv bias")?;
            let (b, h, w, cin) = l1.shape().dims4()?;
            if shape[1] != cin || bias.len() != shape[0] || (shape[2], shape[3]) != (3, 3) {
                candle_core::bail!(
                    "conv: channels-last input has {cin} channels, kernel {:?}, bias {}",
                    shape,
                    bias.len()
                );
            }
            (x, bias, (b, cin, h, w))
        } else {
            let (x, bias, dims, _) = self.op.operands(s1, l1, shape, s2, l2)?;
            (x, bias, dims)
        };
        let cout = shape[0];
        let third = match third {
            Some((s3, l3)) => {
                let expected = match self.last {
                    Last::Output => vec![b, cout],
                    Last::Neither | Last::Input => vec![b, cout, h, w],
                };
                let v = super::cpu::contiguous_f32(s3, l3, "conv residual")?;
                if l3.shape().dims() != expected {
                    candle_core::bail!(
                        "conv: residual or shift {:?} for an output {:?}",
                        l3.shape().dims(),
                        expected
                    );
                }
                Some(v)
            }
            None => None,
        };
        let norm = match self.last {
            Last::Input => self.norm.channel_affine_last(x, b, cin, h * w)?,
            Last::Neither | Last::Output => self.norm.channel_affine(x, b, cin, h * w)?,
        };
        let fused = match self.last {
            Last::Output => Fused {
                norm: Some(&norm),
                output_last: Some(third),
                ..Fused::default()
            },
            Last::Neither | Last::Input => Fused {
                norm: Some(&norm),
                residual: third.zip(self.divisor),
                input_last: self.last == Last::Input,
                ..Fused::default()
            },
        };
        Conv2dOp::channels_last_storage(x, bm, bias, (b, cin, h, w), fused, true)
    }
}

/// A channels-last convolution of its input upsampled 2x, nearest ([`FastConv2d::forward_upsampled`]): a custom op
/// on (input, bias).
struct UpsampledOp(Conv2dOp);

impl CustomOp2 for UpsampledOp {
    fn name(&self) -> &'static str {
        "sketchx-upsample-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (bm, shape) = self.0.channels_kernel("an upsampled input")?;
        // The input and bias checked against the kernel (at the input's size: the geometry is the same 3x3
        // "same" convolution at twice it).
        let (x, bias, (b, cin, h, w), _) = self.0.operands(s1, l1, shape, s2, l2)?;
        let fused = Fused {
            upsample: true,
            ..Fused::default()
        };
        Conv2dOp::channels_last_storage(x, bm, bias, (b, cin, 2 * h, 2 * w), fused, true)
    }
}

impl CustomOp2 for FusedOp {
    fn name(&self) -> &'static str {
        "sketchx-norm-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run((s1, l1), (s2, l2), None)
    }
}

impl CustomOp3 for FusedOp {
    fn name(&self) -> &'static str {
        "sketchx-norm-conv2d-add"
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
        self.run((s1, l1), (s2, l2), Some((s3, l3)))
    }
}

/// Output positions per image from which a bf16 1x1 convolution runs on channel-pair rows ([`pointwise_bf16`]):
/// 1.4x faster on the VAE decoder's (65,536 positions and more), 15% slower on the UNet's at 256x256 (at most 1,024,
/// where the packed product takes both images at once).
const POINTWISE_MIN: usize = 1 << 14;

/// A 1x1 convolution (stride 1, no padding) with a bf16 kernel `a` (`c_out x c_in`): the input's channel pairs
/// interleaved once into rows of words (all images side by side), read in place by [`gemm_shifted`] with one
/// segment per image, each image's product written straight into its output planes (from the bias). Packing the
/// input into column panels instead scatters every word row over the panels, which for a 512x512 image cost more
/// than the product.
fn pointwise_bf16(
    x: &[f32],
    a: &PackedA,
    bias: &[f32],
    (b, cin, n): (usize, usize, usize),
    cout: usize,
    words: &mut Vec<u32>,
) -> Vec<f32> {
    let len = b * cout * n;
    if len == 0 {
        return Vec::new();
    }
    let pairs = cin.div_ceil(2);
    let cols = b * n;
    // The product reads each image's columns up to the next multiple of NR: zeros after the last image. Every word
    // is written below.
    let stride = word_rows(words, pairs, cols.next_multiple_of(NR) + NR);
    words
        .par_chunks_mut(stride)
        .enumerate()
        .for_each(|(cp, row)| {
            for bi in 0..b {
                let lo = &x[(bi * cin + 2 * cp) * n..][..n];
                let hi = (2 * cp + 1 < cin).then(|| &x[(bi * cin + 2 * cp + 1) * n..][..n]);
                pair_words(lo, hi, &mut row[bi * n..(bi + 1) * n]);
            }
            row[cols..].fill(0);
        });
    let mut out = super::cpu::output_f32(len);
    for (bi, c) in out.chunks_exact_mut(cout * n).enumerate() {
        let shifts = [bi * n];
        let view = Shifted {
            words,
            stride,
            seg_words: pairs,
            shifts: &shifts,
            n,
        };
        gemm_shifted(a, &view, c, n, Start::Rows(bias));
    }
    out
}

/// The GEMM's right operand for `images` images `x` (one after the other), their columns side by side: each
/// image's own `x` (`[c_in, n]`) for a plain 1x1 convolution, its im2col matrix otherwise (output rows `rows`),
/// packed row by row (the im2col matrix never exists in full); `tap_rows`: the rows in a tap-major kernel's order
/// (channels rounded up to that even count). (In f32 the `gemm` crate on a plain im2col matrix measured about 13%
/// faster than this packing with [`super::gemm::gemm_f32`], so f32 convolutions keep it; linear layers, where the
/// packing happens once at load, measured 1.45x faster with ours.)
#[allow(clippy::too_many_arguments)]
fn pack(
    buffer: Vec<u32>,
    x: &[f32],
    images: usize,
    (direct, tap_rows): (bool, Option<usize>),
    k: usize,
    g: &Geometry,
    rows: std::ops::Range<usize>,
    format: Format,
) -> PackedB {
    let (n, nb) = (g.oh * g.ow, rows.len() * g.ow);
    let per_image = x.len() / images.max(1);
    let (taps, cin) = (g.kh * g.kw, per_image / (g.h * g.w));
    PackedB::from_rows_in(buffer, k, images * nb, format, |r, row| {
        for (i, dst) in row.chunks_exact_mut(nb).enumerate() {
            let xi = &x[i * per_image..][..per_image];
            match tap_rows {
                _ if direct => dst.copy_from_slice(&xi[r * n + rows.start * g.ow..][..nb]),
                // Row r of a tap-major kernel's order: tap r / cin2, channel r % cin2 (zero past the input's).
                Some(cin2) if r % cin2 >= cin => dst.fill(0.0),
                Some(cin2) => im2col_row(xi, (r % cin2) * taps + r / cin2, dst, g, rows.clone()),
                None => im2col_row(xi, r, dst, g, rows.clone()),
            }
        }
    })
}

/// The left operand of a product over all images at once: a packed kernel, or an f32 one as stored.
#[derive(Clone, Copy)]
enum Batched<'a> {
    Packed(&'a PackedA),
    F32(&'a [f32]),
}

/// Below this many output positions per image, one product runs over all images.
const BATCH_BELOW: usize = 512;

/// The unrolled input's buffers (f32 im2col, packed), kept for the next convolution; one caller at a time takes
/// them (others allocate their own).
static SCRATCH: Kept<(Vec<f32>, Vec<u32>)> = Kept::new((Vec::new(), Vec::new()));

/// Most values of the unrolled input built at once (see [`Conv2dOp`]).
const BAND_ELEMS: usize = 1 << 24;

/// A kernel `[c_out, c_in * kh * kw]`: f32 as stored, or packed for the GEMM (CPU bf16 mode); or packed tap by
/// tap for [`Conv2dOp::taps_3x3`].
#[derive(Clone, Copy)]
enum Weight<'a> {
    F32(&'a [f32]),
    Packed(&'a PackedA),
    Taps(&'a PackedA),
    Channels(&'a PackedB),
}

/// A convolution's kernel packed for the GEMM.
#[derive(Debug)]
struct PackedKernel {
    kernel: Packed,
    /// `[c_out, c_in, kh, kw]`.
    shape: [usize; 4],
}

/// The form in which a packed convolution holds its kernel.
#[derive(Debug)]
enum Packed {
    /// The im2col product's `[c_out, c_in * kh * kw]`.
    Rows(PackedA),
    /// Tap-major for [`Conv2dOp::taps_3x3`] (`[c_out, 9, c_in]`, `c_in` rounded up to even).
    Taps(PackedA),
    /// Tap-major as the right operand of a channels-last product on AMX tiles ([`Conv2dOp::taps_channels_last`]):
    /// `B = [9 c_in', c_out]`.
    Channels(PackedB),
    /// Only the transformed filters of bf16 Winograd ([`super::winograd_bf16`]), which then runs the convolution
    /// at every size: 3x3 stride-1 convolutions of enough channels in the bf16 mode without AMX (AMX's direct
    /// product is faster than Winograd's transforms and smaller products). Keeping the direct kernel too, for the
    /// few inputs too small for Winograd to gain, would hold nearly three times the bf16 kernel.
    Winograd(Filters),
}

/// The narrowest input [`Conv2dOp::taps_3x3`] runs (its discarded columns are `1 / (w + 1)` of the work, plus
/// the padding rows between images); narrower ones take the im2col product on the same tap-major kernel.
const TAPS_MIN_WIDTH: usize = 32;

/// Whether a convolution of this kernel is packed tap-major: 3x3, stride 1, padding 1, in bf16 on the AVX-512 BF16
/// micro-kernel ([`Conv2dOp::taps_3x3`]) or AMX tiles ([`Conv2dOp::taps_channels_last`]).
fn direct_applies(kernel: [usize; 4], op: &Conv2dOp) -> bool {
    kernel[2] == 3
        && kernel[3] == 3
        && op.stride == 1
        && op.padding == 1
        && Format::Bf16.has_fast_kernel()
}

/// A kernel `[c_out, c_in, kh, kw]` reordered to `[c_out, kh * kw, c_in']`, `c_in'` = `c_in` rounded up to even
/// (the extra channel zero), so that each tap's channels are whole words of bf16 pairs.
fn tap_major(w: &[f32], [cout, cin, kh, kw]: [usize; 4]) -> Vec<f32> {
    let (taps, cin2) = (kh * kw, cin.next_multiple_of(2));
    let mut out = vec![0f32; cout * taps * cin2];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(taps * cin2)
        .enumerate()
        .for_each(|(co, dst)| {
            for ci in 0..cin {
                for t in 0..taps {
                    dst[t * cin2 + ci] = w[(co * cin + ci) * taps + t];
                }
            }
        });
    out
}

impl Conv2dOp {
    /// The channels-last kernel and its shape `[c_out, c_in, kh, kw]`; an error naming `what` needs it otherwise.
    fn channels_kernel(&self, what: &str) -> Result<(&PackedB, [usize; 4])> {
        match self.packed.as_deref() {
            Some(PackedKernel {
                kernel: Packed::Channels(bm),
                shape,
            }) => Ok((bm, *shape)),
            _ => candle_core::bail!("conv: {what} needs a channels-last kernel"),
        }
    }

    /// [`Self::taps_channels_last`] on the kept scratch words, as the op's output storage and shape
    /// `(b, c_out, h, w)` (`h`, `w`: the output's).
    fn channels_last_storage(
        x: &[f32],
        bm: &PackedB,
        bias: &[f32],
        (b, cin, h, w): (usize, usize, usize, usize),
        fused: Fused,
        lined: bool,
    ) -> Result<(CpuStorage, Shape)> {
        #[cfg(target_arch = "x86_64")]
        {
            let out = SCRATCH.take_with(|(_, words)| {
                Self::taps_channels_last(x, bm, bias, (b, cin, h, w), fused, words, lined)
            });
            let shape = if fused.output_last.is_some() {
                Shape::from((b, h, w, bm.n()))
            } else {
                Shape::from((b, bm.n(), h, w))
            };
            // SAFETY: the convolution wrote every value.
            let (v, shape) = unsafe { out.finish(shape) };
            Ok((CpuStorage::F32(v), shape))
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (x, bm, bias, b, cin, h, w, fused, lined);
            candle_core::bail!("conv: channels-last kernels need AMX")
        }
    }

    /// A 3x3 convolution (stride 1, padding 1) of `b` images `(cin, h, w)` on AMX tiles, channels last: the
    /// input is written once as rows of bf16 channel pairs, one row per position, in the padded geometry of
    /// [`Conv2dOp::taps_3x3`] (rows of `w + 1` positions, the zero one shared by neighbouring rows, images one
    /// after the other); a tap then reads the rows shifted by whole rows, so that every tile row is one cache line
    /// of one position (the kernel `b` packed as the right operand). Reading the channels-first rows instead puts
    /// each of a tile's 16 rows in another page, which the tile loads pay for (twice the time on the UNet's
    /// 320-channel convolutions). The product (positions x channels, starting from the bias) is never stored: each
    /// finished tile is transposed into the output's planes.
    #[cfg(target_arch = "x86_64")]
    fn taps_channels_last(
        x: &[f32],
        bm: &PackedB,
        bias: &[f32],
        (b, cin, h, w): (usize, usize, usize, usize),
        Fused {
            norm,
            residual,
            upsample,
            input_last,
            output_last,
        }: Fused,
        words: &mut Vec<u32>,
        lined: bool,
    ) -> Out<f32> {
        let cout = bm.n();
        let len = b * cout * h * w;
        let mut out = Out::<f32>::uninit(len, lined);
        if len == 0 {
            return out;
        }
        let pairs = cin.div_ceil(2);
        assert_eq!(bm.k(), 18 * pairs, "kernel and input channels");
        assert!(
            !((upsample && input_last) || (residual.is_some() && output_last.is_some())),
            "conv: no such fused form"
        );
        if pairs == 0 {
            // No input channels (a product over nothing): every plane is its bias, plus the residual.
            let values = out.values();
            let img = h * w;
            if let Some(add) = output_last {
                values
                    .par_chunks_mut(cout)
                    .enumerate()
                    .for_each(|(q, row)| {
                        let bi = q / img;
                        for (c, d) in row.iter_mut().enumerate() {
                            *d = bias[c] + add.map_or(0.0, |t| t[bi * cout + c]);
                        }
                    });
                return out;
            }
            values
                .par_chunks_mut(img)
                .enumerate()
                .for_each(|(t, plane)| {
                    plane.fill(bias[t % cout]);
                    if let Some((skip, divisor)) = residual {
                        for (d, &r) in plane.iter_mut().zip(&skip[t * img..(t + 1) * img]) {
                            *d = divisor.sum(r, *d);
                        }
                    }
                });
            return out;
        }
        // Rows start on cache lines.
        let lda = pairs.next_multiple_of(NR);
        let l = w + 1;
        // Neighbouring images share a zero row (one's bottom padding is the next one's top).
        let plane = (h + 1) * l;
        let guard = l + 1;
        let ncols = (b - 1) * plane + (h - 1) * l + w;
        let shifts: Vec<usize> = (0..9).map(|t| (t / 3 + 1) * l + t % 3 + 1).collect();
        // Rows up to whole tiles past the last position (the product loads them, see `gemm_rows_shifted`).
        let rows = (ncols.next_multiple_of(32) + 3 * l + 3).max(guard + b * plane);
        let off = super::cpu::line_offset(words, rows * lda);
        let a = &mut words[off..off + rows * lda];
        // Padding rows (guard, top and bottom rows, the zero column, the tail) hold zero pairs.
        a.par_chunks_mut(lda).enumerate().for_each(|(q, row)| {
            let data = q >= guard && q < guard + b * plane && {
                let r = (q - guard) % plane;
                (1..=h).contains(&(r / l)) && r % l != 0
            };
            if !data {
                row[..pairs].fill(0);
            }
        });
        let img = h * w;
        // The input's rows: `w` values, or `w / 2` repeated twice each (upsampled; `h` and `w` are even then).
        let (sh, sw) = if upsample { (h / 2, w / 2) } else { (h, w) };
        let aptr = SendPtr(a.as_mut_ptr());
        // A channels-last input's norm parameters as two rows per image (scales, shifts).
        let (norm_scales, norm_shifts): (Vec<f32>, Vec<f32>) = match norm {
            Some(ab) if input_last => ab.iter().copied().unzip(),
            _ => (Vec::new(), Vec::new()),
        };
        (0..b * h).into_par_iter().for_each_init(
            || (vec![0u32; pairs * w], vec![0f32; 2 * w], vec![0f32; 2 * w]),
            |(tmp, normed, wide), t| {
                let aptr = &aptr;
                let (bi, y) = (t / h, t % h);
                let q0 = guard + bi * plane + (y + 1) * l + 1;
                if input_last {
                    // Each position's channels are one row already: rounded (normalised first) in place.
                    for xx in 0..w {
                        let src = &x[((bi * h + y) * w + xx) * cin..][..cin];
                        // SAFETY: row q0 + xx (image bi, row y, column xx) lies inside `a` and is written by this
                        // task only: its first `pairs` words, 2 pairs bf16 values.
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(
                                aptr.0.add((q0 + xx) * lda).cast::<u16>(),
                                2 * pairs,
                            )
                        };
                        if norm.is_some() {
                            let sc = &norm_scales[bi * cin..][..cin];
                            let sh = &norm_shifts[bi * cin..][..cin];
                            affine_silu_channels_bf16(src, sc, sh, dst);
                        } else {
                            convert_bf16(src, dst);
                        }
                        dst[cin..].fill(0);
                    }
                    return;
                }
                let (nlo, nhi) = normed.split_at_mut(w);
                let (wlo, whi) = wide.split_at_mut(w);
                let sy = if upsample { y / 2 } else { y };
                for cp in 0..pairs {
                    let row = |c: usize| &x[(bi * cin + c) * sh * sw + sy * sw..][..sw];
                    let mut lo = row(2 * cp);
                    let mut hi = (2 * cp + 1 < cin).then(|| row(2 * cp + 1));
                    if upsample {
                        for (d, &v) in wlo.chunks_exact_mut(2).zip(lo) {
                            d.fill(v);
                        }
                        lo = wlo;
                        if let Some(h) = hi {
                            for (d, &v) in whi.chunks_exact_mut(2).zip(h) {
                                d.fill(v);
                            }
                            hi = Some(&*whi);
                        }
                    }
                    // The group norm and SiLU, from the same parameters and arithmetic as the norm's own op.
                    if let Some(ab) = norm {
                        let (a, b0) = ab[bi * cin + 2 * cp];
                        affine_silu(lo, nlo, a, b0, true);
                        lo = nlo;
                        if let Some(h) = hi {
                            let (a, b0) = ab[bi * cin + 2 * cp + 1];
                            affine_silu(h, nhi, a, b0, true);
                            hi = Some(&*nhi);
                        }
                    }
                    pair_words(lo, hi, &mut tmp[cp * w..(cp + 1) * w]);
                }
                // SAFETY: rows q0..q0 + w (image bi, row y) lie inside `a` and are written by this task only (words
                // 0..pairs of each); `tmp` holds pairs x w words.
                unsafe { transpose_32(tmp.as_ptr(), w, aptr.0.add(q0 * lda), lda, pairs, w) };
            },
        );
        let a = &*a;
        let optr = SendPtr(out.ptr());
        // Small images: the padded rows take more passes of 32 than the positions themselves (4x4, batch 2: 44 rows,
        // two passes over a kernel of tens of megabytes that comes from memory), so the positions' taps are
        // gathered into rows of their own (im2col from the padded rows) and the kernel streams through one pass.
        let positions = b * img;
        let gathered = gather_pays(positions, ncols);
        // The padded layout's product row whose taps are position `o`'s.
        let padded_row = |o: usize| (o / img) * plane + (o % img) / w * l + (o % img) % w;
        // The product's rows: padded rows of `l` per image row and `plane` per image, or the positions themselves.
        let (l, plane) = if gathered { (w, img) } else { (l, plane) };
        // Each tile of the product (16 positions x 16 channels) is transposed and its positions that are outputs
        // written into their planes: runs along an image row (product row j is image j / plane, position
        // (j % plane) / l, (j % plane) % l; x < w and y < h are outputs).
        let epilogue = |row: usize, col: usize, tile: &[f32; 256], rows: usize, cols: usize| {
            let optr = &optr;
            if let Some(add) = output_last {
                // Channels last: each tile row is one position's run of channels.
                for i in 0..rows {
                    let (bi, r) = ((row + i) / plane, (row + i) % plane);
                    let (y, xx) = (r / l, r % l);
                    if y >= h || xx >= w {
                        continue;
                    }
                    // SAFETY: position (bi, y, xx) is an output, its channels col..col + cols (<= c_out) lie inside
                    // `out`'s buffer and are written by this tile only.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            optr.0.add(((bi * h + y) * w + xx) * cout + col),
                            cols,
                        )
                    };
                    let src = &tile[i * 16..][..cols];
                    match add {
                        Some(t) => {
                            let t = &t[bi * cout + col..][..cols];
                            for ((d, &v), &a) in dst.iter_mut().zip(src).zip(t) {
                                *d = v + a;
                            }
                        }
                        None => dst.copy_from_slice(src),
                    }
                }
                return;
            }
            // A whole run of 16 without a residual goes straight from the tile into the planes (through registers);
            // others through a transposed copy, made once.
            let mut t = [0f32; 256];
            let mut transposed = false;
            let mut i = 0;
            while i < rows {
                let (bi, r) = ((row + i) / plane, (row + i) % plane);
                let (y, xx) = (r / l, r % l);
                if y >= h || xx >= w {
                    i += 1;
                    continue;
                }
                let run = (w - xx).min(rows - i);
                let at = (bi * cout + col) * img + y * w + xx;
                // SAFETY (all writes below): output row y, columns xx..xx + run (<= w) of planes (bi, col + c) for
                // c < cols (col + c < c_out) lie inside `out`'s buffer; each output position is one product row, so
                // no other tile writes them; tile rows i..i + run hold them.
                if residual.is_none() && run == 16 {
                    unsafe { transpose_32(tile.as_ptr(), 16, optr.0.add(at), img, 16, cols) };
                    i += run;
                    continue;
                }
                if !transposed {
                    // SAFETY: both hold 16 x 16 values.
                    unsafe { transpose_32(tile.as_ptr(), 16, t.as_mut_ptr(), 16, 16, 16) };
                    transposed = true;
                }
                for c in 0..cols {
                    let at = at + c * img;
                    let dst = unsafe { std::slice::from_raw_parts_mut(optr.0.add(at), run) };
                    let src = &t[c * 16 + i..][..run];
                    match residual {
                        Some((skip, divisor)) => {
                            for ((d, &v), &r) in dst.iter_mut().zip(src).zip(&skip[at..at + run]) {
                                *d = divisor.sum(r, v);
                            }
                        }
                        None => dst.copy_from_slice(src),
                    }
                }
                i += run;
            }
        };
        if gathered {
            static GATHERED: Kept<Vec<u32>> = Kept::new(Vec::new());
            // Rows on cache lines; the words past the nine taps are never read (the product's k ends there).
            let ldg = (9 * pairs).next_multiple_of(NR);
            GATHERED.with(positions * ldg, |g| {
                g.par_chunks_mut(ldg).enumerate().for_each(|(o, row)| {
                    let j = padded_row(o);
                    for (t, &s) in shifts.iter().enumerate() {
                        row[t * pairs..][..pairs].copy_from_slice(&a[(j + s) * lda..][..pairs]);
                    }
                });
                // SAFETY: AMX is available (the kernel is packed this way only then); `g` holds `positions` rows of
                // 9 x pairs words (k = 18 pairs entries, tap-major as the kernel), `ldg` words apart; `bias` holds
                // c_out values (checked by `operands`).
                unsafe {
                    super::amx::gemm_handed(
                        positions,
                        (g.as_ptr().cast(), 2 * ldg),
                        bm,
                        Some(bias),
                        super::amx::Handed::Tiles(&epilogue),
                        true,
                    )
                };
            });
            // Every position is a row of the product, written by the epilogue.
            return out;
        }
        // SAFETY: AMX is available (the kernel is packed this way only then); k = 18 pairs = 2 x pairs words per
        // tap; for every shift s, rows s..s + ncols of `a` exist (the largest shift is 3l + 3 and `a` holds ncols +
        // 3l + 3 rows), each `pairs` words (2 lda entries apart); `bias` holds c_out values (checked by `operands`).
        unsafe {
            super::amx::gemm_rows_shifted(
                ncols,
                (a.as_ptr().cast(), 2 * lda, &shifts),
                bm,
                bias,
                &epilogue,
            )
        };
        // The product's rows 0..ncols hold every output position (image bi, row y < h, column x < w at bi * plane
        // + y * l + x), each written by the epilogue.
        out
    }

    /// A 3x3 convolution (stride 1, padding 1) of `b` images `(cin, h, w)` without im2col: the input is written
    /// once as bf16 channel pairs, each image zero-padded in rows of `w + 1` words (the zero column is the right
    /// edge of one row and the left edge of the next) and all images one after the other in each pair's row; a
    /// tap `(dy, dx)` of the kernel then reads that row shifted by `(dy - 1) (w + 1) + dx - 1`, which the GEMM
    /// does in place ([`gemm_shifted`], starting from the bias). The product's columns run over the padded
    /// positions (the zero columns and the rows between images give discarded columns, `1 / (w + 1)` of the
    /// work), at most `band` values of output at a time into `out_band`; each band's output positions are then
    /// copied into the output.
    #[allow(clippy::too_many_arguments)]
    fn taps_3x3(
        &self,
        x: &[f32],
        a: &PackedA,
        bias: &[f32],
        (b, cin, h, w): (usize, usize, usize, usize),
        cout: usize,
        words: &mut Vec<u32>,
        out_band: &mut Vec<f32>,
    ) -> Vec<f32> {
        let len = b * cout * h * w;
        if len == 0 {
            return Vec::new();
        }
        // Never zeroed: the bands' copies below write every output position before anything reads it.
        let mut out = super::cpu::output_uninit_f32(len);
        let pairs = cin.div_ceil(2);
        let l = w + 1;
        let plane = (h + 2) * l + 1;
        // Leading zeros, so that the most negative shift (-(l + 1)) stays inside the row.
        let guard = l + 1;
        // Columns from the first output position (image 0, (0, 0) at guard + l + 1) to the last.
        let ncols = (b - 1) * plane + (h - 1) * l + w;
        // Tap (dy, dx) of column j reads guard + l + 1 + j + (dy - 1) l + dx - 1.
        let shifts: Vec<usize> = (0..9).map(|t| (t / 3 + 1) * l + t % 3 + 1).collect();
        // Every word is written below (zeros and pairs).
        let stride = word_rows(
            words,
            pairs,
            (3 * l + 3 + ncols.next_multiple_of(NR) + NR).max(guard + b * plane),
        );
        let img = h * w;
        words
            .par_chunks_mut(stride)
            .enumerate()
            .for_each(|(cp, row)| {
                row[..guard].fill(0);
                for bi in 0..b {
                    let base = guard + bi * plane;
                    row[base..base + l].fill(0);
                    for y in 0..h {
                        let at = base + (y + 1) * l;
                        row[at] = 0;
                        let lo = &x[(bi * cin + 2 * cp) * img + y * w..][..w];
                        let hi = (2 * cp + 1 < cin)
                            .then(|| &x[(bi * cin + 2 * cp + 1) * img + y * w..][..w]);
                        pair_words(lo, hi, &mut row[at + 1..at + 1 + w]);
                    }
                    row[base + (h + 1) * l..base + plane].fill(0);
                }
                row[guard + b * plane..].fill(0);
            });
        let band = (self.band / cout).clamp(1, ncols);
        out_band.resize(cout * band, 0.0);
        let optr = SendPtr(out.as_mut_ptr());
        for j0 in (0..ncols).step_by(band) {
            let nb = band.min(ncols - j0);
            let band_shifts: Vec<usize> = shifts.iter().map(|&s| s + j0).collect();
            let view = Shifted {
                words,
                stride,
                seg_words: pairs,
                shifts: &band_shifts,
                n: nb,
            };
            let c = &mut out_band[..cout * nb];
            gemm_shifted(a, &view, c, nb, Start::Rows(bias));
            // Column j is image j / plane, position (j % plane) / l, (j % plane) % l (x < w: an output).
            let c = &*c;
            (0..b * cout).into_par_iter().for_each(|t| {
                let optr = &optr;
                let (bi, co) = (t / cout, t % cout);
                let src = &c[co * nb..][..nb];
                for y in 0..h {
                    let j = bi * plane + y * l;
                    let (lo, hi) = (j.max(j0), (j + w).min(j0 + nb));
                    if lo >= hi {
                        continue;
                    }
                    // SAFETY: output plane t (image bi, channel co) row y columns lo - j..hi - j (< w), inside
                    // `out`'s buffer: written by this task only; `src` is another buffer.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            src[lo - j0..hi - j0].as_ptr(),
                            optr.0.add(t * img + y * w + lo - j),
                            hi - lo,
                        )
                    };
                }
            });
        }
        // SAFETY: the bands cover columns 0..ncols, which hold every output position (image bi, row y < h,
        // column x < w at bi * plane + y * l + x), each copied above.
        unsafe { out.set_len(len) };
        out
    }
}

/// Writes the patches of one image `x` `(cin, h, w)` for output rows `rows` into `col`
/// `[cin * kh * kw, rows.len() * ow]`, zeros for padding.
fn im2col(x: &[f32], col: &mut [f32], g: &Geometry, rows: std::ops::Range<usize>) {
    col.par_chunks_mut(rows.len() * g.ow)
        .enumerate()
        .for_each(|(r, row)| im2col_row(x, r, row, g, rows.clone()));
}

/// The shape of one convolution: input planes, kernel, stride, padding and output size.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) kh: usize,
    pub(super) kw: usize,
    pub(super) s: usize,
    pub(super) p: usize,
    pub(super) oh: usize,
    pub(super) ow: usize,
}

impl Geometry {
    /// The geometry of an `h x w` input under a `kh x kw` kernel with stride `s` and padding `p`; `None` when the
    /// kernel is larger than the padded input or the stride is 0.
    pub(super) fn new(
        h: usize,
        w: usize,
        kh: usize,
        kw: usize,
        s: usize,
        p: usize,
    ) -> Option<Self> {
        if h + 2 * p < kh || w + 2 * p < kw || s == 0 {
            return None;
        }
        let (oh, ow) = ((h + 2 * p - kh) / s + 1, (w + 2 * p - kw) / s + 1);
        Some(Self {
            h,
            w,
            kh,
            kw,
            s,
            p,
            oh,
            ow,
        })
    }
}

/// Row `r` of the im2col matrix of `x` (channel `r / (kh kw)`, kernel offset `r % (kh kw)`) for output rows `rows`:
/// `rows.len() * ow` values.
fn im2col_row(x: &[f32], r: usize, row: &mut [f32], g: &Geometry, rows: std::ops::Range<usize>) {
    let Geometry {
        h,
        w,
        kh,
        kw,
        s,
        p,
        oh: _,
        ow,
    } = *g;
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
    let first = rows.start;
    for oy in rows {
        let dst = &mut row[(oy - first) * ow..(oy - first + 1) * ow];
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::norm::FastGroupNorm;
    use candle_core::Device;
    use candle_nn::{Conv2dConfig, VarBuilder, VarMap};

    /// The convolution with its unrolled input built `band` values at a time.
    fn with_band(mut c: FastConv2d, band: usize) -> FastConv2d {
        match &mut c.imp {
            ConvImpl::Candle { op: Some(op), .. } | ConvImpl::Packed { op, .. } => op.band = band,
            ConvImpl::Candle { op: None, .. } => {}
        }
        c
    }

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
        let exact = want.clone();
        let got = FastConv2d::new(conv.clone()).forward(&xs).unwrap();
        assert_eq!(want.dims(), got.dims());
        let diff = crate::ops::max_abs_diff(&want, &got);
        assert!(
            diff < 1e-4,
            "cin {cin} cout {cout} k {k} s {stride} p {padding} {h}x{w}: max diff {diff}"
        );
        // In bands of one and of two output rows.
        for rows in [1, 2] {
            let banded = with_band(FastConv2d::new(conv.clone()), cin * k * k * w * rows);
            let diff = crate::ops::max_abs_diff(&want, &banded.forward(&xs).unwrap());
            assert!(diff < 1e-4, "bands of {rows} rows: max diff {diff}");
        }
        // bf16: candle's f32 convolution of the bf16-rounded kernel and input.
        let round = |t: &Tensor| {
            t.to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        let rounded = Conv2d::new(round(conv.weight()), conv.bias().cloned(), cfg);
        let want = rounded.forward(&round(&xs)).unwrap();
        let fast = FastConv2d::new(conv.clone()).into_cpu_bf16().unwrap();
        let taps = k == 3 && stride == 1 && padding == 1 && Format::Bf16.has_fast_kernel();
        let keeps_winograd = taps
            && !crate::ops::amx::available()
            && winograd_bf16::keeps_filters([cout, cin, k, k]);
        let held = |c: &FastConv2d| {
            let ConvImpl::Packed { op, .. } = &c.imp else {
                panic!("not packed")
            };
            match op.packed.as_ref().unwrap().kernel {
                Packed::Rows(_) => "rows",
                Packed::Taps(_) | Packed::Channels(_) => "taps",
                Packed::Winograd(_) => "winograd",
            }
        };
        let expected = match (keeps_winograd, taps) {
            (true, _) => "winograd",
            (false, true) => "taps",
            (false, false) => "rows",
        };
        assert_eq!(held(&fast), expected, "the kernel's form");
        // Winograd's path: its error against the f32 convolution within 2.5x the direct bf16 product's (root mean
        // square; see `winograd_bf16`'s tests).
        if keeps_winograd {
            let exact = &exact;
            let rms = |t: &Tensor| {
                (t - exact)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .mean_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    .sqrt()
            };
            let (ours, direct) = (rms(&fast.forward(&xs).unwrap()), rms(&want));
            assert!(
                ours <= 2.5 * direct && direct > 0.0,
                "bf16 Winograd: cin {cin} cout {cout} {h}x{w}: rms error {ours}, direct bf16 {direct}"
            );
        }
        // The direct product: the f32 convolution of the rounded values up to summation order.
        let fast = FastConv2d::new(conv)
            .packed_with(Format::Bf16, false)
            .unwrap();
        assert_eq!(held(&fast), if taps { "taps" } else { "rows" });
        for banded in [fast.clone(), with_band(fast, cin * k * k * w)] {
            let diff = crate::ops::max_abs_diff(&want, &banded.forward(&xs).unwrap());
            assert!(
                diff < 1e-4,
                "bf16: cin {cin} cout {cout} k {k} s {stride} p {padding} {h}x{w}: max diff {diff}"
            );
        }
    }

    #[test]
    fn matches_candle_conv2d() {
        // (With the CPU's own features throughout: a kernel packed while another test forces the portable paths
        // would not be tap-major.)
        crate::ops::cpu::detected_only(matches_candle_conv2d_on_this_cpu);
    }

    fn matches_candle_conv2d_on_this_cpu() {
        check(5, 7, 3, 1, 1, 9, 11);
        check(5, 7, 3, 2, 1, 9, 11);
        check(5, 7, 3, 2, 0, 10, 10);
        check(4, 6, 1, 1, 0, 7, 5);
        // Large enough for 1x1 in bf16 on channel-pair rows (POINTWISE_MIN): odd channels, columns that fill no
        // block, k steps with a partial last one.
        check(7, 9, 1, 1, 0, 128, 130);
        check(66, 20, 1, 1, 0, 129, 128);
        check(3, 8, 3, 1, 1, 1, 1);
        check(16, 32, 3, 2, 1, 16, 16);
        // Wide enough for the tap-by-tap product (TAPS_MIN_WIDTH): odd channels, one row, several k blocks per
        // tap (260 channel pairs), several images.
        check(5, 7, 3, 1, 1, 3, 33);
        check(3, 8, 3, 1, 1, 1, 40);
        check(520, 20, 3, 1, 1, 2, 32);
        // Small images whose positions fit one pass of 32 rows on AMX (gathered taps, `gather_pays`): whole
        // tiles, and 30 positions with channel pairs that end mid-step and a short last column tile.
        check(40, 32, 3, 1, 1, 4, 4);
        check(33, 20, 3, 1, 1, 3, 5);
        // Channel counts that keep Winograd filters (odd, odd sizes; enough tiles for that path to run).
        check(17, 16, 3, 1, 1, 8, 8);
        check(32, 48, 3, 1, 1, 9, 13);
    }

    /// A network that keeps Winograd's convolutions in f32 (the VAE decoder) holds the 3x3 ones Winograd can run
    /// in f32 in the CPU bf16 mode, and packs the others (1x1, too few channels) as usual.
    #[test]
    fn winograd_in_f32_keeps_those_convolutions_in_f32() {
        crate::ops::cpu::detected_only(|| {
            let dev = Device::Cpu;
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
            let w = Weights::new(vb, crate::precision::Precision::CpuBf16);
            let cfg = Conv2dConfig {
                padding: 1,
                ..Default::default()
            };
            let packed = |c: &FastConv2d| matches!(c.imp, ConvImpl::Packed { .. });
            // (On AMX the bf16 product is faster than f32 Winograd: packed either way.)
            let winograd = Format::F32.has_fast_kernel()
                && super::super::kernels_enabled()
                && !crate::ops::amx::available();
            let wide = FastConv2d::load(32, 32, 3, cfg, &w.pp("a")).unwrap();
            assert!(packed(&wide), "without the flag: packed in bf16");
            let f = w.clone().winograd_in_f32();
            let wide = FastConv2d::load(32, 32, 3, cfg, &f.pp("b")).unwrap();
            assert_eq!(
                packed(&wide),
                !winograd,
                "with the flag: f32 where Winograd runs"
            );
            let pointwise = FastConv2d::load(32, 32, 1, Default::default(), &f.pp("c")).unwrap();
            assert!(packed(&pointwise), "1x1: packed");
            let narrow = FastConv2d::load(4, 32, 3, cfg, &f.pp("d")).unwrap();
            assert!(packed(&narrow), "4 input channels: packed");
            // And it computes the same convolution as candle's on the f32 weights.
            let xs = Tensor::randn(0f32, 1., (1, 32, 40, 40), &dev).unwrap();
            let ConvImpl::Candle { inner, .. } = &wide.imp else {
                return;
            };
            let diff =
                crate::ops::max_abs_diff(&inner.forward(&xs).unwrap(), &wide.forward(&xs).unwrap());
            assert!(diff < 1e-3, "max diff {diff}");
        });
    }

    /// A group norm over `c` channels with random weights and biases (so that its parameters matter).
    fn random_norm(groups: usize, c: usize) -> FastGroupNorm {
        let dev = Device::Cpu;
        let map = [
            ("weight", Tensor::randn(1f32, 0.5, c, &dev).unwrap()),
            ("bias", Tensor::randn(0f32, 0.5, c, &dev).unwrap()),
        ]
        .map(|(k, v)| (k.to_string(), v))
        .into_iter()
        .collect();
        FastGroupNorm::new(
            groups,
            c,
            1e-6,
            VarBuilder::from_tensors(map, DType::F32, &dev),
        )
        .unwrap()
    }

    /// A group norm and SiLU fused into the convolution's input, and a residual into its output, give exactly the
    /// separate ops' result (the same parameters, arithmetic and rounding), for several group sizes, odd channels
    /// and both images.
    #[test]
    fn norm_silu_fused_matches_the_two_ops() {
        crate::ops::cpu::detected_only(|| {
            let dev = Device::Cpu;
            for (cin, cout, groups, h, w) in
                [(64, 48, 32, 9, 13), (30, 20, 5, 6, 33), (96, 17, 8, 4, 4)]
            {
                let vm = VarMap::new();
                let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
                let cfg = Conv2dConfig {
                    padding: 1,
                    ..Default::default()
                };
                let conv = candle_nn::conv2d(cin, cout, 3, cfg, vb).unwrap();
                let conv = FastConv2d::new(conv).into_cpu_bf16().unwrap();
                let norm = random_norm(groups, cin);
                // An offset and scale per channel, so that the statistics matter.
                let xs = (Tensor::randn(0f32, 2., (2, cin, h, w), &dev).unwrap() + 0.7).unwrap();
                let two = conv.forward(&norm.forward_silu(&xs).unwrap()).unwrap();
                let fused = conv.forward_norm_silu(&norm, &xs).unwrap();
                assert_eq!(
                    crate::ops::max_abs_diff(&two, &fused),
                    0.0,
                    "cin {cin} cout {cout} groups {groups} {h}x{w}"
                );
                // With a residual, plain and divided.
                let skip = Tensor::randn(0f32, 1., two.dims(), &dev).unwrap();
                for divisor in [1.0, 1.5] {
                    let want = crate::ops::add::add(&skip, &two, divisor).unwrap();
                    let got = conv
                        .forward_norm_silu_add(&norm, &xs, &skip, divisor)
                        .unwrap();
                    assert_eq!(
                        crate::ops::max_abs_diff(&want, &got),
                        0.0,
                        "residual / {divisor}"
                    );
                }
            }
        });
    }

    /// A resnet's two convolutions with the tensor between them kept channels last ([`FastConv2d::forward_resnet`])
    /// give the ops one by one: the first half exactly (its output is the same tensor, transposed, the time
    /// embedding added), the whole up to the order of the second norm's f64 sums; odd channels and sizes, with
    /// and without a time embedding, both images. Without channels-last kernels (no AMX), or below
    /// [`RESNET_LAST_MIN_CHANNELS`], it declines.
    #[test]
    fn resnet_channels_last_matches_the_ops() {
        crate::ops::cpu::detected_only(|| {
            let dev = Device::Cpu;
            let cfg = Conv2dConfig {
                padding: 1,
                ..Default::default()
            };
            for (cin, cout, g1, g2, h, w, temb) in [
                (64, 256, 32, 16, 9, 13, true),
                (30, 259, 5, 7, 6, 33, true),
                (96, 320, 8, 32, 4, 4, false),
                (64, 48, 32, 16, 5, 5, true),
            ] {
                let conv = |cin, cout| {
                    let vm = VarMap::new();
                    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
                    let c = candle_nn::conv2d(cin, cout, 3, cfg, vb).unwrap();
                    FastConv2d::new(c).into_cpu_bf16().unwrap()
                };
                let (conv1, conv2) = (conv(cin, cout), conv(cout, cout));
                let (norm1, norm2) = (random_norm(g1, cin), random_norm(g2, cout));
                if crate::ops::amx::available() && super::super::kernels_enabled() {
                    assert!(conv1
                        .channels_last(&Tensor::zeros(1, DType::F32, &dev).unwrap())
                        .is_some());
                }
                let xs = (Tensor::randn(0f32, 2., (2, cin, h, w), &dev).unwrap() + 0.7).unwrap();
                let t = temb.then(|| Tensor::randn(0f32, 1., (2, cout), &dev).unwrap());
                let skip = Tensor::randn(0f32, 1., (2, cout, h, w), &dev).unwrap();
                let got = conv1
                    .forward_resnet(&norm1, &xs, t.as_ref(), &norm2, &conv2, &skip, 1.5)
                    .unwrap();
                let Some(got) = got else {
                    assert!(
                        conv1.channels_last(&xs).is_none() || cout < RESNET_LAST_MIN_CHANNELS,
                        "declined channels-last kernels"
                    );
                    continue;
                };
                let mut hs = conv1.forward_norm_silu(&norm1, &xs).unwrap();
                if let Some(t) = &t {
                    hs = crate::ops::add::add_channels(&hs, t).unwrap();
                }
                let want = conv2
                    .forward_norm_silu_add(&norm2, &hs, &skip, 1.5)
                    .unwrap();
                // The first half alone.
                let (op, bias) = conv1.channels_last(&xs).unwrap();
                let first = FusedOp {
                    op: op.clone(),
                    norm: norm1.channel_norm().unwrap().unwrap(),
                    divisor: None,
                    last: Last::Output,
                };
                let half = match &t {
                    Some(t) => xs.apply_op3_no_bwd(bias, t, &first),
                    None => xs.apply_op2_no_bwd(bias, &first),
                }
                .unwrap();
                let half = crate::ops::cpu::lined_view(&half, &[2, h, w, cout]).unwrap();
                let planar = half.permute((0, 3, 1, 2)).unwrap();
                assert_eq!(
                    crate::ops::max_abs_diff(&planar, &hs),
                    0.0,
                    "first half: cin {cin} cout {cout} {h}x{w}"
                );
                assert_eq!(got.dims(), want.dims());
                let scale = crate::ops::max_abs(&want);
                let diff = crate::ops::max_abs_diff(&got, &want);
                assert!(
                    diff <= 1e-3 * scale,
                    "cin {cin} cout {cout} {h}x{w}: max diff {diff} (values up to {scale})"
                );
            }
        });
    }

    /// An upsampler's convolution of its input upsampled as it is written gives exactly the two ops' result
    /// (upsample, then convolve), with odd channels and sizes, both images, in f32 and in the CPU bf16 mode
    /// (channels last on AMX; the two ops elsewhere).
    #[test]
    fn upsampled_matches_the_two_ops() {
        crate::ops::cpu::detected_only(|| {
            let dev = Device::Cpu;
            for (cin, cout, h, w) in [(64, 48, 5, 7), (31, 20, 3, 17), (16, 16, 1, 1)] {
                let vm = VarMap::new();
                let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
                let cfg = Conv2dConfig {
                    padding: 1,
                    ..Default::default()
                };
                let conv = candle_nn::conv2d(cin, cout, 3, cfg, vb).unwrap();
                let xs = (Tensor::randn(0f32, 2., (2, cin, h, w), &dev).unwrap() + 0.7).unwrap();
                for conv in [
                    FastConv2d::new(conv.clone()),
                    FastConv2d::new(conv.clone()).into_cpu_bf16().unwrap(),
                ] {
                    let up = crate::ops::layout::upsample_nearest(&xs, 2).unwrap();
                    let two = conv.forward(&up).unwrap();
                    let fused = conv.forward_upsampled(&xs).unwrap();
                    assert_eq!(two.dims(), &[2, cout, 2 * h, 2 * w]);
                    assert_eq!(fused.dims(), two.dims());
                    assert_eq!(
                        crate::ops::max_abs_diff(&two, &fused),
                        0.0,
                        "cin {cin} cout {cout} {h}x{w}"
                    );
                }
            }
        });
    }

    /// A kernel without input channels (a hostile or degenerate file) gives the bias in every plane, on every
    /// path, never uninitialised values.
    #[test]
    fn no_input_channels_give_the_bias() {
        crate::ops::cpu::detected_only(|| {
            let dev = Device::Cpu;
            let cfg = Conv2dConfig {
                padding: 1,
                ..Default::default()
            };
            let bias = Tensor::new(&[0.5f32, -1.0, 2.0], &dev).unwrap();
            let conv = Conv2d::new(
                Tensor::zeros((3, 0, 3, 3), DType::F32, &dev).unwrap(),
                Some(bias.clone()),
                cfg,
            );
            let xs = Tensor::zeros((2, 0, 4, 5), DType::F32, &dev).unwrap();
            let want = bias
                .reshape((1, 3, 1, 1))
                .unwrap()
                .broadcast_as((2, 3, 4, 5))
                .unwrap();
            for fast in [
                FastConv2d::new(conv.clone()),
                FastConv2d::new(conv.clone()).into_cpu_bf16().unwrap(),
            ] {
                let got = fast.forward(&xs).unwrap();
                assert_eq!(crate::ops::max_abs_diff(&got, &want), 0.0);
                let norm =
                    FastGroupNorm::new(1, 0, 1e-6, VarBuilder::zeros(DType::F32, &dev)).unwrap();
                let skip = Tensor::ones((2, 3, 4, 5), DType::F32, &dev).unwrap();
                let got = fast.forward_norm_silu_add(&norm, &xs, &skip, 1.0).unwrap();
                assert_eq!(crate::ops::max_abs_diff(&got, &(&want + 1.0).unwrap()), 0.0);
            }
        });
    }

    /// The tap-by-tap product on the portable path (the f32 GEMM on the shifted rows written out) gives the
    /// same numbers.
    #[test]
    fn taps_portable_path_matches() {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv = candle_nn::conv2d(6, 9, 3, cfg, vb).unwrap();
        let conv = Conv2d::new(
            conv.weight().clone(),
            Some(Tensor::randn(0f32, 1., 9, &dev).unwrap()),
            cfg,
        );
        let fast = FastConv2d::new(conv).into_cpu_bf16().unwrap();
        let xs = Tensor::randn(0f32, 1., (2, 6, 5, 34), &dev).unwrap();
        let want = fast.forward(&xs).unwrap();
        let got = crate::ops::cpu::force_portable(|| fast.forward(&xs).unwrap());
        let diff = crate::ops::max_abs_diff(&want, &got);
        assert!(diff < 1e-4, "max diff {diff}");
    }
}
