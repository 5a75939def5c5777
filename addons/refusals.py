"""A refusal an addon makes is a decision: the core logs and counts it with its reason and
renders the gateway's own page; the addon only decides status and reason, and applies the answer."""

from __future__ import annotations

from mitmproxy import http

from addons.flow_state import state
from addons.flows import access_request
from addons.safety import answer
from gateway.decision.service import AccessService, Outcome, new_correlation_id


def refuse(service: AccessService, flow: http.HTTPFlow, status: int, reason: str, *, host: str = "",
           close: bool = True, error: str | None = None) -> None:
    """Answer ``status`` for ``reason``, logged like every decision. A malformed request (400) also
    closes the connection by default: what follows it on the connection is no more trustworthy."""
    outcome = logged_refusal(service, flow, status, reason, host=host, error=error)
    assert outcome.response is not None  # a refusal always answers
    answer(flow, outcome.response, close=close)


def logged_refusal(service: AccessService, flow: http.HTTPFlow, status: int, reason: str, *, host: str = "",
                   error: str | None = None) -> Outcome:
    """The refusal decided, counted and written to the decision log; its page is not applied."""
    correlation_id = state(flow).correlation_id or new_correlation_id()  # none yet: refused before Routing
    request = access_request(flow, correlation_id, host,
                             trusted_proxies=service.config.gateway_file.gateway.trusted_proxies)
    return service.refuse(request, status, reason, error=error)
