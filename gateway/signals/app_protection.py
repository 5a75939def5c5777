"""Intune app protection (MAM) registrations: for a user and an app (its bundle or package id), on a
device or none (a personal phone that is not enrolled), whether a protection policy is applied,
when the app last checked in and what Intune flagged. Graph's ``managedAppRegistration`` shapes
(``#microsoft.graph.iosManagedAppRegistration``, ``...androidManagedAppRegistration``) are read as
they come: the YAML seed, ``portcullis apps import`` and the Graph connector share one record.

``AppRegistrationStore`` is the interface (SQLite beside the devices: ``gateway/signals/
app_registrations_sqlite.py``; Redis: ``gateway/state/redis_apps.py``); ``AppProtectionSource``
serves one to the pipeline, keyed by the token's user and app.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from gateway.config.loader import locate, plain, read_yaml
from gateway.errors import ConfigError, ConfigProblem, SignalUnavailable
from gateway.http import strict_json
from gateway.policy.model import AppProtection, AppRegistration, Identity

IOS = "#microsoft.graph.iosManagedAppRegistration"
ANDROID = "#microsoft.graph.androidManagedAppRegistration"
PLATFORMS = {IOS: "iOS", ANDROID: "android"}
NOT_FLAGGED = "none"  # Graph's managedAppFlaggedReason for "nothing flagged"
REGISTRATIONS_MAX = 50  # a user's registrations of one app a lookup reads (one per device; more is an anomaly)


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=False, frozen=True,
                              strict=True)


class AppIdentifier(_Record):
    """Graph's ``mobileAppIdentifier``: an iOS ``bundleId`` or an Android ``packageId``."""

    odata_type: Annotated[str | None, Field(alias="@odata.type")] = None
    bundle_id: str | None = None
    package_id: str | None = None

    @model_validator(mode="after")
    def _one(self) -> AppIdentifier:
        if (self.bundle_id is None) == (self.package_id is None):
            raise ValueError("give exactly one of bundleId (iOS) and packageId (Android)")
        return self

    @property
    def value(self) -> str:
        return (self.bundle_id or self.package_id or "").lower()


class AppliedPolicy(_Record):
    """An entry of ``appliedPolicies`` (Graph's ``managedAppPolicy``): its id, perhaps its name."""

    odata_type: Annotated[str | None, Field(alias="@odata.type")] = None
    id: Annotated[str, Field(min_length=1)]
    display_name: str | None = None


class AppRegistrationRecord(_Record):
    """One registration, in Graph's field names. ``userPrincipalName`` and ``azureADDeviceId``
    are optional extras (the seed names users by UPN; Graph's beta names the Entra device)."""

    id: Annotated[str, Field(min_length=1, max_length=200)]
    odata_type: Annotated[Literal[
        "#microsoft.graph.iosManagedAppRegistration", "#microsoft.graph.androidManagedAppRegistration"],
        Field(alias="@odata.type")]
    app_identifier: AppIdentifier
    user_id: str | None = None
    user_principal_name: str | None = None
    azure_ad_device_id: Annotated[str | None, Field(alias="azureADDeviceId")] = None
    device_tag: str | None = None
    device_name: str | None = None
    applied_policies: list[AppliedPolicy | str] = []
    flagged_reasons: list[str] = []
    last_sync_date_time: AwareDatetime | None = None

    @model_validator(mode="after")
    def _names_a_user(self) -> AppRegistrationRecord:
        if not self.user_id and not self.user_principal_name:
            raise ValueError("a registration names its user: userId (object id) or userPrincipalName")
        platform = "bundleId" if self.odata_type == IOS else "packageId"
        if getattr(self.app_identifier, "bundle_id" if self.odata_type == IOS else "package_id") is None:
            raise ValueError(f"an {PLATFORMS[self.odata_type]} registration names its app by {platform}")
        return self

    def to_registration(self) -> AppRegistration:
        return AppRegistration(
            registration_id=self.id.lower(), app_identifier=self.app_identifier.value,
            platform=PLATFORMS[self.odata_type],
            user_id=_lower(self.user_id), user_principal_name=_lower(self.user_principal_name),
            device_id=_lower(self.azure_ad_device_id), device_tag=self.device_tag, device_name=self.device_name,
            applied_policies=tuple(p if isinstance(p, str) else p.display_name or p.id for p in self.applied_policies),
            flagged_reasons=tuple(r for r in self.flagged_reasons if r != NOT_FLAGGED),
            last_sync=self.last_sync_date_time)


def _lower(value: str | None) -> str | None:
    return value.strip().lower() if value else None


def registration_json(registration: AppRegistration, *, with_user: bool = True) -> dict[str, Any]:
    """A registration as Graph writes it (the store's rows, ``apps show``; the decision log's
    ``with_user=False``: ``registration_from_json`` reads it back with ``user``)."""
    identifier = {"bundleId": registration.app_identifier} if registration.platform == "iOS" \
        else {"packageId": registration.app_identifier}
    users = {"userId": registration.user_id, "userPrincipalName": registration.user_principal_name} \
        if with_user else {}
    return {
        "id": registration.registration_id,
        "@odata.type": IOS if registration.platform == "iOS" else ANDROID,
        "appIdentifier": identifier,
        **users,
        "azureADDeviceId": registration.device_id,
        "deviceTag": registration.device_tag,
        "deviceName": registration.device_name,
        "appliedPolicies": list(registration.applied_policies),
        "flaggedReasons": list(registration.flagged_reasons),
        "lastSyncDateTime": registration.last_sync.isoformat() if registration.last_sync else None,
    }


def registration_from_json(text: str | bytes, user: str | None = None) -> AppRegistration:
    """A stored row back (``registration_json``'s output), ``user`` its user when the row names
    none. Raises ValueError when it is unreadable."""
    data = json.loads(text)
    data = {k: v for k, v in data.items() if v is not None}
    if user is not None and not data.get("userId") and not data.get("userPrincipalName"):
        data["userPrincipalName"] = user
    return AppRegistrationRecord.model_validate_json(json.dumps(data), strict=True).to_registration()


def parse_registrations(path: Path, display_name: str | None = None) -> list[AppRegistration]:
    """A seed or export (YAML or JSON): a list, ``registrations:`` or Graph's ``value``. Raises
    ConfigError naming the line of every bad entry and of an id given twice; nothing is kept then."""
    shown = display_name or str(path)
    data: Any = None
    if path.suffix.lower() == ".json":
        try:
            data = strict_json.loads(path.read_bytes())
        except (OSError, ValueError):
            data = None  # the YAML reader names the line
    problems: list[ConfigProblem] = []
    if data is None:
        data, problems = read_yaml(path, shown)
        if problems:
            raise ConfigError(problems)
    key = ("value" if "value" in data else "registrations") if isinstance(data, dict) else None
    items = data.get(key) if key is not None else data
    if not isinstance(items, list):
        raise ConfigError([ConfigProblem(shown, 1, 1, "", "expected a list of app registrations, or an object with "
                                         "'registrations' or Graph's 'value'")])
    prefix = (key,) if key is not None else ()
    registrations: list[AppRegistration] = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        try:
            record = AppRegistrationRecord.model_validate_json(json.dumps(plain(item)), strict=True)
        except ValidationError as error:
            problems += [locate(data, (*prefix, index, *e["loc"]), shown, e["msg"]) for e in error.errors()]
            continue
        if record.id.lower() in seen:
            problems.append(locate(data, (*prefix, index, "id"), shown, f"registration {record.id!r} is listed twice"))
        seen.add(record.id.lower())
        registrations.append(record.to_registration())
    if problems:
        raise ConfigError(problems)
    return registrations



class AppRegistrationStore(ABC):
    """Thread-safe and blocking. A store that cannot answer raises ``SignalUnavailable`` (SQLite
    may raise ``sqlite3.Error``): the request fails closed. Every write announces the users it
    changed (``gateway.events.AppRegistrationsChanged``)."""

    location: str

    @abstractmethod
    def registrations_for(self, user_keys: Iterable[str], app_identifiers: Iterable[str]) -> list[AppRegistration]:
        """The registrations of these apps (bundle/package ids, lower case) for a user named by any of
        ``user_keys`` (object id or UPN, lower case: see ``names``), at most ``REGISTRATIONS_MAX``, by id."""

    @abstractmethod
    def replace_all(self, registrations: Iterable[AppRegistration], *, now: datetime, prune: bool = False) -> int:
        """Upsert every registration in one transaction; ``prune`` (a full sync) removes the others,
        except when ``registrations`` is empty (an empty answer prunes nothing). Returns how many."""

    @abstractmethod
    def remove(self, registration_ids: Iterable[str], *, now: datetime) -> set[str]:
        """Remove registrations by id; returns the ids that were there."""

    @abstractmethod
    def registrations(self) -> Iterator[AppRegistration]:
        """Every registration, by id."""

    @abstractmethod
    def close(self) -> None: ...

    def count(self) -> int:
        return sum(1 for _ in self.registrations())

    def registration(self, registration_id: str) -> AppRegistration | None:
        return next((r for r in self.registrations() if r.registration_id == registration_id.lower()), None)


def names(registration: AppRegistration, user_keys: set[str]) -> bool:
    """Whether a registration is one of these users': by its object id (Graph's ``userId``), or by
    UPN only when it names no object id (a seed's). A UPN is a claim another issuer could mint for
    anyone; Graph's registrations carry the object id, which only the tenant's own tokens hold."""
    if registration.user_id is not None:
        return registration.user_id in user_keys
    return registration.user_principal_name in user_keys


def user_keys(identity: Identity) -> tuple[str, ...]:
    """How registrations may name the token's user: its object id (Graph's ``userId``) or its UPN."""
    return tuple(k.lower() for k in (identity.object_id, identity.user_principal_name) if k)


def changed_users(registrations: Iterable[AppRegistration]) -> set[str]:
    """The user keys a write concerns, for ``AppRegistrationsChanged``."""
    return {k for r in registrations for k in (r.user_id, r.user_principal_name) if k}


class AppProtectionSource:
    """A store as the pipeline reads it: a worker thread per lookup, errors as SignalUnavailable."""

    def __init__(self, store: AppRegistrationStore, name: str = "sqlite") -> None:
        self.store = store
        self.name = name  # the signal source in decision logs

    async def protection(self, identity: Identity, app_identifiers: tuple[str, ...],
                         max_sync_age: timedelta | None) -> AppProtection:
        found: list[AppRegistration] = []
        keys = user_keys(identity)
        if app_identifiers and keys:
            try:
                found = await asyncio.to_thread(self.store.registrations_for, keys, app_identifiers)
            except sqlite3.Error as error:
                raise SignalUnavailable(f"app registrations {self.store.location}: {error}") from error
        return AppProtection(registrations=tuple(found), source=self.name, max_sync_age=max_sync_age)


class MemoryAppRegistrations(AppRegistrationStore):
    """The seed alone, answered from memory (a config without a database): read once at start."""

    def __init__(self, registrations: Iterable[AppRegistration] = (), location: str = "memory") -> None:
        self.location = location
        self._by_id = {r.registration_id.lower(): r for r in registrations}

    def registrations_for(self, user_keys: Iterable[str], app_identifiers: Iterable[str]) -> list[AppRegistration]:
        users, apps = set(user_keys), set(app_identifiers)
        return [r for _, r in sorted(self._by_id.items()) if r.app_identifier in apps and names(r, users)
                ][:REGISTRATIONS_MAX]

    def replace_all(self, registrations: Iterable[AppRegistration], *, now: datetime, prune: bool = False) -> int:
        given = {r.registration_id.lower(): r for r in registrations}
        if prune and given:
            self._by_id = {}
        self._by_id.update(given)
        return len(given)

    def remove(self, registration_ids: Iterable[str], *, now: datetime) -> set[str]:
        return {i for i in (i.lower() for i in registration_ids) if self._by_id.pop(i, None) is not None}

    def registrations(self) -> Iterator[AppRegistration]:
        return iter([r for _, r in sorted(self._by_id.items())])

    def close(self) -> None:
        pass


class OverlayAppRegistrations(AppRegistrationStore):
    """The seed's registrations over the stored ones (by id), read only: what the rule tools ask."""

    def __init__(self, top: AppRegistrationStore, bottom: AppRegistrationStore) -> None:
        self._top, self._bottom = top, bottom
        self.location = f"{top.location} over {bottom.location}"

    def registrations_for(self, user_keys: Iterable[str], app_identifiers: Iterable[str]) -> list[AppRegistration]:
        users, apps = tuple(user_keys), tuple(app_identifiers)
        found = {r.registration_id: r for r in self._bottom.registrations_for(users, apps)}
        found.update({r.registration_id: r for r in self._top.registrations_for(users, apps)})
        return [r for _, r in sorted(found.items())][:REGISTRATIONS_MAX]

    def registrations(self) -> Iterator[AppRegistration]:
        found = {r.registration_id: r for r in self._bottom.registrations()}
        found.update({r.registration_id: r for r in self._top.registrations()})
        return iter([r for _, r in sorted(found.items())])

    def replace_all(self, registrations: Iterable[AppRegistration], *, now: datetime, prune: bool = False) -> int:
        raise NotImplementedError("the rule tools' view is read only")

    def remove(self, registration_ids: Iterable[str], *, now: datetime) -> set[str]:
        raise NotImplementedError("the rule tools' view is read only")

    def close(self) -> None:
        pass
