"""What an experiment is, who is in which variant, and which definitions are refused.

A variant is a served configuration: the options it sets (bundle, ranker, candidate depth, the
item-item channel, exploration) override the service's for the users assigned to it. Assignment is a
hash of (experiment name, user id) and nothing else, so it is sticky, the same on every replica and
worker, and independent between experiments (the name salts the hash). Redefining an experiment
under the same name keeps every user's bucket: a share moved from 0.5 to 0.6 moves only the users
between those two bounds.

Every experiment covers every user with an id, so two running experiments overlap on everyone:
two that set the same option would fight over it, and that is refused (409).
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from recsys.errors import Conflict, InvalidInput

NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")  # experiment and variant names: also Prometheus label values
OPTIONS = ("bundle", "ranker", "candidates", "item_item", "explore", "popularity")
MODES = ("split", "interleave")
MAX_VARIANTS = 8
SHARE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Variant:
    """``share``: of the users, for a served variant; of the users also computed for, for a shadow one."""

    name: str
    share: float | None = None
    bundle: str | None = None  # a version directory under the bundle root, or "current"
    ranker: bool | None = None
    candidates: int | None = None
    item_item: bool | None = None
    explore: float | None = None  # probability that an answer gets one random swap of adjacent positions
    popularity: bool | None = None  # true: the most popular allowed items, the baseline every model must beat
    shadow: bool = False  # computed and logged, never served

    def options(self) -> dict[str, Any]:
        """The options this variant sets (the others are the service's)."""
        return {name: getattr(self, name) for name in OPTIONS if getattr(self, name) is not None}


@dataclass(frozen=True)
class Experiment:
    name: str
    variants: tuple[Variant, ...]
    mode: str = "split"
    alpha: float = 0.05  # the error rate the sequential test keeps, however often it is looked at
    started_ms: int = 0  # impressions before this belong to an earlier definition's run

    @property
    def control(self) -> Variant:
        """The first served variant: every difference is reported against it."""
        return self.served[0]

    @property
    def served(self) -> tuple[Variant, ...]:
        return tuple(v for v in self.variants if not v.shadow)

    @property
    def shadows(self) -> tuple[Variant, ...]:
        return tuple(v for v in self.variants if v.shadow)

    def variant(self, name: str) -> Variant | None:
        return next((v for v in self.variants if v.name == name), None)

    def assign(self, user_id: str) -> Variant:
        """The user's served variant (a split), by the cumulative shares; interleaving serves both (see
        ``recsys.experiments.interleave``) and reports the pair as the assignment."""
        u, total = bucket(self.name, user_id), 0.0
        for v in self.served:
            total += v.share or 0.0
            if u < total:
                return v
        return self.served[-1]  # shares sum to 1 within rounding

    def shadowed(self, user_id: str) -> list[Variant]:
        """Shadow variants computed for this user (each for its ``share`` of users, by its own hash)."""
        return [v for v in self.shadows if bucket(f"{self.name}/{v.name}", user_id) < (v.share if v.share is not None else 1.0)]

    def sets(self) -> set[str]:
        """The options any served variant sets."""
        return {name for v in self.served for name in v.options()}

    def to_record(self) -> dict:
        return {"name": self.name, "mode": self.mode, "alpha": self.alpha, "started_ms": self.started_ms,
                "variants": [{k: v for k, v in asdict(var).items() if v is not None and not (k == "shadow" and not v)}
                             for var in self.variants]}

    @classmethod
    def from_record(cls, record: Any) -> "Experiment":
        """A stored definition, checked like a new one: the store may hold anything (a hand edit, an older version)."""
        if not isinstance(record, dict) or not isinstance(record.get("variants"), list):
            raise ValueError("an experiment record is an object with a list of variants")
        known = {f.name for f in fields(Variant)}
        variants = []
        for v in record["variants"]:
            if not isinstance(v, dict) or set(v) - known:
                raise ValueError(f"bad variant {v!r}")
            variants.append(Variant(**v))
        try:
            return check(cls(record.get("name"), tuple(variants), record.get("mode", "split"), record.get("alpha", 0.05),
                             int(record.get("started_ms", 0))))
        except InvalidInput as err:
            raise ValueError(err.message) from None


def bucket(salt: str, user_id: str) -> float:
    """A uniform number in [0, 1) fixed by (salt, user id): 64 bits of BLAKE2b, the same in every process
    (Python's ``hash`` is salted per process)."""
    digest = hashlib.blake2b(f"{salt}\x00{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def check(exp: Experiment) -> Experiment:
    """Raise ``InvalidInput`` for a definition that cannot be run as written; returns it unchanged."""
    if not isinstance(exp.name, str) or not NAME.match(exp.name):
        raise InvalidInput(f"experiment name {exp.name!r} must match {NAME.pattern}")
    if exp.mode not in MODES:
        raise InvalidInput(f"mode must be one of {list(MODES)}, not {exp.mode!r}")
    if not (isinstance(exp.alpha, float) and 0.0 < exp.alpha < 0.5):
        raise InvalidInput("alpha must be a number in (0, 0.5)")
    names = [v.name for v in exp.variants]
    if not 1 <= len(names) <= MAX_VARIANTS:
        raise InvalidInput(f"an experiment has 1 to {MAX_VARIANTS} variants")
    for v in exp.variants:
        _check_variant(v)
    if len(set(names)) != len(names):
        raise InvalidInput(f"variant names must be distinct: {names}")
    served = exp.served
    if exp.mode == "interleave":
        if len(served) != 2:
            raise InvalidInput("interleave mode takes exactly two served variants (A, B): every user sees both, merged")
        if any(v.share is not None for v in served) or any(v.explore is not None for v in served):
            raise InvalidInput("in interleave mode served variants take no share (every user sees both) and no explore")
        return exp
    if not served:
        raise InvalidInput("at least one variant must be served (not shadow)")
    if any(v.share is None for v in served):
        raise InvalidInput("every served variant needs a share")
    total = sum(v.share for v in served)
    if abs(total - 1.0) > SHARE_TOLERANCE:
        raise InvalidInput(f"the served variants' shares must sum to 1, not {total:g}")
    return exp


def _check_variant(v: Variant) -> None:
    if not isinstance(v.name, str) or not NAME.match(v.name):
        raise InvalidInput(f"variant name {v.name!r} must match {NAME.pattern}")
    typed = {"ranker": bool, "item_item": bool, "popularity": bool, "shadow": bool, "bundle": str}
    for name, kind in typed.items():
        value = getattr(v, name)
        if value is not None and not isinstance(value, kind):
            raise InvalidInput(f"variant {v.name}: {name} must be a {kind.__name__}")
    if v.share is not None and (isinstance(v.share, bool) or not isinstance(v.share, (int, float))
                                or not math.isfinite(v.share) or not 0.0 < v.share <= 1.0):
        raise InvalidInput(f"variant {v.name}: share must be in (0, 1]")
    if v.candidates is not None and (isinstance(v.candidates, bool) or not isinstance(v.candidates, int)
                                     or not 1 <= v.candidates <= 100_000):
        raise InvalidInput(f"variant {v.name}: candidates must be an integer in [1, 100000]")
    if v.explore is not None and (isinstance(v.explore, bool) or not isinstance(v.explore, (int, float))
                                  or not 0.0 <= v.explore <= 1.0):
        raise InvalidInput(f"variant {v.name}: explore must be a probability in [0, 1]")
    if v.bundle is not None and not re.match(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$", v.bundle):
        raise InvalidInput(f"variant {v.name}: bundle must name a version directory (or 'current')")


def check_against(exp: Experiment, running: dict[str, Experiment], max_experiments: int) -> None:
    """Refuse (409) a definition that clashes with the other running experiments: one option set by two
    experiments (every experiment covers every user, so they would fight over it), a second interleaving
    (lists cannot be interleaved twice), or one experiment too many (each is a Prometheus label value)."""
    others = {name: e for name, e in running.items() if name != exp.name}
    if len(others) >= max_experiments:
        raise Conflict(f"{len(others)} experiments are running, the most this service keeps "
                       "(RECSYS_MAX_EXPERIMENTS); delete one first")
    for name, other in others.items():
        shared = exp.sets() & other.sets()
        if shared:
            raise Conflict(f"experiment {name!r} already sets {sorted(shared)} for the same users; "
                           "two experiments cannot set one option")
        if exp.mode == other.mode == "interleave":
            raise Conflict(f"experiment {name!r} already interleaves; one interleaving runs at a time")


@dataclass(frozen=True)
class Plan:
    """What one user is served under the running experiments: the options of the variants they are in
    (merged: experiments never set the same option), the assignments to report, the interleaved pair's
    options if an interleaving runs, and the shadow variants to compute beside it."""

    assignments: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    interleave: tuple[str, dict, dict] | None = None  # (experiment, A's options, B's options)
    shadows: list[tuple[str, str, dict]] = field(default_factory=list)  # (experiment, variant, options)


def plan(experiments: dict[str, Experiment], user_id: str | None) -> Plan:
    """The user's plan; a request without a user id (a cold-start user by features) is in no experiment:
    it has nothing stable to hash."""
    if user_id is None or not experiments:
        return Plan()
    out = Plan()
    for name, exp in sorted(experiments.items()):
        if exp.mode == "interleave":
            a, b = exp.served
            out.assignments[name] = f"{a.name}+{b.name}"
            out = Plan(out.assignments, out.options, (name, a.options(), b.options()), out.shadows)
        else:
            v = exp.assign(user_id)
            out.assignments[name] = v.name
            out.options.update(v.options())
        out.shadows.extend((name, s.name, s.options()) for s in exp.shadowed(user_id))
    return out
