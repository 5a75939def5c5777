"""Hot reload: validated and tested before the swap, atomic, no request lost or decided under
half of each config; a bad change keeps the last good rules and says where it is wrong."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from ruamel.yaml import YAML

from gateway.app import bootstrap
from gateway.app.demo import ACTIVESYNC, ALEX_IPHONE, BLAKE_ANDROID, EXCHANGE, OFFICE, OUTLOOK_MOBILE
from gateway.decision.service import AccessService
from gateway.ops.operations import Operations
from gateway.policy.model import AccessRequest, ManagedDevice
from tests.conftest import (
    AlexPing,
    Background,
    Gateway,
    LongPoll,
    Ports,
    demo_config_copy,
)
from tests.gateway_process import GatewayProcess, sibling_config
from tests.helpers.kiosk import BROWSER, kiosk_browser, kiosk_sign_in
from tests.helpers.reload import own_config, reloading_gateway, save, stricter, wait_for_reloads

MAIL = "mail.contoso.test"
PORTCULLIS = str(Path(sys.executable).with_name("portcullis"))


def alex_syncs(gateway: Gateway, port: int, token: str) -> int:
    return gateway.request(MAIL, ACTIVESYNC, method="POST", token=token, port=port).status_code


def alex_token(gateway: Gateway) -> str:
    return gateway.idp.mint(user="alex@contoso.test", client_id=OUTLOOK_MOBILE, audience=EXCHANGE,
                            device_id=ALEX_IPHONE)


def test_reload_under_load_loses_no_request(gateway: Gateway, tmp_path: Path, demo_ports: Ports) -> None:
    config_dir = own_config(tmp_path, gateway, demo_ports)
    policies = config_dir / "policies.yaml"
    original = policies.read_text()
    token = alex_token(gateway)
    statuses: Counter[object] = Counter()
    stop = threading.Event()

    def hammer() -> None:
        with gateway.client() as client:
            while not stop.is_set():
                try:
                    response = client.post(f"https://127.0.0.1:{port}{ACTIVESYNC}",
                                           headers={"Host": MAIL, "Authorization": f"Bearer {token}"},
                                           extensions={"sni_hostname": MAIL})
                    statuses[response.status_code] += 1
                except httpx.HTTPError as error:
                    statuses[type(error).__name__] += 1

    with Background(lambda: reloading_gateway(config_dir)) as (port, operations):
        assert alex_syncs(gateway, port, token) == 200
        workers = [threading.Thread(target=hammer) for _ in range(4)]
        for worker in workers:
            worker.start()
        for round_ in range(1, 9):
            save(policies, stricter(original) if round_ % 2 else original)
            wait_for_reloads(operations, round_)
            time.sleep(0.05)
        stop.set()
        for worker in workers:
            worker.join(15)
        save(policies, stricter(original))
        wait_for_reloads(operations, 9)
        assert alex_syncs(gateway, port, token) == 403  # the last rules are in force
        applied = operations.service.metrics.reloads.labels("success", "fileWatch")._value.get()
    assert applied == 9
    assert set(statuses) == {200, 403}, statuses  # every request answered under one of the two rule sets
    assert statuses[200] > 0 and statuses[403] > 0


def test_a_request_in_flight_finishes_under_the_rules_it_started_with(gateway: Gateway, tmp_path: Path,
                                                                      demo_ports: Ports) -> None:
    config_dir = own_config(tmp_path, gateway, demo_ports)
    loaded = bootstrap.load(config_dir)
    bootstrap.seed_store(loaded)
    looked_up, release = threading.Event(), asyncio.Event()

    class SlowInventory:
        """Holds the device lookup until the test has reloaded stricter rules."""

        name = "slow"

        async def managed_device(self, device_id: str) -> ManagedDevice | None:
            looked_up.set()
            await release.wait()
            return await loaded.inventory.managed_device(device_id)

    async def scenario() -> tuple[int, int]:
        service, jwks = bootstrap.build_service(loaded, inventory=SlowInventory())
        await jwks.refresh()
        operations = Operations.of(service, jwks, loaded.inventory)
        token = alex_token(gateway)
        in_flight = asyncio.create_task(decide(service, token))
        while not looked_up.is_set():
            await asyncio.sleep(0.01)
        (config_dir / "policies.yaml").write_text(stricter((config_dir / "policies.yaml").read_text()))
        assert (await operations.reloader.reload("test")).applied
        release.set()
        first = await in_flight
        second = await decide(service, token)
        service.close()
        return first, second

    first, second = asyncio.run(scenario())
    assert (first, second) == (200, 403)


async def decide(service: AccessService, token: str) -> int:
    request = AccessRequest(correlation_id=f"c-{time.monotonic_ns()}", host=MAIL, path=ACTIVESYNC.split("?")[0],
                            target=ACTIVESYNC, method="POST", client_ip="127.0.0.1",
                            user_agent="Outlook-iOS-Android/1.0", accepts_html=False)
    outcome = await service.authorize(request, [f"Bearer {token}"])
    return outcome.decision.status_code


KIOSKS_CLOSED = """
  - name: kiosks-closed
    displayName: "Kiosks: closed"
    state: enabled
    conditions:
      resources: {include: [All]}
      locations: {include: [kiosk]}
    grantControls:
      builtInControls: [block]
"""


def kiosk_long_requests(gateway: Gateway, kiosk: httpx.Client, log: Path) -> Callable[[int], LongPoll]:
    """A kiosk browser, signed in naming Alex's iPhone (which the kiosk ignores: its decisions
    use no device), holding OWA requests open for ``heartbeat`` seconds (the demo backend holds
    any request with ``Cmd=Ping`` as it holds ActiveSync's)."""
    cookie = kiosk_sign_in(kiosk, device=ALEX_IPHONE).headers["set-cookie"].split(";", 1)[0]

    def long_request(heartbeat: int) -> LongPoll:
        def send(user_agent: str) -> int:
            return kiosk.get(f"https://{MAIL}/owa/?Cmd=Ping&HeartbeatInterval={heartbeat}", timeout=20,
                             headers={"Cookie": cookie, "User-Agent": user_agent}).status_code

        return LongPoll(send, BROWSER["User-Agent"], log, gateway.upstreams)

    return long_request


def alex_ping(gateway: Gateway, port: int, log: Path, heartbeat: int) -> LongPoll:
    return AlexPing(gateway, heartbeat_seconds=heartbeat, port=port, decision_log=log)


@pytest.mark.parametrize("through", ["gateway", "kiosk"])
@pytest.mark.slow
def test_a_tightening_reload_closes_open_long_polls(gateway: Gateway, tmp_path: Path, demo_ports: Ports,
                                                     through: str) -> None:
    """An ActiveSync Ping can stay open for an hour, and so can a kiosk browser's request: each is
    decided again when the rules change, whether its decision used a device (Alex's phone through
    the gateway) or none (the kiosk)."""
    config_dir = own_config(tmp_path, gateway, demo_ports)
    policies = config_dir / "policies.yaml"
    with Background(lambda: reloading_gateway(config_dir)) as (port, operations), \
            kiosk_browser(gateway, config_dir) as kiosk:
        log = operations.service.decision_log.path
        long_request: Callable[[int], LongPoll]
        if through == "gateway":
            device: str | None = ALEX_IPHONE
            long_request = functools.partial(alex_ping, gateway, port, log)
        else:
            device, long_request = None, kiosk_long_requests(gateway, kiosk, log)
        untouched = long_request(5).started()
        save(policies, policies.read_text().replace("displayName: \"Exchange:", "displayName: \"Exchange (v2):", 1))
        wait_for_reloads(operations, 1)
        again = untouched.decisions(1, again=True)[0]  # after the grace
        assert untouched.held()  # while it is still open
        assert (again["result"], again["deviceDetail"]["deviceId"], again["httpStatus"]) == ("allow", device, None)
        assert untouched.closed_after(time.monotonic()) is None  # rules that still allow it: answered, not cut
        assert untouched.status == 200
        own = untouched.decisions(1, again=False)[0]  # its own record, written when it was answered
        assert (own["result"], own["deviceDetail"]["deviceId"], own["httpStatus"]) == ("allow", device, 200)
        ping = long_request(8).started()
        changed = time.monotonic()
        text = policies.read_text()
        save(policies, stricter(text) if through == "gateway" else text + KIOSKS_CLOSED)
        wait_for_reloads(operations, 2)
        closed = ping.closed_after(changed)
        assert closed is not None and closed < 5, f"the long request was answered ({ping.status}), not closed"
        own = ping.decisions(1, again=False)[0]  # logged once it was closed: after the re-decision that closed it
        withdrawn = ping.decisions(1, again=True)[-1]
        assert (withdrawn["result"], withdrawn["httpStatus"]) == ("block", None)  # closed: the new rules refuse it
        assert (own["result"], own["httpStatus"], own["upstreamStatus"]) == ("allow", None, None)


def test_an_invalid_change_keeps_the_last_good_rules(gateway: Gateway, tmp_path: Path, demo_ports: Ports) -> None:
    config_dir = own_config(tmp_path, gateway, demo_ports)
    policies = config_dir / "policies.yaml"
    original = policies.read_text()
    token = alex_token(gateway)
    with Background(lambda: reloading_gateway(config_dir)) as (port, operations):
        broken = original.replace("    state: enabled\n", "    state: enabeld\n", 1)
        line = original[:original.index("    state: enabled\n")].count("\n") + 1
        save(policies, stricter(broken))
        wait_for_reloads(operations, 1)
        outcome = operations.reloader.last
        assert outcome is not None and not outcome.applied
        assert any(f"policies.yaml:{line}:" in p and "enabeld" in p for p in outcome.problems), outcome.problems
        assert alex_syncs(gateway, port, token) == 200  # not half-applied: the stricter threat level is not in force
        config_check = next(c for c in operations.health.checks() if c.name == "config")
        assert config_check.status == "warn" and "enabeld" in config_check.detail
        assert operations.service.metrics.config_valid._value.get() == 0
        save(policies, stricter(original))
        wait_for_reloads(operations, 2)
        assert operations.reloader.last is not None and operations.reloader.last.applied
        assert alex_syncs(gateway, port, token) == 403
        assert next(c for c in operations.health.checks() if c.name == "config").status == "pass"
        assert operations.service.metrics.config_valid._value.get() == 1


def test_a_change_only_a_restart_can_apply_is_refused_with_its_line(gateway: Gateway, tmp_path: Path,
                                                                   demo_ports: Ports) -> None:
    config_dir = own_config(tmp_path, gateway, demo_ports)
    settings = config_dir / "portcullis.yaml"
    text = settings.read_text()
    changed = text.replace("clockSkewSeconds: 30", "clockSkewSeconds: 60")
    assert changed != text
    line = changed[:changed.index("clockSkewSeconds: 60")].count("\n") + 1
    with Background(lambda: reloading_gateway(config_dir)) as (_, operations):
        save(settings, changed)
        wait_for_reloads(operations, 1)
        outcome = operations.reloader.last
    assert outcome is not None and not outcome.applied
    assert len(outcome.problems) == 1
    problem = outcome.problems[0]
    assert "portcullis.yaml:" in problem and "identity" in problem and "only a restart" in problem
    reported_line = int(problem.split("portcullis.yaml:")[1].split(":")[0])
    assert reported_line <= line  # the section that changed, at or above the changed key


def test_a_reload_never_leaves_a_resource_without_its_last_enforced_policy(gateway: Gateway, tmp_path: Path,
                                                                           demo_ports: Ports) -> None:
    """A half-written policies file is still valid YAML: the first policy alone. Applied, it would
    open OWA and SharePoint to any valid token."""
    config_dir = own_config(tmp_path, gateway, demo_ports)
    policies = config_dir / "policies.yaml"
    text = policies.read_text()
    prefix = text[:text.index("  - name: owa-compliant-device")]
    problems, owa = refused_reload(gateway, config_dir, policies, prefix, "/owa/")
    assert any("'exchange-owa' would be covered by no enabled policy" in p for p in problems)
    assert any("'sharepoint-sites' would be covered by no enabled policy" in p for p in problems)
    assert owa == 403  # Blake's noncompliant phone is still refused


def refused_reload(gateway: Gateway, config_dir: Path, file: Path, text: str, path: str) -> tuple[tuple[str, ...], int]:
    """Save ``text`` into ``file`` of a watched gateway; the reload must be rejected. Returns its
    problems and what Blake's noncompliant phone then gets for ``path``."""
    blake = gateway.idp.mint(user="blake@contoso.test", client_id=OFFICE, audience=EXCHANGE, device_id=BLAKE_ANDROID)
    with Background(lambda: reloading_gateway(config_dir)) as (port, operations):
        save(file, text)
        wait_for_reloads(operations, 1)
        outcome = operations.reloader.last
        status = gateway.request(MAIL, path, token=blake, port=port).status_code
    assert outcome is not None and not outcome.applied
    return outcome.problems, status


def test_a_reload_never_adds_a_resource_no_policy_covers(gateway: Gateway, tmp_path: Path, demo_ports: Ports) -> None:
    """A new resource in portcullis.yaml before its policy reaches policies.yaml would be open."""
    config_dir = own_config(tmp_path, gateway, demo_ports)
    settings = config_dir / "portcullis.yaml"
    text = settings.read_text()
    new_resource = "resources:\n  new-app:\n    hosts: [mail.contoso.test]\n    paths: [/newapp/]\n  #"
    added = text.replace("resources:                           #", new_resource, 1)
    assert added != text
    problems, status = refused_reload(gateway, config_dir, settings, added, "/newapp/")
    assert any("'new-app' would be covered by no enabled policy" in p for p in problems), problems
    assert status == 403  # still a path no resource names: denied


def test_a_change_that_fails_the_policy_tests_is_refused(gateway: Gateway, tmp_path: Path, demo_ports: Ports) -> None:
    config_dir = own_config(tmp_path, gateway, demo_ports, keep_cases=True)
    policies = config_dir / "policies.yaml"
    token = alex_token(gateway)
    with Background(lambda: reloading_gateway(config_dir)) as (port, operations):
        save(policies, stricter(policies.read_text()))
        wait_for_reloads(operations, 1)
        outcome = operations.reloader.last
        assert outcome is not None and not outcome.applied
        assert any("Outlook on Alex's compliant, low-risk iPhone syncs" in p for p in outcome.problems)
        assert alex_syncs(gateway, port, token) == 200


KIOSK_DOWNLOAD_ALLOWED = """
  - name: a kiosk download is allowed, only flagged with blockDownloads
    user: kiosk@contoso.test
    url: https://docs.contoso.test/_layouts/15/download.aspx
    listener: kiosk
    expect: {result: allow}
"""


def test_the_case_gate_expects_what_the_gateway_answers_not_what_policy_alone_says(
        gateway: Gateway, tmp_path: Path, demo_ports: Ports) -> None:
    """Policy allows a kiosk download with blockDownloads; the gateway then refuses it (403). A
    case that expects the allow is wrong about the gateway, so the reload it comes with is refused."""
    config_dir = own_config(tmp_path, gateway, demo_ports, keep_cases=True)
    cases = config_dir / "cases.yaml"
    problems, _ = refused_reload(gateway, config_dir, cases, cases.read_text() + KIOSK_DOWNLOAD_ALLOWED, "/owa/")
    assert any("a kiosk download is allowed, only flagged with blockDownloads: result: expected allow, got block "
               "(downloads are blocked in this session)" in p for p in problems), problems


def test_sighup_reloads_a_running_gateway(tmp_path: Path) -> None:
    config_dir = demo_config_copy(tmp_path, Ports.fresh())
    (config_dir / "cases.yaml").unlink()
    process = subprocess.Popen([PORTCULLIS, "demo", "--config", str(config_dir)], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    assert process.stdout is not None and process.stderr is not None
    reader = threading.Thread(target=lambda: log.extend(iter(process.stderr.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not process.stdout.readline().startswith("curl"):
            assert time.monotonic() < deadline and process.poll() is None, "".join(log)
        policies = config_dir / "policies.yaml"
        save(policies, stricter(policies.read_text()))
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while not any("config reloaded (SIGHUP)" in line for line in log):
            assert time.monotonic() < deadline and process.poll() is None, "".join(log)
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(60)
    assert process.returncode == 0


@contextlib.contextmanager
def issuer_that_holds() -> Iterator[tuple[int, threading.Event, threading.Event]]:
    """An issuer address that accepts a connection and holds it, without an answer, until
    ``release`` is set; ``asked`` is set once a gateway connected (it is then starting)."""
    server, asked, release = socket.create_server(("127.0.0.1", 0)), threading.Event(), threading.Event()

    def hold() -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = server.accept()
                asked.set()
                release.wait(30)
                connection.close()

    threading.Thread(target=hold, daemon=True).start()
    try:
        yield server.getsockname()[1], asked, release
    finally:
        release.set()
        server.close()


def test_a_sighup_while_the_gateway_starts_is_held_until_it_can_reload(gateway: Gateway, demo_ports: Ports,
                                                                       tmp_path: Path) -> None:
    """Its default action ends the process: before the handler is installed, a SIGHUP (an
    operator's reload, a deploy hook) must wait, not kill a starting gateway."""
    config_dir = sibling_config(tmp_path, gateway, demo_ports)
    with issuer_that_holds() as (port, asked, release):
        yaml = YAML()
        settings = yaml.load(config_dir / "portcullis.yaml")
        settings["identity"]["issuer"] = f"http://127.0.0.1:{port}/contoso"  # fetched while starting
        yaml.dump(settings, config_dir / "portcullis.yaml")
        process = GatewayProcess(config_dir)
        try:
            assert asked.wait(30), process.text
            process.process.send_signal(signal.SIGHUP)
            release.set()  # no keys: the gateway starts anyway (and refuses tokens until it has them)
            process.wait_for(r"Portcullis is listening")
            process.wait_for(r"config reloaded \(SIGHUP\)")
        finally:
            assert process.stop() == 0, process.text
