//! `sketchx.JobStatus`: a read-only snapshot of a job ([`sketchx_core::JobStatus`]).

use pyo3::prelude::*;
use pyo3::types::PyAny;
use sketchx_core::JobStatus;

fn unix_secs(t: Option<std::time::SystemTime>) -> Option<f64> {
    t.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64())
}

/// A snapshot of one job: where it is, its progress and its images.
#[pyclass(name = "JobStatus", module = "sketchx", frozen)]
pub struct PyJobStatus {
    inner: JobStatus,
}

impl From<JobStatus> for PyJobStatus {
    fn from(inner: JobStatus) -> Self {
        Self { inner }
    }
}

#[pymethods]
impl PyJobStatus {
    /// The job's id (32 lowercase hex digits).
    #[getter]
    fn job_id(&self) -> &str {
        self.inner.job_id.as_str()
    }

    /// `'queued'`, `'running'`, `'completed'`, `'failed'` or `'cancelled'`.
    #[getter]
    fn status(&self) -> &'static str {
        self.inner.state.as_str()
    }

    /// 0..100; 100 only when every image is written.
    #[getter]
    fn progress(&self) -> f64 {
        self.inner.progress
    }

    /// Paths of the written images (when completed).
    #[getter]
    fn images(&self) -> Vec<String> {
        self.inner
            .images
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect()
    }

    /// A human-readable message (the original service's texts, or the error).
    #[getter]
    fn message(&self) -> &str {
        &self.inner.message
    }

    /// The seed the job uses (the request's, or the random one drawn at submission).
    #[getter]
    fn seed(&self) -> u64 {
        self.inner.seed
    }

    /// Denoising steps done.
    #[getter]
    fn step(&self) -> usize {
        self.inner.step
    }

    /// Denoising steps in all.
    #[getter]
    fn total_steps(&self) -> usize {
        self.inner.total_steps
    }

    /// 1-based position in the queue while queued.
    #[getter]
    fn queue_position(&self) -> Option<usize> {
        self.inner.queue_position
    }

    /// Estimated seconds to completion while running.
    #[getter]
    fn eta_secs(&self) -> Option<f64> {
        self.inner.eta_secs
    }

    /// Images requested.
    #[getter]
    fn num_images(&self) -> u32 {
        self.inner.num_images
    }

    /// Output width in pixels.
    #[getter]
    fn width(&self) -> u32 {
        self.inner.width
    }

    /// Output height in pixels.
    #[getter]
    fn height(&self) -> u32 {
        self.inner.height
    }

    /// Submission time (Unix seconds).
    #[getter]
    fn created_at(&self) -> Option<f64> {
        unix_secs(self.inner.created_at)
    }

    /// Start time (Unix seconds), once running.
    #[getter]
    fn started_at(&self) -> Option<f64> {
        unix_secs(self.inner.started_at)
    }

    /// End time (Unix seconds), once final.
    #[getter]
    fn finished_at(&self) -> Option<f64> {
        unix_secs(self.inner.finished_at)
    }

    /// Whether the job reached a final state (completed, failed or cancelled).
    #[getter]
    fn done(&self) -> bool {
        self.inner.state.is_terminal()
    }

    /// The original service's JSON object (`job_id`, `status`, `progress`, `images`, `message`, then the extra
    /// fields) as a dict.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        py.import("json")?
            .call_method1("loads", (self.inner.to_json(),))
    }

    /// The same as JSON text.
    fn to_json(&self) -> String {
        self.inner.to_json()
    }

    fn __repr__(&self) -> String {
        format!(
            "JobStatus(job_id='{}', status='{}', progress={:.1}, step={}/{}, images={:?}, message={:?})",
            self.inner.job_id,
            self.inner.state,
            self.inner.progress,
            self.inner.step,
            self.inner.total_steps,
            self.images(),
            self.inner.message
        )
    }
}
