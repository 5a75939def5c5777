"""DecisionRecords: writes a forwarded request's decision record once the client's answer is
known, so that its ``httpStatus`` is what the client got and ``upstreamStatus`` what the upstream
answered. Records of the answers the gateway gives itself are written by the core when it decides.

AccessGate leaves the record on the flow (``FlowState.record``). It is written when the answer's head
goes to the client: for a streamed answer in ``responseheaders`` (after SessionEnforcement, which
may have replaced a download); for an answer held whole in ``response``, once it has all arrived
(an upstream that breaks off mid-body is the gateway's 502, not the upstream's 200). A flow that
failed is written once the gateway's own answer went out or none will (``error_answered``, see
``addons/strict_http.py``); one whose client connection ended without either, and a request still
open when the gateway stops, without a status (``client_disconnected``, ``done``). Whichever
comes first writes it; the others find nothing left to write. Last in the addon chain: any other
hook may still change the answer.

A request a hook failed on (``safety.block`` answered 500) and that has no record waiting is
logged here as a refusal with that reason, whichever addon failed: every refusal is a decision.
"""

from __future__ import annotations

import logging

from mitmproxy import connection, http

from addons.flow_state import state
from addons.refusals import logged_refusal
from addons.safety import fail_closed
from gateway.decision.service import AccessService
from gateway.web.pages import INTERNAL_ERROR

logger = logging.getLogger(__name__)


class DecisionRecords:
    def __init__(self, service: AccessService) -> None:
        self.service = service
        # flows whose record waits for their answer, by client connection: bounded by the open flows
        self.waiting: dict[str, set[http.HTTPFlow]] = {}

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if state(flow).record is not None:
            self.waiting.setdefault(flow.client_conn.id, set()).add(flow)
        self._failed(flow)

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        self._failed(flow)

    def _failed(self, flow: http.HTTPFlow) -> None:
        """A hook before this one failed and answered 500: logged once, unless a record waits for the
        answer (a forwarded request's, written with the 500 it got)."""
        flow_state = state(flow)
        if flow_state.failed_hook is None or flow_state.record is not None or flow_state.failure_logged:
            return
        flow_state.failure_logged = True
        logged_refusal(self.service, flow, 500, f"{INTERNAL_ERROR} ({flow_state.failed_hook})",
                       host=flow_state.host or "", error="internal_error")

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """A streamed answer's head goes out right after this hook; one held whole does not yet."""
        if flow.response is not None and flow.error is None and flow.response.stream:
            self._write(flow, flow.response.status_code)

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None and flow.error is None:
            self._write(flow, flow.response.status_code)

    def error_answered(self, flow: http.HTTPFlow) -> None:
        self._write(flow, state(flow).gateway_answer)

    def client_disconnected(self, client: connection.Client) -> None:
        """A flow of this connection still waiting got no answer (its layer ended without
        ``response`` or ``error``: mitmproxy raises neither when its HTTP layer itself fails)."""
        for flow in list(self.waiting.get(client.id, ())):
            self._write(flow, None)

    def done(self) -> None:
        """The gateway stops (drain time over): a request still open got no answer from it."""
        for flows in list(self.waiting.values()):
            for flow in list(flows):
                try:
                    self._write(flow, None)
                except Exception:  # one record that cannot be written must not take the others
                    logger.exception("[%s] decision record not written at shutdown", state(flow).correlation_id)

    def _write(self, flow: http.HTTPFlow, http_status: int | None) -> None:
        flow_state = state(flow)
        record, flow_state.record = flow_state.record, None
        flows = self.waiting.get(flow.client_conn.id)
        if flows is not None:
            flows.discard(flow)
            if not flows:
                del self.waiting[flow.client_conn.id]
        if record is not None:
            self.service.record_answer(record, http_status, flow_state.upstream_status, flow_state.restricted_answer)
