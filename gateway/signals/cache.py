"""A bounded cache in front of a device source.

- Hits are served for ``ttl`` seconds; misses (unknown devices), and devices without a compliance
  verdict yet (``complianceState: unknown``), for ``miss_ttl``: their source may learn the verdict
  any moment (the Graph connector asks again on a schedule of its own). Both caches are bounded,
  so a flood of random device ids cannot grow memory.
- Concurrent lookups of one device share one call to the source.
- When the source fails, the last good answer is served while it is younger than
  ``max_staleness`` (logged as degraded); after that ``SignalUnavailable`` propagates and the
  request is blocked. For a second after a failure the source is not asked at all, so that a
  source that times out does not make every request wait for its timeout. The degraded answers
  are logged as one warning every ``STALE_WARNING_SECONDS`` with their count (a line per request
  was 800 lines a second under load), and once more when the source answers again.
- Failing includes hanging and answering garbage: a lookup waits at most ``lookup_timeout``
  seconds, and an answer that is not a well-formed ``ManagedDevice`` for the id asked (wrong
  types, naive times, another device's record) counts as the source being unavailable. Policy
  never sees such a record.
- ``invalidate`` drops devices at once: a risk raise or compliance loss is seen by the very next
  request.
- ``device_ids_for`` (which devices a certificate's ``intuneDeviceId`` or ``serialNumber`` names)
  is not cached: it is asked once per TLS connection. It is bounded in time like a lookup, and a
  source that cannot answer raises (no copy to fall back on).
- A shared source (Redis) tells every process what changed over a feed. While that feed is down
  (``feed_lost``) nothing is answered from the fresh cache, since a change could be missed: each
  lookup asks the source, and the staleness rule above applies when it cannot answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import types
import typing
from collections.abc import Callable, Iterable
from datetime import datetime
from functools import cache

from cachetools import LRUCache, TLRUCache, TTLCache

from gateway.counted_log import REPEAT_LINE_SECONDS, CountedLog
from gateway.errors import SignalUnavailable
from gateway.policy.model import ComplianceState, DeviceKey, ManagedDevice
from gateway.signals.devices import DeviceInventory

logger = logging.getLogger(__name__)

RETRY_AFTER = 1.0  # seconds a failed source is not asked again; answers come from copies meanwhile
# A lookup taking longer counts as the source being down. Above the Graph connector's own wait for
# a device it must look up (``graph.MISS_LOOKUP_SECONDS``), which answers "unknown" by then.
LOOKUP_TIMEOUT_SECONDS = 5.0
STALE_WARNING_SECONDS = REPEAT_LINE_SECONDS  # at most one "answered from a copy" warning per source this often
STALE_WARNING = ("device source %s unavailable (%s); lookups answered from last good copies up to %.0f s old: "
                 "%d since the last warning, %d in this outage")


class StaleAnswers:
    """The lookups answered from last good copies while a source is down, as counted warnings
    (``CountedLog``) that also say how old the copies were, and one line when the source is back."""

    def __init__(self, source: str, timer: Callable[[], float], interval: float = STALE_WARNING_SECONDS) -> None:
        self.source = source
        self._lines = CountedLog(logger, logging.WARNING, interval=interval, timer=timer)
        self._oldest = 0.0  # the oldest copy answered since the last warning

    def served(self, error: SignalUnavailable, age: float) -> None:
        self._oldest = max(self._oldest, age)
        if self._lines.log(STALE_WARNING, self.source, error, self._oldest):
            self._oldest = 0.0

    def recovered(self) -> None:
        """The source answered: say how the outage ended, once."""
        unreported, total = self._lines.reset(STALE_WARNING)
        self._oldest = 0.0
        if total:
            logger.info("device source %s answers again; %d lookups were answered from last good copies in the "
                        "outage (%d since the last warning)", self.source, total, unreported)


class CachedInventory:
    def __init__(self, source: DeviceInventory, *, ttl: float, miss_ttl: float, max_staleness: float,
                 max_entries: int, timer: Callable[[], float] = time.monotonic,
                 lookup_timeout: float = LOOKUP_TIMEOUT_SECONDS) -> None:
        self.source = source
        self.lookup_timeout = lookup_timeout
        self.name = source.name
        self._timer = timer
        self._max_staleness = max_staleness
        self._ttl, self._miss_ttl = ttl, miss_ttl
        self._fresh: TLRUCache[str, ManagedDevice] = TLRUCache(maxsize=max_entries, ttu=self._expiry, timer=timer)
        self._misses: TTLCache[str, bool] = TTLCache(maxsize=max(1024, max_entries // 10), ttl=miss_ttl, timer=timer)
        self._last_good: LRUCache[str, tuple[ManagedDevice | None, float]] = LRUCache(maxsize=max_entries)
        self._in_flight: dict[str, asyncio.Future[ManagedDevice | None]] = {}
        self._generation = 0  # bumped by every invalidation: an answer fetched across one is not kept
        self.trust_fresh = True  # False while a shared source's change feed is down
        self._retry_at = 0.0  # after a failure the source is left alone until then (timeouts would pile up)
        self.source_calls = 0
        self.hits = self.misses = 0  # answered from the cache, or not (for the hit-ratio metric)
        self.stale_answers = StaleAnswers(self.name, timer)

    async def managed_device(self, device_id: str) -> ManagedDevice | None:
        key = device_id.lower()
        hit = self._fresh.get(key)  # only devices are kept here; a miss is kept in _misses
        if hit is not None:
            self.hits += 1
            return hit
        if key in self._misses:
            self.hits += 1
            return None
        self.misses += 1
        pending = self._in_flight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[ManagedDevice | None] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        try:
            value = await self._fetch(key)
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # retrieved: waiters re-raise it, nobody else must log it
            raise
        else:
            future.set_result(value)
            return value
        finally:
            if self._in_flight.get(key) is future:  # an invalidation may have dropped it already
                del self._in_flight[key]

    async def device_ids_for(self, key: DeviceKey, value: str) -> list[str]:
        try:
            found = await asyncio.wait_for(self.source.device_ids_for(key, value), self.lookup_timeout)
        except TimeoutError:
            raise SignalUnavailable(f"{self.name} did not answer within {self.lookup_timeout:g} s") from None
        if not isinstance(found, list) or not all(isinstance(device_id, str) for device_id in found):
            raise SignalUnavailable(f"device source answered a {type(found).__name__}, not a list of device ids")
        return found

    def _expiry(self, _key: str, device: ManagedDevice, now: float) -> float:
        undecided = device.compliance_state is ComplianceState.unknown
        return now + (self._miss_ttl if undecided else self._ttl)

    def feed_lost(self) -> None:
        """The change feed is down: stop answering from the fresh cache (keep the last good copies)."""
        self.trust_fresh = False
        self._generation += 1
        self._in_flight.clear()
        self._fresh.clear()
        self._misses.clear()

    def feed_restored(self) -> None:
        """The feed is back; changes made meanwhile were not heard of: start from nothing."""
        self._retry_at = 0.0  # the source answers again
        self.invalidate_all()
        self.trust_fresh = True

    def invalidate_all(self) -> None:
        self._generation += 1
        self._in_flight.clear()  # a lookup arriving now must not join a read started before the change
        self._fresh.clear()
        self._misses.clear()
        self._last_good.clear()

    def invalidate(self, device_ids: Iterable[str]) -> None:
        self._generation += 1
        for key in device_ids:
            key = key.lower()
            self._in_flight.pop(key, None)  # a lookup arriving now must not join a read started before
            self._fresh.pop(key, None)
            self._misses.pop(key, None)
            self._last_good.pop(key, None)

    async def _fetch(self, key: str) -> ManagedDevice | None:
        generation = self._generation
        try:
            if self._timer() < self._retry_at:  # it just failed: do not make every request wait for it again
                raise SignalUnavailable(f"{self.name} failed less than {RETRY_AFTER:.0f} s ago")
            self.source_calls += 1
            try:
                value = checked_device(key, await self._ask_source(key))
            except SignalUnavailable:
                self._retry_at = self._timer() + RETRY_AFTER
                raise
            self.stale_answers.recovered()
        except SignalUnavailable as error:
            last = self._last_good.get(key)
            age = self._timer() - last[1] if last else None
            if last is not None and age is not None and age <= self._max_staleness:
                self.stale_answers.served(error, age)
                return last[0]
            raise
        if generation != self._generation:
            return value  # invalidated while it was being read: answer this request, keep nothing
        if not self.trust_fresh:
            self._last_good[key] = (value, self._timer())  # feed down: only the staleness copy
            return value
        if value is None:
            self._misses[key] = True
        else:
            self._fresh[key] = value
        self._last_good[key] = (value, self._timer())
        return value

    async def _ask_source(self, key: str) -> object:
        try:
            return await asyncio.wait_for(self.source.managed_device(key), self.lookup_timeout)
        except TimeoutError:
            raise SignalUnavailable(f"{self.name} did not answer within {self.lookup_timeout:g} s") from None


def checked_device(key: str, value: object) -> ManagedDevice | None:
    """The source's answer if it is None or a well-formed record of device ``key``; anything else
    raises SignalUnavailable (a source answering garbage is a source that cannot answer)."""
    if value is None:
        return None
    if not isinstance(value, ManagedDevice):
        raise SignalUnavailable(f"device source answered a {type(value).__name__}, not a device record")
    if not isinstance(value.device_id, str) or value.device_id.lower() != key:
        raise SignalUnavailable("device source answered the record of another device")
    for name, hint in _field_types().items():
        if not _conforms(getattr(value, name), hint):
            raise SignalUnavailable(f"device source answered a record whose {name} is not a {hint}")
    return value


@cache
def _field_types() -> dict[str, object]:
    hints = typing.get_type_hints(ManagedDevice)
    return {f.name: hints[f.name] for f in dataclasses.fields(ManagedDevice)}


def _conforms(value: object, hint: object) -> bool:
    """Enough of ``isinstance`` for ManagedDevice's field types: classes (an aware ``datetime``),
    ``X | None`` and ``tuple[X, ...]`` / ``tuple[X, Y]``."""
    if isinstance(hint, types.UnionType):
        return any(_conforms(value, member) for member in typing.get_args(hint))
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_conforms(item, args[0]) for item in value)
        return len(value) == len(args) and all(_conforms(item, a) for item, a in zip(value, args, strict=True))
    if hint is datetime:
        return isinstance(value, datetime) and value.tzinfo is not None
    if hint is bool:
        return isinstance(value, bool)
    return isinstance(hint, type) and isinstance(value, hint)
