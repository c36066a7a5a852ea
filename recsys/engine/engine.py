"""The request path over one loaded bundle plus the online state, as the pipeline it is:

resolve users -> encode -> ANN search (filtered, seen items excluded) -> re-rank -> top-K answers,

each stage timed by the helper that feeds Prometheus, each stage in its own module (``users``,
``allowed``, ``search``, ``rerank``, ``answer``; catalogue changes in ``upserts``). The engine is built
once per bundle; a reload builds a new one and swaps it in whole. It takes the plain values of
``recsys.query`` and raises ``recsys.errors``; the HTTP layer validates and maps them.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from prometheus_client import Histogram

from recsys import metrics
from recsys.bundle import Bundle
from recsys.engine.allowed import FILTER_CACHE_MB, Allowed, FilterRowCache, admission
from recsys.engine.answer import Answers
from recsys.engine.catalog import Catalog, LiveCatalog, is_item_array
from recsys.engine.filters import EXACT_LIMIT, RowFilter
from recsys.engine.rerank import rerank
from recsys.engine.search import EXACT_FETCH_SHARE, Found, compile_kernels as compile_search, popular, search_many
from recsys.engine.upserts import CatalogChanges
from recsys.engine.users import History, UserContext, Users
from recsys.errors import InvalidInput, RecsysError
from recsys.query import RecommendOptions, RecommendRequest
from recsys.rank_features import compile_kernels, readable_feature_names
from recsys.scorer import Ranker, load_ranker
from recsys.state.protocol import Event
from recsys.text import shared_encoder

UserQuery = tuple[str | int | None, dict | None, list | None]  # (user_id, features, recent_items)


class Fetched(NamedTuple):
    """Users' online histories read before ``recommend_users`` (awaited on an event loop), and when the read began
    (the ``features`` stage's start)."""

    histories: list[tuple[int, list[Event]]]
    started: float

    def of(self, places: Sequence[int]) -> Fetched:
        return Fetched([self.histories[i] for i in places], self.started)


@dataclass
class BatchAnswer:
    """Answers in the order asked: a user's answer, or the error a single request for that user would raise."""

    user_ids: list[str | int]
    answers: list[dict | RecsysError]
    bundle_version: str
    timings_ms: dict[str, float]


class Engine:
    """One bundle served: its stages wired together, and the pipeline (``recommend_users``) that runs them."""

    def __init__(self, bundle: Bundle, cache_size: int = 100_000, exact_limit: int = EXACT_LIMIT,
                 filter_cache_mb: float = FILTER_CACHE_MB):
        a, cat = bundle.arrays, bundle.catalog
        n = len(cat["item_ids"])
        self.bundle, self.exact_limit, self.meta = bundle, exact_limit, bundle.meta
        self.filter_rows = FilterRowCache(int(filter_cache_mb * 2**20))
        self.exact_share = EXACT_FETCH_SHARE  # a first fetch of this share of the catalogue scores it exactly
        self.spec = self.meta.feature_spec
        self.ranker: Ranker | None = load_ranker(bundle.ranker) if bundle.ranker is not None else None
        self.genre_col = {g: j for j, g in enumerate(cat["genre_names"])}
        self.live = LiveCatalog(bundle.index, list(cat["item_ids"]), list(cat["titles"]),
                                {k: v for k, v in a.items() if is_item_array(k, v, n)}, a if self.ranker is not None else None)
        if self.live.tables is not None:
            compile_kernels(self.live.tables)  # here, at load, not on the first request
        compile_search(self.live.catalog)
        self.users = Users(bundle, self.spec, self.live, self.meta.n_items, cache_size=cache_size)
        encoder = shared_encoder(self.spec.text_encoder or {}) if self.spec.text_dim else None  # loaded here, not on a request
        self.changes = CatalogChanges(bundle, self.spec, self.live, self._genre_cols, self.meta.n_items, self.ranker is not None,
                                      encoder)
        explain = [] if self.ranker is None else readable_feature_names(self.ranker.feature_names, self.spec,
                                                                          cat["genre_names"], cat["user_vocab"])
        self.answers = Answers(list(cat["genre_names"]), explain, self.spec.history_len)

    @classmethod
    def from_bundle(cls, bundle: Bundle, cache_size: int = 100_000, exact_limit: int = EXACT_LIMIT,
                    filter_cache_mb: float = FILTER_CACHE_MB) -> "Engine":
        return cls(bundle, cache_size, exact_limit, filter_cache_mb)

    # ---------------------------------------------------------------- what it serves
    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def catalog(self) -> Catalog:
        return self.live.catalog

    @property
    def history(self) -> History:
        return self.users.history

    @history.setter
    def history(self, history: History) -> None:
        """The state store's online history of a user, ``(version, events)``."""
        self.users.history = history

    @property
    def user_row(self) -> dict[str, int]:
        return self.users.user_row

    @property
    def searchable_items(self) -> int:
        return self.live.catalog.n_active

    @property
    def rating_scale(self) -> tuple[float, float]:
        """The ratings the model was trained on, ``(min, max)``; events are validated against it."""
        return self.meta.rating_scale

    @property
    def bundle_candidates(self) -> int:
        """The two-tower depth the bundle's ranker was trained and evaluated on."""
        return self.meta.candidates

    @property
    def model_items(self) -> int:
        """Items the towers were trained on: rows below this have an id embedding, later ones do not."""
        return self.meta.n_items

    def info(self, example_users: int = 20) -> dict:
        """What the engine serves (``GET /info``)."""
        with self.live.rw.reading():
            years = self.catalog.arrays["item_year"]
            known = years[np.isfinite(years)]
        low, high = self.rating_scale
        return {"bundle_version": self.version, "items": self.searchable_items, "users": len(self.user_row),
                "genres": list(self.bundle.catalog["genre_names"]),
                "years": {"min": int(known.min()) if len(known) else None, "max": int(known.max()) if len(known) else None},
                "rating_scale": {"min": low, "max": high}, "candidates": self.bundle_candidates,
                "item_item_candidates": self.meta.item_item_candidates, "index_ef": self.live.index.ef,
                "index_insert_ef": self.live.index.ef_construction, "ranker": None if self.ranker is None else self.ranker.kind,
                "example_users": list(self.bundle.catalog["user_ids"][:example_users])}

    # ---------------------------------------------------------------- recommend
    def recommend(self, req: RecommendRequest, default_candidates: int | None = None) -> dict:
        """One user through ``recommend_users``: a single request is a batch of one, so both routes, and the
        offline ``recommend`` command, answer a user with the same code."""
        (answer,), timings = self.recommend_users([(req.user_id, req.features, req.recent_items)], req, default_candidates)
        if isinstance(answer, RecsysError):
            raise answer
        return {**answer, "bundle_version": self.version, "timings_ms": timings}

    def recommend_batch(self, user_ids: Sequence[str | int], opts: RecommendOptions, default_candidates: int | None = None,
                        histogram: Histogram = metrics.STAGE) -> BatchAnswer:
        """Known users by id in one ``recommend_users`` pass; a user a single request would refuse gets its
        error in its place (the body of ``POST /recommend/batch``, and the offline command's rows)."""
        answers, timings = self.recommend_users([(user, None, None) for user in user_ids], opts, default_candidates, histogram)
        return BatchAnswer(list(user_ids), answers, self.version, timings)

    def recommend_users(self, users: Sequence[UserQuery], opts: RecommendOptions, default_candidates: int | None = None,
                        histogram: Histogram = metrics.STAGE, ranker: bool = True, item_item: bool = True,
                        popularity: bool = False, fetched: Fetched | None = None) -> tuple[list[dict | RecsysError], dict[str, float]]:
        """Recall (two-tower, then the item-item channel), re-rank, top-k for each ``(user_id, features,
        recent_items)``, each stage once for them all: one tower call, one batched ANN query, one ranker pass.
        A user that cannot be answered (an unknown id) gets the error a single request would raise, in its
        place; a bad option (an unknown genre) fails the call. The two-tower's depth is the request's
        ``candidates``, else ``default_candidates`` (the operator's setting), else the bundle's own. An
        experiment's variant may serve without the ranker (recall order), without the item-item channel, or the
        popularity list to everyone (the baseline). ``fetched``: the users' histories, read already
        (``read_histories``)."""
        timings: dict[str, float] = {}
        answers: list = [None] * len(users)
        with ExitStack() as reading:
            with metrics.timed("features", timings, histogram, None if fetched is None else fetched.started):
                histories = [self.users.fetch_history(user[0]) for user in users] if fetched is None else fetched.histories
                reading.enter_context(self.live.rw.reading())  # after the store's I/O: a slow store holds up no change
                catalog = self.catalog
                admit = self.admission(catalog, opts.filters)  # an unknown genre fails the call, not each user
                live = []
                for i, (user, history) in enumerate(zip(users, histories)):
                    try:
                        ctx = self.users.resolve(*user, fetched=history)
                    except RecsysError as err:
                        answers[i] = err
                        continue
                    live.append((i, ctx, admit(ctx.hist_items if opts.exclude_seen else None)))
            self._recall_and_rank(live, answers, timings, opts, default_candidates, histogram, ranker, item_item, popularity)
        return answers, timings

    async def read_histories(self, users: Sequence[UserQuery]) -> Fetched:
        """The users' online histories, awaited: what ``recommend_users`` would read itself, for a caller that answers
        on the event loop and must not block it on the store."""
        started = time.perf_counter()
        return Fetched([await self.users.fetch_history_async(user[0]) for user in users], started)

    def _recall_and_rank(self, live: list, answers: list, timings: dict[str, float],
                         opts: RecommendOptions, default_candidates: int | None, histogram: Histogram, ranker: bool,
                         item_item: bool, popularity: bool) -> None:
        """The stages after ``recommend_users`` resolved its users, under the catalogue's read lock: each answer
        put in its place in ``answers``."""
        catalog = self.catalog
        live, repeats = _distinct(live)
        for i, ctx, allowed in live:
            if ctx.empty or popularity:
                if ctx.empty:
                    metrics.FALLBACKS.labels("popularity").inc()
                answers[i] = self.answers.response(ctx, catalog, self.popular(catalog, allowed, opts.k), "popularity", opts)
        warm = [entry for entry in live if not (entry[1].empty or popularity)]
        if warm:
            rows, ctxs, alloweds = zip(*warm)
            with metrics.timed("user_encoding", timings, histogram):
                vecs = self.users.vectors(ctxs)
            with metrics.timed("ann_search", timings, histogram):
                depth = max(opts.candidates or default_candidates or self.bundle_candidates, opts.k)
                found = search_many(self.live, vecs, depth, alloweds, self.exact_share)
            with metrics.timed("rerank", timings, histogram):
                lists = rerank(self.ranker if ranker else None, self.meta.item_item_candidates if item_item else 0, ctxs, found,
                               vecs, alloweds, self.users.ranker_features)
                ranked = [self.answers.ranked(ctx, catalog, c, opts) for ctx, (catalog, _, _), c in zip(ctxs, found, lists)]
            for i, ctx, (catalog, _, _), entries, cands in zip(rows, ctxs, found, ranked, lists):
                answers[i] = self.answers.response(ctx, catalog, entries, None, opts, cands)
        for i, first in repeats:
            answers[i] = answers[first]

    def similar_items(self, raw_item: str, k: int) -> dict:
        """Items near ``raw_item``: by the two-tower's item vectors through the index while the item has
        interactions; for an item nobody has interacted with yet ("cold": popularity 0, e.g. just upserted), by
        content, the cosine of the item tower's content-only vectors (text and metadata, id left out) over every
        live item, since its own vector knows nothing about who liked it."""
        with self.live.rw.reading():
            return self._similar_items(raw_item, k)

    def _similar_items(self, raw_item: str, k: int) -> dict:
        catalog = self.catalog
        row = self.changes.require_item(raw_item, catalog)
        content = catalog.arrays.get("item_content_vectors")
        if content is not None and catalog.arrays["popularity"][row] == 0:
            source = "content"
            cands, scores = content_neighbours(catalog, content, row, k)
        else:
            source = "two-tower"
            catalog, cands, scores = self.search(catalog.vectors[row], k, Allowed(excluded=np.array([row])))
        return {"item_id": raw_item, "bundle_version": self.version, "source": source,
                "items": [self.answers.item(catalog, int(c), float(s), None, r, source=source)
                          for r, (c, s) in enumerate(zip(cands, scores))]}

    # ---------------------------------------------------------------- stages, for callers that need one alone
    def admission(self, catalog: Catalog, filters) -> Callable[[np.ndarray | None], Allowed]:
        """``allowed`` in two steps: the filter's part once per request or batch (an unknown genre raises here),
        then a function of each user's seen items."""
        return admission(catalog, RowFilter.of(filters, self._genre_cols), self.exact_limit, self.filter_rows)

    def allowed(self, catalog: Catalog, filters, seen: np.ndarray | None) -> Allowed:
        """Items that may be returned: active, passing the filters, not already seen."""
        return self.admission(catalog, filters)(seen)

    def search(self, vec: np.ndarray, depth: int, allowed: Allowed) -> Found:
        return search_many(self.live, vec[None], depth, [allowed], self.exact_share)[0]

    def popular(self, catalog: Catalog, allowed: Allowed, k: int) -> list[tuple]:
        """The popularity fallback's entries: the ``k`` most popular allowed items."""
        return self.answers.popular(catalog, popular(catalog, allowed, k))

    def _genre_cols(self, names: list[str]) -> list[int]:
        unknown = [g for g in names if g not in self.genre_col]
        if unknown:
            raise InvalidInput(f"unknown genres {unknown}; known: {sorted(self.genre_col)}")
        return [self.genre_col[g] for g in names]


def content_neighbours(catalog: Catalog, content: np.ndarray, row: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` live items whose content vectors are nearest ``row``'s (exact: a cold item's question is rare
    next to recommendations, and an exact scan of the content vectors needs no second index to keep live)."""
    scores = content @ content[row]
    scores[~catalog.active] = -np.inf
    scores[row] = -np.inf
    k = min(k, int(np.isfinite(scores).sum()))
    top = np.argpartition(-scores, k - 1)[:k] if k else np.zeros(0, np.int64)
    top = top[np.lexsort((top, -scores[top]))]
    return top, scores[top]


def _distinct(live: list[tuple[int, UserContext, Allowed]]) -> tuple[list, list[tuple[int, int]]]:
    """A user asked for twice in one batch (same id, same history version) is answered once, and both places
    get that answer: the same to the bit (scored apart, rows of one matmul can round differently) and cheaper.
    Returns the distinct entries and ``(place, place answered first)`` for the repeats."""
    distinct, repeats, first = [], [], {}
    for entry in live:
        ctx = entry[1]
        key = None if ctx.cache_key is None else (ctx.cache_key, ctx.version)
        if key is not None and key in first:
            repeats.append((entry[0], first[key]))
        else:
            if key is not None:
                first[key] = entry[0]
            distinct.append(entry)
    return distinct, repeats
