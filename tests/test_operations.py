"""Readiness checks and the metrics that do not need the admin listener: what an operator's
load balancer and alerts see when a dependency fails."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from ruamel.yaml import YAML

from gateway.app.demo import ACTIVESYNC, ALEX_IPHONE, EXCHANGE, OUTLOOK_MOBILE
from gateway.errors import SignalUnavailable
from gateway.ops.health import overall
from tests.conftest import Background, Gateway, Ports, free_port
from tests.helpers.hosts import MAIL
from tests.helpers.operations import operated, own_config
from tests.helpers.tokens import outlook_token
from tests.helpers.upstreams import SilentUpstream, hang_up_while_pings_wait


def test_an_upstream_that_fails_is_counted_per_host(gateway: Gateway, tmp_path: Path, demo_ports: Ports) -> None:
    dead_mail = Ports(0, demo_ports.idp, free_port(), demo_ports.docs)
    config_dir = own_config(tmp_path, gateway, dead_mail)
    token = gateway.idp.mint(user="alex@contoso.test", client_id=OUTLOOK_MOBILE, audience=EXCHANGE,
                             device_id=ALEX_IPHONE)
    with Background(lambda: operated(config_dir)) as (port, operations):
        response = gateway.request(MAIL, ACTIVESYNC, method="POST", token=token, port=port)
        refused = gateway.request(MAIL, ACTIVESYNC, method="POST", port=port)  # never forwarded: not an upstream error
        counted = operations.service.metrics.upstream_errors.labels(MAIL)._value.get()
    assert response.status_code == 502 and refused.status_code == 401
    assert counted == 1


def test_a_client_that_hangs_up_or_resets_its_stream_is_not_an_upstream_error(gateway: Gateway, tmp_path: Path,
                                                                                demo_ports: Ports) -> None:
    """While a Ping waits for the upstream, an HTTP/1.1 client closes its connection and an
    HTTP/2 client resets its stream: neither is the upstream's failure. An upstream that closes
    without an answer is (502)."""
    upstream = SilentUpstream()
    config_dir = own_config(tmp_path, gateway, Ports(0, demo_ports.idp, upstream.port, demo_ports.docs))
    with Background(lambda: operated(config_dir)) as (port, operations):
        hang_up_while_pings_wait(replace(gateway, port=port), upstream)
        failed = gateway.request(MAIL, ACTIVESYNC, method="POST", token=outlook_token(gateway), port=port)
        counted = operations.service.metrics.upstream_errors.labels(MAIL)._value.get()
    upstream.close()
    assert failed.status_code == 502
    assert counted == 1


def test_readiness_fails_while_the_issuer_keys_were_never_fetched(gateway: Gateway, tmp_path: Path,
                                                                  demo_ports: Ports) -> None:
    dead_issuer = Ports(0, free_port(), demo_ports.mail, demo_ports.docs)
    config_dir = own_config(tmp_path, gateway, dead_issuer)

    async def checks() -> list[tuple[str, str]]:
        async with operated(config_dir, fetch_keys=False) as (_, operations):
            with contextlib.suppress(SignalUnavailable):
                await operations.health.issuers.refresh()
            found = operations.health.checks()
            assert overall(found) == "fail"
            return [(c.name, c.status) for c in found]

    found = asyncio.run(checks())
    assert ("jwks", "fail") in found
    assert ("config", "pass") in found and ("deviceInventory", "pass") in found


def test_readiness_passes_with_fresh_signals_and_warns_about_a_silent_mtd_partner(
        gateway: Gateway, tmp_path: Path, demo_ports: Ports) -> None:
    config_dir = own_config(tmp_path, gateway, Ports(0, demo_ports.idp, demo_ports.mail, demo_ports.docs))
    yaml = YAML()
    settings = yaml.load(config_dir / "portcullis.yaml")
    settings["mtdPartners"]["lookout"] = {"secretEnv": "LOOKOUT_SECRET"}  # a second partner, not heard from yet
    yaml.dump(settings, config_dir / "portcullis.yaml")
    with Background(lambda: operated(config_dir)) as (_, operations):
        before = {c.name: c for c in operations.health.checks()}
        ages_before = dict(operations.health.signal_ages())
        assert operations.service.store is not None
        operations.service.store.partner_contact("lookout", now=datetime.now(UTC))
        after = {c.name: c for c in operations.health.checks()}
        ages = dict(operations.health.signal_ages())
    assert before["jwks"].status == "pass" and before["jwks"].age_seconds is not None
    assert before["mtd:demo-mtd"].status == "pass"  # the seeded verdicts carry their report time
    assert before["mtd:lookout"].status == "warn" and "never heard from" in before["mtd:lookout"].detail
    assert overall(list(before.values())) == "warn"
    assert after["mtd:lookout"].status == "pass"
    assert overall(list(after.values())) == "pass"
    assert ages["jwks"] is not None and ages["mtd:lookout"] is not None and ages["mtd:lookout"] < 60
    assert ages_before["mtd:lookout"] is None  # never heard from: NaN in the metric
    assert "deviceInventory" not in ages  # read in place: no age, so no always-NaN series
