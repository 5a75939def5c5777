"""Tokens minted for the demo apps (Outlook mobile, HMAC forgeries) and a settable clock for validation."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

from gateway.app.demo import ALEX_IPHONE, EXCHANGE, OUTLOOK_MOBILE
from tests.conftest import (
    Gateway,
)


def outlook_token(gateway: Gateway, **kwargs: object) -> str:
    claims = {"user": "alex@contoso.test", "client_id": OUTLOOK_MOBILE, "audience": EXCHANGE,
              "device_id": ALEX_IPHONE, **kwargs}
    return gateway.idp.mint(**claims)  # type: ignore[arg-type]  # test helper


def _hmac_token(claims: dict[str, object], secret: bytes, kid: str) -> str:
    """Signed by hand: pyjwt itself refuses to use a PEM public key as an HMAC secret."""

    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{part(json.dumps({'alg': 'HS256', 'typ': 'JWT', 'kid': kid}).encode())}." \
                    f"{part(json.dumps(claims).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{part(signature)}"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now
