"""SharePoint requests with and without the kiosk group, as a Windows browser sends them."""

from __future__ import annotations

import httpx

from gateway.app.demo import ALEX_IPHONE, OUTLOOK_MOBILE, SHAREPOINT
from tests.conftest import Gateway
from tests.helpers.hosts import DOCS

BROWSER = {"Accept": "text/html", "User-Agent": "Mozilla/5.0 (Windows NT 10.0)"}


def docs(gateway: Gateway, path: str, *, kiosk: bool, method: str = "GET", **kwargs: object) -> httpx.Response:
    token = gateway.idp.mint(user="alex@contoso.test", client_id=OUTLOOK_MOBILE, audience=SHAREPOINT,
                             device_id=ALEX_IPHONE, extra={"groups": ["kiosk-users"]} if kiosk else None)
    return gateway.request(DOCS, path, method=method, token=token, **kwargs)  # type: ignore[arg-type]
