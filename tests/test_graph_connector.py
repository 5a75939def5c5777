"""The Graph connector against a local server that speaks Graph's shapes over real HTTP: client
credentials, paging, throttling, per-device lookups for misses (rate-limited), full sync."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.errors import SignalUnavailable
from gateway.policy.model import ComplianceState, DeviceThreatLevel
from gateway.signals.graph import GraphClient, GraphInventory, GraphSettings, device_record
from gateway.signals.sqlite_store import DeviceStore, SqliteInventory
from tests.graph_server import CLIENT_ID, CLIENT_SECRET, TENANT, GraphState, managed_device, serving

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def settings(base: str, *, secret: str = CLIENT_SECRET, rate: float = 5) -> GraphSettings:
    return GraphSettings(token_url=f"{base}/{TENANT}/oauth2/v2.0/token", graph_url=f"{base}/v1.0",
                         client_id=CLIENT_ID, client_secret=secret, lookups_per_second=rate)


def run(state: GraphState, scenario):  # noqa: ANN001, ANN201  (test helper)
    async def main():  # noqa: ANN202
        async with serving(state) as base:
            return await scenario(base)

    return asyncio.run(main())


def test_full_sync_pages_through_throttling_into_the_store(tmp_path: Path) -> None:
    state = GraphState(devices=[managed_device(i) for i in range(5)] + [
        managed_device(5, complianceState="noncompliant", jailBroken="True", partnerReportedThreatState="highSeverity"),
        managed_device(6, azureADDeviceId="00000000-0000-0000-0000-000000000000"),  # not Entra-registered
    ], throttle=[429, 503])
    store = DeviceStore(tmp_path / "d.sqlite")
    store.replace_all([device_record(managed_device(99))], now=NOW)  # gone from Intune: pruned

    async def scenario(base: str) -> int:
        client = GraphClient(settings(base))
        try:
            return await GraphInventory(store, SqliteInventory(store), client, clock=lambda: NOW).full_sync()
        finally:
            await client.close()

    assert run(state, scenario) == 6
    assert store.count() == 6
    assert len(state.requests) == 2 + 4  # two throttled answers, then four pages of two
    assert "%24select=azureADDeviceId" in state.requests[0]
    assert state.tokens_issued == 1
    risky = store.managed_device("aa000000-0000-4000-8000-000000000005")
    assert risky is not None
    assert (risky.compliance_state, risky.jail_broken, risky.threat_level, risky.threat_source) == \
        (ComplianceState.noncompliant, True, DeviceThreatLevel.high, "graph")
    assert store.managed_device("aa000000-0000-4000-8000-000000000099") is None


def test_a_miss_is_looked_up_in_graph_once_and_stored(tmp_path: Path) -> None:
    state = GraphState(devices=[managed_device(1)])
    store = DeviceStore(tmp_path / "d.sqlite")

    async def scenario(base: str) -> tuple[object, object, int]:
        client = GraphClient(settings(base))
        inventory = GraphInventory(store, SqliteInventory(store), client, clock=lambda: NOW)
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


def test_misses_beyond_the_rate_are_not_looked_up(tmp_path: Path) -> None:
    state = GraphState(devices=[])
    store = DeviceStore(tmp_path / "d.sqlite")

    async def scenario(base: str) -> None:
        client = GraphClient(settings(base, rate=3))
        inventory = GraphInventory(store, SqliteInventory(store), client, clock=lambda: NOW, timer=lambda: 0.0)
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
