//! `sketchx._sketchx.Pipeline`: the core [`Pipeline`] with the GIL released around every call that may block.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use sketchx_core::request::GenerationRequest;
use sketchx_core::settings::PipelineSettings;
use sketchx_core::{Error, JobId, Pipeline};

use crate::convert::{
    bool_field, embedding_list, float_field, int_field, lora_list, opt_float_field, opt_int_field,
    seconds, text_field,
};
use crate::errors::{to_py, OrRaise};
use crate::sketch::{SketchArg, StartImageArg};
use crate::status::PyJobStatus;

/// How long `wait` blocks without the GIL before it checks for signals (Ctrl-C).
const WAIT_SLICE: Duration = Duration::from_millis(50);

fn job_id(py: Python<'_>, id: &str) -> PyResult<JobId> {
    id.parse::<JobId>().or_raise(py)
}

/// The native pipeline. Use `sketchx.Pipeline`, which wraps it.
#[pyclass(name = "Pipeline", module = "sketchx._sketchx", frozen)]
pub struct NativePipeline {
    pipe: Pipeline,
}

#[pymethods]
impl NativePipeline {
    /// Loads the models (without the GIL) and starts the worker.
    #[new]
    #[pyo3(signature = (model, controlnet, device, dtype, output_dir, queue_capacity, retention_secs,
                        cleanup_interval_secs, vae_tiling, redis_url=None, drain_on_shutdown=None,
                        loras=None, preview_vae=None, embeddings=None, model_config=None,
                        original_config=None, extract_ema=None, controlnet_config=None, vae_model=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        model: &str,
        controlnet: &str,
        device: &str,
        dtype: Option<&str>,
        output_dir: PathBuf,
        queue_capacity: &Bound<'_, PyAny>,
        retention_secs: &Bound<'_, PyAny>,
        cleanup_interval_secs: Option<&Bound<'_, PyAny>>,
        vae_tiling: &Bound<'_, PyAny>,
        redis_url: Option<String>,
        drain_on_shutdown: Option<&Bound<'_, PyAny>>,
        loras: Option<&Bound<'_, PyAny>>,
        preview_vae: Option<&Bound<'_, PyAny>>,
        embeddings: Option<&Bound<'_, PyAny>>,
        model_config: Option<&Bound<'_, PyAny>>,
        original_config: Option<&Bound<'_, PyAny>>,
        extract_ema: Option<&Bound<'_, PyAny>>,
        controlnet_config: Option<&Bound<'_, PyAny>>,
        vae_model: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let drain_on_shutdown = match drain_on_shutdown {
            Some(v) => bool_field(py, "drain_on_shutdown", v)?,
            None => PipelineSettings::DEFAULT.drain_on_shutdown,
        };
        let settings = PipelineSettings {
            model: Some(model.to_string()),
            controlnet: Some(controlnet.to_string()),
            device: Some(device.to_string()),
            dtype: dtype.map(String::from),
            vae_tiling: bool_field(py, "vae_tiling", vae_tiling)?,
            output_dir: Some(output_dir),
            queue_capacity: int_field(py, "queue_capacity", queue_capacity)?,
            retention_secs: float_field(py, "retention_secs", retention_secs)?,
            cleanup_interval_secs: opt_float_field(
                py,
                "cleanup_interval_secs",
                cleanup_interval_secs,
            )?,
            redis_url,
            drain_on_shutdown,
            loras: lora_list(py, loras)?,
            tiny_vae: text_field(py, "preview_vae", preview_vae)?,
            embeddings: embedding_list(py, embeddings)?,
            model_config: text_field(py, "model_config", model_config)?,
            original_config: text_field(py, "original_config", original_config)?,
            extract_ema: match extract_ema {
                Some(v) => bool_field(py, "extract_ema", v)?,
                None => PipelineSettings::DEFAULT.extract_ema,
            },
            controlnet_config: text_field(py, "controlnet_config", controlnet_config)?,
            vae: text_field(py, "vae_model", vae_model)?,
            ..PipelineSettings::DEFAULT
        };
        let pipe = py
            .detach(move || Pipeline::new(settings.to_config()?))
            .or_raise(py)?;
        Ok(Self { pipe })
    }

    /// A client of the Redis job queue at `url`: no model, jobs run by the queue's workers.
    #[staticmethod]
    #[pyo3(signature = (url, prefix, queue_capacity))]
    fn connect(
        py: Python<'_>,
        url: String,
        prefix: Option<String>,
        queue_capacity: &Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        let queue_capacity: usize = int_field(py, "queue_capacity", queue_capacity)?;
        let mut config = sketchx_core::RedisConfig::new(url);
        if let Some(p) = prefix {
            config.prefix = p;
        }
        let pipe = py
            .detach(move || Pipeline::connect_with(config, queue_capacity))
            .or_raise(py)?;
        Ok(Self { pipe })
    }

    /// The PNG files of a completed job (empty while it is not completed).
    fn images<'py>(
        &self,
        py: Python<'py>,
        job_id: &str,
    ) -> PyResult<Vec<Bound<'py, pyo3::types::PyBytes>>> {
        let id = self::job_id(py, job_id)?;
        let pipe = self.pipe.clone();
        let pngs = py.detach(move || pipe.images(&id)).or_raise(py)?;
        Ok(pngs
            .iter()
            .map(|b| pyo3::types::PyBytes::new(py, b))
            .collect())
    }

    /// Queues a job; returns its id. `raw` = `(height, width, channels)` when `sketch` holds raw pixels.
    #[pyo3(signature = (sketch, raw, prompt, negative_prompt, temperature, guidance_scale, num_images, steps,
                        seed, width, height, scheduler, preprocess, controlnet_scale, guess_mode,
                        control_guidance_start, control_guidance_end, timestep_spacing=None, eta=None,
                        vae=None, start_image=None, start_raw=None, strength=None,
                        canny_low_threshold=None, canny_high_threshold=None, clip_skip=None))]
    #[allow(clippy::too_many_arguments)]
    fn submit(
        &self,
        py: Python<'_>,
        sketch: &Bound<'_, PyAny>,
        raw: Option<(u32, u32, u32)>,
        prompt: Option<&Bound<'_, PyAny>>,
        negative_prompt: Option<&Bound<'_, PyAny>>,
        temperature: &Bound<'_, PyAny>,
        guidance_scale: &Bound<'_, PyAny>,
        num_images: &Bound<'_, PyAny>,
        steps: &Bound<'_, PyAny>,
        seed: Option<&Bound<'_, PyAny>>,
        width: Option<&Bound<'_, PyAny>>,
        height: Option<&Bound<'_, PyAny>>,
        scheduler: &str,
        preprocess: &str,
        controlnet_scale: Option<&Bound<'_, PyAny>>,
        guess_mode: Option<bool>,
        control_guidance_start: &Bound<'_, PyAny>,
        control_guidance_end: &Bound<'_, PyAny>,
        timestep_spacing: Option<&Bound<'_, PyAny>>,
        eta: Option<&Bound<'_, PyAny>>,
        vae: Option<&Bound<'_, PyAny>>,
        start_image: Option<&Bound<'_, PyAny>>,
        start_raw: Option<(u32, u32, u32)>,
        strength: Option<&Bound<'_, PyAny>>,
        canny_low_threshold: Option<&Bound<'_, PyAny>>,
        canny_high_threshold: Option<&Bound<'_, PyAny>>,
        clip_skip: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<String> {
        let d = GenerationRequest::DEFAULT;
        let request = GenerationRequest {
            prompt: text_field(py, "prompt", prompt)?,
            negative_prompt: text_field(py, "negative_prompt", negative_prompt)?,
            temperature: float_field(py, "temperature", temperature)?,
            controlnet_scale: opt_float_field(py, "controlnet_scale", controlnet_scale)?,
            guidance_scale: float_field(py, "guidance_scale", guidance_scale)?,
            num_images: int_field(py, "num_images", num_images)?,
            steps: int_field(py, "steps", steps)?,
            seed: opt_int_field(py, "seed", seed)?,
            width: opt_int_field(py, "width", width)?,
            height: opt_int_field(py, "height", height)?,
            scheduler: scheduler.parse().or_raise(py)?,
            preprocess: preprocess.parse().or_raise(py)?,
            guess_mode,
            control_guidance_start: float_field(
                py,
                "control_guidance_start",
                control_guidance_start,
            )?,
            control_guidance_end: float_field(py, "control_guidance_end", control_guidance_end)?,
            timestep_spacing: text_field(py, "timestep_spacing", timestep_spacing)?
                .map(|s| s.parse())
                .transpose()
                .or_raise(py)?,
            eta: opt_float_field(py, "eta", eta)?.unwrap_or(d.eta),
            vae: match text_field(py, "vae", vae)? {
                Some(s) => s.parse().or_raise(py)?,
                None => d.vae,
            },
            start_image: None,
            strength: opt_float_field(py, "strength", strength)?.unwrap_or(d.strength),
            canny_low_threshold: opt_int_field(py, "canny_low_threshold", canny_low_threshold)?
                .unwrap_or(d.canny_low_threshold),
            canny_high_threshold: opt_int_field(py, "canny_high_threshold", canny_high_threshold)?
                .unwrap_or(d.canny_high_threshold),
            clip_skip: opt_int_field(py, "clip_skip", clip_skip)?.unwrap_or(d.clip_skip),
        };
        let sketch = SketchArg::extract(sketch, raw).or_raise(py)?;
        let start = start_image
            .filter(|s| !s.is_none())
            .map(|s| StartImageArg::extract(s, start_raw))
            .transpose()
            .or_raise(py)?;
        let pipe = &self.pipe;
        py.detach(move || {
            let mut request = request;
            // Decode the start image, then validate the request before decoding the sketch, as the core does.
            request.start_image = start.map(StartImageArg::into_start_image).transpose()?;
            request.validate()?;
            pipe.submit(request, sketch.into_input()?)
        })
        .map(|id| id.to_string())
        .or_raise(py)
    }

    /// The job's current status.
    fn poll(&self, py: Python<'_>, job_id: &str) -> PyResult<PyJobStatus> {
        let id = self::job_id(py, job_id)?;
        let pipe = &self.pipe;
        py.detach(move || pipe.poll(&id))
            .map(PyJobStatus::from)
            .or_raise(py)
    }

    /// Blocks (without the GIL, checking for signals every 50 ms) until the job is final or `timeout` seconds
    /// pass (`TimeoutError`; the job goes on).
    #[pyo3(signature = (job_id, timeout=None))]
    fn wait(&self, py: Python<'_>, job_id: &str, timeout: Option<f64>) -> PyResult<PyJobStatus> {
        let id = self::job_id(py, job_id)?;
        // A timeout too long to represent is no timeout.
        let deadline = match timeout {
            None => None,
            Some(t) => Instant::now().checked_add(seconds(py, "timeout", t)?),
        };
        loop {
            let slice = match deadline {
                None => WAIT_SLICE,
                Some(d) => d.saturating_duration_since(Instant::now()).min(WAIT_SLICE),
            };
            let pipe = &self.pipe;
            let id_ref = &id;
            match py.detach(move || pipe.wait(id_ref, Some(slice))) {
                Ok(st) => return Ok(st.into()),
                Err(Error::Timeout(_)) if deadline.is_none_or(|d| Instant::now() < d) => {
                    py.check_signals()?;
                }
                Err(e) => return Err(to_py(py, e)),
            }
        }
    }

    /// Cancels the job; `False` if it had already finished.
    fn cancel(&self, py: Python<'_>, job_id: &str) -> PyResult<bool> {
        let id = self::job_id(py, job_id)?;
        let pipe = &self.pipe;
        py.detach(move || pipe.cancel(&id)).or_raise(py)
    }

    /// Removes own files older than `max_age_secs` (default: the retention); returns how many were removed.
    #[pyo3(signature = (max_age_secs=None))]
    fn cleanup(&self, py: Python<'_>, max_age_secs: Option<f64>) -> PyResult<usize> {
        let max_age = max_age_secs
            .map(|s| seconds(py, "max_age_secs", s))
            .transpose()?;
        let pipe = &self.pipe;
        py.detach(move || match max_age {
            None => pipe.cleanup(),
            Some(age) => pipe.cleanup_older_than(age),
        })
        .map(|r| r.files_removed)
        .or_raise(py)
    }

    /// Jobs waiting in the queue.
    fn queued(&self) -> usize {
        self.pipe.queued()
    }

    /// The directory images are written to.
    #[getter]
    fn output_dir(&self) -> PathBuf {
        self.pipe.output_dir().to_path_buf()
    }

    /// Stops intake, cancels pending jobs (or, with `drain_on_shutdown`, finishes them; with Redis, the running
    /// one) and joins the worker (idempotent).
    fn close(&self, py: Python<'_>) {
        let pipe = &self.pipe;
        py.detach(move || pipe.shutdown());
    }
}

impl Drop for NativePipeline {
    fn drop(&mut self) {
        // The core joins its threads when the last handle goes; they never need the GIL, but the join should
        // not hold it either.
        let pipe = self.pipe.clone();
        match Python::try_attach(|py| py.detach(|| pipe.shutdown())) {
            Some(()) => {}
            None => self.pipe.shutdown(),
        }
    }
}
