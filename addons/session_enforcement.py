"""SessionEnforcement: the response side of a forwarded request. A file download
(``Content-Disposition: attachment``) under ``blockDownloads`` is replaced by a page saying why;
any other answer is passed on as its bytes arrive when ``gateway.http.response_streaming`` says so
(unknown length: EWS streaming notifications, event streams), else mitmproxy holds it whole.
Requests that are downloads or uploads by themselves were refused in AccessGate.

The response is replaced in ``responseheaders``, before any byte reaches the client: the status
and headers are rewritten and the upstream body is streamed into a function that drops it and
emits the page at its end (memory stays bounded however large the file is). The replacement wins
over streaming, and a stream function set by an earlier hook (``fail_closed``'s) is kept.
"""

from __future__ import annotations

from collections.abc import Iterable

from mitmproxy import http

from addons.flow_state import state
from addons.safety import fail_closed
from gateway.decision.service import AccessService
from gateway.http.response_streaming import streams_as_sent
from gateway.web.decision_pages import restricted_answer
from gateway.web.pages import GatewayResponse


class SessionEnforcement:
    def __init__(self, service: AccessService) -> None:
        self.service = service

    @fail_closed
    async def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None:
            return
        flow_state = state(flow)
        controls = flow_state.session_controls
        replaced = None
        if controls is not None:
            accepts_html = "text/html" in flow.request.headers.get("accept", "").lower()
            replaced = restricted_answer(controls, response.headers, flow_state.correlation_id or "-",
                                         accepts_html=accepts_html, now=self.service.clock())
        if replaced is not None:
            flow_state.restricted_answer, page = replaced  # for the decision record
            replace_before_sending(response, page)
        elif not response.stream and streams_as_sent(flow.request.method, response.status_code, response.headers):
            response.stream = True


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
