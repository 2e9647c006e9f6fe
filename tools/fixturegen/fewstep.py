"""Fixtures for few-step sampling (issue 13): LoRAs, an LCM UNet, a tiny TAESD, LCM/TCD/trailing scheduler
references and diffusers' whole-pipeline images for them.

Runs after ``models.py`` (it reads ``tiny-sd``, ``tiny-controlnet`` and ``sketches``; it never rewrites them) and is
runnable alone::

    python tools/fixturegen/fewstep.py tests/fixtures

Everything is generated locally (nothing comes from the Hub). Seeds are fixed, so a rerun writes the same files.

Outputs (under ``fixtures_dir``)
--------------------------------

``lora/`` -- random LoRAs over ``tiny-sd`` (UNet + text encoder; every B/up matrix non-zero):

  =========================  ================================================================================
  ``kohya.safetensors``      kohya format, float16 like published kohya files: ``lora_unet_<module_with_
                             underscores>`` / ``lora_te_text_model_<...>`` + ``.lora_down.weight`` /
                             ``.lora_up.weight`` / ``.alpha`` (0-dim float16). Written by this script's own
                             name mapping. Linear layers and 1x1 convolutions: rank 4, alpha 2 (scale 0.5);
                             3x3 convolutions (kohya's ``conv_dim``/``conv_alpha``): rank 2, alpha 3 (scale 1.5).
                             Covers attn1/attn2 to_q/k/v/to_out.0, ff.net.0.proj, ff.net.2, proj_in/proj_out
                             (1x1 convs), resnets' conv1/conv2 (3x3), conv_shortcut (1x1), time_emb_proj,
                             down/upsamplers' conv (3x3), text encoder q/k/v/out_proj, fc1, fc2.
  ``peft.safetensors``       diffusers/peft format, float32, written by diffusers' ``save_lora_weights`` from peft
                             ``LoraConfig`` + ``get_peft_model_state_dict``: ``unet.<module>.lora_A.weight`` /
                             ``.lora_B.weight``, ``text_encoder.text_model.<module>...``. Alpha is in the file's
                             safetensors metadata, key ``lora_adapter_metadata`` (JSON, as diffusers writes it:
                             ``unet.r`` = 2, ``unet.lora_alpha`` = 3 (scale 1.5), ``text_encoder.r`` = 2,
                             ``text_encoder.lora_alpha`` = 1 (scale 0.5), plus the rest of ``LoraConfig``). Same
                             modules as kohya.
  ``peft_nometa.safetensors``  diffusers/peft format without metadata (as diffusers < 0.35 wrote it, rank 3,
                             attention layers + text encoder only); text-encoder keys as the current toolchain
                             writes them (``text_encoder.encoder.layers...``, no ``text_model.``). No alpha
                             anywhere: diffusers uses alpha = rank (scale 1).
  ``old.safetensors``        old diffusers naming (diffusers 0.21-0.24, LoRACompatibleLinear/Conv):
                             ``unet.<module>.lora.down.weight`` / ``.lora.up.weight``,
                             ``text_encoder.text_model.<module>.lora_linear_layer.down.weight`` / ``.up.weight``;
                             rank 2, no alpha (scale 1). Attention, proj_in/out, conv1 (3x3), conv_shortcut,
                             time_emb_proj; text encoder as kohya.
  ``bad/*.safetensors``      bad input, see ``lora/manifest.json`` ("bad"): SDXL keys, a wrong shape, ranks of
                             down and up that disagree, a truncated file, a NaN alpha, a key naming no layer.
  ``manifest.json``          per file: format, ranks/alphas, the diffusers parameters it changes, what diffusers'
                             loader said (warnings, adapters); for bad files what diffusers does with them.
  =========================  ================================================================================

``reference/lora_fused/<name>.safetensors`` -- a handful of weights after diffusers' ``load_lora_weights`` +
``fuse_lora(lora_scale=s)`` (f32), keyed by ``unet.<diffusers parameter>`` / ``text_encoder.<parameter as in
tiny-sd/text_encoder/model.safetensors>``: a 3x3 conv, a 1x1 conv (proj_in), a 1x1 conv_shortcut, a linear
(attn to_q, ff), a time_emb_proj, text-encoder q_proj and fc1 (those the LoRA touches). kohya and peft at scales 0.6
and 1.0, old and peft_nometa at 0.6 (every file is verified at both), plus ``two_kohya0.6_peft0.8`` (two adapters:
``set_adapters([..], [0.6, 0.8])`` then ``fuse_lora(adapter_names=..)``). ``reference/lora_fused/index.json`` lists
them with the recipe and the largest difference from an independent float64 ``W + scale * alpha / r * B @ A``.

``tiny-lcm/`` -- a full LCM model: ``unet/`` is tiny-sd's UNet shape with ``time_cond_proj_dim`` = 32 (random
weights, ``time_embedding.cond_proj`` drawn ~10x wider than its default init so the guidance embedding matters); ``text_encoder``, ``vae``,
``tokenizer`` are symlinks to ``../tiny-sd/...``; ``scheduler/scheduler_config.json`` is tiny-sd's with
``_class_name`` LCMScheduler.

``tiny-taesd/`` -- ``AutoencoderTiny`` (config + diffusion_pytorch_model.safetensors): 8 channels, the real block
counts (encoder 1,3,3,3; decoder 3,3,3,1), latent_channels 4, 8x scale like tiny-sd's VAE; weights re-drawn with a
variance-preserving init and random biases (the default init gives a nearly constant image), the last decoder conv
scaled for latents of tiny-sd's magnitude.

``sampling/fewstep_schedulers.json`` -- LCMScheduler and TCDScheduler (``from_config`` of tiny-sd's
scheduler_config), DDIM / Euler / Euler-Ancestral with ``timestep_spacing="trailing"``: timesteps for several step
counts, and per-step trajectories with the fake model of ``sampling.py`` (``0.1 * scale_model_input(x) + F``,
F[i] = ((i * 37) % 101) / 101 - 0.5, float32), the initial latents and all scheduler noise drawn from one
``torch.Generator("cpu").manual_seed(seed)`` (``randn_tensor``), exactly as ``sampling.py`` does.

``reference/fewstep/components.safetensors`` -- component references: the TAESD decode of fixed latents, the LCM
UNet with a guidance embedding, and the guidance embedding itself.

``reference/e2e_fewstep/`` -- diffusers' ``StableDiffusionControlNetPipeline`` images and ``cases.json`` (see
``E2E_CASES`` and the manifest schema in ``tests/fixtures/README.md``).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import models  # noqa: E402
from sampling import SD15_CONFIG, _f32_list, _fake_f  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# LoRA targets
# ---------------------------------------------------------------------------------------------------------------

# peft target_modules (suffix match), the modules LCM-LoRA for SD1.5 targets.
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
ATTN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# The old-format file: attention, 1x1 projections, one 3x3 conv per resnet, the 1x1 shortcuts, time_emb_proj.
OLD_TARGETS = ATTN_TARGETS + ["proj_in", "proj_out", "conv1", "conv_shortcut", "time_emb_proj"]

# The weights saved in the fused references (diffusers parameter names).
FUSED_PARAMS = [
    "unet.down_blocks.0.resnets.0.conv1.weight",                                  # 3x3 conv
    "unet.down_blocks.0.attentions.0.proj_in.weight",                             # 1x1 conv
    "unet.down_blocks.1.resnets.0.conv_shortcut.weight",                          # 1x1 conv_shortcut
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",     # linear
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.weight",       # linear (ff)
    "unet.down_blocks.0.resnets.0.time_emb_proj.weight",                          # time_emb_proj
    "text_encoder.encoder.layers.0.self_attn.q_proj.weight",                      # text-encoder linear
    "text_encoder.encoder.layers.1.mlp.fc1.weight",                               # text-encoder mlp
]
FUSED_SCALES = [0.6, 1.0]  # every file is verified at both; the references saved:
FUSED_SAVED = {"kohya": [0.6, 1.0], "peft": [0.6, 1.0], "old": [0.6], "peft_nometa": [0.6]}


def _suffix_match(name: str, targets) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def target_modules(model, targets):
    """{module name: module} of the Linear/Conv2d modules of ``model`` matched by peft-style suffixes."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and _suffix_match(name, targets):
            out[name] = m
    return out


def _is_3x3(m) -> bool:
    return isinstance(m, torch.nn.Conv2d) and tuple(m.kernel_size) != (1, 1)


def random_lora(modules: dict, rank_of, gen, std=0.3):
    """{module: (A, B)} with A: [r, in(, kh, kw)], B: [out, r(, 1, 1)]; A ~ N(0, 1/in), B ~ N(0, std^2 / r)."""
    out = {}
    for name, m in modules.items():
        r = rank_of(m)
        if isinstance(m, torch.nn.Linear):
            a_shape, b_shape = (r, m.in_features), (m.out_features, r)
        else:
            a_shape = (r, m.in_channels, *m.kernel_size)
            b_shape = (m.out_channels, r, 1, 1)
        fan_in = int(np.prod(a_shape[1:]))
        a = torch.randn(a_shape, generator=gen) / math.sqrt(fan_in)
        b = torch.randn(b_shape, generator=gen) * std / math.sqrt(r)
        out[name] = (a, b)
    return out


def delta_of(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B @ A in the layer's weight shape, in float64 (the independent check of diffusers' fusion)."""
    a, b = a.double(), b.double()
    if a.dim() == 2:
        return b @ a
    r = a.shape[0]
    return (b.reshape(b.shape[0], r) @ a.reshape(r, -1)).reshape(b.shape[0], *a.shape[1:])


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------

def load_base(out: Path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(out / "tiny-sd" / "unet").eval()
    text = CLIPTextModel.from_pretrained(out / "tiny-sd" / "text_encoder").eval()
    return unet, text


def te_kohya_name(module: str) -> str:
    """kohya's text-encoder name (published files keep transformers 4's ``text_model.`` prefix)."""
    return "lora_te_text_model_" + module.replace(".", "_")


def unet_kohya_name(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def build_loras(out: Path, seed: int = 1313) -> dict:
    """Writes lora/{kohya,peft,peft_nometa,old}.safetensors; returns each file's description for the manifest."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    d = out / "lora"
    d.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    unet, text = load_base(out)
    u_mods = target_modules(unet, UNET_TARGETS)
    t_mods = target_modules(text, TE_TARGETS)
    info = {}

    # (a) kohya, float16. Linear + 1x1: rank 4 / alpha 2; 3x3 conv: rank 2 / alpha 3 (conv_dim / conv_alpha).
    def k_rank(m):
        return 2 if _is_3x3(m) else 4

    def k_alpha(m):
        return 3.0 if _is_3x3(m) else 2.0

    ku = random_lora(u_mods, k_rank, gen)
    kt = random_lora(t_mods, lambda m: 4, gen, std=0.6)
    sd = {}
    for prefix_fn, lora, mods in ((unet_kohya_name, ku, u_mods), (te_kohya_name, kt, t_mods)):
        for name, (a, b) in lora.items():
            k = prefix_fn(name)
            sd[f"{k}.lora_down.weight"] = a.half()
            sd[f"{k}.lora_up.weight"] = b.half()
            sd[f"{k}.alpha"] = torch.tensor(k_alpha(mods[name]), dtype=torch.float16)
    save_file(sd, str(d / "kohya.safetensors"), metadata={"ss_network_module": "networks.lora",
                                                           "ss_network_dim": "4", "ss_network_alpha": "2.0"})
    # The weights as diffusers will see them (float16 -> float32 is exact).
    info["kohya"] = dict(
        file="lora/kohya.safetensors", format="kohya", dtype="float16",
        unet={"rank": {"linear_and_1x1": 4, "conv3x3": 2}, "alpha": {"linear_and_1x1": 2.0, "conv3x3": 3.0}},
        text_encoder={"rank": 4, "alpha": 2.0},
        deltas=_deltas(ku, kt, lambda m: k_alpha(u_mods[m]) / k_rank(u_mods[m]), lambda m: 2.0 / 4, half=True),
    )

    # (b) diffusers/peft format with metadata, via peft + diffusers' own save function.
    def peft_lora(unet_cfg: LoraConfig, te_cfg: LoraConfig, u_targets, t_targets):
        u, t = load_base(out)
        u.add_adapter(unet_cfg)
        t.add_adapter(te_cfg)
        ul = random_lora(target_modules_peft(u, u_targets), lambda m: unet_cfg.r, gen)
        tl = random_lora(target_modules_peft(t, t_targets), lambda m: te_cfg.r, gen, std=0.6)
        for model, lora in ((u, ul), (t, tl)):
            mods = dict(model.named_modules())
            for name, (a, b) in lora.items():
                with torch.no_grad():
                    mods[name].lora_A["default"].weight.copy_(a)
                    mods[name].lora_B["default"].weight.copy_(b)
        return u, t, ul, tl

    ucfg = LoraConfig(r=2, lora_alpha=3, target_modules=UNET_TARGETS, init_lora_weights=False)
    tcfg = LoraConfig(r=2, lora_alpha=1, target_modules=TE_TARGETS, init_lora_weights=False)
    u, t, pu, pt = peft_lora(ucfg, tcfg, UNET_TARGETS, TE_TARGETS)
    u_layers = get_peft_model_state_dict(u)
    # Published diffusers-format LoRAs were made with transformers 4, whose CLIPTextModel has a `text_model.`
    # level; keep that spelling here (diffusers strips it for a flattened model).
    t_layers = {f"text_model.{k}": v for k, v in get_peft_model_state_dict(t).items()}
    StableDiffusionPipeline.save_lora_weights(
        d, unet_lora_layers=u_layers, text_encoder_lora_layers=t_layers, weight_name="peft.safetensors",
        unet_lora_adapter_metadata=_portable(u.peft_config["default"].to_dict()),
        text_encoder_lora_adapter_metadata=_portable(t.peft_config["default"].to_dict()),
    )
    info["peft"] = dict(file="lora/peft.safetensors", format="peft", dtype="float32",
                        unet={"rank": 2, "alpha": 3.0, "alpha_from": "metadata lora_adapter_metadata: unet.lora_alpha"},
                        text_encoder={"rank": 2, "alpha": 1.0,
                                      "alpha_from": "metadata lora_adapter_metadata: text_encoder.lora_alpha"},
                        deltas=_deltas(pu, pt, lambda m: 3 / 2, lambda m: 1 / 2))

    # (b') peft format without metadata (alpha = rank), attention layers only, the current text-encoder spelling.
    ucfg3 = LoraConfig(r=3, lora_alpha=3, target_modules=ATTN_TARGETS, init_lora_weights=False)
    tcfg3 = LoraConfig(r=3, lora_alpha=3, target_modules=TE_TARGETS, init_lora_weights=False)
    u3, t3, nu, nt = peft_lora(ucfg3, tcfg3, ATTN_TARGETS, TE_TARGETS)
    StableDiffusionPipeline.save_lora_weights(
        d, unet_lora_layers=get_peft_model_state_dict(u3), text_encoder_lora_layers=get_peft_model_state_dict(t3),
        weight_name="peft_nometa.safetensors",
    )
    info["peft_nometa"] = dict(file="lora/peft_nometa.safetensors", format="peft", dtype="float32",
                               unet={"rank": 3, "alpha": None, "alpha_from": "none: diffusers uses alpha = rank"},
                               text_encoder={"rank": 3, "alpha": None},
                               deltas=_deltas(nu, nt, lambda m: 1.0, lambda m: 1.0))

    # (c) old diffusers naming (lora.down / lora.up; text encoder lora_linear_layer), no alpha.
    old_mods = {k: v for k, v in u_mods.items() if _suffix_match(k, OLD_TARGETS)}
    ou = random_lora(old_mods, lambda m: 2, gen)
    ot = random_lora(t_mods, lambda m: 2, gen, std=0.6)
    sd = {}
    for name, (a, b) in ou.items():
        sd[f"unet.{name}.lora.down.weight"] = a.contiguous()
        sd[f"unet.{name}.lora.up.weight"] = b.contiguous()
    for name, (a, b) in ot.items():
        sd[f"text_encoder.text_model.{name}.lora_linear_layer.down.weight"] = a.contiguous()
        sd[f"text_encoder.text_model.{name}.lora_linear_layer.up.weight"] = b.contiguous()
    save_file(sd, str(d / "old.safetensors"), metadata={"format": "pt"})
    info["old"] = dict(file="lora/old.safetensors", format="diffusers_old", dtype="float32",
                       unet={"rank": 2, "alpha": None, "alpha_from": "none: scale 1"},
                       text_encoder={"rank": 2, "alpha": None}, deltas=_deltas(ou, ot, lambda m: 1.0, lambda m: 1.0))
    return info


def _portable(config: dict) -> dict:
    """LoraConfig.to_dict() without the local path it records (the file must not depend on where it was made)."""
    return {k: (None if k == "base_model_name_or_path" else v) for k, v in config.items()}


def target_modules_peft(model, targets):
    """The modules peft wrapped (their LoRA layers have lora_A/lora_B)."""
    out = {}
    for name, m in model.named_modules():
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}) and _suffix_match(name, targets):
            out[name] = m.get_base_layer()
    return out


def _deltas(ul, tl, u_scale, t_scale, half=False):
    """{diffusers parameter name: float64 delta (scale 1)} for the independent check."""
    out = {}
    for prefix, lora, sc in (("unet", ul, u_scale), ("text_encoder", tl, t_scale)):
        for name, (a, b) in lora.items():
            if half:
                a, b = a.half().float(), b.half().float()
            out[f"{prefix}.{name}.weight"] = delta_of(a, b) * sc(name)
    return out


# ---------------------------------------------------------------------------------------------------------------
# diffusers' loader: verification and fused references
# ---------------------------------------------------------------------------------------------------------------

class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _pipeline(out: Path, model="tiny-sd", vae=None):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    cn = ControlNetModel.from_pretrained(out / "tiny-controlnet", torch_dtype=torch.float32)
    kw = {} if vae is None else {"vae": vae}
    p = StableDiffusionControlNetPipeline.from_pretrained(
        out / model, controlnet=cn, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        torch_dtype=torch.float32, **kw,
    )
    p.set_progress_bar_config(disable=True)
    return p


def load_loras(pipe, out: Path, loras):
    """diffusers' recipe: load_lora_weights for each, then fuse_lora; returns warnings and adapters.

    One LoRA: ``fuse_lora(lora_scale=scale)``. Several: ``set_adapters(names, adapter_weights=scales)`` then
    ``fuse_lora(adapter_names=names)`` (lora_scale 1)."""
    cap = _Capture()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(cap)
    names, benign = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, l in enumerate(loras):
            n_before = len(cap.messages)
            name = f"l{i}_{Path(l['file']).stem}"
            src = str(out / l["file"])
            if l.get("only_prefix"):  # a part of the file (sensitivity checks only)
                from safetensors.torch import load_file

                src = {k: v for k, v in load_file(src).items() if k.startswith(l["only_prefix"])}
            pipe.load_lora_weights(src, adapter_name=name)
            # Loading a second adapter into the text encoder makes transformers report the first adapter's
            # weights as "MISSING" from the new state dict, and warn that a peft_config exists: both expected.
            for m in cap.messages[n_before:]:
                rows = [r for r in m.splitlines() if "|" in r and ("MISSING" in r or "UNEXPECTED" in r)]
                if ("Already found a `peft_config`" in m and names) or (
                        "LOAD REPORT" in m and rows and all(any(f".{n}." in r for n in names) for r in rows)):
                    benign.append(m)
            names.append(name)
        adapters = pipe.get_list_adapters()
        if len(loras) == 1:
            pipe.fuse_lora(lora_scale=loras[0]["scale"])
        elif loras:
            pipe.set_adapters(names, adapter_weights=[l["scale"] for l in loras])
            pipe.fuse_lora(adapter_names=names)
    for lg in loggers:
        lg.removeHandler(cap)
    msgs = [m for m in cap.messages if m not in benign] + [str(w.message) for w in caught
                           if "lora" in str(w.message).lower() or "adapter" in str(w.message).lower()]
    if len(names) > 1:
        benign += [m for m in msgs if "Already found a `peft_config`" in m]
        msgs = [m for m in msgs if "Already found a `peft_config`" not in m]
    return {"warnings": msgs, "adapters": {k: list(v) for k, v in adapters.items()},
            "expected_multi_adapter_messages": len(benign)}


def _params(pipe) -> dict:
    sd = {f"unet.{k}": v.detach().clone() for k, v in pipe.unet.state_dict().items()}
    sd.update({f"text_encoder.{k}": v.detach().clone() for k, v in pipe.text_encoder.state_dict().items()})
    return sd


def _base_name(k: str) -> str:
    """peft wraps a layer: ``x.base_layer.weight`` is the layer's ``x.weight``."""
    return k.replace(".base_layer.", ".")


def verify_and_fuse(out: Path, info: dict) -> dict:
    """Loads each LoRA into diffusers, checks it (no warnings, both adapters present, exactly the intended layers
    changed, equal to an independent float64 fusion), and writes the fused references."""
    from safetensors.torch import save_file

    base = _params(_pipeline(out))
    fused_dir = out / "reference" / "lora_fused"
    fused_dir.mkdir(parents=True, exist_ok=True)
    index = []
    for key, desc in info.items():
        for scale in FUSED_SCALES:
            pipe = _pipeline(out)
            log = load_loras(pipe, out, [{"file": desc["file"], "scale": scale}])
            after = {_base_name(k): v for k, v in _params(pipe).items() if "lora_" not in k}
            changed = sorted(k for k, v in after.items() if not torch.equal(v, base[k]))
            expected = sorted(desc["deltas"])
            assert not log["warnings"], (key, log["warnings"])
            assert set(log["adapters"]) == {"unet", "text_encoder"}, (key, log["adapters"])
            assert changed == expected, (key, set(changed) ^ set(expected))
            err = max(float((after[k].double() - base[k].double() - scale * dlt).abs().max())
                      for k, dlt in desc["deltas"].items())
            rel = max(float(dlt.abs().max()) for dlt in desc["deltas"].values())
            assert err < 1e-5 * max(1.0, rel), (key, scale, err)
            desc.setdefault("verified", {})[str(scale)] = {
                "diffusers_warnings": log["warnings"], "adapters": log["adapters"],
                "changed_params": len(changed), "max_abs_diff_vs_float64_formula": err}
            name = f"{key}_s{scale}"
            print(f"  {name}: {len(changed)} params changed, max |diffusers - formula| {err:.2e}", flush=True)
            if scale not in FUSED_SAVED[key]:
                continue
            params = [p for p in FUSED_PARAMS if p in desc["deltas"]]
            save_file({p: after[p].contiguous() for p in params}, str(fused_dir / f"{name}.safetensors"))
            index.append({"file": f"reference/lora_fused/{name}.safetensors",
                          "loras": [{"file": desc["file"], "scale": scale}], "params": params,
                          "recipe": "pipe.load_lora_weights(file); pipe.fuse_lora(lora_scale=scale)",
                          "max_abs_diff_vs_float64_formula": err})
    # Two LoRAs at once.
    two = [{"file": info["kohya"]["file"], "scale": 0.6}, {"file": info["peft"]["file"], "scale": 0.8}]
    pipe = _pipeline(out)
    log = load_loras(pipe, out, two)
    assert not log["warnings"], log["warnings"]
    after = {_base_name(k): v for k, v in _params(pipe).items() if "lora_" not in k}
    err = 0.0
    for p in FUSED_PARAMS:
        want = base[p].double() + 0.6 * info["kohya"]["deltas"][p] + 0.8 * info["peft"]["deltas"][p]
        err = max(err, float((after[p].double() - want).abs().max()))
    assert err < 1e-5, err
    save_file({p: after[p].contiguous() for p in FUSED_PARAMS}, str(fused_dir / "two_kohya0.6_peft0.8.safetensors"))
    index.append({"file": "reference/lora_fused/two_kohya0.6_peft0.8.safetensors", "loras": two,
                  "params": FUSED_PARAMS, "max_abs_diff_vs_float64_formula": err,
                  "recipe": "load_lora_weights each (adapter_name); set_adapters(names, adapter_weights=[0.6, 0.8]);"
                            " fuse_lora(adapter_names=names)"})
    print(f"  two LoRAs: max |diffusers - formula| {err:.2e}", flush=True)
    (fused_dir / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index


# ---------------------------------------------------------------------------------------------------------------
# Bad LoRA files
# ---------------------------------------------------------------------------------------------------------------

def build_bad(out: Path, seed: int = 1414) -> list:
    from safetensors.torch import load_file, save_file

    d = out / "lora" / "bad"
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    good = load_file(str(out / "lora" / "kohya.safetensors"))
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    few = {k: v for k, v in good.items()
           if k.startswith((q + ".", "lora_te_text_model_encoder_layers_0_self_attn_out_proj."))}
    h = torch.float16
    bad = []

    # SDXL: a second text encoder (lora_te2_, 1280 wide) and a 10-deep transformer block of SDXL's UNet (640 wide).
    sdxl = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(2, 768, generator=g).to(h),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(768, 2, generator=g).to(h),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(4.0, dtype=h),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(2, 1280, generator=g).to(h),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(1280, 2, generator=g).to(h),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(4.0, dtype=h),
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q.lora_down.weight":
            torch.randn(2, 640, generator=g).to(h),
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q.lora_up.weight":
            torch.randn(640, 2, generator=g).to(h),
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q.alpha": torch.tensor(4.0, dtype=h),
    }
    save_file(sdxl, str(d / "sdxl_keys.safetensors"))
    bad.append({"file": "lora/bad/sdxl_keys.safetensors", "what": "SDXL kohya keys (rank 2): lora_te1_/lora_te2_ "
                "(768 and 1280 wide), lora_unet_..._transformer_blocks_1_... (SDXL has 2-10 transformer blocks; tiny-sd 1)",
                "expected_error_names": "a key, e.g. lora_te2_text_model_encoder_layers_0_self_attn_q_proj"})

    # A layer of the right name with the wrong input width (LoRA made for a wider model).
    ws = dict(few)
    ws[f"{q}.lora_down.weight"] = torch.randn(4, 320, generator=g).to(h)
    ws[f"{q}.lora_up.weight"] = torch.randn(320, 4, generator=g).to(h)
    save_file(ws, str(d / "wrong_shape.safetensors"))
    bad.append({"file": "lora/bad/wrong_shape.safetensors", "what": f"{q}: down [4, 320], up [320, 4]; the layer "
                "(down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q) is [16, 16]",
                "expected_error_names": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"})

    # Ranks of down and up disagree.
    rm = dict(few)
    rm[f"{q}.lora_up.weight"] = torch.randn(16, 3, generator=g).to(h)
    save_file(rm, str(d / "rank_mismatch.safetensors"))
    bad.append({"file": "lora/bad/rank_mismatch.safetensors", "what": f"{q}: lora_down rank 4 [4, 16], lora_up "
                "rank 3 [16, 3]", "expected_error_names": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"})

    # Truncated: a valid file (two layers of kohya.safetensors) cut in the middle of its tensor data.
    from safetensors.torch import save as save_bytes

    data = save_bytes(few)
    header = 8 + int.from_bytes(data[:8], "little")
    cut = header + (len(data) - header) // 2
    (d / "truncated.safetensors").write_bytes(data[:cut])
    bad.append({"file": "lora/bad/truncated.safetensors", "what": f"a valid {len(data)}-byte kohya file (two layers "
                f"of lora/kohya.safetensors) cut to its first {cut} bytes: header ({header} bytes) intact, tensor "
                "data short", "expected_error_names": "the file"})

    # NaN alpha.
    na = dict(few)
    na[f"{q}.alpha"] = torch.tensor(float("nan"), dtype=h)
    save_file(na, str(d / "nan_alpha.safetensors"))
    bad.append({"file": "lora/bad/nan_alpha.safetensors", "what": f"{q}.alpha = NaN",
                "expected_error_names": f"{q}.alpha"})

    # A well-formed key that matches no layer of the model.
    uk = dict(few)
    z = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_z"
    uk[f"{z}.lora_down.weight"] = few[f"{q}.lora_down.weight"].clone()
    uk[f"{z}.lora_up.weight"] = few[f"{q}.lora_up.weight"].clone()
    uk[f"{z}.alpha"] = few[f"{q}.alpha"].clone()
    save_file(uk, str(d / "unknown_key.safetensors"))
    bad.append({"file": "lora/bad/unknown_key.safetensors", "what": f"a valid LoRA plus {z} (no such layer)",
                "expected_error_names": z})

    # What diffusers does with each (for the record; sketchx must give a typed error naming file/key/layer).
    for b in bad:
        pipe = _pipeline(out)
        try:
            log = load_loras(pipe, out, [{"file": b["file"], "scale": 1.0}])
            bad_w = [n for n, v in pipe.unet.named_parameters() if not torch.isfinite(v).all()]
            bad_w += [n for n, v in pipe.text_encoder.named_parameters() if not torch.isfinite(v).all()]
            b["diffusers"] = {"raised": None, "warnings": [w[:300] for w in log["warnings"]],
                              "adapters": log["adapters"], "non_finite_params_after_fuse": bad_w[:5]}
        except Exception as e:  # noqa: BLE001 - recording what diffusers raises
            b["diffusers"] = {"raised": f"{type(e).__name__}: {str(e).replace(str(out), '<fixtures>')[:300]}"}
        print(f"  {b['file']}: diffusers {b['diffusers']}", flush=True)
    return bad


# ---------------------------------------------------------------------------------------------------------------
# LCM UNet and TAESD
# ---------------------------------------------------------------------------------------------------------------

LCM_COND_DIM = 32


def build_lcm(out: Path, seed: int = 2323):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    d = out / "tiny-lcm"
    shutil.rmtree(d, ignore_errors=True)
    unet = UNet2DConditionModel(**models.unet_kwargs(), time_cond_proj_dim=LCM_COND_DIM).eval()
    with torch.no_grad():
        w = unet.time_embedding.cond_proj.weight
        # Default init (uniform, bound 1/sqrt(32)) made w barely matter; this is ~10x that spread.
        w.copy_(torch.randn(w.shape, generator=gen) * 6.0 / math.sqrt(LCM_COND_DIM))
    # Stored in float16 (like LCM_Dreamshaper_v7's fp16 weights) to halve the fixture; both diffusers (torch_dtype
    # float32) and sketchx widen it exactly, so the references are those of the widened weights.
    unet.half().save_pretrained(d / "unet", safe_serialization=True)
    for sub in ("text_encoder", "vae", "tokenizer"):
        os.symlink(f"../tiny-sd/{sub}", d / sub)
    (d / "scheduler").mkdir(parents=True)
    cfg = dict(SD15_CONFIG, _class_name="LCMScheduler")
    (d / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    mi = json.loads((out / "tiny-sd" / "model_index.json").read_text())
    mi["scheduler"] = ["diffusers", "LCMScheduler"]
    (d / "model_index.json").write_text(json.dumps(mi, indent=2) + "\n")


def taesd_kwargs():
    return dict(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                num_encoder_blocks=(1, 3, 3, 3), num_decoder_blocks=(3, 3, 3, 1), latent_channels=4)


def build_taesd(out: Path, seed: int = 2424):
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    d = out / "tiny-taesd"
    shutil.rmtree(d, ignore_errors=True)
    taesd = AutoencoderTiny(**taesd_kwargs()).eval()
    with torch.no_grad():
        convs = [m for m in taesd.modules() if isinstance(m, torch.nn.Conv2d)]
        for m in convs:
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * math.sqrt(2.0 / fan_in))
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
        # Residual blocks with that init grow the signal; the decoder's last conv gives the image in [0, 1]
        # (diffusers then maps it to [-1, 1]): scale it so that latents like tiny-sd's (std ~16, so mostly
        # saturated by the decoder's tanh(x / 3) * 3) give std 0.2 around 0.5, using the range without clipping much.
        last = taesd.decoder.layers[-1]
        last.bias.zero_()
        probe = torch.randn((2, 4, 8, 8), generator=gen) * 16
        spread = float(taesd.decoder.layers(torch.tanh(probe / 3) * 3).std())
        last.weight.mul_(0.2 / spread)
        last.bias.copy_(0.5 + 0.1 * torch.randn(last.bias.shape, generator=gen))
    taesd.save_pretrained(d, safe_serialization=True)


# ---------------------------------------------------------------------------------------------------------------
# Scheduler references
# ---------------------------------------------------------------------------------------------------------------

def _sched_configs(out: Path):
    sd = json.loads((out / "tiny-sd" / "scheduler" / "scheduler_config.json").read_text())
    return {
        "tiny_sd": sd,
        # LCM/TCD knobs: a distillation schedule that 1000 is not a multiple of, and set_alpha_to_one.
        "lcm_orig30": {**sd, "original_inference_steps": 30, "set_alpha_to_one": True},
        "sd15_vpred": {**sd, "prediction_type": "v_prediction"},
    }


SCHED_KINDS = {
    # name: (class, config overrides passed to from_config, step kwargs)
    "lcm": ("LCMScheduler", {}, {}),
    "tcd_eta0.3": ("TCDScheduler", {}, {"eta": 0.3}),
    "tcd_eta0": ("TCDScheduler", {}, {"eta": 0.0}),
    "tcd_eta1": ("TCDScheduler", {}, {"eta": 1.0}),
    "ddim_trailing": ("DDIMScheduler", {"timestep_spacing": "trailing"}, {"eta": 0.0}),
    "euler_trailing": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, {}),
    "euler_a_trailing": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}, {}),
}


def _make_sched(kind, cfg):
    import diffusers

    cls, overrides, _ = SCHED_KINDS[kind]
    return getattr(diffusers, cls).from_config(cfg, **overrides)


def _x0_of(kind, res):
    if kind == "lcm":
        return "denoised", res.denoised
    if kind.startswith("tcd"):
        return "pred_noised_sample", res.pred_noised_sample
    return "pred_original_sample", res.pred_original_sample


def _trajectory(kind, cfg, cfg_name, steps, seed=1234, shape=(1, 4, 3, 4)):
    from diffusers.utils.torch_utils import randn_tensor

    sched = _make_sched(kind, cfg)
    sched.set_timesteps(steps)
    g = torch.Generator("cpu").manual_seed(seed)
    latents = randn_tensor(list(shape), generator=g, device=torch.device("cpu"), dtype=torch.float32)
    latents = latents * sched.init_noise_sigma
    initial = latents.clone()
    fake = torch.from_numpy(_fake_f(latents.numel())).reshape(shape)
    per_step = []
    kw = dict(SCHED_KINDS[kind][2])
    for i, t in enumerate(sched.timesteps):
        x_in = sched.scale_model_input(latents, t)
        model_output = 0.1 * x_in + fake
        entry = {"index": i, "timestep": float(t)}
        if kind.startswith("tcd"):
            nxt = sched.timesteps[i + 1] if i + 1 < len(sched.timesteps) else torch.tensor(0)
            entry["timestep_s"] = int(torch.floor((1 - kw["eta"]) * nxt).to(torch.long))
        res = sched.step(model_output, t, latents, generator=g, **kw)
        name, x0 = _x0_of(kind, res)
        latents = res.prev_sample
        entry[name] = _f32_list(x0)
        entry["prev_sample"] = _f32_list(latents)
        per_step.append(entry)
    after = torch.randn([16], generator=g)
    return {"kind": kind, "config": cfg_name, "steps": steps, "seed": seed, "shape": list(shape),
            "step_kwargs": kw, "initial": _f32_list(initial), "per_step": per_step, "final": _f32_list(latents),
            "rng_after": _f32_list(after)}


def scheduler_references(out: Path):
    import diffusers

    configs = _sched_configs(out)
    schedules, trajectories = [], []
    plan = {
        "lcm": (["tiny_sd", "lcm_orig30", "sd15_vpred"], [1, 2, 3, 4, 6, 8, 25, 30, 50]),
        "tcd_eta0.3": (["tiny_sd", "lcm_orig30", "sd15_vpred"], [1, 2, 3, 4, 8, 50]),
        "ddim_trailing": (["tiny_sd"], [1, 2, 3, 4, 8]),
        "euler_trailing": (["tiny_sd"], [1, 2, 3, 4, 8]),
        "euler_a_trailing": (["tiny_sd"], [1, 2, 3, 4, 8]),
    }
    for kind, (cfg_names, step_counts) in plan.items():
        for cfg_name in cfg_names:
            for steps in step_counts:
                if cfg_name != "lcm_orig30" or steps <= 30:
                    s = _make_sched(kind, configs[cfg_name])
                    s.set_timesteps(steps)
                    e = {"kind": kind.split("_eta")[0], "config": cfg_name, "steps": steps,
                         "config_overrides": SCHED_KINDS[kind][1],
                         "timesteps": [float(t) for t in s.timesteps.numpy().astype(np.float64)],
                         "init_noise_sigma": float(s.init_noise_sigma)}
                    if hasattr(s, "sigmas") and kind.startswith("euler"):
                        e["sigmas"] = _f32_list(s.sigmas)
                    schedules.append(e)
    traj_plan = [
        ("lcm", "tiny_sd", [1, 2, 4, 8]), ("lcm", "lcm_orig30", [4]), ("lcm", "sd15_vpred", [4]),
        ("tcd_eta0.3", "tiny_sd", [1, 2, 4, 8]), ("tcd_eta0", "tiny_sd", [2, 4]), ("tcd_eta1", "tiny_sd", [4]),
        ("tcd_eta0.3", "sd15_vpred", [4]), ("tcd_eta0.3", "lcm_orig30", [4]),
        ("ddim_trailing", "tiny_sd", [1, 2, 4]), ("euler_trailing", "tiny_sd", [1, 2, 4]),
        ("euler_a_trailing", "tiny_sd", [2, 4]),
    ]
    for kind, cfg_name, step_counts in traj_plan:
        for steps in step_counts:
            trajectories.append(_trajectory(kind, configs[cfg_name], cfg_name, steps))
    # LCM's boundary-condition scalings (float32, as diffusers computes them) for a few timesteps.
    lcm = _make_sched("lcm", configs["tiny_sd"])
    scalings = []
    for t in [999, 759, 499, 259, 19, 0]:
        c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        scalings.append({"timestep": t, "c_skip": float(c_skip), "c_out": float(c_out)})
    doc = {
        "diffusers": diffusers.__version__, "torch": torch.__version__,
        "model_output": "0.1 * scheduler.scale_model_input(latents, t) + F, F[i] = ((i*37) % 101)/101 - 0.5 "
                        "(float32), as sampling/schedulers.json",
        "rng": "one torch.Generator('cpu').manual_seed(seed): initial latents = randn_tensor(shape) * "
               "init_noise_sigma, then every noise draw of scheduler.step(..., generator=g); rng_after = 16 "
               "more randn draws",
        "kinds": {k: {"class": v[0], "from_config_overrides": v[1], "step_kwargs": v[2]} for k, v in
                  SCHED_KINDS.items()},
        "configs": configs, "schedules": schedules, "trajectories": trajectories,
        "lcm_boundary_scalings": scalings,
    }
    d = out / "sampling"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "fewstep_schedulers.json", "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")


# ---------------------------------------------------------------------------------------------------------------
# Component references (TAESD decode, LCM UNet with its guidance embedding)
# ---------------------------------------------------------------------------------------------------------------

def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """diffusers' pipeline method (StableDiffusionControlNetPipeline.get_guidance_scale_embedding), called so."""
    from diffusers import StableDiffusionControlNetPipeline

    return StableDiffusionControlNetPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)


def component_references(out: Path):
    from diffusers import AutoencoderTiny, UNet2DConditionModel
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(77)
    t = {}
    with torch.no_grad():
        taesd = AutoencoderTiny.from_pretrained(out / "tiny-taesd").eval()
        lat = torch.randn((1, 4, 4, 6), generator=g) * 1.5
        t["taesd.latents"] = lat
        t["taesd.image"] = taesd.decode(lat / taesd.config.scaling_factor).sample
        unet = UNet2DConditionModel.from_pretrained(out / "tiny-lcm" / "unet", torch_dtype=torch.float32).eval()
        assert unet.dtype == torch.float32
        sample = torch.randn((2, 4, 8, 8), generator=g)
        enc = torch.randn((2, 77, 32), generator=g)
        w = torch.tensor([7.0, 0.5])  # guidance_scale 8.0 and 1.5, minus 1
        cond = guidance_embedding(w, LCM_COND_DIM)
        t.update({"lcm.sample": sample, "lcm.encoder_hidden_states": enc, "lcm.timestep": torch.tensor([759.0]),
                  "lcm.w": w, "lcm.timestep_cond": cond})
        t["lcm.out"] = unet(sample, torch.tensor(759.0), encoder_hidden_states=enc, timestep_cond=cond).sample
        # Odd dimension: diffusers pads one zero column.
        t["guidance_embedding.w"] = torch.tensor([0.0, 0.5, 1.0, 3.5, 7.0])
        t["guidance_embedding.dim32"] = guidance_embedding(t["guidance_embedding.w"], 32)
        t["guidance_embedding.dim256"] = guidance_embedding(t["guidance_embedding.w"], 256)
        t["guidance_embedding.dim7"] = guidance_embedding(t["guidance_embedding.w"], 7)
    d = out / "reference" / "fewstep"
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in t.items()}, str(d / "components.safetensors"))
    return {"taesd_image_std": float(t["taesd.image"].std()),
            "lcm_out_w_sensitivity": _lcm_w_sensitivity(unet, sample, enc)}


def _lcm_w_sensitivity(unet, sample, enc):
    with torch.no_grad():
        a = unet(sample, torch.tensor(759.0), encoder_hidden_states=enc,
                 timestep_cond=guidance_embedding(torch.tensor([7.0, 7.0]), LCM_COND_DIM)).sample
        b = unet(sample, torch.tensor(759.0), encoder_hidden_states=enc,
                 timestep_cond=guidance_embedding(torch.tensor([0.5, 0.5]), LCM_COND_DIM)).sample
    return float((a - b).abs().mean() / a.abs().mean())


# ---------------------------------------------------------------------------------------------------------------
# End-to-end references
# ---------------------------------------------------------------------------------------------------------------

KOHYA = "lora/kohya.safetensors"
PEFT = "lora/peft.safetensors"
OLD = "lora/old.safetensors"
NOMETA = "lora/peft_nometa.safetensors"

_BASE = dict(sketch="house_black_on_white.png", prompt="a cozy house, watercolor", width=64, height=64, seed=42,
             temperature=0.65, num_images=1)

E2E_CASES = [
    dict(_BASE, name="lcm_lora_4steps_cfg1.5", scheduler="lcm", steps=4, guidance_scale=1.5,
         loras=[{"file": KOHYA, "scale": 1.0}]),
    dict(_BASE, name="lcm_lora_2steps_cfg1", scheduler="lcm", steps=2, guidance_scale=1.0, width=96, seed=7,
         prompt="a red barn at dusk", loras=[{"file": PEFT, "scale": 1.0}]),
    dict(_BASE, name="tcd_lora", scheduler="tcd", eta=0.3, steps=4, guidance_scale=1.0, seed=3,
         prompt="a castle", loras=[{"file": OLD, "scale": 1.0}]),
    dict(_BASE, name="ddim_trailing_lora", scheduler="ddim", timestep_spacing="trailing", steps=4,
         guidance_scale=2.0, seed=11, prompt="a cabin in snow", loras=[{"file": KOHYA, "scale": 1.0}]),
    dict(_BASE, name="euler_trailing_lora_nometa", scheduler="euler", timestep_spacing="trailing", steps=3,
         guidance_scale=1.0, seed=5, prompt="a lighthouse", loras=[{"file": NOMETA, "scale": 1.0}]),
    dict(_BASE, name="lcm_model", model="tiny-lcm", scheduler="lcm", steps=4, guidance_scale=8.0, seed=21,
         prompt="a red barn"),
    dict(_BASE, name="lcm_lora_scale0.6", scheduler="lcm", steps=4, guidance_scale=1.5,
         loras=[{"file": KOHYA, "scale": 0.6}]),
    dict(_BASE, name="two_loras", scheduler="lcm", steps=4, guidance_scale=1.5,
         loras=[{"file": KOHYA, "scale": 0.6}, {"file": PEFT, "scale": 0.8}]),
    dict(_BASE, name="taesd_decode", scheduler="lcm", steps=4, guidance_scale=1.5,
         loras=[{"file": KOHYA, "scale": 1.0}], vae="tiny"),
    dict(_BASE, name="taesd_preview_lcm", scheduler="lcm", steps=4, guidance_scale=1.5,
         loras=[{"file": KOHYA, "scale": 1.0}], preview_vae="tiny"),
    dict(_BASE, name="taesd_preview_euler_a", scheduler="euler_a", steps=4, guidance_scale=7.5, seed=9,
         prompt="a lighthouse", preview_vae="tiny"),
]

SCHEDULER_CLASSES = {"lcm": "LCMScheduler", "tcd": "TCDScheduler", "ddim": "DDIMScheduler",
                     "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler"}
TAESD_DIR = "tiny-taesd"


def e2e_case(case: dict) -> dict:
    c = models.e2e_case(case)
    c.setdefault("loras", [])
    c.setdefault("eta", 0.0)
    c.setdefault("timestep_spacing", None)
    c.setdefault("vae", "full")
    c.setdefault("preview_vae", None)
    c["tiny_vae"] = TAESD_DIR if (c["vae"] == "tiny" or c["preview_vae"]) else None
    return c


def run_case(out: Path, c: dict, image, loras=None):
    """Runs one case through diffusers; returns (uint8 images, previews {step: uint8 images}, x0 latents, info)."""
    import diffusers
    from diffusers import AutoencoderTiny

    taesd = AutoencoderTiny.from_pretrained(out / TAESD_DIR).eval() if c["tiny_vae"] else None
    pipe = _pipeline(out, c["model"], vae=taesd if c["vae"] == "tiny" else None)
    lora_log = None
    loras = c["loras"] if loras is None else loras
    if loras:
        lora_log = load_loras(pipe, out, loras)
        partial = any(l.get("only_prefix") for l in loras)  # then diffusers says the text encoder got nothing
        assert not [w for w in lora_log["warnings"] if not (partial and "No LoRA keys associated to CLIPTextModel"
                                                             in w)], lora_log["warnings"]
    cls = getattr(diffusers, SCHEDULER_CLASSES[c["scheduler"]])
    overrides = {"timestep_spacing": c["timestep_spacing"]} if c["timestep_spacing"] else {}
    pipe.scheduler = cls.from_config(dict(pipe.scheduler.config), **overrides)

    # Capture the predicted clean latents of every step from the scheduler's own output.
    x0s, seen_kwargs = [], {}
    step = pipe.scheduler.step

    # functools.wraps keeps step's signature visible (inspect follows __wrapped__): the pipeline passes `generator`
    # and `eta` only to a step whose signature names them.
    @functools.wraps(step)
    def capturing_step(*args, **kwargs):
        seen_kwargs.update(kwargs)
        kwargs["return_dict"] = True
        res = step(*args, **kwargs)
        x0 = getattr(res, "denoised", None)
        if x0 is None:
            x0 = getattr(res, "pred_original_sample", None)
        if x0 is None:
            x0 = getattr(res, "pred_noised_sample", None)
        x0s.append(x0.detach().clone())
        return (res.prev_sample, x0)

    pipe.scheduler.step = capturing_step
    result = pipe(
        prompt=c["prompt"], negative_prompt=c["negative_prompt"] or None, image=image, width=c["width"],
        height=c["height"], num_inference_steps=c["steps"], guidance_scale=c["guidance_scale"],
        num_images_per_prompt=c["num_images"], generator=torch.Generator("cpu").manual_seed(c["seed"]),
        controlnet_conditioning_scale=1.65 - c["temperature"], guess_mode=c["prompt"] == "",
        control_guidance_start=c["control_guidance_start"], control_guidance_end=c["control_guidance_end"],
        eta=c["eta"], output_type="np",
    )
    imgs = (result.images.astype("float32") * 255).round().astype("uint8")
    params = inspect.signature(step).parameters
    assert ("generator" in seen_kwargs) == ("generator" in params), (c["name"], seen_kwargs.keys())
    assert ("eta" in seen_kwargs) == ("eta" in params), (c["name"], seen_kwargs.keys())
    if "eta" in params:
        assert seen_kwargs["eta"] == c["eta"]
    previews = {}
    if c["preview_vae"]:
        with torch.no_grad():
            for i, x0 in enumerate(x0s):
                dec = taesd.decode(x0 / taesd.config.scaling_factor).sample
                arr = pipe.image_processor.postprocess(dec, output_type="np")
                previews[i] = (arr.astype("float32") * 255).round().astype("uint8")
    info = {"timesteps": [float(t) for t in pipe.scheduler.timesteps],
            "scheduler_config": {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")},
            "do_classifier_free_guidance": bool(pipe.do_classifier_free_guidance),
            "lora_load": lora_log}
    if pipe.unet.config.time_cond_proj_dim is not None:
        info["guidance_embedding_w"] = c["guidance_scale"] - 1
        info["time_cond_proj_dim"] = pipe.unet.config.time_cond_proj_dim
    return imgs, previews, x0s, info


def _mean_diff(a, b) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def e2e_references(out: Path) -> dict:
    from safetensors.torch import save_file
    import diffusers

    e2e = out / "reference" / "e2e_fewstep"
    shutil.rmtree(e2e, ignore_errors=True)
    e2e.mkdir(parents=True)
    cases, imgs_of, x0_tensors = [], {}, {}
    for case in E2E_CASES:
        c = e2e_case(case)
        image = models.control_image(out / "sketches" / c["sketch"], c["width"], c["height"])
        image.save(e2e / f"{c['name']}.control.png")
        imgs, previews, x0s, info = run_case(out, c, image)
        c["images"] = []
        for i, arr in enumerate(imgs):
            name = f"{c['name']}_{i}.png"
            Image.fromarray(arr).save(e2e / name)
            c["images"].append(name)
        if previews:
            c["previews"] = []
            for step, arrs in previews.items():
                names = []
                for j, arr in enumerate(arrs):
                    name = f"{c['name']}.preview_step{step}_{j}.png"
                    Image.fromarray(arr).save(e2e / name)
                    names.append(name)
                c["previews"].append({"step_index": step, "timestep": info["timesteps"][step], "images": names})
                x0_tensors[f"{c['name']}.step{step}.x0"] = x0s[step].contiguous()
        c["diffusers"] = {k: v for k, v in info.items() if k != "lora_load"}
        imgs_of[c["name"]] = imgs
        cases.append(c)
        print(f"  {c['name']}: {info['timesteps']} cfg={info['do_classifier_free_guidance']}", flush=True)
    if x0_tensors:
        save_file(x0_tensors, str(e2e / "preview_x0.safetensors"))

    # Sensitivity: each knob changes the image far beyond the parity bound (mean |diff| 0.25).
    by = {c["name"]: c for c in cases}
    sens = []

    def variant(base_name, desc, **changes):
        c = dict(by[base_name])
        c.update(changes)
        c = e2e_case({k: v for k, v in c.items() if k not in ("images", "previews", "diffusers", "tiny_vae")})
        image = models.control_image(out / "sketches" / c["sketch"], c["width"], c["height"])
        imgs, _, _, _ = run_case(out, c, image)
        return imgs

    def record(what, a_name, b_desc, a, b):
        m = _mean_diff(a, b)
        sens.append({"what": what, "case": a_name, "against": b_desc, "mean_abs_diff": round(m, 3)})
        print(f"  sensitivity {what}: {a_name} vs {b_desc}: mean |diff| {m:.2f}", flush=True)

    base = "lcm_lora_4steps_cfg1.5"
    record("lora", base, "same without LoRA", imgs_of[base], variant(base, "", loras=[]))
    record("lora text encoder part", base, "same with the LoRA fused into the UNet only",
           imgs_of[base], variant(base, "", loras=[{"file": KOHYA, "scale": 1.0, "only_prefix": "lora_unet_"}]))
    record("lora scale", base, "case lcm_lora_scale0.6", imgs_of[base], imgs_of["lcm_lora_scale0.6"])
    record("second lora", "two_loras", "case lcm_lora_scale0.6 (the first LoRA alone)", imgs_of["two_loras"],
           imgs_of["lcm_lora_scale0.6"])
    record("lora format", base, "same with lora/peft.safetensors", imgs_of[base],
           variant(base, "", loras=[{"file": PEFT, "scale": 1.0}]))
    for sched, extra in (("tcd", {"eta": 0.3}), ("ddim", {"timestep_spacing": "trailing"}), ("euler_a", {})):
        record("scheduler", base, f"same with scheduler {sched} {extra}", imgs_of[base],
               variant(base, "", scheduler=sched, **extra))
    record("ddim timestep_spacing", "ddim_trailing_lora", "same with the config's leading spacing",
           imgs_of["ddim_trailing_lora"], variant("ddim_trailing_lora", "", timestep_spacing=None))
    record("tcd eta", "tcd_lora", "same with eta 0", imgs_of["tcd_lora"], variant("tcd_lora", "", eta=0.0))
    record("lcm model guidance embedding", "lcm_model", "same with guidance_scale 2.0 (w = 1)",
           imgs_of["lcm_model"], variant("lcm_model", "", guidance_scale=2.0))
    # Informational (not a knob of this issue): the tiny CLIP separates prompt and negative prompt weakly.
    record("guidance 1.5 vs 1.0 (cfg on/off), informational", base, "same with guidance_scale 1.0", imgs_of[base],
           variant(base, "", guidance_scale=1.0))
    record("taesd decode", "taesd_decode", "case lcm_lora_4steps_cfg1.5 (full VAE)", imgs_of["taesd_decode"],
           imgs_of[base])
    prev = by["taesd_preview_lcm"]["previews"]
    a = np.asarray(Image.open(e2e / prev[1]["images"][0]))
    b = np.asarray(Image.open(e2e / prev[2]["images"][0]))
    record("preview step", "taesd_preview_lcm", "its preview of step 1 vs step 2", a, b)

    manifest = {
        "diffusers": diffusers.__version__, "torch": torch.__version__,
        "pipeline": "diffusers StableDiffusionControlNetPipeline, float32, CPU; see tests/fixtures/README.md",
        "parity_bound": {"mean_abs_diff": 0.25, "p999": 4},
        "cases": cases, "sensitivity": sens,
        "preview_x0": "reference/e2e_fewstep/preview_x0.safetensors: '<case>.step<i>.x0' = the scheduler step's "
                      "x0 output at step index i (LCM: denoised; Euler-a: pred_original_sample), [n, 4, h/8, w/8]",
    }
    (e2e / "cases.json").write_text(json.dumps(manifest, indent=2) + "\n")
    low = [s for s in sens if s["mean_abs_diff"] <= 1.0 and "informational" not in s["what"]]
    assert not low, f"insensitive: {low}"
    return manifest


# ---------------------------------------------------------------------------------------------------------------

def generate(fixtures_dir):
    out = Path(fixtures_dir)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    for sub in ("lora", "tiny-lcm", "tiny-taesd", "reference/lora_fused", "reference/fewstep",
                "reference/e2e_fewstep"):
        shutil.rmtree(out / sub, ignore_errors=True)
    print("= LoRAs", flush=True)
    info = build_loras(out)
    verify_and_fuse(out, info)
    bad = build_bad(out)
    lora_manifest = {
        "files": {k: {kk: vv for kk, vv in v.items() if kk != "deltas"} | {
            "params_changed": sorted(v["deltas"])} for k, v in info.items()},
        "fused_references": "reference/lora_fused/index.json", "bad": bad,
    }
    (out / "lora" / "manifest.json").write_text(json.dumps(lora_manifest, indent=2) + "\n")
    print("= LCM UNet, TAESD", flush=True)
    build_lcm(out)
    build_taesd(out)
    comp = component_references(out)
    print(f"  components: {comp}", flush=True)
    print("= schedulers", flush=True)
    scheduler_references(out)
    print("= e2e", flush=True)
    e2e_references(out)


if __name__ == "__main__":
    generate(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parents[2] / "tests" / "fixtures"))
