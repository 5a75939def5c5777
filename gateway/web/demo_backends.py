"""Demo upstreams shaped like Exchange (OWA, ActiveSync, EWS, Autodiscover) and SharePoint
(sites, REST, downloads). Each answers JSON describing what it received, so a person (or a test)
can see exactly which headers the gateway forwarded."""

from __future__ import annotations

import asyncio

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
NOT_ECHOED = {"authorization", "cookie"}


MAX_PING_SECONDS = 60


async def _echo(request: Request) -> JSONResponse:
    backend = request.app.state.backend
    if request.query_params.get("Cmd") == "Ping":  # ActiveSync long-poll: answer when the heartbeat ends
        await asyncio.sleep(min(float(request.query_params.get("HeartbeatInterval", "30")), MAX_PING_SECONDS))
    received = {k: v for k, v in request.headers.items() if k not in NOT_ECHOED}
    if request.cookies:  # names only: a demo page must not echo cookie values
        received["x-demo-cookie-names"] = ",".join(sorted(request.cookies))
    if request.query_params.get("download") == "1":  # a file served from an ordinary URL
        return await _download(request)
    if request.method in ("POST", "PUT", "PATCH"):
        received["x-demo-body-bytes"] = str(len(await request.body()))
    return JSONResponse({
        "backend": backend, "method": request.method, "path": request.url.path,
        "query": request.url.query, "receivedHeaders": received,
    })


async def _download(request: Request) -> Response:
    name = "Quarterly report.docx"
    return Response(
        b"demo document bytes\n",
        media_type="application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        headers={"Content-Disposition": f'{request.query_params.get("disposition", "attachment")}; filename="{name}"'},
    )


def exchange_app() -> Starlette:
    app = Starlette(routes=[
        Route("/owa/{rest:path}", _echo, methods=ALL_METHODS),
        Route("/Microsoft-Server-ActiveSync", _echo, methods=ALL_METHODS),
        Route("/EWS/Exchange.asmx", _echo, methods=ALL_METHODS),
        Route("/autodiscover/{rest:path}", _echo, methods=ALL_METHODS),
    ])
    app.state.backend = "exchange"
    return app


def sharepoint_app() -> Starlette:
    app = Starlette(routes=[
        Route("/sites/{rest:path}", _echo, methods=ALL_METHODS),
        Route("/_api/{rest:path}", _echo, methods=ALL_METHODS),
        Route("/_layouts/15/download.aspx", _download, methods=["GET", "HEAD"]),
    ])
    app.state.backend = "sharepoint"
    return app
