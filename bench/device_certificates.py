"""What a device certificate costs: a TLS handshake that presents one (verified by the gateway)
next to one that does not, side by side in one run against ``portcullis demo`` on 127.0.0.1.

    .venv/bin/python bench/device_certificates.py [--connections 300] [--rounds 5]

The demo's mail host asks for device certificates (optional); its docs host does not. Each
connection is new (a full handshake, no session resumption), sends one request for a path no
resource names (the gateway refuses it before any token is read: the same small answer
everywhere), and closes. Three kinds, interleaved round by round so that they share the machine's
state: docs (no certificate asked), mail without a certificate (asked, none sent), mail with Alex's
phone's demo certificate (asked, sent, verified once for the connection). Also the verifier alone,
in this process. Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cryptography import x509  # noqa: E402  (after the path: run as a script)
from cryptography.hazmat.primitives.serialization import Encoding  # noqa: E402

from gateway.app.certs import DEVICE_CA_FILE, demo_device_files  # noqa: E402
from gateway.app.demo import ALEX_IPHONE_INTUNE  # noqa: E402
from gateway.config import load_config  # noqa: E402
from gateway.decision.rules import Rules  # noqa: E402

MAIL, DOCS = "mail.contoso.test", "docs.contoso.test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_demo(root: Path) -> tuple[subprocess.Popen[str], Path, int]:
    """``portcullis demo`` on a copy of the shipped config with free ports; returns it, its config and port."""
    from ruamel.yaml import YAML

    config = root / "config"
    shutil.copytree(REPO / "config", config)
    yaml = YAML()
    data = yaml.load(config / "portcullis.yaml")
    port = free_port()
    data["gateway"]["listen"]["port"] = port
    data["identity"]["issuer"] = f"http://127.0.0.1:{free_port()}/contoso"
    for host in (MAIL, DOCS):
        data["protectedHosts"][host]["upstream"] = f"http://127.0.0.1:{free_port()}"
    data["kiosk"]["listen"]["port"] = free_port()
    data["admin"]["listen"]["port"] = free_port()
    yaml.dump(data, config / "portcullis.yaml")
    portcullis = Path(sys.executable).with_name("portcullis")
    process = subprocess.Popen([str(portcullis), "demo", "--config", str(config)], cwd=root, text=True,  # noqa: S603
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert process.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        if line.startswith("curl") and "/demo/token" in line:
            return process, config, port
    process.kill()
    raise SystemExit("the demo did not start")


def connect(port: int, host: str, context: ssl.SSLContext) -> float:
    """One new connection: handshake, one request, its answer; seconds taken."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as raw, context.wrap_socket(raw, server_hostname=host) as tls:
        tls.sendall(f"GET /no-such-resource/ HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        while tls.recv(65536):
            pass
    return time.perf_counter() - started


def contexts(root: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = root / "certs" / "ca.pem"
    plain = ssl.create_default_context(cafile=str(ca))
    with_certificate = ssl.create_default_context(cafile=str(ca))
    with_certificate.load_cert_chain(*demo_device_files(root / "certs" / DEVICE_CA_FILE, ALEX_IPHONE_INTUNE))
    for context in (plain, with_certificate):  # every connection a full handshake
        context.options |= ssl.OP_NO_TICKET
    return plain, with_certificate


def verifier_alone(config: Path, root: Path, times: int = 2000) -> float:
    """Microseconds per ``DeviceCertificateVerifier.verify`` of the demo certificate."""
    from datetime import UTC, datetime

    verifier = Rules.of(load_config(config)).device_certificate_verifier(MAIL)
    assert verifier is not None
    cert_file, _ = demo_device_files(root / "certs" / DEVICE_CA_FILE, ALEX_IPHONE_INTUNE)
    chain = [x509.load_pem_x509_certificate(cert_file.read_bytes()).public_bytes(Encoding.DER)]
    now = datetime.now(UTC)
    assert verifier.verify(chain, now).verified
    started = time.perf_counter()
    for _ in range(times):
        verifier.verify(chain, now)
    return (time.perf_counter() - started) / times * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=300, help="per kind and round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        process, config, port = start_demo(root)
        try:
            plain, with_certificate = contexts(root)
            kinds = {"docs: no certificate asked": (DOCS, plain),
                     "mail: asked, none sent": (MAIL, plain),
                     "mail: Alex's certificate, verified": (MAIL, with_certificate)}
            times: dict[str, list[float]] = {name: [] for name in kinds}
            for _ in range(args.rounds):
                for name, (host, context) in kinds.items():
                    times[name] += [connect(port, host, context) for _ in range(args.connections)]
            print(f"{args.rounds} rounds x {args.connections} new connections per kind (handshake, one request, "
                  "close), interleaved")
            base = statistics.median(times["docs: no certificate asked"])
            for name, taken in times.items():
                print(f"  {name:<36} median {statistics.median(taken) * 1e3:6.2f} ms   "
                      f"p90 {statistics.quantiles(taken, n=10)[-1] * 1e3:6.2f} ms   "
                      f"ratio to docs {statistics.median(taken) / base:4.2f}")
            print(f"  the verifier alone (in this process):  {verifier_alone(config, root):6.0f} µs per verify")
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
