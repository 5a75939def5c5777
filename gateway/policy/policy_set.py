"""Policies compiled for evaluation: resources indexed by host and first path segment, and for each
set of matching resources the policies that can apply. Evaluation then costs what the candidate
policies cost, not what all policies cost; the others' results ("not included", "notEnabled")
are computed once per set of resources and cached.

A request is every resource whose paths match it (``/sites/finance/_api/x`` is both
``finance-sites`` and ``sharepoint-api``), so the policies of each apply. Only ``public`` is
decided by the most specific match alone: it is a carve-out (``/owa/auth/`` inside ``/owa/``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from cachetools import LRUCache

from gateway.policy.conditions import (
    CompiledUsers,
    ResourceIndex,
    compile_resources,
    matching_patterns,
    resource_not_included,
)
from gateway.policy.grant_controls import controls_named
from gateway.policy.model import (
    ALL,
    NO_SESSION_CONTROLS,
    BuiltInControl,
    ClientAppType,
    PolicyResult,
    PolicyResultKind,
    PolicyState,
    SessionControls,
)
from gateway.policy.rollout import CompiledRollout
from gateway.policy.types import NamedLocation, Network, Policy, Resource

TARGETING_CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    policy: Policy
    index: int
    display_name: str
    users: CompiledUsers
    grant_control_names: tuple[str, ...]
    rollout: CompiledRollout | None = None  # enforced for a cohort only

    @classmethod
    def of(cls, policy: Policy, index: int) -> CompiledPolicy:
        return cls(policy, index, policy.display_name or policy.name, CompiledUsers.of(policy.conditions.users),
                   controls_named(policy.grant_controls), CompiledRollout.of(policy))

    @property
    def session_controls(self) -> SessionControls:
        return self.policy.session_controls


@dataclass(frozen=True, slots=True)
class ResourceMatch:
    """The resources a request belongs to, most specific first."""

    names: tuple[str, ...]
    public: bool

    @property
    def primary(self) -> str:
        return self.names[0]


@dataclass(frozen=True, slots=True)
class Targeting:
    candidates: tuple[CompiledPolicy, ...]
    not_targeted: tuple[PolicyResult, ...]


@dataclass(frozen=True, slots=True)
class PolicySet:
    index: ResourceIndex
    public_resources: frozenset[str]
    download_resources: frozenset[str]
    policies: tuple[CompiledPolicy, ...]
    targeting_by_resource: Mapping[str, frozenset[int]]
    named_locations: Mapping[str, tuple[tuple[Network, ...], bool]]
    by_name: Mapping[str, CompiledPolicy]
    has_rollouts: bool = False  # a policy's result then depends on the user even where it is not targeted
    contexts_by_resource: Mapping[str, frozenset[str]] = field(default_factory=dict)  # authentication contexts
    uses_app_protection: bool = False  # a policy asks for compliantApplication: registrations are looked up
    _targeting: LRUCache[tuple[str, ...], Targeting] = field(
        default_factory=lambda: LRUCache(maxsize=TARGETING_CACHE_SIZE), compare=False, repr=False)

    @classmethod
    def build(cls, resources: Mapping[str, Resource], policies: tuple[Policy, ...],
              named_locations: Mapping[str, NamedLocation]) -> PolicySet:
        """From policy's own types: ``gateway/config/compile.py`` compiles the config into them."""
        compiled = tuple(CompiledPolicy.of(p, i) for i, p in enumerate(policies))
        return cls(
            index=compile_resources(resources),
            public_resources=frozenset(name for name, r in resources.items() if r.public),
            download_resources=frozenset(name for name, r in resources.items() if r.downloads),
            policies=compiled,
            targeting_by_resource={name: frozenset(c.index for c in compiled if _targets(c.policy, name))
                                   for name in resources},
            named_locations={name: (location.ip_ranges, location.trusted)
                             for name, location in named_locations.items()},
            by_name={c.policy.name: c for c in compiled},
            has_rollouts=any(c.rollout is not None for c in compiled),
            contexts_by_resource={name: frozenset(r.authentication_contexts) for name, r in resources.items()
                                  if r.authentication_contexts},
            uses_app_protection=any(p.grant_controls is not None and BuiltInControl.compliant_application in
                                    p.grant_controls.built_in_controls for p in policies),
        )

    def match(self, host: str, path: str) -> ResourceMatch | None:
        patterns = matching_patterns(self.index, host, path)
        if not patterns:
            return None
        best = patterns[0]
        public = best.resource in self.public_resources and not any(
            p.specificity == best.specificity and p.resource not in self.public_resources for p in patterns)
        if public:
            return ResourceMatch((best.resource,), True)
        names = tuple(dict.fromkeys(p.resource for p in patterns if p.resource not in self.public_resources))
        return ResourceMatch(names, False)

    def contexts_of(self, resources: tuple[str, ...]) -> frozenset[str]:
        """The authentication contexts (c1..c99) these resources carry."""
        if not self.contexts_by_resource:  # most configs: no resource carries one
            return frozenset()
        return frozenset().union(*(self.contexts_by_resource.get(r, frozenset()) for r in resources))

    def session_controls_for_browsers(self) -> SessionControls:
        """The strictest session controls any enabled policy could put on a browser session, for
        what must be fixed when the session is made (``persistentBrowser``)."""
        merged = NO_SESSION_CONTROLS
        for compiled in self.policies:
            types = compiled.policy.conditions.client_app_types
            if compiled.policy.state is PolicyState.enabled and (
                    ClientAppType.all in types or ClientAppType.browser in types):
                merged = merged.merge(compiled.session_controls)
        return merged

    def targeting(self, resources: tuple[str, ...]) -> Targeting:
        """The policies worth evaluating for these resources, and the others' fixed results."""
        cached = self._targeting.get(resources)
        if cached is None:
            wanted = frozenset().union(*(self.targeting_by_resource.get(r, frozenset()) for r in resources))
            cached = Targeting(
                candidates=tuple(c for c in self.policies if c.index in wanted),
                not_targeted=tuple(_static_result(c, resources) for c in self.policies if c.index not in wanted),
            )
            self._targeting[resources] = cached
        return cached


def _targets(policy: Policy, resource: str) -> bool:
    """Enabled or report-only, and naming the resource (or All) in ``include``: the policies worth
    evaluating. Exclusions are left to evaluation so that they are explained."""
    include = policy.conditions.resources.include
    return policy.state is not PolicyState.disabled and (resource in include or ALL in include)


def _static_result(compiled: CompiledPolicy, resources: tuple[str, ...]) -> PolicyResult:
    policy = compiled.policy
    if policy.state is PolicyState.disabled:
        return PolicyResult(name=policy.name, display_name=compiled.display_name, result=PolicyResultKind.not_enabled)
    kind = PolicyResultKind.report_only_not_applied if policy.state is PolicyState.report_only \
        else PolicyResultKind.not_applied
    return PolicyResult(name=policy.name, display_name=compiled.display_name, result=kind,
                        not_applied_because=resource_not_included(policy.conditions.resources, resources))
