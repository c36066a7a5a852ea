"""The core's Prometheus series and the one stage timer that feeds them.

The engine times its stages, counts fallbacks and work done without the state store, and the live
engine reports its bundle and reloads; the service exposes them (``service/metrics.py`` adds the
HTTP series and the multiprocess exposition). Offline callers of the engine fill the same series in
their own process, where nothing scrapes them.
"""
from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_STAGE_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1)

STAGE = Histogram("recsys_stage_seconds", "Time per /recommend stage", ["stage"], buckets=_STAGE_BUCKETS)
BATCH_STAGE = Histogram("recsys_batch_stage_seconds", "Time per /recommend/batch stage, for the whole batch", ["stage"],
                        buckets=LATENCY_BUCKETS)
FALLBACKS = Counter("recsys_fallbacks_total", "Recommendations served by a fallback", ["kind"])
BUNDLE = Gauge("recsys_bundle_info", "Loaded bundle version (value 1)", ["version"], multiprocess_mode="livemax")
INDEX_ITEMS = Gauge("recsys_index_items", "Items searchable in the ANN index", multiprocess_mode="livemax")
BEHIND = Gauge("recsys_bundle_behind_current", "1 while the bundle root's current names a version this replica does not "
               "serve (its load failed; set by the bundle watcher)", multiprocess_mode="livemax")
RELOADS = Counter("recsys_reloads_total", "Bundle reloads (admin route or bundle watcher) by result", ["result"])
DEGRADED = Counter("recsys_degraded_total", "Work done without the state store (it could not be reached)", ["what"])


class timed:
    """Time a stage into both a Prometheus histogram (a single request's or a batch's) and the response's timings
    (ms). A class, not a generator: several run per request, and the histogram's labelled child is looked up
    once per stage, not on every request."""

    __slots__ = ("stage", "timings", "child", "start")
    _children: dict[tuple[Histogram, str], object] = {}

    def __init__(self, stage: str, timings: dict[str, float], histogram: Histogram = STAGE):
        key = (histogram, stage)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = histogram.labels(stage)
        self.stage, self.timings, self.child = stage, timings, child

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        elapsed = time.perf_counter() - self.start
        self.child.observe(elapsed)
        self.timings[self.stage] = round(elapsed * 1000, 3)


def set_bundle(version: str, index_items: int) -> None:
    """The old version's series drops to 0 (in multiprocess mode it lives in a file that ``clear`` leaves)."""
    for labels in list(BUNDLE._metrics):
        BUNDLE.labels(*labels).set(0)
    BUNDLE.labels(version).set(1)
    INDEX_ITEMS.set(index_items)
