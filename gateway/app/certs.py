"""Certificates for the gateway's TLS listener: a private CA and a server certificate signed by
it, written as PEM files (the server file holds certificate + key, as mitmproxy's ``certs``
option expects). Generated on first run, never committed.

Beside them, for demos and tests only, a device CA that issues client certificates in Intune's
SAN format (``URI:IntuneDeviceId://{id}``), as an MDM's SCEP/PKCS profile would put on a device."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.config import resolve
from gateway.config.models import PortcullisFile
from gateway.identity.device_certificates import device_value_form, normalised_device_value
from gateway.policy.model import DeviceKey

CA_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
DEVICE_CA_FILE = "device-ca.pem"  # demo and tests only: never the CA of real devices
DEVICE_CA_KEY_FILE = "device-ca-key.pem"
DEVICE_CA_NAME = "Portcullis demo device CA (demo and tests only)"
# Where the demo puts the device id: Intune's documented SAN URI for its own id; the demo's own
# convention for the other keys (an MDM profile may put them anywhere deviceName can read).
DEMO_SAN_PREFIXES = {DeviceKey.intune_device_id: "IntuneDeviceId://",
                     DeviceKey.azure_ad_device_id: "AzureADDeviceId://",
                     DeviceKey.serial_number: "SerialNumber://"}


def ensure_server_certificate(cert_file: Path, hosts: list[str]) -> Path:
    """Create ``cert_file`` (and a CA beside it) if missing. Returns the CA certificate path."""
    directory = cert_file.parent
    if cert_file.exists() and _covers(cert_file, hosts):
        return directory / CA_FILE
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _load_or_create_ca(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _server_certificate(hosts, key, ca_cert, ca_key)
    _write_private(cert_file, cert.public_bytes(serialization.Encoding.PEM) + _private_pem(key))
    return directory / CA_FILE


def _covers(cert_file: Path, hosts: list[str]) -> bool:
    """A certificate made before a host name was added to the config is made again."""
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return False
    return set(hosts) <= set(names.get_values_for_type(x509.DNSName))


def _load_or_create_ca(directory: Path, ca_name: str = "Portcullis local CA", ca_file_name: str = CA_FILE,
                       key_file_name: str = CA_KEY_FILE) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_file, key_file = directory / ca_file_name, directory / key_file_name
    if ca_file.exists() and key_file.exists():
        cert = x509.load_pem_x509_certificate(ca_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_file}: expected an EC private key")
        return cert, key
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Portcullis")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=825))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_file, _private_pem(key))
    ca_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _server_certificate(hosts: list[str], key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                        ca_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=397))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def ensure_device_ca(directory: Path) -> Path:
    """The demo device CA in the certs ``directory``, created if missing. Returns its certificate
    path (what ``deviceCertificates.caFiles`` names in a demo config)."""
    directory.mkdir(parents=True, exist_ok=True)
    _load_or_create_ca(directory, DEVICE_CA_NAME, DEVICE_CA_FILE, DEVICE_CA_KEY_FILE)
    return directory / DEVICE_CA_FILE


def issue_device_certificate(directory: Path, device_id: str, key: DeviceKey = DeviceKey.intune_device_id, *,
                             valid_days: int = 365) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A client certificate for one device, signed by the demo device CA in ``directory`` (made if
    missing): SAN ``URI:IntuneDeviceId://{id}`` (or the demo prefix of ``key``), clientAuth,
    digitalSignature. Demo and tests only: on real devices the MDM's CA issues them."""
    value = normalised_device_value(key, device_id)
    if value is None:
        raise ValueError(f"{device_id!r} is not a {key.value} ({device_value_form(key)})")
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _load_or_create_ca(directory, DEVICE_CA_NAME, DEVICE_CA_FILE, DEVICE_CA_KEY_FILE)
    device_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, value)]))
        .issuer_name(ca_cert.subject).public_key(device_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(DEMO_SAN_PREFIXES[key] + value)]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return certificate, device_key


def write_device_certificate(out: Path, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey,
                             ca_file: Path, password: bytes) -> tuple[Path, Path, Path]:
    """The certificate (PEM), its key (PEM, mode 0600) and both with the CA as PKCS#12 (for
    browsers and NSS's ``pk12util``), named after the certificate's common name."""
    out.mkdir(parents=True, exist_ok=True)
    name = str(certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
    cert_file, key_file, p12_file = out / f"{stem}.pem", out / f"{stem}-key.pem", out / f"{stem}.p12"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    _write_private(key_file, _private_pem(key))
    ca = x509.load_pem_x509_certificate(ca_file.read_bytes())
    encryption = (serialization.PrivateFormat.PKCS12.encryption_builder().kdf_rounds(50_000)
                  .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC).hmac_hash(hashes.SHA256())
                  .build(password))
    _write_private(p12_file, pkcs12.serialize_key_and_certificates(
        f"Portcullis demo device {name}".encode(), key, certificate, [ca], encryption))
    return cert_file, key_file, p12_file


def demo_device_ca(config_dir: Path, gateway_file: PortcullisFile) -> Path | None:
    """The demo device CA's certificate path when a host's ``caFiles`` names it (beside the
    gateway's CA), else None: only then do ``certs init`` and the demo make it."""
    device_ca = resolve(config_dir, gateway_file.gateway.certificates[0].file).parent / DEVICE_CA_FILE
    named = {resolve(config_dir, file).resolve() for host in gateway_file.protected_hosts.values()
             if host.device_certificates is not None for file in host.device_certificates.ca_files}
    return device_ca if device_ca.resolve() in named else None


def demo_device_files(ca_file: Path, device_id: str) -> tuple[Path, Path]:
    """Where the demo keeps a device's certificate and key (PEM), beside its device CA."""
    directory = ca_file.parent / "devices"
    return directory / f"{device_id}.pem", directory / f"{device_id}-key.pem"


def ensure_demo_device_certificates(ca_file: Path, device_ids: Iterable[str], password: bytes) -> None:
    """The demo's devices' certificates (Intune's SAN format), issued once by the demo device CA."""
    for device_id in device_ids:
        cert_file, _ = demo_device_files(ca_file, device_id)
        if not cert_file.exists():
            certificate, key = issue_device_certificate(ca_file.parent, device_id)
            write_device_certificate(cert_file.parent, certificate, key, ca_file, password)
