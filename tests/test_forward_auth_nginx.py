"""Debian's nginx in front of the demo Exchange backend with the shipped snippets
(deploy/nginx/portcullis-forward-auth.conf, portcullis-protect.conf), asking a real gateway's
forward-auth listener about each request: what reaches the backend, what the client gets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.app.demo import ACTIVESYNC, ACTIVESYNC_UA, ALEX_IPHONE, BLAKE_ANDROID, BROWSER_UA, activesync
from gateway.http.headers import CORRELATION_ID
from gateway.web import forward_auth
from tests.conftest import Ports, free_port
from tests.helpers.edges import sent_to_sign_in, sign_in_and_out
from tests.helpers.forward_auth import OUTSIDER, ask, endpoint
from tests.helpers.mtd import level, push
from tests.helpers.nginx import needs_nginx, nginx_edge
from tests.helpers.running import Started
from tests.helpers.tokens import outlook_token

pytestmark = needs_nginx

MAIL = "mail.contoso.test"


@pytest.fixture(scope="module")
def edge(portcullis: Started, demo_ports: Ports, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    assert portcullis.running.forward_auth is not None
    with nginx_edge(tmp_path_factory.mktemp("nginx"), forward_auth=portcullis.running.forward_auth[1],
                    backend=demo_ports.mail) as port:
        yield port


def through_nginx(port: int, path: str, *, method: str = "POST", token: str | None = None,
                  headers: dict[str, str] | None = None) -> httpx.Response:
    sent = {"Host": MAIL, "User-Agent": ACTIVESYNC_UA, **({"Authorization": f"Bearer {token}"} if token else {}),
            **(headers or {})}
    return httpx.request(method, f"http://127.0.0.1:{port}{path}", headers=sent, timeout=10)


def received(answer: httpx.Response) -> dict[str, Any]:
    """What the demo backend says it received (its headers, the assertion it verified)."""
    assert answer.json()["backend"] == "exchange"
    return answer.json()


def test_an_allowed_request_reaches_the_backend_with_the_identity_headers_and_assertion(
        edge: int, portcullis: Started) -> None:
    answer = through_nginx(edge, ACTIVESYNC, token=outlook_token(portcullis.gateway))
    assert answer.status_code == 200
    backend = received(answer)
    headers = backend["receivedHeaders"]
    assert headers["x-portcullis-user"] == "alex@contoso.test"
    assert headers["x-portcullis-client-app"] == "outlook-mobile"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert backend["verifiedAssertion"]["sub"], backend["verifiedAssertion"]
    assert "rejected" not in backend["verifiedAssertion"]
    record = portcullis.gateway.decision(headers["x-portcullis-correlation-id"])
    assert record["status"]["errorCode"] == 0 and record["httpStatus"] == 200


def test_a_noncompliant_device_is_blocked_with_403_and_portcullis_answer(edge: int, portcullis: Started) -> None:
    """auth_request passes on the status only: the snippet fetches the refusal's own answer."""
    token = outlook_token(portcullis.gateway, user="blake@contoso.test", device_id=BLAKE_ANDROID)
    answer = through_nginx(edge, activesync(BLAKE_ANDROID, "blake"), token=token)
    assert answer.status_code == 403
    assert answer.json()["error"] == "access_denied" and '"backend"' not in answer.text
    record = portcullis.gateway.decision(answer.json()["correlationId"])
    assert record["httpStatus"] == 403 and record["status"]["failureReason"] == answer.json()["reason"]


def test_a_browser_is_shown_portcullis_block_page(edge: int, portcullis: Started) -> None:
    blake = outlook_token(portcullis.gateway, user="blake@contoso.test", device_id=BLAKE_ANDROID)
    page = through_nginx(edge, activesync(BLAKE_ANDROID, "blake"), token=blake,
                         headers={"Accept": "text/html"})
    assert page.status_code == 403 and page.headers["Content-Type"].startswith("text/html")
    assert "<html" in page.text and page.headers[CORRELATION_ID] in page.text


def test_no_token_is_answered_401_with_portcullis_challenge_once(edge: int) -> None:
    answer = through_nginx(edge, ACTIVESYNC)
    assert answer.status_code == 401
    assert answer.headers.get_list("WWW-Authenticate") == [answer.headers["WWW-Authenticate"]]
    assert 'resource_metadata="https://mail.contoso.test' in answer.headers["WWW-Authenticate"]
    assert answer.json()["error"] == "unauthorized"


def test_a_refusals_answer_is_held_once_and_for_the_edge_only(edge: int, portcullis: Started) -> None:
    answer = ask(portcullis, {"X-Original-URI": ACTIVESYNC, "X-Original-Method": "POST", "Host": MAIL,
                              "X-Forwarded-For": "127.0.0.1", "User-Agent": ACTIVESYNC_UA})
    assert answer.status_code == 401
    held = f"{forward_auth.ANSWER_PATH}{answer.headers[CORRELATION_ID]}"
    with httpx.Client(transport=httpx.HTTPTransport(local_address=OUTSIDER), timeout=10) as outsider:
        assert outsider.get(f"{endpoint(portcullis)}{held}").status_code == 403
    first = httpx.get(f"{endpoint(portcullis)}{held}", timeout=10)
    assert (first.status_code, first.content) == (401, answer.content)
    assert "WWW-Authenticate" not in first.headers  # nginx passes on the question's own: one challenge
    assert httpx.get(f"{endpoint(portcullis)}{held}", timeout=10).status_code == 500


def test_a_browser_signs_in_and_out_through_nginx(edge: int, portcullis: Started) -> None:
    """The sign-in callback and logout under /.portcullis/ go to Portcullis, never upstream."""
    sign_in_and_out(edge, portcullis.gateway.idp.issuer)


def test_portcullis_pages_are_served_by_portcullis_not_the_backend(edge: int) -> None:
    metadata = through_nginx(edge, "/.well-known/oauth-protected-resource", method="GET")
    assert metadata.status_code == 200 and metadata.json()["resource"] == f"https://{MAIL}"
    for spelling in ("/.portcullis/callback?state=x&code=y", "/.Portcullis/callback?state=x&code=y"):
        answer = through_nginx(edge, spelling, method="GET", headers={"Accept": "text/html"})
        assert answer.status_code != 200 and '"backend"' not in answer.text, spelling


def test_a_risk_raise_takes_effect_on_the_next_request(edge: int, portcullis: Started) -> None:
    token = outlook_token(portcullis.gateway)
    assert through_nginx(edge, ACTIVESYNC, token=token).status_code == 200
    assert push(portcullis.gateway, level(ALEX_IPHONE, "high")).status_code == 202
    try:
        blocked = through_nginx(edge, ACTIVESYNC, token=token)
        assert (blocked.status_code, blocked.json()["reason"]) == (403, "device risk high, allowed: low")
    finally:
        assert push(portcullis.gateway, level(ALEX_IPHONE, "secured")).status_code == 202
    assert through_nginx(edge, ACTIVESYNC, token=token).status_code == 200


def test_a_browser_without_a_session_is_redirected_to_sign_in(edge: int, portcullis: Started) -> None:
    answer = through_nginx(edge, "/owa/", method="GET",
                           headers={"User-Agent": BROWSER_UA, "Accept": "text/html"})
    assert sent_to_sign_in(answer, portcullis.gateway.idp.issuer), answer.headers


def test_headers_a_client_sends_neither_change_the_decision_nor_reach_the_backend(
        edge: int, portcullis: Started) -> None:
    """The client names an allowed URI and another host, and claims an identity: Portcullis decides
    the real target (a path no resource names: 403); on an allowed request the backend sees only
    what Portcullis set."""
    forged = {"X-Original-URI": ACTIVESYNC, "X-Forwarded-Uri": ACTIVESYNC, "X-Original-Method": "POST",
              "X-Forwarded-Host": "docs.contoso.test", "X-Forwarded-Method": "POST",
              "X-Portcullis-User": "admin@contoso.test", "X-Portcullis-Device-Id": "forged",
              "X-Forwarded-For": "10.0.0.1"}
    token = outlook_token(portcullis.gateway)
    refused = through_nginx(edge, "/ecp/", token=token, headers=forged)
    assert refused.status_code == 403 and '"backend"' not in refused.text

    allowed = received(through_nginx(edge, ACTIVESYNC, token=token, headers=forged))["receivedHeaders"]
    assert allowed["x-portcullis-user"] == "alex@contoso.test"
    assert allowed["x-portcullis-device-id"] != "forged"
    assert allowed["x-forwarded-for"] == "127.0.0.1"
    assert "x-original-uri" not in allowed and "x-forwarded-uri" not in allowed
    record = portcullis.gateway.decision(allowed["x-portcullis-correlation-id"])
    assert record["ipAddress"] == "127.0.0.1"


def test_the_endpoint_called_directly_by_another_address_is_refused(edge: int, portcullis: Started) -> None:
    headers = {"X-Original-URI": ACTIVESYNC, "X-Original-Method": "POST", "Host": MAIL, "X-Forwarded-For": "127.0.0.1",
               "Authorization": f"Bearer {outlook_token(portcullis.gateway)}", "User-Agent": ACTIVESYNC_UA}
    answer = ask(portcullis, headers, source=OUTSIDER)
    assert answer.status_code == 403 and "X-Portcullis-User" not in answer.headers
    assert portcullis.gateway.decision(answer.headers[CORRELATION_ID])["status"]["failureReason"] == \
        forward_auth.NOT_A_PROXY


def test_with_portcullis_down_nginx_answers_500_and_never_lets_the_request_through(
        portcullis: Started, demo_ports: Ports, tmp_path: Path) -> None:
    nobody_listening = free_port()
    with nginx_edge(tmp_path / "nginx", forward_auth=nobody_listening, backend=demo_ports.mail) as port:
        for path, headers in ((ACTIVESYNC, {}), ("/owa/", {"User-Agent": BROWSER_UA, "Accept": "text/html"})):
            answer = through_nginx(port, path, token=outlook_token(portcullis.gateway), headers=headers)
            assert answer.status_code == 500 and '"backend"' not in answer.text
