"""Canonical paths and the identity headers the gateway owns (pure functions)."""

from __future__ import annotations

import pytest

from gateway.http.headers import headers_to_strip, is_client_identity_header
from gateway.http.paths import canonical_path
from gateway.identity.tokens import RejectedToken, bearer_token


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/owa/", "/owa/"),
        ("/owa/?ae=Folder&t=IPF.Note", "/owa/"),
        ("/sites/team%20site/doc.docx", "/sites/team site/doc.docx"),
        ("/Microsoft-Server-ActiveSync?Cmd=Sync", "/Microsoft-Server-ActiveSync"),
        ("/owa/../ecp/", None),
        ("/owa/./x", None),
        ("/owa/%2e%2e/ecp/", None),
        ("/owa%2fecp", None),
        ("/owa/%252e%252e/", None),
        ("/owa\\..\\ecp", None),
        ("/owa/%5cecp", None),
        ("/owa/%00", None),
        ("/owa//ecp", None),
        ("/owa./", None),
        ("/owa%20/", None),
        ("/owa/%zz", None),
        ("owa/", None),
        ("*", None),
        # CJK file names use fullwidth punctuation: only fullwidth separators and dots are refused
        ("/sites/x/Shared%20Documents/%E3%81%AA%E3%81%9C%EF%BC%9F.docx", "/sites/x/Shared Documents/なぜ？.docx"),
        ("/sites/x/%EF%BC%85%E5%A2%97.xlsx", "/sites/x/％増.xlsx"),
        ("/owa/%EF%BC%8Fecp", None),
        ("/owa/%EF%BC%8E%EF%BC%8E/ecp", None),
        # autodiscover.json is Exchange's explicit-logon trigger only under /autodiscover/
        ("/sites/x/Shared%20Documents/autodiscover.json.bak", "/sites/x/Shared Documents/autodiscover.json.bak"),
        ("/search/results.aspx?k=autodiscover.json", "/search/results.aspx"),
        ("/autodiscover/autodiscover.json.bak", None),
        ("/Autodiscover/autodiscover.json?@evil.test/mapi/nspi/?&Email=autodiscover/autodiscover.json%3F@evil.test",
         None),
    ],
)
def test_canonical_path_or_refusal(target: str, expected: str | None) -> None:
    assert canonical_path(target) == expected


@pytest.mark.parametrize(
    "name",
    ["X-Portcullis-User", "x-portcullis-anything", "X_Portcullis_User", "X-Forwarded-User", "x_forwarded_user",
     "X.Forwarded.User", "X-Auth-Request-Email", "Remote-User", "X-MS-CLIENT-PRINCIPAL-NAME",
     "X-MS-TOKEN-AAD-ID-TOKEN", "X-WebAuth-User", "X-Authenticated-Userid", "x-amzn-oidc-identity",
     "X-Goog-Authenticated-User-Email", "Cf-Access-Jwt-Assertion", "X-Remote-Group"],
)
def test_client_identity_headers_are_recognised_in_every_spelling(name: str) -> None:
    assert is_client_identity_header(name)


@pytest.mark.parametrize("name", ["Authorization", "User-Agent", "X-Forwarded-For", "MS-ASProtocolVersion"])
def test_ordinary_headers_are_not_identity_headers(name: str) -> None:
    assert not is_client_identity_header(name)


def test_headers_to_strip_covers_rewrites_forwarding_proxy_and_hop_by_hop() -> None:
    sent = ["Host", "Authorization", "User-Agent", "X-Original-URL", "X-Rewrite-URL", "X-HTTP-Method-Override",
            "X-Forwarded-For", "Forwarded", "X-Real-IP", "Proxy-Authorization", "Keep-Alive", "Connection",
            "X-Custom", "Accept", "MS-ASProtocolVersion"]
    stripped = headers_to_strip(sent, ["keep-alive, X-Custom", "Accept, Host"])
    assert stripped == {"X-Original-URL", "X-Rewrite-URL", "X-HTTP-Method-Override", "X-Forwarded-For", "Forwarded",
                        "X-Real-IP", "Proxy-Authorization", "Keep-Alive", "Connection", "X-Custom", "Accept"}


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["Bearer abc.def.ghi"], "abc.def.ghi"),
        (["bearer abc.def.ghi"], "abc.def.ghi"),
        ([], RejectedToken("no bearer token", presented=False)),
        (["Basic dXNlcjpwYXNz"], RejectedToken("Authorization is not a bearer token", presented=False)),
        (["Bearer "], RejectedToken("empty bearer token", presented=False)),
        (["Bearer"], RejectedToken("empty bearer token", presented=False)),
        (["Bearer a.b.c", "Bearer d.e.f"], RejectedToken("more than one Authorization header")),
        (["Bearer a.b.c<script>"], RejectedToken("malformed token")),
        (["Bearer " + "a" * 20000], RejectedToken("token too large")),
    ],
)
def test_bearer_token_parsing(values: list[str], expected: str | RejectedToken) -> None:
    assert bearer_token(values) == expected
