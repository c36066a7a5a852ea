"""Engine CPU per ``/recommend``, in process: ``Engine.recommend`` for every user of a bundle, one thread, BLAS and
torch on one thread as the service runs them, known users' vectors and ranker features cached as in serving. This
tree, and with ``--against CHECKOUT`` another checkout (the code before a change) on the same bundle, each in a
fresh interpreter, alternating, so that both see the same machine.

    python -m bench.engine_cpu --bundle artifacts --against /tmp/before --runs 3

The HTTP stack is not in it: bench/serving.py measures the whole service beside a bare endpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.report import BENCHMARKS, add_docs_option, machine, update_section

ROOT = Path(__file__).resolve().parents[1]
TIMER = """
import json, os, sys, tempfile, time
from threadpoolctl import threadpool_limits
import torch
threadpool_limits(1, user_api="blas")
torch.set_num_threads(1)
from recsys.bundle import read_bundle
from recsys.engine.engine import Engine
from recsys.query import RecommendRequest
engine = Engine(read_bundle(sys.argv[1]))
requests = [RecommendRequest(user_id=u, k=10) for u in engine.bundle.catalog["user_ids"]]
for r in requests:
    engine.recommend(r)
passes = []
for _ in range(int(sys.argv[2])):
    start = time.perf_counter()
    for r in requests:
        engine.recommend(r)
    passes.append((time.perf_counter() - start) / len(requests) * 1000)
print(json.dumps(passes))
"""


def time_tree(tree: Path, bundle: Path, passes: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "RECSYS_LOG_LEVEL": "ERROR",
           "NUMBA_CACHE_DIR": os.environ.get("NUMBA_CACHE_DIR", str(Path(tempfile.gettempdir()) / "numba-bench"))}
    out = subprocess.run([sys.executable, "-c", TIMER, str(bundle), str(passes)], cwd=tree, env=env, capture_output=True,
                         text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{tree}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def label(tree: Path) -> str:
    head = subprocess.run(["git", "-C", str(tree), "log", "-1", "--format=%h"], capture_output=True, text=True).stdout.strip()
    return head or str(tree)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--against", type=Path, action="append", default=[], metavar="CHECKOUT")
    p.add_argument("--runs", type=int, default=3, help="fresh interpreters per tree (alternating)")
    p.add_argument("--passes", type=int, default=3, help="passes over every user per interpreter")
    p.add_argument("--no-write", action="store_true")
    add_docs_option(p)
    args = p.parse_args()
    trees = [ROOT, *args.against]
    results: dict[Path, list[float]] = {tree: [] for tree in trees}
    for _ in range(args.runs):
        for tree in trees:
            results[tree] += time_tree(tree, args.bundle, args.passes)
    base = np.median(results[trees[-1]]) if args.against else None
    lines = [f"Machine: {machine()}. Bundle: `{args.bundle}`. `Engine.recommend` (k=10) for every user, one thread; "
             f"median over {args.runs} interpreters x {args.passes} passes per tree, trees alternating.", "",
             "| code | ms per request | vs the last row |", "|---|---|---|"]
    for tree in trees:
        median = float(np.median(results[tree]))
        lines.append(f"| {'this tree' if tree == ROOT else 'checkout'} {label(tree)} | {median:.3f} | "
                     f"{'' if base is None else f'{median / base:.2f}x'} |")
    body = "## Engine CPU per request\n\n" + "\n".join(lines)
    print(body)
    if not args.no_write:
        update_section("engine-cpu", body, args.docs / BENCHMARKS.name)


if __name__ == "__main__":
    main()
