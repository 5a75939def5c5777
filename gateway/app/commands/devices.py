"""``portcullis devices --config DIR import | export | list | show | set-risk | remove``: the device
inventory the gateway reads (SQLite, or Redis with ``state``), from ``portcullis.yaml`` alone."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway.app import bootstrap
from gateway.config import GATEWAY_FILE
from gateway.decision.service import utc_now
from gateway.errors import ConfigError, ConfigProblem
from gateway.policy.model import DeviceKey, DeviceThreatLevel
from gateway.signals.sqlite_store import export, parse_import
from gateway.signals.store import DeviceStore, StoreInventory


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    show.add_argument("device_id", help="its azureADDeviceId, or the value of --by")
    show.add_argument("--by", type=DeviceKey, choices=list(DeviceKey), default=DeviceKey.azure_ad_device_id,
                      help="the key to find it by, as a device certificate names it (default azureADDeviceId)")
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
              f"{device.operating_system or '-':<8} serial {device.serial_number or '-':<14} "
              f"{device.user_principal_name or '-'}  {device.display_name or ''}")
    return 0


def _devices_show(args: argparse.Namespace) -> int:
    inventory = _inventory(args)
    found = inventory.store.device_ids_for(args.by, args.device_id)
    if len(found) > 1:
        print(f"portcullis: {args.by.value} {args.device_id!r} names {len(found)} devices: {', '.join(found)}",
              file=sys.stderr)
        return 1
    device = inventory.store.managed_device(found[0], inventory.ignored_partners()) if found else None
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
