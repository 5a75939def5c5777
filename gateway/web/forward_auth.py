"""The forward-auth listener: an edge proxy that already runs (nginx ``auth_request``, Caddy
``forward_auth``, Traefik ``ForwardAuth``, Envoy ``ext_authz``) asks, for each request, whether it
may go upstream; the answer is decided by the one pipeline through ``AccessService.authorize``,
with the same policies, signals, decision log and metrics as the reverse proxy.

The edge names the original request by its convention:

    nginx            X-Original-URI, X-Original-Method, Host (the snippet sets them)
    Caddy, Traefik   X-Forwarded-Uri, X-Forwarded-Method, X-Forwarded-Host
    Envoy            the check request itself: its method, its path after ``/envoy`` (the
                     snippet's ``path_prefix``; Envoy appends the original path and query), Host

and the client's address in X-Forwarded-For (read as the reverse proxy reads it, from the right).
These are believed only from ``forwardAuth.trustedProxies``: a request from any other address is
refused (403) before any of them is read (with ``forwardAuth.tls.proxyCaFiles`` the handshake
also requires a proxy certificate from those CAs, and with ``proxyNames`` a request whose
certificate names none of them is refused 403 too), and one that names no original request, or names it
twice or in more than one convention, is refused (400). Every refusal is a logged decision. Any
method is accepted, since Envoy's check keeps the original one (WebDAV's included).

Answers: 200 (empty) with the headers the edge adds upstream, exactly those the reverse proxy sets
(``X-Portcullis-*``, ``X-Forwarded-*``, the signed assertion); otherwise the gateway's own answer
(401 with its challenge, 403 with the block page or JSON, 503, a 302 to sign in). Caddy, Traefik
and Envoy relay that answer to the client (Envoy allows only a 200 and answers a 5xx with its
``status_on_error``: deploy/envoy/). nginx relays only the status (and a 401's challenge)
and turns anything but 2xx, 401 and 403 into 500: its snippet (deploy/nginx/) maps the 302 to the
sign-in redirect, and fetches the refusal itself from ``/.portcullis-answer/<correlation id>``,
where each refusal to an nginx question waits, once, for a few seconds.

The browser's own pages (sign-in callback, logout, RFC 9728 metadata: ``/.portcullis/`` and
``/.well-known/oauth-protected-resource`` on a protected host) are served here too, for the edge
routes them to this listener; a question naming one of them is refused, so they never reach the
upstream.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from cachetools import TTLCache
from cryptography import x509
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route, request_response
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.app.workers import ONLY_WORKER, Worker
from gateway.config.models import HOST_NAME, ForwardAuthSettings
from gateway.decision.service import AccessService, Outcome, new_correlation_id
from gateway.http.headers import client_address, trusted_peer
from gateway.identity.browser import is_reserved
from gateway.policy.model import AccessRequest
from gateway.routing import METHOD, NEVER_FORWARDED
from gateway.web import pages
from gateway.web.browser_pages import browser_app
from gateway.web.embedded import server_tls, serving
from gateway.web.pages import GatewayResponse

logger = logging.getLogger(__name__)

NOT_A_PROXY = "forward-auth request from an address that is not one of forwardAuth.trustedProxies"
NOT_A_NAMED_PROXY = "forward-auth request with a proxy certificate that names none of forwardAuth.tls.proxyNames"
NO_ORIGINAL = "forward-auth request without the original method, URI and host"
TWO_CONVENTIONS = "forward-auth request naming the original request in two conventions (nginx, Caddy/Traefik, Envoy)"
REPEATED = "forward-auth request repeating a header that names the original request"
NO_CLIENT = "forward-auth request without X-Forwarded-For naming the client"
BAD_METHOD = "the original method is not an upper-case method token"
NOT_FORWARDED = "TRACE and TRACK are never forwarded"
NOT_SERVED = "the original host is not a protected host decided by this forward-auth listener"
RESERVED = "the gateway's own pages (/.portcullis/, RFC 9728 metadata) are never forwarded upstream: " \
    "the edge sends them to the forward-auth listener (see deploy/)"
ANSWER_GONE = "the refusal's answer is no longer held (fetched once, within ANSWER_SECONDS)"
ANSWER_PATH = "/.portcullis-answer/"
NGINX_RELAYS = frozenset({401, 403})  # the statuses auth_request passes on (it makes others 500)
ANSWER_SECONDS = 10  # an nginx refusal's answer waits this long for the snippet to fetch it
ANSWER_BYTES = 8 * 1024 * 1024  # and all answers held together at most this many bytes (oldest dropped)
# framing of the original request (the edge sends no body): its upload, for blockUploads
ORIGINAL_LENGTH = "x-original-content-length"
ORIGINAL_TRANSFER_ENCODING = "x-original-transfer-encoding"
# an edge that names neither (Traefik cannot): a request that may carry a body is taken to carry one
# of unknown length, so blockUploads refuses what it cannot rule out (a form or JSON post still passes)
UNKNOWN_LENGTH = "unknown"
WITHOUT_BODY = frozenset({"GET", "HEAD"})


@dataclass(frozen=True, slots=True)
class Convention:
    """Where an edge puts the original request's method, target and host."""

    name: str
    method: str
    uri: str
    host: str


NGINX = Convention("nginx", "x-original-method", "x-original-uri", "host")
FORWARDED = Convention("forwarded", "x-forwarded-method", "x-forwarded-uri", "x-forwarded-host")
# Envoy's HTTP ext_authz names the original in the check request's own method and path
ENVOY = Convention("envoy", ":method", ":path", "host")
ENVOY_PREFIX = "/envoy"  # http_service.path_prefix in deploy/envoy/envoy.yaml


@dataclass(frozen=True, slots=True)
class Original:
    method: str
    target: str
    host_header: str


class ForwardAuth:
    def __init__(self, service: AccessService) -> None:
        self.service = service
        self.answers: TTLCache[str, GatewayResponse] = TTLCache(maxsize=ANSWER_BYTES, ttl=ANSWER_SECONDS,
                                                                 getsizeof=_size)

    @property
    def settings(self) -> ForwardAuthSettings | None:
        """The section of the config in force (a reload never changes it: it needs a restart)."""
        return self.service.config.gateway_file.forward_auth

    def app(self) -> ASGIApp:
        # every path and every method: an Envoy check keeps the original method (PROPFIND too)
        questions = Starlette(routes=[Route(ANSWER_PATH + "{correlation_id}", self.answer, methods=["GET"]),
                                      Mount("/", app=request_response(self.decide))])
        browser_pages = browser_app(self.service)

        async def pages_or_question(scope: Scope, receive: Receive, send: Send) -> None:
            """The browser's pages on a protected host (from the edge, for a host decided here), or a question."""
            if scope["type"] != "http" or not is_reserved(scope["path"]):
                await questions(scope, receive, send)
                return
            refusal = self._page_refusal(Request(scope))
            await (refusal if refusal is not None else browser_pages)(scope, receive, send)
        return pages_or_question

    def _the_edge(self, request: Request) -> tuple[ForwardAuthSettings | None, str | None]:
        """The section in force, and why the caller is not the edge (None: it is). Checked before
        anything the caller sent is read, for questions, pages and held answers alike."""
        settings = self.settings
        peer = request.client.host if request.client else ""
        if settings is None or not trusted_peer(peer, settings.trusted_proxies):
            return settings, NOT_A_PROXY
        if settings.tls is not None and settings.tls.proxy_names and \
                not _names_a_proxy(request.scope, settings.tls.proxy_names):
            return settings, NOT_A_NAMED_PROXY
        return settings, None

    def _page_refusal(self, request: Request) -> Response | None:
        settings, not_the_edge = self._the_edge(request)
        if settings is None or not_the_edge is not None:
            return self._refused(_nobody(request, new_correlation_id()), 403, not_the_edge or NOT_A_PROXY)
        host = _host(request.headers.get("host", "")) or ""
        if self._serves(settings, host):
            return None
        return self._refused(replace(_nobody(request, new_correlation_id()), host=host, path=request.url.path,
                                     method=request.method), 403, NOT_SERVED)

    async def answer(self, request: Request) -> Response:
        """A refusal's answer, for the nginx snippet's error page; once, and to the edge only."""
        settings, not_the_edge = self._the_edge(request)
        correlation_id = request.path_params["correlation_id"]
        if settings is None or not_the_edge is not None:
            return self._refused(_nobody(request, new_correlation_id()), 403, not_the_edge or NOT_A_PROXY)
        held = self.answers.pop(correlation_id, None)
        if held is None:
            logger.warning("[%s] forward-auth: %s", correlation_id, ANSWER_GONE)
            return _response(pages.internal_error(correlation_id))
        return _response(held)

    async def decide(self, request: Request) -> Response:
        """One question from the edge: may the original request go upstream?"""
        correlation_id = new_correlation_id()
        peer = request.client.host if request.client else ""
        headers = request.headers
        nobody = _nobody(request, correlation_id)
        settings, not_the_edge = self._the_edge(request)
        if settings is None or not_the_edge is not None:
            return self._refused(nobody, 403, not_the_edge or NOT_A_PROXY)
        original = _original(request)
        if isinstance(original, str):
            return self._refused(nobody, 400, original)
        client_ip, problem = client_address(peer, headers.getlist("x-forwarded-for"), settings.trusted_proxies)
        access = AccessRequest(
            correlation_id=correlation_id, host=_host(original.host_header) or "", path=original.target,
            target=original.target, method=original.method, client_ip=client_ip,
            user_agent=headers.get("user-agent", ""), accepts_html="text/html" in headers.get("accept", "").lower(),
            content_type=headers.get("content-type", ""), content_length=_original_length(headers, original),
            chunked="chunked" in headers.get(ORIGINAL_TRANSFER_ENCODING, "").lower(),
            authority=original.host_header.lower(), forward_auth=True)
        hold = bool(headers.getlist(NGINX.uri))  # nginx fetches a refusal's answer from ANSWER_PATH
        refusal = self._request_refusal(settings, access, original, headers.getlist("x-forwarded-for"), problem)
        if refusal is not None:
            return self._refused(access, *refusal, hold=hold)
        outcome = await self.service.authorize(access, headers.getlist("authorization"), headers.getlist("cookie"))
        return self._answer(outcome, hold=hold)

    def _request_refusal(self, settings: ForwardAuthSettings, access: AccessRequest, original: Original,
                         forwarded_for: list[str], problem: str | None) -> tuple[int, str] | None:
        """Why the original request is refused before any decision (its status and reason), or None."""
        if problem is not None:
            return 400, problem
        if not forwarded_for:
            return 400, NO_CLIENT
        if not METHOD.fullmatch(original.method):
            return 400, BAD_METHOD
        if original.method in NEVER_FORWARDED:
            return 403, NOT_FORWARDED
        if not (self._serves(settings, access.host) and _host(original.host_header)):
            return 403, NOT_SERVED
        return (404, RESERVED) if is_reserved(original.target) else None

    def _serves(self, settings: ForwardAuthSettings, host: str) -> bool:
        protected = self.service.config.gateway_file.protected_hosts
        return host in protected and (not settings.hosts or host in settings.hosts)

    def _refused(self, access: AccessRequest, status: int, reason: str, *, hold: bool = False) -> Response:
        logger.warning("[%s] forward-auth refused (%d): %s", access.correlation_id, status, reason)
        return self._answer(self.service.refuse(access, status, reason), hold=hold)

    def _answer(self, outcome: Outcome, *, hold: bool = False) -> Response:
        if outcome.response is None:  # allowed: the edge adds these headers to the upstream request
            self.service.record_answer(outcome.record, 200, None)
            return Response(b"", 200, headers=dict(outcome.upstream_headers))
        if hold and outcome.response.status_code in NGINX_RELAYS:  # without the challenge nginx passes on itself
            held = [(name, value) for name, value in outcome.response.headers if name.lower() != "www-authenticate"]
            self.answers[outcome.record["correlationId"]] = replace(outcome.response, headers=tuple(held))
        return _response(outcome.response)


def _original_length(headers: Headers, original: Original) -> str:
    """The original body's declared length, "" for none, or UNKNOWN_LENGTH when the edge did not say."""
    if ORIGINAL_LENGTH in headers or ORIGINAL_TRANSFER_ENCODING in headers or original.method in WITHOUT_BODY:
        return headers.get(ORIGINAL_LENGTH, "")
    return UNKNOWN_LENGTH


def _nobody(request: Request, correlation_id: str) -> AccessRequest:
    """A request of the caller itself, naming nothing it sent: what a refusal before any header is logged as."""
    return AccessRequest(correlation_id=correlation_id, host="", path="", method="",
                         client_ip=request.client.host if request.client else "", user_agent="", accepts_html=False,
                         forward_auth=True)


def _response(page: GatewayResponse) -> Response:
    response = Response(page.body, page.status_code)
    for name, value in page.headers:
        response.headers.append(name, value)
    return response


def _size(page: GatewayResponse) -> int:
    return len(page.body) + sum(len(name) + len(value) for name, value in page.headers)


def _original(request: Request) -> Original | str:
    """The original request's method, target and Host in one convention, or why there is none."""
    headers = request.headers
    named = [convention for convention, present in ((NGINX, headers.getlist(NGINX.uri)),
                                                    (FORWARDED, headers.getlist(FORWARDED.uri)),
                                                    (ENVOY, _envoy_target(request) is not None)) if present]
    if len(named) > 1:
        return TWO_CONVENTIONS
    convention = named[0] if named else FORWARDED
    values = [_field(request, name) for name in (convention.method, convention.uri, convention.host)]
    if any(len(value) > 1 for value in values):
        return REPEATED
    if not all(value and value[0] for value in values):
        return NO_ORIGINAL
    method, target, host = (value[0] for value in values)
    return Original(method=method, target=target, host_header=host)


def _field(request: Request, name: str) -> list[str]:
    """The values of a header, or of the check request's own method or path (Envoy)."""
    if name == ENVOY.method:
        return [request.method]
    if name == ENVOY.uri:
        target = _envoy_target(request)
        return [target] if target else []
    return request.headers.getlist(name)


def _envoy_target(request: Request) -> str | None:
    """The original target Envoy appended to ``ENVOY_PREFIX`` (still encoded, with its query), or
    None when the path is not under the prefix."""
    path = request.scope["raw_path"].decode("latin-1")
    if not path.startswith(ENVOY_PREFIX + "/"):
        return None
    query = request.scope["query_string"].decode("latin-1")
    return path.removeprefix(ENVOY_PREFIX) + (f"?{query}" if query else "")


def _host(host_header: str) -> str | None:
    """The host name of a Host value (lower case, at most a numeric port), or None if it is not one."""
    name, colon, port = host_header.lower().partition(":")
    if colon and not (port.isdigit() and len(port) <= 5):
        return None
    return name if HOST_NAME.match(name) else None


def _names_a_proxy(scope: Scope, proxy_names: list[str]) -> bool:
    """The verified client certificate (ASGI's TLS extension, set by ``serving``) names one of
    ``proxy_names``: a SAN DNS name or the subject CN (either case, no wildcards), or a SAN URI
    (exactly). No certificate in the scope: False."""
    chain = scope.get("extensions", {}).get("tls", {}).get("client_cert_chain") or []
    if not chain:
        return False
    try:
        certificate = x509.load_pem_x509_certificate(chain[0].encode())
        common_names = [str(a.value) for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        alternative = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = alternative.get_values_for_type(x509.DNSName)
        uris = alternative.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        dns, uris = [], []
    except ValueError:  # OpenSSL verified it, but cryptography cannot read it: it names nobody
        return False
    names = {name.lower().rstrip(".") for name in [*dns, *common_names]}
    return any(wanted.lower().rstrip(".") in names or wanted in uris for wanted in proxy_names)


def _listener_tls(service: AccessService, settings: ForwardAuthSettings) -> ssl.SSLContext | None:
    tls = settings.tls
    if tls is None:
        return None
    path = service.config.path
    return server_tls(path(tls.certificate_file), path(tls.key_file) if tls.key_file is not None else None,
                      [path(file) for file in tls.proxy_ca_files])


@contextlib.asynccontextmanager
async def forward_auth_listener(service: AccessService, *,
                                worker: Worker = ONLY_WORKER) -> AsyncIterator[tuple[str, int] | None]:
    """The forward-auth listener on ``forwardAuth.listen`` while the context lasts; the bound
    address, or None when the config has no ``forwardAuth`` section. Worker i of ``--workers N``
    listens on the port + i, like the admin API."""
    settings = service.config.gateway_file.forward_auth
    if settings is None:
        yield None
        return
    app = ForwardAuth(service).app()
    async with serving(app, settings.listen.host, worker.own_port(settings.listen.port),
                       name="the forward-auth listener", tls=_listener_tls(service, settings)) as address:
        yield address
