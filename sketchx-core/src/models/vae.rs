//! The VAE decoder (diffusers' `AutoencoderKL` decoder half), built from `vae/config.json`.
//!
//! Assembled from the shared `blocks` module's resnets and the crate's CPU kernels (`ops`) rather than
//! candle-transformers' `AutoEncoderKL`, whose candle convolutions made decoding the slowest part of a job; only
//! the decoder's weights are loaded here (the encoder, which only img2img needs, is
//! [`VaeEncoder`](super::vae_encoder::VaeEncoder)).
//!
//! [`Vae::decode_tiled`] is diffusers' tiled decode (`AutoencoderKL.enable_tiling()`): latents larger than one
//! tile are decoded in overlapping tiles whose seams are blended linearly, so that the decoder's activations
//! (hundreds of MB per feature map at 512x512 and above) stay the size of one tile whatever the image size.

use candle_core::{Module, Tensor};
use candle_nn::Conv2dConfig;
use serde_json::Value;

use super::blocks::{conv2d as fast_conv2d, group_norm, linear, BlockParams, ResnetBlock};
use super::config::ConfigFile;
use crate::error::{Error, Result};
use crate::ops::conv::FastConv2d;
use crate::ops::linear::FastLinear as Linear;
use crate::ops::norm::FastGroupNorm;
use crate::precision::Weights;

type CResult<T> = candle_core::Result<T>;

/// The mid block's single-head self-attention (`Attention` with a group norm and a residual).
pub(super) struct VaeAttention {
    norm: FastGroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    scale: f64,
    /// The CPU bf16 mode: the products in bf16 where the CPU has AMX or AVX-512 BF16.
    bf16: bool,
}

impl VaeAttention {
    pub(super) fn new(vb: Weights, channels: usize, groups: usize) -> CResult<Self> {
        // diffusers' current names, or the legacy ones it still converts on load.
        let legacy = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let name = |new: &'static str, old: &'static str| if legacy { old } else { new };
        let bf16 = crate::ops::packs_bf16(vb.precision());
        Ok(Self {
            norm: group_norm(groups, channels, 1e-6, vb.pp("group_norm"))?,
            q: linear(channels, channels, vb.pp(name("to_q", "query")))?,
            k: linear(channels, channels, vb.pp(name("to_k", "key")))?,
            v: linear(channels, channels, vb.pp(name("to_v", "value")))?,
            out: linear(channels, channels, vb.pp(name("to_out.0", "proj_attn")))?,
            scale: (channels as f64).powf(-0.5),
            bf16,
        })
    }

    pub(super) fn forward(&self, xs: &Tensor) -> CResult<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let seq = self
            .norm
            .forward(xs)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let (q, k, v) = (
            self.q.forward(&seq)?,
            self.k.forward(&seq)?,
            self.v.forward(&seq)?,
        );
        let o = self.out.forward(&crate::ops::attention::attention(
            &q, &k, &v, 1, self.scale, self.bf16,
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

pub(super) fn pad1() -> Conv2dConfig {
    Conv2dConfig {
        padding: 1,
        ..Default::default()
    }
}

impl Decoder {
    fn new(
        vb: Weights,
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
        // The decoder's 3x3 convolutions run on large images: f32 Winograd beats the bf16 product there.
        let vb = vb.pp("decoder").winograd_in_f32();
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
            Some(c) => c.forward(z)?,
            None => z.clone(),
        };
        // The resnets take a time embedding; the VAE has none (their time projection is absent).
        let none = Tensor::zeros(1, z.dtype(), z.device())?;
        let mut xs = self.conv_in.forward(&z)?;
        xs = self.mid.0.forward(&xs, &none)?;
        xs = self.mid.1.forward(&xs)?;
        xs = self.mid.2.forward(&xs, &none)?;
        for blk in &self.up {
            for r in &blk.resnets {
                xs = r.forward(&xs, &none)?;
            }
            if let Some(c) = &blk.upsample {
                xs = c.forward_upsampled(&xs)?;
            }
        }
        self.conv_out.forward_norm_silu(&self.norm_out, &xs)
    }
}

/// The tile geometry of diffusers' tiled VAE decode, derived from the VAE's `config.json` exactly as
/// `AutoencoderKL.__init__` and `tiled_decode` derive it (all sizes are per side; tiles are square).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VaeTiling {
    /// `tile_sample_min_size`: the config's `sample_size` (image pixels of a full tile).
    pub sample_size: usize,
    /// `tile_latent_min_size = int(sample_size / 2^(number of blocks - 1))`: latent pixels of a full tile.
    /// Latents larger than this along either side are decoded in tiles.
    pub latent_size: usize,
    /// `int(latent_size * (1 - 0.25))`: distance between the starts of neighbouring tiles, in latent pixels.
    pub latent_stride: usize,
    /// `int(sample_size * 0.25)`: image rows (columns) blended across a seam.
    pub blend_extent: usize,
    /// `sample_size - blend_extent`: image rows (columns) of each tile kept in the output.
    pub row_limit: usize,
}

/// diffusers' `tile_overlap_factor`.
const TILE_OVERLAP_FACTOR: f64 = 0.25;

impl VaeTiling {
    /// The geometry for a VAE whose `sample_size` is `sample_size` and whose decoder upsamples `scale_factor`
    /// times (2^(blocks - 1)). Errors (a message for [`Error::UnsupportedModel`]) where diffusers' algorithm does
    /// not give an image of the right size: a zero stride (diffusers raises), or a stride that does not match
    /// the kept rows (diffusers returns an image larger than the latents x scale factor).
    pub fn new(sample_size: usize, scale_factor: usize) -> std::result::Result<Self, String> {
        // Python's int() truncates; every value here is non-negative, so that is a floor.
        let latent_size = (sample_size as f64 / scale_factor as f64) as usize;
        let latent_stride = (latent_size as f64 * (1.0 - TILE_OVERLAP_FACTOR)) as usize;
        let blend_extent = (sample_size as f64 * TILE_OVERLAP_FACTOR) as usize;
        let row_limit = sample_size - blend_extent;
        if latent_stride == 0 {
            return Err(format!(
                "tiled VAE decode: sample_size {sample_size} gives latent tiles of {latent_size} pixels and a \
                 tile stride of 0 (diffusers raises here too)"
            ));
        }
        if row_limit != latent_stride * scale_factor {
            return Err(format!(
                "tiled VAE decode: sample_size {sample_size} keeps {row_limit} pixels of each tile but tiles \
                 start every {latent_stride} x {scale_factor} pixels, so the image would not be the requested \
                 size (diffusers returns a larger one)"
            ));
        }
        Ok(Self {
            sample_size,
            latent_size,
            latent_stride,
            blend_extent,
            row_limit,
        })
    }

    /// The geometry from a VAE's parsed config ([`tile_sample_size`]), and `scale_factor` = 2^(blocks - 1).
    fn from_config(
        c: &ConfigFile,
        scale_factor: usize,
    ) -> Result<std::result::Result<Self, String>> {
        Ok(tile_sample_size(c, "decode")?.and_then(|s| Self::new(s, scale_factor)))
    }

    /// Whether diffusers tiles latents of `height` x `width` (strictly larger than one tile along a side).
    pub fn applies_to(&self, height: usize, width: usize) -> bool {
        height > self.latent_size || width > self.latent_size
    }
}

/// The image size of one tile of diffusers' tiled VAE decode or encode (`tile_sample_min_size`): the config's
/// `sample_size` (diffusers' default 32 when absent; a list must hold one size, as diffusers' square tiles use a
/// single one). The inner error is the message for [`Error::UnsupportedModel`] (`what`: "decode" or "encode").
pub(super) fn tile_sample_size(
    c: &ConfigFile,
    what: &str,
) -> Result<std::result::Result<usize, String>> {
    Ok(Ok(match c.present("sample_size") {
        Some(Value::Array(_)) => {
            let sizes = c.usize_list("sample_size")?;
            match sizes.split_first() {
                Some((&first, rest)) if rest.iter().all(|&s| s == first) => first,
                _ => {
                    return Ok(Err(format!(
                        "tiled VAE {what}: sample_size {sizes:?} is not one size (diffusers' tiles are \
                         square; diffusers 0.42 raises a TypeError on any list here)"
                    )))
                }
            }
        }
        _ => c.usize_or("sample_size", 32)?,
    }))
}

/// diffusers' tiled VAE pass (`tiled_decode` / `_tiled_encode`): `input` `(b, c, h, w)` is cut into tiles of `size`
/// every `stride` along both sides, `f` maps each tile, each result is blended with its already blended upper and
/// left neighbours over `blend_extent`, cropped to `row_limit`, and the crops are joined.
pub(crate) fn tiled(
    input: &Tensor,
    (size, stride): (usize, usize),
    (blend_extent, row_limit): (usize, usize),
    f: impl Fn(&Tensor) -> CResult<Tensor>,
) -> CResult<Tensor> {
    let (_, _, h, w) = input.dims4()?;
    let mut rows = Vec::with_capacity(h.div_ceil(stride));
    let mut above: Vec<Tensor> = Vec::new();
    for i in (0..h).step_by(stride) {
        let mut row: Vec<Tensor> = Vec::with_capacity(w.div_ceil(stride));
        let mut kept = Vec::with_capacity(w.div_ceil(stride));
        for (k, j) in (0..w).step_by(stride).enumerate() {
            let tile = input
                .narrow(2, i, size.min(h - i))?
                .narrow(3, j, size.min(w - j))?
                .contiguous()?;
            let mut tile = f(&tile)?;
            if let Some(up) = above.get(k) {
                tile = blend(up, &tile, blend_extent, 2)?;
            }
            if let Some(left) = row.last() {
                tile = blend(left, &tile, blend_extent, 3)?;
            }
            let (_, _, th, tw) = tile.dims4()?;
            kept.push(
                tile.narrow(2, 0, row_limit.min(th))?
                    .narrow(3, 0, row_limit.min(tw))?,
            );
            row.push(tile);
        }
        rows.push(Tensor::cat(&kept, 3)?);
        above = row;
    }
    Tensor::cat(&rows, 2)
}

/// diffusers' `blend_v` (`dim` 2) / `blend_h` (`dim` 3): the first `extent` rows (columns) of `b` become
/// `a`'s last ones x (1 - y / extent) + `b`'s x (y / extent), each weight rounded to the tensor's type once and
/// each product rounded before the sum, as torch computes `tensor * python_float`. Returns the blended `b`.
pub(super) fn blend(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> CResult<Tensor> {
    let (na, nb) = (a.dim(dim)?, b.dim(dim)?);
    let extent = extent.min(na).min(nb);
    if extent == 0 {
        return Ok(b.clone());
    }
    let ramp = |f: fn(f64) -> f64| -> CResult<Tensor> {
        let v: Vec<f32> = (0..extent)
            .map(|y| f(y as f64 / extent as f64) as f32)
            .collect();
        let mut shape = [1usize; 4];
        shape[dim] = extent;
        Tensor::from_vec(v, &shape[..], b.device())?.to_dtype(b.dtype())
    };
    let from_a = a
        .narrow(dim, na - extent, extent)?
        .broadcast_mul(&ramp(|r| 1.0 - r)?)?;
    let from_b = b.narrow(dim, 0, extent)?.broadcast_mul(&ramp(|r| r)?)?;
    let mixed = (from_a + from_b)?;
    if extent == nb {
        return Ok(mixed);
    }
    Tensor::cat(&[&mixed, &b.narrow(dim, extent, nb - extent)?], dim)
}

/// The sizes both halves of an `AutoencoderKL` are built with, read and checked once from its `config.json`.
#[derive(Debug, Clone)]
pub(super) struct VaeShape {
    pub(super) block_out_channels: Vec<usize>,
    pub(super) layers_per_block: usize,
    pub(super) groups: usize,
    pub(super) latent_channels: usize,
    pub(super) scale_factor: usize,
    pub(super) scaling_factor: f64,
}

impl VaeShape {
    pub(super) fn from_config(c: &ConfigFile) -> Result<Self> {
        let origin = c.origin();
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
                        format!("{key} {types:?} (sketchx builds {want} x block_out_channels)"),
                    ));
                }
            }
        }
        c.require("act_fn", &["silu".into()])?;
        c.require("mid_block_add_attention", &[true.into()])?;
        let groups = c.usize_or("norm_num_groups", 32)?;
        if let Some(bad) = block_out_channels
            .iter()
            .find(|&&ch| groups == 0 || ch % groups != 0)
        {
            return Err(Error::malformed(
                origin,
                format!(
                    "block_out_channels entry {bad} is not divisible by norm_num_groups {groups}"
                ),
            ));
        }
        Ok(Self {
            scale_factor: 1 << (block_out_channels.len() - 1),
            block_out_channels,
            layers_per_block: c.usize_or("layers_per_block", 1)?,
            groups,
            latent_channels: c.usize_or("latent_channels", 4)?,
            scaling_factor: c.f64_or("scaling_factor", 0.18215)?,
        })
    }
}

/// A loaded VAE with its latent scaling.
pub struct Vae {
    decoder: Decoder,
    tiling: std::result::Result<VaeTiling, String>,
    origin: String,
    /// Latents are divided by this before decoding (`scaling_factor`, 0.18215 for SD1.5).
    pub scaling_factor: f64,
    /// Image pixels per latent pixel along each side: 2^(number of blocks - 1).
    pub scale_factor: usize,
    /// Channels of the latents.
    pub latent_channels: usize,
}

super::config::var_builder_constructor!(Vae, "the VAE");

impl Vae {
    /// Builds the VAE's decoder from its `config.json` and weights (the encoder's weights are not read: see
    /// [`VaeEncoder`](super::vae_encoder::VaeEncoder)).
    pub fn load(vb: Weights, c: &ConfigFile) -> Result<Self> {
        let shape = VaeShape::from_config(c)?;
        let decoder = Decoder::new(
            vb,
            &shape.block_out_channels,
            shape.layers_per_block,
            shape.latent_channels,
            c.usize_or("out_channels", 3)?,
            shape.groups,
            c.bool_or("use_post_quant_conv", true)?,
        )?;
        Ok(Self {
            decoder,
            tiling: VaeTiling::from_config(c, shape.scale_factor)?,
            origin: c.origin().to_string(),
            scaling_factor: shape.scaling_factor,
            scale_factor: shape.scale_factor,
            latent_channels: shape.latent_channels,
        })
    }

    /// The tile geometry of [`Vae::decode_tiled`], or [`Error::UnsupportedModel`] if this VAE's `sample_size`
    /// does not give a usable one (see [`VaeTiling::new`]).
    pub fn tiling(&self) -> Result<VaeTiling> {
        self.tiling
            .clone()
            .map_err(|m| Error::unsupported(&self.origin, m))
    }

    /// Decodes latents `(batch, C, h, w)` into images `(batch, 3, h * scale, w * scale)` in about `[-1, 1]`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let scaled = (latents / self.scaling_factor)?;
        Ok(self.decoder.forward(&scaled)?)
    }

    /// [`Vae::decode`] as diffusers' `AutoencoderKL` decodes after `enable_tiling()`: latents larger than one
    /// tile ([`VaeTiling::latent_size`]) along either side are cut into overlapping tiles, each decoded on its
    /// own (`post_quant_conv` included), and neighbouring tiles are blended linearly over
    /// [`VaeTiling::blend_extent`] pixels, row by row, each tile with its already blended upper and left
    /// neighbours; smaller latents are decoded exactly as [`Vae::decode`] does. The decoder's memory is then
    /// that of one tile. The result differs from the untiled decode near the seams (each tile's group norms and
    /// attention see only the tile), as in diffusers.
    pub fn decode_tiled(&self, latents: &Tensor) -> Result<Tensor> {
        let t = self.tiling()?;
        let (_, _, h, w) = latents.dims4()?;
        let scaled = (latents / self.scaling_factor)?;
        if !t.applies_to(h, w) {
            return Ok(self.decoder.forward(&scaled)?);
        }
        Ok(tiled(
            &scaled,
            (t.latent_size, t.latent_stride),
            (t.blend_extent, t.row_limit),
            |tile| self.decoder.forward(tile),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tile_geometry_is_diffusers_for_sd_sizes() {
        // SD1.5 (sample_size 512, 4 blocks): 64-latent tiles every 48, 128 px blended, 384 px kept.
        assert_eq!(
            VaeTiling::new(512, 8).unwrap(),
            VaeTiling {
                sample_size: 512,
                latent_size: 64,
                latent_stride: 48,
                blend_extent: 128,
                row_limit: 384
            }
        );
        let t = VaeTiling::new(768, 8).unwrap();
        assert_eq!(
            (t.latent_size, t.latent_stride, t.blend_extent),
            (96, 72, 192)
        );
        let t = VaeTiling::new(32, 2).unwrap();
        assert_eq!(
            (t.latent_size, t.latent_stride, t.blend_extent),
            (16, 12, 8)
        );
        assert!(!t.applies_to(16, 16));
        assert!(t.applies_to(17, 16) && t.applies_to(16, 17));
    }

    #[test]
    fn tile_geometry_refuses_what_diffusers_cannot_tile() {
        // Zero stride: diffusers' range(0, h, 0) raises.
        assert!(VaeTiling::new(8, 8).unwrap_err().contains("stride of 0"));
        assert!(VaeTiling::new(4, 8).is_err());
        // 36 / 2 = 18-latent tiles every 13 = 26 px, but 27 px kept: diffusers' image would be too large.
        assert!(VaeTiling::new(36, 2)
            .unwrap_err()
            .contains("requested size"));
    }

    #[test]
    fn sample_size_comes_from_the_config_as_diffusers_reads_it() {
        let parse = |v: Value| {
            let c = ConfigFile::from_value(v, "vae/config.json").unwrap();
            VaeTiling::from_config(&c, 8).map(|r| r.map(|t| t.sample_size))
        };
        assert_eq!(
            parse(serde_json::json!({"sample_size": 512})).unwrap(),
            Ok(512)
        );
        assert_eq!(
            parse(serde_json::json!({"sample_size": [768, 768]})).unwrap(),
            Ok(768)
        );
        // Absent: AutoencoderKL's default, 32 (4 latent pixels with 4 blocks).
        assert_eq!(parse(serde_json::json!({})).unwrap(), Ok(32));
        assert!(parse(serde_json::json!({"sample_size": [512, 768]}))
            .unwrap()
            .unwrap_err()
            .contains("not one size"));
        assert!(parse(serde_json::json!({"sample_size": "big"})).is_err());
    }

    #[test]
    fn blend_matches_diffusers_row_formula() {
        let dev = candle_core::Device::Cpu;
        let a = Tensor::arange(0f32, 24.0, &dev)
            .unwrap()
            .reshape((1, 1, 6, 4))
            .unwrap();
        let b =
            (Tensor::ones((1, 1, 5, 4), candle_core::DType::F32, &dev).unwrap() * 100.0).unwrap();
        let out = blend(&a, &b, 4, 2).unwrap();
        assert_eq!(out.dims4().unwrap(), (1, 1, 5, 4));
        let got = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (av, bv) = (
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        for y in 0..5 {
            for x in 0..4 {
                let want = if y < 4 {
                    let r = y as f64 / 4.0;
                    av[(2 + y) * 4 + x] * (1.0 - r) as f32 + bv[y * 4 + x] * r as f32
                } else {
                    bv[y * 4 + x]
                };
                assert_eq!(got[y * 4 + x].to_bits(), want.to_bits(), "row {y} col {x}");
            }
        }
        // The extent is clamped to the smaller tile, as diffusers' min(a.shape, b.shape, extent). (Tiles of
        // one row have the same height.)
        let a5 = a.narrow(2, 0, 5).unwrap();
        let narrow = blend(&a5, &b.narrow(3, 0, 2).unwrap(), 3, 3).unwrap();
        assert_eq!(narrow.dims4().unwrap(), (1, 1, 5, 2));
        let got = narrow.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Columns 0 and 1 of b blend with a's last two columns (extent min(4, 2, 3) = 2).
        assert_eq!(got[0], av[2]);
        assert_eq!(got[1], av[3] * 0.5 + 50.0);
    }
}
