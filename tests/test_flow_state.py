"""The addons' notes on a flow (``addons/flow_state.py``): one typed object under one metadata key,
each field written by the addons its comment names; what a recording keeps of it for replay; and
addon branches that read it, tested alone with mitmproxy's ``taddons`` and ``tflow`` (as mitmproxy's
``test/mitmproxy/addons/test_proxyauth.py`` does) instead of through a live listener."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from mitmproxy import http, io
from mitmproxy.flow import Error
from mitmproxy.proxy import layers
from mitmproxy.test import tflow, tutils

from addons.access_gate import AccessGate
from addons.decision_records import DecisionRecords
from addons.flow_state import FLOW_STATE_KEY, FlowState, state
from addons.framing import UpstreamFraming
from addons.recorded_flows import FlowRecording, read_flow_file
from addons.service_endpoints import ServiceEndpoints
from gateway.decision.pipeline import refused_before_policy
from gateway.decision.service import Outcome
from gateway.http.headers import CORRELATION_ID
from gateway.ops.metrics import GatewayMetrics
from gateway.policy.model import AccessRequest, SessionControls
from gateway.replay.recorded import RecordedRequest
from gateway.web import pages
from tests.conftest import addon_context

REPO = Path(__file__).resolve().parent.parent
MAIL = "mail.contoso.test"  # any protected host: nothing here is routed

# ---------------------------------------------------------------------------------------------
# The accessor


def test_a_flows_state_is_made_on_first_use_and_kept_under_one_key() -> None:
    flow = tflow.tflow()
    notes = state(flow)
    assert notes == FlowState()  # nothing noted: not routed, not allowed, no answer
    assert (notes.correlation_id, notes.host, notes.allowed, notes.record) == (None, None, False, None)
    notes.host = MAIL
    assert state(flow) is notes
    assert list(flow.metadata) == [FLOW_STATE_KEY]


def test_another_value_under_the_key_is_an_error_and_a_hook_meeting_it_fails_closed() -> None:
    """Only ``state`` writes the key; a stranger's value there is never read as a state. A hook
    that meets one fails, and so does ``safety.block`` (it cannot note the refusal): the flow is killed."""
    flow = tflow.tflow()
    flow.metadata[FLOW_STATE_KEY] = {"allowed": True}
    with pytest.raises(TypeError, match="not a FlowState"):
        state(flow)
    invoke(AccessGate(CountingService()), layers.http.HttpRequestHook(flow))  # type: ignore[arg-type]
    assert flow.response is None and flow.error is not None and flow.error.msg == Error.KILLED_MESSAGE


def test_the_credentials_kept_for_a_new_decision_stay_out_of_the_states_repr() -> None:
    flow = tflow.tflow()
    notes = state(flow)
    notes.authorization, notes.cookies = ["Bearer eyJ.secret"], ["PortcullisSession=secret"]
    assert "secret" not in repr(notes)


# ---------------------------------------------------------------------------------------------
# Who writes what: one writer per field, except where this table says why not

WRITERS: dict[str, set[str]] = {
    # strict_http: a request mitmproxy refused before any hook; safety: a hook failed before Routing named it
    "correlation_id": {"routing", "strict_http", "safety"},
    "authority": {"routing"},
    "host": {"routing"},
    "service": {"routing"},
    "unprotected": {"routing"},
    "kiosk": {"routing"},
    "device_certificate": {"device_certificates"},
    "client_ip": {"access_gate"},
    "forwarded_for_problem": {"flows"},  # access_request's helper, called by AccessGate and Routing's refusals
    "allowed": {"access_gate", "safety"},  # safety.block: any hook that failed takes the permission back
    "access_request": {"access_gate"},
    "authorization": {"access_gate"},
    "cookies": {"access_gate"},
    "device_id": {"access_gate"},
    "app_users": {"access_gate"},
    "session_controls": {"access_gate"},
    "record": {"access_gate", "decision_records"},  # DecisionRecords clears it once written: written once
    "client_close": {"access_gate"},
    "restricted_answer": {"session_enforcement"},
    "upstream_status": {"strict_http"},
    "gateway_answer": {"strict_http"},
    "upstream_failed": {"strict_http"},
    "body_after_answer": {"strict_http"},
    "last_on_connection": {"drain"},
    "failed_hook": {"safety"},
    "failure_logged": {"decision_records"},
    "framed_by_gateway": {"framing"},
}


def state_writes(tree: ast.Module) -> set[str]:
    """The ``FlowState`` fields a module assigns: ``state(flow).x = ...``, or ``n.x = ...`` where
    ``n = state(...)`` in the same module."""
    def is_state_call(node: ast.expr) -> bool:
        return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "state"

    names = {target.id for node in ast.walk(tree) if isinstance(node, ast.Assign) and is_state_call(node.value)
             for target in node.targets if isinstance(target, ast.Name)}
    targets: list[ast.expr] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets += node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets.append(node.target)
    flat = [t for target in targets for t in (target.elts if isinstance(target, ast.Tuple) else [target])]
    return {t.attr for t in flat if isinstance(t, ast.Attribute) and (
        is_state_call(t.value) or isinstance(t.value, ast.Name) and t.value.id in names)}


def test_each_field_of_the_flow_state_is_written_where_its_comment_says() -> None:
    fields = {f.name for f in dataclasses.fields(FlowState)}
    assert set(WRITERS) == fields
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / "addons").glob("*.py")):
        for name in state_writes(ast.parse(path.read_text())) & fields:
            found.setdefault(name, set()).add(path.stem)
    assert found == WRITERS
    assert "allowed" in state_writes(ast.parse("s = state(f)\nif x:\n    s.allowed, y = True, 1")), \
        "the check sees nothing"


# ---------------------------------------------------------------------------------------------
# Recordings: replay reads plain metadata, the same keys before and after the notes became one object

def noted_flow() -> http.HTTPFlow:
    flow = tflow.tflow(resp=True)
    flow.request.host_header = MAIL
    notes = state(flow)
    notes.correlation_id, notes.host, notes.client_ip, notes.kiosk, notes.allowed = \
        "c0ffee", MAIL, "203.0.113.7", True, True
    notes.authorization = ["Bearer eyJ.kept-in-memory"]  # live values a recording cannot hold
    notes.session_controls = SessionControls(block_downloads=True)
    return flow


def written_as_before(flow: http.HTTPFlow) -> dict[str, object]:
    """The plain keys recordings carried while each note was its own metadata key."""
    notes = state(flow)
    return {"portcullis.correlation_id": notes.correlation_id, "portcullis.host": notes.host,
            "portcullis.client_ip": notes.client_ip, "portcullis.kiosk": notes.kiosk,
            "portcullis.allowed": notes.allowed, "portcullis.authority": MAIL}


@pytest.mark.parametrize("made", ["now", "before the flow state"])
def test_replay_reads_a_recording_made_now_as_one_made_before_the_flow_state(tmp_path: Path, made: str) -> None:
    flow = noted_flow()
    path = tmp_path / "recorded.mitm"
    with path.open("wb") as file:
        if made == "now":
            io.FlowWriter(file).add(saved_by_the_recorder(flow))
        else:
            old = tflow.tflow(resp=True)
            old.request, old.metadata = flow.request, written_as_before(flow)
            io.FlowWriter(file).add(old)
    [read] = read_flow_file(path)
    assert isinstance(read, RecordedRequest)
    assert (read.correlation_id, read.host, read.client_ip, read.kiosk, read.authenticated) == \
        ("c0ffee", MAIL, "203.0.113.7", True, True)


def saved_by_the_recorder(flow: http.HTTPFlow) -> http.HTTPFlow:
    """The flow as ``FlowRecording`` writes it (its ``flow_state``), read back by mitmproxy."""
    saved = http.HTTPFlow.from_state(FlowRecording().flow_state(flow))
    assert isinstance(saved, http.HTTPFlow) and FLOW_STATE_KEY not in saved.metadata
    assert set(saved.metadata) == {"portcullis.correlation_id", "portcullis.host", "portcullis.client_ip",
                                   "portcullis.kiosk", "portcullis.allowed"}
    return saved


# ---------------------------------------------------------------------------------------------
# AccessGate alone


class CountingService:
    """The part of ``AccessService`` AccessGate's ``request``, ``responseheaders`` and ``error`` read."""

    config = SimpleNamespace(gateway_file=SimpleNamespace(gateway=SimpleNamespace(trusted_proxies=())))

    def __init__(self) -> None:
        self.metrics = GatewayMetrics()
        self.refused: list[tuple[int, str]] = []  # what the core was asked to log

    def refuse(self, request: AccessRequest, status: int, reason: str, *, error: str | None = None) -> Outcome:
        """A refusal's answer as the core renders it (its record is the live tests' business)."""
        self.refused.append((status, reason))
        return Outcome(refused_before_policy(request, status, reason),
                       pages.refused(status, reason, request.correlation_id, error=error), {})


def invoke(addon: object, hook: object) -> None:
    """Run one hook the way mitmproxy's addon manager does, in a ``taddons`` context."""
    async def run() -> None:
        with addon_context(addon) as context:
            await context.master.addons.invoke_addon(addon, hook)  # type: ignore[arg-type]  # a Hook

    asyncio.run(run())


@pytest.mark.parametrize(("allowed", "service", "trailers", "status"), [
    pytest.param(False, None, None, 403, id="undecided -> 403, never forwarded"),
    pytest.param(True, None, None, None, id="allowed -> forwarded"),
    pytest.param(True, None, [(b"x-after", b"1")], 400, id="allowed, HTTP/2 trailers -> 400"),
    pytest.param(False, "mtd", None, None, id="the gateway's own endpoint -> left to ServiceEndpoints"),
])
def test_a_request_reaching_its_body_undecided_never_goes_upstream(
        allowed: bool, service: str | None, trailers: list[tuple[bytes, bytes]] | None, status: int | None) -> None:
    flow = tflow.tflow()
    state(flow).allowed, state(flow).service = allowed, service
    flow.request.trailers = http.Headers(trailers) if trailers else None
    invoke(AccessGate(CountingService()), layers.http.HttpRequestHook(flow))  # type: ignore[arg-type]  # as above
    assert (flow.response.status_code if flow.response else None) == status


@pytest.mark.parametrize(("upstream_failed", "allowed", "host", "counted"), [
    pytest.param(True, True, MAIL, 1, id="an allowed request's upstream failed -> counted for its host"),
    pytest.param(False, True, MAIL, 0, id="the client hung up -> not counted"),
    pytest.param(True, False, MAIL, 0, id="refused -> not counted"),
    pytest.param(True, True, None, 0, id="not routed -> no host to count"),
])
def test_only_an_allowed_requests_upstream_failure_is_counted(
        upstream_failed: bool, allowed: bool, host: str | None, counted: int) -> None:
    flow = tflow.tflow(err=True)
    notes = state(flow)
    notes.upstream_failed, notes.allowed, notes.host = upstream_failed, allowed, host
    service = CountingService()
    invoke(AccessGate(service), layers.http.HttpErrorHook(flow))  # type: ignore[arg-type]  # as above
    assert (service.metrics.registry.get_sample_value("portcullis_upstream_errors_total", {"host": MAIL}) or 0) \
        == counted


@pytest.mark.parametrize("client_close", [False, True])
def test_the_answer_names_the_correlation_id_and_closes_when_the_client_asked(client_close: bool) -> None:
    flow = tflow.tflow(resp=True)
    state(flow).correlation_id, state(flow).client_close = "c0ffee", client_close
    invoke(AccessGate(CountingService()), layers.http.HttpResponseHeadersHook(flow))  # type: ignore[arg-type]
    assert flow.response is not None
    assert flow.response.headers[CORRELATION_ID] == "c0ffee"
    assert (flow.response.headers.get("connection") == "close") is client_close


def test_a_request_routing_did_not_route_is_answered_500_not_decided() -> None:
    flow = tflow.tflow()
    invoke(AccessGate(CountingService()), layers.http.HttpRequestHeadersHook(flow))  # type: ignore[arg-type]
    assert flow.response is not None and flow.response.status_code == 500
    assert state(flow).allowed is False
    page = json.loads(flow.response.content or b"")
    assert page["error"] == "internal_error" and page["correlationId"] == state(flow).correlation_id
    assert state(flow).failed_hook == "AccessGate.requestheaders"


@pytest.mark.parametrize("record", [None, {"correlationId": "c0ffee"}], ids=["no record", "a record waits"])
def test_a_failed_hook_is_logged_as_a_refusal_unless_a_record_waits_for_its_answer(
        record: dict[str, str] | None) -> None:
    flow = tflow.tflow()
    notes = state(flow)
    notes.correlation_id, notes.failed_hook, notes.record = "c0ffee", "Routing.requestheaders", record
    service = CountingService()
    for _ in range(2):  # requestheaders, then request: logged once
        invoke(DecisionRecords(service), layers.http.HttpRequestHeadersHook(flow))  # type: ignore[arg-type]
        invoke(DecisionRecords(service), layers.http.HttpRequestHook(flow))  # type: ignore[arg-type]
    assert [status for status, _ in service.refused] == ([] if record else [500])
    assert all("Routing.requestheaders" in reason for _, reason in service.refused)


def test_the_gateways_endpoint_without_an_app_is_a_logged_404_page() -> None:
    flow = tflow.tflow()
    state(flow).correlation_id, state(flow).service = "c0ffee", "mtd"
    service = CountingService()
    invoke(ServiceEndpoints(service, {}), layers.http.HttpRequestHook(flow))  # type: ignore[arg-type]
    assert flow.response is not None and flow.response.status_code == 404
    assert json.loads(flow.response.content or b"")["error"] == "not_found"
    assert flow.response.headers[CORRELATION_ID] == "c0ffee"
    assert [status for status, _ in service.refused] == [404]


# ---------------------------------------------------------------------------------------------
# UpstreamFraming alone: an HTTP/2 body without a length reaches an HTTP/1.1 upstream framed


def h2_post(body: bytes) -> http.HTTPFlow:
    return tflow.tflow(req=tutils.treq(method=b"POST", http_version=b"HTTP/2.0", headers=http.Headers(),
                                       content=body))


@pytest.mark.parametrize(("body", "streamed", "framing"), [
    pytest.param(b"hello", False, ("5", None), id="read whole -> its length"),
    pytest.param(b"", False, (None, None), id="empty -> no framing headers"),
    pytest.param(b"hello", True, (None, "chunked"), id="streamed -> chunked"),
])
def test_an_http2_body_without_a_length_is_framed_for_the_upstream(
        body: bytes, streamed: bool, framing: tuple[str | None, str | None]) -> None:
    flow = h2_post(body)
    framer = UpstreamFraming()
    invoke(framer, layers.http.HttpRequestHeadersHook(flow))
    assert flow.request.headers.get("transfer-encoding") == "chunked"
    assert state(flow).framed_by_gateway
    flow.request.stream = streamed
    invoke(framer, layers.http.HttpRequestHook(flow))
    assert (flow.request.headers.get("content-length"), flow.request.headers.get("transfer-encoding")) == framing


@pytest.mark.parametrize("flow_of", [
    pytest.param(lambda: tflow.tflow(req=tutils.treq(method=b"POST", headers=http.Headers())), id="HTTP/1.1"),
    pytest.param(lambda: _served_by_the_gateway(h2_post(b"{}")), id="the gateway's own endpoint"),
])
def test_requests_that_carry_their_own_framing_or_stay_in_the_gateway_are_left_as_sent(
        flow_of: Callable[[], http.HTTPFlow]) -> None:
    flow = flow_of()
    invoke(UpstreamFraming(), layers.http.HttpRequestHeadersHook(flow))
    assert "transfer-encoding" not in flow.request.headers and not state(flow).framed_by_gateway


def _served_by_the_gateway(flow: http.HTTPFlow) -> http.HTTPFlow:
    state(flow).service = "mtd"
    return flow


def test_a_refused_request_is_not_invited_to_send_its_body() -> None:
    flow = h2_post(b"hello")
    flow.request.headers["expect"] = "100-continue"
    flow.response = tutils.tresp(status_code=401)
    invoke(UpstreamFraming(), layers.http.HttpRequestHeadersHook(flow))
    assert "expect" not in flow.request.headers and not state(flow).framed_by_gateway
