"""Pending sign-ins and browser sessions as JSON, for stores outside this process.

Explicit fields, never pickle: a store anyone else can write to must not be able to run code
here. A record that is not exactly what this version writes (JSON without one reading, a wrong
type, another ``v``) reads as None and is logged without its content: the browser signs in again.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any

from gateway.http.strict_json import loads as strict_json
from gateway.policy.model import Identity
from gateway.state.session_records import BrowserSession, PendingLogin

logger = logging.getLogger(__name__)

VERSION = 1
IDENTITY_FIELDS = {  # Identity field -> JSON key; a test checks that every field is here
    "subject": "subject", "user_principal_name": "userPrincipalName", "object_id": "objectId",
    "tenant_id": "tenantId", "client_id": "clientId", "device_id": "deviceId", "groups": "groups",
    "audience": "audience", "expires_at": "expiresAt", "authentication_methods": "authenticationMethods",
    "authenticated_at": "authenticatedAt", "authentication_context": "authenticationContext",
    "issued_at": "issuedAt", "roles": "roles", "authentication_contexts": "authenticationContexts",
    "issuer": "issuer",
}
_SETS = frozenset({"groups", "authentication_methods", "roles", "authentication_contexts"})
_ADDED_SETS = frozenset({"authentication_contexts"})  # absent from sessions stored by earlier versions
_OPTIONAL_TEXT = frozenset({"user_principal_name", "object_id", "tenant_id", "client_id", "device_id",
                            "authentication_context", "issuer"})
_OPTIONAL_TIMES = frozenset({"authenticated_at", "issued_at"})


class _Malformed(ValueError):
    """A stored record this version cannot read; the message names the field, never its value."""


def encode_pending(login: PendingLogin) -> str:
    return json.dumps({"v": VERSION, "authority": login.authority, "returnUrl": login.return_url,
                       "codeVerifier": login.code_verifier, "nonce": login.nonce,
                       "browserBinding": login.browser_binding})


def decode_pending(text: str | bytes) -> PendingLogin | None:
    try:
        data = _document(text)
        return PendingLogin(*(_text(data, key) for key in
                              ("authority", "returnUrl", "codeVerifier", "nonce", "browserBinding")))
    except _Malformed as error:
        logger.warning("a stored pending sign-in is unreadable and was ignored: %s", error)
        return None


def encode_session(session: BrowserSession) -> str:
    identity = {key: _plain(getattr(session.identity, name)) for name, key in IDENTITY_FIELDS.items()}
    return json.dumps({"v": VERSION, "host": session.host, "signedInAt": session.signed_in_at.isoformat(),
                       "identity": identity, "certificateBound": session.certificate_bound})


def decode_session(text: str | bytes) -> BrowserSession | None:
    try:
        data = _document(text)
        identity = data.get("identity")
        if not isinstance(identity, dict):
            raise _Malformed("identity is not an object")
        bound = data.get("certificateBound", False)  # absent in sessions stored before it existed
        if not isinstance(bound, bool):
            raise _Malformed("certificateBound is not a boolean")
        return BrowserSession(_identity(identity), _text(data, "host"), _aware(_text(data, "signedInAt")), bound)
    except _Malformed as error:
        logger.warning("a stored browser session is unreadable and was ignored: %s", error)
        return None


def _document(text: str | bytes) -> dict[str, Any]:
    try:
        data = strict_json(text)  # a shared store is read as the network is: one reading, bounded depth
    except ValueError:
        raise _Malformed("not JSON") from None
    if not isinstance(data, dict):
        raise _Malformed("not a JSON object")
    if data.get("v") != VERSION:
        raise _Malformed(f"record version is not {VERSION}")
    return data


def _identity(data: dict[str, Any]) -> Identity:
    values: dict[str, Any] = {}
    for name, key in IDENTITY_FIELDS.items():
        if name in _SETS:
            # a session stored before a field existed has none of it (acrs)
            values[name] = _strings(data, key) if key in data or name not in _ADDED_SETS else frozenset()
        elif name in _OPTIONAL_TEXT:
            values[name] = _text(data, key) if data.get(key) is not None else None
        elif name in _OPTIONAL_TIMES:
            values[name] = _number(data, key) if data.get(key) is not None else None
        elif name == "expires_at":
            values[name] = _number(data, key)
        else:
            values[name] = _text(data, key)
    return Identity(**values)


def _plain(value: object) -> object:
    return sorted(value) if isinstance(value, frozenset) else value


def _text(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise _Malformed(f"{key} is not a string")
    return value


def _number(data: dict[str, Any], key: str) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Malformed(f"{key} is not a number")
    return float(value)


def _strings(data: dict[str, Any], key: str) -> frozenset[str]:
    value = data.get(key)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _Malformed(f"{key} is not a list of strings")
    return frozenset(value)


def _aware(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise _Malformed("signedInAt is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise _Malformed("signedInAt has no time zone")
    return moment
