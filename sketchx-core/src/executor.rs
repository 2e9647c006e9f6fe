//! The job executor: the job table shared with callers, and the worker thread that runs queued jobs one at a
//! time on the loaded models, isolating errors and panics to the job that caused them.
//!
//! The queue itself is the table's ordered list of queued ids (so a cancel removes a job at once and queue
//! positions are exact); the worker is woken through a bounded crossbeam channel used as a doorbell.

use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use candle_core::Tensor;
use crossbeam_channel::Receiver;

use crate::engine::{Engine, Generated, StepInfo};
use crate::error::{Error, Result};
use crate::jobs::{messages, JobId, JobState, JobStatus};
use crate::output::{image_file_name, write_png_atomic, PngSettings};
use crate::request::GenerationRequest;
use crate::sketch::Sketch;

/// What the executor runs: the real [`Engine`], or a stand-in (tests inject faults with one).
pub trait Generator: Send + Sync + 'static {
    /// Output size for `sketch` under `req`; called at submission so that bad sizes fail early.
    fn output_size(&self, req: &GenerationRequest, sketch: &Sketch) -> Result<(u32, u32)>;
    /// Generates the images; `observer` returning `false` must stop it with [`Error::Cancelled`].
    fn generate(
        &self,
        req: &GenerationRequest,
        sketch: &Sketch,
        observer: &mut dyn FnMut(&StepInfo) -> bool,
    ) -> Result<Generated>;
}

impl Generator for Engine {
    fn output_size(&self, req: &GenerationRequest, sketch: &Sketch) -> Result<(u32, u32)> {
        Engine::output_size(self, req, sketch)
    }

    fn generate(
        &self,
        req: &GenerationRequest,
        sketch: &Sketch,
        observer: &mut dyn FnMut(&StepInfo) -> bool,
    ) -> Result<Generated> {
        Engine::generate(self, req, sketch, observer)
    }
}

/// A cheap look at a running job's current latents: a linear latent-to-RGB approximation (no extra model),
/// at latent resolution (1/8 of the image for SD1.5).
#[derive(Debug, Clone, PartialEq)]
pub struct Preview {
    /// Denoising step the preview shows.
    pub step: usize,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// RGB8 pixels of the first image of the batch, row-major.
    pub rgb: Vec<u8>,
}

/// SD1.x latent channel -> RGB contributions (a widely used linear fit of the VAE decoder).
const LATENT_RGB: [[f32; 3]; 4] = [
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
];

/// Computes a [`Preview`] of the first image in `latents` `(n, 4, h, w)`; `None` for other channel counts.
pub fn latent_preview(latents: &Tensor, step: usize) -> Option<Preview> {
    let (_, c, h, w) = latents.dims4().ok()?;
    if c != LATENT_RGB.len() {
        return None;
    }
    let first = latents
        .narrow(0, 0, 1)
        .ok()?
        .to_dtype(candle_core::DType::F32)
        .ok()?
        .flatten_all()
        .ok()?
        .to_vec1::<f32>()
        .ok()?;
    let mut rgb = vec![0u8; h * w * 3];
    for p in 0..h * w {
        for (ch, out) in rgb[p * 3..p * 3 + 3].iter_mut().enumerate() {
            let v: f32 = (0..c)
                .map(|k| first[k * h * w + p] * LATENT_RGB[k][ch])
                .sum();
            *out = (((v + 1.0) * 0.5).clamp(0.0, 1.0) * 255.0).round() as u8;
        }
    }
    Some(Preview {
        step,
        width: w as u32,
        height: h as u32,
        rgb,
    })
}

/// One job in the table.
pub(crate) struct Record {
    pub id: JobId,
    pub state: JobState,
    pub request: GenerationRequest,
    pub sketch: Option<Sketch>,
    pub width: u32,
    pub height: u32,
    pub step: usize,
    pub total_steps: usize,
    pub decoded: usize,
    pub images: Vec<PathBuf>,
    pub message: String,
    pub created_at: SystemTime,
    pub started_at: Option<SystemTime>,
    pub finished_at: Option<SystemTime>,
    pub run_started: Option<Instant>,
    pub cancel: Arc<AtomicBool>,
    pub preview: Option<Preview>,
}

/// The job table: every known job, and the queued ones in order.
#[derive(Default)]
pub(crate) struct Table {
    pub jobs: HashMap<JobId, Record>,
    pub queue: VecDeque<JobId>,
    pub shutting_down: bool,
    /// Mean seconds per denoising step and per VAE decode, measured on finished work (for ETAs).
    pub step_secs: Option<f64>,
    pub decode_secs: Option<f64>,
}

/// Callback receiving a snapshot after every change of a job (called on the worker thread).
pub type EventCallback = Arc<dyn Fn(&JobStatus) + Send + Sync>;

/// State shared by the pipeline handles, the worker and the sweeper.
pub(crate) struct Shared {
    pub table: Mutex<Table>,
    pub changed: Condvar,
    pub output_dir: PathBuf,
    pub png: PngSettings,
    pub preview_every: usize,
    pub on_event: Option<EventCallback>,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The status of `rec` (with its queue position and ETA from `table`).
    pub fn status_of(table: &Table, rec: &Record) -> JobStatus {
        let units = (rec.total_steps + rec.request.num_images as usize + 1) as f64;
        let progress = match rec.state {
            JobState::Completed => 100.0,
            JobState::Queued => 0.0,
            _ => ((rec.step + rec.decoded) as f64 / units * 100.0).min(99.9),
        };
        let queue_position = if rec.state == JobState::Queued {
            table.queue.iter().position(|q| q == &rec.id).map(|p| p + 1)
        } else {
            None
        };
        let eta_secs = match (rec.state, table.step_secs, rec.run_started) {
            (JobState::Running, step, Some(started)) => {
                // This job's own pace once it has one, else the pace of earlier jobs.
                let own = (rec.step > 0).then(|| started.elapsed().as_secs_f64() / rec.step as f64);
                own.or(step).map(|s| {
                    let decode = table.decode_secs.unwrap_or(2.0 * s);
                    let steps_left = rec.total_steps.saturating_sub(rec.step) as f64;
                    let decodes_left =
                        (rec.request.num_images as usize).saturating_sub(rec.decoded) as f64;
                    steps_left * s + decodes_left * decode
                })
            }
            _ => None,
        };
        JobStatus {
            job_id: rec.id.clone(),
            state: rec.state,
            progress,
            images: rec.images.clone(),
            message: rec.message.clone(),
            step: rec.step,
            total_steps: rec.total_steps,
            queue_position,
            eta_secs,
            seed: rec.request.seed.unwrap_or_default(),
            num_images: rec.request.num_images,
            width: rec.width,
            height: rec.height,
            created_at: Some(rec.created_at),
            started_at: rec.started_at,
            finished_at: rec.finished_at,
        }
    }

    /// Tells waiters and the event callback that `id` changed. Call without holding the lock.
    pub fn notify(&self, id: &JobId) {
        self.changed.notify_all();
        if let Some(cb) = &self.on_event {
            let status = {
                let t = self.lock();
                t.jobs.get(id).map(|r| Self::status_of(&t, r))
            };
            if let Some(s) = status {
                // A panicking callback must not take the worker down.
                let _ = catch_unwind(AssertUnwindSafe(|| cb(&s)));
            }
        }
    }

    /// Moves `id` to a final state (if it is not final already).
    pub fn finish(&self, id: &JobId, state: JobState, message: String, images: Vec<PathBuf>) {
        {
            let mut t = self.lock();
            if let Some(r) = t.jobs.get_mut(id) {
                if !r.state.is_terminal() {
                    r.state = state;
                    r.message = message;
                    r.images = images;
                    r.finished_at = Some(SystemTime::now());
                    r.sketch = None;
                    r.preview = None;
                }
            }
        }
        self.notify(id);
    }
}

/// The worker thread's loop: runs queued jobs until shutdown.
pub(crate) fn worker(
    shared: Arc<Shared>,
    generator: Arc<dyn Generator>,
    doorbell: Receiver<()>,
    drain: bool,
) {
    loop {
        let next = {
            let mut t = shared.lock();
            if t.shutting_down && !drain {
                None
            } else {
                t.queue.pop_front()
            }
        };
        match next {
            Some(id) => run_job(&shared, generator.as_ref(), &id),
            None => {
                if shared.lock().shutting_down {
                    return;
                }
                // Sleep until a submission or shutdown rings (or every second, as a safety net).
                let _ = doorbell.recv_timeout(std::time::Duration::from_secs(1));
            }
        }
    }
}

fn run_job(shared: &Shared, generator: &dyn Generator, id: &JobId) {
    let (request, sketch, cancel) = {
        let mut t = shared.lock();
        let Some(r) = t.jobs.get_mut(id) else { return };
        if r.state != JobState::Queued {
            return;
        }
        let Some(sketch) = r.sketch.take() else {
            return;
        };
        r.state = JobState::Running;
        r.message = messages::RUNNING.to_string();
        r.started_at = Some(SystemTime::now());
        r.run_started = Some(Instant::now());
        (r.request.clone(), sketch, r.cancel.clone())
    };
    shared.notify(id);

    let started = Instant::now();
    let mut last_step_at = started;
    let mut denoise_secs = 0.0;
    let mut decode_secs = 0.0;
    let result = catch_unwind(AssertUnwindSafe(|| {
        generator.generate(&request, &sketch, &mut |info: &StepInfo| {
            let now = Instant::now();
            if info.decoded == 0 {
                denoise_secs = now.duration_since(started).as_secs_f64();
            } else {
                decode_secs += now.duration_since(last_step_at).as_secs_f64();
            }
            last_step_at = now;
            let preview = match (info.latents, shared.preview_every) {
                (Some(l), every)
                    if every > 0
                        && (info.step.is_multiple_of(every) || info.step == info.total_steps) =>
                {
                    latent_preview(l, info.step)
                }
                _ => None,
            };
            {
                let mut t = shared.lock();
                if let Some(r) = t.jobs.get_mut(id) {
                    r.step = info.step;
                    r.total_steps = info.total_steps;
                    r.decoded = info.decoded;
                    if preview.is_some() {
                        r.preview = preview;
                    }
                }
            }
            shared.notify(id);
            !cancel.load(Ordering::SeqCst)
        })
    }));
    let result = match result {
        Ok(r) => r,
        Err(panic) => Err(Error::JobFailed(format!(
            "internal error (panic): {}",
            panic_message(&panic)
        ))),
    };
    match result {
        Ok(generated) => {
            {
                let mut t = shared.lock();
                let steps = generated_steps(&t, id);
                if steps > 0 && denoise_secs > 0.0 {
                    let s = denoise_secs / steps as f64;
                    t.step_secs = Some(t.step_secs.map_or(s, |old| 0.5 * (old + s)));
                }
                if !generated.images.is_empty() && decode_secs > 0.0 {
                    let d = decode_secs / generated.images.len() as f64;
                    t.decode_secs = Some(t.decode_secs.map_or(d, |old| 0.5 * (old + d)));
                }
            }
            write_images(shared, id, &generated, request.num_images as usize, &cancel);
        }
        Err(Error::Cancelled) => {
            shared.finish(id, JobState::Cancelled, messages::CANCELLED.into(), vec![]);
        }
        Err(e) => shared.finish(id, JobState::Failed, e.to_string(), vec![]),
    }
}

fn generated_steps(t: &Table, id: &JobId) -> usize {
    t.jobs.get(id).map_or(0, |r| r.total_steps)
}

fn write_images(
    shared: &Shared,
    id: &JobId,
    generated: &Generated,
    asked: usize,
    cancel: &AtomicBool,
) {
    let mut written: Vec<PathBuf> = Vec::with_capacity(generated.images.len());
    let mut failure = None;
    for (i, rgb) in generated.images.iter().enumerate() {
        if cancel.load(Ordering::SeqCst) {
            break;
        }
        let path = shared.output_dir.join(image_file_name(id.as_str(), i));
        match write_png_atomic(&path, generated.width, generated.height, rgb, &shared.png) {
            Ok(_) => written.push(path),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let cancelled = cancel.load(Ordering::SeqCst);
    if failure.is_some() || cancelled || written.len() != asked {
        remove_all(&written);
        match failure {
            Some(e) => shared.finish(id, JobState::Failed, e.to_string(), vec![]),
            None if cancelled => {
                shared.finish(id, JobState::Cancelled, messages::CANCELLED.into(), vec![])
            }
            None => shared.finish(
                id,
                JobState::Failed,
                format!("only {} of {asked} images were produced", written.len()),
                vec![],
            ),
        }
    } else {
        shared.finish(id, JobState::Completed, messages::COMPLETED.into(), written);
    }
}

fn remove_all(paths: &[PathBuf]) {
    for p in paths {
        let _ = std::fs::remove_file(p);
    }
}

/// The text of a panic payload.
pub(crate) fn panic_message(payload: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}
