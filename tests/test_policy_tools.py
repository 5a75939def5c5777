"""The rule writers' tools as subprocesses: check (warnings, public resources, cases), whatif
(text and JSON), test (pass, fail with a diff, malformed cases)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.helpers.config import shipped_config

PORTCULLIS = str(Path(sys.executable).with_name("portcullis"))
ALEX_IPHONE = "3c5f0b1e-7a2d-4e8f-9b61-0d2a4c8e1f01"
ACTIVESYNC = "https://mail.contoso.test/Microsoft-Server-ActiveSync"


def portcullis(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PORTCULLIS, *map(str, args)], capture_output=True, text=True, timeout=60)


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    return shipped_config(REPO / "config", tmp_path)  # with its certificate files: `check` needs them


def test_whatif_json_is_the_documented_shape() -> None:
    result = portcullis("whatif", "--config", REPO / "config", "--user", "alex@contoso.test", "--url", ACTIVESYNC,
                        "--app", "teams", "--device", ALEX_IPHONE, "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert set(answer) == {"input", "result", "httpStatus", "errorCode", "reason", "resource", "clientAppType",
                           "failedPolicy", "sessionControls", "restriction", "policies"}
    assert (answer["result"], answer["errorCode"], answer["failedPolicy"], answer["restriction"]) == \
        ("block", 53002, "exchange-outlook-only", None)
    policies = {p["id"]: p for p in answer["policies"]}
    assert len(policies) == 6
    assert policies["exchange-outlook-only"]["failedControls"][0]["control"] == "approvedApplication"
    assert policies["exchange-outlook-only"]["enforcedGrantControls"] == \
        ["compliantDevice", "approvedApplication", "maxDeviceThreatLevel"]
    assert policies["owa-compliant-device"]["notAppliedBecause"] == "resource 'exchange-activesync' is not included"
    assert policies["mfa-outside-head-office"]["state"] == "reportOnly"
    assert policies["mfa-outside-head-office"]["result"] == "reportOnlyFailure"


def test_whatif_text_explains_each_policy() -> None:
    result = portcullis("whatif", "--config", REPO / "config", "--user", "alex@contoso.test", "--url", ACTIVESYNC,
                        "--app", "outlook-mobile", "--device", ALEX_IPHONE, "--ip", "10.20.3.4")
    assert result.returncode == 0, result.stderr
    assert "result: ALLOW (200)" in result.stdout
    assert "exchange-outlook-only [enabled]: success; requires compliantDevice, approvedApplication" in result.stdout
    assert "mfa-outside-head-office [reportOnly]: reportOnlyNotApplied (location of 10.20.3.4 is excluded)" \
        in result.stdout


KIOSK_DOWNLOAD = ["--user", "kiosk@contoso.test", "--url", "https://docs.contoso.test/_layouts/15/download.aspx",
                  "--listener", "kiosk"]


def test_whatif_refuses_a_kiosk_download_as_the_gateway_does() -> None:
    """Policy allows it with blockDownloads; the session control then refuses the request itself
    (403), at the gateway and in What If alike."""
    answer = json.loads(portcullis("whatif", "--config", REPO / "config", *KIOSK_DOWNLOAD, "--json").stdout)
    assert (answer["result"], answer["httpStatus"], answer["errorCode"]) == ("block", 403, 0)
    assert (answer["reason"], answer["restriction"]) == ("downloads are blocked in this session", "blockDownloads")
    assert answer["sessionControls"] == ["blockDownloads", "blockUploads", "signInFrequency", "persistentBrowser"]
    text = portcullis("whatif", "--config", REPO / "config", *KIOSK_DOWNLOAD).stdout
    assert "result: BLOCK (403): downloads are blocked in this session [restriction: blockDownloads]" in text


def test_whatif_checks_the_activesync_device_id_against_the_token_s_device() -> None:
    url = f"{ACTIVESYNC}?Cmd=Sync&User=alex&DeviceId=ApplF17DREW001&DeviceType=iPhone"  # Drew's phone's DeviceId
    answer = json.loads(portcullis("whatif", "--config", REPO / "config", "--user", "alex@contoso.test", "--url", url,
                                   "--app", "outlook-mobile", "--device", ALEX_IPHONE, "--json").stdout)
    assert (answer["result"], answer["httpStatus"], answer["errorCode"]) == ("block", 403, 53000)
    assert (answer["reason"], answer["restriction"]) == \
        ("ActiveSync DeviceId is not the device the token was issued to", "activeSyncDeviceIdMismatch")
    assert answer["policies"] == []  # refused before policy, as at the gateway


BLAKE_ANDROID = "8d2e6f4a-1b3c-4d5e-8f70-2a4b6c8d0e02"
ALEX_SYNC = f"{ACTIVESYNC}?Cmd=Sync&User=alex&DeviceId=ApplF17XK2ALEX1&DeviceType=iPhone"


def test_whatif_refuses_a_token_on_a_connection_whose_certificate_names_another_device() -> None:
    """The stolen-token question: Alex's phone's token from Blake's device (its certificate)."""
    asked = ["whatif", "--config", REPO / "config", "--user", "alex@contoso.test", "--url", ALEX_SYNC,
             "--app", "outlook-mobile", "--device", ALEX_IPHONE, "--json"]
    stolen = json.loads(portcullis(*asked, "--device-certificate", BLAKE_ANDROID).stdout)
    assert (stolen["result"], stolen["errorCode"], stolen["restriction"]) == \
        ("block", 53000, "tokenIssuedToAnotherDevice")
    assert stolen["input"]["deviceCertificate"] == BLAKE_ANDROID
    own = json.loads(portcullis(*asked, "--device-certificate", ALEX_IPHONE).stdout)
    assert (own["result"], own["restriction"]) == ("allow", None)


def test_a_case_can_name_the_connections_device_certificate(tmp_path: Path) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text(f"""cases:
  - name: a token replayed from another device is refused
    user: alex@contoso.test
    url: {ALEX_SYNC}
    app: outlook-mobile
    device: {ALEX_IPHONE}
    deviceCertificate: {BLAKE_ANDROID}
    expect: {{result: block, errorCode: 53000, restriction: tokenIssuedToAnotherDevice}}
  - name: a token without a deviceid is decided for the certificate's device
    user: alex@contoso.test
    url: {ALEX_SYNC}
    app: outlook-mobile
    deviceCertificate: {ALEX_IPHONE}
    expect: {{result: allow}}
""")
    result = portcullis("test", "--config", REPO / "config", cases)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{cases}: 2 of 2 cases passed" in result.stdout


SIGN_IN_PAGE = "https://mail.contoso.test/owa/auth/logon.aspx"  # the demo's public resource


def test_whatif_allows_a_public_resource_as_the_gateway_does(tmp_path: Path) -> None:
    """The gateway forwards a public resource before any token is read (200): What If answers so
    (exit 0), and a case about it passes, instead of exit 2 and "cannot ask"."""
    asked = ["--config", REPO / "config", "--user", "alex@contoso.test", "--url", SIGN_IN_PAGE]
    result = portcullis("whatif", *asked, "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert (answer["result"], answer["httpStatus"], answer["errorCode"], answer["reason"], answer["resource"]) == \
        ("allow", 200, 0, "public resource", "exchange-owa-sign-in-page")
    assert (answer["failedPolicy"], answer["sessionControls"], answer["restriction"], answer["policies"]) == \
        (None, [], None, [])
    text = portcullis("whatif", *asked)
    assert text.returncode == 0, text.stderr
    assert "result: ALLOW (200): public resource\n  policies: none evaluated" in text.stdout
    cases = tmp_path / "cases.yaml"
    cases.write_text(f"cases:\n  - {{name: the sign-in page is public, user: alex@contoso.test, url: {SIGN_IN_PAGE},"
                     " expect: {result: allow}}\n")
    tested = portcullis("test", "--config", REPO / "config", cases)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "PASS: the sign-in page is public" in tested.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--url", "https://intranet.contoso.test/"], "is not on a protected host"),
        (["--url", ACTIVESYNC, "--app", "whatsapp"], "'whatsapp' is neither a configured application"),
        (["--url", "https://mail.contoso.test/owa/%2e%2e/ecp"], "has an ambiguous path"),
    ],
)
def test_whatif_refuses_questions_it_cannot_answer(args: list[str], message: str) -> None:
    result = portcullis("whatif", "--config", REPO / "config", "--user", "alex@contoso.test", *args)
    assert result.returncode == 2
    assert message in result.stderr


CASES = """
cases:
  - name: Outlook on a compliant phone reaches ActiveSync
    user: alex@contoso.test
    app: outlook-mobile
    device: 3c5f0b1e-7a2d-4e8f-9b61-0d2a4c8e1f01
    url: https://mail.contoso.test/Microsoft-Server-ActiveSync
    expect: {result: allow}
  - name: Teams is not an approved app
    user: alex@contoso.test
    app: teams
    device: 3c5f0b1e-7a2d-4e8f-9b61-0d2a4c8e1f01
    url: https://mail.contoso.test/Microsoft-Server-ActiveSync
    expect: {result: block, errorCode: 53002, failedPolicy: exchange-outlook-only}
"""


def test_test_command_passes_and_fails_with_a_diff(tmp_path: Path) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text(CASES)
    passing = portcullis("test", "--config", REPO / "config", cases)
    assert passing.returncode == 0, passing.stdout + passing.stderr
    assert "PASS: Outlook on a compliant phone reaches ActiveSync" in passing.stdout
    assert f"{cases}: 2 of 2 cases passed" in passing.stdout

    cases.write_text(CASES.replace("errorCode: 53002", "errorCode: 53000").replace(
        "expect: {result: allow}", "expect: {result: block}"))
    failing = portcullis("test", "--config", REPO / "config", cases)
    assert failing.returncode == 1
    assert "FAIL: Outlook on a compliant phone reaches ActiveSync\n    result: expected block, got allow (allowed)" \
        in failing.stdout
    assert "FAIL: Teams is not an approved app\n    errorCode: expected 53000, got 53002" in failing.stdout
    assert f"{cases}: 0 of 2 cases passed" in failing.stdout


def test_malformed_cases_file_names_file_and_line(tmp_path: Path) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text(CASES.replace("expect: {result: allow}", "expect: {result: allowed}"))
    result = portcullis("test", "--config", REPO / "config", cases)
    assert result.returncode == 1
    assert f"{cases}:8:22:" in result.stderr
    assert "cases[0].expect.result: 'allowed' is not allowed; did you mean 'allow'?" in result.stderr


def test_empty_cases_file_fails(tmp_path: Path) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text("cases: []\n")
    result = portcullis("test", "--config", REPO / "config", cases)
    assert result.returncode == 1
    assert "cases: List should have at least 1 item" in result.stderr


def test_check_warns_about_policies_and_resources_that_do_nothing(config_dir: Path) -> None:
    (config_dir / "cases.yaml").unlink()  # the edits below are meant to change decisions
    policies = config_dir / "policies.yaml"
    policies.write_text(policies.read_text().replace(
        "include: [sharepoint-sites, sharepoint-api, sharepoint-csom, sharepoint-downloads]",
        "include: [sharepoint-sites, sharepoint-api, sharepoint-csom]\n        exclude: [sharepoint-sites, "
        "sharepoint-api, sharepoint-csom]"))
    gateway_file = config_dir / "portcullis.yaml"
    gateway_file.write_text(gateway_file.read_text().replace(
        "  office: d3590ed6-52b3-4102-aeff-aad2292ab01c",
        "  office: [d3590ed6-52b3-4102-aeff-aad2292ab01c, 27922004-5251-4030-b22d-91ecd9a37ea4]"))
    result = portcullis("check", "--config", config_dir)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert any("policy 'sharepoint-compliant-device' can never apply: every resource it includes is excluded"
               in w for w in warnings), warnings
    assert any("resource 'sharepoint-downloads' is covered by no enabled policy" in w for w in warnings)
    assert any("client id 27922004-5251-4030-b22d-91ecd9a37ea4 is listed under more than one application" in w
               for w in warnings)
    assert all(":" in w.split(" ", 2)[1] for w in warnings), "every warning names file:line"


def test_check_runs_the_cases_beside_the_config(config_dir: Path) -> None:
    (config_dir / "cases.yaml").write_text(CASES.replace("errorCode: 53002", "errorCode: 53004"))
    result = portcullis("check", "--config", config_dir)
    assert result.returncode == 1
    assert "FAIL: Teams is not an approved app" in result.stdout
