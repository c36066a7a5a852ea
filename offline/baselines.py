"""Non-neural peers: popularity, item-kNN (cosine) and EASE (plain and recency-weighted).

They answer the same interface as the two-tower model (``score(users, histories)``), so the
evaluation, exclusion of seen items and reporting are one mechanism for all of them.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from offline.split import TemporalSplit, history_matrix


class ScoringRecommender:
    """A model that scores every item for a user given the user's ordered history."""

    name = "model"

    def score(self, users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:  # [len(users), n_items]
        raise NotImplementedError


class Popularity(ScoringRecommender):
    """Interaction counts in train: the floor every personalised model must clear."""

    name = "popularity"

    def __init__(self, split: TemporalSplit):
        self.counts = np.bincount(split.train.item, minlength=split.n_items).astype(np.float32)

    def score(self, users, histories):
        return np.tile(self.counts, (len(users), 1))


class ItemKNN(ScoringRecommender):
    """Cosine item-item similarity on the binary train matrix, top-``neighbours`` per item."""

    name = "item-knn"

    def __init__(self, split: TemporalSplit, neighbours: int = 100):
        x = history_matrix(split.history_before("valid"), split.n_items)
        norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=0))).ravel()
        norms[norms == 0] = 1.0
        sim = (x.T @ x).toarray() / np.outer(norms, norms)
        np.fill_diagonal(sim, 0.0)
        if neighbours < split.n_items:
            cut = np.partition(sim, -neighbours, axis=1)[:, -neighbours][:, None]
            sim[sim < cut] = 0.0
        self.sim = sim.astype(np.float32)

    def score(self, users, histories):
        return np.asarray(history_matrix(histories, self.sim.shape[0]) @ self.sim)


class EASE(ScoringRecommender):
    """Steck (2019): closed-form item-item weights ``B = I - P diagMat(1/diag(P))``, ``P = (X'X + l2 I)^-1``.

    With ``recency_halflife`` set, a user's history items are weighted by
    ``exp(-position_from_end / halflife)`` at scoring time: on a temporal split the most recent
    items carry most of the signal.
    """

    def __init__(self, split: TemporalSplit, l2: float = 200.0, recency_halflife: float | None = None):
        self.weights = ease_weights(history_matrix(split.history_before("valid"), split.n_items), l2)
        self.recency_halflife = recency_halflife
        self.name = "ease" if recency_halflife is None else "ease-recency"

    def score(self, users, histories):
        weights = [recency_weights(len(h), self.recency_halflife) for h in histories]
        return np.asarray(history_matrix(histories, self.weights.shape[0], weights) @ self.weights)


def ease_weights(x: sp.csr_matrix, l2: float) -> np.ndarray:
    """EASE's ``[n_items, n_items]`` item-item weights from a binary user x item matrix (one inverse)."""
    gram = (x.T @ x).toarray().astype(np.float64)
    gram[np.diag_indices_from(gram)] += l2
    p = np.linalg.inv(gram)
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0.0)
    return b.astype(np.float32)


def recency_weights(length: int, halflife: float | None) -> np.ndarray:
    """``exp(-position_from_end / halflife)``: 1 for the newest item; all ones without a halflife."""
    if halflife is None:
        return np.ones(length, dtype=np.float32)
    return np.exp(-np.arange(length - 1, -1, -1) / halflife).astype(np.float32)


class ALS(ScoringRecommender):
    """Matrix-factorisation peer: implicit's ALS on the binary train matrix (a dev/eval dependency).

    At scoring time the user factors are re-solved from the history passed in (train + valid
    for the test window), so ALS sees the same history as every other model.
    """

    name = "als (implicit)"

    def __init__(self, split: TemporalSplit, factors: int = 64, regularization: float = 0.05, alpha: float = 2.0,
                 iterations: int = 15, seed: int = 0):
        from implicit.cpu.als import AlternatingLeastSquares

        x = history_matrix(split.history_before("valid"), split.n_items)
        self.model = AlternatingLeastSquares(factors=factors, regularization=regularization, alpha=alpha,
                                             iterations=iterations, random_state=seed, num_threads=2)
        self.model.fit(x, show_progress=False)
        self.n_items = split.n_items

    def score(self, users, histories):
        user_items = history_matrix(histories, self.n_items)
        factors = self.model.recalculate_user(np.arange(len(histories)), user_items)
        return np.asarray(factors @ self.model.item_factors.T)
