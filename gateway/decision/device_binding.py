"""Which device a request comes from when the connection carries a device certificate, and
whether its token may be used there. Pure: the pipeline calls these with what the sources found.

A certificate beats a claim: an MDM-issued client certificate (its key in the device's keystore)
proves the device; a token's ``deviceid`` claim only says which device the token was issued to.

- A certificate that is presented but not believed (``DeviceCertificate.problem``: expired, unknown
  CA, revoked, naming no device or two) refuses the request, whether or not the host requires one:
  a device that shows a bad certificate is not treated as one that shows none.
- A host that requires a certificate refuses a request without one, with a page that says what to
  install (never a TLS error the browser cannot explain).
- A verified certificate names the device the decision uses; a token or browser session naming
  another device is refused ("token issued to another device"): a stolen token replayed from
  another managed device fails here.
- ``tokenProtection`` (a policy's session control) also refuses a token or session that names no
  device, or a connection without a certificate: the token must be bound to this connection's device.
"""

from __future__ import annotations

from datetime import datetime

from gateway.policy.compliance import noncompliance_reason
from gateway.policy.model import ComplianceSettings, DeviceCertificate, ManagedDevice

CERTIFICATE_REQUIRED = ("this resource needs your organisation's device certificate; install it from the company "
                        "portal (or your MDM), then open the page again on that device")
TOKEN_ISSUED_TO_ANOTHER_DEVICE = "token issued to another device than the device certificate names"  # noqa: S105  (a reason)
TOKEN_NOT_BOUND = "token protection: the token is not bound to a device certificate on this connection"  # noqa: S105
SESSION_BOUND = "this browser session was signed in with a device certificate: open it on that device"
LEGACY_NEEDS_CERTIFICATE = "legacy ActiveSync (Basic) needs this device's certificate"
NOT_IN_INVENTORY = "the device certificate names a device that is not in the inventory"


def certificate_problem(certificate: DeviceCertificate | None, *, required: bool) -> str | None:
    """Why the connection's certificate refuses the request before any device is looked up, or None."""
    if certificate is None:
        return CERTIFICATE_REQUIRED if required else None
    if certificate.problem is not None:
        return f"device certificate not accepted: {certificate.problem}"
    if certificate.device_value is None:
        return "device certificate not accepted: it names no device"
    return None


def resolution_problem(certificate: DeviceCertificate, device_ids: list[str]) -> str | None:
    """The certificate's device must be exactly one inventory device (a serial number shared by two
    records after a re-enrolment names neither)."""
    if not device_ids:
        return NOT_IN_INVENTORY
    if len(device_ids) > 1:
        return f"the device certificate's {certificate.device_key} names {len(device_ids)} devices in the inventory"
    return None


def token_device_problem(token_device_id: str | None, certificate_device_id: str | None) -> str | None:
    """A token (or session) that names a device must name the certificate's device."""
    if certificate_device_id is None or token_device_id is None:
        return None
    return None if token_device_id.lower() == certificate_device_id.lower() else TOKEN_ISSUED_TO_ANOTHER_DEVICE


def session_problem(session_device_id: str | None, certificate_device_id: str | None) -> str | None:
    """A browser session signed in on a certificate connection is that device's: honoured only where
    the certificate names it again (its cookie copied into another browser is refused)."""
    if certificate_device_id is None or session_device_id is None:
        return SESSION_BOUND
    return None if session_device_id.lower() == certificate_device_id.lower() else SESSION_BOUND


def token_protection_problem(token_device_id: str | None, certificate_device_id: str | None) -> str | None:
    """``tokenProtection``: honoured only when the certificate names the device the token names."""
    if certificate_device_id is None or token_device_id is None:
        return TOKEN_NOT_BOUND
    return token_device_problem(token_device_id, certificate_device_id)


def legacy_active_sync_problem(user: str | None, certificate_device_id: str | None, device: ManagedDevice | None,
                               now: datetime, compliance: ComplianceSettings) -> str | None:
    """Basic authentication (``legacyActiveSync``) is believed only on a connection whose
    certificate names a compliant inventory device registered to that same user."""
    if certificate_device_id is None or device is None:
        return LEGACY_NEEDS_CERTIFICATE
    if (device.user_principal_name or "").lower() != (user or "").lower():
        return "legacy ActiveSync: the device certificate names a device of another user"
    noncompliant = noncompliance_reason(device, now, compliance)
    return None if noncompliant is None else f"legacy ActiveSync: {noncompliant}"
