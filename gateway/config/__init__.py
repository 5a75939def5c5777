"""The configuration of one gateway: two YAML files in one directory, validated as a whole.

``load_config`` reports every problem of every file in one ``ConfigError`` (file:line: key:
message), including references that do not resolve (a policy naming an unknown resource).
Relative paths in the files are relative to the config directory.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.config.device_certificates import DeviceTrust, load_device_trust
from gateway.config.loader import locate, raise_if, read_yaml, suggest, validate
from gateway.config.models import (
    ConditionalAccessPolicy,
    Include,
    PoliciesFile,
    PortcullisFile,
    Resource,
)
from gateway.config.presets import expand_presets
from gateway.errors import ConfigError, ConfigProblem
from gateway.policy.authentication import BUILT_IN_STRENGTHS
from gateway.policy.model import ALL, ALL_TRUSTED

__all__ = ["Config", "ConfigError", "load_config", "load_gateway_file", "GATEWAY_FILE", "POLICIES_FILE"]

GATEWAY_FILE = "portcullis.yaml"
CASES_FILE = "cases.yaml"
POLICIES_FILE = "policies.yaml"


@dataclass(frozen=True, slots=True)
class Config:
    directory: Path
    gateway_file: PortcullisFile
    policies: tuple[ConditionalAccessPolicy, ...]
    sources: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # file -> parsed YAML
    # host -> the CA certificates and CRLs its deviceCertificates names, read with the files
    device_trust: dict[str, DeviceTrust] = field(default_factory=dict, compare=False, repr=False)

    def path(self, relative: Path) -> Path:
        """A path from the config files, resolved against the config directory."""
        return resolve(self.directory, relative)

    def issuer_problem(self, name: str, message: str) -> ConfigProblem:
        """A problem of one trusted issuer, at its line (``identity.issuer``, or its ``identity.issuers`` entry)."""
        file, data = self.source(GATEWAY_FILE)
        identity = self.gateway_file.identity
        index = next((i for i, entry in enumerate(identity.issuers) if entry.name == name), None)
        return locate(data, ("identity", "issuers", index) if index is not None else ("identity", "issuer"), file,
                      message)

    def source(self, file: str) -> tuple[str, Any]:
        """The name a file is shown by in messages, and its parsed YAML (which knows every line)."""
        return next(((name, data) for name, data in self.sources.items() if name.endswith(file)), (file, None))

    @property
    def resources(self) -> dict[str, Resource]:
        """Preset resources and the file's own, by name (a clash is a config error)."""
        return {**expand_presets(self.gateway_file.resource_presets), **self.gateway_file.resources}

    def app_names_by_client_id(self) -> dict[str, str]:
        return {
            client_id.lower(): name
            for name, client_ids in self.gateway_file.applications.items()
            for client_id in client_ids
        }

    def app_identifiers_by_client_id(self) -> dict[str, tuple[str, ...]]:
        """The bundle and package ids (lower case) of each configured client id's application."""
        identifiers = self.gateway_file.device_signals.app_protection.app_identifiers
        return {
            client_id.lower(): tuple(sorted({i.lower() for i in identifiers[name]}))
            for name, client_ids in self.gateway_file.applications.items() if name in identifiers
            for client_id in client_ids
        }


def resolve(directory: Path, relative: Path) -> Path:
    """A path written in a config file, resolved against the config directory."""
    return relative if relative.is_absolute() else (directory.resolve() / relative).resolve()


def load_config(directory: Path) -> Config:
    """Read, validate and cross-check ``portcullis.yaml`` and ``policies.yaml`` in ``directory``."""
    _check_directory(directory)
    gateway_name, policies_name = (_display(directory / f) for f in (GATEWAY_FILE, POLICIES_FILE))
    gateway_file, gateway_data, problems = _gateway_file(directory, gateway_name)
    policies_data, more = read_yaml(directory / POLICIES_FILE, policies_name)
    problems += more
    policies_file = None
    if policies_data is not None or not any(p.file == policies_name for p in problems):
        policies_file, more = validate(PoliciesFile, policies_data, policies_name)
        problems += more
    if gateway_file is not None and policies_file is not None:
        problems += _check_policies(gateway_file, policies_file, policies_data, policies_name)
    device_trust, more = _device_trust(directory, gateway_file, gateway_data, gateway_name)
    problems += more
    raise_if(problems)
    assert gateway_file is not None and policies_file is not None  # no problems
    return Config(directory.resolve(), gateway_file, tuple(policies_file.policies),
                  {gateway_name: gateway_data, policies_name: policies_data}, device_trust)


def load_gateway_file(directory: Path) -> PortcullisFile:
    """``portcullis.yaml`` alone, validated and cross-checked as ``load_config`` does, for the device
    commands: they must work while ``policies.yaml`` is being edited (the gateway serves its last
    good rules meanwhile). Never a source of rules."""
    _check_directory(directory)
    gateway_file, _, problems = _gateway_file(directory, _display(directory / GATEWAY_FILE))
    raise_if(problems)
    assert gateway_file is not None  # no problems
    return gateway_file


def _check_directory(directory: Path) -> None:
    if not directory.is_dir():
        raise ConfigError([ConfigProblem(str(directory), None, None, "", "not a directory")])


def _gateway_file(directory: Path, name: str) -> tuple[PortcullisFile | None, Any, list[ConfigProblem]]:
    data, problems = read_yaml(directory / GATEWAY_FILE, name)
    if data is None and problems:
        return None, data, problems
    gateway_file, problems = validate(PortcullisFile, data, name)
    if gateway_file is not None:
        problems += _check_issuers(gateway_file, data, name) + _check_resources(gateway_file, data, name)
    return gateway_file, data, problems


def _device_trust(directory: Path, gateway_file: PortcullisFile | None, data: Any,
                  name: str) -> tuple[dict[str, DeviceTrust], list[ConfigProblem]]:
    """Each protected host's device CAs and CRLs, read now: a reload reads them again."""
    trust: dict[str, DeviceTrust] = {}
    problems: list[ConfigProblem] = []
    for host, protected in (gateway_file.protected_hosts.items() if gateway_file is not None else ()):
        if protected.device_certificates is None:
            continue
        loaded, more = load_device_trust(protected.device_certificates, lambda path: resolve(directory, path),
                                         data, ("protectedHosts", host, "deviceCertificates"), name)
        problems += more
        if loaded is not None:
            trust[host] = loaded
    return trust, problems


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _check_issuers(gateway_file: PortcullisFile, data: object, name: str) -> list[ConfigProblem]:
    """One ``iss`` names one issuer, one name one entry: else which keys verify a token, or which
    issuer a policy means, would depend on the order of the list."""
    named: dict[str, int] = {}
    issued: dict[str, int] = {}
    problems = []
    for index, entry in enumerate(gateway_file.identity.issuers):
        if entry.name in named:
            problems.append(locate(data, ("identity", "issuers", index, "name"), name,
                                   f"{entry.name!r} already names issuers[{named[entry.name]}]"))
        named.setdefault(entry.name, index)
        for key, iss in [("issuer", entry.issuer), *(("additionalIssuers", a) for a in entry.additional_issuers)]:
            if iss in issued:
                problems.append(locate(data, ("identity", "issuers", index, key), name,
                                       f"{iss!r} is already an iss of issuers[{issued[iss]}] (each iss belongs "
                                       "to one)"))
            issued.setdefault(iss, index)
    return problems


def _check_resources(gateway_file: PortcullisFile, data: object, name: str) -> list[ConfigProblem]:
    hosts = sorted(gateway_file.protected_hosts)
    problems = []
    for preset, preset_hosts in gateway_file.resource_presets.items():
        for index, host in enumerate(preset_hosts):
            if host not in gateway_file.protected_hosts:
                problems.append(locate(data, ("resourcePresets", preset.value, index), name,
                                       f"{host!r} is not a protected host; known: {', '.join(hosts)}"))
    preset_names = expand_presets(gateway_file.resource_presets)
    for resource_name, resource in gateway_file.resources.items():
        if resource_name in preset_names:
            problems.append(locate(data, ("resources", resource_name), name,
                                   f"{resource_name!r} is already defined by resourcePresets; pick another name",
                                   at_value=False))
        for index, host in enumerate(resource.hosts):
            if host not in gateway_file.protected_hosts:
                problems.append(locate(data, ("resources", resource_name, "hosts", index), name,
                                       f"{host!r} is not a protected host; known: {', '.join(hosts)}"))
    return problems + _same_paths(gateway_file, preset_names, data, name)


def _same_paths(gateway_file: PortcullisFile, presets: dict[str, Resource], data: object,
                name: str) -> list[ConfigProblem]:
    """Two resources with the same path on the same host would silently share or shadow it."""
    owners: dict[tuple[str, str], str] = {}
    problems = []
    for resource_name, resource in {**presets, **gateway_file.resources}.items():
        for index, path in enumerate(resource.paths):
            for host in resource.hosts:
                key = (host, path.lower().rstrip("/"))
                owner = owners.setdefault(key, resource_name)
                if owner != resource_name:
                    problems.append(locate(data, ("resources", resource_name, "paths", index), name,
                                           f"{path!r} on {host} is already a path of resource {owner!r}"))
    return problems


def _check_policies(
    gateway_file: PortcullisFile, policies_file: PoliciesFile, data: object, name: str
) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    resources = sorted({*expand_presets(gateway_file.resource_presets), *gateway_file.resources})
    locations = sorted({*gateway_file.named_locations, *([gateway_file.kiosk.location] if gateway_file.kiosk else [])})
    apps = sorted(gateway_file.applications)
    counts = Counter(p.name for p in policies_file.policies)
    for index, policy in enumerate(policies_file.policies):
        if counts[policy.name] > 1:
            problems.append(locate(data, ("policies", index, "name"), name,
                                   f"{policy.name!r} is used by more than one policy"))
        conditions = ("policies", index, "conditions")
        problems += _unknown_names(data, name, (*conditions, "resources"), policy.conditions.resources,
                                   "resource", [ALL], resources)
        if policy.conditions.locations is not None:
            problems += _unknown_names(data, name, (*conditions, "locations"), policy.conditions.locations,
                                       "named location", [ALL, ALL_TRUSTED], locations)
        problems += _unknown_issuers(data, name, (*conditions, "users"), policy.conditions.users.include_issuers,
                                     policy.conditions.users.exclude_issuers, gateway_file)
        grant = policy.grant_controls
        strength = grant.authentication_strength if grant else None
        strengths = sorted({*BUILT_IN_STRENGTHS, *gateway_file.authentication_strengths})
        if strength is not None and strength not in strengths:
            problems.append(locate(data, ("policies", index, "grantControls", "authenticationStrength"), name,
                                   f"{strength!r} is not an authentication strength; known: {', '.join(strengths)}"
                                   f"{suggest(strength, strengths)}"))
        for item_index, app in enumerate(grant.approved_applications if grant else []):
            if app not in gateway_file.applications:
                loc = ("policies", index, "grantControls", "approvedApplications", item_index)
                problems.append(locate(data, loc, name,
                                       f"{app!r} is not an application; known: {', '.join(apps)}"))
    return problems


def _unknown_issuers(data: object, file: str, loc: tuple[str | int, ...], include: list[str], exclude: list[str],
                     gateway_file: PortcullisFile) -> list[ConfigProblem]:
    """``includeIssuers``/``excludeIssuers`` name issuers of ``identity`` (``default``: the single issuer)."""
    known = [entry.name for entry in gateway_file.identity.trusted]
    return [locate(data, (*loc, key, item_index), file, f"{item!r} is not an issuer; known: {', '.join(known)}")
            for key, names in (("includeIssuers", include), ("excludeIssuers", exclude))
            for item_index, item in enumerate(names) if item not in known]


def _unknown_names(data: object, file: str, loc: tuple[str | int, ...], assignment: Include, what: str,
                   keywords: list[str], known: list[str]) -> list[ConfigProblem]:
    return [
        locate(data, (*loc, side, item_index), file,
               f"{item!r} is not a {what}; known: {', '.join([*keywords, *known]) or '(none defined)'}")
        for side in ("include", "exclude")
        for item_index, item in enumerate(getattr(assignment, side))
        if item not in keywords and item not in known
    ]
