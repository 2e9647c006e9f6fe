//! Limits that hold against hostile input, measured with a counting global allocator
//! (`fuzz/src/alloc.rs`): a safetensors header that claims more than its file holds (a header length past the
//! end, tensors past the data, huge or uncountable shapes, names listed twice) is an error before anything of the
//! claimed size is allocated; reading a file allocates a bounded multiple of its size (its header, however dense,
//! at most 8 times its length), and building a network from it its declared size; a decompression bomb is refused before its pixels are allocated; a scheduler config cannot
//! make the schedule arbitrarily long; prompts are limited to `MAX_PROMPT_BYTES`. (The queue limit is tested in
//! every binding: tests/pipeline.rs, tests/server.rs, the C and Python tests; the REST upload limits in
//! tests/server.rs and sketchx-py/tests/test_server.py.)

mod common;
use common::*;

#[path = "../fuzz/src/alloc.rs"]
mod alloc;

use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device};
use sketchx::models::config::ConfigFile;
use sketchx::models::loader;
use sketchx::models::unet::UNet;
use sketchx::models::weights::SafetensorsFile;
use sketchx::precision::Precision;
use sketchx::request::{GenerationRequest, MAX_PROMPT_BYTES};
use sketchx::sketch::Sketch;
use sketchx::Error;

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

/// Every test measures; one at a time, so that no other test's allocations count.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn measured<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let (r, peak) = alloc::peak_during(f);
    (r, peak.expect("the counting allocator is installed"))
}

/// A safetensors file: the 8-byte header length `n`, then `header`, then `data`.
fn file_bytes(n: u64, header: &str, data: &[u8]) -> Vec<u8> {
    let mut b = n.to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    b
}

fn open_malformed(dir: &Path, name: &str, bytes: &[u8]) -> (String, usize) {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    let (r, peak) = measured(|| SafetensorsFile::open(&path));
    match r {
        Err(Error::MalformedFile { path: p, message }) => {
            assert_eq!(p, path.display().to_string());
            (message, peak)
        }
        other => panic!("{name}: {other:?}"),
    }
}

#[test]
fn headers_that_claim_more_than_the_file_are_refused_before_allocating_it() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch_dir("limits-headers");
    std::fs::create_dir_all(&dir).unwrap();
    let small = |header: &str, data: &[u8]| file_bytes(header.len() as u64, header, data);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        // A header length far beyond the file (and beyond the safetensors crate's 100 MB header limit).
        (
            "header_len_2^40",
            file_bytes(1 << 40, "{}", &[]),
            "impossible",
        ),
        (
            "header_len_past_end",
            file_bytes(4096, "{}", &[0; 100]),
            "impossible",
        ),
        // A tensor of 10^10 floats whose data would lie beyond the 16 bytes present.
        (
            "tensor_past_the_data",
            small(
                r#"{"w":{"dtype":"F32","shape":[100000,100000],"data_offsets":[0,40000000000]}}"#,
                &[0; 16],
            ),
            "truncated",
        ),
        // A huge shape whose offsets cover only 16 bytes.
        (
            "huge_shape_small_offsets",
            small(
                r#"{"w":{"dtype":"F32","shape":[100000,100000],"data_offsets":[0,16]}}"#,
                &[0; 16],
            ),
            "invalid safetensors header",
        ),
        // A shape whose element count overflows usize (and so would the size in bytes).
        (
            "overflowing_shape",
            small(
                r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,16]}}"#,
                &[0; 16],
            ),
            "invalid safetensors header",
        ),
        // The same with a zero dimension first: no data, so the header's checks pass; candle could not count it.
        (
            "uncountable_empty_shape",
            small(
                r#"{"w":{"dtype":"F32","shape":[0,4294967296,4294967296],"data_offsets":[0,0]}}"#,
                &[],
            ),
            "more elements than this machine can count",
        ),
        // Overlapping tensors, and a dtype whose size does not match the offsets.
        (
            "overlap",
            small(
                r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#,
                &[0; 24],
            ),
            "invalid safetensors header",
        ),
        // A tensor listed twice (JSON keeps the last one; the file is refused instead).
        (
            "duplicate_names",
            small(
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                &[0; 8],
            ),
            "listed twice",
        ),
        (
            "wrong_dtype_size",
            small(
                r#"{"a":{"dtype":"F64","shape":[4],"data_offsets":[0,16]}}"#,
                &[0; 16],
            ),
            "invalid safetensors header",
        ),
    ];
    for (name, bytes, why) in cases {
        let (message, peak) = open_malformed(&dir, name, &bytes);
        assert!(message.contains(why), "{name}: {message}");
        // Nothing of the claimed size: at most a few times the (tiny) header, and the error message.
        assert!(peak < 16 << 10, "{name}: {peak} bytes allocated");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_large_header_costs_a_bounded_multiple_of_its_size() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch_dir("limits-big-header");
    std::fs::create_dir_all(&dir).unwrap();
    // The densest JSON for the parser to expand: a 1 MiB shape of ones (2 bytes each in the file, a usize in
    // memory), of one scalar-sized tensor.
    let ones = vec!["1"; 512 << 10].join(",");
    let header = format!(r#"{{"w":{{"dtype":"U8","shape":[{ones}],"data_offsets":[0,1]}}}}"#);
    let bytes = file_bytes(header.len() as u64, &header, &[7]);
    let path = dir.join("dense.safetensors");
    std::fs::write(&path, &bytes).unwrap();
    let (file, peak) = measured(|| SafetensorsFile::open(&path).unwrap());
    eprintln!(
        "dense header: file {} bytes, peak {peak} bytes while opening",
        bytes.len()
    );
    let bound = 8 * bytes.len() + (8 << 20);
    assert!(peak <= bound, "{peak} > {bound}");
    let (t, peak) = measured(|| file.load("w", DType::F32, &Device::Cpu).unwrap());
    assert_eq!(t.elem_count(), 1);
    assert!(peak <= bound, "{peak} > {bound}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn loading_a_network_allocates_its_file_plus_its_declared_size() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let unet = fixtures().join("tiny-sd/unet");
    let weights = unet.join("diffusion_pytorch_model.safetensors");
    let file_len = std::fs::metadata(&weights).unwrap().len() as usize;
    let config = ConfigFile::read(&unet.join("config.json")).unwrap();
    let (model, peak) = measured(|| {
        let w = loader::weights(&weights, Precision::F32, &Device::Cpu).unwrap();
        UNet::load(w, &config).unwrap()
    });
    eprintln!("tiny UNet: file {file_len} bytes, peak {peak} bytes while loading");
    // The file is f32 like the network, so its declared size is the file's size.
    let bound = 2 * file_len + (8 << 20);
    assert!(peak <= bound, "{peak} > {bound}");
    drop(model);
}

#[test]
fn a_decompression_bomb_is_refused_before_its_pixels_are_allocated() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // 69 bytes declaring a 100000 x 100000 PNG.
    let bomb = std::fs::read(fixtures().join("sketch/bomb_header.png")).unwrap();
    let (r, peak) = measured(|| Sketch::decode(&bomb));
    assert!(
        matches!(r, Err(Error::InvalidSketch(_))),
        "{:?}",
        r.map(|s| (s.width(), s.height()))
    );
    assert!(peak < 1 << 20, "{peak} bytes allocated");
}

#[test]
fn prompts_are_limited_to_max_prompt_bytes() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    for field in ["prompt", "negative_prompt"] {
        for (len, ok) in [(MAX_PROMPT_BYTES, true), (MAX_PROMPT_BYTES + 1, false)] {
            let mut req = GenerationRequest::DEFAULT;
            assert!(req.set_form_field(field, &"x".repeat(len)).unwrap());
            match req.validate() {
                Ok(()) => assert!(ok, "{field} of {len} bytes accepted"),
                Err(Error::InvalidRequest { field: f, message }) => {
                    assert!(!ok, "{field} of {len} bytes refused: {message}");
                    assert_eq!(f, field);
                    assert!(message.contains(&MAX_PROMPT_BYTES.to_string()), "{message}");
                }
                Err(e) => panic!("{e:?}"),
            }
        }
    }
}
