"""Extra negatives for the two-tower's softmax: uniform ones shared by the batch, or hard ones mined per row
by exact search over a pool of current item vectors on the training device (no index, no host round trip)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from offline.batches import Batch
from offline.tower_tables import DeviceTables
from offline.two_tower import TwoTower

if TYPE_CHECKING:
    from offline.train_recall import RecallConfig


@dataclass
class HardPool:
    """The items hard negatives are mined among, with their vectors as of the last refresh."""

    items: torch.Tensor  # [P] item rows, ascending
    vectors: torch.Tensor  # [P, d] float32, no gradient
    column: torch.Tensor  # [n_items] each item's column in the pool; P for an item outside it

    @classmethod
    @torch.no_grad()
    def refresh(cls, model: TwoTower, tables: DeviceTables, size: int, seed: int, step: int,
                chunk: int = 8192) -> "HardPool":
        """Current vectors of ``size`` items: all of them when the catalogue is no larger (MovieLens:
        mining among every item), else a sample seeded by (seed, step), so every rank draws the same."""
        n_items, device = len(tables.item_genres), tables.item_genres.device
        if n_items <= size:
            items = torch.arange(n_items, device=device)
        else:
            items = torch.from_numpy(np.sort(np.random.default_rng([seed, step]).choice(n_items, size, replace=False)))
            items = items.to(device)
        vectors = torch.cat([model.item_tower(*tables.item_inputs(items[s : s + chunk]))
                             for s in range(0, len(items), chunk)]).float()
        return cls.of(items, vectors, n_items)

    @classmethod
    def of(cls, items: torch.Tensor, vectors: torch.Tensor, n_items: int) -> "HardPool":
        """The pool of ``items`` (rows of a catalogue of ``n_items``) with their ``vectors``."""
        column = torch.full((n_items,), len(items), dtype=torch.long, device=items.device)
        column[items] = torch.arange(len(items), device=items.device)
        return cls(items, vectors, column)


def mine_hard_negatives(user_vecs: torch.Tensor, pool: HardPool, positive_rows: torch.Tensor,
                        positive_items: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, n]`` pool items scoring highest against each row's vector, best first, with the row's
    positives (the ``(positive_rows, positive_items)`` pairs) excluded: an exact ``B x pool`` matrix
    product and top-k on the vectors' device, no host round trip. Returns the items and a mask
    that is False where the pool held fewer than ``n`` non-positives for the row."""
    scores = user_vecs.detach().float() @ pool.vectors.T
    blocked = torch.zeros(len(scores), len(pool.items) + 1, dtype=torch.bool, device=scores.device)
    blocked[positive_rows, pool.column[positive_items]] = True  # a positive outside the pool hits the spare column
    top, at = scores.masked_fill(blocked[:, :-1], float("-inf")).topk(n, dim=1)
    return pool.items[at], top > float("-inf")


def mix_negatives(hard: torch.Tensor, found: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Each slot takes the batch's random non-positive draw when the slot is a random one or mining
    found nothing, else the mined item (also the last resort when the random draw failed).
    Returns the items and the mask of slots holding a mined item."""
    take_random = (batch.slot_random | ~found) & batch.random_ok
    return torch.where(take_random, batch.random_rows, hard), ~take_random


def negatives(model: TwoTower, tables: DeviceTables, cfg: RecallConfig, u: torch.Tensor, batch: Batch,
              pool: HardPool | None) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Extra negatives for the batch: uniform shared ones, or hard per-row ones; ``(vecs, ids, log_q)``."""
    n_items = len(tables.item_genres)
    if cfg.hard_negatives:
        hard, found = mine_hard_negatives(u, pool, batch.positive_rows, batch.positive_items, cfg.hard_negatives)
        rows, is_hard = mix_negatives(hard, found, batch)
        vecs = model.item_tower(*tables.item_inputs(rows.reshape(-1))).view(*rows.shape, -1)
        # Mined items are not a sampling distribution: no correction. Random slots: log of the
        # expected count of an item among a row's random slots.
        random_log_q = math.log(max(cfg.hard_negatives * (1 - cfg.hard_mix), 1e-6) / n_items)
        return vecs, rows, torch.where(is_hard, 0.0, random_log_q)
    if cfg.uniform_negatives:
        vecs = model.item_tower(*tables.item_inputs(batch.random_rows))
        log_q = torch.full((cfg.uniform_negatives,), math.log(cfg.uniform_negatives / n_items), device=u.device)
        return vecs, batch.random_rows, log_q
    return None, None, None
