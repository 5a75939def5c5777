"""Device certificates through the real listener: Python and curl clients present real client
certificates (issued by a real device CA in Intune's SAN format) over real TLS to a gateway whose
mail host asks for them (optional) and whose docs host requires them. A stolen token fails from
another device; ``tokenProtection`` refuses it from a connection without its device's certificate;
the kiosk proxy never asks for one."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12

from gateway.app import bootstrap
from gateway.app.demo import (
    ACTIVESYNC,
    ALEX_IPHONE,
    ALEX_IPHONE_INTUNE,
    BLAKE_ANDROID,
    BLAKE_ANDROID_INTUNE,
    EXCHANGE,
    OUTLOOK_MOBILE,
    activesync,
)
from gateway.decision.device_binding import SESSION_BOUND
from gateway.decision.service import utc_now
from gateway.http.headers import CORRELATION_ID
from gateway.identity.browser import COOKIE_NAME
from gateway.ops.explain import explain
from gateway.policy.model import DeviceThreatLevel
from tests.conftest import CHROMIUM, Gateway, LongPoll, Ports, free_port, gateway_config, needs_chromium
from tests.helpers.browser import spki_pin
from tests.helpers.device_certificates import Authority, pem
from tests.helpers.hosts import MAIL
from tests.helpers.replay import replay, totals
from tests.helpers.running import Started, started
from tests.helpers.signals import second_connection
from tests.helpers.tokens import outlook_token

DOCS = "docs.contoso.test"
TOKEN_PROTECTION = "    sessionControls: {tokenProtection: true}\n"
ANCHOR = "      maxDeviceThreatLevel: low\n"  # the end of the Exchange policy
BOTH_CONTROLS = "builtInControls: [compliantDevice, approvedApplication]"
APPROVED = "      approvedApplications: [outlook-mobile, outlook-desktop]\n"
MAIL_LINE = "  mail.contoso.test:\n"
LEGACY = "    legacyActiveSync: true\n"


REQUIRED = ("    deviceCertificates:\n      mode: required\n      caFiles: [../certs/device-ca.pem]\n"
            '      deviceName: {from: sanUri, prefix: "IntuneDeviceId://", key: intuneDeviceId}\n')
INTUNE_IDS = {ALEX_IPHONE: ALEX_IPHONE_INTUNE, BLAKE_ANDROID: BLAKE_ANDROID_INTUNE}


@dataclass
class Certified:
    started: Started
    directory: Path
    authority: Authority
    policies: str  # the files as the fixture wrote them, for reloads
    gateway_file: str

    @property
    def gateway(self) -> Gateway:
        return self.started.gateway

    def certificate(self, device_id: str, *, expired: bool = False,
                    authority: Authority | None = None) -> tuple[Path, Path]:
        """PEM files of a client certificate naming ``device_id`` and its key, as the device holds them."""
        now = dt.datetime.now(dt.UTC)
        cert, key = (authority or self.authority).issue_with_key(  # Intune's SAN format
            sans=[x509.UniformResourceIdentifier(f"IntuneDeviceId://{INTUNE_IDS[device_id]}")],
            not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1) if expired else
            now + dt.timedelta(days=30))
        return self._files(f"{device_id}-{expired}-{id(authority)}", cert, key)

    def _files(self, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
        cert_file, key_file = self.directory / f"{name}.pem", self.directory / f"{name}-key.pem"
        cert_file.write_bytes(pem(cert))
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_file, key_file

    def sync(self, token: str, certificate: tuple[Path, Path] | None, path: str = ACTIVESYNC) -> httpx.Response:
        return self.gateway.request(MAIL, path, method="POST", token=token, certificate=certificate)

    def reload_with_token_protection(self, on: bool) -> None:
        self.reload(token_protection=on)

    def reload(self, *, token_protection: bool = False, legacy: bool = False,
               compliant_device_only: bool = False) -> None:
        """The rules in force: the fixture's, with token protection on the Exchange policy, legacy
        ActiveSync on the mail host, or that policy wanting a compliant device only (no approved app)."""
        policies = self.gateway.config_dir / "policies.yaml"
        text = self.policies.replace(ANCHOR, ANCHOR + TOKEN_PROTECTION, 1) if token_protection else self.policies
        if compliant_device_only:
            text = text.replace(BOTH_CONTROLS, "builtInControls: [compliantDevice]", 1).replace(APPROVED, "", 1)
        policies.write_text(text)
        gateway_file = self.gateway.config_dir / "portcullis.yaml"
        gateway_file.write_text(self.gateway_file.replace(MAIL_LINE, MAIL_LINE + LEGACY, 1) if legacy
                                else self.gateway_file)
        self.started.reload()


@pytest.fixture(scope="module")
def certified(gateway: Gateway, ca: trustme.CA, demo_ports: Ports,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Certified]:
    directory = tmp_path_factory.mktemp("device-certificates")
    authority = Authority.root("Contoso Device CA")
    config_dir = gateway_config(directory, ca, Ports(free_port(), demo_ports.idp, demo_ports.mail, demo_ports.docs))
    (config_dir / "cases.yaml").unlink()  # these tests change the rules; the shipped cases present no certificate
    # the demo config asks for them on the mail host (optional), from ../certs/device-ca.pem: this test's CA
    (config_dir.parent / "certs" / "device-ca.pem").write_bytes(pem(authority.certificate))
    gateway_file = config_dir / "portcullis.yaml"
    text = gateway_file.read_text()
    docs_line = f"    upstream: http://127.0.0.1:{demo_ports.docs}\n"
    assert docs_line in text and "mode: optional" in text
    gateway_file.write_text(text.replace(docs_line, docs_line + REQUIRED))
    with started(gateway, config_dir) as running:
        yield Certified(running, directory, authority, (config_dir / "policies.yaml").read_text(),
                        gateway_file.read_text())


def test_a_compliant_phone_with_its_certificate_syncs_and_the_record_shows_the_certificate(
        certified: Certified) -> None:
    answer = certified.sync(outlook_token(certified.gateway), certified.certificate(ALEX_IPHONE))
    assert answer.status_code == 200, answer.text
    record = certified.gateway.decision(answer.headers[CORRELATION_ID])
    assert record["deviceCertificate"]["verified"] is True
    assert (record["deviceCertificate"]["deviceKey"], record["deviceCertificate"]["deviceValue"]) == \
        ("intuneDeviceId", ALEX_IPHONE_INTUNE)
    assert record["deviceCertificate"]["issuer"] == "CN=Contoso Device CA"
    assert record["deviceDetail"]["deviceId"] == ALEX_IPHONE
    assert {"name": "deviceCertificate", "value": "verified", "source": "client certificate issued by "
            "CN=Contoso Device CA", "ageSeconds": 0} in record["signals"]
    told = explain(record)  # portcullis why
    assert f"certificate: verified, names intuneDeviceId {ALEX_IPHONE_INTUNE} (CN=device, issued by CN=Contoso " \
           f"Device CA, serial {record['deviceCertificate']['serialNumber']})" in told
    assert "deviceCertificate=verified source=client certificate issued by CN=Contoso Device CA" in told


def test_a_stolen_token_from_another_devices_connection_is_refused(certified: Certified) -> None:
    """Alex's phone's token, replayed from Blake's device (its own, valid certificate)."""
    answer = certified.sync(outlook_token(certified.gateway), certified.certificate(BLAKE_ANDROID))
    assert answer.status_code == 403
    record = certified.gateway.decision(answer.headers[CORRELATION_ID])
    assert (record["status"]["errorCode"], record["restriction"]) == (53000, "tokenIssuedToAnotherDevice")
    assert record["deviceDetail"]["deviceId"] == BLAKE_ANDROID  # the certificate's device, not the claim's


@pytest.mark.parametrize("protected", [True, False], ids=["tokenProtection", "without tokenProtection"])
def test_token_protection_refuses_the_token_from_a_connection_without_its_devices_certificate(
        certified: Certified, protected: bool) -> None:
    certified.reload_with_token_protection(protected)
    try:
        bare = certified.sync(outlook_token(certified.gateway), None)
        assert bare.status_code == (403 if protected else 200), bare.text
        if protected:
            record = certified.gateway.decision(bare.headers[CORRELATION_ID])
            assert (record["status"]["errorCode"], record["restriction"]) == (53000, "tokenProtection")
        own = certified.sync(outlook_token(certified.gateway), certified.certificate(ALEX_IPHONE))
        assert own.status_code == 200, own.text  # bound: its own device's certificate
        stolen = certified.sync(outlook_token(certified.gateway), certified.certificate(BLAKE_ANDROID))
        assert stolen.status_code == 403
    finally:
        certified.reload_with_token_protection(False)


def test_a_certificate_that_is_not_believed_is_refused_with_its_reason(certified: Certified) -> None:
    outsider = Authority.root("Contoso Device CA")  # the same name, another key
    for certificate, reason in ((certified.certificate(ALEX_IPHONE, expired=True), "expired"),
                                (certified.certificate(ALEX_IPHONE, authority=outsider), "")):
        answer = certified.sync(outlook_token(certified.gateway), certificate)
        assert answer.status_code == 403
        record = certified.gateway.decision(answer.headers[CORRELATION_ID])
        assert record["restriction"] == "deviceCertificate" and record["status"]["errorCode"] == 53000
        assert record["deviceCertificate"]["verified"] is False and reason in record["status"]["failureReason"]


def test_a_host_that_requires_a_certificate_answers_a_browser_without_one_with_what_to_install(
        certified: Certified) -> None:
    answer = certified.gateway.request(DOCS, "/sites/finance/", headers={"Accept": "text/html"},
                                       token=outlook_token(certified.gateway))
    assert answer.status_code == 403
    assert "device certificate" in answer.text and "company portal" in answer.text
    record = certified.gateway.decision(answer.headers[CORRELATION_ID])
    assert record["restriction"] == "deviceCertificate"


def test_curl_presents_the_devices_certificate(certified: Certified, tmp_path: Path) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    ca_file = tmp_path / "gateway-ca.pem"
    certified.gateway.ca.cert_pem.write_to_path(str(ca_file))
    port = certified.gateway.port

    def status(device: str) -> str:
        cert_file, key_file = certified.certificate(device)
        return subprocess.run([curl, "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(ca_file),
                               "--cert", str(cert_file), "--key", str(key_file), "-X", "POST",
                               "--resolve", f"{MAIL}:{port}:127.0.0.1", "-H",
                               f"Authorization: Bearer {outlook_token(certified.gateway)}",
                               f"https://{MAIL}:{port}{ACTIVESYNC}"], capture_output=True, text=True,
                              timeout=30).stdout

    assert status(ALEX_IPHONE) == "200"  # Alex's token on Alex's phone
    assert status(BLAKE_ANDROID) == "403"  # Alex's token from Blake's phone


def asked_for_a_certificate(*args: str) -> bool:
    """Whether the server's handshake asked for a client certificate: the CertificateRequest among
    the handshake messages openssl s_client received (``-msg``)."""
    out = subprocess.run(["openssl", "s_client", "-msg", *args], input="", capture_output=True, text=True,
                         timeout=30)
    assert "Verify return code: 0 (ok)" in out.stdout, out.stdout + out.stderr  # the handshake completed
    return "CertificateRequest" in out.stdout


def test_only_the_hosts_that_ask_request_a_certificate_and_never_the_kiosk(certified: Certified,
                                                                            gateway: Gateway, tmp_path: Path) -> None:
    ca_file = tmp_path / "gateway-ca.pem"
    certified.gateway.ca.cert_pem.write_to_path(str(ca_file))
    kiosk = bootstrap.load(certified.gateway.config_dir).config.gateway_file.kiosk
    assert kiosk is not None
    for name, host, port, proxy, asked in (
            ("mail (optional)", MAIL, certified.gateway.port, None, True),
            ("docs (required)", DOCS, certified.gateway.port, None, True),
            ("docs on the session's gateway: no setting", DOCS, gateway.port, None, False),
            ("the kiosk proxy", MAIL, 443, f"127.0.0.1:{kiosk.listen.port}", False)):
        target = ["-connect", f"{host}:{port}", "-proxy", proxy] if proxy else \
            ["-connect", f"127.0.0.1:{port}"]
        assert asked_for_a_certificate(*target, "-servername", host, "-CAfile", str(ca_file)) is asked, name


def test_replay_of_the_decision_log_reproduces_the_certificate_decisions(
        certified: Certified, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The record keeps what the certificate said and which device it named: replay decides the
    stolen token, the bad certificate and the certificate's own device as the gateway did, and a
    candidate with tokenProtection flips the request that had no certificate."""
    token = outlook_token(certified.gateway)
    answers = [certified.sync(token, certified.certificate(ALEX_IPHONE)),
               certified.sync(token, certified.certificate(BLAKE_ANDROID)),
               certified.sync(token, certified.certificate(ALEX_IPHONE, expired=True)),
               certified.sync(token, None)]
    assert [a.status_code for a in answers] == [200, 403, 403, 200]
    wanted = {a.headers[CORRELATION_ID] for a in answers}
    records = [certified.gateway.decision(c) for c in wanted]  # written by its thread: waited for
    log = tmp_path / "decisions.jsonl"
    log.write_text("".join(json.dumps(record) + "\n" for record in records))
    code, out, err = replay(capsys, "--config", certified.gateway.config_dir, log)
    assert code == 0, err
    assert totals(out) == {"same result": 4, "blocked for another reason": 0, "allow→block": 0, "block→allow": 0,
                           "skipped": 0}, out
    stricter = tmp_path / "stricter"
    shutil.copytree(certified.gateway.config_dir, stricter)
    policies = stricter / "policies.yaml"
    anchor = "      maxDeviceThreatLevel: low\n"
    policies.write_text(policies.read_text().replace(anchor, anchor + TOKEN_PROTECTION, 1))
    code, out, err = replay(capsys, "--config", stricter, log)
    assert code == 0, err
    assert totals(out)["allow→block"] == 1 and totals(out)["same result"] == 3, out  # the one without a certificate


def basic(user: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:Passw0rd".encode()).decode()}


def test_legacy_activesync_basic_is_believed_only_with_a_certificate_of_that_users_compliant_device(
        certified: Certified) -> None:
    """On-premises phones that send Basic: opt-in per host, then only with a device certificate
    of a compliant device registered to that user; Exchange checks the password."""
    def sync(user: str, device: str | None) -> httpx.Response:  # the ActiveSync URL of the device it presents
        path = activesync(device or ALEX_IPHONE, user.partition("@")[0])
        return certified.gateway.request(MAIL, path, method="POST", headers=basic(user),
                                         certificate=certified.certificate(device) if device else None)

    assert sync("alex@contoso.test", ALEX_IPHONE).status_code == 401  # off by default: Basic is no credential
    certified.reload(legacy=True)
    try:
        for user, device, reason in (("alex@contoso.test", None, "needs this device's certificate"),
                                     ("drew@contoso.test", ALEX_IPHONE, "a device of another user"),
                                     ("blake@contoso.test", BLAKE_ANDROID, "noncompliant")):
            answer = sync(user, device)
            record = certified.gateway.decision(answer.headers[CORRELATION_ID])
            assert (answer.status_code, record["restriction"]) == (403, "legacyActiveSync"), answer.text
            assert reason in record["status"]["failureReason"]
        alex = sync("alex@contoso.test", ALEX_IPHONE)  # believed; the demo's Exchange policy wants an approved app
        record = certified.gateway.decision(alex.headers[CORRELATION_ID])
        assert (alex.status_code, record["status"]["errorCode"], record.get("restriction")) == (403, 53002, None)
        certified.reload(legacy=True, compliant_device_only=True)  # a policy for legacy phones: a compliant device
        alex = sync("alex@contoso.test", ALEX_IPHONE)
        assert alex.status_code == 200, alex.text
        record = certified.gateway.decision(alex.headers[CORRELATION_ID])
        assert record["userPrincipalName"] == "alex@contoso.test" and record["deviceDetail"]["deviceId"] == ALEX_IPHONE
        assert {"name": "identity", "value": "valid", "source": "legacyActiveSync"}.items() <= \
            next(s for s in record["signals"] if s["name"] == "identity").items()
    finally:
        certified.reload()


def test_a_risk_raise_of_the_certificates_device_closes_its_open_long_poll_within_a_second(
        certified: Certified) -> None:
    """Continuous access evaluation covers the device a certificate named: here the token names no
    device at all (an issuer without deviceid), so only the certificate ties the Ping to Alex's phone."""
    gateway = certified.gateway
    token = gateway.idp.mint(user="alex@contoso.test", client_id=OUTLOOK_MOBILE, audience=EXCHANGE, device_id=None)
    path = activesync(ALEX_IPHONE).replace("Cmd=Sync", "Cmd=Ping") + "&HeartbeatInterval=8"
    certificate = certified.certificate(ALEX_IPHONE)

    def send(user_agent: str) -> int:
        return gateway.request(MAIL, path, method="POST", token=token, headers={"User-Agent": user_agent},
                               certificate=certificate, timeout=20).status_code

    with second_connection(gateway.config_dir) as store:
        ping = LongPoll(send, "Outlook-iOS/2.0", gateway.decision_log, gateway.upstreams).started()
        raised = time.monotonic()
        store.set_threat_level(ALEX_IPHONE, "lookout", DeviceThreatLevel.high, now=utc_now())
        closed = ping.closed_after(raised)
    assert closed is not None and closed < 1.0, f"the long-poll was not closed within a second: {closed}"
    withdrawn = ping.decisions(1, again=True)[-1]
    assert (withdrawn["result"], withdrawn["deviceDetail"]["deviceId"]) == ("block", ALEX_IPHONE)


POLICIES = Path("/etc/chromium/policies/managed")  # where Debian's Chromium reads managed policies


@contextlib.contextmanager
def auto_selected_certificate(url: str) -> Iterator[None]:
    """Chromium's ``AutoSelectCertificateForUrls`` policy for ``url`` (as an MDM sets it): the
    browser presents the matching certificate without asking. Removed afterwards."""
    POLICIES.mkdir(parents=True, exist_ok=True)
    policy = POLICIES / f"portcullis-test-{uuid.uuid4().hex}.json"
    rule = json.dumps({"pattern": url, "filter": {"ISSUER": {"CN": "Contoso Device CA"}}})
    policy.write_text(json.dumps({"AutoSelectCertificateForUrls": [rule]}))
    try:
        yield
    finally:
        policy.unlink()


def nss_home(home: Path, certificate: tuple[Path, Path] | None) -> Path:
    """A HOME whose NSS database (``~/.pki/nssdb``, where Chromium on Linux keeps client
    certificates) holds ``certificate`` and its key, imported with certutil and pk12util."""
    database = home / ".pki" / "nssdb"
    database.mkdir(parents=True)
    subprocess.run(["certutil", "-N", "-d", f"sql:{database}", "--empty-password"], check=True, timeout=30)
    if certificate is not None:
        bundle = home / "device.p12"
        cert = x509.load_pem_x509_certificate(certificate[0].read_bytes())
        key = serialization.load_pem_private_key(certificate[1].read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        bundle.write_bytes(pkcs12.serialize_key_and_certificates(b"device", key, cert, None,
                                                                 serialization.BestAvailableEncryption(b"p")))
        subprocess.run(["pk12util", "-i", str(bundle), "-d", f"sql:{database}", "-W", "p"], check=True,
                       capture_output=True, timeout=30)
    return home


@needs_chromium
@pytest.mark.skipif(os.geteuid() != 0 and not os.environ.get("PORTCULLIS_REQUIRE_CHROMIUM"),
                    reason="writes a managed Chromium policy under /etc (as an MDM would): root only; CI is root")
def test_chromium_signs_in_as_its_certificates_device_and_the_session_cookie_elsewhere_is_refused(
        certified: Certified, tmp_path: Path) -> None:
    """Headless Chromium with Alex's phone's certificate in its NSS database signs in (no device
    picked at the issuer: the certificate names it) and reaches OWA as that device; the session
    cookie copied into a Chromium without the certificate is refused."""
    playwright_api = pytest.importorskip("playwright.sync_api")
    gateway = certified.gateway
    origin = f"https://{MAIL}:{gateway.port}"
    pin = spki_pin(gateway.config_dir.parent / "certs" / "gateway.pem")
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
            "--disable-background-networking", "--disable-component-update",
            f"--ignore-certificate-errors-spki-list={pin}", f"--host-resolver-rules=MAP {MAIL} 127.0.0.1"]
    with auto_selected_certificate(origin), playwright_api.sync_playwright() as playwright:
        managed = playwright.chromium.launch(executable_path=CHROMIUM, args=args, env={
            **os.environ, "HOME": str(nss_home(tmp_path / "managed", certified.certificate(ALEX_IPHONE)))})
        page = managed.new_context().new_page()
        page.goto(f"{origin}/owa/")
        assert "Sign in to Contoso" in page.content()
        page.select_option("select[name=user]", "alex@contoso.test")
        page.select_option("select[name=device_id]", "")  # no device picked: the certificate names it
        page.click("#sign-in")
        page.wait_for_url(f"{origin}/owa/")
        assert '"backend":"exchange"' in page.content().replace(" ", "")
        cookies = [c for c in page.context.cookies() if c["name"] == COOKIE_NAME]
        assert cookies, page.context.cookies()
        managed.close()
        elsewhere = playwright.chromium.launch(executable_path=CHROMIUM, args=args, env={
            **os.environ, "HOME": str(nss_home(tmp_path / "unmanaged", None))})
        context = elsewhere.new_context()
        context.add_cookies(cookies)
        answer = context.new_page().goto(f"{origin}/owa/")
        assert answer is not None and answer.status == 403
        record = gateway.decision(answer.headers["x-portcullis-correlation-id"])
        assert (record["restriction"], record["status"]["failureReason"]) == ("tokenIssuedToAnotherDevice",
                                                                              SESSION_BOUND)
        elsewhere.close()
