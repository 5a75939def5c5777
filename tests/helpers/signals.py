"""Device-signal test helpers: a settable clock, a second connection to the device store, and
``portcullis devices`` as an operator runs it."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from gateway.app import bootstrap
from gateway.app.demo import ALEX_IPHONE
from gateway.decision.service import utc_now
from gateway.policy.model import DeviceThreatLevel
from gateway.signals.sqlite_store import SqliteDeviceStore

PORTCULLIS = str(Path(sys.executable).with_name("portcullis"))


@contextlib.contextmanager
def second_connection(config_dir: Path) -> Iterator[SqliteDeviceStore]:
    """A second connection to a gateway's inventory, as the CLI or another worker has; Alex's
    iPhone is back at low risk afterwards."""
    config = bootstrap.load(config_dir).config
    other = SqliteDeviceStore(config.path(config.gateway_file.device_signals.database))  # type: ignore[arg-type]
    try:
        yield other
    finally:
        other.set_threat_level(ALEX_IPHONE, "lookout", DeviceThreatLevel.low, now=utc_now())
        other.close()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def devices_cli(config: Path, command: str = "devices") -> Callable[..., subprocess.CompletedProcess[str]]:
    """``portcullis devices --config CONFIG ...`` (or ``command``: ``apps``) as a subprocess, as an
    operator runs it."""
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PORTCULLIS, command, "--config", str(config), *args], capture_output=True,
                              text=True, timeout=60)

    return cli
