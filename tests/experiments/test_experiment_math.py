"""The pieces an experiment stands on, against examples worked by hand: assignment, team-draft
interleaving and its credit, exploration's propensities, the statistics."""
from __future__ import annotations

import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import chi2_contingency

from recsys.errors import Conflict, InvalidInput
from recsys.experiments import stats
from recsys.experiments.definition import Experiment, Plan, Variant, bucket, check, check_against, plan
from recsys.experiments.explore import swap
from recsys.experiments.interleave import credit, team_draft
from recsys.experiments.serving import serve
from recsys.errors import UnknownId

USERS = [f"u{i}" for i in range(20_000)]


def split(name="exp", a=0.5, b=0.5, **options) -> Experiment:
    return check(Experiment(name, (Variant("control", a), Variant("treatment", b, **options))))


# --------------------------------------------------------------------------- assignment
def test_assignment_is_sticky_and_the_same_in_every_process():
    exp = split()
    here = [exp.assign(u).name for u in USERS[:200]]
    assert here == [exp.assign(u).name for u in USERS[:200]]
    code = ("from recsys.experiments.definition import Experiment, Variant\n"
            "e = Experiment('exp', (Variant('control', 0.5), Variant('treatment', 0.5)))\n"
            "print(','.join(e.assign(f'u{i}').name for i in range(200)))")
    for seed in ("1", "2"):  # Python's own hash differs per process: the assignment must not
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip()
        assert out.split(",") == here


def test_shares_are_honoured_and_a_share_moved_moves_only_the_users_between_the_bounds():
    exp = split(a=0.2, b=0.8)
    in_control = {u for u in USERS if exp.assign(u).name == "control"}
    assert abs(len(in_control) / len(USERS) - 0.2) < 4 * math.sqrt(0.2 * 0.8 / len(USERS))
    wider = split(a=0.3, b=0.7)
    now = {u for u in USERS if wider.assign(u).name == "control"}
    assert in_control <= now  # nobody left control; only users in [0.2, 0.3) joined it
    assert all(0.2 <= bucket("exp", u) < 0.3 for u in now - in_control)


def test_experiments_assign_independently():
    one, two = split("one"), split("two")
    table = np.zeros((2, 2))
    for u in USERS:
        table[one.assign(u).name == "control", two.assign(u).name == "control"] += 1
    assert chi2_contingency(table)[1] > 0.001  # knowing one assignment says nothing of the other
    assert table[0, 1] > 0.2 * len(USERS) and table[1, 0] > 0.2 * len(USERS)


def test_a_plan_merges_the_options_of_each_experiment_and_shadows_are_computed_for_their_share():
    ranker = split("ranker", ranker=False)
    depth = check(Experiment("depth", (Variant("short", 0.5, candidates=50), Variant("long", 0.5, candidates=400),
                                       Variant("pop", 0.25, ranker=False, shadow=True))))
    p = plan({"ranker": ranker, "depth": depth}, "u7")
    assert p.assignments == {"ranker": ranker.assign("u7").name, "depth": depth.assign("u7").name}
    assert p.options["candidates"] == (50 if p.assignments["depth"] == "short" else 400)
    assert ("ranker" in p.options) == (p.assignments["ranker"] == "treatment")
    shadowed = sum(bool(plan({"depth": depth}, u).shadows) for u in USERS[:4000])
    assert abs(shadowed / 4000 - 0.25) < 0.03
    assert plan({"ranker": ranker}, None).assignments == {}  # no user id: nothing stable to hash


# --------------------------------------------------------------------------- bad definitions
@pytest.mark.parametrize("variants, mode, message", [
    ((Variant("a", 0.5), Variant("b", 0.4)), "split", "sum to 1, not 0.9"),
    ((Variant("a", 0.5), Variant("a", 0.5)), "split", "distinct"),
    ((Variant("a", 0.5), Variant("b")), "split", "needs a share"),
    ((Variant("a", 1.0, shadow=True),), "split", "at least one variant must be served"),
    ((Variant("a"), Variant("b"), Variant("c")), "interleave", "exactly two"),
    ((Variant("a", 0.5), Variant("b", 0.5)), "interleave", "no share"),
    ((Variant("a", 0.5), Variant("b", 0.5, explore=1.5)), "split", "explore must be a probability"),
    ((Variant("A", 1.0),), "split", "variant name"),
    ((Variant("a", 0.5), Variant("b", 0.5, candidates=0)), "split", "candidates"),
])
def test_bad_definitions_are_refused_with_the_reason(variants, mode, message):
    with pytest.raises(InvalidInput, match=message):
        check(Experiment("exp", variants, mode))


def test_two_experiments_cannot_set_one_option_and_the_number_running_is_bounded():
    running = {"ranker": split("ranker", ranker=False)}
    with pytest.raises(Conflict, match=r"'ranker' already sets \['ranker'\]"):
        check_against(split("other", ranker=False), running, 10)
    check_against(split("depth", candidates=50), running, 10)  # another option: fine
    check_against(split("ranker", candidates=50), running, 10)  # redefining the same experiment: fine
    with pytest.raises(Conflict, match="RECSYS_MAX_EXPERIMENTS"):
        check_against(split("depth", candidates=50), running, 1)
    inter = check(Experiment("i1", (Variant("a"), Variant("b", ranker=False)), "interleave"))
    with pytest.raises(Conflict, match="one interleaving"):
        check_against(check(Experiment("i2", (Variant("a"), Variant("b", candidates=9)), "interleave")), {"i1": inter}, 10)


def test_a_stored_definition_is_read_back_and_a_corrupt_one_refused():
    exp = split(ranker=False)
    assert Experiment.from_record(exp.to_record()) == exp
    with pytest.raises(ValueError):
        Experiment.from_record({"name": "x", "variants": [{"name": "a", "share": 1.0, "colour": "red"}]})
    with pytest.raises(ValueError, match="sum to 1"):
        Experiment.from_record({"name": "x", "variants": [{"name": "a", "share": 0.5}]})


# --------------------------------------------------------------------------- interleaving
class Coin:
    """A random.Random stand-in whose coin always lands the same way."""

    def __init__(self, value: float):
        self.value = value

    def random(self) -> float:
        return self.value


def test_team_draft_by_hand():
    a, b = [1, 2, 3, 4], [2, 1, 5, 6]
    # A wins the coin: A takes 1, B (behind) takes 2, tie: A again takes 3 (2 is taken), B takes 5
    assert team_draft(a, b, 4, Coin(0.3)) == ([1, 2, 3, 5], ["A", "B", "A", "B"])
    # B wins the coin: B takes 2, A takes 1, tie: B takes 5 (1 is taken), A takes 3
    assert team_draft(a, b, 4, Coin(0.7)) == ([2, 1, 5, 3], ["B", "A", "B", "A"])
    # A runs out (its one item taken, by A or by B): the picks stop, B's rest fills the list credited to nobody
    assert team_draft([1], [1, 2, 3], 3, Coin(0.3)) == ([1, 2, 3], ["A", "-", "-"])
    assert team_draft([1], [1, 2, 3], 3, Coin(0.7)) == ([1, 2, 3], ["B", "-", "-"])
    assert team_draft([1, 2], [], 3, Coin(0.3)) == ([1, 2], ["-", "-"])  # B had no answer: nobody judged
    assert team_draft([], [], 3, Coin(0.3)) == ([], [])


def test_team_draft_gives_a_longer_ranking_no_credit_for_its_length():
    """Clicks at random (one position of each answer) must leave neither team ahead, whatever the lists' lengths:
    a team that went on alone after the other ran out took B a preference of +0.67 here."""
    rng = random.Random(0)
    for a, b in ((["x"], ["x", "y", "z"]), (["x", "y", "z"], ["x"]), (["x", "y"], [])):
        draws = [team_draft(a, b, 3, rng) for _ in range(20_000)]
        mean = sum(credit(teams, [rng.randrange(len(items)) + 1]) for items, teams in draws) / len(draws)
        assert abs(mean) < 0.02, (a, b, mean)


def test_team_draft_never_favours_a_team_over_many_draws():
    rng = random.Random(0)
    first_a = sum(team_draft([1, 2], [3, 4], 2, rng)[1][0] == "A" for _ in range(4000))
    assert abs(first_a / 4000 - 0.5) < 0.03
    for _ in range(200):  # at any cut, the teams' counts differ by at most one
        _, teams = team_draft(list(range(10)), list(range(10))[::-1], 10, rng)
        for cut in range(1, 11):
            assert abs(teams[:cut].count("A") - teams[:cut].count("B")) <= 1


def _two_rankings(options: dict, places: list[int]):
    """A ``serve`` run: configuration A ranks a0..a5, B ranks b0..b5 (B's bundle lacks user 'new')."""
    side = options.get("side", "a")
    answer = {"user_id": "u", "items": [{"item_id": f"{side}{i}", "ranking_score": 1.0 - i / 10} for i in range(6)]}
    return [UnknownId("user 'new'") if side == "b" and users[p] == "new" else dict(answer) for p in places], {}, "v1"


users = ["u1", "u2", "u3", "new"]


def test_a_swap_from_another_experiment_moves_the_interleaved_teams_with_their_items():
    """Exploration (one experiment) reorders an interleaved list (another): each item keeps the team that placed
    it, or a click on a swapped item is credited to the team that did not."""
    plans = [Plan({"inter": "a+b", "explore": "on"}, {"explore": 1.0}, ("inter", {"side": "a"}, {"side": "b"})) for _ in users]
    for _ in range(20):
        served = serve(users, plans, 6, _two_rankings)
        for record in served.impressions[:3]:
            assert record["ranks"] != [1, 2, 3, 4, 5, 6]  # explore 1.0: one swap in every answer
            assert [team.lower() for team in record["teams"]] == [item[0] for item in record["items"]]
        nobody = served.impressions[3]  # B had no answer for 'new': A's list, credited to neither
        assert nobody["items"][0][0] == "a" and set(nobody["teams"]) == {"-"}


def test_interleaving_credit_by_hand():
    teams = ["A", "B", "A", "B"]
    assert credit(teams, [2]) == 1
    assert credit(teams, [1, 2]) == 0
    assert credit(teams, [1, 3, 2]) == -1
    assert credit(teams, [2, 2]) == 1  # a position clicked twice counts once
    assert credit(teams, []) == 0
    assert credit(teams, [9]) == 0  # a position the list did not have
    assert credit(["A", "-", "B", "-"], [2, 4]) == 0 and credit(["A", "-", "B"], [2, 3]) == 1  # "-": nobody's


# --------------------------------------------------------------------------- exploration
def test_a_swap_and_its_propensities_by_hand():
    class Pick(Coin):
        def randrange(self, n):
            return 0

    order, props = swap(3, 1.0, Pick(0.0))
    assert order == [1, 0, 2]
    assert props == [0.5, 0.5, 0.5]  # each of the two pairs is chosen half the time; the end item stays with 1/2
    assert swap(4, 0.0, random.Random(0)) == ([0, 1, 2, 3], [1.0] * 4)
    assert swap(1, 1.0, random.Random(0)) == ([0], [1.0])


def test_logged_propensities_match_how_often_each_placement_happens():
    rng, n, eps, draws = random.Random(1), 5, 0.3, 40_000
    seen: dict[tuple[int, int], int] = {}
    logged: dict[tuple[int, int], float] = {}
    for _ in range(draws):
        order, props = swap(n, eps, rng)
        for p, (r, q) in enumerate(zip(order, props)):
            seen[(r, p)] = seen.get((r, p), 0) + 1
            logged[(r, p)] = q
    for key, count in seen.items():
        assert abs(count / draws - logged[key]) < 0.01, key


# --------------------------------------------------------------------------- statistics
def test_wilson_interval_by_hand():
    low, high = stats.wilson(5, 10)
    assert low == pytest.approx(0.23659, abs=1e-5) and high == pytest.approx(0.76341, abs=1e-5)
    assert stats.wilson(0, 0) == (0.0, 1.0)
    assert stats.wilson(0, 20)[0] == 0.0


def test_ratio_by_hand_counts_users_not_impressions():
    e = stats.ratio(np.array([0, 1, 1]), np.array([1, 2, 3]))
    # R = 2/6; residuals c - R n = (-1/3, 1/3, 0); their variance (n - 1) = 1/9; / (3 * mean(n)^2 = 12)
    assert e.value == pytest.approx(1 / 3) and e.variance == pytest.approx(1 / 108) and e.users == 3
    assert math.isinf(stats.ratio(np.array([1]), np.array([2])).variance)


def test_the_always_valid_test_by_hand():
    t = stats.always_valid(0.1, 0.0025, 0.05, 0.05)
    # half-width sqrt(0.005 * (log 2 + 2 log 20)) ; log LR = 0.5 log 0.5 + 0.0025 * 0.01 / (2 * 0.0025 * 0.005)
    assert t.interval[1] - 0.1 == pytest.approx(math.sqrt(0.005 * (math.log(2) + 2 * math.log(20))))
    assert t.p_value == pytest.approx(math.exp(-(0.5 * math.log(0.5) + 1.0)))
    assert not t.significant
    edge = stats.always_valid(t.detectable, 0.0025, 0.05, 0.05)  # at the interval's edge the p-value is alpha
    assert edge.p_value == pytest.approx(0.05)
    assert stats.always_valid(0.5, 0.0025, 0.05, 0.05).significant


def test_the_sample_ratio_check_by_hand():
    assert stats.sample_ratio([50, 50], [0.5, 0.5]) == pytest.approx(1.0)
    assert stats.sample_ratio([60, 40], [0.5, 0.5]) == pytest.approx(0.0455, abs=1e-4)  # chi-square 4, 1 df
    assert stats.sample_ratio([5000, 4000], [0.5, 0.5]) < 1e-6


def test_the_sequential_test_keeps_its_error_rate_when_looked_at_every_day():
    """A/A: 400 simulated experiments, each read after every one of 20 'days'; stopping at the first significant
    reading must err at most alpha of the time (a fixed-horizon z-test read that way errs far more)."""
    rng = np.random.default_rng(0)
    false_alarms = naive = 0
    for _ in range(400):
        a, b = rng.binomial(1, 0.1, (2, 20, 200))  # users' clicks in each arm, day by day
        seq = fixed = False
        for day in range(1, 21):
            ea, eb = (stats.ratio(x[:day].ravel(), np.ones(day * 200)) for x in (a, b))
            seq |= stats.compare(ea, eb).significant
            fixed |= abs(eb.value - ea.value) > 1.96 * math.sqrt(ea.variance + eb.variance)
        false_alarms += seq
        naive += fixed
    assert false_alarms / 400 <= 0.05
    assert naive / 400 > 0.1  # why the sequential test is needed
