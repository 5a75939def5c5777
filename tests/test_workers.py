"""``portcullis run --workers N``: processes sharing the listeners, supervised, drained on SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Collection, Iterator
from dataclasses import replace
from pathlib import Path

import h2.errors
import h2.events
import h11
import httpx
import pytest
from mitmproxy.test import tflow
from pydantic import ValidationError
from ruamel.yaml import YAML

from addons.drain import Drain, KeepAliveLimits
from addons.flow_state import state
from gateway.app.demo import ALEX_IPHONE, EXCHANGE, OUTLOOK_MOBILE, activesync
from gateway.config.models import ClientLimitSettings
from gateway.http.headers import CORRELATION_ID
from gateway.signals.mtd import sign
from tests.conftest import MTD_SECRET, AlexPing, Background, Gateway, Ports, gateway_config
from tests.gateway_process import GatewayProcess, sibling_config
from tests.helpers.browser import BROWSER, sign_in
from tests.helpers.decision_log import listener
from tests.helpers.hosts import ACTIVESYNC, MAIL
from tests.helpers.http import h2_events, h2_request, h2_to, h11_answer, read_answer, says_close, tls_to
from tests.helpers.tokens import outlook_token

pytestmark = pytest.mark.slow  # processes of their own (workers, gateways): ./dev test -m 'not slow' skips them

STARTED = r"worker (\d+) started \(pid (\d+)\)"
LISTENING = r"worker (\d+) \(pid (\d+)\) is listening"


def gateway_port(config_dir: Path) -> int:
    text = (config_dir / "portcullis.yaml").read_text()
    return int(text.split("listen: {host: 127.0.0.1, port: ", 1)[1].split("}", 1)[0])


def alex_syncs(gateway: Gateway, port: int, token: str) -> int:
    """One ActiveSync Sync on a new connection (so the kernel picks a worker for each)."""
    return gateway.request("mail.contoso.test", activesync(ALEX_IPHONE), method="POST", token=token,
                           port=port).status_code


def logged_ids(path: Path) -> set[str]:
    if not path.exists():
        return set()
    return {json.loads(line)["correlationId"] for line in path.read_text().splitlines() if line.strip()}


@pytest.fixture
def alex(gateway: Gateway) -> str:
    return gateway.idp.mint(user="alex@contoso.test", client_id=OUTLOOK_MOBILE, audience=EXCHANGE,
                            device_id=ALEX_IPHONE)


def test_workers_share_the_port_and_a_killed_worker_is_replaced(gateway: Gateway, demo_ports: Ports,
                                                                tmp_path: Path, alex: str) -> None:
    config_dir = sibling_config(tmp_path, gateway, demo_ports)
    port = gateway_port(config_dir)
    supervisor = GatewayProcess(config_dir, "--workers", "2")
    try:
        listening = {int(m[1]): int(m[2]) for m in supervisor.wait_for(LISTENING, count=2)}
        assert sorted(listening) == [0, 1]
        assert len(set(listening.values())) == 2 and os.getpid() not in listening.values()
        statuses = [alex_syncs(gateway, port, alex) for _ in range(40)]
        assert statuses == [200] * 40
        logs = config_dir.parent / ".portcullis"
        first, second = logs / "decisions.jsonl", logs / "decisions.worker1.jsonl"
        supervisor.wait_until(lambda: len(logged_ids(first)) + len(logged_ids(second)) == 40)
        assert logged_ids(first) and logged_ids(second), "the kernel gave every connection to one worker"
        assert not logged_ids(first) & logged_ids(second)  # each decision in the file of the worker that made it

        os.kill(listening[1], signal.SIGKILL)
        supervisor.wait_for(r"worker 1 \(pid \d+\) exited with signal SIGKILL")
        assert [alex_syncs(gateway, port, alex) for _ in range(10)] == [200] * 10  # worker 0 alone meanwhile
        relisten = supervisor.wait_for(LISTENING, count=3)[2]
        assert int(relisten[1]) == 1 and int(relisten[2]) != listening[1]
        assert [alex_syncs(gateway, port, alex) for _ in range(10)] == [200] * 10
    finally:
        assert supervisor.stop() == 0, supervisor.text
    assert "all workers stopped" in supervisor.text


def test_sigterm_lets_requests_in_flight_finish(gateway: Gateway, demo_ports: Ports, tmp_path: Path,
                                                alex: str) -> None:
    config_dir = sibling_config(tmp_path, gateway, demo_ports)
    port = gateway_port(config_dir)
    supervisor = GatewayProcess(config_dir, "--workers", "2", "--drain-seconds", "20")
    try:
        supervisor.wait_for(LISTENING, count=2)
        logs = config_dir.parent / ".portcullis"
        pings = [AlexPing(gateway, heartbeat_seconds=3, port=port, decision_log=logs / "decisions.jsonl").start()
                 for _ in range(4)]  # on new connections: most likely on both workers
        supervisor.wait_until(lambda: all(ping.held() for ping in pings))  # forwarded, waiting for their answer
        stopped_at = time.monotonic()
        supervisor.process.send_signal(signal.SIGTERM)
        supervisor.wait_for(r"SIGTERM: draining 2 workers")
        supervisor.wait_for(r"draining: \d+ requests in flight")
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # no longer accepting
            alex_syncs(gateway, port, alex)
        assert [ping.closed_after(stopped_at) for ping in pings] == [None] * 4  # all four answered, none cut
        assert [ping.status for ping in pings] == [200] * 4
        assert supervisor.process.wait(30) == 0
    finally:
        supervisor.stop()
    assert "requests cut off" not in supervisor.text


def test_a_single_gateway_drains_on_sigterm_too(gateway: Gateway, demo_ports: Ports, tmp_path: Path) -> None:
    """Readiness fails meanwhile, so that a load balancer moves on."""
    config_dir = sibling_config(tmp_path, gateway, demo_ports)
    port, admin = gateway_port(config_dir), admin_port(config_dir)
    process = GatewayProcess(config_dir)
    try:
        process.wait_for(r"Portcullis is listening")
        assert httpx.get(f"http://127.0.0.1:{admin}/readyz").status_code == 200
        ping = AlexPing(gateway, heartbeat_seconds=2, port=port,
                        decision_log=config_dir.parent / ".portcullis" / "decisions.jsonl").started()
        stopped_at = time.monotonic()
        process.process.send_signal(signal.SIGTERM)
        process.wait_until(lambda: httpx.get(f"http://127.0.0.1:{admin}/readyz").status_code == 503, timeout=2)
        assert ping.closed_after(stopped_at) is None  # answered after its heartbeat, not cut off
        assert ping.status == 200
        assert process.process.wait(30) == 0
    finally:
        process.stop()


def admin_port(config_dir: Path) -> int:
    text = (config_dir / "portcullis.yaml").read_text()
    return int(text.split("admin:", 1)[1].split("port: ", 1)[1].split("}", 1)[0])


def test_workers_refuse_what_they_cannot_share(gateway: Gateway, demo_ports: Ports, tmp_path: Path) -> None:
    config_dir = sibling_config(tmp_path, gateway, demo_ports)
    recording = GatewayProcess(config_dir, "--workers", "2", "--record", str(tmp_path / "flows"))
    assert recording.process.wait(30) == 1
    recording.wait_until(lambda: "--record writes one flow file: use it with one worker" in recording.text)
    too_many = GatewayProcess(config_dir, "--workers", "0")
    assert too_many.process.wait(30) == 2
    no_drain = GatewayProcess(config_dir, "--drain-seconds", "nan")
    assert no_drain.process.wait(30) == 2
    text = (config_dir / "portcullis.yaml").read_text()
    clashing = text.replace(f"port: {admin_port(config_dir)}}}", f"port: {gateway_port(config_dir) - 1}}}")
    (config_dir / "portcullis.yaml").write_text(clashing)  # worker 1's admin port would be the gateway's
    clash = GatewayProcess(config_dir, "--workers", "2")
    assert clash.process.wait(30) == 1
    clash.wait_until(lambda: "which the gateway or kiosk listener uses" in clash.text)
    (config_dir / "portcullis.yaml").write_text(text)
    edited = (config_dir / "portcullis.yaml").read_text().replace(f"port: {gateway_port(config_dir)}}}", "port: 0}")
    (config_dir / "portcullis.yaml").write_text(edited)
    any_port = GatewayProcess(config_dir, "--workers", "2")
    assert any_port.process.wait(30) == 1
    any_port.wait_until(lambda: "--workers needs fixed ports" in any_port.text)


def test_sign_ins_and_webhook_nonces_hold_whichever_worker_answers(gateway: Gateway, demo_ports: Ports,
                                                                   tmp_path: Path) -> None:
    """Workers of one host share sessions and nonces through SQLite in the state directory: a
    sign-in started at one worker finishes at another, and a push is taken once."""
    config_dir = sibling_config(tmp_path, gateway, demo_ports)
    port = gateway_port(config_dir)
    supervisor = GatewayProcess(config_dir, "--workers", "2")
    try:
        supervisor.wait_for(LISTENING, count=2)
        at_workers = Gateway(port=port, idp=gateway.idp, ca=gateway.ca, config_dir=config_dir,
                             decision_log=gateway.decision_log)
        for _ in range(6):  # each request on a new connection: the kernel picks the worker each time
            answer, session = sign_in(at_workers)
            assert answer.status_code == 302, answer.text
            page = at_workers.request("mail.contoso.test", "/owa/", headers={**BROWSER, "Cookie": session})
            assert page.status_code == 200, page.text
        logs = config_dir.parent / ".portcullis"
        assert logged_ids(logs / "decisions.jsonl") and logged_ids(logs / "decisions.worker1.jsonl")
        body, timestamp = json.dumps({"events": [{"deviceId": ALEX_IPHONE, "threatLevel": "low"}]}), \
            str(int(time.time()))
        headers = {"Content-Type": "application/json", "X-Portcullis-Timestamp": timestamp,
                   "X-Portcullis-Signature": sign(MTD_SECRET.encode(), timestamp, body.encode())}
        answers = [at_workers.request("portcullis.contoso.test", "/mtd/demo-mtd/events", method="POST",
                                      content=body, headers=headers).status_code for _ in range(6)]
        assert sorted(answers) == [202] + [409] * 5
    finally:
        assert supervisor.stop() == 0, supervisor.text


def test_a_restarted_worker_never_starts_on_a_config_the_others_refused(gateway: Gateway, demo_ports: Ports,
                                                                       tmp_path: Path, alex: str) -> None:
    """A reload that would open OWA is refused by the running workers; a worker restarted after a
    crash must not start on those files either (it would serve a share of the connections with
    rules nobody accepted), and it starts once the files are back to what is in force."""
    config_dir = sibling_config(tmp_path, gateway, demo_ports)
    port = gateway_port(config_dir)
    (config_dir / "cases.yaml").unlink()
    policies = config_dir / "policies.yaml"
    in_force = policies.read_text()
    supervisor = GatewayProcess(config_dir, "--workers", "2")
    try:
        listening = {int(m[1]): int(m[2]) for m in supervisor.wait_for(LISTENING, count=2)}
        policies.write_text(in_force[:in_force.index("  - name: owa-compliant-device")])  # opens OWA: refused
        supervisor.wait_for(r"config reload \(fileWatch\) rejected", count=2)
        os.kill(listening[1], signal.SIGKILL)
        supervisor.wait_for(r"the config files are not the ones the other workers run")
        assert supervisor.wait_for(LISTENING, count=2) and len(supervisor.wait_for(STARTED, count=3)) == 3
        assert [alex_syncs(gateway, port, alex) for _ in range(5)] == [200] * 5  # worker 0, old rules
        policies.write_text(in_force)  # reverted: the restarted worker may start
        relisten = supervisor.wait_for(LISTENING, count=3, timeout=40)[2]
        assert int(relisten[1]) == 1
    finally:
        assert supervisor.stop() == 0, supervisor.text


# ---------------------------------------------------------------------------------------------
# Keep-alive limits: connections end now and then, so clients spread over the workers again


def limit_clients(config_dir: Path, **limits: float) -> Path:
    """Set ``gateway.clientLimits`` entries (camelCase names) in the config's portcullis.yaml."""
    yaml = YAML()
    data = yaml.load(config_dir / "portcullis.yaml")
    data["gateway"]["clientLimits"] = {**data["gateway"].get("clientLimits", {}), **limits}
    yaml.dump(data, config_dir / "portcullis.yaml")
    return config_dir


@pytest.fixture
def three_per_connection(gateway: Gateway, tmp_path: Path, demo_ports: Ports) -> Iterator[Gateway]:
    """A gateway whose client connections end after their third request."""
    config_dir = limit_clients(gateway_config(tmp_path, gateway.ca, Ports(0, demo_ports.idp, demo_ports.mail,
                                                                            demo_ports.docs)),
                               maxRequestsPerConnection=3)
    with Background(lambda: listener(config_dir)) as (port, _):
        yield replace(gateway, port=port, config_dir=config_dir)


def answers_on_one_connection(gateway: Gateway, requests: int, *, refused: Collection[int] = (),
                              body: bytes = b"") -> list[str]:
    """Up to ``requests`` ActiveSync syncs one after another on one HTTP/1.1 connection, each with
    ``body``, those numbered in ``refused`` (from 0) without a token: each answer's status and
    whether it says ``Connection: close``, then whether the gateway closed."""
    token, seen = outlook_token(gateway), []
    with tls_to(gateway) as tls:
        client = h11.Connection(h11.CLIENT)
        for number in range(requests):
            authorization = [] if number in refused else [("Authorization", f"Bearer {token}")]
            head = h11.Request(method="POST", target=ACTIVESYNC, headers=[
                ("Host", MAIL), *authorization, ("Content-Length", str(len(body)))])
            tls.sendall(client.send(head) + (client.send(h11.Data(data=body)) if body else b"")
                        + client.send(h11.EndOfMessage()))
            answer, _ = h11_answer(tls, client)
            seen.append(f"{answer.status_code}{' close' if says_close(answer) else ''}")
            if client.our_state is h11.MUST_CLOSE:
                return [*seen, "closed" if read_answer(tls, 5).closed else "left open"]
            client.start_next_cycle()
    return seen


def test_an_http1_connection_ends_with_its_request_limit(three_per_connection: Gateway) -> None:
    assert answers_on_one_connection(three_per_connection, 5) == ["200", "200", "200 close", "closed"]
    assert answers_on_one_connection(three_per_connection, 2) == ["200", "200"]  # a new connection: counted anew


def test_refusals_that_keep_the_connection_count_towards_its_request_limit(three_per_connection: Gateway) -> None:
    """A refused upload with a small body keeps its connection (issue 15) and is one of its
    requests: the third answer, a refusal here, says ``Connection: close``, and the connection
    closes once that refused body is read."""
    answers = answers_on_one_connection(three_per_connection, 5, refused={0, 2}, body=b"<soap:Envelope/>" * 50)
    assert answers == ["401", "200", "401 close", "closed"]


def test_an_http2_connection_gets_a_graceful_goaway_after_its_last_answer(three_per_connection: Gateway) -> None:
    """RFC 9113 6.8: NO_ERROR and the highest stream id, sent once the third answer has ended, so
    that the client sends its next request on a new connection and nothing in flight is lost."""
    with h2_to(three_per_connection) as (tls, conn):
        for stream in (1, 3):
            conn.send_headers(stream, h2_request(three_per_connection), end_stream=True)
            tls.sendall(conn.data_to_send())
            events = h2_events(tls, conn, 1)
            assert "status 200" in events and "StreamEnded" in events and "ConnectionTerminated" not in events
        conn.send_headers(5, h2_request(three_per_connection), end_stream=True)
        tls.sendall(conn.data_to_send())
        received = []
        while not any(isinstance(e, h2.events.ConnectionTerminated) for e in received):
            chunk = tls.recv(65536)
            assert chunk, f"closed without a GOAWAY after {received}"
            received += conn.receive_data(chunk)
    ending = h2.events.StreamEnded | h2.events.ConnectionTerminated
    ended = [type(e).__name__ for e in received if isinstance(e, ending)]
    assert ended == ["StreamEnded", "ConnectionTerminated"]  # the answer's last frame first
    goaway = received[-1]
    assert isinstance(goaway, h2.events.ConnectionTerminated)
    assert (goaway.error_code, goaway.last_stream_id) == (h2.errors.ErrorCodes.NO_ERROR, 2**31 - 1)


@pytest.mark.parametrize(("answered", "settings", "last"), [
    pytest.param([1, 2, 3], {}, [False, False, False], id="defaults: 1000 requests, an hour"),
    pytest.param([1, 2, 3], {"max_requests": 2}, [False, True, True], id="the second of two requests"),
    pytest.param([1], {"max_age_seconds": 60.0}, [True], id="a minute old"),
])
@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/2.0"])
def test_the_answer_that_reaches_a_limit_is_the_last_on_its_connection(
        answered: list[int], settings: dict[str, float], last: list[bool], version: str) -> None:
    client = tflow.tclient_conn()
    client.timestamp_start = 1000.0
    drain = Drain(replace(KeepAliveLimits(), **settings), clock=lambda: 1060.0)  # a minute after it connected
    marked = []
    for _ in answered:
        flow = tflow.tflow(client_conn=client, resp=True)
        flow.request.http_version = version
        drain.requestheaders(flow)
        drain.response(flow)
        assert flow.response is not None
        closing = flow.response.headers.get("connection") == "close"
        going_away = state(flow).last_on_connection
        assert not (going_away if version == "HTTP/1.1" else closing)  # no Connection header in HTTP/2
        marked.append(closing or going_away)
    assert marked == last


@pytest.mark.parametrize("limits", [
    pytest.param({"maxRequestsPerConnection": 0}, id="no request at all"),
    pytest.param({"maxRequestsPerConnection": "10"}, id="a string"),
    pytest.param({"maxRequestsPerConnection": 10.5}, id="a fraction of a request"),
    pytest.param({"maxRequestsPerConnection": 2_000_000}, id="more than a million"),
    pytest.param({"maxConnectionAgeSeconds": 0}, id="no age"),
    pytest.param({"maxConnectionAgeSeconds": 90_000}, id="more than a day"),
])
def test_keep_alive_limits_outside_their_bounds_are_refused(limits: dict[str, object]) -> None:
    with pytest.raises(ValidationError, match=next(iter(limits))):
        ClientLimitSettings.model_validate(limits)
    defaults = ClientLimitSettings()
    assert (defaults.max_requests_per_connection, defaults.max_connection_age_seconds) == (1000, 3600)


def test_while_draining_every_answer_is_the_last_on_its_connection() -> None:
    drain = Drain()
    drain.draining = True
    flow = tflow.tflow(resp=True)
    drain.requestheaders(flow)
    drain.responseheaders(flow)
    assert flow.response is not None and flow.response.headers["connection"] == "close"


def sync_on(client: httpx.Client, port: int, token: str) -> httpx.Response:
    return client.post(f"https://127.0.0.1:{port}{activesync(ALEX_IPHONE)}", extensions={"sni_hostname": MAIL},
                       headers={"Host": MAIL, "Authorization": f"Bearer {token}"})


def test_keep_alive_clients_reach_a_replaced_worker_again(gateway: Gateway, demo_ports: Ports, tmp_path: Path,
                                                          alex: str) -> None:
    """While worker 1 is down, its clients reconnect to worker 0. Once its replacement listens,
    every connection still ends after its tenth request and reconnects, and the kernel hands some
    of those to the new worker (SO_REUSEPORT hashes each new connection): within 30 rounds on four
    connections (twelve reconnections, all on worker 0 about once in 4,096 runs), both workers
    answer again."""
    config_dir = limit_clients(sibling_config(tmp_path, gateway, demo_ports), maxRequestsPerConnection=10)
    port, logs = gateway_port(config_dir), config_dir.parent / ".portcullis"
    supervisor = GatewayProcess(config_dir, "--workers", "2")
    clients = [gateway.client() for _ in range(4)]  # four keep-alive connections
    try:
        listening = {int(m[1]): int(m[2]) for m in supervisor.wait_for(LISTENING, count=2)}
        assert [sync_on(c, port, alex).status_code for c in clients] == [200] * 4
        os.kill(listening[1], signal.SIGKILL)
        supervisor.wait_for(r"worker 1 \(pid \d+\) exited with signal SIGKILL")
        assert [sync_on(c, port, alex).status_code for c in clients] == [200] * 4  # worker 0 alone meanwhile
        supervisor.wait_for(LISTENING, count=3)
        answered = [sync_on(c, port, alex) for _ in range(30) for c in clients]
        assert {a.status_code for a in answered} == {200}
        ids = {a.headers[CORRELATION_ID] for a in answered}
        by_worker = [logs / "decisions.jsonl", logs / "decisions.worker1.jsonl"]
        supervisor.wait_until(lambda: ids <= logged_ids(by_worker[0]) | logged_ids(by_worker[1]))
        served = [len(ids & logged_ids(log)) for log in by_worker]
        assert all(served), f"answers by worker 0 and 1 once worker 1 was replaced: {served}"
    finally:
        for client in clients:
            client.close()
        assert supervisor.stop() == 0, supervisor.text


def has_child_running(pid: int, argument: str) -> bool:
    """Whether a child process of ``pid`` has ``argument`` on its command line (Linux /proc)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return False
    for child in children:
        with contextlib.suppress(OSError):  # it may have exited meanwhile
            if argument.encode() in Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0"):
                return True
    return False


RELOADED = r"config reloaded \(SIGHUP\)"


def test_a_sighup_while_the_supervisor_or_a_worker_starts_reaches_every_worker(
        gateway: Gateway, demo_ports: Ports, tmp_path: Path) -> None:
    """A SIGHUP's default action ends a process. One that reaches the supervisor while it prepares
    the state waits, and is forwarded once the workers are started; one forwarded to a worker that
    is still starting waits for its handler. Each worker reloads once it listens."""
    config_dir = sibling_config(tmp_path, gateway, demo_ports)
    supervisor = GatewayProcess(config_dir, "--workers", "2")
    pid = supervisor.process.pid
    try:
        supervisor.wait_until(lambda: has_child_running(pid, "--prepare-only"))
        supervisor.process.send_signal(signal.SIGHUP)  # the supervisor has no handler yet
        listening = {int(m[1]): int(m[2]) for m in supervisor.wait_for(LISTENING, count=2)}
        supervisor.wait_for(RELOADED, count=2)  # each worker, once
        os.kill(listening[1], signal.SIGKILL)
        supervisor.wait_for(STARTED, count=3)  # the replacement is starting: no handler yet
        supervisor.process.send_signal(signal.SIGHUP)
        supervisor.wait_for(LISTENING, count=3)
        supervisor.wait_for(RELOADED, count=4)  # worker 0 at once, the replacement once it listens
        assert "exited with signal SIGHUP" not in supervisor.text
    finally:
        assert supervisor.stop() == 0, supervisor.text
