"""Demo upstreams shaped like Exchange (OWA, ActiveSync, EWS, Autodiscover) and SharePoint
(sites, REST, downloads). Each answers JSON describing what it received, so a person (or a test)
can see exactly which headers the gateway forwarded, and the claims of the gateway's identity
assertion once verified, as a real backend would verify them."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.identity.assertion import verify_assertion
from gateway.identity.tokens import RejectedToken

ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
NOT_ECHOED = {"authorization", "cookie"}


MAX_PING_SECONDS = 60


@dataclass(frozen=True, slots=True)
class AssertionCheck:
    """What a backend needs to trust the gateway's assertion: its header, the gateway's public
    keys (JWKS), the issuer, and the backend's own address as the audience."""

    header: str
    jwks: dict[str, Any]
    issuer: str
    audience: str

    def claims(self, request: Request) -> dict[str, Any] | None:
        """The verified claims, ``{"rejected": why}``, or None when the request carries no assertion."""
        values = request.headers.getlist(self.header)
        if not values:
            return None
        if len(values) > 1:
            return {"rejected": "more than one assertion"}
        verified = verify_assertion(values[0], self.jwks, audience=self.audience, issuer=self.issuer)
        return {"rejected": verified.reason} if isinstance(verified, RejectedToken) else verified


async def _echo(request: Request) -> Response:
    if request.query_params.get("Cmd") == "Ping":  # ActiveSync long-poll: answer when the heartbeat ends
        # (on every echoing route: a test holds an OWA request open through the kiosk the same way)
        await _hold(request, min(float(request.query_params.get("HeartbeatInterval", "30")), MAX_PING_SECONDS))
    received = {k: v for k, v in request.headers.items() if k not in NOT_ECHOED}
    if request.cookies:  # names only: a demo page must not echo cookie values
        received["x-demo-cookie-names"] = ",".join(sorted(request.cookies))
    if request.query_params.get("download") == "1":  # a file served from an ordinary URL
        return await _download(request)
    if request.method in ("POST", "PUT", "PATCH"):
        received["x-demo-body-bytes"] = str(len(await request.body()))
    answer: dict[str, object] = {**_request_line(request), "receivedHeaders": received}
    check: AssertionCheck | None = request.app.state.assertion_check
    if check is not None:
        answer["verifiedAssertion"] = check.claims(request)
    return JSONResponse(answer)


async def _hold(request: Request, seconds: float) -> None:
    """Held requests are counted by User-Agent while they wait (``DemoUpstreams.holding``): the
    sign that the gateway forwarded a long-poll, which a test waits for before it changes a device."""
    held: Counter[str] = request.app.state.holding
    user_agent = request.headers.get("user-agent", "")
    held[user_agent] += 1
    try:
        await asyncio.sleep(seconds)
    finally:
        held[user_agent] -= 1
        if held[user_agent] <= 0:
            del held[user_agent]


def _request_line(request: Request) -> dict[str, str]:
    """What the backend was asked for: ``path`` decoded as the backend routes on it, and
    ``rawPath`` byte for byte as it arrived (latin-1 keeps every byte), so a test can compare both
    with what the gateway matched."""
    return {"backend": request.app.state.backend, "method": request.method, "path": request.scope["path"],
            "rawPath": request.scope.get("raw_path", b"").decode("latin-1"), "query": request.url.query}


async def _not_routed(request: Request, error: Exception) -> Response:
    """No route or no such method here (404, 405): still say what arrived, so a request that
    should never have been forwarded cannot hide behind a plain "Not Found"."""
    assert isinstance(error, HTTPException)  # registered for HTTPException only
    return JSONResponse({**_request_line(request), "error": error.detail}, error.status_code, error.headers)


async def _download(request: Request) -> Response:
    name = "Quarterly report.docx"
    return Response(
        b"demo document bytes\n",
        media_type="application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        headers={"Content-Disposition": f'{request.query_params.get("disposition", "attachment")}; filename="{name}"'},
    )


def exchange_app(assertion_check: AssertionCheck | None = None) -> Starlette:
    app = Starlette(routes=[
        Route("/owa/{rest:path}", _echo, methods=ALL_METHODS),
        Route("/Microsoft-Server-ActiveSync", _echo, methods=ALL_METHODS),
        Route("/EWS/Exchange.asmx", _echo, methods=ALL_METHODS),
        Route("/autodiscover/{rest:path}", _echo, methods=ALL_METHODS),
    ], exception_handlers={HTTPException: _not_routed})
    app.state.backend = "exchange"
    app.state.assertion_check = assertion_check
    app.state.holding = Counter()
    return app


def sharepoint_app(assertion_check: AssertionCheck | None = None) -> Starlette:
    app = Starlette(routes=[
        Route("/sites/{rest:path}", _echo, methods=ALL_METHODS),
        Route("/_api/{rest:path}", _echo, methods=ALL_METHODS),
        Route("/_layouts/15/download.aspx", _download, methods=["GET", "HEAD"]),
    ], exception_handlers={HTTPException: _not_routed})
    app.state.backend = "sharepoint"
    app.state.assertion_check = assertion_check
    app.state.holding = Counter()
    return app
