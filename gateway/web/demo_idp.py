"""A dev-only OpenID Connect issuer for the demo and the tests: discovery document, JWKS, and a
``/demo/token`` endpoint that mints access tokens for any user, app and device on request.

It signs with a fresh RSA key per process and must never face a network: ``portcullis demo``
binds it to loopback, and the config loader only accepts plain-http issuers on loopback.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

DEMO_TENANT_ID = "c0a7e1d5-0000-4000-8000-00000000c0de"
MAX_LIFETIME_SECONDS = 24 * 3600


class DemoIdentityProvider:
    def __init__(self, issuer: str) -> None:
        self.issuer = issuer
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = secrets.token_hex(8)

    def jwks(self) -> dict[str, object]:
        public = json.loads(RSAAlgorithm.to_jwk(self.key.public_key()))
        return {"keys": [{**public, "kid": self.kid, "use": "sig", "alg": "RS256"}]}

    def mint(
        self,
        *,
        user: str,
        client_id: str,
        audience: str,
        device_id: str | None = None,
        lifetime: int = 3600,
        not_before_offset: int = 0,
        extra: dict[str, object] | None = None,
    ) -> str:
        """An RS256 access token in Entra's v2 shape (``azp`` is the client app)."""
        now = int(time.time())
        claims: dict[str, object] = {
            "iss": self.issuer, "aud": audience, "iat": now, "nbf": now + not_before_offset,
            "exp": now + lifetime, "sub": str(uuid.uuid5(uuid.NAMESPACE_URL, f"sub:{user}")),
            "oid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"oid:{user}")), "tid": DEMO_TENANT_ID,
            "upn": user, "preferred_username": user, "azp": client_id, "ver": "2.0",
            "scp": "Mail.ReadWrite Files.Read", "amr": ["pwd"],
        }
        if device_id:
            claims["deviceid"] = device_id
        claims.update(extra or {})
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})

    def app(self) -> Starlette:
        base = urlsplit(self.issuer).path.rstrip("/")
        return Starlette(routes=[
            Route(f"{base}/.well-known/openid-configuration", self._discovery),
            Route(f"{base}/discovery/keys", self._keys),
            Route(f"{base}/demo/token", self._token, methods=["POST"]),
        ])

    async def _discovery(self, request: Request) -> JSONResponse:
        return JSONResponse({
            "issuer": self.issuer,
            "jwks_uri": f"{self.issuer.rstrip('/')}/discovery/keys",
            "token_endpoint": f"{self.issuer.rstrip('/')}/demo/token",
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
        })

    async def _keys(self, request: Request) -> JSONResponse:
        return JSONResponse(self.jwks())

    async def _token(self, request: Request) -> JSONResponse:
        """Dev-only minting: form fields ``user``, ``client_id``, ``audience``, ``device_id``."""
        form = await request.form()
        fields = {k: str(form.get(k, "")).strip() for k in ("user", "client_id", "audience", "device_id")}
        missing = [k for k in ("user", "client_id", "audience") if not fields[k]]
        if missing:
            return JSONResponse({"error": "invalid_request", "error_description": f"missing: {', '.join(missing)}"},
                                status_code=400)
        token = self.mint(user=fields["user"], client_id=fields["client_id"], audience=fields["audience"],
                          device_id=fields["device_id"] or None)
        return JSONResponse({"access_token": token, "token_type": "Bearer", "expires_in": 3600})
