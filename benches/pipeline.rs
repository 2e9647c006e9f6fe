//! The cost of the job executor on the tiny fixture models: `submit` and `poll` in microseconds, and jobs per
//! second through the `Pipeline` against calling the engine (and writing the PNGs) directly.
//!
//! ```text
//! cargo bench --bench pipeline
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sketchx::engine::{Engine, EngineConfig};
use sketchx::output::{image_file_name, write_png_atomic, PngSettings};
use sketchx::request::GenerationRequest;
use sketchx::sketch::Sketch;
use sketchx::{JobId, Pipeline, PipelineConfig, SketchInput};

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
}

fn req(seed: u64) -> GenerationRequest {
    GenerationRequest {
        prompt: Some("a house".into()),
        steps: 2,
        width: Some(64),
        height: Some(64),
        seed: Some(seed),
        ..Default::default()
    }
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

fn main() {
    let f = fixtures();
    let engine_cfg = EngineConfig::new(
        f.join("tiny-sd").to_str().unwrap(),
        f.join("tiny-controlnet").to_str().unwrap(),
    )
    .unwrap();
    let bytes = std::fs::read(f.join("sketches/house_black_on_white.png")).unwrap();
    let sketch = Sketch::decode(&bytes).unwrap();
    let out = std::env::temp_dir().join(format!("sketchx-bench-{}", std::process::id()));

    // submit / poll latency, with the queue kept full enough that the worker is busy elsewhere.
    let mut cfg = PipelineConfig::with_engine(engine_cfg.clone());
    cfg.output_dir = out.join("latency");
    cfg.queue_capacity = 100_000;
    cfg.cleanup_interval = None;
    let pipe = Pipeline::new(cfg).unwrap();
    let mut submit_decoded = Vec::new();
    let mut submit_bytes = Vec::new();
    let mut ids: Vec<JobId> = Vec::new();
    for i in 0..500 {
        let t = Instant::now();
        ids.push(
            pipe.submit(req(i), SketchInput::Decoded(sketch.clone()))
                .unwrap(),
        );
        submit_decoded.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        ids.push(pipe.submit(req(i), bytes.as_slice()).unwrap());
        submit_bytes.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let mut poll = Vec::new();
    for k in 0..20_000 {
        let id = &ids[k % ids.len()];
        let t = Instant::now();
        std::hint::black_box(pipe.poll(id).unwrap());
        poll.push(t.elapsed().as_secs_f64() * 1e6);
    }
    pipe.shutdown();
    for (name, v) in [
        ("submit (decoded sketch)", submit_decoded),
        ("submit (PNG bytes, decoded at submit)", submit_bytes),
        ("poll", poll),
    ] {
        let (min, med, max) = stats(v);
        println!("{name:<40} min {min:8.1} us  median {med:8.1} us  max {max:8.1} us");
    }

    // Throughput: N jobs through the pipeline vs the same work called directly.
    let n = 20u64;
    let engine = Engine::load(&engine_cfg).unwrap();
    let direct_dir = out.join("direct");
    std::fs::create_dir_all(&direct_dir).unwrap();
    let t = Instant::now();
    for i in 0..n {
        let g = engine.generate(&req(i), &sketch, &mut |_| true).unwrap();
        let id = JobId::random();
        for (k, rgb) in g.images.iter().enumerate() {
            let p = direct_dir.join(image_file_name(id.as_str(), k));
            write_png_atomic(&p, g.width, g.height, rgb, &PngSettings::default()).unwrap();
        }
    }
    let direct = t.elapsed();

    let mut cfg = PipelineConfig::with_engine(engine_cfg);
    cfg.output_dir = out.join("pipeline");
    cfg.cleanup_interval = None;
    let pipe = Pipeline::with_generator(Arc::new(engine), cfg).unwrap();
    let t = Instant::now();
    let ids: Vec<JobId> = (0..n)
        .map(|i| {
            pipe.submit(req(i), SketchInput::Decoded(sketch.clone()))
                .unwrap()
        })
        .collect();
    for id in &ids {
        pipe.wait(id, Some(Duration::from_secs(600))).unwrap();
    }
    let piped = t.elapsed();
    pipe.shutdown();
    let jps = |d: Duration| n as f64 / d.as_secs_f64();
    println!(
        "throughput ({n} jobs, 2 steps, 64x64): direct {:.2} jobs/s, pipeline {:.2} jobs/s, pipeline/direct time ratio {:.3}",
        jps(direct),
        jps(piped),
        piped.as_secs_f64() / direct.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(out);
}
