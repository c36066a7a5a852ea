"""Impressions (what an answer showed) and the feedback joined to them.

An impression is logged for every answer (or a sampled share): request id, user, time, bundle version,
experiment assignments, the items in the order shown with their scores, and under exploration each
item's propensity and the rank it started from. The request thread only offers the record to a bounded
queue; a writer thread hands batches to the state store. When the queue is full (the store is slow or
down) the record is dropped and counted: impressions are measurements, and a measurement must never
slow the request it measures.

Feedback (a click, a purchase...) names the request it answers; ``join`` decides whether it belongs to
that impression and at which position: the same rule for the event route (which answers ``joined``)
and for the experiment report (which counts).
"""
from __future__ import annotations

import queue
import random
import threading
import time
from dataclasses import dataclass

from loguru import logger
from prometheus_client import Counter

from recsys.errors import InvalidInput
from recsys.state.protocol import StateStore, StoreUnavailable

LOGGED = Counter("recsys_impressions_logged_total", "Impressions written to the state store")
DROPPED = Counter("recsys_impressions_dropped_total", "Impressions not logged, by reason", ["reason"])
for _reason in ("sampled_out", "queue_full", "store_unavailable"):
    DROPPED.labels(_reason)


@dataclass(frozen=True)
class ImpressionConfig:
    sample: float = 1.0  # share of answers logged
    queue_size: int = 10_000  # impressions waiting for the writer; beyond it they are dropped
    batch: int = 500  # impressions per store write, at most
    linger_s: float = 0.25  # the writer waits this long after an impression for others to join its batch
    feedback_window_s: int = 1800  # feedback joins an impression at most this long after it


@dataclass(frozen=True)
class Joined:
    """Where a feedback event stands against its impression: the 1-based position, or why it did not join."""

    position: int | None
    reason: str | None = None


def join(impression: dict | None, user_id: str, item_id: str, position: int | None, ts_s: int, window_s: int) -> Joined:
    """Feedback from ``user_id`` on ``item_id`` at ``ts_s`` joins an impression shown to that user at most
    ``window_s`` before, of which the item was part; ``position`` (1-based), when given, must be where the
    impression showed it (``InvalidInput`` otherwise: a client bug, not a missed join)."""
    if impression is None:
        return Joined(None, "no such impression (unknown, expired or not sampled)")
    if impression["user_id"] != user_id:
        return Joined(None, "the impression was shown to another user")
    shown_s = impression["ts_ms"] // 1000
    if not shown_s <= ts_s <= shown_s + window_s:
        return Joined(None, f"more than {window_s} s after the impression, or before it")
    items = impression["items"]
    if position is not None:
        if not 1 <= position <= len(items) or items[position - 1] != item_id:
            where = items.index(item_id) + 1 if item_id in items else None
            raise InvalidInput(f"request {impression['request_id']} showed {item_id!r} "
                               + (f"at position {where}, not {position}" if where else "nowhere"))
        return Joined(position)
    if item_id not in items:
        return Joined(None, "the item was not part of the impression")
    return Joined(items.index(item_id) + 1)


class ImpressionLog:
    """The bounded queue and the writer thread between answers and the state store."""

    def __init__(self, store: StateStore, config: ImpressionConfig):
        self.store, self.config = store, config
        self.queue: queue.Queue[dict] = queue.Queue(config.queue_size)
        self.pending: dict[str, dict] = {}  # queued, not yet written: feedback arriving first still joins
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._write, name="impression-writer", daemon=True)
        self._thread.start()

    def offer(self, record: dict) -> bool:
        """Queue ``record`` unless sampled out or the queue is full; never blocks. Returns whether queued."""
        if self.config.sample < 1.0 and random.random() >= self.config.sample:
            DROPPED.labels("sampled_out").inc()
            return False
        try:
            self.pending[record["request_id"]] = record
            self.queue.put_nowait(record)
        except queue.Full:
            self.pending.pop(record["request_id"], None)
            DROPPED.labels("queue_full").inc()
            return False
        return True

    def _write(self) -> None:
        while not (self._stop.is_set() and self.queue.empty()):
            try:
                batch = [self.queue.get(timeout=0.1)]
            except queue.Empty:
                continue
            # Lingering makes one write per batch, not per impression: each write is an fsync (of the file log, or
            # of Redis's AOF, which under ``appendfsync always`` holds up every other client's reads meanwhile, the
            # request path's history reads included) and I/O that hands the GIL back and forth.
            self._stop.wait(self.config.linger_s)
            while len(batch) < self.config.batch:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self.store.append_impressions(batch)
                LOGGED.inc(len(batch))
            except StoreUnavailable as err:
                DROPPED.labels("store_unavailable").inc(len(batch))
                logger.warning("{} impressions dropped: {}", len(batch), err)
            except Exception:
                DROPPED.labels("store_unavailable").inc(len(batch))
                logger.opt(exception=True).error("impression writer failed; {} impressions dropped", len(batch))
            for record in batch:
                self.pending.pop(record["request_id"], None)
                self.queue.task_done()

    def find(self, request_id: str) -> dict | None:
        """An impression this process has queued but not yet written (the store does not know it yet)."""
        return self.pending.get(request_id)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every queued impression has been handed to the store (tests, shutdown)."""
        deadline = time.monotonic() + timeout_s
        while self.queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self.queue.unfinished_tasks

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
