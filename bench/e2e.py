"""End-to-end latency and throughput of ``/recommend`` on loopback.

Starts the service (uvicorn) on a bundle, then drives it with a lean asyncio HTTP/1.1 client
(keep-alive connections, one process) so the load generator costs little of the 2 cores:

- fixed rate: requests are *scheduled* at ``rate`` per second (open loop) and latency is
  measured from the scheduled time, so a stall shows up as latency instead of silently
  lowering the offered load (no coordinated omission);
- saturation: ``connections`` closed-loop clients for ``duration`` seconds.

The stage breakdown is read from the service's own Prometheus metrics (sum / count of
``recsys_stage_seconds`` over the run). The sequential pass over every user, and the metrics, go through
the project's Python client (service/client.py), as an application calls the service. Writes the "e2e"
section of docs/benchmarks.md.

    python bench/e2e.py --bundle artifacts --rates 100 200 --duration 20
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.report import BENCHMARKS, add_docs_option, latency_machine, update_section  # noqa: E402
from service.client import NO_RETRY, ApiError, RecsysClient  # noqa: E402


class Connection:
    """One keep-alive HTTP/1.1 connection; GET only, Content-Length responses (what uvicorn sends)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port

    async def open(self) -> "Connection":
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def get(self, path: str) -> int:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
        await self.reader.readexactly(length)
        return status


def paths(user_ids: list[str], k: int, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"/recommend?user_id={rng.choice(user_ids)}&k={k}" for _ in range(n)]


async def fixed_rate(host, port, rate: float, duration: float, user_ids, k, connections: int) -> dict:
    """Open-loop load at ``rate``: each request is issued at its scheduled time whatever the
    previous ones are doing. Latency runs from the moment the request is due to be sent (after the
    timer wake-up, before waiting for a free connection, so queueing counts); the timer's own
    lateness (asyncio timers have millisecond resolution) is reported separately as ``lag``."""
    n = int(rate * duration)
    todo = paths(user_ids, k, n, seed=int(rate))
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(await Connection(host, port).open())
    latencies, lags, errors = [], [], 0
    start = time.perf_counter() + 0.05

    async def one(i: int, path: str):
        nonlocal errors
        scheduled = start + i / rate
        await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
        due = time.perf_counter()
        lags.append(due - scheduled)
        conn = await pool.get()
        try:
            if await conn.get(path) != 200:
                errors += 1
        finally:
            pool.put_nowait(conn)
        latencies.append(time.perf_counter() - due)

    await asyncio.gather(*(one(i, p) for i, p in enumerate(todo)))
    elapsed = time.perf_counter() - start
    return {**summary(latencies, errors, elapsed), "lag_p99": float(np.percentile(np.array(lags) * 1000, 99))}


async def saturate(host, port, duration: float, user_ids, k, connections: int) -> dict:
    """Closed loop: each connection sends its next request as soon as the last one returns."""
    latencies, errors = [], 0
    stop = time.perf_counter() + duration
    start = time.perf_counter()

    async def client(seed: int):
        nonlocal errors
        conn = await Connection(host, port).open()
        rng = random.Random(seed)
        while time.perf_counter() < stop:
            t = time.perf_counter()
            if await conn.get(f"/recommend?user_id={rng.choice(user_ids)}&k={k}") != 200:
                errors += 1
            latencies.append(time.perf_counter() - t)

    await asyncio.gather(*(client(i) for i in range(connections)))
    return summary(latencies, errors, time.perf_counter() - start)


def summary(latencies: list[float], errors: int, elapsed: float) -> dict:
    lat = np.array(latencies) * 1000
    return {"requests": len(lat), "errors": errors, "throughput": len(lat) / elapsed,
            "p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)), "p99": float(np.percentile(lat, 99))}


def stage_totals(client: RecsysClient) -> dict[str, tuple[float, float]]:
    """``stage -> (seconds sum, count)`` from the service's /metrics."""
    out: dict[str, list[float]] = {}
    for kind, stage, value in re.findall(r'recsys_stage_seconds_(sum|count)\{stage="([^"]+)"\} (\S+)', client.metrics()):
        out.setdefault(stage, [0.0, 0.0])[0 if kind == "sum" else 1] = float(value)
    return {s: (v[0], v[1]) for s, v in out.items()}


def stage_means(before: dict, after: dict) -> dict[str, float]:
    """Mean milliseconds per request of each stage between two metric snapshots."""
    means = {}
    for stage, (total, count) in after.items():
        t0, c0 = before.get(stage, (0.0, 0.0))
        if count > c0:
            means[stage] = (total - t0) / (count - c0) * 1000
    return means


def start_service(bundle: Path, port: int, workers: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "RECSYS_BUNDLE_DIR": str(bundle), "RECSYS_STATE_DIR": str(log.parent / "bench-state"),
           "RECSYS_LOG_LEVEL": "WARNING"}
    cmd = [sys.executable, "-m", "uvicorn", "service.app:app", "--host", "127.0.0.1", "--port", str(port),
           "--workers", str(workers), "--no-access-log", "--log-level", "warning"]
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:  # fail now, with the reason, rather than after the deadline
            raise RuntimeError(f"the service exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"service did not become ready; see {log}")


def user_ids_of(bundle: Path) -> list[str]:
    from recsys.bundle import resolve
    import json

    return json.loads((resolve(bundle) / "catalog.json").read_text())["user_ids"]


def sequential_every_user(client: RecsysClient, users: list[str], k: int) -> dict:
    """One request per known user, one after another, from a cold user-vector cache: every user
    must get k items; latency (the client's reading of the answer included) and the service's stage
    breakdown over those requests."""
    latencies, failures = [], []
    before = stage_totals(client)
    for user in users:
        start = time.perf_counter()
        try:
            served = len(client.recommend(user, k=k).items)
        except ApiError:
            served = None
        latencies.append(time.perf_counter() - start)
        if served != k:
            failures.append(user)
    stages = stage_means(before, stage_totals(client))
    return {**summary(latencies, len(failures), sum(latencies)), "stages": stages, "users": len(users)}


def run(args) -> dict:
    users = user_ids_of(args.bundle)
    proc = start_service(args.bundle, args.port, args.workers, Path(args.log))
    client = RecsysClient(f"http://127.0.0.1:{args.port}", retry=NO_RETRY)  # a failure is counted, not hidden
    results = {"fixed": {}, "saturation": None, "stages": {}}
    try:
        results["sequential"] = sequential_every_user(client, users, args.k)
        print(f"sequential, every user once: {results['sequential']}")
        asyncio.run(saturate("127.0.0.1", args.port, args.warmup, users, args.k, 4))  # warm caches and threads
        for rate in args.rates:
            runs = []
            for _ in range(args.repeats):
                before = stage_totals(client)
                runs.append(asyncio.run(fixed_rate("127.0.0.1", args.port, rate, args.duration, users, args.k, args.connections)))
                results["stages"][rate] = stage_means(before, stage_totals(client))
            results["fixed"][rate] = median_run(runs)
            print(f"rate {rate}: {results['fixed'][rate]}")
        sat = [asyncio.run(saturate("127.0.0.1", args.port, args.duration, users, args.k, args.connections))
               for _ in range(args.repeats)]
        results["saturation"] = median_run(sat)
        print(f"saturation: {results['saturation']}")
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=20)
    return results


def median_run(runs: list[dict]) -> dict:
    return {key: float(np.median([r[key] for r in runs])) for key in runs[0]}


def markdown(res: dict, args) -> str:
    lines = [
        "## End to end: `/recommend` on loopback",
        "",
        f"Machine: {latency_machine()}; service and load generator on the same machine. "
        f"`uvicorn service.app:app --workers {args.workers}`, bundle `{args.bundle}`, "
        f"`GET /recommend?user_id=<random known user>&k={args.k}` (re-ranked from the bundle's default candidate depth). "
        f"Each row: median of {args.repeats} runs of {args.duration:.0f} s; open-loop fixed rate (requests issued on "
        "schedule whatever the earlier ones are doing; latency from the moment each is due, queueing for a connection "
        "included; 'timer lag' is how late the generator's own millisecond timers woke, not counted in the latency); "
        f"saturation = {args.connections} closed-loop connections. Known users' vectors are cached "
        "by the service until their history changes (warm after the warm-up). Produced by `python bench/e2e.py`.",
        "",
        "| load | requests/s achieved | p50 ms | p95 ms | p99 ms | errors | timer lag p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for rate, r in res["fixed"].items():
        lines.append(f"| {rate} req/s fixed | {r['throughput']:.0f} | {r['p50']:.2f} | {r['p95']:.2f} | {r['p99']:.2f} | "
                     f"{r['errors']:.0f} | {r['lag_p99']:.2f} |")
    s = res["saturation"]
    lines.append(f"| saturation ({args.connections} conns) | {s['throughput']:.0f} | {s['p50']:.2f} | {s['p95']:.2f} | "
                 f"{s['p99']:.2f} | {s['errors']:.0f} | - |")
    q = res["sequential"]
    lines += ["", f"Every one of the {q['users']} known users once, sequentially, cold user-vector cache (the project's Python client): "
              f"p50 {q['p50']:.2f} ms, p95 {q['p95']:.2f} ms, p99 {q['p99']:.2f} ms, {q['errors']:.0f} users without "
              f"{args.k} items; stages (mean ms): " + ", ".join(f"{s} {v:.3f}" for s, v in q["stages"].items()) + "."]
    lines += ["", "Mean time per stage (ms, from the service's `recsys_stage_seconds`):", "",
              "| load | " + " | ".join(("features", "user_encoding", "ann_search", "rerank")) + " |", "|---|---|---|---|---|"]
    for rate, stages in res["stages"].items():
        lines.append(f"| {rate} req/s | " + " | ".join(f"{stages.get(s, float('nan')):.3f}" for s in
                                                        ("features", "user_encoding", "ann_search", "rerank")) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=ROOT / "artifacts")
    p.add_argument("--rates", type=float, nargs="+", default=[100, 200])
    p.add_argument("--duration", type=float, default=20)
    p.add_argument("--warmup", type=float, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--log", default="/tmp/recsys-bench-service.log")
    p.add_argument("--no-write", action="store_true", help="print only; do not touch docs/benchmarks.md")
    add_docs_option(p)
    args = p.parse_args()
    res = run(args)
    if not args.no_write:
        plot(res, args.docs / "e2e.png")
        update_section("e2e", markdown(res, args) + "\n\n![latency percentiles per offered load](e2e.png)",
                       args.docs / BENCHMARKS.name)


def plot(res: dict, path: Path) -> None:
    """Latency percentiles against offered load, with the saturation throughput marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(res["fixed"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for q in ("p50", "p95", "p99"):
        ax.plot(rates, [res["fixed"][r][q] for r in rates], marker="o", label=q)
    ax.axvline(res["saturation"]["throughput"], linestyle="--", color="grey", label="saturation throughput")
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
