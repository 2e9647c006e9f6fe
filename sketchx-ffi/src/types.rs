//! The plain C structs: pipeline options, the request, job ids and job information, with their `_init`
//! functions and their translation to and from `sketchx-core` types. Defaults come from the core
//! ([`PipelineSettings::DEFAULT`], [`GenerationRequest::DEFAULT`]); parsing and validation happen in the core
//! ([`PipelineSettings::to_config`], [`GenerationRequest::validate`]).

use std::ffi::{c_char, c_int, c_void};
use std::path::PathBuf;
use std::sync::Arc;

use sketchx_core::request::{GenerationRequest, StartImage};
use sketchx_core::settings::{self, PipelineSettings};
use sketchx_core::{Error, JobState, JobStatus, PipelineConfig};

use crate::error::{guard, sketchx_result, Failure};
use crate::ptr::{arg_bytes, arg_out, arg_str, opt_str};

/// Length of a job id in characters (32 lowercase hex digits), without the terminating NUL.
pub const SKETCHX_JOB_ID_LEN: usize = 32;

/// A job's id as a fixed, NUL-terminated string of [`SKETCHX_JOB_ID_LEN`] lowercase hex digits (no allocation).
/// Pass `id.id` wherever a `const char *job_id` is expected.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct sketchx_job_id {
    /// The id, NUL-terminated.
    pub id: [c_char; 33],
}

impl sketchx_job_id {
    pub(crate) fn from_str(s: &str) -> Self {
        let mut id = [0 as c_char; 33];
        for (d, b) in id.iter_mut().zip(s.bytes().take(SKETCHX_JOB_ID_LEN)) {
            *d = b as c_char;
        }
        sketchx_job_id { id }
    }
}

/// Where a job is in its life. `COMPLETED`, `FAILED` and `CANCELLED` are final. Stable values.
#[allow(non_camel_case_types)]
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum sketchx_job_state {
    /// Waiting in the queue.
    SKETCHX_STATE_QUEUED = 0,
    /// Being generated.
    SKETCHX_STATE_RUNNING = 1,
    /// Every image was written.
    SKETCHX_STATE_COMPLETED = 2,
    /// An error stopped it; the status message says why.
    SKETCHX_STATE_FAILED = 3,
    /// Cancelled by the caller or by shutdown.
    SKETCHX_STATE_CANCELLED = 4,
}

impl From<JobState> for sketchx_job_state {
    fn from(s: JobState) -> Self {
        match s {
            JobState::Queued => sketchx_job_state::SKETCHX_STATE_QUEUED,
            JobState::Running => sketchx_job_state::SKETCHX_STATE_RUNNING,
            JobState::Completed => sketchx_job_state::SKETCHX_STATE_COMPLETED,
            JobState::Failed => sketchx_job_state::SKETCHX_STATE_FAILED,
            JobState::Cancelled => sketchx_job_state::SKETCHX_STATE_CANCELLED,
        }
    }
}

/// A job's status without its strings: filled by `sketchx_pipeline_poll` (no allocation for the caller), by
/// `sketchx_status_info`, and passed to the progress callback.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct sketchx_job_info {
    /// The job.
    pub job_id: sketchx_job_id,
    /// Its state.
    pub state: sketchx_job_state,
    /// 0..=100; 100 only when every image file is written.
    pub progress: f64,
    /// Denoising steps done.
    pub step: usize,
    /// Denoising steps in all.
    pub total_steps: usize,
    /// The seed the job uses (the request's, or the random one drawn at submission).
    pub seed: u64,
    /// Images requested.
    pub num_images: u32,
    /// Output width in pixels.
    pub width: u32,
    /// Output height in pixels.
    pub height: u32,
    /// 1-based position in the queue while queued (1 = next); 0 otherwise.
    pub queue_position: usize,
    /// Estimated seconds to completion while running; negative when unknown.
    pub eta_secs: f64,
    /// Image files written (non-zero only when completed).
    pub image_count: usize,
}

impl From<&JobStatus> for sketchx_job_info {
    fn from(s: &JobStatus) -> Self {
        sketchx_job_info {
            job_id: sketchx_job_id::from_str(s.job_id.as_str()),
            state: s.state.into(),
            progress: s.progress,
            step: s.step,
            total_steps: s.total_steps,
            seed: s.seed,
            num_images: s.num_images,
            width: s.width,
            height: s.height,
            queue_position: s.queue_position.unwrap_or(0),
            eta_secs: s.eta_secs.unwrap_or(-1.0),
            image_count: s.images.len(),
        }
    }
}

/// The progress callback: called with a snapshot after every change of a job (queued, started, each denoising
/// step, each decoded image, final state) and `user_data` as given in the options.
///
/// Threads: one call at a time, in the order of the changes, on the thread that made the change (the pipeline's
/// worker thread for progress and completion; the calling thread inside `sketchx_pipeline_submit_*`,
/// `sketchx_pipeline_cancel` and `sketchx_pipeline_shutdown`/`_free`) or on a thread still delivering earlier
/// changes, which that call then waits for. It must be thread-safe, return quickly, and not throw (C++); it may call
/// `sketchx_pipeline_poll`/`_status`/`_cancel`/`_submit_*` but never `sketchx_pipeline_shutdown` or
/// `sketchx_pipeline_free` (which wait for the worker thread and would deadlock). `info` is valid only during
/// the call.
#[allow(non_camel_case_types)]
pub type sketchx_progress_fn =
    Option<unsafe extern "C" fn(info: *const sketchx_job_info, user_data: *mut c_void)>;

/// How to build a pipeline. Fill it with `sketchx_pipeline_options_init`, then set fields: fields are only ever
/// appended, so code that calls `_init` first keeps compiling and working against newer versions.
/// Strings are borrowed UTF-8 (NULL: the default) and only read during `sketchx_pipeline_new`; names (`device`,
/// `dtype`) match in any ASCII case, surrounding whitespace ignored. Every field is checked by the library
/// (`SKETCHX_INVALID_REQUEST` naming the field).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct sketchx_pipeline_options {
    /// Stable Diffusion 1.5 model: Hugging Face repo id (`owner/name[@revision]`), local diffusers directory or
    /// single checkpoint file (`.safetensors`, `.ckpt`, `.pt` in the original layout; see `model_config`,
    /// `original_config`, `extract_ema`). NULL: `stable-diffusion-v1-5/stable-diffusion-v1-5`.
    pub model: *const c_char,
    /// ControlNet: repo id, local directory or single file in the original layout (`.safetensors`, `.pth`; see
    /// `controlnet_config`). NULL: `lllyasviel/sd-controlnet-scribble`.
    pub controlnet: *const c_char,
    /// `cpu`, `cuda`, `cuda:N` or `metal` (GPUs need a build with the matching feature). NULL: `cpu`.
    pub device: *const c_char,
    /// `f32`, `bf16` or `f16`. NULL: `f32` on the CPU, `f16` on GPUs. On the CPU, `bf16` runs the matrix products
    /// in bf16 (fast with AVX-512 BF16) and everything else in f32.
    pub dtype: *const c_char,
    /// Weights variant to prefer, e.g. `fp16`. NULL: the plain files.
    pub variant: *const c_char,
    /// Directory images are written to (created if missing). NULL: `generated`.
    pub output_dir: *const c_char,
    /// Most jobs waiting at once (at least 1); beyond it, submissions fail with `SKETCHX_QUEUE_FULL`.
    pub queue_capacity: usize,
    /// Age in seconds after which finished jobs' files are deleted by cleanup.
    pub retention_secs: u64,
    /// How often the background sweeper runs cleanup, in seconds; 0: never.
    pub cleanup_interval_secs: u64,
    /// A live preview is computed every this many steps (0: never).
    pub preview_every: usize,
    /// Non-zero: shutdown finishes queued jobs first; 0: shutdown cancels them (the default).
    pub drain_on_shutdown: c_int,
    /// Optional progress callback (NULL: none); see [`sketchx_progress_fn`] for its threads and rules.
    pub progress_callback: sketchx_progress_fn,
    /// Passed unchanged to `progress_callback`; owned by the caller, who must keep it valid until the pipeline
    /// is freed.
    pub user_data: *mut c_void,
    /// Non-zero: decode images in overlapping tiles, as diffusers after `vae.enable_tiling()` (the VAE
    /// decoder's memory stays that of one 512x512 tile for SD1.5, whatever the image size; pixels near the
    /// seams differ from an untiled decode). 0: one piece (the default). A VAE whose config gives no
    /// usable tile size then fails `sketchx_pipeline_new` with `SKETCHX_MODEL_UNSUPPORTED`.
    pub vae_tiling: c_int,
    /// NULL: jobs live in this process (the default). A Redis URL (`redis://host:port`): jobs live in that
    /// Redis's shared queue and this pipeline is one of its workers (and a client of it); see also
    /// `sketchx_pipeline_connect` for a client without a model. Finished jobs expire from Redis after
    /// `retention_secs`.
    pub redis_url: *const c_char,
    /// A tiny VAE (TAESD, diffusers' `AutoencoderTiny`): a local directory or a Hub id such as
    /// `madebyollin/taesd`, loaded beside the model's VAE for requests with `vae = "tiny"` and for live
    /// previews. NULL: none (the default).
    pub tiny_vae: *const c_char,
    /// `lora_count` LoRA adapters fused into the UNet and text encoder at load, each a UTF-8 string
    /// `PATH[:SCALE]`: a local `.safetensors` file or a Hub file `owner/name[@revision]/file.safetensors`, and
    /// an optional scale after the last `:` (default 1, finite, within ±10). Borrowed, only read during
    /// `sketchx_pipeline_new`. NULL with `lora_count` 0: none (the default). A scale out of range is
    /// `SKETCHX_INVALID_REQUEST` naming `loras.scale`; a missing file `SKETCHX_MODEL_NOT_FOUND`; a file that
    /// does not fit the model `SKETCHX_MODEL_MALFORMED`.
    pub loras: *const *const c_char,
    /// The number of strings in `loras`.
    pub lora_count: usize,
    /// `embedding_count` textual inversion embeddings loaded in this order, each a UTF-8 string `PATH[:TOKEN]`:
    /// an A1111 `.pt` / `.safetensors` or a diffusers `learned_embeds` file (or a directory or Hub repository
    /// holding one, or a Hub file `owner/name[@revision]/file`), and the token written in prompts after the last
    /// `:` (default: the file's own; A1111 `.safetensors` files have none). An embedding of n vectors is
    /// used through its token as diffusers' `load_textual_inversion` does (`T` becomes `T T_1 ... T_{n-1}`, in
    /// the prompt and the negative prompt). Borrowed, only read during `sketchx_pipeline_new`. NULL with
    /// `embedding_count` 0: none (the default). A missing file is `SKETCHX_MODEL_NOT_FOUND`; a width other than
    /// the text encoder's, a token already in the vocabulary or an unknown layout `SKETCHX_MODEL_MALFORMED`.
    pub embeddings: *const *const c_char,
    /// The number of strings in `embeddings`.
    pub embedding_count: usize,
    /// For a single-file `model` (a `.safetensors` / `.ckpt` checkpoint in the original layout): a diffusers
    /// folder or Hub id whose configs (and tokenizer) describe it, as diffusers' `from_single_file(config=...)`.
    /// NULL: `original_config`, else SD1.5's configs built into the library (the default).
    pub model_config: *const c_char,
    /// For a single-file `model`: an original LDM `.yaml` (`v1-inference.yaml` or a variant with
    /// `parameterization: v`, ...). NULL: none (the default).
    pub original_config: *const c_char,
    /// Non-zero: take a single-file `model`'s UNet from its EMA weights (`model_ema.*`; a file without them is
    /// `SKETCHX_MODEL_UNSUPPORTED`). 0: its non-EMA weights (the default, as diffusers).
    pub extract_ema: c_int,
    /// For a single-file `controlnet` (`.safetensors` / `.pth` in the original layout): a ControlNet folder or
    /// Hub id whose `config.json` describes it. NULL: derived from the UNet's config (the default).
    pub controlnet_config: *const c_char,
    /// A VAE replacing the model's: a single file (e.g. `vae-ft-mse-840000-ema-pruned.safetensors`), a folder or
    /// a Hub id. NULL: the model's own VAE (the default).
    pub vae: *const c_char,
}

/// One generation request. Fill it with `sketchx_request_init` (the Rust API's defaults), then set fields;
/// fields are only ever appended. Strings are borrowed UTF-8, only read during the submit call.
/// Ranges are checked by the library (`SKETCHX_INVALID_REQUEST` naming the field); names (`scheduler`,
/// `preprocess`) match in any ASCII case, surrounding whitespace ignored.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct sketchx_request {
    /// What the image should show. NULL or empty: the ControlNet works from the sketch alone (guess mode).
    pub prompt: *const c_char,
    /// What to avoid. NULL: the default negative prompt; `""`: none.
    pub negative_prompt: *const c_char,
    /// How freely the image may depart from the sketch, 0..=1 (ControlNet scale = 1.65 - temperature).
    pub temperature: f64,
    /// Non-zero: use `controlnet_scale` (0..=5) instead of the one derived from `temperature`.
    pub has_controlnet_scale: c_int,
    /// Explicit ControlNet conditioning scale (read only when `has_controlnet_scale`).
    pub controlnet_scale: f64,
    /// Classifier-free guidance, 0..=30 (<= 1 turns it off).
    pub guidance_scale: f64,
    /// Images to generate, 1..=8.
    pub num_images: u32,
    /// Denoising steps, 1..=150.
    pub steps: u32,
    /// Non-zero: use `seed`; 0: a random seed (reported in the job's status).
    pub has_seed: c_int,
    /// Seed of the torch-compatible generator (read only when `has_seed`).
    pub seed: u64,
    /// Output width in pixels (multiple of 8, 64..=2048); 0: derived from the sketch.
    pub width: u32,
    /// Output height in pixels (multiple of 8, 64..=2048); 0: derived from the sketch.
    pub height: u32,
    /// `euler_a`, `euler`, `ddim`, `lcm` or `tcd`. NULL: `euler_a`.
    pub scheduler: *const c_char,
    /// `scribble`, `lineart`, `canny` or `none`. NULL: `scribble`.
    pub preprocess: *const c_char,
    /// -1: guess mode exactly when the prompt is empty (the default); 0: off; 1: on.
    pub guess_mode: c_int,
    /// Fraction of the steps after which the ControlNet starts to act, 0..=1.
    pub control_guidance_start: f64,
    /// Fraction of the steps after which it stops, 0..=1, above the start.
    pub control_guidance_end: f64,
    /// `leading`, `linspace` or `trailing` (any case): overrides the model scheduler config's timestep
    /// spacing (`trailing` suits few steps). NULL: the model's.
    pub timestep_spacing: *const c_char,
    /// Stochasticity of the `ddim` and `tcd` steps, 0..=1 (ignored by the other schedulers).
    pub eta: f64,
    /// Which VAE decodes the images: `full` or `tiny` (needs the options' `tiny_vae`). NULL: `full`.
    pub vae: *const c_char,
    /// img2img: an encoded start image (PNG, JPEG, WebP, BMP or GIF) of `start_image_len` bytes, copied during the
    /// submit call; NULL: none. An image that cannot be decoded is `SKETCHX_INVALID_REQUEST` naming
    /// `start_image`.
    pub start_image: *const u8,
    /// The number of bytes at `start_image`.
    pub start_image_len: usize,
    /// img2img: non-zero: the sketch itself (its colours) is the start image; `start_image` must then be NULL.
    pub start_image_from_sketch: c_int,
    /// img2img: how far the start image is noised, 0..=1 (the last `int(steps * strength)` steps run; at least
    /// one must). Read only with a start image.
    pub strength: f64,
    /// `canny` preprocessing: the lower hysteresis threshold, 0..=2040, at most `canny_high_threshold`.
    pub canny_low_threshold: u32,
    /// `canny` preprocessing: the upper threshold, 0..=2040.
    pub canny_high_threshold: u32,
    /// diffusers' `clip_skip`, 0..=12 and at most the text encoder's layers: the prompt is encoded by the hidden
    /// state this many layers before the last (A1111's "clip skip N" is N - 1); 0 (the default): the last
    /// layer. As in diffusers, the negative prompt always uses the last layer.
    pub clip_skip: u32,
}

/// What a cleanup removed.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct sketchx_cleanup_report {
    /// Files deleted.
    pub files_removed: usize,
    /// Bytes freed.
    pub bytes_removed: u64,
    /// Finished jobs forgotten (their ids now give `SKETCHX_UNKNOWN_JOB`).
    pub jobs_forgotten: usize,
}

/// A running job's latest live preview (RGB8 at latent resolution, 1/8 of the image).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct sketchx_preview_info {
    /// Non-zero if a preview exists yet (the other fields are 0 otherwise).
    pub available: c_int,
    /// Denoising step the preview shows.
    pub step: usize,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Bytes of RGB8 pixels (`width * height * 3`), the buffer size needed.
    pub rgb_len: usize,
}

struct UserData(*mut c_void);

impl UserData {
    /// The pointer (a method, so that closures capture the whole `Send + Sync` wrapper, not its field).
    fn get(&self) -> *mut c_void {
        self.0
    }
}
// SAFETY: the caller promises (documented on `user_data` and `sketchx_progress_fn`) that the callback and its
// user data may be used from any thread.
unsafe impl Send for UserData {}
// SAFETY: as above.
unsafe impl Sync for UserData {}

impl sketchx_pipeline_options {
    /// The core's defaults ([`PipelineSettings::DEFAULT`]; NULL strings stand for the core's default names).
    fn defaults() -> Self {
        let d = PipelineSettings::DEFAULT;
        sketchx_pipeline_options {
            model: std::ptr::null(),
            controlnet: std::ptr::null(),
            device: std::ptr::null(),
            dtype: std::ptr::null(),
            variant: std::ptr::null(),
            output_dir: std::ptr::null(),
            queue_capacity: d.queue_capacity,
            retention_secs: settings::DEFAULT_RETENTION_SECS,
            cleanup_interval_secs: settings::DEFAULT_CLEANUP_INTERVAL_SECS.unwrap_or(0),
            preview_every: d.preview_every,
            drain_on_shutdown: c_int::from(d.drain_on_shutdown),
            progress_callback: None,
            user_data: std::ptr::null_mut(),
            vae_tiling: c_int::from(d.vae_tiling),
            redis_url: std::ptr::null(),
            tiny_vae: std::ptr::null(),
            loras: std::ptr::null(),
            lora_count: d.loras.len(),
            embeddings: std::ptr::null(),
            embedding_count: d.embeddings.len(),
            model_config: std::ptr::null(),
            original_config: std::ptr::null(),
            extract_ema: c_int::from(d.extract_ema),
            controlnet_config: std::ptr::null(),
            vae: std::ptr::null(),
        }
    }

    /// Translates to the core's settings (C spellings to Rust types: NULL to `None`, a 0 interval to never,
    /// non-zero to true); nothing is checked here.
    ///
    /// # Safety
    /// The string fields are NULL or NUL-terminated strings; `loras` points to `lora_count` of them, `embeddings`
    /// to `embedding_count`.
    unsafe fn settings(&self) -> Result<PipelineSettings, Failure> {
        let text = |p: *const c_char, name: &'static str| -> Result<Option<String>, Failure> {
            // SAFETY: only called with this struct's string fields, which the caller guarantees.
            Ok(unsafe { opt_str(p, name) }?.map(String::from))
        };
        Ok(PipelineSettings {
            model: text(self.model, "options.model")?,
            controlnet: text(self.controlnet, "options.controlnet")?,
            device: text(self.device, "options.device")?,
            dtype: text(self.dtype, "options.dtype")?,
            variant: text(self.variant, "options.variant")?,
            vae_tiling: self.vae_tiling != 0,
            output_dir: text(self.output_dir, "options.output_dir")?.map(PathBuf::from),
            queue_capacity: self.queue_capacity,
            retention_secs: self.retention_secs as f64,
            cleanup_interval_secs: (self.cleanup_interval_secs != 0)
                .then_some(self.cleanup_interval_secs as f64),
            preview_every: self.preview_every,
            drain_on_shutdown: self.drain_on_shutdown != 0,
            redis_url: text(self.redis_url, "options.redis_url")?,
            tiny_vae: text(self.tiny_vae, "options.tiny_vae")?,
            // SAFETY: the caller guarantees `loras` points to `lora_count` NULL or NUL-terminated strings.
            loras: settings::lora_args(&unsafe {
                c_strings(self.loras, self.lora_count, "options.loras")
            }?),
            // SAFETY: as for `loras`, with `embeddings` and `embedding_count`.
            embeddings: settings::embedding_args(&unsafe {
                c_strings(self.embeddings, self.embedding_count, "options.embeddings")
            }?),
            model_config: text(self.model_config, "options.model_config")?,
            original_config: text(self.original_config, "options.original_config")?,
            extract_ema: self.extract_ema != 0,
            controlnet_config: text(self.controlnet_config, "options.controlnet_config")?,
            vae: text(self.vae, "options.vae")?,
        })
    }

    /// Translates to the core's configuration (parsed and checked by [`PipelineSettings::to_config`]) and adds
    /// the progress callback.
    ///
    /// # Safety
    /// The string fields are NULL or NUL-terminated strings; `loras` points to `lora_count` of them, `embeddings`
    /// to `embedding_count`.
    pub(crate) unsafe fn core_config(&self) -> Result<PipelineConfig, Failure> {
        // SAFETY: the caller guarantees the string fields.
        let mut c = unsafe { self.settings() }?.to_config()?;
        if let Some(cb) = self.progress_callback {
            let user_data = UserData(self.user_data);
            c.on_event = Some(Arc::new(move |s: &JobStatus| {
                let info = sketchx_job_info::from(s);
                // SAFETY: the caller supplied a valid callback and user data usable from any thread.
                unsafe { cb(&info, user_data.get()) }
            }));
        }
        Ok(c)
    }
}

/// The `count` strings of a C array (`loras`, `embeddings`, named `name` in errors); NULL with a count of 0 is
/// empty.
///
/// # Safety
/// `items` is NULL or points to `count` pointers, each NULL or a NUL-terminated string.
unsafe fn c_strings<'a>(
    items: *const *const c_char,
    count: usize,
    name: &'static str,
) -> Result<Vec<&'a str>, Failure> {
    if count == 0 {
        return Ok(Vec::new());
    }
    if items.is_null() {
        return Err(Failure::null(name));
    }
    // SAFETY: non-NULL, and the caller guarantees `count` pointers.
    let items = unsafe { std::slice::from_raw_parts(items, count) };
    items
        .iter()
        .enumerate()
        // SAFETY: each is NULL or a NUL-terminated string (caller's guarantee); the strings are only used
        // while the options are being read.
        .map(|(i, &p)| unsafe { arg_str(p, &format!("{name}[{i}]")) })
        .collect()
}

fn tri_state(field: &'static str, v: c_int) -> Result<Option<bool>, Error> {
    match v {
        -1 => Ok(None),
        0 => Ok(Some(false)),
        1 => Ok(Some(true)),
        _ => Err(Error::invalid(field, format!("{v} is not one of -1, 0, 1"))),
    }
}

impl sketchx_request {
    /// The core's defaults ([`GenerationRequest::DEFAULT`]).
    fn defaults() -> Self {
        let r = GenerationRequest::DEFAULT;
        sketchx_request {
            prompt: std::ptr::null(),
            negative_prompt: std::ptr::null(),
            temperature: r.temperature,
            has_controlnet_scale: c_int::from(r.controlnet_scale.is_some()),
            controlnet_scale: r.controlnet_scale.unwrap_or(r.conditioning_scale()),
            guidance_scale: r.guidance_scale,
            num_images: r.num_images,
            steps: r.steps,
            has_seed: c_int::from(r.seed.is_some()),
            seed: r.seed.unwrap_or(0),
            width: r.width.unwrap_or(0),
            height: r.height.unwrap_or(0),
            scheduler: std::ptr::null(),
            preprocess: std::ptr::null(),
            guess_mode: r.guess_mode.map_or(-1, c_int::from),
            control_guidance_start: r.control_guidance_start,
            control_guidance_end: r.control_guidance_end,
            timestep_spacing: std::ptr::null(),
            eta: r.eta,
            vae: std::ptr::null(),
            start_image: std::ptr::null(),
            start_image_len: 0,
            start_image_from_sketch: c_int::from(r.start_image.is_some()),
            strength: r.strength,
            canny_low_threshold: r.canny_low_threshold,
            canny_high_threshold: r.canny_high_threshold,
            clip_skip: r.clip_skip,
        }
    }

    /// Translates to the core's request (validated later, by the core; a start image is decoded here, by the
    /// core's [`StartImage::decode`]).
    ///
    /// # Safety
    /// The string fields are NULL or NUL-terminated strings; `start_image` is NULL or `start_image_len` bytes.
    pub(crate) unsafe fn core_request(&self) -> Result<GenerationRequest, Failure> {
        let d = GenerationRequest::DEFAULT;
        // SAFETY (all `opt_str` calls): the caller guarantees the string fields.
        let prompt = unsafe { opt_str(self.prompt, "request.prompt") }?;
        let negative_prompt = unsafe { opt_str(self.negative_prompt, "request.negative_prompt") }?;
        let scheduler = unsafe { opt_str(self.scheduler, "request.scheduler") }?;
        let preprocess = unsafe { opt_str(self.preprocess, "request.preprocess") }?;
        let timestep_spacing =
            unsafe { opt_str(self.timestep_spacing, "request.timestep_spacing") }?;
        let vae = unsafe { opt_str(self.vae, "request.vae") }?;
        let start_image = match (
            self.start_image.is_null(),
            self.start_image_from_sketch != 0,
        ) {
            (true, false) => None,
            (true, true) => Some(StartImage::Sketch),
            (false, false) => {
                // SAFETY: non-NULL, and the caller guarantees `start_image_len` readable bytes.
                let bytes = unsafe {
                    arg_bytes(
                        self.start_image,
                        self.start_image_len,
                        "request.start_image",
                    )
                }?;
                Some(StartImage::decode(bytes)?)
            }
            (false, true) => {
                return Err(Error::invalid(
                    "start_image",
                    "both start_image and start_image_from_sketch are set",
                )
                .into())
            }
        };
        Ok(GenerationRequest {
            prompt: prompt.map(String::from),
            negative_prompt: negative_prompt.map(String::from),
            temperature: self.temperature,
            controlnet_scale: (self.has_controlnet_scale != 0).then_some(self.controlnet_scale),
            guidance_scale: self.guidance_scale,
            num_images: self.num_images,
            steps: self.steps,
            seed: (self.has_seed != 0).then_some(self.seed),
            width: (self.width != 0).then_some(self.width),
            height: (self.height != 0).then_some(self.height),
            scheduler: scheduler.map_or(Ok(d.scheduler), str::parse)?,
            preprocess: preprocess.map_or(Ok(d.preprocess), str::parse)?,
            guess_mode: tri_state("guess_mode", self.guess_mode)?,
            control_guidance_start: self.control_guidance_start,
            control_guidance_end: self.control_guidance_end,
            timestep_spacing: timestep_spacing.map(str::parse).transpose()?,
            eta: self.eta,
            vae: vae.map_or(Ok(d.vae), str::parse)?,
            start_image,
            strength: self.strength,
            canny_low_threshold: self.canny_low_threshold,
            canny_high_threshold: self.canny_high_threshold,
            clip_skip: self.clip_skip,
        })
    }
}

/// Fills `options` with the defaults (the core's `PipelineSettings::DEFAULT`: default Hub models, CPU,
/// `generated/`, queue of 64, one-hour retention and sweep, preview every 5 steps, cancel on shutdown, no
/// callback).
///
/// Returns `SKETCHX_NULL_ARGUMENT` if `options` is NULL. Ownership: `options` is the caller's.
///
/// # Safety
/// `options` is NULL or points to writable memory for a `sketchx_pipeline_options`.
#[no_mangle]
pub unsafe extern "C" fn sketchx_pipeline_options_init(
    options: *mut sketchx_pipeline_options,
) -> sketchx_result {
    guard(|| {
        let out = arg_out(options, "options")?;
        let d = sketchx_pipeline_options::defaults();
        // SAFETY: non-NULL and writable (caller's guarantee).
        unsafe { out.write(d) };
        Ok(())
    })
}

/// Fills `request` with the defaults (the core's `GenerationRequest::DEFAULT`: no prompt, default
/// negative prompt, temperature 0.65, guidance 7.5, 1 image, 30 steps, random seed, size from the sketch,
/// `euler_a`, `scribble`, automatic guess mode, ControlNet over all steps, no start image (strength 0.8 when
/// one is set), canny thresholds 100 and 200).
///
/// Returns `SKETCHX_NULL_ARGUMENT` if `request` is NULL. Ownership: `request` is the caller's.
///
/// # Safety
/// `request` is NULL or points to writable memory for a `sketchx_request`.
#[no_mangle]
pub unsafe extern "C" fn sketchx_request_init(request: *mut sketchx_request) -> sketchx_result {
    guard(|| {
        let out = arg_out(request, "request")?;
        // SAFETY: non-NULL and writable (caller's guarantee).
        unsafe { out.write(sketchx_request::defaults()) };
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_defaults_round_trip_to_the_core_defaults() {
        let r = sketchx_request::defaults();
        // SAFETY: the default's strings are NULL.
        let g = unsafe { r.core_request() }.unwrap();
        assert_eq!(g, GenerationRequest::default());
    }

    #[test]
    fn options_defaults_round_trip_to_the_core_defaults() {
        let o = sketchx_pipeline_options::defaults();
        // SAFETY: the default's strings are NULL.
        let c = unsafe { o.core_config() }.unwrap();
        let d = PipelineConfig::default_models().unwrap();
        assert_eq!(c.output_dir, d.output_dir);
        assert_eq!(c.queue_capacity, d.queue_capacity);
        assert_eq!(c.retention, d.retention);
        assert_eq!(c.cleanup_interval, d.cleanup_interval);
        assert_eq!(c.preview_every, d.preview_every);
        assert_eq!(c.shutdown, d.shutdown);
        assert_eq!(c.engine.dtype, candle_core::DType::F32);
        assert_eq!(o.vae_tiling, 0);
        assert!(!c.engine.vae_tiling);
        assert!(c.on_event.is_none());
    }

    #[test]
    fn options_defaults_are_the_core_settings_defaults() {
        let o = sketchx_pipeline_options::defaults();
        // SAFETY: the default's strings are NULL.
        let s = unsafe { o.settings() }.unwrap();
        assert_eq!(s, PipelineSettings::DEFAULT);
    }

    #[test]
    fn options_translate_to_settings_and_the_core_names_bad_fields() {
        let mut o = sketchx_pipeline_options::defaults();
        o.device = c" CPU ".as_ptr();
        o.dtype = c"BF16".as_ptr();
        o.cleanup_interval_secs = 0;
        o.drain_on_shutdown = 1;
        // SAFETY: static strings.
        let s = unsafe { o.settings() }.unwrap();
        assert_eq!(s.device.as_deref(), Some(" CPU "));
        assert_eq!(s.cleanup_interval_secs, None);
        assert!(s.drain_on_shutdown);
        // SAFETY: static strings.
        let c = unsafe { o.core_config() }.unwrap();
        assert_eq!(c.engine.dtype, candle_core::DType::BF16);
        assert_eq!(c.cleanup_interval, None);
        type Spoil = fn(&mut sketchx_pipeline_options);
        let cases: [(Spoil, &str); 3] = [
            (|o| o.queue_capacity = 0, "queue_capacity"),
            (|o| o.device = c"tpu".as_ptr(), "device"),
            (|o| o.dtype = c"f64x".as_ptr(), "dtype"),
        ];
        for (spoil, field) in cases {
            let mut bad = sketchx_pipeline_options::defaults();
            spoil(&mut bad);
            // SAFETY: static strings.
            let e = unsafe { bad.core_config() }.unwrap_err();
            assert_eq!(e.code, sketchx_result::SKETCHX_INVALID_REQUEST, "{field}");
            assert_eq!(e.field, Some(field));
        }
    }

    #[test]
    fn request_names_ignore_case() {
        let mut r = sketchx_request::defaults();
        r.scheduler = c" Euler ".as_ptr();
        r.preprocess = c"NONE".as_ptr();
        // SAFETY: static strings.
        let g = unsafe { r.core_request() }.unwrap();
        assert_eq!(g.scheduler.as_str(), "euler");
        assert_eq!(g.preprocess.as_str(), "none");
    }

    #[test]
    fn vae_tiling_translates() {
        let mut o = sketchx_pipeline_options::defaults();
        for (v, want) in [(1, true), (-3, true), (0, false)] {
            o.vae_tiling = v;
            // SAFETY: the default's strings are NULL.
            let c = unsafe { o.core_config() }.unwrap();
            assert_eq!(c.engine.vae_tiling, want, "vae_tiling = {v}");
        }
    }

    #[test]
    fn fields_translate() {
        let mut r = sketchx_request::defaults();
        r.prompt = c"a house".as_ptr();
        r.scheduler = c"ddim".as_ptr();
        r.has_seed = 1;
        r.seed = 7;
        r.width = 64;
        r.guess_mode = 1;
        // SAFETY: static strings.
        let g = unsafe { r.core_request() }.unwrap();
        assert_eq!(g.prompt.as_deref(), Some("a house"));
        assert_eq!(g.scheduler.as_str(), "ddim");
        assert_eq!((g.seed, g.width, g.height), (Some(7), Some(64), None));
        assert_eq!(g.guess_mode, Some(true));
        r.guess_mode = 2;
        // SAFETY: static strings.
        let e = unsafe { r.core_request() }.unwrap_err();
        assert_eq!(e.field, Some("guess_mode"));
        r.guess_mode = -1;
        r.scheduler = c"plms".as_ptr();
        // SAFETY: static strings.
        let e = unsafe { r.core_request() }.unwrap_err();
        assert_eq!(e.code, sketchx_result::SKETCHX_INVALID_REQUEST);
    }

    #[test]
    fn few_step_fields_translate() {
        let mut r = sketchx_request::defaults();
        r.timestep_spacing = c"Trailing".as_ptr();
        r.eta = 0.25;
        r.vae = c"tiny".as_ptr();
        // SAFETY: static strings.
        let g = unsafe { r.core_request() }.unwrap();
        assert_eq!(g.timestep_spacing.map(|s| s.as_str()), Some("trailing"));
        assert_eq!((g.eta, g.vae.as_str()), (0.25, "tiny"));
        r.vae = c"huge".as_ptr();
        // SAFETY: static strings.
        assert_eq!(unsafe { r.core_request() }.unwrap_err().field, Some("vae"));

        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");
        let kohya =
            std::ffi::CString::new(format!("{fixtures}/lora/kohya.safetensors:0.6")).unwrap();
        let taesd = std::ffi::CString::new(format!("{fixtures}/tiny-taesd")).unwrap();
        let loras = [kohya.as_ptr()];
        let mut o = sketchx_pipeline_options::defaults();
        o.loras = loras.as_ptr();
        o.lora_count = 1;
        o.tiny_vae = taesd.as_ptr();
        // SAFETY: live strings.
        let c = unsafe { o.core_config() }.unwrap();
        assert_eq!(c.engine.loras.len(), 1);
        assert_eq!(c.engine.loras[0].scale, 0.6);
        assert!(c.engine.tiny_vae.is_some());
        o.loras = std::ptr::null();
        // SAFETY: NULL with a count is refused before any read.
        let e = unsafe { o.core_config() }.unwrap_err();
        assert_eq!(e.code, sketchx_result::SKETCHX_NULL_ARGUMENT);
        let bad = std::ffi::CString::new(format!("{fixtures}/lora/kohya.safetensors:99")).unwrap();
        let loras = [bad.as_ptr()];
        o.loras = loras.as_ptr();
        // SAFETY: live strings.
        let e = unsafe { o.core_config() }.unwrap_err();
        assert_eq!(e.field, Some("loras.scale"));

        // Single files: the model, its config folder or yaml, EMA, the ControlNet's config, a VAE override.
        let model = std::ffi::CString::new(format!(
            "{fixtures}/formats/single_file/tiny-sd.safetensors"
        ))
        .unwrap();
        let config = std::ffi::CString::new(format!("{fixtures}/tiny-sd")).unwrap();
        let yaml =
            std::ffi::CString::new(format!("{fixtures}/formats/single_file/tiny-sd.yaml")).unwrap();
        let cn = std::ffi::CString::new(format!(
            "{fixtures}/formats/single_file/tiny-controlnet.pth"
        ))
        .unwrap();
        let cn_config = std::ffi::CString::new(format!("{fixtures}/tiny-controlnet")).unwrap();
        let vae = std::ffi::CString::new(format!(
            "{fixtures}/formats/single_file/tiny-vae-alt.safetensors"
        ))
        .unwrap();
        let mut o = sketchx_pipeline_options::defaults();
        assert!(o.model_config.is_null() && o.original_config.is_null() && o.vae.is_null());
        assert_eq!(o.extract_ema, 0);
        o.model = model.as_ptr();
        o.model_config = config.as_ptr();
        o.extract_ema = 1;
        o.controlnet = cn.as_ptr();
        o.controlnet_config = cn_config.as_ptr();
        o.vae = vae.as_ptr();
        // SAFETY: live strings.
        let c = unsafe { o.core_config() }.unwrap();
        assert!(matches!(
            c.engine.model,
            sketchx_core::models::loader::ModelSource::File(_)
        ));
        assert!(c.engine.single_file.config.is_some() && c.engine.single_file.extract_ema);
        assert!(c.engine.controlnet_config.is_some() && c.engine.vae.is_some());
        o.model_config = std::ptr::null();
        o.original_config = yaml.as_ptr();
        // SAFETY: live strings.
        let c = unsafe { o.core_config() }.unwrap();
        assert!(c.engine.single_file.original_config.is_some());
        o.original_config = c"/no/such.yaml".as_ptr();
        // SAFETY: static and live strings.
        let e = unsafe { o.core_config() }.unwrap_err();
        assert_eq!(e.code, sketchx_result::SKETCHX_MODEL_NOT_FOUND);
    }

    #[test]
    fn embeddings_and_clip_skip_translate() {
        let mut r = sketchx_request::defaults();
        assert_eq!(r.clip_skip, 0);
        r.clip_skip = 2;
        // SAFETY: NULL strings.
        assert_eq!(unsafe { r.core_request() }.unwrap().clip_skip, 2);

        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/formats");
        let neg = std::ffi::CString::new(format!(
            "{fixtures}/textual_inversion/tiny-neg.safetensors:tinyneg"
        ))
        .unwrap();
        let cat = std::ffi::CString::new(format!(
            "{fixtures}/textual_inversion/learned_embeds.safetensors"
        ))
        .unwrap();
        let embeddings = [neg.as_ptr(), cat.as_ptr()];
        let mut o = sketchx_pipeline_options::defaults();
        assert_eq!(o.embedding_count, 0);
        o.embeddings = embeddings.as_ptr();
        o.embedding_count = 2;
        // SAFETY: live strings.
        let c = unsafe { o.core_config() }.unwrap();
        let tokens: Vec<Option<&str>> = c
            .engine
            .embeddings
            .iter()
            .map(|e| e.token.as_deref())
            .collect();
        assert_eq!(tokens, [Some("tinyneg"), None]);
        let missing = c"/nonexistent/embedding.pt:tok";
        let embeddings = [missing.as_ptr()];
        o.embeddings = embeddings.as_ptr();
        o.embedding_count = 1;
        // SAFETY: live strings.
        let e = unsafe { o.core_config() }.unwrap_err();
        assert_eq!(e.code, sketchx_result::SKETCHX_MODEL_NOT_FOUND);
        o.embeddings = std::ptr::null();
        // SAFETY: NULL with a count is refused before any read.
        let e = unsafe { o.core_config() }.unwrap_err();
        assert_eq!(e.code, sketchx_result::SKETCHX_NULL_ARGUMENT);
    }

    #[test]
    fn job_ids_are_nul_terminated() {
        let id = sketchx_job_id::from_str("0123456789abcdef0123456789abcdef");
        // SAFETY: `id.id` is NUL-terminated by construction.
        let s = unsafe { std::ffi::CStr::from_ptr(id.id.as_ptr()) };
        assert_eq!(s.to_str().unwrap(), "0123456789abcdef0123456789abcdef");
    }
}
