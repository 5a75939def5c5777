"""``portcullis import entra`` / ``export entra``: Graph conditionalAccessPolicy JSON (as Graph returns
it, in tests/data/entra/) into policies.yaml that loads, checks and answers What If as Entra would,
and back to Graph JSON equal to the supported subset of the input. The safety rule: a policy with
a field Portcullis cannot express is written reportOnly or not at all, never enforced."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.app.demo import ALEX_IPHONE
from gateway.config import load_config
from gateway.config.entra import (
    EXCHANGE_ONLINE,
    GRAPH_FIELDS,
    OFFICE_365,
    SHAREPOINT_ONLINE,
    Names,
    Outcome,
    export_policy,
    import_policy,
    names_for,
)
from gateway.config.models import ConditionalAccessPolicy, ResourcePreset
from gateway.config.presets import PRESETS
from tests.conftest import REPO
from tests.helpers.config import shipped_config

PORTCULLIS = str(Path(sys.executable).with_name("portcullis"))
DATA = Path(__file__).parent / "data" / "entra"
POLICIES = DATA / "policies.json"
LOCATIONS = DATA / "named-locations.json"
HEAD_OFFICE_ID = "5c8d2a3e-1f4b-4c6d-9e8f-0a1b2c3d4e5f"
EXCHANGE = list(PRESETS[ResourcePreset.exchange])
SHAREPOINT = list(PRESETS[ResourcePreset.sharepoint])
METADATA = ("id", "templateId", "createdDateTime", "modifiedDateTime")

# Graph id -> (state written, fields reported as left out); the register-security-info policy is skipped
EXPECTED = {
    "0b1f6a2c-3d4e-4f50-8a61-72b3c4d5e6f7": ("enabled", []),
    "1c2a7b3d-4e5f-4061-9b72-83c4d5e6f708": ("enabled", []),
    "2d3b8c4e-5f60-4172-8c83-94d5e6f70819": ("reportOnly", []),
    "3e4c9d5f-6071-4283-9d94-a5e6f708192a": ("disabled", []),
    "4f5d0e6a-7182-4394-8ea5-b6f708192a3b": ("reportOnly", ["conditions.users.excludeRoles"]),
    "6b7f2a8c-93a4-45b6-a0c7-d8192a3b4c5d": ("reportOnly", ["conditions.signInRiskLevels"]),
    "7c8a3b9d-a4b5-46c7-b1d8-e92a3b4c5d6e": ("reportOnly", [
        "conditions.locations.includeLocations", "conditions.users.includeGuestsOrExternalUsers",
        "grantControls.termsOfUse"]),
    "8d9b4cae-b5c6-47d8-82e9-fa3b4c5d6e7f": ("reportOnly", ["conditions.networkAccess",
                                                            "grantControls.builtInControls"]),
    "9f0c5dbf-c6d7-48e9-93fa-0b4c5d6e7f80": ("enabled", []),
}
SKIPPED = "5a6e1f7b-8293-44a5-9fb6-c708192a3b4c"


def portcullis(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PORTCULLIS, *map(str, args)], capture_output=True, text=True, timeout=60)


def graph_input() -> list[dict[str, Any]]:
    return list(json.loads(POLICIES.read_text())["value"])


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    """The shipped config with no policies and no cases (they test the shipped policies)."""
    directory = shipped_config(REPO / "config", tmp_path)
    (directory / "policies.yaml").write_text("policies: []\n")
    (directory / "cases.yaml").unlink()
    return directory


@pytest.fixture
def imported(config_dir: Path) -> Path:
    result = portcullis("import", "entra", POLICIES, "--config", config_dir, "--locations", LOCATIONS)
    assert result.returncode == 0, result.stderr
    return config_dir


def names(**overrides: list[str]) -> Names:
    config = load_config(REPO / "config")
    return names_for(config.resources, config.gateway_file.named_locations, overrides)


def whatif(config_dir: Path, *args: str) -> dict[str, Any]:
    result = portcullis("whatif", "--config", config_dir, "--json", *args)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_imported_policies_load_and_check_with_the_config(imported: Path) -> None:
    text = (imported / "policies.yaml").read_text()
    config = load_config(imported)
    by_name = {p.name: p for p in config.policies}
    assert len(by_name) == len(EXPECTED)
    for graph_id in EXPECTED:
        assert f"# From Entra policy {graph_id}:" in text
    assert SKIPPED not in text
    states = [p.state.value for p in config.policies]
    assert states == [state for state, _ in EXPECTED.values()]
    check = portcullis("check", "--config", imported)
    assert check.returncode == 0, check.stderr
    exchange = by_name["exchange-online-compliant-device-and-mfa-for-mail-apps"]
    assert list(exchange.conditions.resources.include) == EXCHANGE
    assert exchange.conditions.users.exclude_users == ["9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"]
    assert by_name["sharepoint-block-outside-the-head-office"].conditions.locations.exclude == ["head-office"]


def test_a_policy_with_an_unsupported_exclude_roles_is_written_report_only_and_says_why(imported: Path) -> None:
    text = (imported / "policies.yaml").read_text()
    header = text.split("# From Entra policy 4f5d0e6a-7182-4394-8ea5-b6f708192a3b")[1].split("- name:")[0]
    assert "Written reportOnly, never enforced" in header
    assert "conditions.users.excludeRoles: Portcullis matches users and groups, not Entra directory roles" in header
    policy = next(p for p in load_config(imported).policies if p.name == "all-apps-mfa-except-directory-admins")
    assert policy.state.value == "reportOnly"


def test_import_reports_every_field_left_out_and_every_skipped_policy(config_dir: Path) -> None:
    result = portcullis("import", "entra", POLICIES, "--config", config_dir, "--locations", LOCATIONS, "--dry-run")
    assert result.returncode == 0, result.stderr
    for graph_id, (_, fields) in EXPECTED.items():
        report = result.stderr.split(graph_id)[1].split("\nimported")[0].split("\nskipped")[0]
        assert [line.split(":")[0].strip() for line in report.splitlines()[1:]] == fields
    assert f"skipped 'Register security information from the office' ({SKIPPED}, enabled):\n" \
           "  conditions.applications.includeUserActions: user actions" in result.stderr
    assert (config_dir / "policies.yaml").read_text() == "policies: []\n"  # a dry run writes nothing
    assert result.stdout.startswith("policies:\n  # From Entra policy 0b1f6a2c")


def test_whatif_answers_imported_policies_as_entra_would(imported: Path) -> None:
    sharepoint = "https://docs.contoso.test/sites/finance/"
    outside = whatif(imported, "--user", "casey@contoso.test", "--group", "contractors", "--url", sharepoint,
                     "--ip", "198.51.100.7")
    assert (outside["result"], outside["errorCode"], outside["failedPolicy"]) == \
        ("block", 53003, "sharepoint-block-outside-the-head-office")
    inside = whatif(imported, "--user", "casey@contoso.test", "--group", "contractors", "--url", sharepoint,
                    "--ip", "10.20.3.4")
    assert inside["result"] == "allow"
    mail = ["--user", "alex@contoso.test", "--url", "https://mail.contoso.test/Microsoft-Server-ActiveSync",
            "--app", "outlook-mobile", "--device", ALEX_IPHONE]
    without_mfa = whatif(imported, *mail)
    assert (without_mfa["result"], without_mfa["failedPolicy"]) == \
        ("block", "exchange-online-compliant-device-and-mfa-for-mail-apps")
    with_mfa = whatif(imported, *mail, "--mfa")
    assert with_mfa["result"] == "allow"
    policies = {p["id"]: p for p in with_mfa["policies"]}
    assert policies["risky-sign-ins-mfa-for-mail"]["result"] == "reportOnlySuccess"
    assert policies["mobile-mail-compliant-phones-not-kiosks"]["result"] == "notEnabled"
    assert policies["all-apps-mfa-except-directory-admins"]["result"] == "reportOnlySuccess"
    without = {p["id"]: p for p in without_mfa["policies"]}
    assert without["all-apps-mfa-except-directory-admins"]["result"] == "reportOnlyFailure"  # MFA not enforced


def prune(value: Any) -> Any:
    """Graph's empty values (null, [], {}) say nothing; Portcullis does not write them back."""
    if isinstance(value, dict):
        pruned = {k: prune(v) for k, v in value.items() if "@odata." not in k}
        return {k: v for k, v in pruned.items() if v not in (None, [], {})}
    return value


def supported_subset(policy: dict[str, Any]) -> dict[str, Any]:
    """The input as export should give it back: no metadata, no unsupported field, report-only
    where something was left out; clientAppTypes default to all, operator to AND."""
    subset = copy.deepcopy(policy)
    for key in METADATA:
        subset.pop(key)
    state, left_out = EXPECTED[policy["id"]]
    for dotted in left_out:
        *parents, last = dotted.split(".")
        node = subset
        for part in parents:
            node = node[part]
        node.pop(last)
    subset["state"] = {"reportOnly": "enabledForReportingButNotEnforced"}.get(state, state)
    strength = (subset["grantControls"] or {}).get("authenticationStrength")
    if strength:
        subset["grantControls"]["authenticationStrength"] = {"id": strength["id"]}  # by id, as POST takes it
    if "grantControls.builtInControls" in left_out:
        subset["grantControls"]["builtInControls"] = ["compliantDevice"]  # domainJoinedDevice left out
    return dict(prune(subset))


def test_export_gives_back_the_supported_subset_of_the_input(imported: Path) -> None:
    result = portcullis("export", "entra", "--config", imported, "--locations", LOCATIONS)
    assert result.returncode == 0, result.stderr
    exported = json.loads(result.stdout)["value"]
    expected = [supported_subset(p) for p in graph_input() if p["id"] != SKIPPED]
    assert [prune(p) for p in exported] == expected


def test_exported_json_imports_again_to_the_same_policies(imported: Path, tmp_path: Path) -> None:
    exported = tmp_path / "exported.json"
    assert portcullis("export", "entra", "--config", imported, "--locations", LOCATIONS, "--out", exported) \
        .returncode == 0
    before = [p.model_dump(exclude={"name"}) for p in load_config(imported).policies]
    (imported / "policies.yaml").write_text("policies: []\n")
    result = portcullis("import", "entra", exported, "--config", imported, "--locations", LOCATIONS)
    assert result.returncode == 0, result.stderr
    assert [p.model_dump(exclude={"name"}) for p in load_config(imported).policies] == before


BASE: dict[str, Any] = {
    "id": "9e0f1a2b-3c4d-4e5f-8a6b-7c8d9e0f1a2b", "displayName": "Mail: compliant device", "state": "enabled",
    "conditions": {"users": {"includeUsers": ["All"]}, "applications": {"includeApplications": [EXCHANGE_ONLINE]},
                   "clientAppTypes": ["all"]},
    "grantControls": {"operator": "OR", "builtInControls": ["compliantDevice"]},
}

REPORT_ONLY_FIELDS = {
    "conditions.users.excludeRoles": ["62e90394-69f5-4237-9190-012177145e10"],
    "conditions.users.includeRoles": ["62e90394-69f5-4237-9190-012177145e10"],
    "conditions.users.excludeGuestsOrExternalUsers": {"guestOrExternalUserTypes": "internalGuest"},
    "conditions.users.excludeUsers": ["GuestsOrExternalUsers"],
    "conditions.applications.excludeApplications": ["c44b4083-3bb0-49c1-b47d-974e53cbdf3c"],  # Azure portal
    "conditions.applications.applicationFilter": {"mode": "exclude", "rule": "CustomSecurityAttribute.x -eq \"y\""},
    "conditions.locations": {"includeLocations": ["All"], "excludeLocations": ["11111111-2222-4333-8444-555555555555"]},
    "conditions.clientAppTypes": ["exchangeActiveSync", "easSupported"],
    "conditions.platforms": {"includePlatforms": ["all"], "excludePlatforms": ["windowsPhone"]},
    "conditions.devices": {"includeDeviceStates": ["All"], "excludeDeviceStates": ["Compliant"]},
    "conditions.signInRiskLevels": ["high"],
    "conditions.userRiskLevels": ["high"],
    "conditions.times": {"included": "weekdays"},
    "conditions.futureCondition": {"anything": True},
    "grantControls.builtInControls": ["compliantDevice", "passwordChange"],
    "grantControls.customAuthenticationFactors": ["duo"],
    "grantControls.termsOfUse": ["1a2b3c4d-0000-4000-8000-000000000001"],
    "grantControls.authenticationStrength": {"id": "a1b2c3d4-0000-4000-8000-00000000beef", "policyType": "custom",
                                             "displayName": "Contoso hardware keys"},
    "sessionControls": {"cloudAppSecurity": {"isEnabled": True, "cloudAppSecurityType": "monitorOnly"}},
    "sessionControls.applicationEnforcedRestrictions": {"isEnabled": True},
    "sessionControls.continuousAccessEvaluation": {"mode": "strictEnforcement"},
    "futureTopLevel": "something",
}

SKIP_FIELDS = {
    "conditions.applications.includeUserActions": ["urn:user:registerdevice"],
    "conditions.applications.includeAuthenticationContextClassReferences": ["c100"],  # Entra's are c1 to c99
    "conditions.clientApplications": {"includeServicePrincipals": ["All"]},
    "conditions.applications.includeApplications": ["c44b4083-3bb0-49c1-b47d-974e53cbdf3c"],  # nothing left
    "state": "enabledSomeday",
    "conditions.devices": {"deviceFilter": {"mode": "include", "rule": "device.model -like \"x\""}},
}


def with_field(dotted: str, value: Any) -> dict[str, Any]:
    policy = copy.deepcopy(BASE)
    *parents, last = dotted.split(".")
    node = policy
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return policy


def test_the_base_policy_of_the_safety_tests_is_enforced() -> None:
    result = import_policy(BASE, names())
    assert result.policy is not None and result.policy["state"] == "enabled" and not result.dropped


@pytest.mark.parametrize(("dotted", "value"), REPORT_ONLY_FIELDS.items(), ids=list(REPORT_ONLY_FIELDS))
def test_an_unsupported_field_makes_the_policy_report_only(dotted: str, value: Any) -> None:
    result = import_policy(with_field(dotted, value), names())
    assert result.policy is not None
    assert result.policy["state"] == "reportOnly"
    assert result.dropped and all(d.outcome is Outcome.report_only for d in result.dropped)
    assert any(d.field.startswith(dotted) or dotted.startswith(d.field) for d in result.dropped)


@pytest.mark.parametrize(("dotted", "value"), SKIP_FIELDS.items(), ids=list(SKIP_FIELDS))
def test_a_field_that_says_what_the_policy_is_about_skips_it(dotted: str, value: Any) -> None:
    result = import_policy(with_field(dotted, value), names())
    assert result.policy is None
    assert any(d.outcome is Outcome.skip for d in result.dropped)


def test_a_disabled_policy_with_an_unsupported_field_stays_disabled() -> None:
    policy = with_field("conditions.users.excludeRoles", ["62e90394-69f5-4237-9190-012177145e10"])
    policy["state"] = "disabled"
    result = import_policy(policy, names())
    assert result.policy is not None and result.policy["state"] == "disabled"


def test_office365_means_exchange_and_sharepoint_and_all_means_all() -> None:
    office = import_policy(with_field("conditions.applications.includeApplications", [OFFICE_365]), names())
    assert office.policy is not None and office.policy["conditions"]["resources"]["include"] == EXCHANGE + SHAREPOINT
    every = import_policy(with_field("conditions.applications.includeApplications", ["All"]), names())
    assert every.policy is not None and every.policy["conditions"]["resources"]["include"] == ["All"]


def test_map_names_an_app_s_resources_or_says_it_is_not_behind_the_gateway() -> None:
    azure_portal = "c44b4083-3bb0-49c1-b47d-974e53cbdf3c"
    narrowed = import_policy(BASE, names(**{EXCHANGE_ONLINE: ["exchange-owa"]}))
    assert narrowed.policy is not None and narrowed.policy["conditions"]["resources"]["include"] == ["exchange-owa"]
    excluded = with_field("conditions.applications.excludeApplications", [azure_portal])
    exact = import_policy(excluded, names(**{azure_portal: []}))
    assert exact.policy is not None and exact.policy["state"] == "enabled" and not exact.dropped
    with pytest.raises(ValueError, match="no-such-resource"):
        names(**{azure_portal: ["no-such-resource"]})


def test_approved_application_needs_the_config_s_approved_apps() -> None:
    policy = with_field("grantControls.builtInControls", ["approvedApplication"])
    unnamed = import_policy(policy, names())
    assert unnamed.policy is None  # no control left: nothing valid to write
    assert "approvedApplication" in unnamed.dropped[0].reason
    config = load_config(REPO / "config")
    given = names_for(config.resources, config.gateway_file.named_locations, {}, (), ["outlook-mobile"],
                      config.gateway_file.applications)
    named = import_policy(policy, given)
    assert named.policy is not None and named.policy["state"] == "enabled"
    assert named.policy["grantControls"]["approvedApplications"] == ["outlook-mobile"]


def test_exporting_the_shipped_policies_reports_what_graph_cannot_say() -> None:
    config = load_config(REPO / "config")
    exported = {p.name: export_policy(p, names()) for p in config.policies}
    outlook = exported["exchange-outlook-only"]
    assert outlook.policy is not None and outlook.policy["state"] == "enabledForReportingButNotEnforced"
    assert {d.field for d in outlook.dropped} == {"conditions.resources.include", "grantControls.approvedApplications",
                                                  "grantControls.maxDeviceThreatLevel"}
    # four of Exchange's six resources: Entra can only target the whole app (wider: stricter), so report-only
    assert outlook.policy["conditions"]["applications"]["includeApplications"] == [EXCHANGE_ONLINE]
    kiosk = exported["kiosks-read-only-browser"]
    assert kiosk.policy is not None and kiosk.policy["state"] == "enabledForReportingButNotEnforced"
    assert "conditions.locations.include" in {d.field for d in kiosk.dropped}
    sharepoint = exported["sharepoint-compliant-device"]
    assert sharepoint.policy is not None
    assert sharepoint.policy["conditions"]["applications"]["includeApplications"] == [SHAREPOINT_ONLINE]


@pytest.mark.parametrize(("content", "message"), [
    ('{"value": [\n  {"displayName": "x",\n   "state": enabled}\n]}', ":3:13: the file is not JSON"),
    ('{"value": [], "value": []}', "names a member twice"),
    ('{"policies": []}', ":1:1: expected Graph conditionalAccessPolicy JSON"),
    ('"a string"', ":1:1: expected Graph conditionalAccessPolicy JSON"),
    ('{"value": [1]}', ":1:1: policy 0 is a int, not an object"),
    ("[" * 40 + "]" * 40, "nested deeper than 16 levels"),
])
def test_bad_graph_json_is_an_error_at_its_place(config_dir: Path, tmp_path: Path, content: str,
                                                  message: str) -> None:
    source = tmp_path / "policies.json"
    source.write_text(content)
    result = portcullis("import", "entra", source, "--config", config_dir)
    assert result.returncode == 1
    assert f"portcullis: {source}" in result.stderr and message in result.stderr
    assert (config_dir / "policies.yaml").read_text() == "policies: []\n"


def test_import_keeps_the_policies_already_in_the_file(tmp_path: Path) -> None:
    directory = shipped_config(REPO / "config", tmp_path)
    before = (directory / "policies.yaml").read_text()
    result = portcullis("import", "entra", POLICIES, "--config", directory, "--locations", LOCATIONS)
    assert result.returncode == 0, result.stderr
    after = (directory / "policies.yaml").read_text()
    assert after.startswith(before.rstrip("\n"))  # comments and policies kept as written
    assert len(load_config(directory).policies) == 6 + len(EXPECTED)


WRONG_TYPES = [1, "text", True, [1], [{"a": 1}], {"a": [1]}, ["All", 2]]


@pytest.mark.parametrize("dotted", [f for f in GRAPH_FIELDS if f not in ("id", "displayName")])
def test_a_field_of_the_wrong_type_is_reported_never_a_crash_nor_enforced(dotted: str) -> None:
    for value in WRONG_TYPES:
        result = import_policy(with_field(dotted, value), names())
        if result.policy is not None and result.policy["state"] == "enabled":
            # written as Entra has it only when the value, whatever its type, was exact
            assert not result.dropped, (dotted, value)


def test_a_line_break_in_graph_text_cannot_write_yaml_through_a_comment(config_dir: Path, tmp_path: Path) -> None:
    policy = with_field("conditions.users.excludeRoles", ["r"])
    injected = "x\n  - name: injected\n    state: enabled\r\u2028\x85y"
    policy["displayName"] = f"Mail {injected}"
    policy["conditions"][injected] = ["z"]
    source = tmp_path / "policies.json"
    source.write_text(json.dumps([policy]))
    result = portcullis("import", "entra", source, "--config", config_dir)
    assert result.returncode == 0, result.stderr
    policies = load_config(config_dir).policies
    assert [(p.name, p.state.value) for p in policies] == [("mail-x-name-injected-state-enabled-y", "reportOnly")]
    assert policies[0].display_name == f"Mail {injected}"
    assert "\x85" not in result.stderr and "\r" not in result.stderr


def test_map_and_approved_apps_on_the_command_line(config_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "policies.json"
    controls = ["compliantDevice", "approvedApplication"]
    source.write_text(json.dumps(with_field("grantControls.builtInControls", controls)))
    result = portcullis("import", "entra", source, "--config", config_dir, "--map", f"{EXCHANGE_ONLINE}=exchange-owa",
                        "--approved-apps", "outlook-mobile,outlook-desktop")
    assert result.returncode == 0, result.stderr
    (policy,) = load_config(config_dir).policies
    assert (policy.state.value, policy.conditions.resources.include) == ("enabled", ["exchange-owa"])
    assert policy.grant_controls is not None
    assert policy.grant_controls.approved_applications == ["outlook-mobile", "outlook-desktop"]
    unknown = portcullis("import", "entra", source, "--config", config_dir, "--map", f"{EXCHANGE_ONLINE}=exchange-x")
    assert unknown.returncode == 1 and "exchange-x is neither a resource nor one named location" in unknown.stderr
    no_app = portcullis("import", "entra", source, "--config", config_dir, "--approved-apps", "outlook")
    assert no_app.returncode == 1 and "'outlook' is not an application of the config" in no_app.stderr


PHISHING_RESISTANT = {"id": "00000000-0000-0000-0000-000000000004", "displayName": "Phishing-resistant MFA",
                      "policyType": "builtIn", "allowedCombinations": ["windowsHelloForBusiness", "fido2"]}


def test_authentication_contexts_and_strengths_map_both_ways() -> None:
    policy = with_field("conditions.applications", {"includeApplications": [],
                                                    "includeAuthenticationContextClassReferences": ["c1"]})
    policy["grantControls"] = {"operator": "OR", "builtInControls": [], "authenticationStrength": PHISHING_RESISTANT}
    result = import_policy(policy, names())
    assert result.policy is not None and not result.dropped
    assert (result.policy["state"], result.policy["conditions"]["authenticationContexts"],
            result.policy["grantControls"]["authenticationStrength"]) == ("enabled", ["c1"], "phishingResistantMfa")
    exported = export_policy(ConditionalAccessPolicy.model_validate_json(json.dumps(result.policy), strict=True),
                             names())
    assert exported.policy is not None and not exported.dropped
    assert exported.policy["conditions"]["applications"] == {"includeAuthenticationContextClassReferences": ["c1"]}
    assert exported.policy["grantControls"] == {"operator": "OR",
                                                "authenticationStrength": {"id": PHISHING_RESISTANT["id"]}}


def test_a_custom_strength_maps_by_display_name_or_map_and_exports_only_with_its_id() -> None:
    config = load_config(REPO / "config")
    custom = {"id": "a1b2c3d4-0000-4000-8000-00000000beef", "displayName": "Contoso hardware keys",
              "policyType": "custom"}
    policy = with_field("grantControls.authenticationStrength", custom)
    by_name = names_for(config.resources, config.gateway_file.named_locations, {},
                        strengths=["contoso-hardware-keys"])
    imported = import_policy(policy, by_name)
    assert imported.policy is not None and imported.policy["state"] == "enabled"
    assert imported.policy["grantControls"]["authenticationStrength"] == "contoso-hardware-keys"
    model = ConditionalAccessPolicy.model_validate_json(json.dumps(imported.policy), strict=True)
    without_id = export_policy(model, by_name)
    assert without_id.policy is not None and without_id.policy["state"] == "enabledForReportingButNotEnforced"
    mapped = names_for(config.resources, config.gateway_file.named_locations, {custom["id"]: ["hardware"]},
                       strengths=["hardware"])
    renamed = import_policy(policy, mapped)
    assert renamed.policy is not None and renamed.policy["grantControls"]["authenticationStrength"] == "hardware"
    model = ConditionalAccessPolicy.model_validate_json(json.dumps(renamed.policy), strict=True)
    with_id = export_policy(model, mapped)
    assert with_id.policy is not None and with_id.policy["state"] == "enabled"
    assert with_id.policy["grantControls"]["authenticationStrength"] == {"id": custom["id"]}
