"""The access service: the addons' facade. A request is decided by the one pipeline
(``gateway.decision.pipeline``) with the gateway's own sources; this module applies the result:
counts it, builds its record (written at once for an answer, when its answer is known for a
forwarded request), renders its page, and starts a browser sign-in. It hands on to their own
parts: the change feed (``gateway.signals.change_feed``), MTD verdicts (``gateway.signals.mtd_ingest``)
and routing (``gateway.routing``, through ``rules.router``, swapped with the rules).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway.config import Config
from gateway.counted_log import CountedLog
from gateway.decision import pipeline
from gateway.decision.log import REDECIDED, DecisionLog
from gateway.decision.outcome import Authorization, Forward, SignIn
from gateway.decision.record import decision_record
from gateway.decision.rules import Rules
from gateway.decision.sources import BearerOrSession, InventorySignals
from gateway.errors import SessionStoreUnavailable, SignalUnavailable
from gateway.events import RULES_RELOADED, AllDevicesChanged, ChangeListener, DevicesChanged
from gateway.identity.assertion import AssertionSigner
from gateway.identity.browser import BrowserSignIn
from gateway.identity.tokens import BearerValidator
from gateway.ops.metrics import GatewayMetrics
from gateway.policy.model import NO_SESSION_CONTROLS, AccessRequest, Decision, Restriction, SessionControls
from gateway.policy.policy_set import PolicySet
from gateway.signals.app_protection import AppProtectionSource, user_keys
from gateway.signals.cache import CachedInventory
from gateway.signals.change_feed import ChangeFeed
from gateway.signals.mtd import Verdict
from gateway.signals.mtd_ingest import ThreatVerdicts
from gateway.signals.store import DeviceStore
from gateway.web import pages
from gateway.web.decision_pages import render

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
    app_users: frozenset[str] = frozenset()  # its decision read these users' app registrations: likewise

    @property
    def forward(self) -> bool:
        return self.response is None


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
        apps: AppProtectionSource | None = None,
        browser: BrowserSignIn | None = None,
        metrics: GatewayMetrics | None = None,
        assertions: AssertionSigner | None = None,
    ) -> None:
        self.rules = Rules.of(config)
        self.metrics = metrics or GatewayMetrics()
        self.assertions = assertions  # signs the identity assertion of each forwarded request
        self.browser = browser
        self.store = store
        self.apps = apps  # app protection registrations, for compliantApplication
        self.feed = ChangeFeed(inventory, store, apps.store if apps is not None else None)
        self.threat_verdicts = ThreatVerdicts(store, self.feed)
        self.validator = validator
        self.inventory = inventory
        self.decision_log = decision_log
        self.clock = clock
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
        self.feed.tell(RULES_RELOADED)

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
        self.feed.subscribe(listener)

    @property
    def shared_feed_up(self) -> bool | None:
        """With shared state: is its change feed up (None: no feed)."""
        return self.feed.shared_feed_up

    @shared_feed_up.setter
    def shared_feed_up(self, up: bool | None) -> None:
        self.feed.shared_feed_up = up

    def shared_devices_changed(self, event: DevicesChanged | AllDevicesChanged) -> None:
        self.feed.shared_devices_changed(event)

    def shared_feed_lost(self) -> None:
        self.feed.shared_feed_lost()

    def shared_feed_restored(self) -> None:
        self.feed.shared_feed_restored()

    def pick_up_changes(self) -> None:
        self.feed.pick_up_changes()

    async def watch_changes(self, interval: float = 0.25) -> None:
        await self.feed.watch_changes(interval)

    def record_threat_verdicts(self, partner: str, verdicts: list[Verdict], now: datetime) -> list[str]:
        """Store an MTD partner's verdicts (blocking: run it in a thread); returns unknown device ids."""
        return self.threat_verdicts.record_threat_verdicts(partner, verdicts, now)

    def record_partner_contact(self, partner: str, now: datetime) -> None:
        self.threat_verdicts.record_partner_contact(partner, now)
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
        """The pipeline with the gateway's sources (bearer token or browser session, the device
        inventory after picking up committed changes), then what the gateway does with it."""
        now = self.clock()
        result = await pipeline.authorize(
            request, rules=rules, identity=BearerOrSession(self.validator, self.browser, authorization, cookies),
            signals=InventorySignals(self.inventory, self.pick_up_changes, self.apps), now=now,
            assertions=self.assertions)
        if result.unavailable is not None:
            down = SESSION_STORE_DOWN if isinstance(result.unavailable, SessionStoreUnavailable) else SIGNAL_DOWN
            self.unavailable_log.log(down, request.correlation_id, result.unavailable)
        if isinstance(result.action, SignIn):
            return await self._sign_in(rules, result, now)
        return self._applied(rules, result, now)

    def _applied(self, rules: Rules, result: Authorization, now: datetime) -> Outcome:
        """The decision counted, its record built and its page rendered (none when forwarded)."""
        record = self._counted(decision_record(result, rules, now), result.decision,
                               result.app.name if result.app else None)
        response = render(result, remediation_url=rules.config.gateway_file.gateway.remediation_url, now=now)
        if isinstance(result.action, Forward):
            read_apps = result.app is not None and result.app.protection is not None and result.identity is not None
            return Outcome(result.decision, None, record, result.action.upstream_headers, result.action.device_id,
                           result.action.session_controls,
                           frozenset(user_keys(result.identity)) if read_apps and result.identity else frozenset())
        return Outcome(result.decision, response, record)

    async def _sign_in(self, rules: Rules, result: Authorization, now: datetime) -> Outcome:
        """A browser without a (fresh enough) session goes to the identity provider."""
        assert self.browser is not None and isinstance(result.action, SignIn)  # only browser sessions sign in
        request = result.request
        try:
            action = result.action
            login = await self.browser.login_redirect(request.authority or request.host,
                                                      request.target or request.path, action.max_age,
                                                      acr_values=action.acr_values, claims=action.claims)
        except SignalUnavailable as error:
            self.unavailable_log.log(SIGN_IN_STORE_DOWN, request.correlation_id, error)
            return self._applied(rules, pipeline.refused(request, 503, pipeline.SIGNAL_UNAVAILABLE), now)
        record = self._counted(decision_record(result, rules, now), result.decision)
        return Outcome(result.decision, pages.redirect(login.location, request.correlation_id,
                                                       set_cookie=login.set_cookie), record=record)

    def refuse(self, request: AccessRequest, status: int, reason: str, *, error: str | None = None) -> Outcome:
        """A request refused before policy: ambiguous (400), misdirected (421), a signal source
        down (503). Logged like every decision, now: the client gets this answer."""
        outcome = self._applied(self.rules, pipeline.refused(request, status, reason, error=error), self.clock())
        self.decision_log.write(outcome.record)
        return outcome

