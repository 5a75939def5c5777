"""Recorded requests, as replay reads them from HAR files and decision logs (mitmproxy flow files
are read by ``addons.recorded_flows``: the core never imports mitmproxy).

A ``RecordedRequest`` holds what the gateway saw of one request and, when the decision log
recorded it, what the gateway decided and the signals of that moment (identity input, device
record with compliance state and threat level, client address, time). A flow or HAR entry and
the decision log record with the same correlation id are one request: ``pair`` joins them.
Anything that cannot be replayed becomes a ``Skipped`` value with its place and the reason.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from gateway.decision.log import REDECIDED, log_files
from gateway.errors import PortcullisError
from gateway.http.headers import CORRELATION_ID
from gateway.identity.browser import COOKIE_NAME
from gateway.policy.model import (
    AppProtection,
    DecisionResult,
    DeviceCertificate,
    DeviceKey,
    Identity,
    Listener,
    ManagedDevice,
    RolloutCohort,
)
from gateway.policy.session_controls import UPLOAD_BLOCKED
from gateway.signals.app_protection import registration_from_json
from gateway.signals.devices import DeviceRecord

MAX_HAR_BYTES = 512 * 1024 * 1024  # a HAR is one JSON document, read whole: larger ones are refused
APPLIED = frozenset({"success", "failure", "reportOnlySuccess", "reportOnlyFailure"})
COHORTS = frozenset(c.value for c in RolloutCohort)
NOT_ROUTED = "refused before the request named a host (framing, plaintext, an unreadable head): nothing to decide"
REEVALUATED = "a request decided again while it was open (continuous access evaluation): replayed from its own record"


class UnreadableSource(PortcullisError):
    """A SOURCE that is not a flow file, HAR file or decision log at all; the message says where."""


@dataclass(frozen=True, slots=True)
class Skipped:
    place: str  # file:line, file:flow N or file:entry N
    reason: str
    correlation_id: str | None = None  # when its decision log record, if among the sources, stands for it


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordedDecision:
    """What the gateway decided at the time, from its decision log record."""

    result: DecisionResult
    status_code: int
    reason: str
    error_code: int
    policy_id: str | None  # the enforced policy whose failure decided a block
    policy_name: str | None
    resource: str | None
    applied: tuple[str, ...]  # policies that applied (enforced or report-only)
    user: str | None
    app: str | None
    cohorts: tuple[tuple[str, RolloutCohort], ...] = ()  # (policy, cohort) of each policy with a rollout


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordedInput:
    """The decision log's ``evaluationInput``: the identity and device policy saw at the time."""

    identity: Identity
    device_id: str | None
    device: ManagedDevice | None
    kiosk_location: str | None
    binding_problem: str | None  # an ActiveSync device binding refusal (its query is not logged)
    certificate_device_id: str | None = None  # the device the connection's verified certificate named
    app_protection: AppProtection | None = None  # the app's registrations, when a policy asked for them


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordedRequest:
    place: str
    correlation_id: str | None
    time: datetime
    method: str
    host: str
    target: str  # path and query as sent; the path alone when only the decision log has it
    query_recorded: bool
    client_ip: str | None  # None: the recording does not say (HAR)
    user_agent: str = ""
    accepts_html: bool = False
    content_type: str = ""
    content_length: str = ""
    chunked: bool = False
    kiosk: bool = False
    forward_auth: bool = False  # an edge proxy asked the forward-auth listener
    authorization: tuple[str, ...] = ()
    session_cookie: bool = False
    authenticated: bool | None = None  # did the gateway get past authentication? None: not recorded
    recorded: RecordedDecision | None = None
    evaluation_input: RecordedInput | None = None
    log_place: str | None = None
    pseudonymized: bool = False
    device_certificate: DeviceCertificate | None = None  # the connection's, as the decision log recorded it


def source_kind(path: Path) -> str:
    """``flows``, ``har`` or ``decisionLog``, from the name (``.har``) or the first bytes: a flow
    file is tnetstrings (a length first), a decision log one JSON object per line, a HAR one JSON
    document with ``log``."""
    try:
        with path.open("rb") as file:
            head = file.read(64 * 1024)
    except OSError as error:
        raise UnreadableSource(f"{path}: {error.strerror}") from error
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    if path.suffix.lower() == ".har":
        return "har"
    if text[:1].isdigit():
        return "flows"
    if text[:1] == b"{":
        try:
            first = json.loads(text.split(b"\n", 1)[0])
        except ValueError:  # a pretty-printed HAR: "{" alone on the first line
            return "har"
        except RecursionError:  # nested too deep for a HAR: a hostile line, which costs that line only
            return "decisionLog"
        return "har" if isinstance(first, dict) and "log" in first else "decisionLog"
    raise UnreadableSource(f"{path}:1: neither a mitmproxy flow file, a HAR file nor a Portcullis decision log")


def decision_log_files(path: Path) -> list[Path]:
    """A decision log is the file and its rotated predecessors (``decisions.jsonl.1`` ...)."""
    return log_files(path) or [path]


def read_decision_log(file: Path) -> Iterator[RecordedRequest | Skipped]:
    """Every line is a request or a counted skip: a line cut short by a crash costs that line only."""
    with file.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            place = f"{file}:{number}"
            try:
                record = json.loads(line)
            except ValueError:
                yield Skipped(place, "not a JSON record (a line cut short?)")
                continue
            except RecursionError:
                yield Skipped(place, "not a decision record: JSON nested too deep")
                continue
            yield from_log_record(record, place)


def from_log_record(record: object, place: str) -> RecordedRequest | Skipped:
    if not isinstance(record, dict) or not isinstance(record.get("request"), dict) or "correlationId" not in record:
        return Skipped(place, "not an access decision record")
    if record.get(REDECIDED) is True:
        return Skipped(place, REEVALUATED, str(record["correlationId"]))
    if record["request"].get("host") == "":
        return Skipped(place, NOT_ROUTED)
    try:
        return _from_log_record(record, place)
    except (LookupError, TypeError, ValueError, AttributeError, ArithmeticError, RecursionError,
            ValidationError) as error:  # the record's values are as hostile as its sender
        return Skipped(place, f"decision record not readable: {_short(error)}")


def _from_log_record(record: dict[str, Any], place: str) -> RecordedRequest:
    request = record["request"]
    given = record.get("evaluationInput")
    user = record.get("userPrincipalName") or record.get("userId")
    upload = (record.get("status") or {}).get("failureReason") == UPLOAD_BLOCKED  # the one upload a record shows
    return RecordedRequest(
        place=place,
        correlation_id=str(record["correlationId"]),
        time=_aware(datetime.fromisoformat(record["createdDateTime"])),
        method=str(request["method"]),
        host=str(request["host"]).lower(),
        target=str(request["path"]),
        query_recorded=False,
        client_ip=record.get("ipAddress"),
        user_agent=str(request.get("userAgent") or ""),
        accepts_html=bool(request.get("acceptsHtml")),
        content_type="application/octet-stream" if upload else "",
        content_length="1" if upload else "",
        kiosk=request.get("listener") == Listener.kiosk,
        forward_auth=request.get("listener") == Listener.forward_auth,
        authenticated=DecisionResult(record["result"]) is not DecisionResult.unauthenticated,
        recorded=_recorded_decision(record),
        evaluation_input=_recorded_input(record, given) if isinstance(given, dict) else None,
        log_place=place,
        pseudonymized=isinstance(user, str) and user.startswith("pseudonym:"),
        device_certificate=_recorded_certificate(record.get("deviceCertificate")),
    )


def _recorded_certificate(given: object) -> DeviceCertificate | None:
    """The connection's certificate as the record describes it (verified or why not)."""
    if not isinstance(given, dict):
        return None
    not_after = given.get("notAfter")
    return DeviceCertificate(
        device_key=DeviceKey(given["deviceKey"]) if given.get("deviceKey") else None,
        device_value=given.get("deviceValue"), subject=str(given.get("subject") or ""),
        issuer=str(given.get("issuer") or ""), serial_number=str(given.get("serialNumber") or ""),
        sha256=str(given.get("sha256") or ""),
        not_after=_aware(datetime.fromisoformat(not_after)) if isinstance(not_after, str) else None,
        problem=given.get("problem") if given.get("verified") is not True else None)


def _recorded_decision(record: dict[str, Any]) -> RecordedDecision:
    """``httpStatus`` is what the client got; for an allowed request that is the upstream's answer
    (or none), so the decision's own status is 200."""
    status = record.get("status") or {}
    result = DecisionResult(record["result"])
    reason = status.get("failureReason") or ("allowed" if record["result"] == "allow" else "")
    policies = [p for p in record.get("appliedConditionalAccessPolicies") or [] if isinstance(p, dict)]
    failed = [p for p in policies if p.get("result") == "failure"]
    deciding = next((p for p in failed if any(f.get("reason") == reason for f in p.get("failedControls") or [])),
                    failed[0] if failed else None)
    return RecordedDecision(
        result=result, status_code=200 if result is DecisionResult.allow else int(record["httpStatus"]), reason=reason,
        error_code=int(status.get("errorCode") or 0),
        policy_id=deciding.get("id") if deciding else None,
        policy_name=deciding.get("displayName") if deciding else None,
        resource=record.get("resourceDisplayName"),
        applied=tuple(str(p["id"]) for p in policies if p.get("result") in APPLIED),
        user=record.get("userPrincipalName") or record.get("userId"),
        app=record.get("appDisplayName") or record.get("appId"),
        cohorts=tuple((str(p["id"]), RolloutCohort(p["rollout"])) for p in policies
                      if p.get("rollout") in COHORTS and "id" in p))


def _recorded_input(record: dict[str, Any], given: dict[str, Any]) -> RecordedInput:
    """Entra's names back into an ``Identity``; the device record as the gateway saw it."""
    identity = Identity(
        subject=str(given["subject"]), user_principal_name=record.get("userPrincipalName"),
        object_id=record.get("userId"), tenant_id=None, client_id=record.get("appId"),
        device_id=given.get("deviceId"), groups=frozenset(given.get("groups") or ()),
        audience=record.get("resourceId") or "", expires_at=math.inf,
        authentication_methods=frozenset(given.get("authenticationMethods") or ()),
        authentication_contexts=frozenset(given.get("authenticationContexts") or ()),
        authenticated_at=given.get("authenticatedAt"), issuer=given.get("issuer"))
    device = given.get("device")
    refused_before_policy = record["result"] == "block" and record.get("resourceDisplayName") is None
    return RecordedInput(
        identity=identity, device_id=given.get("deviceId"),
        device=DeviceRecord.model_validate(device, strict=False).to_managed_device() if device else None,
        kiosk_location=given.get("kioskLocation"),
        binding_problem=(record.get("status") or {}).get("failureReason") if refused_before_policy else None,
        certificate_device_id=given.get("certificateDeviceId"),
        app_protection=_recorded_app_protection(given.get("appProtection"), str(given["subject"])))


def _recorded_app_protection(given: object, user: str) -> AppProtection | None:
    """The registrations the decision saw (their ages are replayed against the record's time)."""
    if not isinstance(given, dict):
        return None
    registrations = tuple(registration_from_json(json.dumps(r), user) for r in given.get("registrations") or ())
    age = given.get("maxSyncAgeSeconds")
    return AppProtection(registrations=registrations, source=str(given.get("source") or "decision log"),
                         max_sync_age=None if age is None else timedelta(seconds=int(age)))


def read_har(path: Path) -> Iterator[RecordedRequest | Skipped]:
    """HAR 1.2 (browsers' developer tools, mitmproxy's ``save.har``). HAR keeps no client address.
    A HAR is one JSON document, read whole: one larger than ``MAX_HAR_BYTES`` is refused."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_HAR_BYTES + 1)
    except OSError as error:
        raise UnreadableSource(f"{path}: {error.strerror}") from error
    if len(data) > MAX_HAR_BYTES:
        raise UnreadableSource(f"{path}: a HAR file larger than {MAX_HAR_BYTES // 2**20} MiB is not read (it is "
                               "read whole into memory): export fewer requests, or record a flow file instead")
    try:
        entries = json.loads(data.removeprefix(b"\xef\xbb\xbf"))["log"]["entries"]
    except (ValueError, KeyError, TypeError, RecursionError) as error:
        raise UnreadableSource(f"{path}: not a HAR file (no readable log.entries): {_short(error)}") from error
    if not isinstance(entries, list):
        raise UnreadableSource(f"{path}: not a HAR file: log.entries is not a list")
    for index, entry in enumerate(entries, 1):
        place = f"{path}:entry {index}"
        try:
            yield _from_har_entry(entry, place)
        except (LookupError, TypeError, ValueError, AttributeError, ArithmeticError, RecursionError) as error:
            yield Skipped(place, f"HAR entry not readable: {_short(error)}")


def _from_har_entry(entry: dict[str, Any], place: str) -> RecordedRequest | Skipped:
    request = entry["request"]
    url = urlsplit(request["url"])
    if not url.hostname or request["method"].upper() == "CONNECT":
        return Skipped(place, "not a request to a web resource")
    headers = [(str(h["name"]).lower(), str(h["value"])) for h in request.get("headers") or []]
    response_headers = [(str(h["name"]).lower(), str(h["value"])) for h in (entry.get("response") or {}).get(
        "headers") or []]
    cookies = [value for name, value in headers if name == "cookie"]
    cookies += [f"{c['name']}={c['value']}" for c in request.get("cookies") or []]
    target = url.path or "/"
    return RecordedRequest(
        place=place,
        correlation_id=_first(response_headers, CORRELATION_ID.lower()),
        time=_aware(datetime.fromisoformat(entry["startedDateTime"].replace("Z", "+00:00"))),
        method=request["method"].upper(),
        host=url.hostname.lower(),
        target=f"{target}?{url.query}" if url.query else target,
        query_recorded=True,
        client_ip=None,
        user_agent=_first(headers, "user-agent") or "",
        accepts_html="text/html" in (_first(headers, "accept") or "").lower(),
        content_type=_first(headers, "content-type") or "",
        content_length=_first(headers, "content-length") or "",
        authorization=tuple(value for name, value in headers if name == "authorization"),
        session_cookie=any(f"{COOKIE_NAME}=" in cookie for cookie in cookies),
    )


def pair(items: Iterable[RecordedRequest | Skipped]) -> tuple[list[RecordedRequest], list[Skipped]]:
    """One request per correlation id: a flow or HAR entry takes the signals, time, address and
    decision of its decision log record; a request seen twice counts once, and a flow skipped
    here (refused before routing) is replayed from its record when the record is among them."""
    logged: dict[str, RecordedRequest] = {}
    traffic: dict[str, RecordedRequest] = {}  # by correlation id, in the order first seen
    anonymous: list[RecordedRequest] = []
    skipped: list[Skipped] = []
    for item in items:
        if isinstance(item, Skipped):
            skipped.append(item)
        elif item.correlation_id is None:
            anonymous.append(item)
        elif item.log_place is not None and item.correlation_id in logged:
            skipped.append(Skipped(item.place, f"the same decision as {logged[item.correlation_id].place}"))
        elif item.log_place is not None:
            logged[item.correlation_id] = item
        elif item.correlation_id in traffic:
            skipped.append(Skipped(item.place, f"the same request as {traffic[item.correlation_id].place}"))
        else:
            traffic[item.correlation_id] = item
    paired = [_with_record(request, logged.pop(correlation_id, None)) for correlation_id, request in traffic.items()]
    skipped = [s for s in skipped if s.correlation_id is None or s.correlation_id not in logged]
    return sorted([*paired, *anonymous, *logged.values()], key=lambda r: r.time), skipped


def _with_record(request: RecordedRequest, record: RecordedRequest | None) -> RecordedRequest:
    if record is None:
        return request
    return replace(request, time=record.time, client_ip=record.client_ip or request.client_ip, kiosk=record.kiosk,
                   authenticated=record.authenticated, recorded=record.recorded,
                   evaluation_input=record.evaluation_input, log_place=record.log_place,
                   pseudonymized=record.pseudonymized, device_certificate=record.device_certificate)


def _first(headers: list[tuple[str, str]], name: str) -> str | None:
    return next((value for key, value in headers if key == name), None)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _short(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:200]
