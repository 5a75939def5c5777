"""What the tests of an edge in front of the forward-auth listener share (tests/helpers/nginx.py,
caddy.py): the skip marker, and a request through the edge as a client sends it."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from gateway.app.demo import ACTIVESYNC_UA, ALEX_IPHONE
from gateway.app.edges import EDGES

MAIL = "mail.contoso.test"
DOCS = "docs.contoso.test"


def needs_edge(name: str) -> pytest.MarkDecorator:
    """Skip without the edge's binary, unless PORTCULLIS_REQUIRE_<NAME> is set (CI installs the
    edges and sets it: there a missing edge fails the tests instead of hiding them)."""
    edge = EDGES[name]
    return pytest.mark.skipif(edge.find() is None and not os.environ.get(f"PORTCULLIS_REQUIRE_{name.upper()}"),
                              reason=f"{name} is not installed (apt-get install {edge.package})")


def through_edge(port: int, path: str, *, method: str = "POST", host: str = MAIL, token: str | None = None,
                 headers: dict[str, str] | None = None, **kwargs: Any) -> httpx.Response:
    """A request to the edge on 127.0.0.1:``port`` (plain HTTP), as an ActiveSync client sends it
    unless ``headers`` say otherwise."""
    sent = {"Host": host, "User-Agent": ACTIVESYNC_UA, **({"Authorization": f"Bearer {token}"} if token else {}),
            **(headers or {})}
    return httpx.request(method, f"http://127.0.0.1:{port}{path}", headers=sent, timeout=10, **kwargs)


def received(answer: httpx.Response, backend: str = "exchange") -> dict[str, Any]:
    """What the demo backend says it received (its headers, the assertion it verified)."""
    assert answer.status_code == 200, answer.text[:300]
    assert answer.json()["backend"] == backend
    return answer.json()


def granted(authorize: str) -> str:
    """The demo issuer grants Alex's sign-in on his iPhone: the callback target it sends the browser to."""
    query = {name: values[0] for name, values in parse_qs(urlsplit(authorize).query).items()}
    with httpx.Client(timeout=10) as idp:
        answer = idp.post(authorize.split("?")[0],
                          data={**query, "user": "alex@contoso.test", "device_id": ALEX_IPHONE})
    assert answer.status_code == 302, answer.text
    callback = urlsplit(answer.headers["Location"])
    return f"{callback.path}?{callback.query}"
