"""Kiosk browsers through the forward proxy: they reach the protected hosts (intercepted with the
gateway's certificates), sign in at the issuer (passed through), and count as unmanaged browsers
at the kiosk location, whatever device their token names; other destinations are refused."""

from __future__ import annotations

import httpx
import pytest

from gateway.app.demo import ALEX_IPHONE, EXCHANGE, OUTLOOK_MOBILE
from gateway.identity.browser import COOKIE_NAME
from tests.conftest import Gateway
from tests.helpers.hosts import DOCS, MAIL
from tests.helpers.kiosk import kiosk_sign_in


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
