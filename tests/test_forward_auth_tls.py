"""The forward-auth listener over TLS, with client-certificate authentication of the edge
(``forwardAuth.tls``): a real gateway in-process, real certificates from trustme CAs, real
handshakes on 127.0.0.1; and Debian's nginx asking it over https with its own proxy certificate."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from ruamel.yaml import YAML

from gateway.app.certs import CA_FILE
from gateway.app.demo import ACTIVESYNC, ACTIVESYNC_UA, BLAKE_ANDROID, activesync
from gateway.config import load_config
from gateway.config.files import missing_certificates
from gateway.config.lint import config_warnings
from gateway.http.headers import CORRELATION_ID
from gateway.web import forward_auth
from tests.conftest import REPO, Gateway, Ports, demo_config_copy
from tests.gateway_process import PORTCULLIS
from tests.helpers.config import problems
from tests.helpers.forward_auth import OUTSIDER, forward_auth_config
from tests.helpers.nginx import needs_nginx, nginx_edge
from tests.helpers.running import Started, started
from tests.helpers.tokens import outlook_token

MAIL = "mail.contoso.test"
LISTENER_NAME = "forward-auth.portcullis.test"  # the listener certificate's name, as the edge verifies it
PROXY_NAME = "edge.contoso.test"
PROXY_URI = "spiffe://contoso.test/ns/edge/sa/nginx"  # a mesh's workload identity, in a SAN URI


@dataclass(frozen=True)
class Pki:
    server_ca: trustme.CA  # issued the listener's certificate: what the edge trusts
    proxy_ca_file: Path  # forwardAuth.tls.proxyCaFiles
    proxy: trustme.LeafCert  # the edge's certificate, naming PROXY_NAME
    unlisted: trustme.LeafCert  # from the proxy CA, naming another proxy
    common_name_only: trustme.LeafCert  # from the proxy CA, naming PROXY_NAME (upper case) in its subject CN only
    uri: trustme.LeafCert  # from the proxy CA, naming PROXY_URI in a SAN URI only
    uri_upper: trustme.LeafCert  # the same URI in upper case: URIs are compared exactly
    foreign: trustme.LeafCert  # naming PROXY_NAME, from a CA the listener does not trust


@pytest.fixture(scope="module")
def pki(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Pki:
    proxy_ca = trustme.CA()
    directory = tmp_path_factory.mktemp("proxy-pki")
    proxy_ca.cert_pem.write_to_path(str(directory / "proxy-ca.pem"))
    return Pki(ca, directory / "proxy-ca.pem", proxy_ca.issue_cert(PROXY_NAME),
               proxy_ca.issue_cert("intruder.contoso.test"),
               proxy_ca.issue_cert("unrelated.contoso.test", common_name=PROXY_NAME.upper()),
               uri_certificate(proxy_ca, PROXY_URI), uri_certificate(proxy_ca, PROXY_URI.upper()),
               trustme.CA().issue_cert(PROXY_NAME))


def uri_certificate(issuer: trustme.CA, uri: str) -> trustme.LeafCert:
    """A client certificate naming ``uri`` in its SAN (trustme issues DNS names, addresses and emails only)."""
    issuer_key = serialization.load_pem_private_key(issuer.private_key_pem.bytes(), password=None)
    assert isinstance(issuer_key, ec.EllipticCurvePrivateKey)
    issuer_cert = x509.load_pem_x509_certificate(issuer.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(issuer_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(issuer_key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return trustme.LeafCert(key_pem, certificate.public_bytes(serialization.Encoding.PEM), [issuer.cert_pem.bytes()])


def with_tls(config_dir: Path, tls: dict[str, object], *, host: str | None = None) -> Path:
    yaml = YAML()
    data = yaml.load(config_dir / "portcullis.yaml")
    data["forwardAuth"]["tls"] = tls
    if host is not None:
        data["forwardAuth"]["listen"]["host"] = host
    yaml.dump(data, config_dir / "portcullis.yaml")
    return config_dir


def tls_config(gateway: Gateway, directory: Path, demo_ports: Ports, pki: Pki) -> Path:
    """The forward-auth test config with a listener certificate for LISTENER_NAME and 127.0.0.1,
    requiring a proxy certificate from the proxy CA that names PROXY_NAME."""
    config_dir = forward_auth_config(gateway, directory, demo_ports)
    pki.server_ca.issue_cert(LISTENER_NAME, "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(config_dir / "forward-auth.pem"))
    return with_tls(config_dir, {"certificateFile": "forward-auth.pem", "proxyCaFiles": [str(pki.proxy_ca_file)],
                                 "proxyNames": [PROXY_NAME, PROXY_URI]})


@pytest.fixture(scope="module")
def listener(gateway: Gateway, demo_ports: Ports, pki: Pki,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Started]:
    config_dir = tls_config(gateway, tmp_path_factory.mktemp("forward-auth-tls"), demo_ports, pki)
    with started(gateway, config_dir) as running:
        assert running.running.forward_auth is not None
        yield running


def client_context(pki: Pki, client: trustme.LeafCert | None) -> ssl.SSLContext:
    """An edge's TLS client: it trusts the listener's CA and presents ``client`` (or no certificate)."""
    context = ssl.create_default_context()
    pki.server_ca.configure_trust(context)
    if client is not None:
        client.configure_cert(context)
    return context


def ask_over_tls(running: Started, pki: Pki, client: trustme.LeafCert | None, headers: dict[str, str], *,
                 source: str = "127.0.0.1") -> httpx.Response:
    """One question over TLS from ``source``, presenting ``client`` (or no certificate)."""
    assert running.running.forward_auth is not None
    _, port = running.running.forward_auth
    transport = httpx.HTTPTransport(local_address=source, verify=client_context(pki, client))
    with httpx.Client(transport=transport, timeout=10) as http:
        return http.get(f"https://127.0.0.1:{port}/", headers=headers)


def question(token: str, path: str = ACTIVESYNC) -> dict[str, str]:
    return {"X-Original-URI": path, "X-Original-Method": "POST", "Host": MAIL, "X-Forwarded-For": "203.0.113.7",
            "Authorization": f"Bearer {token}", "User-Agent": ACTIVESYNC_UA}


@pytest.mark.parametrize("proxy", ["san-dns", "subject-cn", "san-uri"])
def test_an_allowed_question_over_tls_from_a_named_proxy_answers_200(listener: Started, pki: Pki,
                                                                      proxy: str) -> None:
    certificate = {"san-dns": pki.proxy, "subject-cn": pki.common_name_only, "san-uri": pki.uri}[proxy]
    answer = ask_over_tls(listener, pki, certificate, question(outlook_token(listener.gateway)))
    assert answer.status_code == 200, answer.text
    assert answer.headers["X-Portcullis-User"] == "alex@contoso.test"
    assert answer.headers["X-Forwarded-For"] == "203.0.113.7"  # X-Forwarded-For is still read from the edge
    record = listener.gateway.decision(answer.headers[CORRELATION_ID])
    assert record["status"]["errorCode"] == 0 and record["ipAddress"] == "203.0.113.7"


def test_a_blocked_question_over_tls_answers_403_with_the_block_reason(listener: Started, pki: Pki) -> None:
    token = outlook_token(listener.gateway, user="blake@contoso.test", device_id=BLAKE_ANDROID)
    answer = ask_over_tls(listener, pki, pki.proxy, question(token, activesync(BLAKE_ANDROID, "blake")))
    assert answer.status_code == 403 and answer.json()["reason"].startswith("device not compliant")


def first_bytes_answered(running: Started, pki: Pki, client: trustme.LeafCert | None) -> bytes:
    """The start of what the listener sends back on a TLS connection presenting ``client`` (or no
    certificate) and asking a question; b"" when the connection ends without an answer."""
    assert running.running.forward_auth is not None
    try:
        with socket.create_connection(running.running.forward_auth, timeout=10) as raw, \
                client_context(pki, client).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: forward-auth\r\n\r\n")
            return tls.recv(16)
    except (ssl.SSLError, ConnectionError):
        return b""


@pytest.mark.parametrize(("caller", "answered"), [
    ("no-certificate", False), ("another-ca", False), ("the-proxy", True)])
def test_only_a_caller_with_a_certificate_from_the_proxy_ca_gets_an_answer(listener: Started, pki: Pki,
                                                                            caller: str, answered: bool) -> None:
    """The handshake requires the certificate: without one, or with one from another CA, no HTTP
    answer at all (no request reaches the app); the proxy's gets one (its refusal: no question)."""
    client = {"no-certificate": None, "another-ca": pki.foreign, "the-proxy": pki.proxy}[caller]
    start = first_bytes_answered(listener, pki, client)
    assert start.startswith(b"HTTP/1.1 ") if answered else start == b"", start


@pytest.mark.parametrize("proxy", ["other-dns-name", "uri-in-upper-case"])
def test_a_proxy_certificate_naming_another_proxy_is_refused_and_logged(listener: Started, pki: Pki,
                                                                        proxy: str) -> None:
    certificate = pki.unlisted if proxy == "other-dns-name" else pki.uri_upper
    answer = ask_over_tls(listener, pki, certificate, question(outlook_token(listener.gateway)))
    assert answer.status_code == 403 and "X-Portcullis-User" not in answer.headers
    assert listener.gateway.decision(answer.headers[CORRELATION_ID])["status"]["failureReason"] == \
        forward_auth.NOT_A_NAMED_PROXY


def test_a_proxy_certificate_from_an_address_outside_trusted_proxies_is_refused_and_logged(
        listener: Started, pki: Pki) -> None:
    answer = ask_over_tls(listener, pki, pki.proxy, question(outlook_token(listener.gateway)), source=OUTSIDER)
    assert answer.status_code == 403 and "X-Portcullis-User" not in answer.headers
    assert listener.gateway.decision(answer.headers[CORRELATION_ID])["status"]["failureReason"] == \
        forward_auth.NOT_A_PROXY


def test_proxy_names_without_proxy_cas_are_refused_at_load(tmp_path: Path) -> None:
    config_dir = demo_config_copy(tmp_path, Ports.fresh())
    yaml = YAML()
    data = yaml.load(config_dir / "portcullis.yaml")
    data["forwardAuth"] = {"tls": {"certificateFile": "forward-auth.pem", "proxyNames": [PROXY_NAME]}}
    yaml.dump(data, config_dir / "portcullis.yaml")
    assert any("proxyNames needs proxyCaFiles" in problem for problem in problems(config_dir)), problems(config_dir)


def test_a_missing_listener_certificate_is_an_error_at_its_line_with_the_command_that_makes_it(
        gateway: Gateway, demo_ports: Ports, pki: Pki, tmp_path: Path) -> None:
    config_dir = tls_config(gateway, tmp_path, demo_ports, pki)
    (config_dir / "forward-auth.pem").unlink()
    [problem] = [str(p) for p in missing_certificates(load_config(config_dir), config_dir) if "forwardAuth" in p.key]
    assert f"portcullis.yaml:{_line_of(config_dir, 'certificateFile')}:" in problem
    assert f"forwardAuth.tls.certificateFile: {config_dir / 'forward-auth.pem'} does not exist" in problem
    assert f"portcullis certs --config {config_dir} init" in problem
    made = subprocess.run([PORTCULLIS, "certs", "--config", str(config_dir), "init"], capture_output=True, text=True,
                          cwd=REPO, check=False)
    assert made.returncode == 0, made.stderr
    assert not [p for p in missing_certificates(load_config(config_dir), config_dir) if "forwardAuth" in p.key]
    made_pem = (config_dir / "forward-auth.pem").read_bytes()
    certificate = x509.load_pem_x509_certificate(made_pem)
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert b"PRIVATE KEY" in made_pem
    assert certificate.issuer == x509.load_pem_x509_certificate((config_dir / CA_FILE).read_bytes()).subject


@pytest.mark.parametrize("broken", ["certificateFile", "proxyCaFiles"])
def test_a_tls_file_that_is_not_pem_stops_the_gateway_from_starting(gateway: Gateway, demo_ports: Ports, pki: Pki,
                                                                    tmp_path: Path, broken: str) -> None:
    config_dir = tls_config(gateway, tmp_path, demo_ports, pki)
    path = config_dir / "forward-auth.pem" if broken == "certificateFile" else config_dir / "proxy-ca.pem"
    path.write_text("not a certificate\n")
    if broken == "proxyCaFiles":
        with_tls(config_dir, {"certificateFile": "forward-auth.pem", "proxyCaFiles": ["proxy-ca.pem"]})
    with pytest.raises(RuntimeError, match=f"{path}: not a PEM"), started(gateway, config_dir):
        pass


def test_check_warns_about_a_plain_http_listener_off_loopback(gateway: Gateway, demo_ports: Ports, pki: Pki,
                                                              tmp_path: Path) -> None:
    def forward_auth_warnings(config_dir: Path) -> list[str]:
        return [str(w) for w in config_warnings(load_config(config_dir)) if "forwardAuth" in w.key]

    plain = forward_auth_config(gateway, tmp_path / "plain", demo_ports)
    assert not forward_auth_warnings(plain)
    yaml = YAML()
    data = yaml.load(plain / "portcullis.yaml")
    data["forwardAuth"]["listen"]["host"] = "0.0.0.0"  # noqa: S104
    yaml.dump(data, plain / "portcullis.yaml")
    [warning] = forward_auth_warnings(plain)
    assert f"portcullis.yaml:{_line_of(plain, 'host: 0.0.0.0')}:" in warning and "plain HTTP" in warning

    encrypted = with_tls(tls_config(gateway, tmp_path / "tls", demo_ports, pki),
                         {"certificateFile": "forward-auth.pem", "proxyCaFiles": [str(pki.proxy_ca_file)]},
                         host="0.0.0.0")  # noqa: S104
    assert not forward_auth_warnings(encrypted)


def _line_of(config_dir: Path, text: str) -> int:
    """The 1-based line of the forwardAuth section's line holding ``text``."""
    lines = (config_dir / "portcullis.yaml").read_text().splitlines()
    start = lines.index("forwardAuth:")
    return next(number for number, line in enumerate(lines[start:], start + 1) if text in line)


@needs_nginx
def test_nginx_asks_over_tls_with_its_proxy_certificate(listener: Started, pki: Pki, demo_ports: Ports,
                                                        tmp_path: Path) -> None:
    """nginx's auth_request subrequest over https to the TLS listener, verifying its certificate
    and presenting the edge's (the lines docs/forward-auth.md gives): allowed and blocked end to end."""
    (tmp_path / "edge.pem").write_bytes(b"".join(b.bytes() for b in pki.proxy.cert_chain_pems))
    pki.proxy.private_key_pem.write_to_path(str(tmp_path / "edge-key.pem"))
    pki.server_ca.cert_pem.write_to_path(str(tmp_path / "portcullis-ca.pem"))
    directives = (f"proxy_ssl_certificate {tmp_path / 'edge.pem'};\n"
                  f"proxy_ssl_certificate_key {tmp_path / 'edge-key.pem'};\n"
                  f"proxy_ssl_trusted_certificate {tmp_path / 'portcullis-ca.pem'};\n"
                  "proxy_ssl_verify on;\n"
                  f"proxy_ssl_name {LISTENER_NAME};\n"
                  "proxy_ssl_server_name on;\n")
    assert listener.running.forward_auth is not None
    with nginx_edge(tmp_path / "nginx", forward_auth=listener.running.forward_auth[1], backend=demo_ports.mail,
                    forward_auth_tls=directives) as port:
        def through_nginx(path: str, token: str) -> httpx.Response:
            return httpx.post(f"http://127.0.0.1:{port}{path}", timeout=10, headers={
                "Host": MAIL, "User-Agent": ACTIVESYNC_UA, "Authorization": f"Bearer {token}"})

        allowed = through_nginx(ACTIVESYNC, outlook_token(listener.gateway))
        assert allowed.status_code == 200 and allowed.json()["backend"] == "exchange"
        received = allowed.json()["receivedHeaders"]
        assert received["x-portcullis-user"] == "alex@contoso.test"
        assert listener.gateway.decision(received["x-portcullis-correlation-id"])["status"]["errorCode"] == 0

        blocked = through_nginx(activesync(BLAKE_ANDROID, "blake"),
                                outlook_token(listener.gateway, user="blake@contoso.test", device_id=BLAKE_ANDROID))
        assert blocked.status_code == 403 and '"backend"' not in blocked.text
