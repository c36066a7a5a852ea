"""What an acknowledged event costs on each way of running Redis: a single Redis, and a 3-master cluster (a replica
each) with and without ``WAIT`` for a replica, under ``appendfsync always`` and ``everysec``. All in one run, on
loopback, through ``RedisStateStore.append_event`` (the service's write path), with the test suite's launchers
(``tests.servicekit``: the same cluster CI tests failover on).

    python -m bench.redis_writes --events 2000 --runs 3

Sequential: one writer, the latency of each acknowledged event. Concurrent: ``--threads`` writers (the service's
``RECSYS_IO_THREADS``), events acknowledged per second.
"""
from __future__ import annotations

import argparse
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import redis

from bench.report import BENCHMARKS, add_docs_option, machine, update_section
from recsys.state.protocol import Event
from recsys.state.redis import RedisStateStore
from tests.servicekit import redis_cluster, redis_server, unique_prefix


def sequential_ms(store: RedisStateStore, n: int) -> np.ndarray:
    out = np.empty(n)
    for i in range(n):
        start = time.perf_counter()
        store.append_event(f"user-{i % 500}", Event(f"item-{i}", None, 1_700_000_000 + i))
        out[i] = (time.perf_counter() - start) * 1000
    return out


def concurrent_per_s(store: RedisStateStore, n: int, threads: int) -> float:
    def write(worker: int) -> None:
        for i in range(n // threads):
            store.append_event(f"user-{worker}-{i % 100}", Event(f"item-{i}", None, 1_700_000_000 + i))

    workers = [threading.Thread(target=write, args=(w,)) for w in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return (n // threads * threads) / (time.perf_counter() - start)


def measure(url: str, wait: int, args) -> tuple[float, float, float]:
    """(median latency ms, p99 ms, events/s), each the median over ``args.runs`` runs on fresh prefixes."""
    p50, p99, rate = [], [], []
    for _ in range(args.runs):
        store = RedisStateStore(url, 1000, unique_prefix(), wait_replicas=wait, timeout_s=2.0)
        sequential_ms(store, 200)  # connections and scripts warm
        lat = sequential_ms(store, args.events)
        p50.append(np.median(lat))
        p99.append(np.percentile(lat, 99))
        rate.append(concurrent_per_s(store, args.events * 2, args.threads))
        store.close()
    return float(np.median(p50)), float(np.median(p99)), float(np.median(rate))


def set_fsync(ports: list[int], policy: str) -> None:
    for port in ports:
        redis.Redis(port=port).config_set("appendfsync", policy)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=2000, help="events per sequential run (twice as many concurrent)")
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no-write", action="store_true", help="print only; do not touch docs/benchmarks.md")
    add_docs_option(p)
    args = p.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        single = stack.enter_context(redis_server(Path(tmp) / "single"))
        cluster = stack.enter_context(redis_cluster(Path(tmp) / "cluster"))
        for fsync in ("always", "everysec"):
            set_fsync([int(single.rsplit(":", 1)[1].split("/")[0])], fsync)
            set_fsync(list(cluster.nodes), fsync)
            rows.append(("single Redis", fsync, 0, *measure(single, 0, args)))
            rows.append(("cluster, 3 masters + 3 replicas", fsync, 0, *measure(cluster.url, 0, args)))
            rows.append(("cluster, 3 masters + 3 replicas", fsync, 1, *measure(cluster.url, 1, args)))
    lines = [f"Machine: {machine()}. Every node on loopback, AOF on; `RedisStateStore.append_event` as the service calls "
             f"it. Sequential: {args.events:,} events by one writer, latency of each. Concurrent: {args.events * 2:,} events "
             f"by {args.threads} threads (`RECSYS_IO_THREADS`). Median of {args.runs} runs, each on a fresh prefix.", "",
             "| Redis | appendfsync | WAIT replicas | p50 ms | p99 ms | events/s, concurrent |", "|---|---|---|---|---|---|"]
    for name, fsync, wait, p50, p99, rate in rows:
        lines.append(f"| {name} | {fsync} | {wait} | {p50:.2f} | {p99:.2f} | {rate:,.0f} |")
    lines += ["", "`WAIT 1` (the cluster default, `RECSYS_REDIS_WAIT_REPLICAS`) holds each acknowledgement until the "
              "master's replica has the write, so a master killed at any moment fails over without losing an "
              "acknowledged write (tests/state/test_redis_cluster.py); `appendfsync always` additionally keeps it "
              "through a power loss of master and replica together. With `everysec` and `WAIT 1`, one node's loss "
              "loses nothing and a simultaneous loss of both can lose the last second. On one small machine the "
              "cluster's six processes compete with the writer for the same cores: what it buys is room beyond one "
              "node and failover, not speed on one host."]
    body = "## Redis writes: single, cluster, WAIT and appendfsync\n\n" + "\n".join(lines)
    print(body)
    if not args.no_write:
        update_section("redis-writes", body, args.docs / BENCHMARKS.name)


if __name__ == "__main__":
    main()
