//! [`SchedulerConfig`]: the keys of a `scheduler_config.json` that the schedulers read.

use std::path::Path;

use super::Spacing;
use crate::error::Result;
use crate::models::config::ConfigFile;

/// The longest training schedule a config may declare: real models train on 1000 (a few on 4000); the bound keeps
/// a hostile config from sizing the schedule's buffers.
pub const MAX_TRAIN_TIMESTEPS: usize = 100_000;

/// A `scheduler_config.json`, holding every key the three schedulers read.
///
/// A key absent from the file is `None` (or the default shared by all three classes); [`Scheduler::new`](super::Scheduler::new) then uses
/// the default of the class it builds, as diffusers' `from_config` does. Keys listed in `_use_default_values` count
/// as absent; unknown keys and keys the built class does not take are ignored; `null` counts as absent.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// Where the configuration came from (a file path), named in errors.
    pub origin: String,
    /// `num_train_timesteps` (default 1000): length of the training noise schedule, at most
    /// [`MAX_TRAIN_TIMESTEPS`].
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
    /// `steps_offset` (default 0): added to `leading` timesteps; at most [`MAX_TRAIN_TIMESTEPS`] either way.
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
    /// `original_inference_steps` (LCM / TCD; default 50): length of the distillation schedule the few-step
    /// timesteps are taken from.
    pub original_inference_steps: Option<usize>,
    /// `timestep_scaling` (LCM; default 10.0): scales the timestep in the consistency boundary conditions.
    pub timestep_scaling: f64,
    /// The keys the file sets (not `null`, not in `_use_default_values`): LCM and TCD default
    /// `beta_start` / `beta_end` / `beta_schedule` differently from the other classes, and need to know which
    /// of the values above are defaults.
    pub keys: Vec<String>,
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
            original_inference_steps: None,
            timestep_scaling: 10.0,
            keys: Vec::new(),
        }
    }
}

impl SchedulerConfig {
    /// Reads a `scheduler_config.json` file ([`crate::Error::MissingFile`] if absent, [`crate::Error::MalformedFile`] if invalid).
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_config(&ConfigFile::read(path)?)
    }

    /// Parses the JSON text of a scheduler config; `origin` names it in errors.
    pub fn from_json_str(json: &str, origin: &str) -> Result<Self> {
        Self::from_config(&ConfigFile::parse(json, origin)?)
    }

    /// The keys of a parsed scheduler config.
    pub fn from_config(c: &ConfigFile) -> Result<Self> {
        let d = SchedulerConfig::default();
        let max = MAX_TRAIN_TIMESTEPS as i64;
        let num_train_timesteps = match c.i64_opt("num_train_timesteps")? {
            None => d.num_train_timesteps,
            Some(n) if (1..=max).contains(&n) => n as usize,
            Some(_) => {
                return Err(c.bad(
                    "num_train_timesteps",
                    &format!("an integer from 1 to {MAX_TRAIN_TIMESTEPS}"),
                ))
            }
        };
        let steps_offset = match c.i64_opt("steps_offset")? {
            None => d.steps_offset,
            Some(n) if (-max..=max).contains(&n) => n,
            Some(_) => {
                return Err(c.bad(
                    "steps_offset",
                    &format!("an integer from -{MAX_TRAIN_TIMESTEPS} to {MAX_TRAIN_TIMESTEPS}"),
                ))
            }
        };
        Ok(SchedulerConfig {
            origin: c.origin().to_string(),
            num_train_timesteps,
            beta_start: c.f64_or("beta_start", d.beta_start)?,
            beta_end: c.f64_or("beta_end", d.beta_end)?,
            beta_schedule: c.string_or("beta_schedule", &d.beta_schedule)?,
            trained_betas: c.f64_list_opt("trained_betas")?,
            prediction_type: c.string_or("prediction_type", &d.prediction_type)?,
            timestep_spacing: c.str_opt("timestep_spacing")?.map(str::to_string),
            steps_offset,
            rescale_betas_zero_snr: c.bool_or("rescale_betas_zero_snr", false)?,
            set_alpha_to_one: c.bool_opt("set_alpha_to_one")?,
            clip_sample: c.bool_opt("clip_sample")?,
            clip_sample_range: c.f64_or("clip_sample_range", d.clip_sample_range)?,
            thresholding: c.bool_or("thresholding", false)?,
            interpolation_type: c.string_or("interpolation_type", &d.interpolation_type)?,
            use_karras_sigmas: c.bool_or("use_karras_sigmas", false)?,
            use_exponential_sigmas: c.bool_or("use_exponential_sigmas", false)?,
            use_beta_sigmas: c.bool_or("use_beta_sigmas", false)?,
            sigma_min: c.f64_opt("sigma_min")?,
            sigma_max: c.f64_opt("sigma_max")?,
            timestep_type: c.string_or("timestep_type", &d.timestep_type)?,
            final_sigmas_type: c.string_or("final_sigmas_type", &d.final_sigmas_type)?,
            original_inference_steps: match c.i64_opt("original_inference_steps")? {
                None => None,
                Some(n) if (1..=max).contains(&n) => Some(n as usize),
                Some(_) => {
                    return Err(c.bad(
                        "original_inference_steps",
                        &format!("an integer from 1 to {MAX_TRAIN_TIMESTEPS}"),
                    ))
                }
            },
            timestep_scaling: c.f64_or("timestep_scaling", d.timestep_scaling)?,
            keys: c.keys().map(str::to_string).collect(),
        })
    }

    /// This config with `timestep_spacing` overridden, as `from_config(config, timestep_spacing=...)` does.
    pub fn with_timestep_spacing(&self, spacing: Spacing) -> Self {
        SchedulerConfig {
            timestep_spacing: Some(spacing.as_str().to_string()),
            ..self.clone()
        }
    }

    /// Whether the file sets `key` (see [`SchedulerConfig::keys`]).
    pub fn sets(&self, key: &str) -> bool {
        self.keys.iter().any(|k| k == key)
    }
}
