"""Headers the gateway owns or distrusts.

Before forwarding, the gateway removes every header a client could use to claim an identity, to
make the upstream route or authorise differently, or to smuggle hop-by-hop semantics; then it sets
its own. An upstream can trust ``X-Portcullis-*`` and ``X-Forwarded-*`` because only Portcullis
sets them.
"""

from __future__ import annotations

from collections.abc import Iterable

PREFIX = "x-portcullis-"
CORRELATION_ID = "X-Portcullis-Correlation-Id"
USER = "X-Portcullis-User"
CLIENT_APP = "X-Portcullis-Client-App"
DEVICE_ID = "X-Portcullis-Device-Id"

IDENTITY_HEADERS = frozenset({
    "x-forwarded-user", "x-forwarded-email", "x-forwarded-preferred-username", "x-forwarded-groups",
    "x-forwarded-access-token", "remote-user", "x-user", "x-email", "x-userinfo", "x-id-token",
    "x-access-token", "x-auth-user", "x-auth-token",
})
IDENTITY_PREFIXES = (
    PREFIX, "x-auth-request-", "x-ms-client-principal", "x-ms-token-", "x-webauth-", "x-authenticated-",
    "x-amzn-oidc-", "x-goog-authenticated-user-", "cf-access-", "x-remote-",
)
REWRITE_HEADERS = frozenset({
    "x-original-url", "x-rewrite-url", "x-override-url", "x-original-uri", "x-http-method-override",
    "x-http-method", "x-method-override",
})
FORWARDING_HEADERS = frozenset({
    "forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-forwarded-port",
    "x-forwarded-prefix", "x-forwarded-server", "x-real-ip", "x-client-ip", "true-client-ip",
    "x-cluster-client-ip",
})
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te"})
FRAMING = frozenset({"host", "content-length", "transfer-encoding"})  # never removed by a Connection: nomination


MAX_HEADER_FIELDS = 100  # request header fields (a browser sends about 20; Exchange clients fewer)
MAX_HEADER_BYTES = 64 * 1024  # names and values together (Kerberos-sized cookies and tokens fit)


def oversized_headers(fields: Iterable[tuple[bytes, bytes]]) -> str | None:
    """Why a request's headers are too many or too large to accept (431), or None: every cache,
    body and header the gateway handles has a bound."""
    size = 0
    for count, (name, value) in enumerate(fields, start=1):
        size += len(name) + len(value) + 4
        if count > MAX_HEADER_FIELDS:
            return f"more than {MAX_HEADER_FIELDS} header fields"
        if size > MAX_HEADER_BYTES:
            return f"header fields larger than {MAX_HEADER_BYTES // 1024} KiB together"
    return None


def fold(name: str) -> str:
    """Case, ``_`` and ``.`` variants are one name: some upstream stacks fold them into ``-``."""
    return name.strip().lower().replace("_", "-").replace(".", "-")


def is_client_identity_header(name: str) -> bool:
    folded = fold(name)
    return folded in IDENTITY_HEADERS or folded.startswith(IDENTITY_PREFIXES)


def headers_to_strip(names: Iterable[str], connection_values: Iterable[str]) -> set[str]:
    """The request header names (as sent) that must not reach the upstream."""
    nominated = {fold(token) for value in connection_values for token in value.split(",") if token.strip()} - FRAMING
    strip = set()
    for name in names:
        folded = fold(name)
        if (is_client_identity_header(name) or folded in REWRITE_HEADERS or folded in FORWARDING_HEADERS
                or folded in HOP_BY_HOP or folded.startswith("proxy-") or folded in nominated):
            strip.add(name)
    return strip


def forwarding_headers(client_ip: str, host: str) -> tuple[tuple[str, str], ...]:
    """The gateway's own view of where the request came from; client-sent ones are never kept."""
    return (("X-Forwarded-For", client_ip), ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", host))
