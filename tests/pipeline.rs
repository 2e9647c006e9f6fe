//! The job pipeline on the tiny fixture models: concurrency, cancellation, queue limits, fault isolation,
//! cleanup and shutdown. Only the fault-injection tests wrap the real engine in a generator that panics or fails.

mod common;
use common::*;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use sketchx::engine::{Engine, EngineConfig, Generated, StepInfo};
use sketchx::pipeline::Generator;
use sketchx::request::GenerationRequest;
use sketchx::sketch::Sketch;
use sketchx::{Error, JobId, JobState, JobStatus, Pipeline, PipelineConfig, ShutdownPolicy};

fn out_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sketchx-pipeline-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn config(name: &str) -> PipelineConfig {
    let f = fixtures();
    let mut c = PipelineConfig::new(
        f.join("tiny-sd").to_str().unwrap(),
        f.join("tiny-controlnet").to_str().unwrap(),
    )
    .unwrap();
    c.output_dir = out_dir(name);
    c.cleanup_interval = None;
    c
}

fn sketch_bytes() -> Vec<u8> {
    std::fs::read(fixtures().join("sketches/house_black_on_white.png")).unwrap()
}

fn req(steps: u32) -> GenerationRequest {
    GenerationRequest {
        prompt: Some("a house".into()),
        steps,
        width: Some(64),
        height: Some(64),
        seed: Some(1),
        ..Default::default()
    }
}

/// A job that runs for many seconds (150 steps at 256x256), to be cancelled or to block the worker.
fn long_req() -> GenerationRequest {
    GenerationRequest {
        width: Some(256),
        height: Some(256),
        ..req(150)
    }
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_job_completes_with_the_original_json_shape() {
    let cfg = config("basic");
    let dir = cfg.output_dir.clone();
    let pipe = Pipeline::new(cfg).unwrap();
    let mut r = req(3);
    r.num_images = 2;
    let id = pipe.submit(r, sketch_bytes()).unwrap();
    assert_eq!(id.as_str().len(), 32);
    let st = pipe.wait(&id, Some(Duration::from_secs(60))).unwrap();
    assert_eq!(st.state, JobState::Completed, "{}", st.message);
    assert_eq!(st.progress, 100.0);
    assert_eq!(st.message, "Task completed successfully.");
    assert_eq!(st.images.len(), 2);
    assert_eq!((st.step, st.total_steps, st.seed), (3, 3, 1));
    for p in &st.images {
        assert!(p.starts_with(&dir) && p.is_file(), "{p:?}");
        let img = image::open(p).unwrap();
        assert_eq!((img.width(), img.height()), (64, 64));
    }
    let json: serde_json::Value = serde_json::from_str(&st.to_json()).unwrap();
    for key in ["job_id", "status", "progress", "images", "message"] {
        assert!(json.get(key).is_some(), "missing {key} in {json}");
    }
    assert_eq!(json["status"], "completed");
    assert_eq!(json["job_id"], id.as_str());
    // The same request through the engine directly gives the same pixels.
    let engine = Engine::load(
        &EngineConfig::new(
            fixtures().join("tiny-sd").to_str().unwrap(),
            fixtures().join("tiny-controlnet").to_str().unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    let mut r = req(3);
    r.num_images = 2;
    let direct = engine
        .generate(&r, &Sketch::decode(&sketch_bytes()).unwrap(), &mut |_| true)
        .unwrap();
    let written = image::open(&st.images[1]).unwrap().to_rgb8();
    assert_eq!(written.as_raw(), &direct.images[1]);
    pipe.shutdown();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_input_is_refused_at_submit_and_nothing_is_queued() {
    let cfg = config("bad");
    let dir = cfg.output_dir.clone();
    let pipe = Pipeline::new(cfg).unwrap();
    let err = pipe
        .submit(GenerationRequest { steps: 0, ..req(1) }, sketch_bytes())
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidRequest { field: "steps", .. }),
        "{err}"
    );
    let err = pipe.submit(req(1), b"not an image".to_vec()).unwrap_err();
    assert!(matches!(err, Error::InvalidSketch(_)), "{err}");
    let err = pipe.submit(req(1), Vec::<u8>::new()).unwrap_err();
    assert!(
        matches!(err, Error::InvalidSketch(sketchx::SketchError::Empty)),
        "{err}"
    );
    assert_eq!(pipe.queued(), 0);
    // Unknown ids: well-formed but never issued, and malformed.
    let never = JobId::random();
    assert!(matches!(pipe.poll(&never), Err(Error::UnknownJob(_))));
    assert!(matches!(pipe.cancel(&never), Err(Error::UnknownJob(_))));
    assert!(matches!(pipe.wait(&never, None), Err(Error::UnknownJob(_))));
    assert!(matches!(pipe.preview(&never), Err(Error::UnknownJob(_))));
    assert!(matches!(
        "../etc/passwd".parse::<JobId>(),
        Err(Error::UnknownJob(_))
    ));
    assert!(files_in(&dir).is_empty());
    drop(pipe);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn many_threads_submit_and_every_job_completes_exactly_once_without_going_backwards() {
    let mut cfg = config("many");
    let dir = cfg.output_dir.clone();
    cfg.queue_capacity = 256;
    cfg.preview_every = 0;
    let finals: Arc<Mutex<HashMap<JobId, usize>>> = Arc::default();
    let last_seen: Arc<Mutex<HashMap<JobId, (u8, f64)>>> = Arc::default();
    let regressions = Arc::new(AtomicUsize::new(0));
    {
        let (finals, last_seen, regressions) =
            (finals.clone(), last_seen.clone(), regressions.clone());
        cfg.on_event = Some(Arc::new(move |s: &JobStatus| {
            let mut seen = last_seen.lock().unwrap();
            let prev = seen.insert(s.job_id.clone(), (s.state.rank(), s.progress));
            if let Some((rank, progress)) = prev {
                if s.state.rank() < rank || s.progress < progress {
                    regressions.fetch_add(1, Ordering::SeqCst);
                }
                if s.state.is_terminal() && rank == 2 {
                    return; // repeated final snapshots are not new completions
                }
            }
            if s.state.is_terminal() {
                *finals.lock().unwrap().entry(s.job_id.clone()).or_default() += 1;
            }
        }));
    }
    let pipe = Pipeline::new(cfg).unwrap();
    let bytes = Arc::new(sketch_bytes());
    let submitted: Arc<Mutex<Vec<JobId>>> = Arc::default();
    let ids: Vec<JobId> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let (pipe, bytes, submitted) = (pipe.clone(), bytes.clone(), submitted.clone());
                s.spawn(move || {
                    for i in 0..25 {
                        let r = GenerationRequest {
                            seed: Some(t * 100 + i),
                            ..req(1)
                        };
                        let id = pipe.submit(r, bytes.as_slice()).unwrap();
                        submitted.lock().unwrap().push(id);
                    }
                })
            })
            .collect();
        // A poller checking that statuses never go backwards while the jobs run.
        let poller = {
            let (pipe, submitted) = (pipe.clone(), submitted.clone());
            s.spawn(move || {
                let mut seen: HashMap<JobId, (u8, f64)> = HashMap::new();
                let deadline = Instant::now() + Duration::from_secs(300);
                loop {
                    let ids: Vec<JobId> = submitted.lock().unwrap().clone();
                    let mut done = 0;
                    for id in &ids {
                        let st = pipe.poll(id).unwrap();
                        if let Some(&(rank, progress)) = seen.get(id) {
                            assert!(
                                st.state.rank() >= rank && st.progress >= progress,
                                "{st:?} went backwards"
                            );
                        }
                        seen.insert(id.clone(), (st.state.rank(), st.progress));
                        done += usize::from(st.state.is_terminal());
                    }
                    if done == 200 || Instant::now() > deadline {
                        return seen.len();
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(poller.join().unwrap(), 200, "the poller saw every job");
        submitted.lock().unwrap().clone()
    });
    assert_eq!(ids.len(), 200);
    for id in &ids {
        let st = pipe.wait(id, Some(Duration::from_secs(300))).unwrap();
        assert_eq!(st.state, JobState::Completed, "{}", st.message);
        assert_eq!(st.images.len(), 1);
    }
    let finals = finals.lock().unwrap();
    assert_eq!(finals.len(), 200, "every job reported a final state");
    assert!(
        finals.values().all(|&n| n == 1),
        "a job completed more than once"
    );
    assert_eq!(
        regressions.load(Ordering::SeqCst),
        0,
        "a status went backwards"
    );
    assert_eq!(files_in(&dir).len(), 200);
    drop(pipe);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn cancel_while_queued_and_while_running_leaves_no_files() {
    let mut cfg = config("cancel");
    let dir = cfg.output_dir.clone();
    let step_times: Arc<Mutex<Vec<(usize, Instant)>>> = Arc::default();
    {
        let step_times = step_times.clone();
        cfg.on_event = Some(Arc::new(move |s: &JobStatus| {
            if s.state == JobState::Running {
                step_times.lock().unwrap().push((s.step, Instant::now()));
            }
        }));
    }
    let pipe = Pipeline::new(cfg).unwrap();
    let running = pipe.submit(long_req(), sketch_bytes()).unwrap();
    while pipe.poll(&running).unwrap().state == JobState::Queued {
        std::thread::sleep(Duration::from_millis(2));
    }
    let queued = pipe.submit(req(2), sketch_bytes()).unwrap();
    assert_eq!(pipe.poll(&queued).unwrap().queue_position, Some(1));
    assert!(pipe.cancel(&queued).unwrap());
    let st = pipe.poll(&queued).unwrap();
    assert_eq!(
        st.state,
        JobState::Cancelled,
        "a queued job is cancelled at once"
    );
    assert_eq!(pipe.queued(), 0);

    // Let the running job take a few steps, then cancel it and measure how many steps it still takes.
    while pipe.poll(&running).unwrap().step < 3 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let asked = Instant::now();
    assert!(pipe.cancel(&running).unwrap());
    let st = pipe.wait(&running, Some(Duration::from_secs(120))).unwrap();
    let latency = asked.elapsed();
    assert_eq!(st.state, JobState::Cancelled);
    assert!(st.images.is_empty());
    let times = step_times.lock().unwrap();
    let steps_after = times
        .iter()
        .filter(|(_, t)| *t > asked)
        .map(|(s, _)| *s)
        .collect::<Vec<_>>();
    assert!(
        steps_after.len() <= 1,
        "the job went on for {} steps after cancel",
        steps_after.len()
    );
    let step = times.windows(2).map(|w| w[1].1 - w[0].1).max().unwrap();
    eprintln!("cancel latency {latency:?}, longest step {step:?}");
    assert!(
        !pipe.cancel(&running).unwrap(),
        "cancelling a finished job reports false"
    );
    assert!(
        files_in(&dir).is_empty(),
        "no files left: {:?}",
        files_in(&dir)
    );
    drop(pipe);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_full_queue_says_so_at_once() {
    let mut cfg = config("full");
    let dir = cfg.output_dir.clone();
    cfg.queue_capacity = 2;
    let pipe = Pipeline::new(cfg).unwrap();
    let first = pipe.submit(long_req(), sketch_bytes()).unwrap();
    while pipe.poll(&first).unwrap().state == JobState::Queued {
        std::thread::sleep(Duration::from_millis(2));
    }
    let a = pipe.submit(req(1), sketch_bytes()).unwrap();
    let b = pipe.submit(req(1), sketch_bytes()).unwrap();
    let t = Instant::now();
    let err = pipe.submit(req(1), sketch_bytes()).unwrap_err();
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "a full queue must not block"
    );
    assert!(matches!(err, Error::QueueFull { capacity: 2 }), "{err}");
    // Cancelling a queued job frees its place at once.
    pipe.cancel(&a).unwrap();
    let c = pipe.submit(req(1), sketch_bytes()).unwrap();
    assert_eq!(pipe.poll(&b).unwrap().queue_position, Some(1));
    assert_eq!(pipe.poll(&c).unwrap().queue_position, Some(2));
    pipe.cancel(&first).unwrap();
    for id in [&b, &c] {
        assert_eq!(
            pipe.wait(id, Some(Duration::from_secs(60))).unwrap().state,
            JobState::Completed
        );
    }
    drop(pipe);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Fault injection: the real engine, except that a prompt of "PANIC" panics mid-run, "FAIL" errors and "SHORT"
/// returns one image fewer than asked.
struct Faulty(Engine);

impl Generator for Faulty {
    fn output_size(&self, req: &GenerationRequest, sketch: &Sketch) -> sketchx::Result<(u32, u32)> {
        self.0.output_size(req, sketch)
    }
    fn generate(
        &self,
        req: &GenerationRequest,
        sketch: &Sketch,
        observer: &mut dyn FnMut(&StepInfo) -> bool,
    ) -> sketchx::Result<Generated> {
        let mode = req.prompt.clone().unwrap_or_default();
        if mode == "SHORT" {
            // A generator that silently returns fewer images than asked (the old service's failure mode).
            let mut g = self.0.generate(req, sketch, observer)?;
            g.images.pop();
            return Ok(g);
        }
        self.0
            .generate(req, sketch, &mut |s| {
                if s.step == 2 && mode == "PANIC" {
                    panic!("injected panic at step 2");
                }
                if s.step == 2 && mode == "FAIL" {
                    return false;
                }
                observer(s)
            })
            .map_err(|e| {
                if mode == "FAIL" {
                    Error::JobFailed("injected failure".into())
                } else {
                    e
                }
            })
    }
}

#[test]
fn a_panic_or_error_fails_only_its_job_and_the_next_job_runs() {
    let cfg = config("faults");
    let dir = cfg.output_dir.clone();
    let engine = Engine::load(&cfg.engine).unwrap();
    let pipe = Pipeline::with_generator(Arc::new(Faulty(engine)), cfg).unwrap();
    let bad = pipe
        .submit(
            GenerationRequest {
                prompt: Some("PANIC".into()),
                ..req(4)
            },
            sketch_bytes(),
        )
        .unwrap();
    let failing = pipe
        .submit(
            GenerationRequest {
                prompt: Some("FAIL".into()),
                ..req(4)
            },
            sketch_bytes(),
        )
        .unwrap();
    let short = pipe
        .submit(
            GenerationRequest {
                prompt: Some("SHORT".into()),
                num_images: 2,
                ..req(2)
            },
            sketch_bytes(),
        )
        .unwrap();
    let good = pipe.submit(req(2), sketch_bytes()).unwrap();
    let st = pipe.wait(&short, Some(Duration::from_secs(60))).unwrap();
    assert_eq!(
        st.state,
        JobState::Failed,
        "fewer images than asked is a failure, never a completion"
    );
    assert!(st.message.contains("1 of 2"), "{}", st.message);
    let st = pipe.wait(&bad, Some(Duration::from_secs(60))).unwrap();
    assert_eq!(st.state, JobState::Failed);
    assert!(st.message.contains("injected panic"), "{}", st.message);
    assert!(st.images.is_empty());
    let st = pipe.wait(&failing, Some(Duration::from_secs(60))).unwrap();
    assert_eq!(st.state, JobState::Failed);
    assert!(st.message.contains("injected failure"), "{}", st.message);
    let st = pipe.wait(&good, Some(Duration::from_secs(60))).unwrap();
    assert_eq!(st.state, JobState::Completed, "{}", st.message);
    assert_eq!(
        files_in(&dir).len(),
        1,
        "only the good job wrote files: {:?}",
        files_in(&dir)
    );
    drop(pipe);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn progress_eta_and_previews_while_running() {
    let mut cfg = config("progress");
    let dir = cfg.output_dir.clone();
    cfg.preview_every = 2;
    let pipe = Pipeline::new(cfg).unwrap();
    let id = pipe
        .submit(
            GenerationRequest {
                width: Some(128),
                height: Some(128),
                ..req(40)
            },
            sketch_bytes(),
        )
        .unwrap();
    let mut saw_eta = false;
    let mut saw_preview = false;
    let mut last = 0.0;
    loop {
        let st = pipe.poll(&id).unwrap();
        assert!(st.progress >= last);
        last = st.progress;
        if st.state == JobState::Running {
            assert!(st.progress < 100.0);
            saw_eta |= st.eta_secs.is_some_and(|e| e > 0.0);
            if let Some(p) = pipe.preview(&id).unwrap() {
                assert_eq!((p.width, p.height), (16, 16));
                assert_eq!(p.rgb.len(), 16 * 16 * 3);
                assert!(p.step >= 2);
                saw_preview = true;
            }
        }
        if st.state.is_terminal() {
            assert_eq!(st.state, JobState::Completed);
            assert_eq!(st.progress, 100.0);
            break;
        }
        std::thread::sleep(Duration::from_millis(3));
    }
    assert!(
        saw_eta && saw_preview,
        "eta {saw_eta}, preview {saw_preview}"
    );
    let err = pipe
        .wait(
            &pipe.submit(req(60), sketch_bytes()).unwrap(),
            Some(Duration::from_millis(1)),
        )
        .unwrap_err();
    assert!(matches!(err, Error::Timeout(_)), "{err}");
    drop(pipe);
    std::fs::remove_dir_all(dir).unwrap();
}

fn age(path: &Path, secs: u64) {
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs(secs))
        .unwrap();
}

#[test]
fn cleanup_removes_only_own_old_files_and_forgets_their_jobs() {
    let mut cfg = config("cleanup");
    let dir = cfg.output_dir.clone();
    cfg.retention = Duration::from_secs(3600);
    let pipe = Pipeline::new(cfg).unwrap();
    let old = pipe.submit(req(1), sketch_bytes()).unwrap();
    let fresh = pipe.submit(req(1), sketch_bytes()).unwrap();
    for id in [&old, &fresh] {
        pipe.wait(id, Some(Duration::from_secs(60))).unwrap();
    }
    let old_file = pipe.poll(&old).unwrap().images[0].clone();
    age(&old_file, 7200);
    // A file from an earlier run of the pipeline (same naming, not in the table), aged.
    let orphan = dir.join(format!("{}_0.png", JobId::random()));
    std::fs::write(&orphan, b"png").unwrap();
    age(&orphan, 7200);
    // A leftover temporary of an interrupted write, aged.
    let tmp = dir.join(format!(".{}_0.png.tmp-1234", JobId::random()));
    std::fs::write(&tmp, b"partial").unwrap();
    age(&tmp, 7200);
    // A foreign file, aged: never touched.
    let foreign = dir.join("notes.txt");
    std::fs::write(&foreign, b"mine").unwrap();
    age(&foreign, 7200);
    // A symlink named like our output pointing outside the directory, aged target: neither it nor its target go.
    let outside = out_dir("cleanup-outside");
    std::fs::create_dir_all(&outside).unwrap();
    let target = outside.join("precious.png");
    std::fs::write(&target, b"precious").unwrap();
    age(&target, 7200);
    let link = dir.join(format!("{}_0.png", JobId::random()));
    std::os::unix::fs::symlink(&target, &link).unwrap();

    // The old job finished just now, so its file is still protected although its mtime is old.
    let report = pipe.cleanup().unwrap();
    assert_eq!(report.files_removed, 2, "{report:?}"); // the orphan and the temporary
    assert!(old_file.exists());
    // With a max age of zero every finished job counts as old.
    let report = pipe.cleanup_older_than(Duration::ZERO).unwrap();
    assert!(!old_file.exists());
    assert_eq!(report.jobs_forgotten, 2, "{report:?}");
    assert!(report.bytes_removed > 0);
    assert!(
        matches!(pipe.poll(&old), Err(Error::UnknownJob(_))),
        "a cleaned job is forgotten"
    );
    assert!(foreign.exists(), "foreign files are never touched");
    assert!(
        target.exists() && std::fs::symlink_metadata(&link).is_ok(),
        "symlinks are not followed or removed"
    );
    drop(pipe);
    std::fs::remove_dir_all(dir).unwrap();
    std::fs::remove_dir_all(outside).unwrap();
}

#[test]
fn shutdown_while_a_job_runs_cancels_it_and_joins_every_thread() {
    let cfg = config("shutdown");
    let dir = cfg.output_dir.clone();
    let pipe = Pipeline::new(cfg).unwrap();
    let running = pipe.submit(long_req(), sketch_bytes()).unwrap();
    let queued = pipe.submit(req(1), sketch_bytes()).unwrap();
    while pipe.poll(&running).unwrap().step < 1 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let t = Instant::now();
    pipe.shutdown();
    eprintln!("shutdown took {:?}", t.elapsed());
    assert_eq!(pipe.poll(&running).unwrap().state, JobState::Cancelled);
    assert_eq!(pipe.poll(&queued).unwrap().state, JobState::Cancelled);
    assert!(matches!(
        pipe.submit(req(1), sketch_bytes()),
        Err(Error::ShutDown)
    ));
    pipe.shutdown(); // idempotent
    assert!(files_in(&dir).is_empty());
    drop(pipe);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn drain_policy_finishes_queued_jobs_before_stopping() {
    let mut cfg = config("drain");
    let dir = cfg.output_dir.clone();
    cfg.shutdown = ShutdownPolicy::Drain;
    let pipe = Pipeline::new(cfg).unwrap();
    let ids: Vec<JobId> = (0..3)
        .map(|_| pipe.submit(req(2), sketch_bytes()).unwrap())
        .collect();
    pipe.shutdown();
    for id in &ids {
        assert_eq!(pipe.poll(id).unwrap().state, JobState::Completed);
    }
    drop(pipe);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_background_sweeper_runs_on_its_interval() {
    let mut cfg = config("sweeper");
    let dir = cfg.output_dir.clone();
    cfg.cleanup_interval = Some(Duration::from_millis(50));
    cfg.retention = Duration::from_secs(3600);
    std::fs::create_dir_all(&dir).unwrap();
    let orphan = dir.join(format!("{}_0.png", JobId::random()));
    std::fs::write(&orphan, b"png").unwrap();
    age(&orphan, 7200);
    let pipe = Pipeline::new(cfg).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while orphan.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!orphan.exists(), "the sweeper removed the old file");
    drop(pipe);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn pipeline_is_send_sync_and_clone() {
    fn assert_traits<T: Send + Sync + Clone>() {}
    assert_traits::<Pipeline>();
}

/// A generator for the cancel race: a job whose prompt is `block` waits inside `generate` until the test
/// releases it (so the next job is picked up exactly when the test lets go); a job whose prompt is `victim`
/// waits until the test's cancel call has returned (so that a busy machine cannot finish it before the cancel
/// lands); any job then reports one step and returns one black 64x64 image.
struct Gate {
    started: std::sync::mpsc::SyncSender<()>,
    release: Mutex<std::sync::mpsc::Receiver<()>>,
    cancel_returned: Arc<std::sync::atomic::AtomicBool>,
}

impl Generator for Gate {
    fn output_size(&self, _: &GenerationRequest, _: &Sketch) -> sketchx::Result<(u32, u32)> {
        Ok((64, 64))
    }

    fn generate(
        &self,
        req: &GenerationRequest,
        _: &Sketch,
        observer: &mut dyn FnMut(&StepInfo) -> bool,
    ) -> sketchx::Result<Generated> {
        if req.prompt.as_deref() == Some("block") {
            self.started.send(()).unwrap();
            self.release.lock().unwrap().recv().unwrap();
        }
        if req.prompt.as_deref() == Some("victim") {
            while !self
                .cancel_returned
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let info = StepInfo {
            step: 1,
            total_steps: 1,
            decoded: 0,
            num_images: 1,
            latents: None,
            x0: None,
        };
        if !observer(&info) {
            return Err(Error::Cancelled);
        }
        Ok(Generated {
            seed: req.seed.unwrap_or_default(),
            width: 64,
            height: 64,
            images: vec![vec![0; 64 * 64 * 3]],
        })
    }
}

/// Regression: `cancel` used to look at a queued job, let go of the table's lock and mark it cancelled under a
/// second lock; a worker that started the job in between ran it to the end with its files left on disk, while
/// the job said cancelled. Each round here releases the job ahead of the victim at the same moment as a cancel
/// of the victim, so the worker picks the victim up while the cancel is in flight. Whatever the interleaving, a
/// cancel that says `true` must end in `cancelled` with no files.
#[test]
fn cancel_racing_the_worker_picking_the_job_up_never_leaves_a_cancelled_job_with_files() {
    let cfg = config("cancel-race");
    let dir = cfg.output_dir.clone();
    let (started_tx, started) = std::sync::mpsc::sync_channel(1);
    let (release, release_rx) = std::sync::mpsc::channel();
    let cancel_returned = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gate = Gate {
        started: started_tx,
        release: Mutex::new(release_rx),
        cancel_returned: cancel_returned.clone(),
    };
    let pipe = Pipeline::with_generator(Arc::new(gate), cfg).unwrap();
    let blocker = |pipe: &Pipeline| {
        let r = GenerationRequest {
            prompt: Some("block".into()),
            ..req(1)
        };
        pipe.submit(r, sketch_bytes()).unwrap()
    };
    let mut picked_up_then_cancelled = 0;
    for _ in 0..100 {
        cancel_returned.store(false, std::sync::atomic::Ordering::SeqCst);
        let ahead = blocker(&pipe);
        started.recv().unwrap(); // the worker is inside the job ahead
        let victim_req = GenerationRequest {
            prompt: Some("victim".into()),
            ..req(1)
        };
        let victim = pipe.submit(victim_req, sketch_bytes()).unwrap();
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let canceller = {
            let (pipe, victim, barrier) = (pipe.clone(), victim.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                pipe.cancel(&victim).unwrap()
            })
        };
        barrier.wait();
        release.send(()).unwrap();
        let said_cancelled = canceller.join().unwrap();
        cancel_returned.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(said_cancelled, "the victim was not final when cancelled");
        let st = pipe.wait(&victim, Some(Duration::from_secs(60))).unwrap();
        assert_eq!(st.state, JobState::Cancelled, "{}", st.message);
        assert!(st.images.is_empty());
        if st.started_at.is_some() {
            picked_up_then_cancelled += 1;
        }
        let ahead = pipe.wait(&ahead, Some(Duration::from_secs(60))).unwrap();
        assert_eq!(ahead.state, JobState::Completed, "{}", ahead.message);
        let victims_files: Vec<String> = files_in(&dir)
            .into_iter()
            .filter(|f| f.contains(victim.as_str()))
            .collect();
        assert!(victims_files.is_empty(), "{victims_files:?}");
    }
    eprintln!(
        "{picked_up_then_cancelled} of 100 victims were cancelled after the worker picked them up"
    );
    drop(pipe);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Regression: events came on the thread of each change, so a callback slow on the submitting thread delivered a
/// job's `queued` after the worker's `running` (and calls overlapped). They now come one at a time, in order.
#[test]
fn events_arrive_in_order_one_at_a_time_even_from_a_slow_callback() {
    let mut cfg = config("event-order");
    let dir = cfg.output_dir.clone();
    cfg.preview_every = 0;
    let seen: Arc<Mutex<Vec<(JobId, JobState)>>> = Arc::default();
    let inside = Arc::new(AtomicUsize::new(0));
    let overlaps = Arc::new(AtomicUsize::new(0));
    {
        let (seen, inside, overlaps) = (seen.clone(), inside.clone(), overlaps.clone());
        cfg.on_event = Some(Arc::new(move |s: &JobStatus| {
            if inside.fetch_add(1, Ordering::SeqCst) > 0 {
                overlaps.fetch_add(1, Ordering::SeqCst);
            }
            if s.state == JobState::Queued || s.state.is_terminal() {
                // A slow consumer (a network hop, a UI) while the worker takes the job up, and when it ends.
                std::thread::sleep(Duration::from_millis(150));
            }
            seen.lock().unwrap().push((s.job_id.clone(), s.state));
            inside.fetch_sub(1, Ordering::SeqCst);
        }));
    }
    let pipe = Pipeline::new(cfg).unwrap();
    let ids: Vec<JobId> = (0..3)
        .map(|i| {
            let r = GenerationRequest {
                seed: Some(i),
                ..req(2)
            };
            pipe.submit(r, sketch_bytes()).unwrap()
        })
        .collect();
    for id in &ids {
        let st = pipe.wait(id, Some(Duration::from_secs(120))).unwrap();
        assert_eq!(st.state, JobState::Completed, "{}", st.message);
    }
    // `wait` returns only once the callback has seen the final state, however slow it is.
    let seen = seen.lock().unwrap();
    assert_eq!(
        seen.iter().filter(|(_, s)| s.is_terminal()).count(),
        ids.len(),
        "wait returned before the final events: {seen:?}"
    );
    for id in &ids {
        let states: Vec<JobState> = seen
            .iter()
            .filter(|(j, _)| j == id)
            .map(|(_, s)| *s)
            .collect();
        // (A snapshot is the state when it is taken: a job the worker took up at once may show no `queued`.)
        assert_eq!(states.last(), Some(&JobState::Completed), "{states:?}");
        assert!(
            states.windows(2).all(|w| w[0].rank() <= w[1].rank()),
            "{id}: events out of order: {states:?}"
        );
    }
    assert_eq!(
        overlaps.load(Ordering::SeqCst),
        0,
        "callback calls overlapped"
    );
    drop(pipe);
    let _ = std::fs::remove_dir_all(dir);
}
