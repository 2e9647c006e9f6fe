//! The building blocks shared by the UNet and the ControlNet, mirroring diffusers' modules one to one
//! (`ResnetBlock2D`, `Transformer2DModel`, `DownBlock2D`, `CrossAttnDownBlock2D`, `UNetMidBlock2DCrossAttn`,
//! `UpBlock2D`, `CrossAttnUpBlock2D`, `Timesteps`, `TimestepEmbedding`).
//!
//! candle-transformers has similar blocks, but they hard-code details that differ from diffusers' configs (the
//! resnets of its down/up blocks always use 32 groups, whatever `norm_num_groups` says), so sketchx owns these:
//! every width, group count and epsilon comes from the model's `config.json`. Variable paths equal checkpoint keys.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{Conv2dConfig, LayerNorm};

use super::memo::PerTensor;
use crate::ops::conv::FastConv2d as Conv2d;
use crate::ops::linear::{FastLinear as Linear, GegluLinear};
use crate::ops::norm::{FastGroupNorm as GroupNorm, FastLayerNorm};
use crate::ops::profile::scope;
use crate::precision::Weights;

type CResult<T> = candle_core::Result<T>;

/// A group norm loaded from `vb` (weights `weight` and `bias`).
pub(crate) fn group_norm(
    groups: usize,
    channels: usize,
    eps: f64,
    vb: Weights,
) -> CResult<GroupNorm> {
    GroupNorm::new(groups, channels, eps, vb.vb())
}

/// A layer norm loaded from `vb`.
pub(crate) fn layer_norm(dim: usize, eps: f64, vb: Weights) -> CResult<LayerNorm> {
    candle_nn::layer_norm(dim, eps, vb.vb())
}

/// A transformer block's layer norm loaded from `vb` (the text encoder keeps candle's [`layer_norm`]).
fn fast_layer_norm(dim: usize, eps: f64, vb: Weights) -> CResult<FastLayerNorm> {
    FastLayerNorm::new(dim, eps, vb.vb())
}

/// A convolution loaded from `vb`, held as `vb`'s precision says.
pub(crate) fn conv2d(
    cin: usize,
    cout: usize,
    k: usize,
    cfg: Conv2dConfig,
    vb: Weights,
) -> CResult<Conv2d> {
    Conv2d::load(cin, cout, k, cfg, &vb)
}

/// A linear layer with a bias, held as `vb`'s precision says.
pub(crate) fn linear(in_dim: usize, out_dim: usize, vb: Weights) -> CResult<Linear> {
    Linear::load(in_dim, out_dim, true, &vb)
}

/// A linear layer without a bias.
pub(crate) fn linear_no_bias(in_dim: usize, out_dim: usize, vb: Weights) -> CResult<Linear> {
    Linear::load(in_dim, out_dim, false, &vb)
}

/// The `layers` transformers (`attentions.N`) of a block with cross-attention; none for a plain block.
fn attentions(
    vb: &Weights,
    spec: &BlockSpec,
    layers: usize,
    p: &BlockParams,
) -> CResult<Vec<SpatialTransformer>> {
    let Some(depth) = spec.cross_attention else {
        return Ok(Vec::new());
    };
    (0..layers)
        .map(|i| {
            SpatialTransformer::new(
                vb.pp("attentions").pp(i),
                spec.channels,
                spec.heads,
                depth,
                p,
            )
        })
        .collect()
}

/// A 3x3 convolution with the given stride and padding.
pub(crate) fn conv3(
    vb: Weights,
    cin: usize,
    cout: usize,
    stride: usize,
    padding: usize,
) -> CResult<Conv2d> {
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    conv2d(cin, cout, 3, cfg, vb)
}

/// A 1x1 convolution.
pub(crate) fn conv1(vb: Weights, cin: usize, cout: usize) -> CResult<Conv2d> {
    conv2d(cin, cout, 1, Default::default(), vb)
}

/// diffusers' `get_timestep_embedding` (sinusoidal) followed by `TimestepEmbedding` (linear, SiLU, linear), with
/// the optional `cond_proj` of LCM models (`time_cond_proj_dim`), whose projection of a condition is added to the
/// sinusoidal features.
#[derive(Debug)]
pub struct TimeEmbedding {
    freqs: Vec<f32>,
    flip_sin_to_cos: bool,
    cond_proj: Option<Linear>,
    linear_1: Linear,
    linear_2: Linear,
}

impl TimeEmbedding {
    /// `channels` sinusoidal features projected to `embed_dim`; weights under `time_embedding`. With
    /// `cond_proj_dim`, also `cond_proj` (no bias), mapping a condition of that width to `channels`.
    pub fn new(
        vb: Weights,
        channels: usize,
        embed_dim: usize,
        flip_sin_to_cos: bool,
        freq_shift: f64,
        cond_proj_dim: Option<usize>,
    ) -> CResult<Self> {
        let half = channels / 2;
        // Same float32 arithmetic as torch: exp((-ln(10000) * arange(half)) / (half - shift)).
        let neg_log = -(10000f64.ln()) as f32;
        let denom = (half as f64 - freq_shift) as f32;
        let freqs = (0..half)
            .map(|i| ((neg_log * i as f32) / denom).exp())
            .collect();
        Ok(Self {
            freqs,
            flip_sin_to_cos,
            cond_proj: cond_proj_dim
                .map(|d| linear_no_bias(d, channels, vb.pp("cond_proj")))
                .transpose()?,
            linear_1: linear(channels, embed_dim, vb.pp("linear_1"))?,
            linear_2: linear(embed_dim, embed_dim, vb.pp("linear_2"))?,
        })
    }

    /// The embedding `(batch, embed_dim)` of one timestep repeated `batch` times; `condition` (`(batch,
    /// cond_proj_dim)`), when given to a model with `cond_proj`, is projected and added to the sinusoidal
    /// features first, as diffusers' `TimestepEmbedding` does (a model without one ignores it, as diffusers').
    pub fn forward(
        &self,
        timestep: f64,
        batch: usize,
        vb_dtype: DType,
        device: &candle_core::Device,
        condition: Option<&Tensor>,
    ) -> CResult<Tensor> {
        let t = timestep as f32;
        let args: Vec<f32> = self.freqs.iter().map(|f| t * f).collect();
        let sin = args.iter().map(|a| a.sin());
        let cos = args.iter().map(|a| a.cos());
        let mut emb: Vec<f32> = if self.flip_sin_to_cos {
            cos.chain(sin).collect()
        } else {
            sin.chain(cos).collect()
        };
        if emb.len() < self.linear_1.in_dim()? {
            emb.push(0.0); // odd channel count: zero padding, as diffusers does
        }
        let n = emb.len();
        let emb = Tensor::from_vec(emb, (1, n), device)?
            .to_dtype(vb_dtype)?
            .repeat((batch, 1))?;
        let emb = match (&self.cond_proj, condition) {
            (Some(proj), Some(c)) => (emb + proj.forward(&c.to_dtype(vb_dtype)?)?)?,
            _ => emb,
        };
        let h = candle_nn::ops::silu(&self.linear_1.forward(&emb)?)?;
        self.linear_2.forward(&h)
    }
}

/// diffusers' `ResnetBlock2D` (time-embedding shift "default", SiLU).
#[derive(Debug)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

/// The per-model numbers every block needs.
#[derive(Debug, Clone, Copy)]
pub struct BlockParams {
    /// Groups of every group norm (`norm_num_groups`).
    pub groups: usize,
    /// Epsilon of the resnets' group norms (`norm_eps`).
    pub eps: f64,
    /// Width of the time embedding.
    pub temb: usize,
    /// Width of the text embeddings (`cross_attention_dim`).
    pub cross_dim: usize,
    /// Whether transformers project with linear layers instead of 1x1 convolutions.
    pub linear_projection: bool,
}

impl ResnetBlock {
    /// A resnet from `cin` to `cout` channels.
    pub fn new(vb: Weights, cin: usize, cout: usize, p: &BlockParams, scale: f64) -> CResult<Self> {
        Ok(Self {
            norm1: group_norm(p.groups, cin, p.eps, vb.pp("norm1"))?,
            conv1: conv3(vb.pp("conv1"), cin, cout, 1, 1)?,
            time_emb_proj: if p.temb > 0 {
                Some(linear(p.temb, cout, vb.pp("time_emb_proj"))?)
            } else {
                None
            },
            norm2: group_norm(p.groups, cout, p.eps, vb.pp("norm2"))?,
            conv2: conv3(vb.pp("conv2"), cout, cout, 1, 1)?,
            shortcut: if cin != cout {
                Some(conv1(vb.pp("conv_shortcut"), cin, cout)?)
            } else {
                None
            },
            output_scale_factor: scale,
        })
    }

    /// `(x + block(x, temb)) / output_scale_factor`.
    pub fn forward(&self, xs: &Tensor, temb: &Tensor) -> CResult<Tensor> {
        let t = match &self.time_emb_proj {
            Some(p) => Some(p.forward(&candle_nn::ops::silu(temb)?)?),
            None => None,
        };
        let skip = match &self.shortcut {
            Some(c) => c.forward(xs)?,
            None => xs.clone(),
        };
        let (norm2, scale) = (&self.norm2, self.output_scale_factor);
        if let Some(out) = self.conv1.forward_resnet(
            &self.norm1,
            xs,
            t.as_ref(),
            norm2,
            &self.conv2,
            &skip,
            scale,
        )? {
            return Ok(out);
        }
        let h = self.conv1.forward_norm_silu(&self.norm1, xs)?;
        let h = match &t {
            Some(t) => crate::ops::add::add_channels(&h, t)?,
            None => h,
        };
        self.conv2.forward_norm_silu_add(norm2, &h, &skip, scale)
    }
}

/// Multi-head attention (`Attention` with `to_q`, `to_k`, `to_v`, `to_out.0`).
#[derive(Debug)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
    /// The CPU bf16 mode: the products in bf16 where the CPU has AMX or AVX-512 BF16.
    bf16: bool,
    /// Cross-attention's keys and values of the last context (the same text at every step of a job).
    context_kv: PerTensor<(Tensor, Tensor)>,
}

impl Attention {
    fn new(
        vb: Weights,
        dim: usize,
        ctx_dim: usize,
        heads: usize,
        head_dim: usize,
    ) -> CResult<Self> {
        let inner = heads * head_dim;
        let bf16 = crate::ops::packs_bf16(vb.precision());
        Ok(Self {
            to_q: linear_no_bias(dim, inner, vb.pp("to_q"))?,
            to_k: linear_no_bias(ctx_dim, inner, vb.pp("to_k"))?,
            to_v: linear_no_bias(ctx_dim, inner, vb.pp("to_v"))?,
            to_out: linear(inner, dim, vb.pp("to_out.0"))?,
            heads,
            scale: (head_dim as f64).powf(-0.5),
            bf16,
            context_kv: PerTensor::default(),
        })
    }

    /// Whether the layers that read the hidden states `xs` of [`Self::forward_add`] take bf16 as it is: the
    /// queries', and for self-attention (not `cross`) the keys' and values' too.
    fn takes_bf16(&self, cross: bool) -> bool {
        self.to_q.takes_bf16() && (cross || (self.to_k.takes_bf16() && self.to_v.takes_bf16()))
    }

    /// The attention of `xs` to itself, or to `ctx`, plus `residual` (added as the output projection stores its
    /// result, [`Linear::forward_add`]).
    fn forward_add(&self, xs: &Tensor, ctx: Option<&Tensor>, residual: &Tensor) -> CResult<Tensor> {
        // In the CPU bf16 mode the attention rounds its operands to bf16: the projections may hand them over
        // rounded (the same values, half the bytes).
        let project = |l: &Linear, x: &Tensor| {
            if self.bf16 {
                l.forward_rounded(x)
            } else {
                l.forward(x)
            }
        };
        let q = project(&self.to_q, xs)?;
        let kv = |c: &Tensor| -> CResult<(Tensor, Tensor)> {
            Ok((project(&self.to_k, c)?, project(&self.to_v, c)?))
        };
        let (k, v) = match ctx {
            Some(c) => self.context_kv.get(c, kv)?,
            None => kv(xs)?,
        };
        let o = if self.bf16 && self.to_out.takes_bf16() {
            crate::ops::attention::attention_rounded(&q, &k, &v, self.heads, self.scale)?
        } else {
            crate::ops::attention::attention(&q, &k, &v, self.heads, self.scale, self.bf16)?
        };
        self.to_out.forward_add(&o, residual)
    }
}

/// `t` twice along the batch. Classifier-free guidance runs one latent with two texts, and every layer before the
/// first that reads the text computes the same values for both halves: those run once, on one half, and are
/// doubled here (the blocks' `forward_shared`). Every kernel computes an image's values from that image alone, so
/// the result is the whole batch's, bit for bit wherever the half batch runs the same kernels (f32 Winograd, for
/// one, needs 1,024 output pixels: a smaller half takes the direct convolution, equal to rounding).
pub(crate) fn twice(t: &Tensor) -> CResult<Tensor> {
    Tensor::cat(&[t, t], 0)
}

#[derive(Debug)]
struct TransformerBlock {
    norm1: FastLayerNorm,
    attn1: Attention,
    norm2: FastLayerNorm,
    attn2: Attention,
    norm3: FastLayerNorm,
    ff_in: GegluLinear,
    ff_out: Linear,
}

impl TransformerBlock {
    fn new(
        vb: Weights,
        dim: usize,
        heads: usize,
        head_dim: usize,
        ctx_dim: usize,
    ) -> CResult<Self> {
        let ff_inner = dim * 4;
        Ok(Self {
            norm1: fast_layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(vb.pp("attn1"), dim, dim, heads, head_dim)?,
            norm2: fast_layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(vb.pp("attn2"), dim, ctx_dim, heads, head_dim)?,
            norm3: fast_layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff_in: GegluLinear::load(dim, ff_inner * 2, &vb.pp("ff.net.0.proj"))?,
            ff_out: linear(ff_inner, dim, vb.pp("ff.net.2"))?,
        })
    }

    /// The block on `xs`; `rounded`: its output only goes to a layer that rounds it to bf16 (see
    /// [`Linear::forward_add_rounded`]).
    fn forward(&self, xs: &Tensor, ctx: &Tensor, rounded: bool) -> CResult<Tensor> {
        let xs = self.self_attention(xs)?;
        self.after_self_attention(&xs, ctx, rounded)
    }

    /// [`Self::forward`] on the batch `twice(half)`: the self-attention (which does not read the text) on `half`
    /// only.
    fn forward_shared(&self, half: &Tensor, ctx: &Tensor, rounded: bool) -> CResult<Tensor> {
        let xs = twice(&self.self_attention(half)?)?;
        self.after_self_attention(&xs, ctx, rounded)
    }

    fn self_attention(&self, xs: &Tensor) -> CResult<Tensor> {
        let h = normed(&self.norm1, xs, self.attn1.takes_bf16(false))?;
        self.attn1.forward_add(&h, None, xs)
    }

    fn after_self_attention(&self, xs: &Tensor, ctx: &Tensor, rounded: bool) -> CResult<Tensor> {
        let h = normed(&self.norm2, xs, self.attn2.takes_bf16(true))?;
        let xs = self.attn2.forward_add(&h, Some(ctx), xs)?;
        let h = normed(&self.norm3, &xs, self.ff_in.takes_bf16())?;
        let h = self.ff_in.forward(&h, self.ff_out.takes_bf16())?;
        if rounded {
            self.ff_out.forward_add_rounded(&h, &xs)
        } else {
            self.ff_out.forward_add(&h, &xs)
        }
    }
}

/// `norm(xs)`, rounded to bf16 when every layer that reads it takes bf16 as it is (`bf16`): the same values they
/// would round it to, without the f32 copy.
fn normed(norm: &FastLayerNorm, xs: &Tensor, bf16: bool) -> CResult<Tensor> {
    if bf16 {
        norm.forward_bf16(xs)
    } else {
        norm.forward(xs)
    }
}

/// diffusers' `Transformer2DModel` for spatial inputs: group norm, projection in, transformer blocks (self- and
/// cross-attention, GEGLU feed-forward), projection out, residual.
#[derive(Debug)]
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<TransformerBlock>,
    proj_out: Linear,
}

impl SpatialTransformer {
    /// `depth` transformer blocks over `channels` channels split into `heads` heads.
    pub fn new(
        vb: Weights,
        channels: usize,
        heads: usize,
        depth: usize,
        p: &BlockParams,
    ) -> CResult<Self> {
        let head_dim = channels / heads;
        let inner = heads * head_dim;
        // 1x1 convolutions (`use_linear_projection: false`) run as linear layers on the tokens: the same product,
        // with the layout change on the other side, where the packed linear kernels take it without packing the
        // activations at every call.
        let (proj_in, proj_out) = if p.linear_projection {
            (
                linear(channels, inner, vb.pp("proj_in"))?,
                linear(inner, channels, vb.pp("proj_out"))?,
            )
        } else {
            (
                Linear::load_1x1(channels, inner, &vb.pp("proj_in"))?,
                Linear::load_1x1(inner, channels, &vb.pp("proj_out"))?,
            )
        };
        let blocks = (0..depth)
            .map(|i| {
                TransformerBlock::new(
                    vb.pp("transformer_blocks").pp(i),
                    inner,
                    heads,
                    head_dim,
                    p.cross_dim,
                )
            })
            .collect::<CResult<Vec<_>>>()?;
        Ok(Self {
            norm: group_norm(p.groups, channels, 1e-6, vb.pp("norm"))?,
            proj_in,
            blocks,
            proj_out,
        })
    }

    /// Applies the transformer to `xs` `(b, c, h, w)` attending to `ctx` `(b, tokens, cross_dim)`.
    pub fn forward(&self, xs: &Tensor, ctx: &Tensor) -> CResult<Tensor> {
        let mut hs = self.project_in(xs)?;
        for (i, blk) in self.blocks.iter().enumerate() {
            hs = blk.forward(&hs, ctx, self.rounds_block(i))?;
        }
        self.project_out(hs, xs)
    }

    /// Whether block `i`'s output goes only to a projection out that rounds it to bf16 (the last block's, to a
    /// layer packed in bf16): the block may hand it over rounded.
    fn rounds_block(&self, i: usize) -> bool {
        i + 1 == self.blocks.len() && self.proj_out.takes_bf16()
    }

    /// [`Self::forward`] on the batch `twice(half)`: what comes before the first block's cross-attention (the
    /// first layer that reads `ctx`) on `half` only.
    pub fn forward_shared(&self, half: &Tensor, ctx: &Tensor) -> CResult<Tensor> {
        let hs = self.project_in(half)?;
        let Some((first, rest)) = self.blocks.split_first() else {
            return twice(&self.project_out(hs, half)?);
        };
        let mut hs = first.forward_shared(&hs, ctx, self.rounds_block(0))?;
        for (i, blk) in rest.iter().enumerate() {
            hs = blk.forward(&hs, ctx, self.rounds_block(i + 1))?;
        }
        self.project_out(hs, &twice(half)?)
    }

    /// The group norm and the projection in, as tokens `(b, h * w, inner)`. A projection that takes bf16 gets the
    /// normalised tokens in bf16 straight from the norm ([`GroupNorm::forward_tokens_bf16`]: the same bits).
    fn project_in(&self, xs: &Tensor) -> CResult<Tensor> {
        if self.proj_in.takes_bf16() {
            if let Some(tokens) = self.norm.forward_tokens_bf16(xs)? {
                return self.proj_in.forward(&tokens);
            }
        }
        let normed = self.norm.forward(xs)?;
        self.proj_in
            .forward(&crate::ops::layout::to_tokens(&normed)?)
    }

    /// The projection out of the tokens `hs`, as an image the size of `xs`, plus `xs`.
    fn project_out(&self, hs: Tensor, xs: &Tensor) -> CResult<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        self.proj_out.forward_to_image_add(&hs, (h, w), xs)
    }
}

/// A down block: resnets (each optionally followed by a transformer), then an optional stride-2 convolution.
/// Returns the output and every intermediate state (the UNet's skip connections).
#[derive(Debug)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    downsample: Option<(Conv2d, usize)>,
}

/// What kind of block and how wide: one entry of `down_block_types` with its config values.
#[derive(Debug, Clone, Copy)]
pub struct BlockSpec {
    /// Output channels of the block.
    pub channels: usize,
    /// `Some(depth)` for cross-attention blocks (transformer layers per attention), `None` for plain blocks.
    pub cross_attention: Option<usize>,
    /// Attention heads.
    pub heads: usize,
}

impl DownBlock {
    /// A down block from `cin` channels with `layers` resnets; `downsample_padding` as in the config.
    pub fn new(
        vb: Weights,
        cin: usize,
        spec: &BlockSpec,
        layers: usize,
        downsample: Option<usize>,
        p: &BlockParams,
    ) -> CResult<Self> {
        let c = spec.channels;
        let resnets = (0..layers)
            .map(|i| {
                ResnetBlock::new(
                    vb.pp("resnets").pp(i),
                    if i == 0 { cin } else { c },
                    c,
                    p,
                    1.0,
                )
            })
            .collect::<CResult<Vec<_>>>()?;
        let attentions = attentions(&vb, spec, layers, p)?;
        let downsample = match downsample {
            Some(pad) => Some((conv3(vb.pp("downsamplers.0.conv"), c, c, 2, pad)?, pad)),
            None => None,
        };
        Ok(Self {
            resnets,
            attentions,
            downsample,
        })
    }

    /// Runs the block, appending each intermediate state to `states`.
    pub fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        ctx: &Tensor,
        states: &mut Vec<Tensor>,
    ) -> CResult<Tensor> {
        self.forward_from(xs.clone(), 0, temb, ctx, states)
    }

    /// [`Self::forward`] on the batch `twice(half)` with the time embedding `temb = twice(half_temb)`: the first
    /// resnet, and the first transformer up to its cross-attention, on `half` only (see [`twice`]).
    pub fn forward_shared(
        &self,
        (half, half_temb): (&Tensor, &Tensor),
        temb: &Tensor,
        ctx: &Tensor,
        states: &mut Vec<Tensor>,
    ) -> CResult<Tensor> {
        let Some(first) = self.resnets.first() else {
            return self.forward(&twice(half)?, temb, ctx, states);
        };
        let xs = first.forward(half, half_temb)?;
        let xs = match self.attentions.first() {
            Some(a) => a.forward_shared(&xs, ctx)?,
            None => twice(&xs)?,
        };
        states.push(xs.clone());
        self.forward_from(xs, 1, temb, ctx, states)
    }

    /// The block from resnet `start` (whose input is `xs`) on.
    fn forward_from(
        &self,
        mut xs: Tensor,
        start: usize,
        temb: &Tensor,
        ctx: &Tensor,
        states: &mut Vec<Tensor>,
    ) -> CResult<Tensor> {
        for (i, r) in self.resnets.iter().enumerate().skip(start) {
            xs = r.forward(&xs, temb)?;
            if let Some(a) = self.attentions.get(i) {
                xs = a.forward(&xs, ctx)?;
            }
            states.push(xs.clone());
        }
        if let Some((conv, pad)) = &self.downsample {
            let input = if *pad == 0 {
                xs.pad_with_zeros(D::Minus1, 0, 1)?
                    .pad_with_zeros(D::Minus2, 0, 1)?
            } else {
                xs
            };
            xs = conv.forward(&input)?;
            states.push(xs.clone());
        }
        Ok(xs)
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) per layer.
#[derive(Debug)]
pub struct MidBlock {
    first: ResnetBlock,
    rest: Vec<(SpatialTransformer, ResnetBlock)>,
}

impl MidBlock {
    /// The mid block over `channels` channels with one attention layer of `depth` transformer blocks.
    pub fn new(
        vb: Weights,
        channels: usize,
        heads: usize,
        depth: usize,
        scale: f64,
        p: &BlockParams,
    ) -> CResult<Self> {
        Ok(Self {
            first: ResnetBlock::new(vb.pp("resnets.0"), channels, channels, p, scale)?,
            rest: vec![(
                SpatialTransformer::new(vb.pp("attentions.0"), channels, heads, depth, p)?,
                ResnetBlock::new(vb.pp("resnets.1"), channels, channels, p, scale)?,
            )],
        })
    }

    /// Runs the block.
    pub fn forward(&self, xs: &Tensor, temb: &Tensor, ctx: &Tensor) -> CResult<Tensor> {
        let mut xs = self.first.forward(xs, temb)?;
        for (a, r) in &self.rest {
            xs = r.forward(&a.forward(&xs, ctx)?, temb)?;
        }
        Ok(xs)
    }
}

/// An up block: resnets over the concatenation with skip connections (each optionally followed by a transformer),
/// then an optional nearest-neighbour upsampling and convolution.
#[derive(Debug)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    upsample: Option<Conv2d>,
}

impl UpBlock {
    /// diffusers' channel bookkeeping: `prev` channels come from below, skip connections have `skip_in` channels
    /// for the last resnet and `spec.channels` for the others.
    pub fn new(
        vb: Weights,
        prev: usize,
        skip_in: usize,
        spec: &BlockSpec,
        layers: usize,
        upsample: bool,
        p: &BlockParams,
    ) -> CResult<Self> {
        let c = spec.channels;
        let resnets = (0..layers)
            .map(|i| {
                let skip = if i == layers - 1 { skip_in } else { c };
                let rin = if i == 0 { prev } else { c };
                ResnetBlock::new(vb.pp("resnets").pp(i), rin + skip, c, p, 1.0)
            })
            .collect::<CResult<Vec<_>>>()?;
        let attentions = attentions(&vb, spec, layers, p)?;
        let upsample = if upsample {
            Some(conv3(vb.pp("upsamplers.0.conv"), c, c, 1, 1)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsample,
        })
    }

    /// Number of skip connections this block consumes.
    pub fn num_resnets(&self) -> usize {
        self.resnets.len()
    }

    /// Runs the block, consuming skip connections from the end of `skips`; `size` forces the upsampled size.
    pub fn forward(
        &self,
        xs: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        ctx: &Tensor,
        size: Option<(usize, usize)>,
    ) -> CResult<Tensor> {
        let mut xs = xs.clone();
        for (i, r) in self.resnets.iter().enumerate() {
            let skip = skips
                .pop()
                .expect("the UNet supplies one skip connection per resnet");
            let cat = scope("layout", || Tensor::cat(&[&xs, &skip], 1))?;
            xs = r.forward(&cat, temb)?;
            if let Some(a) = self.attentions.get(i) {
                xs = a.forward(&xs, ctx)?;
            }
        }
        if let Some(conv) = &self.upsample {
            let (_, _, h, w) = xs.dims4()?;
            let (nh, nw) = size.unwrap_or((2 * h, 2 * w));
            xs = if (nh, nw) == (2 * h, 2 * w) {
                conv.forward_upsampled(&xs)?
            } else {
                conv.forward(&xs.upsample_nearest2d(nh, nw)?)?
            };
        }
        Ok(xs)
    }
}
