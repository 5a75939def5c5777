"""``portcullis why [--config DIR] CORRELATION_ID [--json]``: explain one logged decision."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gateway.app.commands.common import DEFAULT_CONFIG
from gateway.config import load_config
from gateway.decision.log import find_record, log_files
from gateway.ops.explain import explain
from gateway.terminal import printable_lines


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    why = commands.add_parser("why", help="explain one logged decision by its correlation id")
    why.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="config directory (default: config)")
    why.add_argument("correlation_id", help="the correlation id (block pages and X-Portcullis-Correlation-Id show it)")
    why.add_argument("--json", action="store_true", help="print the logged record itself")
    why.set_defaults(command=_why)


def _why(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    log_path = config.path(config.gateway_file.decision_log.path)
    record = find_record(log_files(log_path), args.correlation_id.strip())
    if record is None:
        print(f"portcullis: no decision {args.correlation_id!r} in {log_path} or its rotated files", file=sys.stderr)
        return 1
    print(json.dumps(record, indent=2) if args.json else printable_lines(explain(record)))  # JSON escapes controls
    return 0
