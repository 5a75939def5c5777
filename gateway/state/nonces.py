"""Nonces a webhook push is accepted under once, whichever process receives it.

``claim`` is True for the first claim of a key until its ttl passes, and atomic across processes:
two receivers of one replayed push cannot both accept it. ``release`` undoes a claim when the push
could not be stored, so the partner's retry is accepted.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from cachetools import TLRUCache

from gateway.state.sqlite_file import SqliteFile

MAX_NONCES = 100_000
PURGE_EVERY = 100


class NonceStore(Protocol):
    async def claim(self, key: str, ttl_seconds: int) -> bool: ...

    async def release(self, key: str) -> None: ...


class MemoryNonces:
    """One process. Bounded: when full, the least recently claimed key goes first."""

    def __init__(self, *, max_nonces: int = MAX_NONCES, clock: Callable[[], float] = time.monotonic) -> None:
        self._seen: TLRUCache[str, float] = TLRUCache(max_nonces, lambda _k, ttl, now: now + ttl, clock)

    async def claim(self, key: str, ttl_seconds: int) -> bool:
        if key in self._seen:
            return False
        self._seen[key] = ttl_seconds
        return True  # no await between the test and the set: atomic within the event loop

    async def release(self, key: str) -> None:
        self._seen.pop(key, None)


SCHEMA = """
CREATE TABLE IF NOT EXISTS nonces (
    key TEXT PRIMARY KEY,
    expires_at REAL NOT NULL               -- Unix time
);
CREATE INDEX IF NOT EXISTS nonces_expiry ON nonces (expires_at);
"""
# One statement, so two processes cannot both see the key free: it inserts, or takes over an
# expired claim, or changes nothing (rowcount 0: already claimed).
CLAIM = ("INSERT INTO nonces VALUES (:key, :expires) ON CONFLICT (key) DO UPDATE SET expires_at = :expires "
         "WHERE nonces.expires_at <= :now")
PURGE = (
    "DELETE FROM nonces WHERE expires_at <= :now",
    "DELETE FROM nonces WHERE key IN (SELECT key FROM nonces ORDER BY expires_at "
    "LIMIT max(0, (SELECT COUNT(*) FROM nonces) - :bound))",
)


class SqliteNonces:
    """Worker processes on one host share the nonces in one SQLite file."""

    def __init__(self, path: Path, *, max_nonces: int = MAX_NONCES, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._file = SqliteFile(path, SCHEMA)
        self._bound = max_nonces
        self._clock = clock
        self._claims = 0

    async def claim(self, key: str, ttl_seconds: int) -> bool:
        now = self._clock()
        purge = self._claims % PURGE_EVERY == 0
        self._claims += 1

        def write(db: sqlite3.Connection) -> bool:
            if purge:
                for statement in PURGE:
                    db.execute(statement, {"now": now, "bound": self._bound})
            return db.execute(CLAIM, {"key": key, "expires": now + ttl_seconds, "now": now}).rowcount == 1

        return await self._file.run(write)

    async def release(self, key: str) -> None:
        await self._file.run(lambda db: db.execute("DELETE FROM nonces WHERE key = ?", (key,)))

    def close(self) -> None:
        self._file.close()
