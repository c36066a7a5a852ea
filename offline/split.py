"""Per-user temporal split, relevance grades and the history views every model consumes.

Each user's interactions are ordered by time; the last ``test_frac`` form the test window,
the ``valid_frac`` before them the validation window, the rest train. Models fit on train;
when scoring a window they see the user's history up to that window (train for valid,
train + valid for test), as the service sees a user's history at request time. The windows are per
user, not cut at one date, so train also holds other users' interactions from after a user's test
window (the common leave-last-out protocol; README, "Evaluation").
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from recsys.dataset import Interactions

POSITIVE_RATING = 4.0


@dataclass
class TemporalSplit:
    n_users: int
    n_items: int
    train: Interactions
    valid: Interactions
    test: Interactions
    implicit: bool  # all ratings equal: every interaction is a positive of grade 1
    max_eval_users: int = 0  # 0: every user with a positive is scored; else a seeded sample of this many

    def window(self, name: str) -> Interactions:
        return {"train": self.train, "valid": self.valid, "test": self.test}[name]

    def history_before(self, name: str) -> list[np.ndarray]:
        """Each user's items, oldest first, from the windows that precede ``name``."""
        parts = {"valid": ["train"], "test": ["train", "valid"], "serve": ["train", "valid", "test"]}[name]
        return user_sequences(concat_windows([self.window(p) for p in parts]), self.n_users)

    def refit(self, upto: str) -> "TemporalSplit":
        """The split a refit trains on: every window before ``upto`` merged into train, nothing left to
        validate on. ``upto="test"``: train + valid, the test window kept and scored with the same
        history as before (the served model's scoreable twin); ``"serve"``: every interaction."""
        parts = {"test": [self.train, self.valid], "serve": [self.train, self.valid, self.test]}[upto]
        empty = self.test.subset(np.zeros(len(self.test), bool))
        return TemporalSplit(self.n_users, self.n_items, concat_windows(parts).sorted_by_user_time(), empty,
                             self.test if upto == "test" else empty, self.implicit, self.max_eval_users)

    def eval_users(self, name: str, seed: int = 0) -> np.ndarray:
        """The user rows a window is scored on, ascending: those with a positive in it, or a seeded
        uniform sample of ``max_eval_users`` of them. Full ranking costs ``users x items``; a fixed
        sample keeps validation and evaluation linear in the catalogue (the metrics become means
        over a random sample of users, with the sampling error of any mean over that many users)."""
        return seeded_sample(np.flatnonzero(np.diff(self.truth(name).indptr) > 0), self.max_eval_users, seed)

    def truth(self, name: str) -> sp.csr_matrix:
        """Relevance grades of the window's interactions, positives only; for valid and test, not the items the
        user had before the window: every list a window is scored on leaves out the seen items (as the service
        does), so such a positive could never be found and would score the user 0 whatever the model (data
        where users return to items: a user whose positives were all seen before has none, and is not scored)."""
        w = self.window(name)
        grades = relevance(w.rating, self.implicit)
        keep = grades > 0
        truth = grade_matrix(w.user[keep], w.item[keep], grades[keep], (self.n_users, self.n_items))
        if name == "train":
            return truth
        seen = history_matrix(self.history_before(name), self.n_items) > 0
        truth = (truth - truth.multiply(seen)).tocsr()
        truth.eliminate_zeros()
        return truth


def temporal_split(
    interactions: Interactions, n_users: int, n_items: int, valid_frac: float = 0.1, test_frac: float = 0.1,
    max_eval_users: int = 0,
) -> TemporalSplit:
    """Deterministic per-user holdout of the most recent interactions.

    Users with fewer than 3 interactions stay wholly in train (nothing to hold out).
    Each of the other users gets at least one valid and one test interaction.
    """
    inter = interactions.sorted_by_user_time()
    counts = np.bincount(inter.user, minlength=n_users)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = np.arange(len(inter)) - starts[inter.user]
    n = counts[inter.user]
    eligible = n >= 3
    n_test = np.where(eligible, np.maximum(1, np.round(n * test_frac)), 0).astype(np.int64)
    n_valid = np.where(eligible, np.maximum(1, np.round(n * valid_frac)), 0).astype(np.int64)
    from_end = n - position  # 1 for the most recent
    is_test = from_end <= n_test
    is_valid = ~is_test & (from_end <= n_test + n_valid)
    implicit = bool(np.all(inter.rating == inter.rating[0])) if len(inter) else True
    return TemporalSplit(
        n_users, n_items, inter.subset(~is_test & ~is_valid), inter.subset(is_valid), inter.subset(is_test), implicit,
        max_eval_users,
    )


def seeded_sample(rows: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    """``rows`` when ``limit`` is 0 or not below their number, else a seeded uniform sample of
    ``limit`` of them, ascending: the same rows on every run with the same seed."""
    if not limit or len(rows) <= limit:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, limit, replace=False))


def relevance(ratings: np.ndarray, implicit: bool) -> np.ndarray:
    """Graded relevance: rating 4 -> 1, 5 -> 2, below 4 -> 0; every implicit event -> 1."""
    if implicit:
        return np.ones(len(ratings), dtype=np.float32)
    return np.where(ratings >= POSITIVE_RATING, ratings - POSITIVE_RATING + 1, 0).astype(np.float32)


def user_sequences(inter: Interactions, n_users: int) -> list[np.ndarray]:
    """Item rows per user in time order (``inter`` need not be sorted)."""
    inter = inter.sorted_by_user_time()
    bounds = np.cumsum(np.bincount(inter.user, minlength=n_users))[:-1]
    return np.split(inter.item, bounds)


def history_matrix(histories: list[np.ndarray], n_items: int, weights: list[np.ndarray] | None = None) -> sp.csr_matrix:
    """CSR ``[n_users, n_items]`` of (optionally weighted) history; repeated items keep the max weight."""
    rows = np.repeat(np.arange(len(histories)), [len(h) for h in histories])
    cols = np.concatenate(histories) if histories else np.zeros(0, np.int64)
    vals = np.concatenate(weights) if weights is not None else np.ones(len(cols), np.float32)
    return grade_matrix(rows, cols, vals, (len(histories), n_items))


def grade_matrix(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """CSR where a duplicated (row, col) keeps its largest value instead of summing."""
    order = np.lexsort((-np.asarray(vals, dtype=np.float64), cols, rows))
    rows, cols, vals = rows[order], cols[order], np.asarray(vals)[order]
    first = np.ones(len(rows), dtype=bool)
    first[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])
    return sp.csr_matrix((vals[first].astype(np.float32), (rows[first], cols[first])), shape=shape)


def concat_windows(parts: list[Interactions]) -> Interactions:
    return Interactions(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("user", "item", "rating", "timestamp")))
