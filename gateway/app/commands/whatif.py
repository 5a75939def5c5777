"""``portcullis whatif``: what would happen if this user opened this URL (through the pipeline)."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
from pathlib import Path

from gateway.app import bootstrap
from gateway.config.coverage import CLIENT_APP_TYPES
from gateway.decision.service import utc_now
from gateway.ops.whatif import DEFAULT_IP, Question, WhatIf, WhatIfError, as_json, as_text, policy_states
from gateway.policy.model import ClientAppType, DevicePlatform, Listener


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
                        help="the listener the request comes through (kiosk: an unmanaged browser; "
                             "forwardAuth: an edge proxy asks)")
    whatif.add_argument("--device-certificate", metavar="DEVICE_ID",
                        help="the connection's device certificate (verified) names this device; --device is the "
                             "token's device")
    whatif.add_argument("--amr", action="append", default=[], metavar="METHOD",
                        help="an authentication method the token names (amr), e.g. fido (repeatable)")
    whatif.add_argument("--acrs", action="append", default=[], metavar="CONTEXT",
                        help="an authentication context the token carries (acrs), c1..c99 (repeatable)")
    whatif.add_argument("--issuer", help="the token's issuer, by its name in identity.issuers (default: the first)")
    whatif.add_argument("--object-id", help="the user's object id (oid): a rollout's percentOfUsers share uses it")
    whatif.add_argument("--json", action="store_true", help="print the stable JSON form")
    whatif.set_defaults(command=_whatif)


def _ip_address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def _whatif(args: argparse.Namespace) -> int:
    loaded = bootstrap.load(args.config)
    question = Question(user=args.user, url=args.url, app=args.app, device=args.device, ip=args.ip,
                        client_app_type=args.client_app_type, groups=tuple(args.group), mfa=args.mfa,
                        platform=args.platform, listener=args.listener, object_id=args.object_id,
                        device_certificate=args.device_certificate, authentication_methods=tuple(args.amr),
                        authentication_contexts=tuple(args.acrs), issuer=args.issuer)
    try:
        whatif = WhatIf(loaded.config, loaded.inventory, loaded.whatif_app_protection)
        decision = asyncio.run(whatif.ask(question, utc_now()))
    except WhatIfError as error:
        print(f"portcullis: {error}", file=sys.stderr)
        return 2
    states = policy_states(loaded.config)
    if args.json:
        print(json.dumps(as_json(question, decision, states), indent=2))
    else:
        print(as_text(question, decision, states))
    return 0
