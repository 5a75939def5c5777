"""The embedded device inventory: one SQLite file with Intune's device fields and, per device,
the last verdict of each MTD vendor. The highest current level wins.

Every write records the device in ``changes``, so a gateway (another process, or the same
one) learns what changed without re-reading everything: ``changes_since(seq)``.
Imports are all-or-nothing: every bad row is reported with its line, and nothing is written.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gateway.config.loader import format_loc, locate, read_yaml
from gateway.errors import ConfigError, ConfigProblem, SignalUnavailable
from gateway.policy.model import DeviceThreatLevel, ManagedDevice
from gateway.signals.devices import DeviceRecord

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,            -- azureADDeviceId, lower case
    record TEXT NOT NULL                   -- the device's Intune fields, as JSON
);
CREATE TABLE IF NOT EXISTS threat_levels (
    device_id TEXT NOT NULL,
    vendor TEXT NOT NULL,
    level TEXT NOT NULL,                   -- secured | low | medium | high
    reported_at TEXT NOT NULL,
    PRIMARY KEY (device_id, vendor)
);
CREATE TABLE IF NOT EXISTS partners (
    vendor TEXT PRIMARY KEY,
    last_contact TEXT NOT NULL             -- last signed push or heartbeat
);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    changed_at TEXT NOT NULL
);
"""
CSV_LIST_FIELDS = ("extensionAttributes",)
EXPORT_FIELDS = (
    "azureADDeviceId", "easDeviceId", "deviceName", "userPrincipalName", "operatingSystem", "osVersion",
    "managedDeviceOwnerType", "managementAgent", "jailBroken", "lastSyncDateTime", "complianceState",
    "complianceGracePeriodExpirationDateTime", "manufacturer", "model", "trustType", "extensionAttributes",
)


class DeviceStore:
    """Synchronous and thread-safe (one connection, one lock); async callers use ``to_thread``."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=5)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def managed_device(self, device_id: str, ignored_vendors: frozenset[str] = frozenset()) -> ManagedDevice | None:
        """The device with the highest current MTD level, leaving out ``ignored_vendors``."""
        key = device_id.lower()
        with self._lock:
            row = self._db.execute("SELECT record FROM devices WHERE device_id = ?", (key,)).fetchone()
            threats = self._db.execute(
                "SELECT vendor, level, reported_at FROM threat_levels WHERE device_id = ?", (key,)).fetchall()
        if row is None:
            return None
        device = DeviceRecord.model_validate_json(row[0]).to_managed_device()
        return _with_threats(device, [t for t in threats if t[0] not in ignored_vendors])

    def replace_all(self, records: Iterable[DeviceRecord], *, now: datetime, prune: bool = False) -> int:
        """Import: upsert every record in one transaction (vendors' threat levels included);
        with ``prune``, devices not in ``records`` are removed (a full sync)."""
        rows = list(records)
        with self._lock, self._transaction():
            for record in rows:
                self._upsert(record, now)
            if prune:
                keep = {r.azure_ad_device_id.lower() for r in rows}
                gone = [d for (d,) in self._db.execute("SELECT device_id FROM devices") if d not in keep]
                for device_id in gone:
                    self._db.execute("DELETE FROM devices WHERE device_id = ?", (device_id,))
                    self._db.execute("DELETE FROM threat_levels WHERE device_id = ?", (device_id,))
                    self._changed(device_id, now)
        return len(rows)

    def upsert(self, record: DeviceRecord, *, now: datetime) -> None:
        with self._lock, self._transaction():
            self._upsert(record, now)

    def set_threat_level(self, device_id: str, vendor: str, level: DeviceThreatLevel, *, now: datetime) -> bool:
        """Record a vendor's verdict; False if the device is not in the inventory."""
        key = device_id.lower()
        with self._lock, self._transaction():
            if self._db.execute("SELECT 1 FROM devices WHERE device_id = ?", (key,)).fetchone() is None:
                return False
            self._db.execute("INSERT OR REPLACE INTO threat_levels VALUES (?, ?, ?, ?)",
                             (key, vendor, level.value, now.isoformat()))
            self._changed(key, now)
        return True

    def clear_threat_level(self, device_id: str, vendor: str, *, now: datetime) -> bool:
        key = device_id.lower()
        with self._lock, self._transaction():
            if self._db.execute("SELECT 1 FROM devices WHERE device_id = ?", (key,)).fetchone() is None:
                return False
            self._db.execute("DELETE FROM threat_levels WHERE device_id = ? AND vendor = ?", (key, vendor))
            self._changed(key, now)
        return True

    def partner_contact(self, vendor: str, *, now: datetime) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO partners VALUES (?, ?)", (vendor, now.isoformat()))

    def partner_contacts(self) -> dict[str, datetime]:
        """When each partner was last heard from: a signed push, a heartbeat, or its newest verdict
        (imported or synced verdicts carry their report time)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT vendor, MAX(at) FROM (SELECT vendor, last_contact AS at FROM partners "
                "UNION ALL SELECT vendor, reported_at AS at FROM threat_levels) GROUP BY vendor").fetchall()
        return {vendor: datetime.fromisoformat(at) for vendor, at in rows}

    def records(self) -> Iterator[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT record FROM devices ORDER BY device_id").fetchall()
        for (record,) in rows:
            yield json.loads(record)

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM devices").fetchone()[0])

    def data_version(self) -> int:
        """Changes when another connection (the CLI, another worker) commits: cheap to ask often."""
        with self._lock:
            return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def last_change(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0])

    def changes_since(self, seq: int) -> tuple[int, set[str]]:
        with self._lock:
            rows = self._db.execute("SELECT seq, device_id FROM changes WHERE seq > ?", (seq,)).fetchall()
        if not rows:
            return seq, set()
        return max(r[0] for r in rows), {r[1] for r in rows}

    def _upsert(self, record: DeviceRecord, now: datetime) -> None:
        key = record.azure_ad_device_id.lower()
        fields = record.model_dump(mode="json", by_alias=True, exclude_none=True,
                                   exclude={"threat_level", "threat_source", "threat_reported_date_time"})
        self._db.execute("INSERT OR REPLACE INTO devices VALUES (?, ?)", (key, json.dumps(fields)))
        if record.threat_level is not None:
            reported = record.threat_reported_date_time or now
            self._db.execute("INSERT OR REPLACE INTO threat_levels VALUES (?, ?, ?, ?)",
                             (key, record.threat_source or "inventory", record.threat_level.value,
                              reported.isoformat()))
        self._changed(key, now)

    def _changed(self, key: str, now: datetime) -> None:
        self._db.execute("INSERT INTO changes (device_id, changed_at) VALUES (?, ?)", (key, now.isoformat()))

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *_: object) -> None:
        self.db.execute("ROLLBACK" if kind is not None else "COMMIT")


def _with_threats(device: ManagedDevice, threats: list[tuple[str, str, str]]) -> ManagedDevice:
    """Several MTD vendors may report on one device: the highest level wins."""
    if not threats:
        return device
    vendor, level, reported = max(threats, key=lambda t: DeviceThreatLevel(t[1]).rank)
    return replace(device, threat_level=DeviceThreatLevel(level), threat_source=vendor,
                   threat_reported_at=datetime.fromisoformat(reported))


def parse_import(path: Path) -> list[DeviceRecord]:
    """Read a CSV or JSON (or YAML) export; raises ConfigError listing every bad row by line."""
    if path.suffix.lower() == ".csv":
        return _parse_csv(path)
    data, problems = read_yaml(path, str(path))  # JSON is YAML: ruamel keeps every item's line
    if problems:
        raise ConfigError(problems)
    items = data.get("value", data.get("devices")) if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ConfigError([ConfigProblem(str(path), 1, 1, "", "expected a list of devices, "
                                         "or an object with 'devices' or Graph's 'value'")])
    records, problems = [], []
    for index, item in enumerate(items):
        try:
            records.append(DeviceRecord.model_validate_json(json.dumps(_plain(item)), strict=True))
        except ValidationError as error:
            for e in error.errors():
                loc = (*(["value"] if isinstance(data, dict) and "value" in data else
                         ["devices"] if isinstance(data, dict) else []), index, *e["loc"])
                problems.append(locate(data, loc, str(path), e["msg"]))
    _raise(problems)
    return records


def _parse_csv(path: Path) -> list[DeviceRecord]:
    text = path.read_text(encoding="utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    records, problems = [], []
    for row in reader:
        line = reader.line_num
        try:
            item = {k: _csv_value(k, v) for k, v in row.items() if k and v not in (None, "")}
            records.append(DeviceRecord.model_validate_json(json.dumps(item), strict=True))
        except (ValidationError, ValueError) as error:
            details = error.errors() if isinstance(error, ValidationError) else [{"loc": (), "msg": str(error)}]
            problems += [ConfigProblem(str(path), line, None, format_loc(tuple(e["loc"])), e["msg"]) for e in details]
    _raise(problems)
    return records


def _csv_value(key: str, value: str) -> object:
    if key == "jailBroken":
        if value.lower() not in ("true", "false"):
            raise ValueError(f"jailBroken: {value!r} is not true or false")
        return value.lower() == "true"
    if key in CSV_LIST_FIELDS:
        try:
            return json.loads(value)
        except ValueError:
            raise ValueError(f"{key}: {value!r} is not JSON") from None
    return value


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    if isinstance(node, datetime):
        return node.isoformat()
    return node


def _raise(problems: list[ConfigProblem]) -> None:
    if problems:
        raise ConfigError(problems)


def export(store: DeviceStore, fmt: str) -> str:
    records = list(store.records())
    if fmt == "json":
        return json.dumps({"devices": records}, indent=2)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=EXPORT_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for record in records:
        writer.writerow({k: json.dumps(v) if k in CSV_LIST_FIELDS else str(v).lower() if isinstance(v, bool) else v
                         for k, v in record.items()})
    return out.getvalue()


class SqliteInventory:
    """The store as an async ``DeviceInventory``: lookups run in a worker thread. Verdicts of an
    MTD partner not heard from for its ``unresponsive_after`` are left out."""

    name = "sqlite"

    def __init__(self, store: DeviceStore, unresponsive_after: Mapping[str, timedelta] | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.store = store
        self._unresponsive_after = dict(unresponsive_after or {})
        self._clock = clock

    def ignored_vendors(self) -> frozenset[str]:
        if not self._unresponsive_after:
            return frozenset()
        contacts, now = self.store.partner_contacts(), self._clock()
        return frozenset(vendor for vendor, limit in self._unresponsive_after.items()
                         if vendor not in contacts or now - contacts[vendor] > limit)

    async def managed_device(self, device_id: str) -> ManagedDevice | None:
        try:
            return await asyncio.to_thread(self._lookup, device_id)
        except sqlite3.Error as error:
            raise SignalUnavailable(f"device inventory {self.store.path}: {error}") from error

    def _lookup(self, device_id: str) -> ManagedDevice | None:
        return self.store.managed_device(device_id, self.ignored_vendors())
