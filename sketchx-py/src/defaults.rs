//! The core's defaults, ranges and accepted names as Python dicts: the one source of the Python layer's
//! signatures (`sketchx/__init__.py`), of `sketchx.DEFAULTS`, `sketchx.RANGES`, `sketchx.NAMES`, and of the tests
//! that check the stubs restate them.

use std::ops::RangeInclusive;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use sketchx_core::names::{
    DEFAULT_CONTROLNET, DEFAULT_DEVICE, DEFAULT_MODEL, DEVICE_NAMES, DTYPE_NAMES,
};
use sketchx_core::request::{
    GenerationRequest, VaeKind, CANNY_THRESHOLD_RANGE, CLIP_SKIP_RANGE, CONTROLNET_SCALE_RANGE,
    CONTROL_GUIDANCE_RANGE, ETA_RANGE, GUIDANCE_RANGE, NUM_IMAGES_RANGE, SIZE_RANGE, STEPS_RANGE,
    STRENGTH_RANGE, TEMPERATURE_RANGE,
};
use sketchx_core::sampling::schedulers::{SchedulerKind, TimestepSpacing};
use sketchx_core::settings::{PipelineSettings, DEFAULT_OUTPUT_DIR};
use sketchx_core::sketch::Preprocess;

/// The default of every `Pipeline(...)` and `Pipeline.submit(...)` argument, by argument name
/// (`GenerationRequest::DEFAULT`, `PipelineSettings::DEFAULT`, the default names).
#[pyfunction]
pub fn defaults(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let r = GenerationRequest::DEFAULT;
    let s = PipelineSettings::DEFAULT;
    let d = PyDict::new(py);
    d.set_item("prompt", r.prompt)?;
    d.set_item("negative_prompt", r.negative_prompt)?;
    d.set_item("temperature", r.temperature)?;
    d.set_item("guidance_scale", r.guidance_scale)?;
    d.set_item("num_images", r.num_images)?;
    d.set_item("steps", r.steps)?;
    d.set_item("seed", r.seed)?;
    d.set_item("width", r.width)?;
    d.set_item("height", r.height)?;
    d.set_item("scheduler", r.scheduler.as_str())?;
    d.set_item("preprocess", r.preprocess.as_str())?;
    d.set_item("controlnet_scale", r.controlnet_scale)?;
    d.set_item("guess_mode", r.guess_mode)?;
    d.set_item("control_guidance_start", r.control_guidance_start)?;
    d.set_item("control_guidance_end", r.control_guidance_end)?;
    d.set_item("timestep_spacing", r.timestep_spacing.map(|s| s.as_str()))?;
    d.set_item("eta", r.eta)?;
    d.set_item("vae", r.vae.as_str())?;
    // No start image: text-to-image (its Python values are a sketch-like image or "sketch").
    debug_assert!(r.start_image.is_none());
    d.set_item("start_image", py.None())?;
    d.set_item("strength", r.strength)?;
    d.set_item("canny_low_threshold", r.canny_low_threshold)?;
    d.set_item("canny_high_threshold", r.canny_high_threshold)?;
    d.set_item("clip_skip", r.clip_skip)?;
    d.set_item("model", DEFAULT_MODEL)?;
    d.set_item("controlnet", DEFAULT_CONTROLNET)?;
    d.set_item("device", DEFAULT_DEVICE)?;
    d.set_item("dtype", s.dtype)?;
    d.set_item("output_dir", DEFAULT_OUTPUT_DIR)?;
    d.set_item("queue_capacity", s.queue_capacity)?;
    d.set_item("retention_secs", s.retention_secs)?;
    d.set_item("cleanup_interval_secs", s.cleanup_interval_secs)?;
    d.set_item("vae_tiling", s.vae_tiling)?;
    d.set_item("redis_url", s.redis_url)?;
    d.set_item("drain_on_shutdown", s.drain_on_shutdown)?;
    // No LoRA (an empty tuple: a default that cannot be mutated) and no tiny VAE for previews.
    debug_assert!(s.loras.is_empty());
    d.set_item("loras", PyTuple::empty(py))?;
    d.set_item("preview_vae", s.tiny_vae)?;
    // No textual inversion embedding (an empty tuple, as for `loras`).
    debug_assert!(s.embeddings.is_empty());
    d.set_item("embeddings", PyTuple::empty(py))?;
    // Single-file models: SD1.5's built-in configs, non-EMA weights; the ControlNet's config from the UNet's;
    // the model's own VAE.
    d.set_item("model_config", s.model_config)?;
    d.set_item("original_config", s.original_config)?;
    d.set_item("extract_ema", s.extract_ema)?;
    d.set_item("controlnet_config", s.controlnet_config)?;
    d.set_item("vae_model", s.vae)?;
    Ok(d)
}

/// The allowed `(min, max)` of each numeric request field, as the core checks it.
#[pyfunction]
pub fn ranges(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    fn pair<T: Copy>(r: &RangeInclusive<T>) -> (T, T) {
        (*r.start(), *r.end())
    }
    let d = PyDict::new(py);
    d.set_item("temperature", pair(&TEMPERATURE_RANGE))?;
    d.set_item("guidance_scale", pair(&GUIDANCE_RANGE))?;
    d.set_item("controlnet_scale", pair(&CONTROLNET_SCALE_RANGE))?;
    d.set_item("num_images", pair(&NUM_IMAGES_RANGE))?;
    d.set_item("steps", pair(&STEPS_RANGE))?;
    d.set_item("seed", (0u64, u64::MAX))?;
    d.set_item("width", pair(&SIZE_RANGE))?;
    d.set_item("height", pair(&SIZE_RANGE))?;
    d.set_item("control_guidance_start", pair(&CONTROL_GUIDANCE_RANGE))?;
    d.set_item("control_guidance_end", pair(&CONTROL_GUIDANCE_RANGE))?;
    d.set_item("eta", pair(&ETA_RANGE))?;
    d.set_item("strength", pair(&STRENGTH_RANGE))?;
    d.set_item("canny_low_threshold", pair(&CANNY_THRESHOLD_RANGE))?;
    d.set_item("canny_high_threshold", pair(&CANNY_THRESHOLD_RANGE))?;
    d.set_item("clip_skip", pair(&CLIP_SKIP_RANGE))?;
    Ok(d)
}

/// The names accepted by the name arguments (`scheduler`, `preprocess`, `device`, `dtype`, `timestep_spacing`,
/// `vae`), the default first
/// where there is one. `cuda:N` stands for `cuda:0`, `cuda:1`, ...
#[pyfunction]
pub fn names(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("scheduler", SchedulerKind::names().to_vec())?;
    d.set_item("preprocess", Preprocess::names().to_vec())?;
    d.set_item("device", DEVICE_NAMES.to_vec())?;
    d.set_item("dtype", DTYPE_NAMES.to_vec())?;
    d.set_item("timestep_spacing", TimestepSpacing::names().to_vec())?;
    d.set_item("vae", VaeKind::names().to_vec())?;
    Ok(d)
}
