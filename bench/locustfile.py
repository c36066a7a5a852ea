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
from collections.abc import Callable

import httpx
from locust import User, between, constant_throughput, task

from service.client import NO_RETRY, ClientError, Filters, RecsysClient

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


class RecommenderUser(User):
    """One client of the recommender, through the project's own client (service/client.py), as applications
    call it; each task is one request of the mix, reported to locust's statistics under its name. No retries:
    every request counts once, failed or not."""

    wait_time = constant_throughput(RPS_PER_USER) if RPS_PER_USER > 0 else between(0.1, 1.0)

    def __init__(self, environment):
        super().__init__(environment)
        self.client = RecsysClient(self.host, retry=NO_RETRY, connect_timeout=60, read_timeout=60,
                                   event_hooks={"response": [self._measure]})
        self.response_length = 0

    def on_stop(self) -> None:
        self.client.close()

    def _measure(self, response: httpx.Response) -> None:
        """The body's size, for locust's statistics (the typed answer no longer knows it)."""
        response.read()
        self.response_length = len(response.content)

    def _timed(self, request_type: str, name: str, call: Callable[[], object]) -> None:
        """Run ``call`` and report it to locust: its time, size, and the client's error if it failed (an error
        status, no answer, or an answer it cannot read)."""
        started, error, self.response_length = time.perf_counter(), None, 0
        try:
            call()
        except ClientError as err:
            error = err
        self.environment.events.request.fire(
            request_type=request_type, name=name, response_time=(time.perf_counter() - started) * 1000,
            response_length=self.response_length, response=None, context={}, exception=error)

    @task(10)
    def recommend_known_user(self) -> None:
        user_id = random.choice(USER_IDS)
        self._timed("GET", "GET /recommend", lambda: self.client.recommend(user_id, k=10))

    @task(3)
    def recommend_known_user_filtered(self) -> None:
        start_year = random.choice([1970, 1980, 1990])
        filters = Filters(genres_any=random.sample(GENRES, 2), year_min=start_year, year_max=start_year + 19)
        user_id = random.choice(USER_IDS)
        self._timed("POST", "POST /recommend (filters)", lambda: self.client.recommend(user_id, k=20, filters=filters))

    @task(2)
    def recommend_cold_start(self) -> None:
        features = {
            "age": random.randint(16, 70),
            "gender": random.choice(GENDERS),
            "occupation": random.choice(OCCUPATIONS),
        }
        recent = random.sample(ITEM_IDS, min(len(ITEM_IDS), random.randint(1, 5)))
        self._timed("POST", "POST /recommend (cold start)",
                    lambda: self.client.recommend(features=features, recent_items=recent, k=10))

    @task(3)
    def post_event(self) -> None:
        user_id, item_id = random.choice(EVENT_USER_IDS), random.choice(ITEM_IDS)
        rating, timestamp = random.randint(1, 5), int(time.time())
        self._timed("POST", "POST /events",
                    lambda: self.client.record_event(user_id, item_id, rating=rating, timestamp=timestamp))

    @task(2)
    def similar_items(self) -> None:
        item_id = random.choice(ITEM_IDS)
        self._timed("GET", "GET /similar-items/[id]", lambda: self.client.similar_items(item_id, k=10))
