//! Parity of the few-step samplers with diffusers 0.42.1: `LCMScheduler`, `TCDScheduler` (eta 0.3, 0 and 1), and
//! DDIM / Euler / Euler Ancestral with `timestep_spacing="trailing"` (built with `from_config(config, **overrides)`).
//!
//! References come from `tools/fixturegen/fewstep.py` (`tests/fixtures/sampling/fewstep_schedulers.json`):
//! schedules for several configs and step counts, and trajectories with every step's `prev_sample` and x0
//! (LCM `denoised`, TCD `pred_noised_sample`, the others' `pred_original_sample`), with the fake model
//! `0.1 * scaled_input + F` and the torch generator of `sampling/schedulers.json`.

mod common;
use common::fixtures as fixtures_dir;

use std::str::FromStr;

use candle_core::{Device, Tensor};
use serde_json::Value;
use sketchx::sampling::rng::TorchRng;
use sketchx::sampling::schedulers::{
    lcm_boundary_scalings, Scheduler, SchedulerConfig, SchedulerKind, TimestepSpacing,
};
use sketchx::Error;

fn load() -> Value {
    let path = fixtures_dir().join("sampling/fewstep_schedulers.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).expect("fewstep_schedulers.json is valid JSON")
}

/// The fixture's numbers are float32 values; round through f32 so JSON parsing's last f64 bit does not matter.
fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| f64::from(x.as_f64().unwrap() as f32))
        .collect()
}

fn tensor_f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|&v| f64::from(v))
        .collect()
}

/// The scheduler a fixture entry describes: its kind's diffusers class, `from_config` overrides and step
/// `eta`, on the named config.
fn scheduler(fixtures: &Value, entry: &Value) -> (Scheduler, String) {
    let kind_name = entry["kind"].as_str().unwrap();
    // Trajectory kinds are described in `kinds`; schedule entries name a scheduler (`lcm`, `tcd`) or a kind and
    // carry their own `config_overrides`.
    let spec = &fixtures["kinds"][kind_name];
    let kind = match spec["class"].as_str() {
        Some(class) => SchedulerKind::ALL
            .into_iter()
            .find(|k| k.diffusers_class() == class)
            .unwrap_or_else(|| panic!("no kind for {class}")),
        None => SchedulerKind::from_str(kind_name).unwrap(),
    };
    let overrides = if entry["config_overrides"].is_object() {
        &entry["config_overrides"]
    } else {
        &spec["from_config_overrides"]
    };
    let name = entry["config"].as_str().unwrap();
    let json = serde_json::to_string(&fixtures["configs"][name]).unwrap();
    let mut config = SchedulerConfig::from_json_str(&json, name).unwrap();
    if let Some(spacing) = overrides["timestep_spacing"].as_str() {
        config = config.with_timestep_spacing(TimestepSpacing::from_str(spacing).unwrap());
    }
    let eta = spec["step_kwargs"]["eta"].as_f64().unwrap_or(0.0);
    let steps = entry["steps"].as_u64().unwrap() as usize;
    let label = format!("{kind_name} / {name} / {steps} steps");
    let sched =
        Scheduler::with_eta(kind, &config, steps, eta).unwrap_or_else(|e| panic!("{label}: {e}"));
    (sched, label)
}

/// Bound on the relative difference of sigmas (a few float32 ulps), as `scheduler_parity.rs`.
const SIGMA_BOUND: f64 = 1e-6;
/// Bound on trajectory values relative to the largest reference magnitude (at least 1), as `scheduler_parity.rs`.
const SAMPLE_BOUND: f64 = 1e-5;

/// Largest relative difference, relative to max(|expected|, 1).
fn max_rel_diff(got: &[f64], expected: &[f64]) -> f64 {
    got.iter()
        .zip(expected)
        .map(|(g, e)| (g - e).abs() / e.abs().max(1.0))
        .fold(0.0, f64::max)
}

/// Largest difference relative to the largest reference magnitude (at least 1); NaN matches NaN.
fn scaled_diff(got: &[f64], expected: &[f64]) -> f64 {
    assert_eq!(got.len(), expected.len(), "length");
    let scale = expected.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    got.iter()
        .zip(expected)
        .map(|(g, e)| {
            if g.is_nan() && e.is_nan() {
                0.0
            } else {
                (g - e).abs() / scale
            }
        })
        .fold(0.0, f64::max)
}

#[test]
fn fewstep_schedules_match_diffusers() {
    let fixtures = load();
    let schedules = fixtures["schedules"].as_array().unwrap();
    let mut worst = [0.0f64; 2];
    for entry in schedules {
        let (sched, label) = scheduler(&fixtures, entry);
        let ts = f64s(&entry["timesteps"]);
        assert_eq!(sched.timesteps(), ts.as_slice(), "{label}: timesteps");
        let mut sig_diff = 0.0;
        if let Some(sigmas) = entry["sigmas"].as_array() {
            let expected: Vec<f64> = sigmas
                .iter()
                .map(|v| f64::from(v.as_f64().unwrap() as f32))
                .collect();
            let got: Vec<f64> = sched.sigmas().iter().map(|&s| f64::from(s)).collect();
            assert_eq!(got.len(), expected.len(), "{label}: sigma count");
            sig_diff = max_rel_diff(&got, &expected);
        } else {
            assert!(sched.sigmas().is_empty(), "{label}: unexpected sigmas");
        }
        let init = f64::from(entry["init_noise_sigma"].as_f64().unwrap() as f32);
        let init_diff = (sched.init_noise_sigma() - init).abs() / init.abs().max(1.0);
        assert!(
            sig_diff <= SIGMA_BOUND && init_diff <= SIGMA_BOUND,
            "{label}: sigmas differ by {sig_diff:e}, init_noise_sigma by {init_diff:e}"
        );
        worst = [worst[0].max(sig_diff), worst[1].max(init_diff)];
    }
    println!(
        "{} schedules: timesteps identical; max relative difference of sigmas {:e}, init_noise_sigma {:e}",
        schedules.len(),
        worst[0],
        worst[1]
    );
}

fn fake_model_bias(numel: usize) -> Vec<f32> {
    (0..numel)
        .map(|i| ((i * 37) % 101) as f32 / 101.0f32 - 0.5f32)
        .collect()
}

#[test]
fn fewstep_trajectories_match_diffusers() {
    let fixtures = load();
    let device = Device::Cpu;
    let mut worst: std::collections::BTreeMap<String, (f64, f64, String)> = Default::default();
    let trajectories = fixtures["trajectories"].as_array().unwrap();
    for entry in trajectories {
        let (mut sched, label) = scheduler(&fixtures, entry);
        let shape: Vec<usize> = entry["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let numel: usize = shape.iter().product();
        let mut rng = TorchRng::new(entry["seed"].as_u64().unwrap());
        let mut latents = rng
            .randn(&shape, &device)
            .unwrap()
            .affine(sched.init_noise_sigma(), 0.0)
            .unwrap();
        let initial = scaled_diff(&tensor_f64s(&latents), &f64s(&entry["initial"]));
        assert!(
            initial <= SAMPLE_BOUND,
            "{label}: initial latents differ by {initial:e}"
        );
        let bias = Tensor::from_vec(fake_model_bias(numel), shape.as_slice(), &device).unwrap();
        let per_step = entry["per_step"].as_array().unwrap();
        assert_eq!(
            sched.timesteps().len(),
            per_step.len(),
            "{label}: step count"
        );
        let (mut prev_worst, mut x0_worst) = (0.0f64, 0.0f64);
        for (i, step) in per_step.iter().enumerate() {
            assert_eq!(
                sched.timesteps()[i],
                step["timestep"].as_f64().unwrap(),
                "{label}: timestep {i}"
            );
            let input = sched.scale_model_input(&latents, i).unwrap();
            let output = (input.affine(0.1, 0.0).unwrap() + &bias).unwrap();
            let out = sched.step_output(&output, i, &latents, &mut rng).unwrap();
            let x0_key = ["denoised", "pred_noised_sample", "pred_original_sample"]
                .into_iter()
                .find(|k| !step[*k].is_null())
                .unwrap_or_else(|| panic!("{label}: step {i} has no x0"));
            let x0 = scaled_diff(&tensor_f64s(&out.x0), &f64s(&step[x0_key]));
            let prev = scaled_diff(&tensor_f64s(&out.prev_sample), &f64s(&step["prev_sample"]));
            assert!(
                x0 <= SAMPLE_BOUND && prev <= SAMPLE_BOUND,
                "{label} step {i}: {x0_key} differs by {x0:e}, prev_sample by {prev:e}"
            );
            prev_worst = prev_worst.max(prev);
            x0_worst = x0_worst.max(x0);
            latents = out.prev_sample;
        }
        let fin = scaled_diff(&tensor_f64s(&latents), &f64s(&entry["final"]));
        assert!(
            fin <= SAMPLE_BOUND,
            "{label}: final sample differs by {fin:e}"
        );
        // The generator must stay aligned with diffusers' after the loop.
        let after: Vec<f32> = f64s(&entry["rng_after"])
            .iter()
            .map(|&v| v as f32)
            .collect();
        assert_eq!(
            rng.randn_vec(16),
            after,
            "{label}: RNG consumption differs from diffusers"
        );
        let w = worst
            .entry(entry["kind"].as_str().unwrap().to_string())
            .or_default();
        if prev_worst.max(x0_worst) >= w.0.max(w.1) {
            *w = (prev_worst, x0_worst, label);
        }
    }
    println!(
        "{} trajectories compared; worst relative differences (prev_sample, x0):",
        trajectories.len()
    );
    for (kind, (prev, x0, label)) in worst {
        println!("  {kind}: {prev:e}, {x0:e} ({label})");
    }
}

#[test]
fn lcm_boundary_scalings_match_diffusers() {
    let fixtures = load();
    for entry in fixtures["lcm_boundary_scalings"].as_array().unwrap() {
        let t = entry["timestep"].as_i64().unwrap();
        let (c_skip, c_out) = lcm_boundary_scalings(t, 10.0);
        for (name, got, want) in [
            ("c_skip", c_skip, &entry["c_skip"]),
            ("c_out", c_out, &entry["c_out"]),
        ] {
            let want = want.as_f64().unwrap() as f32;
            let rel = (f64::from(got) - f64::from(want)).abs() / f64::from(want.abs()).max(1e-30);
            assert!(
                rel <= SIGMA_BOUND,
                "t={t}: {name} {got:e} vs {want:e} ({rel:e})"
            );
        }
    }
}

#[test]
fn fewstep_options_are_checked() {
    let cfg = SchedulerConfig::default();
    // eta outside [0, 1] names the request field.
    for eta in [-0.1, 1.5, f64::NAN] {
        assert!(matches!(
            Scheduler::with_eta(SchedulerKind::Tcd, &cfg, 4, eta),
            Err(Error::InvalidRequest { field: "eta", .. })
        ));
    }
    // More steps than the distillation schedule (original_inference_steps, default 50) is a request error.
    for kind in [SchedulerKind::Lcm, SchedulerKind::Tcd] {
        assert!(Scheduler::new(kind, &cfg, 50).is_ok());
        assert!(matches!(
            Scheduler::new(kind, &cfg, 51),
            Err(Error::InvalidRequest { field: "steps", .. })
        ));
        assert!(matches!(
            Scheduler::new(kind, &cfg, 0),
            Err(Error::InvalidRequest { field: "steps", .. })
        ));
    }
    let cfg = SchedulerConfig::from_json_str(r#"{"original_inference_steps": 2000}"#, "cfg.json")
        .unwrap();
    assert!(matches!(
        Scheduler::new(SchedulerKind::Lcm, &cfg, 4),
        Err(Error::UnsupportedModel { path, .. }) if path == "cfg.json"
    ));
    assert!(matches!(
        SchedulerConfig::from_json_str(r#"{"original_inference_steps": 0}"#, "cfg.json"),
        Err(Error::MalformedFile { .. })
    ));
    // trained_betas shorter than the schedule: an error naming the file, not an index panic.
    let cfg =
        SchedulerConfig::from_json_str(r#"{"trained_betas": [0.1, 0.2]}"#, "cfg.json").unwrap();
    for kind in [SchedulerKind::Lcm, SchedulerKind::Tcd] {
        assert!(matches!(
            Scheduler::new(kind, &cfg, 4),
            Err(Error::UnsupportedModel { path, .. }) if path == "cfg.json"
        ));
    }
    let cfg = SchedulerConfig::from_json_str(r#"{"thresholding": true}"#, "cfg.json").unwrap();
    assert!(matches!(
        Scheduler::new(SchedulerKind::Lcm, &cfg, 4),
        Err(Error::UnsupportedModel { .. })
    ));
    // LCM's class defaults: SD's beta schedule when the file sets none, unlike DDIM's linear default.
    let lcm = Scheduler::new(SchedulerKind::Lcm, &SchedulerConfig::default(), 4).unwrap();
    let ddim = Scheduler::new(SchedulerKind::Ddim, &SchedulerConfig::default(), 4).unwrap();
    assert_ne!(lcm.alphas_cumprod(), ddim.alphas_cumprod());
    let sd = r#"{"beta_schedule":"scaled_linear","beta_start":0.00085,"beta_end":0.012}"#;
    let sd = SchedulerConfig::from_json_str(sd, "sd.json").unwrap();
    assert_eq!(
        lcm.alphas_cumprod(),
        Scheduler::new(SchedulerKind::Ddim, &sd, 4)
            .unwrap()
            .alphas_cumprod()
    );
    // Names.
    for kind in [SchedulerKind::Lcm, SchedulerKind::Tcd] {
        assert_eq!(SchedulerKind::from_str(kind.as_str()).unwrap(), kind);
    }
    assert_eq!(
        TimestepSpacing::from_str(" Trailing ").unwrap(),
        TimestepSpacing::Trailing
    );
    assert!(matches!(
        TimestepSpacing::from_str("uniform"),
        Err(Error::InvalidRequest {
            field: "timestep_spacing",
            ..
        })
    ));
}

/// DDIM with `eta > 0` (no diffusers trajectory in the fixtures): it draws one noise tensor of the model output's
/// shape per step, as diffusers' `randn_tensor` does, and departs from the deterministic `eta = 0` run; at
/// `eta = 0` it draws nothing.
#[test]
fn ddim_eta_draws_noise_every_step() {
    let device = Device::Cpu;
    let fixtures = load();
    let json = serde_json::to_string(&fixtures["configs"]["tiny_sd"]).unwrap();
    let config = SchedulerConfig::from_json_str(&json, "tiny_sd").unwrap();
    let shape = [1usize, 4, 3, 4];
    let bias = Tensor::from_vec(fake_model_bias(48), &shape, &device).unwrap();
    let run = |eta: f64| {
        let mut sched = Scheduler::with_eta(SchedulerKind::Ddim, &config, 4, eta).unwrap();
        let mut rng = TorchRng::new(7);
        let mut latents = rng.randn(&shape, &device).unwrap();
        for i in 0..sched.timesteps().len() {
            let output = (latents.affine(0.1, 0.0).unwrap() + &bias).unwrap();
            latents = sched.step(&output, i, &latents, &mut rng).unwrap();
        }
        (tensor_f64s(&latents), rng.randn_vec(16))
    };
    let (plain, plain_next) = run(0.0);
    let (noisy, noisy_next) = run(0.5);
    let mut expected = TorchRng::new(7);
    expected.randn(&shape, &device).unwrap();
    assert_eq!(plain_next, expected.clone().randn_vec(16));
    for _ in 0..4 {
        expected.randn(&shape, &device).unwrap();
    }
    assert_eq!(noisy_next, expected.randn_vec(16));
    assert!(scaled_diff(&noisy, &plain) > 1e-3, "eta had no effect");
    assert!(noisy.iter().all(|v| v.is_finite()));
}
