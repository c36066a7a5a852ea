"""Users' histories kept by a worker on a single Redis until Redis invalidates them (``HistoryCache``): a kept
history is served without a read, and never one older than an acknowledged event, whoever wrote it, whatever
happened to the connection that brings the invalidations."""
from __future__ import annotations

import asyncio
import time

import pytest
import redis
import redis.asyncio
from prometheus_client import REGISTRY

from recsys.state import history_cache
from recsys.state.protocol import Event
from recsys.state.redis import READ_HISTORIES, RedisStateStore
from tests.servicekit import redis_server, unique_prefix


@pytest.fixture
def reads(monkeypatch) -> list[int]:
    """The users each history read sent to Redis asked for (one entry per call)."""
    calls: list[int] = []
    real_eval = redis.asyncio.Redis.eval

    async def counted(client, script, numkeys, *keys):
        calls.append(numkeys // 2)
        return await real_eval(client, script, numkeys, *keys)

    monkeypatch.setattr(redis.asyncio.Redis, "eval", counted)
    return calls


def stores(url: str, **options) -> tuple[RedisStateStore, RedisStateStore]:
    """The serving worker's store, and another replica's on the same state (the writer)."""
    prefix = unique_prefix()
    return RedisStateStore(url, 100, prefix, **options), RedisStateStore(url, 100, prefix)


def counted_reads(source: str) -> float:
    """``recsys_history_reads_total`` (what an operator reads the hit ratio from)."""
    return REGISTRY.get_sample_value("recsys_history_reads_total", {"source": source})


def run_and_close(main, served: RedisStateStore, *others: RedisStateStore) -> None:
    """``main()`` on an event loop of its own, then the serving store's connections on that loop and every store
    closed."""
    async def run():
        try:
            await main()
        finally:
            await served.aclose()

    try:
        asyncio.run(run())
    finally:
        for store in (served, *others):
            store.close()


async def reopened(served: RedisStateStore) -> None:
    """Once the cache's invalidation connection is back (it is reopened about a second after it was lost)."""
    deadline = time.monotonic() + 5
    while cache_of(served).conn is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def dropped(served: RedisStateStore) -> None:
    """Once the cache has read an invalidation of everything and kept nothing since (the loop's ticks read it)."""
    deadline = time.monotonic() + 5
    while cache_of(served).entries and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def cache_of(store: RedisStateStore) -> history_cache.HistoryCache:
    return store._loop_reads().cache


def test_a_kept_history_is_served_without_a_read_and_every_write_is_seen_by_the_next_one(redis_url, reads):
    served, writer = stores(redis_url)
    before = {source: counted_reads(source) for source in ("memory", "redis")}

    async def run():
        assert await served.history_async("u1") == (0, [])
        assert await served.history_async("u1") == (0, []) and sum(reads) == 1  # the second from memory
        for n in range(1, 201):  # another replica writes; the very next read sees it
            writer.append_event("u1", Event(f"i{n}", None, n))
            version, events = await served.history_async("u1")
            assert (version, events[-1]) == (n, Event(f"i{n}", None, n))
            assert await served.history_async("u1") == (version, events)
        assert sum(reads) == 1 + 200  # a read after each write, none for the repeats
        writer.append_event("u2", Event("x", None, 1))  # another user's change leaves u1 kept
        assert (await served.history_async("u1"))[0] == 200 and sum(reads) == 201

    run_and_close(run, served, writer)
    assert {source: counted_reads(source) - n for source, n in before.items()} == {"memory": 202, "redis": 201}


def test_a_worker_opens_its_connections_at_start_not_at_its_first_read(redis_url, reads, monkeypatch):
    """``aopen`` (the service's start) makes the loop's client and the cache's invalidation connection, so the
    first request waits for neither; a Redis that does not answer then is logged, not raised."""
    served, writer = stores(redis_url)

    async def run():
        await served.aopen()
        assert asyncio.get_running_loop() in served._async_clients and cache_of(served).conn is not None
        assert sum(reads) == 0 and await served.history_async("u1") == (0, []) and sum(reads) == 1

        async def refused(client):
            raise redis.ConnectionError("refused")

        monkeypatch.setattr(redis.asyncio.Redis, "ping", refused)
        await served.aopen()

    run_and_close(run, served, writer)


def test_a_read_overtaken_by_a_write_is_served_but_not_kept(redis_url, reads, monkeypatch):
    """The answer of a read that Redis sent before a write, and that arrives after that write's invalidation, is
    older than the write: kept, it would be served after the write was acknowledged."""
    from recsys.state.redis import _LoopReads

    served, writer = stores(redis_url)
    real_read = _LoopReads._read

    async def overtaken(self, ver, hist):
        reply = await real_read(self, ver, hist)
        writer.append_event("u1", Event("late", None, 2))  # acknowledged after the read's answer left Redis
        return reply

    async def run():
        writer.append_event("u1", Event("first", None, 1))
        monkeypatch.setattr(_LoopReads, "_read", overtaken)
        assert (await served.history_async("u1"))[0] == 1  # what Redis answered, before the write
        monkeypatch.setattr(_LoopReads, "_read", real_read)
        assert (await served.history_async("u1"))[0] == 2  # not kept: read again
        assert (await served.history_async("u1"))[0] == 2 and sum(reads) == 2  # this one is kept

    run_and_close(run, served, writer)


def test_a_lost_connection_drops_what_is_kept_until_it_is_back(tmp_path, reads):
    """With the invalidation connection gone, a write's invalidation is lost: nothing kept may be served; once
    the connection is reopened (about a second later), histories are kept again."""
    with redis_server(tmp_path / "redis") as url:
        served, writer = stores(url)
        admin = redis.Redis.from_url(url)

        async def run():
            await served.history_async("u1")
            await served.history_async("u1")
            assert sum(reads) == 1
            assert admin.client_kill_filter(_type="pubsub") == 1  # the cache's connection
            writer.append_event("u1", Event("i1", None, 1))  # its invalidation goes nowhere
            assert (await served.history_async("u1"))[0] == 1 and sum(reads) == 2
            assert (await served.history_async("u1"))[0] == 1 and sum(reads) == 3  # not kept meanwhile
            await reopened(served)
            await served.history_async("u1")
            assert (await served.history_async("u1"))[0] == 1 and sum(reads) == 4  # kept again
            admin.flushdb()  # everything may have changed
            await dropped(served)  # (Redis's invalidation of everything may reach the cache just after FLUSHDB's reply)
            assert (await served.history_async("u1")) == (0, []) and sum(reads) == 5

        run_and_close(run, served, writer)


def test_a_read_sent_while_the_connection_was_down_is_not_kept_once_it_is_back(tmp_path, reads, monkeypatch):
    """A write acknowledged while the connection is down sends its invalidation nowhere: a read answered before
    that write must not be kept by the connection opened after it."""
    from recsys.state.redis import _LoopReads

    real_read = _LoopReads._read
    with redis_server(tmp_path / "redis") as url:
        served, writer = stores(url)
        admin = redis.Redis.from_url(url)

        async def reopened_meanwhile(self, ver, hist):
            reply = await real_read(self, ver, hist)
            writer.append_event("u1", Event("i1", None, 1))  # its invalidation is lost
            await reopened(served)
            assert cache_of(served).conn is not None
            return reply

        async def run():
            await served.history_async("u1")
            assert admin.client_kill_filter(_type="pubsub") == 1
            monkeypatch.setattr(_LoopReads, "_read", reopened_meanwhile)
            assert await served.history_async("u1") == (0, [])  # answered before the write
            monkeypatch.setattr(_LoopReads, "_read", real_read)
            assert (await served.history_async("u1"))[0] == 1

        run_and_close(run, served, writer)


def test_a_connection_that_stopped_answering_pings_is_not_trusted(redis_url, reads):
    """A connection can go silent without closing (a network partition): then invalidations stop arriving
    unnoticed. What is kept is served only while Redis answered a ping sent within ``STALE_AFTER_S``."""
    served, _ = stores(redis_url)

    async def run():
        await served.history_async("u1")
        await served.history_async("u1")
        assert sum(reads) == 1
        await asyncio.sleep(2 * history_cache.PING_EVERY_S + 0.1)  # pings sent and answered meanwhile
        await served.history_async("u1")
        assert sum(reads) == 1
        cache_of(served).confirmed_at -= history_cache.STALE_AFTER_S + 0.1  # as if the answers stopped coming
        cache_of(served).ping_sent_at = None  # (and none in flight that would answer)
        await served.history_async("u1")
        assert sum(reads) == 2

    run_and_close(run, served)


def test_the_least_recently_used_history_goes_first_beyond_the_budget(redis_url, reads):
    served, writer = stores(redis_url)
    for user in ("u0", "u1", "u2", "u3"):
        for t in range(20):
            writer.append_event(user, Event(f"item-{t}", 1.0, 1_700_000_000 + t))
    _, packed = writer.client.eval(READ_HISTORIES, 2, *writer.layout.user("u0")[:0:-1])
    served.history_cache_bytes = budget = int(3.5 * (history_cache.ENTRY_BYTES + len(packed)))  # three fit, not four

    async def run():
        for user in ("u0", "u1", "u2", "u0", "u3"):  # u1, the least recently used, makes room for u3
            await served.history_async(user)
        assert sum(reads) == 4
        for user in ("u0", "u2", "u3"):
            await served.history_async(user)
        assert sum(reads) == 4
        await served.history_async("u1")
        assert sum(reads) == 5
        assert 0 < cache_of(served).size <= budget

    run_and_close(run, served, writer)


def test_a_redis_that_refuses_client_tracking_is_read_every_time(tmp_path, reads, warnings):
    """Redis before 6, or an ACL without ``CLIENT``: nothing is kept, and the service works as without the cache."""
    with redis_server(tmp_path / "redis") as url:
        admin = redis.Redis.from_url(url)
        admin.acl_setuser("reader", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
                          commands=["+@all", "-client"])
        served = RedisStateStore(url.replace("redis://", "redis://reader:pw@"), 100, unique_prefix())

        async def run():
            for _ in range(3):
                assert await served.history_async("u1") == (0, [])

        run_and_close(run, served)
        assert sum(reads) == 3
        assert any("Redis refused client tracking" in line for line in warnings)


def test_no_cache_on_a_cluster_nor_when_turned_off(redis_url, redis_cluster_url):
    async def caches():
        stores_ = [RedisStateStore(redis_cluster_url, 100, unique_prefix()),
                   RedisStateStore(redis_url, 100, unique_prefix(), history_cache_bytes=0)]
        try:
            return [s._loop_reads().cache for s in stores_]
        finally:
            for s in stores_:
                await s.aclose()
                s.close()

    assert asyncio.run(caches()) == [None, None]


def _write_on_request(url: str, prefix: str, conn) -> None:
    """Another process: append an event each time it is asked, and send back Redis's acknowledgement (the version)."""
    store = RedisStateStore(url, 10, prefix)
    while (n := conn.recv()) is not None:
        conn.send(store.append_event("u", Event(f"i{n}", None, n)))
    store.close()


def test_an_event_acknowledged_to_another_process_is_in_the_next_read_at_once(redis_url):
    """The tightest race on one host: the acknowledgement reaches this process through a pipe, faster than any HTTP
    client could send the next request, and the history read at once must hold the event (its invalidation was
    written by Redis in the same turn as the acknowledgement)."""
    import multiprocessing

    prefix = unique_prefix()
    served = RedisStateStore(redis_url, 10, prefix)
    here, there = multiprocessing.Pipe()
    writer = multiprocessing.get_context("spawn").Process(target=_write_on_request, args=(redis_url, prefix, there))
    writer.start()

    async def run() -> list[tuple[int, int]]:
        older = []
        try:
            for n in range(2000):
                await served.history_async("u")  # kept
                here.send(n)
                acknowledged = here.recv()
                version, _ = await served.history_async("u")
                if version < acknowledged:
                    older.append((version, acknowledged))
        finally:
            here.send(None)
            await served.aclose()
        return older

    try:
        assert asyncio.run(run()) == []
    finally:
        writer.join(10)
        served.close()


def test_an_event_is_acknowledged_after_a_later_turn_of_redis_only_where_histories_are_kept(tmp_path):
    """Redis writes a write's invalidations in the same turn as its reply, not always before it: the event's writer
    sends one more command once the reply is back (read in a later turn, so answered after the invalidations were
    written). Where no worker keeps histories, or WAIT already answers in a later turn, it costs nothing."""
    with redis_server(tmp_path / "redis") as url:
        admin = redis.Redis.from_url(url)

        def pings_per_event(**options) -> int:
            store = RedisStateStore(url, 10, unique_prefix(), **options)
            assert store.source  # (its set-up commands before the counting)
            before = admin.info("commandstats").get("cmdstat_ping", {}).get("calls", 0)
            for n in range(5):
                store.append_event("u", Event(f"i{n}", None, n))
            store.close()
            return (admin.info("commandstats").get("cmdstat_ping", {}).get("calls", 0) - before) / 5

        assert pings_per_event() == 1
        assert pings_per_event(history_cache_bytes=0) == 0
