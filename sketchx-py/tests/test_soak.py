"""A short soak through the module (``soak.py`` is the long one ``scripts/soak`` runs) and shutdown while jobs
run and other threads wait on them."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import List

import pytest

import sketchx

from conftest import HOUSE, make_pipeline, small, wait_until
from soak import memory_is_flat, rss_kib, run


def test_soak_100_jobs_from_8_threads_with_cancels(tmp_path: Path) -> None:
    report = run(100, 8, tmp_path / "out")
    print(report.line())
    assert not report.violations, report.violations
    assert report.jobs == 100 and report.completed + report.cancelled == 100
    assert report.cancels > 0 and report.cancelled > 0, report
    assert report.queue_full > 0, report


def test_the_memory_rule_can_fail() -> None:
    assert memory_is_flat(100_000, 110_000)
    assert not memory_is_flat(100_000, 150_000)
    assert rss_kib() > 0


def test_close_while_jobs_run_and_threads_wait(tmp_path: Path) -> None:
    p = make_pipeline(tmp_path, queue_capacity=16)
    running = p.submit(str(HOUSE), **small(steps=150, width=128, height=128))
    queued = [p.submit(str(HOUSE), **small(seed=i)) for i in range(5)]
    wait_until(lambda: p.poll(running).status == "running")
    seen: List[str] = []
    lock = threading.Lock()

    def waiter(job: str) -> None:
        st = p.wait(job, timeout=120)
        with lock:
            seen.append(st.status)

    threads = [threading.Thread(target=waiter, args=(j,)) for j in [running] + queued]
    for t in threads:
        t.start()
    p.close()  # cancels the queued jobs, stops the running one at its next step, joins the worker
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive(), "a waiter was left hanging by close()"
    assert sorted(seen) == ["cancelled"] * 6
    assert os.listdir(tmp_path) == [], "a cancelled job left a file"
    with pytest.raises(sketchx.SketchxError, match="shut down"):
        p.submit(str(HOUSE), **small())
    assert p.poll(running).status == "cancelled"  # statuses stay readable after close
