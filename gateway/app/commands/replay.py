"""``portcullis replay --config CANDIDATE [--baseline DIR] [--html REPORT] SOURCE...``

SOURCE is a mitmproxy flow file (``portcullis run --record``), a HAR file or a decision log (with
its rotated files); the kind is read from the file. Without ``--baseline`` the baseline is what
the running gateway decided, as its decision log recorded it.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from gateway.app import bootstrap
from gateway.config import Config, load_config
from gateway.decision.log import Pseudonymizer
from gateway.ops.whatif import DEFAULT_IP
from gateway.replay.engine import Side, replay
from gateway.replay.html import as_html
from gateway.replay.recorded import (
    RecordedRequest,
    Skipped,
    decision_log_files,
    pair,
    read_decision_log,
    read_har,
    source_kind,
)
from gateway.replay.report import ReplayReport, as_text, never_matched, notes
from gateway.terminal import printable

PSEUDONYM_KEY_FILE = "pseudonym.key"  # in the state directory, as ``bootstrap.pseudonym_key`` makes it
RECORDED_BASELINE = "the decisions recorded in the decision log (what the running gateway decided)"


def add_parser(commands: Any) -> None:
    """``commands`` is ``portcullis``'s ``add_subparsers()`` (argparse gives its type no public name)."""
    parser = commands.add_parser("replay", help="replay recorded traffic under a candidate config; print the diff")
    parser.add_argument("--config", type=Path, required=True, metavar="DIR", help="the candidate config directory")
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="evaluate the baseline under this config directory too (default: the decisions "
                             "recorded in the decision log SOURCEs)")
    parser.add_argument("--html", type=Path, metavar="REPORT", help="also write a self-contained HTML report")
    parser.add_argument("--examples", type=_positive, default=3, metavar="N",
                        help="example requests shown per policy under each kind of flip and for 'still blocked, "
                             "another reason', places shown per skip reason (default 3)")
    parser.add_argument("--client-ip", type=_ip_address, default=DEFAULT_IP, metavar="IP",
                        help=f"client address for requests whose recording has none (HAR; default {DEFAULT_IP})")
    parser.add_argument("sources", type=Path, nargs="+", metavar="SOURCE",
                        help="a mitmproxy flow file, a HAR file or a decision log")
    parser.set_defaults(command=run)


def run(args: argparse.Namespace) -> int:
    loaded = bootstrap.load(args.config)
    baseline_config = load_config(args.baseline) if args.baseline else None
    requests, skipped = read_sources(args.sources)
    pseudonymizer = None
    if any(request.pseudonymized for request in requests):
        pseudonymizer = available_pseudonymizer([c for c in (loaded.config, baseline_config) if c is not None])
    candidate = Side.of(str(args.config), loaded.config, pseudonymizer)
    baseline = Side.of(str(args.baseline), baseline_config, pseudonymizer) if baseline_config else None
    with tqdm(total=len(requests), desc="replay", unit="req", file=sys.stderr,
              disable=not sys.stderr.isatty()) as progress:
        replayed, more = asyncio.run(replay(requests, baseline=baseline, candidate=candidate,
                                            inventory=loaded.inventory, default_ip=args.client_ip,
                                            advance=progress.update))
    report = ReplayReport(
        baseline=f"{args.baseline} (re-evaluated)" if args.baseline else RECORDED_BASELINE,
        candidate=str(args.config), sources=tuple(str(s) for s in args.sources), replayed=tuple(replayed),
        skipped=tuple([*skipped, *more]), never_matched=never_matched(loaded.config, replayed),
        notes=notes(replayed, args.client_ip, pseudonymizer is not None), examples=args.examples)
    print(as_text(report))
    if args.html:
        args.html.write_text(as_html(report), encoding="utf-8")
        print("\n" + printable(f"HTML report: {args.html}"))
    if not replayed:
        print("portcullis: nothing was replayed: every recorded request was skipped (see why above)", file=sys.stderr)
        return 1
    return 0


def read_sources(paths: Sequence[Path]) -> tuple[list[RecordedRequest], list[Skipped]]:
    """Every source, each file once, paired by correlation id."""
    items: list[RecordedRequest | Skipped] = []
    read: set[Path] = set()
    for path in paths:
        kind = source_kind(path)
        if kind == "flows":
            from addons.recorded_flows import read_flow_file  # the core never imports mitmproxy

            items += read_flow_file(path)
        elif kind == "har":
            items += read_har(path)
        else:
            for file in decision_log_files(path):
                if file.resolve() not in read:
                    read.add(file.resolve())
                    items += read_decision_log(file)
    return pair(items)


def available_pseudonymizer(configs: Sequence[Config]) -> Pseudonymizer | None:
    """The decision log's pseudonym key, if this machine has it (never made here)."""
    for config in configs:
        env = config.gateway_file.decision_log.pseudonym_key_env
        state_file = config.path(config.gateway_file.gateway.state_dir) / PSEUDONYM_KEY_FILE
        if (env and os.environ.get(env)) or (not env and state_file.is_file()):
            return Pseudonymizer(bootstrap.pseudonym_key(config, os.environ))
    return None


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return int(text)


def _ip_address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None
