"""Temporal split: most recent interactions held out, deterministic, no overlap."""
import numpy as np

from offline.split import history_matrix, relevance, temporal_split
from recsys.dataset import Interactions


def make(users, items, ratings, times) -> Interactions:
    return Interactions(np.array(users), np.array(items), np.array(ratings, np.float32), np.array(times))


def test_last_interactions_go_to_valid_then_test():
    # user 0: 10 events at t=0..9 (shuffled input order); user 1: 2 events (too few to split)
    t = np.random.default_rng(0).permutation(10)
    inter = make([0] * 10 + [1, 1], list(t) + [5, 6], [5.0] * 12, list(t) + [1, 2])
    split = temporal_split(inter, n_users=2, n_items=10, valid_frac=0.2, test_frac=0.1)
    assert split.test.item.tolist() == [9]
    assert split.valid.item.tolist() == [7, 8]
    assert sorted(split.train.item.tolist()) == [0, 1, 2, 3, 4, 5, 5, 6, 6]
    assert split.history_before("test")[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert split.history_before("valid")[1].tolist() == [5, 6]


def test_refit_split_merges_the_windows_before_the_one_it_keeps():
    t = np.random.default_rng(0).permutation(10)
    inter = make([0] * 10 + [1, 1], list(t) + [5, 6], [5.0] * 12, list(t) + [1, 2])
    split = temporal_split(inter, n_users=2, n_items=10, valid_frac=0.2, test_frac=0.1)
    twin = split.refit("test")
    assert twin.train.item.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 5, 6] and len(twin.valid) == 0
    assert twin.test.item.tolist() == [9] and twin.truth("test").nnz == 1
    for user in (0, 1):  # the test window is scored with the same history as before
        assert twin.history_before("test")[user].tolist() == split.history_before("test")[user].tolist()
        assert twin.history_before("valid")[user].tolist() == split.history_before("test")[user].tolist()
    served = split.refit("serve")
    assert served.train.item.tolist() == list(range(10)) + [5, 6] and len(served.valid) == len(served.test) == 0


def test_split_is_deterministic_with_tied_timestamps():
    inter = make([0] * 6, [3, 1, 4, 0, 5, 2], [4.0] * 6, [1] * 6)
    a = temporal_split(inter, 1, 6)
    b = temporal_split(inter, 1, 6)
    assert a.test.item.tolist() == b.test.item.tolist() == [2]  # ties keep file order
    assert a.valid.item.tolist() == [5]


def test_relevance_grades_and_implicit_data():
    assert relevance(np.array([1, 3, 4, 5], np.float32), implicit=False).tolist() == [0, 0, 1, 2]
    assert relevance(np.array([1, 1], np.float32), implicit=True).tolist() == [1, 1]
    inter = make([0, 0, 0], [0, 1, 2], [1.0, 1.0, 1.0], [1, 2, 3])
    split = temporal_split(inter, 1, 3)
    assert split.implicit and split.truth("test").toarray().tolist() == [[0, 0, 1]]


def test_history_matrix_keeps_max_weight_for_repeats():
    m = history_matrix([np.array([1, 1, 2])], n_items=3, weights=[np.array([0.5, 0.9, 0.2], np.float32)])
    assert np.allclose(m.toarray(), [[0.0, 0.9, 0.2]])


def test_a_positive_the_user_had_before_the_window_is_not_in_its_truth():
    """Scored lists leave out what the user has seen, so an item seen before the window can never be found: as a
    positive it would score the user 0 whatever the model. Data where users return to items (implicit, repeats)."""
    items = [0, 1, 0, 2, 0, 3, 0, 4, 5, 0, 7, 8]
    users = [0] * 10 + [1, 1]
    split = temporal_split(make(users + [1], items + [9], [1.0] * 13, list(range(13))), 2, 10, 0.1, 0.1)
    assert split.test.item[split.test.user == 0].tolist() == [0] and split.truth("test")[0].nnz == 0
    assert split.valid.item[split.valid.user == 0].tolist() == [5] and split.truth("valid")[0].indices.tolist() == [5]
    assert split.truth("test")[1].indices.tolist() == [9] and 0 not in split.eval_users("test")
