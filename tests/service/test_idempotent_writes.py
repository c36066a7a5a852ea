"""Idempotent writes through the HTTP API, on every state backend: a write retried with its key (the
``Idempotency-Key`` header, or an event's ``event_id``) is recorded once and answered as the first time, also
when the first attempt committed but its caller saw a failure; a key reused for another write is refused."""
from __future__ import annotations

import time

from recsys.state.protocol import StoreUnavailable
from tests.experiments.test_experiments_api import SPLIT, logged, put, sample
from tests.servicekit import AUTH, assert_client_error, backend_start, recorded, redis_cluster_url, redis_url  # noqa: F401

REPLAYED = "Idempotent-Replayed"


def test_a_retried_click_is_recorded_and_counted_once(backend_start):
    with backend_start() as client:
        assert put(client, "rank", SPLIT).status_code == 201
        shown = client.get("/recommend", params={"user_id": "u3", "k": 5}).json()
        logged(client)
        at2 = dict(experiment="rank", variant=shown["assignments"]["rank"], position="2")
        clicks = sample(client, "recsys_experiment_clicks_total", **at2)
        events = sample(client, "recsys_events_total")
        click = {"user_id": "u3", "item_id": shown["items"][1]["item_id"], "type": "click", "request_id": shown["request_id"]}
        first = client.post("/events", json=click, headers={"Idempotency-Key": "click-1"})
        before = recorded(client)
        retry = client.post("/events", json=click, headers={"Idempotency-Key": "click-1"})
        by_field = client.post("/events", json={**click, "event_id": "click-1"})  # the same key, as a body field
        assert recorded(client) == before
        assert sample(client, "recsys_experiment_clicks_total", **at2) - clicks == 1
        assert sample(client, "recsys_events_total") - events == 1
        report = client.get("/experiments/rank").json()
    assert first.status_code == 200 and REPLAYED not in first.headers
    assert first.json()["joined"] is True and first.json()["position"] == 2
    for again in (retry, by_field):
        assert again.status_code == 200 and again.headers[REPLAYED] == "true"
        assert again.json() == first.json()
    arm = next(v for v in report["variants"] if v["name"] == shown["assignments"]["rank"])
    assert arm["clicks"] == 1 and arm["ctr_at"][1] == 1.0


def test_a_retry_without_a_timestamp_is_still_the_same_event(backend_start):
    """The service stamps an event sent without a timestamp: a retry a second later is the same request all the
    same (the key's digest covers what the client sent), and the first timestamp is the one kept."""
    with backend_start() as client:
        body = {"user_id": "u5", "item_id": "i2", "event_id": "view-7"}
        first = client.post("/events", json=body)
        time.sleep(1.1)
        retry = client.post("/events", json=body)
        history = client.app.state.service.store.history("u5")[1]
    assert retry.headers[REPLAYED] == "true" and retry.json() == first.json()
    assert [e.item_id for e in history].count("i2") == 1


def test_a_key_reused_for_another_write_is_refused_and_records_nothing(backend_start):
    with backend_start() as client:
        assert client.post("/events", json={"user_id": "u1", "item_id": "i1"}, headers={"Idempotency-Key": "k1"}).status_code == 200
        before = recorded(client)
        other = client.post("/events", json={"user_id": "u1", "item_id": "i2"}, headers={"Idempotency-Key": "k1"})
        both = client.post("/events", json={"user_id": "u1", "item_id": "i2", "event_id": "k2"}, headers={"Idempotency-Key": "k3"})
        bad_key = client.post("/events", json={"user_id": "u1", "item_id": "i2"}, headers={"Idempotency-Key": "two words"})
        assert client.put("/admin/items", json={"item_id": "n1"}, headers={**AUTH, "Idempotency-Key": "k1"}).status_code == 200
        item_reused = client.put("/admin/items", json={"item_id": "n2"}, headers={**AUTH, "Idempotency-Key": "k1"})
        assert recorded(client)[0] == before[0]
        assert client.post("/events", json={"user_id": "u2", "item_id": "i2"}, headers={"Idempotency-Key": "k1"}).status_code == 200
    for refused in (other, item_reused):
        assert_client_error(refused, 422)
        assert "already used for a different request" in refused.json()["error"]
    assert_client_error(both, 422)
    assert "event_id and the Idempotency-Key header differ" in both.json()["error"]
    assert_client_error(bad_key, 422)


def test_catalogue_writes_with_a_key_are_recorded_once(backend_start):
    with backend_start() as client:
        def admin(method: str, url: str, key: str | None, body: dict | None = None):
            return client.request(method, url, json=body, headers={**AUTH, **({"Idempotency-Key": key} if key else {})})

        added = admin("PUT", "/admin/items", "put-1", {"item_id": "fresh", "title": "Fresh"})
        changes = recorded(client)[1]
        replayed = admin("PUT", "/admin/items", "put-1", {"item_id": "fresh", "title": "Fresh"})
        batch = {"items": [{"item_id": "b1"}, {"item_id": "fresh", "title": "Fresh again"}]}
        first_batch = admin("POST", "/admin/items:batch", "batch-1", batch)
        batch_retry = admin("POST", "/admin/items:batch", "batch-1", batch)
        removed = admin("DELETE", "/admin/items/b1", "del-1")
        removal_retry = admin("DELETE", "/admin/items/b1", "del-1")
        unkeyed_retry = admin("DELETE", "/admin/items/b1", None)
        assert recorded(client)[1] > changes
        after = recorded(client)[1]
        assert admin("PUT", "/admin/items", "put-1", {"item_id": "fresh", "title": "Fresh"}).status_code == 200
        assert recorded(client)[1] == after  # the replay wrote nothing
    assert added.json() == {"item_id": "fresh", "status": "added"} and REPLAYED not in added.headers
    assert replayed.json() == added.json() and replayed.headers[REPLAYED] == "true"
    assert first_batch.json() == {"items": [{"item_id": "b1", "status": "added"}, {"item_id": "fresh", "status": "replaced"}]}
    assert batch_retry.json() == first_batch.json() and batch_retry.headers[REPLAYED] == "true"
    assert removed.json() == removal_retry.json() == {"item_id": "b1", "status": "removed"}
    assert removal_retry.headers[REPLAYED] == "true"  # not a 404: the item is gone because of this very write
    assert_client_error(unkeyed_retry, 404)


def test_a_write_that_committed_before_its_failure_is_recorded_once_when_retried(backend_start, monkeypatch):
    """What a Redis reply that times out after the script ran looks like to the service: the write is in the store,
    the caller got a 503. Retried with its key, it is answered from the store; retried without one, it is
    recorded twice (why clients send keys)."""
    with backend_start() as client:
        store = client.app.state.service.store
        original, fail_next = store.append_event, [True]

        def reply_lost(user_id, event, once=None):
            version = original(user_id, event, once)
            if fail_next.pop() if fail_next else False:
                raise StoreUnavailable("cannot record the event: reply lost (Redis TimeoutError)")
            return version

        monkeypatch.setattr(store, "append_event", reply_lost)
        body = {"user_id": "u7", "item_id": "i3", "timestamp": 1_700_000_000}
        failed = client.post("/events", json=body, headers={"Idempotency-Key": "lost-1"})
        retry = client.post("/events", json=body, headers={"Idempotency-Key": "lost-1"})
        keyed = [e.timestamp for e in store.history("u7")[1]].count(1_700_000_000)
        fail_next.append(True)
        client.post("/events", json=body)
        client.post("/events", json=body)
        unkeyed = [e.timestamp for e in store.history("u7")[1]].count(1_700_000_000) - keyed
    assert failed.status_code == 503 and "same Idempotency-Key" in failed.json()["error"]
    assert retry.status_code == 200 and retry.headers[REPLAYED] == "true"
    assert keyed == 1 and unkeyed == 2
