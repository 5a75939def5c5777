"""App protection registrations in Redis, for gateways on several hosts: ``AppRegistrationStore``'s
interface and semantics. Each write is one Lua script, so a sync is applied whole and announces
the users it changed on ``<p>app-registrations`` in the same atomic step.

Keys: ``<p>app-registration:<id>`` (the registration in Graph's fields, JSON),
``<p>app-registration-ids`` (every id), ``<p>app-user:<object id or UPN>`` (the ids naming that user).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from datetime import datetime

import redis

from gateway.errors import SignalUnavailable
from gateway.policy.model import AppRegistration
from gateway.signals.app_protection import (
    REGISTRATIONS_MAX,
    AppRegistrationStore,
    names,
    registration_from_json,
    registration_json,
)
from gateway.state.redis_devices import texts
from gateway.state.redis_keys import Keys, unavailable

# the user keys of a stored record (nil or unreadable: none), taken out of or put into their sets
USERS_LUA = """
local function users(record)
  if not record then return {} end
  local ok, fields = pcall(cjson.decode, record)
  if not ok or type(fields) ~= 'table' then return {} end
  local found = {}
  for _, key in ipairs({'userId', 'userPrincipalName'}) do
    if type(fields[key]) == 'string' then table.insert(found, fields[key]) end
  end
  return found
end
local changed, seen = {}, {}
local function note(list)
  for _, user in ipairs(list) do
    if not seen[user] then seen[user] = true; table.insert(changed, user) end
  end
end
local function drop(p, id)
  local old = redis.call('GET', p .. 'app-registration:' .. id)
  for _, user in ipairs(users(old)) do redis.call('SREM', p .. 'app-user:' .. user, id) end
  note(users(old))
  redis.call('DEL', p .. 'app-registration:' .. id)
  redis.call('SREM', p .. 'app-registration-ids', id)
  return old
end
local function publish(p)
  if #changed > 0 then redis.call('PUBLISH', p .. 'app-registrations', cjson.encode(changed)) end
end
"""
# ARGV: prefix, prune ('1' or '0'), then id and record (JSON) pairs
REPLACE_LUA = USERS_LUA + """
local p, prune = ARGV[1], ARGV[2] == '1'
local given = {}
for i = 3, #ARGV, 2 do given[ARGV[i]] = true end
if prune and #ARGV > 2 then
  for _, id in ipairs(redis.call('SMEMBERS', p .. 'app-registration-ids')) do
    if not given[id] then drop(p, id) end
  end
end
for i = 3, #ARGV, 2 do
  local id, record = ARGV[i], ARGV[i + 1]
  local old = redis.call('GET', p .. 'app-registration:' .. id)
  if old ~= record then
    drop(p, id)
    redis.call('SET', p .. 'app-registration:' .. id, record)
    redis.call('SADD', p .. 'app-registration-ids', id)
    for _, user in ipairs(users(record)) do redis.call('SADD', p .. 'app-user:' .. user, id) end
    note(users(record))
  end
end
publish(p)
return 1
"""
# ARGV: prefix, then ids; returns the ids that were there
REMOVE_LUA = USERS_LUA + """
local p, removed = ARGV[1], {}
for i = 2, #ARGV do
  if drop(p, ARGV[i]) then table.insert(removed, ARGV[i]) end
end
publish(p)
return removed
"""


class RedisAppRegistrations(AppRegistrationStore):
    def __init__(self, client: redis.Redis, keys: Keys, location: str) -> None:
        self._client, self._keys, self.location = client, keys, location
        self._replace = client.register_script(REPLACE_LUA)
        self._remove = client.register_script(REMOVE_LUA)

    def _key(self, registration_id: str) -> str:
        return f"{self._keys.prefix}app-registration:{registration_id}"

    def registrations_for(self, user_keys: Iterable[str], app_identifiers: Iterable[str]) -> list[AppRegistration]:
        apps, users = set(app_identifiers), set(user_keys)
        with unavailable(self.location):
            ids: set[str] = set()
            for user in sorted(users):
                ids |= set(texts(self._client.smembers(self._keys.prefix + "app-user:" + user)))
            records = _texts_or_none(self._client.mget([self._key(i) for i in sorted(ids)])) if ids else []
        found = [self._registration(i, r) for i, r in zip(sorted(ids), records, strict=True) if r is not None]
        return [r for r in found if r.app_identifier in apps and names(r, users)][:REGISTRATIONS_MAX]

    def _registration(self, registration_id: str, record: str) -> AppRegistration:
        try:
            return registration_from_json(record)
        except ValueError as error:
            raise SignalUnavailable(f"app registrations {self.location}: {registration_id} is unreadable") from error

    def replace_all(self, registrations: Iterable[AppRegistration], *, now: datetime, prune: bool = False) -> int:
        given = {r.registration_id: r for r in registrations}
        arguments: list[str] = [self._keys.prefix, "1" if prune else "0"]
        for registration_id, registration in sorted(given.items()):
            arguments += [registration_id, json.dumps(registration_json(registration), sort_keys=True)]
        with unavailable(self.location):
            self._replace(args=arguments)
        return len(given)

    def remove(self, registration_ids: Iterable[str], *, now: datetime) -> set[str]:
        with unavailable(self.location):
            removed = self._remove(args=[self._keys.prefix, *sorted({i.lower() for i in registration_ids})])
        return set(removed)

    def registrations(self) -> Iterator[AppRegistration]:
        with unavailable(self.location):
            ids = sorted(texts(self._client.smembers(f"{self._keys.prefix}app-registration-ids")))
            records = _texts_or_none(self._client.mget([self._key(i) for i in ids])) if ids else []
        return iter([self._registration(i, r) for i, r in zip(ids, records, strict=True) if r is not None])

    def count(self) -> int:
        with unavailable(self.location):
            return int(self._client.scard(f"{self._keys.prefix}app-registration-ids"))

    def close(self) -> None:
        pass  # the connection is RedisState's


def _texts_or_none(replies: Iterable[bytes | str | None]) -> list[str | None]:
    return [None if reply is None else reply if isinstance(reply, str) else reply.decode() for reply in replies]
