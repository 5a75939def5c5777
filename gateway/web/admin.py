"""The admin listener (``admin:`` in portcullis.yaml), apart from the proxy and on loopback by default:

    GET  /healthz                 anyone: the process answers
    GET  /readyz                  anyone: each readiness check's name and status; 200 pass or warn, 503 fail
                                  (Reader, with the Authorization header: each check's detail and age too)
    GET  /metrics                 Reader: Prometheus text
    GET  /admin/decisions/{id}    Reader: one decision log record (with Accept: text/plain, its explanation)
    POST /admin/whatif            Reader: a What If question as JSON, answered as ``portcullis whatif --json``
    POST /admin/reload            Operator: reload the config directory now; 200 applied, 422 rejected
    GET  /                        Reader: the dashboard; GET /decisions/{id}: one decision explained
    GET|POST /signin, POST /signout   the dashboard's cookie: a pasted token
    GET  /.well-known/jwks.json   anyone: the keys backends verify upstream identity assertions with

Callers present an access token from the admin issuer (``admin.issuer``, else the first of
``identity``) whose ``aud`` is ``admin.audience``
and whose ``roles`` claim names Portcullis.Reader or Portcullis.Operator (an operator may do what
a reader may). The token is validated on every request: 401 with a Bearer challenge when it is
missing or invalid, 403 when its roles do not allow the action. Browsers may carry it in an
HttpOnly, SameSite=Strict cookie, for GET pages only: what changes state reads the Authorization
header alone, so no other site can make a browser send it. Every request except the probes, the
sign-in form's page, sign-out and the JWKS is written to the admin audit log and counted in a
metric, and so are unknown paths and methods, requests for another Host (421) and internal errors
(gateway/web/admin_guard.py).

A decision not among the recent ones in memory is looked for in the decision log files, which
may be a gigabyte: those scans run one at a time on a thread of their own (never in the default
executor, which the request path's SQLite lookups use), and at most ``SCAN_QUEUE`` wait; others
get 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from prometheus_client.exposition import choose_encoder
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.app.workers import ONLY_WORKER, Worker
from gateway.config.loader import validate
from gateway.decision.service import Clock, utc_now
from gateway.http.strict_json import JsonRefused
from gateway.http.strict_json import loads as strict_json
from gateway.ops.admin_audit import AdminAuditLog, TargetResource
from gateway.ops.cases import QuestionInput
from gateway.ops.explain import explain
from gateway.ops.health import overall
from gateway.ops.operations import Operations
from gateway.ops.whatif import WhatIf, WhatIfError, as_json, policy_states
from gateway.policy.model import Identity
from gateway.web.admin_guard import (
    OPERATOR,
    READER,
    AdminAction,
    AdminGate,
    AdminGuard,
    AdminSite,
    Credential,
    Done,
    Refusal,
    SecurityHeaders,
    failed,
    read_limited,
)
from gateway.web.assertion_keys import jwks_route
from gateway.web.dashboard import (
    ConfigState,
    DecisionFilter,
    Overview,
    decision_page,
    message_page,
    overview_page,
    sign_in_page,
)
from gateway.web.embedded import serving

DECISION_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
RELOAD_TRIGGER = "adminApi"
SCAN_QUEUE = 4  # decision log scans admitted at once: one reading the files, the others waiting
SCAN_RETRY_AFTER = 5  # seconds, in the 429 of a lookup beyond them

READ_METRICS = AdminAction("readMetrics", "Read metrics", "Monitoring", READER)
READ_READINESS = AdminAction("readReadiness", "Read readiness details", "Monitoring", READER)
READ_DECISION = AdminAction("readDecision", "Read a decision", "Monitoring", READER)
WHAT_IF = AdminAction("whatIf", "Ask What If", "Policy", READER)
RELOAD = AdminAction("reload", "Reload configuration", "Policy", OPERATOR)
VIEW_DASHBOARD = AdminAction("viewDashboard", "View the dashboard", "Monitoring", READER, Credential.header_or_cookie)
VIEW_DECISION = AdminAction("viewDecision", "View a decision", "Monitoring", READER, Credential.header_or_cookie)
SIGN_IN = AdminAction("signIn", "Sign in to the dashboard", "Authentication", READER, Credential.form)


class Busy(Exception):
    """Too many decision log scans already admitted."""


class LogScans:
    """Blocking reads of the decision log files: on one thread of their own, at most ``queue``
    admitted at once (the semaphore is released when the scan is over, even if its caller left)."""

    def __init__(self, queue: int = SCAN_QUEUE) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="admin-log-scan")
        self._admitted = asyncio.Semaphore(queue)

    async def run[T](self, scan: Callable[[], T]) -> T:
        """``scan()``'s result; raises ``Busy`` when the queue is full."""
        if self._admitted.locked():
            raise Busy
        await self._admitted.acquire()  # immediate: not locked
        loop = asyncio.get_running_loop()
        try:
            future = self._executor.submit(scan)
        except BaseException:
            self._admitted.release()
            raise

        def release(_: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(self._admitted.release)

        future.add_done_callback(release)
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class AdminApi:
    """The handlers; each reads the rules in force when it runs (a reload swaps them)."""

    def __init__(self, operations: Operations, audience: str, audit: AdminAuditLog, *,
                 clock: Clock = utc_now, site: AdminSite | None = None) -> None:
        self.operations = operations
        self.service = operations.service
        self._clock = clock
        self._guard = AdminGuard(self.service.validator, audience, audit, self.service.metrics, clock, site,
                                 issuer=self.service.config.gateway_file.admin_issuer)
        self.site = self._guard.site
        self.scans = LogScans()
        self._readiness_details = self._guard(READ_READINESS, self.readiness_details)

    def app(self) -> Starlette:
        guard = self._guard
        routes: list[BaseRoute] = [
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/metrics", guard(READ_METRICS, self.metrics), methods=["GET"]),
            Route("/admin/decisions/{correlation_id}", guard(READ_DECISION, self.decision), methods=["GET"]),
            Route("/admin/whatif", guard(WHAT_IF, self.whatif), methods=["POST"]),
            Route("/admin/reload", guard(RELOAD, self.reload), methods=["POST"]),
            Route("/", guard(VIEW_DASHBOARD, self.dashboard), methods=["GET"]),
            Route("/decisions/{correlation_id}", guard(VIEW_DECISION, self.decision_page), methods=["GET"]),
            Route("/signin", self.sign_in_form, methods=["GET"]),
            Route("/signin", guard(SIGN_IN, self.sign_in), methods=["POST"]),
            Route("/signout", self.sign_out, methods=["POST"]),
        ]
        if self.service.assertions is not None:
            routes.append(jwks_route(self.service.assertions))
        return Starlette(routes=routes, middleware=[Middleware(SecurityHeaders), Middleware(AdminGate, guard=guard)],
                         exception_handlers={404: guard.unrouted, 405: guard.unrouted})

    async def healthz(self, _: Request) -> Response:
        return JSONResponse({"status": "pass"})

    async def readyz(self, request: Request) -> Response:
        """Anyone (a load balancer) gets each check's name and status; the details (rejected config
        problems, device counts) need a Reader's token in the Authorization header."""
        if "authorization" in request.headers:
            return await self._readiness_details(request)
        checks = await asyncio.to_thread(self.operations.health.checks)  # a few SQLite reads
        status = overall(checks)
        return JSONResponse({"status": status, "checks": [{"name": c.name, "status": c.status} for c in checks]},
                            status_code=503 if status == "fail" else 200)

    async def readiness_details(self, _: Request, __: Identity) -> Done:
        checks = await asyncio.to_thread(self.operations.health.checks)
        status = overall(checks)
        return Done(JSONResponse({"status": status, "checks": [c.as_json() for c in checks]},
                                 status_code=503 if status == "fail" else 200),
                    targets=(TargetResource(id="/readyz", display_name="readiness", type="Readiness"),))

    async def metrics(self, request: Request, _: Identity) -> Done:
        """Prometheus text, or OpenMetrics when the scraper asks for it (as prometheus_client's own app)."""
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        body = await asyncio.to_thread(encoder, self.service.metrics.registry)  # scrape-time collectors read SQLite
        return Done(Response(body, headers={"Content-Type": content_type}),
                    targets=(TargetResource(id="/metrics", display_name="metrics", type="Metrics"),))

    async def decision(self, request: Request, _: Identity) -> Done:
        record = await self._record(request.path_params["correlation_id"])
        if isinstance(record, Refusal):
            return failed(JSONResponse({"error": record.reason}, status_code=record.status,
                                       headers=_retry_after(record)), record.reason)
        target = _decision_target(record)
        if "text/plain" in request.headers.get("accept", ""):
            return Done(PlainTextResponse(explain(record)), targets=target)
        return Done(JSONResponse(record), targets=target)

    async def whatif(self, request: Request, _: Identity) -> Done:
        body = await read_limited(request)
        if body is None:
            return failed(JSONResponse({"error": "the question is larger than 64 KiB"}, status_code=413), "too large")
        try:
            data = strict_json(body)
        except JsonRefused as error:
            return _bad_question(f'the body {error}: send {{"user": ..., "url": ..., "app": ..., "device": ...}}')
        model, problems = validate(QuestionInput, data, "question")
        if model is None:
            return _bad_question("; ".join(str(p) for p in problems))
        try:
            urlsplit(model.url).port  # noqa: B018  (raises ValueError for a bad IPv6 address or port)
        except ValueError as error:
            return _bad_question(f"url {model.url!r} is not a valid URL: {error}")
        question = model.question()
        config = self.service.config
        try:
            decision = await WhatIf(config, self.operations.whatif_inventory,
                                          self.operations.service.apps).ask(question, self._clock())
        except WhatIfError as error:
            return _bad_question(str(error))
        answer = as_json(question, decision, policy_states(config))
        return Done(JSONResponse(answer), reason=f"{answer['result']} ({answer['httpStatus']})",
                    targets=(TargetResource(id=question.url, display_name=self._typed_user(question.user),
                                            type="WhatIfQuestion"),))

    async def reload(self, _: Request, __: Identity) -> Done:
        outcome = await self.operations.reloader.reload(RELOAD_TRIGGER)
        target = (TargetResource(id=str(self.operations.reloader.directory), display_name="configuration",
                                 type="Configuration"),)
        if outcome.applied:
            return Done(JSONResponse(outcome.as_json()), reason=f"applied: {outcome.policies} policies in force",
                        targets=target)
        more = f" (and {len(outcome.problems) - 1} more)" if len(outcome.problems) > 1 else ""
        first = outcome.problems[0] if outcome.problems else "no reason given"
        return Done(JSONResponse(outcome.as_json(), status_code=422), succeeded=False,
                    reason=f"rejected, the previous rules stay in force: {first}{more}", targets=target)

    async def dashboard(self, request: Request, caller: Identity) -> Done:
        filters = DecisionFilter.of(request.query_params)
        if isinstance(filters, str):
            return failed(HTMLResponse(message_page(caller, "Bad filter", filters), status_code=400), filters)
        log = self.service.decision_log
        pseudonym = self._pseudonym()
        recent = log.recent()
        matching = [r for r in recent if filters.matches(r, pseudonym)]
        config, reloader = self.service.config, self.operations.reloader
        view = Overview(caller=caller, filters=filters, records=matching[:filters.limit], matching=len(matching),
                        kept=len(recent), policies=[(p.name, p.state.value) for p in config.policies],
                        hits=self.service.metrics.policy_hits(),
                        checks=await asyncio.to_thread(self.operations.health.checks),
                        config=ConfigState(policies=len(config.policies), loaded_at=reloader.loaded_at,
                                           last_reload=reloader.last), now=self._clock())
        return Done(HTMLResponse(overview_page(view)), details={"filter": filters.query(pseudonym)},
                    targets=(TargetResource(id="/", display_name="dashboard", type="Dashboard"),))

    async def decision_page(self, request: Request, caller: Identity) -> Done:
        record = await self._record(request.path_params["correlation_id"])
        if isinstance(record, Refusal):
            title = {404: "No such decision", 429: "Busy"}.get(record.status, "Bad request")
            page = message_page(caller, title, record.reason)
            return failed(HTMLResponse(page, status_code=record.status, headers=_retry_after(record)), record.reason)
        return Done(HTMLResponse(decision_page(caller, record, explain(record))), targets=_decision_target(record))

    async def sign_in_form(self, _: Request) -> Response:
        return HTMLResponse(sign_in_page())

    async def sign_in(self, request: Request, caller: Identity) -> Done:
        """The pasted token was validated as a header's would be; the cookie lives as long as the token."""
        token: str = request.state.pasted_token
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(self.site.cookie_name, token,
                            max_age=max(0, int(caller.expires_at - self._clock().timestamp())),
                            path="/", httponly=True, samesite="strict", secure=self.site.secure)
        return Done(response)

    async def sign_out(self, request: Request) -> Response:
        if not self.site.same_origin(request):
            return PlainTextResponse("sign-out must come from the dashboard's own page", status_code=403)
        response = RedirectResponse("/signin", status_code=303)
        response.delete_cookie(self.site.cookie_name, path="/", httponly=True, samesite="strict",
                               secure=self.site.secure)
        return response

    async def _record(self, correlation_id: str) -> dict[str, Any] | Refusal:
        if not DECISION_ID.match(correlation_id):
            return Refusal(400, "a correlation id is letters, digits, '.', '_' and '-'")
        log = self.service.decision_log
        for record in log.recent():  # memory first: no scan, never refused as busy
            if record.get("correlationId") == correlation_id:
                return record
        try:
            found = await self.scans.run(lambda: log.find(correlation_id))
        except Busy:
            return Refusal(429, "too many decision log searches at once; retry in a few seconds")
        return found if found is not None else Refusal(404, f"no decision {correlation_id} in the decision log")

    def _pseudonym(self) -> Callable[[str], str] | None:
        pseudonymizer = self.service.decision_log.pseudonymizer
        return pseudonymizer.pseudonym if pseudonymizer is not None else None

    def _typed_user(self, user: str) -> str:
        """A user name an admin typed, for the audit log: a pseudonym when the decision log uses them."""
        pseudonym = self._pseudonym()
        return pseudonym(user) if pseudonym is not None else user


def _retry_after(refusal: Refusal) -> dict[str, str] | None:
    return {"Retry-After": str(SCAN_RETRY_AFTER)} if refusal.status == 429 else None


def _bad_question(message: str) -> Done:
    return failed(JSONResponse({"error": "invalid_request", "error_description": message}, status_code=400), message)


def _decision_target(record: dict[str, Any]) -> tuple[TargetResource, ...]:
    return (TargetResource(id=str(record.get("correlationId")), display_name=str(record.get("result")),
                           type="Decision"),)


@contextlib.asynccontextmanager
async def admin_listener(operations: Operations, *, clock: Clock = utc_now,
                         worker: Worker = ONLY_WORKER) -> AsyncIterator[tuple[str, int] | None]:
    """The admin API on ``admin.listen`` in the running loop, while the context lasts; the bound
    address, or None when the config has no ``admin`` section. Worker i of ``--workers N``
    listens on the port + i and audits to a file of its own."""
    config = operations.service.config
    settings = config.gateway_file.admin
    if settings is None:
        yield None
        return
    site = AdminSite(public_origin=settings.public_url, listen_host=settings.listen.host)
    audit = AdminAuditLog(worker.own_file(config.path(settings.audit_log)))
    api = AdminApi(operations, settings.audience, audit, clock=clock, site=site)
    try:
        async with serving(api.app(), settings.listen.host, worker.own_port(settings.listen.port),
                           name="the admin API") as address:
            yield address
    finally:
        api.scans.close()
        audit.close()
