"""The online service through HTTP, against the tiny bundle the offline pipeline builds (tests/conftest.py).

Known answers come from the bundle itself: brute force over its item vectors, the offline
towers rebuilt eagerly from the exported weights, and the catalogue arrays for filters.
A "restart" is leaving and re-entering ``TestClient(app)`` with the same state. Tests about what the state
holds (events, catalogue changes, restarts) run on both backends (``backend_start``, ``backend_client``): a
file state directory, and a Redis key prefix on a real redis-server.
"""
from __future__ import annotations

import gc
import json
import os
import random
import re
import shutil
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from recsys.bundle import resolve, set_current
from recsys.features import FeatureSpec, codes_of, encode_user_features, history_windows
from offline.split import temporal_split
from offline.tower_tables import TowerTables
from offline.two_tower import TwoTower
from recsys.state.protocol import Event, StoreUnavailable
from tests.servicekit import AUTH, TOKEN, assert_client_error, recorded

STAGES = {"features", "user_encoding", "ann_search", "rerank"}


@pytest.fixture(scope="module")
def eager(bundle) -> TwoTower:
    """Eager towers with the exported programs' weights (as tests/core/test_bundle.py rebuilds them)."""
    model = TwoTower(**bundle.manifest["model_config"])
    model.load_state_dict({**{f"user_tower.{k}": v for k, v in bundle.user_tower.state_dict().items()},
                           **{f"item_tower.{k}": v for k, v in bundle.item_tower.state_dict().items()}}, strict=False)
    return model.eval()


def by_source(response) -> tuple[set[str], set[str]]:
    """The recommended item ids found by the two-tower and those the item-item channel added."""
    items = response.json()["items"]
    return ({it["item_id"] for it in items if it["source"] == "two-tower"},
            {it["item_id"] for it in items if it["source"] == "item-item"})


def user_row(bundle, raw: str) -> int:
    return bundle.catalog["user_ids"].index(raw)


def history(bundle, row: int) -> tuple[np.ndarray, np.ndarray]:
    a = bundle.arrays
    lo, hi = a["history_offsets"][row], a["history_offsets"][row + 1]
    return a["history_items"][lo:hi], a["history_ratings"][lo:hi]


def eager_user_vector(bundle, model: TwoTower, row: int, items: np.ndarray, ratings: np.ndarray) -> np.ndarray:
    """The user vector from the offline feature code and the eager tower, for any history."""
    L = bundle.manifest["feature_spec"]["history_len"]
    hist_items, hist_ratings = history_windows(np.asarray(items, np.int64), np.asarray(ratings, np.float32),
                                               np.zeros(1, np.int64), np.array([len(items)]), L)
    a = bundle.arrays
    with torch.no_grad():
        vec = model.user_tower(torch.tensor([row + 1]), torch.from_numpy(a["user_cat"][row : row + 1]),
                               torch.from_numpy(a["user_num"][row : row + 1]), torch.from_numpy(hist_items),
                               torch.from_numpy(hist_ratings))
    return vec[0].numpy()


def ids(response) -> list[str]:
    return [it["item_id"] for it in response.json()["items"]]


def scores(response) -> dict[str, float]:
    return {it["item_id"]: it["recall_score"] for it in response.json()["items"]}


def items_matching(bundle, genres_any=(), genres_none=(), year_min=None, year_max=None) -> set[int]:
    """Brute force over the catalogue arrays: the rows a filter admits."""
    names = bundle.catalog["genre_names"]
    genres = bundle.arrays["item_genres"] > 0
    year = bundle.arrays["item_year"]
    keep = np.ones(len(year), bool)
    if genres_any:
        keep &= genres[:, [names.index(g) for g in genres_any]].any(axis=1)
    if genres_none:
        keep &= ~genres[:, [names.index(g) for g in genres_none]].any(axis=1)
    if year_min is not None:
        keep &= year >= year_min
    if year_max is not None:
        keep &= year <= year_max
    return set(np.flatnonzero(keep).tolist())


def item_ids_of(bundle, rows) -> set[str]:
    return {bundle.catalog["item_ids"][r] for r in rows}


# --------------------------------------------------------------------------- health, recommend
def test_health_and_ready_report_the_loaded_bundle(client, bundle):
    assert client.get("/health").json() == {"status": "alive"}
    ready = client.get("/ready").json()
    scale = bundle.manifest.get("rating_scale") or {"min": 0.0, "max": 5.0}
    assert ready == {"status": "ready", "state_store": "ok", "bundle_version": bundle.version,
                     "items": len(bundle.catalog["item_ids"]),
                     "rating_scale": {"min": scale["min"], "max": scale["max"]}}


def test_recommend_known_user_returns_k_unseen_items_with_raw_ids(client, bundle):
    row = user_row(bundle, "u1")
    seen = item_ids_of(bundle, history(bundle, row)[0])
    for response in (client.get("/recommend", params={"user_id": "u1", "k": 7}),
                     client.post("/recommend", json={"user_id": "u1", "k": 7})):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["user_id"] == "u1" and body["bundle_version"] == bundle.version and body["fallback"] is None
        assert len(body["items"]) == 7 and len(set(ids(response))) == 7
        assert set(ids(response)) <= set(bundle.catalog["item_ids"]) and not set(ids(response)) & seen
        assert STAGES <= set(body["timings_ms"]) and all(v >= 0 for v in body["timings_ms"].values())
        for it in body["items"]:
            row_i = bundle.catalog["item_ids"].index(it["item_id"])
            assert it["title"] == bundle.catalog["titles"][row_i]
            assert isinstance(it["recall_score"], float)
            assert it["ranking_score"] is None if bundle.ranker is None else isinstance(it["ranking_score"], float)
    get = client.get("/recommend", params={"user_id": "u1", "k": 7})
    assert ids(get) == ids(client.post("/recommend", json={"user_id": "u1", "k": 7}))  # the two verbs are one pipeline


def test_recommend_order_follows_the_last_stage(client, bundle):
    items = client.post("/recommend", json={"user_id": "u2", "k": 20}).json()["items"]
    key = "recall_score" if bundle.ranker is None else "ranking_score"
    values = [it[key] for it in items]
    assert values == sorted(values, reverse=True)


def test_exclude_seen_off_lets_history_back_in(client, bundle):
    """A genre small enough to be listed whole: with exclusion off it comes back entire, seen items too."""
    seen = set(history(bundle, user_row(bundle, "u3"))[0].tolist())
    genre = next(g for g in bundle.catalog["genre_names"]
                 if len(items_matching(bundle, genres_any=[g])) <= 100 and items_matching(bundle, genres_any=[g]) & seen)
    everything = items_matching(bundle, genres_any=[genre])
    request = {"user_id": "u3", "k": 100, "filters": {"genres_any": [genre]}}
    assert set(ids(client.post("/recommend", json={**request, "exclude_seen": False}))) == item_ids_of(bundle, everything)
    assert set(ids(client.post("/recommend", json=request))) == item_ids_of(bundle, everything - seen)
    response = client.get("/recommend", params={"user_id": "u3", "k": 100, "exclude_seen": "false"})
    assert len(ids(response)) == 100


def test_candidate_depth_bounds_what_the_ranker_sees(client, bundle):
    """``candidates`` is the two-tower's depth; the item-item channel adds at most the bundle's share after it."""
    extra = bundle.manifest["params"]["index"]["item_item_candidates"]
    sources = set()
    for depth in (50, 5):
        items = client.post("/recommend", json={"user_id": "u4", "k": 5, "candidates": depth}).json()["items"]
        assert len(items) == 5
        for it in items:
            sources.add(it["source"])
            if it["source"] == "two-tower":
                assert it["recall_rank"] < depth
            else:
                assert it["source"] == "item-item" and depth <= it["recall_rank"] < depth + extra
    assert sources == {"two-tower", "item-item"}
    # candidates below k are raised to k
    assert len(client.post("/recommend", json={"user_id": "u4", "k": 8, "candidates": 2}).json()["items"]) == 8


def test_cold_user_from_features_and_recent_items(client, bundle, eager):
    recent = ["i3", "i10", "i42"]
    features = {"gender": "F", "age": 30, "occupation": "b"}
    response = client.post("/recommend", json={"features": features, "recent_items": recent, "k": 10})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["fallback"] is None and body["user_id"] is None and len(body["items"]) == 10
    assert not set(ids(response)) & set(recent)  # recent items count as seen
    # known answer: the eager user tower with id 0 (never seen), the encoded features and the recent window
    spec = FeatureSpec(**bundle.manifest["feature_spec"])
    cat, num = encode_user_features(spec, codes_of(bundle.catalog["user_vocab"]), features)
    rows = np.array([bundle.catalog["item_ids"].index(i) for i in recent])
    hist_items, hist_ratings = history_windows(rows, np.zeros(len(rows), np.float32), np.zeros(1, np.int64),
                                               np.array([len(rows)]), spec.history_len)
    with torch.no_grad():
        vec = eager.user_tower(torch.tensor([0]), torch.from_numpy(cat), torch.from_numpy(num),
                               torch.from_numpy(hist_items), torch.from_numpy(hist_ratings))[0].numpy()
    vectors = bundle.arrays["item_vectors"]
    for item, score in scores(response).items():
        assert score == pytest.approx(float(vectors[bundle.catalog["item_ids"].index(item)] @ vec), abs=1e-4)
    # an unseen user with only recent items gets a personalised (not popularity) list
    only_recent = client.post("/recommend", json={"recent_items": recent, "k": 10}).json()
    assert only_recent["fallback"] is None
    # an unknown user id with features is served as a cold user, not a 404
    named = client.post("/recommend", json={"user_id": "brand-new", "features": {"gender": "M"}, "k": 3})
    assert named.status_code == 200 and named.json()["user_id"] == "brand-new"


def test_empty_profile_falls_back_to_popularity_and_says_so(client, bundle):
    response = client.post("/recommend", json={"k": 10})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["fallback"] == "popularity"
    pop = bundle.arrays["popularity"]
    expected = [bundle.catalog["item_ids"][i] for i in np.lexsort((np.arange(len(pop)), -pop))[:10]]
    assert ids(response) == expected
    assert [it["popularity"] for it in body["items"]] == sorted(pop, reverse=True)[:10]
    # the fallback has no recall or ranking stage: those fields stay empty
    assert all(it["ranking_score"] is None and it["recall_score"] is None and it["recall_rank"] is None
               for it in body["items"])


def test_explain_flag_adds_reasons(client, bundle):
    plain = client.post("/recommend", json={"user_id": "u5", "k": 3}).json()["items"]
    explained = client.post("/recommend", json={"user_id": "u5", "k": 3, "explain": True}).json()["items"]
    assert all("features" not in it for it in plain)
    assert [it["item_id"] for it in explained] == [it["item_id"] for it in plain]
    for it in explained:
        assert isinstance(it["features"], dict) and it["features"]
        assert it["features"]["recall_score"] == pytest.approx(it["recall_score"], abs=1e-4)
    if bundle.ranker is not None:
        assert len(explained[0]["features"]) == len(bundle.ranker["feature_names"])
    fallback = client.post("/recommend", json={"features": {}, "k": 3, "explain": True}).json()
    assert fallback["fallback"] == "popularity" and all("features" not in it for it in fallback["items"])


# --------------------------------------------------------------------------- filters
def test_genre_filter_over_fetches_to_fill_k(client, bundle):
    """The unfiltered top-10 holds few items of the genre, so 10 matching items must come from deeper."""
    k = 10
    unfiltered = client.post("/recommend", json={"user_id": "u6", "k": k, "candidates": k}).json()["items"]
    names = bundle.catalog["genre_names"]
    in_top = {g: sum(g in it["genres"] for it in unfiltered) for g in names}
    seen = set(history(bundle, user_row(bundle, "u6"))[0].tolist())
    eligible = [g for g in names if len(items_matching(bundle, genres_any=[g]) - seen) > 2 * k]
    genre = min(eligible, key=in_top.get)
    assert in_top[genre] < k  # so filtering the first k candidates could not fill the list
    response = client.post("/recommend", json={"user_id": "u6", "k": k, "candidates": k, "filters": {"genres_any": [genre]}})
    assert response.status_code == 200, response.text
    allowed = item_ids_of(bundle, items_matching(bundle, genres_any=[genre]) - seen)
    assert len(ids(response)) == k and set(ids(response)) <= allowed
    assert all(genre in it["genres"] for it in response.json()["items"])


def test_filters_match_brute_force_top_k(client, bundle, eager):
    row = user_row(bundle, "u7")
    items, ratings = history(bundle, row)
    vec = eager_user_vector(bundle, eager, row, items, ratings)
    names = bundle.catalog["genre_names"]
    k = 10
    cases = [{"genres_any": [names[0], names[1]]}, {"genres_none": [names[0]]}, {"year_min": 1960, "year_max": 1990},
             {"genres_none": [names[2]], "year_min": 1980}]
    for filters in cases:
        allowed = np.array(sorted(items_matching(bundle, **filters) - set(items.tolist())))
        assert len(allowed) >= k
        expected = allowed[np.argsort(-(bundle.arrays["item_vectors"][allowed] @ vec))[: k]]
        response = client.post("/recommend", json={"user_id": "u7", "k": k, "candidates": k, "filters": filters})
        assert response.status_code == 200, response.text
        got = ids(response)
        assert len(got) == k and set(got) <= item_ids_of(bundle, allowed), filters
        tower, merged = by_source(response)  # the item-item channel adds only items the tower missed
        assert len(tower - item_ids_of(bundle, expected)) <= 1, filters  # HNSW is approximate; nearly exact here
        assert not merged & item_ids_of(bundle, expected), filters
        # GET takes the same filters as query parameters (genres repeated)
        via_get = client.get("/recommend", params={"user_id": "u7", "k": k, "candidates": k, **filters})
        assert ids(via_get) == got


def test_selective_filter_returns_every_match_when_fewer_than_k(client, bundle):
    years = bundle.arrays["item_year"]
    year = int(years[0])
    expected = item_ids_of(bundle, items_matching(bundle, year_min=year, year_max=year))
    assert 1 <= len(expected) < 10
    response = client.post("/recommend", json={"user_id": "u8", "k": 10, "exclude_seen": False,
                                                "filters": {"year_min": year, "year_max": year}})
    assert response.status_code == 200 and set(ids(response)) == expected
    assert all(it["year"] == year for it in response.json()["items"])
    nothing = client.post("/recommend", json={"user_id": "u8", "k": 10, "filters": {"year_min": 3000}})
    assert nothing.status_code == 200 and nothing.json()["items"] == []


def test_popularity_fallback_respects_filters(client, bundle):
    names = bundle.catalog["genre_names"]
    response = client.post("/recommend", json={"k": 10, "filters": {"genres_any": [names[3]]}})
    body = response.json()
    assert body["fallback"] == "popularity" and len(body["items"]) == 10
    assert all(names[3] in it["genres"] for it in body["items"])


# --------------------------------------------------------------------------- similar items
def test_similar_items_excludes_itself_and_matches_brute_force(client, bundle):
    vectors = bundle.arrays["item_vectors"]
    response = client.get("/similar-items/i0", params={"k": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["item_id"] == "i0" and body["bundle_version"] == bundle.version
    got = ids(response)
    assert "i0" not in got and len(got) == 5
    sims = vectors @ vectors[0]
    sims[0] = -np.inf
    expected = [bundle.catalog["item_ids"][i] for i in np.argsort(-sims)[:5]]
    assert len(set(got) & set(expected)) >= 4
    for it in body["items"]:
        assert it["recall_score"] == pytest.approx(float(sims[bundle.catalog["item_ids"].index(it["item_id"])]), abs=1e-4)


def test_similar_items_unknown_id_is_404(client):
    assert_client_error(client.get("/similar-items/no-such-item"), 404)
    assert_client_error(client.get("/similar-items/i0", params={"k": 0}), 422)
    assert_client_error(client.get("/similar-items/i0", params={"k": 10_000}), 422)


def test_an_item_id_in_a_path_is_checked_as_in_a_body(client):
    """Blank or longer than any item id can be: a 422 naming the id, not a 404 for an id that cannot exist."""
    from service.schemas import MAX_ID_CHARS

    for bad in ("%20%20", "x" * (MAX_ID_CHARS + 1)):
        for response in (client.get(f"/similar-items/{bad}"), client.delete(f"/admin/items/{bad}", headers=AUTH)):
            assert_client_error(response, 422)
            assert response.json()["details"][0]["loc"] == ["path", "item_id"], response.text
    assert_client_error(client.delete("/admin/items/" + "x" * MAX_ID_CHARS, headers=AUTH), 404)  # the longest: unknown


# --------------------------------------------------------------------------- events
def test_event_changes_next_recommendation_and_survives_restart(backend_start, bundle, eager, tmp_path):
    row = user_row(bundle, "u9")
    items, ratings = history(bundle, row)
    with backend_start() as client:
        before = client.get("/recommend", params={"user_id": "u9", "k": 10})
        top = ids(before)[0]
        ack = client.post("/events", json={"user_id": "u9", "item_id": top, "rating": 5, "timestamp": 2_000_000_000})
        assert ack.status_code == 200, ack.text
        assert ack.json() == {"status": "recorded", "user_id": "u9", "history_length": len(items) + 1}
        # acknowledged means written: the event is in the store's record when the response arrives
        if backend_start.backend == "file":  # the file backend's own record: the line is in the log
            lines = [json.loads(x) for x in (tmp_path / "state" / "events.jsonl").read_text().splitlines()]
            assert lines == [{"user_id": "u9", "item_id": top, "rating": 5.0, "timestamp": 2_000_000_000}]
        logged = client.app.state.service.store.events_since()
        assert [(user, event) for _, user, event in logged] == [("u9", Event(top, 5.0, 2_000_000_000))]
        after = client.get("/recommend", params={"user_id": "u9", "k": 10})
        assert top not in ids(after)  # now seen
        # the user vector moved: the same item scores differently, by exactly the offline tower's new vector
        new_vec = eager_user_vector(bundle, eager, row, np.append(items, bundle.catalog["item_ids"].index(top)),
                                    np.append(ratings, 5.0))
        old_vec = eager_user_vector(bundle, eager, row, items, ratings)
        assert not np.allclose(new_vec, old_vec, atol=1e-4)
        vectors = bundle.arrays["item_vectors"]
        for item, score in scores(after).items():
            assert score == pytest.approx(float(vectors[bundle.catalog["item_ids"].index(item)] @ new_vec), abs=1e-4)
        common = set(scores(before)) & set(scores(after))
        assert any(abs(scores(before)[i] - scores(after)[i]) > 1e-5 for i in common)
    with backend_start() as client:  # restart: the event is read back from the store
        again = client.get("/recommend", params={"user_id": "u9", "k": 10})
        assert ids(again) == ids(after) and scores(again) == pytest.approx(scores(after), abs=1e-6)
        ack = client.post("/events", json={"user_id": "u9", "item_id": ids(again)[0]})
        assert ack.json()["history_length"] == len(items) + 2


def test_a_vector_computed_before_an_event_is_not_served_after_it(backend_start, bundle, eager):
    """The race a cache invites: a request reads the history, an event lands, the request then caches
    the vector of the old history. The next request must still see the event."""
    row = user_row(bundle, "u18")
    items, ratings = history(bundle, row)
    with backend_start() as client:
        engine = client.app.state.service.engine
        in_flight = engine.users.resolve("u18")  # read before the event...
        assert client.post("/events", json={"user_id": "u18", "item_id": "i40", "rating": 2}).status_code == 200
        engine.users.vectors([in_flight])  # ...cached after it
        after = client.get("/recommend", params={"user_id": "u18", "k": 5})
        new_vec = eager_user_vector(bundle, eager, row, np.append(items, 40), np.append(ratings, 2.0))
        vectors = bundle.arrays["item_vectors"]
        for item, score in scores(after).items():
            assert score == pytest.approx(float(vectors[bundle.catalog["item_ids"].index(item)] @ new_vec), abs=1e-4)


def test_events_make_a_new_user_recommendable(backend_start):
    with backend_start() as client:
        assert_client_error(client.get("/recommend", params={"user_id": "walk-in"}), 404)
        for n, item in enumerate(["i1", "i2", "i3"], start=1):
            assert client.post("/events", json={"user_id": "walk-in", "item_id": item}).json()["history_length"] == n
        response = client.get("/recommend", params={"user_id": "walk-in", "k": 5})
        assert response.status_code == 200 and response.json()["fallback"] is None
        assert not {"i1", "i2", "i3"} & set(ids(response))
    with backend_start() as client:
        assert client.get("/recommend", params={"user_id": "walk-in", "k": 5}).status_code == 200


def test_a_user_only_the_store_knows_is_503_while_it_cannot_be_read_never_unknown(start, monkeypatch):
    """The store down: a bundle user is served from the bundle alone, but a user the bundle does not know may well
    have a history there. "Unknown user" (404, never retried, "send features") would be a wrong answer; 503 with
    Retry-After is the true one, alone and in its place in a batch."""
    with start() as client:
        client.post("/events", json={"user_id": "walk-in", "item_id": "i1"})
        users = client.app.state.service.engine.users

        def down(*_args, **_kwargs):
            raise StoreUnavailable("Redis ConnectionError: connection refused")

        async def down_async(*args, **kwargs):
            down()

        monkeypatch.setattr(users, "history", down)
        monkeypatch.setattr(users, "history_async", down_async)
        response = client.get("/recommend", params={"user_id": "walk-in"})
        assert response.status_code == 503 and response.headers["retry-after"] == "1", response.text
        assert "walk-in" in response.json()["error"] and "retry" in response.json()["error"]
        assert client.get("/recommend", params={"user_id": "u5", "k": 3}).status_code == 200
        batch = client.post("/recommend/batch", json={"user_ids": ["u5", "walk-in"], "k": 3}).json()
        assert len(batch["results"][0]["items"]) == 3 and batch["results"][1]["status"] == 503, batch
        monkeypatch.undo()
        assert client.get("/recommend", params={"user_id": "walk-in"}).status_code == 200


def test_torn_log_tail_does_not_swallow_the_next_event(start, tmp_path, bundle):
    """A crash mid-append leaves a partial line; the next acknowledged event must still replay.
    (File backend only: a torn line is the file log's failure; Redis applies a script whole or not at all.)"""
    state = tmp_path / "state"
    state.mkdir()
    (state / "events.jsonl").write_bytes(b'{"user_id": "u1", "item_id": "i1", "rat')
    with start() as client:
        assert client.post("/events", json={"user_id": "u10", "item_id": "i5"}).status_code == 200
    with start() as client:
        response = client.post("/recommend", json={"user_id": "u10", "k": 100})
        assert "i5" not in ids(response)
        base = len(history(bundle, user_row(bundle, "u10"))[0])
        assert client.post("/events", json={"user_id": "u10", "item_id": "i6"}).json()["history_length"] == base + 2


# --------------------------------------------------------------------------- catalogue
def test_catalogue_add_replace_remove_survive_restart(backend_start, bundle, eager):
    a = bundle.arrays
    names = bundle.catalog["genre_names"]
    twin = {"item_id": "new-twin", "title": "Twin of i0", "year": int(a["item_year"][0]),
            "genres": [names[j] for j in np.flatnonzero(a["item_genres"][0])]}
    with torch.no_grad():  # a new item has no id embedding: the item tower runs on its features with id 0
        twin_vec = bundle.item_tower(torch.tensor([0]), torch.from_numpy(a["item_genres"][:1]),
                                     torch.from_numpy(a["item_dense"][:1]), torch.from_numpy(a["item_cat"][:1]))[0].numpy()
    replaced_year = 2150
    with backend_start() as client:
        n = client.get("/ready").json()["items"]
        added = client.post("/admin/items", json=twin, headers=AUTH)
        assert added.status_code == 200 and added.json() == {"item_id": "new-twin", "status": "added"}
        assert client.get("/ready").json()["items"] == n + 1
        answer = client.get("/similar-items/new-twin", params={"k": 5}).json()
        similar = answer["items"]
        # nobody has interacted with it: its neighbours by content (the tower's id-0 vectors), i0 itself first
        sims = a["item_content_vectors"] @ twin_vec
        expected = [bundle.catalog["item_ids"][i] for i in np.argsort(-sims)[:5]]
        assert answer["source"] == "content" and expected[0] == "i0"
        assert similar[0]["item_id"] == expected[0] and len({it["item_id"] for it in similar} & set(expected)) >= 4
        # the new item appears among the neighbours of its nearest item
        nearest = similar[0]["item_id"]
        row = bundle.catalog["item_ids"].index(nearest)
        rank = int(np.sum(a["item_vectors"] @ a["item_vectors"][row] > float(twin_vec @ a["item_vectors"][row])))
        assert rank < 100
        neighbours = client.get(f"/similar-items/{nearest}", params={"k": rank + 1}).json()["items"]
        assert "new-twin" in [it["item_id"] for it in neighbours]
        # and it is recommendable, with the score of the vector the item tower gave it
        year = twin["year"]
        response = client.post("/recommend", json={"user_id": "u11", "k": 100, "exclude_seen": False,
                                                    "filters": {"year_min": year, "year_max": year}})
        match = [it for it in response.json()["items"] if it["item_id"] == "new-twin"]
        assert match and match[0]["title"] == "Twin of i0"
        row = user_row(bundle, "u11")
        user_vec = eager_user_vector(bundle, eager, row, *history(bundle, row))
        assert match[0]["recall_score"] == pytest.approx(float(user_vec @ twin_vec), abs=1e-4)

        # replace: new metadata, same row (a bundle item and the item just added)
        for item_id in ("i20", "new-twin"):
            rep = client.put("/admin/items", json={"item_id": item_id, "title": f"{item_id} v2", "year": replaced_year,
                                                   "genres": [names[4]]}, headers=AUTH)
            assert rep.status_code == 200 and rep.json()["status"] == "replaced", rep.text
        assert client.get("/ready").json()["items"] == n + 1

        # remove: never returned again
        top = next(i for i in ids(client.get("/recommend", params={"user_id": "u11", "k": 5})) if i not in ("i20", "new-twin"))
        assert client.delete(f"/admin/items/{top}", headers=AUTH).json() == {"item_id": top, "status": "removed"}
        assert client.get("/ready").json()["items"] == n

        def check(client):
            got = client.post("/recommend", json={"user_id": "u11", "k": 100, "exclude_seen": False,
                                                  "filters": {"year_min": replaced_year}}).json()["items"]
            assert {it["item_id"]: (it["title"], it["genres"], it["year"]) for it in got} == {
                "i20": ("i20 v2", [names[4]], replaced_year), "new-twin": ("new-twin v2", [names[4]], replaced_year)}
            for user in ("u11", "u12", "u13"):
                listed = ids(client.post("/recommend", json={"user_id": user, "k": 100, "exclude_seen": False}))
                assert top not in listed and len(listed) == 100
            assert top not in ids(client.post("/recommend", json={"k": 100}))  # popularity fallback too
            assert_client_error(client.get(f"/similar-items/{top}"), 404)
            assert all(top not in ids(client.get(f"/similar-items/{i}", params={"k": 100})) for i in ("i1", "i2"))
            assert_client_error(client.post("/events", json={"user_id": "u11", "item_id": top}), 404)
            assert client.get("/ready").json()["items"] == n

        check(client)
    with backend_start() as client:  # restart: the catalogue changes are read back from the store
        check(client)
        assert_client_error(client.delete(f"/admin/items/{top}", headers=AUTH), 404)
        # a removed item may come back
        assert client.post("/admin/items", json={"item_id": top}, headers=AUTH).json()["status"] == "replaced"
        assert client.get(f"/similar-items/{top}").status_code == 200


def test_a_failed_log_write_is_neither_acknowledged_nor_applied_nor_written_later(start, bundle, monkeypatch, tmp_path):
    """Disk full at fsync: 503, nothing applied, /ready degraded, and the failed records are cut from the logs
    (a buffered write must not surface with the next successful append, nor a retry become a duplicate).
    File backend only (its fsync and logs); Redis unavailable is tests/service/test_replicas.py's."""
    real_fsync = os.fsync

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    base = len(history(bundle, user_row(bundle, "u19"))[0])
    with start() as client:
        items = client.get("/ready").json()["items"]
        monkeypatch.setattr(os, "fsync", full_disk)
        for method, url, body in (("POST", "/admin/items", {"item_id": "lost"}), ("DELETE", "/admin/items/i3", None),
                                  ("POST", "/events", {"user_id": "u19", "item_id": "i3"})):
            response = client.request(method, url, json=body, headers=AUTH)
            assert response.status_code == 503 and "same Idempotency-Key" in response.json()["error"], response.text
        ready = client.get("/ready").json()
        assert ready["status"] == "degraded" and "No space left" in ready["state_store"]
        monkeypatch.setattr(os, "fsync", real_fsync)
        assert client.get("/ready").json()["items"] == items
        assert_client_error(client.get("/similar-items/lost"), 404)
        assert client.get("/similar-items/i3").status_code == 200
        assert client.post("/events", json={"user_id": "u19", "item_id": "i4"}).json()["history_length"] == base + 1
        assert client.get("/ready").json()["status"] == "ready"
    logged = [json.loads(line) for line in (tmp_path / "state" / "events.jsonl").read_text().splitlines()]
    assert [(r["user_id"], r["item_id"]) for r in logged] == [("u19", "i4")]
    assert (tmp_path / "state" / "catalog.jsonl").read_text() == ""


def test_events_on_items_added_online(backend_start):
    """An item the towers never saw may enter a history: it counts as seen, and encoding still works."""
    with backend_start() as client:
        assert client.post("/admin/items", json={"item_id": "fresh", "genres": ["genre1"], "year": 2001},
                           headers=AUTH).status_code == 200
        assert client.post("/events", json={"user_id": "u14", "item_id": "fresh", "rating": 4}).status_code == 200
        response = client.post("/recommend", json={"user_id": "u14", "k": 10})
        assert response.status_code == 200 and "fresh" not in ids(response)
        cold = client.post("/recommend", json={"recent_items": ["fresh", "i1"], "k": 10})
        assert cold.status_code == 200 and "fresh" not in ids(cold)
        assert client.post("/events", json={"user_id": "walk-in", "item_id": "fresh"}).status_code == 200
        assert client.get("/recommend", params={"user_id": "walk-in"}).status_code == 200


def test_event_on_an_item_removed_later_is_kept_after_restart(backend_start, bundle):
    base = len(history(bundle, user_row(bundle, "u15"))[0])
    with backend_start() as client:
        assert client.post("/events", json={"user_id": "u15", "item_id": "i7"}).json()["history_length"] == base + 1
        assert client.delete("/admin/items/i7", headers=AUTH).status_code == 200
    with backend_start() as client:
        assert client.post("/events", json={"user_id": "u15", "item_id": "i8"}).json()["history_length"] == base + 2


def test_new_item_popularity_starts_at_zero_and_replace_keeps_it(backend_start, bundle):
    pop = bundle.arrays["popularity"]
    top = bundle.catalog["item_ids"][int(np.argmax(pop))]
    with backend_start() as client:
        assert client.put("/admin/items", json={"item_id": top, "title": "renamed"}, headers=AUTH).status_code == 200
        assert client.post("/admin/items", json={"item_id": "zero-pop", "year": 2999}, headers=AUTH).status_code == 200
        items = client.post("/recommend", json={"k": 1}).json()["items"]
        assert [(it["item_id"], it["title"], it["popularity"]) for it in items] == [(top, "renamed", float(pop.max()))]
        fresh = client.post("/recommend", json={"k": 5, "filters": {"year_min": 2999}}).json()["items"]
        assert [(it["item_id"], it["popularity"]) for it in fresh] == [("zero-pop", 0.0)]


# --------------------------------------------------------------------------- admin
def test_admin_endpoints_need_the_configured_token(backend_start, tmp_path):
    item = {"item_id": "x1"}
    with backend_start(token=None) as client:
        for response in (client.post("/admin/items", json=item), client.post("/admin/items", json=item, headers=AUTH),
                         client.delete("/admin/items/i1", headers=AUTH), client.post("/admin/reload", headers=AUTH)):
            assert_client_error(response, 403)
            assert "disabled" in response.json()["error"]
    with backend_start(state_dir=tmp_path / "state2") as client:
        for auth in (None, "Bearer wrong-token", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x"):
            headers = {} if auth is None else {"Authorization": auth}
            assert_client_error(client.post("/admin/items", json=item, headers=headers), 401)
            assert_client_error(client.post("/admin/reload", headers=headers), 401)
        assert client.post("/admin/items", json=item, headers=AUTH).status_code == 200
        assert client.delete("/admin/items/x1", headers=AUTH).status_code == 200
        assert client.post("/admin/reload", headers=AUTH).status_code == 200


def second_version(root: Path, name: str) -> Path:
    """Another version under ``root``: the current one copied, with its own version name."""
    vdir = root / name
    shutil.copytree(resolve(root), vdir)
    manifest = json.loads((vdir / "manifest.json").read_text())
    manifest["version"] = name
    (vdir / "manifest.json").write_text(json.dumps(manifest))
    return vdir


def test_reload_swaps_the_bundle_and_keeps_online_state(backend_start, own_root, bundle):
    second_version(own_root, "v2")
    second_version(own_root, "v3")
    with backend_start(bundle_dir=own_root) as client:
        assert client.post("/events", json={"user_id": "u16", "item_id": "i30"}).status_code == 200
        assert client.post("/admin/items", json={"item_id": "kept", "year": 2222}, headers=AUTH).status_code == 200
        response = client.post("/admin/reload", json={"version": "v2"}, headers=AUTH)
        assert response.status_code == 200, response.text
        assert response.json() == {"status": "reloaded", "previous_version": bundle.version, "bundle_version": "v2"}
        assert client.get("/ready").json()["bundle_version"] == "v2"
        body = client.post("/recommend", json={"user_id": "u16", "k": 100}).json()
        assert body["bundle_version"] == "v2" and "i30" not in ids_of(body)
        assert client.get("/similar-items/kept").status_code == 200  # catalogue log replayed onto the new bundle
        # no body: whatever 'current' names
        set_current(own_root, "v3")
        assert client.post("/admin/reload", headers=AUTH).json()["bundle_version"] == "v3"
        assert client.get("/recommend", params={"user_id": "u1"}).json()["bundle_version"] == "v3"


def test_the_served_engines_are_frozen_out_of_the_cyclic_gc_and_a_swapped_out_one_is_freed(start, own_root, bundle):
    """A serving process freezes what it holds once the engine is loaded (a full collection over a 1M-item engine
    held the GIL 260 ms); a reload collects the engine it swapped out, though it was frozen with the rest (its
    reference cycles would otherwise keep its arrays for good); stopping the service unfreezes."""
    second_version(own_root, "v2")
    with start(bundle_dir=own_root) as client:
        assert gc.get_freeze_count() > 10_000  # (the engine, its torch modules, the app: not just a few objects)
        swapped_out = weakref.ref(client.app.state.service.engine)
        assert client.post("/admin/reload", json={"version": "v2"}, headers=AUTH).status_code == 200
        assert swapped_out() is None
        assert gc.get_freeze_count() > 10_000
        assert client.post("/recommend", json={"user_id": "u16", "k": 5}).json()["bundle_version"] == "v2"
    assert gc.get_freeze_count() == 0


def ids_of(body: dict) -> list[str]:
    return [it["item_id"] for it in body["items"]]


def test_failed_reload_keeps_serving_the_old_bundle(start, own_root, bundle):
    broken = second_version(own_root, "broken")
    with open(broken / "item_index.bin", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\xff\x00\xff")
    with start(bundle_dir=own_root) as client:
        before = client.get("/recommend", params={"user_id": "u1", "k": 5})
        response = client.post("/admin/reload", json={"version": "broken"}, headers=AUTH)
        assert_client_error(response, 409)
        assert "checksum mismatch" in response.json()["error"] and bundle.version in response.json()["error"]
        assert_client_error(client.post("/admin/reload", json={"version": "missing"}, headers=AUTH), 409)
        for bad in ("../elsewhere", "/etc", ".hidden"):
            assert_client_error(client.post("/admin/reload", json={"version": bad}, headers=AUTH), 422)
        after = client.get("/recommend", params={"user_id": "u1", "k": 5})
        assert after.json()["bundle_version"] == bundle.version and ids(after) == ids(before)
        assert client.get("/ready").json()["bundle_version"] == bundle.version


# --------------------------------------------------------------------------- start-up
def test_start_up_refuses_a_missing_bundle(start, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RuntimeError, match="cannot start: .*no bundle here"):
        with start(bundle_dir=empty):
            pass


def test_start_up_refuses_a_corrupt_bundle(start, own_root):
    with open(resolve(own_root) / "arrays.npz", "r+b") as f:
        f.seek(50)
        f.write(b"garbage")
    with pytest.raises(RuntimeError, match="cannot start: .*arrays.npz: checksum mismatch"):
        with start(bundle_dir=own_root):
            pass


def test_start_up_refuses_a_bad_setting(start):
    with pytest.raises(Exception, match="admin_token must be at least 8 characters"):
        with start(token="short"):
            pass
    with pytest.raises(Exception, match="index_ef"):
        with start(index_ef="0"):
            pass
    with pytest.raises(Exception, match="index_insert_ef"):
        with start(index_insert_ef="0"):
            pass


def test_the_readme_documents_every_setting_and_no_other():
    """An operator tunes the service from the README's settings table: a setting missing there is one nobody finds,
    and a row for a setting the service no longer reads is one that silently does nothing."""
    from service.config import Settings
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme.split("### Service settings (environment)", 1)[1].split("\n#", 1)[0]
    documented = {name.lower() for row in table.splitlines() if row.startswith("| `RECSYS_")
                  for name in re.findall(r"`RECSYS_([A-Z0-9_]+)`", row.split("|")[1])}
    assert documented == set(Settings.model_fields)


def test_the_search_beam_is_the_bundles_unless_the_replica_sets_one(start, bundle):
    with start() as client:
        assert client.get("/info").json()["index_ef"] == bundle.manifest["index"]["ef"]
    with start(index_ef="317") as client:
        assert client.get("/info").json()["index_ef"] == 317
        assert client.app.state.service.engine.live.index.ef == 317
        assert client.post("/admin/reload", headers=AUTH).status_code == 200
        assert client.get("/info").json()["index_ef"] == 317  # a reloaded bundle keeps the replica's beam


def test_the_insertion_beam_is_the_bundles_unless_the_replica_sets_one(start, bundle):
    with start() as client:
        assert client.get("/info").json()["index_insert_ef"] == bundle.manifest["index"]["insert_ef_construction"]
    with start(index_insert_ef="40") as client:
        assert client.get("/info").json()["index_insert_ef"] == 40
        added = client.post("/admin/items", headers=AUTH, json={"item_id": "beam-new"})
        assert added.status_code == 200, added.text
        live = client.app.state.service.engine.live
        live.merge()  # into the graph copied with the replica's beam
        assert live.index.get_current_count() == client.get("/ready").json()["items"]
        assert client.get("/similar-items/beam-new", params={"k": 3}).status_code == 200
        assert client.post("/admin/reload", headers=AUTH).status_code == 200
        assert client.get("/info").json()["index_insert_ef"] == 40  # a reloaded bundle keeps the replica's beam
        # (removed again: the items gauge is the process's, and a later test reads it)
        assert client.delete("/admin/items/beam-new", headers=AUTH).status_code == 200


# --------------------------------------------------------------------------- metrics
def test_metrics_present_after_requests(client, bundle):
    client.get("/recommend", params={"user_id": "u1", "k": 3})
    client.post("/recommend", json={"k": 3})
    client.get("/recommend", params={"user_id": "nobody"})
    text = client.get("/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}

    def value(name: str, **labels) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("recsys_requests_total", endpoint="/recommend", method="GET", status="200") >= 1
    assert value("recsys_requests_total", endpoint="/recommend", method="GET", status="404") >= 1
    assert value("recsys_requests_total", endpoint="/recommend", method="POST", status="200") >= 1
    assert value("recsys_request_seconds_count", endpoint="/recommend") >= 3
    for stage in STAGES:
        assert value("recsys_stage_seconds_count", stage=stage) >= 1
    assert value("recsys_fallbacks_total", kind="popularity") >= 1
    assert value("recsys_bundle_info", version=bundle.version) == 1
    assert value("recsys_index_items") == len(bundle.catalog["item_ids"])
    assert value("recsys_index_unindexed_items") == 0  # nothing changed: the graph holds every item
    assert value("recsys_in_flight_requests") >= 1  # the scrape itself is in flight
    assert value("recsys_events_total") >= 0
    # a failure's series exists before the first failure (at 0): an alert on increase() sees that first one
    for name, label, values in (("recsys_reloads_total", "result", ("ok", "failed")),
                                ("recsys_degraded_total", "what", ("history", "catalog_follow"))):
        assert all((name, ((label, v),)) in samples for v in values), name


# --------------------------------------------------------------------------- bad input
BAD_RECOMMEND_GET = [
    ({"k": 5}, 422),  # no user_id
    ({"user_id": "u1", "k": 0}, 422),
    ({"user_id": "u1", "k": 101}, 422),
    ({"user_id": "u1", "k": "ten"}, 422),
    ({"user_id": "u1", "candidates": 0}, 422),
    ({"user_id": "u1", "candidates": 5000}, 422),
    ({"user_id": ""}, 422),
    ({"user_id": "   "}, 422),
    ({"user_id": "nobody"}, 404),
    ({"user_id": "u1", "exclude_seen": "maybe"}, 422),
    ({"user_id": "u1", "year_min": 2000, "year_max": 1990}, 422),
    ({"user_id": "u1", "year_min": "recent"}, 422),
    ({"user_id": "u1", "genres_any": "no-such-genre"}, 422),
]

BAD_RECOMMEND_POST = [
    ({"user_id": ["u1"]}, 422),
    ({"user_id": "u1", "k": "ten"}, 422),
    ({"user_id": "u1", "k": 0}, 422),
    ({"user_id": "u1", "k": 101}, 422),
    ({"user_id": "u1", "k": 2.5}, 422),
    ({"user_id": "u1", "candidates": 5000}, 422),
    ({"user_id": "u1", "surprise": 1}, 422),
    ({"user_id": ""}, 422),
    ({"user_id": "nobody"}, 404),
    ({"recent_items": ["i1", "no-such-item"]}, 404),
    ({"recent_items": "i1"}, 422),
    ({"recent_items": [f"i{i % 150}" for i in range(201)]}, 422),
    ({"features": {"gender": ["F"]}}, 422),
    ({"features": {"shoe_size": 44}}, 422),
    ({"features": {"age": "old"}}, 422),
    ({"features": "F"}, 422),
    ({"user_id": "u1", "filters": {"year_min": 2000, "year_max": 1990}}, 422),
    ({"user_id": "u1", "filters": {"genres_any": ["no-such-genre"]}}, 422),
    ({"user_id": "u1", "filters": {"genres_none": ["no-such-genre"]}}, 422),
    ({"user_id": "u1", "filters": {"colour": "red"}}, 422),
    ({"user_id": "u1", "filters": {"year_min": "recent"}}, 422),
    ({"user_id": "u1", "explain": "yes please"}, 422),
]

BAD_EVENTS = [
    ({"user_id": "u1", "item_id": "no-such-item"}, 404),
    ({"user_id": "u1"}, 422),
    ({"item_id": "i1"}, 422),
    ({"user_id": "", "item_id": "i1"}, 422),
    ({"user_id": "u1", "item_id": ""}, 422),
    ({"user_id": "u1", "item_id": "i1", "rating": 7}, 422),
    ({"user_id": "u1", "item_id": "i1", "rating": "great"}, 422),
    ({"user_id": "u1", "item_id": "i1", "timestamp": -5}, 422),
    ({"user_id": "u1", "item_id": "i1", "extra": True}, 422),
    ({"user_id": {"id": 1}, "item_id": "i1"}, 422),
]

BAD_ITEMS = [
    ({"item_id": "x", "genres": ["no-such-genre"]}, 422),
    ({"item_id": ""}, 422),
    ({"title": "no id"}, 422),
    ({"item_id": "x", "year": "old"}, 422),
    ({"item_id": "x", "colour": "red"}, 422),
    ({"item_id": "x", "genres": "genre1"}, 422),
]


@pytest.mark.parametrize("params,status", BAD_RECOMMEND_GET)
def test_bad_recommend_query_is_a_clear_4xx(client, params, status):
    assert_client_error(client.get("/recommend", params=params), status)


@pytest.mark.parametrize("params,where", [
    ({"user_id": "   "}, "query.user_id"),
    ({"user_id": "u1", "k": "ten"}, "query.k"),
    ({"user_id": "u1", "year_min": 2000, "year_max": 1990}, "query.year_max"),
    ({"user_id": "u1", "genres_any": ["a"] * 1001}, "query.genres_any"),  # (service.schemas.MAX_LIST + 1)
])
def test_a_bad_recommend_query_names_the_parameter(client, params, where):
    """GET's problems are named as the query names them, also those found by the POST body's own checks (a blank
    id, a year range the wrong way round), never as a body or its ``filters`` field."""
    response = client.get("/recommend", params=params)
    assert response.status_code == 422, response.text
    assert [d["loc"] for d in response.json()["details"]] == [where.split(".")]
    assert response.json()["error"].startswith(f"invalid request: {where}: ")


@pytest.mark.parametrize("body,status", BAD_RECOMMEND_POST)
def test_bad_recommend_body_is_a_clear_4xx(client, body, status):
    assert_client_error(client.post("/recommend", json=body), status)


@pytest.mark.parametrize("body,status", BAD_EVENTS)
def test_bad_event_is_a_clear_4xx_and_not_logged(backend_client, body, status):
    client = backend_client
    size = recorded(client)
    assert_client_error(client.post("/events", json=body), status)
    assert recorded(client) == size


@pytest.mark.parametrize("body,status", BAD_ITEMS)
def test_bad_item_is_a_clear_4xx(backend_client, body, status):
    client = backend_client
    items = client.get("/ready").json()["items"]
    assert_client_error(client.post("/admin/items", json=body, headers=AUTH), status)
    assert_client_error(client.delete("/admin/items/no-such-item", headers=AUTH), 404)
    assert client.get("/ready").json()["items"] == items


@pytest.mark.parametrize("path", ["/recommend", "/events", "/admin/items", "/admin/reload"])
def test_malformed_json_is_a_clear_4xx(backend_client, path):
    client = backend_client
    for payload in (b"{not json", b"[1, 2]", b'"text"', b"{\"k\": 1,}") + ((b"null",) if path != "/admin/reload" else ()):
        response = client.post(path, content=payload, headers={"content-type": "application/json", **AUTH})
        assert_client_error(response)


def test_oversized_body_is_413(client):
    big = {"user_id": "u1", "recent_items": ["i1"] * 40_000}
    assert_client_error(client.post("/recommend", json=big), 413)

    def chunks():  # no content-length: the limit must hold for a streamed body too
        yield b'{"user_id": "u1", "recent_items": ['
        for _ in range(20_000):
            yield b'"i1", '
        yield b'"i1"]}'
    assert_client_error(client.post("/recommend", content=chunks(), headers={"content-type": "application/json"}), 413)
    assert client.get("/health").status_code == 200


def test_unknown_route_and_method_are_4xx(client):
    assert_client_error(client.get("/nope"), 404)
    assert_client_error(client.delete("/recommend"), 405)


# --------------------------------------------------------------------------- no train/serve skew
def test_service_scores_equal_offline_scores(client, bundle, eager, tiny_dataset):
    """The offline path (dataset -> TowerTables -> eager towers) scores the user exactly as the service does."""
    tables = TowerTables.build(tiny_dataset, bundle.manifest["feature_spec"]["history_len"], torch.device("cpu"))
    split = temporal_split(tiny_dataset.interactions, tiny_dataset.n_users, tiny_dataset.n_items)
    item_vectors = tables.item_vectors(eager)
    assert np.allclose(item_vectors, bundle.arrays["item_vectors"], atol=1e-5)
    serve_history = split.history_before("serve")
    for raw in ("u0", "u17", "u99"):
        row = tiny_dataset.user_ids.index(raw)
        user_vec = tables.user_vectors(eager, np.array([row]), [serve_history[row]])[0]
        offline = user_vec @ item_vectors.T
        body = client.post("/recommend", json={"user_id": raw, "k": 20}).json()
        assert len(body["items"]) == 20
        for it in body["items"]:
            assert it["recall_score"] == pytest.approx(float(offline[tiny_dataset.item_ids.index(it["item_id"])]), abs=1e-4)
        # and the two-tower's candidates are the offline exact top-k; the item-item channel adds only items outside it
        served = client.post("/recommend", json={"user_id": raw, "k": 20, "candidates": 20, "explain": True}).json()["items"]
        offline[serve_history[row]] = -np.inf
        exact = {tiny_dataset.item_ids[i] for i in np.argsort(-offline)[:20]}
        assert all(it["features"]["from_item_item"] == (it["source"] == "item-item") for it in served)
        tower = {it["item_id"] for it in served if it["source"] == "two-tower"}
        assert len(tower & exact) >= len(tower) - 1
        assert not {it["item_id"] for it in served if it["source"] == "item-item"} & exact


def test_service_ranks_the_merged_candidates_exactly_as_the_offline_evaluation(client, bundle, eager, tiny_dataset):
    """Two-tower candidates + the item-item channel's, features and ranker: the served top-k is the list
    the offline evaluation scores for the same user and bundle (offline/train_ranker.py's RerankRecommender),
    item for item and in order."""
    from recsys.rank_features import RankerTables
    from recsys.scorer import load_ranker
    from offline.train_ranker import RankContext, RerankRecommender
    from offline.recall_eval import TwoTowerRecommender

    index_params = bundle.manifest["params"]["index"]
    assert index_params["item_item_candidates"] > 0
    tables = TowerTables.build(tiny_dataset, bundle.manifest["feature_spec"]["history_len"], torch.device("cpu"))
    ctx = RankContext(TwoTowerRecommender(eager, tables), RankerTables.from_arrays(bundle.arrays), bundle.arrays,
                      index_params["candidates"], index_params["item_item_candidates"])
    offline = RerankRecommender(ctx, load_ranker(bundle.ranker), "offline")
    serve_history = temporal_split(tiny_dataset.interactions, tiny_dataset.n_users, tiny_dataset.n_items).history_before("serve")
    merged_some = False
    for raw in ("u0", "u17", "u99", "u42"):
        row = tiny_dataset.user_ids.index(raw)
        expected = [tiny_dataset.item_ids[i] for i in offline.recommend(np.array([row]), [serve_history[row]], 20)[0]]
        body = client.post("/recommend", json={"user_id": raw, "k": 20, "explain": True}).json()
        assert [it["item_id"] for it in body["items"]] == expected
        merged_some |= any(it["source"] == "item-item" for it in body["items"])
    assert merged_some  # the channel's items reached some top-20: the test covers the merge, not only the tower


# --------------------------------------------------------------------------- concurrency
def test_concurrent_writes_under_query_load_end_in_the_acknowledged_state(backend_start, bundle):
    """Readers hammer /recommend and /similar-items while writers add, replace, remove items and post
    events (and an admin reloads): no 5xx, no exception, and afterwards (and after a restart) the
    catalogue and the histories are exactly what was acknowledged."""
    n_items = len(bundle.catalog["item_ids"])
    users = ["u20", "u21", "u22", "new-user"]
    base = {u: (len(history(bundle, user_row(bundle, u))[0]) if u in bundle.catalog["user_ids"] else 0) for u in users}
    errors: list[str] = []
    removed_at: dict[str, float] = {}  # item -> when its removal was acknowledged
    readd: set[str] = set()
    added: dict[str, int] = {}  # item -> year
    events: dict[str, list[str]] = {u: [] for u in users}
    returned: list[tuple[float, set[str]]] = []  # (request start, items in the response)
    stop = threading.Event()

    with backend_start() as client:
        def call(method: str, url: str, **kw):
            try:
                response = client.request(method, url, **kw)
            except Exception as err:  # noqa: BLE001 - any exception is a failure to report
                errors.append(f"{method} {url}: {type(err).__name__}: {err}")
                return None
            if response.status_code >= 500 or response.status_code not in (200, 404):
                errors.append(f"{method} {url}: {response.status_code} {response.text[:200]}")
            return response

        def reader(seed: int):
            rng = random.Random(seed)
            while not stop.is_set():
                t0 = time.monotonic()
                if rng.random() < 0.5:
                    r = call("POST", "/recommend", json={"user_id": rng.choice(users[:3]), "k": 20, "exclude_seen": False,
                                                         "filters": rng.choice([None, {"year_min": 1990}])})
                else:
                    r = call("GET", f"/similar-items/i{rng.randrange(n_items)}", params={"k": 20})
                if r is not None and r.status_code == 200:
                    returned.append((t0, set(ids(r))))

        def catalogue_writer():
            rng = random.Random(1)
            for n in range(40):
                op = n % 4
                if op in (0, 1):
                    item, year = f"c{n}", 3000 + n
                    r = call("POST", "/admin/items", json={"item_id": item, "year": year, "genres": ["genre1"]}, headers=AUTH)
                    if r is not None and r.status_code == 200:
                        added[item] = year
                elif op == 2:
                    item = rng.choice(sorted(added))
                    r = call("PUT", "/admin/items", json={"item_id": item, "year": added[item], "title": "again"}, headers=AUTH)
                else:
                    item = f"i{rng.randrange(n_items)}" if n % 8 == 3 else rng.choice(sorted(added))
                    if item in removed_at:
                        continue
                    r = call("DELETE", f"/admin/items/{item}", headers=AUTH)
                    if r is not None and r.status_code == 200:
                        removed_at[item] = time.monotonic()
                        added.pop(item, None)
            # bring one removed bundle item back
            back = next(i for i in removed_at if i.startswith("i"))
            if call("POST", "/admin/items", json={"item_id": back}, headers=AUTH).status_code == 200:
                readd.add(back)

        def event_writer(user: str, seed: int):
            rng = random.Random(seed)
            for _ in range(15):
                item = f"i{rng.randrange(n_items)}"
                r = call("POST", "/events", json={"user_id": user, "item_id": item, "rating": rng.choice([1, 3, 5])})
                if r is not None and r.status_code == 200:
                    events[user].append(item)
                    if r.json()["history_length"] != base[user] + len(events[user]):
                        errors.append(f"history_length {r.json()} after {len(events[user])} events")

        def reloader():
            for _ in range(2):
                r = call("POST", "/admin/reload", headers=AUTH)
                if r is None or r.status_code != 200:
                    errors.append(f"reload failed: {r and r.text}")

        readers = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
        writers = [threading.Thread(target=catalogue_writer), threading.Thread(target=reloader)]
        writers += [threading.Thread(target=event_writer, args=(u, s)) for s, u in enumerate(users)]
        for t in readers + writers:
            t.start()
        for t in writers:
            t.join(timeout=120)
        stop.set()
        for t in readers:
            t.join(timeout=30)
        assert not errors, errors[:5]
        assert len(returned) > 20 and removed_at

        # nothing removed was returned by a request that began after the removal was acknowledged
        gone = {i: at for i, at in removed_at.items() if i not in readd}
        late = [(i, t0) for t0, got in returned for i in got & set(gone) if t0 > gone[i]]
        assert not late, late[:5]

        kept = next(f"i{j}" for j in range(n_items) if f"i{j}" not in removed_at)

        def check(client):
            ready = client.get("/ready").json()
            assert ready["items"] == n_items + len(added) + len(readd) - sum(i.startswith("i") for i in removed_at)
            for item, year in added.items():  # every acknowledged item is there and searchable
                response = client.post("/recommend", json={"k": 5, "filters": {"year_min": year, "year_max": year}})
                assert ids(response) == [item]
                assert client.get(f"/similar-items/{item}").status_code == 200
            engine = client.app.state.service.engine
            for item in added:  # in the HNSW graph itself (the added items differ only by year: near ties)
                row = engine.catalog.row_of[item]
                labels, _ = engine.live.index.knn_query(engine.catalog.vectors[row][None], k=10)
                assert row in engine.live.label_row[labels[0]]
            for item in gone:
                assert_client_error(client.get(f"/similar-items/{item}"), 404)
            for user in users[:3]:
                listed = ids(client.post("/recommend", json={"user_id": user, "k": 100, "exclude_seen": False}))
                assert not set(listed) & set(gone)
            for user, seen in events.items():
                got = client.post("/recommend", json={"user_id": user, "k": 100}).json()["items"]
                assert not {it["item_id"] for it in got} & set(seen)
                length = client.post("/events", json={"user_id": user, "item_id": kept}).json()["history_length"]
                seen.append(kept)
                assert length == base[user] + len(seen)

        check(client)
    with backend_start() as client:  # what was acknowledged is what comes back
        check(client)


def test_cached_user_features_answer_exactly_what_a_fresh_computation_does(backend_start, bundle):
    """The user's part of the ranker features is cached per history version and catalogue snapshot."""
    def ranked(client):
        items = client.post("/recommend", json={"user_id": "u3", "k": 10, "explain": True}).json()["items"]
        return [(it["item_id"], it["ranking_score"], it["features"]) for it in items]

    def fresh(client):
        engine = client.app.state.service.engine
        engine.users.feature_cache.clear()
        engine.users.vector_cache.clear()
        return ranked(client)

    with backend_start() as client:
        first = ranked(client)
        assert ranked(client) == first == fresh(client)  # the second answer came from the cache
        newest = bundle.catalog["item_ids"][int(history(bundle, user_row(bundle, "u3"))[0][-1])]
        genres = [g for g in bundle.catalog["genre_names"]][:1]
        assert client.put("/admin/items", json={"item_id": newest, "genres": genres}, headers=AUTH).status_code == 200
        after = ranked(client)  # an item of the user's history rewritten: the cached entry is not reused
        assert after == fresh(client)
        assert client.post("/events", json={"user_id": "u3", "item_id": "i9"}).status_code == 200
        assert ranked(client) == fresh(client)  # a new history version likewise


def test_replicas_follow_current_by_themselves_and_keep_serving_through_a_bad_version(start, own_root):
    """The bundle watcher: a promoted version is loaded within the poll interval; one that fails to load
    is counted, logged and not retried, and the good bundle keeps serving."""
    def metric(client, name: str, **labels: str) -> float:
        for family in text_string_to_metric_families(client.get("/metrics").text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0

    def reloads(client, result: str) -> float:
        return metric(client, "recsys_reloads_total", result=result)

    def wait_for_version(client, version: str) -> None:
        deadline = time.monotonic() + 10
        while client.get("/ready").json()["bundle_version"] != version:
            assert time.monotonic() < deadline, f"{version} was not picked up"
            time.sleep(0.05)

    second_version(own_root, "v2")
    broken = second_version(own_root, "v3-broken")
    (broken / "item_index.bin").write_bytes(b"truncated")
    with start(bundle_dir=own_root, bundle_poll_s="0.1") as client:
        ok_before, failed_before = reloads(client, "ok"), reloads(client, "failed")  # counters are process-wide
        set_current(own_root, "v2")
        wait_for_version(client, "v2")
        assert reloads(client, "ok") == ok_before + 1
        set_current(own_root, "v3-broken")
        deadline = time.monotonic() + 10
        while reloads(client, "failed") < failed_before + 1:
            assert time.monotonic() < deadline, "the failed load was not counted"
            time.sleep(0.05)
        time.sleep(0.5)  # several polls later: not retried, still serving v2
        assert reloads(client, "failed") == failed_before + 1
        assert client.get("/ready").json()["bundle_version"] == "v2"
        assert metric(client, "recsys_bundle_behind_current") == 1  # what RecsysServingOlderBundle alerts on
        assert client.get("/recommend", params={"user_id": "u1"}).status_code == 200
        set_current(own_root, "v2")  # moving current again (back to a good version) is followed
        second_version(own_root, "v4")
        set_current(own_root, "v4")
        wait_for_version(client, "v4")
        time.sleep(0.3)  # the poll after the load
        assert metric(client, "recsys_bundle_behind_current") == 0
        (own_root / "current").write_text("v5-typo\n")  # current naming no version: behind, said, not a crash
        deadline = time.monotonic() + 10
        while metric(client, "recsys_bundle_behind_current") != 1:
            assert time.monotonic() < deadline, "a current naming nothing was not counted behind"
            time.sleep(0.05)
        import recsys.bundle
        real_map, fails = recsys.bundle.map_arrays, [OSError(24, "Too many open files")]

        def out_of_files_once(path):  # the machine, not the bundle: the next poll loads it
            if fails:
                raise fails.pop()
            return real_map(path)

        set_current(own_root, "v4")
        second_version(own_root, "v6")
        recsys.bundle.map_arrays = out_of_files_once
        try:
            set_current(own_root, "v6")
            wait_for_version(client, "v6")
        finally:
            recsys.bundle.map_arrays = real_map
        assert not fails


def test_unfiltered_search_skips_seen_and_removed_items_without_a_catalogue_mask(backend_start, bundle, eager):
    """No filter: the engine skips only the user's seen rows and removed items while searching (no
    per-request mask over the catalogue), and still returns the brute-force top-k of what is left."""
    vectors = bundle.arrays["item_vectors"]
    with backend_start() as client:
        engine = client.app.state.service.engine
        for user in ("u4", "u11", "u23"):
            row = user_row(bundle, user)
            items, ratings = history(bundle, row)
            vec = eager_user_vector(bundle, eager, row, items, ratings)
            left = np.array(sorted(set(range(len(vectors))) - set(items.tolist())))
            top = left[np.argsort(-(vectors[left] @ vec))]
            removed = bundle.catalog["item_ids"][int(top[0])]  # the best unseen item goes away
            assert client.delete(f"/admin/items/{removed}", headers=AUTH).status_code == 200
            allowed = engine.allowed(engine.catalog, None, items)
            assert allowed.rows is None and allowed.rule is None  # the unfiltered path: nothing listed or checked
            response = client.post("/recommend", json={"user_id": user, "k": 10, "candidates": 10})
            got = set(ids(response))
            assert removed not in got and not got & item_ids_of(bundle, items)
            tower, merged = by_source(response)
            assert len(tower - item_ids_of(bundle, top[1:11])) <= 1  # HNSW is approximate; nearly exact here
            assert not merged & item_ids_of(bundle, top[1:11])


@pytest.mark.parametrize("setting, kept", [(None, False), ("true", True), ("false", False)])
def test_uvicorn_writes_access_lines_only_when_asked(monkeypatch, bundle_root, tmp_path, setting, kept):
    """RECSYS_ACCESS_LOG: uvicorn formats an access line per request only while its access logger has handlers (a
    line per request costs CPU that the metrics already spend counting). Decided in the worker's start-up, so it
    holds however uvicorn is run; the supervisor of ``--workers`` imports nothing of the app."""
    import logging

    from tests.servicekit import serve

    access = logging.getLogger("uvicorn.access")
    access.addHandler(logging.NullHandler())  # as uvicorn's logging config installs one
    env = {} if setting is None else {"access_log": setting}
    try:
        with serve(monkeypatch, bundle_root, tmp_path / "state", **env) as client:
            assert client.get("/health").status_code == 200
            assert access.hasHandlers() is kept
    finally:
        access.handlers, access.propagate = [], True


def test_get_recommend_reads_its_query_as_fastapi_would_and_documents_it_the_same(client):
    """GET /recommend parses its own query (one validation pass); what it accepts, refuses and documents must be
    what FastAPI's ``Annotated[RecommendQuery, Query()]`` would."""
    from typing import Annotated

    from fastapi import FastAPI, Query
    from fastapi.testclient import TestClient

    from service.api.openapi import query_parameters
    from service.schemas import MAX_LIST, RecommendQuery

    def q(query):
        return query.model_dump()

    q.__annotations__["query"] = Annotated[RecommendQuery, Query()]  # (this module's annotations are strings)
    reference = FastAPI()
    reference.get("/q")(q)

    assert query_parameters(RecommendQuery) == reference.openapi()["paths"]["/q"]["get"]["parameters"]
    with TestClient(reference) as ref:
        for params in ([("user_id", "u1"), ("k", "3"), ("k", "4"), ("genres_any", "genre1"), ("genres_any", "genre2"),
                        ("unknown", "x"), ("exclude_seen", "no")], [("user_id", "u2")]):
            parsed = ref.get("/q", params=params).json()
            answer = client.get("/recommend", params=params)
            assert answer.status_code == 200, answer.text
            assert len(answer.json()["items"]) == parsed["k"]
        for params, field in (([("k", "3")], "query.user_id"), ([("user_id", "u1"), ("k", "zero")], "query.k"),
                              ([("user_id", "u1"), ("year_min", "-5")], "query.year_min"),
                              ([("user_id", "")], "query.user_id"),
                              ([("user_id", "u1")] + [("genres_none", f"g{i}") for i in range(MAX_LIST + 1)], "query.genres_none")):
            assert ref.get("/q", params=params).status_code == 422
            answer = client.get("/recommend", params=params)
            assert_client_error(answer, 422)
            assert answer.json()["error"].startswith(f"invalid request: {field}: "), answer.json()
    assert client.get("/recommend", params={"user_id": "u1", "year_min": 2000, "year_max": 1990}).status_code == 422
    longest = [("genres_any", "genre1")] * MAX_LIST  # the POST body's limit, not a tighter one
    assert client.get("/recommend", params=[("user_id", "u1"), *longest]).status_code == 200
    assert client.post("/recommend", json={"user_id": "u1", "filters": {"genres_any": ["genre1"] * MAX_LIST}}).status_code == 200
