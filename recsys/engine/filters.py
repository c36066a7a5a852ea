"""Filters at catalogue scale: the rows a filter admits, found without a pass over the catalogue.

The catalogue carries a ``FilterIndex``, built at bundle load and rebuilt aside after many changes, never per
request: for every genre, for the items without a genre and for the whole catalogue, the item rows in year
order (rows changed since it was built are checked one by one). A year range is then one slice of such a list, found by binary search, and a
filter's admitted rows lie in the union of a few slices: the ``genres_any`` genres' lists, the whole
catalogue's list, or (for ``genres_none``) the other genres' lists plus the genre-less items, whichever
holds the fewest rows. Their lengths bound the admitted count before a single row is read.

The engine scores a filter exactly when those slices hold few rows (cost bounded by ``exact_limit``), and
otherwise searches HNSW and checks this filter on each result (the filter then admits a large share of the
catalogue, so a small over-fetch fills the list). Why that split: docs/benchmarks.md, "Catalogue scale".
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from recsys.query import Filters

EXACT_LIMIT = 50_000  # default of the engine's exact_limit (RECSYS_FILTER_EXACT_LIMIT)
WORD = 64  # genres per bit word


@dataclass(frozen=True)
class YearOrdered:
    """Item rows by year (ties by row), unknown years last: a year range is one slice."""

    rows: np.ndarray  # int64
    years: np.ndarray  # float32, ascending, NaN last
    n_known: int

    @classmethod
    def of(cls, rows: np.ndarray, year: np.ndarray) -> "YearOrdered":
        order = np.argsort(year[rows], kind="stable")  # NaN sorts last
        years = year[rows][order]
        return cls(rows[order].astype(np.int64), years, int(np.isfinite(years).sum()))

    def between(self, low: float | None, high: float | None) -> np.ndarray:
        """The rows with ``low <= year <= high`` (a view); without bounds every row, unknown years included.
        A bound excludes unknown years, as a filter on year must."""
        if low is None and high is None:
            return self.rows
        known = self.years[: self.n_known]
        start = 0 if low is None else int(np.searchsorted(known, low, side="left"))
        end = self.n_known if high is None else int(np.searchsorted(known, high, side="right"))
        return self.rows[start:max(start, end)]


@dataclass(frozen=True)
class FilterIndex:
    """Per catalogue: genre bits and year per row, and the year-ordered row lists.

    The lists are rebuilt in the background, not on each catalogue change: rows written or removed since they were
    built are ``stale`` (their list entries may be out of date, or missing for an added item), left out of the lists'
    rows and checked one by one from ``changed`` instead. ``changed`` only grows until the lists are rebuilt."""

    genre_words: tuple[np.ndarray, ...]  # [n] uint64 each: bit g % 64 of word g // 64 is genre g
    year: np.ndarray  # [n] float32, NaN unknown
    everything: YearOrdered
    by_genre: tuple[YearOrdered, ...]
    genreless: YearOrdered
    stale: np.ndarray | None = None  # [n] bool: written since the lists were built
    changed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # the stale rows, each once

    @classmethod
    def build(cls, item_genres: np.ndarray, item_year: np.ndarray) -> "FilterIndex":
        words, year = genre_words(item_genres), item_year.astype(np.float32)
        return cls(words, year, *year_lists(words, year, item_genres.shape[1]))

    @property
    def n_genres(self) -> int:
        return len(self.by_genre)

    def has_any(self, rows: np.ndarray, cols: list[int]) -> np.ndarray:
        """Whether each of ``rows`` has at least one of the genre columns ``cols``: one gather and AND per
        64 genres (O(len(rows)); a bool matrix's ``any(axis=1)`` costs about 15 times more)."""
        hit = np.zeros(len(rows), bool)
        for w, word in enumerate(self.genre_words):
            mask = sum(1 << (c - w * WORD) for c in cols if w * WORD <= c < (w + 1) * WORD)
            if mask:
                hit |= (word[rows] & np.uint64(mask)) != 0
        return hit


@dataclass(frozen=True)
class RowFilter:
    """A request's ``Filters`` in catalogue terms: genre columns and a year range."""

    any_cols: list[int]  # empty: no genres_any constraint
    none_cols: list[int]
    year_min: int | None
    year_max: int | None

    @classmethod
    def of(cls, filters: Filters | None, genre_cols: Callable[[list[str]], list[int]]) -> "RowFilter | None":
        """None when nothing is constrained (no filters, or only empty lists): the unfiltered path."""
        if filters is None:
            return None
        rule = cls(genre_cols(filters.genres_any or []), genre_cols(filters.genres_none or []),
                   filters.year_min, filters.year_max)
        unconstrained = not rule.any_cols and not rule.none_cols and rule.year_min is None and rule.year_max is None
        return None if unconstrained else rule

    def slices(self, index: FilterIndex) -> list[tuple[int | None, np.ndarray]]:
        """Year slices whose union holds every admitted row, the fewest rows of the possible choices; each
        tagged with its genre column (None: not a genre list). Binary searches only, no rows read."""
        if self.any_cols:
            return [(c, index.by_genre[c].between(self.year_min, self.year_max)) for c in dict.fromkeys(self.any_cols)]
        whole = [(None, index.everything.between(self.year_min, self.year_max))]
        if not self.none_cols:
            return whole
        others = [(c, index.by_genre[c].between(self.year_min, self.year_max))
                  for c in range(index.n_genres) if c not in self.none_cols]
        others.append((None, index.genreless.between(self.year_min, self.year_max)))
        return min(others, whole, key=lambda parts: sum(len(rows) for _, rows in parts))

    @property
    def key(self) -> tuple:
        """What identifies this filter (hashable, for caches)."""
        return tuple(sorted(set(self.any_cols))), tuple(sorted(set(self.none_cols))), self.year_min, self.year_max

    def admitted(self, index: FilterIndex, slices: list[tuple[int | None, np.ndarray]]) -> np.ndarray:
        """Every admitted row, each once, from ``slices`` (O(rows in them)) and the index's changed rows."""
        rows = self.listed(index, slices)
        if not len(index.changed):
            return rows
        return np.concatenate([rows[~index.stale[rows]], self.changed_admitted(index)])

    def listed(self, index: FilterIndex, slices: list[tuple[int | None, np.ndarray]]) -> np.ndarray:
        """The rows the index's lists admit, each once, as the lists were built (changed rows not checked). The year
        range holds by construction; the genre tests run only where the slices do not already guarantee them."""
        parts, earlier = [], []
        for col, rows in slices:
            if earlier:  # a row with several genres sits in several lists: keep it in the first only
                rows = rows[~index.has_any(rows, earlier)]
            if col is not None:
                earlier.append(col)
            parts.append(rows)
        rows = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return rows[~index.has_any(rows, self.none_cols)] if self.none_cols else rows

    def changed_admitted(self, index: FilterIndex) -> np.ndarray:
        """The rows changed since the lists were built that this filter admits now (O(changed rows))."""
        return index.changed[self.admits(index, index.changed)]

    def admits(self, index: FilterIndex, rows: np.ndarray) -> np.ndarray:
        """Whether each of ``rows`` passes (for search results: O(len(rows)), nothing precomputed)."""
        keep = np.ones(len(rows), bool)
        if self.any_cols:
            keep &= index.has_any(rows, self.any_cols)
        if self.none_cols:
            keep &= ~index.has_any(rows, self.none_cols)
        year = index.year[rows]
        if self.year_min is not None:
            keep &= year >= self.year_min  # NaN compares False: an unknown year never passes a year bound
        if self.year_max is not None:
            keep &= year <= self.year_max
        return keep


def genre_words(item_genres: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each row's genres as bits, 64 genres per uint64 word."""
    genres = item_genres > 0
    return tuple(_word(genres[:, start : start + WORD]) for start in range(0, genres.shape[1], WORD))


def year_lists(words: tuple[np.ndarray, ...], year: np.ndarray, n_genres: int) -> tuple[YearOrdered, tuple, YearOrdered]:
    """The year-ordered lists of every row, of each genre's rows and of the rows without a genre:
    O(n_items log n_items), the cost a catalogue change does not pay (``LiveCatalog`` rebuilds them aside)."""
    has = [(words[g // WORD] >> np.uint64(g % WORD)) & np.uint64(1) != 0 for g in range(n_genres)]
    genreless = np.ones(len(year), bool)
    for column in has:
        genreless &= ~column
    return (YearOrdered.of(np.arange(len(year)), year), tuple(YearOrdered.of(np.flatnonzero(c), year) for c in has),
            YearOrdered.of(np.flatnonzero(genreless), year))


def _word(genres: np.ndarray) -> np.ndarray:
    """Up to 64 bool genre columns as one uint64 per row (column by column: no [n, 64] temporary)."""
    word = np.zeros(len(genres), np.uint64)
    for j in range(genres.shape[1]):
        word |= genres[:, j].astype(np.uint64) << np.uint64(j)
    return word
