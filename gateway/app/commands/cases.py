"""``portcullis test --config DIR CASES.yaml``: run policy test cases (through the pipeline, as What
If does); exit 1 if any fails or there are none."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from gateway.app import bootstrap
from gateway.decision.service import utc_now
from gateway.ops.cases import load_cases, run_cases
from gateway.ops.whatif import WhatIf


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    test = commands.add_parser("test", help="run policy test cases against a config")
    test.add_argument("--config", type=Path, required=True, help="config directory")
    test.add_argument("cases", type=Path, help="YAML file of cases")
    test.set_defaults(command=_test)


def _test(args: argparse.Namespace) -> int:
    return run_case_file(bootstrap.load(args.config), args.cases)


def run_case_file(loaded: bootstrap.Loaded, cases_file: Path) -> int:
    cases = load_cases(cases_file)
    whatif = WhatIf(loaded.config, loaded.inventory, loaded.whatif_app_protection)
    outcomes = asyncio.run(run_cases(whatif, cases, utc_now()))
    for outcome in outcomes:
        print(f"{'PASS' if outcome.passed else 'FAIL'}: {outcome.name}")
        for difference in outcome.differences:
            print(f"    {difference}")
    failed = sum(not o.passed for o in outcomes)
    print(f"{cases_file}: {len(outcomes) - failed} of {len(outcomes)} cases passed")
    return 1 if failed or not outcomes else 0
