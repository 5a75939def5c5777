"""Evaluate recorded requests again, under a baseline and a candidate config, with the decision
path the gateway runs (host, canonical path, resource match, identity, ActiveSync device binding,
``evaluate``, session-control restrictions), at the recorded time.

Replay is analysis of recorded traffic, not authentication: a recorded bearer token is decoded
without checking its signature (the issuer's keys of that day may be gone), then held to the
config's pinned algorithms, issuer, the protected host's audiences and ``exp``/``nbf`` at the
recorded time. Authentication outcomes the gateway recorded are kept: a request it answered 401
(a forged or expired token) stays unauthenticated under both configs.

Signals come from the decision log record when there is one (the device record with its
compliance state and threat level, the client address, the time); otherwise the device is looked
up in the inventory as it is now, and the report says how many requests that concerned.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import jwt

from gateway.access import Rules, _device_binding_problem
from gateway.audit import Pseudonymizer
from gateway.config import Config
from gateway.config.models import UsersCondition
from gateway.identity.tokens import REQUIRED_CLAIMS, RejectedToken, bearer_token, identity_from_claims
from gateway.paths import canonical_path
from gateway.policy.evaluate import NO_RESOURCE_REASON, evaluate
from gateway.policy.model import (
    AccessRequest,
    Decision,
    DecisionResult,
    DeviceSignals,
    Identity,
    ManagedDevice,
    PolicyResultKind,
)
from gateway.replay.recorded import RecordedRequest, Skipped
from gateway.session_controls import request_restriction
from gateway.signals.devices import DeviceInventory

APPLIED = frozenset({PolicyResultKind.success, PolicyResultKind.failure, PolicyResultKind.report_only_success,
                     PolicyResultKind.report_only_failure})
SESSION_ONLY = ("a browser session: the recording holds no token (add the decision log to the sources to "
                "replay it with the identity recorded there)")
NO_RECORDED_DECISION = ("no recorded decision to compare with (add the decision log to the sources, or pass "
                        "--baseline DIR to evaluate the baseline too)")
UNAVAILABLE = "a signal source was unavailable when it was recorded (503): no decision to replay"
NO_INPUT = ("its decision log record has no identity (no evaluationInput) and no flow or HAR entry carries its "
            "token")


@dataclass(frozen=True, slots=True)
class Side:
    """One config to evaluate under."""

    label: str
    rules: Rules

    @classmethod
    def of(cls, label: str, config: Config, pseudonymizer: Pseudonymizer | None = None) -> Side:
        return cls(label, Rules.of(with_pseudonyms(config, pseudonymizer) if pseudonymizer else config))

    @property
    def config(self) -> Config:
        return self.rules.config


def with_pseudonyms(config: Config, pseudonymizer: Pseudonymizer) -> Config:
    """Each user a policy names also under its pseudonym, so that decision log records written
    with ``pseudonymizeUsers`` match the same policies as the names in tokens do."""

    def users(condition: UsersCondition) -> UsersCondition:
        def keyed(names: list[str]) -> list[str]:
            return [*names, *(pseudonymizer.pseudonym(n) for n in names if n.lower() not in ("all", "none"))]
        return condition.model_copy(update={"include_users": keyed(condition.include_users),
                                            "exclude_users": keyed(condition.exclude_users)})

    policies = tuple(p.model_copy(update={"conditions": p.conditions.model_copy(
        update={"users": users(p.conditions.users)})}) for p in config.policies)
    return dataclasses.replace(config, policies=policies)


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """A decision reduced to what the diff compares and shows."""

    result: DecisionResult
    status_code: int
    reason: str
    policy_id: str | None = None  # the enforced policy whose failure decided a block
    policy_name: str | None = None
    resource: str | None = None
    applied: tuple[str, ...] = ()

    @classmethod
    def of(cls, decision: Decision) -> Verdict:
        return cls(result=decision.result, status_code=decision.status_code, reason=decision.reason,
                   policy_id=decision.failed_policy_id, policy_name=decision.failed_policy,
                   resource=decision.resource, applied=tuple(p.name for p in decision.policies if p.result in APPLIED))


@dataclass(frozen=True, slots=True, kw_only=True)
class Replayed:
    request: RecordedRequest
    baseline: Verdict
    candidate: Verdict
    user: str | None
    app: str | None
    current_inventory: bool  # the device came from today's inventory, not from the decision log
    unverified_token: bool  # a token nothing recorded as accepted by the gateway: its signature was never checked

    @property
    def change(self) -> str | None:
        """``allow→block``, ``block→allow``, other result changes, or None when the result held."""
        if self.baseline.result is self.candidate.result:
            return None
        return f"{self.baseline.result.value}→{self.candidate.result.value}"

    @property
    def other_reason(self) -> bool:
        """Still blocked, but by another policy or for another reason."""
        before, after = self.baseline, self.candidate
        return (self.change is None and before.result is DecisionResult.block
                and (before.policy_id, before.reason) != (after.policy_id, after.reason))


@dataclass(frozen=True, slots=True)
class Evaluated:
    verdict: Verdict
    identity: Identity | None
    app: str | None
    current_inventory: bool


class Devices:
    """Device lookups in today's inventory, once per device id."""

    def __init__(self, inventory: DeviceInventory) -> None:
        self.inventory = inventory
        self._known: dict[str, ManagedDevice | None] = {}

    async def get(self, device_id: str) -> ManagedDevice | None:
        if device_id not in self._known:
            self._known[device_id] = await self.inventory.managed_device(device_id)
        return self._known[device_id]


type Claims = tuple[dict[str, Any], dict[str, Any]] | RejectedToken | None


def token_claims(request: RecordedRequest) -> Claims:
    """Header and claims of the request's bearer token, unverified; None when it sent none."""
    if not request.authorization:
        return None
    token = bearer_token(list(request.authorization))
    if isinstance(token, RejectedToken):
        return token
    try:
        decoded = jwt.decode_complete(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return RejectedToken("malformed token")
    return decoded["header"], decoded["payload"]


def token_identity(config: Config, host: str, claims: tuple[dict[str, Any], dict[str, Any]],
                   at: datetime) -> Identity | RejectedToken:
    """The checks ``BearerValidator`` makes, but the signature, at the recorded time."""
    header, payload = claims
    identity = config.gateway_file.identity
    if header.get("alg") not in {a.value for a in identity.algorithms}:
        return RejectedToken("signing algorithm not allowed")
    missing = next((c for c in REQUIRED_CLAIMS if c not in payload), None)
    if missing is not None:
        return RejectedToken(f"token has no {missing!r} claim")
    if payload["iss"] != identity.issuer:
        return RejectedToken("token issuer not accepted")
    audiences = frozenset(config.gateway_file.protected_hosts[host].audiences)
    aud = payload["aud"]
    if not audiences & ({aud} if isinstance(aud, str) else set(aud) if isinstance(aud, list) else set()):
        return RejectedToken("token audience not accepted for this host")
    now, leeway, exp, nbf = at.timestamp(), identity.clock_skew_seconds, payload["exp"], payload.get("nbf")
    if not isinstance(exp, int | float) or (nbf is not None and not isinstance(nbf, int | float)):
        return RejectedToken("malformed token")
    if now > exp + leeway:
        return RejectedToken("token expired")
    if nbf is not None and now < nbf - leeway:
        return RejectedToken("token not yet valid")
    return identity_from_claims(payload, audiences)


def recorded_identity(config: Config, request: RecordedRequest, claims: Claims) -> Identity | RejectedToken | str:
    """Who made the request under this config; a ``str`` is why it cannot be replayed."""
    if request.authenticated is False:
        reason = request.recorded.reason if request.recorded else "unauthenticated"
        return RejectedToken(f"{reason} (as recorded)")
    if isinstance(claims, RejectedToken):
        return claims
    if claims is not None:
        return token_identity(config, request.host, claims, request.time)
    given = request.evaluation_input
    if given is not None:
        audiences = frozenset(config.gateway_file.protected_hosts[request.host].audiences)
        if given.identity.audience not in audiences:
            return RejectedToken("token audience not accepted for this host")
        return given.identity
    if request.recorded is not None:
        return NO_INPUT
    if request.session_cookie or request.authenticated:
        return SESSION_ONLY
    return RejectedToken("no bearer token")


async def decide(side: Side, request: RecordedRequest, claims: Claims, devices: Devices,
                 default_ip: str) -> Evaluated | str:
    """What ``AccessService`` would decide for this request under ``side``'s rules."""
    rules, config = side.rules, side.config
    kiosk_location = _kiosk_location(config, request)
    access = AccessRequest(correlation_id=request.correlation_id or request.place, host=request.host,
                           path=request.target, method=request.method, client_ip=request.client_ip or default_ip,
                           user_agent=request.user_agent, accepts_html=request.accepts_html,
                           content_type=request.content_type, content_length=request.content_length,
                           chunked=request.chunked, kiosk_location=kiosk_location)
    if request.host not in config.gateway_file.protected_hosts:
        return _refused(421, "this gateway does not serve that host")
    path = canonical_path(request.target)
    if path is None:
        return _refused(400, "ambiguous request path")
    access = replace(access, path=path, target=request.target)
    found = rules.policy_set.match(request.host, path)
    if found is None:
        return _refused(403, NO_RESOURCE_REASON)
    if found.public:
        return Evaluated(Verdict(result=DecisionResult.allow, status_code=200, reason="public resource",
                                 resource=found.primary), None, None, False)
    identity = recorded_identity(config, request, claims)
    if isinstance(identity, str):
        return identity
    if isinstance(identity, RejectedToken):
        return Evaluated(Verdict(result=DecisionResult.unauthenticated, status_code=401, reason=identity.reason),
                         None, None, False)
    device, current = await _device(rules, request, identity, devices, kiosk_location)
    app = rules.app(identity)
    label = app.name or app.client_id
    mismatch = (_device_binding_problem(access, found.names, device) if request.query_recorded
                else request.evaluation_input.binding_problem if request.evaluation_input else None)
    if mismatch is not None:
        return Evaluated(Verdict(result=DecisionResult.block, status_code=403, reason=mismatch), identity, label,
                         current)
    decision = evaluate(request=access, identity=identity, device=device, app=app, resources=found.names,
                        policy_set=rules.policy_set, now=request.time)
    restriction = decision.allowed and request_restriction(
        decision.session_controls, method=access.method, content_type=access.content_type,
        content_length=access.content_length, chunked=access.chunked, resources=found.names,
        download_resources=rules.policy_set.download_resources)
    if restriction:
        decision = replace(decision, result=DecisionResult.block, status_code=403, reason=restriction)
    return Evaluated(Verdict.of(decision), identity, label, current)


async def _device(rules: Rules, request: RecordedRequest, identity: Identity, devices: Devices,
                  kiosk_location: str | None) -> tuple[DeviceSignals, bool]:
    """The recorded device when the decision log has it, else today's inventory (second value True)."""
    given = request.evaluation_input
    if given is not None and given.identity.device_id == identity.device_id:
        return DeviceSignals(device_id=given.device_id, device=given.device, source="decision log",
                             compliance=rules.compliance), False
    if identity.device_id is None or kiosk_location is not None:  # a kiosk is unmanaged
        return DeviceSignals(device_id=None, device=None, source="none", compliance=rules.compliance), False
    device = await devices.get(identity.device_id)
    return DeviceSignals(device_id=identity.device_id, device=device, source=devices.inventory.name,
                         compliance=rules.compliance), True


def _kiosk_location(config: Config, request: RecordedRequest) -> str | None:
    """Kiosk requests are in the kiosk location this config names (or the one recorded)."""
    if not request.kiosk:
        return None
    kiosk = config.gateway_file.kiosk
    recorded = request.evaluation_input.kiosk_location if request.evaluation_input else None
    return kiosk.location if kiosk is not None else recorded


def _refused(status: int, reason: str) -> Evaluated:
    """Answers before policy (unknown host, ambiguous path, no resource): the same for anyone."""
    return Evaluated(Verdict(result=DecisionResult.block, status_code=status, reason=reason), None, None, False)


def recorded_verdict(request: RecordedRequest) -> Verdict | str:
    recorded = request.recorded
    if recorded is None:
        return NO_RECORDED_DECISION
    if recorded.status_code == 503:
        return UNAVAILABLE
    return Verdict(result=recorded.result, status_code=recorded.status_code, reason=recorded.reason,
                   policy_id=recorded.policy_id, policy_name=recorded.policy_name, resource=recorded.resource,
                   applied=recorded.applied)


async def replay(requests: Sequence[RecordedRequest], *, baseline: Side | None, candidate: Side,
                 inventory: DeviceInventory, default_ip: str,
                 advance: Callable[[], object] = lambda: None) -> tuple[list[Replayed], list[Skipped]]:
    """Each request under the baseline (``None``: the decisions recorded in the decision log)
    and the candidate."""
    devices = Devices(inventory)
    replayed: list[Replayed] = []
    skipped: list[Skipped] = []
    decoded: dict[tuple[str, ...], Claims] = {}  # a client sends one token many times
    for request in requests:
        advance()
        if request.authorization not in decoded:
            decoded[request.authorization] = token_claims(request)
        outcome = await _replay_one(request, decoded[request.authorization], baseline, candidate, devices,
                                    default_ip)
        if isinstance(outcome, Skipped):
            skipped.append(outcome)
        else:
            replayed.append(outcome)
    return replayed, skipped


async def _replay_one(request: RecordedRequest, claims: Claims, baseline: Side | None, candidate: Side,
                      devices: Devices, default_ip: str) -> Replayed | Skipped:
    if request.recorded is not None and request.recorded.status_code == 503 and not request.authorization:
        return Skipped(request.place, UNAVAILABLE)
    before = recorded_verdict(request) if baseline is None else await decide(baseline, request, claims, devices,
                                                                              default_ip)
    after = await decide(candidate, request, claims, devices, default_ip)
    if isinstance(before, str) or isinstance(after, str):
        return Skipped(request.place, before if isinstance(before, str) else str(after))
    sides = [after] if isinstance(before, Verdict) else [after, before]
    identity = next((side.identity for side in sides if side.identity is not None), None)
    recorded = request.recorded
    return Replayed(
        request=request, baseline=before if isinstance(before, Verdict) else before.verdict, candidate=after.verdict,
        user=(identity.user_principal_name or identity.subject) if identity else recorded.user if recorded else None,
        app=next((side.app for side in sides if side.app), recorded.app if recorded else None),
        current_inventory=any(side.current_inventory for side in sides),
        unverified_token=isinstance(claims, tuple) and request.authenticated is None)
