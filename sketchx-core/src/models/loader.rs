//! Finding and opening model files: a Hugging Face Hub repository (downloaded once into the standard HF cache,
//! reused offline), a local directory in diffusers layout, or a single checkpoint file ([`ModelSource::File`], read
//! by [`super::single_file`]); [`Resolver::config`] reads a component's config through [`super::config`].
//! [`var_builder`], [`weights`] and [`weights_from`] open a network's weights for its constructor: safetensors
//! through sketchx's own reader ([`crate::models::weights`]), pickled `.bin` files through the safe pickle reader
//! ([`crate::models::pickle`]), a part of a single file through its key map ([`WeightsSource::Mapped`]).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

use super::config::ConfigFile;
use super::mapped::MappedWeights;
use super::pickle::TorchFile;
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
    /// A single local file: a whole checkpoint in the original (LDM) layout, an original-format ControlNet or a
    /// VAE (see [`super::single_file`]).
    File(PathBuf),
}

impl ModelSource {
    /// Interprets a user-supplied string: an existing directory is local, an existing file a
    /// [`ModelSource::File`]; otherwise a Hub id, optionally `owner/name@revision`. Anything else (an absolute or
    /// relative path that does not exist) is an error naming it.
    pub fn parse(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(ModelSource::Local(path.to_path_buf()));
        }
        if path.is_file() {
            return Ok(ModelSource::File(path.to_path_buf()));
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
                    "{spec} (neither an existing file or directory nor a Hub repo id like owner/name)"
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
            ModelSource::Local(p) | ModelSource::File(p) => p.display().to_string(),
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
    /// `HF_HUB_OFFLINE` is set, an API client with progress bars. A [`ModelSource::File`] has no files to resolve:
    /// [`Error::InvalidRequest`] (a single file is opened by [`super::single_file`]).
    pub fn new(source: ModelSource) -> Result<Self> {
        let hub = match &source {
            ModelSource::File(p) => {
                return Err(Error::invalid(
                    "model",
                    format!(
                        "{} is a single file where a folder or Hub repository is needed",
                        p.display()
                    ),
                ))
            }
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
            ModelSource::Local(dir) | ModelSource::File(dir) => dir.join(rel).display().to_string(),
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

/// Where a network's weights are: a weights file of its own, or its part of a single checkpoint file.
#[derive(Debug, Clone)]
pub enum WeightsSource {
    /// A file holding this network's tensors under their diffusers names (`.safetensors`, or a pickled `.bin`).
    File(PathBuf),
    /// The network's tensors inside a single file, under the file's own names ([`MappedWeights`]).
    Mapped(Arc<MappedWeights>),
}

impl WeightsSource {
    /// The file, for messages.
    pub fn path(&self) -> &Path {
        match self {
            WeightsSource::File(p) => p,
            WeightsSource::Mapped(m) => m.path(),
        }
    }

    /// The tensors as a backend for a `VarBuilder`.
    fn backend(&self) -> Result<Box<dyn SimpleBackend>> {
        match self {
            WeightsSource::File(p) => open_backend(p),
            WeightsSource::Mapped(m) => Ok(m.backend()),
        }
    }

    /// Wraps the result of building a network from these weights: for a mapped source, the typed error naming the
    /// file's key that the build recorded (a shape that does not fit, a missing tensor), or one for a tensor no
    /// layer read ([`MappedWeights::finish`]); for a file, a candle error as [`build_error`] words it.
    pub fn finish<T>(&self, built: Result<T>) -> Result<T> {
        match self {
            WeightsSource::Mapped(m) => {
                let t = match built {
                    Ok(t) => t,
                    Err(e) => {
                        m.finish()?;
                        return Err(candle_error_to_file(e, m.path()));
                    }
                };
                m.finish()?;
                Ok(t)
            }
            WeightsSource::File(p) => built.map_err(|e| candle_error_to_file(e, p)),
        }
    }
}

impl From<PathBuf> for WeightsSource {
    fn from(p: PathBuf) -> Self {
        WeightsSource::File(p)
    }
}

/// A candle error raised while building a network from `path`, as an error naming the file (other errors as they
/// are).
fn candle_error_to_file(e: Error, path: &Path) -> Error {
    match e {
        Error::Candle(c) => build_error(path, c),
        other => other,
    }
}

/// Opens a weights file as a [`VarBuilder`] for a network in `dtype` on `device`: its tensors are converted to that
/// precision's [weights dtype](Precision::weights_dtype) as they are read (`dtype` itself, except in the CPU bf16
/// mode, whose weights are read as f32), and the builder says so. Safetensors are read through [`SafetensorsFile`]
/// (on demand, straight into each tensor's buffer, in parallel; nothing stays mapped), a pickled PyTorch `.bin`
/// through [`crate::models::pickle`]. Only the tensors a network asks for are read.
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
    weights_from(&WeightsSource::File(path.to_path_buf()), precision, device)
}

/// Opens a network's weights, wherever they are, for a network built in `precision`.
pub fn weights_from(
    source: &WeightsSource,
    precision: Precision,
    device: &Device,
) -> Result<Weights<'static>> {
    let vb = VarBuilder::from_backend(source.backend()?, precision.weights_dtype(), device.clone());
    Ok(Weights::new(vb, precision))
}

/// As [`weights`], with the tensors of `fused` (parameter name -> tensor, e.g. LoRA-fused weights from
/// [`crate::models::lora::fuse`]) handed out instead of the file's: converted to the builder's dtype and moved to
/// its device when a network asks for them, so that in the CPU bf16 mode layers round the fused f32 values. Each
/// is handed out once and then let go (the layer that asked holds it as it needs), so that a network's fused
/// weights are never all in memory beside the layers built from them; asking for one again is an error.
pub fn weights_fused(
    path: &Path,
    precision: Precision,
    device: &Device,
    fused: HashMap<String, Tensor>,
) -> Result<Weights<'static>> {
    weights_fused_from(
        &WeightsSource::File(path.to_path_buf()),
        precision,
        device,
        fused,
    )
}

/// As [`weights_fused`], for weights wherever they are.
pub fn weights_fused_from(
    source: &WeightsSource,
    precision: Precision,
    device: &Device,
    fused: HashMap<String, Tensor>,
) -> Result<Weights<'static>> {
    let base = source.backend()?;
    if let WeightsSource::Mapped(m) = source {
        // The fused tensors replace the file's, which are read (for the fusion) but not through this builder.
        m.mark_used(fused.keys());
    }
    let backend: Box<dyn SimpleBackend> = if fused.is_empty() {
        base
    } else {
        Box::new(FusedBackend {
            base,
            fused: Mutex::new((fused, HashSet::new())),
        })
    };
    let vb = VarBuilder::from_backend(backend, precision.weights_dtype(), device.clone());
    Ok(Weights::new(vb, precision))
}

/// A weights file with some of its tensors replaced: the replacements not handed out yet, and the names of
/// those that were.
struct FusedBackend {
    base: Box<dyn SimpleBackend>,
    fused: Mutex<(HashMap<String, Tensor>, HashSet<String>)>,
}

impl FusedBackend {
    /// The replacement of `name`, taken out (`None` when the file's own tensor is the one); an error when it was
    /// handed out before (it is gone, and the file's unfused tensor must not stand in for it).
    fn take(&self, name: &str) -> candle_core::Result<Option<Tensor>> {
        let mut guard = self.fused.lock().unwrap_or_else(|e| e.into_inner());
        let (fused, taken) = &mut *guard;
        match fused.remove(name) {
            Some(t) => {
                taken.insert(name.to_string());
                Ok(Some(t))
            }
            None if taken.contains(name) => Err(candle_core::Error::Msg(format!(
                "fused weight {name} requested a second time"
            ))
            .bt()),
            None => Ok(None),
        }
    }
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
        match self.take(name)? {
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
        match self.take(name)? {
            Some(t) => t.to_dtype(dtype)?.to_device(dev),
            None => self.base.get_unchecked(name, dtype, dev),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        let guard = self.fused.lock().unwrap_or_else(|e| e.into_inner());
        guard.0.contains_key(name) || guard.1.contains(name) || self.base.contains_tensor(name)
    }
}

/// The tensors of a weights file, by its extension: a pickled PyTorch `.bin` through the safe pickle reader (its
/// state dict, unwrapped as diffusers does), anything else as safetensors.
fn open_backend(path: &Path) -> Result<Box<dyn SimpleBackend>> {
    if path.extension().is_some_and(|e| e == "bin") {
        Ok(Box::new(TorchFile::open(path)?.state_dict()?))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A fused tensor replaces the file's, is handed out once (then let go), and asking for it again fails
    /// instead of handing out the file's unfused tensor; other tensors come from the file as often as asked.
    #[test]
    fn fused_tensors_are_handed_out_once() {
        let dev = Device::Cpu;
        let t = |v: f32| Tensor::full(v, 2, &dev).unwrap();
        let base: HashMap<String, Tensor> =
            [("a".to_string(), t(0.0)), ("b".to_string(), t(2.0))].into();
        let fused = [("a".to_string(), t(1.0))].into();
        let backend = FusedBackend {
            base: Box::new(base),
            fused: Mutex::new((fused, HashSet::new())),
        };
        let read = |name: &str| {
            backend
                .get(
                    (2,).into(),
                    name,
                    candle_nn::Init::Const(9.0),
                    DType::F32,
                    &dev,
                )
                .and_then(|t| t.to_vec1::<f32>())
        };
        assert!(backend.contains_tensor("a"));
        assert_eq!(read("a").unwrap(), [1.0, 1.0]);
        assert!(backend.contains_tensor("a"));
        let err = read("a").unwrap_err().to_string();
        assert!(
            err.contains("fused weight a requested a second time"),
            "{err}"
        );
        assert_eq!(read("b").unwrap(), [2.0, 2.0]);
        assert_eq!(read("b").unwrap(), [2.0, 2.0]);
        assert!(backend.fused.lock().unwrap().0.is_empty());
    }
}
