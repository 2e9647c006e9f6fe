//! CPU plumbing shared by the kernels: the thread count handed to the `gemm` crate, a raw pointer that parallel
//! tasks write disjoint parts of, access to a tensor's f32 storage, fresh output buffers, and which SIMD features
//! this CPU has (detected once; tests can force the portable paths).

use std::sync::OnceLock;

use candle_core::{CpuStorage, Layout};

/// The `gemm` crate's parallelism over candle's thread count.
pub(crate) fn parallelism() -> gemm::Parallelism {
    let t = candle_core::utils::get_num_threads();
    if t > 1 {
        gemm::Parallelism::Rayon(t)
    } else {
        gemm::Parallelism::None
    }
}

/// An op's input values read in place: f32, or bf16 bit patterns (a producer's result rounded already, for a
/// consumer that rounds it to bf16 anyway).
#[derive(Clone, Copy)]
pub(crate) enum Values<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl<'a> Values<'a> {
    /// The contiguous values of `s` (layout `l`), f32 or bf16; `what` names them in the error otherwise.
    pub(crate) fn of(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<Self> {
        match s {
            CpuStorage::BF16(v) => {
                let Some((a, b)) = l.contiguous_offsets() else {
                    candle_core::bail!("{what}: expected a contiguous tensor");
                };
                Ok(Self::Bf16(
                    half::slice::HalfFloatSliceExt::reinterpret_cast(&v[a..b]),
                ))
            }
            _ => Ok(Self::F32(contiguous_f32(s, l, what)?)),
        }
    }

    /// Entries `range`.
    pub(crate) fn slice(self, range: std::ops::Range<usize>) -> Self {
        match self {
            Self::F32(x) => Self::F32(&x[range]),
            Self::Bf16(x) => Self::Bf16(&x[range]),
        }
    }

    /// How many values.
    pub(crate) fn len(self) -> usize {
        match self {
            Self::F32(x) => x.len(),
            Self::Bf16(x) => x.len(),
        }
    }
}

/// A raw pointer shared by parallel tasks, each of which writes only its own part of the pointee.
pub(crate) struct SendPtr<T>(pub(crate) *mut T);

// SAFETY: the users write disjoint parts of the pointee (see each use) and the pointee outlives the tasks.
unsafe impl<T> Sync for SendPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Send for SendPtr<T> {}

/// The elements of a contiguous f32 CPU tensor; `what` names it in the error otherwise.
pub(crate) fn contiguous_f32<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: expected f32");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

/// Runs `f` on one of rayon's pool threads while the caller waits (in place on a pool thread). A network's forward
/// pass runs this way: its parallel kernels then split their work from a pool thread, where from any other thread
/// each kernel hands its work to the pool and sleeps until it is done, two thread wake-ups per kernel and
/// thousands per step.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// A zeroed buffer of `len` f32 values for an operation's output.
///
/// Buffers of tens of megabytes (a VAE decoder's activations at 512x512) come from the allocator as fresh maps each
/// time and used to fault in 4 KiB at a time: a fifth of a decode went to the kernel. They are marked for
/// transparent huge pages before anything touches them ([`advise_huge_pages`]).
pub(crate) fn output_f32(len: usize) -> Vec<f32> {
    let mut v = output_uninit_f32(len);
    zero_parallel(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: the `len` values were just zeroed.
    unsafe { v.set_len(len) };
    v
}

/// Zeroes `values`, in parallel when they are many. The allocator's zeroed memory (`calloc`) is cleared by one
/// thread whenever it reuses freed memory, which an op's output usually is: the other threads then wait.
pub(crate) fn zero_parallel<E: Send>(values: &mut [std::mem::MaybeUninit<E>]) {
    use rayon::prelude::*;
    // Bytes per task: enough to amortise a task, few enough to spread a few megabytes over the threads.
    const CHUNK_BYTES: usize = 1 << 18;
    let per = (CHUNK_BYTES / std::mem::size_of::<E>().max(1)).max(1);
    let zero = |c: &mut [std::mem::MaybeUninit<E>]| {
        // SAFETY: `c` is valid for writes of its length; all-zero bytes are what the callers want.
        unsafe { std::ptr::write_bytes(c.as_mut_ptr(), 0, c.len()) }
    };
    if values.len() <= per {
        zero(values);
    } else {
        values.par_chunks_mut(per).for_each(zero);
    }
}

/// An empty buffer with room for `len` f32 values, for an operation that writes all of them through its pointer
/// before `set_len` (no zeroing pass); hinted like [`output_f32`].
pub(crate) fn output_uninit_f32(len: usize) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(len);
    advise_huge_pages(v.as_mut_ptr().cast(), len * std::mem::size_of::<f32>());
    v
}

/// A fresh output vector whose values can start on a 64-byte boundary. candle's tensors own plain vectors, 16-byte
/// aligned at best (and 16 bytes past a page when large), and an AMX tile row or a vector that straddles two cache
/// lines loads or stores at up to half speed. A lined output holds [`line_pad`] values more and its values start at
/// the first boundary ([`line_start`]); the op returns the whole vector, one-dimensional, and [`lined_view`] turns
/// the result into the view of its values (no copy). Unlined, it is a plain output of exactly its values.
pub(crate) struct Out<E> {
    vec: Vec<E>,
    start: usize,
    len: usize,
    lined: bool,
}

/// Element types of which all-zero bytes are a valid value (zero), for [`Out::zeroed`].
///
/// # Safety
/// All-zero bytes must be a valid value of the type.
pub(crate) unsafe trait ZeroBytes {}
// SAFETY: all-zero bytes are 0.0 in f32 and in bf16.
unsafe impl ZeroBytes for f32 {}
// SAFETY: as above.
unsafe impl ZeroBytes for half::bf16 {}

/// Values a lined output holds beyond its own.
pub(crate) const fn line_pad<E>() -> usize {
    64 / std::mem::size_of::<E>() - 1
}

/// Index of the first element at `p` on a 64-byte boundary (at most [`line_pad`]).
pub(crate) fn line_start<E>(p: *const E) -> usize {
    p.align_offset(64).min(line_pad::<E>())
}

impl<E: Copy + Default + Send> Out<E> {
    /// Room for `len` values, never initialised (the op writes them all before [`Self::finish`]).
    pub(crate) fn uninit(len: usize, lined: bool) -> Self {
        Self::around(Vec::with_capacity(Self::room(len, lined)), len, lined)
    }

    /// Room for `len` values, all zero (cleared in parallel, [`zero_parallel`]).
    pub(crate) fn zeroed(len: usize, lined: bool) -> Self
    where
        E: ZeroBytes,
    {
        let room = Self::room(len, lined);
        let mut out = Self::uninit(len, lined);
        zero_parallel(&mut out.vec.spare_capacity_mut()[..room]);
        // SAFETY: the `room` values were just zeroed, and all-zero bytes are a valid `E` (`ZeroBytes`).
        unsafe { out.vec.set_len(room) };
        out
    }

    /// The vector's length for `len` values: with the pad for a lined output.
    fn room(len: usize, lined: bool) -> usize {
        if lined {
            len + line_pad::<E>()
        } else {
            len
        }
    }

    /// The output in `vec` (room for [`Self::room`] values), hinted like [`output_f32`].
    fn around(mut vec: Vec<E>, len: usize, lined: bool) -> Self {
        advise_huge_pages(
            vec.as_mut_ptr().cast(),
            vec.capacity() * std::mem::size_of::<E>(),
        );
        let start = if lined { line_start(vec.as_ptr()) } else { 0 };
        Self {
            vec,
            start,
            len,
            lined,
        }
    }

    /// All the vector's values: with the pad for a lined output.
    fn capacity(&self) -> usize {
        Self::room(self.len, self.lined)
    }

    /// The values, as initialised memory to write (an output made uninitialised is zeroed first).
    pub(crate) fn values(&mut self) -> &mut [E] {
        let cap = self.capacity();
        // Within the capacity: the vector does not move, so `start` stays on the line.
        self.vec.resize(cap, E::default());
        &mut self.vec[self.start..self.start + self.len]
    }

    /// The first value's address.
    pub(crate) fn ptr(&mut self) -> *mut E {
        // SAFETY: `start + len` lies within the capacity.
        unsafe { self.vec.as_mut_ptr().add(self.start) }
    }

    /// The values, as memory to write (an output made uninitialised, before [`Self::values`]).
    pub(crate) fn spare(&mut self) -> &mut [std::mem::MaybeUninit<E>] {
        let (start, len) = (self.start, self.len);
        &mut self.vec.spare_capacity_mut()[start..start + len]
    }

    /// The vector and the shape the op returns: `shape` itself, or for a lined output the whole vector (see
    /// [`lined_view`]).
    ///
    /// # Safety
    /// All `len` values must have been written (through [`Self::ptr`] or [`Self::spare`]; those of
    /// [`Self::values`] are).
    pub(crate) unsafe fn finish(
        mut self,
        shape: candle_core::Shape,
    ) -> (Vec<E>, candle_core::Shape) {
        let cap = self.capacity();
        if self.vec.len() < cap {
            for i in (0..self.start).chain(self.start + self.len..cap) {
                self.vec.spare_capacity_mut()[i].write(E::default());
            }
            // SAFETY: the contract (the values) and the pad written just above.
            unsafe { self.vec.set_len(cap) };
        }
        let shape = if self.lined { cap.into() } else { shape };
        (self.vec, shape)
    }
}

/// The values of a lined op result `t` (see [`Out`]) as a tensor of `shape`: a view from the first 64-byte
/// boundary, sharing the storage.
pub(crate) fn lined_view(
    t: &candle_core::Tensor,
    shape: &[usize],
) -> candle_core::Result<candle_core::Tensor> {
    use candle_core::{Storage, Tensor};
    let len: usize = shape.iter().product();
    let start = {
        let (storage, _) = t.storage_and_layout();
        match &*storage {
            Storage::Cpu(CpuStorage::F32(v)) => line_start(v.as_ptr()),
            Storage::Cpu(CpuStorage::BF16(v)) => line_start(v.as_ptr()),
            _ => candle_core::bail!("lined output: expected f32 or bf16 on the CPU"),
        }
    };
    Tensor::narrow(t, 0, start, len)?.reshape(shape)
}

/// Scratch memory kept between an operation's calls, each of which overwrites what it uses: a fresh buffer of
/// megabytes is zeroed (or faulted in) at every call. A call that finds it taken (another thread's operation
/// meanwhile) uses a fresh one.
pub(crate) struct Kept<T>(std::sync::Mutex<T>);

impl<T: Default> Kept<T> {
    /// Kept memory starting as `value` (e.g. empty vectors).
    pub(crate) const fn new(value: T) -> Self {
        Self(std::sync::Mutex::new(value))
    }

    /// `f` on the kept value (taken out meanwhile, and put back afterwards), or on a fresh default one when it is
    /// taken.
    pub(crate) fn take_with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        let mut kept = self.0.try_lock().ok();
        let mut value = kept.as_deref_mut().map(std::mem::take).unwrap_or_default();
        let r = f(&mut value);
        if let Some(kept) = kept.as_deref_mut() {
            *kept = value;
        }
        r
    }
}

impl<E: Copy + Default> Kept<Vec<E>> {
    /// `f` on `len` values of the kept buffer (what a previous call left in it, or default values where it had to
    /// grow), starting on a 64-byte boundary, so that the rows of a product's operand load as whole cache lines.
    pub(crate) fn with<R>(&self, len: usize, f: impl FnOnce(&mut [E]) -> R) -> R {
        self.take_with(|buf| f(line_aligned(buf, len)))
    }
}

/// `len` values of `buf` (grown as [`line_offset`] grows it) that start on a 64-byte boundary: a tile or vector
/// load of an aligned row then reads whole cache lines instead of straddling two. The same values come back while
/// `buf` does not grow.
pub(crate) fn line_aligned<E: Copy + Default>(buf: &mut Vec<E>, len: usize) -> &mut [E] {
    let off = line_offset(buf, len);
    &mut buf[off..off + len]
}

/// Makes `len` values fit in `buf` from its first 64-byte boundary, and returns that boundary's index. A `buf` too
/// short is emptied and grown with default values (what it held is not copied: the callers write what they use).
pub(crate) fn line_offset<E: Copy + Default>(buf: &mut Vec<E>, len: usize) -> usize {
    let pad = 64 / std::mem::size_of::<E>().max(1);
    if buf.len() < len + pad {
        buf.clear();
        buf.resize(len + pad, E::default());
    }
    buf.as_ptr().align_offset(64).min(pad)
}

/// Asks the kernel to back the whole 2 MiB pages inside `ptr..ptr + len` with huge pages when they are first
/// touched (one fault and one TLB entry per 2 MiB instead of 512). Only a hint, on regions of at least 32 MiB: the
/// memory's contents do not change, and failures (or a kernel without transparent huge pages) are ignored.
#[cfg(all(target_os = "linux", not(miri)))]
pub(crate) fn advise_huge_pages(ptr: *mut u8, len: usize) {
    const HUGE: usize = 2 << 20;
    // glibc serves requests above 32 MiB (its largest mmap threshold) from fresh maps; smaller ones may reuse
    // heap memory that is faulted in already, where the hint would only split the heap's mapping.
    const MIN_LEN: usize = 32 << 20;
    if len < MIN_LEN {
        return;
    }
    let start = (ptr as usize).next_multiple_of(HUGE);
    let end = (ptr as usize + len) / HUGE * HUGE;
    if end > start {
        // SAFETY: `start..end` lies inside the caller's buffer; MADV_HUGEPAGE only changes how the kernel backs
        // the range's pages, never their contents.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

/// Miri has no `madvise`; other systems have no such hint.
#[cfg(any(not(target_os = "linux"), miri))]
pub(crate) fn advise_huge_pages(_ptr: *mut u8, _len: usize) {}

/// The SIMD features the kernels use.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Features {
    /// AVX2 and FMA (the element-wise helpers' 256-bit path).
    pub avx2_fma: bool,
    /// AVX-512 F, BW and VL (the f32 GEMM micro-kernel, the element-wise helpers' 512-bit path).
    pub avx512: bool,
    /// AVX-512 BF16 on top of [`Features::avx512`] (the bf16 GEMM micro-kernel and conversions).
    pub avx512_bf16: bool,
    /// AMX-TILE and AMX-BF16 on top of [`Features::avx512_bf16`], granted by the OS (the bf16 product on
    /// tiles, [`super::amx`]).
    pub amx_bf16: bool,
}

/// This CPU's features, detected once; none on other architectures, and none while a test forces the portable
/// paths ([`force_portable`]).
pub(crate) fn features() -> Features {
    #[cfg(test)]
    if FORCE_PORTABLE.load(std::sync::atomic::Ordering::Relaxed) {
        return Features::default();
    }
    static DETECTED: OnceLock<Features> = OnceLock::new();
    *DETECTED.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Features {
    use std::arch::is_x86_feature_detected as has;
    let avx512 = has!("avx512f") && has!("avx512bw") && has!("avx512vl");
    Features {
        avx2_fma: has!("avx2") && has!("fma"),
        avx512,
        avx512_bf16: avx512 && has!("avx512bf16"),
        amx_bf16: avx512 && has!("avx512bf16") && super::amx::detect(),
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Features {
    Features::default()
}

#[cfg(test)]
static FORCE_PORTABLE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Held while a test forces the portable paths, or needs the detected ones throughout ([`detected_only`]).
#[cfg(test)]
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `f` while no test forces the portable paths: for tests whose expectations depend on the path that runs
/// (bit-exact comparisons of two kernels, or a bound chosen from the CPU's features).
#[cfg(test)]
pub(crate) fn detected_only<T>(f: impl FnOnce() -> T) -> T {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    f()
}

/// Runs `f` with every kernel on its portable path, as on a CPU without AVX2 or AVX-512, so that one machine tests
/// both paths. Tests that use it run one at a time; any other test running meanwhile only gets slower.
#[cfg(test)]
pub(crate) fn force_portable<T>(f: impl FnOnce() -> T) -> T {
    use std::sync::atomic::Ordering;
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            FORCE_PORTABLE.store(false, Ordering::Relaxed);
        }
    }
    FORCE_PORTABLE.store(true, Ordering::Relaxed);
    let _reset = Reset;
    f()
}

/// A row stride of at least `len` values of `bytes` each (a power of two up to 64) that is an odd number of 64-byte
/// lines, so that 16 consecutive rows fall into 16 different L1 sets: rows a multiple of 4 KiB apart (1024 f32
/// attention scores) all map to one of the 64 sets and evict each other as a tile of them is written or read.
pub(crate) fn padded_stride(len: usize, bytes: usize) -> usize {
    let lines = (len * bytes).div_ceil(64);
    (lines | 1) * 64 / bytes
}

/// Whether the values of `t` (a contiguous CPU tensor) start on a 64-byte boundary.
#[cfg(test)]
pub(crate) fn starts_on_line(t: &candle_core::Tensor) -> bool {
    use candle_core::Storage;
    let (storage, layout) = t.storage_and_layout();
    let start = layout.start_offset();
    let addr = match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => v[start..].as_ptr() as usize,
        Storage::Cpu(CpuStorage::BF16(v)) => v[start..].as_ptr() as usize,
        _ => return false,
    };
    addr % 64 == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// A lined output's view holds exactly the values written, from a cache line, in f32 and bf16 and at every
    /// length (the pad around them never shows); an unlined one is exactly its values.
    #[test]
    fn lined_outputs_are_their_values_from_a_line() {
        for len in [0usize, 1, 15, 16, 17, 1000, 100_003] {
            let mut out = Out::<f32>::uninit(len, true);
            for (i, v) in out.spare().iter_mut().enumerate() {
                v.write(i as f32 + 0.5);
            }
            // SAFETY: every value was written just above.
            let (v, shape) = unsafe { out.finish((len,).into()) };
            assert_eq!(shape.dims(), &[len + line_pad::<f32>()]);
            let t = Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
            let view = lined_view(&t, &[len]).unwrap();
            assert!(starts_on_line(&view), "f32 {len}");
            let want: Vec<f32> = (0..len).map(|i| i as f32 + 0.5).collect();
            assert_eq!(view.to_vec1::<f32>().unwrap(), want);

            let mut out = Out::<half::bf16>::uninit(len, true);
            for (i, v) in out.spare().iter_mut().enumerate() {
                v.write(half::bf16::from_f32((i % 256) as f32));
            }
            // SAFETY: as above.
            let (v, shape) = unsafe { out.finish((len,).into()) };
            let t = Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
            let view = lined_view(&t, &[len])
                .unwrap()
                .to_dtype(candle_core::DType::F32)
                .unwrap();
            let want: Vec<f32> = (0..len).map(|i| (i % 256) as f32).collect();
            assert_eq!(view.to_vec1::<f32>().unwrap(), want, "bf16 {len}");

            let mut out = Out::<f32>::uninit(len, false);
            out.spare().fill(std::mem::MaybeUninit::new(1.0));
            // SAFETY: as above.
            let (v, shape) = unsafe { out.finish((len,).into()) };
            assert_eq!((v.len(), shape.dims()), (len, &[len][..]));
        }
    }

    #[test]
    fn padded_strides_are_odd_lines() {
        for bytes in [2, 4] {
            for len in [1, 40, 77, 320, 1000, 1024, 2048, 4096, 5120, 10240] {
                let s = padded_stride(len, bytes);
                assert!(
                    s >= len && (s * bytes).is_multiple_of(64),
                    "{len} x {bytes}: {s}"
                );
                assert_eq!(s * bytes / 64 % 2, 1, "{len} x {bytes}: {s}");
                assert!(s * bytes < len * bytes + 128, "{len} x {bytes}: {s}");
            }
        }
    }
}
