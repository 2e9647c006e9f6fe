//! CPU plumbing shared by the kernels: the thread count handed to the `gemm` crate, a raw pointer that parallel
//! tasks write disjoint parts of, access to a tensor's f32 storage, and which SIMD features this CPU has
//! (detected once; tests can force the portable paths).

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

/// The SIMD features the kernels use.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Features {
    /// AVX2 and FMA (the element-wise helpers' 256-bit path).
    pub avx2_fma: bool,
    /// AVX-512 F and BW (the f32 GEMM micro-kernel, the element-wise helpers' 512-bit path).
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
    let avx512 = has!("avx512f") && has!("avx512bw");
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
