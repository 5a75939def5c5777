"""The pure policy engine's fixtures: resources, locations, a policy from its YAML shape, a
device, the apps, and ``decide`` (``evaluate`` for one request), for the policy tests."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from gateway.config.compile import compile_policy_set
from gateway.config.models import ConditionalAccessPolicy, NamedLocation, Resource
from gateway.policy.evaluate import evaluate
from gateway.policy.model import (
    AccessRequest,
    ClientApp,
    ComplianceState,
    Decision,
    DeviceSignals,
    DeviceThreatLevel,
    Identity,
    ManagedDevice,
)

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
RESOURCES = {
    "exchange-activesync": Resource.model_validate_json(json.dumps(
        {"hosts": ["mail.contoso.test"], "paths": ["/Microsoft-Server-ActiveSync"]})),
    "exchange-owa": Resource.model_validate_json(json.dumps({"hosts": ["mail.contoso.test"], "paths": ["/owa/"]})),
}
LOCATIONS = {"office": NamedLocation.model_validate_json('{"ipRanges": ["10.0.0.0/8"], "trusted": true}'),
             "guest-wifi": NamedLocation.model_validate_json('{"ipRanges": ["192.0.2.0/24"]}')}


def policy(name: str = "p", *, state: str = "enabled", include: list[str] | None = None,
           exclude: list[str] | None = None, conditions: dict[str, Any] | None = None,
           session: dict[str, Any] | None = None, **grant: Any) -> ConditionalAccessPolicy:
    document: dict[str, Any] = {
        "name": name, "state": state,
        "conditions": {"resources": {"include": include or ["All"], "exclude": exclude or []}, **(conditions or {})},
    }
    if grant:
        document["grantControls"] = grant
    if session:
        document["sessionControls"] = session
    return ConditionalAccessPolicy.model_validate_json(json.dumps(document), strict=True)


def device(state: str = "compliant", threat: str | None = "low", grace_end: datetime | None = None,
           **attributes: Any) -> DeviceSignals:
    attributes.setdefault("last_sync", NOW - timedelta(hours=2))
    record = ManagedDevice(device_id="d1", display_name=None, user_principal_name=None,
                           operating_system=attributes.pop("operating_system", "iOS"),
                           compliance_state=ComplianceState(state), compliance_grace_period_expiration=grace_end,
                           threat_level=DeviceThreatLevel(threat) if threat else None, threat_source="test",
                           **attributes)
    return DeviceSignals(device_id="d1", device=record, source="test")


UNKNOWN_DEVICE = DeviceSignals(device_id="d9", device=None, source="test")
NO_DEVICE_ID = DeviceSignals(device_id=None, device=None, source="test")
OUTLOOK = ClientApp(client_id="27922004-5251-4030-b22d-91ecd9a37ea4", name="outlook-mobile")
TEAMS = ClientApp(client_id="1fec8e78-bce4-4aaf-ab1b-5451cc387264", name="teams")
OUTLOOK_ONLY = {"builtInControls": ["compliantDevice", "approvedApplication"],
                "approvedApplications": ["outlook-mobile"], "maxDeviceThreatLevel": "low"}


COMPLIANT = device()


def decide(policies: list[ConditionalAccessPolicy], dev: DeviceSignals = COMPLIANT, app: ClientApp = OUTLOOK,
           path: str = "/Microsoft-Server-ActiveSync", *, ip: str = "203.0.113.9",
           user: str = "alex@contoso.test", groups: frozenset[str] = frozenset(), amr: frozenset[str] = frozenset(),
           user_agent: str = "Outlook-iOS-Android/1.0", accepts_html: bool = False) -> Decision:
    request = AccessRequest(correlation_id="c", host="mail.contoso.test", path=path, method="POST",
                            client_ip=ip, user_agent=user_agent, accepts_html=accepts_html)
    identity = Identity(subject="s", user_principal_name=user, object_id="oid-1", tenant_id=None,
                        client_id=app.client_id, device_id=dev.device_id, groups=groups, audience="a",
                        expires_at=0, authentication_methods=amr)
    policy_set = compile_policy_set(RESOURCES, tuple(policies), LOCATIONS)
    found = policy_set.match("mail.contoso.test", path)
    return evaluate(request=request, identity=identity, device=dev, app=app,
                    resources=found.names if found else (), policy_set=policy_set, now=NOW)
