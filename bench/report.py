"""Benchmarks write their own section of docs/benchmarks.md between markers, leaving the rest."""
from __future__ import annotations

import argparse
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

BENCHMARKS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
DOCS = BENCHMARKS.parent
HEADER = "# Benchmarks\n\nNumbers written by the scripts under `bench/` (and the offline pipeline); each section names its machine.\n"


def machine() -> str:
    """A one-line description of where the numbers were taken."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}"


def _cached_rows(size_mib: int = 64, rows: int = 4096) -> Callable[[], object]:
    """Work that reads the same ``rows`` scattered 64-byte rows of a ``size_mib`` array each time (256 KiB: they
    fit a core's own cache once read, the array does not), as a request reads the graph's upper layers, the model
    and the hot items again and again."""
    rng = np.random.default_rng(0)
    table = rng.random(((size_mib << 20) // 64, 16), dtype=np.float32)
    picked = np.sort(rng.choice(len(table), rows, replace=False))
    return lambda: float(table[picked].sum())


def idle_wake_cost(naps: int = 200, nap_s: float = 0.01, work: Callable[[], object] | None = None, warm: int = 10,
                   clock: Callable[[], float] = time.perf_counter, sleep: Callable[[float], None] = time.sleep) -> float:
    """How many times longer ``work`` (default: ``_cached_rows``) takes right after ``nap_s`` asleep than after
    ``warm`` runs back to back: the ratio of the medians over ``naps`` naps. Near 1 where an idle core keeps its
    caches; 2-4 on the 2-core virtual machine most numbers here come from, whose idle CPUs lose them
    (docs/benchmarks.md, "Eleventh round"). Every request that finds its worker idle pays it, as requests at a few
    hundred per second mostly do, and requests at saturation do not: a latency measured below saturation is read
    with this figure beside it."""
    work = work or _cached_rows()
    after, warmed = [], []
    for _ in range(naps):
        sleep(nap_s)
        start = clock()
        work()
        after.append(clock() - start)
        for _ in range(warm):
            work()
        start = clock()
        work()
        warmed.append(clock() - start)
    return float(np.median(after) / max(np.median(warmed), 1e-12))


def latency_machine() -> str:
    """``machine()`` and its idle wake-up cost: the line under a table of latencies measured below saturation."""
    return (f"{machine()}; idle wake-up x{idle_wake_cost():.1f} (cache-resident reads right after 10 ms asleep against "
            "the same reads warm: `bench.report.idle_wake_cost`)")


def add_docs_option(parser: argparse.ArgumentParser) -> None:
    """``--docs DIR``: where a run writes its section of benchmarks.md and its figures. The repository's docs/
    unless told otherwise; the smoke runs (tests/bench/test_smoke.py) point it at a scratch directory, so the
    writing code runs in CI without touching the published numbers."""
    parser.add_argument("--docs", type=Path, default=DOCS,
                        help="directory of benchmarks.md and the figures (default: the repository's docs/)")


def update_section(name: str, body: str, path: Path = BENCHMARKS) -> None:
    """Replace (or append) the ``name`` section, delimited by HTML comment markers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else HEADER
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def median_ms(samples: list[float]) -> float:
    return float(np.median(samples) * 1000)
