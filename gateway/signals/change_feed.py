"""The change feed of one gateway process: it hears device changes from the device store's own
feed (SQLite's change log, polled; or the shared state's channel: Redis), forgets the cached
devices they concern, and tells the listeners (continuous access evaluation of open flows). One
source per process: a change this process writes is heard through the store's feed, as every
other process hears it, and only so."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Iterable

from gateway.events import (
    ALL_DEVICES,
    AllDevicesChanged,
    AppRegistrationsChanged,
    ChangeEvent,
    ChangeListener,
    DevicesChanged,
)
from gateway.signals.app_protection import AppRegistrationStore
from gateway.signals.app_registrations_sqlite import SqliteAppRegistrations
from gateway.signals.cache import CachedInventory
from gateway.signals.sqlite_store import SqliteDeviceStore
from gateway.signals.store import DeviceStore

logger = logging.getLogger(__name__)


class ChangeFeed:
    """Listeners are told in the event loop; the cache forgets a device before they are told."""

    def __init__(self, inventory: CachedInventory, store: DeviceStore | None,
                 apps: AppRegistrationStore | None = None) -> None:
        self.inventory = inventory
        # app registrations in a SQLite file: their change log is polled as the devices' is (not cached)
        self._apps = apps if isinstance(apps, SqliteAppRegistrations) else None
        self._seen_app_change = self._apps.last_change() if self._apps is not None else 0
        self._apps_version = self._apps.data_version() if self._apps is not None else 0
        self._listeners: list[ChangeListener] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._polled = store if isinstance(store, SqliteDeviceStore) else None  # Redis announces its changes instead
        self.shared_feed_up: bool | None = None  # with shared state: is its change feed up (None: no feed)
        self._seen_change = self._polled.last_change() if self._polled is not None else 0
        self._data_version = self._polled.data_version() if self._polled is not None else 0

    def subscribe(self, listener: ChangeListener) -> None:
        """``listener(event)`` is called, in the event loop, on every change (``gateway.events``)."""
        self._listeners.append(listener)

    def tell(self, event: ChangeEvent) -> None:
        for listener in self._listeners:
            listener(event)

    def _devices_changed(self, device_ids: Iterable[str]) -> None:
        """Continuous access evaluation: forget cached signals, tell listeners (open flows). Only
        the store's feed calls it (``pick_up_changes``, ``shared_devices_changed``): one source."""
        event = DevicesChanged.of(device_ids)
        self.inventory.invalidate(event.device_ids)
        self.tell(event)

    def _all_devices_changed(self) -> None:
        self.inventory.invalidate_all()
        self.tell(ALL_DEVICES)

    def shared_devices_changed(self, event: DevicesChanged | AllDevicesChanged) -> None:
        """A change announced over the shared state's feed, by any process or host (this one too)."""
        if isinstance(event, DevicesChanged):
            self._devices_changed(event.device_ids)
        else:
            self._all_devices_changed()

    def shared_feed_lost(self) -> None:
        """The feed is down: a change could be missed, so no cached device is trusted as fresh."""
        self.shared_feed_up = False
        self.inventory.feed_lost()

    def shared_feed_restored(self) -> None:
        """The feed is (back) up: changes made while it was down were not heard of, so forget
        every cached device and decide the open flows again."""
        self.shared_feed_up = True
        self.inventory.feed_restored()
        self.tell(ALL_DEVICES)
        self.tell(AppRegistrationsChanged(frozenset(), every=True))

    def wrote(self, device_ids: set[str]) -> None:
        """This process changed these devices. Its listeners hear of it through the store's feed, as
        every other process does, and only so (heard directly too, each change was heard twice):
        the SQLite change log is read now (the poll then finds nothing new); Redis's channel brings
        it in a moment, and meanwhile the cache forgets the devices so the next request reads them."""
        if self._polled is not None:
            self._poll()
        else:
            self.inventory.invalidate(device_ids)

    def from_thread(self, function: Callable[[set[str]], None], argument: set[str]) -> None:
        """Listeners (open flows) live in the event loop; a store is written in a worker thread."""
        if self._loop is None:
            function(argument)
        else:
            self._loop.call_soon_threadsafe(function, argument)

    def pick_up_changes(self) -> None:
        """Changes other processes committed (``portcullis devices set-risk``, another worker):
        the data version check is cheap, so it runs before every device lookup."""
        if self._polled is None or self._polled.data_version() == self._data_version:
            return
        self._data_version = self._polled.data_version()
        self._seen_change, changed, complete = self._polled.changes_since(self._seen_change)
        if not complete:  # this gateway fell behind the change log: forget every device
            logger.warning("device change log moved past this gateway; re-reading every device")
            self._all_devices_changed()
        elif changed:
            self._devices_changed(changed)

    async def watch_changes(self, interval: float = 0.25) -> None:
        """Long-lived connections of a device that lost access must close within a second,
        even when no new request arrives: poll for changes."""
        self._loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            self._poll()

    def _poll(self) -> None:
        try:
            self.pick_up_changes()
        except sqlite3.Error as error:
            logger.warning("cannot read device changes: %s", error)  # the next poll tries again
        try:
            self.pick_up_app_changes()
        except sqlite3.Error as error:
            logger.warning("cannot read app registration changes: %s", error)

    def pick_up_app_changes(self) -> None:
        """App registrations committed by any process (a sync, ``portcullis apps``): the users
        whose open flows read them are decided again."""
        if self._apps is None or self._apps.data_version() == self._apps_version:
            return
        self._apps_version = self._apps.data_version()
        self._seen_app_change, users, complete = self._apps.changes_since(self._seen_app_change)
        if not complete:
            logger.warning("app registration change log moved past this gateway; deciding every open flow again")
            self.tell(AppRegistrationsChanged(frozenset(), every=True))
        elif users:
            self.tell(AppRegistrationsChanged(frozenset(users)))

    def shared_apps_changed(self, event: AppRegistrationsChanged) -> None:
        """A change announced over the shared state's feed (Redis), by any process or host."""
        self.tell(event)
