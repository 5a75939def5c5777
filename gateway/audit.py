"""The decision log: one JSON line per request, shaped like an Entra sign-in log record.

Built only from the decision and the values that produced it; the request's token, cookies and
Authorization header are never part of a record.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from gateway.policy.model import (
    AccessRequest,
    ClientApp,
    Decision,
    DecisionResult,
    DeviceSignals,
    Identity,
    PolicyResult,
    PolicyResultKind,
)
from gateway.signals.compliance import is_compliant

logger = logging.getLogger(__name__)


def sign_in_record(
    *,
    request: AccessRequest,
    decision: Decision,
    now: datetime,
    identity: Identity | None = None,
    device: DeviceSignals | None = None,
    app: ClientApp | None = None,
) -> dict[str, Any]:
    return {
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
        "request": {"method": request.method, "host": request.host, "path": request.path.split("?", 1)[0]},
        "deviceDetail": _device_detail(device, now),
        "status": {"errorCode": int(decision.error_code) if decision.error_code else 0,
                   "failureReason": None if decision.allowed else decision.reason},
        "result": decision.result.value,
        "httpStatus": decision.status_code,
        "conditionalAccessStatus": _conditional_access_status(decision),
        "appliedConditionalAccessPolicies": [policy_entry(p) for p in decision.all_policies()],
        "enforcedSessionControls": list(decision.session_controls.names()),
    }


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
    return entry


class DecisionLog:
    """Appends records to a JSON-lines file, one line per decision, flushed as written."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: TextIO = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
