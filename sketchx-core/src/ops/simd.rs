//! Vectorisable element-wise helpers (exp, SiLU) shared by the kernels, dispatched at run time to AVX2+FMA or
//! AVX-512 code generated from the same plain loops.

use std::mem::MaybeUninit;

/// `exp(x)` for f32 by range reduction (x = n ln2 + r, Cody-Waite split) and a degree-6 polynomial: relative
/// error about 2e-7; inputs are clamped to [-87.3, 88.3] (results below 1.2e-38 are not needed here); branch-free
/// so that loops over it vectorise.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(EXP_MIN, EXP_MAX);
    let t = x * std::f32::consts::LOG2_E + EXP_SHIFT;
    let n = t - EXP_SHIFT;
    let r = (x - n * EXP_LN2_HI) - n * EXP_LN2_LO;
    let mut p = EXP_POLY[0];
    for c in &EXP_POLY[1..] {
        p = p * r + c;
    }
    let bits = t
        .to_bits()
        .wrapping_sub(EXP_SHIFT.to_bits())
        .wrapping_add(127)
        << 23;
    p * f32::from_bits(bits)
}

/// [`exp_f32`]'s input range.
const EXP_MIN: f32 = -87.3;
const EXP_MAX: f32 = 88.3;
/// ln 2 split in two (Cody-Waite): `n * EXP_LN2_HI` is exact for the `n` that occur.
const EXP_LN2_HI: f32 = 0.693_145_75;
const EXP_LN2_LO: f32 = 1.428_606_8e-6;
/// 1.5 * 2^23: adding it rounds to an integer (ties to even) held in the low mantissa bits, which gives both n as
/// a float and 2^n's exponent without a float-to-int conversion (Rust's saturating `as` does not vectorise).
const EXP_SHIFT: f32 = 12_582_912.0;
/// `exp(r)`'s Taylor coefficients, highest degree first (Horner's order).
const EXP_POLY: [f32; 7] = [
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// `2^t` for `t <= 0` (a score minus its row's max, times `scale * log2(e)`), for probabilities that are rounded to
/// bf16 next: clamped below at -125 so that the result stays a normal f32 (at least 2^-125.5; such weights vanish
/// next to the max's 1 anyway); `t = n + f` with `n` the nearest integer (by [`EXP_SHIFT`]) and `|f| <= 1/2`, `2^f`
/// by [`EXP2_POLY_BF16`] in fused multiply-adds, times `2^n` through the exponent bits.
#[inline(always)]
fn exp2_nonpositive(t: f32) -> f32 {
    let t = t.max(EXP2_MIN);
    let shifted = t + EXP_SHIFT;
    let f = t - (shifted - EXP_SHIFT);
    let mut p = EXP2_POLY_BF16[0];
    for c in &EXP2_POLY_BF16[1..] {
        p = p.mul_add(f, *c);
    }
    p * f32::from_bits(shifted.to_bits().wrapping_add(EXP2_BIAS) << 23)
}

/// log2(e) as the f32 nearest to it plus the f32 nearest to the rest.
const LOG2_E_HI: f32 = std::f32::consts::LOG2_E;
const LOG2_E_LO: f32 = 1.925_963e-8;

/// [`exp2_nonpositive`]'s lower clamp.
const EXP2_MIN: f32 = -125.0;
/// Turns [`EXP_SHIFT`]'s bits plus `n` into the biased exponent `n + 127`.
const EXP2_BIAS: u32 = 127u32.wrapping_sub(EXP_SHIFT.to_bits());
/// `2^f` on `|f| <= 1/2` for values rounded to bf16 next: the degree-4 minimax polynomial (relative error 2.7e-6
/// in f32 arithmetic, a thousandth of bf16's rounding), highest degree first; two multiply-adds fewer than
/// [`EXP2_POLY`].
const EXP2_POLY_BF16: [f32; 5] = [
    0.009_569_995,
    0.055_917_546,
    0.240_247_44,
    0.693_121_85,
    0.999_999_3,
];
/// `(ln 2)^i / i!`, highest degree first: `2^f` on `|f| <= 1/2` within about 1e-7 (for f32 results).
const EXP2_POLY: [f32; 7] = [
    0.000_154_035_3,
    0.001_333_355_8,
    0.009_618_129,
    0.055_504_11,
    0.240_226_5,
    std::f32::consts::LN_2,
    1.0,
];

macro_rules! dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),*) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($a: $t),*) $(-> $r)? {
            #[inline(always)]
            fn imp($($a: $t),*) $(-> $r)? $body
            #[cfg(target_arch = "x86_64")]
            {
                /// # Safety
                /// The CPU must have AVX-512 F, AVX2 and FMA.
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn v512($($a: $t),*) $(-> $r)? { imp($($a),*) }
                /// # Safety
                /// The CPU must have AVX2 and FMA.
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v256($($a: $t),*) $(-> $r)? { imp($($a),*) }
                let features = super::cpu::features();
                if features.avx512 && features.avx2_fma {
                    // SAFETY: the CPU supports the features the function was compiled for.
                    return unsafe { v512($($a),*) };
                }
                if features.avx2_fma {
                    // SAFETY: as above.
                    return unsafe { v256($($a),*) };
                }
            }
            imp($($a),*)
        }
    };
}
pub(crate) use dispatch;

/// The largest value of `row` (negative infinity when empty; NaNs are skipped), kept in 64 lanes (four vectors of
/// independent maxima, so that the loop runs at the loads' rate rather than one maximum's latency) and reduced
/// in a tree; inlined into the dispatched callers, it takes their features.
#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    const L: usize = 64;
    let mut lanes = [f32::NEG_INFINITY; L];
    let chunks = row.chunks_exact(L);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..L {
            lanes[i] = if c[i] > lanes[i] { c[i] } else { lanes[i] };
        }
    }
    for (i, &x) in rest.iter().enumerate() {
        lanes[i] = if x > lanes[i] { x } else { lanes[i] };
    }
    let mut width = L / 2;
    while width > 0 {
        for i in 0..width {
            lanes[i] = if lanes[i + width] > lanes[i] {
                lanes[i + width]
            } else {
                lanes[i]
            };
        }
        width /= 2;
    }
    lanes[0]
}

/// [`row_max`] in AVX-512 registers: four vectors of lanes, the tail masked (its lanes past the row stay `-inf`),
/// reduced in registers. The same value ([`row_max`]'s lanes only skip NaNs, as `vmaxps` with the new value
/// first does; which of `+0` and `-0` comes out does not change what the callers compute from it), without the
/// stores and reloads of a lane array that short rows (cross-attention's 77 keys) spent most of their time on.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn row_max_avx512(row: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    const L: usize = 16;
    let low = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut acc = [low; 4];
    let mut chunks = row.chunks_exact(4 * L);
    for c in &mut chunks {
        for (j, a) in acc.iter_mut().enumerate() {
            // SAFETY: entries j * 16..j * 16 + 16 of the chunk (64 values).
            *a = _mm512_max_ps(unsafe { _mm512_loadu_ps(c.as_ptr().add(j * L)) }, *a);
        }
    }
    for (c, a) in chunks.remainder().chunks(L).zip(acc.iter_mut()) {
        let mask: __mmask16 = if c.len() == L {
            0xffff
        } else {
            (1u16 << c.len()) - 1
        };
        // SAFETY: the lanes under `mask` lie inside the row.
        *a = _mm512_max_ps(unsafe { _mm512_mask_loadu_ps(low, mask, c.as_ptr()) }, *a);
    }
    let m = _mm512_max_ps(_mm512_max_ps(acc[0], acc[1]), _mm512_max_ps(acc[2], acc[3]));
    _mm512_reduce_max_ps(m)
}

/// The sum of 16 lanes in a tree (lane `i` plus lane `i + 8`, and so on): four dependent additions instead of
/// fifteen, the same order on every path.
#[inline(always)]
fn tree_sum16(mut lanes: [f32; 16]) -> f32 {
    let mut width = 8;
    while width > 0 {
        for i in 0..width {
            lanes[i] += lanes[i + width];
        }
        width /= 2;
    }
    lanes[0]
}

dispatch! {
    /// Softmax of one row in place, like torch: subtract the max, exponentiate, divide by the sum. The max and
    /// the sum are kept in 16 lanes so that the loops vectorise (a float reduction in one accumulator cannot).
    pub fn softmax_row(row: &mut [f32]) {
        const L: usize = 16;
        let max = row_max(row);
        for x in row.iter_mut() {
            *x = exp_f32(*x - max);
        }
        let mut acc = [0f32; L];
        let chunks = row.chunks_exact(L);
        let rest = chunks.remainder();
        for c in chunks {
            for i in 0..L {
                acc[i] += c[i];
            }
        }
        let sum = acc.iter().sum::<f32>() + rest.iter().sum::<f32>();
        let inv = 1.0 / sum;
        for x in row.iter_mut() {
            *x *= inv;
        }
    }
}

dispatch! {
    /// The unnormalised softmax of `row * scale` (`scale > 0`): each `x` becomes `exp(scale * (x - max))`, in one
    /// pass after the max; returns their sum (the caller divides later, once per output row instead of once per
    /// score).
    pub fn exp_sum_row(row: &mut [f32], scale: f32) -> f32 {
        const L: usize = 16;
        let max = row_max(row);
        let mut acc = [0f32; L];
        let mut chunks = row.chunks_exact_mut(L);
        for c in &mut chunks {
            for i in 0..L {
                let e = exp_f32((c[i] - max) * scale);
                c[i] = e;
                acc[i] += e;
            }
        }
        let mut sum = acc.iter().sum::<f32>();
        for x in chunks.into_remainder() {
            *x = exp_f32((*x - max) * scale);
            sum += *x;
        }
        sum
    }
}

/// [`exp_sum_row`] that leaves `row` as it is and writes the values rounded to bf16 (nearest, ties to even, as
/// `vcvtneps2bf16`) into `out` (at least `row.len()` entries) in the same pass, for a product that reads them in
/// bf16; returns the sum of the unrounded values. The exponential is [`exp2_nonpositive`] of `x s - max s`
/// (cheaper than [`exp_f32`], far more exact than the rounding to bf16). With AVX-512 BF16 the rounding is that
/// instruction (the values, in `[2^-125.5, 1]` up to the argument's rounding, are never denormal or NaN, where it
/// would differ); both paths give the same bits.
pub fn exp_sum_row_bf16(row: &[f32], out: &mut [u16], scale: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::features().avx512_bf16 {
        assert!(out.len() >= row.len(), "output shorter than the row");
        // SAFETY: the CPU has AVX-512 F and BF16 (checked); `out` holds the row's length (checked).
        return unsafe { exp_sum_row_bf16_avx512(row, out, scale) };
    }
    exp_sum_row_bf16_rounded(row, out, scale)
}

/// [`exp_sum_row_bf16`] with explicit vectors: the same values as [`exp2_nonpositive`] (its rounding to an integer
/// by `vrndscaleps` and its power of two by `vscalefps`, both exact), then `vcvtneps2bf16`.
///
/// # Safety
/// The CPU must have AVX-512 F and BF16; `out` must hold at least `row.len()` entries.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
unsafe fn exp_sum_row_bf16_avx512(row: &[f32], out: &mut [u16], scale: f32) -> f32 {
    use std::arch::x86_64::*;
    const L: usize = 16;
    // SAFETY: the CPU has AVX-512 F (this function's contract).
    let max = unsafe { row_max_avx512(row) };
    // Scores in units of log2: exp(scale (x - max)) = 2^(x s - max s) with s = scale log2(e), one multiply-add.
    let scale = scale * std::f32::consts::LOG2_E;
    let (vshift, vscale) = (_mm512_set1_ps(max * scale), _mm512_set1_ps(scale));
    let c = |v: f32| _mm512_set1_ps(v);
    // The values of the 16 (or `mask`) entries from `i`: 2^t as the nearest integer n (ties to even, as the
    // shift's rounding) and 2^n by scaling, the same values in two instructions where the shift and the exponent
    // bits take five.
    let exp = |i: usize, mask: __mmask16| {
        // SAFETY: the lanes under `mask` lie inside `row` (the callers below).
        let x = unsafe {
            _mm512_fmsub_ps(
                _mm512_maskz_loadu_ps(mask, row.as_ptr().add(i)),
                vscale,
                vshift,
            )
        };
        let t = _mm512_max_ps(x, c(EXP2_MIN));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
        let f = _mm512_sub_ps(t, n);
        let mut p = c(EXP2_POLY_BF16[0]);
        for &k in &EXP2_POLY_BF16[1..] {
            p = _mm512_fmadd_ps(p, f, c(k));
        }
        _mm512_scalef_ps(p, n)
    };
    let mut acc = _mm512_setzero_ps();
    let whole = row.len() / L * L;
    for i in (0..whole).step_by(L) {
        let e = exp(i, 0xffff);
        acc = _mm512_add_ps(acc, e);
        // SAFETY: entries i..i + 16 lie inside `out` (at least `row.len()` entries).
        unsafe {
            let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(e));
            _mm256_storeu_si256(out.as_mut_ptr().add(i).cast(), h);
        }
    }
    if whole < row.len() {
        // The last vector partly: its lanes past the row are neither read, added nor stored.
        let mask: __mmask16 = (1u16 << (row.len() - whole)) - 1;
        let e = exp(whole, mask);
        acc = _mm512_mask_add_ps(acc, mask, acc, e);
        // SAFETY: the lanes under `mask` lie inside `out`. (A masked 16-bit store of 256 bits would need AVX-512
        // VL.)
        unsafe {
            let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(e));
            _mm512_mask_cvtepi32_storeu_epi16(
                out.as_mut_ptr().add(whole).cast(),
                mask,
                _mm512_cvtepu16_epi32(h),
            );
        }
    }
    let mut lanes = [0f32; L];
    // SAFETY: `lanes` holds 16 values.
    unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), acc) };
    tree_sum16(lanes)
}

dispatch! {
    /// [`exp_sum_row_bf16`] without AVX-512 BF16: the rounding in integer arithmetic.
    fn exp_sum_row_bf16_rounded(row: &[f32], out: &mut [u16], scale: f32) -> f32 {
        const L: usize = 16;
        let max = row_max(row);
        let scale = scale * std::f32::consts::LOG2_E;
        let shift = max * scale;
        let out = &mut out[..row.len()];
        let mut acc = [0f32; L];
        let mut outs = out.chunks_exact_mut(L);
        let rows = row.chunks_exact(L);
        let rest = rows.remainder();
        for (c, o) in rows.zip(&mut outs) {
            for i in 0..L {
                let e = exp2_nonpositive(c[i].mul_add(scale, -shift));
                acc[i] += e;
                o[i] = f32_bits_to_bf16_bits(e.to_bits());
            }
        }
        // The rest in the first lanes, as the vector path's last, partial vector adds them.
        for ((&x, o), a) in rest.iter().zip(outs.into_remainder()).zip(&mut acc) {
            let e = exp2_nonpositive(x.mul_add(scale, -shift));
            *a += e;
            *o = f32_bits_to_bf16_bits(e.to_bits());
        }
        tree_sum16(acc)
    }
}

/// `half::bf16::from_f32` (round to nearest, ties to even; NaNs quieted) on bit patterns, without branches, so
/// that loops over slices vectorise. Bit-identical to half's (tested in `models::weights` over edge cases and
/// random bit patterns).
#[inline]
pub(crate) fn f32_bits_to_bf16_bits(x: u32) -> u16 {
    let nan = (x & 0x7FFF_FFFF) > 0x7F80_0000;
    // Round up when the first dropped bit is set and either another dropped bit or the kept lowest bit is set.
    // No overflow: the only inputs with x >> 16 == 0xFFFF are NaNs, which take the other branch.
    let round_up = (x & 0x8000) != 0 && (x & 0x1_7FFF) != 0;
    let rounded = (x >> 16) + u32::from(round_up);
    let quiet_nan = (x >> 16) | 0x0040;
    (if nan { quiet_nan } else { rounded }) as u16
}

/// `y = x * a + b` over a slice (as many values as the shorter holds), then SiLU (`y / (1 + exp(-y))`) when
/// `silu`. With AVX-512 the SiLU is [`affine_silu_avx512`]'s (within a few ulp of the division's).
pub fn affine_silu(src: &[f32], dst: &mut [f32], a: f32, b: f32, silu: bool) {
    // SAFETY: `MaybeUninit<f32>` has `f32`'s layout, and only initialised values are written through the view.
    let dst = unsafe { &mut *(dst as *mut [f32] as *mut [MaybeUninit<f32>]) };
    affine_silu_into(src, dst, a, b, silu);
}

/// [`affine_silu`] into memory that may be uninitialised: its first `src.len().min(dst.len())` values are written.
pub fn affine_silu_into(src: &[f32], dst: &mut [MaybeUninit<f32>], a: f32, b: f32, silu: bool) {
    #[cfg(target_arch = "x86_64")]
    if silu && super::cpu::features().avx512 {
        // SAFETY: the CPU has AVX-512 F (checked).
        unsafe { affine_silu_avx512(src, dst, a, b) };
        return;
    }
    affine_silu_portable(src, dst, a, b, silu);
}

/// [`affine_silu`]'s SiLU on AVX-512 without a division (whose throughput, one vector per 10 to 16 cycles on Intel
/// cores, bounded the loop): `exp(-y) = 2^z` with `z = -y log2(e)` (`y` clamped to `[-87, 87]`, as [`exp_f32`]
/// clamps), split into the nearest integer `n` (`vrndscaleps`) and `f`, `2^f` by [`exp2_nonpositive`]'s
/// polynomial and `2^n` by `vscalefps`; then `1 / (1 + 2^z)` by `vrcp14ps` and one Newton step (about 2^-28
/// relative before rounding), times the unclamped `y`. The tail's lanes are masked.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn affine_silu_avx512(src: &[f32], dst: &mut [MaybeUninit<f32>], a: f32, b: f32) {
    use std::arch::x86_64::*;
    const L: usize = 16;
    let n = src.len().min(dst.len());
    let (va, vb) = (_mm512_set1_ps(a), _mm512_set1_ps(b));
    for i in (0..n).step_by(L) {
        let mask = lanes_mask(n - i);
        // SAFETY: the lanes under `mask` lie inside both slices.
        unsafe {
            let x = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, src.as_ptr().add(i)), va, vb);
            _mm512_mask_storeu_ps(dst.as_mut_ptr().add(i).cast(), mask, silu_avx512(x));
        }
    }
}

/// The mask of the first `remaining` of 16 lanes (all 16 from 16 on): a loop's tail over a slice.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn lanes_mask(remaining: usize) -> std::arch::x86_64::__mmask16 {
    if remaining >= 16 {
        0xffff
    } else {
        (1u16 << remaining) - 1
    }
}

/// SiLU of 16 lanes, [`affine_silu_avx512`]'s arithmetic.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn silu_avx512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let c = |v: f32| _mm512_set1_ps(v);
    // z = -y log2(e) with log2(e) in two parts, so that f keeps the bits a plain product would lose
    // (about |z| * 2^-24, which 2^f turns into a relative error of millionths at |y| ~ 40).
    let y = _mm512_min_ps(_mm512_max_ps(x, c(-87.0)), c(87.0));
    let z = _mm512_mul_ps(y, c(-LOG2_E_HI));
    let whole = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(z);
    let f = _mm512_fmadd_ps(y, c(-LOG2_E_LO), _mm512_fmsub_ps(y, c(-LOG2_E_HI), whole));
    let mut p = c(EXP2_POLY[0]);
    for &k in &EXP2_POLY[1..] {
        p = _mm512_fmadd_ps(p, f, c(k));
    }
    let d = _mm512_add_ps(_mm512_scalef_ps(p, whole), c(1.0));
    let r = _mm512_rcp14_ps(d);
    let r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, c(2.0)));
    _mm512_mul_ps(x, r)
}

/// `silu(x * a + b)` per channel over one position's channels (`a`, `b`: the channels' parameters, as
/// [`affine_silu`] takes one channel's), rounded to bf16 bit patterns into `dst` (as [`super::gemm::round_bf16`]);
/// as many values as the shortest slice holds. The same values as [`affine_silu`] and then rounding.
pub(crate) fn affine_silu_channels_bf16(src: &[f32], a: &[f32], b: &[f32], dst: &mut [u16]) {
    let n = src.len().min(a.len()).min(b.len()).min(dst.len());
    #[cfg(target_arch = "x86_64")]
    if super::cpu::features().avx512_bf16 {
        // SAFETY: the CPU has AVX-512 F and BF16 (checked); the slices hold `n` values.
        unsafe { affine_silu_channels_bf16_avx512(&src[..n], &a[..n], &b[..n], &mut dst[..n]) };
        return;
    }
    let mut y = [MaybeUninit::<f32>::uninit(); 1];
    for i in 0..n {
        affine_silu_into(&src[i..i + 1], &mut y, a[i], b[i], true);
        // SAFETY: `affine_silu_into` wrote the value.
        dst[i] = super::gemm::round_bf16(unsafe { y[0].assume_init() });
    }
}

/// [`affine_silu_channels_bf16`] on AVX-512: [`affine_silu_avx512`]'s arithmetic lane by lane, rounded by
/// `vcvtneps2bf16` (round to nearest even, as [`super::gemm::convert_bf16`]).
///
/// # Safety
/// The CPU must have AVX-512 F, BW, VL and BF16; all four slices hold the same number of values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx512vl")]
unsafe fn affine_silu_channels_bf16_avx512(src: &[f32], a: &[f32], b: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    const L: usize = 16;
    let n = src.len();
    for i in (0..n).step_by(L) {
        let mask = lanes_mask(n - i);
        // SAFETY: the lanes under `mask` lie inside all four slices.
        unsafe {
            let load = |p: &[f32]| _mm512_maskz_loadu_ps(mask, p.as_ptr().add(i));
            let x = _mm512_fmadd_ps(load(src), load(a), load(b));
            let h = _mm512_cvtneps_pbh(silu_avx512(x));
            _mm256_mask_storeu_epi16(
                dst.as_mut_ptr().add(i).cast(),
                mask,
                std::mem::transmute::<__m256bh, __m256i>(h),
            );
        }
    }
}

dispatch! {
    /// [`affine_silu_into`] without AVX-512's SiLU: the division.
    fn affine_silu_portable(src: &[f32], dst: &mut [MaybeUninit<f32>], a: f32, b: f32, silu: bool) {
        if silu {
            for (d, &s) in dst.iter_mut().zip(src) {
                let y = s * a + b;
                d.write(y / (1.0 + exp_f32(-y)));
            }
        } else {
            for (d, &s) in dst.iter_mut().zip(src) {
                d.write(s * a + b);
            }
        }
    }
}

/// `erf(x)` by Abramowitz and Stegun's 7.1.26 (absolute error below 1.5e-7), as torch's vectorised CPU `erf`;
/// branch-free so that loops over it vectorise.
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    let ax = x.abs();
    let t = 1.0 / (0.327_591_1 * ax + 1.0);
    let r = 1.061_405_4;
    let r = r * t - 1.453_152;
    let r = r * t + 1.421_413_8;
    let r = r * t - 0.284_496_74;
    let r = r * t + 0.254_829_6;
    let y = 1.0 - r * t * exp_f32(-ax * ax);
    y.copysign(x)
}

/// `out = a * gelu(g)` (the exact, erf-based GELU) element by element: one row of GEGLU, into memory that may be
/// uninitialised (as many values as the shortest of the three holds). With AVX-512 [`geglu_row_avx512`].
pub fn geglu_row(a: &[f32], g: &[f32], out: &mut [MaybeUninit<f32>]) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::features().avx512 {
        // SAFETY: the CPU has AVX-512 F (checked).
        unsafe { geglu_row_avx512(a, g, out) };
        return;
    }
    geglu_row_portable(a, g, out);
}

dispatch! {
    /// [`geglu_row`] without AVX-512: [`erf_f32`] with its division.
    fn geglu_row_portable(a: &[f32], g: &[f32], out: &mut [MaybeUninit<f32>]) {
        for ((o, &a), &g) in out.iter_mut().zip(a).zip(g) {
            o.write(a * ((g * 0.5) * (1.0 + erf_f32(g * std::f32::consts::FRAC_1_SQRT_2))));
        }
    }
}

/// [`geglu_row`] on AVX-512 without a division (whose throughput bounded the loop, as in
/// [`affine_silu_avx512`]): [`erf_f32`]'s formula with `1 / (1 + p |x|)` by `vrcp14ps` and one Newton step (about
/// 2^-28 relative before rounding), `|x|` clamped at 10 (where erf is 1 in f32, and the step stays finite), and
/// `exp(-x^2)` as [`affine_silu_avx512`] computes its exponential; the tail's lanes are masked.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn geglu_row_avx512(a: &[f32], g: &[f32], out: &mut [MaybeUninit<f32>]) {
    use std::arch::x86_64::*;
    const L: usize = 16;
    let n = a.len().min(g.len()).min(out.len());
    for i in (0..n).step_by(L) {
        let mask = lanes_mask(n - i);
        // SAFETY: the lanes under `mask` lie inside the three slices.
        unsafe {
            let gv = _mm512_maskz_loadu_ps(mask, g.as_ptr().add(i));
            let av = _mm512_maskz_loadu_ps(mask, a.as_ptr().add(i));
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(i).cast(), mask, geglu_lanes(av, gv));
        }
    }
}

/// [`geglu_row_avx512`]'s values for 16 lanes: `hidden * gelu(gate)`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn geglu_lanes(
    av: std::arch::x86_64::__m512,
    gv: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let c = |v: f32| _mm512_set1_ps(v);
    let sign = _mm512_set1_epi32(i32::MIN);
    let x = _mm512_mul_ps(gv, c(std::f32::consts::FRAC_1_SQRT_2));
    let ax = _mm512_min_ps(_mm512_abs_ps(x), c(10.0));
    let d = _mm512_fmadd_ps(ax, c(0.327_591_1), c(1.0));
    let t = _mm512_rcp14_ps(d);
    let t = _mm512_mul_ps(t, _mm512_fnmadd_ps(d, t, c(2.0)));
    let mut r = c(1.061_405_4);
    for k in [-1.453_152, 1.421_413_8, -0.284_496_74, 0.254_829_6] {
        r = _mm512_fmadd_ps(r, t, c(k));
    }
    // exp(y) for y = -x^2 (>= -100; clamped at -87 as exp_f32 clamps): 2^(y log2 e), log2 e in two parts.
    let y = _mm512_max_ps(_mm512_mul_ps(_mm512_sub_ps(c(0.0), ax), ax), c(-87.0));
    let whole = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(y, c(LOG2_E_HI)),
    );
    let f = _mm512_fmadd_ps(y, c(LOG2_E_LO), _mm512_fmsub_ps(y, c(LOG2_E_HI), whole));
    let mut p = c(EXP2_POLY[0]);
    for &k in &EXP2_POLY[1..] {
        p = _mm512_fmadd_ps(p, f, c(k));
    }
    let e = _mm512_scalef_ps(p, whole);
    let erf_abs = _mm512_fnmadd_ps(_mm512_mul_ps(r, t), e, c(1.0));
    // erf(x) = sign(x) |erf|: the sign bit of x on the (non-negative) magnitude.
    let erf = _mm512_castsi512_ps(_mm512_or_si512(
        _mm512_castps_si512(erf_abs),
        _mm512_and_si512(_mm512_castps_si512(x), sign),
    ));
    let gelu = _mm512_mul_ps(_mm512_mul_ps(gv, c(0.5)), _mm512_add_ps(c(1.0), erf));
    _mm512_mul_ps(av, gelu)
}

/// Where [`geglu_tile`] writes: rows of 16 values, `.1` values apart, in f32 or as bf16 bit patterns.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) enum TileOut {
    F32(*mut f32, usize),
    Bf16(*mut u16, usize),
}

// SAFETY: an output shared by parallel tasks, each of which writes only its own rows and columns through it (as
// `super::cpu::SendPtr`).
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for TileOut {}

#[cfg(target_arch = "x86_64")]
impl TileOut {
    /// The same output from its value `offset` on.
    ///
    /// # Safety
    /// The value must lie inside the output.
    pub(crate) unsafe fn at(self, offset: usize) -> Self {
        // SAFETY (both arms): the contract.
        match self {
            Self::F32(p, stride) => Self::F32(unsafe { p.add(offset) }, stride),
            Self::Bf16(p, stride) => Self::Bf16(unsafe { p.add(offset) }, stride),
        }
    }
}

/// GEGLU of the first `rows` rows of two 16 x 16 tiles (`hidden`, `gate`, row-major) into `out`: the values of
/// [`geglu_row`], rounded to bf16 as [`super::gemm::convert_bf16`] rounds them for a bf16 output.
///
/// # Safety
/// The CPU must have AVX-512 F and BF16; `out`'s `rows` rows of 16 values must be writable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
pub(crate) unsafe fn geglu_tile(hidden: &[f32; 256], gate: &[f32; 256], rows: usize, out: TileOut) {
    use std::arch::x86_64::*;
    for y in 0..rows.min(16) {
        // SAFETY: row y < 16 of each tile; the contract for `out`.
        unsafe {
            let v = geglu_lanes(
                _mm512_loadu_ps(hidden.as_ptr().add(16 * y)),
                _mm512_loadu_ps(gate.as_ptr().add(16 * y)),
            );
            match out {
                TileOut::F32(p, stride) => _mm512_storeu_ps(p.add(y * stride), v),
                TileOut::Bf16(p, stride) => _mm256_storeu_si256(
                    p.add(y * stride).cast(),
                    std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v)),
                ),
            }
        }
    }
}

/// The first `rows` rows and `cols` columns (at most 16 each) of a 16 x 16 tile (row-major), each row times its
/// factor in `scales` if given, plus the values at `add` (rows its stride apart) if given, rounded to bf16 into
/// `out` (rows `stride` values apart), as [`super::gemm::convert_bf16`] rounds them.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and BF16; `out`'s `rows` rows of `cols` values must be writable and `add`'s
/// readable; `scales`, if given, must hold `rows` factors.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn round_tile(
    tile: &[f32; 256],
    (rows, cols): (usize, usize),
    scales: Option<&[f32]>,
    add: Option<(*const f32, usize)>,
    out: *mut u16,
    stride: usize,
) {
    use std::arch::x86_64::*;
    let mask: __mmask16 = if cols >= 16 { !0 } else { (1u16 << cols) - 1 };
    for y in 0..rows.min(16) {
        // SAFETY: row y < 16 of the tile; the contract for `out` (only the lanes under `mask` are stored).
        unsafe {
            let mut v = _mm512_loadu_ps(tile.as_ptr().add(16 * y));
            if let Some(scales) = scales {
                v = _mm512_mul_ps(v, _mm512_set1_ps(scales[y]));
            }
            if let Some((add, add_stride)) = add {
                v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, add.add(y * add_stride)));
            }
            let v = _mm512_cvtneps_pbh(v);
            let v = _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(v));
            _mm512_mask_cvtepi32_storeu_epi16(out.add(y * stride).cast(), mask, v);
        }
    }
}

dispatch! {
    /// Layer norm of one row: `(x - mean) / sqrt(var + eps) * w + b`, the mean and the variance (of the deviations,
    /// a second pass over the row, which sits in L1) summed in 16 f32 lanes.
    pub fn layer_norm_row(src: &[f32], dst: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
        // Inlined into the caller, so compiled with its target features.
        #[inline(always)]
        fn lanes(src: &[f32], f: impl Fn(f32) -> f32) -> f32 {
            const L: usize = 16;
            let mut acc = [0f32; L];
            let chunks = src.chunks_exact(L);
            let rest = chunks.remainder();
            for c in chunks {
                for i in 0..L {
                    acc[i] += f(c[i]);
                }
            }
            acc.iter().sum::<f32>() + rest.iter().map(|&x| f(x)).sum::<f32>()
        }
        let n = src.len();
        let mean = lanes(src, |x| x) / n as f32;
        let var = lanes(src, |x| (x - mean) * (x - mean)) / n as f32;
        let rstd = 1.0 / (var + eps).sqrt();
        for (((d, &x), &w), &b) in dst.iter_mut().zip(src).zip(w).zip(b) {
            *d = (x - mean) * rstd * w + b;
        }
    }
}

dispatch! {
    /// Sum and sum of squares of a slice in one pass, accumulated in f64 lanes (a group norm's statistics: in f64
    /// the variance `E[x^2] - E[x]^2` keeps about 16 - 2 log10(|mean| / std) digits, ample for f32 inputs).
    pub fn sum_sq_f64(xs: &[f32]) -> (f64, f64) {
        // Four vectors of lanes per sum: independent chains of additions, so the loop runs at the adds'
        // throughput rather than their latency.
        const L: usize = 32;
        let mut acc = [0f64; L];
        let mut acc2 = [0f64; L];
        let chunks = xs.chunks_exact(L);
        let rest = chunks.remainder();
        for c in chunks {
            for i in 0..L {
                let x = c[i] as f64;
                acc[i] += x;
                acc2[i] += x * x;
            }
        }
        let (mut s, mut s2): (f64, f64) = (acc.iter().sum(), acc2.iter().sum());
        for &x in rest {
            let x = x as f64;
            s += x;
            s2 += x * x;
        }
        (s, s2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX-512 row maximum is the lane array's on every length around the vector widths, with NaNs (skipped),
    /// infinities and zeros of both signs among the values (compared as values: `+0 == -0`).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn row_max_paths_agree() {
        if !crate::ops::cpu::features().avx512 {
            eprintln!("no AVX-512 on this CPU: only the lane array runs");
            return;
        }
        let mut seed = 5u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1 << 24) as f32
        };
        let special = [f32::NAN, f32::NEG_INFINITY, 0.0, -0.0, f32::INFINITY];
        for len in [0, 1, 7, 15, 16, 17, 63, 64, 65, 77, 128, 130, 1024, 1031] {
            for case in 0..4 {
                let row: Vec<f32> = (0..len)
                    .map(|i| match (case, i % 7) {
                        (1, 0) => special[(i / 7) % special.len()],
                        (2, _) => f32::NEG_INFINITY,
                        (3, _) => -next(),
                        _ => next() * 20.0 - 10.0,
                    })
                    .collect();
                // SAFETY: the CPU has AVX-512 F (checked above).
                let got = unsafe { row_max_avx512(&row) };
                let want = row_max(&row);
                assert!(got == want, "len {len} case {case}: {got} against {want}");
            }
        }
    }

    /// GEGLU on this CPU's path against the portable one (erf's division): within 3e-7 |a g| (plus 1e-30), on
    /// random and saturating gates (zero, +-9, +-1e30, tiny), on lengths around the vector width.
    #[test]
    fn geglu_row_paths_agree() {
        let mut seed = 11u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1 << 24) as f32
        };
        let special = [0.0, -0.0, 9.0, -9.0, 1e30, -1e30, 1e-20];
        for len in [1, 15, 16, 17, 100] {
            let g: Vec<f32> = (0..len)
                .map(|i| match i % 5 {
                    0 => special[(i / 5) % special.len()],
                    _ => next() * 24.0 - 12.0,
                })
                .collect();
            let a: Vec<f32> = (0..len).map(|_| next() * 4.0 - 2.0).collect();
            let run = || {
                let mut out = vec![MaybeUninit::<f32>::uninit(); len];
                geglu_row(&a, &g, &mut out);
                // SAFETY: geglu_row wrote all `len` values.
                out.into_iter()
                    .map(|v| unsafe { v.assume_init() })
                    .collect::<Vec<f32>>()
            };
            let fast = crate::ops::cpu::detected_only(run);
            let slow = crate::ops::cpu::force_portable(run);
            for i in 0..len {
                let tol = 3e-7 * (a[i] * g[i]).abs() + 1e-30;
                assert!(
                    (fast[i] - slow[i]).abs() <= tol,
                    "len {len} entry {i}: g {} a {}: {} vs {}",
                    g[i],
                    a[i],
                    fast[i],
                    slow[i]
                );
            }
        }
    }

    /// SiLU after the affine map stays within a few ulp of the f64 formula on every path (AVX-512 without a
    /// division, the portable division), over the range where its values are not negligible, lane tails included;
    /// far out it is `y` (positive) or vanishes (negative); NaN stays NaN.
    #[test]
    fn affine_silu_matches_the_formula() {
        crate::ops::cpu::detected_only(affine_silu_on_this_path);
        crate::ops::cpu::force_portable(affine_silu_on_this_path);
    }

    fn affine_silu_on_this_path() {
        let (a, b) = (1.5f32, -0.25f32);
        for n in [1usize, 15, 16, 17, 100] {
            let src: Vec<f32> = (0..n * 41)
                .map(|i| (i as f32 * 0.731).sin() * 60.0 - 1.0)
                .collect();
            let mut dst = vec![f32::NAN; src.len() + 3];
            affine_silu(&src, &mut dst, a, b, true);
            for (&x, &got) in src.iter().zip(&dst) {
                let y = x * a + b;
                let want = y as f64 / (1.0 + (-(y as f64)).exp());
                if y < -80.0 {
                    assert!(got.abs() < 1e-30, "silu({y}) = {got}");
                } else {
                    let tol = 1e-6 * want.abs() + 1e-35;
                    assert!(
                        (got as f64 - want).abs() <= tol,
                        "silu({y}) = {got}, want {want}"
                    );
                }
            }
            // Past the source: untouched.
            assert!(dst[src.len()..].iter().all(|v| v.is_nan()));
            let mut plain = vec![0f32; src.len()];
            affine_silu(&src, &mut plain, a, b, false);
            assert!(src.iter().zip(&plain).all(|(&x, &p)| p == x * a + b));
        }
        let mut out = [0f32; 3];
        affine_silu(&[f32::NAN, 200.0, -200.0], &mut out, 1.0, 0.0, true);
        assert!(out[0].is_nan());
        assert_eq!(out[1], 200.0);
        assert!(out[2].abs() < 1e-30);
    }

    #[test]
    fn exp_matches_std() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let rel = ((exp_f32(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(f32::NEG_INFINITY) < 1e-37 && exp_f32(f32::INFINITY) > 1e38);
    }

    /// The fused bf16 variant: values within 3e-6 (the polynomial) + 1e-7 (|x| + |max|) scale (the argument's
    /// rounding) of exp(scale (x - max)), relative, rounded as `vcvtneps2bf16` rounds them, their sum within 4e-6; the same bits on both paths (each compared with the scalar
    /// [`exp2_nonpositive`]), on lengths around the vector width; the row is left alone.
    #[test]
    fn exp_sum_row_bf16_matches_rounding_afterwards() {
        crate::ops::cpu::detected_only(exp_sum_row_bf16_on_this_path);
    }

    #[test]
    fn exp_sum_row_bf16_portable_matches_rounding_afterwards() {
        crate::ops::cpu::force_portable(exp_sum_row_bf16_on_this_path);
    }

    fn exp_sum_row_bf16_on_this_path() {
        let mut seed = 7u32;
        for len in [1, 15, 16, 17, 77, 1024, 4099] {
            let mut row: Vec<f32> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (seed >> 8) as f32 / (1 << 24) as f32 * 40.0 - 20.0
                })
                .collect();
            // A score far below the others: its weight is clamped to 2^-125.5.., not a denormal.
            if len > 3 {
                row[3] = -1e4;
            }
            let before = row.clone();
            let mut out = vec![0u16; len + 2];
            let scale = 0.3;
            let sum = exp_sum_row_bf16(&row, &mut out, scale);
            assert_eq!(row, before);
            let max = row.iter().fold(f32::MIN, |m, &x| m.max(x));
            let c = scale * std::f32::consts::LOG2_E;
            // The implementation's order: 16 lanes, the last vector's rest in the first ones.
            let (mut lanes, mut exact) = ([0f32; 16], 0f64);

            for (i, &x) in row.iter().enumerate() {
                let e = exp2_nonpositive(x.mul_add(c, -(max * c)));
                let want = ((x - max) as f64 * scale as f64).exp();
                exact += want;
                assert!(e > 0.0 && e.is_normal(), "len {len} entry {i}: {e}");
                // The polynomial's error, and the argument's rounding (relative to its terms' size).
                let bound = 3e-6 + 1e-7 * ((x.abs() + max.abs()) * scale) as f64;
                if want > 1e-30 {
                    assert!(
                        (e as f64 / want - 1.0).abs() < bound,
                        "len {len} entry {i}: {e} vs {want}"
                    );
                }
                assert_eq!(
                    out[i],
                    half::bf16::from_f32(e).to_bits(),
                    "len {len} entry {i}"
                );
                lanes[i % 16] += e;
            }
            let want_sum = tree_sum16(lanes);
            assert_eq!(sum.to_bits(), want_sum.to_bits(), "len {len}");
            assert!(
                (sum as f64 / exact - 1.0).abs() < 4e-6,
                "len {len}: {sum} vs {exact}"
            );
            assert_eq!(&out[len..], &[0, 0]);
        }
    }
}
