"""Decision throughput with the device signals in the loop, for an inventory of 100,000 devices:
cold caches (every lookup reaches SQLite) and warm caches (every lookup is a cache hit), side by
side in one run. Each decision is: cached device lookup + the pure evaluate() of the demo policies.

    .venv/bin/python bench/device_signals.py [--devices 100000] [--decisions 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.config import load_config
from gateway.config.compile import compile_policies
from gateway.policy.evaluate import evaluate
from gateway.policy.model import (
    AccessRequest,
    ClientApp,
    ComplianceSettings,
    DeviceSignals,
    Identity,
)
from gateway.policy.policy_set import PolicySet
from gateway.signals.cache import CachedInventory
from gateway.signals.devices import DeviceRecord
from gateway.signals.sqlite_store import SqliteDeviceStore
from gateway.signals.store import StoreInventory

REPO = Path(__file__).resolve().parents[1]
NOW = datetime.now(UTC)
OUTLOOK = "27922004-5251-4030-b22d-91ecd9a37ea4"


def fill(store: SqliteDeviceStore, count: int) -> list[str]:
    ids = [f"cc000000-0000-4000-8000-{i:012d}" for i in range(count)]
    records = (DeviceRecord.model_validate_json(
        f'{{"azureADDeviceId": "{d}", "complianceState": "compliant", "operatingSystem": "iOS", '
        f'"threatLevel": "low", "threatSource": "bench"}}', strict=True) for d in ids)
    store.replace_all(records, now=NOW)
    return ids


async def decide_all(inventory: CachedInventory, policy_set: PolicySet, device_ids: list[str],
                     compliance: ComplianceSettings) -> float:
    request = AccessRequest(correlation_id="b", host="mail.contoso.test", path="/Microsoft-Server-ActiveSync",
                            method="POST", client_ip="203.0.113.4", user_agent="Outlook-iOS-Android/1.0",
                            accepts_html=False)
    found = policy_set.match(request.host, request.path)
    assert found is not None
    app = ClientApp(client_id=OUTLOOK, name="outlook-mobile")
    started = time.perf_counter()
    for device_id in device_ids:
        record = await inventory.managed_device(device_id)
        identity = Identity(subject="s", user_principal_name="u@contoso.test", object_id=None, tenant_id=None,
                            client_id=OUTLOOK, device_id=device_id, groups=frozenset(), audience="a", expires_at=0)
        decision = evaluate(request=request, identity=identity, app=app, resources=found.names,
                            device=DeviceSignals(device_id=device_id, device=record, source="sqlite",
                                                 compliance=compliance),
                            policy_set=policy_set, now=NOW)
        assert decision.allowed, decision.reason
    return len(device_ids) / (time.perf_counter() - started)


async def main(devices: int, decisions: int) -> None:
    config = load_config(REPO / "config")
    policy_set = compile_policies(config)
    with tempfile.TemporaryDirectory() as scratch:
        store = SqliteDeviceStore(Path(scratch) / "devices.sqlite")
        started = time.perf_counter()
        ids = fill(store, devices)
        print(f"inventory: {store.count()} devices written in {time.perf_counter() - started:.1f} s")
        sample = random.Random(7).sample(ids, decisions)  # noqa: S311  (a repeatable sample, not a secret)
        inventory = CachedInventory(StoreInventory(store), ttl=3600, miss_ttl=5, max_staleness=300,
                                    max_entries=devices)
        compliance = config.gateway_file.device_signals.compliance.settings()
        cold = await decide_all(inventory, policy_set, sample, compliance)
        warm = await decide_all(inventory, policy_set, sample, compliance)
        print(f"{'cache':>6} {'decisions/s':>12} {'µs/decision':>12}")
        for name, rate in (("cold", cold), ("warm", warm)):
            print(f"{name:>6} {rate:>12,.0f} {1e6 / rate:>12.1f}")
        print(f"warm / cold = {warm / cold:.1f}x; SQLite lookups made: {inventory.source_calls}")
        store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--decisions", type=int, default=20_000)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.devices, arguments.decisions))
