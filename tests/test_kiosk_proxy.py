"""Kiosk browsers through the forward proxy: they reach the protected hosts (intercepted with the
gateway's certificates), sign in at the issuer (passed through), and count as unmanaged browsers
at the kiosk location, whatever device their token names; other destinations are refused."""

from __future__ import annotations

import ssl
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from gateway import bootstrap
from gateway.demo import ALEX_IPHONE, EXCHANGE, OUTLOOK_MOBILE
from gateway.identity.browser import COOKIE_NAME
from tests.conftest import Gateway

MAIL, DOCS = "mail.contoso.test", "docs.contoso.test"
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


@pytest.fixture
def kiosk(gateway: Gateway) -> httpx.Client:
    return kiosk_browser(gateway)


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


def test_kiosk_signs_in_reads_owa_and_cannot_download(kiosk: httpx.Client) -> None:
    landed = kiosk_sign_in(kiosk)
    assert "Max-Age" not in landed.headers["set-cookie"]  # persistentBrowser: never
    cookie = landed.headers["set-cookie"].split(";", 1)[0]
    assert cookie.startswith(COOKIE_NAME)
    page = kiosk.get(f"https://{MAIL}/owa/", headers={"Cookie": cookie})
    assert page.status_code == 200 and page.json()["backend"] == "exchange"
    download = kiosk.get(f"https://{DOCS}/_layouts/15/download.aspx?UniqueId=1", headers={"Cookie": cookie})
    assert download.status_code in (302, 403)  # another host: its own sign-in first
    attachment = kiosk.get(f"https://{MAIL}/owa/service.svc/s/GetFileAttachment?id=1", headers={"Cookie": cookie})
    assert attachment.status_code == 403 and "This file can't be saved here" in attachment.text


def test_a_compliant_phones_token_is_still_an_unmanaged_browser_at_the_kiosk(gateway: Gateway,
                                                                            kiosk: httpx.Client) -> None:
    token = gateway.idp.mint(user="alex@contoso.test", client_id=OUTLOOK_MOBILE, audience=EXCHANGE,
                             device_id=ALEX_IPHONE)
    answer = kiosk.post(f"https://{MAIL}/Microsoft-Server-ActiveSync?Cmd=Sync",
                        headers={"Authorization": f"Bearer {token}", "Accept": "*/*"})
    assert answer.status_code == 403
    record = gateway.decision(answer.headers["x-portcullis-correlation-id"])
    assert record["clientAppUsed"] == "browser"
    assert record["deviceDetail"]["isManaged"] is False


def test_destinations_that_are_not_protected_are_refused(kiosk: httpx.Client) -> None:
    with pytest.raises(httpx.ProxyError):
        kiosk.get("https://intranet.example.test/")


def test_the_kiosk_proxy_never_reaches_an_upstream_directly(kiosk: httpx.Client, demo_ports: object) -> None:
    """Pass-through is an exact host:port (the issuer); the upstreams' own addresses are refused,
    in plain HTTP and through CONNECT."""
    mail_upstream = demo_ports.mail  # type: ignore[attr-defined]
    plain = kiosk.get(f"http://127.0.0.1:{mail_upstream}/owa/")
    assert plain.status_code == 400 and "backend" not in plain.text
    with pytest.raises(httpx.ProxyError):
        kiosk.get(f"https://127.0.0.1:{mail_upstream}/owa/")
