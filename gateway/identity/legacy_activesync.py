"""Legacy ActiveSync: Basic authentication from on-premises Exchange phones, which the gateway
cannot verify (Exchange checks the password). Opt-in per protected host (``legacyActiveSync``):
such a request is believed to come from the user only on a connection whose device certificate
names a compliant inventory device of that user (``gateway.decision.device_binding``): the job
Intune's on-premises Exchange connector did. Without the setting, Basic is refused as before.
The credentials go to Exchange untouched; only the user name is read here, never the password.
"""

from __future__ import annotations

import base64
import binascii
import re

from gateway.identity.tokens import RejectedToken
from gateway.policy.model import Identity

SOURCE = "legacyActiveSync"  # the identity source in decision records
MAX_BASIC_BYTES = 1024  # base64 of "user:password"; ActiveSync clients send far less
UPN = re.compile(r"^[^@\s\\/:]{1,64}@[A-Za-z0-9.-]{1,253}$")


def basic_user(authorization: list[str]) -> str | RejectedToken | None:
    """The user name of one ``Authorization: Basic`` header, lower case, or why it cannot be read;
    None when the request does not use Basic (a bearer token, or nothing)."""
    if len(authorization) != 1:
        return None
    scheme, _, credentials = authorization[0].strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    credentials = credentials.strip()
    if len(credentials) > MAX_BASIC_BYTES:
        return RejectedToken("Basic credentials too large")
    try:
        decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return RejectedToken("Basic credentials are not base64 of UTF-8 text")
    user, colon, _ = decoded.partition(":")
    if not colon or not UPN.match(user):
        return RejectedToken("Basic user name is not a user principal name (user@domain); DOMAIN\\user is not "
                             "matched to devices")
    return user.lower()


def legacy_identity(user: str, host: str) -> Identity:
    """Who a Basic request says it is: a user name, no app, no device (the certificate names it)."""
    return Identity(subject=user, user_principal_name=user, object_id=None, tenant_id=None, client_id=None,
                    device_id=None, groups=frozenset(), audience=f"https://{host}", expires_at=0)
