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

    // The prompt limit (16 KiB) holds here too.
    let long = "x".repeat(sketchx::request::MAX_PROMPT_BYTES + 1);
    let o = run(&["--sketch", sketch.to_str().unwrap(), "--prompt", &long]);
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("prompt") && stderr.contains("16384"),
        "{stderr}"
    );
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

/// The `[default: X]` of each flag in `--help`.
fn help_defaults(help: &str) -> std::collections::HashMap<String, String> {
    let mut out = std::collections::HashMap::new();
    let mut flag: Option<String> = None;
    for line in help.lines() {
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix("--") {
            flag = rest.split_whitespace().next().map(str::to_string);
        }
        if let (Some(f), Some(i)) = (&flag, t.find("[default: ")) {
            let v = &t[i + "[default: ".len()..];
            out.insert(f.clone(), v[..v.find(']').unwrap()].to_string());
        }
    }
    out
}

#[test]
fn help_shows_the_cores_defaults_and_names() {
    use sketchx::names::{DEFAULT_CONTROLNET, DEFAULT_DEVICE, DEFAULT_MODEL};
    use sketchx::request::GenerationRequest;
    use sketchx::sampling::schedulers::SchedulerKind;
    use sketchx::settings::DEFAULT_OUTPUT_DIR;

    let o = Command::new(generate_bin()).arg("--help").output().unwrap();
    assert!(o.status.success());
    let help = String::from_utf8(o.stdout).unwrap();
    let got = help_defaults(&help);
    let d = GenerationRequest::DEFAULT;
    let want = [
        ("temperature", d.temperature.to_string()),
        ("guidance-scale", d.guidance_scale.to_string()),
        ("num-images", d.num_images.to_string()),
        ("steps", d.steps.to_string()),
        ("scheduler", d.scheduler.to_string()),
        ("preprocess", d.preprocess.to_string()),
        ("model", DEFAULT_MODEL.to_string()),
        ("controlnet", DEFAULT_CONTROLNET.to_string()),
        ("out", DEFAULT_OUTPUT_DIR.to_string()),
        ("device", DEFAULT_DEVICE.to_string()),
    ];
    for (flag, value) in &want {
        assert_eq!(got.get(*flag), Some(value), "--{flag} in:\n{help}");
    }
    // Parsed back, each default is the core's value (not only its spelling).
    assert_eq!(got["temperature"].parse::<f64>().unwrap(), d.temperature);
    assert_eq!(
        got["guidance-scale"].parse::<f64>().unwrap(),
        d.guidance_scale
    );
    for name in SchedulerKind::names() {
        assert!(help.contains(name), "{name} missing from:\n{help}");
    }
}

#[test]
fn scheduler_and_preprocess_names_ignore_case() {
    let out = scratch_dir("cli-case");
    let sketch = fixtures().join("sketches/house_black_on_white.png");
    let o = run(&[
        "--sketch",
        sketch.to_str().unwrap(),
        "--steps",
        "1",
        "--width",
        "64",
        "--height",
        "64",
        "--seed",
        "1",
        "--scheduler",
        "DDIM",
        "--preprocess",
        " Scribble ",
        "--device",
        "CPU",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&["--sketch", sketch.to_str().unwrap(), "--scheduler", "plms"]);
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("scheduler") && stderr.contains("euler_a"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(out);
}

/// Runs a two-step LCM generation of one 64x64 image (seed 3) with `extra` flags; returns the PNG's pixels.
fn lcm_image(extra: &[&str]) -> Vec<u8> {
    // One directory per call: tests run in parallel and each removes its own.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out = scratch_dir(&format!("cli-lora-{n}"));
    let sketch = fixtures().join("sketches/house_black_on_white.png");
    let mut args = vec![
        "--sketch",
        sketch.to_str().unwrap(),
        "--prompt",
        "a house",
        "--scheduler",
        "lcm",
        "--steps",
        "2",
        "--seed",
        "3",
        "--width",
        "64",
        "--height",
        "64",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = run(&args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let stdout = String::from_utf8(o.stdout).unwrap();
    let path = PathBuf::from(stdout.lines().next().unwrap());
    let pixels = image::open(&path).unwrap().to_rgb8().into_raw();
    std::fs::remove_dir_all(out).unwrap();
    pixels
}

#[test]
fn a_lora_with_lcm_changes_the_image() {
    let plain = lcm_image(&[]);
    let with_lora = lcm_image(&["--lora", "tests/fixtures/lora/kohya.safetensors:0.6"]);
    assert_ne!(plain, with_lora);
    // The default scale is 1, so the same LoRA at 1 differs from 0.6, and scale 0 changes nothing.
    let full = lcm_image(&["--lora", "tests/fixtures/lora/kohya.safetensors"]);
    assert_ne!(full, with_lora);
    let zero = lcm_image(&["--lora", "tests/fixtures/lora/kohya.safetensors:0"]);
    assert_eq!(zero, plain);
}

#[test]
fn the_few_step_request_flags_are_accepted() {
    let plain = lcm_image(&[]);
    let trailing = lcm_image(&[
        "--timestep-spacing",
        "trailing",
        "--eta",
        "0.3",
        "--vae",
        "full",
    ]);
    assert_eq!(plain.len(), trailing.len());
    let tiny = lcm_image(&["--tiny-vae", "tests/fixtures/tiny-taesd", "--vae", "tiny"]);
    assert_eq!(plain.len(), tiny.len());
}

#[test]
fn a_bad_lora_names_the_file_or_the_field() {
    let sketch = fixtures().join("sketches/house_black_on_white.png");
    let base = ["--sketch", sketch.to_str().unwrap(), "--steps", "1"];
    for (lora, named) in [
        (
            "tests/fixtures/lora/nope.safetensors",
            "tests/fixtures/lora/nope.safetensors",
        ),
        ("tests/fixtures/lora/kohya.safetensors:42", "loras.scale"),
        (
            "tests/fixtures/lora/bad/unknown_key.safetensors",
            "unknown_key.safetensors",
        ),
    ] {
        let mut args = base.to_vec();
        args.extend_from_slice(&["--lora", lora]);
        let o = run(&args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{lora}");
        assert!(stderr.contains(named), "{lora}: {stderr}");
    }
    let o = run(&["--sketch", sketch.to_str().unwrap(), "--eta", "2"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(stderr.contains("eta"), "{stderr}");
}

#[test]
fn embeddings_and_clip_skip_change_the_image_and_bad_ones_are_named() {
    let ti = "tests/fixtures/formats/textual_inversion";
    // The negative prompt uses an embedding (lcm_image's prompt is "a house").
    let prompt = ["--negative-prompt", "tinyneg, lowres"];
    let plain = lcm_image(&prompt);
    let neg = format!("{ti}/tiny-neg.safetensors:tinyneg");
    let cat = format!("{ti}/learned_embeds.safetensors");
    let mut args = prompt.to_vec();
    args.extend_from_slice(&["--embedding", &neg, "--embedding", &cat]);
    let with_ti = lcm_image(&args);
    assert_ne!(plain, with_ti);
    args.extend_from_slice(&["--clip-skip", "1"]);
    assert_ne!(lcm_image(&args), with_ti);

    let sketch = fixtures().join("sketches/house_black_on_white.png");
    let base = ["--sketch", sketch.to_str().unwrap(), "--steps", "1"];
    let taken = format!("{cat}:cat");
    let bare_neg = format!("{ti}/tiny-neg.safetensors");
    for (extra, named) in [
        (
            ["--embedding", taken.as_str()],
            "learned_embeds.safetensors",
        ),
        (["--embedding", bare_neg.as_str()], "emb_params"),
        (["--embedding", "tests/fixtures/nope.pt:tok"], "nope.pt"),
        (["--clip-skip", "13"], "clip_skip"),
    ] {
        let mut args = base.to_vec();
        args.extend_from_slice(&extra);
        let o = run(&args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{extra:?}");
        assert!(stderr.contains(named), "{extra:?}: {stderr}");
    }
}

/// The pixels `generate` writes for a tiny 2-step request with `args` (the model and ControlNet flags included).
fn image_with(args: &[&str]) -> Vec<u8> {
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out = scratch_dir(&format!("cli-single-file-{n}"));
    let sketch = fixtures().join("sketches/house_black_on_white.png");
    let o = Command::new(generate_bin())
        .args([
            "--sketch",
            sketch.to_str().unwrap(),
            "--prompt",
            "a house",
            "--steps",
            "2",
        ])
        .args([
            "--seed",
            "3",
            "--width",
            "64",
            "--height",
            "64",
            "--out",
            out.to_str().unwrap(),
        ])
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{args:?}: {stderr}");
    let stdout = String::from_utf8(o.stdout).unwrap();
    let pixels = image::open(stdout.lines().next().unwrap())
        .unwrap()
        .to_rgb8()
        .into_raw();
    std::fs::remove_dir_all(out).unwrap();
    pixels
}

/// `--model` and `--controlnet` take single files (with `--model-config` for the tiny sizes), `--vae PATH` swaps the
/// VAE while `--vae full|tiny` still picks the decoder, and a file of another family fails naming file and key.
#[test]
fn single_files_and_a_vae_path_are_accepted() {
    let f = |p: &str| fixtures().join(p).to_string_lossy().into_owned();
    let (folder, folder_cn) = (f("tiny-sd"), f("tiny-controlnet"));
    let folders = image_with(&[
        "--model",
        &folder,
        "--controlnet",
        &folder_cn,
        "--vae",
        "full",
    ]);
    let (file, pth) = (
        f("formats/single_file/tiny-sd.safetensors"),
        f("formats/single_file/tiny-controlnet.pth"),
    );
    let files = image_with(&[
        "--model",
        &file,
        "--model-config",
        &folder,
        "--controlnet",
        &pth,
    ]);
    assert_eq!(folders, files);
    let vae = f("formats/single_file/tiny-vae-alt.safetensors");
    let swapped = image_with(&[
        "--model",
        &folder,
        "--controlnet",
        &folder_cn,
        "--vae",
        &vae,
    ]);
    assert_ne!(folders, swapped);
    let sketch = fixtures().join("sketches/house_black_on_white.png");
    let o = Command::new(generate_bin())
        .args(["--sketch", sketch.to_str().unwrap(), "--steps", "1"])
        .args([
            "--model",
            &f("formats/bad/sdxl.safetensors"),
            "--controlnet",
            &folder_cn,
        ])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains("sdxl.safetensors") && stderr.contains("conditioner.embedders."),
        "{stderr}"
    );
}
