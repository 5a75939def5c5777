"""The decision log explains every decision (signals with value, source and age; per-policy
verdicts), never blocks the request path, rotates by size, pseudonymises users when asked, and
``portcullis why`` tells one decision as a trace."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from gateway.app import bootstrap
from gateway.app.demo import DREW_IPHONE, EXCHANGE, OUTLOOK_MOBILE, SHAREPOINT, activesync
from gateway.decision.log import DecisionLog, Pseudonymizer, find_record, log_files
from gateway.ops.metrics import GatewayMetrics
from tests.conftest import Background, Gateway, Ports
from tests.helpers.decision_log import listener, logged, own_config
from tests.helpers.kiosk import kiosk_browser

MAIL, DOCS = "mail.contoso.test", "docs.contoso.test"
PORTCULLIS = str(Path(sys.executable).with_name("portcullis"))


def drew_syncs(gateway: Gateway, port: int | None = None) -> str:
    """Drew's iPhone (MTD: high) asks for mail; returns the correlation id of the 403."""
    token = gateway.idp.mint(user="drew@contoso.test", client_id=OUTLOOK_MOBILE, audience=EXCHANGE,
                             device_id=DREW_IPHONE, extra={"groups": ["sales"], "amr": ["pwd"]})
    response = gateway.request(MAIL, activesync(DREW_IPHONE, "drew"), method="POST", token=token, port=port)
    assert response.status_code == 403
    return response.headers["x-portcullis-correlation-id"]


def test_each_signal_is_logged_with_its_value_source_and_age(gateway: Gateway, tmp_path: Path,
                                                              demo_ports: Ports) -> None:
    config_dir = own_config(tmp_path, gateway, demo_ports)
    yaml = YAML()
    devices = yaml.load(config_dir / "devices.yaml")
    drew = next(d for d in devices["devices"] if d["azureADDeviceId"] == DREW_IPHONE)
    reported = datetime.now(UTC) - timedelta(seconds=240)
    drew["threatReportedDateTime"] = reported.isoformat().replace("+00:00", "Z")
    drew["lastSyncDateTime"] = (reported - timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    yaml.dump(devices, config_dir / "devices.yaml")
    with Background(lambda: listener(config_dir)) as (port, log_path):
        record = logged(log_path, drew_syncs(gateway, port))
    signals = {s["name"]: s for s in record["signals"]}
    assert signals["threatLevel"]["value"] == "high"
    assert signals["threatLevel"]["source"] == "demo-mtd"
    assert 238 <= signals["threatLevel"]["ageSeconds"] <= 300
    assert signals["complianceState"] == {"name": "complianceState", "value": "compliant", "source": "sqlite",
                                          "ageSeconds": signals["complianceState"]["ageSeconds"]}
    assert 3838 <= signals["complianceState"]["ageSeconds"] <= 3900
    assert signals["identity"]["source"] == "accessToken" and signals["identity"]["ageSeconds"] <= 60
    assert signals["clientApp"]["value"] == "outlook-mobile"
    assert signals["location"] == {"name": "location", "value": "none", "source": "client address 127.0.0.1",
                                   "ageSeconds": 0}
    failing = next(p for p in record["appliedConditionalAccessPolicies"] if p["result"] == "failure")
    assert failing["id"] == "exchange-outlook-only"
    assert failing["failedControls"][0]["control"] == "maxDeviceThreatLevel"
    not_applied = next(p for p in record["appliedConditionalAccessPolicies"] if p["id"] == "owa-compliant-device")
    assert not_applied["notAppliedBecause"] == "resource 'exchange-activesync' is not included"
    given = record["evaluationInput"]
    assert given["groups"] == ["sales"] and given["authenticationMethods"] == ["pwd"]
    assert given["device"]["threatLevel"] == "high" and given["device"]["azureADDeviceId"] == DREW_IPHONE


def test_why_prints_the_trace_of_a_logged_decision(gateway: Gateway) -> None:
    correlation_id = drew_syncs(gateway)
    gateway.decision(correlation_id)  # written
    result = subprocess.run([PORTCULLIS, "why", "--config", str(gateway.config_dir), correlation_id],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    trace = result.stdout
    assert f"Decision {correlation_id}" in trace
    assert "result:   block (HTTP 403, error 53004)" in trace
    assert "threatLevel=high source=demo-mtd" in trace
    assert "[x] exchange-outlook-only: failure - maxDeviceThreatLevel: device risk high, allowed: low" in trace
    assert "[-] owa-compliant-device: notApplied - resource 'exchange-activesync' is not included" in trace
    missing = subprocess.run([PORTCULLIS, "why", "--config", str(gateway.config_dir), "no-such-id"],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "no decision 'no-such-id'" in missing.stderr


def test_users_are_pseudonymised_with_a_keyed_hash_when_configured(gateway: Gateway, tmp_path: Path,
                                                                   demo_ports: Ports) -> None:
    config_dir = own_config(tmp_path, gateway, demo_ports, pseudonymizeUsers=True)
    with Background(lambda: listener(config_dir)) as (port, log_path):
        first = logged(log_path, drew_syncs(gateway, port))
        second = logged(log_path, drew_syncs(gateway, port))
    key = (tmp_path / ".portcullis" / "pseudonym.key").read_bytes().strip()
    expected = "pseudonym:" + hmac.new(key, b"drew@contoso.test", hashlib.sha256).hexdigest()[:24]
    assert first["userPrincipalName"] == second["userPrincipalName"] == expected
    assert first["evaluationInput"]["device"]["userPrincipalName"] == expected
    assert first["userId"].startswith("pseudonym:") and first["evaluationInput"]["subject"].startswith("pseudonym:")
    text = log_path.read_text()
    assert "drew@contoso.test" not in text
    assert "Drew" not in text and "ApplF17DREW001" not in text  # device names carry the user's name
    assert first["deviceDetail"]["displayName"].startswith("pseudonym:")
    assert first["evaluationInput"]["device"]["deviceName"].startswith("pseudonym:")
    assert first["evaluationInput"]["groups"] == ["sales"]  # groups are not personal: replay still matches them
    assert log_path.stat().st_mode & 0o007 == 0  # not readable by other users


def test_records_are_never_lost_silently_when_the_disk_is_slow(tmp_path: Path) -> None:
    metrics = GatewayMetrics()
    log = DecisionLog(tmp_path / "decisions.jsonl", queue_size=1, on_drop=metrics.log_dropped.inc)
    disk = threading.Event()
    write = log._handler.write_lines
    log._handler.write_lines = lambda lines: disk.wait(10) and write(lines)  # type: ignore[method-assign]  # stalled disk
    started = time.monotonic()
    for number in range(10):
        log.write({"correlationId": f"c{number}"})
    assert time.monotonic() - started < 1  # the request path never waited for the disk
    time.sleep(0.1)
    assert log.dropped >= 8  # at most one being written and one waiting: the rest dropped
    assert metrics.log_dropped._value.get() == log.dropped
    disk.set()
    log.close()
    written = (tmp_path / "decisions.jsonl").read_text().splitlines()
    assert len(written) == 10 - log.dropped
    assert [r["correlationId"] for r in log.recent()][-1] == "c0"  # every record stays visible in memory


def test_a_record_that_cannot_be_written_is_counted_and_costs_only_itself(tmp_path: Path) -> None:
    metrics = GatewayMetrics()
    log = DecisionLog(tmp_path / "decisions.jsonl", on_error=metrics.log_errors.inc)
    log.write({"correlationId": "before"})
    log.write({"correlationId": "broken", "value": object()})  # no JSON for it
    log.write({"correlationId": "after"})
    log.close()
    written = [json.loads(line)["correlationId"]
               for line in (tmp_path / "decisions.jsonl").read_text(encoding="utf-8").split("\n") if line]
    assert written == ["before", "after"] and metrics.log_errors._value.get() == 1


def test_any_text_a_client_sends_stays_on_its_line_and_is_found(tmp_path: Path) -> None:
    """Each record is one line however its strings are spelled (a User-Agent is the client's):
    non-ASCII as UTF-8, U+2028 and U+2029 (JavaScript's line breaks), control characters escaped."""
    path = tmp_path / "decisions.jsonl"
    log = DecisionLog(path, keep_recent=1)
    spelled = {"userPrincipalName": "zoë@contoso.test", "userAgent": "a\u2028b\u2029c\r\nd\x00e\x1bf"}
    log.write({"correlationId": "spelled", **spelled})
    log.write({"correlationId": "next"})
    log.close()
    lines = path.read_bytes().split(b"\n")
    assert len(lines) == 3 and lines[2] == b""  # two records, two lines
    assert json.loads(lines[0]) == {"correlationId": "spelled", **spelled}
    found = find_record(log_files(path), "spelled")
    assert found is not None and found["userAgent"] == spelled["userAgent"]


def test_the_log_rotates_by_size_and_old_records_stay_findable(tmp_path: Path) -> None:
    path = tmp_path / "decisions.jsonl"
    log = DecisionLog(path, max_bytes=4096, keep_files=3, keep_recent=1)
    for number in range(200):
        log.write({"correlationId": f"c{number:03d}", "padding": "x" * 100})
    log.flush()
    files = log_files(path)
    assert [f.name for f in files] == ["decisions.jsonl", "decisions.jsonl.1", "decisions.jsonl.2",
                                       "decisions.jsonl.3"]
    assert all(f.stat().st_size <= 4096 for f in files)
    oldest_kept = json.loads(files[-1].read_text().splitlines()[0])["correlationId"]
    assert log.find(oldest_kept) is not None  # from a rotated file, not from memory
    assert log.find("c000") is None  # beyond the retention count
    log.close()


@pytest.mark.parametrize("in_memory", [True, False], ids=["from memory", "from the files"])
def test_a_request_is_found_by_its_own_record_not_a_redecision_written_after_it(tmp_path: Path,
                                                                                  in_memory: bool) -> None:
    """A streamed answer's record is written when it starts; continuous access evaluation may decide
    the request again later, while it is open. ``why`` and the admin API show the request's own."""
    log = DecisionLog(tmp_path / "d.jsonl", keep_recent=100 if in_memory else 1)
    log.write({"correlationId": "open", "result": "block", "continuousAccessEvaluation": True})  # before its own
    log.write({"correlationId": "streamed", "result": "allow", "httpStatus": 200})
    log.write({"correlationId": "streamed", "result": "block", "httpStatus": None, "continuousAccessEvaluation": True})
    log.write({"correlationId": "other", "result": "allow"})
    found = log.find("streamed")
    open_one = log.find("open")  # still open: only its re-decision is there
    log.close()
    assert found is not None and found["result"] == "allow"
    assert open_one is not None and open_one["continuousAccessEvaluation"] is True


def test_pseudonyms_are_stable_and_keyed() -> None:
    one, other = Pseudonymizer(b"k" * 32), Pseudonymizer(b"j" * 32)
    assert one.pseudonym("Drew@Contoso.test") == one.pseudonym("drew@contoso.test")
    assert one.pseudonym("drew@contoso.test") != other.pseudonym("drew@contoso.test")
    assert one.pseudonym(one.pseudonym("drew@contoso.test")) == one.pseudonym("drew@contoso.test")


def test_the_log_takes_records_from_the_event_loop_and_from_threads(tmp_path: Path) -> None:
    """The log is written from the proxy's event loop and from worker threads alike."""
    log = DecisionLog(tmp_path / "d.jsonl")

    async def from_the_loop() -> None:
        log.write({"correlationId": "loop"})

    asyncio.run(from_the_loop())
    writer = threading.Thread(target=lambda: log.write({"correlationId": "thread"}))
    writer.start()
    writer.join()
    log.close()
    assert sorted(json.loads(line)["correlationId"] for line in (tmp_path / "d.jsonl").read_text().splitlines()) == \
        ["loop", "thread"]


@pytest.mark.parametrize(("url", "token", "status", "shown"), [
    pytest.param(f"https://{MAIL}/owa/", True, 200, "[+] kiosks-read-only-browser: success", id="allowed"),
    pytest.param(f"https://{MAIL}/owa/", False, 302, "reason:   sign-in required", id="sent to sign in"),
    pytest.param(f"https://{DOCS}/_layouts/15/download.aspx", True, 403,
                 "reason:   downloads are blocked in this session [restriction: blockDownloads]",
                 id="a download refused by blockDownloads"),
])
def test_why_shows_the_kiosk_location_a_kiosk_request_was_decided_in(gateway: Gateway, url: str, token: bool,
                                                                      status: int, shown: str) -> None:
    """Policy put the request in the ``kiosk`` location (the demo's kiosk policy applied); the
    trace must say so, not ``location=none`` from the client address alone."""
    audience = SHAREPOINT if DOCS in url else EXCHANGE
    minted = gateway.idp.mint(user="alex@contoso.test", client_id=OUTLOOK_MOBILE, audience=audience)
    with kiosk_browser(gateway) as kiosk:
        response = kiosk.get(url, headers={"Authorization": f"Bearer {minted}"} if token else {})
    assert response.status_code == status
    correlation_id = response.headers["x-portcullis-correlation-id"]
    gateway.decision(correlation_id)  # written
    result = subprocess.run([PORTCULLIS, "why", "--config", str(gateway.config_dir), correlation_id],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "via the kiosk listener" in result.stdout
    assert "location=kiosk source=client address 127.0.0.1 through the kiosk proxy" in result.stdout
    assert shown in result.stdout


def test_why_never_prints_a_client_s_terminal_escapes(gateway: Gateway) -> None:
    """The path, User-Agent and names in a record come from the client: `why` shows them inert."""
    context = ssl.create_default_context()
    gateway.ca.configure_trust(context)
    hostile = b"GET /owa/\x1b]0;PWNED\x07\x1b[2J HTTP/1.1\r\nHost: mail.contoso.test\r\n" \
              b"User-Agent: \xe2\x80\xaeevil\x1b[31m\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=MAIL) as tls:
        tls.sendall(hostile)
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    correlation_id = next(line.split(b": ", 1)[1].decode() for line in answer.split(b"\r\n")
                          if line.lower().startswith(b"x-portcullis-correlation-id"))
    record = gateway.decision(correlation_id)
    assert "\x1b" in record["request"]["path"]  # logged as sent (JSON escapes it in the file)
    result = subprocess.run([PORTCULLIS, "why", "--config", str(gateway.config_dir), correlation_id],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "/owa/?]0;PWNED??[2J" in result.stdout
    assert not any(c in result.stdout for c in "\x1b\x07\u202e")


def test_a_state_key_too_short_to_be_a_key_is_refused(tmp_path: Path, gateway: Gateway, demo_ports: Ports) -> None:
    config_dir = own_config(tmp_path, gateway, demo_ports, pseudonymizeUsers=True)
    key = tmp_path / ".portcullis" / "pseudonym.key"
    key.parent.mkdir(parents=True, exist_ok=True)
    key.write_bytes(b"")  # left behind by a crash, or emptied by hand
    loaded = bootstrap.load(config_dir)
    with pytest.raises(ValueError, match="fewer than a key needs"):
        bootstrap.build_service(loaded)
    key.unlink()
    service, _ = bootstrap.build_service(loaded)  # a new key is made
    service.close()
    assert len(key.read_bytes().strip()) >= 16 and oct(key.stat().st_mode & 0o777) == "0o600"
