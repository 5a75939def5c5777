"""Require app protection policy (``compliantApplication``, 53005): the control, the app
registration stores (SQLite and real Redis) and the seed, and the gateway through its real
listener with tokens from the demo issuer: BYOD without enrolment, a flagged registration, a store
that is down, and continuous access evaluation closing an open long-poll when a registration is
flagged or removed."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import redis

from gateway.app import bootstrap
from gateway.app.demo import BLAKE_ANDROID, CASEY_IPAD, EXCHANGE, OUTLOOK_MOBILE
from gateway.decision.service import utc_now
from gateway.errors import ConfigError
from gateway.http.headers import CORRELATION_ID
from gateway.policy.model import AppProtection, AppRegistration, ClientApp, DeviceSignals
from gateway.signals.app_protection import AppRegistrationStore, MemoryAppRegistrations, parse_registrations
from gateway.signals.app_registrations_sqlite import SqliteAppRegistrations
from gateway.state.redis_state import RedisState
from tests.conftest import Background, Gateway, LongPoll, Ports, proxy_for
from tests.helpers.policy import COMPLIANT, NOW, TEAMS, UNKNOWN_DEVICE, decide, device, policy
from tests.helpers.reload import own_config, save
from tests.helpers.replay import replay, totals
from tests.helpers.signals import devices_cli
from tests.redis_server import RedisServer

MAIL = "mail.contoso.test"
OUTLOOK_IOS = "com.microsoft.office.outlook"  # lower case, as stored
BYOD = {"operator": "OR", "builtInControls": ["compliantDevice", "compliantApplication"]}
APP_ONLY = {"builtInControls": ["compliantApplication"]}
PHONE = "d1"  # the device test_policy's signals name


def registration(name: str = "r1", *, user: str = "alex@contoso.test", device_id: str | None = None,
                 applied: tuple[str, ...] = ("Outlook protection",), flagged: tuple[str, ...] = (),
                 synced: timedelta | None = timedelta(hours=1), app: str = OUTLOOK_IOS) -> AppRegistration:
    return AppRegistration(registration_id=name, app_identifier=app, platform="iOS", user_id=None,
                           user_principal_name=user, device_id=device_id, applied_policies=applied,
                           flagged_reasons=flagged, last_sync=NOW - synced if synced is not None else None)


def outlook(*registrations: AppRegistration, max_age: timedelta | None = timedelta(hours=24)) -> ClientApp:
    protection = AppProtection(registrations=registrations, source="test", max_sync_age=max_age)
    return ClientApp(client_id=OUTLOOK_MOBILE, name="outlook-mobile", protection=protection)


NO_DEVICE = DeviceSignals(device_id=None, device=None, source="test")


@pytest.mark.parametrize(
    ("grant", "dev", "app", "status", "code", "reason"),
    [
        pytest.param(BYOD, NO_DEVICE, outlook(registration()), 200, None, "allowed",
                     id="BYOD: no device, a current registration with a policy applied -> allow"),
        pytest.param(BYOD, NO_DEVICE, outlook(), 403, 53000, None,
                     id="no device, no registration: both alternatives fail, Entra asks for the device first"),
        pytest.param(BYOD, COMPLIANT, outlook(), 200, None, "allowed",
                     id="compliant device OR app protection: the device alone grants"),
        pytest.param(APP_ONLY, NO_DEVICE, outlook(), 403, 53005,
                     "app protection policy required: no registration of this app for this user",
                     id="no registration -> 53005"),
        pytest.param(APP_ONLY, NO_DEVICE, ClientApp(client_id=OUTLOOK_MOBILE, name="outlook-mobile"), 403, 53005,
                     "app protection policy required: no registration of this app for this user",
                     id="registrations never looked up: fails closed"),
        pytest.param(APP_ONLY, NO_DEVICE, outlook(registration(flagged=("rootedDevice",))), 403, 53005,
                     "app protection policy required: registration flagged (rootedDevice)",
                     id="flagged (jailbroken) -> 53005"),
        pytest.param(APP_ONLY, NO_DEVICE, outlook(registration(applied=())), 403, 53005,
                     "app protection policy required: no app protection policy applied to the app",
                     id="no policy applied -> 53005"),
        pytest.param(APP_ONLY, NO_DEVICE, outlook(registration(synced=timedelta(hours=25))), 403, 53005,
                     "app protection policy required: the app last checked in 90000s ago (allowed: 86400s)",
                     id="not checked in within the window -> 53005"),
        pytest.param(APP_ONLY, NO_DEVICE, outlook(registration(synced=timedelta(hours=23))), 200, None, "allowed",
                     id="checked in within the window -> allow"),
        pytest.param(APP_ONLY, NO_DEVICE, outlook(registration(synced=None)), 403, 53005,
                     "app protection policy required: the app never checked in with Intune",
                     id="never checked in -> 53005"),
        pytest.param(APP_ONLY, NO_DEVICE, outlook(registration(synced=None), max_age=None), 200, None, "allowed",
                     id="window off: check-ins are not looked at"),
        pytest.param(APP_ONLY, COMPLIANT, outlook(registration(device_id="another-phone")), 403, 53005,
                     "app protection policy required: no registration of this app for this user on this device",
                     id="the token names a device: a registration on another device does not count"),
        pytest.param(APP_ONLY, COMPLIANT, outlook(registration(device_id=PHONE)), 200, None, "allowed",
                     id="the registration on the token's device counts"),
        pytest.param(APP_ONLY, UNKNOWN_DEVICE, outlook(registration()), 200, None, "allowed",
                     id="a registration naming no device (unenrolled) counts on a registered device"),
        pytest.param(APP_ONLY, NO_DEVICE, outlook(registration("a", flagged=("rootedDevice",)), registration("b")),
                     200, None, "allowed", id="one good registration of several is enough"),
        pytest.param(APP_ONLY, NO_DEVICE, TEAMS, 403, 53005,
                     "app protection policy required: no registration of this app for this user",
                     id="an app without registrations (no bundle id configured) -> 53005"),
    ],
)
def test_compliant_application(grant: dict[str, object], dev: DeviceSignals, app: ClientApp, status: int,
                               code: int | None, reason: str | None) -> None:
    decision = decide([policy(**grant)], dev, app)
    assert (decision.status_code, decision.error_code) == (status, code)
    if reason is not None:
        assert decision.reason == reason


def test_app_protection_is_asked_after_an_approved_app_as_entra_orders_it() -> None:
    both = policy(builtInControls=["compliantApplication", "approvedApplication"], approvedApplications=["teams"])
    decision = decide([both], device(), outlook())
    assert [f.control for f in decision.policies[0].failures] == ["approvedApplication", "compliantApplication"]
    assert decision.error_code == 53002


# -- the stores and the seed


@pytest.fixture(params=["sqlite", "redis", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AppRegistrationStore]:
    if request.param == "memory":  # the seed alone, without a database
        yield MemoryAppRegistrations()
        return
    if request.param == "sqlite":
        sqlite = SqliteAppRegistrations(tmp_path / "devices.sqlite")
        yield sqlite
        sqlite.close()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    server.start()
    state = RedisState.from_url(server.url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    yield state.apps
    state.close()


def test_a_store_finds_a_users_registrations_of_an_app_by_object_id_or_upn(store: AppRegistrationStore) -> None:
    by_oid = replace(registration("by-oid", user=""), user_principal_name=None, user_id="oid-1")
    others = [registration("other-app", app="com.microsoft.teams"), registration("other-user", user="blake@x")]
    assert store.replace_all([registration("by-upn"), by_oid, *others], now=NOW) == 4
    found = store.registrations_for(["oid-1", "alex@contoso.test"], [OUTLOOK_IOS])
    assert [r.registration_id for r in found] == ["by-oid", "by-upn"]
    assert found[1] == registration("by-upn")  # every field round-trips
    assert store.count() == 4


def test_a_registration_naming_an_object_id_is_found_by_it_and_never_by_upn(store: AppRegistrationStore) -> None:
    """A token's UPN is a claim another issuer could mint for anyone: Graph's registrations, which
    carry the user's object id, are found by it alone."""
    graphs = replace(registration("graph"), user_id="oid-1")  # names the UPN too
    store.replace_all([graphs], now=NOW)
    assert store.registrations_for(["alex@contoso.test"], [OUTLOOK_IOS]) == []
    assert store.registrations_for(["oid-1"], [OUTLOOK_IOS]) == [graphs]


def test_a_full_sync_prunes_the_rest_but_an_empty_answer_prunes_nothing(store: AppRegistrationStore) -> None:
    store.replace_all([registration("a"), registration("b")], now=NOW)
    store.replace_all([], now=NOW, prune=True)
    assert store.count() == 2
    store.replace_all([registration("b")], now=NOW, prune=True)
    assert [r.registration_id for r in store.registrations()] == ["b"]
    assert store.registrations_for(["alex@contoso.test"], [OUTLOOK_IOS]) == [registration("b")]


def test_removing_a_registration_says_which_were_there(store: AppRegistrationStore) -> None:
    store.replace_all([registration("a")], now=NOW)
    assert store.remove(["A", "missing"], now=NOW) == {"a"}
    assert store.registrations_for(["alex@contoso.test"], [OUTLOOK_IOS]) == []


def test_sqlite_writes_log_the_users_they_changed_and_an_unchanged_row_logs_nothing(tmp_path: Path) -> None:
    store = SqliteAppRegistrations(tmp_path / "devices.sqlite")
    start = store.last_change()
    store.replace_all([registration("a"), registration("b", user="blake@contoso.test")], now=NOW)
    seq, users, complete = store.changes_since(start)
    assert (users, complete) == ({"alex@contoso.test", "blake@contoso.test"}, True)
    store.replace_all([registration("a"), registration("b", user="blake@contoso.test")], now=NOW)
    assert store.changes_since(seq)[1] == set()
    store.remove(["b"], now=NOW)
    assert store.changes_since(seq)[1] == {"blake@contoso.test"}


def test_redis_writes_announce_the_users_they_changed(redis_server: RedisServer) -> None:
    redis_server.start()
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    state = RedisState.from_url(redis_server.url, prefix=prefix)
    listener = redis.Redis.from_url(redis_server.url, decode_responses=True).pubsub()
    listener.subscribe(f"{prefix}app-registrations")
    assert listener.get_message(timeout=2)["type"] == "subscribe"  # type: ignore[index]
    state.apps.replace_all([registration("a", flagged=("rootedDevice",))], now=NOW)
    message = listener.get_message(timeout=2)
    assert message is not None and json.loads(message["data"]) == ["alex@contoso.test"]
    listener.close()
    state.close()


def test_the_seed_reads_graph_shapes_and_names_the_line_of_every_bad_entry(tmp_path: Path) -> None:
    seed = tmp_path / "app-registrations.yaml"
    seed.write_text("""registrations:
  - id: ok
    "@odata.type": "#microsoft.graph.androidManagedAppRegistration"
    appIdentifier:
      {"@odata.type": "#microsoft.graph.androidMobileAppIdentifier", packageId: Com.Microsoft.Office.Outlook}
    userId: 6F1A0000-0000-4000-8000-000000000001
    flaggedReasons: [none]
    lastSyncDateTime: 2026-11-23T11:00:00Z
  - id: ios-without-bundle
    "@odata.type": "#microsoft.graph.iosManagedAppRegistration"
    appIdentifier: {packageId: com.microsoft.office.outlook}
    userId: u
  - id: ok
    "@odata.type": "#microsoft.graph.iosManagedAppRegistration"
    appIdentifier: {bundleId: com.microsoft.Office.Outlook}
    userPrincipalName: alex@contoso.test
    lastSynced: yesterday
  - id: OK
    "@odata.type": "#microsoft.graph.iosManagedAppRegistration"
    appIdentifier: {bundleId: com.microsoft.Office.Outlook}
    userPrincipalName: alex@contoso.test
""")
    with pytest.raises(ConfigError) as error:
        parse_registrations(seed)
    lines = sorted((p.line, p.message) for p in error.value.problems)
    assert [line for line, _ in lines] == [9, 17, 18], lines
    assert "names its app by bundleId" in lines[0][1] and "Extra inputs" in lines[1][1]
    assert lines[2][1] == "registration 'OK' is listed twice"
    seed.write_text(seed.read_text().split("  - id: ios-without-bundle")[0])
    [parsed] = parse_registrations(seed)
    assert (parsed.app_identifier, parsed.user_id, parsed.platform, parsed.flagged_reasons) == \
        ("com.microsoft.office.outlook", "6f1a0000-0000-4000-8000-000000000001", "android", ())


def test_the_shipped_seed_reads() -> None:
    seeded = {r.registration_id: r for r in parse_registrations(Path(__file__).parent.parent / "config" /
                                                                "app-registrations.yaml")}
    assert seeded["ios-outlook-casey-ipad"].flagged_reasons == ("rootedDevice",)
    assert seeded["android-outlook-drew-personal"].device_id is None


# -- through the listener


BYOD_POLICIES = """policies:
  - name: mail-compliant-device-or-app-protection
    displayName: "Mail: compliant device or app protection policy"
    state: enabled
    conditions:
      resources: {include: [All]}
    grantControls:
      operator: OR
      builtInControls: [compliantDevice, compliantApplication]
"""


@pytest.fixture
def byod_config(tmp_path: Path, gateway: Gateway, demo_ports: Ports) -> Path:
    config_dir = own_config(tmp_path, gateway, demo_ports)
    save(config_dir / "policies.yaml", BYOD_POLICIES)
    return config_dir


@contextlib.contextmanager
def byod_gateway(config_dir: Path) -> Iterator[tuple[int, Path]]:
    """The BYOD rules on a listener of their own, polling the store as a running gateway does."""

    @contextlib.asynccontextmanager
    async def running() -> AsyncIterator[tuple[int, Path]]:
        import asyncio

        loaded = bootstrap.load(config_dir)
        bootstrap.seed_store(loaded)
        service, jwks = bootstrap.build_service(loaded)
        await jwks.refresh()
        watcher = asyncio.create_task(service.watch_changes())
        try:
            async with proxy_for(service) as port:
                yield port, service.decision_log.path
        finally:
            watcher.cancel()

    with Background(running) as started:
        yield started


def token(gateway: Gateway, user: str, device_id: str | None = None, client_id: str = OUTLOOK_MOBILE) -> str:
    return gateway.idp.mint(user=user, client_id=client_id, audience=EXCHANGE, device_id=device_id)


def ews(gateway: Gateway, port: int, bearer: str) -> httpx.Response:
    return gateway.request(MAIL, "/EWS/Exchange.asmx", method="POST", token=bearer, port=port,
                           headers={"User-Agent": "Outlook-iOS/2.0"})


def logged(log: Path, correlation_id: str) -> dict[str, object]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines() if log.exists() else ():
            if correlation_id in line:
                with contextlib.suppress(json.JSONDecodeError):
                    return dict(json.loads(line))
        time.sleep(0.01)
    raise AssertionError(f"no record of {correlation_id}")


def test_byod_outlook_with_app_protection_and_no_enrolled_device_is_allowed(gateway: Gateway,
                                                                           byod_config: Path) -> None:
    with byod_gateway(byod_config) as (port, log):
        answer = ews(gateway, port, token(gateway, "drew@contoso.test"))  # Drew's personal phone: no deviceid
        assert answer.status_code == 200, answer.text
        record = logged(log, answer.headers[CORRELATION_ID])
    signal = next(s for s in record["signals"] if s["name"] == "appProtection")  # type: ignore[attr-defined]
    assert (signal["value"], signal["source"]) == ("registered", "sqlite")
    [seen] = record["evaluationInput"]["appProtection"]["registrations"]  # type: ignore[index]
    assert seen["id"] == "android-outlook-drew-personal" and "userPrincipalName" not in seen


@pytest.mark.parametrize(("user", "device_id", "client_id", "reason", "signal"), [
    pytest.param("casey@contoso.test", None, OUTLOOK_MOBILE, "registration flagged (rootedDevice)", "flagged",
                 id="a flagged registration"),
    pytest.param("blake@contoso.test", None, "1fec8e78-bce4-4aaf-ab1b-5451cc387264",
                 "no registration of this app for this user", "notRegistered",
                 id="an app without registrations (Teams)"),
    pytest.param("alex@contoso.test", BLAKE_ANDROID, OUTLOOK_MOBILE,
                 "no registration of this app for this user on this device", "otherDevice",
                 id="a token naming a noncompliant device Alex's registration is not on"),
])
def test_without_a_current_registration_or_compliant_device_access_is_refused(
        gateway: Gateway, byod_config: Path, user: str, device_id: str | None, client_id: str, reason: str,
        signal: str) -> None:
    with byod_gateway(byod_config) as (port, log):
        answer = ews(gateway, port, token(gateway, user, device_id, client_id))
        record = logged(log, answer.headers[CORRELATION_ID])
    assert answer.status_code == 403
    failures = record["appliedConditionalAccessPolicies"][0]["failedControls"]  # type: ignore[index]
    assert any(f["control"] == "compliantApplication" and reason in f["reason"] for f in failures), failures
    assert [s["value"] for s in record["signals"] if s["name"] == "appProtection"] == [signal]  # type: ignore[attr-defined]


def test_blake_on_a_noncompliant_phone_gets_in_with_outlooks_app_protection(gateway: Gateway,
                                                                           byod_config: Path) -> None:
    with byod_gateway(byod_config) as (port, _):
        assert ews(gateway, port, token(gateway, "blake@contoso.test", BLAKE_ANDROID)).status_code == 200


def test_app_protection_alone_refuses_with_53005(gateway: Gateway, byod_config: Path) -> None:
    save(byod_config / "policies.yaml", BYOD_POLICIES.replace("operator: OR", "operator: AND").replace(
        "[compliantDevice, compliantApplication]", "[compliantApplication]"))
    with byod_gateway(byod_config) as (port, _):
        answer = ews(gateway, port, token(gateway, "casey@contoso.test", CASEY_IPAD))
    assert answer.status_code == 403
    assert "53005" in answer.text


def test_an_app_registration_store_that_is_down_fails_closed(gateway: Gateway, byod_config: Path) -> None:
    with byod_gateway(byod_config) as (port, log):
        loaded = bootstrap.load(byod_config)
        database = loaded.config.path(loaded.config.gateway_file.device_signals.database)  # type: ignore[arg-type]
        with contextlib.closing(sqlite3.connect(database)) as other:
            other.execute("ALTER TABLE app_registrations RENAME TO app_registrations_gone")
            other.commit()
        answer = ews(gateway, port, token(gateway, "drew@contoso.test"))
        assert answer.status_code == 503
        record = logged(log, answer.headers[CORRELATION_ID])
    assert record["status"]["failureReason"] == "a signal source is unavailable; try again shortly"  # type: ignore[index]


@pytest.mark.parametrize("change", ["flagged", "removed"])
def test_an_open_long_poll_is_closed_within_a_second_when_its_registration_is_flagged_or_removed(
        gateway: Gateway, byod_config: Path, change: str) -> None:
    bearer = token(gateway, "drew@contoso.test")  # BYOD: no device, so no device change could close it
    with byod_gateway(byod_config) as (port, log):
        def send(user_agent: str) -> int:
            return gateway.request(MAIL, "/Microsoft-Server-ActiveSync?Cmd=Ping&HeartbeatInterval=8", method="POST",
                                   token=bearer, port=port, headers={"User-Agent": user_agent},
                                   timeout=20).status_code

        ping = LongPoll(send, "Outlook-Android/2.0", log, gateway.upstreams).started()
        loaded = bootstrap.load(byod_config)
        other = SqliteAppRegistrations(loaded.config.path(loaded.config.gateway_file.device_signals.database))  # type: ignore[arg-type]
        drews = other.registration("android-outlook-drew-personal")
        assert drews is not None
        changed = time.monotonic()
        if change == "flagged":
            other.replace_all([replace(drews, flagged_reasons=("androidBootloaderUnlocked",))], now=utc_now())
        else:  # as `portcullis apps remove` does, from another process's connection
            other.remove([drews.registration_id], now=utc_now())
        closed = ping.closed_after(changed)
        other.close()
        assert closed is not None and closed < 1.0, f"the long-poll was not closed within a second: {closed}"
        withdrawn = ping.decisions(1, again=True)[-1]
    assert (withdrawn["result"], withdrawn["status"]["errorCode"]) == ("block", 53000)  # OR: the device is asked first


# -- portcullis check


def test_check_warns_at_every_approved_application_without_an_app_protection_alternative(tmp_path: Path) -> None:
    from gateway.config import load_config
    from gateway.config.lint import config_warnings
    from tests.helpers.config import shipped_config

    demo = shipped_config(Path(__file__).parent.parent / "config", tmp_path)
    policies = demo / "policies.yaml"
    text = policies.read_text()
    lines = text.splitlines()
    retired = [w for w in config_warnings(load_config(demo)) if "Entra retired the approvedApplication" in w.message]
    assert [(w.file.endswith("policies.yaml"), w.line) for w in retired] == \
        [(True, lines.index("      builtInControls: [compliantDevice, approvedApplication]") + 1)]
    assert "policy 'exchange-outlook-only'" in retired[0].message and "March 2026" in retired[0].message
    migrated = text.replace("      operator: AND\n      builtInControls: [compliantDevice, approvedApplication]",
                            "      operator: OR\n      builtInControls: [approvedApplication, compliantApplication]")
    save(policies, migrated.replace("      maxDeviceThreatLevel: low\n", "", 1))
    assert not [w for w in config_warnings(load_config(demo)) if "approvedApplication" in w.message]


# -- portcullis apps


GRAPH_EXPORT = {"@odata.context": "https://graph.microsoft.com/v1.0/$metadata#deviceAppManagement/managedAppRegistrations",
                "value": [{
                    "@odata.type": "#microsoft.graph.iosManagedAppRegistration", "id": "0f6d2a49-ios-outlook-kim",
                    "appIdentifier": {"@odata.type": "#microsoft.graph.iosMobileAppIdentifier",
                                      "bundleId": "com.microsoft.Office.Outlook"},
                    "userId": "7d1c0000-0000-4000-8000-00000000a0a0", "deviceTag": "kim-tag",
                    "deviceName": "Kim's iPhone", "flaggedReasons": [], "lastSyncDateTime": "2026-11-23T11:00:00Z",
                    "appliedPolicies": [{"@odata.type": "#microsoft.graph.iosManagedAppProtection",
                                         "id": "T_1", "displayName": "iOS mail"}]}]}


def test_apps_command_imports_lists_shows_and_removes(tmp_path: Path, gateway: Gateway, demo_ports: Ports) -> None:
    config_dir = own_config(tmp_path, gateway, demo_ports)
    cli = devices_cli(config_dir, "apps")
    export = tmp_path / "registrations.json"
    export.write_text(json.dumps(GRAPH_EXPORT))
    imported = cli("import", str(export))
    assert (imported.returncode, imported.stdout) == (0, f"imported 1 app registrations from {export}\n")
    listed = cli("list").stdout
    assert "0f6d2a49-ios-outlook-kim  iOS     com.microsoft.office.outlook" in listed and "protected" in listed
    shown = json.loads(cli("show", "0F6D2A49-ios-outlook-kim").stdout)
    assert (shown["userId"], shown["appliedPolicies"], shown["deviceTag"]) == \
        ("7d1c0000-0000-4000-8000-00000000a0a0", ["iOS mail"], "kim-tag")
    assert cli("remove", "0f6d2a49-ios-outlook-kim").returncode == 0
    missing = cli("show", "0f6d2a49-ios-outlook-kim")
    assert (missing.returncode, missing.stderr) == (1, "portcullis: no app registration '0f6d2a49-ios-outlook-kim'\n")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"value": [{**GRAPH_EXPORT["value"][0], "appIdentifier": {}}]}))  # type: ignore[index]
    refused = cli("import", str(bad))
    assert refused.returncode == 1 and "give exactly one of bundleId (iOS) and packageId (Android)" in refused.stderr


def test_replay_decides_with_the_registrations_of_the_time(gateway: Gateway, byod_config: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Drew's registration is removed afterwards: the decision log's record of it still reproduces
    the allow (today's store is not asked), and Casey's flagged one the block."""
    with byod_gateway(byod_config) as (port, log):
        assert ews(gateway, port, token(gateway, "drew@contoso.test")).status_code == 200
        assert ews(gateway, port, token(gateway, "casey@contoso.test")).status_code == 403
        loaded = bootstrap.load(byod_config)
        assert loaded.apps is not None
        loaded.apps.remove(["android-outlook-drew-personal"], now=utc_now())
    code, out, _ = replay(capsys, "--config", byod_config, log)
    assert code == 0, out
    assert totals(out)["same result"] == 2 and totals(out)["skipped"] == 0, out


def test_pseudonymised_logs_keep_no_phone_name_of_a_registration() -> None:
    from gateway.decision.log import Pseudonymizer, app_protection_json

    protection = AppProtection(registrations=(replace(registration(), device_name="Drew's personal phone"),),
                               source="sqlite")
    record = {"evaluationInput": {"subject": "s", "appProtection": app_protection_json(protection)}}
    [written] = Pseudonymizer(b"0123456789abcdef").apply(record)["evaluationInput"]["appProtection"]["registrations"]
    assert written["deviceName"].startswith("pseudonym:") and "Drew" not in json.dumps(written)
    assert "userPrincipalName" not in written and "userId" not in written


def test_a_registration_changed_on_another_host_is_heard_over_redis(redis_server: RedisServer) -> None:
    """Redis announces each write on ``<prefix>app-registrations``: every gateway's subscriber hears
    the users it concerns and continuous access evaluation decides their open flows again."""
    import asyncio

    from gateway.events import AppRegistrationsChanged

    redis_server.start()
    prefix = f"t{uuid.uuid4().hex[:8]}:"

    async def scenario() -> list[AppRegistrationsChanged]:
        state, other = RedisState.from_url(redis_server.url, prefix=prefix), RedisState.from_url(redis_server.url,
                                                                                                 prefix=prefix)
        heard: list[AppRegistrationsChanged] = []
        connected, changed = asyncio.Event(), asyncio.Event()
        events = state.events(on_connected=connected.set, on_apps=lambda e: (heard.append(e), changed.set()))
        job = asyncio.create_task(events.run())
        try:
            await asyncio.wait_for(connected.wait(), 5)
            await asyncio.to_thread(other.apps.replace_all, [registration("a", user="drew@contoso.test")], now=NOW)
            await asyncio.wait_for(changed.wait(), 5)
        finally:
            job.cancel()
            await state.aclose()
            other.close()
        return heard

    assert asyncio.run(scenario()) == [AppRegistrationsChanged(frozenset({"drew@contoso.test"}))]


def test_check_reports_a_bad_seed_entry_at_its_line_beside_a_database(tmp_path: Path) -> None:
    from tests.helpers.config import shipped_config
    from tests.helpers.signals import PORTCULLIS

    demo = shipped_config(Path(__file__).parent.parent / "config", tmp_path)  # a database and the seed
    (demo / "cases.yaml").unlink()  # read when the gateway's files are, not only when a case asks What If
    seed = demo / "app-registrations.yaml"
    seed.write_text(seed.read_text().replace("flaggedReasons: [rootedDevice]", "flaggedReasons: rootedDevice"))
    result = subprocess.run([PORTCULLIS, "check", "--config", str(demo)], capture_output=True, text=True, timeout=60)
    line = seed.read_text().splitlines().index("    flaggedReasons: rootedDevice") + 1
    assert result.returncode == 1
    assert f"app-registrations.yaml:{line}:" in result.stderr and "flaggedReasons" in result.stderr, result.stderr
