"""The gateway's JWKS at ``/.well-known/jwks.json``: the public key backends verify upstream
identity assertions with. Served on ``gateway.serviceHost`` beside the MTD webhook, and mountable
on any other listener (``jwks_route``)."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Mount, Route

from gateway.identity.assertion import JWKS_PATH, AssertionSigner
from gateway.web.types import ASGIApp

CACHE_SECONDS = 300  # backends refetch within minutes of a key change


def jwks_route(signer: AssertionSigner) -> Route:
    document = signer.jwks()  # the key never changes while the gateway runs

    async def jwks(_: Request) -> JSONResponse:
        return JSONResponse(document, headers={"Cache-Control": f"public, max-age={CACHE_SECONDS}"})

    return Route(JWKS_PATH, jwks, methods=["GET"])


def service_host_app(signer: AssertionSigner, others: ASGIApp | None = None) -> Starlette:
    """The JWKS, and every other path handed to ``others`` (the MTD webhook) when there is one."""
    routes: list[BaseRoute] = [jwks_route(signer)]
    if others is not None:
        routes.append(Mount("", app=others))
    return Starlette(routes=routes)
