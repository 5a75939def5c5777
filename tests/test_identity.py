"""Bearer validation against a real issuer app (the demo issuer, over httpx's ASGI transport):
real RSA keys, real signatures, and the JWKS refresh rules."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.config.models import IdentitySettings
from gateway.errors import SignalUnavailable
from gateway.identity.issuers import TrustedIssuers
from gateway.identity.jwks import JwksCache
from gateway.identity.tokens import BearerValidator, RejectedToken
from gateway.policy.model import Identity
from gateway.web.demo_idp import DemoIdentityProvider
from tests.helpers.tokens import Clock

ISSUER = "http://127.0.0.1:9/contoso"
AUDIENCES = frozenset({"00000002-0000-0ff1-ce00-000000000000"})


class CountingTransport(httpx.AsyncBaseTransport):
    """The issuer's real Starlette app, with a count of JWKS fetches."""

    def __init__(self, idp: DemoIdentityProvider) -> None:
        self.inner = httpx.ASGITransport(app=idp.app())
        self.jwks_fetches = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/discovery/keys"):
            self.jwks_fetches += 1
        return await self.inner.handle_async_request(request)


def validator_for(idp: DemoIdentityProvider, clock: Clock | None = None,
                  algorithms: tuple[str, ...] = ("RS256",)) -> tuple[BearerValidator, CountingTransport]:
    transport = CountingTransport(idp)
    settings = IdentitySettings.model_validate_json(
        json.dumps({"issuer": ISSUER, "algorithms": list(algorithms)}), strict=True)
    jwks = JwksCache(ISSUER, cache_seconds=3600, min_refresh_interval=30, timeout=5,
                     timer=clock or Clock(), transport=transport)
    return BearerValidator(settings, TrustedIssuers.with_keys(settings, jwks)), transport


def mint(idp: DemoIdentityProvider, **extra: object) -> str:
    return idp.mint(user="alex@contoso.test", client_id="27922004-5251-4030-B22D-91ECD9A37EA4",
                    audience="00000002-0000-0ff1-ce00-000000000000", device_id="3C5F0B1E", extra=extra or None)


def test_valid_token_gives_entra_identity() -> None:
    idp = DemoIdentityProvider(ISSUER)
    validator, _ = validator_for(idp)
    identity = asyncio.run(validator.validate(mint(idp, groups=["finance", 7]), AUDIENCES))
    assert isinstance(identity, Identity)
    assert identity.user_principal_name == "alex@contoso.test"
    assert identity.client_id == "27922004-5251-4030-b22d-91ecd9a37ea4"
    assert identity.device_id == "3c5f0b1e"
    assert identity.groups == frozenset({"finance"})


def test_v1_appid_claim_names_the_client_app() -> None:
    idp = DemoIdentityProvider(ISSUER)
    validator, _ = validator_for(idp)
    token = jwt.encode({**jwt.decode(mint(idp), options={"verify_signature": False}), "azp": None,
                        "appid": "5d661950-3475-41cd-a2c3-d671a3162bc1"}, idp.key, algorithm="RS256",
                       headers={"kid": idp.kid})
    identity = asyncio.run(validator.validate(token, AUDIENCES))
    assert isinstance(identity, Identity) and identity.client_id == "5d661950-3475-41cd-a2c3-d671a3162bc1"


def test_wrong_issuer_is_rejected() -> None:
    idp = DemoIdentityProvider(ISSUER)
    validator, _ = validator_for(idp)
    assert asyncio.run(validator.validate(mint(idp, iss="http://127.0.0.1:9/evil"), AUDIENCES)) == \
        RejectedToken("token issuer not accepted")


@pytest.mark.parametrize("claim", ["exp", "sub", "aud"])
def test_required_claims_must_be_present(claim: str) -> None:
    idp = DemoIdentityProvider(ISSUER)
    validator, _ = validator_for(idp)
    claims = jwt.decode(mint(idp), options={"verify_signature": False})
    del claims[claim]
    token = jwt.encode(claims, idp.key, algorithm="RS256", headers={"kid": idp.kid})
    assert asyncio.run(validator.validate(token, AUDIENCES)) == RejectedToken(f"token has no {claim!r} claim")


def test_unknown_kid_storm_refetches_jwks_at_most_once_per_interval() -> None:
    idp = DemoIdentityProvider(ISSUER)
    clock = Clock()
    validator, transport = validator_for(idp, clock)

    async def storm() -> list[Identity | RejectedToken]:
        assert isinstance(await validator.validate(mint(idp), AUDIENCES), Identity)
        forged = [jwt.encode({"sub": "x", "iss": ISSUER}, idp.key, algorithm="RS256", headers={"kid": f"kid-{i}"})
                  for i in range(50)]
        return [await validator.validate(t, AUDIENCES) for t in forged]

    results = asyncio.run(storm())
    assert all(r == RejectedToken("unknown signing key") for r in results)
    assert transport.jwks_fetches == 1


def test_rotated_key_is_picked_up_after_the_refresh_interval() -> None:
    idp = DemoIdentityProvider(ISSUER)
    clock = Clock()
    validator, transport = validator_for(idp, clock)

    async def rotate() -> tuple[object, object]:
        await validator.validate(mint(idp), AUDIENCES)
        old_key, old_kid = idp.key, idp.kid
        idp.key, idp.kid = DemoIdentityProvider(ISSUER).key, "rotated"
        early = await validator.validate(mint(idp), AUDIENCES)
        clock.now += 31
        later = await validator.validate(mint(idp), AUDIENCES)
        idp.key, idp.kid = old_key, old_kid
        return early, later

    early, later = asyncio.run(rotate())
    assert early == RejectedToken("unknown signing key")
    assert isinstance(later, Identity)
    assert transport.jwks_fetches == 2


def test_unreachable_issuer_with_no_keys_raises_signal_unavailable() -> None:
    settings = IdentitySettings.model_validate_json(json.dumps({"issuer": ISSUER}), strict=True)

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    jwks = JwksCache(ISSUER, cache_seconds=3600, min_refresh_interval=30, timeout=5,
                     transport=httpx.MockTransport(refuse))
    validator = BearerValidator(settings, TrustedIssuers.with_keys(settings, jwks))
    with pytest.raises(SignalUnavailable):
        asyncio.run(validator.validate(mint(DemoIdentityProvider(ISSUER)), AUDIENCES))


def test_discovery_naming_another_issuer_is_refused() -> None:
    idp = DemoIdentityProvider("http://127.0.0.1:9/other")
    jwks = JwksCache(ISSUER, cache_seconds=3600, min_refresh_interval=30, timeout=5,
                     transport=httpx.ASGITransport(app=_lying_app(idp)))
    with pytest.raises(SignalUnavailable, match="names issuer"):
        asyncio.run(jwks.refresh())


def _lying_app(idp: DemoIdentityProvider) -> Starlette:
    """Serves, at our issuer's URL, a discovery document that names another issuer."""

    async def discovery(request: object) -> JSONResponse:
        return JSONResponse({"issuer": idp.issuer, "jwks_uri": f"{ISSUER}/discovery/keys"})

    return Starlette(routes=[Route("/contoso/.well-known/openid-configuration", discovery)])


def _signed(idp: DemoIdentityProvider, header: dict[str, object]) -> str:
    """A token with a hostile header but a real RS256 signature over it."""
    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    claims = jwt.decode(mint(idp), options={"verify_signature": False})
    signing_input = f"{part(json.dumps(header).encode())}.{part(json.dumps(claims).encode())}"
    signature = idp.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{part(signature)}"


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        pytest.param({"alg": ["RS256"], "kid": "k"}, "signing algorithm not allowed", id="alg is a list"),
        pytest.param({"alg": 'x", realm="evil', "kid": "k"}, "signing algorithm not allowed",
                     id="alg tries to inject an auth-param"),
        pytest.param({"alg": "RS256", "kid": ["k"]}, "malformed token", id="kid is a list"),
        pytest.param({"alg": "RS256", "kid": "k" * 300}, "token has no usable kid", id="kid too long"),
    ],
)
def test_hostile_headers_are_rejected_with_fixed_reasons(header: dict[str, object], reason: str) -> None:
    idp = DemoIdentityProvider(ISSUER)
    validator, _ = validator_for(idp)
    assert asyncio.run(validator.validate(_signed(idp, header), AUDIENCES)) == RejectedToken(reason)


def test_issuer_with_trailing_slash_is_matched_exactly() -> None:
    """Entra v1 tokens (Exchange, SharePoint) carry iss https://sts.windows.net/<tenant>/."""
    issuer = "http://127.0.0.1:9/tenant/"
    idp = DemoIdentityProvider(issuer)
    settings = IdentitySettings.model_validate_json(json.dumps({"issuer": issuer}), strict=True)
    assert settings.issuer == issuer
    jwks = JwksCache(issuer, cache_seconds=3600, min_refresh_interval=30, timeout=5,
                     transport=httpx.ASGITransport(app=idp.app()))
    validator = BearerValidator(settings, TrustedIssuers.with_keys(settings, jwks))
    assert isinstance(asyncio.run(validator.validate(mint(idp), AUDIENCES)), Identity)


def test_failed_first_fetch_keeps_answering_unavailable_not_invalid_token() -> None:
    calls = 0

    def refuse(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise httpx.ConnectError("connection refused", request=request)

    settings = IdentitySettings.model_validate_json(json.dumps({"issuer": ISSUER}), strict=True)
    jwks = JwksCache(ISSUER, cache_seconds=3600, min_refresh_interval=30, timeout=5, timer=Clock(),
                     transport=httpx.MockTransport(refuse))
    validator = BearerValidator(settings, TrustedIssuers.with_keys(settings, jwks))
    token = mint(DemoIdentityProvider(ISSUER))

    async def twice() -> None:
        with pytest.raises(SignalUnavailable):
            await jwks.refresh()
        for _ in range(3):
            with pytest.raises(SignalUnavailable):
                await validator.validate(token, AUDIENCES)

    asyncio.run(twice())
    assert calls == 1, "the rate limit still holds while no keys are known"


def test_jwk_without_alg_serves_the_pinned_algorithm_the_token_names() -> None:
    """Entra's JWKS entries carry no alg: a PS256-pinned gateway must still verify PS256 tokens."""
    idp = DemoIdentityProvider(ISSUER)
    settings = IdentitySettings.model_validate_json(json.dumps({"issuer": ISSUER, "algorithms": ["PS256"]}),
                                                    strict=True)
    jwks_without_alg = {"keys": [{k: v for k, v in idp.jwks()["keys"][0].items() if k != "alg"}]}

    def serve(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("openid-configuration"):
            return httpx.Response(200, json={"issuer": ISSUER, "jwks_uri": f"{ISSUER}/keys"})
        return httpx.Response(200, json=jwks_without_alg)

    jwks = JwksCache(ISSUER, cache_seconds=3600, min_refresh_interval=30, timeout=5,
                     transport=httpx.MockTransport(serve))
    validator = BearerValidator(settings, TrustedIssuers.with_keys(settings, jwks))
    claims = jwt.decode(mint(idp), options={"verify_signature": False})
    ps256 = jwt.encode(claims, idp.key, algorithm="PS256", headers={"kid": idp.kid})
    rs256 = jwt.encode(claims, idp.key, algorithm="RS256", headers={"kid": idp.kid})
    assert isinstance(asyncio.run(validator.validate(ps256, AUDIENCES)), Identity)
    assert asyncio.run(validator.validate(rs256, AUDIENCES)) == RejectedToken("signing algorithm not allowed")


def test_jwk_bound_to_another_algorithm_is_not_used() -> None:
    idp = DemoIdentityProvider(ISSUER)
    validator, _ = validator_for(idp, algorithms=("RS256", "PS256"))  # the demo JWK says alg RS256
    claims = jwt.decode(mint(idp), options={"verify_signature": False})
    ps256 = jwt.encode(claims, idp.key, algorithm="PS256", headers={"kid": idp.kid})
    assert asyncio.run(validator.validate(ps256, AUDIENCES)) == RejectedToken("unknown signing key")
