#!/usr/bin/env python3
"""Side-by-side CPU benchmark: sketchx (candle) against diffusers (PyTorch) on the same weights, same machine.

One run times, for each side in its own process (so that peak memory is each side's own):
  load  - loading text encoder, UNet, VAE and ControlNet (weights from the same diffusers-layout directories);
          with step too, "load + first step" (the step right after loading; torch reads its mapped weights then)
  text  - tokenizer + CLIP text encoder for one prompt (sketchx's prompt cache bypassed)
  step  - ControlNet + UNet at batch 2 (classifier-free guidance) at --step-size pixels (latents / 8)
  vae   - VAE decode of one --vae-size image
  job   - a whole generation at --job-size with --job-steps steps (1 image; by default Euler ancestral at guidance
          7.5; the few-step recipe: --scheduler lcm|tcd|..., --guidance G, --lora FILE[:SCALE] (diffusers:
          load_lora_weights + fuse_lora), --tiny-vae DIR --vae tiny (the tiny VAE decodes the image))
  tinyvae - the tiny VAE's decode of one --vae-size image (with --tiny-vae)
and prints min / median / max seconds per side and the ratio sketchx/diffusers of the medians (< 1: sketchx
faster), plus peak RSS (VmHWM / ru_maxrss) of each worker. --rounds alternates the two sides to spread noise.

  python tools/bench_side_by_side.py --model target/full-size/sd15 \
      --controlnet target/full-size/controlnet --runs 3 --rounds 1 [--dtype f32|bf16] [--python PATH]

The sketchx worker is `cargo bench --bench speed` (built in release first). The diffusers worker runs under
--python, else $PYTHON, else the interpreter running this script; it needs the pinned torch / diffusers /
transformers of tools/requirements-fixtures.txt (this script itself needs only the standard library). Random
full-size weights come from tools/make_full_size.py.

The peers (issue 17): --peers openvino,sdcpp adds OpenVINO and stable-diffusion.cpp, each in its own process under
its own venv (--openvino-python, --sdcpp-python; by default the venvs of tools/peers_setup.py under --peers-dir,
which also converts the weights), timed on the same pieces and shown in one more table with every side and the
ratio sketchx/side. How each peer's figures are taken (sd.cpp's API only runs whole generations: its step is
derived from two generations, its text and VAE figures are its own timers) is in tools/bench_peers.py. The few-step
recipe, f32 and bf16 (sd.cpp: its weight types, --sdcpp-wtype f32,f16,bf16,q8_0; default the --dtype):

  python3 tools/peers_setup.py --lora target/full-size/lcm-lora.safetensors
  python3 tools/bench_side_by_side.py --model target/full-size/sd15 --controlnet target/full-size/controlnet \
      --python PATH --peers openvino,sdcpp --runs 2 --scheduler lcm --guidance 1.0 --job-steps 4 \
      --lora target/full-size/lcm-lora.safetensors --dtype f32 --json f32.json
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

PIECES = ["load", "text", "step", "vae", "job"]
SCHEDULERS = {"euler_a": "EulerAncestralDiscreteScheduler", "euler": "EulerDiscreteScheduler",
              "ddim": "DDIMScheduler", "lcm": "LCMScheduler", "tcd": "TCDScheduler"}


def diffusers_worker(a):
    import torch
    from diffusers import (ControlNetModel, EulerAncestralDiscreteScheduler,
                           StableDiffusionControlNetPipeline)
    from PIL import Image

    torch.set_num_threads(os.cpu_count())
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    pieces = a.pieces.split(",")
    out = {}

    def load():
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer
        sub = lambda s: os.path.join(a.model, s)
        p = StableDiffusionControlNetPipeline(
            vae=AutoencoderKL.from_pretrained(sub("vae"), torch_dtype=dtype),
            text_encoder=CLIPTextModel.from_pretrained(sub("text_encoder"), dtype=dtype),
            tokenizer=CLIPTokenizer.from_pretrained(sub("tokenizer")),
            unet=UNet2DConditionModel.from_pretrained(sub("unet"), torch_dtype=dtype),
            controlnet=ControlNetModel.from_pretrained(a.controlnet, torch_dtype=dtype),
            scheduler=EulerAncestralDiscreteScheduler.from_pretrained(sub("scheduler")),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        import diffusers
        p.scheduler = getattr(diffusers, SCHEDULERS[a.scheduler]).from_config(p.scheduler.config)
        if a.lora:
            path, scale = a.lora, 1.0
            head, sep, tail = a.lora.rpartition(":")
            if sep:
                try:
                    path, scale = head, float(tail)
                except ValueError:
                    pass
            p.load_lora_weights(path)
            p.fuse_lora(lora_scale=scale)
            p.unload_lora_weights()  # the fused weights stay; the adapter layers go, as sketchx holds them
        if a.tiny_vae:
            from diffusers import AutoencoderTiny
            p.tiny = AutoencoderTiny.from_pretrained(a.tiny_vae, torch_dtype=dtype)
            if a.vae == "tiny":
                p.vae = p.tiny
        p.set_progress_bar_config(disable=True)
        return p

    def timed(f):
        t = time.perf_counter()
        r = f()
        return time.perf_counter() - t, r

    t, pipe = timed(load)
    rss_loaded = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
    if "load" in pieces:
        v = [t]
        for _ in range(1, a.runs):
            del pipe
            t, pipe = timed(load)
            v.append(t)
        out["load"] = v

    def repeat(name, f):
        out["first_" + name] = [timed(f)[0]]  # the warm-up: right after load, it pays torch's lazy page-in
        out[name] = [timed(f)[0] for _ in range(a.runs)]
        print(f"diffusers {name}: {out[name]}", file=sys.stderr)

    with torch.inference_mode():
        if "text" in pieces:
            text = "a red sports car on a mountain road, highly detailed"

            def enc():
                ids = pipe.tokenizer(text, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                     truncation=True, return_tensors="pt").input_ids
                return pipe.text_encoder(ids)[0]
            repeat("text", enc)
        if "step" in pieces:
            g = torch.Generator().manual_seed(0)
            l = a.step_size // 8
            lat = torch.randn(2, 4, l, l, generator=g).to(dtype)
            ctx = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g).to(dtype)
            cond = torch.rand(2, 3, a.step_size, a.step_size, generator=g).to(dtype)

            def step():
                d, m = pipe.controlnet(lat, 500, encoder_hidden_states=ctx, controlnet_cond=cond,
                                       conditioning_scale=1.0, return_dict=False)
                return pipe.unet(lat, 500, encoder_hidden_states=ctx, down_block_additional_residuals=d,
                                 mid_block_additional_residual=m, return_dict=False)[0]
            repeat("step", step)
        if "vae" in pieces:
            l = a.vae_size // 8
            lat = torch.randn(1, 4, l, l, generator=torch.Generator().manual_seed(0)).to(dtype)
            repeat("vae", lambda: pipe.vae.decode(lat / pipe.vae.config.scaling_factor, return_dict=False)[0])
        if "tinyvae" in pieces:
            l = a.vae_size // 8
            lat = torch.randn(1, 4, l, l, generator=torch.Generator().manual_seed(0)).to(dtype)
            repeat("tinyvae", lambda: pipe.tiny.decode(lat / pipe.tiny.config.scaling_factor, return_dict=False)[0])
        if "job" in pieces:
            sk = Image.open(os.path.join(a.repo, "examples/sketches/car.png")).convert("RGB")
            sk = sk.resize((a.job_size, a.job_size), Image.LANCZOS)

            def job():
                return pipe("a red sports car", image=sk, num_inference_steps=a.job_steps, guidance_scale=a.guidance,
                            negative_prompt="lowres, bad anatomy, bad hands, cropped, worst quality",
                            height=a.job_size, width=a.job_size,
                            generator=torch.Generator().manual_seed(42)).images
            repeat("job", job)
    out["rss_after_load_mib"] = rss_loaded
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def peer_worker(a):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_peers
    return {"openvino": bench_peers.openvino_worker, "sdcpp": bench_peers.sdcpp_worker}[a.worker](a)


def run_worker(cmd, env=None):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"worker failed ({p.returncode}): {' '.join(cmd)}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="target/full-size/sd15")
    ap.add_argument("--controlnet", default="target/full-size/controlnet")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--step-size", type=int, default=256)
    ap.add_argument("--vae-size", type=int, default=512)
    ap.add_argument("--job-size", type=int, default=512)
    ap.add_argument("--job-steps", type=int, default=2)
    ap.add_argument("--pieces", default=",".join(PIECES))
    ap.add_argument("--scheduler", default="euler_a", choices=sorted(SCHEDULERS), help="the job's scheduler")
    ap.add_argument("--guidance", type=float, default=7.5, help="the job's guidance scale")
    ap.add_argument("--lora", help="FILE[:SCALE]: a LoRA fused into the job's models")
    ap.add_argument("--tiny-vae", help="a TAESD directory (AutoencoderTiny): the tinyvae piece, and --vae tiny")
    ap.add_argument("--vae", default="full", choices=["full", "tiny"], help="which VAE decodes the job's image")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--profile", action="store_true", help="also print sketchx's per-op-kind step profile")
    ap.add_argument("--baseline", action="store_true",
                    help="also time sketchx with its kernels off (SKETCHX_PLAIN_CANDLE=1): the 'before' column")
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument("--diffusers-json", help="reuse the diffusers side of an earlier --json run with the same "
                    "settings (diffusers' figures do not change with sketchx's code); only sketchx runs")
    ap.add_argument("--sketchx-bin", help="run this already built speed bench binary instead of `cargo bench`")
    ap.add_argument("--python", help="the Python that runs the diffusers worker (default: $PYTHON, else the "
                    "interpreter running this script)")
    ap.add_argument("--peers", default="", help="comma-separated peers to time too: openvino, sdcpp")
    ap.add_argument("--peers-dir", help="tools/peers_setup.py's --dir (default: target/peers)")
    ap.add_argument("--openvino-python", help="the Python of the OpenVINO venv (default: PEERS_DIR/ov-venv)")
    ap.add_argument("--sdcpp-python", help="the Python of the sd.cpp venv (default: PEERS_DIR/sdcpp-venv)")
    ap.add_argument("--sdcpp-wtype", help="sd.cpp weight types, comma-separated, one worker each (f32, f16, bf16: "
                    "the files of peers_setup.py; other ggml types, e.g. q8_0, converted by sd.cpp at load); "
                    "default: --dtype")
    ap.add_argument("--sdcpp-step-n", type=int, default=3,
                    help="sd.cpp's step: (t(N) - t(1)) / (N - 1) of generations at --step-size")
    ap.add_argument("--save-images", help="the peers save their last job's image in this directory")
    ap.add_argument("--verbose", action="store_true", help="print sd.cpp's log")
    ap.add_argument("--worker", choices=["diffusers", "openvino", "sdcpp"], help=argparse.SUPPRESS)
    ap.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.peers_dir = os.path.abspath(a.peers_dir or os.path.join(a.repo, "target", "peers"))
    if a.worker == "diffusers":
        return diffusers_worker(a)
    if a.worker:
        return peer_worker(a)
    peers = [p for p in a.peers.split(",") if p]
    for p in peers:
        if p not in ("openvino", "sdcpp"):
            raise SystemExit(f"unknown peer {p} (openvino, sdcpp)")

    common = ["--model", a.model, "--controlnet", a.controlnet, "--runs", str(a.runs), "--step-size",
              str(a.step_size), "--vae-size", str(a.vae_size), "--job-size", str(a.job_size), "--job-steps",
              str(a.job_steps), "--pieces", a.pieces, "--dtype", a.dtype, "--scheduler", a.scheduler,
              "--guidance", str(a.guidance), "--vae", a.vae]
    common += (["--lora", a.lora] if a.lora else []) + (["--tiny-vae", a.tiny_vae] if a.tiny_vae else [])
    if a.sketchx_bin:
        sx_cmd = [a.sketchx_bin]
    else:
        subprocess.run(["cargo", "build", "--release", "--bench", "speed", "-q"], check=True, cwd=a.repo)
        sx_cmd = ["cargo", "bench", "-q", "--bench", "speed", "--"]
    sx_cmd += common + (["--profile"] if a.profile else [])
    python = a.python or os.environ.get("PYTHON") or sys.executable
    df_cmd = [python, os.path.abspath(__file__), "--worker", "diffusers"] + common
    peer_cmds = {}
    worker = [os.path.abspath(__file__), "--worker"]
    pcommon = common + ["--peers-dir", a.peers_dir, "--sdcpp-step-n", str(a.sdcpp_step_n)]
    pcommon += (["--save-images", os.path.abspath(a.save_images)] if a.save_images else [])
    pcommon += ["--verbose"] if a.verbose else []
    if "openvino" in peers:
        py = a.openvino_python or os.path.join(a.peers_dir, "ov-venv", "bin", "python")
        peer_cmds["openvino"] = [py] + worker + ["openvino"] + pcommon
    if "sdcpp" in peers:
        py = a.sdcpp_python or os.path.join(a.peers_dir, "sdcpp-venv", "bin", "python")
        for wt in (a.sdcpp_wtype or a.dtype).split(","):
            peer_cmds["sd.cpp " + wt] = [py] + worker + ["sdcpp", "--sdcpp-wtype", wt] + pcommon
    res = {"sketchx": [], "diffusers": [], "plain": []}
    res.update({k: [] for k in peer_cmds})
    for r in range(a.rounds):
        if a.baseline:
            print(f"round {r + 1}/{a.rounds}: sketchx on plain candle", file=sys.stderr)
            res["plain"].append(run_worker(sx_cmd, env=dict(os.environ, SKETCHX_PLAIN_CANDLE="1")))
        print(f"round {r + 1}/{a.rounds}: sketchx", file=sys.stderr)
        res["sketchx"].append(run_worker(sx_cmd))
        if not a.diffusers_json:
            print(f"round {r + 1}/{a.rounds}: diffusers", file=sys.stderr)
            res["diffusers"].append(run_worker(df_cmd))
        for k, cmd in peer_cmds.items():
            print(f"round {r + 1}/{a.rounds}: {k}", file=sys.stderr)
            res[k].append(run_worker(cmd))
    if a.diffusers_json:
        with open(a.diffusers_json) as f:
            earlier = json.load(f)
        # Either a whole earlier result ({"diffusers": [...]}) or one diffusers worker's output.
        res["diffusers"] = earlier["diffusers"] if "diffusers" in earlier else [earlier]
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)

    def stats(side, piece):
        v = [x for r in res[side] for x in r.get(piece, [])]
        return (min(v), statistics.median(v), max(v)) if v else None

    print(f"\nCPU, {os.cpu_count()} threads, dtype {a.dtype}; step at {a.step_size}px (batch 2), VAE at "
          f"{a.vae_size}px, job {a.job_size}px x {a.job_steps} steps ({a.scheduler}, guidance {a.guidance}, "
          f"LoRA {a.lora or 'none'}, {a.vae} VAE); {a.runs * a.rounds} runs per piece\n")
    sides = [("sketchx", "sketchx")] + ([("plain", "sketchx on plain candle (before)")] if a.baseline else [])
    for side, label in sides:
        print(f"\n{label} vs diffusers:\n")
        print("| piece | sketchx s (min / median / max) | diffusers s (min / median / max) | ratio sketchx/diffusers "
              "(median; min/min) |")
        print("|---|---|---|---|")
        for p in a.pieces.split(","):
            s, d = stats(side, p), stats("diffusers", p)
            if not s or not d:
                continue
            fmt = lambda t: " / ".join(f"{x:.3f}" for x in t)
            print(f"| {p} | {fmt(s)} | {fmt(d)} | {s[1] / d[1]:.2f}x; {s[0] / d[0]:.2f}x |")
        if "load" in a.pieces.split(",") and "step" in a.pieces.split(","):
            # The fair load figure: diffusers maps the weights and reads them in during its first step.
            tot = lambda side: [r["load"][-1] + r["first_step"][0] for r in res[side]]
            s, d = tot(side), tot("diffusers")
            s, d = (min(s), statistics.median(s), max(s)), (min(d), statistics.median(d), max(d))
            f3 = lambda t: " / ".join(f"{x:.3f}" for x in t)
            print(f"| load + first step | {f3(s)} | {f3(d)} | {s[1] / d[1]:.2f}x; {s[0] / d[0]:.2f}x |")
        for key in ["rss_after_load_mib", "peak_rss_mib"]:
            s = max(r[key] for r in res[side])
            d = max(r[key] for r in res["diffusers"])
            print(f"| {key} | {s:.0f} MiB | {d:.0f} MiB | {s / d:.2f}x |")
    if peer_cmds:
        print_all_sides(a, res, ["sketchx", "diffusers"] + list(peer_cmds))
    if a.profile:
        for side, label in sides:
            prof = res[side][-1].get("profile") or {}
            total = sum(v["seconds_per_step"] for v in prof.values())
            print(f"\n{label} step profile (seconds per step, share; total {total:.2f} s):")
            for k, v in sorted(prof.items(), key=lambda kv: -kv[1]["seconds_per_step"]):
                calls = f"({v['calls_per_step']} calls)" if "calls_per_step" in v else ""
                print(f"  {k:12s} {v['seconds_per_step']:8.3f} s  {100 * v['seconds_per_step'] / total:5.1f}%  {calls}")


def print_all_sides(a, res, sides):
    """One table with every side: seconds min / median / max, and sketchx's median over that side's."""
    def stats(side, piece):
        v = [x for r in res[side] for x in r.get(piece, [])]
        return (min(v), statistics.median(v), max(v)) if v else None

    extra = ["load_job", "job_minus_lora", "step_sampling"]  # the peers' own extra figures (tools/bench_peers.py)
    rows = a.pieces.split(",") + [p for p in extra if any(stats(s, p) for s in sides)]
    head = ["piece"] + [s + (" s" if s == "sketchx" else " s | sketchx/" + s.split()[0]) for s in sides]
    print(f"\nAll sides ({a.dtype}; sd.cpp: its weight type); seconds min / median / max | "
          "sketchx median / that side's median (< 1: sketchx faster):\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * (1 + 2 * len(sides) - 1))
    for p in rows:
        s = stats("sketchx", {"job_minus_lora": "job", "step_sampling": "step"}.get(p, p))  # the ratio's sketchx
        cells = []
        for side in sides:
            v = stats(side, p)
            cells.append(" / ".join(f"{x:.3f}" for x in v) if v else "-")
            if side != "sketchx":
                cells.append(f"{s[1] / v[1]:.2f}x" if v and s else "-")
        print(f"| {p} | " + " | ".join(cells) + " |")
    for key in ["rss_after_load_mib", "peak_rss_mib"]:
        s = max(r[key] for r in res["sketchx"])
        cells = []
        for side in sides:
            v = max(r[key] for r in res[side])
            cells.append(f"{v:.0f} MiB")
            if side != "sketchx":
                cells.append(f"{s / v:.2f}x")
        print(f"| {key} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
