//! The original service's REST API, hosted by axum on one shared `Pipeline`.
//!
//! ```text
//! cargo run --release --example server -- --addr 127.0.0.1:8000
//! curl -F sketch=@examples/sketches/car.png -F prompt="a red sports car" http://127.0.0.1:8000/api/generate
//! curl http://127.0.0.1:8000/api/status/<job_id>
//! ```

mod app;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use sketchx::names::{
    DEFAULT_CONTROLNET, DEFAULT_DEVICE, DEFAULT_MODEL, DEVICE_NAMES, DTYPE_NAMES,
};
use sketchx::settings::{
    embedding_args, lora_args, PipelineSettings, DEFAULT_OUTPUT_DIR, DEFAULT_QUEUE_CAPACITY,
};
use sketchx::Pipeline;

/// REST server for sketch-to-image jobs.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    addr: SocketAddr,
    /// Stable Diffusion 1.5 model: Hub repo id or local directory.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    /// ControlNet: Hub repo id or local directory.
    #[arg(long, default_value = DEFAULT_CONTROLNET)]
    controlnet: String,
    /// Where images are written and served from.
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
    /// Jobs that may wait in the queue.
    #[arg(long, default_value_t = DEFAULT_QUEUE_CAPACITY)]
    queue_capacity: usize,
    /// Be a client of the job queue in this Redis (redis://host:port): no model is loaded here; the `worker`
    /// example's processes run the jobs and images are served from Redis. Model flags are then unused.
    #[arg(long)]
    redis: Option<String>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let pipe = match &args.redis {
        Some(url) => {
            let config = sketchx::RedisConfig::new(url.as_str());
            let capacity = args.queue_capacity;
            tokio::task::spawn_blocking(move || Pipeline::connect_with(config, capacity)).await??
        }
        None => load(args.clone()).await?,
    };
    serve(args.addr, pipe).await
}

/// The in-process pipeline: models loaded here, jobs run here.
async fn load(args: Args) -> Result<Pipeline, Box<dyn std::error::Error>> {
    let cfg = PipelineSettings {
        model: Some(args.model),
        controlnet: Some(args.controlnet),
        device: Some(args.device),
        dtype: args.dtype,
        output_dir: Some(args.out),
        queue_capacity: args.queue_capacity,
        loras: lora_args(&args.loras),
        tiny_vae: args.tiny_vae,
        embeddings: embedding_args(&args.embeddings),
        ..PipelineSettings::DEFAULT
    }
    .to_config()?;
    Ok(tokio::task::spawn_blocking(move || Pipeline::new(cfg)).await??)
}

async fn serve(addr: SocketAddr, pipe: Pipeline) -> Result<(), Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!(
        "listening on http://{} (API description at /docs)",
        listener.local_addr()?
    );
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    app::serve(
        listener,
        app::router(pipe.clone()),
        app::HEADER_READ_TIMEOUT,
        ctrl_c,
        Duration::from_secs(30),
    )
    .await;
    pipe.shutdown();
    Ok(())
}
