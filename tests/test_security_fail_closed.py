"""Fail closed: mitmproxy logs an exception raised by an addon hook and lets the flow go on, so
every Portcullis hook that can still change a flow's fate is wrapped by ``fail_closed``.

The static check lists every hook method of every addon class in ``addons/`` (by introspection:
a new hook is checked without editing this file). The live check runs the production addon chain
(``running_gateway``, which calls ``build_master``) in front of an upstream that records what it
receives, and for every hook of every Portcullis addon in that chain raises an exception at the
very start of the hook's own body (a one-shot trace function on the hook's code object, armed and
disarmed by two helper addons placed around it in the chain), then checks that the client did not
get the upstream's answer, and that the upstream never saw the request when the hook runs before
forwarding. Each injection is followed by its legitimate twin: the same request, no fault, 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import json
import pkgutil
import ssl
import sys
import time
import types
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import mitmproxy.ctx
import pytest
import trustme
from mitmproxy import hooks
from mitmproxy.addonmanager import traverse

import addons
from addons.runner import running_gateway
from addons.safety import is_fail_closed
from gateway.app import bootstrap
from gateway.app.demo import ACTIVESYNC
from gateway.http.headers import CORRELATION_ID
from tests.conftest import Background, Gateway, Ports, free_port, gateway_config, logged_records
from tests.helpers.hosts import MAIL
from tests.helpers.tokens import outlook_token

# Hooks deliberately left unguarded, each with the reason it cannot let a flow through.
SAFE_HOOKS: dict[tuple[str, str], str] = {
    ("AccessGate", "error"): "runs after the flow failed: nothing is forwarded or answered after it",
    ("ServerNames", "tls_start_client"): "catches its own failure and refuses the handshake (no certificate): "
                                         "test_gateway_e2e::test_a_failing_server_name_check_refuses_the_handshake",
    ("ContinuousAccess", "error"): "runs after the flow failed: nothing is forwarded or answered after it",
    ("Drain", "error"): "runs after the flow failed: nothing is forwarded or answered after it",
    ("DecisionRecords", "error_answered"): "runs after the flow failed and its answer, if any, went out: writes "
                                           "its decision record; nothing is forwarded or answered after it",
    ("DecisionRecords", "client_disconnected"): "runs after the client connection ended: writes the decision "
                                                "records still waiting; nothing is forwarded or answered after it",
    ("RequestFraming", "error"): "runs after the flow failed: nothing is forwarded or answered after it",
    ("RequestFraming", "refused_body_read"): "runs after the refusal went out and its body was read and discarded: "
                                             "nothing is forwarded or answered after it; on an error the "
                                             "connection stays timed as receiving a body instead of idle",
    ("RequestFraming", "request_refused"): "logs a refusal the strict reader answers and closes anyway (a "
                                           "non-blocking hook, no flow): nothing is forwarded; on an error the "
                                           "decision record is missing and mitmproxy logs the error",
    ("RequestFraming", "client_disconnected"): "the connection is gone: forgets its deadline and closes a socket "
                                               "mitmproxy left open (nothing to refuse)",
    ("RequestFraming", "tcp_start"): "marks a kiosk's pass-through tunnel as carrying no HTTP to time; on an error "
                                     "it is timed as HTTP (closed sooner), and nothing is let through",
    ("DeviceCertificates", "tls_start_client"): "sees no request: on an error no certificate is asked for, and the "
                                                "connection is one without a certificate (a host that requires "
                                                "one and tokenProtection refuse its requests; none grants more)",
    ("DeviceCertificates", "tls_established_client"): "sees no request: a verification that raises is caught and "
                                                      "the certificate not believed; any other error leaves the "
                                                      "connection as one without a certificate (as above)",
    ("UpstreamHttp1", "tls_start_server"): "sees no request, decides no access, and only sets the protocols offered "
                                           "to an upstream (one assignment, nothing that can raise)",
    ("PassThroughDeadline", "tls_clienthello"): "sees no request: on an error a pass-through tunnel keeps the head "
                                                "deadline and is closed sooner, nothing is let through",
    ("KioskProxy", "tls_clienthello"): "sees no request: on an error the connection is intercepted instead of "
                                       "passed through, so the requests inside it meet Routing and AccessGate",
    ("FlowRecording", "request"): "mitmproxy's Save (``--record`` only): notes the flow for the recording",
    ("FlowRecording", "response"): "mitmproxy's Save (``--record`` only): writes the flow after the gateway "
                                   "decided it; a recording error changes no decision",
    ("FlowRecording", "error"): "mitmproxy's Save: runs after the flow failed",
    ("FlowRecording", "websocket_end"): "mitmproxy's Save: websockets are off in the gateway",
    **{("FlowRecording", name): "mitmproxy's Save: the gateway has no raw TCP, UDP or DNS flows"
       for name in ("tcp_start", "tcp_end", "tcp_error", "udp_start", "udp_end", "udp_error", "dns_request",
                    "dns_response", "dns_error")},
}
# Lifecycle events: no flow or connection (``Ready.running`` says the listener is bound; Save reads options).
LIFECYCLE = frozenset({"load", "configure", "running", "done", "update", "add_log"})
REQUEST_SIDE = ("requestheaders", "request")  # before forwarding: the upstream must never see the request
RESPONSE_SIDE = ("responseheaders", "response")  # after: the client must never see the upstream's answer
KIOSK_SIDE = ("http_connect",)  # the kiosk proxy's CONNECT: refused, so nothing is tunnelled
CONNECTION_SIDE = ("client_connected",)  # before any request: the connection is refused
EXERCISED = REQUEST_SIDE + RESPONSE_SIDE + KIOSK_SIDE + CONNECTION_SIDE
REFUSED = 599  # what a sender reports when the gateway closed the connection or refused the CONNECT


def portcullis_addon_classes() -> list[type]:
    """Every class defined in a module of the ``addons`` package."""
    classes = []
    for module in pkgutil.iter_modules(addons.__path__, "addons."):
        loaded = importlib.import_module(module.name)
        classes += [c for _, c in inspect.getmembers(loaded, inspect.isclass) if c.__module__ == module.name]
    return classes


def hook_methods(cls: type) -> list[str]:
    return sorted(name for name in hooks.all_hooks if callable(getattr(cls, name, None)))


def test_every_hook_of_every_portcullis_addon_fails_closed_or_says_why_it_need_not() -> None:
    classes = portcullis_addon_classes()
    assert {"Routing", "AccessGate", "ContinuousAccess", "Drain"} <= {c.__name__ for c in classes}
    unguarded, unexercised = [], []
    for cls in classes:
        for name in hook_methods(cls):
            key = (cls.__name__, name)
            if key in SAFE_HOOKS or name in LIFECYCLE:
                continue
            if not is_fail_closed(getattr(cls, name)):
                unguarded.append(f"{cls.__module__}.{cls.__name__}.{name}")
            elif name not in EXERCISED:
                unexercised.append(f"{cls.__name__}.{name}: teach test_a_fault_in_any_hook_blocks_the_flow to "
                                   "send a request that reaches it")
    assert not unguarded, "hooks neither wrapped by @fail_closed nor listed in SAFE_HOOKS with a reason: " \
        f"{unguarded}"
    assert not unexercised


def test_the_safe_list_names_only_hooks_that_exist() -> None:
    """A stale entry would hide nothing today, but would excuse a hook of that name added later."""
    existing = {(c.__name__, name) for c in portcullis_addon_classes() for name in hook_methods(c)}
    assert set(SAFE_HOOKS) <= existing, set(SAFE_HOOKS) - existing


# ---------------------------------------------------------------------------------------------
# The live chain


class InjectedFault(RuntimeError):
    """Raised at the start of a hook's body by ``Fault``."""


class Fault:
    """A one-shot trace function of the event loop's thread: the first frame of ``code`` to start
    raises ``InjectedFault`` there, inside whatever wraps the hook (as a bug in its body would)."""

    def __init__(self, code: types.CodeType) -> None:
        self.code = code
        self.fired = False

    def trace(self, frame: types.FrameType, event: str, _arg: object) -> None:
        if event == "call" and frame.f_code is self.code and not self.fired:
            self.fired = True
            raise InjectedFault(f"injected into {self.code.co_qualname}")


class _Switch:
    """Placed just before (arm) or just after (disarm) the faulty addon, for one event."""

    def __init__(self, event: str, fault: Fault, arm: bool) -> None:
        setattr(self, event, self._arm if arm else self._disarm)
        self.fault = fault

    def _arm(self, *_: object) -> None:
        sys.settrace(self.fault.trace)

    def _disarm(self, *_: object) -> None:
        sys.settrace(None)


@dataclass
class RecordingUpstream:
    """The mail host's upstream: answers 200 with a JSON body naming itself, and keeps every request
    target it received (the probe id in the query says which test request it was)."""

    port: int
    received: list[str] = field(default_factory=list)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                target = head[0].split(" ")[1]
                fields = dict(line.lower().split(":", 1) for line in head[1:] if ":" in line)
                await reader.readexactly(int(fields.get("content-length", "0").strip() or 0))
                self.received.append(target)
                body = json.dumps({"backend": "recording-upstream", "target": target}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        writer.close()

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        try:
            yield
        finally:
            server.close()


@dataclass
class LiveChain:
    port: int
    kiosk_port: int
    upstream: RecordingUpstream
    master: Any
    chain: list[Any]  # the Portcullis addons of the running chain, in order
    decision_log: Path


@contextlib.asynccontextmanager
async def production_gateway(config_dir: Path, upstream: RecordingUpstream) -> AsyncIterator[LiveChain]:
    """``running_gateway`` (the production chain, endpoints included) in front of ``upstream``; the
    session's master is put back afterwards (mitmproxy keeps one per process, see ``proxy_for``)."""
    previous = (mitmproxy.ctx.master, mitmproxy.ctx.options)
    loaded = bootstrap.load(config_dir)
    kiosk = loaded.config.gateway_file.kiosk
    assert kiosk is not None
    try:
        async with upstream.serving(), running_gateway(loaded) as running:
            master = mitmproxy.ctx.master
            ours = [a for a in traverse(master.addons.chain) if type(a).__module__.split(".")[0] == "addons"]
            yield LiveChain(running.addresses[0][1], kiosk.listen.port, upstream, master, ours,
                            loaded.config.path(loaded.config.gateway_file.decision_log.path))
    finally:
        mitmproxy.ctx.master, mitmproxy.ctx.options = previous


@pytest.fixture(scope="module")
def live(gateway: Gateway, ca: trustme.CA, demo_ports: Ports,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveChain]:
    upstream = RecordingUpstream(free_port())
    config_dir = gateway_config(tmp_path_factory.mktemp("fail-closed"), ca,
                                Ports(0, demo_ports.idp, upstream.port, demo_ports.docs))
    with Background(lambda: production_gateway(config_dir, upstream)) as running:
        yield running


@contextlib.contextmanager
def faulty(live: LiveChain, addon: object, event: str) -> Iterator[Fault]:
    """``addon``'s ``event`` hook raises at its start, for the next flow that reaches it."""
    hook = getattr(type(addon), event)
    fault = Fault(inspect.unwrap(hook).__code__)
    chain = live.master.addons.chain
    position = next(i for i, a in enumerate(chain) if any(x is addon for x in traverse([a])))
    arm, disarm = _Switch(event, fault, arm=True), _Switch(event, fault, arm=False)
    chain.insert(position + 1, disarm)
    chain.insert(position, arm)
    try:
        yield fault
    finally:
        chain.remove(arm)
        chain.remove(disarm)


def main_listener_request(live: LiveChain, gateway: Gateway, probe: str) -> httpx.Response:
    try:
        return gateway.request(MAIL, f"{ACTIVESYNC}&probe={probe}", method="POST", token=outlook_token(gateway),
                               port=live.port)
    except httpx.HTTPError as closed:  # the connection was refused or closed: nothing answered
        return httpx.Response(REFUSED, text=f"no answer: {closed!r}")


def kiosk_request(live: LiveChain, gateway: Gateway, probe: str) -> httpx.Response:
    """A kiosk browser's CONNECT to the mail host, then the public OWA sign-in page inside it."""
    context = ssl.create_default_context()
    gateway.ca.configure_trust(context)
    with httpx.Client(proxy=f"http://127.0.0.1:{live.kiosk_port}", verify=context, timeout=10) as client:
        try:
            return client.get(f"https://{MAIL}/owa/auth/logon.aspx?probe={probe}")
        except httpx.HTTPError as refused:  # the CONNECT was answered with an error: nothing tunnelled
            return httpx.Response(REFUSED, text=f"CONNECT refused: {refused!r}")


SENDERS: dict[str, Callable[[LiveChain, Gateway, str], httpx.Response]] = {
    **{event: main_listener_request for event in REQUEST_SIDE + RESPONSE_SIDE + CONNECTION_SIDE},
    "http_connect": kiosk_request,
}


def reached_upstream(live: LiveChain, probe: str) -> bool:
    return any(probe in target for target in live.upstream.received)


@pytest.mark.parametrize("event", EXERCISED)
def test_a_fault_in_any_hook_blocks_the_flow(live: LiveChain, gateway: Gateway, event: str) -> None:
    send = SENDERS[event]
    targets = [a for a in live.chain if callable(getattr(type(a), event, None))]
    assert targets, f"no Portcullis addon has a {event} hook any more: drop it from EXERCISED"
    failures = []
    for addon in targets:
        name = f"{type(addon).__name__}.{event}"
        probe = str(uuid.uuid4())
        with faulty(live, addon, event) as fault:
            answer = send(live, gateway, probe)
        if not fault.fired:
            failures.append(f"{name}: the request never reached the hook")
        if answer.status_code not in (500, REFUSED) or "recording-upstream" in answer.text:
            failures.append(f"{name}: the client got {answer.status_code} {answer.text[:120]!r}")
        if event not in RESPONSE_SIDE and reached_upstream(live, probe):
            failures.append(f"{name}: the upstream received the request")
        if event in REQUEST_SIDE and answer.status_code == 500 and not logged_as_500(live, answer):
            failures.append(f"{name}: its 500 is not in the decision log")
        twin_probe = str(uuid.uuid4())
        twin = send(live, gateway, twin_probe)  # the legitimate twin: no fault, forwarded and answered
        if twin.status_code != 200 or twin.json().get("backend") != "recording-upstream" \
                or not reached_upstream(live, twin_probe):
            failures.append(f"{name}: its twin without a fault got {twin.status_code} {twin.text[:120]!r}")
    assert not failures, "\n".join(failures)


def logged_as_500(live: LiveChain, answer: httpx.Response) -> bool:
    """A record of the answer's request says the client got 500 (written by a thread: waited for)."""
    correlation_id = answer.headers.get(CORRELATION_ID)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if any(r.get("correlationId") == correlation_id and r.get("httpStatus") == 500
               for r in logged_records(live.decision_log)):
            return True
        time.sleep(0.02)
    return False


def test_a_fault_after_the_upstream_answered_withholds_its_body(live: LiveChain, gateway: Gateway) -> None:
    """The answer is replaced whole: a clear JSON error, and not one byte of the upstream's body
    (mitmproxy reads that body into whatever response the flow holds after ``responseheaders``)."""
    gate = next(a for a in live.chain if type(a).__name__ == "AccessGate")
    probe = str(uuid.uuid4())
    with faulty(live, gate, "responseheaders"):
        answer = main_listener_request(live, gateway, probe)
    assert reached_upstream(live, probe)  # this hook runs once the upstream answered
    assert answer.status_code == 500
    assert answer.json()["error"] == "internal_error"
    assert answer.headers["content-length"] == str(len(answer.content))
