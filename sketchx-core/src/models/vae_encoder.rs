//! The VAE encoder (diffusers' `AutoencoderKL.encode`: the `Encoder`, `quant_conv`, and the
//! `DiagonalGaussianDistribution` of the latents), which img2img needs to turn its start image into latents.
//!
//! Built from the same `vae/config.json` and weights file as [`Vae`](super::vae::Vae), reading only the
//! `encoder.*` and `quant_conv.*` tensors. [`VaeEncoder::encode_tiled`] is diffusers' tiled encode
//! (`enable_tiling()`): images larger than one tile are encoded in overlapping tiles whose moments are blended
//! linearly at the seams.

use candle_core::{DType, Module, Tensor};
use candle_nn::Conv2dConfig;

use super::blocks::{conv2d as fast_conv2d, group_norm, BlockParams, ResnetBlock};
use super::config::ConfigFile;
use super::vae::{pad1, tile_sample_size, tiled, VaeAttention, VaeShape};
use crate::error::{Error, Result};
use crate::ops::conv::FastConv2d;
use crate::ops::norm::FastGroupNorm;
use crate::precision::Weights;
use crate::sampling::rng::TorchRng;

type CResult<T> = candle_core::Result<T>;

/// `DownEncoderBlock2D`: resnets, then (but in the last block) diffusers' `Downsample2D` with `padding=0`: one
/// zero row and column added at the bottom and right, then a stride-2 3x3 convolution.
struct DownEncoderBlock {
    resnets: Vec<ResnetBlock>,
    downsample: Option<FastConv2d>,
}

/// diffusers' VAE `Encoder` (with `double_z`) followed by `quant_conv`: images to the moments of the latents.
struct Encoder {
    conv_in: FastConv2d,
    down: Vec<DownEncoderBlock>,
    mid: (ResnetBlock, VaeAttention, ResnetBlock),
    norm_out: FastGroupNorm,
    conv_out: FastConv2d,
    quant_conv: Option<FastConv2d>,
}

impl Encoder {
    fn new(vb: Weights, s: &VaeShape, in_channels: usize, quant: bool) -> CResult<Self> {
        let c = &s.block_out_channels;
        let p = BlockParams {
            groups: s.groups,
            eps: 1e-6,
            temb: 0,
            cross_dim: 0,
            linear_projection: false,
        };
        let moments = 2 * s.latent_channels;
        let quant_conv = if quant {
            Some(fast_conv2d(
                moments,
                moments,
                1,
                Default::default(),
                vb.pp("quant_conv"),
            )?)
        } else {
            None
        };
        let vb = vb.pp("encoder");
        let conv_in = fast_conv2d(in_channels, c[0], 3, pad1(), vb.pp("conv_in"))?;
        let mut down = Vec::with_capacity(c.len());
        let mut prev = c[0];
        for (i, &ch) in c.iter().enumerate() {
            let vbd = vb.pp("down_blocks").pp(i);
            let resnets = (0..s.layers_per_block)
                .map(|j| {
                    let cin = if j == 0 { prev } else { ch };
                    ResnetBlock::new(vbd.pp("resnets").pp(j), cin, ch, &p, 1.0)
                })
                .collect::<CResult<Vec<_>>>()?;
            let stride2 = Conv2dConfig {
                stride: 2,
                ..Default::default()
            };
            let downsample = if i + 1 < c.len() {
                Some(fast_conv2d(
                    ch,
                    ch,
                    3,
                    stride2,
                    vbd.pp("downsamplers.0.conv"),
                )?)
            } else {
                None
            };
            down.push(DownEncoderBlock {
                resnets,
                downsample,
            });
            prev = ch;
        }
        let last = prev;
        let vm = vb.pp("mid_block");
        let mid = (
            ResnetBlock::new(vm.pp("resnets.0"), last, last, &p, 1.0)?,
            VaeAttention::new(vm.pp("attentions.0"), last, s.groups)?,
            ResnetBlock::new(vm.pp("resnets.1"), last, last, &p, 1.0)?,
        );
        Ok(Self {
            conv_in,
            down,
            mid,
            norm_out: group_norm(s.groups, last, 1e-6, vb.pp("conv_norm_out"))?,
            conv_out: fast_conv2d(last, moments, 3, pad1(), vb.pp("conv_out"))?,
            quant_conv,
        })
    }

    /// Images `(b, C, H, W)` to moments `(b, 2 * latent channels, H / f, W / f)`.
    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        // The resnets take a time embedding; the VAE has none (their time projection is absent).
        let none = Tensor::zeros(1, x.dtype(), x.device())?;
        let mut xs = self.conv_in.forward(x)?;
        for blk in &self.down {
            for r in &blk.resnets {
                xs = r.forward(&xs, &none)?;
            }
            if let Some(c) = &blk.downsample {
                xs = c.forward(&xs.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?)?;
            }
        }
        xs = self.mid.0.forward(&xs, &none)?;
        xs = self.mid.1.forward(&xs)?;
        xs = self.mid.2.forward(&xs, &none)?;
        let moments = self.conv_out.forward_norm_silu(&self.norm_out, &xs)?;
        match &self.quant_conv {
            Some(q) => q.forward(&moments),
            None => Ok(moments),
        }
    }
}

/// The tile geometry of diffusers' tiled VAE encode (`AutoencoderKL._tiled_encode`), from the same config values
/// as [`VaeTiling`](super::vae::VaeTiling) (all sizes per side; tiles are square).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VaeEncodeTiling {
    /// `tile_sample_min_size`: image pixels of a full tile. Images larger than this along either side are
    /// encoded in tiles.
    pub sample_size: usize,
    /// `int(sample_size * (1 - 0.25))`: distance between the starts of neighbouring tiles, in image pixels.
    pub sample_stride: usize,
    /// `int(tile_latent_min_size * 0.25)`: latent rows (columns) blended across a seam.
    pub blend_extent: usize,
    /// `tile_latent_min_size - blend_extent`: latent rows (columns) of each tile kept.
    pub row_limit: usize,
}

impl VaeEncodeTiling {
    /// The geometry for tiles of `sample_size` image pixels and a VAE that downsamples `scale_factor` times.
    /// Errors (a message for [`Error::UnsupportedModel`]) where diffusers' algorithm does not give latents of the
    /// right size: a zero stride, or a stride that does not match the kept latent rows.
    pub fn new(sample_size: usize, scale_factor: usize) -> std::result::Result<Self, String> {
        // Python's int() of non-negative values: floors.
        let latent_size = (sample_size as f64 / scale_factor as f64) as usize;
        let sample_stride = (sample_size as f64 * 0.75) as usize;
        let blend_extent = (latent_size as f64 * 0.25) as usize;
        let row_limit = latent_size - blend_extent;
        if sample_stride == 0 {
            return Err(format!(
                "tiled VAE encode: sample_size {sample_size} gives a tile stride of 0 (diffusers raises here too)"
            ));
        }
        if row_limit * scale_factor != sample_stride {
            return Err(format!(
                "tiled VAE encode: sample_size {sample_size} keeps {row_limit} latent pixels of each tile but \
                 tiles start every {sample_stride} image pixels, so the latents would not be the image's size / \
                 {scale_factor} (diffusers returns other sizes)"
            ));
        }
        Ok(Self {
            sample_size,
            sample_stride,
            blend_extent,
            row_limit,
        })
    }

    /// Whether diffusers tiles an image of `height` x `width` pixels (strictly larger than one tile along a side).
    pub fn applies_to(&self, height: usize, width: usize) -> bool {
        height > self.sample_size || width > self.sample_size
    }
}

/// The distribution of the latents of an image, diffusers' `DiagonalGaussianDistribution`: a mean and a standard
/// deviation per latent value (`exp(0.5 * clamp(logvar, -30, 20))`).
#[derive(Debug, Clone)]
pub struct LatentDistribution {
    /// The mean `(b, C, h, w)`.
    pub mean: Tensor,
    /// The standard deviation, same shape.
    pub std: Tensor,
}

impl LatentDistribution {
    /// Splits moments `(b, 2C, h, w)` into mean and log-variance (first and second half of the channels).
    pub fn from_moments(moments: &Tensor) -> Result<Self> {
        let c = moments.dim(1)? / 2;
        let mean = moments.narrow(1, 0, c)?;
        let logvar = moments.narrow(1, c, c)?.clamp(-30f32, 20f32)?;
        // torch's `0.5 * logvar` rounds the product to the tensor's type before exp.
        let std = (logvar * 0.5)?.exp()?;
        Ok(Self { mean, std })
    }

    /// A sample `mean + std * n`, `n` standard normal from `rng` in the mean's shape and dtype (diffusers'
    /// `latent_dist.sample(generator)`: one `randn_tensor` call).
    pub fn sample(&self, rng: &mut TorchRng) -> Result<Tensor> {
        let n = rng.randn_dtype(self.mean.dims(), self.mean.dtype(), self.mean.device())?;
        Ok((&self.mean + (&self.std * n)?)?)
    }
}

/// The encoder half of a loaded VAE, with the latent scaling.
pub struct VaeEncoder {
    encoder: Encoder,
    tiling: std::result::Result<VaeEncodeTiling, String>,
    origin: String,
    /// Latents are multiplied by this after sampling (`scaling_factor`, 0.18215 for SD1.5).
    pub scaling_factor: f64,
    /// Image pixels per latent pixel along each side: 2^(number of blocks - 1).
    pub scale_factor: usize,
    /// Channels of the latents.
    pub latent_channels: usize,
}

super::config::var_builder_constructor!(VaeEncoder, "the VAE encoder");

impl VaeEncoder {
    /// Builds the encoder (`encoder.*`, and `quant_conv.*` unless the config's `use_quant_conv` is false) from
    /// the VAE's `config.json` and weights.
    pub fn load(vb: Weights, c: &ConfigFile) -> Result<Self> {
        let shape = VaeShape::from_config(c)?;
        let encoder = Encoder::new(
            vb,
            &shape,
            c.usize_or("in_channels", 3)?,
            c.bool_or("use_quant_conv", true)?,
        )?;
        let tiling = tile_sample_size(c, "encode")?
            .and_then(|s| VaeEncodeTiling::new(s, shape.scale_factor));
        Ok(Self {
            encoder,
            tiling,
            origin: c.origin().to_string(),
            scaling_factor: shape.scaling_factor,
            scale_factor: shape.scale_factor,
            latent_channels: shape.latent_channels,
        })
    }

    /// The tile geometry of [`VaeEncoder::encode_tiled`], or [`Error::UnsupportedModel`] if this VAE's
    /// `sample_size` does not give a usable one.
    pub fn tiling(&self) -> Result<VaeEncodeTiling> {
        self.tiling
            .clone()
            .map_err(|m| Error::unsupported(&self.origin, m))
    }

    /// The latent distribution of images `(b, 3, H, W)` with values in `[-1, 1]` (diffusers' `vae.encode(x)
    /// .latent_dist`); the images' sides must be multiples of [`VaeEncoder::scale_factor`].
    pub fn encode(&self, images: &Tensor) -> Result<LatentDistribution> {
        LatentDistribution::from_moments(&self.encoder.forward(images)?)
    }

    /// [`VaeEncoder::encode`] as diffusers encodes after `enable_tiling()`: images larger than one tile
    /// ([`VaeEncodeTiling::sample_size`]) along either side are cut into overlapping tiles, each encoded on its
    /// own (`quant_conv` included), and neighbouring tiles' moments are blended linearly over
    /// [`VaeEncodeTiling::blend_extent`] latent pixels, each tile with its already blended upper and left
    /// neighbours; smaller images are encoded as [`VaeEncoder::encode`] does. The encoder's memory is then that
    /// of one tile; the latents differ from an untiled encode near the seams, as in diffusers.
    pub fn encode_tiled(&self, images: &Tensor) -> Result<LatentDistribution> {
        let t = self.tiling()?;
        let (_, _, h, w) = images.dims4()?;
        if !t.applies_to(h, w) {
            return self.encode(images);
        }
        let moments = tiled(
            images,
            (t.sample_size, t.sample_stride),
            (t.blend_extent, t.row_limit),
            |tile| self.encoder.forward(tile),
        )?;
        LatentDistribution::from_moments(&moments)
    }
}

/// RGB8 pixels (`width * height * 3`, row-major) as diffusers' `VaeImageProcessor` hands an image to the VAE:
/// `(1, 3, height, width)`, each sample `v / 255 * 2 - 1` in float32 (numpy's `/ 255.0`, then torch's
/// `2.0 * x - 1.0`), converted to `dtype`.
pub fn image_to_tensor(
    rgb: &[u8],
    width: usize,
    height: usize,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let plane = width * height;
    if rgb.len() != plane * 3 {
        return Err(Error::invalid(
            "start_image",
            format!("{} bytes of pixels for {width}x{height} RGB", rgb.len()),
        ));
    }
    let mut chw = vec![0f32; plane * 3];
    for (i, px) in rgb.chunks_exact(3).enumerate() {
        for (c, &v) in px.iter().enumerate() {
            chw[c * plane + i] = 2.0 * (f32::from(v) / 255.0) - 1.0;
        }
    }
    Ok(Tensor::from_vec(chw, (1, 3, height, width), device)?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_tile_geometry_is_diffusers_for_sd_sizes() {
        // SD1.5: 512-pixel tiles every 384 pixels, 16 latent rows blended, 48 kept (48 x 8 = 384).
        assert_eq!(
            VaeEncodeTiling::new(512, 8).unwrap(),
            VaeEncodeTiling {
                sample_size: 512,
                sample_stride: 384,
                blend_extent: 16,
                row_limit: 48
            }
        );
        let t = VaeEncodeTiling::new(32, 2).unwrap();
        assert_eq!((t.sample_stride, t.blend_extent, t.row_limit), (24, 4, 12));
        assert!(!t.applies_to(32, 32) && t.applies_to(33, 8));
        assert!(VaeEncodeTiling::new(1, 8).is_err());
        // 36 / 2 = 18-latent tiles keep 14, but tiles start every 27 pixels.
        assert!(VaeEncodeTiling::new(36, 2).is_err());
    }

    #[test]
    fn latent_distribution_clamps_the_log_variance_and_samples_with_the_rng() {
        let dev = candle_core::Device::Cpu;
        // Two channels: mean [1, -2], logvar [-40 (clamped to -30), 0].
        let moments = Tensor::from_vec(vec![1f32, -2.0, -40.0, 0.0], (1, 4, 1, 1), &dev).unwrap();
        let d = LatentDistribution::from_moments(&moments).unwrap();
        let std = d.std.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(std, vec![(-15f32).exp(), 1.0]);
        let mut rng = TorchRng::new(7);
        let s = d.sample(&mut rng).unwrap();
        let n = TorchRng::new(7).randn_vec(2);
        let s = s.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(s, vec![1.0 + (-15f32).exp() * n[0], -2.0 + n[1]]);
    }

    #[test]
    fn images_become_minus_one_to_one() {
        let t = image_to_tensor(
            &[0, 255, 51, 0, 0, 0],
            2,
            1,
            DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Channel planes: R (0, 0), G (255, 0), B (51, 0).
        assert_eq!(
            v,
            vec![-1.0, -1.0, 1.0, -1.0, 2.0 * (51f32 / 255.0) - 1.0, -1.0]
        );
    }
}
