"""A valid user's latency alone and under a flood of unique invalid tokens and unknown devices.

Side by side in one run on 127.0.0.1 (needs nginx, as throughput.py does: it serves the backend
and the issuer's keys):

    .venv/bin/python bench/flood.py [--duration 10] [--flooders 2] [--devices 10000] [--unknown 2000]

One ``portcullis run`` (one worker) with ``--devices`` compliant devices in SQLite. The valid user is
one keep-alive connection sending one request at a time (a cached token, a cached device): its
p50/p99 are measured for ``--duration`` seconds alone, then while ``--flooders`` processes send,
each on its own keep-alive connection and as fast as the gateway answers, requests that are each
unique: a known ``kid`` with a wrong signature, a ``kid`` the issuer never published, malformed
tokens, and valid tokens of ``--unknown`` devices the inventory does not know (403), and then
alone again. The gateway's resident memory is read after each phase. The flood runs in processes of
its own so that the valid user's client never waits for their GIL; on two cores the gateway, the
flood and the valid user share the machine, so the flood phase measures fairness under saturation,
not a quiet machine. Numbers are printed, never asserted (tests/test_security_signals.py checks the
bounds).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import multiprocessing
import random
import shutil
import ssl
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import (  # bench/ is not a package: run as a script
    AUDIENCE,
    HOST,
    OUTLOOK,
    PATH,
    TENANT,
    BenchError,
    Unavailable,
    free_port,
    issuer_and_inventory,
    machine_lines,
    memory_kib,
    mint_token,
    run_guarded,
    start_nginx,
    start_portcullis,
)

HEADERS = {"Host": HOST, "Accept": "application/json", "User-Agent": "Outlook-iOS-Android/1.0"}


@dataclass(frozen=True)
class Settings:
    seconds: float
    flooders: int
    devices: int
    unknown: int


@dataclass(frozen=True)
class Phase:
    name: str
    latencies_ms: list[float]
    valid_statuses: Counter[int]
    flood_statuses: Counter[int]
    flood_seconds: float
    rss_kib: int

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")

    def row(self) -> str:
        flood = sum(self.flood_statuses.values())
        rate = f"{flood / self.flood_seconds:,.0f}" if flood else "-"
        statuses = ", ".join(f"{code}: {count:,}" for code, count in sorted(self.flood_statuses.items())) or "-"
        valid = ", ".join(f"{code}: {count:,}" for code, count in sorted(self.valid_statuses.items()))
        return (f"| {self.name} | {len(self.latencies_ms):,} ({valid}) | {statistics.median(self.latencies_ms):.2f} | "
                f"{self.percentile(0.99):.2f} | {max(self.latencies_ms):.2f} | {rate} | {statuses} | "
                f"{self.rss_kib / 1024:.0f} |")


def tls_context(ca_pem: bytes) -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.load_verify_locations(cadata=ca_pem.decode())
    return context


def flood_tokens(key: rsa.RSAPrivateKey, issuer: str, settings: Settings) -> list[str]:
    """Every token used once: wrong signatures on a known kid, unknown kids, malformed, unknown devices."""
    valid = mint_token(key, issuer, 0)
    head, claims, _ = valid.split(".")
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    count = max(1000, settings.unknown)
    tokens = [f"{head}.{claims}.{base64.urlsafe_b64encode(uuid.uuid4().bytes * 8).rstrip(b'=').decode()}"
              for _ in range(count)]
    tokens += [jwt.encode({"iss": issuer, "aud": AUDIENCE, "sub": "x", "iat": int(time.time()),
                           "exp": int(time.time()) + 3600, "azp": OUTLOOK}, stranger, algorithm="RS256",
                          headers={"kid": f"kid-{uuid.uuid4()}"})
               for _ in range(count // 4)]
    tokens += [f"eyJ{uuid.uuid4().hex}.{uuid.uuid4().hex}.{uuid.uuid4().hex}" for _ in range(count)]
    tokens += [mint_token(key, issuer, settings.devices + i) for i in range(settings.unknown)]  # devices no one has
    random.Random(8).shuffle(tokens)  # every kind all along the flood  # noqa: S311  (not a secret)
    return tokens


def flooder(port: int, ca_pem: bytes, tokens: list[str], seconds: float, results: multiprocessing.Queue) -> None:
    """One flood process: each token once, round robin, until the time is up or the tokens run out."""
    statuses: Counter[int] = Counter()
    deadline = time.monotonic() + seconds
    with httpx.Client(verify=tls_context(ca_pem), timeout=10, trust_env=False) as client:
        for token in tokens:
            if time.monotonic() > deadline:
                break
            try:
                answer = client.get(f"https://127.0.0.1:{port}{PATH}", extensions={"sni_hostname": HOST},
                                    headers={**HEADERS, "Authorization": f"Bearer {token}"})
                statuses[answer.status_code] += 1
            except httpx.HTTPError:
                statuses[0] += 1
    results.put(dict(statuses))


def measure_valid(port: int, ca_pem: bytes, token: str, seconds: float) -> tuple[list[float], Counter[int]]:
    latencies, statuses = [], Counter[int]()
    deadline = time.monotonic() + seconds
    with httpx.Client(verify=tls_context(ca_pem), timeout=10, trust_env=False) as client:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            answer = client.get(f"https://127.0.0.1:{port}{PATH}", extensions={"sni_hostname": HOST},
                                headers={**HEADERS, "Authorization": f"Bearer {token}"})
            latencies.append((time.perf_counter() - started) * 1000)
            statuses[answer.status_code] += 1
    return latencies, statuses


def phase(name: str, port: int, pid: int, ca_pem: bytes, token: str, settings: Settings,
          tokens: list[str] | None = None) -> Phase:
    results: multiprocessing.Queue = multiprocessing.Queue()
    workers = []
    if tokens:
        shares = [tokens[i::settings.flooders] for i in range(settings.flooders)]
        workers = [multiprocessing.Process(target=flooder, args=(port, ca_pem, share, settings.seconds + 1, results))
                   for share in shares]
        for worker in workers:
            worker.start()
        time.sleep(1)  # the flood is under way before the valid user is measured
    started = time.monotonic()
    latencies, valid = measure_valid(port, ca_pem, token, settings.seconds)
    flood: Counter[int] = Counter()
    for worker in workers:
        flood.update(results.get(timeout=60))
        worker.join(30)
    elapsed = time.monotonic() - started + (1 if workers else 0)
    return Phase(name, latencies, valid, flood, elapsed, memory_kib(pid).get("VmRSS", 0))


def parse_arguments(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--duration", type=float, default=10, metavar="SECONDS", help="each phase (default 10)")
    parser.add_argument("--flooders", type=int, default=2, help="flood processes (default 2)")
    parser.add_argument("--devices", type=int, default=10_000, help="compliant devices in the inventory")
    parser.add_argument("--unknown", type=int, default=2_000, help="valid tokens of unknown devices in the flood")
    args = parser.parse_args(argv)
    return Settings(seconds=args.duration, flooders=max(1, args.flooders), devices=args.devices,
                    unknown=args.unknown)


def run(settings: Settings) -> int:
    if shutil.which("nginx") is None:
        raise BenchError("missing: nginx (apt-get install nginx)")
    print("\n".join(machine_lines()), flush=True)
    with contextlib.ExitStack() as stack:
        root = Path(tempfile.mkdtemp(prefix="portcullis-flood-"))
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        backend_port, port = free_port(), free_port()
        issued = issuer_and_inventory(root, backend_port, settings.devices)
        certificates, key, issuer, database = issued.certificates, issued.key, issued.issuer, issued.database
        started = time.perf_counter()
        tokens = flood_tokens(key, issuer, settings)
        print(f"fixtures: {settings.devices:,} devices, {len(tokens):,} unique flood tokens "
              f"({time.perf_counter() - started:.1f} s)", flush=True)
        start_nginx(stack, "nginx backend", "backend.nginx.conf", root / "nginx-backend",
                    {"PORT": backend_port, "TENANT": TENANT, "ROOT": root / "issuer"})
        server = start_portcullis(stack, "portcullis", root / "portcullis", port, backend_port, certificates,
                                  database, workers=1)
        if isinstance(server, Unavailable):
            raise BenchError(server.reason)
        ca_pem = certificates.ca.cert_pem.bytes()
        token = mint_token(key, issuer, 0)
        _, statuses = measure_valid(port, ca_pem, token, 1.0)  # warm: token and device cached
        if set(statuses) != {200}:
            raise BenchError(f"the valid user does not get 200 alone: {dict(statuses)}\n{server.log_tail()}")
        phases = [phase("alone", port, server.pid, ca_pem, token, settings),
                  phase(f"flood ({settings.flooders} processes)", port, server.pid, ca_pem, token, settings, tokens),
                  phase("alone again", port, server.pid, ca_pem, token, settings)]
    print(f"\nvalid user: one keep-alive connection, one request at a time, {settings.seconds:g} s per phase\n")
    print("| phase | valid requests (statuses) | p50 ms | p99 ms | max ms | flood req/s | flood statuses | RSS MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for measured in phases:
        print(measured.row())
    alone, flooded = phases[0], phases[1]
    p50_ratio = statistics.median(flooded.latencies_ms) / statistics.median(alone.latencies_ms)
    print(f"\np50 under flood / alone: {p50_ratio:.1f}x; p99: {flooded.percentile(0.99) / alone.percentile(0.99):.1f}x")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_guarded("flood", run, parse_arguments(argv))


if __name__ == "__main__":
    sys.exit(main())
