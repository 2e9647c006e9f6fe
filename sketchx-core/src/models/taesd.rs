//! TAESD, diffusers' `AutoencoderTiny`: a small convolutional decoder that turns latents into images far faster
//! than the full VAE ([`super::vae::Vae`]), at some cost in detail. sketchx uses it for the final images when a
//! request asks for `vae: tiny` and for live previews of the denoising ([`TinyVae::decode`] on a predicted clean
//! latent).
//!
//! Built from an `AutoencoderTiny` `config.json` (e.g. `madebyollin/taesd`) and its weights, layer for layer as
//! diffusers' `DecoderTiny` and `AutoencoderTinyBlock` (variable paths equal checkpoint keys:
//! `decoder.layers.N...`). Only the decoder is loaded; the encoder is never used.

use candle_core::{Module, Tensor};
use candle_nn::Conv2dConfig;

use super::config::ConfigFile;
use crate::error::{Error, Result};
use crate::ops::conv::FastConv2d;
use crate::precision::Weights;

type CResult<T> = candle_core::Result<T>;

/// 3x3, padding 1: every convolution of the tiny decoder.
fn pad1() -> Conv2dConfig {
    Conv2dConfig {
        padding: 1,
        ..Default::default()
    }
}

/// A 3x3 convolution (with its bias) under `vb`.
fn conv3(vb: Weights, cin: usize, cout: usize) -> CResult<FastConv2d> {
    FastConv2d::load(cin, cout, 3, pad1(), &vb)
}

/// diffusers' `AutoencoderTinyBlock` with equal input and output channels (the only kind `DecoderTiny` builds, so
/// its `skip` is the identity): `relu(conv(x) + x)`, where `conv` is conv, act, conv, act, conv.
struct TinyBlock {
    convs: [FastConv2d; 3],
}

impl TinyBlock {
    fn new(vb: Weights, channels: usize) -> CResult<Self> {
        // `conv` is an `nn.Sequential`: the activations sit at indices 1 and 3.
        let vc = vb.pp("conv");
        Ok(Self {
            convs: [
                conv3(vc.pp(0), channels, channels)?,
                conv3(vc.pp(2), channels, channels)?,
                conv3(vc.pp(4), channels, channels)?,
            ],
        })
    }

    fn forward(&self, xs: &Tensor) -> CResult<Tensor> {
        let [a, b, c] = &self.convs;
        let h = a.forward(xs)?.relu()?;
        let h = b.forward(&h)?.relu()?;
        let h = c.forward(&h)?;
        (h + xs)?.relu()
    }
}

/// One entry of `DecoderTiny.layers` (an `nn.Sequential`; the entry's index is its checkpoint prefix).
enum Layer {
    /// `nn.Conv2d`.
    Conv(FastConv2d),
    /// The activation after the first convolution (`act_fn`, ReLU).
    Relu,
    /// `AutoencoderTinyBlock` (boxed: three convolutions make it much larger than the other variants).
    Block(Box<TinyBlock>),
    /// `nn.Upsample(scale_factor, mode="nearest")`.
    Upsample(usize),
}

/// diffusers' `DecoderTiny`.
struct DecoderTiny {
    layers: Vec<Layer>,
}

impl DecoderTiny {
    /// The layers exactly as `DecoderTiny.__init__` appends them: conv + act, then per stage its blocks, an
    /// upsampling (all but the last stage) and a convolution (bias-free except the last, which gives the image).
    fn new(
        vb: Weights,
        latent_channels: usize,
        out_channels: usize,
        num_blocks: &[usize],
        channels: usize,
        upsample: usize,
    ) -> CResult<Self> {
        let vb = vb.pp("decoder").pp("layers");
        let mut layers = vec![
            Layer::Conv(conv3(vb.pp(0), latent_channels, channels)?),
            Layer::Relu,
        ];
        for (i, &n) in num_blocks.iter().enumerate() {
            let last = i + 1 == num_blocks.len();
            for _ in 0..n {
                layers.push(Layer::Block(Box::new(TinyBlock::new(
                    vb.pp(layers.len()),
                    channels,
                )?)));
            }
            if !last {
                layers.push(Layer::Upsample(upsample));
            }
            let at = vb.pp(layers.len());
            layers.push(Layer::Conv(if last {
                conv3(at, channels, out_channels)?
            } else {
                FastConv2d::load_without_bias(channels, channels, 3, pad1(), &at)?
            }));
        }
        Ok(Self { layers })
    }

    /// `DecoderTiny.forward`: `tanh(x / 3) * 3` (a soft clamp of the latents), the layers, then `x * 2 - 1`
    /// (TAESD's images are in `[0, 1]`; diffusers' convention is `[-1, 1]`).
    fn forward(&self, z: &Tensor) -> CResult<Tensor> {
        // A tensor divisor, as torch divides (candle's `tensor / f64` multiplies by the rounded reciprocal).
        let three = Tensor::new(3f32, z.device())?.to_dtype(z.dtype())?;
        let mut xs = (z.broadcast_div(&three)?.tanh()? * 3.0)?;
        for layer in &self.layers {
            xs = match layer {
                Layer::Conv(c) => c.forward(&xs)?,
                Layer::Relu => xs.relu()?,
                Layer::Block(b) => b.forward(&xs)?,
                Layer::Upsample(s) => crate::ops::layout::upsample_nearest(&xs, *s)?,
            };
        }
        // x * 2 is exact, so one affine op rounds as torch's mul(2).sub(1) does.
        xs.affine(2.0, -1.0)
    }
}

/// A loaded TAESD decoder (diffusers' `AutoencoderTiny`, decoder half) with its latent scaling.
pub struct TinyVae {
    decoder: DecoderTiny,
    /// Latents are divided by this before decoding (`scaling_factor`; 1.0 for TAESD, whose latents are those of
    /// the SD VAE after its own scaling).
    pub scaling_factor: f64,
    /// Image pixels per latent pixel along each side: `upsampling_scaling_factor` ^ (stages - 1).
    pub scale_factor: usize,
    /// Channels of the latents.
    pub latent_channels: usize,
    /// `latent_magnitude` (used only by diffusers' `scale_latents`, for training; kept for callers).
    pub latent_magnitude: f64,
    /// `latent_shift` (likewise only for `scale_latents`).
    pub latent_shift: f64,
    /// `force_upcast`: whether diffusers' SDXL-style pipelines would decode in f32. diffusers'
    /// `StableDiffusionControlNetPipeline` does not look at it, so neither does sketchx.
    pub force_upcast: bool,
}

impl TinyVae {
    /// Builds the decoder from an `AutoencoderTiny` `config.json` and its weights. Configurations diffusers'
    /// `AutoencoderTiny` cannot run, or that sketchx does not implement (an `act_fn` other than `relu`, an
    /// `upsample_fn` other than `nearest`), are [`Error::UnsupportedModel`] naming the key; a value of the wrong
    /// type is [`Error::MalformedFile`].
    pub fn load(vb: Weights, c: &ConfigFile) -> Result<Self> {
        let origin = c.origin();
        // A full VAE's config (or any other model's) would fail on a missing key below; say what it is instead.
        c.require("_class_name", &["AutoencoderTiny".into()])?;
        c.require("act_fn", &["relu".into()])?;
        c.require("upsample_fn", &["nearest".into()])?;
        let channels = c.usize_list("decoder_block_out_channels")?;
        let num_blocks = c.usize_list("num_decoder_blocks")?;
        if channels.is_empty() || channels.len() != num_blocks.len() {
            return Err(Error::unsupported(
                origin,
                format!(
                    "`decoder_block_out_channels` {channels:?} and `num_decoder_blocks` {num_blocks:?} must be \
                     non-empty and of the same length (one entry per decoder stage)"
                ),
            ));
        }
        // DecoderTiny's stage convolutions keep each stage's width, so it only runs when every stage has the same
        // one (with different widths torch fails on the first mismatched convolution).
        if channels.iter().any(|&ch| ch != channels[0]) || channels[0] == 0 {
            return Err(Error::unsupported(
                origin,
                format!(
                    "`decoder_block_out_channels` = {channels:?} (diffusers' DecoderTiny runs only with one \
                     non-zero width for every stage)"
                ),
            ));
        }
        let upsample = c.usize_or("upsampling_scaling_factor", 2)?;
        if upsample == 0 {
            return Err(Error::unsupported(
                origin,
                "`upsampling_scaling_factor` = 0 (must be at least 1)",
            ));
        }
        let latent_channels = c.usize_or("latent_channels", 4)?;
        let out_channels = c.usize_or("out_channels", 3)?;
        if out_channels != 3 {
            return Err(Error::unsupported(
                origin,
                format!("`out_channels` = {out_channels} (sketchx makes RGB images: 3)"),
            ));
        }
        let scale_factor = u32::try_from(num_blocks.len() - 1)
            .ok()
            .and_then(|e| upsample.checked_pow(e))
            .ok_or_else(|| {
                Error::unsupported(
                    origin,
                    format!(
                        "`upsampling_scaling_factor` {upsample} over {} stages overflows",
                        num_blocks.len()
                    ),
                )
            })?;
        let scaling_factor = c.f64_or("scaling_factor", 1.0)?;
        if !(scaling_factor.is_finite() && scaling_factor != 0.0) {
            return Err(c.bad("scaling_factor", "a finite, non-zero number"));
        }
        let decoder = DecoderTiny::new(
            vb,
            latent_channels,
            out_channels,
            &num_blocks,
            channels[0],
            upsample,
        )?;
        Ok(Self {
            decoder,
            scaling_factor,
            scale_factor,
            latent_channels,
            latent_magnitude: c.f64_or("latent_magnitude", 3.0)?,
            latent_shift: c.f64_or("latent_shift", 0.5)?,
            force_upcast: c.bool_or("force_upcast", false)?,
        })
    }

    /// Decodes latents `(batch, C, h, w)` as the denoising loop holds them into images
    /// `(batch, 3, h * scale, w * scale)` in about `[-1, 1]`: diffusers'
    /// `AutoencoderTiny.decode(latents / scaling_factor)`, as its pipelines call it. The latents should be in
    /// the decoder's activation dtype (as for [`super::vae::Vae::decode`]).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let (_, c, _, _) = latents.dims4()?;
        if c != self.latent_channels {
            return Err(Error::invalid(
                "latents",
                format!(
                    "tiny VAE: latents have {c} channels, the decoder takes {}",
                    self.latent_channels
                ),
            ));
        }
        let scaled = if self.scaling_factor == 1.0 {
            latents.clone()
        } else {
            let f = Tensor::new(self.scaling_factor as f32, latents.device())?
                .to_dtype(latents.dtype())?;
            latents.broadcast_div(&f)?
        };
        Ok(self.decoder.forward(&scaled)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn load(json: serde_json::Value) -> Result<TinyVae> {
        let c = ConfigFile::from_value(json, "taesd/config.json").unwrap();
        let vb = candle_nn::VarBuilder::zeros(DType::F32, &Device::Cpu);
        TinyVae::load(Weights::of_builder(vb), &c)
    }

    fn base() -> serde_json::Value {
        serde_json::json!({
            "act_fn": "relu", "upsample_fn": "nearest", "decoder_block_out_channels": [8, 8],
            "num_decoder_blocks": [1, 1], "latent_channels": 4, "upsampling_scaling_factor": 2,
        })
    }

    #[test]
    fn sizes_come_from_the_config() {
        let v = load(base()).unwrap();
        assert_eq!((v.scale_factor, v.latent_channels), (2, 4));
        assert_eq!(v.scaling_factor, 1.0);
        let z = Tensor::zeros((1, 4, 3, 5), DType::F32, &Device::Cpu).unwrap();
        // Zero weights: every layer gives zeros, and x * 2 - 1 makes the image -1 everywhere.
        let img = v.decode(&z).unwrap();
        assert_eq!(img.dims4().unwrap(), (1, 3, 6, 10));
        assert!(img
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|&p| p == -1.0));
        let wrong = Tensor::zeros((1, 3, 3, 5), DType::F32, &Device::Cpu).unwrap();
        assert!(v.decode(&wrong).is_err());
    }

    #[test]
    fn unsupported_values_name_the_key() {
        for (key, value) in [
            ("act_fn", serde_json::json!("silu")),
            ("upsample_fn", serde_json::json!("bilinear")),
            ("decoder_block_out_channels", serde_json::json!([8, 16])),
            ("num_decoder_blocks", serde_json::json!([1])),
            ("upsampling_scaling_factor", serde_json::json!(0)),
            ("out_channels", serde_json::json!(4)),
            ("_class_name", serde_json::json!("AutoencoderKL")),
        ] {
            let mut j = base();
            j[key] = value;
            match load(j) {
                Err(Error::UnsupportedModel { path, message }) => {
                    assert_eq!(path, "taesd/config.json");
                    assert!(message.contains(key), "{key}: {message}");
                }
                other => panic!("{key}: {:?}", other.err()),
            }
        }
        let mut j = base();
        j["latent_channels"] = serde_json::json!("four");
        assert!(matches!(load(j), Err(Error::MalformedFile { .. })));
        let mut j = base();
        j.as_object_mut().unwrap().remove("num_decoder_blocks");
        assert!(matches!(load(j), Err(Error::MalformedFile { .. })));
    }
}
