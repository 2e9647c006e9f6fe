"""How far diffusers' bf16 pipeline lands from its own f32 output on the end-to-end cases.

The CPU bf16 mode of sketchx is tested against the f32 references with this deviation as the yardstick: sketchx
in bf16 must stay at least about as close to the f32 images as diffusers in bf16 does (tests/e2e_parity.rs).
Writes reference/e2e/bf16.json; runs after models.py (which writes the f32 references and cases.json).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import models


def stats(a: np.ndarray, b: np.ndarray) -> dict:
    """mean, 99.9th percentile (as tests/e2e_parity.rs computes it) and max of |a - b| in 0..255 units."""
    d = np.sort(np.abs(a.astype(np.int16) - b.astype(np.int16)).ravel())
    idx = min(int(np.ceil(len(d) * 0.999)) - 1, len(d) - 1)
    return {"mean": float(d.mean()), "p999": float(d[idx]), "max": float(d[-1])}


def generate(fixtures_dir):
    out = Path(fixtures_dir)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    e2e = out / "reference" / "e2e"
    cases = json.loads((e2e / "cases.json").read_text())
    pipes = {}
    result = {"torch": torch.__version__, "cases": {}}
    for c in cases:
        key = (c["model"], c["controlnet"])
        if key not in pipes:
            pipes[key] = models.e2e_pipeline(out, *key, dtype=torch.bfloat16)
        image = Image.open(e2e / f"{c['name']}.control.png")
        imgs = models.e2e_run(*pipes[key], c, image)
        result["cases"][c["name"]] = [
            stats(arr, np.asarray(Image.open(e2e / name).convert("RGB")))
            for arr, name in zip(imgs, c["images"])
        ]
        print(c["name"], result["cases"][c["name"]], flush=True)
    (e2e / "bf16.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    generate(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures")
