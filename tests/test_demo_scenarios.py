"""Every scenario ``portcullis demo`` prints, sent through the real TLS listener."""

from __future__ import annotations

import pytest

from gateway.app.demo import CERTIFICATE_SCENARIOS, SCENARIOS, Scenario, scenario_token
from tests.conftest import Gateway


@pytest.mark.parametrize("scenario", [pytest.param(s, id=s.title) for s in SCENARIOS + CERTIFICATE_SCENARIOS])
def test_demo_scenario_behaves_as_printed(gateway: Gateway, scenario: Scenario) -> None:
    token = scenario_token(gateway.idp, scenario)
    response = gateway.request(scenario.host, scenario.path, method=scenario.method, token=token,
                               headers=dict(scenario.headers),
                               certificate=gateway.demo_certificate(scenario.certificate))
    assert response.status_code == scenario.expect_status
    shown = response.text.replace(" ", "") if scenario.expect_text and '":"' in scenario.expect_text else response.text
    headers = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
    assert scenario.expect_text is None or scenario.expect_text in shown + headers


def test_approved_app_on_compliant_device_reaches_activesync_with_gateway_headers(gateway: Gateway) -> None:
    scenario = SCENARIOS[0]
    response = gateway.request(scenario.host, scenario.path, method="POST",
                               token=scenario_token(gateway.idp, scenario), headers=dict(scenario.headers))
    assert response.status_code == 200
    received = response.json()["receivedHeaders"]
    assert received["x-portcullis-user"] == "alex@contoso.test"
    assert received["x-portcullis-client-app"] == "outlook-mobile"
    correlation_id = response.headers["x-portcullis-correlation-id"]
    assert received["x-portcullis-correlation-id"] == correlation_id
    record = gateway.decision(correlation_id)
    assert record["result"] == "allow"
    assert record["conditionalAccessStatus"] == "success"
    assert record["clientAppUsed"] == "exchangeActiveSync"
    assert record["appliedConditionalAccessPolicies"][0]["result"] == "success"


def test_unapproved_app_is_blocked_with_53002_and_logged_per_policy(gateway: Gateway) -> None:
    scenario = SCENARIOS[1]
    response = gateway.request(scenario.host, scenario.path, method="POST",
                               token=scenario_token(gateway.idp, scenario), headers=dict(scenario.headers))
    body = response.json()
    assert (response.status_code, body["errorCode"], body["reason"]) == (403, 53002, "app not approved")
    assert body["policy"] == "Exchange: Outlook only, on compliant devices at or under low risk"
    record = gateway.decision(body["correlationId"])
    assert record["status"] == {"errorCode": 53002, "failureReason": "app not approved"}
    results = {p["id"]: p for p in record["appliedConditionalAccessPolicies"]}
    assert results["exchange-outlook-only"]["result"] == "failure"
    assert results["exchange-outlook-only"]["failedControls"][0]["control"] == "approvedApplication"
    assert results["owa-compliant-device"]["result"] == "notApplied"
    assert results["owa-compliant-device"]["notAppliedBecause"] == "resource 'exchange-activesync' is not included"


def test_decision_log_never_holds_the_token(gateway: Gateway) -> None:
    scenario = SCENARIOS[0]
    token = scenario_token(gateway.idp, scenario)
    assert token is not None
    response = gateway.request(scenario.host, scenario.path, method="POST", token=token,
                               headers={**dict(scenario.headers), "Cookie": "session=secret-cookie"})
    assert response.status_code == 200
    gateway.decision(response.headers["x-portcullis-correlation-id"])  # written by the log's own thread
    log = gateway.decision_log.read_text()
    assert token not in log and token.split(".")[2] not in log and "secret-cookie" not in log
