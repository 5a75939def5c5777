"""The browser flows in real headless Chromium (Debian's, driven by Playwright): a kiosk behind
the forward proxy signs in and reads mail but a download is replaced by the explanation page; a
compliant browser downloads; logout makes the old cookie worthless; a forged callback is refused.

The block page and the download-blocked page are screenshotted. Set PORTCULLIS_SCREENSHOTS=docs/screenshots
to refresh the PNGs the README shows (`PORTCULLIS_SCREENSHOTS=docs/screenshots ./dev test tests/test_chromium.py`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.app import bootstrap
from gateway.app.demo import ALEX_IPHONE, BLAKE_ANDROID
from gateway.identity.browser import COOKIE_NAME
from tests.conftest import CHROMIUM, Gateway, needs_chromium, screenshot
from tests.helpers.browser import spki_pin

pytestmark = needs_chromium
playwright_api = pytest.importorskip("playwright.sync_api")
MAIL, DOCS = "mail.contoso.test", "docs.contoso.test"


@pytest.fixture(scope="module")
def chromium(gateway: Gateway) -> Iterator[object]:
    config = bootstrap.load(gateway.config_dir).config
    pin = spki_pin(config.path(config.gateway_file.gateway.certificates[0].file))
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
            "--disable-background-networking", "--disable-component-update",
            f"--ignore-certificate-errors-spki-list={pin}",
            f"--host-resolver-rules=MAP {MAIL} 127.0.0.1, MAP {DOCS} 127.0.0.1",
        ])
        yield browser
        browser.close()


def sign_in(page: object, user: str, device: str) -> None:
    """On the demo issuer's sign-in page: pick the user and the device, and sign in."""
    page.select_option("select[name=user]", user)  # type: ignore[attr-defined]
    page.select_option("select[name=device_id]", device)  # type: ignore[attr-defined]
    page.click("#sign-in")  # type: ignore[attr-defined]


def test_kiosk_reads_mail_but_a_download_is_replaced(chromium: object, gateway: Gateway, tmp_path: Path) -> None:
    kiosk_port = bootstrap.load(gateway.config_dir).config.gateway_file.kiosk.listen.port  # type: ignore[union-attr]
    context = chromium.new_context(proxy={"server": f"http://127.0.0.1:{kiosk_port}"})  # type: ignore[attr-defined]
    page = context.new_page()
    page.goto(f"https://{MAIL}/owa/")
    assert "Sign in to Contoso" in page.content()
    sign_in(page, "kiosk@contoso.test", "")
    page.wait_for_url(f"https://{MAIL}/owa/")
    assert '"backend":"exchange"' in page.content().replace(" ", "")
    page.goto(f"https://{MAIL}/owa/service.svc/s/GetFileAttachment?id=1")
    assert page.inner_text("h1") == "This file can't be saved here"
    screenshot(page, "download-blocked.png", tmp_path)
    context.close()


def test_a_compliant_browser_downloads_the_document(chromium: object, gateway: Gateway) -> None:
    context = chromium.new_context(accept_downloads=True)  # type: ignore[attr-defined]
    page = context.new_page()
    page.goto(f"https://{DOCS}:{gateway.port}/sites/team/")
    sign_in(page, "alex@contoso.test", ALEX_IPHONE)
    page.wait_for_url(f"https://{DOCS}:{gateway.port}/sites/team/")
    with page.expect_download() as download:
        page.evaluate(f"window.location = 'https://{DOCS}:{gateway.port}/_layouts/15/download.aspx?UniqueId=1'")
    assert download.value.suggested_filename == "Quarterly report.docx"
    context.close()


def test_a_noncompliant_browser_sees_the_block_page(chromium: object, gateway: Gateway, tmp_path: Path) -> None:
    context = chromium.new_context()  # type: ignore[attr-defined]
    page = context.new_page()
    page.goto(f"https://{MAIL}:{gateway.port}/owa/")
    sign_in(page, "blake@contoso.test", BLAKE_ANDROID)
    page.wait_for_url(f"https://{MAIL}:{gateway.port}/owa/")
    assert page.inner_text("h1") == "You can't get there from here"
    assert "53000" in page.inner_text("table")
    screenshot(page, "block-page.png", tmp_path)
    context.close()


def test_after_logout_the_old_cookie_means_signing_in_again(chromium: object, gateway: Gateway) -> None:
    context = chromium.new_context()  # type: ignore[attr-defined]
    page = context.new_page()
    page.goto(f"https://{MAIL}:{gateway.port}/owa/")
    sign_in(page, "alex@contoso.test", ALEX_IPHONE)
    page.wait_for_url(f"https://{MAIL}:{gateway.port}/owa/")
    [session] = [c for c in context.cookies() if c["name"] == COOKIE_NAME]
    assert session["httpOnly"] and session["secure"] and session["sameSite"] == "Lax"
    page.goto(f"https://{MAIL}:{gateway.port}/.portcullis/logout")
    page.click("#sign-out")
    page.wait_for_load_state()
    assert "You are signed out" in page.content()
    context.add_cookies([session])  # the copied cookie
    page.goto(f"https://{MAIL}:{gateway.port}/owa/")
    assert "Sign in to Contoso" in page.content()
    context.close()


def test_a_forged_callback_cannot_redirect_elsewhere(chromium: object, gateway: Gateway) -> None:
    context = chromium.new_context()  # type: ignore[attr-defined]
    page = context.new_page()
    page.goto(f"https://{MAIL}:{gateway.port}/.portcullis/callback?code=x&state=forged"
              "&return_url=https://evil.example/")
    assert page.url.startswith(f"https://{MAIL}:{gateway.port}/.portcullis/callback")
    assert page.inner_text("h1") == "Sign-in failed"
    context.close()
