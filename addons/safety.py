"""Fail closed: mitmproxy logs an exception raised by a hook and lets the flow go on upstream.
Every Portcullis hook that runs while the answer can still change runs inside ``fail_closed``,
which turns any error into a 500 answer (tests/test_security_fail_closed.py checks that each is).

On the request side (``requestheaders``, ``request``, ``http_connect``) the 500 is answered
instead of forwarding. On the response side (``responseheaders``, ``response``) the upstream's
answer is replaced before any byte of it reaches the client: in ``responseheaders`` mitmproxy goes
on reading the upstream body into whatever response the flow holds, so the replacement drops that
body as it streams in and emits its own at the end (``dropping_upstream_body``). An answer that
streams (``gateway/http/response_streaming.py``) has reached the client before its ``response`` hooks
run: none of them decides access (they end deadlines, count keep-alive limits, forget open flows).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, cast

from mitmproxy import connection, http

from addons.flow_state import state
from gateway.decision.service import new_correlation_id
from gateway.http.headers import CORRELATION_ID
from gateway.web import pages

logger = logging.getLogger(__name__)

RESPONSE_HOOKS = frozenset({"responseheaders", "response"})  # the upstream already answered: replace that answer
NO_BODY_STATUSES = frozenset({204, 304})

type Hook = Callable[..., Any]
GUARD_MARK = "__fails_closed__"  # set on every hook ``fail_closed`` wrapped (``is_fail_closed``)


def fail_closed[F: Hook](hook: F) -> F:
    """Wrap an addon hook (``hook(addon, flow)`` or ``hook(addon, client)``, sync or async; it stays
    what it was: a sync hook costs no coroutine) so that any exception it raises blocks the flow."""
    if inspect.iscoroutinefunction(hook):
        @functools.wraps(hook)
        async def guarded(addon: object, flow: http.HTTPFlow | connection.Client) -> None:
            try:
                await hook(addon, flow)
            except Exception:  # noqa: BLE001  (one of the three edges: log, then block)
                block(flow, hook.__name__, hook.__qualname__)

        setattr(guarded, GUARD_MARK, True)
        return cast(F, guarded)

    @functools.wraps(hook)
    def guarded_sync(addon: object, flow: http.HTTPFlow | connection.Client) -> None:
        try:
            hook(addon, flow)
        except Exception:  # noqa: BLE001  (as above)
            block(flow, hook.__name__, hook.__qualname__)

    setattr(guarded_sync, GUARD_MARK, True)
    return cast(F, guarded_sync)


def is_fail_closed(function: object) -> bool:
    """Whether ``function`` is a hook wrapped by ``fail_closed``."""
    return getattr(function, GUARD_MARK, False) is True


def block(flow: http.HTTPFlow | connection.Client, event: str, name: str) -> None:
    """Called inside an ``except``: log the error, then answer 500 in place of the request or the
    upstream's answer; when even that fails, kill the flow (the client connection is dropped).
    A connection hook (``client_connected``) that fails refuses the connection instead."""
    if isinstance(flow, connection.Client):
        logger.exception("%s failed; refusing the connection from %s", name, flow.peername)
        flow.error = "internal error"
        return
    try:
        flow_state = state(flow)
        if flow_state.correlation_id is None:  # failed before Routing named the request
            flow_state.correlation_id = new_correlation_id()
        logger.exception("[%s] %s failed; blocking the request", flow_state.correlation_id, name)
        flow_state.allowed = False
        flow_state.failed_hook = name  # DecisionRecords logs it as a decision when nothing else will
        if event in RESPONSE_HOOKS and flow.response is not None:
            replace_response(flow)
        else:
            answer(flow, pages.internal_error(flow_state.correlation_id))
    except Exception:  # even the error answer failed: drop the connection
        logger.exception("could not answer after %s failed; killing the flow", name)
        flow.kill()


def respond(flow: http.HTTPFlow, status: int, body: bytes, headers: tuple[tuple[str, str], ...]) -> None:
    """Answer the client ourselves; nothing of this request reaches an upstream."""
    flow.request.stream = False
    response = http.Response.make(status, body, http.Headers([(k.encode(), v.encode()) for k, v in headers]))
    correlation_id = state(flow).correlation_id
    if correlation_id is not None and CORRELATION_ID not in response.headers:
        response.headers[CORRELATION_ID] = correlation_id
    flow.response = response


def answer(flow: http.HTTPFlow, page: pages.GatewayResponse, *, close: bool = False) -> None:
    """Answer with one of the gateway's pages (``gateway/web/pages.py``)."""
    respond(flow, page.status_code, page.body, (*page.headers, ("Connection", "close")) if close else page.headers)


def replace_response(flow: http.HTTPFlow) -> None:
    """The upstream answered (its headers at least): a 500 of ours goes out instead, and none of
    the upstream's body. An upstream answer without a body (HEAD, 204, 304, ``Content-Length: 0``)
    gets no body from us either: mitmproxy would set the response's content to the (empty)
    upstream body after ``responseheaders``, and a declared length with no bytes hangs the client."""
    upstream = flow.response
    assert upstream is not None  # response-side hooks only
    empty = flow.request.method.upper() == "HEAD" or upstream.status_code in NO_BODY_STATUSES \
        or upstream.status_code < 200 or upstream.headers.get("content-length", "").strip() == "0"
    page = pages.internal_error(state(flow).correlation_id or new_correlation_id())
    body = b"" if empty else page.body
    respond(flow, 500, body, page.headers)
    assert flow.response is not None  # respond set it
    flow.response.stream = dropping_upstream_body(body)


def dropping_upstream_body(body: bytes) -> Callable[[bytes], bytes]:
    """A response stream function: mitmproxy calls it per upstream chunk, then once with b"" at
    the end. Every upstream chunk is dropped; ``body`` goes out at the end, once."""
    pending = [body]

    def stream(chunk: bytes) -> bytes:
        return b"" if chunk or not pending else pending.pop()

    return stream
