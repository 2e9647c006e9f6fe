//! The generation engine: loads every network of an SD1.5 + ControlNet pipeline once, then turns a validated
//! request and a decoded sketch into RGB images, step for step as diffusers' `StableDiffusionControlNetPipeline`
//! does (same seed, same weights, same inputs: the same pixels within float rounding), or, for a request with a
//! start image, as `StableDiffusionControlNetImg2ImgPipeline` does.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::config::ConfigFile;
use crate::models::controlnet::{ControlNet, ControlResiduals};
use crate::models::loader::{self, build_error, ModelSource, Resolver, WeightsSource};
use crate::models::lora::{self, FusedWeights, LoraSpec};
use crate::models::single_file::{self, SingleFileOptions};
use crate::models::taesd::TinyVae;
use crate::models::textual_inversion::{self, AddedEmbeddings, EmbeddingSpec};
use crate::models::tokenizer::ClipTokenizer;
use crate::models::unet::{guidance_scale_embedding, UNet};
use crate::models::vae::Vae;
use crate::models::vae_encoder::{image_to_tensor, VaeEncoder};
use crate::ops::on_pool;
use crate::output::to_u8_like_diffusers;
use crate::precision::Precision;
use crate::request::{GenerationRequest, StartImage, VaeKind};
use crate::sampling::rng::TorchRng;
use crate::sampling::schedulers::{Scheduler, SchedulerConfig};
use crate::sketch::Sketch;

// Where these lived before `names`; kept so that existing code compiles.
#[doc(hidden)]
pub use crate::names::{
    default_dtype, device_from_name, dtype_from_name, DEFAULT_CONTROLNET, DEFAULT_MODEL,
};
#[doc(hidden)]
pub use crate::request::random_seed;

/// How many distinct prompt embeddings the engine keeps.
const PROMPT_CACHE_ENTRIES: usize = 32;

/// Which models to load and where to run them.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The Stable Diffusion model: a Hub repository or a directory in diffusers layout (unet/, vae/,
    /// text_encoder/, tokenizer/, scheduler/), or a single checkpoint file in the original layout (`.safetensors`,
    /// `.ckpt`, `.pt`; see [`crate::models::single_file`] and [`EngineConfig::single_file`]).
    pub model: ModelSource,
    /// The ControlNet: a Hub repository or a directory (config.json + weights at its root), or a single file in
    /// the original layout (`control_model.*` or plain keys, `.safetensors` or `.pth`; its config from
    /// [`EngineConfig::controlnet_config`], else derived from the UNet's).
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
    /// LoRA adapters fused into the UNet's and the text encoder's weights at load, each with its scale, as
    /// diffusers' `load_lora_weights` + `fuse_lora` (several: `set_adapters` with their scales as weights, then
    /// `fuse_lora`). Kohya, diffusers/peft and old diffusers safetensors files; see [`crate::models::lora`]. A
    /// key that matches no layer, an SDXL file or a scale beyond ±10 fails [`Engine::load`]. Default: none.
    pub loras: Vec<LoraSpec>,
    /// A tiny VAE (TAESD, diffusers' `AutoencoderTiny`: `config.json` and weights at the root of a directory or
    /// Hub repository such as `madebyollin/taesd`) to load beside the model's own VAE, for requests asking for
    /// [`VaeKind::Tiny`] and for [`Engine::decode_preview`]. `None` (the default): no tiny VAE. Its latent channels
    /// and scale factor must match the model's VAE ([`Error::UnsupportedModel`] otherwise). Tiling does not apply
    /// to it (its activations are small).
    pub tiny_vae: Option<ModelSource>,
    /// Textual inversion embeddings bound to new tokens, in load order, as diffusers' `load_textual_inversion`
    /// (see [`crate::models::textual_inversion`]): A1111 `.pt` / `.safetensors` and diffusers `learned_embeds`
    /// files, usable in the prompt and the negative prompt. A width other than the text encoder's, a token
    /// already in the vocabulary or a file in no known layout fails [`Engine::load`] ([`Error::Embedding`]).
    /// Default: none.
    pub embeddings: Vec<EmbeddingSpec>,
    /// How a single-file [`EngineConfig::model`] is read: a diffusers config folder or an original `.yaml` for its
    /// sizes (SD1.5's built-in configs otherwise), EMA weights. Ignored for a folder or Hub model.
    pub single_file: SingleFileOptions,
    /// The config of a single-file [`EngineConfig::controlnet`]: a ControlNet folder or Hub repository (its
    /// `config.json`), as `ControlNetModel.from_single_file(config=...)`. `None` (the default): the UNet's config
    /// without its decoder half, with the conditioning embedding's sizes read from the file.
    pub controlnet_config: Option<ModelSource>,
    /// A VAE that replaces the model's (diffusers' `vae=` argument): a single file (original layout with no
    /// prefix, `first_stage_model.` or `vae.`, e.g. `vae-ft-mse-840000-ema-pruned.safetensors`; built with the
    /// model's VAE config), a folder or Hub repository (its `config.json` and weights at the root, or in `vae/`).
    /// `None` (the default): the model's own VAE.
    pub vae: Option<ModelSource>,
}

impl EngineConfig {
    /// The default models (downloaded from the Hub on first use) on the CPU in f32.
    pub fn default_models() -> Result<Self> {
        Self::new(DEFAULT_MODEL, DEFAULT_CONTROLNET)
    }

    /// The given models (Hub ids, local directories or single files) on the CPU in f32.
    pub fn new(model: &str, controlnet: &str) -> Result<Self> {
        Ok(Self {
            model: ModelSource::parse(model)?,
            controlnet: ModelSource::parse(controlnet)?,
            device: Device::Cpu,
            dtype: DType::F32,
            variant: None,
            vae_tiling: false,
            loras: Vec::new(),
            tiny_vae: None,
            embeddings: Vec::new(),
            single_file: SingleFileOptions::default(),
            controlnet_config: None,
            vae: None,
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
    /// The last step's estimate of the clean latents (the scheduler's x0, what live previews decode) while
    /// denoising; `None` while decoding.
    pub x0: Option<&'a Tensor>,
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
    Precision::new(device, dtype).activations_dtype()
}

/// The loaded networks and what is needed to run them.
pub struct Engine {
    tokenizer: ClipTokenizer,
    text_encoder: ClipTextModel,
    unet: UNet,
    controlnet: ControlNet,
    vae: Vae,
    tiny_vae: Option<TinyVae>,
    scheduler_config: SchedulerConfig,
    device: Device,
    dtype: DType,
    vae_tiling: bool,
    /// Text embeddings by (text, clip skip), most recently used first.
    prompt_cache: Mutex<VecDeque<((String, u32), Tensor)>>,
    /// The VAE encoder, built on the first img2img request (most requests never need it).
    vae_encoder: Mutex<Option<Arc<VaeEncoder>>>,
    vae_encoder_source: EncoderSource,
}

/// Where the VAE encoder's weights are, to build it when first needed.
struct EncoderSource {
    config: ConfigFile,
    source: WeightsSource,
    precision: Precision,
}

impl Engine {
    /// Loads (downloading if needed) the tokenizer, text encoder, UNet, VAE, scheduler config and ControlNet, and
    /// the tiny VAE when [`EngineConfig::tiny_vae`] names one.
    /// Every size comes from the components' own config files; a missing or malformed file is an error naming it.
    ///
    /// Every file is located (and downloaded) first; then the four networks are built at the same time, as tasks on
    /// rayon's pool, each reading only the tensors it uses straight into their final buffers (safetensors; see
    /// [`crate::models::weights`]) in the [`Precision`] of [`EngineConfig::dtype`] on [`EngineConfig::device`].
    /// Nothing stays mapped: resident memory after loading is the weights themselves, and the peak during loading
    /// is no higher. LoRAs ([`EngineConfig::loras`]) are read and checked against the UNet's and the text
    /// encoder's weights before any network is built, and their fused weights replace the files' tensors as the
    /// networks read them (before any rounding to the network's precision). Textual inversion embeddings
    /// ([`EngineConfig::embeddings`]) are read and their tokens added before any network is built too; their
    /// vectors become rows of the text encoder's token embedding table once it is.
    pub fn load(config: &EngineConfig) -> Result<Self> {
        let precision = Precision::new(&config.device, config.dtype);
        for spec in &config.loras {
            spec.validate()?;
        }
        let (mut tokenizer, files) = NetworkFiles::locate(config)?;
        let added = textual_inversion::add_embeddings(
            &config.embeddings,
            &mut tokenizer,
            files.text_encoder.0.hidden_size,
        )?;
        // Located before the networks are built, so that a missing tiny VAE fails fast.
        let tiny_files = config
            .tiny_vae
            .as_ref()
            .map(|source| locate_tiny_vae(source, config.variant.as_deref()))
            .transpose()?;
        let fused = lora::fuse_sources(
            &config.loras,
            &files.unet.1,
            &files.text_encoder.2,
            precision,
        )?;
        let (mut text_encoder, unet, vae, controlnet) =
            files.build(precision, &config.device, fused)?;
        if let Some(AddedEmbeddings {
            first_id, vectors, ..
        }) = &added
        {
            text_encoder.append_token_embeddings(
                *first_id as usize,
                vectors,
                &files.text_encoder.1,
            )?;
        }
        if config.vae_tiling {
            vae.tiling()?;
        }
        check_compatible(&files, &text_encoder, &unet, &vae, &controlnet)?;
        let tiny_vae = tiny_files
            .map(|(c, path)| load_tiny_vae(&c, &path, precision, &config.device, &vae))
            .transpose()?;
        Ok(Self {
            tokenizer,
            text_encoder,
            unet,
            controlnet,
            vae,
            tiny_vae,
            scheduler_config: files.scheduler,
            device: config.device.clone(),
            dtype: precision.activations_dtype(),
            vae_tiling: config.vae_tiling,
            prompt_cache: Mutex::new(VecDeque::new()),
            vae_encoder: Mutex::new(None),
            vae_encoder_source: EncoderSource {
                config: files.vae.0.clone(),
                source: files.vae.1.clone(),
                precision,
            },
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

    /// The VAE's encoder (img2img), built from the VAE's weights on first use and kept; a VAE file without the
    /// encoder's tensors is an error naming the file and the tensor.
    pub fn vae_encoder(&self) -> Result<Arc<VaeEncoder>> {
        let mut slot = self.vae_encoder.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = slot.as_ref() {
            return Ok(Arc::clone(e));
        }
        let s = &self.vae_encoder_source;
        // A single file's VAE: the decoder has read its tensors already and the encoder's are optional there, so
        // `finish` only reports what this build recorded (a misfit or missing key).
        let encoder = s.source.finish(
            loader::weights_from(&s.source, s.precision, &self.device)
                .and_then(|w| VaeEncoder::load(w, &s.config)),
        )?;
        let encoder = Arc::new(encoder);
        *slot = Some(Arc::clone(&encoder));
        Ok(encoder)
    }

    /// The tiny VAE ([`EngineConfig::tiny_vae`]), if one was loaded.
    pub fn tiny_vae(&self) -> Option<&TinyVae> {
        self.tiny_vae.as_ref()
    }

    /// Decodes predicted clean latents `x0` `(batch, C, h, w)` (as the denoising loop holds them, e.g. a
    /// scheduler step's `pred_original_sample`) with the tiny VAE into one RGB8 preview per image, row-major, of
    /// `w * scale` x `h * scale` pixels: diffusers' `AutoencoderTiny.decode(x0 / scaling_factor)` post-processed
    /// as the final images are (`(x / 2 + 0.5).clamp(0, 1) * 255`, rounded). Without a tiny VAE this is
    /// [`Error::InvalidRequest`] for the field `vae`.
    pub fn decode_preview(&self, x0: &Tensor) -> Result<Vec<Vec<u8>>> {
        let tiny = self.require_tiny()?;
        let n = x0.dim(0)?;
        (0..n)
            .map(|k| {
                let lat = x0.narrow(0, k, 1)?.to_dtype(self.dtype)?;
                Ok(to_u8_like_diffusers(&to_hwc(&tiny.decode(&lat)?)?))
            })
            .collect()
    }

    /// The tiny VAE, or the error for a request that needs one on an engine without it.
    fn require_tiny(&self) -> Result<&TinyVae> {
        self.tiny_vae.as_ref().ok_or_else(|| {
            Error::invalid(
                "vae",
                "\"tiny\" needs a tiny VAE, and this engine loaded none (EngineConfig::tiny_vae)",
            )
        })
    }

    /// The scheduler configuration read from the model.
    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler_config
    }

    /// The text embedding `(1, 77, hidden)` of `text` (the last layer's), cached per distinct text.
    pub fn encode_prompt(&self, text: &str) -> Result<Tensor> {
        self.encode_prompt_clip_skip(text, 0)
    }

    /// The text embedding `(1, 77, hidden)` of `text` with diffusers' `clip_skip` (see
    /// [`ClipTextModel::forward_clip_skip`]), cached per distinct (text, clip skip). Multi-vector textual
    /// inversion tokens are expanded first ([`ClipTokenizer::expand_multi_vector_tokens`]), as diffusers'
    /// `maybe_convert_prompt` does.
    pub fn encode_prompt_clip_skip(&self, text: &str, clip_skip: u32) -> Result<Tensor> {
        let mut cache = self.prompt_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pos) = cache
            .iter()
            .position(|((t, skip), _)| t == text && *skip == clip_skip)
        {
            let entry = cache.remove(pos).expect("position is valid");
            let t = entry.1.clone();
            cache.push_front(entry);
            return Ok(t);
        }
        drop(cache);
        let ids = self.prompt_ids(text);
        let ids = Tensor::from_vec(ids.clone(), (1, ids.len()), &self.device)?;
        let emb = on_pool(|| {
            self.text_encoder
                .forward_clip_skip(&ids, clip_skip as usize)
        })?;
        let mut cache = self.prompt_cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.push_front(((text.to_string(), clip_skip), emb.clone()));
        cache.truncate(PROMPT_CACHE_ENTRIES);
        Ok(emb)
    }

    /// The padded token ids the text encoder reads for `text`: multi-vector textual inversion tokens expanded
    /// (diffusers' `maybe_convert_prompt`), then tokenized, truncated and padded to the context length.
    pub fn prompt_ids(&self, text: &str) -> Vec<u32> {
        self.tokenizer
            .encode_padded(&self.tokenizer.expand_multi_vector_tokens(text))
    }

    /// The output size for `sketch` under `req` (explicit width/height, else derived from the sketch). Also
    /// refuses what only the loaded models decide (so that a pipeline refuses it at submit): a size that is not a
    /// multiple of the VAE's scale factor, `vae: tiny` without a tiny VAE ([`Error::InvalidRequest`] for `vae`), a
    /// `clip_skip` beyond the text encoder's layers.
    pub fn output_size(&self, req: &GenerationRequest, sketch: &Sketch) -> Result<(u32, u32)> {
        if req.vae == VaeKind::Tiny {
            self.require_tiny()?;
        }
        let layers = self.text_encoder.config().num_hidden_layers;
        if req.clip_skip as usize > layers {
            return Err(Error::invalid(
                "clip_skip",
                format!(
                    "{} exceeds this model's {layers} text encoder layers",
                    req.clip_skip
                ),
            ));
        }
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
    ///
    /// The stages, as diffusers' `StableDiffusionControlNetPipeline.__call__` runs them: encode the prompts,
    /// prepare the control image, draw the initial latents, denoise, decode. With a start image
    /// ([`GenerationRequest::start_image`]) as `StableDiffusionControlNetImg2ImgPipeline.__call__`: the initial
    /// latents are the start image's, VAE-encoded and noised to the first of the last `int(steps * strength)`
    /// steps, which are the ones that run. One difference: a UNet with a guidance embedding (an LCM model) gets
    /// it here as without a start image (diffusers' img2img ControlNet pipeline has no such embedding and runs
    /// classifier-free guidance instead, unlike its own LCM img2img pipeline).
    pub fn generate(
        &self,
        req: &GenerationRequest,
        sketch: &Sketch,
        observer: &mut dyn FnMut(&StepInfo) -> bool,
    ) -> Result<Generated> {
        req.validate()?;
        let (width, height) = self.output_size(req, sketch)?;
        let seed = req.seed.unwrap_or_else(random_seed);
        let guidance = Guidance::of(req, &self.controlnet, &self.unet);
        let text = self.encode_prompts(req, &guidance)?;
        let control = self.prepare_control(req, sketch, (width, height), &guidance)?;
        let mut scheduler = self.scheduler(req)?;
        let mut rng = TorchRng::new(seed);
        let begin = req.denoising_begin();
        let latents = match &req.start_image {
            None => self.initial_latents(&guidance, (width, height), &scheduler, &mut rng)?,
            Some(start) => self.start_latents(
                start,
                sketch,
                &guidance,
                (width, height),
                &scheduler,
                begin,
                &mut rng,
            )?,
        };
        let latents = self.denoise(
            req,
            &guidance,
            &text,
            &control,
            &mut scheduler,
            (latents, begin),
            &mut rng,
            observer,
        )?;
        let steps_run = scheduler.timesteps().len() - begin;
        let images = self.decode(&latents, req.vae, steps_run, observer)?;
        Ok(Generated {
            seed,
            width,
            height,
            images,
        })
    }

    /// The request's scheduler, built from the model's scheduler config (with the request's `timestep_spacing`
    /// override, as `from_config(config, timestep_spacing=...)`) and stepping with its `eta`.
    pub fn scheduler(&self, req: &GenerationRequest) -> Result<Scheduler> {
        let config = match req.timestep_spacing {
            Some(spacing) => self.scheduler_config.with_timestep_spacing(spacing),
            None => self.scheduler_config.clone(),
        };
        Scheduler::with_eta(req.scheduler, &config, req.steps as usize, req.eta)
    }

    /// The text embeddings the UNet and the ControlNet attend to. As in diffusers, clip skip applies to the
    /// prompt only: the negative prompt is encoded by the last layer.
    fn encode_prompts(&self, req: &GenerationRequest, g: &Guidance) -> Result<TextConditioning> {
        let dt = self.dtype;
        let cond = self
            .encode_prompt_clip_skip(req.prompt_text(), req.clip_skip)?
            .to_dtype(dt)?
            .repeat((g.n, 1, 1))?;
        let unet = if g.cfg {
            let uncond = self
                .encode_prompt(req.negative_prompt_text())?
                .to_dtype(dt)?
                .repeat((g.n, 1, 1))?;
            Tensor::cat(&[&uncond, &cond], 0)?
        } else {
            cond.clone()
        };
        let controlnet = if g.conditional_only() {
            cond
        } else {
            unet.clone()
        };
        Ok(TextConditioning { unet, controlnet })
    }

    /// The control image, preprocessed and resized to the output, repeated for the ControlNet's batch.
    fn prepare_control(
        &self,
        req: &GenerationRequest,
        sketch: &Sketch,
        (width, height): (u32, u32),
        g: &Guidance,
    ) -> Result<Tensor> {
        let batch = if g.conditional_only() || !g.cfg {
            g.n
        } else {
            2 * g.n
        };
        let control = sketch.to_control_with(width, height, req.preprocess, req.canny_thresholds());
        Ok(control
            .to_tensor(&self.device)?
            .to_dtype(self.dtype)?
            .repeat((batch, 1, 1, 1))?)
    }

    /// Standard normal latents from the torch-compatible RNG, scaled by the scheduler's initial sigma.
    fn initial_latents(
        &self,
        g: &Guidance,
        (width, height): (u32, u32),
        scheduler: &Scheduler,
        rng: &mut TorchRng,
    ) -> Result<Tensor> {
        let f = self.vae.scale_factor;
        let shape = [
            g.n,
            self.vae.latent_channels,
            height as usize / f,
            width as usize / f,
        ];
        Ok((rng.randn(&shape, &self.device)? * scheduler.init_noise_sigma())?)
    }

    /// img2img's initial latents, as diffusers' `prepare_latents`: the start image resized to the output
    /// (LANCZOS, as its image processor) and scaled to `[-1, 1]`, encoded by the VAE (tiled when the engine
    /// tiles), one sample of the latent distribution drawn from `rng` (one image: the batch shares it), times the
    /// VAE's scaling factor, repeated for the batch; then noise for the whole batch from the same `rng`, added at
    /// step `begin` by the scheduler. f32, as the denoising loop holds latents.
    #[allow(clippy::too_many_arguments)]
    fn start_latents(
        &self,
        start: &StartImage,
        sketch: &Sketch,
        g: &Guidance,
        (width, height): (u32, u32),
        scheduler: &Scheduler,
        begin: usize,
        rng: &mut TorchRng,
    ) -> Result<Tensor> {
        let encoder = self.vae_encoder()?;
        let rgb = start.image(sketch).resized(width, height);
        let pixels = image_to_tensor(
            &rgb,
            width as usize,
            height as usize,
            self.dtype,
            &self.device,
        )?;
        let dist = on_pool(|| {
            if self.vae_tiling {
                encoder.encode_tiled(&pixels)
            } else {
                encoder.encode(&pixels)
            }
        })?;
        let latents = dist.sample(rng)?.to_dtype(DType::F32)?;
        let latents = (latents * encoder.scaling_factor)?.repeat((g.n, 1, 1, 1))?;
        let noise = rng
            .randn_dtype(latents.dims(), self.dtype, &self.device)?
            .to_dtype(DType::F32)?;
        scheduler.add_noise(&latents, &noise, begin)
    }

    /// The denoising loop from step `begin` (0, or img2img's first kept step) to the last: ControlNet residuals
    /// (within the request's control window, counted over the steps that run), the UNet's noise prediction with
    /// classifier-free guidance, the scheduler's step; `observer` after every step.
    #[allow(clippy::too_many_arguments)]
    fn denoise(
        &self,
        req: &GenerationRequest,
        g: &Guidance,
        text: &TextConditioning,
        control: &Tensor,
        scheduler: &mut Scheduler,
        (mut latents, begin): (Tensor, usize),
        rng: &mut TorchRng,
        observer: &mut dyn FnMut(&StepInfo) -> bool,
    ) -> Result<Tensor> {
        let dt = self.dtype;
        let all = scheduler.timesteps().to_vec();
        let timesteps = all.get(begin..).unwrap_or_default();
        let total = timesteps.len();
        // An LCM UNet takes the guidance scale as an embedding of w = guidance_scale - 1 (float32, one per image)
        // instead of classifier-free guidance, as diffusers' pipeline does.
        let timestep_cond = match self.unet.time_cond_proj_dim {
            Some(dim) => {
                let w = vec![(req.guidance_scale - 1.0) as f32; g.n];
                Some(guidance_scale_embedding(&w, dim, &self.device)?.to_dtype(dt)?)
            }
            None => None,
        };
        for (i, &t) in timesteps.iter().enumerate() {
            let model_in = if g.cfg {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let model_in = scheduler
                .scale_model_input(&model_in, begin + i)?
                .to_dtype(dt)?;
            let control_in = if g.controls_step(req, i, total) {
                Some(if g.conditional_only() {
                    scheduler
                        .scale_model_input(&latents, begin + i)?
                        .to_dtype(dt)?
                } else {
                    model_in.clone()
                })
            } else {
                None
            };
            // The ControlNet's residuals, computed while the UNet's down and mid blocks run.
            let residuals = || -> Result<Option<ControlResiduals>> {
                let Some(control_in) = control_in else {
                    return Ok(None);
                };
                let r = self.controlnet.forward(
                    &control_in,
                    t,
                    &text.controlnet,
                    control,
                    g.scale,
                    g.guess,
                )?;
                Ok(Some(if g.conditional_only() {
                    pad_uncond(r)?
                } else {
                    r
                }))
            };
            let noise = on_pool(|| {
                self.unet.forward_controlled(
                    &model_in,
                    t,
                    &text.unet,
                    timestep_cond.as_ref(),
                    residuals,
                )
            })?;
            let noise = g.combine(noise.to_dtype(DType::F32)?, req.guidance_scale)?;
            let out = scheduler.step_output(&noise, begin + i, &latents, rng)?;
            latents = out.prev_sample;
            let info = StepInfo {
                step: i + 1,
                total_steps: total,
                decoded: 0,
                num_images: g.n,
                latents: Some(&latents),
                x0: Some(&out.x0),
            };
            if !observer(&info) {
                return Err(Error::Cancelled);
            }
        }
        Ok(latents)
    }

    /// Decodes each image's latents with the chosen VAE (the full one tiled when configured) into RGB8 as
    /// diffusers rounds it; `observer` after every image.
    fn decode(
        &self,
        latents: &Tensor,
        vae: VaeKind,
        total_steps: usize,
        observer: &mut dyn FnMut(&StepInfo) -> bool,
    ) -> Result<Vec<Vec<u8>>> {
        let n = latents.dim(0)?;
        let mut images = Vec::with_capacity(n);
        for k in 0..n {
            let lat = latents.narrow(0, k, 1)?.to_dtype(self.dtype)?;
            let img = match vae {
                // diffusers' pipeline with the tiny VAE as its `vae` decodes `latents / its scaling_factor`.
                VaeKind::Tiny => {
                    let tiny = self.require_tiny()?;
                    on_pool(|| tiny.decode(&lat))?
                }
                VaeKind::Full if self.vae_tiling => on_pool(|| self.vae.decode_tiled(&lat))?,
                VaeKind::Full => on_pool(|| self.vae.decode(&lat))?,
            };
            images.push(to_u8_like_diffusers(&to_hwc(&img)?));
            let info = StepInfo {
                step: total_steps,
                total_steps,
                decoded: k + 1,
                num_images: n,
                latents: None,
                x0: None,
            };
            if !observer(&info) {
                return Err(Error::Cancelled);
            }
        }
        Ok(images)
    }
}

/// How a request steers the denoising loop, decided once per generation.
struct Guidance {
    /// Images in the batch.
    n: usize,
    /// Classifier-free guidance: the UNet sees `[uncond, cond]`.
    cfg: bool,
    /// Guess mode (asked for, or forced by a ControlNet that pools its conditions).
    guess: bool,
    /// The ControlNet's conditioning scale.
    scale: f64,
}

impl Guidance {
    fn of(req: &GenerationRequest, controlnet: &ControlNet, unet: &UNet) -> Self {
        Self {
            n: req.num_images as usize,
            // diffusers: `guidance_scale > 1 and unet.config.time_cond_proj_dim is None`.
            cfg: req.uses_guidance() && unet.time_cond_proj_dim.is_none(),
            guess: req.guess_mode() || controlnet.global_pool_conditions(),
            scale: req.conditioning_scale(),
        }
    }

    /// Guess mode with guidance: the ControlNet sees only the conditional half of the batch.
    fn conditional_only(&self) -> bool {
        self.guess && self.cfg
    }

    /// Whether the ControlNet acts at step `i` of `total`: inside the request's control window, with a non-zero
    /// scale.
    fn controls_step(&self, req: &GenerationRequest, i: usize, total: usize) -> bool {
        let outside = (i as f64 / total as f64) < req.control_guidance_start
            || ((i + 1) as f64 / total as f64) > req.control_guidance_end;
        !outside && self.scale != 0.0
    }

    /// The guided prediction `u + w (c - u)` from the UNet's `[uncond, cond]` output; the output itself without
    /// guidance.
    fn combine(&self, noise: Tensor, guidance_scale: f64) -> Result<Tensor> {
        if !self.cfg {
            return Ok(noise);
        }
        let u = noise.narrow(0, 0, self.n)?;
        let c = noise.narrow(0, self.n, self.n)?;
        Ok((&u + ((c - &u)? * guidance_scale)?)?)
    }
}

/// The text embeddings of one generation.
struct TextConditioning {
    /// What the UNet attends to: `[negative x n, prompt x n]` with guidance, else `[prompt x n]`.
    unet: Tensor,
    /// What the ControlNet attends to: the UNet's, or only the prompt's in guess mode with guidance.
    controlnet: Tensor,
}

/// Every network's config and weights, located (and downloaded) before any is built.
struct NetworkFiles {
    text_encoder: (ClipTextConfig, String, WeightsSource),
    unet: (ConfigFile, WeightsSource),
    vae: (ConfigFile, WeightsSource),
    scheduler: SchedulerConfig,
    controlnet: (ConfigFile, WeightsSource),
}

impl NetworkFiles {
    /// Locates the tokenizer and the files one at a time, in the order a sequential load reports errors in: the
    /// model (a folder or Hub repository, or a single file), the VAE override, the ControlNet.
    fn locate(config: &EngineConfig) -> Result<(ClipTokenizer, Self)> {
        let variant = config.variant.as_deref();
        let need_vae = config.vae.is_none();
        let (tokenizer, text_encoder, unet, vae_config, vae, scheduler) = match &config.model {
            ModelSource::File(path) => {
                let c = single_file::open_checkpoint(path, &config.single_file, need_vae)?;
                let scheduler = SchedulerConfig::from_config(&c.scheduler)?;
                (
                    c.tokenizer,
                    c.text_encoder,
                    c.unet,
                    c.vae_config,
                    c.vae,
                    scheduler,
                )
            }
            source => {
                let base = Resolver::new(source.clone())?;
                let tokenizer = ClipTokenizer::from_resolver(&base)?;
                let te = base.config("text_encoder/config.json")?;
                let text_encoder = (
                    ClipTextConfig::from_config(&te)?,
                    te.origin().to_string(),
                    base.weights("text_encoder", variant)?.into(),
                );
                let unet = (
                    base.config("unet/config.json")?,
                    base.weights("unet", variant)?.into(),
                );
                let vae_config = base.config("vae/config.json")?;
                let vae = need_vae
                    .then(|| base.weights("vae", variant).map(WeightsSource::from))
                    .transpose()?;
                let scheduler =
                    SchedulerConfig::from_config(&base.config("scheduler/scheduler_config.json")?)?;
                (tokenizer, text_encoder, unet, vae_config, vae, scheduler)
            }
        };
        let vae = match (&config.vae, vae) {
            (Some(source), _) => locate_vae(source, &vae_config, variant)?,
            (None, Some(weights)) => (vae_config, weights),
            (None, None) => unreachable!("the model's VAE is located when there is no override"),
        };
        let controlnet = match &config.controlnet {
            ModelSource::File(path) => {
                let given = config
                    .controlnet_config
                    .as_ref()
                    .map(|s| Resolver::new(s.clone())?.config("config.json"))
                    .transpose()?;
                single_file::open_controlnet(path, given, &unet.0)?
            }
            source => {
                let cn = Resolver::new(source.clone())?;
                (cn.config("config.json")?, cn.weights("", variant)?.into())
            }
        };
        Ok((
            tokenizer,
            Self {
                text_encoder,
                unet,
                vae,
                scheduler,
                controlnet,
            },
        ))
    }

    /// Builds the four networks at once, as tasks on rayon's pool (not on threads of their own: the reads inside
    /// fan out over the same pool, so a caller that is itself a rayon task cannot deadlock waiting for them).
    /// Reading is bound by the kernel handing out and filling fresh pages, which goes faster from several
    /// threads, and the small tensors of one network overlap with the large ones of another. Errors come in the
    /// order of a sequential load. `fused` replaces tensors of the UNet and the text encoder (LoRAs).
    fn build(
        &self,
        precision: Precision,
        dev: &Device,
        fused: FusedWeights,
    ) -> Result<(ClipTextModel, UNet, Vae, ControlNet)> {
        let open = |source: &WeightsSource| loader::weights_from(source, precision, dev);
        // The fused maps move into their networks' builders, so they are freed with them once each is built.
        let FusedWeights {
            unet: fused_unet,
            text_encoder: fused_te,
        } = fused;
        let open_fused = |source: &WeightsSource, fused| {
            loader::weights_fused_from(source, precision, dev, fused)
        };
        let (mut te, mut unet, mut vae, mut cn) = (None, None, None, None);
        rayon::scope(|s| {
            let te = &mut te;
            s.spawn(move |_| {
                let (config, origin, source) = &self.text_encoder;
                *te = Some(
                    source.finish(
                        open_fused(source, fused_te)
                            .and_then(|w| ClipTextModel::load(w, config, origin)),
                    ),
                )
            });
            s.spawn(|_| {
                let (config, source) = &self.vae;
                vae = Some(source.finish(open(source).and_then(|w| Vae::load(w, config))))
            });
            s.spawn(|_| {
                let (config, source) = &self.controlnet;
                cn = Some(source.finish(open(source).and_then(|w| ControlNet::load(w, config))))
            });
            let (config, source) = &self.unet;
            unet = Some(
                source.finish(open_fused(source, fused_unet).and_then(|w| UNet::load(w, config))),
            );
        });
        // `rayon::scope` returns once every task has run (a panicking task re-panics here), so all four are set.
        let built = "every network's task ran";
        let (te, unet, vae, cn) = (
            te.expect(built),
            unet.expect(built),
            vae.expect(built),
            cn.expect(built),
        );
        Ok((te?, unet?, vae?, cn?))
    }
}

/// Refuses networks that cannot work together, naming the file whose sizes disagree.
fn check_compatible(
    files: &NetworkFiles,
    text_encoder: &ClipTextModel,
    unet: &UNet,
    vae: &Vae,
    controlnet: &ControlNet,
) -> Result<()> {
    let (unet_origin, cn_origin) = (files.unet.0.origin(), files.controlnet.0.origin());
    if controlnet.residual_channels() != unet.residual_channels() {
        return Err(Error::unsupported(
            cn_origin,
            format!(
                "the ControlNet's residual channels {:?} do not fit the UNet's skip connections {:?} ({unet_origin})",
                controlnet.residual_channels(),
                unet.residual_channels()
            ),
        ));
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
    let hidden = text_encoder.config().hidden_size;
    if hidden != unet.cross_attention_dim {
        return Err(Error::unsupported(
            unet_origin,
            format!(
                "cross_attention_dim {} differs from the text encoder's hidden_size {hidden}",
                unet.cross_attention_dim
            ),
        ));
    }
    Ok(())
}

/// One decoded image `(1, 3, H, W)` as f32 values in height, width, channel order.
fn to_hwc(img: &Tensor) -> Result<Vec<f32>> {
    Ok(img
        .to_dtype(DType::F32)?
        .squeeze(0)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// The config and weights file of [`EngineConfig::tiny_vae`] (both at the source's root), downloaded if needed.
fn locate_tiny_vae(source: &ModelSource, variant: Option<&str>) -> Result<(ConfigFile, PathBuf)> {
    if let ModelSource::File(p) = source {
        return Err(Error::invalid(
            "tiny_vae",
            format!(
                "{} is a file; a tiny VAE is read from a folder or Hub repository (config.json and weights)",
                p.display()
            ),
        ));
    }
    let resolver = Resolver::new(source.clone())?;
    Ok((
        resolver.config("config.json")?,
        resolver.weights("", variant)?,
    ))
}

/// The config and weights of a VAE override ([`EngineConfig::vae`]): a single file built with the model's VAE
/// config, or a folder / Hub repository with its own `config.json` at the root (a VAE repository) or in `vae/` (a
/// whole model's).
fn locate_vae(
    source: &ModelSource,
    model_vae: &ConfigFile,
    variant: Option<&str>,
) -> Result<(ConfigFile, WeightsSource)> {
    if let ModelSource::File(path) = source {
        return Ok((model_vae.clone(), single_file::open_vae(path, model_vae)?));
    }
    let r = Resolver::new(source.clone())?;
    let sub = if r.exists("config.json") { "" } else { "vae" };
    let config = r.config(if sub.is_empty() {
        "config.json"
    } else {
        "vae/config.json"
    })?;
    Ok((config, r.weights(sub, variant)?.into()))
}

/// Builds the tiny VAE and checks that it decodes the model's latents: same latent channels, same scale factor
/// as the model's VAE.
fn load_tiny_vae(
    config: &ConfigFile,
    path: &Path,
    precision: Precision,
    dev: &Device,
    vae: &Vae,
) -> Result<TinyVae> {
    let tiny = loader::weights(path, precision, dev)
        .and_then(|w| TinyVae::load(w, config).map_err(|e| candle_to_file(e, path)))?;
    if tiny.latent_channels != vae.latent_channels || tiny.scale_factor != vae.scale_factor {
        return Err(Error::unsupported(
            config.origin(),
            format!(
                "the tiny VAE takes {} latent channels and upsamples {}x, the model's VAE has {} and {}x",
                tiny.latent_channels, tiny.scale_factor, vae.latent_channels, vae.scale_factor
            ),
        ));
    }
    Ok(tiny)
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
