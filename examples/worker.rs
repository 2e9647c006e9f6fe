//! A worker process of a shared Redis job queue: loads the models once and runs queued jobs until SIGTERM (or
//! Ctrl-C), then finishes or hands back its running job and exits 0.
//!
//! ```text
//! cargo run --release --example worker -- --redis redis://127.0.0.1:6379 --model DIR --controlnet DIR --out DIR
//! cargo run --release --example generate -- --redis redis://127.0.0.1:6379 --sketch car.png --out generated
//! ```
//!
//! Run as many as there are machines (or GPUs); clients (`generate --redis`, the REST server with `--redis`,
//! `Pipeline::connect`) submit to the same queue. A worker killed outright loses nothing but time: its job is
//! delivered to another worker once its heartbeats stop (`--heartbeat-timeout-secs`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use sketchx::names::{
    DEFAULT_CONTROLNET, DEFAULT_DEVICE, DEFAULT_MODEL, DEVICE_NAMES, DTYPE_NAMES,
};
use sketchx::settings::{
    embedding_args, lora_args, PipelineSettings, DEFAULT_OUTPUT_DIR, DEFAULT_RETENTION_SECS,
};
use sketchx::store::redis::{
    DEFAULT_HEARTBEAT_SECS, DEFAULT_HEARTBEAT_TIMEOUT_SECS, DEFAULT_MAX_DELIVERIES, DEFAULT_PREFIX,
};
use sketchx::{Pipeline, RedisConfig, StoreConfig};

/// Serve the sketchx job queue in Redis.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The Redis server: redis://[user:password@]host:port[/db].
    #[arg(long)]
    redis: String,
    /// Stable Diffusion 1.5 model: Hub repo id or local directory.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    /// ControlNet: Hub repo id or local directory.
    #[arg(long, default_value = DEFAULT_CONTROLNET)]
    controlnet: String,
    /// Where this worker also writes the images (created if missing); clients read them from Redis.
    #[arg(long, default_value = DEFAULT_OUTPUT_DIR)]
    out: PathBuf,
    /// The device.
    #[arg(long, default_value = DEFAULT_DEVICE, help = DEVICE_NAMES.join(", "))]
    device: String,
    /// The precision.
    #[arg(long, help = format!("{}; default: f32 on the CPU, f16 on GPUs", DTYPE_NAMES.join(", ")))]
    dtype: Option<String>,
    /// A LoRA fused at load: a local .safetensors file or a Hub file owner/name/file.safetensors, with an optional
    /// scale after the last ':' (default 1). Repeatable.
    #[arg(long = "lora", value_name = "PATH[:SCALE]")]
    loras: Vec<String>,
    /// A textual inversion embedding (A1111 .pt / .safetensors, diffusers learned_embeds) and the token written in
    /// prompts after the last ':' (default: the file's own). Repeatable, loaded in order.
    #[arg(long = "embedding", value_name = "PATH[:TOKEN]")]
    embeddings: Vec<String>,
    /// A tiny VAE (TAESD: local directory or Hub id such as madebyollin/taesd) for `vae: tiny` requests and
    /// live previews.
    #[arg(long, value_name = "DIR|HUB_ID")]
    tiny_vae: Option<String>,
    /// Key prefix, so several deployments can share one Redis.
    #[arg(long, default_value = DEFAULT_PREFIX)]
    prefix: String,
    /// This worker's name in the consumer group (default: host-pid-random).
    #[arg(long)]
    name: Option<String>,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = DEFAULT_HEARTBEAT_SECS as f64)]
    heartbeat_secs: f64,
    /// Seconds of silence after which a worker's job goes to another worker.
    #[arg(long, default_value_t = DEFAULT_HEARTBEAT_TIMEOUT_SECS as f64)]
    heartbeat_timeout_secs: f64,
    /// Starts after which a job that never finishes fails instead of being delivered again.
    #[arg(long, default_value_t = DEFAULT_MAX_DELIVERIES)]
    max_deliveries: u32,
    /// Seconds finished jobs (status and images) are kept, in Redis and in --out.
    #[arg(long, default_value_t = DEFAULT_RETENTION_SECS as f64)]
    retention_secs: f64,
    /// On SIGTERM, finish the running job instead of handing it back to the queue at its next step.
    #[arg(long)]
    drain: bool,
}

fn secs(field: &'static str, v: f64) -> sketchx::Result<Duration> {
    Duration::try_from_secs_f64(v)
        .map_err(|_| sketchx::Error::invalid(field, format!("{v} is not a number of seconds")))
}

fn start(args: &Args) -> sketchx::Result<Pipeline> {
    let mut redis = RedisConfig::new(&args.redis);
    redis.prefix = args.prefix.clone();
    redis.worker_name = args.name.clone();
    redis.heartbeat_interval = secs("heartbeat_secs", args.heartbeat_secs)?;
    redis.heartbeat_timeout = secs("heartbeat_timeout_secs", args.heartbeat_timeout_secs)?;
    redis.max_deliveries = args.max_deliveries;
    redis.retention = secs("retention_secs", args.retention_secs)?;
    let mut config = PipelineSettings {
        model: Some(args.model.clone()),
        controlnet: Some(args.controlnet.clone()),
        device: Some(args.device.clone()),
        dtype: args.dtype.clone(),
        output_dir: Some(args.out.clone()),
        retention_secs: args.retention_secs,
        drain_on_shutdown: args.drain,
        loras: lora_args(&args.loras),
        tiny_vae: args.tiny_vae.clone(),
        embeddings: embedding_args(&args.embeddings),
        ..PipelineSettings::DEFAULT
    }
    .to_config()?;
    // Files in --out are swept at least hourly, and as often as they expire.
    config.cleanup_interval = Some(redis.retention.min(Duration::from_secs(3600)));
    config.store = StoreConfig::Redis(redis);
    Pipeline::new(config)
}

/// Waits for SIGTERM or Ctrl-C.
fn wait_for_signal() -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = term.recv() => {}
                r = tokio::signal::ctrl_c() => r?,
            }
        }
        #[cfg(not(unix))]
        tokio::signal::ctrl_c().await?;
        Ok(())
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    eprintln!("loading {} + {} ...", args.model, args.controlnet);
    let pipe = match start(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // A line the caller can wait for: the models are loaded and the worker is reading the queue.
    eprintln!("worker ready: serving {}", args.prefix);
    if let Err(e) = wait_for_signal() {
        eprintln!("error: cannot wait for signals: {e}");
    }
    eprintln!(
        "stopping: the running job is {}",
        if args.drain {
            "finished"
        } else {
            "handed back"
        }
    );
    pipe.shutdown();
    eprintln!("worker stopped");
    ExitCode::SUCCESS
}
