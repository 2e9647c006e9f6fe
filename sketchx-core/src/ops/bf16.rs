//! Matrix products with bf16 inputs and f32 accumulation, for the CPU bf16 mode.
//!
//! `C += A B` with `A` a row-major bf16 matrix (`m x k`, any `k`) and `B` packed once into [`PackedB`]: column
//! panels of [`NR`] columns in which each 32-bit word holds two consecutive `k` entries of one column, the operand
//! layout of AVX-512 BF16's `vdpbf16ps` (16 lanes, each a two-term dot product added to an f32 accumulator). The
//! micro-kernel keeps an 8-row x 48-column block of `C` in 24 registers, broadcasts one word of `A` per row and
//! loads three words of `B` per `k` pair. Products of bf16 numbers are exact in f32, so the result differs from an
//! f32 product of the bf16-rounded inputs only by the order of the additions.
//!
//! Without AVX-512 BF16 (older x86, other architectures) the same bf16-rounded operands are widened and
//! multiplied by the f32 GEMM, which gives the same numbers up to summation order, without the speed.

use half::bf16;
use rayon::prelude::*;

/// Columns per packed panel (one 512-bit register of f32 accumulators).
pub const NR: usize = 16;
/// Rows of `C` per micro-kernel call.
const MR: usize = 8;
/// Panels per micro-kernel call (8 x 3 accumulators + 3 operands of `B` + 1 of `A` fit in 32 registers).
const NP: usize = 3;
/// `k` pairs per block: one block of three panels (`KC x 48` words, 24 KiB) stays in the L1 cache while the rows
/// of a tile stream past it.
const KC: usize = 128;
/// Largest number of rows per parallel task.
const MB_MAX: usize = 128;

/// Rounds to the nearest bf16 (ties to even), as `vcvtneps2bf16` and torch do.
#[inline]
pub fn round_bf16(x: f32) -> u16 {
    bf16::from_f32(x).to_bits()
}

/// Whether the CPU has the AVX-512 BF16 instructions the fast kernels use.
pub fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The right-hand operand of [`gemm`]: a `k x n` matrix in bf16, packed in column panels of [`NR`] with pairs of
/// consecutive `k` entries interleaved (zeros past `k` and `n`).
#[derive(Debug, Clone)]
pub struct PackedB {
    k: usize,
    n: usize,
    /// `panels x ceil(k / 2) x NR` words; word `(panel, p, j)` = `b[2p][panel * NR + j]` (low half) and
    /// `b[2p + 1][panel * NR + j]` (high half).
    data: Vec<u32>,
}

impl PackedB {
    /// Rows (`k`).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns (`n`).
    pub fn n(&self) -> usize {
        self.n
    }

    fn pairs(&self) -> usize {
        self.k.div_ceil(2)
    }

    fn panel_len(&self) -> usize {
        self.pairs() * NR
    }

    /// Packs the transpose of a row-major `n x k` f32 matrix, i.e. `B = W^T` for a linear layer's weight `W`
    /// (`[out, in]`): `k = in`, `n = out`.
    pub fn from_transposed(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "weight size");
        let pairs = k.div_ceil(2);
        let mut data = vec![0u32; n.div_ceil(NR) * pairs * NR];
        data.par_chunks_mut(pairs * NR)
            .enumerate()
            .for_each(|(panel, out)| {
                let cols = (n - panel * NR).min(NR);
                for j in 0..cols {
                    let row = &w[(panel * NR + j) * k..(panel * NR + j + 1) * k];
                    for p in 0..pairs {
                        let lo = round_bf16(row[2 * p]) as u32;
                        let hi = row.get(2 * p + 1).map_or(0, |&v| round_bf16(v) as u32);
                        out[p * NR + j] = lo | (hi << 16);
                    }
                }
            });
        Self { k, n, data }
    }

    /// Packs a `k x n` f32 matrix given row by row: `fill(r, row)` writes row `r` (`n` values) into `row`.
    /// Rows are produced in parallel, two at a time, and converted straight into the panels, so a matrix
    /// that is generated (im2col) never exists in full in f32.
    pub fn from_rows(k: usize, n: usize, fill: impl Fn(usize, &mut [f32]) + Sync) -> Self {
        let pairs = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let mut data = vec![0u32; panels * pairs * NR];
        let out = SendPtr(data.as_mut_ptr());
        // Enough pairs per task to amortise the scratch rows, enough tasks to balance the threads.
        let chunk = (pairs / (8 * rayon::current_num_threads().max(1))).clamp(1, 64);
        (0..pairs.div_ceil(chunk)).into_par_iter().for_each(|t| {
            let out = &out;
            let mut r0 = vec![0f32; panels * NR];
            let mut r1 = vec![0f32; panels * NR];
            for p in t * chunk..((t + 1) * chunk).min(pairs) {
                fill(2 * p, &mut r0[..n]);
                if 2 * p + 1 < k {
                    fill(2 * p + 1, &mut r1[..n]);
                } else {
                    r1[..n].fill(0.0);
                }
                for panel in 0..panels {
                    let base = (panel * pairs + p) * NR;
                    // SAFETY: word (panel, p, ..) belongs to pair p only, and each pair to one task; `base + NR`
                    // is within `data` (panels * pairs * NR words).
                    let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add(base), NR) };
                    interleave(
                        &r0[panel * NR..(panel + 1) * NR],
                        &r1[panel * NR..(panel + 1) * NR],
                        dst,
                    );
                }
            }
        });
        Self { k, n, data }
    }

    /// The matrix back in f32, row-major `k x n` (for the portable path and for tests).
    pub fn to_f32(&self) -> Vec<f32> {
        let (k, n, pairs) = (self.k, self.n, self.pairs());
        let mut m = vec![0f32; k * n];
        for r in 0..k {
            for c in 0..n {
                let w = self.data[((c / NR) * pairs + r / 2) * NR + c % NR];
                let bits = if r % 2 == 0 { w & 0xffff } else { w >> 16 };
                m[r * n + c] = bf16::from_bits(bits as u16).to_f32();
            }
        }
        m
    }
}

/// Writes `NR` words `(round(a[j]), round(b[j]))`; the rows' tails past `n` are zero or stale but are only ever
/// multiplied into columns that are not stored.
fn interleave(a: &[f32], b: &[f32], dst: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512_bf16() {
        // SAFETY: the CPU has the features (checked above); all three slices hold NR = 16 elements.
        unsafe { x86::interleave16(a.as_ptr(), b.as_ptr(), dst.as_mut_ptr()) };
        return;
    }
    for j in 0..NR {
        dst[j] = round_bf16(a[j]) as u32 | ((round_bf16(b[j]) as u32) << 16);
    }
}

/// Converts f32 to bf16 bit patterns (round to nearest, ties to even), in parallel.
pub fn to_bf16(src: &[f32]) -> Vec<u16> {
    let mut out = vec![0u16; src.len()];
    out.par_chunks_mut(1 << 14)
        .zip(src.par_chunks(1 << 14))
        .for_each(|(d, s)| {
            #[cfg(target_arch = "x86_64")]
            if has_avx512_bf16() {
                // SAFETY: the CPU has the features; `d` and `s` have the same length.
                unsafe { x86::convert(s, d) };
                return;
            }
            for (d, &s) in d.iter_mut().zip(s) {
                *d = round_bf16(s);
            }
        });
    out
}

struct SendPtr<T>(*mut T);
// SAFETY: the users write disjoint parts of the pointee (see each use).
unsafe impl<T> Sync for SendPtr<T> {}
unsafe impl<T> Send for SendPtr<T> {}

/// `C += A B`: `A` is row-major bf16 `m x b.k()` with row stride `lda` (elements), `C` row-major f32 `m x b.n()`
/// with row stride `ldc`. Runs on rayon's threads.
pub fn gemm(m: usize, a: &[u16], lda: usize, b: &PackedB, c: &mut [f32], ldc: usize) {
    let (k, n) = (b.k, b.n);
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    assert!(lda >= k && a.len() >= (m - 1) * lda + k, "A is too small");
    assert!(ldc >= n && c.len() >= (m - 1) * ldc + n, "C is too small");
    #[cfg(target_arch = "x86_64")]
    if has_avx512_bf16() {
        gemm_avx512(m, a, lda, b, c, ldc);
        return;
    }
    gemm_portable(m, a, lda, b, c, ldc);
}

/// The same product through the f32 GEMM on the widened operands.
fn gemm_portable(m: usize, a: &[u16], lda: usize, b: &PackedB, c: &mut [f32], ldc: usize) {
    let (k, n) = (b.k, b.n);
    let af: Vec<f32> = (0..m)
        .flat_map(|r| a[r * lda..r * lda + k].iter())
        .map(|&v| bf16::from_bits(v).to_f32())
        .collect();
    let bf = b.to_f32();
    // SAFETY: dst is m x n with row stride ldc (checked by the caller), lhs m x k, rhs k x n, both contiguous.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            true,
            af.as_ptr(),
            1,
            k as isize,
            bf.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            super::conv::parallelism(),
        );
    }
}

#[cfg(target_arch = "x86_64")]
fn gemm_avx512(m: usize, a: &[u16], lda: usize, b: &PackedB, c: &mut [f32], ldc: usize) {
    let (k, n) = (b.k, b.n);
    let panels = n.div_ceil(NR);
    let col_blocks = panels.div_ceil(NP);
    // Rows per task: as many as fit the L2 budget, fewer when that leaves threads idle.
    let threads = rayon::current_num_threads().max(1);
    let mut mb = MB_MAX.min(m.div_ceil(MR) * MR);
    while mb > MR && m.div_ceil(mb) * col_blocks < 4 * threads {
        mb = (mb / 2).div_ceil(MR) * MR;
    }
    let row_blocks = m.div_ceil(mb);
    let cptr = SendPtr(c.as_mut_ptr());
    let (pairs, panel_len) = (b.pairs(), b.panel_len());
    (0..row_blocks * col_blocks).into_par_iter().for_each(|t| {
        let cptr = &cptr;
        let (rb, cb) = (t / col_blocks, t % col_blocks);
        let (r0, r1) = (rb * mb, ((rb + 1) * mb).min(m));
        let p0 = cb * NP;
        let np = (panels - p0).min(NP);
        let last_cols = n - (p0 + np - 1) * NR;
        for kp0 in (0..pairs).step_by(KC) {
            let kp1 = (kp0 + KC).min(pairs);
            // Full pairs in this block, and whether it ends with a lone k entry (odd k).
            let tail = kp1 == pairs && k % 2 == 1;
            let full = kp1 - kp0 - tail as usize;
            let mut r = r0;
            while r < r1 {
                let mr = (r1 - r).min(MR);
                // SAFETY: rows r..r + mr < m, columns p0 * NR.. of the task's own tile of C (tiles are
                // disjoint); A's rows hold k entries from column 2 * kp0; B's panels p0..p0 + np exist.
                unsafe {
                    x86::kernel_dispatch(
                        mr,
                        np,
                        full,
                        tail,
                        a.as_ptr().add(r * lda + 2 * kp0),
                        lda,
                        b.data.as_ptr().add(p0 * panel_len + kp0 * NR),
                        panel_len,
                        cptr.0.add(r * ldc + p0 * NR),
                        ldc,
                        last_cols,
                    );
                }
                r += mr;
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{MR, NP, NR};

    /// `dst[j] = bf16(a[j]) | bf16(b[j]) << 16` for 16 lanes.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn interleave16(a: *const f32, b: *const f32, dst: *mut u32) {
        let lo = _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(
            _mm512_cvtneps_pbh(_mm512_loadu_ps(a)),
        ));
        let hi = _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(
            _mm512_cvtneps_pbh(_mm512_loadu_ps(b)),
        ));
        _mm512_storeu_si512(
            dst.cast(),
            _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi)),
        );
    }

    /// f32 to bf16 bits, 16 at a time, scalar for the rest.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn convert(s: &[f32], d: &mut [u16]) {
        let n = s.len().min(d.len());
        let mut i = 0;
        while i + 16 <= n {
            let v = _mm512_cvtneps_pbh(_mm512_loadu_ps(s.as_ptr().add(i)));
            _mm256_storeu_si256(
                d.as_mut_ptr().add(i).cast(),
                std::mem::transmute::<__m256bh, __m256i>(v),
            );
            i += 16;
        }
        for j in i..n {
            d[j] = super::round_bf16(s[j]);
        }
    }

    /// Calls the micro-kernel instance for `mr` rows (1..=8) and `np` panels (1..=3).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub(super) unsafe fn kernel_dispatch(
        mr: usize,
        np: usize,
        full: usize,
        tail: bool,
        a: *const u16,
        lda: usize,
        b: *const u32,
        panel_len: usize,
        c: *mut f32,
        ldc: usize,
        last_cols: usize,
    ) {
        macro_rules! go {
            ($($r:literal)*) => {
                match (mr, np) {
                    $(
                        ($r, 1) => kernel::<$r, 1>(full, tail, a, lda, b, panel_len, c, ldc, last_cols),
                        ($r, 2) => kernel::<$r, 2>(full, tail, a, lda, b, panel_len, c, ldc, last_cols),
                        ($r, 3) => kernel::<$r, 3>(full, tail, a, lda, b, panel_len, c, ldc, last_cols),
                    )*
                    _ => unreachable!("micro-kernel for {mr} rows and {np} panels"),
                }
            };
        }
        const _: () = assert!(MR == 8 && NP == 3);
        go!(1 2 3 4 5 6 7 8)
    }

    /// `C[R x P*16] += A[R x (2 full + tail)] B`, the last panel storing only `last_cols` columns.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn kernel<const R: usize, const P: usize>(
        full: usize,
        tail: bool,
        a: *const u16,
        lda: usize,
        b: *const u32,
        panel_len: usize,
        c: *mut f32,
        ldc: usize,
        last_cols: usize,
    ) {
        let last_mask: __mmask16 = if last_cols >= NR {
            0xffff
        } else {
            (1u16 << last_cols) - 1
        };
        let mask = |q: usize| if q + 1 == P { last_mask } else { 0xffff };
        let mut acc = [[_mm512_setzero_ps(); P]; R];
        for (r, row) in acc.iter_mut().enumerate() {
            for (q, v) in row.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_ps(mask(q), c.add(r * ldc + q * NR));
            }
        }
        let mut bp = [b; P];
        for (q, p) in bp.iter_mut().enumerate() {
            *p = b.add(q * panel_len);
        }
        for p in 0..full {
            let mut bv = [_mm512_setzero_si512(); P];
            for q in 0..P {
                bv[q] = _mm512_loadu_si512(bp[q].add(p * NR).cast());
            }
            for r in 0..R {
                let av = _mm512_set1_epi32(a.add(r * lda + 2 * p).cast::<i32>().read_unaligned());
                for q in 0..P {
                    acc[r][q] = _mm512_dpbf16_ps(
                        acc[r][q],
                        std::mem::transmute::<__m512i, __m512bh>(av),
                        std::mem::transmute::<__m512i, __m512bh>(bv[q]),
                    );
                }
            }
        }
        if tail {
            let p = full;
            let mut bv = [_mm512_setzero_si512(); P];
            for q in 0..P {
                bv[q] = _mm512_loadu_si512(bp[q].add(p * NR).cast());
            }
            for r in 0..R {
                // The lone last entry, paired with zero (B's pad is zero too).
                let av = _mm512_set1_epi32(*a.add(r * lda + 2 * p) as i32);
                for q in 0..P {
                    acc[r][q] = _mm512_dpbf16_ps(
                        acc[r][q],
                        std::mem::transmute::<__m512i, __m512bh>(av),
                        std::mem::transmute::<__m512i, __m512bh>(bv[q]),
                    );
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (q, v) in row.iter().enumerate() {
                _mm512_mask_storeu_ps(c.add(r * ldc + q * NR), mask(q), *v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// The f64 product of the bf16-rounded operands.
    fn reference(m: usize, n: usize, k: usize, a: &[f32], bt: &[f32], c0: &[f32]) -> Vec<f32> {
        let r = |x: f32| bf16::from_f32(x).to_f64();
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = c0[i * n + j] as f64;
                for l in 0..k {
                    s += r(a[i * k + l]) * r(bt[j * k + l]);
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    fn check(m: usize, n: usize, k: usize) {
        let mut seed = (m * 1000003 + n * 1009 + k) as u64;
        let a: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
        let bt: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
        let c0: Vec<f32> = (0..m * n).map(|_| lcg(&mut seed)).collect();
        let want = reference(m, n, k, &a, &bt, &c0);
        let a16 = to_bf16(&a);
        let packs = [
            PackedB::from_transposed(&bt, n, k),
            PackedB::from_rows(k, n, |r, row| {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = bt[j * k + r];
                }
            }),
        ];
        assert_eq!(packs[0].data, packs[1].data, "both packings agree");
        for (name, run) in [
            ("dispatch", gemm as fn(usize, &[u16], usize, &PackedB, &mut [f32], usize)),
            ("portable", gemm_portable),
        ] {
            let mut c = c0.clone();
            run(m, &a16, k, &packs[0], &mut c, n);
            let worst = want
                .iter()
                .zip(&c)
                .map(|(w, g)| (w - g).abs())
                .fold(0f32, f32::max);
            // Summation-order differences of k products of size <= 1.
            let bound = 2e-6 * (k as f32).sqrt() * 4.0 + 1e-6;
            assert!(worst <= bound, "{name} {m}x{n}x{k}: max diff {worst} > {bound}");
        }
    }

    #[test]
    fn matches_the_rounded_product_on_every_edge() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 16, 2),
            (8, 48, 256),
            (9, 49, 257),
            (7, 15, 3),
            (17, 33, 255),
            (3, 100, 600),
            (130, 20, 31),
            (64, 96, 1000),
            (2, 1280, 320),
        ] {
            check(m, n, k);
        }
    }

    #[test]
    fn rounds_to_nearest_even_like_torch() {
        // 1 + 2^-8 is halfway between bf16 1.0 and 1.0078125: ties go to the even mantissa (1.0).
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), bf16::from_f32(1.0).to_bits());
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), bf16::from_f32(1.015625).to_bits());
        let xs = [0.1f32, -3.7, 1e-30, 65504.0, f32::INFINITY, -0.0];
        let want: Vec<u16> = xs.iter().map(|&x| round_bf16(x)).collect();
        let mut long = xs.repeat(7);
        long.push(2.5);
        let got = to_bf16(&long);
        assert_eq!(&got[..6], &want[..]);
        assert_eq!(got[42], round_bf16(2.5));
        assert!(bf16::from_bits(to_bf16(&[f32::NAN])[0]).is_nan());
    }
}
