"""Where OpenVINO's time goes: its own per-layer counters (PERF_COUNT) for the step (ControlNet + UNet, batch 2)
and the VAE decode, compiled as tools/bench_peers.py compiles them, to set beside sketchx's `--profile-shapes`.

    /path/to/ov-venv/bin/python tools/ov_profile.py --model target/full-size/sd15 \
        --peers-dir target/peers [--dtype bf16|f32] [--step-size 256] [--vae-size 512] [--runs 3]

Prints, per piece: the wall time per run (with the counters on, a few % slower than bench_peers.py's), the sum of
the layers' times per (layer type, kernel), and per (type, UNet level, module) group, e.g. `('Convolution', 'L1',
'resnets.conv2')`: L1 is the 32x32 level at 256x256 (down_blocks.0 and up_blocks.3), L4 the 4x4 one with the mid
block (the VAE decoder's groups keep its block names). Needs the IR of tools/peers_setup.py; torch is not needed.
"""
import argparse
import collections
import json
import os
import re
import sys
import time

import numpy as np
import openvino as ov

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_peers import residual_shapes  # noqa: E402

LEVELS = {"down_blocks.0": "L1", "up_blocks.3": "L1", "down_blocks.1": "L2", "up_blocks.2": "L2",
          "down_blocks.2": "L3", "up_blocks.1": "L3", "down_blocks.3": "L4", "up_blocks.0": "L4",
          "mid_block": "L4"}


def group(node):
    """(level, module) of a layer's name: the UNet level and the module without block indices."""
    name = node.split("/")[0]
    m = re.search(r"(down_blocks\.\d|up_blocks\.\d|mid_block)", name)
    if "decoder" in name:
        level = m.group(1) if m else "other"
    else:
        level = LEVELS.get(m.group(1), "other") if m else "other"
    if "transformer_blocks" in name:
        module = re.sub(r".*transformer_blocks\.\d+\.", "", name)
    else:
        module = re.sub(r".*\.(resnets|attentions|upsamplers|downsamplers)\.\d+\.?", r"\1.", name)
    return level, module


def profile(requests, run, runs):
    run()
    t0 = time.perf_counter()
    by_kernel, by_group = collections.defaultdict(float), collections.defaultdict(float)
    for _ in range(runs):
        run()
        for req in requests:
            for pi in req.profiling_info:
                s = pi.real_time.total_seconds() / runs
                by_kernel[(pi.node_type, pi.exec_type)] += s
                by_group[(pi.node_type,) + group(pi.node_name)] += s
    return (time.perf_counter() - t0) / runs, by_kernel, by_group


def report(name, result, top):
    wall, by_kernel, by_group = result
    print(f"{name}: {wall:.3f} s per run, layers {sum(by_kernel.values()):.3f} s")
    for k, v in sorted(by_kernel.items(), key=lambda x: -x[1])[:top]:
        print(f"  {v:.4f}  {k}")
    print(f"{name} by level and module:")
    for k, v in sorted(by_group.items(), key=lambda x: -x[1])[:3 * top]:
        print(f"  {v:.4f}  {k}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--peers-dir", required=True)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--step-size", type=int, default=256)
    ap.add_argument("--vae-size", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args()
    core = ov.Core()
    cfg = {"INFERENCE_PRECISION_HINT": a.dtype, "INFERENCE_NUM_THREADS": os.cpu_count(),
           "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": "YES"}
    d = os.path.join(a.peers_dir, "openvino")

    def compile(name, shapes):
        m = core.read_model(os.path.join(d, name + ".xml"))
        m.reshape({i: ov.PartialShape(list(s)) for i, s in enumerate(shapes)})
        return core.compile_model(m, "CPU", cfg).create_infer_request()

    with open(os.path.join(a.model, "unet", "config.json")) as f:
        ucfg = json.load(f)
    b, lat = 2, a.step_size // 8
    res, mid = residual_shapes(ucfg, b, lat)
    common = [(b, 4, lat, lat), (1,), (b, 77, ucfg["cross_attention_dim"])]
    cn = compile("controlnet", common + [(b, 3, a.step_size, a.step_size)])
    unet = compile("unet", common + res + [mid])
    g = np.random.default_rng(0)
    x = g.standard_normal((b, 4, lat, lat), dtype=np.float32)
    ctx = g.standard_normal((b, 77, ucfg["cross_attention_dim"]), dtype=np.float32)
    cond = g.random((b, 3, a.step_size, a.step_size), dtype=np.float32)
    t = np.array([500.0], dtype=np.float32)

    def step():
        cn.infer([x, t, ctx, cond])
        unet.infer([x, t, ctx] + [cn.get_output_tensor(i).data.copy() for i in range(13)])

    report("step", profile([cn, unet], step, a.runs), a.top)
    del cn, unet
    vl = a.vae_size // 8
    vae = compile("vae_decoder", [(1, 4, vl, vl)])
    z = g.standard_normal((1, 4, vl, vl), dtype=np.float32) / 0.18215
    report("vae", profile([vae], lambda: vae.infer([z]), max(1, a.runs - 1)), a.top)


if __name__ == "__main__":
    main()
