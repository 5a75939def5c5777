"""Evaluate the Conditional Access policies that can apply to one request and combine the results.

Entra's semantics: every applicable enabled policy must be satisfied, a ``block`` anywhere wins,
report-only policies are evaluated and recorded but never enforced, disabled ones are recorded as
``notEnabled``. A policy with a ``rollout`` is enforced inside its cohort and report-only outside
it; its result says which (gateway/policy/rollout.py); ``cohorts`` gives a policy's cohort instead
of working it out (replay: the share of a pseudonymised user cannot be drawn again). For each
policy the first condition that does not match is recorded (users, resources, client app types,
platforms, locations, device filter, in that order); for applied ones, the controls that failed.
A path that no resource names is denied. Pure: no I/O, no clock, no randomness; ``now`` is passed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime

from gateway.policy.authentication import AUTHENTICATION_CONTEXT, AUTHENTICATION_STRENGTH, context_failure
from gateway.policy.conditions import (
    client_app_type,
    client_app_type_not_matched,
    device_filter_attributes,
    device_platform,
    location_not_matched,
    platform_not_matched,
    request_locations,
    resource_not_included,
    user_names,
    users_not_matched,
)
from gateway.policy.device_filter import DeviceAttributes
from gateway.policy.grant_controls import failed_controls
from gateway.policy.model import (
    NO_SESSION_CONTROLS,
    AccessRequest,
    BuiltInControl,
    ClientApp,
    ClientAppType,
    ControlFailure,
    Decision,
    DecisionResult,
    DeviceFilterMode,
    DevicePlatform,
    DeviceSignals,
    ErrorCode,
    Identity,
    PolicyResult,
    PolicyResultKind,
    PolicyState,
    RolloutCohort,
    SessionControls,
)
from gateway.policy.policy_set import CompiledPolicy, PolicySet
from gateway.policy.rollout import CompiledRollout

NO_RESOURCE_REASON = "path is not part of any protected resource"


@dataclass(frozen=True, slots=True)
class Facts:
    """What the conditions look at, worked out once per request."""

    request: AccessRequest
    identity: Identity
    device: DeviceSignals
    app: ClientApp
    resources: tuple[str, ...]
    client_app_type: ClientAppType
    user_names: frozenset[str]
    groups: frozenset[str]
    platform: DevicePlatform | None
    locations: set[str]
    trusted_location: bool
    device_attributes: DeviceAttributes | None
    now: datetime
    cohorts: Mapping[str, RolloutCohort] | None = None  # given cohorts, by policy name
    contexts: frozenset[str] = frozenset()  # the authentication contexts the request's resources carry


def evaluate(
    *,
    request: AccessRequest,
    identity: Identity,
    device: DeviceSignals,
    app: ClientApp,
    resources: tuple[str, ...],
    policy_set: PolicySet,
    now: datetime,
    cohorts: Mapping[str, RolloutCohort] | None = None,
) -> Decision:
    """``resources``: what ``PolicySet.match`` found for the request (empty: no resource names it).
    ``cohorts``: the rollout cohort of these policies (by name), used instead of working it out."""
    app_type = client_app_type(request, identity, app)
    if not resources:
        return Decision(result=DecisionResult.block, status_code=403,
                        error_code=ErrorCode.blocked_by_conditional_access, reason=NO_RESOURCE_REASON,
                        resource=None, client_app_type=app_type)
    inside, trusted = request_locations(request, policy_set.named_locations)
    facts = Facts(request=request, identity=identity, device=device, app=app, resources=resources,
                  client_app_type=app_type, user_names=user_names(identity),
                  groups=frozenset(g.lower() for g in identity.groups),
                  platform=device_platform(device.device, request.user_agent), locations=inside,
                  trusted_location=trusted,
                  device_attributes=device_filter_attributes(device, now), now=now, cohorts=cohorts,
                  contexts=policy_set.contexts_of(resources))
    targeting = policy_set.targeting(resources)
    results = tuple(_evaluate_policy(c, facts) for c in targeting.candidates)
    not_targeted, resource = targeting.not_targeted, resources[0]
    if policy_set.has_rollouts:
        not_targeted = tuple(_in_or_outside_cohort(policy_set, r, facts) for r in not_targeted)
    failed = _deciding_failure(results)
    if failed is None:
        return Decision(result=DecisionResult.allow, status_code=200, error_code=None, reason="allowed",
                        resource=resource, resources=resources, client_app_type=app_type, policies=results,
                        not_targeted=not_targeted,
                        session_controls=_session_controls(policy_set, results))
    policy, failure = failed
    return Decision(result=DecisionResult.block, status_code=403, error_code=failure.error_code,
                    reason=failure.reason, resource=resource, resources=resources, client_app_type=app_type,
                    policies=results,
                    not_targeted=not_targeted, failed_policy=policy.display_name, failed_policy_id=policy.name)


def not_applied_because(compiled: CompiledPolicy, facts: Facts) -> str | None:
    """The first assignment the request falls outside of, or None if the policy applies."""
    conditions = compiled.policy.conditions
    return (
        users_not_matched(compiled.users, facts.user_names, facts.groups, facts.identity.issuer)
        or resource_not_included(conditions.resources, facts.resources)
        or client_app_type_not_matched(conditions.client_app_types, facts.client_app_type)
        or (conditions.platforms and platform_not_matched(conditions.platforms, facts.platform))
        or (conditions.locations and location_not_matched(conditions.locations, facts.locations,
                                                          facts.trusted_location, facts.request.client_ip))
        or _device_filter_not_matched(compiled, facts.device_attributes)
    ) or None


def _device_filter_not_matched(compiled: CompiledPolicy, attributes: DeviceAttributes | None) -> str | None:
    device_filter = compiled.policy.conditions.device_filter
    if device_filter is None:
        return None
    matched = device_filter.rule.matches(attributes)
    if device_filter.mode is DeviceFilterMode.include and not matched:
        return "device does not match the device filter (mode include)"
    if device_filter.mode is DeviceFilterMode.exclude and matched:
        return "device matches the device filter (mode exclude)"
    return None


def _cohort(rollout: CompiledRollout, facts: Facts) -> RolloutCohort:
    given = facts.cohorts.get(rollout.policy_name) if facts.cohorts else None
    return given if given is not None else rollout.cohort(facts.request, facts.identity, facts.groups)


def _evaluate_policy(compiled: CompiledPolicy, facts: Facts) -> PolicyResult:
    policy = compiled.policy
    cohort = _cohort(compiled.rollout, facts) if compiled.rollout else None
    report_only = policy.state is PolicyState.report_only or cohort is RolloutCohort.outside
    why_not = not_applied_because(compiled, facts)
    if why_not is not None:
        kind = PolicyResultKind.report_only_not_applied if report_only else PolicyResultKind.not_applied
        return PolicyResult(name=policy.name, display_name=compiled.display_name, result=kind,
                            not_applied_because=why_not, rollout=cohort)
    failures = failed_controls(policy.grant_controls, facts.identity, facts.device, facts.app, facts.now)
    if policy.conditions.authentication_contexts:  # before any control: a new sign-in for the context first
        context = context_failure(frozenset(policy.conditions.authentication_contexts) & facts.contexts,
                                  facts.identity)
        failures = (context, *failures) if context is not None else failures
    if report_only:
        kind = PolicyResultKind.report_only_failure if failures else PolicyResultKind.report_only_success
    else:
        kind = PolicyResultKind.failure if failures else PolicyResultKind.success
    return PolicyResult(name=policy.name, display_name=compiled.display_name, result=kind,
                        enforced_grant_controls=compiled.grant_control_names,
                        enforced_session_controls=compiled.session_controls.names(), failures=failures,
                        rollout=cohort)


def _in_or_outside_cohort(policy_set: PolicySet, result: PolicyResult, facts: Facts) -> PolicyResult:
    """A rollout policy that does not target these resources: still not applied, but reported
    as report-only outside its cohort, like the policies that do target them."""
    rollout = policy_set.by_name[result.name].rollout
    if rollout is None or result.result is not PolicyResultKind.not_applied:
        return result
    cohort = _cohort(rollout, facts)
    kind = PolicyResultKind.report_only_not_applied if cohort is RolloutCohort.outside else result.result
    return replace(result, result=kind, rollout=cohort)


def _session_controls(policy_set: PolicySet, results: tuple[PolicyResult, ...]) -> SessionControls:
    """The session controls of the enforced policies that applied, strictest value winning."""
    merged = NO_SESSION_CONTROLS
    for result in results:
        if result.result is PolicyResultKind.success and result.enforced_session_controls:
            merged = merged.merge(policy_set.by_name[result.name].session_controls)
    return merged


CONTROL_ORDER = {name: rank for rank, name in enumerate(
    (BuiltInControl.block, AUTHENTICATION_CONTEXT, BuiltInControl.mfa, AUTHENTICATION_STRENGTH,
     BuiltInControl.compliant_device, BuiltInControl.approved_application, BuiltInControl.compliant_application,
     "maxDeviceThreatLevel"))}


def _deciding_failure(results: tuple[PolicyResult, ...]) -> tuple[PolicyResult, ControlFailure] | None:
    """The failure shown to the user, across every enforced policy that failed: a block wins,
    then Entra's order of asking (MFA, compliant device, approved app, app protection, threat level), then the
    policies' order in the file."""
    failures = [(CONTROL_ORDER.get(f.control, len(CONTROL_ORDER)), index, result, f)
                for index, result in enumerate(results) if result.result is PolicyResultKind.failure
                for f in result.failures]
    if not failures:
        return None
    _, _, result, failure = min(failures, key=lambda item: item[:2])
    return result, failure
