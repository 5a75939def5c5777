"""Graceful stop: on SIGTERM a gateway stops accepting, finishes what is in flight, then exits."""

from __future__ import annotations

import asyncio
import logging
import time

from mitmproxy import ctx, http
from mitmproxy.addons import proxyserver

from addons.safety import fail_closed

logger = logging.getLogger(__name__)

FLUSH_SECONDS = 0.2  # after the last answer was handed over: time for its bytes to leave


class Drain:
    """Counts requests between their headers and their answer. While draining, every answer
    carries ``Connection: close``, so keep-alive clients reconnect to another worker or host
    instead of holding this one open."""

    def __init__(self) -> None:
        self.in_flight: set[str] = set()
        self.draining = False

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self.in_flight.add(flow.id)

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._close_after(flow)

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        self._close_after(flow)
        self.in_flight.discard(flow.id)

    def error(self, flow: http.HTTPFlow) -> None:
        self.in_flight.discard(flow.id)

    def _close_after(self, flow: http.HTTPFlow) -> None:
        """HTTP/1 only: ``Connection`` is forbidden in HTTP/2 and 3 (clients reject the answer);
        those connections end when the drain time is over."""
        if self.draining and flow.response is not None and flow.request.http_version.startswith("HTTP/1"):
            flow.response.headers["connection"] = "close"

    async def drain(self, timeout: float) -> int:
        """Stop every listener, then wait up to ``timeout`` seconds for the requests in flight;
        returns how many were still open when the time ran out."""
        self.draining = True
        server: proxyserver.Proxyserver = ctx.master.addons.get("proxyserver")
        await server.servers.update([])  # stop listening; open connections go on
        deadline = time.monotonic() + timeout
        if self.in_flight:
            logger.info("draining: %d requests in flight", len(self.in_flight))
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(FLUSH_SECONDS)
        if self.in_flight:
            logger.warning("drain time (%.0f s) is over: %d requests cut off", timeout, len(self.in_flight))
        return len(self.in_flight)
