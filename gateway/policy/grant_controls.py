"""Grant controls: each one either holds or says why not, with the error code users see."""

from __future__ import annotations

from datetime import datetime, timedelta

from gateway.policy.authentication import AUTHENTICATION_STRENGTH, strength_failure
from gateway.policy.compliance import noncompliance_reason
from gateway.policy.model import (
    AppRegistration,
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


def compliant_application(app: ClientApp, identity: Identity, now: datetime) -> ControlFailure | None:
    """Entra's "Require app protection policy": the token's app has a registration for this user
    (on this device, when the token names one and the registration does) with a policy applied,
    not flagged, and checked in within ``max_sync_age``. Needs no enrolled device (BYOD)."""
    reason = app_protection_problem(app, identity, now)
    if reason is None:
        return None
    return ControlFailure(control=BuiltInControl.compliant_application,
                          error_code=ErrorCode.app_protection_required, reason=reason)


def app_protection_problem(app: ClientApp, identity: Identity, now: datetime) -> str | None:
    """None when one registration holds; else why the first one (or the lack of one) does not."""
    problem = app_protection_state(app, identity, now)[1]
    return None if problem is None else f"app protection policy required: {problem}"


def app_protection_state(app: ClientApp, identity: Identity, now: datetime) -> tuple[str, str | None]:
    """The registrations' state as the decision log names it (``registered``, ``notRegistered``,
    ``otherDevice``, ``flagged``, ``noPolicyApplied``, ``notCheckedIn``) and the problem, if any."""
    protection = app.protection
    registrations = protection.registrations if protection is not None else ()
    device_id = (identity.device_id or "").lower()
    on_device = [r for r in registrations if not device_id or r.device_id is None or r.device_id == device_id]
    if not on_device:
        if registrations:
            return "otherDevice", "no registration of this app for this user on this device"
        return "notRegistered", "no registration of this app for this user"
    max_age = protection.max_sync_age if protection is not None else None
    states = [_registration_state(r, max_age, now) for r in on_device]
    return next((state for state in states if state[1] is None), states[0])


def _registration_state(registration: AppRegistration, max_age: timedelta | None,
                        now: datetime) -> tuple[str, str | None]:
    if registration.flagged_reasons:
        return "flagged", "registration flagged (" + ", ".join(registration.flagged_reasons) + ")"
    if not registration.applied_policies:
        return "noPolicyApplied", "no app protection policy applied to the app"
    if max_age is None:
        return "registered", None
    if registration.last_sync is None:
        return "notCheckedIn", "the app never checked in with Intune"
    age = now - registration.last_sync
    if age > max_age:
        return "notCheckedIn", f"the app last checked in {round(age.total_seconds())}s ago " \
                               f"(allowed: {round(max_age.total_seconds())}s)"
    return "registered", None


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
    if BuiltInControl.compliant_application in controls:
        outcomes.append(compliant_application(app, identity, now))
    if grant.max_device_threat_level is not None:
        outcomes.append(max_device_threat_level(device, grant.max_device_threat_level))
    if grant.authentication_strength is not None:
        outcomes.append(strength_failure(grant.authentication_strength, identity))
    failures = tuple(f for f in outcomes if f is not None)
    if grant.operator is GrantOperator.OR and len(failures) < len(outcomes):
        return ()
    return failures
