//! sketchx-core: turn a hand-drawn sketch (and an optional prompt) into images with Stable Diffusion 1.5 and a
//! scribble ControlNet on candle.
//!
//! The layers, bottom up: [`sketch`] decodes and preprocesses the drawing, [`models`] loads and runs the
//! networks (CLIP tokenizer and text encoder, ControlNet, UNet, VAE), [`sampling`] holds the torch-compatible
//! RNG, the schedulers and the denoising loop, [`engine`] ties them into one generation call, [`output`] writes
//! PNG files atomically, [`request`] defines and validates what a caller may ask for, and [`pipeline`] runs
//! requests as asynchronous jobs ([`jobs`], a private executor, [`cleanup`]) kept in a [`store`]: in this process, or in
//! a shared Redis (feature `redis`) served by worker processes on many machines. [`precision`] says how the
//! networks hold their weights; the CPU kernels behind them (`ops`) are private (the `bench-internals` feature
//! exposes them to the benches). For the bindings: [`names`] parses the names a user types (device, precision) and
//! holds the default models; [`settings`] is the plain form of a pipeline configuration with the pipeline's
//! defaults and one validated conversion.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod cleanup;
pub mod engine;
pub mod error;
// Private in the documentation (its public types are re-exported by `pipeline`); the path stays public so that
// code written against `executor::Generator` keeps compiling.
#[doc(hidden)]
pub mod executor;
pub mod jobs;
pub mod models;
pub mod names;
#[cfg(not(feature = "bench-internals"))]
pub(crate) mod ops;
#[cfg(feature = "bench-internals")]
pub mod ops;
pub mod output;
pub mod pipeline;
pub mod precision;
pub mod request;
pub mod sampling;
pub mod settings;
pub mod sketch;
pub mod store;

pub use error::{Error, Result, SketchError};
pub use jobs::{JobId, JobState, JobStatus};
pub use pipeline::{Pipeline, PipelineConfig, ShutdownPolicy, SketchInput};
pub use settings::PipelineSettings;
#[cfg(feature = "redis")]
pub use store::redis::RedisConfig;
pub use store::StoreConfig;
