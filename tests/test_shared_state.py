"""State shared by several gateway processes: sessions, pending sign-ins and nonces in memory,
SQLite and a real redis-server; the Redis device inventory against the SQLite one; change and
revocation events, including Redis dying and coming back on the same port."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from cryptography.fernet import Fernet
from pydantic import TypeAdapter

from gateway.app import bootstrap
from gateway.counted_log import REPEAT_LINE_SECONDS
from gateway.errors import SignalUnavailable
from gateway.events import ALL_DEVICES, ChangeEvent, DevicesChanged
from gateway.identity.browser import COOKIE_NAME
from gateway.policy.model import ComplianceState, DeviceThreatLevel, Identity
from gateway.signals.cache import STALE_WARNING_SECONDS, CachedInventory
from gateway.signals.devices import DeviceRecord
from gateway.signals.sqlite_store import SqliteDeviceStore
from gateway.signals.store import StoreInventory
from gateway.state.codec import IDENTITY_FIELDS, decode_pending, decode_session, encode_pending, encode_session
from gateway.state.nonces import MemoryNonces, NonceStore, SqliteNonces
from gateway.state.redis_keys import redacted
from gateway.state.redis_state import RedisState
from gateway.state.session_records import BrowserSession, PendingLogin
from gateway.state.sessions import MemorySessionStore, SqliteSessionStore, session_key
from tests.conftest import Background, Gateway, Ports, proxy_for
from tests.gateway_process import PORTCULLIS
from tests.helpers.browser import BROWSER
from tests.helpers.hosts import ACTIVESYNC, MAIL
from tests.helpers.scale_out import SESSION_KEY, STALENESS, shared_config
from tests.helpers.shared_state import prefix, record
from tests.helpers.tokens import outlook_token
from tests.redis_server import RedisServer, started_or_skipped

REPO = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
IDENTITY = Identity(subject="sub-alex", user_principal_name="alex@contoso.test", object_id="oid-1", tenant_id="tid-1",
                    client_id="client-1", device_id="device-1", groups=frozenset({"finance", "staff"}),
                    audience="api://mail", expires_at=1_900_000_000.5, authentication_methods=frozenset({"pwd", "mfa"}),
                    authenticated_at=1_800_000_000.0, authentication_context="c1", issued_at=1_800_000_001.25,
                    roles=frozenset({"Portcullis.Admin"}), authentication_contexts=frozenset({"c1", "c7"}),
                    issuer="contoso")
SESSION = BrowserSession(IDENTITY, "mail.contoso.test", datetime(2026, 11, 23, 8, 0, tzinfo=UTC))
PENDING = PendingLogin("mail.contoso.test:8443", "https://mail.contoso.test:8443/inbox?x=1", "verifier-1", "nonce-1",
                       "binding-hash")
SECRET_IN_RECORD = "do-not-log-me"


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """Its own server: these tests kill and freeze it."""
    server = started_or_skipped()
    yield server
    server.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


# --- session stores: one contract, three backends -------------------------------------------------


@dataclass
class Stores:
    sessions: Any
    nonces: Any


class Backend:
    """Opens stores on one shared storage (as another process would), ages records, and spoils
    stored records on purpose."""

    sessions: Any
    nonces: Any

    def open(self) -> Stores | RedisState:
        raise NotImplementedError

    async def advance(self, seconds: float) -> None:
        raise NotImplementedError

    def spoil(self, kind: str, secret: str, text: str) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class MemoryBackend(Backend):
    def __init__(self) -> None:
        self.clock = Clock()
        self.sessions, self.nonces = MemorySessionStore(clock=self.clock), MemoryNonces(clock=self.clock)

    def open(self) -> Stores:
        return Stores(self.sessions, self.nonces)  # one process: every "instance" is the same memory

    async def advance(self, seconds: float) -> None:
        self.clock.now += seconds


class SqliteBackend(Backend):
    def __init__(self, directory: Path) -> None:
        self.clock, self.path, self.opened = Clock(), directory / "state.sqlite", []
        first = self.open()
        self.sessions, self.nonces = first.sessions, first.nonces

    def open(self) -> Stores:
        self.opened.append(Stores(SqliteSessionStore(self.path, clock=self.clock),
                                  SqliteNonces(self.path, clock=self.clock)))
        return self.opened[-1]

    async def advance(self, seconds: float) -> None:
        self.clock.now += seconds

    def spoil(self, kind: str, secret: str, text: str) -> None:
        table = {"session": "sessions", "pending": "pending_logins"}[kind]
        with sqlite3.connect(self.path) as db:
            assert db.execute(f"UPDATE {table} SET record = ? WHERE key = ?",  # noqa: S608  (a fixed table name)
                              (text, session_key(secret))).rowcount == 1

    async def close(self) -> None:
        for opened in self.opened:
            opened.sessions.close()
            opened.nonces.close()


class RedisBackend(Backend):
    def __init__(self, server: RedisServer) -> None:
        self.url, self.prefix, self.states = server.url, prefix(), []
        self.raw = redis.Redis.from_url(server.url, decode_responses=True)
        state = self.open()
        self.sessions, self.nonces = state.sessions, state.nonces

    def open(self) -> RedisState:
        self.states.append(RedisState.from_url(self.url, prefix=self.prefix))
        return self.states[-1]

    async def advance(self, seconds: float) -> None:
        await asyncio.sleep(seconds)  # Redis expires keys on its own clock

    def spoil(self, kind: str, secret: str, text: str) -> None:
        assert self.raw.set(f"{self.prefix}{kind}:{session_key(secret)}", text, xx=True, keepttl=True)

    async def close(self) -> None:
        for state in self.states:
            await state.aclose()
        self.raw.close()


def make_backend(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if kind == "memory":
        return MemoryBackend()
    if kind == "sqlite":
        return SqliteBackend(tmp_path)
    return RedisBackend(request.getfixturevalue("redis_server"))


def run(kind: str, request: pytest.FixtureRequest, tmp_path: Path,
        scenario: Callable[[Backend], Awaitable[None]]) -> None:
    async def main() -> None:
        backend = make_backend(kind, request, tmp_path)
        try:
            await scenario(backend)
        finally:
            await backend.close()

    asyncio.run(main())


ALL = ["memory", "sqlite", "redis"]
SHARED = ["sqlite", "redis"]


@pytest.mark.parametrize("kind", ALL)
def test_a_pending_sign_in_is_redeemed_once(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    async def scenario(backend: Backend) -> None:
        first, second = backend.sessions, backend.open().sessions
        await first.put_pending("state-1", PENDING, 600)
        taken = await asyncio.gather(*(store.take_pending("state-1") for store in (first, second, first, second)))
        assert sorted(taken, key=lambda t: t is None) == [PENDING, None, None, None]
        assert await second.take_pending("state-1") is None
        assert await first.take_pending("never-started") is None

    run(kind, request, tmp_path, scenario)


@pytest.mark.parametrize("kind", ALL)
def test_a_session_round_trip_keeps_every_identity_field(kind: str, request: pytest.FixtureRequest,
                                                         tmp_path: Path) -> None:
    async def scenario(backend: Backend) -> None:
        await backend.sessions.put_session("session-1", SESSION, 3600)
        found = await backend.open().sessions.get_session("session-1")
        assert found == SESSION
        assert found.identity.groups == frozenset({"finance", "staff"}) and found.signed_in_at.tzinfo is not None
        assert await backend.sessions.get_session("session-2") is None

    run(kind, request, tmp_path, scenario)


@pytest.mark.parametrize("kind", ALL)
def test_an_ended_session_is_refused(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    async def scenario(backend: Backend) -> None:
        await backend.sessions.put_session("session-1", SESSION, 3600)
        await backend.sessions.put_session("session-2", SESSION, 3600)
        await backend.sessions.end_session("session-1")
        assert await backend.sessions.get_session("session-1") is None
        assert await backend.open().sessions.get_session("session-1") is None
        assert await backend.sessions.get_session("session-2") == SESSION  # only that one ended
        await backend.sessions.end_session("never-existed")

    run(kind, request, tmp_path, scenario)


@pytest.mark.parametrize("kind", ALL)
def test_sessions_and_pending_sign_ins_expire_after_their_ttl(kind: str, request: pytest.FixtureRequest,
                                                              tmp_path: Path) -> None:
    async def scenario(backend: Backend) -> None:
        await backend.sessions.put_session("short", SESSION, 1)
        await backend.sessions.put_session("long", SESSION, 3600)
        await backend.sessions.put_pending("state-short", PENDING, 1)
        await backend.sessions.put_pending("state-long", PENDING, 3600)
        await backend.advance(0.5)
        assert await backend.sessions.get_session("short") == SESSION
        await backend.advance(0.6)
        assert await backend.sessions.get_session("short") is None
        assert await backend.sessions.take_pending("state-short") is None
        assert await backend.sessions.get_session("long") == SESSION
        assert await backend.sessions.take_pending("state-long") == PENDING

    run(kind, request, tmp_path, scenario)


BAD_SESSIONS = [
    pytest.param("not json", id="not JSON"),
    pytest.param('["a list"]', id="not an object"),
    pytest.param(json.dumps({**json.loads(encode_session(SESSION)), "v": 2}), id="another version"),
    pytest.param(encode_session(SESSION).replace('"sub-alex"', "7"), id="subject not a string"),
    pytest.param(encode_session(SESSION).replace('"staff"', "1"), id="a group not a string"),
    pytest.param(encode_session(SESSION).replace("1900000000.5", "true"), id="expiresAt a boolean"),
    pytest.param(encode_session(SESSION).replace("+00:00", ""), id="signedInAt without a time zone"),
    pytest.param(json.dumps({"v": 1, "host": "h", "signedInAt": "2026-01-01T00:00:00+00:00"}), id="no identity"),
    pytest.param(encode_session(SESSION)[:-1] + ', "x": ' + "[" * 20_000 + "]" * 20_000 + "}", id="nested 20,000 deep"),
    pytest.param(encode_session(SESSION).replace('"host": ', '"host": "elsewhere.test", "host": '),
                 id="host named twice"),
    pytest.param(encode_session(SESSION).replace('"certificateBound": false', '"certificateBound": "yes"'),
                 id="certificateBound not a boolean"),
]


def test_a_session_bound_to_a_device_certificate_stays_bound_and_one_stored_before_is_not() -> None:
    bound = replace(SESSION, certificate_bound=True)
    assert decode_session(encode_session(bound)) == bound
    older = json.loads(encode_session(SESSION))
    del older["certificateBound"]  # stored by a gateway before sessions could be bound
    assert decode_session(json.dumps(older)) == SESSION
    del older["identity"]["authenticationContexts"]  # or before tokens' acrs were kept
    assert decode_session(json.dumps(older)) == replace(SESSION, identity=replace(IDENTITY,
                                                                                 authentication_contexts=frozenset()))


@pytest.mark.parametrize("text", BAD_SESSIONS)
def test_an_unreadable_session_record_reads_as_none(text: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "gateway.state.codec"):
        assert decode_session(text) is None
    assert "browser session is unreadable" in caplog.text


def test_codecs_cover_every_identity_field_and_round_trip() -> None:
    assert set(IDENTITY_FIELDS) == {f.name for f in fields(Identity)}
    assert all(getattr(IDENTITY, f.name) != f.default for f in fields(Identity))  # every field carries a value
    assert decode_session(encode_session(SESSION)) == SESSION
    assert decode_pending(encode_pending(PENDING)) == PENDING
    assert decode_pending(encode_pending(PENDING).replace('"nonce-1"', "null")) is None


@pytest.mark.parametrize("kind", SHARED)  # memory keeps the objects themselves: nothing to spoil
def test_a_malformed_stored_record_reads_as_none_and_is_logged_without_its_content(
        kind: str, request: pytest.FixtureRequest, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(backend: Backend) -> None:
        await backend.sessions.put_session("session-1", SESSION, 3600)
        await backend.sessions.put_pending("state-1", PENDING, 600)
        backend.spoil("session", "session-1", json.dumps({"v": 1, "host": SECRET_IN_RECORD}))
        backend.spoil("pending", "state-1", "{" + SECRET_IN_RECORD)
        with caplog.at_level(logging.WARNING, "gateway.state.codec"):
            assert await backend.sessions.get_session("session-1") is None
            assert await backend.sessions.take_pending("state-1") is None
        assert len(caplog.records) == 2 and SECRET_IN_RECORD not in caplog.text

    run(kind, request, tmp_path, scenario)


def test_sqlite_and_redis_never_hold_a_usable_session_id(redis_server: RedisServer, tmp_path: Path) -> None:
    async def scenario() -> None:
        sqlite_store = SqliteSessionStore(tmp_path / "state.sqlite")
        state = RedisState.from_url(redis_server.url, prefix=(key_prefix := prefix()))
        for store in (sqlite_store, state.sessions):
            await store.put_session("the-session-id", SESSION, 3600)
            await store.put_pending("the-oauth-state", PENDING, 600)
        await state.aclose()
        sqlite_store.close()
        raw = redis.Redis.from_url(redis_server.url, decode_responses=True)
        stored = " ".join(f"{k} {raw.get(k)}" for k in raw.scan_iter(f"{key_prefix}*"))
        raw.close()
        stored += b"".join(p.read_bytes() for p in tmp_path.glob("state.sqlite*")).decode(errors="replace")
        assert hashlib.sha256(b"the-session-id").hexdigest() in stored
        assert "the-session-id" not in stored and "the-oauth-state" not in stored

    asyncio.run(scenario())


def test_the_sqlite_file_is_private_and_bounded(tmp_path: Path) -> None:
    clock = Clock()
    store = SqliteSessionStore(tmp_path / "state.sqlite", max_sessions=5, clock=clock)

    async def scenario() -> None:
        for index in range(201):  # the tables are cut to size every 100 writes: at 0, 100 and 200
            await store.put_session(f"session-{index}", SESSION, 3600 + index)
        assert await store.get_session("session-200") == SESSION
        assert await store.get_session("session-195") is None  # made room: it expired soonest

    asyncio.run(scenario())
    with sqlite3.connect(tmp_path / "state.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] == 5
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.glob("state.sqlite*")} == \
        {"state.sqlite": 0o600, "state.sqlite-wal": 0o600, "state.sqlite-shm": 0o600}
    store.close()


def test_importing_the_session_store_does_not_import_the_browser_module() -> None:
    """browser.py will import gateway.state.sessions: that must not import browser.py back."""
    script = ("import sys, gateway.state.sessions, gateway.state.nonces\n"
              "print(sorted(m for m in sys.modules if m.startswith(('gateway.identity', 'redis'))))")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# --- revocation across processes ------------------------------------------------------------------


def test_a_session_ended_in_one_sqlite_process_is_refused_by_another_at_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        first, second = SqliteSessionStore(tmp_path / "s.sqlite"), SqliteSessionStore(tmp_path / "s.sqlite")
        await first.put_session("session-1", SESSION, 3600)
        assert await second.get_session("session-1") == SESSION
        started = time.monotonic()
        await first.end_session("session-1")
        assert await second.get_session("session-1") is None
        elapsed = time.monotonic() - started
        print(f"sqlite: ended in one process, refused by the other after {elapsed * 1000:.1f} ms")
        assert elapsed < 1
        first.close()
        second.close()

    asyncio.run(scenario())


def test_a_session_ended_on_one_redis_host_is_refused_by_another_within_a_second(
        redis_server: RedisServer) -> None:
    async def scenario() -> None:
        key_prefix = prefix()
        first, second = (RedisState.from_url(redis_server.url, prefix=key_prefix) for _ in range(2))
        subscribed = asyncio.Event()
        events = asyncio.create_task(second.events(on_connected=subscribed.set).run())
        await asyncio.wait_for(subscribed.wait(), 5)
        await first.sessions.put_session("session-1", SESSION, 3600)
        assert await second.sessions.get_session("session-1") == SESSION  # read from Redis, now cached
        raw = redis.Redis.from_url(redis_server.url)
        assert raw.delete(f"{key_prefix}session:{session_key('session-1')}") == 1  # unannounced
        assert await second.sessions.get_session("session-1") == SESSION  # so this came from the cache
        assert (second.sessions.hits, second.sessions.misses) == (1, 1)

        started = time.monotonic()
        await first.sessions.end_session("session-1")
        while await second.sessions.get_session("session-1") is not None:
            assert time.monotonic() - started < 1, "the revocation did not arrive within a second"
            await asyncio.sleep(0.002)
        elapsed = time.monotonic() - started
        print(f"redis: ended on one host, refused by the other after {elapsed * 1000:.1f} ms")
        assert elapsed < 1
        events.cancel()
        raw.close()
        for state in (first, second):
            await state.aclose()

    asyncio.run(scenario())


def test_without_its_subscription_a_redis_session_store_never_answers_from_its_cache(
        redis_server: RedisServer) -> None:
    async def scenario() -> None:
        state = RedisState.from_url(redis_server.url, prefix=(key_prefix := prefix()))
        await state.sessions.put_session("session-1", SESSION, 3600)
        assert await state.sessions.get_session("session-1") == SESSION
        raw = redis.Redis.from_url(redis_server.url)
        raw.delete(f"{key_prefix}session:{session_key('session-1')}")
        assert await state.sessions.get_session("session-1") is None
        assert state.sessions.hits == 0
        raw.close()
        await state.aclose()

    asyncio.run(scenario())


# --- nonces ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL)
def test_a_nonce_is_claimed_once_until_released_or_expired(kind: str, request: pytest.FixtureRequest,
                                                           tmp_path: Path) -> None:
    async def scenario(backend: Backend) -> None:
        nonces: NonceStore = backend.nonces
        assert await nonces.claim("sha256=aa", 1)
        assert not await nonces.claim("sha256=aa", 1)
        await nonces.release("sha256=aa")  # the push was not stored: the partner's retry is accepted
        assert await nonces.claim("sha256=aa", 1)
        assert await nonces.claim("sha256=bb", 1)
        await backend.advance(1.1)
        assert await nonces.claim("sha256=aa", 1)

    run(kind, request, tmp_path, scenario)


@pytest.mark.parametrize("kind", ALL)
def test_concurrent_claims_from_two_processes_accept_exactly_one(kind: str, request: pytest.FixtureRequest,
                                                                 tmp_path: Path) -> None:
    async def scenario(backend: Backend) -> None:
        first, second = backend.nonces, backend.open().nonces
        keys = [f"sha256={index:064x}" for index in range(50)]
        results = await asyncio.gather(*(store.claim(key, 60) for key in keys for store in (first, second)))
        assert [results[2 * i] + results[2 * i + 1] for i in range(len(keys))] == [1] * len(keys)

    run(kind, request, tmp_path, scenario)


# --- the device inventory in Redis, against the SQLite one ----------------------------------------

A, B, C, D, E = (f"aa000000-0000-4000-8000-00000000000{n}" for n in range(1, 6))


def at(hours: float) -> datetime:
    return NOW + timedelta(hours=hours)


STEPS: list[tuple[str, Callable[[Any], object]]] = [
    ("seed from the inventory file", lambda s: s.replace_all(
        [record(A, threatLevel="medium"), record(B, operatingSystem="iOS"),
         record(C, threatLevel="low", threatSource="graph", threatReportedDateTime=at(-1).isoformat())],
        now=at(0), seed=True)),
    ("a partner's push, with an unknown device", lambda s: s.apply_verdicts(
        "lookout", [(A.upper(), DeviceThreatLevel.high), (B, DeviceThreatLevel.low), ("unknown-1", None),
                    ("unknown-2", DeviceThreatLevel.high)], now=at(1))),
    ("one device changes", lambda s: s.upsert(record(B, complianceState="noncompliant", threatLevel="medium",
                                                      threatSource="graph", threatReportedDateTime=at(2.5).isoformat()),
                                               now=at(2))),
    ("a full sync prunes B", lambda s: s.replace_all(
        [record(A), record(C, threatLevel="high", threatSource="graph", threatReportedDateTime=at(3).isoformat()),
         record(D, extensionAttributes={"extensionAttribute1": "kiosk"}, threatLevel="low", threatSource="graph",
                threatReportedDateTime=at(2).isoformat())], now=at(3), prune_partner="graph")),
    ("a verdict cleared", lambda s: s.clear_threat_level(A, "lookout", now=at(4))),
    ("a seed after the clear: the older verdict is stored", lambda s: s.replace_all(
        [record(A, threatLevel="low", threatSource="lookout", threatReportedDateTime=at(0.5).isoformat())],
        now=at(4.5), seed=True)),
    ("a verdict for an unknown device", lambda s: s.set_threat_level("unknown-3", "lookout",
                                                                      DeviceThreatLevel.high, now=at(4))),
    ("B returns with its lookout verdict", lambda s: s.upsert(record(B), now=at(5))),
    ("a heartbeat", lambda s: s.partner_contact("zimperium", now=at(5))),
    ("a restart seeds again: no older verdict wins", lambda s: s.replace_all(
        [record(C, threatLevel="secured", threatSource="graph", threatReportedDateTime=at(-5).isoformat()),
         record(E, threatLevel="low")], now=at(6), seed=True)),
    ("the sync source stops reporting C", lambda s: s.upsert(record(C), now=at(7), clear_partner="graph")),
    ("an empty sync prunes nothing", lambda s: s.replace_all([], now=at(8), prune_partner="graph")),
    ("D is retired, with an id never seen", lambda s: s.remove([D.upper(), "unknown-4"], now=at(9))),
    ("a verdict for the retired device", lambda s: s.set_threat_level(D, "lookout", DeviceThreatLevel.high,
                                                                     now=at(9.1))),
    ("D comes back without its old verdicts", lambda s: s.upsert(record(D), now=at(9.2))),
    ("a full sync prunes A; lookout's verdict waits for its return", lambda s: s.replace_all(
        [record(B), record(C), record(D), record(E)], now=at(10), prune_partner="graph")),
    ("A, known only by its verdicts, is retired", lambda s: s.remove([A], now=at(11))),
    ("A comes back without its old verdicts", lambda s: s.upsert(record(A), now=at(12))),
]
IGNORED = [frozenset(), frozenset({"lookout"}), frozenset({"inventory", "graph"})]


def snapshot(store: Any) -> dict[str, object]:
    return {"devices": {(d, tuple(sorted(i))): store.managed_device(d, i) for d in (A, B, C, D, E, "unknown-1")
                        for i in IGNORED},
            "partners": store.partner_contacts(), "count": store.count(), "records": list(store.records())}


def test_redis_device_store_gives_the_same_answers_as_the_sqlite_store(redis_server: RedisServer,
                                                                       tmp_path: Path) -> None:
    reference = SqliteDeviceStore(tmp_path / "devices.sqlite")
    state = RedisState.from_url(redis_server.url, prefix=prefix())
    seen, answers = {}, {}
    for name, step in STEPS:
        answers[name] = step(state.devices)
        assert answers[name] == step(reference), name
        seen[name] = snapshot(state.devices)
        assert seen[name] == snapshot(reference), name

    def level(step: str, device_id: str) -> tuple[DeviceThreatLevel | None, str | None]:
        device = seen[step]["devices"][(device_id, ())]  # type: ignore[index]
        return (device.threat_level, device.threat_source) if device else None  # type: ignore[return-value]

    # the sequence really went through the paths it names:
    assert level("a partner's push, with an unknown device", A) == (DeviceThreatLevel.high, "lookout")
    assert level("a full sync prunes B", B) is None
    lookout_only = seen["a seed after the clear: the older verdict is stored"]["devices"][(A, ("graph", "inventory"))]
    assert lookout_only.threat_level is DeviceThreatLevel.low  # type: ignore[attr-defined]
    assert level("a restart seeds again: no older verdict wins", C) == (DeviceThreatLevel.high, "graph")
    assert level("a restart seeds again: no older verdict wins", E) == (DeviceThreatLevel.low, "inventory")
    assert level("the sync source stops reporting C", C) == (None, None)
    assert level("an empty sync prunes nothing", B) == (DeviceThreatLevel.low, "lookout")  # kept while pruned
    assert level("an empty sync prunes nothing", A) == (DeviceThreatLevel.medium, "inventory")
    assert seen["an empty sync prunes nothing"]["count"] == 5
    assert "graph" in seen["a restart seeds again: no older verdict wins"]["partners"]  # type: ignore[operator]
    # C's graph verdict went: graph's newest current verdict is now D's
    assert seen["an empty sync prunes nothing"]["partners"]["graph"] == at(2)  # type: ignore[index]
    assert level("an empty sync prunes nothing", D) == (DeviceThreatLevel.low, "graph")
    assert level("D is retired, with an id never seen", D) is None
    assert seen["D is retired, with an id never seen"]["count"] == 4
    assert level("D comes back without its old verdicts", D) == (None, None)
    assert level("a full sync prunes A; lookout's verdict waits for its return", A) is None
    assert answers["A, known only by its verdicts, is retired"] == {A}  # so it is announced too
    assert level("A comes back without its old verdicts", A) == (None, None)
    state.close()
    reference.close()


@pytest.mark.parametrize(("stored", "readable"), [
    pytest.param('{"azureADDeviceId": "%s", "complianceState": "noncompliant", "complianceState": "compliant"}',
                 False, id="complianceState named twice"),
    pytest.param('{"azureADDeviceId": "%s", "complianceState": "compliant"}', True, id="the twin: each member once"),
])
def test_a_redis_device_record_naming_a_member_twice_is_unreadable(redis_server: RedisServer, stored: str,
                                                                   readable: bool) -> None:
    """Shared state is read as the network is (one reading): a device record in Redis with two
    complianceState members makes the device unavailable (the staleness rules, then 503), never
    the last member's "compliant", which pydantic's reader alone would keep."""
    redis_server.start()  # a test before may have stopped it
    state = RedisState.from_url(redis_server.url, prefix=(key_prefix := prefix()))
    state.devices.replace_all([record(A)], now=NOW)
    raw = redis.Redis.from_url(redis_server.url)
    raw.set(f"{key_prefix}device:{A}", stored % A)  # written by something other than Portcullis
    raw.close()
    try:
        if readable:
            device = state.devices.managed_device(A)
            assert device is not None and device.compliance_state is ComplianceState.compliant
        else:
            with pytest.raises(SignalUnavailable, match=f"device {A} is unreadable"):
                state.devices.managed_device(A)
    finally:
        state.close()


def test_apply_verdicts_reports_unknown_devices_and_changes_only_known_ones(redis_server: RedisServer) -> None:
    store = RedisState.from_url(redis_server.url, prefix=prefix()).devices
    store.replace_all([record(A), record(B)], now=NOW)
    changed, unknown = store.apply_verdicts("lookout", [(A.upper(), DeviceThreatLevel.high), ("Ghost", None),
                                                        ("ghost", DeviceThreatLevel.low)], now=NOW)
    assert (changed, unknown) == ({A}, ["Ghost", "ghost"])
    assert store.managed_device("ghost") is None and store.managed_device(A).threat_level is DeviceThreatLevel.high
    assert "lookout" in store.partner_contacts()  # an unknown device's push is still contact
    store.close()


def test_replace_all_prunes_only_a_full_sync_and_keeps_other_partners_verdicts(redis_server: RedisServer) -> None:
    store = RedisState.from_url(redis_server.url, prefix=prefix()).devices
    store.replace_all([record(A), record(B, threatLevel="high", threatSource="graph")], now=NOW)
    store.set_threat_level(B, "lookout", DeviceThreatLevel.medium, now=NOW)
    store.replace_all([record(C)], now=NOW)  # not a full sync: nothing pruned
    assert store.count() == 3
    store.replace_all([], now=NOW, prune_partner="graph")  # an empty sync prunes nothing
    assert store.count() == 3
    store.replace_all([record(C)], now=NOW, prune_partner="graph")
    assert (store.count(), store.managed_device(A), store.managed_device(B)) == (1, None, None)
    store.upsert(record(B), now=NOW)  # back: lookout's verdict was kept, graph's went with the prune
    assert (store.managed_device(B).threat_level, store.managed_device(B).threat_source) == \
        (DeviceThreatLevel.medium, "lookout")
    store.close()


@pytest.mark.slow
def test_a_full_sync_of_100000_devices_takes_seconds(redis_server: RedisServer) -> None:
    devices = TypeAdapter(list[DeviceRecord]).validate_json(json.dumps([
        {"azureADDeviceId": f"bb000000-0000-4000-8000-{i:012d}", "deviceName": f"Phone {i}", "operatingSystem": "iOS",
         "complianceState": "compliant", "userPrincipalName": f"user{i}@contoso.test",
         "lastSyncDateTime": "2026-11-23T08:00:00Z",
         **({"threatLevel": "low", "threatSource": "graph"} if i % 3 else {})}
        for i in range(100_000)]))
    store = RedisState.from_url(redis_server.url, prefix=prefix()).devices
    started = time.perf_counter()
    assert store.replace_all(devices, now=NOW, prune_partner="graph") == 100_000
    print(f"redis: replace_all of 100,000 devices took {time.perf_counter() - started:.2f} s")
    assert store.count() == 100_000
    assert store.managed_device("BB000000-0000-4000-8000-000000099998").threat_level is DeviceThreatLevel.low
    store.close()


# --- events, and Redis going away -----------------------------------------------------------------


def changed(*device_ids: str) -> DevicesChanged:
    """The event a subscriber gets for a write to these devices: their ids as sent, not folded here."""
    return DevicesChanged(frozenset(device_ids))


async def subscribed(state: RedisState) -> tuple[asyncio.Task[None], asyncio.Queue[tuple[str, object]]]:
    queue: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
    events = state.events(on_devices=lambda event: queue.put_nowait(("devices", event)),
                          on_revoked=lambda key: queue.put_nowait(("revoked", key)),
                          on_connected=lambda: queue.put_nowait(("connected", None)),
                          on_lost=lambda: queue.put_nowait(("lost", None)))
    task = asyncio.create_task(events.run())
    assert await asyncio.wait_for(queue.get(), 5) == ("connected", None)
    return task, queue


def test_every_device_write_reaches_a_subscriber_within_a_second(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        writer, reader = (RedisState.from_url(redis_server.url, prefix=(key_prefix := prefix())),
                          RedisState.from_url(redis_server.url, prefix=key_prefix))
        task, queue = await subscribed(reader)
        many = [record(f"cc000000-0000-4000-8000-{i:012d}") for i in range(1001)]
        pruned = sorted({A, *(r.azure_ad_device_id for r in many)})  # in chunks of 1000, in order
        writes = [
            (lambda: writer.devices.upsert(record(A), now=NOW), [changed(A)]),
            (lambda: writer.devices.apply_verdicts("lookout", [(A, DeviceThreatLevel.high), ("x", None)], now=NOW),
             [changed(A)]),
            (lambda: writer.devices.replace_all(many, now=NOW),
             [changed(*(r.azure_ad_device_id for r in many[:1000])), changed(many[1000].azure_ad_device_id)]),
            (lambda: writer.devices.apply_verdicts("lookout", [(r.azure_ad_device_id, DeviceThreatLevel.low)
                                                               for r in many], now=NOW), [ALL_DEVICES]),
            (lambda: writer.devices.replace_all([record(B)], now=NOW, prune_partner="graph"),
             [changed(B), changed(*pruned[:1000]), changed(*pruned[1000:])]),
            # A was pruned above with lookout's verdict kept: retiring it removes that, so it is announced
            (lambda: writer.devices.remove([B.upper(), A, "never-there"], now=NOW), [changed(A, B)]),
        ]
        for write, expected in writes:
            started = time.monotonic()
            await asyncio.to_thread(write)
            for event in expected:
                assert await asyncio.wait_for(queue.get(), 1) == ("devices", event)
            print(f"device change seen by the subscriber after {(time.monotonic() - started) * 1000:.1f} ms")
        await writer.sessions.end_session("session-1")
        assert await asyncio.wait_for(queue.get(), 1) == ("revoked", session_key("session-1"))
        task.cancel()
        await writer.aclose()
        await reader.aclose()

    asyncio.run(scenario())


def test_devices_remove_on_redis_retires_the_device_for_every_gateway(redis_server: RedisServer,
                                                                     tmp_path: Path) -> None:
    """``portcullis devices remove`` with ``state``: the device and its verdicts leave Redis, and
    every subscribed gateway hears of it. Only portcullis.yaml is read (no policies.yaml here)."""
    key_prefix = prefix()
    (tmp_path / "portcullis.yaml").write_text(
        "gateway: {certificates: [{hosts: [mail.contoso.test], file: gateway.pem}]}\n"
        "identity: {issuer: 'https://login.contoso.test/tenant/v2.0'}\n"
        "protectedHosts: {mail.contoso.test: {upstream: 'https://10.0.0.1', audiences: [api://mail]}}\n"
        f"deviceSignals: {{}}\nstate: {{redis: '{redis_server.url}', keyPrefix: '{key_prefix}'}}\n")

    async def scenario() -> subprocess.CompletedProcess[str]:
        writer, reader = (RedisState.from_url(redis_server.url, prefix=key_prefix),
                          RedisState.from_url(redis_server.url, prefix=key_prefix))
        await asyncio.to_thread(writer.devices.replace_all, [record(A, threatLevel="high", threatSource="lookout"),
                                                             record(B)], now=NOW)
        task, queue = await subscribed(reader)
        removed = await asyncio.to_thread(subprocess.run, [PORTCULLIS, "devices", "--config", str(tmp_path),
                                                           "remove", A], capture_output=True, text=True, timeout=60)
        assert await asyncio.wait_for(queue.get(), 5) == ("devices", changed(A))
        assert await asyncio.to_thread(writer.devices.managed_device, A) is None
        assert await asyncio.to_thread(writer.devices.count) == 1
        client = redis.Redis.from_url(redis_server.url, decode_responses=True)
        left = [k for k in client.scan_iter(f"{key_prefix}*") if A in k or client.type(k) == "zset"
                and client.zscore(k, A) is not None]
        client.close()
        assert left == []  # no verdict or report score of it stays behind
        task.cancel()
        await writer.aclose()
        await reader.aclose()
        return removed

    removed = asyncio.run(scenario())
    assert (removed.returncode, removed.stdout) == (0, f"{A}: removed\n"), removed.stderr


def test_losing_redis_fails_closed_fast_and_events_resume_when_it_is_back(
        redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        state = RedisState.from_url(redis_server.url, prefix=prefix())
        task, queue = await subscribed(state)
        await state.sessions.put_session("session-1", SESSION, 3600)
        assert await state.sessions.get_session("session-1") == SESSION and state.sessions.hits == 1  # cached
        assert await asyncio.to_thread(state.devices.count) == 0  # the pool now holds a connection
        stopped = time.monotonic()
        redis_server.stop()
        try:
            assert await asyncio.wait_for(queue.get(), 2) == ("lost", None)
            print(f"subscription lost {time.monotonic() - stopped:.3f} s after redis-server was killed")
            assert not state.sessions.subscribed
            for name, call in [("device lookup", lambda: asyncio.to_thread(state.devices.managed_device, A)),
                               ("session lookup", lambda: state.sessions.get_session("session-1")),
                               ("nonce claim", lambda: state.nonces.claim("sha256=cc", 60))]:
                started = time.monotonic()
                with pytest.raises(SignalUnavailable, match="shared state redis://127.0.0.1"):
                    await call()
                assert time.monotonic() - started < 3, name
            await asyncio.sleep(0.5)  # an outage long enough for several reconnection attempts
        finally:
            redis_server.start()
        assert await asyncio.wait_for(queue.get(), 5) == ("connected", None)
        await asyncio.to_thread(state.devices.upsert, record(A), now=NOW)  # its pooled connection died: retried
        assert await asyncio.wait_for(queue.get(), 1) == ("devices", changed(A))
        assert await state.sessions.get_session("session-1") is None  # Redis came back empty
        task.cancel()
        await state.aclose()

    with caplog.at_level(logging.INFO, "gateway.state.redis_state"):
        asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records if r.name == "gateway.state.redis_state"]
    assert [m for m in messages if "change events lost" in m] and len(messages) == 2, messages
    assert "change events are back" in messages[1]


def test_answers_from_copies_while_redis_is_down_are_logged_once_per_interval_with_their_count(
        redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """The soak's Redis outage wrote a warning per request (820 a second). Now: one at once, one
    per STALE_WARNING_SECONDS with the count since the last, and a last line when Redis is back."""
    redis_server.start()  # a test before may have stopped it
    state = RedisState.from_url(redis_server.url, prefix=prefix())
    state.devices.replace_all([record(A)], now=NOW)
    clock = Clock()
    inventory = CachedInventory(StoreInventory(state.devices, name="redis"), ttl=60, miss_ttl=5,
                                max_staleness=300, max_entries=1000, timer=clock)

    async def lookups(count: int) -> None:
        for _ in range(count):
            assert await inventory.managed_device(A) is not None

    async def scenario() -> None:
        await lookups(1)
        redis_server.stop()
        try:
            clock.now += 61  # past the TTL: Redis is asked, fails, the 61 s old copy answers
            await lookups(1000)
            clock.now += STALE_WARNING_SECONDS
            await lookups(500)
        finally:
            redis_server.start()
        await asyncio.to_thread(state.devices.replace_all, [record(A)], now=NOW)  # reseeded after the restart
        clock.now += 2  # past the second a failed source is left alone
        await lookups(1)

    with caplog.at_level(logging.INFO, "gateway.signals.cache"):
        asyncio.run(scenario())
    state.close()
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "gateway.signals.cache"]
    assert len(lines) == 3, lines
    assert lines[0][0] == "WARNING" and "device source redis unavailable (shared state redis://127.0.0.1" in \
        lines[0][1] and lines[0][1].endswith("lookups answered from last good copies up to 61 s old: 1 since the last "
                                          "warning, 1 in this outage")
    assert lines[1][0] == "WARNING" and lines[1][1].endswith("lookups answered from last good copies up to 71 s old: "
                                                             "1000 since the last warning, 1001 in this outage")
    assert lines[2] == ("INFO", "device source redis answers again; 1500 lookups were answered from last good "
                                "copies in the outage (499 since the last warning)")


def test_requests_refused_while_redis_is_down_are_logged_once_per_interval_with_their_count(
        gateway: Gateway, demo_ports: Ports, redis_server: RedisServer, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Past maxStalenessSeconds with Redis down, every request is refused with 503 and each refusal
    is in the decision log with its reason. The process log had a line per request too; now each
    kind (device signals, the session a cookie names, starting a sign-in) has one line at once,
    then one per interval with the count since the last."""
    redis_server.start()  # a test before may have stopped it
    monkeypatch.setenv("PORTCULLIS_TEST_SESSION_KEY", SESSION_KEY)
    loaded = bootstrap.load(shared_config(tmp_path, gateway, demo_ports, redis_server, prefix()))
    bootstrap.seed_store(loaded)
    service, _ = bootstrap.build_service(loaded)
    clock = Clock()
    service.unavailable_log.timer = clock
    service.inventory = CachedInventory(service.inventory.source, ttl=60, miss_ttl=5, max_staleness=STALENESS,
                                        max_entries=1000, timer=clock)
    service.inventory.trust_fresh = False  # as build_service leaves it: this process has no change feed
    cookie = f"{COOKIE_NAME}={Fernet(SESSION_KEY).encrypt(b'session-1').decode()}"
    kinds = {"signal unavailable": ("POST", ACTIVESYNC, {"Authorization": f"Bearer {outlook_token(gateway)}"}),
             "session store unavailable": ("GET", "/owa/", {**BROWSER, "Cookie": cookie}),
             "cannot start a sign-in": ("GET", "/owa/", BROWSER)}
    per_interval = 20
    answers: list[httpx.Response] = []
    with caplog.at_level(logging.INFO, "gateway.decision.service"), Background(lambda: proxy_for(service)) as port, \
            gateway.client() as client:

        def send(method: str, path: str, headers: dict[str, str]) -> httpx.Response:
            return client.request(method, f"https://127.0.0.1:{port}{path}", headers={"Host": MAIL, **headers},
                                  extensions={"sni_hostname": MAIL})

        assert send(*kinds["signal unavailable"]).status_code == 200  # Alex's device: a last good copy
        redis_server.stop()
        try:
            clock.now += 61  # past the TTL and maxStalenessSeconds: the copy is too old to answer
            for _ in range(2):
                answers += [send(*kind) for _ in range(per_interval) for kind in kinds.values()]
                clock.now += REPEAT_LINE_SECONDS
        finally:
            redis_server.start()
        recorded = {r["correlationId"]: r for r in service.decision_log.recent()}
    loaded.shared.close()  # type: ignore[union-attr]
    assert [a.status_code for a in answers] == [503] * 6 * per_interval
    for answer in answers:
        record = recorded[answer.headers["x-portcullis-correlation-id"]]
        assert (record["httpStatus"], record["status"]["failureReason"]) == \
            (503, "a signal source is unavailable; try again shortly")
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.decision.service"]
    assert len(lines) == 6, lines
    for kind in kinds:
        counts = [re.findall(r"\((\d+) such refusals since the last line, (\d+) in all\)$", line)
                  for line in lines if kind in line]
        assert counts == [[("1", "1")], [(str(per_interval), str(per_interval + 1))]], (kind, lines)


def test_a_hung_redis_is_noticed_within_a_second_and_lookups_give_up_within_three(
        redis_server: RedisServer) -> None:
    async def scenario() -> None:
        state = RedisState.from_url(redis_server.url, prefix=prefix())
        task, queue = await subscribed(state)
        assert await state.sessions.get_session("session-1") is None
        redis_server.pause()  # connections stay open; only PING going unanswered can tell
        try:
            paused = time.monotonic()
            assert await asyncio.wait_for(queue.get(), 2) == ("lost", None)
            print(f"hung Redis noticed after {time.monotonic() - paused:.3f} s")
            assert time.monotonic() - paused < 1.5
            started = time.monotonic()
            with pytest.raises(SignalUnavailable):
                await state.sessions.get_session("session-1")
            assert time.monotonic() - started < 3
        finally:
            redis_server.resume()
        assert await asyncio.wait_for(queue.get(), 5) == ("connected", None)
        task.cancel()
        await state.aclose()

    asyncio.run(scenario())


def test_redis_urls_never_show_the_password(redis_server: RedisServer) -> None:
    assert redacted("redis://portcullis:s3cret@redis.internal:6380/2") == "redis://portcullis:***@redis.internal:6380/2"
    assert redacted("rediss://:s3cret@redis.internal") == "rediss://:***@redis.internal"
    with pytest.raises(ValueError, match="not both"):
        RedisState.from_url("redis://:s3cret@127.0.0.1/0", password="other")
    closed = RedisServer()  # never started: nothing listens on its port
    state = RedisState.from_url(f"redis://:s3cret@127.0.0.1:{closed.port}/0")
    with pytest.raises(SignalUnavailable) as error:
        state.devices.count()
    assert "s3cret" not in str(error.value) and "***" in str(error.value)
    state.close()
    closed.close()
    over_unix = RedisState.from_url(redis_server.unix_url, prefix=prefix())
    over_unix.devices.upsert(record(A), now=NOW)
    assert over_unix.devices.count() == 1
    over_unix.close()


def test_a_failing_callback_counts_as_a_lost_feed_and_the_subscription_comes_back(
        redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """Whatever fails while handling a message, the process must stop trusting its caches (it
    may have missed what came next) and subscribe again, never stop listening silently."""
    async def scenario() -> None:
        writer, reader = (RedisState.from_url(redis_server.url, prefix=(key_prefix := prefix())),
                          RedisState.from_url(redis_server.url, prefix=key_prefix))
        seen: list[str] = []

        def on_devices(event: ChangeEvent) -> None:
            seen.append("devices")
            if seen.count("devices") == 1:
                raise RuntimeError("a listener broke")

        events = reader.events(on_devices=on_devices, on_connected=lambda: seen.append("connected"),
                               on_lost=lambda: seen.append("lost"))
        task = asyncio.create_task(events.run())
        deadline = time.monotonic() + 5
        while seen != ["connected"]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await asyncio.to_thread(writer.devices.upsert, record(A), now=NOW)
        while seen.count("connected") < 2:
            assert time.monotonic() < deadline, seen
            await asyncio.sleep(0.01)
        assert seen[:4] == ["connected", "devices", "lost", "connected"] and not task.done()
        await asyncio.to_thread(writer.devices.upsert, record(A), now=NOW)
        while seen.count("devices") < 2:
            assert time.monotonic() < deadline, seen
            await asyncio.sleep(0.01)
        task.cancel()
        await writer.aclose()
        await reader.aclose()

    asyncio.run(scenario())
    assert "the change feed failed; treated as lost" in caplog.text
