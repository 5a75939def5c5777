"""The admin dashboard in real headless Chromium (Debian's, driven by Playwright): a reader signs in
with a pasted token, filters the recent decisions, opens one and reads its explanation, under a
Content-Security-Policy that allows no script and only the page's own stylesheet.

Set PORTCULLIS_SCREENSHOTS=docs/screenshots to refresh docs/screenshots/dashboard.png.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.app.demo import ALEX_IPHONE, BLAKE_ANDROID, SCENARIOS, scenario_token
from tests.conftest import CHROMIUM, Gateway, needs_chromium, screenshot
from tests.helpers.admin import READER, admin_token, outlook, sync

pytestmark = needs_chromium
playwright_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync", "--disable-background-networking",
            "--disable-component-update"])
        yield browser
        browser.close()


def test_a_reader_filters_decisions_and_reads_one_explanation(chromium: object, gateway: Gateway,
                                                              tmp_path: Path) -> None:
    for scenario in SCENARIOS:  # what the demo prints, for a dashboard with some history
        gateway.request(scenario.host, scenario.path, method=scenario.method, headers=dict(scenario.headers),
                        token=scenario_token(gateway.idp, scenario), certificate=gateway.demo_certificate(
                            scenario.certificate))
    blake = sync(gateway, outlook(gateway, user="blake@contoso.test", device=BLAKE_ANDROID), BLAKE_ANDROID, "blake")
    alex = sync(gateway, outlook(gateway), ALEX_IPHONE)
    assert (blake.status_code, alex.status_code) == (403, 200)
    blake_id, alex_id = (r.headers["X-Portcullis-Correlation-Id"] for r in (blake, alex))
    base = f"http://127.0.0.1:{gateway.admin_port}"
    context = chromium.new_context()  # type: ignore[attr-defined]
    page = context.new_page()
    refused: list[str] = []
    page.on("console", lambda message: refused.append(message.text) if "Content Security Policy" in message.text
            else None)

    assert page.goto(f"{base}/").status == 401  # no token yet: the sign-in form
    page.fill("#token", admin_token(gateway, READER, user="rita@contoso.test"))
    page.click("#sign-in")
    page.wait_for_url(f"{base}/")
    assert page.inner_text("#caller") == "rita@contoso.test (Portcullis.Reader)"
    [cookie] = [c for c in context.cookies() if c["name"] == "portcullis_admin"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert page.eval_on_selector("header", "e => getComputedStyle(e).backgroundColor") == "rgb(31, 41, 55)"
    assert page.locator(f'tr[data-id="{alex_id}"]').count() == 1
    screenshot(page, "dashboard.png", tmp_path)

    page.select_option("#filter-result", "block")
    page.fill("#filter-user", "blake")
    page.click("#filter")
    page.wait_for_url(lambda url: "result=block&user=blake&" in url)
    rows = page.locator("#decisions tbody tr").all_inner_texts()
    assert rows and all("block" in row and "blake@contoso.test" in row for row in rows)
    assert page.locator(f'tr[data-id="{alex_id}"]').count() == 0
    assert page.locator(f'tr[data-id="{blake_id}"]').count() == 1
    assert "exchange-outlook-only" in page.inner_text("#policy-hits")
    assert "jwks" in page.inner_text("#signals") and "policies in force" in page.inner_text("#config")

    page.select_option("#filter-result", "")
    page.fill("#filter-user", "")
    page.fill("#filter-device", BLAKE_ANDROID[:8])
    page.select_option("#filter-policy", "exchange-outlook-only")
    page.click("#filter")
    page.wait_for_url(lambda url: f"device={BLAKE_ANDROID[:8]}&" in url)
    assert page.locator(f'tr[data-id="{blake_id}"]').count() == 1
    assert page.locator(f'tr[data-id="{alex_id}"]').count() == 0

    page.click(f'tr[data-id="{blake_id}"] a.explain')
    page.wait_for_url(f"{base}/decisions/{blake_id}")
    explanation = page.inner_text("#explanation")
    assert explanation.startswith(f"Decision {blake_id}")
    assert "[x] exchange-outlook-only: failure" in explanation
    assert f'"correlationId": "{blake_id}"' in (page.text_content("#record") or "")
    screenshot(page, "dashboard-decision.png", tmp_path)
    assert refused == []

    page.click("text=Sign out")
    page.wait_for_url(f"{base}/signin")
    assert page.goto(f"{base}/").status == 401
    context.close()


def test_a_wrong_token_pasted_into_the_sign_in_form_is_refused(chromium: object, gateway: Gateway) -> None:
    context = chromium.new_context()  # type: ignore[attr-defined]
    page = context.new_page()
    page.goto(f"http://127.0.0.1:{gateway.admin_port}/signin")
    page.fill("#token", outlook(gateway))  # Alex's Exchange token: not for the admin audience
    page.click("#sign-in")
    page.wait_for_load_state()
    assert "audience" in page.inner_text("#problem")
    assert not [c for c in context.cookies() if c["name"] == "portcullis_admin"]
    context.close()
