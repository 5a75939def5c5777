"""Who may use the admin API, and the record of every attempt.

An ``AdminGuard`` wraps each admin handler: it takes the caller's access token (the Authorization
header; for dashboard pages also the session cookie; for the sign-in form the pasted token),
validates it for the admin audience on every request, checks the action's app role, and then,
whatever happened, writes one directory audit record and counts the request in
``portcullis_admin_requests_total``. Tokens are never logged: records name the caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from urllib.parse import parse_qs, urlsplit

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import headers
from gateway.access import Clock, new_correlation_id
from gateway.admin_audit import AdminActivity, AdminAuditLog, TargetResource, directory_audit_record
from gateway.errors import SignalUnavailable
from gateway.identity.tokens import BearerValidator, RejectedToken, bearer_token
from gateway.metrics import GatewayMetrics
from gateway.policy.model import Identity
from gateway.web.dashboard import CONTENT_SECURITY_POLICY, message_page, sign_in_page

READER, OPERATOR = "Portcullis.Reader", "Portcullis.Operator"
COOKIE_NAME = "portcullis_admin"
MAX_COOKIE_TOKEN = 3800  # browsers keep cookies up to about 4 KB
REALM = "portcullis-admin"
NO_CREDENTIALS = "no bearer token"
MAX_BODY_BYTES = 64 * 1024
OUTCOMES = {401: "unauthenticated", 403: "forbidden", 503: "unavailable"}  # the metric's outcome; else failure
ERRORS = {401: "invalid_token", 403: "insufficient_scope", 503: "temporarily_unavailable"}  # RFC 6750
TITLES = {403: "Not allowed", 413: "Too large", 503: "Unavailable"}  # of refusal pages
SECURITY_HEADERS = (
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY), ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"), ("Referrer-Policy", "same-origin"), ("Cache-Control", "no-store"),
)  # same-origin, not no-referrer: with no-referrer Chromium posts forms with "Origin: null"


class Credential(StrEnum):
    header = "header"  # the Authorization header only: the API, and whatever changes state
    header_or_cookie = "headerOrCookie"  # GET pages of the dashboard
    form = "form"  # the token pasted into the sign-in form


@dataclass(frozen=True, slots=True)
class AdminAction:
    name: str  # the metric's action label
    activity: str  # the audit record's activityDisplayName
    category: str  # the audit record's category
    role: str
    credential: Credential = Credential.header


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    reason: str
    identity: Identity | None = None  # a valid caller without the role (403)


@dataclass(frozen=True, slots=True)
class Done:
    """A handler's response, and how the audit log tells it."""

    response: Response
    succeeded: bool = True
    reason: str = "ok"
    targets: tuple[TargetResource, ...] = ()
    details: dict[str, str] = field(default_factory=dict)


type Handler = Callable[[Request, Identity], Awaitable[Done]]
type Endpoint = Callable[[Request], Awaitable[Response]]


def may(roles: frozenset[str], role: str) -> bool:
    """An operator may do whatever a reader may."""
    return role in roles or OPERATOR in roles


def failed(response: Response, reason: str) -> Done:
    return Done(response, succeeded=False, reason=reason)


class AdminGuard:
    def __init__(self, validator: BearerValidator, audience: str, audit: AdminAuditLog, metrics: GatewayMetrics,
                 clock: Clock) -> None:
        self._validator = validator
        self._audiences = frozenset({audience})
        self._audit = audit
        self._metrics = metrics
        self._clock = clock

    def __call__(self, action: AdminAction, handler: Handler) -> Endpoint:
        """Authenticate, check the role, run, then audit and count, whatever happened."""

        async def endpoint(request: Request) -> Response:
            caller = await self._caller(request, action)
            if isinstance(caller, Refusal):
                done = failed(refused(caller, action), caller.reason)
                identity, outcome = caller.identity, OUTCOMES.get(caller.status, "failure")
            else:
                done = await handler(request, caller)
                identity, outcome = caller, "success" if done.succeeded else "failure"
            correlation_id = new_correlation_id()
            activity = AdminActivity(activity=action.activity, category=action.category,
                                     result="success" if done.succeeded else "failure", reason=done.reason,
                                     caller=identity, ip_address=request.client.host if request.client else "",
                                     correlation_id=correlation_id, targets=done.targets,
                                     details={"httpMethod": request.method, "path": request.url.path,
                                              "httpStatus": str(done.response.status_code), **done.details})
            await asyncio.to_thread(self._audit.write, directory_audit_record(activity, self._clock()))
            self._metrics.admin_requests.labels(action.name, outcome).inc()
            done.response.headers[headers.CORRELATION_ID] = correlation_id
            return done.response

        return endpoint

    async def _caller(self, request: Request, action: AdminAction) -> Identity | Refusal:
        token = await self._token(request, action)
        if isinstance(token, Refusal):
            return token
        try:
            identity = await self._validator.validate(token, self._audiences)
        except SignalUnavailable:
            return Refusal(503, "the issuer's signing keys cannot be fetched")
        if isinstance(identity, RejectedToken):
            return Refusal(401, identity.reason)
        if not may(identity.roles, action.role):
            return Refusal(403, f"{action.activity} needs the role {action.role}", identity)
        return identity

    async def _token(self, request: Request, action: AdminAction) -> str | Refusal:
        if action.credential is Credential.form:
            return await self._pasted_token(request)
        values = request.headers.getlist("authorization")
        if not values and action.credential is Credential.header_or_cookie and COOKIE_NAME in request.cookies:
            values = [f"Bearer {request.cookies[COOKIE_NAME]}"]
        if not values:
            return Refusal(401, NO_CREDENTIALS)
        token = bearer_token(values)
        return Refusal(401, token.reason) if isinstance(token, RejectedToken) else token

    async def _pasted_token(self, request: Request) -> str | Refusal:
        """The sign-in form's token; kept on ``request.state`` for the handler to set the cookie."""
        if not same_origin(request):
            return Refusal(403, "sign-in must come from the dashboard's own page")
        body = await read_limited(request)
        if body is None:
            return Refusal(413, "the form is larger than 64 KiB")
        pasted = parse_qs(body.decode("utf-8", "replace")).get("token", [""])[0].strip()
        pasted = pasted.removeprefix("Bearer ").strip()
        if not pasted:
            return Refusal(401, NO_CREDENTIALS)
        if len(pasted) > MAX_COOKIE_TOKEN:
            return Refusal(401, "token too large for a browser cookie: use the Authorization header")
        token = bearer_token([f"Bearer {pasted}"])
        if isinstance(token, RejectedToken):
            return Refusal(401, token.reason)
        request.state.pasted_token = token
        return token


def refused(refusal: Refusal, action: AdminAction) -> Response:
    """401 and 403 carry RFC 6750's Bearer challenge; pages answer in HTML, the API in JSON."""
    challenge = None
    if refusal.status == 401 and refusal.reason == NO_CREDENTIALS:
        challenge = f'Bearer realm="{REALM}"'
    elif refusal.status in (401, 403):
        description = refusal.reason.replace('"', "'")
        challenge = f'Bearer realm="{REALM}", error="{ERRORS[refusal.status]}", error_description="{description}"'
    extra = {"WWW-Authenticate": challenge} if challenge else None
    if action.credential is not Credential.header:
        page = (sign_in_page(None if refusal.reason == NO_CREDENTIALS else refusal.reason) if refusal.status == 401
                else message_page(refusal.identity, TITLES.get(refusal.status, "Refused"), refusal.reason))
        return HTMLResponse(page, status_code=refusal.status, headers=extra)
    body = {"error": ERRORS.get(refusal.status, "invalid_request"), "error_description": refusal.reason}
    return JSONResponse(body, status_code=refusal.status, headers=extra)


def same_origin(request: Request) -> bool:
    """Sign-in and sign-out are posted from this listener's own pages (no login CSRF)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == request.headers.get("host", "")


async def read_limited(request: Request, limit: int = MAX_BODY_BYTES) -> bytes | None:
    """The body, or None once it is over ``limit`` (declared or sent)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


class SecurityHeaders:
    """Every answer: the dashboard's CSP, no framing, no sniffing, no referrer to other sites, not
    cached (unless the route says otherwise, as the JWKS does)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                response_headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS:
                    response_headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)
