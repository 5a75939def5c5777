"""Finding a device by the other keys an MDM certificate can name it by (``intuneDeviceId``,
``serialNumber``): imports that refuse a key two devices share, the Graph connector, and
``device_ids_for`` on real SQLite files and a real redis-server, kept right through every write."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from gateway.errors import ConfigError, SignalUnavailable
from gateway.policy.model import DeviceKey
from gateway.signals.cache import CachedInventory
from gateway.signals.devices import MATCHES_MAX, FileDeviceInventory, OverlayInventory, device_record
from gateway.signals.graph import GraphClient, GraphInventory
from gateway.signals.sqlite_store import DEVICES_BY_KEY, SqliteDeviceStore, export, parse_import
from gateway.signals.store import DeviceStore, StoreInventory
from gateway.state.redis_state import RedisState
from tests.conftest import REPO
from tests.graph_server import GraphState, managed_device, serving, settings
from tests.helpers.shared_state import prefix, record
from tests.helpers.signals import devices_cli
from tests.redis_server import RedisServer, free_port

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
A, B, C = (f"aa000000-0000-4000-8000-00000000000{n}" for n in range(1, 4))
INTUNE_A, INTUNE_B = "1B2C3D4E-0000-4000-8000-0000000000A1", "1b2c3d4e-0000-4000-8000-0000000000b2"
INTUNE, SERIAL = DeviceKey.intune_device_id, DeviceKey.serial_number


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DeviceStore]:
    if request.param == "sqlite":
        created: DeviceStore = SqliteDeviceStore(tmp_path / "devices.sqlite")
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        server.start()  # a test before may have stopped it
        created = RedisState.from_url(server.url, prefix=prefix()).devices
    yield created
    created.close()


def lookups(store: DeviceStore, *keys: tuple[DeviceKey, str]) -> list[list[str]]:
    return [store.device_ids_for(key, value) for key, value in keys]


def test_a_device_is_found_by_each_key_whatever_its_case_and_padding(store: DeviceStore) -> None:
    store.replace_all([record(A, intuneDeviceId=INTUNE_A, serialNumber=" f2lx0001 "),
                       record(B, intuneDeviceId=INTUNE_B, serialNumber="F2LX0002")], now=NOW)
    assert lookups(store, (DeviceKey.azure_ad_device_id, A.upper()), (INTUNE, INTUNE_A.lower()),
                   (INTUNE, f" {INTUNE_A} "), (SERIAL, "F2LX0001"), (SERIAL, "\tf2lx0001"),
                   (INTUNE, INTUNE_B.upper()), (SERIAL, "f2lx0002")) == [[A]] * 5 + [[B]] * 2
    assert lookups(store, (DeviceKey.azure_ad_device_id, C), (INTUNE, A), (SERIAL, "F2LX0003"),
                   (SERIAL, INTUNE_A)) == [[], [], [], []]
    device = store.managed_device(A)
    assert device is not None and (device.intune_device_id, device.serial_number) == (INTUNE_A.lower(), "F2LX0001")
    assert device_record(device).to_managed_device() == device  # how the decision log writes it down


def test_the_keys_follow_every_write_path(store: DeviceStore) -> None:
    store.upsert(record(A, serialNumber="S1", intuneDeviceId=INTUNE_A), now=NOW)
    store.upsert(record(A, serialNumber="S2"), now=NOW)  # a new serial, no Intune id any more
    assert lookups(store, (SERIAL, "S1"), (SERIAL, "S2"), (INTUNE, INTUNE_A)) == [[], [A], []]
    store.replace_all([record(A, serialNumber="S3"), record(B, serialNumber="S3"), record(C, serialNumber="S2")],
                      now=NOW)
    assert lookups(store, (SERIAL, "S3"), (SERIAL, "S2")) == [[A, B], [C]]  # two devices: the caller refuses
    store.remove([A.upper()], now=NOW)
    assert lookups(store, (SERIAL, "S3"), (DeviceKey.azure_ad_device_id, A)) == [[B], []]
    store.apply_verdicts("lookout", [(B, None)], now=NOW)  # a verdict leaves the record's keys alone
    store.replace_all([record(C, serialNumber="S2")], now=NOW, prune_partner="graph")  # a full sync prunes B
    assert lookups(store, (SERIAL, "S3"), (SERIAL, "S2")) == [[], [C]]
    store.remove([C], now=NOW)
    assert lookups(store, (SERIAL, "S2")) == [[]]


def test_a_serial_thousands_of_devices_share_names_a_bounded_few(store: DeviceStore) -> None:
    """Enough to refuse the certificate as ambiguous and name some of them, not thousands per handshake."""
    many = [record(f"bb000000-0000-4000-8000-{n:012d}", serialNumber="To be filled by O.E.M.") for n in range(25)]
    store.replace_all(many, now=NOW)
    found = store.device_ids_for(SERIAL, "to be filled by o.e.m.")
    assert len(found) == MATCHES_MAX and found == sorted(found)
    assert set(found) <= {r.azure_ad_device_id for r in many}


def test_redis_keeps_no_key_entry_of_a_rewritten_pruned_or_removed_device(redis_server: RedisServer) -> None:
    """The sets themselves, not only the answers (a lookup also checks the records it finds)."""
    redis_server.start()
    key_prefix = prefix()
    store = RedisState.from_url(redis_server.url, prefix=key_prefix).devices
    raw = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        store.replace_all([record(A, serialNumber="S1", intuneDeviceId=INTUNE_A), record(B, serialNumber="S2"),
                           record(C, serialNumber="S3")], now=NOW)
        assert set(raw.keys(f"{key_prefix}device-key:*")) == {
            f"{key_prefix}device-key:serialNumber:S1", f"{key_prefix}device-key:serialNumber:S2",
            f"{key_prefix}device-key:serialNumber:S3", f"{key_prefix}device-key:intuneDeviceId:{INTUNE_A.lower()}"}
        store.upsert(record(A, serialNumber="S4"), now=NOW)
        store.remove([B], now=NOW)
        store.replace_all([record(A, serialNumber="S4")], now=NOW, prune_partner="graph")
        assert raw.keys(f"{key_prefix}device-key:*") == [f"{key_prefix}device-key:serialNumber:S4"]
        assert raw.smembers(f"{key_prefix}device-key:serialNumber:S4") == {A}
    finally:
        raw.close()
        store.close()


def test_redis_ignores_a_key_entry_an_older_gateway_left_behind(redis_server: RedisServer) -> None:
    """A gateway of the version before rewrites a record without touching the key sets: the entry
    left behind must not name the device any more."""
    redis_server.start()
    key_prefix = prefix()
    store = RedisState.from_url(redis_server.url, prefix=key_prefix).devices
    store.upsert(record(A, serialNumber="S1"), now=NOW)
    raw = redis.Redis.from_url(redis_server.url)
    raw.set(f"{key_prefix}device:{A}", json.dumps({"azureADDeviceId": A, "complianceState": "compliant"}))
    raw.close()
    try:
        assert store.device_ids_for(SERIAL, "S1") == []
    finally:
        store.close()


def test_a_store_that_cannot_answer_a_key_lookup_raises_signal_unavailable(tmp_path: Path) -> None:
    sqlite_store = SqliteDeviceStore(tmp_path / "devices.sqlite")
    sqlite_store.close()
    nobody = RedisState.from_url(f"redis://127.0.0.1:{free_port()}/0", prefix=prefix())
    for inventory in (StoreInventory(sqlite_store), StoreInventory(nobody.devices, name="redis")):
        cached = CachedInventory(inventory, ttl=60, miss_ttl=5, max_staleness=60, max_entries=10)
        for source in (inventory, cached):
            with pytest.raises(SignalUnavailable):
                asyncio.run(source.device_ids_for(SERIAL, "S1"))
    nobody.close()


def test_a_key_lookup_that_hangs_is_given_up_as_unavailable() -> None:
    class Hanging:
        name = "hanging"

        async def device_ids_for(self, key: DeviceKey, value: str) -> list[str]:
            await asyncio.Event().wait()
            return []

    cached = CachedInventory(Hanging(), ttl=60, miss_ttl=5, max_staleness=60, max_entries=10,  # type: ignore[arg-type]
                             lookup_timeout=0.05)
    with pytest.raises(SignalUnavailable, match="did not answer"):
        asyncio.run(cached.device_ids_for(SERIAL, "S1"))


def test_sqlite_key_lookups_search_an_index(tmp_path: Path) -> None:
    store = SqliteDeviceStore(tmp_path / "devices.sqlite")
    db = sqlite3.connect(tmp_path / "devices.sqlite")
    for key, sql in DEVICES_BY_KEY.items():
        plan = " ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", ("x",)))
        assert "SEARCH devices USING" in plan and "INDEX" in plan, (key, plan)
    db.close()
    store.close()


OLD_SCHEMA = """
CREATE TABLE devices (device_id TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE threat_levels (device_id TEXT NOT NULL, vendor TEXT NOT NULL, level TEXT NOT NULL,
    reported_at TEXT NOT NULL, PRIMARY KEY (device_id, vendor));
CREATE TABLE partners (vendor TEXT PRIMARY KEY, last_contact TEXT NOT NULL);
CREATE TABLE verdict_times (device_id TEXT NOT NULL, vendor TEXT NOT NULL, reported_us INTEGER NOT NULL,
    PRIMARY KEY (device_id, vendor));
CREATE TABLE changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT NOT NULL, changed_at TEXT NOT NULL);
"""


def test_a_file_written_before_the_keys_gains_their_indexes_and_older_writers_keep_them_right(tmp_path: Path) -> None:
    path = tmp_path / "devices.sqlite"
    old = sqlite3.connect(path, isolation_level=None)
    old.executescript(OLD_SCHEMA)
    old.execute("INSERT INTO devices VALUES (?, ?)", (B, json.dumps({"azureADDeviceId": B,
                                                                      "complianceState": "compliant"})))
    old.execute("INSERT INTO devices VALUES (?, ?)", (C, json.dumps({"azureADDeviceId": C, "serialNumber": "S3",
                                                                      "complianceState": "compliant"})))
    old.execute("INSERT INTO devices VALUES (?, ?)", (A, "not JSON: a hand edit"))
    store = SqliteDeviceStore(path)  # the upgrade: the file is opened by this version
    indexes = {name for (name,) in old.execute("SELECT name FROM sqlite_master WHERE type = 'index' "
                                                  "AND sql IS NOT NULL")}
    assert indexes == {"devices_by_intune_device_id", "devices_by_serial_number"}
    assert store.device_ids_for(SERIAL, "s3") == [C]  # a row already there is in the index
    with pytest.raises(SignalUnavailable, match="unreadable"):  # that device is unavailable, the file is not
        store.managed_device(A)
    store.upsert(record(B, serialNumber="S2"), now=NOW)
    assert store.device_ids_for(SERIAL, "S2") == [B]
    # a gateway of the version before, sharing the file, rewrites B without a serial: B is not found by it
    old.execute("INSERT OR REPLACE INTO devices VALUES (?, ?)",
                (B, json.dumps({"azureADDeviceId": B, "complianceState": "compliant"})))
    assert (store.device_ids_for(SERIAL, "S2"), store.managed_device(B) is not None) == ([], True)
    old.close()
    store.close()


def test_two_devices_graph_lists_with_one_serial_are_both_found(store: DeviceStore) -> None:
    """Intune may list two devices with one serial (re-enrolled, a placeholder): a sync cannot
    refuse them, so the lookup answers both and the caller refuses the certificate as ambiguous.
    Graph's ``id`` is the Intune device id; serial numbers are matched trimmed and upper case."""
    state = GraphState(devices=[managed_device(1, serialNumber="C02XK0ABJG5H"),
                                managed_device(2, serialNumber="c02xk0abjg5h "),
                                managed_device(3, serialNumber="")])

    async def scenario() -> list[list[str]]:
        async with serving(state) as base:
            client = GraphClient(settings(base))
            inventory = GraphInventory(store, StoreInventory(store), client, clock=lambda: NOW)
            try:
                await inventory.full_sync()
            finally:
                await client.close()
        cached = CachedInventory(inventory, ttl=60, miss_ttl=5, max_staleness=60, max_entries=10)
        return [await cached.device_ids_for(key, value) for key, value in (
            (SERIAL, "C02XK0ABJG5H"), (INTUNE, "1B2C3D4E-0000-4000-8000-000000000003"), (SERIAL, ""))]

    both, third, blank = asyncio.run(scenario())
    ids = [f"aa000000-0000-4000-8000-{n:012d}" for n in (1, 2, 3)]
    assert (both, third, blank) == (ids[:2], ids[2:], [])
    device = store.managed_device(ids[2])
    assert device is not None and (device.intune_device_id, device.serial_number) == (
        "1b2c3d4e-0000-4000-8000-000000000003", None)


def test_the_seed_file_laid_over_the_store_answers_for_the_devices_it_knows(tmp_path: Path) -> None:
    seed = tmp_path / "devices.yaml"
    seed.write_text(f"devices:\n  - {{azureADDeviceId: {A}, serialNumber: S1, complianceState: compliant}}\n")
    file_inventory = FileDeviceInventory.load(seed)
    store = SqliteDeviceStore(tmp_path / "devices.sqlite")
    store.replace_all([record(A, serialNumber="OLD"), record(B, serialNumber="S1"), record(C, serialNumber="OLD")],
                      now=NOW)
    overlay = OverlayInventory(file_inventory, StoreInventory(store))

    async def answers() -> list[list[str]]:
        return [await overlay.device_ids_for(SERIAL, "s1"), await overlay.device_ids_for(SERIAL, "OLD"),
                await file_inventory.device_ids_for(DeviceKey.azure_ad_device_id, A.upper())]

    # B shares the seed's serial (ambiguous); A's stored "OLD" is not A's any more (the seed says S1)
    assert asyncio.run(answers()) == [[A, B], [C], [A]]
    store.close()


# --- imports: one device per key, refused at the line that names it again ---------------------

def problems(path: Path) -> list[tuple[int | None, str, str]]:
    with pytest.raises(ConfigError) as caught:
        parse_import(path)
    return [(p.line, p.key, p.message) for p in caught.value.problems]


def test_a_csv_import_refuses_a_key_another_device_has_at_its_line(tmp_path: Path) -> None:
    path = tmp_path / "devices.csv"
    path.write_text("azureADDeviceId,complianceState,intuneDeviceId,serialNumber\n"
                    f"{A},compliant,{INTUNE_A},F2LX0001\n"
                    f"{B},compliant,{INTUNE_A.lower()},f2lx0002\n"
                    f"{C},compliant,,  f2lx0001\n")
    assert problems(path) == [
        (3, "intuneDeviceId", f"intuneDeviceId '{INTUNE_A.lower()}' is already device {A}'s"),
        (4, "serialNumber", f"serialNumber 'F2LX0001' is already device {A}'s")]


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_json_and_yaml_imports_refuse_a_key_another_device_has_at_its_line(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"devices{suffix}"
    path.write_text(json.dumps({"devices": [
        {"azureADDeviceId": A, "complianceState": "compliant", "serialNumber": "F2LX0001"},
        {"azureADDeviceId": B, "complianceState": "compliant", "serialNumber": "F2LX0001 "},
    ]}, indent=2))
    assert problems(path) == [(11, "devices[1].serialNumber", f"serialNumber 'F2LX0001' is already device {A}'s")]


def test_an_intune_device_id_that_is_no_guid_and_a_blank_serial_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "devices.csv"
    path.write_text("azureADDeviceId,complianceState,intuneDeviceId,serialNumber\n"
                    f"{A},compliant,F2LX0001,\n"
                    f"{B},compliant,,\"   \"\n")
    assert [(line, key) for line, key, _ in problems(path)] == [(2, "intuneDeviceId"), (3, "serialNumber")]


def test_the_seed_file_refuses_a_serial_two_devices_have(tmp_path: Path) -> None:
    seed = tmp_path / "devices.yaml"
    seed.write_text("devices:\n"
                    f"  - {{azureADDeviceId: {A}, serialNumber: S1, complianceState: compliant}}\n"
                    f"  - {{azureADDeviceId: {B}, serialNumber: s1, complianceState: compliant}}\n")
    with pytest.raises(ConfigError) as caught:
        FileDeviceInventory.load(seed)
    assert [(p.line, p.key) for p in caught.value.problems] == [(3, "devices[1].serialNumber")]


def test_export_carries_the_keys_and_imports_again(tmp_path: Path) -> None:
    store = SqliteDeviceStore(tmp_path / "devices.sqlite")
    store.replace_all([record(A, intuneDeviceId=INTUNE_A, serialNumber="F2LX0001"), record(B)], now=NOW)
    for fmt in ("json", "csv"):
        path = tmp_path / f"devices.{fmt}"
        path.write_text(export(store, fmt))
        assert {(r.azure_ad_device_id, r.intune_device_id, r.serial_number) for r in parse_import(path)} == {
            (A, INTUNE_A.lower(), "F2LX0001"), (B, None, None)}, fmt
    store.close()


@pytest.mark.slow
def test_devices_show_finds_a_device_by_serial_and_refuses_an_ambiguous_one(tmp_path: Path) -> None:
    config = tmp_path / "config"
    shutil.copytree(REPO / "config", config)
    cli = devices_cli(config)
    imported = tmp_path / "devices.csv"
    imported.write_text("azureADDeviceId,complianceState,intuneDeviceId,serialNumber\n"
                        f"{A},compliant,{INTUNE_A},F2LX0001\n{B},compliant,,F2LX0002\n")
    assert cli("import", str(imported)).returncode == 0
    store = SqliteDeviceStore(tmp_path / ".portcullis" / "devices.sqlite")
    store.upsert(record(C, serialNumber="F2LX0002"), now=NOW)  # as a Graph sync may list it
    store.close()
    shown = json.loads(cli("show", "--by", "serialNumber", " f2lx0001").stdout)
    assert (shown["device_id"], shown["intune_device_id"], shown["serial_number"]) == (A, INTUNE_A.lower(), "F2LX0001")
    assert json.loads(cli("show", "--by", "intuneDeviceId", INTUNE_A)
                      .stdout)["device_id"] == A
    ambiguous = cli("show", "--by", "serialNumber", "F2LX0002")
    assert (ambiguous.returncode, ambiguous.stderr) == (
        1, f"portcullis: serialNumber 'F2LX0002' names 2 devices: {B}, {C}\n")
    assert "serial F2LX0001" in next(line for line in cli("list").stdout.splitlines() if line.startswith(A))
