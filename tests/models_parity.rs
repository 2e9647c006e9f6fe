//! Parity of each network with diffusers / transformers on the tiny fixture models: the same weights and inputs
//! (saved by `tools/fixturegen/models.py` in `reference/components.safetensors`) must give the same outputs.

mod common;
use common::*;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use sketchx::models::clip::{ClipTextConfig, ClipTextModel};
use sketchx::models::config::ConfigFile;
use sketchx::models::controlnet::ControlNet;
use sketchx::models::loader::{read_json, weights, ModelSource, Resolver};
use sketchx::models::unet::UNet;
use sketchx::models::vae::Vae;
use sketchx::precision::{Precision, Weights};

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

/// The weights file at `path`, in f32 on the CPU.
fn f32_weights(path: &std::path::Path) -> Weights<'static> {
    weights(path, Precision::F32, &Device::Cpu).unwrap()
}

/// A parsed config named `origin` in errors.
fn config(value: serde_json::Value, origin: &str) -> ConfigFile {
    ConfigFile::from_value(value, origin).unwrap()
}

fn sd() -> Resolver {
    Resolver::new(ModelSource::Local(fixtures().join("tiny-sd"))).unwrap()
}

fn controlnet(dir: &str) -> ControlNet {
    let r = Resolver::new(ModelSource::Local(fixtures().join(dir))).unwrap();
    let cfg: serde_json::Value = r.json("config.json").unwrap();
    let w = r.weights("", None).unwrap();
    ControlNet::load(f32_weights(&w), &config(cfg.clone(), "config.json")).unwrap()
}

#[test]
fn text_encoder_matches_transformers() {
    let r = refs();
    let sd = sd();
    let cfg: ClipTextConfig = read_json(&sd.get("text_encoder/config.json").unwrap()).unwrap();
    let w = sd.weights("text_encoder", None).unwrap();
    let model = ClipTextModel::load(f32_weights(&w), &cfg, "cfg").unwrap();
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
    let unet = UNet::load(f32_weights(&w), &config(cfg.clone(), "unet/config.json")).unwrap();
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
    let vae = Vae::load(f32_weights(&w), &config(cfg.clone(), "vae/config.json")).unwrap();
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
    let unet = UNet::load(
        f32_weights(&picked),
        &config(cfg.clone(), "unet/config.json"),
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

/// The tiny VAE of `dir` (`tiny-sd`: 4 blocks, sample_size 64; `tiny-sd-alt`: 2 blocks, sample_size 32).
fn vae(dir: &str) -> Vae {
    let r = Resolver::new(ModelSource::Local(fixtures().join(dir))).unwrap();
    let cfg: serde_json::Value = r.json("vae/config.json").unwrap();
    let w = r.weights("vae", None).unwrap();
    Vae::load(f32_weights(&w), &config(cfg.clone(), "vae/config.json")).unwrap()
}

#[test]
fn tiled_vae_decode_matches_diffusers_enable_tiling() {
    let r = candle_core::safetensors::load(
        fixtures().join("reference/vae_tiling.safetensors"),
        &Device::Cpu,
    )
    .expect("reference tensors (run tools/make_fixtures.py)");
    // (case, model, tile geometry from its config.json: latent tile, stride, blended px, kept px)
    for (case, dir, geometry) in [
        ("tiny", "tiny-sd", (8, 6, 16, 48)),
        ("tiny_stride_multiple", "tiny-sd", (8, 6, 16, 48)),
        ("alt", "tiny-sd-alt", (16, 12, 8, 24)),
    ] {
        let vae = vae(dir);
        let t = vae.tiling().unwrap();
        assert_eq!(
            (t.latent_size, t.latent_stride, t.blend_extent, t.row_limit),
            geometry,
            "{case}"
        );
        let latents = &r[&format!("{case}.latents")];
        let (_, _, h, w) = latents.dims4().unwrap();
        assert!(
            h > t.latent_size && w > t.latent_size && h != w,
            "{case}: tiled both ways"
        );
        let tiled = vae.decode_tiled(latents).unwrap();
        assert_close(
            &format!("tiled vae decode {case}"),
            &tiled,
            &r[&format!("{case}.image")],
            1e-5,
        );
        // Tiling changes the pixels (each tile's group norms and attention see only the tile): the reference
        // is not the untiled decode, so this test could not pass with tiling ignored.
        let (d, _) = max_diff(&vae.decode(latents).unwrap(), &tiled);
        assert!(d > 1e-2, "{case}: tiled equals untiled (max |diff| {d})");
    }
}

#[test]
fn tiled_vae_decode_of_one_tile_or_less_is_the_untiled_decode() {
    // Smooth, deterministic latents of roughly unit scale.
    let all = (Tensor::arange(0f32, (4 * 20 * 20) as f32, &Device::Cpu)
        .unwrap()
        .reshape((1, 4, 20, 20))
        .unwrap()
        * 0.37)
        .unwrap()
        .sin()
        .unwrap();
    for (dir, sizes) in [
        ("tiny-sd", [(8, 12), (8, 8), (5, 7), (1, 1)]),
        ("tiny-sd-alt", [(17, 16), (16, 16), (16, 9), (2, 2)]),
    ] {
        let vae = vae(dir);
        let t = vae.tiling().unwrap();
        for (h, w) in sizes {
            let latents = all.narrow(2, 0, h).unwrap().narrow(3, 0, w).unwrap();
            let expect_tiled = h > t.latent_size || w > t.latent_size;
            assert_eq!(t.applies_to(h, w), expect_tiled);
            let plain = vae.decode(&latents).unwrap();
            let tiled = vae.decode_tiled(&latents).unwrap();
            assert_eq!(plain.dims(), tiled.dims());
            let (d, _) = max_diff(&plain, &tiled);
            if expect_tiled {
                // Just over one tile along one side: tiled, and different.
                assert!(d > 1e-2, "{dir} {h}x{w}: tiled equals untiled");
            } else {
                assert_eq!(
                    d, 0.0,
                    "{dir} {h}x{w}: within one tile, must be the untiled decode exactly"
                );
            }
        }
    }
}

#[test]
fn vae_whose_sample_size_gives_no_usable_tiles_is_refused_for_tiling_only() {
    let sd = sd();
    let w = sd.weights("vae", None).unwrap();
    let mut cfg: serde_json::Value = sd.json("vae/config.json").unwrap();
    for (bad, needle) in [
        (serde_json::json!(8), "stride of 0"),
        (serde_json::json!([64, 96]), "not one size"),
        (serde_json::json!(72), "requested size"),
    ] {
        cfg["sample_size"] = bad;
        let vae = Vae::load(f32_weights(&w), &config(cfg.clone(), "vae/config.json")).unwrap();
        let err = vae.tiling().unwrap_err();
        assert!(
            matches!(&err, sketchx::Error::UnsupportedModel { path, message }
                if path == "vae/config.json" && message.contains(needle)),
            "{err}"
        );
        let latents = Tensor::zeros((1, 4, 9, 9), DType::F32, &Device::Cpu).unwrap();
        assert!(vae.decode_tiled(&latents).is_err());
        // Untiled decoding does not need the tile size.
        assert_eq!(vae.decode(&latents).unwrap().dims(), &[1, 3, 72, 72]);
    }
    // A list of one size is that size (diffusers reads sample_size[0] for the latent tile).
    cfg["sample_size"] = serde_json::json!([64, 64]);
    let vae = Vae::load(f32_weights(&w), &config(cfg.clone(), "vae/config.json")).unwrap();
    assert_eq!(vae.tiling().unwrap().latent_size, 8);
}

/// The `VarBuilder` constructors (`new`) and the `Weights` constructors (`load`) build the same networks.
#[test]
fn var_builder_and_weights_constructors_agree() {
    use sketchx::models::loader::var_builder;
    let r = refs();
    let sd = sd();
    let cfg: serde_json::Value = sd.json("vae/config.json").unwrap();
    let w = sd.weights("vae", None).unwrap();
    let vb = var_builder(&w, DType::F32, &Device::Cpu).unwrap();
    let old = Vae::new(vb, &cfg, "vae/config.json").unwrap();
    let new = Vae::load(f32_weights(&w), &config(cfg, "vae/config.json"));
    let (a, b) = (
        old.decode(&r["vae.latents"]).unwrap(),
        new.unwrap().decode(&r["vae.latents"]).unwrap(),
    );
    assert_eq!(max_diff(&a, &b).0, 0.0);

    let cfg: serde_json::Value = sd.json("unet/config.json").unwrap();
    let w = sd.weights("unet", None).unwrap();
    let vb = var_builder(&w, DType::F32, &Device::Cpu).unwrap();
    let old = UNet::new(vb, &cfg, "unet/config.json").unwrap();
    let new = UNet::load(f32_weights(&w), &config(cfg, "unet/config.json")).unwrap();
    let t = r["cn.timestep"].to_vec1::<f32>().unwrap()[0] as f64;
    let run = |u: &UNet| {
        u.forward(&r["cn.sample"], t, &r["text.hidden"], None, None)
            .unwrap()
    };
    assert_eq!(max_diff(&run(&old), &run(&new)).0, 0.0);
}
