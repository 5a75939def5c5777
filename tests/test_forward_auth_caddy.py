"""Debian's Caddy in front of the demo Exchange and SharePoint backends with the shipped snippet
(deploy/caddy/Caddyfile), asking a real gateway's forward-auth listener about each request: what
reaches the backend, what the client gets. Caddy relays Portcullis's refusals as they are, so each
demo scenario answers through Caddy exactly as through the reverse proxy."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.app.demo import (
    ACTIVESYNC,
    ALEX_IPHONE,
    BLAKE_ANDROID,
    BROWSER_UA,
    CASEY_IPAD,
    SCENARIOS,
    Scenario,
    activesync,
    scenario_token,
)
from gateway.app.edges import Site, running_edge
from gateway.decision.service import utc_now
from gateway.http.headers import CORRELATION_ID
from gateway.policy.model import DeviceThreatLevel
from gateway.policy.session_controls import UPLOAD_BLOCKED
from gateway.web import forward_auth
from tests.conftest import Gateway, Ports, free_port
from tests.helpers.caddy import caddy_edge, needs_caddy
from tests.helpers.edges import DOCS, MAIL, received, sent_to_sign_in, sign_in_and_out, through_edge
from tests.helpers.forward_auth import OUTSIDER, ask, forward_auth_config
from tests.helpers.running import Started, started
from tests.helpers.signals import second_connection
from tests.helpers.tokens import outlook_token

pytestmark = needs_caddy

FORGED = {"X-Original-URI": ACTIVESYNC, "X-Forwarded-Uri": ACTIVESYNC, "X-Original-Method": "POST",
          "X-Forwarded-Method": "POST", "X-Forwarded-Host": DOCS, "X-Forwarded-For": "10.0.0.1",
          "X-Portcullis-User": "admin@contoso.test", "X-Portcullis-Device-Id": "forged",
          "X-Portcullis-Client-App": "forged", "X-Portcullis-Assertion": "forged"}


@pytest.fixture(scope="module")
def edge(portcullis: Started, demo_ports: Ports, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    assert portcullis.running.forward_auth is not None
    with caddy_edge(tmp_path_factory.mktemp("caddy"), forward_auth=portcullis.running.forward_auth[1],
                    sites=[Site(MAIL, demo_ports.mail), Site(DOCS, demo_ports.docs)]) as port:
        yield port


def test_an_allowed_request_reaches_the_backend_with_the_identity_headers_and_assertion(
        edge: int, portcullis: Started) -> None:
    backend = received(through_edge(edge, ACTIVESYNC, token=outlook_token(portcullis.gateway)))
    headers = backend["receivedHeaders"]
    assert headers["x-portcullis-user"] == "alex@contoso.test"
    assert headers["x-portcullis-client-app"] == "outlook-mobile"
    assert headers["x-portcullis-device-id"] == ALEX_IPHONE
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert backend["verifiedAssertion"]["sub"], backend["verifiedAssertion"]
    assert "rejected" not in backend["verifiedAssertion"]
    record = portcullis.gateway.decision(headers["x-portcullis-correlation-id"])
    assert record["status"]["errorCode"] == 0 and record["httpStatus"] == 200
    assert record["ipAddress"] == "127.0.0.1"


@pytest.mark.parametrize("scenario", [pytest.param(s, id=s.title) for s in SCENARIOS])
def test_each_demo_scenario_answers_through_caddy_as_through_the_reverse_proxy(
        edge: int, portcullis: Started, scenario: Scenario) -> None:
    """Allowed, and each block reason (app not approved, noncompliant, high risk, a token replayed
    from another device, no token, a bad token, the browser block page, a path no resource names):
    Caddy relays Portcullis's status, body and challenge."""
    answer = through_edge(edge, scenario.path, method=scenario.method, host=scenario.host,
                          token=scenario_token(portcullis.gateway.idp, scenario), headers=dict(scenario.headers))
    assert answer.status_code == scenario.expect_status, answer.text[:300]
    shown = answer.text.replace('": "', '":"') + "\n".join(f"{k}: {v}" for k, v in answer.headers.items())
    assert scenario.expect_text is None or scenario.expect_text in shown
    if answer.status_code != 200:
        assert '"backend"' not in answer.text


def test_an_unknown_device_is_blocked_with_403(edge: int, portcullis: Started) -> None:
    unknown = str(uuid.uuid4())
    answer = through_edge(edge, ACTIVESYNC, token=outlook_token(portcullis.gateway, device_id=unknown))
    assert answer.status_code == 403 and '"backend"' not in answer.text
    assert portcullis.gateway.decision(answer.json()["correlationId"])["deviceDetail"]["deviceId"] in ("", unknown)


def test_a_browser_without_a_session_is_redirected_to_sign_in(edge: int, portcullis: Started) -> None:
    answer = through_edge(edge, "/owa/", method="GET", headers={"User-Agent": BROWSER_UA, "Accept": "text/html"})
    assert sent_to_sign_in(answer, portcullis.gateway.idp.issuer), answer.headers


def test_headers_a_client_sends_neither_change_the_decision_nor_reach_the_backend(
        edge: int, portcullis: Started) -> None:
    """The client names an allowed URI and another host, and claims an identity: Portcullis decides
    the real target (a path no resource names: 403); on an allowed request the backend sees only
    what Portcullis set."""
    token = outlook_token(portcullis.gateway)
    refused = through_edge(edge, "/ecp/", token=token, headers=FORGED)
    assert refused.status_code == 403 and '"backend"' not in refused.text
    assert refused.json()["reason"] == "path is not part of any protected resource"

    allowed = received(through_edge(edge, ACTIVESYNC, token=token, headers=FORGED))["receivedHeaders"]
    assert allowed["x-portcullis-user"] == "alex@contoso.test"
    assert allowed["x-portcullis-device-id"] == ALEX_IPHONE
    assert allowed["x-portcullis-client-app"] == "outlook-mobile"
    assert allowed["x-portcullis-assertion"] != "forged"
    assert allowed["x-forwarded-for"] == "127.0.0.1" and allowed["x-forwarded-host"] == MAIL
    assert not {"x-original-uri", "x-original-method", "x-forwarded-uri", "x-forwarded-method"} & set(allowed)
    record = portcullis.gateway.decision(allowed["x-portcullis-correlation-id"])
    assert (record["ipAddress"], record["resourceDisplayName"]) == ("127.0.0.1", "exchange-activesync")


def test_identity_headers_portcullis_does_not_set_never_reach_the_backend(edge: int) -> None:
    """A public resource names no user, app or device: the client's own copies are removed, and
    no header carries the text of an unresolved Caddy placeholder (Caddy 2.6's copy_headers would)."""
    backend = received(through_edge(edge, "/owa/auth/logon.aspx", method="GET", headers=FORGED))
    headers = backend["receivedHeaders"]
    assert not {"x-portcullis-user", "x-portcullis-device-id", "x-portcullis-client-app",
                "x-portcullis-assertion"} & set(headers)
    assert not any("{" in value for value in headers.values()), headers
    assert headers["x-portcullis-correlation-id"]


def test_the_endpoint_called_directly_in_caddys_convention_by_another_address_is_refused(
        edge: int, portcullis: Started) -> None:
    headers = {"X-Forwarded-Uri": ACTIVESYNC, "X-Forwarded-Method": "POST", "X-Forwarded-Host": MAIL,
               "X-Forwarded-For": "127.0.0.1", "Authorization": f"Bearer {outlook_token(portcullis.gateway)}"}
    answer = ask(portcullis, headers, source=OUTSIDER)
    assert answer.status_code == 403 and "X-Portcullis-User" not in answer.headers
    assert portcullis.gateway.decision(answer.headers[CORRELATION_ID])["status"]["failureReason"] == \
        forward_auth.NOT_A_PROXY


def test_a_risk_raise_takes_effect_on_the_next_request(edge: int, portcullis: Started) -> None:
    """Written to the gateway's inventory by another connection (as `portcullis devices set-risk`
    does; second_connection lowers it again): Alex's very next request through Caddy is refused."""
    token = outlook_token(portcullis.gateway)
    assert through_edge(edge, ACTIVESYNC, token=token).status_code == 200
    with second_connection(portcullis.gateway.config_dir) as store:
        store.set_threat_level(ALEX_IPHONE, "lookout", DeviceThreatLevel.high, now=utc_now())
        blocked = through_edge(edge, ACTIVESYNC, token=token)
        assert (blocked.status_code, blocked.json()["reason"]) == (403, "device risk high, allowed: low")
        store.set_threat_level(ALEX_IPHONE, "lookout", DeviceThreatLevel.low, now=utc_now())
        assert through_edge(edge, ACTIVESYNC, token=token).status_code == 200


def test_a_browser_signs_in_and_out_through_caddy(edge: int, portcullis: Started) -> None:
    """The sign-in callback and logout under /.portcullis/ go to Portcullis, never upstream."""
    inbox = sign_in_and_out(edge, portcullis.gateway.idp.issuer)
    record = portcullis.gateway.decision(inbox["receivedHeaders"]["x-portcullis-correlation-id"])
    assert record["ipAddress"] == "127.0.0.1"


@pytest.mark.parametrize("path", ["/.portcullis/callback?state=x&code=y", "/.Portcullis/callback?state=x&code=y",
                                  "/%2Eportcullis/callback?state=x&code=y", "/.portcullis/unknown",
                                  "/.well-known/OAuth-Protected-Resource/x"])
def test_portcullis_pages_in_any_spelling_never_reach_the_backend(edge: int, path: str) -> None:
    """Answered by Portcullis (a refused callback, its metadata), never by the backend."""
    answer = through_edge(edge, path, method="GET", headers={"Accept": "text/html"})
    assert '"backend"' not in answer.text, answer.text[:300]
    assert answer.status_code != 200 or answer.json()["resource"] == f"https://{MAIL}/x"


def test_the_protected_resource_metadata_is_portcullis(edge: int) -> None:
    metadata = through_edge(edge, "/.well-known/oauth-protected-resource", method="GET")
    assert metadata.status_code == 200 and metadata.json()["resource"] == f"https://{MAIL}"


def test_with_portcullis_down_caddy_answers_502_and_never_lets_the_request_through(
        portcullis: Started, demo_ports: Ports, tmp_path: Path) -> None:
    nobody_listening = free_port()
    with caddy_edge(tmp_path / "caddy", forward_auth=nobody_listening, sites=[Site(MAIL, demo_ports.mail)]) as port:
        for path, headers in ((ACTIVESYNC, {}), ("/owa/", {"User-Agent": BROWSER_UA, "Accept": "text/html"}),
                              ("/owa/auth/logon.aspx", {})):
            answer = through_edge(port, path, token=outlook_token(portcullis.gateway), headers=headers)
            assert answer.status_code == 502 and '"backend"' not in answer.text


def test_a_noncompliant_device_forging_the_compliant_ones_headers_is_still_blocked(
        edge: int, portcullis: Started) -> None:
    token = outlook_token(portcullis.gateway, user="blake@contoso.test", device_id=BLAKE_ANDROID)
    answer = through_edge(edge, activesync(BLAKE_ANDROID, "blake"), token=token,
                          headers={**FORGED, "X-Portcullis-Device-Id": ALEX_IPHONE})
    assert answer.status_code == 403 and answer.json()["reason"].startswith("device not compliant")


def test_a_chunked_upload_reaches_the_backend_whole_without_the_snippets_framing_note(
        edge: int, portcullis: Started) -> None:
    """The snippet tells Portcullis that a body without Content-Length is chunked (for
    blockUploads), and removes that note before the upstream request."""
    chunks = iter([b"a" * 1000, b"b" * 24])
    backend = received(through_edge(edge, ACTIVESYNC, token=outlook_token(portcullis.gateway),
                                    headers={"X-Original-Transfer-Encoding": "identity"}, content=chunks))
    headers = backend["receivedHeaders"]
    assert headers["x-demo-body-bytes"] == "1024"
    assert not [name for name in headers if name.startswith("x-original-")], headers


NO_UPLOADS_FOR_CASEY = """
  - name: casey-no-uploads
    state: enabled
    conditions:
      users: {includeUsers: [casey@contoso.test]}
      resources: {include: [exchange-activesync]}
    sessionControls: {blockUploads: true}
"""


def test_block_uploads_holds_through_caddy_for_a_body_of_either_framing(
        gateway: Gateway, demo_ports: Ports, tmp_path: Path) -> None:
    """Caddy sends the question without the body: the snippet names its framing, so a chunked
    upload is refused like one with a Content-Length; a POST without a body is not an upload."""
    config_dir = forward_auth_config(gateway, tmp_path / "portcullis", demo_ports)
    with (config_dir / "policies.yaml").open("a") as policies:
        policies.write(NO_UPLOADS_FOR_CASEY)
    (config_dir / "cases.yaml").unlink()  # the demo's cases do not expect this policy
    with started(gateway, config_dir) as running:
        assert running.running.forward_auth is not None
        with caddy_edge(tmp_path / "caddy", forward_auth=running.running.forward_auth[1],
                        sites=[Site(MAIL, demo_ports.mail)]) as port:
            token = outlook_token(running.gateway, user="casey@contoso.test", device_id=CASEY_IPAD)
            path = activesync(CASEY_IPAD, "casey")
            binary = {"Content-Type": "application/octet-stream"}
            assert through_edge(port, path, token=token).status_code == 200
            for body in (b"x" * 1024, iter([b"x" * 1000, b"y" * 24])):  # Content-Length, chunked
                refused = through_edge(port, path, token=token, headers=binary, content=body)
                assert refused.status_code == 403 and UPLOAD_BLOCKED in refused.text, refused.text[:300]


@pytest.mark.parametrize("matcher", ["/owa/* ", "/* ", ""])
def test_a_sites_own_handle_blocks_are_still_asked_about(portcullis: Started, demo_ports: Ports, tmp_path: Path,
                                                          matcher: str) -> None:
    """Caddy runs `handle` blocks before `route` and `reverse_proxy`, whatever their place in the
    site: the question must come before them, or a site with routing of its own is open; and the
    gateway's pages must still reach Portcullis, not the site's handler."""
    assert portcullis.running.forward_auth is not None
    own_routing = f"handle {matcher}{{\n\treverse_proxy 127.0.0.1:{demo_ports.mail}\n}}"
    with running_edge("caddy", tmp_path / "caddy", port=free_port(), forward_auth=portcullis.running.forward_auth[1],
                      sites=[Site(MAIL, demo_ports.mail)], lines=own_routing) as port:
        nobody = through_edge(port, "/owa/", method="GET", headers={"User-Agent": BROWSER_UA, "Accept": "text/html"})
        assert nobody.status_code == 302 and '"backend"' not in nobody.text
        alex = received(through_edge(port, "/owa/", method="GET", token=outlook_token(portcullis.gateway),
                                     headers={"User-Agent": BROWSER_UA}))
        assert alex["receivedHeaders"]["x-portcullis-user"] == "alex@contoso.test"
        metadata = through_edge(port, "/.well-known/oauth-protected-resource", method="GET")
        assert metadata.status_code == 200 and metadata.json()["resource"] == f"https://{MAIL}"
