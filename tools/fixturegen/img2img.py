#!/usr/bin/env python3
"""img2img references for every scheduler sketchx runs (issue 14), beyond the Euler-Ancestral and DDIM cases of
``formats.py``: diffusers' ``StableDiffusionControlNetImg2ImgPipeline`` with Euler, LCM, TCD, DDIM / Euler-Ancestral
with ``timestep_spacing="trailing"``, ``vae.enable_tiling()`` (tiled encode and decode), guess mode and a control
window; and the VAE encoder's moments on fixed images (untiled and tiled).

Runs after ``models.py`` and ``formats.py`` (it reads ``tiny-sd``, ``tiny-controlnet`` and the colour sketches that
``formats.py`` draws; it never rewrites them); alone::

    HF_HUB_OFFLINE=1 python tools/fixturegen/img2img.py tests/fixtures

torch runs on ``FIXTURE_THREADS`` threads (default 1, as the committed references were made). Everything is written
under ``<fixtures>/img2img/`` (removed and rebuilt):

``cases.json``               one entry per case: the keys of ``formats/reference/cases.json``'s img2img cases
                             (``sketch``, ``start_image``, ``strength``, ``scheduler``, ...) plus
                             ``timestep_spacing``, ``eta``, ``vae_tiling``, ``timesteps`` (the schedule diffusers
                             set), ``kept_timesteps`` (those that ran) and ``diffusers_calls``.
``<case>_<i>.png``           diffusers' images (``output_type="np"``, ``* 255`` rounded).
``<case>.start.png``         the start image as the pipeline received it (decoded, PIL LANCZOS to width x height).
``vae_encode.safetensors``   ``image`` [1, 3, 80, 96] in [-1, 1] (``house_colour.png`` as diffusers' image processor
                             leaves it), ``moments`` = ``vae._encode(image)`` (encoder + quant_conv, [1, 8, 10, 12]),
                             ``moments_tiled`` = the same after ``vae.enable_tiling()`` (tiny-sd's VAE has
                             sample_size 64: 2 x 2 tiles of 64 pixels every 48), ``image_128`` / ``moments_128_tiled``
                             for a 128 x 128 image (3 x 3 tiles).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import models  # noqa: E402
from sketch import reference_preprocess  # noqa: E402

ROOT = "img2img"
SCHEDULER_CLASSES = {"lcm": "LCMScheduler", "tcd": "TCDScheduler", "ddim": "DDIMScheduler",
                     "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler"}

BASE = dict(sketch="house_colour.png", start_image="house_colour.png", prompt="a cozy house, watercolor", width=64,
            height=64, steps=8, seed=7, guidance_scale=7.5, temperature=0.65, num_images=1, strength=0.6,
            timestep_spacing=None, eta=0.0, vae_tiling=False)
CASES = [
    dict(BASE, name="euler", scheduler="euler", strength=0.7),
    dict(BASE, name="lcm", scheduler="lcm", steps=4, strength=0.5, guidance_scale=1.5),
    dict(BASE, name="tcd_eta0.3", scheduler="tcd", steps=5, strength=0.8, eta=0.3, guidance_scale=1.0),
    dict(BASE, name="ddim_trailing", scheduler="ddim", timestep_spacing="trailing", steps=6, strength=0.5),
    dict(BASE, name="euler_a_trailing_two", scheduler="euler_a", timestep_spacing="trailing", steps=5,
         strength=0.9, num_images=2, start_image="house_colour_alt.png"),
    # 96 x 80 with tiling: tiny-sd's VAE tiles images above 64 pixels (encode) and latents above 8 (decode).
    dict(BASE, name="euler_a_vae_tiling", scheduler="euler_a", width=96, height=80, vae_tiling=True, strength=0.75),
    dict(BASE, name="guess_mode_window", scheduler="euler_a", prompt="", control_guidance_start=0.2,
         control_guidance_end=0.7, strength=1.0, steps=6),
]


def case_full(c: dict) -> dict:
    c = models.e2e_case(c)
    c["preprocess"] = "scribble"
    return c


def run_case(out: Path, c: dict):
    """Runs one case; returns (uint8 images, the start image, info)."""
    import diffusers
    from diffusers import ControlNetModel, StableDiffusionControlNetImg2ImgPipeline

    cn = ControlNetModel.from_pretrained(out / c["controlnet"], torch_dtype=torch.float32)
    pipe = StableDiffusionControlNetImg2ImgPipeline.from_pretrained(
        out / c["model"], controlnet=cn, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if c["vae_tiling"]:
        pipe.vae.enable_tiling()
    cls = getattr(diffusers, SCHEDULER_CLASSES[c["scheduler"]])
    overrides = {"timestep_spacing": c["timestep_spacing"]} if c["timestep_spacing"] else {}
    pipe.scheduler = cls.from_config(dict(pipe.scheduler.config), **overrides)
    kept = []
    step = pipe.scheduler.step

    def recording_step(model_output, timestep, *args, **kwargs):
        kept.append(float(timestep))
        return step(model_output, timestep, *args, **kwargs)

    import functools

    pipe.scheduler.step = functools.wraps(step)(recording_step)  # keeps step's signature (generator, eta)
    control = models.control_image(out / "sketches" / c["sketch"], c["width"], c["height"])
    start = reference_preprocess(out / "sketches" / c["start_image"], c["width"], c["height"], "none")
    kw = dict(
        prompt=c["prompt"], negative_prompt=c["negative_prompt"] or None, image=start, control_image=control,
        strength=c["strength"], width=c["width"], height=c["height"], num_inference_steps=c["steps"],
        guidance_scale=c["guidance_scale"], num_images_per_prompt=c["num_images"],
        generator=torch.Generator("cpu").manual_seed(c["seed"]),
        controlnet_conditioning_scale=1.65 - c["temperature"], guess_mode=c["prompt"] == "",
        control_guidance_start=c["control_guidance_start"], control_guidance_end=c["control_guidance_end"],
        eta=c["eta"], output_type="np")
    with torch.no_grad():
        res = pipe(**kw)
    imgs = (res.images.astype("float32") * 255).round().astype("uint8")
    info = {
        "timesteps": [float(t) for t in pipe.scheduler.timesteps],
        "kept_timesteps": kept,
        "diffusers_calls": [
            "controlnet = ControlNetModel.from_pretrained('tiny-controlnet')",
            "pipe = StableDiffusionControlNetImg2ImgPipeline.from_pretrained('tiny-sd', controlnet=controlnet, "
            "safety_checker=None, feature_extractor=None, requires_safety_checker=False)",
            f"pipe.scheduler = {cls.__name__}.from_config(pipe.scheduler.config"
            + (f", timestep_spacing='{c['timestep_spacing']}')" if c["timestep_spacing"] else ")"),
        ] + (["pipe.vae.enable_tiling()"] if c["vae_tiling"] else []) + [
            "pipe(prompt=..., negative_prompt=... or None, image=start, control_image=control, strength, width, "
            "height, num_inference_steps=steps, guidance_scale, num_images_per_prompt=num_images, "
            "generator=torch.Generator('cpu').manual_seed(seed), controlnet_conditioning_scale=1.65 - temperature, "
            "guess_mode=prompt == '', control_guidance_start, control_guidance_end, eta, output_type='np')"],
    }
    return imgs, start, info


def vae_encode_references(out: Path, d: Path):
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    vae = AutoencoderKL.from_pretrained(out / "tiny-sd" / "vae", torch_dtype=torch.float32).eval()
    t = {}

    def image(name, w, h):
        arr = np.asarray(reference_preprocess(out / "sketches" / name, w, h, "none")).astype(np.float32) / 255.0
        return 2.0 * torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous() - 1.0

    with torch.no_grad():
        t["image"] = image("house_colour.png", 96, 80)
        t["moments"] = vae._encode(t["image"])
        vae.enable_tiling()
        t["moments_tiled"] = vae._encode(t["image"])
        t["image_128"] = image("house_colour_alt.png", 128, 128)
        t["moments_128_tiled"] = vae._encode(t["image_128"])
        vae.disable_tiling()
        assert not torch.equal(t["moments"], t["moments_tiled"])
    save_file({k: v.contiguous() for k, v in t.items()}, str(d / "vae_encode.safetensors"))


def generate(fixtures_dir):
    out = Path(fixtures_dir)
    torch.set_num_threads(int(os.environ.get("FIXTURE_THREADS", "1")))
    d = out / ROOT
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    from PIL import Image

    cases = []
    for case in CASES:
        c = case_full(case)
        imgs, start, info = run_case(out, c)
        c.update(info)
        start.save(d / f"{c['name']}.start.png")
        c["start_image_resized"] = f"{c['name']}.start.png"
        c["images"] = []
        for i, arr in enumerate(imgs):
            name = f"{c['name']}_{i}.png"
            Image.fromarray(arr).save(d / name)
            c["images"].append(name)
        print(f"  {c['name']}: {len(imgs)} image(s), kept {c['kept_timesteps']}", flush=True)
        cases.append(c)
    (d / "cases.json").write_text(json.dumps(cases, indent=2) + "\n")
    vae_encode_references(out, d)


if __name__ == "__main__":
    generate(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parents[2] / "tests" / "fixtures"))
