"""The page that answers a decision: the pipeline says which (``gateway.decision.outcome``), this
renders it (``gateway.web.pages``). A sign-in is not rendered here: starting one is I/O (the
browser sign-in stores its state first), done by the gateway, which then answers a redirect."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime

from gateway.decision.outcome import (
    Authorization,
    Forward,
    Refused,
    SessionRestricted,
    SignIn,
    Unauthenticated,
)
from gateway.policy.model import Restriction, SessionControls
from gateway.policy.session_controls import response_restriction
from gateway.web import pages

logger = logging.getLogger(__name__)


def render(result: Authorization, *, remediation_url: str, now: datetime) -> pages.GatewayResponse | None:
    """The answer to the client, or None when the request goes upstream."""
    action, request = result.action, result.request
    correlation_id = request.correlation_id
    if isinstance(action, Forward):
        return None
    if isinstance(action, Refused):
        return pages.refused(action.status, action.reason, correlation_id, error=action.error)
    if isinstance(action, Unauthenticated):
        return pages.unauthenticated(action.reason, correlation_id, presented=action.presented,
                                     parameters=action.parameters, error=action.error)
    if isinstance(action, SessionRestricted):
        return pages.session_restricted(action.reason, correlation_id, html=request.accepts_html, now=now)
    if isinstance(action, SignIn):
        raise TypeError("a sign-in is answered by the browser sign-in's redirect, not rendered")
    return pages.blocked(decision=result.decision, request=request, app=action.app, device=action.device,
                         remediation_url=remediation_url, now=now)



def restricted_answer(controls: SessionControls, response_headers: Mapping[str, str], correlation_id: str, *,
                      accepts_html: bool, now: datetime) -> tuple[Restriction, pages.GatewayResponse] | None:
    """The page that replaces an upstream answer the session may not receive (a file download),
    with the session control that replaced it, for the request's decision record (only
    ``blockDownloads`` restricts answers); None when the answer may pass."""
    reason = response_restriction(controls, response_headers)
    if reason is None:
        return None
    logger.info("[%s] %s: response replaced", correlation_id, reason)
    return Restriction.block_downloads, pages.session_restricted(reason, correlation_id, html=accepts_html, now=now)
