"""Replay speed on real recordings: the demo gateway runs in this process with ``record``, the demo
scenarios go through its listener N times (default 3,000), and the flow file and decision log it
leaves are replayed against the demo config plus one policy, three ways.

    .venv/bin/python bench/replay.py [N]
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from addons.runner import running_gateway
from gateway.app import bootstrap
from gateway.app.commands.replay import read_sources
from gateway.app.demo import SCENARIOS, scenario_token
from gateway.config import load_config
from gateway.ops.whatif import DEFAULT_IP
from gateway.replay.engine import Side, replay
from tests.conftest import Ports, demo_config_copy

EXTRA_POLICY = """
  - name: activesync-requires-mfa
    state: enabled
    conditions: {resources: {include: [exchange-activesync]}}
    grantControls: {builtInControls: [mfa]}
"""


async def record(config_dir: Path, flows: Path, count: int) -> float:
    loaded = bootstrap.load(config_dir)
    async with running_gateway(loaded, demo=True, record=flows) as gateway:
        assert gateway.upstreams is not None
        port, idp = gateway.addresses[0][1], gateway.upstreams.idp
        context = ssl.create_default_context(cafile=str(config_dir.parent / "certs" / "ca.pem"))
        clients = {s.host: httpx.AsyncClient(verify=context, timeout=30) for s in SCENARIOS}
        tokens = [scenario_token(idp, s) for s in SCENARIOS]

        async def send(index: int) -> None:
            scenario, token = SCENARIOS[index % len(SCENARIOS)], tokens[index % len(SCENARIOS)]
            headers = {"Host": scenario.host, **dict(scenario.headers)}
            if token:
                headers["Authorization"] = f"Bearer {token}"
            await clients[scenario.host].request(scenario.method, f"https://127.0.0.1:{port}{scenario.path}",
                                                 headers=headers, extensions={"sni_hostname": scenario.host})

        started = time.perf_counter()
        for batch in range(0, count, 32):
            await asyncio.gather(*(send(i) for i in range(batch, min(batch + 32, count))))
        elapsed = time.perf_counter() - started
        for client in clients.values():
            await client.aclose()
        gateway.service.decision_log.flush()
    return elapsed


def measure(label: str, sources: list[Path], baseline: Side | None, candidate: Side, loaded: bootstrap.Loaded) -> None:
    started = time.perf_counter()
    requests, skipped = read_sources(sources)
    read = time.perf_counter() - started
    started = time.perf_counter()
    replayed, more = asyncio.run(replay(requests, baseline=baseline, candidate=candidate, inventory=loaded.inventory,
                                        default_ip=DEFAULT_IP))
    evaluated = time.perf_counter() - started
    flips, total = sum(item.change is not None for item in replayed), len(requests)
    print(f"{label:<32} {len(replayed):>7} {len(skipped) + len(more):>7} {flips:>6} "
          f"{total / read:>12,.0f} {total / evaluated:>12,.0f} {total / (read + evaluated):>10,.0f}")


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        config_dir = demo_config_copy(root, Ports.fresh())
        flows = root / "traffic.mitm"
        elapsed = asyncio.run(record(config_dir, flows, count))
        print(f"recorded {count} requests through the gateway in {elapsed:.1f} s; flow file "
              f"{flows.stat().st_size / 1e6:.1f} MB")
        strict = root / "strict"
        shutil.copytree(config_dir, strict)
        (strict / "policies.yaml").write_text((strict / "policies.yaml").read_text() + EXTRA_POLICY)
        loaded = bootstrap.load(strict)
        candidate, baseline = Side.of("strict", loaded.config), Side.of("config", load_config(config_dir))
        log = root / ".portcullis" / "decisions.jsonl"
        print(f"{'sources':<32} {'replayed':>7} {'skipped':>7} {'flips':>6} {'read req/s':>12} "
              f"{'replay req/s':>12} {'total req/s':>10}")
        measure("decision log (recorded baseline)", [log], None, candidate, loaded)
        measure("flows + decision log", [flows, log], None, candidate, loaded)
        measure("flows, --baseline config", [flows], baseline, candidate, loaded)


if __name__ == "__main__":
    main()
