"""``portcullis check --config DIR``: validate a config directory; list problems, warnings and
public resources; run its cases.yaml when there is one."""

from __future__ import annotations

import argparse
from pathlib import Path

from gateway.app import bootstrap
from gateway.app.commands.cases import run_case_file
from gateway.config import CASES_FILE
from gateway.config.files import missing_certificates
from gateway.config.lint import config_warnings, public_resources
from gateway.config.loader import raise_if


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    check = commands.add_parser("check", help="validate a config directory; list problems and warnings")
    check.add_argument("--config", type=Path, required=True, help="config directory")
    check.set_defaults(command=_check)


def _check(args: argparse.Namespace) -> int:
    loaded = bootstrap.load(args.config)
    config = loaded.config
    raise_if(missing_certificates(config, args.config))  # `run` would stop there
    print(f"{args.config}: OK: {len(config.gateway_file.protected_hosts)} protected hosts, "
          f"{len(config.resources)} resources, {len(config.policies)} policies, "
          f"{loaded.device_count()} devices in the inventory")
    public = public_resources(config)
    print(f"public resources (reachable without a token): {len(public)}")
    for line in public:
        print(f"  {line}")
    for warning in config_warnings(config):
        print(f"warning: {warning}")
    cases_file = args.config / CASES_FILE
    if cases_file.exists():
        return run_case_file(loaded, cases_file)
    print(f"no {CASES_FILE} in {args.config}: no policy tests ran")
    return 0
