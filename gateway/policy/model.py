"""Runtime values of an access decision: the request, its signals and the decision with its
explanation. Frozen dataclasses and StrEnums whose values are Entra's strings."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum, StrEnum


class PolicyState(StrEnum):
    enabled = "enabled"
    disabled = "disabled"
    report_only = "reportOnly"


class BuiltInControl(StrEnum):
    block = "block"
    compliant_device = "compliantDevice"
    approved_application = "approvedApplication"


class DeviceThreatLevel(StrEnum):
    """MTD risk, ordered secured < low < medium < high (Intune's device threat level)."""

    secured = "secured"
    low = "low"
    medium = "medium"
    high = "high"

    @property
    def rank(self) -> int:
        return list(DeviceThreatLevel).index(self)


class ComplianceState(StrEnum):
    """Intune ``complianceState`` values."""

    unknown = "unknown"
    compliant = "compliant"
    noncompliant = "noncompliant"
    conflict = "conflict"
    error = "error"
    in_grace_period = "inGracePeriod"
    config_manager = "configManager"


class ClientAppType(StrEnum):
    browser = "browser"
    mobile_apps_and_desktop_clients = "mobileAppsAndDesktopClients"
    exchange_active_sync = "exchangeActiveSync"
    other = "other"


class ErrorCode(IntEnum):
    """Sign-in error codes helpdesks recognise."""

    device_not_compliant = 53000
    app_not_approved = 53002
    blocked_by_conditional_access = 53003
    blocked_due_to_risk = 53004


class PolicyResultKind(StrEnum):
    success = "success"
    failure = "failure"
    not_applied = "notApplied"
    not_enabled = "notEnabled"
    report_only_success = "reportOnlySuccess"
    report_only_failure = "reportOnlyFailure"
    report_only_not_applied = "reportOnlyNotApplied"


class DecisionResult(StrEnum):
    allow = "allow"
    block = "block"
    unauthenticated = "unauthenticated"


@dataclass(frozen=True, slots=True, kw_only=True)
class AccessRequest:
    """What the gateway knows about one request before looking anything up."""

    correlation_id: str
    host: str
    path: str
    method: str
    client_ip: str
    user_agent: str
    accepts_html: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    """Claims of a validated access token."""

    subject: str
    user_principal_name: str | None
    object_id: str | None
    tenant_id: str | None
    client_id: str | None
    device_id: str | None
    groups: frozenset[str]
    audience: str
    expires_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ManagedDevice:
    """A device record from the inventory, with its MTD threat level."""

    device_id: str
    display_name: str | None
    user_principal_name: str | None
    operating_system: str | None
    compliance_state: ComplianceState
    compliance_grace_period_expiration: datetime | None
    threat_level: DeviceThreatLevel | None
    threat_source: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceSignals:
    """The device as policy sees it. ``device`` is None for an unknown or absent device: it is
    not compliant and has no threat level (fail closed)."""

    device_id: str | None
    device: ManagedDevice | None
    source: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientApp:
    """The client app, from the token's ``azp``/``appid``; ``name`` is None when not configured."""

    client_id: str | None
    name: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlFailure:
    control: str
    error_code: ErrorCode
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyResult:
    name: str
    display_name: str
    result: PolicyResultKind
    not_applied_because: str | None = None
    enforced_grant_controls: tuple[str, ...] = ()
    failures: tuple[ControlFailure, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    result: DecisionResult
    status_code: int
    error_code: ErrorCode | None
    reason: str
    resource: str | None
    client_app_type: ClientAppType
    policies: tuple[PolicyResult, ...] = ()
    failed_policy: str | None = None

    @property
    def allowed(self) -> bool:
        return self.result is DecisionResult.allow
