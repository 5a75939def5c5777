"""Headers the gateway owns or distrusts.

Before forwarding, the gateway removes every header a client could use to claim an identity, to
make the upstream route or authorise differently, or to smuggle hop-by-hop semantics; then it sets
its own. An upstream can trust ``X-Portcullis-*`` and ``X-Forwarded-*`` because only Portcullis
sets them. Names are compared folded (case, ``_`` and ``.``): WSGI, PHP and others turn
``X_Forwarded_User`` into ``X-Forwarded-User`` (oauth2-proxy GHSA-vjrc-mh2v-45x6).

The lists follow what identity-aware proxies put on requests to their upstreams (oauth2-proxy,
Pomerium, Authelia, authentik, Oathkeeper, Traefik ForwardAuth, Envoy, Vouch, mod_auth_openidc,
Shibboleth, Azure App Service, AWS ALB, Google IAP, Cloudflare Access), client certificate headers
that TLS terminators pass on (RFC 9440, Envoy's XFCC, ``X-SSL-Client-*``, ``X-ARR-ClientCert``),
and Exchange's own front-end to back-end trust header and routing cookies. It also bounds what a
request's header fields may be (count, size, cookies, control characters) before anything reads them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from urllib.parse import unquote

PREFIX = "x-portcullis-"
CORRELATION_ID = "X-Portcullis-Correlation-Id"
USER = "X-Portcullis-User"
CLIENT_APP = "X-Portcullis-Client-App"
DEVICE_ID = "X-Portcullis-Device-Id"

IDENTITY_HEADERS = frozenset({
    "x-forwarded-user", "x-forwarded-email", "x-forwarded-preferred-username", "x-forwarded-groups",
    "x-forwarded-access-token", "remote-user", "x-user", "x-email", "x-userinfo", "x-id-token",
    "x-access-token", "x-auth-user", "x-auth-token", "auth-user", "x-user-id", "x-userid", "x-username",
    "x-user-name", "x-user-email", "x-user-groups", "x-user-roles", "x-groups", "x-roles", "x-principal",
    "x-identity", "x-jwt-assertion", "x-jwt", "gap-auth", "client-cert", "client-cert-chain", "x-client-cert",
    "x-client-dn", "x-client-verify", "x-ssl-cert", "x-commonaccesstoken",
})
IDENTITY_PREFIXES = (
    PREFIX, "x-auth-", "x-ms-client-principal", "x-ms-token-", "x-webauth-", "x-authenticated-",
    "x-amzn-oidc-", "x-goog-authenticated-", "x-goog-iap-", "cf-access-", "x-remote-", "remote-", "x-pomerium-",
    "x-authentik-", "x-vouch-", "oidc-", "shib-", "x-ssl-client-", "ssl-client-", "x-forwarded-tls-client-",
)
# Exchange's front end reads these (as cookies) to pick the back end a request goes to.
EXCHANGE_ROUTING = frozenset({"x-beresource", "x-anonresource", "x-anonresource-backend"})
REWRITE_HEADERS = frozenset({
    "x-original-url", "x-rewrite-url", "x-override-url", "x-original-uri", "x-http-method-override",
    "x-http-method", "x-method-override", "x-original-method", "x-original-path", "x-original-host", "x-host",
    "x-http-host-override", "x-forwarded-uri", "x-forwarded-path", "x-forwarded-method", *EXCHANGE_ROUTING,
})
FORWARDING_HEADERS = frozenset({
    "forwarded", "x-forwarded", "forwarded-for", "x-real-ip", "x-client-ip", "true-client-ip", "client-ip",
    "x-cluster-client-ip", "cf-connecting-ip", "cf-connecting-ipv6", "fastly-client-ip", "x-original-forwarded-for",
    "x-originating-ip", "x-azure-clientip", "x-azure-socketip", "x-azure-fdid", "x-proxyuser-ip",
    "x-appengine-user-ip", "front-end-https", "x-url-scheme",
})
FORWARDING_PREFIXES = ("x-forwarded-", "x-envoy-", "x-arr-")
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "upgrade", "http2-settings"})
# Never removed by a ``Connection:`` nomination: framing (mitmproxy owns it), and the credential the
# decision was made on, so the upstream sees the request the gateway authorised.
NOT_NOMINATED = frozenset({"host", "content-length", "transfer-encoding", "authorization"})
# The request's framing, which mitmproxy reads from these exact names. Another spelling that folds
# to one (``Transfer_Encoding``) frames nothing here, but WSGI/CGI servers read it as
# ``HTTP_TRANSFER_ENCODING`` (gunicorn 22 refuses such names, CVE-2024-1135): never forwarded.
FRAMING = frozenset({"content-length", "transfer-encoding"})


MAX_HEADER_FIELDS = 100  # request header fields (a browser sends about 20; Exchange clients fewer)
MAX_HEADER_BYTES = 64 * 1024  # names and values together (a large token and many cookies fit)
# One field line: 16 KiB of value, as IIS (http.sys MaxFieldLength) and AWS ALB accept by default,
# and room for the name, so a bearer token at the token check's own bound (16 KiB) still fits.
MAX_FIELD_BYTES = 16 * 1024 + 64
# Cookie pairs, over every Cookie field: browsers keep at most 180 cookies per site (Chrome and
# Firefox), so no browser sends more; thousands of tiny pairs only cost every parser on the way
# (ASP.NET builds a collection of them).
MAX_COOKIE_PAIRS = 200
TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"  # RFC 9110 §5.6.2: what a field name is made of
_NAME = re.compile(TOKEN)
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # every control character but tab (RFC 9110 §5.5)


def header_fields_refusal(fields: Iterable[tuple[bytes, bytes]]) -> tuple[int, str] | None:
    """Why a request's header fields are refused before anything reads them, as (status, reason),
    or None. 431: too many or too large (every header the gateway handles has a bound). 400: a name
    that is not a token, or a value with control characters (upstreams strip, keep or split on
    them differently: the upstream would read a header the gateway never saw as it does).

    The Cookie fields are measured as the one field and line the upstream receives
    (``upstream_cookies``: every pair, joined with ``; ``), however the client sent them: in several
    HTTP/1 lines, or each cookie in an HTTP/2 field of its own."""
    count = size = cookie_size = cookie_line = cookie_pairs = 0
    for name, value in fields:
        size += len(name) + len(value) + 4  # as received, with ": " and CRLF
        line = len(name) + 2 + len(value)
        if name.lower() == b"cookie":
            count += cookie_line == 0
            pairs = [pair.strip() for pair in value.split(b";") if pair.strip()]
            cookie_line = (cookie_line or len(name)) + sum(len(pair) + 2 for pair in pairs)  # "; " (first: ": ")
            cookie_size += len(name) + len(value) + 4
            cookie_pairs += len(pairs)
            line = cookie_line
        else:
            count += 1
        forwarded = size - cookie_size + (cookie_line + 2 if cookie_size else 0)
        if count > MAX_HEADER_FIELDS:
            return 431, f"more than {MAX_HEADER_FIELDS} header fields"
        if max(size, forwarded) > MAX_HEADER_BYTES:
            return 431, f"header fields larger than {MAX_HEADER_BYTES // 1024} KiB together"
        if line > MAX_FIELD_BYTES:
            return 431, f"a header field longer than {MAX_FIELD_BYTES // 1024} KiB"
        if cookie_pairs > MAX_COOKIE_PAIRS:
            return 431, f"more than {MAX_COOKIE_PAIRS} cookies"
        if not _NAME.fullmatch(name) or _CONTROL.search(value):
            return 400, "a header name that is not a token, or control characters in a header value"
    return None


def folded_lines(fields: Iterable[tuple[bytes, bytes]]) -> bool:
    """A value spread over several lines (obs-fold): mitmproxy keeps the line break, and an upstream
    that reads the continuation as a header of its own would get one the gateway never saw. RFC 9112
    lets a server refuse it (400), which the gateway does."""
    return any(b"\r" in value or b"\n" in value for _, value in fields)


def fold(name: str) -> str:
    """Case, ``_`` and ``.`` variants are one name: some upstream stacks fold them into ``-``."""
    return name.strip().lower().replace("_", "-").replace(".", "-")


def is_client_identity_header(name: str) -> bool:
    folded = fold(name)
    return folded in IDENTITY_HEADERS or folded.startswith(IDENTITY_PREFIXES)


def is_forwarding_header(name: str) -> bool:
    folded = fold(name)
    return folded in FORWARDING_HEADERS or folded.startswith(FORWARDING_PREFIXES)


def headers_to_strip(names: Iterable[str], connection_values: Iterable[str]) -> set[str]:
    """The request header names (as sent) that must not reach the upstream."""
    nominated = {fold(token) for value in connection_values for token in value.split(",") if token.strip()}
    nominated -= NOT_NOMINATED
    strip = set()
    for name in names:
        folded = fold(name)
        if (is_client_identity_header(name) or folded in REWRITE_HEADERS or is_forwarding_header(name)
                or folded in HOP_BY_HOP or folded.startswith("proxy-") or folded in nominated
                or (folded in FRAMING and name.strip().lower() != folded)):
            strip.add(name)
    return strip


def forwarding_headers(client_ip: str, host: str) -> tuple[tuple[str, str], ...]:
    """The gateway's own view of where the request came from; client-sent ones are never kept."""
    return (("X-Forwarded-For", client_ip), ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", host))


type Network = ipaddress.IPv4Network | ipaddress.IPv6Network
type Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(text: str) -> Address:
    """An address as written in X-Forwarded-For: bare, ``IPv4:port``, ``[IPv6]`` or ``[IPv6]:port``
    (Azure Application Gateway adds the port). IPv4-mapped IPv6 counts as the IPv4 address."""
    text = text.strip()
    if text.startswith("["):
        inside, bracket, port = text[1:].partition("]")
        if not bracket or (port and not (port.startswith(":") and port[1:].isdigit())):
            raise ValueError(f"not an address: {text!r}")
        address: Address = ipaddress.IPv6Address(inside)
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        if not port.isdigit():
            raise ValueError(f"not an address: {text!r}")
        address = ipaddress.IPv4Address(host)
    else:
        address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: Address, proxies: Sequence[Network]) -> bool:
    return any(address in network for network in proxies)


def trusted_peer(peer: str, proxies: Sequence[Network]) -> bool:
    """The connection's peer address is inside one of ``proxies``."""
    try:
        return _trusted(_address(peer), proxies)
    except ValueError:
        return False


def client_address(peer: str, forwarded_for: Sequence[str],
                   trusted_proxies: Sequence[Network]) -> tuple[str, str | None]:
    """The client address for policy, the decision log and the upstream's X-Forwarded-For, and why
    the client's X-Forwarded-For was not usable (None when it was, or was not looked at).

    Only a peer inside ``gateway.trustedProxies`` is believed: then X-Forwarded-For is read from the
    right, skipping addresses of trusted proxies, and the first other address is the client; what
    lies left of it was written by the client and is never even parsed (oauth2-proxy
    GHSA-7x63-xv5r-3p2x). A malformed entry among those the trusted proxies wrote is not guessed at:
    the problem is returned and the caller refuses the request, never deciding on the proxy's own
    address (which may sit in a trusted named location)."""
    try:
        address = _address(peer)
    except ValueError:
        return peer, None
    if not trusted_proxies or not _trusted(address, trusted_proxies) or not forwarded_for:
        return str(address), None
    hop = address
    for entry in reversed([entry for value in forwarded_for for entry in value.split(",")]):
        try:
            hop = _address(entry)
        except ValueError:
            return str(address), "X-Forwarded-For from a trusted proxy is not a list of addresses"
        if not _trusted(hop, trusted_proxies):
            return str(hop), None
    return str(hop), None  # every hop is a trusted proxy: the farthest one is the client


COOKIE_NAMESPACE = "portcullis-"  # the gateway's cookies: __Host-portcullis-session, __Host-portcullis-signin


def _cookie_name(name: str) -> str:
    """A cookie name as lenient upstreams read it: percent-decoded, case, spaces, ``_`` and ``.`` folded,
    without the ``__Host-``/``__Secure-`` prefix (which browsers match case-insensitively)."""
    folded = unquote(name).strip().lower()
    for character in " ._\t":
        folded = folded.replace(character, "-")
    folded = folded.lstrip("-")
    for prefix in ("host-", "secure-"):
        folded = folded.removeprefix(prefix)
    return folded.lstrip("-")


def is_gateway_cookie(pair: str) -> bool:
    """``pair`` (``name=value`` from a Cookie header) is, or hides behind a comma, a cookie in the
    gateway's namespace: some upstream stacks also split cookies on ``,``."""
    return any(_cookie_name(part.partition("=")[0]).startswith(COOKIE_NAMESPACE) for part in pair.split(","))


def is_exchange_routing_cookie(pair: str) -> bool:
    """``pair`` is, or hides behind a comma, one of the cookies Exchange's front end routes by
    (``X-BEResource``, ``X-AnonResource``, ``X-AnonResource-Backend``): ProxyLogon (CVE-2021-26855)
    sent them from outside to make the front end call a back end of the attacker's choosing."""
    return any(_cookie_name(part.partition("=")[0]) in EXCHANGE_ROUTING for part in pair.split(","))


def upstream_cookies(cookie_headers: Iterable[str]) -> list[str]:
    """The Cookie field an upstream may see (none, or one, for ``Headers.set_all``): the user's own
    cookies, never the gateway's (a session cookie in an upstream's hands, or its logs, would let it
    act as the user at the gateway) nor Exchange's routing cookies (no client has any business sending
    them, on any path). Every kept pair of every Cookie field, joined with ``; `` into one field (RFC
    6265 §5.4; RFC 9113 §8.2.3 allows it over HTTP/2): the one line ``header_fields_refusal`` bounds."""
    kept = [pair.strip() for header in cookie_headers for pair in header.split(";")
            if pair.strip() and not is_gateway_cookie(pair) and not is_exchange_routing_cookie(pair)]
    return ["; ".join(kept)] if kept else []
