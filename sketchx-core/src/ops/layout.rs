//! Layout changes between the networks' image layout `(b, c, h, w)` and the transformers' token layout
//! `(b, h * w, c)`: a blocked transpose of each image's matrix on rayon's threads (candle's strided copy of a
//! permuted view walks the source with a large stride on one thread); and nearest-neighbour upsampling by an
//! integer factor, one parallel task per plane (candle's computes a source index per pixel on one thread).
//! Other dtypes and devices use candle. [`transpose_32`] is the blocked transpose the CPU ops share.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::SendPtr;
use super::norm::ChannelNorm;

/// `(b, c, h, w)` to `(b, h * w, c)`. Timed as `layout`.
pub fn to_tokens(x: &Tensor) -> Result<Tensor> {
    super::profile::scope("layout", || {
        let (b, c, h, w) = x.dims4()?;
        if fast(x) {
            let op = Transpose {
                rows: c,
                cols: h * w,
            };
            return x
                .contiguous()?
                .apply_op1_no_bwd(&op)?
                .reshape((b, h * w, c));
        }
        // (The reshape of the permuted view copies it into a contiguous tensor.)
        x.permute((0, 2, 3, 1))?.reshape((b, h * w, c))
    })
}

/// `(b, c, h, w)` group-normalised by `norm` (without SiLU) and rounded to bf16, as tokens `(b, h * w, c)`: the
/// statistics ([`ChannelNorm::channel_affine`]), then every value written once, as `x * a + b` per image and
/// channel, into its token (see [`FastGroupNorm::forward_tokens_bf16`]). A BF16 CPU tensor, lined
/// ([`super::cpu::Out`]); an f32 CPU input only.
///
/// [`FastGroupNorm::forward_tokens_bf16`]: super::norm::FastGroupNorm::forward_tokens_bf16
pub(crate) fn to_tokens_normed_bf16(x: &Tensor, norm: &ChannelNorm) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if !fast(x) {
        candle_core::bail!("to_tokens_normed_bf16: expected an f32 CPU tensor");
    }
    let out = x.contiguous()?.apply_op1_no_bwd(&TokensNormed { norm })?;
    super::cpu::lined_view(&out, &[b, h * w, c])
}

/// The op of [`to_tokens_normed_bf16`].
struct TokensNormed<'a> {
    norm: &'a ChannelNorm,
}

impl CustomOp1 for TokensNormed<'_> {
    fn name(&self) -> &'static str {
        "sketchx-tokens-normed-bf16"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::cpu::contiguous_f32(s, l, "group norm input")?;
        let (b, c, h, w) = l.shape().dims4()?;
        let hw = h * w;
        let (a, shift): (Vec<f32>, Vec<f32>) =
            self.norm.channel_affine(x, b, c, hw)?.into_iter().unzip();
        let len = b * hw * c;
        // Never zeroed: the tasks write every token's channels (below).
        let mut out = super::cpu::Out::<half::bf16>::uninit(len, true);
        let dst = SendPtr(out.ptr().cast::<u16>());
        let stripes = hw.div_ceil(16);
        (0..b * stripes).into_par_iter().for_each(|t| {
            let dst = &dst;
            let (bi, st) = (t / stripes, t % stripes);
            let (p0, np) = (st * 16, (hw - st * 16).min(16));
            let img = &x[bi * c * hw..][..c * hw];
            let params = (&a[bi * c..][..c], &shift[bi * c..][..c]);
            // SAFETY: tokens p0..p0 + np of image bi (c values each) lie inside the output and are this task's.
            unsafe {
                tokens_affine_block(img, hw, params, (p0, np), dst.0.add((bi * hw + p0) * c))
            };
        });
        // SAFETY: the stripes cover every token of every image, each written in full.
        let (v, shape) = unsafe { out.finish(Shape::from((b, hw, c))) };
        Ok((CpuStorage::BF16(v), shape))
    }
}

/// Tokens `p0..p0 + np` of one image (`img`: `c` planes of `hw` values) into `dst` (`np` rows of `c` bf16 values):
/// `round(x * a + b)` per channel, the product and the sum rounded apart as the group norm rounds them, then to
/// nearest even. Whole 16 x 16 blocks go through [`x86::transpose_16`] and 16-lane vectors.
///
/// # Safety
/// `dst` must be writable at `np * c` values; `p0 + np <= hw`, and `a`, `b` hold `c` values each.
unsafe fn tokens_affine_block(
    img: &[f32],
    hw: usize,
    (a, b): (&[f32], &[f32]),
    (p0, np): (usize, usize),
    dst: *mut u16,
) {
    let c = a.len();
    let mut c0 = 0;
    #[cfg(target_arch = "x86_64")]
    if np == 16 && super::cpu::features().avx512_bf16 {
        let mut block = [0f32; 256];
        while c0 + 16 <= c {
            // SAFETY: 16 planes from c0, 16 positions from p0, inside `img`; AVX-512 F and BF16 are available;
            // the 16 rows of 16 values from `dst + c0`, `c` apart, are the caller's.
            unsafe {
                x86::transpose_16(
                    img.as_ptr().add(c0 * hw + p0).cast(),
                    hw,
                    block.as_mut_ptr().cast(),
                    16,
                );
                x86::affine_rows_bf16(&block, (&a[c0..c0 + 16], &b[c0..c0 + 16]), dst.add(c0), c);
            }
            c0 += 16;
        }
    }
    for ch in c0..c {
        for r in 0..np {
            let y = img[ch * hw + p0 + r] * a[ch] + b[ch];
            // SAFETY: row r < np, channel ch < c (the contract).
            unsafe { *dst.add(r * c + ch) = super::gemm::round_bf16(y) };
        }
    }
}

/// `(b, h * w, c)` to `(b, c, h, w)`. Timed as `layout`.
pub fn to_image(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    super::profile::scope("layout", || {
        let (b, hw, c) = x.dims3()?;
        if hw != h * w {
            candle_core::bail!("to_image: {hw} tokens for a {h}x{w} image");
        }
        if fast(x) {
            let op = Transpose { rows: hw, cols: c };
            return x.contiguous()?.apply_op1_no_bwd(&op)?.reshape((b, c, h, w));
        }
        x.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()
    })
}

/// `to_image(x, h, w) + residual` (`residual` `(b, c, h, w)`) in one pass: each block of the transposed image gets
/// its residual added while it is in L1. The same values as the two ops. Timed as `layout`.
pub fn to_image_add(x: &Tensor, h: usize, w: usize, residual: &Tensor) -> Result<Tensor> {
    super::profile::scope("layout", || {
        let (b, hw, c) = x.dims3()?;
        if hw != h * w || residual.dims() != [b, c, h, w] {
            candle_core::bail!(
                "to_image_add: {hw} tokens of {c} channels for a {h}x{w} image plus {:?}",
                residual.dims()
            );
        }
        if fast(x) && fast(residual) {
            let op = Transpose { rows: hw, cols: c };
            return x
                .contiguous()?
                .apply_op2_no_bwd(&residual.contiguous()?, &op)?
                .reshape((b, c, h, w));
        }
        to_image(x, h, w)? + residual
    })
}

/// Nearest-neighbour upsampling of `(b, c, h, w)` by the integer factor `s` along both sides, as
/// `F.interpolate(scale_factor=s, mode="nearest")`: every pixel repeated `s x s` times. Timed as `layout`.
pub fn upsample_nearest(x: &Tensor, s: usize) -> Result<Tensor> {
    super::profile::scope("layout", || {
        let (b, c, h, w) = x.dims4()?;
        if s == 1 {
            return Ok(x.clone());
        }
        if fast(x) {
            return x.contiguous()?.apply_op1_no_bwd(&Upsample { s, h, w });
        }
        // Broadcasting rather than index arithmetic: exact for any factor.
        x.reshape((b, c, h, 1, w, 1))?
            .broadcast_as((b, c, h, s, w, s))?
            .contiguous()?
            .reshape((b, c, h * s, w * s))
    })
}

fn fast(x: &Tensor) -> bool {
    super::kernels_enabled() && x.device().is_cpu() && x.dtype() == DType::F32
}

/// Each of the input's `rows x cols` matrices (the last two dimensions flattened as such) transposed: output
/// `(b, cols, rows)`.
struct Transpose {
    rows: usize,
    cols: usize,
}

/// Side of the square blocks moved at a time (a block of source rows and one of destination rows stay in L1).
const BLOCK: usize = 32;

impl CustomOp1 for Transpose {
    fn name(&self) -> &'static str {
        "sketchx-transpose"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::cpu::contiguous_f32(s, l, "transpose input")?;
        self.run(x, None)
    }
}

/// The transpose plus a residual laid out as its output (for [`to_image_add`]).
impl CustomOp2 for Transpose {
    fn name(&self) -> &'static str {
        "sketchx-transpose-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = super::cpu::contiguous_f32(s1, l1, "transpose input")?;
        let residual = super::cpu::contiguous_f32(s2, l2, "residual")?;
        if residual.len() != x.len() {
            candle_core::bail!(
                "transpose: {} residual values for {}",
                residual.len(),
                x.len()
            );
        }
        self.run(x, Some(residual))
    }
}

impl Transpose {
    /// Every matrix of `x` transposed, plus `residual` (laid out as the output) when given.
    fn run(&self, x: &[f32], residual: Option<&[f32]>) -> Result<(CpuStorage, Shape)> {
        let (rows, cols) = (self.rows, self.cols);
        let per = rows * cols;
        if per == 0 || !x.len().is_multiple_of(per) {
            candle_core::bail!("transpose: {} values for {rows}x{cols} matrices", x.len());
        }
        let b = x.len() / per;
        // Never zeroed: the stripes write every value (below).
        let mut out = super::cpu::output_uninit_f32(x.len());
        let stripes = cols.div_ceil(BLOCK);
        let dst = SendPtr(out.as_mut_ptr());
        // One task per stripe of BLOCK destination rows (source columns) of one image.
        (0..b * stripes).into_par_iter().for_each(|t| {
            let dst = &dst;
            let (bi, s) = (t / stripes, t % stripes);
            let (c0, c1) = (s * BLOCK, ((s + 1) * BLOCK).min(cols));
            let src = &x[bi * per..][..per];
            for r0 in (0..rows).step_by(BLOCK) {
                let r1 = (r0 + BLOCK).min(rows);
                let at = bi * per + c0 * rows + r0;
                // SAFETY: source rows r0..r1, columns c0..c1 lie inside image bi's matrix; destination rows c0..c1
                // of image bi (columns r0..r1 < rows) belong to this task's stripe only, inside `out` (b * cols *
                // rows values), another buffer, and inside the residual (laid out as `out`).
                unsafe {
                    transpose_add_f32(
                        src.as_ptr().add(r0 * cols + c0),
                        cols,
                        dst.0.add(at),
                        rows,
                        (r1 - r0, c1 - c0),
                        residual.map(|r| &r[at..]),
                    )
                };
            }
        });
        // SAFETY: the tasks' stripes cover every destination row of every image, each written in full.
        unsafe { out.set_len(x.len()) };
        Ok((CpuStorage::F32(out), Shape::from((b, cols, rows))))
    }
}

/// [`transpose_32`] of f32 values, with `residual` (laid out as `dst`, from its first value: `residual[c * ldd +
/// r]`) added to each value written, when given.
///
/// # Safety
/// As [`transpose_32`]; `residual` must hold every `c * ldd + r` (`r < rows`, `c < cols`).
pub(crate) unsafe fn transpose_add_f32(
    src: *const f32,
    lds: usize,
    dst: *mut f32,
    ldd: usize,
    (rows, cols): (usize, usize),
    residual: Option<&[f32]>,
) {
    // SAFETY: the contract.
    unsafe { transpose_32(src, lds, dst, ldd, rows, cols) };
    let Some(residual) = residual else {
        return;
    };
    for c in 0..cols {
        // SAFETY: the contract (the row just written).
        let d = unsafe { std::slice::from_raw_parts_mut(dst.add(c * ldd), rows) };
        d.iter_mut()
            .zip(&residual[c * ldd..c * ldd + rows])
            .for_each(|(d, r)| *d += r);
    }
}

/// Transposes a `rows x cols` block of 32-bit values: `dst[c * ldd + r] = src[r * lds + c]`. Whole 16 x 16 blocks
/// go through AVX-512 registers where the CPU has them (16 loads, 64 shuffles, 16 stores), the rest one value at
/// a time.
///
/// # Safety
/// `src` must be readable at every `r * lds + c` and `dst` writable at every `c * ldd + r` (`r < rows`, `c <
/// cols`), and the two must not overlap.
pub(crate) unsafe fn transpose_32<T: Copy>(
    src: *const T,
    lds: usize,
    dst: *mut T,
    ldd: usize,
    rows: usize,
    cols: usize,
) {
    const { assert!(std::mem::size_of::<T>() == 4) };
    let one_by_one = |rs: std::ops::Range<usize>, cs: std::ops::Range<usize>| {
        for r in rs {
            for c in cs.clone() {
                // SAFETY: the caller's contract (r < rows, c < cols).
                unsafe { *dst.add(c * ldd + r) = *src.add(r * lds + c) };
            }
        }
    };
    #[cfg(target_arch = "x86_64")]
    if super::cpu::features().avx512 {
        let (fr, fc) = (rows / 16 * 16, cols / 16 * 16);
        for r0 in (0..fr).step_by(16) {
            for c0 in (0..fc).step_by(16) {
                // SAFETY: a whole block inside the caller's rows and columns; AVX-512 is available.
                unsafe {
                    x86::transpose_16(
                        src.add(r0 * lds + c0).cast(),
                        lds,
                        dst.add(c0 * ldd + r0).cast(),
                        ldd,
                    )
                };
            }
        }
        one_by_one(fr..rows, 0..cols);
        one_by_one(0..fr, fc..cols);
        return;
    }
    one_by_one(0..rows, 0..cols);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// The 16 rows of `block` (16 channels each) as `x * a + b` per channel (a product and a sum, each rounded),
    /// then rounded to bf16 by `vcvtneps2bf16`, into 16 rows of `dst` `ldd` apart.
    ///
    /// # Safety
    /// AVX-512 F and BF16 must be available; `a` and `b` hold 16 values; `dst` is writable at 16 rows of 16 values.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn affine_rows_bf16(
        block: &[f32; 256],
        (a, b): (&[f32], &[f32]),
        dst: *mut u16,
        ldd: usize,
    ) {
        // SAFETY (all loads and stores): the contract.
        unsafe {
            let (va, vb) = (_mm512_loadu_ps(a.as_ptr()), _mm512_loadu_ps(b.as_ptr()));
            for r in 0..16 {
                let y = _mm512_add_ps(
                    _mm512_mul_ps(_mm512_loadu_ps(block.as_ptr().add(16 * r)), va),
                    vb,
                );
                _mm256_storeu_si256(
                    dst.add(r * ldd).cast(),
                    std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(y)),
                );
            }
        }
    }

    /// One 16 x 16 block of [`super::transpose_32`]: 32-bit pairs, then 64-bit pairs, then 128-bit lanes twice.
    ///
    /// # Safety
    /// AVX-512F must be available; `src` readable at 16 rows of 16 values `lds` apart, `dst` writable at 16 rows
    /// `ldd` apart.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose_16(src: *const i32, lds: usize, dst: *mut i32, ldd: usize) {
        // SAFETY (loads and stores): the contract.
        let r: [__m512i; 16] =
            std::array::from_fn(|i| unsafe { _mm512_loadu_si512(src.add(i * lds).cast()) });
        // t[2g], t[2g + 1]: rows 2g, 2g + 1 interleaved, entries 0-1 and 2-3 of each 128-bit lane.
        let t: [__m512i; 16] = std::array::from_fn(|i| {
            let (a, b) = (r[i & !1], r[i | 1]);
            if i % 2 == 0 {
                _mm512_unpacklo_epi32(a, b)
            } else {
                _mm512_unpackhi_epi32(a, b)
            }
        });
        // u[4g + c], lane l: column 4l + c, rows 4g..4g + 4.
        let u: [__m512i; 16] = std::array::from_fn(|i| {
            let (g, c) = (i / 4, i % 4);
            let (a, b) = (t[4 * g + c / 2], t[4 * g + 2 + c / 2]);
            if c % 2 == 0 {
                _mm512_unpacklo_epi64(a, b)
            } else {
                _mm512_unpackhi_epi64(a, b)
            }
        });
        for c in 0..4 {
            let even = |a, b| _mm512_shuffle_i32x4::<0x88>(a, b);
            let odd = |a, b| _mm512_shuffle_i32x4::<0xdd>(a, b);
            let (v, v2) = (even(u[c], u[4 + c]), even(u[8 + c], u[12 + c]));
            let (w, w2) = (odd(u[c], u[4 + c]), odd(u[8 + c], u[12 + c]));
            // Destination row 4l + c gathers lane l of u[c], u[4 + c], u[8 + c], u[12 + c].
            for (l, out) in [
                (0, even(v, v2)),
                (2, odd(v, v2)),
                (1, even(w, w2)),
                (3, odd(w, w2)),
            ] {
                unsafe { _mm512_storeu_si512(dst.add((4 * l + c) * ldd).cast(), out) };
            }
        }
    }
}

/// Nearest-neighbour upsampling of `h x w` planes by `s` (see [`upsample_nearest`]).
struct Upsample {
    s: usize,
    h: usize,
    w: usize,
}

impl CustomOp1 for Upsample {
    fn name(&self) -> &'static str {
        "sketchx-upsample-nearest"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::cpu::contiguous_f32(st, l, "upsample input")?;
        let (b, c, h, w) = l.shape().dims4()?;
        let (s, ow) = (self.s, self.w * self.s);
        if (h, w) != (self.h, self.w) || s == 0 {
            candle_core::bail!("upsample: input {h}x{w}, expected {}x{}", self.h, self.w);
        }
        let mut out = super::cpu::output_f32(x.len() * s * s);
        if !out.is_empty() {
            out.par_chunks_mut(h * s * ow)
                .zip(x.par_chunks(h * w))
                .for_each(|(dst, src)| {
                    for (rows, row) in dst.chunks_exact_mut(s * ow).zip(src.chunks_exact(w)) {
                        let (first, rest) = rows.split_at_mut(ow);
                        for (d, &v) in first.chunks_exact_mut(s).zip(row) {
                            d.fill(v);
                        }
                        for r in rest.chunks_exact_mut(ow) {
                            r.copy_from_slice(first);
                        }
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from((b, c, h * s, ow))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn round_trips_and_matches_candle() {
        let dev = Device::Cpu;
        for (b, c, h, w) in [(2, 5, 3, 7), (1, 33, 1, 1), (3, 64, 9, 5), (1, 1, 40, 2)] {
            let x = Tensor::randn(0f32, 1., (b, c, h, w), &dev).unwrap();
            let want = x
                .permute((0, 2, 3, 1))
                .unwrap()
                .reshape((b, h * w, c))
                .unwrap();
            let tokens = to_tokens(&x).unwrap();
            assert_eq!(tokens.dims(), want.dims());
            assert_eq!(crate::ops::max_abs_diff(&tokens, &want), 0.0);
            let back = to_image(&tokens, h, w).unwrap();
            assert_eq!(back.dims(), x.dims());
            assert_eq!(crate::ops::max_abs_diff(&back, &x), 0.0);
        }
        let t = Tensor::zeros((1, 6, 2), DType::F32, &dev).unwrap();
        assert!(to_image(&t, 2, 2).is_err(), "6 tokens are not a 2x2 image");
        let r = Tensor::zeros((1, 2, 3, 2), DType::F32, &dev).unwrap();
        assert!(
            to_image_add(&t, 3, 2, &r.t().unwrap()).is_err(),
            "a residual of another shape"
        );
    }

    /// The fused residual: the same bits as the transpose, then the addition.
    #[test]
    fn to_image_add_is_the_two_ops() {
        let dev = Device::Cpu;
        for (b, c, h, w) in [(2, 5, 3, 7), (1, 33, 1, 1), (3, 64, 9, 5), (1, 40, 8, 8)] {
            let t = Tensor::randn(0f32, 1., (b, h * w, c), &dev).unwrap();
            let r = Tensor::randn(0f32, 1., (b, c, h, w), &dev).unwrap();
            let want = (to_image(&t, h, w).unwrap() + &r).unwrap();
            let got = to_image_add(&t, h, w, &r).unwrap();
            assert_eq!(got.dims(), want.dims());
            let bits = |t: &Tensor| -> Vec<u32> {
                let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                v.iter().map(|x| x.to_bits()).collect()
            };
            assert!(bits(&got) == bits(&want), "{b}x{c}x{h}x{w}");
        }
    }

    #[test]
    fn transposes_blocks_of_any_size() {
        for (rows, cols, lds, ldd) in [
            (16, 16, 16, 16),
            (35, 50, 53, 40),
            (3, 17, 17, 5),
            (48, 32, 40, 50),
        ] {
            let src: Vec<u32> = (0..rows * lds).map(|i| i as u32 * 7 + 1).collect();
            let mut dst = vec![0u32; cols * ldd];
            // SAFETY: the buffers hold rows x lds and cols x ldd values.
            unsafe { transpose_32(src.as_ptr(), lds, dst.as_mut_ptr(), ldd, rows, cols) };
            for c in 0..cols {
                for r in 0..ldd {
                    let want = if r < rows { src[r * lds + c] } else { 0 };
                    assert_eq!(dst[c * ldd + r], want, "{rows}x{cols}: ({r}, {c})");
                }
            }
        }
    }

    #[test]
    fn upsampling_repeats_each_pixel() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 6.0, &dev)
            .unwrap()
            .reshape((1, 1, 2, 3))
            .unwrap();
        let v = upsample_nearest(&x, 3).unwrap();
        assert_eq!(v.dims4().unwrap(), (1, 1, 6, 9));
        let v = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for y in 0..6 {
            for xx in 0..9 {
                assert_eq!(v[y * 9 + xx], ((y / 3) * 3 + xx / 3) as f32);
            }
        }
        for (b, c, h, w, s) in [
            (1, 3, 4, 5, 2),
            (2, 2, 1, 1, 3),
            (1, 1, 7, 3, 1),
            (2, 3, 3, 2, 4),
        ] {
            let x = Tensor::randn(0f32, 1., (b, c, h, w), &dev).unwrap();
            let got = upsample_nearest(&x, s).unwrap();
            // candle's broadcasting path (taken for f64) and, for factor 2 where its index arithmetic is exact,
            // candle's own upsampling.
            let plain = upsample_nearest(&x.to_dtype(DType::F64).unwrap(), s).unwrap();
            let plain = plain.to_dtype(DType::F32).unwrap();
            assert_eq!(got.dims(), &[b, c, h * s, w * s]);
            assert_eq!(
                crate::ops::max_abs_diff(&got, &plain),
                0.0,
                "{b}x{c}x{h}x{w} by {s}"
            );
            if s == 2 {
                let want = x.upsample_nearest2d(h * s, w * s).unwrap();
                assert_eq!(
                    crate::ops::max_abs_diff(&got, &want),
                    0.0,
                    "candle's upsampling"
                );
            }
        }
        let empty = Tensor::zeros((1, 0, 2, 2), DType::F32, &dev).unwrap();
        assert_eq!(upsample_nearest(&empty, 2).unwrap().dims(), &[1, 0, 4, 4]);
    }
}
