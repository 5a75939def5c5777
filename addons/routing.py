"""Routing: which protected host a flow is for, and the upstream it goes to.

Runs first in ``requestheaders`` and gives every flow its correlation id. Refuses plaintext on the
TLS listener (400), a Host the gateway does not serve (421), and a TLS SNI that is missing or names
another host than the Host header (421).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from mitmproxy import http

from addons.flows import access_request
from addons.safety import CORRELATION_KEY, fail_closed, respond
from gateway.access import AccessService, new_correlation_id

HOST_KEY = "portcullis.host"
PLAINTEXT_ANSWER = (("Content-Type", "application/json"), ("Connection", "close"))


class Routing:
    def __init__(self, service: AccessService) -> None:
        self.service = service

    @fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        flow.metadata[CORRELATION_KEY] = correlation_id = new_correlation_id()
        if not flow.client_conn.tls_established:
            respond(flow, 400, b'{"error": "tls_required"}', PLAINTEXT_ANSWER)
            return
        host = _host_without_port(flow.request.host_header or "")
        upstream = self.service.upstream_for(host)
        sni = (flow.client_conn.sni or "").lower().rstrip(".")
        if upstream is None or sni != host:
            reason = "this gateway does not serve that host" if upstream is None else "TLS SNI and Host differ"
            outcome = self.service.refuse(access_request(flow, correlation_id, host), 421, reason)
            assert outcome.response is not None  # noqa: S101  (a refusal always answers)
            respond(flow, outcome.response.status_code, outcome.response.body, outcome.response.headers)
            return
        target = urlsplit(upstream)
        flow.request.scheme = target.scheme
        flow.request.host = target.hostname or ""
        flow.request.port = target.port or (443 if target.scheme == "https" else 80)
        flow.request.host_header = host
        flow.metadata[HOST_KEY] = host


def _host_without_port(host_header: str) -> str:
    host = host_header.strip().lower()
    if host.startswith("["):
        return host
    return host.rsplit(":", 1)[0].rstrip(".") if ":" in host else host.rstrip(".")
