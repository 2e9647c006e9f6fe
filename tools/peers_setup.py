#!/usr/bin/env python3
"""Scratch environments and converted weights for the peers of tools/bench_side_by_side.py (issue 17):
OpenVINO and stable-diffusion.cpp, on the same random full-size weights (tools/make_full_size.py) as sketchx and
diffusers.

    python3 tools/peers_setup.py --dir target/peers --model target/full-size/sd15 \
        --controlnet target/full-size/controlnet --lora target/full-size/lcm-lora.safetensors

then (the sketchx speed bench built first: `cargo bench --bench speed --no-run`, or pass its binary):

    python3 tools/bench_side_by_side.py --model target/full-size/sd15 --controlnet target/full-size/controlnet \
        --python /path/to/diffusers-venv/bin/python --peers openvino,sdcpp --peers-dir target/peers \
        --runs 2 --scheduler lcm --guidance 1.0 --job-steps 4 \
        --lora target/full-size/lcm-lora.safetensors --dtype f32|bf16 --json out.json

(--openvino-python / --sdcpp-python default to the venvs made here; sd.cpp's weight type follows --dtype unless
--sdcpp-wtype says otherwise.)

What it makes under --dir (default target/peers; everything is scratch, nothing is committed):
  ov-venv/       Python venv: tools/requirements-fixtures.txt (torch, diffusers, transformers, peft: the conversion
                 needs the torch modules; the bench's OpenVINO job uses diffusers' scheduler and CLIP tokenizer)
                 + openvino==OPENVINO.
  sdcpp-venv/    Python venv: stable-diffusion-cpp-python==SDCPP, built from source by pip (scikit-build-core,
                 CMake from PyPI) with CMAKE_ARGS="-DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release": ggml compiled with
                 -march=native, so AVX-512 (F/BW/VL/VNNI/BF16) and AMX where the CPU has them. It takes a while
                 (~20 min on 2 cores). pip caches the built wheel: to rebuild with other CMAKE_ARGS, add
                 --no-cache-dir (or remove the wheel from pip's cache).
  openvino/      OpenVINO IR (xml + bin, f32: saved with compress_to_fp16=False), converted with
                 openvino.convert_model(torch module, example_input=...) from the diffusers modules:
                 text_encoder (input_ids [1, 77] -> last hidden state), unet (sample, timestep, context, 12 down
                 residuals, mid residual -> noise), unet_lora (the same with --lora fused in torch first:
                 load_lora_weights + fuse_lora + unload_lora_weights, as the bench's diffusers side does), controlnet
                 (sample, timestep, context, cond image -> 12 down residuals + mid), vae_decoder (latent -> image,
                 post_quant_conv included). The IR keeps the traced dynamic dimensions; the bench reshapes each
                 model to the static shapes of the piece it times before compiling it.
  sdcpp/         sd.cpp's inputs: sd15.f32.safetensors (one original-layout SD1.5 checkpoint:
                 model.diffusion_model.* / first_stage_model.* / cond_stage_model.transformer.text_model.*, written
                 with tools/fixturegen/formats.py's unet_to_ldm / vae_to_ldm / clip_to_ldm), controlnet.f32.safetensors
                 (original ControlNet layout under control_model., controlnet_to_ldm), the same two in f16 and bf16
                 (the f32 values rounded by torch), and lora/<name>.safetensors (a link to --lora: sd.cpp reads
                 kohya LoRAs named in the prompt as <lora:name:scale> from its lora_model_dir).
  versions.json  what pip installed (openvino, torch, diffusers, transformers, stable-diffusion-cpp-python) and
                 sd.cpp's commit and system info.

Steps can be run alone: --only install|openvino|sdcpp (repeatable); --peers openvino sets up OpenVINO alone
(no sd.cpp build); an existing venv is reused (pip then only checks the pins), an existing converted file is kept
unless --force.
"""
import argparse
import json
import os
import subprocess
import sys

OPENVINO = "2026.4.1"
SDCPP = "0.4.7"
SDCPP_CMAKE_ARGS = "-DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release"
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
OV_PARTS = ["text_encoder", "unet", "unet_lora", "controlnet", "vae_decoder"]


def sh(cmd, env=None):
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, env=env)


def venv_python(d, name):
    return os.path.join(d, name, "bin", "python")


def make_venv(d, name, packages, env=None):
    py = venv_python(d, name)
    if not os.path.exists(py):
        sh([sys.executable, "-m", "venv", os.path.join(d, name)])
        sh([py, "-m", "pip", "install", "-q", "--upgrade", "pip"])
    sh([py, "-m", "pip", "install"] + packages, env=env)
    return py


def install(a):
    os.makedirs(a.dir, exist_ok=True)
    # ov-venv is always made: the conversions of both peers run under it (and tools/make_full_size.py can).
    ov = make_venv(a.dir, "ov-venv", ["-r", os.path.join(HERE, "requirements-fixtures.txt"), f"openvino=={OPENVINO}"])
    # Only for its CLIP vocabulary file (tools/make_full_size.py writes the tokenizer from it); its dependencies
    # (torchvision and more) are not needed.
    sh([ov, "-m", "pip", "install", "-q", "--no-deps", "open-clip-torch==3.3.0"])
    if "sdcpp" in a.peers:
        env = dict(os.environ, CMAKE_ARGS=os.environ.get("CMAKE_ARGS", SDCPP_CMAKE_ARGS),
                   CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count()))
        make_venv(a.dir, "sdcpp-venv", ["-v", f"stable-diffusion-cpp-python=={SDCPP}", "numpy", "pillow"], env=env)


def record_versions(a):
    out = {}
    probe = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in %r}))")
    ov = venv_python(a.dir, "ov-venv")
    if os.path.exists(ov):
        pkgs = ["openvino", "torch", "diffusers", "transformers", "peft", "safetensors", "numpy"]
        out["ov-venv"] = json.loads(subprocess.check_output([ov, "-c", probe % pkgs], text=True))
    sd = venv_python(a.dir, "sdcpp-venv")
    if os.path.exists(sd) and "sdcpp" in a.peers:
        out["sdcpp-venv"] = json.loads(subprocess.check_output(
            [sd, "-c", probe % ["stable-diffusion-cpp-python", "numpy", "pillow"]], text=True))
        info = ("import stable_diffusion_cpp as s, json; print(json.dumps({'commit': s.sd_commit().decode(), "
                "'system_info': s.sd_get_system_info().decode().strip()}))")
        out["sdcpp-venv"].update(json.loads(subprocess.check_output([sd, "-c", info], text=True).splitlines()[-1]))
        out["sdcpp-venv"]["CMAKE_ARGS"] = os.environ.get("CMAKE_ARGS", SDCPP_CMAKE_ARGS)
    with open(os.path.join(a.dir, "versions.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))


# ---------------------------------------------------------------------------------------------------------------
# conversions (run under ov-venv's Python: they need torch / diffusers / openvino)
# ---------------------------------------------------------------------------------------------------------------


def load_unet(a, lora):
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(os.path.join(a.model, "unet"), torch_dtype=torch.float32).eval()
    if lora:
        # Fused as the bench's diffusers side does: through a pipeline's LoRA loader (kohya keys -> peft), fuse,
        # drop the adapter layers.
        from diffusers import StableDiffusionPipeline

        p = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=None,
                                    safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        path, scale = lora_spec(lora)
        p.load_lora_weights(path)
        p.fuse_lora(lora_scale=scale)
        p.unload_lora_weights()
        unet = p.unet
    return unet


def lora_spec(spec):
    head, sep, tail = spec.rpartition(":")
    if sep:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def convert_openvino(a, part):
    import openvino as ov
    import torch

    out = os.path.join(a.dir, "openvino", part + ".xml")
    if os.path.exists(out) and not a.force:
        print(f"{out} exists", file=sys.stderr)
        return
    if part == "unet_lora" and not a.lora:
        print("no --lora: unet_lora skipped", file=sys.stderr)
        return
    os.makedirs(os.path.dirname(out), exist_ok=True)
    torch.set_num_threads(os.cpu_count())
    g = torch.Generator().manual_seed(0)
    b, lat = 2, 32  # the traced example (the step piece's shapes); the dimensions stay dynamic in the IR
    ctx = torch.randn(b, 77, 768, generator=g)
    sample = torch.randn(b, 4, lat, lat, generator=g)
    t = torch.tensor([500.0])

    if part == "text_encoder":
        from transformers import CLIPTextModel

        class TextEncoder(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids):
                return self.m(input_ids, return_dict=False)[0]

        module = TextEncoder(CLIPTextModel.from_pretrained(os.path.join(a.model, "text_encoder")).eval())
        example = (torch.randint(0, 49408, (1, 77), generator=g),)
    elif part == "vae_decoder":
        from diffusers import AutoencoderKL

        class VaeDecoder(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, latent):
                return self.m.decode(latent, return_dict=False)[0]

        module = VaeDecoder(AutoencoderKL.from_pretrained(os.path.join(a.model, "vae")).eval())
        example = (torch.randn(1, 4, 64, 64, generator=g),)
    elif part == "controlnet":
        from diffusers import ControlNetModel

        class ControlNet(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, sample, timestep, context, cond):
                down, mid = self.m(sample, timestep, encoder_hidden_states=context, controlnet_cond=cond,
                                   conditioning_scale=1.0, return_dict=False)
                return tuple(down) + (mid,)

        module = ControlNet(ControlNetModel.from_pretrained(a.controlnet).eval())
        example = (sample, t, ctx, torch.rand(b, 3, lat * 8, lat * 8, generator=g))
    else:  # unet, unet_lora
        class UNet(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, sample, timestep, context, d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, mid):
                return self.m(sample, timestep, encoder_hidden_states=context,
                              down_block_additional_residuals=(d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11),
                              mid_block_additional_residual=mid, return_dict=False)[0]

        module = UNet(load_unet(a, a.lora if part == "unet_lora" else None))
        # The residuals' shapes, from the UNet's own down path (SD1.5: 320 x3, 320/640 ..., 1280 at 1/8).
        ch = module.m.config.block_out_channels
        shapes = []
        h = lat
        for i, c in enumerate(ch):
            if i == 0:
                shapes.append((ch[0], h))
            shapes += [(c, h)] * module.m.config.layers_per_block
            if i < len(ch) - 1:
                h //= 2
                shapes.append((c, h))
        res = tuple(torch.randn(b, c, s, s, generator=g) * 0.1 for c, s in shapes)
        assert len(res) == 12, shapes
        example = (sample, t, ctx) + res + (torch.randn(b, ch[-1], h, h, generator=g) * 0.1,)

    with torch.no_grad():
        ref = module(*example)
        model = ov.convert_model(module, example_input=example)
    ov.save_model(model, out, compress_to_fp16=False)
    # Check the IR against torch on the traced example (f32, same shapes).
    compiled = ov.Core().compile_model(out, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = compiled([x.numpy() for x in example])
    refs = ref if isinstance(ref, tuple) else (ref,)
    err = max(float(abs(got[i] - r.numpy()).max()) for i, r in enumerate(refs))
    scale = max(float(abs(r.numpy()).max()) for r in refs)
    print(f"{part}: wrote {out}; OpenVINO f32 vs torch on the example: max |diff| {err:.3g} "
          f"(max |ref| {scale:.3g})", file=sys.stderr)
    if err > 1e-2 * max(scale, 1.0):
        raise SystemExit(f"{part}: the converted model does not match torch")


def convert_sdcpp(a):
    import torch
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, os.path.join(HERE, "fixturegen"))
    from formats import clip_to_ldm, controlnet_to_ldm, unet_to_ldm, vae_to_ldm

    d = os.path.join(a.dir, "sdcpp")
    os.makedirs(os.path.join(d, "lora"), exist_ok=True)

    def one(folder):
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        assert len(files) == 1, (folder, files)
        return load_file(os.path.join(folder, files[0]))

    def cfg(folder):
        with open(os.path.join(folder, "config.json")) as f:
            return json.load(f)

    def write(name, build):
        paths = {dt: os.path.join(d, f"{name}.{dt}.safetensors") for dt in ("f32", "f16", "bf16")}
        if all(os.path.exists(p) for p in paths.values()) and not a.force:
            print(f"{name}: exists", file=sys.stderr)
            return
        sd = build()
        for dt, tdt in (("f32", torch.float32), ("f16", torch.float16), ("bf16", torch.bfloat16)):
            save_file({k: v.to(tdt).contiguous() for k, v in sd.items()}, paths[dt])
            print(f"wrote {paths[dt]} ({len(sd)} tensors)", file=sys.stderr)

    def checkpoint():
        m = a.model
        sd = {"model.diffusion_model." + k: v
              for k, v in unet_to_ldm(one(os.path.join(m, "unet")), cfg(os.path.join(m, "unet"))).items()}
        sd.update({"first_stage_model." + k: v
                   for k, v in vae_to_ldm(one(os.path.join(m, "vae")), cfg(os.path.join(m, "vae"))).items()})
        sd.update(clip_to_ldm({k: v for k, v in one(os.path.join(m, "text_encoder")).items()
                               if not k.endswith("position_ids")}))
        return sd

    write("sd15", checkpoint)
    write("controlnet", lambda: {"control_model." + k: v
                                 for k, v in controlnet_to_ldm(one(a.controlnet), cfg(a.controlnet)).items()})
    if a.lora:
        path, _ = lora_spec(a.lora)
        link = os.path.join(d, "lora", os.path.basename(path))
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.abspath(path), link)
        print(f"linked {link}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=os.path.join(REPO, "target", "peers"))
    ap.add_argument("--model", default=os.path.join(REPO, "target", "full-size", "sd15"))
    ap.add_argument("--controlnet", default=os.path.join(REPO, "target", "full-size", "controlnet"))
    ap.add_argument("--lora", help="FILE[:SCALE]: the LoRA fused into OpenVINO's unet_lora and linked for sd.cpp")
    ap.add_argument("--only", action="append", choices=["install", "openvino", "sdcpp"],
                    help="run only these steps (repeatable; default: all)")
    ap.add_argument("--peers", default="openvino,sdcpp",
                    help="which peers to set up, comma-separated (default: openvino,sdcpp; sd.cpp's build takes "
                         "~20 min on 2 cores)")
    ap.add_argument("--force", action="store_true", help="convert again even where the output exists")
    ap.add_argument("--convert", help=argparse.SUPPRESS)  # internal: one conversion, run under ov-venv's Python
    a = ap.parse_args()
    a.dir = os.path.abspath(a.dir)
    a.peers = [p.strip() for p in a.peers.split(",") if p.strip()]
    unknown = sorted(set(a.peers) - {"openvino", "sdcpp"})
    if unknown:
        ap.error(f"--peers: unknown {', '.join(unknown)} (known: openvino, sdcpp)")
    if a.convert:
        if a.convert == "sdcpp":
            return convert_sdcpp(a)
        return convert_openvino(a, a.convert.split(":", 1)[1])
    steps = a.only or ["install", "openvino", "sdcpp"]
    if "install" in steps:
        install(a)
    ov = venv_python(a.dir, "ov-venv")
    common = ["--dir", a.dir, "--model", a.model, "--controlnet", a.controlnet] + (["--lora", a.lora] if a.lora else [])
    common += ["--force"] if a.force else []
    if "openvino" in steps and "openvino" in a.peers:
        for part in OV_PARTS:  # one process each: torch's and OpenVINO's memory go back between the conversions
            sh([ov, os.path.abspath(__file__), "--convert", "openvino:" + part] + common)
    if "sdcpp" in steps and "sdcpp" in a.peers:
        sh([ov, os.path.abspath(__file__), "--convert", "sdcpp"] + common)
    record_versions(a)


if __name__ == "__main__":
    main()
