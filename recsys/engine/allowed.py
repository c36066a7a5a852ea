"""Filters and admission: which items a request may return, worked out without a pass over the catalogue."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from recsys.engine.catalog import NOTHING, Catalog
from recsys.engine.filters import RowFilter
from recsys.topk import in_sorted

FETCH_MARGIN = 1.25  # a filtered over-fetch asks for this much more than the admitted share predicts


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


def admission(catalog: Catalog, rule: RowFilter | None, exact_limit: int) -> Callable[[np.ndarray | None], Allowed]:
    """What a request may return, in two steps: the filter's part, worked out once per request or batch, then a
    function of each user's seen items. A filter's year slices are sized by binary search first; only when they
    hold at most ``exact_limit`` rows are those rows read."""
    admitted, bound = None, 0
    if rule is not None:
        slices = rule.slices(catalog.filters)
        bound = sum(len(rows) for _, rows in slices) + len(catalog.filters.changed)  # (checked one by one)
        if bound <= exact_limit:
            admitted = rule.admitted(catalog.filters, slices)

    def allowed(seen: np.ndarray | None) -> Allowed:
        excluded = np.unique(seen) if seen is not None and len(seen) else np.zeros(0, np.int64)
        if rule is None:
            return Allowed(excluded)
        if admitted is None:
            return Allowed(excluded, rule=rule, bound=bound)
        return Allowed(excluded, rows=catalog.live(admitted, excluded))
    return allowed
