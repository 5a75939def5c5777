"""What the addons read from a flow: the access request handed to the core."""

from __future__ import annotations

from mitmproxy import http

from gateway.policy.model import AccessRequest

AUTHORITY_KEY = "portcullis.authority"  # the Host header as the client sent it (Routing rewrites it)


def authority(host_header: str, host: str) -> str:
    """The Host header if it is the validated host with at most a port, else the host alone."""
    _, _, port = host_header.lower().rpartition(":")
    return f"{host}:{port}" if host_header.lower() == f"{host}:{port}" and port.isdigit() else host


def access_request(flow: http.HTTPFlow, correlation_id: str, host: str,
                   kiosk_location: str | None = None) -> AccessRequest:
    headers = flow.request.headers
    return AccessRequest(
        correlation_id=correlation_id,
        host=host,
        path=flow.request.path,
        method=flow.request.method,
        client_ip=flow.client_conn.peername[0],
        user_agent=headers.get("user-agent", ""),
        accepts_html="text/html" in headers.get("accept", "").lower(),
        content_type=headers.get("content-type", ""),
        content_length=headers.get("content-length", ""),
        chunked="chunked" in headers.get("transfer-encoding", "").lower() or (
            flow.request.http_version.startswith("HTTP/2") and "content-length" not in headers
            and flow.request.method.upper() in ("POST", "PUT", "PATCH")),
        authority=authority(flow.metadata.get(AUTHORITY_KEY, ""), host),
        kiosk_location=kiosk_location,
    )
