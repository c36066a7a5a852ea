"""Full-ranking top-K metrics, vectorised over users.

Conventions (stated once, used everywhere):
- ``topk`` is an int array ``[n_users, K]`` of item rows, best first, padded with -1 when a
  user has fewer than K rankable items.
- ``truth`` is a CSR matrix ``[n_users, n_items]`` of relevance grades; a grade > 0 is a
  positive. Binary metrics look only at grade > 0; graded NDCG uses gain ``2**grade - 1``.
- Users with no positive get NaN for every metric, and ``summarize`` leaves them out.
- Recall@K = hits in top-K / number of positives (not capped at K).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp


def ranking_metrics(topk: np.ndarray, truth: sp.csr_matrix, ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Per-user Recall, NDCG (binary and graded), HitRate, MRR and MAP at each K in ``ks``. MAP@K's denominator is
    min(relevant, K): a list of K hits scores 1 whatever else the user found relevant. Users without a relevant
    item get NaN (``summarize`` leaves them out)."""
    truth = sp.csr_matrix(truth, copy=True)
    grades = _grades_at(topk, truth)  # [U, K] grade of each recommended item (0 if not relevant)
    truth.eliminate_zeros()
    n_pos = np.diff(truth.indptr).astype(np.float64)
    ideal = _ideal_grades(truth, max(ks))
    has_pos = n_pos > 0
    out: dict[str, np.ndarray] = {}
    for k in ks:
        rel = grades[:, :k] > 0
        discount = 1.0 / np.log2(np.arange(2, k + 2))[: rel.shape[1]]
        hits = rel.sum(axis=1)
        idcg_bin = np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))[np.minimum(n_pos, k).astype(int) - 1]
        gain = 2.0 ** grades[:, :k] - 1.0
        idcg_graded = ((2.0 ** ideal[:, :k] - 1.0) * discount[: ideal[:, :k].shape[1]]).sum(axis=1)
        first = np.where(rel.any(axis=1), rel.argmax(axis=1) + 1, np.inf)
        precision_at_i = np.cumsum(rel, axis=1) / np.arange(1, rel.shape[1] + 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            metrics = {
                f"recall@{k}": hits / n_pos,
                f"ndcg@{k}": (rel * discount).sum(axis=1) / idcg_bin,
                f"graded_ndcg@{k}": (gain * discount).sum(axis=1) / idcg_graded,
                f"hit@{k}": (hits > 0).astype(np.float64),
                f"mrr@{k}": 1.0 / first,
                f"map@{k}": (precision_at_i * rel).sum(axis=1) / np.minimum(n_pos, k),
            }
        for name, values in metrics.items():
            out[name] = np.where(has_pos, values, np.nan)
    return out


def catalogue_coverage(topk: np.ndarray, n_items: int) -> float:
    """Share of the catalogue that appears in at least one user's list."""
    shown = np.unique(topk[topk >= 0])
    return len(shown) / n_items if n_items else 0.0


def summarize(per_user: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean over users that have at least one positive."""
    return {name: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for name, v in per_user.items()}


def _grades_at(topk: np.ndarray, truth: sp.csr_matrix) -> np.ndarray:
    """Grade of each recommended item, 0 for padding and non-relevant items."""
    grades = np.zeros(topk.shape, dtype=np.float64)
    for u in range(topk.shape[0]):
        start, end = truth.indptr[u], truth.indptr[u + 1]
        if start == end:
            continue
        lookup = dict(zip(truth.indices[start:end].tolist(), truth.data[start:end].tolist()))
        grades[u] = [lookup.get(i, 0.0) if i >= 0 else 0.0 for i in topk[u].tolist()]
    return np.clip(grades, 0.0, None)


def _ideal_grades(truth: sp.csr_matrix, k: int) -> np.ndarray:
    """Each user's K highest grades, descending, zero-padded: the ideal ranking for graded NDCG."""
    ideal = np.zeros((truth.shape[0], k), dtype=np.float64)
    for u in range(truth.shape[0]):
        row = np.sort(truth.data[truth.indptr[u] : truth.indptr[u + 1]])[::-1][:k]
        ideal[u, : len(row)] = row
    return ideal
