"""``python -m service``: uvicorn as production runs it.

- the head-deadline protocol (``service.protocol.HeadDeadline``: 408 for a request head that trickles in);
- ``--workers N`` processes on one port, each accepting from a socket of its own (``service.workers``: the
  kernel spreads connections over them), with Prometheus metrics summed over them (multiprocess mode,
  in a fresh ``PROMETHEUS_MULTIPROC_DIR``). Several workers share online state only through Redis:
  with the file backend the second worker would be refused its state directory, so this says so first.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="worker processes (needs RECSYS_STATE_BACKEND=redis when > 1)")
    p.add_argument("--timeout-keep-alive", type=int, default=75, help="seconds an idle keep-alive connection is kept "
                   "(longer than the proxy's, so the proxy closes first)")
    args = p.parse_args(argv)
    if args.workers > 1:
        if os.environ.get("RECSYS_STATE_BACKEND", "file") != "redis":
            print("error: --workers > 1 needs RECSYS_STATE_BACKEND=redis: the file backend's state belongs to one process",
                  file=sys.stderr)
            return 2
        metrics_dir = Path(os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="recsys-metrics-")))
        metrics_dir.mkdir(parents=True, exist_ok=True)
        for stale in metrics_dir.glob("*.db"):  # counts from an earlier run must not add up into this one
            stale.unlink()  # (only prometheus_client's files: the directory may be shared, e.g. /tmp)
    options = {"http": "service.protocol:HeadDeadline", "timeout_keep_alive": args.timeout_keep_alive}
    from service import workers  # after the environment is set: the workers inherit it

    if args.workers > 1 and workers.supported():
        try:
            return workers.Workers(args.workers, args.host, args.port, options).run()
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    import uvicorn

    uvicorn.run(workers.APP, host=args.host, port=args.port, workers=args.workers, **options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
