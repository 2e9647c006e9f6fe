#!/usr/bin/env python3
"""Compare PNG encoders: PIL (what the old Python service used) against sketchx's `encode_png` settings.

Measures, on the same pixels, file size and median encode time of

* PIL ``compress_level=1`` (the old service's "optimized PNG compression"), PIL's default (level 6) and
  PIL ``optimize=True``;
* every candidate setting of ``benches/png.rs`` (run through ``cargo bench --bench png -- <files>``).

Images: the example sketches (``examples/sketches/*.png``), generated photo-like 512x512 images (SD outputs are
photo-like: smooth gradients with fine texture), and any ``--extra`` images (e.g. real photographs).

    python tools/png_compare.py [--runs 9] [--extra photo.png ...] [--manifest-path Cargo.toml]

Prints one markdown table per image group (sizes in KiB, times in ms) and the raw per-image numbers.
``CARGO_TARGET_DIR`` and other cargo environment variables are honoured.
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent

PIL_SETTINGS = {
    "PIL compress_level=1": {"compress_level": 1},
    "PIL default (6)": {},
    "PIL optimize=True": {"optimize": True},
}


def value_noise(rng, w, h, octaves, grain):
    """Smooth multi-octave value noise (bicubic-upsampled random grids) plus optional per-pixel grain."""
    img = np.zeros((h, w, 3), np.float64)
    for cell, amp in octaves:
        grid = rng.uniform(-0.5, 0.5, (h // cell + 2, w // cell + 2, 3))
        layer = np.stack(
            [
                np.asarray(
                    Image.fromarray(grid[..., c].astype(np.float32), "F").resize(
                        (w + 2 * cell, h + 2 * cell), Image.BICUBIC
                    )
                )[:h, :w]
                for c in range(3)
            ],
            axis=-1,
        )
        img += amp * layer
    img += rng.normal(0, grain, img.shape) if grain else 0
    return Image.fromarray(np.clip(128 + img, 0, 255).astype(np.uint8), "RGB")


def generated_images(out: Path) -> list[Path]:
    rng = np.random.default_rng(512)
    octaves = [(128, 160), (32, 70), (8, 25)]
    imgs = {
        "smooth-512.png": value_noise(rng, 512, 512, octaves, 0),
        "textured-512.png": value_noise(rng, 512, 512, octaves + [(2, 12)], 3.0),
    }
    paths = []
    for name, im in imgs.items():
        p = out / name
        im.save(p, compress_level=1)
        paths.append(p)
    return paths


def time_pil(im: Image.Image, kwargs: dict, runs: int) -> tuple[int, float]:
    def once():
        buf = io.BytesIO()
        im.save(buf, "PNG", **kwargs)
        return buf.getbuffer().nbytes

    size = once()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        once()
        times.append((time.perf_counter() - t) * 1e3)
    return size, statistics.median(times)


def run_rust(files: list[Path], runs: int, manifest: Path) -> list[tuple[str, str, int, float]]:
    cmd = ["cargo", "bench", "--manifest-path", str(manifest), "--bench", "png", "--", *map(str, files)]
    env = dict(__import__("os").environ, SKETCHX_BENCH_RUNS=str(runs))
    proc = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    rows = []
    for line in proc.stdout.splitlines():
        parts = line.split("\t")
        if len(parts) == 5 and parts[0] == "png":
            rows.append((parts[1], parts[2], int(parts[3]), float(parts[4])))
    if not rows:
        sys.exit(f"no results from {' '.join(cmd)}:\n{proc.stdout}\n{proc.stderr}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=9, help="timed runs per setting (median reported)")
    ap.add_argument("--extra", type=Path, nargs="*", default=[], help="more images (counted as photos)")
    ap.add_argument("--manifest-path", type=Path, default=ROOT / "Cargo.toml")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sketches = sorted((ROOT / "examples" / "sketches").glob("*.png"))
        photos = generated_images(tmp)
        for i, p in enumerate(args.extra):  # normalise to RGB PNG so both sides see the same pixels
            q = tmp / f"extra{i}-{p.stem}.png"
            Image.open(p).convert("RGB").save(q, compress_level=1)
            photos.append(q)
        files = sketches + photos
        group = {p.name: ("sketches" if p in sketches else "photo-like") for p in files}

        results = defaultdict(dict)  # image -> setting -> (bytes, ms)
        for p in files:
            im = Image.open(p).convert("RGB")
            im.load()
            for label, kw in PIL_SETTINGS.items():
                results[p.name][label] = time_pil(im, kw, args.runs)
        for name, label, size, ms in run_rust(files, args.runs, args.manifest_path):
            results[name][f"sketchx {label}"] = (size, ms)

    settings = list(next(iter(results.values())).keys())
    print(f"runs per setting: {args.runs} (median); sizes are totals over the group, times are sums of medians\n")
    for g in ("photo-like", "sketches"):
        names = [n for n in results if group[n] == g]
        print(f"### {g}: {', '.join(names)}\n")
        base = sum(results[n]["PIL compress_level=1"][0] for n in names)
        print("| encoder / setting | size (KiB) | vs PIL level 1 | encode time (ms) |")
        print("|---|---:|---:|---:|")
        for s in settings:
            size = sum(results[n][s][0] for n in names)
            ms = sum(results[n][s][1] for n in names)
            print(f"| {s} | {size / 1024:.0f} | {size / base * 100:.0f}% | {ms:.1f} |")
        print()
    print("### per image (bytes, ms)\n")
    for n, rows in results.items():
        print(n + ": " + "; ".join(f"{s} {b} B {ms:.2f} ms" for s, (b, ms) in rows.items()))


if __name__ == "__main__":
    main()
