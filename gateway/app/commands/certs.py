"""``portcullis certs [--config DIR] init``: the CA and the server certificates the config names."""

from __future__ import annotations

import argparse
from pathlib import Path

from gateway.app.certs import ensure_server_certificate
from gateway.app.commands.common import DEFAULT_CONFIG
from gateway.config import load_config


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    certs = commands.add_parser("certs", help="the gateway's CA and server certificates")
    certs.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="config directory (default: config)")
    cert_actions = certs.add_subparsers(required=True, metavar="ACTION")
    cert_actions.add_parser("init", help="create the CA and the server certificates the config names, if "
                                         "missing or not covering its hosts").set_defaults(command=_certs_init)


def _certs_init(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    hosts = [h for c in config.gateway_file.gateway.certificates for h in c.hosts]
    for certificate in config.gateway_file.gateway.certificates:
        ca_file = ensure_server_certificate(config.path(certificate.file), certificate.hosts)
        print(f"{config.path(certificate.file)}: certificate and key for {', '.join(certificate.hosts)}")
    print(f"CA: {ca_file} (trust it on kiosks and test clients: curl --cacert {ca_file}; Chromium and Firefox: "
          f"import it as an authority)\nhosts: {', '.join(hosts)}")
    return 0
