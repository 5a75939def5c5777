"""SessionEnforcement: applies the session controls of an allowed request to its response. A file
download (``Content-Disposition: attachment``) under ``blockDownloads`` is replaced by a page
saying why. Requests that are downloads or uploads by themselves were refused in AccessGate.

The response is replaced in ``responseheaders``, before any byte reaches the client: the status
and headers are rewritten and the upstream body is streamed into a function that drops it and
emits the page at its end (memory stays bounded however large the file is).
"""

from __future__ import annotations

from collections.abc import Iterable

from mitmproxy import http

from addons.safety import CORRELATION_KEY, SESSION_KEY, fail_closed
from gateway.access import AccessService
from gateway.web.pages import GatewayResponse


class SessionEnforcement:
    def __init__(self, service: AccessService) -> None:
        self.service = service

    @fail_closed
    async def responseheaders(self, flow: http.HTTPFlow) -> None:
        controls = flow.metadata.get(SESSION_KEY)
        if controls is None or flow.response is None:
            return
        accepts_html = "text/html" in flow.request.headers.get("accept", "").lower()
        page = self.service.response_restriction(controls, flow.response.headers,
                                                 flow.metadata.get(CORRELATION_KEY, "-"), accepts_html)
        if page is not None:
            replace_before_sending(flow.response, page)


def replace_before_sending(response: http.Response, page: GatewayResponse) -> None:
    response.status_code = page.status_code
    response.reason = ""
    response.headers.clear()
    for name, value in page.headers:
        response.headers.add(name, value)
    response.headers["Content-Length"] = str(len(page.body))
    response.stream = _Replacement(page.body)


class _Replacement:
    """mitmproxy calls a stream function per body chunk, then once with b"" at the end."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.sent = False

    def __call__(self, chunk: bytes) -> Iterable[bytes] | bytes:
        if chunk or self.sent:
            return b""
        self.sent = True
        return self.body
