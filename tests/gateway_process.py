"""A ``portcullis run`` in a subprocess of its own, as an operator starts it: for workers,
signals and several gateways sharing state."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ruamel.yaml import YAML

from tests.conftest import REPO, Gateway, Ports, demo_config_copy, free_port, write_trustme_certificate

PORTCULLIS = str(REPO / ".venv" / "bin" / "portcullis") if (REPO / ".venv" / "bin" / "portcullis").exists() \
    else shutil.which("portcullis") or "portcullis"


def sibling_config(directory: Path, gateway: Gateway, demo_ports: Ports, **changes: object) -> Path:
    """A config for a gateway of its own (own port, state and logs) in front of the session
    gateway's issuer and backends. ``changes`` are set at the top of portcullis.yaml."""
    ports = Ports(free_port(), demo_ports.idp, demo_ports.mail, demo_ports.docs, free_port(), free_port())
    while len({ports.gateway, ports.kiosk, *range(ports.admin, ports.admin + 4)}) < 6:  # workers use admin + i
        ports = Ports(free_port(), demo_ports.idp, demo_ports.mail, demo_ports.docs, free_port(), free_port())
    config_dir = demo_config_copy(directory, ports)
    write_trustme_certificate(gateway.ca, config_dir)
    yaml = YAML()
    path = config_dir / "portcullis.yaml"
    data = yaml.load(path)
    for key, value in changes.items():
        data[key] = value
    yaml.dump(data, path)
    return config_dir


class GatewayProcess:
    """``portcullis run`` with its log lines collected as they come."""

    def __init__(self, config_dir: Path, *arguments: str, env: dict[str, str] | None = None) -> None:
        self.config_dir = config_dir
        environment = {**os.environ, **(env or {})}  # conftest put the demo partner's secret there
        self.process = subprocess.Popen([PORTCULLIS, "run", "--config", str(config_dir), *arguments],
                                        cwd=config_dir.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True, env=environment)
        self.log: list[str] = []
        assert self.process.stderr is not None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in iter(self.process.stderr.readline, ""):
            self.log.append(line)

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 60) -> list[re.Match[str]]:
        """The first ``count`` log lines matching ``pattern``, waiting for them."""
        deadline = time.monotonic() + timeout
        while True:
            found = [m for line in list(self.log) if (m := re.search(pattern, line))]
            if len(found) >= count:
                return found[:count]
            if self.process.poll() is not None and len(found) < count:
                time.sleep(0.2)  # let the reader catch the last lines
                raise AssertionError(f"exited with {self.process.returncode} before {pattern!r}:\n{self.text}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.text}")
            time.sleep(0.05)

    def wait_until(self, condition: Callable[[], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, self.text
            time.sleep(0.05)

    @property
    def text(self) -> str:
        return "".join(self.log)

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
