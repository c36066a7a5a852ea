"""Batch recommendations: ``POST /recommend/batch`` and ``python -m offline recommend`` answer each user as a
single ``/recommend`` does, in one pass per stage, and report a user they cannot answer without failing the rest."""
from __future__ import annotations

import csv

import numpy as np
import pyarrow.parquet as pq
import pytest

from offline.__main__ import main
from offline.data import DataError
from offline.recommend import load_engine, read_users
from recsys.query import RecommendOptions
from service.app import app
from tests.servicekit import assert_client_error

USERS = ["u3", "u18", "u40", "u77", "u101", "u3"]  # a repeat is answered twice
FILTERS = {"genres_any": ["genre1", "genre3"]}


def single(client, user: str, **options) -> dict:
    response = client.post("/recommend", json={"user_id": user, **options})
    assert response.status_code == 200, response.text
    return response.json()


def same_items(batch_items: list[dict], single_items: list[dict]) -> None:
    """The same items in the same order; scores equal up to float rounding (the batch's matmuls are bigger)."""
    assert [i["item_id"] for i in batch_items] == [i["item_id"] for i in single_items]
    assert [i["source"] for i in batch_items] == [i["source"] for i in single_items]
    for key in ("recall_score", "ranking_score"):
        np.testing.assert_allclose([i[key] for i in batch_items], [i[key] for i in single_items], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options", [{"k": 7}, {"k": 5, "filters": FILTERS, "explain": True}, {"k": 4, "exclude_seen": False}])
def test_batch_answers_each_user_as_a_single_request_does(client, options):
    body = client.post("/recommend/batch", json={"user_ids": USERS, **options})
    assert body.status_code == 200, body.text
    results = body.json()["results"]
    assert [r["user_id"] for r in results] == USERS
    for result in results:
        alone = single(client, result["user_id"], **options)
        assert result["error"] is None and len(result["items"]) == options["k"]
        same_items(result["items"], alone["items"])
        if options.get("explain"):
            assert result["items"][0]["features"].keys() == alone["items"][0]["features"].keys()
    first, last = ({k: v for k, v in r.items() if k != "request_id"} for r in (results[0], results[-1]))
    assert first == last and results[0]["request_id"] != results[-1]["request_id"]  # one answer, two impressions


def test_an_unknown_user_gets_its_own_404_and_the_rest_are_answered(client):
    body = client.post("/recommend/batch", json={"user_ids": ["u5", "nobody", 12345, "u6"], "k": 3}).json()
    assert [r["status"] for r in body["results"]] == [None, 404, 404, None]
    assert "unknown user_id 'nobody'" in body["results"][1]["error"] and body["results"][1]["items"] is None
    assert body["results"][2]["user_id"] == "12345"
    assert all(len(body["results"][i]["items"]) == 3 for i in (0, 3))
    assert set(body["timings_ms"]) == {"features", "user_encoding", "ann_search", "rerank"}
    assert body["bundle_version"]


def test_a_bad_option_fails_the_whole_batch(client):
    assert_client_error(client.post("/recommend/batch", json={"user_ids": ["u1"], "filters": {"genres_any": ["nope"]}}), 422)
    assert_client_error(client.post("/recommend/batch", json={"user_ids": []}), 422)
    assert_client_error(client.post("/recommend/batch", json={"user_ids": ["u1"], "k": 101}), 422)
    assert_client_error(client.post("/recommend/batch", json={"user_id": "u1"}), 422)


def test_the_batch_size_is_a_setting_and_the_openapi_document_says_it(start):
    with start(max_batch_users="3") as client:
        refused = client.post("/recommend/batch", json={"user_ids": ["u1", "u2", "u3", "u4"]})
        assert_client_error(refused, 422)
        assert "at most 3" in refused.json()["error"]
        assert client.post("/recommend/batch", json={"user_ids": ["u1", "u2", "u3"]}).status_code == 200
        schema = client.get("/openapi.json").json()["components"]["schemas"]["BatchRecommendRequest"]
        assert schema["properties"]["user_ids"]["maxItems"] == 3


def test_a_user_known_only_by_online_events_is_answered_in_a_batch(backend_start):
    with backend_start() as client:
        assert client.post("/events", json={"user_id": "newcomer", "item_id": "i7", "rating": 5}).status_code == 200
        result = client.post("/recommend/batch", json={"user_ids": ["newcomer"], "k": 5}).json()["results"][0]
        assert result["error"] is None and "i7" not in [i["item_id"] for i in result["items"]]
        same_items(result["items"], single(client, "newcomer", k=5)["items"])


def test_one_tower_call_and_one_ranker_pass_for_the_whole_batch(client, monkeypatch):
    engine = app.state.service.engine
    calls = {"tower": 0, "ranker": 0, "ann": 0}
    tower, score, index = engine.bundle.user_tower, engine.ranker.score_parts, engine.live.index

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    class CountingIndex:  # hnswlib's index cannot take attributes: wrap it
        def __getattr__(self, name):
            return counted("ann", index.knn_query) if name == "knn_query" else getattr(index, name)

    monkeypatch.setattr(engine.bundle, "user_tower", counted("tower", tower))
    monkeypatch.setattr(engine.ranker, "score_parts", counted("ranker", score))
    monkeypatch.setattr(engine.live, "index", CountingIndex())
    monkeypatch.setattr(engine.users, "vector_cache", {})
    monkeypatch.setattr(engine, "exact_share", 1.0)  # the HNSW path (this catalogue is small enough to score exactly)
    users = [f"u{i}" for i in range(40)]
    body = client.post("/recommend/batch", json={"user_ids": users, "k": 5}).json()
    assert all(r["error"] is None for r in body["results"])
    # one ANN query per beam, max(ef, depth + seen): users share a query only with users searched as deep
    catalog, depth = engine.catalog, engine.bundle_candidates
    beams = {max(index.ef, depth + len(engine.allowed(catalog, None, engine.users.resolve(u).hist_items).excluded))
             for u in users}
    assert 1 < len(beams) < len(users)
    assert calls == {"tower": 1, "ranker": 1, "ann": len(beams)}


def test_a_small_catalogue_is_scored_exactly_and_answers_as_hnsw_does(client, monkeypatch):
    """A first fetch of a good share of the catalogue scores every item (no ANN query); on this index, deep enough
    to be exact over 150 items, both paths return the same lists."""
    engine = app.state.service.engine
    users = [f"u{i}" for i in range(40)]
    index, queries = engine.live.index, []

    class CountingIndex:
        def __getattr__(self, name):
            return (lambda *a, **kw: queries.append(1) or index.knn_query(*a, **kw)) if name == "knn_query" else getattr(index, name)

    monkeypatch.setattr(engine.live, "index", CountingIndex())
    exact = client.post("/recommend/batch", json={"user_ids": users, "k": 10}).json()["results"]
    assert queries == []
    monkeypatch.setattr(engine, "exact_share", 1.0)
    hnsw = client.post("/recommend/batch", json={"user_ids": users, "k": 10}).json()["results"]
    assert queries  # (one per search beam)
    assert [[i["item_id"] for i in r["items"]] for r in exact] == [[i["item_id"] for i in r["items"]] for r in hnsw]


def test_trace_shows_the_history_and_every_candidate_with_where_it_ended(client, bundle):
    body = single(client, "u18", k=5, trace=True)
    trace = body["trace"]
    row = bundle.catalog["user_ids"].index("u18")
    lo, hi = bundle.arrays["history_offsets"][row : row + 2]
    assert trace["history_length"] == hi - lo
    assert [h["item_id"] for h in trace["history"]] == [bundle.catalog["item_ids"][i] for i in bundle.arrays["history_items"][lo:hi][::-1][:50]]
    assert [h["timestamp"] for h in trace["history"]] == bundle.arrays["history_timestamps"][lo:hi][::-1][:50].tolist()
    candidates = trace["candidates"]
    assert [c["recall_rank"] for c in candidates] == list(range(len(candidates)))
    ranked = {c["rank"]: c for c in candidates if c["rank"] is not None}
    assert sorted(ranked) == list(range(5))
    for position, item in enumerate(body["items"]):
        assert ranked[position]["item_id"] == item["item_id"] and ranked[position]["recall_rank"] == item["recall_rank"]
    scores = [c["ranking_score"] for c in candidates]
    assert min(ranked[r]["ranking_score"] for r in ranked) >= max(s for c, s in zip(candidates, scores) if c["rank"] is None)
    assert "trace" not in single(client, "u18", k=5)


def test_trace_of_a_new_user_lists_the_recent_items_without_time(client):
    trace = single(client, None, recent_items=["i3", "i9"], k=3, trace=True)["trace"]
    assert [(h["item_id"], h["timestamp"], h["rating"]) for h in trace["history"]] == [("i9", None, None), ("i3", None, None)]


def test_info_describes_what_is_served(client, bundle):
    info = client.get("/info").json()
    assert info["genres"] == list(bundle.catalog["genre_names"])
    assert info["users"] == len(bundle.catalog["user_ids"]) and info["example_users"] == bundle.catalog["user_ids"][:20]
    years = bundle.arrays["item_year"][np.isfinite(bundle.arrays["item_year"])]
    assert info["years"] == {"min": int(years.min()), "max": int(years.max())}
    assert info["ranker"] in ("mlp", "lambdamart") and info["candidates"] == 50 and info["item_item_candidates"] == 100


def test_the_page_and_its_assets_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset in ("static/app.js", "static/style.css"):
        assert f'"{asset}"' in page.text
        assert client.get(f"/{asset}").status_code == 200
    assert_client_error(client.get("/static/nothing.js"), 404)


# --------------------------------------------------------------------------- python -m offline recommend
def test_offline_recommend_writes_what_the_service_answers(client, bundle_root, tmp_path, capsys):
    users = tmp_path / "users.txt"
    users.write_text("user_id\nu3\n\nu18\nnobody\nu40\n")
    out = tmp_path / "top.csv"
    assert main(["recommend", "--bundle", str(bundle_root), "--users", str(users), "--k", "4", "--out", str(out),
                 "--batch-size", "2", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "top-4 for 3 users" in captured.out and "1 users not written (nobody: unknown user_id" in captured.err
    with out.open() as f:
        rows = list(csv.DictReader(f))
    for user in ("u3", "u18", "u40"):
        mine = [r for r in rows if r["user_id"] == user]
        served = single(client, user, k=4)["items"]
        assert [r["item_id"] for r in mine] == [i["item_id"] for i in served]
        assert [int(r["rank"]) for r in mine] == [1, 2, 3, 4]
        np.testing.assert_allclose([float(r["score"]) for r in mine], [i["ranking_score"] for i in served], rtol=1e-4, atol=1e-5)
    assert not list(tmp_path.glob(".*partial"))


def test_offline_recommend_writes_parquet_for_every_user_with_filters(client, bundle_root, tmp_path):
    out = tmp_path / "top.parquet"
    assert main(["recommend", "--bundle", str(bundle_root), "--users", "all", "--k", "3", "--out", str(out),
                 "--genres-any", "genre1,genre3", "--quiet"]) == 0
    table = pq.read_table(out).to_pylist()
    users = load_engine(bundle_root).bundle.catalog["user_ids"]
    assert len(table) == 3 * len(users) and {r["user_id"] for r in table} == set(users)
    served = single(client, "u18", k=3, filters=FILTERS)["items"]
    assert [r["item_id"] for r in table if r["user_id"] == "u18"] == [i["item_id"] for i in served]


@pytest.mark.parametrize("args, message", [
    (["--out", "top.txt"], "must end in .csv or .parquet"),
    (["--genres-any", "nope"], "unknown genres ['nope']"),
    (["--year-min", "2000", "--year-max", "1990"], "year_min must be <= year_max"),
])
def test_offline_recommend_refuses_bad_options_in_one_line(bundle_root, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    argv = ["recommend", "--bundle", str(bundle_root), "--users", "all", "--quiet", "--out", "top.csv", *args]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_a_user_list_is_read_as_lines_or_as_a_csv_with_a_user_id_column(bundle_root, tmp_path):
    engine = load_engine(bundle_root)
    (tmp_path / "a.txt").write_text("u1\n u2 \n\nu3\n")
    (tmp_path / "b.csv").write_text("segment,user_id\nx,u4\ny,u5\n")
    (tmp_path / "c.csv").write_text("segment,user_id\nx,u4\ny\n")
    (tmp_path / "d.csv").write_text("segment,name\nx,u4\n")
    assert read_users(str(tmp_path / "a.txt"), engine) == ["u1", "u2", "u3"]
    assert read_users(str(tmp_path / "b.csv"), engine) == ["u4", "u5"]
    with pytest.raises(DataError, match="c.csv line 3: 1 fields, no user_id"):
        read_users(str(tmp_path / "c.csv"), engine)
    with pytest.raises(DataError, match="needs a 'user_id' column"):
        read_users(str(tmp_path / "d.csv"), engine)
    with pytest.raises(DataError, match="cannot read"):
        read_users(str(tmp_path / "missing.txt"), engine)


def test_recorded_events_are_applied_as_a_replica_applies_them(backend_start, bundle_root, tmp_path):
    state = tmp_path / "state"
    with backend_start(state_dir=state) as client:
        assert client.post("/events", json={"user_id": "u18", "item_id": "i7", "rating": 5}).status_code == 200
        served = single(client, "u18", k=5)["items"]
    source, prefix = backend_start.source(state)
    engine = load_engine(bundle_root, events=source, redis_prefix=prefix)
    answer = engine.recommend_batch(["u18"], RecommendOptions(k=5)).answers[0]
    same_items(answer["items"], served)
    assert engine.users.resolve("u18").hist_items[-1] == engine.catalog.row_of["i7"]
