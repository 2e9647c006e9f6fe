//! ControlNet (diffusers' `ControlNetModel`): a trainable copy of the UNet's encoder that reads the sketch and
//! returns residuals added to the UNet's skip connections and mid block.
//!
//! candle has no ControlNet, so it is assembled here from the UNet's encoder (the shared `blocks` module). Variable paths equal
//! the checkpoint keys (`controlnet_cond_embedding.blocks.N`, `controlnet_down_blocks.N`, `controlnet_mid_block`).

use candle_core::{Module, Tensor, D};
use candle_nn::Conv2dConfig;

use super::blocks::conv2d;
use super::config::ConfigFile;
use super::memo::PerTensor;
use super::unet::{parse_unet_shape, Encoder};
use crate::error::{Error, Result};
use crate::ops::conv::FastConv2d as Conv2d;
use crate::precision::Weights;

/// The sketch encoder: a small strided CNN mapping the control image to the first block's feature map.
struct ConditioningEmbedding {
    conv_in: Conv2d,
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
}

impl ConditioningEmbedding {
    fn new(vb: Weights, in_ch: usize, channels: &[usize], out_ch: usize) -> Result<Self> {
        let pad = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let stride = Conv2dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        let conv_in = conv2d(in_ch, channels[0], 3, pad, vb.pp("conv_in"))?;
        let mut blocks = Vec::new();
        let vbb = vb.pp("blocks");
        for i in 0..channels.len() - 1 {
            blocks.push(conv2d(channels[i], channels[i], 3, pad, vbb.pp(2 * i))?);
            blocks.push(conv2d(
                channels[i],
                channels[i + 1],
                3,
                stride,
                vbb.pp(2 * i + 1),
            )?);
        }
        let conv_out = conv2d(*channels.last().unwrap(), out_ch, 3, pad, vb.pp("conv_out"))?;
        Ok(Self {
            conv_in,
            blocks,
            conv_out,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = candle_nn::ops::silu(&self.conv_in.forward(xs)?)?;
        for b in &self.blocks {
            xs = candle_nn::ops::silu(&b.forward(&xs)?)?;
        }
        self.conv_out.forward(&xs)
    }
}

/// The residuals a ControlNet adds to the UNet: one per skip connection, and one for the mid block.
#[derive(Debug, Clone)]
pub struct ControlResiduals {
    /// Residuals for the UNet's down-block outputs, in order.
    pub down: Vec<Tensor>,
    /// Residual for the mid block's output.
    pub mid: Tensor,
}

/// A loaded ControlNet.
pub struct ControlNet {
    encoder: Encoder,
    cond_embedding: ConditioningEmbedding,
    zero_convs: Vec<Conv2d>,
    mid_zero_conv: Conv2d,
    bgr: bool,
    global_pool_conditions: bool,
    downscale: usize,
    /// The embedding of the last control image (the same at every step of a job).
    cond_embedded: PerTensor<Tensor>,
}

super::config::var_builder_constructor!(ControlNet, "the ControlNet");

impl ControlNet {
    /// Builds a ControlNet from its `config.json` and weights.
    pub fn load(vb: Weights, c: &ConfigFile) -> Result<Self> {
        let origin = c.origin();
        let shape = parse_unet_shape(c)?;
        let cond_channels = match c.present("conditioning_embedding_out_channels") {
            Some(_) => c.usize_list("conditioning_embedding_out_channels")?,
            None => vec![16, 32, 96, 256],
        };
        if cond_channels.is_empty() {
            return Err(Error::malformed(
                origin,
                "`conditioning_embedding_out_channels` is empty",
            ));
        }
        let bgr = match c.str_opt("controlnet_conditioning_channel_order")? {
            None | Some("rgb") => false,
            Some("bgr") => true,
            Some(other) => {
                return Err(Error::unsupported(
                    origin,
                    format!("controlnet_conditioning_channel_order {other:?}"),
                ))
            }
        };
        let global_pool_conditions = c.bool_or("global_pool_conditions", false)?;
        let conditioning_channels = c.usize_or("conditioning_channels", 3)?;

        let b0 = shape.blocks[0].channels;
        let encoder = shape.build_encoder(&vb)?;
        let cond_embedding = ConditioningEmbedding::new(
            vb.pp("controlnet_cond_embedding"),
            conditioning_channels,
            &cond_channels,
            b0,
        )?;
        let vb_zero = vb.pp("controlnet_down_blocks");
        let mut zero_convs = vec![conv2d(b0, b0, 1, Default::default(), vb_zero.pp(0))?];
        let n = shape.blocks.len();
        for (i, spec) in shape.blocks.iter().enumerate() {
            let extra = shape.layers_per_block + usize::from(i + 1 < n);
            for _ in 0..extra {
                let idx = zero_convs.len();
                zero_convs.push(conv2d(
                    spec.channels,
                    spec.channels,
                    1,
                    Default::default(),
                    vb_zero.pp(idx),
                )?);
            }
        }
        let last = shape.blocks[n - 1].channels;
        let mid_zero_conv = conv2d(
            last,
            last,
            1,
            Default::default(),
            vb.pp("controlnet_mid_block"),
        )?;
        Ok(Self {
            encoder,
            cond_embedding,
            zero_convs,
            mid_zero_conv,
            bgr,
            global_pool_conditions,
            downscale: 1 << (cond_channels.len() - 1),
            cond_embedded: PerTensor::default(),
        })
    }

    /// The channels of the residuals it returns (down residuals in order, then the mid block's): a UNet takes
    /// them when its [`UNet::residual_channels`](super::unet::UNet::residual_channels) are the same.
    pub fn residual_channels(&self) -> &[usize] {
        &self.encoder.residual_channels
    }

    /// How many times smaller than the control image the latents are (2^(stride-2 convolutions)).
    pub fn downscale_factor(&self) -> usize {
        self.downscale
    }

    /// Whether the model pools its residuals globally (diffusers then forces guess mode).
    pub fn global_pool_conditions(&self) -> bool {
        self.global_pool_conditions
    }

    /// Runs the ControlNet: `sample` (latents, already scaled for the timestep), `timestep`, the text embeddings
    /// and the control image `cond` in `[0, 1]` with the same batch size. The embedding of the control image and
    /// the keys and values of the text are kept for the next call on the same tensors (a job's next step).
    /// `scale` multiplies every residual; with `guess_mode` the residuals are additionally scaled from 0.1
    /// (first) to 1.0 (mid) on a log scale, as in diffusers.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        cond: &Tensor,
        scale: f64,
        guess_mode: bool,
    ) -> Result<ControlResiduals> {
        let c = self.cond_embedded.get(cond, |cond| {
            if self.bgr {
                self.cond_embedding.forward(&cond.flip(&[1])?)
            } else {
                self.cond_embedding.forward(cond)
            }
        })?;
        // diffusers' pipeline gives the ControlNet no `timestep_cond`, even for an LCM UNet.
        let temb = self.encoder.time_embedding(timestep, sample, None)?;
        let a = self.encoder.conv_in(sample)?;
        let xs = crate::ops::add::add(&a, &c, 1.0)?;
        let (xs, res) = self.encoder.down(xs, &temb, encoder_hidden_states)?;
        let xs = self.encoder.mid(&xs, &temb, encoder_hidden_states)?;
        let n = res.len();
        let scales: Vec<f64> = if guess_mode && !self.global_pool_conditions {
            // torch.logspace(-1, 0, n + 1) in float32, times the conditioning scale.
            (0..=n)
                .map(|i| {
                    let s = 10f32.powf(-1.0 + i as f32 / n as f32);
                    (s * scale as f32) as f64
                })
                .collect()
        } else {
            vec![scale; n + 1]
        };
        let mut down = Vec::with_capacity(n);
        for (i, (r, conv)) in res.iter().zip(&self.zero_convs).enumerate() {
            down.push(scaled(conv.forward(r)?, scales[i])?);
        }
        let mut mid = scaled(self.mid_zero_conv.forward(&xs)?, scales[n])?;
        if self.global_pool_conditions {
            for d in down.iter_mut() {
                *d = d.mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2)?;
            }
            mid = mid.mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2)?;
        }
        Ok(ControlResiduals { down, mid })
    }
}

/// `t * s`; `t` itself for the usual scale 1 (the same values, without a pass over the residual).
fn scaled(t: Tensor, s: f64) -> candle_core::Result<Tensor> {
    if s == 1.0 {
        Ok(t)
    } else {
        t * s
    }
}
