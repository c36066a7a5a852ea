"""Re-ranker: delta NDCG, pair masks, losses by hand, features by hand, bundle round trip, a planted signal."""
import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from offline.item_stats import cooccurrence_neighbours, ease_neighbours
from recsys.bundle import read_bundle
from recsys.rank_features import FEATURE_NAMES, RankerTables, feature_names, ranker_features
from recsys.scorer import load_ranker
from offline.ranker import (
    LOSS_NAMES, Queries, RankerConfig, RankerMLP, bpr_loss, delta_ndcg, fit_lambdamart, fit_mlp, hinge_loss,
    lambdarank_loss, make_loss, pair_mask, ranknet_loss,
)
from recsys.dataset import Interactions


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


# --------------------------------------------------------------------------- delta NDCG


def ndcg_of_order(order, labels, k):
    """NDCG@k of items listed in ``order`` (brute force, straight from the definition)."""
    gains = 2.0 ** np.asarray(labels, float) - 1
    dcg = sum(gains[i] / math.log2(r + 2) for r, i in enumerate(order[:k]))
    ideal = sorted(gains, reverse=True)[:k]
    idcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


@pytest.mark.parametrize("k", [1, 2, 3, 10])
@pytest.mark.parametrize("seed", range(6))
def test_delta_ndcg_matches_brute_force_swap(k, seed):
    rng = np.random.default_rng(seed)
    n = 6
    labels = rng.integers(0, 3, n).astype(np.float32)  # label ties guaranteed with 6 items and 3 levels
    scores = np.round(rng.normal(size=n), 0).astype(np.float32)  # rounding makes score ties too
    got = delta_ndcg(t(scores)[None], t(labels)[None], torch.ones(1, n, dtype=torch.bool), k)[0].numpy()
    order = list(np.argsort(-scores, kind="stable"))
    base = ndcg_of_order(order, labels, k)
    for i, j in itertools.product(range(n), range(n)):
        swapped = order.copy()
        a, b = swapped.index(i), swapped.index(j)
        swapped[a], swapped[b] = swapped[b], swapped[a]
        assert got[i, j] == pytest.approx(abs(ndcg_of_order(swapped, labels, k) - base), abs=1e-6), (i, j)


def test_delta_ndcg_ignores_padding_and_queries_without_positives():
    scores, labels = t([[0.3, 0.9, 5.0, 0.1]]), t([[1.0, 0.0, 2.0, 2.0]])
    mask = t([[1, 1, 0, 0]], torch.bool)
    got = delta_ndcg(scores, labels, mask, k=10)[0]
    unpadded = delta_ndcg(scores[:, :2], labels[:, :2], mask[:, :2], k=10)[0]
    assert torch.allclose(got[:2, :2], unpadded)
    assert got[2:].abs().sum() == 0 and got[:, 2:].abs().sum() == 0
    assert delta_ndcg(t([[0.1, 0.2]]), t([[0.0, 0.0]]), torch.ones(1, 2, dtype=torch.bool), 10).abs().sum() == 0


# --------------------------------------------------------------------------- pairs and masks


def test_pair_mask_ties_and_padding_give_no_pair():
    labels, mask = t([[2.0, 1.0, 1.0, 0.0, 2.0]]), t([[1, 1, 1, 1, 0]], torch.bool)
    pairs = {(i, j) for i, j in zip(*np.nonzero(pair_mask(labels, mask)[0].numpy()))}
    assert pairs == {(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)}  # (1, 2) tie: none; item 4 padding: none


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_single_label_level_query_contributes_nothing(name):
    loss = make_loss(name, RankerConfig())
    one = (t([[0.2, 0.9, -0.3]]), t([[1.0, 0.0, 2.0]]), torch.ones(1, 3, dtype=torch.bool))
    flat = (t([[5.0, -2.0, 1.0]]), t([[1.0, 1.0, 1.0]]), torch.ones(1, 3, dtype=torch.bool))
    both = tuple(torch.cat([a, b]) for a, b in zip(one, flat))
    assert loss(*flat).item() == 0.0
    assert loss(*both).item() == pytest.approx(loss(*one).item(), rel=1e-6)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_padded_list_gives_the_same_loss(name):
    loss = make_loss(name, RankerConfig(ndcg_k=2))
    scores, labels = t([[0.2, 0.9, -0.3]]), t([[1.0, 0.0, 2.0]])
    padded = (t([[0.2, 0.9, -0.3, 7.0, -7.0]]), t([[1.0, 0.0, 2.0, 2.0, 0.0]]), t([[1, 1, 1, 0, 0]], torch.bool))
    assert loss(*padded).item() == pytest.approx(loss(scores, labels, torch.ones(1, 3, dtype=torch.bool)).item(), rel=1e-6)


def test_lambdarank_gradient_pushes_the_relevant_item_up():
    scores = t([[0.5, 0.3, 0.1]]).requires_grad_()
    lambdarank_loss(scores, t([[0.0, 0.0, 1.0]]), torch.ones(1, 3, dtype=torch.bool), sigma=1.0, k=10).backward()
    grad = scores.grad[0]
    assert grad[2] < 0  # descent raises the relevant item's score
    assert grad[0] > 0 and grad[1] > 0  # and lowers the items ranked above it
    assert grad[0] > grad[1]  # the pair that costs more NDCG (rank 0 vs rank 2) pushes harder


# --------------------------------------------------------------------------- losses by hand


def softplus(x):
    return math.log1p(math.exp(x))


def test_pairwise_losses_on_a_two_item_query():
    s0, s1 = 0.2, 0.7  # the relevant item 0 is ranked second
    args = (t([[s0, s1]]), t([[1.0, 0.0]]), torch.ones(1, 2, dtype=torch.bool))
    assert ranknet_loss(*args, sigma=2.0).item() == pytest.approx(softplus(-2.0 * (s0 - s1)), rel=1e-6)
    assert hinge_loss(*args, margin=1.0).item() == pytest.approx(max(0.0, 1.0 - (s0 - s1)), rel=1e-6)
    assert bpr_loss(*args).item() == pytest.approx(softplus(-(s0 - s1)), rel=1e-6)
    swap = 1.0 - 1.0 / math.log2(3)  # |gain 1 - 0| * |discount rank 0 - rank 1| / IDCG 1
    assert lambdarank_loss(*args, sigma=1.0, k=10).item() == pytest.approx(swap * softplus(-(s0 - s1)), rel=1e-6)


def test_lambdarank_on_a_graded_query():
    """Labels 2, 1, 0 ranked exactly backwards: every pair is weighted by its own |delta NDCG|."""
    s = [0.0, 1.0, 2.0]
    gains = [3.0, 1.0, 0.0]
    disc = [1 / math.log2(4), 1 / math.log2(3), 1.0]  # item 0 at rank 2, item 1 at rank 1, item 2 at rank 0
    idcg = 3.0 + 1.0 / math.log2(3)
    want = sum(abs(gains[i] - gains[j]) * abs(disc[i] - disc[j]) / idcg * softplus(-(s[i] - s[j]))
               for i, j in [(0, 1), (0, 2), (1, 2)])
    got = lambdarank_loss(t([s]), t([[2.0, 1.0, 0.0]]), torch.ones(1, 3, dtype=torch.bool), sigma=1.0, k=10)
    assert got.item() == pytest.approx(want, rel=1e-6)
    # BPR ignores grades: only the two positive-vs-negative pairs, averaged.
    bpr = bpr_loss(t([s]), t([[2.0, 1.0, 0.0]]), torch.ones(1, 3, dtype=torch.bool))
    assert bpr.item() == pytest.approx((softplus(-(s[0] - s[2])) + softplus(-(s[1] - s[2]))) / 2, rel=1e-6)


# --------------------------------------------------------------------------- features


def tiny_tables() -> RankerTables:
    """Four items in 2-D: 0 and 2 point the same way, 1 and 3 are orthogonal to them."""
    vectors = np.array([[1, 0], [0, 1], [1, 0], [0.6, 0.8]], np.float32)
    arrays = {
        "item_vectors": vectors,
        "item_genres": np.array([[1, 0], [0, 1], [1, 0], [1, 1]], np.float32),
        "item_year": np.array([1990, 2000, np.nan, 1980], np.float32),
        "popularity": np.array([3, 1, 0, 7], np.float32),
        "item_avg_rating": np.array([4.0, 2.0, np.nan, 3.0], np.float32),
        "item_neighbours": np.array([[2, 3], [3, -1], [0, -1], [1, 0]], np.int64),
        "item_neighbour_sims": np.array([[0.5, 0.25], [0.4, 0.0], [0.5, 0.0], [0.4, 0.25]], np.float32),
        "item_seq_neighbours": np.array([[1, -1], [2, 0], [3, -1], [-1, -1]], np.int64),
        "item_seq_neighbour_sims": np.array([[0.3, 0.0], [0.6, 0.2], [0.9, 0.0], [0.0, 0.0]], np.float32),
        "user_cat": np.array([[1, 0], [2, 1]], np.int64),  # two columns, 3 and 2 codes
    }
    return RankerTables.from_arrays(arrays)


def test_ranker_features_by_hand():
    tables = tiny_tables()
    history, ratings = np.array([0, 1]), np.array([5.0, 3.0], np.float32)  # item 1 is the newest
    feats = ranker_features(tables, history, ratings, np.array([2, 1]), np.array([0.5], np.float32),
                            np.array([3, 2]), np.array([0.9, 0.4], np.float32))
    names = feature_names(tables, 1)
    assert feats.shape == (2, len(names)) and feats.dtype == np.float32
    col = {n: feats[:, names.index(n)] for n in names}
    assert col["recall_score"].tolist() == pytest.approx([0.9, 0.4])
    assert col["recall_log_rank"].tolist() == pytest.approx([0.0, math.log(2)])
    assert col["recall_score_gap"].tolist() == pytest.approx([0.0, -0.5])
    assert col["sim_last"].tolist() == pytest.approx([0.8, 0.0])  # cosine to item 1
    assert col["sim_max_recent"].tolist() == pytest.approx([0.8, 1.0])
    w = np.exp(-np.arange(2) / 5.0)  # newest first: item 1, then item 0
    assert col["sim_mean_recent"].tolist() == pytest.approx([(w[0] * 0.8 + w[1] * 0.6) / w.sum(), w[1] / w.sum()])
    assert col["sim_argmax_age"].tolist() == [0.0, 1.0]  # item 2's best match is one step back
    # neighbours: item 3 is item 1's neighbour (0.4) and item 0's (0.25); item 2 is item 0's (0.5)
    assert col["neighbour_recent"].tolist() == pytest.approx([w[0] * 0.4 + w[1] * 0.25, w[1] * 0.5])
    assert col["neighbour_max_recent"].tolist() == pytest.approx([0.4, 0.5])
    # sequence neighbours: item 2 follows item 1 (0.6); nothing recent points at item 3 (only item 2, not seen)
    assert col["seq_recent"].tolist() == pytest.approx([0.0, w[0] * 0.6])
    assert col["seq_max_recent"].tolist() == pytest.approx([0.0, 0.6])

    g = np.exp(-np.array([1.0, 0.0]) / 20.0)  # genre weights of items 0 (older) and 1
    taste = (g[0] * np.array([1, 0]) + g[1] * np.array([0, 1])) / g.sum()
    assert col["genre_affinity"].tolist() == pytest.approx([taste.sum() / 2, taste[0]])
    assert col["item_log_popularity"].tolist() == pytest.approx([math.log(8), 0.0])
    prior = (4.0 * 3 + 2.0 * 1 + 3.0 * 7) / 11  # popularity-weighted mean rating
    assert col["item_avg_rating"].tolist() == pytest.approx([(3.0 * 7 + prior * 5) / 12, prior])
    assert col["item_year"].tolist() == pytest.approx([1980, 1990])  # unknown year -> mean known year
    assert col["item_year_missing"].tolist() == [0.0, 1.0]
    assert col["year_vs_user"].tolist() == pytest.approx([1980 - 1995, 1990 - 1995])
    assert col["history_log_len"].tolist() == pytest.approx([math.log(3)] * 2)
    assert col["user_mean_rating"].tolist() == pytest.approx([4.0, 4.0])
    assert col["user_num_0"].tolist() == [0.5, 0.5]
    assert [col[f"user_cat_0={c}"][0] for c in range(3)] == [0, 0, 1]
    assert [col[f"user_cat_1={c}"][0] for c in range(2)] == [0, 1]


def test_the_item_item_channel_blends_ease_and_sequence_evidence_each_scaled_to_one():
    from recsys.rank_features import channel_evidence

    user = SimpleNamespace(neighbour_ids=np.array([1, 4]), neighbour_total=np.array([2.0, 1.0]),
                           seq_ids=np.array([0, 4]), seq_total=np.array([0.5, 0.25]))
    ids, score = channel_evidence(user)
    assert ids.tolist() == [0, 1, 4]
    assert score.tolist() == pytest.approx([0.5 * 1.0, 0.5 * 1.0, 0.5 * 0.5 + 0.5 * 0.5])
    ids, score = channel_evidence(SimpleNamespace(neighbour_ids=np.zeros(0, np.int64), neighbour_total=np.zeros(0),
                                                  seq_ids=np.zeros(0, np.int64), seq_total=np.zeros(0)))
    assert len(ids) == 0 and len(score) == 0


def test_ranker_features_for_an_empty_history_and_no_candidates():
    tables = tiny_tables()
    empty = np.zeros(0, np.int64)
    feats = ranker_features(tables, empty, np.zeros(0, np.float32), np.array([0, 0]), np.zeros(1, np.float32),
                            np.array([1, 3]), np.array([0.2, 0.1], np.float32))
    assert np.isfinite(feats).all() and feats.shape[1] == len(feature_names(tables, 1))
    none = ranker_features(tables, np.array([0]), np.array([4.0]), np.array([0, 0]), np.zeros(1, np.float32),
                           empty, np.zeros(0, np.float32))
    assert none.shape == (0, len(feature_names(tables, 1)))
    assert feature_names(tables, 1)[: len(FEATURE_NAMES)] == FEATURE_NAMES


def test_cooccurrence_neighbours_are_cosine_on_the_binary_matrix():
    # users: {0, 1}, {0, 1, 2}, {2}: cos(0, 1) = 2 / (sqrt2 sqrt2) = 1, cos(0, 2) = 1 / (sqrt2 sqrt2) = 0.5
    train = Interactions(np.array([0, 0, 1, 1, 1, 2]), np.array([0, 1, 0, 1, 2, 2]), np.ones(6, np.float32), np.arange(6))
    nbrs, sims = cooccurrence_neighbours(train, 4, 2)
    assert nbrs[0].tolist() == [1, 2] and sims[0].tolist() == pytest.approx([1.0, 0.5])
    assert nbrs[3].tolist() == [-1, -1]  # never seen: no neighbours


def test_ease_neighbours_are_the_largest_positive_ease_weights():
    from offline.baselines import ease_weights

    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 30, 200), rng.integers(0, 12, 200)
    train = Interactions(users, items, np.ones(200, np.float32), np.arange(200))
    nbrs, sims = ease_neighbours(train, 12, 3, l2=5.0)
    x = sp.csr_matrix((np.ones(200), (users, items)), shape=(30, 12))
    x.data[:] = 1.0
    b = ease_weights(x, 5.0)
    for i in range(12):
        want = [j for j in np.argsort(-b[i], kind="stable")[:3] if b[i, j] > 0]
        assert nbrs[i][: len(want)].tolist() == want and (nbrs[i][len(want):] == -1).all()
        assert sims[i][: len(want)] == pytest.approx(b[i, want])


# --------------------------------------------------------------------------- training


def planted_queries(n_queries: int, seed: int) -> Queries:
    """Candidates in a random "recall" order; relevance is planted in feature 0 only."""
    rng = np.random.default_rng(seed)
    L, F = 20, 4
    features = rng.normal(size=(n_queries, L, F)).astype(np.float32)
    labels = np.digitize(features[:, :, 0], [1.0, 1.6]).astype(np.float32)  # top ~15% relevant, top ~5% grade 2
    mask = np.ones((n_queries, L), bool)
    mask[::3, -5:] = False  # some short lists
    labels[~mask] = 0
    items = np.where(mask, np.arange(L)[None, :], -1)
    rows, cols = np.nonzero(labels)
    truth = sp.csr_matrix((labels[rows, cols], (rows, cols)), shape=(n_queries, L))
    return Queries(np.arange(n_queries), items, features, labels, mask, truth)


@pytest.mark.parametrize("loss", ["lambdarank", "ranknet"])
def test_training_learns_a_planted_signal(loss):
    train, valid = planted_queries(120, 0), planted_queries(40, 1)
    recall_order = valid.ndcg(-np.tile(np.arange(20.0), (40, 1)))
    cfg = RankerConfig(epochs=15, hidden=16, batch_queries=16, lr=1e-2, patience=15)
    state = fit_mlp(train, valid, loss, cfg, [f"f{i}" for i in range(4)])
    ranked = valid.ndcg(load_ranker(state).score(valid.features.reshape(-1, 4)).reshape(40, 20))
    assert ranked > recall_order + 0.3 and ranked == pytest.approx(state["metrics"]["valid_ndcg@10"], abs=1e-5)


def linear_state(weights: list[float]) -> dict:
    """A hand-made MLP state with no hidden layer: score = weights . features."""
    model = RankerMLP(len(weights), layers=0)
    with torch.no_grad():
        model.net[0].weight.copy_(torch.tensor([weights]))
        model.net[0].bias.zero_()
    return {"kind": "mlp", "loss": "x", "feature_names": [f"f{i}" for i in range(len(weights))], "mean": torch.zeros(len(weights)),
            "std": torch.ones(len(weights)), "config": model.config, "state_dict": model.state_dict(), "metrics": {"valid_ndcg@10": 0.0}}


def test_default_stays_lambdarank_unless_another_is_clearly_better():
    from offline.train_ranker import choose_default

    valid = planted_queries(200, 5)
    signal, noise = linear_state([1.0, 0, 0, 0]), linear_state([0, 1.0, 0, 0])
    assert choose_default({"lambdarank": noise, "hinge": signal}, valid, "auto")[0] == "hinge"
    assert choose_default({"lambdarank": signal, "hinge": linear_state([1.0, 0.01, 0, 0])}, valid, "auto")[0] == "lambdarank"
    assert choose_default({"lambdarank": signal, "hinge": noise}, valid, "hinge")[0] == "hinge"


def test_numpy_serving_replays_the_torch_mlp():
    state = fit_mlp(planted_queries(30, 2), planted_queries(10, 3), "hinge", RankerConfig(epochs=2, hidden=8, layers=3),
                    [f"f{i}" for i in range(4)])
    model = RankerMLP(**state["config"])
    model.load_state_dict(state["state_dict"])
    x = np.random.default_rng(4).normal(size=(200, 4)).astype(np.float32)
    with torch.no_grad():
        eager = model.eval()(torch.from_numpy((x - state["mean"].numpy()) / state["std"].numpy())).numpy()
    assert np.allclose(load_ranker(state).score(x), eager, atol=1e-5)


def test_lambdamart_round_trip(tmp_path):
    pytest.importorskip("lightgbm", reason="lightgbm is a dev/eval dependency")
    train, valid = planted_queries(120, 0), planted_queries(40, 1)
    state = fit_lambdamart(train, valid, RankerConfig(gbm_trees=30, gbm_min_leaf=5), [f"f{i}" for i in range(4)])
    torch.save(state, tmp_path / "ranker.pt")
    loaded = load_ranker(torch.load(tmp_path / "ranker.pt", weights_only=False))
    x = valid.features.reshape(-1, 4)
    assert np.array_equal(loaded.score(x), load_ranker(state).score(x))
    assert valid.ndcg(loaded.score(x).reshape(40, 20)) > valid.ndcg(-np.tile(np.arange(20.0), (40, 1))) + 0.3


# --------------------------------------------------------------------------- the bundle


def test_bundle_ranker_scores_the_served_features(bundle_root, tiny_dataset):
    """Serving path end to end: bundle arrays -> features -> stored ranker; same scores after a save/load."""
    bundle = read_bundle(bundle_root)
    assert bundle.ranker is not None and bundle.manifest["ranker"]["kind"] == bundle.ranker["kind"]
    tables = RankerTables.from_arrays(bundle.arrays)
    a = bundle.arrays
    user = 4
    lo, hi = a["history_offsets"][user], a["history_offsets"][user + 1]
    history = a["history_items"][lo:hi]
    candidates = np.setdiff1d(np.arange(len(a["item_vectors"])), history)[:50]
    feats = ranker_features(tables, history, a["history_ratings"][lo:hi], a["user_cat"][user], a["user_num"][user],
                            candidates, np.linspace(1, 0, len(candidates), dtype=np.float32))
    assert bundle.ranker["feature_names"] == feature_names(tables, a["user_num"].shape[1])
    ranker = load_ranker(bundle.ranker)
    scores = ranker.score(feats)
    assert scores.shape == (len(candidates),) and np.isfinite(scores).all()
    copy = bundle_root.parent / "ranker_copy.pt"
    torch.save(bundle.ranker, copy)
    assert np.array_equal(load_ranker(torch.load(copy, weights_only=False)).score(feats), scores)


def test_training_features_equal_serving_features(bundle_root, tiny_dataset):
    """The trainer's histories (before valid, before test) are prefixes of the served ones, and its
    merged candidates and features are the service's calls on the bundle's arrays, value for value."""
    from recsys.rank_features import candidate_features, merge_candidates, user_features
    from offline.split import temporal_split
    from offline.train_ranker import RankContext

    a = read_bundle(bundle_root).arrays
    tables = RankerTables.from_arrays(a)
    ctx = RankContext(None, tables, a, depth=30, extra=10)
    split = temporal_split(tiny_dataset.interactions, tiny_dataset.n_users, tiny_dataset.n_items)
    user_vec = a["item_vectors"][:3].mean(axis=0)
    for window in ("valid", "test"):
        histories = split.history_before(window)
        for user in (0, 7, 33):
            history = histories[user]
            lo = a["history_offsets"][user]
            cands = np.setdiff1d(np.arange(len(a["item_vectors"])), history)[:30]
            scores = np.linspace(1, 0, 30, dtype=np.float32)
            served_user = user_features(tables, a["history_items"][lo : lo + len(history)],
                                        a["history_ratings"][lo : lo + len(history)], a["user_cat"][user], a["user_num"][user])
            items, item_scores, n_tower = merge_candidates(served_user, cands, scores, user_vec, tables.item_vectors, 10,
                                                           admit=lambda ids: ~np.isin(ids, history))
            served = candidate_features(tables, served_user, items, item_scores, n_tower)
            offline_items, offline_scores, offline_features = ctx.request(user, history, cands, scores, user_vec)
            assert np.array_equal(offline_items, items) and np.array_equal(offline_scores, item_scores)
            assert np.array_equal(offline_features, served)
    with pytest.raises(ValueError, match="not a prefix"):
        ctx.request(0, histories[0][::-1], cands, scores, user_vec)


def test_merged_candidates_append_the_channels_best_unseen_admitted_items_with_their_tower_scores():
    from recsys.rank_features import merge_candidates

    vectors = np.eye(6, 2, dtype=np.float32) + 0.5  # row i: [1.5, 0.5] for i=0, [0.5, 1.5] for i=1, else [0.5, 0.5]
    user = SimpleNamespace(neighbour_ids=np.array([0, 1, 2, 3, 4, 5]), neighbour_total=np.array([9.0, 0.0, 3.0, 5.0, 3.0, 7.0]),
                           seq_ids=np.zeros(0, np.int64), seq_total=np.zeros(0))
    tower, tower_scores = np.array([5]), np.array([0.9], np.float32)
    admit = lambda ids: ids != 0  # noqa: E731  (item 0 is seen, say)
    items, scores, n_tower = merge_candidates(user, tower, tower_scores, np.array([1.0, 0.0], np.float32), vectors, 2, admit)
    # 0 not admitted, 5 already from the tower, 1 has no evidence; 3 (5.0) then 2 (3.0, the tie with 4 goes to the lower row)
    assert items.tolist() == [5, 3, 2] and n_tower == 1
    assert scores.tolist() == pytest.approx([0.9, 0.5, 0.5])
    assert merge_candidates(user, tower, tower_scores, np.zeros(2, np.float32), vectors, 0, admit)[0].tolist() == [5]
    f32 = np.float32
    tables = RankerTables(vectors, np.zeros((6, 2), f32), np.full(6, np.nan, f32), np.ones(6, f32), np.full(6, np.nan, f32),
                          np.full((6, 1), -1), np.zeros((6, 1), f32), np.full((6, 1), -1), np.zeros((6, 1), f32),
                          np.zeros(0, np.int64))
    features = ranker_features(tables, np.zeros(0, np.int64), np.zeros(0, f32), np.zeros(0, np.int64), np.zeros(0, f32),
                               items, scores, n_tower)
    assert features[:, FEATURE_NAMES.index("from_item_item")].tolist() == [0.0, 1.0, 1.0]


def test_report_compares_rerankers_with_the_recall_order(bundle_root):
    metrics = read_bundle(bundle_root).manifest["metrics"]
    ranker = metrics["ranker"]
    assert ranker["default"] in ranker["valid_ndcg@10"]
    for name in ranker["valid_ndcg@10"]:
        assert f"two-tower + {name}" in metrics["test"]
        ci = ranker["test_ndcg@10_minus"][f"two-tower + {name}"]["two-tower (hnsw)"]
        assert ci["lo"] <= ci["mean"] <= ci["hi"] and ci["users"] > 0


def test_an_event_without_a_rating_leaves_the_users_mean_rating_alone(bundle_root):
    """Serving marks an event without a rating (and a new user's recent_items) with rating 0, which the tower reads
    as 'unknown'; the ranker's user mean rating must not average it in as a 0, a value it never saw in training
    (ten unrated clicks took a user's mean from 3.6 to 2.5)."""
    from recsys.rank_features import user_features

    bundle = read_bundle(bundle_root)
    a, tables = bundle.arrays, RankerTables.from_arrays(bundle.arrays)
    lo, hi = a["history_offsets"][5 : 5 + 2]
    items, ratings = a["history_items"][lo:hi], a["history_ratings"][lo:hi]
    clicks = np.arange(10, dtype=np.int64)
    rated = user_features(tables, items, ratings, a["user_cat"][5], a["user_num"][5])
    with_clicks = user_features(tables, np.concatenate([items, clicks]), np.concatenate([ratings, np.zeros(10, np.float32)]),
                                a["user_cat"][5], a["user_num"][5])
    assert with_clicks.constant[1] == pytest.approx(float(ratings.mean())) == pytest.approx(rated.constant[1])
    cold = user_features(tables, clicks[:3], np.zeros(3, np.float32), a["user_cat"][5], a["user_num"][5])
    assert cold.constant[1] == pytest.approx(tables.rating_prior)  # nothing rated: the prior, as an empty history


def test_the_split_first_layer_scores_as_the_assembled_features(bundle_root):
    """The MLP's first layer, folded with its standardisation and split into the candidate block and one bias per
    user (``score_parts``), scores what ``score`` gives the assembled ``[n, F]`` features, and the block plus the
    user's constant columns assemble into ``candidate_features``."""
    from recsys.rank_features import assemble, candidate_block, candidate_features, user_features

    bundle = read_bundle(bundle_root)
    a, ranker = bundle.arrays, load_ranker(_as_mlp(bundle.ranker))
    assert ranker.split is not None  # a bundle's ranker reads the standard layout
    tables = RankerTables.from_arrays(a)
    blocks, constants, full = [], [], []
    for user, n in ((0, 30), (5, 1), (9, 17)):
        lo, hi = a["history_offsets"][user : user + 2]
        features = user_features(tables, a["history_items"][lo:hi], a["history_ratings"][lo:hi], a["user_cat"][user],
                                 a["user_num"][user])
        cands = np.arange(n, dtype=np.int64) * 3 % len(a["item_vectors"])
        scores = np.linspace(1, 0, n, dtype=np.float32)
        blocks.append(candidate_block(tables, features, cands, scores, n - 1))
        constants.append(features.constant)
        full.append(candidate_features(tables, features, cands, scores, n - 1))
        assert np.array_equal(assemble(blocks[-1], constants[-1]), full[-1])
    assert np.allclose(ranker.score_parts(blocks, constants), ranker.score(np.concatenate(full)), atol=1e-5)


def _as_mlp(state: dict) -> dict:
    """The bundle's ranker when model selection chose the MLP; else an MLP of random weights over the same features
    (on the tiny data LambdaMART wins now and then, and the first-layer algebra is what is checked)."""
    if state["kind"] == "mlp":
        return state
    rng, n = np.random.default_rng(0), len(state["feature_names"])
    weights = {"net.0.weight": rng.normal(size=(8, n)), "net.0.bias": rng.normal(size=8),
               "net.2.weight": rng.normal(size=(1, 8)), "net.2.bias": rng.normal(size=1)}
    return {"kind": "mlp", "loss": "random", "feature_names": state["feature_names"], "mean": rng.normal(size=n),
            "std": rng.uniform(0.5, 2.0, n), "state_dict": weights}
