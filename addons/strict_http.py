"""Strict HTTP/1 framing inside mitmproxy's proxy core, where addons cannot reach.

Addon hooks see a request only after mitmproxy has parsed it leniently (``gateway/http/framing.py`` says
how) and has decided where its body ends; they never see the raw head, a chunk line, or the bytes a
client sends while it waits. So the gateway replaces two classes of mitmproxy's HTTP layer:

- ``StrictHttp1Server`` checks each raw request head against ``gateway.http.framing`` before mitmproxy
  parses it, reads chunked bodies with a strict reader, bounds what it buffers (mitmproxy's own
  reader notes "FIXME: protect against header size DoS"), and answers a refusal with Portcullis'
  JSON 400/414/431 and ``Connection: close`` instead of mitmproxy's page.
- ``StrictHttpStream`` answers a request refused at its headers right away and discards its body
  (never buffered or forwarded). mitmproxy would first buffer the body, and once it passes
  ``stream_large_bodies`` raise "Can't set a response and enable streaming at the same time" and
  leave the client hanging. Over HTTP/1 a small body of a known length is read after the answer
  and the connection kept (``framing.refused_body_keeps_connection``); any other closes once read.
- Both speak in the gateway's words where mitmproxy would answer itself: its HTML error page
  carries ``Server: mitmproxy <version>`` and, for an upstream that failed, the upstream's address
  (the ``error`` hook cannot replace it). A request mitmproxy refuses (CONNECT on the reverse
  listener, a target it cannot parse) gets the gateway's JSON 400, an upstream failure the
  gateway's 502 page (``gateway/web/pages.py``), each with a correlation id and logged with its
  reason. An upstream's 101 is such a failure: the gateway forwards no upgrade, so the 101 head
  never reaches the client (mitmproxy sent it, then closed; over HTTP/2 it crashed the connection).

``install()`` puts them in place for the process (mitmproxy looks both names up in its HTTP layer
module each time it builds one). Every mitmproxy and h11 internal used here comes from
``addons/mitm_internals.py``, which lists the methods these classes override and the attributes
they read, with the versions they were tested on.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any

import h11
from mitmproxy import http
from mitmproxy.connection import Client, ConnectionState

from addons.flow_state import state
from addons.mitm_internals import (
    ChunkedReader,
    CloseConnection,
    Command,
    ConnectionClosed,
    ConnectionEvent,
    DataReceived,
    ErrorCode,
    Event,
    Http1Server,
    HttpResponseHeadersHook,
    HttpStream,
    Log,
    ReceiveBuffer,
    ReceiveHttp,
    RequestEndOfMessage,
    RequestHeaders,
    RequestProtocolError,
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
    SendData,
    SendHttp,
    StartHook,
    assemble_response,
    format_address,
    install_http_layers,
    unread_bytes,
)
from gateway.decision.service import new_correlation_id, utc_now
from gateway.http import framing
from gateway.web import pages

logger = logging.getLogger(__name__)

type Commands = Generator[Command, Any, None]
type Replacement = Callable[[Command], Iterable[Command] | None]

UNREADABLE_HEAD = framing.bad_request("the request line could not be read (a target that is neither a path, "
                                      "an absolute URL, host:port for CONNECT, nor *)")


def replacing(inner: Commands, replace: Replacement) -> Commands:
    """``inner``'s commands, each one ``replace`` has a replacement for (commands, possibly none)
    replaced by it; the replies to blocking commands (hooks, connections) go back to ``inner``."""
    reply = None
    while True:
        try:
            command = inner.send(reply)
        except StopIteration:
            return
        replacement = replace(command)
        if replacement is None:
            reply = yield command
        else:
            yield from replacement
            reply = None


def refusal_bytes(refusal: framing.Refusal, correlation_id: str) -> bytes:
    """The gateway's JSON refusal (``gateway/web/pages.py``), after which the connection closes."""
    answer = pages.refused(refusal.status, refusal.description, correlation_id)
    headers = http.Headers([(k.encode(), v.encode()) for k, v in (*answer.headers, ("Connection", "close"))])
    return assemble_response(http.Response.make(answer.status_code, answer.body, headers))


class BodyFramingError(Exception):
    """A request body that breaks the accepted grammar (not h11's ProtocolError: mitmproxy would
    swallow that one and close without an answer)."""


class StrictChunkedReader:
    """A chunked request body reader with h11's reader interface (``__call__`` returns ``h11.Data``,
    ``h11.EndOfMessage`` or None for "need more"; ``read_eof``) and ``gateway.http.framing``'s grammar:
    CRLF only, bounded chunk lines, and no trailer section (mitmproxy raises NotImplementedError on
    request trailers and leaves the connection hanging)."""

    def __init__(self) -> None:
        self.remaining = 0  # bytes left in the current chunk
        self.expect_crlf = False  # after chunk data
        self.last = False  # after the zero-size chunk: only the final CRLF may follow

    def __call__(self, buf: ReceiveBuffer) -> h11.Data | h11.EndOfMessage | None:
        if self.expect_crlf or self.last:
            if not self._crlf(buf):
                return None
            if self.last:
                return h11.EndOfMessage()
            self.expect_crlf = False
        if self.remaining == 0:
            size = self._chunk_size(buf)
            if size is None:
                return None
            self.remaining = size
            if self.remaining == 0:
                self.last = True
                return self(buf)
        data = buf.maybe_extract_at_most(self.remaining)
        if data is None:
            return None
        self.remaining -= len(data)
        self.expect_crlf = self.remaining == 0
        return h11.Data(data=bytes(data))

    def _crlf(self, buf: ReceiveBuffer) -> bool:
        """The CRLF after chunk data (or after the last chunk) was taken; False: not all of it yet."""
        if len(buf) < 2:
            if bytes(buf)[:1] not in (b"", b"\r"):
                raise BodyFramingError(self._crlf_problem())
            return False
        if buf.maybe_extract_at_most(2) != b"\r\n":
            raise BodyFramingError(self._crlf_problem())
        return True

    @staticmethod
    def _chunk_size(buf: ReceiveBuffer) -> int | None:
        """The next chunk's size from its line; None: the line is not complete yet."""
        line = buf.maybe_extract_next_line()
        if line is None:
            if problem := framing.pending_chunk_line_problem(bytes(buf)):
                raise BodyFramingError(problem)
            return None
        try:
            return framing.chunk_size(bytes(line))
        except ValueError as error:
            raise BodyFramingError(str(error)) from None

    def _crlf_problem(self) -> str:
        return "request trailers are not accepted" if self.last else "chunk data longer than its size"

    def read_eof(self) -> h11.EndOfMessage:
        raise h11.RemoteProtocolError("peer closed connection without sending complete chunked body")


_BOUNDS = (framing.MAX_EMPTY_LINE_BYTES, framing.MAX_REQUEST_LINE_BYTES + 2, framing.MAX_REQUEST_HEAD_BYTES)


def _may_decide(buffered: bytearray, received: bytes) -> bool:
    """Whether the head check (which reads the whole buffer) can have a new answer: a head end
    arrived, or the buffer crossed a size bound. Only the new bytes are searched, so a head sent a
    few bytes a read costs linear time. An empty ``received`` replays what a pipelining client sent
    earlier. Until then no head is complete: mitmproxy's parser has nothing to take."""
    before = len(buffered) - len(received)
    return not received or framing.HEAD_END.search(buffered, max(0, before - 2)) is not None or any(
        before <= bound < len(buffered) for bound in _BOUNDS)


class StrictHttp1Server(Http1Server):
    def read_headers(self, event: ConnectionEvent) -> Commands:
        if isinstance(event, DataReceived):
            buffered = unread_bytes(self.buf)  # h11's buffer, read in place (no copy for every read)
            if not _may_decide(buffered, event.data):
                return
            refusal = framing.request_head_refusal(bytes(buffered))
            if refusal is not None:
                yield from self._refuse(refusal)
                return
            empty = framing.empty_line_bytes(buffered)
            if empty == len(buffered):
                return  # only empty lines yet: kept, so that too many of them meet the bound
            # checked above: CRLFs only. h11 drops one per read and waits for more data meanwhile
            self.buf.maybe_extract_at_most(empty)
        elif isinstance(event, ConnectionClosed) and bytes(self.buf).strip():
            logger.info("%s: closed the connection before completing a request head (%d bytes)",
                        format_address(self.conn.peername), len(self.buf))
        yield from replacing(super().read_headers(event), self._in_own_words())

    def _in_own_words(self) -> Replacement:
        """mitmproxy answers a head it cannot parse (the grammar leaves the forms of a request target
        to it) with its HTML page, and logs the client's bytes, which may carry a token: the gateway's
        JSON refusal goes out instead, and its own log line. Only until the head is parsed: then the
        same generator reads the body (``read_body`` below, with its own refusals and log lines) and,
        once it is done, may start on the next request, whose head gets a replacement of its own."""
        parsed = False

        def replace(command: Command) -> Iterable[Command] | None:
            nonlocal parsed
            parsed = parsed or (isinstance(command, ReceiveHttp) and isinstance(command.event, RequestHeaders))
            if parsed:
                return None
            if isinstance(command, SendData) and command.connection is self.conn:  # only that page
                return self._answer(UNREADABLE_HEAD)
            return () if isinstance(command, Log) else None

        return replace

    def read_body(self, event: Event) -> Commands:
        if type(self.body_reader) is ChunkedReader:
            self.body_reader = StrictChunkedReader()  # type: ignore[assignment]  # h11's reader interface
        try:
            yield from super().read_body(event)
        except BodyFramingError as error:
            yield from self._refuse(framing.bad_request(str(error)))
            yield ReceiveHttp(RequestProtocolError(self.stream_id, str(error), ErrorCode.GENERIC_CLIENT_ERROR))

    def wait(self, event: Event) -> Commands:
        """While its answer is owed, what a client sends is buffered for the next request: bounded."""
        if isinstance(event, DataReceived) and len(self.buf) > framing.MAX_UNREAD_BYTES:
            logger.info("%s: more than %d bytes sent ahead of an answer; closing",
                        format_address(self.conn.peername), framing.MAX_UNREAD_BYTES)
            yield CloseConnection(self.conn)
            self.state = self.done
            return
        yield from super().wait(event)

    def _refuse(self, refusal: framing.Refusal) -> Commands:
        if self.response is None:  # nothing of an answer sent yet
            yield from self._answer(refusal)
        else:
            logger.info("%s: closing: %s", format_address(self.conn.peername), refusal.description)
        yield CloseConnection(self.conn)
        self.state = self.done

    def _answer(self, refusal: framing.Refusal) -> list[Command]:
        """Logged as a decision too (``request_refused``)."""
        correlation_id = new_correlation_id()
        logger.info("[%s] %s: request refused with %d: %s", correlation_id, format_address(self.conn.peername),
                    refusal.status, refusal.description)
        request_line = bytes(unread_bytes(self.buf)[:framing.MAX_REQUEST_LINE_BYTES + 2]).partition(b"\r\n")[0]
        assert isinstance(self.conn, Client)  # the server side of the client's connection
        refused = RefusedRequest(self.conn, correlation_id, refusal.status, refusal.description, request_line)
        return [RequestRefusedHook(refused), SendData(self.conn, refusal_bytes(refusal, correlation_id))]


@dataclass(frozen=True)
class RefusedRequest:
    """A request refused before mitmproxy parsed its head: what is known of it."""

    client: Client
    correlation_id: str
    status: int
    reason: str
    request_line: bytes  # as much of it as was received (it may be cut, or no request line at all)


@dataclass
class RequestRefusedHook(StartHook):
    """A request refused by the strict reader, before any flow exists: the decision log learns of it
    (``RequestFraming.request_refused``). Not blocking: the answer and the close go out as before,
    without waiting for the log."""

    name = "request_refused"
    blocking = False
    refused: RefusedRequest


@dataclass
class RefusedBodyReadHook(StartHook):
    """The body of a request answered before it was read, on an HTTP/1 connection kept for the next
    request, has been read and discarded: the client owes nothing more of it (``RequestFraming``
    times that body as a body until then, and the connection as idle after)."""

    name = "refused_body_read"
    flow: http.HTTPFlow


class StrictHttpStream(HttpStream):
    answered_early = False
    answer_started = False  # a final answer's head went to the client: no other answer can follow
    keeps_connection = False  # if refused at its head: decided on the head as the client sent it
    failure_told = False  # ``error_answered`` ran for this stream's flow (see the end of this module)

    def _handle_event(self, event: Event) -> Commands:
        yield from replacing(super()._handle_event(event), self._own_answer)
        if not self.failure_told and getattr(self, "flow", None) is not None and self.flow.error is not None:
            self.failure_told = True
            yield ErrorAnsweredHook(self.flow)

    def state_wait_for_response_headers(self, event: ResponseHeaders) -> Commands:
        """The gateway forwards no protocol switch (RequestFraming refuses upgrades), so an upstream's
        101 is a failed upstream: its connection is closed and the client gets the gateway's 502."""
        state(self.flow).upstream_status = event.response.status_code
        if event.response.status_code != 101:
            yield from super().state_wait_for_response_headers(event)
            return
        yield CloseConnection(self.flow.server_conn)
        yield from self.handle_protocol_error(ResponseProtocolError(
            self.stream_id, "the upstream answered 101 Switching Protocols to a request that asked for no upgrade",
            ErrorCode.GENERIC_SERVER_ERROR))

    def _own_answer(self, command: Command) -> Iterable[Command] | None:
        if not isinstance(command, SendHttp) or command.connection is not self.context.client:
            return None
        if isinstance(command.event, ResponseHeaders) and command.event.response.status_code >= 200:
            self.answer_started = True
        elif isinstance(command.event, ResponseProtocolError) and not self.answer_started and \
                command.event.code.http_status_code() is not None and \
                self.context.client.state & ConnectionState.CAN_WRITE:
            return [*self._answer_instead(command.event), command]  # then closed (HTTP/1) or reset if still open
        return None

    def _answer_instead(self, error: ResponseProtocolError) -> Commands:
        """What mitmproxy would answer with its own page: the gateway's, logged with its reason."""
        request = self.flow.request
        flow_state = state(self.flow)
        if flow_state.correlation_id is None:  # refused by mitmproxy before Routing named it
            flow_state.correlation_id = new_correlation_id()
        correlation_id = flow_state.correlation_id
        status = error.code.http_status_code() or 502
        if status >= 500:
            logger.warning("[%s] the upstream of %s failed (%s); answered 502", correlation_id,
                           request.host_header, error.message)
            answer = pages.bad_gateway(correlation_id, html="text/html" in request.headers.get("accept", "").lower(),
                                       now=utc_now())
        else:
            reason = ("CONNECT is not accepted on this listener (a reverse proxy)" if request.method == "CONNECT"
                      else "the request is not valid HTTP")
            logger.info("[%s] request refused with %d: %s (%s)", correlation_id, status, reason, error.message)
            answer = pages.refused(status, reason, correlation_id)
            yield RequestRefusedHook(RefusedRequest(self.context.client, correlation_id, status, reason,
                                                    f"{request.method} {request.path} ".encode(errors="replace")))
        flow_state.gateway_answer = answer.status_code
        response = http.Response.make(answer.status_code, answer.body,
                                      http.Headers([(k.encode(), v.encode()) for k, v in answer.headers]))
        if request.http_version.startswith("HTTP/1"):
            response.headers["connection"] = "close"
        self.answer_started = True
        yield SendHttp(ResponseHeaders(self.stream_id, response), self.context.client)
        if request.method != "HEAD":
            yield SendHttp(ResponseData(self.stream_id, answer.body), self.context.client)
        yield SendHttp(ResponseEndOfMessage(self.stream_id), self.context.client)

    def state_wait_for_request_headers(self, event: RequestHeaders) -> Commands:
        request = event.request  # before the hooks: UpstreamFraming drops a refused request's Expect
        self.keeps_connection = not event.end_stream and framing.refused_body_keeps_connection(
            request.http_version, request.headers.items(multi=True))
        yield from super().state_wait_for_request_headers(event)
        refused = self.flow.response is not None and self.flow.live and not self.flow.error
        if refused and not event.end_stream and self.client_state == self.state_consume_request_body:
            yield from self._answer_now()

    def _answer_now(self) -> Commands:
        """The answer goes out before the body is read. Over HTTP/1 the body is then read and
        discarded; a small one of a known length (``keeps_connection``) under the client's body
        deadline, after which the connection serves the next request (unless the answer says
        ``Connection: close``: a refusal that closes, or Drain's last answer). Any other body makes
        the answer say ``Connection: close``, and the connection closes once that body is read (or a
        client deadline ends it). An HTTP/2 stream is ended and dropped at once: mitmproxy would end
        it only after the whole body, and the client may wait for the answer's end before it sends
        more; what it still sends is discarded."""
        assert self.flow.response is not None  # checked by the caller
        self.answered_early = True
        http1 = self.flow.request.http_version.startswith("HTTP/1")
        if http1 and self.keeps_connection:
            state(self.flow).body_after_answer = True  # RequestFraming times that body
        elif http1:
            self.flow.response.headers["connection"] = "close"
        self.flow.response.timestamp_start = time.time()
        yield HttpResponseHeadersHook(self.flow)
        if (yield from self.check_killed(True)):
            return
        yield from self.send_response()
        if not http1 and self.flow.response is not None and self.server_state == self.state_done:
            self.client_state = self.state_errored  # the rest of the body: dropped, never an error
            yield from self.flow_done()

    def flow_done(self) -> Commands:
        yield from super().flow_done()
        yield from goaway_after_last_answer(self)  # keep-alive limits and drain: see the end of this module

    def handle_protocol_error(self, event: RequestProtocolError | ResponseProtocolError) -> Commands:
        note_upstream_failure(self.flow, event)  # see the end of this module
        yield from super().handle_protocol_error(event)

    def state_consume_request_body(self, event: Event) -> Commands:
        if not self.answered_early:
            yield from super().state_consume_request_body(event)
        elif isinstance(event, RequestEndOfMessage):  # data and trailers before it are discarded
            self.client_state = self.state_done
            if state(self.flow).body_after_answer:
                yield RefusedBodyReadHook(self.flow)
            if self.server_state == self.state_done:
                yield from self.flow_done()


def install() -> None:
    """Use the strict classes for every HTTP connection of this process. Refused, before anything
    is replaced, on a mitmproxy or h11 other than the versions these classes were tested on
    (``mitm_internals.require_tested_versions``)."""
    install_http_layers(StrictHttp1Server, StrictHttpStream)


# ---------------------------------------------------------------------------------------------
# HTTP/2: the last answer on a connection (keep-alive limits and drain; ``addons/drain.py`` marks
# it: ``FlowState.last_on_connection``). mitmproxy has no public way to end an HTTP/2 connection
# gracefully, and h2's own ``close_connection`` moves h2's state machine to CLOSED, after which it
# refuses to send the answers still in flight on other streams. So a GOAWAY frame (NO_ERROR, last
# stream 2^31-1: "open no new stream here", RFC 9113 6.8) is written to the client connection after
# the marked answer's last frame, beside h2's state. Compliant clients send their next requests on
# a new connection and close this one once their open streams are answered (else it ends by the
# keep-alive timeout); a client that ignores the GOAWAY is still served on it (the limits balance
# load; they guard nothing).

# RFC 9113 4.1 and 6.8: length 8, type GOAWAY (7), no flags, stream 0; last stream id, error code
GRACEFUL_GOAWAY = struct.pack(">I", 8)[1:] + bytes([0x7, 0]) + struct.pack(">III", 0, 2**31 - 1, 0)


def goaway_after_last_answer(stream: HttpStream) -> Commands:
    if state(stream.flow).last_on_connection and stream.context.client.alpn == b"h2":
        yield SendData(stream.context.client, GRACEFUL_GOAWAY)


# ---------------------------------------------------------------------------------------------
# Whose failure ended a flow: the ``error`` hook sees only a message, the same for a client that
# hung up or reset its stream and for an upstream that did (mitmproxy words an HTTP/2 reset
# "by client" on either side). The layer knows: a ResponseProtocolError comes from the upstream
# side (refused, reset, closed, timed out, an answer that cannot be parsed), a RequestProtocolError
# from the client's. ``AccessGate.error`` counts only the first in ``portcullis_upstream_errors``.

def note_upstream_failure(flow: http.HTTPFlow, event: RequestProtocolError | ResponseProtocolError) -> None:
    if isinstance(event, ResponseProtocolError):
        state(flow).upstream_failed = True


# ---------------------------------------------------------------------------------------------
# What the client got when a flow failed. mitmproxy runs the ``error`` hook before the answer it
# owes a failed flow goes out (``_own_answer`` puts the gateway's 502 in place of its page after
# that hook), so the decision log learns the answer from ``error_answered``, a hook of Portcullis'
# own, run once per failed flow after that point: the status the gateway answered with is then in
# ``FlowState.gateway_answer`` (None: the client got no answer), the upstream's in
# ``FlowState.upstream_status`` (None: the upstream never answered).


@dataclass
class ErrorAnsweredHook(StartHook):
    """A failed flow's answer went out, or none will: after ``error``, once per flow."""

    name = "error_answered"
    flow: http.HTTPFlow
