//! Sketch decoding and preprocessing: PIL-exact Lanczos, the scribble threshold, target sizes and every
//! decoding error. Reference data comes from `tools/fixturegen/sketch.py` (PIL + numpy).

mod common;

use std::path::{Path, PathBuf};
use std::str::FromStr;

use sketchx::sketch::{
    composite_over_white, resize_lanczos_rgb8, scribble_threshold, Preprocess, Sketch, SketchLimits,
};
use sketchx::{Error, SketchError};

fn fixtures() -> PathBuf {
    common::fixtures().join("sketch")
}

fn fixture(name: &str) -> PathBuf {
    fixtures().join(name)
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

fn open(name: &str) -> Sketch {
    Sketch::open(&fixture(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

/// Non-comment lines of a manifest, split on whitespace.
fn manifest(name: &str) -> Vec<Vec<String>> {
    String::from_utf8(read(name))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect()
}

fn sketch_err(r: sketchx::Result<Sketch>) -> SketchError {
    match r {
        Err(Error::InvalidSketch(e)) => e,
        Err(e) => panic!("expected InvalidSketch, got {e:?}"),
        Ok(s) => panic!("expected an error, decoded {}x{}", s.width(), s.height()),
    }
}

fn assert_same_pixels(what: &str, got: &[u8], want: &[u8], width: u32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        let differing = got.iter().zip(want).filter(|(a, b)| a != b).count();
        let px = i / 3;
        panic!(
            "{what}: {differing} samples differ; first at x={} y={} channel {}: got {} want {}",
            px as u32 % width,
            px as u32 / width,
            i % 3,
            got[i],
            want[i]
        );
    }
}

#[test]
fn lanczos_is_bit_exact_with_pil() {
    let cases = manifest("lanczos.txt");
    assert!(cases.len() >= 12, "expected at least a dozen size pairs");
    for case in cases {
        let (input, w, h, expected) = (
            &case[0],
            case[1].parse().unwrap(),
            case[2].parse().unwrap(),
            &case[3],
        );
        let src = open(input);
        let want = open(expected);
        assert_eq!((want.width(), want.height()), (w, h), "{expected}: size");
        let got = resize_lanczos_rgb8(src.rgb(), src.width(), src.height(), w, h);
        let what = format!("{input} {}x{} -> {w}x{h}", src.width(), src.height());
        assert_same_pixels(&what, &got, want.rgb(), w);
        // The same through the public preprocessing entry point.
        let control = src.to_control(w, h, Preprocess::None);
        assert_eq!((control.width, control.height), (w, h));
        assert_same_pixels(&what, &control.rgb, want.rgb(), w);
    }
}

#[test]
fn identity_resize_is_a_copy() {
    let data: Vec<u8> = (0..7 * 5 * 3).map(|i| (i * 37 % 256) as u8).collect();
    let s = Sketch::from_rgb8(7, 5, data.clone()).unwrap();
    assert_eq!(s.to_control(7, 5, Preprocess::None).rgb, data);
}

#[test]
fn preprocessing_matches_the_python_twin() {
    let cases = manifest("preprocess.txt");
    assert!(cases.len() >= 10);
    for case in cases {
        let (input, w, h, mode, expected) = (
            &case[0],
            case[1].parse().unwrap(),
            case[2].parse().unwrap(),
            Preprocess::from_str(&case[3]).unwrap(),
            &case[4],
        );
        let want = open(expected);
        let got = open(input).to_control(w, h, mode);
        assert_same_pixels(&format!("{input} {w}x{h} {mode}"), &got.rgb, want.rgb(), w);
        if mode == Preprocess::Scribble {
            assert!(
                got.rgb.iter().all(|&v| v == 0 || v == 255),
                "{input}: binary output"
            );
            // Strokes are the minority: the background must come out black whatever the input's polarity.
            let white = got.rgb.iter().filter(|&&v| v == 255).count();
            assert!(white * 3 < got.rgb.len(), "{input}: background is black");
        }
    }
}

#[test]
fn polarity_detection_and_thresholds() {
    // Dark on light: a stroke is where the darkest channel is < 127.
    let mut px = vec![255u8; 10 * 3];
    px[..3].copy_from_slice(&[126, 255, 255]); // stroke (min 126)
    px[3..6].copy_from_slice(&[127, 200, 255]); // not a stroke (min 127)
    px[6..9].copy_from_slice(&[0, 0, 0]); // stroke
    scribble_threshold(&mut px);
    assert_eq!(&px[..9], &[255, 255, 255, 0, 0, 0, 255, 255, 255]);
    assert!(px[9..].iter().all(|&v| v == 0));

    // Light on dark: a stroke is where the brightest channel is > 128.
    let mut px = vec![0u8; 10 * 3];
    px[..3].copy_from_slice(&[129, 0, 0]); // stroke
    px[3..6].copy_from_slice(&[128, 128, 128]); // not a stroke
    px[6..9].copy_from_slice(&[255, 255, 255]); // stroke
    scribble_threshold(&mut px);
    assert_eq!(&px[..9], &[255, 255, 255, 0, 0, 0, 255, 255, 255]);
    assert!(px[9..].iter().all(|&v| v == 0));

    // Mean exactly 127.5 counts as light: pixels (127,128,127.5 avg) -> use two pixels 127 and 128.
    let mut px = vec![127, 127, 127, 128, 128, 128];
    scribble_threshold(&mut px);
    assert_eq!(
        px,
        vec![0; 6],
        "mean 127.5 is dark-on-light; neither pixel is < 127"
    );
    // Just below 127.5: light on dark; neither pixel is > 128.
    let mut px = vec![127, 127, 127, 128, 128, 127];
    scribble_threshold(&mut px);
    assert_eq!(px, vec![0; 6]);
    let mut px = vec![0, 0, 0, 255, 255, 254];
    scribble_threshold(&mut px);
    assert_eq!(
        px,
        vec![0, 0, 0, 255, 255, 255],
        "mean < 127.5: light strokes on dark"
    );
}

#[test]
fn inverted_sketch_gives_the_same_control_image() {
    let bw = open("pre_black_on_white.png");
    let inverted: Vec<u8> = bw.rgb().iter().map(|&v| 255 - v).collect();
    let wb = Sketch::from_rgb8(bw.width(), bw.height(), inverted).unwrap();
    let a = bw.to_control(128, 96, Preprocess::Scribble);
    let b = wb.to_control(128, 96, Preprocess::Scribble);
    // Lanczos commutes with inversion up to rounding, and the thresholds are symmetric (< 127 vs > 128).
    let differing = a.rgb.iter().zip(&b.rgb).filter(|(x, y)| x != y).count();
    assert!(differing * 200 < a.rgb.len(), "{differing} samples differ");
}

#[test]
fn transparency_is_composited_over_white() {
    assert_eq!(composite_over_white(0, 0), 255);
    assert_eq!(composite_over_white(0, 255), 0);
    assert_eq!(composite_over_white(200, 255), 200);
    assert_eq!(composite_over_white(100, 128), 177); // (12800 + 32385 + 127) / 255 = 177.69
    for a in 0..=255u8 {
        for c in [0u8, 1, 77, 127, 128, 200, 254, 255] {
            let exact = (f64::from(c) * f64::from(a) + 255.0 * (255.0 - f64::from(a))) / 255.0;
            assert_eq!(
                f64::from(composite_over_white(c, a)),
                exact.round(),
                "c={c} a={a}"
            );
        }
    }
    // Transparent black background with black strokes: composited to white, so strokes stay strokes.
    let rgba = [0, 0, 0, 0, 0, 0, 0, 255, 10, 20, 30, 128];
    let s = Sketch::from_rgba8(3, 1, &rgba).unwrap();
    assert_eq!(s.rgb(), &[255, 255, 255, 0, 0, 0, 132, 137, 142]);
}

#[test]
fn target_size_rules() {
    let s = |w: u32, h: u32| Sketch::from_rgb8(w, h, vec![255; (w * h * 3) as usize]).unwrap();
    // Defaults: short side 512, long side to the nearest multiple of 64, capped at 1024.
    assert_eq!(s(512, 512).target_size(None, None), (512, 512));
    assert_eq!(s(100, 100).target_size(None, None), (512, 512));
    assert_eq!(s(640, 448).target_size(None, None), (704, 512)); // 731.4 -> 704
    assert_eq!(s(448, 576).target_size(None, None), (512, 640)); // 658.3 -> 640
    assert_eq!(s(1920, 1080).target_size(None, None), (896, 512)); // 910.2 -> 896
    assert_eq!(s(16, 25).target_size(None, None), (512, 832)); // 800 = 12.5 * 64: halves round up
    assert_eq!(s(100, 1000).target_size(None, None), (512, 1024)); // 5120 capped
    assert_eq!(s(3000, 1).target_size(None, None), (1024, 512));
    // Explicit sizes win, unchanged.
    assert_eq!(s(640, 448).target_size(Some(300), Some(200)), (300, 200));
    // One side given: the other follows the aspect ratio, multiple of 8, within 64..=2048.
    assert_eq!(s(640, 448).target_size(Some(768), None), (768, 536)); // 537.6 -> 536
    assert_eq!(s(640, 448).target_size(None, Some(512)), (728, 512)); // 731.4 -> 728
    assert_eq!(s(2, 1).target_size(None, Some(66)), (136, 66)); // 132 = 16.5 * 8: halves round up
    assert_eq!(s(1, 1000).target_size(Some(64), None), (64, 2048));
    assert_eq!(s(1000, 1).target_size(Some(2048), None), (2048, 64));
}

#[test]
fn preprocess_parses() {
    assert_eq!(
        "scribble".parse::<Preprocess>().unwrap(),
        Preprocess::Scribble
    );
    assert_eq!("none".parse::<Preprocess>().unwrap(), Preprocess::None);
    assert_eq!(
        " Scribble ".parse::<Preprocess>().unwrap(),
        Preprocess::Scribble
    );
    assert_eq!(Preprocess::default(), Preprocess::Scribble);
    match "hed".parse::<Preprocess>() {
        Err(Error::InvalidRequest { field, .. }) => assert_eq!(field, "preprocess"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn error_empty_and_unknown_format() {
    assert_eq!(sketch_err(Sketch::decode(&[])), SketchError::Empty);
    assert_eq!(
        sketch_err(Sketch::decode(b"definitely not an image, just text")),
        SketchError::UnknownFormat
    );
    // A format `image` recognises but sketchx does not decode (TIFF).
    assert_eq!(
        sketch_err(Sketch::decode(b"II*\0\x08\0\0\0garbage")),
        SketchError::UnknownFormat
    );
}

#[test]
fn error_truncated_png_and_jpeg() {
    for name in ["pre_black_on_white.png", "sketch.jpg"] {
        let bytes = read(name);
        assert!(Sketch::decode(&bytes).is_ok(), "{name} decodes whole");
        for cut in [bytes.len() / 2, bytes.len() * 9 / 10, 40, 12] {
            match sketch_err(Sketch::decode(&bytes[..cut])) {
                SketchError::Corrupt(msg) => assert!(!msg.is_empty()),
                e => panic!("{name} cut at {cut}: {e:?}"),
            }
        }
    }
    // Bytes after the JPEG's end-of-image marker (some cameras append data) are fine.
    let mut jpeg = read("sketch.jpg");
    jpeg.extend_from_slice(b"trailing data");
    assert!(Sketch::decode(&jpeg).is_ok());
    // A valid signature followed by garbage.
    let mut bytes = read("pre_black_on_white.png");
    for b in &mut bytes[16..] {
        *b ^= 0x5a;
    }
    assert!(matches!(
        sketch_err(Sketch::decode(&bytes)),
        SketchError::Corrupt(_)
    ));
}

#[test]
fn error_decompression_bomb_header() {
    let bytes = read("bomb_header.png");
    assert!(bytes.len() < 200, "the bomb is tiny");
    assert_eq!(
        sketch_err(Sketch::decode(&bytes)),
        SketchError::TooLarge {
            width: 60000,
            height: 60000,
            max_side: 16384,
            max_pixels: 64 << 20
        }
    );
}

#[test]
fn error_decompression_bomb_allocation() {
    // 4096x4096 gray zeros compress to a few kB but need 16 MiB (48 MiB as RGB) once decoded.
    let (w, h) = (4096u32, 4096u32);
    let mut png = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new_with_quality(
            &mut png,
            image::codecs::png::CompressionType::Best,
            image::codecs::png::FilterType::NoFilter,
        ),
        &vec![0u8; (w * h) as usize],
        w,
        h,
        image::ExtendedColorType::L8,
    )
    .unwrap();
    assert!(png.len() < 100_000);
    let limits = SketchLimits {
        max_alloc: 4 << 20,
        ..SketchLimits::default()
    };
    assert!(matches!(
        sketch_err(Sketch::decode_with_limits(&png, &limits)),
        SketchError::TooLarge {
            width: 4096,
            height: 4096,
            ..
        }
    ));
    // Side and pixel limits apply before decoding.
    let limits = SketchLimits {
        max_side: 4095,
        ..SketchLimits::default()
    };
    assert!(matches!(
        sketch_err(Sketch::decode_with_limits(&png, &limits)),
        SketchError::TooLarge { max_side: 4095, .. }
    ));
    let limits = SketchLimits {
        max_pixels: 4096 * 4096 - 1,
        ..SketchLimits::default()
    };
    assert!(matches!(
        sketch_err(Sketch::decode_with_limits(&png, &limits)),
        SketchError::TooLarge { .. }
    ));
    // Within the default limits it decodes.
    let s = Sketch::decode(&png).unwrap();
    assert_eq!((s.width(), s.height()), (w, h));
}

#[test]
fn error_zero_sized() {
    assert_eq!(
        sketch_err(Sketch::from_rgb8(0, 5, vec![])),
        SketchError::ZeroSized {
            width: 0,
            height: 5
        }
    );
    assert_eq!(
        sketch_err(Sketch::from_rgba8(3, 0, &[])),
        SketchError::ZeroSized {
            width: 3,
            height: 0
        }
    );
    assert_eq!(
        sketch_err(Sketch::decode(&read("zero_size.gif"))),
        SketchError::ZeroSized {
            width: 0,
            height: 0
        }
    );
    // The BMP decoder itself refuses a 0-pixel width while reading the header.
    match sketch_err(Sketch::decode(&read("zero_width.bmp"))) {
        SketchError::ZeroSized { width: 0, .. } | SketchError::Corrupt(_) => {}
        e => panic!("{e:?}"),
    }
}

#[test]
fn error_pixel_buffer_and_read() {
    assert_eq!(
        sketch_err(Sketch::from_rgb8(2, 2, vec![0; 11])),
        SketchError::PixelBuffer {
            len: 11,
            width: 2,
            height: 2,
            channels: 3
        }
    );
    assert_eq!(
        sketch_err(Sketch::from_rgba8(2, 2, &[0; 12])),
        SketchError::PixelBuffer {
            len: 12,
            width: 2,
            height: 2,
            channels: 4
        }
    );
    let missing = Path::new("/nonexistent/sketchx/no-such-sketch.png");
    match sketch_err(Sketch::open(missing)) {
        SketchError::Read { path, message } => {
            assert_eq!(path, missing);
            assert!(!message.is_empty());
        }
        e => panic!("{e:?}"),
    }
}

/// Encodes `rgba` with the `image` crate in several formats and checks each decodes to the same composited RGB.
#[test]
fn decodes_every_lossless_format() {
    use image::{ImageEncoder, ImageFormat};
    let (w, h) = (13u32, 7u32);
    let rgb: Vec<u8> = (0..w * h * 3).map(|i| (i * 29 % 251) as u8).collect();
    let mut rgba = Vec::new();
    for (i, px) in rgb.chunks(3).enumerate() {
        rgba.extend_from_slice(px);
        rgba.push(if i % 3 == 0 {
            255
        } else {
            (i * 17 % 256) as u8
        });
    }
    let want_rgba = Sketch::from_rgba8(w, h, &rgba).unwrap();
    for format in [ImageFormat::Png, ImageFormat::Bmp, ImageFormat::WebP] {
        for (data, color, want) in [
            (&rgb, image::ExtendedColorType::Rgb8, &rgb),
            (
                &rgba,
                image::ExtendedColorType::Rgba8,
                &want_rgba.rgb().to_vec(),
            ),
        ] {
            let mut bytes = std::io::Cursor::new(Vec::new());
            image::write_buffer_with_format(&mut bytes, data, w, h, color, format).unwrap();
            let s = Sketch::decode(bytes.get_ref()).unwrap();
            assert_eq!((s.width(), s.height()), (w, h));
            assert_same_pixels(&format!("{format:?} {color:?}"), s.rgb(), want, w);
        }
    }
    // GIF is palettised: a 4-colour image survives exactly.
    let pal: Vec<u8> = (0..w * h)
        .flat_map(|i| {
            [
                [0u8, 0, 0, 255],
                [255, 255, 255, 255],
                [200, 10, 10, 255],
                [9, 9, 200, 255],
            ][(i % 4) as usize]
        })
        .collect();
    let mut gif = Vec::new();
    image::codecs::gif::GifEncoder::new(&mut gif)
        .encode(&pal, w, h, image::ExtendedColorType::Rgba8)
        .unwrap();
    let s = Sketch::decode(&gif).unwrap();
    assert_same_pixels(
        "gif",
        s.rgb(),
        Sketch::from_rgba8(w, h, &pal).unwrap().rgb(),
        w,
    );

    // 16-bit RGB: rounded to 8 bits with (v + 128) / 257.
    let rgb16: Vec<u16> = (0..w * h * 3).map(|i| (i * 1013 % 65536) as u16).collect();
    let bytes16: Vec<u8> = rgb16.iter().flat_map(|v| v.to_ne_bytes()).collect();
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(&bytes16, w, h, image::ExtendedColorType::Rgb16)
        .unwrap();
    let s = Sketch::decode(&png).unwrap();
    let want: Vec<u8> = rgb16
        .iter()
        .map(|&v| ((u32::from(v) + 128) / 257) as u8)
        .collect();
    assert_same_pixels("png16", s.rgb(), &want, w);

    // Grayscale: replicated into R, G and B.
    let gray: Vec<u8> = (0..w * h).map(|i| (i * 7 % 256) as u8).collect();
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(&gray, w, h, image::ExtendedColorType::L8)
        .unwrap();
    let s = Sketch::decode(&png).unwrap();
    let want: Vec<u8> = gray.iter().flat_map(|&v| [v, v, v]).collect();
    assert_same_pixels("gray", s.rgb(), &want, w);
}

#[test]
fn jpeg_decodes_close_to_pil() {
    let s = open("sketch.jpg");
    let pil = open("sketch_jpg_pil.png");
    assert_eq!((s.width(), s.height()), (pil.width(), pil.height()));
    let max = s
        .rgb()
        .iter()
        .zip(pil.rgb())
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(max <= 3, "JPEG decoders differ by {max}");
}

#[test]
fn control_tensor_layout() {
    let rgb = vec![0, 51, 255, 102, 153, 204];
    let s = Sketch::from_rgb8(2, 1, rgb).unwrap();
    let c = s.to_control(2, 1, Preprocess::None);
    let t = c.to_tensor(&candle_core::Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[1, 3, 1, 2]);
    assert_eq!(t.dtype(), candle_core::DType::F32);
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    let want: Vec<f32> = [0u8, 102, 51, 153, 255, 204]
        .iter()
        .map(|&x| f32::from(x) / 255.0)
        .collect();
    assert_eq!(v, want);
}

#[test]
fn example_sketches_decode_and_preprocess() {
    let dir = fixtures().join("../../../examples/sketches");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return; // examples are not part of every checkout layout (SKETCHX_FIXTURES pointing elsewhere)
    };
    let mut n = 0;
    for entry in entries {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "png") {
            let s = Sketch::open(&path).unwrap();
            let (w, h) = s.target_size(None, None);
            assert_eq!(
                (w % 64, h % 64, w.min(h)),
                (0, 0, 512),
                "{}",
                path.display()
            );
            let c = s.to_control(w, h, Preprocess::Scribble);
            let strokes = c.rgb.iter().filter(|&&v| v == 255).count();
            assert!(
                strokes > 0 && strokes * 5 < c.rgb.len(),
                "{}: white strokes on black",
                path.display()
            );
            n += 1;
        }
    }
    assert!(n >= 4, "expected the example sketches in {}", dir.display());
}
