"""How small a loss the promotion gate catches: two bundles trained the same way with different seeds (equally
good models) are scored by the retrain path on the freshest window, and the gate is run on them as they are
and on candidates degraded by a known amount.

The gate (offline/gate.py) is a one-sided paired t-test per metric over the window's users. Here:

- equal: the seed-B bundle as candidate against seed A: the gate's interval, p-value and the smallest drop
  the window detects with 80% power (``(t + z) * sd / sqrt(n)``);
- planted drops: for a random share of users, the candidate's list is replaced by its own items 21-40 (a
  real, worse list from the same model); the true drop is the mean over all users of what that costs, and the
  gate's power is the share of 400 bootstrap resamples of the users in which it refuses the candidate;
- the old fixed tolerance (refuse when a mean drops by more than 0.005) on the same resamples, for comparison.

    python -m bench.gate_power                                   # trains MovieLens seeds 0 and 1 (~15 minutes)
    python -m bench.gate_power --bundles artifacts/A artifacts/B   # two bundles trained on the same data
    python -m bench.gate_power --bundles A B --synthetic 120x150 --data-seed 3   # bundles trained on that data
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.report import add_docs_option, machine, update_section
from offline.gate import GATED, GateConfig, gate
from offline.metrics import ranking_metrics
from offline.retrain import ServedBundle
from offline.split import temporal_split
from recsys.bundle import holdout_path
from recsys.experiments.stats import wilson

ROOT = Path(__file__).resolve().parent.parent
EVALUATION = "evaluation.md"
SHARES = (0.0, 0.02, 0.05, 0.1, 0.2)
RESAMPLES = 400
OLD_TOLERANCE = 0.005


def train(out: Path, seed: int) -> Path:
    """A MovieLens bundle with the default pipeline (the seed changes the training only, not the data)."""
    cmd = [sys.executable, "-m", "offline", "train", "--seed", str(seed), "--out", str(out), "--skip-baselines"]
    print("training:", " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed:\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().rsplit(" ", 1)[-1])


def lists(path: Path, ds, split) -> np.ndarray:
    """The bundle's top 40 for every test-window user, as the retrain path serves them."""
    served = ServedBundle(holdout_path(path), ds, split, 200, {})
    users = split.eval_users("test")
    histories = split.history_before("test")
    return served.recommend(users, [histories[u] for u in users], 40)


def metrics(topk: np.ndarray, truth) -> dict[str, np.ndarray]:
    got = ranking_metrics(topk[:, :20], truth, (10, 20))
    return {m: got[m] for m in GATED}


def degrade(topk: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """``share`` of the users get the list's items 21-40 in place of 1-20."""
    out = topk.copy()
    chosen = rng.random(len(topk)) < share
    out[chosen, :20] = topk[chosen, 20:40]
    return out


def study(incumbent: np.ndarray, candidate: np.ndarray, truth, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    base = metrics(incumbent, truth)
    rows = []
    for share in SHARES:
        cand = metrics(degrade(candidate, share, rng), truth)
        whole = gate(cand, base)
        power, old = refusals(cand, base, rng)
        rows.append({"share": share, "tests": whole.tests, "promoted": whole.promote, "power": power, "old": old})
    return rows


def null_refusals(incumbent: np.ndarray, candidate: np.ndarray, truth, seed: int = 1) -> tuple[float, float]:
    """How often a truly equal candidate is refused, by the gate and by the old tolerance: the per-user differences
    of the two models are centred on zero (the window's spread, no true difference) and the users resampled."""
    base, cand = metrics(incumbent, truth), metrics(candidate, truth)
    centred = {m: cand[m] - np.nanmean(cand[m] - base[m]) for m in GATED}
    return refusals(centred, base, np.random.default_rng(seed))


def refusals(cand: dict, base: dict, rng: np.random.Generator) -> tuple[float, float]:
    """Shares of ``RESAMPLES`` bootstrap resamples of the users in which the gate, and the old tolerance, refuse."""
    users = len(base["ndcg@10"])
    refused = old = 0
    for _ in range(RESAMPLES):
        pick = rng.integers(0, users, users)
        sub_c, sub_b = ({m: v[pick] for m, v in d.items()} for d in (cand, base))
        refused += not gate(sub_c, sub_b).promote
        old += any(np.nanmean(sub_c[m]) < np.nanmean(sub_b[m]) - OLD_TOLERANCE for m in GATED)
    return refused / RESAMPLES, old / RESAMPLES


def write(rows: list[dict], null: tuple[float, float], name: str, users: int, seconds: float) -> str:
    def cell(t) -> str:
        return f"{t.mean:+.4f} [{t.lo:+.4f}, {t.hi:+.4f}]"

    equal = rows[0]["tests"]
    lines = [f"| {r['share']:.0%} | {cell(r['tests'][0])} | {cell(r['tests'][1])} | "
             f"{'promoted' if r['promoted'] else 'refused'} | {r['power']:.0%} | {r['old']:.0%} |" for r in rows]
    cfg = GateConfig()
    return f"""## The promotion gate's power ({name})

Written by `python -m bench.gate_power` on {machine()}, {seconds:.0f} s. Two bundles trained the same way
with seeds A and B (equally good models), each scored by its holdout twin through the retrain path on the freshest
window ({users} users). The gate: a one-sided paired t-test per metric over users, {cfg.confidence:.0%} confidence
shared by NDCG@10 and Recall@20 (each at {(1 - cfg.confidence) / 2:.1%} one-sided).

With the two equal models, this window detects (80% power) a drop of **{equal[0].detectable:.4f} NDCG@10** and
**{equal[1].detectable:.4f} Recall@20**: a smaller loss passes unnoticed, a larger one is refused at least 80% of the
time. A truly equal candidate (the two models' per-user differences centred on zero, users resampled {RESAMPLES}
times) is refused **{null[0]:.1%}** of the time by the gate ({_wilson(null[0])}; at most {1 - cfg.confidence:.0%} by
construction, the bootstrap of a t-test runs slightly over) and **{null[1]:.1%}** by the old rule ({_wilson(null[1])};
refuse when either mean drops by more than {OLD_TOLERANCE}).

Planted drops: for a share of users the candidate (B) serves its own items 21-40 instead of 1-20. Power = share of
{RESAMPLES} bootstrap resamples of the users in which the gate refuses the candidate; beside it the old rule on the
same resamples. Resampling treats this window's users as the population, so the 0% row is the power against B's
own observed difference from A, not a false-alarm rate (that is the sentence above).

| users degraded | NDCG@10, B minus A [CI] | Recall@20, B minus A [CI] | gate on the window | gate refuses (resamples) | old tolerance refuses |
|---|---|---|---|---|---|
{chr(10).join(lines)}
"""


def _wilson(rate: float) -> str:
    lo, hi = wilson(round(rate * RESAMPLES), RESAMPLES)
    return f"Wilson 95% [{lo:.1%}, {hi:.1%}]"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundles", nargs=2, type=Path, metavar=("A", "B"), help="two bundles trained on the same data")
    p.add_argument("--synthetic", help="USERSxITEMS: the bundles were trained on synthetic data (needs --bundles)")
    p.add_argument("--data-seed", type=int, default=0, help="the seed their synthetic data was generated with")
    p.add_argument("--no-write", action="store_true")
    add_docs_option(p)
    args = p.parse_args(argv)
    from offline import data, synthetic

    if args.synthetic:
        if not args.bundles:
            p.error("--synthetic needs --bundles: train's --seed seeds the synthetic data too, so two seeds are two data sets")
        n_users, n_items = (int(x) for x in args.synthetic.split("x"))
        ds, name = synthetic.generate(n_users=n_users, n_items=n_items, seed=args.data_seed), f"synthetic {args.synthetic}"
    else:
        ds, name = data.load_movielens(None), "MovieLens-100K"
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gate-power-") as tmp:
        bundles = args.bundles or [train(Path(tmp), seed) for seed in (0, 1)]
        split = temporal_split(ds.interactions, ds.n_users, ds.n_items, 0.1, 0.1, 0)
        incumbent, candidate = (lists(b, ds, split) for b in bundles)
    truth = split.truth("test")[split.eval_users("test")]
    rows = study(incumbent, candidate, truth)
    body = write(rows, null_refusals(incumbent, candidate, truth), name, len(incumbent), time.monotonic() - started)
    print(body)
    if not args.no_write:
        update_section("gate-power", body, args.docs / EVALUATION)


if __name__ == "__main__":
    main()
