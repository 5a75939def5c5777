"""Hook dispatch alone: what mitmproxy's addon manager costs per flow next to the gateway's
HookTable (addons/mitm_internals.py), on a chain shaped like the gateway's (mitmproxy's five
addons it keeps, and 17 of its own, some with each flow hook), in one run.

    .venv/bin/python bench/hook_dispatch.py [--flows 3000]

Each flow is its four hooks (requestheaders, request, responseheaders, response) through
``handle_lifecycle``, as the proxy server runs them; the hooks themselves do nothing, so the
numbers are the dispatch alone (CPU time of this process).
"""

from __future__ import annotations

import argparse
import asyncio
import time

import mitmproxy.options
from mitmproxy.addons import core, errorcheck, next_layer, proxyserver, tlsconfig
from mitmproxy.master import Master
from mitmproxy.proxy.layers.http import _hooks as http_hooks
from mitmproxy.test import tflow

from addons import mitm_internals

# how many of the gateway's own 17 addons have each flow hook (as addons/runner.py's chain has them, about)
HOOKS = {"requestheaders": 10, "request": 5, "responseheaders": 5, "response": 5, "error": 4}
OWN_ADDONS = 17


def addon(index: int) -> object:
    """An addon with the hooks the ``index``-th of the gateway's own has, each doing nothing."""
    members = {name: (lambda self, flow: None) for name, count in HOOKS.items() if index < count}
    return type(f"Addon{index}", (), members)()


async def per_flow(hook_table: bool, flows: int) -> float:
    """CPU microseconds per flow (its four hooks) through one manager."""
    master = Master(mitmproxy.options.Options(), with_termlog=False)
    try:
        if hook_table:
            mitm_internals.use_hook_table(master)
        master.addons.add(core.Core(), proxyserver.Proxyserver(), next_layer.NextLayer(), tlsconfig.TlsConfig(),
                          errorcheck.ErrorCheck(), *(addon(i) for i in range(OWN_ADDONS)))
        flow = tflow.tflow(resp=True)
        events = [http_hooks.HttpRequestHeadersHook(flow), http_hooks.HttpRequestHook(flow),
                  http_hooks.HttpResponseHeadersHook(flow), http_hooks.HttpResponseHook(flow)]
        started = time.process_time()
        for _ in range(flows):
            for event in events:
                await master.addons.handle_lifecycle(event)
        return (time.process_time() - started) / flows * 1e6
    finally:
        master._legacy_log_events.uninstall()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flows", type=int, default=3000)
    flows = parser.parse_args().flows
    stock = asyncio.run(per_flow(False, flows))
    table = asyncio.run(per_flow(True, flows))
    print(f"mitmproxy's AddonManager: {stock:7.1f} µs per flow ({5 + OWN_ADDONS} addons, 4 hooks, each run again "
          "as update)")
    print(f"HookTable:                {table:7.1f} µs per flow")
    print(f"ratio AddonManager / HookTable: {stock / table:.1f}x; saved per request: {stock - table:.0f} µs")


if __name__ == "__main__":
    main()
