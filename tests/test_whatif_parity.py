"""What If answers what the gateway answers. Every shipped case (config/cases.yaml and each
config/examples/*/cases.yaml) is asked of What If, which ``portcullis test``, ``portcullis check``,
the reload's case gate and ``POST /admin/whatif`` all call, and sent for real through a live
listener of the same config: the gateway's, or its kiosk proxy for ``listener: kiosk``. The live
request is built from the case, never from What If's translation of it (a What If that misread
the case, dropping its query say, would send the same wrong request and agree with itself): the
URL's path and query verbatim; a token signed by the demo issuer for exactly the case's user, app,
device, groups, MFA and object id; the case's address (the test client is the config's trusted
proxy and names it in X-Forwarded-For); a browser's or a native client's User-Agent and Accept as
the case's ``clientAppType`` and ``platform`` say. Status, result, reason, error code, client app
type, session controls, restriction (a session control, the ActiveSync device binding) and every
policy's result must be the same."""

from __future__ import annotations

import ast
import asyncio
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from ruamel.yaml import YAML

from gateway.app import bootstrap
from gateway.decision.service import utc_now
from gateway.ops import whatif
from gateway.ops.cases import Case, load_cases
from gateway.ops.whatif import WhatIf
from gateway.policy.model import ClientAppType, Decision, DevicePlatform, Listener
from tests.conftest import Background, Gateway, Ports, free_port, gateway_config, write_trustme_certificate
from tests.helpers.config import CONFIG_DIRS
from tests.helpers.decision_log import listener
from tests.helpers.kiosk import kiosk_browser

DEMO = CONFIG_DIRS[0]


@dataclass(frozen=True)
class Live:
    """A config served on live listeners (the session's issuer and backends), and its What If."""

    gateway: Gateway
    what_if: WhatIf


def live_config(directory: Path, target: Path, gateway: Gateway, demo_ports: Ports) -> Path:
    """A copy of ``directory`` served on free ports in front of the session's issuer and backends,
    trusting the test client (127.0.0.1) as its proxy, so that a case's address can be named."""
    if directory == DEMO:
        config_dir = gateway_config(target, gateway.ca, Ports(0, demo_ports.idp, demo_ports.mail, demo_ports.docs))
    else:
        config_dir = target / "config"
        shutil.copytree(directory, config_dir)
        shutil.copy(directory.parent / "devices.yaml", target / "devices.yaml")  # their ../devices.yaml
        write_trustme_certificate(gateway.ca, config_dir)
    yaml = YAML()
    path = config_dir / "portcullis.yaml"
    data = yaml.load(path)
    data["gateway"]["listen"] = {"host": "127.0.0.1", "port": 0}
    data["gateway"]["trustedProxies"] = ["127.0.0.1/32"]
    if directory != DEMO:  # a policy-only example: the demo's issuer, backends and certificate instead
        data["gateway"]["certificates"] = [{"hosts": list(data["protectedHosts"]), "file": "../certs/gateway.pem"}]
        data["gateway"]["stateDir"] = "../state"
        data["decisionLog"]["path"] = "../state/decisions.jsonl"
        data["identity"]["issuer"] = f"http://127.0.0.1:{demo_ports.idp}/contoso"
        for host, protected in data["protectedHosts"].items():
            port = demo_ports.mail if host.startswith("mail.") else demo_ports.docs
            protected["upstream"] = f"http://127.0.0.1:{port}"
        if "kiosk" in data:
            data["kiosk"]["listen"] = {"host": "127.0.0.1", "port": free_port()}
    yaml.dump(data, path)
    return config_dir


@pytest.fixture(scope="module")
def live(request: pytest.FixtureRequest, gateway: Gateway, demo_ports: Ports,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """One live gateway per shipped config (module-scoped and keyed by it: pytest runs that
    config's cases together). While it runs, mitmproxy hands this process's new connections to it."""
    directory: Path = request.param
    config_dir = live_config(directory, tmp_path_factory.mktemp(f"parity-{directory.name}"), gateway, demo_ports)
    loaded = bootstrap.load(config_dir)
    with Background(lambda: listener(config_dir)) as (port, decision_log):
        yield Live(replace(gateway, port=port, decision_log=decision_log, config_dir=config_dir),
                   WhatIf(loaded.config, loaded.inventory, loaded.whatif_app_protection))


PLATFORM_IN_USER_AGENT = {  # how real clients name their platform in a User-Agent
    DevicePlatform.ios: "iPhone; CPU iPhone OS 17_4 like Mac OS X",
    DevicePlatform.android: "Linux; Android 14; Pixel 8",
    DevicePlatform.windows: "Windows NT 10.0; Win64; x64",
    DevicePlatform.macos: "Macintosh; Intel Mac OS X 14_4",
    DevicePlatform.linux: "X11; Linux x86_64",
}


def client_headers(case: Case) -> dict[str, str]:
    """What a client of the case's kind sends, written here from the case and not taken from What
    If: a browser's headers for ``clientAppType: browser``, else a native client's; either names
    the case's platform if it gives one, and no platform if it does not."""
    platform = f" ({PLATFORM_IN_USER_AGENT[case.platform]})" if case.platform else ""
    if case.client_app_type is ClientAppType.browser:
        return {"User-Agent": f"Mozilla/5.0{platform} AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0",
                "Accept": "text/html,application/xhtml+xml"}
    return {"User-Agent": f"Parity-Client/1.0{platform}", "Accept": "*/*"}


def sent(live: Live, case: Case) -> httpx.Response:
    """The case as a live request, built from the case itself and never from What If's reading of
    it (which would send any mistranslation live too): its URL's path and query verbatim, a token
    for its user, app, device, groups, MFA and object id, its address, its kind of client."""
    url = urlsplit(case.url)
    host, target = url.hostname or "", (url.path or "/") + (f"?{url.query}" if url.query else "")
    gateway_file = live.what_if.config.gateway_file
    client_id = gateway_file.applications[case.app][0] if case.app in gateway_file.applications else case.app
    token = live.gateway.idp.mint(
        user=case.user, client_id=client_id or "", audience=gateway_file.protected_hosts[host].audiences[0],
        device_id=case.device, extra={"sub": case.user, "oid": case.object_id, "groups": case.groups,
                                      "amr": ["pwd", "mfa"] if case.mfa else ["pwd"]})
    headers = {"Authorization": f"Bearer {token}", "X-Forwarded-For": str(case.ip), **client_headers(case)}
    if case.listener is Listener.kiosk:
        with kiosk_browser(live.gateway) as kiosk:
            response = kiosk.get(f"https://{host}{target}", headers=headers)
    else:
        response = live.gateway.request(host, target, headers=headers)
    assert response.request.url.raw_path == target.encode(), "the case's path and query, as the case spells them"
    return response


def what_if_answer(decision: Decision) -> dict[str, Any]:
    return {"httpStatus": decision.status_code, "result": decision.result.value,
            "reason": None if decision.allowed else decision.reason,
            "errorCode": int(decision.error_code) if decision.error_code else 0,
            "clientAppType": decision.client_app_type.value, "resource": decision.resource,
            "sessionControls": list(decision.session_controls.names()),
            "restriction": decision.restriction.value if decision.restriction else None,
            "policies": {p.name: p.result.value for p in decision.all_policies()}}


def gateway_answer(response: httpx.Response, record: dict[str, Any]) -> dict[str, Any]:
    assert record["httpStatus"] == response.status_code
    return {"httpStatus": response.status_code, "result": record["result"], "reason": record["status"]["failureReason"],
            "errorCode": record["status"]["errorCode"], "clientAppType": record["clientAppUsed"],
            "resource": record["resourceDisplayName"], "sessionControls": record["enforcedSessionControls"],
            "restriction": record.get("restriction"),
            "policies": {p["id"]: p["result"] for p in record["appliedConditionalAccessPolicies"]}}


@pytest.mark.parametrize(("live", "case"), [
    pytest.param(directory, case, id=f"{directory.name}: {case.name}")
    for directory in CONFIG_DIRS for case in load_cases(directory / "cases.yaml")
], indirect=["live"])
def test_what_if_answers_every_shipped_case_as_the_live_gateway_does(live: Live, case: Case) -> None:
    answered_alike(live, case)


def answered_alike(live: Live, case: Case) -> Decision:
    """What If's answer to the case, once the live gateway has answered the case the same."""
    decision = asyncio.run(live.what_if.ask(case.question(), utc_now()))
    response = sent(live, case)
    record = live.gateway.decision(response.headers["x-portcullis-correlation-id"])
    assert what_if_answer(decision) == gateway_answer(response, record)
    assert record["ipAddress"] == str(case.ip)  # the case's address was decided on
    return decision


def public_sign_in_page(client_app_type: str | None) -> Case:
    return Case.model_validate_json(json.dumps({
        "name": "the OWA sign-in page", "user": "alex@contoso.test", "app": "outlook-mobile",
        "url": "https://mail.contoso.test/owa/auth/logon.aspx", "clientAppType": client_app_type,
        "expect": {"result": "allow"}}))


@pytest.mark.parametrize("live", [DEMO], indirect=True)
@pytest.mark.parametrize("client_app_type", ["browser", None])
def test_what_if_allows_a_public_resource_as_the_live_gateway_does(live: Live, client_app_type: str | None) -> None:
    """The demo's public resource (``public: true``) is forwarded before any token is read: What
    If allows it too (200, no policy), where it once refused the question as unanswerable."""
    decision = answered_alike(live, public_sign_in_page(client_app_type))
    assert (decision.status_code, decision.reason, decision.resource) == \
        (200, "public resource", "exchange-owa-sign-in-page")


def test_the_shipped_cases_cover_a_session_restriction_the_device_binding_and_the_kiosk() -> None:
    """The parity test above would not notice a What If that skips these if no case exercised them."""
    cases = [case for directory in CONFIG_DIRS for case in load_cases(directory / "cases.yaml")]
    restrictions = {case.expect.restriction.value for case in cases if case.expect.restriction}
    assert restrictions >= {"blockDownloads", "activeSyncDeviceIdMismatch"}
    assert any(case.listener is Listener.kiosk for case in cases)
    assert any(urlsplit(case.url).hostname == "docs.contoso.test" for case in cases)


def test_what_if_decides_through_the_gateways_own_steps() -> None:
    """The device binding, ``evaluate`` and the session controls are steps of the gateway's pipeline,
    ``gateway.decision.pipeline.authorize``: What If calls it too and re-implements none of it."""
    tree = ast.parse(Path(whatif.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.module == "gateway.decision.pipeline" for alias in node.names}
    assert "authorize" in imported, imported
    called = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert "authorize" in called and not called & {"evaluate", "request_restriction", "activesync_device_ids"}, called
