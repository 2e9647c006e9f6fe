//! The `lineart` and `canny` preprocessors against their references (`formats/preprocess/cases.json`, written by
//! `tools/fixturegen/formats.py`): lineart as the Python twin computes it, canny as OpenCV's `cv2.Canny` (3x3
//! Sobel, L1 gradient) on the LANCZOS-resized RGB sketch. Every case must match byte for byte.

mod common;
use common::*;

use serde_json::Value;
use sketchx::request::GenerationRequest;
use sketchx::sketch::{canny_rgb8, CannyThresholds, Preprocess, Sketch};
use sketchx::Error;

fn dir() -> std::path::PathBuf {
    fixtures().join("formats/preprocess")
}

fn manifest() -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("cases.json")).unwrap()).unwrap()
}

fn png(name: &str) -> image::RgbImage {
    image::open(dir().join(name)).unwrap().to_rgb8()
}

fn size(case: &Value) -> (u32, u32) {
    (
        case["width"].as_u64().unwrap() as u32,
        case["height"].as_u64().unwrap() as u32,
    )
}

fn sketch(case: &Value) -> Sketch {
    Sketch::open(
        &fixtures()
            .join("sketches")
            .join(case["sketch"].as_str().unwrap()),
    )
    .unwrap()
}

#[test]
fn lineart_matches_every_reference() {
    let m = manifest();
    let cases: Vec<&Value> = m["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["mode"] == "lineart")
        .collect();
    assert!(cases.len() >= 5);
    for case in cases {
        let (w, h) = size(case);
        let ours = sketch(case).to_control(w, h, Preprocess::Lineart);
        let want = png(case["expected"].as_str().unwrap());
        let differing = ours
            .rgb
            .iter()
            .zip(want.as_raw())
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            differing, 0,
            "{}: {differing} samples differ",
            case["expected"]
        );
    }
}

/// Canny: the resized input equals the reference's input, and the edge map equals OpenCV's on every pixel.
/// Prints the agreement per case (edge pixels: ours / OpenCV's / both).
#[test]
fn canny_matches_opencv_on_every_case() {
    let m = manifest();
    let cases: Vec<&Value> = m["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["mode"] == "canny")
        .collect();
    assert!(cases.len() >= 20);
    let mut report = Vec::new();
    let mut distinct = std::collections::BTreeSet::new();
    for case in cases {
        assert_eq!(case["aperture_size"], 3);
        assert_eq!(case["l2_gradient"], false);
        let name = case["expected"].as_str().unwrap();
        let (w, h) = size(case);
        let thresholds = CannyThresholds {
            low: case["low_threshold"].as_u64().unwrap() as u32,
            high: case["high_threshold"].as_u64().unwrap() as u32,
        };
        let sketch = sketch(case);
        let input = png(case["input"].as_str().unwrap());
        assert!(
            sketch.resized(w, h) == *input.as_raw(),
            "{name}: resized input differs"
        );
        let ours = sketch.to_control_with(w, h, Preprocess::Canny, thresholds);
        let want = png(name);
        let pixels = (w * h) as usize;
        let (mut mine, mut theirs, mut both, mut differ) = (0, 0, 0, 0);
        for i in 0..pixels {
            let (a, b) = (ours.rgb[3 * i], want.as_raw()[3 * i]);
            assert!(ours.rgb[3 * i..3 * i + 3].iter().all(|&v| v == a));
            mine += usize::from(a == 255);
            theirs += usize::from(b == 255);
            both += usize::from(a == 255 && b == 255);
            differ += usize::from(a != b);
        }
        assert_eq!(
            theirs as u64,
            case["edge_pixels"].as_u64().unwrap(),
            "{name}: reference edge count"
        );
        report.push(format!(
            "{name}: {pixels} px, edges ours {mine} / OpenCV {theirs} / both {both}, differing {differ}"
        ));
        assert_eq!(differ, 0, "{name}: {differ} pixels differ");
        // The same edges straight from the RGB input.
        let direct = canny_rgb8(input.as_raw(), w, h, thresholds.low, thresholds.high);
        assert!(direct
            .iter()
            .zip(ours.rgb.chunks(3))
            .all(|(&e, px)| e == px[0]));
        distinct.insert((case["input"].as_str().unwrap().to_string(), theirs));
    }
    eprintln!("{}", report.join("\n"));
    // The thresholds matter: 5 inputs x 4 threshold pairs give 11 distinct edge counts (the soft pencil
    // inputs react to every pair).
    assert!(distinct.len() >= 11, "{distinct:?}");
}

#[test]
fn the_engine_preprocesses_with_the_requests_thresholds() {
    // The request's thresholds reach the control image (checked on the control image alone: the models do not
    // care which preprocessing made it).
    let m = manifest();
    let case = m["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["mode"] == "canny" && c["low_threshold"] == 10)
        .unwrap();
    let (w, h) = size(case);
    let req = GenerationRequest {
        preprocess: Preprocess::Canny,
        canny_low_threshold: 10,
        canny_high_threshold: case["high_threshold"].as_u64().unwrap() as u32,
        ..Default::default()
    };
    req.validate().unwrap();
    let ours = sketch(case).to_control_with(w, h, req.preprocess, req.canny_thresholds());
    assert!(ours.rgb == *png(case["expected"].as_str().unwrap()).as_raw());
    let default = sketch(case).to_control(w, h, Preprocess::Canny);
    assert!(default.rgb != ours.rgb, "the thresholds made no difference");
}

#[test]
fn bad_canny_thresholds_name_the_field() {
    for (low, high, field) in [
        (300, 200, "canny_low_threshold"),
        (2041, 2100, "canny_low_threshold"),
        (0, 4000, "canny_high_threshold"),
    ] {
        let req = GenerationRequest {
            preprocess: Preprocess::Canny,
            canny_low_threshold: low,
            canny_high_threshold: high,
            ..Default::default()
        };
        match req.validate() {
            Err(Error::InvalidRequest { field: f, message }) => {
                assert_eq!(f, field, "{low} {high}: {message}")
            }
            other => panic!("{low} {high}: {other:?}"),
        }
    }
}

#[test]
fn preprocess_names_parse() {
    for (name, mode) in [
        ("LINEART", Preprocess::Lineart),
        (" canny ", Preprocess::Canny),
    ] {
        assert_eq!(name.parse::<Preprocess>().unwrap(), mode);
    }
}
