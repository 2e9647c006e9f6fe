//! sketchx's side of the side-by-side CPU benchmark (`tools/bench_side_by_side.py` runs it next to diffusers).
//!
//! `cargo bench --bench speed -- --model DIR --controlnet DIR [options]` loads the models and times, each
//! `--runs` times after one warm-up: `load` (Engine::load), `text` (tokenizer + text encoder, no cache),
//! `step` (ControlNet + UNet at batch `--step-batch`, default 2: classifier-free guidance; 1 is a few-step recipe
//! without it, on `--step-size` pixels), `vae` (decode
//! of one `--vae-size` image) and `job` (a whole `Engine::generate` at `--job-size` with `--job-steps` steps).
//! `--pieces load,text,step,vae,job` picks which; `--profile` also prints where a step's (and a VAE decode's) time
//! goes per operation kind (from `--runs` more steps, `profiled_step`, with the ControlNet run before the UNet), with the GFLOP/s of the products (convolutions, linear layers, attention), and
//! `--profile-shapes` per kind and input shape; `--dtype f32|bf16`. `first_step` is the warm-up step's time (after `load`, the first step of the
//! process). The few-step recipe of the `job` piece: `--scheduler NAME` (default `euler_a`), `--guidance G`
//! (default the request's), `--lora PATH[:SCALE]`, `--tiny-vae DIR` with `--vae tiny` (decode the job's image with
//! it), `--job-warmup 0` (no untimed job first); the piece `tinyvae` times the tiny VAE's decode of one `--vae-size` image. The last stdout line is a JSON
//! object: seconds per run for each piece, the profile, and the peak resident memory (VmHWM).

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use sketchx::engine::{Engine, EngineConfig};
use sketchx::models::loader::ModelSource;
use sketchx::models::lora::LoraSpec;
use sketchx::ops::{on_pool, profile};
use sketchx::request::GenerationRequest;
use sketchx::sketch::Sketch;

fn vm_kib(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A profiled kind per `unit` (step, decode): seconds and calls, and for kinds that count their floating-point
/// operations the GFLOP and the rate (GFLOP/s), to set against the machine's peak.
fn kind_json(t: &profile::KindTotals, runs: usize, unit: &str) -> Value {
    let secs = t.seconds / runs as f64;
    let mut v = json!({
        format!("seconds_per_{unit}"): secs,
        format!("calls_per_{unit}"): t.calls / runs as u64,
    });
    if t.flops > 0 {
        let gflop = t.flops as f64 / runs as f64 / 1e9;
        v[format!("gflop_per_{unit}")] = json!(gflop);
        v["gflop_per_s"] = json!(gflop / secs.max(f64::MIN_POSITIVE));
    }
    v
}

fn time<T>(f: impl FnOnce() -> T) -> (f64, T) {
    let t = Instant::now();
    let out = f();
    (t.elapsed().as_secs_f64(), out)
}

fn main() {
    let mut opts: BTreeMap<String, String> = BTreeMap::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if let Some(k) = a.strip_prefix("--") {
            if k == "profile" || k == "profile-shapes" || k == "bench" {
                opts.insert(k.into(), "1".into());
            } else {
                opts.insert(k.into(), args.next().expect("option value"));
            }
        }
    }
    let get = |k: &str, d: &str| opts.get(k).cloned().unwrap_or_else(|| d.to_string());
    let model = get("model", "target/full-size/sd15");
    let cn = get("controlnet", "target/full-size/controlnet");
    let runs: usize = get("runs", "3").parse().unwrap();
    let step_size: usize = get("step-size", "256").parse().unwrap();
    let step_batch: usize = get("step-batch", "2").parse().unwrap();
    let vae_size: usize = get("vae-size", "512").parse().unwrap();
    let job_size: u32 = get("job-size", "512").parse().unwrap();
    let job_steps: u32 = get("job-steps", "2").parse().unwrap();
    let pieces = get("pieces", "load,text,step,vae,job");
    let pieces: Vec<&str> = pieces.split(',').collect();
    let dtype = match get("dtype", "f32").as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        other => panic!("unknown dtype {other}"),
    };
    let want_profile = opts.contains_key("profile") || opts.contains_key("profile-shapes");
    profile::enable_shapes(opts.contains_key("profile-shapes"));

    let mut config = EngineConfig::new(&model, &cn).expect("config");
    config.dtype = dtype;
    if let Some(spec) = opts.get("lora") {
        // PATH[:SCALE]: the scale after the last ':' when it is a number.
        let (path, scale) = match spec.rsplit_once(':').map(|(p, s)| (p, s.parse::<f64>())) {
            Some((p, Ok(s))) => (p, s),
            _ => (spec.as_str(), 1.0),
        };
        config.loras.push(LoraSpec::file(path, scale));
    }
    if let Some(dir) = opts.get("tiny-vae") {
        config.tiny_vae = Some(ModelSource::parse(dir).expect("tiny VAE"));
    }
    let mut out = serde_json::Map::new();
    let mut record = |name: &str, v: Vec<f64>| {
        eprintln!("sketchx {name}: {v:?}");
        out.insert(name.to_string(), json!(v));
    };

    let (t_load, mut engine) = time(|| Engine::load(&config).expect("load"));
    let rss_loaded = vm_kib("VmRSS:");
    if pieces.contains(&"load") {
        let mut v = vec![t_load];
        for _ in 1..runs {
            drop(engine);
            let (t, e) = time(|| Engine::load(&config).expect("load"));
            engine = e;
            v.push(t);
        }
        record("load", v);
    }
    let dev = Device::Cpu;
    let dtype = engine.activation_dtype();

    if pieces.contains(&"text") {
        let text = "a red sports car on a mountain road, highly detailed";
        let run = || {
            let ids = engine.tokenizer().encode_padded(text);
            let ids = Tensor::from_vec(ids.clone(), (1, ids.len()), &dev).unwrap();
            on_pool(|| engine.text_encoder().forward(&ids).unwrap())
        };
        run();
        record("text", (0..runs).map(|_| time(run).0).collect());
    }

    let mut prof = Value::Null;
    let mut vae_prof = Value::Null;
    if pieces.contains(&"step") {
        let l = step_size / 8;
        let hidden = engine.unet().cross_attention_dim;
        // As a job's step: with guidance (an even batch) the latents and the control image are the same in both
        // halves, only the texts differ.
        let halves = if step_batch.is_multiple_of(2) { 2 } else { 1 };
        let twice = |t: Tensor| Tensor::cat(&vec![&t; halves], 0).unwrap();
        let lat = twice(
            Tensor::randn(0f32, 1., (step_batch / halves, 4, l, l), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        );
        let ctx = Tensor::randn(0f32, 1., (step_batch, 77, hidden), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let cond = twice(
            Tensor::rand(
                0f32,
                1.,
                (step_batch / halves, 3, step_size, step_size),
                &dev,
            )
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
        );
        // On the pool, as a job's step runs (`Engine::generate`).
        let run = || {
            on_pool(|| {
                let control = || {
                    let r = engine
                        .controlnet()
                        .forward(&lat, 500.0, &ctx, &cond, 1.0, false)?;
                    Ok(Some(r))
                };
                engine
                    .unet()
                    .forward_controlled(&lat, 500.0, &ctx, None, control)
                    .unwrap()
            })
        };
        // The untimed warm-up, timed on its own: right after `load` (with `--pieces load,step`) it is the first
        // step of a fresh process, which diffusers' lazily paged-in weights make slower than the others.
        record("first_step", vec![time(run).0]);
        let steps: Vec<f64> = (0..runs).map(|_| time(run).0).collect();
        record("step", steps);
        if want_profile {
            // Profiled steps of their own, after the timed ones: with the profiler on, the ControlNet runs before
            // the UNet instead of beside its down blocks, so that each operation's time is its own.
            profile::enable(true);
            let profiled: Vec<f64> = (0..runs).map(|_| time(run).0).collect();
            profile::enable(false);
            let mean_step = profiled.iter().sum::<f64>() / runs as f64;
            record("profiled_step", profiled);
            // The op types time themselves; what they do not cover (element-wise arithmetic, layer norms,
            // activations, copies) is the rest of the step.
            let mut m = serde_json::Map::new();
            let mut covered = 0.0;
            for t in profile::take() {
                covered += t.seconds / runs as f64;
                m.insert(t.kind.into(), kind_json(&t, runs, "step"));
            }
            m.insert(
                "other".into(),
                json!({"seconds_per_step": mean_step - covered}),
            );
            prof = Value::Object(m);
        }
    }

    if pieces.contains(&"vae") {
        let l = vae_size / 8;
        let lat = Tensor::randn(0f32, 1., (1, 4, l, l), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let run = || on_pool(|| engine.vae().decode(&lat).unwrap());
        run();
        profile::enable(want_profile);
        record("vae", (0..runs).map(|_| time(run).0).collect());
        profile::enable(false);
        if want_profile {
            let m: serde_json::Map<String, Value> = profile::take()
                .iter()
                .map(|t| (t.kind.to_string(), kind_json(t, runs, "decode")))
                .collect();
            vae_prof = Value::Object(m);
        }
    }

    if pieces.contains(&"tinyvae") {
        let l = vae_size / 8;
        let lat = Tensor::randn(0f32, 1., (1, 4, l, l), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let tiny = engine.tiny_vae().expect("--tiny-vae for the tinyvae piece");
        let run = || on_pool(|| tiny.decode(&lat).unwrap());
        run();
        profile::enable(want_profile);
        record("tinyvae", (0..runs).map(|_| time(run).0).collect());
        profile::enable(false);
        if want_profile {
            for t in profile::take() {
                eprintln!(
                    "tinyvae profile: {} {:.3} s per decode ({} calls)",
                    t.kind,
                    t.seconds / runs as f64,
                    t.calls / runs as u64
                );
            }
        }
    }

    if pieces.contains(&"job") {
        let sketch = Sketch::open("examples/sketches/car.png".as_ref()).expect("sketch");
        let req = GenerationRequest {
            prompt: Some("a red sports car".into()),
            seed: Some(42),
            steps: job_steps,
            width: Some(job_size),
            height: Some(job_size),
            scheduler: get("scheduler", "euler_a").parse().expect("scheduler"),
            guidance_scale: opts
                .get("guidance")
                .map_or(GenerationRequest::DEFAULT.guidance_scale, |g| {
                    g.parse().expect("guidance")
                }),
            vae: get("vae", "full").parse().expect("vae"),
            ..Default::default()
        };
        let run = || engine.generate(&req, &sketch, &mut |_| true).unwrap();
        // `--job-warmup 0` skips the untimed first job (for long jobs, whose first step warms up the same).
        if get("job-warmup", "1") != "0" {
            run();
        }
        record("job", (0..runs).map(|_| time(run).0).collect());
    }

    out.insert("profile".into(), prof);
    if !vae_prof.is_null() {
        out.insert("vae_profile".into(), vae_prof);
    }
    out.insert(
        "rss_after_load_mib".into(),
        json!(rss_loaded as f64 / 1024.0),
    );
    out.insert(
        "peak_rss_mib".into(),
        json!(vm_kib("VmHWM:") as f64 / 1024.0),
    );
    println!("{}", Value::Object(out));
}
