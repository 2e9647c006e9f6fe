//! Parity of each network with diffusers / transformers on the tiny fixture models: the same weights and inputs
//! (saved by `tools/fixturegen/models.py` in `reference/components.safetensors`) must give the same outputs.

mod common;
use common::*;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use sketchx::models::clip::{ClipTextConfig, ClipTextModel};
use sketchx::models::controlnet::ControlNet;
use sketchx::models::loader::{read_json, var_builder, ModelSource, Resolver};
use sketchx::models::unet::UNet;
use sketchx::models::vae::Vae;

fn refs() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join("reference/components.safetensors"),
        &Device::Cpu,
    )
    .expect("reference tensors (run tools/make_fixtures.py)")
}

/// Largest absolute difference, and the largest absolute reference value (for scale).
fn max_diff(ours: &Tensor, theirs: &Tensor) -> (f32, f32) {
    assert_eq!(ours.dims(), theirs.dims(), "shape mismatch");
    let a = ours
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let b = theirs
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let m = b.iter().map(|y| y.abs()).fold(0f32, f32::max);
    (d, m)
}

fn assert_close(name: &str, ours: &Tensor, theirs: &Tensor, tol: f32) {
    let (d, m) = max_diff(ours, theirs);
    eprintln!("{name}: max |diff| = {d:.3e} (max |ref| = {m:.3e})");
    assert!(
        d <= tol * m.max(1.0),
        "{name}: max |diff| {d} exceeds {tol} x {m}"
    );
}

fn sd() -> Resolver {
    Resolver::new(ModelSource::Local(fixtures().join("tiny-sd"))).unwrap()
}

fn controlnet(dir: &str) -> ControlNet {
    let r = Resolver::new(ModelSource::Local(fixtures().join(dir))).unwrap();
    let cfg: serde_json::Value = r.json("config.json").unwrap();
    let w = r.weights("", None).unwrap();
    ControlNet::new(
        var_builder(&w, DType::F32, &Device::Cpu).unwrap(),
        &cfg,
        "config.json",
    )
    .unwrap()
}

#[test]
fn text_encoder_matches_transformers() {
    let r = refs();
    let sd = sd();
    let cfg: ClipTextConfig = read_json(&sd.get("text_encoder/config.json").unwrap()).unwrap();
    let w = sd.weights("text_encoder", None).unwrap();
    let model = ClipTextModel::new(
        var_builder(&w, DType::F32, &Device::Cpu).unwrap(),
        &cfg,
        "cfg",
    )
    .unwrap();
    let ids = r["text.input_ids"].to_dtype(DType::U32).unwrap();
    let out = model.forward(&ids).unwrap();
    assert_close("text encoder", &out, &r["text.hidden"], 1e-5);
}

#[test]
fn controlnet_matches_diffusers_plain_and_guess_mode() {
    let r = refs();
    let cn = controlnet("tiny-controlnet");
    let t = r["cn.timestep"].to_vec1::<f32>().unwrap()[0] as f64;
    for (name, guess, scale) in [("plain", false, 0.8), ("guess", true, 1.0)] {
        let out = cn
            .forward(
                &r["cn.sample"],
                t,
                &r["text.hidden"],
                &r["cn.cond"],
                scale,
                guess,
            )
            .unwrap();
        for (i, d) in out.down.iter().enumerate() {
            assert_close(
                &format!("controlnet {name} down {i}"),
                d,
                &r[&format!("cn.{name}.down.{i}")],
                1e-5,
            );
        }
        assert_close(
            &format!("controlnet {name} mid"),
            &out.mid,
            &r[&format!("cn.{name}.mid")],
            1e-5,
        );
        assert_eq!(
            out.down.len(),
            r.keys()
                .filter(|k| k.starts_with(&format!("cn.{name}.down.")))
                .count()
        );
    }
}

#[test]
fn controlnet_bin_fallback_loads_the_same_weights() {
    let r = refs();
    let a = controlnet("tiny-controlnet");
    let b = controlnet("tiny-controlnet-bin");
    let t = r["cn.timestep"].to_vec1::<f32>().unwrap()[0] as f64;
    let x = a
        .forward(
            &r["cn.sample"],
            t,
            &r["text.hidden"],
            &r["cn.cond"],
            0.8,
            false,
        )
        .unwrap();
    let y = b
        .forward(
            &r["cn.sample"],
            t,
            &r["text.hidden"],
            &r["cn.cond"],
            0.8,
            false,
        )
        .unwrap();
    assert_close("bin vs safetensors", &x.mid, &y.mid, 0.0);
}

#[test]
fn unet_matches_diffusers_with_and_without_residuals() {
    let r = refs();
    let sd = sd();
    let cfg: serde_json::Value = sd.json("unet/config.json").unwrap();
    let w = sd.weights("unet", None).unwrap();
    let unet = UNet::new(
        var_builder(&w, DType::F32, &Device::Cpu).unwrap(),
        &cfg,
        "unet/config.json",
    )
    .unwrap();
    let cn = controlnet("tiny-controlnet");
    let t = r["cn.timestep"].to_vec1::<f32>().unwrap()[0] as f64;
    let res = cn
        .forward(
            &r["cn.sample"],
            t,
            &r["text.hidden"],
            &r["cn.cond"],
            0.8,
            false,
        )
        .unwrap();
    let out = unet
        .forward(
            &r["cn.sample"],
            t,
            &r["text.hidden"],
            Some(&res.down),
            Some(&res.mid),
        )
        .unwrap();
    assert_close("unet + controlnet", &out, &r["unet.out"], 1e-5);
    let plain = unet
        .forward(&r["cn.sample"], t, &r["text.hidden"], None, None)
        .unwrap();
    assert_close("unet", &plain, &r["unet.out_plain"], 1e-5);
    let (d, _) = max_diff(&out, &plain);
    assert!(
        d > 1e-2,
        "the ControlNet residuals must change the UNet's output (diff {d})"
    );
}

#[test]
fn vae_decode_matches_diffusers() {
    let r = refs();
    let sd = sd();
    let cfg: serde_json::Value = sd.json("vae/config.json").unwrap();
    let w = sd.weights("vae", None).unwrap();
    let vae = Vae::new(
        var_builder(&w, DType::F32, &Device::Cpu).unwrap(),
        &cfg,
        "vae/config.json",
    )
    .unwrap();
    assert_eq!(vae.scale_factor, 8);
    let out = vae.decode(&r["vae.latents"]).unwrap();
    assert_close("vae decode", &out, &r["vae.image"], 1e-5);
}

#[test]
fn fp16_variant_files_are_preferred_when_asked_and_upcast() {
    let r = refs();
    let dir = std::env::temp_dir().join(format!("sketchx-fp16-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("unet")).unwrap();
    let src = fixtures().join("tiny-sd/unet");
    std::fs::copy(src.join("config.json"), dir.join("unet/config.json")).unwrap();
    let weights = candle_core::safetensors::load(
        src.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let half: HashMap<String, Tensor> = weights
        .iter()
        .map(|(k, v)| (k.clone(), v.to_dtype(DType::F16).unwrap()))
        .collect();
    candle_core::safetensors::save(
        &half,
        dir.join("unet/diffusion_pytorch_model.fp16.safetensors"),
    )
    .unwrap();
    std::fs::write(
        dir.join("unet/diffusion_pytorch_model.safetensors"),
        b"not used",
    )
    .unwrap();

    let res = Resolver::new(ModelSource::Local(dir.clone())).unwrap();
    let picked = res.weights("unet", Some("fp16")).unwrap();
    assert!(
        picked.ends_with("diffusion_pytorch_model.fp16.safetensors"),
        "{picked:?}"
    );
    let plain = res.weights("unet", None).unwrap();
    assert!(
        plain.ends_with("diffusion_pytorch_model.safetensors"),
        "{plain:?}"
    );

    let cfg: serde_json::Value = res.json("unet/config.json").unwrap();
    let unet = UNet::new(
        var_builder(&picked, DType::F32, &Device::Cpu).unwrap(),
        &cfg,
        "unet/config.json",
    )
    .unwrap();
    let t = r["cn.timestep"].to_vec1::<f32>().unwrap()[0] as f64;
    let out = unet
        .forward(&r["cn.sample"], t, &r["text.hidden"], None, None)
        .unwrap();
    // f16 weights round to ~3 significant digits: close to, but not equal to, the f32 reference.
    assert_close("unet from fp16 weights", &out, &r["unet.out_plain"], 2e-2);
    std::fs::remove_dir_all(&dir).unwrap();
}
