"""Exploration for learning from clicks: with probability ``epsilon`` an answer gets one swap of two
adjacent positions, the pair drawn uniformly (RandPair, Joachims et al. 2017). Comparing how often the
same items are clicked at neighbouring positions in the swapped and unswapped answers estimates the
ratio of their examination probabilities without assuming a click model (intervention harvesting).

Every shown item's propensity is the probability that the policy put it at the position it was shown,
given the ranking it started from; it is logged with the impression.
"""
from __future__ import annotations

import random


def swap(n: int, epsilon: float, rng: random.Random) -> tuple[list[int], list[float]]:
    """For a ranked list of ``n`` items: the order to show (``order[p]`` = the ranked index shown at
    position ``p``) and each shown item's propensity. An item ranked ``r`` stays at ``r`` with probability
    ``1 - epsilon * m_r / (n - 1)`` (``m_r`` = adjacent pairs it belongs to: 1 at either end, else 2) and
    moves to a neighbouring position with probability ``epsilon / (n - 1)``."""
    order = list(range(n))
    if n < 2 or epsilon <= 0:
        return order, [1.0] * n
    swapped = None
    if rng.random() < epsilon:
        i = rng.randrange(n - 1)
        order[i], order[i + 1] = order[i + 1], order[i]
        swapped = i
    move = epsilon / (n - 1)
    props = []
    for p, r in enumerate(order):
        if swapped is not None and p in (swapped, swapped + 1):
            props.append(move)
        else:
            pairs = 1 if r in (0, n - 1) else 2
            props.append(1.0 - move * pairs)
    return order, props
