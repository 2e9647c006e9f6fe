//! CPU kernels and instrumentation for the networks' hot spots.
//!
//! [`profile`] times each kind of operation (convolutions, matmuls, attention, normalisation, copies) when
//! enabled, to show where a denoising step's time goes.

pub mod profile;
