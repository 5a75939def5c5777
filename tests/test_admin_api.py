"""The admin API on the running gateway's admin listener: probes, Prometheus metrics read with
prometheus_client's own parser, decisions by id, What If, reload, the roles each action needs,
and one audit record per admin request."""

from __future__ import annotations

import contextlib
import json
import shutil
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from ruamel.yaml import YAML

from gateway.app.demo import (
    ACTIVESYNC,
    ALEX_IPHONE,
    BLAKE_ANDROID,
    DREW_IPHONE,
    EXCHANGE,
    TEAMS,
    activesync,
    banner,
)
from gateway.config import load_config
from gateway.config.lint import config_warnings
from gateway.errors import ConfigError
from gateway.ops.metrics import GatewayMetrics, reason_label
from gateway.ops.operations import Operations
from gateway.policy.model import ClientAppType, Decision, DecisionResult, ErrorCode
from gateway.web.admin import admin_listener
from tests.conftest import (
    Background,
    Gateway,
    Ports,
    demo_config_copy,
    free_port,
    gateway_config,
    operations_for,
    proxy_for,
)
from tests.helpers.admin import ADMIN_APP, OPERATOR, READER, admin, admin_token, audit_path, outlook, sync
from tests.helpers.hosts import MAIL

PORTCULLIS = str(Path(sys.executable).with_name("portcullis"))

type Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def audit_record(config_dir: Path, response: httpx.Response) -> dict[str, Any]:
    """The audit record of one admin response: written before the response was sent."""
    correlation_id = response.headers["X-Portcullis-Correlation-Id"]
    records = [json.loads(line) for line in audit_path(config_dir).read_text().splitlines()]
    found = [r for r in records if r["correlationId"] == correlation_id]
    assert len(found) == 1, f"{len(found)} audit records for {correlation_id}"
    return found[0]


def scrape(port: int, token: str) -> Samples:
    response = admin(port, "GET", "/metrics", token)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_healthz_answers_anyone_and_is_not_audited(gateway: Gateway) -> None:
    before = audit_path(gateway.config_dir).read_text() if audit_path(gateway.config_dir).exists() else ""
    response = admin(gateway.admin_port, "GET", "/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "pass"})
    after = audit_path(gateway.config_dir).read_text() if audit_path(gateway.config_dir).exists() else ""
    assert after == before


def test_readyz_lists_every_check_and_is_ready(gateway: Gateway) -> None:
    response = admin(gateway.admin_port, "GET", "/readyz", admin_token(gateway, READER))
    assert response.status_code == 200
    body = response.json()
    checks = {c["name"]: c for c in body["checks"]}
    assert {"config", "jwks", "deviceInventory", "mtd:demo-mtd"} <= set(checks)
    assert checks["jwks"]["status"] == "pass" and checks["jwks"]["ageSeconds"] >= 0
    assert "devices" in checks["deviceInventory"]["detail"]
    assert body["status"] in ("pass", "warn")  # the demo's MTD partner may not have been heard from: warn
    assert audit_record(gateway.config_dir, response)["activityDisplayName"] == "Read readiness details"


def test_readyz_tells_anonymous_callers_only_each_checks_name_and_status(gateway: Gateway) -> None:
    response = admin(gateway.admin_port, "GET", "/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] in ("pass", "warn")
    assert all(set(check) == {"name", "status"} for check in body["checks"]), body  # no detail, no age
    assert "devices" not in response.text
    assert "X-Portcullis-Correlation-Id" not in response.headers  # a probe: not audited
    refused = admin(gateway.admin_port, "GET", "/readyz", admin_token(gateway))  # a token without the role
    assert refused.status_code == 403 and "checks" not in refused.json()


@contextlib.asynccontextmanager
async def admin_only(config_dir: Path, *, fetch_keys: bool = True) -> AsyncIterator[tuple[int, Operations]]:
    """A gateway's service and admin listener, without the proxy: what reload and readiness act on."""
    operations = await operations_for(config_dir, fetch_keys=fetch_keys)
    try:
        async with admin_listener(operations) as address:
            assert address is not None
            yield address[1], operations
    finally:
        operations.service.close()


def own_config(tmp_path: Path, gateway: Gateway, ports: Ports) -> Path:
    return gateway_config(tmp_path, gateway.ca, ports)


def test_readyz_fails_with_503_when_the_issuer_keys_were_never_fetched(gateway: Gateway, tmp_path: Path,
                                                                       demo_ports: Ports) -> None:
    dead_issuer = Ports(0, free_port(), demo_ports.mail, demo_ports.docs)
    config_dir = own_config(tmp_path, gateway, dead_issuer)
    with Background(lambda: admin_only(config_dir, fetch_keys=False)) as (port, operations):
        response = admin(port, "GET", "/readyz")
        assert admin(port, "GET", "/healthz").status_code == 200  # alive, but not ready
        dead_token = admin_token(gateway, READER, extra={"iss": operations.service.config.gateway_file.identity.issuer})
        refused = admin(port, "GET", "/metrics", dead_token)
        details = operations.health.checks()  # a reader could not read them: no keys to check the token
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "fail" and {"name": "jwks", "status": "fail"} in body["checks"]
    jwks = next(c for c in details if c.name == "jwks")
    assert "never fetched" in jwks.detail
    assert refused.status_code == 503  # no keys: no admin token can be checked either


def test_metrics_count_decisions_by_result_policy_reason_and_app(gateway: Gateway) -> None:
    reader = admin_token(gateway, READER)
    before = scrape(gateway.admin_port, reader)
    alex = outlook(gateway)
    assert sync(gateway, alex).status_code == 200
    assert sync(gateway, alex).status_code == 200  # the same token again: a cache hit
    assert sync(gateway, outlook(gateway, client=TEAMS)).status_code == 403
    assert gateway.request(MAIL, ACTIVESYNC, method="POST").status_code == 401
    after = scrape(gateway.admin_port, reader)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    decisions = "portcullis_decisions_total"
    assert delta(decisions, result="allow", policy="none", reason="granted", app="outlook-mobile") == 2
    assert delta(decisions, result="block", policy="exchange-outlook-only", reason="appNotApproved", app="teams") == 1
    assert delta(decisions, result="unauthenticated", policy="none", reason="invalidToken", app="unregistered") == 1
    assert delta("portcullis_policy_results_total", policy="exchange-outlook-only", result="failure") == 1
    assert delta("portcullis_decision_seconds_count") >= 4
    assert value(after, "portcullis_decision_seconds_bucket", le="+Inf") == value(after,
                                                                                "portcullis_decision_seconds_count")
    assert delta("portcullis_cache_hits_total", cache="accessTokens") >= 1
    assert 0 < value(after, "portcullis_cache_hit_ratio", cache="accessTokens") < 1
    assert 0 <= value(after, "portcullis_signal_age_seconds", source="jwks") < 3600
    assert ("portcullis_signal_age_seconds", frozenset({("source", "mtd:demo-mtd")})) in after
    assert value(after, "portcullis_config_last_reload_successful") == 1
    assert delta("portcullis_admin_requests_total", action="readMetrics", outcome="success") == 1
    families = {f.name for f in text_string_to_metric_families(admin(gateway.admin_port, "GET", "/metrics",
                                                                     reader).text)}
    assert {"portcullis_upstream_errors", "portcullis_config_reloads", "portcullis_decision_log_dropped"} <= families


def test_an_activesync_device_id_mismatch_is_counted_as_such_not_as_noncompliance(gateway: Gateway) -> None:
    """Alex's token (a compliant iPhone) with the DeviceId of Drew's phone in the URL: refused by
    the device binding before policy, whatever its error code says to a helpdesk (53000)."""
    reader = admin_token(gateway, READER)
    before = scrape(gateway.admin_port, reader)
    refused = sync(gateway, outlook(gateway), device=DREW_IPHONE)
    assert refused.status_code == 403
    record = gateway.decision(refused.headers["x-portcullis-correlation-id"])
    assert (record["status"]["errorCode"], record["restriction"]) == (53000, "activeSyncDeviceIdMismatch")
    after = scrape(gateway.admin_port, reader)
    labels = {"result": "block", "policy": "none", "app": "outlook-mobile"}
    decisions = "portcullis_decisions_total"
    assert value(after, decisions, reason="activeSyncDeviceIdMismatch", **labels) - \
        value(before, decisions, reason="activeSyncDeviceIdMismatch", **labels) == 1
    assert value(after, decisions, reason="deviceNotCompliant", **labels) == \
        value(before, decisions, reason="deviceNotCompliant", **labels)


def test_a_scrape_is_audited_without_the_token(gateway: Gateway) -> None:
    reader = admin_token(gateway, READER, user="prometheus@contoso.test")
    response = admin(gateway.admin_port, "GET", "/metrics", reader)
    record = audit_record(gateway.config_dir, response)
    assert record["activityDisplayName"] == "Read metrics" and record["result"] == "success"
    assert record["initiatedBy"]["user"]["userPrincipalName"] == "prometheus@contoso.test"
    assert record["initiatedBy"]["app"] == {"appId": ADMIN_APP}
    assert {"key": "roles", "value": READER} in record["additionalDetails"]
    assert reader.split(".")[2] not in audit_path(gateway.config_dir).read_text()


def _tampered(token: str) -> str:
    header, payload, signature = token.split(".")
    return ".".join((header, payload, signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]))


RBAC = [
    pytest.param("none", "GET", "/metrics", 401, "no bearer token", id="no token -> 401"),
    pytest.param("exchange", "GET", "/metrics", 401, "audience", id="a token for Exchange, even with the role -> 401"),
    pytest.param("expired", "GET", "/metrics", 401, "expired", id="expired reader token -> 401"),
    pytest.param("tampered", "GET", "/metrics", 401, "signature", id="tampered reader token -> 401"),
    pytest.param("no role", "GET", "/metrics", 403, READER, id="valid token without a role -> 403"),
    pytest.param("other role", "GET", "/metrics", 403, READER, id="another app's role -> 403"),
    pytest.param("reader", "GET", "/metrics", 200, None, id="reader reads metrics"),
    pytest.param("operator", "GET", "/metrics", 200, None, id="operator reads metrics too"),
    pytest.param("reader", "POST", "/admin/reload", 403, OPERATOR, id="reader cannot reload -> 403"),
    pytest.param("no role", "POST", "/admin/whatif", 403, READER, id="no role cannot ask What If -> 403"),
    pytest.param("reader cookie", "GET", "/metrics", 401, "no bearer token", id="the API ignores the cookie"),
    pytest.param("operator cookie", "POST", "/admin/reload", 401, "no bearer token",
                 id="a state change never takes the cookie (no CSRF) -> 401"),
    pytest.param("reader", "GET", "/", 200, None, id="reader opens the dashboard"),
    pytest.param("reader cookie", "GET", "/", 200, None, id="the dashboard takes the cookie"),
    pytest.param("none", "GET", "/", 401, "no bearer token", id="dashboard without a token -> 401 sign-in page"),
]


def _credential(gateway: Gateway, kind: str) -> dict[str, Any]:
    reader, operator = admin_token(gateway, READER), admin_token(gateway, OPERATOR)
    tokens = {
        "none": None,
        "exchange": gateway.idp.mint(user="olivia@contoso.test", client_id=ADMIN_APP, audience=EXCHANGE,
                                     roles=(OPERATOR,)),
        "expired": admin_token(gateway, READER, lifetime=-600),
        "tampered": _tampered(reader),
        "no role": admin_token(gateway),
        "other role": admin_token(gateway, "Mail.Admin"),
        "reader": reader,
        "operator": operator,
    }
    if kind.endswith(" cookie"):
        return {"headers": {"Cookie": f"portcullis_admin={tokens[kind.removesuffix(' cookie')]}"}}
    return {"token": tokens[kind]}


@pytest.mark.parametrize(("credential", "method", "path", "status", "why"), RBAC)
def test_each_action_needs_a_valid_admin_token_with_its_role(gateway: Gateway, credential: str, method: str,
                                                            path: str, status: int, why: str | None) -> None:
    response = admin(gateway.admin_port, method, path, **_credential(gateway, credential))
    assert response.status_code == status, response.text
    record = audit_record(gateway.config_dir, response)
    assert record["result"] == ("success" if status == 200 else "failure")
    if status == 401:
        challenge = response.headers["WWW-Authenticate"]
        assert challenge.startswith('Bearer realm="portcullis-admin"')
        assert ("error=" in challenge) == (why != "no bearer token")
        assert record["initiatedBy"]["user"] is None
    if status == 403:
        assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]
        assert record["initiatedBy"]["user"]["userPrincipalName"] == "olivia@contoso.test"
    if why is not None:
        assert why in record["resultReason"]
    if response.headers["content-type"].startswith("application/json") and why is not None:
        assert why in response.json()["error_description"]
    if path == "/" and status == 401:
        assert 'id="sign-in"' in response.text  # the dashboard asks for a token


def test_a_decision_is_read_by_its_correlation_id(gateway: Gateway) -> None:
    blocked = sync(gateway, outlook(gateway, user="blake@contoso.test", device=BLAKE_ANDROID), BLAKE_ANDROID, "blake")
    assert blocked.status_code == 403
    correlation_id = blocked.headers["X-Portcullis-Correlation-Id"]
    reader = admin_token(gateway, READER)
    response = admin(gateway.admin_port, "GET", f"/admin/decisions/{correlation_id}", reader)
    assert response.status_code == 200
    record = response.json()
    assert (record["correlationId"], record["result"], record["status"]["errorCode"]) == (correlation_id, "block",
                                                                                         53000)
    assert record["deviceDetail"]["deviceId"] == BLAKE_ANDROID
    audited = audit_record(gateway.config_dir, response)
    assert audited["targetResources"] == [{"id": correlation_id, "displayName": "block", "type": "Decision"}]
    text = admin(gateway.admin_port, "GET", f"/admin/decisions/{correlation_id}", reader,
                 headers={"Accept": "text/plain"})
    assert text.text.startswith(f"Decision {correlation_id}")
    assert "[x] exchange-outlook-only: failure" in text.text


@pytest.mark.parametrize(("correlation_id", "status"), [
    pytest.param("3f0c7a58-0000-4000-8000-000000000000", 404, id="unknown id -> 404"),
    pytest.param("x%22%2C%22result", 400, id="not an id -> 400"),
])
def test_an_unknown_or_malformed_decision_id_is_refused(gateway: Gateway, correlation_id: str, status: int) -> None:
    response = admin(gateway.admin_port, "GET", f"/admin/decisions/{correlation_id}", admin_token(gateway, READER))
    assert response.status_code == status
    assert audit_record(gateway.config_dir, response)["result"] == "failure"


def test_whatif_answers_as_the_cli_does(gateway: Gateway) -> None:
    question = {"user": "blake@contoso.test", "url": f"https://{MAIL}/Microsoft-Server-ActiveSync",
                "app": "outlook-mobile", "device": BLAKE_ANDROID}
    response = admin(gateway.admin_port, "POST", "/admin/whatif", admin_token(gateway, READER), json=question)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["result"], answer["errorCode"], answer["failedPolicy"]) == ("block", 53000, "exchange-outlook-only")
    cli = subprocess.run([PORTCULLIS, "whatif", "--config", str(gateway.config_dir), "--json", "--user",
                          question["user"], "--url", question["url"], "--app", question["app"], "--device",
                          question["device"]], capture_output=True, text=True, timeout=60, check=True)
    assert answer == json.loads(cli.stdout)
    record = audit_record(gateway.config_dir, response)
    assert (record["activityDisplayName"], record["category"], record["resultReason"]) == ("Ask What If", "Policy",
                                                                                          "block (403)")


def test_whatif_refuses_a_kiosk_download_as_the_gateway_does(gateway: Gateway) -> None:
    question = {"user": "kiosk@contoso.test", "url": "https://docs.contoso.test/_layouts/15/download.aspx",
                "listener": "kiosk"}
    response = admin(gateway.admin_port, "POST", "/admin/whatif", admin_token(gateway, READER), json=question)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["result"], answer["httpStatus"], answer["reason"], answer["restriction"]) == \
        ("block", 403, "downloads are blocked in this session", "blockDownloads")
    assert audit_record(gateway.config_dir, response)["resultReason"] == "block (403)"


def test_whatif_allows_a_public_resource_as_the_gateway_does(gateway: Gateway) -> None:
    """The gateway forwards the public sign-in page before reading any token: an answer, not a 400."""
    question = {"user": "alex@contoso.test", "url": f"https://{MAIL}/owa/auth/logon.aspx"}
    response = admin(gateway.admin_port, "POST", "/admin/whatif", admin_token(gateway, READER), json=question)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["result"], answer["httpStatus"], answer["reason"], answer["resource"], answer["policies"]) == \
        ("allow", 200, "public resource", "exchange-owa-sign-in-page", [])
    assert audit_record(gateway.config_dir, response)["resultReason"] == "allow (200)"


@pytest.mark.parametrize(("body", "message"), [
    pytest.param(b"user=alex", "not JSON", id="a form, not JSON"),
    pytest.param(b'["alex"]', "expected a mapping", id="a list"),
    pytest.param(b'{"user": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", "nested deeper than", id="nested 20,000 deep"),
    pytest.param(b'{"user": "casey@contoso.test", "url": "https://mail.contoso.test/", "user": "alex@contoso.test"}',
                 "names a member twice", id="user named twice"),
    pytest.param('{"user": "alex@contoso.test", "url": "https://mail.contoso.test/owa/"}'.encode("utf-16"),
                 "not UTF-8", id="in UTF-16"),
    pytest.param(b'{"url": "https://mail.contoso.test/owa/"}', "required key 'user'", id="no user"),
    pytest.param(b'{"user": "a", "url": "https://mail.contoso.test/owa/", "clientAppType": "browsr"}',
                 "did you mean 'browser'", id="misspelt clientAppType"),
    pytest.param(b'{"user": "a", "url": "https://mail.contoso.test/owa/", "devic": "x"}', "unknown key 'devic'",
                 id="unknown key"),
    pytest.param(b'{"user": "a", "url": "https://elsewhere.test/"}', "not on a protected host", id="unknown host"),
    pytest.param(b'{"user": "a", "url": "https://mail.contoso.test/owa/", "app": "nope"}', "neither a configured",
                 id="unknown app"),
    pytest.param(b'{"user": "a", "url": "https://[::1/owa"}', "not a valid URL", id="a broken IPv6 host"),
    pytest.param(b'{"user": "a", "url": "https://mail.contoso.test:99999/owa/"}', "not a valid URL",
                 id="a port out of range"),
])
def test_a_bad_whatif_question_gets_400_saying_why(gateway: Gateway, body: bytes, message: str) -> None:
    response = admin(gateway.admin_port, "POST", "/admin/whatif", admin_token(gateway, READER), content=body,
                     headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert message in response.json()["error_description"]
    assert message in audit_record(gateway.config_dir, response)["resultReason"]


def test_a_huge_whatif_body_is_refused_unread(gateway: Gateway) -> None:
    response = admin(gateway.admin_port, "POST", "/admin/whatif", admin_token(gateway, READER),
                     content=b"{" + b" " * 70_000 + b"}")
    assert response.status_code == 413


def test_dashboard_escapes_what_it_shows(gateway: Gateway) -> None:
    response = admin(gateway.admin_port, "GET", "/", admin_token(gateway, READER),
                     params={"user": "<script>alert(1)</script>", "device": '"><img src=x>'})
    assert response.status_code == 200
    assert "<script>alert" not in response.text and "<img src=x>" not in response.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in response.text
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src" not in policy and "'unsafe-inline'" not in policy
    assert response.headers["X-Frame-Options"] == "DENY" and response.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize(("query", "message"), [
    pytest.param({"result": "maybe"}, "result must be one of", id="unknown result"),
    pytest.param({"limit": "100000"}, "limit must be a number from 1 to 500", id="page too large"),
])
def test_dashboard_refuses_bad_filters(gateway: Gateway, query: dict[str, str], message: str) -> None:
    response = admin(gateway.admin_port, "GET", "/", admin_token(gateway, READER), params=query)
    assert response.status_code == 400 and message in response.text


def test_the_gateway_jwks_is_published_on_the_admin_listener(gateway: Gateway) -> None:
    response = admin(gateway.admin_port, "GET", "/.well-known/jwks.json")
    assert response.status_code == 200
    keys = response.json()["keys"]
    assert [k["alg"] for k in keys] == ["ES256"] and "d" not in keys[0]


@pytest.fixture
def reload_admin(gateway: Gateway, tmp_path: Path, demo_ports: Ports) -> Iterator[tuple[int, Operations, Path]]:
    """A gateway of its own (the session's issuer), so that reloads leave the session's rules alone."""
    config_dir = own_config(tmp_path, gateway, Ports(0, demo_ports.idp, demo_ports.mail, demo_ports.docs))
    (config_dir / "cases.yaml").unlink()  # the stricter rules below break a demo case on purpose
    with Background(lambda: admin_only(config_dir)) as (port, operations):
        yield port, operations, config_dir


STRICT = "maxDeviceThreatLevel: secured"  # Alex's iPhone reports "low": blocked under these rules
ALEX_SYNCS = {"user": "alex@contoso.test", "url": f"https://{MAIL}/Microsoft-Server-ActiveSync",
              "app": "outlook-mobile", "device": ALEX_IPHONE}


def test_an_operator_reloads_a_changed_policy_through_the_api(gateway: Gateway,
                                                             reload_admin: tuple[int, Operations, Path]) -> None:
    port, operations, config_dir = reload_admin
    reader, operator = admin_token(gateway, READER), admin_token(gateway, OPERATOR, user="omar@contoso.test")

    def alex_would_be() -> str:
        return str(admin(port, "POST", "/admin/whatif", reader, json=ALEX_SYNCS).json()["result"])

    assert alex_would_be() == "allow"
    policies = config_dir / "policies.yaml"
    policies.write_text(policies.read_text().replace("maxDeviceThreatLevel: low", STRICT, 1))
    assert admin(port, "POST", "/admin/reload", reader).status_code == 403
    assert alex_would_be() == "allow"  # the reader's attempt changed nothing
    response = admin(port, "POST", "/admin/reload", operator)
    assert response.status_code == 200, response.text
    assert response.json()["applied"] is True and response.json()["trigger"] == "adminApi"
    assert alex_would_be() == "block"
    record = audit_record(config_dir, response)
    assert (record["activityDisplayName"], record["result"]) == ("Reload configuration", "success")
    assert record["initiatedBy"]["user"]["userPrincipalName"] == "omar@contoso.test"
    assert record["targetResources"][0]["type"] == "Configuration"
    samples = scrape(port, reader)
    assert value(samples, "portcullis_config_reloads_total", result="success", trigger="adminApi") == 1
    assert value(samples, "portcullis_admin_requests_total", action="reload", outcome="forbidden") == 1
    assert value(samples, "portcullis_admin_requests_total", action="reload", outcome="success") == 1


def test_an_invalid_change_is_rejected_with_its_line_and_the_last_good_rules_stay(
        gateway: Gateway, reload_admin: tuple[int, Operations, Path]) -> None:
    port, operations, config_dir = reload_admin
    reader, operator = admin_token(gateway, READER), admin_token(gateway, OPERATOR)
    policies = config_dir / "policies.yaml"
    original = policies.read_text()
    policies.write_text(original.replace("maxDeviceThreatLevel: low", STRICT, 1))
    assert admin(port, "POST", "/admin/reload", operator).status_code == 200
    broken = original.replace("    state: enabled\n", "    state: enabeld\n", 1)
    line = original[:original.index("    state: enabled\n")].count("\n") + 1
    policies.write_text(broken)
    response = admin(port, "POST", "/admin/reload", operator)
    assert response.status_code == 422
    outcome = response.json()
    assert outcome["applied"] is False
    assert any(f"policies.yaml:{line}:" in p and "enabeld" in p for p in outcome["problems"]), outcome["problems"]
    assert admin(port, "POST", "/admin/whatif", reader, json=ALEX_SYNCS).json()["result"] == "block"  # last good
    ready = admin(port, "GET", "/readyz", reader)
    config_check = next(c for c in ready.json()["checks"] if c["name"] == "config")
    assert ready.status_code == 200 and config_check["status"] == "warn" and "enabeld" in config_check["detail"]
    anonymous = admin(port, "GET", "/readyz")
    assert {"name": "config", "status": "warn"} in anonymous.json()["checks"]
    assert "enabeld" not in anonymous.text and str(config_dir) not in anonymous.text
    samples = scrape(port, reader)
    assert value(samples, "portcullis_config_reloads_total", result="failure", trigger="adminApi") == 1
    assert value(samples, "portcullis_config_last_reload_successful") == 0
    record = audit_record(config_dir, response)
    assert record["result"] == "failure" and f"policies.yaml:{line}:" in record["resultReason"]
    dashboard = admin(port, "GET", "/", reader)
    assert "rejected: the previous rules stay in force" in dashboard.text and "enabeld" in dashboard.text


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (.ci/run installs it)")
def test_the_demo_banner_prints_a_working_admin_command(gateway: Gateway, tmp_path: Path) -> None:
    config = load_config(gateway.config_dir)
    text = banner(config, gateway.idp, tmp_path / "ca.pem", gateway.port)
    command = next(line for line in text.splitlines() if line.startswith("curl") and "/metrics" in line)
    output = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30).stdout
    assert "portcullis_decisions_total" in output
    assert f"http://127.0.0.1:{gateway.admin_port}/" in text  # the dashboard


def _edit_admin_section(config_dir: Path, change: Callable[[Any], None]) -> None:
    yaml = YAML()
    path = config_dir / "portcullis.yaml"
    data = yaml.load(path)
    change(data["admin"])
    yaml.dump(data, path)


def test_check_warns_when_the_admin_api_leaves_loopback(tmp_path: Path) -> None:
    config_dir = demo_config_copy(tmp_path, Ports.fresh())
    assert not [w for w in config_warnings(load_config(config_dir)) if "admin" in w.key]
    _edit_admin_section(config_dir, lambda admin: admin["listen"].update(host="0.0.0.0"))  # noqa: S104
    warnings = [str(w) for w in config_warnings(load_config(config_dir)) if "admin" in w.key]
    assert len(warnings) == 1 and "plain HTTP" in warnings[0] and "portcullis.yaml:" in warnings[0]


def test_an_admin_section_needs_an_audience(tmp_path: Path) -> None:
    config_dir = demo_config_copy(tmp_path, Ports.fresh())
    _edit_admin_section(config_dir, lambda admin: admin.pop("audience"))
    with pytest.raises(ConfigError) as raised:
        load_config(config_dir)
    assert [str(p).split(": ", 1)[1] for p in raised.value.problems] == ["admin: required key 'audience' is missing"]


def test_the_sign_in_form_sets_a_strict_http_only_cookie_for_a_reader_token(gateway: Gateway) -> None:
    response = admin(gateway.admin_port, "POST", "/signin", data={"token": admin_token(gateway, READER)},
                     headers={"Origin": f"http://127.0.0.1:{gateway.admin_port}"})
    assert (response.status_code, response.headers["location"]) == (303, "/")
    cookie = response.headers["set-cookie"].lower()
    assert cookie.startswith("portcullis_admin=") and "httponly" in cookie and "samesite=strict" in cookie
    assert audit_record(gateway.config_dir, response)["activityDisplayName"] == "Sign in to the dashboard"


@pytest.mark.parametrize("headers", [
    pytest.param({"Origin": "http://evil.example"}, id="another origin"),
    pytest.param({"Origin": "null"}, id="an opaque origin"),
    pytest.param({"Sec-Fetch-Site": "cross-site"}, id="a cross-site fetch"),
])
def test_a_sign_in_posted_from_another_site_is_refused(gateway: Gateway, headers: dict[str, str]) -> None:
    response = admin(gateway.admin_port, "POST", "/signin", data={"token": admin_token(gateway, READER)},
                     headers=headers)
    assert response.status_code == 403 and "set-cookie" not in response.headers
    assert "dashboard's own page" in audit_record(gateway.config_dir, response)["resultReason"]


def _own_admin_section(tmp_path: Path, gateway: Gateway, demo_ports: Ports, change: Callable[[Any], None]) -> Path:
    config_dir = own_config(tmp_path, gateway, Ports(0, demo_ports.idp, demo_ports.mail, demo_ports.docs))
    _edit_admin_section(config_dir, change)
    return config_dir


@contextlib.asynccontextmanager
async def proxy_and_admin(config_dir: Path) -> AsyncIterator[tuple[int, int, Operations]]:
    """A gateway of its own: the proxy and the admin listener in one event loop, as in production."""
    operations = await operations_for(config_dir)
    async with proxy_for(operations.service) as proxy_port, admin_listener(operations) as address:
        assert address is not None
        yield proxy_port, address[1], operations


LOOKUPS = 48


@pytest.mark.slow
def test_a_flood_of_decision_lookups_gets_429_and_leaves_the_request_path_alone(
        gateway: Gateway, tmp_path: Path, demo_ports: Ports) -> None:
    """Unknown ids are searched for in every rotated decision log file: those scans queue on a
    thread of their own, a few at a time, and never hold the worker threads device lookups use."""
    config_dir = own_config(tmp_path, gateway, Ports(0, demo_ports.idp, demo_ports.mail, demo_ports.docs))
    reader = admin_token(gateway, READER)
    with Background(lambda: proxy_and_admin(config_dir)) as (proxy_port, admin_port, operations):
        log = operations.service.decision_log.path
        for n in (1, 2):  # short lines: slow to scan, quick to write
            log.with_name(f"{log.name}.{n}").write_text("{}\n" * (16 * 1024 * 1024 // 3))

        def lookup(_: int) -> httpx.Response:
            # a queued scan answers once those ahead of it are done: how long depends on the machine's load,
            # and is not what this test asserts (the request path's answer is)
            return admin(admin_port, "GET", f"/admin/decisions/{uuid.uuid4()}", reader, timeout=120)

        with ThreadPoolExecutor(LOOKUPS) as pool:
            lookups = [pool.submit(lookup, n) for n in range(LOOKUPS)]
            time.sleep(0.3)
            with gateway.client() as client:  # Alex's iPhone: a device lookup in the SQLite inventory
                synced = client.post(f"https://127.0.0.1:{proxy_port}{activesync(ALEX_IPHONE, 'alex')}",
                                     headers={"Host": MAIL, "Authorization": f"Bearer {outlook(gateway)}"},
                                     extensions={"sni_hostname": MAIL}, timeout=30)
            answers = [f.result(timeout=120) for f in lookups]
    assert synced.status_code == 200, synced.text
    statuses = [a.status_code for a in answers]
    assert set(statuses) <= {404, 429} and 404 in statuses and 429 in statuses, statuses
    busy = next(a for a in answers if a.status_code == 429)
    assert busy.headers["Retry-After"].isdigit()
    record = audit_record(config_dir, busy)
    assert record["result"] == "failure" and "too many" in record["resultReason"]


def test_a_handler_that_fails_answers_an_audited_500(gateway: Gateway, reload_admin: tuple[int, Operations, Path],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    port, operations, config_dir = reload_admin

    async def broken(_: str) -> None:
        raise RuntimeError("the disk is on fire")

    def broken_checks() -> None:
        raise RuntimeError("the inventory is on fire")

    monkeypatch.setattr(operations.reloader, "reload", broken)
    response = admin(port, "POST", "/admin/reload", admin_token(gateway, OPERATOR, user="omar@contoso.test"))
    assert response.status_code == 500 and response.json()["error"] == "server_error"
    assert "on fire" not in response.text
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    record = audit_record(config_dir, response)
    assert (record["activityDisplayName"], record["result"]) == ("Reload configuration", "failure")
    assert record["resultReason"] == "internal error: RuntimeError"
    assert record["initiatedBy"]["user"]["userPrincipalName"] == "omar@contoso.test"
    monkeypatch.setattr(operations.health, "checks", broken_checks)
    probe = admin(port, "GET", "/readyz")  # outside any guarded handler
    assert probe.status_code == 500 and "X-Frame-Options" in probe.headers
    assert audit_record(config_dir, probe)["activityDisplayName"] == "Fail with an internal error"
    monkeypatch.undo()
    samples = scrape(port, admin_token(gateway, READER))
    assert value(samples, "portcullis_admin_requests_total", action="reload", outcome="error") == 1
    assert value(samples, "portcullis_admin_requests_total", action="error", outcome="error") == 1


@pytest.mark.parametrize(("method", "path", "status", "activity"), [
    pytest.param("GET", "/admin/users", 404, "Request an unknown path", id="unknown path -> 404"),
    pytest.param("DELETE", "/admin/reload", 405, "Use a method the path does not allow", id="DELETE reload -> 405"),
    pytest.param("GET", "/admin/whatif", 405, "Use a method the path does not allow", id="GET whatif -> 405"),
])
def test_unknown_paths_and_methods_are_audited(gateway: Gateway, method: str, path: str, status: int,
                                               activity: str) -> None:
    response = admin(gateway.admin_port, method, path, admin_token(gateway, OPERATOR))
    assert response.status_code == status
    assert response.headers["X-Frame-Options"] == "DENY"
    if status == 405:
        assert response.headers["Allow"]
    record = audit_record(gateway.config_dir, response)
    assert (record["activityDisplayName"], record["result"]) == (activity, "failure")
    assert {"key": "path", "value": path} in record["additionalDetails"]
    assert record["initiatedBy"]["user"] is None  # no handler, so no token was checked


@pytest.mark.parametrize(("host", "path", "status"), [
    pytest.param("rebound.attacker.test", "/", 421, id="dashboard for another name -> 421"),
    pytest.param("rebound.attacker.test:{port}", "/metrics", 421, id="metrics for another name -> 421"),
    pytest.param("127.0.0.2:{port}", "/admin/decisions/x", 421, id="another address -> 421"),
    pytest.param("localhost:{port}", "/metrics", 200, id="localhost on loopback -> 200"),
    pytest.param("rebound.attacker.test:{port}", "/healthz", 200, id="liveness by any name -> 200"),
    pytest.param("10.1.2.3:{port}", "/readyz", 200, id="readiness by any name -> 200"),
])
def test_a_request_for_another_host_is_refused_but_probes_are_not(gateway: Gateway, host: str, path: str,
                                                                 status: int) -> None:
    """DNS rebinding: a page on rebound.attacker.test, resolved to 127.0.0.1, would send its own Host."""
    response = admin(gateway.admin_port, "GET", path, admin_token(gateway, READER),
                     headers={"Host": host.format(port=gateway.admin_port)})
    assert response.status_code == status, response.text
    if status == 421:
        record = audit_record(gateway.config_dir, response)
        assert (record["activityDisplayName"], record["result"]) == ("Refuse a request for another host", "failure")
        assert response.headers["Cache-Control"] == "no-store"


PUBLIC = "https://admin.contoso.test"


def test_behind_a_tls_proxy_the_cookie_is_secure_and_sign_in_comes_from_the_public_origin(
        gateway: Gateway, tmp_path: Path, demo_ports: Ports) -> None:
    config_dir = _own_admin_section(tmp_path, gateway, demo_ports, lambda a: a.update(publicUrl=PUBLIC + "/"))
    reader = admin_token(gateway, READER)
    proxied = {"Host": "admin.contoso.test", "Origin": PUBLIC}  # what the TLS proxy passes on
    with Background(lambda: admin_only(config_dir)) as (port, _):
        signed_in = admin(port, "POST", "/signin", data={"token": reader}, headers=proxied)
        direct = admin(port, "POST", "/signin", data={"token": reader},
                       headers={"Origin": f"http://127.0.0.1:{port}"})  # not the origin browsers use
        page = admin(port, "GET", "/", headers={"Host": "admin.contoso.test",
                                                "Cookie": f"__Host-portcullis_admin={reader}"})
        plain = admin(port, "GET", "/", headers={"Cookie": f"portcullis_admin={reader}"})
        signed_out = admin(port, "POST", "/signout", headers=proxied)
    assert signed_in.status_code == 303, signed_in.text
    cookie = signed_in.headers["set-cookie"].lower()
    assert cookie.startswith("__host-portcullis_admin=") and "; secure" in cookie and "path=/" in cookie
    assert "domain" not in cookie and "httponly" in cookie and "samesite=strict" in cookie
    assert direct.status_code == 403 and "set-cookie" not in direct.headers
    assert page.status_code == 200 and plain.status_code == 401
    assert signed_out.status_code == 303
    gone = signed_out.headers["set-cookie"].lower()
    assert gone.startswith("__host-portcullis_admin=") and "; secure" in gone and "max-age=0" in gone


@pytest.mark.parametrize(("url", "message"), [
    pytest.param("http://admin.contoso.test", "https origin", id="plain http"),
    pytest.param("https://admin.contoso.test/portcullis/", "has a path", id="a path"),
    pytest.param("https://olivia@admin.contoso.test", "https origin", id="a user name"),
    pytest.param("https://[::1", "is not a URL", id="broken"),
])
def test_a_public_url_is_an_https_origin(tmp_path: Path, url: str, message: str) -> None:
    config_dir = demo_config_copy(tmp_path, Ports.fresh())
    _edit_admin_section(config_dir, lambda a: a.update(publicUrl=url))
    with pytest.raises(ConfigError) as raised:
        load_config(config_dir)
    assert message in str(raised.value.problems[0])


def test_a_public_url_is_kept_as_the_origin_browsers_send(tmp_path: Path) -> None:
    config_dir = demo_config_copy(tmp_path, Ports.fresh())
    _edit_admin_section(config_dir, lambda a: a.update(publicUrl="https://Admin.Contoso.TEST:443/"))
    admin_settings = load_config(config_dir).gateway_file.admin
    assert admin_settings is not None and admin_settings.public_url == PUBLIC


def test_typed_user_names_are_audited_as_pseudonyms_when_the_decision_log_uses_them(
        gateway: Gateway, tmp_path: Path, demo_ports: Ports) -> None:
    config_dir = own_config(tmp_path, gateway, Ports(0, demo_ports.idp, demo_ports.mail, demo_ports.docs))
    yaml = YAML()
    settings = yaml.load(config_dir / "portcullis.yaml")
    settings["decisionLog"]["pseudonymizeUsers"] = True
    yaml.dump(settings, config_dir / "portcullis.yaml")
    reader = admin_token(gateway, READER, user="rita@contoso.test")
    with Background(lambda: admin_only(config_dir)) as (port, operations):
        dashboard = admin(port, "GET", "/", reader, params={"user": "blake@contoso.test", "result": "block"})
        asked = admin(port, "POST", "/admin/whatif", reader, json={**ALEX_SYNCS, "user": "blake@contoso.test"})
        pseudonymizer = operations.service.decision_log.pseudonymizer
        assert pseudonymizer is not None
        blake = pseudonymizer.pseudonym("blake@contoso.test")
    assert (dashboard.status_code, asked.status_code) == (200, 200)
    audited = audit_path(config_dir).read_text()
    assert "blake" not in audited and blake in audited
    assert "rita@contoso.test" in audited  # the admin is named: the log holds admins to account
    filtered = audit_record(config_dir, dashboard)
    assert {"key": "filter", "value": f"result=block&user={blake.replace(':', '%3A')}"} in filtered[
        "additionalDetails"]
    assert audit_record(config_dir, asked)["targetResources"][0]["displayName"] == blake


def test_the_admin_audit_log_is_readable_by_its_owner_only(gateway: Gateway) -> None:
    admin(gateway.admin_port, "GET", "/metrics", admin_token(gateway, READER))
    assert stat.S_IMODE(audit_path(gateway.config_dir).stat().st_mode) == 0o600


def test_the_admin_audit_log_rotates_by_size_and_stays_private(tmp_path: Path) -> None:
    from gateway.ops.admin_audit import AdminAuditLog

    path = tmp_path / "admin-audit.jsonl"
    audit = AdminAuditLog(path, max_bytes=4096, keep_files=2)
    assert all(audit.write({"correlationId": f"c{n:03d}", "padding": "x" * 100}) for n in range(200))
    audit.close()
    files = sorted(tmp_path.glob("admin-audit.jsonl*"))
    assert [f.name for f in files] == ["admin-audit.jsonl", "admin-audit.jsonl.1", "admin-audit.jsonl.2"]
    assert all(f.stat().st_size <= 4096 and f.stat().st_mode & 0o077 == 0 for f in files)
    assert json.loads(path.read_text().splitlines()[-1])["correlationId"] == "c199"
    unwritable = AdminAuditLog(tmp_path)  # a directory: the write fails, is reported, never raised
    assert unwritable.write({"correlationId": "c"}) is False


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_is_counted_under_a_reason_of_its_own(code: ErrorCode) -> None:
    """A refusal with any error code is counted (a 500 of the gateway's own raised KeyError in the
    metrics, so the request it refused never reached the decision log)."""
    decision = Decision(result=DecisionResult.block, status_code=code.value if code.value < 600 else 403,
                        error_code=code, reason="r", resource=None, client_app_type=ClientAppType.other)
    label = reason_label(decision)
    assert label[0].islower() and label.isalnum() and label not in ("blocked", "refused")
    GatewayMetrics().record_decision(decision, None)
