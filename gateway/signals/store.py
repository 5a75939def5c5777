"""The device store: Intune's device records and, per device, the last verdict of each MTD
partner, in one SQLite file (``SqliteDeviceStore``) or in Redis for gateways on several hosts
(``RedisDeviceStore``). Both implement ``DeviceStore``, so the gateway, the Graph connector, the
MTD webhook and ``portcullis devices`` work with either; ``StoreInventory`` serves one to policy.

Every write announces the devices it changed, so that every gateway drops them from its caches and
decides their open connections again: SQLite in its change log, Redis on a channel.
"""

from __future__ import annotations

import asyncio
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from gateway.errors import SignalUnavailable
from gateway.policy.model import DeviceKey, DeviceThreatLevel, ManagedDevice
from gateway.signals.devices import DeviceRecord

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def micros(moment: datetime) -> int:
    """Microseconds since 1970: how verdict times are compared (and scored in Redis)."""
    return (moment - EPOCH) // timedelta(microseconds=1)


def with_threats(device: ManagedDevice, threats: list[tuple[str, str, str]]) -> ManagedDevice:
    """Several MTD partners may report on one device: the highest level wins. ``threats`` holds
    (partner, level, reported at) of each partner's current verdict."""
    if not threats:
        return device
    partner, level, reported = max(threats, key=lambda t: DeviceThreatLevel(t[1]).rank)
    return replace(device, threat_level=DeviceThreatLevel(level), threat_source=partner,
                   threat_reported_at=datetime.fromisoformat(reported))


class DeviceStore(ABC):
    """Thread-safe and blocking: async callers use ``to_thread``. A store that cannot answer
    raises ``SignalUnavailable`` (SQLite may also raise ``sqlite3.Error``): the request fails closed."""

    location: str  # where the inventory is, for messages (never a password)

    @abstractmethod
    def managed_device(self, device_id: str, ignored_partners: frozenset[str] = frozenset()) -> ManagedDevice | None:
        """The device with the highest current MTD level, leaving out ``ignored_partners``; None if unknown."""

    @abstractmethod
    def device_ids_for(self, key: DeviceKey, value: str) -> list[str]:
        """The azureADDeviceIds of the devices whose ``key`` is ``value`` (normalised), at most
        ``MATCHES_MAX``, sorted, from an index: ``DeviceInventory.device_ids_for``."""

    @abstractmethod
    def replace_all(self, records: Iterable[DeviceRecord], *, now: datetime, prune_partner: str | None = None,
                    seed: bool = False) -> int:
        """Upsert every record (threat verdicts included); returns how many.

        ``prune_partner`` (a full sync): devices not in ``records`` are removed, with that partner's
        verdicts; other partners' verdicts stay for when the device returns. An empty sync prunes
        nothing. ``seed``: a record's verdict never replaces a newer one already stored (a
        restart must not undo a webhook's raise)."""

    @abstractmethod
    def upsert(self, record: DeviceRecord, *, now: datetime, clear_partner: str | None = None) -> None:
        """One record; without a threat level, ``clear_partner``'s verdict on it goes."""

    @abstractmethod
    def remove(self, device_ids: Iterable[str], *, now: datetime) -> set[str]:
        """Retire devices (``portcullis devices remove``): the record and every partner's verdicts and
        verdict times go; returns (and announces) the ids of which anything was there: a record, or
        only the verdicts a full sync keeps for a device it pruned. A device a connector or the seed
        file still lists comes back with its next sync, lookup or start."""

    @abstractmethod
    def apply_verdicts(self, partner: str, verdicts: Iterable[tuple[str, DeviceThreatLevel | None]], *,
                       now: datetime) -> tuple[set[str], list[str]]:
        """One partner's verdicts, reported at ``now`` (``None`` clears its verdict); returns the
        devices changed and the ids the inventory does not know. A verdict older than the partner's
        newest one stored for the device (or clear) changes nothing. Counts as contact."""

    @abstractmethod
    def partner_contact(self, partner: str, *, now: datetime) -> None:
        """A signed push or heartbeat: the partner is responsive (a contact time only moves forward)."""

    @abstractmethod
    def partner_contacts(self) -> dict[str, datetime]:
        """When each partner was last heard from: a signed push, a heartbeat, or its newest verdict
        (imported or synced verdicts carry their report time)."""

    @abstractmethod
    def records(self) -> Iterator[dict[str, Any]]:
        """Every device's Intune fields (without verdicts), by device id."""

    @abstractmethod
    def count(self) -> int: ...

    @abstractmethod
    def close(self) -> None: ...

    def set_threat_level(self, device_id: str, partner: str, level: DeviceThreatLevel, *, now: datetime) -> bool:
        """Record a partner's verdict; False if the device is not in the inventory."""
        changed, _ = self.apply_verdicts(partner, [(device_id, level)], now=now)
        return bool(changed)

    def clear_threat_level(self, device_id: str, partner: str, *, now: datetime) -> bool:
        changed, _ = self.apply_verdicts(partner, [(device_id, None)], now=now)
        return bool(changed)


class StoreInventory:
    """A store as an async ``DeviceInventory``: lookups run in a worker thread. Verdicts of an
    MTD partner not heard from for its ``unresponsive_after`` are left out."""

    def __init__(self, store: DeviceStore, unresponsive_after: Mapping[str, timedelta] | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC), name: str = "sqlite") -> None:
        self.store = store
        self.name = name  # the signal source in decision logs: "sqlite" or "redis"
        self._unresponsive_after = dict(unresponsive_after or {})
        self._clock = clock

    def ignored_partners(self) -> frozenset[str]:
        if not self._unresponsive_after:
            return frozenset()
        contacts, now = self.store.partner_contacts(), self._clock()
        return frozenset(partner for partner, limit in self._unresponsive_after.items()
                         if partner not in contacts or now - contacts[partner] > limit)

    async def managed_device(self, device_id: str) -> ManagedDevice | None:
        try:
            return await asyncio.to_thread(self._lookup, device_id)
        except sqlite3.Error as error:
            raise SignalUnavailable(f"device inventory {self.store.location}: {error}") from error

    def _lookup(self, device_id: str) -> ManagedDevice | None:
        return self.store.managed_device(device_id, self.ignored_partners())

    async def device_ids_for(self, key: DeviceKey, value: str) -> list[str]:
        try:
            return await asyncio.to_thread(self.store.device_ids_for, key, value)
        except sqlite3.Error as error:
            raise SignalUnavailable(f"device inventory {self.store.location}: {error}") from error
