"""The access service: one request in, one outcome out (forward with these headers, or answer).

All I/O around the pure ``evaluate`` happens here: token validation, the device lookup and the
decision log. A signal source that cannot answer makes the outcome a 503, never a forward.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

from gateway import headers
from gateway.audit import REDECIDED, DecisionLog, sign_in_record
from gateway.config import Config
from gateway.config.compile import compile_policies
from gateway.config.models import ChallengeSettings
from gateway.counted_log import CountedLog
from gateway.errors import SignalUnavailable
from gateway.events import ALL_DEVICES, RULES_RELOADED, AllDevicesChanged, ChangeEvent, ChangeListener, DevicesChanged
from gateway.identity import discovery
from gateway.identity.assertion import AssertionSigner
from gateway.identity.browser import (
    BrowserSession,
    BrowserSignIn,
    SignInFailed,
    cleared_cookie,
    cookie_value,
    hostname_of,
)
from gateway.identity.tokens import BearerValidator, RejectedToken, bearer_token
from gateway.metrics import GatewayMetrics
from gateway.paths import canonical_path
from gateway.policy.conditions import ACTIVESYNC_PATH, client_app_type, path_has_prefix, request_locations
from gateway.policy.evaluate import NO_RESOURCE_REASON, evaluate
from gateway.policy.model import (
    NO_SESSION_CONTROLS,
    AccessRequest,
    ClientApp,
    ClientAppType,
    ComplianceSettings,
    Decision,
    DecisionResult,
    DeviceSignals,
    ErrorCode,
    Identity,
    Restriction,
    RolloutCohort,
    SessionControls,
)
from gateway.policy.policy_set import PolicySet
from gateway.session_controls import REASONS, request_restriction, response_restriction
from gateway.signals.activesync import MalformedActiveSyncQuery, activesync_device_ids
from gateway.signals.cache import CachedInventory
from gateway.signals.mtd import Verdict
from gateway.signals.sqlite_store import SqliteDeviceStore
from gateway.signals.store import DeviceStore
from gateway.web import pages

logger = logging.getLogger(__name__)

type Clock = Callable[[], datetime]


# Requests refused because a source is down, logged through ``CountedLog`` (the counts end each line).
SESSION_STORE_DOWN = "[%s] session store unavailable, blocking: %s (%d such refusals since the last line, %d in all)"
SIGNAL_DOWN = "[%s] signal unavailable, blocking: %s (%d such refusals since the last line, %d in all)"
SIGN_IN_STORE_DOWN = "[%s] cannot start a sign-in: %s (%d such refusals since the last line, %d in all)"


def new_correlation_id() -> str:
    return str(uuid.uuid4())


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Outcome:
    """Either forward (``response`` is None) with ``upstream_headers`` set, or answer ``response``.
    ``device_id`` names the device an allowed request depends on, for continuous evaluation.
    ``record`` is the decision's log record: ``authorize`` writes it at once when the gateway
    answers itself; a forwarded request's is written by ``record_answer`` once the client's answer
    is known (``httpStatus`` is what the client got)."""

    decision: Decision
    response: pages.GatewayResponse | None
    record: dict[str, Any]
    upstream_headers: tuple[tuple[str, str], ...] = ()
    device_id: str | None = None
    session_controls: SessionControls = NO_SESSION_CONTROLS

    @property
    def forward(self) -> bool:
        return self.response is None


@dataclass(frozen=True, slots=True)
class Rules:
    """Everything a decision reads from the config, built once per (re)load and swapped whole: a
    request takes the rules in force when it starts and finishes under them."""

    config: Config
    policy_set: PolicySet
    app_names: dict[str, str]
    compliance: ComplianceSettings

    @classmethod
    def of(cls, config: Config) -> Rules:
        return cls(config, compile_policies(config),
                   config.app_names_by_client_id(), config.gateway_file.device_signals.compliance.settings())

    def app(self, identity: Identity) -> ClientApp:
        return ClientApp(client_id=identity.client_id, name=self.app_names.get(identity.client_id or ""))

    def locations(self, request: AccessRequest) -> set[str]:
        """The named locations the request is in, as policy saw them (for the decision log's signals)."""
        return request_locations(request, self.policy_set.named_locations)[0]


class AccessService:
    def __init__(
        self,
        config: Config,
        *,
        validator: BearerValidator,
        inventory: CachedInventory,
        decision_log: DecisionLog,
        clock: Clock = utc_now,
        store: DeviceStore | None = None,
        browser: BrowserSignIn | None = None,
        metrics: GatewayMetrics | None = None,
        assertions: AssertionSigner | None = None,
    ) -> None:
        self.rules = Rules.of(config)
        self.metrics = metrics or GatewayMetrics()
        self.assertions = assertions  # signs the identity assertion of each forwarded request
        self.browser = browser
        self.store = store
        self._listeners: list[ChangeListener] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._polled = store if isinstance(store, SqliteDeviceStore) else None  # Redis announces its changes instead
        self.shared_feed_up: bool | None = None  # with shared state: is its change feed up (None: no feed)
        self.draining = False  # SIGTERM: finishing what is in flight; readiness fails so balancers move on
        self._seen_change = self._polled.last_change() if self._polled is not None else 0
        self._data_version = self._polled.data_version() if self._polled is not None else 0
        self.validator = validator
        self.inventory = inventory
        self.decision_log = decision_log
        self._clock = clock
        # a source that is down refuses every request: each refusal is in the decision log, the
        # process log gets counted lines (a line per request was hundreds a second)
        self.unavailable_log = CountedLog(logger, logging.ERROR)

    @property
    def config(self) -> Config:
        return self.rules.config

    @property
    def policy_set(self) -> PolicySet:
        return self.rules.policy_set

    def apply(self, rules: Rules) -> None:
        """Swap the rules (a validated reload): one assignment, so no request sees half of each.
        Requests in flight finish under the rules they started with; those still open after a
        short grace (an ActiveSync Ping lasts up to an hour) are decided again under the new rules,
        as after a device change: a tightening reload closes them."""
        self.rules = rules
        self._tell(RULES_RELOADED)

    def close(self) -> None:
        self.decision_log.close()

    def _counted(self, record: dict[str, Any], decision: Decision, app_name: str | None = None) -> dict[str, Any]:
        """Every decision is counted exactly once, here, when it is made; its record is written
        once, by ``authorize``, ``refuse``, ``decide_again`` or ``record_answer``."""
        self.metrics.record_decision(decision, app_name)
        return record

    def record_answer(self, record: dict[str, Any], http_status: int | None, upstream_status: int | None,
                      restriction: Restriction | None = None) -> None:
        """Write a forwarded request's record once the client's answer is known: ``http_status`` is
        what the client got (None: no answer, because the client hung up or its connection was
        closed), ``upstream_status`` the upstream's (None: it failed, or was never asked), and
        ``restriction`` a session control that replaced the upstream's answer (``blockDownloads``)."""
        record["httpStatus"] = http_status
        record["upstreamStatus"] = upstream_status
        if restriction is not None:
            record["restriction"] = restriction.value
        self.decision_log.write(record)

    def subscribe(self, listener: ChangeListener) -> None:
        """``listener(event)`` is called, in the event loop, on every change (``gateway.events``)."""
        self._listeners.append(listener)

    def _tell(self, event: ChangeEvent) -> None:
        for listener in self._listeners:
            listener(event)

    def _devices_changed(self, device_ids: Iterable[str]) -> None:
        """Continuous access evaluation: forget cached signals, tell listeners (open flows). Only
        the store's feed calls it (``pick_up_changes``, ``shared_devices_changed``): one source."""
        event = DevicesChanged.of(device_ids)
        self.inventory.invalidate(event.device_ids)
        self._tell(event)

    def _all_devices_changed(self) -> None:
        self.inventory.invalidate_all()
        self._tell(ALL_DEVICES)

    def shared_devices_changed(self, event: DevicesChanged | AllDevicesChanged) -> None:
        """A change announced over the shared state's feed, by any process or host (this one too)."""
        if isinstance(event, DevicesChanged):
            self._devices_changed(event.device_ids)
        else:
            self._all_devices_changed()

    def shared_feed_lost(self) -> None:
        """The feed is down: a change could be missed, so no cached device is trusted as fresh."""
        self.shared_feed_up = False
        self.inventory.feed_lost()

    def shared_feed_restored(self) -> None:
        """The feed is (back) up: changes made while it was down were not heard of, so forget
        every cached device and decide the open flows again."""
        self.shared_feed_up = True
        self.inventory.feed_restored()
        self._tell(ALL_DEVICES)

    def record_threat_verdicts(self, partner: str, verdicts: list[Verdict], now: datetime) -> list[str]:
        """Store an MTD partner's verdicts (blocking: run it in a thread); returns unknown device ids."""
        if self.store is None:
            raise SignalUnavailable("MTD verdicts need a device store (deviceSignals.database or state)")
        try:
            changed, unknown = self.store.apply_verdicts(partner, [(v.device_id, v.level) for v in verdicts],
                                                         now=now)
        except sqlite3.Error as error:
            raise SignalUnavailable(f"device inventory: {error}") from error
        if changed:
            self._loop_call(self._wrote, changed)
        return unknown

    def _wrote(self, device_ids: set[str]) -> None:
        """This process changed these devices. Its listeners hear of it through the store's feed, as
        every other process does, and only so (heard directly too, each change was heard twice):
        the SQLite change log is read now (the poll then finds nothing new); Redis's channel brings
        it in a moment, and meanwhile the cache forgets the devices so the next request reads them."""
        if self._polled is not None:
            self._poll()
        else:
            self.inventory.invalidate(device_ids)

    def record_partner_contact(self, partner: str, now: datetime) -> None:
        if self.store is not None:
            try:
                self.store.partner_contact(partner, now=now)
            except sqlite3.Error as error:
                raise SignalUnavailable(f"device inventory: {error}") from error

    def _loop_call(self, function: Callable[[set[str]], None], argument: set[str]) -> None:
        """Listeners (open flows) live in the event loop; verdicts are stored in a worker thread."""
        if self._loop is None:
            function(argument)
        else:
            self._loop.call_soon_threadsafe(function, argument)

    def pick_up_changes(self) -> None:
        """Changes other processes committed (``portcullis devices set-risk``, another worker):
        the data version check is cheap, so it runs before every device lookup."""
        if self._polled is None or self._polled.data_version() == self._data_version:
            return
        self._data_version = self._polled.data_version()
        self._seen_change, changed, complete = self._polled.changes_since(self._seen_change)
        if not complete:  # this gateway fell behind the change log: forget every device
            logger.warning("device change log moved past this gateway; re-reading every device")
            self._all_devices_changed()
        elif changed:
            self._devices_changed(changed)

    async def watch_changes(self, interval: float = 0.25) -> None:
        """Long-lived connections of a device that lost access must close within a second,
        even when no new request arrives: poll for changes."""
        self._loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            self._poll()

    def _poll(self) -> None:
        try:
            self.pick_up_changes()
        except sqlite3.Error as error:
            logger.warning("cannot read device changes: %s", error)  # the next poll tries again

    @property
    def service_host(self) -> str | None:
        return self.config.gateway_file.gateway.service_host

    def response_restriction(self, controls: SessionControls, response_headers: Mapping[str, str], correlation_id: str,
                             accepts_html: bool) -> tuple[Restriction, pages.GatewayResponse] | None:
        """The page that replaces a response the session may not receive (a file download), with
        the session control that replaced it, for the request's decision record (only
        ``blockDownloads`` restricts answers)."""
        reason = response_restriction(controls, response_headers)
        if reason is None:
            return None
        logger.info("[%s] %s: response replaced", correlation_id, reason)
        return Restriction.block_downloads, pages.session_restricted(reason, correlation_id, html=accepts_html,
                                                                    now=self._clock())

    @property
    def kiosk_location(self) -> str | None:
        kiosk = self.config.gateway_file.kiosk
        return kiosk.location if kiosk is not None else None

    def kiosk_destination(self, host: str, port: int) -> str:
        """What the kiosk proxy does with a connection to ``host:port``: intercept (a protected
        host or an allowed one, on 443), pass through untouched (an exact ``passThrough`` entry),
        or deny."""
        kiosk = self.config.gateway_file.kiosk
        if kiosk is None:
            return "deny"
        if f"{host}:{port}" in kiosk.pass_through:
            return "pass"
        if port == 443 and (host in self.config.gateway_file.protected_hosts or host in kiosk.allow):
            return "intercept"
        return "deny"

    def resource_metadata(self, authority: str, path_suffix: str = "") -> dict[str, object] | None:
        """RFC 9728 metadata of ``https://<authority><path_suffix>``, or None if no protected host
        has that name. ``authority`` is the Host Routing validated against SNI."""
        gateway_file = self.rules.config.gateway_file
        protected = gateway_file.protected_hosts.get(hostname_of(authority))
        if protected is None:
            return None
        return discovery.resource_metadata(protected.challenge, authority, gateway_file.identity.issuer, path_suffix)

    def upstream_for(self, host: str) -> str | None:
        """The upstream URL of a protected host, or None if the gateway does not serve it."""
        protected = self.config.gateway_file.protected_hosts.get(host)
        return protected.upstream if protected else None

    def _forward(self, rules: Rules, request: AccessRequest, decided: Decided, now: datetime,
                 record: dict[str, Any]) -> Outcome:
        """An allowed request goes upstream with what the decision used, and nothing it ignored: a
        kiosk request names no device, whatever its token or session says."""
        assertion = None
        if self.assertions is not None:  # signed for the upstream (its audience); None when turned off
            upstream = rules.config.gateway_file.protected_hosts[request.host].upstream
            assertion = self.assertions.header, self.assertions.sign(
                audience=upstream, identity=decided.identity, app=decided.app, device=decided.device,
                decision_id=request.correlation_id, now=now)
        return Outcome(decided.decision, None, record, _upstream_headers(request, decided, assertion),
                       decided.device.device_id, decided.decision.session_controls)

    async def authorize(self, request: AccessRequest, authorization: list[str],
                        cookies: list[str] | None = None) -> Outcome:
        """The decision for a request. When the gateway answers it (a refusal, a 401, a sign-in
        redirect) its record is written now; a forwarded request's waits in ``outcome.record`` for
        ``record_answer``."""
        outcome = await self._timed(request, authorization, cookies)
        if not outcome.forward:
            self.decision_log.write(outcome.record)
        return outcome

    async def decide_again(self, request: AccessRequest, authorization: list[str],
                           cookies: list[str] | None = None) -> Outcome:
        """Continuous access evaluation of a request still open (a device changed, the rules were
        reloaded). Its record is written now, marked ``continuousAccessEvaluation``, with
        ``httpStatus`` null: the client gets no answer from it (still allowed, the request goes on
        and its own record says what it got; withdrawn, its connection is closed)."""
        outcome = await self._timed(request, authorization, cookies)
        outcome.record[REDECIDED] = True
        self.record_answer(outcome.record, None, None)
        return outcome

    async def _timed(self, request: AccessRequest, authorization: list[str], cookies: list[str] | None) -> Outcome:
        started = time.perf_counter()
        try:
            return await self._authorize(self.rules, request, authorization, cookies)
        finally:
            self.metrics.decision_seconds.observe(time.perf_counter() - started)

    async def _authorize(self, rules: Rules, request: AccessRequest, authorization: list[str],
                         cookies: list[str] | None) -> Outcome:
        now = self._clock()
        path = canonical_path(request.path)
        if path is None:
            return self._refusal(request, 400, "ambiguous request path")
        request = replace(request, path=path, target=request.path)
        found = rules.policy_set.match(request.host, path)
        if found is None or found.public:
            return self._without_identity(rules, request, found.primary if found else None, now)
        if access_token_in_query(request.target or ""):
            return self._refusal(request, 400, ACCESS_TOKEN_IN_QUERY)
        session = await self._browser_session(request, authorization, cookies)
        if isinstance(session, Outcome):
            return session
        token = bearer_token(authorization)
        if (session is None or authorization) and isinstance(token, RejectedToken):
            return self._unauthenticated(request, token, now)
        try:
            identity = await self._identity(rules, request, session, authorization, token)
            if isinstance(identity, RejectedToken):
                return self._unauthenticated(request, identity, now)
            if session is not None and authorization:  # both: the bearer token decides, if the cookie agrees
                if _user_key(session.identity) != _user_key(identity):
                    return self._refusal(request, 400, "the bearer token and the session cookie name different users")
                session = None
            device = await self._device_signals(rules, identity, request)
        except SignalUnavailable as error:
            self.unavailable_log.log(SIGNAL_DOWN, request.correlation_id, error)
            return self._refusal(request, 503, "a signal source is unavailable; try again shortly")
        decided = decide(rules, request, identity, device, found.names, now)
        return await self._answer(rules, request, decided, session, now)

    async def _browser_session(self, request: AccessRequest, authorization: list[str],
                               cookies: list[str] | None) -> BrowserSession | Outcome | None:
        """The session a browser's cookie names, looked up unless a bearer token came without one;
        or the answer instead: 503 when the session store is down, a sign-in for a browser with
        neither."""
        if self.browser is None or (authorization and cookie_value(cookies or []) is None):
            return None
        try:
            session = await self.browser.session(cookie_value(cookies or []), request.host)
        except SignalUnavailable as error:
            self.unavailable_log.log(SESSION_STORE_DOWN, request.correlation_id, error)
            return self._refusal(request, 503, "a signal source is unavailable; try again shortly")
        if session is None and not authorization and request.accepts_html:
            return await self._sign_in(request)
        return session

    async def _identity(self, rules: Rules, request: AccessRequest, session: BrowserSession | None,
                        authorization: list[str], token: str | RejectedToken) -> Identity | RejectedToken:
        """The session's user when no bearer token came with it, else the token's (validated)."""
        if session is not None and not authorization:
            return session.identity
        audiences = frozenset(rules.config.gateway_file.protected_hosts[request.host].audiences)
        return await self.validator.validate(str(token), audiences)

    async def _answer(self, rules: Rules, request: AccessRequest, decided: Decided, session: BrowserSession | None,
                      now: datetime) -> Outcome:
        """What the gateway does with a decision: a browser signs in again (sign-in frequency), a
        restricted session or a block is answered, an allowed request forwarded."""
        source = "browserSession" if session is not None else "accessToken"
        app, decision, identity, device = decided.app, decided.decision, decided.identity, decided.device
        if session is not None and self.browser is not None and decided.policy_allowed and \
                self.browser.needs_fresh_sign_in(session, decision.session_controls, now):
            return await self._sign_in(request, decision.session_controls.sign_in_frequency_seconds)
        record = self._counted(sign_in_record(request=request, decision=decision, now=now, identity=identity,
                                              device=device, app=app, identity_source=source,
                                              locations=rules.locations(request)), decision, app.name)
        if decided.session_restricted:
            return Outcome(decision, pages.session_restricted(decision.reason, request.correlation_id,
                                                              html=request.accepts_html, now=now), record)
        if decision.allowed:
            return self._forward(rules, request, decided, now, record)
        response = pages.blocked(decision=decision, request=request, app=app, device=device,
                                 remediation_url=rules.config.gateway_file.gateway.remediation_url, now=now)
        return Outcome(decision, response, record)

    async def _device_signals(self, rules: Rules, identity: Identity, request: AccessRequest) -> DeviceSignals:
        try:
            self.pick_up_changes()
        except sqlite3.Error as error:
            raise SignalUnavailable(f"device inventory: {error}") from error
        device_id = decision_device_id(identity, request)
        device = await self.inventory.managed_device(device_id) if device_id is not None else None
        return DeviceSignals(device_id=device_id, device=device, source=self.inventory.name,
                             compliance=rules.compliance)

    async def _sign_in(self, request: AccessRequest, max_age: int | None = None) -> Outcome:
        """A browser without a (fresh enough) session goes to the identity provider."""
        assert self.browser is not None  # only called for browser sessions
        try:
            login = await self.browser.login_redirect(request.authority or request.host,
                                                      request.target or request.path, max_age)
        except SignalUnavailable as error:
            self.unavailable_log.log(SIGN_IN_STORE_DOWN, request.correlation_id, error)
            return self._refusal(request, 503, "a signal source is unavailable; try again shortly")
        decision = Decision(result=DecisionResult.unauthenticated, status_code=302, error_code=None,
                            reason="sign-in required", resource=None, client_app_type=ClientAppType.browser)
        record = self._counted(sign_in_record(request=request, decision=decision, now=self._clock(),
                                              locations=self.rules.locations(request)), decision)
        return Outcome(decision, pages.redirect(login.location, request.correlation_id, set_cookie=login.set_cookie),
                       record=record)

    async def complete_sign_in(self, authority: str, state: str, code: str,
                               binding: str | None) -> pages.GatewayResponse:
        """The callback at ``https://<host>/.portcullis/callback``: a session, then the original URL."""
        if self.browser is None:
            return pages.sign_in_failed("browser sign-in is not configured here")
        try:
            controls = self.policy_set.session_controls_for_browsers()
            return_url, cookie = await self.browser.complete(authority, state, code, self._clock(), controls,
                                                             binding)
        except SignInFailed as failure:
            return pages.sign_in_failed(str(failure))
        except SignalUnavailable:
            return pages.sign_in_failed("the identity provider or the session store cannot be reached right now; "
                                        "try again")
        return pages.redirect(return_url, new_correlation_id(), set_cookie=cookie.header)

    async def sign_out(self, cookies: list[str]) -> pages.GatewayResponse:
        """The session ends on the server, in every process and host sharing the session store."""
        if self.browser is not None:
            try:
                await self.browser.end(cookie_value(cookies))
            except SignalUnavailable as error:
                logger.error("sign-out not recorded: %s", error)
                return pages.sign_out_failed()
        return pages.signed_out(cleared_cookie())

    def _without_identity(self, rules: Rules, request: AccessRequest, resource: str | None,
                          now: datetime) -> Outcome:
        """Before any token: a public resource is forwarded, a path no resource names is denied."""
        decision = decided_before_identity(request, resource)
        record = self._counted(sign_in_record(request=request, decision=decision, now=now,
                                              locations=rules.locations(request)), decision)
        if decision.allowed:
            return Outcome(decision, None, record, ((headers.CORRELATION_ID, request.correlation_id),
                                                    *headers.forwarding_headers(request.client_ip, request.host)))
        nobody = DeviceSignals(device_id=None, device=None, source=self.inventory.name)
        response = pages.blocked(decision=decision, request=request, app=ClientApp(client_id=None, name=None),
                                 device=nobody, remediation_url=rules.config.gateway_file.gateway.remediation_url,
                                 now=now)
        return Outcome(decision, response, record)

    def _unauthenticated(self, request: AccessRequest, rejected: RejectedToken, now: datetime) -> Outcome:
        decision = Decision(result=DecisionResult.unauthenticated, status_code=401, error_code=None,
                            reason=rejected.reason, resource=None,
                            client_app_type=client_app_type(request, None))
        record = self._counted(sign_in_record(request=request, decision=decision, now=now,
                                              locations=self.rules.locations(request)), decision)
        host = self.rules.config.gateway_file.protected_hosts.get(request.host)  # None: removed by a reload
        settings = host.challenge if host is not None else ChallengeSettings()
        parameters = discovery.challenge_parameters(settings, request.authority or request.host)
        return Outcome(decision, pages.unauthenticated(rejected.reason, request.correlation_id,
                                                       presented=rejected.presented, parameters=parameters),
                       record=record)

    def refuse(self, request: AccessRequest, status: int, reason: str) -> Outcome:
        """A request refused before policy: ambiguous (400), misdirected (421), a signal source
        down (503). Logged like every decision, now: the client gets this answer."""
        outcome = self._refusal(request, status, reason)
        self.decision_log.write(outcome.record)
        return outcome

    def _refusal(self, request: AccessRequest, status: int, reason: str) -> Outcome:
        """``refuse`` inside a decision: ``authorize`` or ``decide_again`` writes the record."""
        decision = refused_before_policy(request, status, reason)
        record = self._counted(sign_in_record(request=request, decision=decision, now=self._clock(),
                                              locations=self.rules.locations(request)), decision)
        return Outcome(decision, pages.refused(status, reason, request.correlation_id), record)


SESSION_RESTRICTIONS = frozenset(REASONS)


@dataclass(frozen=True, slots=True)
class Decided:
    """What the rules decide for a request once its identity and device are known, with the
    identity, app and device the decision used: what the upstream is told comes from these."""

    decision: Decision
    identity: Identity
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


def decide(rules: Rules, request: AccessRequest, identity: Identity, device: DeviceSignals,
           resources: tuple[str, ...], now: datetime, *, check_binding: bool = True,
           binding_problem: str | None = None, cohorts: Mapping[str, RolloutCohort] | None = None) -> Decided:
    """The steps after identity, for the gateway, What If (and the policy tests built on it) and
    ``portcullis replay`` alike, so that they cannot diverge: the ActiveSync device binding,
    ``evaluate``, then the session controls that refuse the request itself. Pure.
    ``check_binding=False``: the binding's outcome is known from a decision record
    (``binding_problem``, None when it passed), which may keep neither the query nor the device's
    real ActiveSync id (pseudonyms); ``cohorts``: rollout cohorts known from a record (replay of
    pseudonymised users)."""
    app = rules.app(identity)
    problem = _device_binding_problem(request, resources, device) if check_binding else binding_problem
    if problem is not None:
        return Decided(Decision(result=DecisionResult.block, status_code=403, error_code=ErrorCode.device_not_compliant,
                                reason=problem, resource=None, client_app_type=client_app_type(request, identity),
                                restriction=Restriction.activesync_device_id_mismatch), identity, app, device)
    decision = evaluate(request=request, identity=identity, device=device, app=app, resources=resources,
                        policy_set=rules.policy_set, now=now, cohorts=cohorts)
    restriction = request_restriction(
        decision.session_controls, method=request.method, content_type=request.content_type,
        content_length=request.content_length, chunked=request.chunked, resources=resources,
        download_resources=rules.policy_set.download_resources) if decision.allowed else None
    if restriction is not None:
        decision = replace(decision, result=DecisionResult.block, status_code=403, reason=REASONS[restriction],
                           restriction=restriction)
    return Decided(decision, identity, app, device)


def decided_before_identity(request: AccessRequest, resource: str | None) -> Decision:
    """A path no resource names is denied and a public resource allowed before any token is
    read: the same for anyone, at the gateway and in What If."""
    app_type = client_app_type(request, None)
    if resource is None:
        return Decision(result=DecisionResult.block, status_code=403,
                        error_code=ErrorCode.blocked_by_conditional_access, reason=NO_RESOURCE_REASON, resource=None,
                        client_app_type=app_type)
    return Decision(result=DecisionResult.allow, status_code=200, error_code=None, reason="public resource",
                    resource=resource, resources=(resource,), client_app_type=app_type)


def decision_device_id(identity: Identity, request: AccessRequest) -> str | None:
    """The device a decision looks up and uses: the one the token (or session) names, except
    through the kiosk proxy, where every browser is unmanaged whatever its token says."""
    return None if request.kiosk_location is not None else identity.device_id


def _user_key(identity: Identity) -> tuple[str | None, str | None]:
    """Who a token names across apps: Entra's ``sub`` is pairwise (one per app), ``oid`` is not."""
    return (identity.object_id or identity.subject, identity.tenant_id)


ACCESS_TOKEN_IN_QUERY = "an access token is accepted only in the Authorization header"  # noqa: S105  (a reason, not a secret)


def refused_before_policy(request: AccessRequest, status: int, reason: str) -> Decision:
    """A refusal no policy is asked about (400, 421, 503), at the gateway and in What If. A
    misdirected request has its own code: 53003 would claim a Conditional Access policy blocked it."""
    code = ErrorCode.misdirected_request if status == 421 else ErrorCode.blocked_by_conditional_access
    return Decision(result=DecisionResult.block, status_code=status, error_code=code,
                    reason=reason, resource=None, client_app_type=client_app_type(request, None))


def access_token_in_query(target: str) -> bool:
    """RFC 6750's URI query parameter: never read (URLs end up in logs), and never forwarded for
    the upstream to read either, beside or instead of the token the gateway checked."""
    query = target.partition("?")[2]
    return any(name.lower() == "access_token" for name, _ in parse_qsl(query, keep_blank_values=True))


def _device_binding_problem(request: AccessRequest, resources: tuple[str, ...], device: DeviceSignals) -> str | None:
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


def _upstream_headers(request: AccessRequest, decided: Decided,
                      assertion: tuple[str, str] | None = None) -> tuple[tuple[str, str], ...]:
    """What the upstream may trust, because the gateway removed any client-sent copy first: the
    user, app and device the decision used (``decided``), never a claim it ignored."""
    identity, app = decided.identity, decided.app
    values = (
        *headers.forwarding_headers(request.client_ip, request.host),
        (headers.CORRELATION_ID, request.correlation_id),
        (headers.USER, identity.user_principal_name or identity.subject),
        (headers.CLIENT_APP, app.name or app.client_id or ""),
        (headers.DEVICE_ID, decided.device.device_id or ""),
        *((assertion,) if assertion else ()),
    )
    return tuple((name, value) for name, value in values if value)
