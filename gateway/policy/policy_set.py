"""Policies compiled for evaluation: resources indexed by host and path, and for each resource the
policies that can apply to it. Evaluation then costs what the candidate policies cost, not what
all policies cost; the others' results ("not included", "notEnabled") are computed once here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.config.models import ConditionalAccessPolicy, NamedLocation, Resource
from gateway.policy.conditions import (
    ALL,
    Network,
    PathPattern,
    compile_resources,
    match_resource,
    resource_not_included,
)
from gateway.policy.device_filter import Rule
from gateway.policy.model import PolicyResult, PolicyResultKind, PolicyState


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    policy: ConditionalAccessPolicy
    display_name: str
    device_filter: Rule | None


@dataclass(frozen=True, slots=True)
class PolicySet:
    patterns_by_host: Mapping[str, tuple[PathPattern, ...]]
    public_resources: frozenset[str]
    candidates: Mapping[str, tuple[CompiledPolicy, ...]]
    not_targeted: Mapping[str, tuple[PolicyResult, ...]]
    named_locations: Mapping[str, tuple[tuple[Network, ...], bool]]
    by_name: Mapping[str, CompiledPolicy]

    @classmethod
    def build(cls, resources: Mapping[str, Resource], policies: tuple[ConditionalAccessPolicy, ...],
              named_locations: Mapping[str, NamedLocation]) -> PolicySet:
        compiled = [CompiledPolicy(p, p.display_name or p.name,
                                   p.conditions.device_filter.parsed if p.conditions.device_filter else None)
                    for p in policies]
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
