"""The promotion gate (offline/gate.py): a paired test over users, checked on planted candidates whose true
difference from the incumbent is known, and against a hand-computed t interval."""
from __future__ import annotations

import numpy as np
import pytest

from offline.config import ConfigError
from offline.gate import GateConfig, gate, paired_test
from recsys.experiments.stats import wilson


def planted(n_users: int, shift: float, rng: np.random.Generator) -> tuple[dict, dict]:
    """Per-user NDCG@10 and Recall@20 of an incumbent and a candidate whose expected difference is ``shift``:
    each user's value has a user effect (shared by both models) and model noise, clipped to [0, 1]."""
    base = rng.beta(0.6, 2.0, size=(n_users, 1)) * np.array([1.0, 1.4])
    noise = lambda: rng.normal(0, 0.08, size=(n_users, 2))  # noqa: E731  (model-to-model noise per user)
    inc = np.clip(base + noise(), 0, 1)
    cand = np.clip(base + noise() + shift, 0, 1)
    as_metrics = lambda a: {"ndcg@10": a[:, 0], "recall@20": a[:, 1]}  # noqa: E731
    return as_metrics(cand), as_metrics(inc)


def test_the_interval_and_detectable_drop_match_a_hand_computed_t_test():
    cand, inc = np.array([0.5, 0.2, 0.4, 0.0]), np.array([0.4, 0.3, 0.1, 0.0])
    t = paired_test(cand, inc, "ndcg@10", alpha=0.025, margin=0.0, power=0.8)
    # differences 0.1, -0.1, 0.3, 0.0: mean 0.075, sd 0.170783 (n - 1), se 0.0853913; t_{0.975, 3} = 3.182446
    assert t.mean == pytest.approx(0.075)
    assert (t.lo, t.hi) == (pytest.approx(0.075 - 3.182446 * 0.0853913, abs=1e-6), pytest.approx(0.075 + 3.182446 * 0.0853913, abs=1e-6))
    assert t.detectable == pytest.approx((3.182446 + 0.841621) * 0.0853913, abs=1e-6)
    assert t.level == pytest.approx(0.95) and t.users == 4 and not t.worse
    nan_user = paired_test(np.array([0.5, np.nan]), np.array([0.4, 0.1]), "x", 0.025, 0.0, 0.8)
    assert nan_user.users == 1 and nan_user.mean == pytest.approx(0.1)  # a user without a positive is left out


def test_the_detectable_drop_is_refused_with_the_stated_power_whatever_the_margin():
    """'This window detects drops of d': a true drop of d is refused 80% of the time. The gate refuses when the
    interval's top lies below minus the margin, so d includes the margin (it read 0.026 at margin 0.01 where the
    gate refused that drop 34% of the time)."""
    rng = np.random.default_rng(3)
    for margin in (0.0, 0.01, -0.01):
        d = paired_test(rng.normal(0, 0.2, 400), np.zeros(400), "x", 0.025, margin, 0.8).detectable
        refused = [paired_test(rng.normal(-d, 0.2, 400), np.zeros(400), "x", 0.025, margin, 0.8).worse for _ in range(600)]
        assert 0.74 <= np.mean(refused) <= 0.86, (margin, d, np.mean(refused))


def test_one_user_never_refuses_a_candidate():
    """One user's difference has no spread to judge noise by: not 'worse with 95% confidence'."""
    one = paired_test(np.array([0.0]), np.array([0.3]), "x", 0.025, 0.0, 0.8)
    assert not one.worse and one.p_value == 1.0 and one.detectable == float("inf")
    same_drop = paired_test(np.zeros(5), np.full(5, 0.3), "x", 0.025, 0.0, 0.8)  # five users, each 0.3 worse
    assert same_drop.worse and same_drop.p_value == 0.0


def test_an_equal_candidate_is_promoted_at_the_stated_rate():
    """400 planted equal candidates on 300 users: the refusal rate is at most 1 - confidence (the two metrics
    share it), and its 99% Wilson interval reaches the per-metric rate: the test is not overly timid either."""
    rng = np.random.default_rng(0)
    refused = sum(not gate(*planted(300, 0.0, rng)).promote for _ in range(400))
    lo, hi = wilson(refused, 400, 0.01)
    assert lo <= 0.05 and hi >= 0.025, (refused, lo, hi)
    one_metric = sum(not gate(*planted(300, 0.0, rng), metrics=("ndcg@10",)).promote for _ in range(400))
    lo, hi = wilson(one_metric, 400, 0.01)
    assert lo <= 0.05 <= hi, (one_metric, lo, hi)


def test_a_worse_candidate_is_refused_and_a_better_one_promoted():
    rng = np.random.default_rng(1)
    decision = gate(*planted(800, -0.03, rng))
    assert not decision.promote and "worse with 95% confidence" in decision.reason
    assert all(t.worse and t.hi < 0 for t in decision.tests)
    better = gate(*planted(800, +0.03, rng))
    assert better.promote and all(t.lo > 0 for t in better.tests)
    # a drop smaller than the window can see is promoted, and the report says what it could have seen
    small = gate(*planted(100, -0.005, rng))
    assert small.promote and all(t.detectable > 0.005 for t in small.tests) and "detects drops of" in small.reason


def test_the_margin_accepts_a_stated_loss_and_a_negative_margin_demands_a_gain():
    rng = np.random.default_rng(2)
    worse = planted(800, -0.03, rng)
    assert gate(*worse, GateConfig(margin=0.1)).promote
    equal = planted(800, 0.0, rng)
    assert not gate(*equal, GateConfig(margin=-0.05)).promote


def test_identical_lists_are_promoted_and_a_bad_confidence_is_refused():
    same = {"ndcg@10": np.array([0.3, 0.0, 1.0]), "recall@20": np.array([0.5, 0.0, 1.0])}
    decision = gate(same, same)
    assert decision.promote and all(t.mean == 0 and t.hi == 0 for t in decision.tests)
    with pytest.raises(ConfigError, match="--gate-confidence"):
        GateConfig(confidence=1.0)
