//! The job executor: the worker thread that takes jobs from a [`crate::store`] one at a time and runs them on
//! the loaded models, isolating errors and panics to the job that caused them. It changes no job state itself:
//! every transition is a store call, so the in-memory and the Redis store behave alike.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Tensor;

use crate::engine::{Engine, Generated, StepInfo};
use crate::error::{Error, Result};
use crate::jobs::{JobId, JobState};
// Defined with the job records; re-exported at their former path.
pub use crate::jobs::{EventCallback, Preview};
use crate::output::{encode_png, image_file_name, write_file_atomic, PngSettings};
use crate::request::GenerationRequest;
use crate::sketch::Sketch;
use crate::store::{Claim, JobStore, Outcome, Progress, StopFlag, StopReason};

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

    /// A live preview of the first image at a denoising step (`info.latents` is set). The default is the cheap
    /// linear latent-to-RGB map ([`latent_preview`]).
    fn preview(&self, info: &StepInfo) -> Option<Preview> {
        info.latents.and_then(|l| latent_preview(l, info.step))
    }
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

    /// With a tiny VAE, the step's predicted clean image decoded by it at full resolution (as the drawing tools'
    /// TAESD previews); otherwise, or if that fails, the linear latent-to-RGB map.
    fn preview(&self, info: &StepInfo) -> Option<Preview> {
        let tiny = match (self.tiny_vae(), info.x0) {
            (Some(_), Some(x0)) => x0
                .narrow(0, 0, 1)
                .map_err(Error::from)
                .and_then(|first| self.decode_preview(&first))
                .ok()
                .and_then(|mut rgb| rgb.pop())
                .and_then(|rgb| {
                    let (_, _, h, w) = x0.dims4().ok()?;
                    let scale = self.vae().scale_factor;
                    Some(Preview {
                        step: info.step,
                        width: (w * scale) as u32,
                        height: (h * scale) as u32,
                        rgb,
                    })
                }),
            _ => None,
        };
        tiny.or_else(|| info.latents.and_then(|l| latent_preview(l, info.step)))
    }
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

/// What a worker thread needs besides the store: the generator, where and how to write images, and when to stop.
pub(crate) struct WorkerSetup {
    pub store: Arc<dyn JobStore>,
    pub generator: Arc<dyn Generator>,
    pub output_dir: PathBuf,
    pub png: PngSettings,
    pub preview_every: usize,
    /// Set at shutdown: take no new job.
    pub stop: Arc<AtomicBool>,
    /// With `stop`: let the running job finish instead of stopping it at its next step.
    pub drain: bool,
    /// With `stop`: also run every queued job first (a queue of this process's own; never a shared one).
    pub drain_queue: bool,
    /// The job being run, so that shutdown can stop it and heartbeats can keep it alive.
    pub current: Arc<Mutex<Option<(JobId, StopFlag, String)>>>,
}

/// How long a worker waits for a job before it looks at its stop flag again.
const TAKE_WAIT: Duration = Duration::from_millis(500);

/// The worker thread's loop: takes and runs jobs until shutdown. Store errors (a Redis restart) are retried
/// with a growing pause, so a worker outlives its store's outages.
pub(crate) fn worker(w: WorkerSetup) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let stopping = w.stop.load(Ordering::SeqCst);
        if stopping && !w.drain_queue {
            return;
        }
        match w.store.take_next(TAKE_WAIT) {
            Ok(Some(claim)) => {
                backoff = Duration::from_millis(50);
                run_job(&w, claim);
            }
            Ok(None) if stopping => return,
            Ok(None) => backoff = Duration::from_millis(50),
            Err(_) => {
                if w.stop.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

fn run_job(w: &WorkerSetup, claim: Claim) {
    *w.current.lock().unwrap_or_else(|e| e.into_inner()) =
        Some((claim.id.clone(), claim.stop.clone(), claim.entry.clone()));
    let _ = w.store.heartbeat(Some((&claim.id, &claim.entry)));
    let started = Instant::now();
    let mut last_step_at = started;
    let mut denoise_secs = 0.0;
    let mut decode_secs = 0.0;
    let mut total_steps = 0;
    let result = catch_unwind(AssertUnwindSafe(|| {
        w.generator
            .generate(&claim.request, &claim.sketch, &mut |info: &StepInfo| {
                let now = Instant::now();
                if info.decoded == 0 {
                    denoise_secs = now.duration_since(started).as_secs_f64();
                } else {
                    decode_secs += now.duration_since(last_step_at).as_secs_f64();
                }
                last_step_at = now;
                total_steps = info.total_steps;
                let preview = match (info.latents, w.preview_every) {
                    (Some(_), every)
                        if every > 0
                            && (info.step.is_multiple_of(every)
                                || info.step == info.total_steps) =>
                    {
                        w.generator.preview(info)
                    }
                    _ => None,
                };
                let go_on = w.store.progress(
                    &claim,
                    Progress {
                        step: info.step,
                        total_steps: info.total_steps,
                        decoded: info.decoded,
                        preview,
                    },
                );
                if w.stop.load(Ordering::SeqCst) && !w.drain {
                    claim.stop.raise(StopReason::ShutDown);
                }
                go_on && claim.stop.reason() == StopReason::None
            })
    }));
    let result = match result {
        Ok(r) => r,
        Err(panic) => Err(Error::JobFailed(format!(
            "internal error (panic): {}",
            panic_message(&panic)
        ))),
    };
    let outcome = match result {
        Ok(generated) => {
            let pace = (
                (total_steps > 0 && denoise_secs > 0.0).then(|| denoise_secs / total_steps as f64),
                (!generated.images.is_empty() && decode_secs > 0.0)
                    .then(|| decode_secs / generated.images.len() as f64),
            );
            write_images(w, &claim, &generated, pace)
        }
        Err(Error::Cancelled) => Outcome::Cancelled,
        Err(e) => Outcome::Failed(e.to_string()),
    };
    settle(w, &claim, outcome);
    *w.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
    let _ = w.store.heartbeat(None);
}

/// The heartbeat thread of a worker on a shared store: says every `interval` that the worker lives and still
/// runs its job; if the store answers that another worker took the job over, the run is stopped as lost.
pub(crate) fn heartbeats(
    store: Arc<dyn JobStore>,
    current: Arc<Mutex<Option<(JobId, StopFlag, String)>>>,
    interval: Duration,
    stop: crossbeam_channel::Receiver<()>,
) {
    loop {
        let running = current.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Ok(false) = store.heartbeat(running.as_ref().map(|(id, _, e)| (id, e.as_str()))) {
            if let Some((_, flag, _)) = &running {
                flag.raise(StopReason::Lost);
            }
        }
        if !matches!(
            stop.recv_timeout(interval),
            Err(crossbeam_channel::RecvTimeoutError::Timeout)
        ) {
            return;
        }
    }
}

/// Records the outcome in the store and removes the job's files unless it ended completed (a cancel that came
/// first, or another worker that took the job over, wins over this run's images).
fn settle(w: &WorkerSetup, claim: &Claim, outcome: Outcome) {
    let written = match &outcome {
        Outcome::Completed { images, .. } => images.clone(),
        _ => Vec::new(),
    };
    let shut_down = claim.stop.reason() == StopReason::ShutDown;
    let final_state = if shut_down && !matches!(outcome, Outcome::Failed(_)) {
        // Stopped by this process's shutdown, not by anyone's decision about the job: hand it back.
        w.store.hand_back(claim).map(|_| None)
    } else {
        w.store.finish(claim, outcome)
    };
    if !matches!(final_state, Ok(Some(JobState::Completed))) {
        remove_all(&written);
    }
}

/// Encodes and writes every image atomically; the outcome is `Completed` only if all of them were written.
fn write_images(
    w: &WorkerSetup,
    claim: &Claim,
    generated: &Generated,
    pace: (Option<f64>, Option<f64>),
) -> Outcome {
    let asked = claim.request.num_images as usize;
    let mut written: Vec<PathBuf> = Vec::with_capacity(generated.images.len());
    let mut pngs = Vec::new();
    let mut failure = None;
    for (i, rgb) in generated.images.iter().enumerate() {
        if claim.stop.reason() != StopReason::None {
            break;
        }
        let path = w.output_dir.join(image_file_name(claim.id.as_str(), i));
        let png = encode_png(generated.width, generated.height, rgb, &w.png)
            .and_then(|png| write_file_atomic(&path, &png).map(|_| png));
        match png {
            Ok(png) => {
                written.push(path);
                if w.store.keeps_png_bytes() {
                    pngs.push(png);
                }
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    if failure.is_some() || claim.stop.reason() != StopReason::None || written.len() != asked {
        remove_all(&written);
        return match failure {
            Some(e) => Outcome::Failed(e.to_string()),
            None if claim.stop.reason() != StopReason::None => Outcome::Cancelled,
            None => Outcome::Failed(format!(
                "only {} of {asked} images were produced",
                written.len()
            )),
        };
    }
    Outcome::Completed {
        images: written,
        pngs,
        pace,
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
