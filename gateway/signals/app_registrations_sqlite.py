"""App protection registrations in the device store's SQLite file (its own tables), so the
embedded gateway keeps one database. Every write records the users it changed in
``app_changes``: the change feed polls it as it polls the devices' log, and continuous access
evaluation decides those users' open flows again."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path

from gateway.errors import SignalUnavailable
from gateway.policy.model import AppRegistration
from gateway.signals.app_protection import (
    REGISTRATIONS_MAX,
    AppRegistrationStore,
    changed_users,
    registration_from_json,
    registration_json,
)
from gateway.signals.sqlite_store import WalConnections

SCHEMA = """
CREATE TABLE IF NOT EXISTS app_registrations (
    registration_id TEXT PRIMARY KEY,      -- Graph's id, lower case
    app_identifier TEXT NOT NULL,          -- bundleId or packageId, lower case
    user_id TEXT,                          -- Entra object id, lower case
    user_principal_name TEXT,              -- lower case
    record TEXT NOT NULL                   -- the registration in Graph's fields, as JSON
);
CREATE INDEX IF NOT EXISTS app_registrations_by_user_id ON app_registrations (user_id, app_identifier)
    WHERE user_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS app_registrations_by_upn ON app_registrations (user_principal_name, app_identifier)
    WHERE user_principal_name IS NOT NULL;
CREATE TABLE IF NOT EXISTS app_changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    user_key TEXT NOT NULL,                -- an object id or UPN whose registrations changed
    changed_at TEXT NOT NULL
);
"""
CHANGES_KEPT = 100_000


class SqliteAppRegistrations(WalConnections, AppRegistrationStore):
    """One writer and one reader connection (WAL: a long sync never holds up a lookup)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, SCHEMA)

    def registrations_for(self, user_keys: Iterable[str], app_identifiers: Iterable[str]) -> list[AppRegistration]:
        users, apps = sorted(set(user_keys)), sorted(set(app_identifiers))
        if not users or not apps:
            return []
        marks_users, marks_apps = ",".join("?" * len(users)), ",".join("?" * len(apps))
        rows = self._read(
            f"SELECT registration_id, record FROM app_registrations WHERE app_identifier IN ({marks_apps}) "  # noqa: S608
            f"AND (user_id IN ({marks_users}) OR (user_id IS NULL AND user_principal_name IN ({marks_users}))) "
            f"ORDER BY registration_id LIMIT {REGISTRATIONS_MAX}", (*apps, *users, *users))
        return [self._registration(registration_id, record) for registration_id, record in rows]

    def _registration(self, registration_id: str, record: str) -> AppRegistration:
        try:
            return registration_from_json(record)
        except ValueError as error:  # a row written by something else: this lookup cannot be answered
            raise SignalUnavailable(f"app registrations {self.path}: {registration_id} is unreadable") from error

    def registrations(self) -> Iterator[AppRegistration]:
        rows = self._read("SELECT registration_id, record FROM app_registrations ORDER BY registration_id")
        return iter([self._registration(i, record) for i, record in rows])

    def registration(self, registration_id: str) -> AppRegistration | None:
        rows = self._read("SELECT registration_id, record FROM app_registrations WHERE registration_id = ?",
                          (registration_id.lower(),))
        return self._registration(*rows[0]) if rows else None

    def count(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM app_registrations")[0][0])

    def replace_all(self, registrations: Iterable[AppRegistration], *, now: datetime, prune: bool = False) -> int:
        given = {r.registration_id: r for r in registrations}
        with self._write_lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                changed: set[str] = set()
                if prune and given:
                    gone = self._db.execute("SELECT registration_id, record FROM app_registrations").fetchall()
                    stale = [(i, record) for i, record in gone if i not in given]
                    for registration_id, _ in stale:
                        self._db.execute("DELETE FROM app_registrations WHERE registration_id = ?", (registration_id,))
                    changed |= {k for _, record in stale for k in _row_users(record)}
                for registration in given.values():
                    old = self._db.execute("SELECT record FROM app_registrations WHERE registration_id = ?",
                                           (registration.registration_id,)).fetchone()
                    row = _json(registration)
                    if old is not None and old[0] == row:
                        continue  # unchanged: no change event for it (a full sync rewrites every row)
                    changed |= changed_users([registration]) | (_row_users(old[0]) if old else set())
                    self._db.execute("INSERT OR REPLACE INTO app_registrations VALUES (?, ?, ?, ?, ?)",
                                     (registration.registration_id, registration.app_identifier, registration.user_id,
                                      registration.user_principal_name, row))
                self._changed(changed, now)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return len(given)

    def remove(self, registration_ids: Iterable[str], *, now: datetime) -> set[str]:
        removed: set[str] = set()
        with self._write_lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                changed: set[str] = set()
                for registration_id in {i.lower() for i in registration_ids}:
                    row = self._db.execute("SELECT record FROM app_registrations WHERE registration_id = ?",
                                           (registration_id,)).fetchone()
                    if row is None:
                        continue
                    self._db.execute("DELETE FROM app_registrations WHERE registration_id = ?", (registration_id,))
                    removed.add(registration_id)
                    changed |= _row_users(row[0])
                self._changed(changed, now)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return removed

    def _changed(self, users: set[str], now: datetime) -> None:
        self._db.executemany("INSERT INTO app_changes (user_key, changed_at) VALUES (?, ?)",
                             [(user, now.isoformat()) for user in sorted(users)])
        if users:
            self._db.execute("DELETE FROM app_changes WHERE seq <= (SELECT MAX(seq) FROM app_changes) - ?",
                             (CHANGES_KEPT,))

    def data_version(self) -> int:
        return int(self._read("PRAGMA data_version")[0][0])

    def last_change(self) -> int:
        return int(self._read("SELECT COALESCE(MAX(seq), 0) FROM app_changes")[0][0])

    def changes_since(self, seq: int) -> tuple[int, set[str], bool]:
        """The user keys changed after ``seq``, the new position, and whether the log still held
        everything since ``seq`` (if not, every user's flows are decided again)."""
        rows = self._read("SELECT seq, user_key FROM app_changes WHERE seq > ?", (seq,))
        oldest = self._read("SELECT COALESCE(MIN(seq), 0) FROM app_changes")[0][0]
        complete = seq == 0 or oldest <= seq + 1
        if not rows:
            return seq, set(), complete
        return max(r[0] for r in rows), {r[1] for r in rows}, complete


def _json(registration: AppRegistration) -> str:
    return json.dumps(registration_json(registration), sort_keys=True)


def _row_users(record: str) -> set[str]:
    try:
        return changed_users([registration_from_json(record)])
    except ValueError:
        return set()
