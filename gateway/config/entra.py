"""Entra Conditional Access policies (Graph ``conditionalAccessPolicy`` JSON) as Portcullis policies,
and back. Pure mapping: ``gateway/app/commands/entra.py`` reads and writes the files.

Every Graph field has one entry in ``GRAPH_FIELDS``: copied to a Portcullis key (both ways),
converted by a pair of functions, ignored (metadata), or unsupported with the reason and what
happens to a policy that has it. The safety rule: a policy is written as Entra has it only when
every field it sets was mapped exactly. Otherwise it is written ``reportOnly`` (evaluated and logged,
never enforced) when what remains is still a valid policy, or not at all (``skip``) when the field
says what the policy is *about* (user actions, workload identities) or
nothing valid remains. A dropped exclusion, include restriction or grant therefore never reaches
enforcement. Export applies the same rule the other way (``enabledForReportingButNotEnforced``).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from gateway.config.loader import format_loc
from gateway.config.models import ConditionalAccessPolicy, PlatformOrAll, ResourcePreset
from gateway.config.presets import PRESETS
from gateway.policy.model import (
    ALL,
    ALL_TRUSTED,
    BuiltInControl,
    ClientAppType,
    DeviceFilterMode,
    DevicePlatform,
    GrantOperator,
    PersistentBrowser,
    PolicyState,
)

EXCHANGE_ONLINE = "00000002-0000-0ff1-ce00-000000000000"
SHAREPOINT_ONLINE = "00000003-0000-0ff1-ce00-000000000000"
OFFICE_365 = "Office365"  # Entra's app group: Exchange, SharePoint, Teams and more
NONE = "None"

# Cloud apps Portcullis knows without being told: the resources of these presets, as far as the
# config defines them. ``--map APPID=resource,...`` adds or replaces one (``--map APPID=`` says the
# app is not behind this gateway, so leaving it out is exact).
CLOUD_APPS: dict[str, tuple[ResourcePreset, ...]] = {
    EXCHANGE_ONLINE: (ResourcePreset.exchange,),
    SHAREPOINT_ONLINE: (ResourcePreset.sharepoint,),
    OFFICE_365: (ResourcePreset.exchange, ResourcePreset.sharepoint),
}

# Entra's built-in authentication strengths (authenticationStrengthPolicy ids) and Portcullis's names
BUILT_IN_STRENGTHS = {
    "00000000-0000-0000-0000-000000000002": "mfa",
    "00000000-0000-0000-0000-000000000003": "passwordlessMfa",
    "00000000-0000-0000-0000-000000000004": "phishingResistantMfa",
}

GRAPH_STATES = {"enabled": PolicyState.enabled, "disabled": PolicyState.disabled,
                "enabledForReportingButNotEnforced": PolicyState.report_only}
PORTCULLIS_STATES = {state: graph for graph, state in GRAPH_STATES.items()}
REPORT_ONLY = "enabledForReportingButNotEnforced"


class Outcome(StrEnum):
    """What a field Portcullis cannot express does to its policy."""

    report_only = "reportOnly"  # written, evaluated and logged, never enforced
    skip = "skip"  # not written at all


@dataclass(frozen=True, slots=True)
class Dropped:
    """A field (or one value of it) left out, why, and what that does to the policy."""

    field: str
    outcome: Outcome
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


class Unmapped(Exception):
    """Raised by a converter: this value has no Portcullis (or Graph) equivalent."""

    def __init__(self, reason: str, outcome: Outcome = Outcome.report_only, kept: Converted | None = None) -> None:
        super().__init__(reason)
        self.reason, self.outcome, self.kept = reason, outcome, kept or {}  # kept: what could be said


@dataclass(frozen=True, slots=True)
class Names:
    """How Graph ids meet Portcullis names, in both directions."""

    app_resources: dict[str, tuple[str, ...]]  # cloud app id or OFFICE_365 -> resources, in export order
    location_names: dict[str, str]  # named location id (lower case) -> Portcullis named location
    approved_applications: tuple[str, ...] | None = None  # what Entra's approvedApplication means here
    strength_names: dict[str, str] = field(default_factory=lambda: dict(BUILT_IN_STRENGTHS))  # id (lower) -> name
    custom_strengths: frozenset[str] = frozenset()  # the config's authenticationStrengths

    def resources_of(self, app_id: str) -> tuple[str, ...]:
        if app_id == ALL:
            return (ALL,)
        by_id = {known.lower(): resources for known, resources in self.app_resources.items()}
        if app_id.lower() not in by_id:
            raise Unmapped(f"cloud app {app_id} is no Portcullis resource: name its resources with "
                           f"--map {app_id}=RESOURCE[,RESOURCE] (or --map {app_id}= if this gateway does not front it)")
        return by_id[app_id.lower()]

    def location_of(self, location_id: str) -> tuple[str, ...]:
        if location_id in (ALL, ALL_TRUSTED):
            return (location_id,)
        if location_id.lower() not in self.location_names:
            raise Unmapped(f"named location {location_id} is not in portcullis.yaml's namedLocations: add it, "
                           f"give --locations with Graph's namedLocations, or --map {location_id}=NAME")
        return (self.location_names[location_id.lower()],)

    def strength_of(self, strength: dict[str, Any]) -> str:
        """A Graph authenticationStrength (as GET expands it: id, displayName, policyType) by name."""
        strength_id, display_name = strength.get("id"), strength.get("displayName")
        if isinstance(strength_id, str) and strength_id.lower() in self.strength_names:
            return self.strength_names[strength_id.lower()]
        if isinstance(display_name, str) and slug(display_name) in self.custom_strengths:
            return slug(display_name)
        raise Unmapped(f"authentication strength {strength_id} ({display_name}) is not in portcullis.yaml's "
                       f"authenticationStrengths: add it, or --map {strength_id}=NAME")

    def location_ids(self) -> dict[str, str]:
        return {name: location_id for location_id, name in self.location_names.items()}


def names_for(resources: Iterable[str], named_locations: Iterable[str], overrides: Mapping[str, list[str]],
              graph_locations: Iterable[Mapping[str, Any]] = (),
              approved_applications: Iterable[str] | None = None, applications: Iterable[str] = (),
              strengths: Iterable[str] = ()) -> Names:
    """The id tables for one config. ``overrides`` come from ``--map ID=NAME,...``: app ids to
    resources, location ids to named locations, authentication strength ids to the config's
    ``authenticationStrengths``; a name that is none of these is a ``ValueError``."""
    resources, locations, custom = set(resources), set(named_locations), frozenset(strengths)
    strength_names = dict(BUILT_IN_STRENGTHS)
    app_resources = {app_id: tuple(name for preset in presets for name in PRESETS[preset] if name in resources)
                     for app_id, presets in CLOUD_APPS.items()}
    location_names = {name.lower(): name for name in locations if _is_guid(name)}
    for location in graph_locations:
        location_id, display_name = location.get("id"), location.get("displayName")
        if isinstance(location_id, str) and isinstance(display_name, str) and slug(display_name) in locations:
            location_names[location_id.lower()] = slug(display_name)
    for graph_id, mapped in overrides.items():
        if len(mapped) == 1 and mapped[0] in locations:
            location_names[graph_id.lower()] = mapped[0]
        elif len(mapped) == 1 and mapped[0] in custom:
            strength_names[graph_id.lower()] = mapped[0]
        elif all(name in resources for name in mapped):
            app_resources = {known: resources for known, resources in app_resources.items()
                             if known.lower() != graph_id.lower()} | {graph_id: tuple(mapped)}
        else:
            unknown = [name for name in mapped if name not in resources | locations]
            raise ValueError(f"--map {graph_id}: {', '.join(unknown) or ','.join(mapped)} is neither a resource nor "
                             "one named location or authentication strength of the config")
    approved = tuple(approved_applications) if approved_applications is not None else None
    for app in approved or ():
        if app not in set(applications):
            raise ValueError(f"--approved-apps: {app!r} is not an application of the config")
    return Names(app_resources, location_names, approved, strength_names, custom)


def _is_guid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def slug(display_name: str) -> str:
    """A Portcullis name made of an Entra display name: ``Exchange: Outlook only`` -> ``exchange-outlook-only``."""
    return re.sub(r"[^a-z0-9]+", "-", display_name.lower()).strip("-")[:64].rstrip("-") or "policy"


# --- the mapping table -------------------------------------------------------------------------

type Converted = dict[str, Any]  # dotted target path -> value
type ToPortcullis = Callable[[Any, Names], Converted]
type ToGraph = Callable[[Any, Names], Converted]


@dataclass(frozen=True, slots=True)
class Copy:
    """The same value under another key, both ways; values outside ``allowed`` are unsupported."""

    target: str
    allowed: frozenset[str] | None = None
    why_not: str = ""


@dataclass(frozen=True, slots=True)
class Convert:
    """A Graph field and Portcullis key(s) that need translating; ``source`` is the Portcullis key
    ``to_graph`` reads (None: the import's target is never exported from here)."""

    to_portcullis: ToPortcullis
    source: str | None = None
    to_graph: ToGraph | None = None


@dataclass(frozen=True, slots=True)
class Unsupported:
    outcome: Outcome
    reason: str


IGNORED = Unsupported(Outcome.report_only, "")  # metadata: read and left out, exact by definition
OBJECT = Unsupported(Outcome.report_only, "an object")  # walk into it; its fields have entries


def _values(enum: Iterable[StrEnum]) -> frozenset[str]:
    return frozenset(member.value for member in enum)


def _users_to_portcullis(target: str) -> ToPortcullis:
    def convert(value: Any, names: Names) -> Converted:
        kept = [item for item in _string_list(value) if item != "GuestsOrExternalUsers"]
        if len(kept) != len(value):
            raise Unmapped("GuestsOrExternalUsers: Portcullis does not tell guests from members",
                           kept={target: kept} if kept else {})
        return {target: kept}
    return convert


def _state_to_portcullis(value: Any, names: Names) -> Converted:
    if not isinstance(value, str) or value not in GRAPH_STATES:
        raise Unmapped(f"state {value!r} is not one of {', '.join(GRAPH_STATES)}", Outcome.skip)
    return {"state": GRAPH_STATES[value].value}


def _state_to_graph(value: Any, names: Names) -> Converted:
    return {"state": PORTCULLIS_STATES[PolicyState(value)]}


def _apps_to_portcullis(target: str) -> ToPortcullis:
    def convert(value: Any, names: Names) -> Converted:
        if target.endswith("include") and isinstance(value, list) and NONE in value:
            raise Unmapped("includeApplications None: the policy applies to no app", Outcome.skip)
        mapped: list[str] = []
        unmapped: list[str] = []
        for app_id in _string_list(value):
            try:
                mapped += [name for name in names.resources_of(app_id) if name not in mapped]
            except Unmapped as error:
                unmapped.append(error.reason)
        if unmapped:
            raise Unmapped("; ".join(unmapped), kept={target: mapped} if mapped else {})
        return {target: mapped}
    return convert


def _apps_to_graph(target: str) -> ToGraph:
    def convert(value: Any, names: Names) -> Converted:
        if ALL in value:
            return {target: [ALL]}
        wanted, covered = set(value), set[str]()
        whole: list[str] = []
        partly: list[str] = []
        for app_id, resources in names.app_resources.items():
            if app_id == OFFICE_365 or not resources or set(resources) <= covered:
                continue
            if set(resources) <= wanted:
                whole.append(app_id)
                covered |= set(resources)
            elif wanted & set(resources):
                partly.append(app_id)
        left = sorted(wanted - covered)
        if left:
            # an include may name the whole app (wider, so stricter); an exclusion may not (it would open)
            kept = whole + (partly if target.endswith("includeApplications") else [])
            raise Unmapped(f"{', '.join(left)}: Entra targets whole cloud apps, and these are only part of one (or of "
                           "none: map them with --map APPID=RESOURCE,...)", kept={target: kept} if kept else {})
        return {target: whole}
    return convert


def _locations_to_portcullis(target: str) -> ToPortcullis:
    def convert(value: Any, names: Names) -> Converted:
        return {target: [name for location_id in _string_list(value) for name in names.location_of(location_id)]}
    return convert


def _locations_to_graph(target: str) -> ToGraph:
    def convert(value: Any, names: Names) -> Converted:
        ids = names.location_ids()
        unknown = [name for name in value if name not in (ALL, ALL_TRUSTED) and name not in ids]
        if unknown:
            raise Unmapped(f"named location {', '.join(unknown)} has no Entra id (give --locations or --map ID=NAME)")
        return {target: [ids.get(name, name) for name in value]}
    return convert


def _grants_to_portcullis(value: Any, names: Names) -> Converted:
    known = _values(BuiltInControl)
    controls = _string_list(value)
    missing = [control for control in controls if control not in known]
    approved = BuiltInControl.approved_application.value
    if approved in controls and names.approved_applications is None:
        missing.append(approved)
    kept = [control for control in controls if control not in missing]
    converted: Converted = {"grantControls.builtInControls": kept} if kept else {}
    if approved in kept and names.approved_applications is not None:
        converted["grantControls.approvedApplications"] = list(names.approved_applications)
    if missing:
        raise Unmapped(f"{', '.join(missing)}: not a grant control Portcullis enforces"
                       + ("; Entra's approved client apps are Microsoft's list: name this config's with "
                          "--approved-apps" if approved in missing else ""), kept=converted)
    return converted


def _grants_to_graph(value: Any, names: Names) -> Converted:
    return {"grantControls.builtInControls": list(value)}


def _strength_to_portcullis(value: Any, names: Names) -> Converted:
    if not isinstance(value, dict):
        raise Unmapped(f"expected an object, found {type(value).__name__}")
    return {"grantControls.authenticationStrength": names.strength_of(value)}


def _strength_to_graph(value: Any, names: Names) -> Converted:
    """By id, as POST takes it; a custom strength's id is known only from --map."""
    ids = {name: strength_id for strength_id, name in names.strength_names.items()}
    if value not in ids:
        raise Unmapped(f"authentication strength {value!r} has no Entra id (give --map ID={value})")
    return {"grantControls.authenticationStrength": {"id": ids[value]}}


def _frequency_to_portcullis(value: Any, names: Names) -> Converted:
    if not _enabled(value):
        return {}
    if value.get("authenticationType") not in (None, "primaryAndSecondaryAuthentication"):
        raise Unmapped(f"authenticationType {value.get('authenticationType')!r}: Portcullis asks for a whole sign-in")
    if value.get("frequencyInterval") == "everyTime":
        return {"sessionControls.signInFrequency": {"everyTime": True}}
    return {"sessionControls.signInFrequency": {"value": value.get("value"), "type": value.get("type")}}


def _frequency_to_graph(value: Any, names: Names) -> Converted:
    if value.get("everyTime"):
        return {"sessionControls.signInFrequency": {"isEnabled": True, "frequencyInterval": "everyTime",
                                                    "authenticationType": "primaryAndSecondaryAuthentication"}}
    return {"sessionControls.signInFrequency": {
        "isEnabled": True, "value": value["value"], "type": value["type"], "frequencyInterval": "timeBased",
        "authenticationType": "primaryAndSecondaryAuthentication"}}


def _browser_to_portcullis(value: Any, names: Names) -> Converted:
    if not _enabled(value):
        return {}
    if not isinstance(value.get("mode"), str) or value["mode"] not in _values(PersistentBrowser):
        raise Unmapped(f"mode {value.get('mode')!r}: Portcullis knows always and never")
    return {"sessionControls.persistentBrowser": value["mode"]}


def _browser_to_graph(value: Any, names: Names) -> Converted:
    return {"sessionControls.persistentBrowser": {"isEnabled": True, "mode": value}}


def _cloud_app_security_to_portcullis(value: Any, names: Names) -> Converted:
    if not _enabled(value):
        return {}
    if value.get("cloudAppSecurityType") != "blockDownloads":
        raise Unmapped(f"cloudAppSecurityType {value.get('cloudAppSecurityType')!r}: Portcullis blocks downloads "
                       "itself and has no Defender for Cloud Apps session policy")
    return {"sessionControls.blockDownloads": True}


def _block_downloads_to_graph(value: Any, names: Names) -> Converted:
    return {"sessionControls.cloudAppSecurity": {"isEnabled": True, "cloudAppSecurityType": "blockDownloads"}}


def _token_protection_to_portcullis(value: Any, names: Names) -> Converted:
    return {"sessionControls.tokenProtection": True} if _enabled(value) else {}


def _token_protection_to_graph(value: Any, names: Names) -> Converted:
    return {"sessionControls.secureSignInSession": {"isEnabled": True}}


def _enabled(value: Any) -> bool:
    if not isinstance(value, dict):
        raise Unmapped(f"expected an object, found {type(value).__name__}")
    return value.get("isEnabled") is True


def _string_list(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise Unmapped("expected a list of strings")
    return list(value)


NO_RISK = ("Portcullis has no Entra ID Protection risk; its risk signal is the device's MTD threat level "
           "(grantControls.maxDeviceThreatLevel)")

DIRECTORY_ROLES = Unsupported(Outcome.report_only, "Portcullis matches users and groups, not Entra directory roles")
GUESTS = Unsupported(Outcome.report_only, "Portcullis does not tell guests and external users from members")

GRAPH_FIELDS: dict[str, Copy | Convert | Unsupported] = {
    "id": IGNORED, "templateId": IGNORED, "createdDateTime": IGNORED, "modifiedDateTime": IGNORED,
    "description": IGNORED, "deletedDateTime": IGNORED,
    "displayName": Copy("displayName"),
    "state": Convert(_state_to_portcullis, "state", _state_to_graph),
    "partialEnablementStrategy": Unsupported(Outcome.report_only, "Portcullis stages a policy with its own rollout"),
    "conditions": OBJECT,
    "conditions.users": OBJECT,
    "conditions.users.includeUsers": Convert(_users_to_portcullis("conditions.users.includeUsers")),
    "conditions.users.excludeUsers": Convert(_users_to_portcullis("conditions.users.excludeUsers")),
    "conditions.users.includeGroups": Copy("conditions.users.includeGroups"),
    "conditions.users.excludeGroups": Copy("conditions.users.excludeGroups"),
    "conditions.users.includeRoles": DIRECTORY_ROLES,
    "conditions.users.excludeRoles": DIRECTORY_ROLES,
    "conditions.users.includeGuestsOrExternalUsers": GUESTS,
    "conditions.users.excludeGuestsOrExternalUsers": GUESTS,
    "conditions.applications": OBJECT,
    "conditions.applications.includeApplications": Convert(
        _apps_to_portcullis("conditions.resources.include"), "conditions.resources.include",
        _apps_to_graph("conditions.applications.includeApplications")),
    "conditions.applications.excludeApplications": Convert(
        _apps_to_portcullis("conditions.resources.exclude"), "conditions.resources.exclude",
        _apps_to_graph("conditions.applications.excludeApplications")),
    "conditions.applications.includeUserActions": Unsupported(Outcome.skip, "user actions (registering security "
                                                              "info, joining devices) happen at Entra, not behind "
                                                              "the gateway"),
    "conditions.applications.includeAuthenticationContextClassReferences": Copy("conditions.authenticationContexts"),
    "conditions.applications.applicationFilter": Unsupported(Outcome.report_only, "Portcullis has no custom "
                                                             "security attributes to filter apps by"),
    "conditions.clientAppTypes": Copy("conditions.clientAppTypes", _values(ClientAppType),
                                      "easSupported is not told apart from other ActiveSync clients"),
    "conditions.platforms": OBJECT,
    "conditions.platforms.includePlatforms": Copy("conditions.platforms.include", _values(PlatformOrAll),
                                                  "not a platform Portcullis recognises"),
    "conditions.platforms.excludePlatforms": Copy("conditions.platforms.exclude", _values(DevicePlatform),
                                                  "not a platform Portcullis recognises"),
    "conditions.locations": OBJECT,
    "conditions.locations.includeLocations": Convert(
        _locations_to_portcullis("conditions.locations.include"), "conditions.locations.include",
        _locations_to_graph("conditions.locations.includeLocations")),
    "conditions.locations.excludeLocations": Convert(
        _locations_to_portcullis("conditions.locations.exclude"), "conditions.locations.exclude",
        _locations_to_graph("conditions.locations.excludeLocations")),
    "conditions.devices": OBJECT,
    "conditions.devices.deviceFilter": OBJECT,
    "conditions.devices.deviceFilter.mode": Copy("conditions.deviceFilter.mode", _values(DeviceFilterMode)),
    "conditions.devices.deviceFilter.rule": Copy("conditions.deviceFilter.rule"),
    "conditions.devices.includeDevices": Unsupported(Outcome.report_only, "deprecated by Entra: use deviceFilter"),
    "conditions.devices.excludeDevices": Unsupported(Outcome.report_only, "deprecated by Entra: use deviceFilter"),
    "conditions.devices.includeDeviceStates": Unsupported(Outcome.report_only, "deprecated by Entra: use deviceFilter"),
    "conditions.devices.excludeDeviceStates": Unsupported(Outcome.report_only, "deprecated by Entra: use deviceFilter"),
    "conditions.deviceStates": Unsupported(Outcome.report_only, "deprecated by Entra: use deviceFilter"),
    "conditions.signInRiskLevels": Unsupported(Outcome.report_only, NO_RISK),
    "conditions.userRiskLevels": Unsupported(Outcome.report_only, NO_RISK),
    "conditions.servicePrincipalRiskLevels": Unsupported(Outcome.report_only, NO_RISK),
    "conditions.insiderRiskLevels": Unsupported(Outcome.report_only, NO_RISK),
    "conditions.clientApplications": Unsupported(Outcome.skip, "workload identities (service principals) do not "
                                                 "sign in through the gateway"),
    "conditions.times": Unsupported(Outcome.report_only, "Portcullis has no time-of-day condition"),
    "conditions.authenticationFlows": Unsupported(Outcome.report_only, "device code and authentication transfer "
                                                  "flows happen at Entra"),
    "grantControls": OBJECT,
    "grantControls.operator": Copy("grantControls.operator", _values(GrantOperator)),
    "grantControls.builtInControls": Convert(_grants_to_portcullis, "grantControls.builtInControls",
                                             _grants_to_graph),
    "grantControls.customAuthenticationFactors": Unsupported(Outcome.report_only, "custom controls run at Entra"),
    "grantControls.termsOfUse": Unsupported(Outcome.report_only, "terms of use are accepted at Entra"),
    "grantControls.authenticationStrength": Convert(_strength_to_portcullis, "grantControls.authenticationStrength",
                                                    _strength_to_graph),
    "sessionControls": OBJECT,
    "sessionControls.signInFrequency": Convert(_frequency_to_portcullis, "sessionControls.signInFrequency",
                                               _frequency_to_graph),
    "sessionControls.persistentBrowser": Convert(_browser_to_portcullis, "sessionControls.persistentBrowser",
                                                 _browser_to_graph),
    "sessionControls.cloudAppSecurity": Convert(_cloud_app_security_to_portcullis, "sessionControls.blockDownloads",
                                                _block_downloads_to_graph),
    "sessionControls.secureSignInSession": Convert(_token_protection_to_portcullis, "sessionControls.tokenProtection",
                                                   _token_protection_to_graph),
    "sessionControls.applicationEnforcedRestrictions": Unsupported(
        Outcome.report_only, "Portcullis does not hand restrictions to the app; its blockDownloads is "
        "cloudAppSecurity's blockDownloads"),
    "sessionControls.continuousAccessEvaluation": Unsupported(Outcome.report_only, "Portcullis evaluates "
                                                              "continuously and has no setting for it"),
    "sessionControls.disableResilienceDefaults": Unsupported(Outcome.report_only, "a setting of Entra's own "
                                                             "outage behaviour"),
    "sessionControls.globalSecureAccessFilteringProfile": Unsupported(Outcome.report_only, "Global Secure Access "
                                                                      "is not Portcullis"),
}

# Portcullis keys with no Graph field, and why (export); keys that have one are found in GRAPH_FIELDS.
NOT_IN_GRAPH: dict[str, str] = {
    "name": "",  # Graph has only displayName (and its own id)
    "grantControls.approvedApplications": "Entra's approvedApplication means Microsoft's approved client apps, and "
                                          "Entra stopped enforcing it in March 2026 (use compliantApplication)",
    "grantControls.maxDeviceThreatLevel": "Entra has no such grant control: set 'require the device to be at or "
                                          "under the device threat level' in the Intune compliance policy",
    "sessionControls.blockUploads": "Entra's session controls cannot block uploads alone",
    "rollout": "Entra has no staged rollout of a policy",
}


# --- import ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Imported:
    """One Graph policy: the Portcullis policy written for it (None: skipped) and what was left out."""

    graph_id: str | None
    display_name: str
    graph_state: str
    policy: dict[str, Any] | None
    dropped: tuple[Dropped, ...] = field(default=())

    @property
    def name(self) -> str | None:
        return None if self.policy is None else str(self.policy["name"])


class ShapeError(ValueError):
    """The document is not Graph policies at all (message says what was found)."""


def graph_policies(document: Any) -> list[dict[str, Any]]:
    """The policies of a Graph answer: a list, ``{"value": [...]}`` (with ``@odata`` members), or one."""
    if isinstance(document, list):
        policies = document
    elif isinstance(document, dict) and "value" in document and "conditions" not in document:
        policies = document["value"]
        if not isinstance(policies, list):
            raise ShapeError("'value' is not a list of policies")
    elif isinstance(document, dict) and "conditions" in document:
        policies = [document]
    else:
        found = f"an object with {', '.join(sorted(document)) or 'no members'}" if isinstance(document, dict) \
            else f"a {type(document).__name__}"
        raise ShapeError(f"expected Graph conditionalAccessPolicy JSON (a list, {{\"value\": [...]}} or one policy "
                         f"with conditions), found {found}")
    for index, policy in enumerate(policies):
        if not isinstance(policy, dict):
            raise ShapeError(f"policy {index} is a {type(policy).__name__}, not an object")
    return policies


def import_policies(policies: list[dict[str, Any]], names: Names, taken: Iterable[str] = ()) -> list[Imported]:
    """Each Graph policy as a Portcullis policy mapping (camelCase keys), under the safety rule."""
    used = set(taken)
    imported = []
    for policy in policies:
        result = import_policy(policy, names, used)
        if result.name is not None:
            used.add(result.name)
        imported.append(result)
    return imported


def import_policy(graph: Mapping[str, Any], names: Names, taken: set[str] | None = None) -> Imported:
    display_name = graph.get("displayName") if isinstance(graph.get("displayName"), str) else None
    graph_id = graph.get("id") if isinstance(graph.get("id"), str) else None
    policy: dict[str, Any] = {}
    dropped = _walk(graph, "", names, policy)
    name = _unique(slug(display_name or graph_id or "policy"), taken or set())
    policy = {"name": name, **policy}
    state = policy.get("state")
    graph_state = str(graph.get("state"))
    conditions = policy.get("conditions", {})
    if not conditions.get("resources", {}).get("include") and not conditions.get("authenticationContexts"):
        dropped.append(Dropped("conditions.applications.includeApplications", Outcome.skip,
                               "the policy applies to no Portcullis resource nor authentication context"))
    if state is None and not any(d.field == "state" for d in dropped):
        dropped.append(Dropped("state", Outcome.skip, "missing"))
    if any(d.outcome is Outcome.skip for d in dropped):
        return Imported(graph_id, display_name or name, graph_state, None, tuple(dropped))
    if dropped and state == PolicyState.enabled.value:
        policy["state"] = PolicyState.report_only.value
    problems = _invalid(policy)
    if problems:
        dropped += [Dropped(problem, Outcome.skip, "Portcullis would refuse the policy") for problem in problems]
        return Imported(graph_id, display_name or name, graph_state, None, tuple(dropped))
    return Imported(graph_id, display_name or name, graph_state, _ordered(policy), tuple(dropped))


def _walk(node: Mapping[str, Any], prefix: str, names: Names, policy: dict[str, Any]) -> list[Dropped]:
    dropped: list[Dropped] = []
    for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else key
        rule = GRAPH_FIELDS.get(path)
        if "@odata." in key or rule is IGNORED or _says_nothing(value):
            continue  # metadata, or a field that says nothing
        if rule is None:
            dropped.append(Dropped(path, Outcome.report_only, "not a field Portcullis knows"))
        elif rule is OBJECT:
            if isinstance(value, dict):
                dropped += _walk(value, path, names, policy)
            else:
                dropped.append(Dropped(path, Outcome.skip, f"expected an object, found {type(value).__name__}"))
        elif isinstance(rule, Unsupported):
            dropped.append(Dropped(path, rule.outcome, rule.reason))
        else:
            try:
                converted = _copy(rule, value) if isinstance(rule, Copy) else rule.to_portcullis(value, names)
            except Unmapped as unmapped:
                dropped.append(Dropped(path, unmapped.outcome, unmapped.reason))
                converted = unmapped.kept
            for target, result in converted.items():
                _set(policy, target, result)
    return dropped


def _says_nothing(value: Any) -> bool:
    """Graph writes every field, unset ones as null, [], {} or false."""
    return value is None or value is False or (isinstance(value, list | dict | str) and not value)


def _copy(rule: Copy, value: Any) -> Any:
    values = value if isinstance(value, list) else [value]
    outside = [v for v in values if rule.allowed is not None and (not isinstance(v, str) or v not in rule.allowed)]
    if outside:
        raise Unmapped(f"{', '.join(map(str, outside))}: {rule.why_not or 'not a value Portcullis knows'}")
    return {rule.target: value}


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def _unique(name: str, taken: set[str]) -> str:
    candidate, number = name, 2
    while candidate in taken:
        suffix = f"-{number}"
        candidate, number = name[:64 - len(suffix)] + suffix, number + 1
    return candidate


def _invalid(policy: dict[str, Any]) -> list[str]:
    try:
        ConditionalAccessPolicy.model_validate_json(json.dumps(policy), strict=True)
    except ValidationError as error:
        return [f"{format_loc(tuple(e['loc']))}: {e['msg'].removeprefix('Value error, ')}" for e in error.errors()]
    return []


KEY_ORDER = ("name", "displayName", "state", "conditions", "grantControls", "sessionControls")
CONDITIONS_ORDER = ("users", "resources", "authenticationContexts", "clientAppTypes", "platforms", "locations",
                    "deviceFilter")


def _ordered(policy: dict[str, Any]) -> dict[str, Any]:
    """Keys in the order policies.yaml is written by hand."""
    conditions = policy["conditions"]
    ordered = {key: policy[key] for key in KEY_ORDER if key in policy}
    ordered["conditions"] = {key: conditions[key] for key in CONDITIONS_ORDER if key in conditions}
    return ordered


# --- export ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Exported:
    name: str
    policy: dict[str, Any] | None  # Graph JSON; None: nothing valid to export
    dropped: tuple[Dropped, ...] = ()


EXPORT_OBJECTS = frozenset({"conditions", "conditions.users", "conditions.resources", "conditions.platforms",
                            "conditions.locations", "conditions.deviceFilter", "grantControls", "sessionControls"})


def _export_rules() -> dict[str, tuple[str, Copy | Convert]]:
    """Portcullis key -> (Graph key, rule): the inverse of GRAPH_FIELDS."""
    rules: dict[str, tuple[str, Copy | Convert]] = {}
    for graph_path, rule in GRAPH_FIELDS.items():
        if isinstance(rule, Copy):
            rules[rule.target] = (graph_path, rule)
        elif isinstance(rule, Convert) and rule.source is not None:
            rules[rule.source] = (graph_path, rule)
    for users in ("includeUsers", "excludeUsers"):
        rules[f"conditions.users.{users}"] = (f"conditions.users.{users}", Copy(f"conditions.users.{users}"))
    return rules


EXPORT_RULES = _export_rules()


def export_policy(policy: ConditionalAccessPolicy, names: Names) -> Exported:
    """One Portcullis policy as Graph JSON; what Graph cannot say makes it report-only."""
    data = policy.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    data.setdefault("displayName", policy.name)
    data.setdefault("conditions", {}).setdefault("clientAppTypes", ["all"])
    graph: dict[str, Any] = {}
    dropped: list[Dropped] = []
    _export_walk(data, "", names, graph, dropped)
    users = graph.setdefault("conditions", {}).setdefault("users", {})
    if not users.get("includeUsers") and not users.get("includeGroups"):
        users["includeUsers"] = [ALL]  # Portcullis: nothing included covers everyone
    if "grantControls" in graph:
        graph["grantControls"] = {"operator": GrantOperator.AND.value, **graph["grantControls"]}
    if dropped and graph.get("state") == "enabled":
        graph["state"] = REPORT_ONLY
    applications = graph["conditions"].get("applications", {})
    if not applications.get("includeApplications") and not applications.get(
            "includeAuthenticationContextClassReferences"):
        return Exported(policy.name, None, tuple(dropped))
    return Exported(policy.name, _graph_ordered(graph), tuple(dropped))


def _export_walk(node: Mapping[str, Any], prefix: str, names: Names, graph: dict[str, Any],
                 dropped: list[Dropped]) -> None:
    for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else key
        if path in EXPORT_OBJECTS and isinstance(value, dict):
            _export_walk(value, path, names, graph, dropped)
            continue
        if path in NOT_IN_GRAPH:
            if NOT_IN_GRAPH[path]:
                dropped.append(Dropped(path, Outcome.report_only, NOT_IN_GRAPH[path]))
            continue
        target, rule = EXPORT_RULES.get(path, (None, None))
        if rule is None or target is None:
            dropped.append(Dropped(path, Outcome.report_only, "Graph has no such field"))
            continue
        try:
            converted = {target: value} if isinstance(rule, Copy) else _to_graph(rule, value, names)
        except Unmapped as unmapped:
            dropped.append(Dropped(path, Outcome.report_only, unmapped.reason))
            converted = unmapped.kept
        for graph_path, result in converted.items():
            _set(graph, graph_path, result)


def _to_graph(rule: Convert, value: Any, names: Names) -> Converted:
    assert rule.to_graph is not None  # EXPORT_RULES holds only converters with a source
    return rule.to_graph(value, names)


def _graph_ordered(graph: dict[str, Any]) -> dict[str, Any]:
    order = ("displayName", "state", "conditions", "grantControls", "sessionControls")
    return {key: graph[key] for key in order if key in graph}
