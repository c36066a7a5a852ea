"""Batch throughput: users answered per second, one by one through ``GET /recommend`` vs ``POST
/recommend/batch`` vs ``python -m offline recommend``, on one bundle, in one run.

Every path answers every user of the bundle once per pass, cold: the service runs with
``RECSYS_USER_VECTOR_CACHE=0`` (no cached user vectors or ranker features), as a batch job meets its
users, and the offline engine's caches are emptied before each pass.

- one by one: ``wrk`` (C, 1 thread, 4 connections) over ``GET /recommend?user_id=U&k=10``, users rotating;
- batch endpoint: every user in batches of ``--batch-size``, from 1 and from 2 concurrent clients (the
  service runs 2 worker threads on these 2 cores);
- offline: ``Engine.recommend_batch`` in-process over every user (what ``python -m offline recommend``
  runs), with the stages split: tower + ANN (recall only) vs re-ranking; and the command's wall time,
  bundle loading and file writing included.

Writes the "batch" section of docs/benchmarks.md.

    python -m bench.batch --bundle artifacts --runs 5
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from bench.report import BENCHMARKS, add_docs_option, machine, update_section
from bench.serving import WRK_USERS, free_port, server, wrk
from offline.recommend import load_engine
from recsys.query import RecommendOptions
from service.client import NO_RETRY, RecsysClient

ROOT = Path(__file__).resolve().parents[1]
K = 10


def batch_endpoint(url: str, users: list[str], size: int, clients: int) -> float:
    """Users per second for one pass over ``users`` in batches of ``size``, ``clients`` batches in flight (one
    client's connection pool, shared by the threads)."""
    chunks = [users[i : i + size] for i in range(0, len(users), size)]
    with RecsysClient(url, read_timeout=300, retry=NO_RETRY) as client:

        def post(chunk: list[str]) -> None:
            assert all(r.error is None for r in client.recommend_batch(chunk, k=K).results)

        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(post, chunks))
        return len(users) / (time.perf_counter() - start)


def offline_pass(engine, users: list[str], size: int) -> dict[str, float]:
    """One cold pass of the engine over ``users``: users/s overall and per stage group."""
    engine.users.vector_cache.clear()
    engine.users.feature_cache.clear()
    stages: dict[str, float] = {}
    start = time.perf_counter()
    for i in range(0, len(users), size):
        for stage, ms in engine.recommend_batch(users[i : i + size], RecommendOptions(k=K)).timings_ms.items():
            stages[stage] = stages.get(stage, 0.0) + ms / 1000
    total = time.perf_counter() - start
    return {"users_s": len(users) / total, "recall_users_s": len(users) / (stages["user_encoding"] + stages["ann_search"]),
            "rerank_share": stages["rerank"] / total}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--no-write", action="store_true")
    add_docs_option(p)
    args = p.parse_args()
    engine = load_engine(args.bundle)
    users = list(engine.bundle.catalog["user_ids"])
    rows: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        script = tmp / "users.lua"
        script.write_text(WRK_USERS % ", ".join(f'"{u}"' for u in users))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "RECSYS_BUNDLE_DIR": str(args.bundle.resolve()), "RECSYS_LOG_LEVEL": "WARNING",
               "RECSYS_STATE_DIR": str(tmp / "state"), "RECSYS_USER_VECTOR_CACHE": "0"}
        with server([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)], env, url, tmp / "svc.log"):
            wrk(url, script, min(3, args.seconds), connections=4)  # warm-up
            rows["one by one: GET /recommend (wrk -c4)"] = float(np.median(
                [wrk(url, script, args.seconds, connections=4) for _ in range(args.runs)]))
            for clients in (1, 2):
                batch_endpoint(url, users, args.batch_size, clients)  # warm-up
                rows[f"POST /recommend/batch, {args.batch_size} users per call, {clients} client(s)"] = float(np.median(
                    [batch_endpoint(url, users, args.batch_size, clients) for _ in range(args.runs)]))
        with threadpool_limits(1, user_api="blas"):  # as the service runs its matmuls
            offline_pass(engine, users, 1000)  # warm-up
            passes = [offline_pass(engine, users, 1000) for _ in range(args.runs)]
        rows["offline engine, 1000 users per pass (in-process)"] = float(np.median([r["users_s"] for r in passes]))
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "offline", "recommend", "--bundle", str(args.bundle), "--users", "all",
                        "--k", str(K), "--out", str(tmp / "top.csv"), "--quiet"], cwd=ROOT, check=True, capture_output=True)
        command_s = time.perf_counter() - start
    recall = float(np.median([r["recall_users_s"] for r in passes]))
    rerank_share = float(np.median([r["rerank_share"] for r in passes]))
    write(rows, recall, rerank_share, command_s, len(users), args)


def write(rows: dict[str, float], recall: float, rerank_share: float, command_s: float, n_users: int, args) -> None:
    one = rows["one by one: GET /recommend (wrk -c4)"]
    lines = [f"Machine: {machine()}; clients on the same cores. Bundle `{args.bundle}` ({n_users} users), top-{K}, "
             f"each user answered cold (no cached user vectors or ranker features). Median of {args.runs} passes.", "",
             "| path | users/s | vs one by one |", "|---|---|---|"]
    lines += [f"| {name} | {value:,.0f} | {value / one:.1f}x |" for name, value in rows.items()]
    lines += ["", f"Of the offline engine's time, re-ranking (merging the item-item channel, building the features of "
              f"every candidate, one ranker pass) takes {rerank_share:.0%}; the recall stages alone (user tower + "
              f"HNSW) answer {recall:,.0f} users/s (for scale: a reference recall-only batch implementation did about "
              f"2,300 users/s on this machine). `python -m offline recommend --users all` took {command_s:.1f} s "
              f"end to end (Python start-up, bundle loading and the CSV included). A single request is a batch of "
              f"one through the same code; the batch's gain is one tower call, one HNSW query and blocked ranker "
              f"matmuls for many users, and no HTTP round trip per user."]
    body = "## Batch recommendations: one by one vs /recommend/batch vs the offline command\n\n" + "\n".join(lines)
    print(body)
    if not args.no_write:
        update_section("batch", body, args.docs / BENCHMARKS.name)


if __name__ == "__main__":
    main()
