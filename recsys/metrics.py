"""The core's Prometheus series and the one stage timer that feeds them (and the stage spans, when traced).

The engine times its stages, counts fallbacks and work done without the state store, and the live
engine reports its bundle and reloads; the service exposes them (``service/metrics.py`` adds the
HTTP series and the multiprocess exposition). Offline callers of the engine fill the same series in
their own process, where nothing scrapes them.

Tracing: the core needs the OpenTelemetry API only. Whoever serves chooses the SDK, the sampler and the
exporter, and hands a tracer to ``trace_stages`` (``service/tracing.py``); until then ``timed`` makes no
span at all, so tracing off costs a stage one check.
"""
from __future__ import annotations

import time

from opentelemetry.trace import Tracer
from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_STAGE_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1)

STAGE = Histogram("recsys_stage_seconds", "Time per /recommend stage", ["stage"], buckets=_STAGE_BUCKETS)
BATCH_STAGE = Histogram("recsys_batch_stage_seconds", "Time per /recommend/batch stage, for the whole batch", ["stage"],
                        buckets=LATENCY_BUCKETS)
FALLBACKS = Counter("recsys_fallbacks_total", "Recommendations served by a fallback", ["kind"])
BUNDLE = Gauge("recsys_bundle_info", "Loaded bundle version (value 1)", ["version"], multiprocess_mode="livemax")
INDEX_ITEMS = Gauge("recsys_index_items", "Items searchable in the ANN index", multiprocess_mode="livemax")
UNINDEXED = Gauge("recsys_index_unindexed_items", "Changed items the HNSW graph does not hold yet: every search scores "
                  "them exactly until the merge inserts them", multiprocess_mode="livemax")
BEHIND = Gauge("recsys_bundle_behind_current", "1 while the bundle root's current names a version this replica does not "
               "serve (its load failed; set by the bundle watcher)", multiprocess_mode="livemax")
RELOADS = Counter("recsys_reloads_total", "Bundle reloads (admin route or bundle watcher) by result", ["result"])
HISTORY_READS = Counter("recsys_history_reads_total", "Users' histories /recommend read from Redis, by where the answer "
                        "came from: 'memory' (kept by the worker until Redis invalidates it) or 'redis'", ["source"])
DEGRADED = Counter("recsys_degraded_total", "Work done without the state store (it could not be reached)", ["what"])
# Every label value exported at 0 from the start: a series born at 1 has no increase() to alert on (the bundle
# watcher does not retry a version that failed, so its first failure is often the only one).
for _counter, _values in ((RELOADS, ("ok", "failed")), (DEGRADED, ("history", "catalog_follow")), (FALLBACKS, ("popularity",)),
                          (HISTORY_READS, ("memory", "redis"))):
    for _value in _values:
        _counter.labels(_value)


_tracer: Tracer | None = None  # set by ``trace_stages``; None: tracing is off


def trace_stages(tracer: Tracer | None) -> None:
    """Give every stage timed from now on a span from ``tracer`` (a child of the span current where the stage
    runs: the request's); None turns the spans off again."""
    global _tracer
    _tracer = tracer


class timed:
    """Time a stage into both a Prometheus histogram (a single request's or a batch's) and the response's timings
    (ms), and, when tracing is on, into a span named for the stage: one place times a stage, so the histogram and
    the trace cannot name or bound stages differently. A class, not a generator: several run per request, and the
    histogram's labelled child is looked up once per stage, not on every request."""

    __slots__ = ("stage", "timings", "child", "start", "span")
    _children: dict[tuple[Histogram, str], object] = {}

    def __init__(self, stage: str, timings: dict[str, float], histogram: Histogram = STAGE, since: float | None = None):
        """``since``: the stage's start (``time.perf_counter()``) when it began before this block (an awaited read)."""
        key = (histogram, stage)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = histogram.labels(stage)
        self.stage, self.timings, self.child, self.span, self.start = stage, timings, child, None, since

    def __enter__(self) -> None:
        if _tracer is not None:  # current inside the stage: a span started there is the stage's child
            self.span = _tracer.start_as_current_span(self.stage)
            self.span.__enter__()
        if self.start is None:
            self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        elapsed = time.perf_counter() - self.start
        self.child.observe(elapsed)
        self.timings[self.stage] = round(elapsed * 1000, 3)
        if self.span is not None:  # ends it; an exception leaving the stage is recorded on it, status ERROR
            self.span.__exit__(*exc)


def set_bundle(version: str, index_items: int) -> None:
    """The old version's series drops to 0 (in multiprocess mode it lives in a file that ``clear`` leaves)."""
    for labels in list(BUNDLE._metrics):
        BUNDLE.labels(*labels).set(0)
    BUNDLE.labels(version).set(1)
    INDEX_ITEMS.set(index_items)
