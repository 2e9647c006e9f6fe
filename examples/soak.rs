//! Soak run of the job pipeline through the Rust API: many small jobs from several threads, a bounded queue
//! (`QueueFull` is retried), random cancels of queued and of running jobs, and the checks a long-running service
//! needs: no job lost, every job exactly one final state and never going backwards (seen by the event callback
//! and by a poller), image files exactly for the completed jobs, no temporary file left behind, memory flat
//! (resident set size after the 100th finished job against the end). `scripts/soak` runs it with 1,000 jobs
//! (beside the Python and C soaks); `tests/soak.rs` runs a short one in the test suite.
//!
//! ```text
//! cargo run --release --example soak -- [JOBS [THREADS]]   # default 1000 jobs, 8 threads, tiny fixture models
//! ```
//!
//! Prints one `SOAK binding=rust jobs=... cancels=... completed=... ...` line (what `scripts/soak` tabulates) and
//! exits with 1, naming each broken rule, when a check fails.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sketchx::request::GenerationRequest;
use sketchx::{Error, JobId, JobState, JobStatus, Pipeline, PipelineConfig};

/// What to run.
#[derive(Debug, Clone)]
pub struct Soak {
    /// Jobs in all.
    pub jobs: usize,
    /// Client threads submitting, cancelling and waiting.
    pub threads: usize,
    /// Queue capacity (small, so that `QueueFull` happens and is retried).
    pub queue_capacity: usize,
    /// One job in this many is cancelled right after submission (usually still queued)...
    pub cancel_queued_every: usize,
    /// ...and one in this many once it runs.
    pub cancel_running_every: usize,
    /// The model and ControlNet (directories or Hub ids).
    pub model: String,
    /// See `model`.
    pub controlnet: String,
    /// The sketch file every job uses.
    pub sketch: PathBuf,
    /// Where images go (emptied first).
    pub output_dir: PathBuf,
}

/// What a soak run observed.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Jobs submitted.
    pub jobs: usize,
    /// Cancels asked for (queued and running).
    pub cancels: usize,
    /// Final states.
    pub completed: usize,
    /// See `completed`.
    pub failed: usize,
    /// See `completed`.
    pub cancelled: usize,
    /// Submissions refused with `QueueFull` and retried.
    pub queue_full: usize,
    /// Wall time of the whole run.
    pub wall: Duration,
    /// VmRSS in KiB after the 100th finished job (or the first tenth of a shorter run) and at the end.
    pub rss_early_kib: u64,
    /// See `rss_early_kib`.
    pub rss_end_kib: u64,
    /// Every broken rule, by job.
    pub violations: Vec<String>,
}

impl Report {
    /// The line `scripts/soak` tabulates.
    pub fn line(&self, binding: &str) -> String {
        format!(
            "SOAK binding={binding} jobs={} cancels={} completed={} failed={} cancelled={} queue_full={} \
             wall_s={:.1} rss100_kib={} rss_end_kib={}",
            self.jobs,
            self.cancels,
            self.completed,
            self.failed,
            self.cancelled,
            self.queue_full,
            self.wall.as_secs_f64(),
            self.rss_early_kib,
            self.rss_end_kib
        )
    }
}

/// This process's resident set size in KiB (`VmRSS` of /proc/self/status; 0 where there is none).
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The memory rule: growth between the early and the final measure within 10% plus 8 MiB (allocator slack).
pub fn memory_is_flat(early_kib: u64, end_kib: u64) -> bool {
    end_kib <= early_kib + early_kib / 10 + 8 * 1024
}

/// A small deterministic generator (xorshift) deciding the cancels, so that a failing run can be repeated.
fn pick(seed: u64) -> u64 {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// Runs the soak and checks it; the report lists every violation (empty when all held).
pub fn run(soak: &Soak) -> Result<Report, Error> {
    let _ = std::fs::remove_dir_all(&soak.output_dir);
    let mut cfg = PipelineConfig::new(&soak.model, &soak.controlnet)?;
    cfg.output_dir = soak.output_dir.clone();
    cfg.queue_capacity = soak.queue_capacity;
    cfg.cleanup_interval = None;
    cfg.preview_every = 0;

    // Per job: the last rank an event showed and how many final events came.
    type Seen = HashMap<JobId, (u8, Option<JobState>, usize)>;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let violations: Arc<Mutex<Vec<String>>> = Arc::default();
    {
        let (seen, violations) = (seen.clone(), violations.clone());
        cfg.on_event = Some(Arc::new(move |s: &JobStatus| {
            let mut seen = seen.lock().unwrap();
            let entry = seen.entry(s.job_id.clone()).or_insert((0, None, 0));
            if s.state.rank() < entry.0 {
                violations.lock().unwrap().push(format!(
                    "{}: event {} after a later state",
                    s.job_id, s.state
                ));
            }
            if s.state.is_terminal() {
                match entry.1 {
                    Some(first) if first != s.state => {
                        violations.lock().unwrap().push(format!(
                            "{}: final state {} after final state {first}",
                            s.job_id, s.state
                        ));
                    }
                    Some(_) => {}
                    None => {
                        entry.1 = Some(s.state);
                        entry.2 += 1;
                    }
                }
            }
            entry.0 = entry.0.max(s.state.rank());
        }));
    }
    let pipe = Pipeline::new(cfg)?;
    let sketch = Arc::new(std::fs::read(&soak.sketch).map_err(|e| Error::io(&soak.sketch, e))?);

    let next = AtomicUsize::new(0);
    let finished = AtomicUsize::new(0);
    let rss_early = AtomicU64::new(0);
    let early_at = 100.min(soak.jobs.div_ceil(10)).max(1);
    let (cancels, queue_full) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let finals: Mutex<Vec<JobStatus>> = Mutex::new(Vec::with_capacity(soak.jobs));
    let started = Instant::now();
    let result: Result<(), Error> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..soak.threads)
            .map(|_| {
                s.spawn(|| -> Result<(), Error> {
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= soak.jobs {
                            return Ok(());
                        }
                        let req = GenerationRequest {
                            prompt: Some(format!("soak job {n}")),
                            steps: 1 + (n % 2) as u32,
                            width: Some(64),
                            height: Some(64),
                            seed: Some(n as u64),
                            ..GenerationRequest::DEFAULT
                        };
                        let id = loop {
                            match pipe.submit(req.clone(), sketch.as_slice()) {
                                Ok(id) => break id,
                                Err(Error::QueueFull { .. }) => {
                                    queue_full.fetch_add(1, Ordering::Relaxed);
                                    // Back off as a client should (a busy retry loop would steal the worker's CPU).
                                    std::thread::sleep(Duration::from_millis(10));
                                }
                                Err(e) => return Err(e),
                            }
                        };
                        let roll = pick(n as u64) as usize;
                        if roll.is_multiple_of(soak.cancel_queued_every) {
                            cancels.fetch_add(1, Ordering::Relaxed);
                            pipe.cancel(&id)?;
                        } else if (roll / soak.cancel_queued_every)
                            .is_multiple_of(soak.cancel_running_every)
                        {
                            // Wait (briefly) for it to run, then cancel: it may also have finished already.
                            let deadline = Instant::now() + Duration::from_secs(60);
                            while pipe.poll(&id)?.state == JobState::Queued
                                && Instant::now() < deadline
                            {
                                std::thread::sleep(Duration::from_micros(200));
                            }
                            cancels.fetch_add(1, Ordering::Relaxed);
                            pipe.cancel(&id)?;
                        }
                        let st = pipe.wait(&id, Some(Duration::from_secs(300)))?;
                        finals.lock().unwrap().push(st);
                        if finished.fetch_add(1, Ordering::SeqCst) + 1 == early_at {
                            rss_early.store(rss_kib(), Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        // A poller: statuses never go backwards, seen from outside either (a final one stays as it is).
        let poller = s.spawn(|| {
            let mut last: HashMap<JobId, JobState> = HashMap::new();
            let mut broken = Vec::new();
            let mut round = 0usize;
            while finished.load(Ordering::SeqCst) < soak.jobs
                && started.elapsed() < Duration::from_secs(3600)
            {
                round += 1;
                let ids: Vec<JobId> = seen.lock().unwrap().keys().cloned().collect();
                for id in ids {
                    let prev = last.get(&id).copied();
                    if prev.is_some_and(|p| p.is_terminal()) && !round.is_multiple_of(16) {
                        continue; // final ones are rechecked now and then only, to keep the poller light
                    }
                    let Ok(st) = pipe.poll(&id) else {
                        broken.push(format!("{id}: poll failed"));
                        continue;
                    };
                    match prev {
                        Some(p) if st.state.rank() < p.rank() => {
                            broken.push(format!("{id}: poll saw {} after {p}", st.state));
                        }
                        Some(p) if p.is_terminal() && st.state != p => {
                            broken.push(format!("{id}: poll saw {} after final {p}", st.state));
                        }
                        _ => {}
                    }
                    last.insert(id, st.state);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            broken
        });
        for w in workers {
            w.join().expect("a soak thread panicked")?;
        }
        violations
            .lock()
            .unwrap()
            .extend(poller.join().expect("the poller panicked"));
        Ok(())
    });
    result?;
    let wall = started.elapsed();
    let rss_end = rss_kib();

    let finals = finals.into_inner().unwrap();
    let mut report = Report {
        jobs: finals.len(),
        cancels: cancels.into_inner(),
        queue_full: queue_full.into_inner(),
        wall,
        rss_early_kib: rss_early.into_inner(),
        rss_end_kib: rss_end,
        ..Report::default()
    };
    let mut v = std::mem::take(&mut *violations.lock().unwrap());
    if finals.len() != soak.jobs {
        v.push(format!(
            "{} jobs submitted, {} finished",
            soak.jobs,
            finals.len()
        ));
    }
    let seen = seen.lock().unwrap();
    let files = files_in(&soak.output_dir);
    let mut expected_files = Vec::new();
    for st in &finals {
        match st.state {
            JobState::Completed => report.completed += 1,
            JobState::Failed => {
                report.failed += 1;
                v.push(format!("{}: failed: {}", st.job_id, st.message));
            }
            JobState::Cancelled => report.cancelled += 1,
            other => v.push(format!("{}: wait returned {other}", st.job_id)),
        }
        match seen.get(&st.job_id) {
            Some((_, Some(state), 1)) if *state == st.state => {}
            other => v.push(format!(
                "{}: ended {} but its events were {other:?}",
                st.job_id, st.state
            )),
        }
        if st.state == JobState::Completed {
            for p in &st.images {
                if !p.is_file() {
                    v.push(format!(
                        "{}: its image {} is missing",
                        st.job_id,
                        p.display()
                    ));
                }
                expected_files.push(p.file_name().unwrap().to_string_lossy().into_owned());
            }
        }
    }
    expected_files.sort();
    if files != expected_files {
        let extra: Vec<&String> = files
            .iter()
            .filter(|f| !expected_files.contains(f))
            .collect();
        v.push(format!(
            "{} files in {} for {} images of completed jobs; not expected: {extra:?}",
            files.len(),
            soak.output_dir.display(),
            expected_files.len()
        ));
    }
    if !memory_is_flat(report.rss_early_kib, report.rss_end_kib) {
        v.push(format!(
            "memory grew from {} KiB (job {early_at}) to {} KiB (job {})",
            report.rss_early_kib, report.rss_end_kib, soak.jobs
        ));
    }
    report.violations = v;
    drop(pipe);
    Ok(report)
}

/// Every entry of `dir` (hidden temporaries included), sorted.
fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The soak on the tiny fixture models (`SKETCHX_FIXTURES` or the repository's tests/fixtures).
pub fn on_fixtures(jobs: usize, threads: usize, output_dir: PathBuf) -> Soak {
    let fixtures = std::env::var_os("SKETCHX_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures")));
    Soak {
        jobs,
        threads,
        queue_capacity: 4,
        // One job in 20 cancelled while queued, one in 20 once running (19/20 of the rest 1 in 19).
        cancel_queued_every: 20,
        cancel_running_every: 19,
        model: fixtures.join("tiny-sd").to_string_lossy().into_owned(),
        controlnet: fixtures
            .join("tiny-controlnet")
            .to_string_lossy()
            .into_owned(),
        sketch: fixtures.join("sketches/house_black_on_white.png"),
        output_dir,
    }
}

#[allow(dead_code)] // tests/soak.rs includes this file for `run`
fn main() {
    let mut args = std::env::args().skip(1);
    let jobs = args
        .next()
        .map_or(1000, |a| a.parse().expect("JOBS: a number"));
    let threads = args
        .next()
        .map_or(8, |a| a.parse().expect("THREADS: a number"));
    let dir = std::env::temp_dir().join(format!("sketchx-soak-rust-{}", std::process::id()));
    let report = match run(&on_fixtures(jobs, threads, dir.clone())) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("soak: {e}");
            std::process::exit(2);
        }
    };
    let _ = std::fs::remove_dir_all(&dir);
    println!("{}", report.line("rust"));
    if !report.violations.is_empty() {
        for v in report.violations.iter().take(50) {
            eprintln!("VIOLATION: {v}");
        }
        eprintln!("soak: {} violations", report.violations.len());
        std::process::exit(1);
    }
}
