"""Gateways whose config a test edits and reloads, and waiting for the reload to land."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

from gateway.ops.operations import Operations
from gateway.routing import BROWSER_ENDPOINTS
from gateway.web.browser_pages import browser_app
from tests.conftest import (
    Gateway,
    Ports,
    gateway_config,
    operations_for,
    proxy_for,
)

STRICT = "maxDeviceThreatLevel: secured"  # Alex's iPhone reports "low": blocked under these rules


def stricter(policies: str) -> str:
    """The demo policies with Exchange sync allowed only on "secured" devices (first occurrence:
    the exchange-outlook-only policy)."""
    assert "maxDeviceThreatLevel: low" in policies
    return policies.replace("maxDeviceThreatLevel: low", STRICT, 1)


def save(path: Path, text: str) -> None:
    """Replace a config file in one step, as editors and config management do (write, rename):
    the watcher never sees it half-written."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    temporary.replace(path)


def own_config(tmp_path: Path, gateway: Gateway, demo_ports: Ports, *, keep_cases: bool = False) -> Path:
    config_dir = gateway_config(tmp_path, gateway.ca, Ports(0, demo_ports.idp, demo_ports.mail, demo_ports.docs))
    if not keep_cases:
        (config_dir / "cases.yaml").unlink()  # the stricter rules break a demo case on purpose
    return config_dir


@contextlib.asynccontextmanager
async def reloading_gateway(config_dir: Path, *, fetch_keys: bool = True) -> AsyncIterator[tuple[int, Operations]]:
    """A listener of its own, with the browser sign-in endpoints, whose config directory is
    watched, as `portcullis run` does."""
    operations = await operations_for(config_dir, fetch_keys=fetch_keys)
    watcher = asyncio.create_task(operations.reloader.watch(interval=0.05, settle=0.05))
    try:
        async with proxy_for(operations.service, {BROWSER_ENDPOINTS: browser_app(operations.service)}) as port:
            yield port, operations
    finally:
        watcher.cancel()


def wait_for_reloads(operations: Operations, count: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while operations.service.metrics.reloads.labels("success", "fileWatch")._value.get() \
            + operations.service.metrics.reloads.labels("failure", "fileWatch")._value.get() < count:
        assert time.monotonic() < deadline, f"fewer than {count} reloads happened"
        time.sleep(0.02)
