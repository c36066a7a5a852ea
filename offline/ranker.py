"""The re-ranker's training: an MLP scorer, four pairwise losses, its training loop, and LambdaMART.

Layout (allRank's): a batch is a set of queries padded to one list length, ``scores``,
``labels`` ``[Q, L]`` and ``mask`` ``[Q, L]`` (True = a real candidate). Every loss is a small
function ``loss(scores, labels, mask, **kw) -> scalar`` over that layout, built on one pair mask:
a pair (i, j) counts when both are real and ``labels[i] > labels[j]``, so ties and padding give
no pair and a query with a single label level contributes nothing. Losses average over the
queries that have at least one pair, so padding a list never changes its loss.

Serving never needs torch: ``recsys.scorer.load_ranker`` turns the stored state into plain numpy matmuls
(or a LightGBM booster), about 0.1 ms for 200 candidates.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from loguru import logger
from torch import nn

from offline.config import ConfigError, check_choices, config_option, split_names
from offline.metrics import ranking_metrics

if TYPE_CHECKING:
    from recsys.scorer import Ranker

LOSS_NAMES = ("lambdarank", "ranknet", "hinge", "bpr")


@dataclass
class RankerConfig:
    losses: str = config_option(",".join(LOSS_NAMES), "comma-separated MLP losses to train and report",
                                choices=LOSS_NAMES, many=True)
    lambdamart: bool = config_option(True, "also train LightGBM LambdaMART on the same features (needs lightgbm)")
    default: str = config_option("auto", "ranker put in the bundle: auto (lambdarank unless another beats it on validation NDCG@10 "
                                "with a 95%% paired bootstrap interval above zero), a loss name, or lambdamart "
                                "(which makes lightgbm a serving dependency)", choices=("auto", *LOSS_NAMES, "lambdamart"))
    sigma: float = config_option(1.0, "steepness of the pairwise logistic in lambdarank and ranknet")
    ndcg_k: int = config_option(10, "cut-off k of the |delta NDCG@k| pair weights")
    margin: float = config_option(1.0, "pairwise hinge margin")
    hidden: int = config_option(64, "MLP hidden width")
    layers: int = config_option(2, "MLP hidden layers")
    dropout: float = config_option(0.1, "MLP dropout")
    max_list_len: int = config_option(200, "training lists take the two-tower's top N candidates (the item-item "
                                      "channel's are added after them)")
    max_queries: int = config_option(20_000, "training queries (users) sampled from the window, seeded (0 = every user): "
                                     "their features take queries x list length x features floats")
    batch_queries: int = config_option(32, "queries per optimisation step")
    epochs: int = config_option(40, "maximum epochs (early stopping on validation NDCG@10 usually ends sooner)")
    lr: float = config_option(2e-3, "AdamW learning rate")
    weight_decay: float = config_option(1e-4, "AdamW weight decay")
    patience: int = config_option(6, "epochs without validation improvement before stopping")
    valid_share: float = config_option(0.2, "share of the ranker's query users held out for early stopping and model choice")
    gbm_trees: int = config_option(1000, "LambdaMART maximum trees (early-stopped on validation NDCG@10)")
    gbm_leaves: int = config_option(15, "LambdaMART leaves per tree")
    gbm_lr: float = config_option(0.02, "LambdaMART learning rate")
    gbm_min_leaf: int = config_option(50, "LambdaMART minimum rows per leaf")
    seed: int = config_option(0, "random seed")

    def __post_init__(self) -> None:
        """Fail on a bad name before minutes of two-tower training, not after."""
        check_choices(self, "ranker_")
        names = self.loss_names()
        if self.default not in ("auto", *names, *(["lambdamart"] if self.lambdamart else [])):
            trained = names + (["lambdamart"] if self.lambdamart else [])
            raise ConfigError(f"argument --ranker-default: {self.default!r} is not among the rankers this run "
                              f"trains ({', '.join(trained)}): see --ranker-losses and --ranker-lambdamart")

    def loss_names(self) -> list[str]:
        """The MLP losses to train, in the order given (validated against ``LOSS_NAMES`` at construction)."""
        return split_names(self.losses)


# --------------------------------------------------------------------------- pairs and delta NDCG


def pair_mask(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[Q, L, L]``: True where i and j are both real and i is strictly more relevant than j."""
    real = mask[:, :, None] & mask[:, None, :]
    return real & (labels[:, :, None] > labels[:, None, :])


def ranks_by_score(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """0-based position of each item when the list is sorted by score (stable: ties keep list order), padding last."""
    order = torch.sort(scores.masked_fill(~mask, float("-inf")), dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return ranks


def delta_ndcg(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """``[Q, L, L]`` |change of NDCG@k| if items i and j swapped places in the current ranking.

    Swapping moves gain ``g_i`` to discount ``d_j`` and back, so the change is
    ``|g_i - g_j| * |d_i - d_j| / IDCG@k`` with gain ``2^label - 1`` and discount
    ``1 / log2(rank + 2)`` (0 beyond k). Pairs with padding, and queries without a positive
    (IDCG 0), get 0.
    """
    k = scores.shape[1] if k is None else k
    gains = torch.where(mask, torch.pow(2.0, labels) - 1.0, torch.zeros_like(labels))
    ranks = ranks_by_score(scores.detach(), mask)
    discounts = torch.where(ranks < k, 1.0 / torch.log2(ranks.to(scores.dtype) + 2.0), torch.zeros_like(scores))
    ideal_gains = torch.sort(gains, dim=1, descending=True).values[:, :k]
    ideal = (ideal_gains / torch.log2(torch.arange(ideal_gains.shape[1], device=scores.device, dtype=scores.dtype) + 2.0)).sum(1)
    delta = (gains[:, :, None] - gains[:, None, :]).abs() * (discounts[:, :, None] - discounts[:, None, :]).abs()
    real = mask[:, :, None] & mask[:, None, :] & (ideal[:, None, None] > 0)
    return torch.where(real, delta / ideal.clamp(min=1e-12)[:, None, None], torch.zeros_like(delta))


# --------------------------------------------------------------------------- losses


def lambdarank_loss(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, sigma: float = 1.0,
                    k: int | None = 10, weights: torch.Tensor | None = None) -> torch.Tensor:
    """RankNet's pairwise logistic, each pair weighted by |delta NDCG@k| at the current ranking.

    Per query the weighted losses are summed, not averaged: the weights are already NDCG
    units, so a query's total is the NDCG it stands to gain, whatever its length.
    """
    scores = scores.masked_fill(~mask, 0.0)
    pairs = pair_mask(labels, mask)
    swaps = delta_ndcg(scores, labels, mask, k)
    return _reduce(F.softplus(-sigma * _differences(scores)) * swaps, pairs, per_query="sum", weights=weights)


def ranknet_loss(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, sigma: float = 1.0,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """Burges et al. (2005): ``log(1 + exp(-sigma (s_i - s_j)))`` over every ordered pair."""
    scores = scores.masked_fill(~mask, 0.0)
    return _reduce(F.softplus(-sigma * _differences(scores)), pair_mask(labels, mask), weights=weights)


def hinge_loss(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, margin: float = 1.0,
               weights: torch.Tensor | None = None) -> torch.Tensor:
    """Pairwise hinge (RankSVM): ``max(0, margin - (s_i - s_j))`` over every ordered pair."""
    scores = scores.masked_fill(~mask, 0.0)
    return _reduce(F.relu(margin - _differences(scores)), pair_mask(labels, mask), weights=weights)


def bpr_loss(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
             weights: torch.Tensor | None = None) -> torch.Tensor:
    """Rendle et al. (2009): ``-log sigmoid(s_pos - s_neg)``, binary relevance (grades ignored)."""
    scores = scores.masked_fill(~mask, 0.0)
    return _reduce(F.softplus(-_differences(scores)), pair_mask((labels > 0).to(scores.dtype), mask), weights=weights)


def make_loss(name: str, cfg: RankerConfig) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss called ``name`` with its hyper-parameters bound from ``cfg``."""
    losses = {
        "lambdarank": partial(lambdarank_loss, sigma=cfg.sigma, k=cfg.ndcg_k),
        "ranknet": partial(ranknet_loss, sigma=cfg.sigma),
        "hinge": partial(hinge_loss, margin=cfg.margin),
        "bpr": bpr_loss,
    }
    return losses[name]


def _differences(scores: torch.Tensor) -> torch.Tensor:
    return scores[:, :, None] - scores[:, None, :]


def _reduce(pair_losses: torch.Tensor, pairs: torch.Tensor, per_query: str = "mean",
            weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per query: sum (or mean) over its pairs; then the mean over queries that have any pair.

    ``weights`` ``[Q, L]`` (clicks: the inverse examination propensity of each clicked item's position) weigh
    every pair (i, j) by the weight of its more relevant item i: the pair exists because i was clicked, and
    the weight undoes the bias of how likely its position was looked at (Joachims et al. 2017). The mean
    over a query's pairs divides by the pair count, not by the sum of the weights, which would normalise the
    weighting away within each query."""
    if weights is not None:
        pair_losses = pair_losses * weights[:, :, None]
    per_pair = torch.where(pairs, pair_losses, torch.zeros_like(pair_losses))
    counts = pairs.sum(dim=(1, 2))
    totals = per_pair.sum(dim=(1, 2))
    if per_query == "mean":
        totals = totals / counts.clamp(min=1)
    has = counts > 0
    return totals[has].sum() / has.sum().clamp(min=1)


# --------------------------------------------------------------------------- the scorer


class RankerMLP(nn.Module):
    """Standardised features -> ReLU MLP -> one score; ReLU so serving can replay it in numpy exactly."""

    def __init__(self, n_features: int, hidden: int = 64, layers: int = 2, dropout: float = 0.1):
        super().__init__()
        self.config = dict(n_features=n_features, hidden=hidden, layers=layers, dropout=dropout)
        blocks, width = [], n_features
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        self.net = nn.Sequential(*blocks, nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


@dataclass
class Queries:
    """Padded ranking queries: one per user, candidates in recall order."""

    users: np.ndarray  # [Q]
    items: np.ndarray  # [Q, L] candidate item rows, -1 = padding
    features: np.ndarray  # [Q, L, F] float32 (raw, unstandardised)
    labels: np.ndarray  # [Q, L] float32 graded relevance
    mask: np.ndarray  # [Q, L] bool
    truth: sp.csr_matrix  # [Q, n_items] the window's grades: NDCG's ideal counts positives the recall missed
    weights: np.ndarray | None = None  # [Q, L] float32 pair weights of the more relevant item (clicks: 1 / propensity)
    gains: np.ndarray | None = None  # [Q, L] float64 NDCG gains when they are not the truth's (clicks: weighted)

    def subset(self, idx: np.ndarray) -> "Queries":
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return Queries(self.users[idx], self.items[idx], self.features[idx], self.labels[idx], self.mask[idx],
                       self.truth[idx], pick(self.weights), pick(self.gains))

    def trainable(self) -> np.ndarray:
        """Queries with at least two label levels among their candidates (the others have no pair)."""
        lo = np.where(self.mask, self.labels, np.inf).min(axis=1)
        hi = np.where(self.mask, self.labels, -np.inf).max(axis=1)
        return np.flatnonzero(hi > lo)

    def ndcg(self, scores: np.ndarray, k: int = 10) -> float:
        """Mean NDCG@k of the lists re-ordered by ``scores``, over queries with a positive in the window."""
        return float(np.nanmean(self.ndcg_per_query(scores, k)))

    def ndcg_per_query(self, scores: np.ndarray, k: int = 10) -> np.ndarray:
        """NDCG@k of each list re-ordered by ``scores`` (NaN for a query without a positive). With ``gains``, the
        ideal is the list's own best order of them (a shown list, whose clicks are all in it)."""
        order = np.argsort(-np.where(self.mask, scores, -np.inf), axis=1, kind="stable")[:, :k]
        if self.gains is None:
            topk = np.take_along_axis(self.items, order, axis=1)
            return ranking_metrics(topk, self.truth, [k])[f"ndcg@{k}"]
        gains = np.where(self.mask, self.gains, 0.0)
        discount = 1.0 / np.log2(np.arange(2, order.shape[1] + 2))
        dcg = (np.take_along_axis(gains, order, axis=1) * discount).sum(axis=1)
        ideal = (-np.sort(-gains, axis=1)[:, : order.shape[1]] * discount).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(ideal > 0, dcg / ideal, np.nan)

    def scores_of(self, ranker: "Ranker") -> np.ndarray:
        """``[Q, L]`` scores of a loaded ranker for every candidate (padding included, masked later)."""
        q, length, f = self.features.shape
        return ranker.score(self.features.reshape(q * length, f)).reshape(q, length)


class QuerySet:
    """Queries of several kinds trained together (rating-labelled lists and clicked impressions): each part
    keeps its own list length, batches are drawn within a part, and validation averages over every query."""

    def __init__(self, parts: "QuerySet | list[Queries] | Queries"):
        if isinstance(parts, QuerySet):
            parts = parts.parts
        self.parts = [parts] if isinstance(parts, Queries) else [p for p in parts if len(p.users)]

    def __len__(self) -> int:
        return sum(len(p.users) for p in self.parts)

    def scores_of(self, ranker: "Ranker") -> list[np.ndarray]:
        return [p.scores_of(ranker) for p in self.parts]

    def ndcg_per_query(self, scores: list[np.ndarray], k: int = 10) -> np.ndarray:
        return np.concatenate([p.ndcg_per_query(s, k) for p, s in zip(self.parts, scores)] or [np.zeros(0)])

    def ndcg(self, scores: list[np.ndarray], k: int = 10) -> float:
        values = self.ndcg_per_query(scores, k)
        return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def feature_stats(q: "Queries | QuerySet") -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of every feature over real candidates; constant features get std 1."""
    parts = q.parts if isinstance(q, QuerySet) else [q]
    rows = np.concatenate([p.features[p.mask] for p in parts]).astype(np.float64)
    mean, std = rows.mean(axis=0), rows.std(axis=0)
    return mean.astype(np.float32), np.where(std > 1e-6, std, 1.0).astype(np.float32)


def fit_mlp(train: "Queries | QuerySet", valid: "Queries | QuerySet", loss_name: str, cfg: RankerConfig,
            feature_names: list[str]) -> dict:
    """Train one MLP with ``loss_name``; early stopping on ``valid`` NDCG@10; returns the bundle state."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    train, valid = QuerySet(train), QuerySet(valid)
    mean, std = feature_stats(train)
    parts = [_tensors(p, mean, std) for p in train.parts]
    x_valid = [torch.from_numpy((p.features - mean) / std) for p in valid.parts]
    model = RankerMLP(len(mean), cfg.hidden, cfg.layers, cfg.dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = make_loss(loss_name, cfg)
    usable = [p.trainable() for p in train.parts]  # single-label-level queries have no pair: skip them outright
    best, best_state, bad, history, started = -1.0, None, 0, [], time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        losses = []
        for part, b in _batches(usable, cfg.batch_queries, rng):
            x, y, m, w = parts[part]
            loss = loss_fn(model(x[b]), y[b], m[b], **({} if w is None else {"weights": w[b]}))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
        value = valid.ndcg([_predict(model, x) for x in x_valid])
        history.append({"epoch": epoch, "loss": float(np.mean(losses)) if losses else 0.0, "valid_ndcg@10": value})
        if value > best:
            best, bad, best_state = value, 0, {k: t.detach().clone() for k, t in model.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    logger.info("ranker {}: valid ndcg@10 {:.4f} after {} epochs ({:.1f}s)", loss_name, best, len(history), time.perf_counter() - started)
    return {"kind": "mlp", "loss": loss_name, "feature_names": feature_names, "mean": torch.from_numpy(mean),
            "std": torch.from_numpy(std), "config": model.config, "state_dict": best_state,
            "metrics": {"valid_ndcg@10": best, "epochs": len(history), "seconds": time.perf_counter() - started},
            "params": asdict(cfg), "history": history}


def _tensors(q: Queries, mean: np.ndarray, std: np.ndarray) -> tuple:
    weights = None if q.weights is None else torch.from_numpy(q.weights)
    return torch.from_numpy((q.features - mean) / std), torch.from_numpy(q.labels), torch.from_numpy(q.mask), weights


def _batches(usable: list[np.ndarray], size: int, rng: np.random.Generator) -> list[tuple[int, torch.Tensor]]:
    """One epoch's batches: each part's usable queries shuffled and cut into batches of ``size``; with several
    parts the batches are shuffled together (one part draws exactly as a single query set always did)."""
    out = []
    for part, queries in enumerate(usable):
        perm = rng.permutation(queries)
        out += [(part, torch.from_numpy(perm[s : s + size])) for s in range(0, len(perm), size)]
    return out if len(usable) == 1 else [out[i] for i in rng.permutation(len(out))]


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    model.eval()
    return model(x).numpy()


def fit_lambdamart(train: Queries, valid: Queries, cfg: RankerConfig, feature_names: list[str]) -> dict:
    """LightGBM's ``lambdarank`` on the same features, early-stopped on the same validation NDCG@10."""
    import lightgbm as lgb

    started = time.perf_counter()
    usable = train.subset(train.trainable())
    data = lgb.Dataset(usable.features[usable.mask], usable.labels[usable.mask].astype(int),
                       group=usable.mask.sum(axis=1), feature_name=[_lgb_name(n) for n in feature_names])
    params = {"objective": "lambdarank", "metric": "None", "learning_rate": cfg.gbm_lr, "num_leaves": cfg.gbm_leaves,
              "min_data_in_leaf": cfg.gbm_min_leaf, "lambdarank_truncation_level": cfg.ndcg_k * 2,
              "num_threads": 2, "seed": cfg.seed, "deterministic": True, "force_row_wise": True, "verbose": -1}
    dvalid = lgb.Dataset(valid.features[valid.mask], valid.labels[valid.mask].astype(int),
                         group=valid.mask.sum(axis=1), reference=data)

    def valid_ndcg(preds: np.ndarray, _data) -> tuple[str, float, bool]:
        """Our NDCG@10 (ideal over every positive in the window), not LightGBM's candidate-only one."""
        scores = np.full(valid.mask.shape, -np.inf)
        scores[valid.mask] = preds
        return "ndcg@10", valid.ndcg(scores), True

    booster = lgb.train(params, data, num_boost_round=cfg.gbm_trees, valid_sets=[dvalid], feval=valid_ndcg,
                        callbacks=[lgb.early_stopping(max(10, cfg.gbm_trees // 10), verbose=False)])
    best = booster.best_score["valid_0"]["ndcg@10"]
    logger.info("ranker lambdamart: valid ndcg@10 {:.4f} with {} trees ({:.1f}s)", best, booster.best_iteration,
                time.perf_counter() - started)
    return {"kind": "lambdamart", "loss": "lambdamart", "feature_names": feature_names,
            "model": booster.model_to_string(num_iteration=booster.best_iteration),
            "metrics": {"valid_ndcg@10": best, "trees": booster.best_iteration, "seconds": time.perf_counter() - started},
            "params": asdict(cfg)}


def _lgb_name(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)
