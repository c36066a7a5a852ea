"""The catalogue a request reads: an immutable snapshot, and the index it answers for.

Snapshots are replaced whole (copy-on-write), so a request that took one never sees a half-applied
change; the hnswlib index is only touched under ``LiveCatalog.lock`` (hnswlib is not safe when
``add_items`` runs during ``knn_query``), and a change swaps in its snapshot under the same lock.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from functools import cached_property

import hnswlib
import numpy as np

from recsys.engine.filters import FilterIndex
from recsys.rank_features import RankerTables
from recsys.topk import in_sorted

NOTHING = np.zeros(0, np.int64)
# Item arrays a newly added item cannot take from its features: it has no interactions yet, so no
# popularity and no co-occurrence neighbours (-1 is the padding of ``item_neighbours``).
# (An item is "cold" while its popularity is 0: ``Engine.similar_items`` answers it from content.)
NEW_ITEM_DEFAULTS = {"popularity": 0.0, "item_neighbours": -1, "item_neighbour_sims": 0.0, "item_seq_neighbours": -1,
                     "item_seq_neighbour_sims": 0.0}


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
        return rows[~in_sorted(rows, excluded)]

    def without(self, row: int) -> "Catalog":
        """This snapshot with ``row`` removed: only ``active`` changes, the precomputed parts are kept."""
        return replace(self, active=set_rows(self.active, np.array([row]), False, False, len(self.active)))


@dataclass(frozen=True)
class Upsert:
    """Validated catalogue changes, computed but not yet live (one batch, one rebuild)."""

    rows: np.ndarray
    vectors: np.ndarray
    catalog: Catalog


class LiveCatalog:
    """The index and the snapshot it answers for, changed together under ``lock``."""

    def __init__(self, index: hnswlib.Index, catalog: Catalog):
        self.index, self.catalog = index, catalog
        self.lock = threading.Lock()

    def commit(self, change: Upsert) -> None:
        """Put prepared items into the index and swap in their catalogue, together under ``lock``."""
        with self.lock:
            index = self.index
            top = int(change.rows.max())
            if top >= index.get_max_elements():
                index.resize_index(max(2 * index.get_max_elements(), top + 1))
            for row in change.rows[change.rows < index.get_current_count()]:
                if not self.catalog.active[row]:
                    index.unmark_deleted(int(row))
            index.add_items(change.vectors, change.rows)
            self.catalog = change.catalog

    def remove(self, row: int) -> None:
        with self.lock:
            self.index.mark_deleted(row)
            self.catalog = self.catalog.without(row)


def is_item_array(name: str, value: np.ndarray, n_items: int) -> bool:
    return (name.startswith("item_") or name == "popularity") and value.ndim >= 1 and len(value) == n_items


def set_rows(array: np.ndarray, rows: np.ndarray, values, default, n: int) -> np.ndarray:
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
