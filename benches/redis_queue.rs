//! Figures of the Redis job store (run by `scripts/redis-figures`, which starts a redis-server and sets
//! `SKETCHX_TEST_REDIS_URL`):
//!
//! 1. jobs per second through the queue with a no-op generator (the store's own overhead) for 1, 2 and 4
//!    workers: the queue is filled first, then the workers start and the clock runs until every job is final;
//! 2. 1,000 jobs from 8 client threads with 4 workers running: every job must be final and completed, and the
//!    generator must have run each exactly once (nothing lost, nothing duplicated);
//! 3. the time from a worker's death (SIGKILL of a worker process mid-job) to its job starting on another worker,
//!    with the default heartbeat settings (10 s / 30 s) and with the tests' (0.1 s / 0.6 s).
//!
//! Workers of figures 1 and 2 are pipelines in this process, each with its own connections and consumer name;
//! the dying worker of figure 3 is this program run again (`SKETCHX_FIGURES_CHILD`).

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sketchx::engine::{EngineConfig, Generated, StepInfo};
use sketchx::pipeline::Generator;
use sketchx::request::GenerationRequest;
use sketchx::sketch::Sketch;
use sketchx::{Error, JobId, JobState, Pipeline, PipelineConfig, RedisConfig, StoreConfig};

/// Runs each job's one step at once and returns one 8x8 image; records when each seed started and how often.
#[derive(Default)]
struct Noop {
    runs: Mutex<HashMap<u64, (usize, Instant)>>,
    stall: bool,
}

impl Generator for Noop {
    fn output_size(&self, req: &GenerationRequest, sketch: &Sketch) -> sketchx::Result<(u32, u32)> {
        Ok(sketch.target_size(req.width, req.height))
    }

    fn generate(
        &self,
        req: &GenerationRequest,
        _: &Sketch,
        observer: &mut dyn FnMut(&StepInfo) -> bool,
    ) -> sketchx::Result<Generated> {
        let seed = req.seed.unwrap_or_default();
        self.runs
            .lock()
            .unwrap()
            .entry(seed)
            .and_modify(|e| e.0 += 1)
            .or_insert((1, Instant::now()));
        let info = StepInfo {
            step: 1,
            total_steps: 1,
            decoded: 0,
            num_images: 1,
            latents: None,
            x0: None,
        };
        let go_on = observer(&info);
        if self.stall {
            println!("stalled");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        if !go_on {
            return Err(Error::Cancelled);
        }
        Ok(Generated {
            seed,
            width: 8,
            height: 8,
            images: vec![vec![0; 8 * 8 * 3]],
        })
    }
}

fn sketch() -> Sketch {
    Sketch::from_rgb8(8, 8, vec![255; 8 * 8 * 3]).unwrap()
}

fn req(seed: u64) -> GenerationRequest {
    GenerationRequest {
        steps: 1,
        width: Some(64),
        height: Some(64),
        seed: Some(seed),
        ..Default::default()
    }
}

fn redis(url: &str, prefix: &str, fast: bool) -> RedisConfig {
    let mut c = RedisConfig::new(url);
    c.prefix = prefix.into();
    c.poll_interval = Duration::from_millis(5);
    if fast {
        c.heartbeat_interval = Duration::from_millis(100);
        c.heartbeat_timeout = Duration::from_millis(600);
    }
    c
}

fn worker(url: &str, prefix: &str, generator: Arc<Noop>, fast: bool) -> Pipeline {
    let mut config = PipelineConfig::with_engine(
        EngineConfig::new("unused/model", "unused/controlnet").unwrap(),
    );
    config.output_dir =
        std::env::temp_dir().join(format!("sketchx-figures-{}", std::process::id()));
    config.cleanup_interval = None;
    config.preview_every = 0;
    config.store = StoreConfig::Redis(redis(url, prefix, fast));
    Pipeline::with_generator(generator, config).unwrap()
}

fn fresh_prefix(what: &str) -> String {
    format!("sketchx-figures-{what}-{}", &JobId::random().as_str()[..8])
}

/// Figure 1: the queue is filled with `jobs` jobs, then `n` workers drain it.
fn throughput(url: &str, n: usize, jobs: u64) -> f64 {
    let prefix = fresh_prefix("throughput");
    let client = Pipeline::connect_with(redis(url, &prefix, true), jobs as usize).unwrap();
    let ids: Vec<JobId> = (0..jobs)
        .map(|i| client.submit(req(i), sketch()).unwrap())
        .collect();
    let generator = Arc::new(Noop::default());
    let start = Instant::now();
    let workers: Vec<Pipeline> = (0..n)
        .map(|_| worker(url, &prefix, generator.clone(), true))
        .collect();
    for id in &ids {
        let st = client.wait(id, Some(Duration::from_secs(600))).unwrap();
        assert_eq!(st.state, JobState::Completed, "{}", st.message);
    }
    let secs = start.elapsed().as_secs_f64();
    for w in workers {
        w.shutdown();
    }
    jobs as f64 / secs
}

/// Figure 2: 1,000 jobs from 8 client threads while 4 workers run; returns (seconds, completed, runs, dupes).
fn thousand(url: &str) -> (f64, usize, usize, usize) {
    let prefix = fresh_prefix("thousand");
    let generator = Arc::new(Noop::default());
    let workers: Vec<Pipeline> = (0..4)
        .map(|_| worker(url, &prefix, generator.clone(), true))
        .collect();
    let start = Instant::now();
    let completed: usize = std::thread::scope(|s| {
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let prefix = prefix.clone();
                s.spawn(move || {
                    let c = Pipeline::connect_with(redis(url, &prefix, true), 1000).unwrap();
                    let ids: Vec<JobId> = (0..125u64)
                        .map(|i| c.submit(req(t * 1000 + i), sketch()).unwrap())
                        .collect();
                    ids.iter()
                        .filter(|id| {
                            c.wait(id, Some(Duration::from_secs(600))).unwrap().state
                                == JobState::Completed
                        })
                        .count()
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).sum()
    });
    let secs = start.elapsed().as_secs_f64();
    for w in workers {
        w.shutdown();
    }
    let runs = generator.runs.lock().unwrap();
    let dupes = runs.values().filter(|(n, _)| *n > 1).count();
    (secs, completed, runs.len(), dupes)
}

/// Figure 3: a worker process takes a job and is killed; seconds until the job starts on this process's worker.
fn death_to_rerun(url: &str, fast: bool) -> f64 {
    let prefix = fresh_prefix("death");
    let client = Pipeline::connect_with(redis(url, &prefix, fast), 10).unwrap();
    let id = client.submit(req(4242), sketch()).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("SKETCHX_FIGURES_CHILD", format!("{url} {prefix} {fast}"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "stalled", "the child took the job");
    let generator = Arc::new(Noop::default());
    let w = worker(url, &prefix, generator.clone(), fast);
    child.kill().unwrap();
    let killed = Instant::now();
    child.wait().unwrap();
    let st = client.wait(&id, Some(Duration::from_secs(600))).unwrap();
    assert_eq!(st.state, JobState::Completed, "{}", st.message);
    let started = generator.runs.lock().unwrap()[&4242].1;
    w.shutdown();
    started.duration_since(killed).as_secs_f64()
}

fn main() {
    if let Ok(spec) = std::env::var("SKETCHX_FIGURES_CHILD") {
        let mut parts = spec.split(' ');
        let (url, prefix, fast) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next() == Some("true"),
        );
        let stall = Arc::new(Noop {
            stall: true,
            ..Default::default()
        });
        let _w = worker(url, prefix, stall, fast);
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    // `cargo bench` passes `--bench`; nothing here takes arguments.
    let Ok(url) = std::env::var("SKETCHX_TEST_REDIS_URL") else {
        eprintln!("SKETCHX_TEST_REDIS_URL is not set: run scripts/redis-figures");
        return;
    };
    println!("1. jobs per second through the queue (no-op generator, 1,000 queued jobs):");
    for n in [1, 2, 4] {
        let rates: Vec<f64> = (0..3).map(|_| throughput(&url, n, 1000)).collect();
        let mut sorted = rates.clone();
        sorted.sort_by(f64::total_cmp);
        println!(
            "   {n} worker(s): {:.0} / {:.0} / {:.0} jobs/s (min / median / max of 3)",
            sorted[0], sorted[1], sorted[2]
        );
    }
    let (secs, completed, runs, dupes) = thousand(&url);
    println!(
        "2. 1,000 jobs from 8 client threads, 4 workers: {secs:.2} s; {completed} completed, {runs} distinct jobs \
         run, {dupes} run more than once"
    );
    for (fast, label) in [
        (true, "heartbeat 0.1 s, timeout 0.6 s"),
        (false, "defaults: 10 s, 30 s"),
    ] {
        let t = death_to_rerun(&url, fast);
        println!(
            "3. worker SIGKILLed mid-job -> job running on another worker: {t:.2} s ({label})"
        );
    }
}
