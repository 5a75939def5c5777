"""A gateway listener writing its own decision log, and reading one record back by correlation id."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from gateway.decision.log import find_record, log_files
from tests.conftest import Gateway, Ports, gateway_config, operations_for, proxy_for


@contextlib.asynccontextmanager
async def listener(config_dir: Path) -> AsyncIterator[tuple[int, Path]]:
    operations = await operations_for(config_dir)
    async with proxy_for(operations.service) as port:
        yield port, operations.service.decision_log.path


def own_config(tmp_path: Path, gateway: Gateway, demo_ports: Ports, **decision_log: Any) -> Path:
    config_dir = gateway_config(tmp_path, gateway.ca, Ports(0, demo_ports.idp, demo_ports.mail, demo_ports.docs))
    yaml = YAML()
    settings = yaml.load(config_dir / "portcullis.yaml")
    settings["decisionLog"].update(decision_log)
    yaml.dump(settings, config_dir / "portcullis.yaml")
    return config_dir


def logged(path: Path, correlation_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while (record := find_record(log_files(path), correlation_id)) is None:
        assert time.monotonic() < deadline, f"{correlation_id} never logged"
        time.sleep(0.01)
    return record
