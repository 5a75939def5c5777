"""The forward-auth listener at the HTTP level: a real gateway in-process, its forward-auth listener
on a real socket, real tokens from the demo issuer, asked in nginx's and in Caddy/Traefik's
conventions. The same pipeline decides: the decision log holds each answer with its reason."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from ruamel.yaml import YAML

from gateway.app import bootstrap
from gateway.app.demo import (
    ACTIVESYNC,
    ACTIVESYNC_UA,
    ALEX_IPHONE,
    BLAKE_ANDROID,
    BROWSER_UA,
    OFFICE,
    OUTLOOK_MOBILE,
    SHAREPOINT,
    activesync,
)
from gateway.config.lint import config_warnings
from gateway.decision.service import utc_now
from gateway.http.headers import CORRELATION_ID
from gateway.ops.whatif import Question, WhatIf
from gateway.policy.model import Listener, Restriction
from gateway.policy.session_controls import NEEDS_REVERSE_PROXY, UPLOAD_BLOCKED
from gateway.web import forward_auth
from tests.conftest import Gateway, Ports, demo_config_copy
from tests.helpers.config import problems
from tests.helpers.forward_auth import OUTSIDER, ask, endpoint, forward_auth_config, forward_auth_gateway
from tests.helpers.replay import replay, totals
from tests.helpers.running import Started, started
from tests.helpers.tokens import outlook_token

MAIL = "mail.contoso.test"
DOCS = "docs.contoso.test"
CLIENT = "203.0.113.7"


@pytest.fixture(scope="module")
def edge(gateway: Gateway, demo_ports: Ports, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Started]:
    with forward_auth_gateway(gateway, tmp_path_factory.mktemp("forward-auth"), demo_ports) as running:
        yield running


def nginx(uri: str, method: str = "GET", host: str = MAIL, **headers: str) -> dict[str, str]:
    return {"X-Original-URI": uri, "X-Original-Method": method, "Host": host, "X-Forwarded-For": CLIENT, **headers}


def caddy(uri: str, method: str = "GET", host: str = MAIL, **headers: str) -> dict[str, str]:
    return {"X-Forwarded-Uri": uri, "X-Forwarded-Method": method, "X-Forwarded-Host": host,
            "X-Forwarded-Proto": "https", "X-Forwarded-For": CLIENT, **headers}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "User-Agent": ACTIVESYNC_UA}


@pytest.mark.parametrize("convention", [nginx, caddy], ids=["nginx", "caddy-traefik"])
def test_an_allowed_request_answers_200_with_the_reverse_proxys_upstream_headers(edge: Started, convention) -> None:
    answer = ask(edge, convention(ACTIVESYNC, "POST", **bearer(outlook_token(edge.gateway))))
    assert answer.status_code == 200 and answer.content == b""
    assert answer.headers["X-Portcullis-User"] == "alex@contoso.test"
    assert answer.headers["X-Portcullis-Client-App"] == "outlook-mobile"
    assert answer.headers["X-Forwarded-For"] == CLIENT and answer.headers["X-Forwarded-Host"] == MAIL
    assert answer.headers["X-Portcullis-Assertion"].count(".") == 2
    record = edge.gateway.decision(answer.headers[CORRELATION_ID])
    assert record["status"]["errorCode"] == 0 and record["ipAddress"] == CLIENT
    assert record["httpStatus"] == 200 and record["upstreamStatus"] is None


@pytest.mark.parametrize("convention", [nginx, caddy], ids=["nginx", "caddy-traefik"])
def test_a_noncompliant_device_is_blocked_with_the_gateways_json_answer(edge: Started, convention) -> None:
    token = outlook_token(edge.gateway, user="blake@contoso.test", device_id=BLAKE_ANDROID)
    answer = ask(edge, convention(activesync(BLAKE_ANDROID, "blake"), "POST", **bearer(token)))
    assert answer.status_code == 403
    assert answer.json()["reason"].startswith("device not compliant") and answer.json()["error"] == "access_denied"
    assert "X-Portcullis-User" not in answer.headers
    assert edge.gateway.decision(answer.headers[CORRELATION_ID])["status"]["failureReason"] == \
        answer.json()["reason"]


def test_a_browser_is_blocked_with_the_html_block_page(edge: Started) -> None:
    token = outlook_token(edge.gateway, user="blake@contoso.test", device_id=BLAKE_ANDROID, client_id=OFFICE)
    answer = ask(edge, nginx("/owa/", Authorization=f"Bearer {token}", Accept="text/html",
                             **{"User-Agent": BROWSER_UA}))
    assert answer.status_code == 403 and "You can't get there from here" in answer.text


def test_no_token_answers_401_with_the_bearer_challenge(edge: Started) -> None:
    answer = ask(edge, nginx(ACTIVESYNC, "POST", **{"User-Agent": ACTIVESYNC_UA}))
    assert answer.status_code == 401
    assert 'resource_metadata="https://mail.contoso.test' in answer.headers["WWW-Authenticate"]


def test_a_browser_without_a_session_is_sent_to_sign_in(edge: Started) -> None:
    answer = ask(edge, nginx("/owa/", Accept="text/html", **{"User-Agent": BROWSER_UA}))
    assert answer.status_code == 302
    assert answer.headers["Location"].startswith(edge.gateway.idp.issuer)
    assert "__Host-portcullis-signin" in answer.headers["Set-Cookie"]


def test_a_request_from_an_address_that_is_not_the_edge_is_refused_and_logged(edge: Started) -> None:
    answer = ask(edge, nginx(ACTIVESYNC, "POST", **bearer(outlook_token(edge.gateway))), source=OUTSIDER)
    assert answer.status_code == 403 and "X-Portcullis-User" not in answer.headers
    record = edge.gateway.decision(answer.headers[CORRELATION_ID])
    assert record["status"]["failureReason"] == forward_auth.NOT_A_PROXY and record["ipAddress"] == OUTSIDER


@pytest.mark.parametrize(("headers", "reason"), [
    ({"Host": MAIL, "X-Original-Method": "GET", "X-Forwarded-For": CLIENT}, forward_auth.NO_ORIGINAL),
    ({**caddy("/owa/"), "X-Original-URI": "/owa/"}, forward_auth.TWO_CONVENTIONS),
    ({"Host": MAIL, "X-Original-Method": "GET", "X-Original-URI": "/owa/"}, forward_auth.NO_CLIENT),
], ids=["no-original-uri", "both-conventions", "no-client-address"])
def test_a_request_that_does_not_name_the_original_one_is_refused_and_logged(edge: Started, headers: dict[str, str],
                                                                             reason: str) -> None:
    answer = ask(edge, {**headers, **bearer(outlook_token(edge.gateway))})
    assert answer.status_code == 400
    assert edge.gateway.decision(answer.headers[CORRELATION_ID])["status"]["failureReason"] == reason


def test_an_original_header_sent_twice_is_refused(edge: Started) -> None:
    headers = [*nginx(ACTIVESYNC, "POST", **bearer(outlook_token(edge.gateway))).items(), ("X-Original-URI", "/ecp/")]
    answer = httpx.get(f"{endpoint(edge)}/", headers=headers, timeout=10)
    assert answer.status_code == 400
    assert edge.gateway.decision(answer.headers[CORRELATION_ID])["status"]["failureReason"] == forward_auth.REPEATED


@pytest.mark.parametrize("host", ["intranet.contoso.test", "mail.contoso.test:bad", "127.0.0.1"])
def test_a_host_the_gateway_does_not_serve_is_refused(edge: Started, host: str) -> None:
    answer = ask(edge, caddy(ACTIVESYNC, "POST", host=host, **bearer(outlook_token(edge.gateway))))
    assert answer.status_code == 403
    assert edge.gateway.decision(answer.headers[CORRELATION_ID])["status"]["failureReason"] == forward_auth.NOT_SERVED


def test_the_original_target_is_normalised_as_the_reverse_proxy_does(edge: Started) -> None:
    """A path Tomcat reads as /ecp/ behind an OWA rule: ambiguous, refused before any token is read."""
    answer = ask(edge, nginx("/owa/..;/ecp/", **bearer(outlook_token(edge.gateway))))
    assert answer.status_code == 400
    assert edge.gateway.decision(answer.headers[CORRELATION_ID])["status"]["failureReason"] == "ambiguous request path"


@pytest.mark.parametrize("target", ["/.portcullis/callback?state=x&code=y", "/.PORTCULLIS/logout",
                                    "/%2Eportcullis/callback", "/.well-known/oauth-protected-resource"])
def test_a_question_naming_the_gateways_own_pages_is_refused(edge: Started, target: str) -> None:
    """Those pages are Portcullis's: allowed as a question, the edge would send them, with the
    browser's cookies, to the upstream."""
    answer = ask(edge, caddy(target, **bearer(outlook_token(edge.gateway))))
    assert answer.status_code == 404
    assert edge.gateway.decision(answer.headers[CORRELATION_ID])["status"]["failureReason"] == forward_auth.RESERVED


@pytest.mark.parametrize(("source", "host", "reason"), [
    (OUTSIDER, MAIL, forward_auth.NOT_A_PROXY), ("127.0.0.1", "intranet.contoso.test", forward_auth.NOT_SERVED)])
def test_the_gateways_pages_are_served_to_the_edge_for_a_host_it_decides_only(edge: Started, source: str,
                                                                            host: str, reason: str) -> None:
    with httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=10) as client:
        answer = client.get(f"{endpoint(edge)}/.portcullis/logout", headers={"Host": host})
    assert answer.status_code == 403
    assert edge.gateway.decision(answer.headers[CORRELATION_ID])["status"]["failureReason"] == reason


def kiosk_account(edge: Started, groups: tuple[str, ...] = ("kiosk-users",)) -> dict[str, str]:
    """Alex as a member of kiosk-users: the demo's kiosk-accounts-view-only policy (blockDownloads) applies."""
    token = edge.gateway.idp.mint(user="alex@contoso.test", client_id=OUTLOOK_MOBILE, audience=SHAREPOINT,
                                  device_id=ALEX_IPHONE, extra={"groups": list(groups)})
    return {"Authorization": f"Bearer {token}", "User-Agent": "Mozilla/5.0 (Windows NT 10.0)"}


def test_a_session_control_only_the_reverse_proxy_enforces_refuses_the_request_at_the_edge(edge: Started) -> None:
    """blockDownloads needs the answer (an attachment from any URL): the edge's question is refused,
    where the reverse proxy lets the page through and replaces a download."""
    answer = ask(edge, caddy("/sites/team/", host=DOCS, **kiosk_account(edge)))
    assert answer.status_code == 403
    record = edge.gateway.decision(answer.headers[CORRELATION_ID])
    assert record["status"]["failureReason"] == NEEDS_REVERSE_PROXY.format(control="blockDownloads")
    assert (record["restriction"], record["request"]["listener"]) == ("sessionControlNeedsReverseProxy", "forwardAuth")
    assert record["enforcedSessionControls"] == ["blockDownloads", "blockUploads"]
    plain = ask(edge, caddy("/sites/team/", host=DOCS, **kiosk_account(edge, groups=())))
    assert plain.status_code == 200  # the same request without the kiosk group: no session control, allowed


def test_identity_headers_a_client_sent_do_not_change_the_answer(edge: Started) -> None:
    answer = ask(edge, nginx(ACTIVESYNC, "POST", **bearer(outlook_token(edge.gateway)),
                             **{"X-Portcullis-User": "admin@contoso.test", "X-Portcullis-Device-Id": "forged"}))
    assert answer.status_code == 200
    assert answer.headers["X-Portcullis-User"] == "alex@contoso.test"
    assert answer.headers.get_list("X-Portcullis-Device-Id") != ["forged"]


def test_only_the_hosts_listed_are_decided(gateway: Gateway, demo_ports: Ports, tmp_path: Path) -> None:
    with forward_auth_gateway(gateway, tmp_path, demo_ports, hosts=["docs.contoso.test"]) as running:
        answer = ask(running, nginx(ACTIVESYNC, "POST", **bearer(outlook_token(gateway))))
    assert answer.status_code == 403
    assert running.gateway.decision(answer.headers[CORRELATION_ID])["status"]["failureReason"] == \
        forward_auth.NOT_SERVED


@pytest.mark.parametrize(("section", "said"), [
    ({"trustedProxies": ["0.0.0.0/0"]}, "trusts every address"),
    ({"trustedProxies": ["127.0.0.1"]}, "needs a prefix length"),
    ({"trustedProxies": []}, "at least 1 item"),
    ({"hosts": ["intranet.contoso.test"]}, "not in protectedHosts"),
], ids=["every-address", "no-prefix", "no-proxy", "unknown-host"])
def test_a_forward_auth_section_that_would_believe_anyone_or_names_no_host_is_refused(
        tmp_path: Path, section: dict[str, object], said: str) -> None:
    config_dir = demo_config_copy(tmp_path, Ports.fresh())
    yaml = YAML()
    data = yaml.load(config_dir / "portcullis.yaml")
    data["forwardAuth"] = section
    yaml.dump(data, config_dir / "portcullis.yaml")
    assert any(said in problem for problem in problems(config_dir)), problems(config_dir)


def test_what_if_and_replay_answer_an_edges_question_as_the_listener_did(
        gateway: Gateway, demo_ports: Ports, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The listener is part of the question: What If asked with ``listener: forwardAuth`` and replay
    of the decision log refuse the kiosk account's request as the forward-auth listener did, and
    What If through the reverse proxy allows it (its answer, not the request, is restricted)."""
    with forward_auth_gateway(gateway, tmp_path / "own", demo_ports) as running:
        answer = ask(running, caddy("/sites/team/", host=DOCS, **kiosk_account(running)))
        record = running.gateway.decision(answer.headers[CORRELATION_ID])
        config_dir, log = running.gateway.config_dir, running.gateway.decision_log
    loaded = bootstrap.load(config_dir)
    what_if = WhatIf(loaded.config, loaded.inventory, loaded.whatif_app_protection)
    question = Question(user="alex@contoso.test", url=f"https://{DOCS}/sites/team/", app="outlook-mobile",
                        device=ALEX_IPHONE, groups=("kiosk-users",), listener=Listener.forward_auth)
    at_edge = asyncio.run(what_if.ask(question, utc_now()))
    assert (at_edge.status_code, at_edge.reason, at_edge.restriction) == \
        (record["httpStatus"], record["status"]["failureReason"], Restriction.needs_reverse_proxy)
    through_proxy = asyncio.run(what_if.ask(replace(question, listener=Listener.gateway), utc_now()))
    assert through_proxy.allowed and "blockDownloads" in through_proxy.session_controls.names()

    code, out, _ = replay(capsys, "--config", config_dir, log)
    assert code == 0 and totals(out)["same result"] == 1 and totals(out)["block→allow"] == 0, out


def test_check_names_the_policy_whose_session_controls_an_edge_cannot_enforce(tmp_path: Path) -> None:
    config_dir = demo_config_copy(tmp_path, Ports.fresh())
    yaml = YAML()
    data = yaml.load(config_dir / "portcullis.yaml")
    data["forwardAuth"] = {"hosts": [DOCS]}
    yaml.dump(data, config_dir / "portcullis.yaml")
    warnings = [str(w) for w in config_warnings(bootstrap.load(config_dir).config)]
    edge = [w for w in warnings if "forwardAuth" in w]
    # kiosk-accounts-view-only (All resources); not kiosks-read-only-browser: it applies through the kiosk proxy only
    assert len(edge) == 1 and "'kiosk-accounts-view-only'" in edge[0], warnings
    assert all("blockDownloads" in w and DOCS in w and MAIL not in w and "policies.yaml:" in w for w in edge), edge
    data["forwardAuth"] = {"hosts": [MAIL]}
    yaml.dump(data, config_dir / "portcullis.yaml")
    mail = [str(w) for w in config_warnings(bootstrap.load(config_dir).config) if "forwardAuth" in str(w)]
    assert len(mail) == 1 and MAIL in mail[0] and DOCS not in mail[0], mail


@pytest.mark.parametrize(("framing", "content_type", "status"), [
    ({}, "application/octet-stream", 403),  # Traefik's question: no framing, a body cannot be ruled out
    ({}, "application/json", 200),  # a JSON post is no upload, whatever its length
    ({"X-Original-Content-Length": "0"}, "application/octet-stream", 200),  # nginx's: declared empty
    ({"X-Original-Content-Length": "12"}, "application/octet-stream", 403),
], ids=["unknown", "unknown-json", "declared-empty", "declared-body"])
def test_block_uploads_refuses_what_an_edge_that_names_no_framing_cannot_rule_out(
        gateway: Gateway, demo_ports: Ports, tmp_path: Path, framing: dict[str, str], content_type: str,
        status: int) -> None:
    config_dir = forward_auth_config(gateway, tmp_path, demo_ports)
    policies = config_dir / "policies.yaml"
    policies.write_text(policies.read_text().replace("      blockDownloads: true\n      blockUploads: true\n",
                                                     "      blockUploads: true\n", 1))
    with started(gateway, config_dir) as running:
        answer = ask(running, caddy("/sites/team/upload", "POST", host=DOCS, **kiosk_account(running),
                                    **{"Content-Type": content_type}, **framing))
    assert answer.status_code == status
    if status == 403:
        record = running.gateway.decision(answer.headers[CORRELATION_ID])
        assert (record["restriction"], record["status"]["failureReason"]) == ("blockUploads", UPLOAD_BLOCKED)


def test_a_method_no_parser_knows_is_decided_and_logged_whatever_parser_is_installed(edge: Started) -> None:
    """Envoy's check keeps the original method: the listener parses with h11 even where httptools
    is installed (llhttp would refuse an unknown method itself, unanswered by Portcullis, unlogged)."""
    answer = ask(edge, {"Host": MAIL, "X-Forwarded-For": CLIENT, **bearer(outlook_token(edge.gateway))},
                 method="VERSION-CONTROL", path="/envoy/owa/")
    assert edge.gateway.decision(answer.headers[CORRELATION_ID])["request"]["method"] == "VERSION-CONTROL"
