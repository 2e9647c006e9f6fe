"""Every sketch input type gives the same job as the file it came from; bad sketches are InvalidRequestError."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from PIL import Image

import sketchx

from conftest import HOUSE, SKETCHES, small


def pixels(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def reference(pipe: sketchx.Pipeline) -> np.ndarray:
    st = pipe.wait(pipe.submit(str(HOUSE), **small()), timeout=60)
    assert st.status == "completed", st.message
    return pixels(st.images[0])


def as_inputs() -> dict:
    data = HOUSE.read_bytes()
    with Image.open(HOUSE) as im:
        im.load()
        rgb = im.convert("RGB")
        rgba = im.convert("RGBA")
        gray = im.convert("L")
        pal = im.convert("P")
    return {
        "str": str(HOUSE),
        "pathlib": pathlib.Path(HOUSE),
        "bytes": data,
        "bytearray": bytearray(data),
        "memoryview": memoryview(data),
        "pil_rgb": rgb,
        "pil_rgba": rgba,
        "pil_gray": gray,
        "pil_palette": pal,
        "numpy_rgb": np.asarray(rgb),
        "numpy_rgba": np.asarray(rgba),
        "numpy_rgb_noncontiguous": np.asarray(rgb)[:, ::-1][:, ::-1],
    }


@pytest.mark.parametrize("kind", list(as_inputs()))
def test_every_input_type_gives_the_same_image(pipe: sketchx.Pipeline, reference: np.ndarray, kind: str) -> None:
    sketch = as_inputs()[kind]
    st = pipe.wait(pipe.submit(sketch, **small()), timeout=60)
    assert st.status == "completed", st.message
    assert np.array_equal(pixels(st.images[0]), reference), kind


def test_transparent_pil_and_numpy_match_the_file(pipe: sketchx.Pipeline) -> None:
    path = SKETCHES / "house_transparent.png"
    with Image.open(path) as im:
        rgba = im.convert("RGBA")
    results = []
    for sketch in (str(path), rgba, np.asarray(rgba)):
        st = pipe.wait(pipe.submit(sketch, **small()), timeout=60)
        assert st.status == "completed", st.message
        results.append(pixels(st.images[0]))
    assert np.array_equal(results[0], results[1])
    assert np.array_equal(results[0], results[2])


@pytest.mark.parametrize(
    "sketch, needle",
    [
        (b"", "empty"),
        (b"definitely not an image", "format"),
        (HOUSE.read_bytes()[:100], "sketch"),
        ("/nonexistent/sketch.png", "/nonexistent/sketch.png"),
        (np.zeros((64, 64, 3), dtype=np.float32), "uint8"),
        (np.zeros((64, 64), dtype=np.uint8), "(H, W, 3)"),
        (np.zeros((64, 64, 2), dtype=np.uint8), "(H, W, 3)"),
        (np.zeros((0, 64, 3), dtype=np.uint8), "no pixels"),
        (12345, "got int"),
        (None, "got NoneType"),
    ],
    ids=["empty", "garbage", "truncated", "missing-file", "float-array", "2d-array", "2-channels", "zero-size",
         "int", "none"],
)
def test_bad_sketches_raise_invalid_request(pipe: sketchx.Pipeline, sketch: object, needle: str) -> None:
    queued = pipe.queued()
    with pytest.raises(sketchx.InvalidRequestError) as err:
        pipe.submit(sketch, **small())
    assert err.value.field == "sketch"
    assert "sketch" in str(err.value) and needle in str(err.value), str(err.value)
    assert isinstance(err.value, ValueError)
    assert pipe.queued() == queued
