"""Browser sign-in through the real listener and the demo issuer: authorization code with PKCE,
an encrypted host-only session cookie the upstream never sees, logout revoking the session on
the server, and callbacks that cannot be forged or turned into an open redirect."""

from __future__ import annotations

import pytest

from gateway.app.demo import ALEX_IPHONE, BLAKE_ANDROID
from gateway.identity.browser import COOKIE_NAME
from tests.conftest import Gateway
from tests.helpers.browser import BROWSER, granted_callback, sign_in
from tests.helpers.hosts import DOCS, MAIL


def test_a_browser_signs_in_and_comes_back_to_the_page_it_asked_for(gateway: Gateway) -> None:
    answer, cookie = sign_in(gateway)
    assert answer.status_code == 302
    assert answer.headers["location"] == f"https://{MAIL}/owa/?folder=inbox"
    attributes = answer.headers["set-cookie"].split("; ")[1:]
    assert {"Path=/", "Secure", "HttpOnly", "SameSite=Lax"} <= set(attributes)
    assert cookie.startswith(f"{COOKIE_NAME}=") and "Domain" not in answer.headers["set-cookie"]
    page = gateway.request(MAIL, "/owa/?folder=inbox", headers={**BROWSER, "Cookie": f"{cookie}; theme=dark"})
    assert page.status_code == 200
    received = page.json()["receivedHeaders"]
    assert received["x-portcullis-user"] == "alex@contoso.test"
    assert received["x-demo-cookie-names"] == "theme"  # the gateway's cookie never reaches the upstream


def test_a_noncompliant_browser_gets_the_block_page_after_signing_in(gateway: Gateway) -> None:
    _, cookie = sign_in(gateway, user="blake@contoso.test", device=BLAKE_ANDROID)
    page = gateway.request(MAIL, "/owa/", headers={**BROWSER, "Cookie": cookie})
    assert page.status_code == 403
    assert "You can't get there from here" in page.text and "53000" in page.text


def test_logout_revokes_the_session_on_the_server(gateway: Gateway) -> None:
    _, cookie = sign_in(gateway)
    assert gateway.request(MAIL, "/owa/", headers={**BROWSER, "Cookie": cookie}).status_code == 200
    form = gateway.request(MAIL, "/.portcullis/logout", headers={**BROWSER, "Cookie": cookie})
    assert form.status_code == 200 and "set-cookie" not in form.headers  # a GET only shows the button
    forged = gateway.request(MAIL, "/.portcullis/logout", method="POST",
                             headers={**BROWSER, "Cookie": cookie, "Origin": "https://evil.example"})
    assert forged.status_code == 403
    assert gateway.request(MAIL, "/owa/", headers={**BROWSER, "Cookie": cookie}).status_code == 200
    out = gateway.request(MAIL, "/.portcullis/logout", method="POST",
                          headers={**BROWSER, "Cookie": cookie, "Origin": f"https://{MAIL}"})
    assert out.status_code == 200 and "Max-Age=0" in out.headers["set-cookie"]
    again = gateway.request(MAIL, "/owa/", headers={**BROWSER, "Cookie": cookie})  # a copied cookie
    assert again.status_code == 302 and "/oauth2/authorize?" in again.headers["location"]


@pytest.mark.parametrize(
    ("mangle", "host"),
    [
        pytest.param(lambda c: c[:-4] + ("AAAA" if not c.endswith("AAAA") else "BBBB"), MAIL, id="tampered cookie"),
        pytest.param(lambda c: c, DOCS, id="cookie of another host"),
    ],
)
def test_a_cookie_that_is_not_this_hosts_session_means_signing_in(gateway: Gateway, mangle, host: str) -> None:
    _, cookie = sign_in(gateway)
    path = "/sites/team/" if host == DOCS else "/owa/"
    answer = gateway.request(host, path, headers={**BROWSER, "Cookie": mangle(cookie)})
    assert answer.status_code == 302 and "/oauth2/authorize?" in answer.headers["location"]


def test_a_callback_the_gateway_did_not_start_is_refused(gateway: Gateway) -> None:
    forged = gateway.request(MAIL, "/.portcullis/callback?code=abc&state=made-up")
    assert forged.status_code == 400 and "Sign-in failed" in forged.text
    assert "set-cookie" not in forged.headers


def test_the_return_url_cannot_leave_the_host(gateway: Gateway) -> None:
    """The URL to return to is the one the browser asked this host for, kept server-side with the
    state: a scheme-relative target is refused outright, and parameters added to the callback
    change nothing."""
    assert gateway.request(MAIL, "//evil.example/owa/", headers=BROWSER).status_code == 400
    callback, binding = granted_callback(gateway, "alex@contoso.test", ALEX_IPHONE)
    answer = gateway.request(MAIL, f"{callback}&return_url=https://evil.example/&redirect_uri=https://evil.example/",
                             headers={"Cookie": binding})
    assert answer.status_code == 302 and answer.headers["location"] == f"https://{MAIL}/owa/"


def test_api_clients_still_get_401_not_a_redirect(gateway: Gateway) -> None:
    answer = gateway.request(MAIL, "/owa/")
    assert answer.status_code == 401


def test_sign_in_frequency_asks_for_a_fresh_sign_in_once_it_has_passed() -> None:
    from datetime import UTC, datetime, timedelta

    from gateway.identity.browser import BrowserSignIn
    from gateway.policy.model import Identity, SessionControls
    from gateway.state.session_records import BrowserSession

    signed_in = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
    identity = Identity(subject="s", user_principal_name="u", object_id=None, tenant_id=None, client_id=None,
                        device_id=None, groups=frozenset(), audience="a", expires_at=0)
    session = BrowserSession(identity, MAIL, signed_in)
    hourly, none = SessionControls(sign_in_frequency_seconds=3600), SessionControls()
    needs = BrowserSignIn.needs_fresh_sign_in
    assert not needs(session, hourly, signed_in + timedelta(minutes=59))
    assert needs(session, hourly, signed_in + timedelta(minutes=60))
    assert not needs(session, none, signed_in + timedelta(days=2))


def test_a_callback_from_another_browser_is_refused(gateway: Gateway) -> None:
    """Login CSRF: an attacker's own callback URL, opened in a victim's browser, signs nobody in."""
    callback, _attackers_cookie = granted_callback(gateway, "blake@contoso.test", BLAKE_ANDROID)
    victim = gateway.request(MAIL, callback)  # the victim's browser has no sign-in cookie of its own
    assert victim.status_code == 400 and "set-cookie" not in victim.headers


def test_a_session_also_serves_the_pages_scripts_and_images(gateway: Gateway) -> None:
    _, cookie = sign_in(gateway)
    xhr = gateway.request(MAIL, "/owa/service.svc?action=GetFolder", headers={"Accept": "*/*", "Cookie": cookie})
    assert xhr.status_code == 200


@pytest.mark.parametrize("path", ["/%2Eportcullis/callback?code=x&state=y", "/.PORTCULLIS/callback?code=x&state=y"])
def test_the_reserved_prefix_in_any_spelling_is_the_gateways(gateway: Gateway, path: str) -> None:
    answer = gateway.request(MAIL, path, headers=BROWSER)
    assert answer.status_code in (400, 404) and "backend" not in answer.text
