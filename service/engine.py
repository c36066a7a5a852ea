"""The request path as plain functions over one loaded bundle plus the online state.

resolve user -> encode -> ANN -> filter -> features -> score -> top-K, each stage timed by the
helper that feeds Prometheus. The engine is built once per bundle; a reload builds a new one
and swaps it in whole. Catalogue snapshots are immutable and replaced whole (copy-on-write),
and the hnswlib index is only touched under ``index_lock`` (hnswlib is not safe when
``add_items`` runs during ``knn_query``).
"""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
import torch
from loguru import logger
from prometheus_client import Histogram
from pydantic import ValidationError

from offline.bundle import Bundle
from offline.features import FeatureSpec, encode_item_features, encode_user_features, history_windows
from offline.rank_features import (RankerTables, UserFeatures, candidate_features, merge_candidates, readable_feature_names,
                                   user_features)
from offline.ranker import load_ranker
from service.filters import EXACT_LIMIT, FilterIndex, RowFilter, top_k
from service.metrics import DEGRADED, FALLBACKS, STAGE, timed
from service.schemas import Filters, ItemUpsert, RecommendOptions, RecommendRequest
from service.store import Event, StoreUnavailable

EXACT_SEARCH_FACTOR = 2  # below depth * this many allowed items, scoring them all beats over-fetching
NOTHING = np.zeros(0, np.int64)
TOWER, ITEM_ITEM = "two-tower", "item-item"  # a recommended item's candidate source
FETCH_GROWTH = 4  # an over-fetch that did not fill the list asks for this many times more
TRACE_HISTORY = 50  # history items a traced response shows
FETCH_MARGIN = 1.25  # a filtered over-fetch asks for this much more than the admitted share predicts
# Item arrays a newly added item cannot take from its features: it has no interactions yet, so no
# popularity and no co-occurrence neighbours (-1 is the padding of ``item_neighbours``).
NEW_ITEM_DEFAULTS = {"popularity": 0.0, "item_neighbours": -1, "item_neighbour_sims": 0.0, "item_seq_neighbours": -1,
                     "item_seq_neighbour_sims": 0.0}


class RequestError(Exception):
    """Bad input that maps to a 4xx with a message."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


@dataclass(frozen=True)
class Catalog:
    """Immutable catalogue snapshot; item-level arrays share the row order of the index labels."""

    ids: list[str]
    row_of: dict[str, int]
    titles: list[str]
    arrays: dict[str, np.ndarray]  # item_vectors, item_genres, item_year, popularity, ... (bundle item arrays)
    active: np.ndarray  # bool: False once removed
    ranker_tables: RankerTables | None
    filters: FilterIndex
    by_popularity: np.ndarray  # rows, most popular first (ties by row)

    @classmethod
    def build(cls, ids: list[str], row_of: dict[str, int], titles: list[str], arrays: dict[str, np.ndarray],
              active: np.ndarray, ranked_with: dict[str, np.ndarray] | None) -> "Catalog":
        """A snapshot with what requests read precomputed (ranker tables, filter index, popularity order): this
        costs O(n_items log n_items) once per bundle load or catalogue upsert, so that no request pays it (a
        removal only flips ``active`` and keeps them). ``ranked_with``: the bundle's arrays when a ranker is
        served (its user-side columns come from the bundle, the item-side ones from this catalogue)."""
        tables = None if ranked_with is None else RankerTables.from_arrays({**ranked_with, **arrays})
        return cls(ids, row_of, titles, arrays, active, tables, FilterIndex.build(arrays["item_genres"], arrays["item_year"]),
                   np.argsort(-arrays["popularity"], kind="stable"))

    @property
    def vectors(self) -> np.ndarray:
        return self.arrays["item_vectors"]

    @cached_property
    def n_active(self) -> int:
        """Counted once per snapshot (snapshots are immutable), not once per request."""
        return int(self.active.sum())

    def live(self, rows: np.ndarray, excluded: np.ndarray) -> np.ndarray:
        """``rows`` less removed items, rows past this snapshot and ``excluded`` (O(len(rows)))."""
        rows = rows[rows < len(self.active)]
        rows = rows[self.active[rows]]
        return rows[~_in_sorted(rows, excluded)]


@dataclass(frozen=True)
class Allowed:
    """The items a request may return, never as a mask over the catalogue, so that no request pays
    O(n_items) for it: the user's seen rows to skip (removed items are skipped through the catalogue), and
    with a filter either every admitted row (a narrow filter: its year slices held at most the engine's
    ``exact_limit`` rows) or the filter itself, checked on each search result (a broad one), with ``bound``,
    the rows of its year slices: at least as many as it admits."""

    excluded: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # sorted, unique
    rows: np.ndarray | None = None
    rule: RowFilter | None = None
    bound: int = 0

    def count(self, catalog: Catalog) -> int:
        """How many items may be returned: exact, except for a broad filter (an upper bound)."""
        if self.rows is not None:
            return len(self.rows)
        excluded = self.excluded[self.excluded < len(catalog.active)]
        unseen = catalog.n_active - int(catalog.active[excluded].sum())
        return unseen if self.rule is None else min(unseen, self.bound)

    def first_fetch(self, catalog: Catalog, depth: int) -> int:
        """How many nearest items to read so that ``depth`` of them are likely allowed: the skipped ones on top
        of ``depth`` unfiltered, ``depth`` over the admitted share (an upper bound, so a margin) with a filter."""
        if self.rule is None:
            return depth + (catalog.n_active - self.count(catalog))
        share = self.bound / max(len(catalog.active), 1)
        return math.ceil(FETCH_MARGIN * depth / share) + len(self.excluded)

    def keep(self, labels: np.ndarray, catalog: Catalog) -> np.ndarray:
        """Which search results may be returned (a label past the catalogue is an item added since: not allowed)."""
        keep = np.zeros(len(labels), bool)
        inside = labels < len(catalog.active)
        keep[inside] = catalog.active[labels[inside]]
        keep &= ~_in_sorted(labels, self.excluded)
        if self.rule is not None:
            keep[keep] = self.rule.admits(catalog.filters, labels[keep])
        return keep

    def admits(self, rows: np.ndarray, catalog: Catalog) -> np.ndarray:
        """Which of ``rows`` (item rows from anywhere, e.g. neighbour lists) may be returned."""
        keep = self.keep(rows, catalog)
        if self.rows is not None:  # a narrow filter, listed: membership is the filter
            keep &= np.isin(rows, self.rows)
        return keep

    def every_row(self, catalog: Catalog) -> np.ndarray:
        """Every allowed row of ``catalog`` (which may be newer than the request's), listed: O(admitted) for a
        narrow filter; O(n_items) otherwise, which only exact scoring needs when HNSW cannot answer (a tiny or
        nearly exhausted index, or a broad filter that admits far fewer rows than its bound)."""
        if self.rows is not None:  # listed without the seen rows already: only removals since are left to drop
            return catalog.live(self.rows, NOTHING)
        if self.rule is not None:
            rows = self.rule.admitted(catalog.filters, self.rule.slices(catalog.filters))
        else:
            rows = np.arange(len(catalog.active))
        return catalog.live(rows, self.excluded)


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
class Engine:
    bundle: Bundle
    catalog: Catalog
    spec: FeatureSpec
    user_row: dict[str, int]
    genre_col: dict[str, int]
    ranker: object | None
    history: Callable[[str], tuple[int, list[Event]]] = lambda user: (0, [])  # the state store's online history
    vector_cache: dict[str, tuple[int, np.ndarray]] = field(default_factory=dict)  # user -> (history version, vector)
    feature_cache: dict[str, tuple] = field(default_factory=dict)  # user -> (version, ranker tables, UserFeatures)
    cache_size: int = 100_000
    exact_limit: int = EXACT_LIMIT  # filters whose year slices hold at most this many rows are scored exactly
    explain_names: list[str] = field(default_factory=list)  # the ranker's features, named for people
    item_item_candidates: int = 0  # the item-item channel's share of the ranker's candidates (the bundle's setting)
    index_lock: threading.Lock = field(default_factory=threading.Lock)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_bundle(cls, bundle: Bundle, cache_size: int = 100_000, exact_limit: int = EXACT_LIMIT) -> "Engine":
        a, cat = bundle.arrays, bundle.catalog
        n = len(cat["item_ids"])
        item_arrays = {k: v for k, v in a.items() if _is_item_array(k, v, n)}
        ranker = load_ranker(bundle.ranker) if bundle.ranker is not None else None
        catalog = Catalog.build(list(cat["item_ids"]), {r: i for i, r in enumerate(cat["item_ids"])}, list(cat["titles"]),
                                item_arrays, np.ones(n, bool), a if ranker is not None else None)
        engine = cls(bundle, catalog, FeatureSpec(**bundle.manifest["feature_spec"]),
                     {r: i for i, r in enumerate(cat["user_ids"])}, {g: j for j, g in enumerate(cat["genre_names"])},
                     ranker, cache_size=cache_size, exact_limit=exact_limit,
                     item_item_candidates=int(bundle.manifest["params"]["index"].get("item_item_candidates", 0)))
        if ranker is not None:
            engine.explain_names = readable_feature_names(ranker.feature_names, engine.spec, cat["genre_names"], cat["user_vocab"])
        return engine

    @property
    def version(self) -> str:
        return self.bundle.version

    def info(self, example_users: int = 20) -> dict:
        """What the engine serves (``GET /info``)."""
        years = self.catalog.arrays["item_year"]
        known = years[np.isfinite(years)]
        low, high = self.rating_scale
        return {"bundle_version": self.version, "items": self.searchable_items, "users": len(self.user_row),
                "genres": list(self.bundle.catalog["genre_names"]),
                "years": {"min": int(known.min()) if len(known) else None, "max": int(known.max()) if len(known) else None},
                "rating_scale": {"min": low, "max": high}, "candidates": self.bundle_candidates,
                "item_item_candidates": self.item_item_candidates, "ranker": None if self.ranker is None else self.ranker.kind,
                "example_users": list(self.bundle.catalog["user_ids"][:example_users])}

    @property
    def rating_scale(self) -> tuple[float, float]:
        """The ratings the model was trained on, ``(min, max)``; events are validated against it. Bundles
        written before the scale was recorded accept 0..5, as this service always had."""
        scale = self.bundle.manifest.get("rating_scale") or {"min": 0.0, "max": 5.0}
        return float(scale["min"]), float(scale["max"])

    @property
    def bundle_candidates(self) -> int:
        """The two-tower depth the bundle's ranker was trained and evaluated on."""
        return int(self.bundle.manifest["params"]["index"]["candidates"])

    @property
    def model_items(self) -> int:
        """Items the towers were trained on: rows below this have an id embedding, later ones do not."""
        return int(self.bundle.manifest["model_config"]["n_items"])

    # ---------------------------------------------------------------- recommend
    def recommend(self, req: RecommendRequest, default_candidates: int | None = None) -> dict:
        """One user through ``recommend_users``: a single request is a batch of one, so both routes, and the
        offline ``recommend`` command, answer a user with the same code."""
        (answer,), timings = self.recommend_users([(req.user_id, req.features, req.recent_items)], req, default_candidates)
        if isinstance(answer, RequestError):
            raise answer
        return {**answer, "bundle_version": self.version, "timings_ms": timings}

    def recommend_batch(self, user_ids: Sequence[str | int], opts: RecommendOptions, default_candidates: int | None = None,
                        histogram: Histogram = STAGE) -> dict:
        """Known users by id in one ``recommend_users`` pass; a user a single request would refuse gets its
        error and status in its place (the body of ``POST /recommend/batch``, and the offline command's rows)."""
        answers, timings = self.recommend_users([(user, None, None) for user in user_ids], opts, default_candidates, histogram)
        results = [{"user_id": str(user), "items": None, "error": a.message, "status": a.status} if isinstance(a, RequestError)
                   else {**a, "error": None, "status": None} for user, a in zip(user_ids, answers)]
        return {"results": results, "bundle_version": self.version, "timings_ms": timings}

    def recommend_users(self, users: Sequence[tuple], opts: RecommendOptions, default_candidates: int | None = None,
                        histogram: Histogram = STAGE) -> tuple[list[dict | RequestError], dict[str, float]]:
        """Recall (two-tower, then the item-item channel), re-rank, top-k for each ``(user_id, features,
        recent_items)``, each stage once for them all: one tower call, one batched ANN query, one ranker pass.
        A user that cannot be answered (an unknown id) gets the ``RequestError`` a single request would raise,
        in its place; a bad option (an unknown genre) fails the call. The two-tower's depth is the request's
        ``candidates``, else ``default_candidates`` (the operator's setting), else the bundle's own."""
        timings: dict[str, float] = {}
        answers: list = [None] * len(users)
        with timed("features", timings, histogram):
            catalog = self.catalog
            admit = self.admission(catalog, opts.filters)  # an unknown genre fails the call, not each user
            live = []
            for i, user in enumerate(users):
                try:
                    ctx = self.resolve_user(*user)
                except RequestError as err:
                    answers[i] = err
                    continue
                live.append((i, ctx, admit(ctx.hist_items if opts.exclude_seen else None)))
        for i, ctx, allowed in live:
            if ctx.empty:
                FALLBACKS.labels("popularity").inc()
                answers[i] = self._response(ctx, catalog, self.popular(catalog, allowed, opts.k), "popularity", opts)
        warm = [entry for entry in live if not entry[1].empty]
        if warm:
            rows, ctxs, alloweds = zip(*warm)
            with timed("user_encoding", timings, histogram):
                vecs = self.user_vectors(ctxs)
            with timed("ann_search", timings, histogram):
                depth = max(opts.candidates or default_candidates or self.bundle_candidates, opts.k)
                found = self.search_many(vecs, depth, alloweds)
            with timed("rerank", timings, histogram):
                ranked = self.rerank_many(ctxs, found, vecs, alloweds, opts)
            for i, ctx, (catalog, _, _), (entries, cands) in zip(rows, ctxs, found, ranked):
                answers[i] = self._response(ctx, catalog, entries, None, opts, cands)
        return answers, timings

    def resolve_user(self, user_id: str | int | None, features: dict | None = None,
                     recent_items: list | None = None) -> UserContext:
        """A known user (stored features + bundle history + online events) or a cold one."""
        raw = None if user_id is None else str(user_id)
        version, online = self.online_history(raw)
        recent = self._item_rows(recent_items or [])
        extra_items = np.array([r for r, _, _ in online] + recent, np.int64)
        extra_ratings = np.array([rating for _, rating, _ in online] + [0.0] * len(recent), np.float32)
        extra_times = np.array([t for _, _, t in online] + [np.nan] * len(recent), np.float64)
        row = self.user_row.get(raw) if raw is not None else None
        if row is not None:
            a = self.bundle.arrays
            lo, hi = a["history_offsets"][row], a["history_offsets"][row + 1]
            items = np.concatenate([a["history_items"][lo:hi], extra_items])
            ratings = np.concatenate([a["history_ratings"][lo:hi], extra_ratings])
            times = np.concatenate([a["history_timestamps"][lo:hi], extra_times])
            key = raw if not recent else None  # recent_items make the request one-off: no caching
            return UserContext(raw, row + 1, a["user_cat"][row], a["user_num"][row], items, ratings, times, key, version)
        if raw is not None and not online and features is None and not recent:
            raise RequestError(404, f"unknown user_id '{raw}': send features and/or recent_items for a new user")
        features = features or {}
        _check_features(features, self.spec.user_categorical, self.spec.user_numeric, "user")
        cat, num = encode_user_features(self.spec, self.bundle.catalog["user_vocab"], features)
        key = raw if raw is not None and not recent and not features else None
        known = any(v is not None for v in features.values())
        return UserContext(raw, 0, cat[0], num[0], extra_items, extra_ratings, extra_times, key, version, known_features=known)

    def online_history(self, raw: str | None) -> tuple[int, list[tuple[int, float, int]]]:
        """The user's history version and online events as ``(item row, rating, timestamp)``. An event on an
        item this bundle does not know (added online after it, then never replayed here) is skipped. If the
        store cannot be reached the user is served from the bundle alone, and the degradation is counted."""
        if raw is None:
            return 0, []
        try:
            version, events = self.history(raw)
        except StoreUnavailable:
            DEGRADED.labels("history").inc()
            return 0, []
        row_of = self.catalog.row_of
        return version, [(row_of[e.item_id], e.rating if e.rating is not None else 0.0, e.timestamp)
                         for e in events if e.item_id in row_of]

    def user_vector(self, ctx: UserContext) -> np.ndarray:
        return self.user_vectors([ctx])[0]

    def user_vectors(self, ctxs: Sequence[UserContext]) -> np.ndarray:
        """Run the exported user tower once over every context that misses the cache; known users' vectors
        are cached until their history changes.

        A cache entry carries the history version it was computed from: a request that read the history
        just before an event may store its vector after the event, and the version tells that it is stale.
        Items added online have no id embedding, so the tower's window skips them (they still count as seen).
        """
        out = np.empty((len(ctxs), self.catalog.vectors.shape[1]), np.float32)
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
        ends = np.cumsum([int(m.sum()) for m in known])
        hist_items, hist_ratings = history_windows(
            np.concatenate([ctxs[j].hist_items[m] for j, m in zip(todo, known)]).astype(np.int64),
            np.concatenate([ctxs[j].hist_ratings[m] for j, m in zip(todo, known)]).astype(np.float32),
            np.concatenate([[0], ends[:-1]]), ends, self.spec.history_len)
        with torch.inference_mode():
            vecs = self.bundle.user_tower(
                torch.tensor([ctxs[j].id_input for j in todo]), torch.from_numpy(np.stack([ctxs[j].cat for j in todo]).astype(np.int64)),
                torch.from_numpy(np.stack([ctxs[j].num for j in todo]).astype(np.float32)), torch.from_numpy(hist_items),
                torch.from_numpy(hist_ratings),
            ).numpy()
        for j, vec in zip(todo, vecs):
            out[j] = vec
            key = ctxs[j].cache_key
            if key is not None and (key in self.vector_cache or len(self.vector_cache) < self.cache_size):
                self.vector_cache[key] = (ctxs[j].version, out[j].copy())  # a copy: not a view holding the whole batch
        return out

    def allowed(self, catalog: Catalog, filters: Filters | None, seen: np.ndarray | None) -> Allowed:
        """Items that may be returned: active, passing the filters, not already seen."""
        return self.admission(catalog, filters)(seen)

    def admission(self, catalog: Catalog, filters: Filters | None) -> Callable[[np.ndarray | None], Allowed]:
        """``allowed`` in two steps: the filter's part, worked out once per request or batch (an unknown genre
        raises here), then a function of each user's seen items. A filter's year slices are sized by binary
        search first; only when they hold at most ``exact_limit`` rows are those rows read."""
        rule = RowFilter.of(filters, self._genre_cols)
        admitted, bound = None, 0
        if rule is not None:
            slices = rule.slices(catalog.filters)
            bound = sum(len(rows) for _, rows in slices)
            if bound <= self.exact_limit:
                admitted = rule.admitted(catalog.filters, slices)

        def allowed(seen: np.ndarray | None) -> Allowed:
            excluded = np.unique(seen) if seen is not None and len(seen) else np.zeros(0, np.int64)
            if rule is None:
                return Allowed(excluded)
            if admitted is None:
                return Allowed(excluded, rule=rule, bound=bound)
            return Allowed(excluded, rows=catalog.live(admitted, excluded))
        return allowed

    def search(self, vec: np.ndarray, depth: int, allowed: Allowed) -> tuple[Catalog, np.ndarray, np.ndarray]:
        return self.search_many(vec[None], depth, [allowed])[0]

    def search_many(self, vecs: np.ndarray, depth: int, alloweds: Sequence[Allowed]) -> list[tuple[Catalog, np.ndarray, np.ndarray]]:
        """Each user's top-``depth`` allowed items by inner product: exact over a narrow filter's rows (or a tiny
        catalogue), else HNSW with over-fetch, checking each result; the HNSW users in one batched query.

        hnswlib's own filter raises when fewer than k survive and calls back into Python per visited node, so
        we over-fetch and check here, growing the fetch until enough survive. A broad filter that still leaves
        the list short after two growths admits far fewer rows than its bound: its rows are then listed and
        scored exactly. A batched query reads as deep as its widest fetch (hnswlib's beam is max(ef, k)), so
        sharing a batch can only add true neighbours to a user's list, never remove one.
        """
        catalog = self.catalog
        out: list = [None] * len(alloweds)
        pending: dict[int, tuple[int, int, int]] = {}  # user -> (depth, first fetch, fetch)
        for u, allowed in enumerate(alloweds):
            n_allowed = allowed.count(catalog)
            wanted = min(depth, n_allowed)
            if wanted == 0:
                out[u] = (catalog, NOTHING, np.zeros(0, np.float32))
            elif allowed.rows is not None or (allowed.rule is None and n_allowed <= wanted * EXACT_SEARCH_FACTOR):
                out[u] = (catalog, *self._exact(catalog, vecs[u], allowed.every_row(catalog), wanted))
            else:
                first = allowed.first_fetch(catalog, wanted)
                pending[u] = (wanted, first, first)
        while pending:
            users = list(pending)
            with self.index_lock:
                catalog, index = self.catalog, self.bundle.index
                searchable = catalog.n_active
                k = min(max(pending[u][2] for u in users), searchable)
                try:
                    labels, dists = index.knn_query(vecs[users], k=k)
                except RuntimeError:  # hnswlib found fewer than k (deleted items): score exactly instead
                    labels = dists = None
            retry = {}
            for j, u in enumerate(users):
                wanted, first, fetch = pending[u]
                if labels is None:
                    out[u] = (catalog, *self._exact(catalog, vecs[u], alloweds[u].every_row(catalog), wanted))
                    continue
                found, dist = labels[j].astype(np.int64), dists[j]
                keep = alloweds[u].keep(found, catalog)
                if keep.sum() >= wanted or k >= searchable:
                    out[u] = (catalog, found[keep][:wanted], (1.0 - dist[keep][:wanted]).astype(np.float32))
                elif alloweds[u].rule is not None and fetch >= first * FETCH_GROWTH**2:
                    out[u] = (catalog, *self._exact(catalog, vecs[u], alloweds[u].every_row(catalog), wanted))
                else:
                    retry[u] = (wanted, first, min(max(fetch, k) * FETCH_GROWTH, searchable))
            pending = retry
        return out

    def rerank_many(self, ctxs: Sequence[UserContext], found: Sequence[tuple], vecs: np.ndarray,
                    alloweds: Sequence[Allowed], opts: RecommendOptions) -> list[tuple[list, "Candidates"]]:
        """Each user's two-tower candidates merged with the item-item channel's (as the bundle was evaluated),
        their features stacked and scored in one ranker pass; top-k per user. Recall order without a ranker."""
        lists = []
        for ctx, (catalog, cands, scores), vec, allowed in zip(ctxs, found, vecs, alloweds):
            if self.ranker is None or not len(cands):
                lists.append(Candidates(cands, scores, len(cands)))
                continue
            tables = catalog.ranker_tables
            user = self._user_features(ctx, tables)
            cands, scores, n_tower = merge_candidates(user, cands, scores, vec, tables.item_vectors, self.item_item_candidates,
                                                      admit=lambda ids, a=allowed, c=catalog: a.admits(ids, c))
            lists.append(Candidates(cands, scores, n_tower, candidate_features(tables, user, cands, scores, n_tower)))
        scored = [c for c in lists if c.features is not None]
        if scored:
            ranking = self.ranker.score(np.concatenate([c.features for c in scored]))
            for c, part in zip(scored, np.split(ranking, np.cumsum([len(c.items) for c in scored])[:-1])):
                c.ranking = part
        return [(self._entries(ctx, catalog, c, opts), c) for ctx, (catalog, _, _), c in zip(ctxs, found, lists)]

    def _entries(self, ctx: UserContext, catalog: Catalog, c: "Candidates", opts: RecommendOptions) -> list[tuple]:
        """The top-k as ``(row, recall score, ranking score, recall rank, popularity, reasons, source)``."""
        c.top = c.order(opts.k)
        return [(int(c.items[i]), float(c.recall[i]), None if c.ranking is None else float(c.ranking[i]), int(i), None,
                 self._reasons(ctx, catalog, c, int(i)) if opts.explain else None, c.source(i)) for i in c.top]

    def _reasons(self, ctx: UserContext, catalog: Catalog, c: "Candidates", i: int) -> dict:
        """An answer's explanation: the ranker's features of candidate ``i``, or the recall reasons without a ranker."""
        if c.ranking is None:
            return self._recall_reasons(ctx, catalog, int(c.items[i]), float(c.recall[i]), i)
        return dict(zip(self.explain_names, c.features[i].round(5).tolist()))

    def _user_features(self, ctx: UserContext, tables: RankerTables) -> UserFeatures:
        """The user's part of the ranker features, cached like the user vector: valid for one history
        version and one catalogue snapshot (an upsert can change a history item's vector)."""
        key = ctx.cache_key
        if key is not None and (hit := self.feature_cache.get(key)) is not None and hit[0] == ctx.version and hit[1] is tables:
            return hit[2]
        user = user_features(tables, ctx.hist_items, ctx.hist_ratings, ctx.cat, ctx.num)
        if key is not None and (key in self.feature_cache or len(self.feature_cache) < self.cache_size):
            self.feature_cache[key] = (ctx.version, tables, user)
        return user

    def _recall_reasons(self, ctx: UserContext, catalog: Catalog, row: int, score: float, rank: int) -> dict:
        """Without a ranker the reason is the recall stage's: its score and rank, and the recent history
        item whose vector lies nearest the candidate ("because you watched ...")."""
        out: dict = {"recall_score": round(score, 5), "recall_rank": rank}
        recent = ctx.hist_items[-self.spec.history_len :]
        if len(recent):
            sims = catalog.vectors[recent] @ catalog.vectors[row]
            j = int(np.argmax(sims))
            out.update(nearest_history_item=catalog.ids[int(recent[j])], nearest_history_similarity=round(float(sims[j]), 5))
        return out

    def popular(self, catalog: Catalog, allowed: Allowed, k: int):
        """The ``k`` most popular allowed items: the top of a narrow filter's rows, or the first allowed ones in
        the snapshot's popularity order, read in growing chunks: about ``k`` over the admitted share (more only
        for a broad filter that admits far fewer rows than its bound)."""
        pop = catalog.arrays["popularity"]
        if allowed.rows is not None:
            rows = top_k(allowed.rows, pop[allowed.rows], k)[0]
        else:
            rows = _first_kept(catalog.by_popularity, lambda chunk: allowed.keep(chunk, catalog), k,
                               allowed.first_fetch(catalog, k))
        return [(int(i), None, None, None, float(pop[i]), None, None) for i in rows]

    def similar_items(self, raw_item: str, k: int) -> dict:
        catalog = self.catalog
        row = self.require_item(raw_item, catalog)
        catalog, cands, scores = self.search(catalog.vectors[row], k, Allowed(excluded=np.array([row])))
        return {"item_id": raw_item, "bundle_version": self.version,
                "items": [self._item(catalog, int(c), float(s), None, r) for r, (c, s) in enumerate(zip(cands, scores))]}

    # ---------------------------------------------------------------- online state
    def require_item(self, raw_item: str, catalog: Catalog | None = None) -> int:
        """The row of a live (not removed) item, or a 404."""
        catalog = catalog or self.catalog
        row = catalog.row_of.get(raw_item)
        if row is None or not catalog.active[row]:
            raise RequestError(404, f"unknown item_id '{raw_item}'")
        return row

    def history_length(self, raw_user: str, version: int) -> int:
        """Bundle history plus every online event recorded for the user (the version counts them)."""
        return self._bundle_history_length(raw_user) + version

    def load_catalog(self, items: dict[str, dict | None]) -> None:
        """Apply a store's catalogue fold to a new engine: every upsert in one batch, then the removals.
        Changes that no longer apply to this bundle (a genre it lacks...) are counted and logged, not fatal."""
        upserts, skipped = [], []
        for item_id, item in items.items():
            if item is not None:
                try:
                    upserts.append(ItemUpsert.model_validate(item))
                except ValidationError as err:  # an entry this version cannot read: skipped, not fatal
                    skipped.append(f"{item_id}: {err.error_count()} invalid fields")
        if upserts:
            try:
                self.commit_upsert(self.prepare_upsert(upserts))
            except RequestError as err:  # one bad item must not lose the others: apply them one by one
                skipped += self._upsert_each(upserts, err)
        for item_id, item in items.items():
            if item is None:
                self.apply_change(item_id, None)
        if skipped:
            logger.warning("catalogue on bundle {}: {} changes skipped (first: {})", self.version, len(skipped), skipped[:3])

    def apply_change(self, item_id: str, item: dict | None) -> None:
        """One change from the store, in its order: an upsert, or a removal of a live item (else nothing)."""
        if item is not None:
            self.commit_upsert(self.prepare_upsert([ItemUpsert.model_validate(item)]))
        elif (row := self.catalog.row_of.get(item_id)) is not None and self.catalog.active[row]:
            self.remove_item(item_id)

    def _upsert_each(self, items: list[ItemUpsert], first_error: RequestError) -> list[str]:
        skipped = []
        for item in items:
            try:
                self.commit_upsert(self.prepare_upsert([item]))
            except RequestError as err:
                skipped.append(f"{item.item_id}: {err.message}")
        return skipped or [first_error.message]

    def check_upsert(self, items: list[ItemUpsert]) -> list[str]:
        """Refuse items this bundle cannot encode (an unknown genre or feature) before anything is recorded;
        returns what each change will be, "added" or "replaced"."""
        for item in items:
            self._encode_item(item)
        return ["replaced" if str(item.item_id) in self.catalog.row_of else "added" for item in items]

    def prepare_upsert(self, items: list[ItemUpsert]) -> "Upsert":
        """Validate items and compute their rows of every array, touching nothing live (``commit_upsert``
        makes it live). One tower call and one copy of each array for the whole batch, so applying a large
        catalogue fold costs one rebuild."""
        catalog = self.catalog
        raws = [str(it.item_id) for it in items]
        assigned: dict[str, int] = {}
        n = len(catalog.ids)
        for raw in raws:  # a new id takes the next free row; a repeated one keeps its first row
            if raw not in assigned:
                assigned[raw] = catalog.row_of.get(raw, n)
                n += assigned[raw] == n
        rows = [assigned[raw] for raw in raws]
        encoded = [self._encode_item(it) for it in items]
        genres, dense, cat = (np.concatenate([e[j] for e in encoded]) for j in range(3))
        ids_in = torch.tensor([r + 1 if r < self.model_items else 0 for r in rows])  # only trained items have an id embedding
        with torch.inference_mode():
            vecs = self.bundle.item_tower(ids_in, torch.from_numpy(genres), torch.from_numpy(dense), torch.from_numpy(cat)).numpy()
        years = np.array([np.nan if it.year is None else it.year for it in items], np.float32)
        new_values = {"item_vectors": vecs, "item_genres": genres, "item_dense": dense, "item_cat": cat, "item_year": years}
        row_array = np.array(rows, np.int64)
        arrays = {k: _set_rows(v, row_array, new_values.get(k), NEW_ITEM_DEFAULTS.get(k), n) for k, v in catalog.arrays.items()}
        ids, titles = list(catalog.ids), list(catalog.titles)
        for raw, row, item in zip(raws, rows, items):
            if row == len(ids):
                ids.append(raw), titles.append(item.title or raw)
            else:
                titles[row] = item.title or titles[row]
        active = _set_rows(catalog.active, row_array, True, False, n)
        updated = Catalog.build(ids, {**catalog.row_of, **dict(zip(raws, rows))}, titles, arrays, active,
                                self.bundle.arrays if self.ranker is not None else None)
        return Upsert(row_array, vecs, updated)

    def _encode_item(self, item: ItemUpsert) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        genre_row = np.zeros(self.spec.n_genres, bool)
        genre_row[self._genre_cols(item.genres)] = True
        _check_features(item.features, self.spec.item_categorical, self.spec.item_numeric, "item")
        return encode_item_features(self.spec, self.bundle.catalog.get("item_vocab", {}), genre_row, item.year, item.features)

    def commit_upsert(self, change: "Upsert") -> None:
        """Put prepared items into the index and swap in their catalogue, together under ``index_lock``."""
        with self.index_lock:
            index = self.bundle.index
            top = int(change.rows.max())
            if top >= index.get_max_elements():
                index.resize_index(max(2 * index.get_max_elements(), top + 1))
            for row in change.rows[change.rows < index.get_current_count()]:
                if not self.catalog.active[row]:
                    index.unmark_deleted(int(row))
            index.add_items(change.vectors, change.rows)
            self.catalog = change.catalog

    def remove_item(self, raw: str) -> dict:
        catalog = self.catalog
        row = self.require_item(raw, catalog)
        with self.index_lock:
            self.bundle.index.mark_deleted(row)
            self.catalog = replace(catalog, active=_set_rows(catalog.active, np.array([row]), False, False, len(catalog.active)))
        return {"item_id": raw, "status": "removed"}

    def _bundle_history_length(self, raw_user: str) -> int:
        user = self.user_row.get(raw_user)
        return 0 if user is None else int(np.diff(self.bundle.arrays["history_offsets"][user : user + 2])[0])

    @property
    def searchable_items(self) -> int:
        return self.catalog.n_active

    # ---------------------------------------------------------------- helpers
    def _response(self, ctx: UserContext, catalog: Catalog, ranked: list[tuple], fallback: str | None,
                  opts: RecommendOptions, cands: "Candidates | None" = None) -> dict:
        out = {"user_id": ctx.raw_id, "fallback": fallback,
               "items": [self._item(catalog, *entry[:5], entry[5] if opts.explain else None, entry[6]) for entry in ranked]}
        if opts.trace:
            out["trace"] = {"history": self._history(ctx, catalog), "history_length": len(ctx.hist_items),
                            "candidates": [] if cands is None else cands.trace(catalog)}
        return out

    def _history(self, ctx: UserContext, catalog: Catalog) -> list[dict]:
        """The most recent ``TRACE_HISTORY`` interactions, most recent first (items sent as recent_items have
        no time and no rating)."""
        recent = np.arange(len(ctx.hist_items))[::-1][:TRACE_HISTORY]
        return [{"item_id": catalog.ids[row], "title": catalog.titles[row],
                 "rating": None if np.isnan(ctx.hist_times[i]) else float(ctx.hist_ratings[i]),
                 "timestamp": None if np.isnan(ctx.hist_times[i]) else int(ctx.hist_times[i])}
                for i, row in zip(recent, ctx.hist_items[recent].tolist())]

    def _item(self, catalog: Catalog, row: int, recall_score, ranking_score, recall_rank, popularity=None, features=None,
              source=None) -> dict:
        year = catalog.arrays["item_year"][row]
        genres = catalog.arrays["item_genres"][row]
        names = self.bundle.catalog["genre_names"]
        out = {"item_id": catalog.ids[row], "title": catalog.titles[row],
               "genres": [names[j] for j in np.flatnonzero(genres)], "year": None if np.isnan(year) else int(year),
               "recall_score": recall_score, "recall_rank": recall_rank, "ranking_score": ranking_score,
               "popularity": popularity, "source": source}
        if features is not None:
            out["features"] = features
        return out

    def _item_rows(self, raw_items: list) -> list[int]:
        rows = [self.catalog.row_of.get(str(r)) for r in raw_items]
        unknown = [str(r) for r, row in zip(raw_items, rows) if row is None]
        if unknown:
            raise RequestError(404, f"unknown item_id(s) in recent_items: {unknown[:10]}")
        return rows  # type: ignore[return-value]

    def _genre_cols(self, names: list[str]) -> list[int]:
        unknown = [g for g in names if g not in self.genre_col]
        if unknown:
            raise RequestError(422, f"unknown genres {unknown}; known: {sorted(self.genre_col)}")
        return [self.genre_col[g] for g in names]

    def _exact(self, catalog: Catalog, vec: np.ndarray, rows: np.ndarray, depth: int):
        top, scores = top_k(rows, np.take(catalog.vectors, rows, axis=0) @ vec, depth)  # take: half fancy indexing's time
        return top, scores.astype(np.float32)


@dataclass(frozen=True)
class Upsert:
    """Validated catalogue changes, computed but not yet live (one batch, one rebuild)."""

    rows: np.ndarray
    vectors: np.ndarray
    catalog: Catalog


@dataclass
class Candidates:
    """One user's candidates as the re-ranker saw them: the two-tower's in recall order, then the item-item
    channel's (``n_tower`` splits them); ``top`` indexes the returned ones, best first."""

    items: np.ndarray
    recall: np.ndarray
    n_tower: int
    features: np.ndarray | None = None
    ranking: np.ndarray | None = None
    top: np.ndarray = field(default_factory=lambda: NOTHING)

    def order(self, k: int) -> np.ndarray:
        """The first ``k`` by ranking score (ties: recall order), or in recall order without a ranker."""
        if self.ranking is None:
            return np.arange(min(k, len(self.items)))
        return np.lexsort((np.arange(len(self.items)), -self.ranking))[:k]

    def source(self, i: int) -> str:
        return TOWER if i < self.n_tower else ITEM_ITEM

    def trace(self, catalog: Catalog) -> list[dict]:
        rank = {int(i): r for r, i in enumerate(self.top)}
        return [{"item_id": catalog.ids[row], "title": catalog.titles[row], "recall_score": float(self.recall[i]),
                 "recall_rank": i, "source": self.source(i),
                 "ranking_score": None if self.ranking is None else float(self.ranking[i]), "rank": rank.get(i)}
                for i, row in enumerate(self.items.tolist())]


def _in_sorted(values: np.ndarray, sorted_unique: np.ndarray) -> np.ndarray:
    """Whether each of ``values`` is in ``sorted_unique``: O(len(values) log len(sorted_unique))."""
    if not len(sorted_unique):
        return np.zeros(len(values), bool)
    at = np.minimum(np.searchsorted(sorted_unique, values), len(sorted_unique) - 1)
    return sorted_unique[at] == values


def _first_kept(order: np.ndarray, keep: Callable[[np.ndarray], np.ndarray], k: int, size: int) -> np.ndarray:
    """The first ``k`` entries of ``order`` that ``keep`` accepts, read in chunks growing from ``size``."""
    found: list[np.ndarray] = []
    start = 0
    while start < len(order) and sum(len(f) for f in found) < k:
        chunk = order[start : start + size]
        found.append(chunk[keep(chunk)])
        start, size = start + size, size * FETCH_GROWTH
    return np.concatenate(found)[:k] if found else np.zeros(0, np.int64)


def _is_item_array(name: str, value: np.ndarray, n_items: int) -> bool:
    return (name.startswith("item_") or name == "popularity") and value.ndim >= 1 and len(value) == n_items


def _set_rows(array: np.ndarray, rows: np.ndarray, values, default, n: int) -> np.ndarray:
    """A copy of ``array`` grown to ``n`` rows with ``rows`` set to ``values``. Without values (an array the
    item's features do not determine), existing rows keep theirs (a replaced item keeps its popularity)
    and new rows get ``default``, or NaN / 0 when there is none."""
    fill = default if default is not None else (np.nan if np.issubdtype(array.dtype, np.floating) else 0)
    out = np.empty((n, *array.shape[1:]), array.dtype)
    out[: len(array)] = array
    out[len(array):] = fill
    if values is not None:
        out[rows] = values
    return out


def _check_features(raw: dict, categorical: list[str], numeric: list[str], what: str) -> None:
    """Unknown feature names and non-numeric values for numeric features are client errors, not silent means."""
    unknown = sorted(set(raw) - set(categorical) - set(numeric))
    if unknown:
        raise RequestError(422, f"unknown {what} features {unknown}; known: {sorted([*categorical, *numeric])}")
    bad = [c for c in numeric if raw.get(c) is not None and not _is_number(raw[c])]
    if bad:
        raise RequestError(422, f"{what} features {bad} must be finite numbers")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def now() -> int:
    return int(time.time())
