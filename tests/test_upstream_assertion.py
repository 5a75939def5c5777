"""The upstream identity assertion: every forwarded request carries a JWT signed with the gateway's
key, for that upstream only, short-lived, verifiable with the JWKS the gateway publishes on its
service host; client-sent copies never reach the upstream; nothing is forwarded for a block."""

from __future__ import annotations

import shutil
import stat
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc.jwk import ECKey

from gateway.app.demo import ALEX_IPHONE, EXCHANGE, OUTLOOK_MOBILE, SHAREPOINT, TEAMS
from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.identity.assertion import (
    TOKEN_TYPE,
    AssertionSigner,
    assertion_issuer,
    assertion_signer,
    load_or_create_key,
    verify_assertion,
)
from gateway.identity.tokens import RejectedToken
from gateway.policy.model import ClientApp, ComplianceState, DeviceSignals, DeviceThreatLevel, Identity, ManagedDevice
from tests.conftest import REPO, Gateway, Ports
from tests.helpers.browser import BROWSER, sign_in
from tests.helpers.kiosk import kiosk_browser, kiosk_sign_in

MAIL, DOCS, SERVICE_HOST = "mail.contoso.test", "docs.contoso.test", "portcullis.contoso.test"
ISSUER = f"https://{SERVICE_HOST}"
HEADER = "x-portcullis-assertion"
ACTIVESYNC = "/Microsoft-Server-ActiveSync?Cmd=Sync&DeviceType=iPhone"


def published_jwks(gateway: Gateway) -> dict[str, Any]:
    response = gateway.request(SERVICE_HOST, "/.well-known/jwks.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    return response.json()


def verified(token: str, jwks: dict[str, Any], audience: str) -> dict[str, Any]:
    """As a backend with plain pyjwt would do it, against the published document."""
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in jwt.PyJWKSet.from_dict(jwks).keys if k.key_id == kid)
    return jwt.decode(token, key.key, algorithms=["ES256"], audience=audience, issuer=ISSUER)


def alex_token(gateway: Gateway, audience: str = EXCHANGE, client_id: str = OUTLOOK_MOBILE) -> str:
    return gateway.idp.mint(user="alex@contoso.test", client_id=client_id, audience=audience, device_id=ALEX_IPHONE)


def test_the_gateway_publishes_its_assertion_key_as_a_jwks(gateway: Gateway) -> None:
    jwks = published_jwks(gateway)
    [key] = jwks["keys"]
    assert (key["kty"], key["crv"], key["alg"], key["use"]) == ("EC", "P-256", "ES256", "sig")
    assert "d" not in key  # the public half only
    public = ECKey.import_key({k: key[k] for k in ("kty", "crv", "x", "y")})
    assert key["kid"] == public.thumbprint()  # RFC 7638, computed by another library


@pytest.mark.parametrize(
    ("host", "path", "method", "audience", "other_upstream"),
    [
        pytest.param(MAIL, ACTIVESYNC, "POST", EXCHANGE, "docs", id="Exchange upstream"),
        pytest.param(DOCS, "/sites/team/Shared%20Documents/", "GET", SHAREPOINT, "mail", id="SharePoint upstream"),
    ],
)
def test_the_upstream_gets_an_assertion_for_itself_only(gateway: Gateway, demo_ports: Ports, host: str, path: str,
                                                        method: str, audience: str, other_upstream: str) -> None:
    response = gateway.request(host, path, method=method, token=alex_token(gateway, audience))
    assert response.status_code == 200
    token = response.json()["receivedHeaders"][HEADER]
    upstream = f"http://127.0.0.1:{demo_ports.mail if host == MAIL else demo_ports.docs}"
    claims = verified(token, published_jwks(gateway), upstream)
    assert claims["aud"] == upstream
    with pytest.raises(jwt.InvalidAudienceError):
        verified(token, published_jwks(gateway), f"http://127.0.0.1:{getattr(demo_ports, other_upstream)}")


def test_the_assertion_says_who_what_app_which_device_and_which_decision(gateway: Gateway,
                                                                         demo_ports: Ports) -> None:
    response = gateway.request(MAIL, ACTIVESYNC, method="POST", token=alex_token(gateway))
    assert response.status_code == 200
    token = response.json()["receivedHeaders"][HEADER]
    claims = verified(token, published_jwks(gateway), f"http://127.0.0.1:{demo_ports.mail}")
    correlation_id = response.headers["x-portcullis-correlation-id"]
    assert jwt.get_unverified_header(token)["typ"] == TOKEN_TYPE
    assert claims["jti"] == claims["decisionId"] == correlation_id
    assert claims["upn"] == "alex@contoso.test"
    assert claims["oid"] == str(uuid.uuid5(uuid.NAMESPACE_URL, "oid:alex@contoso.test"))  # the demo issuer's oid
    assert (claims["azp"], claims["app_displayname"]) == (OUTLOOK_MOBILE, "outlook-mobile")
    assert claims["deviceid"] == ALEX_IPHONE
    assert (claims["isManaged"], claims["compliance"], claims["complianceState"]) == (True, "compliant", "compliant")
    assert claims["threatLevel"] == "low"
    assert claims["nbf"] == claims["iat"] and claims["exp"] - claims["iat"] == 60
    assert response.json()["verifiedAssertion"] == claims  # the demo backend verified it too


def test_a_grace_period_device_is_compliant_as_the_decision_saw_it(gateway: Gateway, demo_ports: Ports) -> None:
    from gateway.app.demo import CASEY_IPAD, activesync

    token = gateway.idp.mint(user="casey@contoso.test", client_id=OUTLOOK_MOBILE, audience=EXCHANGE,
                             device_id=CASEY_IPAD)
    response = gateway.request(MAIL, activesync(CASEY_IPAD, "casey"), method="POST", token=token)
    assert response.status_code == 200
    claims = response.json()["verifiedAssertion"]
    assert (claims["compliance"], claims["complianceState"]) == ("compliant", "inGracePeriod")


@pytest.mark.parametrize("spelling", ["X-Portcullis-Assertion", "x-portcullis-assertion", "X_Portcullis_Assertion",
                                      "X.PORTCULLIS.ASSERTION"])
def test_a_client_sent_assertion_never_reaches_the_upstream(gateway: Gateway, demo_ports: Ports,
                                                            spelling: str) -> None:
    forged = jwt.encode({"upn": "ceo@contoso.test", "aud": f"http://127.0.0.1:{demo_ports.mail}", "iss": ISSUER},
                        ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")
    response = gateway.request(MAIL, ACTIVESYNC, method="POST", token=alex_token(gateway),
                               headers={spelling: forged})
    assert response.status_code == 200
    answer = response.json()
    received = answer["receivedHeaders"]
    assert received[HEADER] != forged
    assert not [name for name in received if name != HEADER and "assertion" in name], received
    assert answer["verifiedAssertion"]["upn"] == "alex@contoso.test"  # exactly one copy, and it verifies


def test_a_public_resource_gets_no_assertion_and_loses_a_forged_one(gateway: Gateway) -> None:
    response = gateway.request(MAIL, "/owa/auth/logon.aspx", headers={"X-Portcullis-Assertion": "forged"})
    assert response.status_code == 200
    assert HEADER not in response.json()["receivedHeaders"]
    assert response.json()["verifiedAssertion"] is None


def test_a_blocked_request_carries_no_assertion(gateway: Gateway) -> None:
    response = gateway.request(MAIL, ACTIVESYNC, method="POST", token=alex_token(gateway, client_id=TEAMS),
                               headers={"X-Portcullis-Assertion": "forged"})
    assert response.status_code == 403
    assert HEADER not in response.headers
    assert "backend" not in response.text


def _forwarded(gateway: Gateway, path: str) -> httpx.Response:
    """Alex (token or session naming Alex's compliant iPhone) opens a page the demo allows, by ``path``."""
    if path == "bearer token":
        return gateway.request(MAIL, ACTIVESYNC, method="POST", token=alex_token(gateway))
    if path == "browser session":
        cookie = sign_in(gateway, device=ALEX_IPHONE)[1]
        return gateway.request(MAIL, "/owa/", headers={**BROWSER, "Cookie": cookie})
    with kiosk_browser(gateway) as kiosk:
        if path == "bearer token through the kiosk":
            return kiosk.get(f"https://{MAIL}/owa/", headers={"Authorization": f"Bearer {alex_token(gateway)}"})
        landed = kiosk_sign_in(kiosk, user="alex@contoso.test", device=ALEX_IPHONE)
        return kiosk.get(f"https://{MAIL}/owa/", headers={"Cookie": landed.headers["set-cookie"].split(";", 1)[0]})


@pytest.mark.parametrize(("path", "device"), [
    pytest.param("bearer token", ALEX_IPHONE, id="bearer token: the token's device"),
    pytest.param("browser session", ALEX_IPHONE, id="browser session: the session's device"),
    pytest.param("bearer token through the kiosk", None, id="kiosk, bearer token: no device"),
    pytest.param("browser session through the kiosk", None, id="kiosk, browser session: no device"),
])
def test_identity_headers_and_the_assertion_name_only_what_the_decision_used(gateway: Gateway, path: str,
                                                                              device: str | None) -> None:
    """Every token and session here names Alex's iPhone; through the kiosk the decision ignores
    it (an unmanaged browser), so the upstream must not be told of it either."""
    response = _forwarded(gateway, path)
    assert response.status_code == 200, response.text
    echo = response.json()
    received, claims = echo["receivedHeaders"], echo["verifiedAssertion"]
    record = gateway.decision(response.headers["x-portcullis-correlation-id"])
    assert record["deviceDetail"]["deviceId"] == device  # what the decision used
    assert received.get("x-portcullis-device-id") == device
    assert (claims.get("deviceid"), claims["isManaged"]) == (device, device is not None)
    assert received["x-portcullis-user"] == claims["upn"] == record["userPrincipalName"] == "alex@contoso.test"
    assert received.get("x-portcullis-client-app") == (record["appDisplayName"] or record["appId"])
    assert claims.get("azp") == record["appId"]


def test_the_service_host_forwards_nothing_whatever_the_token_names(gateway: Gateway) -> None:
    """The gateway's own endpoints answer themselves: no upstream is told anything."""
    response = gateway.request(SERVICE_HOST, "/owa/", token=alex_token(gateway),
                               headers={"X-Portcullis-Device-Id": ALEX_IPHONE})
    assert response.status_code == 404
    assert "backend" not in response.text and ALEX_IPHONE not in response.text


def test_the_service_host_still_serves_the_mtd_webhook_and_nothing_else(gateway: Gateway) -> None:
    assert gateway.request(SERVICE_HOST, "/mtd/demo-mtd/events", method="POST", content=b"{}",
                           headers={"Content-Type": "application/json"}).status_code == 401  # unsigned push
    assert gateway.request(SERVICE_HOST, "/.well-known/openid-configuration").status_code == 404


# The signer and its key, without a listener


def _identity() -> Identity:
    return Identity(subject="s", user_principal_name="alex@contoso.test", object_id="o", tenant_id="t",
                    client_id=OUTLOOK_MOBILE, device_id=ALEX_IPHONE, groups=frozenset(), audience=EXCHANGE,
                    expires_at=0)


def _device(state: ComplianceState, level: DeviceThreatLevel | None) -> DeviceSignals:
    return DeviceSignals(device_id=ALEX_IPHONE, source="test", device=ManagedDevice(
        device_id=ALEX_IPHONE, display_name=None, user_principal_name=None, operating_system="iOS",
        compliance_state=state, compliance_grace_period_expiration=None, threat_level=level, threat_source=None,
        last_sync=datetime.now(UTC)))


def _signer(lifetime: int = 60) -> AssertionSigner:
    return AssertionSigner(ec.generate_private_key(ec.SECP256R1()), issuer=ISSUER, header="X-Portcullis-Assertion",
                           lifetime_seconds=lifetime)


def _sign(signer: AssertionSigner, now: datetime, device: DeviceSignals | None = None) -> str:
    return signer.sign(audience="https://exchange.corp.contoso.test", identity=_identity(),
                       app=ClientApp(client_id=OUTLOOK_MOBILE, name="outlook-mobile"),
                       device=device or _device(ComplianceState.compliant, DeviceThreatLevel.low),
                       decision_id="decision-1", now=now)


def test_an_expired_assertion_is_rejected() -> None:
    signer = _signer(lifetime=30)
    token = _sign(signer, datetime.now(UTC) - timedelta(seconds=60))
    outcome = verify_assertion(token, signer.jwks(), audience="https://exchange.corp.contoso.test", issuer=ISSUER)
    assert isinstance(outcome, RejectedToken) and "expired" in outcome.reason


def test_an_assertion_from_another_key_with_the_same_kid_is_rejected() -> None:
    genuine = _signer()
    claims = jwt.decode(_sign(genuine, datetime.now(UTC)), options={"verify_signature": False})
    token = jwt.encode(claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256",
                       headers={"kid": genuine.kid, "typ": TOKEN_TYPE})  # another key, the genuine key's id
    outcome = verify_assertion(token, genuine.jwks(), audience="https://exchange.corp.contoso.test", issuer=ISSUER)
    assert isinstance(outcome, RejectedToken) and "Signature" in outcome.reason


def test_unknown_device_facts_are_left_out_and_noncompliance_is_said() -> None:
    signer = _signer()
    token = _sign(signer, datetime.now(UTC), _device(ComplianceState.noncompliant, None))
    claims = verify_assertion(token, signer.jwks(), audience="https://exchange.corp.contoso.test", issuer=ISSUER)
    assert isinstance(claims, dict)
    assert (claims["compliance"], claims["complianceState"]) == ("notCompliant", "noncompliant")
    assert "threatLevel" not in claims


def test_the_key_file_is_private_made_once_and_shared_by_concurrent_starts(tmp_path: Path) -> None:
    path = tmp_path / "state" / "assertion-key.pem"
    keys: list[ec.EllipticCurvePrivateKey] = []
    starts = [threading.Thread(target=lambda: keys.append(load_or_create_key(path))) for _ in range(8)]
    for start in starts:
        start.start()
    for start in starts:
        start.join(10)
    assert len(keys) == 8
    assert len({k.private_numbers().private_value for k in keys}) == 1
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["assertion-key.pem"]  # no temporary file left
    assert load_or_create_key(path).private_numbers() == keys[0].private_numbers()


@pytest.fixture
def example_dir(tmp_path: Path) -> Path:
    """A policy-only example (no serviceHost), with its state directory inside the test's tmp_path."""
    target = tmp_path / "config"
    shutil.copytree(REPO / "config" / "examples" / "report-only-trial", target)
    shutil.copy(REPO / "config" / "examples" / "devices.yaml", tmp_path / "devices.yaml")
    text = (target / "portcullis.yaml").read_text()
    (target / "portcullis.yaml").write_text(text.replace("../../../.portcullis", "../state"))
    return target


def test_the_signer_follows_the_config(example_dir: Path) -> None:
    config = load_config(example_dir)
    signer = assertion_signer(config)
    assert signer is not None
    assert (signer.issuer, signer.header, signer.lifetime_seconds) == ("portcullis", "X-Portcullis-Assertion", 60)
    assert (example_dir.parent / "state" / "assertion-key.pem").is_file()
    assert assertion_issuer(load_config(REPO / "config")) == ISSUER
    (example_dir / "portcullis.yaml").write_text((example_dir / "portcullis.yaml").read_text() +
                                                "upstreamAssertion: {enabled: false}\n")
    assert assertion_signer(load_config(example_dir)) is None


def test_a_key_that_is_not_p256_is_a_config_error_naming_the_file(example_dir: Path) -> None:
    key_file = example_dir / "rsa.pem"
    key_file.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (example_dir / "portcullis.yaml").write_text((example_dir / "portcullis.yaml").read_text() +
                                                "upstreamAssertion: {keyFile: rsa.pem}\n")
    with pytest.raises(ConfigError) as caught:
        assertion_signer(load_config(example_dir))
    assert str(caught.value) == f"{key_file}: upstreamAssertion.keyFile: cannot use the assertion signing key: " \
                                "not a P-256 EC private key (ES256)"


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        pytest.param("{header: X-Backend-Identity}", "'X-Backend-Identity' is not a header the gateway strips",
                     id="a header clients could send"),
        pytest.param("{header: X-Portcullis-User}", "'X-Portcullis-User' is already one of the gateway's own",
                     id="one of the gateway's headers"),
        pytest.param("{header: 'X-Portcullis Assertion'}", "is not a header name", id="not a header name"),
        pytest.param("{lifetimeSeconds: 3600}", "less than or equal to 600", id="a long lifetime"),
    ],
)
def test_upstream_assertion_mistakes_are_errors_with_a_place(example_dir: Path, setting: str, message: str) -> None:
    gateway_file = example_dir / "portcullis.yaml"
    gateway_file.write_text(gateway_file.read_text() + f"upstreamAssertion: {setting}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(example_dir)
    line = len(gateway_file.read_text().splitlines())
    [problem] = [str(p) for p in caught.value.problems]
    assert problem.startswith(f"{gateway_file}:{line}:") and message in problem, problem


def test_a_signing_key_other_users_can_read_is_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from gateway.identity.assertion import load_or_create_key

    path = tmp_path / "assertion-key.pem"
    load_or_create_key(path)
    assert not caplog.records  # made 0600: nothing to say
    path.chmod(0o644)
    load_or_create_key(path)
    assert any("readable by other users" in r.getMessage() for r in caplog.records)
