"""AccessGate: asks the core for a decision in ``requestheaders`` (before any body streams
upstream) and applies it: forward with the gateway's own identity headers, or answer."""

from __future__ import annotations

from mitmproxy import http

from addons.flow_state import state
from addons.flows import access_request
from addons.mitm_internals import connection_close
from addons.refusals import refuse
from addons.safety import fail_closed, respond
from gateway.decision.service import AccessService, Outcome
from gateway.http.headers import CORRELATION_ID, folded_lines, headers_to_strip, upstream_cookies


class AccessGate:
    def __init__(self, service: AccessService) -> None:
        self.service = service

    @fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        flow_state = state(flow)
        if flow.response or flow.error or not flow.live or flow_state.service:
            return
        if flow_state.unprotected:
            if folded_lines(flow.request.headers.fields):
                refuse(self.service, flow, 400, "header values folded over several lines are not accepted",
                       host=flow.request.host.lower(), close=False)
                return
            _strip_client_headers(flow)
            flow_state.allowed = True
            return
        if flow_state.correlation_id is None or flow_state.host is None:
            raise LookupError("a request Routing did not route reached AccessGate")  # fail_closed: 500
        request = access_request(flow, flow_state.correlation_id, flow_state.host,
                                 self.service.rules.router.kiosk_location if flow_state.kiosk else None,
                                 self.service.config.gateway_file.gateway.trusted_proxies)
        flow_state.client_ip = request.client_ip  # recordings replay it, not the proxy's address
        authorization = flow.request.headers.get_all("authorization")
        cookies = flow.request.headers.get_all("cookie")
        refusal = _header_refusal(flow)
        if refusal is not None:
            outcome = self.service.refuse(request, 400, refusal)
        else:
            outcome = await self.service.authorize(request, authorization, cookies)
        _apply(flow, outcome)
        if outcome.forward and outcome.session_controls.names():
            flow_state.session_controls = outcome.session_controls
        if outcome.forward:  # its record waits for the answer; what ContinuousAccess needs to decide it again
            flow_state.record = outcome.record
            flow_state.access_request, flow_state.authorization, flow_state.cookies = request, authorization, cookies
            if outcome.device_id:
                flow_state.device_id = outcome.device_id
            flow_state.app_users = outcome.app_users

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        """Second line: a flow that reaches here undecided never goes upstream. Trailers (HTTP/2;
        declared ones are refused earlier) would carry headers past the stripping done above."""
        flow_state = state(flow)
        if flow.response or flow.error or not flow.live or flow_state.service:
            return
        if not flow_state.allowed:
            refuse(self.service, flow, 403, "the request reached its body undecided", host=flow_state.host or "",
                   close=False)
        elif flow.request.trailers:
            refuse(self.service, flow, 400, "request trailers are not accepted", host=flow_state.host or "",
                   close=False)

    def error(self, flow: http.HTTPFlow) -> None:
        """An allowed request whose upstream failed (refused, reset, timed out): counted per host.
        A client that hung up or reset its stream is no upstream failure."""
        flow_state = state(flow)
        if flow_state.upstream_failed and flow_state.allowed and flow_state.host is not None:
            self.service.metrics.upstream_errors.labels(flow_state.host).inc()

    @fail_closed
    async def responseheaders(self, flow: http.HTTPFlow) -> None:
        flow_state = state(flow)
        if flow.response is not None and flow_state.correlation_id is not None:
            flow.response.headers[CORRELATION_ID] = flow_state.correlation_id
        if flow.response is not None and flow_state.client_close:
            flow.response.headers["connection"] = "close"  # mitmproxy then closes after this answer


def _header_refusal(flow: http.HTTPFlow) -> str | None:
    """Why the request's headers are refused (400) before any decision is asked for, or None."""
    problem = state(flow).forwarded_for_problem
    if problem is not None:
        return problem
    if "trailer" in flow.request.headers:
        return "request trailers are not accepted"
    if folded_lines(flow.request.headers.fields):
        return "header values folded over several lines are not accepted"
    return None


def _strip_client_headers(flow: http.HTTPFlow) -> None:
    """Hop-by-hop and client identity headers, and the gateway's cookies, never go upstream. A
    client's ``Connection: close`` goes with them, and mitmproxy decides from the request headers
    whether to close the client connection: remember it, so the answer closes it as the client asked."""
    headers = flow.request.headers
    if flow.request.http_version.startswith("HTTP/1") and \
            connection_close(flow.request.http_version, headers):
        state(flow).client_close = True
    for name in headers_to_strip(list(headers), headers.get_all("connection")):
        headers.pop(name, None)
    headers.set_all("cookie", upstream_cookies(headers.get_all("cookie")))


def _apply(flow: http.HTTPFlow, outcome: Outcome) -> None:
    if outcome.response is not None:
        response = outcome.response
        respond(flow, response.status_code, response.body, response.headers)
        return
    _strip_client_headers(flow)
    headers = flow.request.headers
    for name, value in outcome.upstream_headers:
        headers[name] = value
    state(flow).allowed = True
