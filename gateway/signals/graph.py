"""The Microsoft Graph connector: Intune's managed devices into the SQLite inventory.

- OAuth 2.0 client credentials (authlib) against ``{authority}/{tenantId}/oauth2/v2.0/token``,
  scope ``https://graph.microsoft.com/.default``; the secret comes from the environment.
- A full sync reads ``/deviceManagement/managedDevices`` page by page (``@odata.nextLink``) and
  replaces the inventory's records in one transaction (nothing half-synced). Devices Intune no
  longer lists are removed with Graph's verdict on them; other MTD partners' verdicts stay. An
  empty answer removes nothing.
- Each device's managedDevice ``id`` and ``serialNumber`` are stored as ``intuneDeviceId`` and
  ``serialNumber``: a device certificate may name the device by either. Intune lists two devices
  with one serial number (a reset device enrolled again, a virtual machine's placeholder) as it
  finds them; a lookup by that serial then finds both and is refused as ambiguous.
- A device the inventory does not know is looked up on its own
  (``$filter=azureADDeviceId eq '<id>'``), at most ``lookupsPerSecond``, so a flood of random
  device ids cannot hammer Graph; beyond the rate the device counts as unknown (not compliant).
  A stored device without a compliance verdict yet is looked up again on a backing-off schedule
  (``GraphInventory``), so a device first seen while Graph was broken recovers with Graph, until
  Graph has answered "unknown" for it a few times in a row (then the full sync keeps it current).
- With app protection configured, the full sync also reads Intune's app protection registrations
  (``/deviceAppManagement/managedAppRegistrations``, iOS and Android, with their applied policies)
  into the app registration store, in one transaction, pruning the ones Intune no longer lists
  (an empty answer prunes nothing). Permission: DeviceManagementApps.Read.All.
- ``429`` and ``503`` are retried after ``Retry-After`` (bounded); other failures raise
  ``SignalUnavailable`` and the cache's staleness rules apply. So does an answer in the wrong
  shape (not JSON, ``value`` not a list of objects, an ``@odata.nextLink`` outside the Graph
  URL, which would receive the connector's token); a single device with unreadable fields is
  skipped, and a lookup keeps only the device it asked for.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
from cachetools import LRUCache
from pydantic import ValidationError

from gateway.errors import SignalUnavailable
from gateway.http.strict_json import JsonRefused
from gateway.http.strict_json import loads as strict_json
from gateway.identity.oauth_client import OAuthError, strict_oauth_client
from gateway.policy.model import AppRegistration, ComplianceState, DeviceKey, ManagedDevice
from gateway.signals.app_protection import ANDROID, IOS, AppRegistrationRecord, AppRegistrationStore
from gateway.signals.devices import DeviceRecord
from gateway.signals.mtd import LEVELS
from gateway.signals.store import DeviceStore, StoreInventory

logger = logging.getLogger(__name__)


SELECT = ("id,azureADDeviceId,serialNumber,easDeviceId,deviceName,userPrincipalName,operatingSystem,osVersion,"
          "jailBroken,managedDeviceOwnerType,managementAgent,lastSyncDateTime,complianceState,"
          "complianceGracePeriodExpirationDateTime,partnerReportedThreatState,manufacturer,model")
MAX_RETRIES = 4
MAX_RETRY_AFTER_SECONDS = 30.0
MAX_PAGES = 10_000
MISS_LOOKUP_SECONDS = 3.0  # a request waits at most this for Graph to answer about an unknown device
RECHECK_FIRST_SECONDS = 15.0  # an undecided device (complianceState unknown) is asked about again after this,
RECHECK_MAX_SECONDS = 300.0  # then after twice as long each time, up to this (well below a full sync's 900 s)
RECHECKS_KEPT = 100_000  # undecided devices whose next recheck is remembered
# Graph answered "unknown" for a device this many times in a row: a lasting state (no compliance
# policy assigned to it), left to the full sync from then on
RECHECK_SETTLED_AFTER = 3
GRAPH_PARTNER = "graph"  # the partner slot of partnerReportedThreatState: Intune's last word from the MTD partner
DEVICE_ID = re.compile(r"^[0-9a-fA-F-]{1,64}$")


@dataclass(frozen=True, slots=True)
class GraphSettings:
    token_url: str
    graph_url: str
    client_id: str
    client_secret: str
    lookups_per_second: float
    timeout: float = 10.0


def device_record(item: Mapping[str, Any]) -> DeviceRecord | None:
    """Graph's managedDevice as an inventory record; None for one without an Entra device id."""
    if not item.get("azureADDeviceId") or item.get("azureADDeviceId") == "00000000-0000-0000-0000-000000000000":
        return None
    owner = str(item.get("managedDeviceOwnerType") or "").lower()
    threat = str(item.get("partnerReportedThreatState") or "").lower()
    fields = {
        "azureADDeviceId": item["azureADDeviceId"],
        "easDeviceId": item.get("easDeviceId") or None,
        "deviceName": item.get("deviceName"),
        "userPrincipalName": item.get("userPrincipalName") or None,
        "operatingSystem": item.get("operatingSystem"),
        "osVersion": item.get("osVersion"),
        "jailBroken": {"true": True, "false": False}.get(str(item.get("jailBroken", "")).lower()),
        "managedDeviceOwnerType": owner if owner in ("company", "personal") else None,
        "managementAgent": item.get("managementAgent"),
        "lastSyncDateTime": item.get("lastSyncDateTime"),
        "complianceState": item.get("complianceState") or "unknown",
        "complianceGracePeriodExpirationDateTime": item.get("complianceGracePeriodExpirationDateTime"),
        "manufacturer": item.get("manufacturer"),
        "model": item.get("model"),
        "intuneDeviceId": item.get("id") or None,  # the managedDevice's own id
        "serialNumber": _blank_as_none(item.get("serialNumber")),
    }
    if threat in LEVELS:
        fields["threatLevel"], fields["threatSource"] = LEVELS[threat].value, GRAPH_PARTNER
    return DeviceRecord.model_validate_json(json.dumps({k: v for k, v in fields.items() if v is not None}),
                                            strict=True)


APP_REGISTRATION_TYPES = frozenset({IOS, ANDROID})
APP_REGISTRATION_FIELDS = ("id", "@odata.type", "appIdentifier", "userId", "azureADDeviceId", "deviceTag",
                           "deviceName", "flaggedReasons", "lastSyncDateTime")
APPLIED_POLICY_FIELDS = ("@odata.type", "id", "displayName")


def app_registration(item: Mapping[str, Any]) -> AppRegistration:
    """Graph's managedAppRegistration (of the fields a registration keeps; Graph sends many more)."""
    fields = {name: item[name] for name in APP_REGISTRATION_FIELDS if item.get(name) is not None}
    policies = item.get("appliedPolicies") or []
    if isinstance(policies, list):
        fields["appliedPolicies"] = [{k: p[k] for k in APPLIED_POLICY_FIELDS if p.get(k) is not None}
                                     if isinstance(p, dict) else p for p in policies]
    else:
        fields["appliedPolicies"] = policies  # refused by validation
    if isinstance(fields.get("appIdentifier"), dict):
        fields["appIdentifier"] = {k: v for k, v in fields["appIdentifier"].items() if v is not None}
    return AppRegistrationRecord.model_validate_json(json.dumps(fields), strict=True).to_registration()


def _blank_as_none(value: object) -> object:
    """Graph answers "" for a serial number it does not know; a value that is no text is left for
    validation to refuse."""
    return (value.strip() or None) if isinstance(value, str) else value


class GraphClient:
    def __init__(self, settings: GraphSettings, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        self._client = strict_oauth_client(
            client_id=settings.client_id, client_secret=settings.client_secret,
            token_endpoint=settings.token_url, scope="https://graph.microsoft.com/.default",
            grant_type="client_credentials", timeout=settings.timeout, transport=transport,
        )
        self._token_lock = asyncio.Lock()

    async def close(self) -> None:
        await self._client.aclose()

    async def managed_devices(self, filter_: str | None = None) -> list[DeviceRecord]:
        """Every managed device (or those matching ``filter_``), across all pages."""
        records: list[DeviceRecord] = []
        params = {"$select": SELECT, **({"$filter": filter_} if filter_ else {})}
        async for item in self._items(f"{self.settings.graph_url}/deviceManagement/managedDevices", params):
            try:
                record = device_record(item)
            except ValidationError as error:
                logger.warning("Graph device %r skipped: %s", item.get("azureADDeviceId"), error)
                continue
            if record is not None:
                records.append(record)
        return records

    async def managed_app_registrations(self) -> list[AppRegistration]:
        """Every iOS and Android app protection registration, with its applied policies, across all
        pages; one with unreadable fields (or of another platform) is skipped."""
        registrations: list[AppRegistration] = []
        url = f"{self.settings.graph_url}/deviceAppManagement/managedAppRegistrations"
        async for item in self._items(url, {"$expand": "appliedPolicies"}):
            if item.get("@odata.type") not in APP_REGISTRATION_TYPES:
                continue
            try:
                registrations.append(app_registration(item))
            except ValidationError as error:
                logger.warning("Graph app registration %r skipped: %s", item.get("id"), error)
        return registrations

    async def _items(self, url: str, params: dict[str, str]) -> AsyncIterator[dict[str, Any]]:
        """The objects of every page, following ``@odata.nextLink`` (which carries the query)."""
        next_url: str | None = url
        query: dict[str, str] | None = params
        for _ in range(MAX_PAGES):
            if next_url is None:
                return
            page = await self._get(next_url, query)
            query = None
            items = page.get("value", [])
            if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
                raise SignalUnavailable("Graph answered a page whose value is not a list of objects")
            for item in items:
                yield item
            next_url = self._next_link(page.get("@odata.nextLink"))
        raise SignalUnavailable(f"Graph returned more than {MAX_PAGES} pages")

    def _next_link(self, link: object) -> str | None:
        """The next page, only under the configured Graph URL: the client sends its bearer token to
        whatever URL it is given, so a link elsewhere (a spoofed or broken answer) is not followed."""
        if link is None:
            return None
        if not isinstance(link, str) or not link.startswith(f"{self.settings.graph_url.rstrip('/')}/"):
            raise SignalUnavailable("Graph answered an @odata.nextLink outside the configured Graph URL")
        return link

    async def _get(self, url: str, params: dict[str, str] | None) -> dict[str, Any]:
        for attempt in range(MAX_RETRIES + 1):
            await self._ensure_token()
            try:
                response = await self._client.get(url, params=params)
            except httpx.HTTPError as error:
                raise SignalUnavailable(f"Graph unreachable: {type(error).__name__}") from error
            if response.status_code in (429, 503) and attempt < MAX_RETRIES:
                delay = _retry_after(response.headers.get("retry-after"))
                logger.warning("Graph answered %s; retrying in %.1f s", response.status_code, delay)
                await asyncio.sleep(delay)
                continue
            if response.status_code == 401 and attempt < MAX_RETRIES:
                self._client.token = None  # expired or revoked: fetch a new one once
                continue
            if response.status_code != 200:
                raise SignalUnavailable(f"Graph answered {response.status_code}")
            try:
                body = strict_json(response.content)
            except JsonRefused as error:
                raise SignalUnavailable(f"Graph's answer {error}") from error
            if not isinstance(body, dict):
                raise SignalUnavailable("Graph answered something other than a JSON object")
            return body
        raise SignalUnavailable("Graph kept throttling")

    async def _ensure_token(self) -> None:
        async with self._token_lock:
            token = self._client.token
            if token and not token.is_expired():
                return
            try:
                await self._client.fetch_token()
            except (httpx.HTTPError, OAuthError, ValueError, KeyError, TypeError) as error:
                raise SignalUnavailable(f"Graph token request failed: {type(error).__name__}") from error


def _retry_after(value: str | None) -> float:
    try:
        return min(max(float(value or 1), 0.0), MAX_RETRY_AFTER_SECONDS)
    except ValueError:
        return 1.0


class GraphInventory:
    """The SQLite inventory, filled by Graph: misses are looked up in Graph, rate-limited.

    A stored device without a compliance verdict (``complianceState: unknown``: what Intune says
    before it has evaluated a device, and what a broken answer leaves behind) is asked about again
    on a schedule of its own, when a request needs it: ``RECHECK_FIRST_SECONDS`` after it was seen
    undecided, then twice as long each time Graph still cannot say (or fails), up to
    ``RECHECK_MAX_SECONDS``; within the spare half of ``lookupsPerSecond``. Meanwhile the stored record
    answers (unknown is not compliant unless the tenant says so), never a failure. Without this it
    stayed blocked after Graph recovered, until the next full sync. But ``unknown`` is also what
    Intune says, for good, of a device no compliance policy is assigned to: once Graph has answered
    it ``RECHECK_SETTLED_AFTER`` times in a row (a failure starts the row again), the device is left
    to the full sync, like any decided one."""

    name = "graph"

    def __init__(self, store: DeviceStore, local: StoreInventory, client: GraphClient, *,
                 clock: Callable[[], datetime], timer: Callable[[], float] = time.monotonic,
                 apps: AppRegistrationStore | None = None) -> None:
        self.store, self.local, self.client = store, local, client
        self.apps = apps  # app protection registrations, synced with the devices
        self._clock, self._timer = clock, timer
        self._allowance = client.settings.lookups_per_second
        self._checked = timer()
        self.synced_at: datetime | None = None  # the last full sync that succeeded (readiness, metrics)
        # undecided device -> (when to ask Graph again, the wait after that, Graph's "unknown" answers
        # in a row); bounded: a device whose entry was dropped gets a new first wait
        self._rechecks: LRUCache[str, tuple[float, float, int]] = LRUCache(maxsize=RECHECKS_KEPT)

    async def managed_device(self, device_id: str) -> ManagedDevice | None:
        key = device_id.lower()
        found = await self.local.managed_device(key)
        if found is not None:
            return await self._recheck(key, found)
        if not DEVICE_ID.match(key) or not self._may_look_up() or not await self._look_up(key):
            return None
        fresh = await self.local.managed_device(key)
        if fresh is not None and fresh.compliance_state is ComplianceState.unknown:
            return self._schedule(key, fresh, RECHECK_FIRST_SECONDS, unknown_answers=1)
        return fresh

    async def device_ids_for(self, key: DeviceKey, value: str) -> list[str]:
        """From the store alone: Graph is not asked about a key the inventory does not list."""
        return await self.local.device_ids_for(key, value)

    async def _recheck(self, key: str, found: ManagedDevice) -> ManagedDevice | None:
        """A stored device, asked about again when it is undecided and its time has come."""
        if found.compliance_state is not ComplianceState.unknown:
            self._rechecks.pop(key, None)  # decided meanwhile (a sync, an import)
            return found
        due = self._rechecks.get(key)
        if due is None:
            return self._schedule(key, found, RECHECK_FIRST_SECONDS, unknown_answers=0)
        if self._timer() < due[0] or not DEVICE_ID.match(key) or not self._may_look_up(spare_only=True):
            return found  # not yet, settled, or over the lookup budget: the stored record answers
        try:
            stored = await self._look_up(key)
        except SignalUnavailable as error:
            logger.warning("Graph recheck of undecided device %s failed (%s); the stored record answers", key, error)
            stored = False
        fresh = await self.local.managed_device(key) if stored else found
        if fresh is None or fresh.compliance_state is not ComplianceState.unknown:
            self._rechecks.pop(key, None)
            return fresh
        return self._schedule(key, fresh, min(due[1] * 2, RECHECK_MAX_SECONDS),
                              unknown_answers=due[2] + 1 if stored else 0)

    def _schedule(self, key: str, device: ManagedDevice, wait: float, *, unknown_answers: int) -> ManagedDevice:
        """The next recheck of an undecided device; none once Graph has said "unknown" often enough
        in a row. DEBUG: with no compliance policy assigned, a tenant's every device is undecided."""
        if unknown_answers >= RECHECK_SETTLED_AFTER:
            self._rechecks[key] = (math.inf, wait, unknown_answers)
            logger.debug("device %s: Graph answered complianceState unknown %d times in a row (no compliance policy "
                         "assigned?); left to the full sync", key, unknown_answers)
            return device
        self._rechecks[key] = (self._timer() + wait, wait, unknown_answers)
        logger.debug("device %s has no compliance verdict in Graph yet (complianceState unknown); asking again in "
                     "%.0f s", key, wait)
        return device

    async def _look_up(self, key: str) -> bool:
        """Ask Graph about one device and store what it says; False when it did not answer in time
        or does not list the device. Raises SignalUnavailable."""
        try:
            records = await asyncio.wait_for(
                self.client.managed_devices(f"azureADDeviceId eq '{key}'"), MISS_LOOKUP_SECONDS)
        except TimeoutError:
            logger.warning("Graph lookup of %s took longer than %s s; the device counts as unknown",
                           key, MISS_LOOKUP_SECONDS)
            return False
        wanted = [r for r in records if r.azure_ad_device_id.lower() == key]
        if len(wanted) != len(records):
            logger.warning("Graph answered %d other devices to a lookup of %s; they are not stored",
                           len(records) - len(wanted), key)
        for record in wanted:
            await asyncio.to_thread(self.store.upsert, record, now=self._clock(), clear_partner=GRAPH_PARTNER)
        return bool(wanted)

    async def full_sync(self) -> int:
        records = await self.client.managed_devices()
        count = await asyncio.to_thread(self.store.replace_all, records, now=self._clock(), prune_partner=GRAPH_PARTNER)
        if self.apps is not None:
            await self.sync_app_registrations(self.apps)
        self.synced_at = self._clock()
        return count

    async def sync_app_registrations(self, apps: AppRegistrationStore) -> int:
        """Every registration Intune lists, in one transaction; the others go (none on an empty answer)."""
        registrations = await self.client.managed_app_registrations()
        return await asyncio.to_thread(apps.replace_all, registrations, now=self._clock(), prune=True)

    def _may_look_up(self, *, spare_only: bool = False) -> bool:
        """A token bucket of ``lookupsPerSecond``: misses beyond it are not looked up. Rechecks
        (``spare_only``) take a token only while the bucket is at least half full, so however many
        undecided devices are due, devices never seen before can still be looked up."""
        rate = self.client.settings.lookups_per_second
        capacity = max(1.0, rate)
        now = self._timer()
        self._allowance = min(capacity, self._allowance + (now - self._checked) * rate)
        self._checked = now
        if self._allowance < (max(1.0, capacity / 2) if spare_only else 1):
            return False
        self._allowance -= 1
        return True
