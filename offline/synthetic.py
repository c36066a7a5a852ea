"""Synthetic interactions with planted structure, at any size.

Each user and item has a latent factor; items carry genres aligned with their factor and a
Zipf popularity bias; a user's taste drifts from one factor to another over time, so recent
history carries more signal than old history (as it does in MovieLens). Tests use small
instances to check that models recover the structure; benchmarks use large ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recsys.dataset import Dataset, FeatureTable, Interactions, ItemTable, UNKNOWN

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
    chunk: int = 20_000,
    text: bool = False,
) -> Dataset:
    """A Dataset whose interactions follow ``softmax(user_factor(t) . item_factor + pop_bias)``.

    Vectorised over ``chunk`` users at a time, so 100k users x 100k items x 10M interactions take
    seconds and memory ``chunk x pool_size``: the scaling benchmark generates its data with it.
    ``text``: items get a title and a description whose words follow their factor (``topic_texts``); drawn
    from a generator of their own, so the interactions are the same with or without text.
    """
    rng = np.random.default_rng(seed)
    truth = _draw_truth(rng, n_users, n_items, n_genres, dim, popularity_skew)
    item_f, genres, pop_bias = truth.item_f, truth.genres, truth.pop_bias
    user_start, user_end = truth.user_start, truth.user_end
    pool_size = min(pool_size, n_items)
    per_user = np.minimum(rng.poisson(interactions_per_user, n_users) + 5, pool_size // 2)
    pop_p = np.exp(pop_bias - pop_bias.max())
    parts = [_user_block(rng, np.arange(s, min(s + chunk, n_users)), per_user, pool_size, pop_p, item_f,
                         user_start, user_end) for s in range(0, n_users, chunk)]
    inter = Interactions(*(np.concatenate([p[f] for p in parts]) for f in range(4)))
    titles, descriptions = topic_texts(item_f, seed) if text else ([f"Item {i}" for i in range(n_items)], [])
    return Dataset(
        name=f"synthetic-{n_users}x{n_items}",
        interactions=inter,
        user_ids=[f"u{u}" for u in range(n_users)],
        item_ids=[f"i{i}" for i in range(n_items)],
        users=_user_features(user_start, rng),
        items=ItemTable(
            titles=titles,
            year=rng.integers(1950, 2020, n_items).astype(np.float32),
            genres=genres,
            genre_names=[f"genre{g}" for g in range(n_genres)],
            extra=FeatureTable(n_rows=n_items),
            text={"title": titles, "description": descriptions} if text else {},
        ),
    )


@dataclass(frozen=True)
class Truth:
    """The planted structure behind ``generate``: unit factors of items, genres and users (taste at the start and
    at the end of each user's history), each item's genres and its log-popularity bias."""

    item_f: np.ndarray  # [n_items, dim]
    genre_f: np.ndarray  # [n_genres, dim]
    genres: np.ndarray  # [n_items, n_genres] bool
    pop_bias: np.ndarray  # [n_items], <= 0
    user_start: np.ndarray  # [n_users, dim]
    user_end: np.ndarray  # [n_users, dim]: the current taste

    def relevance(self, users: np.ndarray | None = None) -> np.ndarray:
        """True relevance ``user_end[u] . item_f[i]`` (in [-1, 1]) of every item for ``users`` (default: all)."""
        taste = self.user_end if users is None else self.user_end[users]
        return taste @ self.item_f.T


def planted(
    n_users: int = 500,
    n_items: int = 1000,
    n_genres: int = 8,
    dim: int = 8,
    popularity_skew: float = 1.0,
    seed: int = 0,
) -> Truth:
    """The factors ``generate`` with the same arguments plants (the same random draws, taken first), without the
    interactions: the ground truth a simulator of users clicks by. ``generate``'s own ids are ``u{row}`` and
    ``i{row}``."""
    return _draw_truth(np.random.default_rng(seed), n_users, n_items, n_genres, dim, popularity_skew)


def _draw_truth(rng, n_users: int, n_items: int, n_genres: int, dim: int, popularity_skew: float) -> Truth:
    """The first draws of ``generate`` (their order is part of its output: do not reorder)."""
    item_f = _unit(rng.normal(size=(n_items, dim)))
    genre_f = _unit(rng.normal(size=(n_genres, dim)))
    genres = _genres_from_factors(item_f, genre_f, rng)
    pop_bias = -popularity_skew * np.log1p(rng.permutation(n_items)).astype(np.float64)
    user_start = _unit(rng.normal(size=(n_users, dim)))
    user_end = _unit(user_start + 0.7 * rng.normal(size=(n_users, dim)))
    return Truth(item_f, genre_f, genres, pop_bias, user_start, user_end)


def _user_block(rng, users, per_user, pool_size, pop_p, item_f, start, end) -> tuple[np.ndarray, ...]:
    """``(user, item, rating, timestamp)`` of a block of users: each draws a popularity-biased pool of
    distinct items, then picks its items from the pool segment by segment, later segments favouring
    the drifted taste (Gumbel top-k of ``4 * affinity``), oldest first."""
    pool = _popular_pools(rng, len(users), pool_size, pop_p)  # [U, P]
    counts = per_user[users]
    seg_counts = counts[:, None] // _SEGMENTS + (np.arange(_SEGMENTS)[None, :] < counts[:, None] % _SEGMENTS)  # [U, S]
    taken = np.zeros(pool.shape, bool)
    picks, affs = [], []
    for seg in range(_SEGMENTS):
        w = seg / max(_SEGMENTS - 1, 1)
        taste = _unit((1 - w) * start[users] + w * end[users])
        aff = np.einsum("upd,ud->up", item_f[pool], taste)
        logits = np.where(taken, -np.inf, 4.0 * aff + rng.gumbel(size=pool.shape))
        order = np.argsort(-logits, axis=1, kind="stable")[:, : seg_counts[:, seg].max(initial=0)]
        chosen = np.arange(order.shape[1])[None, :] < seg_counts[:, seg, None]
        rows, cols = np.nonzero(chosen)
        taken[rows, order[rows, cols]] = True
        picks.append(np.where(chosen, np.take_along_axis(pool, order, 1), -1))
        affs.append(np.take_along_axis(aff, order, 1))
    items, aff = np.concatenate(picks, 1), np.concatenate(affs, 1)
    keep = items >= 0  # row-major: each user's picks stay in segment order
    user = np.broadcast_to(users[:, None], items.shape)[keep]
    ratings = np.clip(np.round(2.4 + 3 * aff[keep] + rng.normal(0, 0.7, int(keep.sum()))), 1, 5)
    times = _distinct_times(rng, counts)
    return user.astype(np.int64), items[keep].astype(np.int64), ratings.astype(np.float32), times + 1_000_000 + user * 10


def _popular_pools(rng, n_users: int, size: int, pop_p: np.ndarray) -> np.ndarray:
    """``[n_users, size]`` distinct items per row, drawn in proportion to ``pop_p`` without replacement
    (successive draws, a repeat rejected): rounds of draws with replacement, each row keeping its first
    ``size`` distinct items, so the cost is ``n_users x size`` whatever the catalogue (no per-user
    pass over every item)."""
    n_items = len(pop_p)
    if size >= n_items:
        return np.tile(np.arange(n_items), (n_users, 1))
    cdf = np.cumsum(pop_p) / pop_p.sum()
    pools = np.zeros((n_users, size), np.int64)
    todo, draws = np.arange(n_users), 2 * size
    while len(todo):
        sample = np.minimum(np.searchsorted(cdf, rng.random((len(todo), draws)), side="right"), n_items - 1)
        order = np.argsort(sample, axis=1, kind="stable")
        ordered = np.take_along_axis(sample, order, 1)
        first = np.ones(sample.shape, bool)
        first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        distinct = np.zeros(sample.shape, bool)
        np.put_along_axis(distinct, order, first, 1)  # first occurrence of each item, in draw order
        done = distinct.sum(1) >= size
        keep = np.argsort(~distinct[done], axis=1, kind="stable")[:, :size]
        pools[todo[done]] = np.take_along_axis(sample[done], keep, 1)
        todo, draws = todo[~done], 2 * draws
    return pools


def _distinct_times(rng, counts: np.ndarray) -> np.ndarray:
    """Per user ``counts[u]`` distinct increasing offsets in ``[0, 10_000_000)``, users concatenated."""
    user = np.repeat(np.arange(len(counts)), counts)
    raw = rng.integers(0, 10_000_000 - counts.max(initial=0), len(user))
    raw = raw[np.lexsort((raw, user))]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return raw + np.arange(len(user)) - np.repeat(starts, counts)


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


# Topics of real English words, so that a pre-trained sentence encoder places an item's text by meaning.
TOPIC_WORDS = (
    "planet rocket orbit galaxy astronaut comet telescope satellite nebula asteroid launch gravity",
    "ocean sailor harbor whale island tide shipwreck lighthouse coral storm anchor voyage",
    "kitchen recipe bakery chef oven pastry spice dinner harvest bread garlic soup",
    "soldier battle army fortress general siege trench rifle cavalry war sword victory",
    "wedding romance lover kiss heart letter bride proposal dance flowers passion date",
    "guitar band concert melody singer rhythm drum album stage piano chorus song",
    "football stadium coach team goal champion league match training trophy athlete race",
    "detective murder clue suspect police alibi crime witness mystery investigation gun case",
    "farm tractor barn cattle village orchard field horse farmer wheat meadow rural",
    "school teacher student classroom exam homework campus lesson library graduation friend principal",
    "jungle tiger river expedition explorer rainforest monkey temple snake treasure canoe map",
    "hospital doctor nurse surgery patient medicine virus cure ambulance clinic fever heal",
    "computer robot hacker code network machine algorithm software virtual circuit laser digital",
    "winter snow mountain ice glacier blizzard skier frost cabin cold avalanche sled",
    "desert sand camel oasis nomad dune heat mirage caravan canyon cactus sun",
    "wizard magic dragon castle spell witch kingdom quest knight potion curse fairy",
)


def topic_texts(item_f: np.ndarray, seed: int, words: int = 10, sharpness: float = 6.0) -> tuple[list[str], list[str]]:
    """A title (two words of the item's top topic) and a description (``words`` words, each from a topic drawn
    with probability ``softmax(sharpness * item_factor . topic_direction)``) per item: text that carries the
    planted factor, as much of it as words can, and nothing a model could not read from real item text."""
    rng = np.random.default_rng([seed, 1_000_003])  # its own stream: the interactions do not depend on text
    vocab = [t.split() for t in TOPIC_WORDS]
    topic_f = _unit(rng.normal(size=(len(vocab), item_f.shape[1])))
    logits = sharpness * item_f @ topic_f.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    cdf = np.cumsum(p, 1)
    topics = np.minimum((rng.random((len(item_f), words))[:, :, None] > cdf[:, None, :]).sum(-1), len(vocab) - 1)
    picks = rng.integers(0, len(vocab[0]), (len(item_f), words + 2))
    titles, descriptions = [], []
    for i, (row, pick) in enumerate(zip(topics, picks)):
        top = vocab[int(np.argmax(p[i]))]
        titles.append(f"The {top[pick[-1]].capitalize()} of the {top[pick[-2]].capitalize()}")
        descriptions.append(" ".join(vocab[t][w] for t, w in zip(row, pick[:words])) + ".")
    return titles, descriptions


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
