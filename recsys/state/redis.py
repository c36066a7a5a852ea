"""Online state on Redis, shared by every replica and worker process (``RECSYS_STATE_BACKEND=redis``): a single
Redis (``redis://``, ``rediss://``, ``unix://``) or a Redis Cluster (``redis+cluster://`` or ``rediss+cluster://``,
any node as the seed, or several: ``redis+cluster://h1:6379,h2:6379``).

What is kept, each under ``prefix`` (``Layout`` says where):

- ``events``: a stream of every acknowledged event (the record the trainer reads), approximately
  trimmed to ``events_maxlen`` entries;
- ``hist:{user}`` / ``ver:{user}``: the user's last ``history_cap`` events (a capped list) and how
  many were ever recorded (the version that keys the user-vector cache on every replica);
- ``catalog``: a stream of catalogue changes that every replica tails and applies in order, each
  entry numbered by ``catalog:seq`` so that a replica notices a gap (entries trimmed before it read
  them) and re-reads the fold;
- ``items``: the fold of the catalogue stream (each changed item's latest state; ``""`` once removed),
  kept in the same script as each change, so a replica that starts late reads it plus the
  stream after its position: the stream can be trimmed (``catalog_maxlen``) without losing state;
- ``impressions`` / ``imp:{request id}``: logged answers, and each one's key for the feedback join.
- ``once:{user}:{key}`` / ``once:{key}`` (catalogue): idempotency keys, each set by the script that records
  its write and expiring after ``idempotency_window_s`` (memory: about 100 bytes per keyed write in the window).

On a cluster every script and transaction must touch one slot, so keys carry hash tags: the catalogue's
keys, the experiments and the store's identity share ``{prefix}``; events and impressions are split over
``shards`` streams (a setting, fixed when the deployment first writes), a user's history living beside the
user's events shard and an impression beside its request's shard. Each shard's tag is chosen to hash into its
own 1/shards of the slot space, so on a cluster whose slots are split evenly (as ``redis-cli --cluster
create`` does) the shards spread over every master, and no node holds all the events. Streams on different
nodes have no common order: an event's position names its shard, ``(ms, seq, shard)``, and a watermark holds
how far each shard was read (``recsys.state.protocol.mark_of``).

A write is acknowledged when its script returns, i.e. once Redis has applied it under its own durability
setting: with ``appendfsync always`` the AOF is fsynced before Redis replies (nothing acknowledged is lost
when the server restarts); with ``everysec`` up to a second of acknowledged writes can be lost if the Redis
host loses power. Replication is asynchronous, so a master that dies before its replica received a write
takes the write with it when the replica is promoted: with ``wait_replicas`` (1 by default on a cluster) a
write is acknowledged only after ``WAIT`` confirms that many replicas hold it, else the caller gets a 503
that says the write may not survive a failover. The compose file runs a single Redis with AOF on a volume
and ``appendfsync always``.
"""
from __future__ import annotations

import asyncio
import heapq
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from urllib.parse import urlsplit
from weakref import WeakKeyDictionary

import orjson
import redis
import redis.asyncio
import redis.asyncio.cluster
from loguru import logger
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from recsys.metrics import HISTORY_READS
from recsys.state.history_cache import HistoryCache, Reply
from recsys.state.protocol import (CHANGES_PAGE, FEEDBACK_FIELDS, AlreadyRecorded, Change, Event, Once, Position, StoreUnavailable,
                                   recorded_after)

FROM_MEMORY, FROM_REDIS = (HISTORY_READS.labels(source) for source in ("memory", "redis"))
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
RETRY_AFTER_S = 1.0  # after a failure, reads skip Redis (serving from the bundle) this long before trying again
MAX_WAIT_S = 5.0  # the longest blocking read for catalogue changes
# Stream ids carry Redis's clock, an impression's ts_ms its replica's: a read by time starts this much earlier in
# the stream, then keeps the records by their own ts_ms, so that replicas up to a minute ahead of Redis lose nothing.
CLOCK_SKEW_MS = 60_000
# Users' history versions and events, each user's two in one atomic step (KEYS: version, history, version,
# history, ...). A script, not MULTI: one command, and redis-py's asyncio cluster pipeline runs a transaction's
# commands on a thread's own event loop. One user per call on a cluster (a script's keys must share a slot); on a
# single Redis, the reads one event loop's requests made in one turn, together. Each user's events (each a JSON
# array) come back joined into one JSON array: one reply element and one ``orjson.loads``, where redis-py parses
# a list reply element by element in Python.
READ_HISTORIES = """
local out = {}
for i = 1, #KEYS, 2 do
  local events = redis.call('LRANGE', KEYS[i + 1], 0, -1)
  out[#out + 1] = redis.call('GET', KEYS[i]) or false
  out[#out + 1] = '[' .. table.concat(events, ',') .. ']'
end
return out
"""
READS_PER_CALL = 64  # at most this many users' histories in one READ_HISTORIES call (one script holds Redis)
# One round trip per event (measured 0.31 ms in Python vs 0.36 for MULTI/EXEC): stream it, then keep it with
# its stream id in the user's capped history (the id is Redis's, so it can only be added here), count it. With an
# idempotency key (KEYS[4], in the user's slot), a key already held answers what it holds, writing only the key
# again as it is: the WAIT after the script then confirms the write it answers for (see ``PREVIOUS_WRITE``).
APPEND_EVENT = """
if KEYS[4] then
  local seen = redis.call('GET', KEYS[4])
  if seen then
    redis.call('SET', KEYS[4], seen, 'KEEPTTL')
    return {0, seen, tonumber(redis.call('GET', KEYS[3]) or '0')}
  end
end
local xadd = {'XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
              'user_id', ARGV[2], 'item_id', ARGV[3], 'rating', ARGV[4], 'timestamp', ARGV[5]}
for i = 10, #ARGV do xadd[#xadd + 1] = ARGV[i] end
local id = redis.call(unpack(xadd))
redis.call('RPUSH', KEYS[2], ARGV[6] .. ',"' .. id .. '"]')
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[7]), -1)
local version = redis.call('INCR', KEYS[3])
if KEYS[4] then redis.call('SET', KEYS[4], ARGV[8], 'EX', ARGV[9]) end
return {1, '', version}
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
# A batch of catalogue changes in one script: atomic (no other writer's change lands between its items, and a
# failure records none of them), each numbered so that a replica notices entries trimmed before it read them,
# streamed and folded; with an idempotency key (KEYS[4]), a key already held answers what it holds (written again
# as it is, as in ``APPEND_EVENT``).
APPEND_CHANGES = """
if KEYS[4] then
  local seen = redis.call('GET', KEYS[4])
  if seen then
    redis.call('SET', KEYS[4], seen, 'KEEPTTL')
    return {0, seen}
  end
end
local id
for i = 4, #ARGV, 2 do
  local seq = redis.call('INCR', KEYS[1])
  id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', 'item_id', ARGV[i], 'item', ARGV[i + 1], 'seq', seq)
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
end
if KEYS[4] then redis.call('SET', KEYS[4], ARGV[2], 'EX', ARGV[3]) end
return {1, id}
"""

# A write's idempotency key and (KEYS[2], for an event) the user's history version. A key found is written again
# as it is (KEEPTTL): a retry is answered as the write it repeats only once that write would survive a failover,
# and WAIT confirms what the client's own last write put in the replication stream, which then includes the
# write the key records (a replica that holds an offset holds everything before it). Without that, a retry
# through another connection (another replica), with no write of its own, was confirmed at once.
PREVIOUS_WRITE = """
local seen = redis.call('GET', KEYS[1])
if not seen then return {false, false} end
redis.call('SET', KEYS[1], seen, 'KEEPTTL')
local version = false
if KEYS[2] then version = redis.call('GET', KEYS[2]) end
return {seen, version}
"""


def is_cluster_url(url: str) -> bool:
    return url.startswith(CLUSTER_SCHEMES)


class Layout:
    """Where each piece of state lives. On a single Redis: ``prefix:name``, one events and one impressions
    stream (the layout of every earlier version, so existing state reads as before). On a cluster: hash-tagged
    keys and ``shards`` streams (see the module docstring)."""

    def __init__(self, prefix: str, shards: int | None = None):
        self.p, self.cluster = prefix, shards is not None
        self.shards = shards or 1
        if self.cluster:
            if "{" in prefix or "}" in prefix:
                raise ValueError(f"a Redis Cluster key prefix cannot hold braces (they make hash tags): {prefix!r}")
            common = f"{{{prefix}}}"
            self._tags = [_slot_tag(prefix, s, self.shards) for s in range(self.shards)]
        else:
            common = prefix
            self._tags = [prefix]
        self._catalog_tag = common
        self.catalog_seq, self.catalog, self.items = f"{common}:catalog:seq", f"{common}:catalog", f"{common}:items"
        self.experiments, self.store_id = f"{common}:experiments", f"{common}:store-id"

    def events(self, shard: int) -> str:
        return f"{self._tags[shard]}:events"

    def impressions(self, shard: int) -> str:
        return f"{self._tags[shard]}:impressions"

    @property
    def versions(self) -> str:
        """What every user's version key starts with on a single Redis (where ``HistoryCache`` follows them)."""
        return f"{self._tags[0]}:ver:"

    def user(self, user_id: str) -> tuple[int, str, str]:
        """The user's shard, history key and version key."""
        shard = self.shard_of(user_id)
        return shard, f"{self._tags[shard]}:hist:{user_id}", f"{self._tags[shard]}:ver:{user_id}"

    def user_once(self, user_id: str, key: str) -> str:
        """An event's idempotency key, in the user's slot (the event script touches it); the user id's length
        keeps ``("a:b", "c")`` and ``("a", "b:c")`` apart."""
        return f"{self._tags[self.shard_of(user_id)]}:once:{len(user_id)}:{user_id}:{key}"

    def catalog_once(self, key: str) -> str:
        """A catalogue write's idempotency key: ``once:catalog:`` where an event's has the user id's length (digits),
        so that no key a client sends can name another's (on a single Redis both share one prefix)."""
        return f"{self._catalog_tag}:once:catalog:{key}"

    def impression(self, request_id: str) -> tuple[int, str]:
        shard = self.shard_of(request_id)
        return shard, f"{self._tags[shard]}:imp:{request_id}"

    def shard_of(self, key: str) -> int:
        """Stable across processes and versions (not Python's salted ``hash``)."""
        return zlib.crc32(key.encode()) % self.shards if self.cluster else 0

    def position(self, entry_id: bytes | str, shard: int) -> Position:
        """An events-stream entry's position: ``(ms, seq)``, with the shard on a cluster."""
        return _position(entry_id) + (shard,) if self.cluster else _position(entry_id)


def _slot_tag(prefix: str, shard: int, shards: int) -> str:
    """The first hash tag ``{prefix.shard.k}`` whose slot lies in the shard's 1/shards of the slot space."""
    k = 0
    while key_slot(f"{prefix}.{shard}.{k}".encode()) * shards // REDIS_CLUSTER_HASH_SLOTS != shard:
        k += 1
    return f"{{{prefix}.{shard}.{k}}}"


class Unreplicated(redis.RedisError):
    """Fewer replicas confirmed a write than ``wait_replicas`` asks for: the write is refused (503), but Redis answered,
    so this is no outage: the breaker that stops reads for ``RETRY_AFTER_S`` is left alone."""


class RedisStateStore:
    def __init__(self, url: str, history_cap: int, prefix: str = "recsys", events_maxlen: int = 10_000_000,
                 catalog_maxlen: int = 100_000, timeout_s: float = 0.5, impression_retention: int = 1_000_000,
                 feedback_window_s: int = 1800, shards: int = 16, wait_replicas: int | None = None,
                 idempotency_window_s: int = 86_400, history_cache_bytes: int = 64 << 20):
        self.raw_url, self.cluster = url, is_cluster_url(url)
        self.url, self.history_cap = _without_password(url), history_cap
        self.p, self.events_maxlen, self.catalog_maxlen = prefix, events_maxlen, catalog_maxlen
        self.impression_retention, self.feedback_window_s = impression_retention, feedback_window_s
        self.timeout_s, self.configured_shards = timeout_s, shards
        self.idempotency_window_s = idempotency_window_s  # idempotency keys expire (EX) after this
        self.wait_replicas = (1 if self.cluster else 0) if wait_replicas is None else wait_replicas
        self.history_cache_bytes = 0 if self.cluster else history_cache_bytes  # (``HistoryCache``: one Redis only)
        self._failed_at: float | None = None
        self._failure = ""
        self._source: str | None = None
        self._lock = threading.Lock()
        self._layout: Layout | None = None if self.cluster else Layout(prefix)
        self._async_clients: WeakKeyDictionary = WeakKeyDictionary()  # event loop -> its _LoopReads

    # ------------------------------------------------------------------ connections and layout
    @cached_property
    def client(self) -> redis.Redis | RedisCluster:
        return self._connect(self.timeout_s)

    @cached_property
    def blocking(self) -> redis.Redis | RedisCluster:
        """Blocking reads (XREAD BLOCK) wait longer than a command may take: their own connections and timeout."""
        return self._connect(MAX_WAIT_S + self.timeout_s)

    def _connect(self, socket_timeout: float) -> redis.Redis | RedisCluster:
        """A cluster client reads the slot map when made: it is made at first use, inside ``_call``, so a cluster
        that is down at start-up is a store that is unavailable, as a single Redis is. A second cluster client is
        seeded with every node the first one knows, not only the URL's: the URL's node may be the one that died."""
        if self.cluster:
            url, seeds = _cluster_seeds(self.raw_url)
            if "client" in self.__dict__:
                seeds = [ClusterNode(n.host, n.port) for n in self.client.get_nodes()]
            return RedisCluster.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=self.timeout_s,
                                         startup_nodes=seeds)
        return redis.Redis.from_url(self.raw_url, socket_timeout=socket_timeout, socket_connect_timeout=self.timeout_s,
                                    health_check_interval=10 if socket_timeout == self.timeout_s else 0)

    @property
    def layout(self) -> Layout:
        """On a cluster, the shard count is the one the deployment was created with (``SET NX`` at its first
        open): a replica configured otherwise still finds every user's history."""
        if self._layout is None:
            with self._lock:
                if self._layout is None:
                    key = f"{{{self.p}}}:shards"
                    self.client.set(key, self.configured_shards, nx=True)
                    self._layout = Layout(self.p, int(self.client.get(key)))
        return self._layout

    # ------------------------------------------------------------------ events
    def append_event(self, user_id: str, event: Event, once: Once | None = None) -> int:
        packed = orjson.dumps(list(event.interaction[:3]))[:-1]  # '["item",rating,ts' : the script appends the stream id
        rating = "" if event.rating is None else repr(event.rating)
        feedback = [x for k in FEEDBACK_FIELDS if getattr(event, k) is not None for x in (k, str(getattr(event, k)))]
        with self._call("record the event"):
            shard, hist, ver = self.layout.user(user_id)
            keys = [self.layout.events(shard), hist, ver] + ([self.layout.user_once(user_id, once.key)] if once else [])
            fresh, seen, version = self._write(keys[0], "EVAL", APPEND_EVENT, len(keys), *keys, self._share(self.events_maxlen), user_id,
                                               event.item_id, rating, event.timestamp, packed, self.history_cap,
                                               *self._once_args(once), *feedback)
            if fresh:
                self._invalidations_written()
        if not fresh:
            raise AlreadyRecorded(*_split_seen(seen), version=int(version))
        return int(version)

    def _invalidations_written(self) -> None:
        """Acknowledge an event only once Redis has written its invalidations (single Redis, no WAIT): the workers
        that keep histories (``HistoryCache``) learn of the write from an invalidation written in the same turn of
        Redis's loop as the write's reply, but not always before it (Redis writes a turn's clients in list order and
        can be preempted between two: 1 stale read in 2,000 under CPU contention without this). A command sent once
        the reply is back is read in a later turn, so its answer comes after every invalidation of the write was
        written: on one host, already in each worker's socket. With WAIT the reply itself comes in a later turn.
        Skipped where histories are not kept (it cost a saturated 2-core host 18% of its events per second), so
        the setting must be the same on every replica."""
        if self.history_cache_bytes and not self.wait_replicas:
            self.client.ping()

    def previous_write(self, key: str, user_id: str | None = None) -> AlreadyRecorded | None:
        """The write recorded under ``key``, confirmed by the replicas a write needs (``PREVIOUS_WRITE``)."""
        layout = self.layout
        keys = [layout.catalog_once(key)] if user_id is None else [layout.user_once(user_id, key), layout.user(user_id)[2]]
        with self._call("read the idempotency key"):
            value, version = self._write(keys[0], "EVAL", PREVIOUS_WRITE, len(keys), *keys,
                                         confirm=lambda found: found[0] is not None)
        return None if value is None else AlreadyRecorded(*_split_seen(value), version=int(version or 0))

    def _once_args(self, once: Once | None) -> tuple[str, int]:
        """The script arguments that store a key: its value and expiry (placeholders without one)."""
        return (f"{once.digest}\n{once.answer}", self.idempotency_window_s) if once else ("", 0)

    def history(self, user_id: str, after: Position | None = None) -> tuple[int, list[Event]]:
        """Read together (one script), so the version always describes the events returned."""
        self._breaker_open()
        with self._call("read the history"):
            shard, hist, ver = self.layout.user(user_id)
            version, packed = self.client.eval(READ_HISTORIES, 2, ver, hist)
        return self._history(version, packed, shard, after)

    async def history_async(self, user_id: str, after: Position | None = None) -> tuple[int, list[Event]]:
        """``history`` on the running event loop's own asyncio client: a request answered on the loop waits for
        Redis without blocking it (nor, during an outage, for the socket timeout). On a single Redis the reads
        asked for in one turn of the loop share one call (``_LoopReads``)."""
        self._breaker_open()
        with self._call("read the history"):
            shard, hist, ver = self.layout.user(user_id)
            version, packed = await self._loop_reads().read(ver, hist)
        return self._history(version, packed, shard, after)

    def _history(self, version: bytes | None, packed: bytes, shard: int, after: Position | None) -> tuple[int, list[Event]]:
        events = orjson.loads(packed)  # [[item, rating, ts, stream id], ...]
        if after is not None:  # (no watermark: no stream id to parse)
            events = [e for e in events if recorded_after(self.layout.position(e[3], shard), after)]
        return int(version or 0), [Event(*e[:3]) for e in events]

    def _breaker_open(self) -> None:
        """Within ``RETRY_AFTER_S`` of a failure, a read fails at once instead of waiting for Redis again."""
        if self._failed_at is not None and time.monotonic() - self._failed_at < RETRY_AFTER_S:
            raise StoreUnavailable(self._failure)

    def events_since(self, after: Position | None = None, batch: int = 10_000) -> list[tuple[Position, str, Event]]:
        """The events after ``after`` (a watermark: ``mark_of`` positions this store returned), read in batches
        (what a trainer reads); on a cluster each shard from where the watermark left it, merged by time."""
        with self._call("read the events stream", trips_breaker=False):
            layout = self.layout
            shards = [[(layout.position(entry_id, s), f[b"user_id"].decode(), _event(f))
                       for entry_id, f in self._read_stream(layout.events(s), _start(after, s, layout.cluster), batch)]
                      for s in range(layout.shards)]
        return list(heapq.merge(*shards, key=lambda e: e[0]))

    def feedback_since(self, since_ms: int) -> list[tuple[str, Event]]:
        """From ``CLOCK_SKEW_MS`` earlier in the streams, as ``impressions_since`` (the join drops what is older)."""
        start = (max(since_ms - CLOCK_SKEW_MS, 1) - 1, 2**63 - 1)
        with self._call("read the events stream", trips_breaker=False):
            layout = self.layout
        return [(user, event) for _, user, event in self.events_since(start * layout.shards if layout.cluster else start)
                if event.request_id is not None]

    def _read_stream(self, key: str, start: str, batch: int) -> list[tuple[bytes, dict]]:
        """Every entry of a stream from ``start`` (an XRANGE bound), in batches."""
        out = []
        while True:
            entries = self.client.xrange(key, start, "+", count=batch)
            out.extend(entries)
            if len(entries) < batch:
                return out
            start = "(" + entries[-1][0].decode()

    # ------------------------------------------------------------------ impressions and experiments
    def append_impressions(self, records: list[dict]) -> None:
        """One script call per batch and shard (``APPEND_IMPRESSIONS``). Impressions are not acknowledged to
        a client, so they are not held for ``WAIT``."""
        with self._call("log impressions", trips_breaker=False):
            by_shard: dict[int, tuple[list[str], list[bytes]]] = {}
            for r in records:
                shard, key = self.layout.impression(r["request_id"])
                keys, bodies = by_shard.setdefault(shard, ([self.layout.impressions(shard)], []))
                keys.append(key)
                bodies.append(orjson.dumps(r))
            for keys, bodies in by_shard.values():
                self.client.execute_command("EVAL", APPEND_IMPRESSIONS, len(keys), *keys, self._share(self.impression_retention),
                                            self.feedback_window_s, *bodies)

    def _share(self, total: int) -> int:
        """What each of a cluster's shard streams keeps of a retention setting, which counts them all (16 streams
        trimmed to the whole setting each kept 16 times it)."""
        return -(-total // self.layout.shards)

    def impression(self, request_id: str) -> dict | None:
        with self._call("read the impression"):
            body = self.client.get(self.layout.impression(request_id)[1])
        return None if body is None else orjson.loads(body)

    def impressions_since(self, since_ms: int, batch: int = 10_000) -> list[dict]:
        """By ``ts_ms`` as the file backend, read from ``CLOCK_SKEW_MS`` earlier in the streams."""
        start = max(0, since_ms - CLOCK_SKEW_MS)
        with self._call("read the impressions stream", trips_breaker=False):
            layout = self.layout
            shards = [[(_position(entry_id), f[b"r"]) for entry_id, f in
                       self._read_stream(layout.impressions(s), f"{start}-0", batch)] for s in range(layout.shards)]
        records = (orjson.loads(body) for _, body in heapq.merge(*shards, key=lambda e: e[0]))
        return [r for r in records if r["ts_ms"] >= since_ms]

    def experiments(self) -> dict[str, dict]:
        with self._call("read the experiments"):
            records = self.client.hgetall(self.layout.experiments)
        return {k.decode(): orjson.loads(v) for k, v in records.items()}

    def put_experiment(self, name: str, record: dict) -> None:
        with self._call("record the experiment"):
            self._write(self.layout.experiments, "HSET", self.layout.experiments, name, orjson.dumps(record))

    def delete_experiment(self, name: str) -> bool:
        with self._call("delete the experiment"):
            return bool(self._write(self.layout.experiments, "HDEL", self.layout.experiments, name))

    # ------------------------------------------------------------------ catalogue
    def append_changes(self, changes: list[tuple[str, dict | None]], once: Once | None = None) -> Position:
        """One script (``APPEND_CHANGES``) for the batch, followed by ``WAIT`` when configured."""
        layout = self.layout
        keys = [layout.catalog_seq, layout.catalog, layout.items] + ([layout.catalog_once(once.key)] if once else [])
        pairs = [x for item_id, item in changes for x in (item_id, orjson.dumps(item) if item is not None else b"")]
        with self._call("record the catalogue changes"):
            fresh, last = self._write(keys[0], "EVAL", APPEND_CHANGES, len(keys), *keys, self.catalog_maxlen,
                                      *self._once_args(once), *pairs)
        if not fresh:
            raise AlreadyRecorded(*_split_seen(last))
        return _position(last)

    def catalog(self) -> tuple[dict[str, dict | None], Position]:
        with self._call("read the catalogue"):
            pipe = self.client.pipeline(transaction=True)
            pipe.hgetall(self.layout.items)
            pipe.xrevrange(self.layout.catalog, count=1)
            items, last = pipe.execute()
        fold = {k.decode(): (orjson.loads(v) if v else None) for k, v in items.items()}
        return fold, _position(last[0][0]) if last else (0, 0)

    def changes_since(self, position: Position, wait_s: float = 0.0) -> list[Change]:
        """Blocks up to ``wait_s`` (XREAD BLOCK, at most ``MAX_WAIT_S``) for changes after ``position``."""
        block = int(min(wait_s, MAX_WAIT_S) * 1000) if wait_s > 0 else None
        with self._call("read catalogue changes", trips_breaker=not block):
            client = self.blocking if block else self.client
            reply = client.xread({self.layout.catalog: "%d-%d" % position}, count=CHANGES_PAGE, block=block)
        entries = _entries(reply)
        changes = [(_position(entry_id), f[b"item_id"].decode(), orjson.loads(f[b"item"]) if f[b"item"] else None, int(f[b"seq"]))
                   for entry_id, f in entries]
        if changes and position != (0, 0) and not self._contiguous(position, changes[0][3], trips_breaker=not block):
            raise LookupError(f"catalogue changes after {position} were trimmed from the stream")
        return [c[:3] for c in changes]

    def _contiguous(self, position: Position, first_seq: int, trips_breaker: bool) -> bool:
        """Whether the entry at ``position`` is numbered ``first_seq - 1`` (nothing was trimmed in between)."""
        with self._call("read catalogue changes", trips_breaker):
            before = self.client.xrange(self.layout.catalog, "%d-%d" % position, "%d-%d" % position)
        return bool(before) and int(before[0][1][b"seq"]) == first_seq - 1

    # ------------------------------------------------------------------ health
    def health(self) -> str | None:
        try:
            with self._call("ping"):
                self.client.ping()  # on a cluster, every master
        except StoreUnavailable:
            return self._failure
        return None

    @property
    def source(self) -> str:
        """This deployment's identity, made once in Redis (``SET NX``) and cached: a watermark names it, so a
        flushed or replaced Redis, or another spelling of the same URL, is judged by what it holds."""
        if self._source is None:
            with self._call("read the store id"):
                key = self.layout.store_id
                self.client.set(key, uuid.uuid4().hex, nx=True)
                self._source = f"{'redis-cluster' if self.cluster else 'redis'}:{self.client.get(key).decode()}"
        return self._source

    def _loop_reads(self) -> _LoopReads:
        """The running event loop's history reads, on an asyncio client of its own (its connections belong to that
        loop), made at first use."""
        loop = asyncio.get_running_loop()
        reads = self._async_clients.get(loop)
        if reads is None:
            options = dict(socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s)
            if self.cluster:
                url, seeds = _cluster_seeds(self.raw_url)
                if "client" in self.__dict__:  # every node the sync client knows: the URL's may be the one that died
                    seeds = self.client.get_nodes()
                client = redis.asyncio.cluster.RedisCluster.from_url(
                    url, startup_nodes=[redis.asyncio.cluster.ClusterNode(n.host, n.port) for n in seeds], **options)
                reads = _LoopReads(client, coalesce=False)
            else:
                cache = None
                if self.history_cache_bytes:
                    cache = HistoryCache(self.raw_url, self.layout.versions, self.history_cache_bytes, self.timeout_s)
                    cache.start(loop)
                reads = _LoopReads(redis.asyncio.Redis.from_url(self.raw_url, **options), coalesce=True, cache=cache)
            self._async_clients[loop] = reads
        return reads

    async def aopen(self) -> None:
        """The running loop's client made and one of its connections opened, and on one Redis the history cache's
        invalidation connection, before the first request (which would otherwise wait for both)."""
        try:
            await self._loop_reads().client.ping()
        except (redis.RedisError, redis.exceptions.RedisClusterException, OSError) as err:  # down: the reads will say so
            logger.warning("redis not reachable at start: {}: {}", type(err).__name__, err)

    async def aclose(self) -> None:
        """Close the running loop's asyncio client (its connections cannot be closed from another loop)."""
        reads = self._async_clients.pop(asyncio.get_running_loop(), None)
        if reads is not None:
            if reads.cache is not None:
                reads.cache.close()
            await reads.client.aclose()

    def close(self) -> None:
        for reads in list(self._async_clients.values()):
            if reads.cache is not None:
                reads.cache.close()
        for name in ("client", "blocking"):
            if name in self.__dict__:  # made only if used
                self.__dict__[name].close()

    # ------------------------------------------------------------------ plumbing
    def _write(self, key: str, *command, confirm: Callable[[object], bool] | None = None) -> object:
        """One write command on ``key``'s node, and its result; with ``wait_replicas``, followed on the same connection
        by one ``WAIT`` (pipelined), and acknowledged only when that many replicas hold it (``confirm``: whether this
        result wrote anything to confirm)."""
        if not self.wait_replicas:
            return self.client.execute_command(*command)
        pipe = self.client.pipeline(transaction=False)
        timeout_ms = max(1, int(self.timeout_s * 1000 * 0.8))  # the WAIT ends before the socket gives up
        if self.cluster:  # both to the key's node, named: a cluster pipeline would otherwise ask the default node
            node = self.client.get_node_from_key(key)  # for a script's keys (COMMAND GETKEYS) on every write
            pipe.execute_command(*command, target_nodes=node)
            pipe.execute_command("WAIT", self.wait_replicas, timeout_ms, target_nodes=node)
        else:
            pipe.execute_command(*command)
            pipe.execute_command("WAIT", self.wait_replicas, timeout_ms)
        result, replicas = pipe.execute()
        if self.cluster and self.client.get_node_from_key(key) is not node:
            raise redis.ConnectionError("the key's slot moved during the write: its replication is unconfirmed")
        if replicas < self.wait_replicas and (confirm is None or confirm(result)):
            raise Unreplicated(f"written, but {replicas} of {self.wait_replicas} replicas confirmed it within "
                               f"{timeout_ms} ms: it may not survive a failover")
        return result

    @contextmanager
    def _call(self, what: str, trips_breaker: bool = True) -> Iterator[None]:
        """A Redis failure becomes ``StoreUnavailable`` with a message and, for calls on the request path,
        is remembered so that reads skip Redis for ``RETRY_AFTER_S``; a success forgets it. (The follower's
        blocking reads do not trip it: a connection that broke under a long wait says little about the next
        request's.)"""
        try:
            yield
        except (redis.RedisError, redis.exceptions.RedisClusterException) as err:
            failure = self._describe(err)
            if trips_breaker and isinstance(err, (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ClusterError,
                                                  redis.exceptions.RedisClusterException)):
                self._failed_at, self._failure = time.monotonic(), failure  # a reply (OOM...) is not an outage
            raise StoreUnavailable(f"cannot {what}: {failure}") from err
        if trips_breaker:
            self._failed_at = None

    def _describe(self, err: Exception) -> str:
        return f"redis at {self.url} unavailable ({type(err).__name__}: {err})"


class _LoopReads:
    """The history reads of one event loop, on its asyncio client. With ``coalesce`` (a single Redis) the reads
    asked for in one turn of the loop go out together as one ``READ_HISTORIES`` call: a saturated worker has
    several requests waiting for their histories at once, and redis-py's cost per call (about 0.1 ms of CPU, most
    of a read) is then paid once for them all. A request alone waits one more turn of the loop. On a cluster each
    read is a call of its own (a script's keys must share a slot)."""

    def __init__(self, client: redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster, coalesce: bool,
                 cache: HistoryCache | None = None):
        self.client, self.coalesce, self.cache = client, coalesce, cache
        self.waiting: list[tuple[str, str, asyncio.Future]] = []
        self.calls: set[asyncio.Task] = set()  # (a running task must be referenced)

    async def read(self, ver: str, hist: str) -> Reply:
        """The user's version and history (its keys), as ``READ_HISTORIES`` returns them for one user: kept by
        ``cache`` (if any) until Redis says the user's version changed."""
        cache = self.cache
        if cache is not None and (kept := cache.get(ver)) is not None:
            FROM_MEMORY.inc()
            return kept
        FROM_REDIS.inc()
        if cache is None:
            return await self._read(ver, hist)
        generation, reply = cache.begin(ver), None
        try:
            reply = await self._read(ver, hist)
            return reply
        finally:
            cache.end(ver, generation, reply)

    async def _read(self, ver: str, hist: str) -> Reply:
        if not self.coalesce:
            return await self._eval(ver, hist)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.waiting.append((ver, hist, future))
        if len(self.waiting) == 1:
            loop.call_soon(self._send, loop)  # after the requests ready in this turn asked for theirs
        return await future

    async def _eval(self, *keys: str) -> list:
        """``READ_HISTORIES`` on these keys. After one call's connection error, redis-py's asyncio cluster client
        disconnects connections that other calls are still connecting or writing on, and those calls fail with the
        closed writer's ``'NoneType' object ...`` AttributeError or TypeError (redis-py #3546) instead of a
        ``ConnectionError`` its own retries would take (seen in CI: one of five concurrent first reads). Such a call
        is sent once more; failing so again, it is a ``ConnectionError`` (the store unavailable, not a crash)."""
        for _ in range(2):
            try:
                return await self.client.eval(READ_HISTORIES, len(keys), *keys)
            except (AttributeError, TypeError) as err:
                if "NoneType" not in str(err):
                    raise
                closed = err
        raise redis.ConnectionError(f"connection closed while in use ({type(closed).__name__}: {closed})") from closed

    def _send(self, loop: asyncio.AbstractEventLoop) -> None:
        waiting, self.waiting = self.waiting, []
        for start in range(0, len(waiting), READS_PER_CALL):
            call = loop.create_task(self._call(waiting[start:start + READS_PER_CALL]))
            self.calls.add(call)
            call.add_done_callback(self.calls.discard)

    async def _call(self, batch: list[tuple[str, str, asyncio.Future]]) -> None:
        """One call for ``batch``; its answer (or failure) handed to each read still waiting (a request cancelled
        meanwhile is not)."""
        keys = [key for ver, hist, _ in batch for key in (ver, hist)]
        try:
            replies = await self._eval(*keys)
        except asyncio.CancelledError:
            for *_, future in batch:
                future.cancel()
            raise
        except Exception as err:
            for *_, future in batch:
                if not future.done():
                    future.set_exception(err)
            return
        for i, (*_, future) in enumerate(batch):
            if not future.done():
                future.set_result((replies[2 * i], replies[2 * i + 1]))


def _start(after: Position | None, shard: int, cluster: bool) -> str:
    """The XRANGE bound just after a watermark's entry for ``shard`` (the start of the stream when none)."""
    if after is None:
        return "-"
    pair = tuple(after[2 * shard:2 * shard + 2]) if cluster else tuple(after)
    return "(%d-%d" % pair if len(pair) == 2 else "-"


def _split_seen(value: bytes) -> tuple[str, str]:
    """A stored key's value, ``digest + "\\n" + answer``, back into its two parts."""
    digest, _, answer = value.decode().partition("\n")
    return digest, answer


def _entries(reply) -> list:
    """XREAD's entries for its one stream (a cluster client answers a dict, a single one a list)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return next(iter(reply.values()))[0]
    return reply[0][1]


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


def _cluster_seeds(url: str) -> tuple[str, list[ClusterNode]]:
    """A cluster URL may name several nodes, ``redis+cluster://[auth@]host1:port1,host2:port2/...``, so that a client
    starting while one of them is down still finds the cluster: redis-py's URL for the first, and all as seeds."""
    url = url.replace("+cluster://", "://", 1)
    parts = urlsplit(url)
    auth, at, hosts = parts.netloc.rpartition("@")
    seeds = [_node(h) for h in hosts.split(",") if h]
    return parts._replace(netloc=f"{auth}{at}{hosts.split(',')[0]}").geturl(), seeds


def _node(address: str) -> ClusterNode:
    """``host:port``, ``[v6 address]:port`` or a bare host (port 6379)."""
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit() or (":" in host and not host.endswith("]")):
        host, port = address, "6379"
    return ClusterNode(host.strip("[]"), int(port))


def _without_password(url: str) -> str:
    """The URL as it may appear in logs, error bodies and manifests: scheme, host(s), port and path only (a
    password can sit in the user part, even after an '@' of its own, or in the query string)."""
    parts = urlsplit(url)
    hosts = parts.netloc.rpartition("@")[2]
    if "," not in hosts:
        hosts = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return f"{parts.scheme}://{hosts}{parts.path}"
