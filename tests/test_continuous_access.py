"""Continuous access evaluation through the real listener: a risk raise written by another
process (as `portcullis devices set-risk` does) blocks the device's next request and closes its
open ActiveSync long-poll; lowering the risk restores access."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from addons.continuous_access import RELOAD_GRACE_SECONDS
from gateway.app import bootstrap
from gateway.app.demo import ALEX_IPHONE, CASEY_IPAD, EXCHANGE, OUTLOOK_MOBILE, activesync
from gateway.decision.service import utc_now
from gateway.events import RULES_RELOADED, ChangeEvent, DevicesChanged
from gateway.ops.operations import Operations
from gateway.policy.model import DeviceThreatLevel, ManagedDevice
from gateway.signals.mtd import Verdict
from gateway.signals.sqlite_store import SqliteDeviceStore
from gateway.signals.store import DeviceStore
from gateway.state.redis_state import RedisState
from tests.conftest import AlexPing, Background, Gateway, Ports, proxy_for
from tests.helpers.reload import own_config, save, stricter
from tests.helpers.signals import second_connection
from tests.redis_server import RedisServer

MAIL = "mail.contoso.test"


@pytest.fixture
def store(gateway: Gateway) -> Iterator[SqliteDeviceStore]:
    with second_connection(gateway.config_dir) as other:
        yield other


def sync(gateway: Gateway, path: str = activesync(ALEX_IPHONE), **kwargs: object) -> httpx.Response:
    token = gateway.idp.mint(user="alex@contoso.test", client_id=OUTLOOK_MOBILE, audience=EXCHANGE,
                             device_id=ALEX_IPHONE)
    return gateway.request(MAIL, path, method="POST", token=token, **kwargs)  # type: ignore[arg-type]


def test_risk_raise_takes_effect_on_the_next_request_and_lowering_restores(gateway: Gateway,
                                                                           store: SqliteDeviceStore) -> None:
    assert sync(gateway).status_code == 200
    store.set_threat_level(ALEX_IPHONE, "lookout", DeviceThreatLevel.high, now=utc_now())
    blocked = sync(gateway)
    assert (blocked.status_code, blocked.json()["reason"]) == (403, "device risk high, allowed: low")
    store.set_threat_level(ALEX_IPHONE, "lookout", DeviceThreatLevel.low, now=utc_now())
    assert sync(gateway).status_code == 200


def test_highest_partner_level_wins(gateway: Gateway, store: SqliteDeviceStore) -> None:
    store.set_threat_level(ALEX_IPHONE, "zimperium", DeviceThreatLevel.medium, now=utc_now())
    try:
        assert sync(gateway).json()["reason"] == "device risk medium, allowed: low"
    finally:
        store.set_threat_level(ALEX_IPHONE, "zimperium", DeviceThreatLevel.secured, now=utc_now())
    assert sync(gateway).status_code == 200


def test_open_long_poll_is_closed_within_a_second_of_a_risk_raise(gateway: Gateway, store: SqliteDeviceStore) -> None:
    ping = AlexPing(gateway).started()
    raised = time.monotonic()
    store.set_threat_level(ALEX_IPHONE, "lookout", DeviceThreatLevel.high, now=utc_now())
    closed = ping.closed_after(raised)
    assert closed is not None and closed < 1.0, f"the long-poll was not closed within a second: {closed}"
    own = ping.decisions(1, again=False)[0]  # logged once it was closed: after the re-decision that closed it
    withdrawn = ping.decisions(1, again=True)[-1]
    assert (withdrawn["continuousAccessEvaluation"], withdrawn["result"], withdrawn["httpStatus"]) == \
        (True, "block", None)  # the client got no answer: its connection was closed
    assert (own["result"], own["httpStatus"], own["upstreamStatus"]) == ("allow", None, None)


@pytest.mark.parametrize(("change", "heard_as", "within"), [
    pytest.param("risk", lambda event: isinstance(event, DevicesChanged) and ALEX_IPHONE in event.device_ids, 1.0,
                 id="risk raise -> closed within a second"),
    pytest.param("rules", lambda event: event == RULES_RELOADED, RELOAD_GRACE_SECONDS + 3,
                 id="tightening reload -> closed after the grace"),
])
def test_a_change_heard_while_a_long_poll_is_being_decided_still_closes_it(
        gateway: Gateway, tmp_path: Path, demo_ports: Ports, change: str, heard_as: Callable[[ChangeEvent], bool],
        within: float) -> None:
    """The decision read the device (and the rules) before the change, and the gateway heard of
    the change before the flow was registered as open: the flow must still be decided again, or
    the Ping keeps access the device no longer has for up to an hour."""
    config_dir = own_config(tmp_path, gateway, demo_ports)  # without the cases the stricter rules break
    loaded = bootstrap.load(config_dir)
    bootstrap.seed_store(loaded)
    read, release, heard = threading.Event(), threading.Event(), threading.Event()

    class ReadThenHeld:
        """The first lookup reads the device, then answers only once the test lets it."""

        name = "sqlite"

        def __init__(self) -> None:
            self.source, self.held = loaded.live_inventory, True

        async def managed_device(self, device_id: str) -> ManagedDevice | None:
            device = await self.source.managed_device(device_id)
            if self.held:
                self.held = False
                read.set()
                await asyncio.to_thread(release.wait, 10)
            return device

    @contextlib.asynccontextmanager
    async def held_gateway() -> AsyncIterator[tuple[int, Path]]:
        service, jwks = bootstrap.build_service(loaded, inventory=ReadThenHeld())
        await jwks.refresh()
        service.subscribe(lambda event: heard.set() if heard_as(event) else None)
        reloader = Operations.of(service, jwks, loaded.inventory).reloader
        # as a running gateway polls the store and watches its files
        jobs = [asyncio.create_task(service.watch_changes()), asyncio.create_task(reloader.watch(0.05, 0.05))]
        try:
            async with proxy_for(service) as port:
                yield port, service.decision_log.path
        finally:
            for job in jobs:
                job.cancel()

    with Background(held_gateway) as (port, log), second_connection(config_dir) as other:
        ping = AlexPing(gateway, port=port, decision_log=log).start()
        assert read.wait(10), "the long-poll's decision never read the device"
        changed = time.monotonic()
        if change == "risk":
            other.set_threat_level(ALEX_IPHONE, "lookout", DeviceThreatLevel.high, now=utc_now())
        else:
            save(config_dir / "policies.yaml", stricter((config_dir / "policies.yaml").read_text()))
        assert heard.wait(10), "the gateway never heard of the change"
        release.set()  # the decision goes on with what it read before the change: allowed
        closed = ping.closed_after(changed)
    assert closed is not None and closed < within, f"the long-poll was answered ({ping.status}), not closed"


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_process_hears_a_change_it_wrote_itself_once(gateway: Gateway, tmp_path: Path, demo_ports: Ports,
                                                       request: pytest.FixtureRequest, kind: str) -> None:
    """A verdict this process stores (an MTD push) reaches its listeners through the store's feed,
    as every other process hears it, and only so: not once when stored and again when the feed
    brings it, which decided every open flow of the device again twice. A change written by
    another process afterwards is heard after everything the feed carried before it."""
    config_dir = own_config(tmp_path, gateway, demo_ports)
    loaded = bootstrap.load(config_dir)
    writers = contextlib.ExitStack()  # another process's connection to the same store
    if kind == "redis":
        redis_server: RedisServer = request.getfixturevalue("redis_server")
        redis_server.start()  # a test before may have stopped it
        prefix = f"t{uuid.uuid4().hex[:8]}:"
        state = RedisState.from_url(redis_server.url, prefix=prefix)
        loaded = dataclasses.replace(loaded, store=state.devices, shared=state)
        other: DeviceStore = RedisState.from_url(redis_server.url, prefix=prefix).devices
        writers.callback(other.close)
    else:
        other = writers.enter_context(second_connection(config_dir))
    bootstrap.seed_store(loaded)

    async def scenario() -> list[ChangeEvent]:
        service, _ = bootstrap.build_service(loaded)
        heard: list[ChangeEvent] = []
        casey_heard = asyncio.Event()

        def listen(event: ChangeEvent) -> None:
            heard.append(event)
            if isinstance(event, DevicesChanged) and event.touches(CASEY_IPAD):
                casey_heard.set()

        service.subscribe(listen)
        jobs = [asyncio.create_task(service.watch_changes())]  # as a running gateway polls its store
        await asyncio.sleep(0)  # the poll has started: the service knows its event loop
        if loaded.shared is not None:  # and listens to the shared state's channel
            connected = asyncio.Event()
            events = loaded.shared.events(on_devices=service.shared_devices_changed,
                                          on_connected=lambda: (service.shared_feed_restored(), connected.set()),
                                          on_lost=service.shared_feed_lost)
            jobs.append(asyncio.create_task(events.run()))
            await asyncio.wait_for(connected.wait(), 5)
        try:
            await asyncio.to_thread(service.record_threat_verdicts, "demo-mtd",
                                    [Verdict(ALEX_IPHONE, DeviceThreatLevel.high)], utc_now())  # as the webhook does
            await asyncio.to_thread(other.set_threat_level, CASEY_IPAD, "lookout", DeviceThreatLevel.low,
                                    now=utc_now())
            await asyncio.wait_for(casey_heard.wait(), 5)
        finally:
            for job in jobs:
                job.cancel()
            service.close()
            if loaded.shared is not None:
                await loaded.shared.aclose()
        return heard

    with writers:
        heard = asyncio.run(scenario())
    assert [e for e in heard if isinstance(e, DevicesChanged) and e.touches(ALEX_IPHONE)] == \
        [DevicesChanged.of([ALEX_IPHONE])]
