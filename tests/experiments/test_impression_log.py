"""The impression writer: off the request path, bounded, dropping and counting under overload; and the
impression log on each backend (retention, the join lookup, restarts)."""
from __future__ import annotations

import threading
import time

import pytest

from recsys.impressions import DROPPED, ImpressionConfig, ImpressionLog, join
from recsys.errors import InvalidInput
from recsys.state.files import FileStateStore
from recsys.state.protocol import Event
from tests.servicekit import unique_prefix, redis_url  # noqa: F401


def impression(i: int, ts_ms: int | None = None, user: str = "u1") -> dict:
    return {"request_id": f"r{i}", "user_id": user, "ts_ms": int(time.time() * 1000) if ts_ms is None else ts_ms,
            "assignments": {}, "items": ["a", "b", "c"], "scores": [3.0, 2.0, 1.0]}


class StuckStore:
    """A store whose writes hang until released: an overloaded or unreachable backend."""

    def __init__(self):
        self.release, self.written = threading.Event(), []

    def append_impressions(self, records):
        self.release.wait()
        self.written.extend(records)


def test_a_stuck_store_drops_and_counts_impressions_instead_of_holding_requests():
    store = StuckStore()
    log = ImpressionLog(store, ImpressionConfig(queue_size=2, batch=1))
    before = DROPPED.labels("queue_full")._value.get()
    accepted = sum(log.offer(impression(i)) for i in range(10))  # returns at once: offer never waits
    assert accepted <= 3  # two queued, perhaps one more already taken by the (stuck) writer
    assert DROPPED.labels("queue_full")._value.get() - before == 10 - accepted
    store.release.set()
    assert log.flush()
    assert [r["request_id"] for r in store.written] == [f"r{i}" for i in range(accepted)]
    log.close()


def test_sampling_logs_the_stated_share():
    store = StuckStore()
    store.release.set()
    log = ImpressionLog(store, ImpressionConfig(sample=0.25, queue_size=10_000))
    for i in range(4000):
        log.offer(impression(i))
    assert log.flush()
    assert abs(len(store.written) / 4000 - 0.25) < 0.04
    log.close()


def test_the_join_rule_by_hand():
    shown = impression(1, ts_ms=1_000_000)
    assert join(shown, "u1", "b", None, 1000, 60).position == 2
    assert join(shown, "u1", "b", 2, 1060, 60).position == 2
    assert join(shown, "u1", "b", None, 1061, 60).reason.startswith("more than 60 s")
    assert join(shown, "u2", "b", None, 1000, 60).reason == "the impression was shown to another user"
    assert join(shown, "u1", "z", None, 1000, 60).reason == "the item was not part of the impression"
    assert join(None, "u1", "b", None, 1000, 60).position is None
    with pytest.raises(InvalidInput, match="showed 'b' at position 2, not 1"):
        join(shown, "u1", "b", 1, 1000, 60)


@pytest.fixture(params=["file", "redis"])
def open_impressions(request, tmp_path):
    """``open_impressions(retention, window_s)`` -> a store on each backend (the same state when called again)."""
    stores = []
    prefix = unique_prefix()

    def open_(retention: int = 1000, window_s: int = 1800):
        if request.param == "file":
            store = FileStateStore(tmp_path, 10, 1000, retention, window_s)
        else:
            from recsys.state.redis import RedisStateStore

            store = RedisStateStore(request.getfixturevalue("redis_url"), 10, prefix, impression_retention=retention,
                                    feedback_window_s=window_s)
        stores.append(store)
        return store

    yield open_
    for s in stores:
        s.close()


def test_impressions_are_found_by_request_id_and_survive_a_restart(open_impressions):
    store = open_impressions()
    store.append_impressions([impression(i) for i in range(5)])
    assert store.impression("r3")["request_id"] == "r3" and store.impression("nope") is None
    store.close()
    again = open_impressions()
    assert again.impression("r4")["user_id"] == "u1"
    assert [r["request_id"] for r in again.impressions_since(0)] == [f"r{i}" for i in range(5)]


def test_impressions_beyond_the_retention_are_dropped_oldest_first(open_impressions):
    store = open_impressions(retention=100)
    for start in range(0, 1000, 50):
        store.append_impressions([impression(i) for i in range(start, start + 50)])
    kept = [r["request_id"] for r in store.impressions_since(0)]
    assert 90 <= len(kept) <= 250 and kept[-1] == "r999"  # Redis trims approximately (whole macro-nodes)
    assert kept == [f"r{i}" for i in range(1000 - len(kept), 1000)]


def test_impressions_since_is_by_the_time_the_serving_replica_stamped(open_impressions):
    """``since`` means an impression's own ``ts_ms`` on every backend. Redis's stream ids carry Redis's clock:
    a replica whose clock runs 5 s ahead of it logged impressions that an experiment started on that replica
    a moment earlier must still count (they were missing from its report), and so must the feedback on them."""
    store = open_impressions()
    now = int(time.time() * 1000)
    store.append_impressions([impression(1, ts_ms=now - 3_000), impression(2, ts_ms=now + 5_000),
                              impression(3, ts_ms=now + 6_000)])
    assert [r["request_id"] for r in store.impressions_since(now + 5_000)] == ["r2", "r3"]
    assert [r["request_id"] for r in store.impressions_since(now - 3_000)] == ["r1", "r2", "r3"]
    store.append_event("u1", Event("b", None, now // 1000, "click", "r2", 2))  # feedback on r2, a moment later
    assert [(user, e.request_id) for user, e in store.feedback_since(now + 5_000)] == [("u1", "r2")]


def test_an_impression_older_than_the_feedback_window_is_not_found(open_impressions):
    store = open_impressions(window_s=1)
    store.append_impressions([impression(1)])
    assert store.impression("r1") is not None
    time.sleep(2.1)
    assert store.impression("r1") is None
