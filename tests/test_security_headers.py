"""Headers a client sends (issue 8): none of them makes the upstream see another identity, path,
method or client address, removes one of the gateway's own headers, or carries the gateway's
cookies upstream; tokens and session cookies never reach a log. Every attack goes through the real
listener next to a legitimate twin that still gets the backend's answer."""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from ruamel.yaml import YAML

from gateway.app.demo import TEAMS
from gateway.config import load_config
from gateway.http.headers import client_address, fold, headers_to_strip, is_gateway_cookie, upstream_cookies
from gateway.identity.browser import COOKIE_NAME
from tests.conftest import Background, Gateway, Ports, demo_config_copy, gateway_config
from tests.helpers.admin import READER, admin, admin_token, audit_path
from tests.helpers.browser import BROWSER, sign_in
from tests.helpers.config import problems
from tests.helpers.decision_log import listener
from tests.helpers.hosts import ACTIVESYNC, MAIL
from tests.helpers.http import raw_exchange
from tests.helpers.tokens import outlook_token

PUBLIC = "/owa/auth/logon.aspx"  # the demo's public resource: forwarded without a token
FORGED = "forged-by-client"
TWIN = ("X-Client-Note", "legitimate twin")  # an ordinary header every request carries: it must arrive
HEAD_OFFICE = "10.20.1.2"  # inside the demo's trusted named location head-office (10.20.0.0/16)
OWN_HEADERS = {"x-portcullis-user", "x-portcullis-device-id", "x-portcullis-client-app", "x-portcullis-correlation-id",
               "x-portcullis-assertion", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"}


def spellings(name: str) -> dict[str, str]:
    """The variants upstream stacks read as one name: as written, lower, upper, ``_`` and ``.``."""
    return {"as written": name, "lower case": name.lower(), "upper case": name.upper(),
            "underscores": name.replace("-", "_"), "dots": name.replace("-", ".")}


def received_names(echo: dict[str, Any]) -> set[str]:
    return {fold(name) for name in echo["receivedHeaders"]}


def answered_echo(answer: str) -> dict[str, Any]:
    """The backend's JSON from a raw HTTP/1.1 answer (``raw_exchange``), which must be a 200."""
    head, _, body = answer.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200"), answer[:300]
    return json.loads(body)


def raw_post(gateway: Gateway, head: str, *, path: str = ACTIVESYNC, body: str = "abc") -> str:
    """Alex's Outlook POSTing ``body`` with the extra header lines ``head`` (each ending in CRLF),
    written byte for byte; the gateway closes the connection after answering."""
    return raw_exchange(gateway, f"POST {path} HTTP/1.1\r\nHost: {MAIL}\r\n"
                                 f"Authorization: Bearer {outlook_token(gateway)}\r\n{head}"
                                 f"{TWIN[0]}: {TWIN[1]}\r\nContent-Length: {len(body)}\r\n"
                                 f"Connection: close\r\n\r\n{body}")


def assert_gateway_headers(echo: dict[str, Any], correlation_id: str | None = None, *, verified: bool = True) -> None:
    """The upstream got the gateway's own identity, forwarding and assertion headers, and the twin.
    ``verified=False``: a gateway of the test's own, whose assertion key the demo backends do not know."""
    received = echo["receivedHeaders"]
    assert received["x-portcullis-user"] == "alex@contoso.test"
    assert received["x-portcullis-client-app"] == "outlook-mobile"
    assert received["x-forwarded-for"] == "127.0.0.1"
    assert received["x-forwarded-proto"] == "https"
    assert received["x-forwarded-host"] == MAIL
    assert received[TWIN[0].lower()] == TWIN[1]
    if correlation_id is not None:
        assert received["x-portcullis-correlation-id"] == correlation_id
    assert received["x-portcullis-assertion"]
    if not verified:
        return
    assertion = echo["verifiedAssertion"]  # the demo backend verified the gateway's signature and audience
    assert assertion["upn"] == "alex@contoso.test", assertion
    assert assertion["decisionId"] == received["x-portcullis-correlation-id"]


# --- client rewrite and method override headers --------------------------------------------------------------------

REWRITE_HEADERS = ["X-Original-URL", "X-Rewrite-URL", "X-Override-URL", "X-Original-URI", "X-Original-Path",
                   "X-Envoy-Original-Path", "X-Forwarded-Uri", "X-Forwarded-Path", "X-Forwarded-Prefix",
                   "X-Original-Host", "X-Host", "X-HTTP-Host-Override", "X-HTTP-Method-Override", "X-HTTP-Method",
                   "X-Method-Override", "X-Original-Method", "X-Forwarded-Method"]


@pytest.mark.parametrize(("name", "spelling"),
                         [pytest.param(name, sent, id=f"{name} ({how})")
                          for name in REWRITE_HEADERS for how, sent in spellings(name).items()])
def test_rewrite_and_method_override_headers_never_reach_the_upstream(gateway: Gateway, name: str,
                                                                      spelling: str) -> None:
    value = "DELETE" if "method" in name.lower() else "/ecp/?forged-by-client"
    response = gateway.request(MAIL, ACTIVESYNC, method="POST", token=outlook_token(gateway),
                               headers={spelling: value, TWIN[0]: TWIN[1]})
    assert response.status_code == 200, response.text
    echo = response.json()
    assert echo["method"] == "POST"  # the client's method, not the override
    assert echo["path"] == "/Microsoft-Server-ActiveSync" and echo["query"] == "Cmd=Sync&DeviceType=iPhone"
    assert fold(name) not in received_names(echo)
    assert echo["receivedHeaders"][TWIN[0].lower()] == TWIN[1]


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_the_upstream_sees_the_method_the_client_used(gateway: Gateway, method: str) -> None:
    """The twin: the method itself is forwarded as sent, whatever the overrides said above."""
    response = gateway.request(MAIL, ACTIVESYNC, method=method, token=outlook_token(gateway),
                               headers={"X-HTTP-Method-Override": "POST"})
    assert response.status_code == 200
    assert response.json()["method"] == method


# --- forwarding headers and gateway.trustedProxies ------------------------------------------------------------------

FORWARDING = [
    ("X-Forwarded-For", HEAD_OFFICE), ("X_Forwarded_For", HEAD_OFFICE), ("x.forwarded.for", HEAD_OFFICE),
    ("X-FORWARDED-FOR", f"{HEAD_OFFICE}, 127.0.0.1"), ("Forwarded", f"for={HEAD_OFFICE};proto=https"),
    ("X-Real-IP", HEAD_OFFICE), ("X-Client-IP", HEAD_OFFICE), ("True-Client-IP", HEAD_OFFICE),
    ("CF-Connecting-IP", HEAD_OFFICE), ("Fastly-Client-IP", HEAD_OFFICE), ("X-Cluster-Client-IP", HEAD_OFFICE),
    ("X-Original-Forwarded-For", HEAD_OFFICE), ("X-Envoy-External-Address", HEAD_OFFICE),
    ("X-Azure-ClientIP", HEAD_OFFICE), ("X-Forwarded-Host", f"{HEAD_OFFICE}.evil.test"),
    ("X-Forwarded-Proto", "http"), ("X-Forwarded-Port", "80"), ("Front-End-Https", "Off"),
]


def location(record: dict[str, Any]) -> str:
    """The named locations the decision put the client in (the ``location`` signal)."""
    return next(s["value"] for s in record["signals"] if s["name"] == "location")


def policy_result(record: dict[str, Any], policy: str) -> str:
    return next(p["result"] for p in record["appliedConditionalAccessPolicies"] if p["id"] == policy)


@pytest.mark.parametrize(("name", "value"), [pytest.param(n, v, id=n) for n, v in FORWARDING])
def test_an_untrusted_peer_cannot_choose_the_address_the_gateway_sees(gateway: Gateway, name: str,
                                                                      value: str) -> None:
    """The demo trusts no proxy: a client naming a head-office address stays 127.0.0.1 for policy,
    for the decision log and for the upstream, which gets only the gateway's forwarding headers."""
    response = gateway.request(MAIL, ACTIVESYNC, method="POST", token=outlook_token(gateway),
                               headers={name: value, TWIN[0]: TWIN[1]})
    assert response.status_code == 200
    echo = response.json()
    assert_gateway_headers(echo, response.headers["x-portcullis-correlation-id"])
    assert fold(name) not in received_names(echo) - OWN_HEADERS
    assert HEAD_OFFICE not in json.dumps(echo["receivedHeaders"])
    record = gateway.decision(response.headers["x-portcullis-correlation-id"])
    assert record["ipAddress"] == "127.0.0.1"
    assert location(record) == "none"
    assert policy_result(record, "mfa-outside-head-office") == "reportOnlyFailure"  # no head-office benefit


TRUSTED_PROXIES = ["127.0.0.1/32", "192.0.2.0/24"]  # the peer (the test) and a farther load balancer tier


@pytest.fixture(scope="class")
def behind_a_load_balancer(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory,
                           demo_ports: Ports) -> Iterator[Gateway]:
    """A second gateway on the demo's upstreams with ``gateway.trustedProxies``, for which the test
    client (127.0.0.1) is the load balancer: the session's ``Gateway`` pointed at it. Class-scoped:
    while it runs, mitmproxy hands every new connection in this process to its master."""
    config_dir = gateway_config(tmp_path_factory.mktemp("trusted-proxies"), gateway.ca,
                                Ports(0, demo_ports.idp, demo_ports.mail, demo_ports.docs))
    yaml = YAML()
    settings = yaml.load(config_dir / "portcullis.yaml")
    settings["gateway"]["trustedProxies"] = TRUSTED_PROXIES
    yaml.dump(settings, config_dir / "portcullis.yaml")
    with Background(lambda: listener(config_dir)) as (port, decision_log):
        yield replace(gateway, port=port, decision_log=decision_log)


class TestBehindATrustedLoadBalancer:
    """The legitimate twin of the forwarding attacks: with ``trustedProxies``, X-Forwarded-For from
    a trusted peer names the client, read from the right; everything else stays the gateway's."""

    @pytest.mark.parametrize(
        ("forwarded", "client", "head_office"),
        [
            pytest.param([HEAD_OFFICE], HEAD_OFFICE, True, id="the load balancer names a head-office client"),
            pytest.param([f"{HEAD_OFFICE}, 192.0.2.7"], HEAD_OFFICE, True, id="trusted hops are skipped"),
            pytest.param([f"{HEAD_OFFICE}, 203.0.113.9"], "203.0.113.9", False,
                         id="an address left of the first untrusted hop is the client's own claim"),
            pytest.param([f"10.20.9.9, {HEAD_OFFICE}", "192.0.2.7"], HEAD_OFFICE, True,
                         id="two header lines are one list"),
            pytest.param([f"{HEAD_OFFICE}:50123"], HEAD_OFFICE, True, id="IPv4 with a port (Application Gateway)"),
            pytest.param(["[2001:db8:20::5]:443"], "2001:db8:20::5", True, id="IPv6 in brackets with a port"),
            pytest.param(["::ffff:10.20.1.2"], HEAD_OFFICE, True, id="IPv4-mapped IPv6"),
            pytest.param(["192.0.2.7"], "192.0.2.7", False, id="every hop trusted: the farthest is the client"),
            pytest.param([], "127.0.0.1", False, id="no header: the peer"),
            pytest.param(["not-an-address, 203.0.113.9"], "203.0.113.9", False,
                         id="garbage left of the client is the client's own and never parsed"),
            pytest.param([f"{HEAD_OFFICE}, garbage, 203.0.113.9"], "203.0.113.9", False,
                         id="garbage and a head-office claim left of the client change nothing"),
        ],
    )
    def test_a_trusted_proxy_names_the_client_for_policy_the_log_and_the_upstream(
            self, behind_a_load_balancer: Gateway, caplog: pytest.LogCaptureFixture, forwarded: list[str],
            client: str, head_office: bool) -> None:
        caplog.set_level(logging.WARNING, logger="addons.flows")
        head = "".join(f"X-Forwarded-For: {value}\r\n" for value in forwarded)
        echo = answered_echo(raw_post(behind_a_load_balancer, head))
        received = echo["receivedHeaders"]
        assert received["x-forwarded-for"] == client  # the gateway's header, with the address it decided on
        record = behind_a_load_balancer.decision(received["x-portcullis-correlation-id"])
        assert record["ipAddress"] == client
        assert (location(record) == "head-office") is head_office
        assert policy_result(record, "mfa-outside-head-office") == ("reportOnlyNotApplied" if head_office
                                                                     else "reportOnlyFailure")
        assert not [r for r in caplog.records if "X-Forwarded-For from a trusted proxy" in r.getMessage()]

    @pytest.mark.parametrize("forwarded", [
        pytest.param([f"{HEAD_OFFICE}, not-an-address"], id="malformed"),
        pytest.param([f"{HEAD_OFFICE},,192.0.2.7"], id="empty element"),
        pytest.param([f"{HEAD_OFFICE}:http"], id="port that is not a number"),
        pytest.param([f"for={HEAD_OFFICE}"], id="Forwarded syntax"),
        pytest.param(["unknown"], id="nginx's unknown"),
    ])
    def test_a_trusted_proxys_malformed_x_forwarded_for_is_refused_not_decided_on_the_proxys_address(
            self, behind_a_load_balancer: Gateway, caplog: pytest.LogCaptureFixture, forwarded: list[str]) -> None:
        """Deciding on the proxy's own address would hand any client the proxy's named location."""
        caplog.set_level(logging.WARNING, logger="addons.flows")
        head = "".join(f"X-Forwarded-For: {value}\r\n" for value in forwarded)
        answer = raw_post(behind_a_load_balancer, head)
        assert answer.startswith("HTTP/1.1 400"), answer[:200]
        assert "backend" not in answer and "receivedHeaders" not in answer
        correlation_id = json.loads(answer.partition("\r\n\r\n")[2])["correlationId"]
        record = behind_a_load_balancer.decision(correlation_id)
        assert "X-Forwarded-For from a trusted proxy" in record["status"]["failureReason"]
        warned = [r for r in caplog.records if "X-Forwarded-For from a trusted proxy" in r.getMessage()]
        assert warned and all(correlation_id in r.getMessage() for r in warned)

    @pytest.mark.parametrize(("name", "value"), [pytest.param(n, v, id=n) for n, v in FORWARDING
                                                 if fold(n) != "x-forwarded-for"])
    def test_a_trusted_proxy_is_believed_for_x_forwarded_for_only(self, behind_a_load_balancer: Gateway, name: str,
                                                                   value: str) -> None:
        echo = answered_echo(raw_post(behind_a_load_balancer, f"{name}: {value}\r\n"))
        assert_gateway_headers(echo, verified=False)
        assert HEAD_OFFICE not in json.dumps(echo["receivedHeaders"])
        record = behind_a_load_balancer.decision(echo["receivedHeaders"]["x-portcullis-correlation-id"])
        assert record["ipAddress"] == "127.0.0.1"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        pytest.param("0.0.0.0/0", "'0.0.0.0/0' trusts every address", id="every IPv4 address"),
        pytest.param("::/0", "'::/0' trusts every address", id="every IPv6 address"),
        pytest.param("10.0.1.5", "'10.0.1.5' needs a prefix length", id="no prefix length"),
        pytest.param("10.0.1.5/24", "has host bits set", id="host bits set"),
        pytest.param("load-balancer", "needs a prefix length", id="a host name"),
    ],
)
def test_trusted_proxies_that_would_trust_anyone_are_refused_at_load(tmp_path: Path, entry: str,
                                                                     message: str) -> None:
    config_dir = _with_trusted_proxies(tmp_path, ["10.0.1.0/24", entry])
    found = problems(config_dir)
    assert any(message in p and "gateway.trustedProxies" in p for p in found), found


def test_trusted_proxies_default_to_none_and_accept_networks(tmp_path: Path) -> None:
    assert load_config(demo_config_copy(tmp_path / "default", Ports.fresh())).gateway_file.gateway.trusted_proxies == []
    config = load_config(_with_trusted_proxies(tmp_path / "set", ["10.0.1.0/24", "2001:db8:1::/64", "192.0.2.9/32"]))
    assert config.gateway_file.gateway.trusted_proxies == [ipaddress.ip_network("10.0.1.0/24"),
                                                          ipaddress.ip_network("2001:db8:1::/64"),
                                                          ipaddress.ip_network("192.0.2.9/32")]


def _with_trusted_proxies(tmp_path: Path, entries: list[str]) -> Path:
    config_dir = demo_config_copy(tmp_path, Ports.fresh())
    yaml = YAML()
    settings = yaml.load(config_dir / "portcullis.yaml")
    settings["gateway"]["trustedProxies"] = entries
    yaml.dump(settings, config_dir / "portcullis.yaml")
    return config_dir


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        pytest.param("203.0.113.1", [HEAD_OFFICE], ("203.0.113.1", None), id="untrusted peer"),
        pytest.param("::ffff:127.0.0.1", [HEAD_OFFICE], (HEAD_OFFICE, None), id="IPv4-mapped trusted peer"),
        pytest.param("127.0.0.1", ["unknown"], ("127.0.0.1", "X-Forwarded-For from a trusted proxy is not a list "
                                                             "of addresses"), id="nginx's unknown"),
        pytest.param("127.0.0.1", ["[2001:db8::1"], ("127.0.0.1", "X-Forwarded-For from a trusted proxy is not a "
                                                                   "list of addresses"), id="unclosed bracket"),
        pytest.param("127.0.0.1", ["garbage, 203.0.113.9"], ("203.0.113.9", None),
                     id="left of the client: never parsed"),
    ],
)
def test_client_address_reads_x_forwarded_for_from_the_right(peer: str, forwarded: list[str],
                                                            expected: tuple[str, str | None]) -> None:
    assert client_address(peer, forwarded, [ipaddress.ip_network("127.0.0.0/8")]) == expected


# --- Connection: nominations and other hop-by-hop headers -----------------------------------------------------------

GATEWAY_SET = "X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host, X-Portcullis-User, X-Portcullis-Device-Id, " \
              "X-Portcullis-Client-App, X-Portcullis-Correlation-Id, X-Portcullis-Assertion"


@pytest.mark.parametrize(
    "connection",
    [
        pytest.param("", id="twin: no nomination"),
        pytest.param(f"Connection: {GATEWAY_SET}, Authorization, Host, Content-Length, Transfer-Encoding\r\n",
                     id="every header the gateway sets, credentials and framing"),
        pytest.param("Connection: keep-alive\r\nConnection: X-Portcullis-User, X-Forwarded-For, "
                     "X-Portcullis-Assertion\r\n", id="Connection sent twice"),
        pytest.param("Connection:   ,,X-Portcullis-User ,\tX-Forwarded-For,, X-Portcullis-Assertion  \r\n",
                     id="odd spacing and empty elements"),
        pytest.param("CONNECTION: X-PORTCULLIS-USER, x-forwarded-FOR, X-portcullis-ASSERTION\r\n", id="odd case"),
        pytest.param("Connection: X_Portcullis_User, X.Forwarded.For, X_Portcullis_Assertion\r\n",
                     id="underscore and dot spellings"),
    ],
)
def test_connection_cannot_remove_the_headers_the_gateway_sets(gateway: Gateway, connection: str) -> None:
    """Traefik's forward-auth headers could be dropped this way (traefik/traefik#8319): the gateway
    strips nominated headers before it sets its own, and never strips framing or credentials."""
    echo = answered_echo(raw_post(gateway, connection))
    assert_gateway_headers(echo)
    assert echo["receivedHeaders"]["x-demo-body-bytes"] == "3"  # Content-Length survived its nomination
    assert "connection" not in received_names(echo)


def test_a_nomination_never_removes_framing_or_the_credential_the_decision_was_made_on() -> None:
    """The demo backend does not echo Authorization, so this one is checked on the function itself."""
    sent = ["Host", "Authorization", "Content-Length", "Transfer-Encoding", "X-Hop"]
    assert headers_to_strip(sent, [" authorization ,HOST, content_length", "Transfer-Encoding, x-hop"]) == {"X-Hop"}


@pytest.mark.parametrize(
    "head",
    [
        pytest.param("Keep-Alive: timeout=600\r\n", id="Keep-Alive"),
        pytest.param("TE: trailers\r\n", id="TE"),
        # Upgrade and HTTP2-Settings are refused before any decision (h2c 400, websocket 501):
        # tests/test_security_framing.py::test_protocol_upgrades_are_refused_before_the_upstream
        pytest.param("Proxy-Connection: keep-alive\r\n", id="Proxy-Connection"),
        pytest.param("Proxy-Authorization: Basic Zm9vOmJhcg==\r\n", id="Proxy-Authorization"),
        pytest.param("Proxy-Anything: x\r\n", id="Proxy-*"),
        pytest.param("X-Hop: x\r\nConnection: X-Hop\r\n", id="a header the client nominated"),
    ],
)
def test_hop_by_hop_headers_stop_at_the_gateway(gateway: Gateway, head: str) -> None:
    echo = answered_echo(raw_post(gateway, head))
    assert_gateway_headers(echo)
    names = {fold(line.partition(":")[0]) for line in head.split("\r\n") if line}
    assert not names & received_names(echo), names & received_names(echo)


# --- identity headers on protected and public resources and through the kiosk proxy --------------------------------

IDENTITY_HEADERS = [
    # the gateway's own
    "X-Portcullis-User", "X-Portcullis-Device-Id", "X-Portcullis-Client-App", "X-Portcullis-Correlation-Id",
    "X-Portcullis-Assertion", "X-Portcullis-Roles",
    # oauth2-proxy
    "X-Forwarded-User", "X-Forwarded-Email", "X-Forwarded-Groups", "X-Forwarded-Preferred-Username",
    "X-Forwarded-Access-Token", "X-Auth-Request-User", "X-Auth-Request-Email", "X-Auth-Request-Groups",
    "X-Auth-Request-Access-Token", "GAP-Auth",
    # Authelia, nginx/Apache, Oathkeeper, Traefik ForwardAuth examples, Keycloak gatekeeper
    "Remote-User", "Remote-Groups", "Remote-Email", "X-Remote-User", "X-User", "X-Email", "X-Auth-User",
    "X-Auth-Token", "X-Auth-Username", "X-Auth-Roles", "Auth-User", "X-User-Id", "X-Username", "X-Userinfo",
    "X-Id-Token", "X-Access-Token", "X-Authenticated-User", "X-Authenticated-Userid", "X-WebAuth-User",
    "X-Jwt-Assertion",
    # Azure App Service, AWS ALB, Google IAP, Cloudflare Access
    "X-MS-CLIENT-PRINCIPAL", "X-MS-CLIENT-PRINCIPAL-NAME", "X-MS-CLIENT-PRINCIPAL-ID", "X-MS-CLIENT-PRINCIPAL-IDP",
    "X-MS-TOKEN-AAD-ID-TOKEN", "X-Amzn-Oidc-Data", "X-Amzn-Oidc-Identity", "X-Amzn-Oidc-Accesstoken",
    "X-Goog-Authenticated-User-Email", "X-Goog-Authenticated-User-Id", "X-Goog-Iap-Jwt-Assertion",
    "Cf-Access-Authenticated-User-Email", "Cf-Access-Jwt-Assertion",
    # Pomerium, authentik, Vouch, mod_auth_openidc, Shibboleth
    "X-Pomerium-Jwt-Assertion", "X-Pomerium-Claim-Email", "X-Authentik-Username", "X-Authentik-Groups",
    "X-Vouch-User", "OIDC-Claim-Email", "OIDC-Access-Token", "Shib-Identity-Provider",
    # client certificates passed on by TLS terminators (RFC 9440, Envoy, HAProxy/OpenShift, Traefik, ARR)
    "Client-Cert", "Client-Cert-Chain", "X-Forwarded-Client-Cert", "X-Forwarded-Tls-Client-Cert",
    "X-SSL-Client-Cert", "X-SSL-Client-DN", "SSL-Client-Cert", "X-Client-Cert", "X-ARR-ClientCert",
    # Exchange's front end to back end
    "X-CommonAccessToken",
]


def _identity_request(gateway: Gateway, request: pytest.FixtureRequest, where: str,
                      headers: dict[str, str]) -> httpx.Response:
    if where == "protected":
        return gateway.request(MAIL, ACTIVESYNC, method="POST", token=outlook_token(gateway), headers=headers)
    if where == "public":
        return gateway.request(MAIL, PUBLIC, headers=headers)
    browser: httpx.Client = request.getfixturevalue("kiosk")
    if where == "kiosk, public":
        return browser.get(f"https://{MAIL}{PUBLIC}", headers=headers)
    return browser.get(f"https://{MAIL}/owa/", headers={**headers, "Authorization": f"Bearer {outlook_token(gateway)}"})


@pytest.mark.parametrize("where", ["protected", "public", "kiosk, protected", "kiosk, public"])
@pytest.mark.parametrize("name", IDENTITY_HEADERS)
def test_client_identity_headers_never_reach_the_upstream(gateway: Gateway, request: pytest.FixtureRequest,
                                                          name: str, where: str) -> None:
    sent = {spelling: f"{FORGED} ({how})" for how, spelling in spellings(name).items()}
    response = _identity_request(gateway, request, where, {**sent, TWIN[0]: TWIN[1]})
    assert response.status_code == 200, response.text
    echo = response.json()
    received = echo["receivedHeaders"]
    assert FORGED not in json.dumps(received)
    assert fold(name) in OWN_HEADERS or fold(name) not in received_names(echo)
    assert received[TWIN[0].lower()] == TWIN[1]
    assert received["x-portcullis-correlation-id"] == response.headers["x-portcullis-correlation-id"]
    if where.endswith("protected"):
        assert received["x-portcullis-user"] == "alex@contoso.test"


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(f"X-Portcullis-User : {FORGED}\r\n", id="space before the colon"),
        pytest.param(f"X-Portcullis-User\t: {FORGED}\r\n", id="tab before the colon"),
        pytest.param(f"X-Demo: a\r\n X-Portcullis-User: {FORGED}\r\n", id="obs-fold continuation line"),
        pytest.param(f"X-Demo: a\r\n\tRemote-User: {FORGED}\r\n", id="obs-fold with a tab"),
        pytest.param(f"X-Demo:\r\n X-Forwarded-For: {HEAD_OFFICE}\r\n", id="obs-fold after an empty value"),
    ],
)
def test_header_names_with_whitespace_and_folded_lines_are_refused(gateway: Gateway, head: str) -> None:
    """An upstream that trims names or reads a continuation line as a header of its own would see
    a header the gateway never saw: such requests get a 400 and never reach the upstream."""
    answer = raw_post(gateway, head)
    assert answer.startswith("HTTP/1.1 400"), answer[:300]
    assert "backend" not in answer and FORGED not in answer


def test_the_twin_of_a_folded_header_passes(gateway: Gateway) -> None:
    echo = answered_echo(raw_post(gateway, f"X-Demo: a b\r\nX-Portcullis-User: {FORGED}\r\n"))
    assert_gateway_headers(echo)
    assert echo["receivedHeaders"]["x-demo"] == "a b"


# --- the gateway's cookies ------------------------------------------------------------------------------------------

SESSION = "gAAAAAB-not-a-real-session-value"


@pytest.mark.parametrize(
    "cookies",
    [
        pytest.param([f"{COOKIE_NAME}={SESSION}; theme=dark"], id="as the gateway sets it"),
        pytest.param([f"theme=dark; {COOKIE_NAME}={SESSION}"], id="last"),
        pytest.param([f"{COOKIE_NAME}={SESSION}", "theme=dark"], id="in a Cookie header of its own"),
        pytest.param([f"__host-portcullis-session={SESSION}; theme=dark"], id="lower case"),
        pytest.param([f"__HOST-PORTCULLIS-SESSION={SESSION}; theme=dark"], id="upper case"),
        pytest.param([f"__Secure-portcullis-session={SESSION}; theme=dark"], id="__Secure- prefix"),
        pytest.param([f"portcullis-session={SESSION}; theme=dark"], id="no prefix"),
        pytest.param([f"  {COOKIE_NAME}  ={SESSION};theme=dark"], id="spaces around the name"),
        pytest.param([f"__Host-portcullis session={SESSION}; theme=dark"], id="space inside the name"),
        pytest.param([f"__Host_portcullis_session={SESSION}; theme=dark"], id="underscores"),
        pytest.param([f"__Host-portcullis.session={SESSION}; theme=dark"], id="dot"),
        pytest.param([f"__Host-portcullis%2Dsession={SESSION}; theme=dark"], id="percent-encoded"),
        pytest.param([f"__Host-portcullis-signin={SESSION}; theme=dark"], id="the sign-in binding cookie"),
    ],
)
def test_the_gateways_cookies_never_reach_the_upstream(gateway: Gateway, cookies: list[str]) -> None:
    head = "".join(f"Cookie: {value}\r\n" for value in cookies)
    echo = answered_echo(raw_post(gateway, head))
    assert_gateway_headers(echo)
    assert echo["receivedHeaders"]["x-demo-cookie-names"] == "theme"  # the user's own cookie: the twin


def test_a_signed_in_browser_keeps_its_own_cookies_and_loses_the_gateways(gateway: Gateway) -> None:
    _, cookie = sign_in(gateway)
    value = cookie.partition("=")[2]
    page = gateway.request(MAIL, "/owa/", headers={**BROWSER, "Cookie": f"{cookie}; theme=dark; "
                                                                        f"__host-portcullis-session={value}"})
    assert page.status_code == 200
    received = page.json()["receivedHeaders"]
    assert received["x-portcullis-user"] == "alex@contoso.test"
    assert received["x-demo-cookie-names"] == "theme"


ROUTING_COOKIES = [
    pytest.param("X-BEResource=localhost/EWS/Exchange.asmx?a=~1942062522", id="X-BEResource (ProxyLogon)"),
    pytest.param("X-AnonResource=true; X-AnonResource-Backend=localhost/ecp/default.flt?~3",
                 id="X-AnonResource and X-AnonResource-Backend"),
    pytest.param("x-beresource=localhost~1", id="lower case"),
    pytest.param("X_AnonResource_Backend=localhost/ecp/~3", id="underscores"),
    pytest.param("X-AnonResource%2DBackend=localhost/ecp/~3", id="percent-encoded"),
    pytest.param("session=1, X-BEResource=localhost~1", id="hidden behind a comma"),
]


@pytest.mark.parametrize("where", ["protected", "public", "kiosk, protected", "kiosk, public"])
@pytest.mark.parametrize("cookie", ROUTING_COOKIES)
def test_exchange_routing_cookies_never_reach_the_upstream(gateway: Gateway, request: pytest.FixtureRequest,
                                                           where: str, cookie: str) -> None:
    """Exchange's front end picks the back end of a request by these cookies; ProxyLogon
    (CVE-2021-26855) sent them from outside, on the public /owa/auth/ and /ecp/ paths. No client has
    any business sending them, nor their header spellings. The twins: the user's own cookies and
    Exchange's ``X-BackEndCookie`` (which Exchange sets in browsers itself) arrive."""
    sent = {"Cookie": f"lang=en; {cookie}; X-BackEndCookie=S-1-5-21=u56Lnp2ejJqBm5vJx8fHzsbSz5rHx8zSy8fLytLGy8fG; "
                      "theme=dark", "X-BEResource": "localhost~1942062522", "X-AnonResource-Backend": "localhost/ecp/"}
    response = _identity_request(gateway, request, where, {**sent, TWIN[0]: TWIN[1]})
    assert response.status_code == 200, response.text
    received = response.json()["receivedHeaders"]
    assert received["x-demo-cookie-names"] == "X-BackEndCookie,lang,theme"
    assert {"x-beresource", "x-anonresource-backend"}.isdisjoint(received_names(response.json()))
    assert received[TWIN[0].lower()] == TWIN[1]


@pytest.mark.parametrize(
    ("headers", "kept"),
    [
        pytest.param(["X-BEResource=localhost~1; b=2", "X-AnonResource=true"], ["b=2"], id="Exchange routing"),
        pytest.param(["theme=dark, __Host-portcullis-session=x"], [], id="hidden behind a comma"),
        pytest.param(["a=1; b=2", "__Host-portcullis-session=x"], ["a=1; b=2"], id="second header"),
        pytest.param(["a=1", "b=2;c=3", "X-BEResource=x", " d=4 "], ["a=1; b=2; c=3; d=4"],
                     id="every field's pairs, in one field"),
        pytest.param(["a=1;;  ; b=2"], ["a=1; b=2"], id="empty pairs"),
        pytest.param(["portcullis=1; portcullisx=2"], ["portcullis=1; portcullisx=2"], id="twin: similar names"),
    ],
)
def test_upstream_cookies(headers: list[str], kept: list[str]) -> None:
    assert upstream_cookies(headers) == kept
    assert is_gateway_cookie(" __SECURE-Portcullis_Signin=1") and not is_gateway_cookie("session=1")


# --- secrets in logs ------------------------------------------------------------------------------------------------

def test_tokens_and_session_cookies_never_reach_a_log(gateway: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    _, cookie = sign_in(gateway)
    session = cookie.partition("=")[2]
    allowed, denied = outlook_token(gateway), outlook_token(gateway, client_id=TEAMS)
    expired, garbage = outlook_token(gateway, lifetime=-120), "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    reader, roleless = admin_token(gateway, READER), admin_token(gateway)
    answers = {token: gateway.request(MAIL, ACTIVESYNC, method="POST", token=token,
                                      headers={"Cookie": f"{COOKIE_NAME}={session}"})
               for token in (allowed, denied, expired, garbage)}
    assert [a.status_code for a in answers.values()] == [200, 403, 401, 401]
    browser = gateway.request(MAIL, "/owa/", headers={**BROWSER, "Cookie": cookie})
    assert browser.status_code == 200
    assert gateway.request(MAIL, "/owa/", headers={**BROWSER, "Cookie": f"{COOKIE_NAME}={session}x"}).status_code == 302
    for token, status in ((reader, 200), (roleless, 403)):
        assert admin(gateway.admin_port, "GET", "/readyz", token,
                     headers={"Cookie": f"{COOKIE_NAME}={session}"}).status_code == status
    for answer in [*answers.values(), browser]:
        gateway.decision(answer.headers["x-portcullis-correlation-id"])  # written (the log has its own thread)
    gateway_log = "\n".join(f"{r.name}: {r.getMessage()} {r.exc_text or ''}" for r in caplog.records
                            if r.thread != threading.get_ident())  # not this test's own HTTP client
    logs = {"decision log": gateway.decision_log.read_text(),
            "admin audit log": audit_path(gateway.config_dir).read_text(), "gateway log": gateway_log}
    secrets = {"session cookie": session, **{f"token {i}": t for i, t in enumerate(
        (allowed, denied, expired, garbage, reader, roleless))}}
    secrets |= {f"{name} signature": value.rsplit(".", 1)[-1] for name, value in secrets.items() if "token" in name}
    leaks = [(log, secret) for log, text in logs.items() for secret, value in secrets.items() if value in text]
    assert not leaks
