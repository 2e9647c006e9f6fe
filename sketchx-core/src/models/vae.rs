//! The VAE decoder (diffusers' `AutoencoderKL` decoder half), built from `vae/config.json`.
//!
//! Assembled from [`super::blocks`]' resnets and the crate's CPU kernels ([`crate::ops`]) rather than
//! candle-transformers' `AutoEncoderKL`, whose candle convolutions made decoding the slowest part of a job; only
//! the decoder's weights are loaded (the encoder is never used).

use candle_core::{Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use serde_json::Value;

use super::blocks::{conv, fast_conv2d, gn, gn_silu, group_norm, linear, BlockParams, ResnetBlock};
use super::unet::ConfigMap;
use crate::error::{Error, Result};
use crate::ops::conv::FastConv2d;
use crate::ops::linear::FastLinear as Linear;
use crate::ops::norm::FastGroupNorm;

type CResult<T> = candle_core::Result<T>;

/// The mid block's single-head self-attention (`Attention` with a group norm and a residual).
struct VaeAttention {
    norm: FastGroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    scale: f64,
}

impl VaeAttention {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> CResult<Self> {
        // diffusers' current names, or the legacy ones it still converts on load.
        let legacy = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let name = |new: &'static str, old: &'static str| if legacy { old } else { new };
        Ok(Self {
            norm: group_norm(groups, channels, 1e-6, vb.pp("group_norm"))?,
            q: linear(channels, channels, vb.pp(name("to_q", "query")))?,
            k: linear(channels, channels, vb.pp(name("to_k", "key")))?,
            v: linear(channels, channels, vb.pp(name("to_v", "value")))?,
            out: linear(channels, channels, vb.pp(name("to_out.0", "proj_attn")))?,
            scale: (channels as f64).powf(-0.5),
        })
    }

    fn forward(&self, xs: &Tensor) -> CResult<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let seq = gn(&self.norm, xs)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let (q, k, v) = (
            self.q.forward(&seq)?,
            self.k.forward(&seq)?,
            self.v.forward(&seq)?,
        );
        let o = self.out.forward(&crate::ops::attention::attention(
            &q, &k, &v, 1, self.scale,
        )?)?;
        let o = o.transpose(1, 2)?.reshape((b, c, h, w))?;
        o + xs
    }
}

/// `UpDecoderBlock2D`: resnets, then an optional nearest-neighbour 2x upsampling and convolution.
struct UpDecoderBlock {
    resnets: Vec<ResnetBlock>,
    upsample: Option<FastConv2d>,
}

/// diffusers' VAE `Decoder`.
struct Decoder {
    post_quant_conv: Option<FastConv2d>,
    conv_in: FastConv2d,
    mid: (ResnetBlock, VaeAttention, ResnetBlock),
    up: Vec<UpDecoderBlock>,
    norm_out: FastGroupNorm,
    conv_out: FastConv2d,
}

fn pad1() -> Conv2dConfig {
    Conv2dConfig {
        padding: 1,
        ..Default::default()
    }
}

impl Decoder {
    fn new(
        vb: VarBuilder,
        c: &[usize],
        layers: usize,
        latent: usize,
        out_ch: usize,
        groups: usize,
        post_quant: bool,
    ) -> CResult<Self> {
        let p = BlockParams {
            groups,
            eps: 1e-6,
            temb: 0,
            cross_dim: 0,
            linear_projection: false,
        };
        let post_quant_conv = if post_quant {
            Some(fast_conv2d(
                latent,
                latent,
                1,
                Default::default(),
                vb.pp("post_quant_conv"),
            )?)
        } else {
            None
        };
        let vb = vb.pp("decoder");
        let last = *c.last().expect("block_out_channels is not empty");
        let conv_in = fast_conv2d(latent, last, 3, pad1(), vb.pp("conv_in"))?;
        let vm = vb.pp("mid_block");
        let mid = (
            ResnetBlock::new(vm.pp("resnets.0"), last, last, &p, 1.0)?,
            VaeAttention::new(vm.pp("attentions.0"), last, groups)?,
            ResnetBlock::new(vm.pp("resnets.1"), last, last, &p, 1.0)?,
        );
        let rev: Vec<usize> = c.iter().rev().copied().collect();
        let mut up = Vec::with_capacity(rev.len());
        let mut prev = rev[0];
        for (i, &ch) in rev.iter().enumerate() {
            let vbu = vb.pp("up_blocks").pp(i);
            let resnets = (0..layers + 1)
                .map(|j| {
                    ResnetBlock::new(
                        vbu.pp("resnets").pp(j),
                        if j == 0 { prev } else { ch },
                        ch,
                        &p,
                        1.0,
                    )
                })
                .collect::<CResult<Vec<_>>>()?;
            let upsample = if i + 1 < rev.len() {
                Some(fast_conv2d(ch, ch, 3, pad1(), vbu.pp("upsamplers.0.conv"))?)
            } else {
                None
            };
            up.push(UpDecoderBlock { resnets, upsample });
            prev = ch;
        }
        Ok(Self {
            post_quant_conv,
            conv_in,
            mid,
            up,
            norm_out: group_norm(groups, c[0], 1e-6, vb.pp("conv_norm_out"))?,
            conv_out: fast_conv2d(c[0], out_ch, 3, pad1(), vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, z: &Tensor) -> CResult<Tensor> {
        let z = match &self.post_quant_conv {
            Some(c) => conv(c, z)?,
            None => z.clone(),
        };
        // The resnets take a time embedding; the VAE has none (their time projection is absent).
        let none = Tensor::zeros(1, z.dtype(), z.device())?;
        let mut xs = conv(&self.conv_in, &z)?;
        xs = self.mid.0.forward(&xs, &none)?;
        xs = self.mid.1.forward(&xs)?;
        xs = self.mid.2.forward(&xs, &none)?;
        for blk in &self.up {
            for r in &blk.resnets {
                xs = r.forward(&xs, &none)?;
            }
            if let Some(c) = &blk.upsample {
                let (_, _, h, w) = xs.dims4()?;
                xs = conv(c, &xs.upsample_nearest2d(2 * h, 2 * w)?)?;
            }
        }
        conv(&self.conv_out, &gn_silu(&self.norm_out, &xs)?)
    }
}

/// A loaded VAE with its latent scaling.
pub struct Vae {
    decoder: Decoder,
    /// Latents are divided by this before decoding (`scaling_factor`, 0.18215 for SD1.5).
    pub scaling_factor: f64,
    /// Image pixels per latent pixel along each side: 2^(number of blocks - 1).
    pub scale_factor: usize,
    /// Channels of the latents.
    pub latent_channels: usize,
}

impl Vae {
    /// Builds the VAE from its parsed `config.json` and weights; `origin` names the file in errors.
    pub fn new(vb: candle_nn::VarBuilder, value: &Value, origin: &str) -> Result<Self> {
        let c = ConfigMap::new(value, origin)?;
        let block_out_channels = c.usize_list("block_out_channels")?;
        if block_out_channels.is_empty() {
            return Err(Error::malformed(origin, "`block_out_channels` is empty"));
        }
        for (key, want) in [
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ] {
            if c.present(key).is_some() {
                let types = c.str_list(key)?;
                if types.len() != block_out_channels.len() || types.iter().any(|t| t != want) {
                    return Err(Error::unsupported(
                        origin,
                        format!("{key} {types:?} (sketchx decodes {want} x block_out_channels)"),
                    ));
                }
            }
        }
        c.require("act_fn", &["silu".into()])?;
        c.require("mid_block_add_attention", &[true.into()])?;
        let norm_num_groups = c.usize_or("norm_num_groups", 32)?;
        if let Some(bad) = block_out_channels
            .iter()
            .find(|&&ch| norm_num_groups == 0 || ch % norm_num_groups != 0)
        {
            return Err(Error::malformed(
                origin,
                format!("block_out_channels entry {bad} is not divisible by norm_num_groups {norm_num_groups}"),
            ));
        }
        let latent_channels = c.usize_or("latent_channels", 4)?;
        let decoder = Decoder::new(
            vb,
            &block_out_channels,
            c.usize_or("layers_per_block", 1)?,
            latent_channels,
            c.usize_or("out_channels", 3)?,
            norm_num_groups,
            c.bool_or("use_post_quant_conv", true)?,
        )?;
        Ok(Self {
            decoder,
            scaling_factor: c.f64_or("scaling_factor", 0.18215)?,
            scale_factor: 1 << (block_out_channels.len() - 1),
            latent_channels,
        })
    }

    /// Decodes latents `(batch, C, h, w)` into images `(batch, 3, h * scale, w * scale)` in about `[-1, 1]`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let scaled = (latents / self.scaling_factor)?;
        Ok(self.decoder.forward(&scaled)?)
    }
}
