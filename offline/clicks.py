"""Learning from what the service showed: impressions joined to their clicks, the examination propensity of
each position estimated from the swaps exploration logged, and ranker queries built from them.

A click depends on where the item stood: position 1 is clicked more for being there. Pairs built naively
(a clicked item above every candidate not clicked) teach a ranker its own past order and call items nobody
saw bad. Here (``pairs="exposure"``) a query is one impression's shown list: each clicked item is preferred
to each shown item not clicked, and the pair is weighted by ``1 / theta(position of the clicked item)``, the
inverse probability that its position was examined (Joachims, Swaminathan and Schnabel 2017: under a
position-based click model this makes the pairwise loss an unbiased estimate of the loss on true relevance).

``theta`` is estimated, not assumed. Exploration (``recsys.experiments.explore``) swaps one random pair of
adjacent positions in a share of answers and logs the rank each shown item started from. An item that
started at rank r is shown at r or, when its pair was swapped, at r + 1 (or r - 1) by a coin that knows
nothing about the item, so its click rates at the two positions differ only by examination:
``CTR(r at r+1) / CTR(r at r) = theta(r+1) / theta(r)``, and the item that started at r + 1 gives a second,
independent estimate of the same ratio (RandPair with intervention harvesting, Agarwal et al. 2019). The two
log-ratios are combined by inverse variance (Haldane's half-count keeps an empty cell finite), chained from
``theta(1) = 1`` (only ratios matter for the weights), and each position's interval comes from the summed
variances of its chain.

Features are as served: each impression's user gets the trainer's two-tower candidates for the history
before the impression (the same ``RankContext.request`` the rating queries use), the shown items that the
tower did not return are appended after them, and the shown items' rows of that request are the query.
The scores the old ranker logged are never a feature.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
from loguru import logger
from scipy import stats

from offline.config import ConfigError, check_choices, config_option, split_names
from offline.data import DataError
from offline.ranker import Queries
from offline.split import history_matrix
from recsys.dataset import Dataset
from recsys.errors import InvalidInput
from recsys.impressions import join
from recsys.state.protocol import Event, Position

if TYPE_CHECKING:
    from offline.train_ranker import RankContext

PAIRS = ("exposure", "naive")


@dataclass
class ClickConfig:
    pairs: str = config_option("exposure", "exposure: a clicked item above each shown item not clicked, in the list as "
                               "shown; naive: above every candidate not clicked, shown or not (for comparison)",
                               choices=PAIRS)
    propensities: str = config_option("estimated", "examination propensities that weigh each pair: estimated (from the "
                                      "swaps exploration logged; needs an experiment variant with explore), none "
                                      "(unweighted), or the probabilities of positions 1, 2, ... as numbers, e.g. "
                                      "1,0.5,0.33")
    ratings: bool = config_option(False, "also train on the rating-labelled queries of the valid window (for few clicks; "
                                  "next to 10k clicks on the simulator they cost 0.03-0.05 true NDCG@10: docs/evaluation.md)")
    types: str = config_option("click,add_to_cart,purchase", "feedback types that count as a click")
    max_weight: float = config_option(20.0, "inverse-propensity weights are clipped at this (less variance, a little bias)")
    window_s: int = config_option(1800, "feedback joins an impression at most this long after it (the service's "
                                  "RECSYS_FEEDBACK_WINDOW_S)")

    def __post_init__(self) -> None:
        check_choices(self, "clicks_")
        if self.propensities not in ("estimated", "none"):
            self.given()
        if self.max_weight < 1:
            raise ConfigError(f"argument --clicks-max-weight: {self.max_weight} is below 1")

    def given(self) -> np.ndarray:
        """The propensities named as numbers (ConfigError unless each is in (0, 1])."""
        try:
            values = np.array([float(v) for v in split_names(self.propensities)])
        except ValueError:
            values = np.zeros(0)
        if not len(values) or not ((values > 0) & (values <= 1)).all():
            raise ConfigError(f"argument --clicks-propensities: {self.propensities!r} is not 'estimated', 'none' or "
                              "comma-separated probabilities in (0, 1]")
        return values


@dataclass
class Shown:
    """One impression as the trainer sees it: dataset rows in the order shown (-1: an item the data lacks)."""

    user: int
    ts_s: int
    items: np.ndarray  # [K] int64
    clicked: np.ndarray  # [K] bool
    ranks: np.ndarray | None = None  # [K] 0-based rank each position's item started from (exploration only)


@dataclass
class Propensities:
    """Examination probability of each position relative to position 1, with a 95% interval."""

    theta: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    source: str
    swaps: list[int] = field(default_factory=list)  # explored impressions that swapped positions (p, p + 1)

    def weights(self, positions: np.ndarray, clip: float) -> np.ndarray:
        """``1 / theta`` at 0-based ``positions``, clipped at ``clip`` (positions past the known ones take the last)."""
        theta = self.theta[np.minimum(positions, len(self.theta) - 1)]
        return np.minimum(1.0 / theta, clip).astype(np.float32)

    def as_dict(self) -> dict:
        return {"source": self.source, "theta": _rounded(self.theta), "lo": _rounded(self.lo), "hi": _rounded(self.hi),
                "swaps": self.swaps}


def _rounded(values: np.ndarray) -> list[float]:
    return [round(float(v), 4) for v in values]


@dataclass
class Clicks:
    """What ``--impressions`` gives training: the impressions, their propensities and what was dropped."""

    config: ClickConfig
    shown: list[Shown]
    propensities: Propensities | None  # None: unweighted
    counts: dict[str, int]

    def summary(self) -> dict:
        return {"pairs": self.config.pairs, "ratings_too": self.config.ratings, "counts": self.counts,
                "propensities": self.propensities.as_dict() if self.propensities else "none (unweighted)"}


def load_clicks(impressions: list[dict], events: list[tuple[Position, str, Event]], ds: Dataset, config: ClickConfig) -> Clicks:
    """Impressions joined to their feedback (``recsys.impressions.join``, the service's rule) and the propensities."""
    shown, counts = join_clicks(impressions, events, ds, config)
    if config.propensities == "none":
        props = None
    elif config.propensities == "estimated":
        props = estimate_propensities(shown, max((len(s.items) for s in shown if s.clicked.any()), default=0))
    else:
        given = config.given()
        props = Propensities(given / given[0], given / given[0], given / given[0], "given")
    logger.info("clicks: {}; propensities {}", counts, props.as_dict() if props else "none")
    return Clicks(config, shown, props, counts)


def join_clicks(impressions: list[dict], events: list[tuple[Position, str, Event]], ds: Dataset,
                config: ClickConfig) -> tuple[list[Shown], dict[str, int]]:
    """Every served (not shadow) impression of a user the data knows, with its clicked positions."""
    types = set(split_names(config.types))
    counts: Counter[str] = Counter()
    served = {imp["request_id"]: imp for imp in impressions if "shadow" not in imp}
    clicked: dict[str, set[int]] = {}
    for _, user, event in events:
        if event.request_id is None or event.type not in types:
            continue
        try:
            joined = join(served.get(event.request_id), user, event.item_id, event.position, event.timestamp, config.window_s)
        except InvalidInput:
            joined = None
        if joined is None or joined.position is None:
            counts["feedback not joined"] += 1
            continue
        clicked.setdefault(event.request_id, set()).add(joined.position - 1)
        counts["feedback joined"] += 1
    shown = []
    for rid, imp in served.items():
        user = ds.user_row(imp["user_id"])
        if user is None:
            counts["impressions of users the data lacks"] += 1
            continue
        items = np.array([-1 if (row := ds.item_row(i)) is None else row for i in imp["items"]], np.int64)
        flags = np.zeros(len(items), bool)
        flags[sorted(clicked.get(rid, ()))] = True
        ranks = np.array(imp["ranks"], np.int64) - 1 if "ranks" in imp else None
        shown.append(Shown(user, imp["ts_ms"] // 1000, items, flags, ranks))
    counts["impressions"] = len(shown)
    counts["impressions with a click"] = sum(bool(s.clicked.any()) for s in shown)
    return shown, dict(counts)


def estimate_propensities(shown: list[Shown], n_positions: int, level: float = 0.95) -> Propensities:
    """``theta`` of positions 1..``n_positions`` from the explored impressions (see the module docstring)."""
    shows = np.zeros((n_positions, n_positions))  # [started at rank, shown at position]
    clicks = np.zeros((n_positions, n_positions))
    swaps = np.zeros(max(n_positions - 1, 0), int)
    explored = [s for s in shown if s.ranks is not None]
    for s in explored:
        n = min(len(s.ranks), n_positions)
        ranks, positions = s.ranks[:n], np.arange(n)
        keep = ranks < n_positions
        np.add.at(shows, (ranks[keep], positions[keep]), 1)
        np.add.at(clicks, (ranks[keep], positions[keep]), s.clicked[:n][keep])
        moved = np.flatnonzero(ranks > positions)
        if len(moved):
            swaps[moved[0]] += 1
    log_ratio, variance = np.zeros(max(n_positions - 1, 0)), np.zeros(max(n_positions - 1, 0))
    for p in range(n_positions - 1):
        if swaps[p] == 0:  # checked first: the usual reason, and the one the fix names
            raise DataError("--impressions", f"no explored impression swapped positions {p + 1} and {p + 2}, so their "
                            "examination propensities cannot be estimated: serve a share of traffic through an "
                            "experiment variant with explore (e.g. 0.2), or pass --clicks-propensities none or known values")
        estimates = [_log_ratio(clicks[r, p + 1], shows[r, p + 1], clicks[r, p], shows[r, p]) for r in (p, p + 1)]
        weights = np.array([1 / v for _, v in estimates])
        if weights.sum() == 0:
            raise DataError("--impressions", f"positions {p + 1} and {p + 2} were never both shown unswapped and swapped")
        log_ratio[p] = float(sum(w * e for w, (e, _) in zip(weights, estimates)) / weights.sum())
        variance[p] = float(1 / weights.sum())
    z = float(stats.norm.ppf(0.5 + level / 2))
    log_theta = np.concatenate([[0.0], np.cumsum(log_ratio)])
    spread = z * np.sqrt(np.concatenate([[0.0], np.cumsum(variance)]))
    theta = np.exp(log_theta)
    return Propensities(theta, np.exp(log_theta - spread), np.exp(log_theta + spread),
                        f"estimated from {len(explored)} explored impressions", swaps.tolist())


def _log_ratio(clicks_a: float, shows_a: float, clicks_b: float, shows_b: float) -> tuple[float, float]:
    """log(CTR_a / CTR_b) and its variance (clicks as Poisson counts: ``1/c_a + 1/c_b``, which the binomial's
    ``-1/n`` terms barely change at click rates of a few percent), with half a click added to each cell
    (Haldane); an unshown cell gives no estimate (infinite variance)."""
    if shows_a == 0 or shows_b == 0:
        return 0.0, float("inf")
    ca, cb = clicks_a + 0.5, clicks_b + 0.5
    return float(np.log(ca / shows_a) - np.log(cb / shows_b)), float(1 / ca + 1 / cb)


# ----------------------------------------------------------------------------- ranker queries


def click_queries(ctx: "RankContext", clicks: Clicks, list_len: int, max_queries: int = 0, seed: int = 0) -> Queries:
    """One query per impression with a click (a seeded sample of ``max_queries`` when set), features as served."""
    chosen = [s for s in clicks.shown if s.clicked.any() and (s.items >= 0).any()]
    if max_queries and len(chosen) > max_queries:
        chosen = [chosen[i] for i in np.sort(np.random.default_rng(seed).choice(len(chosen), max_queries, replace=False))]
    if not chosen:
        raise DataError("--impressions", "no impression with a click on an item the data knows: nothing to learn from")
    users = np.array([s.user for s in chosen], np.int64)
    histories = [_history_before(ctx.arrays, s.user, s.ts_s) for s in chosen]
    tower_items, tower_scores, user_vecs = ctx.candidates(users, histories)
    tower_items, tower_scores = tower_items[:, :list_len], tower_scores[:, :list_len]
    naive = clicks.config.pairs == "naive"
    rows = [_request(ctx, s, h, tower_items[i], tower_scores[i], user_vecs[i], naive)
            for i, (s, h) in enumerate(zip(chosen, histories))]
    width = max(len(items) for items, _, _ in rows)
    n_features = rows[0][2].shape[1]
    items = np.full((len(rows), width), -1, np.int64)
    features = np.zeros((len(rows), width, n_features), np.float32)
    labels = np.zeros((len(rows), width), np.float32)
    weights = np.ones((len(rows), width), np.float32)
    for i, ((query_items, positions, feats), s) in enumerate(zip(rows, chosen)):
        n = len(query_items)
        items[i, :n], features[i, :n] = query_items, feats
        hit = positions >= 0
        labels[i, :n][hit] = s.clicked[positions[hit]]
        if clicks.propensities is not None and not naive:  # a pair takes its clicked item's weight
            won = hit & (labels[i, :n] > 0)
            weights[i, :n][won] = clicks.propensities.weights(positions[won], clicks.config.max_weight)
    mask = items >= 0
    truth = sp.csr_matrix((labels[mask], (np.nonzero(mask)[0], items[mask])), shape=(len(rows), len(ctx.arrays["item_vectors"])))
    truth.eliminate_zeros()
    if naive:  # the ideal counts the clicks on items the candidates lack, as a ranking evaluation counts misses
        truth = history_matrix([s.items[s.clicked & (s.items >= 0)] for s in chosen], truth.shape[1])
        return Queries(users, items, features, labels, mask, truth)
    weighted = None if clicks.propensities is None else weights
    return Queries(users, items, features, labels, mask, truth, weighted, (labels * weights).astype(np.float64))


def _history_before(arrays: dict[str, np.ndarray], user: int, ts_s: int) -> np.ndarray:
    """The user's items before the impression's second (an event in that second may answer the impression)."""
    start, end = arrays["history_offsets"][user], arrays["history_offsets"][user + 1]
    n = int(np.searchsorted(arrays["history_timestamps"][start:end], ts_s, side="left"))
    return arrays["history_items"][start : start + n]


def _request(ctx: "RankContext", s: Shown, history: np.ndarray, tower_items: np.ndarray, tower_scores: np.ndarray,
             user_vec: np.ndarray, naive: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The request's items, the shown position of each (-1: not shown) and their features: with exposure pairs
    only the shown items' rows (those the candidates lack appended), naively the candidate list as it is. (Naive
    pairs once appended the clicked items it lacked, and those alone: past the list's end, a rank only clicked
    items had, a feature that gave the label away.)"""
    real = tower_items >= 0
    items, scores = tower_items[real], tower_scores[real]
    wanted = s.items[s.items >= 0] if not naive else np.empty(0, np.int64)
    missing = wanted[~np.isin(wanted, items)]
    vectors = ctx.tables.item_vectors
    items = np.concatenate([items, missing])
    scores = np.concatenate([scores, (vectors[missing] @ user_vec).astype(np.float32)])
    merged, _, feats = ctx.request(s.user, history, items, scores, user_vec)
    where = {int(item): p for p, item in enumerate(s.items) if item >= 0}
    positions = np.array([where.get(int(i), -1) for i in merged], np.int64)
    if naive:
        return merged, positions, feats
    keep = positions >= 0
    order = np.argsort(positions[keep], kind="stable")
    return merged[keep][order], positions[keep][order], feats[keep][order]
