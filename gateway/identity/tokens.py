"""Bearer access token validation with pyjwt: signature by a key from the issuer's JWKS, exact
``iss``, ``aud`` among those of the protected host, ``exp``/``nbf`` with a small leeway, and an
algorithm from the pinned list. Verified tokens are cached until their ``exp``, keyed by the
whole token and the audiences asked for.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import jwt
from cachetools import TLRUCache

from gateway.config.models import IdentitySettings
from gateway.identity.jwks import JwksCache
from gateway.policy.model import Identity

MAX_TOKEN_BYTES = 16 * 1024
MAX_KID_LENGTH = 256
CACHE_SIZE = 10_000
REQUIRED_CLAIMS = ["exp", "iss", "aud", "sub"]
TOKEN68 = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")


@dataclass(frozen=True, slots=True)
class RejectedToken:
    """Why a request has no valid identity. ``reason`` goes into the 401 and the decision log."""

    reason: str


def bearer_token(authorization_values: list[str]) -> str | RejectedToken:
    """RFC 6750: exactly one ``Authorization: Bearer <token>``; the scheme is case-insensitive."""
    if not authorization_values:
        return RejectedToken("no bearer token")
    if len(authorization_values) > 1:
        return RejectedToken("more than one Authorization header")
    scheme, _, token = authorization_values[0].strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return RejectedToken("Authorization is not a bearer token")
    if len(token) > MAX_TOKEN_BYTES:
        return RejectedToken("token too large")
    if not TOKEN68.match(token):
        return RejectedToken("malformed token")
    return token


class BearerValidator:
    def __init__(self, settings: IdentitySettings, jwks: JwksCache) -> None:
        self._issuer = settings.issuer
        self._algorithms = {a.value for a in settings.algorithms}
        self._leeway = settings.clock_skew_seconds
        self._jwks = jwks
        self.cache_hits = self.cache_misses = 0
        self._verified: TLRUCache[tuple[str, frozenset[str]], Identity] = TLRUCache(
            maxsize=CACHE_SIZE, ttu=_until_exp, timer=time.time
        )

    async def validate(self, token: str, audiences: frozenset[str]) -> Identity | RejectedToken:
        """Raises SignalUnavailable only when no signing key can be had at all."""
        cache_key = (token, audiences)
        cached = self._verified.get(cache_key)
        if cached is not None:
            self.cache_hits += 1
            return cached
        self.cache_misses += 1
        signing = await self._signing_key(token)
        if isinstance(signing, RejectedToken):
            return signing
        result = self._decode(token, *signing, audiences)
        if isinstance(result, Identity):
            self._verified[cache_key] = result
        return result

    async def validate_id_token(self, token: str, client_id: str, nonce: str) -> Identity | RejectedToken:
        """An OIDC ID token from the code flow: the issuer's signature, ``aud`` = our client id,
        the ``nonce`` we sent. Never cached: each is used once."""
        signing = await self._signing_key(token)
        if isinstance(signing, RejectedToken):
            return signing
        return self._decode(token, *signing, frozenset({client_id}), nonce=nonce)

    async def _signing_key(self, token: str) -> tuple[jwt.PyJWK, str] | RejectedToken:
        """The issuer's key for this token's pinned algorithm and ``kid``, read from an unverified header."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            return RejectedToken("malformed token")
        algorithm, kid = header.get("alg"), header.get("kid")
        if not isinstance(algorithm, str) or algorithm not in self._algorithms:
            return RejectedToken("signing algorithm not allowed")
        if not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID_LENGTH:
            return RejectedToken("token has no usable kid")
        key = await self._jwks.key(kid, algorithm)
        if key is None:
            return RejectedToken("unknown signing key")
        return key, algorithm

    def _decode(
        self, token: str, key: jwt.PyJWK, algorithm: str, audiences: frozenset[str], nonce: str | None = None
    ) -> Identity | RejectedToken:
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[algorithm],
                audience=sorted(audiences),
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": REQUIRED_CLAIMS, "strict_aud": False},
            )
        except jwt.ExpiredSignatureError:
            return RejectedToken("token expired")
        except jwt.ImmatureSignatureError:
            return RejectedToken("token not yet valid")
        except jwt.InvalidAudienceError:
            return RejectedToken("token audience not accepted for this host")
        except jwt.InvalidIssuerError:
            return RejectedToken("token issuer not accepted")
        except jwt.InvalidSignatureError:
            return RejectedToken("token signature invalid")
        except jwt.MissingRequiredClaimError as error:
            return RejectedToken(f"token has no {error.claim!r} claim")
        except jwt.InvalidTokenError:
            return RejectedToken("malformed token")
        if nonce is not None and claims.get("nonce") != nonce:
            return RejectedToken("nonce does not match")
        return identity_from_claims(claims, audiences)


def identity_from_claims(claims: dict[str, object], audiences: frozenset[str]) -> Identity:
    """Entra's claim names: ``azp`` (v2) or ``appid`` (v1) is the client app, ``deviceid`` the device."""
    aud = claims["aud"]
    matched = next(iter(sorted(audiences & ({aud} if isinstance(aud, str) else set(aud)))), "")  # type: ignore[arg-type]  (JSON)
    groups = claims.get("groups")
    amr = claims.get("amr")
    roles = claims.get("roles")
    return Identity(
        subject=str(claims["sub"]),
        user_principal_name=_text(claims.get("upn")) or _text(claims.get("preferred_username")),
        object_id=_text(claims.get("oid")),
        tenant_id=_text(claims.get("tid")),
        client_id=(_text(claims.get("azp")) or _text(claims.get("appid")) or "").lower() or None,
        device_id=(_text(claims.get("deviceid")) or "").lower() or None,
        groups=frozenset(g for g in groups if isinstance(g, str)) if isinstance(groups, list) else frozenset(),
        audience=matched,
        expires_at=float(claims["exp"]),  # type: ignore[arg-type]  (required and checked numeric by pyjwt)
        authentication_methods=(frozenset(m for m in amr if isinstance(m, str))
                                if isinstance(amr, list) else frozenset()),
        authentication_context=_text(claims.get("acr")),
        authenticated_at=float(claims["auth_time"]) if isinstance(claims.get("auth_time"), int | float) else None,
        issued_at=float(claims["iat"]) if isinstance(claims.get("iat"), int | float) else None,
        roles=frozenset(r for r in roles if isinstance(r, str)) if isinstance(roles, list) else frozenset(),
    )


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _until_exp(_key: object, identity: Identity, _now: float) -> float:
    return identity.expires_at
