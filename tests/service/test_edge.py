"""Slow clients at the edge, with real processes on loopback: the service's own head deadline
(``service.protocol.HeadDeadline``) and nginx in front of it (deploy/nginx.conf)."""
from __future__ import annotations

import os
import re
import shutil
import socket
import sys
from pathlib import Path

import httpx
import pytest

from tests.servicekit import free_port, spawned, wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def service_command(port: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "service.app:app", "--host", "127.0.0.1", "--port", str(port),
            "--http", "service.protocol:HeadDeadline"]


def slow_head(port: int, wait_s: float) -> bytes:
    """Send half a request head and then nothing; what the server sends before closing (b"" if it said nothing)."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: slow\r\n")
        conn.settimeout(wait_s)
        received = b""
        while chunk := conn.recv(4096):  # raises TimeoutError if the server keeps the connection open
            received += chunk
        return received


@pytest.fixture
def service(bundle_root, tmp_path):
    port = free_port()
    env = {**os.environ, "RECSYS_BUNDLE_DIR": str(bundle_root), "RECSYS_STATE_DIR": str(tmp_path / "state"),
           "RECSYS_HEADER_TIMEOUT_S": "1", "RECSYS_LOG_LEVEL": "WARNING"}
    env.pop("RECSYS_ADMIN_TOKEN", None)
    with spawned(service_command(port), tmp_path / "service.log", env) as proc:
        wait_for(f"http://127.0.0.1:{port}/ready", 90, proc)
        yield port


def test_a_slow_request_head_gets_408_and_the_connection_closes(service):
    answer = slow_head(service, wait_s=15)
    assert answer.startswith(b"HTTP/1.1 408") and b"request head not received in time" in answer
    with httpx.Client(base_url=f"http://127.0.0.1:{service}") as client:  # prompt clients, kept alive, are unaffected
        assert [client.get("/health").status_code for _ in range(3)] == [200, 200, 200]


@pytest.mark.skipif(NGINX is None, reason="nginx not installed (.ci/run installs it: apt-get install nginx)")
def test_nginx_fronts_the_service_and_drops_slow_clients(service, tmp_path):
    edge = free_port()
    text = (ROOT / "deploy" / "nginx.conf").read_text()
    text = re.sub(r"server recommender:\d+", f"server 127.0.0.1:{service}", text)
    text = re.sub(r"listen \d+;", f"listen 127.0.0.1:{edge};", text)
    text = re.sub(r"client_header_timeout \w+;", "client_header_timeout 1s;", text)
    text = text.replace("access_log /dev/stdout main;", f"access_log {tmp_path / 'access.log'} main;")
    config = tmp_path / "nginx.conf"
    config.write_text(text)
    command = [NGINX, "-c", str(config), "-e", "stderr", "-g", f"daemon off; pid {tmp_path / 'nginx.pid'};"]
    with spawned(command, tmp_path / "nginx.log") as proc:
        wait_for(f"http://127.0.0.1:{edge}/health", 30, proc)
        response = httpx.get(f"http://127.0.0.1:{edge}/recommend", params={"user_id": "u1", "k": 3})
        assert response.status_code == 200 and len(response.json()["items"]) == 3
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])  # nginx's $request_id, passed through
        answer = slow_head(edge, wait_s=15)  # nginx closes the connection (it logs the 408, sends nothing)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer
