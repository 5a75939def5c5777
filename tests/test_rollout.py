"""Progressive enforcement: a policy with a rollout is enforced for its cohort (a group, a stable
share of users, a listener) and is report-only for everyone else; the results, the decision log,
What If and the cases say which, and mistakes in a rollout are config errors with a place."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from gateway.app import bootstrap
from gateway.app.demo import ALEX_IPHONE, EXCHANGE, OFFICE
from gateway.config import load_config
from gateway.config.compile import compile_policy_set
from gateway.config.lint import config_warnings
from gateway.config.models import ConditionalAccessPolicy, Resource
from gateway.errors import ConfigError
from gateway.policy.evaluate import evaluate
from gateway.policy.model import (
    AccessRequest,
    ClientApp,
    DeviceSignals,
    Identity,
    PolicyResultKind,
    RolloutCohort,
)
from gateway.policy.policy_set import PolicySet
from gateway.policy.rollout import BUCKETS, in_share, user_bucket
from tests.conftest import REPO, Background, Gateway, Ports, demo_config_copy, proxy_for, write_trustme_certificate
from tests.helpers.config import DEMO_RETIRED_GRANT

HOST = "mail.contoso.test"
NOW = datetime(2026, 11, 23, tzinfo=UTC)
USERS = [str(uuid.uuid5(uuid.NAMESPACE_URL, f"oid:user{i}@contoso.test")) for i in range(20_000)]


# The stable share


def test_a_users_bucket_is_the_same_in_every_process() -> None:
    """No dependency on Python's per-process hash seed: another interpreter draws the same buckets."""
    sample = USERS[:200]
    script = ("import json, sys\nfrom gateway.policy.rollout import user_bucket\n"
              "print(json.dumps([user_bucket('mfa-rollout', u) for u in json.loads(sys.argv[1])]))")
    other = subprocess.run([sys.executable, "-c", script, json.dumps(sample)], cwd=REPO, capture_output=True,
                           text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert json.loads(other.stdout) == [user_bucket("mfa-rollout", u) for u in sample]
    assert all(0 <= b < BUCKETS for b in json.loads(other.stdout))


@pytest.mark.parametrize("percent", [1, 10, 50])
def test_the_share_is_close_to_the_configured_percentage(percent: int) -> None:
    inside = sum(in_share("mfa-rollout", u, percent) for u in USERS)
    assert abs(inside / len(USERS) - percent / 100) < 0.01, inside


def test_raising_the_percentage_keeps_everyone_already_in() -> None:
    ten = {u for u in USERS if in_share("mfa-rollout", u, 10)}
    twenty = {u for u in USERS if in_share("mfa-rollout", u, 20)}
    assert ten < twenty


def test_each_policy_draws_its_own_share() -> None:
    first = {u for u in USERS if in_share("mfa-rollout", u, 10)}
    second = {u for u in USERS if in_share("compliant-rollout", u, 10)}
    assert 0.05 < len(first & second) / len(first) < 0.15  # independent draws overlap by about 10 %


# Evaluation (pure)


def _policy_set(rollout: dict[str, object], resources: list[str] | None = None) -> PolicySet:
    resource_models = {name: Resource.model_validate_json(json.dumps({"hosts": [HOST], "paths": [f"/{name}/"]}))
                       for name in ("owa", "ews")}
    policy = ConditionalAccessPolicy.model_validate_json(json.dumps({
        "name": "mfa-rollout", "state": "enabled", "rollout": rollout,
        "conditions": {"resources": {"include": resources or ["owa"]}},
        "grantControls": {"builtInControls": ["mfa"]}}))
    return compile_policy_set(resource_models, (policy,), {})


def _decide(policy_set: PolicySet, *, path: str = "/owa/", groups: frozenset[str] = frozenset(),
            object_id: str | None = "00000000-0000-4000-8000-000000000001", kiosk: bool = False,
            cohorts: dict[str, RolloutCohort] | None = None) -> object:
    request = AccessRequest(correlation_id="c", host=HOST, path=path, method="GET", client_ip="203.0.113.5",
                            user_agent="Outlook-iOS-Android/1.0", accepts_html=False,
                            kiosk_location="kiosk" if kiosk else None)
    identity = Identity(subject="sub-1", user_principal_name="alex@contoso.test", object_id=object_id, tenant_id="t",
                        client_id="c", device_id=None, groups=groups, audience="a", expires_at=0)
    found = policy_set.match(HOST, path)
    assert found is not None
    recorded = {"cohorts": cohorts} if cohorts is not None else {}
    return evaluate(request=request, identity=identity, device=DeviceSignals(device_id=None, device=None, source="t"),
                    app=ClientApp(client_id="c", name=None), resources=found.names, policy_set=policy_set, now=NOW,
                    **recorded)


@pytest.mark.parametrize(
    ("rollout", "facts", "cohort", "kind", "allowed"),
    [
        pytest.param({"groups": ["MFA-Pilot"]}, {"groups": frozenset({"mfa-pilot"})}, RolloutCohort.group,
                     PolicyResultKind.failure, False, id="group member (any case) -> enforced"),
        pytest.param({"groups": ["mfa-pilot"]}, {"groups": frozenset({"finance"})}, RolloutCohort.outside,
                     PolicyResultKind.report_only_failure, True, id="not a member -> report-only"),
        pytest.param({"listeners": ["kiosk"]}, {"kiosk": True}, RolloutCohort.listener,
                     PolicyResultKind.failure, False, id="kiosk listener -> enforced"),
        pytest.param({"listeners": ["kiosk"]}, {}, RolloutCohort.outside,
                     PolicyResultKind.report_only_failure, True, id="reverse proxy -> report-only"),
        pytest.param({"listeners": ["gateway"]}, {}, RolloutCohort.listener,
                     PolicyResultKind.failure, False, id="gateway listener -> enforced"),
        pytest.param({"percentOfUsers": 100}, {}, RolloutCohort.percent_of_users,
                     PolicyResultKind.failure, False, id="100 percent -> everyone"),
        pytest.param({"groups": ["mfa-pilot"], "percentOfUsers": 0}, {}, RolloutCohort.outside,
                     PolicyResultKind.report_only_failure, True, id="0 percent and no group -> nobody"),
    ],
)
def test_inside_the_cohort_enforced_outside_report_only(rollout: dict[str, object], facts: dict[str, object],
                                                        cohort: RolloutCohort, kind: PolicyResultKind,
                                                        allowed: bool) -> None:
    decision = _decide(_policy_set(rollout), **facts)  # type: ignore[arg-type]  # test parameters
    [result] = decision.policies  # type: ignore[attr-defined]
    assert (result.rollout, result.result) == (cohort, kind)
    assert decision.allowed is allowed  # type: ignore[attr-defined]


def test_the_share_is_drawn_on_the_object_id_else_the_subject() -> None:
    policy_set = _policy_set({"percentOfUsers": 10})
    inside = next(u for u in USERS if in_share("mfa-rollout", u, 10))
    outside = next(u for u in USERS if not in_share("mfa-rollout", u, 10))
    assert _decide(policy_set, object_id=inside.upper()).policies[0].rollout is RolloutCohort.percent_of_users  # type: ignore[attr-defined]
    assert _decide(policy_set, object_id=outside).policies[0].rollout is RolloutCohort.outside  # type: ignore[attr-defined]
    by_subject = RolloutCohort.percent_of_users if in_share("mfa-rollout", "sub-1", 10) else RolloutCohort.outside
    assert _decide(policy_set, object_id=None).policies[0].rollout is by_subject  # type: ignore[attr-defined]


def test_a_recorded_cohort_stands_in_for_the_drawn_one() -> None:
    """Replay of a pseudonymised decision log cannot draw a share from a pseudonym: it passes the
    cohort the gateway recorded, and ``evaluate`` uses it for that policy instead of drawing one."""
    policy_set = _policy_set({"percentOfUsers": 10})
    inside = next(u for u in USERS if in_share("mfa-rollout", u, 10))
    outside = next(u for u in USERS if not in_share("mfa-rollout", u, 10))
    [drawn] = _decide(policy_set, object_id=outside).policies  # type: ignore[attr-defined]
    assert drawn.rollout is RolloutCohort.outside
    given = _decide(policy_set, object_id=outside, cohorts={"mfa-rollout": RolloutCohort.percent_of_users})
    [result] = given.policies  # type: ignore[attr-defined]
    assert (result.rollout, result.result, given.allowed) == (  # type: ignore[attr-defined]
        RolloutCohort.percent_of_users, PolicyResultKind.failure, False)
    given = _decide(policy_set, object_id=inside, cohorts={"mfa-rollout": RolloutCohort.outside})
    [result] = given.policies  # type: ignore[attr-defined]
    assert (result.rollout, result.result, given.allowed) == (  # type: ignore[attr-defined]
        RolloutCohort.outside, PolicyResultKind.report_only_failure, True)
    other = _decide(policy_set, object_id=inside, cohorts={"another-policy": RolloutCohort.outside})
    assert other.policies[0].rollout is RolloutCohort.percent_of_users  # type: ignore[attr-defined]
    not_targeted = _decide(_policy_set({"percentOfUsers": 10}, resources=["ews"]), object_id=outside,
                           cohorts={"mfa-rollout": RolloutCohort.percent_of_users})
    assert [(r.result, r.rollout) for r in not_targeted.not_targeted] == \
        [(PolicyResultKind.not_applied, RolloutCohort.percent_of_users)]  # type: ignore[attr-defined]


def test_a_rollout_policy_that_does_not_target_the_resource_still_says_which_side() -> None:
    policy_set = _policy_set({"groups": ["mfa-pilot"]}, resources=["ews"])
    inside = _decide(policy_set, groups=frozenset({"mfa-pilot"}))
    outside = _decide(policy_set)
    assert [(r.result, r.rollout) for r in inside.not_targeted] == \
        [(PolicyResultKind.not_applied, RolloutCohort.group)]  # type: ignore[attr-defined]
    assert [(r.result, r.rollout) for r in outside.not_targeted] == \
        [(PolicyResultKind.report_only_not_applied, RolloutCohort.outside)]  # type: ignore[attr-defined]


# Config


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    target = tmp_path / "config"
    shutil.copytree(REPO / "config", target)
    (target / "cases.yaml").unlink()  # the demo's cases are about the demo's policies
    return target


def add_policy(config_dir: Path, text: str) -> int:
    """Append a policy to policies.yaml; returns the line its ``rollout`` key is on."""
    policies = config_dir / "policies.yaml"
    before = policies.read_text()
    policies.write_text(before + text)
    return len(before.splitlines()) + next(i for i, line in enumerate(text.splitlines(), 1)
                                           if line.strip().startswith("rollout:"))


ROLLOUT_POLICY = """
  - name: mfa-rollout
    state: {state}
    rollout: {rollout}
    conditions:
      resources: {{include: [exchange-owa]}}
    grantControls:
      builtInControls: [mfa]
"""


@pytest.mark.parametrize(
    ("state", "rollout", "key", "message"),
    [
        pytest.param("reportOnly", "{groups: [mfa-pilot]}", "rollout", "a rollout enforces a policy for a cohort and "
                     "reports only for the rest: it needs state: enabled (this policy is reportOnly)",
                     id="report-only policy"),
        pytest.param("disabled", "{listeners: [kiosk]}", "rollout", "it needs state: enabled (this policy is disabled)",
                     id="disabled policy"),
        pytest.param("enabled", "{}", "rollout", "a rollout names its cohort: groups, percentOfUsers (1-100) or "
                     "listeners", id="no cohort"),
        pytest.param("enabled", "{percentOfUsers: 101}", "rollout.percentOfUsers", "less than or equal to 100",
                     id="more than everyone"),
        pytest.param("enabled", "{percentOfUsers: '10%'}", "rollout.percentOfUsers", "valid integer",
                     id="a percentage as text"),
        pytest.param("enabled", "{listeners: [lobby]}", "rollout.listeners[0]",
                     "'lobby' is not allowed (allowed: gateway, kiosk, forwardAuth)", id="unknown listener"),
        pytest.param("enabled", "{groups: [a], users: [b]}", "rollout.users", "unknown key 'users'", id="unknown key"),
    ],
)
def test_rollout_mistakes_are_errors_at_their_line(config_dir: Path, state: str, rollout: str, key: str,
                                                   message: str) -> None:
    line = add_policy(config_dir, ROLLOUT_POLICY.format(state=state, rollout=rollout))
    with pytest.raises(ConfigError) as caught:
        load_config(config_dir)
    [problem] = [str(p) for p in caught.value.problems]
    assert problem.startswith(f"{config_dir / 'policies.yaml'}:{line}:"), problem
    assert f": policies[6].{key}: " in problem and message in problem, problem


def test_check_warns_only_when_a_rollout_leaves_a_resource_open(config_dir: Path) -> None:
    def warnings(config_dir: Path) -> list[str]:  # beside the demo's known one (approvedApplication retired)
        return [str(w) for w in config_warnings(load_config(config_dir)) if DEMO_RETIRED_GRANT not in str(w)]

    assert warnings(config_dir) == []  # the demo config
    add_policy(config_dir, ROLLOUT_POLICY.format(state="enabled", rollout="{listeners: [kiosk]}"))
    assert warnings(config_dir) == []  # an extra rollout on a covered resource: fine
    gateway_file = config_dir / "portcullis.yaml"
    gateway_file.write_text(gateway_file.read_text().replace(
        "resources:                           # your own named resources; a path no resource names is denied\n",
        "resources:\n  lobby-screens:\n    hosts: [mail.contoso.test]\n    paths: [/lobby/]\n"))
    add_policy(config_dir, ROLLOUT_POLICY.replace("mfa-rollout", "lobby-rollout").replace("exchange-owa",
               "lobby-screens").format(state="enabled", rollout="{groups: [pilot]}"))
    [warning] = warnings(config_dir)
    assert "resource 'lobby-screens' is covered only for the rollout cohort of policy 'lobby-rollout': outside it " \
           "any valid token reaches it" in warning


def test_check_warns_about_a_kiosk_rollout_without_a_kiosk_listener(tmp_path: Path) -> None:
    target = tmp_path / "config"
    shutil.copytree(REPO / "config" / "examples" / "report-only-trial", target)
    shutil.copy(REPO / "config" / "examples" / "devices.yaml", tmp_path / "devices.yaml")
    gateway_file = target / "portcullis.yaml"
    text = gateway_file.read_text()
    gateway_file.write_text(text[:text.index("kiosk:")])
    [warning] = [str(w) for w in config_warnings(load_config(target))]
    assert "policy 'sharepoint-mfa-rollout': no kiosk listener is configured, so its rollout never includes kiosk " \
           "requests" in warning
    assert warning.startswith(f"{target / 'policies.yaml'}:")


def test_whatif_shows_the_cohort_in_text_and_json() -> None:
    portcullis = str(Path(sys.executable).with_name("portcullis"))
    base = [portcullis, "whatif", "--config", str(REPO / "config" / "examples" / "report-only-trial"),
            "--user", "alex@contoso.test", "--url", "https://docs.contoso.test/sites/team/"]
    text = subprocess.run([*base, "--listener", "kiosk"], capture_output=True, text=True, timeout=60)
    assert text.returncode == 0, text.stderr
    assert "through the kiosk listener" in text.stdout
    assert "sharepoint-mfa-rollout [enabled, rollout: inCohort:listener]: failure; requires mfa" in text.stdout
    answer = json.loads(subprocess.run([*base, "--object-id", "00890f3e-c97c-5d9d-81ec-f2a616521149", "--json"],
                                       capture_output=True, text=True, timeout=60, check=True).stdout)
    assert answer["input"]["listener"] == "gateway"
    [rollout] = [p for p in answer["policies"] if p["id"] == "sharepoint-mfa-rollout"]
    assert (rollout["result"], rollout["rollout"]) == ("reportOnlyFailure", "outsideCohort")


# Through the real listeners: the reverse proxy and the kiosk forward proxy


KIOSK_AND_PILOT_ROLLOUT = """
  - name: owa-mfa-rollout
    displayName: "Rollout: MFA for Outlook on the web"
    state: enabled
    rollout: {groups: [mfa-pilot], listeners: [kiosk]}
    conditions:
      resources: {include: [exchange-owa]}
    grantControls:
      builtInControls: [mfa]
"""


@pytest.fixture
def rollout_gateway(gateway: Gateway, tmp_path: Path, demo_ports: Ports) -> Iterator[tuple[Gateway, int]]:
    """A second gateway on the demo config plus the rollout, sharing the session's issuer and backends;
    returns it and its kiosk proxy port."""
    ports = Ports(0, demo_ports.idp, demo_ports.mail, demo_ports.docs)
    config_dir = demo_config_copy(tmp_path, ports)
    write_trustme_certificate(gateway.ca, config_dir)
    (config_dir / "policies.yaml").write_text((config_dir / "policies.yaml").read_text() + KIOSK_AND_PILOT_ROLLOUT)
    loaded = bootstrap.load(config_dir)
    bootstrap.seed_store(loaded)  # the demo's devices, as `portcullis demo` seeds them
    service, _ = bootstrap.build_service(loaded)
    kiosk = loaded.config.gateway_file.kiosk
    assert kiosk is not None
    log = loaded.config.path(loaded.config.gateway_file.decision_log.path)
    with Background(lambda: proxy_for(service)) as port:
        yield Gateway(port=port, idp=gateway.idp, ca=gateway.ca, config_dir=config_dir, decision_log=log), \
            kiosk.listen.port


def _browser_token(gateway: Gateway, **extra: object) -> str:
    return gateway.idp.mint(user="alex@contoso.test", client_id=OFFICE, audience=EXCHANGE, device_id=ALEX_IPHONE,
                            extra=extra or None)


def _logged_rollout(gateway: Gateway, response: httpx.Response) -> tuple[str, str]:
    """The rollout policy's result and cohort, as the decision log has them."""
    record = gateway.decision(response.headers["x-portcullis-correlation-id"])
    [entry] = [p for p in record["appliedConditionalAccessPolicies"] if p["id"] == "owa-mfa-rollout"]
    return entry["result"], entry["rollout"]


def test_outside_the_cohort_the_reverse_proxy_only_reports(rollout_gateway: tuple[Gateway, int]) -> None:
    gateway, _ = rollout_gateway
    response = gateway.request(HOST, "/owa/", token=_browser_token(gateway))
    assert response.status_code == 200
    assert _logged_rollout(gateway, response) == ("reportOnlyFailure", "outsideCohort")


def test_a_pilot_group_member_is_enforced_on_the_reverse_proxy(rollout_gateway: tuple[Gateway, int]) -> None:
    gateway, _ = rollout_gateway
    response = gateway.request(HOST, "/owa/", token=_browser_token(gateway, groups=["mfa-pilot"]))
    assert response.status_code == 403
    assert response.json()["errorCode"] == 50076
    assert _logged_rollout(gateway, response) == ("failure", "inCohort:group")


def test_the_kiosk_listener_is_in_the_cohort(rollout_gateway: tuple[Gateway, int]) -> None:
    gateway, kiosk_port = rollout_gateway
    context = ssl.create_default_context()
    gateway.ca.configure_trust(context)
    with httpx.Client(proxy=f"http://127.0.0.1:{kiosk_port}", verify=context, timeout=10) as kiosk:
        response = kiosk.get(f"https://{HOST}/owa/", headers={"Authorization": f"Bearer {_browser_token(gateway)}"})
    assert response.status_code == 403
    assert response.json()["errorCode"] == 50076
    assert _logged_rollout(gateway, response) == ("failure", "inCohort:listener")


def test_check_warns_about_a_forward_auth_rollout_without_a_forward_auth_listener(tmp_path: Path) -> None:
    target = tmp_path / "config"
    shutil.copytree(REPO / "config" / "examples" / "report-only-trial", target)
    shutil.copy(REPO / "config" / "examples" / "devices.yaml", tmp_path / "devices.yaml")
    policies = target / "policies.yaml"
    policies.write_text(policies.read_text().replace("listeners: [kiosk]", "listeners: [forwardAuth]"))
    [warning] = [str(w) for w in config_warnings(load_config(target))]
    assert "policy 'sharepoint-mfa-rollout': no forwardAuth listener is configured, so its rollout never includes " \
           "forwardAuth requests" in warning
