"""MTD ingest: an MTD partner's threat verdicts stored in the device store. The devices that
changed are heard of through the store's change feed (``gateway.signals.change_feed``), like any change."""

from __future__ import annotations

import sqlite3
from datetime import datetime

from gateway.errors import SignalUnavailable
from gateway.signals.change_feed import ChangeFeed
from gateway.signals.mtd import Verdict
from gateway.signals.store import DeviceStore


class ThreatVerdicts:
    """Writes verdicts and partner contact to the store; a store that cannot be written is a
    ``SignalUnavailable`` (the webhook answers 503 and the partner sends again)."""

    def __init__(self, store: DeviceStore | None, feed: ChangeFeed) -> None:
        self._store = store
        self._feed = feed

    def record_threat_verdicts(self, partner: str, verdicts: list[Verdict], now: datetime) -> list[str]:
        """Store an MTD partner's verdicts (blocking: run it in a thread); returns unknown device ids."""
        if self._store is None:
            raise SignalUnavailable("MTD verdicts need a device store (deviceSignals.database or state)")
        try:
            changed, unknown = self._store.apply_verdicts(partner, [(v.device_id, v.level) for v in verdicts],
                                                          now=now)
        except sqlite3.Error as error:
            raise SignalUnavailable(f"device inventory: {error}") from error
        if changed:
            self._feed.from_thread(self._feed.wrote, changed)
        return unknown

    def record_partner_contact(self, partner: str, now: datetime) -> None:
        if self._store is not None:
            try:
                self._store.partner_contact(partner, now=now)
            except sqlite3.Error as error:
                raise SignalUnavailable(f"device inventory: {error}") from error
