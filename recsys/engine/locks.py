"""A readers-writer lock: requests read the live catalogue together, a catalogue change writes it alone."""
from __future__ import annotations

import threading
import time


class ReadWriteLock:
    """Many readers or one writer, in phases. A waiting writer stops new readers (so a steady stream of requests
    cannot starve a change), and the readers it stopped go before the next writer (so a change made in several
    writes cannot starve requests). A thread that already reads may read again without waiting (a request's
    stages nest).

    A patient writer (``writing(patience_s)``) first waits, up to ``patience_s``, for a moment when nobody reads
    or wants to write, without stopping new readers meanwhile: background work (the index merge) then never
    makes a request wait for the requests in flight, only for its own short hold. After ``patience_s`` it
    queues as any writer does, so a busy service cannot starve it."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0  # reading now
        self._writing = False
        self._writers_waiting = 0
        self._patient = 0  # patient writers waiting for a moment with no reader
        self._writes = 0  # writes completed
        self._queued = 0  # readers waiting for the end of the current or next write
        self._admitted = 0  # readers a completed write let in, not yet in
        self._depth = threading.local()

    def reading(self) -> "_Reading":
        return _Reading(self)

    def writing(self, patience_s: float = 0.0) -> "_Writing":
        return _Writing(self, patience_s)

    def _acquire_read(self) -> None:
        depth = getattr(self._depth, "n", 0)
        if not depth:
            with self._cond:
                if self._writing or self._writers_waiting:
                    written, self._queued = self._writes, self._queued + 1
                    while self._writes == written:
                        self._cond.wait()
                    self._admitted -= 1
                self._readers += 1
        self._depth.n = depth + 1

    def _release_read(self) -> None:
        self._depth.n -= 1
        if not self._depth.n:
            with self._cond:
                self._readers -= 1
                if not self._readers and (self._writers_waiting or self._patient):
                    self._cond.notify_all()

    def _acquire_write(self, patience_s: float = 0.0) -> None:
        if getattr(self._depth, "n", 0):
            raise RuntimeError("a catalogue change inside a read of the catalogue would wait for itself")
        with self._cond:
            if patience_s > 0:
                self._wait_for_a_free_moment(time.monotonic() + patience_s)
            self._writers_waiting += 1
            try:
                while self._writing or self._readers or self._admitted:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writing = True

    def _wait_for_a_free_moment(self, deadline: float) -> None:
        """Wait (holding ``_cond``) until nobody reads, writes or waits to write, or until ``deadline``."""
        self._patient += 1
        try:
            while self._writing or self._readers or self._admitted or self._writers_waiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)
        finally:
            self._patient -= 1

    def _release_write(self) -> None:
        with self._cond:
            self._writing = False
            self._writes += 1
            self._admitted, self._queued = self._admitted + self._queued, 0
            self._cond.notify_all()


class _Reading:
    __slots__ = ("lock",)

    def __init__(self, lock: ReadWriteLock):
        self.lock = lock

    def __enter__(self) -> None:
        self.lock._acquire_read()

    def __exit__(self, *exc) -> None:
        self.lock._release_read()


class _Writing:
    __slots__ = ("lock", "patience_s")

    def __init__(self, lock: ReadWriteLock, patience_s: float):
        self.lock, self.patience_s = lock, patience_s

    def __enter__(self) -> None:
        self.lock._acquire_write(self.patience_s)

    def __exit__(self, *exc) -> None:
        self.lock._release_write()
