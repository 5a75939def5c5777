"""The embedded device inventory: one SQLite file with Intune's device fields and, per device,
the last verdict of each MTD partner. The highest current level wins.

Every write records the device in ``changes``, so a gateway (another process, or the same
one) learns what changed without re-reading everything: ``changes_since(seq)``.
Imports are all-or-nothing: every bad row is reported with its line, and nothing is written.

A partner's verdicts (``apply_verdicts``) are ordered by the time they were reported: one older
than the newest verdict or clear of that partner already stored for the device is ignored, so a
delayed or retried push cannot undo a newer one (an old "low" arriving after a "high").
``verdict_times`` keeps that newest time, clears included; verdicts of the same time apply in the
order received.

The ``vendor`` columns hold the partner: that is their name in the files already written, and
renaming them would mean migrating every file, which gateways of two versions may share during an
upgrade.

A device certificate may name its device by ``intuneDeviceId`` or ``serialNumber`` instead:
``device_ids_for`` finds them through expression indexes on the record's JSON. SQLite keeps those
in step with every write, an older gateway's sharing the file included (no column of theirs
changes), and ``CREATE INDEX IF NOT EXISTS`` builds them from the rows of a file written before
them when a gateway of this version first opens it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from gateway.config.loader import format_loc, locate, plain, read_yaml
from gateway.errors import ConfigError, ConfigProblem, SignalUnavailable
from gateway.http import strict_json
from gateway.policy.model import DeviceKey, DeviceThreatLevel, ManagedDevice
from gateway.signals.devices import MATCHES_MAX, DeviceRecord, KeysSeen, normalised
from gateway.signals.store import DeviceStore, micros, with_threats

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,            -- azureADDeviceId, lower case
    record TEXT NOT NULL                   -- the device's Intune fields, as JSON
);
CREATE TABLE IF NOT EXISTS threat_levels (
    device_id TEXT NOT NULL,
    vendor TEXT NOT NULL,                  -- the partner (see the module's docstring)
    level TEXT NOT NULL,                   -- secured | low | medium | high
    reported_at TEXT NOT NULL,
    PRIMARY KEY (device_id, vendor)
);
CREATE TABLE IF NOT EXISTS partners (
    vendor TEXT PRIMARY KEY,
    last_contact TEXT NOT NULL             -- last signed push or heartbeat
);
CREATE TABLE IF NOT EXISTS verdict_times (
    device_id TEXT NOT NULL,
    vendor TEXT NOT NULL,
    reported_us INTEGER NOT NULL,          -- the newest verdict or clear applied, microseconds since 1970
    PRIMARY KEY (device_id, vendor)
);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    changed_at TEXT NOT NULL
);
"""


def _key_in_record(key: DeviceKey) -> str:
    """A key as its index holds it: NULL in a row that is no JSON (written by something else; reading
    that device is unavailable), which must not make every later write, or the upgrade, fail."""
    return f"(CASE WHEN json_valid(record) THEN json_extract(record, '$.{key.value}') END)"


KEY_INDEXES = {DeviceKey.intune_device_id: "devices_by_intune_device_id",
               DeviceKey.serial_number: "devices_by_serial_number"}
SCHEMA += "".join(f"CREATE INDEX IF NOT EXISTS {name} ON devices {_key_in_record(key)} "
                  f"WHERE {_key_in_record(key)} IS NOT NULL;\n" for key, name in KEY_INDEXES.items())
# the devices a key names; the expressions are the indexes' own, so the lookup is a search of one
DEVICES_BY_KEY = {
    DeviceKey.azure_ad_device_id: "SELECT device_id FROM devices WHERE device_id = ?",
    **{key: f"SELECT device_id FROM devices WHERE {_key_in_record(key)} = ? ORDER BY device_id "  # noqa: S608
            f"LIMIT {MATCHES_MAX}" for key in KEY_INDEXES},
}
CSV_LIST_FIELDS = ("extensionAttributes",)
EXPORT_FIELDS = (
    "azureADDeviceId", "easDeviceId", "deviceName", "userPrincipalName", "operatingSystem", "osVersion",
    "managedDeviceOwnerType", "managementAgent", "jailBroken", "lastSyncDateTime", "complianceState",
    "complianceGracePeriodExpirationDateTime", "manufacturer", "model", "trustType", "extensionAttributes",
    "intuneDeviceId", "serialNumber",
)


DEVICE_LIST = TypeAdapter(list[DeviceRecord])
CHANGES_KEPT = 100_000  # a reader further behind than this re-reads everything (``changes_since``)
PARTNER_CONTACT = ("INSERT INTO partners VALUES (?, ?) ON CONFLICT (vendor) DO UPDATE "
                   "SET last_contact = MAX(last_contact, excluded.last_contact)")  # UTC ISO times sort as text

logger = logging.getLogger(__name__)


class WalConnections:
    """Writes go through one connection, reads through another: in WAL mode a long write (a full
    sync) never holds up lookups or the change check made before every request."""

    def __init__(self, path: Path, schema: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.location = path, str(path)
        self._write_lock, self._read_lock = threading.Lock(), threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=5)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(schema)
        self._reader = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=5)

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            self._db.close()
            self._reader.close()

    def _read(self, sql: str, parameters: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        with self._read_lock:
            return self._reader.execute(sql, parameters).fetchall()


class SqliteDeviceStore(WalConnections, DeviceStore):
    """The device store in SQLite (``WalConnections``). Async callers use ``to_thread`` for
    anything but ``data_version``/``changes_since``."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, SCHEMA)

    def managed_device(self, device_id: str, ignored_partners: frozenset[str] = frozenset()) -> ManagedDevice | None:
        key = device_id.lower()
        with self._read_lock:
            self._reader.execute("BEGIN")  # one snapshot for the record and its verdicts
            try:
                row = self._reader.execute("SELECT record FROM devices WHERE device_id = ?", (key,)).fetchone()
                threats = self._reader.execute(
                    "SELECT vendor, level, reported_at FROM threat_levels WHERE device_id = ?", (key,)).fetchall()
            finally:
                self._reader.execute("COMMIT")
        if row is None:
            return None
        try:
            device = DeviceRecord.model_validate_json(row[0]).to_managed_device()
            return with_threats(device, [t for t in threats if t[0] not in ignored_partners])
        except ValueError as error:  # pydantic's ValidationError included: a row written by something else
            raise SignalUnavailable(f"device inventory {self.path}: device {key} is unreadable") from error

    def device_ids_for(self, key: DeviceKey, value: str) -> list[str]:
        return [device_id for (device_id,) in self._read(DEVICES_BY_KEY[key], (normalised(key, value),))]

    def replace_all(self, records: Iterable[DeviceRecord], *, now: datetime, prune_partner: str | None = None,
                    seed: bool = False) -> int:
        """In one transaction."""
        rows = list(records)
        with self._write_lock, self._transaction():
            for record in rows:
                self._upsert(record, now, clear_partner=prune_partner, seed=seed)
            if prune_partner is not None and rows:
                keep = {r.azure_ad_device_id.lower() for r in rows}
                gone = [d for (d,) in self._db.execute("SELECT device_id FROM devices") if d not in keep]
                for device_id in gone:
                    self._db.execute("DELETE FROM devices WHERE device_id = ?", (device_id,))
                    self._db.execute("DELETE FROM threat_levels WHERE device_id = ? AND vendor = ?",
                                     (device_id, prune_partner))
                    self._changed(device_id, now)
            self._trim_changes()
        return len(rows)

    def upsert(self, record: DeviceRecord, *, now: datetime, clear_partner: str | None = None) -> None:
        with self._write_lock, self._transaction():
            self._upsert(record, now, clear_partner=clear_partner, seed=False)

    def remove(self, device_ids: Iterable[str], *, now: datetime) -> set[str]:
        """In one transaction."""
        removed = set()
        with self._write_lock, self._transaction():
            for key in {d.lower() for d in device_ids}:
                deleted = sum(self._db.execute(statement, (key,)).rowcount for statement in (
                    "DELETE FROM devices WHERE device_id = ?", "DELETE FROM threat_levels WHERE device_id = ?",
                    "DELETE FROM verdict_times WHERE device_id = ?"))
                if deleted:
                    removed.add(key)
                    self._changed(key, now)
            self._trim_changes()
        return removed

    def apply_verdicts(self, partner: str, verdicts: Iterable[tuple[str, DeviceThreatLevel | None]], *,
                       now: datetime) -> tuple[set[str], list[str]]:
        """In one transaction."""
        changed, unknown = set(), []
        at = micros(now)
        with self._write_lock, self._transaction():
            for device_id, level in verdicts:
                key = device_id.lower()
                if self._db.execute("SELECT 1 FROM devices WHERE device_id = ?", (key,)).fetchone() is None:
                    unknown.append(device_id)
                    continue
                if self._newest_verdict(key, partner) > at:
                    logger.info("verdict of %s for %s reported at %s ignored: a newer one is stored", partner, key,
                                now.isoformat())
                    continue
                if level is None:
                    self._db.execute("DELETE FROM threat_levels WHERE device_id = ? AND vendor = ?", (key, partner))
                else:
                    self._db.execute("INSERT OR REPLACE INTO threat_levels VALUES (?, ?, ?, ?)",
                                     (key, partner, level.value, now.isoformat()))
                self._db.execute("INSERT OR REPLACE INTO verdict_times VALUES (?, ?, ?)", (key, partner, at))
                self._changed(key, now)
                changed.add(key)
            self._db.execute(PARTNER_CONTACT, (partner, now.isoformat()))
            self._trim_changes()
        return changed, unknown

    def _newest_verdict(self, key: str, partner: str) -> int:
        """When the newest verdict (or clear) of ``partner`` stored for ``key`` was reported, in µs; -1 for none."""
        times = [row[0] for row in self._db.execute(
            "SELECT reported_us FROM verdict_times WHERE device_id = ? AND vendor = ?", (key, partner))]
        times += [micros(datetime.fromisoformat(row[0])) for row in self._db.execute(
            "SELECT reported_at FROM threat_levels WHERE device_id = ? AND vendor = ?", (key, partner))]
        return max(times, default=-1)

    def partner_contact(self, partner: str, *, now: datetime) -> None:
        with self._write_lock:
            self._db.execute(PARTNER_CONTACT, (partner, now.isoformat()))

    def partner_contacts(self) -> dict[str, datetime]:
        rows = self._read("SELECT vendor, MAX(at) FROM (SELECT vendor, last_contact AS at FROM partners "
                          "UNION ALL SELECT vendor, reported_at AS at FROM threat_levels) GROUP BY vendor")
        return {partner: datetime.fromisoformat(at) for partner, at in rows}

    def records(self) -> Iterator[dict[str, Any]]:
        for (record,) in self._read("SELECT record FROM devices ORDER BY device_id"):
            yield json.loads(record)

    def count(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM devices")[0][0])

    def data_version(self) -> int:
        """Changes whenever any other connection commits, the gateway's own writer included:
        cheap enough to ask before every request."""
        return int(self._read("PRAGMA data_version")[0][0])

    def last_change(self) -> int:
        return int(self._read("SELECT COALESCE(MAX(seq), 0) FROM changes")[0][0])

    def changes_since(self, seq: int) -> tuple[int, set[str], bool]:
        """The devices changed after ``seq``, the new position, and whether the log still held
        everything since ``seq`` (if not, the caller must treat every device as changed)."""
        rows = self._read("SELECT seq, device_id FROM changes WHERE seq > ?", (seq,))
        oldest = self._read("SELECT COALESCE(MIN(seq), 0) FROM changes")[0][0]
        complete = seq == 0 or oldest <= seq + 1
        if not rows:
            return seq, set(), complete
        return max(r[0] for r in rows), {r[1] for r in rows}, complete

    def _upsert(self, record: DeviceRecord, now: datetime, *, clear_partner: str | None, seed: bool) -> None:
        key = record.azure_ad_device_id.lower()
        fields = record.model_dump_json(by_alias=True, exclude_none=True,
                                        exclude={"threat_level", "threat_source", "threat_reported_date_time"})
        self._db.execute("INSERT OR REPLACE INTO devices VALUES (?, ?)", (key, fields))
        partner = record.threat_source or clear_partner or "inventory"
        if record.threat_level is not None:
            reported = (record.threat_reported_date_time or now).isoformat()
            if seed and record.threat_reported_date_time is None:
                sql = "INSERT OR IGNORE INTO threat_levels VALUES (?, ?, ?, ?)"  # never over a live verdict
            else:
                sql = ("INSERT INTO threat_levels VALUES (?, ?, ?, ?) ON CONFLICT (device_id, vendor) DO UPDATE "
                       "SET level = excluded.level, reported_at = excluded.reported_at "
                       "WHERE excluded.reported_at >= threat_levels.reported_at OR ?")
                self._db.execute(sql, (key, partner, record.threat_level.value, reported, not seed))
                self._changed(key, now)
                return
            self._db.execute(sql, (key, partner, record.threat_level.value, reported))
        elif clear_partner is not None:  # the source reports no level any more: its old verdict goes
            self._db.execute("DELETE FROM threat_levels WHERE device_id = ? AND vendor = ?", (key, clear_partner))
        self._changed(key, now)

    def _changed(self, key: str, now: datetime) -> None:
        self._db.execute("INSERT INTO changes (device_id, changed_at) VALUES (?, ?)", (key, now.isoformat()))

    def _trim_changes(self) -> None:
        self._db.execute("DELETE FROM changes WHERE seq <= (SELECT MAX(seq) FROM changes) - ?", (CHANGES_KEPT,))

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *_: object) -> None:
        self.db.execute("ROLLBACK" if kind is not None else "COMMIT")


def parse_import(path: Path) -> list[DeviceRecord]:
    """Read a CSV or JSON (or YAML) export; raises ConfigError listing every bad row by line."""
    if path.suffix.lower() == ".csv":
        return _parse_csv(path)
    if path.suffix.lower() == ".json":
        records = _parse_valid_json(path)
        if records is not None:
            return records
    data, problems = read_yaml(path, str(path))  # JSON is YAML: ruamel keeps every item's line
    if problems:
        raise ConfigError(problems)
    items = _items(data)
    if not isinstance(items, list):
        raise ConfigError([ConfigProblem(str(path), 1, 1, "", "expected a list of devices, "
                                         "or an object with 'devices' or Graph's 'value'")])
    records, problems, seen = [], [], KeysSeen()
    prefix = ["value"] if isinstance(data, dict) and "value" in data else ["devices"] if isinstance(data, dict) else []
    for index, item in enumerate(items):
        try:
            record = DeviceRecord.model_validate_json(json.dumps(plain(item)), strict=True)
        except ValidationError as error:
            problems += [locate(data, (*prefix, index, *e["loc"]), str(path), e["msg"]) for e in error.errors()]
            continue
        problems += [locate(data, (*prefix, index, key.value), str(path), problem)
                     for key, problem in seen.repeated(record)]
        records.append(record)
    _raise(problems)
    return records


def _items(data: object) -> object:
    """The device list of an import: the document itself, or its ``devices`` or Graph's ``value``."""
    return data.get("value", data.get("devices")) if isinstance(data, dict) else data


def _parse_valid_json(path: Path) -> list[DeviceRecord] | None:
    """A JSON file read at JSON speed (a YAML parser that keeps every line takes minutes for
    100,000 devices: re-seeding an empty Redis from an export must not); None for a file with any
    problem, which the YAML reader then reports item by item with its line."""
    try:
        items = _items(strict_json.loads(path.read_bytes()))  # a member given twice: the YAML reader names its line
        if not isinstance(items, list):
            return None
        records = DEVICE_LIST.validate_json(json.dumps(items), strict=True)
    except (OSError, ValueError):  # ValidationError and strict_json's JsonRefused are ValueErrors
        return None
    seen = KeysSeen()
    if any(seen.repeated(record) for record in records):
        return None  # a device listed twice, or two devices with one intuneDeviceId or serialNumber
    return records


def _parse_csv(path: Path) -> list[DeviceRecord]:
    text = path.read_text(encoding="utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    records: list[DeviceRecord] = []
    problems: list[ConfigProblem] = []
    seen: dict[str, int] = {}
    keys = KeysSeen()
    for row in reader:
        line = reader.line_num
        if None in row or None in row.values():
            problems.append(ConfigProblem(str(path), line, None, "", f"{len(reader.fieldnames or [])} columns "
                                          "expected: this row has more or fewer values"))
            continue
        device_id = (row.get("azureADDeviceId") or "").lower()
        if device_id and device_id in seen:
            problems.append(ConfigProblem(str(path), line, None, "azureADDeviceId",
                                          f"{row['azureADDeviceId']!r} is already on line {seen[device_id]}"))
            continue
        seen[device_id] = line
        try:
            item = {k: _csv_value(k, v) for k, v in row.items() if k and v not in (None, "")}
            record = DeviceRecord.model_validate_json(json.dumps(item), strict=True)
            problems += [ConfigProblem(str(path), line, None, key.value, problem)
                         for key, problem in keys.repeated(record)]
            records.append(record)
        except ValidationError as error:
            problems += [ConfigProblem(str(path), line, None, format_loc(tuple(e["loc"])), e["msg"])
                         for e in error.errors()]
        except ValueError as error:  # a value _csv_value cannot read
            problems.append(ConfigProblem(str(path), line, None, "", str(error)))
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



def _raise(problems: list[ConfigProblem]) -> None:
    if problems:
        raise ConfigError(problems)


def export(store: DeviceStore, fmt: str) -> str:
    """Every device of either store, as ``portcullis devices export`` prints it (JSON or CSV)."""
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

