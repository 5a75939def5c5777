"""DecisionRecords: writes a forwarded request's decision record once the client's answer is
known, so that its ``httpStatus`` is what the client got and ``upstreamStatus`` what the upstream
answered. Records of the answers the gateway gives itself are written by the core when it decides.

AccessGate leaves the record on the flow (``RECORD_KEY``). It is written when the answer starts
(``responseheaders``, after SessionEnforcement, which may have replaced a download), or, for a
flow that failed, once the gateway's own answer went out or none will (``error_answered``, see
``addons/strict_http.py``), or, for a request still open when the gateway stops, then (``done``),
without a status. Whichever comes first writes it; the others find nothing left to write.
"""

from __future__ import annotations

from mitmproxy import http

from addons.safety import fail_closed
from addons.strict_http import GATEWAY_ANSWER_KEY, UPSTREAM_STATUS_KEY
from gateway.access import AccessService

RECORD_KEY = "portcullis.decision_record"  # a forwarded request's record, until its answer is known
RESTRICTED_ANSWER_KEY = "portcullis.restricted_answer"  # the session control that replaces the upstream's answer


class DecisionRecords:
    def __init__(self, service: AccessService) -> None:
        self.service = service
        self.waiting: set[http.HTTPFlow] = set()  # flows whose record waits for their answer

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if RECORD_KEY in flow.metadata:
            self.waiting.add(flow)

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None and flow.error is None:
            self._write(flow, flow.response.status_code)

    def error_answered(self, flow: http.HTTPFlow) -> None:
        self._write(flow, flow.metadata.get(GATEWAY_ANSWER_KEY))

    def done(self) -> None:
        """The gateway stops (drain time over): a request still open got no answer from it."""
        for flow in list(self.waiting):
            self._write(flow, None)

    def _write(self, flow: http.HTTPFlow, http_status: int | None) -> None:
        record = flow.metadata.pop(RECORD_KEY, None)
        self.waiting.discard(flow)
        if record is not None:
            self.service.record_answer(record, http_status, flow.metadata.get(UPSTREAM_STATUS_KEY),
                                       flow.metadata.get(RESTRICTED_ANSWER_KEY))
