//! [`Pipeline`]: asynchronous generation jobs inside the host's process — what the original service did with
//! FastAPI + Celery + Redis + Celery Beat. Submit a sketch and get a [`JobId`] at once; poll, wait or cancel it;
//! finished files are removed after the retention period by a background sweeper.
//!
//! ```no_run
//! use std::time::Duration;
//! use sketchx_core::pipeline::{Pipeline, PipelineConfig};
//! use sketchx_core::request::GenerationRequest;
//!
//! let pipe = Pipeline::new(PipelineConfig::default_models()?)?;
//! let req = GenerationRequest { prompt: Some("a red sports car".into()), ..Default::default() };
//! let id = pipe.submit(req, std::path::Path::new("car.png"))?;
//! let status = pipe.wait(&id, Some(Duration::from_secs(600)))?;
//! println!("{}", status.to_json());
//! # Ok::<(), sketchx_core::Error>(())
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{bounded, Sender};

use crate::cleanup::{sweep, CleanupReport};
use crate::engine::{Engine, EngineConfig};
use crate::error::{Error, Result};
use crate::executor::{worker, EventCallback, Generator, Preview, Record, Shared, Table};
use crate::jobs::{messages, JobId, JobState, JobStatus};
use crate::output::PngSettings;
use crate::request::random_seed;
use crate::request::GenerationRequest;
use crate::settings;
use crate::sketch::Sketch;

/// What happens to waiting and running jobs at shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ShutdownPolicy {
    /// Cancel queued jobs and stop the running one at its next step (fast; the default).
    #[default]
    Cancel,
    /// Finish every queued job first.
    Drain,
}

/// How to build a [`Pipeline`].
#[derive(Clone)]
pub struct PipelineConfig {
    /// The models, device and dtype.
    pub engine: EngineConfig,
    /// Where images are written (created if missing). Default `generated`.
    pub output_dir: PathBuf,
    /// Most jobs waiting at once; a submission beyond it is [`Error::QueueFull`]. Default 64.
    pub queue_capacity: usize,
    /// Age after which finished files are deleted. Default one hour.
    pub retention: Duration,
    /// How often the background sweeper runs [`Pipeline::cleanup`]; `None`: never. Default hourly.
    pub cleanup_interval: Option<Duration>,
    /// Called on the worker thread with a snapshot after every change of a job (state, step, decode).
    pub on_event: Option<EventCallback>,
    /// A live preview is computed every this many steps (0: never). Default 5.
    pub preview_every: usize,
    /// What shutdown does with pending work.
    pub shutdown: ShutdownPolicy,
    /// PNG encoder settings.
    pub png: PngSettings,
}

impl std::fmt::Debug for PipelineConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipelineConfig")
            .field("engine", &self.engine)
            .field("output_dir", &self.output_dir)
            .field("queue_capacity", &self.queue_capacity)
            .field("retention", &self.retention)
            .field("cleanup_interval", &self.cleanup_interval)
            .field("on_event", &self.on_event.as_ref().map(|_| "callback"))
            .field("preview_every", &self.preview_every)
            .field("shutdown", &self.shutdown)
            .finish()
    }
}

impl PipelineConfig {
    /// Defaults around the given engine configuration.
    pub fn with_engine(engine: EngineConfig) -> Self {
        Self {
            engine,
            output_dir: PathBuf::from(settings::DEFAULT_OUTPUT_DIR),
            queue_capacity: settings::DEFAULT_QUEUE_CAPACITY,
            retention: Duration::from_secs(settings::DEFAULT_RETENTION_SECS),
            cleanup_interval: settings::DEFAULT_CLEANUP_INTERVAL_SECS.map(Duration::from_secs),
            on_event: None,
            preview_every: settings::DEFAULT_PREVIEW_EVERY,
            shutdown: ShutdownPolicy::Cancel,
            png: PngSettings::default(),
        }
    }

    /// Defaults with the given models (Hub ids or local directories) on the CPU.
    pub fn new(model: &str, controlnet: &str) -> Result<Self> {
        Ok(Self::with_engine(EngineConfig::new(model, controlnet)?))
    }

    /// Defaults with the default models (SD1.5 + scribble ControlNet from the Hub) on the CPU.
    pub fn default_models() -> Result<Self> {
        Ok(Self::with_engine(EngineConfig::default_models()?))
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.queue_capacity == 0 {
            return Err(Error::invalid("queue_capacity", "must be at least 1"));
        }
        if self.cleanup_interval.is_some_and(|d| d.is_zero()) {
            return Err(Error::invalid(
                "cleanup_interval",
                "must be positive (or off)",
            ));
        }
        Ok(())
    }
}

/// A sketch as a caller may hand it over.
#[derive(Debug, Clone)]
pub enum SketchInput {
    /// An image file.
    Path(PathBuf),
    /// An encoded image (PNG, JPEG, WebP, BMP, GIF).
    Bytes(Vec<u8>),
    /// Already decoded.
    Decoded(Sketch),
}

impl SketchInput {
    /// Decodes the sketch (with the default limits).
    pub fn decode(self) -> Result<Sketch> {
        match self {
            SketchInput::Path(p) => Sketch::open(&p),
            SketchInput::Bytes(b) => Sketch::decode(&b),
            SketchInput::Decoded(s) => Ok(s),
        }
    }
}

impl From<&Path> for SketchInput {
    fn from(p: &Path) -> Self {
        SketchInput::Path(p.to_path_buf())
    }
}
impl From<PathBuf> for SketchInput {
    fn from(p: PathBuf) -> Self {
        SketchInput::Path(p)
    }
}
impl From<Vec<u8>> for SketchInput {
    fn from(b: Vec<u8>) -> Self {
        SketchInput::Bytes(b)
    }
}
impl From<&[u8]> for SketchInput {
    fn from(b: &[u8]) -> Self {
        SketchInput::Bytes(b.to_vec())
    }
}
impl From<Sketch> for SketchInput {
    fn from(s: Sketch) -> Self {
        SketchInput::Decoded(s)
    }
}

struct Inner {
    shared: Arc<Shared>,
    generator: Arc<dyn Generator>,
    doorbell: Sender<()>,
    stop_sweeper: Mutex<Option<Sender<()>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    capacity: usize,
    retention: Duration,
    drain: bool,
}

/// The sketch-to-image job pipeline: models loaded once, a worker thread running jobs, a job table, and a
/// retention sweeper. `Send + Sync` and cheap to clone (a handle): share one between threads or requests.
/// Shutdown happens on [`Pipeline::shutdown`] or when the last handle is dropped.
#[derive(Clone)]
pub struct Pipeline {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("output_dir", &self.inner.shared.output_dir)
            .field("capacity", &self.inner.capacity)
            .finish()
    }
}

impl Pipeline {
    /// Loads (downloading if needed) the models and starts the worker and the sweeper. Fails fast with a typed
    /// error if anything cannot load.
    pub fn new(config: PipelineConfig) -> Result<Self> {
        config.validate()?;
        let engine = Engine::load(&config.engine)?;
        Self::with_generator(Arc::new(engine), config)
    }

    /// Starts a pipeline around any [`Generator`] (the engine is loaded by [`Pipeline::new`]; tests use this to
    /// inject faults). `config.engine` is ignored.
    pub fn with_generator(generator: Arc<dyn Generator>, config: PipelineConfig) -> Result<Self> {
        config.validate()?;
        std::fs::create_dir_all(&config.output_dir)
            .map_err(|e| Error::io(&config.output_dir, e))?;
        let shared = Arc::new(Shared {
            table: Mutex::new(Table::default()),
            changed: Condvar::new(),
            output_dir: config.output_dir.clone(),
            png: config.png,
            preview_every: config.preview_every,
            on_event: config.on_event.clone(),
        });
        let (doorbell, rings) = bounded(1);
        let mut threads = Vec::new();
        {
            let (shared, generator) = (shared.clone(), generator.clone());
            let drain = config.shutdown == ShutdownPolicy::Drain;
            threads.push(
                std::thread::Builder::new()
                    .name("sketchx-worker".into())
                    .spawn(move || worker(shared, generator, rings, drain))
                    .map_err(|e| Error::io("sketchx-worker thread", e))?,
            );
        }
        let mut stop_sweeper = None;
        if let Some(interval) = config.cleanup_interval {
            let (stop_tx, stop_rx) = bounded::<()>(1);
            let shared = shared.clone();
            let retention = config.retention;
            threads.push(
                std::thread::Builder::new()
                    .name("sketchx-sweeper".into())
                    .spawn(move || {
                        while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                            stop_rx.recv_timeout(interval)
                        {
                            let _ = sweep(&shared, retention);
                        }
                    })
                    .map_err(|e| Error::io("sketchx-sweeper thread", e))?,
            );
            stop_sweeper = Some(stop_tx);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                shared,
                generator,
                doorbell,
                stop_sweeper: Mutex::new(stop_sweeper),
                threads: Mutex::new(threads),
                capacity: config.queue_capacity,
                retention: config.retention,
                drain: config.shutdown == ShutdownPolicy::Drain,
            }),
        })
    }

    /// The directory images are written to.
    pub fn output_dir(&self) -> &Path {
        &self.inner.shared.output_dir
    }

    /// Validates `request`, decodes the sketch and queues the job; returns at once. Bad input is an error here
    /// and nothing is queued; a full queue is [`Error::QueueFull`] (never a block); after shutdown,
    /// [`Error::ShutDown`].
    pub fn submit(
        &self,
        request: GenerationRequest,
        sketch: impl Into<SketchInput>,
    ) -> Result<JobId> {
        request.validate()?;
        let sketch = sketch.into().decode()?;
        let (width, height) = self.inner.generator.output_size(&request, &sketch)?;
        let mut request = request;
        request.seed = Some(request.seed.unwrap_or_else(random_seed));
        let id = JobId::random();
        {
            let mut t = self.inner.shared.lock();
            if t.shutting_down {
                return Err(Error::ShutDown);
            }
            if t.queue.len() >= self.inner.capacity {
                return Err(Error::QueueFull {
                    capacity: self.inner.capacity,
                });
            }
            let total_steps = request.steps as usize;
            t.jobs.insert(
                id.clone(),
                Record {
                    id: id.clone(),
                    state: JobState::Queued,
                    request,
                    sketch: Some(sketch),
                    width,
                    height,
                    step: 0,
                    total_steps,
                    decoded: 0,
                    images: Vec::new(),
                    message: messages::QUEUED.to_string(),
                    created_at: SystemTime::now(),
                    started_at: None,
                    finished_at: None,
                    run_started: None,
                    cancel: Arc::new(AtomicBool::new(false)),
                    preview: None,
                },
            );
            t.queue.push_back(id.clone());
        }
        self.inner.shared.notify(&id);
        let _ = self.inner.doorbell.try_send(());
        Ok(id)
    }

    /// The job's current status; an id this pipeline does not know is [`Error::UnknownJob`].
    pub fn poll(&self, id: &JobId) -> Result<JobStatus> {
        let t = self.inner.shared.lock();
        t.jobs
            .get(id)
            .map(|r| Shared::status_of(&t, r))
            .ok_or_else(|| Error::UnknownJob(id.to_string()))
    }

    /// Blocks until the job reaches a final state (or `timeout` passes: [`Error::Timeout`]).
    pub fn wait(&self, id: &JobId, timeout: Option<Duration>) -> Result<JobStatus> {
        let deadline = timeout.map(|d| Instant::now() + d);
        let shared = &self.inner.shared;
        let mut t = shared.lock();
        loop {
            let Some(r) = t.jobs.get(id) else {
                return Err(Error::UnknownJob(id.to_string()));
            };
            if r.state.is_terminal() {
                return Ok(Shared::status_of(&t, r));
            }
            t = match deadline {
                None => shared.changed.wait(t).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(Error::Timeout(id.to_string()));
                    }
                    shared
                        .changed
                        .wait_timeout(t, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    /// Cancels a job: a queued one is removed at once, a running one stops at its next step and leaves no files.
    /// `Ok(false)` if it had already finished; [`Error::UnknownJob`] if the id is unknown.
    pub fn cancel(&self, id: &JobId) -> Result<bool> {
        let queued = {
            let mut t = self.inner.shared.lock();
            let Some(r) = t.jobs.get_mut(id) else {
                return Err(Error::UnknownJob(id.to_string()));
            };
            match r.state {
                JobState::Queued => true,
                JobState::Running => {
                    r.cancel.store(true, std::sync::atomic::Ordering::SeqCst);
                    return Ok(true);
                }
                _ => return Ok(false),
            }
        };
        if queued {
            self.inner.shared.lock().queue.retain(|q| q != id);
            self.inner
                .shared
                .finish(id, JobState::Cancelled, messages::CANCELLED.into(), vec![]);
        }
        Ok(true)
    }

    /// The latest live preview of a running job (every `preview_every` steps), if any yet.
    pub fn preview(&self, id: &JobId) -> Result<Option<Preview>> {
        let t = self.inner.shared.lock();
        t.jobs
            .get(id)
            .map(|r| r.preview.clone())
            .ok_or_else(|| Error::UnknownJob(id.to_string()))
    }

    /// Deletes this pipeline's files older than the retention period (see [`crate::cleanup`]) and forgets
    /// finished jobs whose files are gone.
    pub fn cleanup(&self) -> Result<CleanupReport> {
        sweep(&self.inner.shared, self.inner.retention)
    }

    /// [`Pipeline::cleanup`] with another maximum age.
    pub fn cleanup_older_than(&self, max_age: Duration) -> Result<CleanupReport> {
        sweep(&self.inner.shared, max_age)
    }

    /// Number of jobs waiting in the queue.
    pub fn queued(&self) -> usize {
        self.inner.shared.lock().queue.len()
    }

    /// Stops intake, cancels or drains pending jobs (per [`ShutdownPolicy`]) and joins every thread. Idempotent;
    /// also runs when the last handle is dropped.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }
}

impl Inner {
    fn shutdown(&self) {
        let queued: Vec<JobId> = {
            let mut t = self.shared.lock();
            t.shutting_down = true;
            t.queue.iter().cloned().collect()
        };
        let threads: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        if threads.is_empty() {
            return; // already shut down
        }
        if !self.drain {
            for id in &queued {
                self.shared.lock().queue.retain(|q| q != id);
                self.shared.finish(
                    id,
                    JobState::Cancelled,
                    messages::CANCELLED_BY_SHUTDOWN.into(),
                    vec![],
                );
            }
            // The running job stops at its next step.
            for r in self.shared.lock().jobs.values() {
                if r.state == JobState::Running {
                    r.cancel.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            }
        }
        if let Some(stop) = self
            .stop_sweeper
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = stop.try_send(());
        }
        let _ = self.doorbell.try_send(());
        for th in threads {
            let _ = th.join();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown();
    }
}
