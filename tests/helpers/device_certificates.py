"""A small real PKI for device certificate tests: CAs, intermediates, client certificates that are
good or bad in one chosen way, and CRLs, all signed by real keys; and a config whose protected
host asks for device certificates."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
CLIENT_AUTH = [ExtendedKeyUsageOID.CLIENT_AUTH]


def _key_usage(*, signature: bool, cert_sign: bool = False, key_encipherment: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=signature, content_commitment=False, key_encipherment=key_encipherment,
                         data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
                         encipher_only=False, decipher_only=False)


@dataclass(frozen=True)
class Authority:
    """A CA (root or intermediate) with its key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def root(cls, name: str) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        return cls(_ca_certificate(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), key, None), key)

    def intermediate(self, name: str) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        return Authority(_ca_certificate(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), key, self), key)

    def issue(self, *, sans: Sequence[x509.GeneralName] = (), subject: Sequence[x509.NameAttribute] = (),
              purposes: Sequence[x509.ObjectIdentifier] | None = CLIENT_AUTH, signature: bool = True,
              not_before: dt.datetime = NOW - 30 * DAY, not_after: dt.datetime = NOW + 30 * DAY,
              ca: bool = False) -> x509.Certificate:
        """A client certificate; each argument is one way to make it bad (``purposes=None``: no EKU)."""
        return self.issue_with_key(sans=sans, subject=subject, purposes=purposes, signature=signature,
                                   not_before=not_before, not_after=not_after, ca=ca)[0]

    def issue_with_key(self, *, sans: Sequence[x509.GeneralName] = (), subject: Sequence[x509.NameAttribute] = (),
                       purposes: Sequence[x509.ObjectIdentifier] | None = CLIENT_AUTH, signature: bool = True,
                       not_before: dt.datetime = NOW - 30 * DAY, not_after: dt.datetime = NOW + 30 * DAY,
                       ca: bool = False) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """``issue``, with the certificate's key: what a device presenting it over TLS holds."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(list(subject) or [x509.NameAttribute(NameOID.COMMON_NAME, "device")])
        builder = (x509.CertificateBuilder().subject_name(name).issuer_name(self.certificate.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(not_before).not_valid_after(not_after)
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                   .add_extension(_key_usage(signature=signature, key_encipherment=not signature), critical=True)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                                  critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        if purposes is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(purposes)), critical=False)
        return builder.sign(self.key, hashes.SHA256()), key

    def crl(self, *revoked: x509.Certificate, last_update: dt.datetime = NOW - DAY,
            next_update: dt.datetime = NOW + 7 * DAY) -> x509.CertificateRevocationList:
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.certificate.subject)
                   .last_update(last_update).next_update(next_update))
        for certificate in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(certificate.serial_number)
                .revocation_date(last_update).build())
        return builder.sign(self.key, hashes.SHA256())


def _ca_certificate(name: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: Authority | None) -> x509.Certificate:
    signer = issuer.key if issuer else key
    return (x509.CertificateBuilder().subject_name(name)
            .issuer_name(issuer.certificate.subject if issuer else name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - 365 * DAY).not_valid_after(NOW + 365 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(signature=True, cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
            .sign(signer, hashes.SHA256()))


def self_signed(sans: Sequence[x509.GeneralName]) -> x509.Certificate:
    """A client certificate anyone can make: its own issuer."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device")])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(NOW - DAY).not_valid_after(NOW + DAY)
            .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
            .add_extension(x509.ExtendedKeyUsage(CLIENT_AUTH), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))


def with_garbled_extension(authority: Authority, oid: x509.ObjectIdentifier) -> x509.Certificate:
    """A certificate the CA signed whose extension ``oid`` holds bytes that are not its ASN.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device")]))
            .issuer_name(authority.certificate.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(NOW - DAY).not_valid_after(NOW + DAY)
            .add_extension(x509.UnrecognizedExtension(oid, b"\x04\x01\x00"), critical=False)
            .sign(authority.key, hashes.SHA256()))


def der(*certificates: x509.Certificate) -> list[bytes]:
    """A chain as a TLS client sends it: DER, leaf first."""
    return [c.public_bytes(serialization.Encoding.DER) for c in certificates]


def pem(*items: x509.Certificate | x509.CertificateRevocationList) -> bytes:
    return b"".join(item.public_bytes(serialization.Encoding.PEM) for item in items)


DEVICE_CERTIFICATES = """\
    deviceCertificates:
      mode: required
      caFiles: [device-ca.pem]
      crlFiles: [device-ca.crl]
      deviceName: {from: sanUri, prefix: "IntuneDeviceId://", key: intuneDeviceId}
"""
HOST_LINE = "    audiences: [00000003-0000-0ff1-ce00-000000000000]      # SharePoint Online\n"


def ask_for_device_certificates(config_dir: Path, authority: Authority, crl: x509.CertificateRevocationList,
                                settings: str = DEVICE_CERTIFICATES) -> int:
    """docs.contoso.test of a copied demo config asks for device certificates from ``authority``;
    its CA and CRL files are written beside the config. Returns the line of ``deviceCertificates``."""
    (config_dir / "device-ca.pem").write_bytes(pem(authority.certificate))
    (config_dir / "device-ca.crl").write_bytes(pem(crl))
    path = config_dir / "portcullis.yaml"
    text = path.read_text()
    assert HOST_LINE in text
    path.write_text(text.replace(HOST_LINE, HOST_LINE + settings, 1))
    return text[:text.index(HOST_LINE)].count("\n") + 2
