"""A gateway started on its own config for the operations tests (health, drain, upstream failures)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from gateway.ops.operations import Operations
from tests.conftest import Gateway, Ports, gateway_config, operations_for, proxy_for


def own_config(tmp_path: Path, gateway: Gateway, ports: Ports) -> Path:
    return gateway_config(tmp_path, gateway.ca, ports)


@contextlib.asynccontextmanager
async def operated(config_dir: Path, *, fetch_keys: bool = True) -> AsyncIterator[tuple[int, Operations]]:
    operations = await operations_for(config_dir, fetch_keys=fetch_keys)
    async with proxy_for(operations.service) as port:
        yield port, operations
