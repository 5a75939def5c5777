"""authlib's httpx OAuth 2.0 client, imported once for the Graph connector and browser sign-in.

authlib 1.9 prefers the httpx2 fork and warns when it runs on httpx, which Portcullis uses
everywhere (JWKS fetching, Starlette's test client): same API, so that one warning is silenced.

authlib reads a token endpoint's answer with httpx's ``Response.json()``, which guesses the
encoding and keeps the last of two members with one name: ``strict_oauth_client`` checks the
answer with ``gateway.http.strict_json`` first (authlib's ``access_token_response`` compliance hook),
so the one reading authlib then makes is the strict reader's. A refusal is a ``ValueError``.
"""

import warnings
from typing import Any

import authlib.deprecate  # its own "always" filter must exist before ours is added on top
import httpx

from gateway.http.strict_json import loads as strict_json

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=authlib.deprecate.AuthlibDeprecationWarning)
    from authlib.integrations.base_client.errors import OAuthError
    from authlib.integrations.httpx_client import AsyncOAuth2Client

__all__ = ["AsyncOAuth2Client", "OAuthError", "strict_oauth_client"]

MAX_TOKEN_RESPONSE_BYTES = 64 * 1024  # Entra's answer with an ID, access and refresh token: under 16 KiB


def strict_oauth_client(**settings: Any) -> AsyncOAuth2Client:
    """An ``AsyncOAuth2Client`` (same settings) whose token answers must be JSON with one reading."""
    client = AsyncOAuth2Client(**settings)
    client.register_compliance_hook("access_token_response", _read_once)
    return client


def _read_once(response: httpx.Response) -> httpx.Response:
    """authlib parses every answer below 500 as JSON (errors included): so is each checked here."""
    if response.status_code < 500:
        strict_json(response.content, max_bytes=MAX_TOKEN_RESPONSE_BYTES)
    return response
