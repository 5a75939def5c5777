"""What the tests of an edge in front of the forward-auth listener share (tests/helpers/nginx.py,
caddy.py): the skip marker, and a request through the edge as a client sends it."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from gateway.app.demo import ACTIVESYNC_UA, ALEX_IPHONE, BROWSER_UA
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


def sign_in_and_out(port: int, issuer: str) -> dict[str, Any]:
    """A browser signs in through the edge on ``port`` (the callback under /.portcullis/ goes to
    Portcullis), opens OWA, and signs out (/.portcullis/logout): afterwards it is sent to sign in
    again. What the backend received while signed in."""
    browser = {"User-Agent": BROWSER_UA, "Accept": "text/html"}
    start = through_edge(port, "/owa/?folder=inbox", method="GET", headers=browser)
    assert start.status_code == 302
    callback = granted(start.headers["Location"])
    binding = start.headers["Set-Cookie"].split(";", 1)[0]
    signed_in = through_edge(port, callback, method="GET", headers={**browser, "Cookie": binding})
    assert signed_in.status_code == 302 and signed_in.headers["Location"] == f"https://{MAIL}/owa/?folder=inbox"
    session = signed_in.headers["Set-Cookie"].split(";", 1)[0]
    inbox = received(through_edge(port, "/owa/?folder=inbox", method="GET", headers={**browser, "Cookie": session}))
    assert inbox["receivedHeaders"]["x-portcullis-user"] == "alex@contoso.test"

    out = through_edge(port, "/.portcullis/logout", headers={**browser, "Cookie": session, "Origin": f"https://{MAIL}"})
    assert out.status_code == 200 and "Max-Age=0" in out.headers["Set-Cookie"]
    again = through_edge(port, "/owa/?folder=inbox", method="GET", headers={**browser, "Cookie": session})
    assert again.status_code == 302 and again.headers["Location"].startswith(issuer)
    return inbox


def sent_to_sign_in(answer: httpx.Response, issuer: str) -> bool:
    """A browser without a session: redirected to the issuer, with the sign-in binding cookie."""
    return answer.status_code == 302 and answer.headers["Location"].startswith(issuer) and \
        "__Host-portcullis-signin" in answer.headers["Set-Cookie"]
