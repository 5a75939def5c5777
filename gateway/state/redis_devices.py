"""The device inventory in Redis: ``DeviceStore``'s interface and semantics, for gateways on
several hosts. Every write announces the devices it changed on ``<p>devices`` in the same atomic
step (a Lua script), so every process drops exactly those devices from its caches.
Keys: see ``gateway.state.redis_state``.

A device certificate may name its device by ``intuneDeviceId`` or ``serialNumber``: the set
``<p>device-key:<key>:<value>`` holds the ids of the devices whose record has that value. Every
script that writes or deletes a record takes the old record's entries out and puts the new one's
in, in the same atomic step. ``device_ids_for`` still checks each record it finds against the
value, so an entry left behind by a gateway of an older version (which rewrites records without
touching the sets) finds nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

import redis
from pydantic import ValidationError

from gateway.errors import SignalUnavailable
from gateway.http.strict_json import loads as strict_json
from gateway.policy.model import DeviceKey, DeviceThreatLevel, ManagedDevice
from gateway.signals.devices import MATCHES_MAX, DeviceRecord, normalised
from gateway.signals.store import DeviceStore, micros, with_threats
from gateway.state.redis_keys import Keys, unavailable

CHUNK = 1000  # devices per script call or MULTI in a bulk write
PUBLISH_IDS_MAX = 1000  # a write changing more devices announces ["*"]
THREAT_FIELDS = {"threat_level", "threat_source", "threat_reported_date_time"}

PUBLISH_LUA = """
local function publish(channel, changed, limit)
  if #changed > limit then redis.call('PUBLISH', channel, '["*"]')
  elseif #changed > 0 then redis.call('PUBLISH', channel, cjson.encode(changed)) end
end
"""
# The device-key sets' entries of a record (JSON; nil or unreadable: none): ``command`` is SADD for
# a record written, SREM for one replaced or deleted.
INDEX_LUA = """
local function index(p, id, record, command)
  if not record then return end
  local ok, fields = pcall(cjson.decode, record)
  if not ok or type(fields) ~= 'table' then return end
  for _, key in ipairs({'intuneDeviceId', 'serialNumber'}) do
    if type(fields[key]) == 'string' then redis.call(command, p .. 'device-key:' .. key .. ':' .. fields[key], id) end
  end
end
"""
# ARGV: prefix, clear partner ('' = none), publish limit, a JSON list of devices, each [id, partner,
# mode, verdict, verdict time in µs] (one argument: far cheaper to send than five per device), then
# each device's record (JSON) as an argument of its own, in the same order (not inside the list,
# where every quote would be escaped and decoded again). Modes mirror SqliteDeviceStore._upsert: none
# (no level: the clear partner's verdict goes), always, newer (seed with a time: not over a newer
# verdict), absent (seed without a time: never over any verdict).
UPSERT_LUA = PUBLISH_LUA + INDEX_LUA + """
local p, clear, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local changed, seen = {}, {}
for i, d in ipairs(cjson.decode(ARGV[4])) do
  local id, partner, mode, verdict, at, record = d[1], d[2], d[3], d[4], d[5], ARGV[4 + i]
  local threats = p .. 'threats:' .. id
  index(p, id, redis.call('GET', p .. 'device:' .. id), 'SREM')
  redis.call('SET', p .. 'device:' .. id, record)
  index(p, id, record, 'SADD')
  redis.call('SADD', p .. 'device-ids', id)
  local write = mode == 'always'
  if mode == 'absent' then
    write = redis.call('HEXISTS', threats, partner) == 0
  elseif mode == 'newer' then
    local old = redis.call('ZSCORE', p .. 'reports:' .. partner, id)
    write = (not old) or tonumber(at) >= tonumber(old)
  elseif mode == 'none' and clear ~= '' then
    redis.call('HDEL', threats, clear)
    redis.call('ZREM', p .. 'reports:' .. clear, id)
  end
  if write then
    redis.call('HSET', threats, partner, verdict)
    redis.call('ZADD', p .. 'reports:' .. partner, at, id)
    redis.call('SADD', p .. 'vendors', partner)
  end
  if not seen[id] then seen[id] = true; changed[#changed + 1] = id end
end
publish(p .. 'devices', changed, limit)
return #changed
"""
# A partner's last contact only moves forward (UTC ISO times sort as text).
CONTACT_LUA = """
local function contact(p, partner, now)
  local old = redis.call('HGET', p .. 'partners', partner)
  if (not old) or old < now then redis.call('HSET', p .. 'partners', partner, now) end
  redis.call('SADD', p .. 'vendors', partner)
end
"""
# ARGV: prefix, partner, now (ISO), now (µs), publish limit, then per verdict: id, verdict ('' clears).
# A verdict older than the partner's newest verdict or clear of that device (``verdict-times:<partner>``,
# clears included, or the current verdict's score in ``reports:<partner>``) changes nothing.
# Returns the changed ids and the positions of the unknown ones.
APPLY_LUA = PUBLISH_LUA + CONTACT_LUA + """
local p, partner, now, at, limit = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local times = p .. 'verdict-times:' .. partner
local changed, seen, unknown = {}, {}, {}
for i = 6, #ARGV, 2 do
  local id, verdict = ARGV[i], ARGV[i+1]
  if redis.call('SISMEMBER', p .. 'device-ids', id) == 0 then
    unknown[#unknown + 1] = (i - 6) / 2
  else
    local newest = tonumber(redis.call('HGET', times, id) or '-1')
    local current = redis.call('ZSCORE', p .. 'reports:' .. partner, id)
    if current and tonumber(current) > newest then newest = tonumber(current) end
    if tonumber(at) >= newest then
      if verdict == '' then
        redis.call('HDEL', p .. 'threats:' .. id, partner)
        redis.call('ZREM', p .. 'reports:' .. partner, id)
      else
        redis.call('HSET', p .. 'threats:' .. id, partner, verdict)
        redis.call('ZADD', p .. 'reports:' .. partner, at, id)
      end
      redis.call('HSET', times, id, at)
      if not seen[id] then seen[id] = true; changed[#changed + 1] = id end
    end
  end
end
contact(p, partner, now)
publish(p .. 'devices', changed, limit)
return {changed, unknown}
"""
# ARGV: prefix, publish limit, then the ids to retire. Each goes with every partner's verdict, report
# score and verdict time. Returns the ids of which anything was there (a record, or verdicts alone).
REMOVE_LUA = PUBLISH_LUA + INDEX_LUA + """
local p, limit = ARGV[1], tonumber(ARGV[2])
local partners, removed = redis.call('SMEMBERS', p .. 'vendors'), {}
for i = 3, #ARGV do
  local id = ARGV[i]
  index(p, id, redis.call('GET', p .. 'device:' .. id), 'SREM')
  local gone = redis.call('SREM', p .. 'device-ids', id)
  gone = gone + redis.call('DEL', p .. 'device:' .. id, p .. 'threats:' .. id)
  for _, partner in ipairs(partners) do
    gone = gone + redis.call('ZREM', p .. 'reports:' .. partner, id)
    gone = gone + redis.call('HDEL', p .. 'verdict-times:' .. partner, id)
  end
  if gone > 0 then removed[#removed + 1] = id end
end
publish(p .. 'devices', removed, limit)
return removed
"""
# ARGV: prefix, partner, publish limit, then the ids a full sync no longer lists: each goes with
# ``partner``'s verdict on it (other partners' stay for when it returns).
PRUNE_LUA = PUBLISH_LUA + INDEX_LUA + """
local p, partner, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local pruned = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  index(p, id, redis.call('GET', p .. 'device:' .. id), 'SREM')
  redis.call('DEL', p .. 'device:' .. id)
  redis.call('HDEL', p .. 'threats:' .. id, partner)
  redis.call('ZREM', p .. 'reports:' .. partner, id)
  redis.call('SREM', p .. 'device-ids', id)
  pruned[#pruned + 1] = id
end
publish(p .. 'devices', pruned, limit)
"""
# ARGV: prefix, key, value (normalised), limit: the ids in the key's set whose record has that value
# (an entry an older gateway left behind does not), at most ``limit``.
DEVICES_BY_KEY_LUA = """
local p, key, value, limit = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local found = {}
for _, id in ipairs(redis.call('SMEMBERS', p .. 'device-key:' .. key .. ':' .. value)) do
  local record = redis.call('GET', p .. 'device:' .. id)
  local ok, fields = pcall(cjson.decode, record or '')
  if ok and type(fields) == 'table' and fields[key] == value then
    found[#found + 1] = id
    if #found >= limit then break end
  end
end
return found
"""
PARTNER_CONTACT_LUA = CONTACT_LUA + "contact(ARGV[1], ARGV[2], ARGV[3])\n"
# Per partner: its last contact and its newest verdict (one snapshot).
PARTNERS_LUA = """
local p, out = ARGV[1], {}
for _, partner in ipairs(redis.call('SMEMBERS', p .. 'vendors')) do
  local newest, verdict = redis.call('ZRANGE', p .. 'reports:' .. partner, -1, -1), ''
  if newest[1] then verdict = redis.call('HGET', p .. 'threats:' .. newest[1], partner) or '' end
  out[#out + 1] = partner
  out[#out + 1] = redis.call('HGET', p .. 'partners', partner) or ''
  out[#out + 1] = verdict
end
return out
"""


class RedisDeviceStore(DeviceStore):
    """``DeviceStore`` over Redis. Differences from ``SqliteDeviceStore``: a bulk write is atomic
    per ``CHUNK`` devices, not as a whole, and a device another writer adds while a full sync prunes
    may be pruned with the devices it missed."""

    def __init__(self, client: redis.Redis, keys: Keys, location: str) -> None:
        self._client, self._keys = client, keys
        self.location = location
        self._upsert_script = client.register_script(UPSERT_LUA)
        self._apply_script = client.register_script(APPLY_LUA)
        self._partners_script = client.register_script(PARTNERS_LUA)
        self._contact_script = client.register_script(PARTNER_CONTACT_LUA)
        self._remove_script = client.register_script(REMOVE_LUA)
        self._prune_script = client.register_script(PRUNE_LUA)
        self._by_key_script = client.register_script(DEVICES_BY_KEY_LUA)

    def close(self) -> None:
        self._client.close()

    def managed_device(self, device_id: str, ignored_partners: frozenset[str] = frozenset()) -> ManagedDevice | None:
        key = device_id.lower()
        with unavailable(self.location), self._client.pipeline(transaction=True) as pipe:
            pipe.get(self._keys.device(key))
            pipe.hgetall(self._keys.threats(key))
            record, threats = pipe.execute()
        if record is None:
            return None
        try:
            strict_json(record)  # one reading, as of all shared state: pydantic keeps a member named twice
            device = DeviceRecord.model_validate_json(record).to_managed_device()
            verdicts = [_verdict(partner, text) for partner, text in threats.items() if partner not in ignored_partners]
        except (ValidationError, ValueError, KeyError, TypeError) as error:
            raise SignalUnavailable(f"shared state {self.location}: device {key} is unreadable") from error
        return with_threats(device, verdicts)

    def device_ids_for(self, key: DeviceKey, value: str) -> list[str]:
        value = normalised(key, value)
        if key is DeviceKey.azure_ad_device_id:
            with unavailable(self.location):
                return [value] if self._client.exists(self._keys.device(value)) else []
        with unavailable(self.location):
            return sorted(texts(self._by_key_script(args=[self._keys.prefix, key.value, value, MATCHES_MAX])))

    def replace_all(self, records: Iterable[DeviceRecord], *, now: datetime, prune_partner: str | None = None,
                    seed: bool = False) -> int:
        rows = list(records)
        for start in range(0, len(rows), CHUNK):
            self._write(rows[start:start + CHUNK], now, clear_partner=prune_partner, seed=seed)
        if prune_partner is not None and rows:
            self._prune({r.azure_ad_device_id.lower() for r in rows}, prune_partner)
        return len(rows)

    def upsert(self, record: DeviceRecord, *, now: datetime, clear_partner: str | None = None) -> None:
        self._write([record], now, clear_partner=clear_partner, seed=False)

    def remove(self, device_ids: Iterable[str], *, now: datetime) -> set[str]:
        """In one atomic step that announces the removed devices."""
        with unavailable(self.location):
            removed = self._remove_script(args=[self._keys.prefix, PUBLISH_IDS_MAX,
                                                *sorted({d.lower() for d in device_ids})])
        return set(removed)

    def apply_verdicts(self, partner: str, verdicts: Iterable[tuple[str, DeviceThreatLevel | None]], *,
                       now: datetime) -> tuple[set[str], list[str]]:
        given = list(verdicts)
        arguments: list[str | int] = [self._keys.prefix, partner, now.isoformat(), micros(now), PUBLISH_IDS_MAX]
        for device_id, level in given:
            arguments += [device_id.lower(),
                          "" if level is None else json.dumps({"level": level.value, "reportedAt": now.isoformat()})]
        with unavailable(self.location):
            changed, unknown = self._apply_script(args=arguments)
        return set(changed), [given[int(index)][0] for index in unknown]

    def partner_contact(self, partner: str, *, now: datetime) -> None:
        with unavailable(self.location):
            self._contact_script(args=[self._keys.prefix, partner, now.isoformat()])

    def partner_contacts(self) -> dict[str, datetime]:
        """The later of a partner's last contact and its newest current verdict, in one snapshot."""
        with unavailable(self.location):
            flat = self._partners_script(args=[self._keys.prefix])
        contacts = {}
        for partner, contact, verdict in zip(flat[::3], flat[1::3], flat[2::3], strict=True):
            times = [datetime.fromisoformat(contact)] if contact else []
            if verdict:
                times.append(datetime.fromisoformat(strict_json(verdict)["reportedAt"]))
            if times:
                contacts[partner] = max(times)
        return contacts

    def records(self) -> Iterator[dict[str, Any]]:
        with unavailable(self.location):
            ids = sorted(texts(self._client.smembers(self._keys.device_ids)))
            for start in range(0, len(ids), CHUNK):
                values = self._client.mget([self._keys.device(i) for i in ids[start:start + CHUNK]])
                yield from (strict_json(value) for value in values if value is not None)

    def count(self) -> int:
        with unavailable(self.location):
            return int(self._client.scard(self._keys.device_ids))

    def _write(self, rows: list[DeviceRecord], now: datetime, *, clear_partner: str | None, seed: bool) -> None:
        devices = json.dumps([_device_arguments(r, now, clear_partner=clear_partner, seed=seed) for r in rows])
        records = [r.model_dump_json(by_alias=True, exclude_none=True, exclude=THREAT_FIELDS) for r in rows]
        with unavailable(self.location):
            self._upsert_script(args=[self._keys.prefix, clear_partner or "", PUBLISH_IDS_MAX, devices, *records])

    def _prune(self, keep: set[str], partner: str) -> None:
        with unavailable(self.location):
            gone = sorted(set(texts(self._client.smembers(self._keys.device_ids))) - keep)
            for start in range(0, len(gone), CHUNK):
                self._prune_script(args=[self._keys.prefix, partner, PUBLISH_IDS_MAX, *gone[start:start + CHUNK]])


def texts(replies: Iterable[bytes | str]) -> list[str]:
    """Replies of a client made with ``decode_responses=True`` (``RedisState``'s): text, though
    redis-py's types allow bytes."""
    return [reply if isinstance(reply, str) else reply.decode() for reply in replies]


def _device_arguments(record: DeviceRecord, now: datetime, *, clear_partner: str | None, seed: bool) -> list[str]:
    """Times go as strings: Lua would print a number of microseconds with 14 digits only."""
    head = [record.azure_ad_device_id.lower(), record.threat_source or clear_partner or "inventory"]
    if record.threat_level is None:
        return [*head, "none", "", "0"]
    reported = record.threat_reported_date_time or now
    mode = "always" if not seed else "newer" if record.threat_reported_date_time else "absent"
    verdict = json.dumps({"level": record.threat_level.value, "reportedAt": reported.isoformat()})
    return [*head, mode, verdict, str(micros(reported))]


def _verdict(partner: str, text: str) -> tuple[str, str, str]:
    data = strict_json(text)
    level, reported = DeviceThreatLevel(data["level"]), data["reportedAt"]
    datetime.fromisoformat(reported)  # readable, or the device is unreadable
    return partner, level.value, reported
