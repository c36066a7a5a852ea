"""What keeps offline cost linear in the data: partial top-k, blocked scoring, sampled evaluation users,
sparse item neighbours, the vectorised synthetic generator and the stage recorder the scaling
benchmark reads. Each is checked against a plain reference on data small enough to compute both."""
from __future__ import annotations

import numpy as np
import pytest

from offline import stages
from offline.item_stats import _binary, cooccurrence_neighbours
from offline.recall_eval import exact_topk
from offline.split import history_matrix, temporal_split
from offline.synthetic import generate
from recsys.dataset import Interactions
from recsys.topk import topk_items
from recsys.topk import top_neighbours


def reference_topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Full stable sort: the definition ``topk_items`` must match, ties to the lower row."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    picked = np.take_along_axis(scores, order, axis=1)
    out = np.full((len(scores), k), -1)
    out[:, : order.shape[1]] = np.where(np.isfinite(picked), order, -1)
    return out


def test_partial_topk_equals_a_full_stable_sort_with_heavy_ties():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n, k = int(rng.integers(1, 25)), int(rng.integers(1, 30))
        scores = rng.integers(0, 3, (3, n)).astype(np.float32)  # three values: ties straddle every cut
        scores[rng.random(scores.shape) < 0.25] = -np.inf
        assert topk_items(scores, k).tolist() == reference_topk(scores, k).tolist()


def test_exact_topk_in_blocks_equals_one_block_and_excludes_history():
    rng = np.random.default_rng(1)
    users, items = rng.normal(size=(37, 8)).astype(np.float32), rng.normal(size=(50, 8)).astype(np.float32)
    histories = [rng.choice(50, int(rng.integers(0, 10)), replace=False) for _ in range(37)]
    whole = topk_items(users @ items.T, 5, history_matrix(histories, 50))
    blocked = exact_topk(users, items, 5, histories, max_cells=120)  # blocks of 2 users
    assert blocked.tolist() == whole.tolist()
    assert not any(np.isin(row, h).any() for row, h in zip(blocked, histories))


def test_eval_users_is_a_seeded_sample_of_the_users_with_a_positive():
    ds = generate(n_users=200, n_items=100, n_genres=3, interactions_per_user=10, seed=2)
    full = temporal_split(ds.interactions, ds.n_users, ds.n_items)
    sampled = temporal_split(ds.interactions, ds.n_users, ds.n_items, max_eval_users=50)
    everyone = full.eval_users("test")
    assert len(everyone) == int((np.diff(full.truth("test").indptr) > 0).sum())
    picked = sampled.eval_users("test")
    assert len(picked) == 50 and np.all(np.diff(picked) > 0) and set(picked) <= set(everyone)
    assert picked.tolist() == sampled.eval_users("test").tolist()  # seeded: the same users every call
    assert sampled.eval_users("test", seed=1).tolist() != picked.tolist()


def test_sparse_cooccurrence_neighbours_equal_the_dense_cosine_in_any_block_size():
    ds = generate(n_users=150, n_items=120, n_genres=3, interactions_per_user=15, seed=4)
    x = _binary(ds.interactions, 120).toarray().astype(np.float64)
    norms = np.maximum(np.sqrt(x.sum(axis=0)), 1.0)
    dense = (x.T @ x) / norms[:, None] / norms[None, :]
    np.fill_diagonal(dense, 0.0)
    want_ids, want_sims = top_neighbours(dense.astype(np.float32), 10)
    assert (want_sims[:, -1] > 0).any()  # some rows fill all ten slots
    for max_pairs in (1, 500, 1 << 24):  # one item per block ... everything in one block
        ids, sims = cooccurrence_neighbours(ds.interactions, 120, 10, max_pairs=max_pairs)
        np.testing.assert_allclose(sims, want_sims, rtol=1e-5)  # the k largest similarities, in order
        real = ids >= 0
        assert (real == (want_ids >= 0)).all()
        rows = np.nonzero(real)[0]  # and each named neighbour really has that similarity (ties in any order)
        np.testing.assert_allclose(dense[rows, ids[real]], sims[real], rtol=1e-5)
        assert all(len(set(r[r >= 0])) == (r >= 0).sum() and i not in r for i, r in enumerate(ids))


def test_cooccurrence_neighbours_by_hand():
    # users: {0, 1}, {0, 1, 2}, {2}: cos(0,1) = 2/(sqrt2 sqrt2) = 1; cos(0,2) = cos(1,2) = 1/(sqrt2 sqrt2) = 0.5
    inter = Interactions(np.array([0, 0, 1, 1, 1, 2]), np.array([0, 1, 0, 1, 2, 2]), np.ones(6, np.float32), np.arange(6))
    ids, sims = cooccurrence_neighbours(inter, 4, 2, max_pairs=1)
    assert ids.tolist() == [[1, 2], [0, 2], [0, 1], [-1, -1]]
    np.testing.assert_allclose(sims, [[1.0, 0.5], [1.0, 0.5], [0.5, 0.5], [0.0, 0.0]], rtol=1e-6)


def test_synthetic_users_have_distinct_items_in_time_order_and_seeds_reproduce():
    a = generate(n_users=300, n_items=2000, n_genres=4, interactions_per_user=30, pool_size=100, seed=5, chunk=64)
    b = generate(n_users=300, n_items=2000, n_genres=4, interactions_per_user=30, pool_size=100, seed=5, chunk=64)
    inter = a.interactions
    assert np.array_equal(inter.item, b.interactions.item) and np.array_equal(inter.timestamp, b.interactions.timestamp)
    for u in range(300):
        mine = inter.user == u
        assert 5 <= mine.sum() <= 50  # Poisson(30) + 5, capped at half the pool
        assert len(np.unique(inter.item[mine])) == mine.sum()
        assert np.all(np.diff(inter.timestamp[mine]) > 0)
    assert set(np.unique(inter.rating)) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    counts = np.bincount(inter.item, minlength=2000)
    assert counts[np.argsort(-counts)[:20]].sum() > 20 * counts.mean()  # popularity skew survives


def test_stage_records_time_and_peak_memory_nested():
    stages.clear()
    with stages.stage("outer"):
        with stages.stage("inner"):
            block = np.ones(50_000_000 // 8)  # 50 MB, touched
            block[::512] = 2.0
            del block
        with stages.stage("inner"):
            pass
    got = stages.recorded()
    assert list(got) == ["inner", "outer"] and got["inner"]["calls"] == 2
    if stages.high_water_mark() == 0:
        pytest.skip("no /proc/self/status here: seconds only")
    assert got["inner"]["peak_bytes"] >= 50_000_000
    assert got["outer"]["peak_bytes"] >= got["inner"]["peak_bytes"]  # the inner peak counts towards the outer
    assert got["outer"]["seconds"] >= got["inner"]["seconds"]
    stages.clear()
    assert stages.recorded() == {}
