//! Single-file checkpoints in the original (LDM, A1111, civitai) layout: one `.safetensors` or `.ckpt` / `.pt`
//! holding the UNet (`model.diffusion_model.*`), the VAE (`first_stage_model.*`) and the CLIP text encoder
//! (`cond_stage_model.transformer.*`); ControlNets in the original layout (`control_model.*` or plain
//! `input_blocks` / `zero_convs` / `middle_block_out` / `input_hint_block` keys, `.safetensors` or `.pth`); VAEs
//! in their own file (`encoder.*` / `decoder.*`, `first_stage_model.*` or `vae.*`).
//!
//! Nothing is converted or copied: each network gets a [`MappedWeights`], a table from the parameter names its
//! constructor asks for (diffusers' names) to the file's keys, built with the renaming rules of diffusers'
//! single-file loading (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`,
//! `convert_controlnet_checkpoint`), and tensors are read from the file on demand, like a diffusers-layout file.
//! The VAE's attention projections, 1x1 convolutions `[C, C, 1, 1]` in the original, are read as the `[C, C]`
//! matrices diffusers makes of them. fp16 and bf16 files widen to f32 exactly.
//!
//! Nothing is guessed either: every key of the file must be a parameter of one of the networks, or one of the
//! training leftovers ignored by name ([`IGNORED_KEYS`]: the diffusion schedule buffers, `model_ema.*` unless
//! [`SingleFileOptions::extract_ema`], `position_ids`); any other key, a file of another model family (SD2, SDXL, a
//! LoRA, an inpainting UNet, a ControlNet given as a model), a tensor whose shape does not fit the configuration
//! and a tensor that no layer reads are [`Error::Checkpoint`] errors naming the file and the key.
//!
//! The sizes come from a configuration, as in diffusers (the mapping itself counts blocks from the keys and takes
//! `layers_per_block` from the configuration): SD1.5's diffusers configs are built in (unet, vae, text_encoder,
//! scheduler; the tokenizer is [`ClipTokenizer::sd15`]), so an SD1.5 fine-tune needs nothing else and no Hub
//! access. [`SingleFileOptions::config`] names a diffusers folder or Hub repository whose configs (and tokenizer)
//! are used instead, as `from_single_file(config=...)`; [`SingleFileOptions::original_config`] an original LDM
//! `.yaml` ([`super::ldm_yaml`]). A ControlNet file's config is given as a folder, else derived from the UNet's
//! config (as `ControlNetModel.from_unet`) with the conditioning embedding's sizes read from the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use super::clip::ClipTextConfig;
use super::config::ConfigFile;
use super::loader::{ModelSource, Resolver, WeightsSource};
use super::tokenizer::ClipTokenizer;
use crate::error::{Error, Result};

use super::mapped::Source;
pub use super::mapped::{MappedWeights, TensorFile};
pub use super::sd15;

/// How a single-file model is read (diffusers' `from_single_file` options).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SingleFileOptions {
    /// A diffusers folder or Hub repository whose `unet/`, `vae/`, `text_encoder/`, `scheduler/` configs (and
    /// `tokenizer/`, when it has one) describe the checkpoint, as `from_single_file(config=...)`. `None`: the
    /// original config when given, else SD1.5's built-in configs.
    pub config: Option<ModelSource>,
    /// An original LDM `.yaml` (`v1-inference.yaml` and its variants: `parameterization: v`, `upcast_attention`,
    /// the sizes), as `from_single_file(original_config=...)`.
    pub original_config: Option<PathBuf>,
    /// Take the UNet from the EMA copy (`model_ema.*`) of a training checkpoint instead of its non-EMA weights
    /// (diffusers' `extract_ema`); a file without EMA weights is then an error.
    pub extract_ema: bool,
}

/// Top-level keys of LDM training checkpoints that are no network's parameters: the diffusion schedule buffers,
/// the learned log-variance, the EMA bookkeeping scalars. Ignored by name.
pub const IGNORED_KEYS: &[&str] = &[
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "betas",
    "log_one_minus_alphas_cumprod",
    "logvar",
    "lvlb_weights",
    "model_ema.decay",
    "model_ema.num_updates",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "posterior_variance",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
];

const UNET_PREFIX: &str = "model.diffusion_model.";
const VAE_PREFIX: &str = "first_stage_model.";
const TEXT_PREFIX: &str = "cond_stage_model.transformer.";
const EMA_PREFIX: &str = "model_ema.";
const CONTROLNET_PREFIX: &str = "control_model.";
/// diffusers takes EMA weights only from files with more than this many `model_ema` keys.
const MIN_EMA_KEYS: usize = 100;

/// The parts of a single-file model, located and checked, nothing read yet.
pub struct CheckpointModel {
    /// The tokenizer: the config folder's, else SD1.5's built-in one.
    pub tokenizer: ClipTokenizer,
    /// The text encoder's config, its origin (for errors) and weights.
    pub text_encoder: (ClipTextConfig, String, WeightsSource),
    /// The UNet's config and weights.
    pub unet: (ConfigFile, WeightsSource),
    /// The VAE's config (also the config of a VAE override given as a single file).
    pub vae_config: ConfigFile,
    /// The VAE's weights; `None` when the caller brings its own VAE ([`open_checkpoint`]'s `need_vae`).
    pub vae: Option<WeightsSource>,
    /// The scheduler's config.
    pub scheduler: ConfigFile,
}

/// The configs of a single-file model.
struct Configs {
    unet: ConfigFile,
    vae: ConfigFile,
    text_encoder: ConfigFile,
    scheduler: ConfigFile,
    tokenizer: ClipTokenizer,
}

/// SD1.5's built-in configs and tokenizer.
fn built_in_configs() -> Result<Configs> {
    Ok(Configs {
        unet: ConfigFile::parse(sd15::UNET, "<built-in SD1.5 unet/config.json>")?,
        vae: ConfigFile::parse(sd15::VAE, "<built-in SD1.5 vae/config.json>")?,
        text_encoder: ConfigFile::parse(
            sd15::TEXT_ENCODER,
            "<built-in SD1.5 text_encoder/config.json>",
        )?,
        scheduler: ConfigFile::parse(
            sd15::SCHEDULER,
            "<built-in SD1.5 scheduler/scheduler_config.json>",
        )?,
        tokenizer: ClipTokenizer::sd15()?,
    })
}

/// The configs `options` name (see [`SingleFileOptions`]).
fn configs(options: &SingleFileOptions) -> Result<Configs> {
    match (&options.config, &options.original_config) {
        (Some(_), Some(_)) => Err(Error::invalid(
            "original_config",
            "give either a config folder (config) or an original .yaml (original_config), not both",
        )),
        (Some(ModelSource::File(p)), None) => Err(Error::invalid(
            "config",
            format!(
                "{} is a file; config names a diffusers folder or Hub repository (an original .yaml is \
                 original_config)",
                p.display()
            ),
        )),
        (Some(source), None) => {
            let r = Resolver::new(source.clone())?;
            let tokenizer = if r.exists("tokenizer/vocab.json") {
                ClipTokenizer::from_resolver(&r)?
            } else {
                ClipTokenizer::sd15()?
            };
            Ok(Configs {
                unet: r.config("unet/config.json")?,
                vae: r.config("vae/config.json")?,
                text_encoder: r.config("text_encoder/config.json")?,
                scheduler: r.config("scheduler/scheduler_config.json")?,
                tokenizer,
            })
        }
        (None, Some(yaml)) => {
            let c = super::ldm_yaml::read(yaml)?;
            let origin = yaml.display().to_string();
            let part = |v: Value, what: &str| ConfigFile::from_value(v, &format!("{origin} ({what})"));
            Ok(Configs {
                unet: part(c.unet, "unet_config")?,
                vae: part(c.vae, "first_stage_config")?,
                text_encoder: part(c.text_encoder, "cond_stage_config")?,
                scheduler: part(c.scheduler, "schedule")?,
                tokenizer: ClipTokenizer::sd15()?,
            })
        }
        (None, None) => built_in_configs(),
    }
}

/// Opens a single-file SD1.x checkpoint (see the module doc): refuses other families by name, maps the UNet, the
/// text encoder and (when `need_vae`) the VAE, and reads the configs [`SingleFileOptions`] name. Nothing is read
/// but the file's header (safetensors) or pickle (torch).
pub fn open_checkpoint(
    path: &Path,
    options: &SingleFileOptions,
    need_vae: bool,
) -> Result<CheckpointModel> {
    let file = Arc::new(TensorFile::open(path)?);
    let names = file.names();
    refuse_other_families(&file, &names, Expect::Model)?;
    let configs = configs(options)?;
    let layers = configs.unet.usize_or("layers_per_block", 2)?;
    check_in_channels(&file, &configs.unet)?;

    let ema_keys = names.iter().filter(|k| k.starts_with("model_ema")).count();
    let use_ema = options.extract_ema;
    if use_ema && ema_keys <= MIN_EMA_KEYS {
        return Err(file.error(
            "model_ema.*",
            format!(
                "extract_ema asks for the EMA weights, but the file has {ema_keys} model_ema keys (a file with EMA \
                 weights has one per UNet parameter)"
            ),
        ));
    }
    let (mut unet, mut vae, mut text) = (HashMap::new(), HashMap::new(), HashMap::new());
    let vae_up = configs.vae.usize_list("block_out_channels")?.len();
    for key in &names {
        if let Some(rest) = key.strip_prefix(UNET_PREFIX) {
            let name = unet_name(rest, layers, false)
                .ok_or_else(|| file.error(key, "not a parameter of an SD UNet"))?;
            let source = if use_ema {
                // diffusers: model_ema. + the key without its first component and its dots.
                let ema = format!("{EMA_PREFIX}diffusion_model{}", rest.replace('.', ""));
                if file.shape(&ema).is_none() {
                    return Err(file.error(
                        &ema,
                        format!("extract_ema: the EMA copy of {key} is missing"),
                    ));
                }
                ema
            } else {
                key.clone()
            };
            insert(&file, &mut unet, name, source, false, key)?;
        } else if let Some(rest) = key.strip_prefix(VAE_PREFIX) {
            if need_vae && !rest.starts_with("loss.") {
                let (name, squeeze) = vae_name(rest, vae_up)
                    .ok_or_else(|| file.error(key, "not a parameter of an SD VAE"))?;
                insert(&file, &mut vae, name, key.clone(), squeeze, key)?;
            }
        } else if let Some(rest) = key.strip_prefix(TEXT_PREFIX) {
            if let Some(name) = clip_name(rest) {
                insert(&file, &mut text, name, key.clone(), false, key)?;
            }
        } else if key.starts_with(EMA_PREFIX) || IGNORED_KEYS.contains(&key.as_str()) {
            // The EMA copy (read above when asked for) and training leftovers.
        } else {
            return Err(file.error(
                key,
                "not part of an SD1.x checkpoint (UNet model.diffusion_model.*, VAE first_stage_model.*, text \
                 encoder cond_stage_model.transformer.*, or a training buffer)",
            ));
        }
    }
    if unet.is_empty() {
        return Err(file.error(
            "model.diffusion_model.*",
            "no UNet in the file: not a Stable Diffusion checkpoint",
        ));
    }
    if text.is_empty() {
        return Err(file.error(
            "cond_stage_model.transformer.*",
            "no CLIP text encoder in the file (an SD1.x checkpoint has cond_stage_model.transformer.text_model.*)",
        ));
    }
    if need_vae && vae.is_empty() {
        return Err(file.error(
            "first_stage_model.*",
            "no VAE in the file: give one as the VAE override (EngineConfig::vae, --vae)",
        ));
    }
    let unet = MappedWeights::new(file.clone(), "UNet", &configs.unet, unet, &[]);
    let text_config = ClipTextConfig::from_config(&configs.text_encoder)?;
    let text = MappedWeights::new(
        file.clone(),
        "text encoder",
        &configs.text_encoder,
        text,
        &[],
    );
    let vae = need_vae.then(|| {
        WeightsSource::Mapped(Arc::new(MappedWeights::new(
            file.clone(),
            "VAE",
            &configs.vae,
            vae,
            VAE_DECODE_ONLY,
        )))
    });
    Ok(CheckpointModel {
        tokenizer: configs.tokenizer,
        text_encoder: (
            text_config,
            configs.text_encoder.origin().to_string(),
            WeightsSource::Mapped(Arc::new(text)),
        ),
        unet: (configs.unet, WeightsSource::Mapped(Arc::new(unet))),
        vae_config: configs.vae,
        vae,
        scheduler: configs.scheduler,
    })
}

/// The VAE's parameters a decoding pipeline may leave unread.
const VAE_DECODE_ONLY: &[&str] = &["encoder.", "quant_conv."];

/// Opens a VAE in its own file (the original layout with no prefix, `first_stage_model.` or `vae.`, or diffusers'
/// layout) to be built with `config` (the model's VAE config: the override replaces that VAE).
pub fn open_vae(path: &Path, config: &ConfigFile) -> Result<WeightsSource> {
    let file = Arc::new(TensorFile::open(path)?);
    let names = file.names();
    refuse_other_families(&file, &names, Expect::Vae)?;
    // diffusers takes the prefix of any key starting with one, else no prefix.
    let prefix = ["first_stage_model.", "vae."]
        .into_iter()
        .find(|p| names.iter().any(|k| k.starts_with(p)))
        .unwrap_or("");
    let diffusers_layout = names
        .iter()
        .any(|k| k.starts_with(&format!("{prefix}decoder.up_blocks.")));
    let up = config.usize_list("block_out_channels")?.len();
    let mut map = HashMap::new();
    for key in &names {
        let Some(rest) = key.strip_prefix(prefix) else {
            return Err(file.error(
                key,
                format!("not a VAE parameter (the other keys start with {prefix:?})"),
            ));
        };
        if rest.starts_with("loss.") {
            continue;
        }
        let mapped = if diffusers_layout {
            Some((rest.to_string(), false))
        } else {
            vae_name(rest, up)
        };
        let (name, squeeze) =
            mapped.ok_or_else(|| file.error(key, "not a parameter of an SD VAE"))?;
        insert(&file, &mut map, name, key.clone(), squeeze, key)?;
    }
    Ok(WeightsSource::Mapped(Arc::new(MappedWeights::new(
        file,
        "VAE",
        config,
        map,
        VAE_DECODE_ONLY,
    ))))
}

/// Opens a ControlNet in the original layout (`control_model.*` or plain keys, `.safetensors` or `.pth`), with
/// `config` (a ControlNet `config.json`) or, when `None`, a config derived from the UNet's `unet_config` (see
/// [`controlnet_config_from_unet`]).
pub fn open_controlnet(
    path: &Path,
    config: Option<ConfigFile>,
    unet_config: &ConfigFile,
) -> Result<(ConfigFile, WeightsSource)> {
    let file = Arc::new(TensorFile::open(path)?);
    let names = file.names();
    refuse_other_families(&file, &names, Expect::ControlNet)?;
    let diffusers_layout = names
        .iter()
        .any(|k| k.starts_with("controlnet_cond_embedding."));
    // diffusers: the prefix is stripped unless `time_embed.0.weight` is a top-level key.
    let prefix = if diffusers_layout || file.shape("time_embed.0.weight").is_some() {
        ""
    } else {
        CONTROLNET_PREFIX
    };
    let config = match config {
        Some(c) => c,
        None if diffusers_layout => {
            return Err(file.error(
                "controlnet_cond_embedding.*",
                "a diffusers-layout ControlNet file: give its folder (config.json beside the weights), or its \
                 config as controlnet_config",
            ))
        }
        None => controlnet_config_from_unet(&file, prefix, unet_config)?,
    };
    let layers = config.usize_or("layers_per_block", 2)?;
    let hint_last = names
        .iter()
        .filter_map(|k| {
            k.strip_prefix(prefix)?
                .strip_prefix("input_hint_block.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .unwrap_or(0);
    let mut map = HashMap::new();
    for key in &names {
        let Some(rest) = key.strip_prefix(prefix) else {
            return Err(file.error(
                key,
                "not a ControlNet parameter (the other keys start with control_model.)",
            ));
        };
        let name = if diffusers_layout {
            Some(rest.to_string())
        } else {
            controlnet_name(rest, layers, hint_last)
        };
        let name = name.ok_or_else(|| file.error(key, "not a parameter of an SD ControlNet"))?;
        insert(&file, &mut map, name, key.clone(), false, key)?;
    }
    Ok((
        config.clone(),
        WeightsSource::Mapped(Arc::new(MappedWeights::new(
            file,
            "ControlNet",
            &config,
            map,
            &[],
        ))),
    ))
}

/// A ControlNet config for an original-layout file: the UNet's config without its decoder half (as diffusers'
/// `ControlNetModel.from_unet`), with the conditioning embedding's channels and input channels read from the
/// file's `input_hint_block` shapes. Named `<ControlNet config derived from {unet config}>` in errors.
pub fn controlnet_config_from_unet(
    file: &TensorFile,
    prefix: &str,
    unet: &ConfigFile,
) -> Result<ConfigFile> {
    let shape = |i: usize| {
        let key = format!("{prefix}input_hint_block.{i}.weight");
        file.shape(&key).map(|s| (key, s))
    };
    let Some((key0, s0)) = shape(0) else {
        return Err(file.error(
            &format!("{prefix}input_hint_block.0.weight"),
            "missing: an original-layout ControlNet starts its conditioning embedding there",
        ));
    };
    if s0.len() != 4 {
        return Err(file.error(&key0, format!("shape {s0:?} is not a convolution's")));
    }
    let mut channels = vec![s0[0]];
    // Convolutions at 0, 2, 4, ...: pairs (same width, then stride 2 to the next width), the last one the output.
    let mut i = 4;
    while let Some((key, s)) = shape(i) {
        if shape(i + 2).is_none() {
            break; // `i` is the output convolution
        }
        if s.len() != 4 {
            return Err(file.error(&key, format!("shape {s:?} is not a convolution's")));
        }
        channels.push(s[0]);
        i += 4;
    }
    let mut map = serde_json::Map::new();
    for key in unet.keys() {
        let skip = [
            "_class_name",
            "out_channels",
            "up_block_types",
            "sample_size",
            "center_input_sample",
            "time_cond_proj_dim",
            "conv_out_kernel",
        ];
        if !skip.contains(&key) {
            map.insert(
                key.to_string(),
                unet.present(key).cloned().unwrap_or(Value::Null),
            );
        }
    }
    map.insert("conditioning_channels".into(), s0[1].into());
    map.insert(
        "conditioning_embedding_out_channels".into(),
        channels.into(),
    );
    ConfigFile::from_value(
        Value::Object(map),
        &format!("<ControlNet config derived from {}>", unet.origin()),
    )
}

/// What a file was given as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Model,
    ControlNet,
    Vae,
}

/// Refuses, by the key that shows it, a file of a family sketchx does not run, or a file given in the wrong role.
fn refuse_other_families(file: &TensorFile, names: &[String], expect: Expect) -> Result<()> {
    let find = |f: &dyn Fn(&str) -> bool| names.iter().find(|k| f(k)).cloned();
    if let Some(k) = find(&|k| {
        k.starts_with("lora_")
            || k.contains(".lora_down.")
            || k.contains(".lora_up.")
            || k.contains(".lora_A.")
            || k.contains(".lora_B.")
            || k.contains(".lora.down.")
    }) {
        return Err(file.error(
            &k,
            "a LoRA adapter, not a model: give it as a LoRA (EngineConfig::loras, --lora)",
        ));
    }
    if let Some(k) = find(&|k| {
        k.starts_with("conditioner.embedders.") || k.starts_with("model.diffusion_model.label_emb.")
    }) {
        return Err(file.error(
            &k,
            "an SDXL checkpoint (two text encoders, conditioner.embedders.*): sketchx runs SD1.x models",
        ));
    }
    if let Some(k) = find(&|k| k.starts_with("cond_stage_model.model.")) {
        return Err(file.error(
            &k,
            "an SD2.x checkpoint (OpenCLIP text encoder cond_stage_model.model.*): sketchx runs SD1.x models",
        ));
    }
    let attn2 = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight";
    if file.shape(attn2).is_some_and(|s| s.last() == Some(&1024)) {
        return Err(file.error(
            attn2,
            "an SD2.x UNet (1024-wide cross-attention context): sketchx runs SD1.x models",
        ));
    }
    let controlnet = find(&|k| {
        k.starts_with(CONTROLNET_PREFIX)
            || k.starts_with("input_hint_block.")
            || k.starts_with("zero_convs.")
            || k.starts_with("controlnet_cond_embedding.")
    });
    let full_model = find(&|k| k.starts_with(UNET_PREFIX));
    let vae_only = !names.is_empty()
        && names.iter().all(|k| {
            let k = k
                .strip_prefix("first_stage_model.")
                .or_else(|| k.strip_prefix("vae."))
                .unwrap_or(k);
            k.starts_with("encoder.")
                || k.starts_with("decoder.")
                || k.starts_with("quant_conv.")
                || k.starts_with("post_quant_conv.")
                || k.starts_with("loss.")
        });
    match expect {
        Expect::Model => {
            if let Some(k) = controlnet {
                return Err(file.error(&k, "a ControlNet, not a model: give it as the ControlNet"));
            }
            if vae_only {
                return Err(file.error(
                    &names[0],
                    "a VAE, not a model: give it as the VAE override (--vae)",
                ));
            }
            if full_model.is_none() {
                let k = names.first().map(String::as_str).unwrap_or("(no tensors)");
                let hint = if names
                    .iter()
                    .any(|k| k.starts_with("down_blocks.") || k.starts_with("text_model."))
                {
                    "a diffusers-layout component, not a whole checkpoint: give the model's folder"
                } else {
                    "not a Stable Diffusion checkpoint (no model.diffusion_model.* UNet)"
                };
                return Err(file.error(k, hint));
            }
        }
        Expect::ControlNet => {
            if let Some(k) = full_model {
                return Err(file.error(&k, "a whole Stable Diffusion checkpoint, not a ControlNet"));
            }
            if controlnet.is_none() {
                let k = names.first().map(String::as_str).unwrap_or("(no tensors)");
                return Err(file.error(
                    k,
                    "not a ControlNet (no input_hint_block / zero_convs / controlnet_cond_embedding keys)",
                ));
            }
        }
        Expect::Vae => {
            if let Some(k) = full_model.or(controlnet) {
                return Err(file.error(&k, "not a VAE: a UNet or ControlNet key"));
            }
        }
    }
    Ok(())
}

/// Refuses a UNet whose first convolution takes other inputs than the config's latent channels, naming the
/// inpainting case (9 channels: latents, masked-image latents and the mask) before anything else is checked.
fn check_in_channels(file: &TensorFile, unet: &ConfigFile) -> Result<()> {
    let key = "model.diffusion_model.input_blocks.0.0.weight";
    let Some(shape) = file.shape(key) else {
        return Ok(());
    };
    let want = unet.usize_or("in_channels", 4)?;
    match shape.get(1) {
        Some(&9) => Err(file.error(
            key,
            format!(
                "an inpainting UNet ({shape:?}: 9 input channels, latents + masked-image latents + mask); sketchx's \
                 sketch-to-image pipeline is not an inpainting pipeline"
            ),
        )),
        Some(&c) if c != want => Err(file.error(
            key,
            format!("the UNet takes {c} input channels ({shape:?}); the config says {want}"),
        )),
        _ => Ok(()),
    }
}

/// Adds `name` -> `key` to `map`, refusing a second key for the same parameter (never silently one of them).
fn insert(
    file: &TensorFile,
    map: &mut HashMap<String, Source>,
    name: String,
    key: String,
    squeeze: bool,
    original: &str,
) -> Result<()> {
    if squeeze {
        let dims = file.shape(&key).unwrap_or_default();
        if dims.len() < 2 || dims[2..].iter().any(|&d| d != 1) {
            return Err(file.error(
                &key,
                format!("shape {dims:?} is not a 1x1 convolution or a matrix"),
            ));
        }
    }
    if let Some(prev) = map.get(&name) {
        return Err(file.error(
            original,
            format!("maps to {name}, like {} already does", prev.key),
        ));
    }
    map.insert(name, Source { key, squeeze });
    Ok(())
}

/// `weight` or `bias` (the only leaf names of the mapped layers' own keys).
fn leaf(p: &[&str]) -> Option<String> {
    match p {
        [w @ ("weight" | "bias")] => Some((*w).to_string()),
        _ => None,
    }
}

/// An LDM resnet parameter (`in_layers.0.weight`, ...) as diffusers names it (`norm1.weight`, ...).
fn resnet_param(p: &[&str]) -> Option<String> {
    let (layer, rest) = match p {
        ["in_layers", "0", rest @ ..] => ("norm1", rest),
        ["in_layers", "2", rest @ ..] => ("conv1", rest),
        ["out_layers", "0", rest @ ..] => ("norm2", rest),
        ["out_layers", "3", rest @ ..] => ("conv2", rest),
        ["emb_layers", "1", rest @ ..] => ("time_emb_proj", rest),
        ["skip_connection", rest @ ..] => ("conv_shortcut", rest),
        _ => return None,
    };
    Some(format!("{layer}.{}", leaf(rest)?))
}

/// The rest of an attention (SpatialTransformer) key: diffusers uses the same names inside.
fn attention_param(p: &[&str]) -> Option<String> {
    (!p.is_empty() && p.iter().all(|s| !s.is_empty())).then(|| p.join("."))
}

/// The diffusers name of an LDM UNet key (without `model.diffusion_model.`), for a UNet with `layers` resnets per
/// down block; the encoder half only when `encoder_only` (a ControlNet). `None` for a key of no UNet layer.
fn unet_name(rest: &str, layers: usize, encoder_only: bool) -> Option<String> {
    let p: Vec<&str> = rest.split('.').collect();
    let index = |s: &str| s.parse::<usize>().ok();
    let per = layers + 1;
    Some(match p.as_slice() {
        ["time_embed", "0", w @ ..] => format!("time_embedding.linear_1.{}", leaf(w)?),
        ["time_embed", "2", w @ ..] => format!("time_embedding.linear_2.{}", leaf(w)?),
        ["input_blocks", "0", "0", w @ ..] => format!("conv_in.{}", leaf(w)?),
        ["input_blocks", i, "0", "op", w @ ..] => {
            let i = index(i)?.checked_sub(1)?;
            format!("down_blocks.{}.downsamplers.0.conv.{}", i / per, leaf(w)?)
        }
        ["input_blocks", i, "0", r @ ..] => {
            let i = index(i)?.checked_sub(1)?;
            format!(
                "down_blocks.{}.resnets.{}.{}",
                i / per,
                i % per,
                resnet_param(r)?
            )
        }
        ["input_blocks", i, "1", r @ ..] => {
            let i = index(i)?.checked_sub(1)?;
            format!(
                "down_blocks.{}.attentions.{}.{}",
                i / per,
                i % per,
                attention_param(r)?
            )
        }
        ["middle_block", "0", r @ ..] => format!("mid_block.resnets.0.{}", resnet_param(r)?),
        ["middle_block", "1", r @ ..] => format!("mid_block.attentions.0.{}", attention_param(r)?),
        ["middle_block", "2", r @ ..] => format!("mid_block.resnets.1.{}", resnet_param(r)?),
        _ if encoder_only => return None,
        ["output_blocks", i, "0", r @ ..] => {
            let i = index(i)?;
            format!(
                "up_blocks.{}.resnets.{}.{}",
                i / per,
                i % per,
                resnet_param(r)?
            )
        }
        ["output_blocks", i, "1" | "2", "conv", w @ ..] => {
            format!(
                "up_blocks.{}.upsamplers.0.conv.{}",
                index(i)? / per,
                leaf(w)?
            )
        }
        ["output_blocks", i, "1", r @ ..] => {
            let i = index(i)?;
            format!(
                "up_blocks.{}.attentions.{}.{}",
                i / per,
                i % per,
                attention_param(r)?
            )
        }
        ["out", "0", w @ ..] => format!("conv_norm_out.{}", leaf(w)?),
        ["out", "2", w @ ..] => format!("conv_out.{}", leaf(w)?),
        _ => return None,
    })
}

/// The diffusers name of an original ControlNet key (prefix removed): the UNet's encoder half, the zero
/// convolutions and the conditioning embedding (`input_hint_block` convolutions at 0, 2, ..., `hint_last`, the
/// last one its output; diffusers hard-codes 14, the index for SD's 4 widths).
fn controlnet_name(rest: &str, layers: usize, hint_last: usize) -> Option<String> {
    let p: Vec<&str> = rest.split('.').collect();
    let index = |s: &str| s.parse::<usize>().ok();
    Some(match p.as_slice() {
        ["zero_convs", i, "0", w @ ..] => {
            format!("controlnet_down_blocks.{}.{}", index(i)?, leaf(w)?)
        }
        ["middle_block_out", "0", w @ ..] => format!("controlnet_mid_block.{}", leaf(w)?),
        ["input_hint_block", "0", w @ ..] => {
            format!("controlnet_cond_embedding.conv_in.{}", leaf(w)?)
        }
        ["input_hint_block", k, w @ ..] => {
            let k = index(k)?;
            if k % 2 != 0 {
                return None;
            }
            if k == hint_last {
                format!("controlnet_cond_embedding.conv_out.{}", leaf(w)?)
            } else {
                format!(
                    "controlnet_cond_embedding.blocks.{}.{}",
                    k / 2 - 1,
                    leaf(w)?
                )
            }
        }
        _ => return unet_name(rest, layers, true),
    })
}

/// The diffusers name of an LDM VAE key (prefix removed) for a VAE of `blocks` levels, and whether it is a 1x1
/// convolution read as a matrix (the mid-block attention's projections). `None` for a key of no VAE layer.
fn vae_name(rest: &str, blocks: usize) -> Option<(String, bool)> {
    let p: Vec<&str> = rest.split('.').collect();
    let index = |s: &str| s.parse::<usize>().ok();
    let resnet = |r: &[&str]| -> Option<String> {
        let (layer, w) = match r {
            ["nin_shortcut", w @ ..] => ("conv_shortcut", w),
            [l @ ("norm1" | "conv1" | "norm2" | "conv2"), w @ ..] => (*l, w),
            _ => return None,
        };
        Some(format!("{layer}.{}", leaf(w)?))
    };
    let plain = |s: String| Some((s, false));
    match p.as_slice() {
        [c @ ("encoder" | "decoder"), l @ ("conv_in" | "conv_out"), w @ ..] => {
            plain(format!("{c}.{l}.{}", leaf(w)?))
        }
        [c @ ("encoder" | "decoder"), "norm_out", w @ ..] => {
            plain(format!("{c}.conv_norm_out.{}", leaf(w)?))
        }
        [l @ ("quant_conv" | "post_quant_conv"), w @ ..] => plain(format!("{l}.{}", leaf(w)?)),
        ["encoder", "down", i, "block", j, r @ ..] => plain(format!(
            "encoder.down_blocks.{}.resnets.{}.{}",
            index(i)?,
            index(j)?,
            resnet(r)?
        )),
        ["encoder", "down", i, "downsample", "conv", w @ ..] => plain(format!(
            "encoder.down_blocks.{}.downsamplers.0.conv.{}",
            index(i)?,
            leaf(w)?
        )),
        ["decoder", "up", k, "block", j, r @ ..] => {
            let up = blocks.checked_sub(1)?.checked_sub(index(k)?)?;
            plain(format!(
                "decoder.up_blocks.{up}.resnets.{}.{}",
                index(j)?,
                resnet(r)?
            ))
        }
        ["decoder", "up", k, "upsample", "conv", w @ ..] => {
            let up = blocks.checked_sub(1)?.checked_sub(index(k)?)?;
            plain(format!(
                "decoder.up_blocks.{up}.upsamplers.0.conv.{}",
                leaf(w)?
            ))
        }
        [c @ ("encoder" | "decoder"), "mid", b @ ("block_1" | "block_2"), r @ ..] => {
            let n = if *b == "block_1" { 0 } else { 1 };
            plain(format!("{c}.mid_block.resnets.{n}.{}", resnet(r)?))
        }
        [c @ ("encoder" | "decoder"), "mid", "attn_1", a, w @ ..] => {
            let (layer, matrix) = match *a {
                "norm" => ("group_norm", false),
                "q" => ("to_q", true),
                "k" => ("to_k", true),
                "v" => ("to_v", true),
                "proj_out" => ("to_out.0", true),
                _ => return None,
            };
            let w = leaf(w)?;
            let squeeze = matrix && w == "weight";
            Some((format!("{c}.mid_block.attentions.0.{layer}.{w}"), squeeze))
        }
        _ => None,
    }
}

/// The name in transformers' `CLIPTextModel` of a key under `cond_stage_model.transformer.` (with or without
/// `text_model.`, as older checkpoints write it); `None` for the ignored `position_ids` buffer.
fn clip_name(rest: &str) -> Option<String> {
    let inner = rest.strip_prefix("text_model.").unwrap_or(rest);
    if inner == "embeddings.position_ids" {
        return None;
    }
    Some(format!("text_model.{inner}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unet_keys_map_as_diffusers_maps_them() {
        let cases = [
            ("time_embed.0.weight", "time_embedding.linear_1.weight"),
            ("time_embed.2.bias", "time_embedding.linear_2.bias"),
            ("input_blocks.0.0.weight", "conv_in.weight"),
            (
                "input_blocks.1.0.in_layers.0.weight",
                "down_blocks.0.resnets.0.norm1.weight",
            ),
            (
                "input_blocks.2.0.emb_layers.1.bias",
                "down_blocks.0.resnets.1.time_emb_proj.bias",
            ),
            (
                "input_blocks.3.0.op.weight",
                "down_blocks.0.downsamplers.0.conv.weight",
            ),
            (
                "input_blocks.4.0.skip_connection.weight",
                "down_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            (
                "input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight",
                "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k.weight",
            ),
            (
                "input_blocks.11.0.out_layers.3.weight",
                "down_blocks.3.resnets.1.conv2.weight",
            ),
            (
                "middle_block.0.in_layers.2.weight",
                "mid_block.resnets.0.conv1.weight",
            ),
            (
                "middle_block.1.proj_in.weight",
                "mid_block.attentions.0.proj_in.weight",
            ),
            (
                "middle_block.2.out_layers.0.bias",
                "mid_block.resnets.1.norm2.bias",
            ),
            (
                "output_blocks.2.1.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.3.0.in_layers.0.weight",
                "up_blocks.1.resnets.0.norm1.weight",
            ),
            (
                "output_blocks.4.1.norm.weight",
                "up_blocks.1.attentions.1.norm.weight",
            ),
            (
                "output_blocks.5.2.conv.bias",
                "up_blocks.1.upsamplers.0.conv.bias",
            ),
            ("out.0.weight", "conv_norm_out.weight"),
            ("out.2.bias", "conv_out.bias"),
        ];
        for (ldm, diffusers) in cases {
            assert_eq!(
                unet_name(ldm, 2, false).as_deref(),
                Some(diffusers),
                "{ldm}"
            );
        }
        for bad in [
            "label_emb.0.0.weight",
            "input_blocks.1.0.in_layers.1.weight",
            "output_blocks.x.0.in_layers.0.weight",
            "time_embed.0.weight.extra",
            "input_blocks.0.0.weight.x",
        ] {
            assert_eq!(unet_name(bad, 2, false), None, "{bad}");
        }
        assert_eq!(unet_name("out.0.weight", 2, true), None);
    }

    #[test]
    fn vae_keys_map_as_diffusers_maps_them() {
        let cases = [
            ("encoder.conv_in.weight", "encoder.conv_in.weight", false),
            ("decoder.norm_out.bias", "decoder.conv_norm_out.bias", false),
            ("post_quant_conv.weight", "post_quant_conv.weight", false),
            (
                "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                false,
            ),
            (
                "encoder.down.2.downsample.conv.bias",
                "encoder.down_blocks.2.downsamplers.0.conv.bias",
                false,
            ),
            (
                "decoder.up.3.block.2.conv1.weight",
                "decoder.up_blocks.0.resnets.2.conv1.weight",
                false,
            ),
            (
                "decoder.up.0.block.0.norm2.weight",
                "decoder.up_blocks.3.resnets.0.norm2.weight",
                false,
            ),
            (
                "decoder.up.1.upsample.conv.weight",
                "decoder.up_blocks.2.upsamplers.0.conv.weight",
                false,
            ),
            (
                "decoder.mid.block_2.conv2.bias",
                "decoder.mid_block.resnets.1.conv2.bias",
                false,
            ),
            (
                "decoder.mid.attn_1.norm.weight",
                "decoder.mid_block.attentions.0.group_norm.weight",
                false,
            ),
            (
                "decoder.mid.attn_1.q.weight",
                "decoder.mid_block.attentions.0.to_q.weight",
                true,
            ),
            (
                "decoder.mid.attn_1.q.bias",
                "decoder.mid_block.attentions.0.to_q.bias",
                false,
            ),
            (
                "encoder.mid.attn_1.proj_out.weight",
                "encoder.mid_block.attentions.0.to_out.0.weight",
                true,
            ),
        ];
        for (ldm, diffusers, squeeze) in cases {
            assert_eq!(
                vae_name(ldm, 4),
                Some((diffusers.to_string(), squeeze)),
                "{ldm}"
            );
        }
        assert_eq!(vae_name("decoder.up.4.block.0.conv1.weight", 4), None);
        assert_eq!(vae_name("decoder.mid.attn_1.x.weight", 4), None);
    }

    #[test]
    fn controlnet_keys_map_as_diffusers_maps_them() {
        let cases = [
            ("zero_convs.11.0.weight", "controlnet_down_blocks.11.weight"),
            ("middle_block_out.0.bias", "controlnet_mid_block.bias"),
            (
                "input_hint_block.0.weight",
                "controlnet_cond_embedding.conv_in.weight",
            ),
            (
                "input_hint_block.2.weight",
                "controlnet_cond_embedding.blocks.0.weight",
            ),
            (
                "input_hint_block.12.bias",
                "controlnet_cond_embedding.blocks.5.bias",
            ),
            (
                "input_hint_block.14.weight",
                "controlnet_cond_embedding.conv_out.weight",
            ),
            (
                "input_blocks.1.1.proj_out.weight",
                "down_blocks.0.attentions.0.proj_out.weight",
            ),
            (
                "middle_block.1.norm.bias",
                "mid_block.attentions.0.norm.bias",
            ),
        ];
        for (ldm, diffusers) in cases {
            assert_eq!(
                controlnet_name(ldm, 2, 14).as_deref(),
                Some(diffusers),
                "{ldm}"
            );
        }
        for bad in [
            "input_hint_block.3.weight",
            "output_blocks.0.0.in_layers.0.weight",
            "out.2.weight",
        ] {
            assert_eq!(controlnet_name(bad, 2, 14), None, "{bad}");
        }
    }

    #[test]
    fn clip_keys_gain_text_model_and_drop_position_ids() {
        assert_eq!(
            clip_name("text_model.encoder.layers.0.mlp.fc1.weight").as_deref(),
            Some("text_model.encoder.layers.0.mlp.fc1.weight")
        );
        assert_eq!(
            clip_name("embeddings.token_embedding.weight").as_deref(),
            Some("text_model.embeddings.token_embedding.weight")
        );
        assert_eq!(clip_name("text_model.embeddings.position_ids"), None);
        assert_eq!(clip_name("embeddings.position_ids"), None);
    }
}
