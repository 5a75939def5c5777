"""Routing: runs first in ``requestheaders``, gives every flow its correlation id, and applies
``gateway.routing``'s answer: a refusal, the gateway's own endpoints, a kiosk destination forwarded
as it is, or a protected host's upstream. The rules (which host, SNI, port and request line are
accepted) live there; this adapter only reads the flow and applies the route. CONNECT never
reaches a hook here (mitmproxy refuses it in reverse mode).
"""

from __future__ import annotations

from mitmproxy import http

from addons.flow_state import state
from addons.flows import authority
from addons.kiosk_proxy import connect_target, is_kiosk
from addons.refusals import refuse
from addons.safety import fail_closed
from gateway.decision.service import AccessService, new_correlation_id
from gateway.http.headers import header_fields_refusal
from gateway.routing import Refused, RouteQuery, ServiceEndpoint, Unprotected, Upstream


class Routing:
    def __init__(self, service: AccessService) -> None:
        self.service = service

    @fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        flow_state = state(flow)
        flow_state.correlation_id = new_correlation_id()
        refused = header_fields_refusal(flow.request.headers.fields)
        if refused is not None:  # before anything else reads a header; logged like every refusal
            refuse(self.service, flow, *refused)
            return
        query = route_query(flow)
        flow_state.authority = query.host_header  # as sent, before it is rewritten
        flow_state.kiosk = query.kiosk and query.tls
        route = self.service.rules.router.route(query)
        match route:
            case Refused(status, reason, host, close, error):
                refuse(self.service, flow, status, reason, host=host, close=close, error=error)
            case Unprotected():
                flow_state.unprotected = True
            case ServiceEndpoint(endpoints, host):
                flow.request.stream = False  # small bodies only, buffered, never streamed upstream
                flow_state.service = endpoints
                # HTTP/2 carries the host in :authority only; the endpoints read the validated one here
                flow.request.headers["Host"] = authority(flow_state.authority, host)
            case Upstream(host, scheme, address, port):
                flow.request.scheme, flow.request.host, flow.request.port = scheme, address, port
                flow.request.host_header = host
                flow_state.host = host


def route_query(flow: http.HTTPFlow) -> RouteQuery:
    """What routing reads from the flow: the request line as sent (``.method`` is upper-cased by
    mitmproxy), the Host fields, the listener and the TLS SNI."""
    request, client = flow.request, flow.client_conn
    http1 = request.http_version.startswith("HTTP/1")
    return RouteQuery(
        kiosk=is_kiosk(flow), tls=client.tls_established,
        target_host=request.host.lower(), target_port=request.port,
        http1=http1, authority=request.authority, hosts=tuple(request.headers.get_all("host")),
        host_header=(request.host_header or "") if client.tls_established else "",
        path=request.path, method=request.data.method.decode("latin-1"), listener_port=client.sockname[1],
        sni=(client.sni or "").lower().rstrip("."), connect_target=connect_target(flow),
        content_length=request.headers.get("content-length"),
        transfer_encoding="transfer-encoding" in request.headers)
