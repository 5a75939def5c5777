"""AccessGate: asks the core for a decision in ``requestheaders`` (before any body streams
upstream) and applies it: forward with the gateway's own identity headers, or answer."""

from __future__ import annotations

from mitmproxy import http

from addons.routing import HOST_KEY
from addons.safety import ALLOWED_KEY, CORRELATION_KEY, fail_closed, respond
from gateway.access import AccessService, Outcome, new_correlation_id
from gateway.headers import CORRELATION_ID, is_client_identity_header
from gateway.policy.model import AccessRequest


class AccessGate:
    def __init__(self, service: AccessService) -> None:
        self.service = service

    @fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        flow.metadata[CORRELATION_KEY] = correlation_id = new_correlation_id()
        request = _access_request(flow, correlation_id)
        outcome = await self.service.authorize(request, flow.request.headers.get_all("authorization"))
        _apply(flow, outcome)

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        """Second line: a flow that reaches here undecided never goes upstream."""
        if flow.response or flow.error or not flow.live:
            return
        if flow.metadata.get(ALLOWED_KEY) is not True:
            respond(flow, 403, b'{"error": "access_denied"}', (("Content-Type", "application/json"),))

    @fail_closed
    async def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None and CORRELATION_KEY in flow.metadata:
            flow.response.headers[CORRELATION_ID] = flow.metadata[CORRELATION_KEY]


def _access_request(flow: http.HTTPFlow, correlation_id: str) -> AccessRequest:
    headers = flow.request.headers
    return AccessRequest(
        correlation_id=correlation_id,
        host=flow.metadata[HOST_KEY],
        path=flow.request.path,
        method=flow.request.method,
        client_ip=flow.client_conn.peername[0],
        user_agent=headers.get("user-agent", ""),
        accepts_html="text/html" in headers.get("accept", "").lower(),
    )


def _apply(flow: http.HTTPFlow, outcome: Outcome) -> None:
    if outcome.response is not None:
        response = outcome.response
        respond(flow, response.status_code, response.body, response.headers)
        return
    headers = flow.request.headers
    for name in {n for n in headers if is_client_identity_header(n)}:
        del headers[name]
    for name, value in outcome.upstream_headers:
        headers[name] = value
    flow.metadata[ALLOWED_KEY] = True
