"""Evaluate every Conditional Access policy for one request and combine the results.

Entra's semantics: every applicable enabled policy must be satisfied, a ``block`` anywhere wins,
report-only policies are evaluated and recorded but never enforced, disabled ones are recorded as
``notEnabled``. A path that no resource names is denied: nothing is forwarded by default.
Pure: no I/O, no clock, no randomness; ``now`` is passed in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime

from gateway.config.models import ConditionalAccessPolicy, Resource
from gateway.policy.conditions import client_app_type, match_resource, resource_not_included
from gateway.policy.grant_controls import controls_named, failed_controls
from gateway.policy.model import (
    AccessRequest,
    BuiltInControl,
    ClientApp,
    ControlFailure,
    Decision,
    DecisionResult,
    DeviceSignals,
    ErrorCode,
    Identity,
    PolicyResult,
    PolicyResultKind,
    PolicyState,
)

NO_RESOURCE_REASON = "path is not part of any protected resource"


def evaluate(
    *,
    request: AccessRequest,
    identity: Identity,
    device: DeviceSignals,
    app: ClientApp,
    resources: Mapping[str, Resource],
    policies: Iterable[ConditionalAccessPolicy],
    now: datetime,
) -> Decision:
    app_type = client_app_type(request, identity)
    resource = match_resource(resources, request.host, request.path)
    if resource is None:
        return Decision(result=DecisionResult.block, status_code=403,
                        error_code=ErrorCode.blocked_by_conditional_access, reason=NO_RESOURCE_REASON,
                        resource=None, client_app_type=app_type)
    results = tuple(_evaluate_policy(p, resource, device, app, now) for p in policies)
    failed = _deciding_failure(results)
    if failed is None:
        return Decision(result=DecisionResult.allow, status_code=200, error_code=None, reason="allowed",
                        resource=resource, client_app_type=app_type, policies=results)
    policy, failure = failed
    return Decision(result=DecisionResult.block, status_code=403, error_code=failure.error_code,
                    reason=failure.reason, resource=resource, client_app_type=app_type,
                    policies=results, failed_policy=policy.display_name)


def _evaluate_policy(
    policy: ConditionalAccessPolicy, resource: str, device: DeviceSignals, app: ClientApp, now: datetime
) -> PolicyResult:
    name, display_name = policy.name, policy.display_name or policy.name
    if policy.state is PolicyState.disabled:
        return PolicyResult(name=name, display_name=display_name, result=PolicyResultKind.not_enabled)
    report_only = policy.state is PolicyState.report_only
    why_not = resource_not_included(policy.conditions.resources, resource)
    if why_not is not None:
        kind = PolicyResultKind.report_only_not_applied if report_only else PolicyResultKind.not_applied
        return PolicyResult(name=name, display_name=display_name, result=kind, not_applied_because=why_not)
    failures = failed_controls(policy.grant_controls, device, app, now)
    if report_only:
        kind = PolicyResultKind.report_only_failure if failures else PolicyResultKind.report_only_success
    else:
        kind = PolicyResultKind.failure if failures else PolicyResultKind.success
    return PolicyResult(name=name, display_name=display_name, result=kind,
                        enforced_grant_controls=controls_named(policy.grant_controls), failures=failures)


def _deciding_failure(results: tuple[PolicyResult, ...]) -> tuple[PolicyResult, ControlFailure] | None:
    """The failure shown to the user: a block anywhere wins, else the first failed policy's first
    failed control (controls are ordered as Entra asks for them)."""
    enforced = [r for r in results if r.result is PolicyResultKind.failure]
    for result in enforced:
        for failure in result.failures:
            if failure.control == BuiltInControl.block:
                return result, failure
    if enforced:
        return enforced[0], enforced[0].failures[0]
    return None
