"""Re-ranker features: the one function that builds ranker inputs for training and for serving.

``ranker_features`` turns one request (a user's time-ordered history, demographics and the
recall stage's candidates) into a ``[n_candidates, F]`` float32 matrix. The trainer calls it
once per query; the service calls it once per request with the same arrays from the bundle,
so training and serving cannot drift apart.

Statistics that come from interactions (popularity, average rating, item neighbours)
are computed on the train window only (``ranker_arrays``), so the ranker's labels,
which come from the later valid window, never leak into its features. The values here are
raw; the ranker standardises them with statistics it stores itself.

A request's columns are of two kinds: those that vary by candidate (``candidate_block``, one compiled pass
over the candidates, ``_fill_block``) and those that are the user's alone (``UserFeatures.constant``: history
length, mean rating, demographics), computed once per history version. ``assemble`` lays them out as
``feature_names`` says; the MLP ranker never needs the assembled matrix (``recsys.scorer``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numba import njit

from recsys.topk import row_top

RECENT = 20  # history items the similarity and neighbour features look at, newest first
RECENCY_HALFLIFE = 5.0  # weight exp(-position_from_end / h): recent items carry most of the signal
GENRE_HALFLIFE = 20.0  # taste in genres moves more slowly than taste in titles
RATING_PRIOR_WEIGHT = 5.0  # pseudo-ratings that shrink a rarely rated item's mean towards the global mean
ONE_HOT_MAX = 32  # user categorical columns with at most this many codes are one-hot encoded; larger ones are dropped

FEATURE_NAMES = [
    "recall_score", "recall_log_rank", "recall_score_gap", "recall_score_z", "from_item_item",
    "sim_last", "sim_max_recent", "sim_mean_recent", "sim_argmax_age", "sim_profile",
    "neighbour_recent", "neighbour_max_recent", "seq_recent", "seq_max_recent",
    "genre_affinity", "item_log_popularity", "popularity_vs_user", "item_avg_rating",
    "item_year", "item_year_missing", "year_vs_user",
    "history_log_len", "user_mean_rating",
]  # the fixed block; ``feature_names(tables)`` appends item genres and user demographics


@dataclass
class RankerTables:
    """Item-side lookups the features read; every field comes from the bundle's ``arrays``."""

    item_vectors: np.ndarray  # [n_items, d] two-tower item vectors (unit)
    item_genres: np.ndarray  # [n_items, G] float32 multi-hot
    item_year: np.ndarray  # [n_items] float32, NaN unknown
    item_popularity: np.ndarray  # [n_items] float32 train-window counts
    item_avg_rating: np.ndarray  # [n_items] float32 train-window mean rating, NaN when never rated
    item_neighbours: np.ndarray  # [n_items, K] int64 item neighbours (train window), -1 padding
    item_neighbour_sims: np.ndarray  # [n_items, K] float32 their weights (EASE, or cosine for big catalogues)
    item_seq_neighbours: np.ndarray  # [n_items, K] int64 sequence neighbours (train window), -1 padding
    item_seq_neighbour_sims: np.ndarray  # [n_items, K] float32 their weights
    user_cat_sizes: np.ndarray  # [C] int64 codes per user categorical column (0 = unknown)
    # Derived once (``__post_init__``) so that a request only gathers rows; the statistics of the whole catalogue
    # (mean year, rating prior) are the bundle's: an item added online is described on the same scale.
    year_fill: float | None = None
    rating_prior: float | None = None
    item_static: np.ndarray | None = None  # [n_items, 4] log popularity, shrunk rating, year (filled), year unknown
    one_hot_columns: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.year_fill is None:
            known = np.isfinite(self.item_year)
            self.year_fill = float(self.item_year[known].mean()) if known.any() else 0.0
        if self.rating_prior is None:
            rated = np.isfinite(self.item_avg_rating) & (self.item_popularity > 0)
            self.rating_prior = float(np.average(self.item_avg_rating[rated], weights=self.item_popularity[rated])) \
                if rated.any() else 0.0
        if self.item_static is None:
            self.item_static = self.static_rows(slice(None))
        if self.one_hot_columns is None:
            self.one_hot_columns = np.flatnonzero(self.user_cat_sizes <= ONE_HOT_MAX)

    def static_rows(self, rows) -> np.ndarray:
        """``item_static`` of ``rows`` (an item written online gets its row from this, on the bundle's scale)."""
        year, popularity, avg = self.item_year[rows], self.item_popularity[rows], self.item_avg_rating[rows]
        known = np.isfinite(year)
        rated = np.isfinite(avg) & (popularity > 0)
        counts = np.where(rated, popularity, 0.0)
        mean = np.where(rated, avg, self.rating_prior)
        shrunk = (mean * counts + self.rating_prior * RATING_PRIOR_WEIGHT) / (counts + RATING_PRIOR_WEIGHT)
        return np.column_stack([np.log1p(popularity), shrunk, np.where(known, year, self.year_fill), ~known]).astype(np.float32)

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "RankerTables":
        """The tables from a bundle's arrays (or the same dict the pipeline is about to write)."""
        user_cat = arrays["user_cat"]
        sizes = user_cat.max(axis=0) + 1 if user_cat.size else np.zeros(user_cat.shape[1], np.int64)
        return cls(
            item_vectors=np.ascontiguousarray(arrays["item_vectors"], dtype=np.float32),
            item_genres=arrays["item_genres"].astype(np.float32, copy=False),  # no copy where the type already
            item_year=arrays["item_year"].astype(np.float32, copy=False),  # matches: at 1M items the copies
            item_popularity=arrays["popularity"].astype(np.float32, copy=False),  # cost 0.65 GiB and 2 s per upsert
            item_avg_rating=arrays["item_avg_rating"].astype(np.float32, copy=False),
            item_neighbours=arrays["item_neighbours"].astype(np.int64, copy=False),
            item_neighbour_sims=arrays["item_neighbour_sims"].astype(np.float32, copy=False),
            item_seq_neighbours=arrays["item_seq_neighbours"].astype(np.int64, copy=False),
            item_seq_neighbour_sims=arrays["item_seq_neighbour_sims"].astype(np.float32, copy=False),
            user_cat_sizes=sizes.astype(np.int64),
        )


def feature_names(tables: RankerTables, n_user_numeric: int) -> list[str]:
    """Every column of ``ranker_features``' output, in order (stored with the ranker)."""
    genres = [f"genre_{g}" for g in range(tables.item_genres.shape[1])]
    numeric = [f"user_num_{j}" for j in range(n_user_numeric)]
    cats = [f"user_cat_{j}={c}" for j in tables.one_hot_columns for c in range(tables.user_cat_sizes[j])]
    return FEATURE_NAMES + genres + numeric + cats


def readable_feature_names(names: list[str], spec, genre_names: list[str], user_vocab: dict[str, list[str]]) -> list[str]:
    """``feature_names`` as a person reads them in an explanation: ``genre:Comedy``, ``age``,
    ``occupation=student`` instead of ``genre_3``, ``user_num_0``, ``user_cat_1=7``."""
    def readable(name: str) -> str:
        kind, _, rest = name.rpartition("_")
        if kind == "genre" and rest.isdigit() and int(rest) < len(genre_names):
            return f"genre:{genre_names[int(rest)]}"
        if kind == "user_num" and rest.isdigit() and int(rest) < len(spec.user_numeric):
            return spec.user_numeric[int(rest)]
        column, _, code = name.removeprefix("user_cat_").partition("=")
        if name.startswith("user_cat_") and column.isdigit() and int(column) < len(spec.user_categorical):
            field = spec.user_categorical[int(column)]
            values = user_vocab.get(field, [])
            return f"{field}={values[int(code)] if code.isdigit() and int(code) < len(values) else code}"
        return name
    return [readable(n) for n in names]


def ranker_features(tables: RankerTables, history_items: np.ndarray, history_ratings: np.ndarray,
                    user_cat: np.ndarray, user_num: np.ndarray,
                    candidates: np.ndarray, recall_scores: np.ndarray, n_tower: int | None = None) -> np.ndarray:
    """``[n_candidates, F]`` float32 features of one request.

    ``history_items`` / ``history_ratings``: the user's history, oldest first (may be empty);
    ``user_cat`` / ``user_num``: the user's rows of the bundle's ``user_cat`` / ``user_num``;
    ``candidates``: item rows in recall order (rank 0 = best), the first ``n_tower`` (default:
    all) from the two-tower and the rest from the item-item channel (``merge_candidates``);
    ``recall_scores``: their two-tower inner products. The same as
    ``candidate_features(tables, user_features(...), ...)``, the split the service uses to compute
    the user's part once per history version.
    """
    user = user_features(tables, history_items, history_ratings, user_cat, user_num)
    return candidate_features(tables, user, candidates, recall_scores, n_tower)


VARYING = FEATURE_NAMES.index("history_log_len")  # the fixed block's leading columns that vary by candidate


def layout(n_genres: int, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """Where ``candidate_block``'s columns and ``UserFeatures.constant``'s sit in ``feature_names``' order."""
    block = np.r_[0:VARYING, len(FEATURE_NAMES):len(FEATURE_NAMES) + n_genres]
    constant = np.r_[VARYING:len(FEATURE_NAMES), len(FEATURE_NAMES) + n_genres:n_features]
    return block, constant


def assemble(block: np.ndarray, constant: np.ndarray) -> np.ndarray:
    """The ``[n, F]`` features from a candidate block and the user's constant columns."""
    n_genres = block.shape[1] - VARYING
    cols_block, cols_constant = layout(n_genres, block.shape[1] + len(constant))
    out = np.empty((len(block), len(cols_block) + len(cols_constant)), np.float32)
    out[:, cols_block] = block
    out[:, cols_constant] = constant
    return out


@dataclass(frozen=True)
class UserFeatures:
    """Everything in a request's features that depends on the user alone (history, demographics)."""

    n_history: int
    genres: np.ndarray  # recency-weighted genre taste
    profile: np.ndarray  # unit mean vector of the history
    log_pop: float
    year: float
    mean_rating: float
    sim_matrix: np.ndarray  # [d, r + 1]: the recent items' vectors (newest first), then ``profile``
    recent_weights: np.ndarray  # [r] recency weights
    neighbour_ids: np.ndarray  # sorted item rows that are neighbours of a recent item
    neighbour_total: np.ndarray  # their recency-weighted summed neighbour weight
    neighbour_best: np.ndarray  # their largest neighbour weight
    seq_ids: np.ndarray  # the same from the sequence neighbour lists
    seq_total: np.ndarray
    seq_best: np.ndarray
    constant: np.ndarray  # [history_log_len, user_mean_rating, demographics...] the columns every candidate shares


def user_features(tables: RankerTables, history_items: np.ndarray, history_ratings: np.ndarray,
                  user_cat: np.ndarray, user_num: np.ndarray) -> UserFeatures:
    history_items = np.asarray(history_items, np.int64)
    history_ratings = np.asarray(history_ratings, np.float32)
    profile = _user_profile(tables, history_items, history_ratings)
    recent = history_items[-RECENT:][::-1]  # newest first
    weights = np.exp(-np.arange(len(recent)) / RECENCY_HALFLIFE).astype(np.float32)
    ease = _neighbour_evidence(tables.item_neighbours, tables.item_neighbour_sims, recent, weights)
    seq = _neighbour_evidence(tables.item_seq_neighbours, tables.item_seq_neighbour_sims, recent, weights)
    constant = np.concatenate([[np.log1p(len(history_items)), profile["mean_rating"]], np.asarray(user_num, np.float32),
                               _one_hot(tables, user_cat)]).astype(np.float32)
    sim_matrix = np.ascontiguousarray(np.column_stack([tables.item_vectors[recent].T, profile["profile"]]), np.float32)
    return UserFeatures(len(history_items), profile["genres"].astype(np.float32), profile["profile"], profile["log_pop"],
                        profile["year"], profile["mean_rating"], sim_matrix, weights, *ease, *seq, constant)


def candidate_features(tables: RankerTables, user: UserFeatures, candidates: np.ndarray, recall_scores: np.ndarray,
                       n_tower: int | None = None) -> np.ndarray:
    """The request's ``[n_candidates, F]`` features from the user's part and the candidates (the
    first ``n_tower`` from the two-tower, default all; the rest from the item-item channel)."""
    return assemble(candidate_block(tables, user, candidates, recall_scores, n_tower), user.constant)


def candidate_block(tables: RankerTables, user: UserFeatures, candidates: np.ndarray, recall_scores: np.ndarray,
                    n_tower: int | None = None) -> np.ndarray:
    """The columns that vary by candidate, ``[n, VARYING + n_genres]``: one matmul for every vector similarity,
    then one compiled pass (``_fill_block``) instead of some forty numpy calls on short arrays."""
    cands = np.asarray(candidates, np.int64)
    n_tower = len(cands) if n_tower is None else n_tower
    sims = np.take(tables.item_vectors, cands, axis=0) @ user.sim_matrix
    out = np.empty((len(cands), VARYING + tables.item_genres.shape[1]), np.float32)
    _fill_block(out, cands, np.asarray(recall_scores, np.float32), n_tower, sims, user.recent_weights,
                user.neighbour_ids, user.neighbour_total, user.neighbour_best, user.seq_ids, user.seq_total, user.seq_best,
                tables.item_static, tables.item_genres, user.genres, user.log_pop, user.year)
    return out


def compile_kernels(tables: RankerTables) -> None:
    """Compile the feature kernel (or load it from numba's cache, ``NUMBA_CACHE_DIR``) for these tables' types, so
    that the first request does not pay the seconds it takes."""
    user = user_features(tables, np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(len(tables.user_cat_sizes), np.int64),
                         np.zeros(0, np.float32))
    candidate_block(tables, user, np.zeros(1, np.int64), np.zeros(1, np.float32))


@njit(cache=True, nogil=True)
def _fill_block(out, cands, scores, n_tower, sims, weights, nb_ids, nb_total, nb_best, seq_ids, seq_total, seq_best,
                item_static, item_genres, user_genres, user_log_pop, user_year):  # pragma: no cover (compiled)
    """``candidate_block``'s columns in FEATURE_NAMES order, then the item's genres. ``sims``: each candidate's
    cosine to the recent items (newest first) and, last, to the history's profile."""
    n, r, n_genres = len(cands), len(weights), item_genres.shape[1]
    top, total = -np.inf, 0.0
    for i in range(n):
        top = max(top, scores[i])
        total += scores[i]
    mean = total / max(n, 1)
    spread = 0.0
    for i in range(n):
        spread += (scores[i] - mean) ** 2
    std = np.sqrt(spread / max(n, 1))
    weight_sum = 0.0
    for j in range(r):
        weight_sum += weights[j]
    for i in range(n):
        c, s = cands[i], scores[i]
        out[i, 0], out[i, 1], out[i, 2] = s, np.log1p(i), s - top
        out[i, 3], out[i, 4] = (s - mean) / (std + 1e-6), 1.0 if i >= n_tower else 0.0
        if r:
            best, at, weighted = sims[i, 0], 0, 0.0
            for j in range(r):
                weighted += sims[i, j] * weights[j]
                if sims[i, j] > best:
                    best, at = sims[i, j], j
            out[i, 5], out[i, 6], out[i, 7], out[i, 8] = sims[i, 0], best, weighted / weight_sum, at
        else:
            out[i, 5], out[i, 6], out[i, 7], out[i, 8] = 0.0, 0.0, 0.0, RECENT
        out[i, 9] = sims[i, r]
        out[i, 10], out[i, 11] = _evidence(nb_ids, nb_total, nb_best, c)
        out[i, 12], out[i, 13] = _evidence(seq_ids, seq_total, seq_best, c)
        has, taste = 0.0, 0.0
        for g in range(n_genres):
            has += item_genres[c, g]
            taste += item_genres[c, g] * user_genres[g]
            out[i, VARYING + g] = item_genres[c, g]
        out[i, 14] = taste / max(has, 1.0)
        log_pop, rating, year, missing = item_static[c, 0], item_static[c, 1], item_static[c, 2], item_static[c, 3]
        out[i, 15], out[i, 16], out[i, 17] = log_pop, log_pop - user_log_pop, rating
        out[i, 18], out[i, 19], out[i, 20] = year, missing, year - user_year


@njit(cache=True, nogil=True)
def _evidence(ids, totals, bests, item):  # pragma: no cover (compiled)
    """An item's neighbour evidence from the user's sorted lists: (recency-weighted total, max weight, >= 0)."""
    at = np.searchsorted(ids, item)
    if at < len(ids) and ids[at] == item:
        return totals[at], max(bests[at], 0.0)
    return 0.0, 0.0


def merge_candidates(user: UserFeatures, items: np.ndarray, scores: np.ndarray, user_vector: np.ndarray,
                     item_vectors: np.ndarray, extra: int,
                     admit: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
    """Multi-channel recall: the two-tower's candidates, then up to ``extra`` items of the item-item
    channel that the two-tower missed.

    The item-item channel ranks the recent items' neighbours by ``channel_evidence`` (recency-weighted
    EASE and sequence-neighbour scores blended; ties to the lower row); ``admit`` says which of them the
    request may return (not seen, passing its filters). It finds what a user's last few items imply
    next, which the tower's single vector blurs. Added items get their two-tower score (inner product with
    ``user_vector``) so every candidate's score features mean one thing. Returns the merged items and
    scores and how many came from the two-tower. The offline evaluation and the service both call it.
    """
    n_tower = len(items)
    if extra <= 0:
        return items, scores, n_tower
    ids, total = channel_evidence(user)
    fresh = (total > 0) & ~np.isin(ids, items)
    fresh[fresh] = admit(ids[fresh])
    new, _ = row_top(ids[fresh], total[fresh], extra)
    new_scores = (item_vectors[new] @ user_vector).astype(np.float32)
    return np.concatenate([items, new]).astype(np.int64), np.concatenate([scores, new_scores]), n_tower


def channel_evidence(user: UserFeatures) -> tuple[np.ndarray, np.ndarray]:
    """The item-item channel's score of every item a recent item points at (sorted rows): the recency-weighted
    EASE and sequence-neighbour evidence, each scaled to a maximum of 1, averaged, as the strongest peer
    (recency-weighted EASE + SeqKNN) blends them."""
    ids = np.union1d(user.neighbour_ids, user.seq_ids)
    score = np.zeros(len(ids))
    for own, total in ((user.neighbour_ids, user.neighbour_total), (user.seq_ids, user.seq_total)):
        top = float(total.max()) if len(total) else 0.0
        if top > 0:
            score[np.searchsorted(ids, own)] += 0.5 * total / top
    return ids, score


def _user_profile(tables: RankerTables, items: np.ndarray, ratings: np.ndarray) -> dict:
    """Per-user aggregates of the history: recency-weighted genre taste, mean vector, year, popularity."""
    if not len(items):
        zeros = np.zeros(tables.item_genres.shape[1], np.float32)
        return {"genres": zeros, "profile": np.zeros(tables.item_vectors.shape[1], np.float32),
                "log_pop": 0.0, "year": tables.year_fill, "mean_rating": tables.rating_prior}
    w = np.exp(-np.arange(len(items))[::-1] / GENRE_HALFLIFE).astype(np.float32)
    genres = w @ tables.item_genres[items] / w.sum()
    profile = tables.item_vectors[items].mean(axis=0)
    profile /= max(float(np.linalg.norm(profile)), 1e-6)
    static = tables.item_static[items]
    rated = ratings[ratings > 0]  # 0: no rating given (an event without one, a new user's recent_items), not a 0
    return {"genres": genres, "profile": profile, "log_pop": float(static[:, 0].mean()), "year": float(static[:, 2].mean()),
            "mean_rating": float(rated.mean()) if len(rated) else tables.rating_prior}


def _neighbour_evidence(nbrs: np.ndarray, nbr_sims: np.ndarray, recent: np.ndarray,
                        weights: np.ndarray) -> tuple[np.ndarray, ...]:
    """Item-item evidence from the train window, per item: the recency-weighted sum and the max of its
    neighbour weight from the recent items (a recency-weighted EASE or SeqKNN score, after the table),
    for the sorted item rows that have any."""
    if not len(recent):
        return np.zeros(0, np.int64), np.zeros(0, np.float64), np.zeros(0, np.float64)
    neighbours = nbrs[recent].ravel()
    sims = nbr_sims[recent]
    keep = neighbours >= 0  # -1 pads the neighbour lists
    ids, slot = np.unique(neighbours[keep], return_inverse=True)
    total = np.bincount(slot, weights=(weights[:, None] * sims).ravel()[keep], minlength=len(ids))
    best = np.full(len(ids), -np.inf)
    np.maximum.at(best, slot, sims.ravel()[keep].astype(np.float64))
    return ids, total, best


def _one_hot(tables: RankerTables, user_cat: np.ndarray) -> np.ndarray:
    """One-hot blocks of the small-vocabulary user columns (an out-of-range code gives all zeros)."""
    parts = []
    for j in tables.one_hot_columns:
        block = np.zeros(tables.user_cat_sizes[j], np.float32)
        code = int(user_cat[j])
        if 0 <= code < len(block):
            block[code] = 1.0
        parts.append(block)
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)
