"""Time the decision function alone for 10, 100 and 1,000 policies (warm, one process, side by side).

Policies are spread over resources as in a large tenant: each resource has a handful of policies
(five here) plus two that target All, so a request's candidates stay few while the total grows.
The index should make the 1,000 : 10 ratio close to 1 (target <= 2).

    .venv/bin/python bench/policy_eval.py
"""

from __future__ import annotations

import json
import statistics
import sys
import timeit
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.config.compile import compile_policy_set
from gateway.config.models import ConditionalAccessPolicy, Resource
from gateway.policy.evaluate import evaluate
from gateway.policy.model import (
    AccessRequest,
    ClientApp,
    ComplianceState,
    DeviceSignals,
    DeviceThreatLevel,
    Identity,
    ManagedDevice,
)

HOST = "mail.contoso.test"
PER_RESOURCE = 5
NOW = datetime(2026, 11, 23, tzinfo=UTC)


def policies_and_resources(count: int) -> tuple[dict[str, Resource], tuple[ConditionalAccessPolicy, ...]]:
    resource_count = max(1, (count - 2) // PER_RESOURCE)
    resources = {f"r{i}": Resource.model_validate_json(json.dumps({"hosts": [HOST], "paths": [f"/r{i}/"]}))
                 for i in range(resource_count)}
    documents = [{"name": f"all-{i}", "state": "enabled", "conditions": {"resources": {"include": ["All"]}},
                  "grantControls": {"builtInControls": ["compliantDevice"]}} for i in range(2)]
    for i in range(count - 2):
        documents.append({
            "name": f"p{i}", "state": "reportOnly" if i % 10 == 0 else "enabled",
            "conditions": {"resources": {"include": [f"r{i % resource_count}"]},
                           "users": {"includeUsers": ["All"], "excludeGroups": ["break-glass"]},
                           "clientAppTypes": ["mobileAppsAndDesktopClients", "exchangeActiveSync"]},
            "grantControls": {"builtInControls": ["compliantDevice", "approvedApplication"],
                              "approvedApplications": ["outlook"], "maxDeviceThreatLevel": "medium"},
        })
    return resources, tuple(ConditionalAccessPolicy.model_validate_json(json.dumps(d)) for d in documents)


def measure(count: int) -> tuple[float, int]:
    resources, policies = policies_and_resources(count)
    policy_set = compile_policy_set(resources, policies, {})
    request = AccessRequest(correlation_id="bench", host=HOST, path="/r0/inbox", method="GET",
                            client_ip="203.0.113.5", user_agent="Outlook-iOS-Android/1.0", accepts_html=False)
    identity = Identity(subject="s", user_principal_name="alex@contoso.test", object_id="o", tenant_id="t",
                        client_id="c", device_id="d", groups=frozenset({"staff"}), audience="a", expires_at=0)
    device = DeviceSignals(device_id="d", source="bench", device=ManagedDevice(
        device_id="d", display_name=None, user_principal_name=None, operating_system="iOS",
        compliance_state=ComplianceState.compliant, compliance_grace_period_expiration=None,
        threat_level=DeviceThreatLevel.low, threat_source="bench", last_sync=NOW))
    app = ClientApp(client_id="c", name="outlook")

    def decide() -> object:
        found = policy_set.match(HOST, request.path)
        return evaluate(request=request, identity=identity, device=device, app=app,
                        resources=found.names if found else (), policy_set=policy_set, now=NOW)

    decision = decide()
    assert decision.allowed, decision.reason  # type: ignore[attr-defined]
    runs = [min(timeit.repeat(decide, number=2000, repeat=5)) / 2000 for _ in range(3)]
    return statistics.median(runs) * 1e6, len(decision.policies)  # type: ignore[attr-defined]


def main() -> None:
    results = {}
    print(f"{'policies':>9} {'evaluated':>10} {'µs per decision':>16}")
    for count in (10, 100, 1000):
        micros, evaluated = measure(count)
        results[count] = micros
        print(f"{count:>9} {evaluated:>10} {micros:>16.1f}")
    print(f"ratio 1,000 : 10 = {results[1000] / results[10]:.2f} (target <= 2)")


if __name__ == "__main__":
    main()
