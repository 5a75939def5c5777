"""Authentication strength and authentication context (Entra's step-up) through the real listener,
with tokens and browser sign-ins from the demo issuer: SharePoint's finance site carries context
c1, which a policy ties to phishing-resistant MFA; Exchange Web Services needs the built-in MFA
strength. A token without what is needed gets a 401 saying so (Entra's claims challenge, RFC 9470's
insufficient_user_authentication); a browser session is sent back to sign in asking for it."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import trustme

from gateway.app.demo import ALEX_IPHONE, OUTLOOK_MOBILE
from gateway.config import load_config
from gateway.config.lint import config_warnings
from gateway.http.headers import CORRELATION_ID
from tests.conftest import REPO, Gateway, Ports, free_port, gateway_config
from tests.helpers.browser import BROWSER
from tests.helpers.config import problems
from tests.helpers.running import Started, started

DOCS, MAIL = "docs.contoso.test", "mail.contoso.test"
SHAREPOINT = "00000003-0000-0ff1-ce00-000000000000"
EXCHANGE = "00000002-0000-0ff1-ce00-000000000000"
FINANCE = "/sites/finance/Shared%20Documents/"
EWS = "/EWS/Exchange.asmx"
RESOURCE = """  finance-site:
    hosts: [docs.contoso.test]
    paths: [/sites/finance/]
    authenticationContexts: [c1]
"""
RESOURCES_LINE = "resources:                           # your own named resources; a path no resource names is denied\n"
POLICIES = """
  - name: finance-phishing-resistant
    displayName: "Finance site: phishing-resistant MFA (authentication context c1)"
    state: enabled
    conditions:
      authenticationContexts: [c1]
    grantControls:
      authenticationStrength: phishingResistantMfa

  - name: ews-mfa
    displayName: "EWS: the MFA strength"
    state: enabled
    conditions:
      resources: {include: [exchange-ews]}
    grantControls:
      authenticationStrength: mfa
"""


def with_step_up(config_dir: Path) -> Path:
    gateway_file = config_dir / "portcullis.yaml"
    text = gateway_file.read_text()
    assert RESOURCES_LINE in text
    gateway_file.write_text(text.replace(RESOURCES_LINE, RESOURCES_LINE + RESOURCE))
    policies = config_dir / "policies.yaml"
    policies.write_text(policies.read_text().rstrip("\n") + "\n" + POLICIES)
    (config_dir / "cases.yaml").unlink()  # the shipped cases present no acrs
    return config_dir


@pytest.fixture(scope="module")
def stepped(gateway: Gateway, ca: trustme.CA, demo_ports: Ports,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Started]:
    config_dir = with_step_up(gateway_config(tmp_path_factory.mktemp("step-up"), ca,
                                             Ports(free_port(), demo_ports.idp, demo_ports.mail, demo_ports.docs)))
    with started(gateway, config_dir) as running:
        yield running


def token(gateway: Gateway, audience: str, *, amr: list[str], acrs: list[str] | None = None,
          client_id: str = OUTLOOK_MOBILE) -> str:
    extra: dict[str, object] = {"amr": amr, **({"acrs": acrs} if acrs else {})}
    return gateway.idp.mint(user="alex@contoso.test", client_id=client_id, audience=audience,
                            device_id=ALEX_IPHONE, extra=extra)


def challenge(answer: httpx.Response) -> dict[str, str]:
    header = answer.headers["www-authenticate"]
    assert header.startswith("Bearer ")
    return {k.strip(): v.strip('"') for k, v in (part.split("=", 1) for part in header[7:].split('", '))}


def test_a_token_without_the_context_gets_entras_claims_challenge(stepped: Started) -> None:
    gateway = stepped.gateway
    answer = gateway.request(DOCS, FINANCE, token=token(gateway, SHAREPOINT, amr=["fido", "mfa"]))
    assert answer.status_code == 401, answer.text
    told = challenge(answer)
    assert told["error"] == "insufficient_claims"
    assert json.loads(base64.b64decode(told["claims"])) == {"access_token": {"acrs": {"essential": True,
                                                                                       "value": "c1"}}}
    assert "resource_metadata" in told  # still says where to sign in
    record = gateway.decision(answer.headers[CORRELATION_ID])
    assert (record["result"], record["httpStatus"], record["status"]["errorCode"]) == ("unauthenticated", 401, 401)
    assert record["status"]["failureReason"] == "authentication context c1 required: sign in again for it"


def test_a_token_with_the_context_still_needs_the_policys_strength(stepped: Started) -> None:
    gateway = stepped.gateway
    weak = gateway.request(DOCS, FINANCE, token=token(gateway, SHAREPOINT, amr=["pwd", "mfa"], acrs=["c1"]))
    assert weak.status_code == 401
    assert challenge(weak)["error"] == "insufficient_user_authentication"
    assert challenge(weak)["error_description"] == "authentication strength phishingResistantMfa required"
    strong = gateway.request(DOCS, FINANCE, token=token(gateway, SHAREPOINT, amr=["fido", "mfa"], acrs=["c1"]))
    assert strong.status_code == 200, strong.text
    elsewhere = gateway.request(DOCS, "/sites/team/", token=token(gateway, SHAREPOINT, amr=["pwd"]))
    assert elsewhere.status_code == 200  # the rest of SharePoint carries no context


@pytest.mark.parametrize(("amr", "status"), [(["pwd"], 401), (["pwd", "mfa"], 200), (["fido"], 200)])
def test_the_built_in_mfa_strength_reads_the_tokens_methods(stepped: Started, amr: list[str], status: int) -> None:
    gateway = stepped.gateway
    answer = gateway.request(MAIL, EWS, method="POST", token=token(gateway, EXCHANGE, amr=amr))
    assert answer.status_code == status, answer.text
    if status == 401:
        record = gateway.decision(answer.headers[CORRELATION_ID])
        assert record["evaluationInput"]["authenticationMethods"] == ["pwd"]
        [ews] = [p for p in record["appliedConditionalAccessPolicies"] if p["id"] == "ews-mfa"]
        assert (ews["result"], ews["enforcedGrantControls"]) == ("failure", ["authenticationStrength"])


def test_a_browser_session_is_sent_to_sign_in_again_for_the_context_and_then_reaches_the_site(
        stepped: Started) -> None:
    gateway = stepped.gateway
    with gateway.client() as browser:
        browser.headers.update(BROWSER)
        base = f"https://127.0.0.1:{gateway.port}"

        def get(path: str) -> httpx.Response:
            return browser.get(base + path, headers={"Host": DOCS}, extensions={"sni_hostname": DOCS})

        def sign_in(location: str, **choices: str) -> None:
            query = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
            granted = httpx.post(location.split("?")[0], data={**query, "user": "alex@contoso.test",
                                                              "device_id": ALEX_IPHONE, **choices})
            callback = urlsplit(granted.headers["location"])
            landed = browser.get(f"{base}{callback.path}?{callback.query}", headers={"Host": DOCS},
                                 extensions={"sni_hostname": DOCS})
            assert landed.status_code == 302, landed.text

        first = get("/sites/team/")
        assert first.status_code == 302
        sign_in(first.headers["location"], mfa="1")  # a password and MFA: enough for the team site
        assert get("/sites/team/").status_code == 200
        step_up = get(FINANCE)
        assert step_up.status_code == 302
        asked = parse_qs(urlsplit(step_up.headers["location"]).query)
        assert json.loads(asked["claims"][0]) == {"access_token": {"acrs": {"essential": True, "value": "c1"}}}
        assert asked["max_age"] == ["0"]
        sign_in(step_up.headers["location"], mfa="1", fido="1")  # the context granted, with a FIDO2 key
        assert get(FINANCE).status_code == 200


def test_strengths_and_contexts_that_do_not_exist_are_config_problems_at_their_line(tmp_path: Path) -> None:
    config_dir = tmp_path / "config"
    shutil.copytree(REPO / "config", config_dir)
    with_step_up(config_dir)
    load_config(config_dir)  # as written: it loads
    policies = config_dir / "policies.yaml"
    text = policies.read_text()
    policies.write_text(text.replace("authenticationStrength: phishingResistantMfa",
                                     "authenticationStrength: phishingResistant"))
    [problem] = problems(config_dir)
    assert "grantControls.authenticationStrength: 'phishingResistant' is not an authentication strength" in problem
    assert "did you mean 'phishingResistantMfa'?" in problem and "policies.yaml:" in problem
    policies.write_text(text.replace("authenticationContexts: [c1]", "authenticationContexts: [c100]"))
    [problem] = problems(config_dir)
    assert "authenticationContexts.0" in problem or "authenticationContexts[0]" in problem
    policies.write_text(text.replace("      authenticationContexts: [c1]\n", "      clientAppTypes: [all]\n"))
    [problem] = problems(config_dir)
    assert "a policy targets resources (resources.include) or authenticationContexts" in problem


def test_whatif_and_cases_answer_the_step_up_as_the_gateway_does(stepped: Started) -> None:
    config = str(stepped.gateway.config_dir)
    asked = ["whatif", "--config", config, "--user", "alex@contoso.test", "--app", "outlook-mobile",
             "--device", ALEX_IPHONE, "--url", f"https://{DOCS}{FINANCE}", "--json"]
    without = json.loads(portcullis(*asked).stdout)
    assert (without["result"], without["httpStatus"], without["errorCode"]) == ("unauthenticated", 401, 401)
    weak = json.loads(portcullis(*asked, "--acrs", "c1").stdout)
    assert (weak["httpStatus"], weak["reason"]) == (401, "authentication strength phishingResistantMfa required")
    assert weak["input"]["acrs"] == ["c1"]
    strong = json.loads(portcullis(*asked, "--acrs", "c1", "--amr", "fido").stdout)
    assert (strong["result"], strong["httpStatus"]) == ("allow", 200)


def portcullis(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).with_name("portcullis")), *args], capture_output=True, text=True,
                          timeout=60, check=True)


def test_check_knows_a_policy_applies_where_its_authentication_context_is_carried(tmp_path: Path) -> None:
    config_dir = tmp_path / "config"
    shutil.copytree(REPO / "config", config_dir)
    with_step_up(config_dir)
    assert not [w for w in config_warnings(load_config(config_dir)) if "finance-phishing-resistant" in str(w)]
    gateway_file = config_dir / "portcullis.yaml"
    gateway_file.write_text(gateway_file.read_text().replace("    authenticationContexts: [c1]\n", ""))
    [warning] = [str(w) for w in config_warnings(load_config(config_dir)) if "finance-phishing-resistant" in str(w)]
    assert "can never apply: no resource carries its authentication contexts (c1)" in warning
