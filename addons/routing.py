"""Routing: which protected host a flow is for, and the upstream it goes to.

Runs first in ``requestheaders`` and gives every flow its correlation id. Refuses plaintext on the
TLS listener (400), a Host the gateway does not serve (421), and a TLS SNI that is missing or names
another host than the Host header (421).

The destination is named once: one Host header (HTTP/1) or ``:authority`` with at most an equal
Host (HTTP/2), a bare host name (no userinfo, no list), and a port that is the default or the
listener's own (421 otherwise). The request target is origin-form only: absolute-form (its
authority would reach the upstream, which prefers it to Host) and asterisk-form (``OPTIONS *``,
the HTTP/2 preface sent as HTTP/1) are refused with 400 and the connection closed; CONNECT never
reaches a hook here (mitmproxy refuses it in reverse mode). Methods are upper-case tokens (a
server that folds ``get`` to GET and one that does not disagree: 400); TRACE and TRACK are never
forwarded (501: cross-site tracing would echo the request, its cookies and the gateway's
identity headers). Every other method gets the decision a GET to that path gets.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from mitmproxy import http

from addons.flow_state import state
from addons.flows import authority
from addons.kiosk_proxy import connect_target, is_kiosk
from addons.refusals import refuse
from addons.safety import fail_closed
from addons.service_endpoints import BROWSER_ENDPOINTS, MTD_ENDPOINTS
from gateway.access import AccessService, new_correlation_id
from gateway.config.models import HOST_NAME
from gateway.headers import header_fields_refusal
from gateway.identity.browser import is_reserved
from gateway.signals.mtd import MAX_BODY_BYTES

METHOD = re.compile(r"[A-Z][A-Z0-9_-]*")  # standard and WebDAV methods (PROPFIND, VERSION-CONTROL)
NEVER_FORWARDED = frozenset({"TRACE", "TRACK"})
PORT = re.compile(r"[0-9]{1,5}")
HTTPS_PORT = 443


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
        if is_kiosk(flow) and not flow.client_conn.tls_established and \
                self.service.kiosk_destination(flow.request.host.lower(), flow.request.port) == "pass":
            flow_state.unprotected = True  # plain HTTP to an exact pass-through host:port (a demo issuer)
            return
        if not flow.client_conn.tls_established:
            refuse(self.service, flow, 400, "plaintext HTTP on the TLS listener: use https", error="tls_required")
            return
        flow_state.authority = flow.request.host_header or ""  # as sent, before it is rewritten
        named = _target_refusal(flow) or _named_destination(flow)
        if isinstance(named, str):
            refuse(self.service, flow, 400, named, host=flow_state.authority[:255])
            return
        host, port = named
        if flow.request.method in NEVER_FORWARDED:
            refuse(self.service, flow, 501, f"{flow.request.method} is never forwarded (cross-site tracing)",
                   host=host, close=False)
            return
        if not is_kiosk(flow) and port not in (None, HTTPS_PORT, flow.client_conn.sockname[1]):
            refuse(self.service, flow, 421, "the Host header names another port than this listener's",
                   host=host, close=False)
            return
        sni = (flow.client_conn.sni or "").lower().rstrip(".")
        if host == self.service.service_host and sni == host:
            self._service_flow(flow, MTD_ENDPOINTS, host)
            return
        if is_kiosk(flow):
            flow_state.kiosk = True
            target = connect_target(flow)
            if target is None or target[0] != host or sni != host or port not in (None, target[1]):
                refuse(self.service, flow, 421, "Host, TLS SNI and the CONNECT target name different destinations",
                       host=host)
                return  # Host, SNI and the CONNECT target must be one destination
            allowed = self.service.kiosk_destination(host, target[1]) == "intercept"
            if allowed and self.service.upstream_for(host) is None:
                flow_state.unprotected = True  # an allowed destination: forwarded as it is
                return
        upstream = self.service.upstream_for(host)
        if upstream is not None and sni == host and is_reserved(flow.request.path):
            self._service_flow(flow, BROWSER_ENDPOINTS, host)
            return
        if upstream is None or sni != host:
            reason = "this gateway does not serve that host" if upstream is None else "TLS SNI and Host differ"
            refuse(self.service, flow, 421, reason, host=host, close=False)
            return
        upstream_url = urlsplit(upstream)
        flow.request.scheme = upstream_url.scheme
        flow.request.host = upstream_url.hostname or ""
        flow.request.port = upstream_url.port or (443 if upstream_url.scheme == "https" else 80)
        flow.request.host_header = host
        flow_state.host = host

    def _service_flow(self, flow: http.HTTPFlow, endpoints: str, host: str) -> None:
        """The gateway's own endpoints: small bodies only, buffered, never streamed upstream. An HTTP/2
        request needs no content-length; one that may carry a body must declare it here (411)."""
        request = flow.request
        bodyless = request.http_version.startswith("HTTP/1") or request.method in ("GET", "HEAD")
        declared = request.headers.get("content-length", "0" if bodyless else "")
        if "transfer-encoding" in flow.request.headers or not declared.isdigit():
            refuse(self.service, flow, 411, "the gateway's endpoints take a body of a declared length only", host=host)
        elif int(declared) > MAX_BODY_BYTES:
            refuse(self.service, flow, 413, f"the gateway's endpoints take at most {MAX_BODY_BYTES} bytes", host=host)
        else:
            flow.request.stream = False
            flow_state = state(flow)
            flow_state.service = endpoints
            # HTTP/2 carries the host in :authority only; the endpoints read the validated one here
            flow.request.headers["Host"] = authority(flow_state.authority, host)


def _named_destination(flow: http.HTTPFlow) -> tuple[str, int | None] | str:
    """The host name (lower case, without a trailing dot) and port the request names, or why it
    names none unambiguously. HTTP/2 carries ``:authority``; a Host header beside it must agree."""
    request = flow.request
    hosts = request.headers.get_all("host")
    if request.is_http2 or request.is_http3:
        if not request.authority or any(h.strip().lower() != request.authority.lower() for h in hosts):
            return "the :authority and Host headers differ"
        named = request.authority
    elif len(hosts) != 1:
        return "a request names its host in exactly one Host header"
    else:
        named = hosts[0]
    name, colon, port = named.strip().lower().partition(":")  # an IPv6 literal is no host the gateway serves
    name = name.removesuffix(".")  # the absolute DNS name is the same host
    if not HOST_NAME.fullmatch(name) or (colon and not PORT.fullmatch(port)):
        return "the Host header is not a host name with an optional port"
    return name, int(port) if colon else None


def _target_refusal(flow: http.HTTPFlow) -> str | None:
    """Why the request line cannot be forwarded as it is, or None."""
    request = flow.request
    if request.http_version.startswith("HTTP/1") and request.authority:
        return "absolute-form request targets are not accepted; send the path, and the host in Host"
    if not request.path.startswith("/"):
        return "the request target is not a path (asterisk-form or another form)"
    if not METHOD.fullmatch(request.data.method.decode("latin-1")):  # ``.method`` is upper-cased by mitmproxy
        return "ambiguous request method: methods are upper-case tokens"
    return None
