"""Filters and admission: which items a request may return, worked out without a pass over the catalogue."""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from recsys.engine.catalog import NOTHING, Catalog
from recsys.engine.filters import FilterIndex, RowFilter, YearOrdered
from recsys.topk import in_sorted

FETCH_MARGIN = 1.25  # a filtered over-fetch asks for this much more than the admitted share predicts
FILTER_CACHE_MB = 64  # default of the engine's filter row cache (RECSYS_FILTER_CACHE_MB)


@dataclass(frozen=True)
class FilterRows:
    """A narrow filter's rows as the filter's lists admit them, kept between requests (``FilterRowCache``): sorted,
    with a copy of their vectors side by side, so that a request scores them in one matrix-vector product instead of
    reading each vector where it lies (13,086 rows of 1M: 0.09 against 0.5 ms right after an idle 10 ms,
    docs/benchmarks.md), and without a pass over them for removals. ``keep`` is False where a row was written or
    removed since the lists were built (``FilterIndex.changed[:applied]``, which only grows until a rebuild makes new
    lists): the copy may not hold its vector or admission any more, so a request checks and scores it with the
    other changed rows."""

    lists: YearOrdered  # the lists read (by identity: a rebuild makes new ones)
    rows: np.ndarray  # sorted
    vectors: np.ndarray  # [len(rows), dim]: each row's vector when read, still its vector where ``keep``
    keep: np.ndarray
    applied: int

    @classmethod
    def read(cls, catalog: Catalog, rule: RowFilter, slices: list) -> "FilterRows":
        """O(rows): a removed row not written since the lists were built stays removed, so it is dropped here once."""
        rows = np.sort(rule.listed(catalog.filters, slices))
        rows = rows[catalog.active[rows]]
        fresh = cls(catalog.filters.everything, rows, np.ascontiguousarray(catalog.vectors[rows]),
                    np.ones(len(rows), bool), 0)
        return fresh.updated(catalog.filters)

    def current(self, index: FilterIndex) -> bool:
        return self.lists is index.everything and self.applied <= len(index.changed)

    def updated(self, index: FilterIndex) -> "FilterRows":
        """Rows changed since the last update dropped (O(those rows x log rows))."""
        changed = index.changed[self.applied :]
        if not len(changed):
            return self
        keep = self.keep.copy()
        keep[found_at(self.rows, changed)] = False
        return replace(self, keep=keep, applied=len(index.changed))

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + self.vectors.nbytes + self.keep.nbytes


class FilterRowCache:
    """Narrow filters' ``FilterRows``, the least recently used dropped past ``budget`` bytes: a filter many users ask
    for (a category page, a decade) then costs a request O(its seen items and the rows changed since the lists were
    built), plus one product over the rows' vectors. One per engine; a budget of 0 turns it off."""

    def __init__(self, budget: int):
        self.budget, self.size = budget, 0
        self.entries: OrderedDict[tuple, FilterRows] = OrderedDict()
        self.lock = threading.Lock()  # (requests may run on several threads: batches, variants)

    def rows(self, catalog: Catalog, rule: RowFilter, slices: list) -> FilterRows | None:
        """``rule``'s rows for ``catalog`` (read under its read lock), kept or read now; None when the cache is off or
        its slices' rows (at least as many as it keeps) would pass the budget alone."""
        row_bytes = 8 + 1 + catalog.vectors.itemsize * int(np.prod(catalog.vectors.shape[1:]))  # a row, its keep, its vector
        if self.budget <= 0 or self.budget < sum(len(rows) for _, rows in slices) * row_bytes:
            return None
        with self.lock:
            hit = self.entries.get(rule.key)
        got = hit.updated(catalog.filters) if hit is not None and hit.current(catalog.filters) else \
            FilterRows.read(catalog, rule, slices)
        with self.lock:
            if got is hit and rule.key in self.entries:
                self.entries.move_to_end(rule.key)
                return got
            older = self.entries.pop(rule.key, None)
            self.size += got.nbytes - (0 if older is None else older.nbytes)
            self.entries[rule.key] = got
            while self.size > self.budget:
                self.size -= self.entries.popitem(last=False)[1].nbytes
        return got


@dataclass(frozen=True)
class Listed:
    """A narrow filter's allowed rows for one request, as scored: the cached rows where ``keep``, then ``extra`` (rows
    changed since the filter's lists were built that it admits), the user's seen rows left out of both."""

    cached: FilterRows
    keep: np.ndarray
    extra: np.ndarray

    @classmethod
    def of(cls, cached: FilterRows, extra: np.ndarray, excluded: np.ndarray) -> "Listed":
        keep, seen = cached.keep, found_at(cached.rows, excluded)
        if len(seen):
            keep = keep.copy()
            keep[seen] = False
        return cls(cached, keep, extra[~in_sorted(extra, excluded)])

    @property
    def rows(self) -> np.ndarray:
        return np.concatenate([self.cached.rows[self.keep], self.extra])


def found_at(rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Where in sorted, unique ``rows`` each of ``values`` found there is (O(len(values) log len(rows)))."""
    return np.searchsorted(rows, values)[in_sorted(values, rows)]


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
    listed: Listed | None = None  # a narrow filter's ``rows`` as the filter row cache holds them, for scoring

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
        """Which search results may be returned: not a row past the catalogue (an item added since), nor -1 (a graph
        element no row holds: what an insertion that failed part way leaves, since hnswlib keeps the part it did)."""
        keep = np.zeros(len(labels), bool)
        inside = (labels >= 0) & (labels < len(catalog.active))
        keep[inside] = catalog.active[labels[inside]]
        keep &= ~in_sorted(labels, self.excluded)
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


def admission(catalog: Catalog, rule: RowFilter | None, exact_limit: int,
              cache: FilterRowCache | None = None) -> Callable[[np.ndarray | None], Allowed]:
    """What a request may return, in two steps: the filter's part, worked out once per request or batch, then a
    function of each user's seen items. A filter's year slices are sized by binary search first; only when they
    hold at most ``exact_limit`` rows are those rows read (or taken from ``cache``)."""
    admitted, bound, cached, extra = None, 0, None, NOTHING
    if rule is not None:
        slices = rule.slices(catalog.filters)
        bound = sum(len(rows) for _, rows in slices) + len(catalog.filters.changed)  # (checked one by one)
        if bound <= exact_limit:
            cached = None if cache is None else cache.rows(catalog, rule, slices)
            if cached is None:
                admitted = rule.admitted(catalog.filters, slices)
            else:
                extra = catalog.live(rule.changed_admitted(catalog.filters), NOTHING)

    def allowed(seen: np.ndarray | None) -> Allowed:
        excluded = np.unique(seen) if seen is not None and len(seen) else np.zeros(0, np.int64)
        if rule is None:
            return Allowed(excluded)
        if cached is not None:
            listed = Listed.of(cached, extra, excluded)
            return Allowed(excluded, rows=listed.rows, listed=listed)
        if admitted is None:
            return Allowed(excluded, rule=rule, bound=bound)
        return Allowed(excluded, rows=catalog.live(admitted, excluded))
    return allowed
