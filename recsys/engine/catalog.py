"""The catalogue a request reads, the index it answers for, and the changes made to both while serving.

Item arrays are ``Column``s (``recsys.engine.items``): one span per array, with room to grow, shared by the
catalogue, the ranker tables and the filter index, so that no array exists twice. A change writes only the rows
it changes (O(changed items)): the item arrays, the columns derived from them (the ranker's ``item_static``, the
filter's genre bits), the popularity order (an added item, popularity 0, goes last, where a stable sort puts
it). Only the filter's year-ordered lists cost O(n_items log n_items) to make; they are rebuilt aside in a thread
once enough rows changed, and the rows changed since are checked one by one meanwhile.

The hnswlib graph is the one part a change cannot write in microseconds (an insertion costs about half a
millisecond at 1M items) and hnswlib cannot search while it inserts. So a change's rows are first "unindexed":
served by exact scoring beside the graph (``Catalog.unindexed``, a few rows: each search scores them and ignores
the graph's stale entries for them), and a merge thread inserts them into the graph one at a time, each insertion a
short hold of the write lock taken when no request is reading (``ReadWriteLock.writing(patience_s)``). A change is
therefore served as soon as its columns are written, and requests never wait for a batch's insertions.

Graph labels are not rows: a replaced item's new vector goes in under a fresh label and the label of its older one
is marked deleted (``label_row`` maps a label back to its row). hnswlib's own replacement of a label's vector
repairs every neighbour's list: 1.4 ms a row at 1M items, against 0.4 ms this way (docs/benchmarks.md). The marked
element stays in the graph, still a way through it but never an answer. Such garbage (older vectors, removed
items) is bounded: once it reaches ``garbage_room`` elements (1/16 of the bundle's items), a replaced item's
vector is updated in place under its label, and while removals keep it above the room an added item takes a
marked element's place (hnswlib's ``replace_deleted``), both at the repair's price (1.2-2.0 ms at 1M), so that a
replica absorbing changes for days neither grows its graph without end nor searches ever more dead elements.

Requests read under ``LiveCatalog.rw``'s read lock and a change writes under its write lock, so a request sees a
change whole or not at all: ``Catalog``, the view a request reads, is made anew by each write (views of the columns
at the new item count, no copy).
"""
from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import hnswlib
import numpy as np
from loguru import logger

from recsys.engine.filters import FilterIndex, genre_words, year_lists
from recsys.engine.items import ROOM, Column
from recsys.engine.locks import ReadWriteLock
from recsys.rank_features import RankerTables
from recsys.topk import in_sorted

NOTHING = np.zeros(0, np.int64)
# Item arrays a newly added item cannot take from its features: it has no interactions yet, so no
# popularity and no co-occurrence neighbours (-1 is the padding of ``item_neighbours``).
# (An item is "cold" while its popularity is 0: ``Engine.similar_items`` answers it from content.)
NEW_ITEM_DEFAULTS = {"popularity": 0.0, "item_neighbours": -1, "item_neighbour_sims": 0.0, "item_seq_neighbours": -1,
                     "item_seq_neighbour_sims": 0.0}
# The filter's lists are rebuilt once this many rows changed (or 1/64 of the catalogue, if more): a filtered
# request checks each changed row itself meanwhile.
REBUILD_AFTER = 4096
WRITE_CHUNK = 4  # items written per hold of the write lock when a change is indexed at once (loading the store's fold)
# The merge waits up to this long for a moment with no request reading before it queues for the lock like any
# change. Past MERGE_BACKLOG unindexed rows (each search scores them all) it waits for nothing and inserts
# WRITE_CHUNK rows per hold, and a change of more rows than that is indexed before its write returns.
MERGE_PATIENCE_S = 0.05
MERGE_BACKLOG = 1024
# Marked (dead) elements the graph may hold: this share of the bundle's items, at least GARBAGE_MIN. The bundle's
# index has room for 1/8 more elements than items (recsys/bundle.py): half of it for garbage, half for additions.
GARBAGE_SHARE = 16
GARBAGE_MIN = 1024


@dataclass(frozen=True)
class Catalog:
    """The live catalogue at one item count, as a request reads it (under ``LiveCatalog.rw``'s read lock); item
    arrays share one row order (the graph's labels map to it: ``LiveCatalog.label_row``). ``ids``, ``row_of`` and
    ``titles`` are the live ones: a request reads them only through its rows."""

    ids: list[str]
    row_of: dict[str, int]
    titles: list[str]
    arrays: dict[str, np.ndarray]  # item_vectors, item_genres, item_year, popularity, ... (bundle item arrays)
    active: np.ndarray  # bool: False once removed
    ranker_tables: RankerTables | None
    filters: FilterIndex
    by_popularity: np.ndarray  # rows, most popular first (ties by row)
    written_at: np.ndarray  # the change that last wrote each row (0: the bundle's): user feature caches check it
    n_active: int
    changes: int  # catalogue changes made so far
    unindexed: np.ndarray  # sorted rows whose vector the HNSW graph does not hold yet: scored exactly

    @property
    def vectors(self) -> np.ndarray:
        return self.arrays["item_vectors"]

    def live(self, rows: np.ndarray, excluded: np.ndarray) -> np.ndarray:
        """``rows`` less removed items, rows past this catalogue and ``excluded`` (O(len(rows)))."""
        rows = rows[rows < len(self.active)]
        rows = rows[self.active[rows]]
        return rows[~in_sorted(rows, excluded)]


@dataclass(frozen=True)
class Upsert:
    """Validated, encoded items, not yet live (one batch, one tower call): their ids, titles and array values."""

    raws: list[str]
    titles: list[str | None]
    values: dict[str, np.ndarray]  # item array -> [len(raws), ...] rows; arrays not named keep (or default) theirs


class LiveCatalog:
    """The index and the item columns, changed together under the write lock of ``rw``."""

    def __init__(self, index: hnswlib.Index, ids: list[str], titles: list[str], arrays: dict[str, np.ndarray],
                 ranked_with: dict[str, np.ndarray] | None, rebuild_after: int = REBUILD_AFTER):
        """``arrays``: the bundle's item arrays (mapped: their pages stay shared until a row changes);
        ``ranked_with``: the bundle's arrays when a ranker is served (its tables view the item columns)."""
        self.index, self.rw, self.rebuild_after, self.rebuilding = index, ReadWriteLock(), rebuild_after, threading.Lock()
        self.merging = threading.Lock()  # held by the merge thread
        self.unindexed: set[int] = set()  # rows written since the graph held their vector (or never in it)
        self.merge_queue: deque[int] = deque()  # the unindexed rows in the order written (some since indexed)
        self.report_backlog: Callable[[int], None] | None = None  # told the unindexed count after each write or merge
        self.load(ids, titles, arrays, ranked_with)

    def load(self, ids: list[str], titles: list[str], arrays: dict[str, np.ndarray], ranked_with: dict[str, np.ndarray] | None) -> None:
        """The catalogue made from these item arrays as a whole (the index is left as it is)."""
        self.ids, self.titles, self.row_of = ids, titles, {raw: row for row, raw in enumerate(ids)}
        n = self.n = self.bundle_rows = len(ids)
        self.free_rows: list[int] = []  # rows of items added online and removed since: a new id takes one first
        capacity = 2 * n + ROOM
        arrays = {**arrays, "item_year": arrays["item_year"].astype(np.float32, copy=False)}  # the filter reads it as is
        tables = None if ranked_with is None else RankerTables.from_arrays({**ranked_with, **arrays})
        self.columns = {k: Column(tables_dtype(v, tables, k), capacity, NEW_ITEM_DEFAULTS.get(k)) for k, v in arrays.items()}
        derived = {"active": np.ones(n, bool), "written_at": np.zeros(n, np.int64), "stale": np.zeros(n, bool),
                   "graph_label": np.arange(n, dtype=np.int64),  # the row's vector (maybe an older one) in the graph; -1: none
                   "by_popularity": np.argsort(-arrays["popularity"], kind="stable"),
                   **{f"genre_word_{w}": word for w, word in enumerate(genre_words(arrays["item_genres"]))}}
        if tables is not None:
            derived["item_static"] = tables.item_static
        self.columns.update({k: Column(v, capacity, -1 if k == "graph_label" else False if v.dtype == bool else None)
                             for k, v in derived.items()})
        self.label_row = np.full(max(self.index.get_max_elements(), n), -1, np.int64)  # graph label -> row (-1: none)
        self.label_row[:n] = np.arange(n)  # the bundle's graph: each row under its own number
        self.next_label = n
        self.garbage = 0  # elements of the graph marked deleted (a bundle's graph has none)
        self.garbage_room = max(GARBAGE_MIN, n // GARBAGE_SHARE)
        self.n_genres = arrays["item_genres"].shape[1]
        self.lists = year_lists(self._words(n), self.columns["item_year"].rows[:n], self.n_genres)
        self._changed(np.zeros(0, np.int64))
        self.n_active, self.changes = n, 0
        self.tables = None if tables is None else self._tables_on_columns(tables)
        self.catalog = self._view()

    @property
    def mapped_columns(self) -> list[str]:
        """Item arrays whose unchanged rows are still the bundle file's pages (shared by this host's workers)."""
        return [k for k, c in self.columns.items() if c.mapped]

    # ---------------------------------------------------------------- changes
    def commit(self, change: Upsert, index_now: bool = False) -> np.ndarray:
        """Write prepared items into their rows (a new id takes the next free row, a known one keeps its row);
        returns their rows. Online, the whole change is written in one hold of the write lock (microseconds: no
        request sees part of it) and left to the merge thread to insert into the graph. ``index_now`` (and a
        change of more than ``MERGE_BACKLOG`` items) inserts them before returning, ``WRITE_CHUNK`` items per hold:
        a long backlog would make every search score it (loading the store's fold at start, a bulk import)."""
        if index_now or len(change.raws) > MERGE_BACKLOG:
            rows = []
            for start in range(0, len(change.raws), WRITE_CHUNK):
                part = slice(start, start + WRITE_CHUNK)
                with self.rw.writing():
                    rows.append(self._write(change.raws[part], change.titles[part], {k: v[part] for k, v in change.values.items()}))
                    self._index(rows[-1])
                    self.catalog = self._view()
            rows = np.concatenate(rows)
        else:
            with self.rw.writing():
                rows = self._write(change.raws, change.titles, change.values)
            self._report()
            self._merge_if_due()
        self._rebuild_lists_if_due()
        return rows

    def _write(self, raws: list[str], titles: list[str | None], values: dict[str, np.ndarray]) -> np.ndarray:
        rows = self._rows_for(raws)
        top = int(rows.max()) + 1
        if top > self.n:
            self._grow(top)
        for name, column in self.columns.items():
            if name in values:
                column.rows[rows] = values[name]
        self._write_derived(rows)
        fresh = [row for row in rows.tolist() if row not in self.unindexed]
        self.unindexed.update(fresh)
        self.merge_queue.extend(fresh)
        for raw, row, title in zip(raws, rows, titles):
            self.titles[row] = title or self.titles[row] or raw
        self.catalog = self._view()
        return rows

    def remove(self, row: int) -> None:
        """The item out of search and answers. An item added online also gives up its id and row, which the next new
        id takes (``_rows_for``): items that come and go do not grow the columns. A bundle item keeps both, since
        the bundle's histories and neighbour lists name its row; upserted again, it is served from it."""
        with self.rw.writing():
            label = int(self.columns["graph_label"].rows[row])
            if label >= 0:
                self.index.mark_deleted(label)
                self.columns["graph_label"].rows[row] = -1
                self.garbage += 1
            self.unindexed.discard(row)
            self.columns["active"].rows[row] = False
            self.n_active -= 1
            if row >= self.bundle_rows:
                del self.row_of[self.ids[row]]  # events naming it map to nothing (as for an id this bundle never had)
                self.free_rows.append(row)
            self.changes += 1
            self._written(np.array([row]))
            self.catalog = self._view()
        self._rebuild_lists_if_due()

    def _rows_for(self, raws: list[str]) -> np.ndarray:
        """Rows for these ids: a new id takes a removed online item's row (its item arrays back at their defaults)
        or the next one, appended to ``ids`` / ``titles`` / ``row_of``."""
        rows = []
        for raw in raws:
            row = self.row_of.get(raw)
            if row is None and self.free_rows:
                row = self.row_of[raw] = self.free_rows.pop()
                self.ids[row], self.titles[row] = raw, ""
                for name, column in self.columns.items():
                    if is_item_column(name):  # (the others the write derives again)
                        column.append(row, 1)
            elif row is None:
                row = self.row_of[raw] = len(self.ids)
                self.ids.append(raw)
                self.titles.append("")
            rows.append(row)
        return np.array(rows, np.int64)

    def _grow(self, top: int) -> None:
        """Rows ``n:top`` added: set to their defaults, placed last in popularity order (popularity 0, ties by
        row, as a stable sort puts them); a full span is re-reserved at twice the size first."""
        if top > self.columns["active"].capacity:
            capacity = 2 * top + ROOM
            logger.info("item columns grow to {} rows (a copy of {} rows)", capacity, self.n)
            for column in self.columns.values():
                column.grow(self.n, capacity)
            self.tables = None if self.tables is None else self._tables_on_columns(self.tables)
        for column in self.columns.values():
            column.append(self.n, top - self.n)
        self.columns["by_popularity"].rows[self.n : top] = np.arange(self.n, top)
        self.n = top

    def _write_derived(self, rows: np.ndarray) -> None:
        """The columns derived from written rows: the ranker's per-item statistics, the filter's genre bits, and
        the bookkeeping (active, when written, stale in the filter's lists)."""
        c = self.columns
        if self.tables is not None:
            c["item_static"].rows[rows] = self.tables.static_rows(rows)
        for w, word in enumerate(genre_words(c["item_genres"].rows[rows])):
            c[f"genre_word_{w}"].rows[rows] = word
        active, distinct = c["active"].rows, np.unique(rows)
        self.n_active += int((~active[distinct]).sum())
        active[rows] = True
        self.changes += 1
        self._written(distinct)

    def _written(self, rows: np.ndarray) -> None:
        """``rows`` (distinct) marked written by the change just counted: stale in the filter's lists, so that a filter
        checks them one by one, and any cache of a filter's rows (``allowed.FilterRowCache``) drops them."""
        stale = self.columns["stale"].rows
        self.columns["written_at"].rows[rows] = self.changes
        fresh = rows[~stale[rows]]
        stale[fresh] = True
        self._changed_more(fresh)

    # ---------------------------------------------------------------- the graph, merged aside
    def _index(self, rows: np.ndarray) -> None:
        """Insert the current vectors of those of ``rows`` still unindexed into the graph (under the write lock)."""
        listed = sorted(self.unindexed.intersection(rows.tolist()))
        if not listed:
            return
        rows, graph_label = np.array(listed, np.int64), self.columns["graph_label"].rows
        vectors, older = self.columns["item_vectors"].rows[rows], graph_label[rows]
        insert = self._insert_marking if self.garbage < self.garbage_room else self._insert_reusing
        first = self.next_label
        try:
            labels = insert(vectors, older)
        except Exception:
            self._mark_orphans(first)
            raise
        self.label_row[labels], graph_label[rows] = rows, labels
        self.unindexed.difference_update(listed)
        if not self.unindexed:
            self.merge_queue.clear()  # (rows indexed by ``index_now`` or ``merge`` leave entries behind)

    def _mark_orphans(self, first: int) -> None:
        """After an insertion that failed part way (hnswlib keeps what it inserted before the error): the elements
        under the labels it took from ``first`` on, which no row holds, marked deleted, i.e. garbage to reuse."""
        for label in range(first, self.next_label):
            try:
                self.index.mark_deleted(label)
            except RuntimeError:  # (never inserted)
                continue
            self.garbage += 1

    def _insert_marking(self, vectors: np.ndarray, older: np.ndarray) -> np.ndarray:
        """Each vector under a fresh label, the row's older label (if any) marked deleted: the labels."""
        labels = self._new_labels(len(vectors))
        self._add(vectors, labels)
        for label in older[older >= 0].tolist():  # (after the insertion: a failed one leaves the row as it was)
            self.index.mark_deleted(label)
        self.garbage += int((older >= 0).sum())
        return labels

    def _insert_reusing(self, vectors: np.ndarray, older: np.ndarray) -> np.ndarray:
        """With the garbage at its room: a row held in the graph gets its new vector in place, under its label; a row
        not held, a fresh label, in a marked element's place while removals keep the garbage above the room."""
        labels, held = older.copy(), older >= 0
        self._add(vectors[held], older[held], grows=False)  # hnswlib updates a held label's vector in place
        new = np.flatnonzero(~held)
        labels[new] = self._new_labels(len(new))
        reused = max(0, min(len(new), self.garbage - self.garbage_room))
        self._add(vectors[new[:reused]], labels[new[:reused]], grows=False, replace=True)
        self.garbage -= reused
        self._add(vectors[new[reused:]], labels[new[reused:]])
        return labels

    def _add(self, vectors: np.ndarray, labels: np.ndarray, grows: bool = True, replace: bool = False) -> None:
        """``add_items``: new elements (``grows``: the graph resized first when full), held labels' vectors updated
        in place, or (``replace``) each into a marked element's place, of which the caller knows there are enough."""
        if not len(labels):
            return
        index, needed = self.index, self.index.get_current_count() + len(labels)
        if grows and needed > index.get_max_elements():
            capacity = max(2 * index.get_max_elements(), needed)
            logger.info("HNSW graph grows to {} elements (a copy of {})", capacity, index.get_current_count())
            index.resize_index(capacity)
        index.add_items(vectors, labels, num_threads=min(len(labels), os.cpu_count() or 1),  # requests wait: every core
                        replace_deleted=replace)

    def _new_labels(self, n: int) -> np.ndarray:
        """The next ``n`` graph labels (``label_row`` grown by doubling when they pass its end)."""
        labels = np.arange(self.next_label, self.next_label + n)
        self.next_label += n
        if self.next_label > len(self.label_row):
            label_row = np.full(max(2 * len(self.label_row), self.next_label), -1, np.int64)
            label_row[: len(self.label_row)] = self.label_row
            self.label_row = label_row
        return labels

    def labels_of(self, rows) -> np.ndarray:
        """The graph labels holding these rows' vectors (-1: none): what ``index.get_items`` reads them by."""
        return self.columns["graph_label"].rows[np.asarray(rows, np.int64)]

    def _merge_if_due(self) -> None:
        if self.unindexed and self.merging.acquire(blocking=False):
            # Not a daemon: Python ends daemon threads when they next take the GIL at exit, which inside hnswlib's
            # add_items aborts the process (SIGABRT, "terminate called"); the exit waits for the backlog instead.
            threading.Thread(target=self._merge, name="index-merge").start()

    def _merge(self) -> None:
        """Insert unindexed rows into the graph, oldest first, one per hold of the write lock taken at a moment
        with no request reading (or after ``MERGE_PATIENCE_S``), until none is left. Releases ``merging``."""
        failed = False
        try:
            while self.unindexed:
                backlog = len(self.unindexed) > MERGE_BACKLOG
                with self.rw.writing(0.0 if backlog else MERGE_PATIENCE_S):
                    self._index(self._next_rows(WRITE_CHUNK if backlog else 1))
                    self.catalog = self._view()
                self._report()
        except Exception:  # the rows stay unindexed (still served, exactly): logged, retried at the next change
            logger.opt(exception=True).error("index merge failed; {} rows left unindexed", len(self.unindexed))
            failed = True
        finally:
            self.merging.release()
        if not failed:
            self._merge_if_due()  # rows a change added after the last look, while this thread still held ``merging``

    def _report(self) -> None:
        if self.report_backlog is not None:
            self.report_backlog(len(self.unindexed))

    def _next_rows(self, n: int) -> np.ndarray:
        """Up to ``n`` of the oldest unindexed rows, taken off the queue (rows indexed or removed since skipped)."""
        rows = []
        while len(rows) < n and self.unindexed:
            if not self.merge_queue:  # (every unindexed row is queued; should that ever fail, the merge must not spin)
                self.merge_queue.extend(sorted(self.unindexed.difference(rows)))
                if not self.merge_queue:
                    break
            row = self.merge_queue.popleft()
            if row in self.unindexed:
                rows.append(row)
        return np.array(rows, np.int64)

    def merge(self) -> None:
        """Insert every unindexed row into the graph now (tests, and callers that save or time the index)."""
        with self.merging:
            with self.rw.writing():
                self._index(np.array(sorted(self.unindexed), np.int64))
                self.merge_queue.clear()
                self.catalog = self._view()

    # ---------------------------------------------------------------- the filter's lists, rebuilt aside
    def _rebuild_lists_if_due(self) -> None:
        if self.n_changed >= max(self.rebuild_after, self.n // 64) and self.rebuilding.acquire(blocking=False):
            threading.Thread(target=self._rebuild_lists, name="filter-lists", daemon=True).start()

    def rebuild_lists(self) -> None:
        """The filter's lists made again now (waiting for a rebuild under way)."""
        self.rebuilding.acquire()
        self._rebuild_lists()

    def _rebuild_lists(self) -> None:
        """The filter's lists made again from a copy of the genre bits and years (no lock held while sorting);
        the rows changed meanwhile stay stale. Releases ``rebuilding``, which its caller holds."""
        try:
            with self.rw.reading():
                n, mark = self.n, self.changes
                words = tuple(w.copy() for w in self._words(n))
                year = self.columns["item_year"].rows[:n].copy()
            lists = year_lists(words, year, self.n_genres)
            with self.rw.writing():  # stale now: the rows written after the copy (O(n_items), a millisecond per 1M)
                stale = self.columns["stale"].rows[: self.n]
                np.greater(self.columns["written_at"].rows[: self.n], mark, out=stale)
                self.lists = lists
                self._changed(np.flatnonzero(stale))
                self.catalog = self._view()
        finally:
            self.rebuilding.release()

    # ---------------------------------------------------------------- views
    def _view(self) -> Catalog:
        n, c = self.n, self.columns
        arrays = {k: c[k].rows[:n] for k in self.columns if is_item_column(k)}
        filters = FilterIndex(self._words(n), c["item_year"].rows[:n], *self.lists,
                              stale=c["stale"].rows[:n], changed=self.changed_buffer[: self.n_changed])
        unindexed = np.array(sorted(self.unindexed), np.int64) if self.unindexed else NOTHING
        return Catalog(self.ids, self.row_of, self.titles, arrays, c["active"].rows[:n], self.tables, filters,
                       c["by_popularity"].rows[:n], c["written_at"].rows[:n], self.n_active, self.changes, unindexed)

    def _changed(self, rows: np.ndarray) -> None:
        """The rows written or removed since the filter's lists were built (each once, in no order): ``rows``, with room
        after."""
        self.changed_buffer = np.zeros(max(2 * len(rows), 1024), np.int64)
        self.changed_buffer[: len(rows)] = rows
        self.n_changed = len(rows)

    def _changed_more(self, rows: np.ndarray) -> None:
        """``rows`` (not yet among them) appended: O(len(rows)), a copy only when the room is full (views of the
        old buffer stay valid: only places past their end were written)."""
        end = self.n_changed + len(rows)
        if end > len(self.changed_buffer):
            self._changed(np.concatenate([self.changed_buffer[: self.n_changed], rows]))
        else:
            self.changed_buffer[self.n_changed : end] = rows
            self.n_changed = end

    def _words(self, n: int) -> tuple[np.ndarray, ...]:
        return tuple(self.columns[f"genre_word_{w}"].rows[:n] for w in range(-(-self.n_genres // 64)))

    def _tables_on_columns(self, tables: RankerTables) -> RankerTables:
        """``tables`` reading the item columns' whole spans (rows past ``n`` are never asked for)."""
        return replace(tables, **{field: self.columns[name].rows for name, field in TABLE_FIELDS.items()},
                       item_static=self.columns["item_static"].rows)


DERIVED = {"active", "written_at", "stale", "by_popularity", "item_static", "graph_label"}


def is_item_column(name: str) -> bool:
    """A column holding one of the bundle's item arrays, not one derived from them (``DERIVED``, the genre bits)."""
    return name not in DERIVED and not name.startswith("genre_word_")


def tables_dtype(array: np.ndarray, tables: RankerTables | None, name: str) -> np.ndarray:
    """``array`` in the type the ranker tables read it in (so that they can view the column, not copy it)."""
    wanted = TABLE_FIELDS.get(name)
    if tables is None or wanted is None:
        return array
    return array.astype(getattr(tables, wanted).dtype, copy=False)


TABLE_FIELDS = {"item_vectors": "item_vectors", "item_genres": "item_genres", "item_year": "item_year",
                "popularity": "item_popularity", "item_avg_rating": "item_avg_rating", "item_neighbours": "item_neighbours",
                "item_neighbour_sims": "item_neighbour_sims", "item_seq_neighbours": "item_seq_neighbours",
                "item_seq_neighbour_sims": "item_seq_neighbour_sims"}


def is_item_array(name: str, value: np.ndarray, n_items: int) -> bool:
    return (name.startswith("item_") or name == "popularity") and value.ndim >= 1 and len(value) == n_items
