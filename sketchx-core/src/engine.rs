//! The generation engine: loads every network of an SD1.5 + ControlNet pipeline once, then turns a validated
//! request and a decoded sketch into RGB images, step for step as diffusers' `StableDiffusionControlNetPipeline`
//! does (same seed, same weights, same inputs: the same pixels within float rounding).

use std::collections::VecDeque;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::controlnet::{ControlNet, ControlResiduals};
use crate::models::loader::{build_error, var_builder, ModelSource, Resolver};
use crate::models::tokenizer::ClipTokenizer;
use crate::models::unet::UNet;
use crate::models::vae::Vae;
use crate::output::to_u8_like_diffusers;
use crate::request::GenerationRequest;
use crate::sampling::rng::TorchRng;
use crate::sampling::schedulers::{Scheduler, SchedulerConfig};
use crate::sketch::Sketch;

// The name parsers and defaults moved to `names` and `request`; re-exported here so that existing paths
// (`sketchx_core::engine::device_from_name`, ...) keep working.
pub use crate::names::{
    default_dtype, device_from_name, dtype_from_name, DEFAULT_CONTROLNET, DEFAULT_MODEL,
};
pub use crate::request::random_seed;

/// How many distinct prompt embeddings the engine keeps.
const PROMPT_CACHE_ENTRIES: usize = 32;

/// Which models to load and where to run them.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The Stable Diffusion repository or directory (unet/, vae/, text_encoder/, tokenizer/, scheduler/).
    pub model: ModelSource,
    /// The ControlNet repository or directory (config.json + weights at its root).
    pub controlnet: ModelSource,
    /// Where the networks run.
    pub device: Device,
    /// Precision. F32: the reference. BF16 on the CPU: matrix products (convolutions, linear layers) take bf16
    /// weights and bf16-rounded inputs and accumulate in f32, everything else stays f32 (fast with AVX-512 BF16).
    /// F16/BF16 on GPUs: weights and activations in that type.
    pub dtype: DType,
    /// A weights variant to prefer, e.g. `fp16` for `*.fp16.safetensors`; the plain files are used otherwise.
    pub variant: Option<String>,
    /// Decode images in overlapping tiles, as diffusers after `vae.enable_tiling()` (see
    /// [`Vae::decode_tiled`]): the VAE decoder's memory stays that of one tile (512x512 pixels for SD1.5)
    /// whatever the image size, and pixels near the seams differ from an untiled decode. Only images larger
    /// than one tile are affected. Default `false`, as in diffusers. With it on, [`Engine::load`] refuses a VAE
    /// whose config gives no usable tile size ([`Error::UnsupportedModel`]).
    pub vae_tiling: bool,
}

impl EngineConfig {
    /// The default models (downloaded from the Hub on first use) on the CPU in f32.
    pub fn default_models() -> Result<Self> {
        Ok(Self {
            model: ModelSource::parse(DEFAULT_MODEL)?,
            controlnet: ModelSource::parse(DEFAULT_CONTROLNET)?,
            device: Device::Cpu,
            dtype: DType::F32,
            variant: None,
            vae_tiling: false,
        })
    }

    /// The given models (Hub ids or local directories) on the CPU in f32.
    pub fn new(model: &str, controlnet: &str) -> Result<Self> {
        Ok(Self {
            model: ModelSource::parse(model)?,
            controlnet: ModelSource::parse(controlnet)?,
            device: Device::Cpu,
            dtype: DType::F32,
            variant: None,
            vae_tiling: false,
        })
    }
}

/// Where a generation is, reported after every denoising step and every decoded image.
#[derive(Debug, Clone, Copy)]
pub struct StepInfo<'a> {
    /// Denoising steps completed.
    pub step: usize,
    /// Denoising steps in all.
    pub total_steps: usize,
    /// Images decoded by the VAE so far.
    pub decoded: usize,
    /// Images in the batch.
    pub num_images: usize,
    /// The current latents `(num_images, C, h, w)` while denoising; `None` while decoding.
    pub latents: Option<&'a Tensor>,
}

/// A generation's result.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The seed used (the request's, or the random one drawn for it).
    pub seed: u64,
    /// Width of every image in pixels.
    pub width: u32,
    /// Height of every image in pixels.
    pub height: u32,
    /// The images, RGB8, row-major.
    pub images: Vec<Vec<u8>>,
}

/// The type of the activations for a model loaded in `dtype` on `device`: f32 in the CPU bf16 mode (see
/// [`EngineConfig::dtype`]), `dtype` otherwise.
pub fn activation_dtype(device: &Device, dtype: DType) -> DType {
    if device.is_cpu() && dtype == DType::BF16 {
        DType::F32
    } else {
        dtype
    }
}

/// The loaded networks and what is needed to run them.
pub struct Engine {
    tokenizer: ClipTokenizer,
    text_encoder: ClipTextModel,
    unet: UNet,
    controlnet: ControlNet,
    vae: Vae,
    scheduler_config: SchedulerConfig,
    device: Device,
    dtype: DType,
    vae_tiling: bool,
    prompt_cache: Mutex<VecDeque<(String, Tensor)>>,
}

fn load_json(r: &Resolver, rel: &str) -> Result<(Value, String)> {
    let value: Value = r.json(rel)?;
    Ok((value, r.describe(rel)))
}

impl Engine {
    /// Loads (downloading if needed) the tokenizer, text encoder, UNet, VAE, scheduler config and ControlNet.
    /// Every size comes from the components' own config files; a missing or malformed file is an error naming it.
    ///
    /// Every file is located (and downloaded) first; then the four networks are built at the same time, as tasks on
    /// rayon's pool, each reading only the tensors it uses straight into their final buffers (safetensors; see
    /// [`crate::models::weights`]), converted to [`EngineConfig::dtype`] as they are read. Nothing stays mapped:
    /// resident memory after loading is the weights themselves, and the peak during loading is no higher.
    pub fn load(config: &EngineConfig) -> Result<Self> {
        let base = Resolver::new(config.model.clone())?;
        let cn = Resolver::new(config.controlnet.clone())?;
        let variant = config.variant.as_deref();
        let (dev, dt) = (&config.device, config.dtype);

        let tok_files = ["vocab.json", "merges.txt"];
        let mut tok_dir = None;
        for f in tok_files {
            let p = base.get(&format!("tokenizer/{f}"))?;
            tok_dir = p.parent().map(|d| d.to_path_buf());
        }
        for f in ["tokenizer_config.json", "special_tokens_map.json"] {
            if base.exists(&format!("tokenizer/{f}")) {
                base.get(&format!("tokenizer/{f}"))?;
            }
        }
        let tokenizer = ClipTokenizer::from_dir(&tok_dir.expect("tokenizer dir"))?;

        // Find (and download if needed) every file first, one at a time; then build the four networks at once,
        // each reading its own weights (see `models::weights`): reading is bound by the kernel handing out and
        // filling fresh pages, which goes faster from several threads, and the small tensors of one network
        // overlap with the large ones of another. Errors are reported in the same order as a sequential load.
        let (te_json, te_origin) = load_json(&base, "text_encoder/config.json")?;
        let te_config: ClipTextConfig =
            serde_json::from_value(te_json).map_err(|e| Error::malformed(&te_origin, e))?;
        let te_path = base.weights("text_encoder", variant)?;
        let (unet_json, unet_origin) = load_json(&base, "unet/config.json")?;
        let unet_path = base.weights("unet", variant)?;
        let (vae_json, vae_origin) = load_json(&base, "vae/config.json")?;
        let vae_path = base.weights("vae", variant)?;
        let sched_path = base.get("scheduler/scheduler_config.json")?;
        let scheduler_config = SchedulerConfig::from_file(&sched_path)?;
        let (cn_json, cn_origin) = load_json(&cn, "config.json")?;
        let cn_path = cn.weights("", variant)?;

        // On rayon's pool, not on threads of their own: the reads inside fan out over the same pool, so a caller
        // that is itself a rayon task (with a one-thread pool, say) cannot deadlock waiting for them.
        let (mut text_encoder, mut unet, mut vae, mut controlnet) = (None, None, None, None);
        rayon::scope(|s| {
            s.spawn(|_| {
                text_encoder = Some(var_builder(&te_path, dt, dev).and_then(|vb| {
                    ClipTextModel::new(vb, &te_config, &te_origin)
                        .map_err(|e| candle_to_file(e, &te_path))
                }))
            });
            s.spawn(|_| {
                vae = Some(var_builder(&vae_path, dt, dev).and_then(|vb| {
                    Vae::new(vb, &vae_json, &vae_origin).map_err(|e| candle_to_file(e, &vae_path))
                }))
            });
            s.spawn(|_| {
                controlnet = Some(var_builder(&cn_path, dt, dev).and_then(|vb| {
                    ControlNet::new(vb, &cn_json, &cn_origin)
                        .map_err(|e| candle_to_file(e, &cn_path))
                }))
            });
            unet = Some(var_builder(&unet_path, dt, dev).and_then(|vb| {
                UNet::new(vb, &unet_json, &unet_origin).map_err(|e| candle_to_file(e, &unet_path))
            }));
        });
        // `rayon::scope` returns once every task has run (a panicking task re-panics here), so all four are set.
        let built = "every network's task ran";
        let (text_encoder, unet, vae, controlnet) = (
            text_encoder.expect(built),
            unet.expect(built),
            vae.expect(built),
            controlnet.expect(built),
        );
        let (text_encoder, unet, vae, controlnet) = (text_encoder?, unet?, vae?, controlnet?);
        if config.vae_tiling {
            vae.tiling()?;
        }

        if controlnet.downscale_factor() != vae.scale_factor {
            return Err(Error::unsupported(
                cn_origin,
                format!(
                    "the ControlNet reduces the sketch {}x but the VAE's latents are {}x smaller than the image",
                    controlnet.downscale_factor(),
                    vae.scale_factor
                ),
            ));
        }
        if unet.in_channels != vae.latent_channels {
            return Err(Error::unsupported(
                unet_origin,
                format!(
                    "the UNet takes {} channels but the VAE has {} latent channels",
                    unet.in_channels, vae.latent_channels
                ),
            ));
        }
        if te_config.hidden_size != unet.cross_attention_dim {
            return Err(Error::unsupported(
                unet_origin,
                format!(
                    "cross_attention_dim {} differs from the text encoder's hidden_size {}",
                    unet.cross_attention_dim, te_config.hidden_size
                ),
            ));
        }
        Ok(Self {
            tokenizer,
            text_encoder,
            unet,
            controlnet,
            vae,
            scheduler_config,
            device: config.device.clone(),
            dtype: activation_dtype(&config.device, config.dtype),
            vae_tiling: config.vae_tiling,
            prompt_cache: Mutex::new(VecDeque::new()),
        })
    }

    /// The device the networks run on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The type the networks take and return (f32 in the CPU bf16 mode, see [`EngineConfig::dtype`]).
    pub fn activation_dtype(&self) -> DType {
        self.dtype
    }

    /// Whether images are decoded in tiles ([`EngineConfig::vae_tiling`]).
    pub fn vae_tiling(&self) -> bool {
        self.vae_tiling
    }

    /// Image pixels per latent pixel (8 for SD1.5).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.scale_factor
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    /// The text encoder.
    pub fn text_encoder(&self) -> &ClipTextModel {
        &self.text_encoder
    }

    /// The UNet.
    pub fn unet(&self) -> &UNet {
        &self.unet
    }

    /// The ControlNet.
    pub fn controlnet(&self) -> &ControlNet {
        &self.controlnet
    }

    /// The VAE.
    pub fn vae(&self) -> &Vae {
        &self.vae
    }

    /// The scheduler configuration read from the model.
    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler_config
    }

    /// The text embedding `(1, 77, hidden)` of `text`, cached per distinct text.
    pub fn encode_prompt(&self, text: &str) -> Result<Tensor> {
        let mut cache = self.prompt_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pos) = cache.iter().position(|(k, _)| k == text) {
            let entry = cache.remove(pos).expect("position is valid");
            let t = entry.1.clone();
            cache.push_front(entry);
            return Ok(t);
        }
        drop(cache);
        let ids = self.tokenizer.encode_padded(text);
        let ids = Tensor::from_vec(ids.clone(), (1, ids.len()), &self.device)?;
        let emb = self.text_encoder.forward(&ids)?;
        let mut cache = self.prompt_cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.push_front((text.to_string(), emb.clone()));
        cache.truncate(PROMPT_CACHE_ENTRIES);
        Ok(emb)
    }

    /// The output size for `sketch` under `req` (explicit width/height, else derived from the sketch).
    pub fn output_size(&self, req: &GenerationRequest, sketch: &Sketch) -> Result<(u32, u32)> {
        let (w, h) = sketch.target_size(req.width, req.height);
        let f = self.vae.scale_factor as u32;
        for (field, v) in [("width", w), ("height", h)] {
            if v % f != 0 {
                return Err(Error::invalid(
                    field,
                    format!("{v} is not a multiple of this model's VAE scale factor {f}"),
                ));
            }
        }
        Ok((w, h))
    }

    /// Generates `req.num_images` images from `sketch`. `observer` is called after every denoising step and
    /// every decoded image; returning `false` stops the generation with [`Error::Cancelled`].
    pub fn generate(
        &self,
        req: &GenerationRequest,
        sketch: &Sketch,
        observer: &mut dyn FnMut(&StepInfo) -> bool,
    ) -> Result<Generated> {
        req.validate()?;
        let (width, height) = self.output_size(req, sketch)?;
        let control = sketch.to_control(width, height, req.preprocess);
        let seed = req.seed.unwrap_or_else(random_seed);
        let n = req.num_images as usize;
        let steps = req.steps as usize;
        let cfg = req.uses_guidance();
        let guess = req.guess_mode() || self.controlnet.global_pool_conditions();
        let scale = req.conditioning_scale();
        let (dev, dt) = (&self.device, self.dtype);

        // Text: [negative x n, prompt x n] with guidance, else [prompt x n].
        let cond = self.encode_prompt(req.prompt_text())?.to_dtype(dt)?;
        let cond = cond.repeat((n, 1, 1))?;
        let embeds = if cfg {
            let uncond = self
                .encode_prompt(req.negative_prompt_text())?
                .to_dtype(dt)?
                .repeat((n, 1, 1))?;
            Tensor::cat(&[&uncond, &cond], 0)?
        } else {
            cond.clone()
        };
        let (cn_embeds, cn_batch) = if guess && cfg {
            (cond.clone(), n)
        } else {
            (embeds.clone(), embeds.dim(0)?)
        };
        let control = control
            .to_tensor(dev)?
            .to_dtype(dt)?
            .repeat((cn_batch, 1, 1, 1))?;

        let mut scheduler = Scheduler::new(req.scheduler, &self.scheduler_config, steps)?;
        let timesteps = scheduler.timesteps().to_vec();
        let total = timesteps.len();
        let f = self.vae.scale_factor;
        let shape = [
            n,
            self.vae.latent_channels,
            height as usize / f,
            width as usize / f,
        ];
        let mut rng = TorchRng::new(seed);
        let mut latents = (rng.randn(&shape, dev)? * scheduler.init_noise_sigma())?;

        for (i, &t) in timesteps.iter().enumerate() {
            let model_in = if cfg {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let model_in = scheduler.scale_model_input(&model_in, i)?.to_dtype(dt)?;
            let outside = (i as f64 / total as f64) < req.control_guidance_start
                || ((i + 1) as f64 / total as f64) > req.control_guidance_end;
            let residuals = if outside || scale == 0.0 {
                None
            } else {
                let control_in = if guess && cfg {
                    scheduler.scale_model_input(&latents, i)?.to_dtype(dt)?
                } else {
                    model_in.clone()
                };
                let r =
                    self.controlnet
                        .forward(&control_in, t, &cn_embeds, &control, scale, guess)?;
                Some(if guess && cfg { pad_uncond(r)? } else { r })
            };
            let noise = self.unet.forward(
                &model_in,
                t,
                &embeds,
                residuals.as_ref().map(|r| r.down.as_slice()),
                residuals.as_ref().map(|r| &r.mid),
            )?;
            let noise = noise.to_dtype(DType::F32)?;
            let noise = if cfg {
                let u = noise.narrow(0, 0, n)?;
                let c = noise.narrow(0, n, n)?;
                (&u + ((c - &u)? * req.guidance_scale)?)?
            } else {
                noise
            };
            latents = scheduler.step(&noise, i, &latents, &mut rng)?;
            let info = StepInfo {
                step: i + 1,
                total_steps: total,
                decoded: 0,
                num_images: n,
                latents: Some(&latents),
            };
            if !observer(&info) {
                return Err(Error::Cancelled);
            }
        }

        let mut images = Vec::with_capacity(n);
        for k in 0..n {
            let lat = latents.narrow(0, k, 1)?.to_dtype(dt)?;
            let img = if self.vae_tiling {
                self.vae.decode_tiled(&lat)?
            } else {
                self.vae.decode(&lat)?
            };
            let img = img.to_dtype(DType::F32)?;
            let hwc = img
                .squeeze(0)?
                .permute((1, 2, 0))?
                .flatten_all()?
                .to_vec1::<f32>()?;
            images.push(to_u8_like_diffusers(&hwc));
            let info = StepInfo {
                step: total,
                total_steps: total,
                decoded: k + 1,
                num_images: n,
                latents: None,
            };
            if !observer(&info) {
                return Err(Error::Cancelled);
            }
        }
        Ok(Generated {
            seed,
            width,
            height,
            images,
        })
    }
}

/// Guess mode with guidance: the ControlNet saw only the conditional half; the unconditional half gets zeros.
fn pad_uncond(r: ControlResiduals) -> Result<ControlResiduals> {
    let pad =
        |t: &Tensor| -> candle_core::Result<Tensor> { Tensor::cat(&[&t.zeros_like()?, t], 0) };
    Ok(ControlResiduals {
        down: r.down.iter().map(pad).collect::<candle_core::Result<_>>()?,
        mid: pad(&r.mid)?,
    })
}

/// Turns a candle shape/name error raised while building a network into an error naming the weights file.
fn candle_to_file(e: Error, path: &std::path::Path) -> Error {
    match e {
        Error::Candle(c) => build_error(path, c),
        other => other,
    }
}
