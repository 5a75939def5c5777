"""A dev-only OpenID Connect issuer for the demo and the tests: discovery document, JWKS, and a
``/demo/token`` endpoint that mints access tokens for any user, app and device on request.

It signs with a fresh RSA key per process and must never face a network: ``portcullis demo``
binds it to loopback, and the config loader only accepts plain-http issuers on loopback.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
import uuid
from html import escape
from urllib.parse import urlencode, urlsplit

import jwt
from cachetools import TTLCache
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

DEMO_TENANT_ID = "c0a7e1d5-0000-4000-8000-00000000c0de"
DEMO_USERS = ("alex@contoso.test", "blake@contoso.test", "casey@contoso.test", "drew@contoso.test",
              "kiosk@contoso.test")
DEMO_DEVICES = {
    "": "an unregistered device (a kiosk, a personal laptop)",
    "3c5f0b1e-7a2d-4e8f-9b61-0d2a4c8e1f01": "Alex's iPhone (compliant)",
    "8d2e6f4a-1b3c-4d5e-8f70-2a4b6c8d0e02": "Blake's Android phone (noncompliant)",
}


def _authorization_problem(params: dict[str, str]) -> str | None:
    """The demo accepts any client, but only the code flow with PKCE S256, a state, a nonce and an
    https redirect to a gateway callback."""
    for key in ("client_id", "redirect_uri", "state", "nonce", "code_challenge"):
        if not params.get(key):
            return f"missing: {key}"
    if params.get("response_type") != "code" or params.get("code_challenge_method") != "S256":
        return "only response_type=code with code_challenge_method=S256"
    redirect = urlsplit(params["redirect_uri"])
    if redirect.scheme != "https" or not redirect.path.endswith("/.portcullis/callback"):
        return "redirect_uri must be https://<protected host>/.portcullis/callback"
    return None
MAX_LIFETIME_SECONDS = 24 * 3600


class DemoIdentityProvider:
    def __init__(self, issuer: str) -> None:
        self.issuer = issuer
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = secrets.token_hex(8)
        self._codes: TTLCache[str, dict[str, str]] = TTLCache(maxsize=10_000, ttl=300)

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
        roles: tuple[str, ...] = (),
        extra: dict[str, object] | None = None,
    ) -> str:
        """An RS256 access token in Entra's v2 shape (``azp`` is the client app; ``roles`` are app
        roles, e.g. Portcullis.Reader for the admin API)."""
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
        if roles:
            claims["roles"] = list(roles)
        claims.update(extra or {})
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})

    def app(self) -> Starlette:
        base = urlsplit(self.issuer).path.rstrip("/")
        return Starlette(routes=[
            Route(f"{base}/.well-known/openid-configuration", self._discovery),
            Route(f"{base}/discovery/keys", self._keys),
            Route(f"{base}/demo/token", self._token, methods=["POST"]),
            Route(f"{base}/oauth2/authorize", self._authorize_form, methods=["GET"]),
            Route(f"{base}/oauth2/authorize", self._authorize, methods=["POST"]),
            Route(f"{base}/oauth2/token", self._code_token, methods=["POST"]),
        ])

    async def _authorize_form(self, request: Request) -> Response:
        """The demo's sign-in page: pick a user and the device this browser runs on."""
        params = dict(request.query_params)
        problem = _authorization_problem(params)
        if problem:
            return JSONResponse({"error": "invalid_request", "error_description": problem}, status_code=400)
        hidden = "".join(f'<input type="hidden" name="{escape(k)}" value="{escape(v)}">' for k, v in params.items())
        users = "".join(f'<option value="{u}">{u}</option>' for u in DEMO_USERS)
        devices = "".join(f'<option value="{d}">{label}</option>' for d, label in DEMO_DEVICES.items())
        page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Sign in (demo)</title></head>
<body><main><h1>Sign in to Contoso (demo issuer)</h1><form method="post">{hidden}
<p><label>User <select name="user">{users}</select></label></p>
<p><label>This browser runs on <select name="device_id">{devices}</select></label></p>
<p><label><input type="checkbox" name="mfa" value="1"> I did multifactor authentication</label></p>
<p><label><input type="checkbox" name="fido" value="1"> with a FIDO2 security key (phishing-resistant)</label></p>
<p><button type="submit" id="sign-in">Sign in</button></p></form></main></body></html>"""
        return HTMLResponse(page)

    async def _authorize(self, request: Request) -> Response:
        form = {k: str(v) for k, v in (await request.form()).items()}
        problem = _authorization_problem(form) or (None if form.get("user") else "missing: user")
        if problem:
            return JSONResponse({"error": "invalid_request", "error_description": problem}, status_code=400)
        code = secrets.token_urlsafe(24)
        self._codes[code] = form
        return RedirectResponse(f"{form['redirect_uri']}?{urlencode({'code': code, 'state': form['state']})}",
                                status_code=302)

    async def _code_token(self, request: Request) -> JSONResponse:
        """Authorization code + PKCE (S256) for an ID token that names the user and the device."""
        form = {k: str(v) for k, v in (await request.form()).items()}
        granted = self._codes.pop(form.get("code", ""), None)
        verifier = form.get("code_verifier", "")
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        if (granted is None or form.get("grant_type") != "authorization_code"
                or form.get("redirect_uri") != granted["redirect_uri"] or challenge != granted["code_challenge"]
                or form.get("client_id", granted["client_id"]) != granted["client_id"]):
            return JSONResponse({"error": "invalid_grant"}, status_code=400)
        now = int(time.time())
        user = granted["user"]
        claims: dict[str, object] = {
            "iss": self.issuer, "aud": granted["client_id"], "iat": now, "nbf": now, "exp": now + 3600,
            "auth_time": now, "nonce": granted["nonce"], "sub": str(uuid.uuid5(uuid.NAMESPACE_URL, f"sub:{user}")),
            "oid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"oid:{user}")), "tid": DEMO_TENANT_ID,
            "preferred_username": user, "upn": user, "amr": _methods(granted),
            "groups": ["kiosk-users"] if user.startswith("kiosk") else [],
        }
        contexts = _requested_contexts(granted.get("claims", ""))
        if contexts:  # the demo's sign-in satisfies every authentication context asked for
            claims["acrs"] = contexts
        if granted.get("device_id"):
            claims["deviceid"] = granted["device_id"]
        id_token = jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})
        return JSONResponse({"id_token": id_token, "access_token": secrets.token_urlsafe(16), "token_type": "Bearer",
                             "expires_in": 3600, "scope": "openid profile"})

    async def _discovery(self, request: Request) -> JSONResponse:
        return JSONResponse({
            "issuer": self.issuer,
            "jwks_uri": f"{self.issuer.rstrip('/')}/discovery/keys",
            "authorization_endpoint": f"{self.issuer.rstrip('/')}/oauth2/authorize",
            "token_endpoint": f"{self.issuer.rstrip('/')}/oauth2/token",
            "code_challenge_methods_supported": ["S256"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
        })

    async def _keys(self, request: Request) -> JSONResponse:
        return JSONResponse(self.jwks())

    async def _token(self, request: Request) -> JSONResponse:
        """Dev-only minting: form fields ``user``, ``client_id``, ``audience``, ``device_id``,
        ``roles`` (space-separated app roles), ``amr`` (space-separated authentication methods,
        default ``pwd``) and ``acrs`` (space-separated authentication contexts, c1..c99)."""
        form = await request.form()
        fields = {k: str(form.get(k, "")).strip()
                  for k in ("user", "client_id", "audience", "device_id", "roles", "amr", "acrs")}
        missing = [k for k in ("user", "client_id", "audience") if not fields[k]]
        if missing:
            return JSONResponse({"error": "invalid_request", "error_description": f"missing: {', '.join(missing)}"},
                                status_code=400)
        extra: dict[str, object] = {"amr": fields["amr"].split()} if fields["amr"] else {}
        if fields["acrs"]:
            extra["acrs"] = fields["acrs"].split()
        token = self.mint(user=fields["user"], client_id=fields["client_id"], audience=fields["audience"],
                          device_id=fields["device_id"] or None, roles=tuple(fields["roles"].split()), extra=extra)
        return JSONResponse({"access_token": token, "token_type": "Bearer", "expires_in": 3600})


def _methods(granted: dict[str, str]) -> list[str]:
    """The ``amr`` of a demo sign-in: a password, then what the sign-in page says was added."""
    if granted.get("fido"):
        return ["fido", "mfa"]
    return ["pwd", "mfa"] if granted.get("mfa") else ["pwd"]


def _requested_contexts(claims: str) -> list[str]:
    """The authentication contexts an OIDC claims request asks ``acrs`` to carry (Entra's shape)."""
    try:
        acrs = json.loads(claims)["access_token"]["acrs"] if claims else {}
    except (ValueError, KeyError, TypeError):
        return []
    values = acrs.get("values") or [acrs.get("value")] if isinstance(acrs, dict) else []
    return [v for v in values if isinstance(v, str)][:99]
