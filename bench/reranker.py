"""Re-rank stage latency on a bundle: ``ranker_features`` + ``Ranker.score`` for one request.

For each sampled user the candidates are what the service would get (user tower on the
bundle's history, HNSW top-``candidates``, history excluded); only the re-rank stage is timed,
one request per call, one thread. Prints a Markdown table (median and p95 over requests,
median of ``--repeats`` passes).

    python bench/reranker.py --bundle artifacts --users 200
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import machine  # noqa: E402
from recsys.bundle import read_bundle  # noqa: E402
from recsys.features import single_history  # noqa: E402
from recsys.rank_features import RankerTables, ranker_features  # noqa: E402
from recsys.scorer import load_ranker  # noqa: E402


def requests(bundle, users: np.ndarray, depth: int) -> list[tuple]:
    """``(history, ratings, user_cat, user_num, candidates, scores)`` per user, as the service builds them."""
    a, L = bundle.arrays, bundle.manifest["feature_spec"]["history_len"]
    out = []
    for u in users:
        lo, hi = a["history_offsets"][u], a["history_offsets"][u + 1]
        items, ratings = a["history_items"][lo:hi], a["history_ratings"][lo:hi]
        hist_items, hist_ratings = single_history(items, ratings, L)
        with torch.inference_mode():
            vec = bundle.user_tower(torch.tensor([u + 1]), torch.from_numpy(a["user_cat"][u : u + 1]),
                                    torch.from_numpy(a["user_num"][u : u + 1]), torch.from_numpy(hist_items),
                                    torch.from_numpy(hist_ratings)).numpy()
        labels, _ = bundle.index.knn_query(vec, k=min(depth + len(items), len(a["item_vectors"])))
        cands = labels[0][~np.isin(labels[0], items)][:depth].astype(np.int64)
        scores = (a["item_vectors"][cands] @ vec[0]).astype(np.float32)
        out.append((items, ratings, a["user_cat"][u], a["user_num"][u], cands, scores))
    return out


def time_stage(tables, ranker, reqs: list[tuple]) -> tuple[np.ndarray, np.ndarray]:
    """Seconds per request for the features and for the scoring, separately."""
    feats_t, score_t = [], []
    for req in reqs:
        start = time.perf_counter()
        feats = ranker_features(tables, *req)
        mid = time.perf_counter()
        ranker.score(feats)
        feats_t.append(mid - start)
        score_t.append(time.perf_counter() - mid)
    return np.array(feats_t), np.array(score_t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=Path(__file__).resolve().parent.parent / "artifacts")
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--candidates", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    bundle = read_bundle(args.bundle)
    if bundle.ranker is None:
        sys.exit(f"{args.bundle}: the bundle has no ranker")
    tables, ranker = RankerTables.from_arrays(bundle.arrays), load_ranker(bundle.ranker)
    users = np.random.default_rng(0).choice(len(bundle.arrays["user_cat"]), args.users, replace=False)
    reqs = requests(bundle, users, args.candidates)
    time_stage(tables, ranker, reqs[:20])  # warm-up
    passes = [time_stage(tables, ranker, reqs) for _ in range(args.repeats)]
    rows = []
    for i, name in enumerate(("ranker_features", f"score ({ranker.kind}, {ranker.loss})")):
        med = float(np.median([np.median(p[i]) for p in passes]) * 1e6)
        p95 = float(np.median([np.percentile(p[i], 95) for p in passes]) * 1e6)
        rows.append(f"| {name} | {med:.0f} | {p95:.0f} |")
    print(f"Machine: {machine()}; {args.users} users x {args.candidates} candidates, {len(ranker.feature_names)} features, "
          f"one thread, median of {args.repeats} passes.\n")
    print("| stage | median us/request | p95 us/request |\n|---|---|---|\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
