//! The crate's own matrix product for the CPU, in f32 and in bf16 (f32 accumulation).
//!
//! `C += A B` with `A` row-major (`m x k`: a layer's kernel, or the activations of a linear layer) and `B` packed
//! once into [`PackedB`]: column panels of [`NR`] columns, each 32-bit word holding one `k` entry (f32) or two
//! consecutive ones (bf16: the operand layout of AVX-512 BF16's `vdpbf16ps`, 16 lanes each adding a two-term dot
//! product to an f32 accumulator). The AVX-512 micro-kernel keeps an 8-row x 48-column block of `C` in 24
//! registers, broadcasts one word of `A` per row and loads three words of `B` per step, and prefetches the next
//! call's block of `A` into L1 as it goes (the rows of a row-major `A` are far apart); tiles of `C` run in
//! parallel on rayon's threads. Products of bf16 numbers are exact in f32, so the bf16 result differs from an f32
//! product of the bf16-rounded inputs only by the order of the additions.
//!
//! Without AVX-512 (or AVX-512 BF16 for bf16) the same operands go through the `gemm` crate in f32: the same
//! numbers up to summation order, without the speed.

use std::mem::MaybeUninit;

use half::bf16;
use rayon::prelude::*;

use super::cpu::{SendPtr, Values};

/// Columns per packed panel (one 512-bit register of f32 accumulators).
pub const NR: usize = 16;
/// Rows of `C` per micro-kernel call.
const MR: usize = 8;
/// Panels per micro-kernel call (8 x 3 accumulators + 3 operands of `B` + 1 of `A` fit in 32 registers).
const NP: usize = 3;
/// Words of `k` per block: one block of three panels (`KC x 48` words, 24 KiB) stays in the L1 cache while the
/// rows of a tile stream past it.
const KC: usize = 128;
/// Largest number of rows per parallel task.
const MB_MAX: usize = 128;
/// Bytes of a task's rows of `A` (over the whole `k`) that stay cached from one column block to the next.
const A_ROWS_CACHED: usize = 512 << 10;

/// The element type of the operands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// f32 operands.
    F32,
    /// bf16 operands (rounded to nearest, ties to even), f32 accumulation.
    Bf16,
}

impl Format {
    /// `k` entries per packed word.
    fn per_word(self) -> usize {
        match self {
            Self::F32 => 1,
            Self::Bf16 => 2,
        }
    }

    /// Whether this CPU runs the AVX-512 micro-kernel for this format.
    pub fn has_fast_kernel(self) -> bool {
        let f = super::cpu::features();
        match self {
            Self::F32 => f.avx512,
            Self::Bf16 => f.avx512_bf16,
        }
    }
}

/// Rounds to the nearest bf16 (ties to even), as `vcvtneps2bf16` and torch do.
#[inline]
pub fn round_bf16(x: f32) -> u16 {
    bf16::from_f32(x).to_bits()
}

/// The words of a packed matrix, starting on a 64-byte boundary (a cache line, and one tile row): aligned panels
/// and rows are read as whole lines by vector and tile loads instead of straddling two (the allocator only promises
/// 16 bytes).
#[derive(Clone, Default)]
pub(crate) struct Words {
    buf: Vec<u32>,
    off: usize,
    len: usize,
}

impl Words {
    /// `len` zero words.
    pub(crate) fn zeroed(len: usize) -> Self {
        Self::reuse(Vec::new(), len)
    }

    /// `len` words in `buf`'s memory when it holds enough (their values are then whatever it held: for callers that
    /// write every word), else in new zeroed memory ([`super::cpu::line_offset`]).
    pub(crate) fn reuse(mut buf: Vec<u32>, len: usize) -> Self {
        let off = super::cpu::line_offset(&mut buf, len);
        Self { buf, off, len }
    }

    /// The memory, for [`Words::reuse`].
    pub(crate) fn into_vec(self) -> Vec<u32> {
        self.buf
    }
}

impl std::ops::Deref for Words {
    type Target = [u32];
    fn deref(&self) -> &[u32] {
        &self.buf[self.off..self.off + self.len]
    }
}

impl std::ops::DerefMut for Words {
    fn deref_mut(&mut self) -> &mut [u32] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

impl std::fmt::Debug for Words {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Words({} words)", self.len)
    }
}

impl PartialEq for Words {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

/// The right-hand operand of [`gemm_f32`] / [`gemm_bf16`]: a `k x n` matrix packed in column panels of [`NR`]
/// (zeros past `k` and `n`).
#[derive(Debug, Clone)]
pub struct PackedB {
    k: usize,
    n: usize,
    format: Format,
    /// `panels x words x NR`, `words = ceil(k / per_word)`: word `(panel, p, j)` holds `b[p][panel * NR + j]`
    /// (f32 bits), or `b[2p][..]` in the low half and `b[2p + 1][..]` in the high half (bf16).
    data: Words,
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

    /// The element type.
    pub fn format(&self) -> Format {
        self.format
    }

    fn words(&self) -> usize {
        self.k.div_ceil(self.format.per_word())
    }

    /// The packed words (`panels x words x NR`).
    pub(crate) fn data_ptr(&self) -> *const u32 {
        self.data.as_ptr()
    }

    fn panel_len(&self) -> usize {
        self.words() * NR
    }

    /// Turns this matrix into a `k x n` one in `format` whose panels the caller writes through the returned words
    /// (word `(panel * words + p) * NR + j` for column `panel * NR + j`, `words = ceil(k / per_word)`: f32 bits of
    /// `b[p][..]`, or the bf16 pair `b[2p][..]` low, `b[2p + 1][..]` high; zeros past `k` and `n` are the caller's
    /// too), keeping the buffer: a matrix rebuilt at every call allocates (and faults in) its memory once.
    pub(crate) fn reuse_for_panels(&mut self, k: usize, n: usize, format: Format) -> &mut [u32] {
        let len = n.div_ceil(NR) * k.div_ceil(format.per_word()) * NR;
        self.data = Words::reuse(std::mem::take(&mut self.data).into_vec(), len);
        (self.k, self.n, self.format) = (k, n, format);
        &mut self.data[..len]
    }

    /// An empty f32 matrix, to be filled through [`PackedB::reuse_for_panels`].
    pub(crate) fn empty() -> Self {
        Self {
            k: 0,
            n: 0,
            format: Format::F32,
            data: Words::default(),
        }
    }

    /// Packs the transpose of a row-major `n x k` f32 matrix, i.e. `B = W^T` for a linear layer's weight `W`
    /// (`[out, in]`): `k = in`, `n = out`.
    pub fn from_transposed(w: &[f32], n: usize, k: usize, format: Format) -> Self {
        assert_eq!(w.len(), n * k, "weight size");
        let data = pack_row_blocks(w, n, k, NR, format);
        Self { k, n, format, data }
    }

    /// Packs a `k x n` matrix given column by column (`B^T` row by row): `column(j)` holds column `j`'s first
    /// entries (at most `k`; zeros after them; f32, or bf16 values that a bf16 packing takes as they are), e.g. a head's keys for `K^T`, read in place. On the calling thread,
    /// for callers that run in parallel already: each column is rounded with the vector conversion and its words
    /// written into its panel's lane.
    pub(crate) fn from_columns<'a>(
        n: usize,
        k: usize,
        format: Format,
        column: impl Fn(usize) -> Values<'a>,
    ) -> Self {
        let words = k.div_ceil(format.per_word());
        let mut data = Words::zeroed(n.div_ceil(NR) * words * NR);
        let mut row = vec![0u32; words];
        let mut halves = vec![0u16; 2 * words];
        for j in 0..n {
            match (format, column(j)) {
                (Format::F32, Values::F32(src)) => {
                    row.fill(0);
                    for (w, &v) in row.iter_mut().zip(&src[..src.len().min(k)]) {
                        *w = v.to_bits();
                    }
                }
                (Format::F32, Values::Bf16(src)) => {
                    row.fill(0);
                    for (w, &v) in row.iter_mut().zip(&src[..src.len().min(k)]) {
                        *w = bf16::from_bits(v).to_f32().to_bits();
                    }
                }
                (Format::Bf16, src) => {
                    halves.fill(0);
                    match src {
                        Values::F32(src) => convert_bf16(&src[..src.len().min(k)], &mut halves),
                        Values::Bf16(src) => {
                            let src = &src[..src.len().min(k)];
                            halves[..src.len()].copy_from_slice(src);
                        }
                    }
                    for (w, h) in row.iter_mut().zip(halves.chunks_exact(2)) {
                        *w = u32::from(h[0]) | (u32::from(h[1]) << 16);
                    }
                }
            }
            let (panel, lane) = (j / NR, j % NR);
            let block = &mut data[panel * words * NR..][..words * NR];
            for (p, &w) in row.iter().enumerate() {
                block[p * NR + lane] = w;
            }
        }
        Self { k, n, format, data }
    }

    /// Packs a `k x n` f32 matrix given row by row: `fill(r, row)` writes row `r` (`n` values) into `row`.
    /// Rows are produced in parallel (a word's worth at a time) and copied or rounded straight into the panels, so
    /// a matrix that is generated (im2col) never exists in full.
    pub fn from_rows(
        k: usize,
        n: usize,
        format: Format,
        fill: impl Fn(usize, &mut [f32]) + Sync,
    ) -> Self {
        Self::from_rows_in(Vec::new(), k, n, format, fill)
    }

    /// [`PackedB::from_rows`] into `buffer`'s memory (see [`PackedB::into_buffer`]): a buffer large enough is
    /// reused without being cleared or faulted in again, since every word is written.
    pub fn from_rows_in(
        buffer: Vec<u32>,
        k: usize,
        n: usize,
        format: Format,
        fill: impl Fn(usize, &mut [f32]) + Sync,
    ) -> Self {
        let per = format.per_word();
        let words = k.div_ceil(per);
        let panels = n.div_ceil(NR);
        let mut data = Words::reuse(buffer, panels * words * NR);
        let out = SendPtr(data.as_mut_ptr());
        // Enough words per task to amortise the scratch rows, enough tasks to balance the threads.
        let chunk = (words / (8 * rayon::current_num_threads().max(1))).clamp(1, 64);
        (0..words.div_ceil(chunk)).into_par_iter().for_each(|t| {
            let out = &out;
            let mut rows = vec![0f32; per * panels * NR];
            let (r0, r1) = rows.split_at_mut(panels * NR);
            for p in t * chunk..((t + 1) * chunk).min(words) {
                fill(per * p, &mut r0[..n]);
                if format == Format::Bf16 {
                    if 2 * p + 1 < k {
                        fill(2 * p + 1, &mut r1[..n]);
                    } else {
                        r1[..n].fill(0.0);
                    }
                }
                // SAFETY: words (.., p, ..) belong to word row p only, and each word row to one task; every
                // `(panel * words + p) * NR + NR` is within `data` (panels * words * NR words).
                unsafe { write_word_row(format, r0, r1, out.0, p, words, panels) };
            }
        });
        Self { k, n, format, data }
    }

    /// The packed words' memory, for [`PackedB::from_rows_in`].
    pub fn into_buffer(self) -> Vec<u32> {
        self.data.into_vec()
    }

    /// The matrix back in f32, row-major `k x n` (the portable path, and tests).
    pub fn to_f32(&self) -> Vec<f32> {
        let bt = unpack_row_blocks(&self.data, self.n, self.k, NR, self.format);
        let mut m = vec![0f32; self.k * self.n];
        for (c, row) in bt.chunks(self.k.max(1)).enumerate() {
            for (r, &v) in row.iter().enumerate() {
                m[r * self.n + c] = v;
            }
        }
        m
    }
}

/// A left operand packed once (a layer's kernel): blocks of 8 rows, word-interleaved so that the micro-kernel
/// reads its 8 broadcast words from one 32-byte line per step instead of 8 rows. In bf16 on a CPU with AMX, plain
/// row-major bf16 instead, the layout tile loads read (the AVX-512 kernel reads it too).
#[derive(Debug, Clone)]
pub struct PackedA {
    m: usize,
    k: usize,
    format: Format,
    /// Row-major bf16 (`m x k` entries, two per word) rather than blocks of 8 rows.
    row_major: bool,
    /// `ceil(m / MR) x words x MR` words; rows past `m` and entries past `k` are zero.
    data: Words,
}

impl PackedA {
    /// Packs a row-major `m x k` f32 matrix (rounded to bf16 for [`Format::Bf16`]).
    pub fn new(a: &[f32], m: usize, k: usize, format: Format) -> Self {
        assert_eq!(a.len(), m * k, "matrix size");
        #[cfg(target_arch = "x86_64")]
        if format == Format::Bf16 && super::amx::available() {
            let mut data = Words::zeroed((m * k).div_ceil(2));
            // SAFETY: `data` holds at least m * k u16 values, and u16 has a smaller alignment than u32.
            let halves =
                unsafe { std::slice::from_raw_parts_mut(data.as_mut_ptr().cast::<u16>(), m * k) };
            halves
                .par_chunks_mut(1 << 14)
                .zip(a.par_chunks(1 << 14))
                .for_each(|(d, s)| {
                    for (d, &s) in d.iter_mut().zip(s) {
                        *d = round_bf16(s);
                    }
                });
            return Self {
                m,
                k,
                format,
                row_major: true,
                data,
            };
        }
        let data = pack_row_blocks(a, m, k, MR, format);
        Self {
            m,
            k,
            format,
            row_major: false,
            data,
        }
    }

    /// `count` matrices `m x k` packed in bf16 by blocks of rows, as [`PackedA::new`] packs one without AMX:
    /// `fill(rows, out)` writes rows `rows` of every matrix into `out` (matrix `i`'s rows at `i * rows.len() *
    /// k`), block by block in parallel, so that no matrix is ever whole in f32.
    pub(crate) fn many_bf16(
        count: usize,
        m: usize,
        k: usize,
        fill: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync,
    ) -> Vec<Self> {
        let words = k.div_ceil(2);
        let mut data: Vec<Words> = (0..count)
            .map(|_| Words::zeroed(m.div_ceil(MR) * words * MR))
            .collect();
        let blocks = m.div_ceil(MR);
        let mut per_block: Vec<Vec<&mut [u32]>> = (0..blocks).map(|_| Vec::new()).collect();
        for d in &mut data {
            for (blk, chunk) in d.chunks_mut((words * MR).max(1)).enumerate() {
                per_block[blk].push(chunk);
            }
        }
        per_block.into_par_iter().enumerate().for_each_init(
            || vec![0f32; count * MR * k],
            |buf, (blk, outs)| {
                let rows = blk * MR..((blk + 1) * MR).min(m);
                let n = rows.len();
                fill(rows, &mut buf[..count * n * k]);
                for (i, out) in outs.into_iter().enumerate() {
                    let src = &buf[i * n * k..][..n * k];
                    pack_block_bf16(src, n, k, MR, out);
                }
            },
        );
        data.into_iter()
            .map(|data| Self {
                m,
                k,
                format: Format::Bf16,
                row_major: false,
                data,
            })
            .collect()
    }

    /// Rows (`m`).
    #[cfg(any(test, feature = "bench-internals"))]
    pub fn m(&self) -> usize {
        self.m
    }

    /// Columns (`k`).
    #[cfg(any(test, feature = "bench-internals"))]
    pub fn k(&self) -> usize {
        self.k
    }

    /// The element type.
    pub fn format(&self) -> Format {
        self.format
    }

    /// The matrix back in f32, row-major `m x k` (the portable path, and tests).
    pub fn to_f32(&self) -> Vec<f32> {
        if self.row_major {
            return self
                .halves()
                .iter()
                .map(|&v| bf16::from_bits(v).to_f32())
                .collect();
        }
        unpack_row_blocks(&self.data, self.m, self.k, MR, self.format)
    }

    /// Where the micro-kernel finds this matrix.
    fn view(&self) -> AView {
        if self.row_major {
            AView::Rows {
                ptr: self.data.as_ptr().cast(),
                elem: 2,
                lda: self.k,
            }
        } else {
            AView::Packed {
                ptr: self.data.as_ptr(),
                words: self.k.div_ceil(self.format.per_word()),
            }
        }
    }

    /// The row-major bf16 entries (when `row_major`).
    fn halves(&self) -> &[u16] {
        // SAFETY: a row-major `data` holds at least m * k u16 values (see `new`).
        unsafe { std::slice::from_raw_parts(self.data.as_ptr().cast::<u16>(), self.m * self.k) }
    }
}

/// Packs a row-major `rows x k` f32 matrix in blocks of `width` rows, word-interleaved: word `(block, p, i)` holds
/// entry `p` (f32) or entries `2p`, `2p + 1` (bf16) of row `block * width + i`; zeros past `rows` and `k`. This is
/// [`PackedA`]'s layout, and [`PackedB`]'s for `B^T` (its panels are blocks of `NR` columns of `B`).
fn pack_row_blocks(src: &[f32], rows: usize, k: usize, width: usize, format: Format) -> Words {
    assert_eq!(src.len(), rows * k, "matrix size");
    let words = k.div_ceil(format.per_word());
    let mut data = Words::zeroed(rows.div_ceil(width) * words * width);
    if data.is_empty() {
        return data;
    }
    data.par_chunks_mut(words * width)
        .enumerate()
        .for_each(|(blk, out)| {
            let n = (rows - blk * width).min(width);
            let src = &src[blk * width * k..][..n * k];
            match format {
                Format::F32 => {
                    for (i, row) in src.chunks_exact(k).enumerate() {
                        for (p, &v) in row.iter().enumerate() {
                            out[p * width + i] = v.to_bits();
                        }
                    }
                }
                Format::Bf16 => pack_block_bf16(src, n, k, width, out),
            }
        });
    data
}

/// Packs `n <= width` rows of `k` values (`src`, row-major) as one block of bf16 pairs: word `p` of row `i` at
/// `out[p * width + i]`.
fn pack_block_bf16(src: &[f32], n: usize, k: usize, width: usize, out: &mut [u32]) {
    for (i, row) in src[..n * k].chunks_exact(k.max(1)).enumerate() {
        for (p, pair) in row.chunks(2).enumerate() {
            let hi = pair.get(1).map_or(0, |&v| round_bf16(v));
            out[p * width + i] = round_bf16(pair[0]) as u32 | ((hi as u32) << 16);
        }
    }
}

/// The inverse of [`pack_row_blocks`]: the `rows x k` matrix in f32.
fn unpack_row_blocks(
    data: &[u32],
    rows: usize,
    k: usize,
    width: usize,
    format: Format,
) -> Vec<f32> {
    let per = format.per_word();
    let words = k.div_ceil(per);
    let mut out = vec![0f32; rows * k];
    for r in 0..rows {
        for c in 0..k {
            let w = data[((r / width) * words + c / per) * width + r % width];
            out[r * k + c] = match format {
                Format::F32 => f32::from_bits(w),
                Format::Bf16 => {
                    let bits = if c % 2 == 0 { w & 0xffff } else { w >> 16 };
                    bf16::from_bits(bits as u16).to_f32()
                }
            };
        }
    }
    out
}

/// Writes word row `p` of every panel from one (f32: `r1` unused) or two (bf16) source rows of `panels * NR` values (past `n`
/// they are stale, but only ever multiplied into columns that are not stored).
///
/// # Safety
/// `out` must hold `panels * words * NR` words, and no other thread may write word row `p`.
unsafe fn write_word_row(
    format: Format,
    r0: &[f32],
    r1: &[f32],
    out: *mut u32,
    p: usize,
    words: usize,
    panels: usize,
) {
    if format == Format::Bf16 {
        #[cfg(target_arch = "x86_64")]
        if Format::Bf16.has_fast_kernel() {
            // SAFETY: the CPU has the features (checked); the rows hold `panels * NR` values and `out` the words
            // (this function's contract).
            unsafe { x86::interleave_rows(r0.as_ptr(), r1.as_ptr(), out, p, words, panels) };
            return;
        }
    }
    for panel in 0..panels {
        // SAFETY: `(panel * words + p) * NR + NR <= panels * words * NR` words, inside `out` (the contract).
        let dst = unsafe { out.add((panel * words + p) * NR) };
        let a = &r0[panel * NR..][..NR];
        match format {
            // SAFETY: `dst` has room for NR words (above); `a` is NR f32 values, the size of NR words.
            Format::F32 => unsafe {
                std::ptr::copy_nonoverlapping(a.as_ptr().cast::<u32>(), dst, NR)
            },
            Format::Bf16 => {
                let b = &r1[panel * NR..][..NR];
                for j in 0..NR {
                    // SAFETY: j < NR, inside `dst`'s NR words.
                    unsafe {
                        *dst.add(j) = round_bf16(a[j]) as u32 | ((round_bf16(b[j]) as u32) << 16)
                    };
                }
            }
        }
    }
}

/// Converts f32 to bf16 bit patterns (round to nearest, ties to even), in parallel.
#[cfg(any(test, feature = "bench-internals"))]
pub fn to_bf16(src: &[f32]) -> Vec<u16> {
    let mut out = vec![0u16; src.len()];
    convert_bf16_parallel(src, &mut out);
    out
}

/// [`convert_bf16`] in parallel (as many as the shorter slice holds).
pub(crate) fn convert_bf16_parallel(src: &[f32], dst: &mut [u16]) {
    dst.par_chunks_mut(1 << 14)
        .zip(src.par_chunks(1 << 14))
        .for_each(|(d, s)| convert_bf16(s, d));
}

/// Converts `src` to bf16 bit patterns into `dst` (as many as the shorter holds), on the calling thread.
pub(crate) fn convert_bf16(src: &[f32], dst: &mut [u16]) {
    // SAFETY: the same memory seen as possibly uninitialised, written with initialised values only.
    let dst = unsafe { &mut *(dst as *mut [u16] as *mut [std::mem::MaybeUninit<u16>]) };
    convert_bf16_uninit(src, dst);
}

/// [`convert_bf16`] into memory that may be uninitialised: the first `min(src.len(), dst.len())` values of `dst`
/// are written.
pub(crate) fn convert_bf16_uninit(src: &[f32], dst: &mut [std::mem::MaybeUninit<u16>]) {
    #[cfg(target_arch = "x86_64")]
    if Format::Bf16.has_fast_kernel() {
        // SAFETY: the CPU has the features; `convert` stops at the shorter slice.
        unsafe { x86::convert(src, dst) };
        return;
    }
    for (d, &s) in dst.iter_mut().zip(src) {
        d.write(round_bf16(s));
    }
}

/// `C += A B` in f32: `A` row-major `m x b.k()` with row stride `lda`, `C` row-major `m x b.n()` with row stride
/// `ldc`; `b` must be packed in f32.
#[cfg(any(test, feature = "bench-internals"))]
pub fn gemm_f32(m: usize, a: &[f32], lda: usize, b: &PackedB, c: &mut [f32], ldc: usize) {
    gemm_f32_from(m, a, lda, b, c, ldc, Start::Accumulate);
}

/// [`gemm_f32`] from `start` instead of `C`'s values.
pub(crate) fn gemm_f32_from(
    m: usize,
    a: &[f32],
    lda: usize,
    b: &PackedB,
    c: &mut [f32],
    ldc: usize,
    start: Start,
) {
    assert_eq!(b.format, Format::F32, "B is packed in bf16");
    if check(m, b.n, b.k, c, ldc, start) {
        check_a(m, a.len(), lda, b.k);
        let view = AView::Rows {
            ptr: a.as_ptr().cast(),
            elem: 4,
            lda,
        };
        run(m, view, b, c, ldc, start, true, || {
            a.chunks(lda)
                .take(m)
                .flat_map(|r| &r[..b.k])
                .copied()
                .collect()
        });
    }
}

/// Whether [`gemm_rows_uninit`] can run a product with `b`: on the AVX-512 micro-kernel or on AMX tiles, over a
/// non-empty `k`.
pub(crate) fn fills_uninit(b: &PackedB) -> bool {
    cfg!(target_arch = "x86_64") && b.k > 0 && b.format.has_fast_kernel()
}

/// `C = start + A B` with `A` row-major (`m x b.k()`, row stride `lda`: f32 for a B packed in f32, bf16 bit
/// patterns for bf16) into `C` memory that may be uninitialised: the AVX-512 micro-kernel writes every entry of
/// `C` in its first block of `k` before it reads any, and the AMX kernel stores each tile once, after a row bias is
/// written. For outputs that would otherwise be zeroed first, only to be overwritten. With `add` (values laid out as `C`: row stride `ldc`), `C = (start + A B) + add`, the addition
/// made as the result is stored (the same values as adding afterwards).
///
/// # Safety
/// [`fills_uninit`] must hold for `b`; `start` must not be [`Start::Accumulate`]; `c` must be valid for writes of
/// `m` rows of `b.n()` values `ldc >= b.n()` apart, accessed by nothing else during the call.
pub(crate) unsafe fn gemm_rows_uninit<T: Copy>(
    m: usize,
    a: &[T],
    lda: usize,
    b: &PackedB,
    (c, ldc): (*mut f32, usize),
    start: Start,
    add: Option<&[f32]>,
) {
    let elem = std::mem::size_of::<T>();
    assert!(
        fills_uninit(b),
        "no kernel writes this product into uninitialised memory"
    );
    assert!(
        !matches!(start, Start::Accumulate),
        "an accumulating product reads C"
    );
    assert_eq!(
        elem,
        4 / b.format.per_word(),
        "A's entries do not match B's format"
    );
    assert!(ldc >= b.n, "C's rows overlap");
    if m == 0 || b.n == 0 {
        return;
    }
    check_a(m, a.len(), lda, b.k);
    start.check(m, b.n);
    if let Some(add) = add {
        assert!(
            add.len() >= (m - 1) * ldc + b.n,
            "the values to add are shorter than C"
        );
    }
    let view = AView::Rows {
        ptr: a.as_ptr().cast(),
        elem,
        lda,
    };
    let add = || add.map(|v| SendPtr(v.as_ptr().cast_mut()));
    // SAFETY: the contract; `a` and `add` hold what they cover (checked).
    #[cfg(target_arch = "x86_64")]
    if unsafe { on_amx(m, view, b, (c, ldc), start, true, add()) } {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    tiles(
        m,
        view,
        BView::packed(b),
        (b.k, b.n, b.format),
        (c, ldc),
        true,
        start,
        add(),
    );
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (view, c);
}

/// `C += A B` with bf16 inputs and f32 accumulation: `A` row-major bf16 bit patterns `m x b.k()` with row stride
/// `lda`, `C` as in [`gemm_f32`]; `b` must be packed in bf16.
#[cfg(any(test, feature = "bench-internals"))]
pub fn gemm_bf16(m: usize, a: &[u16], lda: usize, b: &PackedB, c: &mut [f32], ldc: usize) {
    gemm_bf16_from(m, a, lda, b, c, ldc, Start::Accumulate);
}

/// [`gemm_bf16`] from `start` instead of `C`'s values.
pub(crate) fn gemm_bf16_from(
    m: usize,
    a: &[u16],
    lda: usize,
    b: &PackedB,
    c: &mut [f32],
    ldc: usize,
    start: Start,
) {
    assert_eq!(b.format, Format::Bf16, "B is packed in f32");
    if check(m, b.n, b.k, c, ldc, start) {
        check_a(m, a.len(), lda, b.k);
        let view = AView::Rows {
            ptr: a.as_ptr().cast(),
            elem: 2,
            lda,
        };
        run(m, view, b, c, ldc, start, true, || {
            a.chunks(lda)
                .take(m)
                .flat_map(|r| &r[..b.k])
                .map(|&v| bf16::from_bits(v).to_f32())
                .collect()
        });
    }
}

/// `C += A B` with both operands packed in the same format; `C` row-major `a.m() x b.n()` with row stride
/// `ldc`.
#[cfg(any(test, feature = "bench-internals"))]
pub fn gemm_packed(a: &PackedA, b: &PackedB, c: &mut [f32], ldc: usize) {
    gemm_packed_from(a, b, c, ldc, Start::Accumulate);
}

/// [`gemm_packed`] from `start` instead of `C`'s values.
pub(crate) fn gemm_packed_from(a: &PackedA, b: &PackedB, c: &mut [f32], ldc: usize, start: Start) {
    packed_product(a, b, c, ldc, start, true);
}

/// [`gemm_packed_from`] on the calling thread only: for callers that run several products in parallel.
pub(crate) fn gemm_packed_serial(
    a: &PackedA,
    b: &PackedB,
    c: &mut [f32],
    ldc: usize,
    start: Start,
) {
    packed_product(a, b, c, ldc, start, false);
}

/// The product of two packed operands, its tiles in parallel when `parallel`.
fn packed_product(
    a: &PackedA,
    b: &PackedB,
    c: &mut [f32],
    ldc: usize,
    start: Start,
    parallel: bool,
) {
    assert_eq!(
        a.format, b.format,
        "A and B are packed in different formats"
    );
    assert_eq!(a.k, b.k, "A has {} columns, B {} rows", a.k, b.k);
    if check(a.m, b.n, b.k, c, ldc, start) {
        run(a.m, a.view(), b, c, ldc, start, parallel, || a.to_f32());
    }
}

/// The right operand of an implicit convolution for [`gemm_shifted`]: rows of `stride` words (two bf16 entries
/// each, as [`pair_words`] writes them), read by `k` segments (one per kernel tap) from their own offsets: word
/// `w` of column `j` is `words[shifts[w / seg_words] + (w % seg_words) * stride + j]`.
pub(crate) struct Shifted<'a> {
    pub words: &'a [u32],
    pub stride: usize,
    pub seg_words: usize,
    pub shifts: &'a [usize],
    /// Columns.
    pub n: usize,
}

/// `C = A B` with `A` packed in bf16 (`m x k`, `k = 2 * seg_words * shifts.len()`) and `B` a [`Shifted`] view;
/// `C` row-major `a.m() x b.n` with row stride `ldc`. The micro-kernel reads `B` in place, so a convolution
/// never builds its im2col matrix. Columns past `n` up to the next multiple of [`NR`] are read (and discarded):
/// `b.words` must hold them.
pub(crate) fn gemm_shifted(a: &PackedA, b: &Shifted, c: &mut [f32], ldc: usize, start: Start) {
    assert_eq!(a.format, Format::Bf16, "A is packed in f32");
    let words = b.seg_words * b.shifts.len();
    assert_eq!(
        a.k.div_ceil(2),
        words,
        "A has {} columns, B {words} words",
        a.k
    );
    let (m, n) = (a.m, b.n);
    if !check(m, n, words, c, ldc, start) {
        return;
    }
    let reach = n.div_ceil(NR) * NR + (b.seg_words - 1) * b.stride;
    assert!(
        b.stride >= n && b.shifts.iter().all(|&s| s + reach <= b.words.len()),
        "B's rows do not hold what the shifts read"
    );
    #[cfg(target_arch = "x86_64")]
    if let (true, AView::Rows { ptr, elem: 2, lda }) = (super::amx::available(), a.view()) {
        start.fill(m, n, c, ldc);
        let source = (b.words.as_ptr(), b.stride, b.seg_words, b.shifts);
        // SAFETY: AMX is available (checked); `a` holds m rows of k bf16 entries `lda` apart, `c` the m x n block
        // (checked above), and every word the tiles read lies inside `b.words` (`reach`, checked above).
        unsafe {
            super::amx::gemm_shifted(m, ptr.cast(), lda, source, n, c.as_mut_ptr(), ldc, false)
        };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if Format::Bf16.has_fast_kernel() {
        let view = a.view();
        let bv = BView::Shifted {
            ptr: b.words.as_ptr(),
            stride: b.stride,
            seg_words: b.seg_words,
            shifts: b.shifts.as_ptr(),
        };
        tiles(
            m,
            view,
            bv,
            (a.k, n, Format::Bf16),
            (c.as_mut_ptr(), ldc),
            true,
            start,
            None,
        );
        return;
    }
    // The portable path: B written out in f32.
    let k = a.k;
    let mut dense = vec![0f32; k * n];
    dense.par_chunks_mut(n).enumerate().for_each(|(e, row)| {
        let w = e / 2;
        let src = &b.words[b.shifts[w / b.seg_words] + (w % b.seg_words) * b.stride..][..n];
        for (d, &v) in row.iter_mut().zip(src) {
            let bits = if e % 2 == 0 { v & 0xffff } else { v >> 16 };
            *d = bf16::from_bits(bits as u16).to_f32();
        }
    });
    start.fill(m, n, c, ldc);
    plain_gemm_f32(m, n, k, &a.to_f32(), &dense, c, ldc);
}

/// Words of two rows rounded to bf16: `bf16(lo[j]) | bf16(hi[j]) << 16` (`hi` zero when `None`), as many as
/// `out` holds (`lo` and `hi` at least as long).
pub(crate) fn pair_words(lo: &[f32], hi: Option<&[f32]>, out: &mut [u32]) {
    let n = out.len();
    assert!(
        lo.len() >= n && hi.is_none_or(|h| h.len() >= n),
        "rows shorter than the output"
    );
    #[cfg(target_arch = "x86_64")]
    if Format::Bf16.has_fast_kernel() {
        // SAFETY: the CPU has the features (checked); the rows hold `n` values (checked).
        unsafe { x86::pair_words(lo.as_ptr(), hi.map(|h| h.as_ptr()), out.as_mut_ptr(), n) };
        return;
    }
    for (j, o) in out.iter_mut().enumerate() {
        let h = hi.map_or(0, |h| round_bf16(h[j]));
        *o = round_bf16(lo[j]) as u32 | ((h as u32) << 16);
    }
}

/// `C += A B` (or `C = A B` when `overwrite`: `C`'s old values are then never read) in f32 on the calling thread
/// only, through raw pointers: for callers that already split their work across threads and write interleaved
/// parts of one buffer (attention's heads and query tiles, Winograd's bands). `b` must be packed in f32.
///
/// # Safety
/// The CPU must have AVX-512 F and BW (callers check [`Format::has_fast_kernel`] and keep a portable path). `a`
/// must point to `m` rows of `b.k()` readable f32 values `lda` apart, and `c` to `m` rows of `b.n()` f32
/// values `ldc` apart that no one else reads or writes meanwhile (with `overwrite`, they may be uninitialised:
/// they are written before they are read).
#[cfg(target_arch = "x86_64")]
pub unsafe fn gemm_f32_serial(
    m: usize,
    a: *const f32,
    lda: usize,
    b: &PackedB,
    c: *mut f32,
    ldc: usize,
    overwrite: bool,
) {
    assert_eq!(b.format, Format::F32, "B is packed in bf16");
    // SAFETY: the caller's contract.
    unsafe { serial(m, a.cast(), 4, lda, b, c, ldc, overwrite) };
}

/// [`gemm_f32_serial`] with bf16 inputs (f32 accumulation): `a` points to `m` rows of `b.k()` bf16 bit patterns
/// `lda` apart; `b` must be packed in bf16.
///
/// # Safety
/// The CPU must have AVX-512 BF16 ([`Format::has_fast_kernel`] for [`Format::Bf16`]); `a` and `c` as in
/// [`gemm_f32_serial`].
#[cfg(target_arch = "x86_64")]
pub unsafe fn gemm_bf16_serial(
    m: usize,
    a: *const u16,
    lda: usize,
    b: &PackedB,
    c: *mut f32,
    ldc: usize,
    overwrite: bool,
) {
    assert_eq!(b.format, Format::Bf16, "B is packed in f32");
    // SAFETY: the caller's contract.
    unsafe { serial(m, a.cast(), 2, lda, b, c, ldc, overwrite) };
}

/// The serial products' common part: `elem` bytes per entry of `A`.
///
/// # Safety
/// As [`gemm_f32_serial`], with `a` holding entries of `elem` bytes in `b`'s format.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn serial(
    m: usize,
    a: *const u8,
    elem: usize,
    lda: usize,
    b: &PackedB,
    c: *mut f32,
    ldc: usize,
    overwrite: bool,
) {
    assert!(
        lda >= b.k && ldc >= b.n,
        "row strides shorter than the rows"
    );
    if b.k == 0 && overwrite {
        for i in 0..m {
            // SAFETY: row i of C holds b.n() values (the contract).
            unsafe { std::ptr::write_bytes(c.add(i * ldc), 0, b.n) };
        }
    }
    if m == 0 || b.n == 0 || b.k == 0 {
        return;
    }
    let view = AView::Rows { ptr: a, elem, lda };
    let start = if overwrite {
        Start::Zero
    } else {
        Start::Accumulate
    };
    tiles(
        m,
        view,
        BView::packed(b),
        (b.k, b.n, b.format),
        (c, ldc),
        false,
        start,
        None,
    );
}

/// What a product's result starts from, before `A B` is added.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Start<'a> {
    /// `C`'s values: `C += A B`.
    Accumulate,
    /// Zero: `C = A B` (`C`'s old values are never read).
    Zero,
    /// `bias[j]` in column `j` (a linear layer's bias; at least `n` values).
    Cols(&'a [f32]),
    /// `bias[i]` in row `i` (a convolution's bias; at least `m` values).
    Rows(&'a [f32]),
}

impl Start<'_> {
    /// Writes the start into `C` (`m x n`, row stride `ldc`), for the paths that only accumulate.
    fn fill(self, m: usize, n: usize, c: &mut [f32], ldc: usize) {
        assert!(
            m == 0 || n == 0 || c.len() >= (m - 1) * ldc + n,
            "C is too small"
        );
        // SAFETY: `c` holds the block (checked just above) and is borrowed mutably.
        unsafe { self.fill_raw(m, n, c.as_mut_ptr(), ldc) };
    }

    /// [`Self::fill`] into memory that may be uninitialised (only written).
    ///
    /// # Safety
    /// `c` must be valid for writes of `m` rows of `n` values `ldc` apart, accessed by nothing else meanwhile, and
    /// a bias must hold what it covers.
    unsafe fn fill_raw(self, m: usize, n: usize, c: *mut f32, ldc: usize) {
        if let Self::Accumulate = self {
            return;
        }
        let c = SendPtr(c);
        (0..m).into_par_iter().for_each(|i| {
            let c = &c;
            // SAFETY: row i < m of the block (the contract), viewed as values that may be uninitialised and only
            // written.
            let row = unsafe {
                std::slice::from_raw_parts_mut(c.0.add(i * ldc).cast::<MaybeUninit<f32>>(), n)
            };
            match self {
                Self::Accumulate => {}
                Self::Zero => row.fill(MaybeUninit::new(0.0)),
                Self::Cols(b) => row.iter_mut().zip(&b[..n]).for_each(|(d, &v)| {
                    d.write(v);
                }),
                Self::Rows(b) => row.fill(MaybeUninit::new(b[i])),
            }
        });
    }

    /// Checks that a bias holds what the product reads.
    fn check(self, m: usize, n: usize) {
        match self {
            Self::Cols(b) => assert!(b.len() >= n, "bias shorter than the columns"),
            Self::Rows(b) => assert!(b.len() >= m, "bias shorter than the rows"),
            Self::Accumulate | Self::Zero => {}
        }
    }
}

/// Checks that `C` (`m x n`, row stride `ldc`) and `start` fit a product over `k`; `false` when there is no
/// product to compute (with `k = 0`, `C` is then set to the start).
fn check(m: usize, n: usize, k: usize, c: &mut [f32], ldc: usize, start: Start) -> bool {
    if m == 0 || n == 0 {
        return false;
    }
    assert!(ldc >= n && c.len() >= (m - 1) * ldc + n, "C is too small");
    start.check(m, n);
    if k == 0 {
        start.fill(m, n, c, ldc);
        return false;
    }
    true
}

/// Checks that a row-major `A` (`m x k`, row stride `lda`) fits in `a_len`.
fn check_a(m: usize, a_len: usize, lda: usize, k: usize) {
    assert!(lda >= k && a_len >= (m - 1) * lda + k, "A is too small");
}

/// Where the micro-kernel finds `A`.
#[derive(Clone, Copy)]
enum AView {
    /// Row-major, `elem` bytes per entry, `lda` entries per row.
    Rows {
        ptr: *const u8,
        elem: usize,
        lda: usize,
    },
    /// A [`PackedA`] with `words` words per row.
    Packed { ptr: *const u32, words: usize },
}
// SAFETY: a view only reads, and the matrix outlives the product.
unsafe impl Send for AView {}
unsafe impl Sync for AView {}

/// Runs AMX's or the AVX-512 kernels (their tasks in parallel when `parallel`), or the `gemm` crate on `A`
/// widened by `widen` (contiguous `m x k` f32).
#[allow(clippy::too_many_arguments)]
fn run(
    m: usize,
    a: AView,
    b: &PackedB,
    c: &mut [f32],
    ldc: usize,
    start: Start,
    parallel: bool,
    widen: impl FnOnce() -> Vec<f32>,
) {
    // SAFETY: `c` holds the m x n block (checked by the callers), initialised.
    #[cfg(target_arch = "x86_64")]
    if unsafe { on_amx(m, a, b, (c.as_mut_ptr(), ldc), start, parallel, None) } {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if b.format.has_fast_kernel() {
        tiles(
            m,
            a,
            BView::packed(b),
            (b.k, b.n, b.format),
            (c.as_mut_ptr(), ldc),
            parallel,
            start,
            None,
        );
        return;
    }
    let _ = a;
    let (k, n) = (b.k, b.n);
    start.fill(m, n, c, ldc);
    plain_gemm_f32(m, n, k, &widen(), &b.to_f32(), c, ldc);
}

/// The product on AMX tiles where it runs there (bf16, row-major `A`, the CPU has the tiles); `false` (nothing done)
/// elsewhere. The tiles start from zero or a column bias themselves; a row bias is written into `C` first. Only
/// [`Start::Accumulate`] reads `C`. `add` (values laid out as `C`) is added to each tile as it is stored.
///
/// # Safety
/// `a` must hold m rows of `b.k()` entries as it says, `c` must be valid for the m x `b.n()` block with row stride
/// `ldc` (initialised for `Accumulate`) and accessed by nothing else meanwhile, a bias and `add` must hold what
/// they cover.
#[cfg(target_arch = "x86_64")]
unsafe fn on_amx(
    m: usize,
    a: AView,
    b: &PackedB,
    (c, ldc): (*mut f32, usize),
    start: Start,
    parallel: bool,
    add: Option<SendPtr<f32>>,
) -> bool {
    use super::amx::Init;
    let (Format::Bf16, true, AView::Rows { ptr, elem: 2, lda }) =
        (b.format, super::amx::available(), a)
    else {
        return false;
    };
    let init = match start {
        Start::Accumulate => Init::Accumulate,
        Start::Zero => Init::Zero,
        Start::Cols(bias) => Init::Cols(bias.as_ptr()),
        Start::Rows(_) => {
            // SAFETY: the contract (C's block, the bias's rows).
            unsafe { start.fill_raw(m, b.n, c, ldc) };
            Init::Accumulate
        }
    };
    // SAFETY: AMX is available (checked); the operands as the contract says.
    unsafe { super::amx::gemm(m, ptr.cast(), lda, b, (c, ldc), parallel, init, add) };
    true
}

/// `dst[m, n] += lhs[m, k] rhs[k, n]` in f32 through the `gemm` crate, row-major; `lhs` and `rhs` contiguous, `dst` with row stride `ldc`.
pub(crate) fn plain_gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    lhs: &[f32],
    rhs: &[f32],
    dst: &mut [f32],
    ldc: usize,
) {
    assert!(lhs.len() >= m * k && rhs.len() >= k * n && ldc >= n && dst.len() >= (m - 1) * ldc + n);
    // SAFETY: the slices have the sizes the strides describe (checked above): dst [m, n] with row stride ldc,
    // lhs [m, k], rhs [k, n].
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ldc as isize,
            true,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            super::cpu::parallelism(),
        );
    }
}

/// Where the micro-kernel finds `B`: a [`PackedB`], or the shifted rows of an implicit convolution
/// ([`Shifted`]).
#[derive(Clone, Copy)]
enum BView {
    /// Panel `q`'s word `w` at `ptr + q * panel_len + w * NR`.
    Packed { ptr: *const u32, panel_len: usize },
    /// Word `w` of column `j` at `ptr + shifts[w / seg_words] + (w % seg_words) * stride + j`: `k` in segments
    /// of `seg_words` words (one per kernel tap), each reading the same rows from its own offset.
    Shifted {
        ptr: *const u32,
        stride: usize,
        seg_words: usize,
        shifts: *const usize,
    },
}
// SAFETY: a view only reads, and the matrix outlives the product.
unsafe impl Send for BView {}
unsafe impl Sync for BView {}

impl BView {
    fn packed(b: &PackedB) -> Self {
        Self::Packed {
            ptr: b.data.as_ptr(),
            panel_len: b.panel_len(),
        }
    }

    /// The end of the `k` block that starts at word `w0` (of `words`): at most [`KC`] words, not crossing a
    /// segment, the blocks of a segment (or of the whole `k`) of equal size (a short last block would load and
    /// store `C` for a few steps).
    fn block_end(&self, w0: usize, words: usize) -> usize {
        let seg = match *self {
            Self::Packed { .. } => words,
            Self::Shifted { seg_words, .. } => seg_words,
        };
        let len = seg.div_ceil(seg.div_ceil(KC));
        let start = w0 % seg;
        w0 + len.min(seg - start)
    }

    /// `(address of panel p0's word w0, words between panels, words between consecutive words of a column)`.
    ///
    /// # Safety
    /// `p0` and `w0` must lie inside the matrix.
    unsafe fn at(&self, p0: usize, w0: usize) -> (*const u32, usize, usize) {
        // SAFETY: inside the matrix (the contract).
        unsafe {
            match *self {
                Self::Packed { ptr, panel_len } => {
                    (ptr.add(p0 * panel_len + w0 * NR), panel_len, NR)
                }
                Self::Shifted {
                    ptr,
                    stride,
                    seg_words,
                    shifts,
                } => (
                    ptr.add(*shifts.add(w0 / seg_words) + (w0 % seg_words) * stride + p0 * NR),
                    NR,
                    stride,
                ),
            }
        }
    }
}

/// Whether a task of [`tiles`] takes all the column blocks of its rows, one block of `k` at a time, instead of one
/// column block over the whole `k`: a task's rows of `A` are read once per column block, and when they outgrow
/// the L2 cache (the kernel of a convolution on a small image) that is once from memory each; swept, each block of
/// `k` of `A` is read once and used for all of them. Only with enough row blocks to keep `threads` busy.
fn sweeps_columns(m: usize, words: usize, col_blocks: usize, threads: usize) -> bool {
    col_blocks > 1
        && MB_MAX.min(m) * words * 4 > A_ROWS_CACHED
        && m.div_ceil(MB_MAX) >= 2 * threads.max(1)
}

/// Splits `C` (`m x n` from `c`, row stride `ldc`, which the caller has checked) into tiles of up to [`MB_MAX`]
/// rows x `NP * NR` columns, run in parallel (or one after the other), each walking `k` (`words` words of
/// `format`) in blocks of up to [`KC`] words and its rows in groups of [`MR`]. `add` (values laid out as `C`) is added
/// to the result as its last block of `k` is stored.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn tiles(
    m: usize,
    a: AView,
    b: BView,
    (k, n, format): (usize, usize, Format),
    (c, ldc): (*mut f32, usize),
    parallel: bool,
    start: Start,
    add: Option<SendPtr<f32>>,
) {
    start.check(m, n);
    let add = &add;
    let per = format.per_word();
    let words = k.div_ceil(per);
    let panels = n.div_ceil(NR);
    let col_blocks = panels.div_ceil(NP);
    // Rows per task: as many as fit the L2 budget, fewer when that leaves threads idle.
    let threads = if parallel {
        rayon::current_num_threads().max(1)
    } else {
        0
    };
    let wide = sweeps_columns(m, words, col_blocks, threads);
    let tasks_per_rows = if wide { 1 } else { col_blocks };
    let mut mb = MB_MAX.min(m.div_ceil(MR) * MR);
    while mb > MR && m.div_ceil(mb) * tasks_per_rows < 4 * threads {
        mb = (mb / 2).div_ceil(MR) * MR;
    }
    let row_blocks = m.div_ceil(mb);
    let cptr = SendPtr(c);
    let bf16 = format == Format::Bf16;
    // The micro-kernel calls of row block `rb`, column block `cb` and `k` words `w0..w1`; `then_w` is the block
    // of `k` of the call that comes after the last rows (for the prefetch).
    let block = |rb: usize, cb: usize, w0: usize, w1: usize, then_w: usize| {
        let cptr = &cptr;
        let (r0, r1) = (rb * mb, ((rb + 1) * mb).min(m));
        let p0 = cb * NP;
        let np = (panels - p0).min(NP);
        let last_cols = n - (p0 + np - 1) * NR;
        // Whole words in this block, and whether it ends with a lone bf16 entry (odd k) of a row-major A
        // (a packed A pairs it with zero).
        let tail = bf16 && w1 == words && k % 2 == 1 && matches!(a, AView::Rows { .. });
        let full = w1 - w0 - tail as usize;
        // SAFETY: panels p0..p0 + np and words w0..w1 exist.
        let (b_ptr, panel_len, b_step) = unsafe { b.at(p0, w0) };
        let mut r = r0;
        while r < r1 {
            let mr = (r1 - r).min(MR);
            // SAFETY (for the pointer offsets): row r < m of A from entry per * w0 < k (r is a multiple of MR
            // for a packed A); rows r..r + mr and columns from p0 * NR are the task's own tile of C.
            let (a_ptr, lda, a_step) = match a {
                AView::Rows { ptr, elem, lda } => (
                    unsafe { ptr.add((r * lda + per * w0) * elem) },
                    lda * elem,
                    4,
                ),
                AView::Packed { ptr, words } => (
                    unsafe { ptr.add(((r / MR) * words + w0) * MR) }.cast::<u8>(),
                    4,
                    4 * MR,
                ),
            };
            // The A block of the next call (the next rows, else the first rows of the next k block):
            // prefetched during this one, as eight rows or one contiguous packed run.
            let (next_r, next_w) = if r + mr < r1 {
                (r + mr, w0)
            } else {
                (r0, then_w)
            };
            let prefetch = if next_w >= words {
                x86::Prefetch::None
            } else {
                match a {
                    AView::Rows { ptr, elem, lda } => {
                        x86::Prefetch::Rows(ptr.wrapping_add((next_r * lda + per * next_w) * elem))
                    }
                    AView::Packed { ptr, words } => x86::Prefetch::Run(
                        ptr.wrapping_add(((next_r / MR) * words + next_w) * MR)
                            .cast(),
                    ),
                }
            };
            let call = x86::Call {
                full,
                tail,
                init: match (w0, start) {
                    (0, Start::Zero) => x86::Init::Zero,
                    (0, Start::Cols(bias)) => x86::Init::Cols(bias[p0 * NR..].as_ptr()),
                    (0, Start::Rows(bias)) => x86::Init::Rows(bias[r..].as_ptr()),
                    _ => x86::Init::Load,
                },
                prefetch,
                a: a_ptr,
                lda,
                a_step,
                b: b_ptr,
                panel_len,
                b_step,
                c: unsafe { cptr.0.add(r * ldc + p0 * NR) },
                ldc,
                add: match add {
                    Some(add) if w1 == words => add.0.cast_const().wrapping_add(r * ldc + p0 * NR),
                    _ => std::ptr::null(),
                },
                last_cols,
            };
            // SAFETY: the CPU has the kernel's features (checked by the callers); tiles of C are disjoint.
            unsafe { x86::dispatch(bf16, mr, np, &call) };
            r += mr;
        }
    };
    let task = |t: usize| {
        let (rb, cb) = if wide {
            (t, 0)
        } else {
            (t / col_blocks, t % col_blocks)
        };
        let mut w0 = 0;
        while w0 < words {
            let w1 = b.block_end(w0, words);
            if wide {
                for cb in 0..col_blocks {
                    block(rb, cb, w0, w1, if cb + 1 < col_blocks { w0 } else { w1 });
                }
            } else {
                block(rb, cb, w0, w1, w1);
            }
            w0 = w1;
        }
    };
    let tasks = row_blocks * tasks_per_rows;
    if parallel {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{MR, NP, NR};

    /// Word row `p` of every panel: `bf16(a[j]) | bf16(b[j]) << 16`, 16 lanes per panel.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and BF16; `a` and `b` must point to `panels * NR` readable f32 values;
    /// `out` must hold `panels * words * NR` words, with word row `p` written by no one else meanwhile.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn interleave_rows(
        a: *const f32,
        b: *const f32,
        out: *mut u32,
        p: usize,
        words: usize,
        panels: usize,
    ) {
        for panel in 0..panels {
            // SAFETY: the loads read `a`/`b` panel `panel` (inside their `panels * NR` values) and the store
            // writes word row `p` of that panel (inside `out`), as the contract provides.
            unsafe {
                pair_words(
                    a.add(panel * NR),
                    Some(b.add(panel * NR)),
                    out.add((panel * words + p) * NR),
                    NR,
                )
            };
        }
    }

    /// [`super::pair_words`]: 16 words at a time, the last ones masked.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and BF16; `lo` (and `hi`) must hold `n` readable values and `out` `n`
    /// writable words.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn pair_words(
        lo: *const f32,
        hi: Option<*const f32>,
        out: *mut u32,
        n: usize,
    ) {
        let half = |p: *const f32, mask: __mmask16| {
            // SAFETY: the masked lanes lie inside the row (the caller's `mask`).
            _mm512_cvtepu16_epi32(unsafe {
                std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(
                    mask, p,
                )))
            })
        };
        let mut j = 0;
        while j < n {
            let mask: __mmask16 = if n - j >= 16 {
                0xffff
            } else {
                (1u16 << (n - j)) - 1
            };
            // SAFETY: lanes j.. j + 16 under `mask` are inside the rows and `out` (the contract).
            unsafe {
                let mut v = half(lo.add(j), mask);
                if let Some(h) = hi {
                    v = _mm512_or_si512(v, _mm512_slli_epi32::<16>(half(h.add(j), mask)));
                }
                _mm512_mask_storeu_epi32(out.add(j).cast(), mask, v);
            }
            j += 16;
        }
    }

    /// f32 to bf16 bits, 16 at a time, the last vector masked (short rows, such as an attention head's 40 values,
    /// are mostly tail).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and BF16.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn convert(s: &[f32], d: &mut [std::mem::MaybeUninit<u16>]) {
        let n = s.len().min(d.len());
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: i + 16 <= n, so 16 values of `s` are read and 16 of `d` written.
            unsafe {
                let v = _mm512_cvtneps_pbh(_mm512_loadu_ps(s.as_ptr().add(i)));
                _mm256_storeu_si256(
                    d.as_mut_ptr().add(i).cast(),
                    std::mem::transmute::<__m256bh, __m256i>(v),
                );
            }
            i += 16;
        }
        if i < n {
            let mask: __mmask16 = (1u16 << (n - i)) - 1;
            // SAFETY: the lanes under `mask` (n - i < 16 of them) lie inside both slices.
            unsafe {
                let v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, s.as_ptr().add(i)));
                let v = _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(v));
                _mm512_mask_cvtepi32_storeu_epi16(d.as_mut_ptr().add(i).cast(), mask, v);
            }
        }
    }

    /// What a micro-kernel call prefetches of the next call's `A` block: one cache line every other step.
    #[derive(Clone, Copy)]
    pub(super) enum Prefetch {
        None,
        /// Row-major: eight rows `lda` bytes apart from this address, line after line.
        Rows(*const u8),
        /// Packed: consecutive lines from this address.
        Run(*const u8),
    }

    /// What a micro-kernel call's accumulators start from.
    #[derive(Clone, Copy)]
    pub(super) enum Init {
        /// The block of `C`.
        Load,
        Zero,
        /// The call's columns of a bias (`np * 16` values, the last panel masked).
        Cols(*const f32),
        /// The call's rows of a bias (`rows` values).
        Rows(*const f32),
    }

    /// One micro-kernel call: `C[rows x np*16] += A B` over `full` words (+ a lone bf16 entry when `tail`).
    pub(super) struct Call {
        pub full: usize,
        pub tail: bool,
        /// What the accumulators start from.
        pub init: Init,
        /// Only hints: the addresses may lie past `A` (prefetches never fault).
        pub prefetch: Prefetch,
        /// Row 0 of `A` at the block's first entry; `lda` (next row) and `a_step` (next word) in bytes.
        pub a: *const u8,
        pub lda: usize,
        pub a_step: usize,
        /// Panel 0 of `B` at the block's first word; panels are `panel_len` words apart, a column's consecutive
        /// words `b_step`.
        pub b: *const u32,
        pub panel_len: usize,
        pub b_step: usize,
        pub c: *mut f32,
        pub ldc: usize,
        /// Null, or values laid out as `C` (from the call's first row and column, row stride `ldc`) added to the
        /// result as it is stored (the last block of `k` only).
        pub add: *const f32,
        /// Columns stored of the last panel (1..=16).
        pub last_cols: usize,
    }

    /// Calls the micro-kernel instance for the format, `mr` rows (1..=8) and `np` panels (1..=3).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and BW (and BF16 when `bf16`). `k` must describe memory the caller owns:
    /// `mr` rows of `A` readable from `k.a` over `k.full` words (+ the tail entry), `np` panels of `B` from `k.b`
    /// `k.panel_len` words apart, and `mr` rows of `np * 16` columns (the last panel `k.last_cols` wide) of `C`
    /// from `k.c`, row stride `k.ldc`, written by no one else meanwhile.
    #[inline]
    pub(super) unsafe fn dispatch(bf16: bool, mr: usize, np: usize, k: &Call) {
        macro_rules! go {
            ($($r:literal)*) => {
                match (bf16, mr, np) {
                    $(
                        (true, $r, 1) => kernel_bf16::<$r, 1>(k),
                        (true, $r, 2) => kernel_bf16::<$r, 2>(k),
                        (true, $r, 3) => kernel_bf16::<$r, 3>(k),
                        (false, $r, 1) => kernel_f32::<$r, 1>(k),
                        (false, $r, 2) => kernel_f32::<$r, 2>(k),
                        (false, $r, 3) => kernel_f32::<$r, 3>(k),
                    )*
                    _ => unreachable!("micro-kernel for {mr} rows and {np} panels"),
                }
            };
        }
        const _: () = assert!(MR == 8 && NP == 3);
        // SAFETY: the instance has the features and reads/writes what `k` describes (this function's contract).
        unsafe { go!(1 2 3 4 5 6 7 8) }
    }

    /// The micro-kernel body: load the `C` block, one step per word (broadcast `A`'s word of each row, multiply
    /// into the `P` panels' words), the tail, store. `$bcast(row pointer, word)` gives the broadcast word and
    /// `$fma(acc, a, b)` the accumulation.
    macro_rules! micro_kernel {
        ($name:ident, $features:literal, $bcast:expr, $tail_bcast:expr, $fma:expr) => {
            /// # Safety
            /// As [`dispatch`], for `R` rows and `P` panels.
            #[target_feature(enable = $features)]
            unsafe fn $name<const R: usize, const P: usize>(k: &Call) {
                // SAFETY: every pointer offset stays inside what `k` describes (the contract).
                unsafe {
                    let last_mask: __mmask16 = if k.last_cols >= NR {
                        0xffff
                    } else {
                        (1u16 << k.last_cols) - 1
                    };
                    let mask = |q: usize| if q + 1 == P { last_mask } else { 0xffff };
                    let mut acc = [[_mm512_setzero_ps(); P]; R];
                    match k.init {
                        Init::Load => {
                            for (r, row) in acc.iter_mut().enumerate() {
                                for (q, v) in row.iter_mut().enumerate() {
                                    *v =
                                        _mm512_maskz_loadu_ps(mask(q), k.c.add(r * k.ldc + q * NR));
                                }
                            }
                        }
                        Init::Zero => {}
                        Init::Cols(bias) => {
                            for q in 0..P {
                                let v = _mm512_maskz_loadu_ps(mask(q), bias.add(q * NR));
                                for row in acc.iter_mut() {
                                    row[q] = v;
                                }
                            }
                        }
                        Init::Rows(bias) => {
                            for (r, row) in acc.iter_mut().enumerate() {
                                *row = [_mm512_set1_ps(*bias.add(r)); P];
                            }
                        }
                    }
                    let step = |acc: &mut [[__m512; P]; R], p: usize, tail: bool| {
                        let mut bv = [_mm512_setzero_si512(); P];
                        for q in 0..P {
                            bv[q] =
                                _mm512_loadu_si512(k.b.add(q * k.panel_len + p * k.b_step).cast());
                        }
                        for r in 0..R {
                            let row = k.a.add(r * k.lda);
                            let off = p * k.a_step;
                            let av: __m512i = if tail {
                                $tail_bcast(row, off)
                            } else {
                                $bcast(row, off)
                            };
                            for q in 0..P {
                                acc[r][q] = $fma(acc[r][q], av, bv[q]);
                            }
                        }
                    };
                    // Otherwise each call's first steps wait for its rows of A to come from L2.
                    match k.prefetch {
                        Prefetch::None => {
                            for p in 0..k.full {
                                step(&mut acc, p, false);
                            }
                        }
                        Prefetch::Rows(next) => {
                            for p in 0..k.full {
                                if p % 2 == 0 {
                                    let j = p / 2;
                                    let line = next.wrapping_add((j % 8) * k.lda + (j / 8) * 64);
                                    _mm_prefetch::<_MM_HINT_T0>(line.cast());
                                }
                                step(&mut acc, p, false);
                            }
                        }
                        Prefetch::Run(next) => {
                            for p in 0..k.full {
                                if p % 2 == 0 {
                                    _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(p * 32).cast());
                                }
                                step(&mut acc, p, false);
                            }
                        }
                    }
                    if k.tail {
                        step(&mut acc, k.full, true);
                    }
                    for (r, row) in acc.iter().enumerate() {
                        for (q, v) in row.iter().enumerate() {
                            let at = r * k.ldc + q * NR;
                            let v = if k.add.is_null() {
                                *v
                            } else {
                                _mm512_add_ps(*v, _mm512_maskz_loadu_ps(mask(q), k.add.add(at)))
                            };
                            _mm512_mask_storeu_ps(k.c.add(at), mask(q), v);
                        }
                    }
                }
            }
        };
    }

    micro_kernel!(
        kernel_f32,
        "avx512f,avx512bw",
        |row: *const u8, off: usize| _mm512_set1_epi32(row.add(off).cast::<i32>().read_unaligned()),
        |_: *const u8, _: usize| _mm512_setzero_si512(),
        |acc: __m512, a: __m512i, b: __m512i| _mm512_fmadd_ps(
            _mm512_castsi512_ps(a),
            _mm512_castsi512_ps(b),
            acc
        )
    );

    micro_kernel!(
        kernel_bf16,
        "avx512f,avx512bw,avx512bf16",
        // Two consecutive bf16 entries of the row: one 32-bit word.
        |row: *const u8, off: usize| _mm512_set1_epi32(row.add(off).cast::<i32>().read_unaligned()),
        // The lone last entry, paired with zero (B's pad is zero too).
        |row: *const u8, off: usize| _mm512_set1_epi32(
            row.add(off).cast::<u16>().read_unaligned() as i32
        ),
        |acc: __m512, a: __m512i, b: __m512i| _mm512_dpbf16_ps(
            acc,
            std::mem::transmute::<__m512i, __m512bh>(a),
            std::mem::transmute::<__m512i, __m512bh>(b)
        )
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector pairing (masked tail, with and without a high row) gives the scalar rounding's bits.
    #[test]
    fn pair_words_round_like_round_bf16() {
        let mut seed = 7u64;
        let lo: Vec<f32> = (0..37).map(|_| lcg(&mut seed) * 3.0).collect();
        let hi: Vec<f32> = (0..37).map(|_| lcg(&mut seed) * 1e-3).collect();
        for n in [0, 1, 15, 16, 17, 37] {
            for with_hi in [false, true] {
                let h = with_hi.then_some(&hi[..]);
                let mut out = vec![u32::MAX; n];
                crate::ops::cpu::detected_only(|| pair_words(&lo, h, &mut out));
                for j in 0..n {
                    let want_hi = if with_hi { round_bf16(hi[j]) as u32 } else { 0 };
                    assert_eq!(
                        out[j],
                        round_bf16(lo[j]) as u32 | (want_hi << 16),
                        "n {n} j {j}"
                    );
                }
            }
        }
    }

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// The f64 product of the operands, rounded to bf16 first for bf16.
    fn reference(
        p: Format,
        (m, n, k): (usize, usize, usize),
        a: &[f32],
        bt: &[f32],
        c0: &[f32],
    ) -> Vec<f32> {
        let r = |x: f32| match p {
            Format::F32 => x as f64,
            Format::Bf16 => bf16::from_f32(x).to_f64(),
        };
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

    fn check(p: Format, m: usize, n: usize, k: usize) {
        let mut seed = (m * 1000003 + n * 1009 + k) as u64;
        let a: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
        let bt: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
        let c0: Vec<f32> = (0..m * n).map(|_| lcg(&mut seed)).collect();
        let want = reference(p, (m, n, k), &a, &bt, &c0);
        let packed = PackedB::from_transposed(&bt, n, k, p);
        let by_rows = PackedB::from_rows(k, n, p, |r, row| {
            for (j, v) in row.iter_mut().enumerate() {
                *v = bt[j * k + r];
            }
        });
        assert_eq!(packed.data, by_rows.data, "both packings agree");
        let mut rows = c0.clone();
        match p {
            Format::F32 => gemm_f32(m, &a, k, &packed, &mut rows, n),
            Format::Bf16 => gemm_bf16(m, &to_bf16(&a), k, &packed, &mut rows, n),
        }
        let mut packed_a = c0.clone();
        let pa = PackedA::new(&a, m, k, p);
        gemm_packed(&pa, &packed, &mut packed_a, n);
        // Summation-order differences of k products of size <= 1.
        let bound = 8e-6 * (k as f32).sqrt() + 1e-6;
        let compare = |what: &str, want: &[f32], c: &[f32]| {
            let worst = want
                .iter()
                .zip(c)
                .map(|(w, g)| (w - g).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= bound,
                "{p:?} {what} {m}x{n}x{k}: max diff {worst} > {bound}"
            );
        };
        compare("row-major A", &want, &rows);
        compare("packed A", &want, &packed_a);
        // The other starts: C's old values (NaN) are never read.
        let (col_bias, row_bias) = (&c0[..n], &c0[c0.len() - m..]);
        for (what, start) in [
            ("zero", Start::Zero),
            ("column bias", Start::Cols(col_bias)),
            ("row bias", Start::Rows(row_bias)),
        ] {
            let mut init = vec![0f32; m * n];
            start.fill(m, n, &mut init, n);
            let want = reference(p, (m, n, k), &a, &bt, &init);
            let mut rows = vec![f32::NAN; m * n];
            match p {
                Format::F32 => gemm_f32_from(m, &a, k, &packed, &mut rows, n, start),
                Format::Bf16 => gemm_bf16_from(m, &to_bf16(&a), k, &packed, &mut rows, n, start),
            }
            compare(&format!("{what}, row-major A"), &want, &rows);
            let mut packed_a = vec![f32::NAN; m * n];
            gemm_packed_from(&pa, &packed, &mut packed_a, n, start);
            compare(&format!("{what}, packed A"), &want, &packed_a);
        }
    }

    /// With nothing to multiply (`k = 0`) the result is the start.
    #[test]
    fn empty_product_is_its_start() {
        let (m, n) = (3, 5);
        let b = PackedB::from_rows(0, n, Format::Bf16, |_, _| {});
        let a = PackedA::new(&[], m, 0, Format::Bf16);
        let bias: Vec<f32> = (0..n).map(|j| j as f32).collect();
        let mut c = vec![f32::NAN; m * n];
        gemm_packed_from(&a, &b, &mut c, n, Start::Cols(&bias));
        assert_eq!(c, bias.repeat(m));
        gemm_packed_from(&a, &b, &mut c, n, Start::Rows(&bias));
        assert_eq!(
            c,
            [0f32, 0., 0., 0., 0., 1., 1., 1., 1., 1., 2., 2., 2., 2., 2.]
        );
        let before = c.clone();
        gemm_packed(&a, &b, &mut c, n);
        assert_eq!(c, before, "C += nothing");
    }

    const SHAPES: [(usize, usize, usize); 11] = [
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
        (300, 50, 129),
    ];

    /// Under Miri (interpreted, and always on the portable path: it has no SIMD intrinsics), shapes small enough
    /// to run that still cross every block edge: rows past MR, columns past NR, odd k for bf16's word pairs.
    const MIRI_SHAPES: [(usize, usize, usize); 6] = [
        (1, 1, 1),
        (1, 16, 2),
        (7, 15, 3),
        (9, 17, 5),
        (17, 33, 3),
        (2, 40, 9),
    ];

    fn shapes() -> &'static [(usize, usize, usize)] {
        if cfg!(miri) {
            &MIRI_SHAPES
        } else {
            &SHAPES
        }
    }

    /// Products into uninitialised memory (here: C full of NaN, which any read would spread) match the products
    /// from the same start into a zeroed C, bit for bit, on every edge shape, for each start.
    #[test]
    #[cfg(target_arch = "x86_64")]
    #[cfg_attr(miri, ignore = "no SIMD under Miri")]
    fn uninit_products_write_every_entry() {
        crate::ops::cpu::detected_only(|| {
            let mut seed = 11u64;
            for &(m, n, k) in shapes() {
                for p in [Format::F32, Format::Bf16] {
                    let a: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
                    let bt: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
                    let bias: Vec<f32> = (0..m.max(n)).map(|_| lcg(&mut seed)).collect();
                    let b = PackedB::from_transposed(&bt, n, k, p);
                    if !fills_uninit(&b) {
                        continue;
                    }
                    let a16: Vec<u16> = a.iter().map(|&v| round_bf16(v)).collect();
                    let extra: Vec<f32> = (0..m * n).map(|_| lcg(&mut seed)).collect();
                    let starts = [Start::Zero, Start::Cols(&bias), Start::Rows(&bias)];
                    for (start, add) in starts.into_iter().flat_map(|s| [(s, false), (s, true)]) {
                        let add = add.then_some(&extra[..]);
                        let mut want = vec![0f32; m * n];
                        let mut got = vec![f32::NAN; m * n];
                        // SAFETY: the kernel exists (checked), the start does not accumulate, `got` holds m x n.
                        match p {
                            Format::F32 => {
                                gemm_f32_from(m, &a, k, &b, &mut want, n, start);
                                unsafe {
                                    gemm_rows_uninit(
                                        m,
                                        &a,
                                        k,
                                        &b,
                                        (got.as_mut_ptr(), n),
                                        start,
                                        add,
                                    )
                                };
                            }
                            Format::Bf16 => {
                                gemm_bf16_from(m, &a16, k, &b, &mut want, n, start);
                                unsafe {
                                    gemm_rows_uninit(
                                        m,
                                        &a16,
                                        k,
                                        &b,
                                        (got.as_mut_ptr(), n),
                                        start,
                                        add,
                                    )
                                };
                            }
                        }
                        // With values to add: the product's, then the addition.
                        if let Some(add) = add {
                            want.iter_mut().zip(add).for_each(|(w, a)| *w += a);
                        }
                        let same = want
                            .iter()
                            .zip(&got)
                            .all(|(w, g)| w.to_bits() == g.to_bits());
                        assert!(same, "{m}x{n}x{k} {p:?} {start:?} add {}", add.is_some());
                    }
                }
            }
        });
    }

    /// The serial entry points (f32 and bf16) add to `C`, or overwrite it without reading it (`C` full of NaN), on
    /// every edge shape and with `k = 0`, reading `A` with a row stride wider than its rows.
    #[test]
    #[cfg(target_arch = "x86_64")]
    #[cfg_attr(miri, ignore = "no SIMD under Miri")]
    fn serial_product_adds_or_overwrites() {
        for format in [Format::F32, Format::Bf16] {
            if !format.has_fast_kernel() {
                continue;
            }
            for &(m, n, k) in shapes().iter().chain(&[(5, 20, 0)]) {
                let mut seed = (m * 31 + n * 7 + k) as u64;
                let lda = k + 3;
                let a: Vec<f32> = (0..m * lda).map(|_| lcg(&mut seed)).collect();
                let a_tight: Vec<f32> = a.chunks(lda).flat_map(|r| &r[..k]).copied().collect();
                let bt: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
                let c0: Vec<f32> = (0..m * n).map(|_| lcg(&mut seed)).collect();
                let packed = PackedB::from_transposed(&bt, n, k, format);
                let bound = 8e-6 * (k as f32).sqrt() + 1e-6;
                let a_bf16 = to_bf16(&a);
                for overwrite in [false, true] {
                    let (start, mut c) = if overwrite {
                        (vec![0f32; m * n], vec![f32::NAN; m * n])
                    } else {
                        (c0.clone(), c0.clone())
                    };
                    let want = reference(format, (m, n, k), &a_tight, &bt, &start);
                    // SAFETY: the CPU has the format's kernel (checked); the buffers have the sizes the strides
                    // describe.
                    unsafe {
                        match format {
                            Format::F32 => gemm_f32_serial(
                                m,
                                a.as_ptr(),
                                lda,
                                &packed,
                                c.as_mut_ptr(),
                                n,
                                overwrite,
                            ),
                            Format::Bf16 => gemm_bf16_serial(
                                m,
                                a_bf16.as_ptr(),
                                lda,
                                &packed,
                                c.as_mut_ptr(),
                                n,
                                overwrite,
                            ),
                        }
                    };
                    let worst =
                        want.iter()
                            .zip(&c)
                            .map(|(w, g)| (w - g).abs())
                            .fold(
                                0f32,
                                |x, y| if y.is_nan() { f32::INFINITY } else { x.max(y) },
                            );
                    assert!(
                        worst <= bound,
                        "{format:?} {m}x{n}x{k} overwrite {overwrite}: max diff {worst}"
                    );
                }
            }
        }
    }

    #[test]
    #[cfg_attr(miri, ignore = "no SIMD under Miri: the portable_path test runs this")]
    fn f32_matches_the_product_on_every_edge() {
        for &(m, n, k) in shapes() {
            check(Format::F32, m, n, k);
        }
    }

    #[test]
    #[cfg_attr(miri, ignore = "no SIMD under Miri: the portable_path test runs this")]
    fn bf16_matches_the_rounded_product_on_every_edge() {
        for &(m, n, k) in shapes() {
            check(Format::Bf16, m, n, k);
        }
    }

    /// Products whose rows of `A` outgrow the cache sweep all column blocks per block of `k` (a partial last
    /// column block, an odd bf16 `k`), with the same results.
    #[test]
    #[cfg_attr(miri, ignore = "no SIMD under Miri; large")]
    fn tall_products_sweep_column_blocks() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            for (p, k) in [
                (Format::F32, 1100usize),
                (Format::Bf16, 2200),
                (Format::Bf16, 2201),
            ] {
                let (m, n) = (600usize, 100usize);
                let words = k.div_ceil(p.per_word());
                assert!(sweeps_columns(m, words, n.div_ceil(NR).div_ceil(NP), 2));
                check(p, m, n, k);
            }
        });
        assert!(!sweeps_columns(600, 100, 3, 2), "rows that stay cached");
        assert!(!sweeps_columns(600, 1100, 1, 2), "one column block");
        assert!(!sweeps_columns(300, 1100, 3, 2), "too few row blocks");
    }

    #[test]
    fn portable_path_matches_the_product_on_every_edge() {
        crate::ops::cpu::force_portable(|| {
            assert!(!Format::F32.has_fast_kernel() && !Format::Bf16.has_fast_kernel());
            for &(m, n, k) in shapes() {
                check(Format::F32, m, n, k);
                check(Format::Bf16, m, n, k);
            }
        });
    }

    #[test]
    fn portable_path_round_trips_the_packing() {
        let (k, n) = (5, 19);
        let b: Vec<f32> = (0..k * n).map(|i| i as f32 * 0.25 - 3.0).collect();
        for p in [Format::F32, Format::Bf16] {
            let packed = PackedB::from_rows(k, n, p, |r, row| {
                row.copy_from_slice(&b[r * n..(r + 1) * n])
            });
            // All of these values are exact in bf16.
            assert_eq!(packed.to_f32(), b, "{p:?}");
            assert_eq!(PackedA::new(&b, k, n, p).to_f32(), b, "{p:?}");
        }
    }

    /// Several matrices filled block by block pack as each would alone (odd sizes, a partial last block), and
    /// multiply like them.
    #[test]
    fn many_pack_like_each_alone() {
        let mut seed = 11u64;
        for (m, k) in [(13, 7), (8, 32), (1, 1), (17, 40)] {
            let mats: Vec<Vec<f32>> = (0..3)
                .map(|_| (0..m * k).map(|_| lcg(&mut seed)).collect())
                .collect();
            let many = PackedA::many_bf16(3, m, k, |rows, out| {
                let n = rows.len();
                for (i, a) in mats.iter().enumerate() {
                    out[i * n * k..][..n * k].copy_from_slice(&a[rows.start * k..rows.end * k]);
                }
            });
            let b = PackedB::from_rows(k, 5, Format::Bf16, |r, row| {
                row.iter_mut()
                    .enumerate()
                    .for_each(|(j, v)| *v = (r * 5 + j) as f32 * 0.125 - 1.0)
            });
            for (a, p) in mats.iter().zip(&many) {
                let alone = PackedA::new(a, m, k, Format::Bf16);
                assert_eq!(p.to_f32(), alone.to_f32(), "{m} x {k}");
                let (mut c1, mut c2) = (vec![0f32; m * 5], vec![0f32; m * 5]);
                gemm_packed(p, &b, &mut c1, 5);
                gemm_packed(&alone, &b, &mut c2, 5);
                if p.row_major == alone.row_major {
                    assert_eq!(c1, c2, "{m} x {k}");
                } else {
                    // With AMX, `alone` is row-major and runs on the tiles, which sum in another order.
                    for (x, y) in c1.iter().zip(&c2) {
                        assert!(
                            (x - y).abs() <= 1e-5 * y.abs().max(1.0),
                            "{m} x {k}: {x} vs {y}"
                        );
                    }
                }
            }
        }
    }

    /// Columns given one by one (shorter than `k`: zeros after) pack as the transpose of the zero-padded matrix;
    /// given in bf16, as the transpose of their values.
    #[test]
    fn columns_pack_like_the_transpose() {
        let mut seed = 3u64;
        for (n, k, given) in [(19, 7, 7), (16, 40, 40), (33, 64, 40), (1, 1, 1), (5, 3, 0)] {
            let cols: Vec<Vec<f32>> = (0..n)
                .map(|_| (0..given).map(|_| lcg(&mut seed)).collect())
                .collect();
            let mut padded = vec![0f32; n * k];
            for (j, c) in cols.iter().enumerate() {
                padded[j * k..j * k + given].copy_from_slice(c);
            }
            for p in [Format::F32, Format::Bf16] {
                crate::ops::cpu::detected_only(|| {
                    let got = PackedB::from_columns(n, k, p, |j| Values::F32(&cols[j]));
                    let want = PackedB::from_transposed(&padded, n, k, p);
                    assert_eq!((got.n(), got.k()), (n, k));
                    assert_eq!(got.data, want.data, "{n}x{k} ({given} given), {p:?}");
                    // The columns rounded to bf16 first: the same panels in bf16, their exact values in f32.
                    let rounded: Vec<Vec<u16>> = cols
                        .iter()
                        .map(|c| c.iter().map(|&v| round_bf16(v)).collect())
                        .collect();
                    let got = PackedB::from_columns(n, k, p, |j| Values::Bf16(&rounded[j]));
                    let widened: Vec<f32> = padded
                        .iter()
                        .map(|&v| bf16::from_bits(round_bf16(v)).to_f32())
                        .collect();
                    let want = PackedB::from_transposed(&widened, n, k, p);
                    assert_eq!(got.data, want.data, "bf16 columns, {n}x{k}, {p:?}");
                });
            }
        }
    }

    #[test]
    fn rounds_to_nearest_even_like_torch() {
        // 1 + 2^-8 is halfway between bf16 1.0 and 1.0078125: ties go to the even mantissa (1.0).
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), bf16::from_f32(1.0).to_bits());
        assert_eq!(
            round_bf16(1.0 + 3.0 / 256.0),
            bf16::from_f32(1.015625).to_bits()
        );
        let xs = [0.1f32, -3.7, 1e-30, 65504.0, f32::INFINITY, -0.0];
        let want: Vec<u16> = xs.iter().map(|&x| round_bf16(x)).collect();
        let mut long = xs.repeat(7);
        long.push(2.5);
        let got = to_bf16(&long);
        assert_eq!(&got[..6], &want[..]);
        assert_eq!(got[42], round_bf16(2.5));
        // Whole vectors and the masked tail alike.
        let each: Vec<u16> = long.iter().map(|&x| round_bf16(x)).collect();
        assert_eq!(got, each);
        assert!(bf16::from_bits(to_bf16(&[f32::NAN])[0]).is_nan());
    }
}
