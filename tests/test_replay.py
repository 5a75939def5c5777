"""``portcullis replay`` on traffic recorded for real: ``portcullis demo --record`` runs in a
process of its own, the demo scenarios go through its listener, and the flow file and decision
log it leaves are replayed against stricter (and looser) candidate configs.

The HTML report is opened in headless Chromium; set PORTCULLIS_SCREENSHOTS=docs/screenshots to
refresh the README's screenshot of it.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from ruamel.yaml import YAML

from gateway import terminal
from gateway.app.cli import main
from gateway.app.demo import ALEX_IPHONE, EXCHANGE, ONEDRIVE, SCENARIOS, Scenario
from gateway.config import load_config
from gateway.decision import service
from gateway.decision.log import Pseudonymizer
from gateway.identity.tokens import RejectedToken
from gateway.policy.model import DecisionResult
from gateway.replay import engine as replay_engine
from gateway.replay import report as replay_report
from gateway.replay.engine import DecisionSummary, Replayed, token_identity
from gateway.replay.html import as_html
from gateway.replay.recorded import RecordedRequest, Skipped
from gateway.replay.report import ReplayReport, as_text
from tests.conftest import Ports, addon_context, demo_config_copy
from tests.helpers.replay import replay, totals

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
HALF_ROLLOUT = """
  - name: downloads-mfa-rollout
    displayName: "Rollout: MFA for SharePoint downloads"
    state: enabled
    rollout: {percentOfUsers: %d}
    conditions:
      resources: {include: [sharepoint-downloads]}
    grantControls:
      builtInControls: [mfa]
"""
ROLLOUT_USERS = [f"user{i}@contoso.test" for i in range(20)]


@dataclass(frozen=True)
class Recording:
    root: Path
    config: Path
    flows: Path
    log: Path
    sent: list[tuple[Scenario, int, str]]  # scenario, status, correlation id
    kiosk: str  # the correlation id of Alex's phone's token used through the kiosk proxy (403: an unmanaged browser)
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


@contextmanager
def demo_recording(root: Path, config: Path, flows: Path) -> Iterator[ssl.SSLContext]:
    """``portcullis demo --record`` running on ``config`` in a process of its own; yields a TLS
    context that trusts its CA, and stops it cleanly afterwards."""
    process = subprocess.Popen([PORTCULLIS, "demo", "--config", str(config), "--record", str(flows)], cwd=root,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_banner(process)
        yield ssl.create_default_context(cafile=str(root / "certs" / "ca.pem"))
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    assert process.returncode == 0, process.stderr.read() if process.stderr else ""


def _send(context: ssl.SSLContext, ports: Ports, scenario: Scenario, token: str | None) -> httpx.Response:
    headers = {"Host": scenario.host, **dict(scenario.headers)}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    with httpx.Client(verify=context, timeout=10) as client:  # one connection per host name (SNI)
        return client.request(scenario.method, f"https://127.0.0.1:{ports.gateway}{scenario.path}", headers=headers,
                              extensions={"sni_hostname": scenario.host})


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recording]:
    """Every demo scenario, sent once through ``portcullis demo --record``, then a kiosk request
    and a misdirected one."""
    root = tmp_path_factory.mktemp("recorded")
    ports = Ports.fresh()
    config = demo_config_copy(root, ports)
    flows = root / "traffic.mitm"
    sent = []
    with demo_recording(root, config, flows) as context, httpx.Client(timeout=10) as plain:
        for scenario in SCENARIOS:
            answer = _send(context, ports, scenario, _token(plain, ports, scenario))
            assert answer.status_code == scenario.expect_status, scenario.title
            sent.append((scenario, answer.status_code, answer.headers["X-Portcullis-Correlation-Id"]))
        phone = _token(plain, ports, SCENARIOS[0])  # Alex's phone's token, used from a kiosk: an unmanaged browser
        with httpx.Client(proxy=f"http://127.0.0.1:{ports.kiosk}", verify=context, timeout=10) as kiosk:
            answer = kiosk.post(f"https://{SCENARIOS[0].host}/Microsoft-Server-ActiveSync?Cmd=Sync",
                                headers={"Authorization": f"Bearer {phone}"})
        assert answer.status_code == 403 and "device not identified" in answer.text
        kiosk_request = answer.headers["X-Portcullis-Correlation-Id"]
        with httpx.Client(verify=context, timeout=10) as client:
            answer = client.get(f"https://127.0.0.1:{ports.gateway}/owa/", headers={"Host": "other.contoso.test"},
                                extensions={"sni_hostname": "mail.contoso.test"})
        assert answer.status_code == 421
    yield Recording(root, config, flows, root / ".portcullis" / "decisions.jsonl", sent, kiosk_request,
                    answer.headers["X-Portcullis-Correlation-Id"])


@dataclass(frozen=True)
class RolloutRecording:
    config: Path
    log: Path
    status: dict[str, int]  # user: the gateway's answer (403 inside the share, 200 outside)


@pytest.fixture(scope="module")
def rollout_recording(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RolloutRecording]:
    """The demo with an MFA policy rolled out to half of the users and a pseudonymised decision
    log; twenty users download a SharePoint document with OneDrive."""
    root = tmp_path_factory.mktemp("rollout")
    ports = Ports.fresh()
    config = demo_config_copy(root, ports)
    yaml = YAML()
    settings = yaml.load(config / "portcullis.yaml")
    settings["decisionLog"]["pseudonymizeUsers"] = True
    yaml.dump(settings, config / "portcullis.yaml")
    (config / "policies.yaml").write_text((config / "policies.yaml").read_text() + HALF_ROLLOUT % 50)
    download = next(s for s in SCENARIOS if s.client_id == ONEDRIVE)
    status = {}
    with demo_recording(root, config, root / "traffic.mitm") as context, httpx.Client(timeout=10) as plain:
        for user in ROLLOUT_USERS:
            scenario = replace(download, user=user)
            status[user] = _send(context, ports, scenario, _token(plain, ports, scenario)).status_code
    assert set(status.values()) == {200, 403}, status  # some users inside the share, some outside
    yield RolloutRecording(config, root / ".portcullis" / "decisions.jsonl", status)


def rollout_candidate(recording: RolloutRecording, percent: int) -> Path:
    """The recorded config with the rollout at another percentage."""
    target = recording.config.parent / f"rollout-{percent}"
    if not target.exists():
        shutil.copytree(recording.config, target)
        policies = target / "policies.yaml"
        policies.write_text(policies.read_text().replace("percentOfUsers: 50", f"percentOfUsers: {percent}"))
    return target


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


def test_the_recording_is_private_and_holds_every_request(recording: Recording) -> None:
    assert stat.S_IMODE(recording.flows.stat().st_mode) == 0o600
    from addons.recorded_flows import read_flow_file

    *read, kiosk, misdirected = list(read_flow_file(recording.flows))
    assert [r.correlation_id for r in read] == [cid for _, _, cid in recording.sent]
    assert all(r.authorization for r in read[:6])  # type: ignore[union-attr]  # bearer tokens, as sent
    assert isinstance(kiosk, RecordedRequest) and kiosk.kiosk and kiosk.correlation_id == recording.kiosk
    assert misdirected == Skipped(f"{recording.flows}:flow 13", "not an access decision (a gateway endpoint, an "
                                  "unprotected kiosk destination, or refused before routing)", recording.misdirected)


@pytest.mark.parametrize("sources", [
    pytest.param(("log",), id="decision log alone"),
    pytest.param(("flows", "log"), id="flows paired with the log"),
])
def test_replaying_under_the_recording_config_reproduces_every_recorded_decision(
        recording: Recording, capsys: pytest.CaptureFixture[str], sources: tuple[str, ...]) -> None:
    """The recorded decisions are the baseline: the same config must give the same result, policy
    and reason for every request (the kiosk request too: an unmanaged browser, whatever device its
    token names), or replay would report flips that no rule change caused."""
    code, out, _ = replay(capsys, "--config", recording.config,
                          *(recording.flows if s == "flows" else recording.log for s in sources))
    assert code == 0
    assert totals(out) == {"same result": 13, "blocked for another reason": 0, "allow→block": 0, "block→allow": 0,
                           "skipped": 0}  # the misdirected flow is replayed from its record


def test_a_pseudonymised_log_reproduces_its_percent_of_users_rollout(
        rollout_recording: RolloutRecording, capsys: pytest.CaptureFixture[str]) -> None:
    """A share is drawn on the user's object id, which a pseudonymised record no longer holds:
    replay keeps the cohort the gateway recorded, and says that it did."""
    code, out, _ = replay(capsys, "--config", rollout_recording.config, rollout_recording.log)
    assert code == 0
    assert totals(out) == {"same result": 20, "blocked for another reason": 0, "allow→block": 0, "block→allow": 0,
                           "skipped": 0}
    assert "20 requests by pseudonymised users fall under a percentOfUsers rollout (downloads-mfa-rollout): a " \
           "share cannot be drawn from a pseudonym, so the cohort the gateway recorded was kept" in out


@pytest.mark.parametrize(("percent", "unknown"), [
    pytest.param(50, None, id="unchanged -> every cohort exact"),
    pytest.param(80, 200, id="raised -> users in the share then stay in it, the others are unknown"),
    pytest.param(30, 403, id="lowered -> users outside then stay outside, the others are unknown"),
])
def test_a_changed_rollout_counts_the_pseudonymised_requests_whose_cohort_is_unknown(
        rollout_recording: RolloutRecording, capsys: pytest.CaptureFixture[str], percent: int,
        unknown: int | None) -> None:
    """With the config that wrote the log as the baseline, replay knows the share of the time: a
    share only grows with its percentage, so some cohorts still follow; the rest are counted."""
    code, out, _ = replay(capsys, "--config", rollout_candidate(rollout_recording, percent),
                          "--baseline", rollout_recording.config, rollout_recording.log)
    assert code == 0
    assert totals(out)["same result"] == 20
    assert "the cohort the gateway recorded was kept" not in out  # nothing assumed: the baseline says
    count = sum(status == unknown for status in rollout_recording.status.values())
    if unknown is None:
        assert "could not be recomputed" not in out
    else:
        assert f"{count} requests by pseudonymised users fall under a percentOfUsers rollout that is not as it was " \
               "when the log was written (downloads-mfa-rollout): their cohort could not be recomputed" in out


def test_flows_against_a_stricter_candidate_flip_exactly_the_requests_it_targets(
        recording: Recording, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = replay(capsys, "--config", candidate(recording, "strict"), "--baseline", recording.config,
                          recording.flows)
    assert code == 0, out
    assert totals(out) == {"same result": 10, "blocked for another reason": 4, "allow→block": 2, "block→allow": 0,
                           "skipped": 1}  # the kiosk request is blocked by the new policy first (MFA is asked first)
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
    assert totals(out)["skipped"] == 0 and "Replay of 13 requests" in out  # flow and record count once
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
    replayed as Alex, which the report says; paired with the decision log it stays a 401. A HAR
    does not say which listener a request came through: the kiosk request is replayed as Alex's
    phone until the decision log says it was a kiosk."""
    har = _har(recording, tmp_path / "session.har")
    strict = candidate(recording, "strict")
    code, out, _ = replay(capsys, "--config", strict, "--baseline", recording.config, har)
    assert code == 0
    assert by_policy(out, "allow→block") == {"activesync-requires-mfa": 4}
    assert "11 requests carry a token that nothing recorded as accepted by the gateway" in out
    assert "1: a browser session: the recording holds no token" in out
    assert "13 requests (HAR) carry no client address: evaluated from 203.0.113.10" in out

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


def test_flows_with_their_pseudonymised_log_reproduce_every_recorded_decision(
        recording: Recording, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The record's device is pseudonymised (its ActiveSync id too), the flow's query is not: the
    ActiveSync binding of the time is taken from the record, which has the device it was checked
    against, not checked again against a pseudonym."""
    pseudonyms = Pseudonymizer(b"replay-test-pseudonym-key-0123456789")
    log = tmp_path / "decisions.jsonl"
    log.write_text("".join(json.dumps(pseudonyms.apply(json.loads(line))) + "\n"
                           for line in recording.log.read_text().splitlines()))
    code, out, _ = replay(capsys, "--config", recording.config, recording.flows, log)
    assert code == 0
    assert totals(out) == {"same result": 13, "blocked for another reason": 0, "allow→block": 0, "block→allow": 0,
                           "skipped": 0}


def test_a_cut_short_flow_file_keeps_the_flows_before_the_damage(
        recording: Recording, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cut = tmp_path / "cut.mitm"
    data = recording.flows.read_bytes()
    cut.write_bytes(data[: len(data) - 200])
    code, out, _ = replay(capsys, "--config", candidate(recording, "strict"), "--baseline", recording.config, cut)
    assert code == 0
    assert "Replay of 12 requests" in out
    [skip] = [line for line in section(out, "skipped:").splitlines() if "unreadable" in line]
    assert re.fullmatch(rf"  1: unreadable \(a record claims \d+ bytes, the file has \d+ left\): the file is cut "
                        rf"short or damaged there; the 12 flows before it were read \({re.escape(str(cut))}:flow 13\)",
                        skip), skip


HOSTILE_FLOW = b"40:4:type;14:\x1b]0;PWNED\x07\x1b[2J;7:version;2:21#}"  # {"type": <escapes>, "version": 21}


def _nested_list(depth: int) -> bytes:
    """A tnetstring of lists nested ``depth`` deep."""
    data = b"0:]"
    for _ in range(depth):
        data = f"{len(data)}:".encode() + data + b"]"
    return data


@pytest.mark.parametrize(("damage", "reason"), [
    pytest.param(b"999999999999:" + b"x" * 10, "a record claims 999999999999 bytes, the file has 10 left",
                 id="an absurd length prefix -> not a MemoryError"),
    pytest.param(_nested_list(3000), "maximum recursion depth exceeded",
                 id="lists nested 3000 deep -> not a RecursionError ending the replay"),
    pytest.param(b"$HOSTILE", "Unknown flow type: ?]0;PWNED??[2J",
                 id="a flow type with terminal escapes -> printed harmless"),
])
def test_a_hostile_flow_record_is_a_counted_skip(
        recording: Recording, capsys: pytest.CaptureFixture[str], tmp_path: Path, damage: bytes,
        reason: str) -> None:
    damaged = tmp_path / "damaged.mitm"
    damaged.write_bytes(recording.flows.read_bytes() + (HOSTILE_FLOW if damage == b"$HOSTILE" else damage))
    code, out, err = replay(capsys, "--config", candidate(recording, "strict"), "--baseline", recording.config,
                            damaged)
    assert code == 0, err
    assert "Replay of 12 requests" in out
    assert f"1: unreadable ({reason}" in out
    assert not any(c in out + err for c in "\x1b\x07")
    assert f"the file is cut short or damaged there; the 13 flows before it were read ({damaged}:flow 14)" in out


def test_an_unreadable_log_line_is_counted_and_costs_nothing_else(
        recording: Recording, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    lines = recording.log.read_text().splitlines()
    log = tmp_path / "decisions.jsonl"
    log.write_text("\n".join([*lines[:3], '{"id": "half a rec', *lines[3:]]) + "\n")
    code, out, _ = replay(capsys, "--config", candidate(recording, "strict"), log)
    assert code == 0
    assert "Replay of 13 requests" in out
    assert f"1: not a JSON record (a line cut short?) ({log}:4)" in out


def test_a_log_line_nested_too_deep_is_counted_and_costs_nothing_else(
        recording: Recording, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Json's recursion limit is reached by a line 20 kB long; it comes first, where the kind of
    the source is read, and again among the records."""
    nested = '{"a": ' * 10_000 + "1" + "}" * 10_000
    lines = recording.log.read_text().splitlines()
    log = tmp_path / "decisions.jsonl"
    log.write_text("\n".join([nested, *lines[:3], nested, *lines[3:]]) + "\n")
    code, out, err = replay(capsys, "--config", candidate(recording, "strict"), log)
    assert code == 0, err
    assert "Replay of 13 requests" in out
    assert f"2: not a decision record: JSON nested too deep ({log}:1, {log}:5)" in out


def test_a_har_larger_than_the_cap_is_a_clear_error(
        recording: Recording, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.replay import recorded

    har = _har(recording, tmp_path / "export.har")
    monkeypatch.setattr(recorded, "MAX_HAR_BYTES", har.stat().st_size - 1)
    code, _, err = replay(capsys, "--config", recording.config, "--baseline", recording.config, har)
    assert code == 1
    assert f"portcullis: {har}: a HAR file larger than" in err and "is not read (it is read whole into memory)" in err
    monkeypatch.setattr(recorded, "MAX_HAR_BYTES", har.stat().st_size)
    assert replay(capsys, "--config", recording.config, "--baseline", recording.config, har)[0] == 0


@pytest.mark.parametrize(("content", "name", "message"), [
    pytest.param(b"12345:garbage", "traffic.mitm", "traffic.mitm:flow 1: not a readable mitmproxy flow file",
                 id="digits but no flows -> not a flow file"),
    pytest.param(b"999999999999:garbage", "traffic.mitm", "traffic.mitm:flow 1: not a readable mitmproxy flow file "
                 "(a record claims 999999999999 bytes, the file has 7 left)",
                 id="an absurd length prefix -> not a flow file, not a MemoryError"),
    pytest.param(HOSTILE_FLOW, "traffic.mitm", "traffic.mitm:flow 1: not a readable mitmproxy flow file (Unknown "
                 "flow type: ?]0;PWNED??[2J)", id="a flow type with terminal escapes -> printed harmless"),
    pytest.param(b'{"log": {"entries": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}", "export.har",
                 "export.har: not a HAR file (no readable log.entries): maximum recursion depth exceeded",
                 id="a HAR nested too deep -> not a HAR file"),
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
    assert "Traceback" not in err and "\x1b" not in err


def test_nothing_replayable_exits_1_and_usage_errors_exit_2(
        recording: Recording, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    empty = tmp_path / "decisions.jsonl"
    empty.write_text('{"note": "not a decision"}\n')
    code, out, err = replay(capsys, "--config", recording.config, empty)
    assert code == 1 and "nothing was replayed" in err and "1: not an access decision record" in out
    with pytest.raises(SystemExit) as exit_:
        main(["replay", "--config", str(recording.config)])
    assert exit_.value.code == 2


AT = datetime(2026, 1, 1, 9, tzinfo=UTC)
SKEW = 30  # the demo's clockSkewSeconds


@pytest.mark.parametrize(("claims", "reason"), [
    pytest.param({}, None, id="valid"),
    pytest.param({"iat": SKEW}, None, id="issued within the clock skew ahead -> valid"),
    pytest.param({"iat": SKEW + 1}, "token not yet valid", id="issued later than that -> not yet valid"),
    pytest.param({"iat": "yesterday"}, "malformed token", id="iat not a number -> malformed"),
    pytest.param({"nbf": SKEW + 1}, "token not yet valid", id="nbf ahead -> not yet valid"),
    pytest.param({"exp": -SKEW}, "token expired", id="exp exactly the clock skew ago -> expired (pyjwt)"),
    pytest.param({"exp": -SKEW + 1}, None, id="exp within the clock skew -> valid"),
    pytest.param({"aud": [{"not": "a string"}, EXCHANGE]}, "token audience not accepted for this host",
                 id="aud with a non-string -> not accepted"),
    pytest.param({"sub": 7}, "malformed token", id="sub not a string -> malformed"),
])
def test_recorded_tokens_are_held_to_the_time_claims_as_the_gateway_holds_them(
        recording: Recording, claims: dict[str, object], reason: str | None) -> None:
    """What ``BearerValidator`` (pyjwt with the configured leeway) says of the token at that time,
    but for the signature, which replay cannot check."""
    config = load_config(recording.config)
    assert config.gateway_file.identity.clock_skew_seconds == SKEW
    now = int(AT.timestamp())
    payload: dict[str, object] = {"iss": config.gateway_file.identity.issuer, "aud": EXCHANGE, "sub": "s",
                                  "oid": "o", "iat": now, "nbf": now, "exp": now + 3600}
    payload.update({k: now + v if k in ("iat", "nbf", "exp") and isinstance(v, int) else v  # seconds from AT
                    for k, v in claims.items()})
    identity = token_identity(config, "mail.contoso.test", ({"alg": "RS256"}, payload), AT)
    assert (identity.reason if isinstance(identity, RejectedToken) else None) == reason


@pytest.mark.parametrize(("header", "claims", "reason"), [
    pytest.param({}, {}, None, id="valid"),
    pytest.param({"jku": "https://attacker.test/keys"}, {}, "token names its own signing key", id="jku"),
    pytest.param({"crit": ["exp"]}, {}, "token uses an unsupported critical header", id="crit"),
    pytest.param({"typ": "dpop+jwt"}, {}, "token type not accepted", id="typ"),
    pytest.param({}, {"aud": [EXCHANGE]}, "token audience not accepted for this host", id="aud list"),
    pytest.param({}, {"nonce": "n"}, "an ID token is not an access token", id="ID token"),
])
def test_replay_holds_recorded_tokens_to_the_gateways_header_and_claim_rules(
        recording: Recording, header: dict[str, object], claims: dict[str, object], reason: str | None) -> None:
    """A token the live gateway refuses before its signature is checked is refused in replay too."""
    config = load_config(recording.config)
    now = int(AT.timestamp())
    payload: dict[str, object] = {"iss": config.gateway_file.identity.issuer, "aud": EXCHANGE, "sub": "s",
                                  "iat": now, "nbf": now, "exp": now + 3600, **claims}
    identity = token_identity(config, "mail.contoso.test", ({"alg": "RS256", "kid": "k", **header}, payload), AT)
    assert (identity.reason if isinstance(identity, RejectedToken) else None) == reason


def test_replay_decides_with_the_gateways_own_steps_after_identity() -> None:
    """The device binding check, ``evaluate`` and the session-control restriction are steps of one
    pipeline, ``gateway.decision.pipeline.authorize``, which the gateway and replay both call: they
    cannot diverge."""
    engine = ast.parse(Path(replay_engine.__file__).read_text())
    imported = {alias.name for node in ast.walk(engine) if isinstance(node, ast.ImportFrom)
                and node.module == "gateway.decision.pipeline" for alias in node.names}
    assert "authorize" in imported and not any(name.startswith("_") for name in imported), imported
    called = {node.func.id for node in ast.walk(engine) if isinstance(node, ast.Call)
              and isinstance(node.func, ast.Name)}
    assert "authorize" in called and not called & {"evaluate", "request_restriction", "restrict_and_evaluate"}, called
    [authorize] = [node for node in ast.walk(ast.parse(Path(service.__file__).read_text()))
                   if isinstance(node, ast.AsyncFunctionDef) and node.name == "_authorize"]
    calls = {node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
             for node in ast.walk(authorize) if isinstance(node, ast.Call)}
    assert "authorize" in calls and not calls & {"evaluate", "request_restriction", "_device_binding_problem"}, calls


def test_recorded_values_cannot_inject_markup_or_terminal_escapes() -> None:
    """Paths, user names and policy names in a report come from recorded traffic and configs."""
    request = RecordedRequest(place="x.har:entry 1", correlation_id="c", time=datetime(2026, 1, 1, tzinfo=UTC),
                              method="GET", host="mail.contoso.test", target="/owa/<script>alert(1)</script>\x1b[2J",
                              query_recorded=True, client_ip=None)
    item = Replayed(request=request,
                    baseline=DecisionSummary(result=DecisionResult.allow, status_code=200, reason="allowed"),
                    candidate=DecisionSummary(result=DecisionResult.block, status_code=403, reason="<b>no</b>",
                                              policy_id="p<i>", policy_name="<img src=x onerror=alert(1)>"),
                    user="<u>\x1b]0;title\x07", app="a", current_inventory=False, unverified_token=False)
    report = ReplayReport(baseline="b", candidate="c", sources=("s",), replayed=(item,), skipped=(), never_matched=(),
                          notes=())
    page = as_html(report)
    assert "<script>" not in page and "<img" not in page and "<b>no" not in page and "<u>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;img src=x" in page
    text = as_text(report)
    assert "\x1b" not in text and "\x07" not in text and "/owa/<script>" in text
    hostile = "\x1b]0;PWNED\x07\x1b[2J\nforged: line"
    report = replace(report, sources=(f"s{hostile}",), skipped=(Skipped(f"x.mitm:flow 1{hostile}", hostile),),
                     never_matched=(("p", f"P{hostile}", "enabled"),), notes=(hostile,))
    text = as_text(report)
    assert "\x1b" not in text and "\x07" not in text
    assert not any(line.startswith("forged") for line in text.splitlines())  # a break forges no line
    assert "  1: ?]0;PWNED??[2J?forged: line (x.mitm:flow 1?]0;PWNED??[2J?forged: line)" in text.splitlines()
    assert replay_report.printable is terminal.printable  # one definition of what reaches a terminal


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
    requested: list[str] = []

    def only_the_report(route: Any) -> None:  # playwright's Route
        requested.append(route.request.url)
        route.continue_() if route.request.url == report.as_uri() else route.abort()

    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        context = browser.new_context(viewport={"width": 1180, "height": 900})
        context.route("**/*", only_the_report)  # every request the page makes, whatever its scheme
        page = context.new_page()
        page.on("request", lambda request: requested.append(request.url))
        page.goto(report.as_uri(), wait_until="networkidle")
        page.mouse.move(600, 400)  # hover styles and the like load nothing either
        page.emulate_media(media="print")
        page.wait_for_load_state("networkidle")
        assert set(requested) == {report.as_uri()}, requested  # the report itself, and no other request at all
        page.emulate_media(media="screen")
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


def _record_to(path: Path | str) -> None:
    """Start recording to ``path`` as ``portcullis run --record`` does (mitmproxy's option error
    is what the command prints as ``portcullis: ...``)."""
    from addons.recorded_flows import FlowRecording

    recorder = FlowRecording()
    with addon_context(recorder) as context:
        context.configure(recorder, save_stream_file=str(path))
        recorder.done()


def test_recording_never_follows_a_symbolic_link(tmp_path: Path) -> None:
    from mitmproxy import exceptions

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    link = tmp_path / "link.flows"
    link.symlink_to(victim)
    for spec in (str(link), f"+{link}"):  # overwriting and appending
        with pytest.raises(exceptions.OptionsError, match=f"cannot record to {link}: it is a symbolic link"):
            _record_to(spec)
    assert victim.read_text() == "precious" and link.is_symlink()


def test_recording_refuses_an_existing_file_others_may_read_or_own(tmp_path: Path) -> None:
    from mitmproxy import exceptions

    shared = tmp_path / "shared.flows"
    shared.write_text("theirs")
    shared.chmod(0o644)
    with pytest.raises(exceptions.OptionsError, match="its mode 0644 lets others read or write it"):
        _record_to(shared)
    assert shared.read_text() == "theirs" and stat.S_IMODE(shared.stat().st_mode) == 0o644
    private = tmp_path / "private.flows"
    private.write_text("mine")
    private.chmod(0o600)
    _record_to(private)  # an existing private file of this user is overwritten
    assert private.read_bytes() == b""
    fresh = tmp_path / "new" / "fresh.flows"
    _record_to(fresh)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user (uid 65534)")
def test_recording_refuses_an_existing_file_of_another_user(tmp_path: Path) -> None:
    from mitmproxy import exceptions

    planted = tmp_path / "planted.flows"
    planted.write_text("")
    planted.chmod(0o600)
    os.chown(planted, 65534, 65534)
    with pytest.raises(exceptions.OptionsError, match="it is owned by uid 65534, not by this user"):
        _record_to(planted)
    assert planted.stat().st_uid == 65534 and planted.stat().st_size == 0
