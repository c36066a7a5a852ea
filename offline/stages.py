"""Wall time and peak resident memory of each offline stage, for the scaling benchmark and the logs.

``with stage("index build"): ...`` adds the block's seconds to that stage's total and raises its
peak to the highest resident set size the process reached inside the block. The peak comes from
the kernel's high-water mark (``VmHWM``), reset at the start of each block through
``/proc/self/clear_refs`` so a stage is not charged with an earlier stage's peak; where that reset
is not allowed (not Linux, a locked-down container) the peak is the process's peak so far, which
can only over-state a stage. Nested stages each get their own peak and still count towards the
enclosing one.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loguru import logger

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")

_totals: dict[str, dict[str, float]] = {}  # name -> {"seconds", "peak_bytes", "calls"}
_open_peaks: list[int] = []  # the highest mark seen so far by each enclosing stage, innermost last


def high_water_mark() -> int:
    """The process's peak resident set size in bytes since the last reset (0 where unknown)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_high_water_mark() -> None:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        pass


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Time the block and record its peak memory under ``name`` (repeated blocks add up)."""
    if _open_peaks:
        _open_peaks[-1] = max(_open_peaks[-1], high_water_mark())
    _reset_high_water_mark()
    _open_peaks.append(0)
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - started
        peak = max(_open_peaks.pop(), high_water_mark())
        if _open_peaks:
            _open_peaks[-1] = max(_open_peaks[-1], peak)
        entry = _totals.setdefault(name, {"seconds": 0.0, "peak_bytes": 0, "calls": 0})
        entry["seconds"] += seconds
        entry["peak_bytes"] = max(entry["peak_bytes"], peak)
        entry["calls"] += 1
        logger.debug("stage {}: {:.1f}s, peak {:.2f} GiB", name, seconds, peak / 2**30)


def recorded() -> dict[str, dict[str, float]]:
    """Every stage recorded since the last ``clear()``, in the order first seen."""
    return {name: dict(entry) for name, entry in _totals.items()}


def clear() -> None:
    _totals.clear()
