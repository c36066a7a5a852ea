"""The real service scraped by a real Prometheus server on loopback, read back through its HTTP API."""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.servicekit import free_port, spawned, wait_for

RULES = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "alert-rules.yml"
RULE_NAMES = [rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian's prometheus is not installed (.ci/run installs it)")]


def query(prom: str, expr: str) -> list[dict]:
    body = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=5).json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_recommender_metrics(bundle_root, tmp_path):
    api_port, prom_port = free_port(), free_port()
    env = {**os.environ, "RECSYS_BUNDLE_DIR": str(bundle_root), "RECSYS_STATE_DIR": str(tmp_path / "state")}
    env.pop("RECSYS_ADMIN_TOKEN", None)
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
        user = httpx.get(f"{base}/ready").json()
        assert user["status"] == "ready"
        for _ in range(5):
            assert httpx.get(f"{base}/recommend", params={"user_id": "u1", "k": 5}).status_code == 200
        assert httpx.get(f"{base}/recommend", params={"user_id": "nobody"}).status_code == 404
        wait_for(f"{prom_url}/-/ready", 60, prom)
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
