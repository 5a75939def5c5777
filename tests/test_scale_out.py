"""Two gateways (``portcullis run`` processes) sharing one real Redis: what one accepts, the
other enforces within a second; Redis down means the staleness rules, then 503; it comes back
by itself."""

from __future__ import annotations

import json
import subprocess
import time
import uuid

import pytest

from gateway.app import bootstrap
from gateway.app.demo import ALEX_IPHONE
from gateway.signals.mtd import sign
from tests.conftest import MTD_SECRET, AlexPing, Gateway
from tests.gateway_process import PORTCULLIS
from tests.helpers.browser import BROWSER, granted_callback
from tests.helpers.hosts import MAIL, SERVICE
from tests.helpers.scale_out import STALENESS, Instance
from tests.redis_server import RedisServer

pytestmark = pytest.mark.slow  # processes of their own (workers, gateways): ./dev test -m 'not slow' skips them


def risk(level: str) -> str:
    return json.dumps({"events": [{"deviceId": ALEX_IPHONE, "threatLevel": level, "eventId": str(uuid.uuid4())}]})


def test_a_risk_raise_at_one_gateway_blocks_at_the_other_within_a_second(pair: tuple[Instance, Instance],
                                                                          alex: str) -> None:
    first, second = pair
    assert [second.sync(alex) for _ in range(3)] == [200] * 3  # the device is now in the second's cache
    ping = AlexPing(second.gateway, heartbeat_seconds=8, port=second.port,
                    decision_log=second.config_dir.parent / ".portcullis" / "decisions.jsonl").started()
    pushed = time.monotonic()
    assert first.push(risk("high")).status_code == 202
    while second.sync(alex) != 403:
        assert time.monotonic() - pushed < 1.0, "the second gateway still allows Alex a second later"
    assert time.monotonic() - pushed < 1.0
    closed = ping.closed_after(pushed)
    assert closed is not None and closed < 1.0  # the open long-poll at the other gateway was closed too
    assert first.push(risk("secured")).status_code == 202
    second.process.wait_until(lambda: second.sync(alex) == 200, timeout=1)


def test_set_risk_from_the_command_line_reaches_both_gateways(pair: tuple[Instance, Instance], alex: str) -> None:
    first, second = pair
    assert (first.sync(alex), second.sync(alex)) == (200, 200)
    command = subprocess.run([PORTCULLIS, "devices", "--config", str(first.config_dir), "set-risk", ALEX_IPHONE,
                              "high", "--partner", "soc-analyst"], capture_output=True, text=True, timeout=30)
    assert command.returncode == 0, command.stderr
    changed = time.monotonic()
    for instance in (first, second):
        while instance.sync(alex) != 403:
            assert time.monotonic() - changed < 1.0, "a gateway still allows Alex a second after set-risk"


def test_a_replayed_push_is_refused_by_the_other_gateway(pair: tuple[Instance, Instance]) -> None:
    first, second = pair
    body, timestamp = risk("low"), str(int(time.time()))
    headers = {"Content-Type": "application/json", "X-Portcullis-Timestamp": timestamp,
               "X-Portcullis-Signature": sign(MTD_SECRET.encode(), timestamp, body.encode())}
    answers = [instance.gateway.request(SERVICE, "/mtd/demo-mtd/events", method="POST", content=body,
                                        headers=headers, port=instance.port).status_code
               for instance in (first, second)]
    assert answers == [202, 409]


def test_a_sign_in_started_at_one_gateway_finishes_at_the_other_and_a_logout_ends_it_everywhere(
        pair: tuple[Instance, Instance]) -> None:
    first, second = pair
    gateway = first.gateway
    callback, binding = granted_callback(_at(gateway, first.port), "alex@contoso.test", ALEX_IPHONE)
    finished = gateway.request(MAIL, callback, headers={"Cookie": binding}, port=second.port)
    assert finished.status_code == 302, finished.text  # the other gateway knew the pending sign-in
    session = finished.headers["set-cookie"].split(";", 1)[0]
    for instance in (first, second):
        page = gateway.request(MAIL, "/owa/", headers={**BROWSER, "Cookie": session}, port=instance.port)
        assert page.status_code == 200, page.text
    assert gateway.request(MAIL, callback, headers={"Cookie": binding}, port=first.port).status_code == 400  # once
    logout = gateway.request(MAIL, "/.portcullis/logout", method="POST", port=first.port,
                             headers={"Cookie": session, "Origin": f"https://{MAIL}"})
    assert logout.status_code == 200
    ended = time.monotonic()
    while gateway.request(MAIL, "/owa/", headers={**BROWSER, "Cookie": session}, port=second.port).status_code != 302:
        assert time.monotonic() - ended < 1.0, "the other gateway still honours the session a second later"


def test_redis_down_means_staleness_then_503_and_it_reconnects_by_itself(pair: tuple[Instance, Instance],
                                                                         redis_server: RedisServer,
                                                                         alex: str) -> None:
    first, _ = pair
    assert first.sync(alex) == 200
    redis_server.stop()
    down = time.monotonic()
    assert first.sync(alex) == 200  # the last good answer, younger than maxStalenessSeconds
    first.process.wait_until(lambda: first.readiness() == 503, timeout=5)
    while first.sync(alex) == 200:
        assert time.monotonic() - down < STALENESS + 2, "still allowed after maxStalenessSeconds"
        time.sleep(0.1)
    assert time.monotonic() - down >= STALENESS - 0.5
    assert first.sync(alex) == 503  # fail closed: the signal source is unavailable
    redis_server.start()  # empty: reseed it as a gateway start would
    loaded = bootstrap.load(first.config_dir)
    bootstrap.seed_store(loaded)
    loaded.shared.close()  # type: ignore[union-attr]
    first.process.wait_until(lambda: first.readiness() == 200, timeout=10)
    assert first.sync(alex) == 200
    assert "change events are back" in first.process.text


def _at(gateway: Gateway, port: int) -> Gateway:
    """The same test client, aimed at another gateway's port."""
    return Gateway(port=port, idp=gateway.idp, ca=gateway.ca, config_dir=gateway.config_dir,
                   decision_log=gateway.decision_log, upstreams=gateway.upstreams)
