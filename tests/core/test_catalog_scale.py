"""Serving at catalogue scale: filtered search against brute force, and per-request work that does not grow
with the catalogue (service/filters.py, service/engine.py).

The tiny session bundle grows here by a few thousand items added through the admin path (``prepare_upsert``
/ ``commit_upsert``, as the service applies them) and loses some to removals, so every check also covers the
filter index after catalogue changes. Each engine reads its own copy of the bundle: upserts touch its index.
"""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from recsys.bundle import read_bundle
from recsys.engine.allowed import FILTER_CACHE_MB, FilterRowCache
from recsys.engine.engine import Catalog, Engine
from recsys.engine.filters import EXACT_LIMIT, FilterIndex, RowFilter
from recsys.query import Filters, Item, RecommendRequest
from tests.servicekit import AUTH

ADDED = 3000
BROAD = 0  # an exact_limit under which every non-empty filter takes the HNSW path
DEPTH = 20


@pytest.fixture(scope="module")
def grown(bundle_root) -> Engine:
    """The session bundle plus ``ADDED`` items (some without year or genre, three of year 1900) and 100 removals."""
    engine = Engine.from_bundle(read_bundle(bundle_root))
    rng = np.random.default_rng(0)
    names = engine.bundle.catalog["genre_names"]
    items = [Item(item_id=f"new{i}", genres=list(rng.choice(names, rng.integers(0, 3), replace=False)),
                        year=1900 if i < 3 else None if rng.random() < 0.05 else int(rng.integers(1950, 2021)))
             for i in range(ADDED)]
    engine.live.commit(engine.changes.prepare(items))
    for row in rng.choice(len(engine.catalog.ids), 100, replace=False):
        engine.changes.remove(engine.catalog.ids[row])
    # Items added online have no id embedding, so their vectors repeat (same genres and year) and the tiny
    # test index (M=8) loses neighbours among the duplicates; a wide beam keeps HNSW's misses out of checks
    # that are about the filters.
    engine.bundle.index.set_ef(500)
    return engine


def brute_force(catalog: Catalog, names: list[str], vec: np.ndarray, filters: Filters | None, seen: np.ndarray,
                depth: int) -> np.ndarray:
    """The exact filtered top-``depth`` by a pass over the whole catalogue."""
    rows = np.flatnonzero(admitted_mask(catalog, names, filters) & ~np.isin(np.arange(len(catalog.ids)), seen))
    scores = catalog.vectors[rows] @ vec
    return rows[np.lexsort((rows, -scores))][:depth]


def admitted_mask(catalog: Catalog, names: list[str], filters: Filters | None) -> np.ndarray:
    genres, year = catalog.arrays["item_genres"] > 0, catalog.arrays["item_year"]
    keep = catalog.active.copy()
    if filters is None:
        return keep
    if filters.genres_any:
        keep &= genres[:, [names.index(g) for g in filters.genres_any]].any(axis=1)
    if filters.genres_none:
        keep &= ~genres[:, [names.index(g) for g in filters.genres_none]].any(axis=1)
    with np.errstate(invalid="ignore"):
        if filters.year_min is not None:
            keep &= year >= filters.year_min
        if filters.year_max is not None:
            keep &= year <= filters.year_max
    return keep


def random_filters(names: list[str], rng: np.random.Generator, n: int) -> list[Filters]:
    """Genre and year constraints in every combination (at least one), from nearly everything to nearly nothing."""
    out = []
    while len(out) < n:
        low = int(rng.integers(1945, 2025))
        filters = Filters(genres_any=list(rng.choice(names, rng.integers(1, 3), replace=False)) if rng.random() < 0.6 else None,
                          genres_none=list(rng.choice(names, 1)) if rng.random() < 0.3 else None,
                          year_min=low if rng.random() < 0.6 else None,
                          year_max=low + int(rng.integers(0, 30)) if rng.random() < 0.6 else None)
        if any(v is not None for v in vars(filters).values()):
            out.append(filters)
    return out


def unit(rng: np.random.Generator, dim: int) -> np.ndarray:
    v = rng.normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.mark.parametrize("exact_limit", [EXACT_LIMIT, 300, BROAD], ids=["narrow", "mixed", "broad"])
@pytest.mark.parametrize("cache_mb", [FILTER_CACHE_MB, 0], ids=["cached", "uncached"])
def test_filtered_search_returns_only_admitted_items_and_matches_exact_search(grown, exact_limit, cache_mb, monkeypatch):
    """Narrow filters are scored exactly: the very rows and order of brute force. Broad ones go through HNSW
    with over-fetch: every result admitted, recall against brute force near 1 on this small index."""
    monkeypatch.setattr(grown, "exact_limit", exact_limit)
    monkeypatch.setattr(grown, "filter_rows", FilterRowCache(cache_mb << 20))
    rng = np.random.default_rng(1)
    names = grown.bundle.catalog["genre_names"]
    catalog, recalls = grown.catalog, []
    for filters in random_filters(names, rng, 60):
        vec, seen = unit(rng, catalog.vectors.shape[1]), rng.choice(len(catalog.ids), 30, replace=False)
        allowed = grown.allowed(catalog, filters, seen)
        _, rows, scores = grown.search(vec, DEPTH, allowed)
        expected = brute_force(catalog, names, vec, filters, seen, DEPTH)
        assert admitted_mask(catalog, names, filters)[rows].all() and not np.isin(rows, seen).any(), filters
        assert len(set(rows.tolist())) == len(rows) == len(expected) and np.allclose(scores, catalog.vectors[rows] @ vec, atol=1e-5)
        best = catalog.vectors[expected] @ vec  # items added online share vectors (no id embedding): ties are many
        if allowed.rows is not None:  # exact: the brute-force scores, in order
            assert np.allclose(scores, best, atol=1e-5), filters
        elif len(expected):
            recalls.append(float(np.mean(scores >= best[-1] - 1e-5)))
    assert (not recalls) == (exact_limit == EXACT_LIMIT)
    assert not recalls or np.mean(recalls) >= 0.95, np.mean(recalls)


@pytest.mark.parametrize("exact_limit", [EXACT_LIMIT, BROAD], ids=["narrow", "broad"])
def test_a_filter_matching_very_few_items_returns_exactly_those(grown, exact_limit, monkeypatch):
    monkeypatch.setattr(grown, "exact_limit", exact_limit)
    rng = np.random.default_rng(2)
    few = Filters(year_min=1900, year_max=1900)  # the three items added with that year
    expected = {f"new{i}" for i in range(3) if grown.catalog.active[grown.catalog.row_of[f"new{i}"]]}
    assert expected
    _, rows, _ = grown.search(unit(rng, grown.catalog.vectors.shape[1]), DEPTH, grown.allowed(grown.catalog, few, None))
    assert {grown.catalog.ids[r] for r in rows} == expected
    popular = grown.popular(grown.catalog, grown.allowed(grown.catalog, few, None), 10)
    assert {grown.catalog.ids[entry[0]] for entry in popular} == expected


@pytest.mark.parametrize("exact_limit", [EXACT_LIMIT, BROAD], ids=["narrow", "broad"])
def test_a_filter_matching_nothing_is_an_empty_list(grown, exact_limit, monkeypatch):
    monkeypatch.setattr(grown, "exact_limit", exact_limit)
    names = grown.bundle.catalog["genre_names"]
    vec = unit(np.random.default_rng(3), grown.catalog.vectors.shape[1])
    for nothing in (Filters(year_min=3000), Filters(genres_any=[names[0]], genres_none=[names[0]]),
                    Filters(genres_any=[names[1]], year_min=1900, year_max=1900, genres_none=names)):
        allowed = grown.allowed(grown.catalog, nothing, None)
        assert len(grown.search(vec, DEPTH, allowed)[1]) == 0 and grown.popular(grown.catalog, allowed, 10) == []


@pytest.mark.parametrize("exact_limit", [EXACT_LIMIT, 300, BROAD], ids=["narrow", "mixed", "broad"])
@pytest.mark.parametrize("cache_mb", [FILTER_CACHE_MB, 0], ids=["cached", "uncached"])
def test_popularity_fallback_with_filters_matches_brute_force(grown, exact_limit, cache_mb, monkeypatch):
    monkeypatch.setattr(grown, "exact_limit", exact_limit)
    monkeypatch.setattr(grown, "filter_rows", FilterRowCache(cache_mb << 20))
    rng = np.random.default_rng(4)
    names, catalog = grown.bundle.catalog["genre_names"], grown.catalog
    pop = catalog.arrays["popularity"]
    for filters in [None, *random_filters(names, rng, 30)]:
        seen = rng.choice(len(catalog.ids), 10, replace=False)
        rows = np.flatnonzero(admitted_mask(catalog, names, filters) & ~np.isin(np.arange(len(catalog.ids)), seen))
        expected = rows[np.lexsort((rows, -pop[rows]))][:10]
        got = [entry[0] for entry in grown.popular(catalog, grown.allowed(catalog, filters, seen), 10)]
        assert got == expected.tolist(), filters


def test_an_empty_filter_is_the_unfiltered_path(grown):
    for empty in (Filters(), Filters(genres_any=[], genres_none=[])):
        allowed = grown.allowed(grown.catalog, empty, None)
        assert allowed.rows is None and allowed.rule is None


def test_filters_follow_catalogue_changes_through_the_service(backend_start, tmp_path):
    """Added, replaced and removed items, in both search modes, through the admin API (on each state backend)."""
    for exact_limit in (str(EXACT_LIMIT), str(BROAD)):
        with backend_start(state_dir=tmp_path / exact_limit, filter_exact_limit=exact_limit) as client:
            def listed(filters: dict) -> set[str]:
                response = client.post("/recommend", json={"user_id": "u1", "k": 50, "exclude_seen": False, "filters": filters})
                assert response.status_code == 200, response.text
                return {it["item_id"] for it in response.json()["items"]}

            rare = {"year_min": 1800, "year_max": 1801}
            assert listed(rare) == set()
            for item_id, year in (("old-a", 1800), ("old-b", 1801)):
                added = client.post("/admin/items", json={"item_id": item_id, "genres": ["genre1"], "year": year}, headers=AUTH)
                assert added.status_code == 200, added.text
            assert listed(rare) == {"old-a", "old-b"}
            assert listed({**rare, "genres_any": ["genre1"]}) == {"old-a", "old-b"}
            assert listed({**rare, "genres_none": ["genre1"]}) == set()
            replaced = client.put("/admin/items", json={"item_id": "old-b", "genres": ["genre2"], "year": 1801}, headers=AUTH)
            assert replaced.status_code == 200
            assert listed({**rare, "genres_any": ["genre2"]}) == {"old-b"} and listed({**rare, "genres_none": ["genre2"]}) == {"old-a"}
            assert client.delete("/admin/items/old-a", headers=AUTH).status_code == 200
            assert listed(rare) == {"old-b"}
            fallback = client.post("/recommend", json={"k": 10, "filters": rare}).json()
            assert fallback["fallback"] == "popularity" and [it["item_id"] for it in fallback["items"]] == ["old-b"]
            nothing = client.post("/recommend", json={"user_id": "u1", "k": 10, "filters": {"year_min": 1802, "year_max": 1802}})
            assert nothing.status_code == 200 and nothing.json()["items"] == []


# --------------------------------------------------------------------------- per-request work vs catalogue size
def grow_to(engine: Engine, n: int) -> None:
    """``engine``'s catalogue made again with rows up to ``n``: copies of row 0 without genre, year or popularity,
    which no HNSW label points at, so every search and filter answer stays the same and only the catalogue is bigger."""
    catalog = engine.catalog
    extra = n - len(catalog.ids)
    arrays = {k: np.concatenate([v, np.repeat(v[:1], extra, axis=0)]) for k, v in catalog.arrays.items()}
    arrays["item_genres"][-extra:], arrays["item_year"][-extra:], arrays["popularity"][-extra:] = 0, np.nan, 0
    ids = catalog.ids + [f"pad{i}" for i in range(extra)]
    engine.live.load(ids, catalog.titles + ids[-extra:], arrays, engine.bundle.arrays if engine.ranker is not None else None)


def peak_bytes(call) -> int:
    """Peak memory allocated while ``call`` runs (numpy reports its buffers to tracemalloc)."""
    call()  # warm: the user's vector and ranker features are cached, as for a returning user
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_request_work_does_not_grow_with_the_catalogue(bundle_root):
    """An unfiltered request, the popularity fallback, /similar-items and a narrow filter allocate the same on
    150 items as on 200,000: any per-request copy or mask over the catalogue would add at least 200 kB."""
    engine = Engine.from_bundle(read_bundle(bundle_root))
    year = int(np.nanmin(engine.catalog.arrays["item_year"]))
    calls = {
        "unfiltered": lambda: engine.recommend(RecommendRequest(user_id="u1", k=10, candidates=20), 20),
        "popularity": lambda: engine.recommend(RecommendRequest(k=10), 20),
        "similar": lambda: engine.similar_items("i3", 10),
        "narrow filter": lambda: engine.recommend(RecommendRequest(user_id="u1", k=10, candidates=20, filters=Filters(
            genres_any=engine.bundle.catalog["genre_names"][:2], year_min=year, year_max=year + 20)), 20),
    }
    small = {name: peak_bytes(call) for name, call in calls.items()}
    grow_to(engine, 200_000)
    large = {name: peak_bytes(call) for name, call in calls.items()}
    for name in calls:
        assert large[name] - small[name] < 64_000, (name, small[name], large[name])



def test_the_filter_index_lists_exactly_the_admitted_rows_with_more_genres_than_a_word():
    """70 genres (two bit words), unknown years: every filter's rows, from the year slices, equal brute force."""
    rng = np.random.default_rng(5)
    genres = rng.random((500, 70)) < 0.05
    year = np.where(rng.random(500) < 0.1, np.nan, rng.integers(1950, 2020, 500)).astype(np.float32)
    index = FilterIndex.build(genres.astype(np.float32), year)
    for _ in range(200):
        any_cols = list(rng.choice(70, rng.integers(0, 4), replace=False))
        none_cols = list(rng.choice(70, rng.integers(0, 3), replace=False))
        low = int(rng.integers(1945, 2025)) if rng.random() < 0.5 else None
        high = int(rng.integers(1945, 2025)) if rng.random() < 0.5 else None
        rule = RowFilter(any_cols, none_cols, low, high)
        keep = np.ones(500, bool)
        if any_cols:
            keep &= genres[:, any_cols].any(axis=1)
        keep &= ~genres[:, none_cols].any(axis=1)
        if low is not None:
            keep &= year >= low  # an unknown year passes no bound
        if high is not None:
            keep &= year <= high
        listed = rule.admitted(index, rule.slices(index))
        assert sorted(listed.tolist()) == np.flatnonzero(keep).tolist()
        assert len(set(listed.tolist())) == len(listed)
        assert rule.admits(index, np.arange(500)).tolist() == keep.tolist()
