"""The rules as policy reads them: policies, resources and named locations in policy's own frozen
dataclasses. ``gateway/config/compile.py`` builds them from the validated config models, so
policy never depends on the config layer (pydantic, YAML, file errors) and a rule reaches
``evaluate`` already checked and compiled (device filter parsed, sign-in frequency in seconds)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from gateway.policy.device_filter import Rule
from gateway.policy.model import (
    NO_SESSION_CONTROLS,
    BuiltInControl,
    ClientAppType,
    DeviceFilterMode,
    DevicePlatform,
    DeviceThreatLevel,
    GrantOperator,
    Listener,
    PolicyState,
    SessionControls,
)

type Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True, kw_only=True)
class Assignment:
    """Entra's include/exclude pair; ``All`` in ``include`` means every named item."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Users:
    """Users by UPN, object id or subject (``All``, ``None``); groups by name or id, as written;
    issuers by name."""

    include_users: tuple[str, ...] = ()
    exclude_users: tuple[str, ...] = ()
    include_groups: tuple[str, ...] = ()
    exclude_groups: tuple[str, ...] = ()
    include_issuers: tuple[str, ...] = ()  # names of trusted issuers (identity.issuers)
    exclude_issuers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Platforms:
    include: tuple[str, ...]  # "all" or DevicePlatform values
    exclude: tuple[DevicePlatform, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceFilter:
    mode: DeviceFilterMode
    rule: Rule


@dataclass(frozen=True, slots=True, kw_only=True)
class Conditions:
    users: Users
    resources: Assignment
    client_app_types: tuple[ClientAppType, ...] = (ClientAppType.all,)
    platforms: Platforms | None = None
    locations: Assignment | None = None
    device_filter: DeviceFilter | None = None
    # Entra's authentication contexts (c1..c99) the policy targets: the resources carrying them are in
    # ``resources.include`` (compiled so), and a token must carry them in ``acrs`` (a claims challenge)
    authentication_contexts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthenticationStrength:
    """Which sign-ins are strong enough: one of ``combinations`` (authentication method
    references, RFC 8176 ``amr`` values, all present), or an ``acr`` an issuer uses to say so."""

    name: str
    combinations: tuple[frozenset[str], ...]
    acr_values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class GrantControls:
    operator: GrantOperator = GrantOperator.AND
    built_in_controls: tuple[BuiltInControl, ...] = ()
    approved_applications: tuple[str, ...] = ()
    max_device_threat_level: DeviceThreatLevel | None = None
    authentication_strength: AuthenticationStrength | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Rollout:
    """Enforced for the cohort only (see gateway/policy/rollout.py)."""

    groups: tuple[str, ...] = ()
    percent_of_users: int = 0
    listeners: tuple[Listener, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """One Conditional Access policy."""

    name: str
    display_name: str | None
    state: PolicyState
    conditions: Conditions
    grant_controls: GrantControls | None = None
    session_controls: SessionControls = NO_SESSION_CONTROLS
    rollout: Rollout | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Resource:
    """A named part of the protected hosts: path prefixes on whole segments, ``*`` one segment."""

    hosts: tuple[str, ...]
    paths: tuple[str, ...]
    public: bool = False
    downloads: bool = False
    authentication_contexts: tuple[str, ...] = ()  # step-up for this part: policies targeting them apply


@dataclass(frozen=True, slots=True, kw_only=True)
class NamedLocation:
    ip_ranges: tuple[Network, ...]
    trusted: bool = False
