"""`portcullis devices import` of N devices, timed end to end as an operator runs it (a new process
that parses the file, validates every row and writes), into SQLite and into a real redis-server,
from one CSV or JSON file (JSON: what `portcullis devices export` writes). Re-seeding Redis after
it restarted empty is this command.

    .venv/bin/python bench/device_import.py [--devices 100000] [--format csv|json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.signals.sqlite_store import EXPORT_FIELDS
from tests.redis_server import RedisServer  # the tests' real redis-server, on a free port

PORTCULLIS = str(Path(sys.executable).with_name("portcullis"))
CONFIG = """gateway:
  certificates: [{{hosts: [mail.contoso.test], file: gateway.pem}}]
identity: {{issuer: "https://login.contoso.test/tenant/v2.0"}}
protectedHosts:
  mail.contoso.test: {{upstream: "https://10.0.0.1", audiences: [api://mail]}}
deviceSignals: {signals}
{state}
"""
POLICIES = "policies: []\n"


def device(i: int) -> dict[str, object]:
    """Graph's fields, two in three devices with an MTD verdict (as the soak's inventory had)."""
    return {"azureADDeviceId": f"dd000000-0000-4000-8000-{i:012d}", "deviceName": f"Phone {i}",
            "userPrincipalName": f"user{i}@contoso.test", "operatingSystem": "iOS", "osVersion": "18.1",
            "complianceState": "compliant", "lastSyncDateTime": "2026-11-23T08:00:00Z",
            **({"threatLevel": "low", "threatSource": "lookout"} if i % 3 else {})}


def write_devices(path: Path, count: int) -> None:
    if path.suffix == ".json":
        path.write_text(json.dumps({"devices": [device(i) for i in range(count)]}, indent=2))
        return
    columns = (*EXPORT_FIELDS, "threatLevel", "threatSource")
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        for i in range(count):
            row = {**device(i), "extensionAttributes": "{}"}
            writer.writerow([row.get(name, "") for name in columns])


def config_dir(root: Path, name: str, *, signals: str, state: str = "") -> Path:
    directory = root / name
    directory.mkdir()
    (directory / "portcullis.yaml").write_text(CONFIG.format(signals=signals, state=state))
    (directory / "policies.yaml").write_text(POLICIES)
    return directory


def cpu_seconds(server: RedisServer) -> float:
    """utime + stime of the running redis-server (/proc/PID/stat)."""
    assert server._process is not None  # started by main()
    fields = Path(f"/proc/{server._process.pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_import(directory: Path, devices: Path, server: RedisServer) -> tuple[float, float, float]:
    """Wall seconds, the command's CPU seconds and redis-server's: on a shared machine the CPU
    columns are the ones to compare between runs."""
    redis_before = cpu_seconds(server)
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run([PORTCULLIS, "devices", "--config", str(directory), "import", str(devices)],  # noqa: S603
                            capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"import into {directory.name} failed: {result.stderr}")
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    command_cpu = (children.ru_utime + children.ru_stime) - (children_before.ru_utime + children_before.ru_stime)
    return elapsed, command_cpu, cpu_seconds(server) - redis_before


def main(count: int, file_format: str) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        devices = root / f"devices.{file_format}"
        write_devices(devices, count)
        server = RedisServer().start()
        try:
            sqlite = config_dir(root, "sqlite", signals="{database: devices.sqlite}")
            redis = config_dir(root, "redis", signals="{}", state=f"state: {server.url}")
            rows = [("sqlite", timed_import(sqlite, devices, server)),
                    ("redis, empty", timed_import(redis, devices, server)),
                    ("redis, again", timed_import(redis, devices, server))]
        finally:
            server.close()
    print(f"{count:,} devices, one {file_format.upper()} file")
    print(f"{'store':<14} {'seconds':>8} {'devices/s':>10} {'command CPU s':>14} {'redis CPU s':>12}")
    for name, (seconds, command_cpu, redis_cpu) in rows:
        print(f"{name:<14} {seconds:>8.1f} {count / seconds:>10,.0f} {command_cpu:>14.1f} {redis_cpu:>12.1f}")
    print(f"redis / sqlite (wall) = {rows[1][1][0] / rows[0][1][0]:.1f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--format", choices=["csv", "json"], default="csv")
    arguments = parser.parse_args()
    main(arguments.devices, arguments.format)
