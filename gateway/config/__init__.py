"""The configuration of one gateway: two YAML files in one directory, validated as a whole.

``load_config`` reports every problem of every file in one ``ConfigError`` (file:line: key:
message), including references that do not resolve (a policy naming an unknown resource).
Relative paths in the files are relative to the config directory.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from gateway.config.loader import locate, raise_if, read_yaml, validate
from gateway.config.models import (
    ConditionalAccessPolicy,
    PoliciesFile,
    PortcullisFile,
    Resource,
)
from gateway.errors import ConfigError, ConfigProblem

__all__ = ["Config", "ConfigError", "load_config", "GATEWAY_FILE", "POLICIES_FILE"]

GATEWAY_FILE = "portcullis.yaml"
POLICIES_FILE = "policies.yaml"
ALL = "All"


@dataclass(frozen=True, slots=True)
class Config:
    directory: Path
    gateway_file: PortcullisFile
    policies: tuple[ConditionalAccessPolicy, ...]

    def path(self, relative: Path) -> Path:
        """A path from the config files, resolved against the config directory."""
        return relative if relative.is_absolute() else (self.directory / relative).resolve()

    @property
    def resources(self) -> dict[str, Resource]:
        return self.gateway_file.resources

    def app_names_by_client_id(self) -> dict[str, str]:
        return {
            client_id.lower(): name
            for name, client_ids in self.gateway_file.applications.items()
            for client_id in client_ids
        }


def load_config(directory: Path) -> Config:
    """Read, validate and cross-check ``portcullis.yaml`` and ``policies.yaml`` in ``directory``."""
    if not directory.is_dir():
        raise ConfigError([ConfigProblem(str(directory), None, None, "", "not a directory")])
    gateway_name, policies_name = (_display(directory / f) for f in (GATEWAY_FILE, POLICIES_FILE))
    gateway_data, problems = read_yaml(directory / GATEWAY_FILE, gateway_name)
    policies_data, more = read_yaml(directory / POLICIES_FILE, policies_name)
    problems += more
    gateway_file = policies_file = None
    if gateway_data is not None or not problems:
        gateway_file, more = validate(PortcullisFile, gateway_data, gateway_name)
        problems += more
    if policies_data is not None or not any(p.file == policies_name for p in problems):
        policies_file, more = validate(PoliciesFile, policies_data, policies_name)
        problems += more
    if gateway_file is not None:
        problems += _check_resources(gateway_file, gateway_data, gateway_name)
    if gateway_file is not None and policies_file is not None:
        problems += _check_policies(gateway_file, policies_file, policies_data, policies_name)
    raise_if(problems)
    assert gateway_file is not None and policies_file is not None  # noqa: S101  (no problems)
    return Config(directory.resolve(), gateway_file, tuple(policies_file.policies))


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _check_resources(gateway_file: PortcullisFile, data: object, name: str) -> list[ConfigProblem]:
    hosts = sorted(gateway_file.protected_hosts)
    return [
        locate(data, ("resources", resource_name, "host"), name,
               f"{resource.host!r} is not a protected host; known: {', '.join(hosts)}")
        for resource_name, resource in gateway_file.resources.items()
        if resource.host not in gateway_file.protected_hosts
    ]


def _check_policies(
    gateway_file: PortcullisFile, policies_file: PoliciesFile, data: object, name: str
) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    resources = sorted(gateway_file.resources)
    apps = sorted(gateway_file.applications)
    counts = Counter(p.name for p in policies_file.policies)
    for index, policy in enumerate(policies_file.policies):
        if counts[policy.name] > 1:
            problems.append(locate(data, ("policies", index, "name"), name,
                                   f"{policy.name!r} is used by more than one policy"))
        for side in ("include", "exclude"):
            for item_index, item in enumerate(getattr(policy.conditions.resources, side)):
                if item != ALL and item not in gateway_file.resources:
                    loc = ("policies", index, "conditions", "resources", side, item_index)
                    known = ", ".join([ALL, *resources])
                    problems.append(locate(data, loc, name, f"{item!r} is not a resource; known: {known}"))
        for item_index, app in enumerate(policy.grant_controls.approved_applications):
            if app not in gateway_file.applications:
                loc = ("policies", index, "grantControls", "approvedApplications", item_index)
                problems.append(locate(data, loc, name,
                                       f"{app!r} is not an application; known: {', '.join(apps)}"))
    return problems
