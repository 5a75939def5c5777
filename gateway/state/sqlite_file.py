"""One SQLite file that the gateway's worker processes on one host share.

Created readable by its owner only (its rows let a reader follow who signed in), in WAL mode so
readers never wait for a writer. Each call runs in a worker thread, one at a time per instance;
SQLite's own locking orders writes between processes. An SQLite error is ``SignalUnavailable``:
the caller answers 503 rather than guess.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

from gateway.errors import SignalUnavailable
from gateway.state_files import warn_if_readable_by_others

BUSY_TIMEOUT_SECONDS = 5.0


class SqliteFile:
    def __init__(self, path: Path, schema: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))  # SQLite gives -wal and -shm the same mode
        warn_if_readable_by_others(path)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                   timeout=BUSY_TIMEOUT_SECONDS)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL stays consistent; a power cut may lose the last writes
        self._db.executescript(schema)

    async def run[T](self, work: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.to_thread(self.call, work)

    def call[T](self, work: Callable[[sqlite3.Connection], T]) -> T:
        try:
            with self._lock:
                return work(self._db)
        except sqlite3.Error as error:
            raise SignalUnavailable(f"shared state {self.path}: {error}") from error

    def close(self) -> None:
        with self._lock:
            self._db.close()
