"""Prometheus metrics and the one stage timer that feeds them.

Several worker processes behind one port (``python -m service --workers N``) cannot each be a
scrape target, so they run in prometheus_client's multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR``
(set by ``python -m service`` before anything imports this module) holds one file per process, and
``/metrics`` sums counters and histograms over them; the gauges say how (in-flight requests add up
over live workers, bundle and index size take the largest live value).
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_STAGE_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1)

REQUESTS = Counter("recsys_requests_total", "HTTP requests by endpoint and status", ["endpoint", "method", "status"])
LATENCY = Histogram("recsys_request_seconds", "HTTP request latency by endpoint", ["endpoint"], buckets=_LATENCY_BUCKETS)
STAGE = Histogram("recsys_stage_seconds", "Time per /recommend stage", ["stage"], buckets=_STAGE_BUCKETS)
BATCH_STAGE = Histogram("recsys_batch_stage_seconds", "Time per /recommend/batch stage, for the whole batch", ["stage"],
                        buckets=_LATENCY_BUCKETS)
BATCH_USERS = Counter("recsys_batch_users_total", "Users answered through /recommend/batch, by outcome", ["outcome"])
FALLBACKS = Counter("recsys_fallbacks_total", "Recommendations served by a fallback", ["kind"])
IN_FLIGHT = Gauge("recsys_in_flight_requests", "Requests being processed", multiprocess_mode="livesum")
BUNDLE = Gauge("recsys_bundle_info", "Loaded bundle version (value 1)", ["version"], multiprocess_mode="livemax")
INDEX_ITEMS = Gauge("recsys_index_items", "Items searchable in the ANN index", multiprocess_mode="livemax")
RELOADS = Counter("recsys_reloads_total", "Bundle reloads (admin route or bundle watcher) by result", ["result"])
DEGRADED = Counter("recsys_degraded_total", "Work done without the state store (it could not be reached)", ["what"])
EVENTS = Counter("recsys_events_total", "Interactions recorded through /events")


@contextmanager
def timed(stage: str, timings: dict[str, float], histogram: Histogram = STAGE) -> Iterator[None]:
    """Time a stage into both a Prometheus histogram (a single request's or a batch's) and the response's timings (ms)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        histogram.labels(stage).observe(elapsed)
        timings[stage] = round(elapsed * 1000, 3)


def set_bundle(version: str, index_items: int) -> None:
    """The old version's series drops to 0 (in multiprocess mode it lives in a file that ``clear`` leaves)."""
    for labels in list(BUNDLE._metrics):
        BUNDLE.labels(*labels).set(0)
    BUNDLE.labels(version).set(1)
    INDEX_ITEMS.set(index_items)


def exposition() -> bytes:
    """The text format: this process's registry, or the sum over every worker's files in multiprocess mode."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry)


def worker_exited(pid: int) -> None:
    """Drop an exiting worker's live gauges (its counters stay in the sums)."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        multiprocess.mark_process_dead(pid)
