"""Matching a request against policy assignments: users, resources, client app types, platforms,
locations and the device filter. Each check answers None when it matches, or why it does not.

No I/O here. Paths arrive canonical (see ``gateway.http.paths``); resource matching is
case-insensitive because Exchange and SharePoint run on IIS, where ``/OWA/`` and ``/owa/`` are the
same page.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime

from gateway.policy.compliance import is_compliant
from gateway.policy.device_filter import DeviceAttributes
from gateway.policy.model import (
    ALL,
    ALL_TRUSTED,
    AccessRequest,
    ClientApp,
    ClientAppType,
    DevicePlatform,
    DeviceSignals,
    Identity,
    ManagedDevice,
)
from gateway.policy.types import Assignment, Network, Platforms, Resource, Users

ACTIVESYNC_PATH = "/microsoft-server-activesync"


@dataclass(frozen=True, slots=True)
class PathPattern:
    """A resource path: a prefix on whole segments, ``*`` standing for one segment."""

    resource: str
    pattern: str
    regex: re.Pattern[str]
    specificity: tuple[int, int, int]  # literal segments, literal characters, fewer wildcards

    @classmethod
    def compile(cls, resource: str, pattern: str) -> PathPattern:
        segments = pattern.rstrip("/").split("/")
        body = "/".join("[^/]+" if s == "*" else re.escape(s) for s in segments)
        literal = [s for s in segments if s and s != "*"]
        return cls(resource, pattern, re.compile(f"^{body}(?:/.*)?$", re.IGNORECASE | re.DOTALL),
                   (len(literal), sum(map(len, literal)), -segments.count("*")))


type ResourceIndex = Mapping[str, Mapping[str, tuple[PathPattern, ...]]]
WILDCARD = "*"


def compile_resources(resources: Mapping[str, Resource]) -> ResourceIndex:
    """Host -> first path segment (lower-cased; ``*`` for patterns starting with one, ``""`` for
    ``/``) -> patterns, most specific first: a lookup reads three short lists, however many
    resources there are."""
    index: dict[str, dict[str, list[PathPattern]]] = {}
    for name, resource in resources.items():
        for host in resource.hosts:
            for path in resource.paths:
                first = path.split("/")[1].lower()
                index.setdefault(host, {}).setdefault(first, []).append(PathPattern.compile(name, path))
    return {host: {first: tuple(sorted(patterns, key=lambda p: p.specificity, reverse=True))
                   for first, patterns in by_first.items()}
            for host, by_first in index.items()}


def path_has_prefix(path: str, prefix: str) -> bool:
    """Prefix match on whole segments: ``/owa/`` matches ``/owa`` and ``/owa/x``, not ``/owax``."""
    return _prefix_pattern(prefix).regex.match(path) is not None


@functools.lru_cache(maxsize=256)  # the prefixes are the code's and the config's: a handful
def _prefix_pattern(prefix: str) -> PathPattern:
    return PathPattern.compile("", prefix)


def matching_patterns(index: ResourceIndex, host: str, path: str) -> list[PathPattern]:
    """Every pattern that matches, most specific first."""
    by_first = index.get(host)
    if by_first is None:
        return []
    first = path.split("/", 2)[1].lower() if path.startswith("/") else ""
    lists = [by_first.get(first, ()), by_first.get(WILDCARD, ())]
    if first:
        lists.append(by_first.get("", ()))
    found = [pattern for patterns in lists for pattern in patterns if pattern.regex.match(path)]
    return sorted(found, key=lambda p: p.specificity, reverse=True)


def user_names(identity: Identity) -> frozenset[str]:
    """The names a users assignment may list for this user: UPN, object id, subject (folded)."""
    return frozenset(n.lower() for n in (identity.user_principal_name, identity.object_id, identity.subject) if n)


@dataclass(frozen=True, slots=True)
class CompiledUsers:
    """The users assignment with names and groups folded once (both compare case-insensitively).
    With nothing included but exclusions given, every user is included, as in Entra's portal."""

    include_all: bool
    exclude_all: bool
    include_users: frozenset[str]
    exclude_users: frozenset[str]
    include_groups: frozenset[str]
    exclude_groups: frozenset[str]
    include_issuers: frozenset[str] = frozenset()
    exclude_issuers: frozenset[str] = frozenset()

    @classmethod
    def of(cls, users: Users) -> CompiledUsers:
        include = frozenset(u.lower() for u in users.include_users)
        exclude = frozenset(u.lower() for u in users.exclude_users)
        nothing_included = not users.include_users and not users.include_groups and not users.include_issuers
        return cls("all" in include or nothing_included, "all" in exclude, include, exclude,
                   frozenset(g.lower() for g in users.include_groups),
                   frozenset(g.lower() for g in users.exclude_groups),
                   frozenset(i.lower() for i in users.include_issuers),
                   frozenset(i.lower() for i in users.exclude_issuers))


def users_not_matched(users: CompiledUsers, names: frozenset[str], groups: frozenset[str],
                      issuer: str | None = None) -> str | None:
    """``names`` and ``groups`` arrive folded to lower case, as the compiled assignment is;
    ``issuer`` is the name of the token's trusted issuer (None: no token, as ActiveSync Basic)."""
    if users.exclude_all or not names.isdisjoint(users.exclude_users) or not groups.isdisjoint(users.exclude_groups):
        return "user is excluded"
    if issuer is not None and issuer.lower() in users.exclude_issuers:
        return "user's issuer is excluded"
    if users.include_all or not names.isdisjoint(users.include_users) or not groups.isdisjoint(users.include_groups):
        return None
    if issuer is not None and issuer.lower() in users.include_issuers:
        return None
    return "user is not included"


def resource_not_included(assignment: Assignment, resources: tuple[str, ...]) -> str | None:
    """Why the request's resources are outside the assignment, or None if one of them is inside.
    A request is every resource whose paths match it, so excluding one (``sharepoint-sites``)
    does not exclude another that also matches (``sharepoint-downloads``); exclude beats include
    for each resource."""
    if ALL in assignment.exclude:
        return f"{_named(resources)} excluded (All)"
    inside = [r for r in resources if r in assignment.include or ALL in assignment.include]
    if any(r not in assignment.exclude for r in inside):
        return None
    return f"{_named(resources)} {'excluded' if inside else 'not included'}"


def _named(resources: tuple[str, ...]) -> str:
    if len(resources) == 1:
        return f"resource {resources[0]!r} is"
    return f"resources {', '.join(repr(r) for r in resources)} are"


def client_app_type(request: AccessRequest, identity: Identity | None, app: ClientApp | None = None) -> ClientAppType:
    """Entra's client app types, strongest signal first: the ActiveSync URL; a token whose client
    id is a configured (native) application; browser headers (a weak signal: anyone can send
    them, so they never outrank a known client id); any other client id; else ``other``."""
    if request.declared_client_app_type is not None:
        return request.declared_client_app_type
    if request.kiosk_location is not None:
        return ClientAppType.browser  # a kiosk is a browser, whatever its headers or token say
    if path_has_prefix(request.path, ACTIVESYNC_PATH):
        return ClientAppType.exchange_active_sync
    if app is not None and app.name is not None:
        return ClientAppType.mobile_apps_and_desktop_clients
    if request.accepts_html and "mozilla/" in request.user_agent.lower():
        return ClientAppType.browser
    if identity is not None and identity.client_id:
        return ClientAppType.mobile_apps_and_desktop_clients
    return ClientAppType.other


def client_app_type_not_matched(types: Collection[ClientAppType], actual: ClientAppType) -> str | None:
    if ClientAppType.all in types or actual in types:
        return None
    return f"client app type {actual.value!r} is not included"


PLATFORM_WORDS = {
    "ios": DevicePlatform.ios, "ipados": DevicePlatform.ios, "iphone": DevicePlatform.ios,
    "ipad": DevicePlatform.ios, "android": DevicePlatform.android, "windows": DevicePlatform.windows,
    "macos": DevicePlatform.macos, "macintosh": DevicePlatform.macos, "linux": DevicePlatform.linux,
}
WORD = re.compile(r"[a-z0-9]+")


def device_platform(device: ManagedDevice | None, user_agent: str) -> DevicePlatform | None:
    """The inventory's operating system when the device is known; otherwise the User-Agent,
    as Entra does (a weak signal: a block for one platform is evaded by claiming another).
    Whole words only; Android's "Linux" is Android; a text naming two platforms
    (``Outlook-iOS-Android``) names none."""
    text = device.operating_system if device and device.operating_system else user_agent
    found = {PLATFORM_WORDS[w] for w in WORD.findall(text.lower()) if w in PLATFORM_WORDS}
    if DevicePlatform.android in found:
        found.discard(DevicePlatform.linux)
    return found.pop() if len(found) == 1 else None


def platform_not_matched(condition: Platforms, platform: DevicePlatform | None) -> str | None:
    shown = platform.value if platform else "unknown"
    if platform is not None and platform in condition.exclude:
        return f"device platform {shown!r} is excluded"
    if "all" in condition.include or (platform is not None and platform.value in condition.include):
        return None
    return f"device platform {shown!r} is not included"


@functools.lru_cache(maxsize=4096)  # parsed once per address while it is sending (addresses are immutable)
def _address(client_ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(client_ip)
    except ValueError:
        return None


def locations_of(client_ip: str, named: Mapping[str, tuple[tuple[Network, ...], bool]]) -> tuple[set[str], bool]:
    """The named locations the address is in, and whether any of them is trusted."""
    address = _address(client_ip)
    if address is None:
        return set(), False
    inside = {name for name, (networks, _) in named.items() if any(address in n for n in networks)}
    return inside, any(named[name][1] for name in inside)


def request_locations(request: AccessRequest,
                      named: Mapping[str, tuple[tuple[Network, ...], bool]]) -> tuple[set[str], bool]:
    """The named locations a request is in: its client address's, and the kiosk location for a
    request through the kiosk proxy (policy, the decision log and ``why`` all read this)."""
    inside, trusted = locations_of(request.client_ip, named)
    if request.kiosk_location is not None:
        inside = inside | {request.kiosk_location}
    return inside, trusted


def location_not_matched(condition: Assignment, inside: set[str], trusted: bool, client_ip: str) -> str | None:
    def hits(names: tuple[str, ...]) -> bool:
        return ALL in names or (ALL_TRUSTED in names and trusted) or bool(inside & set(names))

    if hits(condition.exclude):
        return f"location of {client_ip} is excluded"
    if hits(condition.include):
        return None
    return f"location of {client_ip} is not included"


def device_filter_attributes(device: DeviceSignals, now: datetime) -> DeviceAttributes | None:
    """Entra's device attributes for filter rules; None for an unregistered device."""
    record = device.device
    if record is None:
        return None
    return {
        "deviceId": record.device_id, "displayName": record.display_name,
        "deviceOwnership": record.device_ownership, "isCompliant": is_compliant(record, now, device.compliance),
        "manufacturer": record.manufacturer, "model": record.model,
        "operatingSystem": record.operating_system, "operatingSystemVersion": record.operating_system_version,
        "trustType": record.trust_type, **dict(record.extension_attributes),
    }
