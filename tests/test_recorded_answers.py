"""A forwarded request's decision record says what the client got (``httpStatus``) and what the
upstream answered (``upstreamStatus``): a 404 or 500 of the upstream, the gateway's 502 when the
upstream failed, the 403 page that replaced a download, nothing when the client hung up or the
gateway stopped first. Each test reads the status on the client's side and compares."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from mitmproxy.test import tflow

from addons.decision_records import DecisionRecords
from addons.flow_state import state
from gateway.app.demo import ACTIVESYNC
from tests.conftest import Background, Gateway, Ports, free_port, logged_records
from tests.helpers.decision_log import logged
from tests.helpers.http import tls_to
from tests.helpers.operations import operated, own_config
from tests.helpers.replay import replay, totals
from tests.helpers.session_controls import BROWSER, docs
from tests.helpers.tokens import outlook_token
from tests.helpers.upstreams import SilentUpstream, SocketUpstream, hang_up_while_pings_wait

MAIL = "mail.contoso.test"
PORTCULLIS = str(Path(sys.executable).with_name("portcullis"))
ANSWERS = {  # what StatusUpstream sends for ``answer=<name>``
    "404": b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 9\r\n\r\nnot found",
    "500": b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\nContent-Length: 6\r\n\r\nbroken",
    "503": b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
    "200": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok",
    "101": b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    "ambiguous framing": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nok",
    "nothing": b"",  # the connection is closed without an answer
    "cut": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\npartial",  # then closed
}


class StatusUpstream(SocketUpstream):
    """The mail upstream: answers each request with ``ANSWERS[answer]`` (the ``answer`` query
    parameter), then closes the connection."""

    def answer(self, connection: socket.socket, request_line: bytes) -> None:
        target = request_line.split(b" ")[1].decode()
        connection.sendall(next(v for k, v in ANSWERS.items() if f"answer={k.replace(' ', '%20')}" in target))


@pytest.fixture
def status_gateway(gateway: Gateway, tmp_path: Path, demo_ports: Ports) -> Iterator[tuple[Gateway, Path, Path]]:
    """A gateway in front of ``StatusUpstream``: the client, the config and the decision log. (Not
    shared by the module: while it runs, mitmproxy hands it the session gateway's connections too.)"""
    upstream = StatusUpstream()
    config_dir = own_config(tmp_path, gateway, Ports(0, demo_ports.idp, upstream.port, demo_ports.docs))
    with Background(lambda: operated(config_dir)) as (port, operations):
        yield replace(gateway, port=port), config_dir, operations.service.decision_log.path
    upstream.close()


def alex_syncs(gateway: Gateway, answer: str) -> tuple[int, str]:
    """Alex's phone (allowed) syncs; the upstream answers ``answer``. The client's status and the
    correlation id the gateway put on the answer."""
    response = gateway.request(MAIL, f"{ACTIVESYNC}&answer={answer}", method="POST", token=outlook_token(gateway))
    return response.status_code, response.headers["x-portcullis-correlation-id"]


@pytest.mark.parametrize("answer", ["200", "404", "500", "503"])
def test_the_record_of_a_forwarded_request_has_the_upstreams_status(status_gateway: tuple[Gateway, Path, Path],
                                                                      answer: str) -> None:
    gateway, _, log = status_gateway
    status, correlation_id = alex_syncs(gateway, answer)
    record = logged(log, correlation_id)
    assert status == int(answer)
    assert (record["result"], record["httpStatus"], record["upstreamStatus"]) == ("allow", status, status)


@pytest.mark.parametrize(("answer", "upstream"), [
    pytest.param("nothing", None, id="closed without an answer -> 502, no upstream status"),
    pytest.param("101", 101, id="a protocol switch nobody asked for -> 502, upstream 101"),
    pytest.param("ambiguous framing", 200, id="Content-Length and chunked -> 502, upstream 200"),
    pytest.param("cut", 200, id="a head, then closed mid-body (held whole: no byte sent yet) -> 502, upstream 200"),
])
def test_an_upstream_that_fails_is_recorded_with_the_gateways_502(status_gateway: tuple[Gateway, Path, Path],
                                                                  answer: str, upstream: int | None) -> None:
    gateway, _, log = status_gateway
    status, correlation_id = alex_syncs(gateway, answer.replace(" ", "%20"))
    record = logged(log, correlation_id)
    logged(log, alex_syncs(gateway, "200")[1])  # the log is written in order: anything of the first is in by now
    assert status == 502
    assert (record["result"], record["httpStatus"], record["upstreamStatus"]) == ("allow", 502, upstream)
    assert [r["correlationId"] for r in logged_records(log)].count(correlation_id) == 1


def test_an_upstream_that_is_down_is_recorded_with_the_gateways_502(gateway: Gateway, tmp_path: Path,
                                                                     demo_ports: Ports) -> None:
    config_dir = own_config(tmp_path, gateway, Ports(0, demo_ports.idp, free_port(), demo_ports.docs))
    with Background(lambda: operated(config_dir)) as (port, operations):
        status, correlation_id = alex_syncs(replace(gateway, port=port), "200")
        record = logged(operations.service.decision_log.path, correlation_id)
    assert status == 502
    assert (record["result"], record["httpStatus"], record["upstreamStatus"]) == ("allow", 502, None)


def test_a_client_that_hangs_up_before_its_answer_is_recorded_without_one(gateway: Gateway, tmp_path: Path,
                                                                            demo_ports: Ports) -> None:
    """While a Ping waits for the upstream, an HTTP/1.1 client closes its connection and an HTTP/2
    client resets its stream: neither got an answer, and their records say so."""
    upstream = SilentUpstream()
    config_dir = own_config(tmp_path, gateway, Ports(0, demo_ports.idp, upstream.port, demo_ports.docs))
    with Background(lambda: operated(config_dir)) as (port, operations):
        hang_up_while_pings_wait(replace(gateway, port=port), upstream)
        records = pings(operations.service.decision_log.path, count=2)
    upstream.close()
    assert [(r["result"], r["httpStatus"], r["upstreamStatus"]) for r in records] == [("allow", None, None)] * 2


def pings(log: Path, count: int) -> list[dict[str, Any]]:
    """The ActiveSync records in ``log`` (the test's Pings), once there are ``count`` of them (the
    writer thread may be mid-line: a half line is skipped until it is whole)."""
    deadline = time.monotonic() + 10
    while len(records := [r for r in logged_records(log)
                          if r["request"]["path"] == "/Microsoft-Server-ActiveSync"]) < count:
        assert time.monotonic() < deadline, f"{len(records)} Ping records, not {count}"
        time.sleep(0.01)
    return records


def test_a_request_open_when_the_gateway_stops_is_recorded_without_an_answer(gateway: Gateway, tmp_path: Path,
                                                                              demo_ports: Ports) -> None:
    """Its record waited for an answer that never came: it is written when the gateway stops, not lost."""
    upstream = SilentUpstream()
    config_dir = own_config(tmp_path, gateway, Ports(0, demo_ports.idp, upstream.port, demo_ports.docs))
    ping = ACTIVESYNC.replace("Cmd=Sync", "Cmd=Ping")
    running = Background(lambda: operated(config_dir))
    port, operations = running.__enter__()
    stopped = False
    try:
        with tls_to(replace(gateway, port=port)) as tls:
            tls.sendall(f"POST {ping} HTTP/1.1\r\nHost: {MAIL}\r\nAuthorization: Bearer {outlook_token(gateway)}\r\n"
                        "Content-Length: 0\r\n\r\n".encode())
            assert upstream.held.get(timeout=10) == "received"
            log = operations.service.decision_log.path
            assert pings(log, 0) == []  # waiting for its answer
            running.__exit__(None, None, None)  # the gateway stops (drain time over) while the Ping is open
            stopped = True
            [record] = pings(log, 1)
    finally:
        if not stopped:
            running.__exit__(None, None, None)
        upstream.close()
    assert (record["result"], record["httpStatus"], record["upstreamStatus"]) == ("allow", None, None)


def test_a_download_replaced_by_block_downloads_is_recorded_as_the_403_the_client_got(gateway: Gateway) -> None:
    """Policy allowed the request; the session control replaced the upstream's attachment."""
    replaced = docs(gateway, "/sites/team/Shared%20Documents/report.docx?download=1", kiosk=True, headers=BROWSER)
    record = gateway.decision(replaced.headers["x-portcullis-correlation-id"])
    assert replaced.status_code == 403
    assert (record["result"], record["httpStatus"], record["upstreamStatus"], record["restriction"]) == \
        ("allow", 403, 200, "blockDownloads")


def test_replay_decides_again_what_the_gateway_decided_not_what_the_upstream_answered(
        status_gateway: tuple[Gateway, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Allowed requests the upstream answered 404, 500 or 503, or failed (502), or that got no
    answer: the same decision under the same rules, none taken for a signal outage (a 503 of the
    gateway's own) or skipped. A re-decision while a request was open is no request of its own."""
    gateway, config_dir, log = status_gateway
    sent = {answer: alex_syncs(gateway, answer)[1] for answer in ("404", "500", "503", "nothing")}
    records = [logged(log, correlation_id) for correlation_id in sent.values()]
    hung_up = {**records[0], "id": "hung-up", "correlationId": "hung-up", "httpStatus": None, "upstreamStatus": None}
    again = {**records[1], "continuousAccessEvaluation": True, "httpStatus": None}  # logged before the request's own
    replayed = tmp_path / "decisions.jsonl"
    replayed.write_text("".join(json.dumps(r) + "\n" for r in (again, *records, hung_up)))
    code, out, _ = replay(capsys, "--config", config_dir, replayed)
    assert code == 0
    assert totals(out) == {"same result": 5, "blocked for another reason": 0, "allow→block": 0, "block→allow": 0,
                           "skipped": 0}


def test_why_shows_what_the_client_and_the_upstream_got(status_gateway: tuple[Gateway, Path, Path]) -> None:
    gateway, config_dir, log = status_gateway
    status, correlation_id = alex_syncs(gateway, "404")
    logged(log, correlation_id)
    result = subprocess.run([PORTCULLIS, "why", "--config", str(config_dir), "--json", correlation_id],
                            capture_output=True, text=True, timeout=60)
    assert json.loads(result.stdout)["httpStatus"] == status
    trace = subprocess.run([PORTCULLIS, "why", "--config", str(config_dir), correlation_id],
                           capture_output=True, text=True, timeout=60).stdout
    assert "result:   allow (HTTP 404, upstream 404)" in trace


class WrittenRecords:
    """``AccessService.record_answer``'s part that DecisionRecords calls: what it was given."""

    def __init__(self) -> None:
        self.written: list[tuple[str, int | None, int | None]] = []

    def record_answer(self, record: dict[str, Any], http_status: int | None, upstream_status: int | None,
                      restriction: object = None) -> None:
        self.written.append((record["correlationId"], http_status, upstream_status))


def test_a_record_still_waiting_when_its_client_connection_ends_is_written_without_an_answer() -> None:
    """mitmproxy raises neither ``response`` nor ``error`` for a flow whose HTTP layer itself
    failed: its record is written when the client connection ends, once; other connections' wait."""
    service = WrittenRecords()
    records = DecisionRecords(service)  # type: ignore[arg-type]  # only record_answer is called
    ended, other = tflow.tflow(), tflow.tflow(resp=True)
    for name, flow in (("ended", ended), ("other", other)):
        state(flow).record = {"correlationId": name}
        records.requestheaders(flow)
    records.client_disconnected(ended.client_conn)
    records.error_answered(ended)  # too late: nothing left to write
    assert service.written == [("ended", None, None)]
    records.response(other)  # the other connection's answer, held whole, arrived
    assert service.written == [("ended", None, None), ("other", 200, None)]
    assert records.waiting == {}
