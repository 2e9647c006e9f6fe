//! diffusers' `DDIMScheduler` (`"ddim"`), with the pipeline's `eta` (deterministic at 0, the default).

use candle_core::{DType, Tensor};

use super::schedule::{
    alphas_cumprod, check_eta, check_steps, final_alpha_cumprod, integer_timesteps, mul_scalar,
    round_through, Prediction, Spacing,
};
use super::{DiffusionScheduler, SchedulerConfig, StepInput, StepOutput};
use crate::error::{Error, Result};
use crate::sampling::rng::TorchRng;

/// A configured `DDIMScheduler`: integer timesteps indexing the training alpha products.
#[derive(Debug, Clone)]
pub struct Ddim {
    prediction: Prediction,
    alphas_cumprod: Vec<f32>,
    steps: Vec<i64>,
    timesteps: Vec<f64>,
    final_alpha_cumprod: f32,
    step_ratio: i64,
    clip: Option<f32>,
    eta: f32,
}

impl Ddim {
    /// `DDIMScheduler.from_config(config)` with `set_timesteps(n)`, stepping with `eta = 0`.
    pub fn new(config: &SchedulerConfig, n: usize) -> Result<Self> {
        Self::with_eta(config, n, 0.0)
    }

    /// Like [`Ddim::new`], stepping with `eta` (outside `[0, 1]`: [`Error::InvalidRequest`] for `eta`).
    pub fn with_eta(config: &SchedulerConfig, n: usize, eta: f64) -> Result<Self> {
        check_eta(eta)?;
        check_steps(config, n)?;
        let prediction = Prediction::parse(config, "DDIMScheduler", true, false)?;
        let spacing = Spacing::parse(config, Spacing::Leading)?;
        let alphas_cumprod = alphas_cumprod(config)?;
        if config.thresholding {
            return Err(Error::unsupported(
                &config.origin,
                "DDIMScheduler thresholding is not implemented",
            ));
        }
        let steps = integer_timesteps(config, spacing, n);
        let len = alphas_cumprod.len() as i64;
        if let Some(bad) = steps.iter().find(|&&t| t >= len || t < -len) {
            return Err(Error::invalid(
                "steps",
                format!(
                    "{n} steps give timestep {bad}, outside the {len} training timesteps of {}",
                    config.origin
                ),
            ));
        }
        let final_alpha_cumprod = final_alpha_cumprod(config, &alphas_cumprod);
        let clip = config
            .clip_sample
            .unwrap_or(true)
            .then_some(config.clip_sample_range as f32);
        Ok(Self {
            prediction,
            timesteps: steps.iter().map(|&t| t as f64).collect(),
            steps,
            alphas_cumprod,
            final_alpha_cumprod,
            step_ratio: (config.num_train_timesteps / n) as i64,
            clip,
            // torch multiplies the float32 variance by the Python float cast to float32.
            eta: eta as f32,
        })
    }

    /// The training alpha product at timestep `t`, Python-indexed (a timestep of -1, from `trailing` spacing,
    /// reads the last entry).
    fn alpha_at(&self, t: i64) -> f32 {
        let len = self.alphas_cumprod.len() as i64;
        self.alphas_cumprod[if t < 0 { t + len } else { t } as usize]
    }
}

impl DiffusionScheduler for Ddim {
    /// Returns the next sample and `pred_original_sample` in `sample`'s dtype; draws noise of `model_output`'s
    /// shape and dtype from `rng` when `eta > 0`, as diffusers does.
    fn step(&mut self, input: StepInput<'_>, rng: &mut TorchRng) -> Result<StepOutput> {
        let (model_output, step_index, sample) =
            (input.model_output, input.step_index, input.sample);
        let t = self.steps[step_index];
        let prev = t - self.step_ratio;
        let alpha_t = self.alpha_at(t);
        let alpha_prev = if prev >= 0 {
            self.alpha_at(prev)
        } else {
            self.final_alpha_cumprod
        };
        let (prev, x0, std_dev_t) = ddim_step(
            self.prediction,
            model_output,
            sample,
            (alpha_t, alpha_prev),
            self.clip,
            self.eta,
        )?;
        let dtype = sample.dtype();
        let prev = if self.eta > 0.0 {
            let out_dtype = model_output.dtype();
            let noise = rng
                .randn_dtype(model_output.dims(), out_dtype, model_output.device())?
                .to_dtype(DType::F32)?;
            let variance = mul_scalar(&noise, std_dev_t, out_dtype)?;
            round_through((prev.to_dtype(DType::F32)? + variance)?, dtype)?.to_dtype(dtype)?
        } else {
            prev
        };
        Ok(StepOutput {
            prev_sample: prev,
            x0: x0.to_dtype(dtype)?,
        })
    }

    super::schedule_accessors!();
}

/// DDIM step before its noise, computed in `sample`'s dtype (each op in f32, rounded through that dtype): the
/// next sample, the (clipped) `pred_original_sample`, and the noise scale `std_dev_t`.
fn ddim_step(
    prediction: Prediction,
    model_output: &Tensor,
    sample: &Tensor,
    (alpha_t, alpha_prev): (f32, f32),
    clip: Option<f32>,
    eta: f32,
) -> Result<(Tensor, Tensor, f32)> {
    let dtype = sample.dtype();
    let beta_t = 1.0 - alpha_t;
    // The same prediction as LCM's and TCD's steps.
    let (pred_original, pred_epsilon) =
        super::lcm::predict(prediction, model_output, sample, alpha_t, dtype)?;
    let pred_original = match clip {
        Some(r) => pred_original.clamp(-r, r)?,
        None => pred_original,
    };
    // std_dev_t = eta * sqrt(variance) (NaN at eta = 0 if the variance is, as in torch).
    let beta_prev = 1.0 - alpha_prev;
    let variance = (beta_prev / beta_t) * (1.0 - alpha_t / alpha_prev);
    let std_dev_t = eta * variance.sqrt();
    let dir_coeff = (1.0 - alpha_prev - std_dev_t * std_dev_t).sqrt();
    let direction = mul_scalar(&pred_epsilon, dir_coeff, dtype)?;
    let prev = (mul_scalar(&pred_original, alpha_prev.sqrt(), dtype)? + direction)?;
    Ok((
        round_through(prev, dtype)?.to_dtype(dtype)?,
        pred_original,
        std_dev_t,
    ))
}
