"""A refusal an addon makes is a decision: the core logs and counts it with its reason and
renders the gateway's own page; the addon only decides status and reason, and applies the answer."""

from __future__ import annotations

from mitmproxy import http

from addons.flow_state import state
from addons.flows import access_request
from addons.safety import respond
from gateway.decision.service import AccessService, new_correlation_id


def refuse(service: AccessService, flow: http.HTTPFlow, status: int, reason: str, *, host: str = "",
           close: bool = True, error: str | None = None) -> None:
    """Answer ``status`` for ``reason``, logged like every decision. A malformed request (400) also
    closes the connection by default: what follows it on the connection is no more trustworthy."""
    correlation_id = state(flow).correlation_id or new_correlation_id()  # none yet: refused before Routing
    request = access_request(flow, correlation_id, host,
                             trusted_proxies=service.config.gateway_file.gateway.trusted_proxies)
    outcome = service.refuse(request, status, reason, error=error)
    assert outcome.response is not None  # a refusal always answers
    headers = outcome.response.headers
    respond(flow, outcome.response.status_code, outcome.response.body,
            (*headers, ("Connection", "close")) if close else headers)
