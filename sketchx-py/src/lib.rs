//! The `sketchx._sketchx` extension module: a thin pyo3 layer over [`sketchx_core::Pipeline`].
//!
//! The public Python API lives in `python/sketchx/__init__.py`, which wraps these classes (sketch conversion from
//! PIL/numpy, context manager, asyncio). This crate only converts arguments, releases the GIL around every call
//! that may block, and maps [`sketchx_core::Error`] to the Python exception classes of `sketchx._errors`.

use pyo3::prelude::*;

mod convert;
mod defaults;
mod errors;
mod pipeline;
mod sketch;
mod status;

/// The extension module.
#[pymodule]
fn _sketchx(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<pipeline::NativePipeline>()?;
    m.add_class::<status::PyJobStatus>()?;
    m.add_function(wrap_pyfunction!(defaults::defaults, m)?)?;
    m.add_function(wrap_pyfunction!(defaults::ranges, m)?)?;
    m.add_function(wrap_pyfunction!(defaults::names, m)?)?;
    Ok(())
}
