"""Append-only JSON-lines logs: an event or catalogue change is acknowledged only once fsynced.

At start-up (and on reload) the logs are replayed onto the freshly loaded bundle, so online
state survives restarts. The trainer never reads these logs: replaying all of them onto a
newer bundle is correct; rotate the state directory if you fold the events into training data.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import orjson
from loguru import logger


class DurableLog:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.lock = threading.Lock()
        _drop_torn_tail(path)
        self._file = open(path, "ab")

    def append(self, record: dict) -> None:
        """Write, flush and fsync one record; returns only once it is on disk."""
        line = orjson.dumps(record) + b"\n"
        with self.lock:
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())

    def read(self) -> list[dict]:
        """Every complete record; a torn final line (a crash mid-write, never acknowledged) is ignored."""
        if not self.path.exists():
            return []
        records = []
        for n, line in enumerate(self.path.read_bytes().splitlines(), start=1):
            try:
                records.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                logger.warning("{} line {}: unreadable record skipped (torn write?)", self.path, n)
        return records

    def close(self) -> None:
        self._file.close()


def _drop_torn_tail(path: Path) -> None:
    """Cut a final line that lacks its newline (a crash mid-write, never acknowledged), so the next
    record starts on a line of its own instead of being glued to the fragment and lost with it."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        logger.warning("{}: dropping a torn final record ({} bytes)", path, len(data) - data.rfind(b"\n") - 1)
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
            os.fsync(f.fileno())
