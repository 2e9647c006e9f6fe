//! The networks of a Stable Diffusion + ControlNet pipeline, built from diffusers-layout folders or single-file
//! checkpoints in the original layout.

pub(crate) mod blocks;
pub mod clip;
pub mod config;
pub mod controlnet;
pub mod ldm_yaml;
pub mod loader;
pub mod lora;
pub mod mapped;
pub(crate) mod memo;
pub mod pickle;
pub mod sd15;
pub mod single_file;
pub mod taesd;
pub mod textual_inversion;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod vae_encoder;
pub mod weights;
