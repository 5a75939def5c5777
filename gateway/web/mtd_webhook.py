"""The MTD webhook: partners push device risk changes; each accepted change takes effect on the
device's next request and closes its open connections if access is withdrawn.

Answers: 202 accepted (with unknown devices and ignored states listed), 400 malformed, 401 bad or
missing signature or timestamp outside the window, 404 unknown partner, 409 replayed push,
413 body too large, 415 not JSON, 503 not stored (retry: a push counts as received only once stored).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.access import AccessService
from gateway.errors import SignalUnavailable
from gateway.signals.mtd import MAX_BODY_BYTES, MtdReceiver, WebhookRejected


def mtd_webhook_app(receiver: MtdReceiver, service: AccessService, clock: Callable[[], datetime]) -> Starlette:
    async def events(request: Request) -> JSONResponse:
        try:
            partner, body = await _authenticated(request, receiver, clock())
            verdicts, ignored = receiver.verdicts(body)
        except WebhookRejected as rejected:
            return JSONResponse({"error": rejected.message}, status_code=rejected.status)
        try:
            unknown = await asyncio.to_thread(service.record_threat_verdicts, partner.name, verdicts, clock())
        except SignalUnavailable as error:
            return JSONResponse({"error": f"not stored, retry: {error}"}, status_code=503,
                                headers={"Retry-After": "5"})
        receiver.accepted(request.headers["x-portcullis-signature"])
        return JSONResponse({"accepted": len(verdicts) - len(unknown), "unknownDevices": unknown,
                             "ignored": ignored}, status_code=202)

    async def heartbeat(request: Request) -> JSONResponse:
        try:
            partner, _ = await _authenticated(request, receiver, clock())
        except WebhookRejected as rejected:
            return JSONResponse({"error": rejected.message}, status_code=rejected.status)
        try:
            await asyncio.to_thread(service.record_partner_contact, partner.name, clock())
        except SignalUnavailable as error:
            return JSONResponse({"error": f"not stored, retry: {error}"}, status_code=503,
                                headers={"Retry-After": "5"})
        receiver.accepted(request.headers["x-portcullis-signature"])
        return JSONResponse({"partner": partner.name, "heartbeat": "recorded"}, status_code=202)

    return Starlette(routes=[
        Route("/mtd/{partner}/events", events, methods=["POST"]),
        Route("/mtd/{partner}/heartbeat", heartbeat, methods=["POST"]),
    ])


async def _authenticated(request: Request, receiver: MtdReceiver, now: datetime) -> tuple[object, bytes]:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise WebhookRejected(413, f"body larger than {MAX_BODY_BYTES} bytes")
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise WebhookRejected(415, "Content-Type must be application/json")
    body = await request.body()
    partner = receiver.authenticate(request.path_params["partner"], request.headers.get("x-portcullis-timestamp"),
                                    request.headers.get("x-portcullis-signature"), body, now)
    return partner, body
