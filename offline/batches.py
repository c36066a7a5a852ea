"""The two-tower training batches, built a few steps ahead on a background thread.

Everything a step needs that does not depend on the model is prepared here, on the host, while
the device runs the previous steps: the rank's slice of the epoch's permutation, the history
windows, the rating and id dropout, the random negative draws (already checked against the
user's positives) and the positive (row, item) pairs that mining masks out. Only ids and small
integer tensors travel; the feature rows are looked up on the device. Each epoch's draws come from
generators seeded by (seed, epoch[, rank]) and are consumed by one thread in a fixed order, so a
run is reproducible although another thread builds the batches.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import scipy.sparse as sp
import torch

from offline.config import ConfigError
from offline.distributed import World
from recsys.features import history_windows

if TYPE_CHECKING:
    from offline.train_recall import RecallConfig

T = TypeVar("T")


@dataclass
class Batch:
    """One rank's share of a step. Hard-negative fields are set with ``--recall-hard-negatives``;
    ``random_rows`` alone (``[M]``, shared by every row) with ``--recall-uniform-negatives``."""

    users: torch.Tensor  # [B] user rows
    user_ids: torch.Tensor  # [B] user rows + 1, 0 where the id is dropped
    hist_items: torch.Tensor  # [B, L] history windows (item row + 1, 0 = padding)
    hist_ratings: torch.Tensor  # [B, L] rating codes, 0 = padding, unknown or dropped
    targets: torch.Tensor  # [B] positive item rows
    target_ids: torch.Tensor  # [B] target rows + 1, 0 where the id is dropped
    random_rows: torch.Tensor | None = None  # [B, H] random non-positive items (or [M] uniform ones)
    random_ok: torch.Tensor | None = None  # [B, H] the draw is not a positive (rejection sampling can give up)
    slot_random: torch.Tensor | None = None  # [B, H] the slot takes the random draw (probability 1 - hard_mix)
    positive_rows: torch.Tensor | None = None  # [P] batch row of each (row, positive item) pair, masked in mining
    positive_items: torch.Tensor | None = None  # [P] its item

    def to(self, device: torch.device) -> Batch:
        """The batch on ``device``; asynchronous from pinned memory on CUDA."""
        return Batch(**{f.name: None if (v := getattr(self, f.name)) is None else v.to(device, non_blocking=True)
                        for f in fields(self)})

    def pin(self) -> Batch:
        """Page-locked copies, so the copy to the GPU can overlap the running step."""
        return Batch(**{f.name: None if (v := getattr(self, f.name)) is None else v.pin_memory() for f in fields(self)})


@dataclass(frozen=True)
class Shards:
    """How every epoch's permutation is cut: ``steps`` global batches of ``per_rank x world_size``
    examples, rank r taking the r-th slice of ``per_rank`` of each. Every rank runs the same number
    of steps with the same number of rows (the gathers need equal shapes)."""

    per_rank: int
    steps: int
    rank: int
    world_size: int

    @classmethod
    def plan(cls, n_examples: int, batch_size: int, w: World) -> Shards:
        """``batch_size`` is the global batch: one process on all of it, N processes on 1/N each."""
        if batch_size % w.size:
            raise ConfigError(f"argument --recall-batch-size: {batch_size} is not a multiple of the {w.size} "
                              "training processes (it is the global batch, split evenly between them)")
        per_rank = min(batch_size, n_examples) // w.size
        if per_rank == 0:
            raise ConfigError(f"{n_examples} training examples cannot be shared by {w.size} training processes")
        return cls(per_rank, n_examples // (per_rank * w.size), w.rank, w.size)

    @property
    def global_batch(self) -> int:
        return self.per_rank * self.world_size

    def rows(self, perm: np.ndarray, step: int) -> np.ndarray:
        start = step * self.global_batch + self.rank * self.per_rank
        return perm[start : start + self.per_rank]


def epoch_batches(ex: dict[str, np.ndarray], positives: sp.csr_matrix, cfg: RecallConfig, n_items: int,
                  shards: Shards, epoch: int) -> Iterator[Batch]:
    """This rank's batches of ``epoch``. The permutation is seeded by (seed, epoch), the same on
    every rank; dropout and negative draws by (seed, epoch, rank), so each epoch is reproducible on
    its own (a resumed run draws what an uninterrupted one would)."""
    perm = np.random.default_rng([cfg.seed, epoch]).permutation(len(ex["target"]))
    rng = np.random.default_rng([cfg.seed, epoch, shards.rank])
    for step in range(shards.steps):
        yield make_batch(ex, shards.rows(perm, step), positives, cfg, n_items, rng)


def make_batch(ex: dict[str, np.ndarray], idx: np.ndarray, positives: sp.csr_matrix, cfg: RecallConfig,
               n_items: int, rng: np.random.Generator) -> Batch:
    """The examples ``idx`` as a batch; ``rng`` is drawn from in one fixed order."""
    users, targets = ex["user"][idx], ex["target"][idx]
    hist_items, hist_ratings = history_windows(ex["seq_items"], ex["seq_ratings"], ex["start"][idx], ex["end"][idx],
                                               cfg.history_len)
    hist_ratings = np.where(rng.random(hist_ratings.shape) < cfg.rating_dropout, 0, hist_ratings)
    arrays = {"users": users, "user_ids": dropped_ids(users, cfg.id_dropout, rng), "hist_items": hist_items,
              "hist_ratings": hist_ratings, "targets": targets, "target_ids": dropped_ids(targets, cfg.id_dropout, rng)}
    if cfg.hard_negatives:
        arrays.update(hard_negative_draws(users, positives, cfg.hard_negatives, cfg.hard_mix, n_items, rng))
    elif cfg.uniform_negatives:
        arrays["random_rows"] = rng.integers(0, n_items, cfg.uniform_negatives)
    return Batch(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})


def dropped_ids(rows: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Embedding ids (row + 1), each zeroed with probability ``rate``: the towers then learn the
    feature-only path that serves users and items never seen in training."""
    return np.where(rng.random(rows.shape) < rate, 0, rows + 1)


def hard_negative_draws(users: np.ndarray, positives: sp.csr_matrix, n: int, mix: float, n_items: int,
                        rng: np.random.Generator) -> dict[str, np.ndarray]:
    """What mining needs besides the model: which of the ``n`` slots per row are random (probability
    ``1 - mix``), a random non-positive item for every slot (also the fallback of a slot whose mined
    item is missing), and the rows' positive pairs to mask out of the mined scores."""
    slot_random = rng.random((len(users), n)) >= mix
    random_rows, random_ok = random_non_positives(users, positives, n, n_items, rng)
    positive_rows, positive_items = positive_pairs(positives, users)
    return {"random_rows": random_rows, "random_ok": random_ok, "slot_random": slot_random,
            "positive_rows": positive_rows, "positive_items": positive_items}


def random_non_positives(users: np.ndarray, positives: sp.csr_matrix, n: int, n_items: int,
                         rng: np.random.Generator, tries: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """``[B, n]`` uniform items, rejection-sampled until none is the row's positive; the mask says
    which succeeded (a user whose positives cover almost the whole catalogue may exhaust ``tries``)."""
    rows = rng.integers(0, n_items, (len(users), n))
    ok = ~is_positive(positives, np.repeat(users, n), rows.ravel()).reshape(rows.shape)
    for _ in range(tries):
        r, c = np.nonzero(~ok)
        if not len(r):
            break
        draw = rng.integers(0, n_items, len(r))
        good = ~is_positive(positives, users[r], draw)
        rows[r[good], c[good]] = draw[good]
        ok[r[good], c[good]] = True
    return rows, ok


def is_positive(positives: sp.csr_matrix, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    return np.asarray(positives[users, items]).ravel() > 0


def positive_pairs(positives: sp.csr_matrix, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (batch row, item) pair with the item among the row's user's positives."""
    starts, counts = positives.indptr[users], np.diff(positives.indptr)[users]
    rows = np.repeat(np.arange(len(users)), counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return rows, positives.indices[np.repeat(starts, counts) + offsets].astype(np.int64)


_END = object()


def prefetch(items: Iterator[T], depth: int = 4) -> Iterator[T]:
    """``items`` produced by a background thread up to ``depth`` ahead of the consumer. An error in
    the producer is raised in the consumer; a consumer that stops early stops the producer."""
    slots: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if not _put(slots, item, stop):
                    return
            _put(slots, _END, stop)
        except BaseException as err:  # handed to the consumer, which raises it
            _put(slots, err, stop)

    thread = threading.Thread(target=produce, name="batch-prefetch", daemon=True)
    thread.start()
    try:
        while (item := slots.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _put(slots: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Put ``item`` when there is room; False when the consumer has gone."""
    while not stop.is_set():
        try:
            slots.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False
