"""SessionEnforcement: the response side of a forwarded request. A file download
(``Content-Disposition: attachment``) under ``blockDownloads`` is replaced by a page saying why;
any other answer is passed on as its bytes arrive when ``gateway.response_streaming`` says so
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

from addons.decision_records import RESTRICTED_ANSWER_KEY
from addons.safety import CORRELATION_KEY, SESSION_KEY, fail_closed
from gateway.access import AccessService
from gateway.response_streaming import streams_as_sent
from gateway.web.pages import GatewayResponse


class SessionEnforcement:
    def __init__(self, service: AccessService) -> None:
        self.service = service

    @fail_closed
    async def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None:
            return
        controls = flow.metadata.get(SESSION_KEY)
        replaced = None
        if controls is not None:
            accepts_html = "text/html" in flow.request.headers.get("accept", "").lower()
            replaced = self.service.response_restriction(controls, response.headers,
                                                         flow.metadata.get(CORRELATION_KEY, "-"), accepts_html)
        if replaced is not None:
            flow.metadata[RESTRICTED_ANSWER_KEY], page = replaced  # for the decision record
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
