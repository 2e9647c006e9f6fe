"""Single-file models from Python: a checkpoint in the original layout (with a config folder or its .yaml), an
original-format ControlNet and a VAE file load through the pipeline's keyword arguments; files of other families
are refused naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

import sketchx

from conftest import FIXTURES, HOUSE, TINY_CONTROLNET, TINY_SD, small

SINGLE = FIXTURES / "formats" / "single_file"
BAD = FIXTURES / "formats" / "bad"


def _image(pipe: sketchx.Pipeline) -> bytes:
    st = pipe.wait(pipe.submit(str(HOUSE), **small()), timeout=120)
    assert st.status == "completed", st.message
    return Path(st.images[0]).read_bytes()


def test_the_single_file_defaults_are_the_cores() -> None:
    d = sketchx.DEFAULTS
    assert d["model_config"] is None and d["original_config"] is None and d["extract_ema"] is False
    assert d["controlnet_config"] is None and d["vae_model"] is None


def test_single_files_give_the_folders_images(tmp_path: Path) -> None:
    kw: dict = dict(output_dir=tmp_path / "folders", cleanup_interval_secs=None)
    with sketchx.Pipeline(TINY_SD, TINY_CONTROLNET, **kw) as pipe:
        folders = _image(pipe)
    kw["output_dir"] = tmp_path / "files"
    with sketchx.Pipeline(
        SINGLE / "tiny-sd.safetensors", SINGLE / "tiny-controlnet.pth", model_config=TINY_SD, **kw
    ) as pipe:
        files = _image(pipe)
    assert files == folders
    kw["output_dir"] = tmp_path / "yaml"
    with sketchx.Pipeline(
        SINGLE / "tiny-sd.safetensors",
        SINGLE / "tiny-controlnet.safetensors",
        original_config=SINGLE / "tiny-sd.yaml",
        controlnet_config=TINY_CONTROLNET,
        **kw,
    ) as pipe:
        assert _image(pipe) == folders
    kw["output_dir"] = tmp_path / "vae"
    with sketchx.Pipeline(TINY_SD, TINY_CONTROLNET, vae_model=SINGLE / "tiny-vae-alt.safetensors", **kw) as pipe:
        assert _image(pipe) != folders
    kw["output_dir"] = tmp_path / "ema"
    with sketchx.Pipeline(SINGLE / "tiny-sd-ema.ckpt", TINY_CONTROLNET, model_config=TINY_SD, extract_ema=True, **kw) as pipe:
        assert _image(pipe) != folders


@pytest.mark.parametrize(
    "file, key",
    [
        ("sd2.safetensors", "cond_stage_model.model."),
        ("sdxl.safetensors", "conditioner.embedders."),
        ("inpainting_9ch.safetensors", "model.diffusion_model.input_blocks.0.0.weight"),
        ("pickle_os_system.ckpt", "os.system"),
    ],
)
def test_other_families_are_refused_by_file_and_key(tmp_path: Path, file: str, key: str) -> None:
    with pytest.raises(sketchx.ModelLoadError) as e:
        sketchx.Pipeline(BAD / file, TINY_CONTROLNET, model_config=TINY_SD, output_dir=tmp_path, cleanup_interval_secs=None)
    assert file in str(e.value) and key in str(e.value)


def test_bad_single_file_arguments(tmp_path: Path) -> None:
    with pytest.raises(sketchx.InvalidRequestError) as e:
        sketchx.Pipeline(
            SINGLE / "tiny-sd.safetensors", TINY_CONTROLNET, extract_ema="yes", output_dir=tmp_path  # type: ignore[arg-type]
        )
    assert e.value.field == "extract_ema"
    with pytest.raises(sketchx.ModelLoadError):
        sketchx.Pipeline(
            SINGLE / "tiny-sd.safetensors", TINY_CONTROLNET, original_config=tmp_path / "none.yaml", output_dir=tmp_path
        )
