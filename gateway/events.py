"""Change events: what makes a gateway process drop cached device signals and decide its open
connections again (continuous access evaluation), device changes and app protection registration
changes alike.

A process hears device changes from one source, its store's change feed: the SQLite change log it
polls, or the Redis channel every write is announced on. Its own writes come back the same way, so
each change is heard once. A reload of the rules is announced by the process that reloads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DevicesChanged:
    """These devices' signals changed (ids in lower case, as stored)."""

    device_ids: frozenset[str]

    @classmethod
    def of(cls, device_ids: Iterable[str]) -> DevicesChanged:
        return cls(frozenset(d.lower() for d in device_ids))

    def touches(self, device_id: str) -> bool:
        return device_id.lower() in self.device_ids


@dataclass(frozen=True, slots=True)
class AllDevicesChanged:
    """Any device may have changed: a write too large to list, a change log this process fell
    behind, or a feed that was down (changes made meanwhile were not heard)."""

    def touches(self, device_id: str) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class RulesReloaded:
    """The rules were swapped: every open flow is decided again, after a grace."""

    def touches(self, device_id: str) -> bool:
        return False  # no device's signals changed


@dataclass(frozen=True, slots=True)
class AppRegistrationsChanged:
    """These users' app protection registrations changed (object ids or UPNs, lower case); ``every``:
    any user's may have (a change log this process fell behind). No device's signals changed: the
    flows whose decision read these users' registrations are decided again."""

    users: frozenset[str]
    every: bool = False

    def touches(self, device_id: str) -> bool:
        return False

    def concerns(self, users: frozenset[str]) -> bool:
        return self.every or not self.users.isdisjoint(users)


type ChangeEvent = DevicesChanged | AllDevicesChanged | RulesReloaded | AppRegistrationsChanged
type ChangeListener = Callable[[ChangeEvent], None]

ALL_DEVICES = AllDevicesChanged()
RULES_RELOADED = RulesReloaded()
