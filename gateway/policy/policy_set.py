"""Policies compiled for evaluation: resources indexed by host and path, and for each resource the
policies that can apply to it. Evaluation then costs what the candidate policies cost, not what
all policies cost; the others' results ("not included", "notEnabled") are computed once here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.config.models import (
    ConditionalAccessPolicy,
    NamedLocation,
    Resource,
    SessionControlsConfig,
    UsersCondition,
)
from gateway.policy.conditions import (
    ALL,
    Network,
    ResourceIndex,
    compile_resources,
    match_resource,
    resource_not_included,
)
from gateway.policy.device_filter import Rule
from gateway.policy.grant_controls import controls_named
from gateway.policy.model import (
    NO_SESSION_CONTROLS,
    PolicyResult,
    PolicyResultKind,
    PolicyState,
    SessionControls,
)


@dataclass(frozen=True, slots=True)
class CompiledUsers:
    """The users assignment with names folded once (UPNs compare case-insensitively)."""

    include_all: bool
    include_users: frozenset[str]
    exclude_users: frozenset[str]
    include_groups: frozenset[str]
    exclude_groups: frozenset[str]

    @classmethod
    def of(cls, users: UsersCondition) -> CompiledUsers:
        return cls(ALL.lower() in {u.lower() for u in users.include_users},
                   frozenset(u.lower() for u in users.include_users), frozenset(u.lower() for u in users.exclude_users),
                   frozenset(users.include_groups), frozenset(users.exclude_groups))


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    policy: ConditionalAccessPolicy
    display_name: str
    device_filter: Rule | None
    users: CompiledUsers
    grant_control_names: tuple[str, ...]
    session_controls: SessionControls

    @classmethod
    def of(cls, policy: ConditionalAccessPolicy) -> CompiledPolicy:
        conditions = policy.conditions
        return cls(policy, policy.display_name or policy.name,
                   conditions.device_filter.parsed if conditions.device_filter else None,
                   CompiledUsers.of(conditions.users), controls_named(policy.grant_controls),
                   _session_controls(policy.session_controls))


def _session_controls(config: SessionControlsConfig | None) -> SessionControls:
    if config is None:
        return NO_SESSION_CONTROLS
    return SessionControls(
        block_downloads=config.block_downloads,
        sign_in_frequency_seconds=config.sign_in_frequency.seconds if config.sign_in_frequency else None,
        persistent_browser=config.persistent_browser,
    )


@dataclass(frozen=True, slots=True)
class PolicySet:
    patterns_by_host: ResourceIndex
    public_resources: frozenset[str]
    candidates: Mapping[str, tuple[CompiledPolicy, ...]]
    not_targeted: Mapping[str, tuple[PolicyResult, ...]]
    named_locations: Mapping[str, tuple[tuple[Network, ...], bool]]
    by_name: Mapping[str, CompiledPolicy]

    @classmethod
    def build(cls, resources: Mapping[str, Resource], policies: tuple[ConditionalAccessPolicy, ...],
              named_locations: Mapping[str, NamedLocation]) -> PolicySet:
        compiled = [CompiledPolicy.of(p) for p in policies]
        candidates = {name: tuple(c for c in compiled if _targets(c.policy, name)) for name in resources}
        not_targeted = {name: tuple(_static_result(c, name) for c in compiled if not _targets(c.policy, name))
                        for name in resources}
        return cls(
            patterns_by_host=compile_resources(resources),
            public_resources=frozenset(name for name, r in resources.items() if r.public),
            candidates=candidates,
            not_targeted=not_targeted,
            named_locations={name: (tuple(location.ip_ranges), location.trusted)  # type: ignore[arg-type]
                             for name, location in named_locations.items()},
            by_name={c.policy.name: c for c in compiled},
        )

    def resource_for(self, host: str, path: str) -> str | None:
        return match_resource(self.patterns_by_host, host, path)


def _targets(policy: ConditionalAccessPolicy, resource: str) -> bool:
    """Enabled or report-only, and naming the resource (or All) in ``include``: the policies worth
    evaluating. Exclusions are left to evaluation so that they are explained."""
    include = policy.conditions.resources.include
    return policy.state is not PolicyState.disabled and (resource in include or ALL in include)


def _static_result(compiled: CompiledPolicy, resource: str) -> PolicyResult:
    policy = compiled.policy
    if policy.state is PolicyState.disabled:
        return PolicyResult(name=policy.name, display_name=compiled.display_name, result=PolicyResultKind.not_enabled)
    kind = PolicyResultKind.report_only_not_applied if policy.state is PolicyState.report_only \
        else PolicyResultKind.not_applied
    return PolicyResult(name=policy.name, display_name=compiled.display_name, result=kind,
                        not_applied_because=resource_not_included(policy.conditions.resources, resource))
