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
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
import torch
from loguru import logger
from pydantic import ValidationError

from offline.bundle import Bundle
from offline.features import FeatureSpec, encode_item_features, encode_user_features, single_history
from offline.rank_features import (RankerTables, UserFeatures, candidate_features, merge_candidates, readable_feature_names,
                                   user_features)
from offline.ranker import load_ranker
from service.filters import EXACT_LIMIT, FilterIndex, RowFilter, top_k
from service.metrics import DEGRADED, FALLBACKS, timed
from service.schemas import Filters, ItemUpsert, RecommendRequest
from service.store import Event, StoreUnavailable

EXACT_SEARCH_FACTOR = 2  # below depth * this many allowed items, scoring them all beats over-fetching
NOTHING = np.zeros(0, np.int64)
TOWER, ITEM_ITEM = "two-tower", "item-item"  # a recommended item's candidate source
FETCH_GROWTH = 4  # an over-fetch that did not fill the list asks for this many times more
FETCH_MARGIN = 1.25  # a filtered over-fetch asks for this much more than the admitted share predicts
# Item arrays a newly added item cannot take from its features: it has no interactions yet, so no
# popularity and no co-occurrence neighbours (-1 is the padding of ``item_neighbours``).
NEW_ITEM_DEFAULTS = {"popularity": 0.0, "item_neighbours": -1, "item_neighbour_sims": 0.0}


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
        """Recall (two-tower, then the item-item channel), re-rank, top-k. The two-tower's depth is the
        request's ``candidates``, else ``default_candidates`` (the operator's setting), else the bundle's own."""
        timings: dict[str, float] = {}
        with timed("features", timings):
            ctx = self.resolve_user(req)
            catalog = self.catalog
            allowed = self.allowed(catalog, req.filters, ctx.hist_items if req.exclude_seen else None)
        if ctx.empty:
            FALLBACKS.labels("popularity").inc()
            return self._response(ctx, catalog, self.popular(catalog, allowed, req.k), "popularity", timings, req.explain)
        with timed("user_encoding", timings):
            vec = self.user_vector(ctx)
        with timed("ann_search", timings):
            depth = max(req.candidates or default_candidates or self.bundle_candidates, req.k)
            catalog, cands, scores = self.search(vec, depth, allowed)
        with timed("rerank", timings):
            ranked = self.rerank(ctx, catalog, cands, scores, req.k, req.explain, vec, allowed)
        return self._response(ctx, catalog, ranked, None, timings, req.explain)

    def resolve_user(self, req: RecommendRequest) -> UserContext:
        """A known user (stored features + bundle history + online events) or a cold one."""
        raw = None if req.user_id is None else str(req.user_id)
        version, online = self.online_history(raw)
        recent = self._item_rows(req.recent_items or [])
        extra_items = np.array([r for r, _ in online] + recent, np.int64)
        extra_ratings = np.array([rating for _, rating in online] + [0.0] * len(recent), np.float32)
        row = self.user_row.get(raw) if raw is not None else None
        if row is not None:
            a = self.bundle.arrays
            lo, hi = a["history_offsets"][row], a["history_offsets"][row + 1]
            items = np.concatenate([a["history_items"][lo:hi], extra_items])
            ratings = np.concatenate([a["history_ratings"][lo:hi], extra_ratings])
            key = raw if not recent else None  # recent_items make the request one-off: no caching
            return UserContext(raw, row + 1, a["user_cat"][row], a["user_num"][row], items, ratings, key, version)
        if raw is not None and not online and req.features is None and not recent:
            raise RequestError(404, f"unknown user_id '{raw}': send features and/or recent_items for a new user")
        features = req.features or {}
        _check_features(features, self.spec.user_categorical, self.spec.user_numeric, "user")
        cat, num = encode_user_features(self.spec, self.bundle.catalog["user_vocab"], features)
        key = raw if raw is not None and not recent and req.features is None else None
        known = any(v is not None for v in features.values())
        return UserContext(raw, 0, cat[0], num[0], extra_items, extra_ratings, key, version, known_features=known)

    def online_history(self, raw: str | None) -> tuple[int, list[tuple[int, float]]]:
        """The user's history version and online events as ``(item row, rating)``. An event on an item this
        bundle does not know (added online after it, then never replayed here) is skipped. If the store
        cannot be reached the user is served from the bundle alone, and the degradation is counted."""
        if raw is None:
            return 0, []
        try:
            version, events = self.history(raw)
        except StoreUnavailable:
            DEGRADED.labels("history").inc()
            return 0, []
        row_of = self.catalog.row_of
        rows = [(row_of[e.item_id], e.rating if e.rating is not None else 0.0) for e in events if e.item_id in row_of]
        return version, rows

    def user_vector(self, ctx: UserContext) -> np.ndarray:
        """Run the exported user tower; known users' vectors are cached until their history changes.

        A cache entry carries the history version it was computed from: a request that read the history
        just before an event may store its vector after the event, and the version tells that it is stale.
        Items added online have no id embedding, so the tower's window skips them (they still count as seen).
        """
        if ctx.cache_key is not None and (hit := self.vector_cache.get(ctx.cache_key)) is not None and hit[0] == ctx.version:
            return hit[1]
        known = ctx.hist_items < self.model_items
        hist_items, hist_ratings = single_history(ctx.hist_items[known], ctx.hist_ratings[known], self.spec.history_len)
        with torch.inference_mode():
            vec = self.bundle.user_tower(
                torch.tensor([ctx.id_input]), torch.from_numpy(ctx.cat[None].astype(np.int64)),
                torch.from_numpy(ctx.num[None].astype(np.float32)), torch.from_numpy(hist_items), torch.from_numpy(hist_ratings),
            )[0].numpy()
        if ctx.cache_key is not None and (ctx.cache_key in self.vector_cache or len(self.vector_cache) < self.cache_size):
            self.vector_cache[ctx.cache_key] = (ctx.version, vec)
        return vec

    def allowed(self, catalog: Catalog, filters: Filters | None, seen: np.ndarray | None) -> Allowed:
        """Items that may be returned: active, passing the filters, not already seen. A filter's year slices
        are sized by binary search first; only when they hold at most ``exact_limit`` rows are those rows read."""
        excluded = np.unique(seen) if seen is not None and len(seen) else np.zeros(0, np.int64)
        rule = RowFilter.of(filters, self._genre_cols)
        if rule is None:
            return Allowed(excluded)
        slices = rule.slices(catalog.filters)
        bound = sum(len(rows) for _, rows in slices)
        if bound > self.exact_limit:
            return Allowed(excluded, rule=rule, bound=bound)
        return Allowed(excluded, rows=catalog.live(rule.admitted(catalog.filters, slices), excluded))

    def search(self, vec: np.ndarray, depth: int, allowed: Allowed) -> tuple[Catalog, np.ndarray, np.ndarray]:
        """Top-``depth`` allowed items by inner product: exact over a narrow filter's rows (or a tiny catalogue),
        else HNSW with over-fetch, checking each result.

        hnswlib's own filter raises when fewer than k survive and calls back into Python per visited node, so
        we over-fetch and check here, growing the fetch until enough survive. A broad filter that still leaves
        the list short after two growths admits far fewer rows than its bound: its rows are then listed and
        scored exactly.
        """
        catalog = self.catalog
        n_allowed = allowed.count(catalog)
        depth = min(depth, n_allowed)
        if depth == 0:
            return catalog, np.zeros(0, np.int64), np.zeros(0, np.float32)
        if allowed.rows is not None or (allowed.rule is None and n_allowed <= depth * EXACT_SEARCH_FACTOR):
            return catalog, *self._exact(catalog, vec, allowed.every_row(catalog), depth)
        first = fetch = allowed.first_fetch(catalog, depth)
        while True:
            with self.index_lock:
                catalog, index = self.catalog, self.bundle.index
                searchable = catalog.n_active
                try:
                    labels, dists = index.knn_query(vec[None], k=min(fetch, searchable))
                except RuntimeError:  # hnswlib found fewer than k (deleted items): score exactly instead
                    return catalog, *self._exact(catalog, vec, allowed.every_row(catalog), depth)
            labels, dists = labels[0].astype(np.int64), dists[0]
            keep = allowed.keep(labels, catalog)
            if keep.sum() >= depth or fetch >= searchable:
                return catalog, labels[keep][:depth], (1.0 - dists[keep][:depth]).astype(np.float32)
            if allowed.rule is not None and fetch >= first * FETCH_GROWTH**2:
                return catalog, *self._exact(catalog, vec, allowed.every_row(catalog), depth)
            fetch = min(fetch * FETCH_GROWTH, searchable)

    def rerank(self, ctx: UserContext, catalog: Catalog, cands: np.ndarray, scores: np.ndarray, k: int, explain: bool,
               vec: np.ndarray, allowed: Allowed):
        """Ranker scores for the two-tower's candidates merged with the item-item channel's (as the bundle
        was evaluated); top-k. Recall order when the bundle has no ranker."""
        if self.ranker is None or len(cands) == 0:
            return [(int(c), float(s), None, r, None, self._recall_reasons(ctx, catalog, int(c), float(s), r) if explain else None,
                     TOWER) for r, (c, s) in enumerate(zip(cands[:k], scores[:k]))]
        tables = catalog.ranker_tables
        user = self._user_features(ctx, tables)
        cands, scores, n_tower = merge_candidates(user, cands, scores, vec, tables.item_vectors, self.item_item_candidates,
                                                  admit=lambda ids: allowed.admits(ids, catalog))
        feats = candidate_features(tables, user, cands, scores, n_tower)
        rank_scores = self.ranker.score(feats)
        order = np.lexsort((np.arange(len(cands)), -rank_scores))[:k]
        return [(int(cands[i]), float(scores[i]), float(rank_scores[i]), int(i), None,
                 dict(zip(self.explain_names, feats[i].round(5).tolist())) if explain else None,
                 TOWER if i < n_tower else ITEM_ITEM) for i in order]

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
    def _response(self, ctx, catalog, ranked, fallback, timings, explain) -> dict:
        items = [self._item(catalog, *entry[:5], entry[5] if explain else None, entry[6]) for entry in ranked]
        return {"user_id": ctx.raw_id, "items": items, "bundle_version": self.version, "fallback": fallback,
                "timings_ms": timings}

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
