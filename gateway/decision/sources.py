"""Where the pipeline's identity and signals come from: the gateway's own (a bearer token or a
browser session; the device inventory) and What If's (the question's identity). Replay brings
its own (the recorded token and device: ``gateway.replay.engine``). They find facts; they never
decide."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import datetime

from gateway.decision.device_binding import resolution_problem
from gateway.decision.outcome import Refused, SignIn
from gateway.decision.pipeline import Identified, Signals, decision_device_id
from gateway.decision.rules import Rules
from gateway.errors import SessionStoreUnavailable, SignalUnavailable
from gateway.identity import legacy_activesync
from gateway.identity.browser import BrowserSession, BrowserSignIn, cookie_value
from gateway.identity.legacy_activesync import basic_user, legacy_identity
from gateway.identity.tokens import BearerValidator, RejectedToken, bearer_token
from gateway.policy.conditions import ACTIVESYNC_PATH, path_has_prefix
from gateway.policy.model import (
    AccessRequest,
    AppProtection,
    DeviceCertificate,
    DeviceSignals,
    Identity,
    SessionControls,
)
from gateway.signals.app_protection import AppProtectionSource
from gateway.signals.devices import DeviceInventory

USERS_DIFFER = "the bearer token and the session cookie name different users"


class BearerOrSession:
    """The gateway's identity stage for one request: its bearer token, or its browser session.
    A browser with neither signs in; both: the bearer token decides, if the cookie names the same user."""

    def __init__(self, validator: BearerValidator, browser: BrowserSignIn | None, authorization: list[str],
                 cookies: list[str] | None) -> None:
        self._validator = validator
        self._browser = browser
        self._authorization = authorization
        self._cookie = cookie_value(cookies or [])
        self._session: BrowserSession | None = None  # the session that decided, once identified

    async def identify(self, rules: Rules, request: AccessRequest) -> Identified | RejectedToken | SignIn | Refused:
        session = await self._browser_session(request)
        if isinstance(session, SignIn):
            return session
        if rules.legacy_active_sync(request.host) and path_has_prefix(request.path, ACTIVESYNC_PATH):
            user = basic_user(self._authorization)
            if user is not None:
                return user if isinstance(user, RejectedToken) else \
                    Identified(legacy_identity(user, request.host), legacy_activesync.SOURCE)
        token = bearer_token(self._authorization)
        if (session is None or self._authorization) and isinstance(token, RejectedToken):
            return token
        if session is not None and not self._authorization:
            self._session = session
            return Identified(session.identity, "browserSession", session.certificate_bound)
        audiences = frozenset(rules.config.gateway_file.protected_hosts[request.host].audiences)
        identity = await self._validator.validate(str(token), audiences)
        if isinstance(identity, RejectedToken):
            return identity
        if session is not None and _user_key(session.identity) != _user_key(identity):
            return Refused(status=400, reason=USERS_DIFFER)
        return Identified(identity, "accessToken")

    async def _browser_session(self, request: AccessRequest) -> BrowserSession | SignIn | None:
        """The session a browser's cookie names, looked up unless a bearer token came without one;
        a sign-in for a browser with neither."""
        if self._browser is None or (self._authorization and self._cookie is None):
            return None
        try:
            session = await self._browser.session(self._cookie, request.host)
        except SignalUnavailable as error:
            raise SessionStoreUnavailable(str(error)) from error
        if session is not None and session.identity.issuer is not None and \
                self._validator.issuers.named(session.identity.issuer) is None:
            session = None  # its issuer was removed by a reload: the session ends with it
        if session is None and not self._authorization and request.accepts_html:
            return SignIn()
        return session

    def sign_in_again(self, controls: SessionControls, now: datetime) -> bool:
        return self._session is not None and self._browser is not None and \
            self._browser.needs_fresh_sign_in(self._session, controls, now)


def _user_key(identity: Identity) -> tuple[str | None, str | None]:
    """Who a token names across apps: Entra's ``sub`` is pairwise (one per app), ``oid`` is not."""
    return (identity.object_id or identity.subject, identity.tenant_id)


class GivenIdentity:
    """An identity known beforehand (What If's question), made when the pipeline asks for it:
    a public resource is answered before any identity is needed."""

    def __init__(self, make: Callable[[], Identity]) -> None:
        self._make = make

    async def identify(self, rules: Rules, request: AccessRequest) -> Identified:
        return Identified(self._make(), "accessToken")

    def sign_in_again(self, controls: SessionControls, now: datetime) -> bool:
        return False  # no browser session


class InventorySignals:
    """The device the identity names, from an inventory, and the token's app's app protection
    registrations for its user, from ``apps`` (none configured: the app has none). ``before_lookup``
    runs first (the gateway picks up device changes other processes committed); a SQLite error
    there is a source that cannot answer."""

    def __init__(self, inventory: DeviceInventory, before_lookup: Callable[[], None] | None = None,
                 apps: AppProtectionSource | None = None) -> None:
        self._inventory = inventory
        self._before_lookup = before_lookup
        self._apps = apps

    @property
    def name(self) -> str:
        return self._inventory.name

    async def signals(self, rules: Rules, request: AccessRequest, identity: Identity) -> Signals:
        if self._before_lookup is not None:
            try:
                self._before_lookup()
            except sqlite3.Error as error:
                raise SignalUnavailable(f"device inventory: {error}") from error
        certificate = request.device_certificate if request.kiosk_location is None else None  # the kiosk reads none
        certificate_device_id, problem = await certificate_device(self._inventory, certificate)
        device_id = certificate_device_id or decision_device_id(identity, request)
        device = await self._inventory.managed_device(device_id) if device_id is not None else None
        return Signals(device=DeviceSignals(device_id=device_id, device=device, source=self._inventory.name,
                                            compliance=rules.compliance),
                       certificate_device_id=certificate_device_id, certificate_problem=problem,
                       app_protection=await self._app_protection(rules, identity))

    async def _app_protection(self, rules: Rules, identity: Identity) -> AppProtection | None:
        """Looked up only when a policy could ask for it (``compliantApplication``)."""
        if not rules.policy_set.uses_app_protection:
            return None
        if self._apps is None:
            return AppProtection(registrations=(), source="none configured", max_sync_age=rules.app_sync_age)
        return await self._apps.protection(identity, rules.app_identifiers_of(identity), rules.app_sync_age)


async def certificate_device(inventory: DeviceInventory,
                             certificate: DeviceCertificate | None) -> tuple[str | None, str | None]:
    """The inventory device (its azureADDeviceId) a verified certificate names, or why it names
    none; (None, None) without a verified certificate. Raises ``SignalUnavailable``."""
    if certificate is None or not certificate.verified:
        return None, None
    assert certificate.device_key is not None and certificate.device_value is not None  # verified
    ids = await inventory.device_ids_for(certificate.device_key, certificate.device_value)
    problem = resolution_problem(certificate, ids)
    return (ids[0] if problem is None else None), problem
