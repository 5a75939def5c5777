"""Device signals without the proxy: the SQLite store and its imports, the cache in front of a
source, Intune's compliance semantics, MTD partners going quiet, ActiveSync DeviceIds."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.errors import ConfigError, SignalUnavailable
from gateway.policy.compliance import noncompliance_reason
from gateway.policy.model import ComplianceSettings, ComplianceState, DeviceThreatLevel, ManagedDevice
from gateway.signals.activesync import MalformedActiveSyncQuery, activesync_device_ids
from gateway.signals.cache import CachedInventory
from gateway.signals.sqlite_store import SqliteDeviceStore, export, parse_import
from gateway.signals.store import StoreInventory
from tests.conftest import REPO
from tests.helpers.signals import Clock, devices_cli

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
PORTCULLIS = str(Path(sys.executable).with_name("portcullis"))


def device(**fields: object) -> ManagedDevice:
    base: dict[str, object] = {"device_id": "d1", "display_name": None, "user_principal_name": None,
                               "operating_system": "iOS", "compliance_state": ComplianceState.compliant,
                               "compliance_grace_period_expiration": None, "threat_level": DeviceThreatLevel.low,
                               "threat_source": "x", "last_sync": NOW - timedelta(hours=2)}
    return ManagedDevice(**{**base, **fields})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "settings", "reason"),
    [
        ({}, ComplianceSettings(), None),
        ({"jail_broken": True}, ComplianceSettings(), "device not compliant (jailbroken)"),
        ({"last_sync": NOW - timedelta(days=31)}, ComplianceSettings(),
         "device not compliant (last synced 31 days ago)"),
        ({"last_sync": NOW - timedelta(days=29)}, ComplianceSettings(), None),
        ({"last_sync": None}, ComplianceSettings(),
         "device not compliant (never synced, and a compliance validity period is set)"),
        ({"last_sync": NOW - timedelta(days=300)}, ComplianceSettings(validity=None), None),
        ({"compliance_state": ComplianceState.unknown}, ComplianceSettings(),
         "device not compliant (complianceState: unknown)"),
        ({"compliance_state": ComplianceState.unknown},
         ComplianceSettings(devices_without_policy_compliant=True), None),
        ({"threat_level": None}, ComplianceSettings(block_without_partner_data=True),
         "device not compliant (no data from the MTD partner)"),
        ({"compliance_state": ComplianceState.conflict}, ComplianceSettings(),
         "device not compliant (complianceState: conflict)"),
    ],
)
def test_intune_compliance_semantics(fields: dict[str, object], settings: ComplianceSettings,
                                     reason: str | None) -> None:
    assert noncompliance_reason(device(**fields), NOW, settings) == reason


@pytest.fixture
def store(tmp_path: Path) -> SqliteDeviceStore:
    created = SqliteDeviceStore(tmp_path / "devices.sqlite")
    created.replace_all(parse_import(REPO / "config" / "devices.yaml"), now=NOW)
    return created


ALEX = "3c5f0b1e-7a2d-4e8f-9b61-0d2a4c8e1f01"


def test_highest_level_of_responsive_partners_wins(store: SqliteDeviceStore) -> None:
    store.set_threat_level(ALEX, "lookout", DeviceThreatLevel.medium, now=NOW)
    store.set_threat_level(ALEX, "zimperium", DeviceThreatLevel.secured, now=NOW)
    record = store.managed_device(ALEX.upper())
    assert record is not None and (record.threat_level, record.threat_source) == (DeviceThreatLevel.medium, "lookout")
    quiet = StoreInventory(store, {"lookout": timedelta(days=7)}, clock=lambda: NOW + timedelta(days=8))
    record = asyncio.run(quiet.managed_device(ALEX))
    assert record is not None and record.threat_source != "lookout"  # an unresponsive partner's verdict is ignored


def test_import_is_all_or_nothing_with_lines(store: SqliteDeviceStore, tmp_path: Path) -> None:
    exported = tmp_path / "devices.csv"
    exported.write_text(export(store, "csv"))
    rows = exported.read_text().splitlines()
    rows[2] = rows[2].replace("compliant", "compliantish", 1)
    rows.append("not-a-device,,,,,,,,maybe,,compliant,,,,,{},,")
    exported.write_text("\n".join(rows) + "\n")
    fresh = SqliteDeviceStore(tmp_path / "other.sqlite")
    with pytest.raises(ConfigError) as caught:
        fresh.replace_all(parse_import(exported), now=NOW)
    messages = [str(p) for p in caught.value.problems]
    assert any(m.startswith(f"{exported}:3: complianceState:") for m in messages), messages
    assert any(m.startswith(f"{exported}:6: ") and "jailBroken" in m for m in messages), messages
    assert fresh.count() == 0


def test_json_import_names_item_lines_and_graph_shape_is_accepted(tmp_path: Path) -> None:
    graph = tmp_path / "graph.json"
    graph.write_text(json.dumps({"value": [
        {"azureADDeviceId": "a1", "complianceState": "compliant", "jailBroken": False},
        {"azureADDeviceId": "a2", "complianceState": "sideways"},
    ]}, indent=2))
    with pytest.raises(ConfigError) as caught:
        parse_import(graph)
    [problem] = caught.value.problems
    assert (problem.line, problem.key) == (10, "value[1].complianceState")


def test_export_import_round_trip(store: SqliteDeviceStore, tmp_path: Path) -> None:
    for fmt in ("json", "csv"):
        path = tmp_path / f"devices.{fmt}"
        path.write_text(export(store, fmt))
        copy = SqliteDeviceStore(tmp_path / f"copy-{fmt}.sqlite")
        copy.replace_all(parse_import(path), now=NOW)
        assert list(copy.records()) == list(store.records())


class CountingSource:
    name = "counting"

    def __init__(self) -> None:
        self.calls = 0
        self.fail = False
        self.known = {"d1": device()}

    async def managed_device(self, device_id: str) -> ManagedDevice | None:
        self.calls += 1
        await asyncio.sleep(0)
        if self.fail:
            raise SignalUnavailable("down")
        return self.known.get(device_id)


class SnapshotSource(CountingSource):
    """Reads the record when the call starts and answers after a while, as a network store does."""

    async def managed_device(self, device_id: str) -> ManagedDevice | None:
        self.calls += 1
        if self.fail:
            raise SignalUnavailable("down")
        found = self.known.get(device_id)
        await asyncio.sleep(0.01)
        return found


def cached(source: CountingSource, clock: Clock, max_entries: int = 1000) -> CachedInventory:
    return CachedInventory(source, ttl=60, miss_ttl=5, max_staleness=300, max_entries=max_entries, timer=clock)


def test_concurrent_lookups_of_one_device_share_one_call() -> None:
    source, clock = CountingSource(), Clock()
    inventory = cached(source, clock)

    async def many() -> list[ManagedDevice | None]:
        return await asyncio.gather(*(inventory.managed_device("D1") for _ in range(50)))

    assert all(r is not None for r in asyncio.run(many()))
    assert source.calls == 1


def test_a_flood_of_unknown_ids_stays_bounded() -> None:
    source, clock = CountingSource(), Clock()
    inventory = cached(source, clock, max_entries=100)

    async def flood() -> None:
        for i in range(5000):
            assert await inventory.managed_device(f"random-{i}") is None
        assert await inventory.managed_device("random-4999") is None

    asyncio.run(flood())
    assert source.calls == 5000  # the last repeat was a cached miss
    assert len(inventory._misses) <= 1024 and len(inventory._last_good) <= 100


def test_source_down_is_answered_from_cache_until_max_staleness() -> None:
    source, clock = CountingSource(), Clock()
    inventory = cached(source, clock)

    async def scenario() -> None:
        assert await inventory.managed_device("d1") is not None
        source.fail = True
        clock.now += 120  # past the TTL: the source is asked again, fails, the copy is 120 s old
        assert await inventory.managed_device("d1") is not None
        clock.now += 300  # past max staleness
        with pytest.raises(SignalUnavailable):
            await inventory.managed_device("d1")

    asyncio.run(scenario())


def test_invalidate_makes_the_next_lookup_ask_the_source() -> None:
    source, clock = CountingSource(), Clock()
    inventory = cached(source, clock)

    async def scenario() -> None:
        await inventory.managed_device("d1")
        inventory.invalidate({"D1"})
        await inventory.managed_device("d1")

    asyncio.run(scenario())
    assert source.calls == 2


def _base64_query(device_id: bytes) -> str:
    raw = bytes([141, 0, 9, 4, len(device_id)]) + device_id + bytes([0, 6]) + b"iPhone"
    return base64.b64encode(raw).decode()


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/Microsoft-Server-ActiveSync?Cmd=Sync&User=a&DeviceId=ApplABC&DeviceType=iPhone", {"applabc"}),
        ("/Microsoft-Server-ActiveSync?Cmd=Sync&deviceid=A&DeviceId=B", {"a", "b"}),
        ("/Microsoft-Server-ActiveSync", set()),
        (f"/Microsoft-Server-ActiveSync?{_base64_query(b'ApplXYZ')}", {"applxyz"}),
        (f"/Microsoft-Server-ActiveSync?{_base64_query(bytes([1, 2, 254]))}", {"0102fe"}),
    ],
)
def test_activesync_device_ids(target: str, expected: set[str]) -> None:
    assert activesync_device_ids(target) == expected


def test_unreadable_base64_query_is_an_error() -> None:
    with pytest.raises(MalformedActiveSyncQuery):
        activesync_device_ids("/Microsoft-Server-ActiveSync?" + base64.b64encode(bytes([141, 0, 9, 4, 50])).decode())


@pytest.mark.slow
def test_devices_cli(tmp_path: Path) -> None:
    config = tmp_path / "config"
    subprocess.run(["cp", "-r", str(REPO / "config"), str(config)], check=True)
    cli = devices_cli(config)
    seed = config / "devices.yaml"
    assert cli("import", str(seed)).stdout == f"imported 4 devices from {seed}\n"
    assert ALEX in cli("list").stdout
    assert cli("set-risk", ALEX, "high", "--partner", "lookout").returncode == 0
    shown = json.loads(cli("show", ALEX).stdout)
    assert (shown["threat_level"], shown["threat_source"]) == ("high", "lookout")
    assert cli("set-risk", "nope", "high").returncode == 1
    assert cli("show", "nope").stderr == "portcullis: no device 'nope' in the inventory\n"
    exported = json.loads(cli("export").stdout)
    assert len(exported["devices"]) == 4


@pytest.mark.slow
def test_set_risk_takes_the_old_vendor_spelling_with_a_warning_naming_partner(tmp_path: Path) -> None:
    """Scripts written for ``--vendor`` keep working for now: it fills the same partner slot as
    ``--partner`` and says which spelling replaces it; ``--partner`` itself warns of nothing."""
    config = tmp_path / "config"
    subprocess.run(["cp", "-r", str(REPO / "config"), str(config)], check=True)
    cli = devices_cli(config)
    assert cli("import", str(config / "devices.yaml")).returncode == 0
    new = cli("set-risk", ALEX, "high", "--partner", "zimperium")
    assert (new.returncode, new.stdout, new.stderr) == (0, f"{ALEX}: threat level high from zimperium\n", "")
    shown = json.loads(cli("show", ALEX).stdout)
    assert (shown["threat_level"], shown["threat_source"]) == ("high", "zimperium")
    old = cli("set-risk", ALEX, "secured", "--vendor", "zimperium")
    assert (old.returncode, old.stdout, old.stderr) == (0, f"{ALEX}: threat level secured from zimperium\n",
                                                        "portcullis: --vendor is deprecated; use --partner\n")
    shown = json.loads(cli("show", ALEX).stdout)  # zimperium's high was replaced: the seeded level is back
    assert (shown["threat_level"], shown["threat_source"]) == ("low", "demo-mtd")


@pytest.mark.slow
def test_devices_remove_retires_a_device_with_every_verdict(tmp_path: Path) -> None:
    config = tmp_path / "config"
    subprocess.run(["cp", "-r", str(REPO / "config"), str(config)], check=True)
    cli = devices_cli(config)
    assert cli("import", str(config / "devices.yaml")).returncode == 0
    assert cli("set-risk", ALEX, "high", "--partner", "lookout").returncode == 0
    removed = cli("remove", ALEX.upper(), "not-a-device")
    assert removed.returncode == 1  # one of the two was not there
    assert removed.stdout == f"{ALEX.upper()}: removed\n"
    assert removed.stderr == "portcullis: no device 'not-a-device' in the inventory\n"
    assert cli("show", ALEX).returncode == 1 and ALEX not in cli("list").stdout
    assert len(json.loads(cli("export").stdout)["devices"]) == 3
    store = SqliteDeviceStore(tmp_path / ".portcullis" / "devices.sqlite")
    assert ALEX in store.changes_since(0)[1]  # a running gateway hears of it (and closes its open flows)
    store.upsert(parse_import(config / "devices.yaml")[0], now=NOW)  # back, as a new device: no old verdict
    back = store.managed_device(ALEX)
    assert back is not None and (back.threat_level, back.threat_source) == (DeviceThreatLevel.low, "demo-mtd")
    assert cli("remove", ALEX).returncode == 0


def test_retiring_a_device_known_only_by_its_verdicts_is_announced(tmp_path: Path) -> None:
    """A full sync prunes a device Intune no longer lists but keeps other partners' verdicts for when
    it returns. Retiring it removes those verdicts: a change the gateways must hear of (they poll the
    change list), and one ``devices remove`` reports as done."""
    store = SqliteDeviceStore(tmp_path / "devices.sqlite")
    records = parse_import(REPO / "config" / "devices.yaml")
    alex = next(r for r in records if r.azure_ad_device_id.lower() == ALEX)
    store.replace_all(records, now=NOW)
    store.apply_verdicts("lookout", [(ALEX, DeviceThreatLevel.high)], now=NOW)
    store.replace_all([r for r in records if r is not alex], now=NOW, prune_partner="graph")
    assert store.managed_device(ALEX) is None  # pruned; lookout's verdict waits for its return
    seen = store.last_change()
    assert store.remove([ALEX.upper()], now=NOW) == {ALEX}
    assert ALEX in store.changes_since(seen)[1]
    store.upsert(alex, now=NOW)  # back: without the retired verdict
    back = store.managed_device(ALEX)
    assert back is not None and (back.threat_level, back.threat_source) == (DeviceThreatLevel.low, "demo-mtd")
    store.close()


@pytest.mark.slow
def test_device_commands_do_not_need_valid_policies(tmp_path: Path) -> None:
    """The gateway serves its last good rules while policies.yaml is being edited; an operator must
    still be able to raise a device's risk (or retire it) meanwhile."""
    config = tmp_path / "config"
    subprocess.run(["cp", "-r", str(REPO / "config"), str(config)], check=True)
    cli = devices_cli(config)
    assert cli("import", str(config / "devices.yaml")).returncode == 0
    policies = config / "policies.yaml"
    policies.write_text(policies.read_text().replace("state: enabled", "state: enabeld", 1))
    checked = subprocess.run([PORTCULLIS, "check", "--config", str(config)], capture_output=True, text=True,
                             timeout=60)
    assert checked.returncode == 1 and "enabeld" in checked.stderr  # the rules really are invalid
    raised = cli("set-risk", ALEX, "high", "--partner", "soc-analyst")
    assert raised.returncode == 0, raised.stderr
    assert json.loads(cli("show", ALEX).stdout)["threat_level"] == "high"
    assert ALEX in cli("list").stdout
    assert cli("remove", ALEX).returncode == 0
    broken = config / "portcullis.yaml"  # where the store is configured: that file must still be valid
    broken.write_text(broken.read_text().replace("deviceSignals:", "deviceSignalz:", 1))
    refused = cli("list")
    assert refused.returncode == 1 and "portcullis.yaml" in refused.stderr and "deviceSignalz" in refused.stderr


def test_a_json_import_is_refused_for_a_member_given_twice(tmp_path: Path) -> None:
    """The fast JSON reader must not let the last of two members win where the YAML reader refuses."""
    path = tmp_path / "devices.json"
    path.write_text('{"devices": [\n  {"azureADDeviceId": "a1", "complianceState": "compliant"},\n'
                    '  {"azureADDeviceId": "a2", "complianceState": "noncompliant", "complianceState": "compliant"}\n'
                    ']}\n')
    with pytest.raises(ConfigError) as caught:
        parse_import(path)
    [problem] = caught.value.problems
    assert problem.line == 3 and "duplicate" in problem.message


def test_a_full_sync_keeps_other_partners_verdicts_and_an_empty_sync_prunes_nothing(store: SqliteDeviceStore) -> None:
    store.set_threat_level(ALEX, "lookout", DeviceThreatLevel.high, now=NOW)
    others = [r for r in parse_import(REPO / "config" / "devices.yaml") if r.azure_ad_device_id.lower() != ALEX]
    assert store.replace_all([], now=NOW, prune_partner="graph") == 0
    assert store.count() == 4
    store.replace_all(others, now=NOW, prune_partner="graph")
    assert store.managed_device(ALEX) is None
    store.replace_all(parse_import(REPO / "config" / "devices.yaml"), now=NOW, prune_partner="graph")
    back = store.managed_device(ALEX)
    assert back is not None and (back.threat_level, back.threat_source) == (DeviceThreatLevel.high, "lookout")


def test_a_restart_seed_never_undoes_a_live_verdict(store: SqliteDeviceStore) -> None:
    store.set_threat_level(ALEX, "demo-mtd", DeviceThreatLevel.high, now=NOW)
    store.replace_all(parse_import(REPO / "config" / "devices.yaml"), now=NOW + timedelta(hours=1), seed=True)
    record = store.managed_device(ALEX)
    assert record is not None and record.threat_level is DeviceThreatLevel.high


def test_a_source_that_stops_reporting_a_level_clears_its_verdict(store: SqliteDeviceStore) -> None:
    record = parse_import(REPO / "config" / "devices.yaml")[0]
    with_graph = record.model_copy(update={"threat_level": DeviceThreatLevel.high, "threat_source": "graph"})
    store.upsert(with_graph, now=NOW, clear_partner="graph")
    store.upsert(record.model_copy(update={"threat_level": None, "threat_source": None}), now=NOW,
                 clear_partner="graph")
    found = store.managed_device(record.azure_ad_device_id)
    assert found is not None and found.threat_source != "graph"


def test_writes_through_the_gateways_own_connection_change_the_data_version(store: SqliteDeviceStore) -> None:
    before = store.data_version()
    store.set_threat_level(ALEX, "graph", DeviceThreatLevel.medium, now=NOW)
    assert store.data_version() != before
    seq, changed, complete = store.changes_since(0)
    assert ALEX in changed and complete and seq == store.last_change()


def test_the_change_log_is_trimmed_and_a_reader_left_behind_learns_it(store: SqliteDeviceStore,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.signals.sqlite_store as sqlite_store

    monkeypatch.setattr(sqlite_store, "CHANGES_KEPT", 3)
    behind = store.last_change()
    for level in (DeviceThreatLevel.low, DeviceThreatLevel.medium, DeviceThreatLevel.high, DeviceThreatLevel.low):
        store.set_threat_level(ALEX, "x", level, now=NOW)
    assert int(store._read("SELECT COUNT(*) FROM changes")[0][0]) <= 4
    _, _, complete = store.changes_since(behind)
    assert not complete


def test_short_long_and_duplicate_csv_rows_are_refused_with_their_lines(tmp_path: Path) -> None:
    path = tmp_path / "devices.csv"
    path.write_text("azureADDeviceId,complianceState,jailBroken\n"
                    "a1,compliant,false\n"
                    "a2,compliant\n"
                    "a3,compliant,false,extra\n"
                    "A1,compliant,false\n")
    with pytest.raises(ConfigError) as caught:
        parse_import(path)
    assert [(p.line, p.key) for p in caught.value.problems] == [(3, ""), (4, ""), (5, "azureADDeviceId")]


def test_an_answer_read_across_an_invalidation_is_not_kept() -> None:
    source, clock = CountingSource(), Clock()
    inventory = cached(source, clock)

    async def scenario() -> None:
        lookup = asyncio.create_task(inventory.managed_device("d1"))
        await asyncio.sleep(0)  # the source call is under way
        inventory.invalidate({"d1"})
        await lookup
        await inventory.managed_device("d1")

    asyncio.run(scenario())
    assert source.calls == 2


def test_while_the_change_feed_is_down_every_lookup_asks_the_source_then_staleness_rules() -> None:
    source, clock = CountingSource(), Clock()
    inventory = cached(source, clock)

    async def scenario() -> None:
        await inventory.managed_device("d1")
        await inventory.managed_device("d1")
        assert source.calls == 1  # fresh from the cache while the feed is up
        inventory.feed_lost()
        await inventory.managed_device("d1")
        await inventory.managed_device("d1")
        assert source.calls == 3  # no fresh answer is trusted: a change could have been missed
        source.fail = True
        clock.now += 200
        assert await inventory.managed_device("d1") is not None  # last good copy, 200 s old
        clock.now += 101
        with pytest.raises(SignalUnavailable):  # older than max staleness: refused
            await inventory.managed_device("d1")
        source.fail = False
        inventory.feed_restored()
        await inventory.managed_device("d1")
        await inventory.managed_device("d1")
        assert source.calls == 6  # cached again once the feed is back

    asyncio.run(scenario())


def test_a_read_begun_before_an_invalidation_never_becomes_the_staleness_copy() -> None:
    """With the feed down, a lookup that started before this process stored a raise must not
    leave the old answer behind as the copy served when the source then goes down."""
    source, clock = SnapshotSource(), Clock()
    inventory = cached(source, clock)
    inventory.feed_lost()

    async def scenario() -> None:
        before = asyncio.create_task(inventory.managed_device("d1"))
        await asyncio.sleep(0)  # the read of the old record is under way
        source.known["d1"] = device(threat_level=DeviceThreatLevel.high)
        inventory.invalidate({"d1"})
        assert (await before).threat_level is not DeviceThreatLevel.high  # that request: the old answer
        source.fail = True
        with pytest.raises(SignalUnavailable):  # nothing kept from the read across the invalidation
            await inventory.managed_device("d1")

    asyncio.run(scenario())


def test_a_lookup_after_an_invalidation_does_not_join_a_read_begun_before_it() -> None:
    source, clock = SnapshotSource(), Clock()
    inventory = cached(source, clock)

    async def scenario() -> None:
        before = asyncio.create_task(inventory.managed_device("d1"))
        await asyncio.sleep(0)
        source.known["d1"] = device(threat_level=DeviceThreatLevel.high)
        inventory.invalidate({"d1"})
        after = await inventory.managed_device("d1")
        await before
        assert after is not None and after.threat_level is DeviceThreatLevel.high

    asyncio.run(scenario())


def test_a_failed_source_is_left_alone_for_a_second_and_copies_answer_meanwhile() -> None:
    """A source that times out must not make every request wait for its timeout in turn."""
    source, clock = CountingSource(), Clock()
    inventory = cached(source, clock)

    async def scenario() -> None:
        await inventory.managed_device("d1")
        inventory.invalidate_all()
        await inventory.managed_device("d1")
        source.fail = True
        clock.now += 61  # past the TTL
        assert await inventory.managed_device("d1") is not None  # asked, failed: the copy answers
        assert await inventory.managed_device("d1") is not None  # not asked again within the second
        with pytest.raises(SignalUnavailable):
            await inventory.managed_device("never-seen")  # no copy: refused, without waiting for the source
        assert source.calls == 3
        clock.now += 1.5
        source.fail = False
        assert await inventory.managed_device("never-seen") is None
        assert source.calls == 4

    asyncio.run(scenario())
