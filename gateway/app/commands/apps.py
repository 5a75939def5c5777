"""``portcullis apps --config DIR import | list | show | remove``: the Intune app protection (MAM)
registrations the ``compliantApplication`` control reads, in the device store's database (SQLite,
or Redis with ``state``), from ``portcullis.yaml`` alone. A change reaches every gateway's open
flows within a second (continuous access evaluation)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gateway.app import bootstrap
from gateway.config import GATEWAY_FILE
from gateway.decision.service import utc_now
from gateway.errors import ConfigError, ConfigProblem
from gateway.signals.app_protection import AppRegistrationStore, parse_registrations, registration_json


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    apps = commands.add_parser("apps", help="manage app protection registrations (SQLite, or Redis with state)")
    apps.add_argument("--config", type=Path, required=True, help="config directory (deviceSignals.database)")
    actions = apps.add_subparsers(required=True, metavar="ACTION")
    imports = actions.add_parser("import", help="import registrations (Graph's JSON or the seed's YAML); all or "
                                                "nothing, each written over the stored one of its id")
    imports.add_argument("file", type=Path)
    imports.set_defaults(command=_apps_import)
    actions.add_parser("list", help="one line per registration").set_defaults(command=_apps_list)
    show = actions.add_parser("show", help="one registration, in Graph's fields")
    show.add_argument("registration_id")
    show.set_defaults(command=_apps_show)
    remove = actions.add_parser("remove", help="remove registrations: their apps lose app protection at once")
    remove.add_argument("registration_ids", nargs="+", metavar="ID")
    remove.set_defaults(command=_apps_remove)


def _store(args: argparse.Namespace) -> AppRegistrationStore:
    store = bootstrap.app_commands_store(args.config)
    if store is None:
        raise ConfigError([ConfigProblem(str(args.config / GATEWAY_FILE), None, None, "deviceSignals.database",
                                         "not set: these commands manage the registrations in the SQLite "
                                         "database (or Redis, with state)")])
    return store


def _apps_import(args: argparse.Namespace) -> int:
    registrations = parse_registrations(args.file)
    count = _store(args).replace_all(registrations, now=utc_now())
    print(f"imported {count} app registrations from {args.file}")
    return 0


def _apps_list(args: argparse.Namespace) -> int:
    for r in _store(args).registrations():
        state = "flagged " + ",".join(r.flagged_reasons) if r.flagged_reasons else \
            "protected" if r.applied_policies else "no policy"
        synced = r.last_sync.isoformat() if r.last_sync else "never"
        print(f"{r.registration_id}  {r.platform:<7} {r.app_identifier:<32} {state:<22} synced {synced:<25} "
              f"{r.user_principal_name or r.user_id or '-'}  {r.device_id or 'no enrolled device'}")
    return 0


def _apps_show(args: argparse.Namespace) -> int:
    registration = _store(args).registration(args.registration_id)
    if registration is None:
        print(f"portcullis: no app registration {args.registration_id!r}", file=sys.stderr)
        return 1
    print(json.dumps(registration_json(registration), indent=2))
    return 0


def _apps_remove(args: argparse.Namespace) -> int:
    removed = _store(args).remove(args.registration_ids, now=utc_now())
    for registration_id in args.registration_ids:
        if registration_id.lower() in removed:
            print(f"{registration_id}: removed")
        else:
            print(f"portcullis: no app registration {registration_id!r}", file=sys.stderr)
    return 0 if {i.lower() for i in args.registration_ids} <= removed else 1
