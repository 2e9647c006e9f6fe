"""A worker process of a shared Redis job queue: ``python -m sketchx.worker --redis URL --model DIR
--controlnet DIR --out DIR [--drain]``. Loads the models once and runs queued jobs until SIGTERM or Ctrl-C,
then hands its running job back to the queue (another worker finishes it; with ``--drain`` it finishes the job
itself first) and exits 0. Jobs still queued stay for the other workers. The same as the Rust ``worker``
example; clients are ``sketchx.connect(url)``, the Rust ``generate --redis`` or a REST server with ``--redis``."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import List, Optional

from . import DEFAULT_CONTROLNET, DEFAULT_MODEL, DEFAULTS, NAMES, Pipeline, SketchxError


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sketchx.worker", description=__doc__)
    parser.add_argument("--redis", required=True, help="the Redis server: redis://[user:password@]host:port[/db]")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Stable Diffusion 1.5: Hub repo id or directory")
    parser.add_argument("--controlnet", default=DEFAULT_CONTROLNET, help="ControlNet: Hub repo id or directory")
    parser.add_argument("--out", default=DEFAULTS["output_dir"], help="where this worker also writes the images")
    parser.add_argument("--device", default=DEFAULTS["device"], help=", ".join(NAMES["device"]))
    parser.add_argument("--dtype", default=DEFAULTS["dtype"], help=", ".join(NAMES["dtype"]))
    parser.add_argument(
        "--retention-secs", type=float, default=DEFAULTS["retention_secs"], help="how long finished jobs are kept"
    )
    parser.add_argument(
        "--drain",
        action="store_true",
        help="on SIGTERM, finish the running job instead of handing it back to the queue at its next step",
    )
    args = parser.parse_args(argv)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        pipe = Pipeline(
            args.model,
            args.controlnet,
            device=args.device,
            dtype=args.dtype,
            output_dir=args.out,
            retention_secs=args.retention_secs,
            redis_url=args.redis,
            drain_on_shutdown=args.drain,
        )
    except SketchxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("worker ready", file=sys.stderr, flush=True)
    # A timed wait, so that the signal handlers run promptly on every platform.
    while not stop.wait(0.5):
        pass
    print(f"stopping: the running job is {'finished' if args.drain else 'handed back'}", file=sys.stderr, flush=True)
    pipe.close()
    print("worker stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
