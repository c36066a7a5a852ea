"""Start-up cost with a long state log: this tree, and optionally a baseline tree, on the same data.

Writes a state directory of ``--events`` events and ``--changes`` catalogue upserts (new items, each
changed several times) against a bundle, then times ``LiveEngine(settings.live_config())`` - bundle load plus
replay - in a fresh interpreter: first start (no snapshot: the whole log is read, then folded into a
snapshot) and the start after it (snapshot plus an empty tail). The baseline tree (e.g. a worktree of
an older commit) replays the same logs its own way.

    python -m bench.state_startup --bundle artifacts --baseline-tree /tmp/old-main
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.report import BENCHMARKS, add_docs_option, machine, update_section
from recsys.bundle import read_bundle

ROOT = Path(__file__).resolve().parents[1]
TIMER = """
import json, sys, time
from service.config import get_settings
try:
    from recsys.live import LiveEngine
    start = time.perf_counter()
    LiveEngine(get_settings().live_config())
except ImportError:  # trees from before the core package
    from service.state import ServiceState
    start = time.perf_counter()
    ServiceState(get_settings())
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def write_logs(state: Path, bundle_dir: Path, n_events: int, n_changes: int, seed: int = 0) -> None:
    """Events by the bundle's users on its items; upserts of ``n_changes // 5`` new items, 5 changes each."""
    bundle = read_bundle(bundle_dir)
    users, items = bundle.catalog["user_ids"], bundle.catalog["item_ids"]
    genres = bundle.catalog["genre_names"]
    rng = np.random.default_rng(seed)
    state.mkdir(parents=True)
    with open(state / "catalog.jsonl", "w") as f:
        for j in range(n_changes):
            item = {"item_id": f"new-{j % max(n_changes // 5, 1)}", "title": f"New {j}", "genres": [genres[j % len(genres)]],
                    "year": 1990 + j % 30, "features": {}}
            f.write(json.dumps({"op": "upsert", "item": item}) + "\n")
    with open(state / "events.jsonl", "w") as f:
        for t, (u, i) in enumerate(zip(rng.integers(len(users), size=n_events), rng.integers(len(items), size=n_events))):
            f.write(json.dumps({"user_id": users[u], "item_id": items[i], "rating": float(rng.integers(1, 6)),
                                "timestamp": 1_700_000_000 + t}) + "\n")


def time_start(tree: Path, bundle_dir: Path, state: Path) -> float:
    env = {**os.environ, "RECSYS_BUNDLE_DIR": str(bundle_dir), "RECSYS_STATE_DIR": str(state), "RECSYS_LOG_LEVEL": "ERROR",
           "PYTHONPATH": str(tree)}
    env.pop("RECSYS_ADMIN_TOKEN", None)
    out = subprocess.run([sys.executable, "-c", TIMER], cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{tree}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def measure(tree: Path, bundle_dir: Path, logs: Path, repeats: int) -> tuple[list[float], list[float]]:
    """(first starts, starts after the first) over ``repeats`` fresh copies of the logs."""
    first, after = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            state = Path(tmp) / "state"
            shutil.copytree(logs, state)
            first.append(time_start(tree, bundle_dir, state))
            after.append(time_start(tree, bundle_dir, state))
    return first, after


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True, help="bundle root or version directory")
    p.add_argument("--events", type=int, default=90_000)
    p.add_argument("--changes", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--baseline-tree", type=Path, help="another checkout to time on the same logs (e.g. main before compaction)")
    p.add_argument("--baseline-repeats", type=int, default=1, help="the baseline can be slow: fewer repeats")
    p.add_argument("--no-write", action="store_true", help="print only; do not touch docs/benchmarks.md")
    add_docs_option(p)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp) / "logs"
        write_logs(logs, args.bundle, args.events, args.changes)
        rows = [("this tree", *measure(ROOT, args.bundle, logs, args.repeats))]
        if args.baseline_tree:
            label = subprocess.run(["git", "-C", str(args.baseline_tree), "log", "-1", "--format=%h"],
                                   capture_output=True, text=True).stdout.strip() or str(args.baseline_tree)
            rows.append((f"baseline {label}", *measure(args.baseline_tree, args.bundle, logs, args.baseline_repeats)))
    lines = [f"Machine: {machine()}. Bundle: `{args.bundle}`. State log: {args.events:,} events + {args.changes:,} "
             f"catalogue upserts ({args.changes // 5:,} new items, 5 changes each) = {args.events + args.changes:,} records.",
             "Time of `LiveEngine(settings.live_config())` (bundle load + online state) in a fresh interpreter; median of the runs.", "",
             "| code | first start (s) | next start (s) | runs |", "|---|---|---|---|"]
    for label, first, after in rows:
        lines.append(f"| {label} | {np.median(first):.2f} | {np.median(after):.2f} | {len(first)} |")
    lines += ["", "First start without a snapshot reads the whole log and writes the snapshot; the next start reads the "
              "snapshot plus the tail after it. The baseline has no snapshot: every start replays the whole log."]
    body = "## State start-up (snapshot + tail)\n\n" + "\n".join(lines)
    print(body)
    if not args.no_write:
        update_section("state-startup", body, args.docs / BENCHMARKS.name)


if __name__ == "__main__":
    main()
