"""The promotion gate: is the candidate worse than the incumbent, or is the difference noise?

Both bundles are scored on the same users of the freshest window, so each user gives a paired
difference ``candidate - incumbent`` of a metric (NDCG@10, Recall@20). Two equally good models still
differ by a few thousandths on a few hundred users (seed noise and the window's own sampling), so a
fixed tolerance on the means refuses equal candidates often and passes small real losses. The gate
instead runs a one-sided paired t-test per metric on the per-user differences:

- refuse when the candidate is worse by more than ``margin`` with the stated confidence: the upper end
  of the confidence interval of the mean difference lies below ``-margin``;
- the confidence is shared by the gated metrics (Bonferroni): with two metrics each is tested at half
  the error rate, so an equal candidate is refused at most ``1 - confidence`` of the time;
- the report gives each metric's interval and the smallest drop this window detects with ``power``
  (``(t_{1-a} + z_power) * sd / sqrt(n)``): a window too small to see a loss says so instead of
  waving the candidate through silently.

The per-user mean of a bounded metric over hundreds of users is close to normal (central limit), so the
t interval is accurate where the bootstrap's would be and is exact to reproduce.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from offline.config import ConfigError, config_option

GATED = ("ndcg@10", "recall@20")


@dataclass(frozen=True)
class GateConfig:
    confidence: float = config_option(0.95, "refuse a candidate only when it is worse with this confidence, shared by "
                                      "NDCG@10 and Recall@20: an equal candidate is refused at most 1 - this of the time")
    margin: float = config_option(0.0, "a loss up to this (absolute, per metric) is accepted; a negative margin demands "
                                  "a candidate better by at least its size")
    power: float = config_option(0.8, "the power at which the report states the smallest drop the window detects")

    def __post_init__(self) -> None:
        for name in ("confidence", "power"):
            if not 0.5 <= getattr(self, name) < 1:
                raise ConfigError(f"argument --gate-{name}: {getattr(self, name)} is not in [0.5, 1)")


@dataclass
class MetricTest:
    metric: str
    mean: float  # mean of candidate - incumbent over the paired users
    lo: float  # the two-sided interval at the per-metric level; the gate reads ``hi``
    hi: float
    level: float  # per-metric two-sided confidence level (1 - (1 - confidence) / metrics * 2)
    p_value: float  # one-sided, of the hypothesis "not worse by more than the margin"
    detectable: float  # smallest true drop refused with the configured power (the margin included)
    users: int
    worse: bool  # hi < -margin (and more than one user): worse by more than the margin with confidence

    def as_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass
class Decision:
    promote: bool
    reason: str
    tests: list[MetricTest] = field(default_factory=list)


def paired_test(candidate: np.ndarray, incumbent: np.ndarray, metric: str, alpha: float, margin: float,
                power: float) -> MetricTest:
    """One metric's one-sided paired t-test at level ``alpha`` (users where either side is NaN are left out)."""
    diff = np.asarray(candidate, np.float64) - np.asarray(incumbent, np.float64)
    diff = diff[np.isfinite(diff)]
    n = len(diff)
    mean = float(diff.mean()) if n else 0.0
    se = float(diff.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
    t = float(stats.t.ppf(1 - alpha, max(n - 1, 1)))
    hi, lo = mean + t * se, mean - t * se
    if se > 0:
        p = float(stats.t.cdf((mean + margin) / se, n - 1))
    else:  # every user's difference the same; one user shows no spread at all, so says nothing with confidence
        p = 0.0 if mean < -margin and n > 1 else 1.0
    # refused when mean + t se < -margin: a true drop of margin + (t + z_power) se is refused with that power
    detectable = margin + (t + float(stats.norm.ppf(power))) * se if n > 1 else float("inf")
    return MetricTest(metric, mean, lo, hi, 1 - 2 * alpha, p, detectable, n, n > 1 and hi < -margin)


def gate(candidate: dict[str, np.ndarray], incumbent: dict[str, np.ndarray], config: GateConfig = GateConfig(),
         metrics: tuple[str, ...] = GATED) -> Decision:
    """Promote unless the candidate is worse beyond ``config.margin`` with ``config.confidence`` on a gated
    metric; ``candidate`` and ``incumbent`` hold per-user values over the same users, in the same order."""
    alpha = (1 - config.confidence) / len(metrics)
    tests = [paired_test(candidate[m], incumbent[m], m, alpha, config.margin, config.power) for m in metrics]
    worse = [t for t in tests if t.worse]
    if worse:
        said = "; ".join(f"{t.metric} {t.mean:+.4f} [{t.lo:+.4f}, {t.hi:+.4f}] over {t.users} users" for t in worse)
        return Decision(False, f"candidate worse with {config.confidence:.0%} confidence: {said}", tests)
    drops = ", ".join(f"{t.metric} {t.detectable:.4f}" for t in tests)
    return Decision(True, f"candidate not shown worse at {config.confidence:.0%} confidence (this window detects drops "
                    f"of {drops} with {config.power:.0%} power)", tests)
