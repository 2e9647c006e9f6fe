"""Textual inversion embeddings (``Pipeline(embeddings=...)``) and clip skip (``submit(clip_skip=...)``): each
changes the image; bad files, tokens and values raise the core's errors, naming the file, token or field."""

from __future__ import annotations

from pathlib import Path

import pytest

import sketchx

from conftest import FIXTURES, HOUSE, make_pipeline, small

TI = FIXTURES / "formats" / "textual_inversion"
NEG = TI / "tiny-neg.safetensors"
CAT = TI / "learned_embeds.safetensors"
PROMPTS = dict(prompt="a <tiny-cat> house", negative_prompt="tinyneg, lowres")


def _image(pipe: sketchx.Pipeline, **params: object) -> bytes:
    st = pipe.wait(pipe.submit(str(HOUSE), **small(**PROMPTS, **params)), timeout=120)
    assert st.status == "completed", st.message
    return Path(st.images[0]).read_bytes()


def test_the_defaults_and_ranges_are_the_cores() -> None:
    assert sketchx.DEFAULTS["embeddings"] == () and sketchx.DEFAULTS["clip_skip"] == 0
    assert sketchx.RANGES["clip_skip"] == (0, 12)


def test_embeddings_and_clip_skip_change_the_image(tmp_path: Path) -> None:
    with make_pipeline(tmp_path / "plain") as pipe:
        plain = _image(pipe)
    # A pair (the token given), a "PATH[:TOKEN]" string and a bare path (the file's own token).
    for i, embeddings in enumerate([[(NEG, "tinyneg"), (CAT, None)], [f"{NEG}:tinyneg", CAT]]):
        with make_pipeline(tmp_path / f"ti{i}", embeddings=embeddings) as pipe:
            with_ti = _image(pipe)
            skipped = _image(pipe, clip_skip=1)
        assert with_ti != plain
        assert skipped != with_ti
        if i == 0:
            first = with_ti
        else:
            assert with_ti == first


@pytest.mark.parametrize(
    "embeddings, field",
    [
        ([(CAT, 7)], "embeddings.token"),
        ([(CAT, " ")], "embeddings.token"),
        ([(CAT, "a", "b")], "embeddings"),
        ([42], "embeddings"),
        ("learned_embeds.safetensors", "embeddings"),
    ],
)
def test_bad_embedding_arguments_raise_invalid_request(tmp_path: Path, embeddings: object, field: str) -> None:
    with pytest.raises(sketchx.InvalidRequestError) as err:
        make_pipeline(tmp_path, embeddings=embeddings)
    assert err.value.field == field


def test_unusable_embeddings_are_model_load_errors_naming_the_file(tmp_path: Path) -> None:
    for embeddings, needle in [
        ([(TI / "missing.pt", "tok")], "missing.pt"),
        ([(CAT, "cat")], "cat"),  # already in the vocabulary
        ([NEG], "emb_params"),  # an A1111 .safetensors needs a token
        ([(FIXTURES / "formats" / "bad" / "lora.safetensors", "tok")], "lora.safetensors"),
    ]:
        with pytest.raises(sketchx.ModelLoadError) as err:
            make_pipeline(tmp_path, embeddings=embeddings)
        assert needle in str(err.value)


@pytest.mark.parametrize("clip_skip", [13, 3, -1, "1"])
def test_bad_clip_skips_raise_invalid_request(pipe: sketchx.Pipeline, clip_skip: object) -> None:
    # 13: beyond the range; 3: beyond the tiny text encoder's 2 layers.
    with pytest.raises(sketchx.InvalidRequestError) as err:
        pipe.submit(str(HOUSE), **small(clip_skip=clip_skip))
    assert err.value.field == "clip_skip"
