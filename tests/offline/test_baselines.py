"""The classical peers the evaluation measures the pipeline against: hand-computed examples."""
from __future__ import annotations

import math

import numpy as np
import pytest

from offline.baselines import Blend, ScoringRecommender, neighbour_matrix, sequence_neighbours


def test_sequence_neighbours_weigh_pairs_by_distance_and_direction_then_normalise_by_counts():
    # [0, 1, 2]: 0->1 and 1->2 at distance 1 (weight 1), 0->2 at distance 2 (weight e^-1 with decay 1);
    # [2, 0]: 2->0 at distance 1. Backward pairs count 0.5. Item counts: 0: 2, 1: 1, 2: 2.
    nbrs, sims = sequence_neighbours([np.array([0, 1, 2]), np.array([2, 0]), np.array([1])], n_items=3,
                                     window=2, decay=1.0, backward=0.5, k=2)
    e = math.exp(-1)
    expected = {
        0: [(1, 1 / math.sqrt(2)), (2, (e + 0.5) / 2)],
        1: [(2, 1 / math.sqrt(2)), (0, 0.5 / math.sqrt(2))],
        2: [(0, (1 + 0.5 * e) / 2), (1, 0.5 / math.sqrt(2))],
    }
    for item, pairs in expected.items():
        assert nbrs[item].tolist() == [j for j, _ in pairs]
        assert sims[item] == pytest.approx([s for _, s in pairs], rel=1e-6)


def test_sequence_neighbours_respect_the_window_and_pad_with_minus_one():
    nbrs, sims = sequence_neighbours([np.array([0, 1, 2, 3])], n_items=5, window=1, decay=1.0, backward=0.0, k=3)
    assert nbrs[0].tolist() == [1, -1, -1]  # 0 -> 2 is two steps away: outside the window
    assert nbrs[3].tolist() == [-1, -1, -1]  # nothing follows 3 and backward pairs weigh 0
    assert nbrs[4].tolist() == [-1, -1, -1] and not sims[4].any()  # never seen


def test_neighbour_matrix_drops_padding():
    m = neighbour_matrix(np.array([[2, -1], [-1, -1], [0, 1]]), np.array([[0.5, 0], [0, 0], [0.25, 0.125]], np.float32))
    assert m.toarray().tolist() == [[0, 0, 0.5], [0, 0, 0], [0.25, 0.125, 0]]


class _Fixed(ScoringRecommender):
    def __init__(self, scores):
        self.scores = np.array(scores, np.float32)
        self.name = "fixed"

    def score(self, users, histories):
        return self.scores


def test_blend_scales_each_model_per_user_to_a_maximum_of_one_before_weighting():
    a = _Fixed([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    b = _Fixed([[10.0, 0.0, 40.0], [-4.0, 2.0, 1.0]])
    blended = Blend(a, b, weight=0.25).score(np.arange(2), [np.zeros(0, np.int64)] * 2)
    assert blended[0] == pytest.approx([0.25 * 1 + 0.75 * 0.25, 0.25 * 0.5, 0.75 * 1])
    assert blended[1] == pytest.approx([0.75 * -1, 0.75 * 0.5, 0.75 * 0.25])  # an all-zero row stays zero


def test_sequence_neighbours_in_item_blocks_equal_one_pass():
    """Summing a block of item rows at a time (bounded memory) changes nothing but the peak."""
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 120, rng.integers(0, 40)) for _ in range(200)]
    whole = sequence_neighbours(seqs, 120, 5, 2.0, 0.5, 10)
    for max_pairs in (300, 1):  # several items per block; one item per block
        nbrs, sims = sequence_neighbours(seqs, 120, 5, 2.0, 0.5, 10, max_pairs=max_pairs)
        np.testing.assert_allclose(sims, whole[1], rtol=1e-6)
        assert (nbrs == whole[0]).mean() > 0.99  # equal weights may swap places (float summation order)
