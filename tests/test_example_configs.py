"""Every shipped config (the demo's and config/examples/*) with its cases.yaml, OPA-style: each
case by name through the library, and each directory through `portcullis check` for its exit code."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.app import bootstrap
from gateway.decision.service import utc_now
from gateway.ops.cases import Case, load_cases, run_cases
from gateway.ops.whatif import WhatIf
from tests.helpers.config import CONFIG_DIRS, shipped_config, unexpected_warnings

PORTCULLIS = str(Path(sys.executable).with_name("portcullis"))
EXPECTED_EXAMPLES = {"on-premises-mail", "personal-devices", "corporate-phones", "shared-tablets", "public-kiosk",
                     "report-only-trial", "byod-app-protection"}



def _cases() -> list[object]:
    return [pytest.param(directory, case, id=f"{directory.name}: {case.name}")
            for directory in CONFIG_DIRS for case in load_cases(directory / "cases.yaml")]


def test_every_scenario_ships_with_cases() -> None:
    assert {p.name for p in CONFIG_DIRS[1:]} == EXPECTED_EXAMPLES
    assert all((p / "cases.yaml").is_file() for p in CONFIG_DIRS)


@pytest.mark.parametrize(("directory", "case"), _cases())
def test_example_case(directory: Path, case: Case) -> None:
    loaded = bootstrap.load(directory)
    [outcome] = asyncio.run(run_cases(WhatIf(loaded.config, loaded.inventory, loaded.whatif_app_protection), [case],
                                      utc_now()))
    assert outcome.passed, "\n".join(outcome.differences)


@pytest.mark.parametrize("directory", CONFIG_DIRS, ids=lambda p: p.name)
@pytest.mark.slow
def test_check_passes_without_warnings(directory: Path, tmp_path: Path) -> None:
    copy = shipped_config(directory, tmp_path)  # with the certificate files the demo would make
    result = subprocess.run([PORTCULLIS, "check", "--config", str(copy)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert (unexpected_warnings(lines) if directory == CONFIG_DIRS[0] else [w for w in lines if "warning" in w]) == []
    assert "cases passed" in result.stdout
