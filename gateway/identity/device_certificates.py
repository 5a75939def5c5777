"""Device certificates: which device a client's TLS certificate names, verified by the gateway
itself (mitmproxy accepts any client certificate; the addon hands the chain here).

Once per connection, ``verify`` takes the DER chain as the client sent it. The path to a
configured CA is cryptography's X.509 client verification (signatures, validity of every
certificate, basic constraints, path length, name constraints); added here are what it leaves
to the application: the leaf's extended key usage must include clientAuth (cryptography accepts
a leaf without any), its key usage must allow digitalSignature when present, no certificate of
the path is revoked by a configured CRL that is current, and the certificate names exactly one
device where ``deviceName`` says. Every failure is a ``DeviceCertificate`` with the reason in
``problem``; nothing here raises for what a client sends. Per request, ``recheck`` is cheap:
still valid, and not revoked by the CRLs loaded now (a reload may have brought a new one).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from gateway.config.device_certificates import (
    SUBJECT_ATTRIBUTE_OIDS,
    DeviceCertificateSettings,
    DeviceNameSource,
    DeviceTrust,
)
from gateway.policy.model import DeviceCertificate, DeviceKey

MAX_CHAIN_CERTIFICATES = 8
MAX_CERTIFICATE_BYTES = 16 * 1024
UPN_OID = x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")  # Microsoft's user principal name otherName
GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
SERIAL_NUMBER = re.compile(r"^[\x21-\x7e](?:[\x20-\x7e]{0,62}[\x21-\x7e])?$")  # printable, at most 64
SOURCE_WORDS = {DeviceNameSource.san_uri: "SAN URI", DeviceNameSource.san_dns: "SAN DNS name",
                DeviceNameSource.san_email: "SAN email address", DeviceNameSource.san_upn: "SAN UPN",
                DeviceNameSource.subject: "subject attribute"}

type CrlKey = tuple[x509.Name, bytes]  # the CRL's issuer name and the public key that signed it


@dataclass(frozen=True, slots=True)
class RevokedSerials:
    """One CRL as the checks read it: when it holds, and its serials as a set (a lookup per
    request, where the CRL itself is searched entry by entry)."""

    last_update: datetime
    next_update: datetime | None
    serials: frozenset[int]

    @classmethod
    def of(cls, crl: x509.CertificateRevocationList) -> RevokedSerials:
        return cls(crl.last_update_utc, crl.next_update_utc, frozenset(entry.serial_number for entry in crl))


class DeviceCertificateVerifier:
    """One protected host's device certificate check, built from its settings and the CA
    certificates and CRLs read with the config (``gateway.config.device_certificates``)."""

    def __init__(self, settings: DeviceCertificateSettings, trust: DeviceTrust) -> None:
        self.settings = settings
        # None: no CA file could be read (a missing one: `check` and `run` refuse it); every certificate is refused
        self._store = Store(list(trust.authorities)) if trust.authorities else None
        self._authorities = trust.authorities
        self._crls: dict[CrlKey, list[RevokedSerials]] = {}
        for signed in trust.revocation_lists:  # each one's signature was checked when its file was read
            self._crls.setdefault((signed.signer.subject, _key_bytes(signed.signer)), []).append(
                RevokedSerials.of(signed.crl))
        self._crls_by_issuer_text: dict[str, list[RevokedSerials]] = {}
        for (issuer, _), lists in self._crls.items():
            self._crls_by_issuer_text.setdefault(issuer.rfc4514_string(), []).extend(lists)
        ee_policy = ExtensionPolicy.webpki_defaults_ee()
        if settings.device_name.from_ is DeviceNameSource.subject:  # the id is in the subject: no SAN needed
            ee_policy = ee_policy.may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
        self._ee_policy = ee_policy

    @property
    def authorities(self) -> tuple[x509.Certificate, ...]:
        """The configured CA certificates, each once (pyOpenSSL's ``Context.add_client_ca`` takes them)."""
        return tuple(dict.fromkeys(self._authorities))

    @property
    def acceptable_issuers(self) -> tuple[x509.Name, ...]:
        """The configured CAs' subject names, for the TLS CertificateRequest (clients offer only
        certificates issued under one of them)."""
        return tuple(dict.fromkeys(authority.subject for authority in self._authorities))

    def verify(self, chain: Sequence[bytes], now: datetime) -> DeviceCertificate:
        """The device ``chain`` (DER, leaf first, as the client sent it) names, or why none."""
        certificates = _parsed(chain)
        if isinstance(certificates, str):
            return DeviceCertificate(problem=certificates)
        leaf = certificates[0]
        try:
            described = _describe(leaf, chain[0])
        except ValueError as error:
            return DeviceCertificate(problem=f"the certificate cannot be read: {error}")
        for index, certificate in enumerate(certificates):
            try:
                certificate.extensions  # noqa: B018  (parsed lazily: a bad one would raise in the checks below)
            except ValueError:
                return replace(described, problem=f"certificate {index + 1} of the chain has an extension that "
                                                  "cannot be parsed")
        try:
            problem = self._problem(leaf, certificates[1:], _utc(now))
            if problem is not None:
                return replace(described, problem=problem)
            return self._device_named(leaf, described)
        except (ValueError, TypeError, UnsupportedAlgorithm) as error:  # what a parser may still find: refused
            return replace(described, problem=f"the certificate cannot be verified: {error}")

    def recheck(self, certificate: DeviceCertificate, now: datetime) -> str | None:
        """Per request, for a certificate verified when its connection began: why it no longer
        holds (expired since, or revoked by a CRL loaded since), or None."""
        if certificate.problem is not None:
            return certificate.problem
        now = _utc(now)
        if certificate.not_after is not None and now > certificate.not_after:
            return f"the certificate expired on {_when(certificate.not_after)}"
        try:
            serial = int(certificate.serial_number, 16)
        except ValueError:
            return "the certificate has no serial number to check"
        return _revoked(self._crls_by_issuer_text.get(certificate.issuer, []), serial, certificate.issuer, now,
                        "the certificate")

    def _problem(self, leaf: x509.Certificate, intermediates: list[x509.Certificate], now: datetime) -> str | None:
        problem = _leaf_problem(leaf, intermediates, now)
        if problem is not None:
            return problem
        if self._store is None:
            return "no device CA is available to verify it (a caFiles entry is missing)"
        policy = PolicyBuilder().store(self._store).time(now).extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=self._ee_policy)
        try:
            verified = policy.build_client_verifier().verify(leaf, intermediates)
        except VerificationError as error:
            return self._untrusted(leaf, intermediates, error)
        return self._revocation(verified.chain, now)

    def _untrusted(self, leaf: x509.Certificate, intermediates: list[x509.Certificate],
                   error: VerificationError) -> str:
        """Why no path to a configured CA was found, in words an operator can act on."""
        detail = str(error).split(" (encountered processing", 1)[0]
        issuer = leaf.issuer.rfc4514_string()
        if leaf.issuer == leaf.subject:
            return f"self-signed certificate ({issuer}): not issued by a configured device CA"
        if any(authority.subject == leaf.issuer for authority in self._authorities):
            return f"does not verify against the configured device CA {issuer} ({detail})"
        if any(intermediate.subject == leaf.issuer for intermediate in intermediates):
            return (f"issued by the intermediate CA {issuer}, which does not chain to a configured device CA "
                    f"(untrusted intermediate: {detail})")
        return f"issued by an unknown CA ({issuer}), not a configured device CA"

    def _revocation(self, path: Sequence[x509.Certificate], now: datetime) -> str | None:
        """Each certificate of the verified path but the trust anchor, against the CRLs its issuer signed."""
        for depth, (certificate, issuer) in enumerate(zip(path, path[1:], strict=False)):
            lists = self._crls.get((certificate.issuer, _key_bytes(issuer)), [])
            what = "the certificate" if depth == 0 else f"its issuing CA {certificate.subject.rfc4514_string()}"
            problem = _revoked(lists, certificate.serial_number, certificate.issuer.rfc4514_string(), now, what)
            if problem is not None:
                return problem
        return None

    def _device_named(self, leaf: x509.Certificate, described: DeviceCertificate) -> DeviceCertificate:
        name = self.settings.device_name
        words = SOURCE_WORDS[name.from_]
        key = name.key
        values: list[str] = []
        for raw in self._candidates(leaf):
            value = normalised_device_value(key, raw)
            if value is None:
                return replace(described, problem=f"its {words} {_short(raw)} is not a {key.value} "
                                                  f"({device_value_form(key)})")
            if value not in values:
                values.append(value)
        if not values:
            where = f"{words} starting with {name.prefix!r}" if name.prefix else (
                f"{words} {name.attribute.value}" if name.attribute else words)
            return replace(described, problem=f"names no device: it has no {where}")
        if len(values) > 1:
            return replace(described, problem=f"names two devices ({', '.join(values[:4])}): its {words}s disagree")
        return replace(described, device_key=key, device_value=values[0])

    def _candidates(self, leaf: x509.Certificate) -> list[str]:
        name = self.settings.device_name
        if name.from_ is DeviceNameSource.subject:
            assert name.attribute is not None  # the settings require it for from: subject
            return [str(attribute.value) for attribute in
                    leaf.subject.get_attributes_for_oid(SUBJECT_ATTRIBUTE_OIDS[name.attribute])]
        try:
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return []
        if name.from_ is DeviceNameSource.san_uri:
            prefix = (name.prefix or "").lower()
            return [uri[len(prefix):] for uri in san.get_values_for_type(x509.UniformResourceIdentifier)
                    if uri.lower().startswith(prefix)]
        if name.from_ is DeviceNameSource.san_dns:
            return list(san.get_values_for_type(x509.DNSName))
        if name.from_ is DeviceNameSource.san_email:
            return list(san.get_values_for_type(x509.RFC822Name))
        return [_utf8_string(other.value) for other in san.get_values_for_type(x509.OtherName)
                if other.type_id == UPN_OID]


def _parsed(chain: Sequence[bytes]) -> list[x509.Certificate] | str:
    """The chain's certificates, bounded in number and size, or why they cannot be read."""
    if not chain:
        return "no client certificate was presented"
    if len(chain) > MAX_CHAIN_CERTIFICATES:
        return f"the client sent {len(chain)} certificates; at most {MAX_CHAIN_CERTIFICATES} are accepted"
    certificates: list[x509.Certificate] = []
    for index, der in enumerate(chain):
        if len(der) > MAX_CERTIFICATE_BYTES:
            return f"certificate {index + 1} of the chain is larger than {MAX_CERTIFICATE_BYTES // 1024} KiB"
        try:
            certificates.append(x509.load_der_x509_certificate(bytes(der)))
        except ValueError:
            return f"certificate {index + 1} of the chain is not a DER X.509 certificate"
    return certificates


def _leaf_problem(leaf: x509.Certificate, intermediates: list[x509.Certificate], now: datetime) -> str | None:
    """What the leaf itself says against it, before any path is looked for."""
    if now < leaf.not_valid_before_utc:
        return f"the certificate is not yet valid: valid from {_when(leaf.not_valid_before_utc)}"
    if now > leaf.not_valid_after_utc:
        return f"the certificate expired on {_when(leaf.not_valid_after_utc)}"
    try:
        purposes = list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        purposes = []
    if ExtendedKeyUsageOID.CLIENT_AUTH not in purposes:
        listed = ", ".join(getattr(p, "_name", None) or p.dotted_string for p in purposes) or "none"
        return f"the certificate is not for client authentication (extended key usage: {listed})"
    try:
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.digital_signature:
        return "the certificate's key usage does not allow digitalSignature (a TLS client signs with its key)"
    for certificate in intermediates:
        if not _is_ca(certificate):
            return (f"the chain holds a second end-entity certificate ({certificate.subject.rfc4514_string()}): "
                    "a connection presents one device certificate")
    return None


def _revoked(lists: Sequence[RevokedSerials], serial: int, issuer: str, now: datetime, what: str) -> str | None:
    """Revoked by a current CRL of ``issuer``; with only stale CRLs, revocation cannot be told: refused."""
    current = [crl for crl in lists if crl.last_update <= now and (crl.next_update is None or now <= crl.next_update)]
    if lists and not current:
        latest = max((crl.next_update for crl in lists if crl.next_update is not None), default=None)
        expired = f" expired on {_when(latest)}" if latest is not None else " is not yet valid"
        return f"the CRL of {issuer}{expired}: revocation of {what} cannot be checked"
    if any(serial in crl.serials for crl in current):
        return f"{what} is revoked (serial {serial_hex(serial)}, CRL of {issuer})"
    return None


def _describe(leaf: x509.Certificate, der: bytes) -> DeviceCertificate:
    return DeviceCertificate(subject=leaf.subject.rfc4514_string(), issuer=leaf.issuer.rfc4514_string(),
                             serial_number=serial_hex(leaf.serial_number), sha256=hashlib.sha256(der).hexdigest(),
                             not_after=leaf.not_valid_after_utc)


def normalised_device_value(key: DeviceKey, raw: str) -> str | None:
    """A device id as the inventory keys it (GUIDs lower case; serial numbers trimmed, upper
    case), or None when ``raw`` is not one."""
    if key is DeviceKey.serial_number:
        value = raw.strip().upper()
        return value if SERIAL_NUMBER.match(value) else None
    value = raw.strip().lower()
    return value if GUID.match(value) else None


def device_value_form(key: DeviceKey) -> str:
    return "1 to 64 printable characters" if key is DeviceKey.serial_number else "a GUID"


def _utf8_string(der: bytes) -> str:
    """The UPN otherName's value: a DER UTF8String (tag 12, short or long length)."""
    if len(der) < 2 or der[0] != 0x0C:
        return ""
    length, start = der[1], 2
    if length & 0x80:
        size = length & 0x7F
        if not 1 <= size <= 2 or len(der) < 2 + size:
            return ""
        length, start = int.from_bytes(der[2:2 + size], "big"), 2 + size
    if len(der) != start + length:
        return ""
    return der[start:].decode("utf-8", errors="replace")


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        return certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (x509.ExtensionNotFound, ValueError):
        return False


def _key_bytes(certificate: x509.Certificate) -> bytes:
    return certificate.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)


def serial_hex(serial: int) -> str:
    text = format(serial, "X")
    return text.zfill(len(text) + len(text) % 2)


def _short(raw: str) -> str:
    return repr(raw if len(raw) <= 80 else raw[:77] + "...")


def _utc(now: datetime) -> datetime:
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
