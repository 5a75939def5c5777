"""The one path from a request to a decision, in the order the gateway runs it (Pomerium's
``Check``: request → ``Evaluate`` → ``handleResult``; the log is the consumer's):

    admission   canonical path (ambiguous: 400), resource match (none: 403; public: allow before
                any token), an access token in the URL (400), the connection's device
                certificate (not believed, or missing where required: 403)
    identity    who asks: the ``IdentitySource`` says (a bearer token, a browser session or
                legacy ActiveSync's Basic user at the gateway; the question in What If; the
                recorded token in replay)
    signals     the device the decision uses (the certificate's, else the token's), and the app's
                protection registrations when a policy asks for them: the ``SignalSource`` says
                (the inventory and the app registration store, or the decision log's record)
    evaluate    ``gateway.policy.evaluate``, pure; called here and nowhere else
    restrict    before it, the device bindings (certificate against token or session, legacy
                ActiveSync, the ActiveSync DeviceId); after it, the session controls that refuse
                the request (blockDownloads, blockUploads, tokenProtection)
    outcome     the action: forward with the upstream headers, a step-up (a 401 or a new sign-in
                for an authentication strength or context), or which page answers

A source that cannot answer (``SignalUnavailable``) makes the outcome a 503, never a forward.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Protocol
from urllib.parse import parse_qsl

from gateway.config.models import ChallengeSettings
from gateway.decision import device_binding
from gateway.decision.outcome import (
    Action,
    Authorization,
    Blocked,
    Forward,
    Refused,
    SessionRestricted,
    SignIn,
    Unauthenticated,
)
from gateway.decision.rules import Rules
from gateway.errors import SignalUnavailable
from gateway.http import headers
from gateway.http.paths import canonical_path
from gateway.identity import discovery, legacy_activesync
from gateway.identity.assertion import AssertionSigner
from gateway.identity.tokens import RejectedToken
from gateway.policy.authentication import AUTHENTICATION_CONTEXT, STEP_UP_CONTROLS
from gateway.policy.conditions import ACTIVESYNC_PATH, client_app_type, path_has_prefix
from gateway.policy.evaluate import NO_RESOURCE_REASON, evaluate
from gateway.policy.model import (
    AccessRequest,
    AppProtection,
    ClientApp,
    ClientAppType,
    ControlFailure,
    Decision,
    DecisionResult,
    DeviceSignals,
    ErrorCode,
    Identity,
    Restriction,
    RolloutCohort,
    SessionControls,
)
from gateway.policy.policy_set import ResourceMatch
from gateway.policy.session_controls import NEEDS_REVERSE_PROXY, REASONS, edge_unenforceable, request_restriction
from gateway.signals.activesync import MalformedActiveSyncQuery, activesync_device_ids

ACCESS_TOKEN_IN_QUERY = "an access token is accepted only in the Authorization header"  # noqa: S105  (a reason, not a secret)
AMBIGUOUS_PATH = "ambiguous request path"
SIGNAL_UNAVAILABLE = "a signal source is unavailable; try again shortly"
SESSION_RESTRICTIONS = frozenset(REASONS)


@dataclass(frozen=True, slots=True)
class Identified:
    """Who asks, and where that came from (``accessToken`` or ``browserSession``)."""

    identity: Identity
    source: str = "accessToken"
    certificate_bound: bool = False  # a browser session signed in with a device certificate: honoured only on it


@dataclass(frozen=True, slots=True, kw_only=True)
class Signals:
    """The device signals a decision uses. ``check_binding=False``: the ActiveSync binding's
    outcome is known from a decision record (``binding_problem``, None when it passed), which may
    keep neither the query nor the device's real ActiveSync id; ``cohorts``: rollout cohorts known
    from a record (replay of pseudonymised users)."""

    device: DeviceSignals
    check_binding: bool = True
    binding_problem: str | None = None
    cohorts: Mapping[str, RolloutCohort] | None = None
    # the inventory device the connection's verified certificate names (``device`` is then that device),
    # or why the certificate names none (``device_binding.resolution_problem``)
    certificate_device_id: str | None = None
    certificate_problem: str | None = None
    # the token's app's app protection registrations for its user (None: no policy asks for them)
    app_protection: AppProtection | None = None


class IdentitySource(Protocol):
    """Who a request comes from. Raises ``SignalUnavailable`` when it cannot tell (a 503)."""

    async def identify(self, rules: Rules, request: AccessRequest) -> Identified | RejectedToken | SignIn | Refused:
        """The identity, or why there is none: a rejected token (401), a sign-in, a refusal."""
        ...

    def sign_in_again(self, controls: SessionControls, now: datetime) -> bool:
        """A browser session older than the sign-in frequency signs in again."""
        ...


class SignalSource(Protocol):
    """The device a request's identity names. Raises ``SignalUnavailable`` when it cannot tell."""

    @property
    def name(self) -> str: ...

    async def signals(self, rules: Rules, request: AccessRequest, identity: Identity) -> Signals: ...


@dataclass(frozen=True, slots=True)
class Decided:
    """What the rules decide once identity and device are known, with the app and device used."""

    decision: Decision
    app: ClientApp
    device: DeviceSignals

    @property
    def session_restricted(self) -> bool:
        """Policy allowed it; a session control refuses the request itself (``decision`` is that block)."""
        return self.decision.restriction in SESSION_RESTRICTIONS

    @property
    def policy_allowed(self) -> bool:
        """Policy allowed the request (a session control may still refuse it)."""
        return self.decision.allowed or self.session_restricted


async def authorize(request: AccessRequest, *, rules: Rules, identity: IdentitySource, signals: SignalSource,
                    now: datetime, assertions: AssertionSigner | None = None) -> Authorization:
    """The decision for ``request`` under ``rules`` at ``now``: every consumer's one path."""
    admitted = admit(rules, request, signals.name)
    if isinstance(admitted, Authorization):
        return admitted
    request, found = admitted
    unbelieved = certificate_refusal(rules, request)
    if unbelieved is not None:
        return unbelieved
    try:
        who = await identity.identify(rules, request)
        if not isinstance(who, Identified):
            return _not_identified(rules, request, who)
        signal = await signals.signals(rules, request, who.identity)
    except SignalUnavailable as error:
        return refused(request, 503, SIGNAL_UNAVAILABLE, unavailable=error)
    decided = restrict_and_evaluate(rules, request, who.identity, signal, found.names, now,
                                    certificate_bound=who.certificate_bound,
                                    legacy=who.source == legacy_activesync.SOURCE)
    return _outcome(rules, request, who, decided, identity, now, assertions)


def admit(rules: Rules, request: AccessRequest, signal_source: str) -> tuple[AccessRequest, ResourceMatch] | \
        Authorization:
    """Before any token is read: the canonical path, the resource it names, no token in the URL.
    A path no resource names is denied and a public resource allowed, the same for anyone."""
    raw = request.target if request.target is not None else request.path
    path = canonical_path(raw)
    if path is None:
        return refused(request, 400, AMBIGUOUS_PATH)
    request = replace(request, path=path, target=raw)
    found = rules.policy_set.match(request.host, path)
    if found is None or found.public:
        decision = decided_before_identity(request, found.primary if found else None)
        if decision.allowed:
            return Authorization(request=request, decision=decision, action=Forward(upstream_headers=(
                (headers.CORRELATION_ID, request.correlation_id),
                *headers.forwarding_headers(request.client_ip, request.host))))
        nobody = DeviceSignals(device_id=None, device=None, source=signal_source)
        return Authorization(request=request, decision=decision,
                             action=Blocked(app=ClientApp(client_id=None, name=None), device=nobody))
    if access_token_in_query(request.target or ""):
        return refused(request, 400, ACCESS_TOKEN_IN_QUERY)
    return request, found


def refused(request: AccessRequest, status: int, reason: str,
            unavailable: SignalUnavailable | None = None, *, error: str | None = None) -> Authorization:
    """A refusal no policy is asked about: ambiguous (400), misdirected (421), a source down (503)."""
    return Authorization(request=request, decision=refused_before_policy(request, status, reason),
                         action=Refused(status=status, reason=reason, error=error), unavailable=unavailable)


def sign_in(request: AccessRequest, max_age: int | None = None) -> Authorization:
    """A browser without a (fresh enough) session goes to the identity provider."""
    decision = Decision(result=DecisionResult.unauthenticated, status_code=302, error_code=None,
                        reason="sign-in required", resource=None, client_app_type=ClientAppType.browser)
    return Authorization(request=request, decision=decision, action=SignIn(max_age=max_age))


def _not_identified(rules: Rules, request: AccessRequest, why: RejectedToken | SignIn | Refused) -> Authorization:
    if isinstance(why, SignIn):
        return sign_in(request, why.max_age)
    if isinstance(why, Refused):
        return refused(request, why.status, why.reason)
    decision = Decision(result=DecisionResult.unauthenticated, status_code=401, error_code=None, reason=why.reason,
                        resource=None, client_app_type=client_app_type(request, None))
    host = rules.config.gateway_file.protected_hosts.get(request.host)  # None: removed by a reload
    settings = host.challenge if host is not None else ChallengeSettings()
    parameters = discovery.challenge_parameters(settings, request.authority or request.host)
    return Authorization(request=request, decision=decision,
                         action=Unauthenticated(reason=why.reason, presented=why.presented, parameters=parameters))


def restrict_and_evaluate(rules: Rules, request: AccessRequest, identity: Identity, signals: Signals,
                          resources: tuple[str, ...], now: datetime, *, certificate_bound: bool = False,
                          legacy: bool = False) -> Decided:
    """The device checks before policy (legacy ActiveSync's certificate, the certificate's device
    against the token's or the session's, the ActiveSync DeviceId binding), ``evaluate`` (its one
    call site), then the session controls that refuse the request itself (``tokenProtection``
    among them). Pure."""
    app, device = replace(rules.app(identity), protection=signals.app_protection), signals.device
    # Basic is believed only with the user's device certificate: before anything that takes the user as given
    refused_device = (_legacy_refusal(rules, identity, signals, now) if legacy else None) or \
        _device_refusal(request, identity, signals, certificate_bound)
    if refused_device is not None:
        refusing, problem = refused_device
        return Decided(Decision(result=DecisionResult.block, status_code=403, error_code=ErrorCode.device_not_compliant,
                                reason=problem, resource=None, client_app_type=client_app_type(request, identity),
                                restriction=refusing), app, device)
    decision = evaluate(request=request, identity=identity, device=device, app=app, resources=resources,
                        policy_set=rules.policy_set, now=now, cohorts=signals.cohorts)
    if not decision.allowed:
        return Decided(decision, app, device)
    restriction = request_restriction(
        decision.session_controls, method=request.method, content_type=request.content_type,
        content_length=request.content_length, chunked=request.chunked, resources=resources,
        download_resources=rules.policy_set.download_resources)
    at_edge = edge_unenforceable(decision.session_controls) if request.forward_auth else None
    if restriction is not None:
        decision = replace(decision, result=DecisionResult.block, status_code=403, reason=REASONS[restriction],
                           restriction=restriction)
    elif at_edge is not None:
        decision = replace(decision, result=DecisionResult.block, status_code=403,
                           error_code=ErrorCode.blocked_by_conditional_access,
                           reason=NEEDS_REVERSE_PROXY.format(control=at_edge),
                           restriction=Restriction.needs_reverse_proxy)
    elif decision.session_controls.token_protection:
        unbound = device_binding.token_protection_problem(identity.device_id, signals.certificate_device_id)
        if unbound is not None:
            decision = replace(decision, result=DecisionResult.block, status_code=403,
                               error_code=ErrorCode.device_not_compliant, reason=unbound,
                               restriction=Restriction.token_protection)
    return Decided(decision, app, device)


def certificate_refusal(rules: Rules, request: AccessRequest) -> Authorization | None:
    """Before identity: a certificate that is presented but not believed, or none where the host
    requires one, refuses the request (a sign-in would not help: the device needs its certificate)."""
    if request.kiosk_location is not None:
        return None  # the kiosk never asks for one
    problem = device_binding.certificate_problem(request.device_certificate,
                                                 required=rules.device_certificate_required(request.host))
    if problem is None:
        return None
    app_type = client_app_type(request, None)
    decision = Decision(result=DecisionResult.block, status_code=403, error_code=ErrorCode.device_not_compliant,
                        reason=problem, resource=None, client_app_type=app_type,
                        restriction=Restriction.device_certificate)
    nobody = DeviceSignals(device_id=None, device=None, source="device certificate")
    return Authorization(request=request, decision=decision,
                         action=Blocked(app=ClientApp(client_id=None, name=None), device=nobody))


def _legacy_refusal(rules: Rules, identity: Identity, signals: Signals,
                    now: datetime) -> tuple[Restriction, str] | None:
    problem = device_binding.legacy_active_sync_problem(identity.user_principal_name, signals.certificate_device_id,
                                                        signals.device.device, now, rules.compliance)
    return (Restriction.legacy_active_sync, problem) if problem is not None else None


def _device_refusal(request: AccessRequest, identity: Identity, signals: Signals,
                    certificate_bound: bool) -> tuple[Restriction, str] | None:
    """Before policy: the connection's certificate naming no single inventory device, the token (or
    a certificate-bound session) naming another device than the certificate, and the ActiveSync
    DeviceId naming another device than the one decided for."""
    if request.kiosk_location is None:
        if signals.certificate_problem is not None:
            return Restriction.device_certificate, signals.certificate_problem
        mismatch = device_binding.session_problem(identity.device_id, signals.certificate_device_id) \
            if certificate_bound else device_binding.token_device_problem(identity.device_id,
                                                                          signals.certificate_device_id)
        if mismatch is not None:
            return Restriction.token_device_mismatch, mismatch
    problem = _device_binding_problem(request, signals.device) if signals.check_binding \
        else signals.binding_problem
    return (Restriction.activesync_device_id_mismatch, problem) if problem is not None else None


def _outcome(rules: Rules, request: AccessRequest, who: Identified, decided: Decided, source: IdentitySource,
             now: datetime, assertions: AssertionSigner | None) -> Authorization:
    """What to do with the decision: a browser signs in again (sign-in frequency), a restricted
    session or a block is answered, an allowed request forwarded with what the decision used."""
    decision = decided.decision
    if decided.policy_allowed and source.sign_in_again(decision.session_controls, now):
        return sign_in(request, decision.session_controls.sign_in_frequency_seconds)
    step_up = _step_up(rules, request, who, decision)
    if step_up is not None:
        return step_up
    action: Action
    if decided.session_restricted:
        action = SessionRestricted(reason=decision.reason)
    elif decision.allowed:
        action = Forward(upstream_headers=_upstream_headers(rules, request, who.identity, decided, now, assertions),
                         device_id=decided.device.device_id, session_controls=decision.session_controls)
    else:
        action = Blocked(app=decided.app, device=decided.device)
    return Authorization(request=request, decision=decision, action=action, identity=who.identity, app=decided.app,
                         device=decided.device, identity_source=who.source)


def _step_up(rules: Rules, request: AccessRequest, who: Identified, decision: Decision) -> Authorization | None:
    """A block a new sign-in can lift (an authentication strength, an authentication context): a
    browser session signs in again asking for it; a token gets a 401 saying what is missing
    (RFC 9470's ``insufficient_user_authentication``, Entra's ``insufficient_claims`` challenge)."""
    failure = _deciding_failure(decision)
    if failure is None or failure.control not in STEP_UP_CONTROLS:
        return None
    contexts = failure.step_up if failure.control == AUTHENTICATION_CONTEXT else ()
    claims = claims_request(contexts) if contexts else None
    acr_values = () if contexts else failure.step_up
    stepped = replace(decision, result=DecisionResult.unauthenticated,
                      status_code=302 if who.source == "browserSession" else 401)
    if who.source == "browserSession":
        return Authorization(request=request, decision=stepped, action=SignIn(max_age=0, acr_values=acr_values,
                                                                              claims=claims),
                             identity=who.identity, identity_source=who.source)
    host = rules.config.gateway_file.protected_hosts.get(request.host)
    parameters = discovery.challenge_parameters(host.challenge if host is not None else ChallengeSettings(),
                                                request.authority or request.host)
    extra = (("claims", base64.b64encode(claims.encode()).decode()),) if claims else \
        (("acr_values", " ".join(acr_values)),) if acr_values else ()
    error = "insufficient_claims" if contexts else "insufficient_user_authentication"
    return Authorization(request=request, decision=stepped, identity=who.identity, identity_source=who.source,
                         action=Unauthenticated(reason=failure.reason, presented=True, parameters=(*extra, *parameters),
                                                error=error))


def claims_request(contexts: tuple[str, ...]) -> str:
    """OIDC's claims request for Entra's authentication contexts, as Entra's own challenge words it."""
    acrs: dict[str, object] = {"essential": True, "value": contexts[0]} if len(contexts) == 1 else \
        {"essential": True, "values": list(contexts)}
    return json.dumps({"access_token": {"acrs": acrs}}, separators=(",", ":"))


def _deciding_failure(decision: Decision) -> ControlFailure | None:
    if decision.allowed or decision.failed_policy_id is None:
        return None
    failed = next((p for p in decision.policies if p.name == decision.failed_policy_id), None)
    return next((f for f in failed.failures if f.reason == decision.reason), None) if failed else None


def decided_before_identity(request: AccessRequest, resource: str | None) -> Decision:
    """A path no resource names is denied and a public resource allowed before any token is
    read: the same for anyone."""
    app_type = client_app_type(request, None)
    if resource is None:
        return Decision(result=DecisionResult.block, status_code=403,
                        error_code=ErrorCode.blocked_by_conditional_access, reason=NO_RESOURCE_REASON, resource=None,
                        client_app_type=app_type)
    return Decision(result=DecisionResult.allow, status_code=200, error_code=None, reason="public resource",
                    resource=resource, resources=(resource,), client_app_type=app_type)


def refused_before_policy(request: AccessRequest, status: int, reason: str) -> Decision:
    """A refusal no policy is asked about (400, 421, 503). A misdirected request has its own
    code: 53003 would claim a Conditional Access policy blocked it."""
    code = ErrorCode.misdirected_request if status == 421 else ErrorCode.internal_error if status == 500 \
        else ErrorCode.blocked_by_conditional_access
    return Decision(result=DecisionResult.block, status_code=status, error_code=code,
                    reason=reason, resource=None, client_app_type=client_app_type(request, None))


def decision_device_id(identity: Identity, request: AccessRequest) -> str | None:
    """The device a decision looks up and uses: the one the token (or session) names, except
    through the kiosk proxy, where every browser is unmanaged whatever its token says."""
    return None if request.kiosk_location is not None else identity.device_id


def access_token_in_query(target: str) -> bool:
    """RFC 6750's URI query parameter: never read (URLs end up in logs), and never forwarded for
    the upstream to read either, beside or instead of the token the gateway checked."""
    query = target.partition("?")[2]
    if "%" not in query and "access_token" not in query.lower():  # decoding could not make the name: no parse
        return False
    return any(name.lower() == "access_token" for name, _ in parse_qsl(query, keep_blank_values=True))


def _device_binding_problem(request: AccessRequest, device: DeviceSignals) -> str | None:
    """ActiveSync names its device in the URL: it must be the one registered for the token's device."""
    if not path_has_prefix(request.path, ACTIVESYNC_PATH):
        return None
    try:
        named = activesync_device_ids(request.target or "")
    except MalformedActiveSyncQuery as error:
        return f"ActiveSync query unreadable: {error}"
    if not named:
        return None
    registered = (device.device.eas_device_id or "").lower() if device.device else ""
    if named != {registered}:
        return "ActiveSync DeviceId is not the device the token was issued to"
    return None


def _upstream_headers(rules: Rules, request: AccessRequest, identity: Identity, decided: Decided, now: datetime,
                      assertions: AssertionSigner | None) -> tuple[tuple[str, str], ...]:
    """What the upstream may trust, because the gateway removed any client-sent copy first: the
    user, app and device the decision used, never a claim it ignored (a kiosk request names no
    device, whatever its token or session says), and the signed assertion when one is configured."""
    assertion = None
    if assertions is not None:  # signed for the upstream (its audience)
        upstream = rules.config.gateway_file.protected_hosts[request.host].upstream
        assertion = assertions.header, assertions.sign(
            audience=upstream, identity=identity, app=decided.app, device=decided.device,
            decision_id=request.correlation_id, now=now)
    app = decided.app
    values = (
        *headers.forwarding_headers(request.client_ip, request.host),
        (headers.CORRELATION_ID, request.correlation_id),
        (headers.USER, identity.user_principal_name or identity.subject),
        (headers.CLIENT_APP, app.name or app.client_id or ""),
        (headers.DEVICE_ID, decided.device.device_id or ""),
        *((assertion,) if assertion else ()),
    )
    return tuple((name, value) for name, value in values if value)
