//! The denoising UNet (diffusers' `UNet2DConditionModel`), built from `unet/config.json` with the shared `blocks` module.
//!
//! Also holds the config reading shared with the ControlNet, whose encoder half has the UNet's shape: every
//! size comes from the file, and options that would change results but are not implemented are refused with
//! [`Error::UnsupportedModel`] instead of being ignored.

use candle_core::{Module, Tensor};
use candle_nn::Conv2dConfig;
use serde_json::Value;

use super::blocks::{
    conv2d, group_norm, BlockParams, BlockSpec, DownBlock, MidBlock, TimeEmbedding, UpBlock,
};
use super::config::ConfigFile;
use super::controlnet::ControlResiduals;
use crate::error::{Error, Result};
use crate::ops::conv::FastConv2d as Conv2d;
use crate::ops::norm::FastGroupNorm as GroupNorm;
use crate::precision::Weights;

/// The UNet-shaped part of a UNet or ControlNet config.
#[derive(Debug, Clone)]
pub(crate) struct UNetShape {
    /// Latent channels in.
    pub in_channels: usize,
    /// One entry per down block.
    pub blocks: Vec<BlockSpec>,
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: usize,
    /// Widths, groups and epsilon shared by every block.
    pub params: BlockParams,
    /// Sinusoidal embedding order (`flip_sin_to_cos`).
    pub flip_sin_to_cos: bool,
    /// Sinusoidal embedding shift (`freq_shift`).
    pub freq_shift: f64,
    /// Padding of the stride-2 down-sampling convolutions.
    pub downsample_padding: usize,
    /// Output scale of the mid block's resnets.
    pub mid_block_scale_factor: f64,
    /// Transformer blocks per attention in the mid block.
    pub mid_depth: usize,
    /// Whether inputs are mapped from [0, 1] to [-1, 1] first.
    pub center_input_sample: bool,
    /// `time_cond_proj_dim` (LCM models): width of the condition the time embedding's `cond_proj` takes.
    pub time_cond_proj_dim: Option<usize>,
}

/// Reads the shared UNet/ControlNet fields, refusing options sketchx does not implement.
pub(crate) fn parse_unet_shape(c: &ConfigFile) -> Result<UNetShape> {
    let down = c.str_list("down_block_types")?;
    let channels = c.usize_list("block_out_channels")?;
    let n = down.len();
    if n == 0 || channels.len() != n {
        return Err(Error::malformed(
            c.origin(),
            format!(
                "block_out_channels ({} entries) must match down_block_types ({n} entries)",
                channels.len()
            ),
        ));
    }
    // `attention_head_dim` historically holds the number of heads (diffusers' naming quirk); an explicit
    // `num_attention_heads` wins.
    let heads = if c.present("num_attention_heads").is_some() {
        c.per_block("num_attention_heads", n, None)?
    } else {
        c.per_block("attention_head_dim", n, Some(8))?
    };
    let depth = c.per_block("transformer_layers_per_block", n, Some(1))?;
    let groups = c.usize_or("norm_num_groups", 32)?;
    let mut blocks = Vec::with_capacity(n);
    for i in 0..n {
        let cross = match down[i].as_str() {
            "CrossAttnDownBlock2D" => Some(depth[i]),
            "DownBlock2D" => None,
            other => {
                return Err(Error::unsupported(
                    c.origin(),
                    format!("down block type {other:?}"),
                ))
            }
        };
        if groups == 0 || channels[i] % groups != 0 {
            return Err(Error::malformed(
                c.origin(),
                format!(
                    "block_out_channels[{i}] = {} is not divisible by norm_num_groups = {groups}",
                    channels[i]
                ),
            ));
        }
        // Blocks with attention (cross-attention blocks, and the last block whose width the mid block's attention
        // uses) need at least one channel per head; like diffusers, head_dim = channels / heads, rounded down.
        let has_attention = cross.is_some() || i == n - 1;
        if has_attention && (heads[i] == 0 || channels[i] < heads[i]) {
            return Err(Error::malformed(
                c.origin(),
                format!(
                    "block_out_channels[{i}] = {} is fewer than its {} attention heads",
                    channels[i], heads[i]
                ),
            ));
        }
        blocks.push(BlockSpec {
            channels: channels[i],
            cross_attention: cross,
            heads: heads[i],
        });
    }
    for key in ["layers_per_block", "cross_attention_dim"] {
        if c.present(key).is_some_and(Value::is_array) {
            return Err(Error::unsupported(
                c.origin(),
                format!("a per-block list for `{key}`"),
            ));
        }
    }
    // Options that change results and that sketchx does not implement: refused unless at their SD1.5 value.
    let expected: [(&str, Value); 18] = [
        ("only_cross_attention", false.into()),
        ("dual_cross_attention", false.into()),
        ("class_embed_type", Value::Null),
        ("num_class_embeds", Value::Null),
        ("addition_embed_type", Value::Null),
        ("encoder_hid_dim", Value::Null),
        ("encoder_hid_dim_type", Value::Null),
        ("timestep_post_act", Value::Null),
        ("act_fn", "silu".into()),
        ("resnet_time_scale_shift", "default".into()),
        ("time_embedding_type", "positional".into()),
        ("mid_block_type", "UNetMidBlock2DCrossAttn".into()),
        ("conv_in_kernel", 3.into()),
        ("conv_out_kernel", 3.into()),
        ("attention_type", "default".into()),
        ("cross_attention_norm", Value::Null),
        ("resnet_skip_time_act", false.into()),
        ("time_embedding_dim", Value::Null),
    ];
    for (key, value) in &expected {
        c.require(key, std::slice::from_ref(value))?;
    }
    let b0 = channels[0];
    Ok(UNetShape {
        in_channels: c.usize_or("in_channels", 4)?,
        blocks,
        layers_per_block: c.usize_or("layers_per_block", 2)?,
        params: BlockParams {
            groups,
            eps: c.f64_or("norm_eps", 1e-5)?,
            temb: b0 * 4,
            cross_dim: c.usize_or("cross_attention_dim", 1280)?,
            linear_projection: c.bool_or("use_linear_projection", false)?,
        },
        flip_sin_to_cos: c.bool_or("flip_sin_to_cos", true)?,
        freq_shift: c.f64_or("freq_shift", 0.0)?,
        downsample_padding: c.usize_or("downsample_padding", 1)?,
        mid_block_scale_factor: c.f64_or("mid_block_scale_factor", 1.0)?,
        mid_depth: depth[n - 1],
        center_input_sample: c.bool_or("center_input_sample", false)?,
        time_cond_proj_dim: match c.usize_opt("time_cond_proj_dim")? {
            Some(0) => return Err(c.bad("time_cond_proj_dim", "a positive integer")),
            other => other,
        },
    })
}

impl UNetShape {
    /// Builds the conv_in, time embedding, down blocks and mid block shared by the UNet and the ControlNet.
    pub fn build_encoder(&self, vb: &Weights) -> candle_core::Result<Encoder> {
        let b0 = self.blocks[0].channels;
        let p = &self.params;
        let conv_in = conv2d(
            self.in_channels,
            b0,
            3,
            Conv2dConfig {
                padding: 1,
                ..Default::default()
            },
            vb.pp("conv_in"),
        )?;
        let time = TimeEmbedding::new(
            vb.pp("time_embedding"),
            b0,
            p.temb,
            self.flip_sin_to_cos,
            self.freq_shift,
            self.time_cond_proj_dim,
        )?;
        let n = self.blocks.len();
        let mut down = Vec::with_capacity(n);
        let mut cin = b0;
        for (i, spec) in self.blocks.iter().enumerate() {
            let pad = (i + 1 < n).then_some(self.downsample_padding);
            down.push(DownBlock::new(
                vb.pp("down_blocks").pp(i),
                cin,
                spec,
                self.layers_per_block,
                pad,
                p,
            )?);
            cin = spec.channels;
        }
        let last = self.blocks[n - 1];
        let mid = MidBlock::new(
            vb.pp("mid_block"),
            last.channels,
            last.heads,
            self.mid_depth,
            self.mid_block_scale_factor,
            p,
        )?;
        Ok(Encoder {
            conv_in,
            time,
            down,
            mid,
            center_input_sample: self.center_input_sample,
            residual_channels: self.residual_channels(),
        })
    }

    /// The channels of the encoder's skip connections, in order: conv_in's output, then each down block's resnets
    /// and down-sampler (the last block has none), and last the mid block's output. A ControlNet's residuals must
    /// have exactly these to be added to a UNet's.
    pub fn residual_channels(&self) -> Vec<usize> {
        let n = self.blocks.len();
        let mut v = vec![self.blocks[0].channels];
        for (i, b) in self.blocks.iter().enumerate() {
            let count = self.layers_per_block + usize::from(i + 1 < n);
            v.extend(std::iter::repeat_n(b.channels, count));
        }
        v.push(self.blocks[n - 1].channels);
        v
    }
}

/// The UNet's encoder half: what the ControlNet copies.
#[derive(Debug)]
pub(crate) struct Encoder {
    conv_in: Conv2d,
    time: TimeEmbedding,
    down: Vec<DownBlock>,
    mid: MidBlock,
    center_input_sample: bool,
    /// [`UNetShape::residual_channels`].
    pub(crate) residual_channels: Vec<usize>,
}

impl Encoder {
    /// The time embedding of `timestep` for `xs`'s batch, in its dtype, with the optional `cond_proj` condition.
    pub fn time_embedding(
        &self,
        timestep: f64,
        xs: &Tensor,
        condition: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        self.time
            .forward(timestep, xs.dim(0)?, xs.dtype(), xs.device(), condition)
    }

    /// `conv_in` of the (optionally centred) latents.
    pub fn conv_in(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if self.center_input_sample {
            self.conv_in.forward(&((xs * 2.0)? - 1.0)?)
        } else {
            self.conv_in.forward(xs)
        }
    }

    /// Runs the down blocks from the `conv_in` output `xs`; returns the last state and every skip connection
    /// (the `conv_in` output first).
    pub fn down(
        &self,
        xs: Tensor,
        temb: &Tensor,
        ctx: &Tensor,
    ) -> candle_core::Result<(Tensor, Vec<Tensor>)> {
        let mut states = vec![xs.clone()];
        let mut xs = xs;
        let mut blocks = self.down.iter();
        // Classifier-free guidance: both halves of the batch hold the same latents (and time), so the first block
        // runs on one half until its first cross-attention (`DownBlock::forward_shared`).
        if let Some((half, half_temb)) = shared_halves(&xs, temb)? {
            #[cfg(test)]
            tests::SHARED_PASSES.with(|c| c.set(c.get() + 1));
            if let Some(b) = blocks.next() {
                xs = b.forward_shared((&half, &half_temb), temb, ctx, &mut states)?;
            }
        }
        for b in blocks {
            xs = b.forward(&xs, temb, ctx, &mut states)?;
        }
        Ok((xs, states))
    }

    /// Runs the mid block.
    pub fn mid(&self, xs: &Tensor, temb: &Tensor, ctx: &Tensor) -> candle_core::Result<Tensor> {
        self.mid.forward(xs, temb, ctx)
    }
}

/// The first halves of `xs` and `temb` when the batch splits into two halves of the same bits in both (f32 on the
/// CPU; anything else is never shared).
fn shared_halves(xs: &Tensor, temb: &Tensor) -> candle_core::Result<Option<(Tensor, Tensor)>> {
    #[cfg(test)]
    if !tests::SHARE_HALVES.load(std::sync::atomic::Ordering::Relaxed) {
        return Ok(None);
    }
    let b = xs.dim(0)?;
    if b < 2 || !b.is_multiple_of(2) || temb.dim(0)? != b {
        return Ok(None);
    }
    if !(halves_equal(xs)? && halves_equal(temb)?) {
        return Ok(None);
    }
    Ok(Some((xs.narrow(0, 0, b / 2)?, temb.narrow(0, 0, b / 2)?)))
}

/// Whether the two halves of `t` (an even batch along the first dimension) are the same bits; `false` for tensors
/// other than contiguous f32 ones on the CPU.
fn halves_equal(t: &Tensor) -> candle_core::Result<bool> {
    use candle_core::{CpuStorage, Storage};
    let (storage, layout) = t.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(v)), Some((start, end))) =
        (&*storage, layout.contiguous_offsets())
    else {
        return Ok(false);
    };
    let (a, b) = v[start..end].split_at((end - start) / 2);
    Ok(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()))
}

/// A loaded UNet with the facts the sampler needs.
#[derive(Debug)]
pub struct UNet {
    encoder: Encoder,
    up: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    /// Latent channels in.
    pub in_channels: usize,
    /// Width of the text embeddings it attends to.
    pub cross_attention_dim: usize,
    /// `time_cond_proj_dim` of LCM models: the width of the guidance embedding [`UNet::forward_cond`] takes.
    /// diffusers runs such a model without classifier-free guidance.
    pub time_cond_proj_dim: Option<usize>,
}

super::config::var_builder_constructor!(UNet, "the UNet");

impl UNet {
    /// Builds the UNet from its `config.json` and weights.
    pub fn load(vb: Weights, c: &ConfigFile) -> Result<Self> {
        let origin = c.origin();
        let shape = parse_unet_shape(c)?;
        let down = c.str_list("down_block_types")?;
        if c.present("up_block_types").is_some() {
            let up = c.str_list("up_block_types")?;
            let expected: Vec<String> =
                down.iter().rev().map(|d| d.replace("Down", "Up")).collect();
            if up != expected {
                return Err(Error::unsupported(
                    origin,
                    format!("up_block_types {up:?} do not mirror down_block_types (expected {expected:?})"),
                ));
            }
        }
        let out_channels = c.usize_or("out_channels", 4)?;
        let encoder = shape.build_encoder(&vb)?;
        let n = shape.blocks.len();
        let rev: Vec<BlockSpec> = shape.blocks.iter().rev().copied().collect();
        let mut up = Vec::with_capacity(n);
        let mut prev = rev[0].channels;
        for (i, spec) in rev.iter().enumerate() {
            let skip_in = rev[(i + 1).min(n - 1)].channels;
            up.push(UpBlock::new(
                vb.pp("up_blocks").pp(i),
                prev,
                skip_in,
                spec,
                shape.layers_per_block + 1,
                i + 1 < n,
                &shape.params,
            )?);
            prev = spec.channels;
        }
        let b0 = shape.blocks[0].channels;
        let conv_norm_out = group_norm(
            shape.params.groups,
            b0,
            shape.params.eps,
            vb.pp("conv_norm_out"),
        )?;
        let conv_out = conv2d(
            b0,
            out_channels,
            3,
            Conv2dConfig {
                padding: 1,
                ..Default::default()
            },
            vb.pp("conv_out"),
        )?;
        Ok(Self {
            encoder,
            up,
            conv_norm_out,
            conv_out,
            in_channels: shape.in_channels,
            cross_attention_dim: shape.params.cross_dim,
            time_cond_proj_dim: shape.time_cond_proj_dim,
        })
    }

    /// The channels of the skip connections a ControlNet adds residuals to, then the mid block's.
    pub fn residual_channels(&self) -> &[usize] {
        &self.encoder.residual_channels
    }

    /// Predicts the noise in `xs` at `timestep` given text embeddings `ctx`, optionally adding ControlNet
    /// residuals to the skip connections (`down`) and the mid block output (`mid`).
    pub fn forward(
        &self,
        xs: &Tensor,
        timestep: f64,
        ctx: &Tensor,
        down: Option<&[Tensor]>,
        mid: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.forward_cond(xs, timestep, ctx, None, down, mid)
    }

    /// [`UNet::forward`] with diffusers' `timestep_cond`: for a model with `time_cond_proj_dim`, the
    /// `(batch, time_cond_proj_dim)` guidance embedding ([`guidance_scale_embedding`]) added to the time
    /// embedding's input through `cond_proj`; ignored by other models, as in diffusers.
    pub fn forward_cond(
        &self,
        xs: &Tensor,
        timestep: f64,
        ctx: &Tensor,
        timestep_cond: Option<&Tensor>,
        down: Option<&[Tensor]>,
        mid: Option<&Tensor>,
    ) -> Result<Tensor> {
        let encoded = self.encode(xs, timestep, ctx, timestep_cond)?;
        self.decode(encoded, ctx, down, mid)
    }

    /// [`UNet::forward_cond`] with the ControlNet residuals that `control` computes (`None`: no residuals) while
    /// this network's time embedding, down blocks and mid block run, which do not depend on them: on the CPU the
    /// two run side by side on the thread pool (each one's operations still split across it), so that one's
    /// memory-bound layers overlap the other's compute-bound ones and neither thread waits between operations.
    /// The same values as computing the residuals first. Sequential on other devices and while the operation
    /// profiler is on (so that each operation's time is its own).
    pub fn forward_controlled(
        &self,
        xs: &Tensor,
        timestep: f64,
        ctx: &Tensor,
        timestep_cond: Option<&Tensor>,
        control: impl FnOnce() -> Result<Option<ControlResiduals>> + Send,
    ) -> Result<Tensor> {
        let encode = || self.encode(xs, timestep, ctx, timestep_cond);
        let (residuals, encoded) = if xs.device().is_cpu() && !crate::ops::profile::enabled() {
            rayon::join(control, encode)
        } else {
            (control(), encode())
        };
        let residuals = residuals?;
        self.decode(
            encoded?,
            ctx,
            residuals.as_ref().map(|r| r.down.as_slice()),
            residuals.as_ref().map(|r| &r.mid),
        )
    }

    /// The time embedding, `conv_in`, the down blocks and the mid block: what the ControlNet's residuals are added
    /// to.
    fn encode(
        &self,
        xs: &Tensor,
        timestep: f64,
        ctx: &Tensor,
        timestep_cond: Option<&Tensor>,
    ) -> Result<Encoded> {
        let (_, _, h, w) = xs.dims4()?;
        if let (Some(dim), Some(c)) = (self.time_cond_proj_dim, timestep_cond) {
            if c.dims() != [xs.dim(0)?, dim] {
                return Err(Error::JobFailed(format!(
                    "timestep_cond has shape {:?}, expected [{}, {dim}] (batch, time_cond_proj_dim)",
                    c.dims(),
                    xs.dim(0)?
                )));
            }
        }
        let temb = self.encoder.time_embedding(timestep, xs, timestep_cond)?;
        let x = self.encoder.conv_in(xs)?;
        let (x, skips) = self.encoder.down(x, &temb, ctx)?;
        let x = self.encoder.mid(&x, &temb, ctx)?;
        Ok(Encoded {
            x,
            skips,
            temb,
            size: (h, w),
        })
    }

    /// The ControlNet's residuals added to the skip connections (`down`) and the mid block's output (`mid`), then
    /// the up blocks and the output layers.
    fn decode(
        &self,
        Encoded {
            mut x,
            mut skips,
            temb,
            size: (h, w),
        }: Encoded,
        ctx: &Tensor,
        down: Option<&[Tensor]>,
        mid: Option<&Tensor>,
    ) -> Result<Tensor> {
        if let Some(extra) = down {
            if extra.len() != skips.len() {
                return Err(Error::JobFailed(format!(
                    "the ControlNet returned {} residuals but the UNet has {} skip connections",
                    extra.len(),
                    skips.len()
                )));
            }
            for (s, e) in skips.iter_mut().zip(extra) {
                *s = crate::ops::add::add(s, e, 1.0)?;
            }
        }
        if let Some(m) = mid {
            x = crate::ops::add::add(&x, m, 1.0)?;
        }
        let factor = 1usize << (self.up.len() - 1);
        let force_size = h % factor != 0 || w % factor != 0;
        for (i, blk) in self.up.iter().enumerate() {
            let last = i + 1 == self.up.len();
            let size = if !last && force_size {
                let remaining = skips.len() - blk.num_resnets();
                let (_, _, sh, sw) = skips[remaining - 1].dims4()?;
                Some((sh, sw))
            } else {
                None
            };
            x = blk.forward(&x, &mut skips, &temb, ctx, size)?;
        }
        Ok(self.conv_out.forward_norm_silu(&self.conv_norm_out, &x)?)
    }
}

/// The UNet's state where the ControlNet's residuals join it: the mid block's output, the skip connections, the
/// time embedding and the input's height and width.
struct Encoded {
    x: Tensor,
    skips: Vec<Tensor>,
    temb: Tensor,
    size: (usize, usize),
}

/// diffusers' `get_guidance_scale_embedding` (pipelines' LCM support): the `(w.len(), embedding_dim)` float32
/// embedding of guidance weights `w` (the pipeline passes `guidance_scale - 1` per image): `w * 1000` times
/// `exp(-ln(10000) / (half - 1) * i)` for `i < half = embedding_dim / 2`, sines first then cosines, zero-padded
/// to an odd `embedding_dim`. Computed in float32 as torch does.
pub fn guidance_scale_embedding(
    w: &[f32],
    embedding_dim: usize,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let half = embedding_dim / 2;
    // torch.log(torch.tensor(10000.0)) / (half_dim - 1), in float32 (inf for half = 1, as in torch).
    let scale = 10000f32.ln() / (half as f32 - 1.0);
    let freqs: Vec<f32> = (0..half).map(|i| (i as f32 * -scale).exp()).collect();
    let mut out = Vec::with_capacity(w.len() * embedding_dim);
    for &wi in w {
        let wi = wi * 1000.0;
        let args: Vec<f32> = freqs.iter().map(|f| wi * f).collect();
        out.extend(args.iter().map(|a| a.sin()));
        out.extend(args.iter().map(|a| a.cos()));
        if embedding_dim % 2 == 1 {
            out.push(0.0);
        }
    }
    Ok(Tensor::from_vec(out, (w.len(), embedding_dim), device)?)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicBool, Ordering};

    use candle_core::{Device, Tensor};

    use super::*;
    use crate::models::controlnet::ControlNet;
    use crate::models::loader::{weights, ModelSource, Resolver};
    use crate::precision::Precision;

    /// Off: every batch runs whole (the tests' reference for the shared halves).
    pub(crate) static SHARE_HALVES: AtomicBool = AtomicBool::new(true);

    thread_local! {
        /// Down passes on this thread that shared their halves.
        pub(crate) static SHARED_PASSES: Cell<usize> = const { Cell::new(0) };
    }

    fn fixture(dir: &str) -> Resolver {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/");
        Resolver::new(ModelSource::Local(format!("{root}{dir}").into())).unwrap()
    }

    fn config(r: &Resolver, file: &str) -> ConfigFile {
        ConfigFile::from_value(r.json(file).unwrap(), file).unwrap()
    }

    /// A classifier-free-guidance batch (the same latents twice, two texts) gives the same bits whether the first
    /// down block runs on one half until its cross-attention or on the whole batch, through the ControlNet and the
    /// UNet, in f32 and in the CPU bf16 mode; a batch whose halves differ is never shared.
    #[test]
    fn shared_halves_give_the_whole_batch_bits() {
        // Bit-exact: not while another test forces the portable kernels.
        crate::ops::cpu::detected_only(shared_halves_bits);
    }

    /// A network output's values (f32) as bits.
    fn bits(t: Tensor) -> Vec<u32> {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.iter().map(|v| v.to_bits()).collect()
    }

    /// The tiny fixture UNet and ControlNet in `precision`.
    fn tiny_models(precision: Precision) -> (UNet, ControlNet) {
        let dev = Device::Cpu;
        let (sd, cn_dir) = (fixture("tiny-sd"), fixture("tiny-controlnet"));
        let w = weights(&sd.weights("unet", None).unwrap(), precision, &dev).unwrap();
        let unet = UNet::load(w, &config(&sd, "unet/config.json")).unwrap();
        let w = weights(&cn_dir.weights("", None).unwrap(), precision, &dev).unwrap();
        let cn = ControlNet::load(w, &config(&cn_dir, "config.json")).unwrap();
        (unet, cn)
    }

    fn shared_halves_bits() {
        let dev = Device::Cpu;
        for precision in [Precision::F32, Precision::CpuBf16] {
            let (unet, cn) = tiny_models(precision);
            let latent = Tensor::randn(0f32, 1., (1, 4, 8, 8), &dev).unwrap();
            let xs = Tensor::cat(&[&latent, &latent], 0).unwrap();
            let ctx = Tensor::randn(0f32, 1., (2, 7, 32), &dev).unwrap();
            let cond = Tensor::rand(0f32, 1., (1, 3, 64, 64), &dev).unwrap();
            let cond = Tensor::cat(&[&cond, &cond], 0).unwrap();
            let run = |share: bool| {
                SHARE_HALVES.store(share, Ordering::Relaxed);
                SHARED_PASSES.with(|c| c.set(0));
                let res = cn.forward(&xs, 500.0, &ctx, &cond, 1.0, false).unwrap();
                let out = unet
                    .forward(&xs, 500.0, &ctx, Some(&res.down), Some(&res.mid))
                    .unwrap();
                SHARE_HALVES.store(true, Ordering::Relaxed);
                (bits(out), SHARED_PASSES.with(|c| c.get()))
            };
            let (shared, passes) = run(true);
            let (whole, none) = run(false);
            assert_eq!(
                (passes, none),
                (2, 0),
                "{precision:?}: ControlNet and UNet share"
            );
            assert!(
                shared == whole,
                "{precision:?}: shared halves changed the output"
            );
            // The two texts give two different halves (the sharing ends before the cross-attention).
            let half = shared.len() / 2;
            assert!(shared[..half] != shared[half..], "{precision:?}");
            // Different latents: nothing shared.
            SHARED_PASSES.with(|c| c.set(0));
            let other = Tensor::cat(&[&latent, &(&latent + 1.0).unwrap()], 0).unwrap();
            unet.forward(&other, 500.0, &ctx, None, None).unwrap();
            assert_eq!(SHARED_PASSES.with(|c| c.get()), 0);
        }
    }

    /// The ControlNet's residuals computed beside the UNet's down and mid blocks (`forward_controlled`, on a
    /// two-thread pool) give the same bits as computing them first, in f32 and in the CPU bf16 mode; without
    /// residuals it is `forward` without them (which differs: the residuals count), and the control's error comes
    /// back as it is.
    #[test]
    fn controlled_forward_gives_the_sequential_bits() {
        crate::ops::cpu::detected_only(controlled_forward_bits);
    }

    fn controlled_forward_bits() {
        let dev = Device::Cpu;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for precision in [Precision::F32, Precision::CpuBf16] {
            let (unet, cn) = tiny_models(precision);
            let xs = Tensor::randn(0f32, 1., (2, 4, 8, 8), &dev).unwrap();
            let ctx = Tensor::randn(0f32, 1., (2, 7, 32), &dev).unwrap();
            let cond = Tensor::rand(0f32, 1., (2, 3, 64, 64), &dev).unwrap();
            let control = || Ok(Some(cn.forward(&xs, 500.0, &ctx, &cond, 1.0, false)?));
            let res = control().unwrap().unwrap();
            let sequential = bits(
                unet.forward(&xs, 500.0, &ctx, Some(&res.down), Some(&res.mid))
                    .unwrap(),
            );
            let controlled = pool.install(|| {
                unet.forward_controlled(&xs, 500.0, &ctx, None, control)
                    .unwrap()
            });
            assert!(
                bits(controlled) == sequential,
                "{precision:?}: the residuals computed beside the down blocks changed the output"
            );
            let plain = bits(unet.forward(&xs, 500.0, &ctx, None, None).unwrap());
            let none = pool.install(|| {
                unet.forward_controlled(&xs, 500.0, &ctx, None, || Ok(None))
                    .unwrap()
            });
            assert!(bits(none) == plain, "{precision:?}: no residuals");
            assert!(
                plain != sequential,
                "{precision:?}: the residuals changed nothing"
            );
            let failed = pool.install(|| {
                unet.forward_controlled(&xs, 500.0, &ctx, None, || {
                    Err(Error::JobFailed("control failed".into()))
                })
            });
            assert!(
                matches!(failed, Err(Error::JobFailed(m)) if m == "control failed"),
                "{precision:?}: the control's error"
            );
        }
    }
}
