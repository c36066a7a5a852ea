"""Ranking metrics against hand-computed values."""
import math

import numpy as np
import pytest
import scipy.sparse as sp

from offline.metrics import catalogue_coverage, ranking_metrics, summarize
from recsys.topk import topk_items


def truth_matrix(rows: list[dict[int, float]], n_items: int) -> sp.csr_matrix:
    data, ri, ci = [], [], []
    for u, row in enumerate(rows):
        for i, g in row.items():
            ri.append(u), ci.append(i), data.append(g)
    return sp.csr_matrix((data, (ri, ci)), shape=(len(rows), n_items))


def test_single_user_hand_computed():
    # Ranked list [3, 1, 4, 0]; positives {1: grade 2, 0: grade 1, 2: grade 1} (item 2 never shown).
    topk = np.array([[3, 1, 4, 0]])
    truth = truth_matrix([{1: 2.0, 0: 1.0, 2: 1.0}], n_items=5)
    m = ranking_metrics(topk, truth, ks=[2, 4])
    d = lambda pos: 1 / math.log2(pos + 1)  # noqa: E731  discount of 1-based position
    assert m["recall@2"][0] == pytest.approx(1 / 3)
    assert m["recall@4"][0] == pytest.approx(2 / 3)
    assert m["hit@2"][0] == 1.0
    assert m["mrr@4"][0] == pytest.approx(1 / 2)
    assert m["ndcg@2"][0] == pytest.approx(d(2) / (d(1) + d(2)))
    assert m["ndcg@4"][0] == pytest.approx((d(2) + d(4)) / (d(1) + d(2) + d(3)))
    graded_dcg = (2**2 - 1) * d(2) + (2**1 - 1) * d(4)
    graded_idcg = (2**2 - 1) * d(1) + 1 * d(2) + 1 * d(3)
    assert m["graded_ndcg@4"][0] == pytest.approx(graded_dcg / graded_idcg)
    # AP@4: precision at the hits (position 2: 1/2, position 4: 2/4) over min(3, 4) positives.
    assert m["map@4"][0] == pytest.approx((1 / 2 + 2 / 4) / 3)


def test_user_without_positives_is_nan_and_left_out_of_mean():
    topk = np.array([[0, 1], [0, 1]])
    truth = truth_matrix([{0: 1.0}, {}], n_items=3)
    m = ranking_metrics(topk, truth, ks=[2])
    assert m["recall@2"][0] == 1.0
    assert math.isnan(m["recall@2"][1])
    assert summarize(m)["recall@2"] == 1.0


def test_k_larger_than_list_uses_padding():
    topk = np.array([[2, -1, -1]])  # only one rankable item
    truth = truth_matrix([{2: 1.0, 0: 1.0}], n_items=3)
    m = ranking_metrics(topk, truth, ks=[3])
    assert m["recall@3"][0] == pytest.approx(0.5)
    assert m["ndcg@3"][0] == pytest.approx(1.0 / (1.0 + 1 / math.log2(3)))


def test_perfect_ranking_scores_one_and_miss_scores_zero():
    truth = truth_matrix([{0: 1.0, 1: 1.0}, {2: 1.0}], n_items=4)
    m = ranking_metrics(np.array([[0, 1], [0, 1]]), truth, ks=[2])
    assert m["ndcg@2"].tolist() == [1.0, 0.0]
    assert m["mrr@2"].tolist() == [1.0, 0.0]
    assert m["map@2"].tolist() == [1.0, 0.0]


def test_topk_excludes_and_breaks_ties_by_lower_row():
    scores = np.array([[0.5, 0.9, 0.5, 0.5, 0.1]])
    exclude = sp.csr_matrix(([1], ([0], [1])), shape=(1, 5))
    assert topk_items(scores, 3, exclude).tolist() == [[0, 2, 3]]
    assert topk_items(scores, 2).tolist() == [[1, 0]]


def test_topk_pads_when_everything_excluded():
    scores = np.array([[1.0, 2.0]])
    exclude = sp.csr_matrix(np.array([[1, 0]]))
    assert topk_items(scores, 3, exclude).tolist() == [[1, -1, -1]]


def test_catalogue_coverage_counts_distinct_items():
    assert catalogue_coverage(np.array([[0, 1], [1, -1]]), n_items=4) == pytest.approx(2 / 4)
