"""Where a client signs in, told in the 401 challenge: RFC 9728 protected resource metadata for any
issuer, and the parameters Exchange's clients (Outlook with hybrid modern authentication,
ActiveSync and EWS apps) read from ``WWW-Authenticate`` after sending an empty ``Bearer``
(MS-OAUTH2EX). Values come from the config only; the host is the one Routing validated."""

from __future__ import annotations

from gateway.config.models import ChallengePreset, ChallengeSettings

METADATA_PATH = "/.well-known/oauth-protected-resource"  # RFC 9728 §3
EXCHANGE_CLIENT_ID = "00000002-0000-0ff1-ce00-000000000000"  # Exchange's first-party application id
ENTRA_STS_PRINCIPAL = "00000001-0000-0000-c000-000000000000"  # Entra's token service, as Exchange names it
EXCHANGE_TOKEN_TYPES = "app_asserted_user_v1 service_asserted_app_v1"  # noqa: S105  (token type names)
ENTRA_AUTHORIZATION_URI = "https://login.windows.net/common/oauth2/authorize"


def resource_identifier(authority: str) -> str:
    """``https://<host[:port]>`` as the client addressed it: RFC 9728 §3.3 has the client compare it."""
    return f"https://{authority}"


def challenge_parameters(settings: ChallengeSettings, authority: str) -> tuple[tuple[str, str], ...]:
    """The auth-params beside ``error`` in every 401 of this host: the preset's, then the
    configured ones (which replace a preset's of the same name), then ``resource_metadata``."""
    parameters: dict[str, str] = {}
    if settings.preset is ChallengePreset.exchange:
        parameters["client_id"] = EXCHANGE_CLIENT_ID
        if settings.tenant_id is not None:
            parameters["trusted_issuers"] = f"{ENTRA_STS_PRINCIPAL}@{settings.tenant_id}"
        parameters["token_types"] = EXCHANGE_TOKEN_TYPES
        parameters["authorization_uri"] = settings.authorization_uri or ENTRA_AUTHORIZATION_URI
    elif settings.authorization_uri is not None:
        parameters["authorization_uri"] = settings.authorization_uri
    parameters.update(settings.parameters)
    parameters["resource_metadata"] = resource_identifier(authority) + METADATA_PATH
    return tuple(parameters.items())


def resource_metadata(settings: ChallengeSettings, authority: str, issuers: list[str],
                      path_suffix: str = "") -> dict[str, object]:
    """The RFC 9728 §2 document for ``https://<authority><path_suffix>``: who issues its tokens
    (every trusted issuer whose audiences include one of the host's) and how to send them (the
    header only: a token in the query is refused, RFC 6750 §2.3)."""
    document: dict[str, object] = {
        "resource": resource_identifier(authority) + path_suffix,
        "authorization_servers": issuers,
        "bearer_methods_supported": ["header"],
    }
    if settings.scopes:
        document["scopes_supported"] = list(settings.scopes)
    return document
