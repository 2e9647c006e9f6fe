#!/usr/bin/env python3
"""Soak run of the job pipeline through the Python module (the counterpart of examples/soak.rs): many small jobs on
the tiny fixture models from several threads, a queue of 4 (``QueueFullError`` retried), random cancels of queued
and of running jobs. Checks: no job lost, every job exactly one final state that never changes and never goes
backwards (a poller watches), image files exactly for the completed jobs, no temporary file left, no failed job,
memory flat (VmRSS after the 100th finished job, or the first tenth of a shorter run, against the end).

    python sketchx-py/tests/soak.py [JOBS [THREADS]]    # default 1000 jobs, 8 threads

Prints one ``SOAK binding=python ...`` line (``scripts/soak`` tabulates it) and exits with 1, naming each broken
rule, when a check fails. ``test_soak.py`` runs a short one in the suite."""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import sketchx

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(os.environ.get("SKETCHX_FIXTURES", REPO / "tests" / "fixtures"))
RANK = {"queued": 0, "running": 1, "completed": 2, "failed": 2, "cancelled": 2}


def rss_kib() -> int:
    """This process's resident set size in KiB (0 where /proc has none)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory_is_flat(early_kib: int, end_kib: int) -> bool:
    """Growth within 10% plus 8 MiB (allocator slack), the Rust soak's rule."""
    return end_kib <= early_kib + early_kib // 10 + 8 * 1024


@dataclass
class Report:
    jobs: int = 0
    cancels: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    queue_full: int = 0
    wall_s: float = 0.0
    rss_early_kib: int = 0
    rss_end_kib: int = 0
    violations: List[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"SOAK binding=python jobs={self.jobs} cancels={self.cancels} completed={self.completed} "
                f"failed={self.failed} cancelled={self.cancelled} queue_full={self.queue_full} "
                f"wall_s={self.wall_s:.1f} rss100_kib={self.rss_early_kib} rss_end_kib={self.rss_end_kib}")


def run(jobs: int, threads: int, out: Path, seed: int = 15) -> Report:
    shutil.rmtree(out, ignore_errors=True)
    report = Report()
    sketch = (FIXTURES / "sketches" / "house_black_on_white.png").read_bytes()
    lock = threading.Lock()
    finals: List[sketchx.JobStatus] = []
    ids: List[str] = []
    violations: List[str] = []
    counter = iter(range(jobs))
    early_at = max(1, min(100, -(-jobs // 10)))
    done = threading.Event()
    rng = random.Random(seed)
    plan = [rng.randrange(20) for _ in range(jobs)]  # 0: cancel while queued, 1: cancel once running

    with sketchx.Pipeline(FIXTURES / "tiny-sd", FIXTURES / "tiny-controlnet", output_dir=out, queue_capacity=4,
                          cleanup_interval_secs=None) as pipe:

        def client() -> None:
            while True:
                with lock:
                    n = next(counter, None)
                if n is None:
                    return
                while True:
                    try:
                        job = pipe.submit(sketch, f"soak job {n}", steps=1 + n % 2, width=64, height=64, seed=n)
                        break
                    except sketchx.QueueFullError:
                        with lock:
                            report.queue_full += 1
                        time.sleep(0.01)
                with lock:
                    ids.append(job)
                if plan[n] == 0:
                    pipe.cancel(job)
                    with lock:
                        report.cancels += 1
                elif plan[n] == 1:
                    deadline = time.monotonic() + 60
                    while pipe.poll(job).status == "queued" and time.monotonic() < deadline:
                        time.sleep(0.0002)
                    pipe.cancel(job)
                    with lock:
                        report.cancels += 1
                st = pipe.wait(job, timeout=300)
                with lock:
                    finals.append(st)
                    if len(finals) == early_at:
                        report.rss_early_kib = rss_kib()

        def poller() -> None:
            last: Dict[str, str] = {}
            while not done.is_set():
                with lock:
                    current = list(ids)
                for job in current:
                    if RANK.get(last.get(job, ""), -1) == 2:
                        continue
                    st = pipe.poll(job).status
                    prev = last.get(job)
                    if prev is not None and RANK[st] < RANK[prev]:
                        violations.append(f"{job}: poll saw {st} after {prev}")
                    last[job] = st
                time.sleep(0.01)
            for job, prev in last.items():  # a final state stays as it is
                if RANK[prev] == 2 and pipe.poll(job).status != prev:
                    violations.append(f"{job}: final {prev} became {pipe.poll(job).status}")

        started = time.monotonic()
        workers = [threading.Thread(target=client) for _ in range(threads)]
        watcher = threading.Thread(target=poller)
        for t in workers + [watcher]:
            t.start()
        for t in workers:
            t.join()
        done.set()
        watcher.join()
        report.wall_s = time.monotonic() - started
        report.rss_end_kib = rss_kib()

    report.jobs = len(finals)
    report.violations = violations
    if len(finals) != jobs or len(set(ids)) != jobs:
        violations.append(f"{jobs} jobs asked, {len(set(ids))} submitted, {len(finals)} finished")
    expected: List[str] = []
    for st in finals:
        if st.status == "completed":
            report.completed += 1
            for image in st.images:
                if not Path(image).is_file():
                    violations.append(f"{st.job_id}: its image {image} is missing")
                expected.append(Path(image).name)
        elif st.status == "failed":
            report.failed += 1
            violations.append(f"{st.job_id}: failed: {st.message}")
        elif st.status == "cancelled":
            report.cancelled += 1
        else:
            violations.append(f"{st.job_id}: wait returned {st.status}")
    files = sorted(os.listdir(out))
    if files != sorted(expected):
        extra = [f for f in files if f not in expected]
        violations.append(f"{len(files)} files for {len(expected)} images of completed jobs; not expected: {extra}")
    if not memory_is_flat(report.rss_early_kib, report.rss_end_kib):
        violations.append(f"memory grew from {report.rss_early_kib} KiB (job {early_at}) to {report.rss_end_kib} KiB")
    return report


def main() -> int:
    jobs = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    out = Path(tempfile.mkdtemp(prefix="sketchx-soak-python-"))
    try:
        report = run(jobs, threads, out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(report.line(), flush=True)
    for v in report.violations[:50]:
        print(f"VIOLATION: {v}", file=sys.stderr)
    if report.violations:
        print(f"soak: {len(report.violations)} violations", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
