//! The README's main job: turn a sketch into images.
//!
//! ```text
//! cargo run --release --example generate -- --sketch examples/sketches/car.png --prompt "a red sports car"
//! ```
//!
//! Models are downloaded from the Hugging Face Hub on first use (progress bars on stderr) into the standard HF
//! cache and reused offline afterwards; `--model` / `--controlnet` also take local diffusers-layout directories.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use sketchx::engine::{
    device_from_name, dtype_from_name, Engine, EngineConfig, DEFAULT_CONTROLNET, DEFAULT_MODEL,
};
use sketchx::output::{image_file_name, write_file_atomic, write_png_atomic, PngSettings};
use sketchx::request::GenerationRequest;
use sketchx::sketch::Sketch;
use sketchx::JobId;

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
    /// How freely the image may depart from the sketch, 0..=1 (ControlNet scale = 1.65 - temperature).
    #[arg(long, default_value_t = 0.65)]
    temperature: f64,
    /// Classifier-free guidance, 0..=30 (<= 1 turns it off).
    #[arg(long, default_value_t = 7.5)]
    guidance_scale: f64,
    /// Images to generate, 1..=8.
    #[arg(long, default_value_t = 1)]
    num_images: u32,
    /// Denoising steps, 1..=150.
    #[arg(long, default_value_t = 30)]
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
    /// Sampler: euler_a, euler or ddim.
    #[arg(long, default_value = "euler_a")]
    scheduler: String,
    /// Sketch preprocessing: scribble (threshold, polarity) or none.
    #[arg(long, default_value = "scribble")]
    preprocess: String,
    /// Stable Diffusion 1.5 model: Hub repo id or local directory.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    /// ControlNet: Hub repo id or local directory.
    #[arg(long, default_value = DEFAULT_CONTROLNET)]
    controlnet: String,
    /// Output directory (created if missing).
    #[arg(long, default_value = "generated")]
    out: PathBuf,
    /// cpu, cuda, cuda:N or metal (GPU devices need the `cuda` / `metal` cargo feature).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, bf16 or f16. Default: f32 on the CPU, f16 on GPUs. On the CPU, bf16 runs the matrix products in bf16
    /// (fast with AVX-512 BF16) and everything else in f32.
    #[arg(long)]
    dtype: Option<String>,
    /// Decode in overlapping tiles (diffusers' `vae.enable_tiling()`): far less memory for large images.
    #[arg(long)]
    vae_tiling: bool,
    /// Submit to the job queue in this Redis (redis://host:port) instead of loading a model: the workers of that
    /// queue (`examples/worker`) run the job; its PNGs are fetched from Redis into --out. Model flags are unused.
    #[arg(long)]
    redis: Option<String>,
    /// Key prefix of the queue in Redis (with --redis).
    #[arg(long, default_value = "sketchx")]
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
        scheduler: args.scheduler.parse()?,
        preprocess: args.preprocess.parse()?,
        ..Default::default()
    };
    request.validate()?;
    let sketch = Sketch::open(&args.sketch)?;
    if let Some(url) = &args.redis {
        return run_remote(url, &args.redis_prefix, &args.out, request, sketch);
    }
    let mut config = EngineConfig::new(&args.model, &args.controlnet)?;
    config.device = device_from_name(&args.device)?;
    config.dtype = dtype_from_name(args.dtype.as_deref(), &config.device)?;
    config.vae_tiling = args.vae_tiling;
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
    let pipe = sketchx::Pipeline::connect_with(config, 64)?;
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
