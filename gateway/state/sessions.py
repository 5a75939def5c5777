"""Where browser sessions and pending sign-ins live, so any gateway process can finish a sign-in
another started, and a logout in one process ends the session in all of them.

A pending sign-in is redeemed once: ``take_pending`` reads and deletes it in one step. A session
ended with ``end_session`` is refused by every process within a second. Keys are SHA-256 hashes
of the session id and ``state``: whoever reads the store learns no usable session id.

Backends: ``MemorySessionStore`` (one process), ``SqliteSessionStore`` (worker processes on one
host), ``RedisSessionStore`` in ``gateway.state.redis_state`` (several hosts). A shared backend that
cannot answer raises ``SignalUnavailable``: the caller answers 503 and lets no one in.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from cachetools import TLRUCache

from gateway.state.codec import decode_pending, decode_session, encode_pending, encode_session
from gateway.state.session_records import BrowserSession, PendingLogin
from gateway.state.sqlite_file import SqliteFile

PENDING_LOGINS = 10_000
MAX_SESSIONS = 100_000
PURGE_EVERY = 100  # SQLite: expired rows go, and the tables are cut to size, every this many writes


class SessionStore(Protocol):
    async def put_pending(self, state: str, login: PendingLogin, ttl_seconds: int) -> None: ...

    async def take_pending(self, state: str) -> PendingLogin | None:
        """The pending sign-in, removed in the same step: a callback is redeemed once."""
        ...

    async def put_session(self, session_id: str, session: BrowserSession, ttl_seconds: int) -> None: ...

    async def get_session(self, session_id: str) -> BrowserSession | None: ...

    async def end_session(self, session_id: str) -> None:
        """Logout or revocation: no process honours the session a second later."""
        ...


def session_key(secret: str) -> str:
    """How a session id or ``state`` is stored and announced: its SHA-256, in hex."""
    return hashlib.sha256(secret.encode()).hexdigest()


def _until(_key: str, value: tuple[object, float], now: float) -> float:
    return now + value[1]


class MemorySessionStore:
    """One process: bounded caches, each entry kept for its own ttl."""

    def __init__(self, *, pending_logins: int = PENDING_LOGINS, max_sessions: int = MAX_SESSIONS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._pending: TLRUCache[str, tuple[PendingLogin, float]] = TLRUCache(pending_logins, _until, clock)
        self._sessions: TLRUCache[str, tuple[BrowserSession, float]] = TLRUCache(max_sessions, _until, clock)

    async def put_pending(self, state: str, login: PendingLogin, ttl_seconds: int) -> None:
        self._pending[session_key(state)] = (login, ttl_seconds)

    async def take_pending(self, state: str) -> PendingLogin | None:
        found = self._pending.pop(session_key(state), None)
        return found[0] if found else None

    async def put_session(self, session_id: str, session: BrowserSession, ttl_seconds: int) -> None:
        self._sessions[session_key(session_id)] = (session, ttl_seconds)

    async def get_session(self, session_id: str) -> BrowserSession | None:
        found = self._sessions.get(session_key(session_id))
        return found[0] if found else None

    async def end_session(self, session_id: str) -> None:
        self._sessions.pop(session_key(session_id), None)


SCHEMA = """
CREATE TABLE IF NOT EXISTS pending_logins (
    key TEXT PRIMARY KEY,                  -- SHA-256 of the OAuth state
    record TEXT NOT NULL,                  -- gateway.state.codec JSON
    expires_at REAL NOT NULL               -- Unix time
);
CREATE TABLE IF NOT EXISTS sessions (
    key TEXT PRIMARY KEY,                  -- SHA-256 of the session id
    record TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS pending_logins_expiry ON pending_logins (expires_at);
CREATE INDEX IF NOT EXISTS sessions_expiry ON sessions (expires_at);
"""
PURGE = (
    "DELETE FROM pending_logins WHERE expires_at <= :now",
    "DELETE FROM sessions WHERE expires_at <= :now",
    "DELETE FROM pending_logins WHERE key IN (SELECT key FROM pending_logins ORDER BY expires_at "
    "LIMIT max(0, (SELECT COUNT(*) FROM pending_logins) - :pending))",
    "DELETE FROM sessions WHERE key IN (SELECT key FROM sessions ORDER BY expires_at "
    "LIMIT max(0, (SELECT COUNT(*) FROM sessions) - :sessions))",
)


class SqliteSessionStore:
    """Worker processes on one host. Every lookup reads the file, so an ended session is refused
    by every process at once; there is no cache to invalidate. Bounded: every ``PURGE_EVERY``
    writes, expired rows go and the sessions closest to expiry make room (so the tables may hold
    up to ``PURGE_EVERY`` rows over their bound)."""

    def __init__(self, path: Path, *, pending_logins: int = PENDING_LOGINS, max_sessions: int = MAX_SESSIONS,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._file = SqliteFile(path, SCHEMA)
        self._bounds = {"pending": pending_logins, "sessions": max_sessions}
        self._clock = clock  # wall time: every process must read the same expiry the same way
        self._writes = 0

    async def put_pending(self, state: str, login: PendingLogin, ttl_seconds: int) -> None:
        await self._put("INSERT OR REPLACE INTO pending_logins VALUES (?, ?, ?)", state, encode_pending(login),
                        ttl_seconds)

    async def take_pending(self, state: str) -> PendingLogin | None:
        now = self._clock()
        row = await self._file.run(lambda db: db.execute(
            "DELETE FROM pending_logins WHERE key = ? RETURNING record, expires_at", (session_key(state),)).fetchone())
        return decode_pending(row[0]) if row is not None and row[1] > now else None

    async def put_session(self, session_id: str, session: BrowserSession, ttl_seconds: int) -> None:
        await self._put("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?)", session_id, encode_session(session),
                        ttl_seconds)

    async def get_session(self, session_id: str) -> BrowserSession | None:
        parameters = (session_key(session_id), self._clock())
        row = await self._file.run(lambda db: db.execute(
            "SELECT record FROM sessions WHERE key = ? AND expires_at > ?", parameters).fetchone())
        return decode_session(row[0]) if row is not None else None

    async def end_session(self, session_id: str) -> None:
        key = session_key(session_id)
        await self._file.run(lambda db: db.execute("DELETE FROM sessions WHERE key = ?", (key,)))

    def close(self) -> None:
        self._file.close()

    async def _put(self, sql: str, secret: str, record: str, ttl_seconds: int) -> None:
        now = self._clock()
        purge = self._writes % PURGE_EVERY == 0
        self._writes += 1

        def write(db: sqlite3.Connection) -> None:
            db.execute(sql, (session_key(secret), record, now + ttl_seconds))
            if purge:
                for statement in PURGE:
                    db.execute(statement, {"now": now, **self._bounds})

        await self._file.run(write)
