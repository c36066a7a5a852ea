"""Evaluation: every model through one interface, full ranking, a Markdown + JSON + plot report.

A model is anything with ``recommend(users, histories, k) -> [len(users), k] item rows``; a
``ScoringRecommender`` gets that verb from its ``score`` with the user's history excluded.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from loguru import logger

from offline.baselines import EASE, Blend, ItemKNN, Popularity, ScoringRecommender, SeqKNN
from offline.metrics import catalogue_coverage, ranking_metrics, summarize
from offline.split import TemporalSplit, history_matrix
from recsys.topk import topk_items

KS = (10, 20)
BLEND = "ease-recency + seqknn"
REPORT_COLUMNS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20", "graded_ndcg@10", "hit@10", "mrr@10", "map@10")


class Recommender(Protocol):
    name: str

    def recommend(self, users: np.ndarray, histories: list[np.ndarray], k: int) -> np.ndarray: ...


def recommend_by_score(
    model: ScoringRecommender, users: np.ndarray, histories: list[np.ndarray], k: int, batch: int = 1024
) -> np.ndarray:
    """Top-k of ``model.score`` with each user's history excluded, in user batches."""
    out = []
    for start in range(0, len(users), batch):
        hist = histories[start : start + batch]
        scores = model.score(users[start : start + batch], hist)
        out.append(topk_items(scores, k, history_matrix(hist, scores.shape[1])))
    return np.concatenate(out) if out else np.zeros((0, k), np.int64)


def evaluate(model, split: TemporalSplit, window: str = "test", ks: Sequence[int] = KS) -> dict:
    """Summary metrics of ``model`` on ``window`` for users with at least one positive there."""
    return summary_of(*evaluate_per_user(model, split, window, ks), split.n_items)


def summary_of(per_user: dict[str, np.ndarray], topk: np.ndarray, n_items: int) -> dict:
    """Means over users, catalogue coverage at the list length, and how many users were scored."""
    summary = summarize(per_user)
    summary[f"coverage@{topk.shape[1]}"] = catalogue_coverage(topk, n_items)
    summary["users"] = int(len(topk))
    return summary


def evaluate_per_user(model, split: TemporalSplit, window: str, ks: Sequence[int] = KS):
    """Per-user metric arrays (for bootstrap intervals) and the top-k lists they came from."""
    truth = split.truth(window)
    users = split.eval_users(window)
    histories = split.history_before(window)
    hist = [histories[u] for u in users]
    if isinstance(model, ScoringRecommender):
        topk = recommend_by_score(model, users, hist, max(ks))
    else:
        topk = model.recommend(users, hist, max(ks))
    return ranking_metrics(topk, truth[users], ks), topk


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """Mean of ``a - b`` over users and its percentile bootstrap interval (users resampled with replacement).

    ``a`` and ``b`` are per-user metrics of two models on the same users, so the pairing removes
    the between-user variance that would swamp a difference of two independent means.
    """
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    diff = diff[np.isfinite(diff)]
    rng = np.random.default_rng(seed)
    means = np.array([diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(resamples)])
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return {"mean": float(diff.mean()), "lo": float(lo), "hi": float(hi), "level": level, "users": int(len(diff))}


def tune(name: str, build: Callable[..., ScoringRecommender], grid: list[dict], split: TemporalSplit, metric="ndcg@10"):
    """Pick hyper-parameters on the validation window; the test window is never looked at."""
    best, best_value = grid[0], -1.0
    for params in grid:
        value = evaluate(build(**params), split, "valid")[metric]
        logger.debug("{} {} valid {}={:.4f}", name, params, metric, value)
        if value > best_value:
            best, best_value = params, value
    logger.info("{}: chose {} (valid {}={:.4f})", name, best, metric, best_value)
    return build(**best), best


def baseline_models(split: TemporalSplit) -> list[tuple[ScoringRecommender, dict]]:
    """Popularity, item-kNN, EASE (plain and recency-weighted), SeqKNN and the blend of
    recency-weighted EASE with SeqKNN, each tuned on valid (the blend's weight with its two parts'
    chosen parameters)."""
    models = [(Popularity(split), {})]
    models.append(tune("item-knn", lambda **p: ItemKNN(split, **p), [{"neighbours": n} for n in (50, 100, 200)], split))
    ease_grid = [{"l2": l2} for l2 in (50.0, 100.0, 200.0, 500.0, 1000.0)]
    ease, ease_params = tune("ease", lambda **p: EASE(split, **p), ease_grid, split)
    models.append((ease, ease_params))
    recency_grid = [{"l2": ease_params["l2"], "recency_halflife": h} for h in (2.0, 5.0, 10.0, 20.0, 50.0)]
    ease_recency, recency_params = tune("ease-recency", lambda **p: EASE(split, **p), recency_grid, split)
    models.append((ease_recency, recency_params))
    seq_grid = [{"window": w, "decay": d, "backward": b, "recency_halflife": h}
                for w in (10, 50) for d in (2.0, 10.0) for b in (0.25, 1.0) for h in (5.0, 20.0)]
    seqknn, seq_params = tune("seqknn", lambda **p: SeqKNN(split, **p), seq_grid, split)
    models.append((seqknn, seq_params))
    blend_grid = [{"weight": w} for w in (0.25, 0.5, 0.75)]
    blend, blend_params = tune(BLEND, lambda weight: Blend(ease_recency, seqknn, weight, BLEND), blend_grid, split)
    models.append((blend, {**blend_params, "ease-recency": recency_params, "seqknn": seq_params}))
    return models


def report_rows(models: list[tuple[object, dict]], split: TemporalSplit,
                window: str = "test") -> tuple[list[dict], dict[str, dict[str, np.ndarray]]]:
    """One row per model (its metrics on ``window``, its parameters, how long scoring took), and each
    model's per-user metrics, kept for paired comparisons so no model is scored twice."""
    rows, per_user = [], {}
    for model, params in models:
        start = time.perf_counter()
        per_user[model.name], topk = evaluate_per_user(model, split, window)
        metrics = summary_of(per_user[model.name], topk, split.n_items)
        rows.append({"model": model.name, "params": params, "seconds": time.perf_counter() - start, **metrics})
        logger.info("{}: {}", model.name, {k: round(metrics[k], 4) for k in ("recall@20", "ndcg@10")})
    return rows, per_user


def write_report(rows: list[dict], out_dir: Path, title: str, extra: dict | None = None) -> Path:
    """``report.md``, ``report.json`` and ``report.png`` under ``out_dir``; returns the Markdown path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps({"title": title, "rows": rows, **(extra or {})}, indent=2))
    md = out_dir / "report.md"
    md.write_text(markdown_table(rows, title, extra))
    _plot(rows, out_dir / "report.png")
    return md


def markdown_table(rows: list[dict], title: str, extra: dict | None = None) -> str:
    cols = [c for c in REPORT_COLUMNS if c in rows[0]] + [c for c in rows[0] if c.startswith("coverage")]
    lines = [f"# {title}", "", "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r['model']} | " + " | ".join(f"{r[c]:.4f}" for c in cols) + " |")
    lines += ["", "Parameters (chosen on the validation window):", ""]
    lines += [f"- {r['model']}: `{json.dumps(r['params'])}`" for r in rows]
    for key, value in (extra or {}).items():
        lines += ["", f"{key}: `{json.dumps(value)}`"]
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["model"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, metric in zip(axes, ("recall@20", "ndcg@10")):
        ax.barh(names, [r[metric] for r in rows], color="tab:blue")
        ax.set_xlabel(metric)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
