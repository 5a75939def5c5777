"""MTD partner pushes (signed verdicts) and Alex's ActiveSync Sync that they affect."""

from __future__ import annotations

import json
import time
import uuid

import httpx

from gateway.app.demo import ALEX_IPHONE, EXCHANGE, OUTLOOK_MOBILE, activesync
from gateway.signals.mtd import sign
from tests.conftest import MTD_SECRET, Gateway
from tests.helpers.hosts import MAIL, SERVICE


def push(gateway: Gateway, body: bytes | str, *, partner: str = "demo-mtd", secret: str = MTD_SECRET,
         timestamp: int | None = None, path: str = "events", headers: dict[str, str] | None = None) -> httpx.Response:
    raw = body.encode() if isinstance(body, str) else body
    ts = str(int(time.time()) if timestamp is None else timestamp)
    sent = {"Content-Type": "application/json", "X-Portcullis-Timestamp": ts,
            "X-Portcullis-Signature": sign(secret.encode(), ts, raw), **(headers or {})}
    return gateway.request(SERVICE, f"/mtd/{partner}/{path}", method="POST", content=raw, headers=sent)


def level(device_id: str, state: str) -> str:
    """A push as partners send them: each carries its own event id, so two pushes differ."""
    return json.dumps({"events": [{"deviceId": device_id, "threatLevel": state, "eventId": str(uuid.uuid4())}]})


def sync(gateway: Gateway, path: str = activesync(ALEX_IPHONE), **kwargs: object) -> httpx.Response:
    token = gateway.idp.mint(user="alex@contoso.test", client_id=OUTLOOK_MOBILE, audience=EXCHANGE,
                             device_id=ALEX_IPHONE)
    return gateway.request(MAIL, path, method="POST", token=token, **kwargs)  # type: ignore[arg-type]
