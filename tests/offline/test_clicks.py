"""Learning from clicks (offline/clicks.py): joins and pairs from hand-made impression logs, propensities
recovered from randomised swaps on a planted click model, and the weighted loss's gradient."""
from __future__ import annotations

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from offline.clicks import ClickConfig, Clicks, Propensities, click_queries, estimate_propensities, join_clicks, load_clicks
from offline.config import ConfigError
from offline.data import DataError
from offline.ranker import lambdarank_loss, pair_mask, ranknet_loss
from offline.synthetic import generate
from recsys.experiments.explore import swap
from recsys.state.protocol import Event

T0 = 1_800_000_000  # seconds


def impression(rid, user, items, ts_s=T0, **extra):
    return {"request_id": rid, "user_id": user, "ts_ms": ts_s * 1000 + 250, "items": items, **extra}


def click(rid, user, item, position=None, ts=T0 + 5, kind="click"):
    return ((0, 0), user, Event(item, None, ts, kind, rid, position))


@pytest.fixture(scope="module")
def ds():
    return generate(n_users=4, n_items=12, n_genres=3, interactions_per_user=3, seed=0)


def test_feedback_joins_its_impression_by_the_services_rule(ds):
    imps = [impression("a", "u0", ["i1", "i2", "i3", "i4"]), impression("b", "u1", ["i5", "i6", "i7"]),
            impression("a/shadow", "u0", ["i9"], shadow="e/s", of="a"), impression("c", "stranger", ["i1"])]
    events = [click("a", "u0", "i3", 3), click("a", "u0", "i1"),  # joined with and without a position
              click("a", "u0", "i2", kind="view"),  # not a click type: ignored
              click("b", "u0", "i5"),  # another user's impression
              click("b", "u1", "i6", ts=T0 + 4000),  # outside the window
              click("b", "u1", "i7", 1),  # a contradicting position
              ((0, 0), "u1", Event("i7", 4.0, T0 + 5))]  # a plain rating: not feedback
    shown, counts = join_clicks(imps, events, ds, ClickConfig())
    by_user = {ds.user_ids[s.user]: s for s in shown}
    assert set(by_user) == {"u0", "u1"}  # the shadow and the unknown user's impressions are not trained on
    assert by_user["u0"].clicked.tolist() == [True, False, True, False]
    assert by_user["u0"].items.tolist() == [ds.item_row(i) for i in ("i1", "i2", "i3", "i4")]
    assert not by_user["u1"].clicked.any() and by_user["u0"].ts_s == T0
    assert counts == {"feedback joined": 2, "feedback not joined": 3, "impressions of users the data lacks": 1,
                      "impressions": 2, "impressions with a click": 1}


class FakeContext:
    """A ``RankContext`` stand-in: the tower returns items 0..5 in order (minus the history), and each
    candidate's features are (item row, position in the request)."""

    def __init__(self, n_users: int, n_items: int):
        self.arrays = {"history_offsets": np.arange(n_users + 1, dtype=np.int64), "history_items": np.arange(n_users, dtype=np.int64) + 8,
                       "history_timestamps": np.full(n_users, T0 - 100, np.int64), "item_vectors": np.eye(n_items, dtype=np.float32)}
        self.tables = SimpleNamespace(item_vectors=self.arrays["item_vectors"])
        self.requests = []

    def candidates(self, users, histories):
        items = np.tile(np.arange(6), (len(users), 1))
        return items, -np.arange(6, dtype=np.float32)[None].repeat(len(users), 0), np.zeros((len(users), 12), np.float32)

    def request(self, user, history, items, scores, user_vec):
        self.requests.append((user, history.tolist(), items.tolist()))
        return items, scores, np.column_stack([items, np.arange(len(items))]).astype(np.float32)


def clicks_of(shown, **config):
    cfg = ClickConfig(**config)
    props = None if cfg.propensities == "none" else Propensities(np.array([1.0, 0.5, 0.25, 0.2]), None, None, "given")
    return Clicks(cfg, shown, props, {})


def test_exposure_pairs_are_among_shown_items_weighted_by_the_clicked_position(ds):
    from offline.clicks import Shown

    # shown: rows 3, 1, 7 (7 is not among the tower's candidates 0..5), 4; clicked positions 2 and 4
    shown = [Shown(0, T0, np.array([3, 1, 7, 4]), np.array([False, True, False, True])),
             Shown(1, T0, np.array([2, 5]), np.array([False, False]))]  # no click: no query
    ctx = FakeContext(4, 12)
    q = click_queries(ctx, clicks_of(shown), list_len=6)
    assert len(q.users) == 1 and q.items[0].tolist() == [3, 1, 7, 4]  # in the order shown
    assert q.features[0, :, 0].tolist() == [3, 1, 7, 4] and q.features[0, 2, 1] == 6  # 7 appended after the tower's 6
    assert ctx.requests[0][1] == [8]  # the history before the impression
    assert q.labels[0].tolist() == [0, 1, 0, 1]
    assert q.weights[0].tolist() == [1, 2, 1, 5]  # 1 / theta at positions 2 and 4; unclicked items' weight unused
    pairs = {tuple(p) for p in np.argwhere(pair_mask(torch.from_numpy(q.labels), torch.from_numpy(q.mask))[0].numpy())}
    assert pairs == {(1, 0), (1, 2), (3, 0), (3, 2)}  # each click above each shown item not clicked
    assert q.gains[0].tolist() == [0, 2, 0, 5]
    clipped = click_queries(FakeContext(4, 12), clicks_of(shown, max_weight=3.0), list_len=6)
    assert clipped.weights[0].tolist() == [1, 2, 1, 3]
    assert click_queries(FakeContext(4, 12), clicks_of(shown, propensities="none"), list_len=6).weights is None


def test_naive_pairs_put_a_click_above_every_candidate_not_clicked(ds):
    from offline.clicks import Shown

    shown = [Shown(0, T0, np.array([3, 1, 7, 4]), np.array([False, True, True, False]))]
    q = click_queries(FakeContext(4, 12), clicks_of(shown, pairs="naive"), list_len=6)
    # every candidate and nothing else: the clicked 7, which the candidates lack, appended past their end would
    # be the only item there, and always a click (its rank would give its label away)
    assert q.items[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert q.labels[0].tolist() == [0, 1, 0, 0, 0, 0] and q.weights is None and q.gains is None
    assert pair_mask(torch.from_numpy(q.labels), torch.from_numpy(q.mask))[0].sum() == 5
    assert sorted(q.truth[0].indices.tolist()) == [1, 7]  # the ideal still counts the click the candidates missed


def simulate_explored(theta: np.ndarray, n: int, epsilon: float, seed: int) -> list:
    """``n`` explored impressions of lists of ``len(theta)`` whose ranked items have attractiveness falling
    with rank plus noise; position-based clicks: P(click) = theta[position] * attractiveness."""
    from offline.clicks import Shown

    rng, coins = np.random.default_rng(seed), random.Random(seed)
    k = len(theta)
    out = []
    for _ in range(n):
        attract = np.clip(0.5 / np.sqrt(np.arange(1, k + 1)) + rng.normal(0, 0.1, k), 0.01, 1)
        order, _ = swap(k, epsilon, coins)
        clicked = rng.random(k) < theta * attract[order]
        out.append(Shown(0, T0, np.arange(k), clicked, np.array(order)))
    return out


def test_propensities_are_recovered_from_randomised_swaps_on_a_planted_click_model():
    theta = (1.0 / np.arange(1, 6)) ** 1.0
    est = estimate_propensities(simulate_explored(theta, 60_000, 0.5, 0), 5)
    assert est.theta[0] == 1 and np.all(est.lo <= theta) and np.all(theta <= est.hi), (est.theta, est.lo, est.hi)
    assert np.allclose(est.theta, theta, rtol=0.25) and np.all(est.hi - est.lo < 0.35)
    assert sum(est.swaps) == pytest.approx(30_000, rel=0.05) and "60000 explored" in est.source
    # a uniform examination is recovered as uniform
    flat = estimate_propensities(simulate_explored(np.full(4, 0.6), 60_000, 0.5, 1), 4)
    assert np.allclose(flat.theta, 1, atol=0.25) and np.all(flat.lo <= 1) and np.all(flat.hi >= 1)


def test_without_explored_swaps_the_estimate_is_a_clear_error(ds):
    from offline.clicks import Shown

    never = [Shown(0, T0, np.arange(3), np.array([True, False, False]), np.arange(3))]
    with pytest.raises(DataError, match="no explored impression swapped positions 1 and 2.*explore"):
        estimate_propensities(never, 3)
    plain = [impression("a", "u0", ["i1", "i2"])]
    with pytest.raises(DataError, match="explore"):
        load_clicks(plain, [click("a", "u0", "i1")], ds, ClickConfig())
    given = load_clicks(plain, [click("a", "u0", "i1")], ds, ClickConfig(propensities="1,0.5"))
    assert given.propensities.theta.tolist() == [1.0, 0.5]
    with pytest.raises(ConfigError, match="--clicks-propensities"):
        ClickConfig(propensities="1,0,x")
    with pytest.raises(ConfigError, match="--clicks-pairs"):
        ClickConfig(pairs="skip")


@pytest.mark.parametrize("loss", [lambdarank_loss, ranknet_loss])
def test_the_weighted_loss_gradient_matches_finite_differences(loss):
    torch.manual_seed(0)
    scores = torch.tensor([[0.3, -1.2, 0.8, 2.0, -0.4], [1.1, 0.2, -0.7, 0.0, 0.5]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [True, True, True, True, False]])
    weights = torch.tensor([[2.0, 1.0, 1.0, 5.0, 1.0], [1.0, 3.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: loss(s, labels, mask, weights=weights), (scores,), eps=1e-6, atol=1e-6)
    # each pair counts its clicked item's weight: doubling every weight doubles the loss
    assert loss(scores, labels, mask, weights=2 * weights).item() == pytest.approx(2 * loss(scores, labels, mask, weights=weights).item())
    # weights of one are the unweighted loss
    assert loss(scores, labels, mask, weights=torch.ones_like(weights)).item() == pytest.approx(loss(scores, labels, mask).item())


def test_the_cli_says_what_is_missing_before_any_training(tmp_path, capsys):
    from offline.__main__ import main as offline_main

    state = tmp_path / "state"
    (state / "impressions").mkdir(parents=True)
    event = {"user_id": "u1", "item_id": "i2", "rating": None, "timestamp": T0, "type": "click", "request_id": "r1", "position": 1}
    (state / "events.jsonl").write_text(json.dumps(event) + "\n")
    args = ["train", "--synthetic", "20x30", "--impressions", str(state), "--out", str(tmp_path / "out")]
    assert offline_main(args) == 2
    assert "holds no impressions" in capsys.readouterr().err
    shown = {"request_id": "r1", "user_id": "u1", "ts_ms": T0 * 1000, "items": ["i2", "i3", "i4"]}
    (state / "impressions" / "00000000.jsonl").write_text(json.dumps(shown) + "\n")
    assert offline_main(args) == 2
    err = capsys.readouterr().err
    assert "no explored impression swapped positions 1 and 2" in err and err.count("\n") == 1
    assert offline_main([*args, "--clicks-propensities", "1,x"]) == 2
    assert "argument --clicks-propensities" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
