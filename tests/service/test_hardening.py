"""Hostile and careless input: every case a clear 4xx with a message, never a 500; secrets never logged.

Bodies that ``json=`` cannot express (integers past 64 bits, ``1e400``, lone surrogates) are sent as
raw JSON text, as a fuzzer or a buggy client would send them. What reaches ``/events`` and ``/admin/items``
is checked on both state backends (``backend_client``, ``backend_start``).
"""
from __future__ import annotations

import json
import os
import re
import pickle
from pathlib import Path

import anyio
import numpy as np
import pytest

from recsys.bundle import _sha256, resolve
from service.config import Settings, get_settings
from service.http import BodyLimit
from tests.servicekit import AUTH, TOKEN, assert_client_error

BIG = "1" + "0" * 30  # an integer past 64 bits, as JSON text
HUGE = "1" + "0" * 400  # an integer past any float
JSON = {"Content-Type": "application/json"}


def post_raw(client, url: str, text: str, headers: dict | None = None):
    return client.post(url, content=text.encode("utf-8", "surrogatepass"), headers={**JSON, **(headers or {})})


def error_of(response, status: int) -> str:
    assert_client_error(response, status)
    return response.json()["error"]


# --------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("url, body, field", [
    ("/events", f'{{"user_id": "u1", "item_id": "i1", "timestamp": {BIG}}}', "timestamp"),
    ("/events", f'{{"user_id": "u1", "item_id": {BIG}}}', "item_id"),
    ("/events", f'{{"user_id": {BIG}, "item_id": "i1"}}', "user_id"),
    ("/recommend", f'{{"user_id": "u1", "k": {BIG}}}', "k"),
    ("/recommend", f'{{"user_id": "u1", "candidates": {BIG}}}', "candidates"),
    ("/recommend", f'{{"user_id": "u1", "filters": {{"year_max": {HUGE}}}}}', "filters.year_max"),
    ("/recommend", '{"user_id": "u1", "filters": {"year_min": 1e400}}', "filters.year_min"),
    ("/recommend", f'{{"features": {{"age": {HUGE}}}}}', "features.age"),
    ("/recommend", '{"features": {"age": 1e400}}', "features.age"),
    ("/admin/items", f'{{"item_id": "big", "year": {BIG}}}', "year"),
])
def test_numbers_past_what_the_service_can_hold_are_422_naming_the_field(backend_client, url, body, field):
    client = backend_client
    message = error_of(post_raw(client, url, body, AUTH), 422)
    assert f"{field}:" in message, message


def test_timestamps_in_milliseconds_are_refused(backend_client):
    client = backend_client
    message = error_of(client.post("/events", json={"user_id": "u1", "item_id": "i1", "timestamp": 1_700_000_000_000}), 422)
    assert "timestamp" in message


@pytest.mark.parametrize("body, field", [({"k": True}, "k"), ({"k": "10"}, "k"), ({"explain": "yes"}, "explain"),
                                         ({"candidates": 5.0}, "candidates"), ({"filters": {"year_min": False}}, "filters.year_min")])
def test_no_loose_coercion(client, body, field):
    message = error_of(client.post("/recommend", json={"user_id": "u1", **body}), 422)
    assert f"{field}:" in message


def test_item_year_must_be_an_integer_not_a_boolean(backend_client):
    client = backend_client
    message = error_of(client.post("/admin/items", json={"item_id": "b", "year": False}, headers=AUTH), 422)
    assert "year:" in message


def test_numeric_features_outside_the_training_range_are_clipped_to_it(client, bundle):
    """age = 1e308 answers exactly what the oldest age seen in training answers, not garbage."""
    spec = bundle.manifest["feature_spec"]
    oldest = spec["user_num_max"][spec["user_numeric"].index("age")]
    def scores(age):
        body = client.post("/recommend", json={"features": {"age": age}, "recent_items": ["i1", "i2"], "k": 10}).json()
        return [(it["item_id"], round(it["recall_score"], 5)) for it in body["items"]]
    assert scores(1e308) == scores(oldest) == scores(oldest * 10)
    assert scores(-1e308) == scores(spec["user_num_min"][0])


# --------------------------------------------------------------------------- text
@pytest.mark.parametrize("url, body", [
    ("/events", '{"user_id": "\\ud800", "item_id": "i1"}'),
    ("/events", '{"user_id": "u1", "item_id": "\\udfff"}'),
    ("/recommend", '{"user_id": "\\ud800"}'),
    ("/recommend", '{"recent_items": ["i1", "\\ud800x"]}'),
    ("/recommend", '{"features": {"\\ud800": 1}}'),
    ("/admin/items", '{"item_id": "x", "title": "\\ud800"}'),
    ("/admin/items", '{"item_id": "x", "genres": ["\\ud800"]}'),
])
def test_lone_surrogates_are_422(backend_client, url, body):
    client = backend_client
    assert "unicode" in error_of(post_raw(client, url, body, AUTH), 422).lower()


def test_malformed_json_is_400(client):
    assert "malformed JSON" in error_of(post_raw(client, "/recommend", '{"user_id": "u1",'), 400)


def test_ids_with_a_slash_work_on_every_route(backend_start):
    with backend_start() as client:
        assert client.post("/admin/items", json={"item_id": "shelf/7", "genres": ["genre1"]}, headers=AUTH).status_code == 200
        assert client.post("/events", json={"user_id": "u1", "item_id": "shelf/7"}).status_code == 200
        similar = client.get("/similar-items/shelf/7", params={"k": 3})
        assert similar.status_code == 200 and similar.json()["item_id"] == "shelf/7"
        assert client.delete("/admin/items/shelf/7", headers=AUTH).json() == {"item_id": "shelf/7", "status": "removed"}
        assert "shelf/7" in error_of(client.get("/similar-items/shelf/7"), 404)


def test_rating_outside_the_bundles_scale_is_422(backend_start, bundle):
    scale = bundle.manifest.get("rating_scale") or {"min": 0.0, "max": 5.0}
    with backend_start() as client:
        for rating in (scale["max"] + 1, scale["min"] - 1):
            message = error_of(client.post("/events", json={"user_id": "u1", "item_id": "i1", "rating": rating}), 422)
            assert "rating scale" in message
        assert client.post("/events", json={"user_id": "u1", "item_id": "i1", "rating": scale["max"]}).status_code == 200


# --------------------------------------------------------------------------- reload
def test_reload_with_a_long_or_odd_version_is_422(client):
    for version in ("a" * 300, "../etc", ".hidden", "a/b", ""):
        assert_client_error(client.post("/admin/reload", json={"version": version}, headers=AUTH), 422)


def _rewrite(vdir: Path, name: str, data: bytes) -> None:
    """Replace a bundle file and its checksum, so only the file's content can be at fault."""
    (vdir / name).write_bytes(data)
    manifest = json.loads((vdir / "manifest.json").read_text())
    manifest["files"][name] = _sha256(vdir / name)
    (vdir / "manifest.json").write_text(json.dumps(manifest))


def _drop_index_dim(vdir: Path) -> None:
    manifest = json.loads((vdir / "manifest.json").read_text())
    del manifest["index"]["dim"]
    (vdir / "manifest.json").write_text(json.dumps(manifest))


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/recsys-pwned",))


@pytest.mark.parametrize("damage, reason", [
    (lambda v: _rewrite(v, "item_index.bin", (v / "item_index.bin").read_bytes()[:1000]), "item_index.bin"),
    (_drop_index_dim, "index.dim"),
    (lambda v: _rewrite(v, "ranker.pt", pickle.dumps({"kind": _RunsCode()})), "cannot load"),
    (lambda v: (v / "manifest.json").write_text("[1, 2]"), "not a JSON object"),
    (lambda v: (v / "manifest.json").write_bytes(b"\xff{}"), "UnicodeDecodeError"),  # not UTF-8: was a 500
    (lambda v: (v / "manifest.json").write_text("[" * 100_000), "RecursionError"),
])
def test_every_bundle_load_failure_is_409_and_the_old_bundle_keeps_serving(start, own_root, damage, reason):
    Path("/tmp/recsys-pwned").unlink(missing_ok=True)
    vdir = resolve(own_root)
    with start(bundle_dir=own_root) as client:
        before = client.get("/recommend", params={"user_id": "u1"}).json()
        damage(vdir)
        message = error_of(client.post("/admin/reload", headers=AUTH), 409)
        assert reason in message and "still serving" in message
        assert client.get("/recommend", params={"user_id": "u1"}).json()["items"] == before["items"]
    assert not Path("/tmp/recsys-pwned").exists()


def test_missing_bundle_message_names_the_path(start, tmp_path):
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    with pytest.raises(RuntimeError, match=f"--out {empty}"):
        with start(bundle_dir=empty):
            pass


# --------------------------------------------------------------------------- secrets and logs
@pytest.mark.parametrize("diagnose", ["false", "true"])
def test_a_crash_logs_neither_the_token_nor_the_body(start, monkeypatch, capsys, diagnose):
    from recsys.engine.engine import Engine

    def crash(self, *args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(Engine, "recommend_users", crash)
    with start(log_diagnose=diagnose, log_level="INFO", raise_server_exceptions=False) as client:
        response = client.post("/recommend", json={"user_id": "u1", "features": {"occupation": "body-marker-42"}},
                               headers={"X-Request-Id": "crash-42"})
        assert response.status_code == 500 and response.json() == {"error": "internal error (RuntimeError); see logs"}
        assert response.headers["x-request-id"] == "crash-42"  # what finds the log line that "see logs" means
        generated = client.post("/recommend", json={"user_id": "u1"}).headers.get("x-request-id")
    logged = capsys.readouterr().err
    assert "unhandled error" in logged and "boom" in logged
    assert generated and generated in logged
    assert TOKEN not in logged
    if diagnose == "false":  # with diagnose on, locals (the request model) are shown: that is what the setting is for
        assert "body-marker-42" not in logged


def test_settings_never_show_the_token():
    settings = Settings(admin_token="a-very-secret-token")
    assert "a-very-secret-token" not in f"{settings!r} {settings} {settings.model_dump()}"
    assert settings.admin_token.get_secret_value() == "a-very-secret-token"


# --------------------------------------------------------------------------- HTTP details
def test_405_names_every_allowed_method(client):
    response = client.delete("/recommend")
    assert_client_error(response, 405)
    assert {m.strip() for m in response.headers["allow"].split(",")} >= {"GET", "POST"}
    response = client.get("/admin/items")
    assert {m.strip() for m in response.headers["allow"].split(",")} == {"PUT", "POST"}
    response = client.post("/static/app.js")  # the web page's files
    assert_client_error(response, 405)
    assert {m.strip() for m in response.headers["allow"].split(",")} == {"GET", "HEAD"}


def test_401_says_bearer_and_the_scheme_name_is_case_insensitive(client):
    response = client.post("/admin/reload", json={"version": "nope"}, headers={"Authorization": "Bearer wrong-token"})
    assert_client_error(response, 401)
    assert response.headers["www-authenticate"] == "Bearer"
    for scheme in ("bearer", "BEARER", "Bearer"):
        response = client.post("/admin/reload", json={"version": "nope"}, headers={"Authorization": f"{scheme} {TOKEN}"})
        assert_client_error(response, 409)  # authorised; the version does not exist


def test_openapi_describes_the_real_bodies_statuses_and_security(client):
    doc = client.get("/openapi.json").json()
    paths = doc["paths"]
    assert "HTTPValidationError" not in json.dumps(doc) and '"detail"' not in json.dumps(doc["components"])
    recommend = paths["/recommend"]["post"]["responses"]
    assert recommend["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/RecommendResponse")
    assert set(recommend) >= {"200", "400", "404", "413", "422"}
    for path, method, statuses in (("/admin/items", "post", {"401", "403", "422"}), ("/admin/reload", "post", {"401", "403", "409"}),
                                   ("/admin/items/{item_id}", "delete", {"401", "403", "404"})):
        op = paths[path][method]
        assert op["security"] == [{"HTTPBearer": []}] and set(op["responses"]) >= statuses, (path, op)
        assert op["responses"]["401"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    operation_ids = [op["operationId"] for ops in paths.values() for op in ops.values()]
    assert len(operation_ids) == len(set(operation_ids))  # a client generator names a method by it
    assert paths["/admin/items"]["put"]["security"] == paths["/admin/items"]["post"]["security"]
    assert "Idempotency-Key" in {p["name"] for p in paths["/events"]["post"]["parameters"]}
    every_200 = [(p, m) for p, ops in paths.items() for m, op in ops.items() if "schema" not in
                 op["responses"]["200"].get("content", {}).get("application/json", {}) and p != "/metrics"]
    assert every_200 == []


def test_explanations_use_readable_feature_names(client, bundle):
    body = client.post("/recommend", json={"user_id": "u1", "k": 3, "explain": True}).json()
    names = set(body["items"][0]["features"])
    genres = set(bundle.catalog["genre_names"])
    assert any(n.startswith("genre:") and n.removeprefix("genre:") in genres for n in names), names
    assert "age" in names and any(n.startswith("occupation=") for n in names), names
    assert not [n for n in names if re.match(r"^(genre_\d+|user_num_\d+|user_cat_\d+)", n)], names


def test_a_stalled_body_gets_408():
    """A client that sends headers and then stalls the body cannot hold a handler forever."""
    os.environ["RECSYS_BODY_TIMEOUT_S"] = "0.2"
    get_settings.cache_clear()
    sent = []

    async def app(scope, receive, send):
        await receive()

    async def receive():
        await anyio.sleep(5)

    async def send(message):
        sent.append(message)

    async def run():
        with pytest.raises(Exception) as caught:
            await BodyLimit(app)({"type": "http"}, receive, send)
        return caught.value

    try:
        err = anyio.run(run)
        assert getattr(err, "status_code", None) == 408 and "0.2 s" in err.detail
    finally:
        del os.environ["RECSYS_BODY_TIMEOUT_S"]
        get_settings.cache_clear()


def test_no_500_on_a_burst_of_random_junk(backend_start):
    """A cheap, seeded fuzz pass beside schemathesis: random JSON shapes at every body route."""
    rng = np.random.default_rng(0)
    values = [None, True, -1, 0, 2**63, -(2**64), 1e308, "", " ", "x" * 300, [], {}, [1, "a"], {"a": 1}, "\u0000", 3.5]
    fields = ["user_id", "item_id", "k", "candidates", "features", "recent_items", "filters", "rating", "timestamp",
              "genres", "year", "title", "version", "explain", "exclude_seen"]
    with backend_start() as client:
        for n in range(300):
            body = {str(f): values[rng.integers(len(values))] for f in rng.choice(fields, rng.integers(1, 4), replace=False)}
            url = ["/recommend", "/events", "/admin/items", "/admin/reload"][n % 4]
            response = client.post(url, json=body, headers=AUTH)
            assert response.status_code < 500, (url, body, response.text)
