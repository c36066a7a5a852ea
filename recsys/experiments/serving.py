"""Answering users under their experiment plans: users with the same served configuration are answered
together (one engine pass per configuration), an interleaving runs both of its configurations and merges
them, exploration reorders, shadow variants are computed and only logged; every answer gets a request id,
its assignments, and an impression record.
"""
from __future__ import annotations

import random
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import orjson

from recsys.errors import RecsysError
from recsys.experiments.definition import Plan
from recsys.experiments.explore import swap
from recsys.experiments.interleave import team_draft

Run = Callable[[dict, list[int]], tuple[list, dict[str, float], str]]  # (options, user places) -> answers, timings, version


@dataclass
class Served:
    answers: list  # per user: the answer dict (with request_id and assignments) or the error
    timings: dict[str, float]
    impressions: list[dict]  # served ones, then shadow ones
    versions: set[str]


def serve(users: Sequence, plans: list[Plan], k: int, run: Run) -> Served:
    answers: list = [None] * len(users)
    impressions: list[dict] = []
    timings: dict[str, float] = defaultdict(float)
    versions: set[str] = set()
    groups: dict[bytes, list[int]] = defaultdict(list)
    for i, p in enumerate(plans):
        groups[orjson.dumps([p.options, p.interleave], option=orjson.OPT_SORT_KEYS)].append(i)
    now_ms = int(time.time() * 1000)
    for places in groups.values():
        p = plans[places[0]]
        start = time.perf_counter()
        if p.interleave is None:
            got, t, version = run(p.options, places)
            teams = None
        else:
            got, t, version = _interleaved(p, places, k, run, timings)
            teams = True
        per_user_s = (time.perf_counter() - start) / len(places)
        versions.add(version)
        for key, ms in t.items():
            timings[key] += ms
        for place, answer in zip(places, got):
            if isinstance(answer, RecsysError):
                answers[place] = answer
                continue
            rid = uuid.uuid4().hex  # a user asked for twice in a batch shares one answer dict: each place gets its own
            answer = _explore(dict(answer), p.options.get("explore"), rid)
            answer["request_id"], answer["assignments"] = rid, dict(plans[place].assignments)
            answers[place] = answer
            impressions.append(_impression(answer, rid, version, now_ms, per_user_s, teams))
    impressions.extend(_shadows(users, plans, answers, run, now_ms))
    return Served(answers, dict(timings), impressions, versions)


def _interleaved(p: Plan, places: list[int], k: int, run: Run, timings: dict) -> tuple[list, dict, str]:
    """Both configurations for these users, merged by team draft (fresh coins per answer). Where B has no answer
    (its bundle lacks the user), A's list is shown with no position credited to either team."""
    _, a_opts, b_opts = p.interleave
    got_a, t_a, version = run({**p.options, **a_opts}, places)
    got_b, t_b, _ = run({**p.options, **b_opts}, places)
    merged = []
    for a, b in zip(got_a, got_b):
        if isinstance(a, RecsysError):
            merged.append(a)
            continue
        if isinstance(b, RecsysError):  # B's bundle does not know the user: A's list, judged by nobody
            b = {"items": []}
        by_id = {item["item_id"]: item for item in b["items"]} | {item["item_id"]: item for item in a["items"]}
        rng = random.Random(uuid.uuid4().int)
        ids, teams = team_draft([x["item_id"] for x in a["items"]], [x["item_id"] for x in b["items"]], k, rng)
        merged.append({**a, "items": [by_id[i] for i in ids], "_teams": teams})
    return merged, {key: t_a.get(key, 0) + t_b.get(key, 0) for key in set(t_a) | set(t_b)}, version


def _explore(answer: dict, epsilon: float | None, rid: str) -> dict:
    """One random adjacent swap with probability ``epsilon``, the coins seeded by the request id. An interleaved
    list's teams move with their items (the swap may come from another experiment than the interleaving)."""
    if not epsilon:
        return answer
    order, props = swap(len(answer["items"]), epsilon, random.Random(rid))
    answer = {**answer, "items": [answer["items"][i] for i in order]}
    if "_teams" in answer:
        answer["_teams"] = [answer["_teams"][i] for i in order]
    answer["_explore"] = (order, props)
    return answer


def _impression(answer: dict, rid: str, version: str, now_ms: int, seconds: float, teams) -> dict:
    items = answer["items"]
    record = {"request_id": rid, "user_id": answer["user_id"], "ts_ms": now_ms, "bundle_version": version,
              "assignments": answer["assignments"], "items": [x["item_id"] for x in items],
              "scores": [_score(x) for x in items], "latency_ms": round(seconds * 1000, 3)}
    if teams:
        record["teams"] = answer.pop("_teams")
    if "_explore" in answer:
        order, props = answer.pop("_explore")
        record["ranks"], record["propensities"] = [r + 1 for r in order], props
    return record


def _score(item: dict) -> float | None:
    for key in ("ranking_score", "recall_score", "popularity"):
        if item.get(key) is not None:
            return item[key]
    return None


def _shadows(users: Sequence, plans: list[Plan], answers: list, run: Run, now_ms: int) -> list[dict]:
    """Each shadow configuration for its users, logged against the served answer's request id, never returned."""
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    options: dict[tuple[str, str], dict] = {}
    for i, p in enumerate(plans):
        if isinstance(answers[i], RecsysError):
            continue
        for exp, variant, opts in p.shadows:
            groups[(exp, variant)].append(i)
            options[(exp, variant)] = {**p.options, **opts}
    out = []
    for key, places in groups.items():
        start = time.perf_counter()
        got, _, version = run(options[key], places)
        seconds = (time.perf_counter() - start) / len(places)
        for place, answer in zip(places, got):
            if isinstance(answer, RecsysError):
                continue
            of = answers[place]["request_id"]
            record = _impression({**answer, "assignments": {}}, f"{of}/{key[1]}", version, now_ms, seconds, None)
            record.update(shadow=f"{key[0]}/{key[1]}", of=of)
            out.append(record)
    return out
