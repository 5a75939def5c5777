"""Config loading: every problem is reported with file:line:column, the key, and what is allowed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.config.lint import config_warnings
from tests.conftest import REPO
from tests.helpers.config import DEMO_RETIRED_GRANT, problems, shipped_config, unexpected_warnings

PORTCULLIS = str(Path(sys.executable).with_name("portcullis"))


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    target = tmp_path / "config"
    shutil.copytree(REPO / "config", target)
    return target


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path.name}"
    path.write_text(text.replace(old, new, 1))


def line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), start=1) if needle in line)


def test_shipped_demo_config_is_valid() -> None:
    config = load_config(REPO / "config")
    assert [p.name for p in config.policies] == ["exchange-outlook-only", "owa-compliant-device",
                                                  "sharepoint-compliant-device", "mfa-outside-head-office",
                                                  "kiosk-accounts-view-only", "kiosks-read-only-browser"]


def test_misspelt_state_names_file_line_key_and_suggests(config_dir: Path) -> None:
    policies = config_dir / "policies.yaml"
    edit(policies, "state: enabled", "state: enabld")
    line = line_of(policies, "enabld")
    assert problems(config_dir) == [
        f"{policies}:{line}:12: policies[0].state: 'enabld' is not allowed; did you mean 'enabled'? "
        "(allowed: enabled, disabled, reportOnly)"
    ]


def test_unknown_key_is_an_error_listing_allowed_keys(config_dir: Path) -> None:
    policies = config_dir / "policies.yaml"
    edit(policies, "operator: AND", "operatr: AND")
    [problem] = problems(config_dir)
    assert problem.startswith(f"{policies}:{line_of(policies, 'operatr')}:7: policies[0].grantControls.operatr:")
    assert "unknown key 'operatr'; did you mean 'operator'?" in problem
    assert "(allowed: approvedApplications, authenticationStrength, builtInControls, maxDeviceThreatLevel, " \
           "operator)" in problem


def test_every_problem_of_every_file_is_reported_at_once(config_dir: Path) -> None:
    edit(config_dir / "policies.yaml", "maxDeviceThreatLevel: low", "maxDeviceThreatLevel: severe")
    edit(config_dir / "portcullis.yaml", "port: 8443", 'port: "8443"')
    edit(config_dir / "portcullis.yaml", "algorithms: [RS256]", "algorithms: [HS256]")
    found = problems(config_dir)
    assert len(found) == 3
    assert any("gateway.listen.port: Input should be a valid integer, got '8443'" in p for p in found)
    assert any("identity.algorithms: 'HS256' is never accepted" in p for p in found)
    assert any("maxDeviceThreatLevel: 'severe' is not allowed; did you mean 'secured'? "
               "(allowed: secured, low, medium, high)" in p
               for p in found)


def test_missing_required_key_is_named(config_dir: Path) -> None:
    edit(config_dir / "portcullis.yaml", "    upstream: http://127.0.0.1:9401", "    # no upstream")
    [problem] = problems(config_dir)
    assert "protectedHosts.mail.contoso.test: required key 'upstream' is missing" in problem


def test_identity_without_an_issuer_says_which_keys_to_give(config_dir: Path) -> None:
    edit(config_dir / "portcullis.yaml", "  issuer: http://127.0.0.1:9400/contoso", "  # no issuer")
    [problem] = problems(config_dir)
    assert "portcullis.yaml:16:3: identity: give either 'issuer' (one issuer) or 'issuers' (a list)" in problem


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        pytest.param("include: [exchange-owa, exchange-owa-attachments]", "include: [exchange-ow]",
                     "policies[1].conditions.resources.include[0]: 'exchange-ow' is not a resource",
                     id="unknown resource"),
        pytest.param("approvedApplications: [outlook-mobile, outlook-desktop]",
                     "approvedApplications: [outlook-mobile, outlok]",
                     "policies[0].grantControls.approvedApplications[1]: 'outlok' is not an application",
                     id="unknown application"),
        pytest.param("name: owa-compliant-device", "name: exchange-outlook-only",
                     "policies[1].name: 'exchange-outlook-only' is used by more than one policy",
                     id="duplicate policy name"),
        pytest.param("builtInControls: [compliantDevice]\n      maxDeviceThreatLevel: low",
                     "builtInControls: [block, compliantDevice]\n      maxDeviceThreatLevel: low",
                     "'block' cannot be combined with other grant controls", id="block with others"),
    ],
)
def test_policy_references_and_combinations_are_checked(config_dir: Path, old: str, new: str, message: str) -> None:
    edit(config_dir / "policies.yaml", old, new)
    assert any(message in p for p in problems(config_dir)), problems(config_dir)


def test_plain_http_issuer_off_loopback_is_refused(config_dir: Path) -> None:
    edit(config_dir / "portcullis.yaml", "issuer: http://127.0.0.1:9400/contoso", "issuer: http://login.contoso.test")
    [problem] = problems(config_dir)
    assert "must use https (plain http is allowed on loopback only)" in problem


def test_resource_on_an_unprotected_host_is_refused(config_dir: Path) -> None:
    edit(config_dir / "portcullis.yaml", "hosts: [mail.contoso.test]\n    paths: [/owa/auth/]",
         "hosts: [files.contoso.test]\n    paths: [/owa/auth/]")
    edit(config_dir / "portcullis.yaml", "sharepoint: [docs.contoso.test]", "sharepoint: [docs.contoso.tst]")
    found = problems(config_dir)
    assert any("resources.exchange-owa-sign-in-page.hosts[0]: 'files.contoso.test' is not a protected host" in p
               for p in found), found
    assert any("resourcePresets.sharepoint[0]: 'docs.contoso.tst' is not a protected host" in p for p in found)


def test_yaml_syntax_error_has_its_line(config_dir: Path) -> None:
    policies = config_dir / "policies.yaml"
    edit(policies, "    state: enabled", "    state: [enabled")
    [problem] = problems(config_dir)
    assert problem.startswith(f"{policies}:") and "invalid YAML" in problem


def test_check_command_prints_problems_and_exits_1(config_dir: Path) -> None:
    edit(config_dir / "policies.yaml", "state: enabled", "state: on")
    result = subprocess.run([PORTCULLIS, "check", "--config", str(config_dir)], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.startswith("portcullis: ") and "policies[0].state" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_command_accepts_the_demo_config(tmp_path: Path) -> None:
    config_dir = shipped_config(REPO / "config", tmp_path)
    result = subprocess.run([PORTCULLIS, "check", "--config", str(config_dir)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "6 policies, 4 devices in the inventory" in result.stdout
    assert "public resources (reachable without a token): 1\n  exchange-owa-sign-in-page:" in result.stdout
    assert unexpected_warnings(result.stdout.splitlines()) == []


def test_inventory_problems_are_reported_with_their_line(config_dir: Path) -> None:
    devices = config_dir / "devices.yaml"
    edit(devices, "complianceState: noncompliant", "complianceState: broken")
    result = subprocess.run([PORTCULLIS, "check", "--config", str(config_dir)], capture_output=True, text=True)
    assert result.returncode == 1
    assert f"devices.yaml:{line_of(devices, 'broken')}:" in result.stderr
    assert "devices[1].complianceState: 'broken' is not allowed" in result.stderr


def test_check_reports_a_missing_certificate_file_at_its_line_and_how_to_make_it(config_dir: Path) -> None:
    """``check`` said OK and ``run`` then failed: a config check passes must be one run can start."""
    gateway_file = config_dir / "portcullis.yaml"
    result = subprocess.run([PORTCULLIS, "check", "--config", str(config_dir)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and "OK" not in result.stdout
    expected = config_dir.parent / "certs" / "gateway.pem"
    assert result.stderr == (
        f"portcullis: {gateway_file}:{line_of(gateway_file, 'file: ../certs/gateway.pem')}:13: "
        f"gateway.certificates[0].file: {expected} does not exist, and the gateway cannot start without it: create "
        f"it (and the CA kiosks and test clients trust) with `portcullis certs --config {config_dir} init`, or put "
        "your own PEM there (certificate chain and private key)\n"
        # the demo config trusts the demo device CA for its mail host: made by the same command
        f"portcullis: {gateway_file}:{line_of(gateway_file, 'caFiles: [../certs/device-ca.pem]')}:17: "
        f"protectedHosts.mail.contoso.test.deviceCertificates.caFiles[0]: {expected.parent / 'device-ca.pem'} does "
        "not exist, and no device certificate could be verified without it: put your MDM's issuing CA there (PEM), "
        f"or for the demo device CA run `portcullis certs --config {config_dir} init`\n")
    made = subprocess.run([PORTCULLIS, "certs", "--config", str(config_dir), "init"], capture_output=True, text=True,
                          timeout=60)
    assert made.returncode == 0, made.stderr
    result = subprocess.run([PORTCULLIS, "check", "--config", str(config_dir)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and ": OK: " in result.stdout, result.stderr


def test_run_without_its_certificate_file_says_which_file(config_dir: Path) -> None:
    result = subprocess.run([PORTCULLIS, "run", "--config", str(config_dir)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    expected = config_dir.parent / "certs" / "gateway.pem"
    gateway_file = config_dir / "portcullis.yaml"  # as `check` says it, at its line, with how to make it
    assert f"portcullis: {gateway_file}:{line_of(gateway_file, 'file: ../certs/gateway.pem')}:13: " \
           f"gateway.certificates[0].file: {expected} does not exist" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("file", "old", "new", "message"),
    [
        pytest.param("policies.yaml",
                     "      operator: AND\n      builtInControls: [compliantDevice, approvedApplication]",
                     "      operator: OR\n      builtInControls: [compliantDevice, approvedApplication]",
                     "maxDeviceThreatLevel cannot be one alternative of operator OR", id="OR waiving the threat level"),
        pytest.param("portcullis.yaml", "ipRanges: [10.20.0.0/16,", "ipRanges: [10.20.0.1/16,",
                     "'10.20.0.1/16': 10.20.0.1/16 has host bits set", id="CIDR with host bits"),
        pytest.param("portcullis.yaml", "ipRanges: [10.20.0.0/16,", "ipRanges: [10.20.0.0,",
                     "'10.20.0.0' needs a prefix length", id="address without prefix"),
        pytest.param("portcullis.yaml", "paths: [/owa/auth/]", "paths: [/OWA/]",
                     "'/OWA/' on mail.contoso.test is already a path of resource 'exchange-owa'",
                     id="same path in two resources"),
        pytest.param("policies.yaml", "clientAppTypes: [all]", "clientAppTypes: [Browser]",
                     "'Browser' is not allowed; did you mean 'browser'?", id="suggestion ignores case first"),
        pytest.param("policies.yaml", "      locations: {include: [All], exclude: [AllTrusted]}",
                     "      locations: {include: [All], exclude: [AllTrusted]}\n      deviceFilter: {mode: include, "
                     "rule: '" + "(" * 20 + 'device.model -eq "x"' + ")" * 20 + "'}",
                     "parentheses nested deeper than 16", id="deeply nested device filter"),
        pytest.param("policies.yaml", "      locations: {include: [All], exclude: [AllTrusted]}",
                     "      locations: {include: [All], exclude: [AllTrusted]}\n      deviceFilter: {mode: include, "
                     "rule: 'device.modell -eq \"x\"'}",
                     "device filter rule: 'device.modell' is not a device attribute", id="unknown filter attribute"),
    ],
)
def test_config_mistakes_are_errors_with_a_place(config_dir: Path, file: str, old: str, new: str,
                                                  message: str) -> None:
    edit(config_dir / file, old, new)
    found = problems(config_dir)
    assert any(message in p and p.startswith(str(config_dir / file) + ":") for p in found), found


HEAD_OFFICE = "ipRanges: [10.20.0.0/16, 2001:db8:20::/48]\n    trusted: true"


@pytest.mark.parametrize(
    ("entry", "override", "message"),
    [
        pytest.param("0.0.0.0/0", False, "'0.0.0.0/0' is every IPv4 address", id="every IPv4 address"),
        pytest.param("::/0", False, "'::/0' is every IPv6 address", id="every IPv6 address"),
        pytest.param("::/0", True, "'::/0' is every IPv6 address", id="every address, even with the override"),
        pytest.param("0.0.0.0/1", False, "'0.0.0.0/1' is wider than /8", id="half of IPv4"),
        pytest.param("96.0.0.0/7", False, "'96.0.0.0/7' is wider than /8", id="IPv4 wider than /8"),
        pytest.param("2000::/3", False, "'2000::/3' is wider than /32", id="every global IPv6 address"),
        pytest.param("2001:db8::/31", False, "'2001:db8::/31' is wider than /32", id="IPv6 wider than /32"),
    ],
)
def test_a_named_location_of_every_address_or_too_wide_a_range_is_refused_at_its_line(
        config_dir: Path, entry: str, override: bool, message: str) -> None:
    """A trusted 0.0.0.0/0 made every client trusted: with exclude: [AllTrusted], the SharePoint rules
    applied to no one. Refused at the range's own line, as gateway.trustedProxies is."""
    gateway_file = config_dir / "portcullis.yaml"
    edit(gateway_file, HEAD_OFFICE, "ipRanges:\n      - 10.20.0.0/16\n      - " + entry + "\n    trusted: true"
         + ("\n    allowWideRanges: true" if override else ""))
    [problem] = problems(config_dir)
    assert problem.startswith(f"{gateway_file}:{line_of(gateway_file, '- ' + entry)}:9: "
                              "namedLocations.head-office.ipRanges[1]: "), problem
    assert message in problem


@pytest.mark.parametrize(("entries", "override"), [
    pytest.param("[10.0.0.0/8, 2001:db8::/32]", False, id="the widest ranges accepted"),
    pytest.param("[96.0.0.0/7, 2000::/3]", True, id="wider ones with allowWideRanges"),
])
def test_named_locations_up_to_the_bound_or_with_the_override_are_accepted(config_dir: Path, entries: str,
                                                                           override: bool) -> None:
    edit(config_dir / "portcullis.yaml", HEAD_OFFICE,
         f"ipRanges: {entries}\n    trusted: true" + ("\n    allowWideRanges: true" if override else ""))
    location = load_config(config_dir).gateway_file.named_locations["head-office"]
    assert [str(n) for n in location.ip_ranges] == entries.strip("[]").split(", ")


SHAREPOINT = ["sharepoint-sites", "sharepoint-api", "sharepoint-csom", "sharepoint-downloads"]
SHAREPOINT_POLICY = """  - name: {name}
    state: enabled
    conditions:
      users: {users}
      resources: {{include: [sharepoint-sites, sharepoint-api, sharepoint-csom, sharepoint-downloads]}}
      clientAppTypes: {types}
    grantControls: {{builtInControls: [{control}]}}
"""


def sharepoint_policy(name: str = "sharepoint-compliant-device", users: str = "{includeUsers: [All]}",
                      types: str = "[all]", control: str = "compliantDevice") -> str:
    return SHAREPOINT_POLICY.format(name=name, users=users, types=types, control=control)


@pytest.mark.parametrize(("policies", "cohort"), [
    pytest.param([sharepoint_policy(users="{excludeGroups: [staff]}", control="block")],
                 "users in group staff (left out of 'sharepoint-compliant-device')",
                 id="a block policy excluding staff: staff reach it"),
    pytest.param([sharepoint_policy(types="[browser]")],
                 "every user (no enabled policy covering it names them) with clientAppTypes "
                 "mobileAppsAndDesktopClients, exchangeActiveSync, other", id="browsers only: apps reach it"),
    pytest.param([sharepoint_policy(users="{includeGroups: [sales]}")],
                 "users outside group sales (left out of 'sharepoint-compliant-device')",
                 id="one group only: everyone else reaches it"),
    pytest.param([sharepoint_policy(users="{excludeGroups: [staff]}"),
                  sharepoint_policy(name="contractors", users="{excludeUsers: [Kim@contoso.test], excludeGroups: "
                                                             "[contractors]}")],
                 "users in group contractors and group staff (left out of 'sharepoint-compliant-device', "
                 "'contractors')", id="two exclusions: members of both groups reach it"),
    pytest.param([sharepoint_policy(users="{excludeGroups: [staff]}", types="[browser]"),
                  sharepoint_policy(name="apps", types="[mobileAppsAndDesktopClients, exchangeActiveSync, other]")],
                 "users in group staff (left out of 'sharepoint-compliant-device') with clientAppTypes browser",
                 id="staff excluded from the browser policy only"),
    pytest.param([sharepoint_policy(users="{excludeGroups: [staff]}"),
                  sharepoint_policy(name="staff", users="{includeGroups: [Staff]}", control="mfa")],
                 None, id="staff excluded, but covered by a policy of their own: no warning"),
    pytest.param([sharepoint_policy(users="{excludeGroups: [staff]}"),
                  sharepoint_policy(name="staff-rollout", users="{includeGroups: [staff]}",
                                    control="mfa").replace("    state: enabled\n",
                                                           "    state: enabled\n    rollout: {groups: [pilot]}\n")],
                 "users in group staff (left out of 'sharepoint-compliant-device')",
                 id="a rollout policy covers only its cohort: staff still reach it"),
])
def test_check_warns_for_the_users_and_client_app_types_no_enabled_policy_covers(
        config_dir: Path, policies: list[str], cohort: str | None) -> None:
    """A block policy with excludeGroups: [staff] silenced "covered by no enabled policy" although
    staff reach the resource with any valid token. Now every uncovered cohort is named."""
    edit(config_dir / "policies.yaml", (config_dir / "policies.yaml").read_text().split("  - name: ")[3],
         "".join(policies)[len("  - name: "):])
    warnings = [w.message for w in config_warnings(load_config(config_dir)) if DEMO_RETIRED_GRANT not in w.message]
    expected = [] if cohort is None else [f"resource {name!r} is covered only in part: any valid token reaches it "
                                          f"for {cohort}" for name in SHAREPOINT]
    assert warnings == expected


def test_cases_with_a_malformed_ip_are_refused(tmp_path: Path) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text("cases:\n  - name: x\n    user: u\n    url: https://mail.contoso.test/owa/\n"
                     "    ip: 10.20.1\n    expect: {result: allow}\n")
    result = subprocess.run([PORTCULLIS, "test", "--config", str(REPO / "config"), str(cases)],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert f"{cases}:5:9: cases[0].ip:" in result.stderr


@pytest.mark.slow
def test_certs_init_creates_a_ca_and_a_certificate_for_every_host(config_dir: Path) -> None:
    result = subprocess.run([PORTCULLIS, "certs", "--config", str(config_dir), "init"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    certs = config_dir.parent / "certs"
    from cryptography import x509

    server = x509.load_pem_x509_certificate((certs / "gateway.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"mail.contoso.test", "docs.contoso.test",
                                                            "portcullis.contoso.test"}
    ca = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    assert server.issuer == ca.subject
    assert oct((certs / "ca-key.pem").stat().st_mode & 0o777) == "0o600"


DATABASE_LINE = ("  database: ../.portcullis/devices.sqlite   # the embedded inventory "
                 "(portcullis devices import/list/...)\n")
SESSION_LINE = "  sessionLifetimeSeconds: 28800\n"


def with_state(config_dir: Path, state: str, *, keep_database: bool = False, session_key: bool = True) -> None:
    path = config_dir / "portcullis.yaml"
    if not keep_database:
        edit(path, DATABASE_LINE, "")
    if session_key:
        edit(path, SESSION_LINE, SESSION_LINE + "  sessionKeyEnv: PORTCULLIS_SESSION_KEY\n")
    path.write_text(path.read_text() + f"\nstate: {state}\n")


def test_state_takes_a_redis_url_alone_or_in_full(config_dir: Path) -> None:
    with_state(config_dir, "redis://127.0.0.1:6379/2")
    state = load_config(config_dir).gateway_file.state
    assert state is not None and (state.redis, state.key_prefix, state.password_env) == \
        ("redis://127.0.0.1:6379/2", "portcullis:", None)
    edit(config_dir / "portcullis.yaml", "state: redis://127.0.0.1:6379/2",
         "state: {redis: 'rediss://redis.internal:6380/0', passwordEnv: REDIS_PASSWORD, keyPrefix: 'gw-eu:'}")
    state = load_config(config_dir).gateway_file.state
    assert state is not None and (state.redis, state.key_prefix, state.password_env) == \
        ("rediss://redis.internal:6380/0", "gw-eu:", "REDIS_PASSWORD")


@pytest.mark.parametrize(("state", "message"), [
    ("redis://:s3cret@127.0.0.1:6379/0", "the Redis password does not belong in a config file"),
    ("redis://127.0.0.1:6379/0?password=s3cret", "the Redis password does not belong in a config file"),
    ("rediss://redis.internal/0?ssl_cert_reqs=none", "the only URL parameter accepted is db"),
    ("redis://redis.internal:6379/0", "plain redis:// is allowed on loopback only; use rediss:// (TLS)"),
    ("http://127.0.0.1:6379/0", "state is a redis://, rediss:// or unix:// URL"),
])
def test_state_urls_that_would_leak_or_weaken_are_refused(config_dir: Path, state: str, message: str) -> None:
    with_state(config_dir, f"'{state}'")
    found = problems(config_dir)
    assert any(message in p for p in found), found
    assert not any("s3cret" in p for p in found)  # the refusal does not print the password either


def test_state_and_a_sqlite_inventory_or_per_host_cookie_keys_do_not_mix(config_dir: Path) -> None:
    with_state(config_dir, "redis://127.0.0.1:6379/0", keep_database=True)
    assert any("deviceSignals.database and state both say where devices live" in p for p in problems(config_dir))
    fresh = config_dir.parent / "second"
    shutil.copytree(REPO / "config", fresh)
    with_state(fresh, "redis://127.0.0.1:6379/0", session_key=False)
    assert any("set browserSignIn.sessionKeyEnv" in p for p in problems(fresh))
