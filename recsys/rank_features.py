"""Re-ranker features: the one function that builds ranker inputs for training and for serving.

``ranker_features`` turns one request (a user's time-ordered history, demographics and the
recall stage's candidates) into a ``[n_candidates, F]`` float32 matrix. The trainer calls it
once per query; the service calls it once per request with the same arrays from the bundle,
so training and serving cannot drift apart. It is plain vectorised numpy: about 0.4 ms for
200 candidates on one core (docs/benchmarks.md, "Re-ranker").

Statistics that come from interactions (popularity, average rating, item neighbours)
are computed on the train window only (``ranker_arrays``), so the ranker's labels,
which come from the later valid window, never leak into its features. The values here are
raw; the ranker standardises them with statistics it stores itself.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

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

    def __post_init__(self) -> None:
        """Derived per-item columns, computed once so a request only gathers rows."""
        known = np.isfinite(self.item_year)
        self.year_fill = float(self.item_year[known].mean()) if known.any() else 0.0
        self.item_log_pop = np.log1p(self.item_popularity).astype(np.float32)
        rated = np.isfinite(self.item_avg_rating) & (self.item_popularity > 0)
        counts = np.where(rated, self.item_popularity, 0.0)
        prior = float(np.average(self.item_avg_rating[rated], weights=counts[rated])) if rated.any() else 0.0
        mean = np.where(rated, self.item_avg_rating, prior)
        shrunk = (mean * counts + prior * RATING_PRIOR_WEIGHT) / (counts + RATING_PRIOR_WEIGHT)
        self.rating_prior = prior
        self.item_static = np.column_stack([
            self.item_log_pop, shrunk, np.where(known, self.item_year, self.year_fill), ~known,
        ]).astype(np.float32)
        self.one_hot_columns = np.flatnonzero(self.user_cat_sizes <= ONE_HOT_MAX)

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


@dataclass(frozen=True)
class UserFeatures:
    """Everything in a request's features that depends on the user alone (history, demographics)."""

    n_history: int
    genres: np.ndarray  # recency-weighted genre taste
    profile: np.ndarray  # unit mean vector of the history
    log_pop: float
    year: float
    mean_rating: float
    recent_vectors: np.ndarray  # [r, d] the recent items' vectors, newest first
    recent_weights: np.ndarray  # [r] recency weights
    neighbour_ids: np.ndarray  # sorted item rows that are neighbours of a recent item
    neighbour_total: np.ndarray  # their recency-weighted summed neighbour weight
    neighbour_best: np.ndarray  # their largest neighbour weight
    seq_ids: np.ndarray  # the same from the sequence neighbour lists
    seq_total: np.ndarray
    seq_best: np.ndarray
    demographics: np.ndarray


def user_features(tables: RankerTables, history_items: np.ndarray, history_ratings: np.ndarray,
                  user_cat: np.ndarray, user_num: np.ndarray) -> UserFeatures:
    history_items = np.asarray(history_items, np.int64)
    history_ratings = np.asarray(history_ratings, np.float32)
    profile = _user_profile(tables, history_items, history_ratings)
    recent = history_items[-RECENT:][::-1]  # newest first
    weights = np.exp(-np.arange(len(recent)) / RECENCY_HALFLIFE).astype(np.float32)
    ease = _neighbour_evidence(tables.item_neighbours, tables.item_neighbour_sims, recent, weights)
    seq = _neighbour_evidence(tables.item_seq_neighbours, tables.item_seq_neighbour_sims, recent, weights)
    demographics = np.concatenate([np.asarray(user_num, np.float32), _one_hot(tables, user_cat)])
    return UserFeatures(len(history_items), profile["genres"], profile["profile"], profile["log_pop"], profile["year"],
                        profile["mean_rating"], tables.item_vectors[recent], weights, *ease, *seq, demographics)


def candidate_features(tables: RankerTables, user: UserFeatures, candidates: np.ndarray, recall_scores: np.ndarray,
                       n_tower: int | None = None) -> np.ndarray:
    """The request's ``[n_candidates, F]`` features from the user's part and the candidates (the
    first ``n_tower`` from the two-tower, default all; the rest from the item-item channel)."""
    n = len(candidates)
    n_tower = n if n_tower is None else n_tower
    scores = np.asarray(recall_scores, np.float32)
    cand_vecs = tables.item_vectors[candidates]
    static = tables.item_static[candidates]
    genres = tables.item_genres[candidates]
    fixed = np.column_stack([
        scores,
        np.log1p(np.arange(n)),
        scores - (scores.max() if n else 0.0),
        (scores - scores.mean()) / (scores.std() + 1e-6) if n else scores,
        np.arange(n) >= n_tower,
        *_vector_similarities(cand_vecs, user),
        *_neighbour_weights(user.neighbour_ids, user.neighbour_total, user.neighbour_best, np.asarray(candidates, np.int64)),
        *_neighbour_weights(user.seq_ids, user.seq_total, user.seq_best, np.asarray(candidates, np.int64)),
        genres @ user.genres / np.maximum(genres.sum(axis=1), 1.0),
        static[:, 0],
        static[:, 0] - user.log_pop,
        static[:, 1],
        static[:, 2],
        static[:, 3],
        static[:, 2] - user.year,
        np.full(n, np.log1p(user.n_history)),
        np.full(n, user.mean_rating),
    ])
    return np.concatenate([fixed, genres, np.broadcast_to(user.demographics, (n, len(user.demographics)))],
                          axis=1).astype(np.float32)


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
    return {"genres": genres, "profile": profile, "log_pop": float(static[:, 0].mean()),
            "year": float(static[:, 2].mean()), "mean_rating": float(ratings.mean())}


def _vector_similarities(cand_vecs: np.ndarray, user: UserFeatures) -> list[np.ndarray]:
    """Cosine to the newest item, max and recency-weighted mean over the recent ones, how many steps
    back the most similar recent item lies, and cosine to the mean of the whole history."""
    n = len(cand_vecs)
    if not len(user.recent_weights):
        return [np.zeros(n, np.float32)] * 3 + [np.full(n, float(RECENT), np.float32), np.zeros(n, np.float32)]
    sims = cand_vecs @ user.recent_vectors.T  # [n, r], column 0 = newest
    w = user.recent_weights
    return [sims[:, 0], sims.max(axis=1), sims @ w / w.sum(), sims.argmax(axis=1).astype(np.float32), cand_vecs @ user.profile]


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


def _neighbour_weights(ids: np.ndarray, totals: np.ndarray, bests: np.ndarray, candidates: np.ndarray) -> list[np.ndarray]:
    """The candidates' neighbour evidence (0 for a candidate no recent item points at)."""
    n = len(candidates)
    total, best = np.zeros(n, np.float32), np.zeros(n, np.float32)
    if not len(ids) or not n:
        return [total, best]
    pos = np.clip(np.searchsorted(ids, candidates), 0, len(ids) - 1)
    hit = ids[pos] == candidates
    total[hit] = totals[pos[hit]]
    best[hit] = np.maximum(bests[pos[hit]], 0.0)
    return [total, best]


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
