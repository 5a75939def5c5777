"""Routing: which protected host a request is for, and where it goes, or why it goes nowhere.

Runs before any decision, on what the request names: its listener (the TLS reverse listener or
the kiosk forward proxy), Host or ``:authority``, TLS SNI, port, CONNECT target and request line.

The destination is named once: one Host header (HTTP/1) or ``:authority`` with at most an equal
Host (HTTP/2), a bare host name (no userinfo, no list), and a port that is the default or the
listener's own (421 otherwise). The request target is origin-form only: absolute-form (its
authority would reach the upstream, which prefers it to Host) and asterisk-form (``OPTIONS *``,
the HTTP/2 preface sent as HTTP/1) are refused with 400 and the connection closed. Methods are
upper-case tokens (a server that folds ``get`` to GET and one that does not disagree: 400); TRACE
and TRACK are never forwarded (501: cross-site tracing would echo the request, its cookies and
the gateway's identity headers). Plaintext on the TLS listener is refused (400), a Host the
gateway does not serve and an SNI that is missing or names another host get 421.

The kiosk proxy intercepts a protected host or an allowed one on 443, tunnels an exact
``passThrough`` host:port untouched, and refuses the rest (403 at CONNECT).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from gateway.config.models import HOST_NAME, PortcullisFile
from gateway.identity import discovery
from gateway.identity.browser import hostname_of, is_reserved
from gateway.signals.mtd import MAX_BODY_BYTES

METHOD = re.compile(r"[A-Z][A-Z0-9_-]*")  # standard and WebDAV methods (PROPFIND, VERSION-CONTROL)
NEVER_FORWARDED = frozenset({"TRACE", "TRACK"})
PORT = re.compile(r"[0-9]{1,5}")
HTTPS_PORT = 443

type Endpoints = Literal["mtd", "browser"]
MTD_ENDPOINTS: Endpoints = "mtd"  # on gateway.serviceHost: the MTD webhook, the assertion JWKS
BROWSER_ENDPOINTS: Endpoints = "browser"  # under /.portcullis/ on every protected host
type KioskDestination = Literal["intercept", "pass", "deny"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteQuery:
    """What routing reads from a request, before any of its headers but Host is believed."""

    kiosk: bool  # it came through the kiosk forward proxy
    tls: bool  # the client connection is TLS
    target_host: str  # the host and port the request line or CONNECT names (lower case)
    target_port: int
    http1: bool
    authority: str  # HTTP/2 ``:authority``, or an HTTP/1 absolute-form target's authority ("" if none)
    hosts: tuple[str, ...]  # every Host header value
    host_header: str  # the Host the request names, as sent
    path: str
    method: str  # as sent (a proxy may have upper-cased its own copy)
    listener_port: int
    sni: str  # TLS SNI, "" if none
    connect_target: tuple[str, int] | None = None  # the kiosk's CONNECT destination
    content_length: str | None = None
    transfer_encoding: bool = False


@dataclass(frozen=True, slots=True)
class Refused:
    status: int
    reason: str
    host: str = ""
    close: bool = True  # a malformed request closes its connection: what follows is no more trustworthy
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Unprotected:
    """A kiosk destination forwarded as it is, without a decision."""


@dataclass(frozen=True, slots=True)
class ServiceEndpoint:
    """The gateway's own endpoints answer it: no decision, nothing forwarded, a small buffered body."""

    endpoints: Endpoints
    host: str


@dataclass(frozen=True, slots=True)
class Upstream:
    """A protected host: decided, then forwarded to ``scheme://address:port`` with Host ``host``."""

    host: str
    scheme: str
    address: str
    port: int


type Route = Refused | Unprotected | ServiceEndpoint | Upstream


class Router:
    """Routing answers for one config (built with the rules, swapped with them on reload)."""

    def __init__(self, gateway_file: PortcullisFile) -> None:
        self.gateway_file = gateway_file

    @property
    def service_host(self) -> str | None:
        return self.gateway_file.gateway.service_host

    @property
    def kiosk_location(self) -> str | None:
        kiosk = self.gateway_file.kiosk
        return kiosk.location if kiosk is not None else None

    def kiosk_destination(self, host: str, port: int) -> KioskDestination:
        """What the kiosk proxy does with a connection to ``host:port``. Pass-through is decided by
        the CONNECT target alone (never by SNI or Host)."""
        kiosk = self.gateway_file.kiosk
        if kiosk is None:
            return "deny"
        if f"{host}:{port}" in kiosk.pass_through:
            return "pass"
        if port == HTTPS_PORT and (host in self.gateway_file.protected_hosts or host in kiosk.allow):
            return "intercept"
        return "deny"

    def upstream_for(self, host: str) -> str | None:
        """The upstream URL of a protected host, or None if the gateway does not serve it."""
        protected = self.gateway_file.protected_hosts.get(host)
        return protected.upstream if protected else None

    def resource_metadata(self, authority: str, path_suffix: str = "") -> dict[str, object] | None:
        """RFC 9728 metadata of ``https://<authority><path_suffix>``, or None if no protected host
        has that name. ``authority`` is the Host routing validated against SNI."""
        protected = self.gateway_file.protected_hosts.get(hostname_of(authority))
        if protected is None:
            return None
        audiences = set(protected.audiences)
        issuers = [entry.issuer for entry in self.gateway_file.identity.trusted
                   if not entry.audiences or audiences & set(entry.audiences)]  # those whose tokens it takes
        return discovery.resource_metadata(protected.challenge, authority, issuers, path_suffix)

    def route(self, query: RouteQuery) -> Route:
        if query.kiosk and not query.tls and self.kiosk_destination(query.target_host, query.target_port) == "pass":
            return Unprotected()  # plain HTTP to an exact pass-through host:port (a demo issuer)
        named = _destination(query)
        if isinstance(named, Refused):
            return named
        host, port = named
        if host == self.service_host and query.sni == host:
            return _service_endpoint(query, MTD_ENDPOINTS, host)
        upstream = self.upstream_for(host)
        if query.kiosk:
            target = query.connect_target
            if target is None or target[0] != host or query.sni != host or port not in (None, target[1]):
                return Refused(421, "Host, TLS SNI and the CONNECT target name different destinations", host=host)
            if upstream is None and self.kiosk_destination(host, target[1]) == "intercept":
                return Unprotected()  # an allowed destination: forwarded as it is
        if upstream is not None and query.sni == host and is_reserved(query.path):
            return _service_endpoint(query, BROWSER_ENDPOINTS, host)
        if upstream is None or query.sni != host:
            reason = "this gateway does not serve that host" if upstream is None else "TLS SNI and Host differ"
            return Refused(421, reason, host=host, close=False)
        url = urlsplit(upstream)
        return Upstream(host, url.scheme, url.hostname or "", url.port or (443 if url.scheme == "https" else 80))


def _destination(query: RouteQuery) -> tuple[str, int | None] | Refused:
    """The host and port a TLS request names, once, with a request line that can be forwarded."""
    if not query.tls:
        return Refused(400, "plaintext HTTP on the TLS listener: use https", error="tls_required")
    named = _target_refusal(query) or _named_destination(query)
    if isinstance(named, str):
        return Refused(400, named, host=query.host_header[:255])
    host, port = named
    if query.method in NEVER_FORWARDED:
        return Refused(501, f"{query.method} is never forwarded (cross-site tracing)", host=host, close=False)
    if not query.kiosk and port not in (None, HTTPS_PORT, query.listener_port):
        return Refused(421, "the Host header names another port than this listener's", host=host, close=False)
    return host, port


def _service_endpoint(query: RouteQuery, endpoints: Endpoints, host: str) -> Route:
    """The gateway's own endpoints take small bodies only, buffered, never streamed upstream. An
    HTTP/2 request needs no content-length; one that may carry a body must declare it (411)."""
    bodyless = query.http1 or query.method in ("GET", "HEAD")
    declared = query.content_length if query.content_length is not None else ("0" if bodyless else "")
    if query.transfer_encoding or not declared.isdigit():
        return Refused(411, "the gateway's endpoints take a body of a declared length only", host=host)
    if int(declared) > MAX_BODY_BYTES:
        return Refused(413, f"the gateway's endpoints take at most {MAX_BODY_BYTES} bytes", host=host)
    return ServiceEndpoint(endpoints, host)


def _named_destination(query: RouteQuery) -> tuple[str, int | None] | str:
    """The host name (lower case, without a trailing dot) and port the request names, or why it
    names none unambiguously. HTTP/2 carries ``:authority``; a Host header beside it must agree."""
    if not query.http1:
        if not query.authority or any(h.strip().lower() != query.authority.lower() for h in query.hosts):
            return "the :authority and Host headers differ"
        named = query.authority
    elif len(query.hosts) != 1:
        return "a request names its host in exactly one Host header"
    else:
        named = query.hosts[0]
    name, colon, port = named.strip().lower().partition(":")  # an IPv6 literal is no host the gateway serves
    name = name.removesuffix(".")  # the absolute DNS name is the same host
    if not HOST_NAME.fullmatch(name) or (colon and not PORT.fullmatch(port)):
        return "the Host header is not a host name with an optional port"
    return name, int(port) if colon else None


def _target_refusal(query: RouteQuery) -> str | None:
    """Why the request line cannot be forwarded as it is, or None."""
    if query.http1 and query.authority:
        return "absolute-form request targets are not accepted; send the path, and the host in Host"
    if not query.path.startswith("/"):
        return "the request target is not a path (asterisk-form or another form)"
    if not METHOD.fullmatch(query.method):
        return "ambiguous request method: methods are upper-case tokens"
    return None
