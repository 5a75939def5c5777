"""Signals an attacker or a failing source could bend, through the real listener, each attack with
its legitimate twin:

- device sources (the inventory, Microsoft Graph) that hang or answer garbage: the last good copy
  while it is younger than ``maxStalenessSeconds``, then 503; never an allow from a bad answer;
- a config reload, valid or not, never lets a blocked user through, not even for one request;
- the device is the one the token vouches for (ActiveSync ``DeviceId``, headers, User-Agent bind
  to it or are ignored), and the User-Agent never stands in for the token's client id;
- MTD pushes arriving out of order (an older "low" after a "high") change nothing, in the SQLite
  store and in Redis; a push about one device changes no other;
- floods of unique invalid tokens and unknown devices keep every cache and label set bounded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import mitmproxy.ctx
import pytest

from gateway.app.demo import (
    ALEX_IPHONE,
    BLAKE_ANDROID,
    DREW_IPHONE,
    EAS_IDS,
    EXCHANGE,
    OFFICE,
    OUTLOOK_MOBILE,
    TEAMS,
    activesync,
)
from gateway.decision.service import AccessService, utc_now
from gateway.policy.model import ComplianceState, DeviceThreatLevel, ManagedDevice
from gateway.signals import graph as graph_module
from gateway.signals.cache import CachedInventory
from gateway.signals.devices import DeviceInventory, DeviceRecord
from gateway.signals.graph import GraphClient, GraphInventory, GraphSettings
from gateway.signals.sqlite_store import SqliteDeviceStore
from gateway.signals.store import StoreInventory
from gateway.state.redis_state import RedisState
from tests.conftest import Background, Gateway, Ports
from tests.graph_server import managed_device
from tests.helpers.hosts import ACTIVESYNC, MAIL
from tests.helpers.mtd import push, sync
from tests.helpers.reload import own_config, reloading_gateway, save, wait_for_reloads
from tests.helpers.scale_out import Instance
from tests.helpers.shared_state import prefix, record
from tests.helpers.tokens import outlook_token
from tests.redis_server import RedisServer

ALEX_EAS, BLAKE_EAS = EAS_IDS[ALEX_IPHONE], EAS_IDS[BLAKE_ANDROID]
NOT_COMPLIANT = "device not compliant (complianceState: noncompliant)"
UNAVAILABLE = "a signal source is unavailable; try again shortly"
BOUND_ELSEWHERE = "ActiveSync DeviceId is not the device the token was issued to"


@pytest.fixture(scope="module")
def own_gateway(gateway: Gateway, demo_ports: Ports,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Listener, tuple[Any, Any]]]:
    """A gateway of this module's own (the demo config, its own SQLite inventory), started once.
    mitmproxy hands every new connection to the process's current master (``mitmproxy.ctx``), so
    the session's master is put back in place between the tests that use this one (``listener``)."""
    config_dir = own_config(tmp_path_factory.mktemp("signals"), gateway, demo_ports)
    session = (mitmproxy.ctx.master, mitmproxy.ctx.options)
    with Background(lambda: reloading_gateway(config_dir)) as (port, operations):
        ours = (mitmproxy.ctx.master, mitmproxy.ctx.options)
        mitmproxy.ctx.master, mitmproxy.ctx.options = session
        try:
            yield Listener(gateway, port, operations.service, operations.service.inventory.source), ours
        finally:
            mitmproxy.ctx.master, mitmproxy.ctx.options = ours  # it stops as it ran; then the session's is back


@pytest.fixture
def listener(own_gateway: tuple[Listener, tuple[Any, Any]]) -> Iterator[Listener]:
    """This module's gateway, serving for the length of one test; its device source is swapped per
    test for one that fails in a chosen way."""
    running, ours = own_gateway
    session = (mitmproxy.ctx.master, mitmproxy.ctx.options)
    mitmproxy.ctx.master, mitmproxy.ctx.options = ours
    try:
        yield running
    finally:
        mitmproxy.ctx.master, mitmproxy.ctx.options = session


class Listener:
    """A test-built gateway, and its real (seeded SQLite) device source."""

    def __init__(self, gateway: Gateway, port: int, service: AccessService, source: DeviceInventory) -> None:
        self.gateway, self.port, self.service, self.source = gateway, port, service, source

    def sync(self, token: str, path: str = ACTIVESYNC, **kwargs: Any) -> httpx.Response:
        return self.gateway.request(MAIL, path, method="POST", token=token, port=self.port, **kwargs)

    @contextlib.contextmanager
    def inventory(self, cached: CachedInventory) -> Iterator[CachedInventory]:
        previous = self.service.inventory
        self.service.inventory = cached
        try:
            yield cached
        finally:
            self.service.inventory = previous


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _alex_record() -> ManagedDevice:
    return ManagedDevice(device_id=ALEX_IPHONE, display_name="Alex's iPhone", user_principal_name="alex@contoso.test",
                         operating_system="iOS", compliance_state=ComplianceState.compliant,
                         compliance_grace_period_expiration=None, threat_level=DeviceThreatLevel.low,
                         threat_source="demo-mtd", eas_device_id=ALEX_EAS)


# What a broken device source answers, given the id asked and its real record (None: unknown).
GARBAGE: dict[str, Callable[[str, ManagedDevice | None], object]] = {
    "a JSON object instead of a record": lambda d, _: {"azureADDeviceId": d, "complianceState": "compliant"},
    "a string": lambda _d, _r: "compliant",
    "true": lambda _d, _r: True,
    "complianceState as text, not the enum": lambda _d, r: replace(r or _alex_record(), compliance_state="compliant"),
    "threat level as text": lambda _d, r: replace(r or _alex_record(), threat_level="low"),
    "a sync time without a time zone": lambda _d, r: replace(r or _alex_record(), last_sync=datetime(2026, 1, 1)),
    "another device's record (a compliant one)": lambda d, _: replace(_alex_record(),
                                                                        device_id=DREW_IPHONE if d == ALEX_IPHONE
                                                                        else ALEX_IPHONE),
}


class BrokenSource:
    """The real source, answering as ``mode`` says: ``ok``, ``hangs`` (never answers) or a GARBAGE key."""

    name = "broken"

    def __init__(self, real: DeviceInventory) -> None:
        self.real = real
        self.mode = "ok"
        self.calls = 0

    async def managed_device(self, device_id: str) -> ManagedDevice | None:
        self.calls += 1
        answer = await self.real.managed_device(device_id)
        if self.mode == "hangs":
            await asyncio.Event().wait()
        return answer if self.mode == "ok" else GARBAGE[self.mode](device_id, answer)  # type: ignore[return-value]


@pytest.mark.parametrize("mode", ["hangs", *GARBAGE])
def test_a_hanging_or_garbage_device_source_answers_from_its_copy_until_max_staleness_then_503(
        listener: Listener, mode: str) -> None:
    source, clock = BrokenSource(listener.source), Clock()
    cached = CachedInventory(source, ttl=60, miss_ttl=5, max_staleness=300, max_entries=1000, timer=clock,
                             lookup_timeout=0.5)
    alex_token = outlook_token(listener.gateway)
    blake_token = outlook_token(listener.gateway, user="blake@contoso.test", device_id=BLAKE_ANDROID)
    with listener.inventory(cached):
        assert listener.sync(alex_token).status_code == 200  # the twin: a good answer (and the copy)
        source.mode = mode
        clock.now += 61  # past the TTL: the source is asked again and fails
        started = time.monotonic()
        assert listener.sync(alex_token).status_code == 200  # a 61 s old copy: within maxStalenessSeconds
        assert time.monotonic() - started < 3  # a hanging source is waited for 0.5 s, not forever
        clock.now += 2  # past the second in which a failed source is left alone
        calls = source.calls
        never_seen = listener.sync(blake_token)  # no copy of Blake's phone: whatever the source says, no allow
        assert source.calls == calls + 1
        assert never_seen.status_code == 503, never_seen.text
        assert never_seen.json()["error_description"] == UNAVAILABLE
        clock.now += 300  # the copy is now older than maxStalenessSeconds
        stale = listener.sync(alex_token)
        assert stale.status_code == 503, stale.text
        assert stale.json()["error_description"] == UNAVAILABLE
        source.mode = "ok"
        clock.now += 2
        assert listener.sync(alex_token).status_code == 200  # back by itself


@pytest.mark.parametrize(("stored", "status"), [
    pytest.param('{"azureADDeviceId": 7, "complianceState": "compliant"}', 503, id="a record of the wrong types"),
    pytest.param("not json at all", 503, id="not JSON"),
    pytest.param(None, 200, id="the twin: the record as the store wrote it"),
])
def test_an_unreadable_inventory_row_is_an_unavailable_source(listener: Listener, stored: str | None,
                                                              status: int) -> None:
    """A row written by something other than Portcullis (a restore, a hand edit) blocks with 503,
    never a 500 that skips the staleness rules, and never an allow."""
    device_id = str(uuid.uuid4())
    store = listener.service.store
    assert isinstance(store, SqliteDeviceStore)
    store.upsert(DeviceRecord.model_validate_json(json.dumps({
        "azureADDeviceId": device_id, "operatingSystem": "iOS", "complianceState": "compliant",
        "threatLevel": "secured", "threatSource": "demo-mtd"})), now=utc_now())
    if stored is not None:
        with contextlib.closing(sqlite3.connect(store.path)) as db, db:
            db.execute("UPDATE devices SET record = ? WHERE device_id = ?", (stored, device_id))
    fresh = CachedInventory(listener.source, ttl=60, miss_ttl=5, max_staleness=300, max_entries=1000)
    with listener.inventory(fresh):  # not one a test before left failing for a second
        answer = listener.sync(outlook_token(listener.gateway, device_id=device_id))
    assert answer.status_code == status, answer.text
    if status == 503:
        assert answer.json()["error_description"] == UNAVAILABLE


# ---------------------------------------------------------------------------------------------
# Microsoft Graph answering garbage (at the HTTP level, Graph's real payload shapes)

GRAPH_URL = "https://graph.microsoft.test/v1.0"
TOKEN_URL = "https://login.microsoftonline.test/c0a7e1d5-0000-4000-8000-00000000c0de/oauth2/v2.0/token"
ELSEWHERE = "https://collector.example.test/steal"


def graph_page(*items: object, **extra: object) -> httpx.Response:
    return httpx.Response(200, json={"@odata.context": f"{GRAPH_URL}/$metadata#deviceManagement/managedDevices",
                                     "value": list(items), **extra})


def wanted_device(request: httpx.Request) -> str:
    return request.url.params["$filter"].removeprefix("azureADDeviceId eq '").rstrip("'")


def _raw_page(content: bytes) -> httpx.Response:
    return httpx.Response(200, content=content, headers={"Content-Type": "application/json"})


async def slow(request: httpx.Request) -> httpx.Response:
    await asyncio.sleep(5)
    return graph_page(managed_device(1, azureADDeviceId=wanted_device(request)))


GRAPH_ANSWERS: dict[str, tuple[Callable[[httpx.Request], Any], int]] = {
    "the twin: Graph's own shape": (lambda r: graph_page(managed_device(1, azureADDeviceId=wanted_device(r))), 200),
    "Graph unreachable": (lambda r: (_ for _ in ()).throw(httpx.ConnectError("refused", request=r)), 503),
    "not JSON": (lambda _: httpx.Response(200, text="<html>Service unavailable</html>"), 503),
    "a JSON list": (lambda r: httpx.Response(200, json=[managed_device(1, azureADDeviceId=wanted_device(r))]), 503),
    "value is null": (lambda _: httpx.Response(200, json={"value": None}), 503),
    "value is a string": (lambda _: httpx.Response(200, json={"value": "devices"}), 503),
    "value holds numbers": (lambda _: httpx.Response(200, json={"value": [1, 2]}), 503),
    "@odata.nextLink to another host": (lambda _: graph_page(**{"@odata.nextLink": ELSEWHERE}), 503),
    "@odata.nextLink not a string": (lambda _: graph_page(**{"@odata.nextLink": 42}), 503),
    "fields of the wrong types": (lambda r: graph_page(managed_device(1, azureADDeviceId=wanted_device(r),
                                                                      complianceState=42,
                                                                      lastSyncDateTime="yesterday")), 403),
    "another device's record": (lambda _: graph_page(managed_device(1)), 403),
    "slower than the lookup may wait": (slow, 403),
    "value named twice, the device last": (lambda r: _raw_page(
        b'{"value": [], ' + graph_page(managed_device(1, azureADDeviceId=wanted_device(r))).content[1:]), 503),
    "in UTF-16": (lambda r: _raw_page(
        graph_page(managed_device(1, azureADDeviceId=wanted_device(r))).content.decode().encode("utf-16")), 503),
    "nested 20,000 deep": (lambda r: _raw_page(
        graph_page(managed_device(1, azureADDeviceId=wanted_device(r))).content[:-1] + b', "x": '
        + b"[" * 20_000 + b"]" * 20_000 + b"}"), 503),
}



class FakeGraph:
    """Microsoft Graph for the connector, over httpx's transport: the v2.0 token endpoint, and
    ``managedDevices`` answering as the test says. Keeps every request it was sent."""

    def __init__(self, answer: Callable[[httpx.Request], Any]) -> None:
        self.answer = answer
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path.endswith("/oauth2/v2.0/token"):
            return httpx.Response(200, json={"token_type": "Bearer", "expires_in": 3599, "access_token": "t1"})
        answer = self.answer(request)
        return await answer if asyncio.iscoroutine(answer) else answer


@pytest.mark.parametrize("answer", GRAPH_ANSWERS)
def test_graph_answering_garbage_never_allows_and_its_token_never_leaves_graph(
        listener: Listener, monkeypatch: pytest.MonkeyPatch, answer: str) -> None:
    """A device the local inventory does not know is looked up in Graph: a broken answer is a
    source that cannot answer (503), a device it cannot vouch for is unknown (403)."""
    respond, expected = GRAPH_ANSWERS[answer]
    monkeypatch.setattr(graph_module, "MISS_LOOKUP_SECONDS", 0.3)
    device_id = str(uuid.uuid4())
    fake = FakeGraph(respond)
    settings = GraphSettings(token_url=TOKEN_URL, graph_url=GRAPH_URL, client_id="portcullis-connector",
                             client_secret="connector-secret-0123456789", lookups_per_second=100)
    store = listener.service.store
    assert isinstance(store, SqliteDeviceStore)
    client = GraphClient(settings, transport=httpx.MockTransport(fake))
    inventory = GraphInventory(store, StoreInventory(store), client, clock=utc_now)
    cached = CachedInventory(inventory, ttl=60, miss_ttl=5, max_staleness=300, max_entries=1000)
    with listener.inventory(cached):
        started = time.monotonic()
        answered = listener.sync(outlook_token(listener.gateway, device_id=device_id))
    assert answered.status_code == expected, answered.text
    assert time.monotonic() - started < 3
    assert any(r.url.path.endswith("/managedDevices") for r in fake.requests)  # Graph was really asked
    assert not [r for r in fake.requests if r.url.host == "collector.example.test"]
    assert all(r.url.host.endswith(".microsoft.test") or r.url.host.endswith("microsoftonline.test")
               for r in fake.requests)
    if expected != 200:
        assert "backend" not in answered.text
        assert store.managed_device(device_id) is None
        assert store.managed_device(managed_device(1)["azureADDeviceId"]) is None  # nothing else stored either


# ---------------------------------------------------------------------------------------------
# Reloads: no allow-all window


@pytest.mark.slow
def test_no_request_of_a_blocked_user_is_allowed_while_configs_are_reloaded(gateway: Gateway, tmp_path: Path,
                                                                           demo_ports: Ports) -> None:
    """Blake's noncompliant phone hammers OWA and ActiveSync (and Alex, the twin, syncs) while
    invalid configs are saved and refused and valid ones are applied (tests/test_reload.py covers
    each refusal on its own; this covers the requests in between)."""
    config_dir = own_config(tmp_path, gateway, demo_ports)
    policies = config_dir / "policies.yaml"
    original = policies.read_text()
    renamed = original.replace('displayName: "Exchange:', 'displayName: "Exchange (v2):', 1)
    invalid = {
        "half-written (the first policy only)": original[:original.index("  - name: owa-compliant-device")],
        "every policy disabled": original.replace("state: enabled", "state: disabled"),
        "every policy report-only": original.replace("state: enabled", "state: reportOnly"),
        "no policies": "policies: []\n",
        "not YAML": original + "\n  - [unclosed\n",
        "a typo in a state": original.replace("    state: enabled\n", "    state: enabeld\n", 1),
        "an empty file": "",
    }
    blake = gateway.idp.mint(user="blake@contoso.test", client_id=OFFICE, audience=EXCHANGE, device_id=BLAKE_ANDROID)
    blake_sync = outlook_token(gateway, user="blake@contoso.test", device_id=BLAKE_ANDROID)
    alex_token = outlook_token(gateway)
    seen: dict[str, Counter[object]] = {"blake": Counter(), "alex": Counter()}
    stop = threading.Event()

    def hammer(who: str, path: str, token: str, method: str) -> None:
        with gateway.client() as client:
            while not stop.is_set():
                try:
                    answer = client.request(method, f"https://127.0.0.1:{port}{path}",
                                            headers={"Host": MAIL, "Authorization": f"Bearer {token}"},
                                            extensions={"sni_hostname": MAIL})
                    seen[who][answer.status_code] += 1
                except httpx.HTTPError as error:
                    seen[who][type(error).__name__] += 1

    with Background(lambda: reloading_gateway(config_dir)) as (port, operations):
        workers = [threading.Thread(target=hammer, args=args) for args in (
            ("blake", "/owa/", blake, "GET"), ("blake", activesync(BLAKE_ANDROID, "blake"), blake_sync, "POST"),
            ("alex", activesync(ALEX_IPHONE), alex_token, "POST"))]
        for worker in workers:
            worker.start()
        reloads = 0
        try:
            for name, text in invalid.items():
                save(policies, text)
                reloads += 1
                wait_for_reloads(operations, reloads)
                assert operations.reloader.last is not None and not operations.reloader.last.applied, name
                for text_ok in (renamed, original):  # valid reloads, applied
                    save(policies, text_ok)
                    reloads += 1
                    wait_for_reloads(operations, reloads)
                    assert operations.reloader.last is not None and operations.reloader.last.applied, name
            policies.unlink()  # a file deleted by mistake, then put back
            reloads += 1
            wait_for_reloads(operations, reloads)
            assert operations.reloader.last is not None and not operations.reloader.last.applied
            save(policies, original)
        finally:
            stop.set()
            for worker in workers:
                worker.join(15)
    assert set(seen["blake"]) == {403}, seen  # not one 200 (nor 5xx) while the rules changed under it
    assert set(seen["alex"]) == {200}, seen
    assert seen["blake"][403] > 50 and seen["alex"][200] > 20


# ---------------------------------------------------------------------------------------------
# The device is the token's


def _base64_query(device_id: bytes) -> str:
    """MS-ASHTTP's base64 query: version, command (Sync), locale, DeviceId, no policy key, DeviceType."""
    raw = bytes([141, 0, 9, 4, len(device_id)]) + device_id + bytes([0, 6]) + b"iPhone"
    return base64.b64encode(raw).decode()


FORGED_DEVICE_HEADERS = {"X-Device-Id": ALEX_IPHONE, "X-MS-Device-Id": ALEX_IPHONE,
                         "X-Portcullis-Device-Id": ALEX_IPHONE, "MS-ASDeviceId": ALEX_EAS,
                         "X-Intune-Device-Id": ALEX_IPHONE,
                         "User-Agent": f"Outlook-iOS/2.0 (Alex's iPhone; DeviceId {ALEX_EAS}; compliant)"}
SYNC = "/Microsoft-Server-ActiveSync?Cmd=Sync&User=u&DeviceType=iPhone"


@pytest.mark.parametrize(
    ("device_id", "path", "headers", "reason"),
    [
        pytest.param(BLAKE_ANDROID, f"{SYNC}&DeviceId={ALEX_EAS}", {}, BOUND_ELSEWHERE,
                     id="DeviceId of a compliant phone, token of a noncompliant one"),
        pytest.param(None, f"{SYNC}&DeviceId={ALEX_EAS}", {}, BOUND_ELSEWHERE,
                     id="DeviceId of a compliant phone, token without a device"),
        pytest.param(ALEX_IPHONE, f"{SYNC}&DeviceId={ALEX_EAS}&deviceid={BLAKE_EAS}", {},
                     BOUND_ELSEWHERE, id="two DeviceIds, one of them the token's"),
        pytest.param(ALEX_IPHONE, f"/Microsoft-Server-ActiveSync?{_base64_query(BLAKE_EAS.encode())}", {},
                     BOUND_ELSEWHERE, id="base64 query naming another phone"),
        pytest.param(None, f"{SYNC}&DeviceId=", {}, "ActiveSync query unreadable: empty DeviceId",
                     id="empty DeviceId, token without a device"),
        pytest.param(BLAKE_ANDROID, SYNC, FORGED_DEVICE_HEADERS, NOT_COMPLIANT,
                     id="headers and User-Agent naming a compliant phone, token of a noncompliant one"),
        pytest.param(None, SYNC, FORGED_DEVICE_HEADERS, "device not identified (the token has no deviceid claim)",
                     id="headers and User-Agent naming a compliant phone, token without a device"),
    ],
)
def test_the_device_decided_on_is_the_one_the_token_vouches_for(gateway: Gateway, device_id: str | None, path: str,
                                                                headers: dict[str, str], reason: str) -> None:
    token = outlook_token(gateway, device_id=device_id)
    answer = gateway.request(MAIL, path, method="POST", token=token, headers=headers)
    assert (answer.status_code, answer.json()["reason"]) == (403, reason), answer.text
    twin = gateway.request(MAIL, f"{SYNC}&DeviceId={ALEX_EAS}", method="POST", token=outlook_token(gateway),
                           headers={**FORGED_DEVICE_HEADERS, "X-Device-Id": BLAKE_ANDROID})
    assert twin.status_code == 200  # the token's own phone, with its own DeviceId: whatever headers say
    assert twin.json()["receivedHeaders"]["x-portcullis-device-id"] == ALEX_IPHONE


def test_an_empty_activesync_deviceid_never_matches_a_device_registered_without_one(listener: Listener) -> None:
    """A compliant laptop has no ActiveSync id: a Sync naming an empty DeviceId must not pass the
    binding as "the same (empty) id"."""
    laptop = str(uuid.uuid4())
    store = listener.service.store
    assert isinstance(store, SqliteDeviceStore)
    store.upsert(DeviceRecord.model_validate_json(json.dumps({
        "azureADDeviceId": laptop, "deviceName": "Alex's laptop", "operatingSystem": "Windows",
        "complianceState": "compliant", "threatLevel": "secured", "threatSource": "demo-mtd"})), now=utc_now())
    token = outlook_token(listener.gateway, device_id=laptop)
    refused = listener.sync(token, f"{SYNC}&DeviceId=")
    assert (refused.status_code, refused.json()["reason"]) == (403, "ActiveSync query unreadable: empty DeviceId")
    assert listener.sync(token, SYNC).status_code == 200  # the twin: the laptop without a DeviceId


# ---------------------------------------------------------------------------------------------
# The User-Agent never stands in for the client id

OUTLOOK_LOOK = {"User-Agent": "Outlook-iOS/2.0", "X-MS-Client-Application": "Outlook",
                "X-Client-Application": "Outlook-iOS", "MS-ASProtocolVersion": "16.1"}


@pytest.mark.parametrize(
    ("client_id", "extra", "path"),
    [
        pytest.param(TEAMS, None, activesync(ALEX_IPHONE).replace("DeviceType=iPhone", "DeviceType=Outlook"),
                     id="Teams token, Outlook User-Agent and DeviceType"),
        pytest.param("", None, activesync(ALEX_IPHONE), id="token without a client id, Outlook User-Agent"),
        pytest.param("outlook-mobile", None, activesync(ALEX_IPHONE),
                     id="token whose client id is the app's configured name"),
        pytest.param(TEAMS, {"appid": OUTLOOK_MOBILE}, activesync(ALEX_IPHONE),
                     id="azp of Teams with a v1 appid of Outlook"),
        pytest.param(TEAMS, None, "/EWS/Exchange.asmx", id="Teams token at EWS, Outlook User-Agent"),
    ],
)
def test_the_user_agent_never_passes_for_an_approved_app(gateway: Gateway, client_id: str,
                                                         extra: dict[str, object] | None, path: str) -> None:
    token = gateway.idp.mint(user="alex@contoso.test", client_id=client_id, audience=EXCHANGE, device_id=ALEX_IPHONE,
                             extra=extra)
    answer = gateway.request(MAIL, path, method="POST", token=token, headers=OUTLOOK_LOOK)
    assert (answer.status_code, answer.json()["reason"]) == (403, "app not approved"), answer.text
    twin = gateway.request(MAIL, path, method="POST", token=outlook_token(gateway),
                           headers={"User-Agent": "Mozilla/5.0 (Windows NT 10.0) Teams/1.7"})
    assert twin.status_code == 200  # Outlook's client id passes whatever its User-Agent says


# ---------------------------------------------------------------------------------------------
# MTD pushes out of order


def event(device_id: str, level: str, reported: datetime | None = None) -> str:
    item: dict[str, object] = {"deviceId": device_id, "threatLevel": level, "eventId": str(uuid.uuid4())}
    if reported is not None:
        item["reportedDateTime"] = reported.isoformat()
    return json.dumps({"events": [item]})


@pytest.mark.usefixtures("restore_alex")
def test_an_older_verdict_arriving_after_a_newer_one_changes_nothing(gateway: Gateway) -> None:
    raised_at = datetime.now(UTC)
    assert push(gateway, event(ALEX_IPHONE, "highSeverity", raised_at)).status_code == 202
    assert sync(gateway).status_code == 403
    late = {
        "an older low, with its event time": event(ALEX_IPHONE, "lowSeverity", raised_at - timedelta(seconds=30)),
        "an older clear (deactivated)": event(ALEX_IPHONE, "deactivated", raised_at - timedelta(seconds=20)),
        "an older secured, a microsecond before": event(ALEX_IPHONE, "secured", raised_at - timedelta(microseconds=1)),
    }
    for name, body in late.items():
        answer = push(gateway, body)
        assert answer.status_code == 202, name  # acknowledged: resending it would change nothing either
        assert answer.json()["accepted"] == 1, name
        assert sync(gateway).status_code == 403, name
    signed_earlier = push(gateway, event(ALEX_IPHONE, "low"), timestamp=int(raised_at.timestamp()) - 60)
    assert signed_earlier.status_code == 202  # no event time: its signed timestamp orders it (a minute old)
    assert sync(gateway).status_code == 403
    assert push(gateway, event(ALEX_IPHONE, "low", datetime.now(UTC))).status_code == 202  # the twin: newer
    assert sync(gateway).status_code == 200


@pytest.mark.parametrize(
    ("reported", "message"),
    [("yesterday", "must be an ISO 8601 time with a time zone"),
     ("2026-11-23T12:00:00", "must be an ISO 8601 time with a time zone"),
     (7, "must be an ISO 8601 time with a time zone"),
     (timedelta(hours=1), "is ahead of the gateway's clock")],
    ids=["words", "no time zone", "a number", "an hour ahead"],  # the same names in every pytest-xdist worker
)
def test_an_event_time_that_cannot_be_ordered_is_refused(gateway: Gateway, reported: object, message: str) -> None:
    if isinstance(reported, timedelta):  # from now: a time taken at collection would name the test differently
        reported = (datetime.now(UTC) + reported).isoformat()
    body = json.dumps({"events": [{"deviceId": ALEX_IPHONE, "threatLevel": "high", "reportedDateTime": reported}]})
    answer = push(gateway, body)
    assert answer.status_code == 400 and message in answer.json()["error"]
    assert sync(gateway).status_code == 200


def test_a_push_about_one_device_changes_no_other(gateway: Gateway) -> None:
    """A partner's verdict lands on the device it names, by its Entra id: never on the device of
    whoever is asking, never on a device named by its ActiveSync id, never on an unknown one."""
    drew = outlook_token(gateway, user="drew@contoso.test", device_id=DREW_IPHONE)
    body = json.dumps({"events": [{"deviceId": EAS_IDS[ALEX_IPHONE], "threatLevel": "high"},
                                  {"deviceId": "ffffffff-0000-4000-8000-000000000000", "threatLevel": "high"},
                                  {"deviceId": DREW_IPHONE.upper(), "threatLevel": "high"}]})
    answer = push(gateway, body)
    unknown = [ALEX_EAS.lower(), "ffffffff-0000-4000-8000-000000000000"]
    assert answer.json() == {"accepted": 1, "unknownDevices": unknown, "ignored": []}
    assert sync(gateway).status_code == 200  # Alex's phone, named by its ActiveSync id: unchanged
    drew_sync = gateway.request(MAIL, activesync(DREW_IPHONE, "drew"), method="POST", token=drew)
    assert (drew_sync.status_code, drew_sync.json()["reason"]) == (403, "device risk high, allowed: low")


def sqlite_store(tmp_path: Path, _redis: RedisServer | None) -> Any:
    return SqliteDeviceStore(tmp_path / "devices.sqlite")


def redis_store(_tmp_path: Path, redis: RedisServer | None) -> Any:
    assert redis is not None
    return RedisState.from_url(redis.url, prefix=prefix()).devices


@pytest.mark.parametrize("make", [sqlite_store, redis_store], ids=["sqlite", "redis"])
def test_both_stores_order_a_partners_verdicts_by_their_report_time(request: pytest.FixtureRequest, tmp_path: Path,
                                                                    make: Callable[..., Any]) -> None:
    redis = request.getfixturevalue("redis_server") if make is redis_store else None
    store = make(tmp_path, redis)
    device = "ab000000-0000-4000-8000-000000000001"
    base = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    store.replace_all([record(device)], now=base)

    def level() -> DeviceThreatLevel | None:
        found = store.managed_device(device)
        return found.threat_level if found is not None else None

    steps: list[tuple[str, float, DeviceThreatLevel | None, DeviceThreatLevel | None, bool]] = [
        ("high at +10", 10, DeviceThreatLevel.high, DeviceThreatLevel.high, True),
        ("low at +5 arrives late", 5, DeviceThreatLevel.low, DeviceThreatLevel.high, False),
        ("cleared at +20", 20, None, None, True),
        ("high at +15 arrives after the clear", 15, DeviceThreatLevel.high, None, False),
        ("secured at +20, as old as the clear", 20, DeviceThreatLevel.secured, DeviceThreatLevel.secured, True),
        ("medium at +30", 30, DeviceThreatLevel.medium, DeviceThreatLevel.medium, True),
    ]
    for name, seconds, given, expected, changes in steps:
        changed, unknown = store.apply_verdicts("lookout", [(device, given)], now=base + timedelta(seconds=seconds))
        assert (level(), bool(changed), unknown) == (expected, changes, []), name
    other_partner, _ = store.apply_verdicts("zimperium", [(device, DeviceThreatLevel.low)], now=base)
    assert other_partner == {device}  # each partner's order is its own
    assert store.partner_contacts()["lookout"] == base + timedelta(seconds=30)  # contact never moves back
    store.close()


def test_an_older_verdict_pushed_to_one_gateway_does_not_undo_a_newer_one_at_the_other(
        pair: tuple[Instance, Instance],
        alex: str,
) -> None:
    """Two gateways sharing Redis: the order is kept by the shared store, whichever gateway a push reaches."""
    first, second = pair
    raised_at = datetime.now(UTC)
    assert first.push(event(ALEX_IPHONE, "highSeverity", raised_at)).status_code == 202
    second.process.wait_until(lambda: second.sync(alex) == 403, timeout=2)
    assert second.push(event(ALEX_IPHONE, "lowSeverity", raised_at - timedelta(seconds=10))).status_code == 202
    time.sleep(0.5)  # a change would have reached both gateways by now
    assert (first.sync(alex), second.sync(alex)) == (403, 403)
    assert second.push(event(ALEX_IPHONE, "lowSeverity", datetime.now(UTC))).status_code == 202  # the twin
    first.process.wait_until(lambda: first.sync(alex) == 200, timeout=2)


# ---------------------------------------------------------------------------------------------
# Floods


def tampered(token: str, salt: str) -> str:
    """The same header and claims, another (invalid) signature: unique per ``salt``."""
    head, claims, _ = token.split(".")
    return f"{head}.{claims}.{base64.urlsafe_b64encode(salt.encode() * 8).rstrip(b'=').decode()}"


@pytest.mark.slow
def test_a_flood_of_unique_invalid_tokens_and_unknown_devices_stays_bounded(listener: Listener) -> None:
    gateway, service = listener.gateway, listener.service
    bound = 200  # deviceSignals.cache.maxEntries of this gateway (the config's lowest allowed value is 100)
    cached = CachedInventory(listener.source, ttl=60, miss_ttl=5, max_staleness=300, max_entries=bound)
    valid = outlook_token(gateway)
    unknown_devices = [str(uuid.uuid4()) for _ in range(1200)]
    flood = [tampered(valid, str(i)) for i in range(400)]  # a known kid, a wrong signature
    flood += [f"eyJ{uuid.uuid4().hex}.{uuid.uuid4().hex}.{uuid.uuid4().hex}" for _ in range(300)]  # malformed
    flood += [outlook_token(gateway, lifetime=-600, user=f"u{i}@contoso.test") for i in range(100)]  # expired
    flood += [outlook_token(gateway, device_id=d) for d in unknown_devices]  # valid, each a device no one knows
    tokens_before = len(service.validator._verified)
    statuses: Counter[int] = Counter()

    def send(chunk: list[str]) -> None:
        with gateway.client() as client:
            for token in chunk:
                answer = client.post(f"https://127.0.0.1:{listener.port}{ACTIVESYNC}",
                                     headers={"Host": MAIL, "Authorization": f"Bearer {token}"},
                                     extensions={"sni_hostname": MAIL})
                statuses[answer.status_code] += 1

    with listener.inventory(cached):
        workers = [threading.Thread(target=send, args=(flood[i::4],)) for i in range(4)]
        for worker in workers:
            worker.start()
        twin = [listener.sync(valid).status_code for _ in range(5)]  # a valid user meanwhile
        for worker in workers:
            worker.join(120)
        assert listener.sync(valid).status_code == 200
        assert twin == [200] * 5
        assert statuses == {401: 800, 403: 1200}, statuses
        assert len(cached._fresh) <= bound and len(cached._last_good) <= bound  # LRU and TTL caches, bounded
        assert len(cached._misses) <= max(1024, bound // 10) < len(unknown_devices)
        assert not cached._in_flight
    verified = service.validator._verified
    assert len(verified) - tokens_before <= len(unknown_devices) + 1  # invalid tokens are never cached
    assert len(verified) <= verified.maxsize
    log = service.decision_log
    assert len(log._recent) == log._recent.maxlen  # full: the newest records only
    assert len(log._pending) <= log._queue_size
    addons = mitmproxy.ctx.master.addons
    assert not addons.get("continuousaccess").open_flows and not addons.get("drain").in_flight
    label_sets = {(sample.name, tuple(sorted(sample.labels.items())))
                  for family in service.metrics.registry.collect() for sample in family.samples}
    values = {value for _, labels in label_sets for _, value in labels}
    assert not values & set(unknown_devices) and not any(v.startswith("eyJ") for v in values)
    assert len(label_sets) < 120, sorted(label_sets)  # a fixed vocabulary, not one per client value
