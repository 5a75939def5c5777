"""Readiness: can this gateway decide correctly right now? One check per dependency, each
``pass``, ``warn`` (serving, but someone should look) or ``fail`` (requests would be refused or
decided on stale data: take this instance out of the load balancer).

- ``config``: the last reload attempt; a rejected one warns (the last good rules stay in force).
- ``jwks`` (one issuer) or ``jwks:<name>`` per issuer (``identity.issuers``): the issuer's signing
  keys were fetched; a failed refresh warns (the keys already fetched stay in use), never fetched
  fails (that issuer's tokens get 503; the other issuers' keep working).
- ``deviceInventory``: the SQLite inventory answers; ``graph``: the last full sync is not older
  than twice the sync interval (and one has succeeded within twice the interval of the start).
- ``mtd:<partner>``: the partner was heard from within ``unresponsiveAfterSeconds``; past that its
  verdicts are ignored (warn).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from gateway.decision.service import AccessService, utc_now
from gateway.errors import SignalUnavailable
from gateway.identity.issuers import TrustedIssuer, TrustedIssuers
from gateway.ops.drain import DrainState
from gateway.ops.reload import ConfigReloader
from gateway.signals.graph import GraphInventory

type Status = Literal["pass", "warn", "fail"]
SEVERITY: dict[Status, int] = {"pass": 0, "warn": 1, "fail": 2}
WITHOUT_AGE = frozenset({"config", "deviceInventory", "sharedState", "draining"})


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: Status
    detail: str
    age_seconds: float | None = None  # how old the data behind it is

    def as_json(self) -> dict[str, Any]:
        age = None if self.age_seconds is None else round(self.age_seconds, 1)
        return {"name": self.name, "status": self.status, "detail": self.detail, "ageSeconds": age}


def overall(checks: list[Check]) -> Status:
    return max((c.status for c in checks), key=SEVERITY.__getitem__, default="pass")


class GatewayHealth:
    def __init__(self, service: AccessService, issuers: TrustedIssuers, reloader: ConfigReloader | None = None, *,
                 graph: GraphInventory | None = None, timer: Callable[[], float] = time.monotonic,
                 clock: Callable[[], datetime] = utc_now, drain: DrainState | None = None) -> None:
        self.service, self.issuers, self.reloader, self.graph = service, issuers, reloader, graph
        self.drain = drain or DrainState()
        self._timer, self._clock = timer, clock
        self._started = clock()

    def checks(self) -> list[Check]:
        """Cheap enough for a load balancer polling every second (a few SQLite reads)."""
        checks = [self._config(), *self._keys(), *self._shared_state(), *self._devices()]
        if self.drain.draining:
            checks.append(Check("draining", "fail", "stopping (SIGTERM): finishing the requests in flight"))
        return checks

    def _shared_state(self) -> list[Check]:
        feed_up = self.service.shared_feed_up
        if feed_up is None:
            return []
        if feed_up:
            return [Check("sharedState", "pass", "subscribed to the Redis change feed")]
        return [Check("sharedState", "fail", "not subscribed to the Redis change feed: changes and sign-outs made "
                      "elsewhere may be missed, so device lookups go to Redis (cached copies serve only up to "
                      "maxStalenessSeconds) and no session is cached")]

    def signal_ages(self) -> list[tuple[str, float | None]]:
        """Seconds since each signal source last delivered (for the metric); sources read in place
        (the SQLite inventory) have no age and are left out."""
        return [(c.name, c.age_seconds) for c in self.checks() if c.name not in WITHOUT_AGE]

    def _config(self) -> Check:
        reloader = self.reloader
        if reloader is None:
            return Check("config", "pass", "loaded at start")
        age = (self._clock() - reloader.loaded_at).total_seconds()
        failed = reloader.last_failed
        if failed is not None:
            return Check("config", "warn", f"the last reload ({failed.trigger}, {failed.at.isoformat()}) was "
                         f"rejected; the previous rules stay in force: {'; '.join(failed.problems)}", age)
        return Check("config", "pass", f"{len(self.service.config.policies)} policies in force", age)

    def _keys(self) -> list[Check]:
        """The issuers in force (a reload may add or remove one): ``jwks`` alone, or one per issuer."""
        entries = self.issuers.entries
        if len(entries) == 1 and self.service.config.gateway_file.identity.issuer is not None:
            return [self._jwks("jwks", entries[0])]
        return [self._jwks(f"jwks:{entry.name}", entry) for entry in entries]

    def _jwks(self, name: str, entry: TrustedIssuer) -> Check:
        fetched = entry.keys.fetched_at
        if fetched is None:
            return Check(name, "fail", f"the signing keys of {entry.settings.issuer} were never fetched: its tokens "
                         "are refused (503)")
        age = self._timer() - fetched
        if entry.keys.refresh_failing:
            return Check(name, "warn", f"refreshing the signing keys of {entry.settings.issuer} fails; the keys "
                         f"fetched {age:.0f} s ago stay in use", age)
        return Check(name, "pass", f"signing keys of {entry.settings.issuer} fetched", age)

    def _devices(self) -> list[Check]:
        checks = []
        store = self.service.store
        if store is not None:
            try:
                count = store.count()
            except (sqlite3.Error, SignalUnavailable) as error:
                checks.append(Check("deviceInventory", "fail", f"the device inventory cannot be read: {error}"))
            else:
                checks.append(Check("deviceInventory", "pass", f"{count} devices"))
            checks += self._partners()
        else:
            checks.append(Check("deviceInventory", "pass", f"{self.service.inventory.name} inventory (read at start)"))
        graph_settings = self.service.config.gateway_file.device_signals.graph
        if self.graph is not None and graph_settings is not None:
            synced = self.graph.synced_at
            limit = 2 * graph_settings.sync_interval_seconds
            if synced is None:
                late = (self._clock() - self._started).total_seconds() > limit
                checks.append(Check("graph", "fail" if late else "warn",
                                    "no full sync from Microsoft Graph has succeeded since start"))
            else:
                age = (self._clock() - synced).total_seconds()
                late = age > limit
                checks.append(Check("graph", "fail" if late else "pass",
                                    f"last full sync {age:.0f} s ago" + (" (over twice the sync interval)"
                                                                          if late else ""), age))
        return checks

    def _partners(self) -> list[Check]:
        assert self.service.store is not None  # only called with a store
        partners = self.service.config.gateway_file.mtd_partners
        if not partners:
            return []
        try:
            contacts = self.service.store.partner_contacts()
        except (sqlite3.Error, SignalUnavailable) as error:
            return [Check(f"mtd:{name}", "fail", f"cannot read partner contacts: {error}") for name in partners]
        checks = []
        now = self._clock()
        for name, settings in partners.items():
            contact = contacts.get(name)
            if contact is None:
                checks.append(Check(f"mtd:{name}", "warn", "never heard from: its verdicts are ignored"))
                continue
            age = (now - contact).total_seconds()
            if age > settings.unresponsive_after_seconds:
                checks.append(Check(f"mtd:{name}", "warn", f"unresponsive for {age:.0f} s: its verdicts are "
                                    "ignored", age))
            else:
                checks.append(Check(f"mtd:{name}", "pass", f"heard from {age:.0f} s ago", age))
        return checks
