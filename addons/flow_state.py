"""What the addons know about one flow, in one typed object under one metadata key.

mitmproxy gives each flow a ``metadata`` dict that lives as long as the flow; an addon leaves its
notes there for the hooks that run after it (``blocklisted`` in mitmproxy's ``blocklist.py``).
Portcullis keeps all of its notes in one ``FlowState``, which ``state(flow)`` makes on first use:
in Routing's ``requestheaders`` for a request that reaches the access hooks, in ``strict_http``
for one mitmproxy refused before any hook. Each field says who writes it and who reads it; a read
sees the write because of the hook order, which is the addon list in ``runner.build_master``. A
field at its default means "not noted": not routed, not allowed, no answer yet.

A recording (``recorded_flows.FlowRecording``) cannot keep this object (mitmproxy's writer takes
plain values only): it writes the few notes replay reads back, as plain values under their own keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mitmproxy import http

from gateway.policy.model import AccessRequest, DeviceCertificate, Restriction, SessionControls

FLOW_STATE_KEY = "portcullis.flow_state"


@dataclass(slots=True, kw_only=True)
class FlowState:
    # -- Where the request goes: written by Routing (``requestheaders``, before any decision).
    # Its id in every log line and the Correlation-Id answer header (``safety.respond``, AccessGate), and
    # in recordings. Also written by strict_http for a request mitmproxy refused before any hook, and by
    # ``safety.block`` for one a hook failed on before Routing ran.
    correlation_id: str | None = None
    authority: str = ""  # the Host header as sent (Routing rewrites it): ``flows.access_request``
    host: str | None = None  # the protected host it was routed to: AccessGate, its upstream errors, recordings
    # The gateway's own endpoints (``service_endpoints.MTD_ENDPOINTS`` or ``BROWSER_ENDPOINTS``) answer it: no
    # decision, nothing forwarded. Read by ServiceEndpoints, AccessGate and UpstreamFraming.
    service: str | None = None
    unprotected: bool = False  # a kiosk destination forwarded without a decision: AccessGate
    kiosk: bool = False  # it came through the kiosk forward proxy: AccessGate (the kiosk location), recordings
    # The connection's device certificate as the core verified it, checked again for this request: written by
    # DeviceCertificates (``requestheaders``, after Routing), read by AccessGate. None: none was asked or sent.
    device_certificate: DeviceCertificate | None = None

    # -- The decision: written by AccessGate (``requestheaders``).
    client_ip: str | None = None  # the address decided for (a trusted proxy's client): recordings
    # A trusted proxy's X-Forwarded-For that cannot be read: written by ``flows.client_ip`` (while AccessGate,
    # or Routing refusing a request, builds its access request), refused with 400 by AccessGate.
    forwarded_for_problem: str | None = None
    # To be forwarded: AccessGate's ``request`` and ``error``, ContinuousAccess, recordings. Also written
    # by ``safety.block`` (False) when any hook failed.
    allowed: bool = False
    access_request: AccessRequest | None = None  # an allowed request, to decide again: ContinuousAccess
    authorization: list[str] = field(default_factory=list, repr=False)  # likewise (never logged)
    cookies: list[str] = field(default_factory=list, repr=False)  # likewise
    device_id: str | None = None  # the device its decision used: ContinuousAccess (when that device changes)
    # the users whose app protection registrations its decision read: ContinuousAccess (when they change)
    app_users: frozenset[str] = frozenset()
    session_controls: SessionControls | None = None  # an allowed request's session controls: SessionEnforcement
    # Its decision record, until its answer is known: DecisionRecords writes it then, and clears this.
    record: dict[str, Any] | None = None
    client_close: bool = False  # the client sent ``Connection: close`` (stripped): AccessGate's answer closes

    # -- The answer.
    # SessionEnforcement replaced the upstream's answer (``blockDownloads``): DecisionRecords.
    restricted_answer: Restriction | None = None
    upstream_status: int | None = None  # strict_http: the upstream's status: DecisionRecords
    gateway_answer: int | None = None  # strict_http: its own answer to a failed flow: DecisionRecords
    upstream_failed: bool = False  # strict_http: the upstream's side ended the flow: AccessGate.error counts it
    body_after_answer: bool = False  # strict_http: refused, its body is read after the answer: RequestFraming
    last_on_connection: bool = False  # Drain: the last answer on an HTTP/2 connection: strict_http's GOAWAY
    # safety.block: this hook failed and the gateway answered 500 (or withheld the upstream's answer):
    # DecisionRecords logs it as a refusal when no record of the request is written otherwise.
    failed_hook: str | None = None
    failure_logged: bool = False  # DecisionRecords wrote that refusal
    framed_by_gateway: bool = False  # UpstreamFraming added Transfer-Encoding (``requestheaders``), for ``request``


def state(flow: http.HTTPFlow) -> FlowState:
    """The flow's state, made empty on first use."""
    found = flow.metadata.get(FLOW_STATE_KEY)
    if found is None:
        found = flow.metadata[FLOW_STATE_KEY] = FlowState()
    elif not isinstance(found, FlowState):  # only this function writes the key: anything else is a bug
        raise TypeError(f"flow metadata {FLOW_STATE_KEY!r} holds a {type(found).__name__}, not a FlowState")
    return found
