"""Which upstream answers reach the client as their bytes arrive, and which are held whole first.

mitmproxy holds an answer until it has ended unless the answer declares a length above
``stream_large_bodies``: it streams only what it can size in advance. An answer of unknown length
(chunked, read until the upstream closes, HTTP/2 without ``content-length``) is held until it ends
or passes that bound, and the notification channels of Exchange and SharePoint are such answers:
EWS ``GetStreamingEvents`` stays open for up to 30 minutes and sends an event every few seconds,
OWA's and SharePoint's channels and any ``text/event-stream`` alike. Held, their events would
reach the client all at once at the end. So answers of unknown length pass through as they come.

Holding one buys nothing: the gateway judges an answer by its status and headers (the session
controls), never by its body, and an answer it replaces has its body dropped as it streams in. A
small answer of known length is still held whole and written in one piece with its length.
Pure: no mitmproxy here.
"""

from __future__ import annotations

from collections.abc import Mapping

# A body (an answer, or a request on its way upstream) declared up to this size is held whole;
# a longer one streams. ``addons/runner.py`` gives it to mitmproxy as ``stream_large_bodies``.
BUFFERED_BODY_BYTES = 1024 * 1024
EVENT_STREAM = "text/event-stream"
NO_BODY_STATUSES = frozenset({204, 304})


def streams_as_sent(method: str, status: int, headers: Mapping[str, str]) -> bool:
    """Whether an answer goes to the client as its bytes arrive. ``headers`` are the upstream's,
    looked up by lower-case name (mitmproxy's are case-insensitive). An answer without a body
    (RFC 9110 §6.4.1: to HEAD, 1xx, 204, 304) has nothing to stream; one whose length is unknown
    (RFC 9112 §6.3: chunked, until close) or declared above the bound streams, an event stream
    whatever its framing."""
    if method.upper() == "HEAD" or status < 200 or status in NO_BODY_STATUSES:
        return False
    if headers.get("content-type", "").split(";")[0].strip().lower() == EVENT_STREAM:
        return True
    declared = headers.get("content-length")
    if "transfer-encoding" in headers or declared is None or not declared.strip().isdecimal():
        return True
    return int(declared) > BUFFERED_BODY_BYTES
