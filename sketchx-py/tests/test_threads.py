"""The GIL is released while waiting and generating, wait stays interruptible, asyncio is never blocked, and many
threads can share one pipeline."""

from __future__ import annotations

import _thread
import asyncio
import signal
import threading
import time
from pathlib import Path

import pytest

import sketchx

from conftest import HOUSE, make_pipeline, small, wait_until

SLOW = dict(steps=150, width=128, height=128)


def test_other_threads_run_while_one_waits(tmp_path: Path) -> None:
    with make_pipeline(tmp_path) as p:
        job = p.submit(str(HOUSE), **small(steps=10, width=128, height=128))
        count = 0
        stop = threading.Event()

        def spin() -> None:
            nonlocal count
            while not stop.is_set():
                count += 1

        t = threading.Thread(target=spin)
        t.start()
        time.sleep(0.05)
        before = count
        st = p.wait(job, timeout=120)
        during = count - before
        stop.set()
        t.join()
        assert st.status == "completed"
        assert during > 10_000, f"the spinning thread only ran {during} iterations while the main thread waited"


def test_submit_poll_and_generation_do_not_hold_the_gil(tmp_path: Path) -> None:
    with make_pipeline(tmp_path) as p:
        job = p.submit(str(HOUSE), **small(**SLOW))
        wait_until(lambda: p.poll(job).status == "running")
        # Pure-Python work proceeds at full speed while the worker generates.
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < 0.3:
            n += 1
        assert p.poll(job).status == "running"
        assert n > 10_000
        p.cancel(job)


def test_wait_is_interruptible_by_ctrl_c(tmp_path: Path) -> None:
    # interrupt_main() does nothing while SIGINT is ignored, as it is for a suite started in the background
    # (`scripts/test &`, nohup): Python's own handler for the test's duration.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _wait_is_interruptible_by_ctrl_c(tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)


def _wait_is_interruptible_by_ctrl_c(tmp_path: Path) -> None:
    with make_pipeline(tmp_path) as p:
        job = p.submit(str(HOUSE), **small(**SLOW))
        timer = threading.Timer(0.3, _thread.interrupt_main)
        t0 = time.monotonic()
        timer.start()
        try:
            st = p.wait(job)
        except KeyboardInterrupt:
            pass
        else:
            # Says how the job had ended.
            pytest.fail(f"wait returned instead of raising: {st.status} after {time.monotonic() - t0:.2f}s: {st.message}")
        elapsed = time.monotonic() - t0
        timer.join()
        assert elapsed < 1.5, f"KeyboardInterrupt took {elapsed:.2f}s"
        assert p.poll(job).status == "running"  # the job itself goes on
        assert p.cancel(job)


def test_many_jobs_from_several_threads(tmp_path: Path) -> None:
    with make_pipeline(tmp_path, queue_capacity=64) as p:
        results: dict = {}
        errors: list = []

        def client(k: int) -> None:
            try:
                ids = [p.submit(str(HOUSE), **small(steps=1, seed=k * 10 + j)) for j in range(4)]
                for i in ids:
                    results[i] = p.wait(i, timeout=120)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert len(results) == 20
        assert all(st.status == "completed" and len(st.images) == 1 for st in results.values())
        assert len({st.images[0] for st in results.values()}) == 20
        assert sorted(st.seed for st in results.values()) == sorted(k * 10 + j for k in range(5) for j in range(4))


def test_wait_async_does_not_block_the_event_loop(tmp_path: Path) -> None:
    with make_pipeline(tmp_path) as p:

        async def main() -> tuple:
            job = p.submit(str(HOUSE), **small(steps=10, width=128, height=128))
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.005)
                    ticks += 1

            t = asyncio.create_task(ticker())
            t0 = time.monotonic()
            st = await p.wait_async(job)
            elapsed = time.monotonic() - t0
            t.cancel()
            # Two jobs at once on the same loop.
            a = p.submit(str(HOUSE), **small(seed=1))
            b = p.submit(str(HOUSE), **small(seed=2))
            both = await asyncio.gather(p.wait_async(a), p.wait_async(b, timeout=60))
            return st, ticks, elapsed, both

        st, ticks, elapsed, both = asyncio.run(main())
        assert st.status == "completed"
        assert [s.status for s in both] == ["completed", "completed"]
        # The loop kept ticking while the job ran (at least a third of the ideal rate).
        assert ticks >= elapsed / 0.005 / 3, (ticks, elapsed)


def test_wait_async_timeout_and_cancel(tmp_path: Path) -> None:
    with make_pipeline(tmp_path) as p:

        async def main() -> float:
            job = p.submit(str(HOUSE), **small(**SLOW))
            with pytest.raises(TimeoutError):
                await p.wait_async(job, timeout=0.1)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(p.wait_async(job), 0.1)
            task = asyncio.create_task(p.wait_async(job))
            await asyncio.sleep(0.05)
            t0 = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            with pytest.raises(sketchx.UnknownJobError):
                await p.wait_async("0" * 32)
            p.cancel(job)
            assert (await p.wait_async(job)).status == "cancelled"
            return time.monotonic() - t0

        assert asyncio.run(main()) < 1.0
