//! Noise schedulers reproducing diffusers 0.42.1: `EulerAncestralDiscreteScheduler`, `EulerDiscreteScheduler` and
//! `DDIMScheduler`, each built like `<Class>.from_config(scheduler_config)`.
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

use std::path::Path;
use std::str::FromStr;

use candle_core::{DType, Tensor};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::sampling::rng::TorchRng;

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
        let t = s.trim();
        Self::ALL
            .into_iter()
            .find(|k| t.eq_ignore_ascii_case(k.as_str()))
            .ok_or_else(|| {
                Error::invalid(
                    "scheduler",
                    format!(
                        "unknown scheduler {s:?} (expected {})",
                        crate::names::quoted_list(&Self::names())
                    ),
                )
            })
    }
}

/// A `scheduler_config.json`, holding every key the three schedulers read.
///
/// A key absent from the file is `None` (or the default shared by all three classes); [`Scheduler::new`] then uses
/// the default of the class it builds, as diffusers' `from_config` does. Keys listed in `_use_default_values` count
/// as absent; unknown keys and keys the built class does not take are ignored; `null` counts as absent.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// Where the configuration came from (a file path), named in errors.
    pub origin: String,
    /// `num_train_timesteps` (default 1000): length of the training noise schedule.
    pub num_train_timesteps: usize,
    /// `beta_start` (default 0.0001).
    pub beta_start: f64,
    /// `beta_end` (default 0.02).
    pub beta_end: f64,
    /// `beta_schedule` (default `"linear"`): `"linear"`, `"scaled_linear"` or `"squaredcos_cap_v2"`.
    pub beta_schedule: String,
    /// `trained_betas`: explicit betas replacing the schedule.
    pub trained_betas: Option<Vec<f64>>,
    /// `prediction_type` (default `"epsilon"`): `"epsilon"`, `"v_prediction"` or `"sample"`.
    pub prediction_type: String,
    /// `timestep_spacing`: `"linspace"`, `"leading"` or `"trailing"`; default `"linspace"` for the Euler
    /// schedulers and `"leading"` for DDIM.
    pub timestep_spacing: Option<String>,
    /// `steps_offset` (default 0): added to `leading` timesteps.
    pub steps_offset: i64,
    /// `rescale_betas_zero_snr` (default false): rescale betas to zero terminal SNR.
    pub rescale_betas_zero_snr: bool,
    /// `set_alpha_to_one` (DDIM; default true): use 1 as the alpha product before the first training step.
    pub set_alpha_to_one: Option<bool>,
    /// `clip_sample` (DDIM; default true): clamp the predicted original sample.
    pub clip_sample: Option<bool>,
    /// `clip_sample_range` (DDIM; default 1.0): the clamp bound.
    pub clip_sample_range: f64,
    /// `thresholding` (DDIM; default false): dynamic thresholding, not implemented (an error when true).
    pub thresholding: bool,
    /// `interpolation_type` (Euler; default `"linear"`); only `"linear"` is implemented.
    pub interpolation_type: String,
    /// `use_karras_sigmas` (Euler; default false): Karras et al. sigma spacing.
    pub use_karras_sigmas: bool,
    /// `use_exponential_sigmas` (Euler; default false); not implemented (an error when true).
    pub use_exponential_sigmas: bool,
    /// `use_beta_sigmas` (Euler; default false); not implemented (an error when true).
    pub use_beta_sigmas: bool,
    /// `sigma_min` (Euler): lower end of Karras sigmas (default: the schedule's).
    pub sigma_min: Option<f64>,
    /// `sigma_max` (Euler): upper end of Karras sigmas (default: the schedule's).
    pub sigma_max: Option<f64>,
    /// `timestep_type` (Euler; default `"discrete"`); only `"discrete"` is implemented, except that `"continuous"`
    /// behaves identically unless `prediction_type` is `"v_prediction"`.
    pub timestep_type: String,
    /// `final_sigmas_type` (Euler; default `"zero"`): `"zero"` or `"sigma_min"`.
    pub final_sigmas_type: String,
}

impl Default for SchedulerConfig {
    /// The defaults of the diffusers classes (with `timestep_spacing` and the DDIM-only flags unset).
    fn default() -> Self {
        SchedulerConfig {
            origin: "<default>".to_string(),
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".to_string(),
            trained_betas: None,
            prediction_type: "epsilon".to_string(),
            timestep_spacing: None,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            set_alpha_to_one: None,
            clip_sample: None,
            clip_sample_range: 1.0,
            thresholding: false,
            interpolation_type: "linear".to_string(),
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            sigma_min: None,
            sigma_max: None,
            timestep_type: "discrete".to_string(),
            final_sigmas_type: "zero".to_string(),
        }
    }
}

/// Typed access to the keys of a JSON object, reporting errors against `origin`.
struct Keys<'a> {
    map: Map<String, Value>,
    origin: &'a str,
}

impl Keys<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn bad(&self, key: &str, expected: &str) -> Error {
        Error::malformed(
            self.origin,
            format!("scheduler config key {key:?} must be {expected}"),
        )
    }

    fn f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| v.as_f64().ok_or_else(|| self.bad(key, "a number")))
            .transpose()
    }

    fn int(&self, key: &str) -> Result<Option<i64>> {
        self.get(key)
            .map(|v| {
                v.as_i64()
                    .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
                    .ok_or_else(|| self.bad(key, "an integer"))
            })
            .transpose()
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| v.as_bool().ok_or_else(|| self.bad(key, "true or false")))
            .transpose()
    }

    fn string(&self, key: &str) -> Result<Option<String>> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| self.bad(key, "a string"))
            })
            .transpose()
    }
}

impl SchedulerConfig {
    /// Reads a `scheduler_config.json` file ([`Error::MissingFile`] if absent, [`Error::MalformedFile`] if invalid).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::MissingFile {
                    path: path.display().to_string(),
                })
            }
            Err(e) => return Err(Error::malformed(path.display(), e)),
        };
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Parses the JSON text of a scheduler config; `origin` names it in errors.
    pub fn from_json_str(json: &str, origin: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(json).map_err(|e| Error::malformed(origin, e))?;
        let Value::Object(mut map) = value else {
            return Err(Error::malformed(
                origin,
                "a scheduler config must be a JSON object",
            ));
        };
        if let Some(Value::Array(defaults)) = map.remove("_use_default_values") {
            for key in defaults.iter().filter_map(Value::as_str) {
                map.remove(key);
            }
        }
        let keys = Keys { map, origin };
        let d = SchedulerConfig::default();
        let num_train_timesteps = match keys.int("num_train_timesteps")? {
            None => d.num_train_timesteps,
            Some(n) if n >= 1 => n as usize,
            Some(_) => return Err(keys.bad("num_train_timesteps", "a positive integer")),
        };
        let trained_betas = keys
            .get("trained_betas")
            .map(|v| {
                v.as_array()
                    .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<_>>>())
                    .ok_or_else(|| keys.bad("trained_betas", "a list of numbers"))
            })
            .transpose()?;
        Ok(SchedulerConfig {
            origin: origin.to_string(),
            num_train_timesteps,
            beta_start: keys.f64("beta_start")?.unwrap_or(d.beta_start),
            beta_end: keys.f64("beta_end")?.unwrap_or(d.beta_end),
            beta_schedule: keys.string("beta_schedule")?.unwrap_or(d.beta_schedule),
            trained_betas,
            prediction_type: keys.string("prediction_type")?.unwrap_or(d.prediction_type),
            timestep_spacing: keys.string("timestep_spacing")?,
            steps_offset: keys.int("steps_offset")?.unwrap_or(d.steps_offset),
            rescale_betas_zero_snr: keys.bool("rescale_betas_zero_snr")?.unwrap_or(false),
            set_alpha_to_one: keys.bool("set_alpha_to_one")?,
            clip_sample: keys.bool("clip_sample")?,
            clip_sample_range: keys
                .f64("clip_sample_range")?
                .unwrap_or(d.clip_sample_range),
            thresholding: keys.bool("thresholding")?.unwrap_or(false),
            interpolation_type: keys
                .string("interpolation_type")?
                .unwrap_or(d.interpolation_type),
            use_karras_sigmas: keys.bool("use_karras_sigmas")?.unwrap_or(false),
            use_exponential_sigmas: keys.bool("use_exponential_sigmas")?.unwrap_or(false),
            use_beta_sigmas: keys.bool("use_beta_sigmas")?.unwrap_or(false),
            sigma_min: keys.f64("sigma_min")?,
            sigma_max: keys.f64("sigma_max")?,
            timestep_type: keys.string("timestep_type")?.unwrap_or(d.timestep_type),
            final_sigmas_type: keys
                .string("final_sigmas_type")?
                .unwrap_or(d.final_sigmas_type),
        })
    }
}

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prediction {
    Epsilon,
    Velocity,
    Sample,
}

/// Timestep spacing (Table 2 of "Common Diffusion Noise Schedules and Sample Steps are Flawed").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spacing {
    Linspace,
    Leading,
    Trailing,
}

/// The per-kind state.
#[derive(Debug, Clone)]
enum State {
    /// Euler and Euler Ancestral: one sigma per timestep plus the final one.
    Euler { sigmas: Vec<f32> },
    /// DDIM: integer timesteps indexing the training alpha products.
    Ddim {
        timesteps: Vec<i64>,
        final_alpha_cumprod: f32,
        step_ratio: i64,
        clip: Option<f32>,
    },
}

/// A configured scheduler for one denoising run of a fixed number of steps.
#[derive(Debug, Clone)]
pub struct Scheduler {
    kind: SchedulerKind,
    prediction: Prediction,
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<f64>,
    init_noise_sigma: f32,
    state: State,
}

/// `torch.linspace(start, end, steps, dtype=float32)` on an x86-64 CPU with AVX2 (torch's build fuses the
/// multiply-add of each element).
fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
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
fn torch_cumprod_f32(values: &[f32]) -> Vec<f32> {
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
fn cosine_betas(n: usize) -> Vec<f32> {
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
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
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
fn np_linspace(stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![0.0];
    }
    let step = stop / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step).collect();
    v[num - 1] = stop;
    v
}

/// `np.arange(start, 0, -step)` for float `step` (numpy's length rule and fill formula).
fn np_arange_down(start: f64, step: f64) -> Vec<f64> {
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
fn np_interp_grid(x: f64, fp: &[f64]) -> f64 {
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
fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
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
fn round_through(t: Tensor, dtype: DType) -> Result<Tensor> {
    if dtype == DType::F32 {
        Ok(t)
    } else {
        Ok(t.to_dtype(dtype)?.to_dtype(DType::F32)?)
    }
}

/// `t * s` for an f32 tensor and an f32 scalar, exactly rounded, with the result rounded through `dtype`.
fn mul_scalar(t: &Tensor, s: f32, dtype: DType) -> Result<Tensor> {
    round_through(t.affine(f64::from(s), 0.0)?, dtype)
}

/// `t / s` for an f32 tensor and an f32 scalar (a true division, as torch does for float32).
fn div_scalar(t: &Tensor, s: f32) -> Result<Tensor> {
    Ok(t.broadcast_div(&Tensor::new(s, t.device())?)?)
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
        let unsupported = |message: String| Error::unsupported(&config.origin, message);
        let class = kind.diffusers_class();
        let n_train = config.num_train_timesteps;
        if num_inference_steps == 0 || num_inference_steps > n_train {
            return Err(Error::invalid(
                "steps",
                format!("must be between 1 and {n_train} (the model's training timesteps), got {num_inference_steps}"),
            ));
        }
        let n = num_inference_steps;

        let prediction = match (config.prediction_type.as_str(), kind) {
            ("epsilon", _) => Prediction::Epsilon,
            ("v_prediction", _) => Prediction::Velocity,
            ("sample", SchedulerKind::Euler | SchedulerKind::Ddim) => Prediction::Sample,
            ("original_sample", SchedulerKind::Euler) => Prediction::Sample,
            (other, _) => {
                return Err(unsupported(format!(
                    "{class} does not support prediction_type {other:?}"
                )))
            }
        };
        let spacing_name = config.timestep_spacing.as_deref().unwrap_or(match kind {
            SchedulerKind::Ddim => "leading",
            _ => "linspace",
        });
        let spacing = match spacing_name {
            "linspace" => Spacing::Linspace,
            "leading" => Spacing::Leading,
            "trailing" => Spacing::Trailing,
            other => return Err(unsupported(format!("unknown timestep_spacing {other:?}"))),
        };

        // Training schedule (float32, as torch).
        let mut betas = if let Some(trained) = &config.trained_betas {
            if trained.is_empty() {
                return Err(unsupported("trained_betas is empty".to_string()));
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
                    return Err(unsupported(format!(
                        "beta_schedule {other:?} is not implemented"
                    )))
                }
            }
        };
        if config.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let mut alphas_cumprod = torch_cumprod_f32(&alphas);

        let (timesteps, init_noise_sigma, state) = match kind {
            SchedulerKind::EulerAncestral | SchedulerKind::Euler => {
                if kind == SchedulerKind::Euler {
                    Self::check_euler_options(config, prediction).map_err(unsupported)?;
                }
                let mut euler_cumprod = alphas_cumprod.clone();
                if config.rescale_betas_zero_snr {
                    // diffusers keeps the first sigma finite with the smallest positive float16 subnormal.
                    let last = euler_cumprod.len() - 1;
                    euler_cumprod[last] = 2f32.powi(-24);
                }
                let (timesteps, sigmas) =
                    Self::euler_schedule(kind, config, spacing, n, &euler_cumprod);
                let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let init = match spacing {
                    Spacing::Linspace | Spacing::Trailing => max,
                    Spacing::Leading => (max * max + 1.0).sqrt(),
                };
                // The Euler classes keep the modified alpha products.
                alphas_cumprod = euler_cumprod;
                (timesteps, init, State::Euler { sigmas })
            }
            SchedulerKind::Ddim => {
                if config.thresholding {
                    return Err(unsupported(
                        "DDIMScheduler thresholding is not implemented".to_string(),
                    ));
                }
                let steps: Vec<i64> = match spacing {
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
                };
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
                let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
                    1.0
                } else {
                    alphas_cumprod[0]
                };
                let clip = config
                    .clip_sample
                    .unwrap_or(true)
                    .then_some(config.clip_sample_range as f32);
                let timesteps = steps.iter().map(|&t| t as f64).collect();
                let state = State::Ddim {
                    timesteps: steps,
                    final_alpha_cumprod,
                    step_ratio: (n_train / n) as i64,
                    clip,
                };
                (timesteps, 1.0, state)
            }
        };
        Ok(Scheduler {
            kind,
            prediction,
            alphas_cumprod,
            timesteps,
            init_noise_sigma,
            state,
        })
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
                "EulerDiscreteScheduler use_exponential_sigmas / use_beta_sigmas are not implemented".to_string(),
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

    /// Timesteps and sigmas of the Euler schedulers' `set_timesteps`.
    fn euler_schedule(
        kind: SchedulerKind,
        config: &SchedulerConfig,
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
        if kind == SchedulerKind::Euler {
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

    /// Which sampler this is.
    pub fn kind(&self) -> SchedulerKind {
        self.kind
    }

    /// The model's timestep for each step, in order (float32 values widened to f64; integers for DDIM).
    ///
    /// Its length is the number of steps to run; it can exceed the requested count for `trailing` spacing.
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The sigmas of the Euler schedulers (one per timestep, then the final one); empty for DDIM.
    pub fn sigmas(&self) -> &[f32] {
        match &self.state {
            State::Euler { sigmas } => sigmas,
            State::Ddim { .. } => &[],
        }
    }

    /// The training schedule's cumulative alpha products (float32, as diffusers holds them).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// The scale of the initial noise: multiply the RNG's standard normal latents by this.
    pub fn init_noise_sigma(&self) -> f64 {
        f64::from(self.init_noise_sigma)
    }

    fn check_index(&self, step_index: usize) -> Result<()> {
        if step_index >= self.timesteps.len() {
            return Err(Error::invalid(
                "steps",
                format!(
                    "step index {step_index} is past the {} scheduled steps",
                    self.timesteps.len()
                ),
            ));
        }
        Ok(())
    }

    /// Scales the model input for step `step_index` (divides by `sqrt(sigma^2 + 1)` for the Euler schedulers;
    /// the identity for DDIM). The result has the sample's dtype.
    pub fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        self.check_index(step_index)?;
        match &self.state {
            State::Euler { sigmas } => {
                let sigma = sigmas[step_index];
                let divisor = (sigma * sigma + 1.0).sqrt();
                let dtype = sample.dtype();
                let scaled = div_scalar(&sample.to_dtype(DType::F32)?, divisor)?;
                Ok(scaled.to_dtype(dtype)?)
            }
            State::Ddim { .. } => Ok(sample.clone()),
        }
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
        match &self.state {
            State::Euler { sigmas } => {
                let (sigma, sigma_next) = (sigmas[step_index], sigmas[step_index + 1]);
                self.euler_step(model_output, sample, sigma, sigma_next, rng)
            }
            State::Ddim {
                timesteps,
                final_alpha_cumprod,
                step_ratio,
                clip,
            } => {
                let t = timesteps[step_index];
                let prev = t - step_ratio;
                let len = self.alphas_cumprod.len() as i64;
                // Python indexing: a timestep of -1 (trailing spacing) reads the last entry.
                let at = |i: i64| self.alphas_cumprod[if i < 0 { i + len } else { i } as usize];
                let alpha_t = at(t);
                let alpha_prev = if prev >= 0 {
                    at(prev)
                } else {
                    *final_alpha_cumprod
                };
                ddim_step(
                    self.prediction,
                    model_output,
                    sample,
                    alpha_t,
                    alpha_prev,
                    *clip,
                )
            }
        }
    }

    fn euler_step(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        sigma: f32,
        sigma_next: f32,
        rng: &mut TorchRng,
    ) -> Result<Tensor> {
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
        let derivative = div_scalar(&(&sample - pred_original)?, sigma)?;
        let prev = if self.kind == SchedulerKind::EulerAncestral {
            let sigma_up = (sigma_next * sigma_next * (sigma * sigma - sigma_next * sigma_next)
                / (sigma * sigma))
                .sqrt();
            let sigma_down = (sigma_next * sigma_next - sigma_up * sigma_up).sqrt();
            let dt = sigma_down - sigma;
            let prev = (&sample + derivative.affine(f64::from(dt), 0.0)?)?;
            // Drawn in the model output's dtype, as diffusers' `randn_tensor`.
            let noise = rng
                .randn_dtype(model_output.dims(), out_dtype, model_output.device())?
                .to_dtype(DType::F32)?;
            (prev + mul_scalar(&noise, sigma_up, out_dtype)?)?
        } else {
            let dt = sigma_next - sigma;
            (&sample + derivative.affine(f64::from(dt), 0.0)?)?
        };
        Ok(prev.to_dtype(out_dtype)?)
    }
}

/// DDIM step with `eta = 0`, computed in `sample`'s dtype (each op in f32, rounded through that dtype).
fn ddim_step(
    prediction: Prediction,
    model_output: &Tensor,
    sample: &Tensor,
    alpha_t: f32,
    alpha_prev: f32,
    clip: Option<f32>,
) -> Result<Tensor> {
    let dtype = sample.dtype();
    let s = sample.to_dtype(DType::F32)?;
    let m = round_through(model_output.to_dtype(DType::F32)?, dtype)?;
    let beta_t = 1.0 - alpha_t;
    let (sqrt_a, sqrt_b) = (alpha_t.sqrt(), beta_t.sqrt());
    let (pred_original, pred_epsilon) = match prediction {
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
    };
    let pred_original = match clip {
        Some(r) => pred_original.clamp(-r, r)?,
        None => pred_original,
    };
    // eta = 0: std_dev_t = 0 * sqrt(variance) (NaN if the variance is).
    let beta_prev = 1.0 - alpha_prev;
    let variance = (beta_prev / beta_t) * (1.0 - alpha_t / alpha_prev);
    let std_dev_t = 0.0f32 * variance.sqrt();
    let dir_coeff = (1.0 - alpha_prev - std_dev_t * std_dev_t).sqrt();
    let direction = mul_scalar(&pred_epsilon, dir_coeff, dtype)?;
    let prev = (mul_scalar(&pred_original, alpha_prev.sqrt(), dtype)? + direction)?;
    Ok(round_through(prev, dtype)?.to_dtype(dtype)?)
}
