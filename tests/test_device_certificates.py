"""Device certificates: what a client's certificate chain names, verified against configured CAs
and CRLs (gateway/identity/device_certificates.py), the deviceCertificates settings and their
files at file:line, a CRL reload, and the demo's `portcullis certs device-cert`. Every certificate
here is real and signed by a real key."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from gateway.app.certs import (
    DEVICE_CA_FILE,
    DEVICE_CA_KEY_FILE,
    DEVICE_CA_NAME,
    ensure_device_ca,
    issue_device_certificate,
)
from gateway.config import load_config
from gateway.config.device_certificates import DeviceCertificateSettings, DeviceTrust, SignedRevocationList
from gateway.config.files import missing_certificates
from gateway.config.models import ProtectedHost
from gateway.identity.device_certificates import DeviceCertificateVerifier
from gateway.policy.model import DeviceCertificate, DeviceKey
from tests.conftest import REPO, Ports, gateway_config, operations_for
from tests.gateway_process import PORTCULLIS
from tests.helpers.config import problems
from tests.helpers.device_certificates import (
    DAY,
    DEVICE_CERTIFICATES,
    NOW,
    Authority,
    ask_for_device_certificates,
    der,
    pem,
    self_signed,
    with_garbled_extension,
)

PHONE = "6a1d1e3f-2c4b-4d8e-9f10-3b2a1c0d9e8f"  # an Intune device id
OTHER = "0b7c9d2e-5f61-4a3b-8c7d-2e1f0a9b8c7d"
INTUNE = {"from": "sanUri", "prefix": "IntuneDeviceId://", "key": "intuneDeviceId"}


def settings(device_name: dict[str, str] | None = None, **more: Any) -> DeviceCertificateSettings:
    data = {"mode": "required", "caFiles": ["ca.pem"], "deviceName": device_name or INTUNE, **more}
    return DeviceCertificateSettings.model_validate_json(json.dumps(data), strict=True)


def verifier(authority: Authority, *crls: x509.CertificateRevocationList,
             device_name: dict[str, str] | None = None) -> DeviceCertificateVerifier:
    trust = DeviceTrust((authority.certificate,), tuple(SignedRevocationList(c, authority.certificate) for c in crls))
    return DeviceCertificateVerifier(settings(device_name), trust)


def intune_san(*device_ids: str) -> list[x509.GeneralName]:
    return [x509.UniformResourceIdentifier(f"IntuneDeviceId://{d}") for d in device_ids]


@pytest.fixture(scope="module")
def mdm() -> Authority:
    return Authority.root("Contoso MDM Device CA")


# -- the good cases: each place a certificate can name its device, and each inventory key ----------

UPN = x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")
GOOD = {
    "sanUri intuneDeviceId (Intune's format), GUID lower-cased": (
        INTUNE, {"sans": [*intune_san(PHONE.upper()), x509.UniformResourceIdentifier("https://contoso.test/x")]},
        DeviceKey.intune_device_id, PHONE),
    "sanUri azureADDeviceId": (
        {"from": "sanUri", "prefix": "AzureADDeviceId://", "key": "azureADDeviceId"},
        {"sans": [x509.UniformResourceIdentifier(f"AzureADDeviceId://{OTHER}")]}, DeviceKey.azure_ad_device_id, OTHER),
    "sanDns serialNumber, trimmed and upper-cased": (
        {"from": "sanDns", "key": "serialNumber"}, {"sans": [x509.DNSName("c02xk1abjg5h")]},
        DeviceKey.serial_number, "C02XK1ABJG5H"),
    "sanEmail azureADDeviceId": (
        {"from": "sanEmail", "key": "azureADDeviceId"}, {"sans": [x509.RFC822Name(OTHER)]},
        DeviceKey.azure_ad_device_id, OTHER),
    "sanUpn intuneDeviceId": (
        {"from": "sanUpn", "key": "intuneDeviceId"},
        {"sans": [x509.OtherName(UPN, b"\x0c" + bytes([len(PHONE)]) + PHONE.encode())]},
        DeviceKey.intune_device_id, PHONE),
    "subject CN azureADDeviceId, no SAN at all": (
        {"from": "subject", "attribute": "CN", "key": "azureADDeviceId"},
        {"subject": [x509.NameAttribute(NameOID.COMMON_NAME, OTHER.upper())]}, DeviceKey.azure_ad_device_id, OTHER),
    "subject serialNumber serialNumber": (
        {"from": "subject", "attribute": "serialNumber", "key": "serialNumber"},
        {"subject": [x509.NameAttribute(NameOID.COMMON_NAME, "Alex's iPhone"),
                     x509.NameAttribute(NameOID.SERIAL_NUMBER, " f2lxk0abhg7k ")],
         "sans": [x509.DNSName("alex-iphone.contoso.test")]}, DeviceKey.serial_number, "F2LXK0ABHG7K"),
}


@pytest.mark.parametrize("case", GOOD)
def test_a_good_certificate_names_its_device(mdm: Authority, case: str) -> None:
    device_name, issued, key, value = GOOD[case]
    leaf = mdm.issue(**issued)
    result = verifier(mdm, device_name=device_name).verify(der(leaf), NOW)
    assert (result.problem, result.device_key, result.device_value) == (None, key, value)
    assert result.verified
    assert result.issuer == "CN=Contoso MDM Device CA" and result.not_after == leaf.not_valid_after_utc
    assert int(result.serial_number, 16) == leaf.serial_number and len(result.sha256) == 64


def test_a_certificate_from_an_intermediate_the_client_sends_is_verified(mdm: Authority) -> None:
    issuing = mdm.intermediate("Contoso MDM Issuing CA")
    result = verifier(mdm).verify(der(issuing.issue(sans=intune_san(PHONE)), issuing.certificate), NOW)
    assert (result.problem, result.device_value) == (None, PHONE)


def test_the_demo_device_certificate_is_in_intunes_format_and_verifies(tmp_path: Path) -> None:
    certificate, _ = issue_device_certificate(tmp_path, PHONE.upper())
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"IntuneDeviceId://{PHONE}"]
    demo_ca = x509.load_pem_x509_certificate((tmp_path / DEVICE_CA_FILE).read_bytes())
    trust = DeviceTrust((demo_ca,))
    result = DeviceCertificateVerifier(settings(), trust).verify(der(certificate), certificate.not_valid_before_utc
                                                                 + DAY)
    assert (result.problem, result.device_key, result.device_value) == (None, DeviceKey.intune_device_id, PHONE)


# -- every bad input: a refusal with its reason, the certificate described as far as it parsed -----

def refused(result: DeviceCertificate, fragment: str) -> None:
    assert not result.verified and result.device_value is None
    assert result.problem is not None and fragment in result.problem, result.problem


def test_an_expired_certificate_is_refused(mdm: Authority) -> None:
    leaf = mdm.issue(sans=intune_san(PHONE), not_before=NOW - 60 * DAY, not_after=NOW - DAY)
    result = verifier(mdm).verify(der(leaf), NOW)
    refused(result, "the certificate expired on 2026-05-31 12:00:00 UTC")
    assert result.subject == "CN=device" and result.not_after == NOW - DAY  # described for the decision log


def test_a_certificate_not_yet_valid_is_refused(mdm: Authority) -> None:
    leaf = mdm.issue(sans=intune_san(PHONE), not_before=NOW + DAY)
    refused(verifier(mdm).verify(der(leaf), NOW), "not yet valid: valid from 2026-06-02 12:00:00 UTC")


def test_a_server_certificate_is_not_a_device_certificate(mdm: Authority) -> None:
    leaf = mdm.issue(sans=intune_san(PHONE), purposes=[ExtendedKeyUsageOID.SERVER_AUTH])
    refused(verifier(mdm).verify(der(leaf), NOW), "not for client authentication (extended key usage: serverAuth)")


def test_a_certificate_without_extended_key_usage_is_refused(mdm: Authority) -> None:
    """cryptography's client verifier accepts a leaf with no EKU (any purpose); the gateway does not."""
    leaf = mdm.issue(sans=intune_san(PHONE), purposes=None)
    refused(verifier(mdm).verify(der(leaf), NOW), "not for client authentication (extended key usage: none)")


def test_a_key_that_may_not_sign_is_refused(mdm: Authority) -> None:
    leaf = mdm.issue(sans=intune_san(PHONE), signature=False)
    refused(verifier(mdm).verify(der(leaf), NOW), "key usage does not allow digitalSignature")


def test_a_self_signed_certificate_is_refused() -> None:
    result = verifier(Authority.root("Contoso MDM Device CA")).verify(der(self_signed(intune_san(PHONE))), NOW)
    refused(result, "self-signed certificate (CN=device): not issued by a configured device CA")


def test_a_certificate_from_an_unknown_ca_is_refused(mdm: Authority) -> None:
    stranger = Authority.root("Fabrikam Device CA")
    refused(verifier(mdm).verify(der(stranger.issue(sans=intune_san(PHONE))), NOW),
            "issued by an unknown CA (CN=Fabrikam Device CA), not a configured device CA")


def test_a_ca_that_shares_the_configured_name_but_not_its_key_is_refused(mdm: Authority) -> None:
    impostor = Authority.root("Contoso MDM Device CA")
    refused(verifier(mdm).verify(der(impostor.issue(sans=intune_san(PHONE))), NOW),
            "does not verify against the configured device CA CN=Contoso MDM Device CA")


def test_a_chain_through_an_extra_untrusted_intermediate_is_refused(mdm: Authority) -> None:
    rogue = Authority.root("Fabrikam Root").intermediate("Contoso MDM Issuing CA")
    chain = der(rogue.issue(sans=intune_san(PHONE)), rogue.certificate)
    refused(verifier(mdm).verify(chain, NOW),
            "issued by the intermediate CA CN=Contoso MDM Issuing CA, which does not chain to a configured device CA")


def test_a_revoked_certificate_is_refused(mdm: Authority) -> None:
    leaf = mdm.issue(sans=intune_san(PHONE))
    result = verifier(mdm, mdm.crl(leaf)).verify(der(leaf), NOW)
    refused(result, f"the certificate is revoked (serial {result.serial_number}, CRL of CN=Contoso MDM Device CA)")
    assert verifier(mdm, mdm.crl()).verify(der(leaf), NOW).device_value == PHONE  # not on the list: fine


def test_a_certificate_under_a_revoked_intermediate_is_refused(mdm: Authority) -> None:
    issuing = mdm.intermediate("Contoso MDM Issuing CA")
    result = verifier(mdm, mdm.crl(issuing.certificate)).verify(
        der(issuing.issue(sans=intune_san(PHONE)), issuing.certificate), NOW)
    refused(result, "its issuing CA CN=Contoso MDM Issuing CA is revoked")


def test_a_stale_crl_refuses_rather_than_skipping_revocation(mdm: Authority) -> None:
    leaf = mdm.issue(sans=intune_san(PHONE))
    stale = mdm.crl(last_update=NOW - 10 * DAY, next_update=NOW - DAY)
    refused(verifier(mdm, stale).verify(der(leaf), NOW),
            "the CRL of CN=Contoso MDM Device CA expired on 2026-05-31 12:00:00 UTC: revocation of the certificate "
            "cannot be checked")


def test_a_certificate_whose_san_names_two_devices_is_refused(mdm: Authority) -> None:
    refused(verifier(mdm).verify(der(mdm.issue(sans=intune_san(PHONE, OTHER))), NOW),
            f"names two devices ({PHONE}, {OTHER})")
    same_twice = mdm.issue(sans=intune_san(PHONE, PHONE.upper()))
    assert verifier(mdm).verify(der(same_twice), NOW).device_value == PHONE  # one device, written twice


def test_a_certificate_naming_no_device_is_refused(mdm: Authority) -> None:
    leaf = mdm.issue(sans=[x509.UniformResourceIdentifier(f"AzureADDeviceId://{PHONE}")])
    refused(verifier(mdm).verify(der(leaf), NOW), "names no device: it has no SAN URI starting with "
                                                  "'IntuneDeviceId://'")
    subject = {"from": "subject", "attribute": "serialNumber", "key": "serialNumber"}
    refused(verifier(mdm, device_name=subject).verify(der(leaf), NOW), "names no device: it has no subject "
                                                                       "attribute serialNumber")


def test_a_device_id_that_is_not_a_guid_is_refused(mdm: Authority) -> None:
    leaf = mdm.issue(sans=[x509.UniformResourceIdentifier("IntuneDeviceId://../admin")])
    refused(verifier(mdm).verify(der(leaf), NOW), "its SAN URI '../admin' is not a intuneDeviceId (a GUID)")


def test_two_certificates_that_name_devices_in_one_chain_are_refused(mdm: Authority) -> None:
    phone, other = mdm.issue(sans=intune_san(PHONE)), mdm.issue(sans=intune_san(OTHER))
    refused(verifier(mdm).verify(der(phone, other), NOW), "the chain holds a second end-entity certificate")


@pytest.mark.parametrize(("chain", "fragment"), [
    ([], "no client certificate was presented"),
    ([b"\x30\x03\x02\x01\x00"], "certificate 1 of the chain is not a DER X.509 certificate"),
    ([b"\x30" * (16 * 1024 + 1)], "certificate 1 of the chain is larger than 16 KiB"),
    ([b"x"] * 9, "the client sent 9 certificates; at most 8 are accepted"),
])
def test_malformed_or_oversized_chains_are_refused_without_raising(mdm: Authority, chain: Sequence[bytes],
                                                                   fragment: str) -> None:
    refused(verifier(mdm).verify(chain, NOW), fragment)


@pytest.mark.parametrize("extension", [ExtensionOID.EXTENDED_KEY_USAGE, ExtensionOID.SUBJECT_ALTERNATIVE_NAME])
def test_a_certificate_with_an_extension_that_does_not_parse_is_refused_without_raising(
        mdm: Authority, extension: x509.ObjectIdentifier) -> None:
    result = verifier(mdm).verify(der(with_garbled_extension(mdm, extension)), NOW)
    refused(result, "certificate 1 of the chain has an extension that cannot be parsed")
    assert result.subject == "CN=device"  # described as far as it parsed


def test_recheck_sees_expiry_and_a_crl_loaded_since(mdm: Authority) -> None:
    leaf = mdm.issue(sans=intune_san(PHONE), not_after=NOW + DAY)
    verified = verifier(mdm, mdm.crl()).verify(der(leaf), NOW)
    assert verifier(mdm, mdm.crl()).recheck(verified, NOW) is None
    assert verifier(mdm, mdm.crl()).recheck(verified, NOW + 2 * DAY) == \
        "the certificate expired on 2026-06-02 12:00:00 UTC"
    assert "the certificate is revoked" in (verifier(mdm, mdm.crl(leaf)).recheck(verified, NOW) or "")


def test_the_acceptable_issuers_are_the_configured_cas(mdm: Authority) -> None:
    issuing = mdm.intermediate("Contoso MDM Issuing CA")
    trust = DeviceTrust((mdm.certificate, issuing.certificate, mdm.certificate))
    checker = DeviceCertificateVerifier(settings(), trust)
    assert checker.acceptable_issuers == (mdm.certificate.subject, issuing.certificate.subject)
    assert checker.authorities == (mdm.certificate, issuing.certificate)


# -- settings and their files, at file:line --------------------------------------------------------

@pytest.fixture
def config_dir(tmp_path: Path, ca: trustme.CA, demo_ports: Ports) -> Path:
    return gateway_config(tmp_path, ca, demo_ports)


def test_a_host_with_device_certificates_loads_its_cas_and_crls(config_dir: Path, mdm: Authority) -> None:
    crl = mdm.crl(mdm.issue(sans=intune_san(OTHER)))
    ask_for_device_certificates(config_dir, mdm, crl)
    config = load_config(config_dir)
    trust = config.device_trust["docs.contoso.test"]
    assert trust.authorities == (mdm.certificate,) and [s.crl for s in trust.revocation_lists] == [crl]
    # the demo's mail host trusts the demo device CA; a host without the section asks for no certificate
    assert config.device_trust["mail.contoso.test"].authorities[0].subject != mdm.certificate.subject
    assert ProtectedHost(upstream="http://127.0.0.1:9", audiences=["a"]).device_certificates is None


BAD_SETTINGS = {
    "prefix with sanDns": ('{from: sanDns, prefix: "x://", key: serialNumber}',
                           "prefix applies to from: sanUri only, not to from: sanDns"),
    "sanUri without prefix": ("{from: sanUri, key: intuneDeviceId}", "from: sanUri needs a prefix"),
    "subject without attribute": ("{from: subject, key: serialNumber}", "from: subject needs an attribute"),
    "attribute with sanUri": ('{from: sanUri, prefix: "IntuneDeviceId://", attribute: CN, key: intuneDeviceId}',
                              "attribute applies to from: subject only"),
    "unknown key": ('{from: sanUri, prefix: "IntuneDeviceId://", key: deviceId}', "'deviceId' is not allowed"),
}


@pytest.mark.parametrize("case", BAD_SETTINGS)
def test_device_name_settings_that_do_not_fit_are_reported_at_their_line(config_dir: Path, mdm: Authority,
                                                                         case: str) -> None:
    device_name, message = BAD_SETTINGS[case]
    text = ("    deviceCertificates:\n      mode: required\n      caFiles: [device-ca.pem]\n"
            f"      deviceName: {device_name}\n")
    line = ask_for_device_certificates(config_dir, mdm, mdm.crl(), text)
    found = problems(config_dir)
    assert any(f"portcullis.yaml:{line + 3}:" in p and message in p for p in found), found


def test_device_certificates_need_a_ca_file(config_dir: Path, mdm: Authority) -> None:
    text = "    deviceCertificates:\n      mode: optional\n      caFiles: []\n      deviceName: {from: sanDns, key: " \
           "serialNumber}\n"
    line = ask_for_device_certificates(config_dir, mdm, mdm.crl(), text)
    found = problems(config_dir)
    assert any(f"portcullis.yaml:{line + 2}:" in p and "caFiles" in p and "at least 1" in p for p in found), found


def crl_problem(config_dir: Path, line: int) -> str:
    found = problems(config_dir)
    assert len(found) == 1 and f"portcullis.yaml:{line + 3}:" in found[0], found  # at crlFiles' item
    assert "protectedHosts.docs.contoso.test.deviceCertificates.crlFiles[0]" in found[0]
    return found[0]


def test_a_crl_that_does_not_parse_is_a_config_problem_at_its_line(config_dir: Path, mdm: Authority) -> None:
    line = ask_for_device_certificates(config_dir, mdm, mdm.crl())
    (config_dir / "device-ca.crl").write_bytes(b"-----BEGIN X509 CRL-----\nbm90IGEgQ1JM\n-----END X509 CRL-----\n")
    assert "device-ca.crl: not a certificate revocation list (PEM or DER) that can be parsed" in \
        crl_problem(config_dir, line)


def test_a_crl_no_configured_ca_signed_is_a_config_problem(config_dir: Path, mdm: Authority) -> None:
    impostor = Authority.root("Contoso MDM Device CA")  # same name, another key
    line = ask_for_device_certificates(config_dir, mdm, impostor.crl())
    assert "the CRL of CN=Contoso MDM Device CA is not signed by a CA of caFiles" in crl_problem(config_dir, line)


def test_a_der_crl_is_read(config_dir: Path, mdm: Authority) -> None:
    crl = mdm.crl()
    ask_for_device_certificates(config_dir, mdm, crl)
    (config_dir / "device-ca.crl").write_bytes(crl.public_bytes(Encoding.DER))
    assert [s.crl for s in load_config(config_dir).device_trust["docs.contoso.test"].revocation_lists] == [crl]


def test_ca_files_must_hold_ca_certificates(config_dir: Path, mdm: Authority) -> None:
    line = ask_for_device_certificates(config_dir, mdm, mdm.crl())
    (config_dir / "device-ca.pem").write_bytes(b"not a PEM\n")
    found = problems(config_dir)
    assert any(f"portcullis.yaml:{line + 2}:" in p and "device-ca.pem: not a PEM bundle of certificates" in p
               for p in found), found
    (config_dir / "device-ca.pem").write_bytes(pem(mdm.issue(sans=intune_san(PHONE))))
    assert any("CN=device is not a CA certificate" in p for p in problems(config_dir))


# -- a reload reads the CRL again; a broken one keeps the last good config -------------------------

def test_a_broken_crl_on_reload_keeps_the_previous_one_in_force(config_dir: Path, mdm: Authority) -> None:
    revoked = mdm.issue(sans=intune_san(OTHER))
    first, second = mdm.crl(revoked), mdm.crl(revoked, mdm.issue(sans=intune_san(PHONE)))
    # optional: the shipped cases the reload gate runs present no certificate (required would refuse them)
    line = ask_for_device_certificates(config_dir, mdm, first, DEVICE_CERTIFICATES.replace("required", "optional"))
    crl_file = config_dir / "device-ca.crl"

    def crls_in_force() -> list[x509.CertificateRevocationList]:
        return [s.crl for s in operations.service.config.device_trust["docs.contoso.test"].revocation_lists]

    async def scenario() -> None:
        nonlocal operations
        operations = await operations_for(config_dir, fetch_keys=False)
        try:
            assert crls_in_force() == [first]
            crl_file.write_bytes(b"\x30\x82garbage")
            outcome = await operations.reloader.reload("adminApi")
            assert not outcome.applied
            assert any(f"portcullis.yaml:{line + 3}:" in p and "device-ca.crl: not a certificate revocation list"
                       in p for p in outcome.problems), outcome.problems
            assert crls_in_force() == [first]  # the last good CRL stays in force
            crl_file.write_bytes(second.public_bytes(Encoding.PEM))
            assert (await operations.reloader.reload("adminApi")).applied
            assert crls_in_force() == [second]  # a good new CRL is picked up by the reload
        finally:
            operations.service.close()

    operations: Any = None
    asyncio.run(scenario())


# -- the demo command ----------------------------------------------------------------------------

def test_certs_device_cert_writes_a_demo_device_certificate(config_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "issued"
    run = subprocess.run([PORTCULLIS, "certs", "--config", str(config_dir), "device-cert",
                          PHONE.upper(), "--out", str(out)], capture_output=True, text=True, cwd=REPO, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("DEMO/TEST ONLY: a device certificate from the demo device CA")
    assert f"device: intuneDeviceId {PHONE}" in run.stdout and "--cert" in run.stdout
    certificate = x509.load_pem_x509_certificate((out / f"{PHONE}.pem").read_bytes())
    assert (out / f"{PHONE}-key.pem").stat().st_mode & 0o077 == 0  # the key is the owner's only
    key, p12_certificate, cas = pkcs12.load_key_and_certificates((out / f"{PHONE}.p12").read_bytes(), b"portcullis")
    assert p12_certificate == certificate and key is not None and len(cas) == 1
    device_ca = ensure_device_ca(config_dir.parent / "certs")  # made by the command beside the gateway's CA
    assert cas[0] == x509.load_pem_x509_certificate(device_ca.read_bytes())
    result = DeviceCertificateVerifier(settings(), DeviceTrust((cas[0],))).verify(
        der(certificate), certificate.not_valid_before_utc + DAY)
    assert (result.problem, result.device_value) == (None, PHONE)


def test_certs_device_cert_refuses_a_device_id_of_the_wrong_form(config_dir: Path) -> None:
    run = subprocess.run([PORTCULLIS, "certs", "--config", str(config_dir), "device-cert",
                          "not-a-guid"], capture_output=True, text=True, cwd=REPO, check=False)
    assert run.returncode == 2 and "'not-a-guid' is not a intuneDeviceId (a GUID)" in run.stdout
    help_text = subprocess.run([PORTCULLIS, "certs", "device-cert", "--help"],
                               capture_output=True, text=True, cwd=REPO, check=False).stdout
    assert "DEMO AND TESTS ONLY" in help_text


def test_certs_init_makes_the_demo_device_ca_a_config_names(config_dir: Path, mdm: Authority) -> None:
    demo = DEVICE_CERTIFICATES.replace("caFiles: [device-ca.pem]", "caFiles: [../certs/device-ca.pem]") \
        .replace("      crlFiles: [device-ca.crl]\n", "")
    line = ask_for_device_certificates(config_dir, mdm, mdm.crl(), demo)
    missing = config_dir.parent / "certs" / DEVICE_CA_FILE
    for made in (missing, missing.with_name(DEVICE_CA_KEY_FILE)):  # the test gateway's config has them: start anew
        made.unlink()
    # the config loads (as with a server certificate not made yet); check and run refuse it, saying how to make it
    assert not load_config(config_dir).device_trust["docs.contoso.test"].authorities
    [problem] = [str(p) for p in missing_certificates(load_config(config_dir), config_dir) if "docs" in p.key]
    assert problem.startswith(f"{config_dir / 'portcullis.yaml'}:{line + 2}:17: protectedHosts.docs.contoso.test"
                              f".deviceCertificates.caFiles[0]: {missing} does not exist")
    assert "portcullis certs --config" in problem
    checked = subprocess.run([PORTCULLIS, "check", "--config", str(config_dir)], capture_output=True, text=True,
                             cwd=REPO, check=False)
    assert checked.returncode == 1 and f"{missing} does not exist" in checked.stderr
    made = subprocess.run([PORTCULLIS, "certs", "--config", str(config_dir), "init"], capture_output=True, text=True,
                          cwd=REPO, check=False)
    assert made.returncode == 0 and f"demo device CA (demo and tests only): {missing}" in made.stdout, made.stderr
    trust = load_config(config_dir).device_trust["docs.contoso.test"]
    assert [a.subject.rfc4514_string() for a in trust.authorities] == [f"O=Portcullis,CN={DEVICE_CA_NAME}"]


def test_a_host_whose_ca_file_is_missing_refuses_every_certificate(mdm: Authority) -> None:
    """The config loads without it (as without a server certificate not made yet; `check` and
    `run` refuse it): no certificate is believed meanwhile, and the gateway does not crash."""
    verdict = DeviceCertificateVerifier(settings(), DeviceTrust(())).verify(der(mdm.issue(sans=intune_san(PHONE))),
                                                                            NOW)
    assert verdict.problem == "no device CA is available to verify it (a caFiles entry is missing)"


def test_a_crl_replaced_on_disk_is_picked_up_by_the_file_watch(config_dir: Path, mdm: Authority) -> None:
    """The job that fetches the MDM's CRL replaces the file; no SIGHUP needed."""
    revoked = mdm.issue(sans=intune_san(OTHER))
    first, second = mdm.crl(), mdm.crl(revoked)
    ask_for_device_certificates(config_dir, mdm, first, DEVICE_CERTIFICATES.replace("required", "optional"))

    async def scenario() -> None:
        operations = await operations_for(config_dir, fetch_keys=False)
        watching = asyncio.create_task(operations.reloader.watch(interval=0.02, settle=0.02))
        try:
            def in_force() -> list[x509.CertificateRevocationList]:
                return [s.crl for s in operations.service.config.device_trust["docs.contoso.test"].revocation_lists]

            assert in_force() == [first]
            (config_dir / "device-ca.crl").write_bytes(pem(second))
            for _ in range(500):  # the watch polls every 20 ms
                if in_force() == [second]:
                    break
                await asyncio.sleep(0.01)
            assert in_force() == [second]
            assert operations.reloader.last is not None and operations.reloader.last.trigger == "fileWatch"
        finally:
            watching.cancel()
            operations.service.close()

    asyncio.run(scenario())
