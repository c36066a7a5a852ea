"""Durable online state in a local directory: fsynced JSON-lines logs plus a compact snapshot.

The logs (``events.jsonl``, ``catalog.jsonl``) are the full acknowledged history: a record is
acknowledged only once fsynced, and the logs are never rewritten, so the trainer can read every
event. Serving needs far less than the history: each user's last ``history_cap`` events and each
item's latest catalogue state. ``OnlineState`` is that fold; ``snapshot.json`` stores it with the
log offsets it covers, so start-up and reload read the snapshot plus the short tail after it, and
their cost stays bounded however long the service has run.

Records that cannot be applied (a bad field value, an unknown operation) are skipped and counted
with a warning, never guessed at.

``FileStateStore`` is one of the two backends of ``recsys.state.protocol.StateStore`` (the other is
``recsys.state.redis.RedisStateStore``, for replicas sharing state); nothing above the store asks which
one it has, and one behaviour suite runs against each.
"""
from __future__ import annotations

import fcntl
import os
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from loguru import logger

from recsys.state.protocol import (AlreadyRecorded, Change, Event, Once, Position, StoreUnavailable, parse_change,
                                   parse_event)

SNAPSHOT = "snapshot.json"


@dataclass
class UserHistory:
    """A user's most recent online events (oldest first) and how many were ever recorded: the count
    keeps growing after the cap, so it versions the history for the user-vector cache."""

    version: int = 0
    events: deque[tuple[Position, Event]] = field(default_factory=deque)  # (where it was recorded, event)


class OnceKeys:
    """The idempotency keys of the last ``window_s`` seconds, at most ``limit`` of them (past that, the oldest are
    forgotten first: memory stays bounded whatever the write rate): ``(scope, key) -> [digest, answer, at_ms]``,
    the scope being the user for an event and None for a catalogue change."""

    def __init__(self, window_s: int = 86_400, limit: int = 200_000):
        self.window_ms, self.limit = window_s * 1000, limit
        self.keys: OrderedDict[tuple[str | None, str], tuple[str, str, int]] = OrderedDict()

    def seen(self, scope: str | None, key: str) -> tuple[str, str] | None:
        """The digest and answer stored under the key, while within the window."""
        entry = self.keys.get((scope, key))
        return entry[:2] if entry is not None and entry[2] >= _now_ms() - self.window_ms else None

    def add(self, scope: str | None, key: str, digest: str, answer: str, at_ms: int) -> None:
        self.keys[(scope, key)] = (digest, answer, at_ms)
        self.keys.move_to_end((scope, key))  # an expired key used again is new: it goes last
        horizon = _now_ms() - self.window_ms
        while self.keys and (len(self.keys) > self.limit or next(iter(self.keys.values()))[2] < horizon):
            self.keys.popitem(last=False)

    def copy(self) -> "OnceKeys":
        out = OnceKeys(self.window_ms // 1000, self.limit)
        out.keys = OrderedDict(self.keys)
        return out

    def dump(self) -> list[list]:
        return [[scope, key, *entry] for (scope, key), entry in self.keys.items()]


@dataclass
class OnlineState:
    """What serving needs from the logs: capped per-user histories, each changed item's latest state (an
    ``ItemUpsert`` dump, or ``None`` once removed) in first-change order, and the recent idempotency keys."""

    history_cap: int
    users: dict[str, UserHistory] = field(default_factory=dict)
    items: dict[str, dict | None] = field(default_factory=dict)
    once: OnceKeys = field(default_factory=OnceKeys)

    def add_event(self, user_id: str, event: Event, position: Position) -> int:
        history = self.users.setdefault(user_id, UserHistory(events=deque(maxlen=self.history_cap)))
        history.events.append((position, event.interaction))
        history.version += 1
        return history.version

    def add_change(self, item_id: str, item: dict | None) -> None:
        self.items[item_id] = item

    def copy(self) -> "OnlineState":
        users = {u: UserHistory(h.version, deque(h.events, maxlen=self.history_cap)) for u, h in self.users.items()}
        return OnlineState(self.history_cap, users, dict(self.items), self.once.copy())


class DurableLog:
    """An append-only JSON-lines file; ``append`` returns only once the record is on disk."""

    def __init__(self, path: Path):
        created = not path.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        _drop_torn_tail(path)
        self._file = open(path, "ab")
        if created:  # the new directory entry must survive a power loss too, not only the bytes
            _fsync_dir(path.parent)

        self.acked = self._file.tell()  # the end of the last record known to be on disk


    @property
    def size(self) -> int:
        return self.acked

    def append(self, records: list[dict]) -> int:
        """Write, flush and fsync records (one fsync for them all); returns the offset just past them. If any step
        fails, the file is cut back to the last acknowledged record before ``StoreUnavailable`` is raised: a failed
        write must not surface later (a buffered flush, a retry's duplicate) or be read back by ``read_valid``."""
        try:
            if self._file.closed:  # an earlier failure could not cut its write back: that first
                self._cut_back()
            self._file.write(b"".join(orjson.dumps(record) + b"\n" for record in records))
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as err:
            try:
                self._cut_back()
            except OSError:  # (a disk gone read-only, say): the log stays closed, the next append cuts it first
                pass
            raise StoreUnavailable(f"{self.path}: cannot write ({err.strerror or err})") from err
        self.acked = self._file.tell()
        return self.acked

    def _cut_back(self) -> None:
        """Drop whatever the failed append left in the buffer or the file, then reopen for appending."""
        try:
            self._file.close()  # may retry the buffered bytes and fail again: they are cut below either way
        except OSError:
            pass
        with open(self.path, "r+b") as f:
            f.truncate(self.acked)
            try:
                os.fsync(f.fileno())
            except OSError:  # the cut is in the page cache; a torn tail after a crash is cut at the next open
                pass
        self._file = open(self.path, "ab")

    def cut_to(self, offset: int) -> None:
        """Drop every byte past ``offset`` (never acknowledged) before anything is appended."""
        self.acked = offset
        self._cut_back()

    def close(self) -> None:
        self._file.close()


def store_id(state_dir: Path) -> str:
    """This state's identity, made once and kept in the directory: a watermark names it, so a directory
    wiped and recreated at the same path (offsets starting over) is another store, not the same one."""
    path = state_dir / "store-id"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(uuid.uuid4().hex)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(state_dir)
    return path.read_text().strip()


def read_event_log(state_dir: Path, after: Position | None = None, acked: int | None = None) -> list[tuple[Position, str, Event]]:
    """The events in a file-backend state directory after ``after``, with their positions, up to ``acked`` where the
    reader is the store, else up to what is on disk (``durable_end``): read without taking the directory, as a
    trainer reads it while the service appends."""
    path = state_dir / "events.jsonl"
    end = acked if acked is not None else durable_end(path)
    return [((at, 0), user, event) for at, (user, event) in read_valid(path, after[0] if after else 0, parse_event, end)]


def read_catalog_log(state_dir: Path) -> dict[str, dict | None]:
    """The catalogue fold of a file-backend state directory (each changed item's latest state) as far as it is on
    disk, read without taking the directory."""
    path = state_dir / "catalog.jsonl"
    return {item_id: item for _, (item_id, item) in read_changes(path, 0, parse_change, durable_end(path))}


def durable_end(path: Path) -> int:
    """How far a reader that does not own the log may read it: its size before an fsync of it, so that every byte
    read is on disk. A record the service has written but not yet fsynced is readable in the page cache; a trainer
    that read it, and wrote its position into a bundle's watermark, would leave the bundle past the log's end if the
    host then crashed, and the service would skip the next events recorded as if the bundle held them. 0: no file
    yet (nor anything to read in one made meanwhile)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return 0
    try:
        end = os.fstat(fd).st_size
        try:
            os.fsync(fd)
        except OSError as err:  # (a file system that refuses fsync on a read-only descriptor): read as it stands
            logger.warning("{}: cannot fsync before reading ({}); a record not yet on disk may be read", path, err)
        return end
    finally:
        os.close(fd)


def read_changes(path: Path, offset: int, parse, end: int | None = None) -> list[tuple[int, Any]]:
    """``read_valid`` of a catalogue log, whole batches only: each record of a batch but its last is marked
    ``"more"``, and the records of a batch whose last is missing (being written, or torn by a crash, which also
    left the key on it unwritten) are not read: a batch is made live whole, or not at all, as on Redis."""
    out, batch = [], []
    for at, (change, more) in read_valid(path, offset, lambda record: (parse(record), record.get("more") is True), end):
        batch.append((at, change))
        if not more:
            out += batch
            batch = []
    return out


def read_impression_log(state_dir: Path) -> list[dict]:
    """Every retained impression of a state directory, oldest first (read without taking the store: a torn
    last line of a segment being written is skipped, not cut)."""
    segments = sorted((p for p in (state_dir / "impressions").glob("*.jsonl") if p.stem.isdigit()), key=lambda p: int(p.stem))
    return [record for path in segments for _, record in read_valid(path, 0, _impression, durable_end(path))]


def _unfinished_batch(path: Path, offset: int) -> int | None:
    """Where the log's last batch starts if the log ends before that batch's last record (a crash mid-write)."""
    start, line_start = None, offset
    for end, more in read_valid(path, offset, lambda record: isinstance(record, dict) and record.get("more") is True):
        start = (line_start if start is None else start) if more else None
        line_start = end
    return start


def read_valid(path: Path, offset: int, parse, end: int | None = None) -> list[tuple[int, Any]]:
    """``(offset just past the line, parsed record)`` for each complete line after ``offset`` (and up to ``end``:
    what the store has acknowledged, when it is the reader) that parses; the others are counted and logged (with
    their offsets) and skipped. A line still being appended (no newline yet) is not read: it is not acknowledged."""
    if not path.exists():
        return []
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(-1 if end is None else max(0, end - offset))
    out, bad, end = [], [], offset
    for line in data[: data.rfind(b"\n") + 1].splitlines(keepends=True):
        end += len(line)
        try:
            out.append((end, parse(orjson.loads(line))))
        except (ValueError, AttributeError) as err:  # JSONDecodeError is a ValueError; AttributeError: not an object
            bad.append(f"record ending at byte {end}: {err}")
    if bad:
        logger.warning("{}: skipped {} bad records (first: {})", path, len(bad), "; ".join(bad[:3]))
    return out


class FileStateStore:
    """The embedded backend: ``state_dir`` holds the two logs and the snapshot; one process owns it.

    Known limit: ``state()`` (for a snapshot) copies the whole fold under ``lock``, O(users x their
    capped events), which briefly holds up reads of large states; deployments that large belong on Redis.

    The fold of both logs lives in memory (``history`` reads it, no I/O); a catalogue position is the
    catalogue log's offset just past a record. ``compact_after`` appended records trigger a snapshot
    on a background thread; a start-up that finds a long tail writes one at once.
    """

    def __init__(self, state_dir: Path, history_cap: int, compact_after: int, impression_retention: int = 1_000_000,
                 feedback_window_s: int = 1800, idempotency_window_s: int = 86_400, idempotency_keys: int = 200_000):
        self.dir = state_dir
        self.once_limits = (idempotency_window_s, idempotency_keys)
        self._owner = _lock_dir(state_dir)
        self.id = store_id(state_dir)
        self.events = DurableLog(state_dir / "events.jsonl")
        self.catalog_log = DurableLog(state_dir / "catalog.jsonl")
        self.write_lock = threading.Lock()  # orders appends; held through the fsync
        self.failure: str | None = None
        self.lock = threading.Lock()  # guards the fold; never held through I/O, so reads never wait for an fsync
        self.compact_after = compact_after
        self._compacting = threading.Lock()
        self.online, (events_at, catalog_at) = self._read_snapshot(history_cap)
        if (cut := _unfinished_batch(self.catalog_log.path, catalog_at)) is not None:
            logger.warning("{}: dropping a batch a crash cut short ({} bytes, never acknowledged)", self.catalog_log.path,
                           self.catalog_log.size - cut)
            self.catalog_log.cut_to(cut)
        changes = read_changes(self.catalog_log.path, catalog_at, _with_once(parse_change))
        events = read_valid(self.events.path, events_at, _with_once(parse_event))
        for _, (change, once) in changes:
            self.online.add_change(*change)
            if once:
                self.online.once.add(None, *once)
        for end, ((user, event), once) in events:
            self.online.add_event(user, event, (end, 0))
            if once:
                self.online.once.add(user, *once)
        self.offsets = (self.events.size, self.catalog_log.size)
        self.since_snapshot = len(changes) + len(events)
        if self.since_snapshot >= compact_after:
            self.compact()
        self.impressions = ImpressionSegments(state_dir / "impressions", impression_retention, feedback_window_s)
        self._experiments = ExperimentFile(state_dir / "experiments.json")

    # ------------------------------------------------------------------ the interface
    def append_event(self, user_id: str, event: Event, once: Once | None = None) -> int:
        """An event with a key carries it in its log record: the key is as durable as the event, and a start-up
        that replays the log remembers it again."""
        record = event.record(user_id)
        with self.write_lock:
            if once is not None:
                self._refuse_seen(user_id, once.key)
                record["once"] = [once.key, once.digest, once.answer, _now_ms()]
            end = self._append(self.events, [record])  # durable before anyone can read it
            with self.lock:
                version = self.online.add_event(user_id, event, (end, 0))
                if once is not None:
                    self.online.once.add(user_id, *record["once"])
                self.offsets = (end, self.offsets[1])
            self._count_append()
        return version

    def history(self, user_id: str, after: Position | None = None) -> tuple[int, list[Event]]:
        with self.lock:
            h = self.online.users.get(user_id)
            if h is None:
                return 0, []
            return h.version, [e for at, e in h.events if after is None or at > after]

    async def history_async(self, user_id: str, after: Position | None = None) -> tuple[int, list[Event]]:
        """The fold is in memory and its lock is never held through I/O: read at once, on the loop."""
        return self.history(user_id, after)

    async def aopen(self) -> None:
        """Nothing is bound to an event loop here."""

    async def aclose(self) -> None:
        """Nothing is bound to an event loop here."""

    def events_since(self, after: Position | None = None) -> list[tuple[Position, str, Event]]:
        """What is acknowledged: a record written but still in its fsync is not (it is cut if the fsync fails)."""
        with self.lock:
            acked = self.offsets[0]
        return read_event_log(self.dir, after, acked)

    def append_changes(self, changes: list[tuple[str, dict | None]], once: Once | None = None) -> Position:
        """A key rides on the batch's last record: a crash that tears the batch cuts the key with it, and the
        batch's other records, marked ``more``, are not read without their last (``read_changes``)."""
        records = [{"op": "upsert", "item": item} if item is not None else {"op": "remove", "item_id": item_id}
                   for item_id, item in changes]
        for record in records[:-1]:
            record["more"] = True  # (the batch goes on: see ``read_changes``)
        with self.write_lock:
            if once is not None:
                self._refuse_seen(None, once.key)
                records[-1]["once"] = [once.key, once.digest, once.answer, _now_ms()]
            end = self._append(self.catalog_log, records)
            with self.lock:
                for item_id, item in changes:
                    self.online.add_change(item_id, item)
                if once is not None:
                    self.online.once.add(None, *records[-1]["once"])
                self.offsets = (self.offsets[0], end)
            self._count_append(len(records))
        return (end, 0)

    def previous_write(self, key: str, user_id: str | None = None) -> AlreadyRecorded | None:
        with self.lock:
            seen = self.online.once.seen(user_id, key)
            history = self.online.users.get(user_id) if user_id is not None else None
        return None if seen is None else AlreadyRecorded(*seen, version=history.version if history else 0)

    def _refuse_seen(self, scope: str | None, key: str) -> None:
        """Raise ``AlreadyRecorded`` for a key within the window (called under ``write_lock``, which every write of
        the keys holds, so the check and the write that follows are one step)."""
        seen = self.previous_write(key, scope)
        if seen is not None:
            raise seen

    def catalog(self) -> tuple[dict[str, dict | None], Position]:
        with self.lock:
            return dict(self.online.items), (self.offsets[1], 0)

    def changes_since(self, position: Position, wait_s: float = 0.0) -> list[Change]:
        """No waiting: in one process every change is appended by the caller itself. Only what is acknowledged: a
        batch still in its fsync is not (if the fsync fails, it is cut, and a reader that had applied it would
        stand past the end of the log)."""
        with self.lock:
            acked = self.offsets[1]
        return [((end, 0), item_id, item)
                for end, (item_id, item) in read_changes(self.catalog_log.path, position[0], parse_change, acked)]

    # ------------------------------------------------------------------ impressions and experiments
    def append_impressions(self, records: list[dict]) -> None:
        self.impressions.append(records)

    def impression(self, request_id: str) -> dict | None:
        return self.impressions.find(request_id)

    def impressions_since(self, since_ms: int) -> list[dict]:
        return self.impressions.since(since_ms)

    def feedback_since(self, since_ms: int) -> list[tuple[str, Event]]:
        """The whole log is read: its positions are byte offsets, not times (the join drops older feedback)."""
        return [(user, event) for _, user, event in self.events_since() if event.request_id is not None]

    def experiments(self) -> dict[str, dict]:
        return self._experiments.read()

    def put_experiment(self, name: str, record: dict) -> None:
        self._experiments.put(name, record)

    def delete_experiment(self, name: str) -> bool:
        return self._experiments.delete(name)

    def health(self) -> str | None:
        """Why the latest append failed, until one succeeds."""
        return self.failure

    def _append(self, log: DurableLog, records: list[dict]) -> int:
        """``log.append`` under ``write_lock``, remembering a failure for ``health``."""
        try:
            end = log.append(records)
        except StoreUnavailable as err:
            self.failure = str(err)
            raise
        self.failure = None
        return end

    @property
    def source(self) -> str:
        return f"file:{self.id}"

    # ------------------------------------------------------------------ snapshot
    def state(self) -> tuple[OnlineState, tuple[int, int]]:
        """A copy of the fold and the (events, catalogue) log offsets it covers, taken under ``lock``."""
        with self.lock:
            return self.online.copy(), self.offsets

    def compact(self) -> None:
        """Write the fold and its offsets to ``snapshot.json`` atomically (temp file, fsync, rename, fsync dir)."""
        with self._compacting:
            state, offsets = self.state()
            body = {"offsets": list(offsets), "history_cap": state.history_cap, "items": state.items, "once": state.once.dump(),
                    "users": {u: [h.version, [[*at, *e] for at, e in h.events]] for u, h in state.users.items()}}
            tmp = self.dir / f".{SNAPSHOT}.tmp"
            with open(tmp, "wb") as f:
                f.write(orjson.dumps(body))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.dir / SNAPSHOT)
            _fsync_dir(self.dir)
            logger.info("state snapshot written: {} users, {} changed items, offsets {}", len(state.users),
                        len(state.items), offsets)

    def _count_append(self, records: int = 1) -> None:
        self.since_snapshot += records
        if self.since_snapshot >= self.compact_after and not self._compacting.locked():
            self.since_snapshot = 0
            threading.Thread(target=self._compact_quietly, name="state-compaction", daemon=True).start()

    def _compact_quietly(self) -> None:
        try:
            self.compact()
        except OSError as err:  # the logs still hold everything; the next trigger tries again
            logger.warning("state snapshot failed: {}", err)

    def _read_snapshot(self, history_cap: int) -> tuple[OnlineState, tuple[int, int]]:
        """The stored fold, or an empty one at offset 0 when there is none (or it cannot be trusted)."""
        path = self.dir / SNAPSHOT
        state = OnlineState(history_cap, once=OnceKeys(*self.once_limits))
        if not path.exists():
            return state, (0, 0)
        try:
            body = orjson.loads(path.read_bytes())
            offsets = (int(body["offsets"][0]), int(body["offsets"][1]))
            if offsets[0] > self.events.size or offsets[1] > self.catalog_log.size:
                raise ValueError("offsets past the end of the logs (logs replaced?)")
            for user, (version, events) in body["users"].items():
                pairs = (((int(e[0]), int(e[1])), Event(*e[2:])) for e in events)  # [offset, 0, item, rating, ts]
                state.users[user] = UserHistory(int(version), deque(pairs, maxlen=history_cap))
            state.items = dict(body["items"])
            for scope, key, digest, answer, at_ms in body.get("once", []):  # absent in snapshots of older versions
                state.once.add(scope, key, digest, answer, int(at_ms))
        except (ValueError, KeyError, TypeError, orjson.JSONDecodeError) as err:
            logger.warning("{}: ignored ({}); replaying the logs from the start", path, err)
            return OnlineState(history_cap, once=OnceKeys(*self.once_limits)), (0, 0)
        return state, offsets

    def close(self) -> None:
        with self._compacting:  # a snapshot being written finishes before the directory is released
            self.events.close()
            self.catalog_log.close()
            self.impressions.close()
            self._owner.close()  # releases the lock


class ImpressionSegments:
    """Impressions in numbered JSON-lines segments of ``retention // 10`` records: when the retained records
    pass ``retention``, the oldest segment is deleted (so between 90% and 100% of ``retention`` are kept). A
    batch is written and fsynced together; impressions are measurements, not acknowledged writes, and a
    crash may cut the batch being written (a torn last line is dropped at the next start).

    The impressions of the last ``window_s`` seconds are also kept in memory by request id (at most
    ``retention`` of them), for joining feedback; a start reads them back from the newest segments."""

    def __init__(self, directory: Path, retention: int, window_s: int):
        directory.mkdir(parents=True, exist_ok=True)
        self.dir, self.window_s = directory, window_s
        self.per_segment = max(1, retention // 10)
        self.max_segments = max(1, retention // self.per_segment)
        self.lock = threading.Lock()
        self.recent: OrderedDict[str, dict] = OrderedDict()
        self.segments = sorted(int(p.stem) for p in directory.glob("*.jsonl") if p.stem.isdigit())
        if not self.segments:
            self.segments = [0]
        for n in self.segments:
            _drop_torn_tail(self._path(n))
        last = self._path(self.segments[-1])
        self.in_last = last.read_bytes().count(b"\n") if last.exists() else 0
        self._file = open(self._path(self.segments[-1]), "ab")
        horizon = _now_ms() - window_s * 1000
        for n in self.segments[-2:]:  # the window lies within the newest two segments unless traffic is enormous
            for record in self._read(n):
                if record["ts_ms"] >= horizon:
                    self._remember(record)

    def _path(self, n: int) -> Path:
        return self.dir / f"{n:08d}.jsonl"

    def append(self, records: list[dict]) -> None:
        with self.lock:
            try:
                rest = records
                while rest:
                    if self.in_last >= self.per_segment:
                        self._rotate()
                    room = self.per_segment - self.in_last
                    part, rest = rest[:room], rest[room:]
                    self._file.write(b"".join(orjson.dumps(r) + b"\n" for r in part))
                    self.in_last += len(part)
                self._file.flush()
                os.fsync(self._file.fileno())
            except OSError as err:
                raise StoreUnavailable(f"{self.dir}: cannot write impressions ({err.strerror or err})") from err
            for r in records:
                self._remember(r)

    def _rotate(self) -> None:
        self._file.close()
        self.segments.append(self.segments[-1] + 1)
        self._file = open(self._path(self.segments[-1]), "ab")
        self.in_last = 0
        while len(self.segments) > self.max_segments:
            self._path(self.segments.pop(0)).unlink(missing_ok=True)

    def _remember(self, record: dict) -> None:
        self.recent[record["request_id"]] = record
        horizon = _now_ms() - self.window_s * 1000
        while self.recent and (len(self.recent) > self.per_segment * self.max_segments
                               or next(iter(self.recent.values()))["ts_ms"] < horizon):
            self.recent.popitem(last=False)

    def find(self, request_id: str) -> dict | None:
        with self.lock:
            record = self.recent.get(request_id)
        if record is None or record["ts_ms"] < _now_ms() - self.window_s * 1000:
            return None
        return record

    def since(self, since_ms: int) -> list[dict]:
        with self.lock:
            self._file.flush()
            segments = list(self.segments)
        return [r for n in segments for r in self._read(n) if r["ts_ms"] >= since_ms]

    def _read(self, n: int) -> list[dict]:
        return [record for _, record in read_valid(self._path(n), 0, _impression)]

    def close(self) -> None:
        with self.lock:
            self._file.close()


def _with_once(parse):
    """``parse`` plus the record's idempotency key, ``[key, digest, answer, at_ms]`` or None (a malformed key is
    dropped, not its record: the event or change itself was acknowledged)."""
    def parse_with_once(record: Any) -> tuple[Any, list | None]:
        once = record.get("once")
        valid = (isinstance(once, list) and len(once) == 4 and all(isinstance(x, str) for x in once[:3])
                 and isinstance(once[3], int))
        return parse(record), once if valid else None
    return parse_with_once


def _impression(record: Any) -> dict:
    if not (isinstance(record, dict) and isinstance(record.get("request_id"), str) and isinstance(record.get("ts_ms"), int)
            and isinstance(record.get("user_id"), str) and isinstance(record.get("items"), list)):
        raise ValueError("not an impression record")
    return record


def _now_ms() -> int:
    return int(time.time() * 1000)


class ExperimentFile:
    """Experiment definitions in one JSON file, replaced atomically on each change (one process owns it)."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        self.records: dict[str, dict] = {}
        if path.exists():
            try:
                self.records = dict(orjson.loads(path.read_bytes()))
            except (ValueError, TypeError) as err:
                raise OSError(f"{path}: unreadable ({err}); fix or remove it") from None

    def read(self) -> dict[str, dict]:
        with self.lock:
            return dict(self.records)

    def put(self, name: str, record: dict) -> None:
        with self.lock:
            self._write({**self.records, name: record})

    def delete(self, name: str) -> bool:
        with self.lock:
            if name not in self.records:
                return False
            self._write({k: v for k, v in self.records.items() if k != name})
            return True

    def _write(self, records: dict[str, dict]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(orjson.dumps(records))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)
        except OSError as err:
            raise StoreUnavailable(f"{self.path}: cannot write ({err.strerror or err})") from err
        self.records = records


def _drop_torn_tail(path: Path) -> None:
    """Cut a final line that lacks its newline (a crash mid-write, never acknowledged), so the next
    record starts on a line of its own instead of being glued to the fragment and lost with it."""
    if not path.exists():
        return
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
    keep = data.rfind(b"\n") + 1
    logger.warning("{}: dropping a torn final record ({} bytes)", path, size - keep)
    with open(path, "r+b") as f:
        f.truncate(keep)
        os.fsync(f.fileno())


def _lock_dir(state_dir: Path):
    """Hold an exclusive lock on the directory for this store's life: a second process would append to the
    same logs while folding only its own appends, so it is refused with the way out."""
    state_dir.mkdir(parents=True, exist_ok=True)
    owner = open(state_dir / ".lock", "a+")
    try:
        fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner.close()
        raise OSError(f"{state_dir}: in use by another process; the file state backend serves one process "
                      "(for several workers or replicas set RECSYS_STATE_BACKEND=redis)") from None
    return owner


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
