//! A random number generator that reproduces PyTorch's CPU generator (`torch.Generator("cpu")`).
//!
//! Diffusers draws the initial latents, and the per-step noise of ancestral samplers, with
//! `torch.randn(shape, generator=g)` on a CPU generator. [`TorchRng`] reproduces that stream so that a seed gives
//! the same image as diffusers:
//!
//! * The engine is the 32-bit Mersenne Twister (MT19937) seeded like `std::mt19937`. `manual_seed` accepts any
//!   64-bit value but only its low 32 bits reach the engine, so seeds `s` and `s + 2^32` give the same stream.
//! * `torch.randn` in float32 with at least 16 elements first fills the whole tensor with 24-bit uniforms (one
//!   32-bit draw each), then turns every block of 16 into normals with Box-Muller (element `j` and `j + 8` of a
//!   block are the cosine and sine halves of one pair). When the count is not a multiple of 16, 16 fresh uniforms
//!   are drawn and the last 16 elements are recomputed from them (overwriting part of the last full block).
//! * With fewer than 16 elements torch uses a scalar double-precision Box-Muller on 53-bit uniforms (two 32-bit
//!   draws each). It returns the cosine half and caches the sine half in the generator; the cached value is
//!   consumed by the next scalar draw, even one made in a later `randn` call.
//!
//! Torch 2.15 computes the float32 Box-Muller differently depending on the CPU kernels it dispatches to
//! ([`FloatNormalPath`]): on x86-64 with AVX2 or AVX-512 it uses the polynomial `log`/`sincos` of
//! `avx_mathfun.h` with fused multiply-adds (the default here, pure float arithmetic, so bit-identical on every
//! platform); with its baseline kernels (`ATEN_CPU_CAPABILITY=default`, CPUs without AVX2, aarch64) it calls the C
//! library's `logf`/`sinf`/`cosf` (bit-identical on glibc). The two differ by up to ~2.5e-6. The scalar
//! (fewer than 16 values) path is the same everywhere.
//!
//! Float16/bfloat16 draws (diffusers pipelines loaded with `torch_dtype=torch.float16` draw latents and
//! Euler-Ancestral noise in that dtype) are the float32 values rounded, except when the count is not a multiple of
//! 16 (see [`TorchRng::randn_vec_half`]); [`TorchRng::randn_dtype`] reproduces both.

use candle_core::{DType, Device, Tensor};

/// Number of 32-bit words in the Mersenne Twister state.
const STATE_N: usize = 624;
/// The Mersenne Twister's middle word offset.
const STATE_M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// Which implementation of torch's float32 Box-Muller (`normal_fill`, used for 16 or more values) to mirror.
///
/// Torch picks it by the CPU capability it dispatches to (`torch.backends.cpu.get_cpu_capability()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FloatNormalPath {
    /// Torch on x86-64 CPUs with AVX2 or AVX-512 (capability `AVX2` or `AVX512`): vectorised Box-Muller with
    /// `avx_mathfun.h`'s polynomial `log` and `sincos` on float32 and a float32 angle. The default.
    #[default]
    Avx2,
    /// Torch's scalar loop (capability `DEFAULT`, e.g. aarch64 or x86-64 without AVX2): the C library's
    /// `logf`/`sinf`/`cosf` with the angle computed in double precision.
    Scalar,
}

/// PyTorch's CPU generator: MT19937 plus torch's normal-distribution algorithms (see the module docs).
///
/// Successive calls continue one stream, exactly as successive `torch.randn(..., generator=g)` calls do.
#[derive(Clone)]
pub struct TorchRng {
    state: Box<[u32; STATE_N]>,
    /// Index of the next state word to temper.
    next: usize,
    /// The sine half of the last scalar Box-Muller pair, consumed by the next scalar draw.
    cached_normal: Option<f64>,
    /// The float32 Box-Muller variant to mirror.
    path: FloatNormalPath,
}

impl std::fmt::Debug for TorchRng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchRng")
            .field("next", &self.next)
            .field("cached_normal", &self.cached_normal)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl TorchRng {
    /// A generator in the state of `torch.Generator("cpu").manual_seed(seed)`.
    ///
    /// Float32 draws of 16 or more values mirror torch on AVX2/AVX-512 x86-64 CPUs ([`FloatNormalPath::Avx2`]).
    pub fn new(seed: u64) -> Self {
        Self::with_float_path(seed, FloatNormalPath::default())
    }

    /// Like [`TorchRng::new`], mirroring the given float32 Box-Muller implementation.
    pub fn with_float_path(seed: u64, path: FloatNormalPath) -> Self {
        let mut state = Box::new([0u32; STATE_N]);
        // Torch keeps the full 64-bit seed for `initial_seed()` but seeds the engine with its low 32 bits.
        state[0] = seed as u32;
        for j in 1..STATE_N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        TorchRng {
            state,
            next: STATE_N,
            cached_normal: None,
            path,
        }
    }

    /// Regenerates the whole state block (the MT19937 "twist").
    fn twist(&mut self) {
        let s = &mut *self.state;
        for i in 0..STATE_N {
            let y = (s[i] & UPPER_MASK) | (s[(i + 1) % STATE_N] & LOWER_MASK);
            let mut v = s[(i + STATE_M) % STATE_N] ^ (y >> 1);
            if s[(i + 1) % STATE_N] & 1 != 0 {
                v ^= MATRIX_A;
            }
            s[i] = v;
        }
        self.next = 0;
    }

    /// The next 32-bit output of the engine (torch's `random()`).
    fn next_u32(&mut self) -> u32 {
        if self.next >= STATE_N {
            self.twist();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// A float32 uniform in [0, 1) from the low 24 bits of one draw (torch's `uniform_real_distribution<float>`).
    fn uniform_f32(&mut self) -> f32 {
        (self.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// A float64 uniform in [0, 1) from the low 53 bits of two draws (torch's `uniform_real_distribution<double>`).
    fn uniform_f64(&mut self) -> f64 {
        let hi = u64::from(self.next_u32());
        let lo = u64::from(self.next_u32());
        (((hi << 32) | lo) & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// One standard normal from torch's scalar `normal_distribution<double>` (with its one-value cache).
    fn normal_f64(&mut self) -> f64 {
        if let Some(cached) = self.cached_normal.take() {
            return cached;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.cached_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// Box-Muller on a block of 16 uniforms in place, as torch's float32 `normal_fill_16` does on `path`.
    fn normal_fill_16(data: &mut [f32], path: FloatNormalPath) {
        for j in 0..8 {
            let u1 = 1.0f32 - data[j];
            let u2 = data[j + 8];
            let (radius, sin, cos) = match path {
                FloatNormalPath::Avx2 => {
                    let radius = (-2.0f32 * avx::log(u1)).sqrt();
                    let theta = (2.0f64 * std::f64::consts::PI) as f32 * u2;
                    let (sin, cos) = avx::sincos(theta);
                    (radius, sin, cos)
                }
                FloatNormalPath::Scalar => {
                    let radius = (-2.0f32 * u1.ln()).sqrt();
                    let theta = (2.0f64 * std::f64::consts::PI * f64::from(u2)) as f32;
                    (radius, theta.sin(), theta.cos())
                }
            };
            data[j] = radius * cos;
            data[j + 8] = radius * sin;
        }
    }

    /// Like `torch.randn(numel)` in float32 (then reshape): the next `numel` normal values.
    pub fn randn_vec(&mut self, numel: usize) -> Vec<f32> {
        self.normals(numel, numel)
    }

    /// Like `torch.randn(numel, dtype=float16)` (or `bfloat16`), before the final rounding: the next `numel` values,
    /// which rounded to float16 (bfloat16) equal torch's.
    ///
    /// Torch 2.15 draws these like float32 values except that its first pass fills only the whole blocks of 16
    /// with uniforms, so when `numel % 16 != 0` it consumes 16 fewer values and the result differs.
    pub fn randn_vec_half(&mut self, numel: usize) -> Vec<f32> {
        self.normals(numel, numel - numel % 16)
    }

    /// The normal-distribution kernel: uniforms for the first `filled` values, Box-Muller per block of 16, then the
    /// last 16 recomputed from fresh uniforms when `numel` is not a multiple of 16.
    fn normals(&mut self, numel: usize, filled: usize) -> Vec<f32> {
        if numel < 16 {
            return (0..numel).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data = vec![0f32; numel];
        for v in &mut data[..filled] {
            *v = self.uniform_f32();
        }
        for block in data.chunks_exact_mut(16) {
            Self::normal_fill_16(block, self.path);
        }
        if !numel.is_multiple_of(16) {
            let tail = &mut data[numel - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            Self::normal_fill_16(tail, self.path);
        }
        data
    }

    /// Same as [`TorchRng::randn_vec`], as an f32 candle tensor of `shape` on `device`.
    pub fn randn(&mut self, shape: &[usize], device: &Device) -> crate::error::Result<Tensor> {
        let numel = shape.iter().product();
        let data = self.randn_vec(numel);
        Ok(Tensor::from_vec(data, shape, device)?)
    }

    /// Like `torch.randn(shape, dtype=dtype)`: a tensor of `dtype` (F32, F16 or BF16) on `device`.
    ///
    /// Diffusers draws latents and Euler-Ancestral noise in the pipeline's dtype; F16/BF16 follow
    /// [`TorchRng::randn_vec_half`]. Other dtypes are drawn as F32 and converted (torch's float64 path differs).
    pub fn randn_dtype(
        &mut self,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> crate::error::Result<Tensor> {
        let numel = shape.iter().product();
        let data = match dtype {
            DType::F16 | DType::BF16 => self.randn_vec_half(numel),
            _ => self.randn_vec(numel),
        };
        let t = Tensor::from_vec(data, shape, device)?;
        Ok(if dtype == DType::F32 {
            t
        } else {
            t.to_dtype(dtype)?
        })
    }
}

/// Scalar transcriptions of the float32 `log` and `sincos` of torch's `avx_mathfun.h` (Cephes polynomials, after
/// Julien Pommier's SSE versions), one lane at a time. Torch's build lets the compiler fuse each multiply feeding an
/// add into one fused multiply-add, so the same fusions are made here with `mul_add`.
#[allow(clippy::excessive_precision, clippy::unreadable_literal)]
mod avx {
    /// `a * b + c` with a single rounding, as the compiled torch kernel evaluates it.
    #[inline]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }

    /// Natural logarithm of a positive, normal `x` (`log256_ps`).
    pub(super) fn log(x: f32) -> f32 {
        // Cephes SQRTHF, 0.707106781186547524, rounded to float32.
        const SQRTHF: f32 = std::f32::consts::FRAC_1_SQRT_2;
        const P: [f32; 9] = [
            7.0376836292E-2_f64 as f32,
            -1.1514610310E-1_f64 as f32,
            1.1676998740E-1_f64 as f32,
            -1.2420140846E-1_f64 as f32,
            1.4249322787E-1_f64 as f32,
            -1.6668057665E-1_f64 as f32,
            2.0000714765E-1_f64 as f32,
            -2.4999993993E-1_f64 as f32,
            3.3333331174E-1_f64 as f32,
        ];
        const Q1: f32 = -2.12194440e-4_f64 as f32;
        const Q2: f32 = 0.693359375;
        let x = x.max(f32::from_bits(0x0080_0000));
        let bits = x.to_bits();
        let mut e = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
        // Mantissa scaled into [0.5, 1).
        let m = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
        let x = if m < SQRTHF {
            e -= 1.0;
            (m - 1.0) + m
        } else {
            m - 1.0
        };
        let z = x * x;
        let mut y = P[0];
        for p in &P[1..] {
            y = fma(y, x, *p);
        }
        // The compiler fuses the multiply by `z` (not the one by `Q1`) into the following add.
        y = fma(y * x, z, e * Q1);
        y = fma(-z, 0.5, y);
        fma(e, Q2, x + y)
    }

    /// Sine and cosine of `x` (`sincos256_ps`); accurate for |x| < 8192.
    pub(super) fn sincos(x: f32) -> (f32, f32) {
        const FOPI: f32 = 1.27323954473516_f64 as f32;
        const DP1: f32 = -0.785_156_25;
        const DP2: f32 = -2.4187564849853515625e-4;
        const DP3: f32 = -3.77489497744594108e-8_f64 as f32;
        const SIN: [f32; 3] = [
            -1.9515295891E-4_f64 as f32,
            8.3321608736E-3_f64 as f32,
            -1.6666654611E-1_f64 as f32,
        ];
        const COS: [f32; 3] = [
            2.443315711809948E-005_f64 as f32,
            -1.388731625493765E-003_f64 as f32,
            4.166664568298827E-002_f64 as f32,
        ];
        let sign_in = x.to_bits() & 0x8000_0000;
        let ax = x.abs();
        let mut j = (ax * FOPI) as i32;
        j = (j + 1) & !1;
        let y = j as f32;
        let sin_sign = sign_in ^ (((j & 4) as u32) << 29);
        let cos_sign = ((!(j - 2) & 4) as u32) << 29;
        let use_sin_poly = j & 2 == 0;
        let mut x = fma(y, DP1, ax);
        x = fma(y, DP2, x);
        x = fma(y, DP3, x);
        let z = x * x;
        let mut c = fma(COS[0], z, COS[1]);
        c = fma(c, z, COS[2]);
        c = fma(c * z, z, -(z * 0.5));
        c += 1.0;
        let mut s = fma(SIN[0], z, SIN[1]);
        s = fma(s, z, SIN[2]);
        s *= z;
        s = fma(s, x, x);
        let (sin, cos) = if use_sin_poly { (s, c) } else { (c, s) };
        (
            f32::from_bits(sin.to_bits() ^ sin_sign),
            f32::from_bits(cos.to_bits() ^ cos_sign),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_reference_output() {
        // The 10000th output of std::mt19937 with the default seed 5489 is 4123659995 (C++ standard).
        let mut rng = TorchRng::new(5489);
        let mut last = 0;
        for _ in 0..10_000 {
            last = rng.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn seed_uses_low_32_bits() {
        let a = TorchRng::new(5).randn_vec(20);
        let b = TorchRng::new((1u64 << 32) + 5).randn_vec(20);
        assert_eq!(a, b);
    }
}
