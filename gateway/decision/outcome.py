"""What the pipeline answers: the decision, the identity, app and device it used, and the action
the consumer takes (forward with these headers, or answer with which page). Values only: the
gateway renders the action (``gateway.web.decision_pages``) and writes the record; What If,
``portcullis test`` and replay read the decision."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import SignalUnavailable
from gateway.policy.model import (
    NO_SESSION_CONTROLS,
    AccessRequest,
    ClientApp,
    Decision,
    DeviceSignals,
    Identity,
    SessionControls,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Forward:
    """Send the request upstream with these headers (what the decision used, nothing it ignored).
    ``device_id`` names the device the allowed request depends on, for continuous evaluation."""

    upstream_headers: tuple[tuple[str, str], ...]
    device_id: str | None = None
    session_controls: SessionControls = NO_SESSION_CONTROLS


@dataclass(frozen=True, slots=True, kw_only=True)
class Blocked:
    """Answer with the block page (a policy's block, or a path no resource names)."""

    app: ClientApp
    device: DeviceSignals


@dataclass(frozen=True, slots=True, kw_only=True)
class Refused:
    """Answer a refusal no policy was asked about (400, 421, 503)."""

    status: int
    reason: str
    error: str | None = None  # the answer's ``error`` when more precise than the status's (``tls_required``)


@dataclass(frozen=True, slots=True, kw_only=True)
class Unauthenticated:
    """Answer 401 with the challenge of the request's host."""

    reason: str
    presented: bool
    parameters: tuple[tuple[str, str], ...]
    # invalid_token; or a step-up (RFC 9470's insufficient_user_authentication, Entra's insufficient_claims)
    error: str = "invalid_token"


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionRestricted:
    """Policy allowed the request; a session control refuses it (``blockUploads``, ...)."""

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SignIn:
    """A browser goes to the identity provider: no session, or one older than the sign-in
    frequency (``max_age``). Starting a sign-in is I/O: the consumer does it."""

    max_age: int | None = None
    acr_values: tuple[str, ...] = ()  # a step-up: the authentication strength the issuer is asked for
    claims: str | None = None  # a step-up: OIDC's claims request (the authentication contexts needed)


type Action = Forward | Blocked | Refused | Unauthenticated | SessionRestricted | SignIn


@dataclass(frozen=True, slots=True, kw_only=True)
class Authorization:
    """One request's decision with what it used. ``request`` is the request as decided (its path
    canonical); ``identity``, ``app`` and ``device`` are set once the identity stage passed, and
    ``identity_source`` says where the identity came from (``accessToken``, ``browserSession``).
    ``unavailable`` is the failure behind a 503 (a signal source down), for the process log."""

    request: AccessRequest
    decision: Decision
    action: Action
    identity: Identity | None = None
    app: ClientApp | None = None
    device: DeviceSignals | None = None
    identity_source: str | None = None
    unavailable: SignalUnavailable | None = None

    @property
    def forward(self) -> bool:
        return isinstance(self.action, Forward)
