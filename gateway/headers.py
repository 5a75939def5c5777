"""Headers the gateway owns. Whatever a client sends under these names is removed before
forwarding: an upstream must be able to trust them because only Portcullis sets them."""

from __future__ import annotations

PREFIX = "x-portcullis-"
CORRELATION_ID = "X-Portcullis-Correlation-Id"
USER = "X-Portcullis-User"
CLIENT_APP = "X-Portcullis-Client-App"
DEVICE_ID = "X-Portcullis-Device-Id"

IDENTITY_HEADERS = frozenset({
    "x-forwarded-user", "x-forwarded-email", "x-forwarded-preferred-username",
    "x-forwarded-groups", "x-forwarded-access-token", "x-remote-user", "remote-user",
    "x-remote-email", "x-remote-group", "x-user", "x-email", "x-authenticated-user",
    "x-ms-client-principal", "x-ms-client-principal-name", "x-ms-client-principal-id",
})
IDENTITY_PREFIXES = (PREFIX, "x-auth-request-")


def is_client_identity_header(name: str) -> bool:
    """Case, ``_`` and ``.`` variants count too: some upstream stacks fold them into ``-``."""
    folded = name.lower().replace("_", "-").replace(".", "-")
    return folded in IDENTITY_HEADERS or folded.startswith(IDENTITY_PREFIXES)
