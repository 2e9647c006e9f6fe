//! The VAE decoder (diffusers' `AutoencoderKL`), built with candle-transformers from `vae/config.json`.

use candle_core::Tensor;
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};
use serde_json::Value;

use super::unet::ConfigMap;
use crate::error::{Error, Result};

/// A loaded VAE with its latent scaling.
pub struct Vae {
    model: AutoEncoderKL,
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
        let config = AutoEncoderKLConfig {
            block_out_channels: block_out_channels.clone(),
            layers_per_block: c.usize_or("layers_per_block", 1)?,
            latent_channels: c.usize_or("latent_channels", 4)?,
            norm_num_groups,
            use_quant_conv: c.bool_or("use_quant_conv", true)?,
            use_post_quant_conv: c.bool_or("use_post_quant_conv", true)?,
        };
        let latent_channels = config.latent_channels;
        let model = AutoEncoderKL::new(
            vb,
            c.usize_or("in_channels", 3)?,
            c.usize_or("out_channels", 3)?,
            config,
        )?;
        Ok(Self {
            model,
            scaling_factor: c.f64_or("scaling_factor", 0.18215)?,
            scale_factor: 1 << (block_out_channels.len() - 1),
            latent_channels,
        })
    }

    /// Decodes latents `(batch, C, h, w)` into images `(batch, 3, h * scale, w * scale)` in about `[-1, 1]`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let scaled = (latents / self.scaling_factor)?;
        Ok(self.model.decode(&scaled)?)
    }
}
