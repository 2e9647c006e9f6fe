"""Shared fixtures: the tiny random-weight models of the Rust test suite, sketches, and a pipeline per module."""

from __future__ import annotations

import os
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
