//! LoRA adapters fused into the UNet's and the text encoder's weights at load, as diffusers'
//! `load_lora_weights` + `fuse_lora(lora_scale=s)` does: every adapted layer's weight becomes
//! `W + scale * (alpha / rank) * (up @ down)` (convolutions: `up[:, :, 0, 0] @ down` with `down` flattened over its
//! input channels and kernel), several adapters adding their deltas (diffusers' `set_adapters` with weights, then
//! `fuse_lora`).
//!
//! Three file layouts are read, in safetensors files only:
//! - kohya (`lora_unet_<module with _>` / `lora_te_text_model_<module with _>`, `.lora_down.weight`,
//!   `.lora_up.weight`, an optional 0-dim `.alpha`);
//! - diffusers/peft (`unet.<module>` / `text_encoder.[text_model.]<module>`, `.lora_A.weight` / `.lora_B.weight`;
//!   alpha and rank from the safetensors metadata `lora_adapter_metadata` that diffusers' `save_lora_weights`
//!   writes (`unet.lora_alpha`, `unet.r`, `unet.alpha_pattern`, ...));
//! - old diffusers (`unet.<module>.lora.down.weight` / `.lora.up.weight`, the attention processors'
//!   `<attention>.processor.to_q_lora.down.weight`, `text_encoder.<module>.lora_linear_layer.down.weight`).
//!
//! A layer without an alpha of its own (no `.alpha` tensor, no metadata) gets the one diffusers gives it: alpha =
//! rank when all layers share one rank (see `default_alphas` for the rest).
//!
//! The deltas are computed in f64 from the stored weights and rounded once, to the precision's weights dtype, before
//! any layer sees them (f32 in the CPU bf16 mode, whose layers round and pack their weights later), so the fused
//! weights are diffusers' within f32 rounding. Every key of every file must land on a layer of the UNet or the
//! text encoder: anything else (an unknown module, an SDXL key, a LyCORIS/DoRA tensor) is an [`Error::Lora`]
//! naming it, raised before any network is built.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use regex::Regex;
use serde_json::Value;

use super::loader::{ModelSource, Resolver, WeightsSource};
use super::mapped::MappedWeights;
use super::pickle::{StateDict, TorchFile};
use super::weights::SafetensorsFile;
use crate::error::{Error, Result};
use crate::precision::Precision;

/// The largest accepted |scale| of one LoRA: far beyond what any adapter is used at, small enough to refuse a typo.
pub const MAX_LORA_SCALE: f64 = 10.0;

/// Where a LoRA file comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoraSource {
    /// A local `.safetensors` file.
    File(PathBuf),
    /// A file in a Hugging Face Hub repository, downloaded once into the HF cache like the models
    /// ([`Resolver`]).
    Hub {
        /// `owner/name`.
        repo: String,
        /// Branch, tag or commit (`main` when `None`).
        revision: Option<String>,
        /// The file's path inside the repository, e.g. `pytorch_lora_weights.safetensors`.
        file: String,
    },
}

/// One LoRA to fuse and its scale (diffusers' `lora_scale`, or the adapter's weight in `set_adapters`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// The file.
    pub source: LoraSource,
    /// The multiplier of the adapter's delta: 1 applies it as trained, 0 leaves the weights unchanged, negative
    /// values subtract it. Finite, within ±[`MAX_LORA_SCALE`].
    pub scale: f64,
}

impl LoraSpec {
    /// A local file at `scale`.
    pub fn file(path: impl Into<PathBuf>, scale: f64) -> Self {
        Self {
            source: LoraSource::File(path.into()),
            scale,
        }
    }

    /// The file `file` of the Hub repository `repo` (`owner/name`, branch `main`) at `scale`.
    pub fn hub(repo: impl Into<String>, file: impl Into<String>, scale: f64) -> Self {
        Self {
            source: LoraSource::Hub {
                repo: repo.into(),
                revision: None,
                file: file.into(),
            },
            scale,
        }
    }

    /// Refuses a scale that is not finite or beyond ±[`MAX_LORA_SCALE`] ([`Error::InvalidRequest`] for the field
    /// `loras.scale`).
    pub fn validate(&self) -> Result<()> {
        if !self.scale.is_finite() || self.scale.abs() > MAX_LORA_SCALE {
            return Err(Error::invalid(
                "loras.scale",
                format!(
                    "{} for LoRA {} is not a finite number in -{MAX_LORA_SCALE}..={MAX_LORA_SCALE}",
                    self.scale,
                    self.display()
                ),
            ));
        }
        Ok(())
    }

    /// A human-readable name for messages.
    pub fn display(&self) -> String {
        match &self.source {
            LoraSource::File(p) => p.display().to_string(),
            LoraSource::Hub {
                repo,
                revision,
                file,
            } => match revision {
                Some(r) => format!("{repo}@{r}/{file}"),
                None => format!("{repo}/{file}"),
            },
        }
    }

    /// The local path of the file, downloading it into the HF cache first if needed.
    fn resolve(&self) -> Result<PathBuf> {
        match &self.source {
            LoraSource::File(p) => {
                if p.is_file() {
                    Ok(p.clone())
                } else {
                    Err(Error::MissingFile {
                        path: p.display().to_string(),
                    })
                }
            }
            LoraSource::Hub {
                repo,
                revision,
                file,
            } => Resolver::new(ModelSource::Hub {
                repo: repo.clone(),
                revision: revision.clone(),
            })?
            .get(file),
        }
    }
}

impl LoraSource {
    /// Interprets a user-supplied LoRA location: an existing file, or a path whose first component exists
    /// locally (`tests/fixtures/...`, `./x`, `/abs/...`), is a [`LoraSource::File`]; otherwise
    /// `owner/name[@revision]/path/in/repo.safetensors` is a file of a Hub repository. Anything else is
    /// [`Error::MissingFile`] naming it; so is a local path that does not exist.
    pub fn parse(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        let first = spec.split('/').next().unwrap_or("");
        let local = path.is_file()
            || spec.starts_with('/')
            || spec.starts_with('.')
            || first.is_empty()
            || Path::new(first).exists();
        if !local {
            let mut parts = spec.splitn(3, '/');
            if let (Some(owner), Some(name_rev), Some(file)) =
                (parts.next(), parts.next(), parts.next())
            {
                let (name, revision) = match name_rev.split_once('@') {
                    Some((n, r)) if !r.is_empty() => (n, Some(r.to_string())),
                    _ => (name_rev, None),
                };
                let id_part = |p: &str| {
                    !p.is_empty()
                        && p != "."
                        && p != ".."
                        && p.chars()
                            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                };
                if id_part(owner)
                    && id_part(name)
                    && !file.is_empty()
                    && file
                        .split('/')
                        .all(|p| !p.is_empty() && p != "." && p != "..")
                {
                    return Ok(LoraSource::Hub {
                        repo: format!("{owner}/{name}"),
                        revision,
                        file: file.to_string(),
                    });
                }
            }
        }
        if path.is_file() {
            Ok(LoraSource::File(path.to_path_buf()))
        } else {
            Err(Error::MissingFile {
                path: format!(
                    "LoRA {spec} (neither an existing file nor a Hub file like owner/name/file.safetensors)"
                ),
            })
        }
    }
}

impl LoraSpec {
    /// The scale used when a `PATH[:SCALE]` argument gives none.
    pub const DEFAULT_SCALE: f64 = 1.0;

    /// Splits a `PATH[:SCALE]` argument (the CLI's `--lora`, the C options' strings): the text after the last
    /// `:` is the scale when it parses as a number, else the whole argument is the location and the scale is
    /// [`LoraSpec::DEFAULT_SCALE`] (so a path containing `:` still works). The scale is not range-checked here.
    pub fn split_arg(arg: &str) -> (&str, f64) {
        match arg.rsplit_once(':') {
            Some((location, scale)) if !location.is_empty() => match scale.trim().parse::<f64>() {
                Ok(s) => (location, s),
                Err(_) => (arg, Self::DEFAULT_SCALE),
            },
            _ => (arg, Self::DEFAULT_SCALE),
        }
    }

    /// A LoRA from its location ([`LoraSource::parse`]) and scale, checked ([`LoraSpec::validate`]).
    pub fn from_location(location: &str, scale: f64) -> Result<Self> {
        let spec = Self {
            source: LoraSource::parse(location)?,
            scale,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Parses and checks a `PATH[:SCALE]` argument: [`LoraSpec::split_arg`] then [`LoraSpec::from_location`].
    pub fn parse(arg: &str) -> Result<Self> {
        let (location, scale) = Self::split_arg(arg);
        Self::from_location(location, scale)
    }
}

/// The networks a LoRA adapts (diffusers' `load_lora_weights` adapts these two, never the ControlNet or the VAE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    /// The UNet.
    Unet,
    /// The CLIP text encoder.
    TextEncoder,
}

impl Component {
    fn name(self) -> &'static str {
        match self {
            Component::Unet => "the UNet",
            Component::TextEncoder => "the text encoder",
        }
    }

    /// The prefix of this component in diffusers' LoRA keys and metadata.
    fn prefix(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
        }
    }
}

/// The fused weights of every adapted parameter, keyed by the parameter's name in its network's weights file (for
/// the text encoder with `text_model.` when that file has it), in the precision's weights dtype on the CPU.
/// Parameters no LoRA touches are absent. [`crate::models::loader::weights_fused`] hands these out instead of the
/// file's tensors.
#[derive(Debug, Clone, Default)]
pub struct FusedWeights {
    /// The UNet's adapted parameters.
    pub unet: HashMap<String, Tensor>,
    /// The text encoder's adapted parameters.
    pub text_encoder: HashMap<String, Tensor>,
}

impl FusedWeights {
    /// The adapted parameters of `component`.
    pub fn of(&self, component: Component) -> &HashMap<String, Tensor> {
        match component {
            Component::Unet => &self.unet,
            Component::TextEncoder => &self.text_encoder,
        }
    }

    /// Whether no parameter is adapted.
    pub fn is_empty(&self) -> bool {
        self.unet.is_empty() && self.text_encoder.is_empty()
    }
}

/// Fuses `loras` into the weights of the model `model` (its `unet/` and `text_encoder/` weights, `variant`
/// preferred as [`Resolver::weights`] picks them; for a single checkpoint file, its UNet and text encoder with
/// SD1.5's built-in configs). See [`fuse`].
pub fn fuse_for_model(
    model: &ModelSource,
    variant: Option<&str>,
    loras: &[LoraSpec],
    precision: Precision,
) -> Result<FusedWeights> {
    if let ModelSource::File(path) = model {
        let c = super::single_file::open_checkpoint(path, &Default::default(), false)?;
        return fuse_sources(loras, &c.unet.1, &c.text_encoder.2, precision);
    }
    let base = Resolver::new(model.clone())?;
    let unet = base.weights("unet", variant)?;
    let text_encoder = base.weights("text_encoder", variant)?;
    fuse(loras, &unet, &text_encoder, precision)
}

/// Fuses `loras` into the weights files `unet` and `text_encoder`: validates every spec, reads every LoRA file,
/// maps every key to a layer (or fails naming it), and returns the adapted parameters in `precision`'s weights
/// dtype. Nothing but the adapted parameters and the LoRA tensors is read.
pub fn fuse(
    loras: &[LoraSpec],
    unet: &Path,
    text_encoder: &Path,
    precision: Precision,
) -> Result<FusedWeights> {
    fuse_sources(
        loras,
        &WeightsSource::File(unet.to_path_buf()),
        &WeightsSource::File(text_encoder.to_path_buf()),
        precision,
    )
}

/// As [`fuse`], for weights wherever they are (their own files, or parts of a single checkpoint file).
pub fn fuse_sources(
    loras: &[LoraSpec],
    unet: &WeightsSource,
    text_encoder: &WeightsSource,
    precision: Precision,
) -> Result<FusedWeights> {
    if loras.is_empty() {
        return Ok(FusedWeights::default());
    }
    for spec in loras {
        spec.validate()?;
    }
    let adapters = loras
        .iter()
        .map(Adapter::read)
        .collect::<Result<Vec<_>>>()?;
    // Every layer of every adapter is resolved to its parameter, and checked against its shape, before anything
    // is computed: an unknown key or a layer that does not fit fails before the (larger) fusion work, whichever
    // network it names.
    let mut plans = Vec::with_capacity(2);
    for (component, path) in [
        (Component::Unet, unet),
        (Component::TextEncoder, text_encoder),
    ] {
        let base = BaseFile::open(path)?;
        let path = path.path();
        let index = ModuleIndex::new(component, &base.names());
        let mut by_param: BTreeMap<String, Vec<Delta>> = BTreeMap::new();
        for adapter in &adapters {
            for layer in adapter.layers.iter().filter(|l| l.component == component) {
                let param = index.resolve(adapter, layer)?;
                let dims = base.shape(&param).ok_or_else(|| {
                    Error::malformed(path.display(), format!("no shape for {param}"))
                })?;
                let module = param.strip_suffix(".weight").unwrap_or(&param);
                let (cout, rank, fan_in) = check_fit(&dims, layer, &adapter.path, module)?;
                let factor = adapter.scale * layer.alpha.factor(rank, &adapter.path, module)?;
                by_param.entry(param).or_default().push(Delta {
                    up: layer.up.reshape((cout, rank))?,
                    down: layer.down.reshape((rank, fan_in))?,
                    factor,
                });
            }
        }
        plans.push((component, base, by_param));
    }
    let dtype = precision.weights_dtype();
    let mut out = FusedWeights::default();
    for (component, base, by_param) in plans {
        let map = match component {
            Component::Unet => &mut out.unet,
            Component::TextEncoder => &mut out.text_encoder,
        };
        for (param, deltas) in by_param {
            // `W + sum(factor * up @ down)` in f64, rounded once to the weights dtype.
            let w = base.load_f64(&param)?;
            let mut sum = w.clone();
            for d in &deltas {
                let delta = d.up.matmul(&d.down)?.affine(d.factor, 0.0)?;
                sum = (sum + delta.reshape(w.shape())?)?;
            }
            map.insert(param, sum.to_dtype(dtype)?);
        }
    }
    Ok(out)
}

/// One adapter's contribution to a parameter: `factor * up @ down` (`up` `[cout, rank]`, `down` `[rank, fan_in]`,
/// f64; `factor` = scale * alpha / rank).
struct Delta {
    up: Tensor,
    down: Tensor,
    factor: f64,
}

/// Checks that `layer`'s tensors fit a weight of shape `dims` (of the layer `module`), returning (out features,
/// rank, in features x kernel); an [`Error::Lora`] naming the layer otherwise.
fn check_fit(
    dims: &[usize],
    layer: &Layer,
    path: &str,
    module: &str,
) -> Result<(usize, usize, usize)> {
    let shape_error = |message: String| Error::Lora {
        path: path.to_string(),
        key: module.to_string(),
        message,
    };
    if (dims.len() != 2 && dims.len() != 4) || dims[0] == 0 {
        return Err(shape_error(format!(
            "the layer {module} has a weight of shape {dims:?}; LoRA adapts linear layers and convolutions"
        )));
    }
    let (dd, ud) = (layer.down.dims(), layer.up.dims());
    if dd.len() < 2 || ud.len() < 2 {
        return Err(shape_error(format!(
            "down {dd:?} / up {ud:?} are not LoRA matrices"
        )));
    }
    let rank = dd[0];
    if ud[1] != rank {
        return Err(shape_error(format!(
            "rank mismatch: down {dd:?} has rank {rank}, up {ud:?} has rank {}",
            ud[1]
        )));
    }
    // Trailing 1s dropped: a linear-shaped adapter fits a 1x1 convolution and the other way round.
    let trim = |d: &[usize]| {
        let mut v = d.to_vec();
        while v.len() > 1 && v.last() == Some(&1) {
            v.pop();
        }
        v
    };
    let cout = dims[0];
    if trim(&dd[1..]) != trim(&dims[1..]) || ud[0] != cout || ud[2..].iter().any(|&d| d != 1) {
        return Err(shape_error(format!(
            "down {dd:?} / up {ud:?} do not fit the layer's weight {dims:?} (down must be [rank, {}], up [{cout}, rank])",
            dims[1..]
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok((cout, rank, dims[1..].iter().product()))
}

/// The alpha of one adapted layer, as diffusers determines it.
#[derive(Debug, Clone)]
enum Alpha {
    /// An `.alpha` tensor (kohya, or diffusers' network alphas): `alpha / rank`.
    Value(f64),
    /// No alpha for this layer in the file: [`default_alphas`] replaces it before any fusion.
    Unset,
    /// From peft's config in `lora_adapter_metadata`: `alpha / r` (`alpha / sqrt(r)` with rsLoRA); `rank` the
    /// configured r, which the tensors must have.
    Config {
        alpha: f64,
        rank: Option<usize>,
        rslora: bool,
    },
}

impl Alpha {
    /// The `alpha / rank` factor for tensors of rank `rank`.
    fn factor(&self, rank: usize, path: &str, module: &str) -> Result<f64> {
        let r = rank as f64;
        Ok(match *self {
            Alpha::Value(a) => a / r,
            // Not reached: `default_alphas` sets every alpha; alpha = rank is the natural reading.
            Alpha::Unset => 1.0,
            Alpha::Config {
                alpha,
                rank: configured,
                rslora,
            } => {
                if let Some(c) = configured.filter(|&c| c != rank) {
                    return Err(Error::Lora {
                        path: path.to_string(),
                        key: module.to_string(),
                        message: format!(
                            "the tensors have rank {rank} but lora_adapter_metadata says r = {c}"
                        ),
                    });
                }
                if rslora {
                    alpha / r.sqrt()
                } else {
                    alpha / r
                }
            }
        })
    }
}

/// One adapted layer of one file.
struct Layer {
    component: Component,
    /// The module as the file names it: dotted (diffusers), or with `_` for `.` (kohya); without the component
    /// prefix and without `text_model.`.
    module: String,
    kohya: bool,
    /// The down (A) key, for messages.
    down_key: String,
    down: Tensor,
    up: Tensor,
    alpha: Alpha,
}

/// One LoRA file, read and grouped into layers.
struct Adapter {
    path: String,
    scale: f64,
    layers: Vec<Layer>,
}

/// What a key of a LoRA file is.
enum Part {
    Down,
    Up,
    Alpha,
}

/// The parts of one layer found in a file.
#[derive(Default)]
struct Parts {
    down: Option<String>,
    up: Option<String>,
    alpha: Option<String>,
}

impl Adapter {
    /// Reads `spec`'s file: every key classified into a layer's down/up/alpha, or an error naming it.
    fn read(spec: &LoraSpec) -> Result<Self> {
        let path = spec.resolve()?;
        let file = SafetensorsFile::open(&path)?;
        let name = spec.display();
        let err = |key: &str, message: String| Error::Lora {
            path: name.clone(),
            key: key.to_string(),
            message,
        };
        let mut groups: BTreeMap<(Component, String, bool), Parts> = BTreeMap::new();
        let mut keys = file.names();
        keys.sort();
        for key in &keys {
            if let Some(why) = other_family(key) {
                return Err(err(key, why.to_string()));
            }
            let (component, module, kohya, part) =
                classify(key).ok_or_else(|| err(key, unrecognised(key)))?;
            let parts = groups.entry((component, module, kohya)).or_default();
            let slot = match part {
                Part::Down => &mut parts.down,
                Part::Up => &mut parts.up,
                Part::Alpha => &mut parts.alpha,
            };
            if let Some(previous) = slot.replace(key.clone()) {
                return Err(err(
                    key,
                    format!("names the same tensor of the same layer as {previous}"),
                ));
            }
        }
        let config = PeftConfigs::read(&file, &name)?;
        let load = |key: &str| -> Result<Tensor> {
            file.load(key, DType::F64, &Device::Cpu)
                .map_err(|e| match e {
                    candle_core::Error::Io(source) => Error::io(&path, source),
                    e => Error::malformed(path.display(), format!("reading {key}: {e}")),
                })
        };
        let mut layers = Vec::with_capacity(groups.len());
        for ((component, module, kohya), parts) in groups {
            let (down_key, up_key) = match (parts.down, parts.up) {
                (Some(d), Some(u)) => (d, u),
                (Some(k), None) | (None, Some(k)) => {
                    return Err(err(&k, "has no matching up/down tensor".into()))
                }
                (None, None) => {
                    let k = parts.alpha.unwrap_or_default();
                    return Err(err(&k, "an alpha without down/up tensors".into()));
                }
            };
            let alpha = match &parts.alpha {
                Some(k) => {
                    let t = load(k)?.flatten_all()?;
                    if t.elem_count() != 1 {
                        return Err(err(
                            k,
                            format!("alpha of shape {:?} is not a scalar", t.dims()),
                        ));
                    }
                    let a = t.to_vec1::<f64>()?[0];
                    if !a.is_finite() {
                        return Err(err(k, format!("alpha {a} is not finite")));
                    }
                    Alpha::Value(a)
                }
                None if kohya => Alpha::Unset,
                None => config.alpha(component, &module),
            };
            layers.push(Layer {
                component,
                module,
                kohya,
                down: load(&down_key)?,
                up: load(&up_key)?,
                down_key,
                alpha,
            });
        }
        default_alphas(&mut layers);
        Ok(Self {
            path: name,
            scale: spec.scale,
            layers,
        })
    }
}

/// Gives every layer without an alpha of its own the one diffusers gives it (`get_peft_kwargs`), per network:
/// with `.alpha` tensors in the network, the most frequent of them (ties: the first in key order); without any,
/// the rank of the network's first layer in key order (so alpha = rank, factor 1, when all layers have one rank).
fn default_alphas(layers: &mut [Layer]) {
    for component in [Component::Unet, Component::TextEncoder] {
        let mut counts: Vec<(f64, usize)> = Vec::new();
        let mut first_rank = None;
        for layer in layers.iter().filter(|l| l.component == component) {
            if let Alpha::Value(a) = layer.alpha {
                match counts.iter_mut().find(|(v, _)| *v == a) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((a, 1)),
                }
            }
            first_rank = first_rank.or_else(|| layer.up.dims().get(1).copied());
        }
        // The first of the most frequent: `max_by_key` keeps the last maximum, so search in reverse.
        let default = counts
            .iter()
            .rev()
            .max_by_key(|(_, n)| *n)
            .map(|(a, _)| *a)
            .or(first_rank.map(|r| r as f64));
        for layer in layers.iter_mut().filter(|l| l.component == component) {
            if let (Alpha::Unset, Some(a)) = (&layer.alpha, default) {
                layer.alpha = Alpha::Value(a);
            }
        }
    }
}

/// Why `key` belongs to another model family (SDXL: two text encoders, `input_blocks` naming), if it does.
fn other_family(key: &str) -> Option<&'static str> {
    const SDXL: [&str; 7] = [
        "lora_te1_",
        "lora_te2_",
        "text_encoder_2.",
        "lora_unet_input_blocks_",
        "lora_unet_middle_block_",
        "lora_unet_output_blocks_",
        "lora_unet_label_emb",
    ];
    SDXL.iter().any(|p| key.starts_with(p)).then_some(
        "an SDXL-style key (lora_te1_/lora_te2_, text_encoder_2, or the LDM input_blocks/middle_block/output_blocks \
         naming); sketchx reads Stable Diffusion 1.x LoRAs in diffusers' module naming",
    )
}

fn unrecognised(key: &str) -> String {
    format!(
        "{key} is not a LoRA key sketchx reads (kohya lora_unet_/lora_te_ with .lora_down.weight/.lora_up.weight/.alpha, \
         diffusers unet./text_encoder. with .lora_A.weight/.lora_B.weight or .lora.down/up.weight); LyCORIS and DoRA \
         tensors are not supported"
    )
}

/// The component, module, format (kohya or not) and part of a LoRA key; `None` for a key of no known layout.
fn classify(key: &str) -> Option<(Component, String, bool, Part)> {
    for (prefix, component) in [
        ("lora_unet_", Component::Unet),
        ("lora_te_", Component::TextEncoder),
    ] {
        if let Some(rest) = key.strip_prefix(prefix) {
            let (module, suffix) = rest.split_once('.')?;
            let part = match suffix {
                "lora_down.weight" => Part::Down,
                "lora_up.weight" => Part::Up,
                "alpha" => Part::Alpha,
                _ => return None,
            };
            let module = match component {
                Component::TextEncoder => module.strip_prefix("text_model_").unwrap_or(module),
                Component::Unet => module,
            };
            return Some((component, module.to_string(), true, part));
        }
    }
    for (prefix, component) in [
        ("unet.", Component::Unet),
        ("text_encoder.", Component::TextEncoder),
    ] {
        let Some(rest) = key.strip_prefix(prefix) else {
            continue;
        };
        const SUFFIXES: [(&str, Part); 9] = [
            (".lora_A.weight", Part::Down),
            (".lora_B.weight", Part::Up),
            (".lora.down.weight", Part::Down),
            (".lora.up.weight", Part::Up),
            (".lora_linear_layer.down.weight", Part::Down),
            (".lora_linear_layer.up.weight", Part::Up),
            ("_lora.down.weight", Part::Down),
            ("_lora.up.weight", Part::Up),
            (".alpha", Part::Alpha),
        ];
        for (suffix, part) in SUFFIXES {
            let Some(module) = rest.strip_suffix(suffix) else {
                continue;
            };
            // The attention processors' old names: `attn1.processor.to_q_lora.down.weight` adapts `attn1.to_q`,
            // `to_out_lora` adapts `to_out.0`.
            let module = if suffix.starts_with('_') {
                let (attention, proj) = module.rsplit_once(".processor.")?;
                match proj {
                    "to_q" | "to_k" | "to_v" => format!("{attention}.{proj}"),
                    "to_out" => format!("{attention}.to_out.0"),
                    _ => return None,
                }
            } else {
                module.to_string()
            };
            let module = match component {
                Component::TextEncoder => module
                    .strip_prefix("text_model.")
                    .map(str::to_string)
                    .unwrap_or(module),
                Component::Unet => module,
            };
            return Some((component, module, false, part));
        }
        return None;
    }
    None
}

/// The peft configurations diffusers' `save_lora_weights` stores in the safetensors metadata
/// `lora_adapter_metadata` (a JSON object of `<component>.<LoraConfig field>`), per component.
struct PeftConfigs {
    configs: HashMap<Component, PeftConfig>,
}

struct PeftConfig {
    alpha: f64,
    r: Option<usize>,
    alpha_pattern: Vec<(Regex, f64)>,
    rank_pattern: Vec<(Regex, usize)>,
    rslora: bool,
}

impl PeftConfigs {
    fn read(file: &SafetensorsFile, name: &str) -> Result<Self> {
        match file.metadata().and_then(|m| m.get("lora_adapter_metadata")) {
            Some(text) => Self::parse(text, name),
            None => Ok(Self {
                configs: HashMap::new(),
            }),
        }
    }

    /// Parses the metadata's JSON `text`; errors name the file `name`.
    fn parse(text: &str, name: &str) -> Result<Self> {
        let mut configs = HashMap::new();
        let err = |key: String, message: String| Error::Lora {
            path: name.to_string(),
            key: format!("lora_adapter_metadata: {key}"),
            message,
        };
        let json: Value = serde_json::from_str(text)
            .map_err(|e| err(String::new(), format!("not valid JSON: {e}")))?;
        let Some(obj) = json.as_object() else {
            return Err(err(String::new(), "not a JSON object".into()));
        };
        for component in [Component::Unet, Component::TextEncoder] {
            let p = component.prefix();
            let field = |f: &str| obj.get(&format!("{p}.{f}")).filter(|v| !v.is_null());
            let Some(alpha) = field("lora_alpha") else {
                continue;
            };
            let number = |key: String, v: &Value| -> Result<f64> {
                v.as_f64()
                    .filter(|a| a.is_finite())
                    .ok_or_else(|| err(key, format!("{v} is not a finite number")))
            };
            let rank = |key: String, v: &Value| -> Result<usize> {
                v.as_u64()
                    .filter(|&r| r > 0)
                    .map(|r| r as usize)
                    .ok_or_else(|| err(key, format!("{v} is not a positive rank")))
            };
            if field("use_dora").and_then(Value::as_bool) == Some(true) {
                return Err(err(
                    format!("{p}.use_dora"),
                    "DoRA adapters are not supported".into(),
                ));
            }
            let pattern = |f: &str| -> Result<Vec<(String, Value)>> {
                Ok(match field(f) {
                    None => Vec::new(),
                    Some(Value::Object(m)) => {
                        m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
                    }
                    Some(v) => {
                        return Err(err(format!("{p}.{f}"), format!("{v} is not an object")))
                    }
                })
            };
            // peft's `get_pattern_key`: a pattern applies to a module whose name is it, or ends with `.` + it.
            let regex = |f: &str, k: &str| {
                Regex::new(&format!(r"^(?:.*\.)?(?:{k})$"))
                    .map_err(|e| err(format!("{p}.{f}.{k}"), format!("invalid pattern: {e}")))
            };
            let mut alpha_pattern = Vec::new();
            for (k, v) in pattern("alpha_pattern")? {
                alpha_pattern.push((
                    regex("alpha_pattern", &k)?,
                    number(format!("{p}.alpha_pattern.{k}"), &v)?,
                ));
            }
            let mut rank_pattern = Vec::new();
            for (k, v) in pattern("rank_pattern")? {
                rank_pattern.push((
                    regex("rank_pattern", &k)?,
                    rank(format!("{p}.rank_pattern.{k}"), &v)?,
                ));
            }
            configs.insert(
                component,
                PeftConfig {
                    alpha: number(format!("{p}.lora_alpha"), alpha)?,
                    r: field("r").map(|v| rank(format!("{p}.r"), v)).transpose()?,
                    alpha_pattern,
                    rank_pattern,
                    rslora: field("use_rslora").and_then(Value::as_bool) == Some(true),
                },
            );
        }
        Ok(Self { configs })
    }

    /// The alpha of `module` of `component`: its config's (pattern first), or [`Alpha::Unset`] without one.
    fn alpha(&self, component: Component, module: &str) -> Alpha {
        let Some(c) = self.configs.get(&component) else {
            return Alpha::Unset;
        };
        // peft names the text encoder's modules with `text_model.`, which `module` no longer has.
        let full = match component {
            Component::TextEncoder => format!("text_model.{module}"),
            Component::Unet => module.to_string(),
        };
        let matches = |re: &Regex| re.is_match(module) || re.is_match(&full);
        let find = |patterns: &[(Regex, f64)]| {
            patterns.iter().find(|(re, _)| matches(re)).map(|(_, v)| *v)
        };
        let rank = c
            .rank_pattern
            .iter()
            .find(|(re, _)| matches(re))
            .map(|(_, v)| *v)
            .or(c.r);
        Alpha::Config {
            alpha: find(&c.alpha_pattern).unwrap_or(c.alpha),
            rank,
            rslora: c.rslora,
        }
    }
}

/// A network's weights, for its parameter names and the base weights of adapted layers.
enum BaseFile {
    Safetensors(SafetensorsFile),
    Pickle(StateDict),
    Mapped(Arc<MappedWeights>),
}

impl BaseFile {
    fn open(source: &WeightsSource) -> Result<Self> {
        match source {
            WeightsSource::Mapped(m) => Ok(BaseFile::Mapped(m.clone())),
            WeightsSource::File(path) if path.extension().is_some_and(|e| e == "bin") => {
                Ok(BaseFile::Pickle(TorchFile::open(path)?.state_dict()?))
            }
            WeightsSource::File(path) => Ok(BaseFile::Safetensors(SafetensorsFile::open(path)?)),
        }
    }

    fn path(&self) -> &Path {
        match self {
            BaseFile::Safetensors(f) => f.path(),
            BaseFile::Pickle(f) => f.path(),
            BaseFile::Mapped(m) => m.path(),
        }
    }

    fn names(&self) -> Vec<String> {
        match self {
            BaseFile::Safetensors(f) => f.names(),
            BaseFile::Pickle(f) => f.names().to_vec(),
            BaseFile::Mapped(m) => m.names(),
        }
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        match self {
            BaseFile::Safetensors(f) => f.shape(name).map(<[usize]>::to_vec),
            BaseFile::Pickle(f) => f.shape(name).map(<[usize]>::to_vec),
            BaseFile::Mapped(m) => m.shape(name),
        }
    }

    fn load_f64(&self, name: &str) -> Result<Tensor> {
        let path = self.path();
        let wrap = |e: candle_core::Error| match e {
            candle_core::Error::Io(source) => Error::io(path, source),
            e => Error::malformed(path.display(), format!("reading {name}: {e}")),
        };
        let cpu = &Device::Cpu;
        match self {
            BaseFile::Safetensors(f) => f.load(name, DType::F64, cpu),
            BaseFile::Pickle(f) => f.load(name, DType::F64, cpu),
            BaseFile::Mapped(m) => m.load(name, DType::F64, cpu),
        }
        .map_err(wrap)
    }
}

/// The weights of one network by module: diffusers' dotted module name (the text encoder's without
/// `text_model.`) and its kohya form (`.` -> `_`) -> the parameter name in the file.
struct ModuleIndex {
    component: Component,
    dotted: HashMap<String, String>,
    /// `None` where two modules have the same kohya name (then neither can be addressed that way).
    kohya: HashMap<String, Option<String>>,
}

impl ModuleIndex {
    fn new(component: Component, names: &[String]) -> Self {
        let mut dotted = HashMap::new();
        let mut kohya: HashMap<String, Option<String>> = HashMap::new();
        for name in names {
            let Some(module) = name.strip_suffix(".weight") else {
                continue;
            };
            let module = match component {
                Component::TextEncoder => module.strip_prefix("text_model.").unwrap_or(module),
                Component::Unet => module,
            };
            kohya
                .entry(module.replace('.', "_"))
                .and_modify(|e| *e = None)
                .or_insert_with(|| Some(module.to_string()));
            dotted.insert(module.to_string(), name.clone());
        }
        Self {
            component,
            dotted,
            kohya,
        }
    }

    /// The parameter `layer` of `adapter` adapts, or an error naming its key.
    fn resolve(&self, adapter: &Adapter, layer: &Layer) -> Result<String> {
        let err = |message: String| Error::Lora {
            path: adapter.path.clone(),
            key: layer.down_key.clone(),
            message,
        };
        let module = if layer.kohya {
            match self.kohya.get(&layer.module) {
                Some(Some(m)) => m.clone(),
                Some(None) => {
                    return Err(err(format!(
                        "{} has several layers named {} with `.` for `_`",
                        self.component.name(),
                        layer.module
                    )))
                }
                None => layer.module.clone(),
            }
        } else {
            layer.module.clone()
        };
        if self.component == Component::TextEncoder && module.starts_with("embeddings.") {
            return Err(err(format!(
                "adapts the embedding {module}; LoRA on embeddings is not supported"
            )));
        }
        self.dotted
            .get(&module)
            .cloned()
            .ok_or_else(|| err(format!("matches no layer of {}", self.component.name())))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn lora_args_parse_once() {
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/lora");
        let kohya = format!("{fixtures}/kohya.safetensors");
        assert_eq!(
            LoraSpec::split_arg("a.safetensors:0.6"),
            ("a.safetensors", 0.6)
        );
        assert_eq!(LoraSpec::split_arg("a.safetensors"), ("a.safetensors", 1.0));
        assert_eq!(
            LoraSpec::split_arg("we:ird.safetensors"),
            ("we:ird.safetensors", 1.0)
        );
        assert_eq!(LoraSpec::split_arg("x:y:-2"), ("x:y", -2.0));
        assert_eq!(
            LoraSpec::parse(&format!("{kohya}:0.5")).unwrap(),
            LoraSpec::file(&kohya, 0.5)
        );
        assert_eq!(
            LoraSpec::parse(&kohya).unwrap(),
            LoraSpec::file(&kohya, 1.0)
        );
        assert_eq!(
            LoraSpec::parse(
                "latent-consistency/lcm-lora-sdv1-5/pytorch_lora_weights.safetensors:0.8"
            )
            .unwrap(),
            LoraSpec::hub(
                "latent-consistency/lcm-lora-sdv1-5",
                "pytorch_lora_weights.safetensors",
                0.8
            )
        );
        let rev = LoraSource::parse("o/n@v2/sub/f.safetensors").unwrap();
        assert_eq!(
            rev,
            LoraSource::Hub {
                repo: "o/n".into(),
                revision: Some("v2".into()),
                file: "sub/f.safetensors".into()
            }
        );
        match LoraSpec::parse(&format!("{kohya}:11")).unwrap_err() {
            Error::InvalidRequest { field, .. } => assert_eq!(field, "loras.scale"),
            e => panic!("{e:?}"),
        }
        for missing in [
            "./nope.safetensors",
            "/no/such.safetensors",
            "nope.safetensors",
            "o/n",
        ] {
            let e = LoraSpec::parse(missing).unwrap_err();
            assert!(matches!(e, Error::MissingFile { .. }), "{missing}: {e:?}");
            assert!(e.to_string().contains(missing), "{e}");
        }
    }

    use super::*;

    fn module_of(key: &str) -> Option<(Component, String, bool)> {
        classify(key).map(|(c, m, k, _)| (c, m, k))
    }

    #[test]
    fn keys_of_every_layout_name_their_module() {
        let unet = |m: &str, kohya| Some((Component::Unet, m.to_string(), kohya));
        let te = |m: &str, kohya| Some((Component::TextEncoder, m.to_string(), kohya));
        assert_eq!(
            module_of("lora_unet_mid_block_resnets_0_conv1.lora_down.weight"),
            unet("mid_block_resnets_0_conv1", true)
        );
        assert_eq!(
            module_of("lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"),
            te("encoder_layers_0_mlp_fc1", true)
        );
        assert_eq!(
            module_of("unet.up_blocks.1.attentions.0.proj_in.lora_B.weight"),
            unet("up_blocks.1.attentions.0.proj_in", false)
        );
        assert_eq!(
            module_of("text_encoder.text_model.encoder.layers.1.self_attn.q_proj.lora_linear_layer.up.weight"),
            te("encoder.layers.1.self_attn.q_proj", false)
        );
        assert_eq!(
            module_of("text_encoder.encoder.layers.1.mlp.fc2.lora_A.weight"),
            te("encoder.layers.1.mlp.fc2", false)
        );
        assert_eq!(
            module_of("unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight"),
            unet("mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0", false)
        );
        assert_eq!(
            module_of("unet.down_blocks.0.resnets.0.conv1.lora.down.weight"),
            unet("down_blocks.0.resnets.0.conv1", false)
        );
        for unknown in [
            "lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a",
            "unet.down_blocks.0.resnets.0.conv1.lora_magnitude_vector",
            "base_model.model.down_blocks.0.resnets.0.conv1.lora_A.weight",
            "unet.a.processor.to_z_lora.down.weight",
        ] {
            assert_eq!(module_of(unknown), None, "{unknown}");
        }
        assert!(other_family("lora_unet_input_blocks_4_1_proj_in.alpha").is_some());
        assert!(other_family("lora_unet_down_blocks_0_resnets_0_conv1.alpha").is_none());
    }

    /// peft's `alpha_pattern` / `rank_pattern` (a module named by the pattern or ending in `.` + it), rsLoRA, and
    /// the text encoder's patterns written with `text_model.`.
    #[test]
    fn metadata_patterns_pick_alpha_and_rank() {
        let json = r#"{"unet.lora_alpha": 8, "unet.r": 4, "unet.use_rslora": true,
            "unet.alpha_pattern": {"attn1.to_q": 2.5}, "unet.rank_pattern": {"down_blocks.0.resnets.0.conv1": 2},
            "text_encoder.lora_alpha": 1.5, "text_encoder.r": 2,
            "text_encoder.alpha_pattern": {"text_model.encoder.layers.0.mlp.fc1": 6}}"#;
        let c = PeftConfigs::parse(json, "f").unwrap();
        let get = |component, module| match c.alpha(component, module) {
            Alpha::Config {
                alpha,
                rank,
                rslora,
            } => (alpha, rank, rslora),
            other => panic!("{other:?}"),
        };
        let (u, t) = (Component::Unet, Component::TextEncoder);
        assert_eq!(
            get(u, "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"),
            (2.5, Some(4), true)
        );
        assert_eq!(
            get(u, "mid_block.attentions.0.transformer_blocks.0.attn1.to_qq"),
            (8.0, Some(4), true)
        );
        assert_eq!(
            get(u, "down_blocks.0.resnets.0.conv1"),
            (8.0, Some(2), true)
        );
        assert_eq!(get(t, "encoder.layers.0.mlp.fc1"), (6.0, Some(2), false));
        assert_eq!(get(t, "encoder.layers.1.mlp.fc1"), (1.5, Some(2), false));
        assert!(matches!(
            PeftConfigs::parse("{\"unet.lora_alpha\": 1, \"unet.use_dora\": true}", "f"),
            Err(Error::Lora { .. })
        ));
        assert!(matches!(
            PeftConfigs::parse("{", "f"),
            Err(Error::Lora { .. })
        ));
    }

    fn layer(component: Component, rank: usize, alpha: Alpha) -> Layer {
        let cpu = &Device::Cpu;
        Layer {
            component,
            module: String::new(),
            kohya: false,
            down_key: String::new(),
            down: Tensor::zeros((rank, 4), DType::F64, cpu).unwrap(),
            up: Tensor::zeros((4, rank), DType::F64, cpu).unwrap(),
            alpha,
        }
    }

    fn alphas(layers: &[Layer]) -> Vec<f64> {
        layers
            .iter()
            .map(|l| match l.alpha {
                Alpha::Value(a) => a,
                _ => panic!("alpha not set"),
            })
            .collect()
    }

    /// diffusers' `get_peft_kwargs`: without alphas, the first layer's rank for all (per network); with some, the
    /// most frequent for the others.
    #[test]
    fn layers_without_alpha_get_diffusers_default() {
        let (u, t) = (Component::Unet, Component::TextEncoder);
        let mut layers = vec![
            layer(u, 4, Alpha::Unset),
            layer(u, 2, Alpha::Unset),
            layer(t, 8, Alpha::Unset),
        ];
        default_alphas(&mut layers);
        assert_eq!(alphas(&layers), [4.0, 4.0, 8.0]);
        let mut layers = vec![
            layer(u, 4, Alpha::Value(1.0)),
            layer(u, 4, Alpha::Value(3.0)),
            layer(u, 4, Alpha::Value(3.0)),
            layer(u, 2, Alpha::Unset),
            layer(t, 2, Alpha::Value(5.0)),
            layer(t, 2, Alpha::Value(6.0)),
            layer(t, 2, Alpha::Unset),
        ];
        default_alphas(&mut layers);
        assert_eq!(alphas(&layers), [1.0, 3.0, 3.0, 3.0, 5.0, 6.0, 5.0]);
    }
}
