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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use crossbeam_channel::{bounded, Sender};

use crate::cleanup::{sweep, CleanupReport};
use crate::engine::{Engine, EngineConfig};
use crate::error::{Error, Result};
use crate::executor::{heartbeats, worker, WorkerSetup};
pub use crate::executor::{EventCallback, Generator, Preview};
use crate::jobs::{JobId, JobStatus};
use crate::output::PngSettings;
use crate::request::random_seed;
use crate::request::GenerationRequest;
use crate::sketch::Sketch;
use crate::store::memory::MemoryStore;
use crate::store::{JobStore, NewJob, StopFlag, StoreConfig};

/// Where images are written unless told otherwise.
pub const DEFAULT_OUTPUT_DIR: &str = "generated";
/// Most jobs waiting at once unless told otherwise.
pub const DEFAULT_QUEUE_CAPACITY: usize = 64;
/// How often the background sweeper runs, in seconds, unless told otherwise (hourly; `None` would be never).
pub const DEFAULT_CLEANUP_INTERVAL_SECS: Option<u64> = Some(3600);
/// A live preview is computed every this many steps unless told otherwise (0 would be never).
pub const DEFAULT_PREVIEW_EVERY: usize = 5;

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
    /// Called with a snapshot after every change of a job (state, step, decode), one call at a time and in the
    /// order of the changes (see [`EventCallback`]); a panic in it is caught.
    pub on_event: Option<EventCallback>,
    /// A live preview is computed every this many steps (0: never). Default 5.
    pub preview_every: usize,
    /// What shutdown does with pending work.
    pub shutdown: ShutdownPolicy,
    /// PNG encoder settings.
    pub png: PngSettings,
    /// Where jobs are kept: in this process (the default) or in a shared Redis ([`StoreConfig`]). With Redis,
    /// this pipeline is a worker of the shared queue as well as a client of it.
    pub store: StoreConfig,
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
            .field("store", &self.store)
            .finish()
    }
}

impl PipelineConfig {
    /// Defaults around the given engine configuration.
    pub fn with_engine(engine: EngineConfig) -> Self {
        Self {
            engine,
            output_dir: PathBuf::from(DEFAULT_OUTPUT_DIR),
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            retention: Duration::from_secs(crate::store::DEFAULT_RETENTION_SECS),
            cleanup_interval: DEFAULT_CLEANUP_INTERVAL_SECS.map(Duration::from_secs),
            on_event: None,
            preview_every: DEFAULT_PREVIEW_EVERY,
            shutdown: ShutdownPolicy::Cancel,
            png: PngSettings::default(),
            store: StoreConfig::default(),
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

    /// Makes the pipeline a worker (and client) of the Redis job queue at `url`, with the default
    /// [`crate::store::redis::RedisConfig`] except for the retention, which is this configuration's (finished
    /// jobs then leave Redis and the output directory after the same time). Bindings and examples call this
    /// rather than repeat the rule.
    #[cfg(feature = "redis")]
    pub fn use_redis(&mut self, url: &str) {
        let mut redis = crate::store::redis::RedisConfig::new(url);
        redis.retention = self.retention;
        self.store = StoreConfig::Redis(redis);
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

/// The job being run by this process's worker: id, stop flag, stream entry.
type Current = Arc<Mutex<Option<(JobId, StopFlag, String)>>>;

struct Inner {
    store: Arc<dyn JobStore>,
    /// The loaded generator, for output sizes at submission; `None` for a client without a model.
    generator: Option<Arc<dyn Generator>>,
    output_dir: PathBuf,
    /// Raised at shutdown: the worker takes no new job.
    stop: Arc<AtomicBool>,
    current: Current,
    stop_threads: Mutex<Vec<Sender<()>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    closed: AtomicBool,
    capacity: usize,
    retention: Duration,
    drain: bool,
    /// Whether the queue is shared with other processes (Redis): shutdown then leaves it alone.
    shared_queue: bool,
}

/// The sketch-to-image job pipeline: a job store, and (unless it is a client made by [`Pipeline::connect`]) the
/// models loaded once, a worker thread running jobs and a retention sweeper. `Send + Sync` and cheap to clone (a
/// handle): share one between threads or requests. Shutdown happens on [`Pipeline::shutdown`] or when the last
/// handle is dropped.
#[derive(Clone)]
pub struct Pipeline {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("output_dir", &self.inner.output_dir)
            .field("capacity", &self.inner.capacity)
            .field("worker", &self.inner.generator.is_some())
            .finish()
    }
}

fn open_store(config: &StoreConfig, on_event: Option<EventCallback>) -> Result<Arc<dyn JobStore>> {
    Ok(match config {
        StoreConfig::Memory => Arc::new(MemoryStore::new(on_event)),
        #[cfg(feature = "redis")]
        StoreConfig::Redis(r) => Arc::new(crate::store::redis::RedisStore::open(r, on_event)?),
    })
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| Error::io(format!("{name} thread"), e))
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
        let store = open_store(&config.store, config.on_event.clone())?;
        let shared_queue = !matches!(config.store, StoreConfig::Memory);
        let stop = Arc::new(AtomicBool::new(false));
        let current: Current = Arc::default();
        let drain = config.shutdown == ShutdownPolicy::Drain;
        let mut threads = Vec::new();
        let mut stoppers = Vec::new();
        let setup = WorkerSetup {
            store: store.clone(),
            generator: generator.clone(),
            output_dir: config.output_dir.clone(),
            png: config.png,
            preview_every: config.preview_every,
            stop: stop.clone(),
            drain,
            drain_queue: drain && !shared_queue,
            current: current.clone(),
        };
        threads.push(spawn("sketchx-worker", move || worker(setup))?);
        if let Some(interval) = store.heartbeat_interval() {
            let (tx, rx) = bounded::<()>(1);
            let (store, current) = (store.clone(), current.clone());
            threads.push(spawn("sketchx-heartbeat", move || {
                heartbeats(store, current, interval, rx)
            })?);
            stoppers.push(tx);
        }
        if let Some(interval) = config.cleanup_interval {
            let (tx, rx) = bounded::<()>(1);
            let store = store.clone();
            let (dir, retention) = (config.output_dir.clone(), config.retention);
            threads.push(spawn("sketchx-sweeper", move || {
                while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                    rx.recv_timeout(interval)
                {
                    let _ = sweep(store.as_ref(), &dir, retention);
                }
            })?);
            stoppers.push(tx);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                generator: Some(generator),
                output_dir: config.output_dir,
                stop,
                current,
                stop_threads: Mutex::new(stoppers),
                threads: Mutex::new(threads),
                closed: AtomicBool::new(false),
                capacity: config.queue_capacity,
                retention: config.retention,
                drain,
                shared_queue,
            }),
        })
    }

    /// The directory images are written to (empty for a client made by [`Pipeline::connect`]).
    pub fn output_dir(&self) -> &Path {
        &self.inner.output_dir
    }

    /// Whether this pipeline runs jobs itself (`false` for a client made by [`Pipeline::connect`]).
    pub fn is_worker(&self) -> bool {
        self.inner.generator.is_some()
    }

    /// Validates `request`, decodes the sketch and queues the job; returns at once. Bad input is an error here
    /// and nothing is queued; a full queue is [`Error::QueueFull`] (never a block); after shutdown,
    /// [`Error::ShutDown`].
    pub fn submit(
        &self,
        request: GenerationRequest,
        sketch: impl Into<SketchInput>,
    ) -> Result<JobId> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(Error::ShutDown);
        }
        request.validate()?;
        let sketch = sketch.into().decode()?;
        let (width, height) = match &self.inner.generator {
            Some(g) => g.output_size(&request, &sketch)?,
            None => client_output_size(&request, &sketch)?,
        };
        let mut request = request;
        request.seed = Some(request.seed.unwrap_or_else(random_seed));
        let id = JobId::random();
        let job = NewJob {
            id: id.clone(),
            request,
            sketch,
            width,
            height,
            created_at: SystemTime::now(),
        };
        self.inner.store.enqueue(job, self.inner.capacity)?;
        Ok(id)
    }

    /// The job's current status; an id the store does not know is [`Error::UnknownJob`].
    pub fn poll(&self, id: &JobId) -> Result<JobStatus> {
        self.inner.store.status(id)
    }

    /// Blocks until the job reaches a final state (or `timeout` passes: [`Error::Timeout`]). With the in-process
    /// store and an [`PipelineConfig::on_event`] callback it returns only after the callback has been called with
    /// that final state, so what the callback recorded is complete when `wait` returns.
    pub fn wait(&self, id: &JobId, timeout: Option<Duration>) -> Result<JobStatus> {
        self.inner.store.wait(id, timeout)
    }

    /// Cancels a job: a queued one is cancelled at once (it never starts), a running one stops at its next step
    /// and leaves no files. `Ok(false)` if it had already finished; [`Error::UnknownJob`] if the id is unknown.
    pub fn cancel(&self, id: &JobId) -> Result<bool> {
        self.inner.store.cancel(id)
    }

    /// The latest live preview of a running job (every `preview_every` steps), if any yet.
    pub fn preview(&self, id: &JobId) -> Result<Option<Preview>> {
        self.inner.store.preview(id)
    }

    /// The PNG files of a completed job, in order (empty while it is not completed). With Redis they come from
    /// the store, so a client needs no shared disk; in memory they are read from the output directory.
    pub fn images(&self, id: &JobId) -> Result<Vec<Vec<u8>>> {
        self.inner.store.images(id)
    }

    /// Deletes this pipeline's files older than the retention period (see [`crate::cleanup`]) and forgets
    /// finished jobs whose files are gone. (With Redis, the store's keys expire by themselves.)
    pub fn cleanup(&self) -> Result<CleanupReport> {
        self.cleanup_older_than(self.inner.retention)
    }

    /// [`Pipeline::cleanup`] with another maximum age.
    pub fn cleanup_older_than(&self, max_age: Duration) -> Result<CleanupReport> {
        if self.inner.generator.is_none() {
            return Ok(CleanupReport::default());
        }
        sweep(self.inner.store.as_ref(), &self.inner.output_dir, max_age)
    }

    /// Number of jobs waiting in the queue (with Redis: the shared queue; 0 if the store cannot be reached).
    pub fn queued(&self) -> usize {
        self.inner.store.queued().unwrap_or(0)
    }

    /// Stops intake, cancels or drains pending jobs (per [`ShutdownPolicy`]) and joins every thread. Idempotent;
    /// also runs when the last handle is dropped. With a shared (Redis) queue, queued jobs stay for other workers,
    /// and the running job is handed back to the queue (or, with [`ShutdownPolicy::Drain`], finished).
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }
}

#[cfg(feature = "redis")]
impl Pipeline {
    /// A client of the Redis job queue at `url` (`redis://host:port`): no model is loaded and no job runs here;
    /// `submit`, `poll`, `wait`, `cancel`, `preview` and `images` work as in an in-process pipeline, served by the
    /// worker processes of the same queue. Default [`crate::store::redis::RedisConfig`] and a queue bound of 64.
    pub fn connect(url: &str) -> Result<Self> {
        Self::connect_with(crate::store::redis::RedisConfig::new(url), 64)
    }

    /// [`Pipeline::connect`] with a full configuration and the queue bound this client enforces.
    pub fn connect_with(
        config: crate::store::redis::RedisConfig,
        queue_capacity: usize,
    ) -> Result<Self> {
        if queue_capacity == 0 {
            return Err(Error::invalid("queue_capacity", "must be at least 1"));
        }
        let store = open_store(&StoreConfig::Redis(config.clone()), None)?;
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                generator: None,
                output_dir: PathBuf::new(),
                stop: Arc::new(AtomicBool::new(false)),
                current: Arc::default(),
                stop_threads: Mutex::new(Vec::new()),
                threads: Mutex::new(Vec::new()),
                closed: AtomicBool::new(false),
                capacity: queue_capacity,
                retention: config.retention,
                drain: false,
                shared_queue: true,
            }),
        })
    }
}

/// A client's output size for `sketch` (it has no model to ask): the sketch's target size, which must be a
/// multiple of SD1.5's VAE factor 8. A model with another factor refuses the job on the worker instead.
fn client_output_size(req: &GenerationRequest, sketch: &Sketch) -> Result<(u32, u32)> {
    let (w, h) = sketch.target_size(req.width, req.height);
    for (field, v) in [("width", w), ("height", h)] {
        if v % 8 != 0 {
            return Err(Error::invalid(
                field,
                format!("{v} is not a multiple of the VAE scale factor 8"),
            ));
        }
    }
    Ok((w, h))
}

impl Inner {
    fn shutdown(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return; // already shut down
        }
        self.stop.store(true, Ordering::SeqCst);
        self.store
            .close(!self.drain && !self.shared_queue && self.generator.is_some());
        if !self.drain {
            if let Some((_, flag, _)) = &*self.current.lock().unwrap_or_else(|e| e.into_inner()) {
                flag.raise(crate::store::StopReason::ShutDown);
            }
        }
        for tx in self
            .stop_threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = tx.try_send(());
        }
        self.store.wake();
        let threads: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
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
