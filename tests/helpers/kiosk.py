"""The kiosk browser: requests through the gateway's kiosk forward proxy, and its sign-in."""

from __future__ import annotations

import ssl
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx

from gateway.app import bootstrap
from tests.conftest import Gateway
from tests.helpers.hosts import MAIL

BROWSER = {"Accept": "text/html", "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) KioskBrowser"}


def kiosk_browser(gateway: Gateway, config_dir: Path | None = None) -> httpx.Client:
    """A kiosk browser: every request goes through the gateway's kiosk proxy (or that of the
    gateway a test started with ``config_dir``), and it trusts the gateway's CA."""
    config = bootstrap.load(config_dir or gateway.config_dir).config
    assert config.gateway_file.kiosk is not None
    context = ssl.create_default_context()
    gateway.ca.configure_trust(context)
    return httpx.Client(proxy=f"http://127.0.0.1:{config.gateway_file.kiosk.listen.port}", verify=context,
                        timeout=10, headers=BROWSER)


def kiosk_sign_in(kiosk: httpx.Client, *, user: str = "kiosk@contoso.test", device: str = "") -> httpx.Response:
    """Open OWA through the kiosk and sign in at the issuer (passed through untouched), naming
    ``device`` there; the callback's answer, which sets the session cookie."""
    start = kiosk.get(f"https://{MAIL}/owa/")
    assert start.status_code == 302
    authorize = start.headers["location"]
    query = {k: v[0] for k, v in parse_qs(urlsplit(authorize).query).items()}
    assert kiosk.get(authorize).status_code == 200  # the issuer's page, passed through untouched
    granted = kiosk.post(authorize.split("?")[0], data={**query, "user": user, "device_id": device})
    landed = kiosk.get(granted.headers["location"])
    assert landed.status_code == 302 and landed.headers["location"] == f"https://{MAIL}/owa/"
    return landed
