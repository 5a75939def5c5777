"""Raw exchanges with the gateway: bytes over TLS, HTTP/1.1 answers read as sent, HTTP/2 streams."""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
import h11

from tests.conftest import (
    Gateway,
)
from tests.helpers.hosts import ACTIVESYNC, MAIL
from tests.helpers.tokens import outlook_token


def raw_exchange(gateway: Gateway, request: str) -> str:
    """Send bytes exactly as written over TLS to the mail host; everything the gateway answers
    until it closes the connection (so ``request`` says ``Connection: close``)."""
    context = ssl.create_default_context()
    gateway.ca.configure_trust(context)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=MAIL) as tls:
        _send_until_answered(tls, request.encode())
        return b"".join(iter(lambda: tls.recv(65536), b"")).decode(errors="replace")


def _send_until_answered(tls: ssl.SSLSocket, data: bytes) -> None:
    """Send ``data``; a head the gateway refuses as too large (431) is answered, and the connection
    closed, before the rest is read, so the send may end early: its answer is read next."""
    with contextlib.suppress(ssl.SSLEOFError, ConnectionError):
        tls.sendall(data)


@dataclass(frozen=True)
class Answer:
    text: str
    closed: bool  # the gateway closed the connection (EOF) within the wait

    @property
    def status(self) -> int:
        return int(self.text.split(" ", 2)[1]) if self.text.startswith("HTTP/1.1 ") else 0

    @property
    def head(self) -> str:
        return self.text.split("\r\n\r\n", 1)[0].lower()


@contextlib.contextmanager
def tls_to(gateway: Gateway, host: str = MAIL, timeout: float = 10) -> Iterator[ssl.SSLSocket]:
    context = ssl.create_default_context()
    gateway.ca.configure_trust(context)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=timeout) as raw, \
            context.wrap_socket(raw, server_hostname=host) as tls:
        yield tls


def read_answer(tls: ssl.SSLSocket, wait: float) -> Answer:
    """Everything the gateway sends within ``wait`` seconds, and whether it then closed."""
    received, deadline = b"", time.monotonic() + wait
    try:
        while (left := deadline - time.monotonic()) > 0:
            tls.settimeout(left)
            if not (chunk := tls.recv(65536)):
                return Answer(received.decode(errors="replace"), True)
            received += chunk
    except TimeoutError:
        pass
    except OSError:  # reset while we were still sending: closed too
        return Answer(received.decode(errors="replace"), True)
    return Answer(received.decode(errors="replace"), False)


def h11_answer(tls: ssl.SSLSocket, client: h11.Connection) -> tuple[h11.Response, bytes]:
    """The next answer on ``client``'s connection, read whole and framed by h11 (strict)."""
    response, body = None, b""
    while not isinstance(event := client.next_event(), h11.EndOfMessage):
        if event is h11.NEED_DATA:
            client.receive_data(tls.recv(65536))
        elif isinstance(event, h11.ConnectionClosed):
            raise AssertionError(f"the gateway closed the connection; answered so far: {response}")
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
    assert response is not None
    return response, body


def says_close(response: h11.Response) -> bool:
    return (b"connection", b"close") in [(k.lower(), v.lower()) for k, v in response.headers]


@contextlib.contextmanager
def h2_to(gateway: Gateway, host: str = MAIL) -> Iterator[tuple[ssl.SSLSocket, h2.connection.H2Connection]]:
    """An HTTP/2 connection (preface sent) whose client library does not check what the test sends."""
    context = ssl.create_default_context()
    gateway.ca.configure_trust(context)
    context.set_alpn_protocols(["h2"])
    config = h2.config.H2Configuration(client_side=True, validate_outbound_headers=False,
                                       normalize_outbound_headers=False, validate_inbound_headers=False)
    conn = h2.connection.H2Connection(config)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=host) as tls:
        assert tls.selected_alpn_protocol() == "h2"
        conn.initiate_connection()
        tls.sendall(conn.data_to_send())
        yield tls, conn


def h2_events(tls: ssl.SSLSocket, conn: h2.connection.H2Connection, seconds: float) -> list[str]:
    """What the gateway sends within ``seconds``: h2 event names, "status N" for an answer's
    status, and "closed" when it ends the connection (the wait then ends too)."""
    seen, deadline = [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([tls], [], [], left)[0]:
            break
        try:
            chunk = tls.recv(65536)
        except OSError:
            chunk = b""
        if not chunk:
            return [*seen, "closed"]
        for event in conn.receive_data(chunk):
            seen.append(type(event).__name__)
            if isinstance(event, h2.events.ResponseReceived):
                seen.append(f"status {dict(event.headers)[b':status'].decode()}")
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        with contextlib.suppress(OSError):
            tls.sendall(conn.data_to_send())
    return seen


def h2_request(gateway: Gateway, method: str = "POST", path: str = ACTIVESYNC, *,
               token: bool = True) -> list[tuple[bytes, bytes]]:
    headers = [(b":method", method.encode()), (b":scheme", b"https"), (b":authority", MAIL.encode()),
               (b":path", path.encode())]
    return headers + ([(b"authorization", f"Bearer {outlook_token(gateway)}".encode())] if token else [])
