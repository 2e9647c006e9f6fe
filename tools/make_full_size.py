"""Writes a full-size Stable Diffusion 1.5 + scribble ControlNet with *random* weights in diffusers layout, plus
the few-step pieces of the same sizes as the published ones: ``lcm-lora.safetensors`` (kohya format, rank 64 on
every attention, feed-forward, proj_in/out, resnet and sampler layer of the UNet, as
``latent-consistency/lcm-lora-sdv1-5``; about 135 MB in float16) and ``taesd/`` (``AutoencoderTiny`` with
diffusers' default config, as ``madebyollin/taesd``).

The configs are those of `stable-diffusion-v1-5/stable-diffusion-v1-5` and `lllyasviel/sd-controlnet-scribble`,
so the result proves that sketchx builds and runs the real architecture (and measures its time and memory) on a
machine that cannot reach the Hub. About 4.6 GB of float32 weights; never committed.

    python tools/make_full_size.py target/full-size
    cargo run --release --example generate -- --model target/full-size/sd15 \
        --controlnet target/full-size/controlnet --sketch examples/sketches/house.png --steps 1 --seed 1
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "fixturegen"))

SD15_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280), center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SD15_VAE = dict(
    act_fn="silu", block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    in_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=512,
    up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
)


def main(out: Path) -> None:
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    import models  # tools/fixturegen/models.py: scheduler config and model_index
    import tokenizer as tok  # tools/fixturegen/tokenizer.py: the real CLIP vocabulary

    torch.manual_seed(0)
    t0 = time.time()
    sd = out / "sd15"
    if not (sd / "unet").exists():
        UNet2DConditionModel(**SD15_UNET).save_pretrained(sd / "unet")
    if not (sd / "vae").exists():
        AutoencoderKL(**SD15_VAE).save_pretrained(sd / "vae")
    CLIPTextModel(
        CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                       projection_dim=768)
    ).save_pretrained(sd / "text_encoder")
    tok.write_clip_tokenizer(sd / "tokenizer")
    (sd / "scheduler").mkdir(parents=True, exist_ok=True)
    import json

    (sd / "scheduler" / "scheduler_config.json").write_text(json.dumps(models.SD15_SCHEDULER_CONFIG, indent=2))
    cn_kw = {k: v for k, v in SD15_UNET.items() if k not in ("out_channels", "up_block_types", "sample_size", "center_input_sample")}
    cn = ControlNetModel(conditioning_embedding_out_channels=(16, 32, 96, 256), **cn_kw)
    models.perturb_zero_layers(cn, torch.Generator().manual_seed(0))
    cn.save_pretrained(out / "controlnet")
    write_fewstep(out, UNet2DConditionModel.from_pretrained(sd / "unet"))
    print(f"wrote {out} in {time.time() - t0:.0f}s")


def write_fewstep(out: Path, unet) -> None:
    """The random LCM-LoRA-sized kohya LoRA and the TAESD (see the module doc); kept if present."""
    from diffusers import AutoencoderTiny
    from safetensors.torch import save_file

    from fewstep import random_lora, target_modules, unet_kohya_name

    lora_path = out / "lcm-lora.safetensors"
    if not lora_path.exists():
        targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                   "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv",
                   "upsamplers.0.conv"]
        lora = random_lora(target_modules(unet, targets), lambda m: 64, torch.Generator().manual_seed(7), std=0.01)
        sd = {}
        for module, (a, b) in lora.items():
            name = unet_kohya_name(module)
            sd[f"{name}.lora_down.weight"] = a.half().contiguous()
            sd[f"{name}.lora_up.weight"] = b.half().contiguous()
            sd[f"{name}.alpha"] = torch.tensor(8.0)
        save_file(sd, str(lora_path), metadata={"ss_network_module": "networks.lora"})
    if not (out / "taesd").exists():
        AutoencoderTiny().save_pretrained(out / "taesd")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "target/full-size"))
