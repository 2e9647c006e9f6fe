"""The few-step options: LoRAs and the tiny VAE on the pipeline, ``scheduler="lcm"``/``"tcd"``, ``eta``,
``timestep_spacing`` and ``vae`` on a request; the names and ranges are the core's."""

from __future__ import annotations

from pathlib import Path

import pytest

import sketchx

from conftest import FIXTURES, HOUSE, make_pipeline, small

LORA = FIXTURES / "lora" / "kohya.safetensors"
TAESD = FIXTURES / "tiny-taesd"


def _image(pipe: sketchx.Pipeline, **params: object) -> bytes:
    st = pipe.wait(pipe.submit(str(HOUSE), **small(scheduler="lcm", **params)), timeout=120)
    assert st.status == "completed", st.message
    return Path(st.images[0]).read_bytes()


def test_the_new_defaults_ranges_and_names_are_the_cores() -> None:
    d = sketchx.DEFAULTS
    assert d["loras"] == () and d["preview_vae"] is None
    assert d["timestep_spacing"] is None and d["eta"] == 0.0 and d["vae"] == "full"
    assert sketchx.RANGES["eta"] == (0.0, 1.0)
    assert sketchx.NAMES["vae"] == ("full", "tiny")
    assert "trailing" in sketchx.NAMES["timestep_spacing"]
    assert {"lcm", "tcd"} <= set(sketchx.NAMES["scheduler"])


def test_a_lora_changes_the_image(tmp_path: Path) -> None:
    with make_pipeline(tmp_path / "plain") as pipe:
        plain = _image(pipe)
    with make_pipeline(tmp_path / "lora", loras=[(LORA, 0.6)]) as pipe:
        with_lora = _image(pipe)
    with make_pipeline(tmp_path / "zero", loras=[(str(LORA), 0)]) as pipe:
        zero = _image(pipe)
    assert with_lora != plain
    assert zero == plain


def test_the_tiny_vae_and_request_fields(tmp_path: Path) -> None:
    with make_pipeline(tmp_path / "tiny", preview_vae=TAESD) as pipe:
        full = _image(pipe, timestep_spacing="Trailing", eta=0.3)
        tiny = _image(pipe, timestep_spacing="trailing", vae="TINY")
        assert full != tiny
        tcd = pipe.wait(pipe.submit(str(HOUSE), **small(scheduler="tcd", eta=0.5)), timeout=120)
        assert tcd.status == "completed", tcd.message


@pytest.mark.parametrize(
    "loras, field",
    [
        ([(LORA, 11.0)], "loras.scale"),
        ([(LORA, float("nan"))], "loras.scale"),
        ([(LORA, "x")], "loras.scale"),
        ([(LORA, 1.0, 2.0)], "loras"),
        ([42], "loras"),
        ("a.safetensors", "loras"),
        (7, "loras"),
    ],
)
def test_bad_loras_raise_invalid_request_naming_the_field(tmp_path: Path, loras: object, field: str) -> None:
    with pytest.raises(sketchx.InvalidRequestError) as err:
        make_pipeline(tmp_path, loras=loras)
    assert err.value.field == field
    assert field in str(err.value)


def test_lora_files_that_are_missing_or_do_not_fit_are_model_load_errors(tmp_path: Path) -> None:
    for path in [FIXTURES / "lora" / "missing.safetensors", FIXTURES / "lora" / "bad" / "unknown_key.safetensors"]:
        with pytest.raises(sketchx.ModelLoadError) as err:
            make_pipeline(tmp_path, loras=[(path, 1.0)])
        assert path.name in str(err.value)


@pytest.mark.parametrize(
    "params, field",
    [
        (dict(eta=1.5), "eta"),
        (dict(eta="x"), "eta"),
        (dict(timestep_spacing="sideways"), "timestep_spacing"),
        (dict(timestep_spacing=3), "timestep_spacing"),
        (dict(vae="medium"), "vae"),
        (dict(scheduler="lcm2"), "scheduler"),
    ],
)
def test_bad_request_fields_raise_invalid_request(pipe: sketchx.Pipeline, params: dict, field: str) -> None:
    with pytest.raises(sketchx.InvalidRequestError) as err:
        pipe.submit(str(HOUSE), **small(**params))
    assert err.value.field == field
