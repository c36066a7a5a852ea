"""Non-neural peers: popularity, item-kNN (cosine), EASE (plain and recency-weighted), the
sequence-aware item-item model SeqKNN and a blend of recency-weighted EASE with SeqKNN.

They answer the same interface as the two-tower model (``score(users, histories)``), so the
evaluation, exclusion of seen items and reporting are one mechanism for all of them.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from offline.split import TemporalSplit, history_matrix
from recsys.topk import row_top, topk_items


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

    def similar_items(self, items: np.ndarray, k: int) -> np.ndarray:
        """``[len(items), k]`` item rows: each item, then its neighbours by cosine (``similar_by_rows``).
        The diagonal is zeroed only so that an item never votes for itself; its cosine with itself is 1,
        the largest a cosine can be."""
        return similar_by_rows(self.sim, items, k)


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

    def similar_items(self, items: np.ndarray, k: int) -> np.ndarray:
        """``[len(items), k]`` item rows: each item, then the items its row of ``B`` weighs highest
        (``similar_by_rows``).

        Why ``B``'s row and not the Gram matrix's column: ``B[i]`` is what the model itself adds to every
        item's score when ``i`` is in a history (with or without recency weighting, a one-item history
        weighs 1), so these are EASE's neighbours, not raw co-occurrence counts, which rank by popularity.
        ``B``'s diagonal is zero only because the constraint ``diag(B) = 0`` stops the trivial solution
        ``B = I``; an item is trivially the most similar to itself, so it is placed first."""
        return similar_by_rows(self.weights, items, k)


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


class SeqKNN(ScoringRecommender):
    """Sequence-aware item-item neighbours: two items are similar when they sit close together in
    users' time-ordered sequences (``sequence_neighbours``); a user's items vote for their
    neighbours, newer items louder (``recency_halflife``, as in recency-weighted EASE)."""

    name = "seqknn"

    def __init__(self, split: TemporalSplit, window: int = 20, decay: float = 5.0, backward: float = 0.5,
                 recency_halflife: float = 10.0, neighbours: int = 200):
        nbrs, sims = sequence_neighbours(split.history_before("valid"), split.n_items, window, decay, backward, neighbours)
        self.sim = neighbour_matrix(nbrs, sims)
        self.recency_halflife = recency_halflife

    def score(self, users, histories):
        weights = [recency_weights(len(h), self.recency_halflife) for h in histories]
        return (history_matrix(histories, self.sim.shape[0], weights) @ self.sim).toarray()

    def similar_items(self, items: np.ndarray, k: int) -> np.ndarray:
        """``[len(items), k]`` item rows: each item, then its sequence neighbours, those that most often
        follow it closely (``similar_by_rows``; self pairs are dropped when the table is built)."""
        return similar_by_rows(self.sim, items, k)


def similar_by_rows(table: np.ndarray | sp.spmatrix, items: np.ndarray, k: int) -> np.ndarray:
    """Each item, then the top of its row of an item-item ``table`` (``[len(items), k]`` item rows,
    ties to the lower row, -1 padding only past the catalogue).

    Row ``i`` of the table is exactly what the model scores for a user whose only history is ``i``
    (scores are ``history @ table``), so ``similar_items`` and ``recommend`` share one notion of
    neighbour: after the item itself, the list is the recommendation for that one-item history. The
    item's own entry is set above every other (the largest float32: ``topk_items`` reads a non-finite
    score as "not rankable"): these tables keep their diagonal at zero so that a history item does not
    vote for itself, and an exact tie (two items seen by the same users) must not put another item
    ahead of the item itself.
    """
    items = np.asarray(items, np.int64)
    rows = table[items]
    rows = rows.toarray() if sp.issparse(rows) else np.array(rows, dtype=np.float32)
    rows = rows.astype(np.float32, copy=False)
    rows[np.arange(len(items)), items] = np.finfo(np.float32).max
    return topk_items(rows, k)


class Blend(ScoringRecommender):
    """``weight * a + (1 - weight) * b`` on scores scaled per user to a maximum of 1, so two models
    whose raw scores live on different scales contribute in the proportion ``weight`` says."""

    def __init__(self, a: ScoringRecommender, b: ScoringRecommender, weight: float, name: str | None = None):
        self.a, self.b, self.weight = a, b, weight
        self.name = name or f"{a.name} + {b.name}"

    def score(self, users, histories):
        return self.weight * _max_scaled(self.a.score(users, histories)) + \
            (1 - self.weight) * _max_scaled(self.b.score(users, histories))


def _max_scaled(scores: np.ndarray) -> np.ndarray:
    top = np.abs(scores).max(axis=1, keepdims=True)
    return scores / np.where(top > 0, top, 1.0)


def sequence_neighbours(sequences: list[np.ndarray], n_items: int, window: int, decay: float, backward: float,
                        k: int, max_pairs: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` neighbours per item (``[n_items, k]`` rows, -1 padding, and their similarities).

    A pair ``(i, j)`` with ``j`` following ``i`` by ``d <= window`` steps in a sequence adds
    ``exp(-(d - 1) / decay)`` to ``S[i, j]`` and ``backward`` times that to ``S[j, i]`` (the next
    item is what a recommender predicts, so order counts). ``S`` is then normalised like cosine,
    ``S[i, j] / sqrt(n_i n_j)`` with ``n`` the item counts, so popular items do not neighbour
    everything. Cost: ``2 x window`` pairs per interaction, summed for a block of item rows at a time
    (at most about ``max_pairs`` pairs each): memory stays bounded whatever the data's size.
    """
    seqs = [np.asarray(s, np.int64) for s in sequences if len(s) > 1]
    flat = np.concatenate(seqs) if seqs else np.zeros(0, np.int64)
    remaining = np.concatenate([np.arange(len(s) - 1, -1, -1) for s in seqs]) if seqs else flat  # steps to the end
    counts = np.bincount(flat, minlength=n_items)
    norms = 1.0 / np.sqrt(np.maximum(counts, 1))
    bound = counts * 2 * window  # pairs an item's row can receive
    nbrs = np.full((n_items, k), -1, np.int64)
    sims = np.zeros((n_items, k), np.float32)
    start = 0
    while start < n_items:
        end = start + max(1, int(np.searchsorted(np.cumsum(bound[start:]), max_pairs, side="right")))
        block = _sequence_block(flat, remaining, start, end, n_items, window, decay, backward)
        block = (sp.diags(norms[start:end]) @ block @ sp.diags(norms)).tocsr()
        nbrs[start:end], sims[start:end] = top_per_row(block, k)
        start = end
    return nbrs, sims


def _sequence_block(flat: np.ndarray, remaining: np.ndarray, start: int, end: int, n_items: int, window: int,
                    decay: float, backward: float) -> sp.csr_matrix:
    """Rows ``start:end`` of the raw pair sums ``S`` (self pairs, an item repeated in a sequence, dropped)."""
    rows, cols, vals = [], [], []
    for d in range(1, window + 1):
        at = np.flatnonzero(remaining >= d)
        if not len(at):
            break
        a, b, w = flat[at], flat[at + d], np.exp(-(d - 1) / decay)
        for src, dst, weight in ((a, b, w), (b, a, backward * w)):
            keep = (src >= start) & (src < end) & (src != dst)
            rows.append(src[keep] - start), cols.append(dst[keep]), vals.append(np.full(int(keep.sum()), weight))
    if not rows:
        return sp.csr_matrix((end - start, n_items))
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(end - start, n_items))


def top_per_row(matrix: sp.csr_matrix, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` largest positive entries as ``([n, k]`` columns (-1 padding)``, [n, k]`` values``),
    descending, ties to the lower column."""
    nbrs = np.full((matrix.shape[0], k), -1, np.int64)
    sims = np.zeros((matrix.shape[0], k), np.float32)
    for row in range(matrix.shape[0]):
        lo, hi = matrix.indptr[row], matrix.indptr[row + 1]
        cols, vals = row_top(matrix.indices[lo:hi], matrix.data[lo:hi], k)
        nbrs[row, : len(cols)], sims[row, : len(cols)] = cols, vals
    return nbrs, sims


def neighbour_matrix(nbrs: np.ndarray, sims: np.ndarray) -> sp.csr_matrix:
    """The sparse ``[n_items, n_items]`` matrix of a neighbour table (padding dropped)."""
    rows = np.repeat(np.arange(len(nbrs)), nbrs.shape[1])
    keep = nbrs.ravel() >= 0
    return sp.csr_matrix((sims.ravel()[keep], (rows[keep], nbrs.ravel()[keep])), shape=(len(nbrs), len(nbrs)))


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
