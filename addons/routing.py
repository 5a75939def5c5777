"""Routing: which protected host a flow is for, and the upstream it goes to.

Runs first in ``requestheaders`` and gives every flow its correlation id. Refuses plaintext on the
TLS listener (400), a Host the gateway does not serve (421), and a TLS SNI that is missing or names
another host than the Host header (421).
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

from mitmproxy import http

from addons.flows import AUTHORITY_KEY, access_request, authority
from addons.kiosk_proxy import KIOSK_KEY, connect_target, is_kiosk
from addons.safety import CORRELATION_KEY, fail_closed, respond
from addons.service_endpoints import BROWSER_ENDPOINTS, MTD_ENDPOINTS, SERVICE_KEY
from gateway.access import AccessService, new_correlation_id
from gateway.headers import oversized_headers
from gateway.identity.browser import is_reserved
from gateway.signals.mtd import MAX_BODY_BYTES

HOST_KEY = "portcullis.host"
UNPROTECTED_KEY = "portcullis.unprotected"
PLAINTEXT_ANSWER = (("Content-Type", "application/json"), ("Connection", "close"))


class Routing:
    def __init__(self, service: AccessService) -> None:
        self.service = service

    @fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        flow.metadata[CORRELATION_KEY] = correlation_id = new_correlation_id()
        too_large = oversized_headers(flow.request.headers.fields)
        if too_large is not None:
            body = json.dumps({"error": "request_header_fields_too_large", "error_description": too_large})
            respond(flow, 431, body.encode(), PLAINTEXT_ANSWER)  # and the connection is closed
            return
        if is_kiosk(flow) and not flow.client_conn.tls_established and \
                self.service.kiosk_destination(flow.request.host.lower(), flow.request.port) == "pass":
            flow.metadata[UNPROTECTED_KEY] = True  # plain HTTP to an exact pass-through host:port (a demo issuer)
            return
        if not flow.client_conn.tls_established:
            respond(flow, 400, b'{"error": "tls_required"}', PLAINTEXT_ANSWER)
            return
        flow.metadata[AUTHORITY_KEY] = flow.request.host_header or ""  # as sent, before it is rewritten
        host = _host_without_port(flow.request.host_header or "")
        sni = (flow.client_conn.sni or "").lower().rstrip(".")
        if host == self.service.service_host and sni == host:
            self._service_flow(flow, MTD_ENDPOINTS, host)
            return
        if is_kiosk(flow):
            flow.metadata[KIOSK_KEY] = True
            target = connect_target(flow)
            if target is None or target[0] != host or sni != host:
                respond(flow, 421, b'{"error": "misdirected_request"}', PLAINTEXT_ANSWER)
                return  # Host, SNI and the CONNECT target must be one destination
            allowed = self.service.kiosk_destination(host, target[1]) == "intercept"
            if allowed and self.service.upstream_for(host) is None:
                flow.metadata[UNPROTECTED_KEY] = True  # an allowed destination: forwarded as it is
                return
        upstream = self.service.upstream_for(host)
        if upstream is not None and sni == host and is_reserved(flow.request.path):
            self._service_flow(flow, BROWSER_ENDPOINTS, host)
            return
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


    def _service_flow(self, flow: http.HTTPFlow, endpoints: str, host: str) -> None:
        """The gateway's own endpoints: small bodies only, buffered, never streamed upstream."""
        declared = flow.request.headers.get("content-length", "0")
        if "transfer-encoding" in flow.request.headers or not declared.isdigit():
            respond(flow, 411, b'{"error": "length_required"}', PLAINTEXT_ANSWER)
        elif int(declared) > MAX_BODY_BYTES:
            respond(flow, 413, b'{"error": "payload_too_large"}', PLAINTEXT_ANSWER)
        else:
            flow.request.stream = False
            flow.metadata[SERVICE_KEY] = endpoints
            # HTTP/2 carries the host in :authority only; the endpoints read the validated one here
            flow.request.headers["Host"] = authority(flow.metadata[AUTHORITY_KEY], host)


def _host_without_port(host_header: str) -> str:
    host = host_header.strip().lower()
    if host.startswith("["):
        return host
    return host.rsplit(":", 1)[0].rstrip(".") if ":" in host else host.rstrip(".")
