//! PNG encoder measurement: size and encode time of `sketchx::output::encode_png` under candidate settings.
//!
//! `cargo bench --bench png` times the example sketches (`examples/sketches/*.png`) and a generated photo-like
//! 512x512 image; `cargo bench --bench png -- a.png b.png` times the given images instead (this is what
//! `tools/png_compare.py` does, to compare with PIL on the same pixels). Each setting is timed
//! `SKETCHX_BENCH_RUNS` times (default 9) and the median is reported. Output lines are tab-separated:
//! `png <image> <setting> <bytes> <median ms>`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use sketchx::output::{encode_png, PngCompression, PngFilter, PngSettings};
use sketchx::sketch::Sketch;

/// The candidates, named for the report; the first is the library default.
fn candidates() -> Vec<(&'static str, PngSettings)> {
    let s = |compression, filter| PngSettings {
        compression,
        filter,
    };
    vec![
        ("default", PngSettings::default()),
        ("fast+none", s(PngCompression::Fast, PngFilter::NoFilter)),
        ("fast+sub", s(PngCompression::Fast, PngFilter::Sub)),
        ("fast+up", s(PngCompression::Fast, PngFilter::Up)),
        ("fast+paeth", s(PngCompression::Fast, PngFilter::Paeth)),
        (
            "fast+adaptive",
            s(PngCompression::Fast, PngFilter::Adaptive),
        ),
        (
            "level1+adaptive",
            s(PngCompression::Level(1), PngFilter::Adaptive),
        ),
        ("level1+up", s(PngCompression::Level(1), PngFilter::Up)),
        (
            "level3+adaptive",
            s(PngCompression::Level(3), PngFilter::Adaptive),
        ),
        (
            "level6+adaptive",
            s(PngCompression::Level(6), PngFilter::Adaptive),
        ),
        (
            "level9+adaptive",
            s(PngCompression::Level(9), PngFilter::Adaptive),
        ),
        (
            "uncompressed",
            s(PngCompression::Uncompressed, PngFilter::NoFilter),
        ),
    ]
}

/// A deterministic photo-like image: smooth multi-octave value noise plus fine grain (SD outputs are
/// photo-like, not flat like sketches).
fn photo_like(w: u32, h: u32) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    let mut img = vec![0f32; (w * h * 3) as usize];
    for (cell, amp) in [(128u32, 90.0f32), (32, 45.0), (8, 20.0), (2, 8.0)] {
        let (gw, gh) = (w / cell + 2, h / cell + 2);
        let grid: Vec<f32> = (0..gw * gh * 3).map(|_| rand() - 0.5).collect();
        for y in 0..h {
            for x in 0..w {
                let (fx, fy) = (x as f32 / cell as f32, y as f32 / cell as f32);
                let (x0, y0) = (fx as u32, fy as u32);
                let (tx, ty) = (fx - x0 as f32, fy - y0 as f32);
                let (sx, sy) = (tx * tx * (3.0 - 2.0 * tx), ty * ty * (3.0 - 2.0 * ty));
                for c in 0..3 {
                    let g = |gx: u32, gy: u32| grid[((gy * gw + gx) * 3 + c) as usize];
                    let top = g(x0, y0) * (1.0 - sx) + g(x0 + 1, y0) * sx;
                    let bottom = g(x0, y0 + 1) * (1.0 - sx) + g(x0 + 1, y0 + 1) * sx;
                    img[((y * w + x) * 3 + c) as usize] += amp * (top * (1.0 - sy) + bottom * sy);
                }
            }
        }
    }
    img.iter()
        .map(|&v| (128.0 + v + 6.0 * (rand() - 0.5)).clamp(0.0, 255.0) as u8)
        .collect()
}

fn median_ms(mut f: impl FnMut(), runs: usize) -> f64 {
    f(); // warm-up
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    let runs: usize = std::env::var("SKETCHX_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(9)
        .max(1);
    let files: Vec<PathBuf> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .map(PathBuf::from)
        .collect();
    let mut images: Vec<(String, u32, u32, Vec<u8>)> = Vec::new();
    let mut load = |path: &Path| {
        let s = Sketch::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        images.push((name, s.width(), s.height(), s.rgb().to_vec()));
    };
    if files.is_empty() {
        let dir = std::env::var_os("SKETCHX_EXAMPLES")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/sketches"))
            });
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        paths.retain(|p| p.extension().is_some_and(|e| e == "png"));
        paths.sort();
        paths.iter().for_each(|p| load(p));
        images.push(("photo-like-512".into(), 512, 512, photo_like(512, 512)));
    } else {
        files.iter().for_each(|p| load(p));
    }

    println!("# runs={runs}; columns: png, image, setting, bytes, median encode ms");
    for (name, w, h, rgb) in &images {
        for (label, settings) in candidates() {
            let bytes = encode_png(*w, *h, rgb, &settings).unwrap().len();
            let ms = median_ms(
                || {
                    std::hint::black_box(encode_png(*w, *h, rgb, &settings).unwrap());
                },
                runs,
            );
            println!("png\t{name}\t{label}\t{bytes}\t{ms:.3}");
        }
    }
}
