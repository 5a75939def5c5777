"""Clients discover where to sign in from the 401 (issue 15, part 1): Exchange's challenge
parameters for Outlook's hybrid modern authentication check, RFC 6750 §3.1's rule for ``error``,
and the RFC 9728 protected resource metadata each protected host serves itself."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from ruamel.yaml import YAML

from gateway.app.demo import ALEX_IPHONE, EXCHANGE, OUTLOOK_MOBILE
from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.http.headers import CORRELATION_ID
from gateway.web.demo_idp import DEMO_TENANT_ID
from tests.conftest import Gateway, Ports, demo_config_copy

MAIL, DOCS = "mail.contoso.test", "docs.contoso.test"
METADATA = "/.well-known/oauth-protected-resource"
AUTH_PARAM = re.compile(r'\s*([A-Za-z0-9_!#$%&\'*+.^`|~-]+)="([^"\\]*)"\s*(?:,|$)')
RFC_9728_MEMBERS = {  # §2, and the registered additions
    "resource", "authorization_servers", "jwks_uri", "scopes_supported", "bearer_methods_supported",
    "resource_signing_alg_values_supported", "resource_name", "resource_documentation", "resource_policy_uri",
    "resource_tos_uri", "tls_client_certificate_bound_access_tokens", "authorization_details_types_supported",
    "dpop_signing_alg_values_supported", "dpop_bound_access_tokens_required", "signed_metadata"}


def bearer_challenge(value: str) -> dict[str, str]:
    """The auth-params of one ``Bearer`` challenge, every one a quoted string, none repeated."""
    scheme, _, rest = value.partition(" ")
    assert scheme == "Bearer"
    parameters = AUTH_PARAM.findall(rest)
    assert "".join(f'{n}="{v}"' for n, v in parameters) == re.sub(r",\s*", "", rest), value
    assert len({n for n, _ in parameters}) == len(parameters)
    return dict(parameters)


def check_rfc_9728(document: object, fetched_from: str, issuer: str) -> dict[str, object]:
    """What a client checks of a protected resource metadata document (RFC 9728 §2, §3.3)."""
    assert isinstance(document, dict) and set(document) <= RFC_9728_MEMBERS, document
    origin, _, suffix = fetched_from.partition(METADATA)
    assert document["resource"] == origin + suffix  # §3.3: identical, or the client must not use it
    servers = document["authorization_servers"]
    assert isinstance(servers, list) and servers == [issuer]
    assert all(urlsplit(s).scheme in ("https", "http") and not urlsplit(s).fragment for s in servers)
    methods = document["bearer_methods_supported"]
    assert isinstance(methods, list) and methods and set(methods) <= {"header", "body", "query"}
    scopes = document.get("scopes_supported", [])
    assert isinstance(scopes, list) and all(isinstance(s, str) and s and " " not in s for s in scopes)
    return document


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (.ci/run installs it)")
def test_microsofts_hma_check_with_curl_shows_where_to_sign_in(gateway: Gateway, tmp_path: Path) -> None:
    """Microsoft's check for hybrid modern authentication: an empty ``Bearer`` to Autodiscover.
    The 401 names Exchange's sign-in parameters and the metadata, and no error (none was sent)."""
    ca_file = tmp_path / "ca.pem"
    gateway.ca.cert_pem.write_to_path(str(ca_file))
    origin = f"https://{MAIL}:{gateway.port}"
    curl = ["curl", "-sS", "--cacert", str(ca_file), "--resolve", f"{MAIL}:{gateway.port}:127.0.0.1"]
    shown = subprocess.run([*curl, "-i", "-H", "Authorization: Bearer",
                            f"{origin}/autodiscover/autodiscover.json?Email=alex@contoso.test&Protocol=activesync"],
                           capture_output=True, text=True, timeout=30, check=True).stdout
    head = re.split(r"\r?\n\r?\n", shown, maxsplit=1)[0].splitlines()
    assert head[0].split(" ")[1] == "401", shown[:300]
    fields = {name.lower(): value for name, _, value in (line.partition(": ") for line in head[1:])}
    assert "www-authenticate" in fields, shown
    challenge = fields["www-authenticate"]
    assert bearer_challenge(challenge) == {
        "client_id": "00000002-0000-0ff1-ce00-000000000000",
        "trusted_issuers": f"00000001-0000-0000-c000-000000000000@{DEMO_TENANT_ID}",
        "token_types": "app_asserted_user_v1 service_asserted_app_v1",
        "authorization_uri": "https://login.windows.net/common/oauth2/authorize",
        "resource_metadata": f"{origin}{METADATA}",
    }
    record = gateway.decision(fields[CORRELATION_ID.lower()])
    assert (record["result"], record["httpStatus"], record["status"]["failureReason"]) == \
        ("unauthenticated", 401, "empty bearer token")

    metadata = subprocess.run([*curl, f"{origin}{METADATA}"], capture_output=True, text=True, timeout=30,
                              check=True).stdout
    document = check_rfc_9728(json.loads(metadata), f"{origin}{METADATA}", gateway.idp.issuer)
    assert document["scopes_supported"] == [f"https://{MAIL}/EWS.AccessAsUser.All"]


@pytest.mark.parametrize(("authorization", "error"), [
    pytest.param(None, False, id="no Authorization header"),
    pytest.param("Bearer", False, id="an empty Bearer"),
    pytest.param("Basic YWxleDpwYXNzd29yZA==", False, id="another scheme"),
    pytest.param("Bearer not-a-jwt", True, id="a malformed token"),
    pytest.param("tampered", True, id="a token with a tampered signature"),
])
def test_the_challenge_names_an_error_only_when_a_token_failed(gateway: Gateway, authorization: str | None,
                                                               error: bool) -> None:
    """RFC 6750 §3.1: no ``error`` when the request carried no credentials; ``invalid_token``
    when a token was presented and failed. Every 401 points at the metadata."""
    if authorization == "tampered":
        token = gateway.idp.mint(user="alex@contoso.test", client_id=OUTLOOK_MOBILE, audience=EXCHANGE,
                                 device_id=ALEX_IPHONE)
        authorization = f"Bearer {token[:-4]}AAAA"
    sent = {"Authorization": authorization} if authorization else {}
    response = gateway.request(DOCS, "/sites/finance/", headers=sent)
    assert response.status_code == 401
    challenge = bearer_challenge(response.headers["WWW-Authenticate"])
    assert challenge["resource_metadata"] == f"https://{DOCS}{METADATA}"
    assert ("error" in challenge) is error
    assert challenge.get("error") in (None, "invalid_token")
    assert "client_id" not in challenge  # no preset on this host


@pytest.mark.parametrize(("host", "path"), [
    pytest.param(MAIL, METADATA, id="Exchange"),
    pytest.param(DOCS, METADATA, id="SharePoint, no challenge settings"),
    pytest.param(MAIL, METADATA + "/EWS/Exchange.asmx", id="the path-suffixed form"),
])
def test_each_protected_host_serves_its_resource_metadata(gateway: Gateway, host: str, path: str) -> None:
    """Served by the gateway before any policy and without a token, never by the upstream."""
    response = gateway.request(host, path)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert "backend" not in response.text  # the demo backends name themselves in every answer
    check_rfc_9728(response.json(), f"https://{host}{path}", gateway.idp.issuer)


@pytest.mark.parametrize(("challenge", "problem"), [
    pytest.param({"preset": "exchange"}, "needs tenantId", id="the Exchange preset without a tenant"),
    pytest.param({"parameters": {"error": "x"}}, "set by the gateway itself", id="a parameter the gateway sets"),
    pytest.param({"parameters": {"realm": 'a"b'}}, "set by the gateway itself", id="realm"),
    pytest.param({"parameters": {"x": 'a", error="forged'}}, "cannot be sent in a challenge",
                 id="a value that would break out of its quotes"),
    pytest.param({"authorizationUri": "http://login.example/"}, "must use https", id="a plain-http sign-in"),
    pytest.param({"scopes": ["two words"]}, "is not an OAuth scope", id="a scope with a space"),
])
def test_challenge_settings_that_cannot_be_sent_are_refused(tmp_path: Path, challenge: dict[str, object],
                                                             problem: str) -> None:
    config_dir = demo_config_copy(tmp_path, Ports.fresh())
    yaml = YAML()
    path = config_dir / "portcullis.yaml"
    data = yaml.load(path)
    data["protectedHosts"][DOCS]["challenge"] = challenge
    yaml.dump(data, path)
    with pytest.raises(ConfigError) as raised:
        load_config(config_dir)
    assert problem in str(raised.value)
