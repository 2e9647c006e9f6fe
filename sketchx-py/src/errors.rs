//! [`sketchx_core::Error`] → Python exceptions. The classes are defined in Python (`sketchx/_errors.py`) so that
//! `InvalidRequestError` can derive from both `SketchxError` and `ValueError`; they are looked up once and cached.

use pyo3::exceptions::{PyRuntimeError, PyTimeoutError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;
use sketchx_core::Error;

const MODULE: &str = "sketchx._errors";

static SKETCHX_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static INVALID_REQUEST: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static UNKNOWN_JOB: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static MODEL_LOAD: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static QUEUE_FULL: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// Which Python class an error becomes.
fn class_of(err: &Error) -> (&'static PyOnceLock<Py<PyType>>, &'static str) {
    match err {
        Error::InvalidRequest { .. } | Error::InvalidSketch(_) => {
            (&INVALID_REQUEST, "InvalidRequestError")
        }
        Error::UnknownJob(_) => (&UNKNOWN_JOB, "UnknownJobError"),
        Error::MissingFile { .. }
        | Error::MalformedFile { .. }
        | Error::Lora { .. }
        | Error::Embedding { .. }
        | Error::UnsupportedModel { .. }
        | Error::Checkpoint { .. }
        | Error::Download { .. }
        | Error::Device(_) => (&MODEL_LOAD, "ModelLoadError"),
        Error::QueueFull { .. } => (&QUEUE_FULL, "QueueFullError"),
        _ => (&SKETCHX_ERROR, "SketchxError"),
    }
}

/// The request field an error is about (`sketch` for an undecodable sketch), set as the exception's `field`.
fn field_of(err: &Error) -> Option<&'static str> {
    match err {
        Error::InvalidRequest { field, .. } => Some(field),
        Error::InvalidSketch(_) => Some("sketch"),
        _ => None,
    }
}

/// Converts a core error into the matching Python exception (`TimeoutError` for [`Error::Timeout`]).
pub fn to_py(py: Python<'_>, err: Error) -> PyErr {
    let message = err.to_string();
    if let Error::Timeout(_) = err {
        return PyTimeoutError::new_err(message);
    }
    let (cell, name) = class_of(&err);
    let build = || -> PyResult<PyErr> {
        let cls = cell.import(py, MODULE, name)?;
        let exc = cls.call1((message.clone(),))?;
        if let Some(field) = field_of(&err) {
            exc.setattr("field", field)?;
        }
        Ok(PyErr::from_value(exc))
    };
    build().unwrap_or_else(|e| PyRuntimeError::new_err(format!("{message} (and {e} raising it)")))
}

/// `Result<T, Error>` → `PyResult<T>`.
pub trait OrRaise<T> {
    /// Maps the error with [`to_py`].
    fn or_raise(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> OrRaise<T> for Result<T, Error> {
    fn or_raise(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_py(py, e))
    }
}

/// An `InvalidRequestError` naming `field` (for arguments that cannot even be converted to the core's types).
pub fn invalid(py: Python<'_>, field: &'static str, message: impl Into<String>) -> PyErr {
    to_py(py, Error::invalid(field, message))
}
