"""Fail closed: mitmproxy logs an exception raised by a hook and lets the flow go on upstream.
Every Portcullis hook runs inside ``fail_closed``, which turns any error into a 500 answer."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable

from mitmproxy import http

from gateway.headers import CORRELATION_ID

logger = logging.getLogger(__name__)

CORRELATION_KEY = "portcullis.correlation_id"
ALLOWED_KEY = "portcullis.allowed"
DEVICE_KEY = "portcullis.device_id"
REQUEST_KEY = "portcullis.request"
SESSION_KEY = "portcullis.session_controls"
AUTHORIZATION_KEY = "portcullis.authorization"  # kept in memory for re-evaluation, never logged
COOKIES_KEY = "portcullis.cookies"  # likewise

type Hook[A] = Callable[[A, http.HTTPFlow], Awaitable[None]]


def fail_closed[A](hook: Hook[A]) -> Hook[A]:
    @functools.wraps(hook)
    async def guarded(addon: A, flow: http.HTTPFlow) -> None:
        try:
            await hook(addon, flow)
        except Exception:  # noqa: BLE001  (one of the three edges: log, then block)
            correlation_id = flow.metadata.get(CORRELATION_KEY, "-")
            logger.exception("[%s] %s failed; blocking the request", correlation_id, hook.__qualname__)
            flow.metadata[ALLOWED_KEY] = False
            try:
                respond(flow, 500, b'{"error": "internal_error"}', (("Content-Type", "application/json"),))
            except Exception:  # noqa: BLE001  (even the error answer failed: drop the connection)
                logger.exception("[%s] could not answer; killing the flow", correlation_id)
                flow.kill()

    return guarded


def respond(flow: http.HTTPFlow, status: int, body: bytes, headers: tuple[tuple[str, str], ...]) -> None:
    """Answer the client ourselves; nothing of this request reaches an upstream."""
    flow.request.stream = False
    response = http.Response.make(status, body, http.Headers([(k.encode(), v.encode()) for k, v in headers]))
    if CORRELATION_KEY in flow.metadata and CORRELATION_ID not in response.headers:
        response.headers[CORRELATION_ID] = flow.metadata[CORRELATION_KEY]
    flow.response = response
