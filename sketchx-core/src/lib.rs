//! sketchx-core: turn a hand-drawn sketch (and an optional prompt) into images with Stable Diffusion 1.5 and a
//! scribble ControlNet on candle.
//!
//! The layers, bottom up: [`sketch`] decodes and preprocesses the drawing, [`models`] loads and runs the
//! networks (CLIP tokenizer and text encoder, ControlNet, UNet, VAE), [`sampling`] holds the torch-compatible
//! RNG, the schedulers and the denoising loop, [`engine`] ties them into one generation call, [`output`] writes
//! PNG files atomically, and [`request`] defines and validates what a caller may ask for.

pub mod engine;
pub mod error;
pub mod models;
pub mod ops;
pub mod output;
pub mod request;
pub mod sampling;
pub mod sketch;

pub use error::{Error, Result, SketchError};
