//! The README's main job: turn a sketch into images.
//!
//! ```text
//! cargo run --release --example generate -- --sketch examples/sketches/car.png --prompt "a red sports car"
//! ```
//!
//! Models are downloaded from the Hugging Face Hub on first use (progress bars on stderr) into the standard HF
//! cache and reused offline afterwards; `--model` / `--controlnet` also take local diffusers-layout directories
//! and single files in the original layout (an A1111/civitai `.safetensors` or `.ckpt` checkpoint, a
//! `control_v11p_sd15_scribble.pth`), which need no Hub access at all; `--vae PATH` swaps in another VAE.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use sketchx::engine::Engine;
use sketchx::names::{
    DEFAULT_CONTROLNET, DEFAULT_DEVICE, DEFAULT_MODEL, DEVICE_NAMES, DTYPE_NAMES,
};
use sketchx::output::{image_file_name, write_file_atomic, write_png_atomic, PngSettings};
use sketchx::request::{
    GenerationRequest, StartImage, VaeKind, CANNY_THRESHOLD_RANGE, CLIP_SKIP_RANGE, ETA_RANGE,
    GUIDANCE_RANGE, NUM_IMAGES_RANGE, STEPS_RANGE, STRENGTH_RANGE, TEMPERATURE_RANGE,
};
use sketchx::sampling::schedulers::{SchedulerKind, TimestepSpacing};
use sketchx::settings::{
    embedding_args, lora_args, PipelineSettings, VaeArg, DEFAULT_OUTPUT_DIR, DEFAULT_QUEUE_CAPACITY,
};
use sketchx::sketch::{Preprocess, Sketch};
use sketchx::JobId;

/// The request's defaults; every default, range and name below is the core's.
const D: GenerationRequest = GenerationRequest::DEFAULT;

fn span<T: std::fmt::Display>(r: &std::ops::RangeInclusive<T>) -> String {
    format!("{}..={}", r.start(), r.end())
}

/// Sketch in, images out.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The sketch image (PNG, JPEG, WebP, BMP or GIF; dark strokes on a light background or the reverse).
    #[arg(long)]
    sketch: PathBuf,
    /// What the image should show; empty: the ControlNet works from the sketch alone (guess mode).
    #[arg(long)]
    prompt: Option<String>,
    /// What to avoid (default: the original service's "lowres, bad anatomy, ..."; "" for none).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// How freely the image may depart from the sketch (ControlNet scale = 1.65 - temperature).
    #[arg(long, default_value_t = D.temperature, help = format!(
        "How freely the image may depart from the sketch, {} (ControlNet scale = 1.65 - temperature)",
        span(&TEMPERATURE_RANGE)))]
    temperature: f64,
    /// Classifier-free guidance (<= 1 turns it off).
    #[arg(long, default_value_t = D.guidance_scale, help = format!(
        "Classifier-free guidance, {} (<= 1 turns it off)", span(&GUIDANCE_RANGE)))]
    guidance_scale: f64,
    /// Images to generate.
    #[arg(long, default_value_t = D.num_images, help = format!("Images to generate, {}", span(&NUM_IMAGES_RANGE)))]
    num_images: u32,
    /// Denoising steps.
    #[arg(long, default_value_t = D.steps, help = format!("Denoising steps, {}", span(&STEPS_RANGE)))]
    steps: u32,
    /// Seed (torch-compatible: the same seed gives diffusers' images); random when absent.
    #[arg(long)]
    seed: Option<u64>,
    /// Output width (multiple of 8); default: from the sketch (short side 512).
    #[arg(long)]
    width: Option<u32>,
    /// Output height (multiple of 8); default: from the sketch.
    #[arg(long)]
    height: Option<u32>,
    /// The sampler.
    #[arg(long, default_value_t = D.scheduler, help = format!(
        "Sampler: {} (any case)", SchedulerKind::names().join(", ")))]
    scheduler: SchedulerKind,
    /// Timestep spacing override; default: the model scheduler config's.
    #[arg(long, help = format!(
        "Timestep spacing: {} (default: the model's scheduler config; trailing suits few steps)",
        TimestepSpacing::names().join(", ")))]
    timestep_spacing: Option<TimestepSpacing>,
    /// Stochasticity of DDIM and TCD steps.
    #[arg(long, default_value_t = D.eta, help = format!(
        "Stochasticity of the ddim and tcd steps, {}", span(&ETA_RANGE)))]
    eta: f64,
    /// Which VAE decodes the images, or a VAE replacing the model's.
    #[arg(long, default_value_t = VaeArg::Decoder(D.vae), value_name = "full|tiny|PATH", help = format!(
        "Which VAE decodes the images: {} (tiny needs --tiny-vae); anything else is a VAE replacing the model's: \
         a single file (e.g. vae-ft-mse-840000-ema-pruned.safetensors), a folder or a Hub id (./tiny for a folder \
         named tiny)", VaeKind::names().join(", ")))]
    vae: VaeArg,
    /// diffusers' clip_skip: encode the prompt with the hidden state this many layers before the last.
    #[arg(long, default_value_t = D.clip_skip, help = format!(
        "diffusers' clip_skip, {}: the prompt is encoded by the hidden state this many layers before the last \
         (A1111's \"clip skip N\" is N - 1; the negative prompt always uses the last layer, as in diffusers)",
        span(&CLIP_SKIP_RANGE)))]
    clip_skip: u32,
    /// Sketch preprocessing.
    #[arg(long, default_value_t = D.preprocess, help = format!(
        "Sketch preprocessing: {} (scribble: threshold, polarity; lineart: white lines on black; canny: OpenCV's \
         edges; any case)", Preprocess::names().join(", ")))]
    preprocess: Preprocess,
    /// Canny's lower threshold.
    #[arg(long, default_value_t = D.canny_low_threshold, help = format!(
        "Lower threshold of --preprocess canny, {}, at most the upper one", span(&CANNY_THRESHOLD_RANGE)))]
    canny_low_threshold: u32,
    /// Canny's upper threshold.
    #[arg(long, default_value_t = D.canny_high_threshold, help = format!(
        "Upper threshold of --preprocess canny, {}", span(&CANNY_THRESHOLD_RANGE)))]
    canny_high_threshold: u32,
    /// img2img: start from this image (or from the sketch's own colours with `sketch`) instead of pure noise.
    #[arg(long, value_name = "PATH|sketch")]
    start_image: Option<String>,
    /// img2img: how far the start image is noised.
    #[arg(long, default_value_t = D.strength, help = format!(
        "With --start-image: how far the start image is noised, {} (the last int(steps * strength) steps run)",
        span(&STRENGTH_RANGE)))]
    strength: f64,
    /// Stable Diffusion 1.5 model: Hub repo id, local diffusers directory, or single checkpoint file
    /// (.safetensors / .ckpt / .pt in the original layout).
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    /// For a single-file --model: a diffusers folder or Hub id whose configs (and tokenizer) describe it; default:
    /// --original-config, else SD1.5's configs built into sketchx.
    #[arg(long, value_name = "DIR|HUB_ID")]
    model_config: Option<String>,
    /// For a single-file --model: an original LDM .yaml (v1-inference.yaml or a variant).
    #[arg(long, value_name = "FILE.yaml")]
    original_config: Option<String>,
    /// For a single-file --model: take the UNet's EMA weights (model_ema.*) instead of its non-EMA ones.
    #[arg(long)]
    extract_ema: bool,
    /// ControlNet: Hub repo id, local directory, or single file in the original layout (.safetensors / .pth).
    #[arg(long, default_value = DEFAULT_CONTROLNET)]
    controlnet: String,
    /// For a single-file --controlnet: a ControlNet folder or Hub id whose config.json describes it; default:
    /// derived from the UNet's config.
    #[arg(long, value_name = "DIR|HUB_ID")]
    controlnet_config: Option<String>,
    /// Output directory (created if missing).
    #[arg(long, default_value = DEFAULT_OUTPUT_DIR)]
    out: PathBuf,
    /// The device (GPU devices need the `cuda` / `metal` cargo feature).
    #[arg(long, default_value = DEFAULT_DEVICE, help = format!(
        "{} (GPU devices need the `cuda` / `metal` cargo feature)", DEVICE_NAMES.join(", ")))]
    device: String,
    /// The precision.
    #[arg(long, help = format!(
        "{}. Default: f32 on the CPU, f16 on GPUs. On the CPU, bf16 runs the matrix products in bf16 \
         (fast with AVX-512 BF16) and everything else in f32", DTYPE_NAMES.join(", ")))]
    dtype: Option<String>,
    /// A LoRA fused at load: a local .safetensors file or a Hub file owner/name/file.safetensors, with an optional
    /// scale after the last ':' (default 1). Repeatable.
    #[arg(long = "lora", value_name = "PATH[:SCALE]")]
    loras: Vec<String>,
    /// A textual inversion embedding (A1111 .pt / .safetensors, diffusers learned_embeds; a local file or
    /// directory, a Hub file owner/name/file or repo owner/name) and the token written in prompts after the last
    /// ':' (default: the file's own; A1111 .safetensors files have none). Repeatable, loaded in order.
    #[arg(long = "embedding", value_name = "PATH[:TOKEN]")]
    embeddings: Vec<String>,
    /// A tiny VAE (TAESD: local directory or Hub id such as madebyollin/taesd) for --vae tiny.
    #[arg(long, value_name = "DIR|HUB_ID")]
    tiny_vae: Option<String>,
    /// Decode in overlapping tiles (diffusers' `vae.enable_tiling()`): far less memory for large images.
    #[arg(long)]
    vae_tiling: bool,
    /// Submit to the job queue in this Redis (redis://host:port) instead of loading a model: the workers of that
    /// queue (`examples/worker`) run the job; its PNGs are fetched from Redis into --out. Model flags are unused.
    #[arg(long)]
    redis: Option<String>,
    /// Key prefix of the queue in Redis (with --redis).
    #[arg(long, default_value = sketchx::store::redis::DEFAULT_PREFIX)]
    redis_prefix: String,
}

fn run(args: Args) -> sketchx::Result<()> {
    let request = GenerationRequest {
        prompt: args.prompt,
        negative_prompt: args.negative_prompt,
        temperature: args.temperature,
        guidance_scale: args.guidance_scale,
        num_images: args.num_images,
        steps: args.steps,
        seed: args.seed,
        width: args.width,
        height: args.height,
        scheduler: args.scheduler,
        preprocess: args.preprocess,
        timestep_spacing: args.timestep_spacing,
        eta: args.eta,
        vae: match &args.vae {
            VaeArg::Decoder(kind) => *kind,
            VaeArg::Override(_) => VaeKind::Full,
        },
        canny_low_threshold: args.canny_low_threshold,
        canny_high_threshold: args.canny_high_threshold,
        start_image: args
            .start_image
            .as_deref()
            .map(StartImage::from_arg)
            .transpose()?,
        strength: args.strength,
        clip_skip: args.clip_skip,
        ..GenerationRequest::DEFAULT
    };
    request.validate()?;
    let sketch = Sketch::open(&args.sketch)?;
    if let Some(url) = &args.redis {
        return run_remote(url, &args.redis_prefix, &args.out, request, sketch);
    }
    // The engine's part of the core's pipeline settings: one conversion, one set of checks.
    let settings = PipelineSettings {
        model: Some(args.model.clone()),
        controlnet: Some(args.controlnet.clone()),
        device: Some(args.device),
        dtype: args.dtype,
        vae_tiling: args.vae_tiling,
        loras: lora_args(&args.loras),
        tiny_vae: args.tiny_vae,
        embeddings: embedding_args(&args.embeddings),
        model_config: args.model_config,
        original_config: args.original_config,
        extract_ema: args.extract_ema,
        controlnet_config: args.controlnet_config,
        vae: match args.vae {
            VaeArg::Override(path) => Some(path),
            VaeArg::Decoder(_) => None,
        },
        ..PipelineSettings::DEFAULT
    };
    let config = settings.to_config()?.engine;
    eprintln!("loading {} + {} ...", args.model, args.controlnet);
    let t0 = Instant::now();
    let engine = Engine::load(&config)?;
    eprintln!("models loaded in {:.1}s", t0.elapsed().as_secs_f64());

    let (w, h) = engine.output_size(&request, &sketch)?;
    let bar = ProgressBar::new(u64::from(request.steps) + u64::from(request.num_images));
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>10} [{bar:40}] {pos}/{len} {elapsed_precise} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(format!("{w}x{h}"));
    let t1 = Instant::now();
    let result = engine.generate(&request, &sketch, &mut |s| {
        // img2img runs fewer steps than asked.
        bar.set_length((s.total_steps + s.num_images) as u64);
        bar.set_position((s.step + s.decoded) as u64);
        true
    })?;
    bar.finish_and_clear();
    eprintln!(
        "generated {} image(s) of {}x{} in {:.1}s (seed {})",
        result.images.len(),
        result.width,
        result.height,
        t1.elapsed().as_secs_f64(),
        result.seed
    );
    std::fs::create_dir_all(&args.out).map_err(|e| sketchx::Error::io(&args.out, e))?;
    // Named like the pipeline's jobs (`<job_id>_<i>.png`), so the same retention rules apply to them.
    let job = JobId::random();
    for (i, rgb) in result.images.iter().enumerate() {
        let path = args.out.join(image_file_name(job.as_str(), i));
        write_png_atomic(
            &path,
            result.width,
            result.height,
            rgb,
            &PngSettings::default(),
        )?;
        println!("{}", path.display());
    }
    Ok(())
}

/// `--redis`: submit to the shared queue, follow the job with the progress bar, write its PNGs into `--out`.
fn run_remote(
    url: &str,
    prefix: &str,
    out: &std::path::Path,
    request: GenerationRequest,
    sketch: Sketch,
) -> sketchx::Result<()> {
    let mut config = sketchx::RedisConfig::new(url);
    config.prefix = prefix.to_string();
    let pipe = sketchx::Pipeline::connect_with(config, DEFAULT_QUEUE_CAPACITY)?;
    let id = pipe.submit(request.clone(), sketch)?;
    eprintln!("submitted job {id}");
    let bar = ProgressBar::new(100);
    bar.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}% {elapsed_precise} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let status = loop {
        // Short waits, so the bar follows the job's steps as the worker reports them.
        match pipe.wait(&id, Some(std::time::Duration::from_millis(200))) {
            Ok(st) => break st,
            Err(sketchx::Error::Timeout(_)) => {
                let st = pipe.poll(&id)?;
                bar.set_message(st.state.to_string());
                bar.set_position(st.progress as u64);
            }
            Err(e) => return Err(e),
        }
    };
    bar.finish_and_clear();
    if status.state != sketchx::JobState::Completed {
        return Err(sketchx::Error::JobFailed(format!(
            "job {id} ended {}: {}",
            status.state, status.message
        )));
    }
    eprintln!("job {id} completed (seed {})", status.seed);
    std::fs::create_dir_all(out).map_err(|e| sketchx::Error::io(out, e))?;
    for (i, png) in pipe.images(&id)?.iter().enumerate() {
        let path = out.join(image_file_name(id.as_str(), i));
        write_file_atomic(&path, png)?;
        println!("{}", path.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
