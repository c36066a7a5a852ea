"""The online state stores: one behaviour suite run against each backend, then what is particular
to each (the file backend's snapshot + tail, Redis's trimmed stream and outages).

The behaviour tests take a ``make_store`` factory: calling it again gives a second store on the same
state (a restart, or another replica of the same deployment).
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from recsys.bundle import resolve
from recsys.state import files as store_module
from recsys.state.files import FileStateStore
from recsys.state.open import read_impressions, read_source
from recsys.state.protocol import AlreadyRecorded, Event, Once, StoreUnavailable, mark_of
from tests.servicekit import AUTH, unique_prefix

ITEM = {"item_id": "new", "title": "", "genres": [], "year": None, "features": {}}


@pytest.fixture(params=["file", "redis", "redis-cluster"])
def make_store(request, tmp_path):
    """``make_store(cap=...)``: a store of the parametrised backend on this test's state."""
    opened = []
    prefix = unique_prefix()

    def make(cap: int = 100, window_s: int = 86_400, **kw):
        if request.param == "file":  # one process owns the directory: the second store is a restart
            for earlier in opened:
                earlier.close()
            store = FileStateStore(tmp_path / "state", history_cap=cap, compact_after=kw.get("compact_after", 1000),
                                   idempotency_window_s=window_s)
        else:
            from recsys.state.redis import RedisStateStore

            url = request.getfixturevalue("redis_cluster_url" if request.param == "redis-cluster" else "redis_url")
            store = RedisStateStore(url, cap, prefix, idempotency_window_s=window_s, **kw)
        opened.append(store)
        return store

    make.backend = request.param
    yield make
    for store in opened:
        store.close()  # closing twice is harmless


def open_store(path: Path, cap: int = 100, compact_after: int = 1000) -> FileStateStore:
    return FileStateStore(path, history_cap=cap, compact_after=compact_after)


def histories(store: FileStateStore) -> dict[str, tuple[int, list[Event]]]:
    online, _ = store.state()
    return {u: (h.version, [e for _, e in h.events]) for u, h in online.users.items()}


# --------------------------------------------------------------------------- one behaviour, both backends
def test_events_are_kept_in_order_and_versioned(make_store):
    s = make_store()
    assert s.append_event("u1", Event("i1", 4.0, 10)) == 1
    assert s.append_event("u1", Event("i2", None, 11)) == 2
    assert s.append_event("u2", Event("i1", 1.5, 12)) == 1
    assert s.history("u1") == (2, [Event("i1", 4.0, 10), Event("i2", None, 11)])
    assert s.history("nobody") == (0, [])
    expected = s.history("u1")
    assert make_store().history("u1") == expected  # a restart, or another replica, sees the same


def test_events_read_back_in_order_and_history_skips_what_a_watermark_covers(make_store):
    s = make_store()
    recorded = [("u1", Event("i1", 4.0, 10)), ("u2", Event("i2", None, 11)), ("u1", Event("i3", 2.5, 12)),
                ("u3", Event("i1", 1.0, 13))]
    for user, event in recorded:
        s.append_event(user, event)
    logged = s.events_since()
    if make_store.backend == "redis-cluster":  # users on different shards: each user's events in order
        assert sorted((user, event) for _, user, event in logged) == sorted(recorded)
        assert [e for _, u, e in logged if u == "u1"] == [Event("i1", 4.0, 10), Event("i3", 2.5, 12)]
    else:
        assert [(user, event) for _, user, event in logged] == recorded
    positions = [at for at, _, _ in logged]
    assert positions == sorted(positions) and len(set(positions)) == 4
    watermark = mark_of(positions[:2])  # a bundle trained on the first two events read
    assert s.events_since(watermark) == logged[2:]
    for user in ("u1", "u2", "u3"):
        later = [e for _, u, e in logged[2:] if u == user]
        total = sum(u == user for u, _ in recorded)
        assert s.history(user, after=watermark) == (total, later)  # the version still counts them all
        assert make_store().history(user, after=watermark) == (total, later)  # kept across restarts
    assert s.events_since(mark_of(positions)) == []


def test_the_history_awaited_on_an_event_loop_is_the_same_read(make_store):
    """``history_async`` (what ``/recommend`` awaits) answers what ``history`` does, on any loop: each loop gets its
    own connections (a second ``asyncio.run`` is a second loop), and ``aclose`` releases the running loop's."""
    s = make_store(cap=3)
    for t in range(5):
        s.append_event(f"u{t % 2}", Event(f"i{t}", float(t), 10 + t))
    first_two = s.events_since()[:2]  # i0 and i1, except on a cluster where a tick of the clock between appends
    watermark = mark_of([at for at, _, _ in first_two])  # can list i2 (u0's shard) before i1: no common order
    reads = [("u0", None), ("u1", None), ("nobody", None), ("u0", watermark), ("u1", watermark)]

    async def read_all():
        try:
            return await asyncio.gather(*(s.history_async(user, after) for user, after in reads))
        finally:
            await s.aclose()

    expected = [s.history(user, after) for user, after in reads]
    assert expected[0] == (3, [Event("i0", 0.0, 10), Event("i2", 2.0, 12), Event("i4", 4.0, 14)])
    read_first = [event for _, _, event in first_two]
    assert expected[3][1] == [e for e in expected[0][1] if e not in read_first] != []
    assert asyncio.run(read_all()) == expected
    assert asyncio.run(read_all()) == expected


def test_history_is_capped_but_its_version_keeps_counting(make_store):
    s = make_store(cap=3)
    for t in range(5):
        s.append_event("u1", Event(f"i{t}", None, t))
    assert s.history("u1") == (5, [Event(f"i{t}", None, t) for t in (2, 3, 4)])
    assert make_store(cap=3).history("u1") == (5, [Event(f"i{t}", None, t) for t in (2, 3, 4)])


def test_catalogue_changes_fold_and_stream_in_order(make_store):
    s = make_store()
    start_fold, start = s.catalog()
    assert start_fold == {}
    first = s.append_changes([("new", ITEM)])
    second = s.append_changes([("i3", None)])
    third = s.append_changes([("new", {**ITEM, "title": "renamed"})])
    assert start < first < second < third
    assert s.changes_since(start) == [(first, "new", ITEM), (second, "i3", None), (third, "new", {**ITEM, "title": "renamed"})]
    assert s.changes_since(second) == [(third, "new", {**ITEM, "title": "renamed"})]
    assert s.changes_since(third) == []
    other = make_store()  # opened after the changes: reads the fold
    assert other.catalog() == ({"new": {**ITEM, "title": "renamed"}, "i3": None}, third)


def test_a_batch_of_changes_is_recorded_in_order_as_one_write(make_store):
    s = make_store()
    _, start = s.catalog()
    batch = [("a", {**ITEM, "item_id": "a"}), ("i3", None), ("a", {**ITEM, "item_id": "a", "title": "again"})]
    last = s.append_changes(batch)
    streamed = s.changes_since(start)
    assert [(item_id, item) for _, item_id, item in streamed] == batch and streamed[-1][0] == last
    assert [at for at, _, _ in streamed] == sorted({at for at, _, _ in streamed})  # each its own position, in order
    assert make_store().catalog() == ({"a": batch[2][1], "i3": None}, last)


def test_an_event_under_a_key_already_recorded_is_not_recorded_again(make_store):
    s = make_store()
    once = Once("evt-1", "digest-a", '{"position": 2, "reason": null}')
    assert s.append_event("u1", Event("i1", 4.0, 10), once) == 1
    with pytest.raises(AlreadyRecorded) as seen:
        s.append_event("u1", Event("i1", 4.0, 10), once._replace(answer="another answer"))
    assert (seen.value.digest, seen.value.answer, seen.value.version) == ("digest-a", '{"position": 2, "reason": null}', 1)
    assert s.append_event("u2", Event("i1", None, 11), once) == 1  # a key names one event of one user
    assert s.append_event("u1", Event("i2", None, 12)) == 2  # a write without a key is never held back
    again = make_store()  # a restart, or another replica
    with pytest.raises(AlreadyRecorded):
        again.append_event("u1", Event("i1", 4.0, 10), once)
    assert again.history("u1") == (2, [Event("i1", 4.0, 10), Event("i2", None, 12)])
    recorded = [(user, e.item_id) for _, user, e in again.events_since()]
    # (a cluster merges its shards' streams by time: two users' events within one millisecond in either order)
    assert sorted(recorded) == [("u1", "i1"), ("u1", "i2"), ("u2", "i1")]
    assert [r for r in recorded if r[0] == "u1"] == [("u1", "i1"), ("u1", "i2")]
    previous = again.previous_write("evt-1", "u1")
    assert (previous.digest, previous.answer, previous.version) == ("digest-a", '{"position": 2, "reason": null}', 2)
    assert again.previous_write("evt-1", "u3") is None and again.previous_write("evt-1") is None


def test_a_batch_under_a_key_already_recorded_is_not_recorded_again(make_store):
    s = make_store()
    _, start = s.catalog()
    batch = [("a", {**ITEM, "item_id": "a"}), ("b", {**ITEM, "item_id": "b"})]
    once = Once("batch-1", "digest-b", '{"items": ["a", "b"]}')
    s.append_changes(batch, once)
    later = s.append_changes([("a", None)])  # a change after it, which a blind retry would undo
    with pytest.raises(AlreadyRecorded) as seen:
        s.append_changes(batch, once)
    assert (seen.value.digest, seen.value.answer) == ("digest-b", '{"items": ["a", "b"]}')
    again = make_store()
    with pytest.raises(AlreadyRecorded):
        again.append_changes(batch, once)
    assert [item_id for _, item_id, _ in again.changes_since(start)] == ["a", "b", "a"]
    assert again.catalog() == ({"a": None, "b": batch[1][1]}, later)
    assert again.previous_write("batch-1").answer == '{"items": ["a", "b"]}'
    assert again.previous_write("batch-1", "u1") is None  # catalogue keys and a user's event keys are apart


def test_a_catalogue_key_never_meets_a_users_event_key(make_store):
    """Keys are the clients' own strings (any printable ASCII, ':' too): the catalogue's ``3:bob:k`` is not
    user bob's event key ``k``, in either order."""
    s = make_store()
    s.append_event("bob", Event("i1", None, 1), Once("k", "event-digest"))
    s.append_changes([("a", {**ITEM, "item_id": "a"})], Once("3:bob:k", "change-digest"))  # after the event's key
    s.append_changes([("b", {**ITEM, "item_id": "b"})], Once("3:bob:j", "change-digest"))
    assert s.append_event("bob", Event("i2", None, 2), Once("j", "event-digest")) == 2  # after the change's key
    assert set(s.catalog()[0]) == {"a", "b"}
    assert s.previous_write("3:bob:k").digest == "change-digest" and s.previous_write("k", "bob").digest == "event-digest"


def test_concurrent_retries_under_one_key_are_recorded_once(make_store):
    s = make_store()
    outcomes: list[object] = []

    def write():
        try:
            outcomes.append(s.append_event("u1", Event("i1", None, 1), Once("same", "d")))
        except AlreadyRecorded as seen:
            outcomes.append(f"seen at {seen.version}")

    threads = [threading.Thread(target=write) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(map(str, outcomes)) == ["1"] + ["seen at 1"] * 7
    assert s.history("u1") == (1, [Event("i1", None, 1)])


def test_keys_are_forgotten_after_the_window(make_store):
    s = make_store(window_s=1)
    once = Once("k", "d")
    s.append_event("u1", Event("i1", None, 1), once)
    s.append_changes([("a", {**ITEM, "item_id": "a"})], once)
    time.sleep(1.2)
    assert s.previous_write("k", "u1") is None and s.previous_write("k") is None
    assert s.append_event("u1", Event("i1", None, 1), once) == 2  # a new write now
    s.append_changes([("a", None)], once)
    assert s.catalog()[0] == {"a": None}


def test_the_file_backend_remembers_its_newest_keys_across_snapshots_and_restarts(tmp_path):
    s = FileStateStore(tmp_path, history_cap=10, compact_after=1000, idempotency_keys=3)
    for n in range(5):
        s.append_event("u1", Event("i1", None, n), Once(f"k{n}", "d"))
    assert [s.previous_write(f"k{n}", "u1") is not None for n in range(5)] == [False, False, True, True, True]
    s.compact()
    s.append_event("u1", Event("i1", None, 5), Once("k5", "d"))  # in the log's tail, after the snapshot
    s.close()
    again = FileStateStore(tmp_path, history_cap=10, compact_after=1000, idempotency_keys=3)
    assert [again.previous_write(f"k{n}", "u1") is not None for n in range(6)] == [False] * 3 + [True] * 3
    with pytest.raises(AlreadyRecorded):
        again.append_event("u1", Event("i1", None, 5), Once("k5", "d"))
    assert again.history("u1")[0] == 6


def test_a_healthy_store_says_so(make_store):
    assert make_store().health() is None


# --------------------------------------------------------------------------- file backend
def test_bad_records_are_skipped_counted_and_never_guessed(tmp_path, warnings):
    (tmp_path / "events.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"user_id": "u1", "item_id": "i1", "rating": 4, "timestamp": 1},
        {"user_id": "u1", "item_id": "i2", "rating": "bad", "timestamp": 2},
        {"user_id": "u1", "item_id": "i3", "rating": None, "timestamp": 2**70},
        [1, 2, 3],
        {"user_id": "u1", "item_id": "i4", "rating": None, "timestamp": 3},
    ]) + "\nnot json\n")
    (tmp_path / "catalog.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"op": "delete", "item_id": "i5"},  # an unknown op is not a removal
        {"op": "upsert", "item": {"item_id": "x", "year": "1999"}},
        {"op": "remove", "item_id": "i6"},
    ]) + "\n")
    s = open_store(tmp_path)
    assert histories(s) == {"u1": (2, [Event("i1", 4.0, 1), Event("i4", None, 3)])}
    assert s.catalog()[0] == {"i6": None}
    text = "\n".join(warnings)
    assert "skipped 4 bad records" in text and "rating 'bad'" in text
    assert "skipped 2 bad records" in text and "unknown op 'delete'" in text


def test_snapshot_covers_the_log_so_reopening_reads_only_the_tail(tmp_path, warnings):
    s = open_store(tmp_path, compact_after=10)
    for t in range(25):
        s.append_event(f"u{t % 3}", Event(f"i{t}", 1.0, t))
    s.compact()
    s.append_event("u0", Event("late", None, 99))
    expected = histories(s)
    covered = json.loads((tmp_path / "snapshot.json").read_text())["offsets"][0]
    s.close()
    log = tmp_path / "events.jsonl"
    data = log.read_bytes()
    log.write_bytes(b"x" * (covered - 1) + b"\n" + data[covered:])  # garbage where the snapshot covers
    assert histories(open_store(tmp_path, compact_after=10)) == expected
    assert not warnings


def test_compaction_runs_by_itself_after_enough_appends(tmp_path):
    s = open_store(tmp_path, compact_after=20)
    for t in range(45):
        s.append_event("u1", Event("i1", None, t))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        snap = tmp_path / "snapshot.json"
        if snap.exists() and json.loads(snap.read_text())["users"]["u1"][0] >= 20:
            break
        time.sleep(0.05)
    body = json.loads((tmp_path / "snapshot.json").read_text())
    assert body["users"]["u1"][0] >= 20 and body["offsets"][0] > 0


def test_a_long_tail_at_start_up_is_folded_into_a_snapshot(tmp_path):
    s = open_store(tmp_path, compact_after=1_000_000)
    for t in range(30):
        s.append_event("u1", Event("i1", None, t))
    s.close()
    open_store(tmp_path, compact_after=10)
    assert json.loads((tmp_path / "snapshot.json").read_text())["offsets"][0] == (tmp_path / "events.jsonl").stat().st_size


def test_a_snapshot_past_the_end_of_the_logs_is_ignored(tmp_path, warnings):
    s = open_store(tmp_path)
    s.append_event("u1", Event("i1", None, 1))
    s.compact()
    s.close()
    (tmp_path / "events.jsonl").write_text("")  # the logs were replaced: the snapshot describes other logs
    assert histories(open_store(tmp_path)) == {}
    assert any("past the end of the logs" in w for w in warnings)


def test_a_batch_a_crash_cut_short_is_not_recorded_at_all(tmp_path, warnings):
    """A crash in the middle of a batch's write leaves its first records whole and its last torn: none of the
    batch was acknowledged, so none of it is recorded after the restart (as on Redis, where a batch is one
    script), and what comes after it is read as usual."""
    s = open_store(tmp_path)
    s.append_changes([("kept", {**ITEM, "item_id": "kept"})])
    s.append_changes([(f"b{i}", {**ITEM, "item_id": f"b{i}"}) for i in range(3)], Once("batch", "d"))
    s.close()
    log = tmp_path / "catalog.jsonl"
    log.write_bytes(log.read_bytes()[:-20])
    s = open_store(tmp_path)
    assert set(s.catalog()[0]) == {"kept"} and s.previous_write("batch") is None
    assert any("a batch a crash cut short" in w for w in warnings)
    s.append_changes([("after", {**ITEM, "item_id": "after"})])
    assert [item_id for _, item_id, _ in s.changes_since((0, 0))] == ["kept", "after"]
    s.close()
    assert set(open_store(tmp_path).catalog()[0]) == {"kept", "after"}


def test_a_write_is_read_back_only_once_acknowledged(tmp_path, monkeypatch):
    """A change written but still in its fsync is not acknowledged: a reader must not apply it, for if the fsync
    fails the write is cut from the log, and the reader would stand past records acknowledged later."""
    s = open_store(tmp_path)
    p0 = s.catalog()[1]
    syncing, fail = threading.Event(), threading.Event()
    real_fsync = store_module.os.fsync

    def slow_then_failing_fsync(fd):
        syncing.set()
        fail.wait(10)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(store_module.os, "fsync", slow_then_failing_fsync)
    writer = threading.Thread(target=lambda: pytest.raises(StoreUnavailable, s.append_changes, [("b", {**ITEM, "item_id": "b"})]))
    writer.start()
    assert syncing.wait(10)
    assert s.changes_since(p0) == [] and s.events_since() == []
    fail.set()
    writer.join(10)
    monkeypatch.setattr(store_module.os, "fsync", real_fsync)
    s.append_changes([("c", {**ITEM, "item_id": "c"})])
    assert [item_id for _, item_id, _ in s.changes_since(p0)] == ["c"]


def test_a_failed_write_whose_cut_back_failed_too_is_repaired_by_the_next_write(tmp_path, monkeypatch):
    """A disk that refuses the fsync and then the reopening (gone read-only, say): 503s, never a log left closed
    for good (every later write a 500 while health said all was well)."""
    s = open_store(tmp_path)
    s.append_event("u1", Event("i1", None, 1))
    real_fsync, real_open = store_module.os.fsync, open

    def refusing_open(path, mode="r", *args, **kwargs):
        if mode == "r+b":
            raise OSError(30, "Read-only file system")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(store_module.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "Input/output error")))
    monkeypatch.setattr(store_module, "open", refusing_open, raising=False)
    for _ in range(2):
        with pytest.raises(StoreUnavailable, match="Input/output error|Read-only"):
            s.append_event("u1", Event("lost", None, 2))
        assert s.health() is not None
    monkeypatch.setattr(store_module.os, "fsync", real_fsync)
    monkeypatch.setattr(store_module, "open", real_open, raising=False)
    assert s.append_event("u1", Event("i2", None, 3)) == 2 and s.health() is None
    s.close()
    assert histories(open_store(tmp_path)) == {"u1": (2, [Event("i1", None, 1), Event("i2", None, 3)])}


def test_a_new_log_file_is_made_durable_in_its_directory(tmp_path, monkeypatch):
    synced: list[Path] = []
    monkeypatch.setattr(store_module, "_fsync_dir", lambda p: synced.append(Path(p)))
    open_store(tmp_path / "fresh").close()
    assert synced == [tmp_path / "fresh"] * 3  # store-id, events.jsonl, catalog.jsonl
    synced.clear()
    open_store(tmp_path / "fresh").close()
    assert synced == []


def test_a_reader_beside_the_service_reads_only_what_is_on_disk(tmp_path, monkeypatch):
    """A trainer reads the logs while the service appends (``read_source``): a record written but not yet fsynced
    is readable in the page cache, and a bundle whose watermark covered it would lie past the log's end after a
    host crash. The reader fsyncs each log and reads only what was written before: a record appended meanwhile
    (here, during that fsync) is left for the next read, in the events, the catalogue and the impressions."""
    store = open_store(tmp_path / "state")
    store.append_event("u1", Event("i1", None, 1))
    store.append_changes([("i1", {"item_id": "i1", "genres": []})])
    store.append_impressions([{"request_id": "r1", "user_id": "u1", "items": ["i1"], "ts_ms": 1}])
    fsync, synced = store_module.os.fsync, []

    def fsync_while_the_service_appends(fd: int) -> None:
        synced.append(fd)
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        last = path.read_bytes().splitlines()[-1]  # another record like the last: another item, another request
        with open(path, "ab") as f:
            f.write(last.replace(b'"i1"', b'"late"').replace(b'"r1"', b'"r2"') + b"\n")
        fsync(fd)

    monkeypatch.setattr(store_module.os, "fsync", fsync_while_the_service_appends)
    logged = read_source(str(tmp_path / "state"))
    impressions = read_impressions(str(tmp_path / "state"))
    monkeypatch.setattr(store_module.os, "fsync", fsync)
    assert len(synced) == 3
    assert [(user, e.item_id) for _, user, e in logged.events] == [("u1", "i1")] and set(logged.items) == {"i1"}
    assert [i["request_id"] for i in impressions] == ["r1"]
    later = read_source(str(tmp_path / "state"))  # the next read sees them
    assert [e.item_id for _, _, e in later.events] == ["i1", "late"] and set(later.items) == {"i1", "late"}
    store.close()


# --------------------------------------------------------------------------- through the service
# ``backend_start`` (tests/servicekit.py) serves on each backend; the tests on ``start`` are the file backend's own.
def test_changes_acknowledged_during_a_reload_are_applied_before_the_swap(backend_start, bundle_root):
    """The new engine folds the catalogue without the lock, then applies what was written meanwhile."""
    with backend_start() as client:
        state = client.app.state.service
        items, position = state.store.catalog()
        engine = state.build(bundle_root)
        engine.changes.load(items)
        assert client.post("/admin/items", json={"item_id": "during", "genres": ["genre1"]}, headers=AUTH).status_code == 200
        assert client.delete("/admin/items/i5", headers=AUTH).status_code == 200
        with state.follow_lock:
            state._apply(engine, position)
        assert engine.changes.require_item("during") == state.engine.changes.require_item("during")
        assert not engine.catalog.active[engine.catalog.row_of["i5"]]


def test_events_and_catalogue_survive_a_restart(backend_start):
    with backend_start() as client:
        assert client.post("/admin/items", json={"item_id": "kept", "genres": ["genre2"]}, headers=AUTH).status_code == 200
        assert client.delete("/admin/items/i4", headers=AUTH).status_code == 200
        for n in range(3):
            assert client.post("/events", json={"user_id": "walk-in", "item_id": f"i{n}"}).status_code == 200
        before = client.get("/recommend", params={"user_id": "walk-in", "k": 20}).json()["items"]
    with backend_start() as client:
        assert client.get("/recommend", params={"user_id": "walk-in", "k": 20}).json()["items"] == before
        assert client.get("/similar-items/kept").status_code == 200
        assert client.get("/similar-items/i4").status_code == 404
        assert client.post("/events", json={"user_id": "walk-in", "item_id": "kept"}).json()["history_length"] == 4


def test_bad_records_in_the_logs_do_not_stop_start_up(start, tmp_path):  # the file backend's logs, edited by hand
    state = tmp_path / "state"
    state.mkdir()
    (state / "events.jsonl").write_text(json.dumps({"user_id": "walk-in", "item_id": "i1", "rating": "bad", "timestamp": 1})
                                        + "\n" + json.dumps({"user_id": "walk-in", "item_id": "i2", "timestamp": 2}) + "\n")
    (state / "catalog.jsonl").write_text(json.dumps({"op": "drop", "item_id": "i3"}) + "\n")
    with start() as client:
        assert client.get("/similar-items/i3").status_code == 200  # not removed by an op nobody wrote
        assert client.post("/events", json={"user_id": "walk-in", "item_id": "i4"}).json()["history_length"] == 2


def test_restart_after_compaction_serves_the_same_state(start):  # the file backend's snapshot
    with start(compact_after="5", history_cap="50") as client:
        for n in range(12):
            assert client.post("/events", json={"user_id": "walk-in", "item_id": f"i{n}"}).status_code == 200
        client.post("/admin/items", json={"item_id": "kept", "genres": ["genre2"]}, headers=AUTH)
        client.app.state.service.store.compact()
        before = client.get("/recommend", params={"user_id": "walk-in", "k": 20}).json()["items"]
    with start(compact_after="5", history_cap="50") as client:
        assert client.get("/recommend", params={"user_id": "walk-in", "k": 20}).json()["items"] == before
        assert client.post("/events", json={"user_id": "walk-in", "item_id": "kept"}).json()["history_length"] == 13


# --------------------------------------------------------------------------- redis backend
def test_a_replica_whose_changes_were_trimmed_is_told_to_re_read_the_fold(redis_url):
    from recsys.state.redis import RedisStateStore

    s = RedisStateStore(redis_url, 10, unique_prefix())
    first = s.append_changes([("a", {**ITEM, "item_id": "a"})])
    s.append_changes([("b", {**ITEM, "item_id": "b"})])
    s.client.xtrim(f"{s.p}:catalog", maxlen=0, approximate=False)  # as if it had been trimmed while a replica lagged
    s.append_changes([("c", {**ITEM, "item_id": "c"})])
    with pytest.raises(LookupError, match="trimmed"):
        s.changes_since(first)
    fold, position = s.catalog()
    assert sorted(fold) == ["a", "b", "c"] and s.changes_since(position) == []


def test_history_reads_awaited_in_one_turn_go_to_a_single_redis_as_one_call(redis_url, monkeypatch):
    """Requests that arrive together on one worker ask for their histories in one turn of its loop: one script
    call reads them all (redis-py's cost per call is most of a read), more than ``READS_PER_CALL`` in several.
    Each gets its own history, as read alone; a request cancelled meanwhile leaves the others their answers."""
    import redis.asyncio

    from recsys.state import redis as redis_store

    s = redis_store.RedisStateStore(redis_url, 5, unique_prefix(), history_cache_bytes=0)  # (every read goes to Redis)
    users = [f"u{n}" for n in range(redis_store.READS_PER_CALL + 6)]
    for n, user in enumerate(users):
        for t in range(n % 7):
            s.append_event(user, Event(f"i{t}", float(t), 100 + t))
    calls = []
    real_eval = redis.asyncio.Redis.eval

    async def counted(client, script, numkeys, *keys):
        calls.append(numkeys // 2)
        return await real_eval(client, script, numkeys, *keys)

    monkeypatch.setattr(redis.asyncio.Redis, "eval", counted)

    async def read_together():
        try:
            reads = [asyncio.ensure_future(s.history_async(user)) for user in users + ["nobody"]]
            await asyncio.sleep(0)  # each has asked for its history: the call goes out in the loop's next turn
            reads[1].cancel()
            answers = await asyncio.gather(*reads, return_exceptions=True)
            alone = await s.history_async("u3")
            return answers, alone
        finally:
            await s.aclose()

    answers, alone = asyncio.run(read_together())
    assert calls == [redis_store.READS_PER_CALL, len(users) + 1 - redis_store.READS_PER_CALL, 1]
    assert isinstance(answers[1], asyncio.CancelledError)
    expected = [s.history(user) for user in users + ["nobody"]]
    assert answers[:1] + answers[2:] == expected[:1] + expected[2:] and alone == expected[3]
    assert expected[3] == (3, [Event(f"i{t}", float(t), 100 + t) for t in range(3)]) and expected[-1] == (0, [])
    s.close()


def test_a_write_no_replica_confirmed_gets_503_and_reads_go_on(redis_url):
    """Replicas that do not confirm a write (WAIT) say nothing about Redis answering: the write is refused (it may
    not survive a failover), but reads must not be cut off for the outage breaker's second as if Redis were down."""
    from recsys.state.redis import RedisStateStore

    s = RedisStateStore(redis_url, 100, unique_prefix(), wait_replicas=1)
    try:
        with pytest.raises(StoreUnavailable, match="0 of 1 replicas confirmed it"):
            s.append_event("u1", Event("i1", None, 1))
        assert s.history("u1") == (1, [Event("i1", None, 1)])  # on the master, unconfirmed: read as it is
        assert s.health() is None
    finally:
        s.close()


def test_a_retry_is_acknowledged_only_once_the_write_it_repeats_is_confirmed(tmp_path):
    """A write no replica confirmed got 503; its retry, through another replica's connection, must not be answered
    as an acknowledged replay while the write may still be lost with the master. (WAIT confirms what the caller's
    own connection last wrote: a connection that wrote nothing was confirmed at once.)"""
    import os
    import signal

    import redis as redis_py

    from recsys.state.redis import RedisStateStore
    from tests.servicekit import redis_server

    with redis_server(tmp_path / "master") as url, redis_server(tmp_path / "replica") as replica_url:
        master, replica = redis_py.Redis.from_url(url), redis_py.Redis.from_url(replica_url)
        replica.replicaof("127.0.0.1", int(url.rsplit(":", 1)[1].split("/")[0]))
        deadline = time.monotonic() + 10
        while master.execute_command("WAIT", 1, 100) < 1 and time.monotonic() < deadline:
            master.set("probe", "1")
        pid, prefix = replica.info("server")["process_id"], unique_prefix()
        os.kill(pid, signal.SIGSTOP)  # connected, confirming nothing
        try:
            first, retry = (RedisStateStore(url, 100, prefix, wait_replicas=1) for _ in range(2))
            with pytest.raises(StoreUnavailable, match="0 of 1 replicas"):
                first.append_event("u1", Event("i1", None, 1), Once("k", "d"))
            with pytest.raises(StoreUnavailable, match="0 of 1 replicas"):
                retry.append_event("u1", Event("i1", None, 1), Once("k", "d"))
            with pytest.raises(StoreUnavailable, match="0 of 1 replicas"):
                retry.previous_write("k", "u1")
            assert retry.previous_write("other", "u1") is None  # nothing recorded: nothing to confirm
        finally:
            os.kill(pid, signal.SIGCONT)
        with pytest.raises(AlreadyRecorded):  # the replica back: the retry is the replay of the write, recorded once
            retry.append_event("u1", Event("i1", None, 1), Once("k", "d"))
        assert retry.history("u1") == (1, [Event("i1", None, 1)])
        first.close()
        retry.close()


def test_a_clusters_shard_streams_keep_the_retention_between_them(redis_cluster_url):
    """The retention settings count a stream's entries; on a cluster the stream is split over shards, each trimmed
    to its share (approximately: Redis trims whole nodes of 100 entries)."""
    from recsys.state.redis import RedisStateStore

    s = RedisStateStore(redis_cluster_url, 100, unique_prefix(), shards=2, impression_retention=1000)
    try:
        for start in range(0, 3000, 500):
            s.append_impressions([{"request_id": f"r{i}", "user_id": "u", "items": []} for i in range(start, start + 500)])
        kept = [s.client.xlen(s.layout.impressions(shard)) for shard in range(2)]
        assert 1000 <= sum(kept) <= 1000 + 2 * 100 and all(n >= 500 for n in kept), kept
    finally:
        s.close()


def test_an_unreachable_redis_is_a_clear_store_unavailable(tmp_path):
    from recsys.state.redis import RedisStateStore

    from tests.servicekit import free_port

    port = free_port()
    s = RedisStateStore(f"redis://:hun@ter2@127.0.0.1:{port}/0?password=hunter3", 10, unique_prefix(), timeout_s=0.2)
    with pytest.raises(StoreUnavailable, match=f"cannot record the event: redis at redis://127.0.0.1:{port}/0 unavailable"):
        s.append_event("u1", Event("i1", None, 1))
    with pytest.raises(StoreUnavailable):
        s.history("u1")  # skipped at once for a while after a failure: reads fall back to the bundle
    with pytest.raises(StoreUnavailable):
        asyncio.run(s.history_async("u1"))  # the same breaker for the read awaited on the loop
    fresh = RedisStateStore(f"redis://127.0.0.1:{port}/0", 10, unique_prefix(), timeout_s=0.2)
    with pytest.raises(StoreUnavailable, match="cannot read the history: redis at .* unavailable"):
        asyncio.run(fresh.history_async("u1"))
    with pytest.raises(StoreUnavailable, match="^redis at "):  # the breaker's answer, without trying Redis again
        fresh.history("u1")  # the awaited read's failure trips the breaker too
    assert "unavailable" in s.health() and "hun@ter2" not in s.health() and "hunter3" not in s.health()


def test_a_second_process_cannot_take_the_file_backends_directory(tmp_path):
    first = open_store(tmp_path)
    with pytest.raises(OSError, match="in use by another process.*RECSYS_STATE_BACKEND=redis"):
        open_store(tmp_path)
    first.close()
    open_store(tmp_path).close()  # free again once the owner closed it


def test_a_bundle_trained_up_to_a_watermark_does_not_count_those_events_again(backend_start, own_root):
    """Events up to the manifest's watermark (from this same store) are in the bundle's history: the online
    history starts after them. A watermark from another store is ignored."""
    vdir = own_root / "with-watermark"
    shutil.copytree(resolve(own_root), vdir)
    with backend_start(bundle_dir=own_root) as client:
        state = client.app.state.service
        for item in ("i1", "i2"):
            assert client.post("/events", json={"user_id": "walk-in", "item_id": item}).status_code == 200
        watermark = mark_of([at for at, _, _ in state.store.events_since()])
        for source, answer in ((state.store.source + "-elsewhere", 200), (state.store.source, 404)):
            manifest = json.loads((vdir / "manifest.json").read_text())
            manifest["version"] = f"with-watermark-{answer}"
            manifest["events_watermark"] = {"source": source, "position": list(watermark)}
            (vdir / "manifest.json").write_text(json.dumps(manifest))
            assert client.post("/admin/reload", json={"version": "with-watermark"}, headers=AUTH).status_code == 200
            # 404: both events are (as if) in the bundle, which does not know this user: nothing online is left
            assert client.get("/recommend", params={"user_id": "walk-in"}).status_code == answer
        assert client.post("/events", json={"user_id": "walk-in", "item_id": "i3"}).status_code == 200
        assert client.get("/recommend", params={"user_id": "walk-in"}).status_code == 200


def test_a_failed_start_releases_the_state_directory(start, tmp_path):  # the file backend's directory lock
    empty = tmp_path / "no-bundle"
    empty.mkdir()
    with pytest.raises(RuntimeError, match="cannot start"):
        with start(bundle_dir=empty, state_dir=tmp_path / "state"):
            pass
    open_store(tmp_path / "state").close()  # not left locked by the failed start


def test_a_state_directory_recreated_at_the_same_path_is_another_store(tmp_path):
    """Offsets start over in a new directory: a watermark from the old one must not apply to it."""
    first = open_store(tmp_path / "s")
    source = first.source
    first.close()
    assert open_store(tmp_path / "s").source == source  # the same directory, reopened: the same store
    shutil.rmtree(tmp_path / "s")
    assert open_store(tmp_path / "s").source != source


class _ClosingClient:
    """An asyncio client whose first ``failures`` calls meet a connection closed under them (redis-py #3546)."""

    def __init__(self, failures: int, error: Exception):
        self.failures, self.error, self.calls = failures, error, 0

    async def eval(self, script, n, *keys):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return [b"2", b"[]"] * (n // 2)


@pytest.mark.parametrize("coalesce", [True, False])
def test_a_history_read_whose_connection_was_closed_under_it_is_sent_again_then_is_a_connection_error(coalesce):
    from redis import ConnectionError as RedisConnectionError

    from recsys.state.redis import _LoopReads

    closed = AttributeError("'NoneType' object has no attribute 'writelines'")
    once = _LoopReads(_ClosingClient(1, closed), coalesce)
    assert tuple(asyncio.run(once.read("ver", "hist"))) == (b"2", b"[]") and once.client.calls == 2
    twice = _LoopReads(_ClosingClient(2, closed), coalesce)
    with pytest.raises(RedisConnectionError, match="connection closed while in use"):
        asyncio.run(twice.read("ver", "hist"))
    ours = _LoopReads(_ClosingClient(1, AttributeError("'list' object has no attribute 'x'")), coalesce)
    with pytest.raises(AttributeError):  # a bug of its own is not retried nor disguised
        asyncio.run(ours.read("ver", "hist"))
    assert ours.client.calls == 1
