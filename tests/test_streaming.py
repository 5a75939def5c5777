"""Answers pass through as the upstream sends them (issue 15, part 3): EWS streaming notifications,
OWA's and SharePoint's channels and event streams reach the client event by event, while the
session controls still replace a download and a small answer of known length arrives whole.

The upstream here sends nothing on its own: after the head, each piece of the body goes out only
when the test hands it over. So a piece the client reads through the gateway before the test has
handed over the next one, or ended the answer, proves the gateway passed it on while the upstream
still held the rest (no clock involved: the order is the proof).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import socket
import ssl
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import h2.connection
import h2.events
import httpx
import pytest
import trustme

from gateway.app.demo import ALEX_IPHONE, OUTLOOK_MOBILE, SHAREPOINT
from gateway.decision.service import utc_now
from gateway.http.response_streaming import BUFFERED_BODY_BYTES, streams_as_sent
from gateway.policy.model import DeviceThreatLevel
from tests.conftest import Background, Gateway, Ports, gateway_config, operations_for, proxy_for
from tests.helpers.hosts import MAIL
from tests.helpers.http import h2_request, h2_to, tls_to
from tests.helpers.signals import second_connection
from tests.helpers.tokens import outlook_token
from tests.helpers.upstreams import SocketUpstream, read_head

DOCS = "docs.contoso.test"
EWS = "/EWS/Exchange.asmx"
GET_STREAMING_EVENTS = (b'<?xml version="1.0" encoding="utf-8"?><soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/'
                        b'soap/envelope/"><soap:Body><GetStreamingEvents xmlns="http://schemas.microsoft.com/exchange/'
                        b'services/2006/messages"><SubscriptionIds><t:SubscriptionId xmlns:t="http://schemas.micro'
                        b'soft.com/exchange/services/2006/types">s1</t:SubscriptionId></SubscriptionIds>'
                        b'<ConnectionTimeout>30</ConnectionTimeout></GetStreamingEvents></soap:Body></soap:Envelope>')
END = b""  # handed to the upstream: end the answer

# The head the upstream answers with, by the ``kind`` in the request's query.
HEADS = {
    "chunked": b"HTTP/1.1 200 OK\r\nContent-Type: text/xml; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n",
    "events": b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
              b"Connection: close\r\n\r\n",  # no length and no chunks: the body ends when the upstream closes
    "attachment": b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.openxmlformats-officedocument."
                  b"wordprocessingml.document\r\nContent-Disposition: attachment; filename=\"plans.docx\"\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n",
    "known": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n",
}


class PacedUpstream(SocketUpstream):
    """Stands in for Exchange and SharePoint: answers a request with the head its ``kind`` names,
    then sends the body piece by piece, each only once the test hands it over on the request's
    channel (its ``id``); ``END`` ends the answer (the last chunk, or closing the connection)."""

    def __init__(self) -> None:
        self._channels: dict[str, queue.Queue[bytes]] = {}
        self._lock = threading.Lock()
        self.dropped: dict[str, threading.Event] = {}  # set when the gateway closed that request's connection
        self.sent_first: dict[str, threading.Event] = {}  # set once the head and the first piece went out
        super().__init__()

    def channel(self, request_id: str) -> queue.Queue[bytes]:
        with self._lock:
            self.dropped.setdefault(request_id, threading.Event())
            self.sent_first.setdefault(request_id, threading.Event())
            return self._channels.setdefault(request_id, queue.Queue())

    def _serve(self, connection: socket.socket) -> None:
        with connection, contextlib.suppress(OSError):
            head, _, body = read_head(connection).partition(b"\r\n\r\n")
            fields = dict(line.lower().split(b":", 1) for line in head.split(b"\r\n")[1:])
            while len(body) < int(fields.get(b"content-length", b"0")):
                body += connection.recv(65536)
            query = dict(p.split("=", 1) for p in head.split(b" ")[1].decode().partition("?")[2].split("&"))
            pieces = self.channel(query["id"])
            threading.Thread(target=self._until_dropped, args=(connection, self.dropped[query["id"]]),
                             daemon=True).start()
            self._answer(connection, query["kind"], pieces, int(query.get("length", 0)), self.sent_first[query["id"]])

    @staticmethod
    def _until_dropped(connection: socket.socket, dropped: threading.Event) -> None:
        """The gateway sends nothing more on this connection: what ends the read is its close."""
        with contextlib.suppress(OSError):
            while connection.recv(65536):
                pass
        dropped.set()

    def _answer(self, connection: socket.socket, kind: str, pieces: queue.Queue[bytes], length: int,
                sent_first: threading.Event) -> None:
        """``length``: what a ``known`` answer declares (its pieces must add up to it)."""
        chunked = b"chunked" in HEADS[kind]
        connection.sendall(HEADS[kind] % length if kind == "known" else HEADS[kind])
        while (piece := pieces.get(timeout=30)) != END:
            connection.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            sent_first.set()
        if chunked:
            connection.sendall(b"0\r\n\r\n")
        else:
            connection.shutdown(socket.SHUT_WR)  # the end of a body read until the connection closes


@dataclass
class Paced:
    gateway: Gateway  # this module's own listener in front of the paced upstream
    upstream: PacedUpstream


@contextlib.asynccontextmanager
async def watching_gateway(config_dir: Path) -> AsyncIterator[int]:
    """The listener, and the poll for device changes a running gateway keeps (ContinuousAccess)."""
    operations = await operations_for(config_dir)
    async with proxy_for(operations.service) as port:
        watching = asyncio.create_task(operations.service.watch_changes())
        try:
            yield port
        finally:
            watching.cancel()


@pytest.fixture(scope="module")
def paced(gateway: Gateway, ca: trustme.CA, demo_ports: Ports,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Paced]:
    upstream = PacedUpstream()
    config_dir = gateway_config(tmp_path_factory.mktemp("streaming"), ca,
                                Ports(0, demo_ports.idp, upstream.port, upstream.port))
    with Background(lambda: watching_gateway(config_dir)) as port:
        yield Paced(replace(gateway, port=port, config_dir=config_dir), upstream)
    upstream.close()


def kiosk_token(gateway: Gateway) -> str:
    """A kiosk account's token for SharePoint: its policies set ``blockDownloads``."""
    return gateway.idp.mint(user="alex@contoso.test", client_id=OUTLOOK_MOBILE, audience=SHAREPOINT,
                            device_id=ALEX_IPHONE, extra={"groups": ["kiosk-users"]})


@contextlib.contextmanager
def answer_through(paced: Paced, kind: str, *, host: str = MAIL, path: str = EWS, token: str | None = None,
                   ahead: tuple[bytes, ...] = ()) -> Iterator[tuple[httpx.Response, queue.Queue[bytes], str]]:
    """A request through the gateway (HTTP/1.1) whose answer is read as it comes: the response
    (head read), the upstream's channel for its body, and the request's id. ``ahead`` is handed
    to the upstream before the request is sent."""
    request_id = uuid.uuid4().hex
    pieces = paced.upstream.channel(request_id)
    for piece in ahead:
        pieces.put(piece)
    method, content = ("POST", GET_STREAMING_EVENTS) if path == EWS else ("GET", b"")
    headers = {"Host": host, "Authorization": f"Bearer {token or outlook_token(paced.gateway)}",
               "Content-Type": "text/xml; charset=utf-8", "Accept": "text/html"}
    try:
        with paced.gateway.client() as client, \
                client.stream(method, f"https://127.0.0.1:{paced.gateway.port}{path}?kind={kind}&id={request_id}",
                              headers=headers, content=content, extensions={"sni_hostname": host}) as response:
            yield response, pieces, request_id
    finally:
        pieces.put(END)  # a failed test leaves no upstream thread waiting


def read_until(chunks: Iterator[bytes], wanted: bytes) -> bytes:
    """What the client reads until ``wanted`` is among it (the client's read timeout fails the test)."""
    received = b""
    while wanted not in received:
        received += next(chunks)
    return received


EVENT_1 = (b'<Envelope><Notification><SubscriptionId>s1</SubscriptionId><NewMailEvent><ItemId Id="1"/>'
           b'</NewMailEvent></Notification></Envelope>')
EVENT_2 = EVENT_1.replace(b'Id="1"', b'Id="2"')


@pytest.mark.parametrize(("kind", "first", "second"), [
    pytest.param("chunked", EVENT_1, EVENT_2, id="EWS GetStreamingEvents, chunked"),
    pytest.param("events", b"event: notification\ndata: 1\n\n", b"event: notification\ndata: 2\n\n",
                 id="text/event-stream, read until the upstream closes"),
])
def test_each_event_reaches_the_client_while_the_upstream_holds_the_rest(paced: Paced, kind: str, first: bytes,
                                                                         second: bytes) -> None:
    with answer_through(paced, kind) as (response, pieces, _):
        assert response.status_code == 200
        assert "x-portcullis-correlation-id" in response.headers  # the gateway's header, on a streamed answer too
        chunks = response.iter_raw()
        pieces.put(first)
        assert read_until(chunks, first) == first  # the second is not yet handed to the upstream
        pieces.put(second)
        assert read_until(chunks, second) == second
        pieces.put(END)
        assert b"".join(chunks) == b""


@dataclass
class Http2Answer:
    status: int | None = None
    body: bytes = b""
    ended: bool = False


def read_h2_until(tls: ssl.SSLSocket, conn: h2.connection.H2Connection, answer: Http2Answer, wanted: bytes) -> None:
    """Reads stream 1's answer until ``wanted`` is in its body (``END``: until the stream ends)."""
    while (wanted not in answer.body) if wanted else not answer.ended:
        data = tls.recv(65536)
        assert data, "the gateway closed the connection"
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                answer.status = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                answer.body += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                answer.ended = True
            elif isinstance(event, h2.events.StreamReset):
                raise AssertionError("the gateway reset the stream")
        tls.sendall(conn.data_to_send())


def test_each_event_reaches_an_http2_client_while_the_upstream_holds_the_rest(paced: Paced) -> None:
    request_id = uuid.uuid4().hex
    pieces = paced.upstream.channel(request_id)
    headers = [*h2_request(paced.gateway, path=f"{EWS}?kind=chunked&id={request_id}"),
               (b"content-type", b"text/xml; charset=utf-8"), (b"content-length", b"%d" % len(GET_STREAMING_EVENTS))]
    answer = Http2Answer()
    try:
        with h2_to(paced.gateway) as (tls, conn):
            conn.send_headers(1, headers)
            conn.send_data(1, GET_STREAMING_EVENTS, end_stream=True)
            tls.sendall(conn.data_to_send())
            pieces.put(EVENT_1)
            read_h2_until(tls, conn, answer, EVENT_1)
            assert (answer.status, answer.body) == (200, EVENT_1)  # the second is not yet handed to the upstream
            pieces.put(EVENT_2)
            read_h2_until(tls, conn, answer, EVENT_2)
            pieces.put(END)
            read_h2_until(tls, conn, answer, END)
    finally:
        pieces.put(END)
    assert answer.body == EVENT_1 + EVENT_2


def test_a_chunked_download_under_block_downloads_is_still_replaced(paced: Paced) -> None:
    """The page wins over streaming: the client gets the page's head at once, and none of the
    file's bytes, however many the upstream sends."""
    with answer_through(paced, "attachment", host=DOCS, path="/sites/team/Shared%20Documents/plans.docx",
                        token=kiosk_token(paced.gateway)) as (response, pieces, _):
        assert response.status_code == 403
        assert "content-disposition" not in response.headers
        for piece in (b"secret plans, part one", b"secret plans, part two", END):
            pieces.put(piece)
        body = response.read()
    assert b"secret plans" not in body
    assert "This file can't be saved here" in body.decode()
    assert int(response.headers["content-length"]) == len(body)


def test_a_small_answer_of_known_length_is_held_until_it_has_all_arrived(paced: Paced) -> None:
    """Not even its head goes out while the upstream still owes part of its body; then it arrives
    whole, with its length, unchanged."""
    whole = b'{"value": [{"id": "1", "subject": "Quarterly plans"}]}'
    request_id = uuid.uuid4().hex
    pieces = paced.upstream.channel(request_id)
    try:
        with tls_to(paced.gateway) as tls:
            tls.sendall(f"GET /owa/service.svc?kind=known&id={request_id}&length={len(whole)} HTTP/1.1\r\n"
                        f"Host: {MAIL}\r\nAuthorization: Bearer {outlook_token(paced.gateway)}\r\n\r\n".encode())
            pieces.put(whole[:10])
            assert paced.upstream.sent_first[request_id].wait(10)
            tls.settimeout(0.5)  # (not select: TLS 1.3 session tickets make the socket readable with no answer)
            with pytest.raises(TimeoutError):
                started = tls.recv(65536)
                raise AssertionError(f"the answer started before its body had arrived: {started!r}")
            tls.settimeout(10)
            pieces.put(whole[10:])
            received = b""
            while b"\r\n\r\n" not in received or not received.endswith(whole):
                chunk = tls.recv(65536)
                assert chunk, f"closed before the whole answer: {received!r}"
                received += chunk
    finally:
        pieces.put(END)
    head = received.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 200") and b"content-length: %d" % len(whole) in head
    assert b"transfer-encoding" not in head


def test_a_streamed_answer_is_cut_when_the_device_loses_access(paced: Paced) -> None:
    """ContinuousAccess closes an open flow whose device's risk rose: for a streamed answer, after
    the events the client already had, and before any that follow."""
    with second_connection(paced.gateway.config_dir) as store, \
            answer_through(paced, "chunked") as (response, pieces, request_id):
        chunks = response.iter_raw()
        pieces.put(EVENT_1)
        assert read_until(chunks, EVENT_1) == EVENT_1
        store.set_threat_level(ALEX_IPHONE, "lookout", DeviceThreatLevel.high, now=utc_now())
        with pytest.raises(httpx.RemoteProtocolError):  # closed in the middle of the chunked answer
            b"".join(chunks)
        assert paced.upstream.dropped[request_id].wait(10), "the gateway kept the upstream's answer open"


@pytest.mark.parametrize(("method", "status", "headers", "streamed"), [
    pytest.param("POST", 200, {"transfer-encoding": "chunked"}, True, id="chunked -> streamed"),
    pytest.param("GET", 200, {}, True, id="no length (read until close, HTTP/2 without content-length) -> streamed"),
    pytest.param("GET", 200, {"content-type": "text/event-stream; charset=utf-8", "content-length": "20"}, True,
                 id="event stream, even with a length -> streamed"),
    pytest.param("GET", 200, {"content-length": str(BUFFERED_BODY_BYTES)}, False,
                 id="known length up to 1 MiB -> held"),
    pytest.param("GET", 200, {"content-length": str(BUFFERED_BODY_BYTES + 1)}, True,
                 id="known length over 1 MiB -> streamed"),
    pytest.param("GET", 200, {"content-length": "0"}, False, id="empty -> held"),
    pytest.param("HEAD", 200, {"transfer-encoding": "chunked"}, False, id="HEAD -> no body"),
    pytest.param("GET", 204, {}, False, id="204 -> no body"),
    pytest.param("GET", 304, {"transfer-encoding": "chunked"}, False, id="304 -> no body"),
    pytest.param("GET", 200, {"content-length": "5, 5"}, True, id="a length not read as one number -> streamed"),
])
def test_which_answers_stream(method: str, status: int, headers: dict[str, str], streamed: bool) -> None:
    assert streams_as_sent(method, status, headers) is streamed
