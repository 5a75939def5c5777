"""The gateway's pages under ``/.portcullis/`` on every protected host: the sign-in callback and
logout; and each host's RFC 9728 protected resource metadata. Served inside the proxy
(addons/service_endpoints.py); never forwarded upstream."""

from __future__ import annotations

import logging

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from gateway.decision.service import AccessService, new_correlation_id
from gateway.decision.sources import certificate_device
from gateway.errors import SignalUnavailable
from gateway.identity.browser import (
    BINDING_COOKIE,
    CALLBACK_PATH,
    LOGOUT_PATH,
    SignInFailed,
    cleared_cookie,
    cookie_value,
)
from gateway.identity.discovery import METADATA_PATH
from gateway.policy.model import DeviceCertificate
from gateway.web import pages
from gateway.web.pages import GatewayResponse
from gateway.web.types import device_certificate

logger = logging.getLogger(__name__)


def browser_app(service: AccessService) -> Starlette:
    async def callback(request: Request) -> Response:
        authority = request.headers.get("host", "").lower()  # validated by Routing against SNI
        state, code = request.query_params.get("state", ""), request.query_params.get("code", "")
        return _response(await complete_sign_in(service, authority, state, code,
                                                request.cookies.get(BINDING_COOKIE), device_certificate(request.scope)))

    async def logout_form(request: Request) -> Response:
        """A link to log out shows a button: logging out changes state, so it takes a POST."""
        return HTMLResponse(LOGOUT_FORM, headers={"Cache-Control": "no-store"})

    async def logout(request: Request) -> Response:
        authority = request.headers.get("host", "").lower()
        origin = request.headers.get("origin")
        if origin is not None and origin.lower() != f"https://{authority}":
            return Response("logout must come from this site", status_code=403)
        return _response(await sign_out(service, request.headers.getlist("cookie")))

    async def resource_metadata(request: Request) -> Response:
        """RFC 9728 §3: the protected resource metadata, and its path-suffixed form."""
        suffix = request.path_params.get("suffix")
        document = service.rules.router.resource_metadata(request.headers.get("host", "").lower(),
                                             f"/{suffix}" if suffix else "")
        if document is None:
            return JSONResponse({"error": "not_found"}, status_code=404)
        return JSONResponse(document, headers={"Cache-Control": "max-age=300"})

    return Starlette(routes=[Route(CALLBACK_PATH, callback), Route(LOGOUT_PATH, logout_form, methods=["GET"]),
                             Route(LOGOUT_PATH, logout, methods=["POST"]),
                             Route(METADATA_PATH, resource_metadata, methods=["GET"]),
                             Route(METADATA_PATH + "/{suffix:path}", resource_metadata, methods=["GET"])])


async def complete_sign_in(service: AccessService, authority: str, state: str, code: str,
                           binding: str | None, certificate: DeviceCertificate | None = None) -> GatewayResponse:
    """The callback at ``https://<host>/.portcullis/callback``: a session, then the original URL.
    On a connection with a verified device certificate the session is bound to its device."""
    if service.browser is None:
        return pages.sign_in_failed("browser sign-in is not configured here")
    try:
        device, problem = await certificate_device(service.inventory, certificate)
        if certificate is not None and problem is None and not certificate.verified:
            problem = certificate.problem
        if problem is not None:
            return pages.sign_in_failed(f"this device's certificate cannot be used: {problem}")
        controls = service.rules.policy_set.session_controls_for_browsers()
        return_url, cookie = await service.browser.complete(authority, state, code, service.clock(), controls,
                                                            binding, device)
    except SignInFailed as failure:
        return pages.sign_in_failed(str(failure))
    except SignalUnavailable:
        return pages.sign_in_failed("the identity provider or the session store cannot be reached right now; "
                                    "try again")
    return pages.redirect(return_url, new_correlation_id(), set_cookie=cookie.header)


async def sign_out(service: AccessService, cookies: list[str]) -> GatewayResponse:
    """The session ends on the server, in every process and host sharing the session store."""
    if service.browser is not None:
        try:
            await service.browser.end(cookie_value(cookies))
        except SignalUnavailable as error:
            logger.error("sign-out not recorded: %s", error)
            return pages.sign_out_failed()
    return pages.signed_out(cleared_cookie())


LOGOUT_FORM = ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Sign out</title></head>"
               f"<body><main><h1>Sign out?</h1><form method=\"post\" action=\"{LOGOUT_PATH}\">"
               "<button type=\"submit\" id=\"sign-out\">Sign out</button></form></main></body></html>")


def _response(page: GatewayResponse) -> Response:
    response = Response(page.body, status_code=page.status_code)
    for name, value in page.headers:
        response.headers.append(name, value)
    return response
