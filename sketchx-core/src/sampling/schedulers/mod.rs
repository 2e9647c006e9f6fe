//! Noise schedulers reproducing diffusers 0.42.1: `EulerAncestralDiscreteScheduler`, `EulerDiscreteScheduler`,
//! `DDIMScheduler`, and the few-step `LCMScheduler` and `TCDScheduler`, each built like
//! `<Class>.from_config(scheduler_config)`, one per file behind the [`DiffusionScheduler`] trait; [`Scheduler`]
//! picks one by [`SchedulerKind`]. Every step also returns its clean-latent estimate ([`StepOutput::x0`]).
//!
//! The arithmetic follows diffusers step by step, in the same precisions: the beta schedule, cumulative products
//! and sigmas in float32 as torch computes them (torch's `linspace` and `cumprod` included), timestep spacings and
//! sigma interpolation in float64 as numpy computes them, and every step in float32 with the scalar coefficients
//! rounded where torch rounds them. On the CPU the results are bit-identical to diffusers for float32 tensors.
//!
//! Usage mirrors a diffusers denoising loop, indexing steps explicitly:
//!
//! ```ignore
//! let mut sched = Scheduler::new(SchedulerKind::EulerAncestral, &config, 30)?;
//! let mut latents = (rng.randn(&shape, &device)? * sched.init_noise_sigma())?;
//! for i in 0..sched.timesteps().len() {
//!     let input = sched.scale_model_input(&latents, i)?;
//!     let eps = unet(&input, sched.timesteps()[i])?;
//!     latents = sched.step(&eps, i, &latents, &mut rng)?;
//! }
//! ```
//!
//! Note that `timesteps().len()` can exceed the requested step count: diffusers' `trailing` spacing yields one
//! extra timestep (`-1`) for some counts (61, 103, 121, ...), and the loop must run over all of them to match.

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::sampling::rng::TorchRng;

mod config;
mod ddim;
mod euler;
mod lcm;
mod schedule;
mod tcd;

pub use config::{SchedulerConfig, MAX_TRAIN_TIMESTEPS};
pub use ddim::Ddim;
pub use euler::Euler;
pub use lcm::{boundary_scalings as lcm_boundary_scalings, Lcm};
pub use schedule::Spacing as TimestepSpacing;
use schedule::Spacing;
pub use tcd::Tcd;

/// Allowed `eta` (DDIM and TCD stochasticity), as diffusers asserts for TCD.
pub const ETA_RANGE: std::ops::RangeInclusive<f64> = 0.0..=1.0;

/// What one scheduler step returns: the next sample and the step's estimate of the clean latents.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// The sample for the next step (the final latents after the last step).
    pub prev_sample: Tensor,
    /// The step's clean-latent estimate, as diffusers returns it: `pred_original_sample` for Euler, Euler
    /// Ancestral and DDIM, `denoised` for LCM, `pred_noised_sample` for TCD. Previews decode it.
    pub x0: Tensor,
}

/// Which sampler to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SchedulerKind {
    /// `EulerAncestralDiscreteScheduler` (`"euler_a"`): Euler steps plus fresh noise from the RNG every step.
    #[default]
    EulerAncestral,
    /// `EulerDiscreteScheduler` (`"euler"`), deterministic (`s_churn = 0`).
    Euler,
    /// `DDIMScheduler` (`"ddim"`); stochastic when the request's `eta` is above 0.
    Ddim,
    /// `LCMScheduler` (`"lcm"`): latent consistency model sampling, fresh noise from the RNG every step but the last.
    Lcm,
    /// `TCDScheduler` (`"tcd"`): trajectory consistency distillation sampling; `eta` sets its stochasticity.
    Tcd,
}

impl SchedulerKind {
    /// Every kind, in the order of help texts and API descriptions (the default first).
    pub const ALL: [SchedulerKind; 5] = [
        SchedulerKind::EulerAncestral,
        SchedulerKind::Euler,
        SchedulerKind::Ddim,
        SchedulerKind::Lcm,
        SchedulerKind::Tcd,
    ];

    /// The request names of [`SchedulerKind::ALL`], in that order.
    pub fn names() -> [&'static str; 5] {
        Self::ALL.map(|k| k.as_str())
    }

    /// The request name: `"euler_a"`, `"euler"`, `"ddim"`, `"lcm"` or `"tcd"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            SchedulerKind::EulerAncestral => "euler_a",
            SchedulerKind::Euler => "euler",
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Lcm => "lcm",
            SchedulerKind::Tcd => "tcd",
        }
    }

    /// The diffusers class this kind reproduces.
    pub fn diffusers_class(&self) -> &'static str {
        match self {
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Lcm => "LCMScheduler",
            SchedulerKind::Tcd => "TCDScheduler",
        }
    }
}

crate::names::name_traits!(SchedulerKind, "scheduler", "scheduler");

/// One sampler configured for a denoising run of a fixed number of steps, as a diffusers scheduler is after
/// `set_timesteps`. Step indices passed in are below `timesteps().len()` ([`Scheduler`] checks them).
pub trait DiffusionScheduler: std::fmt::Debug + Send + Sync {
    /// The model's timestep for each step, in order (float32 values widened to f64; integers for DDIM, LCM and
    /// TCD).
    fn timesteps(&self) -> &[f64];

    /// The scale of the initial noise: multiply the RNG's standard normal latents by this. 1 unless the
    /// scheduler works in sigma space (Euler).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// The training schedule's cumulative alpha products (float32, as diffusers holds them).
    fn alphas_cumprod(&self) -> &[f32];

    /// The sigmas (one per timestep, then the final one) of sigma-based schedulers; empty otherwise.
    fn sigmas(&self) -> &[f32] {
        &[]
    }

    /// Scales the model input for step `step_index`; the result has the sample's dtype. The identity unless the
    /// scheduler works in sigma space (Euler).
    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        let _ = step_index;
        Ok(sample.clone())
    }

    /// One denoising step from `input`.
    fn step(&mut self, input: StepInput<'_>, rng: &mut TorchRng) -> Result<StepOutput>;

    /// Noises clean f32 latents `original` with f32 `noise` to the level of step `step_index`, as diffusers'
    /// `add_noise(original, noise, timesteps[step_index:step_index + 1])` does for img2img. This default is
    /// DDPM's `sqrt(a) * original + sqrt(1 - a) * noise` with `a = alphas_cumprod[timesteps[step_index]]`
    /// (DDIM, LCM, TCD), each factor and product rounded to float32 as torch does.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let t = self.timesteps()[step_index];
        let ac = self.alphas_cumprod();
        if t < 0.0 || t.fract() != 0.0 || t as usize >= ac.len() {
            return Err(Error::invalid(
                "strength",
                format!("the first step it keeps has timestep {t}, which has no noise level"),
            ));
        }
        let a = ac[t as usize];
        let (keep, add) = (a.sqrt(), (1.0 - a).sqrt());
        let original = original.to_dtype(candle_core::DType::F32)?;
        let noise = noise.to_dtype(candle_core::DType::F32)?;
        Ok((original.affine(f64::from(keep), 0.0)? + noise.affine(f64::from(add), 0.0)?)?)
    }
}

/// Where img2img starts in a schedule of `num_inference_steps` steps for `strength`: diffusers' `get_timesteps`
/// keeps `min(int(num_inference_steps * strength), num_inference_steps)` steps, so the loop begins at step index
/// `num_inference_steps` minus that (`set_begin_index`; every scheduler here has `order` 1). A strength of 1
/// begins at 0 (the whole schedule); a strength too small to keep a step gives `num_inference_steps`, where
/// nothing would run (the request's validation refuses it).
pub fn strength_begin_index(num_inference_steps: usize, strength: f64) -> usize {
    // Python's int() of a non-negative float: truncation (`as` saturates, and NaN gives 0).
    let kept = ((num_inference_steps as f64 * strength) as usize).min(num_inference_steps);
    num_inference_steps - kept
}

/// What one denoising step is given: the (guided) model prediction for `sample` at `step_index`.
#[derive(Debug, Clone, Copy)]
pub struct StepInput<'a> {
    /// The guided noise (or v / sample) prediction.
    pub model_output: &'a Tensor,
    /// Which step, below `timesteps().len()`.
    pub step_index: usize,
    /// The current latents.
    pub sample: &'a Tensor,
}

/// The `timesteps` and `alphas_cumprod` accessors of a scheduler that keeps them in fields of those names.
macro_rules! schedule_accessors {
    () => {
        fn timesteps(&self) -> &[f64] {
            &self.timesteps
        }

        fn alphas_cumprod(&self) -> &[f32] {
            &self.alphas_cumprod
        }
    };
}
use schedule_accessors;

/// The configured scheduler of each kind.
#[derive(Debug, Clone)]
enum Inner {
    Euler(Euler),
    Ddim(Ddim),
    Lcm(Lcm),
    Tcd(Tcd),
}

/// A configured scheduler for one denoising run of a fixed number of steps.
#[derive(Debug, Clone)]
pub struct Scheduler {
    kind: SchedulerKind,
    inner: Inner,
}

impl Scheduler {
    /// Builds `kind` from `config` (as `from_config` would) and sets `num_inference_steps` steps.
    ///
    /// Options the class takes but sketchx does not implement, and invalid values, give
    /// [`Error::UnsupportedModel`] naming the config's origin; a step count of 0 or above the number of training
    /// timesteps gives [`Error::InvalidRequest`] for `steps`.
    pub fn new(
        kind: SchedulerKind,
        config: &SchedulerConfig,
        num_inference_steps: usize,
    ) -> Result<Self> {
        Self::with_eta(kind, config, num_inference_steps, 0.0)
    }

    /// Like [`Scheduler::new`], with the pipeline's `eta`, which diffusers passes to every `step` taking it (DDIM
    /// and TCD; the other kinds ignore it). An `eta` outside [`ETA_RANGE`] gives [`Error::InvalidRequest`] for
    /// `eta`.
    pub fn with_eta(
        kind: SchedulerKind,
        config: &SchedulerConfig,
        num_inference_steps: usize,
        eta: f64,
    ) -> Result<Self> {
        schedule::check_eta(eta)?;
        let n = num_inference_steps;
        let inner = match kind {
            SchedulerKind::EulerAncestral => Inner::Euler(Euler::ancestral(config, n)?),
            SchedulerKind::Euler => Inner::Euler(Euler::discrete(config, n)?),
            SchedulerKind::Ddim => Inner::Ddim(Ddim::with_eta(config, n, eta)?),
            SchedulerKind::Lcm => Inner::Lcm(Lcm::new(config, n)?),
            SchedulerKind::Tcd => Inner::Tcd(Tcd::new(config, n, eta)?),
        };
        Ok(Self { kind, inner })
    }

    fn sampler(&self) -> &dyn DiffusionScheduler {
        match &self.inner {
            Inner::Euler(s) => s,
            Inner::Ddim(s) => s,
            Inner::Lcm(s) => s,
            Inner::Tcd(s) => s,
        }
    }

    fn sampler_mut(&mut self) -> &mut dyn DiffusionScheduler {
        match &mut self.inner {
            Inner::Euler(s) => s,
            Inner::Ddim(s) => s,
            Inner::Lcm(s) => s,
            Inner::Tcd(s) => s,
        }
    }

    /// Which sampler this is.
    pub fn kind(&self) -> SchedulerKind {
        self.kind
    }

    /// The model's timestep for each step, in order (float32 values widened to f64; integers for DDIM, LCM and
    /// TCD).
    ///
    /// Its length is the number of steps to run; it can exceed the requested count for `trailing` spacing.
    pub fn timesteps(&self) -> &[f64] {
        self.sampler().timesteps()
    }

    /// The sigmas of the Euler schedulers (one per timestep, then the final one); empty for the others.
    pub fn sigmas(&self) -> &[f32] {
        self.sampler().sigmas()
    }

    /// The training schedule's cumulative alpha products (float32, as diffusers holds them).
    pub fn alphas_cumprod(&self) -> &[f32] {
        self.sampler().alphas_cumprod()
    }

    /// The scale of the initial noise: multiply the RNG's standard normal latents by this.
    pub fn init_noise_sigma(&self) -> f64 {
        self.sampler().init_noise_sigma()
    }

    fn check_index(&self, step_index: usize) -> Result<()> {
        let n = self.timesteps().len();
        if step_index >= n {
            return Err(Error::invalid(
                "steps",
                format!("step index {step_index} is past the {n} scheduled steps"),
            ));
        }
        Ok(())
    }

    /// Scales the model input for step `step_index` (divides by `sqrt(sigma^2 + 1)` for the Euler schedulers;
    /// the identity for the others). The result has the sample's dtype.
    pub fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        self.check_index(step_index)?;
        self.sampler().scale_model_input(sample, step_index)
    }

    /// Noises clean latents to the level of step `step_index` (img2img's first step): diffusers'
    /// `scheduler.add_noise(original, noise, timesteps[step_index])` after `set_begin_index(step_index)`. For
    /// the Euler schedulers `original + noise * sigmas[step_index]`, for DDIM, LCM and TCD
    /// `sqrt(a) * original + sqrt(1 - a) * noise` with `a` the timestep's cumulative alpha product; float32.
    pub fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step_index: usize,
    ) -> Result<Tensor> {
        self.check_index(step_index)?;
        self.sampler().add_noise(original, noise, step_index)
    }

    /// One denoising step: `model_output` is the (guided) noise prediction for `sample` at `step_index`; returns
    /// the sample for the next step ([`Scheduler::step_output`] also returns the step's x0 estimate).
    pub fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        rng: &mut TorchRng,
    ) -> Result<Tensor> {
        Ok(self
            .step_output(model_output, step_index, sample, rng)?
            .prev_sample)
    }

    /// One denoising step, returning the next sample and the step's x0 estimate ([`StepOutput`]).
    ///
    /// The next sample has `model_output`'s dtype for the Euler schedulers (as diffusers) and `sample`'s dtype
    /// for DDIM, LCM and TCD. RNG draws follow diffusers exactly: Euler Ancestral draws noise of `model_output`'s
    /// shape and dtype every step (also the last); LCM every step but the last; TCD every step but the last
    /// when `eta > 0`; DDIM every step when `eta > 0`; Euler never (`s_churn = 0`).
    pub fn step_output(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        rng: &mut TorchRng,
    ) -> Result<StepOutput> {
        self.check_index(step_index)?;
        let input = StepInput {
            model_output,
            step_index,
            sample,
        };
        self.sampler_mut().step(input, rng)
    }
}
