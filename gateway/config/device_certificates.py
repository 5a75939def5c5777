"""``protectedHosts.<host>.deviceCertificates``: which CAs issue the devices' client certificates,
whether one is required, and where a certificate names its device; and the CA and CRL files
read when the config is loaded (so a reload picks up a new CRL, and a CRL that does not parse or
that no configured CA signed is a problem at its line, which keeps the last good config)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.x509.oid import NameOID
from pydantic import Field, model_validator

from gateway.config.base import Model
from gateway.config.loader import Loc, locate
from gateway.errors import ConfigProblem
from gateway.policy.model import DeviceKey

MAX_FILE_BYTES = 16 * 1024 * 1024  # a CA bundle or a CRL; a large CA's CRL runs to megabytes
PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.+?-----END \1-----", re.DOTALL)


class DeviceCertificateMode(StrEnum):
    required = "required"  # no verified certificate naming a device: refused with the page that says what to install
    optional = "optional"  # asked for; a request without one is decided on its token alone


class DeviceNameSource(StrEnum):
    """Where in the certificate the MDM profile put the device's id."""

    san_uri = "sanUri"  # Intune: URI:IntuneDeviceId://{{DeviceId}}
    san_dns = "sanDns"
    san_email = "sanEmail"  # rfc822Name
    san_upn = "sanUpn"  # Microsoft's UPN otherName (1.3.6.1.4.1.311.20.2.3)
    subject = "subject"  # one attribute of the subject name


class SubjectAttribute(StrEnum):
    CN = "CN"
    serialNumber = "serialNumber"
    UID = "UID"
    OU = "OU"
    emailAddress = "emailAddress"


SUBJECT_ATTRIBUTE_OIDS = {
    SubjectAttribute.CN: NameOID.COMMON_NAME,
    SubjectAttribute.serialNumber: NameOID.SERIAL_NUMBER,
    SubjectAttribute.UID: NameOID.USER_ID,
    SubjectAttribute.OU: NameOID.ORGANIZATIONAL_UNIT_NAME,
    SubjectAttribute.emailAddress: NameOID.EMAIL_ADDRESS,
}


class DeviceNameSettings(Model):
    """How a certificate names its device: ``from`` where, and ``key`` which inventory field the
    value is. ``prefix`` (sanUri only, required there) picks the URIs that carry the id;
    ``attribute`` (subject only, required there) the subject attribute."""

    from_: DeviceNameSource = Field(alias="from")
    key: DeviceKey
    prefix: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    attribute: SubjectAttribute | None = None

    @model_validator(mode="after")
    def _parts_fit_the_source(self) -> DeviceNameSettings:
        if self.from_ is DeviceNameSource.san_uri and self.prefix is None:
            raise ValueError("from: sanUri needs a prefix, the start of the URIs that carry the device id "
                             "(Intune: 'IntuneDeviceId://')")
        if self.from_ is not DeviceNameSource.san_uri and self.prefix is not None:
            raise ValueError(f"prefix applies to from: sanUri only, not to from: {self.from_.value}")
        if self.from_ is DeviceNameSource.subject and self.attribute is None:
            raise ValueError("from: subject needs an attribute: the subject attribute holding the device id "
                             f"({', '.join(a.value for a in SubjectAttribute)})")
        if self.from_ is not DeviceNameSource.subject and self.attribute is not None:
            raise ValueError(f"attribute applies to from: subject only, not to from: {self.from_.value}")
        return self


class DeviceCertificateSettings(Model):
    """The client certificate a protected host asks devices for (docs/configuration.md)."""

    mode: DeviceCertificateMode
    ca_files: Annotated[list[Path], Field(min_length=1, max_length=16)]  # PEM bundles of the issuing CAs
    crl_files: Annotated[list[Path], Field(max_length=16)] = []  # PEM or DER, each signed by a CA of ca_files
    device_name: DeviceNameSettings


@dataclass(frozen=True, slots=True)
class SignedRevocationList:
    """A CRL and the configured CA whose key signed it (checked when the file was read)."""

    crl: x509.CertificateRevocationList
    signer: x509.Certificate


@dataclass(frozen=True, slots=True)
class DeviceTrust:
    """The CA certificates and CRLs a host's ``deviceCertificates`` names, as read at config load."""

    authorities: tuple[x509.Certificate, ...]
    revocation_lists: tuple[SignedRevocationList, ...] = ()


def load_device_trust(settings: DeviceCertificateSettings, resolve: Callable[[Path], Path], data: Any,
                      loc: Loc, display_name: str) -> tuple[DeviceTrust | None, list[ConfigProblem]]:
    """Read the CA bundles and the CRLs of one host's settings; ``loc`` is where the settings stand
    in ``data`` (the parsed YAML), so each problem is reported at its file's line."""
    problems: list[ConfigProblem] = []
    authorities: list[x509.Certificate] = []
    for index, file in enumerate(settings.ca_files):
        if not resolve(file).exists():
            continue  # like a missing server certificate: `check` and `run` refuse it (files.py), the demo makes it
        try:
            authorities += _authorities(_read(resolve(file)))
        except ValueError as error:
            problems.append(locate(data, (*loc, "caFiles", index), display_name, f"{resolve(file)}: {error}"))
    revocation_lists: list[SignedRevocationList] = []
    for index, file in enumerate(settings.crl_files):
        try:
            revocation_lists += _revocation_lists(_read(resolve(file)), authorities)
        except ValueError as error:
            problems.append(locate(data, (*loc, "crlFiles", index), display_name, f"{resolve(file)}: {error}"))
    if problems:
        return None, problems
    return DeviceTrust(tuple(authorities), tuple(revocation_lists)), []


def _read(path: Path) -> bytes:
    try:
        with path.open("rb") as file:
            content = file.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ValueError("does not exist") from None
    except OSError as error:
        raise ValueError(f"cannot read: {error.strerror or error}") from None
    if len(content) > MAX_FILE_BYTES:
        raise ValueError(f"larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB")
    return content


def _authorities(content: bytes) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(content)
    except ValueError:
        raise ValueError("not a PEM bundle of certificates") from None
    for certificate in certificates:
        try:
            constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
        except (x509.ExtensionNotFound, ValueError):
            constraints = None
        if constraints is None or not constraints.ca:
            raise ValueError(f"{certificate.subject.rfc4514_string()} is not a CA certificate (basicConstraints "
                             "cA is not true); list the CAs that issue the device certificates")
    return certificates


def _revocation_lists(content: bytes, authorities: list[x509.Certificate]) -> list[SignedRevocationList]:
    blocks = [m.group(0) for m in PEM_BLOCK.finditer(content)]
    try:
        if blocks:
            if any(not block.startswith(b"-----BEGIN X509 CRL-----") for block in blocks):
                raise ValueError
            revocation_lists = [x509.load_pem_x509_crl(block) for block in blocks]
        else:
            revocation_lists = [x509.load_der_x509_crl(content)]
    except ValueError:
        raise ValueError("not a certificate revocation list (PEM or DER) that can be parsed") from None
    signed = []
    for revocation_list in revocation_lists:
        signer = next((a for a in authorities if _signed_by(revocation_list, a)), None)
        if signer is None:
            raise ValueError(f"the CRL of {revocation_list.issuer.rfc4514_string()} is not signed by a CA of "
                             "caFiles (a CRL is believed only from the CA whose certificates it revokes)")
        signed.append(SignedRevocationList(revocation_list, signer))
    return signed


def _signed_by(revocation_list: x509.CertificateRevocationList, authority: x509.Certificate) -> bool:
    if revocation_list.issuer != authority.subject:
        return False
    try:
        return revocation_list.is_signature_valid(authority.public_key())  # type: ignore[arg-type]  # X25519 keys never sign
    except (TypeError, ValueError, UnsupportedAlgorithm):
        return False
