"""Users' histories read from a single Redis, kept by each event loop until Redis says they changed: Redis's
client-side caching (``CLIENT TRACKING ... BCAST``, Redis 6+), so that a returning user's ``/recommend`` does not
wait on a round trip to Redis (measured: 1.8 ms of a 7 ms p99 at 200 req/s on two cores, docs/benchmarks.md).

Why a kept history is not older than an acknowledged event (``POST /events``: the next ``/recommend`` reflects it,
on any replica): every write to a user's version key makes Redis send this connection an invalidation, and the event
is acknowledged only after one more round trip to Redis (``RedisStateStore._invalidations_written``; with ``WAIT``
the reply itself waits), which Redis answers in a later turn of its loop, once every invalidation of the write was
written. Before a kept history is served, every message already received is read (a non-blocking ``recv``, about 5
us). On one host the invalidation is then in the worker's socket before the client has its acknowledgement
(tests/state/test_history_cache.py races it across processes). Across hosts it assumes that the invalidation, sent
at once on a direct path, arrives before a request the client sends after its acknowledgement came back over two
hops. A connection that goes quiet is not trusted for long: a kept history is served only while Redis answered,
within ``STALE_AFTER_S``, a ping sent on the same connection (every invalidation sent before Redis read the ping has
then been read), and the connection is reopened (everything kept dropped) when one goes unanswered for twice that.
``RECSYS_REDIS_HISTORY_CACHE_MB=0`` turns this off: every request reads Redis, as before.

Not on a Redis Cluster (each master would need its own tracking connection, and a failover its re-subscription).
"""
from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

import redis
from loguru import logger

INVALIDATE = b"__redis__:invalidate"
PING_EVERY_S = 0.25
STALE_AFTER_S = 1.0  # serve what is kept only while Redis answered a ping sent at most this long ago
REOPEN_AFTER_S = 1.0  # after the connection was lost or could not be opened
ENTRY_BYTES = 200  # what an entry costs beyond its history's bytes (its key, the tuple, the dict's slot)

Reply = tuple[bytes | None, bytes]  # a user's version and history, as ``READ_HISTORIES`` returns them


class HistoryCache:
    """The histories one event loop read (keyed by the user's version key), least recently used dropped first beyond
    ``budget_bytes``. Every method but ``close`` runs on that loop's thread."""

    def __init__(self, url: str, prefix: str, budget_bytes: int, timeout_s: float):
        self.url, self.prefix, self.budget, self.timeout_s = url, prefix, budget_bytes, timeout_s
        self.entries: OrderedDict[str, Reply] = OrderedDict()
        self.size = 0
        self.reading: dict[str, int] = {}  # version keys with reads in flight: how many
        self.changed: set[str] = set()  # of those, the ones invalidated meanwhile: their answers may be older
        self.generation = 0  # moved when everything kept is dropped: reads begun before it keep nothing
        self.conn: redis.Connection | None = None
        self.confirmed_at = float("-inf")  # every invalidation Redis sent before this time has been read
        self.ping_sent_at: float | None = None
        self.reopen_at = 0.0
        self.opening = self.closed = self.refused = self.failing = False

    # ------------------------------------------------------------------ what a read asks
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Open the invalidation connection now (the first read waits for it once), then keep it alive."""
        self._opened(self._open())
        loop.call_later(PING_EVERY_S, self._tick, loop)

    def get(self, key: str) -> Reply | None:
        if not self._current():
            return None
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def begin(self, key: str) -> int:
        """A read of ``key`` is sent; ``end`` is called with what it answered."""
        self.reading[key] = self.reading.get(key, 0) + 1
        return self.generation

    def end(self, key: str, generation: int, reply: Reply | None) -> None:
        """Keep ``reply`` unless the key was invalidated while it was read (the answer may predate the change) or
        everything was dropped meanwhile."""
        if reply is not None and self._current() and generation == self.generation and key not in self.changed:
            self._put(key, reply)
        left = self.reading[key] - 1
        if left:
            self.reading[key] = left
        else:
            del self.reading[key]
            self.changed.discard(key)

    def close(self) -> None:
        self.closed = True
        if self.conn is not None:
            self.conn.disconnect()
            self.conn = None
        self._drop_all()

    # ------------------------------------------------------------------ the invalidation connection
    def _current(self) -> bool:
        """Whether what is kept may be served: the connection up, every message already received read, and a
        recent ping answered (a silent connection would lose invalidations unnoticed)."""
        if self.conn is None:
            return False
        self._drain()
        return self.conn is not None and time.monotonic() - self.confirmed_at <= STALE_AFTER_S

    def _drain(self) -> None:
        """Read every message already received, never waiting for one."""
        try:
            while self.conn.can_read(timeout=0):
                self._on(self.conn.read_response())
        except (redis.RedisError, OSError) as err:
            self._lost(f"{type(err).__name__}: {err}")

    def _on(self, message: list) -> None:
        if message[0] == b"pong":
            if self.ping_sent_at is not None:
                self.confirmed_at, self.ping_sent_at = self.ping_sent_at, None
        elif message[0] == b"message" and message[1] == INVALIDATE:
            if message[2] is None:  # FLUSHALL, FLUSHDB: everything may have changed
                self._drop_all()
                return
            for raw in message[2]:
                key = raw.decode()
                self._pop(key)
                if key in self.reading:
                    self.changed.add(key)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        """Every ``PING_EVERY_S``: read what arrived, ping (or give up on a connection that stopped answering), or
        reopen a lost connection on a thread (a connection attempt must not hold the loop)."""
        if self.closed:
            return
        loop.call_later(PING_EVERY_S, self._tick, loop)
        now = time.monotonic()
        if self.conn is not None:
            self._drain()
        if self.conn is not None:
            if self.ping_sent_at is None:
                try:
                    self.conn.send_command("PING")
                    self.ping_sent_at = now
                except (redis.RedisError, OSError) as err:
                    self._lost(f"{type(err).__name__}: {err}")
            elif now - self.ping_sent_at > 2 * STALE_AFTER_S:
                self._lost(f"no answer to a ping in {now - self.ping_sent_at:.1f} s")
        elif not (self.opening or self.refused) and now >= self.reopen_at:
            try:
                opening = loop.run_in_executor(None, self._open)
            except RuntimeError:  # the loop is shutting down (its executor gone): nothing left to serve
                return
            self.opening = True
            opening.add_done_callback(lambda done: self._opened(done.result()))

    def _open(self) -> redis.Connection | Exception:
        """A RESP2 connection that receives the invalidations of every key under ``prefix`` (its own redirect
        target), or the error that stopped it."""
        try:
            pool = redis.ConnectionPool.from_url(self.url, protocol=2, socket_timeout=self.timeout_s,
                                                 socket_connect_timeout=self.timeout_s, health_check_interval=0)
            conn = pool.make_connection()
            conn.connect()
            conn.send_command("CLIENT", "ID")
            own = conn.read_response()
            conn.send_command("CLIENT", "TRACKING", "ON", "REDIRECT", own, "BCAST", "PREFIX", self.prefix)
            conn.read_response()
            conn.send_command("SUBSCRIBE", INVALIDATE)
            conn.read_response()
            return conn
        except (redis.RedisError, OSError) as err:
            return err

    def _opened(self, conn: redis.Connection | Exception) -> None:
        self.opening = False
        if isinstance(conn, redis.ResponseError):  # Redis before 6, or an ACL without CLIENT: reads go to Redis
            self.refused = True
            logger.warning("redis history cache off: Redis refused client tracking ({})", conn)
        elif isinstance(conn, Exception):
            if not self.failing:
                logger.warning("redis history cache: cannot open its connection ({}); reading Redis meanwhile", conn)
            self.failing, self.reopen_at = True, time.monotonic() + REOPEN_AFTER_S
        elif self.closed:
            conn.disconnect()
        else:
            self.conn, self.confirmed_at, self.ping_sent_at, self.failing = conn, time.monotonic(), None, False
            self._drop_all()  # a read sent before tracking began may be older than a change it was not told of

    def _lost(self, why: str) -> None:
        logger.warning("redis history cache: invalidations lost ({}); reading Redis until they are back", why)
        if self.conn is not None:
            self.conn.disconnect()
        self.conn, self.ping_sent_at, self.failing = None, None, True
        self.reopen_at = time.monotonic() + REOPEN_AFTER_S
        self._drop_all()

    # ------------------------------------------------------------------ what is kept
    def _put(self, key: str, reply: Reply) -> None:
        self._pop(key)
        self.entries[key] = reply
        self.size += ENTRY_BYTES + len(reply[1])
        while self.size > self.budget and self.entries:
            self._pop(next(iter(self.entries)))

    def _pop(self, key: str) -> None:
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.size -= ENTRY_BYTES + len(entry[1])

    def _drop_all(self) -> None:
        self.entries.clear()
        self.size = 0
        self.generation += 1
