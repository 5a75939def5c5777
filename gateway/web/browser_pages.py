"""The gateway's pages under ``/.portcullis/`` on every protected host: the sign-in callback and
logout; and each host's RFC 9728 protected resource metadata. Served inside the proxy
(addons/service_endpoints.py); never forwarded upstream."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from gateway.access import AccessService
from gateway.identity.browser import BINDING_COOKIE, CALLBACK_PATH, LOGOUT_PATH
from gateway.identity.discovery import METADATA_PATH
from gateway.web.pages import GatewayResponse


def browser_app(service: AccessService) -> Starlette:
    async def callback(request: Request) -> Response:
        authority = request.headers.get("host", "").lower()  # validated by Routing against SNI
        state, code = request.query_params.get("state", ""), request.query_params.get("code", "")
        return _response(await service.complete_sign_in(authority, state, code,
                                                        request.cookies.get(BINDING_COOKIE)))

    async def logout_form(request: Request) -> Response:
        """A link to log out shows a button: logging out changes state, so it takes a POST."""
        return HTMLResponse(LOGOUT_FORM, headers={"Cache-Control": "no-store"})

    async def logout(request: Request) -> Response:
        authority = request.headers.get("host", "").lower()
        origin = request.headers.get("origin")
        if origin is not None and origin.lower() != f"https://{authority}":
            return Response("logout must come from this site", status_code=403)
        return _response(await service.sign_out(request.headers.getlist("cookie")))

    async def resource_metadata(request: Request) -> Response:
        """RFC 9728 §3: the protected resource metadata, and its path-suffixed form."""
        suffix = request.path_params.get("suffix")
        document = service.resource_metadata(request.headers.get("host", "").lower(),
                                             f"/{suffix}" if suffix else "")
        if document is None:
            return JSONResponse({"error": "not_found"}, status_code=404)
        return JSONResponse(document, headers={"Cache-Control": "max-age=300"})

    return Starlette(routes=[Route(CALLBACK_PATH, callback), Route(LOGOUT_PATH, logout_form, methods=["GET"]),
                             Route(LOGOUT_PATH, logout, methods=["POST"]),
                             Route(METADATA_PATH, resource_metadata, methods=["GET"]),
                             Route(METADATA_PATH + "/{suffix:path}", resource_metadata, methods=["GET"])])


LOGOUT_FORM = ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Sign out</title></head>"
               f"<body><main><h1>Sign out?</h1><form method=\"post\" action=\"{LOGOUT_PATH}\">"
               "<button type=\"submit\" id=\"sign-out\">Sign out</button></form></main></body></html>")


def _response(page: GatewayResponse) -> Response:
    response = Response(page.body, status_code=page.status_code)
    for name, value in page.headers:
        response.headers.append(name, value)
    return response
