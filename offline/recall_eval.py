"""The two-tower as the evaluation scores it: exact full ranking or through the HNSW index, each user's
history excluded, and the index built from item vectors."""
from __future__ import annotations

import hnswlib
import numpy as np

from offline.metrics import ranking_metrics, summarize
from offline.split import TemporalSplit, history_matrix
from offline.tower_tables import TowerTables
from offline.two_tower import TwoTower
from recsys.engine.search import EXACT_FETCH_SHARE, beam_groups, scored_exactly
from recsys.topk import topk_items


class TwoTowerRecommender:
    """Evaluation adapter: scores with user vectors against every item vector (or via HNSW)."""

    name = "two-tower"

    def __init__(self, model: TwoTower, tables: "TowerTables", index: hnswlib.Index | None = None, name: str | None = None):
        self.model, self.tables, self.index = model, tables, index
        self.name = name or ("two-tower (hnsw)" if index is not None else "two-tower (exact)")
        self.item_vectors = tables.item_vectors(model)

    def user_vectors(self, users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        return self.tables.user_vectors(self.model, users, histories)

    def recommend(self, users: np.ndarray, histories: list[np.ndarray], k: int) -> np.ndarray:
        uv = self.user_vectors(users, histories)
        if self.index is None:
            return exact_topk(uv, self.item_vectors, k, histories)
        return hnsw_topk(self.index, uv, k, histories)

    def similar_items(self, items: np.ndarray, k: int) -> np.ndarray:
        """``[len(items), k]`` item rows by inner product of item vectors, exact, ties to the lower row.

        The item tower's vectors are unit vectors and the index's space is the inner product, so this is
        their cosine: an item scores 1 with itself, the most any item can. Nothing puts the item first by
        hand; it comes first because the vectors are unit and no two items share one, which is what the
        behaviour tests check. Exact rather than through the index: ``len(items) x n_items`` scores.
        """
        items = np.asarray(items, np.int64)
        return topk_items(self.item_vectors[items] @ self.item_vectors.T, k)


def exact_topk(user_vecs: np.ndarray, item_vectors: np.ndarray, k: int, histories: list[np.ndarray],
               max_cells: int = 1 << 24) -> np.ndarray:
    """Exact inner-product top-k, each user's history excluded, in user blocks of at most
    ``max_cells`` scores: memory stays bounded whatever the number of users and items."""
    step = max(1, max_cells // max(len(item_vectors), 1))
    out = [topk_items(user_vecs[s : s + step] @ item_vectors.T, k, history_matrix(histories[s : s + step], len(item_vectors)))
           for s in range(0, len(user_vecs), step)]
    return np.concatenate(out) if out else np.zeros((0, k), np.int64)


def hnsw_topk(index: hnswlib.Index, user_vecs: np.ndarray, k: int, histories: list[np.ndarray]) -> np.ndarray:
    """Top-k through the index, over-fetching by each user's history length, then excluding it: each user searched
    as deep as it would be alone (and in serving). hnswlib's beam is max(ef, fetch), so the users whose fetch
    is within ef share one query and the rest are queried in groups of equal fetch; one query at the longest
    history's fetch would search every user deeper than ef, flattering the index."""
    out = np.full((len(user_vecs), k), -1, dtype=np.int64)
    fetches = np.minimum(index.get_current_count(), k + np.array([len(h) for h in histories], np.int64))
    for users in beam_groups(fetches, index.ef):
        labels, _ = index.knn_query(user_vecs[users], k=int(fetches[users].max()))
        for u, row in zip(users.tolist(), labels):
            row = row[: fetches[u]]
            kept = row[~np.isin(row, histories[u])][:k]
            out[u, : len(kept)] = kept
    return out


def served_topk(index: hnswlib.Index, user_vecs: np.ndarray, item_vectors: np.ndarray, k: int,
                histories: list[np.ndarray], exact_share: float = EXACT_FETCH_SHARE) -> np.ndarray:
    """The top-k as the service searches it (``recsys.engine.search``): exact for a user whose first fetch (k plus
    the history) is at least ``exact_share`` of the catalogue, through the index for the others. The re-ranker
    trains and is scored on the candidates it will be served."""
    out = np.full((len(user_vecs), k), -1, dtype=np.int64)
    exact = scored_exactly(k + np.array([len(h) for h in histories], np.int64), len(item_vectors), exact_share)
    scored, searched = np.flatnonzero(exact), np.flatnonzero(~exact)
    if len(scored):
        out[scored] = exact_topk(user_vecs[scored], item_vectors, k, [histories[u] for u in scored])
    if len(searched):
        out[searched] = hnsw_topk(index, user_vecs[searched], k, [histories[u] for u in searched])
    return out


def evaluate_recall(model: TwoTower, tables: TowerTables, split: TemporalSplit, window: str, k: int) -> dict[str, float]:
    """Full-ranking metrics on ``window`` (history = everything before it)."""
    truth = split.truth(window)
    users = split.eval_users(window)
    histories = split.history_before(window)
    rec = TwoTowerRecommender(model, tables)
    topk = rec.recommend(users, [histories[u] for u in users], k)
    return summarize(ranking_metrics(topk, truth[users], [10, k]))


def build_index(vectors: np.ndarray, m: int, ef_construction: int, ef: int, max_elements: int | None = None,
                threads: int = 1, seed: int = 100) -> hnswlib.Index:
    """Inner-product HNSW over unit vectors; labels are item rows.

    ``seed`` fixes the random level of each node. With ``threads`` > 1 items are inserted
    concurrently and the graph depends on scheduling, so two builds from the same vectors can
    return different neighbours: 1 (the default) makes the index a function of its inputs.
    """
    index = hnswlib.Index(space="ip", dim=vectors.shape[1])
    index.init_index(max_elements=max_elements or max(len(vectors), 1), ef_construction=ef_construction, M=m,
                     random_seed=seed, allow_replace_deleted=True)
    index.add_items(vectors, np.arange(len(vectors)), num_threads=threads)
    index.set_ef(ef)
    return index
