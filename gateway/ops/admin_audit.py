"""The admin audit log: one JSON line per admin API request, allowed or refused, shaped like an
Entra directory audit record (Graph ``directoryAudit``), so that "who reloaded the rules, and who
tried to" is answered the way a security team already reads Entra's audit log.

A record names the caller (user principal name and object id from the validated token, and the
address they came from), never the token itself. Admins are named, not pseudonymised: the log
exists to hold them accountable; user names an admin typed (a dashboard filter, a What If
question) are written as pseudonyms when the decision log uses them (gateway/web/admin.py). The
file is created readable by its owner only (0600) and appended to under a lock (admin requests
are rare); callers in async code go through ``asyncio.to_thread``.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from gateway.decision.log import PrivateRotatingFileHandler
from gateway.policy.model import Identity

logger = logging.getLogger(__name__)

LOGGED_BY = "Portcullis admin API"
FILE_MODE = 0o600  # when the log is created: it names the admins and what they looked at
MAX_FILE_BYTES = 100 * 1024 * 1024  # then rotate: admin-audit.jsonl.1, .2, ...
KEEP_FILES = 10


@dataclass(frozen=True, slots=True, kw_only=True)
class TargetResource:
    """What an action was about: a decision, the configuration, the metrics."""

    id: str
    display_name: str
    type: str

    def as_json(self) -> dict[str, str]:
        return {"id": self.id, "displayName": self.display_name, "type": self.type}


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminActivity:
    """One admin request as the audit log tells it."""

    activity: str  # activityDisplayName, e.g. "Reload configuration"
    category: str  # Entra's audit categories: Policy, Monitoring, Authentication
    result: str  # success | failure
    reason: str
    caller: Identity | None  # None when no valid token was presented
    ip_address: str
    correlation_id: str
    targets: tuple[TargetResource, ...] = ()
    details: dict[str, str] = field(default_factory=dict)


def directory_audit_record(activity: AdminActivity, now: datetime) -> dict[str, Any]:
    caller = activity.caller
    user = None
    if caller is not None:
        user = {"id": caller.object_id or caller.subject, "userPrincipalName": caller.user_principal_name,
                "ipAddress": activity.ip_address}
    details = {"ipAddress": activity.ip_address, **activity.details}
    if caller is not None:
        details["roles"] = " ".join(sorted(caller.roles))
    return {
        "id": str(uuid.uuid4()),
        "activityDateTime": now.isoformat(),
        "activityDisplayName": activity.activity,
        "category": activity.category,
        "correlationId": activity.correlation_id,
        "loggedByService": LOGGED_BY,
        "result": activity.result,
        "resultReason": activity.reason,
        "initiatedBy": {"user": user, "app": {"appId": caller.client_id} if caller and caller.client_id else None},
        "targetResources": [t.as_json() for t in activity.targets],
        "additionalDetails": [{"key": k, "value": v} for k, v in details.items()],
    }


class AdminAuditLog:
    """The admin audit log: one JSON line per admin request, written before the answer, rotated
    by size like the decision log (``MAX_FILE_BYTES``, ``KEEP_FILES``)."""

    def __init__(self, path: Path, *, max_bytes: int = MAX_FILE_BYTES, keep_files: int = KEEP_FILES) -> None:
        self.path = path
        self._max_bytes, self._keep_files = max_bytes, keep_files
        self._handler: PrivateRotatingFileHandler | None = None
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> bool:
        """Append one record (blocking). A failed write is logged and reported, never raised: the
        action it records has already happened."""
        line = json.dumps(record, separators=(",", ":"))
        try:
            with self._lock:
                if self._handler is None:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    self._handler = AuditFileHandler(self.path, max_bytes=self._max_bytes, keep_files=self._keep_files)
                self._handler.write_line(line)
        except OSError:
            logger.exception("cannot write the admin audit record %s to %s", record["correlationId"], self.path)
            return False
        return True

    def close(self) -> None:
        with self._lock:
            if self._handler is not None:
                self._handler.close()


class AuditFileHandler(PrivateRotatingFileHandler):
    file_mode = FILE_MODE

    def handleError(self, record: logging.LogRecord) -> None:  # logging's name
        raise OSError(f"cannot write to {self.baseFilename}")
