"""Which backend holds the state: the one place that chooses, for the service and the trainer alike.

``open_store`` opens a store for serving (the file backend takes its directory for this process);
``read_source`` reads everything a trainer needs from a source named as on the command line (a
state directory, read without taking it since the service may be running, or a Redis URL).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from recsys.state.files import FileStateStore, read_catalog_log, read_event_log, read_impression_log, store_id
from recsys.state.protocol import Event, Position, StateStore, mark_of, recorded_after

REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")


@dataclass(frozen=True)
class StoreConfig:
    """How to open a store: ``backend`` "file" (``location``: a state directory) or "redis" (a Redis URL;
    ``redis+cluster://`` for a Redis Cluster)."""

    backend: str
    location: str | Path
    history_cap: int = 1000  # online events kept per user for serving
    compact_after: int = 10_000  # file backend: records after which a snapshot is written
    redis_prefix: str = "recsys"
    redis_events_maxlen: int = 10_000_000
    redis_catalog_maxlen: int = 100_000
    impression_retention: int = 1_000_000  # impressions kept (a stream trimmed to it, or log segments)
    feedback_window_s: int = 1800  # how long after an impression feedback still joins it
    redis_shards: int = 16  # a Redis Cluster's events and impressions streams (fixed when its state is first written)
    redis_wait_replicas: int | None = None  # replicas that confirm each acknowledged write (None: 1 on a cluster, else 0)
    idempotency_window_s: int = 86_400  # how long a write's idempotency key is remembered
    idempotency_keys: int = 200_000  # file backend: the most keys remembered (the oldest forgotten first)
    redis_history_cache_mb: int = 64  # single Redis: histories each event loop keeps until invalidated (0: none)

    @property
    def is_redis(self) -> bool:
        return self.backend == "redis"

    @classmethod
    def of_source(cls, source: str, **options) -> "StoreConfig":
        """A source as named on the command line: a Redis URL, else a state directory."""
        return cls("redis" if source.startswith(REDIS_SCHEMES) else "file", source, **options)


def open_store(config: StoreConfig) -> StateStore:
    if config.is_redis:
        from recsys.state.redis import RedisStateStore  # redis-py only where Redis is used

        return RedisStateStore(str(config.location), config.history_cap, config.redis_prefix, config.redis_events_maxlen,
                               config.redis_catalog_maxlen, impression_retention=config.impression_retention,
                               feedback_window_s=config.feedback_window_s, shards=config.redis_shards,
                               wait_replicas=config.redis_wait_replicas, idempotency_window_s=config.idempotency_window_s,
                               history_cache_bytes=config.redis_history_cache_mb << 20)
    return FileStateStore(Path(config.location), config.history_cap, config.compact_after, config.impression_retention,
                          config.feedback_window_s, config.idempotency_window_s, config.idempotency_keys)


@dataclass
class LoggedState:
    """What a state source holds for training: every event with its position, and the catalogue fold."""

    source: str
    events: list[tuple[Position, str, Event]]
    items: dict[str, dict | None]

    @property
    def watermark(self) -> Position | None:
        return mark_of([position for position, _, _ in self.events])

    def histories(self, after: Position | None = None) -> Callable[[str], tuple[int, list[Event]]]:
        """Each user's events recorded after ``after`` (all when None), in the ``(version, events)`` shape of a
        store's ``history``: what a replica starting on this state would serve on top of a bundle."""
        by_user: dict[str, list[Event]] = defaultdict(list)
        for position, user, event in self.events:
            if recorded_after(position, after):
                by_user[user].append(event)
        return lambda user: (len(by_user.get(user, ())), by_user.get(user, []))


def read_source(source: str, redis_prefix: str = "recsys") -> LoggedState:
    """Every event and the catalogue fold of a state directory (read without taking it: the service may be
    running) or a Redis URL."""
    config = StoreConfig.of_source(source, history_cap=1, redis_prefix=redis_prefix)
    if config.is_redis:
        store = open_store(config)
        try:  # events first: every item an event names was added before it, so the later fold holds it
            events = store.events_since()
            items, _ = store.catalog()
            return LoggedState(store.source, events, items)
        finally:
            store.close()
    directory = Path(source)
    if not (directory / "events.jsonl").exists() and not (directory / "catalog.jsonl").exists():
        raise FileNotFoundError(f"{directory}: no events.jsonl or catalog.jsonl (not a state directory)")
    return LoggedState(f"file:{store_id(directory)}", read_event_log(directory), read_catalog_log(directory))


def read_impressions(source: str, redis_prefix: str = "recsys") -> list[dict]:
    """Every retained impression of a source named as for ``read_source``, oldest first."""
    config = StoreConfig.of_source(source, history_cap=1, redis_prefix=redis_prefix)
    if config.is_redis:
        store = open_store(config)
        try:
            return store.impressions_since(0)
        finally:
            store.close()
    return read_impression_log(Path(source))
