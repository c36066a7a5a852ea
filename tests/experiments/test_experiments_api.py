"""Experiments, impressions and feedback through the HTTP API, on both state backends: what a client
sends and reads, what the store logged, what Prometheus shows."""
from __future__ import annotations

import json
import re
import shutil
import time

import pytest

from recsys.bundle import resolve
from recsys.experiments.definition import Experiment
from tests.servicekit import AUTH, assert_client_error, backend_start, own_root, redis_url  # noqa: F401

SPLIT = {"variants": [{"name": "control", "share": 0.5}, {"name": "no-ranker", "share": 0.5, "ranker": False}]}
USERS = [f"u{i}" for i in range(40)]


def put(client, name: str, body: dict):
    return client.put(f"/admin/experiments/{name}", json=body, headers=AUTH)


def sample(client, name: str, **labels: str) -> float:
    """A series' value in ``/metrics`` (0 when absent); the registry is the test process's, shared by tests."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return 0.0


def logged(client) -> list[dict]:
    live = client.app.state.service
    assert live.impressions.flush()
    return live.store.impressions_since(0)


def test_every_answer_carries_a_request_id_and_its_assignments_and_is_logged(backend_start):
    with backend_start() as client:
        plain = client.get("/recommend", params={"user_id": "u1", "k": 5}).json()
        assert re.fullmatch(r"[0-9a-f]{32}", plain["request_id"]) and plain["assignments"] == {}
        assert put(client, "rank", SPLIT).status_code == 201
        answers = {u: client.get("/recommend", params={"user_id": u, "k": 5}).json() for u in USERS}
        batch = client.post("/recommend/batch", json={"user_ids": USERS[:3] + ["nobody"], "k": 5}).json()["results"]
        records = {r["request_id"]: r for r in logged(client)}
        exp = Experiment.from_record(client.app.state.service.store.experiments()["rank"])
    assert len({a["request_id"] for a in answers.values()}) == len(USERS)
    for user, a in answers.items():
        variant = exp.assign(user).name
        assert a["assignments"] == {"rank": variant}
        assert all((item["ranking_score"] is None) == (variant == "no-ranker") for item in a["items"])
        record = records[a["request_id"]]
        assert record["user_id"] == user and record["assignments"] == {"rank": variant}
        assert record["items"] == [item["item_id"] for item in a["items"]] and len(record["scores"]) == 5
        assert record["bundle_version"] == a["bundle_version"] and record["ts_ms"] > 0
    for result in batch[:3]:  # each user in a batch: an answer of their own, logged
        assert result["assignments"] == {"rank": exp.assign(result["user_id"]).name}
        assert records[result["request_id"]]["user_id"] == result["user_id"]
    assert batch[3]["status"] == 404 and batch[3]["request_id"] is None
    assert records[plain["request_id"]]["assignments"] == {}


def test_feedback_joins_its_impression_and_counts_in_the_report(backend_start):
    with backend_start() as client:
        assert put(client, "rank", SPLIT).status_code == 201
        shown = client.get("/recommend", params={"user_id": "u3", "k": 5}).json()
        rid, items = shown["request_id"], [x["item_id"] for x in shown["items"]]
        variant = shown["assignments"]["rank"]
        at3 = dict(experiment="rank", variant=variant, position="3")
        purchases = dict(experiment="rank", variant=variant, type="purchase")
        before = sample(client, "recsys_experiment_clicks_total", **at3), sample(client, "recsys_experiment_feedback_total", **purchases)
        logged(client)
        click = client.post("/events", json={"user_id": "u3", "item_id": items[2], "type": "click", "request_id": rid}).json()
        assert click["joined"] is True and click["position"] == 3
        again = {"user_id": "u3", "item_id": items[0], "type": "purchase", "request_id": rid, "position": 1}
        assert client.post("/events", json=again).json()["joined"] is True
        wrong = client.post("/events", json={**again, "position": 2})
        assert_client_error(wrong, 422)
        assert "at position 1, not 2" in wrong.json()["error"]
        other = client.post("/events", json={"user_id": "u4", "item_id": items[0], "type": "click", "request_id": rid}).json()
        assert other["joined"] is False and "another user" in other["reason"]
        stray = client.post("/events", json={"user_id": "u3", "item_id": items[0], "type": "click", "request_id": "f" * 32}).json()
        assert stray["joined"] is False and "no such impression" in stray["reason"]
        late = client.post("/events", json={"user_id": "u3", "item_id": items[1], "type": "click", "request_id": rid,
                                            "timestamp": int(time.time()) + 3600}).json()
        assert late["joined"] is False and "1800 s" in late["reason"]
        plain = client.post("/events", json={"user_id": "u3", "item_id": items[4]})  # as before: no type, no request
        assert plain.status_code == 200 and "joined" not in plain.json()
        assert_client_error(client.post("/events", json={"user_id": "u3", "item_id": items[0], "type": "teleport"}), 422)
        assert_client_error(client.post("/events", json={"user_id": "u3", "item_id": items[0], "position": 1}), 422)
        report = client.get("/experiments/rank").json()
        after = sample(client, "recsys_experiment_clicks_total", **at3), sample(client, "recsys_experiment_feedback_total", **purchases)
    assert after[0] - before[0] == 1 and after[1] - before[1] == 1
    arm = next(v for v in report["variants"] if v["name"] == shown["assignments"]["rank"])
    assert arm["impressions"] == 1 and arm["clicks"] == 2  # the click at 3 and the purchase at 1
    assert arm["ctr_at"][:3] == [1.0, 0.0, 1.0] and arm["mrr"]["value"] == 1.0
    assert arm["feedback_per_impression"] == {"click": 1.0, "purchase": 1.0}


def test_the_report_of_a_split(backend_start):
    with backend_start() as client:
        put(client, "rank", SPLIT)
        for u in USERS:
            a = client.get("/recommend", params={"user_id": u, "k": 5}).json()
            if a["assignments"]["rank"] == "control":  # the control's users click their first item
                logged(client)
                client.post("/events", json={"user_id": u, "item_id": a["items"][0]["item_id"], "type": "click",
                                             "request_id": a["request_id"]})
        report = client.get("/experiments/rank").json()
    control, treatment = report["variants"]
    assert control["users"] + treatment["users"] == len(USERS) == control["impressions"] + treatment["impressions"]
    assert control["ctr"]["value"] == 1.0 and treatment["ctr"]["value"] == 0.0
    assert treatment["vs_control"]["difference"] == -1.0 and "p_value" in treatment["vs_control"]
    assert report["sample_ratio"]["users"] == [control["users"], treatment["users"]]
    assert "always valid" in report["test"]


def test_bad_definitions_get_a_clear_4xx(backend_start, own_root):
    with backend_start(bundle_dir=own_root) as client:
        cases = [
            ({"variants": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.4}]}, 422, "sum to 1"),
            ({"variants": [{"name": "a", "share": 1.0, "colour": "red"}]}, 422, "colour"),
            ({"variants": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5, "bundle": "nope"}]}, 422, "unknown bundle"),
            ({"variants": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5, "candidates": 5000}]}, 422, "candidates"),
            ({"variants": [{"name": "a"}, {"name": "b"}, {"name": "c"}], "mode": "interleave"}, 422, "exactly two"),
        ]
        for body, status, words in cases:
            response = put(client, "exp", body)
            assert_client_error(response, status)
            assert words in response.json()["error"]
        assert put(client, "first", SPLIT).status_code == 201
        clash = put(client, "second", SPLIT)
        assert_client_error(clash, 409)
        assert "already sets ['ranker']" in clash.json()["error"]
        assert_client_error(put(client, "Bad Name", SPLIT), 422)
        assert_client_error(client.put("/admin/experiments/x", json=SPLIT), 401)
        assert client.get("/experiments").json()["experiments"][0]["name"] == "first"
        assert_client_error(client.get("/experiments/second"), 404)
        assert_client_error(client.delete("/admin/experiments/second", headers=AUTH), 404)


def test_a_stored_experiment_whose_bundle_is_gone_does_not_stop_a_replica(backend_start, own_root):
    """An experiment's bundle deleted (or of a format a new release refuses) must not stop every replica from
    starting: the experiment is skipped, said in the log, and the rest serves. A definition refused for one of
    its bundles leaves none of its others loaded."""
    for version in ("other-version", "kept-version"):
        shutil.copytree(resolve(own_root), own_root / version)
    body = {"variants": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5, "bundle": "other-version"}]}
    with backend_start(bundle_dir=own_root) as client:
        refused = {"variants": [{"name": "a", "share": 0.5, "bundle": "kept-version"}, {"name": "b", "share": 0.5, "bundle": "nope"}]}
        assert_client_error(put(client, "half", refused), 422)
        assert client.app.state.service.variant_engines == {}  # kept-version loaded, then dropped with the refusal
        assert put(client, "bundles", body).status_code == 201
        assert set(client.app.state.service.variant_engines) == {"other-version"}
    shutil.rmtree(own_root / "other-version")
    with backend_start(bundle_dir=own_root) as client:
        assert client.get("/recommend", params={"user_id": USERS[0], "k": 5}).json()["assignments"] == {}
        assert client.app.state.service.variant_engines == {} and client.get("/experiments").json()["experiments"] == []
        assert put(client, "bundles", {**body, "variants": [{"name": "a", "share": 1.0}]}).status_code in (200, 201)


def test_a_variant_served_by_another_bundle_and_a_shadow_that_is_only_logged(backend_start, own_root):
    other = own_root / "other-version"
    shutil.copytree(resolve(own_root), other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "version": "other-version"}))
    body = {"variants": [{"name": "control", "share": 0.5}, {"name": "other", "share": 0.5, "bundle": "other-version"},
                         {"name": "pop", "ranker": False, "candidates": 20, "shadow": True}]}
    with backend_start(bundle_dir=own_root) as client:
        assert put(client, "bundles", body).status_code == 201
        assert "other-version" in client.app.state.service.variant_engines
        answers = [client.get("/recommend", params={"user_id": u, "k": 5}).json() for u in USERS[:12]]
        records = logged(client)
        report = client.get("/experiments/bundles").json()
    for a in answers:
        assert (a["bundle_version"] == "other-version") == (a["assignments"]["bundles"] == "other")
    shadows = [r for r in records if r.get("shadow")]
    assert len(shadows) == 12 and all(r["shadow"] == "bundles/pop" for r in shadows)
    served = {r["request_id"] for r in records if not r.get("shadow")}
    assert {r["of"] for r in shadows} == served == {a["request_id"] for a in answers}
    assert report["shadows"][0]["computed"] == 12 and 0 <= report["shadows"][0]["overlap_with_served"] <= 1


def test_an_interleaving_merges_both_lists_and_credits_clicks_to_teams(backend_start):
    body = {"mode": "interleave", "variants": [{"name": "ranked"}, {"name": "recall", "ranker": False}]}
    with backend_start() as client:
        assert put(client, "inter", body).status_code == 201
        for u in USERS[:10]:
            a = client.get("/recommend", params={"user_id": u, "k": 6}).json()
            assert a["assignments"] == {"inter": "ranked+recall"} and len(a["items"]) == 6
            logged(client)
            client.post("/events", json={"user_id": u, "item_id": a["items"][0]["item_id"], "type": "click",
                                         "request_id": a["request_id"]})
        records = logged(client)
        report = client.get("/experiments/inter").json()
    assert all(sorted(set(r["teams"])) in (["A", "B"], ["A"], ["B"]) for r in records)
    first = sum(r["teams"][0] == "B" for r in records)
    assert report["interleave"]["wins_b"] == first and report["interleave"]["wins_a"] == 10 - first
    assert report["interleave"]["impressions"] == 10


def test_exploration_logs_each_shown_items_propensity(backend_start):
    body = {"variants": [{"name": "explore", "share": 1.0, "explore": 1.0}]}
    with backend_start() as client:
        put(client, "explore", body)
        for u in USERS[:10]:
            client.get("/recommend", params={"user_id": u, "k": 5})
        records = logged(client)
    for r in records:
        assert sorted(r["ranks"]) == [1, 2, 3, 4, 5] and sum(a != b for a, b in zip(r["ranks"], range(1, 6))) == 2
        for position, (rank, propensity) in enumerate(zip(r["ranks"], r["propensities"]), 1):
            # explore=1: one of the 4 adjacent pairs is always swapped, each with probability 1/4
            stays = 0.75 if rank in (1, 5) else 0.5  # an end item is in one pair, the others in two
            assert propensity == pytest.approx(0.25 if rank != position else stays)


def test_prometheus_labels_stay_bounded_by_the_running_experiments(backend_start):
    with backend_start(max_experiments="2") as client:
        put(client, "one", SPLIT)
        put(client, "two", {"variants": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5, "candidates": 20}]})
        assert_client_error(put(client, "three", {"variants": [{"name": "a", "share": 1.0}]}), 409)
        client.get("/recommend", params={"user_id": "u1"})
        assert 'experiment="one"' in client.get("/metrics").text
        assert client.delete("/admin/experiments/one", headers=AUTH).status_code == 200
        metrics = client.get("/metrics").text
        assert 'experiment="one"' not in metrics and 'experiment="two"' in metrics
        assert client.get("/recommend", params={"user_id": "u1"}).json()["assignments"].keys() == {"two"}


def test_impressions_can_be_switched_off(backend_start):
    with backend_start(impressions="false") as client:
        answer = client.get("/recommend", params={"user_id": "u1"}).json()
        assert answer["request_id"] and client.app.state.service.impressions is None
        assert client.app.state.service.store.impressions_since(0) == []


def test_a_user_asked_for_twice_in_a_batch_gets_two_impressions(backend_start):
    with backend_start() as client:
        results = client.post("/recommend/batch", json={"user_ids": ["u5", "u5"], "k": 3}).json()["results"]
        records = {r["request_id"]: r for r in logged(client)}
    assert results[0]["request_id"] != results[1]["request_id"]
    assert {r["request_id"] for r in results} <= set(records)
    assert results[0]["items"] == results[1]["items"]


def test_a_popularity_variant_serves_the_most_popular_items(backend_start):
    body = {"variants": [{"name": "model", "share": 0.5}, {"name": "popular", "share": 0.5, "popularity": True}]}
    with backend_start() as client:
        assert put(client, "baseline", body).status_code == 201
        answers = [client.get("/recommend", params={"user_id": u, "k": 5}).json() for u in USERS[:16]]
    for a in answers:
        popular = a["assignments"]["baseline"] == "popular"
        assert (a["fallback"] == "popularity") == popular
        assert all((item["popularity"] is not None) == popular for item in a["items"])


def test_an_interleaving_whose_b_bundle_does_not_know_the_user_serves_a_judged_by_nobody(backend_start, own_root):
    other = own_root / "fewer-users"
    shutil.copytree(resolve(own_root), other)
    with backend_start(bundle_dir=own_root) as client:
        body = {"mode": "interleave", "variants": [{"name": "a"}, {"name": "b", "bundle": "fewer-users"}]}
        assert put(client, "inter", body).status_code == 201
        live = client.app.state.service
        b_engine = live.variant_engines["fewer-users"][0]
        del b_engine.users.user_row["u2"]  # as if B's bundle were trained without this user
        answer = client.get("/recommend", params={"user_id": "u2", "k": 4})
        assert answer.status_code == 200
        record = next(r for r in logged(client) if r["request_id"] == answer.json()["request_id"])
        client.post("/events", json={"user_id": "u2", "item_id": answer.json()["items"][0]["item_id"], "type": "click",
                                     "request_id": answer.json()["request_id"]})
        report = client.get("/experiments/inter").json()["interleave"]
    # A's list, and no position credited to either side: were it A's, every click would be a win for A
    assert len(answer.json()["items"]) == 4 and record["teams"] == ["-"] * 4
    assert report["impressions"] == report["wins_a"] == report["wins_b"] == 0
