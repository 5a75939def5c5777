"""Behaviour of the real listener beyond the demo scenarios: routing, header hygiene, token
rejections, path canonicalisation, and failing closed when something breaks."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gateway.app import bootstrap
from gateway.app.demo import ALEX_IPHONE, EXCHANGE, OUTLOOK_MOBILE, SHAREPOINT, TEAMS
from gateway.decision.service import AccessService
from gateway.errors import SignalUnavailable
from gateway.policy.model import ManagedDevice
from gateway.web.demo_idp import DemoIdentityProvider
from tests.conftest import (
    HOSTS,
    Background,
    Gateway,
    Ports,
    demo_config_copy,
    proxy_for,
    write_trustme_certificate,
)
from tests.helpers.hosts import ACTIVESYNC, MAIL
from tests.helpers.http import raw_exchange
from tests.helpers.tokens import _hmac_token, outlook_token


def test_client_sent_identity_headers_never_reach_the_upstream(gateway: Gateway) -> None:
    forged = {
        "X-Portcullis-User": "ceo@contoso.test",
        "x-portcullis-device-id": "forged-device",
        "X-Forwarded-User": "ceo@contoso.test",
        "X_Forwarded_User": "ceo@contoso.test",
        "X-Auth-Request-Email": "ceo@contoso.test",
        "Remote-User": "ceo",
        "X-Portcullis-Correlation-Id": "chosen-by-client",
        "X-MS-TOKEN-AAD-ID-TOKEN": "forged",
        "X-WebAuth-User": "ceo",
        "Proxy-Authorization": "Basic Zm9vOmJhcg==",
        "X-Original-URL": "/ecp/",
        "X-HTTP-Method-Override": "DELETE",
        "X-Forwarded-For": "6.6.6.6",
        "Forwarded": "for=6.6.6.6",
        "X-Real-IP": "6.6.6.6",
        "X-Custom-Thing": "nominated as hop-by-hop",
        "Connection": "keep-alive, X-Portcullis-Device-Id, X-Custom-Thing",
    }
    response = gateway.request(MAIL, ACTIVESYNC, method="POST", token=outlook_token(gateway), headers=forged)
    assert response.status_code == 200
    received = response.json()["receivedHeaders"]
    assert received["x-portcullis-user"] == "alex@contoso.test"
    assert received["x-portcullis-device-id"] == ALEX_IPHONE
    assert received["x-portcullis-correlation-id"] != "chosen-by-client"
    assert received["x-forwarded-for"] == "127.0.0.1"
    assert received["x-forwarded-host"] == MAIL
    for name in ("x-forwarded-user", "x_forwarded_user", "x-auth-request-email", "remote-user",
                 "x-ms-token-aad-id-token", "x-webauth-user", "proxy-authorization", "x-original-url",
                 "x-http-method-override", "forwarded", "x-real-ip", "x-custom-thing"):
        assert name not in received, name
    assert "x-portcullis-device-id" not in received.get("connection", "").lower()


def test_unknown_host_is_misdirected_and_logged(gateway: Gateway) -> None:
    response = gateway.request("intranet.contoso.test", "/owa/", token=outlook_token(gateway),
                               sni=MAIL)
    assert response.status_code == 421
    record = gateway.decision(response.headers["x-portcullis-correlation-id"])
    assert record["status"]["failureReason"] == "this gateway does not serve that host"
    assert record["httpStatus"] == 421
    assert record["status"]["errorCode"] == 421  # Portcullis's own: no Conditional Access policy refused it


@pytest.mark.parametrize("server_name", ["evil.example.com", None], ids=["unknown name", "no SNI"])
def test_tls_for_a_name_without_a_configured_certificate_is_refused(gateway: Gateway, server_name: str | None) -> None:
    """mitmproxy would sign a certificate for any name with its CA: the listener ends the
    handshake instead (closing it: mitmproxy does not send OpenSSL's alert), presenting none."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # whatever it would present
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as raw, \
            pytest.raises(ssl.SSLError), context.wrap_socket(raw, server_hostname=server_name) as tls:
        pytest.fail(f"handshake completed with a certificate: {tls.getpeercert(binary_form=True)!r:.60}")


def test_a_failing_server_name_check_refuses_the_handshake(gateway: Gateway,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """mitmproxy logs a hook's exception and goes on: TlsConfig would then sign a certificate for
    any name. A check that raises refuses the handshake, even for a configured name."""
    from addons.server_names import ServerNames

    def broken(self: ServerNames, data: object) -> str | None:
        raise RuntimeError("the check broke")

    monkeypatch.setattr(ServerNames, "refusal", broken)
    context = ssl.create_default_context()
    gateway.ca.configure_trust(context)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as raw, \
            pytest.raises(ssl.SSLError), context.wrap_socket(raw, server_hostname=MAIL) as tls:
        pytest.fail(f"handshake completed with a certificate: {tls.getpeercert(binary_form=True)!r:.60}")


def test_declared_request_trailers_are_refused_before_the_upstream(gateway: Gateway) -> None:
    token = outlook_token(gateway)
    answer = raw_exchange(gateway, f"POST {ACTIVESYNC} HTTP/1.1\r\nHost: {MAIL}\r\nAuthorization: Bearer {token}\r\n"
                                   "Transfer-Encoding: chunked\r\nTrailer: X-Portcullis-User\r\nConnection: close\r\n"
                                   "\r\n3\r\nabc\r\n0\r\n\r\n")
    assert answer.startswith("HTTP/1.1 400"), answer[:200]
    assert "backend" not in answer


def test_sni_and_host_must_agree(gateway: Gateway) -> None:
    response = gateway.request(MAIL, ACTIVESYNC, method="POST", token=outlook_token(gateway),
                               sni="docs.contoso.test")
    assert response.status_code == 421


def test_plaintext_http_on_the_tls_listener_is_refused(gateway: Gateway) -> None:
    token = outlook_token(gateway)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(f"POST {ACTIVESYNC} HTTP/1.1\r\nHost: {MAIL}\r\nAuthorization: Bearer {token}\r\n"
                     "Content-Length: 0\r\n\r\n".encode())
        answer = b"".join(iter(lambda: sock.recv(4096), b"")).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 400")
    assert "tls_required" in answer


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        pytest.param({"lifetime": -120}, "token expired", id="expired beyond the leeway"),
        pytest.param({"not_before_offset": 600}, "token not yet valid", id="nbf in the future"),
        pytest.param({"audience": SHAREPOINT}, "token audience not accepted for this host",
                     id="SharePoint token used at Exchange"),
    ],
)
def test_invalid_token_claims_get_401(gateway: Gateway, claims: dict[str, object], reason: str) -> None:
    response = gateway.request(MAIL, ACTIVESYNC, method="POST", token=outlook_token(gateway, **claims))
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith(  # then where to sign in (test_sign_in_discovery.py)
        f'Bearer error="invalid_token", error_description="{reason}", client_id="')


def test_token_within_the_clock_skew_leeway_is_accepted(gateway: Gateway) -> None:
    response = gateway.request(MAIL, ACTIVESYNC, method="POST", token=outlook_token(gateway, lifetime=-10))
    assert response.status_code == 200


def test_token_from_another_issuer_key_is_rejected(gateway: Gateway) -> None:
    impostor = DemoIdentityProvider(gateway.idp.issuer)
    impostor.kid = gateway.idp.kid  # same kid, other key: only the signature can tell
    token = impostor.mint(user="alex@contoso.test", client_id=OUTLOOK_MOBILE, audience=EXCHANGE,
                          device_id=ALEX_IPHONE)
    response = gateway.request(MAIL, ACTIVESYNC, method="POST", token=token)
    assert response.status_code == 401
    assert "token signature invalid" in response.headers["www-authenticate"]


@pytest.mark.parametrize("algorithm", ["none", "HS256"])
def test_unsigned_or_hmac_tokens_are_rejected(gateway: Gateway, algorithm: str) -> None:
    now = int(time.time())
    claims = {"iss": gateway.idp.issuer, "aud": EXCHANGE, "exp": now + 600, "sub": "x",
              "azp": OUTLOOK_MOBILE, "deviceid": ALEX_IPHONE}
    public_pem = gateway.idp.key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    if algorithm == "none":
        token = jwt.encode(claims, None, algorithm="none", headers={"kid": gateway.idp.kid})
    else:  # the classic confusion: HMAC keyed with the issuer's public key
        token = _hmac_token(claims, public_pem, gateway.idp.kid)
    response = gateway.request(MAIL, ACTIVESYNC, method="POST", token=token)
    assert response.status_code == 401
    assert "not allowed" in response.headers["www-authenticate"]


def test_bearer_scheme_is_case_insensitive(gateway: Gateway) -> None:
    response = gateway.request(MAIL, ACTIVESYNC, method="POST",
                               headers={"Authorization": f"bEaReR {outlook_token(gateway)}"})
    assert response.status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/owa/%2e%2e/ecp/", id="encoded dot segment"),
        pytest.param("/owa/..%2fecp/", id="encoded slash"),
        pytest.param("/owa/%252e%252e/ecp/", id="double encoding"),
        pytest.param("/owa/x%5c..%5cecp", id="encoded backslash"),
        pytest.param("/owa/..;/ecp/", id="path parameter hides a dot segment"),
        pytest.param("/owa/%ff", id="not UTF-8"),
        pytest.param("/owa/%C5%BFecret", id="long s upper-cases to ASCII S"),
    ],
)
def test_ambiguous_paths_are_refused_with_400(gateway: Gateway, path: str) -> None:
    response = gateway.request(MAIL, path, token=outlook_token(gateway))
    assert response.status_code == 400


def test_rules_match_paths_case_insensitively(gateway: Gateway) -> None:
    """IIS serves /microsoft-server-activesync as ActiveSync: the rule must still apply."""
    token = outlook_token(gateway, client_id=TEAMS)
    response = gateway.request(MAIL, "/microsoft-server-activesync?Cmd=Sync", method="POST", token=token)
    assert response.status_code == 403
    assert response.json()["reason"] == "app not approved"


class FailingInventory:
    name = "failing"

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.calls = 0

    async def managed_device(self, device_id: str) -> ManagedDevice | None:
        self.calls += 1
        raise self.error


def _service_with(tmp_path: Path, ca: object, ports: Ports, inventory: FailingInventory) -> AccessService:
    config_dir = demo_config_copy(tmp_path, ports)
    write_trustme_certificate(ca, config_dir)  # type: ignore[arg-type]  # trustme.CA
    loaded = bootstrap.load(config_dir)
    service, _ = bootstrap.build_service(loaded, inventory=inventory)
    return service


@pytest.mark.parametrize(
    ("error", "status"),
    [
        pytest.param(SignalUnavailable("inventory timed out"), 503, id="signal source down -> 503"),
        pytest.param(RuntimeError("bug in a provider"), 500, id="unexpected exception -> 500"),
    ],
)
def test_a_failing_signal_source_blocks_instead_of_forwarding(
    gateway: Gateway, tmp_path: Path, demo_ports: Ports, error: Exception, status: int
) -> None:
    ports = Ports(0, demo_ports.idp, demo_ports.mail, demo_ports.docs)
    inventory = FailingInventory(error)
    service = _service_with(tmp_path, gateway.ca, ports, inventory)
    with Background(lambda: proxy_for(service)) as port:
        response = gateway.request(MAIL, ACTIVESYNC, method="POST", token=outlook_token(gateway), port=port)
    assert inventory.calls == 1
    assert response.status_code == status
    assert "backend" not in response.text


def test_unreachable_issuer_fails_closed_with_503(gateway: Gateway, tmp_path: Path, demo_ports: Ports) -> None:
    dead_issuer = Ports(0, _closed_port(), demo_ports.mail, demo_ports.docs)
    inventory = FailingInventory(AssertionError("never asked"))
    service = _service_with(tmp_path, gateway.ca, dead_issuer, inventory)
    token = outlook_token(gateway, extra={"iss": service.config.gateway_file.identity.issuer})  # the dead issuer's
    with Background(lambda: proxy_for(service)) as port:
        response = gateway.request(MAIL, ACTIVESYNC, method="POST", token=token, port=port)
    assert response.status_code == 503
    assert inventory.calls == 0


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_tls_certificate_is_the_configured_one(gateway: Gateway) -> None:
    context = ssl.create_default_context()
    gateway.ca.configure_trust(context)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="docs.contoso.test") as tls:
        names = [v for k, v in tls.getpeercert()["subjectAltName"] if k == "DNS"]
    assert names == HOSTS


def test_public_resource_needs_no_token_but_its_neighbours_do(gateway: Gateway) -> None:
    public = gateway.request(MAIL, "/owa/auth/logon.aspx")
    assert public.status_code == 200
    assert public.json()["receivedHeaders"]["x-portcullis-correlation-id"] == \
        public.headers["x-portcullis-correlation-id"]
    assert gateway.decision(public.headers["x-portcullis-correlation-id"])["status"]["failureReason"] is None
    for neighbour in ("/owa/authx", "/owa/", "/owa/au"):
        assert gateway.request(MAIL, neighbour).status_code == 401, neighbour


def test_public_resource_still_strips_forged_identity(gateway: Gateway) -> None:
    response = gateway.request(MAIL, "/owa/auth/logon.aspx", headers={"X-Portcullis-User": "ceo@contoso.test"})
    assert "x-portcullis-user" not in response.json()["receivedHeaders"]


def test_report_only_policy_is_logged_but_never_blocks(gateway: Gateway) -> None:
    """127.0.0.1 is outside the trusted head office, so the MFA trial applies and fails: logged only."""
    response = gateway.request(MAIL, ACTIVESYNC, method="POST", token=outlook_token(gateway))
    assert response.status_code == 200
    record = gateway.decision(response.headers["x-portcullis-correlation-id"])
    results = {p["id"]: p for p in record["appliedConditionalAccessPolicies"]}
    assert results["mfa-outside-head-office"]["result"] == "reportOnlyFailure"
    assert results["mfa-outside-head-office"]["failedControls"][0]["control"] == "mfa"
    assert results["exchange-outlook-only"]["result"] == "success"


@pytest.mark.parametrize(("version", "connection", "closes"), [
    ("HTTP/1.1", "Connection: close\r\n", True),
    ("HTTP/1.0", "", True),
    ("HTTP/1.1", "", False),
])
def test_a_forwarded_request_closes_the_connection_as_the_client_asked(gateway: Gateway, version: str,
                                                                       connection: str, closes: bool) -> None:
    """The gateway strips hop-by-hop headers before forwarding; the client's wish to close must
    survive that, or every non-keep-alive client hangs until its own timeout."""
    context = ssl.create_default_context()
    gateway.ca.configure_trust(context)
    token = outlook_token(gateway)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=MAIL) as tls:
        tls.sendall(f"POST {ACTIVESYNC} {version}\r\nHost: {MAIL}\r\nAuthorization: Bearer {token}\r\n"
                    f"Content-Length: 0\r\n{connection}\r\n".encode())
        tls.settimeout(2)
        received = b""
        try:
            while not received.endswith(b"}") or b"\r\n\r\n" not in received:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                received += chunk
            tls.settimeout(1)
            ended = tls.recv(1) == b""  # EOF: the gateway closed the connection
        except TimeoutError:
            ended = False
    head = received.split(b"\r\n\r\n", 1)[0].decode().lower()
    assert head.startswith(f"{version.lower()} 200") or head.startswith("http/1.1 200"), head
    assert ended is closes
    assert ("connection: close" in head) is closes


@pytest.mark.parametrize(("extra", "status"), [
    ([(f"X-Filler-{i}", "x") for i in range(120)], 431),
    ([("X-Filler", "x" * 70_000)], 431),
    ([(f"X-Filler-{i}", "x") for i in range(60)] + [(f"X-Large-{i}", "x" * 15_000) for i in range(4)], 200),  # twin
])
def test_too_many_or_too_large_request_headers_get_431(gateway: Gateway, extra: list[tuple[str, str]],
                                                       status: int) -> None:
    token = outlook_token(gateway)
    head = "".join(f"{name}: {value}\r\n" for name, value in extra)
    answer = raw_exchange(gateway, f"POST {ACTIVESYNC} HTTP/1.1\r\nHost: {MAIL}\r\nAuthorization: Bearer {token}\r\n"
                                   f"{head}Content-Length: 0\r\nConnection: close\r\n\r\n")
    assert answer.startswith(f"HTTP/1.1 {status}"), answer[:300]
    if status == 431:
        assert "request_header_fields_too_large" in answer and "backend" not in answer
