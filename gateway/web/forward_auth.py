"""The forward-auth listener: an edge proxy that already runs (nginx ``auth_request``, Caddy
``forward_auth``, Traefik ``ForwardAuth``) asks, for each request, whether it may go upstream; the
answer is decided by the one pipeline through ``AccessService.authorize``, with the same policies,
signals, decision log and metrics as the reverse proxy.

The edge names the original request in headers, by its convention:

    nginx            X-Original-URI, X-Original-Method, Host (the snippet sets them)
    Caddy, Traefik   X-Forwarded-Uri, X-Forwarded-Method, X-Forwarded-Host

and the client's address in X-Forwarded-For (read as the reverse proxy reads it, from the right).
These headers are believed only from ``forwardAuth.trustedProxies``: a request from any other
address is refused (403) before any of them is read (with ``forwardAuth.tls.proxyCaFiles`` the
handshake also requires a proxy certificate from those CAs, and with ``proxyNames`` a request whose
certificate names none of them is refused 403 too), and one that names no original request, or
names it twice or in both conventions, is refused (400). Every refusal is a logged decision.

Answers: 200 (empty) with the headers the edge adds upstream, exactly those the reverse proxy sets
(``X-Portcullis-*``, ``X-Forwarded-*``, the signed assertion); otherwise the gateway's own answer
(401 with its challenge, 403 with the block page or JSON, 503, a 302 to sign in). nginx turns
anything but 2xx, 401 and 403 into 500: its snippet (deploy/nginx/) maps the 302.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Scope

from gateway.app.workers import ONLY_WORKER, Worker
from gateway.config.models import HOST_NAME, ForwardAuthSettings
from gateway.decision.service import AccessService, Outcome, new_correlation_id
from gateway.http.headers import client_address, trusted_peer
from gateway.policy.model import AccessRequest
from gateway.routing import METHOD, NEVER_FORWARDED
from gateway.web.embedded import server_tls, serving

logger = logging.getLogger(__name__)

ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
NOT_A_PROXY = "forward-auth request from an address that is not one of forwardAuth.trustedProxies"
NOT_A_NAMED_PROXY = "forward-auth request with a proxy certificate that names none of forwardAuth.tls.proxyNames"
NO_ORIGINAL = "forward-auth request without the original method, URI and host"
TWO_CONVENTIONS = "forward-auth request naming the original request in both nginx and Caddy/Traefik headers"
REPEATED = "forward-auth request repeating a header that names the original request"
NO_CLIENT = "forward-auth request without X-Forwarded-For naming the client"
BAD_METHOD = "the original method is not an upper-case method token"
NOT_FORWARDED = "TRACE and TRACK are never forwarded"
NOT_SERVED = "the original host is not a protected host decided by this forward-auth listener"
# framing of the original request (the edge sends no body): its upload, for blockUploads
ORIGINAL_LENGTH = "x-original-content-length"
ORIGINAL_TRANSFER_ENCODING = "x-original-transfer-encoding"


@dataclass(frozen=True, slots=True)
class Convention:
    """Where an edge puts the original request's method, target and host."""

    name: str
    method: str
    uri: str
    host: str


NGINX = Convention("nginx", "x-original-method", "x-original-uri", "host")
FORWARDED = Convention("forwarded", "x-forwarded-method", "x-forwarded-uri", "x-forwarded-host")


@dataclass(frozen=True, slots=True)
class Original:
    method: str
    target: str
    host_header: str


class ForwardAuth:
    def __init__(self, service: AccessService) -> None:
        self.service = service

    @property
    def settings(self) -> ForwardAuthSettings | None:
        """The section of the config in force (a reload never changes it: it needs a restart)."""
        return self.service.config.gateway_file.forward_auth

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", self.decide, methods=ALL_METHODS)])

    async def decide(self, request: Request) -> Response:
        """One question from the edge: may the original request go upstream?"""
        correlation_id = new_correlation_id()
        peer = request.client.host if request.client else ""
        headers = request.headers
        nobody = AccessRequest(correlation_id=correlation_id, host="", path="", method="", client_ip=peer,
                               user_agent="", accepts_html=False)
        settings = self.settings
        if settings is None or not trusted_peer(peer, settings.trusted_proxies):
            return self._refused(nobody, 403, NOT_A_PROXY)
        if settings.tls is not None and settings.tls.proxy_names and \
                not _names_a_proxy(request.scope, settings.tls.proxy_names):
            return self._refused(nobody, 403, NOT_A_NAMED_PROXY)
        original = _original(headers)
        if isinstance(original, str):
            return self._refused(nobody, 400, original)
        client_ip, problem = client_address(peer, headers.getlist("x-forwarded-for"), settings.trusted_proxies)
        access = AccessRequest(
            correlation_id=correlation_id, host=_host(original.host_header) or "", path=original.target,
            target=original.target, method=original.method, client_ip=client_ip,
            user_agent=headers.get("user-agent", ""), accepts_html="text/html" in headers.get("accept", "").lower(),
            content_type=headers.get("content-type", ""), content_length=headers.get(ORIGINAL_LENGTH, ""),
            chunked="chunked" in headers.get(ORIGINAL_TRANSFER_ENCODING, "").lower(),
            authority=original.host_header.lower())
        refusal = self._request_refusal(settings, access, original, headers.getlist("x-forwarded-for"), problem)
        if refusal is not None:
            return self._refused(access, *refusal)
        outcome = await self.service.authorize(access, headers.getlist("authorization"), headers.getlist("cookie"))
        return self._answer(outcome)

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
        served = access.host in self.service.config.gateway_file.protected_hosts and \
            (not settings.hosts or access.host in settings.hosts)
        return None if served and _host(original.host_header) else (403, NOT_SERVED)

    def _refused(self, access: AccessRequest, status: int, reason: str) -> Response:
        logger.warning("[%s] forward-auth refused (%d): %s", access.correlation_id, status, reason)
        return self._answer(self.service.refuse(access, status, reason))

    def _answer(self, outcome: Outcome) -> Response:
        if outcome.response is None:  # allowed: the edge adds these headers to the upstream request
            self.service.record_answer(outcome.record, 200, None)
            return Response(b"", 200, headers=dict(outcome.upstream_headers))
        page = outcome.response
        response = Response(page.body, page.status_code)
        for name, value in page.headers:
            response.headers.append(name, value)
        return response


def _original(headers: Headers) -> Original | str:
    """The original request's method, target and Host in one convention, or why there is none."""
    nginx = headers.getlist(NGINX.uri)
    forwarded = headers.getlist(FORWARDED.uri)
    if nginx and forwarded:
        return TWO_CONVENTIONS
    convention = NGINX if nginx else FORWARDED
    values = [headers.getlist(name) for name in (convention.method, convention.uri, convention.host)]
    if any(len(value) > 1 for value in values):
        return REPEATED
    if not all(value and value[0] for value in values):
        return NO_ORIGINAL
    method, target, host = (value[0] for value in values)
    return Original(method=method, target=target, host_header=host)


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
