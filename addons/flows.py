"""What the addons read from a flow: the access request handed to the core."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from mitmproxy import http

from addons.flow_state import state
from gateway.http.headers import Network, client_address
from gateway.policy.model import AccessRequest

logger = logging.getLogger(__name__)


def authority(host_header: str, host: str) -> str:
    """The Host header if it is the validated host with at most a port, else the host alone."""
    _, _, port = host_header.lower().rpartition(":")
    return f"{host}:{port}" if host_header.lower() == f"{host}:{port}" and port.isdigit() else host


def client_ip(flow: http.HTTPFlow, correlation_id: str, trusted_proxies: Sequence[Network] = ()) -> str:
    """The TCP peer, or, when the peer is one of ``gateway.trustedProxies``, the client its
    X-Forwarded-For names. A trusted proxy's malformed header is logged and noted on the flow
    (AccessGate refuses it with 400; the address returned is then the proxy's, for the log only)."""
    forwarded_for = flow.request.headers.get_all("x-forwarded-for")
    address, problem = client_address(flow.client_conn.peername[0], forwarded_for, trusted_proxies)
    if problem is not None:
        logger.warning("[%s] %s: %.200r from %s; refusing the request", correlation_id, problem,
                       ", ".join(forwarded_for), address)
        state(flow).forwarded_for_problem = problem
    return address


def access_request(flow: http.HTTPFlow, correlation_id: str, host: str,
                   kiosk_location: str | None = None, trusted_proxies: Sequence[Network] = ()) -> AccessRequest:
    """The request as the core decides it, with its connection's device certificate (reverse listener only)."""
    headers = flow.request.headers
    return AccessRequest(
        correlation_id=correlation_id,
        host=host,
        path=flow.request.path,
        method=flow.request.method,
        client_ip=client_ip(flow, correlation_id, trusted_proxies),
        user_agent=headers.get("user-agent", ""),
        accepts_html="text/html" in headers.get("accept", "").lower(),
        content_type=headers.get("content-type", ""),
        content_length=headers.get("content-length", ""),
        chunked="chunked" in headers.get("transfer-encoding", "").lower() or (
            flow.request.http_version.startswith("HTTP/2") and "content-length" not in headers
            and flow.request.method.upper() in ("POST", "PUT", "PATCH")),
        authority=authority(state(flow).authority, host),
        kiosk_location=kiosk_location,
        device_certificate=None if kiosk_location is not None else state(flow).device_certificate,
    )
