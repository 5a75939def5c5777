"""A gateway of a test's own config, running in a background thread beside the session's."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import mitmproxy.ctx

from addons.runner import RunningGateway, running_gateway
from gateway.app import bootstrap
from tests.conftest import Background, Gateway


@dataclass
class Started:
    gateway: Gateway  # the session's, pointed at this one's listener, config and decision log
    running: RunningGateway
    loop: asyncio.AbstractEventLoop  # the gateway's: reloads run in it

    def reload(self) -> None:
        outcome = asyncio.run_coroutine_threadsafe(self.running.operations.reloader.reload("adminApi"),
                                                   self.loop).result(30)
        assert outcome.applied, outcome.problems


@contextlib.asynccontextmanager
async def _running(config_dir: Path) -> AsyncIterator[tuple[RunningGateway, asyncio.AbstractEventLoop]]:
    async with running_gateway(bootstrap.load(config_dir)) as running:
        yield running, asyncio.get_running_loop()


@contextlib.contextmanager
def started(session: Gateway, config_dir: Path) -> Iterator[Started]:
    """``running_gateway`` on ``config_dir``; mitmproxy's current master is put back afterwards
    (new connections go to the last master built)."""
    previous = (mitmproxy.ctx.master, mitmproxy.ctx.options)
    try:
        with Background(lambda: _running(config_dir)) as (running, loop):
            loaded = bootstrap.load(config_dir)
            log = loaded.config.path(loaded.config.gateway_file.decision_log.path)
            yield Started(replace(session, port=running.addresses[0][1], config_dir=config_dir, decision_log=log),
                          running, loop)
    finally:
        mitmproxy.ctx.master, mitmproxy.ctx.options = previous
