//! Job stores: where jobs live between submission and expiry, and the one place their state changes.
//!
//! Every transition of a job (enqueue, take next, progress, preview, cancel, finish, hand back, forget) is one
//! method of a `JobStore`, done atomically: under one lock in the `memory` store (the default, inside the
//! process), as one Lua script in the Redis store (`redis` feature), which Redis runs without interleaving.
//! So a cancel can never slip between a worker's "is it queued?" and "start it", and a job reaches exactly one
//! final state whoever races for it.

pub(crate) mod memory;
#[cfg(feature = "redis")]
pub mod redis;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::error::Result;
use crate::jobs::{EventCallback, JobId, JobState, JobStatus, Preview};
use crate::request::GenerationRequest;
use crate::sketch::Sketch;

/// Age in seconds after which finished jobs' files are deleted, unless told otherwise (one hour).
pub const DEFAULT_RETENTION_SECS: u64 = 3600;

/// Which store a pipeline keeps its jobs in.
#[derive(Debug, Clone, Default)]
pub enum StoreConfig {
    /// A table inside this process (the default: nothing to install; jobs die with the process).
    #[default]
    Memory,
    /// A shared Redis server: clients and workers in any number of processes and machines.
    #[cfg(feature = "redis")]
    Redis(redis::RedisConfig),
}

/// A job as submitted: validated, with its seed drawn and its output size known.
pub(crate) struct NewJob {
    pub id: JobId,
    pub request: GenerationRequest,
    pub sketch: Sketch,
    pub width: u32,
    pub height: u32,
    pub created_at: SystemTime,
}

/// Why a running job is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum StopReason {
    /// Keep going.
    None = 0,
    /// A caller cancelled it.
    Cancelled = 1,
    /// The pipeline shuts down: the job is cancelled (memory store) or handed back to the queue (Redis).
    ShutDown = 2,
    /// Another worker owns the job now (this one was presumed dead); its result must be dropped.
    Lost = 3,
}

/// A job's stop flag, shared between the store (which sets it) and the running generation (which reads it at
/// every step).
#[derive(Debug, Clone, Default)]
pub(crate) struct StopFlag(Arc<AtomicU8>);

impl StopFlag {
    /// Asks the job to stop; the first reason given wins.
    pub fn raise(&self, reason: StopReason) {
        let _ = self
            .0
            .compare_exchange(0, reason as u8, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// The reason the job was asked to stop.
    pub fn reason(&self) -> StopReason {
        match self.0.load(Ordering::SeqCst) {
            0 => StopReason::None,
            1 => StopReason::Cancelled,
            2 => StopReason::ShutDown,
            _ => StopReason::Lost,
        }
    }
}

/// A job a worker has taken: what to generate, and the handle the store knows the claim by.
pub(crate) struct Claim {
    pub id: JobId,
    pub request: GenerationRequest,
    pub sketch: Sketch,
    pub stop: StopFlag,
    /// The Redis stream entry the job was delivered as (empty in memory).
    pub entry: String,
}

/// A running job's progress, reported after every denoising step and every decoded image.
pub(crate) struct Progress {
    pub step: usize,
    pub total_steps: usize,
    pub decoded: usize,
    pub preview: Option<Preview>,
}

/// How a run ended, as the worker saw it.
pub(crate) enum Outcome {
    /// Every image was written: their paths, and their PNG bytes for stores that serve them.
    Completed {
        images: Vec<PathBuf>,
        // Only the Redis store serves PNG bytes.
        #[cfg_attr(not(feature = "redis"), allow(dead_code))]
        pngs: Vec<Vec<u8>>,
        /// Seconds per denoising step and per decoded image, for other jobs' ETAs.
        pace: (Option<f64>, Option<f64>),
    },
    /// The generation failed; the message says why.
    Failed(String),
    /// The generation stopped because the job was cancelled.
    Cancelled,
}

/// The store's half of a pipeline: every job transition, each one atomic.
pub(crate) trait JobStore: Send + Sync {
    /// Queues a job; [`crate::Error::QueueFull`] when `capacity` jobs wait already, [`crate::Error::ShutDown`]
    /// after [`JobStore::close`].
    fn enqueue(&self, job: NewJob, capacity: usize) -> Result<()>;
    /// The job's status; [`crate::Error::UnknownJob`] if the store does not know it (never, or no longer).
    fn status(&self, id: &JobId) -> Result<JobStatus>;
    /// Blocks until the job is final or `timeout` passes ([`crate::Error::Timeout`]).
    fn wait(&self, id: &JobId, timeout: Option<Duration>) -> Result<JobStatus>;
    /// Cancels a job: a queued one becomes cancelled at once, a running one is flagged to stop at its next step.
    /// `Ok(false)` if it had already finished.
    fn cancel(&self, id: &JobId) -> Result<bool>;
    /// The latest preview of a running job.
    fn preview(&self, id: &JobId) -> Result<Option<Preview>>;
    /// The PNG files of a completed job (empty for a job that has not completed).
    fn images(&self, id: &JobId) -> Result<Vec<Vec<u8>>>;
    /// Jobs waiting in the queue.
    fn queued(&self) -> Result<usize>;
    /// Whether [`Outcome::Completed`] should carry the PNG bytes (the store serves them to clients).
    fn keeps_png_bytes(&self) -> bool;

    /// Takes the next queued job and marks it running, waiting up to `wait` for one.
    fn take_next(&self, wait: Duration) -> Result<Option<Claim>>;
    /// Records progress; returns whether the job should go on (it may have been cancelled, or lost).
    fn progress(&self, claim: &Claim, progress: Progress) -> bool;
    /// Moves the job to its final state and returns it: the outcome, or `Cancelled` if a cancel came first.
    /// `None` if this worker no longer owns the job (it was re-delivered elsewhere): its result is dropped.
    fn finish(&self, claim: &Claim, outcome: Outcome) -> Result<Option<JobState>>;
    /// Gives a job this worker stops without finishing back to the store at shutdown: the memory store cancels
    /// it (nobody else could run it), Redis re-queues it for another worker.
    fn hand_back(&self, claim: &Claim) -> Result<()>;
    /// Says this worker is alive and still running `running` (id and stream entry), so that the job is not
    /// re-delivered (Redis); `Ok(false)` if the job has been taken over by another worker. A no-op in memory.
    fn heartbeat(&self, _running: Option<(&JobId, &str)>) -> Result<bool> {
        Ok(true)
    }
    /// How often [`JobStore::heartbeat`] must be called; `None`: never.
    fn heartbeat_interval(&self) -> Option<Duration> {
        None
    }

    /// Stops intake. With `cancel_pending`, jobs this store holds for this process alone (memory) are cancelled
    /// and running ones flagged to stop; a shared store's queue is left to other workers.
    fn close(&self, cancel_pending: bool);
    /// Wakes a worker blocked in [`JobStore::take_next`] (after [`JobStore::close`]).
    fn wake(&self);
    /// Ids whose files a cleanup must keep whatever their age: jobs not final, or final less than `max_age` ago.
    fn protected(&self, max_age: Duration) -> Vec<String>;
    /// Forgets final jobs older than `max_age` whose files are gone; returns how many. Redis expires them itself.
    fn forget_old(&self, max_age: Duration) -> usize;
}

/// The pipeline's event callback, fed one call at a time in the order the snapshots were taken.
///
/// Changes happen on several threads (a submit or cancel on the caller's, the run on the worker's). Calling the
/// callback on each of them after its snapshot let a slow call deliver an older snapshot after a newer one (a
/// job's `queued` after its `running`), and let calls overlap. Here a snapshot is taken and queued under one
/// lock, and one thread at a time delivers the queue in order: whoever finds nobody delivering, until the queue
/// is empty; the others wait until their own snapshot is delivered (so a slow callback still slows the thread
/// whose change it reports, as before, and the queue stays short). A callback that submits or cancels (which
/// emit too) only queues its event, delivered when it returns, so it never waits on itself.
pub(crate) struct Events {
    callback: Option<EventCallback>,
    queue: std::sync::Mutex<EventQueue>,
    delivered: std::sync::Condvar,
}

#[derive(Default)]
struct EventQueue {
    snapshots: std::collections::VecDeque<JobStatus>,
    /// Snapshots queued and delivered so far.
    queued: u64,
    delivered: u64,
    /// The thread delivering, if any.
    deliverer: Option<std::thread::ThreadId>,
}

impl Events {
    pub(crate) fn new(callback: Option<EventCallback>) -> Self {
        Self {
            callback,
            queue: Default::default(),
            delivered: Default::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, EventQueue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether there is a callback to deliver to.
    pub(crate) fn has_callback(&self) -> bool {
        self.callback.is_some()
    }

    /// Takes a snapshot (`status`, called only when there is a callback, with the snapshot's sequence number for
    /// [`Events::wait_delivered`]) and delivers it after every earlier one; returns once it is delivered (at once
    /// when called from the callback). A panicking callback must not take a worker down.
    pub(crate) fn emit(&self, status: impl FnOnce(u64) -> Option<JobStatus>) {
        let Some(cb) = &self.callback else {
            return;
        };
        let me = std::thread::current().id();
        let mut q = self.lock();
        let Some(snapshot) = status(q.queued + 1) else {
            return;
        };
        q.snapshots.push_back(snapshot);
        q.queued += 1;
        let mine = q.queued;
        match q.deliverer {
            Some(t) if t == me => return, // from inside the callback: delivered when it returns
            Some(_) => {
                while q.delivered < mine && q.deliverer.is_some() {
                    q = self.delivered.wait(q).unwrap_or_else(|e| e.into_inner());
                }
                if q.delivered >= mine {
                    return;
                }
            }
            None => {}
        }
        q.deliverer = Some(me);
        while let Some(s) = q.snapshots.pop_front() {
            drop(q);
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cb(&s)));
            q = self.lock();
            q.delivered += 1;
            self.delivered.notify_all();
        }
        q.deliverer = None;
        self.delivered.notify_all();
    }

    /// Blocks until snapshot `seq` has been delivered (its callback returned); false if `deadline` came first.
    pub(crate) fn wait_delivered(&self, seq: u64, deadline: Option<std::time::Instant>) -> bool {
        let mut q = self.lock();
        while q.delivered < seq {
            q = match deadline {
                None => self.delivered.wait(q).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = std::time::Instant::now();
                    if now >= d {
                        return false;
                    }
                    self.delivered
                        .wait_timeout(q, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
        true
    }
}

/// Progress in percent: steps and decoded images advance it; 100 only when completed.
pub(crate) fn progress_percent(
    state: JobState,
    step: usize,
    decoded: usize,
    total_steps: usize,
    num_images: u32,
) -> f64 {
    let units = (total_steps + num_images as usize + 1) as f64;
    match state {
        JobState::Completed => 100.0,
        JobState::Queued => 0.0,
        _ => ((step + decoded) as f64 / units * 100.0).min(99.9),
    }
}

/// Seconds left for a running job at `secs_per_step` (its own pace, or earlier jobs'), decoding at
/// `decode_secs` per image (twice a step when unknown).
pub(crate) fn eta_secs(
    secs_per_step: f64,
    decode_secs: Option<f64>,
    step: usize,
    total_steps: usize,
    decoded: usize,
    num_images: u32,
) -> f64 {
    let decode = decode_secs.unwrap_or(2.0 * secs_per_step);
    let steps_left = total_steps.saturating_sub(step) as f64;
    let decodes_left = (num_images as usize).saturating_sub(decoded) as f64;
    steps_left * secs_per_step + decodes_left * decode
}
