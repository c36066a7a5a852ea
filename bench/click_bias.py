"""Learning from clicks where the truth is known: the re-ranker trained five ways on the clicks that simulated
users with planted tastes and a position-based examination gave the running service, each scored by the true
NDCG@10 of the lists it would serve.

Per seed (``--seeds``; the seed is the synthetic data's, the training's and the traffic's):

1. the logging policy: a bundle trained on ``generate(USERS, ITEMS, seed)`` (two-tower 3 epochs, lambdarank MLP
   ranker, no refit) is served (``uvicorn service.app:app``, file state) with one experiment: half the users
   in a variant whose answers get one random adjacent swap (``explore: 1.0``), half in control;
2. ``--impressions`` answers to random users (``bench.simulate.Traffic``), clicked by the position-based model
   of ``bench.simulate.Users``: position p is examined with probability ``(1/p)^eta`` (the true propensities),
   an examined item clicked with probability ``sigmoid((rel - c) / temp)``, ``rel`` the planted relevance;
3. the trainer's path of ``train --impressions``: the logged events merged into the data, one two-tower trained
   on it (shared by every variant, so only the ranker differs), and the ranker trained (a) on the valid
   window's ratings only, as today; (b) on naive clicks (a clicked item above every candidate not clicked);
   (c) on exposure pairs (clicked above shown-and-not-clicked) unweighted; (d) weighted by the propensities
   estimated from the logged swaps; (e) weighted by the true ``(1/p)^eta``; (b)-(e) learn from clicks alone,
   and (d) with the valid window's rating queries alongside (``--clicks-ratings``);
4. each ranker re-ranks every user's candidates for the whole history (what a ``--no-refit`` bundle with that
   ranker serves: the same tower, index, features and scorer), and the top 10 is scored against the planted
   relevance: NDCG@10 with gain ``max(rel, 0)`` and the best 10 items of the catalogue as the ideal.

The truth is used to click and to score, never shown to a model. Intervals: per seed, a 95% paired bootstrap
over users of each variant minus (a); over seeds, mean and range. Writes the "click-bias" section of
docs/evaluation.md.

    python -m bench.click_bias                        # 3 seeds, 2000x500, 15000 impressions each (~40 minutes)
    python -m bench.click_bias --tiny --docs /tmp/x   # smoke size
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.report import add_docs_option, machine, update_section
from bench.simulate import K, Admin, Traffic, Users, add_click_model_options, service, settle, train
from offline.clicks import ClickConfig, load_clicks
from offline.evaluate import paired_bootstrap
from offline.events import merge_events
from offline.pipeline import IndexConfig, Recall
from offline.ranker import RankerConfig
from offline.split import temporal_split
from offline.synthetic import generate
from offline.train_ranker import MergedCandidates, RerankRecommender, train_rankers
from offline.train_recall import RecallConfig, deterministic_torch, train_two_tower
from recsys.scorer import load_ranker
from recsys.state.open import read_impressions, read_source
from service.client import Variant

EVALUATION = "evaluation.md"
EXPLORE = [Variant("control", share=0.5), Variant("explore", share=0.5, explore=1.0)]
VARIANTS = {  # name -> the click options (None: ratings only, today's ranker)
    "(a) ratings only": None,
    "(b) naive clicks": dict(pairs="naive", propensities="none"),
    "(c) exposure pairs, unweighted": dict(pairs="exposure", propensities="none"),
    "(d) exposure pairs, estimated propensities": dict(pairs="exposure", propensities="estimated"),
    "(e) exposure pairs, true propensities": dict(pairs="exposure", propensities="true"),
    "(d) + the rating queries (--clicks-ratings)": dict(pairs="exposure", propensities="estimated", ratings=True),
}


def run_seed(seed: int, args: argparse.Namespace, n_users: int, n_items: int, tmp: Path) -> dict:
    """One seed: log clicks on the served policy, then train and score every variant."""
    bundle = tmp / "bundle"
    train(bundle, n_users, n_items, seed, args.tiny)
    users = Users(n_users, n_items, seed, args.eta, args.c, args.temp)
    t0 = time.monotonic()
    with service(bundle, tmp, tmp / "service.log") as url:
        Admin(url).put("explore", EXPLORE)
        traffic = Traffic(url, users, seed, args.threads)
        try:
            traffic.drive(0, 0, args.impressions)
        finally:
            traffic.close()
        settle()
    counts = dict(traffic.counts)
    print(f"seed {seed}: {counts} in {time.monotonic() - t0:.0f} s", flush=True)
    return score_variants(seed, args, users, tmp / "state", counts)


def score_variants(seed: int, args: argparse.Namespace, users: Users, state: Path, counts: dict) -> dict:
    logged = read_source(str(state))
    impressions = read_impressions(str(state))
    ds = merge_events(generate(n_users=users.n_users, n_items=users.rel.shape[1], seed=seed), logged)[0]
    split = temporal_split(ds.interactions, ds.n_users, ds.n_items, 0.1, 0.1, 0)
    recall_cfg = RecallConfig(epochs=1 if args.tiny else 3, seed=seed, threads=2)
    index_cfg = IndexConfig()
    ranker_cfg = RankerConfig(losses="lambdarank", lambdamart=False, epochs=2 if args.tiny else 10, seed=seed)
    true = ",".join(f"{t:.6g}" for t in users.exam)
    with deterministic_torch(recall_cfg.threads):
        model, tables, _ = train_two_tower(ds, split, recall_cfg, state.parent / "run")
        ctx = Recall.build(ds, split, tables, model, index_cfg, seed).context(tables, index_cfg)
        every = np.arange(ds.n_users)
        serving = split.history_before("serve")
        histories = [serving[u] for u in every]
        scores = {"recall order (no ranker)": _true_ndcg(users, MergedCandidates(ctx).recommend(every, histories, K))}
        estimated = None
        for name, options in VARIANTS.items():
            clicks = None
            if options is not None:
                cfg = ClickConfig(**{"ratings": False, **options,
                                     "propensities": true if options["propensities"] == "true" else options["propensities"]})
                clicks = load_clicks(impressions, logged.events, ds, cfg)
                if options["propensities"] == "estimated":
                    estimated = clicks.propensities.as_dict()
                counts["impressions with a click"] = clicks.counts.get("impressions with a click", 0)
            ranking = train_rankers(ctx, split, ranker_cfg, clicks)
            ranker = RerankRecommender(ctx, load_ranker(ranking.default_state), name)
            scores[name] = _true_ndcg(users, ranker.recommend(every, histories, K))
            print(f"seed {seed} {name}: true ndcg@10 {np.mean(scores[name]):.4f}", flush=True)
    return {"seed": seed, "scores": scores, "estimated": estimated, "true": [float(t) for t in users.exam], "counts": counts}


def _true_ndcg(users: Users, lists: np.ndarray) -> np.ndarray:
    """Each user's true NDCG@10 of the list (gain max(rel, 0), the catalogue's best 10 as the ideal)."""
    return np.array([users.score(u, [int(i) for i in row if i >= 0])[0] for u, row in enumerate(lists)])


def write(results: list[dict], args: argparse.Namespace, size: str, seconds: float) -> str:
    names = list(results[0]["scores"])
    base = "(a) ratings only"
    rows = []
    for name in names:
        means = [float(np.mean(r["scores"][name])) for r in results]
        diffs = [paired_bootstrap(r["scores"][name], r["scores"][base]) for r in results] if name != base else []
        cells = " / ".join(f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]" for d in diffs) if diffs else "-"
        rows.append(f"| {name} | {np.mean(means):.4f} ({min(means):.4f}-{max(means):.4f}) | {cells} |")
    c_vs_d = [paired_bootstrap(r["scores"]["(d) exposure pairs, estimated propensities"],
                               r["scores"]["(c) exposure pairs, unweighted"]) for r in results]
    props = []
    for r in results:
        est = r["estimated"]
        cells = " | ".join(f"{t:.2f} [{lo:.2f}, {hi:.2f}]" for t, lo, hi in zip(est["theta"], est["lo"], est["hi"]))
        props.append(f"| seed {r['seed']} estimated | {cells} |")
    k = len(results[0]["true"])
    true = " | ".join(f"{t:.2f}" for t in results[0]["true"])
    counts = "; ".join(f"seed {r['seed']}: {r['counts'].get('impressions', 0)} impressions, {r['counts'].get('clicks', 0)} "
                       f"clicks, {r['counts'].get('impressions with a click', 0)} impressions with a click" for r in results)
    return f"""## Learning from clicks without position bias (simulator, {len(results)} seeds)

Written by `python -m bench.click_bias{' --tiny' if args.tiny else ''}` on {machine()}, {seconds / 60:.0f} minutes.
Synthetic {size} (each seed its own data, training and traffic); simulated users click on what the service
serves under a position-based model: position p examined with probability (1/p)^{args.eta:g}, an examined item
clicked with probability sigmoid((rel - {args.c:g}) / {args.temp:g}) of its planted relevance. Half the users'
answers get one random adjacent swap (`explore: 1.0`). Traffic: {counts}.
Every variant re-ranks the same two-tower's candidates (trained on the data plus the logged events); (b)-(e)
learn from clicks alone (the default of `--impressions`); the last row is (d) with the rating queries alongside. Scored by the true NDCG@10 (gain max(rel, 0), the catalogue's best 10 as the ideal) of
each user's served top 10, over all users.

| ranker trained on | true NDCG@10, mean over seeds (range) | minus (a), per seed: mean [95% paired bootstrap CI] |
|---|---|---|
{chr(10).join(rows)}

(d) minus (c) per seed: {" / ".join(f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]" for d in c_vs_d)}.

Examination propensities estimated from the logged swaps (relative to position 1, 95% interval) against the truth:

| | {" | ".join(f"p{p + 1}" for p in range(k))} |
|---|{"---|" * k}
| true | {true} |
{chr(10).join(props)}
"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", default=None, help="USERSxITEMS (default 2000x500; tiny 300x120)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; tiny 0)")
    p.add_argument("--impressions", type=int, default=None, help="simulated answers per seed (default 15000; tiny 600)")
    add_click_model_options(p, c=0.5)  # more clicks per answer than the A/B study's 0.75: more to learn from
    p.add_argument("--tiny", action="store_true", help="smoke size")
    p.add_argument("--no-write", action="store_true", help="print only")
    add_docs_option(p)
    args = p.parse_args(argv)
    size = args.synthetic or ("300x120" if args.tiny else "2000x500")
    n_users, n_items = (int(x) for x in size.lower().split("x"))
    args.impressions = args.impressions or (600 if args.tiny else 15_000)
    seeds = [int(s) for s in (args.seeds or ("0" if args.tiny else "0,1,2")).split(",")]
    started = time.monotonic()
    results = []
    for seed in seeds:
        with tempfile.TemporaryDirectory(prefix="click-bias-") as tmp:
            results.append(run_seed(seed, args, n_users, n_items, Path(tmp)))
    body = write(results, args, size, time.monotonic() - started)
    print(body)
    if not args.no_write:
        path = args.docs / EVALUATION
        update_section("click-bias", body, path)
        print(f"wrote the click-bias section of {path}")


if __name__ == "__main__":
    main()
