#!/usr/bin/env python3
"""Tiled against untiled VAE decode, sketchx against diffusers: peak memory and time of decoding one image.

Four worker processes, one after the other (so that each VmHWM is that worker's own): sketchx untiled, sketchx
tiled (`examples/vae_decode.rs`), diffusers untiled, diffusers tiled (`AutoencoderKL.enable_tiling()`). Each loads
only the VAE (f32, CPU, all cores), decodes the same latents (torch-compatible seed; sketchx draws them with its
torch-compatible generator) and reports seconds per decode, VmRSS after loading and VmHWM at the end. The images
of the two sides are compared (max |diff|) for each mode.

  python tools/bench_vae_tiling.py --vae target/full-size/sd15/vae --size 1024 [--python PATH]

The sketchx worker is built with `cargo build --release --example vae_decode` unless --sketchx-bin is given. The
diffusers worker runs under --python, else $PYTHON, else the interpreter running this script; it needs the pinned
torch / diffusers of tools/requirements-fixtures.txt (this script itself needs only the standard library).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from array import array


def vm_mib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return 0.0


def diffusers_worker(a):
    import torch
    from diffusers import AutoencoderKL

    torch.set_num_threads(os.cpu_count())
    vae = AutoencoderKL.from_pretrained(a.vae, torch_dtype=torch.float32).eval()
    if a.vae_tiling:
        vae.enable_tiling()
    rss_loaded = vm_mib("VmRSS:")
    l = a.size // (2 ** (len(vae.config.block_out_channels) - 1))
    latents = torch.randn((1, vae.config.latent_channels, l, l), generator=torch.Generator().manual_seed(a.seed))
    seconds = []
    image = None
    with torch.inference_mode():
        for _ in range(max(1, a.runs)):
            image = None
            t = time.perf_counter()
            image = vae.decode(latents / vae.config.scaling_factor).sample
            seconds.append(time.perf_counter() - t)
    if a.save:
        image.contiguous().numpy().astype("<f4").tofile(a.save)
    print(json.dumps({"side": "diffusers", "vae_tiling": a.vae_tiling, "size": a.size, "seconds": seconds,
                      "rss_after_load_mib": rss_loaded, "peak_rss_mib": vm_mib("VmHWM:"),
                      "shape": list(image.shape)}))


def max_abs_diff(path_a, path_b):
    """Largest |a - b| of two little-endian float32 files (None when their lengths differ); standard library only,
    so that this script runs under any Python 3."""
    xs = []
    for path in (path_a, path_b):
        v = array("f")
        with open(path, "rb") as f:
            v.frombytes(f.read())
        if sys.byteorder == "big":
            v.byteswap()
        xs.append(v)
    x, y = xs
    if len(x) != len(y):
        return None
    return max((abs(p - q) for p, q in zip(x, y)), default=0.0)


def run_worker(cmd):
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise SystemExit(f"worker failed ({p.returncode}): {' '.join(cmd)}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", default="target/full-size/sd15/vae", help="a diffusers-layout VAE directory")
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels")
    ap.add_argument("--runs", type=int, default=1, help="timed decodes per worker (no warm-up)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default="untiled,tiled", help="untiled, tiled or both")
    ap.add_argument("--sides", default="sketchx,diffusers")
    ap.add_argument("--sketchx-bin", help="an already built vae_decode example binary")
    ap.add_argument("--python", help="the Python that runs the diffusers worker (default: $PYTHON, else the "
                    "interpreter running this script)")
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument("--worker", choices=["diffusers"], help=argparse.SUPPRESS)
    ap.add_argument("--vae-tiling", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return diffusers_worker(a)

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sides = a.sides.split(",")
    if "sketchx" in sides and not a.sketchx_bin:
        subprocess.run(["cargo", "build", "--release", "--example", "vae_decode", "-q"], check=True, cwd=repo)
        a.sketchx_bin = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(repo, "target")),
                                     "release", "examples", "vae_decode")
    python = a.python or os.environ.get("PYTHON") or sys.executable
    common = ["--vae", a.vae, "--size", str(a.size), "--runs", str(a.runs), "--seed", str(a.seed)]
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in a.modes.split(","):
            flag = ["--vae-tiling"] if mode == "tiled" else []
            for side in sides:
                out = os.path.join(tmp, f"{side}-{mode}.f32")
                cmd = ([a.sketchx_bin] if side == "sketchx" else
                       [python, os.path.abspath(__file__), "--worker", "diffusers"])
                res[(side, mode)] = run_worker(cmd + common + flag + ["--save", out])
            if len(sides) == 2:
                res[("diff", mode)] = max_abs_diff(*(os.path.join(tmp, f"{s}-{mode}.f32") for s in sides))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({f"{k[0]}/{k[1]}": v for k, v in res.items()}, f, indent=1)

    print(f"\nVAE decode of one {a.size}x{a.size} image ({a.vae}), f32, CPU, {os.cpu_count()} threads, "
          f"{max(1, a.runs)} run(s) per worker, no warm-up\n")
    print("| side | tiling | decode s | RSS after load | peak RSS (VmHWM) | peak - loaded |")
    print("|---|---|---:|---:|---:|---:|")
    for (side, mode), r in res.items():
        if side == "diff":
            continue
        s = min(r["seconds"])
        print(f"| {side} | {mode} | {s:.1f} | {r['rss_after_load_mib']:,.0f} MiB | {r['peak_rss_mib']:,.0f} MiB | "
              f"{r['peak_rss_mib'] - r['rss_after_load_mib']:,.0f} MiB |")
    for mode in a.modes.split(","):
        if ("sketchx", mode) in res and ("diffusers", mode) in res:
            sx, df = res[("sketchx", mode)], res[("diffusers", mode)]
            print(f"\n{mode}: sketchx/diffusers time {min(sx['seconds']) / min(df['seconds']):.2f}x, "
                  f"peak RSS {sx['peak_rss_mib'] / df['peak_rss_mib']:.2f}x, "
                  f"max |image diff| {res.get(('diff', mode))}")
    for side in sides:
        if (side, "untiled") in res and (side, "tiled") in res:
            u, t = res[(side, "untiled")], res[(side, "tiled")]
            print(f"{side}: tiled/untiled peak RSS {t['peak_rss_mib'] / u['peak_rss_mib']:.2f}x, "
                  f"time {min(t['seconds']) / min(u['seconds']):.2f}x")


if __name__ == "__main__":
    main()
