"""The upstream identity assertion: a short-lived JWT the gateway signs for every request it
forwards, so that a backend can trust who is calling (user, app, device and what the decision
saw of it) by checking one ES256 signature against the gateway's published JWKS, without
validating the user's token or asking the device inventory again.

The key is the gateway's own (never the identity provider's): a P-256 private key in a PEM file,
made once with mode 0600. ``kid`` is its RFC 7638 thumbprint. One assertion, as a backend sees it::

    header  {"alg": "ES256", "typ": "portcullis-assertion+jwt", "kid": "<thumbprint>"}
    claims  {"iss": "https://portcullis.contoso.test", "aud": "https://exchange.corp.contoso.test",
             "iat": 1795456811, "nbf": 1795456811, "exp": 1795456871,
             "jti": "<correlation id>", "decisionId": "<correlation id>",
             "sub": "...", "oid": "...", "tid": "...", "upn": "alex@contoso.test",
             "azp": "27922004-...", "app_displayname": "outlook-mobile",
             "deviceid": "3c5f0b1e-...", "isManaged": true, "compliance": "compliant",
             "complianceState": "compliant", "threatLevel": "low"}

``aud`` is the protected host's upstream URL, so an assertion for one backend does not open
another. Claims with no value (no device, an unknown threat level) are left out, as Entra leaves
``deviceid`` out of tokens for unregistered devices.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from jwt.algorithms import ECAlgorithm

from gateway.config import Config
from gateway.errors import ConfigError, ConfigProblem
from gateway.identity.tokens import RejectedToken
from gateway.policy.compliance import is_compliant
from gateway.policy.model import ClientApp, DeviceSignals, Identity
from gateway.state_files import warn_if_readable_by_others, write_once

ALGORITHM = "ES256"
TOKEN_TYPE = "portcullis-assertion+jwt"  # noqa: S105  (a JWT typ, RFC 8725 3.11: not an access token)
KEY_FILE = "assertion-key.pem"
JWKS_PATH = "/.well-known/jwks.json"
DEFAULT_ISSUER = "portcullis"
REQUIRED_CLAIMS = ["iss", "aud", "exp", "nbf", "iat", "jti", "sub"]


class AssertionSigner:
    """Signs one assertion per forwarded request: one ECDSA P-256 signature (about 35 µs) and the
    JWS compact form written here (PyJWT's encode took 94 µs in all, 60 of them around the
    signature); backends verify it with any JWT library (``verify_assertion`` uses PyJWT)."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, *, issuer: str, header: str,
                 lifetime_seconds: int) -> None:
        self._key = key
        self.issuer = issuer
        self.header = header
        self.lifetime_seconds = lifetime_seconds
        self.public_jwk = public_jwk(key.public_key())
        self.kid = self.public_jwk["kid"]
        self._header_segment = _base64url(_compact_json({"alg": ALGORITHM, "kid": self.kid, "typ": TOKEN_TYPE}))

    def sign(self, *, audience: str, identity: Identity, app: ClientApp, device: DeviceSignals,
             decision_id: str, now: datetime) -> str:
        """``device`` is what the decision used (a kiosk request has none, whatever its token says)."""
        issued = int(now.timestamp())
        record = device.device
        claims: dict[str, Any] = {
            "iss": self.issuer, "aud": audience, "iat": issued, "nbf": issued,
            "exp": issued + self.lifetime_seconds, "jti": decision_id, "decisionId": decision_id,
            "sub": identity.subject, "oid": identity.object_id, "tid": identity.tenant_id,
            "upn": identity.user_principal_name, "azp": app.client_id, "app_displayname": app.name,
            "deviceid": device.device_id, "isManaged": record is not None,
            "compliance": "compliant" if is_compliant(record, now, device.compliance) else "notCompliant",
            "complianceState": record.compliance_state.value if record else None,
            "threatLevel": record.threat_level.value if record and record.threat_level else None,
        }
        signing_input = self._header_segment + b"." + _base64url(
            _compact_json({k: v for k, v in claims.items() if v is not None}))
        r, s = decode_dss_signature(self._key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        return (signing_input + b"." + _base64url(r.to_bytes(32) + s.to_bytes(32))).decode("ascii")  # RFC 7518 3.4

    def jwks(self) -> dict[str, Any]:
        """The public JWKS document backends verify assertions with."""
        return {"keys": [dict(self.public_jwk)]}


def _compact_json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _base64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def public_jwk(public_key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    jwk: dict[str, str] = ECAlgorithm.to_jwk(public_key, as_dict=True)  # an EC key's members are strings
    required = {name: jwk[name] for name in ("crv", "kty", "x", "y")}
    return {**required, "kid": thumbprint(required), "use": "sig", "alg": ALGORITHM}


def thumbprint(required_members: Mapping[str, str]) -> str:
    """RFC 7638: SHA-256 over the required members, sorted, with no whitespace; base64url."""
    canonical = json.dumps(dict(sorted(required_members.items())), separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()


def load_or_create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The key in ``path``, made on first use. Several workers may start at once: the file is
    written under a private name and linked into place, so each reads a whole key, the same one."""
    _create_key(path)
    warn_if_readable_by_others(path)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("not a P-256 EC private key (ES256)")
    return key


def _create_key(path: Path) -> None:
    write_once(path, lambda: ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def assertion_issuer(config: Config) -> str:
    service_host = config.gateway_file.gateway.service_host
    return f"https://{service_host}" if service_host else DEFAULT_ISSUER


def assertion_key_path(config: Config) -> Path:
    settings = config.gateway_file.upstream_assertion
    if settings.key_file is not None:
        return config.path(settings.key_file)
    return config.path(config.gateway_file.gateway.state_dir) / KEY_FILE


def assertion_signer(config: Config) -> AssertionSigner | None:
    """The signer ``upstreamAssertion`` describes, or None when it is turned off."""
    settings = config.gateway_file.upstream_assertion
    if not settings.enabled:
        return None
    path = assertion_key_path(config)
    try:
        key = load_or_create_key(path)
    except (OSError, ValueError) as error:
        raise ConfigError([ConfigProblem(str(path), None, None, "upstreamAssertion.keyFile",
                                         f"cannot use the assertion signing key: {error}")]) from error
    return AssertionSigner(key, issuer=assertion_issuer(config), header=settings.header,
                           lifetime_seconds=settings.lifetime_seconds)


def verify_assertion(token: str, jwks: Mapping[str, Any], *, audience: str, issuer: str,
                     leeway: float = 5) -> dict[str, Any] | RejectedToken:
    """What a backend does with the header: the claims, or why they cannot be trusted."""
    try:
        header = jwt.get_unverified_header(token)
        if header.get("typ") != TOKEN_TYPE:
            return RejectedToken("not a Portcullis assertion")
        keys = {k.key_id: k for k in jwt.PyJWKSet.from_dict(dict(jwks)).keys}
        key = keys.get(header.get("kid"))
        if key is None:
            return RejectedToken("unknown signing key")
        return jwt.decode(token, key.key, algorithms=[ALGORITHM], audience=audience, issuer=issuer, leeway=leeway,
                          options={"require": REQUIRED_CLAIMS})
    except jwt.PyJWTError as error:
        return RejectedToken(f"assertion rejected: {error}")
