"""``portcullis demo`` as a new user runs it: a real process whose printed curl commands are
pasted into a shell and must behave as printed."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.app.demo import CERTIFICATE_SCENARIOS, SCENARIOS
from tests.conftest import Ports, demo_config_copy

PORTCULLIS = str(Path(sys.executable).with_name("portcullis"))
pytestmark = [pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (.ci/run installs it)"),
              pytest.mark.slow]  # the demo in a process of its own


def _read_banner(process: subprocess.Popen[str], deadline: float) -> list[str]:
    assert process.stdout is not None
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.startswith("curl") and "/demo/token" in line:
            return lines
    raise AssertionError("the demo did not print its commands:\n" + "\n".join(lines))


def test_every_printed_curl_command_behaves_as_printed(tmp_path: Path) -> None:
    config_dir = demo_config_copy(tmp_path, Ports.fresh())
    process = subprocess.Popen([PORTCULLIS, "demo", "--config", str(config_dir)], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = _read_banner(process, time.monotonic() + 60)
        assert (tmp_path / "certs" / "gateway.pem").exists(), "the demo creates its certificates at first run"
        blocks = [(lines[i], lines[i + 1]) for i, line in enumerate(lines) if line.startswith("#    expect:")]
        assert len(blocks) == len(SCENARIOS) + len(CERTIFICATE_SCENARIOS)  # the shipped demo trusts its device CA
        assert sum("--cert" in command for _, command in blocks) == len(CERTIFICATE_SCENARIOS)
        for expectation, command in blocks:
            status, text = re.match(r"#    expect: (\d+)(?: and (.*))?$", expectation).groups()  # type: ignore[union-attr]
            output = _shell(command, tmp_path)
            assert output.split("\r\n", 1)[0].split(" ")[1] == status, (command[:80], output[:300])
            if text:
                assert text in output.replace('": "', '":"'), (expectation, output[-400:])
        assert '"access_token"' in _shell(lines[-1], tmp_path)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    assert process.returncode == 0


def _shell(command: str, cwd: Path) -> str:
    return subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "NO_PROXY": "*"}).stdout


@pytest.mark.parametrize(("listener", "what"), [("idp", "the demo"), ("admin", "the admin API")])
def test_demo_reports_a_port_in_use_clearly(tmp_path: Path, listener: str, what: str) -> None:
    """A port taken by another program stops the demo (or a gateway's admin API) with one clear line."""
    ports = Ports.fresh()
    config_dir = demo_config_copy(tmp_path, ports)
    taken = getattr(ports, listener)
    with socket.create_server(("127.0.0.1", taken)):
        result = subprocess.run([PORTCULLIS, "demo", "--config", str(config_dir)], cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"portcullis: {what} cannot listen on 127.0.0.1:{taken}" in result.stderr
    assert "Traceback" not in result.stderr
