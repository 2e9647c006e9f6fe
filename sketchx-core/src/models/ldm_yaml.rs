//! Original LDM `.yaml` configs (`v1-inference.yaml` and its variants) read as diffusers configs, for single-file
//! checkpoints ([`super::single_file::SingleFileOptions::original_config`]).
//!
//! The UNet and VAE configs follow diffusers' `create_unet_diffusers_config_from_ldm` and
//! `create_vae_diffusers_config_from_ldm`: block widths from `model_channels` x `channel_mult` (`ch` x `ch_mult`),
//! cross-attention blocks where the downsampling rate is in `attention_resolutions`, `num_heads` (or
//! `num_head_channels`) as the number of heads, `transformer_depth`, `context_dim`, `use_linear_in_transformer`,
//! `num_res_blocks`; the sample sizes are SD1.x's (64 latent / 512 pixels), as diffusers derives them from the
//! model type rather than from the yaml. Beyond diffusers:
//! - `parameterization: v` makes the scheduler predict velocity (`prediction_type: v_prediction`), `x0` the
//!   sample; `linear_start`, `linear_end` and `timesteps` set its betas;
//! - `upcast_attention` in the UNet's params is kept (sketchx's attention computes its scores in f32 anyway);
//! - `norm_num_groups` in the UNet's params or the VAE's `ddconfig`, and `text_config` (a transformers
//!   `CLIPTextConfig`) in `cond_stage_config.params`, are read when present: real LDM yamls have neither (32 groups,
//!   CLIP ViT-L/14), the tiny test models need them.
//!
//! What the SD1.x pipeline cannot run is refused by the key that says so ([`Error::UnsupportedModel`] naming the
//! file): inpainting / depth models (`conditioning_key: hybrid`, a 9-channel UNet), SD2's OpenCLIP text encoder,
//! SDXL's `network_config`, class-conditioned UNets, a VAE whose `embed_dim` differs from its `z_channels`.

use std::path::Path;

use serde_json::{json, Map, Value};

use super::config::read_text;
use super::sd15;
use crate::error::{Error, Result};

/// The diffusers configs of a yaml (JSON objects for [`super::config::ConfigFile`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LdmConfigs {
    /// `unet/config.json`.
    pub unet: Value,
    /// `vae/config.json`.
    pub vae: Value,
    /// `text_encoder/config.json`.
    pub text_encoder: Value,
    /// `scheduler/scheduler_config.json`.
    pub scheduler: Value,
}

/// Reads and converts the yaml at `path`; errors name it.
pub fn read(path: &Path) -> Result<LdmConfigs> {
    let text = read_text(path)?;
    let origin = path.display().to_string();
    let doc: Value = serde_yaml::from_str(&text)
        .map_err(|e| Error::malformed(&origin, format!("not a YAML document: {e}")))?;
    convert(&doc, &origin)
}

/// A view of the yaml's mappings with errors naming the dotted key.
struct Doc<'a> {
    origin: &'a str,
}

impl Doc<'_> {
    fn at<'v>(&self, v: &'v Value, path: &[&str]) -> Option<&'v Value> {
        path.iter()
            .try_fold(v, |v, k| v.get(k))
            .filter(|v| !v.is_null())
    }

    fn need<'v>(&self, v: &'v Value, path: &[&str]) -> Result<&'v Value> {
        self.at(v, path).ok_or_else(|| {
            Error::malformed(self.origin, format!("`{}` is missing", path.join(".")))
        })
    }

    fn usize(&self, v: &Value, path: &[&str]) -> Result<usize> {
        let x = self.need(v, path)?;
        x.as_u64()
            .map(|n| n as usize)
            .ok_or_else(|| self.bad(path, "a non-negative integer"))
    }

    fn usize_list(&self, v: &Value, path: &[&str]) -> Result<Vec<usize>> {
        self.need(v, path)?
            .as_array()
            .and_then(|a| a.iter().map(|x| x.as_u64().map(|n| n as usize)).collect())
            .ok_or_else(|| self.bad(path, "a list of non-negative integers"))
    }

    fn bad(&self, path: &[&str], want: &str) -> Error {
        Error::malformed(self.origin, format!("`{}` must be {want}", path.join(".")))
    }

    fn unsupported(&self, path: &[&str], what: impl std::fmt::Display) -> Error {
        Error::unsupported(self.origin, format!("`{}`: {what}", path.join(".")))
    }
}

/// Converts a parsed yaml (see the module doc).
pub fn convert(doc: &Value, origin: &str) -> Result<LdmConfigs> {
    let d = Doc { origin };
    let model = d.need(doc, &["model"])?;
    if let Some(target) = d.at(model, &["target"]).and_then(Value::as_str) {
        for (marker, what) in [
            ("Inpaint", "an inpainting model"),
            ("Upscale", "an upscaling model"),
            ("Depth", "a depth-conditioned model"),
            ("ImageEmbedding", "an image-variation model"),
            ("sgm.", "an SDXL-generation model"),
        ] {
            if target.contains(marker) {
                return Err(d.unsupported(
                    &["model", "target"],
                    format!("{target} is {what}; sketchx runs SD1.x text-to-image models"),
                ));
            }
        }
    }
    let params = d.need(model, &["params"])?;
    if d.at(params, &["network_config"]).is_some() {
        return Err(d.unsupported(
            &["model", "params", "network_config"],
            "an SDXL-style config; sketchx runs SD1.x models",
        ));
    }
    if let Some(key) = d.at(params, &["conditioning_key"]).and_then(Value::as_str) {
        if key != "crossattn" {
            return Err(d.unsupported(
                &["model", "params", "conditioning_key"],
                format!("{key:?} (inpainting and depth models concatenate extra inputs; sketchx runs crossattn)"),
            ));
        }
    }
    Ok(LdmConfigs {
        unet: unet(&d, params)?,
        vae: vae(&d, params)?,
        text_encoder: text_encoder(&d, params)?,
        scheduler: scheduler(&d, params)?,
    })
}

fn unet(d: &Doc, params: &Value) -> Result<Value> {
    let path = ["model", "params", "unet_config", "params"];
    let u = d.need(params, &path[2..])?;
    let p = |k: &'static str| [path[0], path[1], path[2], path[3], k];
    for key in ["num_classes", "adm_in_channels"] {
        if d.at(u, &[key]).is_some() {
            return Err(d.unsupported(
                &p(key),
                "a class-conditioned UNet (SDXL, unCLIP, upscalers)",
            ));
        }
    }
    let in_channels = d.usize(u, &["in_channels"])?;
    if in_channels == 9 {
        return Err(d.unsupported(&p("in_channels"), "9: an inpainting UNet"));
    }
    let model_channels = d.usize(u, &["model_channels"])?;
    let mult = d.usize_list(u, &["channel_mult"])?;
    if mult.is_empty() {
        return Err(d.bad(&p("channel_mult"), "a non-empty list"));
    }
    let attention = d.usize_list(u, &["attention_resolutions"])?;
    let channels: Vec<usize> = mult.iter().map(|m| model_channels * m).collect();
    let n = channels.len();
    let mut down = Vec::with_capacity(n);
    let mut resolution = 1;
    for i in 0..n {
        down.push(if attention.contains(&resolution) {
            "CrossAttnDownBlock2D"
        } else {
            "DownBlock2D"
        });
        if i + 1 < n {
            resolution *= 2;
        }
    }
    let mut up = Vec::with_capacity(n);
    for _ in 0..n {
        up.push(if attention.contains(&resolution) {
            "CrossAttnUpBlock2D"
        } else {
            "UpBlock2D"
        });
        resolution /= 2;
    }
    let linear = d
        .at(u, &["use_linear_in_transformer"])
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let heads: Value = match d.at(u, &["num_heads"]).and_then(Value::as_i64) {
        Some(h) if h > 0 => h.into(),
        _ => {
            let per = d.usize(u, &["num_head_channels"])?;
            if per == 0 || model_channels % per != 0 {
                return Err(d.bad(
                    &p("num_head_channels"),
                    "a positive divisor of model_channels",
                ));
            }
            Value::from(
                mult.iter()
                    .map(|m| model_channels / per * m)
                    .collect::<Vec<_>>(),
            )
        }
    };
    let depth = match d.at(u, &["transformer_depth"]) {
        None => Value::from(1),
        Some(v @ Value::Number(_)) | Some(v @ Value::Array(_)) => v.clone(),
        Some(_) => return Err(d.bad(&p("transformer_depth"), "an integer or a list")),
    };
    let context = match d.need(u, &["context_dim"])? {
        Value::Array(a) => a.first().cloned().unwrap_or(Value::Null),
        v => v.clone(),
    };
    let mut c = Map::new();
    c.insert("_class_name".into(), "UNet2DConditionModel".into());
    c.insert("sample_size".into(), 64.into());
    c.insert("in_channels".into(), in_channels.into());
    c.insert("out_channels".into(), d.usize(u, &["out_channels"])?.into());
    c.insert("down_block_types".into(), json!(down));
    c.insert("up_block_types".into(), json!(up));
    c.insert("block_out_channels".into(), json!(channels));
    c.insert(
        "layers_per_block".into(),
        d.usize(u, &["num_res_blocks"])?.into(),
    );
    c.insert("cross_attention_dim".into(), context);
    c.insert("attention_head_dim".into(), heads);
    c.insert("use_linear_projection".into(), linear.into());
    c.insert("transformer_layers_per_block".into(), depth);
    if let Some(v) = d.at(u, &["disable_self_attentions"]) {
        c.insert("only_cross_attention".into(), v.clone());
    }
    if let Some(v) = d.at(u, &["upcast_attention"]) {
        c.insert("upcast_attention".into(), v.clone());
    }
    c.insert(
        "norm_num_groups".into(),
        d.at(u, &["norm_num_groups"]).cloned().unwrap_or(32.into()),
    );
    Ok(Value::Object(c))
}

fn vae(d: &Doc, params: &Value) -> Result<Value> {
    let first = d.need(params, &["first_stage_config", "params"])?;
    let dd = d.need(first, &["ddconfig"])?;
    let p = |k: &'static str| {
        [
            "model",
            "params",
            "first_stage_config",
            "params",
            "ddconfig",
            k,
        ]
    };
    let ch = d.usize(dd, &["ch"])?;
    let mult = d.usize_list(dd, &["ch_mult"])?;
    if mult.is_empty() {
        return Err(d.bad(&p("ch_mult"), "a non-empty list"));
    }
    let z = d.usize(dd, &["z_channels"])?;
    if let Some(embed) = d.at(first, &["embed_dim"]).and_then(Value::as_u64) {
        if embed as usize != z {
            return Err(d.unsupported(
                &[
                    "model",
                    "params",
                    "first_stage_config",
                    "params",
                    "embed_dim",
                ],
                format!("{embed} differs from z_channels {z}"),
            ));
        }
    }
    let n = mult.len();
    let scaling = d
        .at(params, &["scale_factor"])
        .cloned()
        .unwrap_or(0.18215.into());
    Ok(json!({
        "_class_name": "AutoencoderKL",
        "sample_size": 512,
        "in_channels": d.usize(dd, &["in_channels"])?,
        "out_channels": d.usize(dd, &["out_ch"])?,
        "down_block_types": vec!["DownEncoderBlock2D"; n],
        "up_block_types": vec!["UpDecoderBlock2D"; n],
        "block_out_channels": mult.iter().map(|m| ch * m).collect::<Vec<_>>(),
        "latent_channels": z,
        "layers_per_block": d.usize(dd, &["num_res_blocks"])?,
        "scaling_factor": scaling,
        "norm_num_groups": d.at(dd, &["norm_num_groups"]).cloned().unwrap_or(32.into()),
    }))
}

fn text_encoder(d: &Doc, params: &Value) -> Result<Value> {
    let cond = d.need(params, &["cond_stage_config"])?;
    let target = d
        .at(cond, &["target"])
        .and_then(Value::as_str)
        .unwrap_or("");
    if !target.ends_with("FrozenCLIPEmbedder") {
        return Err(d.unsupported(
            &["model", "params", "cond_stage_config", "target"],
            format!("{target:?} (sketchx runs SD1.x's CLIP text encoder, FrozenCLIPEmbedder)"),
        ));
    }
    if let Some(layer) = d.at(cond, &["params", "layer"]).and_then(Value::as_str) {
        if layer != "last" {
            return Err(d.unsupported(
                &["model", "params", "cond_stage_config", "params", "layer"],
                format!("{layer:?} (the encoder's last layer is used; give clip skip per request)"),
            ));
        }
    }
    match d.at(cond, &["params", "text_config"]) {
        Some(v @ Value::Object(_)) => Ok(v.clone()),
        Some(_) => Err(d.bad(
            &[
                "model",
                "params",
                "cond_stage_config",
                "params",
                "text_config",
            ],
            "a mapping",
        )),
        None => Ok(serde_json::from_str(sd15::TEXT_ENCODER).expect("the built-in config is JSON")),
    }
}

fn scheduler(d: &Doc, params: &Value) -> Result<Value> {
    let mut c: Value = serde_json::from_str(sd15::SCHEDULER).expect("the built-in config is JSON");
    let p = |k: &'static str| ["model", "params", k];
    let number = |k: &'static str| -> Result<Option<Value>> {
        match d.at(params, &[k]) {
            None => Ok(None),
            Some(v) if v.is_number() => Ok(Some(v.clone())),
            Some(_) => Err(d.bad(&p(k), "a number")),
        }
    };
    for (yaml, key) in [
        ("linear_start", "beta_start"),
        ("linear_end", "beta_end"),
        ("timesteps", "num_train_timesteps"),
    ] {
        if let Some(v) = number(yaml)? {
            c[key] = v;
        }
    }
    if let Some(s) = d.at(params, &["beta_schedule"]).and_then(Value::as_str) {
        // LDM's "linear" is linear in sqrt(beta): diffusers' scaled_linear.
        if s != "linear" {
            return Err(d.unsupported(
                &p("beta_schedule"),
                format!("{s:?} (LDM's linear schedule is read)"),
            ));
        }
    }
    let prediction = match d.at(params, &["parameterization"]).and_then(Value::as_str) {
        None | Some("eps") => "epsilon",
        Some("v") => "v_prediction",
        Some("x0") => "sample",
        Some(other) => {
            return Err(d.unsupported(&p("parameterization"), format!("{other:?}")));
        }
    };
    c["prediction_type"] = prediction.into();
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> Result<LdmConfigs> {
        let doc: Value = serde_yaml::from_str(text).unwrap();
        convert(&doc, "test.yaml")
    }

    /// SD1.5's v1-inference.yaml gives SD1.5's diffusers configs.
    #[test]
    fn v1_inference_is_sd15() {
        let c = yaml(V1_INFERENCE).unwrap();
        let unet: Value = serde_json::from_str(sd15::UNET).unwrap();
        for key in [
            "in_channels",
            "out_channels",
            "down_block_types",
            "up_block_types",
            "block_out_channels",
            "layers_per_block",
            "cross_attention_dim",
            "attention_head_dim",
            "norm_num_groups",
            "sample_size",
        ] {
            assert_eq!(c.unet[key], unet[key], "{key}");
        }
        let vae: Value = serde_json::from_str(sd15::VAE).unwrap();
        for key in [
            "block_out_channels",
            "layers_per_block",
            "latent_channels",
            "scaling_factor",
            "sample_size",
        ] {
            assert_eq!(c.vae[key], vae[key], "{key}");
        }
        assert_eq!(c.scheduler["prediction_type"], "epsilon");
        assert_eq!(c.scheduler["beta_start"], 0.00085);
        assert_eq!(c.text_encoder["hidden_size"], 768);
    }

    #[test]
    fn variants_and_refusals() {
        let v = V1_INFERENCE.replace(
            "    use_ema: False",
            "    parameterization: \"v\"\n    use_ema: False",
        );
        assert_eq!(
            yaml(&v).unwrap().scheduler["prediction_type"],
            "v_prediction"
        );
        let up = V1_INFERENCE.replace(
            "legacy: False",
            "legacy: False\n        upcast_attention: true",
        );
        assert_eq!(yaml(&up).unwrap().unet["upcast_attention"], true);
        for (from, to, key) in [
            (
                "in_channels: 4\n        out_channels",
                "in_channels: 9\n        out_channels",
                "in_channels",
            ),
            (
                "conditioning_key: crossattn",
                "conditioning_key: hybrid",
                "conditioning_key",
            ),
            (
                "FrozenCLIPEmbedder",
                "FrozenOpenCLIPEmbedder",
                "cond_stage_config.target",
            ),
            (
                "LatentDiffusion\n",
                "LatentInpaintDiffusion\n",
                "model.target",
            ),
        ] {
            let bad = V1_INFERENCE.replace(from, to);
            assert_ne!(bad, V1_INFERENCE, "{from}");
            match yaml(&bad) {
                Err(Error::UnsupportedModel { path, message }) => {
                    assert_eq!(path, "test.yaml");
                    assert!(message.contains(key), "{message}");
                }
                other => panic!("{key}: {other:?}"),
            }
        }
        let missing = V1_INFERENCE.replace("        model_channels: 320\n", "");
        assert!(
            matches!(yaml(&missing), Err(Error::MalformedFile { message, .. }) if message.contains("model_channels"))
        );
    }

    /// stable-diffusion's configs/stable-diffusion/v1-inference.yaml.
    const V1_INFERENCE: &str = r#"
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    cond_stage_trainable: false   # Note: different from the one we trained before
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False

    scheduler_config: # 10000 warmup steps
      target: ldm.lr_scheduler.LambdaLinearScheduler
      params:
        warm_up_steps: [ 10000 ]
        cycle_lengths: [ 10000000000000 ] # incredibly large number to prevent corner cases
        f_start: [ 1.e-6 ]
        f_max: [ 1. ]
        f_min: [ 1. ]

    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32 # unused
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_heads: 8
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 768
        use_checkpoint: True
        legacy: False

    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult:
          - 1
          - 2
          - 4
          - 4
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity

    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"#;
}
