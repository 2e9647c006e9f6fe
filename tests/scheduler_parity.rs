//! Parity of `sketchx::sampling::schedulers` with diffusers 0.42.1's EulerAncestralDiscreteScheduler,
//! EulerDiscreteScheduler and DDIMScheduler (built with `from_config`).
//!
//! References come from `tools/fixturegen/sampling.py` (`tests/fixtures/sampling/schedulers.json`): schedules
//! (timesteps, sigmas, init_noise_sigma) for several configs and step counts, and full trajectories with a fake
//! model `0.1 * scaled_input + F`, Euler-Ancestral noise coming from the torch generator.

mod common;
use common::fixtures as fixtures_dir;

use std::str::FromStr;

use candle_core::{Device, Tensor};
use serde_json::Value;
use sketchx::sampling::rng::TorchRng;
use sketchx::sampling::schedulers::{
    Scheduler, SchedulerConfig, SchedulerKind, MAX_TRAIN_TIMESTEPS,
};
use sketchx::Error;

fn load() -> Value {
    let path = fixtures_dir().join("sampling/schedulers.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).expect("schedulers.json is valid JSON")
}

/// The fixture's numbers are float32 values; round through f32 so JSON parsing's last f64 bit does not matter.
fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| f64::from(x.as_f64().unwrap() as f32))
        .collect()
}

fn config(fixtures: &Value, name: &str) -> SchedulerConfig {
    let json = serde_json::to_string(&fixtures["configs"][name]).unwrap();
    SchedulerConfig::from_json_str(&json, name).unwrap()
}

fn scheduler(fixtures: &Value, entry: &Value) -> (Scheduler, String) {
    let kind = SchedulerKind::from_str(entry["kind"].as_str().unwrap()).unwrap();
    let name = entry["config"].as_str().unwrap();
    let steps = entry["steps"].as_u64().unwrap() as usize;
    let label = format!("{kind} / {name} / {steps} steps");
    let sched = Scheduler::new(kind, &config(fixtures, name), steps)
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    (sched, label)
}

/// Bound on the relative difference of sigmas (a few float32 ulps).
const SIGMA_BOUND: f64 = 1e-6;

/// Largest relative difference, relative to max(|expected|, 1).
fn max_rel_diff(got: &[f64], expected: &[f64]) -> f64 {
    got.iter()
        .zip(expected)
        .map(|(g, e)| (g - e).abs() / e.abs().max(1.0))
        .fold(0.0, f64::max)
}

#[test]
fn schedules_match_diffusers() {
    let fixtures = load();
    let (mut inexact, mut max_diffs) = (0, [0.0f64; 3]);
    let schedules = fixtures["schedules"].as_array().unwrap();
    for entry in schedules {
        let (sched, label) = scheduler(&fixtures, entry);
        let ts = f64s(&entry["timesteps"]);
        assert_eq!(sched.timesteps().len(), ts.len(), "{label}: timestep count");
        let ts_diff = max_rel_diff(sched.timesteps(), &ts);
        let mut sig_diff = 0.0;
        if let Some(sigmas) = entry["sigmas"].as_array() {
            let expected: Vec<f64> = sigmas
                .iter()
                .map(|v| f64::from(v.as_f64().unwrap() as f32))
                .collect();
            let got: Vec<f64> = sched.sigmas().iter().map(|&s| f64::from(s)).collect();
            assert_eq!(got.len(), expected.len(), "{label}: sigma count");
            sig_diff = max_rel_diff(&got, &expected);
        }
        let init = f64::from(entry["init_noise_sigma"].as_f64().unwrap() as f32);
        let init_diff = (sched.init_noise_sigma() - init).abs() / init.abs().max(1.0);
        // Timesteps are exact, except Karras ones, which go through numpy's float32 log (which may differ from a
        // correctly rounded one by an ulp). Sigmas go through torch's CPU sqrt, which is not correctly rounded (MKL):
        // they may differ by an ulp or two.
        let ts_bound = if label.contains("karras") { 1e-6 } else { 0.0 };
        assert!(
            ts_diff <= ts_bound,
            "{label}: timesteps differ by {ts_diff:e}"
        );
        assert!(
            sig_diff <= SIGMA_BOUND && init_diff <= SIGMA_BOUND,
            "{label}: sigmas differ by {sig_diff:e}, init_noise_sigma by {init_diff:e}"
        );
        max_diffs = [
            max_diffs[0].max(ts_diff),
            max_diffs[1].max(sig_diff),
            max_diffs[2].max(init_diff),
        ];
        if ts_diff + sig_diff + init_diff > 0.0 {
            inexact += 1;
        }
    }
    println!(
        "{} schedules compared, {inexact} not bit-identical; max relative difference of timesteps {:e}, sigmas {:e}, \
         init_noise_sigma {:e}",
        schedules.len(),
        max_diffs[0],
        max_diffs[1],
        max_diffs[2]
    );
}

#[test]
fn alphas_cumprod_match_diffusers() {
    let fixtures = load();
    for (name, expected) in fixtures["alphas_cumprod"].as_object().unwrap() {
        let sched = Scheduler::new(SchedulerKind::Ddim, &config(&fixtures, name), 1).unwrap();
        let got: Vec<f64> = sched
            .alphas_cumprod()
            .iter()
            .map(|&a| f64::from(a))
            .collect();
        // Relative to each value: the products fall to ~1e-9 (cosine) and 0 (zero terminal SNR).
        let diff = got
            .iter()
            .zip(&f64s(expected))
            .map(|(g, e)| (g - e).abs() / e.abs().max(1e-30))
            .fold(0.0, f64::max);
        // Exact, except through the zero-SNR rescaling: torch's CPU sqrt is not correctly rounded, and the shift
        // by the last value cancels most digits of the small products.
        let bound = if name == "zsnr" { 1e-5 } else { 0.0 };
        assert!(diff <= bound, "{name}: alphas_cumprod differ by {diff:e}");
    }
}

fn fake_model_bias(numel: usize) -> Vec<f32> {
    (0..numel)
        .map(|i| ((i * 37) % 101) as f32 / 101.0f32 - 0.5f32)
        .collect()
}

#[test]
fn trajectories_match_diffusers() {
    let fixtures = load();
    let device = Device::Cpu;
    let mut worst: std::collections::BTreeMap<String, (f64, String)> = Default::default();
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
        let bias = Tensor::from_vec(fake_model_bias(numel), shape.as_slice(), &device).unwrap();
        for i in 0..sched.timesteps().len() {
            let input = sched.scale_model_input(&latents, i).unwrap();
            let output = (input.affine(0.1, 0.0).unwrap() + &bias).unwrap();
            latents = sched.step(&output, i, &latents, &mut rng).unwrap();
        }
        let got: Vec<f64> = latents
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|&v| f64::from(v))
            .collect();
        let expected = f64s(&entry["final"]);
        let scale = expected.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        let diff = got
            .iter()
            .zip(&expected)
            .map(|(g, e)| {
                if g.is_nan() && e.is_nan() {
                    0.0
                } else {
                    (g - e).abs() / scale
                }
            })
            .fold(0.0, f64::max);
        assert!(
            diff <= 1e-5,
            "{label} {shape:?}: final sample differs by {diff:e} (relative to {scale})"
        );
        let kind_worst = worst
            .entry(entry["kind"].as_str().unwrap().to_string())
            .or_default();
        if diff >= kind_worst.0 {
            *kind_worst = (diff, format!("{label} {shape:?}"));
        }
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
    }
    println!(
        "{} trajectories compared; worst relative differences:",
        trajectories.len()
    );
    for (kind, (diff, label)) in worst {
        println!("  {kind}: {diff:e} ({label})");
    }
}

#[test]
fn from_config_semantics() {
    let sd15 = r#"{"_class_name":"PNDMScheduler","beta_end":0.012,"beta_schedule":"scaled_linear",
        "beta_start":0.00085,"num_train_timesteps":1000,"set_alpha_to_one":false,"skip_prk_steps":true,
        "steps_offset":1,"trained_betas":null,"clip_sample":false,"unknown_key":[1,2]}"#;
    let cfg = SchedulerConfig::from_json_str(sd15, "sd15.json").unwrap();
    assert_eq!(cfg.timestep_spacing, None);
    assert_eq!(cfg.steps_offset, 1);
    // Class defaults: linspace for Euler (fractional timesteps), leading for DDIM.
    let euler = Scheduler::new(SchedulerKind::Euler, &cfg, 3).unwrap();
    assert_eq!(euler.timesteps(), &[999.0, 499.5, 0.0]);
    let ddim = Scheduler::new(SchedulerKind::Ddim, &cfg, 3).unwrap();
    assert_eq!(ddim.timesteps(), &[667.0, 334.0, 1.0]);
    assert_eq!(ddim.init_noise_sigma(), 1.0);
    // `_use_default_values` entries count as absent.
    let json = r#"{"timestep_spacing":"trailing","_use_default_values":["timestep_spacing"]}"#;
    let cfg = SchedulerConfig::from_json_str(json, "x.json").unwrap();
    assert_eq!(cfg.timestep_spacing, None);
    // Euler-only options are ignored by the other classes, as from_config ignores unexpected keys.
    let cfg =
        SchedulerConfig::from_json_str(r#"{"interpolation_type":"log_linear"}"#, "x.json").unwrap();
    assert!(Scheduler::new(SchedulerKind::EulerAncestral, &cfg, 10).is_ok());
    assert!(Scheduler::new(SchedulerKind::Ddim, &cfg, 10).is_ok());
    assert!(matches!(
        Scheduler::new(SchedulerKind::Euler, &cfg, 10),
        Err(Error::UnsupportedModel { .. })
    ));
}

#[test]
fn invalid_options_are_errors() {
    let unsupported = |json: &str, kind: SchedulerKind| {
        let cfg = SchedulerConfig::from_json_str(json, "cfg.json").unwrap();
        match Scheduler::new(kind, &cfg, 20) {
            Err(Error::UnsupportedModel { path, message }) => {
                assert_eq!(path, "cfg.json");
                assert!(!message.is_empty());
            }
            other => panic!("{json} with {kind}: expected UnsupportedModel, got {other:?}"),
        }
    };
    unsupported(
        r#"{"beta_schedule":"exotic"}"#,
        SchedulerKind::EulerAncestral,
    );
    unsupported(
        r#"{"prediction_type":"sample"}"#,
        SchedulerKind::EulerAncestral,
    );
    unsupported(r#"{"prediction_type":"flow"}"#, SchedulerKind::Ddim);
    unsupported(r#"{"timestep_spacing":"uniform"}"#, SchedulerKind::Euler);
    unsupported(r#"{"thresholding":true}"#, SchedulerKind::Ddim);
    unsupported(r#"{"use_exponential_sigmas":true}"#, SchedulerKind::Euler);
    unsupported(r#"{"use_beta_sigmas":true}"#, SchedulerKind::Euler);
    unsupported(
        r#"{"timestep_type":"continuous","prediction_type":"v_prediction"}"#,
        SchedulerKind::Euler,
    );
    unsupported(r#"{"final_sigmas_type":"other"}"#, SchedulerKind::Euler);

    let malformed = |json: &str| match SchedulerConfig::from_json_str(json, "cfg.json") {
        Err(Error::MalformedFile { path, .. }) => assert_eq!(path, "cfg.json"),
        other => panic!("{json}: expected MalformedFile, got {other:?}"),
    };
    malformed("not json");
    malformed("[1, 2]");
    malformed(r#"{"beta_start":"small"}"#);
    malformed(r#"{"num_train_timesteps":0}"#);
    malformed(r#"{"trained_betas":[0.1,"x"]}"#);
    // Sizes past the bound, and floats past i64 (which `as` would have saturated to i64::MAX), name their key.
    let names_key = |json: &str, key: &str| match SchedulerConfig::from_json_str(json, "cfg.json") {
        Err(e @ Error::MalformedFile { .. }) => assert!(e.to_string().contains(key), "{json}: {e}"),
        other => panic!("{json}: expected MalformedFile, got {other:?}"),
    };
    names_key(
        r#"{"num_train_timesteps":92233720368547758071000}"#,
        "num_train_timesteps",
    );
    names_key(
        r#"{"num_train_timesteps":9223372036854775807}"#,
        "num_train_timesteps",
    );
    names_key(r#"{"num_train_timesteps":100001}"#, "num_train_timesteps");
    names_key(r#"{"num_train_timesteps":1e300}"#, "num_train_timesteps");
    names_key(r#"{"steps_offset":9223372036854775807}"#, "steps_offset");
    names_key(r#"{"steps_offset":-1e30}"#, "steps_offset");
    names_key(
        r#"{"original_inference_steps":1e30}"#,
        "original_inference_steps",
    );
    let offset = format!(r#"{{"steps_offset":-{MAX_TRAIN_TIMESTEPS}}}"#);
    let cfg = SchedulerConfig::from_json_str(&offset, "cfg.json").unwrap();
    assert_eq!(cfg.steps_offset, -(MAX_TRAIN_TIMESTEPS as i64));
    let longest = format!(r#"{{"num_train_timesteps":{MAX_TRAIN_TIMESTEPS}.0}}"#);
    let cfg = SchedulerConfig::from_json_str(&longest, "cfg.json").unwrap();
    assert_eq!(cfg.num_train_timesteps, MAX_TRAIN_TIMESTEPS);
    for kind in SchedulerKind::ALL {
        assert!(Scheduler::new(kind, &cfg, 4).is_ok(), "{kind:?}");
    }

    let cfg = SchedulerConfig::default();
    for steps in [0, 1001] {
        assert!(matches!(
            Scheduler::new(SchedulerKind::Euler, &cfg, steps),
            Err(Error::InvalidRequest { field: "steps", .. })
        ));
    }
    // Leading spacing with steps_offset can run past the training schedule (DDIM indexes it directly).
    let cfg = SchedulerConfig::from_json_str(r#"{"steps_offset":1}"#, "cfg.json").unwrap();
    assert!(matches!(
        Scheduler::new(SchedulerKind::Ddim, &cfg, 1000),
        Err(Error::InvalidRequest { field: "steps", .. })
    ));

    let missing = std::path::Path::new("/nonexistent/scheduler_config.json");
    assert!(matches!(
        SchedulerConfig::from_file(missing),
        Err(Error::MissingFile { .. })
    ));

    assert!(matches!(
        SchedulerKind::from_str("dpm"),
        Err(Error::InvalidRequest {
            field: "scheduler",
            ..
        })
    ));
    for kind in [
        SchedulerKind::EulerAncestral,
        SchedulerKind::Euler,
        SchedulerKind::Ddim,
    ] {
        assert_eq!(SchedulerKind::from_str(kind.as_str()).unwrap(), kind);
    }
    assert_eq!(SchedulerKind::default(), SchedulerKind::EulerAncestral);
}

#[test]
fn step_index_out_of_range_is_an_error() {
    let cfg = SchedulerConfig::default();
    let mut sched = Scheduler::new(SchedulerKind::EulerAncestral, &cfg, 2).unwrap();
    let x = Tensor::zeros(&[1, 4, 2, 2], candle_core::DType::F32, &Device::Cpu).unwrap();
    let mut rng = TorchRng::new(0);
    assert!(sched.scale_model_input(&x, 2).is_err());
    assert!(sched.step(&x, 2, &x, &mut rng).is_err());
}
