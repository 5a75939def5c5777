"""Browser sign-in: the OIDC authorization code flow with PKCE, ending in a gateway session.

A browser without a session is sent (302) to the issuer's authorization endpoint with ``state``,
``nonce`` and an S256 code challenge (authlib). The issuer redirects back to
``https://<protected host>/.portcullis/callback``; the gateway exchanges the code, validates the
ID token (signature, ``iss``, ``aud`` = its client id, ``nonce``), and creates a server-side
session. The browser gets a cookie holding only the session id, encrypted and signed (Fernet),
``HttpOnly; Secure; SameSite=Lax; Path=/``, host-only (``__Host-`` prefix). The original URL is
kept server-side with ``state``, so the callback cannot be made to redirect anywhere else.

``/.portcullis/logout`` deletes the session on the server: a copied cookie stops working too.
Pending sign-ins and sessions live in a ``SessionStore``: memory for one process, SQLite for the
workers of one host, Redis for several hosts (so a sign-in started by one process can finish in
another, and a logout anywhere ends the session everywhere).
``signInFrequency`` sends the browser to sign in again once that long has passed since it
signed in; ``persistentBrowser: never`` makes the cookie a session cookie.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass, replace
from datetime import datetime
from urllib.parse import urlencode

from cryptography.fernet import Fernet, InvalidToken

from gateway.errors import SignalUnavailable
from gateway.http.paths import canonical_path
from gateway.identity.discovery import METADATA_PATH
from gateway.identity.oauth_client import OAuthError, strict_oauth_client
from gateway.identity.tokens import BearerValidator, RejectedToken
from gateway.policy.model import PersistentBrowser, SessionControls
from gateway.state.session_records import BrowserSession, PendingLogin
from gateway.state.sessions import MemorySessionStore, SessionStore

CALLBACK_PATH = "/.portcullis/callback"
BINDING_COOKIE = "__Host-portcullis-signin"
LOGOUT_PATH = "/.portcullis/logout"
RESERVED_PREFIX = "/.portcullis/"
COOKIE_NAME = "__Host-portcullis-session"
PENDING_SECONDS = 600  # a sign-in must come back from the issuer within this


class SignInFailed(Exception):
    """The callback cannot complete the sign-in; the message is safe to show."""


@dataclass(frozen=True, slots=True)
class LoginRedirect:
    location: str
    set_cookie: str  # binds the sign-in to this browser (login CSRF, session fixation)


@dataclass(frozen=True, slots=True)
class SessionCookie:
    """What to set on the browser: the ``Set-Cookie`` header value."""

    header: str


class BrowserSignIn:
    def __init__(self, *, client_id: str, issuer: str, validator: BearerValidator, key: bytes,
                 lifetime_seconds: int, timeout: float = 10.0, sessions: SessionStore | None = None) -> None:
        """``issuer``: the name of the one trusted issuer browsers sign in with."""
        self.client_id = client_id
        self.issuer = issuer
        self._validator = validator
        self._cipher = Fernet(key)
        self._lifetime = lifetime_seconds
        self._timeout = timeout
        self.sessions: SessionStore = sessions if sessions is not None else MemorySessionStore()

    def _endpoint(self, name: str) -> str:
        trusted = self._validator.issuers.named(self.issuer)
        if trusted is None:  # removed by a reload: no sign-in until it is back (fail closed)
            raise SignalUnavailable(f"the sign-in issuer {self.issuer!r} is no longer trusted")
        value = trusted.keys.discovery.get(name)
        if not isinstance(value, str) or not value.startswith(("https://", "http://127.0.0.1", "http://localhost")):
            raise SignalUnavailable(f"the identity provider's discovery document has no usable {name}")
        return value

    async def login_redirect(self, authority: str, target: str, max_age: int | None = None, *,
                             acr_values: tuple[str, ...] = (), claims: str | None = None) -> LoginRedirect:
        """Where to send a browser that has no session. It comes back to ``target`` on the same
        host only: the original URL is kept here, never taken from the callback. The sign-in is
        bound to this browser by a short-lived cookie that the callback must present. A step-up
        asks the issuer for ``acr_values`` (an authentication strength) or ``claims`` (OIDC's
        claims request: the authentication contexts the token's ``acrs`` must carry)."""
        verifier, nonce, state, binding = (secrets.token_urlsafe(48), secrets.token_urlsafe(16),
                                           secrets.token_urlsafe(24), secrets.token_urlsafe(24))
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        query = {"response_type": "code", "client_id": self.client_id,
                 "redirect_uri": f"https://{authority}{CALLBACK_PATH}", "scope": "openid profile",
                 "state": state, "nonce": nonce, "code_challenge": challenge, "code_challenge_method": "S256"}
        if max_age is not None:
            query["max_age"] = str(max_age)  # signInFrequency, a step-up: the issuer must authenticate again
        if acr_values:
            query["acr_values"] = " ".join(acr_values)
        if claims is not None:
            query["claims"] = claims
        path = target if target.startswith("/") and not target.startswith("//") else "/"
        location = f"{self._endpoint('authorization_endpoint')}?{urlencode(query)}"
        await self.sessions.put_pending(state, PendingLogin(authority, f"https://{authority}{path}", verifier, nonce,
                                                            _digest(binding)), PENDING_SECONDS)
        return LoginRedirect(location, f"{BINDING_COOKIE}={binding}; Path=/; Secure; HttpOnly; SameSite=Lax; "
                                       f"Max-Age={PENDING_SECONDS}")

    async def complete(self, authority: str, state: str, code: str, now: datetime,
                       controls: SessionControls, binding: str | None,
                       certificate_device: str | None = None) -> tuple[str, SessionCookie]:
        """The callback: returns where to send the browser and the cookie to set. On a connection
        whose device certificate names ``certificate_device``, the session is that device's and
        bound to it (an ID token naming another device is refused)."""
        pending = await self.sessions.take_pending(state)  # redeemed once, whatever happens next
        if pending is None or pending.authority != authority or not binding or \
                not hmac.compare_digest(pending.browser_binding, _digest(binding)):
            raise SignInFailed("this sign-in link expired or was not started in this browser; open the page again")
        client = strict_oauth_client(client_id=self.client_id, redirect_uri=f"https://{authority}{CALLBACK_PATH}",
                                     token_endpoint_auth_method="none",  # noqa: S106  (a public client: PKCE)
                                     timeout=self._timeout)
        try:
            token = await client.fetch_token(self._endpoint("token_endpoint"), code=code,
                                             code_verifier=pending.code_verifier)
        except (OAuthError, OSError, ValueError) as error:
            raise SignInFailed("the identity provider did not accept the sign-in") from error
        finally:
            await client.aclose()
        identity = await self._validator.validate_id_token(str(token.get("id_token", "")), self.client_id,
                                                           pending.nonce, issuer=self.issuer)
        if isinstance(identity, RejectedToken):
            raise SignInFailed(f"the identity provider's answer was refused: {identity.reason}")
        if certificate_device is not None:
            if identity.device_id is not None and identity.device_id.lower() != certificate_device.lower():
                raise SignInFailed("the sign-in names another device than this device's certificate")
            identity = replace(identity, device_id=certificate_device)
        session_id = secrets.token_urlsafe(32)
        signed_in = datetime.fromtimestamp(identity.authenticated_at, now.tzinfo) if identity.authenticated_at else now
        session = BrowserSession(identity, hostname_of(authority), min(signed_in, now),
                                 certificate_bound=certificate_device is not None)
        await self.sessions.put_session(session_id, session, self._lifetime)
        return pending.return_url, self._cookie(session_id, controls)

    async def session(self, cookie_value: str | None, host: str) -> BrowserSession | None:
        """The session a cookie names, on this host; raises SignalUnavailable when a shared store
        cannot answer (the request is refused, never let through)."""
        if not cookie_value:
            return None
        try:
            session_id = self._cipher.decrypt(cookie_value.encode(), ttl=self._lifetime).decode()
        except (InvalidToken, ValueError):
            return None
        found = await self.sessions.get_session(session_id)
        return found if found is not None and found.host == host else None

    @staticmethod
    def needs_fresh_sign_in(session: BrowserSession, controls: SessionControls, now: datetime) -> bool:
        frequency = controls.sign_in_frequency_seconds
        return frequency is not None and (now - session.signed_in_at).total_seconds() >= frequency

    async def end(self, cookie_value: str | None) -> None:
        """Logout: the session is gone on the server, whatever copies of the cookie exist."""
        try:
            session_id = self._cipher.decrypt((cookie_value or "").encode()).decode()
        except (InvalidToken, ValueError):
            return
        await self.sessions.end_session(session_id)

    def _cookie(self, session_id: str, controls: SessionControls) -> SessionCookie:
        value = self._cipher.encrypt(session_id.encode()).decode()
        attributes = "Path=/; Secure; HttpOnly; SameSite=Lax"
        if controls.persistent_browser is not PersistentBrowser.never:
            attributes += f"; Max-Age={self._lifetime}"
        return SessionCookie(f"{COOKIE_NAME}={value}; {attributes}")


def is_reserved(target: str) -> bool:
    """``/.portcullis/`` and the protected resource metadata (RFC 9728), in any spelling (case,
    percent-encoding), are the gateway's, never forwarded."""
    path = canonical_path(target)
    path = (path if path is not None else target).lower().partition("?")[0]
    return path.startswith(RESERVED_PREFIX) or path == METADATA_PATH or path.startswith(METADATA_PATH + "/")


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def hostname_of(authority: str) -> str:
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def cleared_cookie() -> str:
    return f"{COOKIE_NAME}=; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=0"


def cookie_value(cookie_headers: list[str]) -> str | None:
    for header in cookie_headers:
        for part in header.split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE_NAME:
                return value
    return None
