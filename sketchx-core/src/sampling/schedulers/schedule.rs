//! What every scheduler shares: the training noise schedule (betas and their cumulative alpha products), the
//! timestep spacings, the prediction types, and the torch/numpy arithmetic they are computed with, reproduced to
//! the bit.

use candle_core::{DType, Tensor};

use super::SchedulerConfig;
use crate::error::{Error, Result};

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Prediction {
    Epsilon,
    Velocity,
    Sample,
}

impl Prediction {
    /// The config's `prediction_type` for `class`; `original_sample` is accepted where `sample` is, when
    /// `original_sample` is true (diffusers' Euler scheduler).
    pub(super) fn parse(
        config: &SchedulerConfig,
        class: &str,
        sample: bool,
        original_sample: bool,
    ) -> Result<Self> {
        match config.prediction_type.as_str() {
            "epsilon" => Ok(Prediction::Epsilon),
            "v_prediction" => Ok(Prediction::Velocity),
            "sample" if sample => Ok(Prediction::Sample),
            "original_sample" if original_sample => Ok(Prediction::Sample),
            other => Err(Error::unsupported(
                &config.origin,
                format!("{class} does not support prediction_type {other:?}"),
            )),
        }
    }
}

/// Timestep spacing, diffusers' `timestep_spacing` (Table 2 of "Common Diffusion Noise Schedules and Sample Steps
/// are Flawed").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spacing {
    /// `"linspace"`: evenly spaced over the training timesteps, both ends included.
    Linspace,
    /// `"leading"`: multiples of `num_train_timesteps / steps` from 0, plus `steps_offset`.
    Leading,
    /// `"trailing"`: counted down from the last training timestep (what few-step models expect).
    Trailing,
}

impl Spacing {
    /// Every spacing, in the order of help texts.
    pub const ALL: [Spacing; 3] = [Spacing::Linspace, Spacing::Leading, Spacing::Trailing];

    /// The config / request name: `"linspace"`, `"leading"` or `"trailing"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Spacing::Linspace => "linspace",
            Spacing::Leading => "leading",
            Spacing::Trailing => "trailing",
        }
    }

    /// The names of [`Spacing::ALL`], in that order.
    pub fn names() -> [&'static str; 3] {
        Self::ALL.map(|s| s.as_str())
    }

    /// The config's `timestep_spacing`, or `default` (the class's) when absent.
    pub(super) fn parse(config: &SchedulerConfig, default: Spacing) -> Result<Self> {
        match config.timestep_spacing.as_deref() {
            None => Ok(default),
            Some(name) => Self::ALL
                .into_iter()
                .find(|s| s.as_str() == name)
                .ok_or_else(|| {
                    Error::unsupported(&config.origin, format!("unknown timestep_spacing {name:?}"))
                }),
        }
    }
}

crate::names::name_traits!(Spacing, "timestep_spacing", "timestep spacing");

/// Refuses an `eta` outside [`ETA_RANGE`](super::ETA_RANGE) (NaN included) with [`Error::InvalidRequest`] for
/// `eta`.
pub(super) fn check_eta(eta: f64) -> Result<()> {
    let range = super::ETA_RANGE;
    if range.contains(&eta) {
        return Ok(());
    }
    Err(Error::invalid(
        "eta",
        format!(
            "{eta} is outside the allowed range {}..={}",
            range.start(),
            range.end()
        ),
    ))
}

/// Refuses a step count of 0 or above the number of training timesteps ([`Error::InvalidRequest`] for `steps`).
pub(super) fn check_steps(config: &SchedulerConfig, n: usize) -> Result<()> {
    let n_train = config.num_train_timesteps;
    if n == 0 || n > n_train {
        return Err(Error::invalid(
            "steps",
            format!("must be between 1 and {n_train} (the model's training timesteps), got {n}"),
        ));
    }
    Ok(())
}

/// The alpha product past the last step: 1 with `set_alpha_to_one` (the default), else `alphas_cumprod[0]`.
pub(super) fn final_alpha_cumprod(config: &SchedulerConfig, alphas_cumprod: &[f32]) -> f32 {
    if config.set_alpha_to_one.unwrap_or(true) {
        1.0
    } else {
        alphas_cumprod[0]
    }
}

/// The training schedule's cumulative alpha products in float32, as torch computes them: from `trained_betas` or
/// the `beta_schedule`, rescaled to zero terminal SNR when the config asks.
pub(super) fn alphas_cumprod(config: &SchedulerConfig) -> Result<Vec<f32>> {
    let unsupported = |message: &str| Error::unsupported(&config.origin, message);
    let n_train = config.num_train_timesteps;
    let mut betas = if let Some(trained) = &config.trained_betas {
        if trained.is_empty() {
            return Err(unsupported("trained_betas is empty"));
        }
        trained.iter().map(|&b| b as f32).collect()
    } else {
        match config.beta_schedule.as_str() {
            "linear" => torch_linspace_f32(config.beta_start, config.beta_end, n_train),
            "scaled_linear" => {
                torch_linspace_f32(config.beta_start.sqrt(), config.beta_end.sqrt(), n_train)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            "squaredcos_cap_v2" => cosine_betas(n_train),
            other => {
                return Err(unsupported(&format!(
                    "beta_schedule {other:?} is not implemented"
                )))
            }
        }
    };
    if config.rescale_betas_zero_snr {
        betas = rescale_zero_terminal_snr(&betas);
    }
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    Ok(torch_cumprod_f32(&alphas))
}

/// Integer timesteps for `n` steps with `spacing`, as the DDIM-family schedulers compute them (numpy float64,
/// rounded half to even).
pub(super) fn integer_timesteps(config: &SchedulerConfig, spacing: Spacing, n: usize) -> Vec<i64> {
    let n_train = config.num_train_timesteps;
    match spacing {
        Spacing::Linspace => np_linspace((n_train - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|t| t.round_ties_even() as i64)
            .collect(),
        Spacing::Leading => {
            let ratio = (n_train / n) as i64;
            (0..n as i64)
                .rev()
                .map(|i| i * ratio + config.steps_offset)
                .collect()
        }
        Spacing::Trailing => np_arange_down(n_train as f64, n_train as f64 / n as f64)
            .into_iter()
            .map(|t| t.round_ties_even() as i64 - 1)
            .collect(),
    }
}

/// `torch.linspace(start, end, steps, dtype=float32)` on an x86-64 CPU with AVX2 (torch's build fuses the
/// multiply-add of each element).
pub(super) fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

/// `torch.cumprod` of a float32 vector on the CPU (accumulated in float64, each prefix rounded to float32).
pub(super) fn torch_cumprod_f32(values: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    values
        .iter()
        .map(|&v| {
            acc *= f64::from(v);
            acc as f32
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` with the cosine transform (`squaredcos_cap_v2`), in float64 then float32.
pub(super) fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr` in float32.
pub(super) fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt_bar: Vec<f32> = torch_cumprod_f32(&alphas)
        .iter()
        .map(|a| a.sqrt())
        .collect();
    let first = sqrt_bar[0];
    let last = sqrt_bar[sqrt_bar.len() - 1];
    let scale = first / (first - last);
    for v in sqrt_bar.iter_mut() {
        *v = (*v - last) * scale;
    }
    let bar: Vec<f32> = sqrt_bar.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for i in 1..bar.len() {
        out.push(1.0 - bar[i] / bar[i - 1]);
    }
    out
}

/// `np.linspace(0, stop, num)` (float64).
pub(super) fn np_linspace(stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![0.0];
    }
    let step = stop / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step).collect();
    v[num - 1] = stop;
    v
}

/// `np.arange(start, 0, -step)` for float `step` (numpy's length rule and fill formula).
pub(super) fn np_arange_down(start: f64, step: f64) -> Vec<f64> {
    let len = ((0.0 - start) / -step).ceil().max(0.0) as usize;
    let mut v = Vec::with_capacity(len);
    if len >= 1 {
        v.push(start);
    }
    if len >= 2 {
        v.push(start + -step);
        let delta = v[1] - start;
        for i in 2..len {
            v.push(start + i as f64 * delta);
        }
    }
    v
}

/// `np.interp(x, arange(len(fp)), fp)` (float64).
pub(super) fn np_interp_grid(x: f64, fp: &[f64]) -> f64 {
    let last = fp.len() - 1;
    if x.is_nan() {
        return x;
    }
    if x <= 0.0 {
        return fp[0];
    }
    if x >= last as f64 {
        return fp[last];
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return fp[j];
    }
    let slope = (fp[j + 1] - fp[j]) / 1.0;
    let r = slope * (x - j as f64) + fp[j];
    if r.is_nan() {
        let r2 = slope * (x - (j + 1) as f64) + fp[j + 1];
        if r2.is_nan() && fp[j] == fp[j + 1] {
            return fp[j];
        }
        return r2;
    }
    r
}

/// diffusers' `_sigma_to_t`: the fractional training timestep of `sigma` (float64), given float32 log-sigmas.
pub(super) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // Index of the last log-sigma not above log_sigma (0 when none), clipped to len - 2.
    let count = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - f64::from(l) >= 0.0)
        .unwrap_or(0);
    let low_idx = count.min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx];
    let high = log_sigmas[high_idx];
    let w = ((f64::from(low) - log_sigma) / f64::from(low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// Rounds an f32 tensor through `dtype` (torch computes a reduced-precision op in f32 and rounds the result).
pub(super) fn round_through(t: Tensor, dtype: DType) -> Result<Tensor> {
    if dtype == DType::F32 {
        Ok(t)
    } else {
        Ok(t.to_dtype(dtype)?.to_dtype(DType::F32)?)
    }
}

/// `t * s` for an f32 tensor and an f32 scalar, exactly rounded, with the result rounded through `dtype`.
pub(super) fn mul_scalar(t: &Tensor, s: f32, dtype: DType) -> Result<Tensor> {
    round_through(t.affine(f64::from(s), 0.0)?, dtype)
}

/// `t / s` for an f32 tensor and an f32 scalar (a true division, as torch does for float32).
pub(super) fn div_scalar(t: &Tensor, s: f32) -> Result<Tensor> {
    Ok(t.broadcast_div(&Tensor::new(s, t.device())?)?)
}
