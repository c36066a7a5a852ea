"""What logging impressions costs in throughput: the same service with impressions on (the default) and off
(RECSYS_IMPRESSIONS=false), both started before measuring and saturated in turns (on, off, off, on, ...), so
that the drift of a shared machine falls on both alike; the bare FastAPI + hnswlib endpoint is measured in
the same turns as the reference. Per backend: one process on the file state, and two workers on one Redis
(AOF, ``appendfsync always``, as compose runs it).

    python -m bench.impression_cost --bundle artifacts --user 196 --rounds 4 --seconds 8
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from bench.report import BENCHMARKS, add_docs_option, machine, update_section
from bench.serving import WRK_USERS, _redis, free_port, server, wrk
from recsys.bundle import read_bundle


def turns(urls: dict[str, str], script: Path, rounds: int, seconds: int) -> dict[str, list[float]]:
    """Saturation of each server, in ABBA order per round (the order flips every round)."""
    names = list(urls)
    for name in names:  # warm caches and connection paths
        wrk(urls[name], script, 2)
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            out[name].append(wrk(urls[name], script, seconds))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--user", default=None, help="unused; the users are the bundle's (kept for symmetry with bench.serving)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=int, default=8)
    p.add_argument("--no-write", action="store_true")
    add_docs_option(p)
    args = p.parse_args()
    users = read_bundle(args.bundle).catalog["user_ids"]
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        tmp = Path(tmp)
        script = tmp / "users.lua"
        script.write_text(WRK_USERS % ", ".join(f'"{u}"' for u in users))
        base = {**os.environ, "RECSYS_BUNDLE_DIR": str(args.bundle.resolve()), "RECSYS_LOG_LEVEL": "WARNING"}
        base.pop("RECSYS_ADMIN_TOKEN", None)
        redis_port = free_port()
        stack.enter_context(_redis(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(tmp),
                                    "--save", "", "--appendonly", "yes", "--appendfsync", "always"], tmp / "redis.log"))
        backends = {"file state, 1 process": ({"RECSYS_STATE_BACKEND": "file"}, []),
                    "Redis state, 2 workers": ({"RECSYS_STATE_BACKEND": "redis"}, ["--workers", "2"])}
        for n, (backend, (settings, extra)) in enumerate(backends.items()):
            with ExitStack() as servers:
                urls = {}
                bare_url = f"http://127.0.0.1:{free_port()}"
                servers.enter_context(server([sys.executable, "-m", "uvicorn", "bench.bare_app:app", "--host", "127.0.0.1",
                                              "--port", bare_url.rsplit(":", 1)[1], "--log-level", "warning"], base,
                                             bare_url, tmp / "bare.log"))
                for state in ("on", "off"):
                    url = f"http://127.0.0.1:{free_port()}"
                    env = {**base, **settings, "RECSYS_IMPRESSIONS": str(state == "on").lower(),
                           "RECSYS_STATE_DIR": str(tmp / f"state-{n}-{state}"),
                           "RECSYS_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "RECSYS_REDIS_PREFIX": f"cost-{n}-{state}"}
                    cmd = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], *extra]
                    servers.enter_context(server(cmd, env, url, tmp / f"service-{n}-{state}.log"))
                    urls[f"impressions {state}"] = url
                urls["bare"] = bare_url
                results[backend] = turns(urls, script, args.rounds, args.seconds)
                print(backend, {k: [round(x) for x in v] for k, v in results[backend].items()}, flush=True)
    write(results, args)


def write(results: dict[str, dict[str, list[float]]], args) -> None:
    lines = [f"Machine: {machine()}; wrk -t1 -c16 on the same 2 cores. Bundle `{args.bundle}`. {args.rounds} rounds of "
             f"{args.seconds} s per server, in turns (ABBA), all servers started before the first turn.", "",
             "| backend | impressions on (req/s, median) | off (req/s, median) | cost: 1 - on/off per round, median [min, max] "
             "| bare endpoint (req/s, median) |", "|---|---|---|---|---|"]
    for backend, r in results.items():
        on, off = np.array(r["impressions on"]), np.array(r["impressions off"])
        cost = 1 - on / off  # paired by round: the two turns of one round are back to back
        lines.append(f"| {backend} | {np.median(on):,.0f} | {np.median(off):,.0f} | {np.median(cost):+.1%} "
                     f"[{cost.min():+.1%}, {cost.max():+.1%}] | {np.median(r['bare']):,.0f} |")
    lines += ["", "A negative cost is noise: logging can only add work. The target (issue 26) is under 10%."]
    body = "## The serving cost of impressions: on vs off, in turns\n\n" + "\n".join(lines)
    print(body)
    if not args.no_write:
        update_section("impression-cost", body, args.docs / BENCHMARKS.name)


if __name__ == "__main__":
    main()
