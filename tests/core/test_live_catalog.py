"""The live catalogue's changes: written in place, O(changed items), never seen half applied, and the same
answers as a catalogue built whole from the changed arrays (recsys/engine/catalog.py, items.py, locks.py)."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from recsys.bundle import map_arrays, read_bundle, save_arrays
from recsys.engine.allowed import FilterRowCache
from recsys.engine.engine import Engine
from recsys.engine.filters import FilterIndex, RowFilter
from recsys.engine.items import Column
from recsys.engine.locks import ReadWriteLock
from recsys.engine.search import scores_of, search_many
from recsys.errors import UnknownId
from recsys.live import LiveConfig, LiveEngine
from recsys.query import Filters, Item, RecommendRequest
from recsys.state.open import StoreConfig
from recsys.state.protocol import Event, StoreUnavailable


@pytest.fixture()
def engine(bundle_root) -> Engine:
    return Engine.from_bundle(read_bundle(bundle_root))


# --------------------------------------------------------------------------- columns
def test_a_column_maps_the_bundle_file_copy_on_write_and_grows(tmp_path):
    path = tmp_path / "arrays.npz"
    vectors = np.arange(30, dtype=np.float32).reshape(10, 3)
    save_arrays(path, {"other": np.ones(7, np.int8), "item_vectors": vectors})
    before = path.read_bytes()
    column = Column(map_arrays(path)["item_vectors"], capacity=12)
    assert column.mapped and column.capacity == 12
    np.testing.assert_array_equal(column.rows[:10], vectors)
    column.rows[3] = -1  # a private copy of that page: the file stays as it was
    assert path.read_bytes() == before and map_arrays(path)["item_vectors"][3].tolist() == [9, 10, 11]
    column.append(10, 2)
    assert np.isnan(column.rows[10:12]).all()
    column.grow(12, 40)  # past the room: a copy, the rows kept, no longer the file's pages
    assert not column.mapped and column.capacity == 40
    assert column.rows[3].tolist() == [-1, -1, -1] and column.rows[9].tolist() == [27, 28, 29]


def test_a_column_of_an_array_in_memory_is_a_copy():
    source = np.array([[1, 2], [3, 4]], np.int64)
    column = Column(source, capacity=5, fill=-1)
    column.rows[0, 0] = 9
    column.append(2, 3)
    assert not column.mapped and source[0, 0] == 1 and column.rows.tolist() == [[9, 2], [3, 4], [-1, -1], [-1, -1], [-1, -1]]


# --------------------------------------------------------------------------- changes cost what they change
def test_a_change_writes_its_rows_and_copies_no_item_array(engine):
    before = engine.catalog
    replaced = before.ids[5]
    engine.live.commit(engine.changes.prepare([Item(item_id=replaced, genres=["genre1"], year=1999),
                                               Item(item_id="brand-new", genres=["genre2"], year=2001, title="New")]))
    after = engine.catalog
    for name, array in before.arrays.items():
        assert not array.size or np.shares_memory(array, after.arrays[name]), name  # the same memory, one row longer
    tables = after.ranker_tables
    assert tables is not None and np.shares_memory(tables.item_vectors, after.vectors)  # the ranker views the catalogue
    assert np.shares_memory(tables.item_static, before.ranker_tables.item_static)
    row = after.row_of["brand-new"]
    assert row == len(before.active) and after.titles[row] == "New" and after.n_active == before.n_active + 1
    assert after.arrays["popularity"][row] == 0 and (after.arrays["item_neighbours"][row] == -1).all()
    assert after.by_popularity[-1] == row  # last, where a stable sort of popularity puts it
    np.testing.assert_array_equal(after.by_popularity, np.argsort(-after.arrays["popularity"], kind="stable"))
    fresh = type(tables).from_arrays({**engine.bundle.arrays, **after.arrays})  # as the ranker tables of a catalogue built whole
    np.testing.assert_allclose(tables.item_static[: len(after.ids)][[5, row]], fresh.item_static[[5, row]], rtol=1e-6)
    assert after.written_at[5] == after.written_at[row] == after.changes == 1 and after.written_at[4] == 0


def test_filters_answer_as_if_rebuilt_before_and_after_the_lists_are_rebuilt(engine):
    rng = np.random.default_rng(1)
    names = list(engine.bundle.catalog["genre_names"])
    ids = engine.catalog.ids
    items = [Item(item_id=ids[i] if i < len(ids) else f"n{i}", genres=list(rng.choice(names, rng.integers(0, 3), replace=False)),
                  year=None if rng.random() < 0.1 else int(rng.integers(1980, 2000))) for i in rng.choice(len(ids) + 50, 80, replace=False)]
    engine.live.commit(engine.changes.prepare(items))
    engine.changes.remove(ids[0])
    rules = [RowFilter.of(f, engine._genre_cols) for f in (
        Filters(genres_any=[names[1]], year_min=1985, year_max=1995), Filters(genres_none=[names[0], names[2]]),
        Filters(year_min=1990), Filters(genres_any=[names[0], names[3]]))]

    def admitted(catalog) -> list[set[int]]:
        return [set(catalog.live(r.admitted(catalog.filters, r.slices(catalog.filters)), np.zeros(0, np.int64)).tolist())
                for r in rules]

    catalog = engine.catalog
    assert len(catalog.filters.changed) == len({it.item_id for it in items} | {ids[0]})  # the removal too
    whole = FilterIndex.build(catalog.arrays["item_genres"], catalog.arrays["item_year"])  # built from scratch
    expected = [set(catalog.live(np.flatnonzero(r.admits(whole, np.arange(len(catalog.ids)))), np.zeros(0, np.int64)).tolist())
                for r in rules]
    assert admitted(catalog) == expected
    engine.live.rebuild_lists()
    assert len(engine.catalog.filters.changed) == 0 and not engine.catalog.filters.stale.any()
    assert admitted(engine.catalog) == expected


def narrow_answers(engine: Engine, filters: Filters, rng: np.random.Generator) -> set[int]:
    """The filter's answers for random users, from the filter row cache, checked against the filter's rows read anew
    (the cache off): every admitted unseen row (the depth exceeds them), each with the same score. Returns the rows."""
    catalog, dim = engine.catalog, engine.catalog.vectors.shape[1]
    seen = rng.choice(len(catalog.ids), 10, replace=False)
    vecs = rng.standard_normal((4, dim)).astype(np.float32)

    def scored() -> list[dict[int, float]]:
        found = [engine.search(vec, 10_000, engine.allowed(catalog, filters, seen)) for vec in vecs]
        return [dict(zip(rows.tolist(), scores.tolist())) for _, rows, scores in found]

    cached = scored()
    kept, engine.filter_rows = engine.filter_rows, FilterRowCache(0)
    try:
        fresh = scored()
    finally:
        engine.filter_rows = kept
    for got, want in zip(cached, fresh):
        assert got.keys() == want.keys() and not set(got) & set(seen.tolist())
        np.testing.assert_allclose([got[row] for row in want], list(want.values()), atol=1e-5)
    return set(cached[0])


def test_a_cached_filters_rows_follow_every_change_until_and_after_the_lists_are_rebuilt(engine):
    """A narrow filter's rows kept between requests answer as the filter's rows read anew after items leave the
    filter, join it, get another vector, are removed or added, and after the lists are rebuilt; until the rebuild
    the kept rows are updated from the changed ones, not read again."""
    rng = np.random.default_rng(7)
    names = list(engine.bundle.catalog["genre_names"])
    filters = Filters(genres_any=[names[1], names[2]])
    key = RowFilter.of(filters, engine._genre_cols).key
    before = narrow_answers(engine, filters, rng) | set()
    kept = engine.filter_rows.entries[key]
    assert kept.applied == 0 and set(kept.rows.tolist()) >= before and len(before) > 4
    catalog = engine.catalog
    leaving, moving, removed = sorted(before)[:3]
    joining = next(row for row in range(len(catalog.ids)) if row not in kept.rows and catalog.active[row])
    year = float(catalog.arrays["item_year"][moving])
    engine.live.commit(engine.changes.prepare([
        Item(item_id=catalog.ids[leaving], genres=[names[0]], year=2001),
        Item(item_id=catalog.ids[joining], genres=[names[2]], year=1999),
        Item(item_id=catalog.ids[moving], genres=[names[1]], year=2010 if year != 2010 else 1970),  # another vector
        Item(item_id="added", genres=[names[1]], year=2005)]))
    engine.changes.remove(catalog.ids[removed])
    catalog = engine.catalog
    assert not np.allclose(catalog.vectors[moving], kept.vectors[np.searchsorted(kept.rows, moving)])
    after = narrow_answers(engine, filters, rng)
    assert {joining, catalog.row_of["added"]} <= after and not {leaving, removed} & after
    updated = engine.filter_rows.entries[key]
    assert updated.lists is kept.lists and updated.applied == len(catalog.filters.changed) == 5
    engine.live.rebuild_lists()
    narrow_answers(engine, filters, rng)
    assert engine.filter_rows.entries[key].lists is not kept.lists


def test_the_filter_row_cache_keeps_to_its_budget(engine):
    """Least recently used filters leave first; a filter whose rows alone would pass the budget is served without
    the cache; every answer stays the filter's rows read anew."""
    rng = np.random.default_rng(8)
    names = list(engine.bundle.catalog["genre_names"])
    filters = [Filters(genres_any=[name]) for name in names]
    sizes = {}
    for f in filters:
        narrow_answers(engine, f, rng)
        sizes[RowFilter.of(f, engine._genre_cols).key] = engine.filter_rows.entries[RowFilter.of(f, engine._genre_cols).key].nbytes
    small, large = sorted(sizes.values())[1], max(sizes.values())
    engine.filter_rows = FilterRowCache(large - 1)
    for f in filters * 2:
        key = RowFilter.of(f, engine._genre_cols).key
        narrow_answers(engine, f, rng)
        cache = engine.filter_rows
        assert cache.size == sum(entry.nbytes for entry in cache.entries.values()) <= cache.budget
        assert (key in cache.entries) == (sizes[key] <= cache.budget) and (sizes[key] > cache.budget or list(cache.entries)[-1] == key)
    assert small < large and len(cache.entries) >= 1


def test_lists_are_rebuilt_aside_once_enough_rows_changed(engine):
    engine.live.rebuild_after = 10
    engine.live.commit(engine.changes.prepare([Item(item_id=f"x{i}", genres=["genre1"], year=2000) for i in range(12)]))
    deadline = time.time() + 30
    while len(engine.catalog.filters.changed) and time.time() < deadline:
        time.sleep(0.05)
    assert len(engine.catalog.filters.changed) == 0
    rows = engine.catalog.filters.everything.between(2000, 2000)
    assert {engine.catalog.row_of[f"x{i}"] for i in range(12)} <= set(rows.tolist())


def test_a_user_whose_history_item_changed_gets_features_computed_again(engine):
    request = RecommendRequest(user_id="u1", k=5)
    engine.recommend(request)
    cached = engine.users.feature_cache["u1"]
    engine.live.commit(engine.changes.prepare([Item(item_id="not-in-any-history", genres=["genre1"], year=2000)]))
    engine.recommend(request)
    assert engine.users.feature_cache["u1"][2] is cached[2]  # an unrelated change keeps the user's features
    seen = engine.catalog.ids[int(engine.users.resolve("u1").hist_items[-1])]
    engine.live.commit(engine.changes.prepare([Item(item_id=seen, genres=["genre2"], year=1950)]))
    engine.recommend(request)
    assert engine.users.feature_cache["u1"][2] is not cached[2]


# --------------------------------------------------------------------------- no half-applied change
def test_a_change_waits_for_reading_requests_and_the_requests_it_held_up_go_before_the_next_change():
    lock, order = ReadWriteLock(), []
    reading, release = threading.Event(), threading.Event()

    def reader() -> None:
        with lock.reading():
            with lock.reading():  # nested reads of one request do not wait
                reading.set()
                release.wait(5)
                order.append("read done")

    def writer(name: str) -> None:
        with lock.writing():
            order.append(name)

    def late_reader() -> None:
        with lock.reading():
            order.append("late read")

    def start(target, *args, until) -> threading.Thread:
        """Start a thread and wait until the lock shows it waiting (no sleep to guess how long that takes)."""
        thread = threading.Thread(target=target, args=args)
        thread.start()
        deadline = time.monotonic() + 10
        while not until() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert until(), "the thread never got to wait on the lock"
        return thread

    threads = [start(reader, until=reading.is_set)]
    threads += [start(writer, "write 1", until=lambda: lock._writers_waiting == 1),
                start(late_reader, until=lambda: lock._queued == 1),
                start(writer, "write 2", until=lambda: lock._writers_waiting == 2)]
    assert order == []  # the writers wait for the reader; the late reader waits for a writer
    release.set()
    for t in threads:
        t.join(5)
    # the reader first; then one write (the two writers wake together, either may win); then the read that write
    # held up, before the other write
    assert order[0] == "read done" and order[2] == "late read" and sorted(order[1::2]) == ["write 1", "write 2"]
    with pytest.raises(RuntimeError, match="wait for itself"), lock.reading(), lock.writing():
        pass


def test_requests_under_changes_never_see_a_half_written_item(engine):
    """Every read taken while a writer flips items between two versions shows each item wholly in one, and the
    graph holds that version of every row it serves (a row not yet merged is served from its column)."""
    rows = list(range(20))
    ids = [engine.catalog.ids[r] for r in rows]
    versions = [[Item(item_id=i, genres=["genre1"], year=1901, title="A") for i in ids],
                [Item(item_id=i, genres=["genre2"], year=1902, title="B") for i in ids]]
    prepared = [engine.changes.prepare(v) for v in versions]
    genre = {1901.0: engine.genre_col["genre1"], 1902.0: engine.genre_col["genre2"]}
    engine.live.commit(prepared[1])  # every item in one of the two versions before reading starts
    stop = threading.Event()

    def write() -> None:
        j = 0
        while not stop.is_set():
            engine.live.commit(prepared[j % 2])
            j += 1

    writer = threading.Thread(target=write)
    writer.start()
    try:
        for _ in range(300):
            with engine.live.rw.reading():
                catalog = engine.catalog
                years = catalog.arrays["item_year"][rows].tolist()
                titles = [catalog.titles[r] for r in rows]
                genres = catalog.arrays["item_genres"][rows]
                vectors = catalog.vectors[rows]
                indexed = np.array(engine.live.index.get_items(engine.live.labels_of(rows)))
                unindexed = set(catalog.unindexed.tolist())
            assert len(set(years)) == 1  # one write per change: a change is seen whole
            for j, year in enumerate(years):
                assert titles[j] == ("A" if year == 1901 else "B")
                assert np.flatnonzero(genres[j]).tolist() == [genre[year]]
                np.testing.assert_array_equal(vectors[j], prepared[year == 1902].values["item_vectors"][j])
                if rows[j] not in unindexed:
                    np.testing.assert_allclose(indexed[j], vectors[j], rtol=1e-6)  # the graph holds that version too
    finally:
        stop.set()
        writer.join(10)


# --------------------------------------------------------------------------- the graph, merged aside
def exact_top(catalog, vec: np.ndarray, depth: int) -> list[int]:
    scores = catalog.vectors @ vec
    scores[~catalog.active] = -np.inf
    return np.argsort(-scores, kind="stable")[:depth].tolist()


def test_changed_rows_are_served_exactly_before_the_graph_holds_them_and_the_same_after(engine):
    """A replaced item's new vector and an added item are found by the search at once (the graph still holds
    the old vector, or nothing): the rows are scored exactly beside it, the graph's stale entry ignored."""
    live, catalog = engine.live, engine.catalog
    engine.exact_share = 2.0  # search through the graph, as a large catalogue does (this one is tiny)
    assert len(catalog.ids) > 10 * 2
    user = engine.users.vectors([engine.users.resolve("u1")])[0]
    order = np.argsort(catalog.vectors @ user)
    far, near = int(order[0]), int(order[-1])  # the user's worst item becomes the best, the best the worst
    best = user / np.linalg.norm(user) * np.abs(catalog.vectors @ user).max() * 4
    change = engine.changes.prepare([Item(item_id=catalog.ids[far], genres=["genre1"], year=1999),
                                     Item(item_id="added", genres=["genre1"], year=2001),
                                     Item(item_id=catalog.ids[near], genres=["genre1"], year=1999)])
    values = {**change.values, "item_vectors": np.stack([best, best * 0.9, -best]).astype(np.float32)}
    live.merging.acquire()  # hold the merge back: the rows stay unindexed while we look
    try:
        live.commit(type(change)(change.raws, change.titles, values))
        catalog = engine.catalog
        added = catalog.row_of["added"]
        assert catalog.unindexed.tolist() == sorted([far, near, added])
        _, rows, scores = engine.search(user, 10, engine.allowed(catalog, None, None))
        assert rows[:2].tolist() == [far, added] and near not in rows  # the graph's old vector for `near` ignored
        np.testing.assert_allclose(scores, catalog.vectors[rows] @ user, rtol=1e-5)  # no stale score
        assert sorted(rows.tolist()) == sorted(exact_top(catalog, user, 10))
        engine.changes.remove("added")  # an unindexed row removed: no longer served, never merged
        assert engine.catalog.unindexed.tolist() == sorted([far, near])
        assert added not in engine.search(user, 10, engine.allowed(engine.catalog, None, None))[1]
    finally:
        live.merging.release()
    live._merge_if_due()
    deadline = time.monotonic() + 10
    while len(engine.catalog.unindexed) and time.monotonic() < deadline:
        time.sleep(0.01)
    catalog = engine.catalog
    assert not len(catalog.unindexed) and not live.unindexed
    np.testing.assert_allclose(live.index.get_items(live.labels_of([far]))[0], catalog.vectors[far], rtol=1e-6)
    assert engine.search(user, 10, engine.allowed(catalog, None, None))[1][0] == far


def test_a_removed_item_upserted_again_is_searchable_before_and_after_the_merge(engine):
    ids = engine.catalog.ids
    item = ids[3]
    engine.changes.remove(item)
    engine.live.commit(engine.changes.prepare([Item(item_id=item, genres=["genre2"], year=1990)]))
    row = engine.catalog.row_of[item]
    vec = engine.catalog.vectors[row]
    assert engine.search(vec, 3, engine.allowed(engine.catalog, None, None))[1][0] == row
    engine.live.merge()
    assert not len(engine.catalog.unindexed) and engine.live.labels_of([row])[0] >= 0
    assert engine.search(vec, 3, engine.allowed(engine.catalog, None, None))[1][0] == row


def test_a_replaced_vector_goes_into_the_graph_under_a_fresh_label_and_the_older_one_is_never_answered(engine):
    """A replacement is a plain insertion plus a deletion mark (hnswlib's in-place update repairs every
    neighbour's list: four times the cost at 1M items); the graph's labels map back to rows."""
    live, catalog = engine.live, engine.catalog
    row = 5
    before, count = int(live.labels_of([row])[0]), live.index.get_current_count()
    assert before == row  # the bundle's graph: each row under its own number
    old_vec = catalog.vectors[row].copy()
    live.commit(engine.changes.prepare([Item(item_id=catalog.ids[row], genres=["genre2"], year=1950)]))
    live.merge()
    catalog = engine.catalog
    after = int(live.labels_of([row])[0])
    assert after == len(catalog.ids) and live.label_row[after] == row  # the next label after the bundle's
    assert live.index.get_current_count() == count + 1
    np.testing.assert_allclose(live.index.get_items([after])[0], catalog.vectors[row], rtol=1e-6)
    with pytest.raises(RuntimeError):
        live.index.get_items([before])  # marked deleted
    labels, _ = live.index.knn_query(old_vec[None], k=len(catalog.ids))
    assert before not in labels[0].tolist() and after in labels[0].tolist()
    # the search answers rows, once each: the row, by its new vector, first for a query equal to it
    _, rows, _ = engine.search(catalog.vectors[row], 5, engine.allowed(catalog, None, None))
    assert rows[0] == row and len(set(rows.tolist())) == len(rows)
    engine.changes.remove(catalog.ids[row])  # a removal marks the current label
    assert live.labels_of([row])[0] == -1
    with pytest.raises(RuntimeError):
        live.index.get_items([after])


def test_the_graphs_dead_elements_are_bounded_past_them_changes_reuse_their_places(engine):
    """Older vectors and removed items stay in the graph as marked elements only up to ``garbage_room``; past it a
    replacement updates its label's vector in place and an addition takes a marked element's place, so that a
    replica absorbing changes for days keeps a graph of bounded size. Every answer stays the exact one."""
    live, rng = engine.live, np.random.default_rng(3)
    engine.exact_share = 2.0  # search through the graph, as a large catalogue does (this one is tiny)
    live.garbage_room = 3
    n, count, dim = len(engine.catalog.ids), live.index.get_current_count(), engine.catalog.vectors.shape[1]

    def change(raws: list[str]) -> None:
        prepared = engine.changes.prepare([Item(item_id=raw, genres=["genre1"], year=2000) for raw in raws])
        vectors = rng.normal(size=(len(raws), dim)).astype(np.float32)
        with live.merging:  # the merge thread held back: one insertion of the whole change below
            live.commit(type(prepared)(prepared.raws, prepared.titles, {**prepared.values, "item_vectors": vectors}))
        live.merge()

    replaced = list(engine.catalog.ids[:5])
    change(replaced)  # below the room: fresh labels, the older five marked
    fresh = live.labels_of(range(5)).tolist()
    assert fresh == list(range(n, n + 5)) and live.garbage == 5 and live.index.get_current_count() == count + 5
    change(replaced)  # past it: the same labels, updated in place
    assert live.labels_of(range(5)).tolist() == fresh and live.index.get_current_count() == count + 5
    engine.changes.remove(replaced[0])
    assert live.garbage == 6
    change(["new-a", "new-b"])  # two marked elements' places taken (six marked, three past the room)
    added = live.labels_of([engine.catalog.row_of["new-a"], engine.catalog.row_of["new-b"]]).tolist()
    assert added == [n + 5, n + 6] and live.garbage == 4 and live.index.get_current_count() == count + 5
    change(["new-c", "new-d"])  # one place taken, down to the room; the other a new element
    assert live.garbage == 3 and live.index.get_current_count() == count + 6
    catalog = engine.catalog
    rows = np.flatnonzero(catalog.active)
    assert len(rows) == n + 3
    np.testing.assert_allclose(live.index.get_items(live.labels_of(rows)), catalog.vectors[rows], rtol=1e-6)
    held = live.index.get_ids_list()  # every label in the graph, marked ones too
    assert len(held) == len(rows) + live.garbage and set(live.labels_of(rows).tolist()) <= set(held)
    for user in ("u1", "u2", "u3"):
        vec = engine.users.vectors([engine.users.resolve(user)])[0]
        _, found, _ = engine.search(vec, 10, engine.allowed(catalog, None, None))
        assert sorted(found.tolist()) == sorted(exact_top(catalog, vec, 10))


def test_an_insertion_that_fails_part_way_leaves_no_element_answering_for_a_wrong_row(engine):
    """hnswlib keeps the part of a batch it inserted before failing (say, memory), under labels no row holds yet:
    such an element must never be served as row -1 (the catalogue's last row, with another item's score). The rows
    stay unindexed and served exactly, and the next merge indexes them."""
    live, rng = engine.live, np.random.default_rng(5)
    engine.exact_share = 2.0  # search through the graph, as a large catalogue does (this one is tiny)
    real, dim = live.index, engine.catalog.vectors.shape[1]

    class FailsHalfWay:
        def __getattr__(self, name):
            return getattr(real, name)

        def add_items(self, vectors, labels, **kwargs):
            real.add_items(vectors[: len(labels) // 2], labels[: len(labels) // 2], **kwargs)
            raise RuntimeError("std::bad_alloc")

    raws = [f"late-{i}" for i in range(4)]
    prepared = engine.changes.prepare([Item(item_id=raw, genres=["genre1"], year=2000) for raw in raws])
    vectors = (10 * rng.normal(size=(4, dim))).astype(np.float32)  # far longer than any other: each its own top hit
    with live.merging:
        live.commit(type(prepared)(prepared.raws, prepared.titles, {**prepared.values, "item_vectors": vectors}))
    live.index, count, garbage, first = FailsHalfWay(), real.get_current_count(), live.garbage, live.next_label
    with pytest.raises(RuntimeError):
        live.merge()
    live.index = real
    rows = [engine.catalog.row_of[raw] for raw in raws]
    assert real.get_current_count() == count + 2 and live.garbage == garbage + 2  # the first half kept, marked deleted
    for label in (first, first + 1):
        with pytest.raises(RuntimeError):
            real.get_items([label])
    assert set(live.labels_of(rows).tolist()) == {-1}
    for merged in (False, True):
        catalog = engine.catalog
        for row in rows:
            _, found, _ = engine.search(catalog.vectors[row], 5, engine.allowed(catalog, None, None))
            assert found[0] == row and (found >= 0).all() and len(set(found.tolist())) == len(found)
            assert sorted(found.tolist()) == sorted(exact_top(catalog, catalog.vectors[row], 5))
        if not merged:
            assert set(rows) <= set(catalog.unindexed.tolist())
            live.merge()
    assert not len(engine.catalog.unindexed) and (live.labels_of(rows) >= 0).all()
    catalog = engine.catalog  # and were such an element ever found (label_row -1), it is no row's result
    assert engine.allowed(catalog, None, None).keep(np.array([-1, rows[0], len(catalog.active)]), catalog).tolist() == [False, True, False]


def test_items_added_online_and_removed_give_their_rows_to_the_next_new_ids(engine, bundle_root):
    """Items that come and go do not grow the columns: a removed online item's id is forgotten and its row goes to
    the next new id, which then holds what a fresh addition would hold. A removed bundle item keeps its row."""
    live, n = engine.live, len(engine.catalog.ids)
    engine.exact_share = 2.0  # search through the graph, as a large catalogue does (this one is tiny)
    live.commit(engine.changes.prepare([Item(item_id=f"gone-{i}", genres=["genre1"], year=1990, title="Gone") for i in range(3)]))
    live.merge()
    assert [engine.catalog.row_of[f"gone-{i}"] for i in range(3)] == [n, n + 1, n + 2]
    for i in range(3):
        engine.changes.remove(f"gone-{i}")
    bundle_item = engine.catalog.ids[4]
    engine.changes.remove(bundle_item)
    assert "gone-0" not in engine.catalog.row_of and engine.catalog.row_of[bundle_item] == 4
    with pytest.raises(UnknownId):
        engine.changes.remove("gone-0")
    items = [Item(item_id="next-a", genres=["genre3"], year=2010, title="A"), Item(item_id="next-b", genres=["genre3"], year=2011)]
    live.commit(engine.changes.prepare(items))
    catalog = engine.catalog
    rows = [catalog.row_of["next-a"], catalog.row_of["next-b"]]
    assert set(rows) < {n, n + 1, n + 2} and len(catalog.ids) == n + 3 and catalog.n_active == n + 1
    assert [catalog.ids[r] for r in rows] == ["next-a", "next-b"] and [catalog.titles[r] for r in rows] == ["A", "next-b"]
    fresh = Engine.from_bundle(read_bundle(bundle_root))  # the same two items added to a catalogue that never had others
    fresh.live.commit(fresh.changes.prepare(items))
    for name, array in catalog.arrays.items():
        np.testing.assert_array_equal(array[rows], fresh.catalog.arrays[name][[n, n + 1]], err_msg=name)
    np.testing.assert_array_equal(catalog.ranker_tables.item_static[rows], fresh.catalog.ranker_tables.item_static[[n, n + 1]])
    for row in rows:  # served from their rows: by the search before and after the merge, and by the filters
        assert engine.search(catalog.vectors[row], 3, engine.allowed(catalog, None, None))[1][0] == row
    live.merge()
    catalog = engine.catalog
    for row in rows:
        assert engine.search(catalog.vectors[row], 3, engine.allowed(catalog, None, None))[1][0] == row
    old = engine.allowed(catalog, Filters(genres_any=["genre1"], year_min=1990, year_max=1990), None).every_row(catalog)
    new = engine.allowed(catalog, Filters(genres_any=["genre3"], year_min=2010, year_max=2011), None).every_row(catalog)
    assert not set(rows) & set(old.tolist()) and set(rows) <= set(new.tolist())


def test_a_users_event_on_a_removed_online_item_leaves_the_history_and_its_row_is_not_seen(engine):
    live = engine.live
    live.commit(engine.changes.prepare([Item(item_id="gone", genres=["genre1"], year=1990)]))
    row = engine.catalog.row_of["gone"]
    fetched = (1, [Event("gone", 5.0, 1_700_000_000)])  # u1 interacted with it
    before = engine.users.resolve("u1", fetched=fetched)
    assert before.hist_items[-1] == row
    features = engine.users.ranker_features(before, engine.catalog.ranker_tables)
    engine.changes.remove("gone")
    live.commit(engine.changes.prepare([Item(item_id="taker", genres=["genre2"], year=2000)]))
    assert engine.catalog.row_of["taker"] == row
    after = engine.users.resolve("u1", fetched=fetched)  # the same history version: the event now names nothing
    assert row not in after.hist_items.tolist() and len(after.hist_items) == len(before.hist_items) - 1
    assert engine.users.ranker_features(after, engine.catalog.ranker_tables) is not features  # computed again
    allowed = engine.allowed(engine.catalog, None, after.hist_items)
    assert allowed.keep(np.array([row]), engine.catalog)[0]  # the new item is not excluded as seen


def test_a_user_in_a_batch_gets_the_list_it_gets_alone_whoever_shares_the_batch(engine):
    """hnswlib's beam is max(ef, k), and each user's fetch is the depth plus its seen items: a batch is queried in
    groups of one beam, so a user with few seen items is not searched deeper for sharing a batch with many."""
    engine.exact_share = 2.0  # through the graph, as a large catalogue does
    engine.live.index.set_ef(4)  # a beam narrower than every fetch: each user's depth decides it
    catalog = engine.catalog
    ctxs = [engine.users.resolve(f"u{i}") for i in range(40)]
    vecs = engine.users.vectors(ctxs)
    alloweds = [engine.allowed(catalog, None, ctx.hist_items) for ctx in ctxs]
    assert len({len(a.excluded) for a in alloweds}) > 5  # fetches (and so beams) of many sizes
    together = search_many(engine.live, vecs, 8, alloweds, engine.exact_share)
    for u in range(len(ctxs)):
        _, rows, scores = search_many(engine.live, vecs[u : u + 1], 8, alloweds[u : u + 1], engine.exact_share)[0]
        assert together[u][1].tolist() == rows.tolist()
        np.testing.assert_allclose(together[u][2], scores, rtol=1e-6)


def test_the_store_fold_is_indexed_before_load_returns(engine):
    engine.changes.load({f"fold{i}": Item(item_id=f"fold{i}", genres=["genre1"], year=2000).to_record() for i in range(9)})
    assert not len(engine.catalog.unindexed)
    rows = [engine.catalog.row_of[f"fold{i}"] for i in range(9)]
    np.testing.assert_allclose(engine.live.index.get_items(engine.live.labels_of(rows)), engine.catalog.vectors[rows], rtol=1e-6)


def test_a_patient_writer_lets_new_readers_in_and_takes_the_lock_between_them():
    """The merge's writer: while a request reads, later requests still get in (an ordinary writer would stop
    them); it takes the lock once nobody reads, and after its patience it queues like any writer."""
    lock, got, at_once = ReadWriteLock(), threading.Event(), threading.Event()
    first_in, release_first = threading.Event(), threading.Event()
    at_once.set()  # a reader that leaves as soon as it is in

    def read(entered: threading.Event, release: threading.Event) -> None:
        with lock.reading():
            entered.set()
            release.wait(5)

    def write(patience: float) -> None:
        with lock.writing(patience):
            got.set()

    threading.Thread(target=read, args=(first_in, release_first)).start()
    first_in.wait(5)
    writer = threading.Thread(target=write, args=(30.0,))
    writer.start()
    deadline = time.monotonic() + 10
    while not lock._patient and time.monotonic() < deadline:
        time.sleep(0.001)
    second_in = threading.Event()
    threading.Thread(target=read, args=(second_in, at_once)).start()
    assert second_in.wait(5) and not got.is_set()  # a new reader got in while the writer waited
    release_first.set()
    assert got.wait(5)  # nobody reads now: the writer's turn
    writer.join(5)

    # Past its patience, a patient writer stops new readers like any writer.
    first_in.clear(), release_first.clear()
    threading.Thread(target=read, args=(first_in, release_first)).start()
    first_in.wait(5)
    got.clear()
    writer = threading.Thread(target=write, args=(0.01,))
    writer.start()
    deadline = time.monotonic() + 10
    while not lock._writers_waiting and time.monotonic() < deadline:
        time.sleep(0.001)
    assert lock._writers_waiting == 1 and not got.is_set()
    late_in = threading.Event()
    late = threading.Thread(target=read, args=(late_in, at_once))
    late.start()
    assert not late_in.wait(0.2)  # the late reader waits behind the writer
    release_first.set()
    assert got.wait(5) and late_in.wait(5)
    writer.join(5), late.join(5)


def test_the_merge_thread_keeps_the_process_alive_until_the_backlog_is_merged(engine):
    """A daemon thread inside hnswlib's add_items when Python exits aborts the process (SIGABRT: measured on a 1M
    item bundle with 800 rows waiting); the merge must be a thread the exit waits for."""
    reading, done = threading.Event(), threading.Event()

    def request() -> None:  # a request reading: the merge thread waits for the lock, and is caught alive
        with engine.live.rw.reading():
            reading.set()
            done.wait(10)

    with engine.live.merging:  # (no merge starts before the reader holds the lock)
        engine.live.commit(engine.changes.prepare([Item(item_id="late", genres=["genre1"], year=2000)]))
    reader = threading.Thread(target=request)
    reader.start()
    reading.wait(5)
    try:
        engine.live._merge_if_due()
        merges = [t for t in threading.enumerate() if t.name == "index-merge"]
        assert merges and not any(t.daemon for t in merges)
    finally:
        done.set()
        reader.join(10)
    for t in merges:
        t.join(10)
    assert not len(engine.catalog.unindexed)


def test_the_backlog_is_reported_after_each_write_and_merge(engine):
    """What feeds recsys_index_unindexed_items: the count after a change is written, then after each merge hold."""
    reported: list[int] = []
    engine.live.report_backlog = reported.append
    with engine.live.merging:  # no merge until the change is written and reported
        engine.live.commit(engine.changes.prepare([Item(item_id=f"b{i}", genres=["genre1"], year=2000) for i in range(3)]))
    assert reported == [3]
    engine.live._merge_if_due()
    deadline = time.monotonic() + 10
    while reported[-1] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert reported == [3, 2, 1, 0]  # one row per hold of the lock


def test_the_merge_finishes_even_if_its_queue_lost_track_of_a_row(engine):
    with engine.live.merging:
        engine.live.commit(engine.changes.prepare([Item(item_id=f"q{i}", genres=["genre1"], year=2000) for i in range(3)]))
        engine.live.merge_queue.clear()  # what the queue must never do: the merge still finds the rows
    engine.live._merge_if_due()
    deadline = time.monotonic() + 10
    while len(engine.catalog.unindexed) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not len(engine.catalog.unindexed)


def test_an_event_sent_with_an_earlier_time_takes_its_place_in_time(engine):
    """The store keeps a user's events in the order they arrived; a client may send one with an earlier timestamp
    (a backfill). Served as training orders a history, by time: the tower's newest slot is the newest event."""
    a, users = engine.bundle.arrays, engine.users
    row = users.user_row["u5"]
    lo, hi = a["history_offsets"][row : row + 2]
    first, last = int(a["history_timestamps"][lo]), int(a["history_timestamps"][hi - 1])
    old, new = engine.catalog.ids[7], engine.catalog.ids[8]
    ctx = users.resolve("u5", fetched=(2, [Event(new, None, last + 10), Event(old, 4.0, first - 10)]))
    assert ctx.hist_items[0] == engine.catalog.row_of[old] and ctx.hist_items[-1] == engine.catalog.row_of[new]
    assert (np.diff(ctx.hist_times) >= 0).all() and ctx.hist_ratings[0] == 4.0 and len(ctx.hist_items) == hi - lo + 2
    cold = users.resolve("walk-in", fetched=(2, [Event(new, None, 20), Event(old, None, 10)]), recent_items=[engine.catalog.ids[9]])
    assert cold.hist_items.tolist() == [engine.catalog.row_of[i] for i in (old, new, engine.catalog.ids[9])]


# --------------------------------------------------------------------------- other replicas' changes
@pytest.fixture
def live_engine(backend_start, tmp_path):
    """A live engine on each state backend, its follower off: the changes it applies are the ones the test makes it
    apply (``catch_up``, or the catch-up after its own write)."""
    settings = backend_start.settings(tmp_path / "state")
    location = settings.get("redis_url", tmp_path / "state")
    store = StoreConfig(settings["state_backend"], location, redis_prefix=settings.get("redis_prefix", "recsys"))
    live = LiveEngine(LiveConfig(backend_start.bundle_root, store, impressions=None))
    yield live
    live.close()


def other_replicas_change(live: LiveEngine, *item_ids: str) -> None:
    """Changes written to the store, as other replicas write them: one at a time, not yet applied here."""
    for item_id in item_ids:
        live.store.append_changes([(item_id, Item(item_id=item_id, genres=["genre1"], year=2001).to_record())])


def test_a_write_applies_every_change_before_it_however_many_wait(live_engine, monkeypatch):
    """A write is served by its replica as soon as it is acknowledged, behind any backlog of other replicas'
    changes: Redis hands them out a page at a time, and the catch-up reads pages until the last (a page of 3 here)."""
    monkeypatch.setattr("recsys.live.CHANGES_PAGE", 3)
    monkeypatch.setattr("recsys.state.redis.CHANGES_PAGE", 3)
    others = [f"other-{i}" for i in range(7)]
    other_replicas_change(live_engine, *others)
    live_engine.upsert_items([Item(item_id="mine", genres=["genre2"], year=2002)])
    catalog = live_engine.engine.catalog
    assert {*others, "mine"} <= set(catalog.row_of)
    assert catalog.active[[catalog.row_of[raw] for raw in [*others, "mine"]]].all()


def test_an_experiments_engine_that_fell_behind_catches_up_on_its_own(live_engine, monkeypatch):
    """Engines that serve experiments' bundles follow the catalogue beside the live one. One that missed a read
    (the store briefly down) must not then take only what the live one reads next: the change it missed would
    never reach it, and its users would keep getting a removed item."""
    live = live_engine
    removed = live.engine.catalog.ids[3]
    live.variant_engines["other"] = [live.build(live.config.bundle_dir), live.position]
    variant = live.variant_engines["other"][0]
    read, calls = live.store.changes_since, []

    def down_for_the_second_reader(position, wait_s=0.0):
        calls.append(position)
        if len(calls) == 2:
            raise StoreUnavailable("connection refused")
        return read(position, wait_s)

    live.store.append_changes([(removed, None)])  # another replica's removal
    monkeypatch.setattr(live.store, "changes_since", down_for_the_second_reader)
    with pytest.raises(StoreUnavailable):
        live.catch_up()  # the live engine applies the removal; the experiment's engine cannot read it
    assert not live.engine.catalog.active[live.engine.catalog.row_of[removed]]
    other_replicas_change(live, "later")
    live.catch_up(wait_s=0.01)  # the follower's read: what came after the live engine's position
    catalog = variant.catalog
    assert not catalog.active[catalog.row_of[removed]] and "later" in catalog.row_of
    assert live.variant_engines["other"][1] == live.position


def test_a_narrow_filters_rows_are_scored_as_their_gathered_product():
    """The compiled scoring of rows where they lie (no gathered copy) against numpy's gather and product: any
    rows, repeated or unordered, the last one included, none at all; a float64 query is scored in the vectors'
    float32 as the product would be."""
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((500, 24)).astype(np.float32)
    vec = rng.standard_normal(24)
    for rows in (np.array([499, 0, 7, 7, 250]), rng.choice(500, 120, replace=False), np.zeros(0, np.int64)):
        got = scores_of(vectors, rows, vec)
        assert got.dtype == np.float32 and got.shape == rows.shape
        np.testing.assert_allclose(got, vectors[rows] @ vec.astype(np.float32), rtol=1e-5, atol=1e-5)
