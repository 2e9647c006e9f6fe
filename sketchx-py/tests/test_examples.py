"""examples/python/generate.py runs end to end with the Rust example's flags."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import FIXTURES, HOUSE, REPO, SKETCHES, TINY_CONTROLNET, TINY_SD


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "examples/python/generate.py"), *args],
        capture_output=True, text=True, timeout=300,
    )


def test_generate_writes_and_prints_images(tmp_path: Path) -> None:
    r = run("--sketch", str(HOUSE), "--prompt", "a house", "--negative-prompt", "", "--temperature", "0.5",
            "--guidance-scale", "5", "--num-images", "2", "--steps", "2", "--seed", "9", "--width", "64",
            "--height", "64", "--scheduler", "euler", "--preprocess", "scribble", "--model", str(TINY_SD),
            "--controlnet", str(TINY_CONTROLNET), "--out", str(tmp_path), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    paths = r.stdout.split()
    assert paths == [str(tmp_path / "seed9_0.png"), str(tmp_path / "seed9_1.png")]
    for p in paths:
        assert np.asarray(Image.open(p)).shape == (64, 64, 3)
    assert "seed 9" in r.stderr


def test_generate_reports_bad_flags(tmp_path: Path) -> None:
    r = run("--sketch", str(HOUSE), "--steps", "0", "--model", str(TINY_SD), "--controlnet", str(TINY_CONTROLNET),
            "--out", str(tmp_path))
    assert r.returncode == 1
    assert "steps" in r.stderr and "1..=150" in r.stderr


def test_generate_vae_tiling_flag_matches_the_tiled_reference(tmp_path: Path) -> None:
    """--vae-tiling reaches the decoder: the image is diffusers' with vae.enable_tiling() (128x96: 2 x 3 tiles)."""
    c = next(c for c in json.loads((FIXTURES / "reference/e2e_vae_tiling/cases.json").read_text())
             if c["name"] == "tiled_nonsquare")
    r = run("--sketch", str(SKETCHES / c["sketch"]), "--prompt", c["prompt"], "--steps", str(c["steps"]),
            "--seed", str(c["seed"]), "--width", str(c["width"]), "--height", str(c["height"]),
            "--guidance-scale", str(c["guidance_scale"]), "--temperature", str(c["temperature"]),
            "--model", str(TINY_SD), "--controlnet", str(TINY_CONTROLNET), "--out", str(tmp_path), "--vae-tiling")
    assert r.returncode == 0, r.stderr
    got = np.asarray(Image.open(r.stdout.split()[0]).convert("RGB"), dtype=np.float64)
    ref = np.asarray(Image.open(FIXTURES / "reference/e2e_vae_tiling" / c["images"][0]).convert("RGB"),
                     dtype=np.float64)
    diff = np.abs(got - ref)
    assert diff.mean() <= 0.25 and np.percentile(diff, 99.9) <= 4, (diff.mean(), np.percentile(diff, 99.9))


def test_generate_embedding_and_clip_skip_flags_match_diffusers(tmp_path: Path) -> None:
    """--embedding PATH:TOKEN and --clip-skip reach the text encoder: diffusers' image with load_textual_inversion and
    clip_skip=1 (an A1111 .pt, Euler)."""
    formats = FIXTURES / "formats"
    c = next(c for c in json.loads((formats / "reference/cases.json").read_text())
             if c["name"] == "clip_skip_1_ti_euler")
    ti = c["textual_inversion"][0]
    r = run("--sketch", str(SKETCHES / c["sketch"]), "--prompt", c["prompt"], "--negative-prompt",
            c["negative_prompt"], "--steps", str(c["steps"]), "--seed", str(c["seed"]), "--width", str(c["width"]),
            "--height", str(c["height"]), "--guidance-scale", str(c["guidance_scale"]), "--temperature",
            str(c["temperature"]), "--scheduler", c["scheduler"], "--clip-skip", str(c["clip_skip"]),
            "--embedding", f"{FIXTURES / ti['file']}:{ti['token']}", "--model", str(TINY_SD), "--controlnet",
            str(TINY_CONTROLNET), "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    got = np.asarray(Image.open(r.stdout.split()[0]).convert("RGB"), dtype=np.float64)
    ref = np.asarray(Image.open(formats / "reference" / c["images"][0]).convert("RGB"), dtype=np.float64)
    diff = np.abs(got - ref)
    assert diff.mean() <= 0.25 and np.percentile(diff, 99.9) <= 4, (diff.mean(), np.percentile(diff, 99.9))
