"""Shared state in Redis, for gateways on several hosts: the device inventory, browser sessions,
pending sign-ins and webhook nonces, plus the events that keep every process's caches honest.

Key layout (``gateway.state.redis_keys.Keys`` builds the names; ``<p>`` is the prefix, ``portcullis:``
by default; device ids are lower case)::

    <p>device:<id>          string  the device's Intune fields, JSON (as DeviceStore's ``record``)
    <p>threats:<id>         hash    partner -> {"level": ..., "reportedAt": ISO 8601}
    <p>device-ids           set     every device id
    <p>device-key:<key>:<v> set     ids of the devices whose intuneDeviceId or serialNumber is v (redis_devices)
    <p>reports:<partner>    zset    device id -> that partner's verdict time (µs): its newest verdict
    <p>vendors              set     every partner with a verdict or a contact (the key's first name)
    <p>partners             hash    partner -> last signed push or heartbeat, ISO 8601
    <p>session:<sha256>     string  a browser session (gateway.state.codec), EX its lifetime
    <p>pending:<sha256>     string  a pending sign-in, EX its lifetime, read once with GETDEL
    <p>nonce:<key>          string  a webhook nonce's claim token, NX EX its ttl

Channels: ``<p>devices`` carries a JSON list of the device ids a write changed (``["*"]``: every
device), published in the same atomic step (Lua script or MULTI) as the write; ``<p>revoked``
carries the SHA-256 of an ended session.

A Redis error or timeout is ``SignalUnavailable``: the caller answers 503. Connections time out
fast (connect 1 s, read 2 s) and a command is retried once, on a fresh connection, only when the
connection failed. Several hosts need one Redis primary, by URL (no Cluster, no Sentinel discovery): the
scripts touch keys they build themselves, which Redis Cluster does not allow.

A process caches sessions only while its ``RedisEvents`` subscription is up: a revocation then
reaches it within milliseconds. The subscription sends PING every 0.25 s; 0.8 s without an answer
(or a closed connection) counts as lost: the caches are dropped and every lookup goes to Redis
until it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import secrets
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import redis
import redis.asyncio
from cachetools import TLRUCache
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from gateway.events import ALL_DEVICES, AllDevicesChanged, AppRegistrationsChanged, DevicesChanged
from gateway.http.strict_json import loads as strict_json
from gateway.state.codec import decode_pending, decode_session, encode_pending, encode_session
from gateway.state.redis_apps import RedisAppRegistrations
from gateway.state.redis_devices import RedisDeviceStore
from gateway.state.redis_keys import CONNECT_TIMEOUT, EVERY_DEVICE, READ_TIMEOUT, Keys, redacted, unavailable
from gateway.state.session_records import BrowserSession, PendingLogin
from gateway.state.sessions import session_key

logger = logging.getLogger(__name__)

LOCAL_SESSIONS = 100_000
LOCAL_SESSION_SECONDS = 60.0
BACKOFF_FIRST, BACKOFF_MAX = 0.05, 1.0
PING_EVERY, SILENCE_LIMIT = 0.25, 0.8
KEY_HASH = re.compile(r"[0-9a-f]{64}")

type Callback = Callable[..., object]


def _until(_key: str, value: tuple[object, float], now: float) -> float:
    return now + value[1]


class RedisSessionStore:
    """``SessionStore`` in Redis, with a local cache of sessions in front that is used only while
    ``RedisEvents`` reports the revocation channel up (``subscription_up``/``subscription_down``)."""

    def __init__(self, client: redis.asyncio.Redis, keys: Keys, location: str, *, cache_size: int = LOCAL_SESSIONS,
                 cache_seconds: float = LOCAL_SESSION_SECONDS, timer: Callable[[], float] = time.monotonic) -> None:
        self._client, self._keys = client, keys
        self.location = location
        self._cache: TLRUCache[str, tuple[BrowserSession, float]] = TLRUCache(cache_size, _until, timer)
        self._cache_seconds = cache_seconds
        self._subscribed = False
        self._generation = 0  # bumped by every invalidation: a lookup that spans one is not cached
        self.hits = self.misses = 0

    @property
    def subscribed(self) -> bool:
        return self._subscribed

    def subscription_up(self) -> None:
        """Revocations arrive from now on; any missed before are covered by starting empty."""
        self.forget_all()
        self._subscribed = True

    def subscription_down(self) -> None:
        self._subscribed = False
        self.forget_all()

    def forget(self, key_hash: str) -> None:
        self._generation += 1
        self._cache.pop(key_hash, None)

    def forget_all(self) -> None:
        self._generation += 1
        self._cache.clear()

    async def put_pending(self, state: str, login: PendingLogin, ttl_seconds: int) -> None:
        with unavailable(self.location):
            await self._client.set(self._keys.pending(session_key(state)), encode_pending(login), ex=ttl_seconds)

    async def take_pending(self, state: str) -> PendingLogin | None:
        with unavailable(self.location):
            record = await self._client.getdel(self._keys.pending(session_key(state)))
        return decode_pending(record) if record is not None else None

    async def put_session(self, session_id: str, session: BrowserSession, ttl_seconds: int) -> None:
        key, generation = session_key(session_id), self._generation
        with unavailable(self.location):
            await self._client.set(self._keys.session(key), encode_session(session), ex=ttl_seconds)
        if self._subscribed and generation == self._generation:
            self._cache[key] = (session, min(self._cache_seconds, ttl_seconds))

    async def get_session(self, session_id: str) -> BrowserSession | None:
        key = session_key(session_id)
        if self._subscribed and (hit := self._cache.get(key)) is not None:
            self.hits += 1
            return hit[0]
        self.misses += 1
        generation = self._generation
        with unavailable(self.location):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.get(self._keys.session(key))  # queued (a pipeline's commands are sent by execute)
                pipe.pttl(self._keys.session(key))
                record, pttl = await pipe.execute()
        session = decode_session(record) if record is not None else None
        if session is not None and self._subscribed and generation == self._generation and pttl > 0:
            self._cache[key] = (session, min(self._cache_seconds, pttl / 1000))
        return session

    async def end_session(self, session_id: str) -> None:
        key = session_key(session_id)
        self.forget(key)
        with unavailable(self.location):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(self._keys.session(key))
                pipe.publish(self._keys.revoked_channel, key)
                await pipe.execute()


class RedisNonces:
    """``NonceStore`` in Redis. A claim stores a random token, so a claim whose answer was lost and
    is retried on a new connection still knows the key is its own."""

    def __init__(self, client: redis.asyncio.Redis, keys: Keys, location: str) -> None:
        self._client, self._keys = client, keys
        self.location = location

    async def claim(self, key: str, ttl_seconds: int) -> bool:
        token = secrets.token_hex(16)
        with unavailable(self.location):
            if await self._client.set(self._keys.nonce(key), token, nx=True, ex=ttl_seconds):
                return True
            return await self._client.get(self._keys.nonce(key)) == token

    async def release(self, key: str) -> None:
        with unavailable(self.location):
            await self._client.delete(self._keys.nonce(key))


class SubscriptionSilent(redis.ConnectionError):
    """The subscription's connection is open but Redis stopped answering pings."""


class RedisEvents:
    """The one subscriber of a process to ``<p>devices``, ``<p>app-registrations`` and
    ``<p>revoked``. ``run`` runs until cancelled, reconnecting with backoff; callbacks may be plain
    functions or coroutines and must not raise (an exception ends ``run``, after the session cache
    is switched off).

    ``on_connected()`` follows every (re)subscription: messages may have been missed, so the caller
    drops its caches. ``on_devices(event)`` (``DevicesChanged`` or ``AllDevicesChanged``),
    ``on_apps(event)`` (``AppRegistrationsChanged``), ``on_revoked(key_hash)``, ``on_lost()`` as
    soon as a subscription that was up is lost. The session store is kept in step here, before the
    callbacks run."""

    def __init__(self, client: redis.asyncio.Redis, keys: Keys, location: str, *,
                 sessions: RedisSessionStore | None = None, on_devices: Callback | None = None,
                 on_revoked: Callback | None = None, on_connected: Callback | None = None,
                 on_lost: Callback | None = None, on_apps: Callback | None = None) -> None:
        self._client, self._keys, self.location = client, keys, location
        self._sessions = sessions
        self._on_devices, self._on_revoked, self._on_apps = on_devices, on_revoked, on_apps
        self._on_connected, self._on_lost = on_connected, on_lost
        self.connected = False
        self._down_since: float | None = None

    async def run(self) -> None:
        delay = BACKOFF_FIRST
        try:
            while True:
                pubsub = self._client.pubsub()
                try:
                    await self._subscribe(pubsub)
                    await self._up()
                    delay = BACKOFF_FIRST
                    await self._listen(pubsub)
                except (redis.RedisError, OSError) as error:
                    await self._down(error)
                except Exception as error:  # a callback or redis-py failed: never go on trusting caches
                    logger.exception("shared state %s: the change feed failed; treated as lost", self.location)
                    await self._down(error)
                finally:
                    with contextlib.suppress(redis.RedisError, OSError):
                        await pubsub.aclose()
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
        finally:
            self.connected = False
            if self._sessions is not None:
                self._sessions.subscription_down()

    async def _subscribe(self, pubsub: redis.asyncio.client.PubSub) -> None:
        """Returns once Redis confirmed every channel: later publishes reach this process."""
        channels = (self._keys.devices_channel, self._keys.revoked_channel, self._keys.apps_channel)
        await pubsub.subscribe(*channels)
        loop = asyncio.get_running_loop()
        deadline, confirmed = loop.time() + READ_TIMEOUT, 0
        while confirmed < len(channels):
            if loop.time() > deadline:
                raise SubscriptionSilent("Redis did not confirm the subscription")
            message = await pubsub.get_message(timeout=0.1)
            confirmed += message is not None and message["type"] == "subscribe"

    async def _listen(self, pubsub: redis.asyncio.client.PubSub) -> None:
        """Silence counts from the oldest PING not yet answered, not from the last message: a busy
        event loop that sent no PING for a while is not a lost subscription."""
        loop = asyncio.get_running_loop()
        pinged = loop.time()
        unanswered: float | None = None  # when the oldest PING still without an answer was sent
        while True:
            message = await pubsub.get_message(timeout=0.1)
            now = loop.time()
            if message is not None:
                unanswered = None
                await self._dispatch(message)
            if unanswered is not None and now - unanswered > SILENCE_LIMIT:
                raise SubscriptionSilent(f"no answer to PING for {SILENCE_LIMIT} s")
            if now - pinged >= PING_EVERY:
                await pubsub.ping()
                pinged = now
                if unanswered is None:
                    unanswered = now

    async def _dispatch(self, message: dict[str, Any]) -> None:
        if message["type"] != "message":
            return  # pong, or a subscription confirmation
        if message["channel"] == self._keys.devices_channel:
            await _call(self._on_devices, device_change(message["data"]))
        elif message["channel"] == self._keys.apps_channel:
            await _call(self._on_apps, apps_change(message["data"]))
        elif message["channel"] == self._keys.revoked_channel:
            key_hash = message["data"]
            if self._sessions is not None:
                if KEY_HASH.fullmatch(key_hash):
                    self._sessions.forget(key_hash)
                else:
                    self._sessions.forget_all()
            await _call(self._on_revoked, key_hash)

    async def _up(self) -> None:
        if self._sessions is not None:
            self._sessions.subscription_up()
        self.connected = True
        if self._down_since is not None:
            logger.info("shared state %s: change events are back after %.1f s; caches in use again",
                           self.location, time.monotonic() - self._down_since)
            self._down_since = None
        await _call(self._on_connected)

    async def _down(self, error: BaseException) -> None:
        was_connected, self.connected = self.connected, False
        if self._sessions is not None:
            self._sessions.subscription_down()
        if self._down_since is None:
            self._down_since = time.monotonic()
            logger.warning("shared state %s: change events %s (%s); every lookup goes to Redis until they are back",
                           self.location, "lost" if was_connected else "unavailable", error or type(error).__name__)
        if was_connected:
            await _call(self._on_lost)


async def _call(callback: Callback | None, *arguments: object) -> None:
    if callback is not None:
        result = callback(*arguments)
        if inspect.isawaitable(result):
            await result


def apps_change(data: str) -> AppRegistrationsChanged:
    """An ``<p>app-registrations`` message: a JSON list of the users whose registrations changed."""
    try:
        users = strict_json(data)
    except ValueError:
        users = None
    if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
        logger.warning("an app registration change message is unreadable: treated as a change to every user")
        return AppRegistrationsChanged(frozenset(), every=True)
    return AppRegistrationsChanged(frozenset(users))


def device_change(data: str) -> DevicesChanged | AllDevicesChanged:
    """A ``<p>devices`` message: a JSON list of device ids, ``["*"]`` for every device."""
    try:
        ids = strict_json(data)
    except ValueError:
        ids = None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        logger.warning("a device change message is unreadable: treated as a change to every device")
        return ALL_DEVICES
    return ALL_DEVICES if EVERY_DEVICE in ids else DevicesChanged(frozenset(ids))  # written lower case


class RedisState:
    """The Redis backends of one gateway process, on one URL (redis://, rediss://, unix://)."""

    def __init__(self, url: str, *, password: str | None = None, prefix: str = "portcullis:") -> None:
        if password is not None and urlsplit(url).password is not None:
            raise ValueError("give the Redis password in the URL or separately, not both")
        self.location = redacted(url)
        self._url = url
        self._options: dict[str, Any] = {
            "socket_connect_timeout": CONNECT_TIMEOUT, "socket_timeout": READ_TIMEOUT, "decode_responses": True,
            **({"password": password} if password is not None else {}),
            **({} if url.startswith("unix:") else {"socket_keepalive": True})}  # TCP only: a Unix socket refuses it
        self._keys = Keys(prefix)
        retry = (redis.ConnectionError,)
        self._sync = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 1, retry), **self._options)
        self._async = redis.asyncio.Redis.from_url(url, retry=AsyncRetry(NoBackoff(), 1, retry), **self._options)
        self._subscribers: list[redis.asyncio.Redis] = []
        self.devices = RedisDeviceStore(self._sync, self._keys, self.location)
        self.apps = RedisAppRegistrations(self._sync, self._keys, self.location)
        self.sessions = RedisSessionStore(self._async, self._keys, self.location)
        self.nonces = RedisNonces(self._async, self._keys, self.location)

    @classmethod
    def from_url(cls, url: str, *, password: str | None = None, prefix: str = "portcullis:") -> RedisState:
        return cls(url, password=password, prefix=prefix)

    def events(self, *, on_devices: Callback | None = None, on_revoked: Callback | None = None,
               on_connected: Callback | None = None, on_lost: Callback | None = None,
               on_apps: Callback | None = None) -> RedisEvents:
        """The subscriber; it switches ``sessions``' local cache on and off by itself. Its own
        connection never retries silently: a reconnection must be seen, as messages were missed."""
        client = redis.asyncio.Redis.from_url(self._url, retry=AsyncRetry(NoBackoff(), 0), **self._options)
        self._subscribers.append(client)
        return RedisEvents(client, self._keys, self.location, sessions=self.sessions, on_devices=on_devices,
                           on_revoked=on_revoked, on_connected=on_connected, on_lost=on_lost, on_apps=on_apps)

    def close(self) -> None:
        self._sync.close()

    async def aclose(self) -> None:
        for client in (self._async, *self._subscribers):
            await client.aclose()
        self.close()
