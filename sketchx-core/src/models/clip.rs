//! The CLIP text encoder (transformers' `CLIPTextModel`), built from `text_encoder/config.json`.
//!
//! Stable Diffusion conditions on the encoder's last hidden state (after the final layer norm), or with "clip skip"
//! on an earlier layer's (diffusers' `clip_skip`: [`ClipTextModel::forward_clip_skip`]). Textual inversion adds rows
//! to the token embedding table ([`ClipTextModel::append_token_embeddings`]). Weight names are the checkpoint keys
//! (`text_model.encoder.layers.N.self_attn.q_proj.weight`, ...).

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{embedding, Embedding, LayerNorm};
use serde::Deserialize;

use super::blocks::{layer_norm, linear};
use super::config::ConfigFile;
use crate::error::{Error, Result};
use crate::ops::linear::FastLinear as Linear;
use crate::precision::Weights;

/// The activation named by `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `quick_gelu`: `x * sigmoid(1.702 x)` (OpenAI CLIP, SD1.x).
    QuickGelu,
    /// `gelu`: the exact, erf-based GELU (SD2.x, many test models).
    Gelu,
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
}

impl Activation {
    fn parse(name: &str, origin: &str) -> Result<Self> {
        match name {
            "quick_gelu" => Ok(Self::QuickGelu),
            "gelu" => Ok(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Self::GeluTanh),
            other => Err(Error::unsupported(origin, format!("hidden_act {other:?}"))),
        }
    }

    fn apply(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702f64)?)?,
            Self::Gelu => xs.gelu_erf(),
            Self::GeluTanh => xs.gelu(),
        }
    }
}

fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}

/// The fields of a transformers `CLIPTextConfig` that the encoder needs.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    /// Token vocabulary size.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Longest token sequence.
    pub max_position_embeddings: usize,
    /// Activation of the MLP.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Epsilon of the layer norms.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

impl ClipTextConfig {
    /// The fields read from a `text_encoder/config.json`.
    pub fn from_config(c: &ConfigFile) -> Result<Self> {
        c.deserialize()
    }
}

struct Layer {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// CLIP's text transformer.
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<Layer>,
    final_layer_norm: LayerNorm,
    heads: usize,
    act: Activation,
    config: ClipTextConfig,
}

impl ClipTextModel {
    /// Builds the model from its config and a `VarBuilder`, whose dtype and device give the precision;
    /// `origin` names the config file in errors.
    pub fn new(vb: candle_nn::VarBuilder, config: &ClipTextConfig, origin: &str) -> Result<Self> {
        Self::load(Weights::of_builder(vb), config, origin)
    }

    /// Builds the model from its config and weights; `origin` names the config file in errors.
    pub fn load(vb: Weights, config: &ClipTextConfig, origin: &str) -> Result<Self> {
        let act = Activation::parse(&config.hidden_act, origin)?;
        let h = config.hidden_size;
        if config.num_attention_heads == 0 || !h.is_multiple_of(config.num_attention_heads) {
            return Err(Error::unsupported(
                origin,
                format!(
                    "hidden_size {h} is not divisible by num_attention_heads {}",
                    config.num_attention_heads
                ),
            ));
        }
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let emb = vb.pp("embeddings");
        let token_embedding = embedding(config.vocab_size, h, emb.pp("token_embedding").vb())?;
        let position_embedding = embedding(
            config.max_position_embeddings,
            h,
            emb.pp("position_embedding").vb(),
        )?;
        let eps = config.layer_norm_eps;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let l = vb.pp("encoder.layers").pp(i.to_string());
                let a = l.pp("self_attn");
                Ok(Layer {
                    ln1: layer_norm(h, eps, l.pp("layer_norm1"))?,
                    q: linear(h, h, a.pp("q_proj"))?,
                    k: linear(h, h, a.pp("k_proj"))?,
                    v: linear(h, h, a.pp("v_proj"))?,
                    out: linear(h, h, a.pp("out_proj"))?,
                    ln2: layer_norm(h, eps, l.pp("layer_norm2"))?,
                    fc1: linear(h, config.intermediate_size, l.pp("mlp.fc1"))?,
                    fc2: linear(config.intermediate_size, h, l.pp("mlp.fc2"))?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let final_layer_norm = layer_norm(h, eps, vb.pp("final_layer_norm"))?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            heads: config.num_attention_heads,
            act,
            config: config.clone(),
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Number of rows of the token embedding table (the config's `vocab_size`, plus appended embeddings).
    pub fn token_embedding_rows(&self) -> usize {
        self.token_embedding.embeddings().dim(0).unwrap_or(0)
    }

    /// Replaces the token embedding rows from `first_id` on by `vectors` `(n, hidden)` (converted to the table's
    /// dtype and device), as transformers' `resize_token_embeddings(first_id + n)` followed by diffusers' writing
    /// of each textual inversion vector at its token's id: tokens `first_id..first_id + n` then look up these
    /// vectors. The table must have at least `first_id` rows and `vectors` the model's width
    /// ([`Error::UnsupportedModel`] naming `origin`, the text encoder's config, otherwise).
    pub fn append_token_embeddings(
        &mut self,
        first_id: usize,
        vectors: &Tensor,
        origin: &str,
    ) -> Result<()> {
        let h = self.config.hidden_size;
        let (_, width) = vectors.dims2()?;
        let rows = self.token_embedding_rows();
        if width != h {
            return Err(Error::unsupported(
                origin,
                format!("embeddings of width {width} do not fit the hidden size {h}"),
            ));
        }
        if rows < first_id {
            return Err(Error::unsupported(
                origin,
                format!(
                    "the token embedding table has {rows} rows, fewer than the tokenizer's {first_id} tokens"
                ),
            ));
        }
        let table = self.token_embedding.embeddings();
        let added = vectors.to_dtype(table.dtype())?.to_device(table.device())?;
        let table = Tensor::cat(&[&table.narrow(0, 0, first_id)?, &added], 0)?;
        self.token_embedding = Embedding::new(table, h);
        Ok(())
    }

    /// Encodes token ids of shape `(batch, seq)` into the last hidden state `(batch, seq, hidden)`.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.forward_clip_skip(input_ids, 0)
    }

    /// As [`ClipTextModel::forward`] with diffusers' `clip_skip`: the hidden state `clip_skip + 1` layers from the
    /// end (`hidden_states[-(clip_skip + 1)]`, the output of layer `num_hidden_layers - clip_skip`, 0 being the
    /// embeddings) through the final layer norm; the last `clip_skip` layers are not run. 0 is the last hidden
    /// state. More than `num_hidden_layers` is [`Error::InvalidRequest`] for `clip_skip`.
    pub fn forward_clip_skip(&self, input_ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
        let layers = self.layers.len();
        if clip_skip > layers {
            return Err(Error::invalid(
                "clip_skip",
                format!("{clip_skip} exceeds the text encoder's {layers} layers"),
            ));
        }
        let (b, seq) = input_ids.dims2()?;
        if seq > self.config.max_position_embeddings {
            return Err(Error::invalid(
                "prompt",
                format!(
                    "{seq} tokens exceed the text encoder's {} positions",
                    self.config.max_position_embeddings
                ),
            ));
        }
        let device = input_ids.device();
        let positions = Tensor::arange(0u32, seq as u32, device)?;
        let mut xs = self
            .token_embedding
            .forward(input_ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = causal_mask(seq, xs.dtype(), device)?;
        let h = self.config.hidden_size;
        let hd = h / self.heads;
        let scale = (hd as f64).powf(-0.5);
        for l in &self.layers[..layers - clip_skip] {
            let residual = &xs;
            let x = l.ln1.forward(&xs)?;
            let split = |t: Tensor| -> candle_core::Result<Tensor> {
                t.reshape((b, seq, self.heads, hd))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let q = split((l.q.forward(&x)? * scale)?)?;
            let k = split(l.k.forward(&x)?)?;
            let v = split(l.v.forward(&x)?)?;
            let att = q.matmul(&k.t()?)?.broadcast_add(&mask)?;
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let o = att.matmul(&v)?.transpose(1, 2)?.reshape((b, seq, h))?;
            xs = (l.out.forward(&o)? + residual)?;
            let residual = &xs;
            let x = l.ln2.forward(&xs)?;
            let x = l.fc2.forward(&self.act.apply(&l.fc1.forward(&x)?)?)?;
            xs = (x + residual)?;
        }
        Ok(self.final_layer_norm.forward(&xs)?)
    }
}

fn causal_mask(seq: usize, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
    // -inf above the diagonal: token i attends to tokens 0..=i.
    let mut mask = vec![0f32; seq * seq];
    for i in 0..seq {
        for v in &mut mask[i * seq + i + 1..(i + 1) * seq] {
            *v = f32::NEG_INFINITY;
        }
    }
    Tensor::from_vec(mask, (seq, seq), device)?
        .to_dtype(dtype)?
        .unsqueeze(0)?
        .unsqueeze(0)
}
