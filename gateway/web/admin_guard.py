"""Who may use the admin API, and the record of every attempt.

An ``AdminGuard`` wraps each admin handler: it takes the caller's access token (the Authorization
header; for dashboard pages also the session cookie; for the sign-in form the pasted token),
validates it for the admin audience on every request, checks the action's app role, and then,
whatever happened (a handler's exception too: 500), writes one directory audit record and counts
the request in ``portcullis_admin_requests_total``. Tokens are never logged: records name the caller.

``AdminGate`` wraps the whole listener: it refuses a request whose Host is not the listener's own
address (or ``admin.publicUrl``'s) with 421, so that a web page cannot reach the listener through
DNS rebinding, and turns whatever exception escapes into an audited 500. Unknown paths (404) and
methods (405) are audited too (``AdminGuard.unrouted``, Starlette's exception handlers).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import ip_address
from urllib.parse import parse_qs, urlsplit

from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.decision.service import Clock, new_correlation_id
from gateway.errors import SignalUnavailable
from gateway.http import headers
from gateway.identity.tokens import BearerValidator, RejectedToken, bearer_token
from gateway.ops.admin_audit import AdminActivity, AdminAuditLog, TargetResource, directory_audit_record
from gateway.ops.metrics import GatewayMetrics
from gateway.policy.model import Identity
from gateway.web.dashboard import CONTENT_SECURITY_POLICY, message_page, sign_in_page

logger = logging.getLogger(__name__)

READER, OPERATOR = "Portcullis.Reader", "Portcullis.Operator"
COOKIE_NAME = "portcullis_admin"  # "__Host-portcullis_admin", Secure, with admin.publicUrl
MAX_COOKIE_TOKEN = 3800  # browsers keep cookies up to about 4 KB
REALM = "portcullis-admin"
NO_CREDENTIALS = "no bearer token"
MAX_BODY_BYTES = 64 * 1024
OUTCOMES = {401: "unauthenticated", 403: "forbidden", 503: "unavailable"}  # the metric's outcome; else failure
ERRORS = {401: "invalid_token", 403: "insufficient_scope", 503: "temporarily_unavailable"}  # RFC 6750
TITLES = {403: "Not allowed", 413: "Too large", 503: "Unavailable"}  # of refusal pages
MAX_AUDITED_PATH = 256  # what an unknown path's audit record keeps of it
UNGATED = frozenset({"/healthz", "/readyz", "/.well-known/jwks.json"})  # probes by IP, public keys: any Host
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


# Requests that reach no handler: audited all the same (no caller is named: no token was checked).
UNKNOWN_PATH = AdminAction("unknownPath", "Request an unknown path", "Other", "")
WRONG_METHOD = AdminAction("methodNotAllowed", "Use a method the path does not allow", "Other", "")
MISDIRECTED = AdminAction("misdirected", "Refuse a request for another host", "Other", "")
FAILED = AdminAction("error", "Fail with an internal error", "Other", "")


@dataclass(frozen=True, slots=True)
class AdminSite:
    """Where browsers reach the listener: its own address over plain HTTP (loopback), or
    ``admin.publicUrl``, the https origin of a TLS reverse proxy in front of it. With a public URL
    the dashboard's cookie is ``Secure`` with the ``__Host-`` prefix and sign-in must come from that
    origin."""

    public_origin: str | None = None  # https://host[:port], canonical (config/models.py)
    listen_host: str = "127.0.0.1"

    @property
    def secure(self) -> bool:
        return self.public_origin is not None

    @property
    def cookie_name(self) -> str:
        return f"__Host-{COOKIE_NAME}" if self.secure else COOKIE_NAME

    def hosts(self, server: tuple[str, int] | None) -> frozenset[str]:
        """The Host values this listener answers on a connection to ``server`` (the address the
        client connected to): that address, the configured host name, localhost when on loopback,
        and the public URL's host."""
        names: set[str] = set()
        if server is not None:
            address, port = server[0], int(server[1])
            names |= _authorities(address, port)
            if self.listen_host and not _unspecified(self.listen_host):
                names |= _authorities(self.listen_host.lower(), port)
            if _loopback(address):
                names |= _authorities("localhost", port)
        if self.public_origin is not None:
            parts = urlsplit(self.public_origin)
            names.add(parts.netloc)
            if parts.port is None:
                names.add(f"{parts.netloc}:443")
        return frozenset(names)

    def same_origin(self, request: Request) -> bool:
        """Sign-in and sign-out are posted from this listener's own pages (no login CSRF): behind a
        TLS proxy (``publicUrl``) from that origin, else from the Host the browser asked for."""
        site = request.headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return False
        origin = request.headers.get("origin")
        if origin is None:
            return True
        if self.public_origin is not None:
            return origin.lower().rstrip("/") == self.public_origin
        return urlsplit(origin).netloc == request.headers.get("host", "")


def _authorities(host: str, port: int) -> set[str]:
    name = f"[{host}]" if ":" in host else host
    return {f"{name}:{port}", name} if port == 80 else {f"{name}:{port}"}


def _loopback(host: str) -> bool:
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _unspecified(host: str) -> bool:
    try:
        return ip_address(host).is_unspecified
    except ValueError:
        return False


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
                 clock: Clock, site: AdminSite | None = None, *, issuer: str | None = None) -> None:
        """``issuer``: the name of the only trusted issuer whose tokens may carry admin roles."""
        self._validator = validator
        self._issuer = issuer
        self._audiences = frozenset({audience})
        self._audit = audit
        self._metrics = metrics
        self._clock = clock
        self.site = site or AdminSite()

    def __call__(self, action: AdminAction, handler: Handler) -> Endpoint:
        """Authenticate, check the role, run, then audit and count, whatever happened."""

        async def endpoint(request: Request) -> Response:
            correlation_id = new_correlation_id()
            caller = await self._caller(request, action)
            if isinstance(caller, Refusal):
                done = failed(refused(caller, action), caller.reason)
                identity, outcome = caller.identity, OUTCOMES.get(caller.status, "failure")
            else:
                identity = caller
                try:
                    done = await handler(request, caller)
                except Exception as error:  # answered, audited and logged, never bare
                    logger.exception("admin action %s failed (correlation id %s)", action.name, correlation_id)
                    done, outcome = internal_error(error, action.credential is not Credential.header), "error"
                else:
                    outcome = "success" if done.succeeded else "failure"
            return await self.audited(request, action, done, identity, outcome, correlation_id)

        return endpoint

    async def audited(self, request: Request, action: AdminAction, done: Done, identity: Identity | None,
                      outcome: str, correlation_id: str | None = None) -> Response:
        """Write the audit record, count the request and name the record in the answer."""
        correlation_id = correlation_id or new_correlation_id()
        activity = AdminActivity(activity=action.activity, category=action.category,
                                 result="success" if done.succeeded else "failure", reason=done.reason,
                                 caller=identity, ip_address=request.client.host if request.client else "",
                                 correlation_id=correlation_id, targets=done.targets,
                                 details={"httpMethod": request.method, "path": request.url.path[:MAX_AUDITED_PATH],
                                          "httpStatus": str(done.response.status_code), **done.details})
        await asyncio.to_thread(self._audit.write, directory_audit_record(activity, self._clock()))
        self._metrics.admin_requests.labels(action.name, outcome).inc()
        done.response.headers[headers.CORRELATION_ID] = correlation_id
        return done.response

    async def unrouted(self, request: Request, error: Exception) -> Response:
        """Starlette's answer to an unknown path (404) or method (405), audited."""
        status = error.status_code if isinstance(error, HTTPException) else 404
        action = WRONG_METHOD if status == 405 else UNKNOWN_PATH
        reason = f"{request.method} is not allowed here" if status == 405 else "no such path"
        extra = error.headers if isinstance(error, HTTPException) else None  # 405: Allow
        body = {"error": "method_not_allowed" if status == 405 else "not_found", "error_description": reason}
        return await self.audited(request, action, failed(JSONResponse(body, status_code=status, headers=extra),
                                                          reason), None, "failure")

    async def misdirected(self, request: Request) -> Response:
        host = request.headers.get("host", "")
        reason = f"the Host {host[:MAX_AUDITED_PATH]!r} is not this listener's address"
        body = {"error": "misdirected_request", "error_description": reason}
        done = Done(JSONResponse(body, status_code=421), succeeded=False, reason=reason,
                    details={"host": host[:MAX_AUDITED_PATH]})
        return await self.audited(request, MISDIRECTED, done, None, "failure")

    async def crashed(self, request: Request, error: Exception) -> Response:
        """An exception outside any guarded handler (the probes, the sign-in form, sign-out)."""
        correlation_id = new_correlation_id()
        logger.error("admin request %s %s failed (correlation id %s)", request.method, request.url.path,
                     correlation_id, exc_info=error)
        return await self.audited(request, FAILED, internal_error(error, page=False), None, "error", correlation_id)

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
        if self._issuer is not None and identity.issuer != self._issuer:
            return Refusal(401, "the admin API takes tokens of its own issuer only")
        if not may(identity.roles, action.role):
            return Refusal(403, f"{action.activity} needs the role {action.role}", identity)
        return identity

    async def _token(self, request: Request, action: AdminAction) -> str | Refusal:
        if action.credential is Credential.form:
            return await self._pasted_token(request)
        values = request.headers.getlist("authorization")
        cookie = self.site.cookie_name
        if not values and action.credential is Credential.header_or_cookie and cookie in request.cookies:
            values = [f"Bearer {request.cookies[cookie]}"]
        if not values:
            return Refusal(401, NO_CREDENTIALS)
        token = bearer_token(values)
        return Refusal(401, token.reason) if isinstance(token, RejectedToken) else token

    async def _pasted_token(self, request: Request) -> str | Refusal:
        """The sign-in form's token; kept on ``request.state`` for the handler to set the cookie."""
        if not self.site.same_origin(request):
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


def internal_error(error: Exception, page: bool) -> Done:
    """A 500 that says no more than that (the traceback is in the gateway's log, under the
    correlation id the answer carries)."""
    message = "the admin API failed to answer; the gateway's log has the details under this correlation id"
    if page:
        response: Response = HTMLResponse(message_page(None, "Internal error", message), status_code=500)
    else:
        response = JSONResponse({"error": "server_error", "error_description": message}, status_code=500)
    return failed(response, f"internal error: {type(error).__name__}")


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


class AdminGate:
    """Every request: a Host other than the listener's own (DNS rebinding) gets 421, except the
    probes and the JWKS, which load balancers and backends may fetch by any name; an exception that
    escapes a handler becomes an audited 500 (inside ``SecurityHeaders``, so it keeps the headers)."""

    def __init__(self, app: ASGIApp, guard: AdminGuard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        if scope["path"] not in UNGATED:
            host = request.headers.get("host", "").lower()
            if host not in self.guard.site.hosts(scope.get("server")):
                await (await self.guard.misdirected(request))(scope, receive, send)
                return
        started = False

        async def send_started(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_started)
        except Exception as error:
            if started:
                raise
            await (await self.guard.crashed(request, error))(scope, receive, send)


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
