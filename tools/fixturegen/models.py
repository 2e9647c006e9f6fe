"""Tiny random-weight Stable Diffusion 1.5 + ControlNet models in diffusers layout, and diffusers' reference outputs.

The models have SD1.5's *shape* (the same block types, attention layout, scheduler config and CLIP vocabulary) at a
tiny width so that tests run in seconds. Layers that diffusers initialises to zero (the ControlNet's zero
convolutions and the conditioning embedding's output convolution) get random weights so that the sketch, the prompt
and the conditioning scale visibly change the result.

Outputs (under ``fixtures_dir``):
  tiny-sd/                  model_index.json, unet/, vae/, text_encoder/, scheduler/ (tokenizer/ by tokenizer.py)
  tiny-controlnet/          config.json + diffusion_pytorch_model.safetensors
  tiny-controlnet-bin/      the same weights as a pickled diffusion_pytorch_model.bin (the .bin fallback)
  sketches/                 input sketches (black-on-white, white-on-black, transparent RGBA)
  reference/components.safetensors   per-component inputs and outputs (text encoder, ControlNet, UNet, VAE)
  reference/e2e/<case>.png + reference/e2e/cases.json   whole-pipeline images from diffusers
  reference/vae_tiling.safetensors   tiled VAE decodes (``vae.enable_tiling()``) of latents larger than a tile
  reference/e2e_vae_tiling/          whole-pipeline images from diffusers with ``vae.enable_tiling()``
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# The old service's fixed negative prompt (sketchx's default).
DEFAULT_NEGATIVE = "lowres, bad anatomy, bad hands, cropped, worst quality"

# The scheduler config of stable-diffusion-v1-5 (one definition, shared with the scheduler references).
from sampling import SD15_CONFIG as SD15_SCHEDULER_CONFIG  # noqa: E402


def unet_kwargs():
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32, 32),
        layers_per_block=2,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def controlnet_kwargs():
    kw = unet_kwargs()
    for k in ("sample_size", "out_channels", "up_block_types"):
        kw.pop(k)
    kw["conditioning_embedding_out_channels"] = (8, 16, 16, 16)
    return kw


def vae_kwargs():
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.18215,
    )


def text_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=32,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )


def perturb_zero_layers(controlnet, gen):
    """Make the sketch matter in a random-weight ControlNet (see the module doc).

    diffusers zero-initialises the zero convolutions and the conditioning embedding's output; they get random
    weights here. The conditioning embedding's hidden convolutions also get a variance-preserving init: with
    PyTorch's default init the signal of the sketch dies out in the 7-layer stack and only the biases remain.
    """
    with torch.no_grad():
        for m in list(controlnet.controlnet_down_blocks) + [controlnet.controlnet_mid_block]:
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / fan_in**0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.05)
        ce = controlnet.controlnet_cond_embedding
        for m in [ce.conv_in, *ce.blocks, ce.conv_out]:
            fan_in = m.weight[0].numel()
            std = 8.0 / fan_in**0.5 if m is ce.conv_out else (2.0 / fan_in) ** 0.5
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * std)
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.01)


def build_models(out: Path, seed: int = 1234):
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    sd = out / "tiny-sd"
    unet = UNet2DConditionModel(**unet_kwargs()).eval()
    vae = AutoencoderKL(**vae_kwargs()).eval()
    text = CLIPTextModel(text_config()).eval()
    controlnet = ControlNetModel(**controlnet_kwargs()).eval()
    perturb_zero_layers(controlnet, gen)

    unet.save_pretrained(sd / "unet", safe_serialization=True)
    vae.save_pretrained(sd / "vae", safe_serialization=True)
    text.save_pretrained(sd / "text_encoder", safe_serialization=True)
    (sd / "scheduler").mkdir(parents=True, exist_ok=True)
    (sd / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER_CONFIG, indent=2) + "\n")
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (sd / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    controlnet.save_pretrained(out / "tiny-controlnet", safe_serialization=True)
    controlnet.save_pretrained(out / "tiny-controlnet-bin", safe_serialization=False)
    # Only the pickled weights in the .bin copy: it tests the fallback.
    for f in (out / "tiny-controlnet-bin").glob("*.safetensors"):
        f.unlink()
    return unet, vae, text, controlnet


# A second model pair shaped like diffusers' own test models rather than SD1.5: plain block first, per-block head
# counts, linear projections, two transformer layers, 2 groups, a 2x VAE, an erf-GELU text encoder of another
# width, a BGR ControlNet, and an SD2-style "leading" scheduler config. Parity on it shows that nothing about
# SD1.5's shape is assumed.
ALT_SCHEDULER_CONFIG = dict(SD15_SCHEDULER_CONFIG, timestep_spacing="leading", beta_schedule="linear",
                            beta_start=0.0001, beta_end=0.02)


def alt_unet_kwargs():
    return dict(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=16,
        attention_head_dim=(2, 4), norm_num_groups=2, use_linear_projection=True,
        transformer_layers_per_block=2, norm_eps=1e-6,
    )


def build_alt_models(out: Path, seed: int = 99):
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    sd = out / "tiny-sd-alt"
    UNet2DConditionModel(**alt_unet_kwargs()).eval().save_pretrained(sd / "unet", safe_serialization=True)
    AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=2, sample_size=32, scaling_factor=0.5,
    ).eval().save_pretrained(sd / "vae", safe_serialization=True)
    CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=16, bos_token_id=49406, eos_token_id=49407,
    )).eval().save_pretrained(sd / "text_encoder", safe_serialization=True)
    (sd / "scheduler").mkdir(parents=True, exist_ok=True)
    (sd / "scheduler" / "scheduler_config.json").write_text(json.dumps(ALT_SCHEDULER_CONFIG, indent=2) + "\n")
    shutil.copy(out / "tiny-sd" / "model_index.json", sd / "model_index.json")
    tok = sd / "tokenizer"
    if tok.is_symlink() or tok.exists():
        tok.unlink() if tok.is_symlink() else shutil.rmtree(tok)
    os.symlink("../tiny-sd/tokenizer", tok)  # the same CLIP vocabulary, stored once
    kw = alt_unet_kwargs()
    for k in ("sample_size", "out_channels", "up_block_types"):
        kw.pop(k)
    cn = ControlNetModel(conditioning_embedding_out_channels=(8, 16),
                         controlnet_conditioning_channel_order="bgr", **kw).eval()
    perturb_zero_layers(cn, gen)
    cn.save_pretrained(out / "tiny-controlnet-alt", safe_serialization=True)


def draw_sketches(out: Path):
    """Small deterministic test sketches (a house with a sun), in the three polarities/encodings we accept."""
    d = out / "sketches"
    d.mkdir(parents=True, exist_ok=True)

    def draw(size, fg, bg, mode="RGB"):
        im = Image.new(mode, size, bg)
        dr = ImageDraw.Draw(im)
        w, h = size
        dr.rectangle([w * 0.2, h * 0.45, w * 0.7, h * 0.9], outline=fg, width=3)
        dr.line([w * 0.15, h * 0.5, w * 0.45, h * 0.15, w * 0.75, h * 0.5], fill=fg, width=3)
        dr.ellipse([w * 0.75, h * 0.08, w * 0.93, h * 0.3], outline=fg, width=2)
        dr.rectangle([w * 0.38, h * 0.65, w * 0.5, h * 0.9], outline=fg, width=2)
        return im

    draw((96, 80), (0, 0, 0), (255, 255, 255)).save(d / "house_black_on_white.png")
    draw((96, 80), (255, 255, 255), (0, 0, 0)).save(d / "house_white_on_black.png")
    draw((80, 120), (20, 20, 30, 255), (0, 0, 0, 0), mode="RGBA").save(d / "house_transparent.png")
    draw((200, 140), (0, 0, 0), (250, 250, 245)).save(d / "house_large.png")


def control_image(path: Path, width: int, height: int, mode: str = "scribble") -> Image.Image:
    """The Python twin of sketchx's decoding and preprocessing (tools/fixturegen/sketch.py)."""
    from sketch import reference_preprocess

    return reference_preprocess(path, width, height, mode)


def component_references(out: Path, unet, vae, text, controlnet):
    """Inputs and outputs of each network on fixed inputs, saved in one safetensors file."""
    from safetensors.torch import save_file
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(out / "tiny-sd" / "tokenizer")
    g = torch.Generator().manual_seed(7)
    t = {}
    prompts = ["a red sports car on a mountain road", ""]
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        t["text.input_ids"] = ids.input_ids.to(torch.int64)
        t["text.hidden"] = text(ids.input_ids)[0]
        enc = t["text.hidden"]
        sample = torch.randn((2, 4, 8, 12), generator=g)
        cond = (torch.rand((2, 3, 64, 96), generator=g) > 0.7).float()
        timestep = torch.tensor(801.3, dtype=torch.float32)
        t["cn.sample"], t["cn.cond"], t["cn.timestep"] = sample, cond, timestep.reshape(1)
        for name, guess, scale in (("plain", False, 0.8), ("guess", True, 1.0)):
            down, mid = controlnet(
                sample, timestep, encoder_hidden_states=enc, controlnet_cond=cond,
                conditioning_scale=scale, guess_mode=guess, return_dict=False,
            )
            for i, d in enumerate(down):
                t[f"cn.{name}.down.{i}"] = d
            t[f"cn.{name}.mid"] = mid
        down, mid = controlnet(
            sample, timestep, encoder_hidden_states=enc, controlnet_cond=cond, conditioning_scale=0.8,
            return_dict=False,
        )
        t["unet.out"] = unet(
            sample, timestep, encoder_hidden_states=enc,
            down_block_additional_residuals=down, mid_block_additional_residual=mid,
        ).sample
        t["unet.out_plain"] = unet(sample, timestep, encoder_hidden_states=enc).sample
        latents = torch.randn((1, 4, 8, 12), generator=g)
        t["vae.latents"] = latents
        t["vae.image"] = vae.decode(latents / vae.config.scaling_factor).sample
    (out / "reference").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in t.items()}, str(out / "reference" / "components.safetensors"))


# Each case: the request (in sketchx's terms) and how it maps onto diffusers' call.
E2E_CASES = [
    dict(name="square_cfg", sketch="house_black_on_white.png", prompt="a cozy house, watercolor", width=64,
         height=64, steps=6, seed=42, guidance_scale=7.5, temperature=0.65, num_images=1),
    dict(name="nonsquare_two_images", sketch="house_black_on_white.png", prompt="a red barn at dusk", width=128,
         height=64, steps=5, seed=7, guidance_scale=5.0, temperature=0.3, num_images=2),
    dict(name="cfg_off", sketch="house_white_on_black.png", prompt="a castle", width=64, height=96, steps=5,
         seed=1, guidance_scale=1.0, temperature=0.65, num_images=1),
    dict(name="guess_mode_empty_prompt", sketch="house_black_on_white.png", prompt="", width=64, height=64,
         steps=5, seed=3, guidance_scale=4.0, temperature=0.65, num_images=1),
    dict(name="transparent_sketch", sketch="house_transparent.png", prompt="a tall tower", width=64, height=128,
         steps=5, seed=123456789, guidance_scale=7.5, temperature=0.9, num_images=1, negative_prompt=""),
    dict(name="odd_latents_default_size", sketch="house_large.png", prompt="a villa by the sea", width=72,
         height=72, steps=4, seed=2**40 + 3, guidance_scale=6.0, temperature=0.0, num_images=1),
    dict(name="control_window_ddim", sketch="house_black_on_white.png", prompt="a cabin in snow", width=64,
         height=64, steps=6, seed=11, guidance_scale=7.5, temperature=0.65, num_images=1, scheduler="ddim",
         control_guidance_start=0.2, control_guidance_end=0.7),
    dict(name="euler", sketch="house_black_on_white.png", prompt="a lighthouse", width=64, height=64, steps=5,
         seed=5, guidance_scale=7.5, temperature=0.65, num_images=1, scheduler="euler"),
    # The differently shaped model pair (see ALT_SCHEDULER_CONFIG).
    dict(name="alt_model_nonsquare", model="tiny-sd-alt", controlnet="tiny-controlnet-alt",
         sketch="house_black_on_white.png", prompt="a red barn", width=80, height=64, steps=5, seed=21,
         guidance_scale=7.5, temperature=0.4, num_images=2),
    dict(name="alt_model_guess_ddim", model="tiny-sd-alt", controlnet="tiny-controlnet-alt",
         sketch="house_transparent.png", prompt="", width=64, height=88, steps=4, seed=8, guidance_scale=3.0,
         temperature=0.65, num_images=1, scheduler="ddim"),
]


def make_scheduler(name, config):
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    cls = {"euler_a": EulerAncestralDiscreteScheduler, "euler": EulerDiscreteScheduler, "ddim": DDIMScheduler}[name]
    return cls.from_config(config)


def e2e_pipeline(out: Path, model: str, controlnet: str, dtype=torch.float32, vae_tiling: bool = False):
    """diffusers' ControlNet pipeline for a pair of fixture models, and its scheduler config; ``vae_tiling``: with
    ``pipe.vae.enable_tiling()``."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    cn = ControlNetModel.from_pretrained(out / controlnet, torch_dtype=dtype)
    p = StableDiffusionControlNetPipeline.from_pretrained(
        out / model, controlnet=cn, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False, torch_dtype=dtype,
    )
    p.set_progress_bar_config(disable=True)
    if vae_tiling:
        p.vae.enable_tiling()
    return p, dict(p.scheduler.config)


def e2e_case(case: dict) -> dict:
    """A case of E2E_CASES with every default filled in."""
    c = dict(case)
    c.setdefault("negative_prompt", DEFAULT_NEGATIVE)
    c.setdefault("scheduler", "euler_a")
    c.setdefault("control_guidance_start", 0.0)
    c.setdefault("control_guidance_end", 1.0)
    c.setdefault("model", "tiny-sd")
    c.setdefault("controlnet", "tiny-controlnet")
    return c


def e2e_run(pipe, base_sched, c: dict, image):
    """Runs one case through diffusers; returns the images as uint8 arrays (H, W, 3)."""
    pipe.scheduler = make_scheduler(c["scheduler"], base_sched)
    result = pipe(
        prompt=c["prompt"],
        negative_prompt=c["negative_prompt"] or None,
        image=image,
        width=c["width"],
        height=c["height"],
        num_inference_steps=c["steps"],
        guidance_scale=c["guidance_scale"],
        num_images_per_prompt=c["num_images"],
        generator=torch.Generator("cpu").manual_seed(c["seed"]),
        controlnet_conditioning_scale=1.65 - c["temperature"],
        guess_mode=c["prompt"] == "",
        control_guidance_start=c["control_guidance_start"],
        control_guidance_end=c["control_guidance_end"],
        output_type="np",
    )
    return (result.images.astype("float32") * 255).round().astype("uint8")


def e2e_references(out: Path, cases_in=E2E_CASES, subdir: str = "e2e", vae_tiling: bool = False):
    """Runs diffusers' pipeline on each case; ``vae_tiling``: with ``pipe.vae.enable_tiling()``."""
    pipes = {}
    e2e = out / "reference" / subdir
    e2e.mkdir(parents=True, exist_ok=True)
    cases = []
    for case in cases_in:
        c = e2e_case(case)
        key = (c["model"], c["controlnet"])
        if key not in pipes:
            pipes[key] = e2e_pipeline(out, *key, vae_tiling=vae_tiling)
        image = control_image(out / "sketches" / c["sketch"], c["width"], c["height"])
        image.save(e2e / f"{c['name']}.control.png")
        imgs = e2e_run(*pipes[key], c, image)
        c["images"] = []
        for i, arr in enumerate(imgs):
            name = f"{c['name']}_{i}.png"
            Image.fromarray(arr).save(e2e / name)
            c["images"].append(name)
        cases.append(c)
    (e2e / "cases.json").write_text(json.dumps(cases, indent=2) + "\n")


# Tiled VAE decode (diffusers' AutoencoderKL.enable_tiling()). The tile geometry comes from each VAE's config:
# tiny-sd (sample_size 64, 4 blocks): 8-latent tiles every 6 latents, 16 px blended, 48 px kept per tile;
# tiny-sd-alt (sample_size 32, 2 blocks): 16-latent tiles every 12, 8 px blended, 24 px kept.
# Each case: (name, model directory, latent shape). Several tiles with overlap in both directions, non-square.
VAE_TILING_CASES = [
    # 3 x 4 tiles; 14 and 20 are not multiples of the stride 6, so the last row and column are 2-latent slivers.
    ("tiny", "tiny-sd", (1, 4, 14, 20)),
    # 2 x 3 tiles; 12 and 18 are multiples of the stride (the last tiles are 6 latents).
    ("tiny_stride_multiple", "tiny-sd", (1, 4, 12, 18)),
    # 3 x 4 tiles, batch 2, the 2x VAE.
    ("alt", "tiny-sd-alt", (2, 4, 30, 40)),
]


def vae_tiling_references(out: Path, seed: int = 2024):
    """Inputs and outputs of diffusers' tiled decode, in ``reference/vae_tiling.safetensors``:
    ``<case>.latents`` (before the division by ``scaling_factor``, as the Rust side takes them) and
    ``<case>.image`` = ``vae.decode(latents / scaling_factor)`` with tiling enabled."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    t = {}
    with torch.no_grad():
        for name, model, shape in VAE_TILING_CASES:
            vae = AutoencoderKL.from_pretrained(out / model / "vae").eval()
            vae.enable_tiling()
            latents = torch.randn(shape, generator=g)
            assert latents.shape[-1] > vae.tile_latent_min_size and latents.shape[-2] > vae.tile_latent_min_size
            t[f"{name}.latents"] = latents
            t[f"{name}.image"] = vae.decode(latents / vae.config.scaling_factor).sample
    save_file({k: v.contiguous() for k, v in t.items()}, str(out / "reference" / "vae_tiling.safetensors"))


# Whole-pipeline cases with vae.enable_tiling(); sizes larger than one VAE tile (tiny-sd: 64 px; alt: 32 px).
E2E_TILING_CASES = [
    # latents 12 x 16: 2 x 3 tiles.
    dict(name="tiled_nonsquare", sketch="house_black_on_white.png", prompt="a red barn at dusk", width=128,
         height=96, steps=4, seed=17, guidance_scale=7.5, temperature=0.65, num_images=1, vae_tiling=True),
    # latents 36 x 40 with the 2x VAE: 3 x 4 tiles, two images.
    dict(name="tiled_alt_two_images", model="tiny-sd-alt", controlnet="tiny-controlnet-alt",
         sketch="house_black_on_white.png", prompt="a red barn", width=80, height=72, steps=3, seed=23,
         guidance_scale=7.5, temperature=0.4, num_images=2, vae_tiling=True),
]


def generate(fixtures_dir):
    out = Path(fixtures_dir)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    for sub in ("tiny-sd/unet", "tiny-sd/vae", "tiny-sd/text_encoder", "tiny-controlnet", "tiny-controlnet-bin",
                "tiny-sd-alt", "tiny-controlnet-alt", "reference"):
        shutil.rmtree(out / sub, ignore_errors=True)
    unet, vae, text, controlnet = build_models(out)
    build_alt_models(out)
    draw_sketches(out)
    component_references(out, unet, vae, text, controlnet)
    e2e_references(out)
    # Last, with their own generators: the fixtures above stay byte-identical.
    vae_tiling_references(out)
    e2e_references(out, E2E_TILING_CASES, "e2e_vae_tiling", vae_tiling=True)


if __name__ == "__main__":
    generate(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures")
