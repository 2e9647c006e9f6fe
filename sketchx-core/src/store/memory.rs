//! The in-process job store: one table behind one mutex, and a condition variable that wakes waiters and the
//! worker. Every transition takes the lock once and does all its checks and changes under it; that is what
//! closes the old cancel-vs-start race (cancel saw a job queued, let go of the lock, the worker started it, and
//! cancel then marked it cancelled without raising its stop flag, so it ran to the end and left its files).

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use super::{
    eta_secs, progress_percent, Claim, Events, JobStore, NewJob, Outcome, Progress, StopFlag,
    StopReason,
};
use crate::error::{Error, Result};
use crate::jobs::{messages, JobId, JobState, JobStatus};
use crate::jobs::{EventCallback, Preview};
use crate::request::GenerationRequest;
use crate::sketch::Sketch;

/// One job in the table.
struct Record {
    id: JobId,
    state: JobState,
    request: GenerationRequest,
    /// Present while queued; the worker takes it when it starts the job.
    sketch: Option<Sketch>,
    width: u32,
    height: u32,
    step: usize,
    total_steps: usize,
    decoded: usize,
    images: Vec<PathBuf>,
    message: String,
    created_at: SystemTime,
    started_at: Option<SystemTime>,
    finished_at: Option<SystemTime>,
    run_started: Option<Instant>,
    stop: StopFlag,
    preview: Option<Preview>,
    /// The sequence number of the event carrying the final state, once it is queued: `wait` returns only after
    /// the callback has seen it.
    final_event: Option<u64>,
}

/// Every known job, and the queued ones in order.
#[derive(Default)]
struct Table {
    jobs: HashMap<JobId, Record>,
    queue: VecDeque<JobId>,
    closed: bool,
    /// Mean seconds per denoising step and per VAE decode, measured on finished work (for ETAs).
    step_secs: Option<f64>,
    decode_secs: Option<f64>,
}

impl Table {
    fn status_of(&self, rec: &Record) -> JobStatus {
        let queue_position = if rec.state == JobState::Queued {
            self.queue.iter().position(|q| q == &rec.id).map(|p| p + 1)
        } else {
            None
        };
        let eta = match (rec.state, rec.run_started) {
            (JobState::Running, Some(started)) => {
                // This job's own pace once it has one, else the pace of earlier jobs.
                let own = (rec.step > 0).then(|| started.elapsed().as_secs_f64() / rec.step as f64);
                own.or(self.step_secs).map(|s| {
                    eta_secs(
                        s,
                        self.decode_secs,
                        rec.step,
                        rec.total_steps,
                        rec.decoded,
                        rec.request.num_images,
                    )
                })
            }
            _ => None,
        };
        JobStatus {
            job_id: rec.id.clone(),
            state: rec.state,
            progress: progress_percent(
                rec.state,
                rec.step,
                rec.decoded,
                rec.total_steps,
                rec.request.num_images,
            ),
            images: rec.images.clone(),
            message: rec.message.clone(),
            step: rec.step,
            total_steps: rec.total_steps,
            queue_position,
            eta_secs: eta,
            seed: rec.request.seed.unwrap_or_default(),
            num_images: rec.request.num_images,
            width: rec.width,
            height: rec.height,
            created_at: Some(rec.created_at),
            started_at: rec.started_at,
            finished_at: rec.finished_at,
        }
    }

    /// Moves a job that is not final yet to a final state.
    fn set_final(&mut self, id: &JobId, state: JobState, message: &str, images: Vec<PathBuf>) {
        if let Some(r) = self.jobs.get_mut(id) {
            if !r.state.is_terminal() {
                r.state = state;
                r.message = message.to_string();
                r.images = images;
                r.finished_at = Some(SystemTime::now());
                r.sketch = None;
                r.preview = None;
            }
        }
        self.queue.retain(|q| q != id);
    }
}

/// The in-process store.
pub(crate) struct MemoryStore {
    table: Mutex<Table>,
    changed: Condvar,
    events: Events,
}

impl MemoryStore {
    pub fn new(on_event: Option<EventCallback>) -> Self {
        Self {
            table: Mutex::new(Table::default()),
            changed: Condvar::new(),
            events: Events::new(on_event),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends the event, then wakes waiters; called after the lock is released.
    fn changed(&self, id: &JobId) {
        self.events.emit(|seq| {
            let mut t = self.lock();
            let r = t.jobs.get_mut(id)?;
            if r.state.is_terminal() && r.final_event.is_none() {
                r.final_event = Some(seq);
            }
            let r = t.jobs.get(id)?;
            Some(t.status_of(r))
        });
        self.changed.notify_all();
    }
}

impl JobStore for MemoryStore {
    fn enqueue(&self, job: NewJob, capacity: usize) -> Result<()> {
        let id = job.id.clone();
        {
            let mut t = self.lock();
            if t.closed {
                return Err(Error::ShutDown);
            }
            if t.queue.len() >= capacity {
                return Err(Error::QueueFull { capacity });
            }
            let total_steps = job.request.denoising_steps();
            t.jobs.insert(
                id.clone(),
                Record {
                    id: id.clone(),
                    state: JobState::Queued,
                    request: job.request,
                    sketch: Some(job.sketch),
                    width: job.width,
                    height: job.height,
                    step: 0,
                    total_steps,
                    decoded: 0,
                    images: Vec::new(),
                    message: messages::QUEUED.to_string(),
                    created_at: job.created_at,
                    started_at: None,
                    finished_at: None,
                    run_started: None,
                    stop: StopFlag::default(),
                    preview: None,
                    final_event: None,
                },
            );
            t.queue.push_back(id.clone());
        }
        self.changed(&id);
        Ok(())
    }

    fn status(&self, id: &JobId) -> Result<JobStatus> {
        let t = self.lock();
        t.jobs
            .get(id)
            .map(|r| t.status_of(r))
            .ok_or_else(|| Error::UnknownJob(id.to_string()))
    }

    fn wait(&self, id: &JobId, timeout: Option<Duration>) -> Result<JobStatus> {
        let deadline = timeout.map(|d| Instant::now() + d);
        let mut t = self.lock();
        loop {
            let Some(r) = t.jobs.get(id) else {
                return Err(Error::UnknownJob(id.to_string()));
            };
            // With a callback, the final state is reported once the callback has it (its event is queued when
            // `final_event` is set, and delivered right after unless the change came from inside the callback).
            match (r.state.is_terminal(), r.final_event) {
                (true, _) if !self.events.has_callback() => return Ok(t.status_of(r)),
                (true, Some(seq)) => {
                    let status = t.status_of(r);
                    drop(t);
                    if !self.events.wait_delivered(seq, deadline) {
                        return Err(Error::Timeout(id.to_string()));
                    }
                    return Ok(status);
                }
                _ => {}
            }
            t = match deadline {
                None => self.changed.wait(t).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(Error::Timeout(id.to_string()));
                    }
                    self.changed
                        .wait_timeout(t, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    fn cancel(&self, id: &JobId) -> Result<bool> {
        let outcome = {
            let mut t = self.lock();
            let Some(r) = t.jobs.get_mut(id) else {
                return Err(Error::UnknownJob(id.to_string()));
            };
            match r.state {
                JobState::Queued => {
                    t.set_final(id, JobState::Cancelled, messages::CANCELLED, vec![]);
                    true
                }
                JobState::Running => {
                    // Stops at the next step; the worker's finish sees the flag and records the cancel.
                    r.stop.raise(StopReason::Cancelled);
                    return Ok(true);
                }
                _ => false,
            }
        };
        if outcome {
            self.changed(id);
        }
        Ok(outcome)
    }

    fn preview(&self, id: &JobId) -> Result<Option<Preview>> {
        let t = self.lock();
        t.jobs
            .get(id)
            .map(|r| r.preview.clone())
            .ok_or_else(|| Error::UnknownJob(id.to_string()))
    }

    fn images(&self, id: &JobId) -> Result<Vec<Vec<u8>>> {
        let paths = {
            let t = self.lock();
            let r = t
                .jobs
                .get(id)
                .ok_or_else(|| Error::UnknownJob(id.to_string()))?;
            if r.state != JobState::Completed {
                return Ok(Vec::new());
            }
            r.images.clone()
        };
        paths
            .iter()
            .map(|p| std::fs::read(p).map_err(|e| Error::io(p, e)))
            .collect()
    }

    fn queued(&self) -> Result<usize> {
        Ok(self.lock().queue.len())
    }

    fn keeps_png_bytes(&self) -> bool {
        false
    }

    fn take_next(&self, wait: Duration) -> Result<Option<Claim>> {
        let deadline = Instant::now() + wait;
        let mut t = self.lock();
        loop {
            while let Some(id) = t.queue.pop_front() {
                let Some(r) = t.jobs.get_mut(&id) else {
                    continue;
                };
                let Some(sketch) = r.sketch.take() else {
                    continue;
                };
                r.state = JobState::Running;
                r.message = messages::RUNNING.to_string();
                r.started_at = Some(SystemTime::now());
                r.run_started = Some(Instant::now());
                let claim = Claim {
                    id: id.clone(),
                    request: r.request.clone(),
                    sketch,
                    stop: r.stop.clone(),
                    entry: String::new(),
                };
                drop(t);
                self.changed(&id);
                return Ok(Some(claim));
            }
            let now = Instant::now();
            if t.closed || now >= deadline {
                return Ok(None);
            }
            t = self
                .changed
                .wait_timeout(t, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn progress(&self, claim: &Claim, p: Progress) -> bool {
        {
            let mut t = self.lock();
            if let Some(r) = t.jobs.get_mut(&claim.id) {
                r.step = p.step;
                r.total_steps = p.total_steps;
                r.decoded = p.decoded;
                if p.preview.is_some() {
                    r.preview = p.preview;
                }
            }
        }
        self.changed(&claim.id);
        claim.stop.reason() == StopReason::None
    }

    fn finish(&self, claim: &Claim, outcome: Outcome) -> Result<Option<JobState>> {
        let state = {
            let mut t = self.lock();
            let Some(r) = t.jobs.get(&claim.id) else {
                return Ok(None);
            };
            if r.state != JobState::Running {
                return Ok(Some(r.state));
            }
            // A cancel that arrived after the last step still wins over the images: no files for it.
            let (state, message, images) = match (claim.stop.reason(), outcome) {
                (StopReason::Cancelled, Outcome::Completed { .. } | Outcome::Cancelled) => {
                    (JobState::Cancelled, messages::CANCELLED.to_string(), vec![])
                }
                (StopReason::ShutDown, Outcome::Completed { .. } | Outcome::Cancelled) => (
                    JobState::Cancelled,
                    messages::CANCELLED_BY_SHUTDOWN.to_string(),
                    vec![],
                ),
                (_, Outcome::Completed { images, pace, .. }) => {
                    if let Some(s) = pace.0 {
                        t.step_secs = Some(t.step_secs.map_or(s, |old| 0.5 * (old + s)));
                    }
                    if let Some(d) = pace.1 {
                        t.decode_secs = Some(t.decode_secs.map_or(d, |old| 0.5 * (old + d)));
                    }
                    (JobState::Completed, messages::COMPLETED.to_string(), images)
                }
                (_, Outcome::Failed(m)) => (JobState::Failed, m, vec![]),
                (_, Outcome::Cancelled) => {
                    (JobState::Cancelled, messages::CANCELLED.to_string(), vec![])
                }
            };
            t.set_final(&claim.id, state, &message, images);
            state
        };
        self.changed(&claim.id);
        Ok(Some(state))
    }

    fn hand_back(&self, claim: &Claim) -> Result<()> {
        // Nobody else can run a job of this process's table: stopping it means cancelling it.
        {
            let mut t = self.lock();
            t.set_final(
                &claim.id,
                JobState::Cancelled,
                messages::CANCELLED_BY_SHUTDOWN,
                vec![],
            );
        }
        self.changed(&claim.id);
        Ok(())
    }

    fn close(&self, cancel_pending: bool) {
        let cancelled: Vec<JobId> = {
            let mut t = self.lock();
            t.closed = true;
            if !cancel_pending {
                Vec::new()
            } else {
                let queued: Vec<JobId> = t.queue.drain(..).collect();
                for id in &queued {
                    t.set_final(
                        id,
                        JobState::Cancelled,
                        messages::CANCELLED_BY_SHUTDOWN,
                        vec![],
                    );
                }
                for r in t.jobs.values() {
                    if r.state == JobState::Running {
                        r.stop.raise(StopReason::ShutDown);
                    }
                }
                queued
            }
        };
        self.changed.notify_all();
        for id in &cancelled {
            self.changed(id);
        }
    }

    fn wake(&self) {
        self.changed.notify_all();
    }

    fn protected(&self, max_age: Duration) -> Vec<String> {
        let now = SystemTime::now();
        let t = self.lock();
        t.jobs
            .values()
            .filter(|r| {
                !r.state.is_terminal()
                    || r.finished_at
                        .is_none_or(|f| now.duration_since(f).map_or(true, |a| a < max_age))
            })
            .map(|r| r.id.as_str().to_string())
            .collect()
    }

    fn forget_old(&self, max_age: Duration) -> usize {
        let now = SystemTime::now();
        let is_old = |t: SystemTime| now.duration_since(t).is_ok_and(|age| age >= max_age);
        let mut t = self.lock();
        let forget: Vec<JobId> = t
            .jobs
            .values()
            .filter(|r| r.state.is_terminal() && r.finished_at.is_some_and(is_old))
            .filter(|r| {
                r.images
                    .iter()
                    .all(|p| std::fs::symlink_metadata(p).is_err())
            })
            .map(|r| r.id.clone())
            .collect();
        for id in &forget {
            t.jobs.remove(id);
        }
        drop(t);
        if !forget.is_empty() {
            self.changed.notify_all();
        }
        forget.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> NewJob {
        NewJob {
            id: JobId::random(),
            request: GenerationRequest {
                seed: Some(1),
                ..Default::default()
            },
            sketch: Sketch::from_rgb8(1, 1, vec![0, 0, 0]).unwrap(),
            width: 64,
            height: 64,
            created_at: SystemTime::now(),
        }
    }

    /// A store holding one queued job, and that job's id.
    fn one_queued_job() -> (MemoryStore, JobId) {
        let s = MemoryStore::new(None);
        let j = job();
        let id = j.id.clone();
        s.enqueue(j, 4).unwrap();
        (s, id)
    }

    #[test]
    fn cancel_after_take_raises_the_flag_and_the_finish_records_the_cancel() {
        let (s, id) = one_queued_job();
        let claim = s.take_next(Duration::ZERO).unwrap().unwrap();
        assert!(s.cancel(&id).unwrap());
        assert_eq!(claim.stop.reason(), StopReason::Cancelled);
        let done = Outcome::Completed {
            images: vec![PathBuf::from("x.png")],
            pngs: vec![],
            pace: (None, None),
        };
        assert_eq!(s.finish(&claim, done).unwrap(), Some(JobState::Cancelled));
        let st = s.status(&id).unwrap();
        assert_eq!(st.state, JobState::Cancelled);
        assert!(st.images.is_empty());
        assert!(!s.cancel(&id).unwrap());
    }

    #[test]
    fn cancel_before_take_means_the_job_is_never_handed_out() {
        let (s, id) = one_queued_job();
        assert!(s.cancel(&id).unwrap());
        assert!(s.take_next(Duration::ZERO).unwrap().is_none());
        assert_eq!(s.status(&id).unwrap().state, JobState::Cancelled);
    }

    #[test]
    fn capacity_close_and_unknown_ids() {
        let s = MemoryStore::new(None);
        s.enqueue(job(), 1).unwrap();
        assert!(matches!(
            s.enqueue(job(), 1),
            Err(Error::QueueFull { capacity: 1 })
        ));
        let unknown = JobId::random();
        assert!(matches!(s.status(&unknown), Err(Error::UnknownJob(_))));
        assert!(matches!(s.cancel(&unknown), Err(Error::UnknownJob(_))));
        s.close(true);
        assert_eq!(s.queued().unwrap(), 0);
        assert!(matches!(s.enqueue(job(), 4), Err(Error::ShutDown)));
    }
}
