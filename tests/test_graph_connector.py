"""The Graph connector against a local server that speaks Graph's shapes over real HTTP: client
credentials, paging, throttling, per-device lookups for misses (rate-limited), full sync."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.errors import SignalUnavailable
from gateway.policy.model import AppRegistration, ComplianceState, DeviceThreatLevel
from gateway.signals.app_protection import parse_registrations
from gateway.signals.app_registrations_sqlite import SqliteAppRegistrations
from gateway.signals.cache import CachedInventory
from gateway.signals.graph import RECHECK_FIRST_SECONDS, GraphClient, GraphInventory, device_record
from gateway.signals.sqlite_store import SqliteDeviceStore
from gateway.signals.store import StoreInventory
from tests.graph_server import GraphState, app_registration, managed_device, serving, settings
from tests.helpers.signals import Clock

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def run(state: GraphState, scenario):
    async def main():
        async with serving(state) as base:
            return await scenario(base)

    return asyncio.run(main())


def test_full_sync_pages_through_throttling_into_the_store(tmp_path: Path) -> None:
    state = GraphState(devices=[managed_device(i) for i in range(5)] + [
        managed_device(5, complianceState="noncompliant", jailBroken="True", partnerReportedThreatState="highSeverity"),
        managed_device(6, azureADDeviceId="00000000-0000-0000-0000-000000000000"),  # not Entra-registered
    ], throttle=[429, 503])
    store = SqliteDeviceStore(tmp_path / "d.sqlite")
    store.replace_all([device_record(managed_device(99))], now=NOW)  # gone from Intune: pruned

    async def scenario(base: str) -> int:
        client = GraphClient(settings(base))
        try:
            return await GraphInventory(store, StoreInventory(store), client, clock=lambda: NOW).full_sync()
        finally:
            await client.close()

    assert run(state, scenario) == 6
    assert store.count() == 6
    assert len(state.requests) == 2 + 4  # two throttled answers, then four pages of two
    assert "%24select=" in state.requests[0]
    assert state.tokens_issued == 1
    risky = store.managed_device("aa000000-0000-4000-8000-000000000005")
    assert risky is not None
    assert (risky.compliance_state, risky.jail_broken, risky.threat_level, risky.threat_source) == \
        (ComplianceState.noncompliant, True, DeviceThreatLevel.high, "graph")
    assert store.managed_device("aa000000-0000-4000-8000-000000000099") is None


def test_a_miss_is_looked_up_in_graph_once_and_stored(tmp_path: Path) -> None:
    state = GraphState(devices=[managed_device(1)])
    store = SqliteDeviceStore(tmp_path / "d.sqlite")

    async def scenario(base: str) -> tuple[object, object, int]:
        client = GraphClient(settings(base))
        inventory = GraphInventory(store, StoreInventory(store), client, clock=lambda: NOW)
        try:
            found = await inventory.managed_device("AA000000-0000-4000-8000-000000000001")
            again = await inventory.managed_device("aa000000-0000-4000-8000-000000000001")
            missing = await inventory.managed_device("aa000000-0000-4000-8000-000000000404")
            return found, again, missing is None
        finally:
            await client.close()

    found, again, missing = run(state, scenario)
    assert found is not None and again == found and missing
    assert sum("%24filter" in r for r in state.requests) == 2  # the second lookup was local


def test_a_device_first_seen_undecided_is_asked_about_again_and_recovers_with_graph(tmp_path: Path) -> None:
    """Graph first lists the device without a compliance state (a broken answer: stored as
    complianceState unknown, so blocked). It is asked about again on a schedule of its own (15 s,
    then twice as long while Graph still cannot say or fails) and is compliant as soon as Graph
    says so, through the gateway's cache too: not at the next full sync, 15 minutes on."""
    device_id = managed_device(1)["azureADDeviceId"]
    state = GraphState(devices=[managed_device(1, complianceState=None)])
    store = SqliteDeviceStore(tmp_path / "d.sqlite")
    clock = Clock()

    async def scenario(base: str) -> list[tuple[str, int]]:
        client = GraphClient(settings(base, rate=100))
        graph = GraphInventory(store, StoreInventory(store), client, clock=lambda: NOW, timer=clock)
        cached = CachedInventory(graph, ttl=60, miss_ttl=5, max_staleness=300, max_entries=1000, timer=clock)
        seen = []
        for seconds, graph_says in [(0, None), (10, None), (6, None), (20, None), (10, "503"), (30, "compliant"),
                                    (24, "compliant"), (6, "compliant"), (30, "compliant")]:
            state.devices = [managed_device(1, complianceState=graph_says if graph_says != "503" else None)]
            state.throttle = [503] * 5 if graph_says == "503" else []
            clock.now += seconds
            before = len(state.requests)
            device = await cached.managed_device(device_id)
            assert device is not None
            seen.append((device.compliance_state.value, len(state.requests) - before))
        await client.close()
        return seen

    assert run(state, scenario) == [
        ("unknown", 1),  # first seen: looked up, stored without a verdict; asked again in 15 s
        ("unknown", 0),  # 10 s: not yet
        ("unknown", 1),  # 16 s: asked again, still nothing; next in 30 s
        ("unknown", 0),  # 36 s: not yet
        ("unknown", 5),  # 46 s: asked again, Graph fails (503 until the client gives up): the stored record
        ("unknown", 0),  # 76 s: Graph is fine again, but the next recheck is at 106 s
        ("unknown", 0),  # 100 s: not yet
        ("compliant", 1),  # 106 s: asked again: compliant
        ("compliant", 0),  # then a decided device, cached for the TTL
    ]
    stored = store.managed_device(device_id)
    assert stored is not None and stored.compliance_state is ComplianceState.compliant


def test_a_device_graph_keeps_answering_unknown_is_left_to_the_full_sync(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """``complianceState: unknown`` is also a lasting state (no compliance policy assigned): once
    Graph has answered it three times in a row (a failure starts the row again) the device is no
    longer rechecked, where it was every 5 minutes for ever, each time with an INFO line. The full
    sync still keeps it current."""
    device_id = managed_device(1)["azureADDeviceId"]
    state = GraphState(devices=[managed_device(1, complianceState="unknown")])
    store = SqliteDeviceStore(tmp_path / "d.sqlite")
    clock = Clock()

    async def scenario(base: str) -> tuple[list[int], object]:
        client = GraphClient(settings(base, rate=100))
        graph = GraphInventory(store, StoreInventory(store), client, clock=lambda: NOW, timer=clock)
        asked = []
        for seconds, graph_fails in [(0, False), (15, True), (30, False), (60, False), (120, False), (240, False),
                                     (300, False), (3600, False)]:
            state.throttle = [503] * 5 if graph_fails else []
            clock.now += seconds
            before = len(state.requests)
            device = await graph.managed_device(device_id)
            assert device is not None and device.compliance_state is ComplianceState.unknown
            asked.append(len(state.requests) - before)
        state.devices = [managed_device(1)]  # a compliance policy assigned: Intune decides the device
        await graph.full_sync()
        decided = await graph.managed_device(device_id)
        await client.close()
        return asked, decided

    with caplog.at_level(logging.DEBUG, "gateway.signals.graph"):
        asked, decided = run(state, scenario)
    assert asked == [
        1,  # 0 s: looked up, "unknown" (1 in a row); asked again in 15 s
        5,  # 15 s: Graph fails (503 until the client gives up): the row starts again; next in 30 s
        1,  # 45 s: "unknown" (1)
        1,  # 105 s: "unknown" (2)
        1,  # 225 s: "unknown" (3): settled
        0, 0, 0,  # 465 s, 765 s, an hour later: not asked again
    ]
    assert decided is not None and decided.compliance_state is ComplianceState.compliant  # by the full sync
    undecided = [(r.levelname, r.getMessage()) for r in caplog.records if "complianceState unknown" in r.getMessage()]
    assert [level for level, _ in undecided] == ["DEBUG"] * 5
    assert undecided[-1][1].endswith("unknown 3 times in a row (no compliance policy assigned?); left to the full sync")


def test_rechecks_of_undecided_devices_leave_lookups_for_devices_never_seen(tmp_path: Path) -> None:
    """Many undecided devices due at once take at most the spare half of lookupsPerSecond: a device
    never seen before is still looked up (and allowed) rather than counted as unknown."""
    undecided = [managed_device(i, complianceState=None) for i in range(10)]
    state = GraphState(devices=[*undecided, managed_device(99)])
    store = SqliteDeviceStore(tmp_path / "d.sqlite")
    store.replace_all([device_record(d) for d in undecided], now=NOW)  # as a full sync stored them
    clock = Clock()

    async def scenario(base: str) -> tuple[list[bool], object]:
        client = GraphClient(settings(base, rate=4))
        graph = GraphInventory(store, StoreInventory(store), client, clock=lambda: NOW, timer=clock)
        try:
            for device in undecided:  # seen undecided: a recheck in 15 s
                await graph.managed_device(device["azureADDeviceId"])
            assert state.requests == []
            clock.now += RECHECK_FIRST_SECONDS  # every one of them due; the bucket full again (4)
            for device in undecided:
                await graph.managed_device(device["azureADDeviceId"])
            asked = [any(d["azureADDeviceId"] in r for r in state.requests) for d in undecided]
            return asked, await graph.managed_device(managed_device(99)["azureADDeviceId"])
        finally:
            await client.close()

    asked, new_device = run(state, scenario)
    assert asked == [True] * 3 + [False] * 7  # rechecks stopped with half the bucket (2 of 4) left
    assert new_device is not None and new_device.compliance_state is ComplianceState.compliant


def test_misses_beyond_the_rate_are_not_looked_up(tmp_path: Path) -> None:
    state = GraphState(devices=[])
    store = SqliteDeviceStore(tmp_path / "d.sqlite")

    async def scenario(base: str) -> None:
        client = GraphClient(settings(base, rate=3))
        inventory = GraphInventory(store, StoreInventory(store), client, clock=lambda: NOW, timer=lambda: 0.0)
        try:
            for i in range(50):
                assert await inventory.managed_device(f"bb000000-0000-4000-8000-{i:012d}") is None
        finally:
            await client.close()

    run(state, scenario)
    assert len(state.requests) == 3


def test_wrong_client_secret_fails_closed(tmp_path: Path) -> None:
    state = GraphState(devices=[managed_device(1)])

    async def scenario(base: str) -> None:
        client = GraphClient(settings(base, secret="wrong-secret-0123456789"))
        try:
            with pytest.raises(SignalUnavailable, match="token request failed"):
                await client.managed_devices()
        finally:
            await client.close()

    run(state, scenario)


def test_endless_throttling_gives_up_with_signal_unavailable() -> None:
    state = GraphState(devices=[managed_device(1)], throttle=[429] * 10)

    async def scenario(base: str) -> None:
        client = GraphClient(settings(base))
        try:
            with pytest.raises(SignalUnavailable, match="Graph answered 429"):
                await client.managed_devices()
        finally:
            await client.close()

    run(state, scenario)


def app_registrations_sync(store: SqliteDeviceStore,
                           apps: SqliteAppRegistrations) -> Callable[[str], Awaitable[int]]:
    """One app registrations sync against the Graph server at ``base``: how many it wrote."""
    async def scenario(base: str) -> int:
        client = GraphClient(settings(base))
        try:
            return await GraphInventory(store, StoreInventory(store), client,
                                        clock=lambda: NOW).sync_app_registrations(apps)
        finally:
            await client.close()
    return scenario


def test_app_registrations_sync_through_paging_and_throttling_in_one_transaction(tmp_path: Path) -> None:
    state = GraphState(devices=[], throttle=[429, 503], app_registrations=[
        app_registration(1), app_registration(2, android=True, flaggedReasons=["rootedDevice"]),
        app_registration(3, appliedPolicies=[]), app_registration(4, lastSyncDateTime="yesterday"),  # unreadable
        app_registration(5, **{"@odata.type": "#microsoft.graph.windowsManagedAppRegistration"}),  # not iOS/Android
    ])
    store = SqliteDeviceStore(tmp_path / "d.sqlite")
    apps = SqliteAppRegistrations(tmp_path / "d.sqlite")  # beside the devices, in the same file
    apps.replace_all([app_registration_gone()], now=NOW)  # Intune no longer lists it: pruned

    assert run(state, app_registrations_sync(store, apps)) == 3
    registrations = {r.registration_id: r for r in apps.registrations()}
    assert sorted(registrations) == ["android-registration-2", "ios-registration-1", "ios-registration-3"]
    ios, android = registrations["ios-registration-1"], registrations["android-registration-2"]
    assert (ios.app_identifier, ios.platform, ios.user_id, ios.device_tag, ios.applied_policies,
            ios.last_sync) == ("com.microsoft.office.outlook", "iOS", "0b000000-0000-4000-8000-000000000001",
                               "tag-1", ("Mail apps",), datetime(2026, 11, 23, 8, 0, tzinfo=UTC))
    assert (android.platform, android.flagged_reasons) == ("android", ("rootedDevice",))
    assert registrations["ios-registration-3"].applied_policies == ()
    assert len(state.requests) == 2 + 3  # two throttled answers, then three pages of two
    assert "%24expand=appliedPolicies" in state.requests[0]


def test_a_full_sync_brings_the_app_registrations_with_the_devices(tmp_path: Path) -> None:
    state = GraphState(devices=[managed_device(1)], app_registrations=[app_registration(1)])
    store = SqliteDeviceStore(tmp_path / "d.sqlite")
    apps = SqliteAppRegistrations(tmp_path / "d.sqlite")

    async def scenario(base: str) -> int:
        client = GraphClient(settings(base))
        try:
            return await GraphInventory(store, StoreInventory(store), client, clock=lambda: NOW, apps=apps).full_sync()
        finally:
            await client.close()

    assert run(state, scenario) == 1
    assert [r.registration_id for r in apps.registrations()] == ["ios-registration-1"]


def app_registration_gone() -> AppRegistration:
    """A registration Intune does not list (the demo seed's first)."""
    path = Path(__file__).parent.parent / "config" / "app-registrations.yaml"
    return parse_registrations(path)[0]


def test_an_empty_app_registrations_answer_prunes_nothing(tmp_path: Path) -> None:
    apps = SqliteAppRegistrations(tmp_path / "d.sqlite")
    apps.replace_all([app_registration_gone()], now=NOW)
    store = SqliteDeviceStore(tmp_path / "d.sqlite")

    assert run(GraphState(devices=[]), app_registrations_sync(store, apps)) == 0
    assert apps.count() == 1


def test_app_registrations_with_a_wrong_client_secret_fail_clearly(tmp_path: Path) -> None:
    async def scenario(base: str) -> None:
        client = GraphClient(settings(base, secret="wrong-secret-0123456789"))
        try:
            with pytest.raises(SignalUnavailable, match="Graph token request failed"):
                await client.managed_app_registrations()
        finally:
            await client.close()

    run(GraphState(devices=[], app_registrations=[app_registration(1)]), scenario)
