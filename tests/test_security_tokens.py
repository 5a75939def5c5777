"""Issue 8, class TOKENS: what a bearer token can try, through the real listener, each attack next
to a legitimate twin that still reaches the backend (200 and its echo). The decisions these tests
pin down are written up in gateway/identity/tokens.py's docstring.

Covered elsewhere and not repeated here: expired, not-yet-valid and SharePoint-for-Exchange tokens
(tests/test_gateway_e2e.py::test_invalid_token_claims_get_401), ``none`` and HS256 keyed with the
PEM public key (::test_unsigned_or_hmac_tokens_are_rejected), another key under the issuer's kid
(::test_token_from_another_issuer_key_is_rejected), ``bEaReR`` (::test_bearer_scheme_is_case_insensitive),
an issuer that cannot be reached (::test_unreachable_issuer_fails_closed_with_503), the
Authorization syntax (tests/test_request_hygiene.py::test_bearer_token_parsing), a JWKS refetch
per unknown kid, keys bound to one algorithm and an issuer down from the start
(tests/test_identity.py), browser sessions (tests/test_browser_sign_in.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import hashlib
import hmac
import json
import secrets
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from ruamel.yaml import YAML

from gateway.app import bootstrap
from gateway.app.demo import ALEX_IPHONE, BLAKE_ANDROID, EXCHANGE, SHAREPOINT, TEAMS
from gateway.config.models import IdentitySettings
from gateway.errors import SignalUnavailable
from gateway.http.strict_json import JsonRefused
from gateway.identity.browser import COOKIE_NAME
from gateway.identity.issuers import TrustedIssuers
from gateway.identity.jwks import MAX_JWKS_BYTES, JwksCache
from gateway.identity.oauth_client import strict_oauth_client
from gateway.identity.tokens import (
    ALGORITHM_NOT_ALLOWED,
    AUDIENCE_NOT_ACCEPTED,
    CLAIM_NAMED_TWICE,
    CLAIMS_NOT_UTF8,
    CRITICAL_EXTENSION,
    ID_TOKEN_PRESENTED,
    MALFORMED,
    SELF_NAMED_KEY,
    TYPE_NOT_ACCEPTED,
    BearerValidator,
    RejectedToken,
)
from gateway.policy.model import Identity
from gateway.web.demo_idp import DemoIdentityProvider
from tests.conftest import Background, Gateway, Ports, gateway_config, proxy_for
from tests.helpers.browser import sign_in
from tests.helpers.hosts import ACTIVESYNC, MAIL
from tests.helpers.http import raw_exchange
from tests.helpers.tokens import Clock, outlook_token

CLIENT_ID = "portcullis-demo"  # config/portcullis.yaml browserSignIn.clientId: the aud of its ID tokens
NO_KID = "token has no usable kid"
UNKNOWN_KEY = "unknown signing key"
BAD_SIGNATURE = "token signature invalid"
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
MISSING = object()  # a claim or header left out

type Signer = Callable[[bytes], bytes]


# --- building tokens by hand (pyjwt adds, or refuses, some of the headers tried here) ----------

def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jws(header: dict[str, Any], claims: object, sign: Signer | None) -> str:
    """A compact JWS with exactly this header; ``sign`` None leaves the signature empty."""
    return jws_of_segments(json.dumps(header).encode(), json.dumps(claims).encode(), sign)


def jws_of_segments(header: bytes, claims: bytes, sign: Signer | None) -> str:
    """A compact JWS of these very bytes (another encoding, a member twice, as a test needs)."""
    signing_input = f"{b64(header)}.{b64(claims)}"
    return f"{signing_input}.{b64(sign(signing_input.encode())) if sign else ''}"


def rs256(key: rsa.RSAPrivateKey) -> Signer:
    return lambda data: key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def hmac_with(secret: bytes, digest: str = "sha256") -> Signer:
    return lambda data: hmac.new(secret, data, digest).digest()


def without_missing(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not MISSING}


def outlook_claims(gateway: Gateway, **changes: Any) -> dict[str, Any]:
    """Alex's Outlook token for Exchange on the compliant iPhone (allowed: 200), changed as given."""
    return without_missing({**jwt.decode(outlook_token(gateway), options={"verify_signature": False}), **changes})


def issuer_signed(gateway: Gateway, header: dict[str, Any] | None = None, **claims: Any) -> str:
    """Signed by the demo issuer's real key, with this header (over the issuer's RS256 one)."""
    full = without_missing({"alg": "RS256", "typ": "JWT", "kid": gateway.idp.kid, **(header or {})})
    return jws(full, outlook_claims(gateway, **claims), rs256(gateway.idp.key))


def with_signature(token: str, signature: bytes | str) -> str:
    head = token.rsplit(".", 1)[0]
    return f"{head}.{signature if isinstance(signature, str) else b64(signature)}"


# --- what the gateway answered ----------------------------------------------------------------

def send(gateway: Gateway, token: str, port: int | None = None) -> httpx.Response:
    return gateway.request(MAIL, ACTIVESYNC, method="POST", token=token, port=port)


def refused_401(response: httpx.Response, reason: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith(  # then where to sign in (test_sign_in_discovery.py)
        f'Bearer error="invalid_token", error_description="{reason}", client_id="')
    assert response.json()["error_description"] == reason
    assert "receivedHeaders" not in response.text


def forwarded(response: httpx.Response) -> None:
    """The legitimate twin: through to the backend, as Alex."""
    assert response.status_code == 200, response.text
    assert response.json()["receivedHeaders"]["x-portcullis-user"] == "alex@contoso.test"


def answered(response: httpx.Response, reason: str | None) -> None:
    if reason is None:
        forwarded(response)
    else:
        refused_401(response, reason)


@dataclass
class Hits:
    count: int = 0


@pytest.fixture
def jwks_fetches(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> Hits:
    """How often the session gateway fetched the demo issuer's JWKS during the test (the issuer
    runs in the gateway's thread; the test reading the keys itself is not counted)."""
    hits, serve, test_thread = Hits(), gateway.idp.jwks, threading.get_ident()

    def counted() -> dict[str, object]:
        hits.count += threading.get_ident() != test_thread
        return serve()

    monkeypatch.setattr(gateway.idp, "jwks", counted)
    return hits


# --- a hand-made issuer, or attacker, on loopback ---------------------------------------------

type Route = Callable[[BaseHTTPRequestHandler, threading.Event], None]


def answer(body: object, status: int = 200, headers: tuple[tuple[str, str], ...] = ()) -> Route:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()

    def route(handler: BaseHTTPRequestHandler, _stop: threading.Event) -> None:
        handler.send_response(status)
        for name, value in (("Content-Type", "application/json"), *headers):
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(content)))
        handler.end_headers()
        handler.wfile.write(content)

    return route


def drip(handler: BaseHTTPRequestHandler, stop: threading.Event) -> None:
    """A JWKS that never ends, a byte every 0.2 s: httpx's read timeout (per read) never fires."""
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", "1000000")
    handler.end_headers()
    with contextlib.suppress(OSError):
        handler.wfile.write(b'{"keys": [')
        while not stop.wait(0.2):
            handler.wfile.write(b" ")
            handler.wfile.flush()


def silent(_handler: BaseHTTPRequestHandler, stop: threading.Event) -> None:
    stop.wait(30)


class LoopbackServer:
    """Routes by path on 127.0.0.1, each hit counted; serves an OpenID discovery document for
    ``issuer`` (``http://127.0.0.1:<port>/contoso``) whose JWKS is at ``/contoso/keys``."""

    def __init__(self, jwks: Route | None = None, **routes: Route) -> None:
        self.stop, self.hits = threading.Event(), Counter[str]()
        server_side = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server_side.hits[self.path] += 1
                server_side.routes.get(self.path, answer({"error": "not_found"}, 404))(self, server_side.stop)

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.issuer = f"http://127.0.0.1:{self.port}/contoso"
        self.routes: dict[str, Route] = {f"/{name}": route for name, route in routes.items()}
        self.routes["/contoso/.well-known/openid-configuration"] = answer(
            {"issuer": self.issuer, "jwks_uri": f"{self.issuer}/keys"})
        if jwks is not None:
            self.routes["/contoso/keys"] = jwks

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def __enter__(self) -> LoopbackServer:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def gateway_on(issuer: LoopbackServer, gateway: Gateway, directory: Path, demo_ports: Ports,
               **identity: object) -> Iterator[int]:
    """The demo config with ``issuer`` as its identity provider (and these identity settings),
    behind a listener of its own; the session's backends serve it. While it runs, talk only to it
    (conftest.proxy_for)."""
    config_dir = gateway_config(directory, gateway.ca, Ports(0, issuer.port, demo_ports.mail, demo_ports.docs))
    yaml, path = YAML(), config_dir / "portcullis.yaml"
    data = yaml.load(path)
    data["identity"].update(identity)
    yaml.dump(data, path)
    loaded = bootstrap.load(config_dir)
    bootstrap.seed_store(loaded)
    service, _ = bootstrap.build_service(loaded)
    with Background(lambda: proxy_for(service)) as port:
        yield port


# --- alg confusion ----------------------------------------------------------------------------

def _public_pem(gateway: Gateway, form: serialization.PublicFormat) -> bytes:
    return gateway.idp.key.public_key().public_bytes(serialization.Encoding.PEM, form)


def _hmac_token(gateway: Gateway, algorithm: str, secret: Callable[[Gateway], bytes]) -> str:
    digest = {"HS256": "sha256", "HS384": "sha384", "HS512": "sha512"}[algorithm]
    return jws({"alg": algorithm, "typ": "JWT", "kid": gateway.idp.kid}, outlook_claims(gateway),
               hmac_with(secret(gateway), digest))


SPKI = serialization.PublicFormat.SubjectPublicKeyInfo
ALG_CASES = [
    pytest.param(lambda g: issuer_signed(g), None, id="twin: RS256 by the issuer's key"),
    *(pytest.param(lambda g, alg=alg: jws({"alg": alg, "kid": g.idp.kid}, outlook_claims(g), None),
                   ALGORITHM_NOT_ALLOWED, id=f"alg {alg}, no signature") for alg in ("None", "NONE", "nOnE")),
    pytest.param(lambda g: with_signature(jws({"alg": "none", "kid": g.idp.kid}, outlook_claims(g), None),
                                          issuer_signed(g).rsplit(".", 1)[1]),
                 ALGORITHM_NOT_ALLOWED, id="alg none with a real signature attached"),
    pytest.param(lambda g: _hmac_token(g, "HS256", lambda g: json.dumps(g.idp.jwks()["keys"][0]).encode()),
                 ALGORITHM_NOT_ALLOWED, id="HS256 keyed with the JWK as the JWKS serves it"),
    pytest.param(lambda g: _hmac_token(g, "HS256", lambda g: RSAAlgorithm.to_jwk(g.idp.key.public_key()).encode()),
                 ALGORITHM_NOT_ALLOWED, id="HS256 keyed with the JWK JSON pyjwt writes"),
    pytest.param(lambda g: _hmac_token(g, "HS256", lambda g: json.dumps(g.idp.jwks()).encode()),
                 ALGORITHM_NOT_ALLOWED, id="HS256 keyed with the whole JWKS document"),
    pytest.param(lambda g: _hmac_token(g, "HS256", lambda g: _public_pem(g, serialization.PublicFormat.PKCS1)),
                 ALGORITHM_NOT_ALLOWED, id="HS256 keyed with the PKCS1 PEM"),
    pytest.param(lambda g: _hmac_token(g, "HS384", lambda g: _public_pem(g, SPKI)),
                 ALGORITHM_NOT_ALLOWED, id="HS384 keyed with the PEM"),
    pytest.param(lambda g: _hmac_token(g, "HS512", lambda g: _public_pem(g, SPKI)),
                 ALGORITHM_NOT_ALLOWED, id="HS512 keyed with the PEM"),
    pytest.param(lambda g: issuer_signed(g, {"alg": "rs256"}), ALGORITHM_NOT_ALLOWED, id="alg in another case"),
    pytest.param(lambda g: issuer_signed(g, {"alg": "RS256 "}), ALGORITHM_NOT_ALLOWED, id="alg with a space"),
    pytest.param(lambda g: issuer_signed(g, {"alg": MISSING}), ALGORITHM_NOT_ALLOWED, id="no alg"),
    pytest.param(lambda g: jwt.encode(outlook_claims(g), g.idp.key, algorithm="PS256", headers={"kid": g.idp.kid}),
                 ALGORITHM_NOT_ALLOWED, id="PS256 by the issuer's key, not pinned"),
    pytest.param(lambda g: jwt.encode(outlook_claims(g), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256",
                                      headers={"kid": g.idp.kid}),
                 ALGORITHM_NOT_ALLOWED, id="ES256 by an attacker's key, not pinned"),
]


@pytest.mark.parametrize(("build", "reason"), ALG_CASES)
def test_alg_confusion_is_refused_before_any_key_lookup(gateway: Gateway, jwks_fetches: Hits,
                                                        build: Callable[[Gateway], str], reason: str | None) -> None:
    answered(send(gateway, build(gateway)), reason)
    assert jwks_fetches.count == 0


# --- keys the token names itself --------------------------------------------------------------

@dataclass(frozen=True)
class Attacker:
    key: rsa.RSAPrivateKey
    jwk: dict[str, Any]
    certificate: x509.Certificate
    server: LoopbackServer

    def signed(self, gateway: Gateway, header: dict[str, Any]) -> str:
        return jws(without_missing({"alg": "RS256", "typ": "JWT", **header}), outlook_claims(gateway), rs256(self.key))


@pytest.fixture
def attacker() -> Iterator[Attacker]:
    """An attacker's RSA key, its JWK and self-signed certificate, and a loopback server that
    would serve them (at /attacker/jwks and /attacker/cert.pem) and counts every hit."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = {**json.loads(RSAAlgorithm.to_jwk(key.public_key())), "kid": "attacker", "use": "sig", "alg": "RS256"}
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "login.microsoftonline.com")])
    start, end = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC), datetime.datetime(2100, 1, 1, tzinfo=datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
                   .sign(key, hashes.SHA256()))
    pem = answer(certificate.public_bytes(serialization.Encoding.PEM),
                 headers=(("Content-Type", "application/pem-certificate-chain"),))
    with LoopbackServer(**{"attacker/jwks": answer({"keys": [jwk]}), "attacker/cert.pem": pem}) as server:
        yield Attacker(key, jwk, certificate, server)


def _x5c(attacker: Attacker) -> list[str]:
    return [base64.b64encode(attacker.certificate.public_bytes(serialization.Encoding.DER)).decode()]


SELF_NAMED_CASES = [
    pytest.param(lambda g, a: issuer_signed(g), None, id="twin: the issuer's token as Entra sends it"),
    pytest.param(lambda g, a: issuer_signed(g, {"x5t": b64(hashlib.sha1(b"thumbprint").digest())}),  # noqa: S324
                 None, id="twin: the issuer's token with x5t, as Entra v1 sends it"),
    pytest.param(lambda g, a: a.signed(g, {"kid": g.idp.kid, "jwk": a.jwk}), SELF_NAMED_KEY,
                 id="attacker key inline in jwk, issuer's kid"),
    pytest.param(lambda g, a: a.signed(g, {"kid": MISSING, "jwk": a.jwk}), SELF_NAMED_KEY,
                 id="attacker key inline in jwk, no kid"),
    pytest.param(lambda g, a: a.signed(g, {"kid": "attacker", "jku": a.server.url("attacker/jwks")}), SELF_NAMED_KEY,
                 id="jku to the attacker's JWKS"),
    pytest.param(lambda g, a: a.signed(g, {"kid": g.idp.kid, "x5u": a.server.url("attacker/cert.pem")}),
                 SELF_NAMED_KEY, id="x5u to the attacker's certificate"),
    pytest.param(lambda g, a: a.signed(g, {"kid": g.idp.kid, "x5c": _x5c(a)}), SELF_NAMED_KEY,
                 id="x5c with the attacker's self-signed certificate"),
    # Decided: the issuer's own key does not make these headers acceptable (tokens.py docstring).
    pytest.param(lambda g, a: issuer_signed(g, {"jku": a.server.url("attacker/jwks")}), SELF_NAMED_KEY,
                 id="the issuer's token carrying jku"),
    pytest.param(lambda g, a: issuer_signed(g, {"jwk": g.idp.jwks()["keys"][0]}), SELF_NAMED_KEY,
                 id="the issuer's token carrying its own jwk"),
    pytest.param(lambda g, a: issuer_signed(g, {"x5u": a.server.url("attacker/cert.pem")}), SELF_NAMED_KEY,
                 id="the issuer's token carrying x5u"),
    pytest.param(lambda g, a: issuer_signed(g, {"x5c": _x5c(a)}), SELF_NAMED_KEY,
                 id="the issuer's token carrying x5c"),
]


@pytest.mark.parametrize(("build", "reason"), SELF_NAMED_CASES)
def test_keys_named_by_the_token_are_never_used_nor_fetched(gateway: Gateway, jwks_fetches: Hits, attacker: Attacker,
                                                           build: Callable[[Gateway, Attacker], str],
                                                           reason: str | None) -> None:
    answered(send(gateway, build(gateway, attacker)), reason)
    assert sum(attacker.server.hits.values()) == 0
    assert jwks_fetches.count == 0


# --- hostile kids and unknown-kid storms ------------------------------------------------------

KID_CASES = [
    pytest.param(lambda g: g.idp.kid, None, id="twin: the issuer's kid"),
    pytest.param(lambda g: "../../etc/passwd", UNKNOWN_KEY, id="path traversal"),
    pytest.param(lambda g: "x'OR'1'='1'--", UNKNOWN_KEY, id="SQL-ish"),
    pytest.param(lambda g: "http://127.0.0.1:9/keys", UNKNOWN_KEY, id="a URL"),
    pytest.param(lambda g: "1' OR '1'='1", NO_KID, id="SQL-ish with spaces"),
    pytest.param(lambda g: "k" * 10_240, NO_KID, id="10 KiB long"),
    pytest.param(lambda g: "", NO_KID, id="empty"),
    pytest.param(lambda g: "a\x00b", NO_KID, id="NUL"),
    pytest.param(lambda g: "key\r\nX-Injected: 1", NO_KID, id="CRLF"),
    pytest.param(lambda g: "ключ", NO_KID, id="not ASCII"),
    pytest.param(lambda g: MISSING, NO_KID, id="no kid"),
    pytest.param(lambda g: None, MALFORMED, id="null"),
    pytest.param(lambda g: 7, MALFORMED, id="a number"),
    pytest.param(lambda g: True, MALFORMED, id="a boolean"),
    pytest.param(lambda g: [g.idp.kid], MALFORMED, id="a list holding the issuer's kid"),
    pytest.param(lambda g: {"kid": g.idp.kid}, MALFORMED, id="an object"),
]


@pytest.mark.parametrize(("kid", "reason"), KID_CASES)
def test_hostile_kids_get_a_fixed_401_and_no_more_than_one_jwks_fetch(gateway: Gateway, jwks_fetches: Hits,
                                                                      kid: Callable[[Gateway], object],
                                                                      reason: str | None) -> None:
    """Only a kid that could be a key's is looked up; an unknown one may refetch the JWKS once per
    ``jwksRefreshMinIntervalSeconds``; the reason never echoes the kid."""
    answered(send(gateway, issuer_signed(gateway, {"kid": kid(gateway)})), reason)
    assert jwks_fetches.count <= (1 if reason == UNKNOWN_KEY else 0)


def test_an_unknown_kid_storm_through_the_listener_fetches_the_jwks_at_most_once(gateway: Gateway,
                                                                                jwks_fetches: Hits) -> None:
    """tests/test_identity.py::test_unknown_kid_storm_refetches_jwks_at_most_once_per_interval, for real."""
    for i in range(40):
        refused_401(send(gateway, issuer_signed(gateway, {"kid": f"forged-{i}"})), UNKNOWN_KEY)
    forwarded(send(gateway, issuer_signed(gateway)))
    assert jwks_fetches.count <= 1


# --- exact iss and aud ------------------------------------------------------------------------

def _issuer(change: Callable[[str], object]) -> Callable[[Gateway], dict[str, Any]]:
    return lambda g: {"iss": change(g.idp.issuer)}


def _audience(aud: object) -> Callable[[Gateway], dict[str, Any]]:
    return lambda g: {"aud": aud}


ISSUER_REFUSED = "token issuer not accepted"
ISS_AUD_CASES = [
    pytest.param(lambda g: {}, None, id="twin: exact iss and aud"),
    pytest.param(_issuer(lambda i: i + "/"), ISSUER_REFUSED, id="iss with a trailing slash"),
    pytest.param(_issuer(lambda i: i.replace("contoso", "Contoso")), ISSUER_REFUSED, id="iss in another case"),
    pytest.param(_issuer(lambda i: i[:-1]), ISSUER_REFUSED, id="iss a prefix of ours"),
    pytest.param(_issuer(lambda i: i + "-evil"), ISSUER_REFUSED, id="ours a prefix of iss"),
    pytest.param(_issuer(lambda i: i.replace("/contoso", "/x/../contoso")), ISSUER_REFUSED, id="iss with dot segments"),
    pytest.param(_issuer(lambda i: [i]), ISSUER_REFUSED, id="iss a list holding ours"),
    pytest.param(_audience(EXCHANGE.upper()), AUDIENCE_NOT_ACCEPTED, id="aud in another case"),
    pytest.param(_audience(EXCHANGE + "/"), AUDIENCE_NOT_ACCEPTED, id="aud with a trailing slash"),
    pytest.param(_audience(EXCHANGE[:-4]), AUDIENCE_NOT_ACCEPTED, id="aud a prefix of ours"),
    pytest.param(_audience(EXCHANGE + "0"), AUDIENCE_NOT_ACCEPTED, id="ours a prefix of aud"),
    pytest.param(_audience("https://outlook.office365.com"), AUDIENCE_NOT_ACCEPTED, id="aud of another resource"),
    pytest.param(_audience([EXCHANGE, SHAREPOINT]), AUDIENCE_NOT_ACCEPTED, id="aud list: ours and another host's"),
    pytest.param(_audience(["api://other", EXCHANGE]), AUDIENCE_NOT_ACCEPTED, id="aud list: another, then ours"),
    pytest.param(_audience([EXCHANGE]), AUDIENCE_NOT_ACCEPTED, id="aud list of ours alone (decided: a string only)"),
    pytest.param(_audience(7), AUDIENCE_NOT_ACCEPTED, id="aud a number"),
    pytest.param(_audience(""), "token has no 'aud' claim", id="aud empty"),
]


@pytest.mark.parametrize(("claims", "reason"), ISS_AUD_CASES)
def test_iss_and_aud_match_exactly(gateway: Gateway, claims: Callable[[Gateway], dict[str, Any]],
                                   reason: str | None) -> None:
    """SharePoint's aud at Exchange: tests/test_gateway_e2e.py::test_invalid_token_claims_get_401."""
    answered(send(gateway, issuer_signed(gateway, **claims(gateway))), reason)


# --- time claims ------------------------------------------------------------------------------

def _time(claim: str, value: Callable[[int], object]) -> Callable[[Gateway], dict[str, Any]]:
    return lambda g: {claim: value(int(outlook_claims(g)["exp"]))}


TIME_CASES = [
    pytest.param(_time("exp", lambda exp: exp), None, id="twin: integer exp"),
    pytest.param(_time("exp", lambda exp: exp + 0.5), None, id="twin: fractional exp (a NumericDate may be)"),
    pytest.param(_time("exp", lambda exp: MISSING), "token has no 'exp' claim", id="no exp"),
    pytest.param(_time("exp", lambda exp: None), "token has no 'exp' claim", id="exp null"),
    pytest.param(_time("exp", str), "token has a malformed 'exp' claim", id="exp a numeric string"),
    pytest.param(_time("exp", lambda exp: True), "token expired", id="exp true (int() reads 1)"),
    pytest.param(_time("exp", lambda exp: 10**30), "token has a malformed 'exp' claim", id="exp beyond year 9999"),
    pytest.param(_time("exp", lambda exp: 1e300), "token has a malformed 'exp' claim", id="exp 1e300"),
    pytest.param(_time("exp", lambda exp: float("inf")), MALFORMED, id="exp Infinity (no JSON number)"),
    pytest.param(_time("exp", lambda exp: [exp]), MALFORMED, id="exp a list"),
    pytest.param(_time("nbf", lambda exp: "0"), "token has a malformed 'nbf' claim", id="nbf a string"),
    pytest.param(_time("nbf", lambda exp: True), "token has a malformed 'nbf' claim", id="nbf true"),
    pytest.param(_time("nbf", lambda exp: None), MALFORMED, id="nbf null"),
    pytest.param(_time("nbf", lambda exp: -1), "token has a malformed 'nbf' claim", id="nbf before 1970"),
    pytest.param(_time("iat", lambda exp: exp - 3600.25), None, id="twin: fractional iat"),
    pytest.param(_time("iat", lambda exp: MISSING), "token has no 'iat' claim", id="no iat (RFC 9068 2.2)"),
    pytest.param(_time("iat", lambda exp: None), "token has no 'iat' claim", id="iat null"),
    pytest.param(_time("iat", lambda exp: str(exp - 3600)), "token has a malformed 'iat' claim", id="iat a string"),
    pytest.param(_time("iat", lambda exp: -1), "token has a malformed 'iat' claim", id="iat before 1970"),
    pytest.param(_time("iat", lambda exp: [exp - 3600]), MALFORMED, id="iat a list"),
    pytest.param(_time("iat", lambda exp: exp), "token not yet valid", id="iat an hour ahead"),
    pytest.param(_time("iat", lambda exp: False), "token has a malformed 'iat' claim", id="iat false"),
    pytest.param(_time("iat", lambda exp: {"t": 1}), "malformed token", id="iat an object"),
    pytest.param(_time("auth_time", lambda exp: "yesterday"), "token has a malformed 'auth_time' claim",
                 id="auth_time a string"),
]


@pytest.mark.parametrize(("claims", "reason"), TIME_CASES)
def test_time_claims_are_numbers(gateway: Gateway, claims: Callable[[Gateway], dict[str, Any]],
                                 reason: str | None) -> None:
    """Expired and not-yet-valid: tests/test_gateway_e2e.py::test_invalid_token_claims_get_401."""
    answered(send(gateway, issuer_signed(gateway, **claims(gateway))), reason)


# --- one reading of the claims ----------------------------------------------------------------

def _claims_text(gateway: Gateway, before: str = "", after: str = "") -> str:
    """Alex's claims as JSON text, with raw members put before or after the issuer's own."""
    text = json.dumps(outlook_claims(gateway))
    return "{" + before + text[1:-1] + after + "}"


def _header_text(gateway: Gateway) -> str:
    return json.dumps({"alg": "RS256", "typ": "JWT", "kid": gateway.idp.kid})


def _issuer_signed_bytes(claims: Callable[[Gateway], bytes],
                         header: Callable[[Gateway], bytes] | None = None) -> Callable[[Gateway], str]:
    """Signed by the issuer's real key over exactly these bytes: the signature is no obstacle."""
    def build(g: Gateway) -> str:
        return jws_of_segments(header(g) if header else _header_text(g).encode(), claims(g), rs256(g.idp.key))
    return build


def _claims(before: str = "", after: str = "", codec: str = "utf-8", prefix: bytes = b"") -> Callable[[Gateway], str]:
    return _issuer_signed_bytes(lambda g: prefix + _claims_text(g, before, after).encode(codec))


def _header(change: Callable[[Gateway], bytes]) -> Callable[[Gateway], str]:
    return _issuer_signed_bytes(lambda g: _claims_text(g).encode(), change)


ONE_READING_CASES = [
    pytest.param(_claims(), None, id="twin: UTF-8 JSON"),
    pytest.param(_claims(after=', "nickname": "zoë"'), None, id="twin: UTF-8 beyond ASCII"),
    *(pytest.param(_claims(codec=codec), CLAIMS_NOT_UTF8, id=f"claims in {codec}")
      for codec in ("utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-be")),
    pytest.param(_claims(prefix=b"\xef\xbb\xbf"), CLAIMS_NOT_UTF8, id="UTF-8 claims after a byte-order mark"),
    pytest.param(_claims(after=f', "azp": "{TEAMS}"'), CLAIM_NAMED_TWICE, id="azp twice, another app last"),
    pytest.param(_claims(before=f'"azp": "{TEAMS}", '), CLAIM_NAMED_TWICE, id="azp twice, another app first"),
    pytest.param(_claims(after=', "sub": "sub-of-the-ceo"'), CLAIM_NAMED_TWICE, id="sub twice, another user last"),
    pytest.param(_claims(before='"sub": "sub-of-the-ceo", '), CLAIM_NAMED_TWICE, id="sub twice, another user first"),
    pytest.param(_claims(after=f', "deviceid": "{BLAKE_ANDROID}"'), CLAIM_NAMED_TWICE,
                 id="deviceid twice, a noncompliant device last"),
    pytest.param(_claims(before=f'"deviceid": "{BLAKE_ANDROID}", '), CLAIM_NAMED_TWICE,
                 id="deviceid twice, a noncompliant device first"),
    pytest.param(_claims(after=', "\\u0061zp": "x"'), CLAIM_NAMED_TWICE, id="azp twice, once spelled with an escape"),
    pytest.param(_claims(after=', "cnf": {"jkt": "a", "jkt": "b"}'), CLAIM_NAMED_TWICE,
                 id="a member twice in a nested claim"),
    pytest.param(_claims(after=', "x": ' + "[" * 31 + "]" * 31), None, id="twin: claims nested 32 deep"),
    pytest.param(_claims(after=', "x": ' + "[" * 32 + "]" * 32), MALFORMED, id="claims nested 33 deep"),
    pytest.param(_claims(after=', "x": ' + "[" * 5000), MALFORMED, id="a claim opening 5,000 lists"),
    pytest.param(_claims(after=', "nickname": "\\ud800"'), CLAIMS_NOT_UTF8, id="an unpaired surrogate"),
    pytest.param(_header(lambda g: _header_text(g)[:-1].encode() + b', "alg": "none"}'), MALFORMED,
                 id="header: alg twice"),
    pytest.param(_header(lambda g: _header_text(g)[:-1].encode() + f', "kid": "{g.idp.kid}"}}'.encode()), MALFORMED,
                 id="header: kid twice, the same value"),
    pytest.param(_header(lambda g: _header_text(g).encode("utf-16")), MALFORMED, id="header in UTF-16"),
    pytest.param(_header(lambda g: b"\xef\xbb\xbf" + _header_text(g).encode()), MALFORMED,
                 id="header after a byte-order mark"),
]


@pytest.mark.parametrize(("build", "reason"), ONE_READING_CASES)
def test_a_token_with_more_than_one_reading_gets_401_and_never_reaches_the_upstream(
        gateway: Gateway, jwks_fetches: Hits, build: Callable[[Gateway], str], reason: str | None) -> None:
    """Signed by the issuer, yet read one way here and maybe another by the upstream it would be
    forwarded to: pyjwt's ``json.loads`` guesses UTF-16 and keeps the last of two members."""
    answered(send(gateway, build(gateway)), reason)
    assert jwks_fetches.count == 0


# --- crit, typ, cty, nesting and ID tokens ----------------------------------------------------

HEADER_CASES = [
    pytest.param({}, None, id="twin: typ JWT, no crit"),
    pytest.param({"typ": MISSING}, None, id="twin: no typ"),
    pytest.param({"typ": "jwt"}, None, id="twin: typ jwt"),
    pytest.param({"typ": "at+jwt"}, None, id="twin: typ at+jwt (RFC 9068)"),
    pytest.param({"typ": "application/at+jwt"}, None, id="twin: typ application/at+jwt"),
    pytest.param({"crit": ["exp"], "exp": 1}, CRITICAL_EXTENSION, id="crit naming an unknown extension"),
    pytest.param({"crit": ["b64"], "b64": True}, CRITICAL_EXTENSION, id="crit b64 (RFC 7797, pyjwt knows it)"),
    pytest.param({"crit": []}, CRITICAL_EXTENSION, id="crit empty"),
    pytest.param({"crit": "b64"}, CRITICAL_EXTENSION, id="crit a string"),
    pytest.param({"b64": True}, CRITICAL_EXTENSION, id="b64 without crit"),
    pytest.param({"typ": "dpop+jwt"}, TYPE_NOT_ACCEPTED, id="a DPoP proof"),
    pytest.param({"typ": "logout+jwt"}, TYPE_NOT_ACCEPTED, id="a logout token"),
    pytest.param({"typ": "secevent+jwt"}, TYPE_NOT_ACCEPTED, id="a security event token"),
    pytest.param({"typ": "portcullis-assertion+jwt"}, TYPE_NOT_ACCEPTED, id="a Portcullis upstream assertion"),
    pytest.param({"typ": "JWE"}, TYPE_NOT_ACCEPTED, id="typ JWE"),
    pytest.param({"typ": ""}, TYPE_NOT_ACCEPTED, id="typ empty"),
    pytest.param({"typ": None}, TYPE_NOT_ACCEPTED, id="typ null"),
    pytest.param({"typ": ["JWT"]}, TYPE_NOT_ACCEPTED, id="typ a list"),
    pytest.param({"cty": "JWT"}, TYPE_NOT_ACCEPTED, id="cty JWT (a nested token)"),
    pytest.param({"cty": "json"}, TYPE_NOT_ACCEPTED, id="cty json"),
]


@pytest.mark.parametrize(("header", "reason"), HEADER_CASES)
def test_crit_typ_and_cty_headers(gateway: Gateway, jwks_fetches: Hits, header: dict[str, Any],
                                  reason: str | None) -> None:
    answered(send(gateway, issuer_signed(gateway, header)), reason)
    assert jwks_fetches.count == 0


def test_a_nested_token_is_refused_with_or_without_cty(gateway: Gateway) -> None:
    """A JWS whose payload is the issuer's valid token: never unwrapped."""
    inner = issuer_signed(gateway)
    for header in ({"cty": "JWT"}, {}):
        signing_input = f"{b64(json.dumps({'alg': 'RS256', 'kid': gateway.idp.kid, **header}).encode())}." \
                        f"{b64(inner.encode())}"
        token = f"{signing_input}.{b64(rs256(gateway.idp.key)(signing_input.encode()))}"
        refused_401(send(gateway, token), TYPE_NOT_ACCEPTED if header else MALFORMED)
    forwarded(send(gateway, inner))


def issuer_id_token(gateway: Gateway, nonce: str) -> str:
    """A real ID token from the demo issuer's code flow (PKCE), as the gateway's browser sign-in gets."""
    verifier = secrets.token_urlsafe(48)
    redirect = f"https://{MAIL}/.portcullis/callback"
    grant = {"response_type": "code", "client_id": CLIENT_ID, "redirect_uri": redirect, "state": "s", "nonce": nonce,
             "code_challenge": b64(hashlib.sha256(verifier.encode()).digest()), "code_challenge_method": "S256",
             "user": "alex@contoso.test", "device_id": ALEX_IPHONE}
    with httpx.Client(timeout=10) as client:
        granted = client.post(f"{gateway.idp.issuer}/oauth2/authorize", data=grant)
        code = parse_qs(urlsplit(granted.headers["location"]).query)["code"][0]
        tokens = client.post(f"{gateway.idp.issuer}/oauth2/token",
                             data={"grant_type": "authorization_code", "code": code, "redirect_uri": redirect,
                                   "code_verifier": verifier, "client_id": CLIENT_ID})
    return str(tokens.json()["id_token"])


def test_an_id_token_is_not_an_access_token(gateway: Gateway) -> None:
    """At the listener its aud (the gateway's client id) is no protected host's; the twin is the
    access token of the same user, app and device."""
    id_token = issuer_id_token(gateway, nonce=secrets.token_urlsafe(8))
    assert jwt.decode(id_token, options={"verify_signature": False})["aud"] == CLIENT_ID
    refused_401(send(gateway, id_token), AUDIENCE_NOT_ACCEPTED)
    forwarded(send(gateway, outlook_token(gateway)))


def test_an_id_token_is_refused_even_where_its_aud_is_accepted(gateway: Gateway) -> None:
    """Should a host ever list the client id among its audiences, the ``nonce`` still tells an
    ID token apart; the browser callback (``validate_id_token``) keeps accepting it."""
    nonce = secrets.token_urlsafe(8)
    id_token = issuer_id_token(gateway, nonce=nonce)
    settings = IdentitySettings.model_validate_json(json.dumps({"issuer": gateway.idp.issuer}), strict=True)
    validator = BearerValidator(settings, TrustedIssuers(settings))

    async def both() -> tuple[Identity | RejectedToken, Identity | RejectedToken]:
        return (await validator.validate(id_token, frozenset({CLIENT_ID})),
                await validator.validate_id_token(id_token, CLIENT_ID, nonce))

    as_access_token, as_id_token = asyncio.run(both())
    assert as_access_token == RejectedToken(ID_TOKEN_PRESENTED)
    assert isinstance(as_id_token, Identity) and as_id_token.user_principal_name == "alex@contoso.test"


# --- signatures -------------------------------------------------------------------------------

RSA_SIGNATURE_CASES = [
    pytest.param(lambda g, t: t, None, id="twin: the issuer's signature"),
    pytest.param(lambda g, t: with_signature(t, bytes(256)), BAD_SIGNATURE, id="256 zero bytes"),
    pytest.param(lambda g, t: with_signature(t, b"\xff" * 256), BAD_SIGNATURE, id="above the modulus"),
    pytest.param(lambda g, t: with_signature(t, b"\x01"), BAD_SIGNATURE, id="one byte"),
    pytest.param(lambda g, t: with_signature(t, b""), BAD_SIGNATURE, id="empty"),
    pytest.param(lambda g, t: with_signature(t, base64.urlsafe_b64decode(t.rsplit(".", 1)[1] + "==")[:-1]),
                 BAD_SIGNATURE, id="one byte short"),
    pytest.param(lambda g, t: with_signature(t, base64.urlsafe_b64decode(t.rsplit(".", 1)[1] + "==") + b"\x00"),
                 BAD_SIGNATURE, id="one byte long"),
    pytest.param(lambda g, t: with_signature(t, issuer_signed(g, sub="someone-else").rsplit(".", 1)[1]),
                 BAD_SIGNATURE, id="another token's signature"),
    pytest.param(lambda g, t: with_signature(t, g.idp.key.sign(t.rsplit(".", 1)[0].encode(), padding.PSS(
        mgf=padding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256())), BAD_SIGNATURE,
                 id="PSS padding under an RS256 header"),
    pytest.param(lambda g, t: t.rsplit(".", 1)[0] + "." +
                 base64.b64encode(base64.urlsafe_b64decode(t.rsplit(".", 1)[1] + "==")).decode().rstrip("="),
                 MALFORMED, id="the same signature in the standard base64 alphabet"),
    pytest.param(lambda g, t: t + "==", MALFORMED, id="the same signature padded"),
]


@pytest.mark.parametrize(("mangle", "reason"), RSA_SIGNATURE_CASES)
def test_rsa_signature_edge_cases(gateway: Gateway, mangle: Callable[[Gateway, str], str], reason: str | None) -> None:
    """One token has one spelling: pyjwt 2.15 refuses ``+``/``/`` but takes a padded signature."""
    token = issuer_signed(gateway)
    while "-" not in token.rsplit(".", 1)[1] and "_" not in token.rsplit(".", 1)[1]:
        token = issuer_signed(gateway, jti=secrets.token_hex(4))  # a signature the std alphabet spells otherwise
    answered(send(gateway, mangle(gateway, token)), reason)


def _raw(r: int, s: int) -> bytes:
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


ES256_CASES = [
    pytest.param(lambda r, s, der: _raw(r, s), None, id="twin: raw r||s"),
    pytest.param(lambda r, s, der: _raw(r, P256_ORDER - s if s < P256_ORDER // 2 else s), None,
                 id="twin: high-S (accepted, decided)"),
    pytest.param(lambda r, s, der: _raw(0, 0), BAD_SIGNATURE, id="r = s = 0 (psychic signature)"),
    pytest.param(lambda r, s, der: _raw(P256_ORDER, P256_ORDER), BAD_SIGNATURE, id="r = s = n"),
    pytest.param(lambda r, s, der: der, BAD_SIGNATURE, id="DER instead of raw"),
    pytest.param(lambda r, s, der: _raw(r, s)[:-1], BAD_SIGNATURE, id="63 bytes"),
    pytest.param(lambda r, s, der: _raw(r, s) + b"\x00", BAD_SIGNATURE, id="65 bytes"),
    pytest.param(lambda r, s, der: _raw(s, r), BAD_SIGNATURE, id="s||r"),
]


@dataclass(frozen=True)
class Running:
    port: int
    key: ec.EllipticCurvePrivateKey
    issuer: str


@pytest.fixture(scope="class")
def es256(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory, demo_ports: Ports) -> Iterator[Running]:
    """An issuer pinned to ES256 on a gateway of its own, for one test class (torn down with it,
    before any other test talks to the session's gateway)."""
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = {**json.loads(ECAlgorithm.to_jwk(key.public_key())), "kid": "ec-1", "use": "sig"}  # no alg, as Entra
    with LoopbackServer(answer({"keys": [jwk]})) as issuer, \
            gateway_on(issuer, gateway, tmp_path_factory.mktemp("es256"), demo_ports, algorithms=["ES256"]) as port:
        yield Running(port, key, issuer.issuer)


class TestES256Issuer:
    """An issuer pinned to ES256 (config ``identity.algorithms: [ES256]``) on a gateway of its own."""

    def token(self, gateway: Gateway, es256: Running, sign: Callable[[int, int, bytes], bytes],
              key: ec.EllipticCurvePrivateKey | None = None) -> str:
        header = {"alg": "ES256", "typ": "JWT", "kid": "ec-1"}
        signing_input = f"{b64(json.dumps(header).encode())}." \
                        f"{b64(json.dumps(outlook_claims(gateway, iss=es256.issuer)).encode())}"
        der = (key or es256.key).sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return f"{signing_input}.{b64(sign(r, s, der))}"

    @pytest.mark.parametrize(("sign", "reason"), ES256_CASES)
    def test_ecdsa_signature_edge_cases(self, gateway: Gateway, es256: Running,
                                        sign: Callable[[int, int, bytes], bytes], reason: str | None) -> None:
        answered(send(gateway, self.token(gateway, es256, sign), port=es256.port), reason)

    def test_high_s_is_the_other_spelling_of_the_same_signature(self, es256: Running) -> None:
        """Why accepting it is safe: it verifies the very same signing input (nothing else changes)."""
        der = es256.key.sign(b"input", ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        es256.key.public_key().verify(encode_dss_signature(r, P256_ORDER - s), b"input", ec.ECDSA(hashes.SHA256()))

    def test_an_attackers_p256_key_under_the_issuers_kid_is_refused(self, gateway: Gateway, es256: Running) -> None:
        forged = self.token(gateway, es256, lambda r, s, der: _raw(r, s), key=ec.generate_private_key(ec.SECP256R1()))
        refused_401(send(gateway, forged, port=es256.port), BAD_SIGNATURE)

    def test_rs256_is_not_accepted_where_only_es256_is_pinned(self, gateway: Gateway, es256: Running) -> None:
        token = issuer_signed(gateway, {"kid": "ec-1"}, iss=es256.issuer)
        refused_401(send(gateway, token, port=es256.port), ALGORITHM_NOT_ALLOWED)


# --- oversized and malformed tokens -----------------------------------------------------------

def _segments(*parts: bytes) -> str:
    return ".".join(b64(p) for p in parts)


MALFORMED_CASES = [
    pytest.param(lambda g: issuer_signed(g), None, id="twin: a well-formed token"),
    pytest.param(lambda g: "a" * (16 * 1024 + 1), "token too large", id="more than 16 KiB (its header line fits)"),
    pytest.param(lambda g: ".".join(issuer_signed(g).split(".")[:2]), MALFORMED, id="2 segments"),
    pytest.param(lambda g: issuer_signed(g) + ".AAAA", MALFORMED, id="4 segments"),
    pytest.param(lambda g: _segments(json.dumps({"alg": "RSA-OAEP", "enc": "A256GCM", "kid": g.idp.kid}).encode(),
                                     b"k" * 256, b"iv", b"ciphertext", b"tag"), MALFORMED, id="JWE (5 segments)"),
    pytest.param(lambda g: "a." + issuer_signed(g).split(".", 1)[1], MALFORMED, id="header not base64"),
    pytest.param(lambda g: _segments(b'{"alg": "RS256", "kid"', b"{}", b"s"), MALFORMED, id="header not JSON"),
    pytest.param(lambda g: _segments(b'["RS256"]', b"{}", b"s"), MALFORMED, id="header a JSON list"),
    pytest.param(lambda g: _segments(b"[" * 5000, b"{}", b"s"), MALFORMED, id="header nested 5000 deep"),
    pytest.param(lambda g: _segments(b'{"alg": "RS256", "kid": "\xff"}', b"{}", b"s"), MALFORMED,
                 id="header not UTF-8"),
    pytest.param(lambda g: "..", MALFORMED, id="dots only"),
    pytest.param(lambda g: "e30.e30.e30.e30.e30", MALFORMED, id="five empty objects"),
]


@pytest.mark.parametrize(("build", "reason"), MALFORMED_CASES)
def test_oversized_and_malformed_tokens_get_a_fixed_401_without_a_jwks_fetch(
        gateway: Gateway, jwks_fetches: Hits, build: Callable[[Gateway], str], reason: str | None) -> None:
    answered(send(gateway, build(gateway)), reason)
    assert jwks_fetches.count == 0


def test_a_token_with_non_ascii_characters_gets_a_fixed_401(gateway: Gateway, jwks_fetches: Hits) -> None:
    token = issuer_signed(gateway)
    for sent, status in ((token.replace(".", ".ü", 1), "401"), (token, "200")):
        answer = raw_exchange(gateway, f"POST {ACTIVESYNC} HTTP/1.1\r\nHost: {MAIL}\r\nAuthorization: Bearer {sent}\r\n"
                                       "Content-Length: 0\r\nConnection: close\r\n\r\n")
        assert answer.startswith(f"HTTP/1.1 {status}"), answer[:300]
    assert f'error_description="{MALFORMED}"' in raw_exchange(
        gateway, f"POST {ACTIVESYNC} HTTP/1.1\r\nHost: {MAIL}\r\nAuthorization: Bearer ü{token}\r\n"
                 "Content-Length: 0\r\nConnection: close\r\n\r\n")
    assert jwks_fetches.count == 0


# --- one way to present a token ---------------------------------------------------------------

def _raw_post(gateway: Gateway, head: str) -> str:
    return raw_exchange(gateway, f"POST {ACTIVESYNC} HTTP/1.1\r\nHost: {MAIL}\r\n{head}"
                                 "Content-Length: 0\r\nConnection: close\r\n\r\n")


def test_two_authorization_headers_get_401_even_when_they_agree(gateway: Gateway) -> None:
    """(tests/test_request_hygiene.py::test_bearer_token_parsing has the parser's side.)"""
    token, other = outlook_token(gateway), outlook_token(gateway, user="casey@contoso.test")
    for second in (other, token):
        answer = _raw_post(gateway, f"Authorization: Bearer {token}\r\nAuthorization: Bearer {second}\r\n")
        assert answer.startswith("HTTP/1.1 401"), answer[:300]
        assert 'error_description="more than one Authorization header"' in answer
        assert token not in answer and "receivedHeaders" not in answer
    assert _raw_post(gateway, f"Authorization: Bearer {token}\r\n").startswith("HTTP/1.1 200")


@pytest.mark.parametrize(("query", "with_header", "status"), [
    pytest.param("&mailbox=alex&token_type=x", True, 200, id="twin: other parameters"),
    pytest.param("&access_token={token}", True, 400, id="the same token in the header and the query"),
    pytest.param("&access_token={other}", True, 400, id="another user's token in the query"),
    pytest.param("&access_token={token}", False, 400, id="the query alone"),
    pytest.param("&Access_Token={token}", False, 400, id="name in another case"),
    pytest.param("&access%5Ftoken={token}", True, 400, id="name percent-encoded"),
    pytest.param("&access_token=", True, 400, id="empty value"),
])
def test_an_access_token_in_the_url_is_refused(gateway: Gateway, query: str, with_header: bool, status: int) -> None:
    """RFC 6750 §2.3 is not supported: a URL token is neither read nor let through to an upstream
    that might read it instead of the one the gateway checked."""
    token, other = outlook_token(gateway), outlook_token(gateway, user="casey@contoso.test")
    response = gateway.request(MAIL, ACTIVESYNC + query.format(token=token, other=other), method="POST",
                               token=token if with_header else None)
    assert response.status_code == status, response.text
    if status == 400:
        assert response.json()["error_description"] == "an access token is accepted only in the Authorization header"
        record = json.dumps(gateway.decision(response.headers["x-portcullis-correlation-id"]))
        assert token not in response.text and token not in record and other not in record
    else:
        forwarded(response)


def test_a_bearer_token_and_a_session_cookie_must_name_the_same_user(gateway: Gateway) -> None:
    """A browser session can ride along with a bearer request (the cookie goes with every request
    to the host); the bearer token decides, but a session of somebody else is a 400, never a
    silent choice. A cookie that names no session changes nothing."""
    token = outlook_token(gateway)
    _, alex_cookie = sign_in(gateway, user="alex@contoso.test", device=ALEX_IPHONE)
    _, casey_cookie = sign_in(gateway, user="casey@contoso.test", device=ALEX_IPHONE)

    def with_cookie(cookie: str, bearer: str = token) -> httpx.Response:
        return gateway.request(MAIL, ACTIVESYNC, method="POST", token=bearer, headers={"Cookie": cookie})

    mixed = with_cookie(casey_cookie)
    assert mixed.status_code == 400, mixed.text
    assert mixed.json()["error_description"] == "the bearer token and the session cookie name different users"
    for cookie in (alex_cookie, f"{COOKIE_NAME}=not-a-session", "theme=dark"):
        same = with_cookie(cookie)
        forwarded(same)
        assert COOKIE_NAME not in same.json()["receivedHeaders"].get("cookie", "")
    pairwise = with_cookie(alex_cookie, outlook_token(gateway, extra={"sub": "pairwise-sub-of-outlook"}))
    forwarded(pairwise)  # Entra's sub differs per app: the same oid is the same user
    refused_401(with_cookie(alex_cookie, outlook_token(gateway, lifetime=-600)), "token expired")


def test_a_token_in_a_form_body_is_never_read(gateway: Gateway) -> None:
    """RFC 6750 §2.2 is not supported: the gateway decides on the headers, before any body."""
    token = outlook_token(gateway)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    refused = gateway.request(MAIL, ACTIVESYNC, method="POST", headers=form, content=f"access_token={token}")
    assert refused.status_code == 401 and refused.json()["error_description"] == "no bearer token"
    assert "error=" not in refused.headers["www-authenticate"]  # no credentials, as far as the gateway reads
    forwarded(gateway.request(MAIL, ACTIVESYNC, method="POST", headers=form, token=token, content="folder=inbox"))


# --- an issuer answering garbage, slowly, or not at all ---------------------------------------

def _demo_jwk(gateway: Gateway) -> dict[str, Any]:
    return dict(gateway.idp.jwks()["keys"][0])


GARBAGE_JWKS = [
    pytest.param(lambda g: answer(g.idp.jwks()), 200, id="twin: the issuer's JWKS"),
    pytest.param(lambda g: answer(b"<html>maintenance</html>"), 503, id="not JSON"),
    pytest.param(lambda g: answer([_demo_jwk(g)]), 503, id="a JSON list"),
    pytest.param(lambda g: answer({"keys": {"0": _demo_jwk(g)}}), 503, id="keys not a list"),
    pytest.param(lambda g: answer({"keys": [{"kty": "oct", "kid": g.idp.kid, "k": b64(b"secret")}]}), 503,
                 id="a symmetric key under the issuer's kid"),
    pytest.param(lambda g: answer({"keys": [{**_demo_jwk(g), "kty": "XYZ"}]}), 503, id="an unknown kty"),
    pytest.param(lambda g: answer({"keys": [{**_demo_jwk(g), "use": "enc"}]}), 503, id="an encryption key only"),
    pytest.param(lambda g: answer({"keys": [_demo_jwk(g)], "padding": "x" * (MAX_JWKS_BYTES + 1)}), 503,
                 id="over the size cap"),
    pytest.param(lambda g: answer(g.idp.jwks(), headers=(("Content-Encoding", "gzip"),)), 503,
                 id="compressed although identity was asked for"),
    pytest.param(lambda g: answer({"error": "down"}, 500), 503, id="a 500"),
    pytest.param(lambda g: silent, 503, id="no answer within the timeout"),
    pytest.param(lambda g: drip, 503, id="a byte at a time, for ever"),
    pytest.param(lambda g: answer(('{"keys": [], ' + json.dumps(g.idp.jwks())[1:]).encode()), 503,
                 id="keys named twice, the issuer's last"),
    pytest.param(lambda g: answer(json.dumps(g.idp.jwks()).encode("utf-16")), 503, id="in UTF-16"),
    pytest.param(lambda g: answer(b"\xef\xbb\xbf" + json.dumps(g.idp.jwks()).encode()), 503,
                 id="after a byte-order mark"),
    pytest.param(lambda g: answer({**g.idp.jwks(), "x": json.loads("[" * 100 + "]" * 100)}), 503,
                 id="nested 100 deep"),
]


@pytest.mark.parametrize(("jwks", "status"), GARBAGE_JWKS)
def test_an_issuer_answering_garbage_or_slowly_fails_closed_with_503(
        gateway: Gateway, tmp_path: Path, demo_ports: Ports, jwks: Callable[[Gateway], Route], status: int) -> None:
    """With ``httpTimeoutSeconds: 1``, a total deadline per document: the client (10 s timeout)
    gets its 503 instead of hanging. The unreachable issuer: test_gateway_e2e.py."""
    with LoopbackServer(jwks(gateway)) as issuer, \
            gateway_on(issuer, gateway, tmp_path, demo_ports, httpTimeoutSeconds=1) as port:
        response = send(gateway, outlook_token(gateway, extra={"iss": issuer.issuer}), port=port)
    assert response.status_code == status, response.text
    if status == 503:
        assert response.json()["error"] == "temporarily_unavailable"
        assert "receivedHeaders" not in response.text
    else:
        forwarded(response)


@pytest.mark.parametrize("discovery", [
    pytest.param(lambda i: f'{{"jwks_uri": "{i.url("attacker/jwks")}", "issuer": "{i.issuer}", '
                           f'"jwks_uri": "{i.issuer}/keys"}}'.encode(), id="jwks_uri named twice, the issuer's last"),
    pytest.param(lambda i: json.dumps({"issuer": i.issuer, "jwks_uri": f"{i.issuer}/keys"}).encode("utf-16"),
                 id="in UTF-16"),
])
def test_a_discovery_document_with_two_readings_fails_closed_with_503(
        gateway: Gateway, tmp_path: Path, demo_ports: Ports, discovery: Callable[[LoopbackServer], bytes]) -> None:
    """The twin (the same document in UTF-8, each member once) is GARBAGE_JWKS' first case."""
    with LoopbackServer(answer(gateway.idp.jwks())) as issuer, \
            gateway_on(issuer, gateway, tmp_path, demo_ports, httpTimeoutSeconds=1) as port:
        issuer.routes["/contoso/.well-known/openid-configuration"] = answer(discovery(issuer))
        response = send(gateway, outlook_token(gateway, extra={"iss": issuer.issuer}), port=port)
        assert issuer.hits["/attacker/jwks"] == 0
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "temporarily_unavailable"


@pytest.mark.parametrize(("body", "refused"), [
    pytest.param(b'{"access_token": "t1", "token_type": "Bearer", "expires_in": 3599}', False, id="twin"),
    pytest.param(b'{"access_token": "t1", "token_type": "Bearer", "access_token": "t2"}', True,
                 id="access_token named twice"),
    pytest.param('{"access_token": "t1", "token_type": "Bearer"}'.encode("utf-16"), True, id="in UTF-16"),
    pytest.param(b'{"access_token": "t1", "token_type": "Bearer", "x": ' + b"[" * 20_000 + b"}", True,
                 id="nested 20,000 deep"),
])
def test_a_token_endpoint_answer_with_two_readings_is_refused(body: bytes, refused: bool) -> None:
    """What browser sign-in (code flow) and the Graph connector (client credentials) get from the
    issuer's token endpoint: authlib would read it with httpx's guessing ``json()``."""
    transport = httpx.MockTransport(lambda _: httpx.Response(200, content=body,
                                                            headers={"Content-Type": "application/json"}))

    async def fetch() -> object:
        client = strict_oauth_client(client_id="c", client_secret="s", transport=transport,
                                     token_endpoint="https://login.microsoftonline.test/t/oauth2/v2.0/token",
                                     grant_type="client_credentials")
        try:
            return await client.fetch_token()
        finally:
            await client.aclose()

    if refused:
        with pytest.raises(JsonRefused):
            asyncio.run(fetch())
    else:
        assert asyncio.run(fetch())["access_token"] == "t1"  # type: ignore[index]


def _issuer_transport(idp: DemoIdentityProvider, jwks: Callable[[], httpx.Response]) -> httpx.MockTransport:
    def serve(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("openid-configuration"):
            return httpx.Response(200, json={"issuer": idp.issuer, "jwks_uri": f"{idp.issuer}/keys"})
        return jwks()

    return httpx.MockTransport(serve)


def test_reading_a_huge_jwks_stops_at_the_cap() -> None:
    idp = DemoIdentityProvider("http://127.0.0.1:9/contoso")
    served = Hits()

    async def endless() -> AsyncIterator[bytes]:
        yield b'{"keys": ['
        for _ in range(128):  # 8 MiB, were it all read
            served.count += 65536
            yield b" " * 65536

    jwks = JwksCache(idp.issuer, cache_seconds=3600, min_refresh_interval=30, timeout=5,
                     transport=_issuer_transport(idp, lambda: httpx.Response(200, content=endless())))
    with pytest.raises(SignalUnavailable, match="more than"):
        asyncio.run(jwks.refresh())
    assert served.count <= MAX_JWKS_BYTES + 2 * 65536


def test_known_keys_outlive_a_down_issuer_only_until_the_staleness_bound() -> None:
    """Known keys keep working through failed refreshes (a blip at the issuer is no outage), but
    not for ever: ``max_stale_seconds`` past ``cache_seconds``, tokens get a 503, never a pass."""
    idp = DemoIdentityProvider("http://127.0.0.1:9/contoso")
    up, clock = [True], Clock()

    def jwks_answer() -> httpx.Response:
        return httpx.Response(200, json=idp.jwks()) if up[0] else httpx.Response(503)

    jwks = JwksCache(idp.issuer, cache_seconds=3600, min_refresh_interval=30, timeout=5, timer=clock,
                     transport=_issuer_transport(idp, jwks_answer), max_stale_seconds=600)

    async def scenario() -> None:
        assert await jwks.key(idp.kid, "RS256") is not None
        up[0] = False
        clock.now += 3600 + 599
        assert await jwks.key(idp.kid, "RS256") is not None, "within the bound: the known key still serves"
        assert jwks.refresh_failing
        clock.now += 2
        with pytest.raises(SignalUnavailable, match="too long"):
            await jwks.key(idp.kid, "RS256")
        up[0] = True
        clock.now += 31  # the next refresh attempt is allowed again
        assert await jwks.key(idp.kid, "RS256") is not None, "the issuer is back: so are its keys"

    asyncio.run(scenario())
