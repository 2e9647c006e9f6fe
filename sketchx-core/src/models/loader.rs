//! Finding and opening model files: a Hugging Face Hub repository (downloaded once into the standard HF cache,
//! reused offline) or a local directory in diffusers layout; [`Resolver::config`] reads a component's config through
//! [`super::config`]. [`var_builder`] and [`weights`] open a weights file for a network's constructor: safetensors through sketchx's own reader
//! ([`crate::models::weights`]), pickled `.bin` files through candle.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

use super::config::ConfigFile;
use crate::error::{Error, Result};
use crate::models::weights::SafetensorsFile;
use crate::precision::{Precision, Weights};

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A Hugging Face Hub repository id such as `stable-diffusion-v1-5/stable-diffusion-v1-5`, with an optional
    /// revision (branch, tag or commit; `main` when `None`).
    Hub {
        /// `owner/name`.
        repo: String,
        /// Branch, tag or commit.
        revision: Option<String>,
    },
    /// A local directory in diffusers layout.
    Local(PathBuf),
}

impl ModelSource {
    /// Interprets a user-supplied string: an existing directory is local; otherwise a Hub id, optionally
    /// `owner/name@revision`. Anything else (an absolute or relative path that does not exist) is an error naming it.
    pub fn parse(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(ModelSource::Local(path.to_path_buf()));
        }
        let (repo, revision) = match spec.split_once('@') {
            Some((r, rev)) if !rev.is_empty() => (r, Some(rev.to_string())),
            _ => (spec, None),
        };
        let looks_like_id = repo.split('/').count() == 2
            && repo.split('/').all(|p| {
                !p.is_empty()
                    && p != "."
                    && p != ".."
                    && p.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            });
        if looks_like_id && !spec.starts_with('.') {
            Ok(ModelSource::Hub {
                repo: repo.to_string(),
                revision,
            })
        } else {
            Err(Error::MissingFile {
                path: format!(
                    "{spec} (neither an existing directory nor a Hub repo id like owner/name)"
                ),
            })
        }
    }

    /// A human-readable name for messages.
    pub fn display(&self) -> String {
        match self {
            ModelSource::Hub { repo, revision } => match revision {
                Some(r) => format!("{repo}@{r}"),
                None => repo.clone(),
            },
            ModelSource::Local(p) => p.display().to_string(),
        }
    }
}

/// Resolves files of one [`ModelSource`] to local paths, downloading from the Hub when needed.
pub struct Resolver {
    source: ModelSource,
    hub: Option<HubRepo>,
}

struct HubRepo {
    repo: String,
    cache: hf_hub::CacheRepo,
    api: Option<hf_hub::api::sync::ApiRepo>,
    siblings: std::sync::OnceLock<Option<Vec<String>>>,
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
        .unwrap_or(false)
}

/// The Hugging Face cache as huggingface_hub finds it: `HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`; so models downloaded by diffusers are reused.
pub fn hf_cache() -> hf_hub::Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(p) if !p.is_empty() => hf_hub::Cache::new(PathBuf::from(p)),
        _ => hf_hub::Cache::from_env(),
    }
}

impl Resolver {
    /// Prepares a resolver; for the Hub this sets up the cache (honouring `HF_HOME` / `HF_HUB_CACHE`) and, unless
    /// `HF_HUB_OFFLINE` is set, an API client with progress bars.
    pub fn new(source: ModelSource) -> Result<Self> {
        let hub = match &source {
            ModelSource::Local(dir) => {
                if !dir.is_dir() {
                    return Err(Error::MissingFile {
                        path: dir.display().to_string(),
                    });
                }
                None
            }
            ModelSource::Hub { repo, revision } => {
                let rev = revision.clone().unwrap_or_else(|| "main".to_string());
                let hf_repo =
                    hf_hub::Repo::with_revision(repo.clone(), hf_hub::RepoType::Model, rev);
                let cache_root = hf_cache();
                let cache = cache_root.repo(hf_repo.clone());
                let api = if offline() {
                    None
                } else {
                    let api = hf_hub::api::sync::ApiBuilder::from_env()
                        .with_cache_dir(cache_root.path().clone())
                        .with_progress(true)
                        .build()
                        .map_err(|e| Error::Download {
                            repo: repo.clone(),
                            file: String::new(),
                            message: e.to_string(),
                        })?;
                    Some(api.repo(hf_repo))
                };
                Some(HubRepo {
                    repo: repo.clone(),
                    cache,
                    api,
                    siblings: std::sync::OnceLock::new(),
                })
            }
        };
        Ok(Self { source, hub })
    }

    /// The source this resolver reads.
    pub fn source(&self) -> &ModelSource {
        &self.source
    }

    /// Name of `rel` for error messages.
    pub fn describe(&self, rel: &str) -> String {
        match &self.source {
            ModelSource::Local(dir) => dir.join(rel).display().to_string(),
            ModelSource::Hub { repo, .. } => format!("{repo}/{rel}"),
        }
    }

    /// Whether `rel` exists (locally, in the cache, or in the Hub repo's file list).
    pub fn exists(&self, rel: &str) -> bool {
        match (&self.source, &self.hub) {
            (ModelSource::Local(dir), _) => dir.join(rel).is_file(),
            (_, Some(hub)) => {
                if hub.cache.get(rel).is_some() {
                    return true;
                }
                match hub.siblings.get_or_init(|| {
                    hub.api
                        .as_ref()
                        .and_then(|api| api.info().ok())
                        .map(|info| info.siblings.into_iter().map(|s| s.rfilename).collect())
                }) {
                    Some(list) => list.iter().any(|f| f == rel),
                    None => false,
                }
            }
            _ => false,
        }
    }

    /// The local path of `rel`, downloading it into the HF cache first if needed.
    pub fn get(&self, rel: &str) -> Result<PathBuf> {
        match (&self.source, &self.hub) {
            (ModelSource::Local(dir), _) => {
                let p = dir.join(rel);
                if p.is_file() {
                    Ok(p)
                } else {
                    Err(Error::MissingFile {
                        path: p.display().to_string(),
                    })
                }
            }
            (_, Some(hub)) => {
                if let Some(p) = hub.cache.get(rel) {
                    return Ok(p);
                }
                let Some(api) = &hub.api else {
                    return Err(Error::MissingFile {
                        path: format!(
                            "{}/{rel} (not in the HF cache and HF_HUB_OFFLINE is set)",
                            hub.repo
                        ),
                    });
                };
                api.get(rel).map_err(|e| {
                    let message = e.to_string();
                    if message.contains("404") {
                        Error::MissingFile {
                            path: format!("{}/{rel}", hub.repo),
                        }
                    } else {
                        Error::Download {
                            repo: hub.repo.clone(),
                            file: rel.to_string(),
                            message,
                        }
                    }
                })
            }
            _ => unreachable!("a Hub source always has a hub repo"),
        }
    }

    /// Reads and parses a JSON file, with errors naming the file.
    pub fn json<T: DeserializeOwned>(&self, rel: &str) -> Result<T> {
        let path = self.get(rel)?;
        read_json(&path)
    }

    /// Reads a configuration file, named in errors as [`Resolver::describe`] names it.
    pub fn config(&self, rel: &str) -> Result<ConfigFile> {
        ConfigFile::read_as(&self.get(rel)?, &self.describe(rel))
    }

    /// Picks the weights file of a component: `.safetensors` before `.bin`, the `variant` (e.g. `fp16`) before the
    /// plain file when one is asked for. `stem` is `diffusion_pytorch_model` (diffusers) or `model` /
    /// `pytorch_model` (transformers). `component` is `""` for a repository whose root is the component.
    pub fn weights(&self, component: &str, variant: Option<&str>) -> Result<PathBuf> {
        let prefix = if component.is_empty() {
            String::new()
        } else {
            format!("{component}/")
        };
        let mut candidates = Vec::new();
        let mut push = |stem: &str, ext: &str| {
            if let Some(v) = variant {
                candidates.push(format!("{prefix}{stem}.{v}.{ext}"));
            }
            candidates.push(format!("{prefix}{stem}.{ext}"));
        };
        push("diffusion_pytorch_model", "safetensors");
        push("model", "safetensors");
        push("diffusion_pytorch_model", "bin");
        push("pytorch_model", "bin");
        for c in &candidates {
            if self.exists(c) {
                return self.get(c);
            }
        }
        Err(Error::MissingFile {
            path: format!(
                "{} (looked for {})",
                self.describe(if component.is_empty() { "." } else { component }),
                candidates
                    .iter()
                    .map(|c| c.rsplit('/').next().unwrap_or(c))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
    }
}

pub use super::config::read_json;

/// Opens a weights file as a [`VarBuilder`] for a network in `dtype` on `device`: its tensors are converted to that
/// precision's [weights dtype](Precision::weights_dtype) as they are read (`dtype` itself, except in the CPU bf16
/// mode, whose weights are read as f32), and the builder says so. Safetensors are read through [`SafetensorsFile`]
/// (on demand, straight into each tensor's buffer, in parallel; nothing stays mapped), a pickled PyTorch `.bin`
/// through candle. Only the tensors a network asks for are read.
pub fn var_builder(path: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    let dtype = Precision::new(device, dtype).weights_dtype();
    Ok(VarBuilder::from_backend(
        open_backend(path)?,
        dtype,
        device.clone(),
    ))
}

/// Opens a weights file for a network built in `precision` (tensors read in [`Precision::weights_dtype`]).
pub fn weights(path: &Path, precision: Precision, device: &Device) -> Result<Weights<'static>> {
    let backend = open_backend(path)?;
    let vb = VarBuilder::from_backend(backend, precision.weights_dtype(), device.clone());
    Ok(Weights::new(vb, precision))
}

/// As [`weights`], with the tensors of `fused` (parameter name -> tensor, e.g. LoRA-fused weights from
/// [`crate::models::lora::fuse`]) handed out instead of the file's: converted to the builder's dtype and moved to
/// its device when a network asks for them, so that in the CPU bf16 mode layers round the fused f32 values.
pub fn weights_fused(
    path: &Path,
    precision: Precision,
    device: &Device,
    fused: HashMap<String, Tensor>,
) -> Result<Weights<'static>> {
    let base = open_backend(path)?;
    let backend: Box<dyn SimpleBackend> = if fused.is_empty() {
        base
    } else {
        Box::new(FusedBackend { base, fused })
    };
    let vb = VarBuilder::from_backend(backend, precision.weights_dtype(), device.clone());
    Ok(Weights::new(vb, precision))
}

/// A weights file with some of its tensors replaced.
struct FusedBackend {
    base: Box<dyn SimpleBackend>,
    fused: HashMap<String, Tensor>,
}

impl SimpleBackend for FusedBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        match self.fused.get(name) {
            Some(t) => {
                if t.dims() != s.dims() {
                    return Err(candle_core::Error::UnexpectedShape {
                        msg: format!("shape mismatch for {name}"),
                        expected: s,
                        got: t.shape().clone(),
                    }
                    .bt());
                }
                t.to_dtype(dtype)?.to_device(dev)
            }
            None => self.base.get(s, name, init, dtype, dev),
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.fused.get(name) {
            Some(t) => t.to_dtype(dtype)?.to_device(dev),
            None => self.base.get_unchecked(name, dtype, dev),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.fused.contains_key(name) || self.base.contains_tensor(name)
    }
}

/// The tensors of a weights file, by its extension.
fn open_backend(path: &Path) -> Result<Box<dyn SimpleBackend>> {
    if path.extension().is_some_and(|e| e == "bin") {
        Ok(Box::new(
            candle_core::pickle::PthTensors::new(path, None)
                .map_err(|e| Error::malformed(path.display(), e))?,
        ))
    } else {
        Ok(Box::new(SafetensorsFile::open(path)?))
    }
}

/// Wraps a candle error raised while building a network from `path` into a typed error naming the file: a failed
/// read is [`Error::Io`], anything else (a missing tensor, a shape that does not match the config) is
/// [`Error::MalformedFile`].
pub fn build_error(path: &Path, e: candle_core::Error) -> Error {
    match e {
        candle_core::Error::Io(source) => Error::io(path, source),
        e => Error::malformed(
            path.display(),
            format!("weights do not match the configuration: {e}"),
        ),
    }
}
