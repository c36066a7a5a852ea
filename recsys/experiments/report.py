"""An experiment's report, folded from what the state store retains: the impressions its users were shown
and the feedback that joined them (``recsys.impressions.join``, the rule the event route uses too).

Every replica reads the same store, so every replica reports the same numbers, whoever served the
impressions. The fold reads the retained data since the experiment started (O(retained impressions)),
so a report covers at most the impression retention; a caller caches it for a few seconds.

Per served variant: users, impressions, positive feedback ("clicks": feedback of the positive types, each
position counted once per impression), each feedback type per impression, click-through at positions
1..``positions``, the mean reciprocal rank of the first clicked position (0 for an impression without
one), engine latency. Against the control: the difference in clicks per impression with the always-valid
test of ``recsys.experiments.stats``. A split also gets the sample-ratio check on users; an interleaving,
its wins, losses and ties and the same test on B's preference.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from recsys.errors import InvalidInput
from recsys.experiments import stats
from recsys.experiments.definition import Experiment
from recsys.experiments.interleave import A, B, credit
from recsys.impressions import join
from recsys.state.protocol import Event

SRM_ALPHA = 0.001  # a sample ratio this unlikely means the split is broken, not unlucky


def feedback_type(event: Event) -> str:
    return event.type or ("rating" if event.rating is not None else "interaction")


@dataclass
class Shown:
    """One impression of the experiment and the feedback joined to it."""

    record: dict
    arm: str  # the variant (a split), or the pair's assignment (an interleaving)
    feedback: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))  # type -> positions

    def clicked(self, positive: set[str]) -> set[int]:
        return set().union(*(p for t, p in self.feedback.items() if t in positive)) if self.feedback else set()


def collect(exp: Experiment, impressions: list[dict], feedback: list[tuple[str, Event]], window_s: int) -> dict[str, Shown]:
    """This experiment's served impressions by request id, with the feedback that joins each."""
    shown = {r["request_id"]: Shown(r, r["assignments"][exp.name]) for r in impressions
             if r.get("shadow") is None and exp.name in r.get("assignments", {}) and r["ts_ms"] >= exp.started_ms}
    for user, event in feedback:
        s = shown.get(event.request_id)
        if s is None:
            continue
        try:
            joined = join(s.record, user, event.item_id, event.position, event.timestamp, window_s)
        except InvalidInput:
            continue
        if joined.position is not None:
            s.feedback[feedback_type(event)].add(joined.position)
    return shown


def report(exp: Experiment, impressions: list[dict], feedback: list[tuple[str, Event]], positive: set[str],
           window_s: int, positions: int = 10) -> dict:
    shown = collect(exp, impressions, feedback, window_s)
    out = {"name": exp.name, "mode": exp.mode, "started_ms": exp.started_ms, "alpha": exp.alpha,
           "positive_types": sorted(positive), "definition": exp.to_record(),
           "test": "vs_control and preference_b: mixture sequential probability ratio test (always valid: read it as "
                   "often as you like), on per-user sums (delta method)",
           "intervals": "a variant's ctr and mrr intervals: fixed-horizon normal 95% (1 - alpha), a summary not to stop "
                        "on; vs_control and preference_b intervals: always valid",
           "shadows": _shadows(exp, impressions)}
    if exp.mode == "interleave":
        out["interleave"] = _interleave(exp, shown.values(), positive)
        variants = [_variant(exp, exp.served[0].name + "+" + exp.served[1].name, shown.values(), positive, positions)]
        del variants[0]["_estimate"]
        out["variants"] = variants
        return out
    variants = [_variant(exp, v.name, shown.values(), positive, positions) for v in exp.served]
    control = variants[0]
    for v in variants[1:]:
        v["vs_control"] = _test(stats.compare(control["_estimate"], v["_estimate"], exp.alpha))
    for v in variants:
        del v["_estimate"]
    observed, shares = [v["users"] for v in variants], [v.share for v in exp.served]
    p = stats.sample_ratio(observed, shares)
    out["sample_ratio"] = {"users": observed, "expected_shares": shares, "p_value": p, "mismatch": p < SRM_ALPHA,
                           "test": f"Pearson chi-square on users per variant; mismatch below p = {SRM_ALPHA}"}
    out["variants"] = variants
    return out


def _variant(exp: Experiment, arm: str, shown, positive: set[str], positions: int) -> dict:
    mine = [s for s in shown if s.arm == arm]
    by_user: dict[str, list[Shown]] = defaultdict(list)
    for s in mine:
        by_user[s.record["user_id"]].append(s)
    users = list(by_user)
    n = np.array([len(by_user[u]) for u in users], float)
    clicks = np.array([sum(len(s.clicked(positive)) for s in by_user[u]) for u in users], float)
    rr = np.array([sum(1 / min(c) if (c := s.clicked(positive)) else 0.0 for s in by_user[u]) for u in users], float)
    ctr = stats.ratio(clicks, n)
    types = sorted({t for s in mine for t in s.feedback})
    at = np.zeros(positions)
    for s in mine:
        for p in s.clicked(positive):
            if p <= positions:
                at[p - 1] += 1
    latency = [s.record["latency_ms"] for s in mine if s.record.get("latency_ms") is not None]
    mrr = stats.ratio(rr, n)
    variant = exp.variant(arm)
    out = {"name": arm, "share": None if variant is None else variant.share,
           "options": {} if variant is None else variant.options(),
           "users": len(users), "impressions": len(mine), "clicks": int(clicks.sum()),
           "ctr": _estimate(ctr, exp.alpha),
           "feedback_per_impression": {t: sum(len(s.feedback.get(t, ())) for s in mine) / max(len(mine), 1) for t in types},
           "ctr_at": [round(float(x) / max(len(mine), 1), 6) for x in at],
           "mrr": _estimate(mrr, exp.alpha),
           "latency_ms": {"p50": float(np.percentile(latency, 50)), "p95": float(np.percentile(latency, 95))} if latency else None,
           "_estimate": ctr}
    return out


def _interleave(exp: Experiment, shown, positive: set[str]) -> dict:
    """Each impression is won by the team whose items took more of its clicks; B's preference is
    ``(B's wins - A's wins) / impressions`` over users (delta method), tested against 0. An impression with no
    position credited to either team (one side had no answer for the user) judges nothing and is not counted."""
    a, b = exp.served
    wins: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # user -> [impressions, A wins, B wins]
    for s in shown:
        teams = s.record.get("teams") or []
        if A not in teams and B not in teams:  # one side could not answer (B's bundle lacks the user): no judgement
            continue
        w = wins[s.record["user_id"]]
        w[0] += 1
        outcome = credit(teams, sorted(s.clicked(positive)))
        if outcome < 0:
            w[1] += 1
        elif outcome > 0:
            w[2] += 1
    counts = np.array(list(wins.values()), float).reshape(-1, 3)
    pref = stats.ratio(counts[:, 2] - counts[:, 1], counts[:, 0])
    decisive = stats.ratio(counts[:, 1] + counts[:, 2], counts[:, 0])
    test = stats.always_valid(pref.value, pref.variance, stats.MIXING_EFFECT * max(decisive.value, 1e-9), exp.alpha)
    return {"a": a.name, "b": b.name, "users": len(counts), "impressions": int(counts[:, 0].sum()),
            "wins_a": int(counts[:, 1].sum()), "wins_b": int(counts[:, 2].sum()),
            "ties": int(counts[:, 0].sum() - counts[:, 1].sum() - counts[:, 2].sum()),
            "preference_b": _test(test)}


def _shadows(exp: Experiment, impressions: list[dict]) -> list[dict]:
    """Per shadow variant: lists computed, their overlap with what the same request served, latency."""
    if not exp.shadows:
        return []
    served = {r["request_id"]: r for r in impressions if r.get("shadow") is None}
    out = []
    for v in exp.shadows:
        mine = [r for r in impressions if r.get("shadow") == f"{exp.name}/{v.name}" and r["ts_ms"] >= exp.started_ms]
        overlaps = [len(set(r["items"]) & set(served[r["of"]]["items"])) / max(len(r["items"]), 1)
                    for r in mine if r.get("of") in served]
        latency = [r["latency_ms"] for r in mine if r.get("latency_ms") is not None]
        out.append({"name": v.name, "computed": len(mine), "overlap_with_served": float(np.mean(overlaps)) if overlaps else None,
                    "latency_ms_p50": float(np.median(latency)) if latency else None})
    return out


def _estimate(e: stats.Estimate, alpha: float) -> dict:
    low, high = e.interval(alpha)
    return {"value": e.value, "interval": [_finite(low), _finite(high)]}


def _test(t: stats.Test) -> dict:
    return {"difference": t.difference, "interval": [_finite(t.interval[0]), _finite(t.interval[1])],
            "p_value": t.p_value, "significant": t.significant, "detectable": _finite(t.detectable)}


def _finite(x: float) -> float | None:
    return None if not np.isfinite(x) else float(x)
