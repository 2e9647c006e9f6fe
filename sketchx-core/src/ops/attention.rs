//! Multi-head attention on the CPU without the full score matrix and without head-split copies.
//!
//! For each (image, head, block of [`QUERY_TILE`] queries), in parallel: scores = Q_tile K^T (one GEMM reading
//! the heads in place through strides), a row softmax as torch computes it (max, exp, sum, divide), then
//! O_tile = P V written straight into the `(b, n, heads * head_dim)` output. Memory is one `tile x keys` block
//! per thread instead of `heads x n x keys` (256 MiB per attention at 512x512 in f32).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::SendPtr;
use super::simd::softmax_row;

/// Queries per task: a `QUERY_TILE x keys` score block (1 MiB at 4096 keys) stays in the L2 cache.
pub const QUERY_TILE: usize = 64;

/// `softmax(q k^T * scale) v` per head for `q` `(b, n, heads * d)`, `k` and `v` `(b, m, heads * d)`.
/// f32 CPU tensors use [`AttentionOp`]; anything else the plain candle formulation. Timed as `attention`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    super::profile::scope("attention", || attention_untimed(q, k, v, heads, scale))
}

fn attention_untimed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    if super::kernels_enabled() && q.device().is_cpu() && q.dtype() == DType::F32 {
        let op = AttentionOp {
            heads,
            scale: scale as f32,
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
        let q = super::cpu::contiguous_f32(s1, l1, "attention queries")?;
        let k = super::cpu::contiguous_f32(s2, l2, "attention keys")?;
        let v = super::cpu::contiguous_f32(s3, l3, "attention values")?;
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
        if super::gemm::Format::F32.has_fast_kernel() {
            // SAFETY: the CPU has AVX-512 (checked just above).
            let out = unsafe { packed(q, k, v, (b, n, m, inner), self.heads, self.scale) };
            return Ok((CpuStorage::F32(out), Shape::from((b, n, inner))));
        }
        let heads = self.heads;
        let d = inner / heads;
        let tiles = n.div_ceil(QUERY_TILE);
        let mut out = vec![0f32; b * n * inner];
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

/// The AVX-512 path: per image and head, the keys are packed once as `K^T` and the values as `V` (the crate's
/// GEMM panels), then each block of [`QUERY_TILE`] queries runs on one thread: `scores = Q_tile K^T`, scaled,
/// the row softmax, `O_tile += P V` straight into the output columns of the head. Packing once per head instead of
/// once per tile, and the 8 x 48 micro-kernel on the short head dimension (40 to 160 in SD1.5), is what makes it
/// faster than handing each tile to the `gemm` crate.
///
/// # Safety
/// The CPU must have AVX-512 F and BW.
#[cfg(target_arch = "x86_64")]
unsafe fn packed(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (b, n, m, inner): (usize, usize, usize, usize),
    heads: usize,
    scale: f32,
) -> Vec<f32> {
    use super::gemm::{gemm_f32_serial, Format, PackedB};

    let d = inner / heads;
    let tiles = n.div_ceil(QUERY_TILE);
    // Every head's keys and values packed first (in parallel), so that one parallel loop then covers all
    // (image, head, tile) tasks: short key sequences (cross-attention) would otherwise pay a parallel region
    // per head for little work.
    let packed: Vec<(PackedB, PackedB)> = (0..b * heads)
        .into_par_iter()
        .map(|bh| {
            let (bi, hi) = (bh / heads, bh % heads);
            let col = |r: usize| (bi * m + r) * inner + hi * d;
            let mut kh = vec![0f32; m * d];
            for (r, row) in kh.chunks_exact_mut(d).enumerate() {
                row.copy_from_slice(&k[col(r)..][..d]);
            }
            (
                PackedB::from_transposed(&kh, m, d, Format::F32),
                PackedB::from_rows(m, d, Format::F32, |r, row| {
                    row.copy_from_slice(&v[col(r)..][..d])
                }),
            )
        })
        .collect();
    let mut out = vec![0f32; b * n * inner];
    let dst = SendPtr(out.as_mut_ptr());
    let dst = &dst;
    (0..b * heads * tiles).into_par_iter().for_each_init(
        || vec![0f32; QUERY_TILE * m],
        |scores, task| {
            let (bh, t) = (task / tiles, task % tiles);
            let (bi, hi) = (bh / heads, bh % heads);
            let (keys, values) = &packed[bh];
            let r0 = t * QUERY_TILE;
            let rows = QUERY_TILE.min(n - r0);
            let sc = &mut scores[..rows * m];
            sc.fill(0.0);
            let qp = q[(bi * n + r0) * inner + hi * d..].as_ptr();
            // SAFETY: the CPU has AVX-512 (this function's contract); `qp` starts `rows` query rows of `d`
            // values, `inner` apart, inside `q`; `sc` is this task's own `rows x m` block.
            unsafe { gemm_f32_serial(rows, qp, inner, keys, sc.as_mut_ptr(), m) };
            for row in sc.chunks_exact_mut(m) {
                row.iter_mut().for_each(|x| *x *= scale);
                softmax_row(row);
            }
            // SAFETY: as above; the output block (rows r0..r0 + rows of image bi, columns of head hi) lies
            // inside `out` and is written by this task only; `sc` holds `rows x m` probabilities.
            unsafe {
                let op = dst.0.add((bi * n + r0) * inner + hi * d);
                gemm_f32_serial(rows, sc.as_ptr(), m, values, op, inner);
            }
        },
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_reference() {
        matches_reference_on_this_path();
    }

    #[test]
    fn portable_path_matches_reference() {
        crate::ops::cpu::force_portable(matches_reference_on_this_path);
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
            let got = attention(&q, &k, &v, heads, scale).unwrap();
            let diff = crate::ops::max_abs_diff(&want, &got);
            assert!(
                diff < 1e-5,
                "n {n} m {m} heads {heads} d {d}: max diff {diff}"
            );
        }
    }
}
