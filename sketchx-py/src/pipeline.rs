//! `sketchx._sketchx.Pipeline`: the core [`Pipeline`] with the GIL released around every call that may block.

use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::types::PyDict;
use sketchx_core::engine::{
    device_from_name, dtype_from_name, EngineConfig, DEFAULT_CONTROLNET, DEFAULT_MODEL,
};
use sketchx_core::request::{GenerationRequest, NUM_IMAGES_RANGE, SIZE_RANGE, STEPS_RANGE};
use sketchx_core::{Error, JobId, Pipeline, PipelineConfig};

use crate::errors::{invalid, to_py, OrRaise};
use crate::sketch::SketchArg;
use crate::status::PyJobStatus;

/// How long `wait` blocks without the GIL before it checks for signals (Ctrl-C).
const WAIT_SLICE: Duration = Duration::from_millis(50);

/// An integer request field, refused with the core's message if it does not even fit the core's type.
fn int_field(
    py: Python<'_>,
    field: &'static str,
    value: &Bound<'_, PyAny>,
    range: &RangeInclusive<u32>,
) -> PyResult<u32> {
    if value.is_instance_of::<pyo3::types::PyBool>() {
        return Err(invalid(py, field, "expected an integer, got bool"));
    }
    match value.extract::<u32>() {
        Ok(v) => Ok(v),
        Err(_) if value.is_instance_of::<pyo3::types::PyInt>() => Err(invalid(
            py,
            field,
            format!(
                "{value} is outside the allowed range {}..={}",
                range.start(),
                range.end()
            ),
        )),
        Err(_) => Err(invalid(
            py,
            field,
            format!("expected an integer, got {}", type_name(value)),
        )),
    }
}

fn opt_int_field(
    py: Python<'_>,
    field: &'static str,
    value: Option<&Bound<'_, PyAny>>,
    range: &RangeInclusive<u32>,
) -> PyResult<Option<u32>> {
    value
        .filter(|v| !v.is_none())
        .map(|v| int_field(py, field, v, range))
        .transpose()
}

/// A float field (ints are accepted); range checks are the core's.
fn float_field(py: Python<'_>, field: &'static str, value: &Bound<'_, PyAny>) -> PyResult<f64> {
    if value.is_instance_of::<pyo3::types::PyBool>()
        || value.is_instance_of::<pyo3::types::PyString>()
    {
        return Err(invalid(
            py,
            field,
            format!("expected a number, got {}", type_name(value)),
        ));
    }
    value.extract::<f64>().map_err(|_| {
        invalid(
            py,
            field,
            format!("expected a number, got {}", type_name(value)),
        )
    })
}

fn text_field(
    py: Python<'_>,
    field: &'static str,
    value: Option<&Bound<'_, PyAny>>,
) -> PyResult<Option<String>> {
    match value.filter(|v| !v.is_none()) {
        None => Ok(None),
        Some(v) => v.extract::<String>().map(Some).map_err(|_| {
            invalid(
                py,
                field,
                format!("expected a str or None, got {}", type_name(v)),
            )
        }),
    }
}

fn seconds(py: Python<'_>, field: &'static str, secs: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(secs).map_err(|_| {
        invalid(
            py,
            field,
            format!("{secs} is not a finite, non-negative number of seconds"),
        )
    })
}

fn type_name(value: &Bound<'_, PyAny>) -> String {
    value
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

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
                        cleanup_interval_secs, vae_tiling, redis_url=None))]
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
    ) -> PyResult<Self> {
        // Only a real bool: a truthy string or number here is far more likely a mistake than a wish.
        let vae_tiling = match vae_tiling.cast::<pyo3::types::PyBool>() {
            Ok(b) => b.is_true(),
            Err(_) => {
                return Err(invalid(
                    py,
                    "vae_tiling",
                    format!("expected a bool, got {}", type_name(vae_tiling)),
                ))
            }
        };
        let queue_capacity = int_field(py, "queue_capacity", queue_capacity, &(1..=u32::MAX))?;
        let retention_secs = float_field(py, "retention_secs", retention_secs)?;
        let retention = seconds(py, "retention_secs", retention_secs)?;
        let cleanup_interval = match cleanup_interval_secs.filter(|v| !v.is_none()) {
            None => None,
            Some(v) => {
                let secs = float_field(py, "cleanup_interval_secs", v)?;
                let d = seconds(py, "cleanup_interval_secs", secs)?;
                if d.is_zero() {
                    return Err(invalid(
                        py,
                        "cleanup_interval_secs",
                        "must be positive, or None for no background cleanup",
                    ));
                }
                Some(d)
            }
        };
        let device = device_from_name(device).or_raise(py)?;
        let dtype = dtype_from_name(dtype, &device).or_raise(py)?;
        let (model, controlnet) = (model.to_string(), controlnet.to_string());
        let pipe = py
            .detach(move || {
                let mut engine = EngineConfig::new(&model, &controlnet)?;
                engine.dtype = dtype;
                engine.device = device;
                engine.vae_tiling = vae_tiling;
                let mut config = PipelineConfig::with_engine(engine);
                config.output_dir = output_dir;
                config.queue_capacity = queue_capacity as usize;
                config.retention = retention;
                config.cleanup_interval = cleanup_interval;
                if let Some(url) = &redis_url {
                    config.use_redis(url);
                }
                Pipeline::new(config)
            })
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
        let queue_capacity = int_field(py, "queue_capacity", queue_capacity, &(1..=u32::MAX))?;
        let mut config = sketchx_core::RedisConfig::new(url);
        if let Some(p) = prefix {
            config.prefix = p;
        }
        let pipe = py
            .detach(move || Pipeline::connect_with(config, queue_capacity as usize))
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
                        control_guidance_start, control_guidance_end))]
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
    ) -> PyResult<String> {
        let seed = match seed.filter(|v| !v.is_none()) {
            None => None,
            Some(v) if v.is_instance_of::<pyo3::types::PyBool>() => {
                return Err(invalid(py, "seed", "expected an integer, got bool"))
            }
            Some(v) => Some(v.extract::<u64>().map_err(|_| {
                if v.is_instance_of::<pyo3::types::PyInt>() {
                    invalid(
                        py,
                        "seed",
                        format!("{v} is outside the allowed range 0..={}", u64::MAX),
                    )
                } else {
                    invalid(
                        py,
                        "seed",
                        format!("expected an integer or None, got {}", type_name(v)),
                    )
                }
            })?),
        };
        let request = GenerationRequest {
            prompt: text_field(py, "prompt", prompt)?,
            negative_prompt: text_field(py, "negative_prompt", negative_prompt)?,
            temperature: float_field(py, "temperature", temperature)?,
            controlnet_scale: controlnet_scale
                .filter(|v| !v.is_none())
                .map(|v| float_field(py, "controlnet_scale", v))
                .transpose()?,
            guidance_scale: float_field(py, "guidance_scale", guidance_scale)?,
            num_images: int_field(py, "num_images", num_images, &NUM_IMAGES_RANGE)?,
            steps: int_field(py, "steps", steps, &STEPS_RANGE)?,
            seed,
            width: opt_int_field(py, "width", width, &SIZE_RANGE)?,
            height: opt_int_field(py, "height", height, &SIZE_RANGE)?,
            scheduler: scheduler.parse().or_raise(py)?,
            preprocess: preprocess.parse().or_raise(py)?,
            guess_mode,
            control_guidance_start: float_field(
                py,
                "control_guidance_start",
                control_guidance_start,
            )?,
            control_guidance_end: float_field(py, "control_guidance_end", control_guidance_end)?,
        };
        let sketch = SketchArg::extract(sketch, raw).or_raise(py)?;
        let pipe = &self.pipe;
        py.detach(move || {
            // Validate the request before decoding anything, as the core does.
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
        let deadline = match timeout {
            None => None,
            Some(t) => Some(Instant::now() + seconds(py, "timeout", t)?),
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

    /// Stops intake, cancels pending jobs and joins the worker (idempotent).
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

/// The core's defaults (`GenerationRequest::default()`, `PipelineConfig`), for the Python layer's signatures and
/// the tests that check they agree.
#[pyfunction]
pub fn defaults(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let r = GenerationRequest::default();
    let c = PipelineConfig::with_engine(EngineConfig::default_models().or_raise(py)?);
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
    d.set_item("model", DEFAULT_MODEL)?;
    d.set_item("controlnet", DEFAULT_CONTROLNET)?;
    d.set_item("device", "cpu")?;
    d.set_item("dtype", py.None())?;
    d.set_item("output_dir", c.output_dir.to_string_lossy())?;
    d.set_item("queue_capacity", c.queue_capacity)?;
    d.set_item("retention_secs", c.retention.as_secs_f64())?;
    d.set_item(
        "cleanup_interval_secs",
        c.cleanup_interval.map(|d| d.as_secs_f64()),
    )?;
    d.set_item("vae_tiling", c.engine.vae_tiling)?;
    Ok(d)
}
