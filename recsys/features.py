"""Tower inputs built from typed tables: the one feature code that training and serving share.

Every function here is pure numpy over the tables a bundle carries, so the trainer and the
service produce byte-identical inputs for the same user. Conventions:
- id inputs are ``row + 1``; 0 means "unknown" (a user or item the model never saw);
- history windows are right-aligned: slot ``history_len - 1`` holds the newest item;
- numeric features are standardised with statistics from the training tables; NaN -> 0 (the mean);
  values outside the range seen in training are clipped to it first: a tower never saw them, and a
  linear layer extrapolates without bound (``age = 1e308`` would swamp every other input), while
  a slightly-out-of-range real value (a new item's larger price) still deserves an answer.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from recsys.dataset import FeatureTable, ItemTable


@dataclass
class FeatureSpec:
    """Shapes and statistics the towers' inputs depend on; stored in the bundle manifest."""

    user_categorical: list[str]
    user_cat_sizes: list[int]
    user_numeric: list[str]
    user_num_mean: list[float]
    user_num_std: list[float]
    item_categorical: list[str]
    item_cat_sizes: list[int]
    item_numeric: list[str]
    item_num_mean: list[float]
    item_num_std: list[float]
    n_genres: int
    year_mean: float
    year_std: float
    history_len: int
    # the range seen in training, for clipping (None in bundles written before it was recorded)
    user_num_min: list[float] | None = None
    user_num_max: list[float] | None = None
    item_num_min: list[float] | None = None
    item_num_max: list[float] | None = None
    # item text (recsys/text.py): the columns joined, the encoder's dimension (0 = the tower reads no text) and
    # which encoder (name, wheel, sha256 of its weights) wrote the bundle's vectors
    text_columns: list[str] | None = None
    text_dim: int = 0
    text_encoder: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def n_item_dense(self) -> int:
        return 2 + len(self.item_numeric)  # year (standardised), year missing, numerics


def build_spec(users: FeatureTable, items: ItemTable, history_len: int) -> FeatureSpec:
    """Statistics from the loaded tables (features, not interactions: no label leakage)."""
    years = items.year[np.isfinite(items.year)]
    return FeatureSpec(
        user_categorical=sorted(users.categorical),
        user_cat_sizes=[len(users.vocab[c]) for c in sorted(users.categorical)],
        user_numeric=sorted(users.numeric),
        user_num_mean=[float(np.nanmean(users.numeric[c])) for c in sorted(users.numeric)],
        user_num_std=[_std(users.numeric[c]) for c in sorted(users.numeric)],
        item_categorical=sorted(items.extra.categorical),
        item_cat_sizes=[len(items.extra.vocab[c]) for c in sorted(items.extra.categorical)],
        item_numeric=sorted(items.extra.numeric),
        item_num_mean=[float(np.nanmean(items.extra.numeric[c])) for c in sorted(items.extra.numeric)],
        item_num_std=[_std(items.extra.numeric[c]) for c in sorted(items.extra.numeric)],
        n_genres=items.genres.shape[1],
        year_mean=float(years.mean()) if len(years) else 0.0,
        year_std=_std(years) if len(years) else 1.0,
        history_len=history_len,
        user_num_min=[_finite_bound(np.nanmin, users.numeric[c]) for c in sorted(users.numeric)],
        user_num_max=[_finite_bound(np.nanmax, users.numeric[c]) for c in sorted(users.numeric)],
        item_num_min=[_finite_bound(np.nanmin, items.extra.numeric[c]) for c in sorted(items.extra.numeric)],
        item_num_max=[_finite_bound(np.nanmax, items.extra.numeric[c]) for c in sorted(items.extra.numeric)],
    )


def user_feature_matrices(spec: FeatureSpec, users: FeatureTable) -> tuple[np.ndarray, np.ndarray]:
    """``(categorical codes [n, C] int64, standardised numerics [n, N] float32)`` for every user."""
    cat = np.stack([users.categorical[c] for c in spec.user_categorical], 1) if spec.user_categorical else np.zeros((users.n_rows, 0))
    num = np.stack([users.numeric[c] for c in spec.user_numeric], 1) if spec.user_numeric else np.zeros((users.n_rows, 0))
    return cat.astype(np.int64), _standardise(num, spec.user_num_mean, spec.user_num_std, spec.user_num_min, spec.user_num_max)


def encode_user_features(spec: FeatureSpec, vocab: FeatureTable, raw: dict[str, object]) -> tuple[np.ndarray, np.ndarray]:
    """Inputs for a user the model never saw, from raw feature values (unknown values -> code 0 / mean).
    ``vocab``: the bundle's user vocabularies as a table made once, whose lookups are built once (``codes_of``)."""
    cat = np.array([[vocab.encode(c, raw.get(c)) for c in spec.user_categorical]], np.int64)
    num = np.array([[_to_float(raw.get(c)) for c in spec.user_numeric]], np.float64)
    return cat.reshape(1, -1), _standardise(num.reshape(1, -1), spec.user_num_mean, spec.user_num_std,
                                            spec.user_num_min, spec.user_num_max)


def codes_of(vocab: dict[str, list[str]]) -> FeatureTable:
    """The vocabularies a bundle carries, as the table whose ``encode`` codes raw values: its lookups (value ->
    code) are built at its first use and kept, where a table made per request or per item would build every
    value's lookup each time, O(vocabulary) (9 ms for a column of 50,000 values)."""
    return FeatureTable(n_rows=0, vocab=vocab)


def item_feature_matrices(spec: FeatureSpec, items: ItemTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(genres [n, G] float32, dense [n, D] float32, categorical [n, C] int64)`` for every item."""
    n = items.n_items
    year = items.year.astype(np.float64)
    missing = ~np.isfinite(year)
    year_std = np.where(missing, 0.0, (np.nan_to_num(year) - spec.year_mean) / spec.year_std)
    nums = [items.extra.numeric[c] for c in spec.item_numeric]
    num = _standardise(np.stack(nums, 1) if nums else np.zeros((n, 0)), spec.item_num_mean, spec.item_num_std,
                       spec.item_num_min, spec.item_num_max)
    dense = np.concatenate([year_std[:, None], missing[:, None], num], axis=1).astype(np.float32)
    cats = [items.extra.categorical[c] for c in spec.item_categorical]
    cat = np.stack(cats, 1).astype(np.int64) if cats else np.zeros((n, 0), np.int64)
    return items.genres.astype(np.float32), dense, cat


def encode_item_features(spec: FeatureSpec, vocab: FeatureTable, genres: np.ndarray, years: Sequence[float | None],
                         raws: Sequence[dict[str, object]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tower inputs of items added at serving time, one row each, through the very code that encodes the
    training catalogue (a table of these rows); unknown categorical values -> code 0, missing numbers -> mean.
    ``vocab``: the bundle's item vocabularies (``codes_of``)."""
    n = len(raws)
    extra = FeatureTable(n_rows=n, vocab=vocab.vocab)
    extra.categorical = {c: np.array([vocab.encode(c, raw.get(c)) for raw in raws], np.int64) for c in spec.item_categorical}
    extra.numeric = {c: np.array([_to_float(raw.get(c)) for raw in raws], np.float64) for c in spec.item_numeric}
    table = ItemTable(titles=[""] * n, year=np.array([np.nan if y is None else y for y in years], np.float32),
                      genres=np.asarray(genres, bool).reshape(n, -1), genre_names=[], extra=extra)
    return item_feature_matrices(spec, table)


def history_windows(
    items: np.ndarray, ratings: np.ndarray, starts: np.ndarray, ends: np.ndarray, history_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Right-aligned windows of ``items[start:end]`` (the last ``history_len``) for each row.

    Returns ``(item ids = row + 1, 0 = padding)`` and ``(rating codes 1..5, 0 = padding/unknown)``,
    both ``[len(starts), history_len]`` int64. Training calls this with one window per example;
    serving calls it with one window per request.
    """
    idx = ends[:, None] - history_len + np.arange(history_len)[None, :]
    valid = idx >= starts[:, None]
    safe = np.clip(idx, 0, max(len(items) - 1, 0))
    if not len(items):
        return np.zeros(idx.shape, np.int64), np.zeros(idx.shape, np.int64)
    hist_items = np.where(valid, items[safe] + 1, 0)
    codes = np.clip(np.rint(np.nan_to_num(ratings[safe])), 0, 5)  # only the gathered entries: training calls this
    hist_ratings = np.where(valid, codes, 0)  # every step with every train event in ``ratings``
    return hist_items.astype(np.int64), hist_ratings.astype(np.int64)


def user_tower_inputs(id_inputs: np.ndarray, cat: np.ndarray, num: np.ndarray, histories: Sequence[np.ndarray],
                      ratings: Sequence[np.ndarray], history_len: int) -> tuple[np.ndarray, ...]:
    """The user tower's five inputs for a batch of users, as both sides build them: training and evaluation
    (``offline.train_recall.TowerTables.user_vectors``) and the service (``recsys.engine.users``).

    ``id_inputs``: user row + 1, or 0 for a user the model never saw; ``histories[i]`` the user's item rows,
    oldest first, with ``ratings[i]``. Returns ``(ids, cat, num, hist_items, hist_ratings)`` as int64 /
    float32 arrays, the history as right-aligned windows of the last ``history_len`` (``history_windows``).
    """
    lengths = np.array([len(h) for h in histories], np.int64)
    ends = np.cumsum(lengths)
    flat_items = np.concatenate(histories).astype(np.int64) if len(histories) else np.zeros(0, np.int64)
    flat_ratings = np.concatenate(ratings).astype(np.float32) if len(ratings) else np.zeros(0, np.float32)
    hist_items, hist_ratings = history_windows(flat_items, flat_ratings, ends - lengths, ends, history_len)
    return (np.asarray(id_inputs, np.int64), np.asarray(cat, np.int64), np.asarray(num, np.float32), hist_items,
            hist_ratings)


def single_history(items: np.ndarray, ratings: np.ndarray, history_len: int) -> tuple[np.ndarray, np.ndarray]:
    """One user's window from their full time-ordered history (a batch of users: ``user_tower_inputs``)."""
    n = np.array([len(items)])
    return history_windows(np.asarray(items, np.int64), np.asarray(ratings, np.float32), np.zeros(1, np.int64), n, history_len)


def _standardise(x: np.ndarray, mean: list[float], std: list[float],
                 low: list[float] | None = None, high: list[float] | None = None) -> np.ndarray:
    """``(clip(x, low, high) - mean) / std``; NaN (missing) -> 0, the mean."""
    if not x.shape[1]:
        return x.astype(np.float32)
    x = x.astype(np.float64)
    if low is not None and high is not None:
        x = np.clip(x, np.array(low), np.array(high))  # NaN stays NaN
    z = (x - np.array(mean)) / np.array(std)
    return np.nan_to_num(z, nan=0.0).astype(np.float32)


def _finite_bound(reduce, x: np.ndarray) -> float:
    """The column's min or max over its finite values (0 for a column with none)."""
    finite = x[np.isfinite(x)]
    return float(reduce(finite)) if len(finite) else 0.0


def _std(x: np.ndarray) -> float:
    s = float(np.nanstd(x)) if np.isfinite(x).any() else 0.0
    return s if s > 1e-8 else 1.0


def _to_float(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")
