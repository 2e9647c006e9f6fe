#!/usr/bin/env python3
"""Reference fixtures for sketchx's sampling module (torch-compatible RNG and diffusers schedulers).

Writes into ``<fixtures_dir>/sampling/``:

* ``rng.json``: ``torch.randn`` float32 (and float16 / bfloat16) draws from ``torch.Generator("cpu").manual_seed(seed)`` for several seeds and
  shapes, including consecutive draws from one generator; once with torch's dispatched CPU capability (AVX2/AVX512 on
  x86-64: the vectorised Box-Muller) and once with ``ATEN_CPU_CAPABILITY=default`` (the scalar loop).
* ``schedulers.json``: timesteps, sigmas and ``init_noise_sigma`` of EulerAncestralDiscreteScheduler,
  EulerDiscreteScheduler and DDIMScheduler built with ``from_config`` from several configs and step counts, plus full
  denoising trajectories with a fake model (``0.1 * scaled_input + F``) and Euler-Ancestral noise from the generator.

Usage: ``python tools/fixturegen/sampling.py tests/fixtures`` (needs torch, numpy and diffusers).
"""

import json
import os
import subprocess
import sys

RNG_SEEDS = [0, 1, 42, 2**32 + 5, 2**64 - 1]
RNG_SHAPES = [[1], [7], [15], [16], [17], [100], [4, 9, 9], [2, 4, 8, 8]]
# Consecutive draws from one generator: mixes the vectorised (>= 16) and scalar (< 16) paths and the scalar path's
# cached second value.
RNG_SEQUENCE = [[4, 9, 9], [7], [3], [16], [1, 4, 5, 5], [1], [1], [33]]

SD15_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


def _configs():
    sd15 = dict(SD15_CONFIG)
    return {
        "sd15": sd15,
        "sd15_trailing": {**sd15, "timestep_spacing": "trailing"},
        "sd15_leading": {**sd15, "timestep_spacing": "leading"},
        "sd15_linspace": {**sd15, "timestep_spacing": "linspace"},
        "sd15_vpred": {**sd15, "prediction_type": "v_prediction"},
        "zsnr": {**sd15, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                 "prediction_type": "v_prediction"},
        "linear": {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"},
        "cosine": {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "steps_offset": 1},
        "trained": {"num_train_timesteps": 100,
                    "trained_betas": [0.0005 + 0.0003 * i + 0.000001 * i * i for i in range(100)]},
        "ddim_clip": {**sd15, "clip_sample": True, "clip_sample_range": 1.5, "set_alpha_to_one": True},
        "ddim_sample": {**sd15, "prediction_type": "sample"},
        "euler_karras": {**sd15, "use_karras_sigmas": True},
        "euler_sigma_min": {**sd15, "final_sigmas_type": "sigma_min"},
    }


# Which (kind, config) pairs are exercised; "sample" prediction exists only for Euler and DDIM, clipping only DDIM,
# Karras sigmas and final_sigmas_type only Euler.
KINDS = {"euler_a": "EulerAncestralDiscreteScheduler", "euler": "EulerDiscreteScheduler", "ddim": "DDIMScheduler"}
COMMON_CONFIGS = ["sd15", "sd15_trailing", "sd15_leading", "sd15_linspace", "sd15_vpred", "zsnr", "linear",
                  "cosine", "trained"]
EXTRA_CONFIGS = {"euler_a": [], "euler": ["euler_karras", "euler_sigma_min"], "ddim": ["ddim_clip", "ddim_sample"]}
STEP_COUNTS = [1, 2, 3, 7, 20, 30, 50, 61, 150]
# 61 gives diffusers' trailing spacing an extra timestep (-1).
SHORT_STEP_COUNTS = [1, 2, 20, 61]
TRAJ_SHAPES = [[1, 4, 5, 5], [1, 4, 8, 8]]


def _f32_list(t):
    import numpy as np

    # The shortest decimal that reads back as the same float32 (readers round the parsed number to float32).
    return [float(str(v)) for v in np.asarray(t, dtype=np.float32).reshape(-1)]


def _rng_cases():
    import torch

    cases = []
    for seed in RNG_SEEDS:
        for shape in RNG_SHAPES:
            g = torch.Generator("cpu").manual_seed(seed)
            cases.append({"seed": seed, "draws": [{"shape": shape,
                                                    "values": _f32_list(torch.randn(shape, generator=g))}]})
    g = torch.Generator("cpu").manual_seed(42)
    cases.append({"seed": 42, "draws": [{"shape": s, "values": _f32_list(torch.randn(s, generator=g))}
                                        for s in RNG_SEQUENCE]})
    # float16 / bfloat16 draws (diffusers pipelines in half precision), stored as float32.
    half = []
    for dtype in ["float16", "bfloat16"]:
        for seed in RNG_SEEDS[:3]:
            g = torch.Generator("cpu").manual_seed(seed)
            half.append({"seed": seed, "dtype": dtype,
                         "draws": [{"shape": s, "values": _f32_list(torch.randn(s, generator=g,
                                                                                dtype=getattr(torch, dtype)).float())}
                                   for s in RNG_SEQUENCE]})
    return {"capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__, "cases": cases,
            "half_cases": half}


def _fake_f(numel):
    import numpy as np

    i = np.arange(numel)
    return ((i * 37) % 101).astype(np.float32) / np.float32(101.0) - np.float32(0.5)


def _schedule_entry(kind, cls, cfg_name, cfg, steps):
    import numpy as np

    sched = cls.from_config(cfg)
    sched.set_timesteps(steps)
    entry = {"kind": kind, "config": cfg_name, "steps": steps,
             "timesteps": [float(t) for t in sched.timesteps.numpy().astype(np.float64)]}
    if kind == "ddim":
        entry["init_noise_sigma"] = float(sched.init_noise_sigma)
        entry["sigmas"] = None
    else:
        entry["init_noise_sigma"] = float(sched.init_noise_sigma)
        entry["sigmas"] = _f32_list(sched.sigmas)
    return entry


def _trajectory(kind, cls, cfg_name, cfg, steps, seed, shape):
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    sched = cls.from_config(cfg)
    sched.set_timesteps(steps)
    g = torch.Generator("cpu").manual_seed(seed)
    latents = randn_tensor(shape, generator=g, device=torch.device("cpu"), dtype=torch.float32)
    latents = latents * sched.init_noise_sigma
    fake = torch.from_numpy(_fake_f(latents.numel())).reshape(shape)
    for t in sched.timesteps:
        x_in = sched.scale_model_input(latents, t)
        model_output = 0.1 * x_in + fake
        if kind == "ddim":
            latents = sched.step(model_output, t, latents, eta=0.0, generator=g).prev_sample
        else:
            latents = sched.step(model_output, t, latents, generator=g).prev_sample
    after = torch.randn([16], generator=g)
    return {"kind": kind, "config": cfg_name, "steps": steps, "seed": seed, "shape": shape,
            "final": _f32_list(latents), "rng_after": _f32_list(after)}


def _scheduler_fixtures():
    import diffusers
    import numpy as np

    configs = _configs()
    schedules, trajectories = [], []
    for kind, cls_name in KINDS.items():
        cls = getattr(diffusers, cls_name)
        for cfg_name in COMMON_CONFIGS + EXTRA_CONFIGS[kind]:
            cfg = configs[cfg_name]
            n_train = cfg.get("num_train_timesteps", 1000)
            for steps in STEP_COUNTS if cfg_name == "sd15" else SHORT_STEP_COUNTS:
                if steps > n_train:
                    continue
                schedules.append(_schedule_entry(kind, cls, cfg_name, cfg, steps))
            traj_steps = [1, 2, 20, 50] if cfg_name == "sd15" else [20]
            for steps in traj_steps:
                for shape in TRAJ_SHAPES if cfg_name == "sd15" else TRAJ_SHAPES[:1]:
                    trajectories.append(_trajectory(kind, cls, cfg_name, cfg, steps, 1234, shape))
    # Alphas of the training schedule for a couple of configs (checks beta schedules and cumprod precision).
    alphas = {}
    for cfg_name in ["sd15", "linear", "cosine", "zsnr", "trained"]:
        sched = diffusers.DDIMScheduler.from_config(configs[cfg_name])
        alphas[cfg_name] = _f32_list(sched.alphas_cumprod)
    return {"diffusers": diffusers.__version__, "numpy": np.__version__, "configs": configs,
            "schedules": schedules, "trajectories": trajectories, "alphas_cumprod": alphas}


def _dump(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
        f.write("\n")


def generate(fixtures_dir):
    """Writes ``rng.json`` and ``schedulers.json`` under ``<fixtures_dir>/sampling``."""
    out = os.path.join(fixtures_dir, "sampling")
    os.makedirs(out, exist_ok=True)
    rng = _rng_cases()
    # The scalar (capability DEFAULT) variant needs a fresh process: torch reads ATEN_CPU_CAPABILITY at import.
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    scalar = subprocess.run([sys.executable, os.path.abspath(__file__), "--rng-only"], env=env, check=True,
                            capture_output=True, text=True).stdout
    _dump(os.path.join(out, "rng.json"), {"dispatched": rng, "scalar": json.loads(scalar)})
    _dump(os.path.join(out, "schedulers.json"), _scheduler_fixtures())


if __name__ == "__main__":
    if sys.argv[1:] == ["--rng-only"]:
        json.dump(_rng_cases(), sys.stdout)
    elif len(sys.argv) == 2:
        generate(sys.argv[1])
    else:
        sys.exit("usage: sampling.py FIXTURES_DIR")
