"""The MTD webhook through the real listener: signed pushes change what the next request gets,
close open long-polls, and everything malformed or forged is refused with a clear 4xx."""

from __future__ import annotations

import json
import logging
import socket
import ssl
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from gateway.app.demo import ALEX_IPHONE, CASEY_IPAD, DREW_IPHONE, EXCHANGE, OUTLOOK_MOBILE, activesync
from gateway.errors import SignalUnavailable
from gateway.signals.mtd import MtdReceiver, Partner, sign
from gateway.web.mtd_webhook import mtd_webhook_app
from tests.conftest import MTD_SECRET, AlexPing, Gateway
from tests.helpers.hosts import MAIL, SERVICE
from tests.helpers.mtd import level, push, sync


def test_signed_push_raises_risk_closes_long_poll_and_lowering_restores(gateway: Gateway, restore_alex: None) -> None:
    """The Ping is closed within a second of the push being accepted, without another request of
    the device: the clock starts at the 202 (the gateway has stored the raise and told its open
    flows before it answers), not before the push, whose own duration is no propagation."""
    ping = AlexPing(gateway).started()
    answer = push(gateway, level(ALEX_IPHONE, "highSeverity"))
    accepted = time.monotonic()
    assert (answer.status_code, answer.json()) == (202, {"accepted": 1, "unknownDevices": [], "ignored": []})
    closed = ping.closed_after(accepted)  # negative when it was closed before the 202 reached us
    assert closed is not None and closed < 1.0, f"the long-poll was not closed within a second of the 202: {closed}"
    blocked = sync(gateway)
    assert (blocked.status_code, blocked.json()["reason"]) == (403, "device risk high, allowed: low")
    assert push(gateway, level(ALEX_IPHONE, "secured")).status_code == 202
    assert sync(gateway).status_code == 200


def test_deactivated_clears_the_partners_verdict(gateway: Gateway) -> None:
    """Casey's iPad has one partner only: without its verdict the level is unknown (fail closed)."""
    token = gateway.idp.mint(user="casey@contoso.test", client_id=OUTLOOK_MOBILE, audience=EXCHANGE,
                             device_id=CASEY_IPAD)

    def casey_syncs() -> int:
        return gateway.request(MAIL, activesync(CASEY_IPAD, "casey"), method="POST", token=token).status_code

    assert casey_syncs() == 200
    assert push(gateway, level(CASEY_IPAD, "deactivated")).status_code == 202
    try:
        assert casey_syncs() == 403
    finally:
        assert push(gateway, level(CASEY_IPAD, "lowSeverity")).status_code == 202
    assert casey_syncs() == 200


@pytest.mark.parametrize(
    ("kwargs", "status", "message"),
    [
        pytest.param({"secret": "another-secret-of-enough-length"}, 401, "signature does not match",
                     id="wrong secret"),
        pytest.param({"timestamp": int(time.time()) - 3600}, 401, "timestamp outside the accepted window",
                     id="stale timestamp"),
        pytest.param({"partner": "acme"}, 404, "unknown MTD partner", id="unknown partner"),
        pytest.param({"headers": {"Content-Type": "text/plain"}}, 415, "Content-Type must be application/json",
                     id="not JSON"),
        pytest.param({"headers": {"X-Portcullis-Signature": ""}}, 401, "are required", id="no signature"),
    ],
)
def test_forged_or_malformed_pushes_are_refused(gateway: Gateway, kwargs: dict[str, object], status: int,
                                                message: str) -> None:
    answer = push(gateway, level(ALEX_IPHONE, "high"), **kwargs)  # type: ignore[arg-type]
    assert answer.status_code == status
    assert message in answer.json()["error"]
    assert sync(gateway).status_code == 200


def test_a_push_is_accepted_only_once(gateway: Gateway, restore_alex: None) -> None:
    ts, body = str(int(time.time())), level(ALEX_IPHONE, "low")
    headers = {"Content-Type": "application/json", "X-Portcullis-Timestamp": ts,
               "X-Portcullis-Signature": sign(MTD_SECRET.encode(), ts, body.encode())}
    first = gateway.request(SERVICE, "/mtd/demo-mtd/events", method="POST", content=body, headers=headers)
    again = gateway.request(SERVICE, "/mtd/demo-mtd/events", method="POST", content=body, headers=headers)
    assert (first.status_code, again.status_code) == (202, 409)


def test_oversized_push_is_refused_before_it_is_read(gateway: Gateway) -> None:
    answer = push(gateway, b'{"events": [' + b" " * 70_000 + b"]}")
    assert answer.status_code == 413


@pytest.mark.parametrize(
    ("body", "message"),
    [("not json", "body is not JSON"), ('{"events": []}', "expected 1 to 1000 events"),
     (level(ALEX_IPHONE, "purple"), "'purple' is not a known level"),
     ('{"events": [{"deviceId": 7, "threatLevel": "high"}]}', "needs deviceId and threatLevel strings")],
)
def test_malformed_bodies_get_400(gateway: Gateway, body: str, message: str) -> None:
    answer = push(gateway, body)
    assert answer.status_code == 400 and message in answer.json()["error"]


def test_unknown_devices_and_stateless_verdicts_are_reported(gateway: Gateway) -> None:
    body = json.dumps({"events": [{"deviceId": "00000000-0000-0000-0000-000000000000", "threatLevel": "low"},
                                  {"deviceId": ALEX_IPHONE, "partnerReportedThreatState": "activated"}]})
    answer = push(gateway, body)
    assert answer.status_code == 202
    assert answer.json() == {"accepted": 0, "unknownDevices": ["00000000-0000-0000-0000-000000000000"],
                             "ignored": [f"{ALEX_IPHONE}: activated"]}


def test_heartbeat_is_recorded_and_other_methods_refused(gateway: Gateway) -> None:
    assert push(gateway, "{}", path="heartbeat").status_code == 202
    assert gateway.request(SERVICE, "/mtd/demo-mtd/events").status_code == 405


def test_service_host_is_never_forwarded_upstream(gateway: Gateway) -> None:
    answer = gateway.request(SERVICE, "/owa/")
    assert answer.status_code == 404
    assert "backend" not in answer.text


def raw_post(gateway: Gateway, path: str, headers: list[tuple[str, str]], body: bytes) -> int:
    """An HTTP/1.1 request written byte for byte (header values an HTTP library would refuse)."""
    context = ssl.create_default_context()
    gateway.ca.configure_trust(context)
    head = "".join(f"{name}: {value}\r\n" for name, value in [("Host", SERVICE), *headers,
                                                                ("Content-Length", str(len(body))),
                                                                ("Connection", "close")])
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=SERVICE) as tls:
        tls.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode("latin-1") + body)
        answer = b"".join(iter(lambda: tls.recv(4096), b""))
    return int(answer.split(b" ", 2)[1])


@pytest.mark.parametrize("mangle", [lambda s: s + "\xa0", lambda s: s + " \xa0", lambda s: s.upper(),
                                    lambda s: s.replace("sha256=", "SHA256=")])
def test_a_captured_signature_cannot_be_reused_in_another_spelling(gateway: Gateway, mangle) -> None:
    ts, body = str(int(time.time())), level(ALEX_IPHONE, "low").encode()
    signature = sign(MTD_SECRET.encode(), ts, body)
    headers = [("Content-Type", "application/json"), ("X-Portcullis-Timestamp", ts)]
    assert raw_post(gateway, "/mtd/demo-mtd/events", [*headers, ("X-Portcullis-Signature", signature)], body) == 202
    again = raw_post(gateway, "/mtd/demo-mtd/events", [*headers, ("X-Portcullis-Signature", mangle(signature))], body)
    assert again in (400, 401, 409)


class FlakyService:
    """The webhook's one dependency, failing its first store as a locked database would."""

    def __init__(self, failures: int = 1) -> None:
        self.calls, self.failures = 0, failures
        self.stored: list[tuple[str, object]] = []  # ("verdicts" | "contact", the time it was stored at)

    def record_threat_verdicts(self, partner: str, verdicts: list[object], now: object) -> list[str]:
        self.calls += 1
        if self.calls <= self.failures:
            raise SignalUnavailable("database is locked")
        self.stored.append(("verdicts", now))
        return []

    def record_partner_contact(self, partner: str, now: object) -> None:
        self.stored.append(("contact", now))


def test_a_push_that_could_not_be_stored_gets_503_and_its_retry_is_accepted() -> None:
    from starlette.testclient import TestClient

    receiver = MtdReceiver({"acme": Partner("acme", MTD_SECRET.encode(), 300, 3600)})
    app = mtd_webhook_app(receiver, FlakyService(), lambda: datetime.now(UTC))  # type: ignore[arg-type]
    ts, body = str(int(time.time())), level(ALEX_IPHONE, "high")
    headers = {"Content-Type": "application/json", "X-Portcullis-Timestamp": ts,
               "X-Portcullis-Signature": sign(MTD_SECRET.encode(), ts, body.encode())}
    with TestClient(app) as client:
        failed = client.post("/mtd/acme/events", content=body, headers=headers)
        retried = client.post("/mtd/acme/events", content=body, headers=headers)
        replayed = client.post("/mtd/acme/events", content=body, headers=headers)
    assert (failed.status_code, retried.status_code, replayed.status_code) == (503, 202, 409)


def test_a_push_reporting_an_old_event_still_counts_as_contact_now() -> None:
    """Verdicts are ordered by the time they report, but the partner was heard from when the push
    arrived: stored at the report time, an old event would make the partner look unresponsive and
    every verdict of it be ignored."""
    from starlette.testclient import TestClient

    arrived = datetime.now(UTC).replace(microsecond=0)
    reported = arrived - timedelta(days=8)
    service = FlakyService(failures=0)
    receiver = MtdReceiver({"acme": Partner("acme", MTD_SECRET.encode(), 300, 3600)})
    app = mtd_webhook_app(receiver, service, lambda: arrived)  # type: ignore[arg-type]
    ts = str(int(arrived.timestamp()))
    body = json.dumps({"events": [{"deviceId": ALEX_IPHONE, "threatLevel": "high",
                                   "reportedDateTime": reported.isoformat()}]})
    headers = {"Content-Type": "application/json", "X-Portcullis-Timestamp": ts,
               "X-Portcullis-Signature": sign(MTD_SECRET.encode(), ts, body.encode())}
    with TestClient(app) as client:
        assert client.post("/mtd/acme/events", content=body, headers=headers).status_code == 202
    assert ("verdicts", reported) in service.stored
    assert ("contact", arrived) in service.stored


def _signed_headers(body: bytes, timestamp: str | None = None) -> list[tuple[str, str]]:
    ts = timestamp or str(int(time.time()))
    return [("Content-Type", "application/json"), ("X-Portcullis-Timestamp", ts),
            ("X-Portcullis-Signature", sign(MTD_SECRET.encode(), ts, body))]


def _twice(name: str, other: str, *, other_first: bool) -> Callable[[list[tuple[str, str]]], list[tuple[str, str]]]:
    """The signed headers with ``name`` sent a second time, holding ``other``."""
    def mangle(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        sent: list[tuple[str, str]] = []
        for header in headers:
            copies = [(name, other), header] if other_first else [header, (name, other)]
            sent += copies if header[0] == name else [header]
        return sent
    return mangle


SIGNED_BY_ANOTHER = "sha256=" + "0" * 64
DUPLICATED_HEADERS = [
    pytest.param(lambda h: h, 202, id="twin: each header once"),
    pytest.param(_twice("X-Portcullis-Timestamp", "1", other_first=False), 400, id="timestamp twice, the signed first"),
    pytest.param(_twice("X-Portcullis-Timestamp", "1", other_first=True), 400, id="timestamp twice, the signed last"),
    pytest.param(_twice("X-Portcullis-Signature", SIGNED_BY_ANOTHER, other_first=False), 400,
                 id="signature twice, the valid first"),
    pytest.param(_twice("X-Portcullis-Signature", SIGNED_BY_ANOTHER, other_first=True), 400,
                 id="signature twice, the valid last"),
    pytest.param(lambda h: [*h, h[2]], 400, id="the same signature twice"),
    pytest.param(_twice("Content-Type", "text/plain", other_first=False), 400, id="Content-Type twice"),
]


@pytest.mark.parametrize(("mangle", "status"), DUPLICATED_HEADERS)
def test_a_header_the_push_is_judged_by_must_be_sent_once(gateway: Gateway, restore_alex: None,
                                                          mangle: Callable[[list[tuple[str, str]]],
                                                                           list[tuple[str, str]]],
                                                          status: int, caplog: pytest.LogCaptureFixture) -> None:
    """Read once, a repeated header is whichever copy the reader picks: refused (and logged), and
    the push is not applied (Alex keeps syncing) although one of its copies signs it."""
    body = level(ALEX_IPHONE, "high").encode()
    with caplog.at_level(logging.WARNING, "gateway.web.mtd_webhook"):
        assert raw_post(gateway, "/mtd/demo-mtd/events", mangle(_signed_headers(body)), body) == status
    assert sync(gateway).status_code == (403 if status == 202 else 200)
    assert ("must be sent once" in caplog.text) is (status == 400)


DEEP = "[" * 20_000 + "]" * 20_000
ONE_READING_BODIES = [
    pytest.param(level(ALEX_IPHONE, "high").encode(), 202, id="twin: UTF-8 JSON, each member once"),
    pytest.param(DEEP.encode(), 400, id="20,000 [ and their ]"),
    pytest.param(b"[" * 20_000, 400, id="20,000 [ unclosed"),
    pytest.param(f'{{"events": [{{"deviceId": "{ALEX_IPHONE}", "threatLevel": "high", "x": {DEEP}}}]}}'.encode(), 400,
                 id="an event nested 20,000 deep"),
    pytest.param(f'{{"events": [{{"deviceId": "{ALEX_IPHONE}", "threatLevel": "low", "threatLevel": "high"}}]}}'
                 .encode(), 400, id="threatLevel twice"),
    pytest.param(f'{{"events": [{{"deviceId": "{DREW_IPHONE}", "deviceId": "{ALEX_IPHONE}", "threatLevel": "high"}}]}}'
                 .encode(), 400, id="deviceId twice"),
    pytest.param(level(ALEX_IPHONE, "high").encode("utf-16"), 400, id="in UTF-16"),
    pytest.param(b"\xef\xbb\xbf" + level(ALEX_IPHONE, "high").encode(), 400, id="after a byte-order mark"),
]


@pytest.mark.parametrize(("body", "status"), ONE_READING_BODIES)
def test_a_validly_signed_body_without_one_reading_gets_400_and_is_not_applied(gateway: Gateway, restore_alex: None,
                                                                             body: bytes, status: int,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "gateway.web.mtd_webhook"):
        assert raw_post(gateway, "/mtd/demo-mtd/events", _signed_headers(body), body) == status
    assert sync(gateway).status_code == (403 if status == 202 else 200)
    assert ("refused with 400: body " in caplog.text) is (status == 400)
