"""Re-rank: each user's two-tower candidates merged with the item-item channel's (as the bundle was evaluated),
their ranker features stacked and scored in one ranker pass."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from recsys.engine.allowed import Allowed
from recsys.engine.catalog import NOTHING, Catalog
from recsys.engine.search import Found
from recsys.engine.users import UserContext
from recsys.rank_features import RankerTables, UserFeatures, assemble, candidate_block, merge_candidates
from recsys.scorer import Ranker

TOWER, ITEM_ITEM = "two-tower", "item-item"  # a recommended item's candidate source


@dataclass
class Candidates:
    """One user's candidates as the re-ranker saw them: the two-tower's in recall order, then the item-item
    channel's (``n_tower`` splits them); ``top`` indexes the returned ones, best first. Their ranker features
    are kept as computed (the candidate block and the user's constant columns), assembled only for an
    explanation."""

    items: np.ndarray
    recall: np.ndarray
    n_tower: int
    block: np.ndarray | None = None
    constant: np.ndarray | None = None
    ranking: np.ndarray | None = None
    top: np.ndarray = field(default_factory=lambda: NOTHING)

    @cached_property
    def features(self) -> np.ndarray:
        return assemble(self.block, self.constant)

    def order(self, k: int) -> np.ndarray:
        """The first ``k`` by ranking score (ties: recall order), or in recall order without a ranker."""
        if self.ranking is None:
            return np.arange(min(k, len(self.items)))
        return np.lexsort((np.arange(len(self.items)), -self.ranking))[:k]

    def source(self, i: int) -> str:
        return TOWER if i < self.n_tower else ITEM_ITEM

    def trace(self, catalog: Catalog) -> list[dict]:
        rank = {int(i): r for r, i in enumerate(self.top)}
        return [{"item_id": catalog.ids[row], "title": catalog.titles[row], "recall_score": float(self.recall[i]),
                 "recall_rank": i, "source": self.source(i),
                 "ranking_score": None if self.ranking is None else float(self.ranking[i]), "rank": rank.get(i)}
                for i, row in enumerate(self.items.tolist())]


def rerank(ranker: Ranker | None, item_item_candidates: int, ctxs: Sequence[UserContext], found: Sequence[Found],
           vecs: np.ndarray, alloweds: Sequence[Allowed],
           user_features: Callable[[UserContext, RankerTables], UserFeatures]) -> list[Candidates]:
    """Each user's candidates, scored by ``ranker`` in one pass over every user's features (recall order
    without a ranker). ``user_features``: the user's part of the features (cached by the caller)."""
    lists = []
    for ctx, (catalog, cands, scores), vec, allowed in zip(ctxs, found, vecs, alloweds):
        if ranker is None or not len(cands):
            lists.append(Candidates(cands, scores, len(cands)))
            continue
        tables = catalog.ranker_tables
        user = user_features(ctx, tables)
        cands, scores, n_tower = merge_candidates(user, cands, scores, vec, tables.item_vectors, item_item_candidates,
                                                  admit=lambda ids, a=allowed, c=catalog: a.admits(ids, c))
        lists.append(Candidates(cands, scores, n_tower, candidate_block(tables, user, cands, scores, n_tower), user.constant))
    scored = [c for c in lists if c.block is not None]
    if scored:
        ranking = ranker.score_parts([c.block for c in scored], [c.constant for c in scored])
        for c, part in zip(scored, np.split(ranking, np.cumsum([len(c.items) for c in scored])[:-1])):
            c.ranking = part
    return lists
