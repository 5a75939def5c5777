"""The pure policy engine, table-driven: each case names the situation and the outcome."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from gateway.config.compile import compile_policy_set
from gateway.config.models import ConditionalAccessPolicy, Resource
from gateway.policy.conditions import path_has_prefix
from gateway.policy.evaluate import evaluate
from gateway.policy.model import (
    AccessRequest,
    ClientApp,
    DecisionResult,
    DeviceSignals,
    Identity,
    PolicyResultKind,
)
from tests.helpers.policy import (
    COMPLIANT,
    NO_DEVICE_ID,
    NOW,
    OUTLOOK,
    OUTLOOK_ONLY,
    TEAMS,
    UNKNOWN_DEVICE,
    decide,
    device,
    policy,
)


@pytest.mark.parametrize(
    ("policies", "dev", "app", "status", "code", "reason"),
    [
        pytest.param([policy(**OUTLOOK_ONLY)], device(), OUTLOOK, 200, None, "allowed",
                     id="compliant low-risk device + approved app -> allow"),
        pytest.param([policy(**OUTLOOK_ONLY)], device(), TEAMS, 403, 53002, "app not approved",
                     id="unapproved app -> 53002"),
        pytest.param([policy(**OUTLOOK_ONLY)], device("noncompliant"), OUTLOOK, 403, 53000,
                     "device not compliant (complianceState: noncompliant)", id="noncompliant -> 53000"),
        pytest.param([policy(**OUTLOOK_ONLY)], device("inGracePeriod", grace_end=NOW + timedelta(days=1)),
                     OUTLOOK, 200, None, "allowed", id="in grace period -> allow"),
        pytest.param([policy(**OUTLOOK_ONLY)], device("inGracePeriod", grace_end=NOW - timedelta(seconds=1)),
                     OUTLOOK, 403, 53000, "device not compliant (grace period ended)", id="grace ended -> 53000"),
        pytest.param([policy(**OUTLOOK_ONLY)], device("unknown"), OUTLOOK, 403, 53000,
                     "device not compliant (complianceState: unknown)", id="compliance unknown -> 53000"),
        pytest.param([policy(**OUTLOOK_ONLY)], UNKNOWN_DEVICE, OUTLOOK, 403, 53000,
                     "device not registered (unknown to the device inventory)", id="unregistered device -> 53000"),
        pytest.param([policy(**OUTLOOK_ONLY)], NO_DEVICE_ID, OUTLOOK, 403, 53000,
                     "device not identified (the token has no deviceid claim)", id="no deviceid claim -> 53000"),
        pytest.param([policy(**OUTLOOK_ONLY)], device(threat="high"), OUTLOOK, 403, 53004,
                     "device risk high, allowed: low", id="threat high over low -> 53004"),
        pytest.param([policy(**OUTLOOK_ONLY)], device(threat=None), OUTLOOK, 403, 53004,
                     "device risk unknown, allowed: low", id="threat level unknown -> 53004 (fail closed)"),
        pytest.param([policy(**OUTLOOK_ONLY)], device(threat="secured"), OUTLOOK, 200, None, "allowed",
                     id="secured is under low -> allow"),
        pytest.param([policy(builtInControls=["compliantDevice", "approvedApplication"], operator="OR",
                             approvedApplications=["outlook-mobile"])], device("noncompliant"), OUTLOOK,
                     200, None, "allowed", id="OR: approved app alone is enough"),
        pytest.param([policy(builtInControls=["compliantDevice", "approvedApplication"], operator="OR",
                             approvedApplications=["outlook-mobile"])], device("noncompliant"), TEAMS,
                     403, 53000, "device not compliant (complianceState: noncompliant)",
                     id="OR: neither control holds -> first failure"),
        pytest.param([policy("a", **OUTLOOK_ONLY), policy("b", builtInControls=["block"])], device(), OUTLOOK,
                     403, 53003, "blocked by policy", id="block wins over a satisfied policy"),
        pytest.param([policy("a", builtInControls=["compliantDevice"]), policy("b", builtInControls=["block"])],
                     device("noncompliant"), OUTLOOK, 403, 53003, "blocked by policy",
                     id="block wins over another failure"),
        pytest.param([policy(builtInControls=["block"], state="reportOnly")], device(), OUTLOOK, 200, None,
                     "allowed", id="report-only block never blocks"),
        pytest.param([policy(builtInControls=["block"], state="disabled")], device(), OUTLOOK, 200, None,
                     "allowed", id="disabled policy is not enforced"),
        pytest.param([policy(builtInControls=["block"], include=["All"], exclude=["exchange-activesync"])],
                     device(), OUTLOOK, 200, None, "allowed", id="exclude beats include"),
        pytest.param([policy(builtInControls=["block"], include=["exchange-owa"])], device(), OUTLOOK, 200,
                     None, "allowed", id="policy for another resource does not apply"),
        pytest.param([], device("noncompliant"), TEAMS, 200, None, "allowed",
                     id="no applicable policy -> allowed (notApplied)"),
    ],
)
def test_policy_decision(policies: list[ConditionalAccessPolicy], dev: DeviceSignals, app: ClientApp,
                         status: int, code: int | None, reason: str) -> None:
    decision = decide(policies, dev, app)
    assert (decision.status_code, decision.error_code, decision.reason) == (status, code, reason)


def test_path_no_resource_names_is_denied_with_53003() -> None:
    decision = decide([], path="/ecp/")
    assert (decision.result, decision.error_code) == (DecisionResult.block, 53003)
    assert decision.reason == "path is not part of any protected resource"


def test_every_policy_result_is_explained() -> None:
    decision = decide([
        policy("outlook", **OUTLOOK_ONLY),
        policy("owa", include=["exchange-owa"], builtInControls=["compliantDevice"]),
        policy("audit", state="reportOnly", builtInControls=["compliantDevice"]),
        policy("old", state="disabled", builtInControls=["block"]),
    ], device("noncompliant"), TEAMS)
    results = {r.name: r for r in decision.all_policies()}
    assert results["outlook"].result is PolicyResultKind.failure
    assert [f.control for f in results["outlook"].failures] == ["compliantDevice", "approvedApplication"]
    assert results["owa"].result is PolicyResultKind.not_applied
    assert results["owa"].not_applied_because == "resource 'exchange-activesync' is not included"
    assert results["audit"].result is PolicyResultKind.report_only_failure
    assert results["old"].result is PolicyResultKind.not_enabled
    assert decision.failed_policy == "outlook"


@pytest.mark.parametrize(
    ("path", "prefix", "matches"),
    [
        ("/owa", "/owa/", True), ("/owa/", "/owa/", True), ("/owa/x/y", "/owa/", True),
        ("/owax", "/owa/", False), ("/OWA/inbox", "/owa/", True), ("/ow", "/owa/", False),
        ("/Microsoft-Server-ActiveSyncX", "/Microsoft-Server-ActiveSync", False),
    ],
)
def test_path_prefix_matches_whole_segments_case_insensitively(path: str, prefix: str, matches: bool) -> None:
    assert path_has_prefix(path, prefix) is matches


def most_specific(resources: dict[str, Resource], host: str, path: str) -> str | None:
    """The resource the gateway names a request after (``PolicySet.match``): the most specific."""
    found = compile_policy_set(resources, (), {}).match(host, path)
    return found.primary if found else None


def test_longest_resource_prefix_wins() -> None:
    resources = {
        "sites": Resource.model_validate_json('{"hosts": ["h"], "paths": ["/sites/"]}'),
        "finance": Resource.model_validate_json('{"hosts": ["h"], "paths": ["/sites/finance/"]}'),
        "downloads": Resource.model_validate_json('{"hosts": ["h"], "paths": ["/sites/*/_layouts/15/download.aspx"]}'),
    }
    assert most_specific(resources, "h", "/sites/finance/q3.xlsx") == "finance"
    assert most_specific(resources, "h", "/sites/hr/") == "sites"
    assert most_specific(resources, "h", "/sites/hr/_layouts/15/download.aspx") == "downloads"
    assert most_specific(resources, "h", "/sites/finance/_layouts/15/download.aspx") == "downloads"
    assert most_specific(resources, "h", "/sites/a/b/_layouts/15/download.aspx") == "sites"
    assert most_specific(resources, "other", "/sites/hr/") is None
    assert most_specific(resources, "h", "/SITES/HR/") == "sites"


def test_whole_host_resource_catches_what_nothing_more_specific_names() -> None:
    resources = {
        "everything": Resource.model_validate_json('{"hosts": ["h"], "paths": ["/"]}'),
        "owa": Resource.model_validate_json('{"hosts": ["h"], "paths": ["/owa/"]}'),
    }
    assert most_specific(resources, "h", "/owa/inbox") == "owa"
    assert most_specific(resources, "h", "/ecp/") == "everything"
    assert most_specific(resources, "h", "/") == "everything"


MFA = {"builtInControls": ["mfa"]}
BROWSER_SESSION = ClientApp(client_id=None, name=None)
ANDROID_PHONE = device(operating_system="Android")


@pytest.mark.parametrize(
    ("case", "policies", "kwargs", "status", "reason"),
    [
        ("user in an included group -> applies", [policy(conditions={"users": {
            "includeGroups": ["finance"]}}, **MFA)], {"groups": frozenset({"finance"})},
         403, "multifactor authentication required"),
        ("naming only groups includes only them", [policy(conditions={"users": {
            "includeGroups": ["finance"]}}, **MFA)], {}, 200, "allowed"),
        ("no users key covers All", [policy(**MFA)], {}, 403, "multifactor authentication required"),
        ("includeUsers None covers nobody", [policy(conditions={"users": {"includeUsers": ["None"]}}, **MFA)],
         {}, 200, "allowed"),
        ("excluded user beats All", [policy(conditions={"users": {"excludeUsers": ["ALEX@contoso.test"]}}, **MFA)],
         {}, 200, "allowed"),
        ("excluded group beats an included user", [policy(conditions={"users": {
            "includeUsers": ["alex@contoso.test"], "excludeGroups": ["break-glass"]}}, **MFA)],
         {"groups": frozenset({"break-glass"})}, 200, "allowed"),
        ("mfa in amr satisfies mfa", [policy(**MFA)], {"amr": frozenset({"pwd", "mfa"})}, 200, "allowed"),
        ("client app type not included -> notApplied", [policy(conditions={"clientAppTypes": ["browser"]},
                                                               builtInControls=["block"])], {}, 200, "allowed"),
        ("browser recognised from Accept and User-Agent", [policy(conditions={"clientAppTypes": ["browser"]},
                                                                  builtInControls=["block"])],
         {"path": "/owa/", "accepts_html": True, "user_agent": "Mozilla/5.0 (iPhone)", "app": BROWSER_SESSION},
         403, "blocked by policy"),
        ("browser headers never outrank a configured app's client id",
         [policy(conditions={"clientAppTypes": ["mobileAppsAndDesktopClients"]}, builtInControls=["block"])],
         {"path": "/owa/", "accepts_html": True, "user_agent": "Mozilla/5.0 (iPhone)"}, 403, "blocked by policy"),
        ("ActiveSync URL is exchangeActiveSync", [policy(conditions={"clientAppTypes": ["exchangeActiveSync"]},
                                                         builtInControls=["block"])], {}, 403, "blocked by policy"),
        ("platform from the inventory", [policy(conditions={"platforms": {"include": ["android"]}},
                                                builtInControls=["block"])],
         {"dev": ANDROID_PHONE}, 403, "blocked by policy"),
        ("platform excluded", [policy(conditions={"platforms": {"include": ["all"], "exclude": ["iOS"]}},
                                      builtInControls=["block"])], {}, 200, "allowed"),
        ("platform from the User-Agent for an unregistered device",
         [policy(conditions={"platforms": {"include": ["android"]}}, builtInControls=["block"])],
         {"dev": UNKNOWN_DEVICE, "user_agent": "Android-Mail/7.1"}, 403, "blocked by policy"),
        ("unknown platform is outside a specific include",
         [policy(conditions={"platforms": {"include": ["android"]}}, builtInControls=["block"])],
         {"dev": UNKNOWN_DEVICE, "user_agent": "curl/8"}, 200, "allowed"),
        ("trusted location excluded -> notApplied inside it",
         [policy(conditions={"locations": {"include": ["All"], "exclude": ["AllTrusted"]}}, **MFA)],
         {"ip": "10.1.2.3"}, 200, "allowed"),
        ("trusted location excluded -> applies outside it",
         [policy(conditions={"locations": {"include": ["All"], "exclude": ["AllTrusted"]}}, **MFA)],
         {"ip": "192.0.2.7"}, 403, "multifactor authentication required"),
        ("named untrusted location included",
         [policy(conditions={"locations": {"include": ["guest-wifi"]}}, builtInControls=["block"])],
         {"ip": "192.0.2.7"}, 403, "blocked by policy"),
        ("device filter include: matching device",
         [policy(conditions={"deviceFilter": {"mode": "include", "rule": 'device.extensionAttribute1 -eq "Shared"'}},
                 builtInControls=["block"])],
         {"dev": device(extension_attributes=(("extensionAttribute1", "Shared"),))}, 403, "blocked by policy"),
        ("device filter include: unregistered device never matches",
         [policy(conditions={"deviceFilter": {"mode": "include", "rule": 'device.extensionAttribute1 -eq "Shared"'}},
                 builtInControls=["block"])], {"dev": UNKNOWN_DEVICE}, 200, "allowed"),
        ("device filter exclude: company devices spared",
         [policy(conditions={"deviceFilter": {"mode": "exclude", "rule": 'device.deviceOwnership -eq "Company"'}},
                 builtInControls=["block"])], {"dev": device(device_ownership="Company")}, 200, "allowed"),
        ("device filter exclude: unregistered device is not spared",
         [policy(conditions={"deviceFilter": {"mode": "exclude", "rule": 'device.deviceOwnership -eq "Company"'}},
                 builtInControls=["block"])], {"dev": UNKNOWN_DEVICE}, 403, "blocked by policy"),
        ("mfa is asked before compliance (Entra's order)",
         [policy(builtInControls=["mfa", "compliantDevice"])], {"dev": device("noncompliant")}, 403,
         "multifactor authentication required"),
    ],
)
def test_assignment_conditions(case: str, policies: list[ConditionalAccessPolicy], kwargs: dict[str, Any],
                               status: int, reason: str) -> None:
    kwargs = dict(kwargs)
    dev = kwargs.pop("dev", COMPLIANT)
    decision = decide(policies, dev, kwargs.pop("app", OUTLOOK), **kwargs)
    assert (decision.status_code, decision.reason) == (status, reason), case


def test_first_unmatched_condition_is_reported_in_order() -> None:
    decision = decide([
        policy("users", conditions={"users": {"includeUsers": ["someone@else"]}}, **MFA),
        policy("apps", conditions={"clientAppTypes": ["browser"]}, **MFA),
        policy("places", conditions={"locations": {"include": ["guest-wifi"]}}, **MFA),
        policy("filter", conditions={"deviceFilter": {"mode": "include", "rule": 'device.model -eq "x"'}}, **MFA),
    ])
    because = {r.name: r.not_applied_because for r in decision.all_policies()}
    assert because == {
        "users": "user is not included",
        "apps": "client app type 'exchangeActiveSync' is not included",
        "places": "location of 203.0.113.9 is not included",
        "filter": "device does not match the device filter (mode include)",
    }


def test_session_controls_of_applied_policies_merge_strictest() -> None:
    decision = decide([
        policy("a", session={"blockDownloads": True, "signInFrequency": {"value": 8, "type": "hours"}}),
        policy("b", session={"signInFrequency": {"value": 1, "type": "hours"}, "persistentBrowser": "never"}),
        policy("c", include=["exchange-owa"], session={"signInFrequency": {"everyTime": True}}),
    ])
    assert decision.allowed
    controls = decision.session_controls
    assert (controls.block_downloads, controls.sign_in_frequency_seconds, controls.persistent_browser) == \
        (True, 3600, "never")
    assert {r.name: r.enforced_session_controls for r in decision.policies}["a"] == \
        ("blockDownloads", "signInFrequency")


def test_report_only_results_are_reported_not_enforced() -> None:
    decision = decide([
        policy("would-block", state="reportOnly", builtInControls=["block"]),
        policy("would-pass", state="reportOnly", builtInControls=["compliantDevice"]),
        policy("elsewhere", state="reportOnly", include=["exchange-owa"], builtInControls=["block"]),
    ])
    assert decision.allowed
    assert {r.name: r.result for r in decision.all_policies()} == {
        "would-block": PolicyResultKind.report_only_failure,
        "would-pass": PolicyResultKind.report_only_success,
        "elsewhere": PolicyResultKind.report_only_not_applied,
    }


def test_only_policies_that_can_target_the_resource_are_evaluated() -> None:
    policies = [policy(f"owa-{i}", include=["exchange-owa"], builtInControls=["block"]) for i in range(50)]
    decision = decide([*policies, policy("eas", **OUTLOOK_ONLY)])
    assert [r.name for r in decision.policies] == ["eas"]
    assert len(decision.not_targeted) == 50
    assert decision.not_targeted[0].not_applied_because == "resource 'exchange-activesync' is not included"


NESTED = {
    "finance-sites": Resource.model_validate_json('{"hosts": ["h"], "paths": ["/sites/finance/"]}'),
    "sharepoint-api": Resource.model_validate_json('{"hosts": ["h"], "paths": ["/_api/", "/sites/*/_api/"]}'),
    "sites": Resource.model_validate_json('{"hosts": ["h"], "paths": ["/sites/"]}'),
    "sign-in": Resource.model_validate_json('{"hosts": ["h"], "paths": ["/sites/finance/login/"], "public": true}'),
}


@pytest.mark.parametrize(
    ("path", "names", "public"),
    [
        ("/sites/finance/_api/web", ("finance-sites", "sharepoint-api", "sites"), False),
        ("/sites/fin/_api/web", ("sharepoint-api", "sites"), False),
        ("/sites/finance/q3.xlsx", ("finance-sites", "sites"), False),
        ("/sites/finance/login/page", ("sign-in",), True),
        ("/sites/finance/loginx", ("finance-sites", "sites"), False),
    ],
)
def test_a_request_belongs_to_every_matching_resource(path: str, names: tuple[str, ...], public: bool) -> None:
    found = compile_policy_set(NESTED, (), {}).match("h", path)
    assert found is not None and (found.names, found.public) == (names, public)


def test_policies_of_every_matching_resource_apply() -> None:
    """A finance-only policy is not skipped because the path is also a (longer) API path."""
    policies = (policy("finance-mfa", include=["finance-sites"], **MFA),
                policy("api-compliant", include=["sharepoint-api"], builtInControls=["compliantDevice"]),
                policy("all-but-sites", include=["All"], exclude=["sites"], builtInControls=["block"]))
    policy_set = compile_policy_set(NESTED, policies, {})
    found = policy_set.match("h", "/sites/finance/_api/web")
    assert found is not None
    request = AccessRequest(correlation_id="c", host="h", path="/sites/finance/_api/web", method="GET",
                            client_ip="203.0.113.1", user_agent="x", accepts_html=False)
    identity = Identity(subject="s", user_principal_name="u", object_id=None, tenant_id=None, client_id=None,
                        device_id="d1", groups=frozenset(), audience="a", expires_at=0)
    decision = evaluate(request=request, identity=identity, device=device("noncompliant"), app=BROWSER_SESSION,
                        resources=found.names, policy_set=policy_set, now=NOW)
    results = {r.name: r.result for r in decision.all_policies()}
    assert results == {"finance-mfa": PolicyResultKind.failure, "api-compliant": PolicyResultKind.failure,
                       "all-but-sites": PolicyResultKind.failure}
    assert decision.failed_policy_id == "all-but-sites"  # excluding 'sites' does not exclude the API


def test_public_carve_out_loses_a_tie_with_a_protected_resource() -> None:
    resources = {
        "open": Resource.model_validate_json('{"hosts": ["h"], "paths": ["/a/b/"], "public": true}'),
        "closed": Resource.model_validate_json('{"hosts": ["h"], "paths": ["/a/*/"]}'),
        "closed-too": Resource.model_validate_json('{"hosts": ["h"], "paths": ["/a/c/"]}'),
    }
    policy_set = compile_policy_set(resources, (), {})
    assert policy_set.match("h", "/a/b/x") == policy_set.match("h", "/a/b/x")
    found = policy_set.match("h", "/a/b/x")
    assert found is not None and found.public and found.names == ("open",)


@pytest.mark.parametrize(
    ("user_agent", "platform"),
    [("Outlook-iOS-Android/1.0", None), ("Mozilla/5.0 (Linux; Android 14; Pixel 9)", "android"),
     ("Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X)", "iOS"), ("KioskBrowser/2.0", None),
     ("Mozilla/5.0 (Windows NT 10.0; Win64; x64)", "windows"), ("Mozilla/5.0 (X11; Linux x86_64)", "linux"),
     ("Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5)", "macOS")],
)
def test_platform_from_user_agent_uses_whole_words(user_agent: str, platform: str | None) -> None:
    from gateway.policy.conditions import device_platform

    found = device_platform(None, user_agent)
    assert (found.value if found else None) == platform


def test_group_names_compare_case_insensitively() -> None:
    decision = decide([policy(conditions={"users": {"includeGroups": ["AB12CD34-0000-4000-8000-0000000000AA"]}},
                              **MFA)], groups=frozenset({"ab12cd34-0000-4000-8000-0000000000aa"}))
    assert decision.reason == "multifactor authentication required"


@pytest.mark.parametrize(
    ("users", "applies"),
    [({"excludeGroups": ["break-glass"]}, True), ({"excludeUsers": ["All"]}, False),
     ({"includeUsers": ["All"], "excludeUsers": ["all"]}, False)],
)
def test_users_assignment_edges(users: dict[str, list[str]], applies: bool) -> None:
    decision = decide([policy(conditions={"users": users}, builtInControls=["block"])])
    assert (decision.status_code == 403) is applies


def test_the_failure_shown_follows_entras_order_across_policies() -> None:
    decision = decide([policy("risk", maxDeviceThreatLevel="secured"), policy("admins", **MFA)])
    assert (decision.error_code, decision.failed_policy_id) == (50076, "admins")
