//! Reading PyTorch checkpoints (`torch.save` files: `.ckpt`, `.pt`, `.pth`, `.bin`) without running any code.
//!
//! A torch checkpoint is a Python pickle: a little program for a stack machine whose instructions may import any
//! Python callable (`GLOBAL`) and call it (`REDUCE`), so loading one with Python's `pickle` runs whatever the file
//! says (`os.system`, ...). This module interprets the pickle itself and gives meaning to a handful of callables
//! only, those a state dict is made of:
//!
//! - `torch._utils._rebuild_tensor_v2` / `_rebuild_tensor` (a tensor: storage, offset, size, stride),
//!   `_rebuild_parameter` / `_rebuild_parameter_with_state` (a parameter: its tensor);
//! - `collections.OrderedDict` (a dict), `builtins.set` / `frozenset` (a list);
//! - the storage types `torch.FloatStorage`, `HalfStorage`, `BFloat16Storage`, `DoubleStorage`, `LongStorage`,
//!   `IntStorage`, `ShortStorage`, `CharStorage`, `ByteStorage`, `BoolStorage` in the persistent ids
//!   `('storage', type, key, location, numel)` that name each tensor's data.
//!
//! Every other callable is never called: it becomes an inert placeholder that remembers its name, and so does
//! whatever is "built" from it. Reading a tensor or a dict entry that turns out to be such a placeholder is
//! [`Error::Checkpoint`] naming the file, the key and the callable (e.g. `os.system`); entries outside what is read
//! (a training checkpoint's `callbacks` or `optimizer_states`, which may hold pytorch_lightning or numpy objects)
//! are never looked at. The interpreter is a loop over the opcodes without recursion; every length it reads is
//! checked against the bytes that remain, the memo is a map (an index of 2^32 allocates nothing), containers are
//! shared rather than copied (`DUP`/`GET` cost nothing), so memory stays proportional to the pickle's size.
//!
//! Containers read:
//! - the zip archive `torch.save` writes since torch 1.6 (`<root>/data.pkl`, `<root>/data/<key>` raw storages,
//!   `<root>/byteorder`; the root folder is `archive/` or the file's stem, any name is accepted), read with the
//!   small zip reader below: stored entries are read in place, deflated ones are inflated (bounded by deflate's
//!   largest ratio);
//! - the legacy format of older torch (`_use_new_zipfile_serialization=False`: a magic-number pickle, the protocol
//!   and system-info pickles, the data pickle, the list of storage keys, then each storage's element count and
//!   raw bytes);
//! - a bare pickle (no tensor data: only useful for plain values, and refused as soon as a tensor is read).
//!
//! Every tensor's offset, size and stride is checked against its storage, and every storage against the bytes the
//! file holds for it, before anything is read; nothing larger than the file (or its deflated entry's bound) is ever
//! allocated. Tensors are read on demand: a [`StateDict`] is a [`SimpleBackend`] for candle's `VarBuilder`, reading
//! each contiguous tensor straight into its buffer (converted to the requested dtype) like the safetensors reader
//! ([`crate::models::weights`]).
//!
//! ```no_run
//! # fn main() -> sketchx_core::Result<()> {
//! use sketchx_core::models::pickle::TorchFile;
//! let file = TorchFile::open(std::path::Path::new("model.ckpt"))?;
//! let state = file.state_dict()?; // the root, unwrapped through "state_dict" as diffusers does
//! for name in state.names() {
//!     let t = state.tensor(name)?; // its stored dtype, on the CPU
//!     println!("{name}: {:?}", t.dims());
//! }
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use safetensors::Dtype;

use crate::error::{Error, Result};
use crate::models::weights::{in_tensor, read_exact_into, read_tensor};

/// The element type of a torch storage (the `torch.<T>Storage` of its persistent id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StorageDtype {
    /// `DoubleStorage`.
    F64,
    /// `FloatStorage`.
    F32,
    /// `HalfStorage`.
    F16,
    /// `BFloat16Storage`.
    BF16,
    /// `LongStorage`.
    I64,
    /// `IntStorage`.
    I32,
    /// `ShortStorage`.
    I16,
    /// `CharStorage` (read as i16: candle has no i8).
    I8,
    /// `ByteStorage`.
    U8,
    /// `BoolStorage` (read as u8 0/1).
    Bool,
}

impl StorageDtype {
    fn from_storage_type(name: &str) -> Option<Self> {
        Some(match name {
            "DoubleStorage" => Self::F64,
            "FloatStorage" => Self::F32,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }

    /// The candle dtype a tensor of this storage is read as when no other is asked for.
    pub fn dtype(self) -> DType {
        match self {
            Self::F64 => DType::F64,
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::BF16 => DType::BF16,
            Self::I64 => DType::I64,
            Self::I32 => DType::I32,
            Self::I16 | Self::I8 => DType::I16,
            Self::U8 | Self::Bool => DType::U8,
        }
    }

    /// The same type in safetensors' terms, for the shared readers; `None` for the types read by hand.
    fn safetensors(self) -> Option<Dtype> {
        Some(match self {
            Self::F64 => Dtype::F64,
            Self::F32 => Dtype::F32,
            Self::F16 => Dtype::F16,
            Self::BF16 => Dtype::BF16,
            Self::I64 => Dtype::I64,
            Self::I32 => Dtype::I32,
            Self::I16 => Dtype::I16,
            Self::U8 => Dtype::U8,
            Self::I8 | Self::Bool => return None,
        })
    }
}

/// Where a tensor's values are: a view (offset, size, stride, in elements) of one storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The storage's element type.
    pub dtype: StorageDtype,
    /// The tensor's shape (`size` in torch).
    pub shape: Vec<usize>,
    /// Elements to step over per index of each dimension.
    pub stride: Vec<usize>,
    /// The first element's index in the storage.
    pub offset: usize,
    /// Index of the storage in the file's storage table.
    storage: usize,
}

impl TensorInfo {
    /// Whether the view is the plain row-major layout of its shape (dimensions of size 1 may have any stride).
    fn is_contiguous(&self) -> bool {
        let mut expected = 1usize;
        for (&d, &s) in self.shape.iter().zip(&self.stride).rev() {
            if d != 1 && s != expected {
                return false;
            }
            expected = expected.saturating_mul(d);
        }
        true
    }

    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A value of the pickle, as the interpreter holds it: scalars inline, containers by their index in the arena
/// (so that copies are cheap and shared containers stay shared, as in Python).
#[derive(Debug, Clone)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too wide for i64 (little-endian two's complement bytes).
    BigInt(Arc<[u8]>),
    Float(f64),
    Str(Arc<str>),
    Bytes(Arc<[u8]>),
    Node(usize),
}

/// A container or object of the pickle.
#[derive(Debug)]
enum Node {
    List(Vec<Value>),
    Tuple(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// A callable named by `GLOBAL` / `STACK_GLOBAL`: `module`, `name`.
    Global(Arc<str>, Arc<str>),
    /// A storage (index into the storage table).
    Storage(usize),
    Tensor(TensorInfo),
    /// Something built by a callable sketchx does not call: its qualified name, and the state `BUILD` gave it.
    Object(String, Option<Value>),
}

/// A storage named by a persistent id.
#[derive(Debug, Clone)]
struct StorageDecl {
    key: String,
    dtype: StorageDtype,
    numel: usize,
}

/// Where a storage's bytes are in the file.
#[derive(Debug, Clone, Copy)]
enum Data {
    /// `len` bytes at `offset`, stored as they are.
    Raw { offset: u64, len: u64 },
    /// A deflated zip entry: `clen` compressed bytes at `offset` inflating to `len`.
    Deflated { offset: u64, clen: u64, len: u64 },
    /// The file holds no data for it (a bare pickle, or a zip without the entry).
    Missing,
}

/// The open file and the storages it holds, shared by every [`StateDict`] taken from it.
#[derive(Debug)]
struct Source {
    path: PathBuf,
    file: File,
    big_endian: bool,
    storages: Vec<(StorageDecl, Data)>,
}

/// An opened torch checkpoint: its pickle interpreted (nothing executed), its tensors not yet read.
#[derive(Debug)]
pub struct TorchFile {
    source: Arc<Source>,
    nodes: Vec<Node>,
    root: Value,
}

/// A shallow view of one value of a checkpoint, for callers that read more than tensors (e.g. the `name` of a
/// textual inversion embedding).
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    /// `None`.
    None,
    /// A boolean.
    Bool(bool),
    /// An integer (one wider than 64 bits is [`Entry::Other`]).
    Int(i64),
    /// A float.
    Float(f64),
    /// A string.
    Str(String),
    /// Bytes.
    Bytes(Vec<u8>),
    /// A tensor (read it with [`TorchFile::tensors_at`] on its dict).
    Tensor(TensorInfo),
    /// A dict (or an object whose state is a dict), with its string keys in order.
    Dict(Vec<String>),
    /// A list, tuple or set of this many items.
    List(usize),
    /// Anything else: an object built by a callable that is never called (its qualified name), or a value of a
    /// kind sketchx does not read.
    Other(String),
}

/// The tensors of one dict of a checkpoint, by name, read on demand. Cheap to clone; a [`SimpleBackend`] for
/// [`candle_nn::VarBuilder::from_backend`].
#[derive(Debug, Clone)]
pub struct StateDict {
    source: Arc<Source>,
    names: Arc<Vec<String>>,
    tensors: Arc<HashMap<String, TensorInfo>>,
}

/// The magic number of the legacy (non-zip) torch format, as the little-endian bytes of its pickled integer.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
/// The protocol number the legacy format writes after the magic number.
const LEGACY_PROTOCOL: i64 = 1001;
/// The largest number of dimensions accepted for a tensor (torch's own limit is 64).
const MAX_DIMS: usize = 64;
/// The longest text line read by the protocol-0 opcodes (`GLOBAL`'s module and name, `INT`, ...).
const MAX_LINE: usize = 1 << 16;
/// deflate's largest compression ratio (a stream of 258-byte matches: 1032:1, plus slack for block headers).
const MAX_INFLATE_RATIO: u64 = 1100;
/// The most nested keys followed by [`TorchFile::tensors_at`] when unwrapping `state_dict`.
const MAX_UNWRAP: usize = 64;

impl TorchFile {
    /// Opens a torch checkpoint and interprets its pickle. A missing file is [`Error::MissingFile`]; a file that is
    /// not a torch checkpoint, a damaged zip or pickle, an opcode outside pickle's protocols 0-5, a tensor view
    /// outside its storage: [`Error::MalformedFile`] naming the file; a storage type sketchx cannot read (e.g.
    /// quantized): [`Error::UnsupportedModel`].
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::reading(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut head = [0u8; 4];
        let n = len.min(4) as usize;
        read_exact_into(&file, &mut head[..n], 0).map_err(|e| Error::io(path, e))?;
        if &head == b"PK\x03\x04" || &head == b"PK\x05\x06" {
            Self::open_zip(path, file, len)
        } else if len >= 2 && head[0] == 0x80 {
            Self::open_pickle_stream(path, file, len)
        } else {
            Err(Error::malformed(
                path.display(),
                "not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)",
            ))
        }
    }

    fn open_zip(path: &Path, file: File, len: u64) -> Result<Self> {
        let malformed = |m: String| Error::malformed(path.display(), m);
        let entries = zip::read_index(&file, len).map_err(&malformed)?;
        let pickles: Vec<&String> = entries
            .keys()
            .filter(|n| {
                n.rsplit_once('/').is_some_and(|(root, f)| {
                    f == "data.pkl" && !root.is_empty() && !root.contains('/')
                })
            })
            .collect();
        let pkl_name = match pickles.as_slice() {
            [one] => (*one).clone(),
            [] => {
                return Err(malformed(
                    "a zip archive without <root>/data.pkl: not a torch.save checkpoint".into(),
                ))
            }
            many => {
                let mut names: Vec<&str> = many.iter().map(|s| s.as_str()).collect();
                names.sort_unstable();
                return Err(malformed(format!(
                    "several torch pickles in one archive: {}",
                    names.join(", ")
                )));
            }
        };
        let root = pkl_name.trim_end_matches("data.pkl").to_string();
        let read_entry = |name: &str| -> Result<Vec<u8>> {
            let e = &entries[name];
            let data = e.data(&file, len).map_err(&malformed)?;
            read_data(
                &file,
                data,
                0,
                usize::try_from(data.len()).unwrap_or(usize::MAX),
            )
            .map_err(|m| malformed(format!("{name}: {m}")))
        };
        let big_endian = match entries.get(&format!("{root}byteorder")) {
            None => false,
            Some(_) => {
                let order = read_entry(&format!("{root}byteorder"))?;
                match order.as_slice() {
                    b"little" => false,
                    b"big" => true,
                    other => {
                        return Err(malformed(format!(
                            "{root}byteorder is {:?}, not little or big",
                            String::from_utf8_lossy(other)
                        )))
                    }
                }
            }
        };
        let pkl = read_entry(&pkl_name)?;
        let mut nodes = Vec::new();
        let mut table = StorageTable::default();
        let root_value = {
            let mut input = SliceInput { data: &pkl, pos: 0 };
            Machine::new(path, &pkl_name, &mut input, &mut nodes, Some(&mut table)).run()?
        };
        let mut storages = Vec::with_capacity(table.decls.len());
        for decl in table.decls {
            let data = match entries.get(&format!("{root}data/{}", decl.key)) {
                Some(e) => e.data(&file, len).map_err(&malformed)?,
                None => Data::Missing,
            };
            storages.push((decl, data));
        }
        Ok(Self {
            source: Arc::new(Source {
                path: path.to_path_buf(),
                file,
                big_endian,
                storages,
            }),
            nodes,
            root: root_value,
        })
    }

    /// A pickle at the start of the file: the legacy torch format when it is the magic number, else a bare pickle.
    fn open_pickle_stream(path: &Path, file: File, len: u64) -> Result<Self> {
        let malformed = |m: String| Error::malformed(path.display(), m);
        let reader = file.try_clone().map_err(|e| Error::io(path, e))?;
        let mut input = FileInput {
            reader: BufReader::new(reader),
            pos: 0,
            len,
        };
        let mut nodes = Vec::new();
        let first = Machine::new(path, "pickle", &mut input, &mut nodes, None).run()?;
        let legacy = matches!(&first, Value::BigInt(b) if b[..] == LEGACY_MAGIC);
        if !legacy {
            // A bare pickle: whatever it holds, with no tensor data.
            return Ok(Self {
                source: Arc::new(Source {
                    path: path.to_path_buf(),
                    file,
                    big_endian: false,
                    storages: Vec::new(),
                }),
                nodes,
                root: first,
            });
        }
        let protocol = Machine::new(path, "protocol pickle", &mut input, &mut nodes, None).run()?;
        if !matches!(protocol, Value::Int(LEGACY_PROTOCOL)) {
            return Err(malformed(format!(
                "legacy torch format with protocol {protocol:?} (expected {LEGACY_PROTOCOL})"
            )));
        }
        let sys_info = Machine::new(path, "sys_info pickle", &mut input, &mut nodes, None).run()?;
        let big_endian = match dict_get(&nodes, &sys_info, "little_endian") {
            Some(Value::Bool(little)) => !little,
            _ => false,
        };
        let mut table = StorageTable::default();
        let root = Machine::new(
            path,
            "data pickle",
            &mut input,
            &mut nodes,
            Some(&mut table),
        )
        .run()?;
        let keys = Machine::new(path, "storage keys pickle", &mut input, &mut nodes, None).run()?;
        let Value::Node(k) = keys else {
            return Err(malformed(
                "the legacy storage key list is not a list".into(),
            ));
        };
        let key_list: Vec<String> = match &nodes[k] {
            Node::List(items) | Node::Tuple(items) => items
                .iter()
                .map(|v| match v {
                    Value::Str(s) => Ok(s.to_string()),
                    Value::Int(i) => Ok(i.to_string()),
                    _ => Err(malformed("a legacy storage key is not a string".into())),
                })
                .collect::<Result<_>>()?,
            _ => {
                return Err(malformed(
                    "the legacy storage key list is not a list".into(),
                ))
            }
        };
        // Each storage: its element count (int64), then its bytes, in the order of the key list.
        let mut pos = input.pos;
        let mut data = vec![Data::Missing; table.decls.len()];
        for key in key_list {
            let Some(&i) = table.by_key.get(&key) else {
                return Err(malformed(format!(
                    "legacy storage key {key:?} is not used by the pickle"
                )));
            };
            let decl = &table.decls[i];
            if pos.checked_add(8).is_none_or(|end| end > len) {
                return Err(malformed(format!(
                    "the file ends before storage {key:?} (byte {pos})"
                )));
            }
            let mut n = [0u8; 8];
            read_exact_into(&file, &mut n, pos).map_err(|e| Error::io(path, e))?;
            let numel = if big_endian {
                u64::from_be_bytes(n)
            } else {
                u64::from_le_bytes(n)
            };
            if numel != decl.numel as u64 {
                return Err(malformed(format!(
                    "legacy storage {key:?} holds {numel} elements but the pickle says {}",
                    decl.numel
                )));
            }
            let bytes = (decl.numel as u64)
                .checked_mul(decl.dtype.size() as u64)
                .ok_or_else(|| malformed(format!("storage {key:?} is too large")))?;
            let start = pos + 8;
            if start.checked_add(bytes).is_none_or(|end| end > len) {
                return Err(malformed(format!(
                    "storage {key:?} ({bytes} bytes at byte {start}) runs past the end of the file ({len} bytes)"
                )));
            }
            data[i] = Data::Raw {
                offset: start,
                len: bytes,
            };
            pos = start + bytes;
        }
        let storages = table.decls.into_iter().zip(data).collect();
        Ok(Self {
            source: Arc::new(Source {
                path: path.to_path_buf(),
                file,
                big_endian,
                storages,
            }),
            nodes,
            root,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.source.path
    }

    /// The value at `keys` below the root: each key is a dict key (or an attribute in an object's state, such as
    /// the `_parameters` of a pickled `torch.nn.ParameterDict`). [`Error::Checkpoint`] naming the key when it is
    /// absent or reached through something that is not a dict.
    pub fn get(&self, keys: &[&str]) -> Result<Entry> {
        let v = self.walk(keys)?;
        Ok(self.entry(&v))
    }

    /// The string keys of the dict at `keys` (see [`TorchFile::get`]), in order.
    pub fn keys_at(&self, keys: &[&str]) -> Result<Vec<String>> {
        match self.get(keys)? {
            Entry::Dict(k) => Ok(k),
            other => Err(self.not_a_dict(keys, &other)),
        }
    }

    /// The tensors of the dict at `keys` (`&[]`: the root; `&["state_dict"]`, `&["string_to_param"]`, ...).
    /// Entries holding plain values (numbers, strings, `None`) or nested containers are skipped; an entry built by
    /// a callable that sketchx never calls is [`Error::Checkpoint`] naming the key and the callable. Every
    /// tensor's storage is checked against the bytes the file holds for it.
    pub fn tensors_at(&self, keys: &[&str]) -> Result<StateDict> {
        let v = self.walk(keys)?;
        let Some(items) = self.dict_items(&v) else {
            return Err(self.not_a_dict(keys, &self.entry(&v)));
        };
        let mut names = Vec::new();
        let mut tensors = HashMap::new();
        for (k, value) in items {
            let name = match k {
                Value::Str(s) => s.to_string(),
                Value::Int(i) => i.to_string(),
                _ => continue,
            };
            let Value::Node(i) = value else { continue };
            match &self.nodes[*i] {
                Node::Tensor(t) => {
                    self.check_storage(&name, t)?;
                    if tensors.insert(name.clone(), t.clone()).is_none() {
                        names.push(name);
                    }
                }
                Node::Object(class, _) => {
                    return Err(self.callable_error(&join(keys, &name), class));
                }
                Node::Global(m, n) => {
                    return Err(self.callable_error(&join(keys, &name), &format!("{m}.{n}")));
                }
                _ => {}
            }
        }
        Ok(StateDict {
            source: self.source.clone(),
            names: Arc::new(names),
            tensors: Arc::new(tensors),
        })
    }

    /// The model's tensors as diffusers' single-file loading finds them: the root dict, unwrapped through its
    /// `state_dict` entry for as long as there is one (training checkpoints wrap it once, some files twice).
    pub fn state_dict(&self) -> Result<StateDict> {
        let mut keys: Vec<&str> = Vec::new();
        while keys.len() < MAX_UNWRAP
            && matches!(self.get(&keys)?, Entry::Dict(ref k) if k.iter().any(|k| k == "state_dict"))
        {
            keys.push("state_dict");
        }
        self.tensors_at(&keys)
    }

    fn walk(&self, keys: &[&str]) -> Result<Value> {
        let mut v = self.root.clone();
        for (depth, key) in keys.iter().enumerate() {
            let Some(items) = self.dict_items(&v) else {
                let e = self.entry(&v);
                return Err(self.not_a_dict(&keys[..depth], &e));
            };
            v = items
                .iter()
                .rev()
                .find(|(k, _)| matches!(k, Value::Str(s) if &**s == *key))
                .map(|(_, v)| v.clone())
                .ok_or_else(|| Error::Checkpoint {
                    path: self.path().display().to_string(),
                    key: keys[..=depth].join("/"),
                    message: "no such entry".into(),
                })?;
        }
        Ok(v)
    }

    /// The items of a dict, or of an object's dict state.
    fn dict_items(&self, v: &Value) -> Option<&[(Value, Value)]> {
        let Value::Node(i) = v else { return None };
        match &self.nodes[*i] {
            Node::Dict(items) => Some(items),
            Node::Object(_, Some(Value::Node(j))) => match &self.nodes[*j] {
                Node::Dict(items) => Some(items),
                _ => None,
            },
            _ => None,
        }
    }

    fn entry(&self, v: &Value) -> Entry {
        match v {
            Value::None => Entry::None,
            Value::Bool(b) => Entry::Bool(*b),
            Value::Int(i) => Entry::Int(*i),
            Value::BigInt(_) => Entry::Other("an integer wider than 64 bits".into()),
            Value::Float(f) => Entry::Float(*f),
            Value::Str(s) => Entry::Str(s.to_string()),
            Value::Bytes(b) => Entry::Bytes(b.to_vec()),
            Value::Node(i) => {
                if let Some(items) = self.dict_items(v) {
                    return Entry::Dict(
                        items
                            .iter()
                            .filter_map(|(k, _)| match k {
                                Value::Str(s) => Some(s.to_string()),
                                Value::Int(i) => Some(i.to_string()),
                                _ => None,
                            })
                            .collect(),
                    );
                }
                match &self.nodes[*i] {
                    Node::List(items) | Node::Tuple(items) => Entry::List(items.len()),
                    Node::Tensor(t) => Entry::Tensor(t.clone()),
                    Node::Global(m, n) => Entry::Other(format!("{m}.{n}")),
                    Node::Object(class, _) => Entry::Other(class.clone()),
                    Node::Storage(_) => Entry::Other("a storage".into()),
                    Node::Dict(_) => unreachable!("dicts are handled above"),
                }
            }
        }
    }

    fn not_a_dict(&self, keys: &[&str], e: &Entry) -> Error {
        let what = match e {
            Entry::Other(class) => {
                return self.callable_error(&keys.join("/"), class);
            }
            other => format!("{other:?}"),
        };
        Error::Checkpoint {
            path: self.path().display().to_string(),
            key: keys.join("/"),
            message: format!("expected a dict, found {what}"),
        }
    }

    fn callable_error(&self, key: &str, class: &str) -> Error {
        Error::Checkpoint {
            path: self.path().display().to_string(),
            key: key.to_string(),
            message: format!(
                "built by the Python callable {class}, which sketchx never runs (only tensors, dicts, lists and plain \
                 values are read from pickles)"
            ),
        }
    }

    fn check_storage(&self, name: &str, t: &TensorInfo) -> Result<()> {
        let (decl, data) = &self.source.storages[t.storage];
        let malformed =
            |m: String| Error::malformed(self.path().display(), format!("tensor {name}: {m}"));
        let needed = (decl.numel as u64)
            .checked_mul(decl.dtype.size() as u64)
            .ok_or_else(|| malformed(format!("storage {} is too large", decl.key)))?;
        match data {
            Data::Missing => Err(malformed(format!(
                "the file holds no data for storage {:?}",
                decl.key
            ))),
            d if d.len() < needed => Err(malformed(format!(
                "storage {:?} needs {needed} bytes ({} x {:?}) but the file holds {}",
                decl.key,
                decl.numel,
                decl.dtype,
                d.len()
            ))),
            _ => Ok(()),
        }
    }
}

fn join(keys: &[&str], last: &str) -> String {
    let mut v: Vec<&str> = keys.to_vec();
    v.push(last);
    v.join("/")
}

/// The value of string key `key` in a dict value.
fn dict_get(nodes: &[Node], v: &Value, key: &str) -> Option<Value> {
    let Value::Node(i) = v else { return None };
    let Node::Dict(items) = &nodes[*i] else {
        return None;
    };
    items
        .iter()
        .find(|(k, _)| matches!(k, Value::Str(s) if &**s == key))
        .map(|(_, v)| v.clone())
}

impl Data {
    fn len(&self) -> u64 {
        match self {
            Data::Raw { len, .. } | Data::Deflated { len, .. } => *len,
            Data::Missing => 0,
        }
    }
}

/// Reads `n` bytes from byte `start` of a storage's data.
fn read_data(
    file: &File,
    data: Data,
    start: u64,
    n: usize,
) -> std::result::Result<Vec<u8>, String> {
    let end = start
        .checked_add(n as u64)
        .filter(|&e| e <= data.len())
        .ok_or_else(|| {
            format!(
                "bytes {start}..+{n} lie outside the data ({} bytes)",
                data.len()
            )
        })?;
    match data {
        Data::Raw { offset, .. } => {
            let mut buf = vec![0u8; n];
            read_exact_into(file, &mut buf, offset + start).map_err(|e| e.to_string())?;
            Ok(buf)
        }
        Data::Deflated { offset, clen, .. } => {
            let mut compressed = vec![0u8; usize::try_from(clen).map_err(|_| "too large")?];
            read_exact_into(file, &mut compressed, offset).map_err(|e| e.to_string())?;
            let mut out = Vec::with_capacity(usize::try_from(end).map_err(|_| "too large")?);
            flate2::read::DeflateDecoder::new(compressed.as_slice())
                .take(end)
                .read_to_end(&mut out)
                .map_err(|e| format!("cannot inflate: {e}"))?;
            if (out.len() as u64) < end {
                return Err(format!(
                    "the deflated entry holds {} bytes, not the {} it declares",
                    out.len(),
                    data.len()
                ));
            }
            out.drain(..start as usize);
            Ok(out)
        }
        Data::Missing => Err("no data".into()),
    }
}

impl Source {
    /// Reads tensor `t` (`name` for messages) as `dtype` on the CPU.
    fn read(&self, name: &str, t: &TensorInfo, dtype: DType) -> candle_core::Result<Tensor> {
        let (decl, data) = &self.storages[t.storage];
        let el = decl.dtype.size();
        let numel = t.numel();
        if numel == 0 {
            return Tensor::zeros(t.shape.clone(), dtype, &Device::Cpu);
        }
        let bad = |m: String| {
            candle_core::Error::Msg(format!("{}: tensor {name}: {m}", self.path.display()))
        };
        // Contiguous, little-endian, stored in place: straight into the tensor's buffer.
        if let (Data::Raw { offset, .. }, Some(st), false, true) = (
            data,
            decl.dtype.safetensors(),
            self.big_endian,
            t.is_contiguous(),
        ) {
            let start = offset + (t.offset * el) as u64;
            return read_tensor(&self.file, start, numel * el, st, &t.shape, dtype);
        }
        // Anything else: the bytes the view spans, then byte order, gather and conversion by hand.
        let span = span(&t.shape, &t.stride).expect("checked when the pickle was read");
        let bytes =
            read_data(&self.file, *data, (t.offset * el) as u64, span * el).map_err(&bad)?;
        let mut out = Vec::with_capacity(numel * el);
        let mut index = vec![0usize; t.shape.len()];
        for _ in 0..numel {
            let at: usize = index.iter().zip(&t.stride).map(|(i, s)| i * s).sum();
            let element = &bytes[at * el..(at + 1) * el];
            if self.big_endian {
                out.extend(element.iter().rev());
            } else {
                out.extend_from_slice(element);
            }
            // Next index, last dimension fastest.
            for d in (0..index.len()).rev() {
                index[d] += 1;
                if index[d] < t.shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        let shape = Shape::from(t.shape.clone());
        let cpu = &Device::Cpu;
        let tensor = match decl.dtype {
            StorageDtype::I8 => Tensor::from_vec(
                out.iter().map(|&b| b as i8 as i16).collect::<Vec<_>>(),
                shape,
                cpu,
            )?,
            StorageDtype::Bool => Tensor::from_vec(
                out.iter().map(|&b| u8::from(b != 0)).collect::<Vec<_>>(),
                shape,
                cpu,
            )?,
            other => Tensor::from_raw_buffer(&out, other.dtype(), shape.dims(), cpu)?,
        };
        tensor.to_dtype(dtype)
    }
}

/// The elements a view of `shape` with `stride` spans from its first element (0 for an empty view); `None` on
/// overflow.
fn span(shape: &[usize], stride: &[usize]) -> Option<usize> {
    if shape.contains(&0) {
        return Some(0);
    }
    let mut last = 0usize;
    for (&d, &s) in shape.iter().zip(stride) {
        last = last.checked_add((d - 1).checked_mul(s)?)?;
    }
    last.checked_add(1)
}

impl StateDict {
    /// The file.
    pub fn path(&self) -> &Path {
        &self.source.path
    }

    /// The tensor names, in the file's order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Where tensor `name` is, if there is one.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// The shape of tensor `name`, without reading it.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    /// Reads tensor `name`, converted to `dtype`, onto `device` (read on the CPU, then moved). A failed read is
    /// candle's I/O error naming the tensor.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| {
            candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            }
            .bt()
        })?;
        self.source
            .read(name, t, dtype)
            .map_err(|e| in_tensor(e, name))?
            .to_device(device)
    }

    /// Reads tensor `name` in its stored type ([`StorageDtype::dtype`]) on the CPU; errors name the file and the
    /// tensor ([`Error::Checkpoint`] when there is no such tensor).
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| Error::Checkpoint {
            path: self.path().display().to_string(),
            key: name.to_string(),
            message: "no such tensor".into(),
        })?;
        self.source
            .read(name, t, t.dtype.dtype())
            .map_err(|e| match e {
                candle_core::Error::Io(source) => Error::io(self.path(), source),
                e => Error::malformed(self.path().display(), format!("reading {name}: {e}")),
            })
    }
}

impl SimpleBackend for StateDict {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Some(shape) = self.shape(name) {
            if shape != s.dims() {
                return Err(candle_core::Error::UnexpectedShape {
                    msg: format!("shape mismatch for {name}"),
                    expected: s,
                    got: shape.to_vec().into(),
                }
                .bt());
            }
        }
        self.load(name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// The storages named by persistent ids, by key.
#[derive(Default)]
struct StorageTable {
    decls: Vec<StorageDecl>,
    by_key: HashMap<String, usize>,
}

/// Where the interpreter reads opcodes from.
trait Input {
    /// The next `n` bytes, or an error when fewer remain.
    fn take(&mut self, n: usize) -> std::result::Result<Vec<u8>, String>;
    /// The next byte.
    fn byte(&mut self) -> std::result::Result<u8, String>;
    /// How far into the input the next byte is.
    fn position(&self) -> u64;
    /// Bytes left.
    fn remaining(&self) -> u64;
}

struct SliceInput<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Input for SliceInput<'_> {
    fn take(&mut self, n: usize) -> std::result::Result<Vec<u8>, String> {
        if n > self.data.len() - self.pos {
            return Err(format!(
                "needs {n} bytes, {} remain",
                self.data.len() - self.pos
            ));
        }
        let v = self.data[self.pos..self.pos + n].to_vec();
        self.pos += n;
        Ok(v)
    }

    fn byte(&mut self) -> std::result::Result<u8, String> {
        let b = *self
            .data
            .get(self.pos)
            .ok_or("the pickle ends without STOP")?;
        self.pos += 1;
        Ok(b)
    }

    fn position(&self) -> u64 {
        self.pos as u64
    }

    fn remaining(&self) -> u64 {
        (self.data.len() - self.pos) as u64
    }
}

struct FileInput {
    reader: BufReader<File>,
    pos: u64,
    len: u64,
}

impl Input for FileInput {
    fn take(&mut self, n: usize) -> std::result::Result<Vec<u8>, String> {
        if n as u64 > self.len - self.pos {
            return Err(format!("needs {n} bytes, {} remain", self.len - self.pos));
        }
        let mut v = vec![0u8; n];
        self.reader.read_exact(&mut v).map_err(|e| e.to_string())?;
        self.pos += n as u64;
        Ok(v)
    }

    fn byte(&mut self) -> std::result::Result<u8, String> {
        if self.pos >= self.len {
            return Err("the pickle ends without STOP".into());
        }
        let mut b = [0u8];
        self.reader.read_exact(&mut b).map_err(|e| e.to_string())?;
        self.pos += 1;
        Ok(b[0])
    }

    fn position(&self) -> u64 {
        self.pos
    }

    fn remaining(&self) -> u64 {
        self.len - self.pos
    }
}

/// The pickle virtual machine, minus everything that would run code.
struct Machine<'a> {
    path: &'a Path,
    what: &'a str,
    input: &'a mut dyn Input,
    nodes: &'a mut Vec<Node>,
    storages: Option<&'a mut StorageTable>,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

/// An error of the interpreter: a message, placed at the opcode's byte by [`Machine::run`].
type Step<T> = std::result::Result<T, StepError>;

enum StepError {
    /// The pickle is damaged or uses something this reader does not implement.
    Malformed(String),
    /// A fully formed error (an unsupported storage type).
    Typed(Error),
}

impl From<String> for StepError {
    fn from(s: String) -> Self {
        StepError::Malformed(s)
    }
}

impl From<&str> for StepError {
    fn from(s: &str) -> Self {
        StepError::Malformed(s.to_string())
    }
}

impl<'a> Machine<'a> {
    fn new(
        path: &'a Path,
        what: &'a str,
        input: &'a mut dyn Input,
        nodes: &'a mut Vec<Node>,
        storages: Option<&'a mut StorageTable>,
    ) -> Self {
        Self {
            path,
            what,
            input,
            nodes,
            storages,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
        }
    }

    /// Interprets opcodes up to `STOP` and returns the value on top of the stack.
    fn run(mut self) -> Result<Value> {
        loop {
            let at = self.input.position();
            let op = match self.input.byte() {
                Ok(op) => op,
                Err(m) => return Err(self.error(at, None, StepError::Malformed(m))),
            };
            match self.step(op) {
                Ok(true) => {}
                Ok(false) => {
                    return self.stack.pop().ok_or_else(|| {
                        self.error(at, Some(op), "STOP with an empty stack".into())
                    });
                }
                Err(e) => return Err(self.error(at, Some(op), e)),
            }
        }
    }

    fn error(&self, at: u64, op: Option<u8>, e: StepError) -> Error {
        match e {
            StepError::Typed(e) => e,
            StepError::Malformed(m) => {
                let op = op
                    .map(|o| format!(" (opcode {o:#04x})"))
                    .unwrap_or_default();
                Error::malformed(
                    self.path.display(),
                    format!("{} byte {at}{op}: {m}", self.what),
                )
            }
        }
    }

    fn push_node(&mut self, node: Node) -> Value {
        self.nodes.push(node);
        Value::Node(self.nodes.len() - 1)
    }

    fn pop(&mut self) -> Step<Value> {
        // Values under the innermost mark belong to the marked group, not to a plain pop.
        if self.marks.last().is_some_and(|&m| self.stack.len() <= m) {
            return Err("pop across a MARK".into());
        }
        self.stack.pop().ok_or_else(|| "stack underflow".into())
    }

    fn top(&self) -> Step<&Value> {
        self.stack.last().ok_or_else(|| "stack underflow".into())
    }

    fn pop_mark(&mut self) -> Step<Vec<Value>> {
        let m = self.marks.pop().ok_or("no MARK")?;
        Ok(self.stack.split_off(m))
    }

    fn uint(&mut self, n: usize) -> Step<u64> {
        let b = self.input.take(n)?;
        let mut v = 0u64;
        for (i, &x) in b.iter().enumerate() {
            v |= u64::from(x) << (8 * i);
        }
        Ok(v)
    }

    fn len_arg(&mut self, n: usize) -> Step<usize> {
        let len = self.uint(n)?;
        if len > self.input.remaining() {
            return Err(format!(
                "a length of {len} bytes, but only {} remain",
                self.input.remaining()
            )
            .into());
        }
        Ok(len as usize)
    }

    fn line(&mut self) -> Step<String> {
        let mut v = Vec::new();
        loop {
            let b = self.input.byte()?;
            if b == b'\n' {
                break;
            }
            if v.len() >= MAX_LINE {
                return Err("a text line longer than 64 KiB".into());
            }
            v.push(b);
        }
        String::from_utf8(v).map_err(|_| "a text line that is not UTF-8".into())
    }

    fn string(&mut self, n: usize) -> Step<Value> {
        let len = self.len_arg(n)?;
        let b = self.input.take(len)?;
        let s = String::from_utf8(b).map_err(|_| "a string that is not UTF-8")?;
        Ok(Value::Str(s.into()))
    }

    fn bytes(&mut self, n: usize) -> Step<Value> {
        let len = self.len_arg(n)?;
        Ok(Value::Bytes(self.input.take(len)?.into()))
    }

    fn long(&mut self, n: usize) -> Step<Value> {
        let len = self.len_arg(n)?;
        let b = self.input.take(len)?;
        Ok(int_from_le(&b))
    }

    fn memo_put(&mut self, index: u32) -> Step<()> {
        let v = self.top()?.clone();
        self.memo.insert(index, v);
        Ok(())
    }

    fn memo_get(&mut self, index: u32) -> Step<()> {
        let v = self
            .memo
            .get(&index)
            .cloned()
            .ok_or_else(|| format!("memo entry {index} was never stored"))?;
        self.stack.push(v);
        Ok(())
    }

    fn node(&self, v: &Value) -> Option<&Node> {
        match v {
            Value::Node(i) => Some(&self.nodes[*i]),
            _ => None,
        }
    }

    fn global_name(&self, v: &Value) -> Option<(Arc<str>, Arc<str>)> {
        match self.node(v) {
            Some(Node::Global(m, n)) => Some((m.clone(), n.clone())),
            _ => None,
        }
    }

    fn class_name(&self, v: &Value) -> String {
        match self.node(v) {
            Some(Node::Global(m, n)) => format!("{m}.{n}"),
            Some(Node::Object(c, _)) => format!("(the result of {c})"),
            _ => "(a value that is not a callable)".into(),
        }
    }

    fn items(&self, v: &Value) -> Option<&[Value]> {
        match self.node(v) {
            Some(Node::Tuple(items) | Node::List(items)) => Some(items),
            _ => None,
        }
    }

    fn set_items(&mut self, pairs: Vec<Value>) -> Step<()> {
        if !pairs.len().is_multiple_of(2) {
            return Err("SETITEMS with an odd number of values".into());
        }
        let target = self.top()?.clone();
        let Value::Node(i) = target else {
            return Err("SETITEM(S) on a value that is not a dict".into());
        };
        match &mut self.nodes[i] {
            Node::Dict(items) => {
                let mut it = pairs.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    items.push((k, v));
                }
                Ok(())
            }
            // A dict subclass that is never built: its items are dropped with it.
            Node::Object(..) => Ok(()),
            _ => Err("SETITEM(S) on a value that is not a dict".into()),
        }
    }

    fn append(&mut self, values: Vec<Value>) -> Step<()> {
        let target = self.top()?.clone();
        let Value::Node(i) = target else {
            return Err("APPEND(S) on a value that is not a list".into());
        };
        match &mut self.nodes[i] {
            Node::List(items) => {
                items.extend(values);
                Ok(())
            }
            Node::Object(..) => Ok(()),
            _ => Err("APPEND(S) on a value that is not a list".into()),
        }
    }

    /// `REDUCE`: the few callables a state dict needs, given their meaning; anything else an inert object.
    fn reduce(&mut self, callable: Value, args: Value) -> Step<Value> {
        let Some((module, name)) = self.global_name(&callable) else {
            let class = self.class_name(&callable);
            return Ok(self.push_node(Node::Object(class, None)));
        };
        let args: Vec<Value> = self.items(&args).map(<[Value]>::to_vec).unwrap_or_default();
        match (&*module, &*name) {
            ("collections", "OrderedDict") => {
                let mut items = Vec::new();
                if let Some(pairs) = args.first().and_then(|a| self.items(a)) {
                    for pair in pairs {
                        match self.items(pair) {
                            Some([k, v]) => items.push((k.clone(), v.clone())),
                            _ => {
                                return Err(
                                    "OrderedDict built from something else than pairs".into()
                                )
                            }
                        }
                    }
                }
                Ok(self.push_node(Node::Dict(items)))
            }
            ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => {
                self.rebuild_tensor(&args)
            }
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                match args.first() {
                    Some(t @ Value::Node(i)) if matches!(self.nodes[*i], Node::Tensor(_)) => {
                        Ok(t.clone())
                    }
                    _ => {
                        Err(format!("torch._utils.{name} of something that is not a tensor").into())
                    }
                }
            }
            ("builtins" | "__builtin__", "set" | "frozenset") => {
                let items = args
                    .first()
                    .and_then(|a| self.items(a))
                    .map(<[Value]>::to_vec)
                    .unwrap_or_default();
                Ok(self.push_node(Node::List(items)))
            }
            ("copyreg", "_reconstructor") => {
                let class = args
                    .first()
                    .map(|c| self.class_name(c))
                    .unwrap_or_else(|| "copyreg._reconstructor".into());
                Ok(self.push_node(Node::Object(class, None)))
            }
            _ => Ok(self.push_node(Node::Object(format!("{module}.{name}"), None))),
        }
    }

    /// `torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, ...)`: a view of a storage, checked
    /// against it.
    fn rebuild_tensor(&mut self, args: &[Value]) -> Step<Value> {
        let [storage, offset, size, stride, ..] = args else {
            return Err("a tensor rebuilt from fewer than 4 arguments".into());
        };
        let Some(Node::Storage(s)) = self.node(storage) else {
            return Err("a tensor whose storage is not a persistent storage id".into());
        };
        let s = *s;
        let int = |v: &Value, what: &str| -> Step<usize> {
            match v {
                Value::Int(i) if *i >= 0 => {
                    usize::try_from(*i).map_err(|_| format!("{what} {i} is too large").into())
                }
                other => Err(format!("{what} is {other:?}, not a non-negative integer").into()),
            }
        };
        let ints = |v: &Value, what: &str| -> Step<Vec<usize>> {
            let items = self
                .items(v)
                .ok_or_else(|| format!("the tensor's {what} is not a tuple"))?;
            if items.len() > MAX_DIMS {
                return Err(format!("a tensor of {} dimensions", items.len()).into());
            }
            items.iter().map(|i| int(i, what)).collect()
        };
        let offset = int(offset, "storage offset")?;
        let shape = ints(size, "size")?;
        let stride = ints(stride, "stride")?;
        if shape.len() != stride.len() {
            return Err(format!(
                "a tensor with {} sizes but {} strides",
                shape.len(),
                stride.len()
            )
            .into());
        }
        shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or("a tensor whose element count overflows")?;
        let table = self
            .storages
            .as_deref()
            .ok_or("a tensor outside a data pickle")?;
        let decl = &table.decls[s];
        let span = span(&shape, &stride).ok_or("a tensor whose extent overflows")?;
        if span > 0 && offset.checked_add(span).is_none_or(|end| end > decl.numel) {
            return Err(format!(
                "a tensor view (offset {offset}, size {shape:?}, stride {stride:?}) past the end of storage {:?} \
                 ({} elements)",
                decl.key, decl.numel
            )
            .into());
        }
        let dtype = decl.dtype;
        Ok(self.push_node(Node::Tensor(TensorInfo {
            dtype,
            shape,
            stride,
            offset,
            storage: s,
        })))
    }

    /// `BINPERSID` / `PERSID`: `('storage', torch.<T>Storage, key, location, numel[, view])`.
    fn persistent_load(&mut self, pid: Value) -> Step<Value> {
        let items = self
            .items(&pid)
            .map(<[Value]>::to_vec)
            .ok_or("a persistent id that is not a tuple")?;
        let [Value::Str(kind), storage_type, key, _location, numel, rest @ ..] = items.as_slice()
        else {
            return Err(
                "a persistent id that is not ('storage', type, key, location, numel)".into(),
            );
        };
        if &**kind != "storage" {
            return Err(format!("a persistent id of kind {kind:?}").into());
        }
        if rest.first().is_some_and(|v| !matches!(v, Value::None)) {
            return Err(
                "a storage view in a persistent id (legacy shared storages are not read)".into(),
            );
        }
        let (module, name) = self
            .global_name(storage_type)
            .ok_or("a persistent id whose storage type is not a global")?;
        let dtype = if &*module == "torch" {
            StorageDtype::from_storage_type(&name)
        } else {
            None
        };
        let Some(dtype) = dtype else {
            return Err(StepError::Typed(Error::unsupported(
                self.path.display(),
                format!(
                    "storage type {module}.{name} (sketchx reads float, integer and bool storages)"
                ),
            )));
        };
        let key = match key {
            Value::Str(s) => s.to_string(),
            Value::Int(i) => i.to_string(),
            _ => return Err("a storage key that is not a string".into()),
        };
        let numel = match numel {
            Value::Int(n) if *n >= 0 => *n as usize,
            _ => return Err("a storage size that is not a non-negative integer".into()),
        };
        let Some(table) = self.storages.as_deref_mut() else {
            return Err("a persistent id outside a data pickle".into());
        };
        let index = match table.by_key.get(&key) {
            Some(&i) => {
                let d = &table.decls[i];
                if d.dtype != dtype || d.numel != numel {
                    return Err(format!(
                        "storage {key:?} declared twice with different types or sizes"
                    )
                    .into());
                }
                i
            }
            None => {
                table.decls.push(StorageDecl {
                    key: key.clone(),
                    dtype,
                    numel,
                });
                table.by_key.insert(key, table.decls.len() - 1);
                table.decls.len() - 1
            }
        };
        Ok(self.push_node(Node::Storage(index)))
    }

    /// Runs one opcode; `false` at `STOP`.
    fn step(&mut self, op: u8) -> Step<bool> {
        match op {
            // PROTO
            0x80 => {
                let v = self.input.byte()?;
                if v > 5 {
                    return Err(format!("pickle protocol {v} (0-5 are known)").into());
                }
            }
            // FRAME: a hint for buffering; the opcodes inside are read as usual.
            0x95 => {
                self.uint(8)?;
            }
            b'.' => return Ok(false),
            b'(' => self.marks.push(self.stack.len()),
            b'0' => {
                self.pop()?;
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let v = self.top()?.clone();
                self.stack.push(v);
            }
            b'N' => self.stack.push(Value::None),
            0x88 => self.stack.push(Value::Bool(true)),
            0x89 => self.stack.push(Value::Bool(false)),
            b'J' => {
                let v = self.uint(4)? as u32 as i32;
                self.stack.push(Value::Int(i64::from(v)));
            }
            b'K' => {
                let v = self.uint(1)?;
                self.stack.push(Value::Int(v as i64));
            }
            b'M' => {
                let v = self.uint(2)?;
                self.stack.push(Value::Int(v as i64));
            }
            0x8a => {
                let v = self.long(1)?;
                self.stack.push(v);
            }
            0x8b => {
                let v = self.long(4)?;
                self.stack.push(v);
            }
            b'I' => {
                let line = self.line()?;
                let v = match line.as_str() {
                    "00" => Value::Bool(false),
                    "01" => Value::Bool(true),
                    s => Value::Int(s.trim().parse().map_err(|_| format!("INT {s:?}"))?),
                };
                self.stack.push(v);
            }
            b'L' => {
                let line = self.line()?;
                let s = line.trim().trim_end_matches('L');
                let v = s
                    .parse::<i64>()
                    .map_err(|_| format!("LONG {s:?} (wider than 64 bits)"))?;
                self.stack.push(Value::Int(v));
            }
            b'G' => {
                let b = self.input.take(8)?;
                let v = f64::from_be_bytes(b.try_into().expect("8 bytes"));
                self.stack.push(Value::Float(v));
            }
            b'F' => {
                let line = self.line()?;
                let v = line
                    .trim()
                    .parse::<f64>()
                    .map_err(|_| format!("FLOAT {line:?}"))?;
                self.stack.push(Value::Float(v));
            }
            // SHORT_BINUNICODE, BINUNICODE, BINUNICODE8
            0x8c => {
                let v = self.string(1)?;
                self.stack.push(v);
            }
            b'X' => {
                let v = self.string(4)?;
                self.stack.push(v);
            }
            0x8d => {
                let v = self.string(8)?;
                self.stack.push(v);
            }
            // SHORT_BINSTRING, BINSTRING (Python 2 str: bytes, read as Latin-1 text as Python 3 does by default)
            b'U' | b'T' => {
                let len = self.len_arg(if op == b'U' { 1 } else { 4 })?;
                let b = self.input.take(len)?;
                let s: String = b.iter().map(|&c| char::from(c)).collect();
                self.stack.push(Value::Str(s.into()));
            }
            // SHORT_BINBYTES, BINBYTES, BINBYTES8, BYTEARRAY8
            b'C' => {
                let v = self.bytes(1)?;
                self.stack.push(v);
            }
            b'B' => {
                let v = self.bytes(4)?;
                self.stack.push(v);
            }
            0x8e | 0x96 => {
                let v = self.bytes(8)?;
                self.stack.push(v);
            }
            b'}' => {
                let v = self.push_node(Node::Dict(Vec::new()));
                self.stack.push(v);
            }
            b'd' => {
                let items = self.pop_mark()?;
                if !items.len().is_multiple_of(2) {
                    return Err("DICT with an odd number of values".into());
                }
                let mut pairs = Vec::with_capacity(items.len() / 2);
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    pairs.push((k, v));
                }
                let v = self.push_node(Node::Dict(pairs));
                self.stack.push(v);
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.set_items(vec![k, v])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.set_items(items)?;
            }
            b']' | 0x8f => {
                let v = self.push_node(Node::List(Vec::new()));
                self.stack.push(v);
            }
            b'l' | 0x91 => {
                let items = self.pop_mark()?;
                let v = self.push_node(Node::List(items));
                self.stack.push(v);
            }
            b'a' => {
                let v = self.pop()?;
                self.append(vec![v])?;
            }
            b'e' | 0x90 => {
                let items = self.pop_mark()?;
                self.append(items)?;
            }
            b')' => {
                let v = self.push_node(Node::Tuple(Vec::new()));
                self.stack.push(v);
            }
            b't' => {
                let items = self.pop_mark()?;
                let v = self.push_node(Node::Tuple(items));
                self.stack.push(v);
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                if self.stack.len() < n
                    || self.marks.last().is_some_and(|&m| self.stack.len() - n < m)
                {
                    return Err("stack underflow".into());
                }
                let items = self.stack.split_off(self.stack.len() - n);
                let v = self.push_node(Node::Tuple(items));
                self.stack.push(v);
            }
            // PUT, BINPUT, LONG_BINPUT, MEMOIZE
            b'p' => {
                let line = self.line()?;
                let i = line
                    .trim()
                    .parse::<u32>()
                    .map_err(|_| format!("PUT {line:?}"))?;
                self.memo_put(i)?;
            }
            b'q' => {
                let i = self.uint(1)? as u32;
                self.memo_put(i)?;
            }
            b'r' => {
                let i = self.uint(4)? as u32;
                self.memo_put(i)?;
            }
            0x94 => {
                let i = u32::try_from(self.memo.len()).map_err(|_| "memo overflow")?;
                self.memo_put(i)?;
            }
            // GET, BINGET, LONG_BINGET
            b'g' => {
                let line = self.line()?;
                let i = line
                    .trim()
                    .parse::<u32>()
                    .map_err(|_| format!("GET {line:?}"))?;
                self.memo_get(i)?;
            }
            b'h' => {
                let i = self.uint(1)? as u32;
                self.memo_get(i)?;
            }
            b'j' => {
                let i = self.uint(4)? as u32;
                self.memo_get(i)?;
            }
            // GLOBAL, STACK_GLOBAL: a name only; nothing is imported.
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                let v = self.push_node(Node::Global(module.into(), name.into()));
                self.stack.push(v);
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (Value::Str(module), Value::Str(name)) = (module, name) else {
                    return Err("STACK_GLOBAL of values that are not strings".into());
                };
                let v = self.push_node(Node::Global(module, name));
                self.stack.push(v);
            }
            b'R' => {
                let args = self.pop()?;
                let callable = self.pop()?;
                let v = self.reduce(callable, args)?;
                self.stack.push(v);
            }
            // NEWOBJ, NEWOBJ_EX: cls.__new__(cls, *args) is never called.
            0x81 | 0x92 => {
                if op == 0x92 {
                    self.pop()?;
                }
                self.pop()?;
                let cls = self.pop()?;
                let class = self.class_name(&cls);
                let v = self.push_node(Node::Object(class, None));
                self.stack.push(v);
            }
            // INST (module and name lines, arguments above a mark), OBJ (class and arguments above a mark).
            b'i' => {
                let module = self.line()?;
                let name = self.line()?;
                self.pop_mark()?;
                let v = self.push_node(Node::Object(format!("{module}.{name}"), None));
                self.stack.push(v);
            }
            b'o' => {
                let items = self.pop_mark()?;
                let class = items
                    .first()
                    .map(|c| self.class_name(c))
                    .ok_or("OBJ without a class")?;
                let v = self.push_node(Node::Object(class, None));
                self.stack.push(v);
            }
            // BUILD: an object keeps its state (as data, for attribute look-ups); anything else ignores it.
            b'b' => {
                let state = self.pop()?;
                let target = self.top()?.clone();
                if let Value::Node(i) = target {
                    // `(dict, slots)` state: the dict part.
                    let state = match self.node(&state) {
                        Some(Node::Tuple(parts)) if parts.len() == 2 => parts[0].clone(),
                        _ => state,
                    };
                    if let Node::Object(_, slot) = &mut self.nodes[i] {
                        *slot = Some(state);
                    }
                }
            }
            b'Q' => {
                let pid = self.pop()?;
                let v = self.persistent_load(pid)?;
                self.stack.push(v);
            }
            b'P' => {
                let line = self.line()?;
                let _ = line;
                return Err("a text persistent id (PERSID); torch writes BINPERSID".into());
            }
            b'S' | b'V' => {
                return Err(
                    "a protocol-0 quoted string (STRING/UNICODE), which torch never writes".into(),
                );
            }
            0x82..=0x84 => return Err("an extension-registry opcode (EXT1/2/4)".into()),
            0x97 | 0x98 => return Err("an out-of-band buffer opcode".into()),
            other => return Err(format!("unknown opcode {other:#04x}").into()),
        }
        Ok(true)
    }
}

/// A little-endian two's complement integer: i64 when it fits (Python writes 2^63 - 1 in 9 bytes), else
/// [`Value::BigInt`].
fn int_from_le(b: &[u8]) -> Value {
    let Some(&last) = b.last() else {
        return Value::Int(0);
    };
    let fill = if last & 0x80 != 0 { 0xff } else { 0 };
    let n = b.len().min(8);
    let mut buf = [fill; 8];
    buf[..n].copy_from_slice(&b[..n]);
    let v = i64::from_le_bytes(buf);
    // Fits when every byte past the eighth repeats the sign of the value.
    let sign = if v < 0 { 0xff } else { 0 };
    if b[n..].iter().all(|&x| x == sign) {
        Value::Int(v)
    } else {
        Value::BigInt(b.into())
    }
}

/// A minimal zip reader for torch's archives: the central directory (zip64 included) and each entry's data range.
mod zip {
    use std::collections::HashMap;
    use std::fs::File;

    use super::{Data, MAX_INFLATE_RATIO};
    use crate::models::weights::read_exact_into;

    /// One entry of the central directory.
    #[derive(Debug, Clone)]
    pub(super) struct ZipEntry {
        method: u16,
        flags: u16,
        compressed: u64,
        uncompressed: u64,
        local_header: u64,
    }

    type R<T> = std::result::Result<T, String>;

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }
    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
    }

    fn read_at(file: &File, len: u64, offset: u64, n: u64, what: &str) -> R<Vec<u8>> {
        if offset.checked_add(n).is_none_or(|end| end > len) {
            return Err(format!(
                "the zip's {what} ({n} bytes at byte {offset}) lies past the end of the file ({len} bytes)"
            ));
        }
        let mut buf = vec![0u8; usize::try_from(n).map_err(|_| "too large")?];
        read_exact_into(file, &mut buf, offset).map_err(|e| e.to_string())?;
        Ok(buf)
    }

    /// The entries of the archive by name.
    pub(super) fn read_index(file: &File, len: u64) -> R<HashMap<String, ZipEntry>> {
        // The end-of-central-directory record: 22 bytes and a comment of at most 65535 bytes at the end.
        let tail_len = len.min(22 + 65535);
        let tail = read_at(file, len, len - tail_len, tail_len, "end")?;
        let eocd = (0..tail.len().saturating_sub(21))
            .rev()
            .find(|&i| u32_at(&tail, i) == 0x0605_4b50)
            .ok_or("no end-of-central-directory record: not a zip archive, or truncated")?;
        let eocd_pos = len - tail_len + eocd as u64;
        let rec = &tail[eocd..eocd + 22];
        let mut entries = u64::from(u16_at(rec, 10));
        let mut cd_size = u64::from(u32_at(rec, 12));
        let mut cd_offset = u64::from(u32_at(rec, 16));
        if entries == 0xffff || cd_size == 0xffff_ffff || cd_offset == 0xffff_ffff {
            // zip64: a locator just before the record points at the zip64 end record.
            if eocd_pos < 20 {
                return Err("a zip64 archive without its locator".into());
            }
            let loc = read_at(file, len, eocd_pos - 20, 20, "zip64 locator")?;
            if u32_at(&loc, 0) != 0x0706_4b50 {
                return Err("a zip64 archive without its locator".into());
            }
            let z = read_at(file, len, u64_at(&loc, 8), 56, "zip64 end record")?;
            if u32_at(&z, 0) != 0x0606_4b50 {
                return Err("a bad zip64 end record".into());
            }
            entries = u64_at(&z, 32);
            cd_size = u64_at(&z, 40);
            cd_offset = u64_at(&z, 48);
        }
        // Every central entry takes at least 46 bytes: a claimed count beyond that is a lie.
        if entries > cd_size / 46 {
            return Err(format!(
                "the zip claims {entries} entries in a {cd_size}-byte central directory"
            ));
        }
        let cd = read_at(file, len, cd_offset, cd_size, "central directory")?;
        let mut out = HashMap::with_capacity(entries as usize);
        let mut at = 0usize;
        for _ in 0..entries {
            if at + 46 > cd.len() || u32_at(&cd, at) != 0x0201_4b50 {
                return Err("a damaged central directory".into());
            }
            let flags = u16_at(&cd, at + 8);
            let method = u16_at(&cd, at + 10);
            let mut compressed = u64::from(u32_at(&cd, at + 20));
            let mut uncompressed = u64::from(u32_at(&cd, at + 24));
            let name_len = usize::from(u16_at(&cd, at + 28));
            let extra_len = usize::from(u16_at(&cd, at + 30));
            let comment_len = usize::from(u16_at(&cd, at + 32));
            let mut local_header = u64::from(u32_at(&cd, at + 42));
            let name_start = at + 46;
            let extra_start = name_start + name_len;
            let next = extra_start + extra_len + comment_len;
            if next > cd.len() {
                return Err("a damaged central directory".into());
            }
            let name = String::from_utf8_lossy(&cd[name_start..extra_start]).into_owned();
            // The zip64 extra field holds, in order, whichever of the three values are saturated.
            let mut extra = &cd[extra_start..extra_start + extra_len];
            while extra.len() >= 4 {
                let id = u16_at(extra, 0);
                let size = usize::from(u16_at(extra, 2));
                if 4 + size > extra.len() {
                    break;
                }
                if id == 0x0001 {
                    let mut field = &extra[4..4 + size];
                    for value in [&mut uncompressed, &mut compressed, &mut local_header] {
                        if *value == 0xffff_ffff {
                            if field.len() < 8 {
                                return Err(format!("entry {name}: a short zip64 field"));
                            }
                            *value = u64_at(field, 0);
                            field = &field[8..];
                        }
                    }
                }
                extra = &extra[4 + size..];
            }
            out.insert(
                name,
                ZipEntry {
                    method,
                    flags,
                    compressed,
                    uncompressed,
                    local_header,
                },
            );
            at = next;
        }
        Ok(out)
    }

    impl ZipEntry {
        /// Where the entry's bytes are (its local header read to find the start), checked against the file.
        pub(super) fn data(&self, file: &File, len: u64) -> R<Data> {
            if self.flags & 1 != 0 {
                return Err("an encrypted zip entry".into());
            }
            let header = read_at(file, len, self.local_header, 30, "local header")?;
            if u32_at(&header, 0) != 0x0403_4b50 {
                return Err("a damaged local header".into());
            }
            let start = self.local_header
                + 30
                + u64::from(u16_at(&header, 26))
                + u64::from(u16_at(&header, 28));
            if start
                .checked_add(self.compressed)
                .is_none_or(|end| end > len)
            {
                return Err(format!(
                    "an entry's {} bytes at byte {start} run past the end of the file ({len} bytes)",
                    self.compressed
                ));
            }
            match self.method {
                0 => {
                    if self.compressed != self.uncompressed {
                        return Err("a stored entry whose sizes differ".into());
                    }
                    Ok(Data::Raw {
                        offset: start,
                        len: self.compressed,
                    })
                }
                8 => {
                    if self.uncompressed > self.compressed.saturating_mul(MAX_INFLATE_RATIO) + 1024
                    {
                        return Err(format!(
                            "a deflated entry of {} bytes claims to hold {} (more than deflate can)",
                            self.compressed, self.uncompressed
                        ));
                    }
                    Ok(Data::Deflated {
                        offset: start,
                        clen: self.compressed,
                        len: self.uncompressed,
                    })
                }
                m => Err(format!(
                    "zip compression method {m} (stored and deflate are read)"
                )),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Opcode bytes, for hand-written pickles.
    const PROTO2: &[u8] = b"\x80\x02";

    fn binunicode(s: &str) -> Vec<u8> {
        let mut v = vec![b'X'];
        v.extend((s.len() as u32).to_le_bytes());
        v.extend(s.as_bytes());
        v
    }

    fn global(module: &str, name: &str) -> Vec<u8> {
        format!("c{module}\n{name}\n").into_bytes()
    }

    /// A non-negative integer as LONG1 (any u64).
    fn binint(i: u64) -> Vec<u8> {
        let mut v = vec![0x8a, 9];
        v.extend(i.to_le_bytes());
        v.push(0);
        v
    }

    /// `_rebuild_tensor_v2(pid(storage key, dtype, numel), offset, size, stride, False, OrderedDict())`.
    fn tensor(
        key: &str,
        storage: &str,
        numel: u64,
        offset: u64,
        size: &[u64],
        stride: &[u64],
    ) -> Vec<u8> {
        let mut v = global("torch._utils", "_rebuild_tensor_v2");
        v.push(b'(');
        v.push(b'(');
        v.extend(binunicode("storage"));
        v.extend(global("torch", storage));
        v.extend(binunicode(key));
        v.extend(binunicode("cpu"));
        v.extend(binint(numel));
        v.push(b't');
        v.push(b'Q');
        v.extend(binint(offset));
        v.push(b'(');
        for &s in size {
            v.extend(binint(s));
        }
        v.push(b't');
        v.push(b'(');
        for &s in stride {
            v.extend(binint(s));
        }
        v.push(b't');
        v.push(0x89);
        v.extend(global("collections", "OrderedDict"));
        v.push(b')');
        v.push(b'R');
        v.push(b't');
        v.push(b'R');
        v
    }

    /// A stored (uncompressed) zip archive of `entries`, as torch writes them.
    fn zip_archive(entries: &[(&str, &[u8])]) -> Vec<u8> {
        zip_archive_with(entries, false)
    }

    /// As [`zip_archive`], every entry deflated when `deflate`.
    fn zip_archive_with(entries: &[(&str, &[u8])], deflate: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let mut central = Vec::new();
        let method: u8 = if deflate { 8 } else { 0 };
        for (name, data) in entries {
            let offset = out.len() as u32;
            let crc = 0u32;
            let stored = if deflate {
                use std::io::Write;
                let mut e =
                    flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            } else {
                data.to_vec()
            };
            out.extend(0x0403_4b50u32.to_le_bytes());
            out.extend([20, 0, 0, 0, method, 0, 0, 0, 0, 0]);
            out.extend(crc.to_le_bytes());
            out.extend((stored.len() as u32).to_le_bytes());
            out.extend((data.len() as u32).to_le_bytes());
            out.extend((name.len() as u16).to_le_bytes());
            out.extend(0u16.to_le_bytes());
            out.extend(name.as_bytes());
            out.extend(&stored);
            central.extend(0x0201_4b50u32.to_le_bytes());
            central.extend([20, 0, 20, 0, 0, 0, method, 0, 0, 0, 0, 0]);
            central.extend(crc.to_le_bytes());
            central.extend((stored.len() as u32).to_le_bytes());
            central.extend((data.len() as u32).to_le_bytes());
            central.extend((name.len() as u16).to_le_bytes());
            central.extend([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            central.extend(offset.to_le_bytes());
            central.extend(name.as_bytes());
        }
        let cd_offset = out.len() as u32;
        out.extend(&central);
        out.extend(0x0605_4b50u32.to_le_bytes());
        out.extend([0, 0, 0, 0]);
        out.extend((entries.len() as u16).to_le_bytes());
        out.extend((entries.len() as u16).to_le_bytes());
        out.extend((central.len() as u32).to_le_bytes());
        out.extend(cd_offset.to_le_bytes());
        out.extend([0, 0]);
        out
    }

    struct Temp(PathBuf);
    impl Drop for Temp {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn write_temp(name: &str, bytes: &[u8]) -> Temp {
        let path =
            std::env::temp_dir().join(format!("sketchx-pickle-{}-{name}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        Temp(path)
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// `{'state_dict': {name: tensor, ...}}` in a zip with the storages given.
    fn checkpoint(tensors: &[(&str, Vec<u8>)], storages: &[(&str, Vec<u8>)], name: &str) -> Temp {
        let mut pkl = PROTO2.to_vec();
        pkl.push(b'}');
        pkl.extend(binunicode("state_dict"));
        pkl.push(b'}');
        pkl.push(b'(');
        for (k, t) in tensors {
            pkl.extend(binunicode(k));
            pkl.extend(t);
        }
        pkl.push(b'u');
        pkl.push(b's');
        pkl.push(b'.');
        let mut entries: Vec<(String, Vec<u8>)> = vec![
            ("model/data.pkl".into(), pkl),
            ("model/byteorder".into(), b"little".to_vec()),
        ];
        for (k, data) in storages {
            entries.push((format!("model/data/{k}"), data.clone()));
        }
        let refs: Vec<(&str, &[u8])> = entries
            .iter()
            .map(|(n, d)| (n.as_str(), d.as_slice()))
            .collect();
        write_temp(name, &zip_archive(&refs))
    }

    fn open(bytes: &[u8], name: &str) -> (Temp, Result<TorchFile>) {
        let t = write_temp(name, bytes);
        let r = TorchFile::open(&t.0);
        (t, r)
    }

    fn malformed_message(r: Result<impl std::fmt::Debug>) -> String {
        match r {
            Err(Error::MalformedFile { message, .. }) => message,
            other => panic!("expected MalformedFile, got {other:?}"),
        }
    }

    #[test]
    fn reads_contiguous_strided_and_offset_tensors() {
        let data: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let tensors = [
            ("a", tensor("0", "FloatStorage", 12, 0, &[3, 4], &[4, 1])),
            // The transpose of `a`: a non-contiguous view of the same storage.
            ("t", tensor("0", "FloatStorage", 12, 0, &[4, 3], &[1, 4])),
            // Elements 5..8 as a 0-offset-free view.
            ("o", tensor("0", "FloatStorage", 12, 5, &[3], &[1])),
            ("h", tensor("1", "HalfStorage", 2, 0, &[2], &[1])),
            ("scalar", tensor("2", "LongStorage", 1, 0, &[], &[])),
        ];
        let half: Vec<u8> = [half::f16::from_f32(1.5), half::f16::from_f32(-2.0)]
            .iter()
            .flat_map(|h| h.to_le_bytes())
            .collect();
        let storages = [
            ("0", f32_bytes(&data)),
            ("1", half),
            ("2", 7i64.to_le_bytes().to_vec()),
        ];
        let t = checkpoint(&tensors, &storages, "ok.ckpt");
        let file = TorchFile::open(&t.0).unwrap();
        assert_eq!(file.keys_at(&[]).unwrap(), vec!["state_dict"]);
        let sd = file.state_dict().unwrap();
        assert_eq!(sd.names(), ["a", "t", "o", "h", "scalar"]);
        let a = sd.tensor("a").unwrap();
        assert_eq!(a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), data);
        let tr = sd.load("t", DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            tr.to_vec2::<f32>().unwrap(),
            a.t().unwrap().to_vec2::<f32>().unwrap()
        );
        let o = sd.tensor("o").unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(o, vec![5.0, 6.0, 7.0]);
        // fp16 widens to f32 exactly.
        let h = sd.load("h", DType::F32, &Device::Cpu).unwrap();
        assert_eq!(h.to_vec1::<f32>().unwrap(), vec![1.5, -2.0]);
        let s = sd.tensor("scalar").unwrap();
        assert_eq!(s.dims(), &[] as &[usize]);
        assert_eq!(s.to_scalar::<i64>().unwrap(), 7);
    }

    #[test]
    fn refuses_views_past_their_storage_and_short_storages() {
        // 3x4 view of an 11-element storage.
        let tensors = [("a", tensor("0", "FloatStorage", 11, 0, &[3, 4], &[4, 1]))];
        let t = checkpoint(&tensors, &[("0", f32_bytes(&[0.0; 11]))], "past.ckpt");
        let m = malformed_message(TorchFile::open(&t.0));
        assert!(m.contains("past the end of storage"), "{m}");
        // An offset pushing a fitting view out.
        let tensors = [("a", tensor("0", "FloatStorage", 12, 1, &[3, 4], &[4, 1]))];
        let t = checkpoint(&tensors, &[("0", f32_bytes(&[0.0; 12]))], "offset.ckpt");
        assert!(malformed_message(TorchFile::open(&t.0)).contains("past the end of storage"));
        // Sizes whose product overflows.
        let tensors = [(
            "a",
            tensor(
                "0",
                "FloatStorage",
                4,
                0,
                &[u64::from(u32::MAX); 3],
                &[0, 0, 0],
            ),
        )];
        let t = checkpoint(&tensors, &[("0", f32_bytes(&[0.0; 4]))], "huge.ckpt");
        assert!(malformed_message(TorchFile::open(&t.0)).contains("overflows"));
        // A storage that claims a billion floats backed by 16 bytes: refused when selected, nothing allocated.
        let tensors = [(
            "a",
            tensor("0", "FloatStorage", 1_000_000_000, 0, &[4], &[1]),
        )];
        let t = checkpoint(&tensors, &[("0", f32_bytes(&[0.0; 4]))], "lying.ckpt");
        let file = TorchFile::open(&t.0).unwrap();
        let m = malformed_message(file.state_dict());
        assert!(m.contains("needs 4000000000 bytes"), "{m}");
        // A storage with no data entry.
        let tensors = [("a", tensor("9", "FloatStorage", 4, 0, &[4], &[1]))];
        let t = checkpoint(&tensors, &[], "missing.ckpt");
        let file = TorchFile::open(&t.0).unwrap();
        assert!(malformed_message(file.state_dict()).contains("no data for storage"));
    }

    #[test]
    fn callables_are_never_called_and_refused_where_read() {
        // {'state_dict': {'w': os.system('echo')}, 'callbacks': {'x': pytorch_lightning.Thing()}}
        let mut pkl = PROTO2.to_vec();
        pkl.push(b'}');
        pkl.extend(binunicode("callbacks"));
        pkl.push(b'}');
        pkl.extend(binunicode("x"));
        pkl.extend(global("pytorch_lightning.callbacks", "ModelCheckpoint"));
        pkl.push(b')');
        pkl.push(0x81); // NEWOBJ
        pkl.push(b'}');
        pkl.push(b'b'); // BUILD with an empty dict state
        pkl.push(b's');
        pkl.push(b's');
        let t_ok = write_temp(
            "callbacks.ckpt",
            &zip_archive(&[("archive/data.pkl", &[pkl.clone(), b".".to_vec()].concat())]),
        );
        let file = TorchFile::open(&t_ok.0).unwrap();
        // The object outside what is read is harmless: an empty state dict (no tensors at the root).
        assert!(file.state_dict().unwrap().is_empty());
        assert_eq!(
            file.get(&["callbacks", "x"]).unwrap(),
            Entry::Dict(vec![]),
            "an object is looked into through its state"
        );
        pkl.truncate(2);
        pkl.push(b'}');
        pkl.extend(binunicode("state_dict"));
        pkl.push(b'}');
        pkl.extend(binunicode("w"));
        pkl.extend(global("os", "system"));
        pkl.extend(binunicode("echo sketchx-test"));
        pkl.push(0x85);
        pkl.push(b'R');
        pkl.push(b's');
        pkl.push(b's');
        pkl.push(b'.');
        let t = write_temp("os.ckpt", &zip_archive(&[("archive/data.pkl", &pkl)]));
        let file = TorchFile::open(&t.0).unwrap();
        match file.state_dict() {
            Err(Error::Checkpoint { key, message, .. }) => {
                assert_eq!(key, "state_dict/w");
                assert!(message.contains("os.system"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        // The same payload as a bare pickle.
        let (_t, file) = open(&pkl, "os_raw.ckpt");
        assert!(matches!(
            file.unwrap().state_dict(),
            Err(Error::Checkpoint { .. })
        ));
    }

    #[test]
    fn hostile_pickles_are_errors_not_panics_or_allocations() {
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "unknown opcode",
                [PROTO2, b"\xff"].concat(),
                "unknown opcode 0xff",
            ),
            ("no stop", [PROTO2, b"}"].concat(), "ends without STOP"),
            ("empty", PROTO2.to_vec(), "ends without STOP"),
            // A 4 GiB string in a tiny file: refused before allocating.
            (
                "huge string",
                [PROTO2, b"X\xff\xff\xff\xff"].concat(),
                "a length of 4294967295",
            ),
            (
                "huge bytes8",
                [PROTO2, b"\x8e\xff\xff\xff\xff\xff\xff\xff\x7f"].concat(),
                "a length of",
            ),
            (
                "huge long4",
                [PROTO2, b"\x8b\xff\xff\xff\x7f"].concat(),
                "a length of",
            ),
            (
                "memo miss",
                [PROTO2, b"j\xff\xff\xff\xff."].concat(),
                "never stored",
            ),
            ("underflow", [PROTO2, b"s."].concat(), "stack underflow"),
            (
                "pop across mark",
                [PROTO2, b"N(0."].concat(),
                "across a MARK",
            ),
            ("setitem on list", [PROTO2, b"]NNs."].concat(), "not a dict"),
            ("protocol 9", b"\x80\x09.".to_vec(), "protocol 9"),
            ("ext", [PROTO2, b"\x82\x01."].concat(), "extension"),
            ("persid text", [PROTO2, b"Pfoo\n."].concat(), "PERSID"),
            (
                "long line",
                [PROTO2, b"c", &vec![b'a'; 70_000], b"\n"].concat(),
                "longer than 64 KiB",
            ),
        ];
        for (what, bytes, expect) in cases {
            let (_t, r) = open(&bytes, "hostile.ckpt");
            let m = malformed_message(r);
            assert!(m.contains(expect), "{what}: {m}");
        }
        // A memo index of 2^32 - 1 stores one entry, not a 4-billion-slot table.
        let (_t, r) = open(
            &[PROTO2, b"Nr\xff\xff\xff\xffj\xff\xff\xff\xff."].concat(),
            "memo.ckpt",
        );
        assert_eq!(r.unwrap().get(&[]).unwrap(), Entry::None);
    }

    #[test]
    fn deep_nesting_and_sharing_cost_no_recursion_or_copies() {
        // 200 000 nested lists: no recursion anywhere (reading, describing, dropping).
        let mut pkl = PROTO2.to_vec();
        pkl.extend(std::iter::repeat_n(b']', 200_000));
        pkl.extend(std::iter::repeat_n(b'a', 199_999));
        pkl.push(b'.');
        let (_t, r) = open(&pkl, "deep.ckpt");
        assert_eq!(r.unwrap().get(&[]).unwrap(), Entry::List(1));
        // A list appended to itself, then DUP'd 100 000 times: shared, not copied.
        let mut pkl = [PROTO2, b"]q\x00h\x00a"].concat();
        pkl.extend(std::iter::repeat_n(b'2', 100_000));
        pkl.extend(std::iter::repeat_n(b'0', 100_000));
        pkl.push(b'.');
        let (_t, r) = open(&pkl, "cycle.ckpt");
        assert_eq!(r.unwrap().get(&[]).unwrap(), Entry::List(1));
        // A chain of dicts as deep as the unwrap limit allows is followed; walking into a list is an error.
        let (_t, r) = open(&[PROTO2, b"}X\x01\x00\x00\x00a]s."].concat(), "walk.ckpt");
        let file = r.unwrap();
        assert!(
            matches!(file.get(&["a", "b"]), Err(Error::Checkpoint { ref key, .. }) if key == "a")
        );
        assert!(matches!(file.get(&["zz"]), Err(Error::Checkpoint { ref key, .. }) if key == "zz"));
    }

    #[test]
    fn refuses_damaged_zips() {
        let ok = zip_archive(&[("a/data.pkl", b"\x80\x02N.")]);
        let (_t, r) = open(&ok, "ok.zip");
        assert_eq!(r.unwrap().get(&[]).unwrap(), Entry::None);
        // Truncated: no end record.
        let (_t, r) = open(&ok[..ok.len() - 10], "trunc.zip");
        assert!(malformed_message(r).contains("end-of-central-directory"));
        // An entry count that cannot fit the directory.
        let mut lie = ok.clone();
        let n = lie.len();
        lie[n - 12..n - 10].copy_from_slice(&0xfffeu16.to_le_bytes());
        let (_t, r) = open(&lie, "lie.zip");
        assert!(malformed_message(r).contains("entries"));
        // A directory offset past the end.
        let mut lie = ok.clone();
        lie[n - 6..n - 2].copy_from_slice(&0x7fff_0000u32.to_le_bytes());
        let (_t, r) = open(&lie, "offset.zip");
        assert!(malformed_message(r).contains("past the end"));
        // No data.pkl.
        let (_t, r) = open(&zip_archive(&[("a/other", b"x")]), "nopkl.zip");
        assert!(malformed_message(r).contains("data.pkl"));
        // Neither zip nor pickle.
        let (_t, r) = open(b"hello world", "text.ckpt");
        assert!(malformed_message(r).contains("not a PyTorch checkpoint"));
    }

    #[test]
    fn unknown_storage_types_are_unsupported() {
        let tensors = [("a", tensor("0", "QInt8Storage", 4, 0, &[4], &[1]))];
        let t = checkpoint(&tensors, &[("0", vec![0; 4])], "q.ckpt");
        match TorchFile::open(&t.0) {
            Err(Error::UnsupportedModel { message, .. }) => {
                assert!(message.contains("torch.QInt8Storage"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reads_the_legacy_format() {
        // magic, protocol, sys_info, data pickle ({'w': tensor}), keys (['k']), then the storage.
        let mut f = Vec::new();
        f.extend(PROTO2);
        f.push(0x8a);
        f.push(10);
        f.extend(LEGACY_MAGIC);
        f.push(b'.');
        f.extend(PROTO2);
        f.extend(b"M\xe9\x03.");
        f.extend(PROTO2);
        f.push(b'}');
        f.extend(binunicode("little_endian"));
        f.push(0x88);
        f.push(b's');
        f.push(b'.');
        f.extend(PROTO2);
        f.push(b'}');
        f.extend(binunicode("w"));
        f.extend(tensor("k", "FloatStorage", 3, 0, &[3], &[1]));
        f.push(b's');
        f.push(b'.');
        f.extend(PROTO2);
        f.push(b']');
        f.extend(binunicode("k"));
        f.push(b'a');
        f.push(b'.');
        f.extend(3u64.to_le_bytes());
        f.extend(f32_bytes(&[1.0, 2.0, 3.0]));
        let (_t, r) = open(&f, "legacy.pt");
        let sd = r.unwrap().state_dict().unwrap();
        assert_eq!(
            sd.tensor("w").unwrap().to_vec1::<f32>().unwrap(),
            vec![1.0, 2.0, 3.0]
        );
        // The same with its data cut short.
        let (_t, r) = open(&f[..f.len() - 4], "legacy_short.pt");
        assert!(malformed_message(r).contains("past the end of the file"));
    }

    #[test]
    fn reads_deflated_entries_and_big_endian_data() {
        let data: Vec<f32> = (0..64).map(|i| i as f32 * 0.5).collect();
        let mut pkl = PROTO2.to_vec();
        pkl.push(b'}');
        pkl.extend(binunicode("w"));
        pkl.extend(tensor("0", "FloatStorage", 64, 0, &[8, 8], &[8, 1]));
        pkl.extend(b"s.");
        let le = f32_bytes(&data);
        let archive = zip_archive_with(&[("x/data.pkl", &pkl), ("x/data/0", &le)], true);
        let (_t, r) = open(&archive, "deflated.pt");
        let sd = r.unwrap().state_dict().unwrap();
        let w = sd.tensor("w").unwrap().flatten_all().unwrap();
        assert_eq!(w.to_vec1::<f32>().unwrap(), data);
        // The same values stored big-endian, as torch writes them on such machines.
        let be: Vec<u8> = data.iter().flat_map(|x| x.to_be_bytes()).collect();
        let archive = zip_archive(&[
            ("x/data.pkl", &pkl),
            ("x/byteorder", b"big"),
            ("x/data/0", &be),
        ]);
        let (_t, r) = open(&archive, "big.pt");
        let sd = r.unwrap().state_dict().unwrap();
        let w = sd
            .load("w", DType::F32, &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap();
        assert_eq!(w.to_vec1::<f32>().unwrap(), data);
        // A deflated entry claiming far more than deflate can hold is refused before inflating.
        let mut lie = zip_archive_with(&[("x/data.pkl", &pkl)], true);
        let cd = lie.len() - 22 - (46 + "x/data.pkl".len());
        lie[cd + 24..cd + 28].copy_from_slice(&u32::MAX.to_le_bytes());
        let (_t, r) = open(&lie, "bomb.pt");
        assert!(malformed_message(r).contains("more than deflate can"));
    }
}
