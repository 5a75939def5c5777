"""Routing: which protected host a flow is for, and the upstream it goes to.

Runs first in ``requestheaders``. Refuses plaintext on the TLS listener, a Host the gateway does
not serve (421), and a TLS SNI that names another host than the Host header (421).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from mitmproxy import http

from addons.safety import fail_closed, respond
from gateway.access import AccessService

HOST_KEY = "portcullis.host"
JSON = (("Content-Type", "application/json"), ("Connection", "close"))


class Routing:
    def __init__(self, service: AccessService) -> None:
        self.service = service

    @fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        if not flow.client_conn.tls_established:
            respond(flow, 400, b'{"error": "tls_required"}', JSON)
            return
        host = _host_without_port(flow.request.host_header or "")
        upstream = self.service.upstream_for(host)
        sni = (flow.client_conn.sni or "").lower().rstrip(".")
        if upstream is None or (sni and sni != host):
            respond(flow, 421, b'{"error": "misdirected_request"}', JSON)
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
