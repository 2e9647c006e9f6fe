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

use clap::Parser;
use sketchx::engine::{device_from_name, DEFAULT_CONTROLNET, DEFAULT_MODEL};
use sketchx::{Pipeline, PipelineConfig};

/// REST server for sketch-to-image jobs.
#[derive(Parser, Debug)]
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
    #[arg(long, default_value = "generated")]
    out: PathBuf,
    /// cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Jobs that may wait in the queue.
    #[arg(long, default_value_t = 64)]
    queue_capacity: usize,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let mut cfg = PipelineConfig::new(&args.model, &args.controlnet)?;
    cfg.engine.device = device_from_name(&args.device)?;
    cfg.output_dir = args.out;
    cfg.queue_capacity = args.queue_capacity;
    let pipe = tokio::task::spawn_blocking(move || Pipeline::new(cfg)).await??;
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    eprintln!(
        "listening on http://{} (API description at /docs)",
        listener.local_addr()?
    );
    axum::serve(listener, app::router(pipe.clone()))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    pipe.shutdown();
    Ok(())
}
