"""One behaviour suite, every offline recommender (implicit writes its tests once as a mixin and runs
them against every model; this is that, as a parametrised fixture).

Every model the evaluation reports answers ``recommend(users, histories, k) -> [len(users), k]`` item
rows, -1 padded; a ``ScoringRecommender`` answers it through ``recommend_by_score``, exactly as
``offline.evaluate`` calls it. Each model is built once per module on the session's tiny synthetic
data with one change: user 0's history covers every item but ``UNSEEN``, so "fewer than k left" is
a real user's real history (the two-tower and the re-ranker read a history's ratings from the user's
stored sequence, so they accept only prefixes of it, not made-up lists).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from offline.baselines import EASE, Blend, ItemKNN, Popularity, ScoringRecommender, SeqKNN
from offline.evaluate import BLEND, recommend_by_score
from offline.pipeline import IndexConfig, Recall
from offline.ranker import RankerConfig
from offline.recall_eval import TwoTowerRecommender, build_index
from offline.split import TemporalSplit, concat_windows, temporal_split
from offline.tower_tables import TowerTables
from offline.train_ranker import RankContext, RankingResult, RerankRecommender, rerankers, train_rankers
from offline.train_recall import RecallConfig, train_two_tower
from offline.two_tower import TwoTower
from recsys.dataset import Dataset, Interactions
from tests.conftest import TINY_RANKER, TINY_RECALL

K = 10
HEAVY = 0  # the user whose history covers all but UNSEEN items
UNSEEN = 3  # fewer than K: that user's list is these items, then -1
INDEX = IndexConfig(m=8, ef_construction=50, ef=64, candidates=50, item_item_candidates=10)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here on one torch thread (tests/conftest.py)."""


@dataclass
class Data:
    ds: Dataset
    split: TemporalSplit
    unseen: np.ndarray  # the items HEAVY never interacted with, ascending

    @property
    def users(self) -> np.ndarray:
        return np.arange(self.ds.n_users)

    def histories(self, window: str) -> list[np.ndarray]:
        """Every user's history before ``window`` (``"test"``: what the evaluation passes; ``"serve"``: all)."""
        return self.split.history_before(window)


def with_heavy_user(ds: Dataset, user: int, unseen: int, seed: int = 0) -> tuple[Dataset, np.ndarray]:
    """``ds`` with ``user``'s events replaced by one event on every item but ``unseen`` of them, in a
    seeded random order, from the user's first timestamp on; and those unseen items."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(ds.n_items)
    inter = ds.interactions
    start = inter.timestamp[inter.user == user].min()
    n = ds.n_items - unseen
    ratings = rng.integers(1, 6, n).astype(inter.rating.dtype)
    times = (start + np.arange(n)).astype(inter.timestamp.dtype)
    heavy = Interactions(np.full(n, user, np.int64), order[unseen:].astype(np.int64), ratings, times)
    return replace(ds, interactions=concat_windows([inter.subset(inter.user != user), heavy])), np.sort(order[:unseen])


@pytest.fixture(scope="module")
def data(tiny_dataset) -> Data:
    ds, unseen = with_heavy_user(tiny_dataset, HEAVY, UNSEEN)
    return Data(ds, temporal_split(ds.interactions, ds.n_users, ds.n_items), unseen)


@dataclass
class Tower:
    model: TwoTower
    tables: TowerTables
    recall: Recall  # its item vectors, HNSW index and the bundle arrays the re-ranker reads


def train_tower(data: Data, run_dir: Path) -> Tower:
    """A tiny two-tower (conftest's TINY_RECALL: fast, not good) and what serving it takes."""
    cfg = RecallConfig(**TINY_RECALL)
    model, tables, _ = train_two_tower(data.ds, data.split, cfg, run_dir)
    return Tower(model, tables, Recall.build(data.ds, data.split, tables, model, INDEX, cfg.seed))


def train_ranker(data: Data, tower: Tower) -> tuple[RankContext, RankingResult]:
    """One MLP ranker (LambdaRank, conftest's TINY_RANKER) on the tower's merged candidates."""
    ctx = tower.recall.context(tower.tables, INDEX)
    return ctx, train_rankers(ctx, data.split, RankerConfig(**TINY_RANKER, losses="lambdarank", lambdamart=False))


@pytest.fixture(scope="module")
def tower(data, tmp_path_factory) -> Tower:
    return train_tower(data, tmp_path_factory.mktemp("behaviour-tower"))


@pytest.fixture(scope="module")
def ranker_state(data, tower) -> tuple[RankContext, RankingResult]:
    return train_ranker(data, tower)


@pytest.fixture(scope="module")
def tower_again(data, tmp_path_factory) -> Tower:
    """The same training from the same seed (one torch thread): a fresh instance, not a copy."""
    return train_tower(data, tmp_path_factory.mktemp("behaviour-tower-again"))


@pytest.fixture(scope="module")
def ranker_state_again(data, tower_again) -> tuple[RankContext, RankingResult]:
    return train_ranker(data, tower_again)


Getter = Callable[[str], object]  # a fixture's value by name (``request.getfixturevalue``)


def _hnsw(get: Getter) -> TwoTowerRecommender:
    """The tower through an index rebuilt from its vectors (single-threaded with a fixed seed: a
    function of its inputs, so a rebuild is a fresh instance of the same model)."""
    t: Tower = get("tower")
    index = build_index(t.recall.vectors, INDEX.m, INDEX.ef_construction, INDEX.ef, seed=RecallConfig().seed)
    return TwoTowerRecommender(t.model, t.tables, index)


def _reranked(get: Getter) -> RerankRecommender:
    ctx, result = get("ranker_state")
    model, params = rerankers(ctx, result)[0]
    assert params["default"]  # the bundle's ranker
    return model


def _blend(get: Getter) -> Blend:
    split = get("data").split
    return Blend(EASE(split, l2=50.0, recency_halflife=5.0), SeqKNN(split, window=10, decay=2.0), 0.5, BLEND)


# name -> build(get), ``get`` resolving a fixture by name. Every model is rebuilt for the determinism
# test from the same data and seed; the trained ones are retrained too (``FRESH``: a few seconds here).
BUILDERS: dict[str, Callable[[Getter], object]] = {
    "popularity": lambda get: Popularity(get("data").split),
    "item-knn": lambda get: ItemKNN(get("data").split, neighbours=50),
    "ease": lambda get: EASE(get("data").split, l2=50.0),
    "ease-recency": lambda get: EASE(get("data").split, l2=50.0, recency_halflife=5.0),
    "seqknn": lambda get: SeqKNN(get("data").split, window=10, decay=2.0),
    "blend": _blend,
    "two-tower-exact": lambda get: TwoTowerRecommender(get("tower").model, get("tower").tables),
    "two-tower-hnsw": _hnsw,
    "two-tower+ranker": _reranked,
}

FRESH = {"tower": "tower_again", "ranker_state": "ranker_state_again"}

NO_SIMILAR_ITEMS = {
    "popularity": "popularity scores ignore the history: it has no item-item notion",
    "blend": "a blend of two scorers' per-user scaled scores has no item-item table of its own; its parts "
             "(ease-recency, seqknn) answer similar_items",
    "two-tower+ranker": "the ranker scores (user, candidate) features, not item pairs; its item-item notion is "
                        "its recall model's, tested as two-tower",
}


@dataclass
class Case:
    name: str
    model: object
    build: Callable[[Getter], object]


@pytest.fixture(scope="module", params=list(BUILDERS))
def case(request) -> Case:
    """The model, built once per module."""
    return Case(request.param, BUILDERS[request.param](request.getfixturevalue), BUILDERS[request.param])


def recommend(model: object, users: np.ndarray, histories: list[np.ndarray], k: int) -> np.ndarray:
    """The evaluation's call (``offline.evaluate.evaluate_per_user``)."""
    if isinstance(model, ScoringRecommender):
        return recommend_by_score(model, users, histories, k)
    return model.recommend(users, histories, k)


def assert_full_distinct_rows(rows: np.ndarray, n_items: int, k: int) -> None:
    assert rows.shape[1] == k and rows.dtype.kind == "i"
    assert ((rows >= 0) & (rows < n_items)).all(), rows[((rows < 0) | (rows >= n_items)).any(axis=1)]
    assert all(len(set(r)) == k for r in rows.tolist())


# --------------------------------------------------------------------------- the behaviours


def test_excludes_seen_items(case, data):
    for window in ("test", "serve"):
        hist = data.histories(window)
        got = recommend(case.model, data.users, hist, K)
        assert got.shape == (data.ds.n_users, K)
        seen = [sorted(set(row.tolist()) & set(h.tolist())) for row, h in zip(got, hist)]
        assert not any(seen), {u: s for u, s in enumerate(seen) if s}


def test_fills_k_with_distinct_items_while_k_unseen_remain(case, data):
    hist = data.histories("test")
    assert min(data.ds.n_items - len(np.unique(h)) for h in hist) >= K  # the premise, HEAVY included
    assert_full_distinct_rows(recommend(case.model, data.users, hist, K), data.ds.n_items, K)


def test_fewer_than_k_unseen_gives_exactly_those_then_padding(case, data):
    hist = data.histories("serve")
    assert np.array_equal(np.setdiff1d(np.arange(data.ds.n_items), hist[HEAVY]), data.unseen)  # the premise
    users = np.array([HEAVY, 1, 2])
    got = recommend(case.model, users, [hist[u] for u in users], K)
    assert sorted(got[0, :UNSEEN].tolist()) == data.unseen.tolist()
    assert got[0, UNSEEN:].tolist() == [-1] * (K - UNSEEN)
    assert_full_distinct_rows(got[1:], data.ds.n_items, K)  # the users beside it are unaffected


def test_deterministic_across_calls_and_fresh_instances(case, data, request):
    hist = data.histories("test")
    first = recommend(case.model, data.users, hist, K)
    assert np.array_equal(recommend(case.model, data.users, hist, K), first)
    fresh = case.build(lambda name: request.getfixturevalue(FRESH.get(name, name)))
    assert fresh is not case.model
    assert np.array_equal(recommend(fresh, data.users, hist, K), first)


def test_batch_equals_one_at_a_time(case, data):
    """A user's list does not depend on who else is in the request (HEAVY, with the longest history,
    is in the batch: a batch-wide over-fetch must not change anyone else's list; with this suite's
    index it does not, with a narrower beam it does: the pinned defect at the end of the module)."""
    hist = data.histories("test")
    batch = recommend(case.model, data.users, hist, K)
    alone = np.concatenate([recommend(case.model, data.users[u : u + 1], hist[u : u + 1], K) for u in data.users])
    differ = np.flatnonzero((batch != alone).any(axis=1))
    assert not len(differ), {int(u): (batch[u].tolist(), alone[u].tolist()) for u in differ[:5]}


def test_an_item_is_most_similar_to_itself(case, data):
    if case.name in NO_SIMILAR_ITEMS:
        assert not hasattr(case.model, "similar_items")  # a model that gains the verb must be tested here
        pytest.skip(reason=NO_SIMILAR_ITEMS[case.name])
    items = np.arange(data.ds.n_items)
    got = case.model.similar_items(items, K)
    assert got.shape == (len(items), K)
    assert np.array_equal(got[:, 0], items), items[got[:, 0] != items]
    assert_full_distinct_rows(got, data.ds.n_items, K)
    shuffled = np.random.default_rng(0).permutation(items)[:17]
    assert np.array_equal(case.model.similar_items(shuffled, K), got[shuffled])  # row by row, in any order


# --------------------------------------------------------------------------- what similar_items means


@pytest.mark.parametrize("name", ["item-knn", "ease", "ease-recency", "seqknn"])
def test_item_item_neighbours_are_the_recommendation_for_that_one_item_history(name, request, data):
    """For the item-item models, after the item itself ``similar_items`` lists what ``recommend`` gives a
    user whose only history is that item: one notion of neighbour, not two."""
    model = BUILDERS[name](request.getfixturevalue)
    items = np.arange(data.ds.n_items)
    got = model.similar_items(items, K + 1)
    one_item = recommend(model, np.zeros(len(items), np.int64), [np.array([i]) for i in items], K)
    assert np.array_equal(got[:, 1:], one_item)


def test_two_tower_similar_items_rank_by_the_cosine_of_item_vectors(tower):
    rec = TwoTowerRecommender(tower.model, tower.tables)
    vectors = rec.item_vectors.astype(np.float64)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)  # unit: inner product is the cosine
    got = rec.similar_items(np.arange(len(vectors)), K)
    cos = vectors @ vectors.T
    picked = np.take_along_axis(cos, got, axis=1)
    assert picked[:, 0] == pytest.approx(1.0, abs=1e-5)
    assert (np.diff(picked, axis=1) <= 1e-6).all()  # descending
    rest = cos.copy()
    np.put_along_axis(rest, got, -np.inf, axis=1)
    assert (rest.max(axis=1) <= picked[:, -1] + 1e-6).all()  # nothing left out beats the last one listed


# --------------------------------------------------------------------------- a batch searches as one user alone


def test_hnsw_batch_equals_one_at_a_time_with_a_beam_narrower_than_the_fetch(tower, data):
    """hnswlib's beam is max(ef, fetch) and each user's fetch is k + its history: a user batched with a longer
    history must not search deeper than alone (the evaluation passes every user in one call; serving, one)."""
    narrow = build_index(tower.recall.vectors, m=4, ef_construction=20, ef=10)
    rec = TwoTowerRecommender(tower.model, tower.tables, narrow)
    hist = data.histories("test")
    batch = rec.recommend(data.users, hist, K)
    alone = np.concatenate([rec.recommend(data.users[u : u + 1], hist[u : u + 1], K) for u in data.users])
    assert np.array_equal(batch, alone)
