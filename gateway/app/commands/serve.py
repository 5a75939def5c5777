"""``portcullis demo`` and ``portcullis run``: serve until SIGTERM or SIGINT, then drain. With
``--workers N`` a supervisor checks the config, prepares the shared state once (in a child: the
supervisor never loads mitmproxy) and watches N workers sharing the listeners."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import signal
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.app import bootstrap
from gateway.app.commands.common import DEFAULT_CONFIG
from gateway.app.edges import (
    EDGES,
    check_plain_forward_auth,
    check_port_free,
    demo_sites,
    edge_banner,
    running_edge,
    with_forward_auth,
)
from gateway.app.workers import ONLY_WORKER, Supervisor, Worker, hold_reloads, release_reloads, worker_command
from gateway.config import Config, load_config, load_gateway_file
from gateway.config.files import missing_certificates
from gateway.config.loader import raise_if
from gateway.ops.reload import check_in_force, config_digest, record_in_force

if TYPE_CHECKING:
    from gateway.web.demo_idp import DemoIdentityProvider

MAX_WORKERS = 64
DEFAULT_EDGE_PORT = 8081
RECORD_HELP = "also write every flow to this mitmproxy flow file for `portcullis replay` (mode 0600: it holds tokens)"
logger = logging.getLogger("portcullis")


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = commands.add_parser("demo", help="run the embedded demo (issuer, backends, gateway)")
    demo.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="config directory (default: config)")
    demo.add_argument("--record", type=Path, metavar="FLOWS", help=RECORD_HELP)
    demo.add_argument("--edge", choices=sorted(EDGES), help="also start Debian's nginx or Caddy in front of the demo "
                      "backends, asking Portcullis about each request (forward auth, the snippets in deploy/)")
    demo.add_argument("--edge-port", type=int, default=DEFAULT_EDGE_PORT, metavar="PORT",
                      help=f"the edge's plain-HTTP port on 127.0.0.1 (default {DEFAULT_EDGE_PORT})")
    demo.set_defaults(command=_demo)
    run = commands.add_parser("run", help="run the gateway on a config directory")
    run.add_argument("--config", type=Path, required=True, help="config directory")
    run.add_argument("--record", type=Path, metavar="FLOWS", help=RECORD_HELP)
    run.add_argument("--workers", type=_worker_count, default=1, metavar="N",
                     help="gateway processes sharing the listeners (SO_REUSEPORT), supervised (default 1)")
    run.add_argument("--drain-seconds", type=_drain_seconds, default=30.0, metavar="S",
                     help="on SIGTERM, how long requests in flight may take to finish (default 30)")
    run.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)  # set by the supervisor
    run.add_argument("--restarted", action="store_true", help=argparse.SUPPRESS)  # set by the supervisor
    run.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)  # the supervisor's helper
    run.set_defaults(command=_run)


def _run(args: argparse.Namespace) -> int:
    if args.prepare_only:
        return _prepare(args)
    hold_reloads()  # a SIGHUP while starting waits for the handler (released in _serve or the supervisor)
    if args.worker_index is not None:  # one of the supervisor's workers
        worker = Worker(args.worker_index, args.workers)
        asyncio.run(_serve(args.config, demo=False, record=None, worker=worker, drain_seconds=args.drain_seconds,
                           restarted=args.restarted))
        return 0
    if args.workers == 1:
        asyncio.run(_serve(args.config, demo=False, record=args.record, drain_seconds=args.drain_seconds))
        return 0
    return _supervise(args)


def _supervise(args: argparse.Namespace) -> int:
    """Check the config and prepare the shared state once (in a child process: the supervisor
    itself never loads mitmproxy, and stays small), then start and watch the workers."""
    if args.record is not None:
        raise ValueError("--record writes one flow file: use it with one worker")
    config = load_config(args.config)
    kiosk = config.gateway_file.kiosk
    if config.gateway_file.gateway.listen.port == 0 or (kiosk is not None and kiosk.listen.port == 0):
        raise ValueError("--workers needs fixed ports (gateway.listen.port, kiosk.listen.port): the workers share "
                         "them")
    admin = config.gateway_file.admin
    if admin is not None:
        shared = {config.gateway_file.gateway.listen.port, *([kiosk.listen.port] if kiosk else [])}
        clash = shared & {admin.listen.port + i for i in range(args.workers)}
        if clash:
            raise ValueError(f"worker i's admin API listens on admin.listen.port + i ({admin.listen.port}.."
                             f"{admin.listen.port + args.workers - 1}): that includes port {min(clash)}, "
                             "which the gateway or kiosk listener uses")
    command = worker_command(args.config, args.workers, args.drain_seconds, args.debug)
    prepared = subprocess.run([*command, "--prepare-only"], check=False)  # noqa: S603  (our own command)
    if prepared.returncode != 0:
        return 1  # the child printed why
    return Supervisor(command, args.workers, args.drain_seconds).run()


def _prepare(args: argparse.Namespace) -> int:
    from addons.runner import prepare_state  # the core never imports mitmproxy; only this command does

    loaded = bootstrap.load(args.config)
    try:
        prepare_state(loaded)
        bootstrap.prepare_worker_files(loaded.config)
    finally:
        if loaded.store is not None:
            loaded.store.close()
    return 0


def _drain_seconds(value: str) -> float:
    seconds = float(value)
    if not 0 <= seconds <= 3600:  # also refuses nan
        raise argparse.ArgumentTypeError("between 0 and 3600 seconds")
    return seconds


def _worker_count(value: str) -> int:
    count = int(value)
    if not 1 <= count <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"between 1 and {MAX_WORKERS}")
    return count


def _demo(args: argparse.Namespace) -> int:
    edge = None
    if args.edge is not None:
        EDGES[args.edge].binary()  # a missing edge is said before anything starts
        EDGES[args.edge].snippet_directory()
        check_port_free(args.edge, args.edge_port)
        edge = DemoEdge(args.edge, args.edge_port)
    hold_reloads()
    asyncio.run(_serve(args.config, demo=True, record=args.record, edge=edge))
    return 0


@dataclass(frozen=True, slots=True)
class DemoEdge:
    name: str  # one of EDGES
    port: int


def _demo_partner_secrets(config: Config) -> dict[str, str]:
    """The demo's MTD partners need shared secrets: made up for this run unless the environment has one."""
    secrets_made = {}
    for name, partner in config.gateway_file.mtd_partners.items():
        if not os.environ.get(partner.secret_env):
            os.environ[partner.secret_env] = secrets.token_urlsafe(24)
        secrets_made[name] = os.environ[partner.secret_env]
    return secrets_made


async def _serve(config_dir: Path, *, demo: bool, record: Path | None = None, worker: Worker = ONLY_WORKER,
                 drain_seconds: float = 30.0, restarted: bool = False, edge: DemoEdge | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then drain: stop accepting, let requests in flight finish.
    ``edge``: the demo's edge proxy, started once the gateway is up and stopped when it stops."""
    from addons.runner import (
        running_gateway,  # the core never imports mitmproxy; only this command does
    )
    from gateway.app.certs import CA_FILE
    from gateway.app.demo import banner

    digest = config_digest(config_dir)
    device_ca = _demo_device_certificates(config_dir) if demo else None  # before loading: the config trusts it
    loaded = bootstrap.load(config_dir, worker)
    if edge is not None:
        check_plain_forward_auth(loaded.config)
        loaded = replace(loaded, config=with_forward_auth(loaded.config))
    if not demo:
        raise_if(missing_certificates(loaded.config, config_dir))  # the demo makes its own; a gateway must have them
    in_force = loaded.config.path(loaded.config.gateway_file.gateway.state_dir) / "config-in-force"
    if restarted:
        check_in_force(in_force, config_dir)
    demo_secrets = _demo_partner_secrets(loaded.config) if demo else {}
    async with running_gateway(loaded, demo=demo, record=record) as gateway, contextlib.AsyncExitStack() as stack:
        if edge is not None:
            gateway.operations.reloader.adjust = with_forward_auth  # a reload keeps the edge's listener
        if worker.shares_listeners:
            record_in_force(in_force, digest)
            gateway.operations.reloader.in_force_file = in_force
        reloads: set[asyncio.Task[object]] = set()
        stop = asyncio.Event()

        def reload_on_hangup() -> None:
            task = asyncio.create_task(gateway.operations.reloader.reload("SIGHUP"))
            reloads.add(task)  # keep a reference until it is done
            task.add_done_callback(reloads.discard)

        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, reload_on_hangup)
        release_reloads()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        port = gateway.addresses[0][1]
        if gateway.upstreams is not None:
            certificate = loaded.config.gateway_file.gateway.certificates[0]
            ca_file = loaded.config.path(certificate.file).parent / CA_FILE
            print(banner(loaded.config, gateway.upstreams.idp, ca_file, port, demo_secrets, device_ca), flush=True)
            if edge is not None:
                print(await _start_edge(stack, edge, loaded.config, gateway.forward_auth, gateway.upstreams.idp),
                      flush=True)
        else:
            listen = ", ".join(f"{h}:{p}" for h, p in gateway.addresses)
            name = f"worker {worker.index} (pid {os.getpid()})" if worker.shares_listeners else "Portcullis"
            logger.info("%s is listening on %s", name, listen)
        watch = asyncio.create_task(_stop_when_orphaned(stop)) if worker.shares_listeners else None
        await stop.wait()
        if watch is not None:
            watch.cancel()
        await gateway.drain.drain(drain_seconds)


async def _start_edge(stack: contextlib.AsyncExitStack, edge: DemoEdge, config: Config,
                      forward_auth: tuple[str, int] | None, idp: DemoIdentityProvider) -> str:
    """The edge as a child process (stopped when ``stack`` closes: Ctrl-C, an error), its files in
    the state directory; what to try through it."""
    assert forward_auth is not None  # with_forward_auth gave the config its section
    directory = config.path(config.gateway_file.gateway.state_dir) / f"edge-{edge.name}"
    sites = demo_sites(config)
    running = running_edge(edge.name, directory, port=edge.port, forward_auth=forward_auth[1], sites=sites)
    await asyncio.to_thread(running.__enter__)  # waits for the edge to listen, off the gateway's loop
    stack.push_async_callback(asyncio.to_thread, running.__exit__, None, None, None)
    return edge_banner(edge.name, edge.port, idp, sites)


async def _stop_when_orphaned(stop: asyncio.Event) -> None:
    """A worker whose supervisor died (SIGKILL) drains and exits rather than run unsupervised."""
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(1)
    logger.warning("the supervisor (pid %d) is gone: draining", parent)
    stop.set()


def _demo_device_certificates(config_dir: Path) -> Path | None:
    """The demo device CA and the demo devices' certificates, made on first run when the config
    trusts that CA (the shipped demo does, for its mail host); its path, else None."""
    from gateway.app.certs import demo_device_ca, ensure_demo_device_certificates, ensure_device_ca
    from gateway.app.commands.certs import DEMO_P12_PASSWORD
    from gateway.app.demo import DEMO_CERTIFICATES

    device_ca = demo_device_ca(config_dir, load_gateway_file(config_dir))
    if device_ca is None:
        return None
    ensure_device_ca(device_ca.parent)
    ensure_demo_device_certificates(device_ca, DEMO_CERTIFICATES, DEMO_P12_PASSWORD.encode())
    return device_ca
