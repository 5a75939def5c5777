"""Continuous access evaluation through the real listener: a risk raise written by another
process (as `portcullis devices set-risk` does) blocks the device's next request and closes its
open ActiveSync long-poll; lowering the risk restores access."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from gateway import bootstrap
from gateway.access import utc_now
from gateway.demo import ALEX_IPHONE, EXCHANGE, OUTLOOK_MOBILE, activesync
from gateway.policy.model import DeviceThreatLevel
from gateway.signals.sqlite_store import DeviceStore
from tests.conftest import AlexPing, Gateway

MAIL = "mail.contoso.test"


@pytest.fixture
def store(gateway: Gateway) -> Iterator[DeviceStore]:
    """A second connection to the gateway's inventory, as the CLI or another worker has."""
    config = bootstrap.load(gateway.config_dir).config
    other = DeviceStore(config.path(config.gateway_file.device_signals.database))  # type: ignore[arg-type]
    yield other
    other.set_threat_level(ALEX_IPHONE, "lookout", DeviceThreatLevel.low, now=utc_now())
    other.close()


def sync(gateway: Gateway, path: str = activesync(ALEX_IPHONE), **kwargs: object) -> httpx.Response:
    token = gateway.idp.mint(user="alex@contoso.test", client_id=OUTLOOK_MOBILE, audience=EXCHANGE,
                             device_id=ALEX_IPHONE)
    return gateway.request(MAIL, path, method="POST", token=token, **kwargs)  # type: ignore[arg-type]


def test_risk_raise_takes_effect_on_the_next_request_and_lowering_restores(gateway: Gateway,
                                                                           store: DeviceStore) -> None:
    assert sync(gateway).status_code == 200
    store.set_threat_level(ALEX_IPHONE, "lookout", DeviceThreatLevel.high, now=utc_now())
    blocked = sync(gateway)
    assert (blocked.status_code, blocked.json()["reason"]) == (403, "device risk high, allowed: low")
    store.set_threat_level(ALEX_IPHONE, "lookout", DeviceThreatLevel.low, now=utc_now())
    assert sync(gateway).status_code == 200


def test_highest_vendor_level_wins(gateway: Gateway, store: DeviceStore) -> None:
    store.set_threat_level(ALEX_IPHONE, "zimperium", DeviceThreatLevel.medium, now=utc_now())
    try:
        assert sync(gateway).json()["reason"] == "device risk medium, allowed: low"
    finally:
        store.set_threat_level(ALEX_IPHONE, "zimperium", DeviceThreatLevel.secured, now=utc_now())
    assert sync(gateway).status_code == 200


def test_open_long_poll_is_closed_within_a_second_of_a_risk_raise(gateway: Gateway, store: DeviceStore) -> None:
    ping = AlexPing(gateway).started()
    raised = time.monotonic()
    store.set_threat_level(ALEX_IPHONE, "lookout", DeviceThreatLevel.high, now=utc_now())
    closed = ping.closed_after(raised)
    assert closed is not None and closed < 1.0, f"the long-poll was not closed within a second: {closed}"
