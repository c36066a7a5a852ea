"""Several uvicorn worker processes on one port, each accepting from a listening socket of its own.

uvicorn's own ``--workers`` binds one socket in its supervisor and every worker accepts from it: the worker that
wakes first accepts every connection waiting, and a keep-alive connection stays with the worker that accepted it.
A client that opens its connections at once (a proxy's upstream pool, a load generator) could so land all of them
on one worker while the other idled: measured with ``wrk -c16`` on 2 cores, 16/0 to 9/7 splits from one run to the
next, 610 to 1,550 requests/s for the same build. Here each worker binds its own socket with ``SO_REUSEPORT``
and the kernel spreads new connections over the sockets of the port by a hash of their addresses.

A worker that dies is started again; its socket closes with it, so meanwhile new connections go to the others.
A worker that fails before it serves (a bad bundle or setting, the port taken) stops them all: every restart
would fail the same way. SIGINT or SIGTERM stops the workers gracefully (each finishes its requests).

Linux only: elsewhere ``SO_REUSEPORT`` does not spread connections, and ``python -m service`` runs uvicorn's own
supervisor.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

APP = "service.app:app"
STARTUP_FAILURE = 3  # uvicorn's exit status for a worker whose lifespan startup failed
STOP_TIMEOUT_S = 30.0  # how long stopping waits for a worker to finish its requests before killing it
RESTART_PAUSE_S = 1.0  # between a worker's death and its replacement (no tight loop of crashes)


def supported() -> bool:
    return sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")


def listener(host: str, port: int, shared: bool = True) -> socket.socket:
    """A socket bound to ``host:port``, in the port's ``SO_REUSEPORT`` group when ``shared`` (listening starts in
    uvicorn). Made with ``IPPROTO_TCP`` named: the event loop sets ``TCP_NODELAY`` on accepted sockets only when
    their protocol says TCP, and without it a keep-alive response's second write waits for the client's delayed
    ACK."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (connections in TIME_WAIT do not hold the port)
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _worker(host: str, port: int, options: dict[str, Any]) -> None:
    """One worker process: its own socket, then uvicorn serving the app on it until told to stop."""
    import uvicorn

    config = uvicorn.Config(APP, **options)  # (configures logging in this process)
    try:
        sock = listener(host, port)
    except OSError as err:
        print(f"error: cannot listen on {host}:{port}: {err}", file=sys.stderr)
        sys.exit(STARTUP_FAILURE)
    uvicorn.Server(config).run(sockets=[sock])


class Workers:
    """The supervisor: starts ``count`` workers, replaces any that dies, stops them all on SIGINT / SIGTERM."""

    def __init__(self, count: int, host: str, port: int, options: dict[str, Any]):
        if port == 0:
            raise ValueError("several workers need a fixed port: with port 0 each would listen on a port of its own")
        self.count, self.args = count, (host, port, options)
        self.context = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of this one is inherited
        self.stopping = threading.Event()
        self.processes: list[multiprocessing.process.BaseProcess] = []

    def _start(self) -> multiprocessing.process.BaseProcess:
        process = self.context.Process(target=_worker, args=self.args, name="recsys-worker")
        process.start()
        print(f"worker [{process.pid}] started", file=sys.stderr)
        return process

    def run(self) -> int:
        """Serve until a signal stops the workers (0) or one fails at startup (``STARTUP_FAILURE``)."""
        host, port, _ = self.args
        try:  # a socket of another instance's group would let this one join it and share its connections
            listener(host, port, shared=False).close()
        except OSError as err:
            print(f"error: cannot listen on {host}:{port}: {err}", file=sys.stderr)
            return STARTUP_FAILURE
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stopping.set())
        print(f"{self.count} workers on {host}:{port}, a listening socket each", file=sys.stderr)
        self.processes = [self._start() for _ in range(self.count)]
        status = 0
        while not self.stopping.wait(0.2):
            status = self._replace_exited()
        self.stop()
        return status

    def _replace_exited(self) -> int:
        """Start a worker in the place of each that exited, unless it failed at startup (then stop all and return
        ``STARTUP_FAILURE``) or the workers are stopping (a Ctrl-C reaches the workers too)."""
        for i, process in enumerate(self.processes):
            if process.exitcode is None:
                continue
            _forget(process.pid)
            if process.exitcode == STARTUP_FAILURE:
                print(f"worker [{process.pid}] failed to start: stopping", file=sys.stderr)
                self.stopping.set()
                return STARTUP_FAILURE
            if self.stopping.wait(RESTART_PAUSE_S):
                return 0
            print(f"worker [{process.pid}] exited ({process.exitcode}): starting another", file=sys.stderr)
            self.processes[i] = self._start()
        return 0

    def stop(self) -> None:
        """SIGTERM to every worker (uvicorn finishes the requests in flight), SIGKILL to any still running after
        ``STOP_TIMEOUT_S``."""
        for process in self.processes:
            if process.exitcode is None:
                process.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in self.processes:
            process.join(max(deadline - time.monotonic(), 0))
            if process.exitcode is None:
                process.kill()
                process.join()
                _forget(process.pid)


def _forget(pid: int | None) -> None:
    """A worker that died without its lifespan's shutdown (killed, crashed) leaves live gauges behind in the
    metrics directory: drop them, as its own shutdown would have."""
    if pid is not None and "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
