"""Mobile Threat Defense partners pushing device risk to the gateway.

A partner signs each push: ``X-Portcullis-Signature: sha256=<hex>`` is HMAC-SHA256 with the
partner's shared secret over ``<timestamp>.<body>``, and ``X-Portcullis-Timestamp`` is Unix time.
A push is accepted once, within ``timestampToleranceSeconds`` of the gateway's clock.

    POST /mtd/<partner>/events      {"events": [{"deviceId": "...", "threatLevel": "highSeverity",
                                                 "reportedDateTime": "2026-11-23T12:00:00.125Z"}]}
    POST /mtd/<partner>/heartbeat   {}

Order: ``reportedDateTime`` (optional, ISO 8601 with a time zone) is when the partner observed the
state; without it, the push's signed timestamp stands for it (the end of that second, or the time
the push arrived if earlier). The store ignores a verdict older
than the partner's newest one for that device, so a push delayed or retried past a newer one is
acknowledged (202: resending it would change nothing, and a partner retries anything else) without
undoing it. A time more than ``timestampToleranceSeconds`` ahead of the gateway's clock is refused
(400: the partner's clock is wrong, and such a verdict would outrank every later one); a time just
ahead counts as now.

Levels: ``secured | low | medium | high``, Graph's ``partnerReportedThreatState`` values
(``secured``, ``lowSeverity``, ``mediumSeverity``, ``highSeverity``, ``compromised`` = high;
``deactivated`` and ``unknown`` clear the partner's verdict; ``activated``, ``misconfigured`` and
``unresponsive`` carry no level and are ignored) and words partners commonly use (``none``, ``clean``,
``critical``). A partner that has not been heard from for ``unresponsiveAfterSeconds`` has its
verdicts ignored, as Intune does after ``partnerUnresponsivenessThresholdInDays``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from gateway.config.models import MtdPartnerSettings
from gateway.http.strict_json import JsonRefused
from gateway.http.strict_json import loads as strict_json
from gateway.policy.model import DeviceThreatLevel
from gateway.state.nonces import MemoryNonces, NonceStore

MAX_BODY_BYTES = 64 * 1024
SIGNATURE = re.compile(r"sha256=[0-9a-f]{64}")
MAX_EVENTS = 1000
LEVELS = {
    "secured": DeviceThreatLevel.secured, "none": DeviceThreatLevel.secured, "clean": DeviceThreatLevel.secured,
    "low": DeviceThreatLevel.low, "lowseverity": DeviceThreatLevel.low,
    "medium": DeviceThreatLevel.medium, "mediumseverity": DeviceThreatLevel.medium,
    "high": DeviceThreatLevel.high, "highseverity": DeviceThreatLevel.high,
    "compromised": DeviceThreatLevel.high, "critical": DeviceThreatLevel.high,
}
CLEARS = frozenset({"deactivated", "unknown"})
SIGNED_SECOND = timedelta(seconds=1) - timedelta(microseconds=1)
NO_LEVEL = frozenset({"activated", "misconfigured", "unresponsive"})


class WebhookRejected(Exception):
    """A push the gateway refuses; ``status`` is the HTTP answer (4xx)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Partner:
    name: str
    secret: bytes
    tolerance_seconds: int
    unresponsive_after_seconds: int


@dataclass(frozen=True, slots=True)
class Verdict:
    device_id: str
    level: DeviceThreatLevel | None  # None: the partner no longer reports on this device
    reported_at: datetime | None = None  # when the partner observed it (UTC); None: when it was received


def partners_from_config(settings: Mapping[str, MtdPartnerSettings],
                         environ: Mapping[str, str] | None = None) -> dict[str, Partner]:
    """Secrets come from the environment, never from config files; a missing one stops start-up."""
    env = os.environ if environ is None else environ
    partners = {}
    for name, raw in settings.items():
        secret = env.get(raw.secret_env, "")
        if len(secret) < 16:
            raise ValueError(f"mtdPartners.{name}: environment variable {raw.secret_env} must hold the partner's "
                             "shared secret (16 characters or more)")
        partners[name] = Partner(name, secret.encode(), raw.timestamp_tolerance_seconds,
                                 raw.unresponsive_after_seconds)
    return partners


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


class MtdReceiver:
    """Checks pushes (signature, time window, replay, size, shape) and turns them into verdicts."""

    def __init__(self, partners: dict[str, Partner], nonces: NonceStore | None = None) -> None:
        self.partners = partners
        longest = max((p.tolerance_seconds for p in partners.values()), default=300)
        self.replay_window_seconds = 2 * longest  # a signature is remembered while its timestamp could pass
        self.nonces: NonceStore = nonces if nonces is not None else MemoryNonces()

    def authenticate(self, partner_name: str, timestamp: str | None, signature: str | None, body: bytes,
                     now: datetime) -> Partner:
        partner = self.partners.get(partner_name)
        if partner is None:
            raise WebhookRejected(404, "unknown MTD partner")
        if len(body) > MAX_BODY_BYTES:
            raise WebhookRejected(413, f"body larger than {MAX_BODY_BYTES} bytes")
        if not timestamp or not signature:
            raise WebhookRejected(401, "X-Portcullis-Timestamp and X-Portcullis-Signature are required")
        if not timestamp.isdigit() or abs(now.timestamp() - int(timestamp)) > partner.tolerance_seconds:
            raise WebhookRejected(401, "timestamp outside the accepted window")
        if not SIGNATURE.fullmatch(signature):
            raise WebhookRejected(401, "X-Portcullis-Signature must be sha256=<64 lower-case hex digits>")
        if not hmac.compare_digest(sign(partner.secret, timestamp, body), signature):
            raise WebhookRejected(401, "signature does not match")
        return partner

    async def claim(self, signature: str) -> None:
        """A push is taken once, by whichever process or host receives it first (409 after);
        ``release`` it when it could not be stored, so that the partner's retry is accepted.
        Raises SignalUnavailable when a shared nonce store cannot answer."""
        if not await self.nonces.claim(signature, self.replay_window_seconds):
            raise WebhookRejected(409, "this push was already received")

    async def release(self, signature: str) -> None:
        await self.nonces.release(signature)

    def verdicts(self, body: bytes, *, sent_at: datetime | None = None, now: datetime | None = None,
                 tolerance_seconds: int = 300) -> tuple[list[Verdict], list[str]]:
        """The verdicts a push carries, and the states it carried that set no level. Each verdict's
        time is its event's ``reportedDateTime``, else ``sent_at`` (the signed timestamp), never
        later than ``now``."""
        latest = (now or datetime.now(UTC)).astimezone(UTC)
        try:
            document = strict_json(body, max_bytes=MAX_BODY_BYTES)
        except JsonRefused as error:
            raise WebhookRejected(400, f"body {error}") from error
        events = document.get("events", [document]) if isinstance(document, dict) else document
        if not isinstance(events, list) or not events or len(events) > MAX_EVENTS:
            raise WebhookRejected(400, f"expected 1 to {MAX_EVENTS} events")
        verdicts, ignored = [], []
        for index, event in enumerate(events):
            device_id = event.get("deviceId") if isinstance(event, dict) else None
            state = event.get("threatLevel", event.get("partnerReportedThreatState")) if isinstance(event, dict) \
                else None
            if not isinstance(device_id, str) or not device_id or not isinstance(state, str):
                raise WebhookRejected(400, f"events[{index}] needs deviceId and threatLevel strings")
            reported = _reported_at(event, index, sent_at, latest, tolerance_seconds)
            key = state.strip().lower()
            if key in LEVELS:
                verdicts.append(Verdict(device_id.lower(), LEVELS[key], reported))
            elif key in CLEARS:
                verdicts.append(Verdict(device_id.lower(), None, reported))
            elif key in NO_LEVEL:
                ignored.append(f"{device_id}: {state}")
            else:
                raise WebhookRejected(400, f"events[{index}].threatLevel {state!r} is not a known level "
                                           f"({', '.join(sorted(LEVELS))}, {', '.join(sorted(CLEARS | NO_LEVEL))})")
        return verdicts, ignored


def _reported_at(event: dict[str, object], index: int, sent_at: datetime | None, latest: datetime,
                 tolerance_seconds: int) -> datetime | None:
    value = event.get("reportedDateTime")
    if value is None:  # the signed timestamp is in whole seconds: the push left before the next one
        return min(sent_at.astimezone(UTC) + SIGNED_SECOND, latest) if sent_at is not None else None
    try:
        reported = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        reported = None
    if reported is None or reported.tzinfo is None:
        raise WebhookRejected(400, f"events[{index}].reportedDateTime must be an ISO 8601 time with a time zone")
    if reported - latest > timedelta(seconds=tolerance_seconds):
        raise WebhookRejected(400, f"events[{index}].reportedDateTime is ahead of the gateway's clock by more "
                                   f"than {tolerance_seconds} s")
    return min(reported.astimezone(UTC), latest)
