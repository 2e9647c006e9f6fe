//! diffusers' `EulerDiscreteScheduler` (`"euler"`, deterministic: `s_churn = 0`) and
//! `EulerAncestralDiscreteScheduler` (`"euler_a"`: Euler steps plus fresh noise from the RNG every step), which share
//! one sigma schedule and differ only in the step.

use candle_core::{DType, Tensor};

use super::schedule::{
    alphas_cumprod, check_steps, div_scalar, mul_scalar, np_arange_down, np_interp_grid,
    np_linspace, round_through, sigma_to_t, Prediction, Spacing,
};
use super::{DiffusionScheduler, SchedulerConfig, StepInput, StepOutput};
use crate::error::{Error, Result};
use crate::sampling::rng::TorchRng;

/// The state of both Euler schedulers: one sigma per timestep plus the final one.
#[derive(Debug, Clone)]
pub(super) struct SigmaSchedule {
    pub(super) prediction: Prediction,
    pub(super) alphas_cumprod: Vec<f32>,
    pub(super) timesteps: Vec<f64>,
    pub(super) sigmas: Vec<f32>,
    pub(super) init_noise_sigma: f32,
}

impl SigmaSchedule {
    /// `set_timesteps(n)` of `class` built from `config`; `discrete` for `EulerDiscreteScheduler`.
    pub(super) fn new(
        config: &SchedulerConfig,
        n: usize,
        class: &str,
        discrete: bool,
    ) -> Result<Self> {
        check_steps(config, n)?;
        let prediction = Prediction::parse(config, class, discrete, discrete)?;
        let spacing = Spacing::parse(config, Spacing::Linspace)?;
        let mut alphas_cumprod = alphas_cumprod(config)?;
        if discrete {
            check_euler_options(config, prediction)
                .map_err(|m| Error::unsupported(&config.origin, m))?;
        }
        if config.rescale_betas_zero_snr {
            // diffusers keeps the first sigma finite with the smallest positive float16 subnormal.
            let last = alphas_cumprod.len() - 1;
            alphas_cumprod[last] = 2f32.powi(-24);
        }
        let (timesteps, sigmas) = sigma_schedule(config, discrete, spacing, n, &alphas_cumprod);
        let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let init_noise_sigma = match spacing {
            Spacing::Linspace | Spacing::Trailing => max,
            Spacing::Leading => (max * max + 1.0).sqrt(),
        };
        Ok(Self {
            prediction,
            alphas_cumprod,
            timesteps,
            sigmas,
            init_noise_sigma,
        })
    }

    /// Divides by `sqrt(sigma^2 + 1)`; the result has the sample's dtype.
    pub(super) fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        let sigma = self.sigmas[step_index];
        let divisor = (sigma * sigma + 1.0).sqrt();
        let dtype = sample.dtype();
        let scaled = div_scalar(&sample.to_dtype(DType::F32)?, divisor)?;
        Ok(scaled.to_dtype(dtype)?)
    }

    /// The f32 sample, the ODE derivative `(sample - x0) / sigma` at `sigma`, and `x0` (f32), predicted from the
    /// model output as diffusers does (scalar products rounded through the output's dtype).
    pub(super) fn derivative(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        sigma: f32,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let out_dtype = model_output.dtype();
        let sample = sample.to_dtype(DType::F32)?;
        let model = model_output.to_dtype(DType::F32)?;
        let pred_original = match self.prediction {
            Prediction::Epsilon => (&sample - mul_scalar(&model, sigma, out_dtype)?)?,
            Prediction::Velocity => {
                let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
                let c_skip_div = sigma * sigma + 1.0;
                (mul_scalar(&model, c_out, out_dtype)? + div_scalar(&sample, c_skip_div)?)?
            }
            Prediction::Sample => round_through(model, out_dtype)?,
        };
        let derivative = div_scalar(&(&sample - &pred_original)?, sigma)?;
        Ok((sample, derivative, pred_original))
    }
}

/// A configured `EulerDiscreteScheduler` (deterministic) or `EulerAncestralDiscreteScheduler`.
#[derive(Debug, Clone)]
pub struct Euler {
    schedule: SigmaSchedule,
    ancestral: bool,
}

impl Euler {
    /// `EulerDiscreteScheduler.from_config(config)` with `set_timesteps(n)`.
    pub fn discrete(config: &SchedulerConfig, n: usize) -> Result<Self> {
        Ok(Self {
            schedule: SigmaSchedule::new(config, n, "EulerDiscreteScheduler", true)?,
            ancestral: false,
        })
    }

    /// `EulerAncestralDiscreteScheduler.from_config(config)` with `set_timesteps(n)`.
    pub fn ancestral(config: &SchedulerConfig, n: usize) -> Result<Self> {
        Ok(Self {
            schedule: SigmaSchedule::new(config, n, "EulerAncestralDiscreteScheduler", false)?,
            ancestral: true,
        })
    }
}

impl DiffusionScheduler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        f64::from(self.schedule.init_noise_sigma)
    }

    fn alphas_cumprod(&self) -> &[f32] {
        &self.schedule.alphas_cumprod
    }

    fn sigmas(&self) -> &[f32] {
        &self.schedule.sigmas
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        self.schedule.scale_model_input(sample, step_index)
    }

    /// `original + noise * sigmas[step_index]` in float32 (the sigma of the begin index, as diffusers' Euler
    /// schedulers pick it after `set_begin_index`).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let sigma = self.schedule.sigmas[step_index];
        let noise = mul_scalar(&noise.to_dtype(DType::F32)?, sigma, DType::F32)?;
        Ok((original.to_dtype(DType::F32)? + noise)?)
    }

    /// Returns the next sample in `model_output`'s dtype and `pred_original_sample` in f32 (as diffusers). The
    /// ancestral scheduler draws noise of `model_output`'s shape and dtype from `rng` every step (also the last),
    /// as diffusers does; the discrete one draws nothing.
    fn step(&mut self, input: StepInput<'_>, rng: &mut TorchRng) -> Result<StepOutput> {
        let (model_output, step_index, sample) =
            (input.model_output, input.step_index, input.sample);
        let s = &self.schedule;
        let out_dtype = model_output.dtype();
        let (sigma, sigma_next) = (s.sigmas[step_index], s.sigmas[step_index + 1]);
        let (sample, derivative, x0) = s.derivative(model_output, sample, sigma)?;
        if !self.ancestral {
            let prev = (&sample + derivative.affine(f64::from(sigma_next - sigma), 0.0)?)?;
            return Ok(StepOutput {
                prev_sample: prev.to_dtype(out_dtype)?,
                x0,
            });
        }
        let sigma_up = (sigma_next * sigma_next * (sigma * sigma - sigma_next * sigma_next)
            / (sigma * sigma))
            .sqrt();
        let sigma_down = (sigma_next * sigma_next - sigma_up * sigma_up).sqrt();
        let prev = (&sample + derivative.affine(f64::from(sigma_down - sigma), 0.0)?)?;
        // Drawn in the model output's dtype, as diffusers' `randn_tensor`.
        let noise = rng
            .randn_dtype(model_output.dims(), out_dtype, model_output.device())?
            .to_dtype(DType::F32)?;
        let prev = (prev + mul_scalar(&noise, sigma_up, out_dtype)?)?;
        Ok(StepOutput {
            prev_sample: prev.to_dtype(out_dtype)?,
            x0,
        })
    }
}

/// Rejects `EulerDiscreteScheduler` options that are not implemented.
fn check_euler_options(
    config: &SchedulerConfig,
    prediction: Prediction,
) -> std::result::Result<(), String> {
    if config.interpolation_type != "linear" {
        return Err(format!(
            "EulerDiscreteScheduler interpolation_type {:?} is not implemented (only \"linear\")",
            config.interpolation_type
        ));
    }
    if config.use_exponential_sigmas || config.use_beta_sigmas {
        return Err(
            "EulerDiscreteScheduler use_exponential_sigmas / use_beta_sigmas are not implemented"
                .to_string(),
        );
    }
    match config.timestep_type.as_str() {
        "discrete" => {}
        "continuous" if prediction != Prediction::Velocity => {}
        other => {
            return Err(format!(
                "EulerDiscreteScheduler timestep_type {other:?} with prediction_type {:?} is not implemented",
                config.prediction_type
            ))
        }
    }
    if config.final_sigmas_type != "zero" && config.final_sigmas_type != "sigma_min" {
        return Err(format!(
            "EulerDiscreteScheduler final_sigmas_type {:?} is not supported",
            config.final_sigmas_type
        ));
    }
    Ok(())
}

/// Timesteps and sigmas of the Euler schedulers' `set_timesteps`; `discrete` adds `EulerDiscreteScheduler`'s
/// Karras sigmas and final sigma type.
fn sigma_schedule(
    config: &SchedulerConfig,
    discrete: bool,
    spacing: Spacing,
    n: usize,
    alphas_cumprod: &[f32],
) -> (Vec<f64>, Vec<f32>) {
    let n_train = config.num_train_timesteps;
    // Timesteps as numpy float32.
    let timesteps: Vec<f32> = match spacing {
        Spacing::Linspace => np_linspace((n_train - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|t| t as f32)
            .collect(),
        Spacing::Leading => {
            let ratio = n_train / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio) as f32 + config.steps_offset as f32)
                .collect()
        }
        Spacing::Trailing => np_arange_down(n_train as f64, n_train as f64 / n as f64)
            .into_iter()
            .map(|t| t.round_ties_even() as f32 - 1.0)
            .collect(),
    };
    // Training sigmas, float32 as torch computes them.
    let train_sigmas: Vec<f32> = alphas_cumprod
        .iter()
        .map(|a| ((1.0 - a) / a).sqrt())
        .collect();
    let train_f64: Vec<f64> = train_sigmas.iter().map(|&s| f64::from(s)).collect();
    let mut sigmas: Vec<f64> = timesteps
        .iter()
        .map(|&t| np_interp_grid(f64::from(t), &train_f64))
        .collect();
    let mut timesteps: Vec<f64> = timesteps.iter().map(|&t| f64::from(t)).collect();
    let mut last_sigma = 0.0f64;
    if discrete {
        if config.use_karras_sigmas {
            let sigma_min = config.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let sigma_max = config.sigma_max.unwrap_or(sigmas[0]);
            let rho = 7.0f64;
            let min_inv_rho = sigma_min.powf(1.0 / rho);
            let max_inv_rho = sigma_max.powf(1.0 / rho);
            let ramp = np_linspace(1.0, n);
            sigmas = ramp
                .iter()
                .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(rho))
                .collect();
            // numpy's float32 log of the training sigmas.
            let log_sigmas: Vec<f32> = train_sigmas
                .iter()
                .map(|&s| f64::from(s).ln() as f32)
                .collect();
            timesteps = sigmas
                .iter()
                .map(|&s| f64::from(sigma_to_t(s, &log_sigmas) as f32))
                .collect();
        }
        if config.final_sigmas_type == "sigma_min" {
            let a = alphas_cumprod[0];
            last_sigma = f64::from(((1.0 - a) / a).sqrt());
        }
    }
    sigmas.push(last_sigma);
    (timesteps, sigmas.into_iter().map(|s| s as f32).collect())
}
