"""Online state on Redis, shared by every replica and worker process (``RECSYS_STATE_BACKEND=redis``).

Keys, all under ``prefix``:

- ``events``: a stream of every acknowledged event (the record the trainer reads), approximately
  trimmed to ``events_maxlen`` entries;
- ``hist:{user}`` / ``ver:{user}``: the user's last ``history_cap`` events (a capped list) and how
  many were ever recorded (the version that keys the user-vector cache on every replica);
- ``catalog``: a stream of catalogue changes that every replica tails and applies in order, each
  entry numbered by ``catalog:seq`` so that a replica notices a gap (entries trimmed before it read
  them) and re-reads the fold;
- ``items``: the fold of the catalogue stream (each changed item's latest state; ``""`` once removed),
  kept in the same transaction as each change, so a replica that starts late reads it plus the
  stream after its position: the stream can be trimmed (``catalog_maxlen``) without losing state.

A write is acknowledged when its MULTI/EXEC returns, i.e. once Redis has applied it under its own
durability setting: with ``appendfsync always`` the AOF is fsynced before Redis replies (nothing
acknowledged is lost); with ``everysec`` up to a second of acknowledged writes can be lost if the
Redis host loses power. The compose file runs Redis with AOF on a volume and ``appendfsync always``.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit
from contextlib import contextmanager

import orjson
import redis

from recsys.state.protocol import FEEDBACK_FIELDS, Change, Event, Position, StoreUnavailable

RETRY_AFTER_S = 1.0  # after a failure, reads skip Redis (serving from the bundle) this long before trying again
MAX_WAIT_S = 5.0  # the longest blocking read for catalogue changes
# One round trip per event (measured 0.31 ms in Python vs 0.36 for MULTI/EXEC): stream it, then keep it with
# its stream id in the user's capped history (the id is Redis's, so it can only be added here), count it.
APPEND_EVENT = """
local xadd = {'XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
              'user_id', ARGV[2], 'item_id', ARGV[3], 'rating', ARGV[4], 'timestamp', ARGV[5]}
for i = 8, #ARGV do xadd[#xadd + 1] = ARGV[i] end
local id = redis.call(unpack(xadd))
redis.call('RPUSH', KEYS[2], ARGV[6] .. ',"' .. id .. '"]')
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[7]), -1)
return redis.call('INCR', KEYS[3])
"""
# A batch of impressions in one command: one AOF write and one fsync for the batch (a pipeline of one command
# per impression is read in many pieces, and under ``appendfsync always`` each piece is fsynced while every
# other client, the request path's history reads included, waits). Each impression is a stream entry (the
# retention counts impressions) and a key with the feedback window as its expiry (the join's lookup).
APPEND_IMPRESSIONS = """
for i = 2, #KEYS do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'r', ARGV[i + 1])
  redis.call('SET', KEYS[i], ARGV[i + 1], 'EX', ARGV[2])
end
return #KEYS - 1
"""
APPEND_CHANGE = """
local seq = redis.call('INCR', KEYS[1])
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'item_id', ARGV[1], 'item', ARGV[2], 'seq', seq)
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
return id
"""


class RedisStateStore:
    def __init__(self, url: str, history_cap: int, prefix: str = "recsys", events_maxlen: int = 10_000_000,
                 catalog_maxlen: int = 100_000, timeout_s: float = 0.5, impression_retention: int = 1_000_000,
                 feedback_window_s: int = 1800):
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                           health_check_interval=10)
        # blocking reads (XREAD BLOCK) wait longer than a command may take: their own connection and timeout
        self.blocking = redis.Redis.from_url(url, socket_timeout=MAX_WAIT_S + timeout_s, socket_connect_timeout=timeout_s)
        self.url, self.history_cap = _without_password(url), history_cap
        self.p, self.events_maxlen, self.catalog_maxlen = prefix, events_maxlen, catalog_maxlen
        self.impression_retention, self.feedback_window_s = impression_retention, feedback_window_s
        self._failed_at: float | None = None
        self._failure = ""
        self._source: str | None = None
        self._append_change = self.client.register_script(APPEND_CHANGE)
        self._append_event = self.client.register_script(APPEND_EVENT)
        self._append_impressions = self.client.register_script(APPEND_IMPRESSIONS)

    # ------------------------------------------------------------------ events
    def append_event(self, user_id: str, event: Event) -> int:
        hist, ver = self._user_keys(user_id)
        packed = orjson.dumps(list(event.interaction[:3]))[:-1]  # '["item",rating,ts' : the script appends the stream id
        rating = "" if event.rating is None else repr(event.rating)
        feedback = [x for k in FEEDBACK_FIELDS if getattr(event, k) is not None for x in (k, str(getattr(event, k)))]
        with self._call("record the event"):
            return int(self._append_event(keys=[f"{self.p}:events", hist, ver],
                                          args=[self.events_maxlen, user_id, event.item_id, rating, event.timestamp,
                                                packed, self.history_cap, *feedback]))

    def history(self, user_id: str, after: Position | None = None) -> tuple[int, list[Event]]:
        """Read together (MULTI), so the version always describes the events returned."""
        if self._failed_at is not None and time.monotonic() - self._failed_at < RETRY_AFTER_S:
            raise StoreUnavailable(self._failure)
        hist, ver = self._user_keys(user_id)
        with self._call("read the history"):
            pipe = self.client.pipeline(transaction=True)
            pipe.get(ver)
            pipe.lrange(hist, 0, -1)
            version, packed = pipe.execute()
        events = (orjson.loads(e) for e in packed)  # [item, rating, ts, stream id]
        return int(version or 0), [Event(*e[:3]) for e in events if after is None or _position(e[3]) > after]

    def events_since(self, after: Position | None = None, batch: int = 10_000) -> list[tuple[Position, str, Event]]:
        """The events stream after ``after``, read in batches (what a trainer reads)."""
        out, start = [], "-" if after is None else "(%d-%d" % after
        while True:
            with self._call("read the events stream", trips_breaker=False):
                entries = self.client.xrange(f"{self.p}:events", start, "+", count=batch)
            out.extend((_position(entry_id), f[b"user_id"].decode(), _event(f)) for entry_id, f in entries)
            if len(entries) < batch:
                return out
            start = "(" + entries[-1][0].decode()

    def feedback_since(self, since_ms: int) -> list[tuple[str, Event]]:
        return [(user, event) for _, user, event in self.events_since((max(since_ms, 1) - 1, 2**63 - 1))
                if event.request_id is not None]

    # ------------------------------------------------------------------ impressions and experiments
    def append_impressions(self, records: list[dict]) -> None:
        """One script call per batch (``APPEND_IMPRESSIONS``)."""
        keys = [f"{self.p}:impressions", *(f"{self.p}:imp:{r['request_id']}" for r in records)]
        with self._call("log impressions", trips_breaker=False):
            self._append_impressions(keys=keys, args=[self.impression_retention, self.feedback_window_s,
                                                      *(orjson.dumps(r) for r in records)])

    def impression(self, request_id: str) -> dict | None:
        with self._call("read the impression"):
            body = self.client.get(f"{self.p}:imp:{request_id}")
        return None if body is None else orjson.loads(body)

    def impressions_since(self, since_ms: int, batch: int = 10_000) -> list[dict]:
        out, start = [], f"{since_ms}-0"
        while True:
            with self._call("read the impressions stream", trips_breaker=False):
                entries = self.client.xrange(f"{self.p}:impressions", start, "+", count=batch)
            out.extend(orjson.loads(f[b"r"]) for _, f in entries)
            if len(entries) < batch:
                return out
            start = "(" + entries[-1][0].decode()

    def experiments(self) -> dict[str, dict]:
        with self._call("read the experiments"):
            records = self.client.hgetall(f"{self.p}:experiments")
        return {k.decode(): orjson.loads(v) for k, v in records.items()}

    def put_experiment(self, name: str, record: dict) -> None:
        with self._call("record the experiment"):
            self.client.hset(f"{self.p}:experiments", name, orjson.dumps(record))

    def delete_experiment(self, name: str) -> bool:
        with self._call("delete the experiment"):
            return bool(self.client.hdel(f"{self.p}:experiments", name))

    # ------------------------------------------------------------------ catalogue
    def append_change(self, item_id: str, item: dict | None) -> Position:
        """Numbered, streamed and folded in one script (atomic: concurrent writers cannot interleave
        the number and the stream order)."""
        body = orjson.dumps(item) if item is not None else b""
        keys = [f"{self.p}:catalog:seq", f"{self.p}:catalog", f"{self.p}:items"]
        with self._call("record the catalogue change"):
            entry_id = self._append_change(keys=keys, args=[item_id, body, self.catalog_maxlen])
        return _position(entry_id)

    def catalog(self) -> tuple[dict[str, dict | None], Position]:
        with self._call("read the catalogue"):
            pipe = self.client.pipeline(transaction=True)
            pipe.hgetall(f"{self.p}:items")
            pipe.xrevrange(f"{self.p}:catalog", count=1)
            items, last = pipe.execute()
        fold = {k.decode(): (orjson.loads(v) if v else None) for k, v in items.items()}
        return fold, _position(last[0][0]) if last else (0, 0)

    def changes_since(self, position: Position, wait_s: float = 0.0) -> list[Change]:
        """Blocks up to ``wait_s`` (XREAD BLOCK, at most ``MAX_WAIT_S``) for changes after ``position``."""
        block = int(min(wait_s, MAX_WAIT_S) * 1000) if wait_s > 0 else None
        client = self.blocking if block else self.client
        with self._call("read catalogue changes", trips_breaker=not block):
            reply = client.xread({f"{self.p}:catalog": "%d-%d" % position}, count=1000, block=block)
        entries = reply[0][1] if reply else []
        changes = [(_position(entry_id), f[b"item_id"].decode(), orjson.loads(f[b"item"]) if f[b"item"] else None, int(f[b"seq"]))
                   for entry_id, f in entries]
        if changes and position != (0, 0) and not self._contiguous(position, changes[0][3], trips_breaker=not block):
            raise LookupError(f"catalogue changes after {position} were trimmed from the stream")
        return [c[:3] for c in changes]

    def _contiguous(self, position: Position, first_seq: int, trips_breaker: bool) -> bool:
        """Whether the entry at ``position`` is numbered ``first_seq - 1`` (nothing was trimmed in between)."""
        with self._call("read catalogue changes", trips_breaker):
            before = self.client.xrange(f"{self.p}:catalog", "%d-%d" % position, "%d-%d" % position)
        return bool(before) and int(before[0][1][b"seq"]) == first_seq - 1

    # ------------------------------------------------------------------ health
    def health(self) -> str | None:
        try:
            with self._call("ping"):
                self.client.ping()
        except StoreUnavailable:
            return self._failure
        return None

    @property
    def source(self) -> str:
        """This deployment's identity, made once in Redis (``SET NX``) and cached: a watermark names it, so a
        flushed or replaced Redis, or another spelling of the same URL, is judged by what it holds."""
        if self._source is None:
            with self._call("read the store id"):
                self.client.set(f"{self.p}:store-id", uuid.uuid4().hex, nx=True)
                self._source = f"redis:{self.client.get(f'{self.p}:store-id').decode()}"
        return self._source

    def close(self) -> None:
        self.client.close()
        self.blocking.close()

    def _user_keys(self, user_id: str) -> tuple[str, str]:
        return f"{self.p}:hist:{user_id}", f"{self.p}:ver:{user_id}"

    @contextmanager
    def _call(self, what: str, trips_breaker: bool = True) -> Iterator[None]:
        """A Redis failure becomes ``StoreUnavailable`` with a message and, for calls on the request path,
        is remembered so that reads skip Redis for ``RETRY_AFTER_S``; a success forgets it. (The follower's
        blocking reads do not trip it: a connection that broke under a long wait says little about the next
        request's.)"""
        try:
            yield
        except redis.RedisError as err:
            failure = self._describe(err)
            if trips_breaker and isinstance(err, (redis.ConnectionError, redis.TimeoutError)):
                self._failed_at, self._failure = time.monotonic(), failure  # a reply (OOM...) is not an outage
            raise StoreUnavailable(f"cannot {what}: {failure}") from err
        if trips_breaker:
            self._failed_at = None

    def _describe(self, err: Exception) -> str:
        return f"redis at {self.url} unavailable ({type(err).__name__}: {err})"


def _event(f: dict) -> Event:
    """A stream entry's event (feedback fields only where the entry has them)."""
    rating = f[b"rating"].decode()
    position = f.get(b"position")
    return Event(f[b"item_id"].decode(), float(rating) if rating else None, int(f[b"timestamp"]),
                 f[b"type"].decode() if b"type" in f else None, f[b"request_id"].decode() if b"request_id" in f else None,
                 int(position) if position is not None else None)


def _position(entry_id: bytes | str) -> Position:
    ms, _, seq = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id).partition("-")
    return int(ms), int(seq or 0)


def _without_password(url: str) -> str:
    """The URL as it may appear in logs, error bodies and manifests: scheme, host, port and path only (a
    password can sit in the user part, even after an '@' of its own, or in the query string)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"
