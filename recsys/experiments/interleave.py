"""Team-draft interleaving (Radlinski, Kurup and Joachims 2008): two rankings merged into one list, each
position credited to the ranking ("team") that placed it there; the team whose items get more of an
answer's clicks wins that answer. Each user judges both rankings on the same list, so the comparison
needs far fewer impressions than a split, where each user sees one.

The impression logs each position's team, so clicks can be credited by whoever reads the log later.
"""
from __future__ import annotations

import random
from collections.abc import Hashable, Sequence

A, B = "A", "B"


def team_draft(a: Sequence[Hashable], b: Sequence[Hashable], k: int, rng: random.Random) -> tuple[list, list[str]]:
    """Merge ``a`` and ``b`` into at most ``k`` distinct items. In each round the team with fewer picks so far
    picks first (a coin decides a tie); a team picks its best item not yet in the list. When one team has
    nothing left to add, the other goes on alone. Returns the items and each one's team."""
    items: list = []
    teams: list[str] = []
    taken: set = set()
    picks = {A: 0, B: 0}
    rest = {A: iter(a), B: iter(b)}

    def pick(team: str) -> bool:
        for item in rest[team]:
            if item not in taken:
                taken.add(item)
                items.append(item)
                teams.append(team)
                picks[team] += 1
                return True
        return False

    exhausted: set[str] = set()
    while len(items) < k and len(exhausted) < 2:
        first = A if picks[A] < picks[B] or (picks[A] == picks[B] and rng.random() < 0.5) else B
        order = (first, B if first == A else A)
        team = next((t for t in order if t not in exhausted), None)
        if not pick(team):
            exhausted.add(team)
    return items, teams


def credit(teams: Sequence[str], clicked_positions: Sequence[int]) -> int:
    """+1 when B's items got more of the clicks (1-based positions into ``teams``), -1 when A's did, 0 on a tie
    (no clicks included)."""
    score = sum(1 if teams[p - 1] == B else -1 for p in set(clicked_positions) if 1 <= p <= len(teams))
    return (score > 0) - (score < 0)
