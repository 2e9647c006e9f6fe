//! Reading safetensors weights straight into the buffers of the tensors they become.
//!
//! candle's `VarBuilder::from_mmaped_safetensors` maps the file and copies every tensor out of the map into a new
//! buffer (plus a second buffer when the dtype changes); the mapped pages count in the process's resident memory
//! until the file is unmapped, so loading the 3.4 GB UNet peaked at twice its size. [`SafetensorsFile`] maps nothing:
//! it reads and validates the header once (with the `safetensors` crate's own checks, plus the file's length), and
//! each tensor a model asks for is read with positional reads (`pread`) directly into the uninitialised buffer of
//! its final tensor, in 8 MiB pieces that run in parallel on rayon's pool. On Linux each piece of the buffer is
//! first populated with `madvise(MADV_POPULATE_WRITE)`, which fills in its pages in one call instead of one page
//! fault per 4 KiB page (the largest cost of loading: the kernel must hand out and zero 5.3 GB of fresh pages).
//! A dtype conversion (f32, f16, bf16 to one another, e.g. f32 files loaded as f16) reads each piece into a small
//! scratch buffer and converts it into the final buffer with `half`'s slice conversions (F16C where the CPU has
//! it), also in parallel; the results are bit-identical to candle's `to_dtype`. Other dtypes are read as stored and
//! converted by candle.
//!
//! Only tensors a model asks for are read (the VAE's encoder, for instance, never is), and the file is closed when
//! the [`candle_nn::VarBuilder`] built on it is dropped, right after its network is constructed. Like candle, this
//! assumes a little-endian machine (safetensors stores little-endian data).

use std::fs::File;
use std::mem::{size_of, MaybeUninit};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use half::{bf16, f16, slice::HalfFloatSliceExt};
use rayon::prelude::*;
use safetensors::tensor::{Metadata, TensorInfo, TensorView};
use safetensors::Dtype;

use crate::error::{Error, Result};
use crate::ops::simd::f32_bits_to_bf16_bits;

/// Bytes read by one parallel task when a tensor is read as stored (tiny under Miri, so that its tests reach the
/// parallel pieces).
const READ_CHUNK_BYTES: usize = if cfg!(miri) { 24 } else { 8 << 20 };
/// Elements converted by one parallel task when a tensor changes dtype (scratch: 256 KiB of f32 per thread).
const CONVERT_CHUNK_ELEMS: usize = if cfg!(miri) { 5 } else { 64 << 10 };
/// The largest header the `safetensors` crate accepts.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// An open safetensors file whose tensors are read on demand; also a [`SimpleBackend`] for
/// [`candle_nn::VarBuilder::from_backend`].
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    file: File,
    /// File offset of the first data byte (8 + header length).
    data_start: u64,
    metadata: Metadata,
}

impl SafetensorsFile {
    /// Opens `path` and reads its header. A missing file is [`Error::MissingFile`]; a header that is not valid
    /// safetensors, or a file shorter or longer than its header says, is [`Error::MalformedFile`] naming the file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::reading(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let malformed = |message: String| Error::malformed(path.display(), message);
        if len < 8 {
            return Err(malformed(format!(
                "{len} bytes is too short for a safetensors file (no header length)"
            )));
        }
        let mut n = [0u8; 8];
        read_exact_into(&file, &mut n, 0).map_err(|e| Error::io(path, e))?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER_BYTES || n > len - 8 {
            return Err(malformed(format!(
                "the header length {n} is impossible for a file of {len} bytes (not safetensors, or truncated)"
            )));
        }
        let mut header = vec![0u8; n as usize];
        read_exact_into(&file, &mut header, 8).map_err(|e| Error::io(path, e))?;
        let metadata = parse_header(&header).map_err(|e| {
            malformed(format!(
                "invalid safetensors header: {e}{}",
                diagnose_header(&header)
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            ))
        })?;
        drop(header);
        let data_start = 8 + n;
        let expected = data_start + metadata.data_len() as u64;
        if expected > len {
            // Name the first tensor whose bytes are not all in the file.
            let past = metadata
                .offset_keys()
                .into_iter()
                .find(|k| {
                    metadata
                        .info(k)
                        .is_some_and(|i| data_start + i.data_offsets.1 as u64 > len)
                })
                .map(|k| format!(" (tensor {k} ends past it)"))
                .unwrap_or_default();
            return Err(malformed(format!(
                "truncated or a lying header: the header describes {expected} bytes but the file has {len}{past}"
            )));
        }
        if expected < len {
            return Err(malformed(format!(
                "{} bytes follow the last tensor (the header describes {expected} bytes, the file has {len})",
                len - expected
            )));
        }
        advise_sequential(&file);
        Ok(Self {
            path: path.to_path_buf(),
            file,
            data_start,
            metadata,
        })
    }

    /// The file this reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The names of all tensors in the file, in file order.
    pub fn names(&self) -> Vec<String> {
        self.metadata.offset_keys()
    }

    /// The file's string metadata (the header's `__metadata__`), if it has any.
    pub fn metadata(&self) -> Option<&std::collections::HashMap<String, String>> {
        self.metadata.metadata().as_ref()
    }

    /// The shape of tensor `name` as stored, without reading it.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.metadata.info(name).map(|i| i.shape.as_slice())
    }

    fn info(&self, name: &str) -> candle_core::Result<&TensorInfo> {
        self.metadata.info(name).ok_or_else(|| {
            candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            }
            .bt()
        })
    }

    /// Reads tensor `name`, converted to `dtype`, onto `device` (read on the CPU, then moved).
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let info = self.info(name)?;
        let offset = self.data_start + info.data_offsets.0 as u64;
        let bytes = info.data_offsets.1 - info.data_offsets.0;
        read_tensor(&self.file, offset, bytes, info.dtype, &info.shape, dtype)
            .map_err(|e| in_tensor(e, name))?
            .to_device(device)
    }
}

/// Names the tensor in a failed read (which stays an I/O error: the engine reports it as `Error::Io` naming the
/// file).
pub(crate) fn in_tensor(e: candle_core::Error, name: &str) -> candle_core::Error {
    match e {
        candle_core::Error::Io(e) => candle_core::Error::Io(std::io::Error::new(
            e.kind(),
            format!("reading tensor {name}: {e}"),
        )),
        e => e,
    }
}

/// Reads the tensor of `shape` stored contiguously, little-endian, as `stored` in the `bytes` bytes at `offset` of
/// `file`, converted to `dtype`, on the CPU: straight into the tensor's buffer for f32/f16/bf16 (converted piece by
/// piece between them) and the other plain types, through candle's conversion for the rest. The caller has checked
/// that `bytes` is the shape's size in `stored` and that the range lies inside the file.
pub(crate) fn read_tensor(
    file: &File,
    offset: u64,
    bytes: usize,
    stored: Dtype,
    shape: &[usize],
    dtype: DType,
) -> candle_core::Result<Tensor> {
    let shape = Shape::from(shape.to_vec());
    let n = shape.elem_count();
    let cpu = &Device::Cpu;
    // As stored, straight into the tensor's buffer.
    macro_rules! raw {
        ($t:ty) => {
            Tensor::from_vec(read_vec::<$t>(file, offset, n)?, shape, cpu)
        };
    }
    // Converted piece by piece into the tensor's buffer.
    macro_rules! converted {
        ($s:ty, $d:ty) => {
            Tensor::from_vec(read_converted::<$s, $d>(file, offset, n)?, shape, cpu)
        };
    }
    match (stored, dtype) {
        (Dtype::F32, DType::F32) => raw!(f32),
        (Dtype::F16, DType::F16) => raw!(f16),
        (Dtype::BF16, DType::BF16) => raw!(bf16),
        (Dtype::F32, DType::F16) => converted!(f32, f16),
        (Dtype::F32, DType::BF16) => converted!(f32, bf16),
        (Dtype::F16, DType::F32) => converted!(f16, f32),
        (Dtype::F16, DType::BF16) => converted!(f16, bf16),
        (Dtype::BF16, DType::F32) => converted!(bf16, f32),
        (Dtype::BF16, DType::F16) => converted!(bf16, f16),
        (stored, _) => {
            let t = match stored {
                Dtype::F32 => raw!(f32),
                Dtype::F16 => raw!(f16),
                Dtype::BF16 => raw!(bf16),
                Dtype::F64 => raw!(f64),
                Dtype::U8 => raw!(u8),
                Dtype::U32 => raw!(u32),
                Dtype::I16 => raw!(i16),
                Dtype::I32 => raw!(i32),
                Dtype::I64 => raw!(i64),
                // Anything else (U16, 8-bit and smaller floats...): the raw bytes through candle's own
                // conversion, which knows these types or refuses them with its error.
                _ => {
                    let data = read_vec::<u8>(file, offset, bytes)?;
                    let view = TensorView::new(stored, shape.dims().to_vec(), &data)?;
                    candle_core::safetensors::Load::load(&view, cpu)
                }
            }?;
            t.to_dtype(dtype)
        }
    }
}

/// Parses a safetensors header into the `safetensors` crate's [`Metadata`], which validates it (offsets contiguous
/// from 0, each tensor's byte size its shape's, no overflow), refusing also a tensor listed twice and a shape whose
/// element count overflows even with a 0 among its dimensions (no data, so the crate accepts it; candle, which
/// multiplies the dimensions one by one, would overflow counting it).
///
/// Not the crate's own deserializer: it reads the tensors as a flattened map, which buffers every value as generic
/// content first (some 40 bytes per shape element: 20 times the length of a dense header, 2 GB for a 100 MB one).
/// This reads each entry straight into its [`TensorInfo`]; memory stays within a few times the header's length.
fn parse_header(header: &[u8]) -> std::result::Result<Metadata, String> {
    use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};

    type Tensors = Vec<(String, TensorInfo)>;
    struct Header(Option<std::collections::HashMap<String, String>>, Tensors);
    impl<'de> Deserialize<'de> for Header {
        fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
            struct Entries;
            impl<'de> Visitor<'de> for Entries {
                type Value = Header;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a JSON object of tensors")
                }
                fn visit_map<A: MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> std::result::Result<Header, A::Error> {
                    let (mut metadata, mut tensors) = (None, Vec::new());
                    while let Some(key) = map.next_key::<String>()? {
                        if key == "__metadata__" {
                            metadata = map.next_value()?;
                        } else {
                            tensors.push((key, map.next_value()?));
                        }
                    }
                    Ok(Header(metadata, tensors))
                }
            }
            d.deserialize_map(Entries)
        }
    }

    let Header(metadata, mut tensors) =
        serde_json::from_slice(header).map_err(|e| e.to_string())?;
    let mut names = std::collections::HashSet::with_capacity(tensors.len());
    for (name, info) in &tensors {
        if !names.insert(name.as_str()) {
            return Err(format!("the tensor {name} is listed twice"));
        }
        let countable = info
            .shape
            .iter()
            .filter(|&&d| d != 0)
            .try_fold(1usize, |n, &d| n.checked_mul(d));
        if countable.is_none() {
            return Err(format!(
                "tensor {name}: the shape {:?} has more elements than this machine can count",
                info.shape
            ));
        }
    }
    drop(names);
    // The crate's validation walks the tensors in offset order.
    tensors.sort_by_key(|(_, info)| info.data_offsets);
    Metadata::new(metadata, tensors).map_err(|e| e.to_string())
}

impl SimpleBackend for SafetensorsFile {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let info = self.info(name)?;
        if info.shape != s.dims() {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: info.shape.clone().into(),
            }
            .bt());
        }
        self.load(name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.metadata.info(name).is_some()
    }
}

/// The first tensor of a header the `safetensors` crate refused whose entry is wrong in itself: an unknown dtype,
/// data offsets that do not hold its shape, or offsets that do not follow the previous tensor's (the crate's own
/// messages do not name the tensor).
fn diagnose_header(header: &[u8]) -> Option<String> {
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header).ok()?;
    let mut entries: Vec<(&String, u64, u64, &serde_json::Value)> = Vec::new();
    for (name, v) in map.iter().filter(|(k, _)| *k != "__metadata__") {
        let offsets = v.get("data_offsets")?.as_array()?;
        let (start, end) = (offsets.first()?.as_u64()?, offsets.get(1)?.as_u64()?);
        entries.push((name, start, end, v));
    }
    entries.sort_by_key(|e| (e.1, e.2));
    let mut next = 0u64;
    for (name, start, end, v) in entries {
        let dtype = v.get("dtype")?.as_str()?;
        let shape: Option<Vec<u64>> = v
            .get("shape")?
            .as_array()?
            .iter()
            .map(serde_json::Value::as_u64)
            .collect();
        let Some(shape) = shape else {
            return Some(format!("tensor {name}: its shape is not a list of sizes"));
        };
        let Ok(dt) = serde_json::from_value::<Dtype>(dtype.into()) else {
            return Some(format!("tensor {name}: unknown dtype {dtype}"));
        };
        let bits = shape
            .iter()
            .try_fold(dt.bitsize() as u64, |a, &d| a.checked_mul(d));
        let needed = bits.map(|b| b.div_ceil(8));
        if needed != end.checked_sub(start) {
            return Some(format!(
                "tensor {name}: {dtype} {shape:?} needs {} bytes, its data_offsets [{start}, {end}] give {}",
                needed.map_or("too many".into(), |n| n.to_string()),
                end as i128 - start as i128
            ));
        }
        if start != next {
            return Some(format!(
                "tensor {name}: its data_offsets [{start}, {end}] do not follow the previous tensor's end {next}"
            ));
        }
        next = end;
    }
    None
}

/// A type for which every bit pattern of its size is a value (the integers and floats tensors hold), so that its
/// memory may be filled with bytes from a file.
trait PlainData: Copy + Send {}
impl PlainData for u8 {}
impl PlainData for u32 {}
impl PlainData for i16 {}
impl PlainData for i32 {}
impl PlainData for i64 {}
impl PlainData for f16 {}
impl PlainData for bf16 {}
impl PlainData for f32 {}
impl PlainData for f64 {}

/// Reads `n` values of `T` stored at `offset` straight into a new vector's buffer, in parallel pieces.
fn read_vec<T: PlainData>(file: &File, offset: u64, n: usize) -> std::io::Result<Vec<T>> {
    let mut v: Vec<T> = Vec::with_capacity(n);
    let chunk_elems = (READ_CHUNK_BYTES / size_of::<T>()).max(1);
    let read_piece = |(i, piece): (usize, &mut [MaybeUninit<T>])| {
        let bytes = std::mem::size_of_val(piece);
        let ptr = piece.as_mut_ptr().cast::<u8>();
        populate(ptr, bytes);
        // SAFETY: `ptr..ptr + bytes` is exactly `piece`, memory of the vector's spare capacity that this task
        // alone may write.
        unsafe {
            read_exact_at(
                file,
                ptr,
                bytes,
                offset + (i * chunk_elems * size_of::<T>()) as u64,
            )
        }
    };
    let spare = &mut v.spare_capacity_mut()[..n];
    if n <= chunk_elems {
        read_piece((0, spare))?;
    } else {
        spare
            .par_chunks_mut(chunk_elems)
            .enumerate()
            .try_for_each(read_piece)?;
    }
    // SAFETY: every one of the first `n` elements was written by `read_exact_at` (it fails unless it filled its
    // whole piece), and `T` is `PlainData`, so any bytes are a valid value.
    unsafe { v.set_len(n) };
    Ok(v)
}

/// A floating-point type that converts to and from f32 slices exactly as candle's `to_dtype` does.
trait Float: PlainData + Default + Sync {
    fn to_f32s(src: &[Self], dst: &mut [f32]);
    fn from_f32s(src: &[f32], dst: &mut [Self]);
}

impl Float for f32 {
    fn to_f32s(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn from_f32s(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src);
    }
}

impl Float for f16 {
    fn to_f32s(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    fn from_f32s(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src);
    }
}

impl Float for bf16 {
    fn to_f32s(src: &[Self], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits(bf16_bits_to_f32_bits(s.to_bits()));
        }
    }
    fn from_f32s(src: &[f32], dst: &mut [Self]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = bf16::from_bits(f32_bits_to_bf16_bits(s.to_bits()));
        }
    }
}

/// `half::bf16::to_f32` without branches, so that the loop over a slice vectorises (half's slice conversion for
/// bf16 is a scalar loop): NaNs keep their payload with the quiet bit set, everything else is a shift.
#[inline]
fn bf16_bits_to_f32_bits(b: u16) -> u32 {
    let nan = (b & 0x7FFF) > 0x7F80;
    (u32::from(b) | if nan { 0x0040 } else { 0 }) << 16
}

thread_local! {
    /// Per-thread scratch space of [`read_converted`]: the stored values, them as f32, and the converted values
    /// (3 x [`CONVERT_CHUNK_ELEMS`] x 4 bytes, allocated once per thread and reused: a fresh buffer per piece would
    /// cost as many page faults as the piece itself).
    static CONVERT_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Views the start of f32 scratch space as `m` values of the float type `T` (f32, f16 or bf16).
fn scratch_as<T: Float>(buf: &mut [f32], m: usize) -> &mut [T] {
    assert!(
        size_of::<T>() <= size_of::<f32>()
            && std::mem::align_of::<T>() <= std::mem::align_of::<f32>()
    );
    assert!(m * size_of::<T>() <= std::mem::size_of_val(buf));
    // SAFETY: the region is inside `buf` (checked above), suitably aligned for `T` (its alignment is at most f32's),
    // initialised, and `T` is a plain float type for which every bit pattern is a value; the returned slice
    // borrows `buf` mutably, so nothing else aliases it.
    unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<T>(), m) }
}

/// Reads `n` values of `S` stored at `offset` and converts them (through f32, as candle does) into a new vector of
/// `D`, in parallel pieces.
fn read_converted<S: Float, D: Float>(
    file: &File,
    offset: u64,
    n: usize,
) -> std::io::Result<Vec<D>> {
    let mut v: Vec<D> = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(CONVERT_CHUNK_ELEMS)
        .enumerate()
        .try_for_each(|(i, piece)| {
            CONVERT_SCRATCH.with_borrow_mut(|buf| {
                buf.resize(3 * CONVERT_CHUNK_ELEMS, 0.0);
                let m = piece.len();
                let (src, rest) = buf.split_at_mut(CONVERT_CHUNK_ELEMS);
                let (mid, dst) = rest.split_at_mut(CONVERT_CHUNK_ELEMS);
                let (src, mid, dst) = (
                    scratch_as::<S>(src, m),
                    &mut mid[..m],
                    scratch_as::<D>(dst, m),
                );
                read_exact_into(
                    file,
                    as_bytes_mut(src),
                    offset + (i * CONVERT_CHUNK_ELEMS * size_of::<S>()) as u64,
                )?;
                S::to_f32s(src, mid);
                D::from_f32s(mid, dst);
                populate(
                    piece.as_mut_ptr().cast::<u8>(),
                    std::mem::size_of_val(piece),
                );
                for (out, &x) in piece.iter_mut().zip(dst.iter()) {
                    out.write(x);
                }
                Ok::<(), std::io::Error>(())
            })
        })?;
    // SAFETY: every piece of the first `n` elements was written element by element above.
    unsafe { v.set_len(n) };
    Ok(v)
}

/// The bytes of a slice of plain data, for filling from a file.
fn as_bytes_mut<T: PlainData>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: the same memory, initialised, with byte alignment; any bytes written through the result are a valid
    // `T` (`PlainData`), and the result borrows `v` mutably, so nothing else aliases it.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// Fills `buf` with the file's bytes at `offset`; fails unless all of them were read.
pub(crate) fn read_exact_into(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    // SAFETY: `buf` is writable memory of `buf.len()` bytes.
    unsafe { read_exact_at(file, buf.as_mut_ptr(), buf.len(), offset) }
}

/// Fills `len` bytes at `dst` with the file's bytes at `offset`; fails unless all of them were read.
///
/// # Safety
///
/// `dst..dst + len` must be memory the caller may write, not read or written by anything else during the call (it
/// may be uninitialised).
#[cfg(unix)]
unsafe fn read_exact_at(file: &File, dst: *mut u8, len: usize, offset: u64) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let mut done = 0;
    while done < len {
        let at = libc::off_t::try_from(offset + done as u64)
            .map_err(|_| std::io::Error::other("file offset too large for this platform"))?;
        // SAFETY: `dst + done .. dst + len` lies inside the caller's writable buffer (this function's contract);
        // `pread` writes at most `len - done` bytes there and reads no Rust memory.
        let r = unsafe {
            libc::pread(
                file.as_raw_fd(),
                dst.add(done).cast::<libc::c_void>(),
                len - done,
                at,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("the file ends before byte {}", offset + len as u64),
            ));
        }
        done += r as usize;
    }
    Ok(())
}

/// Fills `len` bytes at `dst` with the file's bytes at `offset`; fails unless all of them were read.
///
/// # Safety
///
/// As the Unix version: `dst..dst + len` must be memory the caller may write, used by nothing else meanwhile.
#[cfg(not(unix))]
unsafe fn read_exact_at(file: &File, dst: *mut u8, len: usize, offset: u64) -> std::io::Result<()> {
    // SAFETY: the caller's buffer is writable for `len` bytes; zeroing it first makes it initialised, so a byte
    // slice over it is valid.
    let buf = unsafe {
        std::ptr::write_bytes(dst, 0, len);
        std::slice::from_raw_parts_mut(dst, len)
    };
    read_into(file, buf, offset)
}

/// Fills `buf` with the file's bytes at `offset` (positional reads).
#[cfg(windows)]
fn read_into(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match file.seek_read(&mut buf[done..], offset + done as u64) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(r) => done += r,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Fills `buf` with the file's bytes at `offset`. No positional reads on this platform: one reader at a time
/// moves the shared cursor.
#[cfg(not(any(unix, windows)))]
fn read_into(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    static CURSOR: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = CURSOR.lock().unwrap_or_else(|e| e.into_inner());
    let mut f = file;
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(buf)
}

/// Asks the kernel to fault in the whole pages of `ptr..ptr + len` at once (writable), instead of one page fault
/// per page during the read. Only a hint: the memory's contents do not change, and failures are ignored.
#[cfg(all(target_os = "linux", not(miri)))]
fn populate(ptr: *mut u8, len: usize) {
    const MIN_BYTES: usize = 64 << 10;
    const PAGE: usize = 4096;
    if len < MIN_BYTES {
        return;
    }
    let start = (ptr as usize).div_ceil(PAGE) * PAGE;
    let end = (ptr as usize + len) / PAGE * PAGE;
    if end > start {
        // SAFETY: `start..end` lies inside the caller's buffer (whole pages only); MADV_POPULATE_WRITE only
        // allocates missing pages of the mapping (zero-filled for fresh anonymous memory, which is what the
        // buffer holds anyway) and never changes existing contents. Errors (e.g. kernels before 5.14) are ignored.
        unsafe {
            libc::madvise(
                start as *mut libc::c_void,
                end - start,
                libc::MADV_POPULATE_WRITE,
            );
        }
    }
}

/// Miri has no `madvise`; elsewhere there is no `MADV_POPULATE_WRITE`.
#[cfg(any(not(target_os = "linux"), miri))]
fn populate(_ptr: *mut u8, _len: usize) {}

/// Tells the kernel the file is read front to back (a larger readahead window when it is not cached).
#[cfg(all(target_os = "linux", not(miri)))]
fn advise_sequential(file: &File) {
    use std::os::unix::io::AsRawFd;
    // SAFETY: a hint on a valid open descriptor; no memory is involved. Failure only loses the hint.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
    }
}

#[cfg(any(not(target_os = "linux"), miri))]
fn advise_sequential(_file: &File) {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The branch-free bf16 conversions equal half's (which candle's `to_dtype` uses) bit for bit.
    #[test]
    #[cfg_attr(miri, ignore = "millions of conversions; no unsafe code")]
    fn bf16_conversions_match_half() {
        for b in 0..=u16::MAX {
            assert_eq!(
                bf16_bits_to_f32_bits(b),
                bf16::from_bits(b).to_f32().to_bits(),
                "{b:#06x}"
            );
        }
        let mut edge = vec![
            0u32,
            0x8000_0000,
            0x7F80_0000,
            0xFF80_0000,
            0x7F80_0001,
            0x7FC0_0000,
            0xFFFF_FFFF,
            0x7F7F_FFFF,
            0x0000_0001,
            0x807F_FFFF,
            0x3F80_8000,
            0x3F81_8000,
            0x3F80_8001,
            0x3F80_7FFF,
            0x7F7F_8000,
        ];
        // A fixed-seed xorshift over the whole u32 range: every sign, exponent and rounding case.
        let mut x = 0x9E37_79B9u32;
        for _ in 0..2_000_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            edge.push(x);
        }
        for &x in &edge {
            assert_eq!(
                f32_bits_to_bf16_bits(x),
                bf16::from_f32(f32::from_bits(x)).to_bits(),
                "{x:#010x}"
            );
        }
    }

    /// A file in a fresh temporary directory, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, bytes: &[u8]) -> Self {
            let dir =
                std::env::temp_dir().join(format!("sketchx-weights-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("w.safetensors");
            std::fs::write(&path, bytes).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(self.0.parent().unwrap());
        }
    }

    /// A safetensors file of `(name, dtype, shape, data)` in that order, without alignment padding.
    fn safetensors_bytes(tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        let mut offset = 0;
        for (name, dtype, shape, data) in tensors {
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + data.len()]}),
            );
            offset += data.len();
        }
        let header = serde_json::Value::Object(header).to_string();
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        for (_, _, _, data) in tensors {
            bytes.extend_from_slice(data);
        }
        bytes
    }

    fn le<T: Copy, const N: usize>(values: &[T], to_bytes: impl Fn(T) -> [u8; N]) -> Vec<u8> {
        values.iter().flat_map(|&v| to_bytes(v)).collect()
    }

    /// The unsafe paths of the reader: positional reads into uninitialised vectors (one piece, and several
    /// parallel pieces: the pieces are tiny under Miri), scratch space viewed as f16 and bf16, tensors at odd
    /// offsets. Every tensor read into every float dtype equals half's conversion of the stored values.
    #[test]
    fn reads_every_float_dtype_into_every_other_in_pieces() {
        let values: Vec<f32> = (0..37)
            .map(|i| (i as f32 - 18.0) * 0.37)
            .chain([f32::NAN, f32::INFINITY, -0.0, 1e-40])
            .collect();
        let halves: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
        let brains: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
        let n = values.len();
        let file = TempFile::new(
            "dtypes",
            &safetensors_bytes(&[
                ("odd", "U8", vec![3], vec![1, 2, 3]),
                ("f32", "F32", vec![n], le(&values, f32::to_le_bytes)),
                ("f16", "F16", vec![n, 1], le(&halves, f16::to_le_bytes)),
                ("bf16", "BF16", vec![1, n], le(&brains, bf16::to_le_bytes)),
            ]),
        );
        let st = SafetensorsFile::open(&file.0).unwrap();
        let cpu = &Device::Cpu;
        let as_f32 = |t: Tensor| t.flatten_all().unwrap().to_dtype(DType::F32).unwrap();
        for name in ["f32", "f16", "bf16"] {
            // The stored values, widened exactly to f32.
            let stored: Vec<f32> = match name {
                "f32" => values.clone(),
                "f16" => halves.iter().map(|v| v.to_f32()).collect(),
                _ => brains.iter().map(|v| v.to_f32()).collect(),
            };
            for (dtype, round) in [
                (DType::F32, (|v| v) as fn(f32) -> f32),
                (DType::F16, |v| f16::from_f32(v).to_f32()),
                (DType::BF16, |v| bf16::from_f32(v).to_f32()),
            ] {
                let t = st.load(name, dtype, cpu).unwrap();
                assert_eq!(t.dtype(), dtype);
                assert_eq!(t.dims(), st.shape(name).unwrap());
                let got = as_f32(t).to_vec1::<f32>().unwrap();
                for (i, (g, s)) in got.iter().zip(&stored).enumerate() {
                    let want = round(*s);
                    assert!(
                        g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                        "{name} as {dtype:?}[{i}]: {g} != {want}"
                    );
                }
            }
        }
        let odd = st.load("odd", DType::U8, cpu).unwrap();
        assert_eq!(odd.to_vec1::<u8>().unwrap(), [1, 2, 3]);
    }

    /// A read that runs past the end of the file fails (the uninitialised buffer is never handed out), in one
    /// piece, in parallel pieces and while converting.
    #[test]
    fn reads_past_the_end_fail() {
        let file = TempFile::new("eof", &[7u8; 40]);
        let f = File::open(&file.0).unwrap();
        for n in [1, 10, 11, 100] {
            assert_eq!(read_vec::<f32>(&f, 0, n).is_ok(), n * 4 <= 40, "{n}");
            assert_eq!(
                read_converted::<f16, f32>(&f, 2, n).is_ok(),
                2 + n * 2 <= 40,
                "{n}"
            );
        }
        let e = read_vec::<u8>(&f, 41, 1).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    /// A shape whose element count overflows, with a 0 among its dimensions (so no data, and the header's own
    /// checks pass), is refused naming the tensor: candle would overflow counting it.
    #[test]
    fn uncountable_shapes_are_refused() {
        let big = 1usize << (usize::BITS / 2 + 1);
        let file = TempFile::new(
            "shape",
            &safetensors_bytes(&[("t", "F32", vec![0, big, big], vec![])]),
        );
        match SafetensorsFile::open(&file.0) {
            Err(Error::MalformedFile { path, message }) => {
                assert_eq!(path, file.0.display().to_string());
                assert!(message.contains("tensor t"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }
}
