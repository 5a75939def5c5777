"""Bearer access token validation with pyjwt: signature by a key from the issuer's JWKS, exact
``iss``, ``aud`` among those of the protected host, ``exp``/``nbf`` with a small leeway, and an
algorithm from the pinned list. Verified tokens are cached until their ``exp``, keyed by the
whole token and the audiences asked for.

Stricter than pyjwt on purpose, checked before any key is looked up (so a hostile header never
costs a JWKS fetch) and in ``header_problem``/``claims_problem`` so that ``portcullis replay`` can
apply the same rules:

- Only a JWS in compact form: three base64url segments without padding (pyjwt accepts a padded
  signature: one token, two spellings), so a JWE (five segments) or a two- or four-part token is
  ``malformed`` before its header is read.
- The token's issuer is the trusted issuer whose ``iss`` it names exactly, read from the strictly
  parsed claims before any key is looked up (``gateway.identity.issuers``): an unknown ``iss``
  never costs a fetch, and only that issuer's algorithms, keys, audiences, tenants and claim names
  apply to it.
- Keys come from the token's issuer's JWKS and nowhere else. A token whose header names a key
  of its own (``jwk``, ``jku``, ``x5u``, ``x5c``) is refused, even when the issuer's key signed it:
  Entra never sends them, and pyjwt would never use them, so such a token is either forged or not
  Entra's; refusing it (rather than ignoring the fields) makes the probe visible in the decision
  log and keeps a later library that honours them from ever being reached. ``x5t``/``kid`` only
  select among the issuer's own keys and stay allowed.
- No ``crit`` (nor RFC 7797 ``b64``) and no ``cty``: Entra uses no critical extension and never
  nests tokens. ``typ`` is absent, ``JWT`` or ``at+jwt`` (RFC 9068, with or without
  ``application/``, any case): anything else (``dpop+jwt``, ``logout+jwt``, a Portcullis
  assertion...) is another kind of token.
- ``kid``: a string of 1 to 256 visible ASCII characters (no NUL, no control or non-ASCII
  characters). Other strings (``../../etc/passwd``, SQL, URLs) are only ever a dictionary key;
  an unknown one costs at most one JWKS fetch per ``jwksRefreshMinIntervalSeconds``.
- ``aud`` is one string, as Entra issues it. A list is refused even when it names this host's
  audience: a token meant for several resources could be replayed by any of them to the others.
- Header and claims are each one JSON object read one way only (``gateway.http.strict_json``): UTF-8
  without a byte-order mark, no member named twice, bounded nesting. pyjwt reads the claims with
  ``json.loads``, which guesses UTF-16 or UTF-32 and keeps the last of two ``azp``, ``sub`` or
  ``deviceid``: the gateway forwards the token, and an upstream keeping the first would see
  another app, user or device. Checked before any key is looked up, so the one reading pyjwt then
  makes is the strict reader's.
- ``exp`` and ``iat`` (both required: RFC 9068 §2.2), ``nbf`` and ``auth_time`` are JSON numbers
  (floats allowed, as RFC 7519 NumericDate; never strings, booleans, null, NaN, before 1970 or
  after 9999), where pyjwt accepts anything ``int()`` takes (``"9999999999"``, ``true``).
- An access token never carries ``nonce``: that is an OIDC ID token (whose ``aud`` is a client
  id, not a resource), and one must not open a protected host. The ID token path checks its
  own nonce instead.
- ECDSA (when pinned): raw ``r||s`` of the curve's size only (pyjwt); a DER signature, a wrong
  length or ``r = s = 0`` fails verification. A high-S signature is accepted: JWS does not
  require low-S, and nothing here relies on a token having one spelling (the cache of verified
  tokens just verifies a malleated copy again, to the same identity).
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import time
from dataclasses import dataclass

import jwt
from cachetools import TLRUCache

from gateway.config.models import ClaimSettings, IdentitySettings, IssuerSettings
from gateway.http.strict_json import DuplicateMember, JsonRefused, NotUtf8Json
from gateway.http.strict_json import loads as strict_json
from gateway.identity.issuers import (
    ISSUER_NOT_ACCEPTED,
    TrustedIssuer,
    TrustedIssuers,
    accepted_audiences,
    tenant_problem,
)
from gateway.policy.model import Identity

MAX_TOKEN_BYTES = 16 * 1024
MAX_KID_LENGTH = 256
CACHE_SIZE = 10_000
REQUIRED_CLAIMS = ["exp", "iat", "iss", "aud", "sub"]
TOKEN68 = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
JWS_COMPACT = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")  # an empty signature: alg none
KID = re.compile(r"^[\x21-\x7e]+$")
KEY_IN_TOKEN_HEADERS = ("jwk", "jku", "x5u", "x5c")
ACCEPTED_TYPES = frozenset({"jwt", "at+jwt", "application/jwt", "application/at+jwt"})
TIME_CLAIMS = ("exp", "nbf", "iat", "auth_time")
MAX_NUMERIC_DATE = 253402300799  # 9999-12-31T23:59:59Z: the last second a datetime can hold

MALFORMED = "malformed token"
ALGORITHM_NOT_ALLOWED = "signing algorithm not allowed"
SELF_NAMED_KEY = "token names its own signing key"  # a reason, not a secret
CRITICAL_EXTENSION = "token uses an unsupported critical header"
TYPE_NOT_ACCEPTED = "token type not accepted"
AUDIENCE_NOT_ACCEPTED = "token audience not accepted for this host"
ID_TOKEN_PRESENTED = "an ID token is not an access token"  # noqa: S105  (a reason)
CLAIMS_NOT_UTF8 = "token claims are not UTF-8 JSON"
CLAIM_NAMED_TWICE = "token claims name a member twice"


@dataclass(frozen=True, slots=True)
class RejectedToken:
    """Why a request has no valid identity. ``reason`` goes into the 401 and the decision log."""

    reason: str
    presented: bool = True  # False: no credentials at all (RFC 6750 §3.1: the challenge names no error)


CONTEXT_ID = re.compile(r"c(?:[1-9]|[1-9][0-9])")  # Entra: c1 to c99
MAX_CONTEXTS = 99


def bearer_token(authorization_values: list[str]) -> str | RejectedToken:
    """RFC 6750: exactly one ``Authorization: Bearer <token>``; the scheme is case-insensitive."""
    if not authorization_values:
        return RejectedToken("no bearer token", presented=False)
    if len(authorization_values) > 1:
        return RejectedToken("more than one Authorization header")
    scheme, _, token = authorization_values[0].strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer":  # another scheme is no bearer credential (RFC 6750 §3.1)
        return RejectedToken("Authorization is not a bearer token", presented=False)
    if not token:  # an empty Bearer: a client discovering where to sign in (MS-OAUTH2EX)
        return RejectedToken("empty bearer token", presented=False)
    if len(token) > MAX_TOKEN_BYTES:
        return RejectedToken("token too large")
    if not TOKEN68.match(token):
        return RejectedToken(MALFORMED)
    return token


def unverified_header(token: str) -> dict[str, object] | None:
    """The JOSE header of a compact JWS, or None when the token is not one. Decoded here rather
    than by pyjwt so that every refusal has a reason of ours, before any key is looked up."""
    if not JWS_COMPACT.match(token):
        return None
    try:
        header = _segment_json(token.split(".", 1)[0])
    except (binascii.Error, JsonRefused):
        return None
    return header if isinstance(header, dict) else None


def claims_segment_problem(token: str) -> str | None:
    """Why the claims of a token that passed ``unverified_header`` have no single reading (see the
    module docstring). pyjwt reads them again once the signature is checked, the same way."""
    claims = unverified_claims(token)
    return claims if isinstance(claims, str) else None


def unverified_claims(token: str) -> dict[str, object] | str:
    """The claims of a token that passed ``unverified_header``, read the one strict way, or why
    they cannot be: what names the issuer whose keys may then verify it."""
    try:
        claims = _segment_json(token.split(".", 2)[1])
    except NotUtf8Json:
        return CLAIMS_NOT_UTF8
    except DuplicateMember:
        return CLAIM_NAMED_TWICE
    except (binascii.Error, JsonRefused):
        return MALFORMED
    return claims if isinstance(claims, dict) else MALFORMED


def _segment_json(segment: str) -> object:
    return strict_json(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


def header_problem(header: dict[str, object], algorithms: set[str] | frozenset[str]) -> str | None:
    """Why this header cannot be an issuer's access or ID token (see the module docstring)."""
    algorithm = header.get("alg")
    if not isinstance(algorithm, str) or algorithm not in algorithms:
        return ALGORITHM_NOT_ALLOWED
    if any(name in header for name in KEY_IN_TOKEN_HEADERS):
        return SELF_NAMED_KEY
    if "crit" in header or "b64" in header:
        return CRITICAL_EXTENSION
    kind = header.get("typ", "JWT")
    if "cty" in header or not isinstance(kind, str) or kind.lower() not in ACCEPTED_TYPES:
        return TYPE_NOT_ACCEPTED
    return None


def kid_problem(header: dict[str, object]) -> str | None:
    """A ``kid`` that cannot name one of the issuer's keys is never looked up."""
    kid = header.get("kid")
    if "kid" in header and not isinstance(kid, str):
        return MALFORMED  # as pyjwt says of it
    if not isinstance(kid, str) or len(kid) > MAX_KID_LENGTH or not KID.match(kid):
        return "token has no usable kid"
    return None


def claims_problem(claims: dict[str, object], *, access_token: bool) -> str | None:
    """What pyjwt lets through and Entra never issues: time claims that are not numbers, an
    ``aud`` list, an ID token's ``nonce`` in an access token."""
    for claim in TIME_CLAIMS:
        if claim in claims and not _numeric_date(claims[claim]):
            return f"token has a malformed {claim!r} claim"
    if not isinstance(claims.get("aud"), str):
        return AUDIENCE_NOT_ACCEPTED
    if access_token and "nonce" in claims:
        return ID_TOKEN_PRESENTED
    return None


def _numeric_date(value: object) -> bool:
    """RFC 7519 NumericDate: a JSON number (``bool`` is an ``int`` in Python, not in JSON)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) \
        and 0 <= value <= MAX_NUMERIC_DATE


class BearerValidator:
    def __init__(self, settings: IdentitySettings, issuers: TrustedIssuers) -> None:
        self.issuers = issuers
        self._leeway = settings.clock_skew_seconds
        self.cache_hits = self.cache_misses = 0
        self._verified: TLRUCache[tuple[str, frozenset[str]], Identity] = TLRUCache(
            maxsize=CACHE_SIZE, ttu=_until_exp, timer=time.time
        )

    def use(self, settings: IdentitySettings) -> list[TrustedIssuer]:
        """Trust exactly the issuers of ``settings`` from the next token on (a reload); tokens
        verified before are verified again. Returns the issuers whose keys are new."""
        new = self.issuers.use(settings)
        self._verified.clear()
        return new

    async def validate(self, token: str, audiences: frozenset[str]) -> Identity | RejectedToken:
        """Raises SignalUnavailable only when no signing key of the token's issuer can be had."""
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

    async def validate_id_token(self, token: str, client_id: str, nonce: str,
                                issuer: str | None = None) -> Identity | RejectedToken:
        """An OIDC ID token from the code flow: the issuer's signature, ``aud`` = our client id,
        the ``nonce`` we sent; with ``issuer`` (a name), from that issuer only. Never cached."""
        signing = await self._signing_key(token)
        if isinstance(signing, RejectedToken):
            return signing
        if issuer is not None and signing[2].name != issuer:
            return RejectedToken(ISSUER_NOT_ACCEPTED)
        return self._decode(token, *signing, frozenset({client_id}), nonce=nonce, narrow=False)

    async def _signing_key(self, token: str) -> tuple[jwt.PyJWK, str, TrustedIssuer] | RejectedToken:
        """The token's issuer's key for its pinned algorithm and ``kid``, read from an unverified
        header that passed ``header_problem`` first, of a token whose claims read one way only and
        name a trusted issuer: a hostile header or claims segment, or an unknown ``iss``, never
        reaches a JWKS."""
        header = unverified_header(token)
        if header is None:
            return RejectedToken(MALFORMED)
        claims = unverified_claims(token)
        trusted = self.issuers.of(claims.get("iss")) if isinstance(claims, dict) else None
        algorithms = trusted.algorithms if trusted is not None else self.issuers.algorithms
        problem = header_problem(header, algorithms) or kid_problem(header) or \
            (claims if isinstance(claims, str) else None)
        if problem is not None:
            return RejectedToken(problem)
        if trusted is None:
            return RejectedToken(ISSUER_NOT_ACCEPTED)
        algorithm, kid = str(header["alg"]), str(header["kid"])
        key = await trusted.keys.key(kid, algorithm)
        if key is None:
            return RejectedToken("unknown signing key")
        return key, algorithm, trusted

    def _decode(self, token: str, key: jwt.PyJWK, algorithm: str, trusted: TrustedIssuer, audiences: frozenset[str],
                nonce: str | None = None, *, narrow: bool = True) -> Identity | RejectedToken:
        settings = trusted.settings
        accepted = accepted_audiences(settings, audiences) if narrow else audiences
        if not accepted:
            return RejectedToken(AUDIENCE_NOT_ACCEPTED)
        claims = self._verified_claims(token, key, algorithm, settings, accepted)
        if isinstance(claims, RejectedToken):
            return claims
        problem = claims_problem(claims, access_token=nonce is None) or tenant_problem(settings, claims)
        if problem is not None:
            return RejectedToken(problem)
        if nonce is not None and claims.get("nonce") != nonce:
            return RejectedToken("nonce does not match")
        return identity_from_claims(claims, accepted, settings)

    def _verified_claims(self, token: str, key: jwt.PyJWK, algorithm: str, settings: IssuerSettings,
                         audiences: frozenset[str]) -> dict[str, object] | RejectedToken:
        """pyjwt's checks: signature, ``iss`` among the issuer's, ``aud``, times, required claims."""
        try:
            claims: dict[str, object] = jwt.decode(
                token,
                key=key,
                algorithms=[algorithm],
                audience=sorted(audiences),
                issuer=list(settings.issued_as),
                leeway=self._leeway,
                options={"require": REQUIRED_CLAIMS, "strict_aud": False},
            )
        except jwt.ExpiredSignatureError:
            return RejectedToken("token expired")
        except jwt.ImmatureSignatureError:
            return RejectedToken("token not yet valid")
        except jwt.InvalidAudienceError:
            return RejectedToken(AUDIENCE_NOT_ACCEPTED)
        except jwt.InvalidIssuerError:
            return RejectedToken(ISSUER_NOT_ACCEPTED)
        except jwt.InvalidSignatureError:
            return RejectedToken("token signature invalid")
        except jwt.MissingRequiredClaimError as error:
            return RejectedToken(f"token has no {error.claim!r} claim")
        except jwt.InvalidTokenError:
            return RejectedToken(MALFORMED)
        return claims


def identity_from_claims(claims: dict[str, object], audiences: frozenset[str],
                         issuer: IssuerSettings | None = None) -> Identity:
    """The claims where the issuer puts them (``identity.issuers[].claims``); Entra's by default:
    ``azp`` (v2) or ``appid`` (v1) is the client app, ``deviceid`` the device."""
    aud, exp = claims["aud"], claims["exp"]
    assert isinstance(aud, str) and isinstance(exp, int | float)  # claims_problem checked both
    names = issuer.claims if issuer is not None else DEFAULT_CLAIMS
    groups = next((claims[name] for name in names.groups if isinstance(claims.get(name), list)), None)
    amr = claims.get("amr")
    roles = claims.get("roles")
    return Identity(
        subject=str(claims["sub"]),
        user_principal_name=_first_text(claims, names.user_name),
        object_id=_text(claims.get("oid")),
        tenant_id=_text(claims.get("tid")),
        client_id=(_first_text(claims, names.client_id) or "").lower() or None,
        device_id=(_first_text(claims, names.device_id) or "").lower() or None,
        groups=frozenset(g for g in groups if isinstance(g, str)) if isinstance(groups, list) else frozenset(),
        audience=aud if aud in audiences else "",
        expires_at=float(exp),
        authentication_methods=(frozenset(m for m in amr if isinstance(m, str))
                                if isinstance(amr, list) else frozenset()),
        authentication_context=_text(claims.get("acr")),
        authentication_contexts=_contexts(claims.get("acrs")),
        authenticated_at=float(auth_time) if isinstance(auth_time := claims.get("auth_time"), int | float) else None,
        issued_at=float(iat) if isinstance(iat := claims.get("iat"), int | float) else None,
        roles=frozenset(r for r in roles if isinstance(r, str)) if isinstance(roles, list) else frozenset(),
        issuer=issuer.name if issuer is not None else None,
    )


DEFAULT_CLAIMS = ClaimSettings()


def _first_text(claims: dict[str, object], names: list[str]) -> str | None:
    """The first of ``names`` the token carries as a non-empty string."""
    return next((text for name in names if (text := _text(claims.get(name))) is not None), None)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _until_exp(_key: object, identity: Identity, _now: float) -> float:
    return identity.expires_at


def _contexts(value: object) -> frozenset[str]:
    """Entra's ``acrs``: a list of authentication context ids; anything else names none."""
    if not isinstance(value, list):
        return frozenset()
    return frozenset(item for item in value[:MAX_CONTEXTS] if isinstance(item, str) and CONTEXT_ID.fullmatch(item))
