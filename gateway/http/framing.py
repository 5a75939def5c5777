"""Request framing and client time limits: where one request ends and the next begins, decided once
and strictly, and how long a client may take to say it.

When the gateway and an upstream disagree about where a request ends, the bytes the gateway took
for a body reach the upstream as a request of its own that was never decided (request smuggling).
mitmproxy re-frames what it forwards, but its parser is lenient: it strips ``\\x0b`` and ``\\x0c``
around values (``Transfer-Encoding: chunked\\x0b`` reads as ``chunked``), accepts bare LF, folded
lines and ``Chunked``, and forwards those header values verbatim, so an upstream may read them
differently. The gateway therefore accepts only the unambiguous core of RFC 9112 and refuses the
rest with 400 and a closed connection, before any hook, decision or upstream sees the request::

    request-head  = request-line *( field-line CRLF ) CRLF          (CRLF only: no bare LF or CR)
    request-line  = method SP request-target SP ( "HTTP/1.1" / "HTTP/1.0" ) CRLF   (single SPs;
                    the target holds no whitespace and no NUL)
    field-line    = token ":" OWS [ value ] OWS    (no obs-fold; the value holds no CR, LF, NUL,
                                                    VT or FF: mitmproxy strips VT and FF, upstreams
                                                    may not. Other control bytes frame nothing:
                                                    gateway.http.headers refuses them after parsing,
                                                    for HTTP/2 alike)
    framing       = at most one Content-Length, 1*19DIGIT without leading zeros, below 2**63;
                    or exactly one "Transfer-Encoding: chunked", on HTTP/1.1 only; never both;
                    at most one Host
    chunked-body  = *( chunk-size [ chunk-ext ] CRLF data CRLF ) "0" [ chunk-ext ] CRLF CRLF
    chunk-size    = 1*15HEXDIG ; chunk-ext = *( ";" token [ "=" ( token / quoted-string ) ] )
                    (no trailer section: mitmproxy cannot carry request trailers)

It also holds the client time limits (slowloris and friends): mitmproxy has only an idle timeout,
which a client keeps from firing by sending a byte now and then. Pure logic: no mitmproxy here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from gateway.http.headers import MAX_HEADER_BYTES, TOKEN

MAX_EMPTY_LINE_BYTES = 8  # empty lines (CRLF) before a request line: RFC 9112 §2.2 asks to ignore at least one
MAX_REQUEST_LINE_BYTES = 8 * 1024  # IIS accepts 4 KiB URLs (16 KiB with the query); nginx 8 KiB lines
MAX_REQUEST_HEAD_BYTES = MAX_REQUEST_LINE_BYTES + MAX_HEADER_BYTES + 2  # any head that passes Routing's 431 check
MAX_UNREAD_BYTES = 256 * 1024  # what a client may send ahead of the answer it waits for (pipelining)
MAX_CHUNK_LINE_BYTES = 4 * 1024  # a chunk size and its extensions
MAX_CONTENT_LENGTH = 2**63 - 1  # what every upstream can hold in a signed 64-bit length
MAX_REFUSED_BODY_BYTES = 64 * 1024  # a refused request's body read and discarded to keep its connection

_REQUEST_LINE = re.compile(rb"(" + TOKEN + rb") ([^\x00\t\n\x0b\x0c\r ]+) HTTP/(1\.[01])")
_NAME = re.compile(TOKEN)
_NOT_IN_VALUE = re.compile(rb"[\x00\n\r\x0b\x0c]")
_CONTENT_LENGTH = re.compile(rb"0|[1-9][0-9]{0,18}")
_QUOTED = rb'"[^"\\\x00-\x08\x0a-\x1f\x7f]*"'  # a quoted-string without escapes
_CHUNK_EXTENSION = rb";" + TOKEN + rb"(?:=(?:" + TOKEN + rb"|" + _QUOTED + rb"))?"
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,15})(?:" + _CHUNK_EXTENSION + rb")*\r\n")
_EMPTY_LINES = re.compile(rb"[\r\n]*")
HEAD_END = re.compile(rb"\n\r?\n")  # where mitmproxy (h11's ReceiveBuffer) takes a request head to end


@dataclass(frozen=True, slots=True)
class Refusal:
    """An answer to a request the gateway will not read further; the connection closes after it.
    ``description`` never repeats what the client sent (it may carry a token)."""

    status: int
    description: str


def bad_request(description: str) -> Refusal:
    return Refusal(400, description)


HEAD_TOO_LARGE = Refusal(431, f"request head larger than {MAX_REQUEST_HEAD_BYTES // 1024} KiB")
LINE_TOO_LONG = Refusal(414, f"request line longer than {MAX_REQUEST_LINE_BYTES // 1024} KiB")


def empty_line_bytes(buffered: bytes | bytearray) -> int:
    """How many CR and LF bytes open ``buffered`` (counted up to one past the bound, never further)."""
    match = _EMPTY_LINES.match(buffered, 0, MAX_EMPTY_LINE_BYTES + 1)
    return match.end() if match else 0


def request_head_refusal(buffered: bytes) -> Refusal | None:
    """Why the request head at the start of ``buffered`` is refused, or None: acceptable, or not
    complete yet and still within bounds. A few empty lines (CRLF) may come first, as RFC 9112 asks;
    the size bounds count them, so a buffer that only grows always meets one."""
    start = empty_line_bytes(buffered)
    if start > MAX_EMPTY_LINE_BYTES:
        return bad_request(f"more than {MAX_EMPTY_LINE_BYTES // 2} empty lines before the request line")
    if buffered[:start].replace(b"\r\n", b""):
        return bad_request("request head has bare CR or LF line endings")
    end = HEAD_END.search(buffered, start)
    if end is None:
        if len(buffered) > MAX_REQUEST_LINE_BYTES + 2 and b"\n" not in buffered[start:MAX_REQUEST_LINE_BYTES + 2]:
            return LINE_TOO_LONG
        return HEAD_TOO_LARGE if len(buffered) > MAX_REQUEST_HEAD_BYTES else None
    head = buffered[start:end.end()]
    if len(head) > MAX_REQUEST_HEAD_BYTES:
        return HEAD_TOO_LARGE
    crlf = head.count(b"\r\n")
    if head.count(b"\n") != crlf or head.count(b"\r") != crlf:
        return bad_request("request head has bare CR or LF line endings")
    request_line, *lines = head[:-4].split(b"\r\n")
    return _request_line_refusal(request_line) or _fields_refusal(lines, request_line.endswith(b"HTTP/1.0"))


def _request_line_refusal(line: bytes) -> Refusal | None:
    if len(line) > MAX_REQUEST_LINE_BYTES:
        return LINE_TOO_LONG
    if _REQUEST_LINE.fullmatch(line) is None:
        return bad_request("request line is not METHOD SP target SP HTTP/1.1 (or HTTP/1.0)")
    return None


def _fields_refusal(lines: list[bytes], http10: bool) -> Refusal | None:
    framing: dict[bytes, list[bytes]] = {b"host": [], b"content-length": [], b"transfer-encoding": []}
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            return bad_request("header values folded over several lines are not accepted")
        name, colon, value = line.partition(b":")
        if not colon or _NAME.fullmatch(name) is None or _NOT_IN_VALUE.search(value):
            return bad_request("malformed header line (a name that is not a token, whitespace before "
                               "the colon, or CR, LF, NUL, VT or FF in the value)")
        if (name := name.lower()) in framing:
            framing[name].append(value.strip(b" \t"))
    return _framing_refusal(framing[b"host"], framing[b"content-length"], framing[b"transfer-encoding"], http10)


def _framing_refusal(hosts: list[bytes], lengths: list[bytes], encodings: list[bytes], http10: bool) -> Refusal | None:
    """RFC 9112 §6.3: a request whose length cannot be known one way is refused, not guessed."""
    if len(hosts) > 1:
        return bad_request("more than one Host header")
    if encodings and lengths:
        return bad_request("both Transfer-Encoding and Content-Length")
    if len(encodings) > 1:
        return bad_request("more than one Transfer-Encoding header")
    if encodings and http10:
        return bad_request("Transfer-Encoding on an HTTP/1.0 request")
    if encodings and encodings[0] != b"chunked":
        return bad_request("the only Transfer-Encoding accepted is 'chunked'")
    if len(lengths) > 1:
        return bad_request("more than one Content-Length header")
    if lengths and (_CONTENT_LENGTH.fullmatch(lengths[0]) is None or int(lengths[0]) > MAX_CONTENT_LENGTH):
        return bad_request("Content-Length is not a decimal number of octets")
    return None


def refused_body_keeps_connection(http_version: str, fields: Iterable[tuple[str, str]]) -> bool:
    """Whether an HTTP/1 request refused at its head, with a body still to come, keeps its
    connection: the answer goes out, the body is read and discarded, and the next request is served
    (RFC 9110 §10.1.1 allows this or closing). Clients that read a close as "server busy" retry a
    refusal instead of reporting it. Only when both sides know where that body ends and it is small:
    HTTP/1.1, one Content-Length of at most ``MAX_REFUSED_BODY_BYTES``, no Transfer-Encoding (a
    chunked body is unbounded), no Expect (a client waiting for a 100 Continue that never comes may
    send its body or not: the next bytes could be either), and no ``Connection: close``.
    ``fields`` are the head's fields as the client sent them (before any hook changed them)."""
    lengths: list[bytes] = []
    for name, value in fields:
        folded = name.lower()
        if folded in ("transfer-encoding", "expect"):
            return False
        if folded == "connection" and "close" in (token.strip(" \t").lower() for token in value.split(",")):
            return False
        if folded == "content-length":
            lengths.append(value.strip(" \t").encode())
    return http_version == "HTTP/1.1" and len(lengths) == 1 and _CONTENT_LENGTH.fullmatch(lengths[0]) is not None \
        and int(lengths[0]) <= MAX_REFUSED_BODY_BYTES


def chunk_size(line: bytes) -> int:
    """The size announced by a complete chunk line (with its CRLF); ValueError says why it is refused."""
    match = _CHUNK_LINE.fullmatch(line) if len(line) <= MAX_CHUNK_LINE_BYTES + 2 else None
    if match is None:
        raise ValueError("malformed chunk size line (a short hexadecimal size, optional extensions, CRLF)")
    return int(match[1], 16)


def pending_chunk_line_problem(pending: bytes) -> str | None:
    """Why an incomplete chunk line can already be refused: a bare LF, or more bytes than any
    size and extensions need (otherwise the gateway would buffer it without bound)."""
    if b"\n" in pending:
        return "bare LF in a chunk size line"
    if len(pending) > MAX_CHUNK_LINE_BYTES:
        return f"chunk size line longer than {MAX_CHUNK_LINE_BYTES} bytes"
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientLimits:
    """How long a client may take (seconds; bytes per second for bodies).

    ``header_seconds`` runs from accepting a connection (TLS handshake included), or from the first
    byte after a keep-alive pause, to a complete request head; ``keepalive_seconds`` is how long an
    idle connection waits for its next request; a request body must arrive at ``body_min_rate``
    bytes per second on average once ``body_grace_seconds`` are spent (Apache's mod_reqtimeout:
    body=20,MinRate=500). Time the gateway spends waiting for its upstream is not the client's."""

    header_seconds: float = 10.0
    keepalive_seconds: float = 60.0
    body_grace_seconds: float = 20.0
    body_min_rate: float = 500.0

    def __post_init__(self) -> None:
        for name in ("header_seconds", "keepalive_seconds", "body_grace_seconds", "body_min_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")




class Phase(StrEnum):
    HEAD = "head"  # waiting for a request head (a new connection, or bytes after a keep-alive pause)
    BODY = "body"  # a request body is being received
    ANSWER = "answer"  # every request is read; the gateway owes the answers (no client deadline)
    IDLE = "idle"  # keep-alive: nothing asked, nothing owed
    TUNNEL = "tunnel"  # a pass-through tunnel (kiosk): no HTTP to time


@dataclass(slots=True)
class ClientDeadline:
    """What one client connection owes the gateway, and by when (times from one monotonic clock).

    HTTP/2 multiplexes: the connection is in BODY while any request body is open and in ANSWER
    while any answer is owed; between requests its frames (PING, WINDOW_UPDATE, SETTINGS) start no
    request, so it stays IDLE until the next request's headers. Body time counts only while the
    gateway waits to read (not while it waits for an upstream to take what it already read)."""

    limits: ClientLimits
    since: float  # when the current HEAD or IDLE phase began
    tunnel: bool = False
    multiplexed: bool = False  # HTTP/2: bytes while IDLE are frames, not the start of a request head
    bodies: set[str] = field(default_factory=set)
    requests: set[str] = field(default_factory=set)
    idle: bool = False
    body_bytes: int = 0
    waited: float = 0.0
    read_since: float | None = None

    @property
    def phase(self) -> Phase:
        if self.tunnel:
            return Phase.TUNNEL
        if self.bodies:
            return Phase.BODY
        if self.requests:
            return Phase.ANSWER
        return Phase.IDLE if self.idle else Phase.HEAD

    def due(self) -> float | None:
        """When the connection is to be closed unless something changes; None: no deadline now."""
        match self.phase:
            case Phase.HEAD:
                return self.since + self.limits.header_seconds
            case Phase.IDLE:
                return self.since + self.limits.keepalive_seconds
            case Phase.BODY if self.read_since is not None:
                allowed = self.limits.body_grace_seconds + self.body_bytes / self.limits.body_min_rate
                return self.read_since + max(0.0, allowed - self.waited)
            case _:
                return None

    def read_started(self, now: float) -> None:
        self.read_since = now

    def read_finished(self, now: float, received: int) -> None:
        if self.phase is Phase.BODY and self.read_since is not None:
            self.waited += now - self.read_since
            self.body_bytes += received
        elif self.phase is Phase.IDLE and received and not self.multiplexed:
            self.idle, self.since = False, now  # a new request begins: the head deadline runs
        self.read_since = None

    def head_received(self, request: str, *, multiplexed: bool = False) -> None:
        self.multiplexed = multiplexed
        if not self.bodies:
            self.body_bytes, self.waited = 0, 0.0
        self.requests.add(request)
        self.bodies.add(request)

    def body_received(self, request: str) -> None:
        self.bodies.discard(request)

    def answered(self, request: str, now: float, *, body_to_come: bool = False) -> None:
        """``body_to_come``: answered before its body was read (an HTTP/1 refusal that keeps its
        connection); the body's deadline runs on until ``body_discarded``."""
        if not body_to_come:
            self.bodies.discard(request)
        self.requests.discard(request)
        self._idle_when_nothing_owed(now)

    def body_discarded(self, request: str, now: float) -> None:
        """The body of a request answered before it was read has been read and thrown away."""
        self.bodies.discard(request)
        self._idle_when_nothing_owed(now)

    def _idle_when_nothing_owed(self, now: float) -> None:
        if not self.requests and not self.bodies:
            self.idle, self.since = True, now

    def restart_head(self, now: float) -> None:
        """A CONNECT was answered: the tunnelled TLS handshake and first request head are due."""
        self.idle, self.since = False, now
