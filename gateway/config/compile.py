"""The config compiled into policy's own types (``gateway/policy/types.py``): the one module that
reads both. It sits on the config side because the config already depends on policy (its models
validate with policy's enums and device filter parser) and policy must not depend back: evaluation
stays a pure function of its own values, with no pydantic, YAML or config errors in reach."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from gateway.config import Config
from gateway.config.models import (
    AuthenticationStrengthConfig,
    ConditionalAccessPolicy,
    DeviceFilter,
    GrantControls,
    Include,
    NamedLocation,
    PlatformsCondition,
    Resource,
    Rollout,
    SessionControlsConfig,
    UsersCondition,
)
from gateway.policy import types as rules
from gateway.policy.authentication import BUILT_IN_STRENGTHS
from gateway.policy.model import NO_SESSION_CONTROLS, SessionControls
from gateway.policy.policy_set import PolicySet


def compile_policies(config: Config) -> PolicySet:
    """The policy set a gateway evaluates, built once per (re)load."""
    return compile_policy_set(config.resources, config.policies, config.gateway_file.named_locations,
                              config.gateway_file.authentication_strengths)


def compile_policy_set(resources: Mapping[str, Resource], policies: Iterable[ConditionalAccessPolicy],
                       named_locations: Mapping[str, NamedLocation],
                       strengths: Mapping[str, AuthenticationStrengthConfig] | None = None) -> PolicySet:
    known = {**BUILT_IN_STRENGTHS, **{name: strength(name, s) for name, s in (strengths or {}).items()}}
    return PolicySet.build({name: resource(r) for name, r in resources.items()},
                           tuple(policy(p, resources, known) for p in policies),
                           {name: named_location(n) for name, n in named_locations.items()})


def policy(model: ConditionalAccessPolicy, resources: Mapping[str, Resource] | None = None,
           strengths: Mapping[str, rules.AuthenticationStrength] | None = None) -> rules.Policy:
    """``resources``: every resource, for a policy that targets authentication contexts (those
    carrying them join its ``include``); ``strengths``: the authentication strengths by name."""
    conditions = model.conditions
    return rules.Policy(
        name=model.name,
        display_name=model.display_name,
        state=model.state,
        conditions=rules.Conditions(
            users=users(conditions.users),
            resources=_targeted(conditions.resources, conditions.authentication_contexts, resources or {}),
            authentication_contexts=tuple(conditions.authentication_contexts),
            client_app_types=tuple(conditions.client_app_types),
            platforms=_platforms(conditions.platforms) if conditions.platforms else None,
            locations=assignment(conditions.locations) if conditions.locations else None,
            device_filter=_device_filter(conditions.device_filter) if conditions.device_filter else None,
        ),
        grant_controls=_grant_controls(model.grant_controls, strengths or BUILT_IN_STRENGTHS)
        if model.grant_controls else None,
        session_controls=session_controls(model.session_controls),
        rollout=_rollout(model.rollout) if model.rollout else None,
    )


def users(model: UsersCondition) -> rules.Users:
    return rules.Users(include_users=tuple(model.include_users), exclude_users=tuple(model.exclude_users),
                       include_groups=tuple(model.include_groups), exclude_groups=tuple(model.exclude_groups),
                       include_issuers=tuple(model.include_issuers), exclude_issuers=tuple(model.exclude_issuers))


def assignment(model: Include) -> rules.Assignment:
    return rules.Assignment(include=tuple(model.include), exclude=tuple(model.exclude))


def session_controls(model: SessionControlsConfig | None) -> SessionControls:
    if model is None:
        return NO_SESSION_CONTROLS
    return SessionControls(
        block_downloads=model.block_downloads,
        block_uploads=model.block_uploads,
        sign_in_frequency_seconds=model.sign_in_frequency.seconds if model.sign_in_frequency else None,
        persistent_browser=model.persistent_browser,
        token_protection=model.token_protection,
    )


def resource(model: Resource) -> rules.Resource:
    return rules.Resource(hosts=tuple(model.hosts), paths=tuple(model.paths), public=model.public,
                          downloads=model.downloads, authentication_contexts=tuple(model.authentication_contexts))


def strength(name: str, model: AuthenticationStrengthConfig) -> rules.AuthenticationStrength:
    return rules.AuthenticationStrength(name=name, combinations=tuple(frozenset(c) for c in model.allowed_combinations),
                                        acr_values=tuple(model.acr_values))


def _targeted(model: Include, contexts: list[str], resources: Mapping[str, Resource]) -> rules.Assignment:
    """The resources a policy targets: those it names, and those carrying a context it targets."""
    carrying = [name for name, r in resources.items() if set(r.authentication_contexts) & set(contexts)]
    return rules.Assignment(include=tuple(dict.fromkeys((*model.include, *carrying))), exclude=tuple(model.exclude))


def named_location(model: NamedLocation) -> rules.NamedLocation:
    return rules.NamedLocation(ip_ranges=tuple(model.ip_ranges), trusted=model.trusted)


def _platforms(model: PlatformsCondition) -> rules.Platforms:
    return rules.Platforms(include=tuple(p.value for p in model.include), exclude=tuple(model.exclude))


def _device_filter(model: DeviceFilter) -> rules.DeviceFilter:
    return rules.DeviceFilter(mode=model.mode, rule=model.parsed)


def _grant_controls(model: GrantControls, strengths: Mapping[str, rules.AuthenticationStrength]) -> rules.GrantControls:
    named = model.authentication_strength
    return rules.GrantControls(operator=model.operator, built_in_controls=tuple(model.built_in_controls),
                               approved_applications=tuple(model.approved_applications),
                               max_device_threat_level=model.max_device_threat_level,
                               authentication_strength=strengths[named] if named is not None else None)


def _rollout(model: Rollout) -> rules.Rollout:
    return rules.Rollout(groups=tuple(model.groups), percent_of_users=model.percent_of_users,
                         listeners=tuple(model.listeners))
