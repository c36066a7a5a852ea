"""The state-store protocol and the types both backends share.

A state store holds what serving adds to a bundle: every event (user, item, rating, time), each
user's recent online history, and catalogue changes in one order. ``StateStore`` is the one
interface; ``recsys.state.files`` (fsynced local logs, the embedded default) and
``recsys.state.redis`` (shared by replicas) implement it, and ``recsys.state.open`` chooses one.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Protocol

from recsys.query import Item

FEEDBACK_FIELDS = ("type", "request_id", "position")
CHANGES_PAGE = 1000  # the most catalogue changes one ``changes_since`` returns: a replica far behind applies a page per hold


class Event(NamedTuple):
    """An interaction. Feedback on an answer also names its ``type`` (click, purchase...), the ``request_id``
    of the answer and the 1-based ``position`` it was shown at; histories keep only the first three fields."""

    item_id: str
    rating: float | None
    timestamp: int
    type: str | None = None
    request_id: str | None = None
    position: int | None = None

    @property
    def interaction(self) -> "Event":
        """What a user's history keeps."""
        return Event(self.item_id, self.rating, self.timestamp) if self.type or self.request_id else self

    def record(self, user_id: str) -> dict:
        """The logged form: an event without feedback fields is written exactly as before they existed."""
        out = {"user_id": user_id, "item_id": self.item_id, "rating": self.rating, "timestamp": self.timestamp}
        out.update({k: getattr(self, k) for k in FEEDBACK_FIELDS if getattr(self, k) is not None})
        return out


Position = tuple[int, ...]  # where a record sits in the store's order: (offset, 0) or (ms, seq); (0, 0) = the start
Change = tuple[Position, str, "dict | None"]  # (position, item id, the item's dump or None for a removal)


def mark_of(positions: list[Position]) -> Position | None:
    """The watermark of the events at ``positions`` (a store's events, read in its order): the last position.
    A sharded store's events (``(ms, seq, shard)``: streams on different nodes have no common order) give how far
    each shard was read instead, flat: ``(ms0, seq0, ms1, seq1, ...)``, ``(0, 0)`` for a shard none came from."""
    if not positions:
        return None
    if len(positions[0]) == 2:
        return tuple(positions[-1])
    mark = [0] * (2 * (max(p[2] for p in positions) + 1))
    for ms, seq, shard in positions:
        mark[2 * shard:2 * shard + 2] = max((ms, seq), tuple(mark[2 * shard:2 * shard + 2]))
    return tuple(mark)


def recorded_after(position: Position, mark: Position | None) -> bool:
    """Whether the event at ``position`` came after the watermark ``mark`` (``mark_of``), i.e. a bundle trained
    up to ``mark`` does not hold it. A shard missing from a sharded mark was not read at all."""
    if mark is None:
        return True
    if len(position) == 3:
        shard = position[2]
        return position[:2] > (tuple(mark[2 * shard:2 * shard + 2]) or (0, 0))
    return tuple(position) > tuple(mark)


class StoreUnavailable(RuntimeError):
    """The store cannot be reached: writes answer 503, reads fall back to the bundle."""


class Once(NamedTuple):
    """A write's idempotency key (chosen by the client, kept by the store for its window, scoped per user for
    events and per catalogue for item changes), the ``digest`` of the request that carried it, and the ``answer``
    (JSON text) a retry is given back. The key is recorded in the same atomic write as what it guards, so a retry
    after a write that committed but whose reply was lost (a timeout) finds it."""

    key: str
    digest: str
    answer: str = ""


class AlreadyRecorded(Exception):
    """A write whose key the store holds: nothing was written again. Carries what the first write stored (its
    ``digest`` and ``answer``) and, for an event, the user's history version now."""

    def __init__(self, digest: str, answer: str, version: int = 0):
        super().__init__(f"already recorded (digest {digest})")
        self.digest, self.answer, self.version = digest, answer, version


class StateStore(Protocol):
    def append_event(self, user_id: str, event: Event, once: Once | None = None) -> int:
        """Durably record an event; returns the user's history version after it (events ever recorded). With
        ``once``, raises ``AlreadyRecorded`` instead when the user already has an event under that key within the
        idempotency window (the check and the write are one atomic step)."""

    def previous_write(self, key: str, user_id: str | None = None) -> AlreadyRecorded | None:
        """The write recorded under an idempotency key within the window (the user's event key, or with no user a
        catalogue write's), else None."""

    def history(self, user_id: str, after: Position | None = None) -> tuple[int, list[Event]]:
        """The user's version and most recent online events (oldest first, at most ``history_cap``);
        with ``after``, only the events recorded after that position (a bundle trained on the events up to
        its watermark already holds the earlier ones in its history)."""

    async def history_async(self, user_id: str, after: Position | None = None) -> tuple[int, list[Event]]:
        """``history`` for a caller on an event loop: it never blocks the loop (what ``/recommend`` awaits before it
        answers on the loop itself)."""

    async def aopen(self) -> None:
        """Open what the running event loop reads through (``history_async``'s connections) now, at start, so that the
        first request does not wait for them; never raises for a store that is down (its reads will say so)."""

    async def aclose(self) -> None:
        """Release what the running event loop holds (``history_async``'s connections); ``close`` releases the rest."""

    def events_since(self, after: Position | None = None) -> list[tuple[Position, str, Event]]:
        """Every recorded event after ``after`` (all when None), in order, with its position: what a
        trainer reads (``python -m offline train --events``); ``mark_of`` their positions is its watermark, and
        ``after`` is such a watermark."""

    def append_changes(self, changes: list[tuple[str, dict | None]], once: Once | None = None) -> Position:
        """Durably record ``(item_id, item)`` upserts (``item``) or removals (``None``), in order, as one atomic
        write (one fsync, one round trip); returns the last one's position. With ``once``, raises
        ``AlreadyRecorded`` instead when the catalogue already holds a write under that key within the window."""

    def catalog(self) -> tuple[dict[str, dict | None], Position]:
        """Every changed item's latest state, and the position that fold covers."""

    def changes_since(self, position: Position, wait_s: float = 0.0) -> list[Change]:
        """Changes after ``position`` in order, waiting up to ``wait_s`` for one when there are none; a backend may
        return the first ``CHANGES_PAGE`` of them only (a full page: read on from its last).
        Raises ``LookupError`` when changes after ``position`` are no longer kept (re-read ``catalog()``)."""

    def append_impressions(self, records: list[dict]) -> None:
        """Log impressions (a batch from the writer thread; kept up to the configured retention, each findable
        by ``impression`` for the feedback window)."""

    def impression(self, request_id: str) -> dict | None:
        """The impression of ``request_id`` while within the feedback window, else None."""

    def impressions_since(self, since_ms: int) -> list[dict]:
        """Retained impressions whose ``ts_ms`` (the serving replica's clock) is at or after ``since_ms``, oldest
        first."""

    def feedback_since(self, since_ms: int) -> list[tuple[str, Event]]:
        """``(user, event)`` for every retained event that names a request, recorded at or after ``since_ms``
        (a backend without time positions may return earlier ones: the join drops them)."""

    def experiments(self) -> dict[str, dict]:
        """Every defined experiment's record, by name."""

    def put_experiment(self, name: str, record: dict) -> None: ...

    def delete_experiment(self, name: str) -> bool:
        """Whether there was one to delete."""

    def health(self) -> str | None:
        """None when the store answers, else why not."""

    @property
    def source(self) -> str:
        """Which state this is (a directory, or a Redis server and prefix): a bundle's event watermark
        applies only to the source its trainer read."""

    def close(self) -> None: ...


def parse_event(record: Any) -> tuple[str, Event]:
    """A logged event, type-checked: a log edited by hand or by an older version may hold anything."""
    user, item, rating, ts = (record.get(k) for k in ("user_id", "item_id", "rating", "timestamp"))
    if not (isinstance(user, str) and user and isinstance(item, str) and item):
        raise ValueError("user_id and item_id must be non-empty strings")
    if rating is not None and (isinstance(rating, bool) or not isinstance(rating, (int, float)) or not math.isfinite(rating)):
        raise ValueError(f"rating {rating!r} is not a finite number")
    if isinstance(ts, bool) or not isinstance(ts, int) or not 0 <= ts < 2**63:
        raise ValueError(f"timestamp {ts!r} is not epoch seconds")
    kind, request_id, position = (record.get(k) for k in FEEDBACK_FIELDS)
    if not all(v is None or isinstance(v, str) for v in (kind, request_id)):
        raise ValueError("type and request_id must be strings")
    if position is not None and (isinstance(position, bool) or not isinstance(position, int) or position < 1):
        raise ValueError(f"position {position!r} is not a 1-based integer")
    return user, Event(item, None if rating is None else float(rating), ts, kind, request_id, position)


def parse_change(record: Any) -> tuple[str, dict | None]:
    """A logged catalogue change: an upsert with a valid item, or a removal; anything else is an error."""
    op = record.get("op")
    if op == "upsert":
        try:
            item = Item.from_record(record.get("item"))
        except ValueError as err:
            raise ValueError(f"invalid item ({err})") from None
        return str(item.item_id), item.to_record()
    if op == "remove":
        if not isinstance(record.get("item_id"), str):
            raise ValueError("item_id must be a string")
        return record["item_id"], None
    raise ValueError(f"unknown op {op!r}")
