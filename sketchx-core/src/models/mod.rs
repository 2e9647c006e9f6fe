//! The networks of a Stable Diffusion + ControlNet pipeline, built from diffusers-layout checkpoints.

pub(crate) mod blocks;
pub mod clip;
pub mod config;
pub mod controlnet;
pub mod loader;
pub mod lora;
pub mod pickle;
pub mod taesd;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;
