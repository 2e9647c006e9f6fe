//! Output: diffusers-exact float -> u8 conversion, PNG encoding and atomic writes.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use sketchx::output::{
    encode_png, image_file_name, to_u8_like_diffusers, write_png_atomic, PngCompression, PngFilter,
    PngSettings,
};
use sketchx::Error;

fn fixtures() -> PathBuf {
    common::fixtures().join("sketch")
}

/// A fresh empty directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sketchx-output-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn test_image(w: u32, h: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            v.extend_from_slice(&[
                (x * 255 / w) as u8,
                (y * 255 / h) as u8,
                ((x * 7 + y * 13) % 256) as u8,
            ]);
        }
    }
    v
}

fn decode_png(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let img = image::load_from_memory_with_format(bytes, image::ImageFormat::Png).unwrap();
    assert_eq!(img.color(), image::ColorType::Rgb8);
    (img.width(), img.height(), img.into_rgb8().into_raw())
}

#[test]
fn to_u8_matches_numpy_and_torch() {
    let dir = fixtures();
    let raw = std::fs::read(dir.join("to_u8.f32")).unwrap();
    let want = std::fs::read(dir.join("to_u8.u8")).unwrap();
    let values: Vec<f32> = raw
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(values.len(), want.len());
    assert!(values.iter().any(|v| v.is_nan()), "fixture covers NaN");
    let got = to_u8_like_diffusers(&values);
    for (i, ((&x, &g), &w)) in values.iter().zip(&got).zip(&want).enumerate() {
        assert_eq!(g, w, "value #{i}: {x:e} ({:#010x})", x.to_bits());
    }
}

#[test]
fn to_u8_known_values() {
    let v = to_u8_like_diffusers(&[
        -1.0,
        1.0,
        0.0,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        -7.0,
        3.0,
    ]);
    // 0 -> 0.5 * 255 = 127.5 -> 128 (half to even)
    assert_eq!(v, vec![0, 255, 128, 0, 255, 0, 0, 255]);
    // Ties round to even: y * 255 == 0.5 -> 0, 1.5 -> 2, 2.5 -> 2.
    let y_for = |t: f32| (t / 255.0 - 0.5) * 2.0;
    for (t, want) in [(126.5f32, 126u8), (128.5, 128), (253.5, 254)] {
        let x = y_for(t);
        let y = x / 2.0 + 0.5;
        if y * 255.0 == t {
            assert_eq!(to_u8_like_diffusers(&[x]), vec![want], "tie at {t}");
        }
    }
}

#[test]
fn file_names() {
    assert_eq!(image_file_name("job-42", 0), "job-42_0.png");
    assert_eq!(image_file_name("a1b2", 13), "a1b2_13.png");
}

#[test]
fn encode_roundtrips_for_every_setting() {
    let (w, h) = (67, 41);
    let rgb = test_image(w, h);
    let compressions = [
        PngCompression::Uncompressed,
        PngCompression::Fast,
        PngCompression::Level(1),
        PngCompression::Level(6),
        PngCompression::Level(9),
        PngCompression::Level(0),
        PngCompression::Level(200),
    ];
    let filters = [
        PngFilter::NoFilter,
        PngFilter::Sub,
        PngFilter::Up,
        PngFilter::Avg,
        PngFilter::Paeth,
        PngFilter::Adaptive,
    ];
    for compression in compressions {
        for filter in filters {
            let settings = PngSettings {
                compression,
                filter,
            };
            let png = encode_png(w, h, &rgb, &settings).unwrap();
            assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
            assert_eq!(decode_png(&png), (w, h, rgb.clone()), "{settings:?}");
        }
    }
    let png = encode_png(w, h, &rgb, &PngSettings::default()).unwrap();
    assert_eq!(decode_png(&png), (w, h, rgb));
}

#[test]
fn encode_rejects_bad_buffers() {
    let s = PngSettings::default();
    assert!(matches!(
        encode_png(2, 2, &[0; 11], &s),
        Err(Error::InvalidRequest { .. })
    ));
    assert!(matches!(
        encode_png(0, 2, &[], &s),
        Err(Error::InvalidRequest { .. })
    ));
}

#[test]
fn atomic_write_success_leaves_only_the_file() {
    let dir = TempDir::new("ok");
    let (w, h) = (64, 48);
    let rgb = test_image(w, h);
    let path = dir.0.join(image_file_name("job", 0));
    let n = write_png_atomic(&path, w, h, &rgb, &PngSettings::default()).unwrap();
    assert_eq!(dir.entries(), vec!["job_0.png".to_owned()]);
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len() as u64, n);
    assert_eq!(decode_png(&bytes), (w, h, rgb));

    // Overwriting replaces the content, still without leftovers.
    let other = vec![7u8; (w * h * 3) as usize];
    write_png_atomic(&path, w, h, &other, &PngSettings::default()).unwrap();
    assert_eq!(dir.entries(), vec!["job_0.png".to_owned()]);
    assert_eq!(decode_png(&std::fs::read(&path).unwrap()).2, other);
}

#[test]
fn atomic_write_failures_leave_nothing_behind() {
    let dir = TempDir::new("fail");
    let (w, h) = (16, 16);
    let rgb = test_image(w, h);
    let s = PngSettings::default();

    // Missing directory: the temporary cannot even be created.
    let missing = dir.0.join("no-such-dir").join("x.png");
    match write_png_atomic(&missing, w, h, &rgb, &s) {
        Err(Error::Io { path, .. }) => assert_eq!(path, missing),
        other => panic!("{other:?}"),
    }

    // The target is a non-empty directory: the temporary is written, the rename fails, the temporary goes.
    let target = dir.0.join("taken.png");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("inside"), b"x").unwrap();
    match write_png_atomic(&target, w, h, &rgb, &s) {
        Err(Error::Io { path, .. }) => assert_eq!(path, target),
        other => panic!("{other:?}"),
    }
    assert_eq!(dir.entries(), vec!["taken.png".to_owned()]);

    // Bad pixel buffer: refused before touching the file system.
    let path = dir.0.join("bad.png");
    assert!(write_png_atomic(&path, w, h, &rgb[1..], &s).is_err());
    assert_eq!(dir.entries(), vec!["taken.png".to_owned()]);

    // A read-only directory (only enforced for non-root users; root bypasses permissions).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let ro = dir.0.join("ro");
        std::fs::create_dir(&ro).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        let probe = ro.join(".probe");
        let enforced = std::fs::write(&probe, b"").is_err();
        let _ = std::fs::remove_file(&probe);
        if enforced {
            assert!(matches!(
                write_png_atomic(&ro.join("x.png"), w, h, &rgb, &s),
                Err(Error::Io { .. })
            ));
            assert_eq!(std::fs::read_dir(&ro).unwrap().count(), 0);
        }
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

#[test]
fn concurrent_writers_to_one_path() {
    let dir = TempDir::new("race");
    let (w, h) = (32, 32);
    let path: &Path = &dir.0.join("same.png");
    std::thread::scope(|scope| {
        for t in 0..8u8 {
            scope.spawn(move || {
                let rgb = vec![t * 30; (w * h * 3) as usize];
                for _ in 0..10 {
                    write_png_atomic(path, w, h, &rgb, &PngSettings::default()).unwrap();
                }
            });
        }
    });
    assert_eq!(dir.entries(), vec!["same.png".to_owned()]);
    let (_, _, rgb) = decode_png(&std::fs::read(path).unwrap());
    assert!(
        rgb.iter().all(|&v| v == rgb[0]),
        "one writer's complete image"
    );
}
