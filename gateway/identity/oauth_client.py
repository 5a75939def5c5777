"""authlib's httpx OAuth 2.0 client, imported once for the Graph connector and browser sign-in.

authlib 1.9 prefers the httpx2 fork and warns when it runs on httpx, which Portcullis uses
everywhere (JWKS fetching, Starlette's test client): same API, so that one warning is silenced.
"""

import warnings

import authlib.deprecate  # its own "always" filter must exist before ours is added on top

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=authlib.deprecate.AuthlibDeprecationWarning)
    from authlib.integrations.base_client.errors import OAuthError
    from authlib.integrations.httpx_client import AsyncOAuth2Client

__all__ = ["AsyncOAuth2Client", "OAuthError"]
