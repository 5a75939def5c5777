"""The decision log: one JSON line per request, shaped like an Entra sign-in log record.

Built only from the decision and the values that produced it; the request's token, cookies and
Authorization header are never part of a record.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import io
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from datetime import datetime
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Any, cast

import orjson

from gateway.policy.compliance import is_compliant
from gateway.policy.grant_controls import app_protection_state
from gateway.policy.model import (
    AccessRequest,
    AppProtection,
    ClientApp,
    Decision,
    DecisionResult,
    DeviceCertificate,
    DeviceSignals,
    Identity,
    ManagedDevice,
    PolicyResult,
    PolicyResultKind,
)
from gateway.policy.rollout import request_listener
from gateway.signals.app_protection import registration_json
from gateway.signals.devices import device_record

logger = logging.getLogger(__name__)

USER_AGENT_LIMIT = 512
REDECIDED = "continuousAccessEvaluation"  # marks a re-decision of a request while it was open


def sign_in_record(
    *,
    request: AccessRequest,
    decision: Decision,
    now: datetime,
    identity: Identity | None = None,
    device: DeviceSignals | None = None,
    app: ClientApp | None = None,
    identity_source: str | None = None,
    locations: Iterable[str] = (),
) -> dict[str, Any]:
    """``identity_source`` says where the identity came from (``accessToken`` or ``browserSession``);
    ``locations`` are the named locations the client address is in."""
    record: dict[str, Any] = {
        "id": request.correlation_id,
        "createdDateTime": now.isoformat(),
        "correlationId": request.correlation_id,
        "userPrincipalName": identity.user_principal_name if identity else None,
        "userId": identity.object_id or identity.subject if identity else None,
        "appId": app.client_id if app else None,
        "appDisplayName": app.name if app else None,
        "resourceDisplayName": decision.resource,
        "matchedResources": list(decision.resources),
        "resourceId": identity.audience if identity else None,
        "clientAppUsed": decision.client_app_type.value,
        "ipAddress": request.client_ip,
        "request": {"method": request.method, "host": request.host, "path": request.path.split("?", 1)[0],
                    "userAgent": request.user_agent[:USER_AGENT_LIMIT], "acceptsHtml": request.accepts_html,
                    "listener": request_listener(request).value},
        "deviceDetail": _device_detail(device, now),
        "status": {"errorCode": int(decision.error_code) if decision.error_code else 0,
                   "failureReason": None if decision.allowed else decision.reason},
        "result": decision.result.value,
        "httpStatus": decision.status_code,  # what the client got: a forwarded request's is set by its answer
        "upstreamStatus": None,  # the upstream's, once a forwarded request has its answer
        "conditionalAccessStatus": _conditional_access_status(decision),
        "appliedConditionalAccessPolicies": [policy_entry(p) for p in decision.all_policies()],
        "enforcedSessionControls": list(decision.session_controls.names()),
        "signals": signal_entries(request=request, identity=identity, identity_source=identity_source,
                                  device=device, app=app, locations=locations, now=now),
    }
    if decision.restriction is not None:  # the device binding or a session control refused it, not a policy
        record["restriction"] = decision.restriction.value
    if request.device_certificate is not None:
        record["deviceCertificate"] = certificate_json(request.device_certificate)
    if identity is not None:
        record["evaluationInput"] = evaluation_input(identity, device, request)
        if app is not None and app.protection is not None:  # only when a policy asked for it
            record["evaluationInput"]["appProtection"] = app_protection_json(app.protection)
    return record


def app_protection_json(protection: AppProtection) -> dict[str, Any]:
    """The app's registrations policy saw, for replay (``gateway.replay.recorded``). Without their
    user: they were found for the record's user, whose name the log may pseudonymise."""
    age = protection.max_sync_age
    return {"source": protection.source, "maxSyncAgeSeconds": None if age is None else round(age.total_seconds()),
            "registrations": [registration_json(r, with_user=False) for r in protection.registrations]}


def evaluation_input(identity: Identity, device: DeviceSignals | None, request: AccessRequest) -> dict[str, Any]:
    """Everything policy looked at that the rest of the record does not say, so that ``portcullis
    replay`` can evaluate this request again under other rules with the signals of that moment."""
    record = device.device if device is not None else None
    return {
        "subject": identity.subject,
        "issuer": identity.issuer,
        "groups": sorted(identity.groups),
        "authenticationMethods": sorted(identity.authentication_methods),
        "authenticationContexts": sorted(identity.authentication_contexts),
        "authenticatedAt": identity.authenticated_at,
        "deviceId": identity.device_id,
        "kioskLocation": request.kiosk_location,
        "device": device_json(record) if record is not None else None,
        # the inventory device a verified certificate named (the device decided for), for replay
        "certificateDeviceId": device.device_id if device is not None and request.device_certificate is not None
        and request.device_certificate.verified else None,
    }


def certificate_json(certificate: DeviceCertificate) -> dict[str, Any]:
    """The connection's client certificate as the decision saw it: whether it was believed, why
    not, and what names it (never a key: the gateway has none)."""
    return {
        "verified": certificate.verified,
        "problem": certificate.problem,
        "deviceKey": certificate.device_key.value if certificate.device_key else None,
        "deviceValue": certificate.device_value,
        "subject": certificate.subject,
        "issuer": certificate.issuer,
        "serialNumber": certificate.serial_number,
        "sha256": certificate.sha256,
        "notAfter": certificate.not_after.isoformat() if certificate.not_after else None,
    }


@functools.lru_cache(maxsize=4096)
def device_json(device: ManagedDevice) -> dict[str, Any]:
    """The device as Intune writes it. Cached: a device answers many requests between changes,
    and building the record costs more than the rest of the log line (callers must not mutate it)."""
    return device_record(device).model_dump(by_alias=True, mode="json", exclude_none=True)


def signal_entries(*, request: AccessRequest, identity: Identity | None, identity_source: str | None,
                   device: DeviceSignals | None, app: ClientApp | None, locations: Iterable[str],
                   now: datetime) -> list[dict[str, Any]]:
    """Each signal policy used: its value, where it came from and how old it was."""
    entries = []
    if identity is not None:
        age = now.timestamp() - identity.issued_at if identity.issued_at is not None else None
        entries.append(_signal("identity", "valid", identity_source or "accessToken", age))
        app_name = (app.name or app.client_id) if app else None
        entries.append(_signal("clientApp", app_name or "unknown", "token (azp/appid)", age))
        if identity.issuer is not None:  # the trusted issuer whose keys verified it (identity.issuers)
            entries.append(_signal("issuer", identity.issuer, "token (iss)", age))
    certificate = request.device_certificate
    if certificate is not None:
        entries.append(_signal("deviceCertificate", "verified" if certificate.verified else "notAccepted",
                               f"client certificate issued by {certificate.issuer or 'an unknown issuer'}", 0))
    if device is not None and device.device_id is not None:
        record = device.device
        if record is None:
            entries.append(_signal("complianceState", "notRegistered", device.source, None))
        else:
            sync_age = (now - record.last_sync).total_seconds() if record.last_sync else None
            entries.append(_signal("complianceState", record.compliance_state.value, device.source, sync_age))
            reported = (now - record.threat_reported_at).total_seconds() if record.threat_reported_at else None
            entries.append(_signal("threatLevel", record.threat_level.value if record.threat_level else "none",
                                   record.threat_source or device.source, reported))
    if app is not None and app.protection is not None:
        entries.append(_app_protection_signal(app.protection, identity, now))
    named = sorted(locations)
    kiosk = " through the kiosk proxy" if request.kiosk_location is not None else ""
    entries.append(_signal("location", ",".join(named) if named else "none",
                           f"client address {request.client_ip}{kiosk}", 0))
    return entries


def _app_protection_signal(protection: AppProtection, identity: Identity | None, now: datetime) -> dict[str, Any]:
    """``appProtection=registered|notRegistered|otherDevice|flagged|noPolicyApplied|notCheckedIn``,
    aged by the newest check-in of the registrations found."""
    synced = [r.last_sync for r in protection.registrations if r.last_sync is not None]
    age = (now - max(synced)).total_seconds() if synced else None
    value = "notRegistered" if identity is None else \
        app_protection_state(ClientApp(client_id=None, name=None, protection=protection), identity, now)[0]
    return _signal("appProtection", value, protection.source, age)


def _signal(name: str, value: str, source: str, age: float | None) -> dict[str, Any]:
    return {"name": name, "value": value, "source": source,
            "ageSeconds": None if age is None else max(0, round(age))}


def signal_text(entry: dict[str, Any]) -> str:
    """``threatLevel=high source=lookout age=240s``"""
    age = entry.get("ageSeconds")
    return f"{entry['name']}={entry['value']} source={entry['source']} age={'unknown' if age is None else f'{age}s'}"


def _device_detail(device: DeviceSignals | None, now: datetime) -> dict[str, Any]:
    if device is None:
        return {"deviceId": None}
    record = device.device
    return {
        "deviceId": device.device_id,
        "displayName": record.display_name if record else None,
        "operatingSystem": record.operating_system if record else None,
        "isManaged": record is not None,
        "isCompliant": is_compliant(record, now, device.compliance),
        "complianceState": record.compliance_state.value if record else None,
        "threatLevel": record.threat_level.value if record and record.threat_level else None,
        "threatSource": record.threat_source if record else None,
        "source": device.source,
    }


def _conditional_access_status(decision: Decision) -> str:
    if decision.result is DecisionResult.block and decision.policies:
        return "failure"
    if any(p.result is PolicyResultKind.success for p in decision.policies):
        return "success"
    return "notApplied"


def policy_entry(result: PolicyResult) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": result.name,
        "displayName": result.display_name,
        "result": result.result.value,
        "enforcedGrantControls": list(result.enforced_grant_controls),
        "enforcedSessionControls": list(result.enforced_session_controls),
    }
    if result.not_applied_because:
        entry["notAppliedBecause"] = result.not_applied_because
    if result.failures:
        entry["failedControls"] = [{"control": f.control, "errorCode": int(f.error_code), "reason": f.reason}
                                   for f in result.failures]
    if result.rollout is not None:  # enforced for its cohort only: whether this request is in it, and why
        entry["rollout"] = result.rollout.value
    return entry


PERSONAL_DEVICE_FIELDS = frozenset({"userPrincipalName", "deviceName", "easDeviceId"})


class Pseudonymizer:
    """Replaces user names and ids with a keyed hash: the same user always gets the same
    pseudonym (so a trail can be followed), which only a holder of the key can link to a name."""

    PREFIX = "pseudonym:"

    def __init__(self, key: bytes) -> None:
        self._key = key

    def pseudonym(self, value: str) -> str:
        if value.startswith(self.PREFIX):
            return value
        digest = hmac.new(self._key, value.strip().lower().encode(), hashlib.sha256).hexdigest()
        return f"{self.PREFIX}{digest[:24]}"

    def apply(self, record: dict[str, Any]) -> dict[str, Any]:
        """A copy of ``record`` without the user's names, nor the device names that carry them
        (Intune names devices after their user: "Drew's iPhone")."""
        record = dict(record)
        for key in ("userPrincipalName", "userId"):
            if record.get(key):
                record[key] = self.pseudonym(record[key])
        if record.get("deviceDetail") and record["deviceDetail"].get("displayName"):
            record["deviceDetail"] = {**record["deviceDetail"],
                                      "displayName": self.pseudonym(record["deviceDetail"]["displayName"])}
        if record.get("deviceCertificate") and record["deviceCertificate"].get("subject"):
            record["deviceCertificate"] = {**record["deviceCertificate"],  # may name the user (CN=alex@...)
                                           "subject": self.pseudonym(record["deviceCertificate"]["subject"])}
        if record.get("evaluationInput"):
            given = dict(record["evaluationInput"])
            given["subject"] = self.pseudonym(given["subject"])
            if given.get("device"):
                given["device"] = {key: self.pseudonym(value) if key in PERSONAL_DEVICE_FIELDS and value else value
                                   for key, value in given["device"].items()}
            if given.get("appProtection"):  # its registrations name no user, but their phones may ("Drew's phone")
                protection = dict(given["appProtection"])
                protection["registrations"] = [
                    {**r, "deviceName": self.pseudonym(r["deviceName"])} if r.get("deviceName") else r
                    for r in protection.get("registrations") or ()]
                given["appProtection"] = protection
            record["evaluationInput"] = given
        return record


class DecisionLog:
    """The decision log: JSON lines, rotated by size, written by a thread of its own.

    ``write`` never blocks the request path: a record is appended to a bounded list the writer
    thread takes in batches every ``FLUSH_SECONDS`` (one JSON encoding pass, one write and one
    flush per batch: waking a thread and a file handler for every record cost more CPU than the
    rest of a decision). When the list is full the record is dropped and counted (``dropped``, and
    the ``on_drop`` callback for the metric), and a warning is logged at most every 10 s. The
    newest records stay in memory for the admin API and dashboard.
    """

    def __init__(self, path: Path, *, max_bytes: int = 100 * 1024 * 1024, keep_files: int = 10,
                 queue_size: int = 10_000, pseudonymizer: Pseudonymizer | None = None, keep_recent: int = 2000,
                 on_drop: Callable[[], None] | None = None, on_error: Callable[[], None] | None = None,
                 configured_path: Path | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.configured_path = configured_path or path  # worker i writes its own file; lookups read them all
        self.pseudonymizer = pseudonymizer
        self.dropped = 0
        self._on_drop = on_drop
        self._on_error = on_error
        self._last_drop_warning = 0.0
        self._recent: deque[dict[str, Any]] = deque(maxlen=keep_recent)
        self._pending: deque[dict[str, Any]] = deque()  # append and popleft are atomic: no lock on the request path
        self._queue_size = queue_size
        self._accepted = self._done = 0  # records taken by ``write``; records written (or failed)
        self._stopping = threading.Event()
        self._handler = PrivateRotatingFileHandler(path, max_bytes=max_bytes, keep_files=keep_files)
        self._writer = threading.Thread(target=self._write_records, name="decision-log", daemon=True)
        self._writer.start()

    def write(self, record: dict[str, Any]) -> None:
        if self.pseudonymizer is not None:
            record = self.pseudonymizer.apply(record)
        self._recent.append(record)
        if len(self._pending) < self._queue_size:
            self._pending.append(record)
            self._accepted += 1
        else:
            self.dropped += 1
            if self._on_drop is not None:
                self._on_drop()
            now = time.monotonic()
            if now - self._last_drop_warning > DROP_WARNING_INTERVAL:
                self._last_drop_warning = now
                logger.warning("decision log queue full: %d records dropped so far (see "
                               "portcullis_decision_log_dropped_total)", self.dropped)

    def recent(self) -> list[dict[str, Any]]:
        """The newest records first (a copy: the request path keeps appending meanwhile)."""
        return list(self._recent)[::-1]

    def find(self, correlation_id: str) -> dict[str, Any] | None:
        """A request's record by its id: from memory, else from the files, newest first (blocking
        I/O). Its own record rather than a re-decision of it while it was open (``REDECIDED``),
        which is written earlier when the answer was streamed or still open."""
        again = None
        for record in self.recent():
            if record.get("correlationId") == correlation_id:
                if not record.get(REDECIDED):
                    return record
                again = again or record
        self.flush()
        return find_record(log_files(self.configured_path), correlation_id) or again

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every record taken so far is written (tests, lookups, shutdown); False on timeout."""
        target = self._accepted
        deadline = time.monotonic() + timeout
        while self._done < target:
            if time.monotonic() > deadline or not self._writer.is_alive():
                return False
            time.sleep(0.002)
        return True

    def close(self) -> None:
        self.flush()
        self._stopping.set()
        self._writer.join(5)
        self._handler.close()

    def _write_records(self) -> None:
        while not self._stopping.wait(FLUSH_SECONDS):
            self._write_batch()
        self._write_batch()  # what came in meanwhile

    def _write_batch(self) -> None:
        batch: list[dict[str, Any]] = []
        while self._pending and len(batch) < MAX_BATCH:
            batch.append(self._pending.popleft())
        if not batch:
            return
        lines = []
        for record in batch:
            try:
                lines.append(orjson.dumps(record).decode())  # compact like json.dumps, about 6x faster
            except (TypeError, ValueError):  # one record that cannot be written must not take the batch
                self._write_failed()
        try:
            self._handler.write_lines(lines)
        except Exception:  # noqa: BLE001  (the writer thread must survive a full disk, a removed directory)
            for _ in lines:
                self._write_failed()
        finally:
            self._done += len(batch)

    def _write_failed(self) -> None:
        if self._on_error is not None:
            self._on_error()
        logger.exception("cannot write a decision log record to %s", self.path)


class PrivateRotatingFileHandler(RotatingFileHandler):
    """Log files readable by the gateway's user and group only (they hold personal data), one
    JSON line per record, rotated by size."""

    file_mode = 0o640

    def __init__(self, path: Path, *, max_bytes: int, keep_files: int) -> None:
        super().__init__(path, maxBytes=max_bytes, backupCount=keep_files, encoding="utf-8")
        self.setFormatter(logging.Formatter("%(message)s"))

    def write_line(self, line: str) -> None:
        self.handle(logging.makeLogRecord({"msg": line, "levelno": logging.INFO}))

    def write_lines(self, lines: list[str]) -> None:
        """Many lines, written and flushed once per file; a file is rotated before a line would
        take it past ``maxBytes`` (the size is counted here, not asked of the file per line)."""
        self.acquire()
        try:
            if self.stream is None:
                self.stream = self._open()
            size = self.stream.tell()
            chunk: list[str] = []
            for line in lines:
                data = line + "\n"
                length = len(data.encode("utf-8"))
                if self.maxBytes and size and size + length > self.maxBytes:
                    self.stream.write("".join(chunk))
                    chunk, size = [], 0
                    self.doRollover()
                chunk.append(data)
                size += length
            self.stream.write("".join(chunk))
            self.stream.flush()
        finally:
            self.release()

    def _open(self) -> io.TextIOWrapper:
        # a text mode ("a"), so a TextIOWrapper, which the handler owns and closes
        return cast(io.TextIOWrapper, open(self.baseFilename, self.mode, encoding=self.encoding,
                                           opener=lambda name, flags: os.open(name, flags, self.file_mode)))


def log_files(path: Path) -> list[Path]:
    """The log and its rotated files, newest first, then each other worker's log the same way
    (``portcullis run --workers N``: worker i > 0 writes ``<stem>.worker<i><suffix>``)."""
    workers = sorted((p for p in path.parent.glob(f"{path.stem}.worker*{path.suffix}")
                      if p.name[len(path.stem) + 7:len(p.name) - len(path.suffix)].isdigit()),
                     key=lambda p: int(p.name[len(path.stem) + 7:len(p.name) - len(path.suffix)]))
    return [file for log in (path, *workers) for file in _rotated(log)]


def _rotated(path: Path) -> list[Path]:
    rotated = sorted((p for p in path.parent.glob(f"{path.name}.*") if p.suffix[1:].isdigit()),
                     key=lambda p: int(p.suffix[1:]))
    return [p for p in (path, *rotated) if p.is_file()]


def find_record(files: Iterable[Path], correlation_id: str) -> dict[str, Any] | None:
    """The newest record of a request, its own before any re-decision of it (``DecisionLog.find``)."""
    needle = f'"correlationId":"{correlation_id}"'
    again: dict[str, Any] | None = None
    for file in files:
        found: dict[str, Any] | None = None
        found_again: dict[str, Any] | None = None
        try:
            with file.open(encoding="utf-8", errors="replace") as lines:
                for line in lines:
                    if needle in line:
                        try:
                            record: dict[str, Any] = json.loads(line)
                        except json.JSONDecodeError:
                            continue
                        if record.get(REDECIDED):
                            found_again = record
                        else:
                            found = record
        except FileNotFoundError:
            continue  # rotated away while we looked: its records moved to the next file name
        if found is not None:
            return found
        again = again or found_again
    return again


DROP_WARNING_INTERVAL = 10.0
FLUSH_SECONDS = 0.05  # the decision log's writer takes what came in this often
MAX_BATCH = 5000
