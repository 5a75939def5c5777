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
    portcullis certs  [--config DIR] init        create the CA and server certificates (kiosks trust the CA)

Exit codes: 0 ok, 1 config or start-up failure, 2 usage. Errors go to stderr as
``portcullis: <message>``, without a traceback unless ``--debug``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway import bootstrap
from gateway.access import utc_now
from gateway.audit import find_record, log_files
from gateway.certs import ensure_server_certificate
from gateway.config import CASES_FILE, GATEWAY_FILE, Config, load_config
from gateway.config.coverage import CLIENT_APP_TYPES
from gateway.config.files import missing_certificates
from gateway.config.lint import config_warnings, public_resources
from gateway.config.loader import raise_if
from gateway.errors import ConfigError, ConfigProblem
from gateway.explain import explain
from gateway.policy.model import ClientAppType, DevicePlatform, DeviceThreatLevel, Listener
from gateway.policy_cases import load_cases, run_cases
from gateway.reload import check_in_force, config_digest, record_in_force
from gateway.replay.command import add_parser as add_replay_parser
from gateway.signals.sqlite_store import export, parse_import
from gateway.signals.store import DeviceStore, StoreInventory
from gateway.terminal import printable, printable_lines
from gateway.whatif import DEFAULT_IP, Question, WhatIf, WhatIfError, as_json, as_text, policy_states
from gateway.workers import ONLY_WORKER, Supervisor, Worker, hold_reloads, release_reloads, worker_command

DEFAULT_CONFIG = Path("config")
MAX_WORKERS = 64
RECORD_HELP = "also write every flow to this mitmproxy flow file for `portcullis replay` (mode 0600: it holds tokens)"
logger = logging.getLogger("portcullis")


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
    demo = commands.add_parser("demo", help="run the embedded demo (issuer, backends, gateway)")
    demo.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="config directory (default: config)")
    demo.add_argument("--record", type=Path, metavar="FLOWS", help=RECORD_HELP)
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
    check = commands.add_parser("check", help="validate a config directory; list problems and warnings")
    check.add_argument("--config", type=Path, required=True, help="config directory")
    check.set_defaults(command=_check)
    whatif = commands.add_parser("whatif", help="what would happen if this user opened this URL?")
    whatif.add_argument("--config", type=Path, required=True, help="config directory")
    whatif.add_argument("--user", required=True, help="user principal name")
    whatif.add_argument("--url", required=True, help="https URL on a protected host")
    whatif.add_argument("--app", help="application name from the config, or an OAuth client id")
    whatif.add_argument("--device", help="device id (looked up in the config's inventory)")
    whatif.add_argument("--ip", default=DEFAULT_IP, type=_ip_address, help=f"client address (default {DEFAULT_IP})")
    whatif.add_argument("--client-app-type", type=ClientAppType, choices=CLIENT_APP_TYPES,
                        help="browser, mobileAppsAndDesktopClients, exchangeActiveSync or other (default: inferred)")
    whatif.add_argument("--group", action="append", default=[], help="a group of the user (repeatable)")
    whatif.add_argument("--mfa", action="store_true", help="the user did multifactor authentication")
    whatif.add_argument("--platform", type=DevicePlatform, choices=list(DevicePlatform),
                        help="device platform when the device is not in the inventory")
    whatif.add_argument("--listener", type=Listener, choices=list(Listener), default=Listener.gateway,
                        help="the listener the request comes through (kiosk: an unmanaged browser)")
    whatif.add_argument("--object-id", help="the user's object id (oid): a rollout's percentOfUsers share uses it")
    whatif.add_argument("--json", action="store_true", help="print the stable JSON form")
    whatif.set_defaults(command=_whatif)
    devices = commands.add_parser("devices", help="manage the device inventory (SQLite, or Redis with state)")
    devices.add_argument("--config", type=Path, required=True, help="config directory (deviceSignals.database)")
    actions = devices.add_subparsers(required=True, metavar="ACTION")
    imports = actions.add_parser("import", help="import devices from CSV or JSON; all or nothing")
    imports.add_argument("file", type=Path)
    imports.set_defaults(command=_devices_import)
    exports = actions.add_parser("export", help="print every device as JSON or CSV")
    exports.add_argument("--format", choices=["json", "csv"], default="json")
    exports.set_defaults(command=_devices_export)
    actions.add_parser("list", help="one line per device").set_defaults(command=_devices_list)
    show = actions.add_parser("show", help="one device, as policy sees it")
    show.add_argument("device_id")
    show.set_defaults(command=_devices_show)
    set_risk = actions.add_parser("set-risk", help="record an MTD verdict for a device")
    set_risk.add_argument("device_id")
    set_risk.add_argument("level", type=DeviceThreatLevel, choices=list(DeviceThreatLevel))
    set_risk.add_argument("--partner", default="manual",
                          help="the MTD partner this verdict is from, as named in mtdPartners (default manual)")
    set_risk.add_argument("--vendor", dest="partner", action=OldSpelling, new="--partner", help=argparse.SUPPRESS)
    set_risk.set_defaults(command=_devices_set_risk)
    remove = actions.add_parser("remove", help="retire devices: their records and every MTD verdict go")
    remove.add_argument("device_ids", nargs="+", metavar="ID")
    remove.set_defaults(command=_devices_remove)
    why = commands.add_parser("why", help="explain one logged decision by its correlation id")
    why.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="config directory (default: config)")
    why.add_argument("correlation_id", help="the correlation id (block pages and X-Portcullis-Correlation-Id show it)")
    why.add_argument("--json", action="store_true", help="print the logged record itself")
    why.set_defaults(command=_why)
    certs = commands.add_parser("certs", help="the gateway's CA and server certificates")
    certs.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="config directory (default: config)")
    cert_actions = certs.add_subparsers(required=True, metavar="ACTION")
    cert_actions.add_parser("init", help="create the CA and the server certificates the config names, if "
                                         "missing or not covering its hosts").set_defaults(command=_certs_init)
    test = commands.add_parser("test", help="run policy test cases against a config")
    test.add_argument("--config", type=Path, required=True, help="config directory")
    test.add_argument("cases", type=Path, help="YAML file of cases")
    test.set_defaults(command=_test)
    add_replay_parser(commands)
    return parser


class OldSpelling(argparse.Action):
    """An option's deprecated spelling: it still works, with a warning naming the new one
    (deployments have scripts that use it)."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, new: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"portcullis: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _ip_address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


QUIET_LIBRARIES = ("mitmproxy", "uvicorn", "httpx")  # their INFO lines are per-connection noise; the gateway's are not


def _configure_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not debug:
        for noisy in QUIET_LIBRARIES:
            logging.getLogger(noisy).setLevel(logging.WARNING)


def _demo_partner_secrets(config: Config) -> dict[str, str]:
    """The demo's MTD partners need shared secrets: made up for this run unless the environment has one."""
    secrets_made = {}
    for name, partner in config.gateway_file.mtd_partners.items():
        if not os.environ.get(partner.secret_env):
            os.environ[partner.secret_env] = secrets.token_urlsafe(24)
        secrets_made[name] = os.environ[partner.secret_env]
    return secrets_made


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
        return _run_cases(loaded, cases_file)
    print(f"no {CASES_FILE} in {args.config}: no policy tests ran")
    return 0


def _whatif(args: argparse.Namespace) -> int:
    loaded = bootstrap.load(args.config)
    question = Question(user=args.user, url=args.url, app=args.app, device=args.device, ip=args.ip,
                        client_app_type=args.client_app_type, groups=tuple(args.group), mfa=args.mfa,
                        platform=args.platform, listener=args.listener, object_id=args.object_id)
    try:
        decision = asyncio.run(WhatIf(loaded.config, loaded.inventory).ask(question, utc_now()))
    except WhatIfError as error:
        print(f"portcullis: {error}", file=sys.stderr)
        return 2
    states = policy_states(loaded.config)
    if args.json:
        print(json.dumps(as_json(question, decision, states), indent=2))
    else:
        print(as_text(question, decision, states))
    return 0


def _why(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    log_path = config.path(config.gateway_file.decision_log.path)
    record = find_record(log_files(log_path), args.correlation_id.strip())
    if record is None:
        print(f"portcullis: no decision {args.correlation_id!r} in {log_path} or its rotated files", file=sys.stderr)
        return 1
    print(json.dumps(record, indent=2) if args.json else printable_lines(explain(record)))  # JSON escapes controls
    return 0


def _certs_init(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    hosts = [h for c in config.gateway_file.gateway.certificates for h in c.hosts]
    for certificate in config.gateway_file.gateway.certificates:
        ca_file = ensure_server_certificate(config.path(certificate.file), certificate.hosts)
        print(f"{config.path(certificate.file)}: certificate and key for {', '.join(certificate.hosts)}")
    print(f"CA: {ca_file} (trust it on kiosks and test clients: curl --cacert {ca_file}; Chromium and Firefox: "
          f"import it as an authority)\nhosts: {', '.join(hosts)}")
    return 0


def _inventory(args: argparse.Namespace) -> StoreInventory:
    """The device store the gateway reads (SQLite, or Redis with ``state``: every gateway then hears
    of the change within a second), as policy reads it. From ``portcullis.yaml`` alone: policies
    being edited must not stop device commands."""
    inventory = bootstrap.device_commands_inventory(args.config)
    if inventory is None:
        raise ConfigError([ConfigProblem(str(args.config / GATEWAY_FILE), None, None, "deviceSignals.database",
                                         "not set: these commands manage the SQLite inventory (or Redis, "
                                         "with state)")])
    return inventory


def _store(args: argparse.Namespace) -> DeviceStore:
    return _inventory(args).store


def _devices_import(args: argparse.Namespace) -> int:
    records = parse_import(args.file)
    count = _store(args).replace_all(records, now=utc_now())
    print(f"imported {count} devices from {args.file}")
    return 0


def _devices_export(args: argparse.Namespace) -> int:
    print(export(_store(args), args.format), end="")
    return 0


def _devices_list(args: argparse.Namespace) -> int:
    inventory = _inventory(args)
    store, ignored = inventory.store, inventory.ignored_partners()
    for record in store.records():
        device = store.managed_device(str(record["azureADDeviceId"]), ignored)
        assert device is not None  # just listed
        threat = f"{device.threat_level.value} ({device.threat_source})" if device.threat_level else "-"
        print(f"{device.device_id}  {device.compliance_state.value:<13} threat {threat:<20} "
              f"{device.operating_system or '-':<8} {device.user_principal_name or '-'}  {device.display_name or ''}")
    return 0


def _devices_show(args: argparse.Namespace) -> int:
    inventory = _inventory(args)
    device = inventory.store.managed_device(args.device_id, inventory.ignored_partners())
    if device is None:
        print(f"portcullis: no device {args.device_id!r} in the inventory", file=sys.stderr)
        return 1
    print(json.dumps(dataclasses.asdict(device), indent=2, default=str))
    return 0


def _devices_set_risk(args: argparse.Namespace) -> int:
    if not _store(args).set_threat_level(args.device_id, args.partner, args.level, now=utc_now()):
        print(f"portcullis: no device {args.device_id!r} in the inventory", file=sys.stderr)
        return 1
    print(f"{args.device_id}: threat level {args.level.value} from {args.partner}")
    return 0


def _devices_remove(args: argparse.Namespace) -> int:
    removed = _store(args).remove(args.device_ids, now=utc_now())
    for device_id in args.device_ids:
        if device_id.lower() in removed:
            print(f"{device_id}: removed")
        else:
            print(f"portcullis: no device {device_id!r} in the inventory", file=sys.stderr)
    return 0 if {d.lower() for d in args.device_ids} <= removed else 1


def _test(args: argparse.Namespace) -> int:
    return _run_cases(bootstrap.load(args.config), args.cases)


def _run_cases(loaded: bootstrap.Loaded, cases_file: Path) -> int:
    cases = load_cases(cases_file)
    outcomes = asyncio.run(run_cases(WhatIf(loaded.config, loaded.inventory), cases, utc_now()))
    for outcome in outcomes:
        print(f"{'PASS' if outcome.passed else 'FAIL'}: {outcome.name}")
        for difference in outcome.differences:
            print(f"    {difference}")
    failed = sum(not o.passed for o in outcomes)
    print(f"{cases_file}: {len(outcomes) - failed} of {len(outcomes)} cases passed")
    return 1 if failed or not outcomes else 0


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
    hold_reloads()
    asyncio.run(_serve(args.config, demo=True, record=args.record))
    return 0


async def _serve(config_dir: Path, *, demo: bool, record: Path | None = None, worker: Worker = ONLY_WORKER,
                 drain_seconds: float = 30.0, restarted: bool = False) -> None:
    """Serve until SIGTERM or SIGINT, then drain: stop accepting, let requests in flight finish."""
    from addons.runner import (
        running_gateway,  # the core never imports mitmproxy; only this command does
    )
    from gateway.certs import CA_FILE
    from gateway.demo import banner

    digest = config_digest(config_dir)
    loaded = bootstrap.load(config_dir, worker)
    in_force = loaded.config.path(loaded.config.gateway_file.gateway.state_dir) / "config-in-force"
    if restarted:
        check_in_force(in_force, config_dir)
    demo_secrets = _demo_partner_secrets(loaded.config) if demo else {}
    async with running_gateway(loaded, demo=demo, record=record) as gateway:
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
            print(banner(loaded.config, gateway.upstreams.idp, ca_file, port, demo_secrets), flush=True)
        else:
            listen = ", ".join(f"{h}:{p}" for h, p in gateway.addresses)
            name = f"worker {worker.index} (pid {os.getpid()})" if worker.shares_listeners else "Portcullis"
            logger.info("%s is listening on %s", name, listen)
        watch = asyncio.create_task(_stop_when_orphaned(stop)) if worker.shares_listeners else None
        await stop.wait()
        if watch is not None:
            watch.cancel()
        await gateway.drain.drain(drain_seconds)


async def _stop_when_orphaned(stop: asyncio.Event) -> None:
    """A worker whose supervisor died (SIGKILL) drains and exits rather than run unsupervised."""
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(1)
    logger.warning("the supervisor (pid %d) is gone: draining", parent)
    stop.set()
