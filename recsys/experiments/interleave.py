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
NO_TEAM = "-"  # a position filled after one ranking ran out: shown, credited to neither
_END = object()  # a ranking with nothing left to add


def team_draft(a: Sequence[Hashable], b: Sequence[Hashable], k: int, rng: random.Random) -> tuple[list, list[str]]:
    """Merge ``a`` and ``b`` into at most ``k`` distinct items. Each pick goes to the team with fewer picks so far
    (a coin decides a tie), which adds its best item not yet in the list; picks stop, as in the paper, as soon as
    either team has nothing left to add. A team that went on alone would win the positions its longer list fills,
    whatever the user thinks of them (random clicks on a 1-item A against a 3-item B gave B a preference of +0.67);
    so the list is filled from the other ranking, those positions ``NO_TEAM``. (Where a ranking ends before ``k``
    even the paper's stop leans a little, -0.08 in favour of a 2-item A against a 6-item B; the service's rankings
    are their candidate depth long, hundreds, so that happens only for a variant with fewer candidates than ``k``.)
    Returns the items and each one's team."""
    items: list = []
    teams: list[str] = []
    taken: set = set()
    picks = {A: 0, B: 0}
    rest = {A: _untaken(a, taken), B: _untaken(b, taken)}
    best = {team: next(rest[team], _END) for team in (A, B)}
    while len(items) < k and best[A] is not _END and best[B] is not _END:
        team = A if picks[A] < picks[B] or (picks[A] == picks[B] and rng.random() < 0.5) else B
        items.append(best[team])
        teams.append(team)
        taken.add(best[team])
        picks[team] += 1
        best = {t: best[t] if best[t] not in taken else next(rest[t], _END) for t in (A, B)}
    for team in (A, B):
        for item in [] if best[team] is _END else [best[team], *rest[team]]:
            if len(items) == k:
                break
            items.append(item)
            teams.append(NO_TEAM)
            taken.add(item)  # (the other ranking's rest skips it)
    return items, teams


def _untaken(ranking: Sequence[Hashable], taken: set):
    """The ranking's items not in ``taken`` at the moment each is reached."""
    return (item for item in ranking if item not in taken)


def credit(teams: Sequence[str], clicked_positions: Sequence[int]) -> int:
    """+1 when B's items got more of the clicks (1-based positions into ``teams``), -1 when A's did, 0 on a tie
    (no clicks, or clicks on ``NO_TEAM`` positions only, included)."""
    won = {A: -1, B: 1}
    score = sum(won.get(teams[p - 1], 0) for p in set(clicked_positions) if 1 <= p <= len(teams))
    return (score > 0) - (score < 0)
