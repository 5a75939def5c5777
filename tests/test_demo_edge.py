"""``portcullis demo --edge nginx|caddy`` as a user runs it: a real process that starts the edge
in front of the demo backends, prints the requests to try through it, and stops the edge when it
stops. Each printed curl command is pasted into a shell and must behave as printed."""

from __future__ import annotations

import dataclasses
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
from ruamel.yaml import YAML

from gateway.app.demo import SCENARIOS
from gateway.app.edges import EDGES
from tests.conftest import Ports, demo_config_copy, free_port
from tests.helpers.caddy import needs_caddy
from tests.helpers.nginx import needs_nginx

PORTCULLIS = str(Path(sys.executable).with_name("portcullis"))
pytestmark = [pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (.ci/run installs it)"),
              pytest.mark.slow]  # the demo in a process of its own


def _lines_until(process: subprocess.Popen[str], marker: str, timeout: float = 60) -> list[str]:
    """What the demo printed, up to the line starting with ``marker``."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while time.monotonic() < deadline and (line := process.stdout.readline()):
        lines.append(line.rstrip("\n"))
        if line.startswith(marker):
            return lines
    raise AssertionError(f"the demo did not print {marker!r}:\n" + "\n".join(lines))


def _shell(command: str, cwd: Path) -> str:
    return subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "NO_PROXY": "*"}).stdout


@pytest.mark.parametrize("edge", [pytest.param("nginx", marks=needs_nginx), pytest.param("caddy", marks=needs_caddy)])
def test_each_request_printed_for_the_edge_behaves_as_printed_and_the_edge_stops_with_the_demo(
        tmp_path: Path, edge: str) -> None:
    config_dir = demo_config_copy(tmp_path, Ports.fresh())
    port = free_port()
    process = subprocess.Popen([PORTCULLIS, "demo", "--config", str(config_dir), "--edge", edge,
                                "--edge-port", str(port)], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        lines = _lines_until(process, f"# Ctrl-C stops the demo and {edge}.")
        printed = lines[next(i for i, line in enumerate(lines) if line.startswith(f"# {edge} is up")):]
        blocks = [(printed[i], printed[i + 1]) for i, line in enumerate(printed) if line.startswith("#    expect:")]
        assert len(blocks) == len(SCENARIOS)
        statuses = set()
        for expectation, command in blocks:
            assert f"http://mail.contoso.test:{port}/" in command or f"http://docs.contoso.test:{port}/" in command
            status, text = re.match(r"#    expect: (\d+)(?: and (.*))?$", expectation).groups()  # type: ignore[union-attr]
            output = _shell(command, tmp_path)
            assert output.split("\r\n", 1)[0].split(" ")[1] == status, (command[:80], output[:300])
            assert text is None or text in output.replace('": "', '":"'), (expectation, output[-400:])
            statuses.add(status)
        assert {"200", "401", "403"} <= statuses  # allowed and blocked requests, through the edge
        reload = lines[next(i for i, line in enumerate(lines) if line.startswith("# Reload the config")) + 1]
        assert '"applied":true' in _shell(reload, tmp_path).replace(" ", "")  # the edge's listener is kept
        allowed = _shell(blocks[0][1], tmp_path)
        assert allowed.startswith("HTTP/1.1 200"), allowed[:300]
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    assert process.returncode == 0
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass  # the edge stopped with the demo


def test_a_missing_edge_is_named_with_its_package() -> None:
    """An edge binary found neither on PATH nor where Debian puts it: the demo says which package to install."""
    missing = dataclasses.replace(EDGES["caddy"], name="caddy-not-on-this-machine", candidates=("/nonexistent/caddy",))
    with pytest.raises(RuntimeError, match=r"^caddy-not-on-this-machine is not installed: apt-get install caddy$"):
        missing.binary()


@needs_nginx
def test_an_edge_port_in_use_stops_the_demo_with_one_clear_line(tmp_path: Path) -> None:
    """Another program on the edge's port: the demo says so and exits, rather than serve with an
    edge that failed to bind (the other program would answer on its port)."""
    config_dir = demo_config_copy(tmp_path, Ports.fresh())
    taken = free_port()
    with socket.create_server(("127.0.0.1", taken)):
        result = subprocess.run([PORTCULLIS, "demo", "--config", str(config_dir), "--edge", "nginx",
                                 "--edge-port", str(taken)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"portcullis: nginx cannot listen on 127.0.0.1:{taken}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


@needs_caddy
def test_a_forward_auth_listener_over_tls_is_refused_with_a_clear_line(tmp_path: Path) -> None:
    """The demo's edge asks over plain HTTP: a config whose listener wants TLS is refused, not served
    with an edge whose every question fails."""
    config_dir = demo_config_copy(tmp_path, Ports.fresh())
    yaml = YAML()
    data = yaml.load(config_dir / "portcullis.yaml")
    data["forwardAuth"] = {"listen": {"host": "127.0.0.1", "port": free_port()},
                           "tls": {"certificateFile": "../certs/forward-auth.pem"}}
    yaml.dump(data, config_dir / "portcullis.yaml")
    result = subprocess.run([PORTCULLIS, "demo", "--config", str(config_dir), "--edge", "caddy"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "portcullis: demo --edge asks the forward-auth listener over plain HTTP" in result.stderr
    assert "Traceback" not in result.stderr
