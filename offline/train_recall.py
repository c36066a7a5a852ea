"""Training loop for the two-tower model: one screen, top to bottom.

Examples are next-item predictions: for each event in a user's train window, the history is
the events before it, so the model learns what the service does at request time (recent
history -> next item). Get batch, forward, loss, backward, clip, step; evaluate validation
Recall@K by full ranking every epoch; keep the best weights; stop when it stops improving.

Under ``torchrun`` (offline/distributed.py) every rank runs this loop on its share of each global
batch; the in-batch softmax sees the whole global batch and rank 0 alone validates and checkpoints.
Batches are built ahead on a background thread (offline/batches.py); hard negatives are mined on
the training device by exact search over a bounded pool of current item vectors (offline/negatives.py).
The towers' inputs are offline/tower_tables.py's; validation scores through offline/recall_eval.py.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from loguru import logger
from torch import nn
from tqdm import tqdm

from offline.batches import Batch, Shards, epoch_batches, prefetch
from offline.config import ConfigError, check_choices, config_option
from offline.distributed import (average_sparse_grads, from_rank0, gather_batch, mean_over_ranks, rank_device, world,
                                 wrap_ddp)
from offline.negatives import HardPool, negatives
from offline.recall_eval import evaluate_recall
from offline.split import TemporalSplit, history_matrix
from offline.stages import stage
from offline.tower_tables import DeviceTables, TowerTables, training_examples
from offline.two_tower import TwoTower, bpr_loss, sampled_softmax_loss
from recsys.dataset import Dataset

LOSSES = ("softmax", "bpr")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class RecallConfig:
    dim: int = config_option(64, "output dimension of both towers (the HNSW space)")
    emb_dim: int = config_option(64, "id embedding size")
    hidden: int = config_option(256, "hidden width of the towers' MLPs")
    history_len: int = config_option(50, "recent history items the user tower attends over")
    loss: str = config_option("softmax", "softmax (in-batch InfoNCE with log-Q correction) or bpr", choices=LOSSES)
    temperature: float = config_option(0.1, "softmax temperature")
    uniform_negatives: int = config_option(0, "extra negatives per batch drawn uniformly (shared by all rows)")
    hard_negatives: int = config_option(10, "per-example negatives: the items scoring highest against the user vector "
                                        "among the hard-negative pool, the user's positives excluded (0 = off)")
    hard_mix: float = config_option(0.5, "share of hard-negative slots that are hard; the rest are uniform random")
    hard_refresh_steps: int = config_option(50, "recompute the hard-negative pool's item vectors every N steps")
    hard_pool: int = config_option(8192, "items hard negatives are mined among (exact scores + top-k on the training "
                                   "device): every item when the catalogue is no larger, else a seeded random sample "
                                   "redrawn at each refresh, so mining cost does not grow with the catalogue")
    positives_only: bool = config_option(False, "train only on rating>=4 targets (history keeps every event)")
    batch_size: int = config_option(512, "examples per optimizer step over all processes (the in-batch negatives); "
                                    "under torchrun each of N processes takes 1/N of it")
    epochs: int = config_option(40, "maximum epochs (early stopping usually ends sooner)")
    lr: float = config_option(3e-3, "AdamW peak learning rate")
    weight_decay: float = config_option(1e-5, "AdamW weight decay")
    warmup_steps: int = config_option(100, "linear warm-up steps before cosine decay")
    clip_norm: float = config_option(1.0, "gradient clipping max norm")
    id_dropout: float = config_option(0.1, "probability of zeroing an id input so the feature-only (cold-start) path is trained")
    rating_dropout: float = config_option(0.1, "probability of hiding a history event's rating (code 0), as for events "
                                      "and recent_items that arrive at serving time without one")
    item_text: bool = config_option(True, "feed the item tower each item's text (title, description...) encoded by "
                                    "all-MiniLM-L6-v2 (recsys/text.py) through a trained projection, when the catalogue "
                                    "has text; --no-item-text trains on ids and metadata alone")
    patience: int = config_option(4, "epochs without validation improvement before stopping")
    eval_k: int = config_option(20, "K of the validation Recall@K used for early stopping")
    device: str = config_option("auto", "auto picks CUDA when present (bf16 autocast on CUDA)", choices=DEVICES)
    threads: int = config_option(0, "torch CPU threads (0 = torch's default for this machine); set explicitly because "
                                 "a different thread count can change float sums, so a seed reproduces only at one count")
    log_steps: int = config_option(50, "write the training loss to TensorBoard every N steps (reading it waits for "
                                   "the device, so not every step)")
    seed: int = config_option(0, "random seed")

    def __post_init__(self) -> None:
        """Fail on a bad name before any training, whether the config came from the CLI or from code."""
        check_choices(self, "recall_")
        if self.hard_negatives and self.uniform_negatives:
            raise ConfigError("use either --recall-uniform-negatives or --recall-hard-negatives (whose random share "
                              "is set by --recall-hard-mix), not both")
        if self.hard_negatives > self.hard_pool:
            raise ConfigError(f"argument --recall-hard-pool: {self.hard_pool} items cannot hold "
                              f"{self.hard_negatives} hard negatives (--recall-hard-negatives)")


def resolve_device(name: str) -> torch.device:
    """The torch device ``--recall-device`` names; CUDA asked for but absent is a CLI error, not a traceback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("argument --recall-device: cuda requested but CUDA is not available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed every global generator a library might draw from (ours use explicit seeded generators)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def deterministic_torch(threads: int = 0) -> Iterator[None]:
    """Deterministic torch kernels and a fixed CPU thread count for the block, restored afterwards
    (the service and the tests share the process). On CPU every op we use has a deterministic
    kernel; on CUDA some do not (and cuBLAS needs CUBLAS_WORKSPACE_CONFIG), so there it only warns:
    the reproducibility promise is for CPU training."""
    was_deterministic, was_warn_only = torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    was_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True, warn_only=torch.cuda.is_available())
    torch.set_num_threads(threads or was_threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)
        torch.set_num_threads(was_threads)


def train_two_tower(ds: Dataset, split: TemporalSplit, cfg: RecallConfig, run_dir: Path, resume: bool = False):
    """Train with early stopping on validation Recall@K; returns (best model, tables, history).
    Deterministic on CPU: same seed, data and thread count give the same weights."""
    with deterministic_torch(cfg.threads):
        return _fit_two_tower(ds, split, cfg, run_dir, resume)


def _fit_two_tower(ds: Dataset, split: TemporalSplit, cfg: RecallConfig, run_dir: Path, resume: bool):
    """The training loop of ``train_two_tower``, on this rank's share of every global batch; every
    rank runs the same epochs (rank 0's early-stopping decision is broadcast)."""
    device = rank_device(resolve_device(cfg.device))
    tables = TowerTables.build(ds, cfg.history_len, device, text=cfg.item_text)
    run = _Trainer(cfg, _new_model(cfg, tables), tables, split, run_dir)
    if resume:
        run.resume()
    for epoch in range(run.state["epoch"], cfg.epochs):
        started = time.perf_counter()
        with stage("two-tower epoch"):
            loss = mean_over_ranks(run.train_epoch(epoch))
        stop = world().is_main and run.end_epoch(epoch, loss, started)
        if from_rank0(stop, device):
            break
    return run.finish()


def _new_model(cfg: RecallConfig, tables: TowerTables) -> TwoTower:
    """A freshly initialised model on the tables' device, from the seed (a refit starts where the first run did)."""
    seed_everything(cfg.seed)
    spec = tables.spec
    return TwoTower(len(tables.user_cat), len(tables.item_genres), spec.n_genres, spec.n_item_dense, spec.item_cat_sizes,
                    spec.user_cat_sizes, len(spec.user_numeric), cfg.history_len, cfg.emb_dim, cfg.dim,
                    cfg.hidden, spec.text_dim).to(tables.device)


def chosen_epochs(history: list[dict], cfg: RecallConfig) -> int:
    """How many epochs early stopping kept: up to and including the best validation epoch."""
    return 1 + max(history, key=lambda h: h[f"recall@{cfg.eval_k}"])["epoch"]


def refit_two_tower(split: TemporalSplit, cfg: RecallConfig, tables: TowerTables, epochs: int, run_dir: Path) -> TwoTower:
    """The two-tower retrained from the same seed on ``split.train`` (a wider window: ``split.refit``)
    for exactly ``epochs`` epochs of the same schedule, last weights: no validation window is left to
    select on, so model selection is the first run's. Every rank of a torchrun group must call it."""
    with deterministic_torch(cfg.threads):
        run = _Trainer(cfg, _new_model(cfg, tables), tables, split, run_dir)
        for epoch in range(epochs):
            started = time.perf_counter()
            with stage("two-tower refit epoch"):
                loss = mean_over_ranks(run.train_epoch(epoch))
            logger.info("refit on {} interactions: epoch {} of {} loss {:.4f} ({:.1f}s)", len(split.train), epoch + 1,
                        epochs, loss, time.perf_counter() - started)
        return run.finish()[0]


class TrainingForward(nn.Module):
    """A step's forward in one call: the user tower, the item tower on the targets and the extra
    negatives. DDP all-reduces the gradients once per forward + backward of the module it wraps,
    and the user tower reads the item tower's id embedding: the towers called through separate
    wrappers would reduce that shared weight's gradient twice, so the whole step is this module."""

    def __init__(self, model: TwoTower, tables: DeviceTables, cfg: RecallConfig):
        super().__init__()
        self.model, self.tables, self.cfg = model, tables, cfg

    def forward(self, batch: Batch, pool: HardPool | None) -> tuple[torch.Tensor | None, ...]:
        """``(user vectors, target vectors, negative vectors, negative ids, negative log-Q)``."""
        u = self.model.user_tower(*self.tables.user_inputs(batch))
        v = self.model.item_tower(*self.tables.item_inputs(batch.targets, batch.target_ids))
        return (u, v, *negatives(self.model, self.tables, self.cfg, u, batch, pool))


def global_batch_loss(cfg: RecallConfig, u: torch.Tensor, v: torch.Tensor, targets: torch.Tensor, log_q: torch.Tensor,
                      neg: torch.Tensor | None = None, neg_ids: torch.Tensor | None = None,
                      neg_log_q: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of this rank's rows with every rank's targets as in-batch negatives (gathered, their
    gradients sent back to the rank that computed them): the mean over ranks equals the loss one
    process computes on the whole global batch. ``log_q``: per item, ``in_batch_log_q``."""
    columns, ids, first_row = gather_batch(v, targets)
    if cfg.loss == "softmax":
        return sampled_softmax_loss(u, columns, ids, log_q[ids], cfg.temperature, neg, neg_ids, neg_log_q, first_row)
    return bpr_loss(u, columns, ids, neg, neg_ids, first_row)


def in_batch_log_q(targets: np.ndarray, n_items: int, global_batch: int, device: torch.device) -> torch.Tensor:
    """Per item, log of its expected count among a global batch's targets (add-one smoothed
    frequency x global batch size): the softmax's columns are the global batch, and every rank
    holds all the examples, so every rank computes the same global counts."""
    freq = np.bincount(targets, minlength=n_items) + 1.0
    return torch.tensor(np.log(global_batch * freq / freq.sum()), dtype=torch.float32, device=device)


class _Trainer:
    """One rank's training run: batches, optimiser and schedule, mining pool, and the state a
    checkpoint keeps. Rank 0 alone validates, logs to TensorBoard and writes checkpoints."""

    def __init__(self, cfg: RecallConfig, model: TwoTower, tables: TowerTables, split: TemporalSplit, run_dir: Path):
        if cfg.hard_negatives > split.n_items:
            raise ConfigError(f"argument --recall-hard-negatives: {cfg.hard_negatives} is more than the catalogue's "
                              f"{split.n_items} items")
        self.cfg, self.model, self.tables, self.split, self.device = cfg, model, tables, split, tables.device
        self.ex = training_examples(split, cfg.positives_only)
        self.positives = history_matrix(split.history_before("valid"), split.n_items)
        self.shards = Shards.plan(len(self.ex["target"]), cfg.batch_size, world())
        self.opt = TowerOptimizer(model, cfg, self.shards.steps * cfg.epochs, sparse_tables=self.device.type == "cpu")
        self.log_q = in_batch_log_q(self.ex["target"], split.n_items, self.shards.global_batch, self.device)
        self.device_tables = DeviceTables.of(tables)
        self.forward = wrap_ddp(TrainingForward(model, self.device_tables, cfg), self.device, self.opt.sparse)
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" \
            else torch.autocast("cpu", enabled=False)
        self.pool: HardPool | None = None
        self.state = {"epoch": 0, "step": 0, "best": -1.0, "best_state": None, "bad_epochs": 0, "history": []}
        self.ckpt = run_dir / "checkpoint.pt"
        self.writer = _tensorboard(run_dir) if world().is_main else None

    def resume(self) -> None:
        """Continue from the run's checkpoint, when there is one (every rank reads rank 0's file)."""
        if self.ckpt.exists():
            self.state = load_checkpoint(self.ckpt, self.model, self.opt)
            logger.info("resumed from {} at epoch {}", self.ckpt, self.state["epoch"])

    def train_epoch(self, epoch: int) -> torch.Tensor:
        """One pass over this rank's shard of ``epoch``, batches built ahead on a background thread.
        Returns the mean loss as a device tensor: nothing here waits for the device."""
        self.forward.train()
        batches = epoch_batches(self.ex, self.positives, self.cfg, self.split.n_items, self.shards, epoch)
        if self.device.type == "cuda":
            batches = (batch.pin() for batch in batches)
        total = torch.zeros((), device=self.device)
        for batch in tqdm(prefetch(batches), total=self.shards.steps, desc=f"epoch {epoch}", leave=False, mininterval=2,
                          disable=not world().is_main):
            total += self.step(batch.to(self.device))
        return total / self.shards.steps

    def step(self, batch: Batch) -> torch.Tensor:
        """Forward, loss, backward, clip, optimiser and schedule steps; the detached loss."""
        cfg, state = self.cfg, self.state
        if cfg.hard_negatives and (self.pool is None or state["step"] % cfg.hard_refresh_steps == 0):
            self.pool = HardPool.refresh(self.model, self.device_tables, cfg.hard_pool, cfg.seed, state["step"])
        with self.amp:
            u, v, neg, neg_ids, neg_log_q = self.forward(batch, self.pool)
            loss = global_batch_loss(cfg, u, v, batch.targets, self.log_q, neg, neg_ids, neg_log_q)
        self.opt.zero_grad()
        loss.backward()
        average_sparse_grads(self.opt.sparse)
        clip_gradients(list(self.model.parameters()), cfg.clip_norm)
        self.opt.step()
        state["step"] += 1
        if self.writer is not None and state["step"] % cfg.log_steps == 0:
            self.writer.add_scalar("train/loss", loss.item(), state["step"])
            self.writer.add_scalar("train/lr", self.opt.lr(), state["step"])
        return loss.detach()

    def end_epoch(self, epoch: int, loss: float, started: float) -> bool:
        """Rank 0 after an epoch: validation Recall@K, best weights, checkpoint; True to stop early."""
        cfg, state = self.cfg, self.state
        trained = time.perf_counter() - started
        with stage("validation"):
            valid = evaluate_recall(self.model, self.tables, self.split, "valid", cfg.eval_k)
        key = f"recall@{cfg.eval_k}"
        self.writer.add_scalar(f"valid/{key}", valid[key], epoch)
        seconds = time.perf_counter() - started
        state["history"].append({"epoch": epoch, "loss": loss, **valid, "seconds": seconds, "train_seconds": trained})
        logger.info("epoch {} loss {:.4f} valid {} {:.4f} ndcg@10 {:.4f} ({:.1f}s, of which training {:.1f}s)", epoch,
                    loss, key, valid[key], valid["ndcg@10"], seconds, trained)
        if valid[key] > state["best"]:
            state.update(best=valid[key], bad_epochs=0, best_state={k: t.detach().clone() for k, t in self.model.state_dict().items()})
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        save_checkpoint(self.ckpt, self.model, self.opt, state, cfg)
        if state["bad_epochs"] >= cfg.patience:
            logger.info("early stop: no improvement for {} epochs", cfg.patience)
            return True
        return False

    def finish(self) -> tuple[TwoTower, TowerTables, list[dict]]:
        """The best epoch's weights (rank 0; the other ranks' are their last), tables and history."""
        if self.writer is not None:
            self.writer.close()
        if self.state["best_state"] is not None:
            self.model.load_state_dict(self.state["best_state"])
        self.model.eval()
        return self.model, self.tables, self.state["history"]


class TowerOptimizer:
    """AdamW on the dense weights and, on CPU, SparseAdam on the user and item id tables, each
    under the warm-up + cosine schedule.

    A dense step reads and writes every row of both tables and their Adam moments (about 45 ms at
    100k users + 100k items on two cores), so a step's cost would grow with the catalogue and an
    epoch's with interactions x catalogue. With sparse gradients a step touches only the rows the
    batch looked up ("lazy" Adam: untouched rows keep their moments; no weight decay on the
    tables). On CUDA the tables stay dense: the full update is cheap at GPU memory bandwidth, and
    NCCL has no stable sparse all-reduce for DDP. Under torchrun on CPU DDP leaves the sparse tables
    alone and ``distributed.average_sparse_grads`` all-gathers the touched rows instead.
    """

    def __init__(self, model: TwoTower, cfg: RecallConfig, total_steps: int, sparse_tables: bool):
        tables = [model.user_tower.user_emb, model.item_tower.id_emb] if sparse_tables else []
        for table in tables:
            table.sparse = True  # lookups now give row gradients; under torchrun DDP is told to leave these alone
        self.sparse = [t.weight for t in tables]  # the parameters with sparse gradients
        sparse_ids = {id(p) for p in self.sparse}
        dense = [p for p in model.parameters() if id(p) not in sparse_ids]
        self.parts = [torch.optim.AdamW(dense, lr=cfg.lr, weight_decay=cfg.weight_decay)]
        if tables:
            self.parts.append(torch.optim.SparseAdam(self.sparse, lr=cfg.lr))
        schedule = partial(warmup_cosine, warmup=cfg.warmup_steps, total=total_steps)
        self.schedules = [torch.optim.lr_scheduler.LambdaLR(opt, schedule) for opt in self.parts]

    def zero_grad(self) -> None:
        for opt in self.parts:
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        """One optimiser step, then one schedule step."""
        for opt, schedule in zip(self.parts, self.schedules):
            opt.step()
            schedule.step()

    def lr(self) -> float:
        return self.schedules[0].get_last_lr()[0]

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.parts], "schedules": [s.state_dict() for s in self.schedules]}

    def load_state_dict(self, state: dict) -> None:
        for opt, saved in zip(self.parts, state["optimizers"], strict=True):
            opt.load_state_dict(saved)
        for schedule, saved in zip(self.schedules, state["schedules"], strict=True):
            schedule.load_state_dict(saved)


@torch.no_grad()
def clip_gradients(params: list[torch.Tensor], max_norm: float) -> None:
    """``clip_grad_norm_`` that also takes sparse gradients: coalesced first, so a row looked up
    several times counts once with its summed gradient, exactly as in the dense gradient."""
    grads = []
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            p.grad = p.grad.coalesce()
        if p.grad is not None:
            grads.append(p.grad)
    if not grads:
        return
    total = torch.stack([(g._values() if g.is_sparse else g).float().norm() for g in grads]).norm()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype))


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Linear warm-up then cosine decay to 5% of the peak: stable start, gentle finish."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def save_checkpoint(path: Path, model: TwoTower, opt: TowerOptimizer, state: dict, cfg: RecallConfig) -> None:
    """Everything needed to resume, written to a temp file then renamed (a crash never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "state": state, "config": asdict(cfg),
                "model_config": model.config}, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, model: TwoTower, opt: TowerOptimizer) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    return ckpt["state"]


def _tensorboard(run_dir: Path):
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(run_dir / "tensorboard"))
