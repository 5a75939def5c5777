"""A desktop browser's sign-in at the demo issuer, as the gateway's callback sees it."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gateway.app.demo import ALEX_IPHONE
from tests.conftest import Gateway
from tests.helpers.hosts import MAIL

BROWSER = {"Accept": "text/html,application/xhtml+xml", "User-Agent": "Mozilla/5.0 (X11; Linux x86_64)"}


def granted_callback(gateway: Gateway, user: str, device: str, path: str = "/owa/") -> tuple[str, str]:
    """A browser opens ``path`` and signs in at the issuer: the callback target it is sent to,
    and the sign-in cookie the gateway set on that browser."""
    start = gateway.request(MAIL, path, headers=BROWSER)
    authorize = start.headers["location"]
    query = {k: v[0] for k, v in parse_qs(urlsplit(authorize).query).items()}
    with httpx.Client(timeout=10) as idp:
        granted = idp.post(authorize.split("?")[0], data={**query, "user": user, "device_id": device})
    callback = urlsplit(granted.headers["location"])
    return f"{callback.path}?{callback.query}", start.headers["set-cookie"].split(";", 1)[0]


def sign_in(gateway: Gateway, *, user: str = "alex@contoso.test", device: str = ALEX_IPHONE,
            path: str = "/owa/?folder=inbox", port: int | None = None) -> tuple[httpx.Response, str]:
    """Open ``path`` as a browser, sign in at the demo issuer, follow the callback (through the
    session's gateway, or the listener on ``port``)."""
    start = gateway.request(MAIL, path, headers=BROWSER, port=port)
    assert start.status_code == 302, start.text
    authorize = start.headers["location"]
    query = {k: v[0] for k, v in parse_qs(urlsplit(authorize).query).items()}
    assert query["code_challenge_method"] == "S256" and query["state"] and query["nonce"]
    assert query["redirect_uri"] == f"https://{MAIL}/.portcullis/callback"
    with httpx.Client(timeout=10) as idp:
        assert idp.get(authorize).status_code == 200  # the sign-in page
        granted = idp.post(authorize.split("?")[0], data={**query, "user": user, "device_id": device})
    assert granted.status_code == 302
    callback = urlsplit(granted.headers["location"])
    binding = start.headers["set-cookie"].split(";", 1)[0]  # the browser that started the sign-in
    answer = gateway.request(MAIL, f"{callback.path}?{callback.query}", headers={"Cookie": binding}, port=port)
    cookie = answer.headers.get("set-cookie", "")
    return answer, cookie.split(";", 1)[0]


def spki_pin(certificate_file: Path) -> str:
    """Chromium trusts the gateway's certificate by its public key (no system trust store here)."""
    cert = x509.load_pem_x509_certificate(certificate_file.read_bytes())
    der = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()
