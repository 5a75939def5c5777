"""RequestFraming and UpstreamFraming: what a client may send on a connection, how long it may
take, and how a request's body is framed on its way upstream.

``RequestFraming`` runs first. It times every client connection (``gateway.http.framing.ClientDeadline``:
a deadline for request heads, keep-alive pauses and request bodies, which mitmproxy lacks) by
wrapping the connection's stream reader when the client connects, and it refuses protocol upgrades
before any decision: the gateway forwards HTTP only (``websocket`` and ``rawtcp`` are off), so an
``Upgrade: h2c`` is 400 and a WebSocket handshake 501, never a tunnel to an upstream.
``PassThroughDeadline`` tells it which kiosk tunnels carry no HTTP (and so have no client deadline).

``UpstreamFraming`` runs after AccessGate, on requests that will be forwarded. An HTTP/2 request
needs no Content-Length; mitmproxy forwards such a body to an HTTP/1.1 upstream with no framing at
all, so the upstream would read the body as a request of its own (never decided). It gets
``Transfer-Encoding: chunked`` (mitmproxy then chunks it), or its length once known. And a refused
request's ``Expect: 100-continue`` is dropped, so the client is not invited to send a body nobody reads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from mitmproxy import connection, http, tcp, tls
from mitmproxy.proxy.mode_specs import RegularMode

from addons.flow_state import state
from addons.mitm_internals import close_client_socket, wrap_client_reader
from addons.refusals import refuse
from addons.safety import fail_closed
from addons.strict_http import RefusedRequest
from gateway.decision.service import AccessService
from gateway.http import framing
from gateway.policy.model import AccessRequest

logger = logging.getLogger(__name__)


class DeadlineReader:
    """The client connection's stream reader, read under the deadline the client currently owes.
    When it passes, the connection is cancelled as mitmproxy's own idle timeout does it."""

    def __init__(self, inner: asyncio.StreamReader, deadline: framing.ClientDeadline, peer: str) -> None:
        self.inner, self.deadline, self.peer = inner, deadline, peer
        self._timeout: asyncio.Timeout | None = None

    async def read(self, n: int = -1) -> bytes:
        loop = asyncio.get_running_loop()
        self.deadline.read_started(loop.time())
        try:
            async with asyncio.timeout_at(self.deadline.due()) as self._timeout:
                data = await self.inner.read(n)
        except TimeoutError:
            logger.info("%s: closing the connection: its %s deadline passed", self.peer, self.deadline.phase)
            raise asyncio.CancelledError("client deadline") from None
        finally:
            self._timeout = None
        self.deadline.read_finished(loop.time(), len(data))
        return data

    def rearm(self) -> None:
        """The phase changed (hooks run beside the reader): move a pending read's deadline."""
        if self._timeout is not None:
            self._timeout.reschedule(self.deadline.due())


class RequestFraming:
    def __init__(self, limits: framing.ClientLimits, service: AccessService) -> None:
        self.limits, self.service = limits, service
        self.readers: dict[str, DeadlineReader] = {}  # by client connection id, while connected

    @fail_closed
    def client_connected(self, client: connection.Client) -> None:
        """mitmproxy reads each connection in a loop that takes its reader from the connection
        handler after this hook: wrap it here. No reader found means no deadline: refuse."""
        deadline = framing.ClientDeadline(self.limits, asyncio.get_running_loop().time())
        peer = f"{client.peername[0]}:{client.peername[1]}"
        reader = wrap_client_reader(client, lambda inner: DeadlineReader(inner, deadline, peer))
        if reader is None:
            logger.error("%s: no stream reader to time; refusing the connection", client.peername)
            client.error = "no client deadline"
            return
        self.readers[client.id] = reader

    def client_disconnected(self, client: connection.Client) -> None:
        self.readers.pop(client.id, None)
        _close_what_mitmproxy_left_open(client)

    @fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        multiplexed = not flow.request.http_version.startswith("HTTP/1")
        self._change(flow, lambda d: d.head_received(flow.id, multiplexed=multiplexed))
        if flow.response or flow.error or not flow.live:
            return
        upgrade = flow.request.headers.get("upgrade")
        if upgrade is not None or "http2-settings" in flow.request.headers:
            websocket = (upgrade or "").strip().lower() == "websocket"
            status, reason = (501, "WebSocket connections are not supported by this gateway") if websocket \
                else (400, "protocol upgrades (such as h2c) are not accepted")
            refuse(self.service, flow, status, reason)

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        self._change(flow, lambda d: d.body_received(flow.id))

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        body_to_come = state(flow).body_after_answer  # refused, read after the answer
        self._change(flow, lambda d: d.answered(flow.id, asyncio.get_running_loop().time(), body_to_come=body_to_come))

    def request_refused(self, refused: RefusedRequest) -> None:
        """``strict_http.RequestRefusedHook``: a request refused before its head was parsed is a
        decision too, logged with what is known of it."""
        kiosk = isinstance(refused.client.proxy_mode, RegularMode)
        request = AccessRequest.unread(correlation_id=refused.correlation_id, client_ip=refused.client.peername[0],
                                       request_line=refused.request_line,
                                       kiosk_location=self.service.rules.router.kiosk_location if kiosk else None)
        self.service.refuse(request, refused.status, refused.reason)

    def refused_body_read(self, flow: http.HTTPFlow) -> None:
        """``strict_http.RefusedBodyReadHook``: that body is read; the connection is idle now."""
        self._change(flow, lambda d: d.body_discarded(flow.id, asyncio.get_running_loop().time()))

    def error(self, flow: http.HTTPFlow) -> None:
        self._change(flow, lambda d: d.answered(flow.id, asyncio.get_running_loop().time()))

    @fail_closed
    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._change(flow, lambda d: d.restart_head(asyncio.get_running_loop().time()))

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        """A TCP flow carries no HTTP to time (mitmproxy's idle timeout remains)."""
        self.tunnel(flow.client_conn)

    def tunnel(self, client: connection.Client) -> None:
        self._change(client, lambda d: setattr(d, "tunnel", True))

    def _change(self, flow: http.HTTPFlow | tcp.TCPFlow | connection.Client,
                change: Callable[[framing.ClientDeadline], None]) -> None:
        client = flow if isinstance(flow, connection.Client) else flow.client_conn
        reader = self.readers.get(client.id)
        if reader is not None:
            change(reader.deadline)
            reader.rearm()


def _close_what_mitmproxy_left_open(client: connection.Client) -> None:
    """mitmproxy closes a client's socket at the end of the connection's read loop. A close that
    another task commands (a hook's completion runs the queued events: a refusal, a deadline) while
    that loop waits for mitmproxy's event lock cancels the loop there, past the line that closes the
    socket: the client got its answer but kept an open connection until garbage collection.
    Disconnected means closed: the socket is closed here if it is still open."""
    if close_client_socket(client):
        logger.debug("%s: closed the socket mitmproxy left open", client.peername)


class PassThroughDeadline:
    """Runs after KioskProxy: a kiosk's pass-through tunnel (``ignore_connection``, decided on the
    ClientHello) creates no flow, so no ``tcp_start`` tells RequestFraming that the connection
    carries no HTTP, and the head deadline of its CONNECT would cut sign-in traffic while busy."""

    def __init__(self, request_framing: RequestFraming) -> None:
        self.request_framing = request_framing

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        if data.ignore_connection:
            self.request_framing.tunnel(data.context.client)


class UpstreamHttp1:
    """Upstreams are spoken to in HTTP/1.1 only. mitmproxy offers a TLS upstream the client's ALPN
    protocols, h2 first for an HTTP/2 client; UpstreamFraming frames bodies for HTTP/1.1 (a
    ``Transfer-Encoding`` an HTTP/2 upstream must refuse), and SECURITY.md promises HTTP/1.1. Runs
    before TlsConfig, which keeps offers already set."""

    def tls_start_server(self, data: tls.TlsData) -> None:
        data.conn.alpn_offers = (b"http/1.1",)


class UpstreamFraming:
    @fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            flow.request.headers.pop("expect", None)  # refused: no 100 Continue
            return
        if flow.error or not flow.live or state(flow).service:
            return
        headers = flow.request.headers
        if not flow.request.http_version.startswith("HTTP/1") and "content-length" not in headers:
            headers["transfer-encoding"] = "chunked"  # HTTP/2 frames carry no TE; the upstream's does
            state(flow).framed_by_gateway = True

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        """A body read whole (not streamed) is forwarded with its length, or none when empty."""
        if state(flow).framed_by_gateway and not flow.request.stream and flow.response is None:
            del flow.request.headers["transfer-encoding"]
            if flow.request.raw_content:
                flow.request.headers["content-length"] = str(len(flow.request.raw_content))
