//! Precision: how a network holds its weights and computes its products, decided once from the requested device
//! and dtype and passed explicitly to every constructor ([`Weights`]) and kernel.
//!
//! Weights are always read in [`Precision::weights_dtype`]: f32 for both CPU modes, so that whatever transforms
//! weights at load runs on f32 values before any layer rounds them.

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

/// How a network's weights are held and its activations computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Weights, activations and products in f32: the reference.
    F32,
    /// The CPU bf16 mode: weights are read as f32; convolutions and linear layers round theirs to bf16 and pack
    /// them for the crate's bf16 GEMM, round their inputs to bf16 and accumulate in f32. On CPUs with AMX the
    /// attention's two products also take bf16 operands (scores and softmax stay f32). Norms, activations and the
    /// scheduler stay f32. With the crate's kernels off (`SKETCHX_PLAIN_CANDLE=1`) it runs
    /// entirely in f32.
    CpuBf16,
    /// Weights and activations in this reduced type throughout (f16 or bf16 on GPUs, f16 on the CPU).
    Reduced(DType),
}

impl Precision {
    /// The precision for `dtype` on `device`.
    pub fn new(device: &Device, dtype: DType) -> Self {
        match dtype {
            DType::F32 => Precision::F32,
            DType::BF16 if device.is_cpu() => Precision::CpuBf16,
            other => Precision::Reduced(other),
        }
    }

    /// The type weights are read in.
    pub fn weights_dtype(self) -> DType {
        match self {
            Precision::F32 | Precision::CpuBf16 => DType::F32,
            Precision::Reduced(d) => d,
        }
    }

    /// The type the networks take and return.
    pub fn activations_dtype(self) -> DType {
        self.weights_dtype()
    }
}

/// A network's weights as its constructors see them: tensors (read in [`Precision::weights_dtype`]) under the
/// current prefix, and the precision the layers hold them in.
#[derive(Clone)]
pub struct Weights<'a> {
    vb: VarBuilder<'a>,
    precision: Precision,
    /// See [`Weights::winograd_in_f32`].
    winograd_f32: bool,
}

impl<'a> Weights<'a> {
    /// Wraps `vb`, making it hand out tensors in `precision`'s weights dtype.
    pub fn new(vb: VarBuilder<'a>, precision: Precision) -> Self {
        Self {
            vb: vb.set_dtype(precision.weights_dtype()),
            precision,
            winograd_f32: false,
        }
    }

    /// `vb` in the precision [`Precision::new`] gives for its dtype on its device.
    pub fn of_builder(vb: VarBuilder<'a>) -> Self {
        let precision = Precision::new(vb.device(), vb.dtype());
        Self::new(vb, precision)
    }

    /// The weights under `prefix.`.
    pub fn pp(&self, prefix: impl ToString) -> Self {
        Self {
            vb: self.vb.pp(prefix),
            precision: self.precision,
            winograd_f32: self.winograd_f32,
        }
    }

    /// These weights with every convolution that Winograd's f32 path can run kept in f32 in the CPU bf16 mode
    /// (instead of packed in bf16): for a network whose wide 3x3 convolutions run on large images (the VAE
    /// decoder), where that path's quarter of the multiplications beats the bf16 product.
    pub fn winograd_in_f32(mut self) -> Self {
        self.winograd_f32 = true;
        self
    }

    /// Whether [`Weights::winograd_in_f32`] applies.
    pub fn keeps_winograd_f32(&self) -> bool {
        self.winograd_f32
    }

    /// The underlying builder, for candle's own layers (norms, embeddings).
    pub fn vb(&self) -> VarBuilder<'a> {
        self.vb.clone()
    }

    /// Whether the weights hold a tensor `name` under the current prefix.
    pub fn contains_tensor(&self, name: &str) -> bool {
        self.vb.contains_tensor(name)
    }

    /// The precision.
    pub fn precision(&self) -> Precision {
        self.precision
    }
}
