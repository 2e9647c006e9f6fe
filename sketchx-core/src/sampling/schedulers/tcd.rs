//! diffusers' `TCDScheduler` (`"tcd"`): trajectory consistency distillation sampling. Each step predicts the
//! sample at an intermediate timestep `s = floor((1 - eta) * t_prev)` and, when `eta > 0` (except on the last
//! step), moves it to the next timestep with fresh noise from the RNG; `eta = 0` is deterministic.

use candle_core::DType;

use super::lcm::{check_schedule_length, consistency_config, consistency_timesteps, predict};
use super::schedule::{alphas_cumprod, check_eta, mul_scalar, round_through, Prediction};
use super::{DiffusionScheduler, SchedulerConfig, StepInput, StepOutput};
use crate::error::Result;
use crate::sampling::rng::TorchRng;

/// A configured `TCDScheduler` stepping with the pipeline's `eta`.
#[derive(Debug, Clone)]
pub struct Tcd {
    prediction: Prediction,
    alphas_cumprod: Vec<f32>,
    steps: Vec<i64>,
    timesteps: Vec<f64>,
    eta: f64,
}

impl Tcd {
    /// `TCDScheduler.from_config(config)` with `set_timesteps(n)`, stepping with `eta`.
    ///
    /// A step count above `original_inference_steps` gives [`crate::Error::InvalidRequest`] for `steps`, an `eta`
    /// outside `[0, 1]` one for `eta`.
    pub fn new(config: &SchedulerConfig, n: usize, eta: f64) -> Result<Self> {
        check_eta(eta)?;
        let config = &consistency_config(config);
        let prediction = Prediction::parse(config, "TCDScheduler", true, false)?;
        let alphas_cumprod = alphas_cumprod(config)?;
        let steps = consistency_timesteps(config, n, "TCDScheduler")?;
        check_schedule_length(config, &steps, &alphas_cumprod)?;
        Ok(Self {
            prediction,
            timesteps: steps.iter().map(|&t| t as f64).collect(),
            steps,
            alphas_cumprod,
            eta,
        })
    }

    /// The intermediate timestep `s` of step `step_index`: `floor((1 - eta) * t_prev)`, in float32 as torch
    /// computes it from the integer timestep (`t_prev = 0` after the last step).
    pub fn timestep_s(&self, step_index: usize) -> i64 {
        let prev = self.steps.get(step_index + 1).copied().unwrap_or(0);
        ((1.0 - self.eta) as f32 * prev as f32).floor() as i64
    }
}

impl DiffusionScheduler for Tcd {
    /// Returns the next sample and `pred_noised_sample` in `sample`'s dtype; when `eta > 0`, every step but the
    /// last draws noise of that dtype and `model_output`'s shape from `rng`, as diffusers does.
    fn step(&mut self, input: StepInput<'_>, rng: &mut TorchRng) -> Result<StepOutput> {
        let (model_output, step_index, sample) =
            (input.model_output, input.step_index, input.sample);
        let dtype = sample.dtype();
        let t = self.steps[step_index];
        let last = step_index + 1 == self.steps.len();
        let prev = self.steps.get(step_index + 1).copied().unwrap_or(0);
        let s_t = self.timestep_s(step_index);
        let alpha_t = self.alphas_cumprod[t as usize];
        let alpha_prev = self.alphas_cumprod[prev as usize];
        let alpha_s = self.alphas_cumprod[s_t as usize];
        let beta_s = 1.0 - alpha_s;
        let (x0, eps) = predict(self.prediction, model_output, sample, alpha_t, dtype)?;
        let noised = round_through(
            (mul_scalar(&x0, alpha_s.sqrt(), dtype)? + mul_scalar(&eps, beta_s.sqrt(), dtype)?)?,
            dtype,
        )?;
        let prev_sample = if self.eta > 0.0 && !last {
            let noise = rng
                .randn_dtype(model_output.dims(), dtype, model_output.device())?
                .to_dtype(DType::F32)?;
            let ratio = alpha_prev / alpha_s;
            round_through(
                (mul_scalar(&noised, ratio.sqrt(), dtype)?
                    + mul_scalar(&noise, (1.0 - ratio).sqrt(), dtype)?)?,
                dtype,
            )?
        } else {
            noised.clone()
        };
        Ok(StepOutput {
            prev_sample: prev_sample.to_dtype(dtype)?,
            x0: noised.to_dtype(dtype)?,
        })
    }

    super::schedule_accessors!();
}
