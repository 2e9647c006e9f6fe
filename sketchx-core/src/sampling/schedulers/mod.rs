//! Noise schedulers reproducing diffusers 0.42.1: `EulerAncestralDiscreteScheduler`, `EulerDiscreteScheduler` and
//! `DDIMScheduler`, each built like `<Class>.from_config(scheduler_config)`, one per file behind the
//! [`DiffusionScheduler`] trait; [`Scheduler`] picks one by [`SchedulerKind`].
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

use std::str::FromStr;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::sampling::rng::TorchRng;

mod config;
mod ddim;
mod euler;
mod schedule;

pub use config::SchedulerConfig;
pub use ddim::Ddim;
pub use euler::Euler;

/// Which sampler to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SchedulerKind {
    /// `EulerAncestralDiscreteScheduler` (`"euler_a"`): Euler steps plus fresh noise from the RNG every step.
    #[default]
    EulerAncestral,
    /// `EulerDiscreteScheduler` (`"euler"`), deterministic (`s_churn = 0`).
    Euler,
    /// `DDIMScheduler` (`"ddim"`), deterministic (`eta = 0`).
    Ddim,
}

impl SchedulerKind {
    /// Every kind, in the order of help texts and API descriptions (the default first).
    pub const ALL: [SchedulerKind; 3] = [
        SchedulerKind::EulerAncestral,
        SchedulerKind::Euler,
        SchedulerKind::Ddim,
    ];

    /// The request names of [`SchedulerKind::ALL`], in that order.
    pub fn names() -> [&'static str; 3] {
        Self::ALL.map(|k| k.as_str())
    }

    /// The request name: `"euler_a"`, `"euler"` or `"ddim"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            SchedulerKind::EulerAncestral => "euler_a",
            SchedulerKind::Euler => "euler",
            SchedulerKind::Ddim => "ddim",
        }
    }

    /// The diffusers class this kind reproduces.
    pub fn diffusers_class(&self) -> &'static str {
        match self {
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::Ddim => "DDIMScheduler",
        }
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SchedulerKind {
    type Err = Error;

    /// Parses a request name ([`SchedulerKind::names`]; ASCII case-insensitive, surrounding whitespace ignored).
    fn from_str(s: &str) -> Result<Self> {
        crate::names::parse_name("scheduler", "scheduler", s, &Self::ALL, |k| k.as_str())
    }
}

/// One sampler configured for a denoising run of a fixed number of steps, as a diffusers scheduler is after
/// `set_timesteps`. Step indices passed in are below `timesteps().len()` ([`Scheduler`] checks them).
pub trait DiffusionScheduler: std::fmt::Debug + Send + Sync {
    /// The model's timestep for each step, in order (float32 values widened to f64; integers for DDIM).
    fn timesteps(&self) -> &[f64];

    /// The scale of the initial noise: multiply the RNG's standard normal latents by this.
    fn init_noise_sigma(&self) -> f64;

    /// The training schedule's cumulative alpha products (float32, as diffusers holds them).
    fn alphas_cumprod(&self) -> &[f32];

    /// The sigmas (one per timestep, then the final one) of sigma-based schedulers; empty otherwise.
    fn sigmas(&self) -> &[f32] {
        &[]
    }

    /// Scales the model input for step `step_index`; the result has the sample's dtype.
    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor>;

    /// One denoising step: `model_output` is the (guided) prediction for `sample` at `step_index`.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        rng: &mut TorchRng,
    ) -> Result<Tensor>;
}

/// The configured scheduler of each kind.
#[derive(Debug, Clone)]
enum Inner {
    Euler(Euler),
    Ddim(Ddim),
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
        let n = num_inference_steps;
        let inner = match kind {
            SchedulerKind::EulerAncestral => Inner::Euler(Euler::ancestral(config, n)?),
            SchedulerKind::Euler => Inner::Euler(Euler::discrete(config, n)?),
            SchedulerKind::Ddim => Inner::Ddim(Ddim::new(config, n)?),
        };
        Ok(Self { kind, inner })
    }

    fn sampler(&self) -> &dyn DiffusionScheduler {
        match &self.inner {
            Inner::Euler(s) => s,
            Inner::Ddim(s) => s,
        }
    }

    fn sampler_mut(&mut self) -> &mut dyn DiffusionScheduler {
        match &mut self.inner {
            Inner::Euler(s) => s,
            Inner::Ddim(s) => s,
        }
    }

    /// Which sampler this is.
    pub fn kind(&self) -> SchedulerKind {
        self.kind
    }

    /// The model's timestep for each step, in order (float32 values widened to f64; integers for DDIM).
    ///
    /// Its length is the number of steps to run; it can exceed the requested count for `trailing` spacing.
    pub fn timesteps(&self) -> &[f64] {
        self.sampler().timesteps()
    }

    /// The sigmas of the Euler schedulers (one per timestep, then the final one); empty for DDIM.
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
    /// the identity for DDIM). The result has the sample's dtype.
    pub fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        self.check_index(step_index)?;
        self.sampler().scale_model_input(sample, step_index)
    }

    /// One denoising step: `model_output` is the (guided) noise prediction for `sample` at `step_index`.
    ///
    /// Returns the sample for the next step, in `model_output`'s dtype for the Euler schedulers (as diffusers) and
    /// in `sample`'s dtype for DDIM. Euler Ancestral draws noise of `model_output`'s shape and dtype from `rng`
    /// every step (also the last), as diffusers does; Euler and DDIM draw nothing (diffusers draws only for
    /// `s_churn > 0` / `eta > 0`, which are not offered).
    pub fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        rng: &mut TorchRng,
    ) -> Result<Tensor> {
        self.check_index(step_index)?;
        self.sampler_mut()
            .step(model_output, step_index, sample, rng)
    }
}
