"""Evaluate recorded requests again, under a baseline and a candidate config, with the decision
pipeline the gateway runs (``gateway.decision.pipeline.authorize``: canonical path, resource match,
identity, signals, the ActiveSync device binding, ``evaluate`` and session-control restrictions),
at the recorded time, with the recorded identity and signals as its sources.

Replay is analysis of recorded traffic, not authentication: a recorded bearer token is decoded
without checking its signature (the issuer's keys of that day may be gone), then held to the
config's pinned algorithms, issuer, the protected host's audiences and ``iat``/``nbf``/``exp`` at
the recorded time. Authentication outcomes the gateway recorded are kept: a request it answered 401
(a forged or expired token) stays unauthenticated under both configs.

Signals come from the decision log record when there is one (the device record with its
compliance state and threat level, the client address, the time); otherwise the device is looked
up in the inventory as it is now, and the report says how many requests that concerned. A kiosk
request has no device, whatever device its token names (as at the gateway).

A ``percentOfUsers`` share is drawn on the user's object id, which a pseudonymised record no
longer holds: for those users the cohort the gateway recorded decides (``recorded_cohorts``), and
the report counts the requests where that was an assumption or could not be worked out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jwt

from gateway.config import Config
from gateway.config.models import UsersCondition
from gateway.decision.log import Pseudonymizer
from gateway.decision.pipeline import Identified, Signals, authorize
from gateway.decision.rules import Rules
from gateway.decision.sources import certificate_device
from gateway.identity.issuers import ISSUER_NOT_ACCEPTED, accepted_audiences, issuer_of, tenant_problem
from gateway.identity.tokens import (
    MALFORMED,
    REQUIRED_CLAIMS,
    RejectedToken,
    bearer_token,
    claims_problem,
    claims_segment_problem,
    header_problem,
    identity_from_claims,
    unverified_header,
)
from gateway.policy.model import (
    AccessRequest,
    AppProtection,
    Decision,
    DecisionResult,
    DeviceSignals,
    Identity,
    ManagedDevice,
    PolicyResultKind,
    RolloutCohort,
    SessionControls,
)
from gateway.policy.rollout import user_key
from gateway.replay.recorded import RecordedDecision, RecordedInput, RecordedRequest, Skipped
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
class DecisionSummary:
    """A decision reduced to what the diff compares and shows."""

    result: DecisionResult
    status_code: int
    reason: str
    policy_id: str | None = None  # the enforced policy whose failure decided a block
    policy_name: str | None = None
    resource: str | None = None
    applied: tuple[str, ...] = ()

    @classmethod
    def of(cls, decision: Decision) -> DecisionSummary:
        return cls(result=decision.result, status_code=decision.status_code, reason=decision.reason,
                   policy_id=decision.failed_policy_id, policy_name=decision.failed_policy,
                   resource=decision.resource, applied=tuple(p.name for p in decision.policies if p.result in APPLIED))


@dataclass(frozen=True, slots=True, kw_only=True)
class Replayed:
    request: RecordedRequest
    baseline: DecisionSummary
    candidate: DecisionSummary
    user: str | None
    app: str | None
    current_inventory: bool  # the device came from today's inventory, not from the decision log
    unverified_token: bool  # a token nothing recorded as accepted by the gateway: its signature was never checked
    cohort_kept: tuple[str, ...] = ()  # rollouts whose recorded cohort was kept, assuming them unchanged
    cohort_unknown: tuple[str, ...] = ()  # rollouts whose cohort could not be recomputed (a pseudonymised user)

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
    summary: DecisionSummary
    identity: Identity | None
    app: str | None
    current_inventory: bool
    cohort_kept: frozenset[str] = frozenset()
    cohort_unknown: frozenset[str] = frozenset()


type Percents = Mapping[str, int]  # each rollout policy's percentOfUsers (0: none), by policy name


def rollout_percents(rules: Rules) -> Percents:
    return {c.rollout.policy_name: c.rollout.percent_of_users for c in rules.policy_set.by_name.values()
            if c.rollout is not None}


@dataclass(frozen=True, slots=True)
class RecordedCohorts:
    """The rollout cohorts of a pseudonymised user, from the decision record (by policy name)."""

    cohorts: dict[str, RolloutCohort]
    kept: frozenset[str]  # the recorded cohort, assuming the rollout is as it was (no config of the time given)
    unknown: frozenset[str]  # the record cannot tell: in the share only if the gateway recorded it so


def recorded_cohorts(rules: Rules, access: AccessRequest, identity: Identity, recorded: RecordedDecision | None,
                     recording: Percents | None) -> RecordedCohorts | None:
    """A share cannot be drawn from a pseudonym (the user id in the record is a keyed hash of the
    one it was drawn on): whether the user is in it comes from the cohort the gateway recorded.
    ``recording``: the rollout percentages of the config that wrote the log (the baseline), or
    None when replay does not have it (then the rollouts are assumed unchanged, and counted).
    None when the user is not pseudonymised: the share is drawn as the gateway draws it."""
    if not rules.policy_set.has_rollouts or not user_key(identity).startswith(Pseudonymizer.PREFIX):
        return None
    at_the_time = dict(recorded.cohorts) if recorded is not None else {}
    groups = frozenset(g.lower() for g in identity.groups)
    cohorts: dict[str, RolloutCohort] = {}
    kept: set[str] = set()
    unknown: set[str] = set()
    for compiled in rules.policy_set.by_name.values():
        rollout = compiled.rollout
        if rollout is None or not 0 < rollout.percent_of_users < 100 or not rollout.groups.isdisjoint(groups):
            continue  # no share, a share of everyone, or in the cohort by group: worked out as the gateway does
        name, percent = rollout.policy_name, rollout.percent_of_users
        cohort = at_the_time.get(name)
        then = (percent if cohort is not None else None) if recording is None else recording.get(name)
        share = share_from_record(cohort, then, percent)
        if share is None:
            unknown.add(name)
            share = cohort is RolloutCohort.percent_of_users
        elif recording is None:
            kept.add(name)
        cohorts[name] = rollout.cohort(access, identity, groups, share=share)
    return RecordedCohorts(cohorts, frozenset(kept), frozenset(unknown))


def share_from_record(cohort: RolloutCohort | None, percent_then: int | None, percent: int) -> bool | None:
    """Whether the user is in a ``percent`` share, from the cohort recorded when the share was
    ``percent_then``; None when that cannot tell. A share only grows with its percentage: in a
    share then, in any larger one; outside it then, outside any smaller one."""
    if cohort is None or not percent_then:
        return None
    if cohort is RolloutCohort.percent_of_users:
        return True if percent >= percent_then else None
    if cohort in (RolloutCohort.outside, RolloutCohort.listener):  # the share is tested before the listener
        return False if percent <= percent_then else None
    return None  # in the cohort by group then: the share was not looked at


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
    if unverified_header(token) is None:
        return RejectedToken(MALFORMED)
    problem = claims_segment_problem(token)  # claims with two readings: refused by either config
    if problem is not None:
        return RejectedToken(problem)
    try:
        decoded = jwt.decode_complete(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return RejectedToken("malformed token")
    return decoded["header"], decoded["payload"]


def token_identity(config: Config, host: str, claims: tuple[dict[str, Any], dict[str, Any]],
                   at: datetime) -> Identity | RejectedToken:
    """The checks ``BearerValidator`` makes (pyjwt's, in pyjwt's order, with the same reasons),
    but the signature, at the recorded time."""
    header, payload = claims
    identity = config.gateway_file.identity
    trusted = issuer_of(identity.trusted, payload.get("iss"))
    algorithms = {a.value for entry in ([trusted] if trusted else identity.trusted) for a in entry.algorithms}
    problem = header_problem(header, algorithms) or (ISSUER_NOT_ACCEPTED if trusted is None else None) \
        or _missing_claim(payload) or _time_problem(payload, at.timestamp(), identity.clock_skew_seconds)
    if problem is not None:
        return RejectedToken(problem)
    assert trusted is not None  # refused above
    audiences = accepted_audiences(trusted, frozenset(config.gateway_file.protected_hosts[host].audiences))
    problem = _audience_problem(payload["aud"], audiences) \
        or (MALFORMED if not isinstance(payload["sub"], str) else None) \
        or claims_problem(payload, access_token=True) or tenant_problem(trusted, payload)
    if problem is not None:
        return RejectedToken(problem)
    return identity_from_claims(payload, audiences, trusted)


def _missing_claim(payload: dict[str, Any]) -> str | None:
    missing = next((c for c in REQUIRED_CLAIMS if payload.get(c) is None), None)
    return None if missing is None else f"token has no {missing!r} claim"


def _time_problem(payload: dict[str, Any], now: float, leeway: float) -> str | None:
    """pyjwt's checks of ``iat``, ``nbf`` and ``exp``, in its order."""
    for claim in ("iat", "nbf", "exp"):
        if claim not in payload:
            continue
        moment = _whole_seconds(payload[claim])
        if moment is None:
            return "malformed token"
        if claim == "exp" and moment <= now - leeway:
            return "token expired"
        if claim != "exp" and moment > now + leeway:
            return "token not yet valid"
    return None


def _audience_problem(aud: object, audiences: frozenset[str]) -> str | None:
    """pyjwt's: a non-empty string or list of strings, one of them accepted for the host."""
    if not aud:
        return "token has no 'aud' claim"
    named = [aud] if isinstance(aud, str) else aud
    if not isinstance(named, list) or any(not isinstance(a, str) for a in named) or audiences.isdisjoint(named):
        return "token audience not accepted for this host"
    return None


def _whole_seconds(value: object) -> int | None:
    """A time claim as pyjwt reads it (``int()`` of it), or None where pyjwt calls it malformed."""
    if not isinstance(value, str | int | float):
        return None  # null, an array or an object: int() refuses them too
    try:
        return int(value)
    except (ValueError, OverflowError):  # "soon", NaN, infinity
        return None


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


class _Unreplayable(Exception):
    """Why a request cannot be replayed: nothing recorded says who made it."""


class RecordedIdentity:
    """Replay's identity stage: the recorded token, held to this config's rules at the recorded
    time, or the identity its decision record kept (``recorded_identity``)."""

    def __init__(self, config: Config, request: RecordedRequest, claims: Claims) -> None:
        self._config, self._request, self._claims = config, request, claims

    async def identify(self, rules: Rules, access: AccessRequest) -> Identified | RejectedToken:
        identity = recorded_identity(self._config, self._request, self._claims)
        if isinstance(identity, str):
            raise _Unreplayable(identity)
        return identity if isinstance(identity, RejectedToken) else Identified(identity)

    def sign_in_again(self, controls: SessionControls, now: datetime) -> bool:
        return False  # a recorded session's age is not known: its recorded decision stands for it


class RecordedSignals:
    """Replay's signals stage: the recorded device (else today's inventory: ``current``), the
    ActiveSync binding's outcome as recorded, and a pseudonymised user's recorded cohorts (``known``)."""

    def __init__(self, request: RecordedRequest, devices: Devices, kiosk_location: str | None,
                 recording: Percents | None) -> None:
        self._request, self._devices, self._kiosk_location, self._recording = request, devices, kiosk_location, \
            recording
        self.current = False
        self.known: RecordedCohorts | None = None

    @property
    def name(self) -> str:
        return self._devices.inventory.name

    async def signals(self, rules: Rules, access: AccessRequest, identity: Identity) -> Signals:
        device, self.current = await _device(rules, self._request, identity, self._devices, self._kiosk_location)
        given = self._request.evaluation_input  # the binding was checked against the device of the time: as recorded
        self.known = recorded_cohorts(rules, access, identity, self._request.recorded, self._recording)
        certificate_device, problem = await self._certificate_device(access)
        return Signals(device=device, check_binding=given is None or self.current,
                       binding_problem=given.binding_problem if given else None,
                       cohorts=self.known.cohorts if self.known else None,
                       certificate_device_id=certificate_device, certificate_problem=problem,
                       app_protection=_app_protection(rules, given))

    async def _certificate_device(self, access: AccessRequest) -> tuple[str | None, str | None]:
        """The device the recorded certificate named, as recorded; else as today's inventory finds it."""
        given = self._request.evaluation_input
        if given is not None and given.certificate_device_id is not None:
            return given.certificate_device_id, None
        return await certificate_device(self._devices.inventory, access.device_certificate)


def _app_protection(rules: Rules, given: RecordedInput | None) -> AppProtection | None:
    """The registrations recorded, checked against the replayed rules' sync window; none recorded
    (no policy asked for them then): the app had none, as far as replay can tell."""
    if not rules.policy_set.uses_app_protection:
        return None
    recorded = given.app_protection if given is not None else None
    if recorded is None:
        return AppProtection(registrations=(), source="not recorded", max_sync_age=rules.app_sync_age)
    return dataclasses.replace(recorded, max_sync_age=rules.app_sync_age)


async def decide(side: Side, request: RecordedRequest, claims: Claims, devices: Devices, default_ip: str,
                 recording: Percents | None = None) -> Evaluated | str:
    """What the gateway's pipeline decides for this request under ``side``'s rules, with the
    recorded identity and signals. ``recording``: the rollout percentages of the config that wrote
    the decision log, when replay has it."""
    rules, config = side.rules, side.config
    if request.host not in config.gateway_file.protected_hosts:  # the gateway's routing answers it first
        return _refused(421, "this gateway does not serve that host")
    kiosk_location = _kiosk_location(config, request)
    access = AccessRequest(correlation_id=request.correlation_id or request.place, host=request.host,
                           path=request.target, method=request.method, client_ip=request.client_ip or default_ip,
                           user_agent=request.user_agent, accepts_html=request.accepts_html,
                           content_type=request.content_type, content_length=request.content_length,
                           chunked=request.chunked, kiosk_location=kiosk_location, forward_auth=request.forward_auth,
                           device_certificate=request.device_certificate if kiosk_location is None else None)
    signals = RecordedSignals(request, devices, kiosk_location, recording)
    try:
        result = await authorize(access, rules=rules, identity=RecordedIdentity(config, request, claims),
                                 signals=signals, now=request.time)
    except _Unreplayable as why:
        return str(why)
    summary = DecisionSummary.of(result.decision)
    if result.identity is None or result.app is None:  # decided before identity, or unauthenticated
        return Evaluated(summary, None, None, False)
    label = result.app.name or result.app.client_id
    known = signals.known
    if known is None:
        return Evaluated(summary, result.identity, label, signals.current)
    applied = {p.name for p in result.decision.policies if p.result in APPLIED}  # where the cohort decided
    return Evaluated(summary, result.identity, label, signals.current, known.kept & applied, known.unknown & applied)


async def _device(rules: Rules, request: RecordedRequest, identity: Identity, devices: Devices,
                  kiosk_location: str | None) -> tuple[DeviceSignals, bool]:
    """The recorded device when the decision log has it, else today's inventory (second value True)."""
    if kiosk_location is not None:  # a kiosk is unmanaged, whatever device its token names (as at the gateway)
        return DeviceSignals(device_id=None, device=None, source="none", compliance=rules.compliance), False
    given = request.evaluation_input
    if given is not None and given.certificate_device_id is not None:  # a certificate beat the claim: its device
        return DeviceSignals(device_id=given.certificate_device_id, device=given.device, source="decision log",
                             compliance=rules.compliance), False
    if given is not None and given.identity.device_id == identity.device_id:
        return DeviceSignals(device_id=given.device_id, device=given.device, source="decision log",
                             compliance=rules.compliance), False
    if identity.device_id is None:
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
    return Evaluated(DecisionSummary(result=DecisionResult.block, status_code=status, reason=reason), None, None, False)


def recorded_summary(request: RecordedRequest) -> DecisionSummary | str:
    recorded = request.recorded
    if recorded is None:
        return NO_RECORDED_DECISION
    if recorded.status_code == 503:
        return UNAVAILABLE
    return DecisionSummary(result=recorded.result, status_code=recorded.status_code, reason=recorded.reason,
                           policy_id=recorded.policy_id, policy_name=recorded.policy_name, resource=recorded.resource,
                           applied=recorded.applied)


async def replay(requests: Sequence[RecordedRequest], *, baseline: Side | None, candidate: Side,
                 inventory: DeviceInventory, default_ip: str,
                 advance: Callable[[], object] = lambda: None) -> tuple[list[Replayed], list[Skipped]]:
    """Each request under the baseline (``None``: the decisions recorded in the decision log)
    and the candidate."""
    devices = Devices(inventory)
    recording = rollout_percents(baseline.rules) if baseline is not None else None  # the config that wrote the log
    replayed: list[Replayed] = []
    skipped: list[Skipped] = []
    decoded: dict[tuple[str, ...], Claims] = {}  # a client sends one token many times
    for request in requests:
        advance()
        if request.authorization not in decoded:
            decoded[request.authorization] = token_claims(request)
        outcome = await _replay_one(request, decoded[request.authorization], baseline, candidate, devices,
                                    default_ip, recording)
        if isinstance(outcome, Skipped):
            skipped.append(outcome)
        else:
            replayed.append(outcome)
    return replayed, skipped


async def _replay_one(request: RecordedRequest, claims: Claims, baseline: Side | None, candidate: Side,
                      devices: Devices, default_ip: str, recording: Percents | None) -> Replayed | Skipped:
    if request.recorded is not None and request.recorded.status_code == 503 and not request.authorization:
        return Skipped(request.place, UNAVAILABLE)
    before = recorded_summary(request) if baseline is None else await decide(baseline, request, claims, devices,
                                                                              default_ip, recording)
    after = await decide(candidate, request, claims, devices, default_ip, recording)
    if isinstance(before, str) or isinstance(after, str):
        return Skipped(request.place, before if isinstance(before, str) else str(after))
    sides = [after] if isinstance(before, DecisionSummary) else [after, before]
    identity = next((side.identity for side in sides if side.identity is not None), None)
    recorded = request.recorded
    return Replayed(
        request=request, baseline=before if isinstance(before, DecisionSummary) else before.summary,
        candidate=after.summary,
        user=(identity.user_principal_name or identity.subject) if identity else recorded.user if recorded else None,
        app=next((side.app for side in sides if side.app), recorded.app if recorded else None),
        current_inventory=any(side.current_inventory for side in sides),
        unverified_token=isinstance(claims, tuple) and request.authenticated is None,
        cohort_kept=tuple(sorted(frozenset().union(*(side.cohort_kept for side in sides)))),
        cohort_unknown=tuple(sorted(frozenset().union(*(side.cohort_unknown for side in sides)))))
