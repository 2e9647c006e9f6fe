//! A network's parameters read from a file under other names: the single-file checkpoint formats (original LDM
//! layout, A1111, torch pickles) hand each network a table from the parameter names its constructor reads to the
//! file's keys, and the loader builds the network through it as through a diffusers-layout file.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

use super::config::ConfigFile;
use super::pickle::{StateDict, TorchFile};
use super::weights::SafetensorsFile;
use crate::error::{Error, Result};

/// A weights file of either format, read on demand.
#[derive(Debug)]
pub enum TensorFile {
    /// A `.safetensors` file.
    Safetensors(SafetensorsFile),
    /// A torch checkpoint (`.ckpt`, `.pt`, `.pth`, `.bin`): its state dict, read by [`super::pickle`].
    Torch(StateDict),
}

impl TensorFile {
    /// Opens `path`: a torch checkpoint by its extension (`.ckpt`, `.pt`, `.pth`, `.bin`) or its first bytes (a zip
    /// or a pickle), else safetensors.
    pub fn open(path: &Path) -> Result<Self> {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        let torch = match ext.as_str() {
            "ckpt" | "pt" | "pth" | "bin" => true,
            "safetensors" | "sft" => false,
            _ => {
                let mut head = [0u8; 2];
                let n = std::fs::File::open(path)
                    .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
                    .map_err(|e| Error::reading(path, e))?;
                n == 2 && (&head == b"PK" || head[0] == 0x80)
            }
        };
        if torch {
            Ok(TensorFile::Torch(TorchFile::open(path)?.state_dict()?))
        } else {
            Ok(TensorFile::Safetensors(SafetensorsFile::open(path)?))
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        match self {
            TensorFile::Safetensors(f) => f.path(),
            TensorFile::Torch(f) => f.path(),
        }
    }

    /// Every tensor's name, in the file's order.
    pub fn names(&self) -> Vec<String> {
        match self {
            TensorFile::Safetensors(f) => f.names(),
            TensorFile::Torch(f) => f.names().to_vec(),
        }
    }

    /// The shape of tensor `name`, without reading it.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        match self {
            TensorFile::Safetensors(f) => f.shape(name).map(<[usize]>::to_vec),
            TensorFile::Torch(f) => f.shape(name).map(<[usize]>::to_vec),
        }
    }

    /// Reads tensor `name` as `dtype` onto `device`.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        match self {
            TensorFile::Safetensors(f) => f.load(name, dtype, device),
            TensorFile::Torch(f) => f.load(name, dtype, device),
        }
    }

    pub(crate) fn error(&self, key: &str, message: impl Into<String>) -> Error {
        Error::Checkpoint {
            path: self.path().display().to_string(),
            key: key.to_string(),
            message: message.into(),
        }
    }
}

/// Where one parameter of a network is in a file.
#[derive(Debug, Clone)]
pub(crate) struct Source {
    /// The file's key.
    pub(crate) key: String,
    /// A 1x1 convolution read as a matrix (`[C, C, 1, 1]` -> `[C, C]`).
    pub(crate) squeeze: bool,
}

/// One network's parameters inside a file: diffusers' parameter names mapped to the file's keys. A
/// [`SimpleBackend`] (through [`MappedWeights::backend`]) that remembers what was read: [`MappedWeights::finish`]
/// then reports a typed error naming the file's key for a shape that did not fit, a parameter the file lacks, or
/// a tensor of the file that no layer read.
#[derive(Debug)]
pub struct MappedWeights {
    file: Arc<TensorFile>,
    network: &'static str,
    config: String,
    map: HashMap<String, Source>,
    /// Parameter-name prefixes a network may leave unread (the VAE's encoder when only decoding).
    optional: &'static [&'static str],
    used: Mutex<HashSet<String>>,
    failure: Mutex<Option<Error>>,
}

impl MappedWeights {
    pub(crate) fn new(
        file: Arc<TensorFile>,
        network: &'static str,
        config: &ConfigFile,
        map: HashMap<String, Source>,
        optional: &'static [&'static str],
    ) -> Self {
        Self {
            file,
            network,
            config: config.origin().to_string(),
            map,
            optional,
            used: Mutex::new(HashSet::new()),
            failure: Mutex::new(None),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The parameter names (diffusers') this maps.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.map.keys().cloned().collect();
        v.sort();
        v
    }

    /// The file's key of parameter `name`.
    pub fn file_key(&self, name: &str) -> Option<&str> {
        self.map.get(name).map(|s| s.key.as_str())
    }

    /// The shape of parameter `name` as the network sees it.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let s = self.map.get(name)?;
        let dims = self.file.shape(&s.key)?;
        Some(if s.squeeze { dims[..2].to_vec() } else { dims })
    }

    /// Reads parameter `name` as `dtype` onto `device`.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let s = self.map.get(name).ok_or_else(|| {
            candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            }
            .bt()
        })?;
        let t = self.file.load(&s.key, dtype, device)?;
        if s.squeeze {
            let d = t.dims();
            t.reshape((d[0], d[1]))
        } else {
            Ok(t)
        }
    }

    /// This table as a [`SimpleBackend`] for a network's `VarBuilder`.
    pub fn backend(self: &Arc<Self>) -> Box<dyn SimpleBackend> {
        Box::new(MappedBackend(self.clone()))
    }

    /// Counts `names` as read (parameters a network gets from elsewhere, such as LoRA-fused weights computed from
    /// these).
    pub(crate) fn mark_used<'a>(&self, names: impl IntoIterator<Item = &'a String>) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        used.extend(names.into_iter().cloned());
    }

    fn record(&self, e: Error) {
        let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some(e);
        }
    }

    /// After the network was built from this table: the first error recorded while it read its parameters (with
    /// the file's key), else [`Error::Checkpoint`] for a tensor of the file that no layer read (its sizes or its
    /// block count disagree with the configuration), else `Ok`.
    pub fn finish(&self) -> Result<()> {
        if let Some(e) = self
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            return Err(e);
        }
        let used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let mut unused: Vec<(&String, &Source)> = self
            .map
            .iter()
            .filter(|(name, _)| !used.contains(*name))
            .filter(|(name, _)| !self.optional.iter().any(|p| name.starts_with(p)))
            .collect();
        unused.sort_by(|a, b| a.1.key.cmp(&b.1.key));
        match unused.first() {
            None => Ok(()),
            Some((name, s)) => Err(self.file.error(
                &s.key,
                format!(
                    "no layer of the {} built from {} reads it (as {name}): the file's network has other sizes or \
                     more blocks than that configuration ({} such tensors)",
                    self.network,
                    self.config,
                    unused.len()
                ),
            )),
        }
    }

    fn get(&self, s: Shape, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some(src) = self.map.get(name) else {
            self.record(Error::Checkpoint {
                path: self.path().display().to_string(),
                key: format!("{} parameter {name}", self.network),
                message: format!(
                    "no tensor of the file maps to it (the {} is built from {}; the file lacks that layer or \
                     belongs to a differently shaped network)",
                    self.network, self.config
                ),
            });
            return Err(candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            }
            .bt());
        };
        let got = self.shape(name).unwrap_or_default();
        if got != s.dims() {
            self.record(self.file.error(
                &src.key,
                format!(
                    "shape {got:?} does not fit the {}'s {name} {:?} (built from {})",
                    self.network,
                    s.dims(),
                    self.config
                ),
            ));
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name} ({})", src.key),
                expected: s,
                got: got.into(),
            }
            .bt());
        }
        self.used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string());
        self.load(name, dtype, dev)
    }
}

/// [`MappedWeights`] shared with a network's builder.
struct MappedBackend(Arc<MappedWeights>);

impl SimpleBackend for MappedBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.get(s, name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0
            .used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string());
        self.0.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.map.contains_key(name)
    }
}
