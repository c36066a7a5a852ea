"""A readers-writer lock: requests read the live catalogue together, a catalogue change writes it alone."""
from __future__ import annotations

import threading


class ReadWriteLock:
    """Many readers or one writer. A waiting writer stops new readers (so a steady stream of requests cannot
    starve a change), and a thread that already reads may read again without waiting (a request's stages nest)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0
        self._depth = threading.local()

    def reading(self) -> "_Reading":
        return _Reading(self)

    def writing(self) -> "_Writing":
        return _Writing(self)

    def _acquire_read(self) -> None:
        depth = getattr(self._depth, "n", 0)
        if not depth:
            with self._cond:
                while self._writing or self._writers_waiting:
                    self._cond.wait()
                self._readers += 1
        self._depth.n = depth + 1

    def _release_read(self) -> None:
        self._depth.n -= 1
        if not self._depth.n:
            with self._cond:
                self._readers -= 1
                if not self._readers and self._writers_waiting:
                    self._cond.notify_all()

    def _acquire_write(self) -> None:
        if getattr(self._depth, "n", 0):
            raise RuntimeError("a catalogue change inside a read of the catalogue would wait for itself")
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writing or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writing = True

    def _release_write(self) -> None:
        with self._cond:
            self._writing = False
            self._cond.notify_all()


class _Reading:
    __slots__ = ("lock",)

    def __init__(self, lock: ReadWriteLock):
        self.lock = lock

    def __enter__(self) -> None:
        self.lock._acquire_read()

    def __exit__(self, *exc) -> None:
        self.lock._release_read()


class _Writing(_Reading):
    __slots__ = ()

    def __enter__(self) -> None:
        self.lock._acquire_write()

    def __exit__(self, *exc) -> None:
        self.lock._release_write()
