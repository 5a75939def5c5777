"""``portcullis replay`` on traffic recorded for real: ``portcullis demo --record`` runs in a
process of its own, the demo scenarios go through its listener, and the flow file and decision
log it leaves are replayed against stricter (and looser) candidate configs.

The HTML report is opened in headless Chromium; set PORTCULLIS_SCREENSHOTS=docs/screenshots to
refresh the README's screenshot of it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from ruamel.yaml import YAML

from gateway.audit import Pseudonymizer
from gateway.cli import main
from gateway.demo import ALEX_IPHONE, SCENARIOS, Scenario
from gateway.policy.model import DecisionResult
from gateway.replay.engine import Replayed, Verdict
from gateway.replay.html import as_html
from gateway.replay.recorded import RecordedRequest, Skipped
from gateway.replay.report import ReplayReport, as_text
from tests.conftest import Ports, demo_config_copy

PORTCULLIS = str(Path(sys.executable).with_name("portcullis"))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
MFA_POLICY = """
  - name: activesync-requires-mfa
    displayName: "ActiveSync: multifactor authentication"
    state: enabled
    conditions:
      users: {includeUsers: [%s]}
      resources: {include: [exchange-activesync]}
    grantControls:
      builtInControls: [mfa]
"""
ALEX, CASEY = "alex@contoso.test", "casey@contoso.test"


@dataclass(frozen=True)
class Recording:
    root: Path
    config: Path
    flows: Path
    log: Path
    sent: list[tuple[Scenario, int, str]]  # scenario, status, correlation id
    misdirected: str  # the correlation id of a request whose Host is not its SNI (421, before routing)


def _wait_for_banner(process: subprocess.Popen[str]) -> None:
    assert process.stdout is not None
    deadline, seen = time.monotonic() + 60, []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if "/demo/token" in line and line.startswith("curl"):
            return
    raise AssertionError("the demo did not start:\n" + "".join(seen))


def _token(client: httpx.Client, ports: Ports, scenario: Scenario) -> str | None:
    if scenario.credential == "none":
        return None
    answer = client.post(f"http://127.0.0.1:{ports.idp}/contoso/demo/token",
                         data={"user": scenario.user, "client_id": scenario.client_id, "audience": scenario.audience,
                               "device_id": scenario.device_id or ""})
    token = str(answer.json()["access_token"])
    if scenario.credential == "tampered":
        header, payload, signature = token.split(".")
        token = ".".join((header, payload, signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]))
    return token


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recording]:
    """Every demo scenario, sent once through ``portcullis demo --record``."""
    root = tmp_path_factory.mktemp("recorded")
    ports = Ports.fresh()
    config = demo_config_copy(root, ports)
    flows = root / "traffic.mitm"
    process = subprocess.Popen([PORTCULLIS, "demo", "--config", str(config), "--record", str(flows)], cwd=root,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sent = []
    try:
        _wait_for_banner(process)
        context = ssl.create_default_context(cafile=str(root / "certs" / "ca.pem"))
        with httpx.Client(timeout=10) as plain:
            for scenario in SCENARIOS:
                token = _token(plain, ports, scenario)
                headers = {"Host": scenario.host, **dict(scenario.headers)}
                if token:
                    headers["Authorization"] = f"Bearer {token}"
                with httpx.Client(verify=context, timeout=10) as client:  # one connection per host name (SNI)
                    answer = client.request(scenario.method, f"https://127.0.0.1:{ports.gateway}{scenario.path}",
                                            headers=headers, extensions={"sni_hostname": scenario.host})
                assert answer.status_code == scenario.expect_status, scenario.title
                sent.append((scenario, answer.status_code, answer.headers["X-Portcullis-Correlation-Id"]))
            with httpx.Client(verify=context, timeout=10) as client:
                answer = client.get(f"https://127.0.0.1:{ports.gateway}/owa/", headers={"Host": "other.contoso.test"},
                                    extensions={"sni_hostname": "mail.contoso.test"})
                assert answer.status_code == 421
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    assert process.returncode == 0, process.stderr.read() if process.stderr else ""
    yield Recording(root, config, flows, root / ".portcullis" / "decisions.jsonl", sent,
                    answer.headers["X-Portcullis-Correlation-Id"])


def candidate(recording: Recording, name: str, *, users: str = "All", relax_owa: bool = False,
              alex_threat: str | None = None) -> Path:
    """The recorded config plus one policy (ActiveSync needs MFA); optionally OWA made report-only
    and Alex's phone at another threat level in today's inventory."""
    target = recording.root / name
    if not target.exists():
        shutil.copytree(recording.config, target)
        (target / "policies.yaml").write_text((target / "policies.yaml").read_text() + MFA_POLICY % users)
        if relax_owa:
            yaml = YAML()
            policies = yaml.load(target / "policies.yaml")
            [owa] = [p for p in policies["policies"] if p["name"] == "owa-compliant-device"]
            owa["state"] = "reportOnly"
            yaml.dump(policies, target / "policies.yaml")
        if alex_threat:
            yaml = YAML()
            devices = yaml.load(target / "devices.yaml")
            [alex] = [d for d in devices["devices"] if d["azureADDeviceId"] == ALEX_IPHONE]
            alex["threatLevel"] = alex_threat
            yaml.dump(devices, target / "devices.yaml")
    return target


def replay(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main(["replay", *(str(a) for a in args)])
    out, err = capsys.readouterr()
    return code, out, err


def section(out: str, title: str) -> str:
    """The lines of one part of the text report (up to the next blank line)."""
    start = out.index(f"\n{title}") + 1
    end = out.find("\n\n", start)
    return out[start:] if end < 0 else out[start:end]


def by_policy(out: str, change: str) -> dict[str, int]:
    lines = section(out, f"{change}:").splitlines()
    if "by policy:" not in "\n".join(lines):
        return {}
    start = lines.index("  by policy:") + 1
    counts = {}
    for line in lines[start:]:
        if line.startswith("  by "):
            break
        if line.startswith("    ") and not line.startswith("      "):
            name, _, count = line.strip().rpartition(": ")
            counts[name.split(" (")[0]] = int(count)
    return counts


def totals(out: str) -> dict[str, int]:
    """``same result: 9 (3 of them blocked for another reason)   allow→block: 2 ...``"""
    line = out.splitlines()[3]
    found = {name.strip(): int(count.split(" (")[0]) for name, count in (part.split(": ", 1)
                                                                          for part in line.split("   "))}
    found["blocked for another reason"] = int(line.split("(", 1)[1].split(" ", 1)[0])
    return found


def test_the_recording_is_private_and_holds_every_request(recording: Recording) -> None:
    assert stat.S_IMODE(recording.flows.stat().st_mode) == 0o600
    from addons.recorded_flows import read_flow_file

    *read, misdirected = list(read_flow_file(recording.flows))
    assert [r.correlation_id for r in read] == [cid for _, _, cid in recording.sent]
    assert all(r.authorization for r in read[:6])  # type: ignore[union-attr]  (bearer tokens, as sent)
    assert misdirected == Skipped(f"{recording.flows}:flow 12", "not an access decision (a gateway endpoint, an "
                                  "unprotected kiosk destination, or refused before routing)", recording.misdirected)


@pytest.mark.parametrize("sources", [
    pytest.param(("log",), id="decision log alone"),
    pytest.param(("flows", "log"), id="flows paired with the log"),
])
def test_replaying_under_the_recording_config_reproduces_every_recorded_decision(
        recording: Recording, capsys: pytest.CaptureFixture[str], sources: tuple[str, ...]) -> None:
    """The recorded decisions are the baseline: the same config must give the same result, policy
    and reason for every request, or replay would report flips that no rule change caused."""
    code, out, _ = replay(capsys, "--config", recording.config,
                          *(recording.flows if s == "flows" else recording.log for s in sources))
    assert code == 0
    assert totals(out) == {"same result": 12, "blocked for another reason": 0, "allow→block": 0, "block→allow": 0,
                           "skipped": 0}  # the misdirected flow is replayed from its record


def test_flows_against_a_stricter_candidate_flip_exactly_the_requests_it_targets(
        recording: Recording, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = replay(capsys, "--config", candidate(recording, "strict"), "--baseline", recording.config,
                          recording.flows)
    assert code == 0, out
    assert totals(out) == {"same result": 9, "blocked for another reason": 3, "allow→block": 2, "block→allow": 0,
                           "skipped": 1}
    assert "1: not an access decision" in section(out, "skipped:")
    assert by_policy(out, "allow→block") == {"activesync-requires-mfa": 2}
    flips = section(out, "allow→block:")
    assert f"{ALEX}: 1" in flips and f"{CASEY}: 1" in flips and "outlook-mobile: 2" in flips
    assert "exchange-activesync: 2" in flips
    assert "multifactor authentication required" in flips
    never = section(out, "policies that never matched")
    assert never.count("\n  ") == 2 and "kiosk-accounts-view-only" in never and "kiosks-read-only-browser" in never


def test_the_decision_log_replays_the_signals_of_the_time_after_the_inventory_changed(
        recording: Recording, capsys: pytest.CaptureFixture[str]) -> None:
    """Alex's phone is at high risk today: from the flows alone Alex is blocked either way and
    no longer flips; with the decision log, the device of the time makes the flip reproducible."""
    today = candidate(recording, "strict-today", alex_threat="high")
    code, out, _ = replay(capsys, "--config", today, recording.flows, recording.log)
    assert code == 0, out
    assert "baseline:  the decisions recorded in the decision log" in out
    assert totals(out)["skipped"] == 0 and "Replay of 12 requests" in out  # flow and record count once
    assert by_policy(out, "allow→block") == {"activesync-requires-mfa": 2}
    assert f"{ALEX}: 1" in section(out, "allow→block:")
    assert "today's inventory" not in out

    code, out, _ = replay(capsys, "--config", today, "--baseline", recording.config, recording.flows)
    assert code == 0
    assert by_policy(out, "allow→block") == {"activesync-requires-mfa": 1}
    assert ALEX not in section(out, "allow→block:")
    assert "requests had no decision log record with the device of the time" in out


def test_block_to_allow_is_grouped_under_the_policy_that_no_longer_blocks(
        recording: Recording, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = replay(capsys, "--config", candidate(recording, "mixed", relax_owa=True), recording.log)
    assert code == 0
    assert by_policy(out, "block→allow") == {"owa-compliant-device": 1}
    assert "blake@contoso.test: 1" in section(out, "block→allow:")
    assert by_policy(out, "allow→block") == {"activesync-requires-mfa": 2}


def _har(recording: Recording, target: Path) -> Path:
    """The recording exported with mitmproxy's own ``save.har``, plus a browser request that
    carries only a session cookie."""
    from mitmproxy import io
    from mitmproxy.addons.savehar import SaveHar

    with recording.flows.open("rb") as file:
        har = SaveHar().make_har(list(io.FlowReader(file).stream()))
    entry = json.loads(json.dumps(har["log"]["entries"][0]))
    entry["request"].update(url="https://mail.contoso.test/owa/", method="GET",
                            headers=[{"name": "Cookie", "value": "__Host-portcullis-session=abc"}], cookies=[])
    entry["response"]["headers"] = []
    har["log"]["entries"].append(entry)
    target.write_text(json.dumps(har))
    return target


def test_a_har_replays_but_a_token_it_alone_carries_is_not_verified(
        recording: Recording, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The tampered token (a 401 at the time) has valid-looking claims: from the HAR alone it is
    replayed as Alex, which the report says; paired with the decision log it stays a 401."""
    har = _har(recording, tmp_path / "session.har")
    strict = candidate(recording, "strict")
    code, out, _ = replay(capsys, "--config", strict, "--baseline", recording.config, har)
    assert code == 0
    assert by_policy(out, "allow→block") == {"activesync-requires-mfa": 3}
    assert "10 requests carry a token that nothing recorded as accepted by the gateway" in out
    assert "1: a browser session: the recording holds no token" in out
    assert "12 requests (HAR) carry no client address: evaluated from 203.0.113.10" in out

    code, out, _ = replay(capsys, "--config", strict, har, recording.log)
    assert code == 0
    assert by_policy(out, "allow→block") == {"activesync-requires-mfa": 2}
    assert "nothing recorded as accepted" not in out


def test_pseudonymised_logs_match_user_conditions_only_with_the_pseudonym_key(
        recording: Recording, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    key = b"replay-test-pseudonym-key-0123456789"
    pseudonyms = Pseudonymizer(key)
    log = tmp_path / "decisions.jsonl"
    log.write_text("".join(json.dumps(pseudonyms.apply(json.loads(line))) + "\n"
                           for line in recording.log.read_text().splitlines()))
    assert ALEX not in log.read_text()
    only_alex = candidate(recording, "alex-only", users=ALEX)
    state = recording.root / ".portcullis" / "pseudonym.key"
    state.unlink(missing_ok=True)
    code, out, _ = replay(capsys, "--config", only_alex, log)
    assert code == 0
    assert by_policy(out, "allow→block") == {}
    assert "no pseudonym key is available here" in out
    state.write_bytes(key)
    try:
        code, out, _ = replay(capsys, "--config", only_alex, log)
    finally:
        state.unlink()
    assert by_policy(out, "allow→block") == {"activesync-requires-mfa": 1}
    assert f"{pseudonyms.pseudonym(ALEX)}: 1" in section(out, "allow→block:")


def test_a_cut_short_flow_file_keeps_the_flows_before_the_damage(
        recording: Recording, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cut = tmp_path / "cut.mitm"
    data = recording.flows.read_bytes()
    cut.write_bytes(data[: len(data) - 200])
    code, out, _ = replay(capsys, "--config", candidate(recording, "strict"), "--baseline", recording.config, cut)
    assert code == 0
    assert "Replay of 11 requests" in out
    assert f"1: unreadable (Invalid data format.): the file is cut short or damaged there; the 11 flows before it " \
           f"were read ({cut}:flow 12)" in out


def test_an_unreadable_log_line_is_counted_and_costs_nothing_else(
        recording: Recording, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    lines = recording.log.read_text().splitlines()
    log = tmp_path / "decisions.jsonl"
    log.write_text("\n".join([*lines[:3], '{"id": "half a rec', *lines[3:]]) + "\n")
    code, out, _ = replay(capsys, "--config", candidate(recording, "strict"), log)
    assert code == 0
    assert "Replay of 12 requests" in out
    assert f"1: not a JSON record (a line cut short?) ({log}:4)" in out


@pytest.mark.parametrize(("content", "name", "message"), [
    pytest.param(b"12345:garbage", "traffic.mitm", "traffic.mitm:flow 1: not a readable mitmproxy flow file",
                 id="digits but no flows -> not a flow file"),
    pytest.param(b'{"not": "a HAR"}', "export.har", "export.har: not a HAR file (no readable log.entries)",
                 id="JSON without log.entries -> not a HAR file"),
    pytest.param(b"<html>", "page.html", "page.html:1: neither a mitmproxy flow file, a HAR file nor a Portcullis",
                 id="something else -> named as such"),
])
def test_a_source_that_is_not_one_is_a_clear_error(
        recording: Recording, capsys: pytest.CaptureFixture[str], tmp_path: Path, content: bytes, name: str,
        message: str) -> None:
    source = tmp_path / name
    source.write_bytes(content)
    code, out, err = replay(capsys, "--config", recording.config, source)
    assert code == 1
    assert f"portcullis: {tmp_path}/{message}" in err
    assert "Traceback" not in err


def test_nothing_replayable_exits_1_and_usage_errors_exit_2(
        recording: Recording, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    empty = tmp_path / "decisions.jsonl"
    empty.write_text('{"note": "not a decision"}\n')
    code, out, err = replay(capsys, "--config", recording.config, empty)
    assert code == 1 and "nothing was replayed" in err and "1: not an access decision record" in out
    with pytest.raises(SystemExit) as exit_:
        main(["replay", "--config", str(recording.config)])
    assert exit_.value.code == 2


def test_recorded_values_cannot_inject_markup_or_terminal_escapes() -> None:
    """Paths, user names and policy names in a report come from recorded traffic and configs."""
    request = RecordedRequest(place="x.har:entry 1", correlation_id="c", time=datetime(2026, 1, 1, tzinfo=UTC),
                              method="GET", host="mail.contoso.test", target="/owa/<script>alert(1)</script>\x1b[2J",
                              query_recorded=True, client_ip=None)
    item = Replayed(request=request, baseline=Verdict(result=DecisionResult.allow, status_code=200, reason="allowed"),
                    candidate=Verdict(result=DecisionResult.block, status_code=403, reason="<b>no</b>",
                                      policy_id="p<i>", policy_name="<img src=x onerror=alert(1)>"),
                    user="<u>\x1b]0;title\x07", app="a", current_inventory=False, unverified_token=False)
    report = ReplayReport(baseline="b", candidate="c", sources=("s",), replayed=(item,), skipped=(), never_matched=(),
                          notes=())
    page = as_html(report)
    assert "<script>" not in page and "<img" not in page and "<b>no" not in page and "<u>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;img src=x" in page
    text = as_text(report)
    assert "\x1b" not in text and "\x07" not in text and "/owa/<script>" in text


chromium_skip = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed "
                                                                        "(.ci/run installs it)")


@chromium_skip
def test_the_html_report_opens_in_chromium_with_its_chart(
        recording: Recording, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    playwright_api = pytest.importorskip("playwright.sync_api")
    report = tmp_path / "replay.html"
    screenshots = Path(os.environ.get("PORTCULLIS_SCREENSHOTS") or tmp_path).resolve()
    candidate(recording, "mixed", relax_owa=True)
    monkeypatch.chdir(recording.root)  # the report names its sources as given: short relative paths
    code, _, _ = replay(capsys, "--config", "mixed", "--html", report, recording.flows.name,
                        recording.log.relative_to(recording.root))
    assert code == 0
    assert "http" not in report.read_text().split("<main>")[0].replace("http-equiv", "")  # no external assets
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1180, "height": 900})
        page.goto(report.as_uri())
        assert page.inner_text("h1").startswith("Replay:")
        bars = page.locator("#flips-chart rect.bar")
        assert bars.count() == 4  # two policies, two bars each
        mfa = page.locator('rect.bar[data-policy="activesync-requires-mfa"][data-change="allow→block"]')
        assert mfa.get_attribute("data-count") == "2" and float(mfa.get_attribute("width") or 0) > 100
        owa = page.locator('rect.bar[data-policy="owa-compliant-device"][data-change="block→allow"]')
        assert owa.get_attribute("data-count") == "1"
        assert page.locator("#flips-chart").bounding_box()["width"] > 400  # type: ignore[index]
        screenshots.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshots / "replay-report.png"), full_page=True)
        assert (screenshots / "replay-report.png").stat().st_size > 1000
        browser.close()
