//! Sampling: the torch-compatible random number generator, and the schedulers (the denoising loop itself lives in [`crate::engine`]).

pub mod rng;
pub mod schedulers;
