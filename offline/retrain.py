"""``python -m offline retrain``: train a candidate on the data plus the recorded events, score it and the
incumbent (what ``current`` names) on the same freshest window, and promote the candidate unless a paired
test over users says it is worse with confidence (``offline.gate``).

Both bundles are scored through the serving code path (``recsys.engine.engine.Engine``'s batch path, what
``POST /recommend/batch`` runs), so the comparison is of what would be served: each user's history before the window (train + valid, with ratings) is handed to
the engine as the user's online history, over a bundle whose own stored histories are set aside (they
include the window). The freshest window is each user's latest ``test_frac`` of interactions, which the
candidate's training holds out (temporal split); the incumbent may have seen part of it, which can only
favour the incumbent, never the candidate.

A bundle refit on every interaction (the default) has trained on that window, so each side is scored by
its holdout twin (``bundle.holdout_path``): the same training without each user's latest window. The
window of the new data starts no earlier than the incumbent's held-out window did, so neither twin has
seen it, and both are judged by the same rule their served bundles were built by.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
from loguru import logger

from offline.evaluate import evaluate_per_user
from offline.gate import GATED, Decision, GateConfig, gate
from offline.metrics import summarize
from offline.split import TemporalSplit, concat_windows
from recsys.bundle import holdout_path, read_bundle, set_current
from recsys.dataset import Dataset
from recsys.engine.engine import Engine
from recsys.errors import RecsysError
from recsys.query import RecommendOptions
from recsys.state.protocol import Event

BATCH = 1000  # users per engine pass


class ServedBundle:
    """A bundle as the service serves it, answering the evaluation's ``recommend(users, histories, k)`` through
    the engine's batch path (one tower call, one ANN query per search beam and one ranker pass per ``BATCH`` users)."""

    def __init__(self, path: Path, ds: Dataset, split: TemporalSplit, candidates: int, catalog: dict[str, dict | None]):
        bundle = read_bundle(path)
        n_users = len(bundle.catalog["user_ids"])
        bundle.arrays.update(history_offsets=np.zeros(n_users + 1, np.int64), history_items=np.zeros(0, np.int64),
                             history_ratings=np.zeros(0, np.float32), history_timestamps=np.zeros(0, np.int64))
        self.engine = Engine.from_bundle(bundle, cache_size=0)
        self.engine.changes.load(catalog)  # as a replica on that store would serve it: online items included
        self.engine.history = self._history
        self.ds, self.candidates, self.version = ds, candidates, bundle.version
        self._events = _histories_before_test(ds, split)

    def _history(self, raw_user: str, after=None) -> tuple[int, list[Event]]:
        events = self._events.get(raw_user, [])
        return len(events), events

    def recommend(self, users: np.ndarray, histories: list[np.ndarray], k: int) -> np.ndarray:
        """Item rows of ``ds`` per user row (-1 padded); a user the engine refuses (no history before the window
        and unknown to this bundle) gets none. Ids are converted at this edge only."""
        out = np.full((len(users), k), -1, np.int64)
        opts = RecommendOptions(k=k)
        for start in range(0, len(users), BATCH):
            chunk = [self.ds.user_ids[u] for u in users[start : start + BATCH]]
            batch = self.engine.recommend_batch(chunk, opts, self.candidates)
            for n, answer in enumerate(batch.answers, start=start):
                if isinstance(answer, RecsysError):
                    continue
                rows = [self.ds.item_row(it["item_id"]) for it in answer["items"]]
                out[n, : len(rows)] = [-1 if r is None else r for r in rows]
        return out


def _histories_before_test(ds: Dataset, split: TemporalSplit) -> dict[str, list[Event]]:
    """Each user's train + valid interactions, oldest first, as the events a service would hold."""
    inter = concat_windows([split.train, split.valid]).sorted_by_user_time()
    out: dict[str, list[Event]] = {}
    for user, item, rating, ts in zip(inter.user.tolist(), inter.item.tolist(), inter.rating.tolist(), inter.timestamp.tolist()):
        out.setdefault(ds.user_ids[user], []).append(Event(ds.item_ids[item], rating, ts))
    return out


def served_metrics(path: Path, ds: Dataset, split: TemporalSplit, candidates: int,
                   catalog: dict[str, dict | None]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The bundle's means on the window and its per-user values of the gated metrics (same users, same order
    for every bundle scored on ``split``)."""
    per_user, _ = evaluate_per_user(ServedBundle(path, ds, split, candidates, catalog), split, "test", ks=(10, 20))
    summary = summarize(per_user)
    means = {m: float(summary[m]) for m in (*GATED, "recall@10", "ndcg@20")}
    return means | {"users": int(np.sum(~np.isnan(per_user["recall@20"])))}, {m: per_user[m] for m in GATED}


def compare_and_promote(root: Path, incumbent: Path, candidate: Path, ds: Dataset, split: TemporalSplit,
                        config: GateConfig, candidates: int, catalog: dict[str, dict | None]) -> Decision:
    """Score both (each with the store's catalogue changes applied, as served), decide, move ``current`` only
    on promotion, and write the comparison into the report."""
    scored = {"incumbent": holdout_path(incumbent), "candidate": holdout_path(candidate)}
    scores, per_user = {}, {}
    for side, path in scored.items():
        scores[side], per_user[side] = served_metrics(path, ds, split, candidates, catalog)
    decision = gate(per_user["candidate"], per_user["incumbent"], config)
    if decision.promote:
        set_current(root, candidate.name)
    report = {"incumbent": incumbent.name, "candidate": candidate.name, "window": "each user's latest test_frac",
              "scored": {side: str(path.relative_to(root)) for side, path in scored.items()},
              "gate": {"test": "one-sided paired t-test over users per metric, Bonferroni over the gated metrics",
                       **asdict(config), "metrics": [t.as_dict() for t in decision.tests]},
              "scores": scores, "promoted": decision.promote, "reason": decision.reason}
    out = root / "reports" / candidate.name
    out.mkdir(parents=True, exist_ok=True)
    (out / "retrain.json").write_text(json.dumps(report, indent=2))
    (out / "retrain.md").write_text(_markdown(report, decision, config))
    logger.info("retrain: {} ({})", "promoted " + candidate.name if decision.promote else "kept " + incumbent.name, decision.reason)
    return decision


def _markdown(report: dict, decision: Decision, config: GateConfig) -> str:
    scores = report["scores"]
    rows = "\n".join(f"| {side} ({report['scored'][side]}) | {s['recall@20']:.4f} | {s['ndcg@10']:.4f} | {s['users']} |"
                      for side, s in scores.items())
    tests = "\n".join(f"| {t.metric} | {t.mean:+.4f} | [{t.lo:+.4f}, {t.hi:+.4f}] ({t.level:.1%}) | {t.p_value:.3g} | "
                       f"{t.detectable:.4f} | {t.users} |" for t in decision.tests)
    return (f"# Retrain: {'promoted' if decision.promote else 'kept the incumbent'}\n\n"
            f"| bundle scored | Recall@20 | NDCG@10 | users |\n|---|---|---|---|\n{rows}\n\n"
            "Candidate minus incumbent, per user (one-sided paired t-test per metric, the confidence shared by "
            f"the metrics; margin {config.margin:g}):\n\n"
            "| metric | mean difference | interval | p (H0: not worse) | smallest drop detected "
            f"({config.power:.0%} power) | users |\n|---|---|---|---|---|---|\n{tests}\n\n"
            f"{decision.reason}. A bundle refit on every interaction is scored by its holdout twin, which did not "
            "train on the window.\n")
