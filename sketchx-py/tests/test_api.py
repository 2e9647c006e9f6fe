"""The module's surface: version, names, signatures and defaults (equal to the Rust core's), exception classes."""

from __future__ import annotations

import inspect
import re

import pytest

import sketchx
from sketchx import _sketchx

from conftest import REPO


def test_version_is_the_crate_version() -> None:
    cargo = (REPO / "Cargo.toml").read_text()
    version = re.search(r'\[workspace\.package\][^\[]*?version = "([^"]+)"', cargo, re.S)
    assert version is not None
    assert sketchx.__version__ == version.group(1)


def test_public_names() -> None:
    for name in [
        "Pipeline",
        "JobStatus",
        "SketchxError",
        "InvalidRequestError",
        "UnknownJobError",
        "ModelLoadError",
        "QueueFullError",
        "__version__",
    ]:
        assert hasattr(sketchx, name), name
        assert name in sketchx.__all__


def test_signature_defaults_are_the_cores() -> None:
    core = _sketchx.defaults()
    submit = inspect.signature(sketchx.Pipeline.submit).parameters
    for name, param in submit.items():
        if name in ("self", "sketch"):
            continue
        assert name in core, name
        assert param.default == core[name], (name, param.default, core[name])
    # The positional/keyword-only split.
    assert [p for p in submit if submit[p].kind == inspect.Parameter.POSITIONAL_OR_KEYWORD] == [
        "self",
        "sketch",
        "prompt",
    ]
    init = inspect.signature(sketchx.Pipeline.__init__).parameters
    for name, param in init.items():
        if name == "self":
            continue
        assert param.default == core[name], (name, param.default, core[name])
    assert [p for p in init if init[p].kind == inspect.Parameter.POSITIONAL_OR_KEYWORD] == [
        "self",
        "model",
        "controlnet",
    ]
    assert sketchx.DEFAULT_MODEL == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert sketchx.DEFAULT_CONTROLNET == "lllyasviel/sd-controlnet-scribble"


def test_exception_hierarchy() -> None:
    assert issubclass(sketchx.SketchxError, Exception)
    assert issubclass(sketchx.InvalidRequestError, sketchx.SketchxError)
    assert issubclass(sketchx.InvalidRequestError, ValueError)
    assert issubclass(sketchx.UnknownJobError, sketchx.SketchxError)
    assert issubclass(sketchx.UnknownJobError, KeyError)
    assert issubclass(sketchx.ModelLoadError, sketchx.SketchxError)
    assert issubclass(sketchx.QueueFullError, sketchx.SketchxError)
    with pytest.raises(ValueError):
        raise sketchx.InvalidRequestError("invalid steps: x", "steps")
    assert str(sketchx.UnknownJobError("unknown job id \"x\"")) == 'unknown job id "x"'


def test_job_status_cannot_be_built_or_changed(pipe: sketchx.Pipeline) -> None:
    with pytest.raises(TypeError):
        sketchx.JobStatus()  # type: ignore[call-arg]
    st = pipe.wait(pipe.submit(str(REPO / "tests/fixtures/sketches/house_black_on_white.png"), "a house",
                               width=64, height=64, steps=1, seed=3))
    with pytest.raises(AttributeError):
        st.status = "failed"  # type: ignore[misc]
    assert "JobStatus(job_id=" in repr(st)
