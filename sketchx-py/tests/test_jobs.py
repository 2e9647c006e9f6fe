"""Statuses, progress, wait, cancel, cleanup and every exception type."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest

import sketchx

from conftest import HOUSE, TINY_CONTROLNET, TINY_SD, make_pipeline, small, wait_until


def test_a_job_completes_with_the_original_json(pipe: sketchx.Pipeline) -> None:
    job_id = pipe.submit(str(HOUSE), **small(num_images=2, steps=3, seed=5))
    assert isinstance(job_id, str) and len(job_id) == 32
    st = pipe.wait(job_id, timeout=60)
    assert st.status == "completed", st.message
    assert st.done
    assert st.job_id == job_id
    assert st.progress == 100.0
    assert st.message == "Task completed successfully."
    assert (st.step, st.total_steps, st.seed, st.num_images, st.width, st.height) == (3, 3, 5, 2, 64, 64)
    assert len(st.images) == 2
    for p in st.images:
        assert os.path.isfile(p) and p.startswith(pipe.output_dir)
    d = st.to_dict()
    assert list(d)[:5] == ["job_id", "status", "progress", "images", "message"]
    assert d["job_id"] == job_id and d["status"] == "completed" and d["progress"] == 100.0
    assert d["images"] == st.images and d["message"] == st.message and d["seed"] == 5
    assert st.created_at is not None and st.started_at is not None and st.finished_at is not None
    assert st.created_at <= st.started_at <= st.finished_at
    assert st.to_json().startswith('{"job_id":')
    # Polling a final job gives the same status.
    again = pipe.poll(job_id)
    assert again.to_dict() == d


def test_random_seed_is_reported(pipe: sketchx.Pipeline) -> None:
    st = pipe.wait(pipe.submit(str(HOUSE), **small(seed=None, steps=1)), timeout=60)
    assert st.status == "completed"
    assert 0 <= st.seed < 2**53


def test_status_and_progress_while_running(tmp_path: Path) -> None:
    with make_pipeline(tmp_path) as p:
        first = p.submit(str(HOUSE), **small(steps=15, width=128, height=128))
        second = p.submit(str(HOUSE), **small(steps=2))
        # The second waits behind the first.
        st2 = p.poll(second)
        assert st2.status == "queued" and st2.progress == 0.0 and st2.images == []
        assert st2.message == "Task is waiting in the queue."
        seen = []
        while True:
            st = p.poll(first)
            seen.append((st.status, st.progress, st.step))
            if st.done:
                break
            time.sleep(0.002)
        running = [s for s in seen if s[0] == "running"]
        assert running, seen
        assert any(0.0 < prog < 100.0 for _, prog, _ in running), running
        progress = [prog for _, prog, _ in seen]
        assert progress == sorted(progress), "progress went backwards"
        steps = [step for _, _, step in seen]
        assert steps == sorted(steps)
        assert seen[-1][0] == "completed" and seen[-1][1] == 100.0
        assert {s[0] for s in seen} <= {"queued", "running", "completed"}
        assert p.wait(second, timeout=60).status == "completed"


def test_wait_timeout_raises_timeout_error_and_the_job_goes_on(tmp_path: Path) -> None:
    with make_pipeline(tmp_path) as p:
        job = p.submit(str(HOUSE), **small(steps=10, width=128, height=128))
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            p.wait(job, timeout=0.1)
        assert time.monotonic() - t0 < 2.0
        assert p.poll(job).status in ("queued", "running")
        assert p.wait(job, timeout=120).status == "completed"
        with pytest.raises(sketchx.InvalidRequestError, match="timeout"):
            p.wait(job, timeout=-1)


def test_cancel_running_and_queued_jobs(tmp_path: Path) -> None:
    with make_pipeline(tmp_path) as p:
        running = p.submit(str(HOUSE), **small(steps=150, width=128, height=128))
        queued = p.submit(str(HOUSE), **small())
        wait_until(lambda: p.poll(running).status == "running")
        assert p.cancel(queued) is True
        st = p.poll(queued)
        assert st.status == "cancelled" and st.message == "Task was cancelled."
        assert p.cancel(running) is True
        st = p.wait(running, timeout=60)
        assert st.status == "cancelled" and st.images == []
        assert p.cancel(running) is False  # already final
        assert os.listdir(tmp_path) == []
        done = p.submit(str(HOUSE), **small())
        assert p.wait(done, timeout=60).status == "completed"
        assert p.cancel(done) is False


def test_cleanup_removes_old_files_and_forgets_jobs(tmp_path: Path) -> None:
    with make_pipeline(tmp_path, retention_secs=3600.0) as p:
        st = p.wait(p.submit(str(HOUSE), **small(num_images=2)), timeout=60)
        assert st.status == "completed"
        unrelated = tmp_path / "keep-me.txt"
        unrelated.write_text("not sketchx output")
        assert p.cleanup() == 0  # younger than the retention
        assert all(os.path.exists(i) for i in st.images)
        assert p.cleanup(max_age_secs=0) == 2
        assert not any(os.path.exists(i) for i in st.images)
        assert unrelated.exists()
        with pytest.raises(sketchx.UnknownJobError):
            p.poll(st.job_id)
        assert p.cleanup(0) == 0
        with pytest.raises(sketchx.InvalidRequestError, match="max_age_secs"):
            p.cleanup(-5)


def test_background_sweeper(tmp_path: Path) -> None:
    with make_pipeline(tmp_path, retention_secs=0.0, cleanup_interval_secs=0.05) as p:
        st = p.wait(p.submit(str(HOUSE), **small()), timeout=60)
        assert st.status == "completed"
        wait_until(lambda: not os.path.exists(st.images[0]), timeout=10)


@pytest.mark.parametrize(
    "params, field, needle",
    [
        (dict(steps=0), "steps", "1..=150"),
        (dict(steps=151), "steps", "1..=150"),
        (dict(steps=-1), "steps", "1..=150"),
        (dict(steps=10**30), "steps", "1..=150"),
        (dict(steps="ten"), "steps", "integer"),
        (dict(steps=2.5), "steps", "integer"),
        (dict(num_images=0), "num_images", "1..=8"),
        (dict(num_images=9), "num_images", "1..=8"),
        (dict(temperature=1.5), "temperature", "0..=1"),
        (dict(temperature=-0.1), "temperature", "0..=1"),
        (dict(temperature="hot"), "temperature", "number"),
        (dict(guidance_scale=31), "guidance_scale", "0..=30"),
        (dict(guidance_scale=math.nan), "guidance_scale", "finite"),
        (dict(guidance_scale=math.inf), "guidance_scale", "finite"),
        (dict(width=65), "width", "multiple of 8"),
        (dict(width=32), "width", "64..=2048"),
        (dict(height=4096), "height", "64..=2048"),
        (dict(seed=-1), "seed", "0..="),
        (dict(seed=2**64), "seed", "0..="),
        (dict(seed="abc"), "seed", "integer"),
        (dict(prompt=42), "prompt", "str"),
        (dict(prompt="x" * 20000), "prompt", "16384"),
        (dict(prompt="nul\0byte"), "prompt", "NUL"),
        (dict(negative_prompt=b"bytes"), "negative_prompt", "str"),
        (dict(scheduler="plms"), "scheduler", "euler_a"),
        (dict(preprocess="hed"), "preprocess", "scribble"),
        (dict(strength=1.5), "strength", "0..=1"),
        (dict(strength=float("nan")), "strength", "finite"),
        (dict(start_image="sketch", strength=0.01), "strength", "int(steps * strength)"),
        (dict(start_image=b"not an image"), "start_image", "format"),
        (dict(canny_low_threshold=300), "canny_low_threshold", "canny_high_threshold"),
        (dict(canny_high_threshold=5000), "canny_high_threshold", "0..=2040"),
        (dict(canny_low_threshold=-1), "canny_low_threshold", "0..="),
        (dict(controlnet_scale=6.0), "controlnet_scale", "0..=5"),
        (dict(control_guidance_start=0.9, control_guidance_end=0.5), "control_guidance_start", "below"),
    ],
)
def test_bad_parameters_raise_invalid_request_naming_the_field(
    pipe: sketchx.Pipeline, params: dict, field: str, needle: str
) -> None:
    queued = pipe.queued()
    with pytest.raises(sketchx.InvalidRequestError) as err:
        pipe.submit(str(HOUSE), **small(**params))
    assert err.value.field == field
    assert field in str(err.value) and needle in str(err.value), str(err.value)
    with pytest.raises(ValueError):
        pipe.submit(str(HOUSE), **small(**params))
    assert pipe.queued() == queued


def test_unknown_jobs(pipe: sketchx.Pipeline) -> None:
    for job_id in ["0" * 32, "../../etc/passwd", "", "ABCDEF" * 6]:
        for call in (pipe.poll, pipe.wait, pipe.cancel):
            with pytest.raises(sketchx.UnknownJobError) as err:
                call(job_id)
            assert isinstance(err.value, KeyError) and isinstance(err.value, sketchx.SketchxError)
    try:
        pipe.poll("f" * 32)
    except KeyError as e:
        assert "unknown job" in str(e)


def test_model_load_errors(tmp_path: Path) -> None:
    with pytest.raises(sketchx.ModelLoadError, match="no/such/dir|not found|no-such"):
        sketchx.Pipeline(str(tmp_path / "no-such-model"), str(TINY_CONTROLNET), output_dir=tmp_path / "o")
    empty = tmp_path / "empty-model"
    empty.mkdir()
    with pytest.raises(sketchx.ModelLoadError, match="not found"):
        sketchx.Pipeline(str(empty), str(TINY_CONTROLNET), output_dir=tmp_path / "o")
    broken = tmp_path / "broken-controlnet"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    with pytest.raises(sketchx.ModelLoadError, match="config.json"):
        sketchx.Pipeline(str(TINY_SD), str(broken), output_dir=tmp_path / "o")
    with pytest.raises(sketchx.ModelLoadError, match="cuda"):
        sketchx.Pipeline(str(TINY_SD), str(TINY_CONTROLNET), device="cuda", output_dir=tmp_path / "o")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(device="tpu"), "device"),
        (dict(dtype="f64"), "dtype"),
        (dict(queue_capacity=0), "queue_capacity"),
        (dict(queue_capacity=-3), "queue_capacity"),
        (dict(retention_secs=-1.0), "retention_secs"),
        (dict(retention_secs=math.nan), "retention_secs"),
        (dict(cleanup_interval_secs=0.0), "cleanup_interval_secs"),
        (dict(vae_tiling="yes"), "vae_tiling"),
        (dict(vae_tiling=1), "vae_tiling"),
        (dict(drain_on_shutdown="yes"), "drain_on_shutdown"),
    ],
)
def test_bad_pipeline_arguments(tmp_path: Path, kwargs: dict, field: str) -> None:
    with pytest.raises(sketchx.InvalidRequestError) as err:
        sketchx.Pipeline(str(TINY_SD), str(TINY_CONTROLNET), output_dir=tmp_path, **kwargs)
    assert err.value.field == field and field in str(err.value)


def test_drain_on_shutdown_finishes_the_pending_jobs(tmp_path: Path) -> None:
    p = make_pipeline(tmp_path, drain_on_shutdown=True)
    ids = [p.submit(str(HOUSE), **small()) for _ in range(2)]
    p.close()
    assert [p.poll(i).status for i in ids] == ["completed", "completed"]
    with make_pipeline(tmp_path) as q:  # the default cancels them
        ids = [q.submit(str(HOUSE), **small(steps=150)) for _ in range(2)]
    assert [q.poll(i).status for i in ids] == ["cancelled", "cancelled"]


def test_queue_full(tmp_path: Path) -> None:
    with make_pipeline(tmp_path, queue_capacity=1) as p:
        ids = []
        with pytest.raises(sketchx.QueueFullError, match="full"):
            for _ in range(5):
                ids.append(p.submit(str(HOUSE), **small(steps=150, width=128, height=128)))
        assert 1 <= len(ids) <= 2
        for i in ids:
            p.cancel(i)


def test_closed_pipeline(tmp_path: Path) -> None:
    p = make_pipeline(tmp_path)
    running = p.submit(str(HOUSE), **small(steps=150, width=128, height=128))
    queued = p.submit(str(HOUSE), **small())
    p.close()
    p.close()  # idempotent
    assert p.poll(queued).status == "cancelled"
    assert p.poll(running).status == "cancelled"
    with pytest.raises(sketchx.SketchxError, match="shut down") as err:
        p.submit(str(HOUSE), **small())
    assert type(err.value) is sketchx.SketchxError
