"""The config compiled into policy's own types (``gateway/policy/types.py``): the one module that
reads both. It sits on the config side because the config already depends on policy (its models
validate with policy's enums and device filter parser) and policy must not depend back: evaluation
stays a pure function of its own values, with no pydantic, YAML or config errors in reach."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from gateway.config import Config
from gateway.config.models import (
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
from gateway.policy.model import NO_SESSION_CONTROLS, SessionControls
from gateway.policy.policy_set import PolicySet


def compile_policies(config: Config) -> PolicySet:
    """The policy set a gateway evaluates, built once per (re)load."""
    return compile_policy_set(config.resources, config.policies, config.gateway_file.named_locations)


def compile_policy_set(resources: Mapping[str, Resource], policies: Iterable[ConditionalAccessPolicy],
                       named_locations: Mapping[str, NamedLocation]) -> PolicySet:
    return PolicySet.build({name: resource(r) for name, r in resources.items()},
                           tuple(policy(p) for p in policies),
                           {name: named_location(n) for name, n in named_locations.items()})


def policy(model: ConditionalAccessPolicy) -> rules.Policy:
    conditions = model.conditions
    return rules.Policy(
        name=model.name,
        display_name=model.display_name,
        state=model.state,
        conditions=rules.Conditions(
            users=users(conditions.users),
            resources=assignment(conditions.resources),
            client_app_types=tuple(conditions.client_app_types),
            platforms=_platforms(conditions.platforms) if conditions.platforms else None,
            locations=assignment(conditions.locations) if conditions.locations else None,
            device_filter=_device_filter(conditions.device_filter) if conditions.device_filter else None,
        ),
        grant_controls=_grant_controls(model.grant_controls) if model.grant_controls else None,
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
                          downloads=model.downloads)


def named_location(model: NamedLocation) -> rules.NamedLocation:
    return rules.NamedLocation(ip_ranges=tuple(model.ip_ranges), trusted=model.trusted)


def _platforms(model: PlatformsCondition) -> rules.Platforms:
    return rules.Platforms(include=tuple(p.value for p in model.include), exclude=tuple(model.exclude))


def _device_filter(model: DeviceFilter) -> rules.DeviceFilter:
    return rules.DeviceFilter(mode=model.mode, rule=model.parsed)


def _grant_controls(model: GrantControls) -> rules.GrantControls:
    return rules.GrantControls(operator=model.operator, built_in_controls=tuple(model.built_in_controls),
                               approved_applications=tuple(model.approved_applications),
                               max_device_threat_level=model.max_device_threat_level)


def _rollout(model: Rollout) -> rules.Rollout:
    return rules.Rollout(groups=tuple(model.groups), percent_of_users=model.percent_of_users,
                         listeners=tuple(model.listeners))
