"""Shared fixtures: the tiny random-weight models of the Rust test suite, sketches, and a pipeline per module."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

import sketchx

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(os.environ.get("SKETCHX_FIXTURES", REPO / "tests" / "fixtures"))
TINY_SD = FIXTURES / "tiny-sd"
TINY_CONTROLNET = FIXTURES / "tiny-controlnet"
SKETCHES = FIXTURES / "sketches"
HOUSE = SKETCHES / "house_black_on_white.png"


def make_pipeline(out: Path, **kwargs: object) -> sketchx.Pipeline:
    kwargs.setdefault("cleanup_interval_secs", None)
    return sketchx.Pipeline(TINY_SD, TINY_CONTROLNET, output_dir=out, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sketchx.Pipeline]:
    with make_pipeline(tmp_path_factory.mktemp("out")) as p:
        yield p


def small(**overrides: object) -> dict:
    """Fast request parameters: 64x64, 2 steps, fixed seed."""
    params: dict = dict(prompt="a house", width=64, height=64, steps=2, seed=1)
    params.update(overrides)
    return params


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.005) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)


def start_worker(url: str, out: Path, *extra: str) -> "subprocess.Popen[str]":
    """``python -m sketchx.worker`` on the tiny models (default key prefix), returned once it says it is ready;
    its stderr stays a pipe. The caller stops it (SIGTERM) or kills it."""
    worker = subprocess.Popen(
        [sys.executable, "-m", "sketchx.worker", "--redis", url, "--model", str(TINY_SD),
         "--controlnet", str(TINY_CONTROLNET), "--out", str(out), *extra],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert worker.stderr is not None
    for line in worker.stderr:
        if line.startswith("worker ready"):
            return worker
    status = worker.wait()
    pytest.fail(f"the worker ended before it was ready (status {status})")
