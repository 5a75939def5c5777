"""The admin API's callers: admin tokens, the reader role, and the calls the admin tests make."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from ruamel.yaml import YAML

from gateway.app.demo import (
    ALEX_IPHONE,
    EXCHANGE,
    OUTLOOK_MOBILE,
    activesync,
)
from tests.conftest import (
    Gateway,
)
from tests.helpers.hosts import MAIL

ADMIN_AUDIENCE = "api://portcullis-admin"
READER, OPERATOR = "Portcullis.Reader", "Portcullis.Operator"
ADMIN_APP = "5c4f9dcd-47c9-4e1a-9f3b-3f1d2c3b4a50"  # the admin's CLI or browser, as the token's azp


def admin_token(gateway: Gateway, *roles: str, user: str = "olivia@contoso.test", audience: str = ADMIN_AUDIENCE,
                **claims: Any) -> str:
    return gateway.idp.mint(user=user, client_id=ADMIN_APP, audience=audience, roles=roles, **claims)


def admin(port: int, method: str, path: str, token: str | None = None, *, timeout: float = 10,
          **kwargs: Any) -> httpx.Response:
    headers = dict(kwargs.pop("headers", {}))
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.request(method, f"http://127.0.0.1:{port}{path}", headers=headers, timeout=timeout, **kwargs)


def audit_path(config_dir: Path) -> Path:
    """``admin.auditLog``, read from the file as written (policies.yaml may be broken on purpose)."""
    return config_dir / YAML().load(config_dir / "portcullis.yaml")["admin"]["auditLog"]


def sync(gateway: Gateway, token: str, device: str = ALEX_IPHONE, user: str = "alex") -> httpx.Response:
    return gateway.request(MAIL, activesync(device, user), method="POST", token=token)


def outlook(gateway: Gateway, user: str = "alex@contoso.test", device: str = ALEX_IPHONE, client: str = OUTLOOK_MOBILE,
            **claims: Any) -> str:
    return gateway.idp.mint(user=user, client_id=client, audience=EXCHANGE, device_id=device, **claims)
