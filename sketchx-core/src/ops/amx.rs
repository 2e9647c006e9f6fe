//! The bf16 matrix product on Intel AMX tiles (`tdpbf16ps`), for CPUs that have them (Sapphire Rapids and later).
//!
//! One `tdpbf16ps` multiplies a 16 x 32 bf16 tile of `A` by a 32 x 16 tile of `B` into a 16 x 16 f32 tile of `C`:
//! 8,192 multiply-adds per instruction, several times what the AVX-512 BF16 micro-kernel of [`super::gemm`] does in
//! the same time. `B`'s tile layout (16 rows of 16 words, each word two consecutive `k` entries of one column) is
//! exactly a [`PackedB`] bf16 panel, so the operands packed for the AVX-512 kernels serve as they are; `A` is read
//! as row-major bf16. Each task keeps a 32 x 32 block of `C` in four tiles (two tiles of `A`, two of `B` per step
//! of 32 `k` entries) and walks a column block's rows, so that the column block of `B` stays in the L2 cache.
//! Edges (rows, columns or `k` entries that do not fill a tile) go through zero-filled scratch tiles, so that no
//! tile load reads past an operand. A 3x3 convolution runs channels last ([`gemm_rows_shifted`]): `A`'s rows are
//! the image's positions and each tap reads them shifted by whole rows, so that every tile row is one cache line.
//! Its `C` starts from the bias, one 64-byte row loaded into all 16 rows of a tile (stride 0). Where a
//! convolution's rows pass over a column block of its kernel a few times (the small images), `k` goes in chunks
//! that every pass takes in turn ([`Job::block_chunked`]): each chunk of `B` comes from memory once and serves the
//! other passes from L1, while the passes prefetch the next one.
//!
//! Linux hands out AMX state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), made once by [`available`];
//! without it, or with `SKETCHX_NO_AMX=1`, the AVX-512 kernels run. The instructions are written as inline
//! assembly because Rust's AMX intrinsics are not stable.

use rayon::prelude::*;

use super::cpu::SendPtr;
use super::gemm::{PackedB, NR};

/// Rows of a tile, and columns of a `C` tile.
const TILE: usize = 16;
/// 32-bit words of `k` per tile step (32 bf16 entries).
const TW: usize = 16;
/// Largest number of rows per parallel task.
const ROWS_MAX: usize = 512;
/// Tile steps of `k` per chunk when a convolution's rows pass over a column block of `B` several times (16 KiB
/// of `B`: it stays in L1 while the passes reuse it).
const CHUNK_STEPS: usize = 8;
/// Most passes of 32 rows over a column block that still go in chunks: beyond it, the product is compute-bound
/// and the chunks' round trips of `C` cost more than the cache saves.
const CHUNK_PASSES_MAX: usize = 8;

/// Whether the AMX kernel runs: the CPU has AMX-TILE and AMX-BF16, the OS granted the tile state, and
/// `SKETCHX_NO_AMX` is unset (or `0`). Asks the OS once.
pub(crate) fn available() -> bool {
    super::cpu::features().amx_bf16
}

/// Detection for [`super::cpu::features`]: the CPUID bits and the OS's permission (requested here, once per
/// process, before any tile instruction runs).
#[cfg(target_arch = "x86_64")]
pub(crate) fn detect() -> bool {
    if std::env::var_os("SKETCHX_NO_AMX").is_some_and(|v| !v.is_empty() && v != "0") {
        return false;
    }
    let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
    let (amx_bf16, amx_tile) = (leaf7.edx & (1 << 22) != 0, leaf7.edx & (1 << 24) != 0);
    amx_bf16 && amx_tile && request_permission()
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: without it, the first tile instruction faults.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_permission() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments; it only changes which CPU state the process may use.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn request_permission() -> bool {
    false
}

/// `C = start + A B` (`start`: `C`'s own values, zero, or a bias per column; only the first reads `C`): `A`
/// row-major bf16 bit patterns (`m` rows of `b.k()` entries, `lda` apart), `B` packed in bf16, `C` row-major f32
/// (`m` rows of `b.n()`, `ldc` apart); tasks in parallel when `parallel`. With `add` (values laid out as `C`),
/// `C = (start + A B) + add`, added to each tile right after it is stored.
///
/// # Safety
/// [`available`] must have returned `true`. `a` must point to `m` rows of `b.k()` readable entries `lda` apart
/// and `c` to `m` rows of `b.n()` values `ldc` apart that no one else reads or writes meanwhile; a bias must hold
/// `b.n()` values, and `add` the values of `C`'s rows and columns.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)] // a BLAS-style raw-pointer product: each argument is one of its operands' facts
pub(crate) unsafe fn gemm(
    m: usize,
    a: *const u16,
    lda: usize,
    b: &PackedB,
    (c, ldc): (*mut f32, usize),
    parallel: bool,
    init: Init,
    add: Option<SendPtr<f32>>,
) {
    let source = Source::Packed(b);
    // SAFETY: the caller's contract.
    unsafe {
        run(
            m,
            (a, lda, None, false),
            (b.k(), b.n(), source),
            Dest::Rows {
                c: SendPtr(c),
                ldc,
                add,
            },
            parallel,
            init,
        )
    }
}

/// `C = A B + bias` for a channels-last convolution: `A`'s rows are positions (row-major bf16, `lda` apart), `B`
/// a kernel packed tap-major (`b.k() = 2 * seg_words * shifts.len()` entries, one segment of `seg_words` words
/// per tap), and segment `s` reads `A`'s rows shifted by `shifts[s]`: entry `e` of row `i` is `a[(i +
/// shifts[e / (2 * seg_words)]) * lda + e % (2 * seg_words)]`. `C` (`m x b.n()`) starts from `bias[j]` in column
/// `j` and is handed to `epilogue` tile by tile, never stored; tasks in parallel.
///
/// # Safety
/// [`available`] must have returned `true`; `b.k()` must be even and a multiple of `2 * shifts.len()`. For every
/// shift `s`, rows `s..s + m.next_multiple_of(32)` of `A` (each `b.k() / shifts.len()` entries) must be readable
/// (rows past `m` fill the last tiles: their products are never handed on), and `bias` must hold `b.n()` values.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn gemm_rows_shifted(
    m: usize,
    (a, lda, shifts): (*const u16, usize, &[usize]),
    b: &PackedB,
    bias: &[f32],
    epilogue: Epilogue,
) {
    assert!(bias.len() >= b.n(), "bias shorter than the columns");
    let source = Source::Packed(b);
    // SAFETY: the caller's contract.
    unsafe {
        run(
            m,
            (a, lda, Some(shifts), true),
            (b.k(), b.n(), source),
            Dest::Tiles(epilogue),
            true,
            Init::Cols(bias.as_ptr()),
        )
    }
}

/// What a product hands its finished tiles to instead of storing `C` ([`gemm_handed`]).
#[cfg(target_arch = "x86_64")]
pub(crate) enum Handed<'a> {
    /// Each tile on its own.
    Tiles(Epilogue<'a>),
    /// Each row tile's two column tiles of a column block (panels `2j` and `2j + 1`) at once.
    Pairs(PairEpilogue<'a>),
}

/// `C = A B + bias` (no bias: from zero) handed to an epilogue tile by tile or pair by pair, never stored: `A` and
/// `B` as in [`gemm`]; tasks in parallel when `parallel`.
///
/// # Safety
/// [`available`] must have returned `true`; `a` must point to `m` rows of `b.k()` readable entries `lda` apart, and
/// a bias must hold `b.n()` values.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn gemm_handed(
    m: usize,
    (a, lda): (*const u16, usize),
    b: &PackedB,
    bias: Option<&[f32]>,
    to: Handed,
    parallel: bool,
) {
    let init = match bias {
        Some(bias) => {
            assert!(bias.len() >= b.n(), "bias shorter than the columns");
            Init::Cols(bias.as_ptr())
        }
        None => Init::Zero,
    };
    let dest = match to {
        Handed::Tiles(epilogue) => Dest::Tiles(epilogue),
        Handed::Pairs(epilogue) => Dest::Pairs(epilogue),
    };
    let source = Source::Packed(b);
    // SAFETY: the caller's contract.
    unsafe {
        run(
            m,
            (a, lda, None, false),
            (b.k(), b.n(), source),
            dest,
            parallel,
            init,
        )
    }
}

/// [`gemm`] with `B` an implicit convolution's rows (see [`super::gemm::Shifted`]): `k = 2 * seg_words *
/// shifts.len()` entries, `n` columns; tasks in parallel.
///
/// # Safety
/// As [`gemm`]; besides, every word a tile reads, `ptr[shifts[s] + w * stride + j]` for `w < seg_words` and `j`
/// below `n` rounded up to 16, must be readable.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_shifted(
    m: usize,
    a: *const u16,
    lda: usize,
    (ptr, stride, seg_words, shifts): (*const u32, usize, usize, &[usize]),
    n: usize,
    c: *mut f32,
    ldc: usize,
    overwrite: bool,
) {
    let source = Source::Shifted {
        ptr: SendPtr(ptr.cast_mut()),
        stride,
        seg_words,
        shifts,
    };
    let k = 2 * seg_words * shifts.len();
    let init = if overwrite {
        Init::Zero
    } else {
        Init::Accumulate
    };
    let dest = Dest::Rows {
        c: SendPtr(c),
        ldc,
        add: None,
    };
    // SAFETY: the caller's contract.
    unsafe { run(m, (a, lda, None, false), (k, n, source), dest, true, init) }
}

/// The product of [`gemm`] and [`gemm_shifted`].
///
/// # Safety
/// As theirs.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn run(
    m: usize,
    (a, lda, a_shifts, a_whole): (*const u16, usize, Option<&[usize]>, bool),
    (k, n, b): (usize, usize, Source),
    dest: Dest,
    parallel: bool,
    init: Init,
) {
    if let (0, Init::Zero, Dest::Rows { c, ldc, .. }) = (k, init, &dest) {
        for i in 0..m {
            // SAFETY: row i of C holds n values (the contract).
            unsafe { std::ptr::write_bytes(c.0.add(i * ldc), 0, n) };
        }
    }
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let panels = n.div_ceil(NR);
    let col_blocks = panels.div_ceil(2);
    let threads = if parallel {
        rayon::current_num_threads().max(1)
    } else {
        1
    };
    // Rows per task: all of them (B's column block is read once), fewer when that leaves threads idle.
    let mut rows = ROWS_MAX.min(m.div_ceil(2 * TILE) * 2 * TILE);
    while rows > 2 * TILE && m.div_ceil(rows) * col_blocks < 4 * threads {
        rows = (rows / 2).div_ceil(2 * TILE) * 2 * TILE;
    }
    let row_blocks = m.div_ceil(rows);
    let job = Job {
        k,
        n,
        a: SendPtr(a.cast_mut()),
        lda,
        a_shifts,
        a_whole,
        b,
        dest,
        init,
    };
    let block = |t: usize, scratch: &mut Scratches| {
        let (rb, cb) = (t / col_blocks, t % col_blocks);
        let r1 = ((rb + 1) * rows).min(m);
        // SAFETY: the caller's contract; tasks write disjoint blocks of C; the tiles are configured.
        unsafe { job.block(rb * rows, r1, 2 * cb, scratch) };
    };
    let cfg = TileConfig::all_full();
    // SAFETY (configure / release): `available` made the OS grant the tile state; each thread configures the
    // tiles before its tile instructions and releases them after (another library's AMX code may run between
    // tasks on the same thread).
    if parallel {
        (0..row_blocks * col_blocks).into_par_iter().for_each_init(
            Scratches::new,
            |scratch, t| unsafe {
                cfg.load();
                block(t, scratch);
                release();
            },
        );
    } else {
        let mut scratch = Scratches::new();
        unsafe {
            cfg.load();
            (0..row_blocks * col_blocks).for_each(|t| block(t, &mut scratch));
            release();
        }
    }
}

/// `tilerelease`: back to the initial tile state.
///
/// # Safety
/// The OS must have granted the tile state.
#[cfg(target_arch = "x86_64")]
unsafe fn release() {
    // SAFETY: the contract.
    unsafe { std::arch::asm!("tilerelease", options(nostack, nomem, preserves_flags)) };
}

/// Where the tiles of `B` come from.
#[cfg(target_arch = "x86_64")]
enum Source<'a> {
    /// A packed matrix: each tile is 16 consecutive words of a panel.
    Packed(&'a PackedB),
    /// An implicit convolution's rows ([`super::gemm::Shifted`]): word `w` of column `j` is `ptr[shifts[w /
    /// seg_words] + (w % seg_words) * stride + j]`, so a tile is 16 rows `stride` words apart.
    Shifted {
        ptr: SendPtr<u32>,
        stride: usize,
        seg_words: usize,
        shifts: &'a [usize],
    },
}

/// What `C`'s tiles start from.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) enum Init {
    /// `C`'s values.
    Accumulate,
    /// Zero (`C`'s values are never read).
    Zero,
    /// `bias[j]` in column `j` (`C`'s values are never read), one 64-byte row loaded into all 16 rows of a tile.
    Cols(*const f32),
}

/// The operands of one product, shared by its tasks.
#[cfg(target_arch = "x86_64")]
struct Job<'a> {
    k: usize,
    n: usize,
    a: SendPtr<u16>,
    lda: usize,
    /// `B`'s segments read `A`'s rows shifted by these (a channels-last convolution's taps); `None`: `A`'s
    /// entries follow `k`.
    a_shifts: Option<&'a [usize]>,
    /// `A`'s rows past `m` are readable up to the next multiple of 32 (with every shift): a tile of fewer rows
    /// loads them instead of going through a zero-filled copy (their products fall outside `C`).
    a_whole: bool,
    b: Source<'a>,
    dest: Dest<'a>,
    init: Init,
}

/// Takes each finished 16 x 16 tile of a product instead of `C`: `(row, column, tile, rows, columns)`, the tile's
/// first row and column in `C`, its values (row-major, 16 apart) and how many of its rows and columns are inside
/// `C`. Called from the product's tasks, each tile once.
pub(crate) type Epilogue<'a> = &'a (dyn Fn(usize, usize, &[f32; TILE * TILE], usize, usize) + Sync);

/// Takes a row tile's two finished 16 x 16 tiles of one column block (column panels `2j` and `2j + 1`) at once,
/// instead of `C`: `(row, column, tiles, rows, columns)`, the first row and column of the pair in `C`, the two
/// tiles' values (row-major, 16 apart) and how many of their rows and of each tile's columns are inside `C` (0 for
/// a tile past the last column). Called from the product's tasks, each pair once.
pub(crate) type PairEpilogue<'a> =
    &'a (dyn Fn(usize, usize, [&[f32; TILE * TILE]; 2], usize, [usize; 2]) + Sync);

/// Where a product's `C` goes.
#[cfg(target_arch = "x86_64")]
enum Dest<'a> {
    /// Row-major `C`, rows `ldc` apart, and values laid out as `C` to add to it, if any.
    Rows {
        c: SendPtr<f32>,
        ldc: usize,
        add: Option<SendPtr<f32>>,
    },
    /// Each tile to the epilogue.
    Tiles(Epilogue<'a>),
    /// Each row tile's pair of column tiles to the epilogue.
    Pairs(PairEpilogue<'a>),
}

// SAFETY: the bias pointer of `Init::Cols` is only read, by tasks of the product whose caller guarantees it stays
// valid while the product runs.
#[cfg(target_arch = "x86_64")]
unsafe impl Send for Init {}
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for Init {}

/// The tile configuration `ldtilecfg` reads: palette 1, every tile 16 rows of 64 bytes.
#[cfg(target_arch = "x86_64")]
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

#[cfg(target_arch = "x86_64")]
impl TileConfig {
    fn all_full() -> Self {
        let mut cfg = [0u8; 64];
        cfg[0] = 1;
        for t in 0..8 {
            // bytes 16..48: columns per row in bytes (u16 each); 48..64: rows (u8 each).
            cfg[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
            cfg[48 + t] = TILE as u8;
        }
        Self(cfg)
    }

    /// `ldtilecfg`.
    ///
    /// # Safety
    /// The OS must have granted the tile state.
    unsafe fn load(&self) {
        // SAFETY: 64 valid bytes; the contract.
        unsafe {
            std::arch::asm!("ldtilecfg [{}]", in(reg) self.0.as_ptr(), options(nostack, readonly, preserves_flags));
        }
    }
}

/// A zero-padded copy of an edge tile (16 rows of 64 bytes).
#[cfg(target_arch = "x86_64")]
#[repr(C, align(64))]
struct Scratch([u32; TILE * TW]);

#[cfg(target_arch = "x86_64")]
impl Scratch {
    fn zeroed() -> Self {
        Self([0; TILE * TW])
    }
}

/// The scratch tiles of one thread: made once per task or product (zeroing them per block of `C` would cost
/// more than the block's products), cleared only where an edge uses them.
#[cfg(target_arch = "x86_64")]
struct Scratches {
    c: [[Scratch; 2]; 2],
    a: [Scratch; 2],
    b: [Scratch; 2],
    /// `C`'s tiles between the chunks of [`Job::block_chunked`] (grown on first use).
    acc: Vec<Scratch>,
}

#[cfg(target_arch = "x86_64")]
impl Scratches {
    fn new() -> Self {
        let z = Scratch::zeroed;
        Self {
            c: [[z(), z()], [z(), z()]],
            a: [z(), z()],
            b: [z(), z()],
            acc: Vec::new(),
        }
    }
}

/// One tile instruction. Tile registers: `C` blocks in tmm0..tmm3 (`2 * row tile + column tile`), `A` in tmm4 and
/// tmm5, `B` in tmm6 and tmm7. `$mem` addressing is `[base + stride * 1]`, the only form tile loads take.
#[cfg(target_arch = "x86_64")]
macro_rules! tile_load {
    ($tmm:literal, $ptr:expr, $stride:expr) => {
        std::arch::asm!(
            concat!("tileloadd ", $tmm, ", [{p} + {s} * 1]"),
            p = in(reg) $ptr,
            s = in(reg) $stride,
            options(nostack, readonly, preserves_flags)
        )
    };
}

#[cfg(target_arch = "x86_64")]
macro_rules! tile_store {
    ($tmm:literal, $ptr:expr, $stride:expr) => {
        std::arch::asm!(
            concat!("tilestored [{p} + {s} * 1], ", $tmm),
            p = in(reg) $ptr,
            s = in(reg) $stride,
            options(nostack, preserves_flags)
        )
    };
}

#[cfg(target_arch = "x86_64")]
macro_rules! tile_dp {
    ($c:literal, $a:literal, $b:literal) => {
        std::arch::asm!(
            concat!("tdpbf16ps ", $c, ", ", $a, ", ", $b),
            options(nostack, nomem, preserves_flags)
        )
    };
}

#[cfg(target_arch = "x86_64")]
impl Job<'_> {
    /// Rows `r0..r1` of the column block of panels `p0, p0 + 1`.
    ///
    /// # Safety
    /// As [`gemm`]; no other task writes these rows and columns of `C`; the tiles are configured.
    unsafe fn block(&self, r0: usize, r1: usize, p0: usize, scratch: &mut Scratches) {
        let panels = self.n.div_ceil(NR);
        let cols = [0, 1].map(|j| {
            if p0 + j < panels {
                (self.n - (p0 + j) * NR).min(NR)
            } else {
                0
            }
        });
        let passes = (r1 - r0).div_ceil(2 * TILE);
        if (2..=CHUNK_PASSES_MAX).contains(&passes)
            && self.a_shifts.is_some()
            && self.steps() > CHUNK_STEPS
            && matches!(self.b, Source::Packed(_))
        {
            // SAFETY: as below.
            unsafe { self.block_chunked(r0, r1, p0, cols, scratch) };
            return;
        }
        let mut r = r0;
        while r < r1 {
            let rows = [0, 1].map(|i| (r1.saturating_sub(r + i * TILE)).min(TILE));
            // SAFETY: the tiles touched lie inside this task's rows and columns (the caller's contract).
            unsafe { self.tile_block(r, rows, p0, cols, scratch) };
            r += 2 * TILE;
        }
    }

    /// [`Job::block`] for rows that take several passes of 32 over the column block: `k` in chunks of
    /// [`CHUNK_STEPS`] steps, every pass through a chunk before the next one, so that `B` comes from memory
    /// once and its chunk serves the other passes from the cache, while the passes prefetch the next chunk (or
    /// the next column block's first) at an even pace: memory stays busy while the cached chunk is reused. `C`
    /// waits between chunks in the thread's scratch tiles.
    ///
    /// # Safety
    /// As [`Job::block`], with `B` packed.
    unsafe fn block_chunked(
        &self,
        r0: usize,
        r1: usize,
        p0: usize,
        cols: [usize; 2],
        scratch: &mut Scratches,
    ) {
        let Source::Packed(packed) = &self.b else {
            unreachable!("chunked blocks read packed operands")
        };
        let passes = (r1 - r0).div_ceil(2 * TILE);
        let steps = self.steps();
        let Scratches {
            a: a_scratch,
            b: b_scratch,
            acc,
            ..
        } = scratch;
        if acc.len() < 4 * passes {
            acc.resize_with(4 * passes, Scratch::zeroed);
        }
        let rows_of = |p: usize| {
            let r = r0 + p * 2 * TILE;
            [0, 1].map(|i| (r1.saturating_sub(r + i * TILE)).min(TILE))
        };
        let tile = |p: usize, i: usize, j: usize| 4 * p + 2 * i + j;
        for p in 0..passes {
            let (r, rows) = (r0 + p * 2 * TILE, rows_of(p));
            for (i, j) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                // SAFETY: the tile's rows and columns of C are this task's.
                unsafe {
                    self.start_tile(
                        &mut acc[tile(p, i, j)],
                        (r + i * TILE, rows[i]),
                        (p0 + j, cols[j]),
                    )
                };
            }
        }
        let words = self.k.div_ceil(2);
        let panels = self.n.div_ceil(NR);
        // The bytes of panel `panel`'s steps `s0..s1` (none past the last panel).
        let region = |(s0, s1): (usize, usize), panel: usize| -> [*const u8; 2] {
            if panel >= panels {
                return [std::ptr::null(); 2];
            }
            let at = |s: usize| {
                // SAFETY: inside the panel (s <= steps).
                unsafe {
                    packed
                        .data_ptr()
                        .add((panel * words + self.step_word(s)) * NR)
                }
                .cast::<u8>()
            };
            [at(s0), at(s1)]
        };
        let mut s0 = 0;
        while s0 < steps {
            let s1 = (s0 + CHUNK_STEPS).min(steps);
            let (next, np) = if s1 < steps {
                ((s1, (s1 + CHUNK_STEPS).min(steps)), p0)
            } else {
                ((0, CHUNK_STEPS.min(steps)), p0 + 2)
            };
            let mut pf =
                Prefetch::new([region(next, np), region(next, np + 1)], passes * (s1 - s0));
            for p in 0..passes {
                let (r, rows) = (r0 + p * 2 * TILE, rows_of(p));
                let base = acc.as_mut_ptr();
                let at = |i: usize, j: usize| {
                    // SAFETY: tile(p, i, j) < 4 * passes <= acc.len().
                    (rows[i] > 0 && cols[j] > 0)
                        .then(|| unsafe { (*base.add(tile(p, i, j))).0.as_mut_ptr().cast::<f32>() })
                };
                let c_at = [[at(0, 0), at(0, 1)], [at(1, 0), at(1, 1)]];
                // SAFETY: scratch tiles (16 rows of 64 bytes); the products' contract is the caller's.
                unsafe {
                    load_c(c_at.map(|row| row.map(|t| t.map(|t| (t, 64)))));
                    self.products(r, rows, p0, cols, (s0, s1), (a_scratch, b_scratch), &mut pf);
                    store_c(c_at.map(|row| row.map(|t| t.map(|t| (t, 64)))));
                }
            }
            s0 = s1;
        }
        for p in 0..passes {
            let (r, rows) = (r0 + p * 2 * TILE, rows_of(p));
            for i in 0..2 {
                // SAFETY: the tiles' rows and columns of C are this task's; the scratch holds their values.
                unsafe {
                    self.hand_on_row(
                        [&acc[tile(p, i, 0)], &acc[tile(p, i, 1)]],
                        (r + i * TILE, rows[i]),
                        p0,
                        cols,
                        [true; 2],
                    )
                };
            }
        }
    }

    /// Zeroes a scratch tile and writes its start into the rows and columns inside `C` (`rows` of them from row
    /// `row`, `cols` from column panel `panel`): nothing (zero), the bias, or `C`'s own values (tiles handed to
    /// an epilogue start from zero then).
    ///
    /// # Safety
    /// The rows and columns must lie inside `C` and this task's.
    unsafe fn start_tile(
        &self,
        t: &mut Scratch,
        (row, rows): (usize, usize),
        (panel, cols): (usize, usize),
    ) {
        let t = t.0.as_mut_ptr().cast::<f32>();
        // SAFETY: a scratch tile holds 16 x 16 values.
        unsafe { std::ptr::write_bytes(t, 0, TILE * TILE) };
        if rows == 0 || cols == 0 {
            return;
        }
        // SAFETY: row `row` and column panel * 16 are inside C and the bias (rows/cols > 0).
        let (from, step) = match (self.init, &self.dest) {
            (Init::Zero, _) | (Init::Accumulate, Dest::Tiles(_) | Dest::Pairs(_)) => return,
            (Init::Cols(bias), _) => (unsafe { bias.add(panel * NR) }, 0),
            (Init::Accumulate, &Dest::Rows { ref c, ldc, .. }) => {
                (unsafe { c.0.cast_const().add(row * ldc + panel * NR) }, ldc)
            }
        };
        for y in 0..rows {
            // SAFETY: see above; `cols` values of the row.
            unsafe { std::ptr::copy_nonoverlapping(from.add(y * step), t.add(y * TILE), cols) };
        }
    }

    /// Hands a row tile's two finished tiles of the column block from panel `p0` on: the pair to a pair epilogue,
    /// else each as [`Job::hand_on`] does (copied from its scratch tile when `copy`).
    ///
    /// # Safety
    /// As [`Job::hand_on`], for both tiles.
    unsafe fn hand_on_row(
        &self,
        t: [&Scratch; 2],
        (row, rows): (usize, usize),
        p0: usize,
        cols: [usize; 2],
        copy: [bool; 2],
    ) {
        if let Dest::Pairs(epilogue) = &self.dest {
            if rows > 0 && cols[0] > 0 {
                // SAFETY: each scratch holds a tile's 256 f32 values (the contract).
                let tiles = t.map(|t| unsafe { &*t.0.as_ptr().cast::<[f32; TILE * TILE]>() });
                epilogue(row, p0 * NR, tiles, rows, cols);
            }
            return;
        }
        for j in 0..2 {
            // SAFETY: the contract.
            unsafe { self.hand_on(t[j], (row, rows), (p0 + j, cols[j]), copy[j]) };
        }
    }

    /// Hands a finished tile on (`rows` rows from row `row`, `cols` columns from column panel `panel`; none past
    /// an edge): to the epilogue, or into row-major `C` (copied from the scratch tile `t` when `copy`, else
    /// already stored there) with the values to add.
    ///
    /// # Safety
    /// The rows and columns must lie inside `C` and this task's; `t` holds the tile when it is read.
    unsafe fn hand_on(
        &self,
        t: &Scratch,
        (row, rows): (usize, usize),
        (panel, cols): (usize, usize),
        copy: bool,
    ) {
        if rows == 0 || cols == 0 {
            return;
        }
        let (c, ldc, add) = match &self.dest {
            &Dest::Rows {
                ref c,
                ldc,
                ref add,
            } => (c, ldc, add),
            Dest::Tiles(epilogue) => {
                // SAFETY: the scratch holds the tile's 256 f32 values (the contract).
                let tile = unsafe { &*t.0.as_ptr().cast::<[f32; TILE * TILE]>() };
                epilogue(row, panel * NR, tile, rows, cols);
                return;
            }
            Dest::Pairs(_) => unreachable!("pairs are handed on by hand_on_row"),
        };
        let origin = row * ldc + panel * NR;
        if copy {
            let s = t.0.as_ptr().cast::<f32>();
            for y in 0..rows {
                // SAFETY: the contract.
                unsafe {
                    std::ptr::copy_nonoverlapping(s.add(y * TILE), c.0.add(origin + y * ldc), cols)
                };
            }
        }
        if let Some(add) = add {
            // SAFETY: the tile's rows and columns of C (this task's) and of `add` (laid out as C).
            unsafe { add_tile(c.0.add(origin), add.0.add(origin), ldc, rows, cols) };
        }
    }

    /// The first entry of the `A` tile of rows `row..row + 16` for the step at word `w` of segment `seg` (word
    /// `w0` of `k`).
    ///
    /// # Safety
    /// The tile's rows lie inside `A` (the caller's rows and steps).
    #[inline(always)]
    unsafe fn a_tile(&self, row: usize, (seg, w, w0): (usize, usize, usize)) -> *const u16 {
        let (row, entry) = match self.a_shifts {
            None => (row, 2 * w0),
            Some(shifts) => (row + shifts[seg], 2 * w),
        };
        // SAFETY: the contract.
        unsafe { self.a.0.cast_const().add(row * self.lda + entry) }
    }

    /// The first word of column panel `panel`'s `B` tile for the step at word `w` of segment `seg` (word `w0`
    /// of `k`), and the words between its rows.
    ///
    /// # Safety
    /// The panel and step lie inside `B`.
    #[inline(always)]
    unsafe fn b_tile(
        &self,
        panel: usize,
        (seg, w, w0): (usize, usize, usize),
    ) -> (*const u32, usize) {
        // SAFETY (both arms): the contract.
        match &self.b {
            Source::Packed(b) => {
                let words = self.k.div_ceil(2);
                (unsafe { b.data_ptr().add((panel * words + w0) * NR) }, NR)
            }
            Source::Shifted {
                ptr,
                stride,
                shifts,
                ..
            } => (
                unsafe {
                    ptr.0
                        .cast_const()
                        .add(shifts[seg] + w * stride + panel * NR)
                },
                *stride,
            ),
        }
    }

    /// Words of `k` per segment (the whole of `k` for a plain product).
    #[inline(always)]
    fn seg_words(&self) -> usize {
        let words = self.k.div_ceil(2);
        match (&self.b, self.a_shifts) {
            (Source::Shifted { seg_words, .. }, _) => *seg_words,
            (Source::Packed(_), Some(shifts)) => words / shifts.len(),
            (Source::Packed(_), None) => words,
        }
    }

    /// Segments of `k` (a convolution's taps; one for a plain product).
    #[inline(always)]
    fn segments(&self) -> usize {
        match (&self.b, self.a_shifts) {
            (Source::Shifted { shifts, .. }, _) => shifts.len(),
            (Source::Packed(_), Some(shifts)) => shifts.len(),
            (Source::Packed(_), None) => 1,
        }
    }

    /// Tile steps over all of `k`: each segment in steps of 16 words, the last one of a segment possibly short.
    fn steps(&self) -> usize {
        self.segments() * self.seg_words().div_ceil(TW)
    }

    /// The word of `k` where step `s` starts (`s == steps()`: the number of words).
    fn step_word(&self, s: usize) -> usize {
        let seg_steps = self.seg_words().div_ceil(TW);
        (s / seg_steps) * self.seg_words() + (s % seg_steps) * TW
    }

    /// The tile products of steps `s0..s1` of `k` for the 32 x 32 block of `C` at row `r` and panels `p0, p0 +
    /// 1` (`rows[i]` rows in row tile `i`, `cols[j]` columns in column tile `j`; 0 for a tile past the edge),
    /// into `C`'s tiles in tmm0..tmm3, issuing `pf`'s prefetches on the way.
    ///
    /// # Safety
    /// As [`Job::block`], with the tiles configured and holding the block's `C`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)] // one block's coordinates, its steps and the thread's scratch
    unsafe fn products(
        &self,
        r: usize,
        rows: [usize; 2],
        p0: usize,
        cols: [usize; 2],
        (s0, s1): (usize, usize),
        (a_scratch, b_scratch): (&mut [Scratch; 2], &mut [Scratch; 2]),
        pf: &mut Prefetch,
    ) {
        let seg_words = self.seg_words();
        let seg_steps = seg_words.div_ceil(TW);
        let has = |i: usize, j: usize| rows[i] > 0 && cols[j] > 0;
        let full = rows == [TILE; 2] && cols == [NR; 2];
        let (mut seg, mut w) = (s0 / seg_steps, (s0 % seg_steps) * TW);
        // SAFETY (every tile instruction below): each load reads 16 rows of 64 bytes from `ptr` with `stride`,
        // which lie inside an operand (full tiles) or a scratch tile (edges).
        unsafe {
            let mut s = s0;
            while s < s1 {
                if full {
                    // A segment's whole steps in one loop of tile instructions, the operands' pointers stepping a
                    // tile at a time: the per-step bookkeeping below held the tiles up by a sixth in a warm
                    // product. (A short last step of a segment, or of an odd k, is not whole.) One step at a time
                    // where each step issues its share of prefetches. Each load comes as close as possible before
                    // its first product, so that the next step's loads overlap this step's last products.
                    let whole_words = (self.k / 2 - seg * seg_words).min(seg_words);
                    let whole_in_seg = (whole_words.saturating_sub(w)) / TW;
                    let run = whole_in_seg.min(s1 - s);
                    let run = if pf.per_step == 0 { run } else { run.min(1) };
                    if run > 0 {
                        pf.issue();
                        let w0 = seg * seg_words + w;
                        let step = (seg, w, w0);
                        let (a0, a1) = (self.a_tile(r, step), self.a_tile(r + TILE, step));
                        let ((b0, b_row), (b1, _)) =
                            (self.b_tile(p0, step), self.b_tile(p0 + 1, step));
                        let b_step = (b_row * TW * 4) as isize;
                        std::arch::asm!(
                            "2:",
                            "tileloadd tmm4, [{a0} + {sa} * 1]",
                            "tileloadd tmm6, [{b0} + {sb} * 1]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tileloadd tmm7, [{b1} + {sb} * 1]",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            "tileloadd tmm5, [{a1} + {sa} * 1]",
                            "tdpbf16ps tmm2, tmm5, tmm6",
                            "tdpbf16ps tmm3, tmm5, tmm7",
                            "add {a0}, 64",
                            "add {a1}, 64",
                            "add {b0}, {bs}",
                            "add {b1}, {bs}",
                            "dec {n}",
                            "jnz 2b",
                            a0 = inout(reg) a0 => _,
                            a1 = inout(reg) a1 => _,
                            sa = in(reg) self.lda * 2,
                            b0 = inout(reg) b0 => _,
                            b1 = inout(reg) b1 => _,
                            sb = in(reg) b_row * 4,
                            bs = in(reg) b_step,
                            n = inout(reg) run => _,
                            options(nostack, readonly)
                        );
                        s += run;
                        w += run * TW;
                        if w >= seg_words {
                            (seg, w) = (seg + 1, 0);
                        }
                        continue;
                    }
                }
                s += 1;
                let kw = (seg_words - w).min(TW);
                let w0 = seg * seg_words + w;
                // Entries of k in this step (the last word of an odd k holds one).
                let ke = (self.k - 2 * w0).min(2 * kw);
                let step = (seg, w, w0);
                w += TW;
                if w >= seg_words {
                    (seg, w) = (seg + 1, 0);
                }
                for i in 0..2 {
                    if rows[i] == 0 {
                        continue;
                    }
                    let origin = self.a_tile(r + i * TILE, step);
                    let (ptr, stride) = if (rows[i] == TILE || self.a_whole) && ke == 2 * TW {
                        (origin.cast::<u8>(), self.lda * 2)
                    } else {
                        let s = a_scratch[i].0.as_mut_ptr().cast::<u16>();
                        std::ptr::write_bytes(s, 0, TILE * 2 * TW);
                        for y in 0..rows[i] {
                            std::ptr::copy_nonoverlapping(
                                origin.add(y * self.lda),
                                s.add(y * 2 * TW),
                                ke,
                            );
                        }
                        (s.cast_const().cast::<u8>(), 64)
                    };
                    if i == 0 {
                        tile_load!("tmm4", ptr, stride);
                    } else {
                        tile_load!("tmm5", ptr, stride);
                    }
                }
                for j in 0..2 {
                    if cols[j] == 0 {
                        continue;
                    }
                    let (origin, row_words) = self.b_tile(p0 + j, step);
                    let (ptr, stride) = if kw == TW {
                        (origin, row_words * 4)
                    } else {
                        let s = b_scratch[j].0.as_mut_ptr();
                        std::ptr::write_bytes(s, 0, TILE * TW);
                        for y in 0..kw {
                            std::ptr::copy_nonoverlapping(
                                origin.add(y * row_words),
                                s.add(y * NR),
                                NR,
                            );
                        }
                        (s.cast_const(), 64)
                    };
                    if j == 0 {
                        tile_load!("tmm6", ptr, stride);
                    } else {
                        tile_load!("tmm7", ptr, stride);
                    }
                }
                if has(0, 0) {
                    tile_dp!("tmm0", "tmm4", "tmm6");
                }
                if has(0, 1) {
                    tile_dp!("tmm1", "tmm4", "tmm7");
                }
                if has(1, 0) {
                    tile_dp!("tmm2", "tmm5", "tmm6");
                }
                if has(1, 1) {
                    tile_dp!("tmm3", "tmm5", "tmm7");
                }
            }
        }
    }

    /// One 32 x 32 block of `C` (`rows[i]` rows in row tile `i`, `cols[j]` columns in column tile `j`; 0 for a
    /// tile past the edge) over all of `k`.
    ///
    /// # Safety
    /// As [`Job::block`], with the tiles configured.
    unsafe fn tile_block(
        &self,
        r: usize,
        rows: [usize; 2],
        p0: usize,
        cols: [usize; 2],
        scratch: &mut Scratches,
    ) {
        let Scratches {
            c: c_scratch,
            a: a_scratch,
            b: b_scratch,
            ..
        } = scratch;
        let has = |i: usize, j: usize| rows[i] > 0 && cols[j] > 0;
        // Where each C tile lives while it is computed: C itself, or a scratch copy at an edge.
        let mut c_at = [[None; 2]; 2];
        for i in 0..2 {
            for j in 0..2 {
                if !has(i, j) {
                    continue;
                }
                let s = c_scratch[i][j].0.as_mut_ptr().cast::<f32>();
                let (origin, ldc) = match &self.dest {
                    // SAFETY: row r + 16i and column (p0 + j) * 16 are inside C (rows/cols > 0).
                    &Dest::Rows { ref c, ldc, .. } => (
                        unsafe { c.0.add((r + i * TILE) * ldc + (p0 + j) * NR) },
                        ldc,
                    ),
                    // Tiles for the epilogue live in the scratch (C's start: zero or the bias).
                    Dest::Tiles(_) | Dest::Pairs(_) => (s, TILE),
                };
                c_at[i][j] = Some(if rows[i] == TILE && cols[j] == NR {
                    (origin, ldc * 4)
                } else {
                    // SAFETY: the tile's rows and columns of C are this task's.
                    unsafe {
                        self.start_tile(
                            &mut c_scratch[i][j],
                            (r + i * TILE, rows[i]),
                            (p0 + j, cols[j]),
                        )
                    };
                    (s, 64)
                });
            }
        }
        // SAFETY (every tile instruction below): each load reads 16 rows of 64 bytes from `ptr` with `stride`,
        // which lie inside an operand (full tiles) or a scratch tile (edges); stores write C's own tile or scratch.
        unsafe {
            if let Init::Zero = self.init {
                // (A tile past the edge is zeroed too: it is neither multiplied nor stored.)
                std::arch::asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem, preserves_flags)
                );
            } else {
                // A whole tile starting from the bias loads its 16 values into every row (stride 0); edges start
                // from their scratch copies.
                let from = |i: usize, j: usize| match (self.init, c_at[i][j]) {
                    (Init::Cols(bias), Some(_)) if rows[i] == TILE && cols[j] == NR => {
                        Some((bias.add((p0 + j) * NR).cast_mut(), 0))
                    }
                    (_, at) => at,
                };
                load_c([[from(0, 0), from(0, 1)], [from(1, 0), from(1, 1)]]);
            }
            self.products(
                r,
                rows,
                p0,
                cols,
                (0, self.steps()),
                (a_scratch, b_scratch),
                &mut Prefetch::none(),
            );
            store_c(c_at);
        }
        // Edge tiles back into C, or every tile to the epilogue.
        for i in 0..2 {
            let copy = [0, 1].map(|j| rows[i] < TILE || cols[j] < NR);
            // SAFETY: the tiles' rows and columns of C are this task's; the scratch holds an edge tile's values
            // and every tile's for an epilogue (stored above).
            unsafe {
                self.hand_on_row(
                    [&c_scratch[i][0], &c_scratch[i][1]],
                    (r + i * TILE, rows[i]),
                    p0,
                    cols,
                    copy,
                )
            };
        }
    }
}

/// Where a block's four `C` tiles live while they are computed (first byte, bytes between rows); `None` for a
/// tile past the edge.
#[cfg(target_arch = "x86_64")]
type CTiles = [[Option<(*mut f32, usize)>; 2]; 2];

/// Loads `C`'s tiles into tmm0..tmm3 (`2 * row tile + column tile`).
///
/// # Safety
/// Each tile's 16 rows of 64 bytes must be readable; the tiles configured.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn load_c(at: CTiles) {
    // SAFETY: the contract.
    unsafe {
        if let Some((p, s)) = at[0][0] {
            tile_load!("tmm0", p, s);
        }
        if let Some((p, s)) = at[0][1] {
            tile_load!("tmm1", p, s);
        }
        if let Some((p, s)) = at[1][0] {
            tile_load!("tmm2", p, s);
        }
        if let Some((p, s)) = at[1][1] {
            tile_load!("tmm3", p, s);
        }
    }
}

/// Stores tmm0..tmm3 into `C`'s tiles.
///
/// # Safety
/// Each tile's 16 rows of 64 bytes must be writable by this thread alone; the tiles configured.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn store_c(at: CTiles) {
    // SAFETY: the contract.
    unsafe {
        if let Some((p, s)) = at[0][0] {
            tile_store!("tmm0", p, s);
        }
        if let Some((p, s)) = at[0][1] {
            tile_store!("tmm1", p, s);
        }
        if let Some((p, s)) = at[1][0] {
            tile_store!("tmm2", p, s);
        }
        if let Some((p, s)) = at[1][1] {
            tile_store!("tmm3", p, s);
        }
    }
}

/// Software prefetches of the next chunk of `B`, spread evenly over the steps that reuse the current one: two
/// byte ranges, walked a cache line at a time.
#[cfg(target_arch = "x86_64")]
struct Prefetch {
    ranges: [[*const u8; 2]; 2],
    per_step: usize,
}

#[cfg(target_arch = "x86_64")]
impl Prefetch {
    /// None at all.
    fn none() -> Self {
        Self {
            ranges: [[std::ptr::null(); 2]; 2],
            per_step: 0,
        }
    }

    /// The lines of `ranges` (`[start, end)`; null for none), over `steps` calls of [`Prefetch::issue`].
    fn new(ranges: [[*const u8; 2]; 2], steps: usize) -> Self {
        let lines: usize = ranges
            .iter()
            .map(|[s, e]| (*e as usize - *s as usize).div_ceil(64))
            .sum();
        Self {
            ranges,
            per_step: lines.div_ceil(steps.max(1)),
        }
    }

    /// One step's share of the lines.
    #[inline(always)]
    fn issue(&mut self) {
        for _ in 0..self.per_step {
            let Some(range) = self.ranges.iter_mut().find(|[s, e]| s < e) else {
                self.per_step = 0;
                return;
            };
            // SAFETY: a prefetch never faults; the address stays inside (or one line past) an operand.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                    range[0].cast::<i8>(),
                );
                range[0] = range[0].wrapping_add(64);
            }
        }
    }
}

/// `c[y * ld + x] += add[y * ld + x]` for `y < rows`, `x < cols` (at most 16): a tile of `C` just stored, still
/// in L1.
///
/// # Safety
/// Both must hold the `rows x cols` block with row stride `ld`; the CPU has AVX-512 (every AMX CPU does).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn add_tile(c: *mut f32, add: *const f32, ld: usize, rows: usize, cols: usize) {
    use std::arch::x86_64::*;
    let mask: __mmask16 = if cols >= TILE {
        0xffff
    } else {
        (1 << cols) - 1
    };
    for y in 0..rows {
        // SAFETY: row y < rows, the masked columns < cols (the contract).
        unsafe {
            let (c, a) = (c.add(y * ld), add.add(y * ld));
            let v = _mm512_add_ps(
                _mm512_maskz_loadu_ps(mask, c),
                _mm512_maskz_loadu_ps(mask, a),
            );
            _mm512_mask_storeu_ps(c, mask, v);
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::ops::gemm::{round_bf16, Format};

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// The shifted-rows product (a channels-last convolution's) equals the f64 product of the bf16 operands: rows
    /// in one pass and in a few (the chunked path: whole and short chunks, short last tiles), segments of whole and
    /// partial tile steps, columns that fill no tile; every value handed to the epilogue once, none past `C`.
    #[test]
    fn rows_shifted_match_the_rounded_product() {
        if !available() {
            eprintln!("AMX not available on this CPU (nothing to test)");
            return;
        }
        let to_f = |v: u16| half::bf16::from_bits(v).to_f32() as f64;
        // Two threads, so that the tasks keep their rows whole where there are enough columns (as on the CI's
        // two cores) and the chunked path runs.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for (idx, &(m, n, seg, shifts)) in [
            (20usize, 16usize, 64usize, &[0usize, 3, 7][..]),
            (100, 260, 96, &[0, 1, 5, 6, 11]),
            (152, 264, 320, &[0, 1, 2, 9, 10, 11, 18, 19, 20]),
            (75, 300, 38, &[2, 0, 9]),
            (600, 20, 64, &[0, 4, 8]),
        ]
        .iter()
        .enumerate()
        {
            let lda = seg.next_multiple_of(32) + 32;
            let arows = m.next_multiple_of(32) + shifts.iter().max().unwrap();
            let a: Vec<u16> = values(arows * lda, idx as u64 + 7)
                .into_iter()
                .map(round_bf16)
                .collect();
            let k = seg * shifts.len();
            let bm = values(k * n, idx as u64 + 70);
            let b = PackedB::from_rows(k, n, Format::Bf16, |r, row| {
                row.copy_from_slice(&bm[r * n..(r + 1) * n])
            });
            let bias = values(n, idx as u64 + 700);
            let got = std::sync::Mutex::new(vec![f64::NAN; m * n]);
            let seen = std::sync::Mutex::new(vec![0u8; m * n]);
            let epilogue =
                |row: usize, col: usize, tile: &[f32; TILE * TILE], rows: usize, cols: usize| {
                    assert!(row + rows <= m && col + cols <= n, "a tile past C");
                    let (mut got, mut seen) = (got.lock().unwrap(), seen.lock().unwrap());
                    for i in 0..rows {
                        for j in 0..cols {
                            got[(row + i) * n + col + j] = tile[i * TILE + j] as f64;
                            seen[(row + i) * n + col + j] += 1;
                        }
                    }
                };
            // SAFETY: AMX is available; k = 2 * (seg / 2) words per shift; rows s..s + m rounded up to 32 of `a`
            // exist for every shift s; the bias holds n values.
            pool.install(|| unsafe {
                gemm_rows_shifted(m, (a.as_ptr(), lda, shifts), &b, &bias, &epilogue)
            });
            let (got, seen) = (got.into_inner().unwrap(), seen.into_inner().unwrap());
            for i in 0..m {
                for j in 0..n {
                    assert_eq!(
                        seen[i * n + j],
                        1,
                        "m {m} n {n}: C[{i}][{j}] handed on {} times",
                        seen[i * n + j]
                    );
                    let mut want = bias[j] as f64;
                    for (t, &s) in shifts.iter().enumerate() {
                        for e in 0..seg {
                            let bv =
                                half::bf16::from_f32(bm[(t * seg + e) * n + j]).to_f32() as f64;
                            want += to_f(a[(i + s) * lda + e]) * bv;
                        }
                    }
                    let g = got[i * n + j];
                    assert!(
                        (g - want).abs() <= 1e-5 * (k as f64).sqrt() + 1e-6,
                        "m {m} n {n} seg {seg}: C[{i}][{j}] = {g}, want {want}"
                    );
                }
            }
        }
    }

    /// The AMX product equals the f64 product of the bf16-rounded operands (up to f32 summation error) on shapes
    /// with every kind of edge: rows, columns and `k` that fill no tile, odd `k`, a row stride past the row; added
    /// to `C`, or from zero or a column bias (and never past its `n` columns).
    #[test]
    fn matches_the_rounded_product() {
        if !available() {
            eprintln!(
                "AMX not available on this CPU: the AVX-512 path serves instead (nothing to test)"
            );
            return;
        }
        let to_f = |v: u16| half::bf16::from_bits(v).to_f32() as f64;
        for (idx, &(m, n, k, pad)) in [
            (1, 1, 1, 0),
            (16, 16, 32, 0),
            (32, 32, 64, 0),
            (17, 33, 31, 3),
            (70, 45, 77, 0),
            (64, 320, 320, 5),
            (5, 7, 1000, 0),
            (129, 16, 2, 1),
            // Several tasks each way, k in many tile steps, edges everywhere.
            (300, 290, 1100, 1),
        ]
        .iter()
        .enumerate()
        {
            let lda = k + pad;
            let a: Vec<u16> = values(m * lda, idx as u64 + 1)
                .into_iter()
                .map(round_bf16)
                .collect();
            let bm = values(k * n, idx as u64 + 100);
            let b = PackedB::from_rows(k, n, Format::Bf16, |r, row| {
                row.copy_from_slice(&bm[r * n..(r + 1) * n])
            });
            let ldc = n + 2;
            let c0 = values(m * ldc, idx as u64 + 200);
            let bias = values(n, idx as u64 + 300);
            // Values laid out as C, added at the end in the last two runs.
            let extra = values(m * ldc, idx as u64 + 4);
            // 0: C's values, 1: zero, 2: the bias.
            for (parallel, start, add) in [
                (false, 0, false),
                (true, 0, false),
                (false, 1, false),
                (true, 1, false),
                (true, 2, false),
                (false, 2, false),
                (true, 2, true),
                (false, 1, true),
            ] {
                let mut c = c0.clone();
                // SAFETY: AMX is available (checked); the buffers have the sizes the strides describe.
                unsafe {
                    gemm(
                        m,
                        a.as_ptr(),
                        lda,
                        &b,
                        (c.as_mut_ptr(), ldc),
                        parallel,
                        [Init::Accumulate, Init::Zero, Init::Cols(bias.as_ptr())][start],
                        add.then(|| SendPtr(extra.as_ptr().cast_mut())),
                    )
                };
                for i in 0..m {
                    for j in 0..ldc {
                        let got = c[i * ldc + j] as f64;
                        if j >= n {
                            assert_eq!(
                                got,
                                c0[i * ldc + j] as f64,
                                "column {j} past n was written"
                            );
                            continue;
                        }
                        let mut want = [c0[i * ldc + j] as f64, 0.0, bias[j] as f64][start];
                        for p in 0..k {
                            let bv = half::bf16::from_f32(bm[p * n + j]).to_f32() as f64;
                            want += to_f(a[i * lda + p]) * bv;
                        }
                        if add {
                            want += extra[i * ldc + j] as f64;
                        }
                        assert!(
                            (got - want).abs() <= 1e-5 * (k as f64).sqrt() + 1e-6,
                            "m {m} n {n} k {k}: C[{i}][{j}] = {got}, want {want}"
                        );
                    }
                }
            }
        }
    }
}
