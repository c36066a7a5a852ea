"""Two service processes on loopback sharing one real redis-server: what one replica is told, the
other serves; kills and outages lose nothing acknowledged. The processes are started once for the
module and stopped by pid; the tests that kill or restart something bring it back themselves."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import psutil
import pytest
import redis

from service.client import (NO_RETRY, ApiError, CatalogItem, ConnectionFailed, Filters, NotFound, RecsysClient, Unavailable,
                            Variant)
from tests.servicekit import REDIS, TOKEN, free_port, redis_command, spawned, unique_prefix, wait_for, wait_for_redis

pytestmark = [pytest.mark.slow, pytest.mark.skipif(REDIS is None, reason="redis-server not installed (.ci/run installs it)")]


class Cluster:
    """redis + replicas "a" and "b"; ``kill(name)`` is kill -9, ``restart_redis`` keeps its AOF directory."""

    def __init__(self, root: Path, bundle_root: Path):
        self.root, self.stack = root, ExitStack()
        self.bundle = root / "artifacts"
        shutil.copytree(bundle_root, self.bundle, ignore=shutil.ignore_patterns("runs", "reports", "state"))
        self.redis_port, self.prefix = free_port(), unique_prefix()
        self.redis_url = self._start_redis()
        self.procs: dict[str, subprocess.Popen] = {}
        self.urls = {name: f"http://127.0.0.1:{free_port()}" for name in ("a", "b")}
        for name in self.urls:
            self.start(name)

    def _start_redis(self) -> str:
        self._redis = ExitStack()
        self.redis_proc = self._redis.enter_context(spawned(redis_command(self.root / "redis", self.redis_port),
                                                            self.root / "redis.log"))
        url = f"redis://127.0.0.1:{self.redis_port}/0"
        wait_for_redis(url, self.redis_proc)
        return url

    def start(self, name: str) -> None:
        env = {**os.environ, "RECSYS_BUNDLE_DIR": str(self.bundle), "RECSYS_STATE_BACKEND": "redis",
               "RECSYS_REDIS_URL": self.redis_url, "RECSYS_REDIS_PREFIX": self.prefix, "RECSYS_ADMIN_TOKEN": TOKEN,
               "RECSYS_LOG_LEVEL": "WARNING"}
        port = self.urls[name].rsplit(":", 1)[1]
        cmd = [sys.executable, "-m", "uvicorn", "service.app:app", "--host", "127.0.0.1", "--port", port]
        proc = self.stack.enter_context(spawned(cmd, self.root / f"{name}.log", env))
        wait_for(f"{self.urls[name]}/ready", 90, proc)
        self.procs[name] = proc

    def kill(self, name: str) -> None:
        self.procs[name].kill()
        self.procs[name].wait()

    def stop_redis(self, hard: bool = False) -> None:
        """SIGTERM (Redis shuts down cleanly), or kill -9 (only what its AOF holds survives)."""
        if hard:
            self.redis_proc.kill()
            self.redis_proc.wait()
        self._redis.close()

    def restart_redis(self) -> None:
        self.redis_url = self._start_redis()

    def client(self, name: str) -> RecsysClient:
        """The project's client on one replica, without retries: each test sees every answer as it came."""
        return RecsysClient(self.urls[name], admin_token=TOKEN, read_timeout=10, retry=NO_RETRY)

    def close(self) -> None:
        self.stack.close()
        self._redis.close()


@pytest.fixture(scope="module")
def cluster(bundle_root, tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"), bundle_root)
    yield c
    c.close()


def serves(client: RecsysClient, item_id: str) -> bool:
    """Whether the replica knows the item (its similar items answer rather than 404)."""
    try:
        client.similar_items(item_id)
    except NotFound:
        return False
    return True


def test_an_event_posted_to_one_replica_changes_the_others_next_answer(cluster):
    with cluster.client("a") as a, cluster.client("b") as b:
        with pytest.raises(NotFound):
            b.recommend("walk-in-1")
        for item in ("i1", "i2", "i3"):
            a.record_event("walk-in-1", item)
        after = b.recommend("walk-in-1", k=20)
        assert after.fallback is None and not {"i1", "i2", "i3"} & set(after.item_ids)
        # a known user: B's kept history and cached vector are dropped because the history version moved; over
        # and over, each event acknowledged by A is in B's very next answer (B keeps histories between them)
        for _ in range(20):
            before = b.recommend("u7", k=5).item_ids
            assert b.recommend("u7", k=5).item_ids == before
            a.record_event("u7", before[0], rating=5)
            assert before[0] not in b.recommend("u7", k=5).item_ids


def test_catalogue_changes_reach_the_other_replica_within_a_second(cluster):
    with cluster.client("a") as a, cluster.client("b") as b:
        a.upsert_item(CatalogItem("fresh/1", title="Fresh", genres=["genre2"], year=2999))
        started = time.monotonic()
        while not serves(b, "fresh/1"):
            assert time.monotonic() - started < 1.0, "B did not serve the new item within a second"
            time.sleep(0.02)
        only_new = Filters(year_min=2999)
        assert b.recommend("u3", k=5, filters=only_new).item_ids == ["fresh/1"]
        assert a.remove_item("fresh/1").status == "removed"
        started = time.monotonic()
        while serves(b, "fresh/1"):
            assert time.monotonic() - started < 1.0, "B still served the removed item after a second"
            time.sleep(0.02)
        for user in ("u1", "u2", "u3", "u4", "u5"):
            assert b.recommend(user, k=5, filters=only_new).item_ids == []
            assert "fresh/1" not in b.recommend(user, k=100, exclude_seen=False).item_ids


def test_two_replicas_run_one_experiment_and_their_impressions_and_feedback_add_up(cluster):
    """Defined on A, run by B within its poll; a user is in the same variant on both; feedback sent to B for an
    answer A served joins it; both report the same totals."""
    variants = [Variant("control", share=0.5), Variant("shallow", share=0.5, candidates=20)]
    with cluster.client("a") as a, cluster.client("b") as b:
        assert a.define_experiment("replicas", variants).created
        started = time.monotonic()
        while "replicas" not in [e.name for e in b.experiments()]:
            assert time.monotonic() - started < 3, "B did not see the experiment"
            time.sleep(0.05)
        users = [f"u{i}" for i in range(20)]
        from_a = {u: a.recommend(u, k=5) for u in users}
        from_b = {u: b.recommend(u, k=5) for u in users}
        assert all(from_a[u].assignments == from_b[u].assignments for u in users)
        time.sleep(1.0)  # the impression writers gather for RECSYS_IMPRESSION_LINGER_S (0.25 s), then write to Redis
        for u in users[:10]:
            assert b.record_event(u, from_a[u].item_ids[1], type="click", request_id=from_a[u].request_id).joined is True
        reports = [client.experiment_report("replicas") for client in (a, b)]
        assert reports[0].variants == reports[1].variants
        assert sum(v["impressions"] for v in reports[0].variants) == 40
        assert sum(v["clicks"] for v in reports[0].variants) == 10
        a.delete_experiment("replicas")


def _ingest(url: str, user: str, acked: list[int], stop: threading.Event) -> None:
    """Post events with increasing timestamps until stopped or the server dies; record the acknowledged ones."""
    with RecsysClient(url, read_timeout=5, retry=NO_RETRY) as client:
        for t in range(1, 100_000):
            if stop.is_set():
                return
            try:
                client.record_event(user, f"i{t % 100}", timestamp=t)
            except ConnectionFailed:
                return
            except ApiError:
                continue
            acked.append(t)


def _stored_timestamps(url: str, prefix: str, user: str) -> set[int]:
    client = redis.Redis.from_url(url)
    entries = client.xrange(f"{prefix}:events")
    return {int(f[b"timestamp"]) for _, f in entries if f[b"user_id"] == user.encode()}


def test_a_replica_killed_during_ingestion_loses_no_acknowledged_event(cluster):
    acked: list[int] = []
    stop = threading.Event()
    writers = [threading.Thread(target=_ingest, args=(cluster.urls["a"], "ingest-kill", acked, stop)) for _ in range(1)]
    for w in writers:
        w.start()
    deadline = time.monotonic() + 30
    while len(acked) < 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    cluster.kill("a")  # kill -9 in the middle of the stream of writes
    stop.set()
    for w in writers:
        w.join()
    assert len(acked) >= 200
    assert set(acked) <= _stored_timestamps(cluster.redis_url, cluster.prefix, "ingest-kill")
    with cluster.client("b") as b:  # the other replica serves the whole acknowledged history
        assert b.record_event("ingest-kill", "i1").history_length >= len(acked) + 1
    cluster.start("a")


def test_redis_restarted_keeps_every_acknowledged_event(cluster):
    acked = list(range(1, 101))
    with cluster.client("a") as a:
        for t in acked:  # each acknowledged, or the call raises
            a.record_event("restart", f"i{t % 50}", timestamp=t)
    cluster.stop_redis(hard=True)  # kill -9: only what the AOF holds survives
    cluster.restart_redis()
    assert set(acked) == _stored_timestamps(cluster.redis_url, cluster.prefix, "restart")
    with cluster.client("b") as b:
        deadline = time.monotonic() + 10
        while b.ready().status != "ready" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert b.record_event("restart", "i1").history_length == 101


def test_with_redis_down_writes_get_503_reads_keep_serving_and_it_recovers(cluster):
    with cluster.client("a") as a, cluster.client("b") as b:
        cluster.stop_redis()
        try:
            with pytest.raises(Unavailable) as refused:
                a.record_event("u1", "i1")
            assert refused.value.status == 503 and "state store unavailable" in refused.value.message
            assert "same Idempotency-Key" in refused.value.message
            with pytest.raises(Unavailable):
                a.upsert_item(CatalogItem("lost"))
            for client in (a, b):
                assert len(client.recommend("u1", k=5).items) == 5
                ready = client.ready()  # a 200: the replica stays in the load balancer
                assert ready.status == "degraded" and "unavailable" in ready.state_store, ready
        finally:
            cluster.restart_redis()
        deadline = time.monotonic() + 15
        for client in (a, b):  # both, as the next test finds them
            while client.ready().status != "ready" and time.monotonic() < deadline:
                time.sleep(0.1)
            assert client.ready().status == "ready"
        a.record_event("u1", "i1")
        a.upsert_item(CatalogItem("after-outage", genres=["genre1"]))
        started = time.monotonic()  # B's follower reconnected by itself
        while not serves(b, "after-outage"):
            assert time.monotonic() - started < 5, "B's catalogue follower did not recover"
            time.sleep(0.05)


def test_nginx_spreads_requests_over_both_replicas(cluster, tmp_path):
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        pytest.skip(reason="nginx not installed (.ci/run installs it)")
    edge = free_port()
    text = (Path(__file__).resolve().parents[2] / "deploy" / "nginx.conf").read_text()
    servers = "\n".join(f"        server {url.removeprefix('http://')};" for url in cluster.urls.values())
    text = re.sub(r"^\s*server recommender:\d+[^\n]*$", servers, text, flags=re.M)
    text = re.sub(r"listen \d+;", f"listen 127.0.0.1:{edge};", text)
    text = text.replace("access_log /dev/stdout main;", f"access_log {tmp_path / 'access.log'} main;")
    (tmp_path / "nginx.conf").write_text(text)
    command = [nginx, "-c", str(tmp_path / "nginx.conf"), "-e", "stderr", "-g", f"daemon off; pid {tmp_path / 'nginx.pid'};"]
    with spawned(command, tmp_path / "nginx.log") as proc, \
            RecsysClient(f"http://127.0.0.1:{edge}", read_timeout=10, retry=NO_RETRY) as lb:
        wait_for(f"http://127.0.0.1:{edge}/health", 30, proc)
        for n in range(3):
            lb.record_event("via-nginx", f"i{n}")
        for _ in range(40):  # whichever replica answers, it sees every event
            assert not {"i0", "i1", "i2"} & set(lb.recommend("via-nginx", k=20).item_ids)
    upstreams = re.findall(r"upstream=(\S+)", (tmp_path / "access.log").read_text())
    assert {u.removeprefix("http://") for u in cluster.urls.values()} <= set(upstreams), set(upstreams)


def test_worker_processes_share_state_and_their_metrics_add_up(cluster, tmp_path):
    port = free_port()
    env = {**os.environ, "RECSYS_BUNDLE_DIR": str(cluster.bundle), "RECSYS_STATE_BACKEND": "redis",
           "RECSYS_REDIS_URL": cluster.redis_url, "RECSYS_REDIS_PREFIX": cluster.prefix, "RECSYS_LOG_LEVEL": "WARNING",
           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}
    cmd = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"]
    # a new connection per request, so that the kernel hands requests to both workers
    with spawned(cmd, tmp_path / "workers.log", env) as proc, \
            RecsysClient(f"http://127.0.0.1:{port}", retry=NO_RETRY, headers={"Connection": "close"}) as client:
        wait_for(f"http://127.0.0.1:{port}/ready", 120, proc)
        for n in range(60):
            assert len(client.recommend(f"u{n % 20}", k=3).items) == 3
        for _ in range(10):  # every scrape, whichever worker answers it, counts all 60
            text = client.metrics()
            count = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                        if line.startswith('recsys_requests_total{endpoint="/recommend",method="GET",status="200"}'))
            assert count == 60, text[:2000]
        pids = {f.name for f in (tmp_path / "metrics").glob("counter_*.db")}
        assert len(pids) == 2, pids  # both workers served


def _listening(supervisor: int, port: int) -> set[int]:
    """The supervisor's children that listen on ``port``."""
    return {child.pid for child in psutil.Process(supervisor).children()
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in _connections(child))}


def _connections(process: psutil.Process) -> list:
    try:
        return process.net_connections(kind="tcp")
    except psutil.NoSuchProcess:
        return []


def _until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise TimeoutError(what)


def test_each_worker_listens_on_its_own_socket_connections_spread_and_a_killed_worker_is_replaced(cluster, tmp_path):
    """uvicorn's shared socket let the first worker awake accept every waiting connection (wrk's 16 all on one
    worker in some runs); with a socket per worker in one SO_REUSEPORT group the kernel spreads them."""
    port, metrics_dir = free_port(), tmp_path / "metrics"
    env = {**os.environ, "RECSYS_BUNDLE_DIR": str(cluster.bundle), "RECSYS_STATE_BACKEND": "redis",
           "RECSYS_REDIS_URL": cluster.redis_url, "RECSYS_REDIS_PREFIX": cluster.prefix, "RECSYS_LOG_LEVEL": "WARNING",
           "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    cmd = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"]
    with spawned(cmd, tmp_path / "workers.log", env) as proc:
        wait_for(f"http://127.0.0.1:{port}/ready", 120, proc)
        workers = _until(lambda: len(w := _listening(proc.pid, port)) == 2 and w, 120, "two listening workers")
        connections = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(24)]  # all at once
        for conn in connections:  # each a keep-alive connection, answered and left open
            conn.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            assert conn.recv(65536).startswith(b"HTTP/1.1 200")
        mine = {conn.getsockname()[1] for conn in connections}
        held = {pid: {c.raddr.port for c in _connections(psutil.Process(pid))
                      if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port} & mine for pid in workers}
        assert set().union(*held.values()) == mine and all(held.values()), held  # all 24 on one: odds 2 in 2**24
        for conn in connections:
            conn.close()

        victim = min(workers)
        assert list(metrics_dir.glob(f"gauge_livesum_{victim}.db"))  # its in-flight gauge
        os.kill(victim, signal.SIGKILL)
        # A connection the kernel queued on the victim's socket in the moment before it closed is reset (the price
        # of a socket per worker): a GET is retried, as the client does by default and a proxy's next upstream.
        with RecsysClient(f"http://127.0.0.1:{port}", headers={"Connection": "close"}) as client:
            replaced = set()
            while len(replaced) < 2:  # the other worker answers meanwhile, every time
                assert len(client.recommend("u1", k=3).items) == 3
                replaced = _listening(proc.pid, port) - {victim}
                assert proc.poll() is None
        assert not list(metrics_dir.glob(f"gauge_livesum_{victim}.db"))  # dropped by the supervisor
        serving = [psutil.Process(pid) for pid in replaced]
    assert proc.returncode == 0  # SIGTERM: the workers stopped (gracefully) before the supervisor returned
    assert not any(p.is_running() for p in serving)


def test_workers_refuse_a_port_taken_and_stop_when_one_cannot_start(cluster, tmp_path):
    env = {**os.environ, "RECSYS_STATE_BACKEND": "redis", "RECSYS_REDIS_URL": cluster.redis_url, "RECSYS_LOG_LEVEL": "WARNING"}
    port = free_port()
    with socket.create_server(("127.0.0.1", port)):  # another server there: its port is not joined
        run = subprocess.run([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
                             env={**env, "RECSYS_BUNDLE_DIR": str(cluster.bundle)}, capture_output=True, text=True, timeout=60)
    assert run.returncode == 3 and f"cannot listen on 127.0.0.1:{port}" in run.stderr, run.stderr
    run = subprocess.run([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(free_port()), "--workers", "2"],
                         env={**env, "RECSYS_BUNDLE_DIR": str(tmp_path / "nothing")}, capture_output=True, text=True, timeout=120)
    assert run.returncode == 3 and "failed to start: stopping" in run.stderr and "no bundle here" in run.stderr, run.stderr
    run = subprocess.run([sys.executable, "-m", "service", "--port", "0", "--workers", "2"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2 and "need a fixed port" in run.stderr, run.stderr


def test_several_workers_refuse_the_file_backend():
    env = {**os.environ, "RECSYS_STATE_BACKEND": "file"}
    run = subprocess.run([sys.executable, "-m", "service", "--workers", "2"], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "RECSYS_STATE_BACKEND=redis" in run.stderr
