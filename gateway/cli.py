"""The ``portcullis`` command.

    portcullis demo  [--config DIR]   start the demo issuer, backends and gateway; print curl commands
    portcullis run    --config DIR    start the gateway on a config directory
    portcullis check  --config DIR    validate a config directory; list every problem

Exit codes: 0 ok, 1 config or start-up failure, 2 usage. Errors go to stderr as
``portcullis: <message>``, without a traceback unless ``--debug``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway import bootstrap
from gateway.errors import ConfigError

DEFAULT_CONFIG = Path("config")
logger = logging.getLogger("portcullis")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _configure_logging(args.debug)
    try:
        return int(args.command(args))
    except ConfigError as error:
        for problem in error.problems:
            print(f"portcullis: {problem}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except Exception as error:  # noqa: BLE001  (one of the three edges: report, exit non-zero)
        if args.debug:
            raise
        print(f"portcullis: {error}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="portcullis", description="Conditional access gateway.")
    parser.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    demo = commands.add_parser("demo", help="run the embedded demo (issuer, backends, gateway)")
    demo.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="config directory (default: config)")
    demo.set_defaults(command=_demo)
    run = commands.add_parser("run", help="run the gateway on a config directory")
    run.add_argument("--config", type=Path, required=True, help="config directory")
    run.set_defaults(command=_run)
    check = commands.add_parser("check", help="validate a config directory and list every problem")
    check.add_argument("--config", type=Path, required=True, help="config directory")
    check.set_defaults(command=_check)
    return parser


def _configure_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not debug:
        for noisy in ("mitmproxy", "uvicorn", "httpx"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def _check(args: argparse.Namespace) -> int:
    loaded = bootstrap.load(args.config)
    config = loaded.config
    print(f"{args.config}: OK: {len(config.gateway_file.protected_hosts)} protected hosts, "
          f"{len(config.resources)} resources, {len(config.policies)} policies, "
          f"{len(loaded.inventory)} devices in the inventory")
    return 0


def _run(args: argparse.Namespace) -> int:
    asyncio.run(_serve(args.config, demo=False))
    return 0


def _demo(args: argparse.Namespace) -> int:
    asyncio.run(_serve(args.config, demo=True))
    return 0


async def _serve(config_dir: Path, *, demo: bool) -> None:
    from addons.runner import (
        running_gateway,  # the core never imports mitmproxy; only this command does
    )
    from gateway.certs import CA_FILE
    from gateway.demo import banner

    loaded = bootstrap.load(config_dir)
    async with running_gateway(loaded, demo=demo) as gateway:
        port = gateway.addresses[0][1]
        if gateway.upstreams is not None:
            certificate = loaded.config.gateway_file.gateway.certificates[0]
            ca_file = loaded.config.path(certificate.file).parent / CA_FILE
            print(banner(loaded.config, gateway.upstreams.idp, ca_file, port), flush=True)
        else:
            listen = ", ".join(f"{h}:{p}" for h, p in gateway.addresses)
            logger.info("Portcullis is listening on %s", listen)
        await asyncio.Event().wait()
