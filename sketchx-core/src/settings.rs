//! [`PipelineSettings`]: a pipeline configuration in the plain form a binding holds (strings, numbers of seconds,
//! flags), with the pipeline's defaults as constants and ONE conversion into a validated [`PipelineConfig`].
//!
//! The bindings (C options, the Python constructor, the CLI and REST examples) fill a `PipelineSettings` and call
//! [`PipelineSettings::to_config`]: the parsers of [`crate::names`], the defaults and every range check live here
//! and in the core's validation, once. Errors name the field as the bindings name it (`retention_secs`,
//! `cleanup_interval_secs`, `device`, ...).
//!
//! ```
//! use sketchx_core::settings::PipelineSettings;
//!
//! let settings = PipelineSettings {
//!     device: Some("cpu".into()),
//!     dtype: Some("BF16".into()),
//!     retention_secs: 600.0,
//!     ..PipelineSettings::DEFAULT
//! };
//! let config = settings.to_config()?;
//! assert_eq!(config.retention.as_secs(), 600);
//!
//! let bad = PipelineSettings { cleanup_interval_secs: Some(-1.0), ..PipelineSettings::DEFAULT };
//! assert!(bad.to_config().unwrap_err().to_string().contains("cleanup_interval_secs"));
//! # Ok::<(), sketchx_core::Error>(())
//! ```

use std::path::PathBuf;
use std::time::Duration;

use crate::engine::EngineConfig;
use crate::error::{Error, Result};
use crate::models::loader::ModelSource;
use crate::models::lora::LoraSpec;
use crate::models::single_file::SingleFileOptions;
use crate::models::textual_inversion::EmbeddingSpec;
use crate::names::{device_from_name, dtype_from_name, DEFAULT_CONTROLNET, DEFAULT_MODEL};
use crate::pipeline::{PipelineConfig, ShutdownPolicy};
use crate::request::{
    out_of_range, VaeKind, CANNY_THRESHOLD_RANGE, CLIP_SKIP_RANGE, NUM_IMAGES_RANGE, SIZE_RANGE,
    STEPS_RANGE,
};

pub use crate::pipeline::{
    DEFAULT_CLEANUP_INTERVAL_SECS, DEFAULT_OUTPUT_DIR, DEFAULT_PREVIEW_EVERY,
    DEFAULT_QUEUE_CAPACITY,
};
pub use crate::store::DEFAULT_RETENTION_SECS;

/// A pipeline configuration as a binding holds it. [`PipelineSettings::DEFAULT`] is the core's defaults; a
/// string left `None` means the core's default. What cannot be spelled plainly (the progress callback, PNG
/// settings) is set on the [`PipelineConfig`] afterwards.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineSettings {
    /// Stable Diffusion 1.5: a Hub id (`owner/name[@revision]`), a local diffusers directory or a single
    /// checkpoint file (`.safetensors`, `.ckpt`, `.pt` in the original layout); `None`: [`DEFAULT_MODEL`].
    pub model: Option<String>,
    /// The ControlNet: a Hub id, a local directory or a single file in the original layout (`.safetensors`,
    /// `.pth`); `None`: [`DEFAULT_CONTROLNET`].
    pub controlnet: Option<String>,
    /// A device name ([`crate::names::DEVICE_NAMES`]); `None`: [`crate::names::DEFAULT_DEVICE`].
    pub device: Option<String>,
    /// A precision name ([`crate::names::DTYPE_NAMES`]); `None` or empty: the device's default
    /// ([`crate::names::default_dtype`]).
    pub dtype: Option<String>,
    /// A weights variant to prefer (`fp16` for `*.fp16.safetensors`); `None`: the plain files.
    pub variant: Option<String>,
    /// Decode images in overlapping tiles (see [`EngineConfig::vae_tiling`]).
    pub vae_tiling: bool,
    /// Where images are written (created if missing); `None`: [`DEFAULT_OUTPUT_DIR`].
    pub output_dir: Option<PathBuf>,
    /// Most jobs waiting at once, at least 1.
    pub queue_capacity: usize,
    /// Age in seconds after which finished jobs' files are deleted: finite and not negative (a value beyond
    /// what a [`Duration`] holds means forever).
    pub retention_secs: f64,
    /// How often the background sweeper runs, in seconds: positive and finite; `None`: never.
    pub cleanup_interval_secs: Option<f64>,
    /// A live preview is computed every this many steps (0: never).
    pub preview_every: usize,
    /// Shutdown finishes queued jobs first ([`ShutdownPolicy::Drain`]) instead of cancelling them.
    pub drain_on_shutdown: bool,
    /// A Redis URL (`redis://host:port/db`): the pipeline becomes a worker and client of the shared job queue
    /// there (see `PipelineConfig::use_redis`); `None`: jobs stay in this process. A build without the `redis`
    /// feature refuses a URL.
    pub redis_url: Option<String>,
    /// LoRA adapters fused at load ([`EngineConfig::loras`]): each a location
    /// ([`LoraSource::parse`](crate::models::lora::LoraSource::parse): a local `.safetensors` file or a Hub file
    /// `owner/name[@revision]/file.safetensors`) and its scale (finite, within
    /// ±[`MAX_LORA_SCALE`](crate::models::lora::MAX_LORA_SCALE); errors name `loras.scale`). A `PATH[:SCALE]`
    /// argument splits with [`LoraSpec::split_arg`]. Default: none.
    pub loras: Vec<(String, f64)>,
    /// A tiny VAE (TAESD: a local directory or a Hub id) for `vae: tiny` requests and live previews
    /// ([`EngineConfig::tiny_vae`]); `None`: none.
    pub tiny_vae: Option<String>,
    /// Textual inversion embeddings loaded in this order ([`EngineConfig::embeddings`]): each a location
    /// ([`EmbeddingSource::parse`](crate::models::textual_inversion::EmbeddingSource::parse): a local file or
    /// directory, a Hub file or repository) and the token it binds (`None`: the file's own). A `PATH[:TOKEN]`
    /// argument splits with [`EmbeddingSpec::split_arg`]. Default: none.
    pub embeddings: Vec<(String, Option<String>)>,
    /// For a single-file `model`: a diffusers folder or Hub id whose configs (and tokenizer) describe it
    /// ([`SingleFileOptions::config`]); `None`: `original_config`, else SD1.5's built-in configs.
    pub model_config: Option<String>,
    /// For a single-file `model`: an original LDM `.yaml` ([`SingleFileOptions::original_config`]).
    pub original_config: Option<String>,
    /// For a single-file `model`: take the UNet's EMA weights ([`SingleFileOptions::extract_ema`]).
    pub extract_ema: bool,
    /// For a single-file `controlnet`: a ControlNet folder or Hub id whose `config.json` describes it
    /// ([`EngineConfig::controlnet_config`]); `None`: derived from the UNet's config.
    pub controlnet_config: Option<String>,
    /// A VAE replacing the model's ([`EngineConfig::vae`]): a single file, a folder or a Hub id; `None`: the
    /// model's.
    pub vae: Option<String>,
}

impl PipelineSettings {
    /// The core's defaults: the default models on the CPU in its default precision, [`DEFAULT_OUTPUT_DIR`],
    /// [`DEFAULT_QUEUE_CAPACITY`], [`DEFAULT_RETENTION_SECS`], [`DEFAULT_CLEANUP_INTERVAL_SECS`],
    /// [`DEFAULT_PREVIEW_EVERY`], cancel on shutdown, no tiling.
    pub const DEFAULT: PipelineSettings = PipelineSettings {
        model: None,
        controlnet: None,
        device: None,
        dtype: None,
        variant: None,
        vae_tiling: false,
        output_dir: None,
        queue_capacity: DEFAULT_QUEUE_CAPACITY,
        retention_secs: DEFAULT_RETENTION_SECS as f64,
        cleanup_interval_secs: match DEFAULT_CLEANUP_INTERVAL_SECS {
            Some(s) => Some(s as f64),
            None => None,
        },
        preview_every: DEFAULT_PREVIEW_EVERY,
        drain_on_shutdown: false,
        redis_url: None,
        loras: Vec::new(),
        tiny_vae: None,
        embeddings: Vec::new(),
        model_config: None,
        original_config: None,
        extract_ema: false,
        controlnet_config: None,
        vae: None,
    };

    /// Parses and checks every field and builds the [`PipelineConfig`] (no model is loaded yet). Errors:
    /// [`Error::InvalidRequest`] naming the field as above; [`Error::Device`] for a device this build or
    /// machine cannot open; [`Error::MissingFile`] for a model that is neither a directory nor a Hub id.
    pub fn to_config(&self) -> Result<PipelineConfig> {
        let retention = duration_from_secs("retention_secs", self.retention_secs)?;
        let cleanup_interval = self
            .cleanup_interval_secs
            .map(|s| duration_from_secs("cleanup_interval_secs", s))
            .transpose()?;
        let model = self.model.as_deref().unwrap_or(DEFAULT_MODEL);
        let controlnet = self.controlnet.as_deref().unwrap_or(DEFAULT_CONTROLNET);
        let mut engine = EngineConfig::new(model, controlnet)?;
        if let Some(device) = &self.device {
            engine.device = device_from_name(device)?;
        }
        engine.dtype = dtype_from_name(self.dtype.as_deref(), &engine.device)?;
        engine.variant = self.variant.clone();
        engine.vae_tiling = self.vae_tiling;
        engine.loras = self
            .loras
            .iter()
            .map(|(location, scale)| LoraSpec::from_location(location, *scale))
            .collect::<Result<_>>()?;
        engine.tiny_vae = self
            .tiny_vae
            .as_deref()
            .map(ModelSource::parse)
            .transpose()?;
        engine.embeddings = self
            .embeddings
            .iter()
            .map(|(location, token)| EmbeddingSpec::from_location(location, token.as_deref()))
            .collect::<Result<_>>()?;
        engine.single_file = SingleFileOptions {
            config: self
                .model_config
                .as_deref()
                .map(ModelSource::parse)
                .transpose()?,
            original_config: self
                .original_config
                .as_deref()
                .map(|p| {
                    let p = PathBuf::from(p);
                    if p.is_file() {
                        Ok(p)
                    } else {
                        Err(Error::MissingFile {
                            path: format!("{} (original_config)", p.display()),
                        })
                    }
                })
                .transpose()?,
            extract_ema: self.extract_ema,
        };
        engine.controlnet_config = self
            .controlnet_config
            .as_deref()
            .map(ModelSource::parse)
            .transpose()?;
        engine.vae = self.vae.as_deref().map(ModelSource::parse).transpose()?;
        let mut config = PipelineConfig::with_engine(engine);
        if let Some(dir) = &self.output_dir {
            config.output_dir = dir.clone();
        }
        config.queue_capacity = self.queue_capacity;
        config.retention = retention;
        config.cleanup_interval = cleanup_interval;
        config.preview_every = self.preview_every;
        config.shutdown = if self.drain_on_shutdown {
            ShutdownPolicy::Drain
        } else {
            ShutdownPolicy::Cancel
        };
        if let Some(url) = &self.redis_url {
            use_redis(&mut config, url)?;
        }
        config.validate().map_err(settings_field_names)?;
        Ok(config)
    }
}

#[cfg(feature = "redis")]
fn use_redis(config: &mut PipelineConfig, url: &str) -> Result<()> {
    config.use_redis(url);
    Ok(())
}

#[cfg(not(feature = "redis"))]
fn use_redis(_: &mut PipelineConfig, _: &str) -> Result<()> {
    Err(Error::invalid(
        "redis_url",
        "this build of sketchx has no Redis support (cargo feature `redis`)",
    ))
}

impl Default for PipelineSettings {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// [`PipelineConfig`]'s validation names its own fields; a settings user knows them by their settings names.
fn settings_field_names(e: Error) -> Error {
    match e {
        Error::InvalidRequest { field, message } => Error::InvalidRequest {
            field: match field {
                "retention" => "retention_secs",
                "cleanup_interval" => "cleanup_interval_secs",
                other => other,
            },
            message,
        },
        other => other,
    }
}

/// A `--vae` argument as the CLI takes it: a decoder name ([`VaeKind`]: `full` or `tiny`, any case) or else a VAE
/// to load in place of the model's ([`PipelineSettings::vae`]: a single file, a folder or a Hub id; `./tiny` for
/// a folder of that name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VaeArg {
    /// Which of the loaded VAEs decodes ([`crate::request::GenerationRequest::vae`]).
    Decoder(VaeKind),
    /// The VAE to load instead of the model's.
    Override(String),
}

impl std::str::FromStr for VaeArg {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(match s.parse::<VaeKind>() {
            Ok(kind) => VaeArg::Decoder(kind),
            Err(_) => VaeArg::Override(s.to_string()),
        })
    }
}

impl std::fmt::Display for VaeArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VaeArg::Decoder(kind) => kind.fmt(f),
            VaeArg::Override(s) => f.write_str(s),
        }
    }
}

/// `PATH[:SCALE]` arguments (the CLI's repeated `--lora`, the C options' strings) as [`PipelineSettings::loras`],
/// each split by [`LoraSpec::split_arg`] (scale 1 when absent); checked by [`PipelineSettings::to_config`].
pub fn lora_args<S: AsRef<str>>(args: &[S]) -> Vec<(String, f64)> {
    args.iter()
        .map(|a| {
            let (location, scale) = LoraSpec::split_arg(a.as_ref());
            (location.to_string(), scale)
        })
        .collect()
}

/// `PATH[:TOKEN]` arguments (the CLI's repeated `--embedding`, the C options' strings) as
/// [`PipelineSettings::embeddings`], each split by [`EmbeddingSpec::split_arg`]; checked by
/// [`PipelineSettings::to_config`].
pub fn embedding_args<S: AsRef<str>>(args: &[S]) -> Vec<(String, Option<String>)> {
    args.iter()
        .map(|a| {
            let (location, token) = EmbeddingSpec::split_arg(a.as_ref());
            (location.to_string(), token.map(str::to_string))
        })
        .collect()
}

/// A number of seconds as a [`Duration`]: NaN, infinite or negative is [`Error::InvalidRequest`] for `field`;
/// a finite value beyond what a `Duration` holds saturates at [`Duration::MAX`] ("forever"). For every
/// seconds argument of a binding (settings, wait timeouts, cleanup ages).
pub fn duration_from_secs(field: &'static str, secs: f64) -> Result<Duration> {
    if !secs.is_finite() || secs < 0.0 {
        return Err(Error::invalid(
            field,
            format!("{secs} is not a finite, non-negative number of seconds"),
        ));
    }
    Ok(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
}

/// The allowed range of an integer field, by the name the bindings use: the request's `num_images`, `steps`,
/// `width`, `height`, `seed`, `canny_low_threshold`, `canny_high_threshold`, `clip_skip`, and the settings'
/// `queue_capacity` and `preview_every`. `None` for other names.
pub fn int_range(field: &str) -> Option<(u64, u64)> {
    let range =
        |r: &std::ops::RangeInclusive<u32>| Some((u64::from(*r.start()), u64::from(*r.end())));
    match field {
        "num_images" => range(&NUM_IMAGES_RANGE),
        "steps" => range(&STEPS_RANGE),
        "width" | "height" => range(&SIZE_RANGE),
        "clip_skip" => range(&CLIP_SKIP_RANGE),
        "seed" => Some((0, u64::MAX)),
        "canny_low_threshold" | "canny_high_threshold" => range(&CANNY_THRESHOLD_RANGE),
        "queue_capacity" => Some((1, usize::MAX as u64)),
        "preview_every" => Some((0, usize::MAX as u64)),
        _ => None,
    }
}

/// For a binding whose integers are wider than the core's (Python's): the error for an integer `value` that does
/// not fit `field`'s type (negative, or too large), with the message validation gives for a value outside the
/// field's range ([`int_range`]).
pub fn int_out_of_range(field: &'static str, value: impl std::fmt::Display) -> Error {
    match int_range(field) {
        Some((start, end)) => out_of_range(field, value, start, end),
        None => Error::invalid(field, format!("{value} is out of range")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn tiny() -> PipelineSettings {
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");
        PipelineSettings {
            model: Some(format!("{fixtures}/tiny-sd")),
            controlnet: Some(format!("{fixtures}/tiny-controlnet")),
            ..PipelineSettings::DEFAULT
        }
    }

    fn field_of(e: Error) -> &'static str {
        match e {
            Error::InvalidRequest { field, .. } => field,
            other => panic!("not an invalid request: {other:?}"),
        }
    }

    #[test]
    fn the_defaults_give_pipeline_config_defaults() {
        let c = PipelineSettings::DEFAULT.to_config().unwrap();
        let d = PipelineConfig::default_models().unwrap();
        assert_eq!(c.engine.model.display(), DEFAULT_MODEL);
        assert_eq!(c.engine.controlnet.display(), DEFAULT_CONTROLNET);
        assert!(c.engine.device.is_cpu());
        assert_eq!(c.engine.dtype, d.engine.dtype);
        assert_eq!(c.engine.variant, None);
        assert!(!c.engine.vae_tiling);
        assert_eq!(c.output_dir, d.output_dir);
        assert_eq!(c.output_dir, PathBuf::from(DEFAULT_OUTPUT_DIR));
        assert_eq!(c.queue_capacity, d.queue_capacity);
        assert_eq!(c.retention, d.retention);
        assert_eq!(c.cleanup_interval, d.cleanup_interval);
        assert_eq!(c.preview_every, d.preview_every);
        assert_eq!(c.shutdown, d.shutdown);
        assert_eq!(PipelineSettings::default(), PipelineSettings::DEFAULT);
    }

    #[test]
    fn every_field_translates() {
        let s = PipelineSettings {
            device: Some(" CPU ".into()),
            dtype: Some("Bf16".into()),
            variant: Some("fp16".into()),
            vae_tiling: true,
            output_dir: Some("elsewhere".into()),
            queue_capacity: 3,
            retention_secs: 1.5,
            cleanup_interval_secs: None,
            preview_every: 0,
            drain_on_shutdown: true,
            loras: vec![(
                format!(
                    "{}/../tests/fixtures/lora/kohya.safetensors",
                    env!("CARGO_MANIFEST_DIR")
                ),
                0.6,
            )],
            tiny_vae: Some(format!(
                "{}/../tests/fixtures/tiny-taesd",
                env!("CARGO_MANIFEST_DIR")
            )),
            ..tiny()
        };
        let c = s.to_config().unwrap();
        assert_eq!(c.engine.loras.len(), 1);
        assert_eq!(c.engine.loras[0].scale, 0.6);
        assert!(matches!(c.engine.tiny_vae, Some(ModelSource::Local(_))));
        assert!(c.engine.device.is_cpu());
        assert_eq!(c.engine.dtype, DType::BF16);
        assert_eq!(c.engine.variant.as_deref(), Some("fp16"));
        assert!(c.engine.vae_tiling);
        assert_eq!(c.output_dir, PathBuf::from("elsewhere"));
        assert_eq!(c.queue_capacity, 3);
        assert_eq!(c.retention, Duration::from_millis(1500));
        assert_eq!(c.cleanup_interval, None);
        assert_eq!(c.preview_every, 0);
        assert_eq!(c.shutdown, ShutdownPolicy::Drain);
    }

    #[test]
    fn each_bad_field_is_named_as_the_bindings_name_it() {
        let cases: Vec<(PipelineSettings, &str)> = vec![
            (
                PipelineSettings {
                    device: Some("tpu".into()),
                    ..tiny()
                },
                "device",
            ),
            (
                PipelineSettings {
                    dtype: Some("f64".into()),
                    ..tiny()
                },
                "dtype",
            ),
            (
                PipelineSettings {
                    queue_capacity: 0,
                    ..tiny()
                },
                "queue_capacity",
            ),
            (
                PipelineSettings {
                    retention_secs: -1.0,
                    ..tiny()
                },
                "retention_secs",
            ),
            (
                PipelineSettings {
                    retention_secs: f64::NAN,
                    ..tiny()
                },
                "retention_secs",
            ),
            (
                PipelineSettings {
                    retention_secs: f64::INFINITY,
                    ..tiny()
                },
                "retention_secs",
            ),
            (
                PipelineSettings {
                    cleanup_interval_secs: Some(0.0),
                    ..tiny()
                },
                "cleanup_interval_secs",
            ),
            (
                PipelineSettings {
                    cleanup_interval_secs: Some(-2.0),
                    ..tiny()
                },
                "cleanup_interval_secs",
            ),
            (
                PipelineSettings {
                    cleanup_interval_secs: Some(f64::NAN),
                    ..tiny()
                },
                "cleanup_interval_secs",
            ),
            (
                PipelineSettings {
                    loras: vec![(
                        format!(
                            "{}/../tests/fixtures/lora/kohya.safetensors",
                            env!("CARGO_MANIFEST_DIR")
                        ),
                        f64::NAN,
                    )],
                    ..tiny()
                },
                "loras.scale",
            ),
        ];
        for (s, field) in cases {
            let e = s.to_config().unwrap_err();
            let message = e.to_string();
            assert_eq!(field_of(e), field, "{s:?}");
            assert!(message.contains(field), "{message}");
        }
    }

    #[test]
    fn a_model_that_is_neither_a_directory_nor_a_hub_id_is_a_missing_file() {
        let s = PipelineSettings {
            model: Some("./no/such/dir".into()),
            ..tiny()
        };
        assert!(matches!(s.to_config(), Err(Error::MissingFile { .. })));
    }

    #[test]
    fn huge_durations_saturate_and_bad_ones_are_refused() {
        assert_eq!(duration_from_secs("t", 1e300).unwrap(), Duration::MAX);
        assert_eq!(
            duration_from_secs("t", u64::MAX as f64).unwrap(),
            Duration::MAX
        );
        assert_eq!(
            duration_from_secs("t", 0.25).unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(duration_from_secs("t", 0.0).unwrap(), Duration::ZERO);
        for bad in [-0.5, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert_eq!(field_of(duration_from_secs("t", bad).unwrap_err()), "t");
        }
    }

    #[test]
    fn integers_that_do_not_fit_get_validations_message() {
        assert_eq!(
            int_out_of_range("steps", -1).to_string(),
            crate::request::GenerationRequest {
                steps: 0,
                ..Default::default()
            }
            .validate()
            .unwrap_err()
            .to_string()
            .replace(": 0 ", ": -1 ")
        );
        assert!(int_out_of_range("steps", "1000000000000000000000")
            .to_string()
            .contains("1..=150"));
        assert!(int_out_of_range("seed", -1)
            .to_string()
            .contains("0..=18446744073709551615"));
        assert!(int_out_of_range("queue_capacity", -3)
            .to_string()
            .contains("1..="));
        assert_eq!(field_of(int_out_of_range("width", -8)), "width");
        assert!(int_out_of_range("canny_low_threshold", -1)
            .to_string()
            .contains("0..=2040"));
        assert_eq!(int_range("num_images"), Some((1, 8)));
        assert_eq!(int_range("temperature"), None);
    }
}
