//! The Redis job store against a real redis-server: several worker processes and clients, a worker killed with
//! SIGKILL mid-job and its job finished elsewhere with the same pixels, the poison job, cancels across processes,
//! unknown ids, the queue bound, expiry, the server restarted with and without persistence, and the `worker` and
//! `generate --redis` examples.
//!
//! `SKETCHX_TEST_REDIS_URL` names the server (`scripts/test` starts one on a free loopback port); without it
//! every test here says it is skipped and passes. Each test uses its own key prefix. Worker processes are this
//! test binary run again with `SKETCHX_CHILD_MODE` set (the ignored `child_worker` entry point), or the `worker`
//! example. Re-delivery timings are shortened (heartbeat every 100 ms, dead after 600 ms).

mod common;
use common::*;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sketchx::engine::{Engine, EngineConfig, Generated, StepInfo};
use sketchx::pipeline::Generator;
use sketchx::request::{GenerationRequest, StartImage};
use sketchx::sketch::{Preprocess, Sketch};
use sketchx::{
    Error, JobId, JobState, Pipeline, PipelineConfig, RedisConfig, ShutdownPolicy, StoreConfig,
};

const HEARTBEAT: Duration = Duration::from_millis(100);
const DEAD_AFTER: Duration = Duration::from_millis(600);
const LONG: Option<Duration> = Some(Duration::from_secs(120));

/// The server under test, or `None` (the test then says it is skipped).
fn redis_url(test: &str) -> Option<String> {
    match std::env::var("SKETCHX_TEST_REDIS_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            eprintln!("SKIPPED {test}: SKETCHX_TEST_REDIS_URL is not set (scripts/test sets it)");
            None
        }
    }
}

fn prefix(test: &str) -> String {
    format!("sketchx-test-{test}-{}", &JobId::random().as_str()[..8])
}

fn redis_config(url: &str, prefix: &str) -> RedisConfig {
    let mut c = RedisConfig::new(url);
    c.prefix = prefix.to_string();
    c.heartbeat_interval = HEARTBEAT;
    c.heartbeat_timeout = DEAD_AFTER;
    c.poll_interval = Duration::from_millis(10);
    c.timeout = Duration::from_secs(5);
    c
}

fn client(url: &str, prefix: &str) -> Pipeline {
    Pipeline::connect_with(redis_config(url, prefix), 1000).unwrap()
}

fn sketch_bytes() -> Vec<u8> {
    std::fs::read(fixtures().join("sketches/house_black_on_white.png")).unwrap()
}

fn req(prompt: &str, steps: u32, seed: u64) -> GenerationRequest {
    GenerationRequest {
        prompt: Some(prompt.into()),
        steps,
        width: Some(64),
        height: Some(64),
        seed: Some(seed),
        ..Default::default()
    }
}

fn engine_config() -> EngineConfig {
    let (model, controlnet) = tiny_models();
    EngineConfig::new(&model, &controlnet).unwrap()
}

/// Stand-in generators for worker processes.
///
/// - `noop`: one observer call per step (sleeping `step_ms` each), images filled with the seed's low byte.
/// - `poison`: aborts the process for a job whose prompt is `poison`, else `noop`.
/// - `stall`: the real engine, which never gets past its first step (to be killed mid-job).
/// - `engine`: the real engine.
enum Mode {
    Noop { step_ms: u64 },
    Poison,
    Stall(Engine),
    Engine(Engine),
}

fn noop_generate(
    req: &GenerationRequest,
    step_ms: u64,
    observer: &mut dyn FnMut(&StepInfo) -> bool,
) -> sketchx::Result<Generated> {
    let steps = req.steps as usize;
    let n = req.num_images as usize;
    for step in 1..=steps {
        std::thread::sleep(Duration::from_millis(step_ms));
        let info = StepInfo {
            step,
            total_steps: steps,
            decoded: 0,
            num_images: n,
            latents: None,
            x0: None,
        };
        if !observer(&info) {
            return Err(Error::Cancelled);
        }
    }
    let (w, h) = (req.width.unwrap_or(64), req.height.unwrap_or(64));
    let fill = (req.seed.unwrap_or_default() % 251) as u8;
    Ok(Generated {
        seed: req.seed.unwrap_or_default(),
        width: w,
        height: h,
        images: vec![vec![fill; (w * h * 3) as usize]; n],
    })
}

impl Generator for Mode {
    fn output_size(&self, req: &GenerationRequest, sketch: &Sketch) -> sketchx::Result<(u32, u32)> {
        match self {
            Mode::Stall(e) | Mode::Engine(e) => e.output_size(req, sketch),
            _ => Ok(sketch.target_size(req.width, req.height)),
        }
    }

    fn generate(
        &self,
        req: &GenerationRequest,
        sketch: &Sketch,
        observer: &mut dyn FnMut(&StepInfo) -> bool,
    ) -> sketchx::Result<Generated> {
        match self {
            Mode::Noop { step_ms } => noop_generate(req, *step_ms, observer),
            Mode::Poison if req.prompt.as_deref() == Some("poison") => std::process::abort(),
            Mode::Poison => noop_generate(req, 1, observer),
            Mode::Engine(e) => e.generate(req, sketch, observer),
            Mode::Stall(e) => e.generate(req, sketch, &mut |info| {
                let go_on = observer(info);
                if info.step >= 1 {
                    // Stuck for good (a hung GPU, say): only a kill ends this.
                    loop {
                        std::thread::sleep(Duration::from_secs(3600));
                    }
                }
                go_on
            }),
        }
    }
}

/// Entry point of the worker processes (run by `spawn_worker`; ignored in a normal run). It serves the queue
/// until its standard input closes, then shuts down (handing back a running job) and exits.
#[test]
#[ignore = "a worker process of the other tests, started by them"]
fn child_worker() {
    let Ok(mode) = std::env::var("SKETCHX_CHILD_MODE") else {
        panic!("run by the Redis tests with SKETCHX_CHILD_MODE set");
    };
    let var = |k: &str| std::env::var(k).unwrap();
    let mode = match mode.as_str() {
        "noop" => Mode::Noop {
            step_ms: var("SKETCHX_CHILD_STEP_MS").parse().unwrap(),
        },
        "poison" => Mode::Poison,
        "stall" => Mode::Stall(Engine::load(&engine_config()).unwrap()),
        "engine" => Mode::Engine(Engine::load(&engine_config()).unwrap()),
        other => panic!("unknown mode {other}"),
    };
    let mut redis = redis_config(&var("SKETCHX_CHILD_URL"), &var("SKETCHX_CHILD_PREFIX"));
    redis.max_deliveries = var("SKETCHX_CHILD_MAX_DELIVERIES").parse().unwrap();
    let mut config = PipelineConfig::with_engine(engine_config());
    config.output_dir = PathBuf::from(var("SKETCHX_CHILD_OUT"));
    config.cleanup_interval = None;
    config.store = StoreConfig::Redis(redis);
    let pipe = Pipeline::with_generator(Arc::new(mode), config).unwrap();
    println!("ready");
    let _ = std::io::stdin().read_line(&mut String::new());
    pipe.shutdown();
}

/// A worker process of this test binary; returns once it is serving the queue.
fn spawn_worker(url: &str, prefix: &str, mode: &str, out: &Path, max_deliveries: u32) -> Child {
    let mut child = worker_command(url, prefix, mode, out, max_deliveries);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.trim_end().ends_with("ready") => break,
            Some(Ok(_)) => continue,
            other => panic!("worker process ended before it was ready: {other:?}"),
        }
    }
    // Keep reading its output (the test harness's last lines), so that it never writes to a closed pipe.
    std::thread::spawn(move || for _ in lines {});
    child
}

/// A worker process of this test binary, started (its output piped, not yet read).
fn worker_command(url: &str, prefix: &str, mode: &str, out: &Path, max_deliveries: u32) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_worker",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SKETCHX_CHILD_MODE", mode)
        .env("SKETCHX_CHILD_STEP_MS", "20")
        .env("SKETCHX_CHILD_URL", url)
        .env("SKETCHX_CHILD_PREFIX", prefix)
        .env("SKETCHX_CHILD_OUT", out)
        .env("SKETCHX_CHILD_MAX_DELIVERIES", max_deliveries.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Waits until `cond` holds, polling; panics after two minutes (a hang, not a timing assertion).
fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "gave up waiting: {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn running_past_first_step(client: &Pipeline, id: &JobId) -> bool {
    client
        .poll(id)
        .is_ok_and(|s| s.state == JobState::Running && s.step >= 1)
}

fn files_of(dir: &Path, id: &JobId) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(id.as_str()))
                .collect()
        })
        .unwrap_or_default()
}

fn decode_png(bytes: &[u8]) -> Vec<u8> {
    image::load_from_memory(bytes).unwrap().to_rgb8().into_raw()
}

/// A worker pipeline inside this process with a stand-in generator.
fn local_worker(url: &str, prefix: &str, mode: Mode, out: &Path) -> Pipeline {
    let mut config = PipelineConfig::with_engine(engine_config());
    config.output_dir = out.to_path_buf();
    config.cleanup_interval = None;
    config.store = StoreConfig::Redis(redis_config(url, prefix));
    Pipeline::with_generator(Arc::new(mode), config).unwrap()
}

#[test]
fn unknown_ids_the_queue_bound_and_expiry() {
    let Some(url) = redis_url("unknown_ids_the_queue_bound_and_expiry") else {
        return;
    };
    let p = prefix("basics");
    let c = Pipeline::connect_with(redis_config(&url, &p), 2).unwrap();
    assert!(!c.is_worker());
    let unknown = JobId::random();
    assert!(matches!(c.poll(&unknown), Err(Error::UnknownJob(_))));
    assert!(matches!(c.cancel(&unknown), Err(Error::UnknownJob(_))));
    assert!(matches!(c.wait(&unknown, LONG), Err(Error::UnknownJob(_))));
    assert!(matches!(c.images(&unknown), Err(Error::UnknownJob(_))));
    // Bad input is refused by the client before anything reaches Redis.
    let bad = GenerationRequest {
        steps: 0,
        ..req("x", 1, 1)
    };
    assert!(matches!(
        c.submit(bad, sketch_bytes()),
        Err(Error::InvalidRequest { field: "steps", .. })
    ));
    // No worker yet: two jobs fill the bound, the third is QueueFull at once.
    let a = c.submit(req("a", 2, 11), sketch_bytes()).unwrap();
    let b = c.submit(req("b", 2, 12), sketch_bytes()).unwrap();
    assert!(matches!(
        c.submit(req("c", 2, 13), sketch_bytes()),
        Err(Error::QueueFull { capacity: 2 })
    ));
    let st = c.poll(&b).unwrap();
    assert_eq!((st.state, st.queue_position), (JobState::Queued, Some(2)));
    assert_eq!(st.message, "Task is waiting in the queue.");
    assert_eq!(c.queued(), 2);
    // A worker with a short retention serves them; status, JSON and PNG bytes come from the store.
    let out = scratch_dir("redis-basics");
    let mut cfg = PipelineConfig::with_engine(engine_config());
    cfg.output_dir = out.clone();
    cfg.cleanup_interval = None;
    let mut redis = redis_config(&url, &p);
    redis.retention = Duration::from_millis(1500);
    cfg.store = StoreConfig::Redis(redis);
    let worker = Pipeline::with_generator(Arc::new(Mode::Noop { step_ms: 1 }), cfg).unwrap();
    for (id, seed) in [(&a, 11u8), (&b, 12)] {
        let st = c.wait(id, LONG).unwrap();
        assert_eq!(st.state, JobState::Completed, "{}", st.message);
        assert_eq!((st.progress, st.step, st.total_steps), (100.0, 2, 2));
        assert_eq!(st.images.len(), 1);
        assert!(st.images[0].starts_with(&out), "{:?}", st.images);
        let json: serde_json::Value = serde_json::from_str(&st.to_json()).unwrap();
        assert_eq!(json["status"], "completed");
        let pngs = c.images(id).unwrap();
        assert_eq!(pngs.len(), 1);
        assert!(decode_png(&pngs[0]).iter().all(|&v| v == seed));
        assert_eq!(std::fs::read(&st.images[0]).unwrap(), pngs[0]);
        assert!(!c.cancel(id).unwrap(), "a finished job cannot be cancelled");
    }
    // After the retention the store has forgotten the jobs: unknown ids, no images.
    until("the finished jobs expire", || {
        matches!(c.poll(&a), Err(Error::UnknownJob(_)))
            && matches!(c.images(&b), Err(Error::UnknownJob(_)))
    });
    worker.shutdown();
    assert!(matches!(
        worker.submit(req("late", 1, 1), sketch_bytes()),
        Err(Error::ShutDown)
    ));
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn several_worker_processes_and_client_threads_run_every_job_exactly_once() {
    let Some(url) = redis_url("several_worker_processes_and_client_threads") else {
        return;
    };
    let p = prefix("fleet");
    let outs: Vec<PathBuf> = (0..3)
        .map(|i| scratch_dir(&format!("redis-fleet-{i}")))
        .collect();
    let mut workers: Vec<Child> = outs
        .iter()
        .map(|o| spawn_worker(&url, &p, "noop", o, 3))
        .collect();
    let jobs: Vec<(JobId, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                let (url, p) = (url.clone(), p.clone());
                s.spawn(move || {
                    let c = client(&url, &p);
                    (0..8u64)
                        .map(|i| {
                            let seed = t * 100 + i;
                            (
                                c.submit(req("fleet", 3, seed), sketch_bytes()).unwrap(),
                                seed,
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let c = client(&url, &p);
    let mut dirs_used = std::collections::HashSet::new();
    for (id, seed) in &jobs {
        let st = c.wait(id, LONG).unwrap();
        assert_eq!(st.state, JobState::Completed, "{}", st.message);
        assert_eq!(st.seed, *seed);
        let png = c.images(id).unwrap();
        assert!(decode_png(&png[0]).iter().all(|&v| v == (seed % 251) as u8));
        dirs_used.insert(st.images[0].parent().unwrap().to_path_buf());
    }
    // Exactly once: every job's file exists in exactly one worker's directory.
    for (id, _) in &jobs {
        let copies: usize = outs.iter().map(|o| files_of(o, id).len()).sum();
        assert_eq!(copies, 1, "job {id} ran {copies} times");
    }
    assert!(
        dirs_used.len() >= 2,
        "the jobs were shared between workers: {dirs_used:?}"
    );
    assert_eq!(c.queued(), 0);
    for w in &mut workers {
        drop(w.stdin.take()); // graceful stop
        assert!(w.wait().unwrap().success());
    }
    for o in outs {
        let _ = std::fs::remove_dir_all(o);
    }
}

fn worker_example_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap(); // target/<profile>/deps/redis-<hash>
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(format!("worker{}", std::env::consts::EXE_SUFFIX))
}

fn example_bin(name: &str) -> PathBuf {
    worker_example_bin().with_file_name(format!("{name}{}", std::env::consts::EXE_SUFFIX))
}

/// The `worker` example, started and waited for until it serves the queue.
fn spawn_example_worker(url: &str, prefix: &str, out: &Path) -> Child {
    let (model, controlnet) = tiny_models();
    let mut child = Command::new(worker_example_bin())
        .args([
            "--redis",
            url,
            "--model",
            &model,
            "--controlnet",
            &controlnet,
        ])
        .args(["--out", out.to_str().unwrap(), "--prefix", prefix])
        .args(["--heartbeat-secs", "0.1", "--heartbeat-timeout-secs", "0.6"])
        .env("HF_HUB_OFFLINE", "1")
        .stderr(Stdio::piped())
        .spawn()
        .expect("cargo test builds the worker example");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.starts_with("worker ready") => break,
            Some(Ok(_)) => continue,
            other => panic!("the worker example ended before it was ready: {other:?}"),
        }
    }
    // Keep draining its stderr so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    child
}

fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[test]
fn a_worker_killed_mid_job_is_replaced_and_the_job_gives_the_same_pixels() {
    let Some(url) = redis_url("a_worker_killed_mid_job_is_replaced") else {
        return;
    };
    let p = prefix("kill");
    let c = client(&url, &p);
    let (out_a, out_b) = (scratch_dir("redis-kill-a"), scratch_dir("redis-kill-b"));
    let mut a = spawn_worker(&url, &p, "stall", &out_a, 3);
    let mut r = req("a house", 3, 7);
    r.num_images = 2;
    let id = c.submit(r.clone(), sketch_bytes()).unwrap();
    until("worker A is past the first step", || {
        running_past_first_step(&c, &id)
    });
    a.kill().unwrap(); // SIGKILL: no hand-back, no last heartbeat
    a.wait().unwrap();
    // Worker B, the `worker` example on the real engine, takes the job over once A's heartbeats have stopped.
    let mut b = spawn_example_worker(&url, &p, &out_b);
    let st = c.wait(&id, LONG).unwrap();
    assert_eq!(st.state, JobState::Completed, "{}", st.message);
    assert!(
        st.images.iter().all(|i| i.starts_with(&out_b)),
        "{:?}",
        st.images
    );
    assert!(files_of(&out_a, &id).is_empty());
    let engine = Engine::load(&engine_config()).unwrap();
    let direct = engine
        .generate(&r, &Sketch::decode(&sketch_bytes()).unwrap(), &mut |_| true)
        .unwrap();
    let pngs = c.images(&id).unwrap();
    assert_eq!(pngs.len(), 2);
    for (png, rgb) in pngs.iter().zip(&direct.images) {
        assert_eq!(&decode_png(png), rgb, "the re-run gives the same pixels");
    }

    // `generate --redis` submits to the same queue, follows the job and writes its PNGs into --out.
    let cli_out = scratch_dir("redis-kill-cli");
    let sketch = fixtures().join("sketches/house_black_on_white.png");
    let o = Command::new(example_bin("generate"))
        .args([
            "--redis",
            &url,
            "--redis-prefix",
            &p,
            "--sketch",
            sketch.to_str().unwrap(),
        ])
        .args([
            "--prompt",
            "a house",
            "--steps",
            "3",
            "--seed",
            "7",
            "--num-images",
            "2",
        ])
        .args([
            "--width",
            "64",
            "--height",
            "64",
            "--out",
            cli_out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let printed: Vec<PathBuf> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(PathBuf::from)
        .collect();
    assert_eq!(printed.len(), 2);
    for (path, rgb) in printed.iter().zip(&direct.images) {
        assert!(path.starts_with(&cli_out));
        assert_eq!(&image::open(path).unwrap().to_rgb8().into_raw(), rgb);
    }

    // SIGTERM while a job runs: the worker hands it back to the queue and exits 0.
    let long = GenerationRequest {
        width: Some(256),
        height: Some(256),
        ..req("a house", 150, 3)
    };
    let id = c.submit(long, sketch_bytes()).unwrap();
    until("worker B runs the long job", || {
        running_past_first_step(&c, &id)
    });
    sigterm(&b);
    assert!(
        b.wait().unwrap().success(),
        "SIGTERM ends the worker with status 0"
    );
    let st = c.poll(&id).unwrap();
    assert_eq!(st.state, JobState::Queued, "handed back: {}", st.message);
    assert_eq!(st.step, 0);
    assert!(files_of(&out_b, &id).is_empty());
    assert!(c.cancel(&id).unwrap());
    for d in [out_a, out_b, cli_out] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn a_job_that_kills_every_worker_fails_after_the_delivery_limit() {
    let Some(url) = redis_url("a_job_that_kills_every_worker_fails") else {
        return;
    };
    let p = prefix("poison");
    let c = client(&url, &p);
    let out = scratch_dir("redis-poison");
    let id = c.submit(req("poison", 2, 1), sketch_bytes()).unwrap();
    // Two workers die on it, one after the other (the limit is 2 deliveries)...
    for _ in 0..2 {
        // Not waited for: it may take the job and die before it says it is ready.
        let mut w = worker_command(&url, &p, "poison", &out, 2);
        // `wait` closes the child's stdin, which asks it to stop: keep it open.
        let _stdin = w.stdin.take();
        let status = w.wait().unwrap();
        assert!(!status.success(), "the poison job aborted its worker");
    }
    // ...and the third marks it failed instead of running it, and goes on serving the queue.
    let mut w = spawn_worker(&url, &p, "poison", &out, 2);
    let st = c.wait(&id, LONG).unwrap();
    assert_eq!(st.state, JobState::Failed);
    assert!(st.message.contains("started 2 times"), "{}", st.message);
    let ok = c.submit(req("fine", 2, 5), sketch_bytes()).unwrap();
    assert_eq!(c.wait(&ok, LONG).unwrap().state, JobState::Completed);
    assert!(w.try_wait().unwrap().is_none(), "the third worker is alive");
    drop(w.stdin.take());
    assert!(w.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn cancel_of_queued_and_running_jobs_across_processes() {
    let Some(url) = redis_url("cancel_of_queued_and_running_jobs_across_processes") else {
        return;
    };
    let p = prefix("cancel");
    let out = scratch_dir("redis-cancel");
    let mut w = spawn_worker(&url, &p, "noop", &out, 3);
    let c = client(&url, &p);
    // 150 steps of 20 ms: three seconds unless cancelled; the only worker is busy with it.
    let running = c.submit(req("long", 150, 1), sketch_bytes()).unwrap();
    until("the first job runs", || {
        running_past_first_step(&c, &running)
    });
    let queued = c.submit(req("queued", 150, 2), sketch_bytes()).unwrap();
    assert_eq!(c.poll(&queued).unwrap().queue_position, Some(1));
    // Cancels come from another client process's point of view: a fresh connection, no shared memory.
    let other = client(&url, &p);
    assert!(other.cancel(&queued).unwrap());
    assert!(other.cancel(&running).unwrap());
    let q = c.wait(&queued, LONG).unwrap();
    assert_eq!(q.state, JobState::Cancelled);
    assert!(
        q.started_at.is_none(),
        "a cancelled queued job never starts"
    );
    let r = c.wait(&running, LONG).unwrap();
    assert_eq!(r.state, JobState::Cancelled);
    assert!(
        r.step < 150,
        "the running job stopped early (at step {})",
        r.step
    );
    assert!(r.images.is_empty() && c.images(&running).unwrap().is_empty());
    assert!(
        !other.cancel(&running).unwrap(),
        "cancelling twice says it was final"
    );
    // The worker goes on: the next job completes.
    let next = c.submit(req("next", 2, 3), sketch_bytes()).unwrap();
    assert_eq!(c.wait(&next, LONG).unwrap().state, JobState::Completed);
    assert!(files_of(&out, &running).is_empty() && files_of(&out, &queued).is_empty());
    drop(w.stdin.take());
    assert!(w.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(out);
}

/// A redis-server of this test's own, which it may stop and start again.
struct OwnServer {
    port: u16,
    dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl OwnServer {
    fn start(name: &str, args: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = scratch_dir(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = OwnServer {
            port,
            dir,
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        s.up();
        s
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn up(&mut self) {
        let bin = std::env::var("SKETCHX_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--dir", self.dir.to_str().unwrap()])
            .args(&self.args)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed where SKETCHX_TEST_REDIS_URL is set");
        self.child = Some(child);
        let url = self.url();
        until("the own redis-server answers", || {
            redis::Client::open(url.as_str())
                .and_then(|c| c.get_connection())
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .is_ok()
        });
    }

    /// A clean stop (SIGTERM: the server writes its append-only file if it keeps one).
    fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            sigterm(&c);
            c.wait().unwrap();
        }
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_redis_restart_loses_nothing_with_appendonly_and_everything_without_but_all_reconnect() {
    if redis_url("a_redis_restart").is_none() {
        return;
    }
    for persistent in [true, false] {
        let mut server = if persistent {
            OwnServer::start("redis-aof", &["--appendonly", "yes", "--save", ""])
        } else {
            OwnServer::start("redis-volatile", &["--appendonly", "no", "--save", ""])
        };
        let url = server.url();
        let p = prefix("restart");
        let out = scratch_dir("redis-restart-out");
        let executions = Arc::new(AtomicUsize::new(0));
        let worker = {
            let mut config = PipelineConfig::with_engine(engine_config());
            config.output_dir = out.clone();
            config.cleanup_interval = None;
            config.store = StoreConfig::Redis(redis_config(&url, &p));
            config.shutdown = ShutdownPolicy::Cancel;
            let counted = Counted(executions.clone());
            Pipeline::with_generator(Arc::new(counted), config).unwrap()
        };
        let c = client(&url, &p);
        let jobs: Vec<JobId> = (0..6)
            .map(|i| c.submit(req("r", 10, i), sketch_bytes()).unwrap())
            .collect();
        until("a job runs", || {
            jobs.iter().any(|id| running_past_first_step(&c, id))
        });
        server.down();
        assert!(
            matches!(c.poll(&jobs[0]), Err(Error::Store { .. })),
            "while the server is down, calls fail with a store error naming it"
        );
        server.up();
        if persistent {
            for id in &jobs {
                let st = c.wait(id, LONG).unwrap();
                assert_eq!(st.state, JobState::Completed, "{}", st.message);
                assert_eq!(c.images(id).unwrap().len(), 1);
            }
        } else {
            for id in &jobs {
                assert!(
                    matches!(c.poll(id), Err(Error::UnknownJob(_))),
                    "without persistence the jobs are gone"
                );
            }
        }
        // Both ways, the same client and worker serve new jobs on the restarted server.
        let fresh = c.submit(req("after", 2, 99), sketch_bytes()).unwrap();
        assert_eq!(c.wait(&fresh, LONG).unwrap().state, JobState::Completed);
        worker.shutdown();
        if persistent {
            // At least once: the job that ran during the restart may have run twice (its first run's result
            // could not be recorded), never less than once.
            assert!(
                executions.load(Ordering::SeqCst) > jobs.len(),
                "each job, and the fresh one, ran"
            );
        }
        let _ = std::fs::remove_dir_all(out);
    }
}

/// The no-op generator (5 ms steps), counting its runs.
struct Counted(Arc<AtomicUsize>);

impl Generator for Counted {
    fn output_size(&self, req: &GenerationRequest, sketch: &Sketch) -> sketchx::Result<(u32, u32)> {
        Ok(sketch.target_size(req.width, req.height))
    }

    fn generate(
        &self,
        req: &GenerationRequest,
        _: &Sketch,
        observer: &mut dyn FnMut(&StepInfo) -> bool,
    ) -> sketchx::Result<Generated> {
        self.0.fetch_add(1, Ordering::SeqCst);
        noop_generate(req, 5, observer)
    }
}

#[test]
fn a_worker_and_a_client_in_one_process_share_the_queue_with_other_processes() {
    let Some(url) = redis_url("worker_and_client_in_one_process") else {
        return;
    };
    let p = prefix("both");
    let out = scratch_dir("redis-both");
    let both = local_worker(&url, &p, Mode::Noop { step_ms: 1 }, &out);
    assert!(both.is_worker());
    let id = both.submit(req("x", 2, 4), sketch_bytes()).unwrap();
    let st = client(&url, &p).wait(&id, LONG).unwrap();
    assert_eq!(st.state, JobState::Completed);
    // Shutting a worker down leaves queued jobs for the others (the queue is shared).
    both.shutdown();
    let c = client(&url, &p);
    let waiting = c.submit(req("y", 2, 5), sketch_bytes()).unwrap();
    assert_eq!(c.poll(&waiting).unwrap().state, JobState::Queued);
    let other = local_worker(&url, &p, Mode::Noop { step_ms: 1 }, &out);
    assert_eq!(c.wait(&waiting, LONG).unwrap().state, JobState::Completed);
    other.shutdown();
    let _ = std::fs::remove_dir_all(out);
}

/// An img2img request with its own start image and canny preprocessing travels through Redis whole: the worker's
/// image equals the engine's for the same request.
#[test]
fn img2img_and_canny_requests_travel_through_redis_with_their_start_image() {
    let Some(url) = redis_url("img2img") else {
        return;
    };
    let p = prefix("img2img");
    let out = scratch_dir("redis-img2img");
    let engine = Engine::load(&engine_config()).unwrap();
    let worker = local_worker(&url, &p, Mode::Engine(engine), &out);
    let start = std::fs::read(fixtures().join("sketches/house_colour_alt.png")).unwrap();
    let sketch = std::fs::read(fixtures().join("sketches/house_colour.png")).unwrap();
    let request = GenerationRequest {
        start_image: Some(StartImage::decode(&start).unwrap()),
        strength: 0.6,
        preprocess: Preprocess::Canny,
        canny_low_threshold: 50,
        canny_high_threshold: 120,
        ..req("a house", 4, 9)
    };
    let c = client(&url, &p);
    let id = c.submit(request.clone(), sketch.clone()).unwrap();
    let st = c.wait(&id, LONG).unwrap();
    assert_eq!(st.state, JobState::Completed, "{:?}", st.message);
    // int(4 * 0.6) = 2 steps ran.
    assert_eq!(st.total_steps, 2);
    let png = c.images(&id).unwrap();
    let direct = Engine::load(&engine_config())
        .unwrap()
        .generate(&request, &Sketch::decode(&sketch).unwrap(), &mut |_| true)
        .unwrap();
    assert_eq!(decode_png(&png[0]), direct.images[0]);
    worker.shutdown();
    let _ = std::fs::remove_dir_all(out);
}
