"""Envoy's ext_authz and Traefik's ForwardAuth at the HTTP level. Neither is installable here, so
neither runs: each test reads the shipped snippet (deploy/envoy/envoy.yaml, deploy/traefik/portcullis.yml),
asks the real forward-auth listener exactly what those settings make the edge ask (as the edge's
reference documentation and source describe it: docs/forward-auth.md), and applies the snippet's
rules to the answer: what would reach the upstream, what the client would get."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
import pytest
from ruamel.yaml import YAML

from gateway.app.demo import ACTIVESYNC, ACTIVESYNC_UA, BLAKE_ANDROID, BROWSER_UA, OFFICE, activesync
from gateway.http.headers import CORRELATION_ID
from gateway.web import forward_auth
from tests.helpers.forward_auth import OUTSIDER, ask
from tests.helpers.running import Started
from tests.helpers.tokens import outlook_token

MAIL = "mail.contoso.test"
CLIENT = "203.0.113.7"
DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
SERVER_OWN = {"date", "server", "content-length"}  # uvicorn's; no edge copies them from an answer


def _load(path: Path) -> Any:
    return YAML(typ="safe").load(path.read_text())


class Client:
    """A client's request as the edge receives it (header names in lower case)."""

    def __init__(self, method: str, target: str, headers: dict[str, str] | None = None) -> None:
        self.method, self.target, self.host, self.address = method, target, MAIL, CLIENT
        self.headers = {name.lower(): value for name, value in (headers or {}).items()}


class Envoy:
    """What deploy/envoy/envoy.yaml makes Envoy do (ext_authz HTTP service, header_mutation before it)."""

    FORMAT = re.compile(r"%(DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT|REQ\(([a-z0-9-]+)\))%")
    ALWAYS_SENT = {"authorization"}  # with Host, the method and the path
    ALWAYS_RELAYED = {"www-authenticate", "location"}  # with the status, Content-Length and body

    def __init__(self) -> None:
        manager = _load(DEPLOY / "envoy" / "envoy.yaml")["static_resources"]["listeners"][0]["filter_chains"][0][
            "filters"][0]["typed_config"]
        self.filters = [entry["name"] for entry in manager["http_filters"]]
        typed = {entry["name"]: entry["typed_config"] for entry in manager["http_filters"]}
        self.ext_authz = typed["envoy.filters.http.ext_authz"]
        service = self.ext_authz["http_service"]
        mutations = typed["envoy.filters.http.header_mutation"]["mutations"]["request_mutations"]
        self.removed = {mutation["remove"] for mutation in mutations}
        self.allowed = {p["exact"] for p in self.ext_authz["allowed_headers"]["patterns"]} | self.ALWAYS_SENT
        self.added = {h["key"]: h["value"] for h in service["authorization_request"]["headers_to_add"]}
        response = service["authorization_response"]
        self.upstream_names = {p["exact"] for p in response["allowed_upstream_headers"]["patterns"]}
        self.client_names = {p["exact"] for p in response["allowed_client_headers"]["patterns"]} | self.ALWAYS_RELAYED
        self.prefix = service["path_prefix"]

    def ask(self, running: Started, client: Client, *, source: str = "127.0.0.1") -> httpx.Response:
        """The check: the original method, the prefix and the original target, the original Host, the
        allowed headers of the request header_mutation left, then headers_to_add (replacing)."""
        kept = {name: value for name, value in client.headers.items() if name not in self.removed}
        sent = {name: value for name, value in kept.items() if name in self.allowed}
        for name, value in self.added.items():
            formatted = self._format(value, client, kept)
            if formatted:  # Envoy adds no header whose value comes out empty
                sent[name] = formatted
        return ask(running, {**sent, "host": client.host}, source=source, method=client.method,
                   path=self.prefix + client.target)

    def _format(self, value: str, client: Client, headers: dict[str, str]) -> str:
        assert self.FORMAT.sub("", value).strip() == "", f"the test does not model {value!r}"
        return self.FORMAT.sub(lambda m: client.address if m[2] is None else headers.get(m[2], ""), value)

    def upstream(self, client: Client, answer: httpx.Response) -> dict[str, str]:
        """The upstream request's headers after a 200 (the allowed ones set, replacing)."""
        kept = {name: value for name, value in client.headers.items() if name not in self.removed}
        return kept | {name: value for name, value in answer.headers.items() if name in self.upstream_names}

    def relayed(self, answer: httpx.Response) -> set[str]:
        return {name for name in answer.headers if name in self.client_names}


class Traefik:
    """What deploy/traefik/ makes Traefik v3 do (entry point forwardedHeaders, the `portcullis` chain)."""

    ENTRY_POINT_REMOVES = {"x-forwarded-proto", "x-forwarded-for", "x-forwarded-host", "x-forwarded-port",
                           "x-forwarded-server", "x-forwarded-uri", "x-forwarded-method", "x-forwarded-tls-client-cert",
                           "x-forwarded-tls-client-cert-info", "x-real-ip"}  # from an address not in trustedIPs
    EDGE_OWN = {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"}  # the entry point and proxy set them

    def __init__(self) -> None:
        middlewares = _load(DEPLOY / "traefik" / "portcullis.yml")["http"]["middlewares"]
        self.chain = middlewares["portcullis"]["chain"]["middlewares"]
        self.stripped = {name.lower() for name, value in
                         middlewares["portcullis-strip"]["headers"]["customRequestHeaders"].items() if value == ""}
        self.forward_auth = middlewares["portcullis-forward-auth"]["forwardAuth"]
        self.request_names = {name.lower() for name in self.forward_auth["authRequestHeaders"]}
        self.upstream_names = {name.lower() for name in self.forward_auth["authResponseHeaders"]}

    def _received(self, client: Client) -> dict[str, str]:
        """The client's headers once the entry point and portcullis-strip removed theirs."""
        return {name: value for name, value in client.headers.items()
                if name not in self.ENTRY_POINT_REMOVES and name not in self.stripped}

    def ask(self, running: Started, client: Client, *, source: str = "127.0.0.1") -> httpx.Response:
        """A GET to the address with the authRequestHeaders, then X-Forwarded-* set from the request."""
        sent = {name: value for name, value in self._received(client).items() if name in self.request_names}
        sent |= {"x-forwarded-for": client.address, "x-forwarded-method": client.method, "x-forwarded-proto": "https",
                 "x-forwarded-host": client.host, "x-forwarded-uri": client.target}
        return ask(running, sent, source=source, path=urlsplit(self.forward_auth["address"]).path)

    def upstream(self, client: Client, answer: httpx.Response) -> dict[str, str]:
        """After a 2xx: each authResponseHeaders name removed, then set from the answer if it has one."""
        kept = {name: value for name, value in self._received(client).items() if name not in self.upstream_names}
        return kept | {name: value for name, value in answer.headers.items() if name in self.upstream_names}

    def relayed(self, answer: httpx.Response) -> set[str]:
        return set(answer.headers)  # every header of a non-2xx answer, with its status and body


class Edge(Protocol):
    upstream_names: set[str]

    def ask(self, running: Started, client: Client, *, source: str = ...) -> httpx.Response: ...

    def upstream(self, client: Client, answer: httpx.Response) -> dict[str, str]: ...

    def relayed(self, answer: httpx.Response) -> set[str]: ...


EDGES: dict[str, Callable[[], Edge]] = {"envoy": Envoy, "traefik": Traefik}


@pytest.fixture(params=sorted(EDGES))
def edge(request: pytest.FixtureRequest) -> Edge:
    return EDGES[request.param]()


def activesync_client(token: str, target: str = ACTIVESYNC, **headers: str) -> Client:
    return Client("POST", target, {"Authorization": f"Bearer {token}", "User-Agent": ACTIVESYNC_UA, **headers})


def reason(portcullis: Started, answer: httpx.Response) -> str:
    return portcullis.gateway.decision(answer.headers[CORRELATION_ID])["status"]["failureReason"]


def test_an_allowed_request_reaches_the_upstream_with_the_identity_headers(portcullis: Started, edge: Edge) -> None:
    client = activesync_client(outlook_token(portcullis.gateway))
    answer = edge.ask(portcullis, client)
    assert answer.status_code == 200
    upstream = edge.upstream(client, answer)
    assert upstream["x-portcullis-user"] == "alex@contoso.test"
    assert upstream["x-portcullis-client-app"] == "outlook-mobile"
    assert upstream["x-portcullis-assertion"].count(".") == 2
    record = portcullis.gateway.decision(answer.headers[CORRELATION_ID])
    assert record["status"]["errorCode"] == 0 and record["ipAddress"] == CLIENT
    assert record["request"]["method"] == "POST" and record["request"]["path"] == "/Microsoft-Server-ActiveSync"


def test_the_snippet_passes_upstream_exactly_the_headers_an_allowed_answer_sets(portcullis: Started,
                                                                                edge: Edge) -> None:
    answer = edge.ask(portcullis, activesync_client(outlook_token(portcullis.gateway)))
    assert answer.status_code == 200
    set_by_answer = set(answer.headers) - SERVER_OWN
    edge_own = Traefik.EDGE_OWN if isinstance(edge, Traefik) else set()
    assert set_by_answer - edge_own == edge.upstream_names


@pytest.mark.parametrize("browser", [False, True], ids=["json", "block-page"])
def test_a_noncompliant_device_gets_the_gateways_refusal_with_its_headers(portcullis: Started, edge: Edge,
                                                                          browser: bool) -> None:
    token = outlook_token(portcullis.gateway, user="blake@contoso.test", device_id=BLAKE_ANDROID,
                          **({"client_id": OFFICE} if browser else {}))
    client = Client("GET", "/owa/", {"Authorization": f"Bearer {token}", "Accept": "text/html",
                                     "User-Agent": BROWSER_UA}) if browser else \
        activesync_client(token, activesync(BLAKE_ANDROID, "blake"))
    answer = edge.ask(portcullis, client)
    assert answer.status_code == 403
    if browser:
        assert "You can't get there from here" in answer.text
    else:
        assert answer.json()["reason"].startswith("device not compliant")
    assert set(answer.headers) - SERVER_OWN <= edge.relayed(answer)


def test_no_token_gets_401_and_the_bearer_challenge_reaches_the_client(portcullis: Started, edge: Edge) -> None:
    answer = edge.ask(portcullis, Client("POST", ACTIVESYNC, {"User-Agent": ACTIVESYNC_UA}))
    assert answer.status_code == 401
    assert 'resource_metadata="https://mail.contoso.test' in answer.headers["WWW-Authenticate"]
    assert set(answer.headers) - SERVER_OWN <= edge.relayed(answer)


def test_a_browser_without_a_session_is_sent_to_sign_in_with_its_cookie(portcullis: Started, edge: Edge) -> None:
    answer = edge.ask(portcullis, Client("GET", "/owa/", {"User-Agent": BROWSER_UA, "Accept": "text/html"}))
    assert answer.status_code == 302
    assert answer.headers["Location"].startswith(portcullis.gateway.idp.issuer)
    assert "__Host-portcullis-signin" in answer.headers["Set-Cookie"]
    assert set(answer.headers) - SERVER_OWN <= edge.relayed(answer)


FORGED = {"X-Original-URI": ACTIVESYNC, "X-Forwarded-Uri": ACTIVESYNC, "X-Original-Method": "POST",
          "X-Forwarded-Method": "POST", "X-Forwarded-Host": "docs.contoso.test", "X-Forwarded-For": "10.0.0.1",
          "X-Portcullis-User": "admin@contoso.test", "X-Portcullis-Device-Id": "forged"}


def test_headers_a_client_sends_do_not_change_the_decision(portcullis: Started, edge: Edge) -> None:
    """The client names an allowed URI, another host and address: Portcullis decides the real target
    (a path no resource names: 403), for the real client."""
    answer = edge.ask(portcullis, activesync_client(outlook_token(portcullis.gateway), "/ecp/", **FORGED))
    assert answer.status_code == 403
    record = portcullis.gateway.decision(answer.headers[CORRELATION_ID])
    assert record["request"]["path"] == "/ecp/" and record["request"]["host"] == MAIL
    assert record["ipAddress"] == CLIENT


@pytest.mark.parametrize("public", [False, True], ids=["identified", "public-resource"])
def test_headers_a_client_sends_never_reach_the_upstream(portcullis: Started, edge: Edge, public: bool) -> None:
    """Also when the answer names no user or device (a public resource): the client's copies go."""
    client = Client("GET", "/owa/auth/logon.aspx", {"User-Agent": BROWSER_UA, **FORGED}) if public else \
        activesync_client(outlook_token(portcullis.gateway), **FORGED)
    answer = edge.ask(portcullis, client)
    assert answer.status_code == 200
    upstream = edge.upstream(client, answer)
    assert upstream.get("x-portcullis-user") == (None if public else "alex@contoso.test")
    assert upstream.get("x-portcullis-device-id") != "forged"
    assert not {"x-original-uri", "x-forwarded-uri", "x-original-method", "x-forwarded-method"} & set(upstream)


def test_a_question_from_an_address_that_is_not_the_edge_is_refused_and_logged(portcullis: Started,
                                                                               edge: Edge) -> None:
    answer = edge.ask(portcullis, activesync_client(outlook_token(portcullis.gateway)), source=OUTSIDER)
    assert answer.status_code == 403 and "X-Portcullis-User" not in answer.headers
    assert reason(portcullis, answer) == forward_auth.NOT_A_PROXY


@pytest.mark.parametrize(("target", "status", "path"), [
    ("/owa/?path=/mail&x=%2Fecp", 302, "/owa/"),  # the query stays the query
    ("/%65cp/", 403, "/ecp/"),                    # decoded before matching, as /ecp/
    ("/owa/%2e%2e/ecp/", 400, "/owa/%2e%2e/ecp/"),  # an encoded traversal is ambiguous: refused
    ("/owa/..;/ecp/", 400, "/owa/..;/ecp/"),
])
def test_envoy_the_target_after_the_prefix_is_normalised_as_the_reverse_proxy_does(
        portcullis: Started, target: str, status: int, path: str) -> None:
    answer = Envoy().ask(portcullis, Client("GET", target, {"User-Agent": BROWSER_UA, "Accept": "text/html"}))
    assert answer.status_code == status
    assert portcullis.gateway.decision(answer.headers[CORRELATION_ID])["request"]["path"] == path


def test_envoy_the_check_keeps_the_original_method(portcullis: Started) -> None:
    """WebDAV's PROPFIND is decided as PROPFIND; TRACE is refused and logged, as the reverse proxy does."""
    token = outlook_token(portcullis.gateway)
    propfind = Envoy().ask(portcullis, Client("PROPFIND", "/owa/", {"Authorization": f"Bearer {token}"}))
    assert portcullis.gateway.decision(propfind.headers[CORRELATION_ID])["request"]["method"] == "PROPFIND"
    trace = Envoy().ask(portcullis, Client("TRACE", "/owa/", {"Authorization": f"Bearer {token}"}))
    assert trace.status_code == 403 and reason(portcullis, trace) == forward_auth.NOT_FORWARDED


@pytest.mark.parametrize("path", ["/owa/", "/envoy", "/%65nvoy/owa/", "/envoyowa/"])
def test_envoy_a_check_whose_path_is_not_under_the_prefix_names_no_original_request(
        portcullis: Started, path: str) -> None:
    """A path_prefix left out (or spelt otherwise) is refused, not read as the target."""
    headers = {"authorization": f"Bearer {outlook_token(portcullis.gateway)}", "host": MAIL, "x-forwarded-for": CLIENT}
    answer = ask(portcullis, headers, method="POST", path=path)
    assert answer.status_code == 400 and reason(portcullis, answer) == forward_auth.NO_ORIGINAL


@pytest.mark.parametrize("header", ["X-Original-URI", "X-Forwarded-Uri"])
def test_envoy_a_check_that_also_names_the_original_in_headers_is_refused(portcullis: Started, header: str) -> None:
    headers = {"host": MAIL, "x-forwarded-for": CLIENT, header: ACTIVESYNC,
               "authorization": f"Bearer {outlook_token(portcullis.gateway)}"}
    answer = ask(portcullis, headers, method="POST", path="/envoy/ecp/")
    assert answer.status_code == 400 and reason(portcullis, answer) == forward_auth.TWO_CONVENTIONS


def test_the_envoy_snippet_fails_closed_and_strips_before_it_asks() -> None:
    envoy = Envoy()
    assert envoy.ext_authz["failure_mode_allow"] is False
    assert envoy.ext_authz["status_on_error"] == {"code": "ServiceUnavailable"}
    assert envoy.prefix == forward_auth.ENVOY_PREFIX
    assert envoy.filters.index("envoy.filters.http.header_mutation") < envoy.filters.index(
        "envoy.filters.http.ext_authz") < envoy.filters.index("envoy.filters.http.router")
    assert {name for name in envoy.upstream_names if name.startswith("x-portcullis-")} <= envoy.removed


def test_the_traefik_snippet_does_not_trust_the_clients_forwarded_headers() -> None:
    traefik = Traefik()
    assert traefik.forward_auth["trustForwardHeader"] is False
    assert traefik.chain == ["portcullis-strip", "portcullis-forward-auth"]
    assert not urlsplit(traefik.forward_auth["address"]).path.startswith(forward_auth.ENVOY_PREFIX + "/")


PAGES = ("/.portcullis/", "/.well-known/oauth-protected-resource")


def envoy_pages_routes() -> dict[str, str]:
    """Each route prefix of deploy/envoy/envoy.yaml whose ext_authz is off, and its cluster."""
    manager = _load(DEPLOY / "envoy" / "envoy.yaml")["static_resources"]["listeners"][0]["filter_chains"][0][
        "filters"][0]["typed_config"]
    routes = manager["route_config"]["virtual_hosts"][0]["routes"]
    return {route["match"]["prefix"]: route["route"]["cluster"] for route in routes
            if route.get("typed_per_filter_config", {}).get("envoy.filters.http.ext_authz", {}).get("disabled")}


def traefik_pages_router() -> dict[str, Any]:
    return _load(DEPLOY / "traefik" / "portcullis.yml")["http"]["routers"]["mail-portcullis-pages"]


def test_the_snippets_send_the_gateways_pages_to_the_listener_without_asking() -> None:
    """The sign-in callback, logout and RFC 9728 metadata are Portcullis's: the edge routes them to
    the forward-auth listener (which refuses a question naming them: they would reach the upstream)."""
    assert envoy_pages_routes() == {prefix: "portcullis_forward_auth" for prefix in PAGES}
    router = traefik_pages_router()
    assert all(f"PathPrefix(`{prefix}`)" in router["rule"] for prefix in PAGES)
    assert "portcullis" not in router["middlewares"] and router["service"] == "portcullis"
    service = _load(DEPLOY / "traefik" / "portcullis.yml")["http"]["services"]["portcullis"]["loadBalancer"]
    assert service["passHostHeader"] is True


def test_the_gateways_pages_answer_the_edge_on_a_protected_host(portcullis: Started) -> None:
    """What those routes reach: the listener serves the pages for the edge (Host kept)."""
    metadata = ask(portcullis, {"Host": MAIL}, path="/.well-known/oauth-protected-resource")
    assert metadata.status_code == 200 and metadata.json()["resource"] == f"https://{MAIL}"
    assert ask(portcullis, {"Host": MAIL}, path="/.portcullis/logout").status_code == 200  # the logout form
