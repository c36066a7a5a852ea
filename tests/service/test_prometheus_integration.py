"""The real service scraped by a real Prometheus server on loopback, read back through its HTTP API."""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from tests.servicekit import AUTH, TOKEN, free_port, spawned, wait_for

RULES = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "alert-rules.yml"
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "recsys.json"
RULE_NAMES = [rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian's prometheus is not installed (.ci/run installs it)")]


def query(prom: str, expr: str) -> list[dict]:
    body = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=5).json()
    assert body["status"] == "success", body
    return body["data"]["result"]


@contextmanager
def scraped(bundle_root: Path, tmp_path: Path, admin_token: str | None = None) -> Iterator[tuple[str, str]]:
    """The service (uvicorn, one process, file state) and a Prometheus scraping it every second with the alert rules
    loaded; yields their URLs once both are ready."""
    api_port, prom_port = free_port(), free_port()
    env = {**os.environ, "RECSYS_BUNDLE_DIR": str(bundle_root), "RECSYS_STATE_DIR": str(tmp_path / "state")}
    env.pop("RECSYS_ADMIN_TOKEN", None)
    if admin_token:
        env["RECSYS_ADMIN_TOKEN"] = admin_token
    api_cmd = [sys.executable, "-m", "uvicorn", "service.app:app", "--host", "127.0.0.1", "--port", str(api_port)]
    config = tmp_path / "prometheus.yml"
    config.write_text(
        f"global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: ['{RULES}']\n"
        f"scrape_configs:\n  - job_name: recommender\n    static_configs:\n      - targets: ['127.0.0.1:{api_port}']\n"
    )
    prom_cmd = ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}"]
    base, prom_url = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{prom_port}"
    with spawned(api_cmd, tmp_path / "api.log", env) as api, spawned(prom_cmd, tmp_path / "prometheus.log") as prom:
        wait_for(f"{base}/ready", 90, api)
        wait_for(f"{prom_url}/-/ready", 60, prom)
        yield base, prom_url


def test_prometheus_scrapes_recommender_metrics(bundle_root, tmp_path):
    with scraped(bundle_root, tmp_path) as (base, prom_url):
        user = httpx.get(f"{base}/ready").json()
        assert user["status"] == "ready"
        for _ in range(5):
            assert httpx.get(f"{base}/recommend", params={"user_id": "u1", "k": 5}).status_code == 200
        assert httpx.get(f"{base}/recommend", params={"user_id": "nobody"}).status_code == 404
        # Poll until a scrape taken after all six requests has landed (scrapes run every second).
        deadline = time.monotonic() + 60
        seen: dict[str, float] = {}
        while time.monotonic() < deadline and seen != {"200": 5.0, "404": 1.0}:
            result = query(prom_url, 'recsys_requests_total{endpoint="/recommend"}')
            seen = {r["metric"]["status"]: float(r["value"][1]) for r in result}
            time.sleep(0.5)
        assert seen == {"200": 5.0, "404": 1.0}
        stages = {r["metric"]["stage"] for r in query(prom_url, "recsys_stage_seconds_count")}
        assert {"features", "user_encoding", "ann_search", "rerank"} <= stages
        assert query(prom_url, "recsys_bundle_info")[0]["metric"]["version"] == user["bundle_version"]
        assert float(query(prom_url, "recsys_index_items")[0]["value"][1]) == user["items"]
        assert query(prom_url, 'up{job="recommender"}')[0]["value"][1] == "1"
        assert rule_health(prom_url) == {name: "ok" for name in RULE_NAMES}  # every alert's query evaluates on real series


def rule_health(prom: str, timeout_s: float = 30) -> dict[str, str]:
    """Each loaded alert rule's health once every rule has been evaluated (``unknown`` before its first evaluation)."""
    deadline = time.monotonic() + timeout_s
    while True:
        groups = httpx.get(f"{prom}/api/v1/rules", timeout=5).json()["data"]["groups"]
        health = {rule["name"]: rule["health"] for group in groups for rule in group["rules"]}
        if "unknown" not in health.values() or time.monotonic() > deadline:
            return health
        time.sleep(0.5)


def test_every_dashboard_query_returns_series_from_the_service_under_load(bundle_root, tmp_path):
    """Each panel's PromQL in deploy/grafana/dashboards/recsys.json, asked of a real Prometheus scraping the real
    service after traffic that touches every panel: recommendations inside an experiment, a fallback, a 404, a
    click joined to its answer, a reload."""
    exprs = {t["expr"]: p["title"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]}
    with scraped(bundle_root, tmp_path, TOKEN) as (base, prom_url), httpx.Client(base_url=base, timeout=30) as c:
        experiment = {"variants": [{"name": "control", "share": 0.5}, {"name": "no-ranker", "share": 0.5, "ranker": False}]}
        assert c.put("/admin/experiments/ranker", json=experiment, headers=AUTH).status_code == 201
        answers = [c.post("/recommend", json={"user_id": f"u{i}", "k": 5}).json() for i in range(1, 30)]
        assert c.post("/recommend", json={"features": {}, "k": 5}).json()["fallback"] == "popularity"
        assert c.get("/recommend", params={"user_id": "nobody"}).status_code == 404
        first = answers[0]
        click = {"user_id": "u1", "item_id": first["items"][0]["item_id"], "type": "click", "request_id": first["request_id"]}
        assert c.post("/events", json=click).json()["joined"] is True
        assert c.post("/admin/reload", headers=AUTH).status_code == 200
        empty: dict[str, str] = dict(exprs)
        deadline = time.monotonic() + 60
        while empty and time.monotonic() < deadline:
            empty = {expr: title for expr, title in empty.items() if not query(prom_url, expr)}
            time.sleep(1)
        assert not empty, f"panels whose query returned no series: {sorted(set(empty.values()))}"
