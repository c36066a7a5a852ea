"""Benchmarks write their own section of docs/benchmarks.md between markers, leaving the rest."""
from __future__ import annotations

import argparse
import platform
import re
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
