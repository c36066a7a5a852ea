"""The loop from clicks back to serving, end to end on a small synthetic bundle and each state backend:
simulated users click on what the service shows (a share of answers explored by random swaps), ``retrain
--impressions`` learns the re-ranker from those clicks with estimated propensities, the gate decides, and the
running replica reloads the promoted bundle by itself."""
from __future__ import annotations

import json
import time

import numpy as np

from offline.__main__ import main as offline_main
from offline.synthetic import planted
from tests.offline.test_events import TINY
from tests.servicekit import AUTH

EXPLORE = {"variants": [{"name": "control", "share": 0.5}, {"name": "explore", "share": 0.5, "explore": 1.0}]}


def simulate(client, n: int, seed: int = 0) -> int:
    """``n`` answers to random users, each clicked by a position-based model over the planted tastes (the
    data of the session bundle: ``tiny_dataset``); returns the clicks posted."""
    rel = planted(n_users=120, n_items=150, n_genres=5, seed=3).relevance()
    rng = np.random.default_rng(seed)
    posted = 0
    for _ in range(n):
        user = int(rng.integers(120))
        body = client.get("/recommend", params={"user_id": f"u{user}", "k": 10}).json()
        items = [int(x["item_id"][1:]) for x in body["items"]]
        attract = 1 / (1 + np.exp(-(rel[user, items] - 0.3) / 0.15))
        for pos in np.flatnonzero(rng.random(len(items)) < attract / np.arange(1, len(items) + 1)):
            event = {"user_id": f"u{user}", "item_id": f"i{items[pos]}", "type": "click",
                     "request_id": body["request_id"], "position": int(pos) + 1}
            assert client.post("/events", json=event).json()["joined"]
            posted += 1
    return posted


def test_clicks_train_the_next_ranker_and_the_replica_serves_it(backend_start, own_root, tmp_path):
    state = tmp_path / "state"
    with backend_start(bundle_dir=own_root, state_dir=state, bundle_poll_s="0.1") as client:
        assert client.put("/admin/experiments/explore", json=EXPLORE, headers=AUTH).status_code == 201
        incumbent = client.get("/ready").json()["bundle_version"]
        clicks = simulate(client, 500)
        assert clicks > 50
        client.app.state.service.impressions.flush()
        source = backend_start.events_args(state)[1:]
        assert offline_main(["retrain", *TINY, "--impressions", *source[:1], *(["--events-redis-prefix", source[2]] if len(source) > 1 else []),
                             "--out", str(own_root), "--gate-margin", "1"]) == 0
        report = json.loads(next((own_root / "reports").glob("*/retrain.json")).read_text())
        assert report["promoted"] and report["incumbent"] == incumbent
        manifest = json.loads((own_root / report["candidate"] / "manifest.json").read_text())  # (the replica is loading it)
        learned = manifest["metrics"]["ranker"]["clicks"]
        assert learned["counts"]["feedback joined"] == clicks and learned["counts"]["impressions"] == 500
        props = learned["propensities"]
        assert props["theta"][0] == 1 and len(props["theta"]) == 10 and min(props["swaps"]) > 0
        assert all(lo <= t <= hi for lo, t, hi in zip(props["lo"], props["theta"], props["hi"]))
        deadline = time.monotonic() + 10
        while client.get("/ready").json()["bundle_version"] != report["candidate"]:  # the replica reloads by itself
            assert time.monotonic() < deadline, "the promoted bundle was not picked up"
            time.sleep(0.05)
        answer = client.get("/recommend", params={"user_id": "u3", "k": 10}).json()
        assert answer["bundle_version"] == report["candidate"] and len(answer["items"]) == 10
