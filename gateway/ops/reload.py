"""Hot reload: the config directory is read again, validated, tested and only then swapped in.

Triggers: a change of the files (polled), SIGHUP, ``POST /admin/reload``. A reload is all or
nothing. It is rejected, and the rules in force stay, when a file does not validate, when a
policy test in ``cases.yaml`` fails, or when a setting changed that only a restart can apply
(listeners, certificates, the JWKS cache settings, signal sources, the decision log). Requests
that started before the swap finish under the rules they started with (``AccessService.apply``).

The trusted issuers (``identity.issuer``, ``identity.issuers``) are swapped with the rules, before
anything is awaited: a removed issuer's tokens are refused from the next request on, and a new
issuer's keys are fetched right after (a failed fetch leaves its tokens at 503 and its readiness
check failing, the other issuers untouched).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from gateway.config import CASES_FILE, GATEWAY_FILE, POLICIES_FILE, Config, load_config
from gateway.config.lint import covered_resources
from gateway.config.loader import locate
from gateway.decision.rules import Rules
from gateway.decision.service import AccessService, utc_now
from gateway.errors import ConfigError, ConfigProblem
from gateway.identity.issuers import fetch_issuer_keys
from gateway.ops.cases import load_cases, run_cases
from gateway.ops.metrics import GatewayMetrics
from gateway.ops.whatif import WhatIf
from gateway.signals.devices import DeviceInventory

logger = logging.getLogger(__name__)

WATCHED_FILES = (GATEWAY_FILE, POLICIES_FILE, CASES_FILE)

# Settings a running gateway can take over; every other one needs a restart. Top-level keys of
# portcullis.yaml, and for four sections the keys inside them.
RELOADABLE = {"protected_hosts", "resource_presets", "resources", "named_locations", "applications"}
RELOADABLE_INSIDE = {"gateway": {"remediation_url"}, "device_signals": {"compliance"},
                     "kiosk": {"location", "pass_through", "allow"},
                     "identity": {"issuer", "issuers", "algorithms"}}


@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    trigger: str
    at: datetime
    applied: bool
    problems: tuple[str, ...] = ()  # file:line:col: key: message
    policies: int = 0

    def as_json(self) -> dict[str, Any]:
        return {"trigger": self.trigger, "at": self.at.isoformat(), "applied": self.applied,
                "problems": list(self.problems), "policies": self.policies}


class ConfigReloader:
    """Owns reloading one gateway's config directory; reloads run one at a time."""

    def __init__(self, service: AccessService, inventory: DeviceInventory, *,
                 metrics: GatewayMetrics | None = None, clock: Callable[[], datetime] = utc_now) -> None:
        self.service = service
        self.directory = service.config.directory
        self._inventory = inventory  # for cases.yaml: the devices the policy tests name
        self._metrics = metrics or service.metrics
        self._clock = clock
        self._lock = asyncio.Lock()
        self.last: ReloadOutcome | None = None
        self.loaded_at = clock()
        self._signature = files_signature(self.directory, self._trust_files())
        self.in_force_file: Path | None = None  # workers: where the digest of the config in force is kept
        self.adjust: Callable[[Config], Config] | None = None  # `demo --edge`: what it adds to every config loaded

    @property
    def last_failed(self) -> ReloadOutcome | None:
        """The last attempt, if it was rejected: the files on disk are not what is running."""
        return self.last if self.last is not None and not self.last.applied else None

    async def reload(self, trigger: str) -> ReloadOutcome:
        async with self._lock:
            self._signature = files_signature(self.directory, self._trust_files())
            digest = config_digest(self.directory)
            outcome = await self._reload(trigger)
            self.last = outcome
            self._metrics.reloads.labels("success" if outcome.applied else "failure", trigger).inc()
            self._metrics.config_valid.set(1 if outcome.applied else 0)
            if outcome.applied:
                self.loaded_at = outcome.at
                if self.in_force_file is not None:
                    record_in_force(self.in_force_file, digest)
                logger.info("config reloaded (%s): %d policies in force", trigger, outcome.policies)
            else:
                for problem in outcome.problems:
                    logger.error("config reload (%s) rejected, the previous rules stay in force: %s", trigger,
                                 problem)
            return outcome

    async def _reload(self, trigger: str) -> ReloadOutcome:
        now = self._clock()
        try:
            config = await asyncio.to_thread(load_config, self.directory)  # file reads stay off the proxy's loop
            if self.adjust is not None:
                config = self.adjust(config)
        except ConfigError as error:
            return ReloadOutcome(trigger, now, False, tuple(str(p) for p in error.problems))
        problems = restart_only_changes(self.service.config, config) + uncovered_by_change(self.service.config, config)
        if not problems:
            problems = await self._failing_cases(config, now)
        if problems:
            return ReloadOutcome(trigger, now, False, tuple(str(p) for p in problems))
        self.service.apply(Rules.of(config))
        new_issuers = self.service.validator.use(config.gateway_file.identity)  # no await between the two swaps
        await fetch_issuer_keys(self.service.validator.issuers.refresh(new_issuers), config,
                                f"config reload ({trigger}): ")
        return ReloadOutcome(trigger, now, True, policies=len(config.policies))

    async def _failing_cases(self, config: Config, now: datetime) -> list[ConfigProblem]:
        """The directory's own policy tests must pass before its rules go live."""
        cases_file = config.directory / CASES_FILE
        if not cases_file.exists():
            return []
        try:
            cases = load_cases(cases_file)
            outcomes = await run_cases(WhatIf(config, self._inventory, self.service.apps), cases, now)
        except ConfigError as error:
            return list(error.problems)
        except Exception as error:  # noqa: BLE001  (a case that cannot run fails the reload, never the gateway)
            return [ConfigProblem(str(cases_file), None, None, "", f"policy tests could not run: {error}")]
        return [ConfigProblem(str(cases_file), None, None, "", f"policy test failed: {o.name}: "
                              + "; ".join(o.differences)) for o in outcomes if not o.passed]

    def _trust_files(self) -> list[Path]:
        """The device CA and CRL files the rules in force read: a CRL replaced by the job that
        fetches it is picked up like an edited YAML file."""
        config = self.service.config
        return [config.path(file) for host in config.gateway_file.protected_hosts.values()
                if host.device_certificates is not None
                for file in (*host.device_certificates.ca_files, *host.device_certificates.crl_files)]

    async def watch(self, interval: float = 1.0, settle: float = 0.3) -> None:
        """Reload when a watched file changes (and has stopped changing for ``settle`` seconds:
        an editor writing in steps would otherwise be read half-written)."""
        while True:
            await asyncio.sleep(interval)
            signature = files_signature(self.directory, self._trust_files())
            if signature == self._signature:
                continue
            await asyncio.sleep(settle)
            if files_signature(self.directory, self._trust_files()) != signature:
                continue  # still being written: look again next time
            await self.reload("fileWatch")


def config_digest(directory: Path) -> str:
    """What the config files hold (their SHA-256 together), to tell whether two are the same."""
    digest = hashlib.sha256()
    for name in WATCHED_FILES:
        try:
            content = (directory / name).read_bytes()
        except FileNotFoundError:
            content = b"\0missing"
        digest.update(f"{name}\0{len(content)}\0".encode() + content)
    return digest.hexdigest()


def record_in_force(path: Path, digest: str) -> None:
    """The workers of a gateway note which config they run (at start and after each applied
    reload): a worker restarted later must not start on files the others refused."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(digest + "\n")
    temporary.replace(path)


def check_in_force(path: Path, directory: Path) -> None:
    """For a restarted worker: the files on disk must be the config the other workers run."""
    try:
        in_force = path.read_text().strip()
    except FileNotFoundError:
        return  # no worker has started yet
    if config_digest(directory) != in_force:
        raise ConfigError([ConfigProblem(str(directory), None, None, "", "the config files are not the ones the "
                                         "other workers run (a reload was refused, or a change is being picked up): "
                                         "this worker starts once they are (fix or revert the change)")])


def files_signature(directory: Path, more: Iterable[Path] = ()) -> tuple[tuple[str, int, int, int], ...]:
    """The watched files' times, sizes and inodes: the YAML files, and ``more`` (the trust files)."""
    signature = []
    for path in (*(directory / name for name in WATCHED_FILES), *more):
        try:
            stat = path.stat()
        except OSError:
            continue
        signature.append((str(path), stat.st_mtime_ns, stat.st_size, stat.st_ino))
    return tuple(signature)


def restart_only_changes(running: Config, candidate: Config) -> list[ConfigProblem]:
    """Changed settings the running gateway cannot take over, each at its line in the new file."""
    old, new = running.gateway_file, candidate.gateway_file
    data = candidate.sources.get(_source_name(candidate))
    problems = []
    for name, field in type(new).model_fields.items():
        if name in RELOADABLE:
            continue
        before, after = getattr(old, name), getattr(new, name)
        inside = RELOADABLE_INSIDE.get(name)
        if inside is not None and before is not None and after is not None:
            for sub_name, sub_field in type(after).model_fields.items():
                if sub_name not in inside and getattr(before, sub_name) != getattr(after, sub_name):
                    problems.append(_needs_restart(data, candidate, (field.alias or name, sub_field.alias or sub_name)))
        elif before != after:
            problems.append(_needs_restart(data, candidate, (field.alias or name,)))
    return problems


def uncovered_by_change(running: Config, candidate: Config) -> list[ConfigProblem]:
    """A reload never leaves a resource open that was not open before: a resource that loses its
    last enforced policy, or a new one no enforced policy covers, is reached by any valid token.
    That is also what a half-written policies file, or a change to one file before the other,
    looks like. Do it with a restart."""
    opened = sorted(open_resources(candidate) - open_resources(running))
    file = next((name for name in candidate.sources if name.endswith(POLICIES_FILE)), POLICIES_FILE)
    return [ConfigProblem(file, None, None, "policies", f"resource {name!r} would be covered by no enabled policy "
                          "(any valid token would reach it); a reload never opens a resource: restart the gateway "
                          "to apply this change deliberately") for name in opened]


def open_resources(config: Config) -> set[str]:
    """Resources that are not public yet reached by any valid token (for everyone, or outside a
    rollout cohort)."""
    covered, _ = covered_resources(config)
    return {name for name, resource in config.resources.items() if not resource.public and name not in covered}


def _needs_restart(data: object, candidate: Config, loc: tuple[str, ...]) -> ConfigProblem:
    return locate(data, loc, _source_name(candidate), "changed, but only a restart applies this setting; "
                  "the running gateway keeps its rules until it restarts or this change is undone", at_value=False)


def _source_name(config: Config) -> str:
    return next((name for name in config.sources if name.endswith(GATEWAY_FILE)), GATEWAY_FILE)
