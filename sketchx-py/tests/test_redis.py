"""The Redis job queue from Python: ``python -m sketchx.worker`` as the worker process, ``sketchx.connect`` as
the client. Needs ``SKETCHX_TEST_REDIS_URL`` (``scripts/test`` starts a redis-server and sets it); without it
these tests are skipped, saying so."""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import pytest

import sketchx
from conftest import HOUSE, small, start_worker, wait_until

URL = os.environ.get("SKETCHX_TEST_REDIS_URL")
pytestmark = pytest.mark.skipif(not URL, reason="SKETCHX_TEST_REDIS_URL is not set (scripts/test sets it)")


def test_unknown_ids_and_bad_input_from_a_client() -> None:
    assert URL is not None
    client = sketchx.connect(URL, prefix=f"py-{uuid.uuid4().hex[:8]}", queue_capacity=1)
    with pytest.raises(sketchx.UnknownJobError):
        client.poll("0" * 32)
    with pytest.raises(sketchx.UnknownJobError):
        client.cancel("not-an-id")
    with pytest.raises(sketchx.InvalidRequestError) as e:
        client.submit(HOUSE, **small(steps=0))
    assert e.value.field == "steps"
    client.submit(HOUSE, **small())
    with pytest.raises(sketchx.QueueFullError):
        client.submit(HOUSE, **small())
    client.close()


def test_a_worker_process_serves_a_client_and_stops_with_status_0_on_sigterm(tmp_path: Path) -> None:
    assert URL is not None
    # The worker uses the default prefix; this client's jobs are the only ones it is given here.
    worker = start_worker(URL, tmp_path)
    try:
        client = sketchx.connect(URL)
        job = client.submit(HOUSE, **small(num_images=2))
        st = client.wait(job, timeout=120)
        assert st.status == "completed", st.message
        pngs = client.images(job)
        assert len(pngs) == 2 and all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
        assert [Path(p).read_bytes() for p in st.images] == pngs
        assert all(Path(p).parent == tmp_path for p in st.images)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


@pytest.mark.parametrize("drain", [True, False])
def test_sigterm_finishes_the_running_job_with_drain_and_hands_it_back_without(tmp_path: Path, drain: bool) -> None:
    """``--drain``: the running job is finished before the worker exits; without it the job goes back to the
    queue (no other worker here, so it stays queued)."""
    assert URL is not None
    worker = start_worker(URL, tmp_path, *(["--drain"] if drain else []))
    client = sketchx.connect(URL)
    job = None
    try:
        job = client.submit(HOUSE, **small(steps=150))
        wait_until(lambda: client.poll(job).step >= 1, timeout=120)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=120) == 0
        assert worker.stderr is not None
        assert ("finished" if drain else "handed back") in worker.stderr.read()
        st = client.poll(job)
        if drain:
            assert st.status == "completed" and st.step == 150, st.message
            assert len(client.images(job)) == 1
        else:
            assert st.status == "queued" and st.step == 0, st.message
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        if job is not None:
            client.cancel(job)  # a handed-back job must not wait for the next test's worker
        client.close()
