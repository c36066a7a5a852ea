"""Synthetic interactions with planted structure, at any size.

Each user and item has a latent factor; items carry genres aligned with their factor and a
Zipf popularity bias; a user's taste drifts from one factor to another over time, so recent
history carries more signal than old history (as it does in MovieLens). Tests use small
instances to check that models recover the structure; benchmarks use large ones.
"""
from __future__ import annotations

import numpy as np

from offline.dataset import Dataset, FeatureTable, Interactions, ItemTable, UNKNOWN

_SEGMENTS = 4  # taste drift is applied in this many time segments per user


def generate(
    n_users: int = 500,
    n_items: int = 1000,
    n_genres: int = 8,
    dim: int = 8,
    interactions_per_user: int = 40,
    pool_size: int = 300,
    popularity_skew: float = 1.0,
    seed: int = 0,
) -> Dataset:
    """A Dataset whose interactions follow ``softmax(user_factor(t) . item_factor + pop_bias)``."""
    rng = np.random.default_rng(seed)
    item_f = _unit(rng.normal(size=(n_items, dim)))
    genre_f = _unit(rng.normal(size=(n_genres, dim)))
    genres = _genres_from_factors(item_f, genre_f, rng)
    pop_bias = -popularity_skew * np.log1p(rng.permutation(n_items)).astype(np.float64)
    user_start = _unit(rng.normal(size=(n_users, dim)))
    user_end = _unit(user_start + 0.7 * rng.normal(size=(n_users, dim)))
    per_user = np.minimum(rng.poisson(interactions_per_user, n_users) + 5, min(pool_size, n_items) // 2)
    users, items, ratings, times = [], [], [], []
    pop_p = np.exp(pop_bias - pop_bias.max())
    pop_p /= pop_p.sum()
    for u in range(n_users):
        pool = rng.choice(n_items, size=min(pool_size, n_items), replace=False, p=pop_p)
        chosen, affinity = _sample_history(rng, pool, item_f, user_start[u], user_end[u], int(per_user[u]))
        users.append(np.full(len(chosen), u))
        items.append(chosen)
        ratings.append(np.clip(np.round(2.4 + 3 * affinity + rng.normal(0, 0.7, len(chosen))), 1, 5))
        times.append(1_000_000 + u * 10 + np.sort(rng.choice(10_000_000, len(chosen), replace=False)))
    inter = Interactions(
        np.concatenate(users).astype(np.int64),
        np.concatenate(items).astype(np.int64),
        np.concatenate(ratings).astype(np.float32),
        np.concatenate(times).astype(np.int64),
    )
    return Dataset(
        name=f"synthetic-{n_users}x{n_items}",
        interactions=inter,
        user_ids=[f"u{u}" for u in range(n_users)],
        item_ids=[f"i{i}" for i in range(n_items)],
        users=_user_features(user_start, rng),
        items=ItemTable(
            titles=[f"Item {i}" for i in range(n_items)],
            year=rng.integers(1950, 2020, n_items).astype(np.float32),
            genres=genres,
            genre_names=[f"genre{g}" for g in range(n_genres)],
            extra=FeatureTable(n_rows=n_items),
        ),
    )


def item_vectors(n_items: int, dim: int, intrinsic_dim: int = 16, n_clusters: int = 256, seed: int = 0) -> np.ndarray:
    """Clustered unit vectors (float32) for ANN benchmarks at 1M+ scale, without interactions.

    Learned embeddings are far from isotropic: most of their variance lives in a few
    directions. Points are drawn around cluster centres in an ``intrinsic_dim``-dimensional
    latent space, mapped linearly to ``dim`` and given a little full-rank noise.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, intrinsic_dim)).astype(np.float32)
    latent = centres[rng.integers(0, n_clusters, n_items)] + 0.5 * rng.normal(size=(n_items, intrinsic_dim)).astype(np.float32)
    basis = rng.normal(size=(intrinsic_dim, dim)).astype(np.float32) / np.sqrt(intrinsic_dim)
    vectors = latent @ basis + 0.05 * rng.normal(size=(n_items, dim)).astype(np.float32)
    return _unit(vectors).astype(np.float32)


def _sample_history(rng, pool, item_f, start, end, n) -> tuple[np.ndarray, np.ndarray]:
    """Distinct items from ``pool``, later segments favouring the user's drifted taste."""
    chosen: list[int] = []
    affinity: list[float] = []
    taken = np.zeros(len(pool), dtype=bool)
    for seg, count in enumerate(np.array_split(np.arange(n), _SEGMENTS)):
        w = seg / max(_SEGMENTS - 1, 1)
        taste = _unit((1 - w) * start + w * end)
        aff = item_f[pool] @ taste
        logits = 4.0 * aff + rng.gumbel(size=len(pool))
        logits[taken] = -np.inf
        pick = np.argsort(-logits)[: len(count)]
        taken[pick] = True
        chosen.extend(pool[pick].tolist())
        affinity.extend(aff[pick].tolist())
    return np.array(chosen, dtype=np.int64), np.array(affinity)


def _genres_from_factors(item_f: np.ndarray, genre_f: np.ndarray, rng) -> np.ndarray:
    """Each item gets its best-aligned genre plus, sometimes, a second one."""
    sim = item_f @ genre_f.T
    order = np.argsort(-sim, axis=1)
    genres = np.zeros(sim.shape, dtype=bool)
    genres[np.arange(len(sim)), order[:, 0]] = True
    second = rng.random(len(sim)) < 0.4
    genres[np.flatnonzero(second), order[second, 1]] = True
    return genres


def _user_features(user_f: np.ndarray, rng) -> FeatureTable:
    """Demographics loosely tied to the latent factor, so they carry some real signal."""
    n = len(user_f)
    age = np.clip(35 + 12 * user_f[:, 0] + rng.normal(0, 5, n), 10, 80).astype(np.float32)
    gender = np.where(user_f[:, 1] + rng.normal(0, 0.3, n) > 0, 1, 2)
    occupation = 1 + (np.argmax(user_f[:, 2:6], axis=1) if user_f.shape[1] >= 6 else rng.integers(0, 4, n))
    return FeatureTable(
        n_rows=n,
        categorical={"gender": gender.astype(np.int64), "occupation": occupation.astype(np.int64)},
        vocab={"gender": [UNKNOWN, "F", "M"], "occupation": [UNKNOWN, "a", "b", "c", "d"]},
        numeric={"age": age},
    )


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)
