"""Routing attacks through the real listener: the path the rules match is the path the upstream
receives, rules match the path (never the query or a fragment), only origin-form targets on the
destination named once by Host, ``:authority`` and SNI, every method gets the decision GET gets,
and Exchange's explicit-logon URL shapes never reach a stricter resource behind a looser rule.

Each attack has a legitimate twin that must still pass, read back from the demo backends (they
echo ``path``, ``rawPath`` and ``method`` as they received them, even for a 404 or 405)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from ruamel.yaml import YAML

from gateway.app.demo import TEAMS
from tests.conftest import Background, Gateway, Ports, gateway_config, operations_for, proxy_for
from tests.helpers.hosts import MAIL
from tests.helpers.http import raw_exchange
from tests.helpers.tokens import outlook_token

DOCS = "docs.contoso.test"
SIGN_IN_PAGE = "/owa/auth/logon.aspx"  # the demo's public resource (exchange-owa-sign-in-page)
PUBLIC = "exchange-owa-sign-in-page"
PROXYSHELL = "/autodiscover/autodiscover.json?@evil.test/mapi/nspi/?&Email=autodiscover/autodiscover.json%3F@evil.test"
PROXYNOTSHELL = ("/autodiscover/autodiscover.json?@evil.test/owa/?&Email=autodiscover/autodiscover.json%3F@evil.test"
                 "&Protocol=XYZ&FooProtocol=Powershell")
STATUS_LINE = re.compile(r"^HTTP/1\.[01] [0-9]{3} ", re.MULTILINE)
AUTODISCOVER_V2 = "/autodiscover/autodiscover.json?Email=alex%40contoso.test&Protocol=ActiveSync&RedirectCount=1"


@dataclass(frozen=True)
class Answer:
    """One HTTP/1 answer as the client read it."""

    status: int
    headers: dict[str, str]
    text: str
    answers: int  # status lines read before the gateway closed the connection

    def json(self) -> dict[str, Any]:
        return json.loads(self.text)

    @property
    def reached_backend(self) -> bool:
        return '"backend"' in self.text

    @property
    def refused_by_gateway(self) -> bool:
        """The gateway's own JSON refusal (a backend's plain-text 400 is not one)."""
        with contextlib.suppress(ValueError):
            return "error" in self.json() and not self.reached_backend
        return False

    @property
    def closed(self) -> bool:
        return self.headers.get("connection", "").lower() == "close"


def parsed(raw: str) -> Answer:
    head, _, body = raw.partition("\r\n\r\n")
    status_line, *fields = head.split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (f.partition(":") for f in fields)}
    return Answer(int(status_line.split(" ")[1]), headers, body, len(STATUS_LINE.findall(raw)))


def send(gateway: Gateway, method: str, target: str, *, host: str = MAIL, token: str | None = None,
         head: str = "") -> Answer:
    """One hand-written request (``Connection: close``), exactly as written."""
    authorization = f"Authorization: Bearer {token}\r\n" if token else ""
    host_line = f"Host: {host}\r\n" if host else ""
    return parsed(raw_exchange(gateway, f"{method} {target} HTTP/1.1\r\n{host_line}{authorization}{head}"
                                        "Connection: close\r\n\r\n"))


@contextlib.contextmanager
def tls_connection(gateway: Gateway, alpn: list[str] | None = None, sni: str = MAIL) -> Iterator[ssl.SSLSocket]:
    """A TLS connection to the listener offering ``alpn``, for bytes ``raw_exchange`` cannot send."""
    context = ssl.create_default_context()
    gateway.ca.configure_trust(context)
    if alpn:
        context.set_alpn_protocols(alpn)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=sni) as tls:
        yield tls


def until_closed(tls: ssl.SSLSocket) -> bytes:
    return b"".join(iter(lambda: tls.recv(65536), b""))


def h2_request(gateway: Gateway, headers: list[tuple[str, str]], sni: str = MAIL) -> tuple[int | None, str]:
    """One HTTP/2 stream with exactly these header fields (no client-side validation): the status
    (None when the gateway reset the stream or the connection instead) and the body."""
    with tls_connection(gateway, ["h2"], sni) as tls:
        assert tls.selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8", validate_outbound_headers=False,
            normalize_outbound_headers=False))
        conn.initiate_connection()
        conn.send_headers(1, headers, end_stream=True)
        tls.sendall(conn.data_to_send())
        status: int | None = None
        body = b""
        while True:
            data = tls.recv(65536)
            if not data:
                return status, body.decode(errors="replace")
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[":status"])
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamReset | h2.events.ConnectionTerminated):
                    return None, body.decode(errors="replace")
                elif isinstance(event, h2.events.StreamEnded):
                    return status, body.decode(errors="replace")
            tls.sendall(conn.data_to_send())


def h2_get(path: str, authority: str | None = MAIL, *extra: tuple[str, str],
           method: str = "GET") -> list[tuple[str, str]]:
    fields = [(":method", method), (":scheme", "https"), (":path", path)]
    return fields + ([(":authority", authority)] if authority is not None else []) + list(extra)


def teams_token(gateway: Gateway) -> str:
    """Alex's compliant iPhone, but Teams: allowed on OWA (any app), blocked on ActiveSync and
    Autodiscover (Outlook only): OWA is the looser resource for this token."""
    return outlook_token(gateway, client_id=TEAMS)


# --- one canonical path: what the upstream receives is what was matched -------------------------


@pytest.mark.parametrize(
    ("target", "decoded", "resource", "authenticated"),
    [
        pytest.param(SIGN_IN_PAGE, SIGN_IN_PAGE, PUBLIC, False, id="plain"),
        pytest.param("/OWA/Auth/logon.aspx", "/OWA/Auth/logon.aspx", PUBLIC, False, id="case: matched as /owa/auth/"),
        pytest.param("/owa/auth/%6Cogon.aspx", SIGN_IN_PAGE, PUBLIC, False, id="unreserved letter encoded"),
        pytest.param("/owa/auth/%4c%4F%47%4f%4E.aspx", "/owa/auth/LOGON.aspx", PUBLIC, False, id="mixed-case escapes"),
        pytest.param("/owa/auth/a%20b.gif", "/owa/auth/a b.gif", PUBLIC, False, id="encoded space inside a segment"),
        pytest.param("/owa/auth/caf%C3%A9.css", "/owa/auth/café.css", PUBLIC, False, id="UTF-8 escapes"),
        pytest.param("/owa/auth/100%25.png", "/owa/auth/100%.png", PUBLIC, False, id="encoded percent, once"),
        pytest.param("/owa/auth/C%23.css", "/owa/auth/C#.css", PUBLIC, False, id="encoded # (SharePoint allows it)"),
        pytest.param("/owa/auth/a+b!$&'()*,=@~:.js", "/owa/auth/a+b!$&'()*,=@~:.js", PUBLIC, False,
                     id="sub-delimiters kept raw"),
        pytest.param("/owa/auth/x.js?u=%2F..%2Fecp%2F", "/owa/auth/x.js", PUBLIC, False, id="dots only in the query"),
        pytest.param("/owa/%73ervice.svc?action=GetFolder", "/owa/service.svc", "exchange-owa", True,
                     id="protected: encoded letter"),
        pytest.param("/Owa/service.svc", "/Owa/service.svc", "exchange-owa", True, id="protected: case"),
    ],
)
def test_the_upstream_receives_the_target_the_rules_matched(gateway: Gateway, target: str, decoded: str,
                                                             resource: str, authenticated: bool) -> None:
    """Byte for byte: mitmproxy forwards the request line it parsed, and the path the backend
    decodes is the canonical path the decision matched (IIS serves /OWA/ as /owa/; the demo
    backend is case-sensitive, so it answers those with a 404 that still echoes what arrived)."""
    answer = send(gateway, "GET", target, token=teams_token(gateway) if authenticated else None)
    assert answer.reached_backend, answer.text
    echoed = answer.json()
    path, _, query = target.partition("?")
    assert echoed["rawPath"] == path
    assert echoed["query"] == query
    assert echoed["path"] == decoded
    record = gateway.decision(answer.headers["x-portcullis-correlation-id"])
    assert record["request"]["path"] == decoded
    assert record["matchedResources"][0] == resource and record["status"]["failureReason"] is None


@pytest.mark.parametrize(
    "target",
    [
        pytest.param("/owa/auth/..%2f..%2fecp/default.flt", id="encoded slash"),
        pytest.param("/owa/auth/%2e%2e/%2e%2e/ecp/", id="encoded dot segments"),
        pytest.param("/owa/auth/%252e%252e/%252e%252e/ecp/", id="double encoding"),
        pytest.param("/owa/auth/..%5c..%5cecp/", id="encoded backslash"),
        pytest.param("/owa/auth/..\\..\\ecp/", id="raw backslash"),
        pytest.param("/owa/auth/..;/..;/ecp/", id="path parameters"),
        pytest.param("/owa/auth;x=1/../../ecp/", id="path parameter then dots"),
        pytest.param("/owa/auth/%00/../../ecp/", id="NUL"),
        pytest.param("/owa/auth/%c0%ae%c0%ae/%c0%ae%c0%ae/ecp/", id="overlong UTF-8 dots"),
        pytest.param("/owa/auth/%e0%80%ae%e0%80%ae/ecp/", id="3-byte overlong dot"),
        pytest.param("/owa/auth/%c0%af..%c0%afecp/", id="overlong UTF-8 slash"),
        pytest.param("/owa/auth/%u002e%u002e/%u002e%u002e/ecp/", id="IIS %u encoding"),
        pytest.param("/owa/auth/%EF%BC%8E%EF%BC%8E%EF%BC%8F%EF%BC%8E%EF%BC%8E%EF%BC%8Fecp/",
                     id="fullwidth dots and slash (best-fit)"),
        pytest.param("/owa/auth/x%EF%BC%8F", id="fullwidth slash alone"),
        pytest.param("/owa/auth./logon.aspx", id="trailing dot on a segment"),
        pytest.param("/owa/auth%20/logon.aspx", id="trailing encoded space"),
        pytest.param("/owa/auth/x%3f/../../ecp/", id="encoded question mark"),
        pytest.param("/owa/auth//..//ecp/", id="empty segments"),
        pytest.param("/owa/auth/caf\u00e9", id="raw non-ASCII byte"),
        pytest.param("/owa/auth/x#/../../ecp/", id="raw fragment"),
    ],
)
def test_ambiguous_spellings_of_a_public_path_never_reach_the_upstream(gateway: Gateway, target: str) -> None:
    """Each starts with the public sign-in path and could read as /ecp/ (no resource: denied) to
    some upstream. The twin: the plain sign-in page is forwarded."""
    answer = send(gateway, "GET", target)
    assert answer.status == 400, answer.text
    assert answer.json()["error"] == "bad_request" and not answer.reached_backend
    assert send(gateway, "GET", SIGN_IN_PAGE).json()["rawPath"] == SIGN_IN_PAGE


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(b"/owa/auth/\xc0\xae\xc0\xae/\xc0\xae\xc0\xae/ecp/", id="raw overlong dots"),
        pytest.param(b"/owa/auth/\xff", id="raw byte that is not UTF-8"),
        pytest.param(b"/owa/auth/\x7f", id="raw DEL"),
    ],
)
def test_raw_bytes_outside_ascii_are_refused(gateway: Gateway, path: bytes) -> None:
    """A request target is ASCII: raw high bytes decode differently in every server."""
    with tls_connection(gateway) as tls:
        tls.sendall(b"GET " + path + f" HTTP/1.1\r\nHost: {MAIL}\r\nConnection: close\r\n\r\n".encode())
        answer = parsed(until_closed(tls).decode("latin-1"))
    assert answer.status == 400 and answer.refused_by_gateway


# --- rules match the path, not the query or the fragment -----------------------------------------


@pytest.mark.parametrize(
    ("target", "status", "token"),
    [
        pytest.param("/ecp/?x=/owa/auth/logon.aspx", 403, None, id="public path in the query"),
        pytest.param("/ecp/?/owa/auth/", 403, None, id="query that is a public path"),
        pytest.param("/ecp/%3f/owa/auth/", 400, None, id="encoded ? before a public path"),
        pytest.param("/ecp%3F/owa/auth/logon.aspx", 400, None, id="encoded ? in the first segment"),
        pytest.param("/ecp/#/owa/auth/", 400, None, id="fragment before a public path"),
        pytest.param("/owa/auth/logon.aspx?a#/../../ecp/", 400, None, id="fragment after the query"),
        pytest.param("/Microsoft-Server-ActiveSync?Cmd=Sync&x=/owa/", 403, "teams",
                     id="allowed path in the query of a blocked one"),
        pytest.param("/autodiscover/autodiscover.xml?r=/owa/", 403, "teams", id="Autodiscover with OWA in the query"),
    ],
)
def test_rules_match_the_path_not_the_query_or_fragment(gateway: Gateway, target: str, status: int,
                                                        token: str | None) -> None:
    answer = send(gateway, "POST" if "ActiveSync" in target else "GET", target,
                  token=teams_token(gateway) if token else None, head="Content-Length: 0\r\n")
    assert answer.status == status and answer.refused_by_gateway, answer.text


@pytest.mark.parametrize(
    ("target", "token"),
    [
        pytest.param("/owa/auth/logon.aspx?x=/ecp/", None, id="public path, denied one in the query"),
        pytest.param("/owa/?x=/Microsoft-Server-ActiveSync", "teams", id="allowed path, blocked one in the query"),
    ],
)
def test_the_twins_with_paths_in_their_query_pass(gateway: Gateway, target: str, token: str | None) -> None:
    answer = send(gateway, "GET", target, token=teams_token(gateway) if token else None)
    assert answer.status == 200, answer.text
    path, _, query = target.partition("?")
    assert (answer.json()["rawPath"], answer.json()["query"]) == (path, query)


# --- origin-form only -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_line",
    [
        pytest.param(f"GET https://{MAIL}{SIGN_IN_PAGE} HTTP/1.1", id="absolute-form, same host"),
        pytest.param(f"GET https://{DOCS}/sites/team/ HTTP/1.1", id="absolute-form naming another host"),
        pytest.param(f"GET http://evil.test{SIGN_IN_PAGE} HTTP/1.1", id="absolute-form naming a foreign host"),
        pytest.param(f"GET HTTPS://{MAIL}/ecp/ HTTP/1.1", id="absolute-form, upper-case scheme"),
        pytest.param("OPTIONS * HTTP/1.1", id="asterisk-form"),
        pytest.param("PRI * HTTP/2.0", id="HTTP/2 preface sent as HTTP/1"),
    ],
)
def test_other_request_target_forms_are_refused_and_the_connection_closed(gateway: Gateway,
                                                                          request_line: str) -> None:
    """A pipelined second request is never answered: the connection closes after the 400."""
    answer = parsed(raw_exchange(gateway, f"{request_line}\r\nHost: {MAIL}\r\n\r\n"
                                          f"GET {SIGN_IN_PAGE} HTTP/1.1\r\nHost: {MAIL}\r\nConnection: close\r\n\r\n"))
    assert answer.status == 400 and answer.refused_by_gateway, answer.text
    assert answer.closed and answer.answers == 1


def assert_the_gateways_own_refusal(answer: Answer) -> None:
    """The gateway's JSON with a correlation id (in the body and the header), never mitmproxy's HTML
    page naming its version, and the connection closed."""
    assert answer.status == 400 and answer.refused_by_gateway, answer.text
    assert answer.json()["correlationId"] == answer.headers["x-portcullis-correlation-id"]
    assert "server" not in answer.headers and "mitmproxy" not in answer.text.lower()
    assert answer.closed and answer.answers == 1


def test_connect_on_the_reverse_listener_is_refused_and_the_connection_closed(gateway: Gateway) -> None:
    """mitmproxy alone refused it with its own HTML page and ``Server: mitmproxy <version>``."""
    answer = parsed(raw_exchange(gateway, f"CONNECT {DOCS}:443 HTTP/1.1\r\nHost: {DOCS}:443\r\n\r\n"
                                          f"GET {SIGN_IN_PAGE} HTTP/1.1\r\nHost: {MAIL}\r\nConnection: close\r\n\r\n"))
    assert_the_gateways_own_refusal(answer)
    assert "CONNECT is not accepted" in answer.json()["error_description"]


@pytest.mark.parametrize(
    "target",
    [
        pytest.param("owa/", id="no leading slash"),
        pytest.param(f"{MAIL}:443", id="authority-form on GET"),
        pytest.param(f"ftp://{MAIL}/owa/", id="a scheme without a default port"),
        pytest.param("https://", id="a scheme and nothing else"),
        pytest.param(f"https://{MAIL}:99999/owa/", id="port out of range"),
    ],
)
def test_targets_mitmproxy_cannot_read_get_the_gateways_400(gateway: Gateway, target: str,
                                                            run_log_levels: pytest.LogCaptureFixture) -> None:
    """mitmproxy alone answered these with its HTML page, which quoted the request line (and logged
    it: a token in the query would have reached the log). The refusal is logged at the levels
    ``portcullis run`` logs at."""
    caplog = run_log_levels
    answer = parsed(raw_exchange(gateway, f"GET {target}?access_token=secret-in-the-query HTTP/1.1\r\n"
                                          f"Host: {MAIL}\r\n\r\n"))
    assert_the_gateways_own_refusal(answer)
    assert "secret-in-the-query" not in answer.text
    assert not [r for r in caplog.records if "secret-in-the-query" in r.getMessage()]
    assert [r for r in caplog.records if answer.json()["correlationId"] in r.getMessage()]


@pytest.mark.parametrize("method", ["GET", "OPTIONS", "HEAD"])
def test_the_origin_form_twin_is_forwarded(gateway: Gateway, method: str) -> None:
    answer = send(gateway, method, SIGN_IN_PAGE)
    assert answer.status == 200
    record = gateway.decision(answer.headers["x-portcullis-correlation-id"])
    assert record["request"]["method"] == method and record["matchedResources"] == [PUBLIC]


def test_an_h2_prior_knowledge_preface_without_alpn_is_refused(gateway: Gateway) -> None:
    """The listener offers h2 by ALPN only: a preface on an HTTP/1 connection is an asterisk-form request."""
    with tls_connection(gateway) as tls:
        assert tls.selected_alpn_protocol() is None
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        answer = parsed(until_closed(tls).decode("latin-1"))
    assert answer.status == 400 and answer.closed and answer.answers == 1


# --- Host, :authority and SNI name one destination -----------------------------------------------


@pytest.mark.parametrize(
    ("host_lines", "status"),
    [
        pytest.param(f"Host: {MAIL}\r\nHost: {MAIL}\r\n", 400, id="two equal Host headers"),
        pytest.param(f"Host: {MAIL}\r\nHost: {DOCS}\r\n", 400, id="two different Host headers"),
        pytest.param(f"Host: {MAIL}, {DOCS}\r\n", 400, id="Host list"),
        pytest.param(f"Host: evil@{MAIL}\r\n", 400, id="userinfo"),
        pytest.param(f"Host: {MAIL}@evil.test\r\n", 400, id="userinfo after the name"),
        pytest.param(f"Host: {MAIL}:\r\n", 400, id="empty port"),
        pytest.param(f"Host: {MAIL}:44x\r\n", 400, id="port that is not a number"),
        pytest.param(f"Host: {MAIL}/ecp\r\n", 400, id="path in Host"),
        pytest.param("", 400, id="no Host"),
        pytest.param(f"Host: {MAIL}:9999\r\n", 421, id="another port"),
        pytest.param(f"Host: {DOCS}\r\n", 421, id="another host than SNI"),
        pytest.param("Host: mail.contoso.test.evil.test\r\n", 421, id="suffix"),
    ],
)
def test_host_must_name_the_sni_host_once_and_plainly(gateway: Gateway, host_lines: str, status: int) -> None:
    answer = parsed(raw_exchange(gateway, f"GET {SIGN_IN_PAGE} HTTP/1.1\r\n{host_lines}Connection: close\r\n\r\n"))
    assert answer.status == status and answer.refused_by_gateway, answer.text
    assert answer.closed or status == 421


@pytest.mark.parametrize(
    "host",
    [
        pytest.param(MAIL, id="plain"),
        pytest.param("MAIL.Contoso.TEST", id="case"),
        pytest.param(f"{MAIL}.", id="trailing dot (the absolute DNS name)"),
        pytest.param(f"{MAIL}:443", id="default port"),
        pytest.param("listener", id="the listener's own port"),
    ],
)
def test_the_host_twins_reach_the_upstream_with_the_canonical_host(gateway: Gateway, host: str) -> None:
    host = f"{MAIL}:{gateway.port}" if host == "listener" else host
    answer = send(gateway, "GET", SIGN_IN_PAGE, host=host)
    assert answer.status == 200, answer.text
    received = answer.json()["receivedHeaders"]
    assert received["host"] == MAIL and received["x-forwarded-host"] == MAIL


def test_the_listener_offers_h2_by_alpn(gateway: Gateway) -> None:
    """So :authority is a second place to name the host; its twin is an ordinary h2 request,
    whose :path reaches the HTTP/1 upstream byte for byte."""
    status, body = h2_request(gateway, h2_get("/owa/auth/%6Cogon.aspx?a=%2F"))
    assert status == 200
    echoed = json.loads(body)
    assert (echoed["rawPath"], echoed["path"], echoed["query"]) == ("/owa/auth/%6Cogon.aspx", SIGN_IN_PAGE, "a=%2F")
    assert echoed["receivedHeaders"]["host"] == MAIL


@pytest.mark.parametrize(
    ("fields", "sni"),
    [
        pytest.param(h2_get(SIGN_IN_PAGE, MAIL, ("host", DOCS)), MAIL, id=":authority and Host differ"),
        pytest.param(h2_get(SIGN_IN_PAGE, DOCS, ("host", MAIL)), MAIL, id="Host agrees with SNI, :authority not"),
        pytest.param(h2_get(SIGN_IN_PAGE, DOCS), MAIL, id=":authority is another host than SNI"),
        pytest.param(h2_get(SIGN_IN_PAGE, f"evil@{MAIL}"), MAIL, id=":authority with userinfo"),
        pytest.param(h2_get(SIGN_IN_PAGE, f"{MAIL}:9999"), MAIL, id=":authority with another port"),
        pytest.param(h2_get(SIGN_IN_PAGE, None, ("host", DOCS)), MAIL, id="no :authority, Host another host"),
        pytest.param(h2_get("*", MAIL, method="OPTIONS"), MAIL, id="asterisk :path"),
        pytest.param(h2_get(f"https://{DOCS}/sites/", MAIL), MAIL, id="absolute :path"),
        pytest.param(h2_get(SIGN_IN_PAGE, MAIL, method="get"), MAIL, id="lower-case :method"),
    ],
)
def test_http2_names_one_destination_and_an_origin_form_path(gateway: Gateway, fields: list[tuple[str, str]],
                                                             sni: str) -> None:
    status, body = h2_request(gateway, fields, sni)
    assert status in (None, 400, 421), (status, body)  # None: reset by the HTTP/2 layer itself
    assert '"backend"' not in body


# --- every method gets the decision GET gets ---------------------------------------------------


METHODS = ["GET", "HEAD", "OPTIONS", "POST", "PUT", "DELETE", "PROPFIND", "MKCOL", "VERSION-CONTROL", "FOO"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("target", "token", "status"),
    [
        pytest.param("/Microsoft-Server-ActiveSync?Cmd=Sync", "teams", 403, id="app not approved"),
        pytest.param("/ecp/", None, 403, id="no resource"),
        pytest.param("/owa/", None, 401, id="no token"),
    ],
)
def test_a_blocked_request_is_blocked_whatever_its_method(gateway: Gateway, method: str, target: str,
                                                          token: str | None, status: int) -> None:
    answer = send(gateway, method, target, token=teams_token(gateway) if token else None,
                  head="Content-Length: 0\r\n")
    assert answer.status == status and not answer.reached_backend, answer.text
    record = gateway.decision(answer.headers["x-portcullis-correlation-id"])  # HEAD answers have no body
    assert (record["request"]["method"], record["httpStatus"]) == (method, status)


@pytest.mark.parametrize("method", METHODS)
def test_an_allowed_request_is_forwarded_whatever_its_method(gateway: Gateway, method: str) -> None:
    """The twin: the backend gets the method as sent and answers it (405 for what it does not serve)."""
    answer = send(gateway, method, "/owa/", token=teams_token(gateway), head="Content-Length: 0\r\n")
    record = gateway.decision(answer.headers["x-portcullis-correlation-id"])
    assert record["status"]["failureReason"] is None and record["matchedResources"] == ["exchange-owa"]
    if method == "HEAD":
        assert answer.status == 200 and answer.headers["content-type"] == "application/json"
    else:
        assert answer.json()["method"] == method
        assert answer.status == (200 if method in ("GET", "OPTIONS", "POST", "PUT", "DELETE") else 405)


@pytest.mark.parametrize("method", ["get", "Get", "pOST", "propfind"])
def test_methods_not_in_upper_case_are_refused(gateway: Gateway, method: str) -> None:
    """mitmproxy upper-cases ``request.method`` for its hooks but forwards the bytes as sent: the
    decision would be taken for GET while the upstream reads ``get`` (some servers fold it to
    GET, others do not). Refused for everyone, the allowed user included."""
    answer = send(gateway, method, "/owa/", token=teams_token(gateway), head="Content-Length: 0\r\n")
    assert answer.status == 400 and "ambiguous request method" in answer.text
    assert answer.closed and not answer.reached_backend


@pytest.mark.parametrize("method", ["TRACE", "TRACK"])
@pytest.mark.parametrize("token", [None, "teams"])
def test_trace_is_never_forwarded(gateway: Gateway, method: str, token: str | None) -> None:
    """Cross-site tracing: TRACE echoes the request, its cookies and the gateway's identity
    headers back to a script. 501 for every path and user, the allowed one included."""
    answer = send(gateway, method, "/owa/", token=teams_token(gateway) if token else None)
    assert answer.status == 501 and answer.json()["error"] == "not_implemented"
    assert not answer.reached_backend
    assert "cross-site tracing" in gateway.decision(answer.json()["correlationId"])["status"]["failureReason"]


# --- Exchange's explicit-logon shapes --------------------------------------------------------------


EXPLICIT_LOGON_ATTACKS = [
    pytest.param(PROXYSHELL, id="ProxyShell"),
    pytest.param(PROXYNOTSHELL, id="ProxyNotShell"),
    pytest.param("/autodiscover/autodiscover.json?@evil.test/ecp/?&Email=autodiscover%2Fautodiscover%2Ejson%253F@x",
                 id="Email encoded"),
    pytest.param("/autodiscover/autodiscover.json?@evil.test/mapi/?&Email=Autodiscover%252FAutodiscover%252EJSON",
                 id="Email double-encoded, other case"),
    pytest.param("/autodiscover/autodiscover.json?a=autodiscover%2525252ejson", id="nested encodings"),
    pytest.param("/autodiscover/autodiscover.json?a=%" + "25" * 12 + "41", id="encodings nested too deep"),
    pytest.param("/autodiscover/autodiscover.json@evil.test/owa/", id="explicit logon in the path"),
    pytest.param("/Autodiscover/Autodiscover.json%40evil.test/ecp/", id="encoded @ in the path"),
]
EXPLICIT_LOGON_TWINS = [
    pytest.param(AUTODISCOVER_V2, "/autodiscover/autodiscover.json", id="Autodiscover v2 with Email"),
    pytest.param("/autodiscover/autodiscover.json/v1.0/alex@contoso.test?Protocol=ActiveSync",
                 "/autodiscover/autodiscover.json/v1.0/alex@contoso.test", id="Autodiscover v2, address in the path"),
]


@pytest.mark.parametrize("target", EXPLICIT_LOGON_ATTACKS)
def test_explicit_logon_shapes_are_refused_even_with_a_token(gateway: Gateway, target: str) -> None:
    """Outlook on a compliant device may use Autodiscover; it still cannot steer Exchange's
    front end to /mapi/, /ecp/ or /owa/ through it."""
    answer = send(gateway, "GET", target, token=outlook_token(gateway))
    assert answer.status == 400 and answer.refused_by_gateway, answer.text


@pytest.mark.parametrize(("target", "path"), EXPLICIT_LOGON_TWINS)
def test_autodiscover_twins_reach_autodiscover(gateway: Gateway, target: str, path: str) -> None:
    answer = send(gateway, "GET", target, token=outlook_token(gateway))
    assert answer.status == 200 and answer.json()["path"] == path


@contextlib.asynccontextmanager
async def _public_autodiscover_gateway(config_dir: Path) -> AsyncIterator[int]:
    operations = await operations_for(config_dir)
    async with proxy_for(operations.service) as port:
        yield port


@pytest.fixture(scope="module")
def public_autodiscover(gateway: Gateway, demo_ports: Ports,
                        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway whose Autodiscover JSON endpoint is public (some deployments open it for
    Outlook's discovery): a looser resource in front of /mapi/, /ecp/ and /owa/."""
    config_dir = gateway_config(tmp_path_factory.mktemp("public-autodiscover"), gateway.ca,
                                Ports(0, demo_ports.idp, demo_ports.mail, demo_ports.docs))
    yaml = YAML()
    data = yaml.load(config_dir / "portcullis.yaml")
    data["resources"]["autodiscover-json"] = {"hosts": [MAIL], "paths": ["/autodiscover/autodiscover.json"],
                                              "public": True}
    yaml.dump(data, config_dir / "portcullis.yaml")
    with Background(lambda: _public_autodiscover_gateway(config_dir)) as port:
        yield dataclasses.replace(gateway, port=port)


@pytest.mark.parametrize("target", EXPLICIT_LOGON_ATTACKS)
def test_a_public_autodiscover_never_reaches_a_stricter_resource(public_autodiscover: Gateway, target: str) -> None:
    """Without a token: the looser rule is the only one that could let these through."""
    answer = send(public_autodiscover, "GET", target)
    assert answer.status == 400 and answer.refused_by_gateway, answer.text


@pytest.mark.parametrize(("target", "path"), EXPLICIT_LOGON_TWINS)
def test_a_public_autodiscover_still_serves_autodiscover(public_autodiscover: Gateway, target: str,
                                                        path: str) -> None:
    answer = send(public_autodiscover, "GET", target)
    assert answer.status == 200 and answer.json()["path"] == path
    assert send(public_autodiscover, "GET", "/mapi/nspi/").status == 401  # what it fronts stays strict
