//! Multi-head attention on the CPU without the full score matrix and without head-split copies.
//!
//! For each (image, head, block of [`QUERY_TILE`] queries), in parallel: scores = Q_tile K^T (one GEMM reading
//! the heads in place through strides), a row softmax as torch computes it (max, exp, sum, divide), then
//! O_tile = P V written straight into the `(b, n, heads * head_dim)` output. Memory is one `tile x keys` block
//! per thread instead of `heads x n x keys` (256 MiB per attention at 512x512 in f32).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{line_aligned, padded_stride, SendPtr, Values};
use super::simd::{exp_sum_row, softmax_row};

/// Queries per task: a `QUERY_TILE x keys` score block (1 MiB at 4096 keys) stays in the L2 cache.
pub const QUERY_TILE: usize = 64;

/// `softmax(q k^T * scale) v` per head for `q` `(b, n, heads * d)`, `k` and `v` `(b, m, heads * d)`.
/// f32 CPU tensors use [`AttentionOp`]; anything else the plain candle formulation. `bf16` (the CPU bf16 mode)
/// lets the two products round their operands to bf16 where the CPU has AMX tiles or AVX-512 BF16. Timed as
/// `attention`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    bf16: bool,
) -> Result<Tensor> {
    attention_as(q, k, v, heads, scale, (bf16, false))
}

/// [`attention`] in the CPU bf16 mode for a consumer that rounds the result to bf16 anyway (a layer packed in
/// bf16): on AMX each tile of the result is divided by its softmax sums and rounded as the product hands it on, a
/// bf16 tensor (half the bytes, the same values the consumer would round to); elsewhere [`attention`]'s f32 result.
pub fn attention_rounded(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    attention_as(q, k, v, heads, scale, (true, true))
}

/// [`attention`] with its products in bf16 (`bf16`) and its result rounded (`rounded`, on AMX).
fn attention_as(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    (bf16, rounded): (bool, bool),
) -> Result<Tensor> {
    // Two products per head: q k^T and p v, each n x m x d multiply-adds.
    let flops = || match (q.dims3(), k.dim(1)) {
        (Ok((b, n, inner)), Ok(m)) => (4 * b * n * m * inner) as u64,
        _ => 0,
    };
    let kind = super::profile::shaped("attention", || {
        format!("{:?} {:?} {heads}", q.dims(), k.dims())
    });
    super::profile::scope_flops(kind, flops, || {
        attention_untimed(q, k, v, heads, scale, (bf16, rounded))
    })
}

fn attention_untimed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    (bf16, rounded): (bool, bool),
) -> Result<Tensor> {
    let on_tiles =
        bf16 && super::kernels_enabled() && q.device().is_cpu() && super::amx::available();
    // Operands rounded to bf16 already (the CPU bf16 mode's projections on AMX, `FastLinear::forward_rounded`) go
    // to the AMX path as they are; the other paths read their exact f32 values.
    let widen = |t: &Tensor| match t.dtype() {
        DType::BF16 if !on_tiles => t.to_dtype(DType::F32),
        _ => Ok(t.clone()),
    };
    let (q, k, v) = (&widen(q)?, &widen(k)?, &widen(v)?);
    let takes = |t: &Tensor| t.dtype() == DType::F32 || (on_tiles && t.dtype() == DType::BF16);
    if super::kernels_enabled() && q.device().is_cpu() && takes(q) && takes(k) && takes(v) {
        let op = AttentionOp {
            heads,
            scale: scale as f32,
            bf16,
            rounded: rounded && on_tiles,
        };
        return q
            .contiguous()?
            .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op);
    }
    reference(q, k, v, heads, scale)
}

/// The plain candle attention (split heads, full score matrix in f32, softmax, merge heads).
pub fn reference(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let (b, n, inner) = q.dims3()?;
    let m = k.dim(1)?;
    let hd = inner / heads;
    let split = |t: &Tensor, len: usize| {
        t.reshape((b, len, heads, hd))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (qh, kh, vh) = (split(q, n)?, split(k, m)?, split(v, m)?);
    let dt = q.dtype();
    let att = (qh
        .to_dtype(DType::F32)?
        .matmul(&kh.to_dtype(DType::F32)?.t()?)?
        * scale)?;
    let att = candle_nn::ops::softmax_last_dim(&att)?.to_dtype(dt)?;
    att.matmul(&vh)?.transpose(1, 2)?.reshape((b, n, inner))
}

/// The tiled attention kernel (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct AttentionOp {
    /// Number of heads the last dimension is split into.
    pub heads: usize,
    /// Factor applied to the scores before the softmax.
    pub scale: f32,
    /// Products in bf16 (f32 accumulation) on AMX tiles or AVX-512 BF16, when the CPU has either; f32 otherwise.
    pub bf16: bool,
    /// With `bf16` on AMX: the result rounded to bf16 (a bf16 tensor), for a consumer that rounds it anyway.
    pub rounded: bool,
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "sketchx-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, n, inner) = l1.shape().dims3()?;
        let (kb, m, kinner) = l2.shape().dims3()?;
        if l3.shape().dims3()? != (kb, m, kinner)
            || kb != b
            || kinner != inner
            || inner % self.heads != 0
        {
            candle_core::bail!(
                "attention: shapes {:?} {:?} {:?}",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        #[cfg(target_arch = "x86_64")]
        if self.bf16 && super::amx::available() {
            let q = Values::of(s1, l1, "attention queries")?;
            let k = Values::of(s2, l2, "attention keys")?;
            let v = Values::of(s3, l3, "attention values")?;
            // SAFETY: AMX is available (checked just above).
            let out = unsafe {
                on_tiles(
                    q,
                    k,
                    v,
                    (b, n, m, inner),
                    self.heads,
                    self.scale,
                    self.rounded,
                )
            };
            return Ok((out, Shape::from((b, n, inner))));
        }
        let q = super::cpu::contiguous_f32(s1, l1, "attention queries")?;
        let k = super::cpu::contiguous_f32(s2, l2, "attention keys")?;
        let v = super::cpu::contiguous_f32(s3, l3, "attention values")?;
        #[cfg(target_arch = "x86_64")]
        if super::gemm::Format::F32.has_fast_kernel() {
            use super::gemm::Format;
            let format = if self.bf16 && Format::Bf16.has_fast_kernel() {
                Format::Bf16
            } else {
                Format::F32
            };
            // SAFETY: the CPU has AVX-512, and AVX-512 BF16 for bf16 (checked just above).
            let out = unsafe { packed(q, k, v, (b, n, m, inner), self.heads, self.scale, format) };
            return Ok((CpuStorage::F32(out), Shape::from((b, n, inner))));
        }
        let heads = self.heads;
        let d = inner / heads;
        let tiles = n.div_ceil(QUERY_TILE);
        let mut out = super::cpu::output_f32(b * n * inner);
        let dst = SendPtr(out.as_mut_ptr());
        let dst = &dst;
        (0..b * heads * tiles).into_par_iter().for_each_init(
            || vec![0f32; QUERY_TILE * m],
            |scores, task| {
                let (bh, t) = (task / tiles, task % tiles);
                let (bi, hi) = (bh / heads, bh % heads);
                let r0 = t * QUERY_TILE;
                let rows = QUERY_TILE.min(n - r0);
                let qp = q[(bi * n + r0) * inner + hi * d..].as_ptr();
                let kp = k[bi * m * inner + hi * d..].as_ptr();
                let vp = v[bi * m * inner + hi * d..].as_ptr();
                let sc = &mut scores[..rows * m];
                // SAFETY: every pointer/stride pair stays inside its buffer: q rows r0..r0+rows, k and v rows
                // 0..m of image bi, columns hi*d..hi*d+d; the output block is written by this task only.
                unsafe {
                    // scores[rows, m] = scale * Q[rows, d] * K^T[d, m]
                    gemm::gemm(
                        rows,
                        m,
                        d,
                        sc.as_mut_ptr(),
                        1,
                        m as isize,
                        false,
                        qp,
                        1,
                        inner as isize,
                        kp,
                        inner as isize,
                        1,
                        0.0,
                        self.scale,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                for row in sc.chunks_exact_mut(m) {
                    softmax_row(row);
                }
                unsafe {
                    let op = dst.0.add((bi * n + r0) * inner + hi * d);
                    // out[rows, d] = P[rows, m] * V[m, d]
                    gemm::gemm(
                        rows,
                        d,
                        m,
                        op,
                        1,
                        inner as isize,
                        false,
                        sc.as_ptr(),
                        1,
                        m as isize,
                        vp,
                        1,
                        inner as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((b, n, inner))))
    }
}

/// Every head's keys as `K^T` (`dk >= d` rows, zero past `d`) and values as `V`, packed in `format` for the
/// crate's GEMM, in parallel: packed first, so that one parallel loop then covers all (image, head, tile) tasks;
/// short key sequences (cross-attention) would otherwise pay a parallel region per head for little work.
#[cfg(target_arch = "x86_64")]
fn pack_heads(
    k: Values,
    v: Values,
    (b, m, inner): (usize, usize, usize),
    heads: usize,
    dk: usize,
    format: super::gemm::Format,
) -> Vec<(super::gemm::PackedB, super::gemm::PackedB)> {
    use super::gemm::PackedB;

    let d = inner / heads;
    (0..b * heads)
        .into_par_iter()
        .map(|bh| {
            let (bi, hi) = (bh / heads, bh % heads);
            let col = |r: usize| (bi * m + r) * inner + hi * d;
            (
                PackedB::from_columns(m, dk, format, |r| k.slice(col(r)..col(r) + d)),
                // (A bf16 value widened to f32 packs back to the same bf16.)
                PackedB::from_rows(m, d, format, |r, row| match v {
                    Values::F32(v) => row.copy_from_slice(&v[col(r)..][..d]),
                    Values::Bf16(v) => {
                        for (o, &h) in row.iter_mut().zip(&v[col(r)..][..d]) {
                            *o = half::bf16::from_bits(h).to_f32();
                        }
                    }
                }),
            )
        })
        .collect()
}

/// Divides output row `r` (`d` values at `out + r * stride`) by `sums[r]`: the softmax's normalisation, applied
/// after the product with the unnormalised probabilities.
///
/// # Safety
/// `out` must point to `sums.len()` rows of `d` values `stride` apart that no one else accesses meanwhile.
#[cfg(target_arch = "x86_64")]
unsafe fn divide_rows(out: *mut f32, stride: usize, d: usize, sums: &[f32]) {
    for (r, sum) in sums.iter().enumerate() {
        let inv = 1.0 / sum;
        // SAFETY: row r < sums.len() of the caller's block.
        unsafe { std::slice::from_raw_parts_mut(out.add(r * stride), d) }
            .iter_mut()
            .for_each(|x| *x *= inv);
    }
}

/// The AVX-512 path: per image and head, the keys are packed once as `K^T` and the values as `V` (the crate's
/// GEMM panels), then each block of [`QUERY_TILE`] queries runs on one thread: `scores = Q_tile K^T`, the
/// unnormalised probabilities `exp(scale (s - max))`, `O_tile = P V` straight into the output columns of the head,
/// each row divided by its sum. Packing once per head instead of once per tile, and the 8 x 48 micro-kernel on
/// the short head dimension (40 to 160 in SD1.5), is what makes it faster than handing each tile to the `gemm`
/// crate.
///
/// In [`Format::Bf16`](super::gemm::Format) (the CPU bf16 mode on AVX-512 BF16 without AMX) `Q`, `K`, the
/// probabilities and `V` are rounded to bf16 for the products, as on [`on_tiles`]; scores, exponentials and sums
/// stay f32.
///
/// # Safety
/// The CPU must have AVX-512 F and BW, and AVX-512 BF16 for [`Format::Bf16`](super::gemm::Format).
#[cfg(target_arch = "x86_64")]
unsafe fn packed(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (b, n, m, inner): (usize, usize, usize, usize),
    heads: usize,
    scale: f32,
    format: super::gemm::Format,
) -> Vec<f32> {
    use super::gemm::{convert_bf16, gemm_bf16_serial, gemm_f32_serial, Format};
    use super::simd::exp_sum_row_bf16;

    let d = inner / heads;
    let bf16 = format == Format::Bf16;
    let tiles = n.div_ceil(QUERY_TILE);
    let packed = pack_heads(
        Values::F32(k),
        Values::F32(v),
        (b, m, inner),
        heads,
        d,
        format,
    );
    // Never zeroed: the tasks' `P V` products overwrite every value (each (image, head, tile) block once) before
    // anything reads it.
    let len = b * n * inner;
    let mut out = super::cpu::output_uninit_f32(len);
    let dst = SendPtr(out.as_mut_ptr());
    let dst = &dst;
    let (ls, lp) = (padded_stride(m, 4), padded_stride(m, 2));
    (0..b * heads * tiles).into_par_iter().for_each_init(
        || {
            let words = |len: usize| vec![0u16; if bf16 { len } else { 0 }];
            (
                vec![0f32; QUERY_TILE * ls],
                words(QUERY_TILE * d),
                words(QUERY_TILE * lp),
            )
        },
        |(scores, qb, pb), task| {
            let (bh, t) = (task / tiles, task % tiles);
            let (bi, hi) = (bh / heads, bh % heads);
            let (keys, values) = &packed[bh];
            let r0 = t * QUERY_TILE;
            let rows = QUERY_TILE.min(n - r0);
            let sc = &mut scores[..rows * ls];
            let q0 = (bi * n + r0) * inner + hi * d;
            let mut sums = [0f32; QUERY_TILE];
            // SAFETY (both products): the CPU has the format's kernel (this function's contract); the query rows
            // start `rows` rows of `d` values, `inner` apart, inside `q` (or `qb` holds them, `d` apart); `sc` is
            // this task's own `rows x m` block, rows `ls` apart (overwritten; `pb` holds them in bf16, `lp` apart); the output block (rows r0..r0 + rows of image bi,
            // columns of head hi) lies inside `out`'s buffer and is written by this task only, by `P V` first.
            let op = unsafe { dst.0.add(q0) };
            if bf16 {
                for r in 0..rows {
                    convert_bf16(&q[q0 + r * inner..][..d], &mut qb[r * d..][..d]);
                }
                unsafe { gemm_bf16_serial(rows, qb.as_ptr(), d, keys, sc.as_mut_ptr(), ls, true) };
                // Unnormalised probabilities, scaled inside the exponential and rounded to bf16 in the same pass;
                // each output row is divided by its sum after the product.
                for ((row, p), sum) in sc
                    .chunks_exact(ls)
                    .zip(pb.chunks_exact_mut(lp))
                    .zip(sums.iter_mut())
                {
                    *sum = exp_sum_row_bf16(&row[..m], &mut p[..m], scale);
                }
                unsafe { gemm_bf16_serial(rows, pb.as_ptr(), lp, values, op, inner, true) };
            } else {
                unsafe {
                    gemm_f32_serial(
                        rows,
                        q[q0..].as_ptr(),
                        inner,
                        keys,
                        sc.as_mut_ptr(),
                        ls,
                        true,
                    )
                };
                for (row, sum) in sc.chunks_exact_mut(ls).zip(sums.iter_mut()) {
                    *sum = exp_sum_row(&mut row[..m], scale);
                }
                unsafe { gemm_f32_serial(rows, sc.as_ptr(), ls, values, op, inner, true) };
            }
            // SAFETY: as above.
            unsafe { divide_rows(op, inner, d, &sums[..rows]) };
        },
    );
    // SAFETY: the tasks covered every (image, head, tile) block, and each wrote its whole block (see above).
    unsafe { out.set_len(len) };
    out
}

/// The CPU bf16 mode on AMX tiles: as [`packed`] in bf16, with both products on [`super::amx`]. The head
/// dimension is zero-padded to whole tile steps (32) in `Q` and `K`, so that `Q K^T` reads whole tiles.
///
/// # Safety
/// [`super::amx::available`] must have returned `true`.
#[cfg(target_arch = "x86_64")]
unsafe fn on_tiles(
    q: Values,
    k: Values,
    v: Values,
    (b, n, m, inner): (usize, usize, usize, usize),
    heads: usize,
    scale: f32,
    rounded: bool,
) -> CpuStorage {
    use super::amx::Init;
    use super::gemm::Format;
    use super::simd::exp_sum_row_bf16;

    let d = inner / heads;
    let dp = d.next_multiple_of(32);
    let tiles = n.div_ceil(QUERY_TILE);
    let packed = pack_heads(k, v, (b, m, inner), heads, dp, Format::Bf16);
    let len = b * n * inner;
    // Never zeroed: the tasks write every value (see the end). One of the two, f32 or rounded.
    let mut out = if rounded {
        Vec::new()
    } else {
        super::cpu::output_uninit_f32(len)
    };
    let mut out16 = Vec::<half::bf16>::with_capacity(if rounded { len } else { 0 });
    let dst = SendPtr(out.as_mut_ptr());
    let dst = &dst;
    let dst16 = SendPtr(out16.as_mut_ptr().cast::<u16>());
    let dst16 = &dst16;
    let (ls, lp) = (padded_stride(m, 4), padded_stride(m, 2));
    // Each task's tiles start on cache lines (the rows are whole lines apart): a tile row that straddles two
    // lines loads and stores at up to half speed.
    let (sl, pl) = (QUERY_TILE * ls, QUERY_TILE * lp);
    QUERIES.with(b * heads * n * dp, |queries| {
        queries_by_head(q, queries, (b, n, inner), heads, dp);
        let queries: &[u16] = queries;
        (0..b * heads * tiles).into_par_iter().for_each_init(
            // Grown (zeroed) to their sizes and pads by `line_aligned` on first use.
            || (Vec::<f32>::new(), Vec::<u16>::new()),
            |(scores, pb), task| {
                let (scores, pb) = (line_aligned(scores, sl), line_aligned(pb, pl));
                let (bh, t) = (task / tiles, task % tiles);
                let (bi, hi) = (bh / heads, bh % heads);
                let (keys, values) = &packed[bh];
                let r0 = t * QUERY_TILE;
                let rows = QUERY_TILE.min(n - r0);
                let qb = &queries[(bh * n + r0) * dp..][..rows * dp];
                let sc = &mut scores[..rows * ls];
                // SAFETY: AMX is available (this function's contract); `qb` holds `rows` rows of `dp` entries, `sc`
                // is this task's own `rows x m` block, rows `ls` apart (overwritten).
                unsafe {
                    super::amx::gemm(
                        rows,
                        qb.as_ptr(),
                        dp,
                        keys,
                        (sc.as_mut_ptr(), ls),
                        false,
                        Init::Zero,
                        None,
                    )
                };
                // Unnormalised probabilities (in (0, 1], as precise in bf16 as the normalised ones), rounded in the
                // same pass; each output row is divided by its sum after the product.
                let mut sums = [0f32; QUERY_TILE];
                for ((row, p), sum) in sc
                    .chunks_exact(ls)
                    .zip(pb.chunks_exact_mut(lp))
                    .zip(sums.iter_mut())
                {
                    *sum = exp_sum_row_bf16(&row[..m], &mut p[..m], scale);
                }
                let at = (bi * n + r0) * inner + hi * d;
                if rounded {
                    // Each tile of `P V` divided by its rows' sums and rounded as it is handed on: the values of
                    // the division below, rounded as `convert_bf16` rounds them.
                    let mut inv = [0f32; QUERY_TILE];
                    for (i, s) in inv.iter_mut().zip(&sums[..rows]) {
                        *i = 1.0 / s;
                    }
                    let inv = &inv;
                    let epilogue =
                        |row: usize, col: usize, tile: &[f32; 256], rs: usize, cs: usize| {
                            // SAFETY: AMX implies AVX-512 F, BW and BF16; the tile's rows (of this task's `rows`)
                            // and columns (of the head's `d`) lie inside `out16` and are this task's alone.
                            unsafe {
                                super::simd::round_tile(
                                    tile,
                                    (rs, cs),
                                    Some(&inv[row..row + rs]),
                                    None,
                                    dst16.0.add(at + row * inner + col),
                                    inner,
                                )
                            }
                        };
                    // SAFETY: AMX is available (this function's contract); `pb` holds `rows x m` probabilities,
                    // `lp` apart.
                    unsafe {
                        super::amx::gemm_handed(
                            rows,
                            (pb.as_ptr(), lp),
                            values,
                            None,
                            super::amx::Handed::Tiles(&epilogue),
                            false,
                        )
                    };
                    return;
                }
                // SAFETY: as above; the output block (rows r0..r0 + rows of image bi, columns of head hi) lies
                // inside `out` and is written by this task only; `pb` holds `rows x m` probabilities, `lp` apart.
                unsafe {
                    let op = dst.0.add(at);
                    super::amx::gemm(
                        rows,
                        pb.as_ptr(),
                        lp,
                        values,
                        (op, inner),
                        false,
                        Init::Zero,
                        None,
                    );
                    divide_rows(op, inner, d, &sums[..rows]);
                }
            },
        );
    });
    // SAFETY: the tasks covered every (image, head, tile) block, and each product wrote its whole block (from
    // zero, every row and column of it) before the division read it, or handed every tile of it on to be divided
    // and rounded into `out16`.
    unsafe {
        if rounded {
            out16.set_len(len);
            CpuStorage::BF16(out16)
        } else {
            out.set_len(len);
            CpuStorage::F32(out)
        }
    }
}

/// The queries of every image and head in bf16 for [`on_tiles`], kept between calls (a fresh buffer of megabytes
/// per call is faulted in or cleared again).
#[cfg(target_arch = "x86_64")]
static QUERIES: super::cpu::Kept<Vec<u16>> = super::cpu::Kept::new(Vec::new());

/// `q` (`(b, n, heads * d)` f32) rounded to bf16 into `out`, head by head: `out[((i * heads + h) * n + r) * dp..]`
/// holds row `r` of image `i`'s head `h`, zero from `d` to `dp`. One pass over `q`'s rows in parallel, so that
/// each (image, head, tile) task reads its queries as one block of whole lines instead of gathering and rounding
/// its head's columns row by row.
#[cfg(target_arch = "x86_64")]
fn queries_by_head(
    q: Values,
    out: &mut [u16],
    (b, n, inner): (usize, usize, usize),
    heads: usize,
    dp: usize,
) {
    use super::gemm::convert_bf16;
    // Rows per task: a few per thread's share, each at most a few hundred kilobytes of `q`.
    const ROWS: usize = 64;
    let d = inner / heads;
    let rows = b * n;
    let dst = SendPtr(out.as_mut_ptr());
    let dst = &dst;
    (0..rows.div_ceil(ROWS)).into_par_iter().for_each(|t| {
        for row in t * ROWS..((t + 1) * ROWS).min(rows) {
            let (bi, r) = (row / n, row % n);
            for h in 0..heads {
                // SAFETY: each (image, head, row) entry block of `dp` lies inside `out` (b * heads * n * dp long)
                // and is written by the task of its row only.
                let block = unsafe {
                    std::slice::from_raw_parts_mut(dst.0.add(((bi * heads + h) * n + r) * dp), dp)
                };
                let from = row * inner + h * d;
                match q {
                    Values::F32(q) => convert_bf16(&q[from..][..d], &mut block[..d]),
                    Values::Bf16(q) => block[..d].copy_from_slice(&q[from..][..d]),
                }
                block[d..].fill(0);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_reference() {
        crate::ops::cpu::detected_only(matches_reference_on_this_path);
    }

    #[test]
    fn portable_path_matches_reference() {
        crate::ops::cpu::force_portable(matches_reference_on_this_path);
    }

    /// The attention with every product operand rounded to bf16 as the bf16 paths compute it: the unnormalised
    /// probabilities rounded, each output row divided by the sum afterwards.
    fn rounded_reference(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Tensor {
        let round = |t: &Tensor| {
            t.to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        let (b, n, inner) = q.dims3().unwrap();
        let m = k.dim(1).unwrap();
        let hd = inner / heads;
        let split = |t: &Tensor, len: usize| {
            round(t)
                .reshape((b, len, heads, hd))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (qh, kh, vh) = (split(q, n), split(k, m), split(v, m));
        let att = (qh.matmul(&kh.t().unwrap()).unwrap() * scale).unwrap();
        let max = att.max_keepdim(3).unwrap();
        let e = att.broadcast_sub(&max).unwrap().exp().unwrap();
        let sum = e.sum_keepdim(3).unwrap();
        round(&e)
            .matmul(&vh)
            .unwrap()
            .broadcast_div(&sum)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, n, inner))
            .unwrap()
    }

    /// Operands already in bf16 (the projections' rounded results) give the attention of their f32 values, bit for
    /// bit, with the bf16 products on or off, mixed with f32 ones too.
    #[test]
    fn bf16_operands_are_their_values() {
        crate::ops::cpu::detected_only(|| {
            let dev = Device::Cpu;
            for (n, m, heads, d) in [(70, 77, 2, 40), (33, 33, 4, 8)] {
                let t = |len: usize| {
                    Tensor::randn(0f32, 1., (2, len, heads * d), &dev)
                        .unwrap()
                        .to_dtype(DType::BF16)
                        .unwrap()
                };
                let (q, k, v) = (t(n), t(m), t(m));
                let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
                let scale = (d as f64).powf(-0.5);
                for bf16 in [true, false] {
                    let want = attention(&f(&q), &f(&k), &f(&v), heads, scale, bf16).unwrap();
                    for (q, k, v) in [
                        (q.clone(), k.clone(), v.clone()),
                        (q.clone(), f(&k), v.clone()),
                    ] {
                        let got = attention(&q, &k, &v, heads, scale, bf16).unwrap();
                        assert_eq!(got.dtype(), DType::F32);
                        assert_eq!(
                            crate::ops::max_abs_diff(&want, &got),
                            0.0,
                            "n {n} m {m} heads {heads} d {d}, bf16 products {bf16}"
                        );
                    }
                }
            }
        });
    }

    /// The rounded attention is the attention rounded to bf16, bit for bit, on AMX (rows and head dimensions that
    /// fill no tile, bf16 operands too); elsewhere the attention itself.
    #[test]
    fn rounded_is_the_attention_rounded() {
        crate::ops::cpu::detected_only(|| {
            let dev = Device::Cpu;
            let on_tiles = crate::ops::amx::available() && super::super::kernels_enabled();
            for (n, m, heads, d) in [
                (100, 100, 4, 8),
                (64, 77, 2, 40),
                (3, 5, 1, 7),
                (257, 300, 2, 40),
            ] {
                let t = |len: usize| Tensor::randn(0f32, 1., (2, len, heads * d), &dev).unwrap();
                let (q, k, v) = (t(n), t(m), t(m));
                let scale = (d as f64).powf(-0.5);
                for (q, k, v) in [
                    (q.clone(), k.clone(), v.clone()),
                    (
                        q.to_dtype(DType::BF16).unwrap(),
                        k.clone(),
                        v.to_dtype(DType::BF16).unwrap(),
                    ),
                ] {
                    let plain = attention(&q, &k, &v, heads, scale, true).unwrap();
                    let got = attention_rounded(&q, &k, &v, heads, scale).unwrap();
                    let want = if on_tiles {
                        assert_eq!(got.dtype(), DType::BF16);
                        plain.to_dtype(DType::BF16).unwrap()
                    } else {
                        plain
                    };
                    let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
                    assert_eq!(
                        crate::ops::max_abs_diff(&f(&want), &f(&got)),
                        0.0,
                        "n {n} m {m} heads {heads} d {d}"
                    );
                }
            }
        });
    }

    fn matches_reference_on_this_path() {
        let dev = Device::Cpu;
        for (n, m, heads, d) in [
            (100, 100, 4, 8),
            (64, 77, 2, 40),
            (3, 5, 1, 7),
            (130, 20, 8, 16),
            (257, 300, 2, 40),
            (70, 77, 3, 80),
            (9, 1, 1, 160),
        ] {
            let q = Tensor::randn(0f32, 1., (2, n, heads * d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1., (2, m, heads * d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1., (2, m, heads * d), &dev).unwrap();
            let scale = (d as f64).powf(-0.5);
            let want = reference(&q, &k, &v, heads, scale).unwrap();
            let got = attention(&q, &k, &v, heads, scale, false).unwrap();
            let diff = crate::ops::max_abs_diff(&want, &got);
            assert!(
                diff < 1e-5,
                "n {n} m {m} heads {heads} d {d}: max diff {diff}"
            );
            // The bf16 products (AMX or AVX-512 BF16): the reference with Q, K, the probabilities and V rounded to
            // bf16 (left: the order of the f32 sums); without either, the f32 path.
            let got = attention(&q, &k, &v, heads, scale, true).unwrap();
            if crate::ops::amx::available() || crate::ops::gemm::Format::Bf16.has_fast_kernel() {
                let want = rounded_reference(&q, &k, &v, heads, scale);
                let diff = crate::ops::max_abs_diff(&want, &got);
                // The scores' f32 sums run in another order, so a probability next to a rounding boundary may
                // round to the neighbouring bf16 value: each output may move by up to one bf16 step (2^-8
                // relative) of its probabilities, i.e. by 2^-8 max |v|; such flips are rare, so the mean stays
                // at the f32 order's level.
                let vmax = crate::ops::max_abs(&v);
                let bound = 1e-3 + vmax / 256.0;
                let mean = (&want - &got)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .mean_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(
                    diff < bound && mean < 1e-4,
                    "bf16: n {n} m {m} heads {heads} d {d}: max diff {diff} (bound {bound}), mean {mean}"
                );
            } else {
                let diff = crate::ops::max_abs_diff(&want, &got);
                assert!(diff < 1e-5, "bf16 off: max diff {diff}");
            }
        }
    }
}
