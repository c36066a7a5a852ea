"""Train-window item statistics the bundle stores for the ranker's features (``recsys.rank_features``):
mean rating, item neighbours and sequence neighbours. Training-only: the service reads the arrays, never
recomputes them, so these live beside the training code, not in the core.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from offline.baselines import ease_weights, sequence_neighbours
from offline.split import user_sequences
from recsys.dataset import Interactions
from recsys.topk import row_top, top_neighbours

NEIGHBOURS = 50  # item neighbours kept per item in the bundle
EASE_L2 = 500.0  # EASE ridge strength for the neighbour weights (chosen on the ranker's validation users)
EASE_MAX_ITEMS = 5_000  # above this the dense n x n inverse is too heavy: cosine neighbours instead
# Sequence neighbours (SeqKNN's, offline/baselines.py): pairs at most SEQ_WINDOW steps apart in a user's sequence,
# weight exp(-(d - 1) / SEQ_DECAY), both directions alike; near the best SeqKNN settings on MovieLens validation
# (window 50, decay 10, backward 1) at a window that keeps the pair count at 2 x 20 per interaction.
SEQ_WINDOW, SEQ_DECAY, SEQ_BACKWARD = 20, 10.0, 1.0


def ranker_arrays(train: Interactions, n_items: int, neighbours: int = NEIGHBOURS) -> dict[str, np.ndarray]:
    """Train-window statistics the bundle stores for the features: mean rating, item neighbours and
    sequence neighbours (items that follow one another closely in users' sequences).

    Neighbours are EASE's item-item weights (Steck 2019: the strongest peer on this data) while the
    catalogue is small enough for its one ``n_items^2`` inverse, cosine co-occurrence beyond that.
    """
    counts = np.bincount(train.item, minlength=n_items).astype(np.float64)
    sums = np.bincount(train.item, weights=train.rating, minlength=n_items)
    with np.errstate(invalid="ignore", divide="ignore"):
        avg = np.where(counts > 0, sums / counts, np.nan)
    build = ease_neighbours if n_items <= EASE_MAX_ITEMS else cooccurrence_neighbours
    nbrs, sims = build(train, n_items, neighbours)
    seq_nbrs, seq_sims = sequence_neighbours(user_sequences(train, int(train.user.max()) + 1 if len(train) else 0),
                                             n_items, SEQ_WINDOW, SEQ_DECAY, SEQ_BACKWARD, neighbours)
    return {"item_avg_rating": avg.astype(np.float32), "item_neighbours": nbrs, "item_neighbour_sims": sims,
            "item_seq_neighbours": seq_nbrs, "item_seq_neighbour_sims": seq_sims}


def ease_neighbours(train: Interactions, n_items: int, k: int, l2: float = EASE_L2) -> tuple[np.ndarray, np.ndarray]:
    """Each item's ``k`` largest positive EASE weights ``B[item, :]``: the EASE score of a candidate
    is the sum of these weights over the user's history, which the co-occurrence features restrict
    to the recent items with recency weights (-1 / 0 padding)."""
    return top_neighbours(ease_weights(_binary(train, n_items), l2), k)


def cooccurrence_neighbours(train: Interactions, n_items: int, k: int,
                            max_pairs: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` cosine neighbours per item on the binary user x item matrix (self excluded, -1 padding).

    Sparse throughout: item blocks of ``X'X`` are multiplied out with at most about ``max_pairs``
    co-occurring pairs each (bounded by the sum of the block's items' users' history lengths), and
    each row's top ``k`` is picked from its non-zeros. Cost and memory follow the number of
    co-occurrences, never ``n_items^2``.
    """
    x = _binary(train, n_items)
    xt = x.T.tocsr()
    norms = np.sqrt(np.diff(xt.indptr).astype(np.float64))  # binary: the norm is sqrt(count)
    norms[norms == 0] = 1.0
    bound = xt @ np.diff(x.indptr).astype(np.float64)  # per item: co-occurring pairs it can have
    nbrs = np.full((n_items, k), -1, np.int64)
    sims = np.zeros((n_items, k), np.float32)
    start = 0
    while start < n_items:
        end = start + max(1, int(np.searchsorted(np.cumsum(bound[start:]), max_pairs, side="right")))
        block = (xt[start:end] @ x).tocsr()
        for row in range(end - start):
            lo, hi = block.indptr[row], block.indptr[row + 1]
            cols, vals = block.indices[lo:hi], block.data[lo:hi] / norms[start + row] / norms[block.indices[lo:hi]]
            top = row_top(cols[cols != start + row], vals[cols != start + row], k)
            nbrs[start + row, : len(top[0])], sims[start + row, : len(top[0])] = top
        start = end
    return nbrs, sims


def _binary(train: Interactions, n_items: int) -> sp.csr_matrix:
    n_users = int(train.user.max()) + 1 if len(train) else 0
    x = sp.csr_matrix((np.ones(len(train), np.float32), (train.user, train.item)), shape=(n_users, n_items))
    x.data[:] = 1.0  # repeated events count once
    return x
