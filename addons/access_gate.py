"""AccessGate: asks the core for a decision in ``requestheaders`` (before any body streams
upstream) and applies it: forward with the gateway's own identity headers, or answer."""

from __future__ import annotations

from mitmproxy import http

from addons.decision_records import RECORD_KEY
from addons.flows import CLIENT_IP_KEY, FORWARDED_FOR_PROBLEM_KEY, access_request
from addons.kiosk_proxy import KIOSK_KEY
from addons.mitm_internals import connection_close
from addons.routing import HOST_KEY, UNPROTECTED_KEY
from addons.safety import (
    ALLOWED_KEY,
    AUTHORIZATION_KEY,
    COOKIES_KEY,
    CORRELATION_KEY,
    DEVICE_KEY,
    REQUEST_KEY,
    SESSION_KEY,
    fail_closed,
    respond,
)
from addons.service_endpoints import SERVICE_KEY
from addons.strict_http import UPSTREAM_FAILED_KEY
from gateway.access import AccessService, Outcome
from gateway.headers import CORRELATION_ID, folded_lines, headers_to_strip, upstream_cookies

JSON = (("Content-Type", "application/json"),)
FOLDED = b'{"error": "bad_request", "error_description": "header values folded over several lines are not accepted"}'
CLIENT_CLOSE_KEY = "portcullis.client_close"  # the client asked to close after this request


class AccessGate:
    def __init__(self, service: AccessService) -> None:
        self.service = service

    @fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or flow.metadata.get(SERVICE_KEY):
            return
        if flow.metadata.get(UNPROTECTED_KEY):
            if folded_lines(flow.request.headers.fields):
                respond(flow, 400, FOLDED, JSON)
                return
            _strip_client_headers(flow)
            flow.metadata[ALLOWED_KEY] = True
            return
        request = access_request(flow, flow.metadata[CORRELATION_KEY], flow.metadata[HOST_KEY],
                                 self.service.kiosk_location if flow.metadata.get(KIOSK_KEY) else None,
                                 self.service.config.gateway_file.gateway.trusted_proxies)
        flow.metadata[CLIENT_IP_KEY] = request.client_ip  # recordings replay it, not the proxy's address
        authorization = flow.request.headers.get_all("authorization")
        cookies = flow.request.headers.get_all("cookie")
        if FORWARDED_FOR_PROBLEM_KEY in flow.metadata:
            outcome = self.service.refuse(request, 400, flow.metadata[FORWARDED_FOR_PROBLEM_KEY])
        elif "trailer" in flow.request.headers:
            outcome = self.service.refuse(request, 400, "request trailers are not accepted")
        elif folded_lines(flow.request.headers.fields):
            outcome = self.service.refuse(request, 400, "header values folded over several lines are not accepted")
        else:
            outcome = await self.service.authorize(request, authorization, cookies)
        _apply(flow, outcome)
        if outcome.forward and outcome.session_controls.names():
            flow.metadata[SESSION_KEY] = outcome.session_controls
        if outcome.forward:  # its record waits for the answer; what ContinuousAccess needs to decide it again
            flow.metadata.update({RECORD_KEY: outcome.record, REQUEST_KEY: request, AUTHORIZATION_KEY: authorization,
                                  COOKIES_KEY: cookies})
            if outcome.device_id:
                flow.metadata[DEVICE_KEY] = outcome.device_id

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        """Second line: a flow that reaches here undecided never goes upstream. Trailers (HTTP/2;
        declared ones are refused earlier) would carry headers past the stripping done above."""
        if flow.response or flow.error or not flow.live or flow.metadata.get(SERVICE_KEY):
            return
        if flow.metadata.get(ALLOWED_KEY) is not True:
            respond(flow, 403, b'{"error": "access_denied"}', JSON)
        elif flow.request.trailers:
            respond(flow, 400, b'{"error": "bad_request", "error_description": "request trailers"}', JSON)

    def error(self, flow: http.HTTPFlow) -> None:
        """An allowed request whose upstream failed (refused, reset, timed out): counted per host.
        A client that hung up or reset its stream is no upstream failure."""
        if flow.metadata.get(UPSTREAM_FAILED_KEY) and flow.metadata.get(ALLOWED_KEY) is True \
                and HOST_KEY in flow.metadata:
            self.service.metrics.upstream_errors.labels(flow.metadata[HOST_KEY]).inc()

    @fail_closed
    async def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None and CORRELATION_KEY in flow.metadata:
            flow.response.headers[CORRELATION_ID] = flow.metadata[CORRELATION_KEY]
        if flow.response is not None and flow.metadata.get(CLIENT_CLOSE_KEY):
            flow.response.headers["connection"] = "close"  # mitmproxy then closes after this answer


def _strip_client_headers(flow: http.HTTPFlow) -> None:
    """Hop-by-hop and client identity headers, and the gateway's cookies, never go upstream. A
    client's ``Connection: close`` goes with them, and mitmproxy decides from the request headers
    whether to close the client connection: remember it, so the answer closes it as the client asked."""
    headers = flow.request.headers
    if flow.request.http_version.startswith("HTTP/1") and \
            connection_close(flow.request.http_version, headers):
        flow.metadata[CLIENT_CLOSE_KEY] = True
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
    flow.metadata[ALLOWED_KEY] = True
