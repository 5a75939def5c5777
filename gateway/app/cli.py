"""The ``portcullis`` command.

    portcullis demo   [--config DIR]   start the demo issuer, backends and gateway; print curl commands
    portcullis run     --config DIR [--workers N]   start the gateway on a config directory
    portcullis check   --config DIR    validate; list problems, warnings, public resources; run cases.yaml
    portcullis whatif  --config DIR --user U --url URL [--app A] [--device ID] [--ip IP] ... [--json]
    portcullis test    --config DIR CASES.yaml   run policy test cases; exit 1 if any fails
    portcullis replay  --config CANDIDATE [--baseline DIR] [--html REPORT] SOURCE...   diff recorded traffic
    portcullis why    [--config DIR] CORRELATION_ID [--json]   explain one logged decision
    portcullis devices --config DIR import FILE | export [--format csv] | list | show ID | set-risk ID LEVEL
                                    | remove ID...
    portcullis apps    --config DIR import FILE | list | show ID | remove ID...   app protection registrations
    portcullis certs  [--config DIR] init        create the CA and server certificates (kiosks trust the CA)
    portcullis import entra POLICIES.json --config DIR [--out FILE] [--dry-run]   Graph policies into policies.yaml
    portcullis export entra --config DIR [--out FILE]   policies.yaml as Graph conditionalAccessPolicy JSON

Exit codes: 0 ok, 1 config or start-up failure, 2 usage. Errors go to stderr as
``portcullis: <message>``, without a traceback unless ``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from gateway.app.commands import apps, cases, certs, check, devices, entra, replay, serve, whatif, why
from gateway.errors import ConfigError
from gateway.terminal import printable, printable_lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _configure_logging(args.debug)
    try:
        return int(args.command(args))
    except ConfigError as error:
        for problem in error.problems:
            print(printable(f"portcullis: {problem}"), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except Exception as error:  # one of the three edges: report, exit non-zero
        if args.debug:
            raise
        print(printable_lines(f"portcullis: {error}") if str(error) else f"portcullis: {type(error).__name__}",
              file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="portcullis", description="Conditional access gateway.")
    parser.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    serve.add_parsers(commands)  # demo, run
    for command in (check, whatif, devices, apps, why, certs, cases, replay, entra):
        command.add_parser(commands)
    return parser


QUIET_LIBRARIES = ("mitmproxy", "uvicorn", "httpx")  # their INFO lines are per-connection noise; the gateway's are not


def _configure_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not debug:
        for noisy in QUIET_LIBRARIES:
            logging.getLogger(noisy).setLevel(logging.WARNING)
