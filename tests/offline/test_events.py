"""Events recorded by the service merged back into training (offline/events.py), and the loop end to end:
record through the API, train with ``--events``, serve the new bundle on the same state."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from offline.__main__ import main as offline_main
from recsys.bundle import read_bundle
from offline.events import merge_events
from recsys.state.open import LoggedState, read_source
from offline.synthetic import generate
from recsys.state.protocol import Event
from tests.servicekit import AUTH

TINY = ["--synthetic", "120x150", "--seed", "3", "--skip-baselines", "--recall-epochs", "2", "--recall-dim", "16",
        "--recall-emb-dim", "16", "--recall-hidden", "32", "--recall-history-len", "10", "--ranker-epochs", "1",
        "--ranker-losses", "lambdarank", "--no-ranker-lambdamart", "--index-ef", "64", "--index-candidates", "50"]
FRESH = {"item_id": "fresh", "title": "Fresh", "genres": ["genre1"], "year": 2001, "features": {}}


@pytest.fixture
def small():
    return generate(n_users=6, n_items=8, n_genres=3, interactions_per_user=4, seed=1)


def test_merge_adds_new_users_and_items_and_drops_what_it_cannot_place(small):
    first = small.interactions
    dup = Event(small.item_ids[int(first.item[0])], float(first.rating[0]), int(first.timestamp[0]))
    logged = LoggedState("file:/somewhere", [
        ((10, 0), "newbie", Event("i0", 5.0, 2_000_000_000)),
        ((20, 0), "u1", Event("fresh", None, 2_000_000_001)),  # no rating: the data's median
        ((30, 0), "u1", Event("ghost", 4.0, 2_000_000_002)),  # never in the catalogue: skipped
        ((40, 0), small.user_ids[int(first.user[0])], dup),  # already in the data: skipped
    ], {"fresh": {**FRESH, "genres": ["genre1", "a genre this data lacks"]}, "i3": None})
    merged, report = merge_events(small, logged)
    assert (merged.n_users, merged.n_items) == (small.n_users + 1, small.n_items + 1)
    assert merged.user_ids[-1] == "newbie" and merged.item_ids[-1] == "fresh" and "i3" in merged.item_ids
    assert len(merged.interactions) == len(small.interactions) + 2
    tail = merged.interactions.subset(np.arange(len(small.interactions), len(merged.interactions)))
    assert tail.user.tolist() == [small.n_users, small.user_ids.index("u1")]
    assert tail.item.tolist() == [0, small.n_items]
    assert tail.rating.tolist() == [5.0, float(np.median(small.interactions.rating))]
    assert report.skipped == {"event on an unknown item": 1, "duplicate event": 1}
    items = merged.items
    assert items.titles[-1] == "Fresh" and items.year[-1] == 2001
    assert items.genres[-1].tolist() == [g == "genre1" for g in items.genre_names]
    assert merged.users.categorical["gender"][-1] == 0 and np.isnan(merged.users.numeric["age"][-1])
    assert merged.events_watermark == {"source": "file:/somewhere", "position": [40, 0]}
    again, _ = merge_events(merged, logged)  # the same log merged twice adds nothing
    assert len(again.interactions) == len(merged.interactions)


def test_a_directory_that_is_not_a_state_directory_is_a_clear_error(tmp_path, capsys):
    assert offline_main(["train", "--synthetic", "20x30", "--events", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "cannot read it as --events" in err and "not a state directory" in err and err.count("\n") == 1


def test_recorded_events_train_into_the_next_bundle_and_are_not_counted_twice(backend_start, own_root, tmp_path):
    """A brand-new user and a new item go through the API; training with --events gives the user an id
    embedding (no cold path) and the item a trained one; served on the same state, the events up to the
    watermark live in the bundle's history and only later ones come from the store. (On each state
    backend: --events names the state directory, or the Redis URL and key prefix.)"""
    state = tmp_path / "state"
    with backend_start(bundle_dir=own_root, state_dir=state) as client:
        assert client.post("/admin/items", json=FRESH, headers=AUTH).status_code == 200
        now = int(time.time())  # one second for all five: 'fresh' twice is then one event sent twice, whichever
        for item in ("fresh", "i3", "i5", "fresh", "i7"):  # second the writes fall in (they spanned two in CI)
            event = {"user_id": "newbie", "item_id": item, "rating": 5, "timestamp": now}
            assert client.post("/events", json=event).status_code == 200
        for user in ("u1", "u2", "u3"):
            assert client.post("/events", json={"user_id": user, "item_id": "fresh", "rating": 4}).status_code == 200
    logged = read_source(*backend_start.source(state))
    out = tmp_path / "retrained"
    assert offline_main(["train", *TINY, *backend_start.events_args(state), "--out", str(out)]) == 0
    bundle = read_bundle(out)
    assert bundle.manifest["events_watermark"] == {"source": logged.source, "position": list(logged.watermark)}
    assert "newbie" in bundle.catalog["user_ids"]
    assert bundle.catalog["item_ids"].index("fresh") < bundle.manifest["model_config"]["n_items"]  # an id embedding
    with backend_start(bundle_dir=out, state_dir=state) as client:
        engine = client.app.state.service.engine
        assert engine.users.online_history("newbie")[1] == []  # all five are in the bundle's history now
        body = client.get("/recommend", params={"user_id": "newbie", "k": 5}).json()
        assert body["fallback"] is None and not {"fresh", "i3", "i5", "i7"} & {it["item_id"] for it in body["items"]}
        posted = client.post("/events", json={"user_id": "newbie", "item_id": "i9"})
        row = bundle.catalog["user_ids"].index("newbie")
        in_bundle = int(np.diff(bundle.arrays["history_offsets"][row : row + 2])[0])  # four: 'fresh' twice is once
        assert posted.status_code == 200 and posted.json()["history_length"] == in_bundle + 1 == 5  # not + all six
        assert [row for row, _, _ in engine.users.online_history("newbie")[1]] == [engine.catalog.row_of["i9"]]


def test_retrain_promotes_the_replicas_follow_and_events_during_it_are_neither_lost_nor_doubled(backend_start, own_root, tmp_path):
    state = tmp_path / "state"
    with backend_start(bundle_dir=own_root, state_dir=state, bundle_poll_s="0.1") as client:
        assert client.post("/admin/items", json=FRESH, headers=AUTH).status_code == 200
        for item in ("fresh", "i3", "i5"):
            assert client.post("/events", json={"user_id": "newbie", "item_id": item, "rating": 5}).status_code == 200
        incumbent = client.get("/ready").json()["bundle_version"]
        assert offline_main(["retrain", *TINY, *backend_start.events_args(state), "--out", str(own_root), "--gate-margin", "1"]) == 0
        report = json.loads(next((own_root / "reports").glob("*/retrain.json")).read_text())
        assert report["promoted"] and report["incumbent"] == incumbent and set(report["scores"]) == {"incumbent", "candidate"}
        assert [t["metric"] for t in report["gate"]["metrics"]] == ["ndcg@10", "recall@20"]
        assert all(t["users"] > 0 and t["lo"] <= t["mean"] <= t["hi"] for t in report["gate"]["metrics"])
        # both were refit on every interaction, the window included: each side is scored by its holdout twin
        assert report["scored"] == {"incumbent": f"{incumbent}/holdout", "candidate": f"{report['candidate']}/holdout"}
        assert all(0 <= s["ndcg@10"] <= 1 and s["users"] > 0 for s in report["scores"].values())
        assert client.post("/events", json={"user_id": "newbie", "item_id": "i9"}).status_code == 200  # after the watermark
        deadline = time.monotonic() + 10
        while client.get("/ready").json()["bundle_version"] != report["candidate"]:  # the replica reloads by itself
            assert time.monotonic() < deadline, "the promoted bundle was not picked up"
            time.sleep(0.05)
        engine = client.app.state.service.engine
        assert "newbie" in engine.user_row and engine.catalog.row_of["fresh"] < engine.model_items
        assert [row for row, _, _ in engine.users.online_history("newbie")[1]] == [engine.catalog.row_of["i9"]]  # not doubled
        history = engine.users.resolve("newbie").hist_items.tolist()
        rows = [engine.catalog.row_of[i] for i in ("fresh", "i3", "i5", "i9")]
        assert history == rows  # the three in the bundle, then the one after the watermark: none lost
    # a candidate held to an impossible bar is written but not promoted, and the report says why
    assert offline_main(["retrain", *TINY, "--seed", "4", "--out", str(own_root), "--gate-margin", "-1"]) == 0
    kept = json.loads(max((own_root / "reports").glob("*/retrain.json"), key=lambda p: p.stat().st_mtime).read_text())
    assert not kept["promoted"] and "candidate worse" in kept["reason"]
    assert (own_root / "current").read_text().strip() == report["candidate"]
