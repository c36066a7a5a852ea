"""The re-ranker stage: recall candidates -> labelled queries -> every ranker -> the one for the bundle.

Windows, per user by time: train | valid | test.
- The two-tower trains on train (and early-stops on valid).
- The ranker's queries come from the valid window, which the two-tower never trained on:
  candidates are the two-tower's top-``depth`` items for the history before valid (train),
  that history excluded, found through the HNSW index exactly as the service finds them, then
  up to ``extra`` items of the item-item channel (``rank_features.merge_candidates``);
  labels are the graded relevance of the valid window (rating 4 -> 1, 5 -> 2, else 0; an item
  not interacted with -> 0). A seeded share of those users is held out for early stopping
  and for choosing the default ranker.
- The test window is only reported on: candidates from train + valid history, what the service
  does with the full history.
Item statistics in the features (popularity, average rating, co-occurrence) use train only.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from loguru import logger

from offline.evaluate import paired_bootstrap
from offline.clicks import Clicks, click_queries
from offline.ranker import Queries, QuerySet, RankerConfig, fit_lambdamart, fit_mlp
from offline.recall_eval import TwoTowerRecommender, exact_topk, served_topk
from offline.split import TemporalSplit, seeded_sample
from offline.stages import stage
from recsys.rank_features import RankerTables, candidate_features, feature_names, merge_candidates, user_features
from recsys.scorer import Ranker, load_ranker

RERANKED = "two-tower + "  # report name prefix of a re-ranked model: "two-tower + lambdarank"


@dataclass
class RankContext:
    """What building one user's request needs: the recall model, and the bundle's tables and arrays."""

    recall: TwoTowerRecommender
    tables: RankerTables
    arrays: dict[str, np.ndarray]  # the bundle's arrays: user rows and time-ordered histories, as the service reads them
    depth: int  # two-tower candidates per request
    extra: int = 0  # item-item candidates added to them (``merge_candidates``)

    @property
    def feature_names(self) -> list[str]:
        return feature_names(self.tables, self.arrays["user_num"].shape[1])

    def candidates(self, users: np.ndarray, histories: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(items [U, depth], scores [U, depth], user vectors [U, d])`` from the two-tower, history
        excluded, -1 / -inf padding."""
        user_vecs = self.recall.user_vectors(users, histories)
        if self.recall.index is not None:  # (exact where the service scores exactly: a small catalogue)
            items = served_topk(self.recall.index, user_vecs, self.recall.item_vectors, self.depth, histories)
        else:
            items = exact_topk(user_vecs, self.recall.item_vectors, self.depth, histories)
        scores = np.einsum("ud,ukd->uk", user_vecs, self.recall.item_vectors[np.maximum(items, 0)])
        return items, np.where(items >= 0, scores, -np.inf).astype(np.float32), user_vecs

    def request(self, user: int, history: np.ndarray, items: np.ndarray, scores: np.ndarray,
                user_vec: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One user's merged candidates, their two-tower scores and their features: exactly the
        service's calls (``user_features``, ``merge_candidates``, ``candidate_features``).

        The windows are consecutive in time, so the history before any window is a prefix of the
        user's full sequence in the bundle: its ratings are read from the same arrays the service
        reads, not reconstructed.
        """
        a, n = self.arrays, len(history)
        start = a["history_offsets"][user]
        if not np.array_equal(a["history_items"][start : start + n], history):
            raise ValueError(f"user row {user}: history is not a prefix of the user's time-ordered history")
        features = user_features(self.tables, history, a["history_ratings"][start : start + n], a["user_cat"][user],
                                 a["user_num"][user])
        items, scores, n_tower = merge_candidates(features, items, scores, user_vec, self.tables.item_vectors, self.extra,
                                                  admit=lambda ids: ~np.isin(ids, history))
        return items, scores, candidate_features(self.tables, features, items, scores, n_tower)


class MergedCandidates:
    """The candidate list a re-ranker sees (two-tower, then item-item), in merged order: the
    evaluation interface for the candidate ceiling."""

    def __init__(self, ctx: RankContext, name: str = "two-tower + item-item (merged)"):
        self.ctx, self.name = ctx, name

    def recommend(self, users: np.ndarray, histories: list[np.ndarray], k: int) -> np.ndarray:
        return _requests(self.ctx, users, histories, k, lambda feats: -np.arange(len(feats), dtype=np.float64))


class RerankRecommender:
    """Recall (merged) -> features -> ranker score -> top-k: the evaluation interface for a re-ranker."""

    def __init__(self, ctx: RankContext, ranker: Ranker, name: str):
        self.ctx, self.ranker, self.name = ctx, ranker, name

    def recommend(self, users: np.ndarray, histories: list[np.ndarray], k: int) -> np.ndarray:
        return _requests(self.ctx, users, histories, k, self.ranker.score)


def _requests(ctx: RankContext, users: np.ndarray, histories: list[np.ndarray], k: int,
              score: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Top-``k`` of each user's merged candidates by ``score(features)`` (ties: merged order)."""
    items, scores, user_vecs = ctx.candidates(users, histories)
    out = np.full((len(users), k), -1, dtype=np.int64)
    for i, (user, history) in enumerate(zip(users, histories)):
        real = items[i] >= 0
        merged, _, feats = ctx.request(int(user), history, items[i][real], scores[i][real], user_vecs[i])
        top = merged[np.argsort(-score(feats), kind="stable")[:k]]
        out[i, : len(top)] = top
    return out


def build_queries(ctx: RankContext, split: TemporalSplit, window: str, list_len: int, max_queries: int = 0,
                  seed: int = 0) -> Queries:
    """One query per user with a positive in ``window`` (a seeded sample of ``max_queries`` of them when
    set): the two-tower's top ``list_len`` for the history before it merged with the item-item channel's,
    graded labels."""
    truth = split.truth(window)
    users = seeded_sample(np.flatnonzero(np.diff(truth.indptr) > 0), max_queries, seed)
    histories = split.history_before(window)
    hist = [histories[u] for u in users]
    tower_items, tower_scores, user_vecs = ctx.candidates(users, hist)
    tower_items, tower_scores = tower_items[:, :list_len], tower_scores[:, :list_len]
    width = tower_items.shape[1] + ctx.extra
    items = np.full((len(users), width), -1, np.int64)
    features = np.zeros((len(users), width, len(ctx.feature_names)), np.float32)
    for i, (user, history) in enumerate(zip(users, hist)):
        real = tower_items[i] >= 0
        merged, _, feats = ctx.request(int(user), history, tower_items[i][real], tower_scores[i][real], user_vecs[i])
        items[i, : len(merged)], features[i, : len(merged)] = merged, feats
    mask = items >= 0
    rows = truth[users]
    labels = np.where(mask, rows[np.arange(len(users))[:, None], np.maximum(items, 0)].toarray(), 0.0).astype(np.float32)
    return Queries(users, items, features, labels, mask, rows)


@dataclass
class RankingResult:
    """Every trained ranker's state, the one chosen for the bundle and why, and timings."""

    states: dict[str, dict]
    default: str | None
    recall_valid_ndcg: float  # the recall order's NDCG@10 on the same held-out users: the bar to clear
    challenges: dict[str, dict] = field(default_factory=dict)  # validation NDCG@10 of each ranker minus the base's
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def default_state(self) -> dict | None:
        return self.states.get(self.default) if self.default else None


def train_rankers(ctx: RankContext, split: TemporalSplit, cfg: RankerConfig, clicks: Clicks | None = None) -> RankingResult:
    """Build the valid-window queries (and, with ``clicks``, one query per clicked impression), train every
    configured ranker, choose the default on validation (the held-out users' queries of every kind)."""
    started = time.perf_counter()
    train, valid = QuerySet([]), QuerySet([])
    with stage("ranker queries"):
        if clicks is None or clicks.config.ratings:
            queries = build_queries(ctx, split, "valid", cfg.max_list_len, cfg.max_queries, cfg.seed)
            order = np.random.default_rng(cfg.seed).permutation(len(queries.users))
            n_valid = int(round(cfg.valid_share * len(order)))
            train.parts.append(queries.subset(np.sort(order[n_valid:])))
            valid.parts.append(queries.subset(np.sort(order[:n_valid])))
        if clicks is not None:
            shown = click_queries(ctx, clicks, cfg.max_list_len, cfg.max_queries, cfg.seed)
            split_users = tuple(qs.parts[0].users if qs.parts else np.zeros(0, np.int64) for qs in (train, valid))
            held = _held_out(shown.users, split_users, len(ctx.arrays["history_offsets"]) - 1, cfg)
            train.parts.append(shown.subset(np.flatnonzero(~held)))
            valid.parts.append(shown.subset(np.flatnonzero(held)))
    build_seconds = time.perf_counter() - started
    recall_ndcg = valid.ndcg([-np.tile(np.arange(p.items.shape[1], dtype=np.float64), (len(p.users), 1)) for p in valid.parts])
    logger.info("ranker queries: {} train ({} usable), {} valid; recall-order valid ndcg@10 {:.4f} (built in {:.1f}s)",
                len(train), sum(len(p.trainable()) for p in train.parts), len(valid), recall_ndcg, build_seconds)
    names = ctx.feature_names
    with stage("ranker training"):
        states = {name: fit_mlp(train, valid, name, cfg, names) for name in cfg.loss_names()}
        if cfg.lambdamart and clicks is None:
            states.update(_lambdamart(train.parts[0], valid.parts[0], cfg, names))
        elif cfg.lambdamart:
            logger.warning("LambdaMART skipped: it takes no pair weights here, so it cannot learn from clicks without bias")
        default, challenges = choose_default(states, valid, cfg.default)
    seconds = {"build_queries": build_seconds, **{n: s["metrics"]["seconds"] for n, s in states.items()},
               "total": time.perf_counter() - started}
    return RankingResult(states, default, recall_ndcg, challenges, seconds)


def _held_out(users: np.ndarray, ratings: tuple[np.ndarray, np.ndarray], n_users: int, cfg: RankerConfig) -> np.ndarray:
    """Which click queries validate: a seeded ``valid_share`` of users, overruled by the rating queries' split
    (``ratings``: its train and valid users) so that no user is on both sides."""
    held = np.random.default_rng([cfg.seed, 27]).random(n_users) < cfg.valid_share
    held[ratings[0]], held[ratings[1]] = False, True
    return held[users]


def _lambdamart(train: Queries, valid: Queries, cfg: RankerConfig, names: list[str]) -> dict[str, dict]:
    try:
        import lightgbm  # noqa: F401  (a dev/eval dependency)
    except ImportError:
        logger.warning("lightgbm is not installed: LambdaMART comparison skipped")
        return {}
    return {"lambdamart": fit_lambdamart(train, valid, cfg, names)}


def choose_default(states: dict[str, dict], valid: Queries | QuerySet, wanted: str, base: str = "lambdarank") -> tuple[str | None, dict]:
    """The bundle's ranker, decided on the validation users (never the test window).

    ``wanted`` if named. Otherwise LambdaRank, unless another ranker beats it with a 95% paired
    bootstrap interval of the per-user NDCG@10 difference above zero (then the best such one):
    with a few hundred validation users, differences of a few thousandths are noise, and a
    default that flips between runs on noise helps nobody. Returns the choice and every
    challenger's difference from the base.
    """
    if not states:
        return None, {}
    if wanted != "auto":
        if wanted not in states:
            raise ValueError(f"--ranker-default {wanted!r}: not trained (trained: {sorted(states)})")
        return wanted, {}
    per_user = {n: valid.ndcg_per_query(valid.scores_of(load_ranker(s))) for n, s in states.items()}
    if base not in states:
        base = max(states, key=lambda n: states[n]["metrics"]["valid_ndcg@10"])
    challenges = {n: paired_bootstrap(per_user[n], per_user[base]) for n in states if n != base}
    winners = [n for n, ci in challenges.items() if ci["lo"] > 0]
    choice = max(winners, key=lambda n: challenges[n]["mean"]) if winners else base
    logger.info("ranker default: {} (valid ndcg@10 minus {}: {})", choice, base,
                {n: f"{c['mean']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}]" for n, c in challenges.items()})
    return choice, {f"{n} minus {base}": c for n, c in challenges.items()}


def rerankers(ctx: RankContext, result: RankingResult) -> list[tuple[RerankRecommender, dict]]:
    """One evaluation-interface model per trained ranker, the default first, with its report parameters."""
    names = sorted(result.states, key=lambda n: n != result.default)
    return [(RerankRecommender(ctx, load_ranker(result.states[n]), f"{RERANKED}{n}"),
             {"loss": n, "default": n == result.default, **result.states[n]["metrics"]}) for n in names]
