"""The service under test: started in-process with its lifespan, and the checks every route test shares."""
from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

import pytest
import torch
from fastapi.testclient import TestClient

from bench.serving import free_port, free_ports
from recsys.bundle import read_bundle
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
    outer = app_state()  # ``app`` is a process global: a nested start must not leave the module-wide
    try:                 # service pointing at a stopped one
        with TestClient(app, raise_server_exceptions=raise_server_exceptions) as client:
            yield client
    finally:
        set_app_state(outer)
        get_settings.cache_clear()


APP_STATE = ("service", "settings", "io_limiter")  # what the lifespan leaves on ``app.state`` for the routes


def app_state() -> dict:
    return {name: getattr(app.state, name, None) for name in APP_STATE}


def set_app_state(state: dict) -> None:
    for name, value in state.items():
        setattr(app.state, name, value)


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
    """``start()`` serves a fresh state directory (the file backend); calling it again with the same state is a
    restart."""
    return Starter("file", monkeypatch, bundle_root, tmp_path)


# --------------------------------------------------------------------------- both state backends
BACKENDS = ["file", "redis", "redis-cluster"]


class Starter:
    """``starter(bundle_dir=..., state_dir=..., **settings)`` serves the bundle with its state on ``backend``
    (a context manager, as ``serve``). Each ``state_dir`` is one state: the file backend's directory, or for
    Redis a fresh key prefix on the session's redis-server (``redis_url``). The same ``state_dir`` again is
    a restart: a new app on the same state."""

    def __init__(self, backend: str, mp: pytest.MonkeyPatch, bundle_root: Path, tmp_path: Path, redis_url: str | None = None):
        self.backend, self.mp, self.bundle_root, self.tmp_path, self.redis_url = backend, mp, bundle_root, tmp_path, redis_url
        self.prefixes: dict[Path, str] = {}

    def __call__(self, bundle_dir: Path | None = None, state_dir: Path | None = None, **kw):
        state_dir = self.tmp_path / "state" if state_dir is None else state_dir
        return serve(self.mp, self.bundle_root if bundle_dir is None else bundle_dir, state_dir,
                     **{**self.settings(state_dir), **kw})

    def settings(self, state_dir: Path | None = None) -> dict[str, str]:
        """The service's backend settings (``RECSYS_STATE_BACKEND`` and, for Redis, its URL and key prefix)."""
        if self.backend == "file":
            return {"state_backend": "file"}
        state_dir = self.tmp_path / "state" if state_dir is None else state_dir
        prefix = self.prefixes.setdefault(Path(state_dir), unique_prefix())
        return {"state_backend": "redis", "redis_url": self.redis_url, "redis_prefix": prefix}

    def events_args(self, state_dir: Path | None = None) -> list[str]:
        """The offline CLI's ``--events`` options naming this state, as an operator would pass them."""
        if self.backend == "file":
            return ["--events", str(self.tmp_path / "state" if state_dir is None else state_dir)]
        settings = self.settings(state_dir)
        return ["--events", settings["redis_url"], "--events-redis-prefix", settings["redis_prefix"]]

    def source(self, state_dir: Path | None = None) -> tuple[str, str]:
        """``(source, redis_prefix)`` as ``read_source`` and ``load_engine`` take them."""
        args = self.events_args(state_dir)
        return args[1], (args[3] if len(args) > 2 else "recsys")


def backend_url(request) -> str | None:
    """The Redis URL of a test parametrised by backend (None for the file backend)."""
    fixture = {"redis": "redis_url", "redis-cluster": "redis_cluster_url"}.get(request.param)
    return fixture and request.getfixturevalue(fixture)


@pytest.fixture(params=BACKENDS)
def backend_start(request, bundle_root, tmp_path, monkeypatch) -> Starter:
    """``start`` on each state backend, for the tests about what the state holds (events, catalogue changes,
    restarts): one behaviour, both backends. Redis tests skip, saying why, where redis-server is missing."""
    return Starter(request.param, monkeypatch, bundle_root, tmp_path, backend_url(request))


@pytest.fixture(scope="module", params=BACKENDS)
def _backend_service(request, bundle_root, tmp_path_factory):
    """One service per backend for a module's tests that change nothing (refused events and items): started
    aside, then made the app's service for each test by ``backend_client`` (``app`` is a process global, and
    the module's ``client`` must keep being served by its own)."""
    url = backend_url(request)
    outer, current = app_state(), None
    with pytest.MonkeyPatch.context() as mp:
        with Starter(request.param, mp, bundle_root, tmp_path_factory.mktemp(request.param), url)() as client:
            own = app_state()
            set_app_state(outer)
            mp.undo()  # the environment back as it was: later starts choose their backend themselves
            get_settings.cache_clear()
            try:
                yield client, own
            finally:
                current = app_state()  # whichever service the module is serving now, not the one at our start
    if current is not None:
        set_app_state(current)


@pytest.fixture
def backend_client(_backend_service):
    """``client`` on each state backend (see ``_backend_service``): for refused input, whose check is that
    nothing was recorded (``recorded``)."""
    client, own = _backend_service
    outer = app_state()
    set_app_state(own)
    try:
        yield client
    finally:
        set_app_state(outer)


def recorded(client) -> tuple[int, int]:
    """How much the service's store has recorded, raw: the file backend's log sizes in bytes, Redis's stream
    lengths. Anything written (even a record readers would skip) changes it."""
    from recsys.state.files import FileStateStore

    store = client.app.state.service.store
    if isinstance(store, FileStateStore):
        return store.events.path.stat().st_size, store.catalog_log.path.stat().st_size
    layout = store.layout
    return sum(store.client.xlen(layout.events(s)) for s in range(layout.shards)), store.client.xlen(layout.catalog)


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
        wait_for_redis(url, proc, log=directory / "redis.log")
        yield url


def redis_command(directory: Path, port: int) -> list[str]:
    if REDIS is None:
        pytest.skip(reason="redis-server not installed (.ci/run installs it: apt-get install redis-server)")
    directory.mkdir(parents=True, exist_ok=True)
    return [REDIS, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--save", "",
            "--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no"]


@dataclass
class RedisCluster:
    """A running cluster: its URL for the store (``redis+cluster://``, one seed node) and each node's process,
    which a test may kill."""

    url: str
    nodes: dict[int, subprocess.Popen]  # by port

    def masters(self) -> dict[int, list[tuple[int, int]]]:
        """The nodes serving slots now (by port, with their slot ranges), as a live node sees the cluster."""
        import redis

        seed = redis.Redis(port=next(p for p, proc in self.nodes.items() if proc.poll() is None), socket_timeout=2)
        return {int(address.rsplit(":", 1)[1]): [(int(r[0]), int(r[-1])) for r in node["slots"]]
                for address, node in seed.execute_command("CLUSTER NODES").items()
                if "master" in node["flags"] and "fail" not in node["flags"] and node["slots"]}

    def master_of(self, key: str) -> int:
        """The port of the master serving ``key``'s slot now."""
        from redis.crc import key_slot

        slot = key_slot(key.encode())
        return next(port for port, ranges in self.masters().items() if any(lo <= slot <= hi for lo, hi in ranges))

    def kill(self, port: int) -> None:
        """SIGKILL: no shutdown, no final fsync beyond what each write already did."""
        self.nodes[port].kill()
        self.nodes[port].wait()


@contextmanager
def redis_cluster(directory: Path, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000) -> Iterator[RedisCluster]:
    """A real Redis Cluster on loopback ports: ``masters`` masters with ``replicas`` replicas each, every node with
    AOF fsynced per write as ``redis_server``, created by ``redis-cli --cluster create`` (slots split evenly).
    A node that stops answering for ``node_timeout_ms`` is failed over to its replica."""
    cli = shutil.which("redis-cli")
    if REDIS is None or cli is None:
        pytest.skip(reason="redis-server / redis-cli not installed (.ci/run installs them: apt-get install redis-server)")
    for attempt in range(3):
        with ExitStack() as stack:
            try:
                cluster = _cluster_nodes(stack, directory / f"start-{attempt}", masters * (1 + replicas), node_timeout_ms)
            except NodeExited:
                if attempt == 2:
                    raise
                continue  # (a port taken between its pick and the node's bind: start again on new ports)
            subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in cluster.nodes), "--cluster-replicas",
                            str(replicas), "--cluster-yes"], check=True, capture_output=True, timeout=60)
            wait_for_cluster(cluster, masters, replicas)
            yield cluster
            return


def _cluster_nodes(stack: ExitStack, directory: Path, count: int, node_timeout_ms: int) -> RedisCluster:
    """``count`` cluster-enabled nodes started, each answering PING; stopped when ``stack`` closes."""
    ports = free_ports(2 * count)  # a node's port and its cluster bus port, all distinct
    cluster = RedisCluster(f"redis+cluster://127.0.0.1:{ports[0]}", {})
    for port, bus_port in zip(ports[:count], ports[count:]):
        node_dir = directory / str(port)
        cmd = redis_command(node_dir, port) + ["--cluster-enabled", "yes", "--cluster-port", str(bus_port),
                                               "--cluster-config-file", str(node_dir / "nodes.conf"),
                                               "--cluster-node-timeout", str(node_timeout_ms)]
        cluster.nodes[port] = stack.enter_context(spawned(cmd, node_dir / "redis.log"))
    for port, proc in cluster.nodes.items():
        wait_for_redis(f"redis://127.0.0.1:{port}/0", proc, log=directory / str(port) / "redis.log")
    return cluster


def wait_for_cluster(cluster: RedisCluster, masters: int, replicas: int = 0, timeout: float = 60) -> None:
    """Until every live node says the cluster is ok, ``masters`` nodes serve slots, and each of them has
    ``replicas`` replicas in sync (a write can be confirmed by ``WAIT``)."""
    import redis

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            live = [redis.Redis(port=p, socket_timeout=1) for p, proc in cluster.nodes.items() if proc.poll() is None]
            serving = cluster.masters()
            if all(c.execute_command("CLUSTER INFO")["cluster_state"] == "ok" and _settled(c) for c in live) \
                    and len(serving) == masters \
                    and all(_replicas_confirm(redis.Redis(port=p, socket_timeout=2), ranges, replicas)
                            for p, ranges in serving.items()):
                return
        except redis.RedisError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"cluster at {cluster.url} not ok after {timeout} s")


def _replicas_confirm(master, ranges: list[tuple[int, int]], replicas: int) -> bool:
    """Whether ``replicas`` replicas confirm each of 10 writes to this master within 100 ms (``WAIT``), well inside
    the store's 400 ms: a replica listed online may still be finishing its first sync (the first writes of a test
    were refused with 503 in CI, "0 of 1 replicas confirmed it within 400 ms")."""
    from redis.crc import key_slot

    key = next(k for k in (f"probe-{i}" for i in range(100_000)) if any(lo <= key_slot(k.encode()) <= hi for lo, hi in ranges))
    for n in range(10):
        master.set(key, str(n))
        if master.execute_command("WAIT", replicas, 100) < replicas:
            return False
    return True


def _settled(node) -> bool:
    """No AOF rewrite running or due, nothing loading (a replica rewrites its AOF after its first sync)."""
    persistence = node.info("persistence")
    return not any(persistence.get(k) for k in ("aof_rewrite_in_progress", "aof_rewrite_scheduled", "loading"))


class NodeExited(RuntimeError):
    """A redis-server exited before answering; the message ends with its log's last lines."""


def wait_for_redis(url: str, proc: subprocess.Popen, timeout: float = 20, log: Path | None = None) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").splitlines()[-5:] if log and log.exists() else []
            raise NodeExited(f"redis-server at {url} exited with {proc.returncode}: " + " | ".join(tail))
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


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory) -> Iterator[str]:
    """One 3-master cluster (a replica each) for the session; tests keep apart by key prefix."""
    with redis_cluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster.url


def unique_prefix() -> str:
    import uuid

    return f"t{uuid.uuid4().hex[:12]}"
