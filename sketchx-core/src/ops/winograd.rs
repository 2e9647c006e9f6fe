//! 3x3 stride-1 convolutions in f32 by Winograd's minimal filtering F(4x4, 3x3): 36 multiplications per 4x4 output
//! tile and channel pair instead of 144.
//!
//! Each 6x6 input tile `d` (overlapping by 2) becomes `V = Bᵀ d B`, each 3x3 filter `g` becomes `U = G g Gᵀ`, and
//! for every one of the 36 positions ξ the products over the input channels are one matrix product
//! `M[ξ] (tiles x c_out) = V[ξ] (tiles x c_in) · U[ξ] (c_in x c_out)` on the crate's GEMM; each output tile is
//! `Aᵀ M A`. The filters are transformed at each call (a few ms against the convolution; keeping them would
//! quadruple those layers' weight memory). Work runs in bands of tiles, each on one thread with reused scratch:
//! the band's input is copied channels-last (so the transforms run on 16 channels per vector), transformed,
//! multiplied position by position, transformed back and written to the NCHW output with the bias.
//!
//! The transforms run on AVX-512 vectors of 16 channels (this module exists on x86-64 only; [`applies`] also
//! checks the CPU). The transforms' constants (points 0, ±1, ±2) are Lavin and Gray's ("Fast Algorithms for Convolutional
//! Neural Networks", 2016). In f32 the result differs from the direct sum by rounding only (a few 1e-6 relative:
//! the transforms scale values by at most 8 and the sums are reordered).

use std::arch::x86_64::*;
use std::cell::RefCell;

use rayon::prelude::*;

use super::conv::Geometry;
use super::cpu::SendPtr;
use super::gemm::{Format, PackedB};

/// Output pixels per tile side.
const OUT: usize = 4;
/// Input pixels per tile side.
const TILE: usize = OUT + 2;
/// Positions of a transformed tile.
const XI: usize = TILE * TILE;
/// Channels per vector in the transforms; both channel counts must be multiples of it.
const LANES: usize = 16;
/// Fewest channels (in and out) for which the transforms pay off.
const MIN_CHANNELS: usize = 16;
/// Fewest output pixels (all images together): below, the filter transform (per call) and the re-reading of the
/// transformed filters (4x the weights) cost more than the multiplications saved.
const MIN_PIXELS: usize = 32 * 32;
/// Scratch values per band (transformed input and products), which sets the tiles per band.
const BAND_VALUES: usize = 1 << 21;

/// G, the filter transform (6 x 3).
const G: [[f32; 3]; TILE] = [
    [0.25, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// Whether a convolution of `cin` -> `cout` channels over `b` images of geometry `g` runs here: 3x3, stride 1,
/// padding 1, channels multiples of 16, enough output pixels, AVX-512, and not switched off by
/// `SKETCHX_NO_WINOGRAD=1`.
pub(super) fn applies(b: usize, cin: usize, cout: usize, g: &Geometry) -> bool {
    g.kh == 3
        && g.kw == 3
        && g.s == 1
        && g.p == 1
        && cin.is_multiple_of(LANES)
        && cout.is_multiple_of(LANES)
        && cin.min(cout) >= MIN_CHANNELS
        && b * g.oh * g.ow >= MIN_PIXELS
        && super::winograd_enabled()
        && Format::F32.has_fast_kernel()
}

/// The transformed filters of the last call (the 36 matrices `U[ξ]`), whose buffers the next call reuses:
/// allocating and faulting in tens of MB per call cost as much as the transform. A call running meanwhile
/// allocates its own.
static FILTERS: std::sync::Mutex<Option<Vec<PackedB>>> = std::sync::Mutex::new(None);

/// Fills `u` with the transformed filters `U[ξ]` (`cin x cout` each, packed for the GEMM) of a kernel `w`
/// `[cout, cin, 3, 3]`.
fn transform_filters(w: &[f32], cout: usize, cin: usize, u: &mut Vec<PackedB>) {
    let panels = cout / LANES;
    // U[ξ] straight in the GEMM's panel layout: panel q holds columns 16q.., row ci at (q * cin + ci) * 16.
    u.resize_with(XI, PackedB::empty);
    let ptrs: Vec<SendPtr<u32>> = u
        .iter_mut()
        .map(|m| SendPtr(m.reuse_for_panels(cin, cout, Format::F32).as_mut_ptr()))
        .collect();
    assert!(w.len() == cout * cin * 9 && cin * 9 * LANES < i32::MAX as usize);
    (0..panels).into_par_iter().for_each(|q| {
        let ptrs = &ptrs;
        for ci in 0..cin {
            // SAFETY: AVX-512 is present (`applies`); the gathered values are w[co][ci][..9] for the 16 output
            // channels co of panel q, inside `w` (checked above); each write (q * cin + ci) * 16 + 16 <=
            // panels * cin * 16 words, inside U[ξ], in panel q, this task's own; `u` outlives the loop.
            unsafe {
                filter_tile(
                    w.as_ptr().add((q * LANES * cin + ci) * 9),
                    cin * 9,
                    ptrs,
                    (q * cin + ci) * LANES,
                )
            };
        }
    });
}

/// `U = G g Gᵀ` for 16 filters at once: lane `l` of `g[a][b]` is `src[l * stride + a * 3 + b]`; position ξ of the
/// result goes to `u[ξ] + at` (as f32).
///
/// # Safety
/// AVX-512 F; those 16 x 9 values readable, 16 writable at each destination.
#[target_feature(enable = "avx512f")]
unsafe fn filter_tile(src: *const f32, stride: usize, u: &[SendPtr<u32>], at: usize) {
    let gm = G;
    // SAFETY: the caller's contract.
    unsafe {
        let idx = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(stride as i32),
        );
        let g: [__m512; 9] = std::array::from_fn(|ab| _mm512_i32gather_ps::<4>(idx, src.add(ab)));
        // t[a][j] = Σ_b g[a][b] G[j][b].
        let mut t = [[_mm512_setzero_ps(); TILE]; 3];
        for a in 0..3 {
            for j in 0..TILE {
                let v = _mm512_mul_ps(g[a * 3], _mm512_set1_ps(gm[j][0]));
                let v = _mm512_fmadd_ps(g[a * 3 + 1], _mm512_set1_ps(gm[j][1]), v);
                t[a][j] = _mm512_fmadd_ps(g[a * 3 + 2], _mm512_set1_ps(gm[j][2]), v);
            }
        }
        // u[i][j] = Σ_a G[i][a] t[a][j].
        for i in 0..TILE {
            for j in 0..TILE {
                let v = _mm512_mul_ps(t[0][j], _mm512_set1_ps(gm[i][0]));
                let v = _mm512_fmadd_ps(t[1][j], _mm512_set1_ps(gm[i][1]), v);
                let v = _mm512_fmadd_ps(t[2][j], _mm512_set1_ps(gm[i][2]), v);
                _mm512_storeu_ps(u[i * TILE + j].0.add(at).cast::<f32>(), v);
            }
        }
    }
}

/// One band of tiles: image `b`, tile rows `ty0..ty0 + rows`, tile columns `tx0..tx0 + cols`.
#[derive(Clone, Copy)]
struct Band {
    b: usize,
    ty0: usize,
    rows: usize,
    tx0: usize,
    cols: usize,
}

/// The convolution of `x` `(b, cin, h, w)` with the 3x3 kernel `w` `[cout, cin, 3, 3]` (stride 1, padding 1) plus
/// `bias`, into `out` `(b, cout, h, w)`. The caller has checked [`applies`].
#[allow(clippy::too_many_arguments)]
pub(super) fn conv3x3(
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    out: &mut [f32],
    b: usize,
    cin: usize,
    cout: usize,
    h: usize,
    wd: usize,
) {
    assert!(cin.is_multiple_of(LANES) && cout.is_multiple_of(LANES));
    assert!(x.len() == b * cin * h * wd && out.len() == b * cout * h * wd);
    assert!(w.len() == cout * cin * 9 && bias.len() == cout);
    let mut filters = FILTERS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .unwrap_or_default();
    transform_filters(w, cout, cin, &mut filters);
    let u = &filters;
    let (th, tw) = (h.div_ceil(OUT), wd.div_ceil(OUT));
    // Tiles per band within the scratch budget; bands of whole tile rows when a row fits.
    let per_band = (BAND_VALUES / (XI * (cin + cout))).clamp(8, 512);
    let (mut rows, mut cols) = if tw <= per_band {
        ((per_band / tw).max(1), tw)
    } else {
        (1, per_band)
    };
    // Enough bands to keep every thread busy.
    let want = 3 * rayon::current_num_threads().max(1);
    let count = |rows: usize, cols: usize| b * th.div_ceil(rows) * tw.div_ceil(cols);
    while count(rows, cols) < want && rows > 1 {
        rows = rows.div_ceil(2);
    }
    while count(rows, cols) < want && cols > 8 {
        cols = cols.div_ceil(2);
    }
    let mut bands = Vec::with_capacity(count(rows, cols));
    for bi in 0..b {
        for ty0 in (0..th).step_by(rows) {
            for tx0 in (0..tw).step_by(cols) {
                bands.push(Band {
                    b: bi,
                    ty0,
                    rows: rows.min(th - ty0),
                    tx0,
                    cols: cols.min(tw - tx0),
                });
            }
        }
    }
    let dst = SendPtr(out.as_mut_ptr());
    let geo = Geo {
        cin,
        cout,
        h,
        w: wd,
    };
    bands.par_iter().for_each(|band| {
        let dst = &dst;
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let xb = &x[band.b * cin * h * wd..][..cin * h * wd];
            // SAFETY: each band writes only its own output pixels (its tile rows and columns of image `band.b`),
            // which no other band writes, and `out` outlives the parallel loop.
            unsafe { run_band(&geo, band, xb, u, bias, dst.0, &mut s) };
        })
    });
    let mut slot = FILTERS.lock().unwrap_or_else(|e| e.into_inner());
    if slot.is_none() {
        *slot = Some(filters);
    }
}

/// Channel counts and image size of one convolution.
struct Geo {
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
}

thread_local! {
    /// Each thread's scratch, reused across bands and calls.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// A band's buffers: the input channels-last with its halo (and 16 rows on the way there), the transformed input `V[ξ][tile][cin]`, the products
/// `M[ξ][tile][cout]` and the output tiles `Y[tile][16][cout]`.
#[derive(Default)]
struct Scratch {
    input: Vec<f32>,
    rows: Vec<f32>,
    v: Vec<f32>,
    m: Vec<f32>,
    y: Vec<f32>,
}

/// Resizes `v` to `n` values (contents unspecified).
fn sized(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// Runs one band: stage, transform, multiply, transform back, write.
///
/// # Safety
/// `out` must point to the whole `(b, cout, h, w)` output, of which this call writes only the band's pixels, and
/// no one else may access those meanwhile. The CPU must have AVX-512 (checked by [`applies`]).
unsafe fn run_band(
    g: &Geo,
    band: &Band,
    x: &[f32],
    u: &[PackedB],
    bias: &[f32],
    out: *mut f32,
    s: &mut Scratch,
) {
    let Geo { cin, cout, .. } = *g;
    let tiles = band.rows * band.cols;
    let (sh, sw) = (band.rows * OUT + 2, band.cols * OUT + 2);
    let input = sized(&mut s.input, sh * sw * cin);
    // SAFETY: AVX-512 is present (the caller's contract).
    unsafe { stage(x, input, &mut s.rows, g, band) };
    let v = sized(&mut s.v, XI * tiles * cin);
    // SAFETY: AVX-512 is present (the caller's contract); the sizes are the ones just made.
    unsafe { input_transform(input, sw, cin, band, v) };
    let m = sized(&mut s.m, XI * tiles * cout);
    for (xi, uxi) in u.iter().enumerate() {
        // SAFETY: AVX-512 is present (the caller's contract); V[ξ] holds `tiles` rows of `cin` values and M[ξ]
        // `tiles` rows of `cout`, both this thread's own scratch.
        unsafe {
            super::gemm::gemm_f32_serial(
                tiles,
                v[xi * tiles * cin..].as_ptr(),
                cin,
                uxi,
                m[xi * tiles * cout..].as_mut_ptr(),
                cout,
                true,
            )
        };
    }
    let y = sized(&mut s.y, tiles * OUT * OUT * cout);
    // SAFETY: as above.
    unsafe { output_transform(m, tiles, cout, y) };
    // SAFETY: the caller's contract.
    unsafe { write_out(y, &mut s.rows, bias, out, g, band) };
}

/// Copies the band's input with a one-pixel halo (zeros outside the image) into `dst`, channels last:
/// `dst[(yy * sw + xx) * cin + c]` is input pixel `(4 ty0 - 1 + yy, 4 tx0 - 1 + xx)` of channel `c` (`rows` is
/// scratch).
///
/// # Safety
/// AVX-512 F.
#[target_feature(enable = "avx512f")]
unsafe fn stage(x: &[f32], dst: &mut [f32], rows: &mut Vec<f32>, g: &Geo, band: &Band) {
    let Geo { cin, h, w, .. } = *g;
    let (sh, sw) = (band.rows * OUT + 2, band.cols * OUT + 2);
    assert!(x.len() >= cin * h * w && dst.len() >= sh * sw * cin);
    let rows = sized(rows, LANES * sw);
    let y0 = (band.ty0 * OUT) as isize - 1;
    let x0 = (band.tx0 * OUT) as isize - 1;
    // Staged columns that lie inside the image.
    let xx_lo = (-x0).max(0) as usize;
    let xx_hi = ((w as isize - x0).min(sw as isize)).max(xx_lo as isize) as usize;
    for yy in 0..sh {
        let row = &mut dst[yy * sw * cin..][..sw * cin];
        let iy = y0 + yy as isize;
        if iy < 0 || iy >= h as isize {
            row.fill(0.0);
            continue;
        }
        row[..xx_lo * cin].fill(0.0);
        row[xx_hi * cin..].fill(0.0);
        let iy = iy as usize;
        for c0 in (0..cin).step_by(LANES) {
            // The 16 channels' rows are first copied one after the other into `rows` (read in place, 16 rows
            // whose distance is a power of two share cache sets and evict each other).
            let n = xx_hi - xx_lo;
            let ix0 = (x0 + xx_lo as isize) as usize;
            for l in 0..LANES {
                rows[l * n..][..n].copy_from_slice(&x[((c0 + l) * h + iy) * w + ix0..][..n]);
            }
            let mut i = 0;
            // 16 pixels x 16 channels at a time, transposed in registers.
            while i + LANES <= n {
                // SAFETY: rows l * n + i..+16 <= 16 n lie in `rows`; staged pixels xx_lo + i..+16 <= sw of row yy
                // and channels c0..c0 + 16 <= cin lie in `row`.
                unsafe {
                    let mut r: [__m512; LANES] =
                        std::array::from_fn(|l| _mm512_loadu_ps(rows.as_ptr().add(l * n + i)));
                    transpose16(&mut r);
                    for (j, v) in r.iter().enumerate() {
                        _mm512_storeu_ps(row.as_mut_ptr().add((xx_lo + i + j) * cin + c0), *v);
                    }
                }
                i += LANES;
            }
            for i in i..n {
                for l in 0..LANES {
                    row[(xx_lo + i) * cin + c0 + l] = rows[l * n + i];
                }
            }
        }
    }
}

/// Transposes 16 vectors of 16 values in place: afterwards lane `i` of vector `j` is what lane `j` of vector `i`
/// was.
#[inline(always)]
unsafe fn transpose16(r: &mut [__m512; LANES]) {
    // SAFETY: called from AVX-512 functions only.
    unsafe {
        // Pairs of rows interleaved, then groups of four: s[4i + c], 128-bit lane k = column 4k + c of rows
        // 4i..4i + 4.
        let mut s = [_mm512_setzero_ps(); LANES];
        for i in 0..4 {
            let t0 = _mm512_unpacklo_ps(r[4 * i], r[4 * i + 1]);
            let t1 = _mm512_unpackhi_ps(r[4 * i], r[4 * i + 1]);
            let t2 = _mm512_unpacklo_ps(r[4 * i + 2], r[4 * i + 3]);
            let t3 = _mm512_unpackhi_ps(r[4 * i + 2], r[4 * i + 3]);
            s[4 * i] = _mm512_shuffle_ps::<0x44>(t0, t2);
            s[4 * i + 1] = _mm512_shuffle_ps::<0xEE>(t0, t2);
            s[4 * i + 2] = _mm512_shuffle_ps::<0x44>(t1, t3);
            s[4 * i + 3] = _mm512_shuffle_ps::<0xEE>(t1, t3);
        }
        // Then a 4 x 4 transpose of 128-bit lanes for each c.
        for c in 0..4 {
            let u0 = _mm512_shuffle_f32x4::<0x88>(s[c], s[4 + c]);
            let u1 = _mm512_shuffle_f32x4::<0xDD>(s[c], s[4 + c]);
            let u2 = _mm512_shuffle_f32x4::<0x88>(s[8 + c], s[12 + c]);
            let u3 = _mm512_shuffle_f32x4::<0xDD>(s[8 + c], s[12 + c]);
            r[c] = _mm512_shuffle_f32x4::<0x88>(u0, u2);
            r[4 + c] = _mm512_shuffle_f32x4::<0x88>(u1, u3);
            r[8 + c] = _mm512_shuffle_f32x4::<0xDD>(u0, u2);
            r[12 + c] = _mm512_shuffle_f32x4::<0xDD>(u1, u3);
        }
    }
}

/// `Bᵀ d` for a column of six vectors.
#[inline(always)]
unsafe fn bt(d: [__m512; TILE]) -> [__m512; TILE] {
    // SAFETY: called from AVX-512 functions only.
    unsafe {
        let (four, five, two) = (
            _mm512_set1_ps(4.0),
            _mm512_set1_ps(5.0),
            _mm512_set1_ps(2.0),
        );
        let [d0, d1, d2, d3, d4, d5] = d;
        [
            _mm512_fmadd_ps(four, d0, _mm512_fnmadd_ps(five, d2, d4)),
            _mm512_fnmadd_ps(four, _mm512_add_ps(d1, d2), _mm512_add_ps(d3, d4)),
            _mm512_fmadd_ps(four, _mm512_sub_ps(d1, d2), _mm512_sub_ps(d4, d3)),
            _mm512_fmadd_ps(two, _mm512_sub_ps(d3, d1), _mm512_sub_ps(d4, d2)),
            _mm512_fmadd_ps(two, _mm512_sub_ps(d1, d3), _mm512_sub_ps(d4, d2)),
            _mm512_fmadd_ps(four, d1, _mm512_fnmadd_ps(five, d3, d5)),
        ]
    }
}

/// `Aᵀ m` for a column of six vectors.
#[inline(always)]
unsafe fn at(m: [__m512; TILE]) -> [__m512; OUT] {
    // SAFETY: called from AVX-512 functions only.
    unsafe {
        let [m0, m1, m2, m3, m4, m5] = m;
        let (a, b) = (_mm512_add_ps(m1, m2), _mm512_sub_ps(m1, m2));
        let (c, d) = (_mm512_add_ps(m3, m4), _mm512_sub_ps(m3, m4));
        [
            _mm512_add_ps(_mm512_add_ps(m0, a), c),
            _mm512_fmadd_ps(_mm512_set1_ps(2.0), d, b),
            _mm512_fmadd_ps(_mm512_set1_ps(4.0), c, a),
            _mm512_add_ps(_mm512_fmadd_ps(_mm512_set1_ps(8.0), d, b), m5),
        ]
    }
}

/// `V[ξ][t][c] = (Bᵀ d B)[ξ]` for every tile `t` of the band and channel `c`, from the staged input.
///
/// # Safety
/// AVX-512 F; `input` is the band's staged input (`(4 rows + 2) x sw x cin`), `v` holds `36 x tiles x cin`.
#[target_feature(enable = "avx512f")]
#[allow(clippy::needless_range_loop)] // index pairs of a 6 x 6 tile read clearer than zipped iterators
unsafe fn input_transform(input: &[f32], sw: usize, cin: usize, band: &Band, v: &mut [f32]) {
    let tiles = band.rows * band.cols;
    assert!(input.len() >= (band.rows * OUT + 2) * sw * cin && v.len() >= XI * tiles * cin);
    let (src, dst) = (input.as_ptr(), v.as_mut_ptr());
    for tr in 0..band.rows {
        for tc in 0..band.cols {
            let t = tr * band.cols + tc;
            let base = (tr * OUT * sw + tc * OUT) * cin;
            for c0 in (0..cin).step_by(LANES) {
                // SAFETY: pixel (4 tr + a, 4 tc + b), a, b < 6, of the staged input and channels c0..c0 + 16 <= cin
                // are inside `input`; tile t < tiles and channels c0.. of each V[ξ] inside `v` (checked above).
                unsafe {
                    let px = |a: usize, b: usize| src.add(base + (a * sw + b) * cin + c0);
                    // Columns first: tmp[i][b] = (Bᵀ d)[i][b].
                    let mut tmp = [[_mm512_setzero_ps(); TILE]; TILE];
                    for b in 0..TILE {
                        let col = bt(std::array::from_fn(|a| _mm512_loadu_ps(px(a, b))));
                        for i in 0..TILE {
                            tmp[i][b] = col[i];
                        }
                    }
                    for (i, row) in tmp.iter().enumerate() {
                        for (j, val) in bt(*row).iter().enumerate() {
                            _mm512_storeu_ps(
                                dst.add(((i * TILE + j) * tiles + t) * cin + c0),
                                *val,
                            );
                        }
                    }
                }
            }
        }
    }
}

/// `Y[t][r * 4 + c][co] = (Aᵀ M A)[r][c]` for every tile `t` and output channel `co`.
///
/// # Safety
/// AVX-512 F.
#[target_feature(enable = "avx512f")]
#[allow(clippy::needless_range_loop)] // as in `input_transform`
unsafe fn output_transform(m: &[f32], tiles: usize, cout: usize, y: &mut [f32]) {
    assert!(m.len() >= XI * tiles * cout && y.len() >= tiles * OUT * OUT * cout);
    let (src, dst) = (m.as_ptr(), y.as_mut_ptr());
    for t in 0..tiles {
        for c0 in (0..cout).step_by(LANES) {
            // SAFETY: tile t < tiles and channels c0..c0 + 16 <= cout of each M[ξ] and of Y (checked above).
            unsafe {
                let px = |i: usize, j: usize| src.add(((i * TILE + j) * tiles + t) * cout + c0);
                // Columns first: tmp[r][j] = (Aᵀ M)[r][j].
                let mut tmp = [[_mm512_setzero_ps(); TILE]; OUT];
                for j in 0..TILE {
                    let col = at(std::array::from_fn(|i| _mm512_loadu_ps(px(i, j))));
                    for r in 0..OUT {
                        tmp[r][j] = col[r];
                    }
                }
                for (r, row) in tmp.iter().enumerate() {
                    for (c, val) in at(*row).iter().enumerate() {
                        _mm512_storeu_ps(dst.add((t * OUT * OUT + r * OUT + c) * cout + c0), *val);
                    }
                }
            }
        }
    }
}

/// Writes the band's output tiles `y` plus the bias into the NCHW output, cutting tiles at the image's edges
/// (`rows` is scratch).
///
/// # Safety
/// As [`run_band`]'s.
#[target_feature(enable = "avx512f")]
unsafe fn write_out(
    y: &[f32],
    rows: &mut Vec<f32>,
    bias: &[f32],
    out: *mut f32,
    g: &Geo,
    band: &Band,
) {
    let Geo { cout, h, w, .. } = *g;
    assert!(y.len() >= band.rows * band.cols * OUT * OUT * cout && bias.len() >= cout);
    let plane = h * w;
    let image = band.b * cout * plane;
    let x_lo = band.tx0 * OUT;
    let x_hi = ((band.tx0 + band.cols) * OUT).min(w);
    let n = x_hi - x_lo;
    let rows = sized(rows, LANES * n);
    // Where output column x_lo + i of output row r of tile row tr is in `y`, for channel 0.
    let at = |tr: usize, r: usize, i: usize| {
        let (tc, c) = (i / OUT, i % OUT);
        ((tr * band.cols + tc) * OUT * OUT + r * OUT + c) * cout
    };
    for tr in 0..band.rows {
        for r in 0..OUT {
            let oy = (band.ty0 + tr) * OUT + r;
            if oy >= h {
                break;
            }
            for c0 in (0..cout).step_by(LANES) {
                // Transposed into `rows` first, then each channel's row copied out whole (stores 16 output planes
                // apart would share cache sets, as in `stage`).
                let mut i = 0;
                while i + LANES <= n {
                    // SAFETY: the `y` reads are channels c0..c0 + 16 <= cout of this band's tiles (checked above);
                    // rows l * n + i..+16 <= 16 n lie in `rows`.
                    unsafe {
                        let mut v: [__m512; LANES] = std::array::from_fn(|j| {
                            _mm512_loadu_ps(y.as_ptr().add(at(tr, r, i + j) + c0))
                        });
                        transpose16(&mut v);
                        for (l, row) in v.iter().enumerate() {
                            _mm512_storeu_ps(rows.as_mut_ptr().add(l * n + i), *row);
                        }
                    }
                    i += LANES;
                }
                for i in i..n {
                    for l in 0..LANES {
                        rows[l * n + i] = y[at(tr, r, i) + c0 + l];
                    }
                }
                for l in 0..LANES {
                    let co = c0 + l;
                    // SAFETY: channel co < cout, row oy < h, columns x_lo..x_hi <= w of image band.b: inside the
                    // output and this band's own pixels (the caller's contract).
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            out.add(image + co * plane + oy * w + x_lo),
                            n,
                        )
                    };
                    let bv = bias[co];
                    for (d, &v) in dst.iter_mut().zip(&rows[l * n..][..n]) {
                        *d = v + bv;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The direct sum in f64.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        x: &[f32],
        w: &[f32],
        bias: &[f32],
        b: usize,
        cin: usize,
        cout: usize,
        h: usize,
        wd: usize,
    ) -> Vec<f64> {
        let mut out = vec![0f64; b * cout * h * wd];
        for bi in 0..b {
            for co in 0..cout {
                for oy in 0..h {
                    for ox in 0..wd {
                        let mut acc = bias[co] as f64;
                        for ci in 0..cin {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (iy, ix) = (oy + ky, ox + kx);
                                    if iy < 1 || ix < 1 || iy > h || ix > wd {
                                        continue;
                                    }
                                    acc += x[((bi * cin + ci) * h + iy - 1) * wd + ix - 1] as f64
                                        * w[((co * cin + ci) * 3 + ky) * 3 + kx] as f64;
                                }
                            }
                        }
                        out[((bi * cout + co) * h + oy) * wd + ox] = acc;
                    }
                }
            }
        }
        out
    }

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_the_direct_sum_on_edges_and_bands() {
        if !Format::F32.has_fast_kernel() {
            eprintln!("skipped: no AVX-512 on this CPU (the path is never taken then)");
            return;
        }
        // Sizes not multiples of 4 (cut tiles), a single tile row, several images, more output than input
        // channels; every shape is split into several bands (3 per thread at least).
        for (b, cin, cout, h, w) in [
            (1, 32, 48, 9, 11),
            (2, 48, 32, 13, 6),
            (1, 32, 32, 3, 30),
            (3, 16, 64, 17, 17),
        ] {
            let x = values(b * cin * h * w, 1);
            let wt: Vec<f32> = values(cout * cin * 9, 2).iter().map(|v| v * 0.2).collect();
            let bias = values(cout, 3);
            let mut out = vec![f32::NAN; b * cout * h * w];
            conv3x3(&x, &wt, &bias, &mut out, b, cin, cout, h, w);
            let want = reference(&x, &wt, &bias, b, cin, cout, h, w);
            let scale = want.iter().fold(0f64, |a, v| a.max(v.abs()));
            let err = out
                .iter()
                .zip(&want)
                .fold(0f64, |a, (&o, &r)| a.max((o as f64 - r).abs()));
            assert!(
                err <= 2e-5 * scale.max(1.0),
                "{b}x{cin}->{cout} {h}x{w}: max error {err} (scale {scale})"
            );
        }
    }

    #[test]
    fn transposes_16_by_16() {
        if !Format::F32.has_fast_kernel() {
            return;
        }
        let a: Vec<f32> = (0..256).map(|v| v as f32).collect();
        let mut got = [0f32; 256];
        // SAFETY: AVX-512 is present (checked); the loads and stores stay inside the 256-value arrays.
        unsafe { transpose_test(&a, &mut got) };
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(got[j * 16 + i], a[i * 16 + j], "({i}, {j})");
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn transpose_test(a: &[f32], out: &mut [f32; 256]) {
        // SAFETY: the caller's.
        unsafe {
            let mut r: [__m512; LANES] =
                std::array::from_fn(|i| _mm512_loadu_ps(a.as_ptr().add(i * 16)));
            transpose16(&mut r);
            for (j, v) in r.iter().enumerate() {
                _mm512_storeu_ps(out.as_mut_ptr().add(j * 16), *v);
            }
        }
    }

    #[test]
    fn applies_only_where_it_gains() {
        let on = Format::F32.has_fast_kernel();
        let geo = |k: usize, s: usize, p: usize, h: usize, w: usize| {
            Geometry::new(h, w, k, k, s, p).unwrap()
        };
        assert_eq!(applies(1, 128, 128, &geo(3, 1, 1, 64, 64)), on);
        assert_eq!(applies(2, 16, 16, &geo(3, 1, 1, 48, 24)), on);
        assert!(!applies(1, 128, 128, &geo(3, 2, 1, 128, 128)), "stride 2");
        assert!(!applies(1, 128, 128, &geo(1, 1, 0, 64, 64)), "1x1");
        assert!(
            !applies(1, 4, 128, &geo(3, 1, 1, 64, 64)),
            "4 input channels"
        );
        assert!(
            !applies(1, 128, 120, &geo(3, 1, 1, 64, 64)),
            "not a multiple of 16"
        );
        assert_eq!(applies(2, 640, 640, &geo(3, 1, 1, 32, 32)), on);
        assert!(!applies(2, 1280, 1280, &geo(3, 1, 1, 16, 16)), "2 x 16x16");
    }
}
