//! Times one VAE decode and reports the process's peak memory: sketchx's side of `tools/bench_vae_tiling.py`,
//! which runs it next to diffusers (each side in its own process, so that VmHWM is that side's own).
//!
//! ```text
//! cargo run --release --example vae_decode -- --vae target/full-size/sd15/vae --size 1024 [--vae-tiling]
//! ```
//!
//! Loads only the VAE from a diffusers-layout `vae/` directory, draws `(1, C, size/8, size/8)` latents with the
//! torch-compatible generator (`torch.randn(shape, generator=torch.Generator().manual_seed(seed))`, so diffusers
//! decodes the same latents), decodes them `--runs` times and prints one JSON line: seconds per run, VmRSS after
//! loading, VmHWM (peak) at the end, and the image's shape. `--save FILE` writes the last image as raw
//! little-endian f32 (NCHW) for comparison.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use candle_core::Device;
use clap::Parser;
use sketchx::models::loader::{weights, ModelSource, Resolver};
use sketchx::models::vae::Vae;
use sketchx::precision::Precision;
use sketchx::sampling::rng::TorchRng;

/// One timed VAE decode with peak memory.
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    /// A diffusers-layout VAE directory (config.json + weights).
    #[arg(long)]
    vae: PathBuf,
    /// Image side in pixels (the latents are size / scale factor).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Decode in tiles, as diffusers after `vae.enable_tiling()`.
    #[arg(long)]
    vae_tiling: bool,
    /// Timed decodes (no warm-up: the first decode is what a job pays).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Seed of the latents.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the last image here as raw little-endian f32.
    #[arg(long)]
    save: Option<PathBuf>,
}

/// A `/proc/self/status` field in MiB (0 where unavailable).
fn vm_mib(key: &str) -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

fn run(args: Args) -> sketchx::Result<()> {
    let res = Resolver::new(ModelSource::Local(args.vae.clone()))?;
    let config = res.config("config.json")?;
    let vae = Vae::load(
        weights(&res.weights("", None)?, Precision::F32, &Device::Cpu)?,
        &config,
    )?;
    if args.vae_tiling {
        vae.tiling()?; // a VAE without a usable tile size is an error, not an untiled decode
    }
    let rss_loaded = vm_mib("VmRSS:");
    let l = args.size / vae.scale_factor;
    let latents = TorchRng::new(args.seed).randn(&[1, vae.latent_channels, l, l], &Device::Cpu)?;
    let mut seconds = Vec::with_capacity(args.runs);
    let mut image = None;
    for _ in 0..args.runs.max(1) {
        drop(image.take()); // the previous image is freed before the next decode, as in a job
        let t = Instant::now();
        let img = if args.vae_tiling {
            vae.decode_tiled(&latents)?
        } else {
            vae.decode(&latents)?
        };
        seconds.push(t.elapsed().as_secs_f64());
        image = Some(img);
    }
    let image = image.expect("at least one run");
    if let Some(path) = &args.save {
        let v = image.flatten_all()?.to_vec1::<f32>()?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        std::fs::write(path, bytes).map_err(|e| sketchx::Error::io(path, e))?;
    }
    let tiles = vae.tiling().ok().map(|t| {
        serde_json::json!({"latent_size": t.latent_size, "latent_stride": t.latent_stride,
                           "blend_extent": t.blend_extent, "tiled": t.applies_to(l, l)})
    });
    println!(
        "{}",
        serde_json::json!({
            "side": "sketchx", "vae_tiling": args.vae_tiling, "size": args.size, "seconds": seconds,
            "rss_after_load_mib": rss_loaded, "peak_rss_mib": vm_mib("VmHWM:"),
            "shape": image.dims(), "tiling": tiles,
        })
    );
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
