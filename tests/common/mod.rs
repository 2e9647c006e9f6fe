//! Helpers shared by the integration tests: where the fixtures are, the tiny models, scratch directories.
#![allow(dead_code)] // each test binary uses a subset

use std::path::{Path, PathBuf};

/// The fixtures directory: `$SKETCHX_FIXTURES` if set, else `tests/fixtures` of this repository.
pub fn fixtures() -> PathBuf {
    std::env::var_os("SKETCHX_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures")))
}

/// The tiny SD model directory and the tiny ControlNet directory, as strings for the config constructors.
pub fn tiny_models() -> (String, String) {
    let f = fixtures();
    (
        f.join("tiny-sd").to_string_lossy().into_owned(),
        f.join("tiny-controlnet").to_string_lossy().into_owned(),
    )
}

/// A fresh (removed if present) scratch directory path under the system temp dir, unique per process and name.
pub fn scratch_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sketchx-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Copies a directory tree.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), to).unwrap();
        }
    }
}

/// (mean |diff|, 99.9th percentile |diff|) between two RGB8 images, in 0..255 units (the end-to-end bounds:
/// mean <= 0.25, p99.9 <= 4).
pub fn diff_stats(a: &[u8], b: &[u8]) -> (f64, f64) {
    assert_eq!(a.len(), b.len(), "image sizes differ");
    let mut d: Vec<u8> = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).collect();
    let mean = d.iter().map(|&x| x as f64).sum::<f64>() / d.len() as f64;
    d.sort_unstable();
    let idx = ((d.len() as f64) * 0.999).ceil() as usize - 1;
    (mean, d[idx.min(d.len() - 1)] as f64)
}

/// The request of a reference case (`cases.json` of diffusers' references): prompt, negative prompt, temperature,
/// guidance, image count, steps, seed, size, scheduler and control window; the rest at the defaults, for each test
/// to add its own fields.
pub fn case_request(case: &serde_json::Value) -> sketchx::request::GenerationRequest {
    let s = |k: &str| case[k].as_str().map(str::to_string);
    sketchx::request::GenerationRequest {
        prompt: s("prompt"),
        negative_prompt: s("negative_prompt"),
        temperature: case["temperature"].as_f64().unwrap(),
        guidance_scale: case["guidance_scale"].as_f64().unwrap(),
        num_images: case["num_images"].as_u64().unwrap() as u32,
        steps: case["steps"].as_u64().unwrap() as u32,
        seed: Some(case["seed"].as_u64().unwrap()),
        width: Some(case["width"].as_u64().unwrap() as u32),
        height: Some(case["height"].as_u64().unwrap() as u32),
        scheduler: case["scheduler"].as_str().unwrap().parse().unwrap(),
        control_guidance_start: case["control_guidance_start"].as_f64().unwrap(),
        control_guidance_end: case["control_guidance_end"].as_f64().unwrap(),
        ..Default::default()
    }
}
