"""The HTTP layer's Prometheus series and the exposition of every series (the core's are in ``recsys/metrics.py``).

Several worker processes behind one port (``python -m service --workers N``) cannot each be a
scrape target, so they run in prometheus_client's multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR``
(set by ``python -m service`` before anything imports this module) holds one file per process, and
``/metrics`` sums counters and histograms over them; the gauges say how (in-flight requests add up
over live workers, bundle and index size take the largest live value).
"""
from __future__ import annotations

import os

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from recsys.metrics import LATENCY_BUCKETS


REQUESTS = Counter("recsys_requests_total", "HTTP requests by endpoint and status", ["endpoint", "method", "status"])
LATENCY = Histogram("recsys_request_seconds", "HTTP request latency by endpoint", ["endpoint"], buckets=LATENCY_BUCKETS)
BATCH_USERS = Counter("recsys_batch_users_total", "Users answered through /recommend/batch, by outcome", ["outcome"])
IN_FLIGHT = Gauge("recsys_in_flight_requests", "Requests being processed", multiprocess_mode="livesum")
EVENTS = Counter("recsys_events_total", "Interactions recorded through /events")


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
