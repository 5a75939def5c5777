"""Drain and keep-alive limits: when a client connection's last answer goes out.

On SIGTERM a gateway stops accepting, finishes what is in flight, then exits; meanwhile every
answer is the last on its connection (``gateway.ops.drain``, which readiness reads too).
Outside a drain, a connection's last answer is the one that
reaches ``maxRequestsPerConnection`` or is sent after ``maxConnectionAgeSeconds`` (nginx's
``keepalive_requests`` and ``keepalive_time``): keep-alive clients reconnect now and then, so the
kernel spreads them across the workers again after one was restarted, instead of one worker
carrying every connection for the rest of their lives.

A last answer carries ``Connection: close`` over HTTP/1 (mitmproxy then closes the connection);
over HTTP/2 it is marked ``FlowState.last_on_connection`` and ``strict_http`` sends a graceful GOAWAY once
its stream has ended (``Connection`` is forbidden in HTTP/2: clients reject such an answer).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from mitmproxy import connection, http

from addons.flow_state import state
from addons.mitm_internals import stop_listening
from addons.safety import fail_closed
from gateway.ops.drain import DrainState

logger = logging.getLogger(__name__)

FLUSH_SECONDS = 0.2  # after the last answer was handed over: time for its bytes to leave


@dataclass(frozen=True, slots=True)
class KeepAliveLimits:
    max_requests: int = 1000
    max_age_seconds: float = 3600.0


class Drain:
    """Counts requests between their headers and their answer, and requests per client connection."""

    def __init__(self, limits: KeepAliveLimits = KeepAliveLimits(), clock: Callable[[], float] = time.time,
                 drain_state: DrainState | None = None) -> None:
        self.state = drain_state or DrainState()
        self.limits = limits
        self._clock = clock  # wall clock: mitmproxy's ``timestamp_start`` is one
        # requests so far per client connection; an entry goes when mitmproxy drops its connection
        self._requests: weakref.WeakKeyDictionary[connection.Client, int] = weakref.WeakKeyDictionary()

    @property
    def in_flight(self) -> set[str]:
        return self.state.in_flight

    @property
    def draining(self) -> bool:
        return self.state.draining

    @draining.setter
    def draining(self, draining: bool) -> None:
        self.state.draining = draining

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self.in_flight.add(flow.id)
        self._requests[flow.client_conn] = self._requests.get(flow.client_conn, 0) + 1

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
        if flow.response is None or not (self.draining or self._spent(flow.client_conn)):
            return
        if flow.request.http_version.startswith("HTTP/1"):
            flow.response.headers["connection"] = "close"
        else:
            state(flow).last_on_connection = True

    def _spent(self, client: connection.Client) -> bool:
        """The connection has served its requests or lived its time (checked as an answer goes out,
        as nginx does: an idle connection ends by the keep-alive timeout instead)."""
        if self._requests.get(client, 0) >= self.limits.max_requests:
            return True
        started = client.timestamp_start
        return started is not None and self._clock() - started >= self.limits.max_age_seconds

    async def drain(self, timeout: float) -> int:
        """Stop every listener, then wait up to ``timeout`` seconds for the requests in flight;
        returns how many were still open when the time ran out."""
        self.draining = True
        await stop_listening()  # open connections go on
        if self.in_flight:
            logger.info("draining: %d requests in flight", len(self.in_flight))
        await self.state.finish(timeout)
        await asyncio.sleep(FLUSH_SECONDS)
        if self.in_flight:
            logger.warning("drain time (%.0f s) is over: %d requests cut off", timeout, len(self.in_flight))
        return len(self.in_flight)
