"""Search: each user's nearest allowed items by inner product, and the popularity fallback.

hnswlib's own filter raises when fewer than k survive and calls back into Python per visited node, so
results are over-fetched and checked here, the fetch growing until enough survive.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from numba import njit

from recsys.engine.allowed import Allowed
from recsys.engine.catalog import NOTHING, Catalog, LiveCatalog
from recsys.topk import in_sorted, top_k

EXACT_SEARCH_FACTOR = 2  # below depth * this many allowed items, scoring them all beats over-fetching
# A first fetch of at least this share of the catalogue makes HNSW visit most of its graph (hnswlib's beam is
# max(ef, k)): one matrix-vector product over the catalogue is then cheaper, and exact. On MovieLens-100K (depth
# 200 plus the user's seen items, over 1,682 items) it is every request: docs/benchmarks.md, "Engine CPU".
EXACT_FETCH_SHARE = 0.05
FETCH_GROWTH = 4  # an over-fetch that did not fill the list asks for this many times more


def scored_exactly(first_fetch, n_items: int, share: float = EXACT_FETCH_SHARE):
    """Whether a first fetch (a number, or an array of them) is scored exactly over the catalogue rather than through
    HNSW: at least ``share`` of its items (``EXACT_FETCH_SHARE``). The service and the offline evaluation share it."""
    return first_fetch >= share * n_items


Found = tuple[Catalog, np.ndarray, np.ndarray]  # the catalogue searched, item rows, inner products (best first)


def search_many(live: LiveCatalog, vecs: np.ndarray, depth: int, alloweds: Sequence[Allowed],
                exact_share: float = EXACT_FETCH_SHARE) -> list[Found]:
    """Each user's top-``depth`` allowed items: exact over a narrow filter's rows, or when the first fetch would be at
    least ``exact_share`` of the catalogue (a small one), else HNSW with over-fetch, checking each result; the HNSW
    users in one batched query per beam.

    A broad filter that still leaves the list short after two growths admits far fewer rows than its bound: its
    rows are then listed and scored exactly. hnswlib's beam is max(ef, k), so the users of a batch are queried in
    groups of one beam, each taking its own fetch from the answer: a user's list is the one it gets alone, whoever
    shares its batch. Rows changed
    since the graph last held them (``Catalog.unindexed``) are scored exactly and merged into the graph's answer;
    the graph's entries for them (an older vector) are ignored.
    """
    with live.rw.reading():  # (a request holds it already; a caller of one stage alone may not)
        return _search_many(live, vecs, depth, alloweds, exact_share)


def _search_many(live: LiveCatalog, vecs: np.ndarray, depth: int, alloweds: Sequence[Allowed], exact_share: float) -> list[Found]:
    catalog = live.catalog
    out: list = [None] * len(alloweds)
    pending: dict[int, tuple[int, int, int]] = {}  # user -> (depth, first fetch, fetch)
    for u, allowed in enumerate(alloweds):
        n_allowed = allowed.count(catalog)
        wanted = min(depth, n_allowed)
        if wanted == 0:
            out[u] = (catalog, NOTHING, np.zeros(0, np.float32))
            continue
        first = allowed.first_fetch(catalog, wanted)
        if allowed.listed is not None:
            out[u] = (catalog, *exact_listed(catalog, vecs[u], allowed, wanted))
        elif allowed.rows is not None or (allowed.rule is None and n_allowed <= wanted * EXACT_SEARCH_FACTOR) \
                or scored_exactly(first, catalog.n_active, exact_share):
            out[u] = (catalog, *exact(catalog, vecs[u], allowed.every_row(catalog), wanted))
        else:
            pending[u] = (wanted, first, first)
    while pending:
        searchable, keys = catalog.n_active, list(pending)
        fetch = {u: min(pending[u][2], searchable) for u in keys}
        retry: dict[int, tuple[int, int, int]] = {}
        for group in beam_groups([fetch[u] for u in keys], live.index.ef):
            users = [keys[i] for i in group]
            try:
                labels, dists = live.index.knn_query(vecs[users], k=max(fetch[u] for u in users))
            except RuntimeError:  # hnswlib found fewer than k (deleted items): score exactly instead
                labels = dists = None
            for j, u in enumerate(users):
                got = None if labels is None else (live.label_row[labels[j][: fetch[u]]], dists[j][: fetch[u]])
                done = _taken(catalog, vecs[u], alloweds[u], *pending[u][:2], fetch[u], got, searchable)
                if done is None:
                    retry[u] = (pending[u][0], pending[u][1], min(fetch[u] * FETCH_GROWTH, searchable))
                else:
                    out[u] = (catalog, *done)
        pending = retry
    return out


def beam_groups(fetches: Sequence[int] | np.ndarray, ef: int) -> list[np.ndarray]:
    """Positions in ``fetches`` grouped by hnswlib's beam, max(ef, fetch): one query per group at its largest fetch,
    each user taking its own fetch from the answer, searches each as deep as it would be alone."""
    beams = np.maximum(np.asarray(fetches, np.int64), ef)
    return [np.flatnonzero(beams == beam) for beam in np.unique(beams)]


def _taken(catalog: Catalog, vec: np.ndarray, allowed: Allowed, wanted: int, first: int, fetch: int,
           got: tuple[np.ndarray, np.ndarray] | None, searchable: int) -> tuple[np.ndarray, np.ndarray] | None:
    """A user's answer from the graph's ``got`` (rows, distances; None: the graph could not answer), or exact when
    the graph could not or a filter admits far fewer rows than its bound; None: fetch deeper."""
    if got is None:
        return exact(catalog, vec, allowed.every_row(catalog), wanted)
    found, dist = got
    keep = allowed.keep(found, catalog)
    if len(catalog.unindexed):
        keep &= ~in_sorted(found, catalog.unindexed)
    if keep.sum() >= wanted or fetch >= searchable:
        rows, scores = found[keep][:wanted], (1.0 - dist[keep][:wanted]).astype(np.float32)
        return with_unindexed(catalog, vec, allowed, rows, scores, wanted)
    if allowed.rule is not None and fetch >= first * FETCH_GROWTH**2:
        return exact(catalog, vec, allowed.every_row(catalog), wanted)
    return None


def with_unindexed(catalog: Catalog, vec: np.ndarray, allowed: Allowed, rows: np.ndarray, scores: np.ndarray,
                   depth: int) -> tuple[np.ndarray, np.ndarray]:
    """The graph's ``rows`` (best first) merged with the allowed unindexed rows, scored exactly: the best ``depth``.
    The graph's list reaches ``depth`` on its own, so nothing it did not return could displace one of these."""
    extra = catalog.unindexed
    if len(extra):
        extra = extra[allowed.admits(extra, catalog)]
    if not len(extra):
        return rows, scores
    extra_scores = scores_of(catalog.vectors, extra, vec).astype(np.float32)
    return top_k(np.concatenate([rows, extra]), np.concatenate([scores, extra_scores]), depth)


def exact(catalog: Catalog, vec: np.ndarray, rows: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``depth`` best of ``rows``: each row's vector scored where it lies, or for a good share of the catalogue
    every vector scored in place (one matrix-vector product, read once in order)."""
    if len(rows) * 4 >= len(catalog.vectors):
        scores = (catalog.vectors @ vec)[rows]
    else:
        scores = scores_of(catalog.vectors, rows, vec)
    top, scores = top_k(rows, scores, depth)
    return top, scores.astype(np.float32)


def exact_listed(catalog: Catalog, vec: np.ndarray, allowed: Allowed, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``depth`` best of a narrow filter's rows from the filter row cache (``allowed.rows``, in ``Listed`` order):
    the cached rows' vectors in one product, the rows changed since the filter's lists were built scored where they
    lie."""
    listed = allowed.listed
    vec = np.ascontiguousarray(vec, listed.cached.vectors.dtype)
    scores = np.concatenate([(listed.cached.vectors @ vec)[listed.keep], scores_of(catalog.vectors, listed.extra, vec)])
    top, scores = top_k(allowed.rows, scores, depth)
    return top, scores.astype(np.float32)


def scores_of(vectors: np.ndarray, rows: np.ndarray, vec: np.ndarray) -> np.ndarray:
    """``vectors[rows] @ vec`` without the gathered copy: a narrow filter's 13,000 rows at 1M items are 3.3 MB
    that ``np.take`` wrote and the product read again (0.5 ms warm; 0.2 ms this way: docs/benchmarks.md)."""
    return _scores_of(vectors, np.ascontiguousarray(rows, np.int64), np.ascontiguousarray(vec, vectors.dtype))


def compile_kernels(catalog: Catalog) -> None:
    """Compile the scoring kernel (or load it from numba's cache) for this catalogue's vectors, at load: the first
    filtered request would otherwise pay the second it takes."""
    scores_of(catalog.vectors, NOTHING, np.zeros(catalog.vectors.shape[1], np.float32))


@njit(cache=True, nogil=True, fastmath=True)
def _scores_of(vectors, rows, vec):  # pragma: no cover (compiled)
    out = np.empty(len(rows), vectors.dtype)
    for i in range(len(rows)):
        row = vectors[rows[i]]
        total = vectors.dtype.type(0)
        for j in range(len(vec)):
            total += row[j] * vec[j]
        out[i] = total
    return out


def popular(catalog: Catalog, allowed: Allowed, k: int) -> np.ndarray:
    """The ``k`` most popular allowed rows: the top of a narrow filter's rows, or the first allowed ones in the
    catalogue's popularity order, read in growing chunks: about ``k`` over the admitted share (more only for a
    broad filter that admits far fewer rows than its bound)."""
    pop = catalog.arrays["popularity"]
    if allowed.rows is not None:
        return top_k(allowed.rows, pop[allowed.rows], k)[0]
    return _first_kept(catalog.by_popularity, lambda chunk: allowed.keep(chunk, catalog), k, allowed.first_fetch(catalog, k))


def _first_kept(order: np.ndarray, keep: Callable[[np.ndarray], np.ndarray], k: int, size: int) -> np.ndarray:
    """The first ``k`` entries of ``order`` that ``keep`` accepts, read in chunks growing from ``size``."""
    found: list[np.ndarray] = []
    start = 0
    while start < len(order) and sum(len(f) for f in found) < k:
        chunk = order[start : start + size]
        found.append(chunk[keep(chunk)])
        start, size = start + size, size * FETCH_GROWTH
    return np.concatenate(found)[:k] if found else np.zeros(0, np.int64)
