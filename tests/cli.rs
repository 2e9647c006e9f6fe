//! The README's main command, `examples/generate`, run as a program on the tiny fixture models: its flags, the
//! printed paths, the written images, and a clear failure for bad input. (`cargo test` builds the examples next
//! to the test binaries.)

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

fn generate_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap(); // target/<profile>/deps/cli-<hash>
    let dir = exe.parent().unwrap().parent().unwrap();
    dir.join("examples")
        .join(format!("generate{}", std::env::consts::EXE_SUFFIX))
}

fn run(args: &[&str]) -> std::process::Output {
    let (model, controlnet) = tiny_models();
    Command::new(generate_bin())
        .args(["--model", &model, "--controlnet", &controlnet])
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("the generate example is built by cargo test")
}

#[test]
fn generate_writes_the_images_it_prints() {
    let out = scratch_dir("cli");
    let sketch = fixtures().join("sketches/house_black_on_white.png");
    let o = run(&[
        "--sketch",
        sketch.to_str().unwrap(),
        "--prompt",
        "a house",
        "--negative-prompt",
        "",
        "--temperature",
        "0.5",
        "--guidance-scale",
        "6",
        "--num-images",
        "2",
        "--steps",
        "2",
        "--seed",
        "9",
        "--width",
        "64",
        "--height",
        "96",
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("seed 9"), "{stderr}");
    let paths: Vec<PathBuf> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(PathBuf::from)
        .collect();
    assert_eq!(paths.len(), 2);
    for p in &paths {
        assert!(p.starts_with(&out));
        let img = image::open(p).unwrap();
        assert_eq!((img.width(), img.height()), (64, 96));
    }
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn bad_flags_fail_with_a_message_naming_the_field() {
    let sketch = fixtures().join("sketches/house_black_on_white.png");
    let o = run(&["--sketch", sketch.to_str().unwrap(), "--steps", "0"]);
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("steps") && stderr.contains("1..=150"),
        "{stderr}"
    );

    let o = run(&["--sketch", "/no/such/sketch.png"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("/no/such/sketch.png"));
}

#[test]
fn vae_tiling_flag_gives_diffusers_tiled_image() {
    let text =
        std::fs::read_to_string(fixtures().join("reference/e2e_vae_tiling/cases.json")).unwrap();
    let cases: serde_json::Value = serde_json::from_str(&text).unwrap();
    let case = cases
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "tiled_nonsquare")
        .unwrap();
    let sketch = fixtures()
        .join("sketches")
        .join(case["sketch"].as_str().unwrap());
    let reference = image::open(
        fixtures()
            .join("reference/e2e_vae_tiling")
            .join(case["images"][0].as_str().unwrap()),
    )
    .unwrap()
    .to_rgb8();
    let field = |k: &str| case[k].to_string();
    let mut mean_diff = Vec::new();
    for tiling in [true, false] {
        let out = scratch_dir(&format!("cli-tiling-{tiling}"));
        let mut args = vec![
            "--sketch".to_string(),
            sketch.to_str().unwrap().to_string(),
            "--prompt".into(),
            case["prompt"].as_str().unwrap().into(),
        ];
        for k in [
            "steps",
            "seed",
            "width",
            "height",
            "guidance_scale",
            "temperature",
        ] {
            args.push(format!("--{}", k.replace('_', "-")));
            args.push(field(k));
        }
        args.extend(["--out".into(), out.to_str().unwrap().into()]);
        if tiling {
            args.push("--vae-tiling".into());
        }
        let o = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let path = String::from_utf8(o.stdout).unwrap().trim().to_string();
        let ours = image::open(&path).unwrap().to_rgb8();
        let d: f64 = ours
            .as_raw()
            .iter()
            .zip(reference.as_raw())
            .map(|(a, b)| f64::from(a.abs_diff(*b)))
            .sum::<f64>()
            / ours.as_raw().len() as f64;
        mean_diff.push(d);
        std::fs::remove_dir_all(out).unwrap();
    }
    // With the flag: diffusers' tiled image (mean |diff| within the parity bound); without: measurably not.
    assert!(mean_diff[0] <= 0.25, "{mean_diff:?}");
    assert!(mean_diff[1] > mean_diff[0] + 0.1, "{mean_diff:?}");
}
