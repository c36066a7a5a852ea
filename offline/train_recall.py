"""Training loop for the two-tower model: one screen, top to bottom.

Examples are next-item predictions: for each event in a user's train window, the history is
the events before it, so the model learns what the service does at request time (recent
history -> next item). Get batch, forward, loss, backward, clip, step; evaluate validation
Recall@K by full ranking every epoch; keep the best weights; stop when it stops improving.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import hnswlib
import numpy as np
import scipy.sparse as sp
import torch
from loguru import logger
from tqdm import tqdm

from offline.config import ConfigError, check_choices, config_option
from offline.dataset import Dataset
from offline.features import FeatureSpec, build_spec, history_windows, item_feature_matrices, user_feature_matrices
from offline.metrics import ranking_metrics, summarize, topk_items
from offline.split import TemporalSplit, history_matrix, relevance
from offline.two_tower import TwoTower, bpr_loss, sampled_softmax_loss

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
    hard_negatives: int = config_option(10, "per-user negatives mined from an HNSW index over current item vectors (0 = off)")
    hard_mix: float = config_option(0.5, "share of hard-negative slots that are hard; the rest are uniform random")
    hard_refresh_steps: int = config_option(50, "rebuild the hard-negative index every N steps")
    positives_only: bool = config_option(False, "train only on rating>=4 targets (history keeps every event)")
    batch_size: int = config_option(512, "examples per step (also the in-batch negatives)")
    epochs: int = config_option(40, "maximum epochs (early stopping usually ends sooner)")
    lr: float = config_option(3e-3, "AdamW peak learning rate")
    weight_decay: float = config_option(1e-5, "AdamW weight decay")
    warmup_steps: int = config_option(100, "linear warm-up steps before cosine decay")
    clip_norm: float = config_option(1.0, "gradient clipping max norm")
    id_dropout: float = config_option(0.1, "probability of zeroing an id input so the feature-only (cold-start) path is trained")
    rating_dropout: float = config_option(0.1, "probability of hiding a history event's rating (code 0), as for events "
                                      "and recent_items that arrive at serving time without one")
    patience: int = config_option(4, "epochs without validation improvement before stopping")
    eval_k: int = config_option(20, "K of the validation Recall@K used for early stopping")
    device: str = config_option("auto", "auto picks CUDA when present (bf16 autocast on CUDA)", choices=DEVICES)
    threads: int = config_option(0, "torch CPU threads (0 = torch's default for this machine); set explicitly because "
                                 "a different thread count can change float sums, so a seed reproduces only at one count")
    hard_index_threads: int = config_option(1, "threads that build the hard-negative HNSW index; more than 1 is faster "
                                            "but the graph, and so the mined negatives, then depend on thread scheduling")
    seed: int = config_option(0, "random seed")

    def __post_init__(self) -> None:
        """Fail on a bad name before any training, whether the config came from the CLI or from code."""
        check_choices(self, "recall_")
        if self.hard_negatives and self.uniform_negatives:
            raise ConfigError("use either --recall-uniform-negatives or --recall-hard-negatives (whose random share "
                              "is set by --recall-hard-mix), not both")


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
        exclude = history_matrix(histories, len(self.item_vectors))
        if self.index is None:
            return topk_items(uv @ self.item_vectors.T, k, exclude)
        return hnsw_topk(self.index, uv, k, histories)


def hnsw_topk(index: hnswlib.Index, user_vecs: np.ndarray, k: int, histories: list[np.ndarray]) -> np.ndarray:
    """Top-k through the index, over-fetching by each user's history length, then excluding it."""
    out = np.full((len(user_vecs), k), -1, dtype=np.int64)
    fetch = min(index.get_current_count(), k + max((len(h) for h in histories), default=0))
    labels, _ = index.knn_query(user_vecs, k=fetch)
    for u, (row, hist) in enumerate(zip(labels, histories)):
        kept = row[~np.isin(row, hist)][:k]
        out[u, : len(kept)] = kept
    return out


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

    @classmethod
    def build(cls, ds: Dataset, history_len: int, device: torch.device) -> "TowerTables":
        spec = build_spec(ds.users, ds.items, history_len)
        user_cat, user_num = user_feature_matrices(spec, ds.users)
        genres, dense, cat = item_feature_matrices(spec, ds.items)
        seq = ds.interactions.sorted_by_user_time()
        offsets = np.concatenate([[0], np.cumsum(np.bincount(seq.user, minlength=ds.n_users))])
        return cls(spec, user_cat, user_num, genres, dense, cat, offsets, seq.item, seq.rating, device)

    def history_ratings(self, user: int, history: np.ndarray) -> np.ndarray:
        """Ratings of ``history``, which must be a prefix of the user's time-ordered events (every
        window's history is: the windows are consecutive in time)."""
        start = self.seq_offsets[user]
        if not np.array_equal(self.seq_items[start : start + len(history)], history):
            raise ValueError(f"user row {user}: history is not a prefix of the user's time-ordered events")
        return self.seq_ratings[start : start + len(history)]

    def item_inputs(self, rows: np.ndarray, id_dropout: float = 0.0, rng: np.random.Generator | None = None):
        ids = rows + 1
        if id_dropout and rng is not None:
            ids = np.where(rng.random(rows.shape) < id_dropout, 0, ids)
        return [self._t(ids), self._t(self.item_genres[rows]), self._t(self.item_dense[rows]), self._t(self.item_cat[rows])]

    def user_inputs(self, users: np.ndarray, hist_items: np.ndarray, hist_ratings: np.ndarray, id_dropout=0.0, rng=None):
        ids = users + 1
        if id_dropout and rng is not None:
            ids = np.where(rng.random(users.shape) < id_dropout, 0, ids)
        return [self._t(ids), self._t(self.user_cat[users]), self._t(self.user_num[users]), self._t(hist_items), self._t(hist_ratings)]

    @torch.no_grad()
    def item_vectors(self, model: TwoTower, batch: int = 8192) -> np.ndarray:
        model.eval()
        n = len(self.item_genres)
        parts = [model.item_tower(*self.item_inputs(np.arange(s, min(s + batch, n)))) for s in range(0, n, batch)]
        return torch.cat(parts).float().cpu().numpy()

    @torch.no_grad()
    def user_vectors(self, model: TwoTower, users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        model.eval()
        flat = np.concatenate(histories) if histories else np.zeros(0, np.int64)
        parts = [self.history_ratings(u, h) for u, h in zip(users, histories)]
        ratings = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        ends = np.cumsum([len(h) for h in histories])
        starts = ends - np.array([len(h) for h in histories])
        hist_items, hist_ratings = history_windows(flat, ratings, starts, ends, self.spec.history_len)
        return model.user_tower(*self.user_inputs(users, hist_items, hist_ratings)).float().cpu().numpy()

    def _t(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.device)


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



def mine_hard_negatives(
    index: hnswlib.Index,
    user_vecs: np.ndarray,
    users: np.ndarray,
    positives: sp.csr_matrix,
    n: int,
    mix: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """``[B, n]`` negatives: nearest items to each user vector that are not the user's positives,
    each slot replaced by a uniform random non-positive item with probability ``1 - mix``.
    Returns the item rows and a mask of the slots that are hard (mined) rather than random."""
    n_items = index.get_current_count()
    labels, _ = index.knn_query(user_vecs, k=min(n_items, 4 * n + 10))
    labels = labels.astype(np.int64)
    is_pos = np.asarray(positives[np.repeat(users, labels.shape[1]), labels.ravel()]).reshape(labels.shape) > 0
    order = np.argsort(is_pos, axis=1, kind="stable")  # non-positives first, nearest first
    hard = np.take_along_axis(labels, order, axis=1)[:, :n]
    hard_ok = ~np.take_along_axis(is_pos, order, axis=1)[:, :n]
    out = np.where((rng.random(hard.shape) < mix) & hard_ok, hard, -1)
    is_hard = out >= 0
    for _ in range(100):  # rejection-sample the random slots until none is a positive
        rows, cols = np.nonzero(out < 0)
        if not len(rows):
            break
        draw = rng.integers(0, n_items, len(rows))
        ok = np.asarray(positives[users[rows], draw]).ravel() == 0
        out[rows[ok], cols[ok]] = draw[ok]
    still = out < 0  # a user whose positives cover almost everything: keep the mined item
    return np.where(still, hard, out), is_hard | still


def evaluate_recall(model: TwoTower, tables: TowerTables, split: TemporalSplit, window: str, k: int) -> dict[str, float]:
    """Full-ranking metrics on ``window`` (history = everything before it)."""
    truth = split.truth(window)
    users = np.flatnonzero(np.diff(truth.indptr) > 0)
    histories = split.history_before(window)
    rec = TwoTowerRecommender(model, tables)
    topk = rec.recommend(users, [histories[u] for u in users], k)
    return summarize(ranking_metrics(topk, truth[users], [10, k]))


def train_two_tower(ds: Dataset, split: TemporalSplit, cfg: RecallConfig, run_dir: Path, resume: bool = False):
    """Train with early stopping on validation Recall@K; returns (best model, tables, history).
    Deterministic on CPU: same seed, data and thread count give the same weights."""
    with deterministic_torch(cfg.threads):
        return _fit_two_tower(ds, split, cfg, run_dir, resume)


def _fit_two_tower(ds: Dataset, split: TemporalSplit, cfg: RecallConfig, run_dir: Path, resume: bool):
    """The training loop of ``train_two_tower``."""
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    tables = TowerTables.build(ds, cfg.history_len, device)
    spec = tables.spec
    model = TwoTower(ds.n_users, ds.n_items, spec.n_genres, spec.n_item_dense, spec.item_cat_sizes,
                     spec.user_cat_sizes, len(spec.user_numeric), cfg.history_len, cfg.emb_dim, cfg.dim, cfg.hidden).to(device)
    ex = training_examples(split, cfg.positives_only)
    steps_per_epoch = max(1, len(ex["target"]) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.warmup_steps, total))
    item_freq = np.bincount(ex["target"], minlength=ds.n_items) + 1.0
    log_q = torch.tensor(np.log(cfg.batch_size * item_freq / item_freq.sum()), dtype=torch.float32, device=device)
    uniform_log_q = math.log(max(cfg.uniform_negatives, 1) / ds.n_items)
    positives = history_matrix(split.history_before("valid"), ds.n_items)
    state = {"epoch": 0, "step": 0, "best": -1.0, "best_state": None, "bad_epochs": 0, "history": []}
    ckpt = run_dir / "checkpoint.pt"
    if resume and ckpt.exists():
        state = load_checkpoint(ckpt, model, opt, sched)
        logger.info("resumed from {} at epoch {}", ckpt, state["epoch"])
    writer = _tensorboard(run_dir)
    rng = np.random.default_rng(cfg.seed + state["epoch"])
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    index = None
    for epoch in range(state["epoch"], cfg.epochs):
        model.train()
        perm = rng.permutation(len(ex["target"]))
        t0 = time.perf_counter()
        losses = []
        for b in tqdm(range(steps_per_epoch), desc=f"epoch {epoch}", leave=False, mininterval=2):
            idx = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            users, targets = ex["user"][idx], ex["target"][idx]
            hist_items, hist_ratings = history_windows(ex["seq_items"], ex["seq_ratings"], ex["start"][idx], ex["end"][idx], cfg.history_len)
            hist_ratings = np.where(rng.random(hist_ratings.shape) < cfg.rating_dropout, 0, hist_ratings)
            if cfg.hard_negatives and (index is None or state["step"] % cfg.hard_refresh_steps == 0):
                index = build_index(tables.item_vectors(model), m=16, ef_construction=100, ef=100,
                                    threads=cfg.hard_index_threads, seed=cfg.seed)
                model.train()
            with amp:
                u = model.user_tower(*tables.user_inputs(users, hist_items, hist_ratings, cfg.id_dropout, rng))
                v = model.item_tower(*tables.item_inputs(targets, cfg.id_dropout, rng))
                neg, neg_ids, neg_log_q = negatives(model, tables, cfg, u, users, positives, index, rng, uniform_log_q)
                pos_ids = torch.as_tensor(targets, device=device)
                if cfg.loss == "softmax":
                    loss = sampled_softmax_loss(u, v, pos_ids, log_q[pos_ids], cfg.temperature, neg, neg_ids, neg_log_q)
                else:
                    loss = bpr_loss(u, v, pos_ids, neg, neg_ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
            opt.step()
            sched.step()
            state["step"] += 1
            losses.append(loss.item())
            writer.add_scalar("train/loss", losses[-1], state["step"])
            writer.add_scalar("train/lr", sched.get_last_lr()[0], state["step"])
        valid = evaluate_recall(model, tables, split, "valid", cfg.eval_k)
        key = f"recall@{cfg.eval_k}"
        writer.add_scalar(f"valid/{key}", valid[key], epoch)
        state["history"].append({"epoch": epoch, "loss": float(np.mean(losses)), **valid, "seconds": time.perf_counter() - t0})
        logger.info("epoch {} loss {:.4f} valid {} {:.4f} ndcg@10 {:.4f} ({:.1f}s)", epoch, np.mean(losses), key,
                    valid[key], valid["ndcg@10"], time.perf_counter() - t0)
        if valid[key] > state["best"]:
            state.update(best=valid[key], bad_epochs=0, best_state={k: t.detach().clone() for k, t in model.state_dict().items()})
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        save_checkpoint(ckpt, model, opt, sched, state, cfg)
        if state["bad_epochs"] >= cfg.patience:
            logger.info("early stop: no improvement for {} epochs", cfg.patience)
            break
    writer.close()
    if state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
    model.eval()
    return model, tables, state["history"]


def negatives(model, tables, cfg, u, users, positives, index, rng, uniform_log_q):
    """Extra negatives for the batch: uniform shared ones, or hard per-user ones; ``(vecs, ids, log_q)``."""
    device = u.device
    if cfg.hard_negatives and index is not None:
        rows, is_hard = mine_hard_negatives(index, u.detach().float().cpu().numpy(), users, positives, cfg.hard_negatives,
                                            cfg.hard_mix, rng)
        vecs = model.item_tower(*tables.item_inputs(rows.ravel())).view(len(users), cfg.hard_negatives, -1)
        # Mined items are not a sampling distribution: no correction. Random slots: log of the
        # expected count of an item among a row's random slots.
        random_log_q = math.log(max(cfg.hard_negatives * (1 - cfg.hard_mix), 1e-6) / len(tables.item_genres))
        log_q = torch.as_tensor(np.where(is_hard, 0.0, random_log_q), dtype=torch.float32, device=device)
        return vecs, torch.as_tensor(rows, device=device), log_q
    if cfg.uniform_negatives:
        rows = rng.integers(0, len(tables.item_genres), cfg.uniform_negatives)
        vecs = model.item_tower(*tables.item_inputs(rows))
        return vecs, torch.as_tensor(rows, device=device), torch.full((len(rows),), uniform_log_q, device=device)
    return None, None, None


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Linear warm-up then cosine decay to 5% of the peak: stable start, gentle finish."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


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


def save_checkpoint(path: Path, model, opt, sched, state: dict, cfg: RecallConfig) -> None:
    """Everything needed to resume, written to a temp file then renamed (a crash never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "state": state,
                "config": asdict(cfg), "model_config": model.config}, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, model, opt, sched) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    return ckpt["state"]


def _tensorboard(run_dir: Path):
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(run_dir / "tensorboard"))
