"""Upstreams that misbehave on purpose: answering from a raw socket, or never answering."""

from __future__ import annotations

import contextlib
import queue
import socket
import threading

import h2.errors

from gateway.app.demo import ACTIVESYNC
from tests.conftest import Gateway
from tests.helpers.hosts import MAIL
from tests.helpers.http import h2_request, h2_to, tls_to
from tests.helpers.tokens import outlook_token


class SocketUpstream:
    """An upstream on plain sockets, for answers no HTTP server library would send: each
    connection is served by ``_serve`` in a thread of its own, by default ``answer(connection,
    request_line)`` once the request head has arrived."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                threading.Thread(target=self._serve, args=(self.server.accept()[0],), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with connection, contextlib.suppress(OSError):
            self.answer(connection, read_head(connection).split(b"\r\n", 1)[0])

    def answer(self, connection: socket.socket, request_line: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.server.close()


def read_head(connection: socket.socket) -> bytes:
    """A request head, with whatever the gateway sent after it in the same reads."""
    head = b""
    while b"\r\n\r\n" not in head and (chunk := connection.recv(65536)):
        head += chunk
    return head


class SilentUpstream(SocketUpstream):
    """A mail upstream that never answers: an ActiveSync Ping is held until the gateway closes its
    connection, any other request's connection is closed without an answer."""

    def __init__(self) -> None:
        self.held: queue.Queue[str] = queue.Queue()  # "received", then "dropped" once the gateway gave up
        super().__init__()

    def answer(self, connection: socket.socket, request_line: bytes) -> None:
        if b"Cmd=Ping" in request_line:
            self.held.put("received")
            while connection.recv(65536):
                pass
            self.held.put("dropped")


def hang_up_while_pings_wait(gateway: Gateway, upstream: SilentUpstream) -> None:
    """Alex's phone sends a Ping over HTTP/1.1 and closes its connection while the upstream holds
    it, then one over HTTP/2 and resets its stream: neither has had an answer."""
    ping = ACTIVESYNC.replace("Cmd=Sync", "Cmd=Ping")
    with tls_to(gateway) as tls:
        tls.sendall(f"POST {ping} HTTP/1.1\r\nHost: {MAIL}\r\nAuthorization: Bearer {outlook_token(gateway)}\r\n"
                    "Content-Length: 0\r\n\r\n".encode())
        assert upstream.held.get(timeout=10) == "received"
        tls.settimeout(0.2)
        with contextlib.suppress(TimeoutError):
            assert tls.recv(65536) == b"", "an answer came before the client hung up"
    assert upstream.held.get(timeout=10) == "dropped"
    with h2_to(gateway) as (tls, conn):
        conn.send_headers(1, h2_request(gateway, path=ping), end_stream=True)
        tls.sendall(conn.data_to_send())
        assert upstream.held.get(timeout=10) == "received"
        conn.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
        tls.sendall(conn.data_to_send())
        assert upstream.held.get(timeout=10) == "dropped"
