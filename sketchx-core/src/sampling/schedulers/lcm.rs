//! diffusers' `LCMScheduler` (`"lcm"`): latent consistency model sampling. Each step predicts the clean latents,
//! applies the consistency boundary condition (`denoised = c_out * x0 + c_skip * sample`) and, except on the last
//! step, re-noises them to the next timestep with fresh noise from the RNG.
//!
//! The few-step timestep schedule ([`consistency_timesteps`]) and the class defaults ([`consistency_config`]) are
//! shared with `TCDScheduler`.

use candle_core::{DType, Tensor};

use super::schedule::{
    alphas_cumprod, check_steps, div_scalar, final_alpha_cumprod, mul_scalar, round_through,
    Prediction,
};
use super::{DiffusionScheduler, SchedulerConfig, StepInput, StepOutput};
use crate::error::{Error, Result};
use crate::sampling::rng::TorchRng;

/// `original_inference_steps` when the config does not set it (LCM and TCD).
const DEFAULT_ORIGINAL_STEPS: usize = 50;

/// `sigma_data` of the consistency boundary condition (fixed in diffusers).
const SIGMA_DATA: f32 = 0.5;

/// `config` with the LCM / TCD class defaults for the keys the file does not set: their beta schedule defaults
/// to SD's (`scaled_linear`, 0.00085..0.012), `set_alpha_to_one` to true and `clip_sample` to false.
pub(super) fn consistency_config(config: &SchedulerConfig) -> SchedulerConfig {
    let mut c = config.clone();
    if !config.sets("beta_start") {
        c.beta_start = 0.00085;
    }
    if !config.sets("beta_end") {
        c.beta_end = 0.012;
    }
    if !config.sets("beta_schedule") {
        c.beta_schedule = "scaled_linear".to_string();
    }
    c.set_alpha_to_one = Some(config.set_alpha_to_one.unwrap_or(true));
    c.clip_sample = Some(config.clip_sample.unwrap_or(false));
    c
}

/// The LCM / TCD `set_timesteps(n)` schedule: `n` of the `original_inference_steps` distillation timesteps
/// `k - 1, 2k - 1, ...` (`k = num_train_timesteps / original_inference_steps`), taken in descending order at
/// indices `floor(i * len / n)` (numpy's `linspace(0, len, n, endpoint=False)` in float64).
///
/// A step count the schedule cannot serve gives [`Error::InvalidRequest`] for `steps`; an
/// `original_inference_steps` above the training timesteps gives [`Error::UnsupportedModel`].
pub(super) fn consistency_timesteps(
    config: &SchedulerConfig,
    n: usize,
    class: &str,
) -> Result<Vec<i64>> {
    check_steps(config, n)?;
    let n_train = config.num_train_timesteps;
    let original = config
        .original_inference_steps
        .unwrap_or(DEFAULT_ORIGINAL_STEPS);
    if original > n_train {
        return Err(Error::unsupported(
            &config.origin,
            format!(
                "{class} original_inference_steps {original} exceeds num_train_timesteps {n_train}"
            ),
        ));
    }
    if n > original {
        return Err(Error::invalid(
            "steps",
            format!(
                "{class} takes at most {original} steps (the model's original_inference_steps), got {n}"
            ),
        ));
    }
    let k = (n_train / original) as i64;
    let origin: Vec<i64> = (1..=original as i64).rev().map(|i| i * k - 1).collect();
    let step = origin.len() as f64 / n as f64;
    Ok((0..n)
        .map(|i| origin[(i as f64 * step).floor() as usize])
        .collect())
}

/// Refuses `trained_betas` shorter than the timesteps index (diffusers would fail with an index error mid-run).
pub(super) fn check_schedule_length(
    config: &SchedulerConfig,
    steps: &[i64],
    alphas_cumprod: &[f32],
) -> Result<()> {
    let len = alphas_cumprod.len();
    match steps.iter().max() {
        Some(&t) if t as usize >= len => Err(Error::unsupported(
            &config.origin,
            format!(
                "timestep {t} is past the {len} training steps of trained_betas (num_train_timesteps {})",
                config.num_train_timesteps
            ),
        )),
        _ => Ok(()),
    }
}

/// The predicted clean sample and noise from the model output, as diffusers' DDIM / LCM / TCD steps compute them, in
/// `dtype` (each op in f32, rounded through it): `(x0, eps)`.
pub(super) fn predict(
    prediction: Prediction,
    model_output: &Tensor,
    sample: &Tensor,
    alpha_t: f32,
    dtype: DType,
) -> Result<(Tensor, Tensor)> {
    let s = sample.to_dtype(DType::F32)?;
    let m = round_through(model_output.to_dtype(DType::F32)?, dtype)?;
    let beta_t = 1.0 - alpha_t;
    let (sqrt_a, sqrt_b) = (alpha_t.sqrt(), beta_t.sqrt());
    Ok(match prediction {
        Prediction::Epsilon => {
            let num = round_through((&s - mul_scalar(&m, sqrt_b, dtype)?)?, dtype)?;
            (round_through(div_scalar(&num, sqrt_a)?, dtype)?, m)
        }
        Prediction::Sample => {
            let num = round_through((&s - mul_scalar(&m, sqrt_a, dtype)?)?, dtype)?;
            let eps = round_through(div_scalar(&num, sqrt_b)?, dtype)?;
            (m, eps)
        }
        Prediction::Velocity => {
            let x0 = (mul_scalar(&s, sqrt_a, dtype)? - mul_scalar(&m, sqrt_b, dtype)?)?;
            let eps = (mul_scalar(&m, sqrt_a, dtype)? + mul_scalar(&s, sqrt_b, dtype)?)?;
            (round_through(x0, dtype)?, round_through(eps, dtype)?)
        }
    })
}

/// diffusers' `get_scalings_for_boundary_condition_discrete`: `(c_skip, c_out)` at integer timestep `t`, in
/// float32 as torch computes them from the integer timestep tensor (`0.25 / x` is `reciprocal(x) * 0.25`).
pub fn boundary_scalings(t: i64, timestep_scaling: f64) -> (f32, f32) {
    let scaled = t as f32 * timestep_scaling as f32;
    let denom = scaled * scaled + SIGMA_DATA * SIGMA_DATA;
    let c_skip = (1.0 / denom) * (SIGMA_DATA * SIGMA_DATA);
    let c_out = scaled / denom.sqrt();
    (c_skip, c_out)
}

/// A configured `LCMScheduler`.
#[derive(Debug, Clone)]
pub struct Lcm {
    prediction: Prediction,
    alphas_cumprod: Vec<f32>,
    steps: Vec<i64>,
    timesteps: Vec<f64>,
    final_alpha_cumprod: f32,
    clip: Option<f32>,
    timestep_scaling: f64,
}

impl Lcm {
    /// `LCMScheduler.from_config(config)` with `set_timesteps(n)`.
    ///
    /// `thresholding` and unknown prediction types give [`Error::UnsupportedModel`]; a step count above
    /// `original_inference_steps` gives [`Error::InvalidRequest`] for `steps`.
    pub fn new(config: &SchedulerConfig, n: usize) -> Result<Self> {
        let config = &consistency_config(config);
        let prediction = Prediction::parse(config, "LCMScheduler", true, false)?;
        if config.thresholding {
            return Err(Error::unsupported(
                &config.origin,
                "LCMScheduler thresholding is not implemented",
            ));
        }
        if !config.timestep_scaling.is_finite() {
            return Err(Error::unsupported(
                &config.origin,
                "LCMScheduler timestep_scaling must be a finite number",
            ));
        }
        let alphas_cumprod = alphas_cumprod(config)?;
        let steps = consistency_timesteps(config, n, "LCMScheduler")?;
        check_schedule_length(config, &steps, &alphas_cumprod)?;
        Ok(Self {
            final_alpha_cumprod: final_alpha_cumprod(config, &alphas_cumprod),
            prediction,
            timesteps: steps.iter().map(|&t| t as f64).collect(),
            steps,
            alphas_cumprod,
            clip: config
                .clip_sample
                .unwrap_or(false)
                .then_some(config.clip_sample_range as f32),
            timestep_scaling: config.timestep_scaling,
        })
    }
}

impl DiffusionScheduler for Lcm {
    /// Returns the next sample and `denoised` in `sample`'s dtype; every step but the last draws noise of that
    /// dtype and `model_output`'s shape from `rng`, as diffusers does.
    fn step(&mut self, input: StepInput<'_>, rng: &mut TorchRng) -> Result<StepOutput> {
        let (model_output, step_index, sample) =
            (input.model_output, input.step_index, input.sample);
        let dtype = sample.dtype();
        let t = self.steps[step_index];
        let last = step_index + 1 == self.steps.len();
        // diffusers uses the current timestep as the "previous" one on the last step (its noise is unused).
        let prev = if last { t } else { self.steps[step_index + 1] };
        let alpha_t = self.alphas_cumprod[t as usize];
        let alpha_prev = if prev >= 0 {
            self.alphas_cumprod[prev as usize]
        } else {
            self.final_alpha_cumprod
        };
        let (c_skip, c_out) = boundary_scalings(t, self.timestep_scaling);
        let (x0, _) = predict(self.prediction, model_output, sample, alpha_t, dtype)?;
        let x0 = match self.clip {
            Some(r) => x0.clamp(-r, r)?,
            None => x0,
        };
        let s = sample.to_dtype(DType::F32)?;
        let denoised = round_through(
            (mul_scalar(&x0, c_out, dtype)? + mul_scalar(&s, c_skip, dtype)?)?,
            dtype,
        )?;
        let prev_sample = if last {
            denoised.clone()
        } else {
            let noise = rng
                .randn_dtype(model_output.dims(), dtype, model_output.device())?
                .to_dtype(DType::F32)?;
            let beta_prev = 1.0 - alpha_prev;
            round_through(
                (mul_scalar(&denoised, alpha_prev.sqrt(), dtype)?
                    + mul_scalar(&noise, beta_prev.sqrt(), dtype)?)?,
                dtype,
            )?
        };
        Ok(StepOutput {
            prev_sample: prev_sample.to_dtype(dtype)?,
            x0: denoised.to_dtype(dtype)?,
        })
    }

    super::schedule_accessors!();
}
