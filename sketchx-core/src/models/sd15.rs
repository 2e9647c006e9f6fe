//! SD1.5's diffusers configs (`stable-diffusion-v1-5/stable-diffusion-v1-5`), built in for single-file checkpoints
//! that come without [`SingleFileOptions::config`](super::single_file::SingleFileOptions::config) or
//! [`SingleFileOptions::original_config`](super::single_file::SingleFileOptions::original_config).

/// `unet/config.json`.
pub const UNET: &str = include_str!("sd15/unet.json");
/// `vae/config.json`.
pub const VAE: &str = include_str!("sd15/vae.json");
/// `text_encoder/config.json` (OpenAI CLIP ViT-L/14's text model).
pub const TEXT_ENCODER: &str = include_str!("sd15/text_encoder.json");
/// `scheduler/scheduler_config.json`.
pub const SCHEDULER: &str = include_str!("sd15/scheduler.json");
