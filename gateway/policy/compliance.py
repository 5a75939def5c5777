"""Whether a device counts as compliant, with Intune's semantics and tenant settings.

- ``compliant`` passes; ``inGracePeriod`` passes until its grace period ends.
- ``unknown`` (no compliance policy assigned) follows the tenant setting, not compliant by default.
- A jailbroken device is not compliant, whatever its state says.
- A device that has not synced within the compliance validity period (or never) is not compliant.
- An unknown device (not in the inventory) is not compliant.
- With "block when no data from the MTD partner", a device without a current verdict is not compliant.
"""

from __future__ import annotations

from datetime import datetime

from gateway.policy.model import DEFAULT_COMPLIANCE, ComplianceSettings, ComplianceState, ManagedDevice


def noncompliance_reason(device: ManagedDevice | None, now: datetime,
                         settings: ComplianceSettings = DEFAULT_COMPLIANCE) -> str | None:
    """None when the device counts as compliant, else why not (shown to users and in logs)."""
    if device is None:
        return "device not registered (unknown to the device inventory)"
    if device.jail_broken:
        return "device not compliant (jailbroken)"
    if settings.validity is not None:
        if device.last_sync is None:
            return "device not compliant (never synced, and a compliance validity period is set)"
        if now - device.last_sync > settings.validity:
            return f"device not compliant (last synced {(now - device.last_sync).days} days ago)"
    if settings.block_without_partner_data and device.threat_level is None:
        return "device not compliant (no data from the MTD partner)"
    state = device.compliance_state
    if state is ComplianceState.compliant:
        return None
    if state is ComplianceState.in_grace_period:
        end = device.compliance_grace_period_expiration
        return None if end is not None and now < end else "device not compliant (grace period ended)"
    if state is ComplianceState.unknown and settings.devices_without_policy_compliant:
        return None
    return f"device not compliant (complianceState: {state.value})"


def is_compliant(device: ManagedDevice | None, now: datetime,
                 settings: ComplianceSettings = DEFAULT_COMPLIANCE) -> bool:
    return noncompliance_reason(device, now, settings) is None
