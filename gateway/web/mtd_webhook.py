"""The MTD webhook: partners push device risk changes; each accepted change takes effect on the
device's next request and closes its open connections if access is withdrawn.

Answers: 202 accepted (with unknown devices and ignored states listed), 400 malformed (a body
that is not JSON with one reading, ``gateway.http.strict_json``; Content-Type, X-Portcullis-Timestamp
or X-Portcullis-Signature sent more than once), 401 bad or missing signature or timestamp outside
the window, 404 unknown partner, 409 replayed push, 413 body too large, 415 not JSON, 503 not
stored (retry: a push counts as received only once stored).
A verdict older than the partner's newest one stored for its device is acknowledged with the rest
(202) and changes nothing (``gateway.signals.mtd``: ordering).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.decision.service import AccessService
from gateway.errors import SignalUnavailable
from gateway.signals.mtd import MAX_BODY_BYTES, MtdReceiver, Partner, Verdict, WebhookRejected
from gateway.terminal import printable

logger = logging.getLogger(__name__)


def mtd_webhook_app(receiver: MtdReceiver, service: AccessService, clock: Callable[[], datetime]) -> Starlette:
    async def events(request: Request) -> JSONResponse:
        now = clock()
        try:
            partner, body = await _authenticated(request, receiver, now)
            sent_at = datetime.fromtimestamp(int(request.headers["x-portcullis-timestamp"]), UTC)
            verdicts, ignored = receiver.verdicts(body, sent_at=sent_at, now=now,
                                                  tolerance_seconds=partner.tolerance_seconds)
        except WebhookRejected as rejected:
            return _refused(request, rejected)

        def record() -> list[str]:
            """Oldest first, each group stored as reported at its own time (the store orders by it)."""
            unknown: list[str] = []
            service.record_partner_contact(partner.name, now)  # heard from now, whatever time it reports
            for reported_at, group in _by_report_time(verdicts, now):
                unknown += service.record_threat_verdicts(partner.name, group, reported_at)
            return unknown

        stored = await _stored_once(request, receiver, record)
        if isinstance(stored, JSONResponse):
            return stored
        return JSONResponse({"accepted": len(verdicts) - len(stored), "unknownDevices": stored,
                             "ignored": ignored}, status_code=202)

    async def heartbeat(request: Request) -> JSONResponse:
        try:
            partner, _ = await _authenticated(request, receiver, clock())
        except WebhookRejected as rejected:
            return _refused(request, rejected)
        stored = await _stored_once(request, receiver, service.record_partner_contact, partner.name, clock())
        if isinstance(stored, JSONResponse):
            return stored
        return JSONResponse({"partner": partner.name, "heartbeat": "recorded"}, status_code=202)

    return Starlette(routes=[
        Route("/mtd/{partner}/events", events, methods=["POST"]),
        Route("/mtd/{partner}/heartbeat", heartbeat, methods=["POST"]),
    ])


async def _stored_once[T](request: Request, receiver: MtdReceiver, store: Callable[..., T],
                          *arguments: object) -> T | JSONResponse:
    """Claim the push (409 if any process already has), store it in a thread, and give the claim
    back when storing failed so that the partner's retry is accepted (503)."""
    signature = request.headers["x-portcullis-signature"]
    try:
        await receiver.claim(signature)
    except WebhookRejected as rejected:
        return _refused(request, rejected)
    except SignalUnavailable as error:
        return _not_stored(error)
    try:
        return await asyncio.to_thread(store, *arguments)
    except SignalUnavailable as error:
        with contextlib.suppress(SignalUnavailable):
            await receiver.release(signature)
        return _not_stored(error)
    except BaseException:
        with contextlib.suppress(SignalUnavailable):  # not stored: the partner's retry must be accepted
            await receiver.release(signature)
        raise


def _by_report_time(verdicts: list[Verdict], now: datetime) -> Iterator[tuple[datetime, list[Verdict]]]:
    """Verdicts grouped by report time, oldest first (within a time, in the order sent); a push
    without verdicts is still one (empty) group: it counts as the partner's contact."""
    if not verdicts:
        yield now, []
        return
    ordered = sorted(verdicts, key=lambda v: v.reported_at or now)
    for reported_at, group in itertools.groupby(ordered, key=lambda v: v.reported_at or now):
        yield reported_at, list(group)


def _refused(request: Request, rejected: WebhookRejected) -> JSONResponse:
    """Every refusal is logged with its reason (never the body or the signature)."""
    logger.warning("MTD push to partner %s refused with %d: %s", printable(request.path_params.get("partner", "")),
                   rejected.status, printable(rejected.message))
    return JSONResponse({"error": rejected.message}, status_code=rejected.status)


def _not_stored(error: SignalUnavailable) -> JSONResponse:
    return JSONResponse({"error": f"not stored, retry: {error}"}, status_code=503, headers={"Retry-After": "5"})


async def _authenticated(request: Request, receiver: MtdReceiver, now: datetime) -> tuple[Partner, bytes]:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise WebhookRejected(413, f"body larger than {MAX_BODY_BYTES} bytes")
    if _only(request, "Content-Type").split(";")[0].strip() != "application/json":
        raise WebhookRejected(415, "Content-Type must be application/json")
    timestamp, signature = _only(request, "X-Portcullis-Timestamp"), _only(request, "X-Portcullis-Signature")
    body = await request.body()
    partner = receiver.authenticate(request.path_params["partner"], timestamp, signature, body, now)
    return partner, body


def _only(request: Request, name: str) -> str:
    """The header's one value ('' when absent). Sent twice, it is refused: reading the first, as
    Starlette does, would sign off on a push that a proxy or a log reading the last sees otherwise."""
    values = request.headers.getlist(name)
    if len(values) > 1:
        raise WebhookRejected(400, f"{name} must be sent once")
    return values[0] if values else ""
