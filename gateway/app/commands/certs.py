"""``portcullis certs [--config DIR] init``: the CA and the server certificates the config names;
``certs device-cert DEVICE_ID``: a demo device certificate (demo and tests only)."""

from __future__ import annotations

import argparse
from pathlib import Path

from gateway.app.certs import (
    CA_FILE,
    DEVICE_CA_FILE,
    demo_device_ca,
    ensure_device_ca,
    ensure_server_certificate,
    issue_device_certificate,
    write_device_certificate,
)
from gateway.app.commands.common import DEFAULT_CONFIG
from gateway.config import load_gateway_file, resolve
from gateway.config.models import PortcullisFile
from gateway.identity.device_certificates import serial_hex
from gateway.policy.model import DeviceKey

DEMO_P12_PASSWORD = "portcullis"  # noqa: S105  (a demo certificate's, printed with it)


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    certs = commands.add_parser("certs", help="the gateway's CA and server certificates; demo device certificates")
    certs.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="config directory (default: config)")
    cert_actions = certs.add_subparsers(required=True, metavar="ACTION")
    cert_actions.add_parser("init", help="create the CA and the server certificates the config names, if "
                                         "missing or not covering its hosts").set_defaults(command=_certs_init)
    device = cert_actions.add_parser(
        "device-cert", help="DEMO/TEST ONLY: issue a device client certificate from the demo device CA",
        description="DEMO AND TESTS ONLY. Issues a client certificate for one device from the demo device CA "
                    "(device-ca.pem beside the gateway's CA, created if missing), in Intune's SAN format "
                    "URI:IntuneDeviceId://{id} with clientAuth, as an MDM's SCEP/PKCS profile would. Real devices "
                    "get theirs from the MDM's CA; never list the demo device CA in a production config.")
    device.add_argument("device_id", metavar="DEVICE_ID", help="the device's id (a GUID, or a serial number)")
    device.add_argument("--key", type=DeviceKey, choices=list(DeviceKey), default=DeviceKey.intune_device_id,
                        help="which inventory field DEVICE_ID is (default: intuneDeviceId)")
    device.add_argument("--out", type=Path, help="directory for the files (default: devices/ beside the CA)")
    device.set_defaults(command=_device_cert)


def _certs_directory(config_dir: Path, gateway_file: PortcullisFile) -> Path:
    """Where the gateway's CA is kept: beside the first server certificate file."""
    return resolve(config_dir, gateway_file.gateway.certificates[0].file).parent


def _certs_init(args: argparse.Namespace) -> int:
    gateway_file = load_gateway_file(args.config)
    hosts = [h for c in gateway_file.gateway.certificates for h in c.hosts]
    for certificate in gateway_file.gateway.certificates:
        path = resolve(args.config, certificate.file)
        ca_file = ensure_server_certificate(path, certificate.hosts)
        print(f"{path}: certificate and key for {', '.join(certificate.hosts)}")
    print(f"CA: {ca_file} (trust it on kiosks and test clients: curl --cacert {ca_file}; Chromium and Firefox: "
          f"import it as an authority)\nhosts: {', '.join(hosts)}")
    _forward_auth_certificate(args.config, gateway_file)
    device_ca = demo_device_ca(args.config, gateway_file)
    if device_ca is not None:  # a demo config trusts the demo device CA: make it, or no device can be verified
        print(f"demo device CA (demo and tests only): {ensure_device_ca(device_ca.parent)}")
    return 0


def _forward_auth_certificate(config_dir: Path, gateway_file: PortcullisFile) -> None:
    """``forwardAuth.tls.certificateFile`` (certificate and key) for ``forwardAuth.listen.host``, signed
    by the CA beside it, when it is missing; one that exists is never replaced (it may be the PKI's)."""
    forward_auth = gateway_file.forward_auth
    tls = forward_auth.tls if forward_auth is not None else None
    if forward_auth is None or tls is None or tls.key_file is not None:
        return
    path = resolve(config_dir, tls.certificate_file)
    if not path.exists():
        ca_file = ensure_server_certificate(path, [forward_auth.listen.host])
        print(f"{path}: forward-auth listener certificate and key for {forward_auth.listen.host} "
              f"(the edge trusts {ca_file})")


def _device_cert(args: argparse.Namespace) -> int:
    gateway_file = load_gateway_file(args.config)
    directory = _certs_directory(args.config, gateway_file)
    try:
        certificate, key = issue_device_certificate(directory, args.device_id, args.key)
    except ValueError as error:
        print(f"portcullis certs device-cert: {error}")
        return 2
    out = args.out or directory / "devices"
    cert_file, key_file, p12_file = write_device_certificate(out, certificate, key, directory / DEVICE_CA_FILE,
                                                             DEMO_P12_PASSWORD.encode())
    host = next(iter(gateway_file.protected_hosts))
    port = gateway_file.gateway.listen.port
    print(f"DEMO/TEST ONLY: a device certificate from the demo device CA {directory / DEVICE_CA_FILE}\n"
          f"device: {args.key.value} {certificate.subject.rfc4514_string().removeprefix('CN=')}\n"
          f"serial: {serial_hex(certificate.serial_number)}\n"
          f"certificate: {cert_file}\nkey: {key_file}\n"
          f"PKCS#12 (browsers, pk12util): {p12_file} (password: {DEMO_P12_PASSWORD})\n"
          f"try: curl --cacert {directory / CA_FILE} --cert {cert_file} --key {key_file} https://{host}:{port}/\n"
          f"trust the demo device CA with deviceCertificates.caFiles: [{directory / DEVICE_CA_FILE}]")
    return 0
