"""The towers' inputs for training and offline scoring: feature matrices on the host (``TowerTables``), the
same on the training device (``DeviceTables``), and the next-item training examples."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from offline.batches import Batch
from offline.split import TemporalSplit, relevance
from offline.stages import stage
from offline.two_tower import TwoTower
from recsys.dataset import Dataset
from recsys.features import FeatureSpec, build_spec, item_feature_matrices, user_feature_matrices, user_tower_inputs
from recsys.text import TextEncoder, VectorCache, default_vector_cache


def encode_catalogue(texts: list[str]) -> tuple[np.ndarray, dict]:
    """The catalogue's sentence vectors (float16, as the bundle stores them and the tower reads them, in
    training and serving alike) and the encoder's identity; texts met before come from the vector cache."""
    encoder = TextEncoder()
    vectors = encoder.encode(texts, cache=VectorCache(default_vector_cache(), encoder.digest))
    return vectors.astype(np.float16), encoder.identity


def training_examples(split: TemporalSplit, positives_only: bool) -> dict[str, np.ndarray]:
    """Next-item examples from the train window: target position p, history = events [start, p)."""
    train = split.train.sorted_by_user_time()
    counts = np.bincount(train.user, minlength=split.n_users)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    keep = relevance(train.rating, split.implicit) > 0 if positives_only else np.ones(len(train), bool)
    pos = np.flatnonzero(keep)
    return {
        "user": train.user[pos],
        "target": train.item[pos],
        "start": starts[train.user[pos]],
        "end": pos,  # history ends just before the target event
        "seq_items": train.item,
        "seq_ratings": train.rating,
    }


@dataclass
class TowerTables:
    """Feature matrices and rating lookup the towers read, for training and offline scoring."""

    spec: FeatureSpec
    user_cat: np.ndarray
    user_num: np.ndarray
    item_genres: np.ndarray
    item_dense: np.ndarray
    item_cat: np.ndarray
    seq_offsets: np.ndarray  # each user's events, time-ordered, as the bundle stores them: ratings of a
    seq_items: np.ndarray  # history are read from the same place, so a repeated (user, item) event
    seq_ratings: np.ndarray  # keeps its own rating, as at serving time
    device: torch.device
    item_text: np.ndarray | None = None  # [n_items, 384] float16 sentence vectors (recsys/text.py), None without text

    @classmethod
    def build(cls, ds: Dataset, history_len: int, device: torch.device, text: bool = False) -> "TowerTables":
        """``text``: encode the items' text when the catalogue has some (``ItemTable.text``)."""
        spec = build_spec(ds.users, ds.items, history_len)
        user_cat, user_num = user_feature_matrices(spec, ds.users)
        genres, dense, cat = item_feature_matrices(spec, ds.items)
        seq = ds.interactions.sorted_by_user_time()
        offsets = np.concatenate([[0], np.cumsum(np.bincount(seq.user, minlength=ds.n_users))])
        item_text = None
        if text and ds.items.text:
            with stage("item text encoding"):
                item_text, spec.text_encoder = encode_catalogue(ds.items.item_texts())
            spec.text_columns, spec.text_dim = list(ds.items.text), int(item_text.shape[1])
        return cls(spec, user_cat, user_num, genres, dense, cat, offsets, seq.item, seq.rating, device, item_text)

    def history_ratings(self, user: int, history: np.ndarray) -> np.ndarray:
        """Ratings of ``history``, which must be a prefix of the user's time-ordered events (every
        window's history is: the windows are consecutive in time)."""
        start = self.seq_offsets[user]
        if not np.array_equal(self.seq_items[start : start + len(history)], history):
            raise ValueError(f"user row {user}: history is not a prefix of the user's time-ordered events")
        return self.seq_ratings[start : start + len(history)]

    def item_inputs(self, rows: np.ndarray, content_only: bool = False) -> list[torch.Tensor]:
        """Item tower inputs of trained items (every row has its id embedding: id = row + 1; ``content_only``:
        id 0, the vector an item nobody has interacted with gets from its features and text alone)."""
        ids = np.zeros_like(rows) if content_only else rows + 1
        inputs = [self._t(ids), self._t(self.item_genres[rows]), self._t(self.item_dense[rows]), self._t(self.item_cat[rows])]
        if self.item_text is not None:
            inputs.append(self._t(self.item_text[rows].astype(np.float32)))
        return inputs

    @torch.no_grad()
    def item_vectors(self, model: TwoTower, batch: int = 8192, content_only: bool = False) -> np.ndarray:
        model.eval()
        n = len(self.item_genres)
        parts = [model.item_tower(*self.item_inputs(np.arange(s, min(s + batch, n)), content_only)) for s in range(0, n, batch)]
        return torch.cat(parts).float().cpu().numpy()

    @torch.no_grad()
    def user_vectors(self, model: TwoTower, users: np.ndarray, histories: list[np.ndarray], batch: int = 4096) -> np.ndarray:
        """Serving vectors of ``users`` given their histories, in batches (a tower call's activations
        grow with ``users x history_len x emb_dim``)."""
        parts = [self._user_vectors(model, users[s : s + batch], histories[s : s + batch]) for s in range(0, len(users), batch)]
        return np.concatenate(parts) if parts else np.zeros((0, model.config["dim"]), np.float32)

    def _user_vectors(self, model: TwoTower, users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        model.eval()
        ratings = [self.history_ratings(u, h) for u, h in zip(users, histories)]
        inputs = user_tower_inputs(users + 1, self.user_cat[users], self.user_num[users], histories, ratings,
                                   self.spec.history_len)
        return model.user_tower(*(self._t(x) for x in inputs)).float().cpu().numpy()

    def _t(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.device)


@dataclass
class DeviceTables:
    """The towers' feature tables as tensors on the training device: a batch carries only rows and
    ids, and the negatives mined on the device look their features up there (no host round trip)."""

    user_cat: torch.Tensor
    user_num: torch.Tensor
    item_genres: torch.Tensor
    item_dense: torch.Tensor
    item_cat: torch.Tensor
    item_text: torch.Tensor | None = None

    @classmethod
    def of(cls, tables: TowerTables) -> "DeviceTables":
        text = None if tables.item_text is None else tables._t(tables.item_text.astype(np.float32))
        return cls(*(tables._t(x) for x in (tables.user_cat, tables.user_num, tables.item_genres, tables.item_dense,
                                             tables.item_cat)), text)

    def user_inputs(self, batch: Batch) -> list[torch.Tensor]:
        return [batch.user_ids, self.user_cat[batch.users], self.user_num[batch.users], batch.hist_items,
                batch.hist_ratings]

    def item_inputs(self, rows: torch.Tensor, ids: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Item tower inputs of ``rows``; ``ids`` (row + 1, 0 = dropped) default to the rows' own."""
        inputs = [rows + 1 if ids is None else ids, self.item_genres[rows], self.item_dense[rows], self.item_cat[rows]]
        return inputs if self.item_text is None else [*inputs, self.item_text[rows]]
