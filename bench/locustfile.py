"""Locust scenario: a realistic traffic mix against the recommender service.

    locust -f bench/locustfile.py --host http://127.0.0.1:8000          # web UI on :8089
    bash bench/run_load.sh                                               # headless, CSV out

The mix, by task weight (out of 20): known users asking for recommendations by GET (10) and by
POST with filters (3), cold-start users described by demographics + recent items (2), new
interactions posted as events (3), and item-to-item lookups (2).

Environment:
    LOCUST_USER_IDS        known user ids, e.g. "1-943" (default: the MovieLens-100K users)
    LOCUST_ITEM_IDS        item ids, e.g. "1-1682" (default: the MovieLens-100K items)
    LOCUST_EVENT_USER_IDS  users that receive POST /events (default: LOCUST_USER_IDS); point it
                           at a separate range to keep the recommend traffic's profiles unchanged
    LOCUST_RPS_PER_USER    if set, each simulated user paces itself to this many requests per
                           second (a fixed total rate = users x this); otherwise a 0.1-1 s think time
    LOCUST_GENRES          comma-separated genres for the filtered requests, at least two (default:
                           some MovieLens-100K genres); a bundle answers an unknown genre with a 422

An id spec is a comma-separated list of ranges "A-B" (integers, inclusive) and single ids,
e.g. "1-10,42,100-120".
"""
from __future__ import annotations

import os
import random
import time

from locust import FastHttpUser, between, constant_throughput, task

MOVIELENS_USER_IDS = "1-943"
MOVIELENS_ITEM_IDS = "1-1682"

# Values seen in MovieLens-100K's user and item tables, for cold-start requests and filters.
MOVIELENS_GENRES = ["Action", "Comedy", "Drama", "Romance", "Thriller", "Sci-Fi", "Adventure", "Crime"]
GENDERS = ["M", "F"]
OCCUPATIONS = [
    "administrator", "artist", "educator", "engineer", "executive", "librarian",
    "programmer", "retired", "scientist", "student", "technician", "writer", "other",
]


def parse_id_range(spec: str) -> list[str]:
    """Expand an id spec such as ``"1-3,7"`` into ``["1", "2", "3", "7"]`` (raw string ids).

    Raises ValueError naming the spec for anything it cannot read: an empty spec or piece, a
    range whose ends are not integers, or one whose start is after its end.
    """
    ids: list[str] = []
    for piece in spec.split(","):
        piece = piece.strip()
        if not piece:
            raise ValueError(f"id spec {spec!r}: empty entry (expected e.g. '1-943' or '1-10,42')")
        if "-" in piece:
            start_text, _, end_text = piece.partition("-")
            try:
                start, end = int(start_text), int(end_text)
            except ValueError:
                raise ValueError(
                    f"id spec {spec!r}: range {piece!r} must be two integers 'A-B'"
                ) from None
            if start > end:
                raise ValueError(f"id spec {spec!r}: range {piece!r} starts after it ends")
            ids.extend(str(i) for i in range(start, end + 1))
        else:
            ids.append(piece)
    return ids


def _ids_from_env(name: str, default: str) -> list[str]:
    return parse_id_range(os.environ.get(name) or default)


USER_IDS = _ids_from_env("LOCUST_USER_IDS", MOVIELENS_USER_IDS)
ITEM_IDS = _ids_from_env("LOCUST_ITEM_IDS", MOVIELENS_ITEM_IDS)
EVENT_USER_IDS = _ids_from_env("LOCUST_EVENT_USER_IDS", os.environ.get("LOCUST_USER_IDS") or MOVIELENS_USER_IDS)
RPS_PER_USER = float(os.environ.get("LOCUST_RPS_PER_USER") or 0)
GENRES = [g.strip() for g in (os.environ.get("LOCUST_GENRES") or ",".join(MOVIELENS_GENRES)).split(",")]


class RecommenderUser(FastHttpUser):
    """One client of the recommender; each task is one request of the mix."""

    wait_time = constant_throughput(RPS_PER_USER) if RPS_PER_USER > 0 else between(0.1, 1.0)

    def _expect_items(self, response) -> None:
        """Fail a response unless it is a 200 whose JSON body has an ``items`` list."""
        if response.status_code != 200:
            response.failure(f"HTTP {response.status_code}: {response.text[:200] if response.text else ''}")
            return
        try:
            body = response.json()
        except ValueError:
            response.failure("response body is not JSON")
            return
        if not isinstance(body, dict) or not isinstance(body.get("items"), list):
            response.failure("JSON response has no 'items' list")
        else:
            response.success()

    @task(10)
    def recommend_known_user(self) -> None:
        user_id = random.choice(USER_IDS)
        with self.client.get(
            f"/recommend?user_id={user_id}&k=10", name="GET /recommend", catch_response=True
        ) as response:
            self._expect_items(response)

    @task(3)
    def recommend_known_user_filtered(self) -> None:
        start_year = random.choice([1970, 1980, 1990])
        payload = {
            "user_id": random.choice(USER_IDS),
            "k": 20,
            "exclude_seen": True,
            "filters": {
                "genres_any": random.sample(GENRES, 2),
                "year_min": start_year,
                "year_max": start_year + 19,
            },
        }
        with self.client.post(
            "/recommend", json=payload, name="POST /recommend (filters)", catch_response=True
        ) as response:
            self._expect_items(response)

    @task(2)
    def recommend_cold_start(self) -> None:
        payload = {
            "features": {
                "age": random.randint(16, 70),
                "gender": random.choice(GENDERS),
                "occupation": random.choice(OCCUPATIONS),
            },
            "recent_items": random.sample(ITEM_IDS, min(len(ITEM_IDS), random.randint(1, 5))),
            "k": 10,
        }
        with self.client.post(
            "/recommend", json=payload, name="POST /recommend (cold start)", catch_response=True
        ) as response:
            self._expect_items(response)

    @task(3)
    def post_event(self) -> None:
        payload = {
            "user_id": random.choice(EVENT_USER_IDS),
            "item_id": random.choice(ITEM_IDS),
            "rating": random.randint(1, 5),
            "timestamp": int(time.time()),
        }
        with self.client.post("/events", json=payload, name="POST /events", catch_response=True) as response:
            # An event has no items to return; any 2xx means it was written durably.
            if not 200 <= response.status_code < 300:
                response.failure(f"HTTP {response.status_code}: {response.text[:200] if response.text else ''}")
            else:
                response.success()

    @task(2)
    def similar_items(self) -> None:
        item_id = random.choice(ITEM_IDS)
        with self.client.get(
            f"/similar-items/{item_id}?k=10", name="GET /similar-items/[id]", catch_response=True
        ) as response:
            self._expect_items(response)
