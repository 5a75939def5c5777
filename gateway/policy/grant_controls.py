"""Grant controls: each one either holds or says why not, with the error code users see."""

from __future__ import annotations

from datetime import datetime

from gateway.policy.authentication import AUTHENTICATION_STRENGTH, strength_failure
from gateway.policy.compliance import noncompliance_reason
from gateway.policy.model import (
    BuiltInControl,
    ClientApp,
    ControlFailure,
    DeviceSignals,
    DeviceThreatLevel,
    ErrorCode,
    GrantOperator,
    Identity,
)
from gateway.policy.types import GrantControls

MAX_DEVICE_THREAT_LEVEL = "maxDeviceThreatLevel"
MFA_METHODS = frozenset({"mfa", "ngcmfa"})


def mfa(identity: Identity) -> ControlFailure | None:
    """Entra puts ``mfa`` in the token's ``amr`` claim once the user did multifactor authentication."""
    if identity.authentication_methods & MFA_METHODS:
        return None
    return ControlFailure(control=BuiltInControl.mfa, error_code=ErrorCode.mfa_required,
                          reason="multifactor authentication required")


def compliant_device(device: DeviceSignals, now: datetime) -> ControlFailure | None:
    reason = noncompliance_reason(device.device, now, device.compliance)
    if reason is None:
        return None
    if device.device_id is None:
        reason = "device not identified (the token has no deviceid claim)"
    return ControlFailure(control=BuiltInControl.compliant_device, error_code=ErrorCode.device_not_compliant,
                          reason=reason)


def approved_application(app: ClientApp, approved: tuple[str, ...]) -> ControlFailure | None:
    """The strong signal only: the OAuth client id in the signed token, never a User-Agent."""
    if app.name is not None and app.name in approved:
        return None
    return ControlFailure(control=BuiltInControl.approved_application,
                          error_code=ErrorCode.app_not_approved, reason="app not approved")


def max_device_threat_level(device: DeviceSignals, allowed: DeviceThreatLevel) -> ControlFailure | None:
    """Intune: the device must be at or under the allowed level; no level known fails closed."""
    level = device.device.threat_level if device.device else None
    if level is not None and level.rank <= allowed.rank:
        return None
    shown = level.value if level is not None else "unknown"
    return ControlFailure(control=MAX_DEVICE_THREAT_LEVEL, error_code=ErrorCode.blocked_due_to_risk,
                          reason=f"device risk {shown}, allowed: {allowed.value}")


def block() -> ControlFailure:
    return ControlFailure(control=BuiltInControl.block, error_code=ErrorCode.blocked_by_conditional_access,
                          reason="blocked by policy")


def controls_named(grant: GrantControls | None) -> tuple[str, ...]:
    if grant is None:
        return ()
    names: list[str] = [c.value for c in grant.built_in_controls]
    if grant.max_device_threat_level is not None:
        names.append(MAX_DEVICE_THREAT_LEVEL)
    if grant.authentication_strength is not None:
        names.append(AUTHENTICATION_STRENGTH)
    return tuple(names)


def failed_controls(
    grant: GrantControls | None, identity: Identity, device: DeviceSignals, app: ClientApp, now: datetime
) -> tuple[ControlFailure, ...]:
    """The controls that failed, in the order Entra asks for them; empty when the grant holds."""
    if grant is None:
        return ()
    outcomes: list[ControlFailure | None] = []
    controls = grant.built_in_controls
    if BuiltInControl.block in controls:
        return (block(),)
    if BuiltInControl.mfa in controls:
        outcomes.append(mfa(identity))
    if BuiltInControl.compliant_device in controls:
        outcomes.append(compliant_device(device, now))
    if BuiltInControl.approved_application in controls:
        outcomes.append(approved_application(app, grant.approved_applications))
    if grant.max_device_threat_level is not None:
        outcomes.append(max_device_threat_level(device, grant.max_device_threat_level))
    if grant.authentication_strength is not None:
        outcomes.append(strength_failure(grant.authentication_strength, identity))
    failures = tuple(f for f in outcomes if f is not None)
    if grant.operator is GrantOperator.OR and len(failures) < len(outcomes):
        return ()
    return failures
