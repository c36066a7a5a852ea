"""User resolution: who is asking (a known user, or a cold one by features and recent items), their history
(the bundle's plus the online events), and what is computed from it once per history version (the tower's
vector, the ranker's user features), cached until an event changes it."""
from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from recsys import metrics
from recsys.bundle import Bundle
from recsys.engine.catalog import LiveCatalog
from recsys.errors import InvalidInput, Unavailable, UnknownId
from recsys.dataset import FeatureTable
from recsys.features import FeatureSpec, codes_of, encode_user_features, user_tower_inputs
from recsys.rank_features import RankerTables, UserFeatures, user_features
from recsys.state.protocol import Event, StoreUnavailable

History = Callable[[str], tuple[int, list[Event]]]  # the state store's (version, online events) of a user
AsyncHistory = Callable[[str], Awaitable[tuple[int, list[Event]]]]  # the same, read on an event loop


def _in_time_order(items: np.ndarray, ratings: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A history as training orders it: by time, stably (equal times keep their order: the bundle's events, then
    the store's in the order recorded); recent_items (no time) last. The store keeps events in the order they
    arrived, and a client may send one with an earlier timestamp (a backfill): the tower's newest slot and the
    ranker's recency are the newest in time, as the next training will see them."""
    if len(times) < 2 or not (np.diff(times) < 0).any():  # (NaN compares false: recent_items, last, pass)
        return items, ratings, times
    order = np.argsort(times, kind="stable")  # NaN sorts last
    return items[order], ratings[order], times[order]


@dataclass
class UserContext:
    raw_id: str | None
    id_input: int  # user row + 1, or 0 for a user the model never saw
    cat: np.ndarray
    num: np.ndarray
    hist_items: np.ndarray  # item rows, oldest first
    hist_ratings: np.ndarray
    hist_times: np.ndarray  # epoch seconds, float; NaN for items sent as recent_items
    cache_key: str | None = None
    version: int = 0  # the online history's version (events ever recorded for this user)
    known_features: bool = True

    @property
    def empty(self) -> bool:
        return len(self.hist_items) == 0 and self.id_input == 0 and not self.known_features


@dataclass
class Users:
    bundle: Bundle
    spec: FeatureSpec
    live: LiveCatalog
    model_items: int  # items the towers were trained on: rows below this have an id embedding, later ones do not
    history: History = lambda user: (0, [])
    history_async: AsyncHistory | None = None  # None: ``fetch_history_async`` reads ``history`` (no store, or in memory)
    cache_size: int = 100_000
    user_row: dict[str, int] = field(init=False)  # raw id -> the bundle's user row
    user_codes: FeatureTable = field(init=False)  # a new user's raw categorical values -> codes (``codes_of``)
    events_in_bundle: bool = False  # the bundle was trained on recorded events (its history holds those up to a watermark)
    vector_cache: dict[str, tuple[int, np.ndarray]] = field(default_factory=dict)  # user -> (history version, vector)
    feature_cache: dict[str, tuple] = field(default_factory=dict)  # user -> (version, tables, UserFeatures, changes, history length)

    def __post_init__(self) -> None:
        self.user_row = {r: i for i, r in enumerate(self.bundle.catalog["user_ids"])}
        self.user_codes = codes_of(self.bundle.catalog["user_vocab"])

    def resolve(self, user_id: str | int | None, features: dict | None = None, recent_items: list | None = None,
                fetched: tuple[int, list[Event]] | None = None) -> UserContext:
        """A known user (stored features + bundle history + online events) or a cold one. ``fetched``: the user's
        ``fetch_history``, when the caller read it already (before taking the catalogue's read lock)."""
        raw = None if user_id is None else str(user_id)
        fetched = self.fetch_history(raw) if fetched is None else fetched
        version, online = self.online_history(raw, fetched)
        recent = self._item_rows(recent_items or [])
        extra_items = np.array([r for r, _, _ in online] + recent, np.int64)
        extra_ratings = np.array([rating for _, rating, _ in online] + [0.0] * len(recent), np.float32)
        extra_times = np.array([t for _, _, t in online] + [np.nan] * len(recent), np.float64)
        row = self.user_row.get(raw) if raw is not None else None
        if row is not None:
            a = self.bundle.arrays
            lo, hi = a["history_offsets"][row], a["history_offsets"][row + 1]
            items, ratings, times = (np.concatenate([a["history_items"][lo:hi], extra_items]),
                                     np.concatenate([a["history_ratings"][lo:hi], extra_ratings]),
                                     np.concatenate([a["history_timestamps"][lo:hi], extra_times]))
            if online:  # (the bundle's history is in time order already; recent_items go last either way)
                items, ratings, times = _in_time_order(items, ratings, times)
            key = raw if not recent else None  # recent_items make the request one-off: no caching
            return UserContext(raw, row + 1, a["user_cat"][row], a["user_num"][row], items, ratings, times, key, version)
        if raw is not None and not online and features is None and not recent:
            if fetched[1] is UNREAD:  # (the store may know the user: "unknown" would send the client elsewhere)
                raise Unavailable(f"user_id '{raw}' is not in the bundle, and the state store, which holds the "
                                  "histories of users who came after it, cannot be read just now: retry")
            raise UnknownId(f"unknown user_id '{raw}': send features and/or recent_items for a new user")
        features = features or {}
        check_features(features, self.spec.user_categorical, self.spec.user_numeric, "user")
        cat, num = encode_user_features(self.spec, self.user_codes, features)
        key = raw if raw is not None and not recent and not features else None
        known = any(v is not None for v in features.values())
        return UserContext(raw, 0, cat[0], num[0], *_in_time_order(extra_items, extra_ratings, extra_times), key, version,
                           known_features=known)

    def fetch_history(self, user_id: str | int | None) -> tuple[int, list[Event]]:
        """The user's history version and online events, from the state store. If the store cannot be reached
        the user is served from the bundle alone, and the degradation is counted."""
        if user_id is None:
            return 0, []
        try:
            return self.history(str(user_id))
        except StoreUnavailable:
            return _served_without_history()

    async def fetch_history_async(self, user_id: str | int | None) -> tuple[int, list[Event]]:
        """``fetch_history`` awaited on an event loop, with the same degradation."""
        if user_id is None or self.history_async is None:
            return self.fetch_history(user_id)
        try:
            return await self.history_async(str(user_id))
        except StoreUnavailable:
            return _served_without_history()

    def online_history(self, raw: str | None, fetched: tuple[int, list[Event]] | None = None) -> tuple[int, list[tuple[int, float, int]]]:
        """The user's history version and online events as ``(item row, rating, timestamp)``. An event on an
        item this bundle does not know (added online after it, then never replayed here) is skipped."""
        version, events = self.fetch_history(raw) if fetched is None else fetched
        row_of = self.live.catalog.row_of
        return version, [(row_of[e.item_id], e.rating if e.rating is not None else 0.0, e.timestamp)
                         for e in events if e.item_id in row_of]

    def history_length(self, raw_user: str, version: int) -> int:
        """Bundle history plus the user's online events: every one recorded (the version counts them), or, for a
        bundle trained on recorded events, those after its watermark (one read: the earlier ones are in the
        bundle's history already, and the version counts them too)."""
        user = self.user_row.get(raw_user)
        stored = 0 if user is None else int(np.diff(self.bundle.arrays["history_offsets"][user : user + 2])[0])
        return stored + (version if not self.events_in_bundle else len(self.fetch_history(raw_user)[1]))

    def vectors(self, ctxs: Sequence[UserContext]) -> np.ndarray:
        """Run the exported user tower once over every context that misses the cache; known users' vectors
        are cached until their history changes.

        A cache entry carries the history version it was computed from: a request that read the history
        just before an event may store its vector after the event, and the version tells that it is stale.
        Items added online have no id embedding, so the tower's window skips them (they still count as seen).
        """
        out = np.empty((len(ctxs), self.live.catalog.vectors.shape[1]), np.float32)
        todo = []
        for j, ctx in enumerate(ctxs):
            hit = self.vector_cache.get(ctx.cache_key) if ctx.cache_key is not None else None
            if hit is not None and hit[0] == ctx.version:
                out[j] = hit[1]
            else:
                todo.append(j)
        if not todo:
            return out
        known = [ctxs[j].hist_items < self.model_items for j in todo]
        inputs = user_tower_inputs([ctxs[j].id_input for j in todo], np.stack([ctxs[j].cat for j in todo]),
                                   np.stack([ctxs[j].num for j in todo]), [ctxs[j].hist_items[m] for j, m in zip(todo, known)],
                                   [ctxs[j].hist_ratings[m] for j, m in zip(todo, known)], self.spec.history_len)
        with torch.inference_mode():
            vecs = self.bundle.user_tower(*(torch.from_numpy(x) for x in inputs)).numpy()
        for j, vec in zip(todo, vecs):
            out[j] = vec
            key = ctxs[j].cache_key
            if key is not None and (key in self.vector_cache or len(self.vector_cache) < self.cache_size):
                self.vector_cache[key] = (ctxs[j].version, out[j].copy())  # a copy: not a view holding the whole batch
        return out

    def ranker_features(self, ctx: UserContext, tables: RankerTables) -> UserFeatures:
        """The user's part of the ranker features, cached like the user vector: valid for one history
        version while no item of that history is written again (an upsert can change its vector) or removed (an
        item added online and removed leaves the history: ``LiveCatalog.remove``)."""
        key = ctx.cache_key
        catalog = self.live.catalog
        if key is not None and (hit := self.feature_cache.get(key)) is not None and hit[0] == ctx.version \
                and hit[1] is tables and hit[4] == len(ctx.hist_items) \
                and not (len(ctx.hist_items) and catalog.written_at[ctx.hist_items].max() > hit[3]):
            return hit[2]
        user = user_features(tables, ctx.hist_items, ctx.hist_ratings, ctx.cat, ctx.num)
        if key is not None and (key in self.feature_cache or len(self.feature_cache) < self.cache_size):
            self.feature_cache[key] = (ctx.version, tables, user, catalog.changes, len(ctx.hist_items))
        return user

    def _item_rows(self, raw_items: list) -> list[int]:
        row_of = self.live.catalog.row_of
        rows = [row_of.get(str(r)) for r in raw_items]
        unknown = [str(r) for r, row in zip(raw_items, rows) if row is None]
        if unknown:
            raise UnknownId(f"unknown item_id(s) in recent_items: {unknown[:10]}")
        return rows  # type: ignore[return-value]


def check_features(raw: dict, categorical: list[str], numeric: list[str], what: str, text: Sequence[str] = ()) -> None:
    """Unknown feature names and non-numeric values for numeric features are client errors, not silent means
    (``text``: names also known, as text columns, which the caller takes out of ``raw``)."""
    unknown = sorted(set(raw) - set(categorical) - set(numeric))
    if unknown:
        raise InvalidInput(f"unknown {what} features {unknown}; known: {sorted([*categorical, *numeric, *text])}")
    bad = [c for c in numeric if raw.get(c) is not None and not _is_number(raw[c])]
    if bad:
        raise InvalidInput(f"{what} features {bad} must be finite numbers")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _Unread(tuple):
    """The online events of a user whose history the store could not return: none, and not known to be none."""


UNREAD: list[Event] = _Unread()  # type: ignore[assignment]  (empty and immutable: one instance for every such read)


def _served_without_history() -> tuple[int, list[Event]]:
    """The store cannot be reached: the user is served from the bundle alone (``UNREAD``: a user the bundle does
    not know is then refused as ``Unavailable``), and the degradation counted."""
    metrics.DEGRADED.labels("history").inc()
    return 0, UNREAD
