#!/usr/bin/env python3
"""Fixtures for the model formats people actually have (issue 14), and diffusers' references on them.

Runs after ``models.py`` (it reads ``tiny-sd/``, ``tiny-controlnet/``, ``tiny-controlnet-alt/`` and
``reference/e2e/square_cfg_0.png``); alone: ``HF_HUB_OFFLINE=1 python tools/fixturegen/formats.py tests/fixtures``.
torch runs on ``FIXTURE_THREADS`` threads (default 1: the committed references were made so; another thread count
can move a few pixels by one unit). Everything is written under
``<fixtures>/formats/`` (removed and rebuilt), plus ``<fixtures>/sketches/house_colour.png`` and
``house_colour_alt.png`` (colour sketches: the img2img start images) and ``pencil_soft.png`` (blurred grey strokes:
the canny input whose edges depend on the thresholds). Nothing else is touched.

The original (LDM / A1111) key layout is produced by this module's own diffusers -> original mapping, generalised
from the logic of diffusers' ``scripts/convert_diffusers_to_original_stable_diffusion.py`` (which hard-codes SD1.5's
four levels) to any number of levels and resnets from the diffusers configs; each written file is then loaded back
with diffusers' own ``from_single_file`` (offline; the tiny sizes given with ``config=<diffusers folder>``) and every
tensor must equal the original (``formats/single_file/manifest.json`` records the checks).

``formats/single_file/``
  ``tiny-sd.safetensors``       tiny-sd in the original layout, f32: ``model.diffusion_model.*`` (UNet),
                                ``first_stage_model.*`` (VAE), ``cond_stage_model.transformer.text_model.*`` (CLIP).
                                Exactly the networks of ``tiny-sd/`` (round trip: every tensor equal).
  ``tiny-sd.fp16.safetensors``  the same keys in float16 (the f32 weights rounded with ``.half()``).
  ``tiny-sd-ema.ckpt``          a training-style torch checkpoint (zip pickle, as ``torch.save`` writes it):
                                top level ``epoch``, ``global_step``, ``pytorch-lightning_version``, ``state_dict``,
                                ``optimizer_states`` (dicts, lists, tuples, floats, None and a few tensors),
                                ``lr_schedulers``, ``callbacks``. ``state_dict`` holds the fp16 weights of
                                ``tiny-sd.fp16.safetensors`` plus ``model_ema.<flattened key>`` EMA copies of every
                                UNet tensor (different values: they give another image), ``model_ema.decay``,
                                ``model_ema.num_updates``, the DDPM schedule buffers (``betas``, ``alphas_cumprod``,
                                ...: f32 [1000]) and ``cond_stage_model.transformer.text_model.embeddings.position_ids``
                                (int64 [1, 77]). diffusers takes the non-EMA ``model.diffusion_model.*`` weights by
                                default and the EMA ones with ``extract_ema=True``.
  ``tiny-sd.yaml``              ``v1-inference.yaml`` with tiny-sd's sizes (see ``TINY_YAML`` for the keys that
                                real LDM yamls do not have: ``norm_num_groups`` and the text encoder sizes).
  ``tiny-controlnet.safetensors`` tiny-controlnet in the original layout with the ``control_model.`` prefix, f32.
  ``tiny-controlnet.pth``       the same with plain keys (``input_blocks``, ``zero_convs``, ``middle_block_out``,
                                ``input_hint_block``, ...), a zip pickle of the bare state dict, f32.
  ``tiny-vae-alt.safetensors``  ``formats/tiny-vae-alt`` in the original layout without prefix (``encoder.*``,
                                ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``, as vae-ft-mse files), f32.
  ``manifest.json``             per file: format, dtype, key count, sha256, how diffusers loaded it, the result of
                                the round trip, and ``infer_diffusers_model_type``.
``formats/tiny-vae-alt/``       a second tiny VAE (tiny-sd's VAE config, other random weights), diffusers folder.
``formats/textual_inversion/``  embeddings sized to tiny-sd's text encoder (32):
  ``tiny-style.pt``             A1111 ``.pt``: ``string_to_token {'*': 265}``, ``string_to_param {'*': [2, 32]}``,
                                ``name``, ``step``, ``sd_checkpoint``, ``sd_checkpoint_name``.
  ``tiny-neg.safetensors``      A1111 ``.safetensors``: ``emb_params`` [3, 32].
  ``learned_embeds.safetensors`` diffusers: ``{"<tiny-cat>": [1, 32]}``.
``formats/reference/``          diffusers' images for each case of ``CASES`` and ``cases.json`` (the manifest: every
                                parameter, how diffusers was called, and the measured differences), the control and
                                start images, and ``text_encoder.safetensors`` + ``text_encoder.json`` (token ids and
                                hidden states for clip skip and textual inversion).
``formats/preprocess/``         ``cases.json`` + PNGs: ``lineart`` and OpenCV ``canny`` references.
``formats/bad/``                files to refuse, with ``manifest.json`` saying what is wrong with each.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import models  # noqa: E402
from sketch import reference_preprocess  # noqa: E402

ROOT = "formats"

# =============================================================================================================
# diffusers -> original (LDM) key mapping, from the diffusers configs
# =============================================================================================================

_RESNET = [  # (diffusers, LDM) inside a UNet resnet
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]


def _unet_resnet(rest: str) -> str:
    for hf, ldm in _RESNET:
        if rest.startswith(hf + "."):
            return ldm + rest[len(hf):]
    raise KeyError(rest)


def _unet_common(k: str, config: dict) -> str | None:
    """The keys a UNet and a ControlNet share (time embedding, conv_in, down blocks, mid block); None otherwise."""
    lpb = config["layers_per_block"]
    fixed = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
    }
    for hf, ldm in fixed.items():
        if k.startswith(hf + "."):
            return ldm + k[len(hf):]
    p = k.split(".")
    if p[0] == "down_blocks":
        i = int(p[1])
        if p[2] == "resnets":
            return f"input_blocks.{(lpb + 1) * i + int(p[3]) + 1}.0." + _unet_resnet(".".join(p[4:]))
        if p[2] == "attentions":  # the transformer's inner names are the same in both layouts
            return f"input_blocks.{(lpb + 1) * i + int(p[3]) + 1}.1." + ".".join(p[4:])
        if p[2] == "downsamplers":  # down_blocks.i.downsamplers.0.conv.X
            return f"input_blocks.{(lpb + 1) * (i + 1)}.0.op." + ".".join(p[5:])
    if p[0] == "mid_block":
        if p[1] == "resnets":
            return f"middle_block.{2 * int(p[2])}." + _unet_resnet(".".join(p[3:]))
        if p[1] == "attentions":
            return "middle_block.1." + ".".join(p[3:])
    return None


def unet_to_ldm(sd: dict, config: dict) -> dict:
    """diffusers UNet2DConditionModel state dict -> LDM ``UNetModel`` keys (without ``model.diffusion_model.``)."""
    lpb = config["layers_per_block"]
    up_types = config["up_block_types"]
    out = {}
    for k, v in sd.items():
        new = _unet_common(k, config)
        if new is None:
            p = k.split(".")
            if k.startswith("conv_norm_out."):
                new = "out.0." + p[-1]
            elif k.startswith("conv_out."):
                new = "out.2." + p[-1]
            elif p[0] == "up_blocks":
                i = int(p[1])
                if p[2] == "resnets":
                    new = f"output_blocks.{(lpb + 1) * i + int(p[3])}.0." + _unet_resnet(".".join(p[4:]))
                elif p[2] == "attentions":
                    new = f"output_blocks.{(lpb + 1) * i + int(p[3])}.1." + ".".join(p[4:])
                elif p[2] == "upsamplers":  # after the last resnet (and its attention, if the block has some)
                    slot = 2 if up_types[i].startswith("CrossAttn") else 1
                    new = f"output_blocks.{(lpb + 1) * i + lpb}.{slot}." + ".".join(p[4:])
        if new is None:
            raise KeyError(f"unmapped UNet key {k}")
        out[new] = v
    assert len(out) == len(sd)
    return out


def controlnet_to_ldm(sd: dict, config: dict) -> dict:
    """diffusers ControlNetModel state dict -> the original ControlNet keys (without ``control_model.``)."""
    n_blocks = len(config["conditioning_embedding_out_channels"]) * 2 - 2
    out = {}
    for k, v in sd.items():
        new = _unet_common(k, config)
        p = k.split(".")
        if new is None:
            if p[0] == "controlnet_down_blocks":
                new = f"zero_convs.{p[1]}.0.{p[2]}"
            elif p[0] == "controlnet_mid_block":
                new = f"middle_block_out.0.{p[1]}"
            elif p[0] == "controlnet_cond_embedding":
                if p[1] == "conv_in":
                    new = f"input_hint_block.0.{p[2]}"
                elif p[1] == "blocks":
                    new = f"input_hint_block.{2 * (int(p[2]) + 1)}.{p[3]}"
                elif p[1] == "conv_out":
                    new = f"input_hint_block.{2 * (n_blocks + 1)}.{p[2]}"
        if new is None:
            raise KeyError(f"unmapped ControlNet key {k}")
        out[new] = v
    assert len(out) == len(sd)
    return out


def vae_to_ldm(sd: dict, config: dict) -> dict:
    """diffusers AutoencoderKL state dict -> LDM ``AutoencoderKL`` keys (without ``first_stage_model.``).

    The mid-block attention's linear layers become 1x1 convolutions ([C, C] -> [C, C, 1, 1]) as in LDM.
    """
    n = len(config["block_out_channels"])
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        new = None
        if p[0] in ("quant_conv", "post_quant_conv"):
            new = k
        elif p[0] in ("encoder", "decoder"):
            side, rest = p[0], p[1:]
            if rest[0] in ("conv_in", "conv_out"):
                new = k
            elif rest[0] == "conv_norm_out":
                new = f"{side}.norm_out.{rest[1]}"
            elif rest[0] == "mid_block" and rest[1] == "resnets":
                new = f"{side}.mid.block_{int(rest[2]) + 1}." + ".".join(rest[3:]).replace("conv_shortcut", "nin_shortcut")
            elif rest[0] == "mid_block" and rest[1] == "attentions":
                tail = ".".join(rest[3:])
                for hf, ldm in attn.items():
                    if tail.startswith(hf + "."):
                        new = f"{side}.mid.attn_1.{ldm}" + tail[len(hf):]
                        if new.endswith(".weight") and ldm != "norm":
                            v = v.reshape(*v.shape, 1, 1)
            elif rest[0] in ("down_blocks", "up_blocks"):
                i = int(rest[1])
                lvl, name = (i, "down") if rest[0] == "down_blocks" else (n - 1 - i, "up")
                if rest[2] == "resnets":
                    new = f"{side}.{name}.{lvl}.block.{rest[3]}." + ".".join(rest[4:]).replace("conv_shortcut", "nin_shortcut")
                elif rest[2] in ("downsamplers", "upsamplers"):
                    sampler = "downsample" if name == "down" else "upsample"
                    new = f"{side}.{name}.{lvl}.{sampler}." + ".".join(rest[4:])
        if new is None:
            raise KeyError(f"unmapped VAE key {k}")
        out[new] = v
    assert len(out) == len(sd)
    return out


def clip_to_ldm(sd: dict) -> dict:
    """transformers CLIPTextModel state dict -> ``cond_stage_model.transformer.text_model.*`` (SD1's
    FrozenCLIPEmbedder holds a CLIPTextModel: the same names under that prefix). transformers >= 5.6 saves the
    keys without the ``text_model.`` level; older versions with it: both give the same original keys."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("text_model.")
        out["cond_stage_model.transformer.text_model." + k] = v
    return out


def ldm_flat_ema_key(key: str) -> str:
    """The EMA copy's name in LDM checkpoints: ``model.diffusion_model.a.0.b`` -> ``model_ema.diffusion_modela0b``."""
    return "model_ema." + "".join(key.split(".")[1:])


# =============================================================================================================
# helpers
# =============================================================================================================


def _load_dir_sd(path: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    assert len(files) == 1, files
    return load_file(str(files[0]))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rel(out: Path, p: Path) -> str:
    return str(p.relative_to(out))


def _save_st(tensors: dict, path: Path, metadata: dict | None = None):
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def _compare_sd(name: str, got: dict, want: dict) -> dict:
    """Every tensor of ``want`` must be in ``got`` with the same shape and values; returns the record."""
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    worst = 0.0
    for k, w in want.items():
        if k in got:
            g = got[k]
            assert g.shape == w.shape, f"{name}: {k} shape {tuple(g.shape)} != {tuple(w.shape)}"
            worst = max(worst, (g.float() - w.float()).abs().max().item() if w.numel() else 0.0)
    rec = {"tensors": len(want), "missing": missing, "unexpected": extra, "max_abs_diff": worst}
    assert not missing and not extra and worst == 0.0, f"{name}: round trip failed {rec}"
    return rec


def stats(a: np.ndarray, b: np.ndarray) -> dict:
    """mean, 99.9th percentile (as tests/e2e_parity.rs) and max of |a - b| in 0..255 units."""
    d = np.sort(np.abs(a.astype(np.int16) - b.astype(np.int16)).ravel())
    idx = min(int(np.ceil(len(d) * 0.999)) - 1, len(d) - 1)
    return {"mean_abs_diff": round(float(d.mean()), 4), "p999": float(d[idx]), "max": float(d[-1])}


# =============================================================================================================
# 1-3. single files, ControlNet, VAE override
# =============================================================================================================

TINY_YAML = """\
# v1-inference.yaml (Stable Diffusion 1.x) with the sizes of tests/fixtures/tiny-sd.
# Standard LDM keys, except the three marked EXTENSION: real LDM code has no such parameter (GroupNorm is always
# 32 groups, and FrozenCLIPEmbedder is always CLIP ViT-L/14: 768 wide, 12 layers, 12 heads, quick_gelu). A reader
# takes 32 groups and ViT-L/14 when they are absent. Written by tools/fixturegen/formats.py.
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 8
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False

    scheduler_config: # 10000 warmup steps
      target: ldm.lr_scheduler.LambdaLinearScheduler
      params:
        warm_up_steps: [ 10000 ]
        cycle_lengths: [ 10000000000000 ]
        f_start: [ 1.e-6 ]
        f_max: [ 1. ]
        f_min: [ 1. ]

    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32 # unused
        in_channels: 4
        out_channels: 4
        model_channels: 16
        attention_resolutions: [ 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 2 ]
        num_heads: 4
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 32
        use_checkpoint: True
        legacy: False
        norm_num_groups: 8 # EXTENSION (LDM: always 32)

    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 64
          in_channels: 3
          out_ch: 3
          ch: 16
          ch_mult:
          - 1
          - 2
          - 2
          - 2
          num_res_blocks: 1
          attn_resolutions: []
          dropout: 0.0
          norm_num_groups: 8 # EXTENSION (LDM: always 32)
        lossconfig:
          target: torch.nn.Identity

    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
      params:
        layer: last
        # EXTENSION (LDM: always CLIP ViT-L/14)
        text_config:
          vocab_size: 49408
          hidden_size: 32
          intermediate_size: 64
          num_hidden_layers: 2
          num_attention_heads: 4
          max_position_embeddings: 77
          hidden_act: quick_gelu
"""

EMA_DECAY = 0.9999


def _schedule_buffers() -> dict:
    """LatentDiffusion's registered DDPM buffers (``register_schedule`` with SD1's linear_start/end), f32 [1000]."""
    betas = torch.linspace(0.00085**0.5, 0.0120**0.5, 1000, dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    t = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": torch.log(torch.clamp(post_var, min=1e-20)),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
    }
    return {k: v.float() for k, v in t.items()}


def tiny_sd_ldm(out: Path) -> dict:
    """tiny-sd as one original-layout state dict (f32)."""
    sd = out / "tiny-sd"
    unet_cfg = json.loads((sd / "unet" / "config.json").read_text())
    vae_cfg = json.loads((sd / "vae" / "config.json").read_text())
    ldm = {}
    ldm.update({"model.diffusion_model." + k: v for k, v in unet_to_ldm(_load_dir_sd(sd / "unet"), unet_cfg).items()})
    ldm.update({"first_stage_model." + k: v for k, v in vae_to_ldm(_load_dir_sd(sd / "vae"), vae_cfg).items()})
    ldm.update(clip_to_ldm(_load_dir_sd(sd / "text_encoder")))
    return ldm


def build_vae_alt(out: Path, seed: int = 4321) -> Path:
    """A second VAE with tiny-sd's VAE config and other random weights (diffusers folder)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**models.vae_kwargs()).eval()
    d = out / ROOT / "tiny-vae-alt"
    vae.save_pretrained(d, safe_serialization=True)
    return d


def write_single_files(out: Path) -> dict:
    """Writes formats/single_file/* and checks every file with diffusers' from_single_file; returns the manifest."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from transformers import CLIPTextModel

    sf = out / ROOT / "single_file"
    sf.mkdir(parents=True, exist_ok=True)
    manifest = {"files": {}, "notes": {}}

    # --- tiny-sd ---------------------------------------------------------------------------------------------
    ldm = tiny_sd_ldm(out)
    f32 = sf / "tiny-sd.safetensors"
    _save_st(ldm, f32)
    fp16 = sf / "tiny-sd.fp16.safetensors"
    ldm16 = {k: v.half() for k, v in ldm.items()}
    _save_st(ldm16, fp16)

    # The training-style checkpoint: fp16 weights + EMA copies + extras.
    g = torch.Generator().manual_seed(777)
    state = dict(ldm16)
    ema_count = 0
    for k, v in ldm.items():
        if k.startswith("model.diffusion_model."):
            noise = torch.randn(v.shape, generator=g) * (0.3 * v.float().std() if v.numel() > 1 else 0.0)
            state[ldm_flat_ema_key(k)] = (v + noise).half()
            ema_count += 1
    state["model_ema.decay"] = torch.tensor(EMA_DECAY, dtype=torch.float32)
    state["model_ema.num_updates"] = torch.tensor(840000, dtype=torch.int32)
    state.update(_schedule_buffers())
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
    ckpt_obj = {
        "epoch": 6,
        "global_step": 840000,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": state,
        "optimizer_states": [
            {
                "state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.zeros(4), "exp_avg_sq": torch.ones(4)}},
                "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01,
                                  "amsgrad": False, "maximize": False, "foreach": None, "params": [0]}],
            }
        ],
        "lr_schedulers": [{"base_lrs": [1e-4], "last_epoch": 840000, "verbose": False}],
        "callbacks": {"ModelCheckpoint": {"monitor": None, "best_model_score": None, "best_model_path": ""}},
    }
    ckpt = sf / "tiny-sd-ema.ckpt"
    torch.save(ckpt_obj, ckpt)
    (sf / "tiny-sd.yaml").write_text(TINY_YAML)

    cfg_dir = str(out / "tiny-sd")
    unet_ref = _load_dir_sd(out / "tiny-sd" / "unet")
    vae_ref = _load_dir_sd(out / "tiny-sd" / "vae")
    te_ref = {k.removeprefix("text_model."): v for k, v in _load_dir_sd(out / "tiny-sd" / "text_encoder").items()}

    def te_sd(m):
        return {k.removeprefix("text_model."): v for k, v in m.state_dict().items() if not k.endswith("position_ids")}

    def check_sd_file(path: Path, dtype_ref, **kw):
        """from_single_file of each component (config from tiny-sd/<component>), compared with the originals."""
        rec = {}
        conv = (lambda t: t.half().float()) if dtype_ref == "fp16" else (lambda t: t)
        u = UNet2DConditionModel.from_single_file(str(path), config=cfg_dir, subfolder="unet",
                                                  local_files_only=True, torch_dtype=torch.float32, **kw)
        want_u = {k: conv(v) for k, v in unet_ref.items()}
        if kw.get("extract_ema"):
            unet_cfg = json.loads((out / "tiny-sd" / "unet" / "config.json").read_text())
            inv = unet_to_ldm({k: k for k in unet_ref}, unet_cfg)  # LDM name -> diffusers name
            want_u = {inv[k.removeprefix("model.diffusion_model.")]: state[ldm_flat_ema_key(k)].float()
                      for k in ldm if k.startswith("model.diffusion_model.")}
        rec["unet"] = _compare_sd(f"{path.name} unet", u.state_dict(), want_u)
        v = AutoencoderKL.from_single_file(str(path), config=cfg_dir, subfolder="vae", local_files_only=True,
                                           torch_dtype=torch.float32)
        rec["vae"] = _compare_sd(f"{path.name} vae", v.state_dict(), {k: conv(t) for k, t in vae_ref.items()})
        return rec

    def pipeline_check(path: Path, dtype_ref, **kw):
        """The whole pipeline through StableDiffusionControlNetPipeline.from_single_file(config=tiny-sd)."""
        from diffusers import StableDiffusionControlNetPipeline

        cn = ControlNetModel.from_pretrained(out / "tiny-controlnet")
        p = StableDiffusionControlNetPipeline.from_single_file(
            str(path), config=cfg_dir, controlnet=cn, safety_checker=None, feature_extractor=None,
            local_files_only=True, torch_dtype=torch.float32, **kw)
        conv = (lambda t: t.half().float()) if dtype_ref == "fp16" else (lambda t: t)
        assert isinstance(p.text_encoder, CLIPTextModel)
        rec = {"text_encoder": _compare_sd(f"{path.name} text_encoder", te_sd(p.text_encoder),
                                           {k: conv(t) for k, t in te_ref.items()})}
        if not kw.get("extract_ema"):
            rec["unet"] = _compare_sd(f"{path.name} pipe unet", p.unet.state_dict(),
                                      {k: conv(t) for k, t in unet_ref.items()})
        rec["vae"] = _compare_sd(f"{path.name} pipe vae", p.vae.state_dict(), {k: conv(t) for k, t in vae_ref.items()})
        return rec

    def infer(path):
        from diffusers.loaders.single_file_utils import load_single_file_checkpoint

        return infer_diffusers_model_type(load_single_file_checkpoint(str(path)))

    for path, dtype, desc, kw in (
        (f32, "f32", "tiny-sd, original layout, f32", {}),
        (fp16, "fp16", "tiny-sd, original layout, float16", {}),
        (ckpt, "fp16", "training-style torch checkpoint: fp16 weights, EMA copies, extra keys", {}),
    ):
        rec = {"description": desc, "dtype": dtype, "bytes": path.stat().st_size, "sha256": _sha256(path),
               "diffusers_model_type": infer(path)}
        rec["from_single_file"] = {
            "call": "StableDiffusionControlNetPipeline.from_single_file(path, config='tiny-sd', controlnet=..., "
                    "safety_checker=None, feature_extractor=None, local_files_only=True, torch_dtype=torch.float32)"
                    "; UNet2DConditionModel/AutoencoderKL.from_single_file(path, config='tiny-sd', subfolder=...)",
            "components": {**check_sd_file(path, dtype), **pipeline_check(path, dtype)},
            "equal_to": "tiny-sd/ weights" + (" rounded to float16 (.half())" if dtype == "fp16" else ""),
        }
        manifest["files"][_rel(out, path)] = rec
        print(f"  {path.name}: round trip ok ({rec['diffusers_model_type']})", flush=True)

    with open(ckpt, "rb") as fh:
        top = torch.load(fh, map_location="cpu", weights_only=True)
    rec = manifest["files"][_rel(out, ckpt)]
    rec["top_level_keys"] = sorted(top)
    rec["state_dict_keys"] = len(state)
    rec["ema_keys"] = ema_count
    rec["extra_state_dict_keys"] = sorted(k for k in state if not k.startswith(
        ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) and not
        (k.startswith("model_ema.") and k not in ("model_ema.decay", "model_ema.num_updates")))
    rec["extra_state_dict_keys"].append("cond_stage_model.transformer.text_model.embeddings.position_ids")
    rec["ema"] = {
        "key_rule": "model_ema. + ''.join(key.split('.')[1:]) for every model.diffusion_model.* key, e.g. "
                    "model.diffusion_model.input_blocks.0.0.weight -> model_ema.diffusion_modelinput_blocks00weight",
        "values": "non-EMA UNet tensor + N(0, (0.3 * its std)^2) noise, rounded to fp16 (generator seed 777)",
        "diffusers_default": "non-EMA (model.diffusion_model.*); extract_ema=True takes model_ema.* "
                             "(only when more than 100 keys start with model_ema)",
        "extract_ema_check": check_sd_file(ckpt, "fp16", extract_ema=True)["unet"],
    }

    # The yaml: diffusers' own yaml -> config functions (create_*_diffusers_config_from_ldm, what
    # from_single_file(original_config=...) calls) plus the norm_num_groups extension, which diffusers does not
    # read and from_single_file(original_config=...) cannot take as a keyword; then diffusers' own LDM -> diffusers
    # conversion, loaded strictly.
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm, fetch_original_config,
                                                     load_single_file_checkpoint)

    yaml_path = sf / "tiny-sd.yaml"
    oc = fetch_original_config(str(yaml_path))
    ck = load_single_file_checkpoint(str(f32))
    ucfg = create_unet_diffusers_config_from_ldm(oc, ck)
    ucfg["norm_num_groups"] = oc["model"]["params"]["unet_config"]["params"]["norm_num_groups"]
    u = UNet2DConditionModel.from_config(ucfg)
    u.load_state_dict(convert_ldm_unet_checkpoint(ck, ucfg), strict=True)
    vcfg = create_vae_diffusers_config_from_ldm(oc, ck)
    vcfg["norm_num_groups"] = oc["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["norm_num_groups"]
    v = AutoencoderKL.from_config(vcfg)
    v.load_state_dict(convert_ldm_vae_checkpoint(ck, vcfg), strict=True)
    unet_cfg = json.loads((out / "tiny-sd" / "unet" / "config.json").read_text())
    vae_cfg = json.loads((out / "tiny-sd" / "vae" / "config.json").read_text())
    fields_u = ["in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                "layers_per_block", "cross_attention_dim", "attention_head_dim", "norm_num_groups",
                "use_linear_projection", "transformer_layers_per_block"]
    fields_v = ["in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                "layers_per_block", "latent_channels", "norm_num_groups", "scaling_factor"]
    yrec = {"unet_config_fields_equal": {}, "vae_config_fields_equal": {}}
    for f in fields_u:
        a, b = u.config[f], unet_cfg[f]
        yrec["unet_config_fields_equal"][f] = (list(a) if isinstance(a, (list, tuple)) else a) == (
            list(b) if isinstance(b, (list, tuple)) else b)
    for f in fields_v:
        a, b = v.config[f], vae_cfg[f]
        yrec["vae_config_fields_equal"][f] = (list(a) if isinstance(a, (list, tuple)) else a) == (
            list(b) if isinstance(b, (list, tuple)) else b)
    assert all(yrec["unet_config_fields_equal"].values()), yrec
    assert all(yrec["vae_config_fields_equal"].values()), yrec
    yrec["unet_weights"] = _compare_sd("yaml unet", u.state_dict(), unet_ref)
    yrec["vae_weights"] = _compare_sd("yaml vae", v.state_dict(), vae_ref)
    yrec["call"] = ("cfg = create_unet_diffusers_config_from_ldm(yaml, checkpoint) (and the VAE's); "
                    "cfg['norm_num_groups'] = yaml extension; Model.from_config(cfg).load_state_dict("
                    "convert_ldm_unet_checkpoint(checkpoint, cfg) / convert_ldm_vae_checkpoint, strict=True)")
    yrec["not_from_the_yaml_in_diffusers"] = {
        "norm_num_groups": "diffusers ignores the yaml extension (so from_single_file(original_config=tiny-sd.yaml) "
                           "fails: GroupNorm(32) on 16 channels); set by hand from the extension (real LDM yamls: "
                           "no such key, 32 groups)",
        "sample_size": "diffusers derives it from the checkpoint's detected type (SD1: 512 px -> UNet 64, VAE 512), "
                       f"not from the yaml: it gave UNet {u.config['sample_size']}, VAE {v.config['sample_size']} "
                       f"(tiny-sd/: {unet_cfg['sample_size']}, {vae_cfg['sample_size']})",
        "text_encoder": "diffusers never reads text encoder sizes from a yaml (it loads a CLIP config: "
                        "openai/clip-vit-large-patch14 from the Hub, or <config>/text_encoder): the yaml's "
                        "text_config is an extension for sketchx",
        "full_pipeline": "StableDiffusionControlNetPipeline.from_single_file(original_config=...) needs the Hub "
                         "for the CLIP config and tokenizer, so the pipeline is built with config='tiny-sd' "
                         "instead (the folder's model_index.json and component configs give the tiny sizes)",
    }
    yrec["unet_heads"] = ("num_heads: 4 -> diffusers attention_head_dim 4, which SD1's UNet2DConditionModel uses "
                          "as the number of heads (head width 16/4, 32/4)")
    yrec["attention_resolutions"] = ("[2, 1]: levels at downsampling rate 1 and 2 have attention, rate 4 not "
                                     "-> CrossAttn, CrossAttn, Down / Up, CrossAttnUp, CrossAttnUp")
    manifest["files"][_rel(out, yaml_path)] = {"description": "v1-inference.yaml with tiny-sd's sizes",
                                               "sha256": _sha256(yaml_path), "diffusers_check": yrec}
    print("  tiny-sd.yaml: diffusers' yaml configs equal tiny-sd's", flush=True)

    # --- ControlNet ------------------------------------------------------------------------------------------
    cn_cfg = json.loads((out / "tiny-controlnet" / "config.json").read_text())
    cn_ref = _load_dir_sd(out / "tiny-controlnet")
    cn_ldm = controlnet_to_ldm(cn_ref, cn_cfg)
    cn_st = sf / "tiny-controlnet.safetensors"
    _save_st({"control_model." + k: v for k, v in cn_ldm.items()}, cn_st)
    cn_pth = sf / "tiny-controlnet.pth"
    torch.save({k: v.contiguous() for k, v in cn_ldm.items()}, cn_pth)
    for path, desc in ((cn_st, "tiny-controlnet, original layout with the control_model. prefix, f32"),
                       (cn_pth, "tiny-controlnet, original layout, plain keys, torch zip pickle, f32")):
        m = ControlNetModel.from_single_file(str(path), config=str(out / "tiny-controlnet"), local_files_only=True,
                                             torch_dtype=torch.float32)
        manifest["files"][_rel(out, path)] = {
            "description": desc, "dtype": "f32", "bytes": path.stat().st_size, "sha256": _sha256(path),
            "diffusers_model_type": infer(path),
            "from_single_file": {
                "call": "ControlNetModel.from_single_file(path, config='tiny-controlnet', local_files_only=True)",
                "components": {"controlnet": _compare_sd(path.name, m.state_dict(), cn_ref)},
                "equal_to": "tiny-controlnet/ weights"},
        }
        print(f"  {path.name}: round trip ok", flush=True)

    # --- VAE override ----------------------------------------------------------------------------------------
    vd = build_vae_alt(out)
    va_ref = _load_dir_sd(vd)
    va_path = sf / "tiny-vae-alt.safetensors"
    _save_st(vae_to_ldm(va_ref, vae_cfg), va_path)
    m = AutoencoderKL.from_single_file(str(va_path), config=str(vd), local_files_only=True, torch_dtype=torch.float32)
    manifest["files"][_rel(out, va_path)] = {
        "description": "formats/tiny-vae-alt in the original layout, no prefix (as vae-ft-mse-840000-ema-pruned)",
        "dtype": "f32", "bytes": va_path.stat().st_size, "sha256": _sha256(va_path),
        "from_single_file": {
            "call": "AutoencoderKL.from_single_file(path, config='formats/tiny-vae-alt', local_files_only=True)",
            "components": {"vae": _compare_sd(va_path.name, m.state_dict(), va_ref)},
            "equal_to": "formats/tiny-vae-alt/ weights"},
    }
    print("  tiny-vae-alt.safetensors: round trip ok", flush=True)

    for path in (ckpt, cn_pth):
        manifest["files"][_rel(out, path)]["pickle"] = pickle_summary(path)
    manifest["notes"] = KEY_NOTES
    manifest["generated_with"] = versions()
    (sf / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


KEY_NOTES = {
    "unet": ("model.diffusion_model. + LDM UNetModel names. With L = layers_per_block and levels i: "
             "conv_in = input_blocks.0.0; down_blocks.i.resnets.j = input_blocks.(L+1)i+j+1.0, their attentions "
             ".1; down_blocks.i.downsamplers.0.conv = input_blocks.(L+1)(i+1).0.op; mid_block.resnets.0/1 = "
             "middle_block.0/2, mid_block.attentions.0 = middle_block.1; up_blocks.i.resnets.j (L+1 of them) = "
             "output_blocks.(L+1)i+j.0, attentions .1; up_blocks.i.upsamplers.0.conv = output_blocks.(L+1)i+L.1.conv "
             "without attention in the block, .2.conv with; time_embedding.linear_1/2 = time_embed.0/2; "
             "conv_norm_out = out.0; conv_out = out.2. Resnets: norm1 = in_layers.0, conv1 = in_layers.2, "
             "norm2 = out_layers.0, conv2 = out_layers.3, time_emb_proj = emb_layers.1, conv_shortcut = "
             "skip_connection. Inside attentions (SpatialTransformer) the names are diffusers' (norm, proj_in, "
             "transformer_blocks.k.attn1.to_q, ..., proj_out). diffusers counts blocks from the keys and "
             "layers_per_block from the config."),
    "vae": ("first_stage_model. + LDM names (a separate VAE file: no prefix; diffusers also strips 'vae.'): "
            "encoder/decoder.conv_in, conv_out; conv_norm_out = norm_out; encoder.down_blocks.i.resnets.j = "
            "encoder.down.i.block.j; downsamplers.0.conv = down.i.downsample.conv; decoder.up_blocks.i = "
            "decoder.up.(n-1-i) (reversed) with .block.j and .upsample.conv; mid_block.resnets.0/1 = mid.block_1/2; "
            "mid_block.attentions.0.group_norm/to_q/to_k/to_v/to_out.0 = mid.attn_1.norm/q/k/v/proj_out whose "
            "weights are 1x1 convolutions [C, C, 1, 1] (diffusers: linear [C, C]; it drops the 1x1); "
            "conv_shortcut = nin_shortcut; quant_conv, post_quant_conv unchanged."),
    "text_encoder": ("cond_stage_model.transformer.text_model. + CLIPTextModel's text_model names "
                     "(embeddings.token_embedding.weight, embeddings.position_embedding.weight, "
                     "encoder.layers.k.{self_attn.{q,k,v,out}_proj, layer_norm1, layer_norm2, mlp.fc1, mlp.fc2}, "
                     "final_layer_norm). diffusers strips the prefix; an embeddings.position_ids key (int64, older "
                     "checkpoints) is ignored."),
    "controlnet": ("the UNet's input_blocks / middle_block / time_embed names, plus zero_convs.i.0 = "
                   "controlnet_down_blocks.i, middle_block_out.0 = controlnet_mid_block, input_hint_block.0 = "
                   "controlnet_cond_embedding.conv_in, input_hint_block.2(k+1) = blocks.k, input_hint_block.14 = "
                   "conv_out (diffusers hard-codes 14: 6 blocks); either all under control_model. (diffusers: when "
                   "time_embed.0.weight is not a key) or plain."),
    "ema": ("model_ema.<key without dots> copies of the UNet; diffusers ignores them unless extract_ema=True and "
            "more than 100 keys start with model_ema; model_ema.decay / num_updates are scalars."),
    "fp16": ("diffusers loads fp16 files into f32 models (torch_dtype=float32): the weights are the fp16 values "
             "exactly; references on fp16 files are therefore those of the rounded weights."),
    "checkpoint_wrapping": "diffusers unwraps 'state_dict' (repeatedly) and ignores every other top-level entry.",
    "detection": ("diffusers' infer_diffusers_model_type: SD1 ('v1') is the fallback; SD2 = model.diffusion_model."
                  "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight with 1024 columns; SDXL = conditioner."
                  "embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias; inpainting = input_blocks.0.0.weight "
                  "with 9 input channels; ControlNet = control_model.time_embed.0.weight (a plain-key ControlNet "
                  "such as tiny-controlnet.pth is not recognised by that function: it reports 'v1'; "
                  "ControlNetModel.from_single_file takes it because time_embed.0.weight is a top-level key)"),
    "tiny_sizes": ("from_single_file was told the tiny sizes with config=<diffusers folder>: "
                   "StableDiffusionControlNetPipeline.from_single_file(file, config='tests/fixtures/tiny-sd', "
                   "controlnet=..., local_files_only=True) reads model_index.json and unet/, vae/, text_encoder/ "
                   "configs, tokenizer/ and scheduler/ from the folder and only the weights from the file; "
                   "ControlNetModel.from_single_file(file, config='tests/fixtures/tiny-controlnet'); "
                   "AutoencoderKL.from_single_file(file, config='tests/fixtures/formats/tiny-vae-alt'). The yaml "
                   "route (original_config=) cannot build the tiny model in diffusers (no norm groups in LDM "
                   "yamls, CLIP config from the Hub): tiny-sd.yaml was checked with diffusers' yaml -> config "
                   "functions instead (see its entry)."),
}


# =============================================================================================================
# 4. textual inversion
# =============================================================================================================

TI = {
    # name: (file, format, token bound in diffusers, vectors, seed)
    "pt": ("tiny-style.pt", "a1111_pt", "<tiny-style>", 2, 31),
    "neg": ("tiny-neg.safetensors", "a1111_safetensors", "tinyneg", 3, 32),
    "diffusers": ("learned_embeds.safetensors", "diffusers", "<tiny-cat>", 1, 33),
}
TI_SCALE = 0.5  # the std of the vectors (tiny-sd's token embeddings: 0.02); large enough to change the image


def ti_vectors(key: str) -> torch.Tensor:
    _, _, _, n, seed = TI[key]
    return torch.randn((n, 32), generator=torch.Generator().manual_seed(seed)) * TI_SCALE


def pickle_summary(path: Path) -> dict:
    """What a tensors-only pickle reader meets in a torch zip checkpoint (parsed with pickletools, never loaded)."""
    import collections
    import pickletools

    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl")][0]
        ops, globals_ = collections.Counter(), set()
        storages = collections.Counter()
        last_global = None
        for op, arg, _ in pickletools.genops(z.read(pkl)):
            ops[op.name] += 1
            if op.name == "GLOBAL":
                globals_.add(arg)
                last_global = arg
            if op.name == "BINPERSID" and last_global and last_global.endswith("Storage"):
                storages[last_global] += 1
    return {
        "zip_entries_besides_data": sorted({n.split("/", 1)[1] for n in names if "/data/" not in n}),
        "zip_root": pkl.split("/")[0] + "/ (torch.save uses the file stem; older files use archive/)",
        "data_pkl": pkl, "tensor_data": pkl.rsplit("/", 1)[0] + "/data/<storage key> (raw little-endian)",
        "opcodes": sorted(ops), "globals": sorted(globals_),
        "note": "tensors: REDUCE of torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, "
                "backward_hooks = collections.OrderedDict()) whose storage is a BINPERSID of the tuple ('storage', "
                "torch.<T>Storage, key, 'cpu', numel)",
    }


def versions() -> dict:
    import diffusers
    import safetensors
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__}


def write_textual_inversion(out: Path) -> dict:
    d = out / ROOT / "textual_inversion"
    d.mkdir(parents=True, exist_ok=True)
    files = {}
    f, fmt, tok, n, _ = TI["pt"]
    torch.save({
        "string_to_token": {"*": 265},
        "string_to_param": {"*": ti_vectors("pt")},
        "name": "tiny-style",
        "step": 1500,
        "sd_checkpoint": "0123456789",
        "sd_checkpoint_name": "tiny-sd",
    }, d / f)
    files["pt"] = d / f
    f, fmt, tok, n, _ = TI["neg"]
    _save_st({"emb_params": ti_vectors("neg")}, d / f)
    files["neg"] = d / f
    f, fmt, tok, n, _ = TI["diffusers"]
    _save_st({tok: ti_vectors("diffusers")}, d / f)
    files["diffusers"] = d / f
    (d / "manifest.json").write_text(json.dumps({
        "width": 32,
        "values": f"torch.randn((vectors, 32), generator=torch.Generator().manual_seed(seed)) * {TI_SCALE}",
        "files": {
            TI["pt"][0]: {"format": "A1111 .pt (torch zip pickle)", "vectors": 2, "seed": TI["pt"][4],
                          "contents": "{'string_to_token': {'*': 265}, 'string_to_param': {'*': f32 [2, 32]}, "
                                      "'name': 'tiny-style', 'step': 1500, 'sd_checkpoint': '0123456789', "
                                      "'sd_checkpoint_name': 'tiny-sd'}",
                          "token_used": TI["pt"][2],
                          "diffusers_default_token": "the 'name' entry ('tiny-style') when no token is given"},
            TI["neg"][0]: {"format": "A1111 .safetensors", "vectors": 3, "seed": TI["neg"][4],
                           "contents": "{'emb_params': f32 [3, 32]}", "token_used": TI["neg"][2],
                           "diffusers_default_token": "diffusers has no emb_params rule: a one-key file is read as "
                                                      "{token: vectors}, so without token= the token would be "
                                                      "'emb_params'; A1111 binds the file name (tiny-neg)"},
            TI["diffusers"][0]: {"format": "diffusers learned_embeds.safetensors", "vectors": 1,
                                 "seed": TI["diffusers"][4], "contents": "{'<tiny-cat>': f32 [1, 32]}",
                                 "token_used": TI["diffusers"][2], "diffusers_default_token": "the key, <tiny-cat>"},
        },
        "diffusers_call": "pipe.load_textual_inversion(path, token=token_used)",
    }, indent=2) + "\n")
    return files


def load_ti(pipe, out: Path, key: str, negate: bool = False):
    """``pipe.load_textual_inversion`` from the file, or (negate) from the negated vectors as a tensor."""
    f, fmt, tok, n, _ = TI[key]
    if negate:
        pipe.load_textual_inversion(-ti_vectors(key), token=tok)
    else:
        pipe.load_textual_inversion(str(out / ROOT / "textual_inversion" / f), token=tok)


# =============================================================================================================
# 5. reference images
# =============================================================================================================

BASE = dict(sketch="house_black_on_white.png", prompt="a cozy house, watercolor", width=64, height=64, steps=6,
            seed=42, guidance_scale=7.5, temperature=0.65, num_images=1)
SF = "formats/single_file/"
CASES = [
    # The single files against the diffusers-layout load (= reference/e2e/square_cfg_0.png).
    dict(BASE, name="single_file_f32", model_file=SF + "tiny-sd.safetensors",
         controlnet_file=SF + "tiny-controlnet.safetensors"),
    dict(BASE, name="controlnet_pth", controlnet_file=SF + "tiny-controlnet.pth"),
    dict(BASE, name="single_file_fp16", model_file=SF + "tiny-sd.fp16.safetensors"),
    dict(BASE, name="ckpt_default_non_ema", model_file=SF + "tiny-sd-ema.ckpt"),
    dict(BASE, name="ckpt_extract_ema", model_file=SF + "tiny-sd-ema.ckpt", extract_ema=True),
    # Textual inversion (each: + the same case with the vectors negated, for sensitivity).
    dict(BASE, name="ti_a1111_pt_prompt", prompt="a cozy house, <tiny-style> watercolor",
         textual_inversion=["pt"]),
    dict(BASE, name="ti_a1111_safetensors_negative", negative_prompt="tinyneg, lowres, bad anatomy",
         textual_inversion=["neg"]),
    dict(BASE, name="ti_diffusers_prompt", prompt="a <tiny-cat> on a roof, watercolor", textual_inversion=["diffusers"]),
    dict(BASE, name="ti_all_three", prompt="a <tiny-cat> and a cozy house, <tiny-style>",
         negative_prompt="tinyneg, lowres", textual_inversion=["pt", "neg", "diffusers"], seed=5, steps=5),
    # clip skip
    dict(BASE, name="clip_skip_1", clip_skip=1),
    dict(BASE, name="clip_skip_1_ti_euler", clip_skip=1, scheduler="euler", prompt="a cozy house, <tiny-style>",
         textual_inversion=["pt"]),
    # VAE override
    dict(BASE, name="vae_override_folder", vae="formats/tiny-vae-alt"),
    dict(BASE, name="vae_override_single_file", vae_file=SF + "tiny-vae-alt.safetensors"),
    # img2img (ControlNet img2img pipeline; the start image is the colour sketch, the control its scribble)
    dict(BASE, name="img2img_strength_0.5", sketch="house_colour.png", start_image="house_colour.png", strength=0.5,
         steps=8),
    dict(BASE, name="img2img_strength_0.8", sketch="house_colour.png", start_image="house_colour.png", strength=0.8,
         steps=8),
    dict(BASE, name="img2img_other_start", sketch="house_colour.png", start_image="house_colour_alt.png",
         strength=0.5, steps=8),
    dict(BASE, name="img2img_ddim_two_images", sketch="house_colour.png", start_image="house_colour.png",
         strength=0.6, steps=7, scheduler="ddim", num_images=2, width=96, height=64, seed=2024, guidance_scale=5.0,
         prompt="a red house at noon"),
    dict(BASE, name="img2img_vae_override_single_file", sketch="house_colour.png", start_image="house_colour.png",
         strength=0.7, steps=6, vae_file=SF + "tiny-vae-alt.safetensors", model_file=SF + "tiny-sd.safetensors"),
]

# (case, what, against-case or None for "the same case with the TI vectors negated")
SENSITIVITY = [
    ("ckpt_extract_ema", "EMA instead of non-EMA UNet weights", "ckpt_default_non_ema"),
    ("single_file_fp16", "fp16-rounded weights (no visible change expected: not a sensitivity check)", "single_file_f32"),
    ("ti_a1111_pt_prompt", "TI vectors (negated)", None),
    ("ti_a1111_safetensors_negative", "TI vectors in the negative prompt (negated)", None),
    ("ti_diffusers_prompt", "TI vector (negated)", None),
    ("clip_skip_1", "clip_skip 1 vs none", "@base"),
    ("vae_override_folder", "VAE swapped", "@base"),
    ("img2img_strength_0.8", "strength 0.8 vs 0.5", "img2img_strength_0.5"),
    ("img2img_other_start", "start image house_colour_alt vs house_colour", "img2img_strength_0.5"),
]


def draw_colour_sketches(out: Path):
    """Colour sketches (96x80 like the other house sketches). house_colour.png: dark outlines, pastel fills whose
    darkest channel is >= 127, so scribble preprocessing keeps the outlines only (it is the sketch and the start
    image); house_colour_alt.png: the same drawing in dark saturated colours (only used as another start image)."""
    d = out / "sketches"

    def draw(wall, roof, sun, sky, door, ground=(255, 255, 255)):
        im = Image.new("RGB", (96, 80), ground)
        dr = ImageDraw.Draw(im)
        w, h = 96, 80
        dr.rectangle([0, 0, w, h * 0.5], fill=sky)
        dr.polygon([(w * 0.15, h * 0.5), (w * 0.45, h * 0.15), (w * 0.75, h * 0.5)], fill=roof)
        dr.rectangle([w * 0.2, h * 0.45, w * 0.7, h * 0.9], fill=wall, outline=(0, 0, 0), width=3)
        dr.line([w * 0.15, h * 0.5, w * 0.45, h * 0.15, w * 0.75, h * 0.5], fill=(0, 0, 0), width=3)
        dr.ellipse([w * 0.75, h * 0.08, w * 0.93, h * 0.3], fill=sun, outline=(0, 0, 0), width=2)
        dr.rectangle([w * 0.38, h * 0.65, w * 0.5, h * 0.9], fill=door, outline=(0, 0, 0), width=2)
        return im

    draw((245, 222, 160), (230, 140, 135), (255, 236, 130), (170, 210, 240), (180, 150, 130)).save(
        d / "house_colour.png")
    # Another start image for the same outlines: a dark night scene in saturated colours.
    draw((200, 40, 40), (40, 110, 40), (250, 220, 0), (30, 40, 110), (60, 30, 10), ground=(70, 50, 30)).save(
        d / "house_colour_alt.png")

    # A soft pencil sketch for canny: strokes of several greys, blurred, so that edge strengths span the usual
    # threshold range (the hard black-on-white sketches give the same edges for every threshold pair).
    from PIL import ImageFilter

    im = Image.new("L", (96, 80), 255)
    dr = ImageDraw.Draw(im)
    w, h = 96, 80
    dr.rectangle([w * 0.2, h * 0.45, w * 0.7, h * 0.9], outline=120, width=2)
    dr.line([w * 0.15, h * 0.5, w * 0.45, h * 0.15, w * 0.75, h * 0.5], fill=170, width=2)
    dr.ellipse([w * 0.75, h * 0.08, w * 0.93, h * 0.3], outline=215, width=2)
    dr.rectangle([w * 0.38, h * 0.65, w * 0.5, h * 0.9], outline=60, width=2)
    dr.line([w * 0.05, h * 0.95, w * 0.95, h * 0.93], fill=235, width=1)
    im.filter(ImageFilter.GaussianBlur(1.0)).convert("RGB").save(d / "pencil_soft.png")


def case_full(c: dict) -> dict:
    c = models.e2e_case(c)
    for k, v in (("model_file", None), ("controlnet_file", None), ("vae", None), ("vae_file", None),
                 ("textual_inversion", []), ("clip_skip", None), ("start_image", None), ("strength", None),
                 ("extract_ema", False)):
        c.setdefault(k, v)
    c["preprocess"] = "scribble"
    return c


def clip_skip_shim(text_encoder):
    """diffusers 0.42.1's clip_skip reads ``text_encoder.text_model.final_layer_norm``, which transformers >= 5.6's
    flattened CLIPTextModel no longer has (AttributeError). The shim makes ``text_model`` the model itself
    (outside the module registry), so diffusers computes what it means: ``final_layer_norm(hidden_states[-(k+1)])``.
    """
    if not hasattr(text_encoder, "text_model"):
        object.__setattr__(text_encoder, "text_model", text_encoder)


def build_pipe(out: Path, c: dict):
    """The diffusers pipeline for a case, and a description of the calls."""
    from diffusers import (AutoencoderKL, ControlNetModel, StableDiffusionControlNetImg2ImgPipeline,
                           StableDiffusionControlNetPipeline)

    calls = []
    cls = StableDiffusionControlNetImg2ImgPipeline if c["start_image"] else StableDiffusionControlNetPipeline
    f32 = torch.float32
    if c["controlnet_file"]:
        cn = ControlNetModel.from_single_file(str(out / c["controlnet_file"]), config=str(out / c["controlnet"]),
                                              local_files_only=True, torch_dtype=f32)
        calls.append(f"controlnet = ControlNetModel.from_single_file('{c['controlnet_file']}', "
                     f"config='{c['controlnet']}', local_files_only=True, torch_dtype=torch.float32)")
    else:
        cn = ControlNetModel.from_pretrained(out / c["controlnet"], torch_dtype=f32)
        calls.append(f"controlnet = ControlNetModel.from_pretrained('{c['controlnet']}')")
    extra = {}
    if c["vae"]:
        extra["vae"] = AutoencoderKL.from_pretrained(out / c["vae"], torch_dtype=f32)
        calls.append(f"vae = AutoencoderKL.from_pretrained('{c['vae']}')")
    elif c["vae_file"]:
        extra["vae"] = AutoencoderKL.from_single_file(str(out / c["vae_file"]), config=str(out / ROOT / "tiny-vae-alt"),
                                                      local_files_only=True, torch_dtype=f32)
        calls.append(f"vae = AutoencoderKL.from_single_file('{c['vae_file']}', config='formats/tiny-vae-alt', "
                     "local_files_only=True, torch_dtype=torch.float32)")
    common = dict(controlnet=cn, safety_checker=None, feature_extractor=None, torch_dtype=f32, **extra)
    vae_kw = ", vae=vae" if extra else ""
    if c["model_file"]:
        kw = {"extract_ema": True} if c["extract_ema"] else {}
        p = cls.from_single_file(str(out / c["model_file"]), config=str(out / c["model"]), local_files_only=True,
                                 **common, **kw)
        calls.append(f"pipe = {cls.__name__}.from_single_file('{c['model_file']}', config='{c['model']}', "
                     f"controlnet=controlnet{vae_kw}, safety_checker=None, feature_extractor=None, "
                     f"local_files_only=True, torch_dtype=torch.float32"
                     + (", extract_ema=True)" if kw else ")"))
    else:
        p = cls.from_pretrained(out / c["model"], requires_safety_checker=False, **common)
        calls.append(f"pipe = {cls.__name__}.from_pretrained('{c['model']}', controlnet=controlnet{vae_kw}, "
                     "safety_checker=None, feature_extractor=None, requires_safety_checker=False)")
    p.set_progress_bar_config(disable=True)
    clip_skip_shim(p.text_encoder)
    return p, calls


def run_case(out: Path, c: dict, negate_ti: bool = False):
    """Runs one case; returns (uint8 images, control image, start image or None, calls)."""
    pipe, calls = build_pipe(out, c)
    for key in c["textual_inversion"]:
        load_ti(pipe, out, key, negate=negate_ti)
        f, fmt, tok, n, _ = TI[key]
        calls.append(f"pipe.load_textual_inversion('formats/textual_inversion/{f}', token='{tok}')")
    pipe.scheduler = models.make_scheduler(c["scheduler"], dict(pipe.scheduler.config))
    calls.append(f"pipe.scheduler = {type(pipe.scheduler).__name__}.from_config(pipe.scheduler.config)")
    control = models.control_image(out / "sketches" / c["sketch"], c["width"], c["height"])
    kw = dict(
        prompt=c["prompt"], negative_prompt=c["negative_prompt"] or None, width=c["width"], height=c["height"],
        num_inference_steps=c["steps"], guidance_scale=c["guidance_scale"], num_images_per_prompt=c["num_images"],
        generator=torch.Generator("cpu").manual_seed(c["seed"]),
        controlnet_conditioning_scale=1.65 - c["temperature"], guess_mode=c["prompt"] == "",
        control_guidance_start=c["control_guidance_start"], control_guidance_end=c["control_guidance_end"],
        output_type="np",
    )
    if c["clip_skip"] is not None:
        kw["clip_skip"] = c["clip_skip"]
        calls.append("object.__setattr__(pipe.text_encoder, 'text_model', pipe.text_encoder)  # formats.clip_skip_shim: "
                     "diffusers 0.42.1 reads text_encoder.text_model.final_layer_norm, gone from transformers 5.23's "
                     "CLIPTextModel; the shim gives diffusers' intended final_layer_norm(hidden_states[-(clip_skip+1)])")
    start = None
    if c["start_image"]:
        # The start image resized like the sketch (decode, PIL LANCZOS to width x height); diffusers' own resize
        # of an image already at that size is a copy.
        start = reference_preprocess(out / "sketches" / c["start_image"], c["width"], c["height"], "none")
        kw.update(image=start, control_image=control, strength=c["strength"])
    else:
        kw.update(image=control)
    call = (f"pipe(prompt=..., negative_prompt=... or None, {'image=start, control_image=control, strength=..., ' if start else 'image=control, '}"
            "width, height, num_inference_steps=steps, guidance_scale, num_images_per_prompt=num_images, "
            "generator=torch.Generator('cpu').manual_seed(seed), controlnet_conditioning_scale=1.65 - temperature, "
            "guess_mode=prompt == '', control_guidance_start, control_guidance_end"
            + (", clip_skip=clip_skip" if c["clip_skip"] is not None else "") + ", output_type='np')")
    calls.append(call)
    with torch.no_grad():
        res = pipe(**kw)
    imgs = (res.images.astype("float32") * 255).round().astype("uint8")
    return imgs, control, start, calls


def write_references(out: Path) -> list:
    ref = out / ROOT / "reference"
    ref.mkdir(parents=True, exist_ok=True)
    base_img = np.asarray(Image.open(out / "reference" / "e2e" / "square_cfg_0.png").convert("RGB"))
    results, cases = {}, []
    for case in CASES:
        c = case_full(case)
        imgs, control, start, calls = run_case(out, c)
        control.save(ref / f"{c['name']}.control.png")
        c["control_image"] = f"{c['name']}.control.png"
        if start is not None:
            start.save(ref / f"{c['name']}.start.png")
            c["start_image_resized"] = f"{c['name']}.start.png"
        c["images"] = []
        for i, arr in enumerate(imgs):
            name = f"{c['name']}_{i}.png"
            Image.fromarray(arr).save(ref / name)
            c["images"].append(name)
        c["pipeline"] = ("StableDiffusionControlNetImg2ImgPipeline" if c["start_image"]
                         else "StableDiffusionControlNetPipeline")
        c["diffusers_calls"] = calls
        c["textual_inversion"] = [
            {"file": f"formats/textual_inversion/{TI[k][0]}", "format": TI[k][1], "token": TI[k][2],
             "vectors": TI[k][3]} for k in c["textual_inversion"]]
        c["compare"] = []
        results[c["name"]] = imgs
        cases.append(c)
        print(f"  {c['name']}: {[a.shape for a in imgs]}", flush=True)
    by = {c["name"]: c for c in cases}

    def add(name, what, other_name, other_img, expect):
        s = stats(results[name][0], other_img)
        s.update({"with": other_name, "what": what, "expect": expect})
        by[name]["compare"].append(s)
        print(f"  {name} vs {other_name} ({what}): mean |diff| {s['mean_abs_diff']:.4f}, p99.9 {s['p999']}, "
              f"max {s['max']}", flush=True)
        return s

    # Equalities: single files vs the diffusers-layout load.
    for name in ("single_file_f32", "controlnet_pth"):
        s = add(name, "diffusers-layout load of the same weights", "reference/e2e/square_cfg_0.png", base_img, "equal")
        assert s["max"] == 0, s
    s = add("vae_override_single_file", "the same VAE from its diffusers folder", "vae_override_folder",
            results["vae_override_folder"][0], "equal")
    assert s["max"] == 0, s
    s = add("ckpt_default_non_ema", "fp16 .safetensors (same non-EMA weights)", "single_file_fp16",
            results["single_file_fp16"][0], "equal")
    assert s["max"] == 0, s
    # Sensitivity.
    for name, what, against in SENSITIVITY:
        c = by[name]
        if against is None:
            imgs, _, _, _ = run_case(out, c | {"textual_inversion": [
                k for k, v in TI.items() if v[2] in [t["token"] for t in c["textual_inversion"]]]}, negate_ti=True)
            s = add(name, what, "same case, TI vectors negated", imgs[0], "different")
        elif against == "@base":
            s = add(name, what, "reference/e2e/square_cfg_0.png", base_img, "different")
        else:
            s = add(name, what, against, results[against][0], "different" if "not a sensitivity" not in what
                    else "close")
        if s["expect"] == "different":
            assert s["mean_abs_diff"] > 1.0, (name, s)
    (ref / "cases.json").write_text(json.dumps(cases, indent=2) + "\n")
    return cases


def write_text_encoder_refs(out: Path):
    """Token ids and hidden states (last layer, and clip_skip=1 as diffusers computes it) for given prompts, with
    and without textual inversion loaded."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    ref = out / ROOT / "reference"
    entries, tensors = [], {}
    prompts = [
        ("plain", "a cozy house, watercolor", []),
        ("empty", "", []),
        ("ti_pt", "a cozy house, <tiny-style> watercolor", ["pt"]),
        ("ti_neg", "tinyneg, lowres, bad anatomy", ["neg"]),
        ("ti_diffusers", "a <tiny-cat> on a roof, watercolor", ["diffusers"]),
        ("ti_all", "<tiny-cat>,<tiny-style> tinyneg x tinyneg", ["pt", "neg", "diffusers"]),
        ("ti_not_loaded", "a cozy house, <tiny-style> watercolor", []),
    ]
    for name, prompt, tis in prompts:
        pipe = StableDiffusionPipeline.from_pretrained(out / "tiny-sd", safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False)
        clip_skip_shim(pipe.text_encoder)
        for k in tis:
            load_ti(pipe, out, k)
        converted = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
        ids = pipe.tokenizer(converted, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            outs = pipe.text_encoder(ids, output_hidden_states=True)
            skip1 = pipe.text_encoder.text_model.final_layer_norm(outs[-1][-2])
            enc = pipe.encode_prompt(prompt, "cpu", 1, False, clip_skip=1)[0]
        assert torch.equal(enc, skip1)
        tensors[f"{name}.input_ids"] = ids.to(torch.int64)
        tensors[f"{name}.hidden"] = outs[0]
        tensors[f"{name}.clip_skip_1"] = skip1
        entries.append({"name": name, "prompt": prompt, "converted_prompt": converted,
                        "textual_inversion": [{"file": f"formats/textual_inversion/{TI[k][0]}", "token": TI[k][2],
                                               "vectors": TI[k][3]} for k in tis],
                        "added_token_ids": {t: pipe.tokenizer.convert_tokens_to_ids(t)
                                            for t in pipe.tokenizer.get_added_vocab()}})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(ref / "text_encoder.safetensors"))
    (ref / "text_encoder.json").write_text(json.dumps({
        "file": "text_encoder.safetensors",
        "tensors": "<name>.input_ids int64 [1, 77]; <name>.hidden f32 [1, 77, 32] = text_encoder(ids)[0] "
                   "(last layer after final_layer_norm); <name>.clip_skip_1 = final_layer_norm(hidden_states[-2]) "
                   "(diffusers' clip_skip=1: the output of the second-to-last layer, then the final LayerNorm)",
        "model": "tiny-sd (text encoder and tokenizer)",
        "notes": [
            "prompts are converted as diffusers' maybe_convert_prompt does: a multi-vector token T of n vectors "
            "becomes 'T T_1 ... T_{n-1}' (str.replace in the prompt), each an added token",
            "added tokens get ids 49408, 49409, ... in load order (pt: <tiny-style>, <tiny-style>_1; neg: "
            "tinyneg, tinyneg_1, tinyneg_2; diffusers: <tiny-cat>), and the text encoder's token embedding "
            "gets the vectors as new rows",
            "diffusers applies clip_skip to the prompt only: the negative prompt's embeddings are always the last "
            "layer's (encode_prompt)",
        ],
        "entries": entries,
    }, indent=2) + "\n")


# =============================================================================================================
# 6. preprocessors
# =============================================================================================================

LINEART_CASES = [("house_black_on_white.png", 96, 80), ("house_black_on_white.png", 128, 96),
                 ("house_white_on_black.png", 64, 64), ("house_colour.png", 96, 80),
                 ("house_transparent.png", 64, 96)]
CANNY_THRESHOLDS = [(200, 250), (100, 200), (50, 100), (10, 30)]
CANNY_INPUTS = [("pencil_soft.png", 96, 80), ("pencil_soft.png", 64, 56), ("house_colour.png", 96, 80),
                ("house_large.png", 128, 96), ("house_transparent.png", 64, 96)]


def lineart(path: Path, width: int, height: int) -> np.ndarray:
    """decode + LANCZOS resize (as scribble), then white lines on black without threshold: 255 - value per channel
    when the image is dark-on-light (the scribble rule: mean of (R+G+B)/3 >= 127.5), unchanged otherwise."""
    rgb = np.asarray(reference_preprocess(path, width, height, "none"))
    total = int(rgb.astype(np.uint64).sum())
    if 2 * total >= 765 * rgb.shape[0] * rgb.shape[1]:
        return 255 - rgb
    return rgb.copy()


def write_preprocess(out: Path):
    import cv2

    d = out / ROOT / "preprocess"
    d.mkdir(parents=True, exist_ok=True)
    cases = []
    for i, (sk, w, h) in enumerate(LINEART_CASES):
        name = f"lineart_{i:02}.png"
        Image.fromarray(lineart(out / "sketches" / sk, w, h), "RGB").save(d / name)
        cases.append({"mode": "lineart", "sketch": sk, "width": w, "height": h, "expected": name})
    for i, (sk, w, h) in enumerate(CANNY_INPUTS):
        src = np.ascontiguousarray(np.asarray(reference_preprocess(out / "sketches" / sk, w, h, "none")))
        inp = f"canny_input_{i:02}.png"
        Image.fromarray(src, "RGB").save(d / inp)
        for lo, hi in CANNY_THRESHOLDS:
            edges = cv2.Canny(src, lo, hi, apertureSize=3, L2gradient=False)
            name = f"canny_{i:02}_{lo}_{hi}.png"
            Image.fromarray(np.repeat(edges[..., None], 3, axis=2), "RGB").save(d / name)
            cases.append({"mode": "canny", "sketch": sk, "width": w, "height": h, "low_threshold": lo,
                          "high_threshold": hi, "aperture_size": 3, "l2_gradient": False, "input": inp,
                          "expected": name, "edge_pixels": int((edges > 0).sum())})
    (d / "cases.json").write_text(json.dumps({
        "opencv": cv2.__version__,
        "sketch_dir": "sketches",
        "lineart": "decode (alpha over white) -> PIL LANCZOS resize to width x height -> if mean((R+G+B)/3) >= "
                   "127.5: 255 - v for every channel, else unchanged; no threshold; RGB PNG",
        "canny": "decode (alpha over white) -> PIL LANCZOS resize (the 'input' PNG) -> cv2.Canny(rgb uint8 HxWx3, "
                 "low_threshold, high_threshold, apertureSize=3, L2gradient=False) on the 3-channel image (OpenCV "
                 "takes, per pixel, the channel with the largest |dx|+|dy| Sobel magnitude) -> 0/255 replicated to "
                 "RGB, as ControlNet's canny annotator (cv2.Canny on the RGB array)",
        "cases": cases,
    }, indent=2) + "\n")


# =============================================================================================================
# 7. bad input
# =============================================================================================================


def _st_bytes(header: dict, data: bytes, pad_to: int = 8) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((-len(h)) % pad_to)
    return struct.pack("<Q", len(h)) + h + data


def _pickle_payload() -> bytes:
    """Hand-written protocol-2 pickle: {'state_dict': {'model.diffusion_model.input_blocks.0.0.weight':
    os.system('echo sketchx-pickle-payload-ran')}} via GLOBAL 'os system' + REDUCE. Never executed here."""
    def uni(s: str) -> bytes:  # BINUNICODE
        b = s.encode()
        return b"X" + struct.pack("<I", len(b)) + b

    return (b"\x80\x02" + b"}" + uni("state_dict") + b"}" + uni("model.diffusion_model.input_blocks.0.0.weight")
            + b"cos\nsystem\n" + uni("echo sketchx-pickle-payload-ran") + b"\x85" + b"R" + b"s" + b"s" + b".")


def write_bad(out: Path):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    d = out / ROOT / "bad"
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(99)

    def r(*shape, dtype=torch.float16):
        return (torch.randn(shape, generator=g) * 0.02).to(dtype)

    m = {}

    sdxl = {
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": r(77, 8),
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": r(16, 8),
        "conditioner.embedders.1.model.positional_embedding": r(77, 8),
        "conditioner.embedders.1.model.token_embedding.weight": r(16, 8),
        "conditioner.embedders.1.model.text_projection": r(8, 8),
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": r(8),
        "model.diffusion_model.input_blocks.0.0.weight": r(16, 4, 3, 3),
        "model.diffusion_model.label_emb.0.0.weight": r(16, 24),
        "model.diffusion_model.time_embed.0.weight": r(64, 16),
        "first_stage_model.decoder.conv_in.weight": r(32, 4, 3, 3),
    }
    _save_st(sdxl, d / "sdxl.safetensors")
    m["sdxl.safetensors"] = {"family": "SDXL", "why": "conditioner.embedders.* (two text encoders) and "
                             "model.diffusion_model.label_emb.*; no cond_stage_model.*",
                             "keys": sorted(sdxl), "shapes": "tiny (not SDXL's)",
                             "diffusers_model_type": infer_diffusers_model_type(sdxl)}
    sd2 = {
        "cond_stage_model.model.token_embedding.weight": r(16, 8),
        "cond_stage_model.model.positional_embedding": r(77, 8),
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": r(24, 8),
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_bias": r(24),
        "cond_stage_model.model.ln_final.weight": r(8),
        "cond_stage_model.model.text_projection": r(8, 8),
        "model.diffusion_model.input_blocks.0.0.weight": r(16, 4, 3, 3),
        "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": r(4, 1024),
        "first_stage_model.decoder.conv_in.weight": r(32, 4, 3, 3),
    }
    _save_st(sd2, d / "sd2.safetensors")
    m["sd2.safetensors"] = {"family": "SD2", "why": "OpenCLIP text encoder cond_stage_model.model.* (no "
                            "cond_stage_model.transformer.*); cross-attention context 1024 wide",
                            "keys": sorted(sd2), "diffusers_model_type": infer_diffusers_model_type(sd2)}
    lora = {}
    for blk in ("down_blocks_0_attentions_0", "up_blocks_1_attentions_0"):
        for proj, dim in (("attn1_to_q", 16 if blk.startswith("down") else 32), ("attn2_to_k", 32)):
            base = f"lora_unet_{blk}_transformer_blocks_0_{proj}"
            out_dim = 16 if blk.startswith("down") else 32
            lora[f"{base}.lora_down.weight"] = r(4, dim)
            lora[f"{base}.lora_up.weight"] = r(out_dim, 4)
            lora[f"{base}.alpha"] = torch.tensor(4.0, dtype=torch.float16)
    for proj in ("q_proj", "v_proj"):
        base = f"lora_te_text_model_encoder_layers_0_self_attn_{proj}"
        lora[f"{base}.lora_down.weight"] = r(4, 32)
        lora[f"{base}.lora_up.weight"] = r(32, 4)
        lora[f"{base}.alpha"] = torch.tensor(4.0, dtype=torch.float16)
    # Written by hand: the safetensors crate writes __metadata__ in a random (hash) order, and the bytes should be
    # reproducible.
    header, chunks, pos = {"__metadata__": {"ss_base_model_version": "sd_v1", "ss_network_alpha": "4",
                                            "ss_network_dim": "4", "ss_network_module": "networks.lora"}}, [], 0
    for k in sorted(lora):
        b = lora[k].contiguous().numpy().tobytes()
        header[k] = {"dtype": "F16", "shape": list(lora[k].shape), "data_offsets": [pos, pos + len(b)]}
        chunks.append(b)
        pos += len(b)
    (d / "lora.safetensors").write_bytes(_st_bytes(header, b"".join(chunks)))
    m["lora.safetensors"] = {"family": "LoRA (kohya)", "why": "lora_unet_* / lora_te_* keys with .lora_down / "
                             ".lora_up / .alpha (shapes fit tiny-sd); metadata ss_network_module=networks.lora",
                             "keys": len(lora)}

    # A small valid file to damage: a few real tiny-sd tensors (f32).
    ldm = tiny_sd_ldm(out)
    small = {k: ldm[k] for k in ("model.diffusion_model.input_blocks.0.0.bias", "model.diffusion_model.input_blocks.0.0.weight",
                                 "model.diffusion_model.time_embed.0.weight")}
    from safetensors.torch import save

    valid = save(small)
    hlen = struct.unpack("<Q", valid[:8])[0]
    (d / "truncated_data.safetensors").write_bytes(valid[: 8 + hlen + (len(valid) - 8 - hlen) // 2])
    m["truncated_data.safetensors"] = {"why": "header intact, data cut in half", "file_bytes": 8 + hlen + (len(valid) - 8 - hlen) // 2,
                                       "needed_bytes": len(valid), "keys": sorted(small)}
    (d / "truncated_header.safetensors").write_bytes(valid[: 8 + hlen // 2])
    m["truncated_header.safetensors"] = {"why": "the file ends inside the JSON header", "header_len_field": hlen,
                                         "file_bytes": 8 + hlen // 2}
    data = bytes(256)
    past = {"a.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]},
            "b.weight": {"dtype": "F32", "shape": [64, 4], "data_offsets": [64, 1088]}}
    (d / "header_offsets_past_end.safetensors").write_bytes(_st_bytes(past, data))
    m["header_offsets_past_end.safetensors"] = {"why": "b.weight's data_offsets [64, 1088] end past the 256 data bytes",
                                                "bad_key": "b.weight", "data_bytes": 256}
    overlap = {"a.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]},
               "b.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [32, 96]},
               "c.weight": {"dtype": "F32", "shape": [40], "data_offsets": [96, 256]}}
    (d / "header_overlap.safetensors").write_bytes(_st_bytes(overlap, data))
    m["header_overlap.safetensors"] = {"why": "b.weight [32, 96] overlaps a.weight [0, 64] (each size matches its "
                                       "shape; the safetensors crate refuses: offsets must tile the data)",
                                       "bad_key": "b.weight"}
    mism = {"a.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]},
            "b.weight": {"dtype": "F16", "shape": [10, 10], "data_offsets": [64, 256]}}
    (d / "header_shape_mismatch.safetensors").write_bytes(_st_bytes(mism, data))
    m["header_shape_mismatch.safetensors"] = {"why": "b.weight F16 [10, 10] needs 200 bytes, offsets give 192",
                                              "bad_key": "b.weight"}
    hl = _st_bytes(past, data)
    huge = struct.pack("<Q", 1 << 40) + hl[8:]
    (d / "header_len_past_end.safetensors").write_bytes(huge)
    m["header_len_past_end.safetensors"] = {"why": "the header length field says 2^40 bytes; the file is "
                                            f"{len(huge)} bytes"}

    payload = _pickle_payload()
    import pickletools

    dis = io.StringIO()
    pickletools.dis(payload, out=dis)  # parses only
    assert "GLOBAL     'os system'" in dis.getvalue()
    zpath = d / "pickle_os_system.ckpt"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_STORED) as z:
        for name, content in (("archive/data.pkl", payload), ("archive/byteorder", b"little"),
                              ("archive/version", b"3\n")):
            z.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), content)  # reproducible bytes
    (d / "pickle_os_system_raw.ckpt").write_bytes(payload)
    refusals = {}
    for p in (zpath, d / "pickle_os_system_raw.ckpt"):
        try:
            torch.load(p, map_location="cpu", weights_only=True)
            refusals[p.name] = "LOADED (unexpected)"
        except Exception as e:  # torch's weights-only unpickler refuses the GLOBAL before calling anything
            refusals[p.name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    assert all("LOADED" not in v for v in refusals.values()), refusals
    for name in (zpath.name, "pickle_os_system_raw.ckpt"):
        m[name] = {"why": "the pickle calls os.system('echo sketchx-pickle-payload-ran') through GLOBAL 'os system' + "
                          "REDUCE as the value of state_dict['model.diffusion_model.input_blocks.0.0.weight'] (hand-"
                          "written bytes, never executed)",
                   "container": "torch zip (archive/data.pkl, archive/byteorder, archive/version)" if name == zpath.name
                   else "bare pickle (no zip)",
                   "pickle_disassembly": dis.getvalue().splitlines(),
                   "torch_load_weights_only": refusals[name]}

    unet_cfg = json.loads((out / "tiny-sd" / "unet" / "config.json").read_text())
    torch.manual_seed(5)
    inp = UNet2DConditionModel(**dict(models.unet_kwargs(), in_channels=9)).eval()
    inp_sd = {"model.diffusion_model." + k: v.half() for k, v in unet_to_ldm(inp.state_dict(), unet_cfg).items()}
    _save_st(inp_sd, d / "inpainting_9ch.safetensors")
    m["inpainting_9ch.safetensors"] = {
        "why": "model.diffusion_model.input_blocks.0.0.weight is [16, 9, 3, 3]: an inpainting UNet (4 latent + 4 "
               "masked-image latent + 1 mask channels); otherwise tiny-sd's UNet shape, fp16",
        "bad_key": "model.diffusion_model.input_blocks.0.0.weight",
        "contents": "model.diffusion_model.* only (no VAE / text encoder, to stay small): the in-channels check "
                    "must come before the completeness check to name the real problem",
        "diffusers_model_type": infer_diffusers_model_type(inp_sd)}
    alt_cfg = json.loads((out / "tiny-controlnet-alt" / "config.json").read_text())
    alt = controlnet_to_ldm(_load_dir_sd(out / "tiny-controlnet-alt"), alt_cfg)
    _save_st(alt, d / "controlnet_mismatch.safetensors")
    m["controlnet_mismatch.safetensors"] = {
        "why": "tiny-controlnet-alt in the original layout (plain keys): blocks of 8/16 channels, 1 resnet per "
               "level, 2 levels, cross-attention 16 wide; it does not fit tiny-sd's UNet (16/32/32, 2 resnets, 3 "
               "levels, 32): e.g. input_blocks.0.0.weight [8, 4, 3, 3] vs the UNet's [16, 4, 3, 3], 4 zero_convs "
               "vs 9 down residuals",
        "bad_key": "input_blocks.0.0.weight"}
    (d / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")


# =============================================================================================================


def sizes(out: Path) -> dict:
    root = out / ROOT
    return {str(p.relative_to(out)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def generate(fixtures_dir):
    out = Path(fixtures_dir)
    torch.set_num_threads(int(os.environ.get("FIXTURE_THREADS", "1")))
    shutil.rmtree(out / ROOT, ignore_errors=True)
    (out / ROOT).mkdir(parents=True)
    draw_colour_sketches(out)
    print("single files", flush=True)
    write_single_files(out)
    write_textual_inversion(out)
    print("references", flush=True)
    write_references(out)
    write_text_encoder_refs(out)
    print("preprocess", flush=True)
    write_preprocess(out)
    print("bad input", flush=True)
    write_bad(out)
    total = sum(sizes(out).values()) + sum((out / "sketches" / n).stat().st_size
                                           for n in ("house_colour.png", "house_colour_alt.png", "pencil_soft.png"))
    print(f"formats: {total / 1e6:.2f} MB in all", flush=True)


if __name__ == "__main__":
    generate(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parents[2] / "tests" / "fixtures"))
