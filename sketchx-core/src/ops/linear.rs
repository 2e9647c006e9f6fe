//! Linear layers on the crate's GEMM ([`super::gemm`]) on the CPU, candle's `Linear` elsewhere.
//!
//! The weight is packed once, at load, into the layout of the GEMM's right operand (`W^T` in column panels),
//! replacing the plain copy: in f32 when the CPU has AVX-512, and rounded to bf16 in the CPU bf16 mode (see
//! [`crate::precision::Precision::CpuBf16`]), where each call also rounds the input to bf16 and accumulates in f32 on top of the (f32) bias.
//! Such a layer also takes a bf16 input as it is (a producer that rounded its output already, [`FastLinear::takes_bf16`]);
//! everything else around the product stays f32.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::Linear;
use half::slice::HalfFloatSliceExt;

use crate::precision::Weights;

use super::cpu::{Kept, Out, SendPtr, Values};
use super::gemm::{
    convert_bf16_parallel, fills_uninit, gemm_bf16_from, gemm_f32_from, gemm_rows_uninit, Format,
    PackedB, Start, NR,
};

/// A linear layer's input in bf16, in memory kept between calls.
static ROUNDED: Kept<Vec<u16>> = Kept::new(Vec::new());

/// A packed layer's input rows: f32 values, or bf16 bit patterns (for a layer packed in bf16).
impl Values<'_> {
    /// `f` on the rows as bf16 bit patterns: as they are, or rounded into memory kept between calls.
    fn in_bf16<R>(self, f: impl FnOnce(&[u16]) -> R) -> R {
        match self {
            Self::Bf16(x) => f(x),
            Self::F32(x) => ROUNDED.with(x.len(), |rounded| {
                convert_bf16_parallel(x, rounded);
                f(rounded)
            }),
        }
    }
}

/// A linear layer `y = x W^T + b`.
#[derive(Debug, Clone)]
pub enum FastLinear {
    /// candle's layer (other devices and dtypes, CPUs without AVX-512, or the kernels turned off).
    Candle(Linear),
    /// The weight packed for the crate's GEMM, in f32 or bf16; f32 in and out.
    Packed(PackedLinearOp),
}

/// The product of a packed [`FastLinear`], as a candle custom op on CPU tensors; its result is lined
/// ([`super::cpu::Out`]: the whole vector, of which [`FastLinear`] takes the view).
#[derive(Debug, Clone)]
pub struct PackedLinearOp {
    weight: Arc<PackedB>,
    bias: Option<Arc<Vec<f32>>>,
}

impl FastLinear {
    /// Loads `weight` (`[out, in]`) and, when `bias`, `bias` (`[out]`) from `weights`, packed in bf16 when its precision
    /// says so (the CPU bf16 mode).
    pub fn load(in_dim: usize, out_dim: usize, bias: bool, weights: &Weights) -> Result<Self> {
        Ok(Self::load_shaped(in_dim, out_dim, bias, weights, false, false)?.0)
    }

    /// [`Self::load`] from a 1x1 convolution's `weight` (`[out, in, 1, 1]`), with its bias: the same product on
    /// channels-last rows (positions), e.g. a transformer's `proj_in` on its tokens.
    pub fn load_1x1(in_dim: usize, out_dim: usize, weights: &Weights) -> Result<Self> {
        Ok(Self::load_shaped(in_dim, out_dim, true, weights, true, false)?.0)
    }

    /// The layer, and whether its output features were packed in GEGLU pairs (asked for with `pairs`; see
    /// [`GegluLinear`]).
    fn load_shaped(
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        weights: &Weights,
        conv_1x1: bool,
        pairs: bool,
    ) -> Result<(Self, bool)> {
        let vb = weights.vb();
        let precision = if super::packs_bf16(weights.precision()) {
            Format::Bf16
        } else {
            Format::F32
        };
        let packed = precision == Format::Bf16
            || (vb.dtype() == DType::F32
                && vb.device().is_cpu()
                && super::kernels_enabled()
                && Format::F32.has_fast_kernel());
        let w = if conv_1x1 {
            vb.get((out_dim, in_dim, 1, 1), "weight")?
                .reshape((out_dim, in_dim))?
        } else {
            vb.get((out_dim, in_dim), "weight")?
        };
        let b = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        if !packed {
            return Ok((Self::Candle(Linear::new(w, b)), false));
        }
        let mut w = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut bias = match b {
            Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => None,
        };
        let pairs = pairs && precision == Format::Bf16 && pairs_fit(out_dim) && in_dim > 0;
        if pairs {
            w = in_geglu_pairs(&w, in_dim);
            bias = bias.map(|b| in_geglu_pairs(&b, 1));
        }
        let op = PackedLinearOp {
            weight: Arc::new(PackedB::from_transposed(&w, out_dim, in_dim, precision)),
            bias: bias.map(Arc::new),
        };
        Ok((Self::Packed(op), pairs))
    }

    /// Output features.
    pub fn out_dim(&self) -> Result<usize> {
        match self {
            Self::Candle(l) => l.weight().dim(0),
            Self::Packed(op) => Ok(op.weight.n()),
        }
    }

    /// Input features.
    pub fn in_dim(&self) -> Result<usize> {
        match self {
            Self::Candle(l) => l.weight().dim(1),
            Self::Packed(op) => Ok(op.weight.k()),
        }
    }

    /// Whether the layer takes a bf16 tensor as it is: packed in bf16, it rounds its input to bf16 anyway, so a
    /// producer may hand it rounded values (the same bits, without the f32 copy and the rounding pass). Every
    /// layer accepts bf16 inputs; the others convert them to f32 first.
    pub fn takes_bf16(&self) -> bool {
        matches!(self, Self::Packed(op) if op.weight.format() == Format::Bf16)
    }

    /// `xs` as the packed op `op` reads it: contiguous, bf16 as it is for a layer packed in bf16, else f32.
    fn op_input(op: &PackedLinearOp, xs: &Tensor) -> Result<Tensor> {
        if xs.dtype() == DType::BF16 && op.weight.format() == Format::Bf16 {
            xs.contiguous()
        } else {
            xs.to_dtype(DType::F32)?.contiguous()
        }
    }

    /// `self.forward(xs) + residual` (a transformer block's residual connection; `residual` has the output's
    /// shape): a packed layer adds it as the product stores its result, which saves a pass over both and the
    /// output-sized temporary; the values are the same bits as the two steps apart. Timed as `linear` (with the
    /// residual's addition).
    pub fn forward_add(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let fits = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        match self {
            Self::Packed(op) if fits(residual) && super::kernels_enabled() => {
                self.with_residual(op, xs, residual, &LinearAddOp(op))
            }
            _ => super::add::add(&self.forward(xs)?, residual, 1.0),
        }
    }

    /// `self.forward(xs)` on tokens `(b, h * w, k)` as an image `(b, n, h, w)` plus `residual` (of that shape):
    /// [`super::layout::to_image_add`] of the product, a transformer's projection out. On AMX each finished tile
    /// of the product is written transposed into the image's planes with the residual added, so the tokens'
    /// result is never stored; the same bits. Timed as `linear` there (the layout change included), else as
    /// `linear` and `layout`.
    pub fn forward_to_image_add(
        &self,
        xs: &Tensor,
        (h, w): (usize, usize),
        residual: &Tensor,
    ) -> Result<Tensor> {
        let fits = |op: &PackedLinearOp| {
            super::kernels_enabled()
                && super::amx::available()
                && op.weight.format() == Format::Bf16
                && op.weight.k() > 0
                && (h * w) % 16 == 0
                && xs.device().is_cpu()
                && residual.device().is_cpu()
                && residual.dtype() == DType::F32
        };
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Packed(op) if fits(op) => super::profile::scope_flops(
                self.profile_kind(xs),
                || self.flops(xs),
                || {
                    let (b, n) = (residual.dim(0)?, op.weight.n());
                    Self::op_input(op, xs)?
                        .apply_op2_no_bwd(&residual.contiguous()?, &ImageAddOp { op, hw: h * w })?
                        .reshape((b, n, h, w))
                },
            ),
            _ => super::layout::to_image_add(&self.forward(xs)?, h, w, residual),
        }
    }

    /// `x W^T + b` for a consumer that rounds it to bf16 anyway (attention's products in the CPU bf16 mode): a
    /// layer packed in bf16 on AMX rounds each tile of the product as it hands it on (as
    /// [`super::gemm::convert_bf16`] rounds) and returns a bf16 tensor, half the bytes of the f32 result it never
    /// writes; other layers return [`Module::forward`]'s f32 result. Timed as `linear`.
    pub fn forward_rounded(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Packed(op) if op.rounds_tiles(xs) => super::profile::scope_flops(
                self.profile_kind(xs),
                || self.flops(xs),
                || {
                    let out = Self::op_input(op, xs)?.apply_op1_no_bwd(&RoundedLinearOp(op))?;
                    super::cpu::lined_view(&out, &op.out_dims(xs))
                },
            ),
            _ => self.forward(xs),
        }
    }

    /// [`Self::forward_add`] for a consumer that rounds the sum to bf16 anyway (a transformer block's output,
    /// which only its projection out reads): a layer packed in bf16 on AMX adds the residual to each tile of the
    /// product and rounds the sum as the product hands it on ([`Self::forward_rounded`]); others return
    /// [`Self::forward_add`]'s f32 sum. Timed as `linear`.
    pub fn forward_add_rounded(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        match self {
            Self::Packed(op)
                if op.rounds_tiles(xs)
                    && residual.device().is_cpu()
                    && residual.dtype() == DType::F32 =>
            {
                self.with_residual(op, xs, residual, &RoundedLinearOp(op))
            }
            _ => self.forward_add(xs, residual),
        }
    }

    /// `custom` (the packed layer `op`'s product plus `residual`) on `xs`, timed as `linear`: the lined output's
    /// view in the output's dimensions.
    fn with_residual(
        &self,
        op: &PackedLinearOp,
        xs: &Tensor,
        residual: &Tensor,
        custom: &impl CustomOp2,
    ) -> Result<Tensor> {
        super::profile::scope_flops(
            self.profile_kind(xs),
            || self.flops(xs),
            || {
                let out =
                    Self::op_input(op, xs)?.apply_op2_no_bwd(&residual.contiguous()?, custom)?;
                super::cpu::lined_view(&out, &op.out_dims(xs))
            },
        )
    }

    /// The profile's kind for this layer on `xs`: `linear`, with the shapes when timing by shape.
    fn profile_kind(&self, xs: &Tensor) -> &'static str {
        super::profile::shaped("linear", || {
            let (k, n) = (self.in_dim().unwrap_or(0), self.out_dim().unwrap_or(0));
            format!("{:?} {k}x{n}", xs.dims())
        })
    }

    /// Multiply-adds x 2 of the product on `xs`.
    fn flops(&self, xs: &Tensor) -> u64 {
        let (k, n) = (self.in_dim().unwrap_or(0), self.out_dim().unwrap_or(0));
        (2 * (xs.elem_count() / k.max(1)) * k * n) as u64
    }

    /// `geglu(x W^T + b)` ([`super::geglu::geglu`] over this layer's output; see [`GegluLinear::forward`]), its
    /// output features packed in GEGLU pairs when `pairs`.
    fn geglu(&self, xs: &Tensor, bf16: bool, pairs: bool) -> Result<Tensor> {
        match self {
            Self::Packed(op) if op.weight.n() % 2 == 0 && op.weight.k() > 0 => {
                let out = Self::op_input(op, xs)?.apply_op1_no_bwd(&GegluLinearOp {
                    linear: op,
                    block_rows: None,
                    bf16,
                    pairs,
                })?;
                let mut dims = op.out_dims(xs);
                if let Some(last) = dims.last_mut() {
                    *last /= 2;
                }
                super::cpu::lined_view(&out, &dims)
            }
            _ => super::geglu::geglu(&self.forward(xs)?),
        }
    }
}

/// A feed-forward's projection into GEGLU (diffusers' `GEGLU`: `hidden * gelu(gate)` over the two halves of
/// `x W^T + b`). In the CPU bf16 mode on AMX its output features are packed in pairs ([`in_geglu_pairs`]), so that
/// GEGLU runs in the product's epilogue on tiles still in the cache instead of in a pass over the projection
/// (written in f32, read back); the values are the same bits.
#[derive(Debug, Clone)]
pub struct GegluLinear {
    layer: FastLinear,
    /// The packed layer's output features are in GEGLU pairs.
    pairs: bool,
}

impl GegluLinear {
    /// Loads the projection `weight` (`[out, in]`: the hidden half, then the gates) and `bias` from `weights`, as
    /// [`FastLinear::load`] does.
    pub fn load(in_dim: usize, out_dim: usize, weights: &Weights) -> Result<Self> {
        let pairs = super::amx::available();
        let (layer, pairs) = FastLinear::load_shaped(in_dim, out_dim, true, weights, false, pairs)?;
        Ok(Self { layer, pairs })
    }

    /// Whether the layer takes a bf16 input as it is ([`FastLinear::takes_bf16`]).
    pub fn takes_bf16(&self) -> bool {
        self.layer.takes_bf16()
    }

    /// `geglu(x W^T + b)`. A packed layer runs the product in blocks of rows, each block through GEGLU straight
    /// away, so that the projection at full width (42 MB per image on 64 x 64 latents, fresh pages at every call
    /// at that size) is never allocated, or on AMX with GEGLU in the product's epilogue; the values are the same
    /// bits as the two steps apart. The product is timed as `linear`, GEGLU as `geglu` (or within `linear` on
    /// AMX). With `bf16`, a packed layer's result is rounded to bf16 (a BF16 tensor) for a consumer that takes it
    /// as it is ([`FastLinear::takes_bf16`]); the result is f32 otherwise.
    pub fn forward(&self, xs: &Tensor, bf16: bool) -> Result<Tensor> {
        self.layer.geglu(xs, bf16, self.pairs)
    }
}

/// Values of the projection computed at once by [`GegluLinear::forward`] (16 MiB) when a block does not stay
/// in the caches, at least [`GEGLU_MIN_ROWS`] rows.
const GEGLU_BLOCK_VALUES: usize = 1 << 22;

/// The fewest rows per such block: the GEMM splits a block into tiles of up to 128 rows.
const GEGLU_MIN_ROWS: usize = 128;

/// Bytes of a block of the projection per thread (f32) that stay in its L2 cache between the product and GEGLU
/// (half of a Zen 4 core's 1 MiB).
const GEGLU_CACHED_BYTES: usize = 1 << 19;

/// Rows per block of [`GegluLinear::forward`] for a `k x n` layer and `threads` threads: as many as stay in
/// the threads' caches ([`GEGLU_CACHED_BYTES`] each, f32) when that is at least `k / 4` rows, for then reading the
/// weights again per block (`2 k n` bytes in bf16) costs less than writing the block to memory and reading it
/// back (about `8 n` bytes per row); [`GEGLU_BLOCK_VALUES`] otherwise.
fn geglu_block_rows(k: usize, n: usize, threads: usize) -> usize {
    let cached = threads * GEGLU_CACHED_BYTES / (4 * n.max(1));
    if cached >= (k / 4).max(32) {
        cached
    } else {
        (GEGLU_BLOCK_VALUES / n.max(1)).max(GEGLU_MIN_ROWS)
    }
}

/// A packed layer's product followed by GEGLU, block by block (see [`GegluLinear::forward`]), or on AMX in the
/// product's epilogue for a layer packed in pairs (see [`GegluLinear`]).
struct GegluLinearOp<'a> {
    linear: &'a PackedLinearOp,
    /// Rows of the projection per block: [`geglu_block_rows`]'s when `None` (set in tests, to cross block edges
    /// on small inputs).
    block_rows: Option<usize>,
    /// Output in bf16.
    bf16: bool,
    /// The layer's output features are packed in GEGLU pairs ([`in_geglu_pairs`]).
    pairs: bool,
}

impl CustomOp1 for GegluLinearOp<'_> {
    fn name(&self) -> &'static str {
        "sketchx-linear-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = Values::of(s, l, "linear input")?;
        let n = self.linear.weight.n();
        let half = n / 2;
        let (m, shape) = self.linear.rows_and_shape(l, half)?;
        let k = self.linear.weight.k();
        #[cfg(target_arch = "x86_64")]
        if self.pairs && super::amx::available() && m > 0 {
            let mut out = Output::uninit(m * half, self.bf16);
            let kind = super::profile::shaped("linear", || format!("{m} rows {k}x{n} GEGLU"));
            let flops = (2 * m * k * n) as u64;
            super::profile::scope_flops(kind, || flops, || self.fused(x, m, &mut out));
            // SAFETY: the epilogue wrote every row's `half` values (every pair of tiles is handed on once).
            return Ok(unsafe { out.written(shape) });
        }
        let run = if self.pairs { NR } else { half };
        let rows = self
            .block_rows
            .unwrap_or_else(|| geglu_block_rows(k, n, rayon::current_num_threads()))
            .min(m)
            .max(1);
        // Never zeroed in f32: each block's GEGLU writes its rows (the blocks cover the m rows).
        let mut out = Output::new(m * half, self.bf16);
        static BLOCK: Kept<Vec<f32>> = Kept::new(Vec::new());
        BLOCK.with(rows * n, |block| -> Result<()> {
            for (i, r0) in (0..x.len()).step_by(rows * k).enumerate() {
                let xb = x.slice(r0..(r0 + rows * k).min(x.len()));
                let h = &mut block[..xb.len() / k * n];
                let flops = (2 * h.len() * k) as u64;
                let kind = super::profile::shaped("linear", || format!("{m} rows {k}x{n} GEGLU"));
                super::profile::scope_flops(kind, || flops, || self.linear.product(xb, h))?;
                let outs = i * rows * half..i * rows * half + h.len() / 2;
                super::profile::scope("geglu", || match &mut out {
                    Output::F32(o) => super::geglu::geglu_rows(h, &mut o.spare()[outs], half, run),
                    Output::Bf16(o) => super::geglu::geglu_rows_bf16(
                        h,
                        o.values()[outs].reinterpret_cast_mut(),
                        half,
                        run,
                    ),
                });
            }
            Ok(())
        })?;
        // SAFETY: every block's rows were written (above).
        Ok(unsafe { out.written(shape) })
    }
}

impl GegluLinearOp<'_> {
    /// The product on AMX with GEGLU in its epilogue, for a layer packed in pairs: each pair of 16 x 16 tiles
    /// (16 hidden columns and their 16 gates) becomes 16 x 16 values of `out`, straight from the tiles, in the
    /// same operations as [`super::geglu::geglu_rows`] (the same bits).
    #[cfg(target_arch = "x86_64")]
    fn fused(&self, x: Values, m: usize, out: &mut Output) {
        use super::simd::TileOut;
        const T: usize = NR * NR;
        let (k, half) = (self.linear.weight.k(), self.linear.weight.n() / 2);
        let out = match out {
            Output::F32(o) => TileOut::F32(o.ptr(), half),
            Output::Bf16(o) => TileOut::Bf16(o.ptr().cast::<u16>(), half),
        };
        let epilogue =
            |row: usize, col: usize, [h, g]: [&[f32; T]; 2], rows: usize, cols: [usize; 2]| {
                debug_assert_eq!(cols, [NR, NR], "pairs fill both tiles");
                // The pair's 32 columns of the projection are 16 of the output.
                // SAFETY: AMX implies AVX-512 F and BF16; rows `row..row + rows` of the output (m rows of `half`)
                // are inside, and these 16 columns of them are this pair's alone.
                unsafe { super::simd::geglu_tile(h, g, rows, out.at(row * half + col / 2)) };
            };
        let bias = self.linear.bias.as_deref().map(Vec::as_slice);
        let to = super::amx::Handed::Pairs(&epilogue);
        // SAFETY: AMX is available (the caller checked); `a` holds `m` rows of `k` entries; the bias holds `n`
        // values; the epilogue writes only its pair's rows and columns of the output.
        x.in_bf16(|a| unsafe {
            super::amx::gemm_handed(m, (a.as_ptr(), k), &self.linear.weight, bias, to, true)
        });
    }
}

/// Whether a layer of `n` output features can be packed in GEGLU pairs: two halves of whole panels.
fn pairs_fit(n: usize) -> bool {
    n.is_multiple_of(2 * NR) && n > 0
}

/// The rows of `w` (`n` rows of `width` values: a GEGLU projection's weight or bias, the hidden half first)
/// reordered in pairs of panels: 16 hidden rows, their 16 gate rows, the next 16 hidden rows, and so on. Packed,
/// each column block of the AMX product then holds 16 hidden columns and their gates, and its epilogue applies
/// GEGLU on the spot.
fn in_geglu_pairs(w: &[f32], width: usize) -> Vec<f32> {
    let half = w.len() / width / 2;
    let mut out = Vec::with_capacity(w.len());
    for p in 0..half / NR {
        for from in [p * NR, half + p * NR] {
            out.extend_from_slice(&w[from * width..(from + NR) * width]);
        }
    }
    out
}

/// A fused op's output, lined ([`super::cpu::Out`]): f32, or bf16 bit patterns.
enum Output {
    F32(Out<f32>),
    Bf16(Out<half::bf16>),
}

impl Output {
    /// Room for `len` values, bf16 (zeroed) when `bf16`.
    fn new(len: usize, bf16: bool) -> Self {
        if bf16 {
            Self::Bf16(Out::zeroed(len, true))
        } else {
            Self::F32(Out::uninit(len, true))
        }
    }

    /// Room for `len` values, never initialised (all written through [`Out::ptr`] before [`Self::written`]).
    fn uninit(len: usize, bf16: bool) -> Self {
        if bf16 {
            Self::Bf16(Out::uninit(len, true))
        } else {
            Self::F32(Out::uninit(len, true))
        }
    }

    /// The storage and the shape the op returns.
    ///
    /// # Safety
    /// All values must have been written.
    unsafe fn written(self, shape: Shape) -> (CpuStorage, Shape) {
        // SAFETY (both): the contract.
        match self {
            Self::F32(o) => {
                let (v, shape) = unsafe { o.finish(shape) };
                (CpuStorage::F32(v), shape)
            }
            Self::Bf16(o) => {
                let (v, shape) = unsafe { o.finish(shape) };
                (CpuStorage::BF16(v), shape)
            }
        }
    }
}

impl Module for FastLinear {
    /// `x W^T + b`, timed as `linear`.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        super::profile::scope_flops(
            self.profile_kind(xs),
            || self.flops(xs),
            || match self {
                Self::Candle(l) => l.forward(&xs.to_dtype(l.weight().dtype())?),
                Self::Packed(op) => {
                    let out = Self::op_input(op, xs)?.apply_op1_no_bwd(op)?;
                    super::cpu::lined_view(&out, &op.out_dims(xs))
                }
            },
        )
    }
}

impl CustomOp1 for PackedLinearOp {
    fn name(&self) -> &'static str {
        "sketchx-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.forward_rows(Values::of(s, l, "linear input")?, l, None)
    }
}

/// A bf16 layer's product on AMX, each tile rounded to bf16 as it is handed on ([`FastLinear::forward_rounded`]).
struct RoundedLinearOp<'a>(&'a PackedLinearOp);

impl CustomOp1 for RoundedLinearOp<'_> {
    fn name(&self) -> &'static str {
        "sketchx-linear-rounded"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.rounded(Values::of(s, l, "linear input")?, l, None)
    }
}

impl CustomOp2 for RoundedLinearOp<'_> {
    fn name(&self) -> &'static str {
        "sketchx-linear-add-rounded"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, add) = self.0.rows_and_residual((s1, l1), (s2, l2))?;
        self.rounded(x, l1, Some(add))
    }
}

impl RoundedLinearOp<'_> {
    /// The product of the rows `x` (layout `l`), plus `add` (laid out as the output, checked by the caller) if
    /// given, rounded tile by tile into a bf16 output.
    fn rounded(&self, x: Values, l: &Layout, add: Option<&[f32]>) -> Result<(CpuStorage, Shape)> {
        let op = self.0;
        let (k, n) = (op.weight.k(), op.weight.n());
        let (m, shape) = op.rows_and_shape(l, n)?;
        let mut out = Out::<half::bf16>::uninit(m * n, true);
        #[cfg(target_arch = "x86_64")]
        if m > 0 && n > 0 {
            let o = SendPtr(out.ptr().cast::<u16>());
            let epilogue = |row: usize, col: usize, tile: &[f32; 256], rows: usize, cols: usize| {
                let o = &o;
                // SAFETY: AMX implies AVX-512 F, BW and BF16; the tile's rows and columns lie inside the m x n
                // output (and `add`, laid out as it), and no other tile writes them.
                unsafe {
                    super::simd::round_tile(
                        tile,
                        (rows, cols),
                        None,
                        add.map(|a| (a[row * n + col..].as_ptr(), n)),
                        o.0.add(row * n + col),
                        n,
                    )
                };
            };
            let bias = op.bias.as_deref().map(Vec::as_slice);
            // SAFETY: AMX is available (`rounds_tiles` held before the op was made); `a` holds `m`
            // rows of `k` entries; a bias holds `n` values.
            x.in_bf16(|a| unsafe {
                super::amx::gemm_handed(
                    m,
                    (a.as_ptr(), k),
                    &op.weight,
                    bias,
                    super::amx::Handed::Tiles(&epilogue),
                    true,
                )
            });
        }
        #[cfg(not(target_arch = "x86_64"))]
        if m > 0 && n > 0 {
            let _ = (x, k, add);
            candle_core::bail!("linear: rounded tiles need AMX");
        }
        // SAFETY: the product handed on every tile of the m x n output (or there is none), each rounded into it.
        let (v, shape) = unsafe { out.finish(shape) };
        Ok((CpuStorage::BF16(v), shape))
    }
}

/// A packed layer's product plus values of the output's shape ([`FastLinear::forward_add`]).
struct LinearAddOp<'a>(&'a PackedLinearOp);

impl CustomOp2 for LinearAddOp<'_> {
    fn name(&self) -> &'static str {
        "sketchx-linear-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, add) = self.0.rows_and_residual((s1, l1), (s2, l2))?;
        self.0.forward_rows(x, l1, Some(add))
    }
}

/// A packed layer's product on tokens written transposed into an image plus a residual, on AMX
/// ([`FastLinear::forward_to_image_add`]); `hw` positions per image, a multiple of 16 (so that no tile of 16 rows
/// spans two images).
#[cfg(target_arch = "x86_64")]
struct ImageAddOp<'a> {
    op: &'a PackedLinearOp,
    hw: usize,
}

#[cfg(target_arch = "x86_64")]
impl CustomOp2 for ImageAddOp<'_> {
    fn name(&self) -> &'static str {
        "sketchx-linear-image-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = Values::of(s1, l1, "linear input")?;
        let residual = super::cpu::contiguous_f32(s2, l2, "residual")?;
        let (k, n, hw) = (self.op.weight.k(), self.op.weight.n(), self.hw);
        let (m, _) = self.op.rows_and_shape(l1, n)?;
        let b = m / hw.max(1);
        let rd = l2.shape().dims();
        if hw == 0
            || hw % 16 != 0
            || m != b * hw
            || rd.len() != 4
            || (rd[0], rd[1], rd[2] * rd[3]) != (b, n, hw)
        {
            candle_core::bail!(
                "linear to image: input {:?}, residual {:?}, {hw} positions per image",
                l1.shape(),
                l2.shape()
            );
        }
        // Never zeroed: every tile of the product writes its 16 positions of its channels (all of them).
        let mut out = super::cpu::output_uninit_f32(b * n * hw);
        let dst = SendPtr(out.as_mut_ptr());
        let epilogue = |row: usize, col: usize, tile: &[f32; NR * NR], rows: usize, cols: usize| {
            let dst = &dst;
            // Rows are tokens (16 from a multiple of 16: one image's), columns channels.
            let (bi, p0) = (row / hw, row % hw);
            let base = (bi * n + col) * hw + p0;
            // SAFETY: channels col..col + cols, positions p0..p0 + rows of image bi lie inside the output (and the
            // residual, laid out as it) and are this tile's alone; the tile holds rows x cols values 16 apart.
            unsafe {
                super::layout::transpose_add_f32(
                    tile.as_ptr(),
                    NR,
                    dst.0.add(base),
                    hw,
                    (rows, cols),
                    Some(&residual[base..]),
                )
            };
        };
        let bias = self.op.bias.as_deref().map(Vec::as_slice);
        let to = super::amx::Handed::Tiles(&epilogue);
        // SAFETY: AMX is available (the caller checked); `a` holds `m` rows of `k` entries; the bias holds `n`
        // values; each tile's epilogue writes only its own positions and channels.
        x.in_bf16(|a| unsafe {
            super::amx::gemm_handed(m, (a.as_ptr(), k), &self.op.weight, bias, to, true)
        });
        // SAFETY: the tiles cover all m tokens and n channels: every value was written.
        unsafe { out.set_len(b * n * hw) };
        Ok((CpuStorage::F32(out), Shape::from((b, n, hw))))
    }
}

impl PackedLinearOp {
    /// `x W^T + b` for the rows of `x` (layout `l`), plus `add` (laid out as the output) when given: added as the
    /// product stores its result, the same values as adding afterwards.
    fn forward_rows(
        &self,
        x: Values,
        l: &Layout,
        add: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let n = self.weight.n();
        let (m, shape) = self.rows_and_shape(l, n)?;
        let len = m * n;
        if len > 0 && fills_uninit(&self.weight) {
            let mut out = Out::<f32>::uninit(len, true);
            // The product writes every value: no zeroing pass first.
            let (k, c) = (self.weight.k(), out.ptr());
            let start = self.start();
            // SAFETY: `fills_uninit` holds, the start is not `Accumulate`, `c` has capacity for the `m` rows of `n`
            // values, all of which the product writes before `set_len`, and `add` holds as many (checked by the
            // caller).
            unsafe {
                match (self.weight.format(), x) {
                    (Format::F32, Values::F32(x)) => {
                        gemm_rows_uninit(m, x, k, &self.weight, (c, n), start, add)
                    }
                    (Format::Bf16, x) => {
                        x.in_bf16(|x| gemm_rows_uninit(m, x, k, &self.weight, (c, n), start, add))
                    }
                    (Format::F32, Values::Bf16(_)) => {
                        candle_core::bail!("linear: a bf16 input to a layer packed in f32")
                    }
                }
                let (v, shape) = out.finish(shape);
                return Ok((CpuStorage::F32(v), shape));
            }
        }
        let mut out = Out::<f32>::zeroed(len, true);
        let values = out.values();
        self.product(x, values)?;
        if let Some(add) = add {
            values.iter_mut().zip(add).for_each(|(o, a)| *o += a);
        }
        // SAFETY: the values were zeroed when the output was made.
        let (v, shape) = unsafe { out.finish(shape) };
        Ok((CpuStorage::F32(v), shape))
    }

    /// Whether this layer's product on `xs` can round its tiles as they are handed on ([`RoundedLinearOp`]):
    /// packed in bf16, on AMX, on the CPU.
    fn rounds_tiles(&self, xs: &Tensor) -> bool {
        self.weight.format() == Format::Bf16 && super::amx::available() && xs.device().is_cpu()
    }

    /// The input rows of storage `s1` (layout `l1`) and the f32 residual `s2` (layout `l2`) that an op adds to
    /// their product: it must have the output's shape.
    fn rows_and_residual<'a>(
        &self,
        (s1, l1): (&'a CpuStorage, &Layout),
        (s2, l2): (&'a CpuStorage, &Layout),
    ) -> Result<(Values<'a>, &'a [f32])> {
        let x = Values::of(s1, l1, "linear input")?;
        let add = super::cpu::contiguous_f32(s2, l2, "linear residual")?;
        let (_, shape) = self.rows_and_shape(l1, self.weight.n())?;
        if l2.shape() != &shape {
            candle_core::bail!("linear: residual {:?}, output {:?}", l2.shape(), shape);
        }
        Ok((x, add))
    }

    /// The output's dimensions for the input `xs`: its own, the last one the weight's output features.
    fn out_dims(&self, xs: &Tensor) -> Vec<usize> {
        let mut dims = xs.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = self.weight.n();
        }
        dims
    }

    /// What the product starts from: the bias, or zero.
    fn start(&self) -> Start<'_> {
        self.bias.as_deref().map_or(Start::Zero, |b| Start::Cols(b))
    }

    /// The rows of an input of layout `l` (all dimensions but the last, which must be the weight's input
    /// features), and the shape of an output with `width` values per row.
    fn rows_and_shape(&self, l: &Layout, width: usize) -> Result<(usize, Shape)> {
        let k = self.weight.k();
        let dims = l.shape().dims();
        let Some((_, lead)) = dims.split_last().filter(|(&last, _)| last == k) else {
            candle_core::bail!("linear: input {:?}, weight has {k} input features", dims);
        };
        let mut shape = lead.to_vec();
        shape.push(width);
        Ok((lead.iter().product(), Shape::from(shape)))
    }

    /// `out = x W^T + b` for the rows of `x` (contiguous, `k` values each) into `out` (`n` values each, its old
    /// values never read: the product starts from the bias); in bf16 the input is rounded in parallel first.
    fn product(&self, x: Values, out: &mut [f32]) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let (k, n) = (self.weight.k(), self.weight.n());
        let m = out.len() / n;
        let start = self.start();
        match (self.weight.format(), x) {
            (Format::F32, Values::F32(x)) => gemm_f32_from(m, x, k, &self.weight, out, n, start),
            (Format::Bf16, x) => {
                x.in_bf16(|x| gemm_bf16_from(m, x, k, &self.weight, out, n, start))
            }
            (Format::F32, Values::Bf16(_)) => {
                candle_core::bail!("linear: a bf16 input to a layer packed in f32")
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::precision::Precision;
    use candle_core::Device;
    use candle_nn::VarMap;

    /// A var builder holding `w` and `b` as the layer `l`'s weight and bias.
    fn layer_vars(w: &Tensor, b: &Tensor) -> candle_nn::VarBuilder<'static> {
        let vm = VarMap::new();
        vm.data().lock().unwrap().extend([
            (
                "l.weight".to_string(),
                candle_core::Var::from_tensor(w).unwrap(),
            ),
            (
                "l.bias".to_string(),
                candle_core::Var::from_tensor(b).unwrap(),
            ),
        ]);
        candle_nn::VarBuilder::from_varmap(&vm, DType::F32, w.device())
    }

    /// A tensor's values as bits.
    fn bits(t: &Tensor) -> Vec<u32> {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn bf16_layer_matches_candle_on_rounded_weights() {
        let dev = Device::Cpu;
        let (i, o) = (37, 53);
        let w = Tensor::randn(0f32, 1., (o, i), &dev).unwrap();
        let b = Tensor::randn(0f32, 1., o, &dev).unwrap();
        let x = Tensor::randn(0f32, 1., (2, 5, i), &dev).unwrap();
        let vb = layer_vars(&w, &b);
        let bf16 = Weights::new(vb.clone(), Precision::CpuBf16);
        let layer = FastLinear::load(i, o, true, &bf16.pp("l")).unwrap();
        assert!(matches!(&layer, FastLinear::Packed(op) if op.weight.format() == Format::Bf16));
        assert_eq!((layer.in_dim().unwrap(), layer.out_dim().unwrap()), (i, o));
        let got = layer.forward(&x).unwrap();
        assert_eq!(got.dims(), &[2, 5, o]);
        let round = |t: &Tensor| {
            t.to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        let want = Linear::new(round(&w), Some(b.clone()))
            .forward(&round(&x))
            .unwrap();
        let diff = crate::ops::max_abs_diff(&want, &got);
        assert!(diff < 1e-4, "max diff {diff}");
        // In f32 the layer computes candle's product (packed when the CPU has AVX-512).
        let f32_layer =
            FastLinear::load(i, o, true, &Weights::new(vb, Precision::F32).pp("l")).unwrap();
        let want = Linear::new(w, Some(b)).forward(&x).unwrap();
        let diff = crate::ops::max_abs_diff(&want, &f32_layer.forward(&x).unwrap());
        assert!(diff < 1e-4, "f32: max diff {diff}");
    }

    /// A bf16 input gives a layer packed in bf16 the same bits as the f32 input it rounds (`forward`,
    /// `forward_add`, `geglu`), and every other layer the same as that input in f32; a GEGLU result in
    /// bf16 is the f32 one rounded, bit for bit.
    #[test]
    fn bf16_inputs_and_outputs_are_the_rounded_values() {
        crate::ops::cpu::detected_only(|| {
            let dev = Device::Cpu;
            let (i, o) = (24, 40);
            let w = Tensor::randn(0f32, 1., (o, i), &dev).unwrap();
            let b = Tensor::randn(0f32, 1., o, &dev).unwrap();
            let vb = layer_vars(&w, &b);
            let x = Tensor::randn(0f32, 1., (2, 150, i), &dev).unwrap();
            let x16 = x.to_dtype(DType::BF16).unwrap();
            let rounded = x16.to_dtype(DType::F32).unwrap();
            let r = Tensor::randn(0f32, 1., (2, 150, o), &dev).unwrap();
            let bf16_bits = |t: &Tensor| {
                assert_eq!(t.dtype(), DType::BF16);
                bits(&t.to_dtype(DType::F32).unwrap())
            };
            for precision in [Precision::F32, Precision::CpuBf16] {
                let weights = Weights::new(vb.clone(), precision);
                let layer = FastLinear::load(i, o, true, &weights.pp("l")).unwrap();
                let packed_bf16 = precision == Precision::CpuBf16;
                assert_eq!(layer.takes_bf16(), packed_bf16);
                // A bf16 layer rounds `x` itself: the bf16 input is what it reads either way.
                let same = if packed_bf16 { &x } else { &rounded };
                let same_bits = |a: Tensor, b: Tensor| bits(&a) == bits(&b);
                assert!(same_bits(
                    layer.forward(&x16).unwrap(),
                    layer.forward(same).unwrap()
                ));
                assert!(same_bits(
                    layer.forward_add(&x16, &r).unwrap(),
                    layer.forward_add(same, &r).unwrap()
                ));
                let geglu = layer.geglu(&x16, false, false).unwrap();
                assert!(same_bits(
                    geglu.clone(),
                    layer.geglu(same, false, false).unwrap()
                ));
                let geglu16 = layer.geglu(&x16, true, false).unwrap();
                if matches!(layer, FastLinear::Packed(_)) {
                    let want = bits(
                        &geglu
                            .to_dtype(DType::BF16)
                            .unwrap()
                            .to_dtype(DType::F32)
                            .unwrap(),
                    );
                    assert_eq!(bf16_bits(&geglu16), want, "{precision:?}");
                } else {
                    assert_eq!(
                        bits(&geglu16),
                        bits(&geglu),
                        "candle's layer answers in f32"
                    );
                }
            }
            // A bf16 input to a layer packed in f32 is an error inside the op, never a panic.
            let weights = Weights::new(vb, Precision::F32);
            if let FastLinear::Packed(op) = FastLinear::load(i, o, true, &weights.pp("l")).unwrap()
            {
                assert!(x16.contiguous().unwrap().apply_op1_no_bwd(&op).is_err());
            }
        });
    }

    /// A rounded product (plus a residual) is the f32 product (plus the residual) rounded to bf16, bit for bit, where
    /// a bf16 layer on AMX rounds its tiles (with and without a bias, rows and columns that fill no tile, a bf16
    /// input, no rows); elsewhere the f32 result itself.
    #[test]
    fn rounded_product_is_the_product_rounded() {
        crate::ops::cpu::detected_only(|| {
            let dev = Device::Cpu;
            let (i, o) = (45, 40);
            each_layer(i, o, |precision, bias, layer| {
                let rounds = precision == Precision::CpuBf16
                    && matches!(layer, FastLinear::Packed(_))
                    && crate::ops::amx::available();
                for rows in [0, 1, 17, 70] {
                    let x = Tensor::randn(0f32, 1., (2, rows, i), &dev).unwrap();
                    for x in [x.clone(), x.to_dtype(DType::BF16).unwrap()] {
                        let r = Tensor::randn(0f32, 1., (2, rows, o), &dev).unwrap();
                        for (got, plain) in [
                            (layer.forward_rounded(&x), layer.forward(&x)),
                            (layer.forward_add_rounded(&x, &r), layer.forward_add(&x, &r)),
                        ] {
                            let (got, plain) = (got.unwrap(), plain.unwrap());
                            assert_eq!(got.dims(), plain.dims());
                            let want = if rounds {
                                assert_eq!(got.dtype(), DType::BF16);
                                plain.to_dtype(DType::BF16).unwrap()
                            } else {
                                plain
                            };
                            assert_eq!(
                                bits(&got.to_dtype(DType::F32).unwrap()),
                                bits(&want.to_dtype(DType::F32).unwrap()),
                                "{precision:?}, bias {bias}, {rows} rows, {:?} input",
                                x.dtype()
                            );
                        }
                    }
                }
            });
        });
    }

    /// `f(precision, bias, layer)` for an `i -> o` layer of random weights in f32 and in the CPU bf16 mode, with
    /// and without its bias.
    fn each_layer(i: usize, o: usize, f: impl Fn(Precision, bool, FastLinear)) {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (o, i), &dev).unwrap();
        let b = Tensor::randn(0f32, 1., o, &dev).unwrap();
        let vb = layer_vars(&w, &b);
        for precision in [Precision::F32, Precision::CpuBf16] {
            for bias in [true, false] {
                let weights = Weights::new(vb.clone(), precision);
                f(
                    precision,
                    bias,
                    FastLinear::load(i, o, bias, &weights.pp("l")).unwrap(),
                );
            }
        }
    }

    /// The product with the residual added as it is stored gives the same bits as the product and an addition
    /// apart, in f32 and bf16, with and without a bias, on row counts that fill no tile and on none; a residual of
    /// another shape is an error.
    #[test]
    fn forward_add_is_the_product_plus_the_residual() {
        crate::ops::cpu::detected_only(|| {
            let dev = Device::Cpu;
            let (i, o) = (37, 53);
            each_layer(i, o, |precision, bias, layer| {
                for rows in [0, 1, 5, 37, 300] {
                    if rows == 0 && !matches!(layer, FastLinear::Packed(_)) {
                        continue;
                    }
                    let x = Tensor::randn(0f32, 1., (2, rows, i), &dev).unwrap();
                    let r = Tensor::randn(0f32, 1., (2, rows, o), &dev).unwrap();
                    let want = crate::ops::add::add(&layer.forward(&x).unwrap(), &r, 1.0).unwrap();
                    let got = layer.forward_add(&x, &r).unwrap();
                    assert_eq!(got.dims(), want.dims());
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "{precision:?} bias {bias} rows {rows}"
                    );
                }
                if matches!(layer, FastLinear::Packed(_)) {
                    let x = Tensor::randn(0f32, 1., (2, 3, i), &dev).unwrap();
                    let wrong = Tensor::randn(0f32, 1., (2, 4, o), &dev).unwrap();
                    assert!(layer.forward_add(&x, &wrong).is_err());
                    assert!(layer.forward_add_rounded(&x, &wrong).is_err());
                }
            });
        });
    }

    /// A packed layer's results (plain, with a residual, through GEGLU in f32 and bf16) and the bf16 layer norm
    /// that feeds such layers start on cache lines, so that the AMX tiles that write and read them move whole
    /// lines; on every row count.
    #[test]
    fn packed_results_start_on_cache_lines() {
        use crate::ops::cpu::starts_on_line;
        crate::ops::cpu::detected_only(|| {
            let dev = Device::Cpu;
            let (i, o) = (40, 64);
            let w = Tensor::randn(0f32, 1., (o, i), &dev).unwrap();
            let b = Tensor::randn(0f32, 1., o, &dev).unwrap();
            let vb = layer_vars(&w, &b);
            let norm = crate::ops::norm::FastLayerNorm::new(
                i,
                1e-5,
                candle_nn::VarBuilder::zeros(DType::F32, &dev).pp("n"),
            )
            .unwrap();
            for precision in [Precision::F32, Precision::CpuBf16] {
                let layer =
                    FastLinear::load(i, o, true, &Weights::new(vb.clone(), precision).pp("l"))
                        .unwrap();
                if !matches!(layer, FastLinear::Packed(_)) || !crate::ops::kernels_enabled() {
                    continue;
                }
                for rows in [1, 3, 17, 300] {
                    let x = Tensor::randn(0f32, 1., (2, rows, i), &dev).unwrap();
                    let r = Tensor::randn(0f32, 1., (2, rows, o), &dev).unwrap();
                    let normed = norm.forward_bf16(&x).unwrap();
                    for (what, t) in [
                        ("forward", layer.forward(&x).unwrap()),
                        ("forward_add", layer.forward_add(&x, &r).unwrap()),
                        ("geglu f32", layer.geglu(&x, false, false).unwrap()),
                        ("geglu bf16", layer.geglu(&x, true, false).unwrap()),
                        ("layer norm bf16", normed),
                    ] {
                        assert!(starts_on_line(&t), "{precision:?} {what}, {rows} rows");
                    }
                }
            }
        });
    }

    /// A GEGLU projection packed in pairs (the CPU bf16 mode on AMX; its epilogue applies GEGLU) gives the same
    /// bits as the layer loaded plainly and GEGLU apart, in f32 and bf16, with and without a bias, on row counts
    /// that fill no tile, one tile pair and several tasks; so does it on the portable kernels (the product, then
    /// GEGLU over the pairs). A width that is not two halves of whole panels stays unpaired.
    #[test]
    fn geglu_in_pairs_is_the_two_steps_apart() {
        let dev = Device::Cpu;
        for (i, o) in [(24, 64), (72, 96), (24, 40)] {
            let w = Tensor::randn(0f32, 1., (o, i), &dev).unwrap();
            let b = Tensor::randn(0f32, 1., o, &dev).unwrap();
            let vb = layer_vars(&w, &b);
            for precision in [Precision::F32, Precision::CpuBf16] {
                for bias in [true, false] {
                    let weights = Weights::new(vb.clone(), precision).pp("l");
                    let plain = FastLinear::load(i, o, bias, &weights).unwrap();
                    let (layer, pairs) = crate::ops::cpu::detected_only(|| {
                        FastLinear::load_shaped(i, o, bias, &weights, false, true).unwrap()
                    });
                    let paired = GegluLinear { layer, pairs };
                    let packs_bf16 = matches!(&plain, FastLinear::Packed(op) if op.weight.format() == Format::Bf16);
                    assert_eq!(pairs, packs_bf16 && o % 32 == 0, "{o} {precision:?}");
                    if !bias && pairs {
                        assert_eq!(
                            GegluLinear::load(i, o, &weights).unwrap().pairs,
                            crate::ops::amx::available()
                        );
                    }
                    for rows in [1, 5, 17, 40, 300] {
                        let x = Tensor::randn(0f32, 1., (2, rows, i), &dev).unwrap();
                        let check = |what: &str| {
                            let want =
                                crate::ops::geglu::geglu(&plain.forward(&x).unwrap()).unwrap();
                            let got = paired.forward(&x, false).unwrap();
                            assert_eq!(got.dims(), want.dims());
                            assert!(
                                bits(&got) == bits(&want),
                                "{what} {o} {precision:?} bias {bias} rows {rows}"
                            );
                            if plain.takes_bf16() {
                                let got = paired.forward(&x, true).unwrap();
                                assert_eq!(got.dtype(), DType::BF16);
                                let want = want.to_dtype(DType::BF16).unwrap();
                                assert!(
                                    bits(&got.to_dtype(DType::F32).unwrap())
                                        == bits(&want.to_dtype(DType::F32).unwrap()),
                                    "{what} bf16 {o} bias {bias} rows {rows}"
                                );
                            }
                        };
                        crate::ops::cpu::detected_only(|| check("detected"));
                        if pairs {
                            crate::ops::cpu::force_portable(|| check("portable"));
                        }
                    }
                }
            }
        }
    }

    /// The product written into an image with the residual added (on AMX, tile by tile from the product) gives
    /// the bits of the product, the transpose and the addition apart: in f32 and bf16, with and without a bias, on
    /// channel counts that fill no tile and on images whose positions are not whole tiles (then the three steps); a
    /// residual of another shape is an error.
    #[test]
    fn image_add_is_the_product_transposed_plus_the_residual() {
        crate::ops::cpu::detected_only(|| {
            let dev = Device::Cpu;
            for (i, o, (h, w)) in [
                (40, 48, (4, 4)),
                (64, 40, (4, 8)),
                (24, 32, (3, 5)),
                (320, 64, (8, 8)),
            ] {
                let wt = Tensor::randn(0f32, 1., (o, i), &dev).unwrap();
                let b = Tensor::randn(0f32, 1., o, &dev).unwrap();
                let vb = layer_vars(&wt, &b);
                for precision in [Precision::F32, Precision::CpuBf16] {
                    for bias in [true, false] {
                        let weights = Weights::new(vb.clone(), precision);
                        let layer = FastLinear::load(i, o, bias, &weights.pp("l")).unwrap();
                        let x = Tensor::randn(0f32, 1., (2, h * w, i), &dev).unwrap();
                        let r = Tensor::randn(0f32, 1., (2, o, h, w), &dev).unwrap();
                        let want =
                            crate::ops::layout::to_image_add(&layer.forward(&x).unwrap(), h, w, &r)
                                .unwrap();
                        let got = layer.forward_to_image_add(&x, (h, w), &r).unwrap();
                        assert_eq!(got.dims(), want.dims());
                        assert_eq!(
                            bits(&got),
                            bits(&want),
                            "{i}x{o} {h}x{w} {precision:?} bias {bias}"
                        );
                        let wrong = Tensor::randn(0f32, 1., (2, o + 1, h, w), &dev).unwrap();
                        assert!(layer.forward_to_image_add(&x, (h, w), &wrong).is_err());
                    }
                }
            }
        });
    }

    /// The fused product + GEGLU gives the same bits as the two steps apart, in f32 and bf16, with and without a
    /// bias, on one block, on blocks that split the rows unevenly, and on inputs of one row and of none.
    #[test]
    fn geglu_forward_is_the_two_steps_in_one() {
        crate::ops::cpu::detected_only(geglu_forward_on_this_path);
    }

    fn geglu_forward_on_this_path() {
        let dev = Device::Cpu;
        let (i, o) = (24, 40);
        let w = Tensor::randn(0f32, 1., (o, i), &dev).unwrap();
        let b = Tensor::randn(0f32, 1., o, &dev).unwrap();
        let vb = layer_vars(&w, &b);
        for precision in [Precision::F32, Precision::CpuBf16] {
            for bias in [true, false] {
                let weights = Weights::new(vb.clone(), precision);
                let layer = FastLinear::load(i, o, bias, &weights.pp("l")).unwrap();
                for rows in [0, 1, 5, 300] {
                    if rows == 0 && !matches!(layer, FastLinear::Packed(_)) {
                        // candle's own layer cannot reshape an empty input.
                        continue;
                    }
                    let x = Tensor::randn(0f32, 1., (2, rows, i), &dev).unwrap();
                    let want = crate::ops::geglu::geglu(&layer.forward(&x).unwrap()).unwrap();
                    let FastLinear::Packed(op) = &layer else {
                        // No AVX-512: the layer is candle's, and geglu the two steps.
                        assert_eq!(
                            crate::ops::max_abs_diff(
                                &want,
                                &layer.geglu(&x, false, false).unwrap()
                            ),
                            0.0
                        );
                        continue;
                    };
                    for block_rows in [None, Some(7), Some(200)] {
                        let fused = GegluLinearOp {
                            linear: op,
                            block_rows,
                            bf16: false,
                            pairs: false,
                        };
                        let raw = x.apply_op1_no_bwd(&fused).unwrap();
                        let got = crate::ops::cpu::lined_view(&raw, &[2, rows, o / 2]).unwrap();
                        assert!(
                            bits(&want) == bits(&got),
                            "{precision:?} bias {bias} rows {rows} block {block_rows:?}"
                        );
                    }
                }
            }
        }
    }
}
