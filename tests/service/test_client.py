"""The Python client (service/client.py): every call against the real app, each answer checked against what the
raw endpoint says; and its retries, idempotency keys, timeouts and errors against scripted answers
(``httpx.MockTransport``), where the tests count the attempts and record the waits instead of sleeping."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from service.app import app
from service.client import (NO_RETRY, ApiError, AsyncRecsysClient, CatalogItem, ConnectionFailed, Filters, InvalidRequest,
                            NotFound, RecsysClient, RequestRejected, Retry, ServerError, Unauthorized, Unavailable, UnexpectedAnswer,
                            Variant)
from tests.browserkit import served
from tests.servicekit import TOKEN

FAST = Retry(attempts=4, backoff_s=0.1, max_backoff_s=0.4, jitter=0.0)  # exact waits: 0.1, 0.2, 0.4


# ----------------------------------------------------------------------------- the real service
@pytest.fixture(scope="module")
def base_url(bundle_root, tmp_path_factory) -> Iterator[str]:
    """The service on a loopback port, as ``make run`` starts it, on a private copy of the bundle (items are added
    and removed, bundles reloaded)."""
    tmp = tmp_path_factory.mktemp("client")
    shutil.copytree(bundle_root, tmp / "artifacts", ignore=shutil.ignore_patterns("runs", "reports", "state"))
    with served(tmp / "artifacts", tmp / "state", tmp / "server.log", admin_token=TOKEN) as url:
        yield url


@pytest.fixture
def api(base_url) -> Iterator[RecsysClient]:
    with RecsysClient(base_url, admin_token=TOKEN) as client:
        yield client


@pytest.fixture
def raw(base_url) -> Iterator[httpx.Client]:
    """The same service through plain HTTP: what each typed answer is checked against."""
    with httpx.Client(base_url=base_url, timeout=30) as client:
        yield client


def raw_ids(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [item["item_id"] for item in response.json()["items"]]


def test_probes_and_info_name_the_served_bundle(api, raw):
    ready, info = api.ready(), api.info()
    assert api.health() == "alive"
    assert ready.status == "ready" and ready.state_store == "ok"
    assert ready.bundle_version == info.bundle_version == raw.get("/ready").json()["bundle_version"]
    assert ready.items == raw.get("/ready").json()["items"] > 0
    assert info.genres == tuple(raw.get("/info").json()["genres"]) and "u0" in info.example_users
    assert 'recsys_requests_total{endpoint="/ready",method="GET",status="200"}' in api.metrics()


def test_recommend_is_what_the_endpoint_answers_by_get_and_by_post(api, raw):
    plain = api.recommend("u1", k=7)
    answer = raw.get("/recommend", params={"user_id": "u1", "k": 7}).json()
    assert plain.item_ids == [i["item_id"] for i in answer["items"]] and len(plain.items) == 7
    assert [i.ranking_score for i in plain.items] == pytest.approx([i["ranking_score"] for i in answer["items"]])
    assert [i.score for i in plain.items] == [i.ranking_score for i in plain.items]
    assert plain.items[0].title == answer["items"][0]["title"] and plain.items[0].genres == tuple(answer["items"][0]["genres"])
    assert plain.user_id == "u1" and plain.fallback is None and plain.bundle_version == answer["bundle_version"]
    assert plain.request_id and plain.request_id != answer["request_id"]  # each answer is its own impression
    assert set(plain.timings_ms) == {"features", "user_encoding", "ann_search", "rerank"}
    genre = api.info().genres[1]
    filtered = api.recommend("u6", k=5, filters=Filters(genres_any=[genre]), explain=True, exclude_seen=False)
    body = {"user_id": "u6", "k": 5, "filters": {"genres_any": [genre]}, "explain": True, "exclude_seen": False}
    assert filtered.item_ids == raw_ids(raw.post("/recommend", json=body))
    assert all(genre in item.genres and item.features for item in filtered.items)


def test_a_new_user_from_features_and_recent_items_and_an_empty_profile(api, raw):
    features, recent = {"age": 30, "gender": "F"}, ["i3", "i7", "i11"]
    cold = api.recommend(features=features, recent_items=recent, k=6, trace=True)
    assert cold.item_ids == raw_ids(raw.post("/recommend", json={"features": features, "recent_items": recent, "k": 6}))
    assert cold.user_id is None and not set(recent) & set(cold.item_ids)
    assert [h["item_id"] for h in cold.trace["history"]] == recent[::-1]  # most recent first
    popular = api.recommend(k=3)
    assert popular.fallback == "popularity" and [i.score for i in popular.items] == [i.popularity for i in popular.items]


def test_a_batch_answers_each_user_as_recommend_does_and_an_unknown_one_in_place(api):
    batch = api.recommend_batch(["u3", "nobody", "u4"], k=3)
    assert [r.user_id for r in batch.results] == ["u3", "nobody", "u4"]
    for result in (batch.results[0], batch.results[2]):
        assert result.error is None and result.item_ids == api.recommend(result.user_id, k=3).item_ids
    refused = batch.results[1]
    assert refused.status == 404 and "unknown user_id 'nobody'" in refused.error and refused.items == ()
    assert batch.bundle_version == api.ready().bundle_version and "rerank" in batch.timings_ms


def test_similar_items_is_what_the_endpoint_answers(api, raw):
    similar = api.similar_items("i5", k=4)
    assert similar.item_ids == raw_ids(raw.get("/similar-items/i5", params={"k": 4})) and "i5" not in similar.item_ids
    assert similar.item_id == "i5" and similar.source == "two-tower"


def test_an_event_lengthens_the_history_and_makes_a_new_user_recommendable(api):
    with pytest.raises(NotFound) as unknown:
        api.recommend("walk-in-client", k=5)
    assert unknown.value.status == 404 and "unknown user_id 'walk-in-client'" in unknown.value.message
    first = api.record_event("walk-in-client", "i1", rating=5)
    second = api.record_event("walk-in-client", "i2", type="click")
    assert (first.history_length, second.history_length) == (1, 2)
    assert first.user_id == "walk-in-client" and not first.replayed
    answer = api.recommend("walk-in-client", k=5)
    assert len(answer.items) == 5 and not {"i1", "i2"} & set(answer.item_ids)
    feedback = api.record_event("walk-in-client", answer.item_ids[1], type="click", request_id=answer.request_id)
    assert feedback.history_length == 3 and feedback.joined is True and feedback.position == 2


def test_upserted_items_are_served_then_removed(api, raw):
    fresh = CatalogItem("fresh/1", title="Fresh", genres=["genre2"], year=2999, description="a storm at sea")
    assert (api.upsert_item(fresh).status, api.upsert_item(fresh).status) == ("added", "replaced")
    only_new = Filters(year_min=2999)
    assert api.recommend("u3", k=5, filters=only_new).item_ids == ["fresh/1"]
    assert api.similar_items("fresh/1", k=3).source == "content"
    changes = api.upsert_items([CatalogItem("fresh/2", year=2999), CatalogItem("fresh/1", year=2999)])
    assert [(c.item_id, c.status) for c in changes.items] == [("fresh/2", "added"), ("fresh/1", "replaced")]
    assert set(raw_ids(raw.post("/recommend", json={"user_id": "u3", "k": 5, "filters": {"year_min": 2999}}))) == {"fresh/1", "fresh/2"}
    assert api.remove_item("fresh/1").status == "removed" and api.remove_item("fresh/2").status == "removed"
    with pytest.raises(NotFound):
        api.similar_items("fresh/1")
    with pytest.raises(NotFound):
        api.remove_item("fresh/1")


def test_ids_with_dot_segments_name_themselves_not_another_item(api, raw):
    """Ids are any text, '/' included: 'a/../b' and '..' are ids of their own, never a path that resolves to
    another item (httpx resolves dot segments in a URL's path before sending)."""
    items = [CatalogItem(i, year=2998) for i in ("b", "a/../b", "..", "x/.")]
    api.upsert_items(items)
    assert api.remove_item("a/../b").status == "removed" and api.remove_item("x/.").status == "removed"
    assert api.similar_items("..", k=2).item_id == ".." and api.remove_item("..").status == "removed"
    assert raw_ids(raw.post("/recommend", json={"user_id": "u3", "k": 5, "filters": {"year_min": 2998}})) == ["b"]
    assert api.remove_item("b").status == "removed"


def test_refusals_raise_with_the_services_message(api, base_url):
    with pytest.raises(InvalidRequest) as invalid:
        api.recommend("u1", k=0)
    assert invalid.value.status == 422 and "k" in invalid.value.message and invalid.value.details
    assert invalid.value.request_id  # the id the service logged the request under
    with RecsysClient(base_url, admin_token="wrong") as intruder, pytest.raises(Unauthorized) as denied:
        intruder.upsert_item(CatalogItem("never"))
    assert denied.value.status == 401 and denied.value.message == "missing or wrong bearer token"
    with pytest.raises(InvalidRequest) as rating:
        api.record_event("u1", "i1", rating=1000)
    assert "outside the bundle's rating scale" in rating.value.message


def test_reload_swaps_in_the_current_bundle(api):
    before = api.ready().bundle_version
    reloaded = api.reload()
    assert reloaded.previous_version == reloaded.bundle_version == before == api.ready().bundle_version


def test_an_experiment_is_defined_assigned_reported_and_deleted(api):
    variants = [Variant("a", share=0.5), Variant("b", share=0.5, ranker=False)]
    first, again = api.define_experiment("client-ab", variants), api.define_experiment("client-ab", variants)
    assert first.created and not again.created and first.variants == tuple(variants)
    assert [e.name for e in api.experiments()] == ["client-ab"]
    served_to = {u: api.recommend(u, k=3).assignments["client-ab"] for u in ("u1", "u2", "u3", "u4", "u5", "u6")}
    assert set(served_to.values()) <= {"a", "b"}
    report = api.experiment_report("client-ab")
    assert report.name == "client-ab" and {v["name"] for v in report.variants} == {"a", "b"}
    assert report.variant("a")["name"] == "a" and report.sample_ratio is not None
    assert api.delete_experiment("client-ab") is None and api.experiments() == ()
    with pytest.raises(NotFound):
        api.experiment_report("client-ab")


class LoseFirstReply(httpx.HTTPTransport):
    """Real HTTP to the service, but the first answer is lost on its way back (a timeout after the service
    committed the write): what a retry with the same idempotency key is for."""

    def __init__(self):
        super().__init__()
        self.lost = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if self.lost:
            return response
        self.lost += 1
        response.read()
        raise httpx.ReadTimeout("the answer was lost", request=request)


def test_a_write_whose_answer_was_lost_is_retried_and_recorded_once(base_url):
    with RecsysClient(base_url, admin_token=TOKEN, retry=FAST, sleep=lambda _: None, transport=LoseFirstReply()) as api:
        first = api.record_event("lost-reply", "i1")
        assert first.replayed and first.history_length == 1  # the retry was answered from the first write
        assert api.record_event("lost-reply", "i2").history_length == 2
    with RecsysClient(base_url, admin_token=TOKEN, retry=FAST, sleep=lambda _: None, transport=LoseFirstReply()) as api:
        changes = api.upsert_items([CatalogItem("lost-reply-item", year=1990)])
        assert changes.replayed and [c.status for c in changes.items] == ["added"]  # not 'replaced' by the retry
        assert api.remove_item("lost-reply-item").status == "removed"


def test_a_callers_key_records_a_write_once_and_refuses_it_for_another_write(api):
    first, again = (api.record_event("keyed", "i1", event_id="keyed-1") for _ in range(2))
    assert (first.replayed, again.replayed) == (False, True) and first.history_length == again.history_length == 1
    with pytest.raises(InvalidRequest) as reused:
        api.record_event("keyed", "i2", event_id="keyed-1")
    assert reused.value.status == 422
    item = CatalogItem("keyed-item", year=1990)
    assert [api.upsert_item(item, idempotency_key="keyed-item-1").replayed for _ in range(2)] == [False, True]
    removed = [api.remove_item("keyed-item", idempotency_key="keyed-item-2") for _ in range(2)]
    assert [(r.status, r.replayed) for r in removed] == [("removed", False), ("removed", True)]  # not a 404


# ----------------------------------------------------------------------------- the async client, the real app
def test_the_async_client_gives_the_sync_clients_answers(start):
    """The same app through ``httpx.ASGITransport`` (the lifespan run by ``start``), checked against its raw answers."""

    async def calls(raw) -> None:
        async with AsyncRecsysClient("http://app", admin_token=TOKEN, transport=httpx.ASGITransport(app=app)) as api:
            assert (await api.ready()).bundle_version == raw.get("/ready").json()["bundle_version"]
            assert (await api.recommend("u2", k=6)).item_ids == raw_ids(raw.get("/recommend", params={"user_id": "u2", "k": 6}))
            body = {"user_id": "u2", "k": 4, "filters": {"year_max": 2000}}
            assert (await api.recommend("u2", k=4, filters=Filters(year_max=2000))).item_ids == raw_ids(raw.post("/recommend", json=body))
            batch = await api.recommend_batch(["u2", "nobody"], k=6)
            assert batch.results[0].item_ids == raw_ids(raw.get("/recommend", params={"user_id": "u2", "k": 6}))
            assert batch.results[1].status == 404
            assert (await api.similar_items("i9", k=3)).item_ids == raw_ids(raw.get("/similar-items/i9", params={"k": 3}))
            events = [await api.record_event("async-walk-in", item) for item in ("i1", "i2")]
            assert [e.history_length for e in events] == [1, 2]
            assert (await api.upsert_item(CatalogItem("async-new", year=2999))).status == "added"
            assert raw_ids(raw.post("/recommend", json={"user_id": "u2", "k": 3, "filters": {"year_min": 2999}})) == ["async-new"]
            assert (await api.remove_item("async-new")).status == "removed"
            with pytest.raises(NotFound) as unknown:
                await api.similar_items("async-new")
            assert "async-new" in unknown.value.message

    with start() as raw:
        anyio.run(calls, raw)


# ----------------------------------------------------------------------------- retries, scripted
class Script:
    """A MockTransport handler answering from a list (each entry a response, or an exception to raise), keeping
    every request it saw."""

    def __init__(self, *answers: httpx.Response | Exception):
        self.answers, self.requests = list(answers), []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def keys(self) -> list[str | None]:
        return [r.headers.get("Idempotency-Key") for r in self.requests]


def reply(status: int, body: dict | None = None, **headers: str) -> httpx.Response:
    return httpx.Response(status, json=body if body is not None else {"error": f"status {status}"},
                          headers={k.replace("_", "-"): v for k, v in headers.items()})


EVENT = {"status": "recorded", "user_id": "u1", "history_length": 4}
READY = {"status": "ready", "state_store": "ok", "bundle_version": "v1", "items": 10, "rating_scale": {"min": 1, "max": 5}}
ITEM = {"item_id": "i1", "status": "added"}


def scripted(script: Script, retry: Retry = FAST, **options) -> tuple[RecsysClient, list[float]]:
    """A client answered by ``script``, its waits recorded instead of slept."""
    waits: list[float] = []
    return RecsysClient("http://svc", retry=retry, sleep=waits.append, transport=httpx.MockTransport(script), **options), waits


def test_a_read_is_retried_after_a_503_with_growing_waits():
    script = Script(reply(503), reply(502), reply(200, READY))
    client, waits = scripted(script)
    assert client.ready().bundle_version == "v1"
    assert len(script.requests) == 3 and waits == [0.1, 0.2]


def test_retry_after_is_honoured_in_seconds_and_as_a_date():
    script = Script(reply(503, retry_after="3"), reply(429, retry_after="Wed, 21 Oct 2015 07:28:00 GMT"), reply(200, READY))
    client, waits = scripted(script)
    assert client.ready().status == "ready"
    assert waits == [3.0, 0.0]  # a date already past: no wait


def test_attempts_are_bounded_and_the_last_error_is_raised():
    script = Script(reply(503, {"error": "bundle not loaded"}))
    client, waits = scripted(script)
    with pytest.raises(Unavailable) as failed:
        client.recommend("u1")
    assert failed.value.status == 503 and failed.value.message == "bundle not loaded"
    assert len(script.requests) == FAST.attempts and waits == [0.1, 0.2, 0.4]


def test_no_wait_crosses_the_deadline():
    script = Script(reply(503, retry_after="60"))
    client, waits = scripted(script, Retry(attempts=5, deadline_s=5))
    with pytest.raises(Unavailable):
        client.ready()
    assert len(script.requests) == 1 and waits == []


def test_a_4xx_is_never_retried_and_carries_the_message_and_details():
    details = [{"loc": ["body", "k"], "msg": "Input should be greater than or equal to 1"}]
    script = Script(reply(422, {"error": "invalid request: k: Input should be greater than or equal to 1", "details": details},
                          x_request_id="req-7"))
    client, waits = scripted(script)
    with pytest.raises(InvalidRequest) as invalid:
        client.recommend("u1", k=0)
    assert len(script.requests) == 1 and waits == []
    assert isinstance(invalid.value, RequestRejected) and invalid.value.details == details
    assert invalid.value.request_id == "req-7" and invalid.value.message.startswith("invalid request: k")


def test_a_write_sends_one_idempotency_key_on_every_attempt_and_reports_a_replay():
    script = Script(reply(503), httpx.ConnectError("refused"), reply(200, EVENT, idempotent_replayed="true"))
    client, waits = scripted(script)
    recorded = client.record_event("u1", "i1", rating=4.0)
    keys = script.keys()
    assert len(keys) == 3 and len(set(keys)) == 1 and len(keys[0]) == 32 and int(keys[0], 16) >= 0  # one uuid4 hex
    assert recorded.replayed and recorded.history_length == 4 and waits == [0.1, 0.2]
    assert json.loads(script.requests[0].content) == {"user_id": "u1", "item_id": "i1", "rating": 4.0}
    client.record_event("u1", "i1")
    assert script.keys()[3] != keys[0]  # a new logical write, a new key


def test_a_callers_event_id_is_the_key_and_travels_in_the_body():
    script = Script(reply(504), reply(200, EVENT))
    client, _ = scripted(script)
    assert not client.record_event("u1", "i1", event_id="order-17/line-2").replayed
    assert script.keys() == ["order-17/line-2"] * 2
    assert all(json.loads(r.content)["event_id"] == "order-17/line-2" for r in script.requests)


def test_every_deduplicated_admin_write_carries_a_key_and_the_token():
    script = Script(reply(503), reply(200, ITEM))
    client, _ = scripted(script, admin_token="s3cret")
    assert client.upsert_item(CatalogItem("i1"), idempotency_key="k-1").status == "added"
    script.answers = [reply(503), reply(200, {"items": [ITEM]}, idempotent_replayed="true")]
    changes = client.upsert_items([CatalogItem("i1")])
    script.answers = [httpx.ReadTimeout("slow"), reply(200, {"item_id": "i1", "status": "removed"})]
    assert client.remove_item("i1").status == "removed"
    assert changes.replayed and changes.items[0].replayed
    keys = script.keys()
    assert keys[:2] == ["k-1", "k-1"] and keys[2] == keys[3] and keys[4] == keys[5] and len(set(keys)) == 3
    assert [r.url.path for r in script.requests[::2]] == ["/admin/items", "/admin/items:batch", "/admin/items/i1"]
    assert all(r.headers["Authorization"] == "Bearer s3cret" for r in script.requests)


def test_a_write_without_an_idempotency_key_is_never_retried():
    script = Script(httpx.ConnectError("refused"))
    client, waits = scripted(script, admin_token="s3cret")
    with pytest.raises(ConnectionFailed) as failed:
        client.reload()
    assert isinstance(failed.value.__cause__, httpx.ConnectError) and "POST /admin/reload" in str(failed.value)
    script.answers = [reply(503)]
    with pytest.raises(Unavailable):
        client.delete_experiment("ab")
    assert len(script.requests) == 2 and waits == [] and script.keys() == [None, None]


def test_a_bad_idempotency_key_is_refused_before_sending():
    script = Script(reply(200, ITEM))
    client, _ = scripted(script)
    for key in ("", "with space", "x" * 256, "naïve"):
        with pytest.raises(ValueError, match="idempotency key"):
            client.upsert_item(CatalogItem("i1"), idempotency_key=key)
    assert script.requests == []


def test_connection_errors_and_timeouts_of_reads_are_retried():
    script = Script(httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), reply(200, READY))
    client, waits = scripted(script)
    assert client.ready().items == 10 and waits == [0.1, 0.2]
    script.answers = [httpx.ConnectError("refused")]
    with pytest.raises(ConnectionFailed, match="GET /ready: ConnectError: refused"):
        client.ready()


def test_timeouts_are_set_and_bounded_by_the_deadline():
    script = Script(reply(200, READY))
    client, _ = scripted(script, Retry(deadline_s=2.0), connect_timeout=0.5, read_timeout=7.0)
    client.ready()
    timeout = script.requests[0].extensions["timeout"]
    assert timeout["connect"] == 0.5 and 1.5 < timeout["read"] <= 2.0  # the read timeout cut to what is left
    lenient, _ = scripted(script, Retry(deadline_s=60), connect_timeout=0.5, read_timeout=7.0)
    lenient.ready()
    assert script.requests[1].extensions["timeout"] == {"connect": 0.5, "read": 7.0, "write": 7.0, "pool": 7.0}


def test_an_item_sends_the_fields_set_and_a_year_0_is_set():
    assert CatalogItem("a").to_json() == {"item_id": "a"}
    assert CatalogItem("a", title="T", year=0, genres=["g"]).to_json() == {"item_id": "a", "title": "T", "genres": ["g"], "year": 0}


def test_a_newer_service_adding_fields_breaks_nothing():
    item = {"item_id": "i1", "title": "T", "genres": ["g"], "year": 1999, "recall_score": 0.5, "recall_rank": 0,
            "ranking_score": None, "source": "two-tower", "novelty": 0.3}
    answer = {"user_id": "u1", "request_id": "r1", "items": [item], "bundle_version": "v2", "fallback": None,
              "timings_ms": {"rerank": 1.0}, "region": "eu", "assignments": {}}
    client, _ = scripted(Script(reply(200, answer)))
    got = client.recommend("u1", k=1)
    assert got.item_ids == ["i1"] and got.items[0].score == 0.5 and got.raw["region"] == "eu"


def test_an_answer_the_client_cannot_read_is_an_error_naming_the_call():
    script = Script(reply(200, {"user_id": "u1", "bundle_version": "v"}))  # no items
    client, _ = scripted(script)
    with pytest.raises(UnexpectedAnswer, match="GET /recommend: cannot read the answer .KeyError: 'items'"):
        client.recommend("u1")
    script.answers = [httpx.Response(200, text="<html>maintenance</html>")]
    with pytest.raises(UnexpectedAnswer, match="maintenance"):
        client.ready()
    assert len(script.requests) == 2  # a success is not retried, whatever its body


def test_plain_requests_are_gets_and_the_rest_posts():
    script = Script(reply(200, {"user_id": "u1", "items": [], "bundle_version": "v"}))
    client, _ = scripted(script)
    client.recommend("u1", k=5, exclude_seen=False, explain=True)
    client.recommend("u1", k=5, filters=Filters(genres_any=("a", "b"), year_min=1990))
    client.recommend(features={"age": 3}, recent_items=[1, 2])
    get, filtered, cold = script.requests
    assert (get.method, dict(get.url.params)) == ("GET", {"user_id": "u1", "k": "5", "exclude_seen": "false", "explain": "true"})
    assert filtered.method == "POST" and json.loads(filtered.content) == {
        "user_id": "u1", "k": 5, "filters": {"genres_any": ["a", "b"], "year_min": 1990}}
    assert json.loads(cold.content) == {"features": {"age": 3}, "recent_items": [1, 2], "k": 10}
    assert "Authorization" not in get.headers  # the token goes to admin calls only


def test_an_answer_whose_encoding_lies_is_the_clients_own_error_not_httpxs():
    script = Script(httpx.Response(200, headers={"content-encoding": "gzip"}, stream=httpx.ByteStream(b"not gzip at all")))
    client, _ = scripted(script)
    with pytest.raises(UnexpectedAnswer, match="GET /ready: cannot decode the answer"):
        client.ready()
    assert len(script.requests) == 1  # an answer came: nothing to retry


def test_a_proxys_error_page_is_still_an_error_with_its_text():
    script = Script(httpx.Response(502, text="<html>Bad Gateway</html>"))
    client, _ = scripted(script, NO_RETRY)
    with pytest.raises(Unavailable) as failed:
        client.similar_items("a b/c")
    assert failed.value.message == "<html>Bad Gateway</html>" and failed.value.details is None
    assert script.requests[0].url.raw_path == b"/similar-items/a%20b%2Fc?k=10"  # one segment, the server decodes it
    script.answers = [httpx.Response(500, text="")]
    with pytest.raises(ServerError) as internal:
        client.ready()
    assert not isinstance(internal.value, Unavailable) and isinstance(internal.value, ApiError)


def test_the_async_client_retries_a_write_with_one_key():
    script = Script(reply(503, retry_after="1"), reply(200, EVENT))
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    async def record():
        async with AsyncRecsysClient("http://svc", retry=FAST, sleep=sleep, transport=httpx.MockTransport(script)) as client:
            return await client.record_event("u1", "i1")

    assert anyio.run(record).history_length == 4
    assert waits == [1.0] and len(set(script.keys())) == 1 and len(script.keys()) == 2


def test_importing_the_client_loads_no_server_or_model_library():
    code = ("import sys, service.client; "
            "print(sorted(m for m in ('fastapi', 'starlette', 'pydantic', 'torch', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    assert out.strip() == "[]"
