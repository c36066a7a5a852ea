"""The service under test: started in-process with its lifespan, and the checks every route test shares."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

import pytest
import torch
from fastapi.testclient import TestClient

from offline.bundle import read_bundle
from service.app import app
from service.config import get_settings

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@contextmanager
def serve(mp: pytest.MonkeyPatch, bundle_dir: Path, state_dir: Path, token: str | None = TOKEN,
          raise_server_exceptions: bool = True, **env: str):
    """The app with these settings, lifespan included (start-up and shutdown really run)."""
    mp.setenv("RECSYS_BUNDLE_DIR", str(bundle_dir))
    mp.setenv("RECSYS_STATE_DIR", str(state_dir))
    mp.setenv("RECSYS_LOG_LEVEL", "WARNING")
    if token is None:
        mp.delenv("RECSYS_ADMIN_TOKEN", raising=False)
    else:
        mp.setenv("RECSYS_ADMIN_TOKEN", token)
    for key, value in env.items():
        mp.setenv(f"RECSYS_{key.upper()}", value)
    get_settings.cache_clear()
    outer = getattr(app.state, "service", None)  # ``app`` is a process global: a nested start must not leave
    try:                                          # the module-wide service pointing at a stopped one
        with TestClient(app, raise_server_exceptions=raise_server_exceptions) as client:
            yield client
    finally:
        app.state.service = outer
        get_settings.cache_clear()


@pytest.fixture(autouse=True, scope="module")
def _restore_torch_threads():
    """The lifespan sets torch's thread count for the process; give the other test modules theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(bundle_root, tmp_path_factory):
    """One service for the tests that only read (no events, no catalogue changes)."""
    with pytest.MonkeyPatch.context() as mp, serve(mp, bundle_root, tmp_path_factory.mktemp("state")) as c:
        yield c


@pytest.fixture
def start(bundle_root, tmp_path, monkeypatch):
    """``start()`` serves a fresh state directory; calling it again with the same state is a restart."""
    def _start(bundle_dir: Path = bundle_root, state_dir: Path = tmp_path / "state", **kw):
        return serve(monkeypatch, bundle_dir, state_dir, **kw)
    return _start


@pytest.fixture(scope="session")
def bundle(bundle_root):
    """The session's bundle as the service reads it (do not modify: tests share it)."""
    return read_bundle(bundle_root)


@pytest.fixture
def own_root(bundle_root, tmp_path) -> Path:
    """A private copy of the bundle root, for tests that add versions or corrupt files."""
    root = tmp_path / "artifacts"
    shutil.copytree(bundle_root, root, ignore=shutil.ignore_patterns("runs", "reports", "state"))
    return root



def assert_client_error(response, status: int | None = None) -> None:
    """A 4xx with a readable message, never a 500."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    if status is not None:
        assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body.get("error"), str) and body["error"], body


# --------------------------------------------------------------------------- real processes on loopback
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float, proc: subprocess.Popen) -> None:
    """Until ``url`` answers 200; fails early, with the process's log, if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


@contextmanager
def spawned(cmd: list[str], log: Path, env: dict | None = None) -> Iterator[subprocess.Popen]:
    """A process with its output in ``log``, stopped by its pid when the block ends (killed if it lingers)."""
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


REDIS = shutil.which("redis-server")


@contextmanager
def redis_server(directory: Path, port: int | None = None) -> Iterator[str]:
    """A real redis-server on a loopback port with AOF on and fsynced per write (acknowledged = on disk), as
    compose runs it; yields its URL. Stopped by its pid; started again on the same directory and port, it
    reloads the AOF."""
    port = port or free_port()
    with spawned(redis_command(directory, port), directory / "redis.log") as proc:
        url = f"redis://127.0.0.1:{port}/0"
        wait_for_redis(url, proc)
        yield url


def redis_command(directory: Path, port: int) -> list[str]:
    if REDIS is None:
        pytest.skip(reason="redis-server not installed (.ci/run installs it: apt-get install redis-server)")
    directory.mkdir(parents=True, exist_ok=True)
    return [REDIS, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--save", "",
            "--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no"]


def wait_for_redis(url: str, proc: subprocess.Popen, timeout: float = 20) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}")
        try:
            if client.ping():
                return
        except redis.RedisError:
            time.sleep(0.05)
    raise TimeoutError(url)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """One Redis for the session; tests keep apart by key prefix (``unique_prefix``)."""
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


def unique_prefix() -> str:
    import uuid

    return f"t{uuid.uuid4().hex[:12]}"
