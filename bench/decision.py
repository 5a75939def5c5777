"""The whole decision alone: ``AccessService.authorize`` and its record, in-process, on the demo
config, for Alex's ActiveSync request with a valid token (every cache warm after the first), with
no proxy and no sockets (the demo issuer is served to the gateway through httpx's ASGI transport).
Prints CPU microseconds per decision, then where they go (cProfile over a second batch).

    .venv/bin/python bench/decision.py [--decisions 2000] [--passes 5] [--top 25]

The reverse proxy and the forward-auth listener both pay this per request; what they add around
it is in throughput.py.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.app import bootstrap
from gateway.app.cli import main as portcullis
from gateway.app.demo import ACTIVESYNC, ACTIVESYNC_UA, ALEX_IPHONE, EXCHANGE, OUTLOOK_MOBILE
from gateway.decision.service import AccessService, new_correlation_id
from gateway.identity.issuers import fetch_issuer_keys
from gateway.policy.model import AccessRequest
from gateway.web.demo_idp import DemoIdentityProvider

REPO = Path(__file__).resolve().parents[1]
MAIL = "mail.contoso.test"


async def decide(service: AccessService, authorization: list[str], count: int) -> None:
    for _ in range(count):
        request = AccessRequest(correlation_id=new_correlation_id(), host=MAIL, path=ACTIVESYNC.split("?")[0],
                                target=ACTIVESYNC, method="POST", client_ip="203.0.113.10", user_agent=ACTIVESYNC_UA,
                                accepts_html=False, authority=MAIL)
        outcome = await service.authorize(request, authorization, None)
        if outcome.response is not None:
            raise SystemExit(f"not allowed: {outcome.response.status_code} {outcome.response.body[:200]!r}")
        service.record_answer(outcome.record, 200, 200)


async def run(config_dir: Path, decisions: int, passes: int, top: int) -> None:
    loaded = bootstrap.load(config_dir)
    bootstrap.seed_store(loaded)
    idp = DemoIdentityProvider(loaded.config.gateway_file.browser_issuer.issuer)
    service, issuers = bootstrap.build_service(loaded, transport=httpx.ASGITransport(app=idp.app()))
    await fetch_issuer_keys(issuers.refresh(), loaded.config)
    token = idp.mint(user="alex@contoso.test", client_id=OUTLOOK_MOBILE, audience=EXCHANGE, device_id=ALEX_IPHONE)
    authorization = [f"Bearer {token}"]
    await decide(service, authorization, 200)  # warm: token, keys, device and policy caches
    costs = []
    for _ in range(passes):
        started = time.process_time()
        await decide(service, authorization, decisions)
        costs.append((time.process_time() - started) / decisions * 1e6)
    print(f"{min(costs):,.0f} µs of CPU per decision at best, {statistics.median(costs):,.0f} median, over {passes} "
          f"passes of {decisions:,} decisions (warm caches, decision log on, assertion on)")
    profiler = cProfile.Profile()
    profiler.enable()
    await decide(service, authorization, decisions)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    print("\nwhere it goes (cProfile, by own time; cProfile itself slows every call):")
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[:20_000])
    service.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decisions", type=int, default=2000)
    parser.add_argument("--passes", type=int, default=5, help="timed passes; the best and the median are printed")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="portcullis-decision-") as temp:
        config_dir = Path(temp) / "config"
        shutil.copytree(REPO / "config", config_dir)
        if portcullis(["certs", "--config", str(config_dir), "init"]) != 0:  # the demo's certificates and device CA
            raise SystemExit("portcullis certs init failed")
        asyncio.run(run(config_dir, args.decisions, args.passes, args.top))


if __name__ == "__main__":
    main()
