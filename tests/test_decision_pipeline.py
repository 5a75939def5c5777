"""One decision path: an evaluator injected at the pipeline's single call site
(``gateway.decision.pipeline``) is seen by every consumer (the live gateway, What If,
``portcullis test``, the reload case gate and ``portcullis replay``), and nothing else imports
the evaluator, so none of them can decide another way."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.app.cli import main
from gateway.app.demo import ALEX_IPHONE, EXCHANGE, OUTLOOK_MOBILE
from gateway.decision import pipeline
from gateway.http.headers import CORRELATION_ID
from gateway.policy.evaluate import evaluate
from gateway.policy.model import Decision
from tests.conftest import Gateway, Ports, gateway_config, operations_for

MAIL = "mail.contoso.test"
ACTIVESYNC = "/Microsoft-Server-ActiveSync?Cmd=Sync&DeviceType=iPhone"


class InjectedEvaluator:
    """The real evaluator, noting the correlation id of every request it is asked about."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def __call__(self, **arguments: Any) -> Decision:
        self.asked.append(arguments["request"].correlation_id)
        return evaluate(**arguments)


@pytest.fixture
def injected(monkeypatch: pytest.MonkeyPatch) -> InjectedEvaluator:
    evaluator = InjectedEvaluator()
    monkeypatch.setattr(pipeline, "evaluate", evaluator)
    return evaluator


def test_every_consumer_decides_through_the_one_pipeline(gateway: Gateway, injected: InjectedEvaluator,
                                                         tmp_path: Path, demo_ports: Ports) -> None:
    config = gateway_config(tmp_path, gateway.ca, Ports(0, demo_ports.idp, demo_ports.mail, demo_ports.docs))

    token = gateway.idp.mint(user="alex@contoso.test", client_id=OUTLOOK_MOBILE, audience=EXCHANGE,
                             device_id=ALEX_IPHONE)
    answer = gateway.request(MAIL, ACTIVESYNC, method="POST", token=token)  # a real listener, TLS and token
    assert answer.status_code == 200
    correlation_id = answer.headers[CORRELATION_ID]
    assert injected.asked == [correlation_id], "the gateway"

    injected.asked.clear()
    assert main(["whatif", "--config", str(config), "--user", "alex@contoso.test", "--app", "outlook-mobile",
                 "--device", ALEX_IPHONE, "--url", f"https://{MAIL}{ACTIVESYNC}"]) == 0
    assert injected.asked == ["what-if"], "What If"

    injected.asked.clear()
    assert main(["test", "--config", str(config), str(config / "cases.yaml")]) == 0
    assert injected.asked and set(injected.asked) == {"what-if"}, "portcullis test"

    injected.asked.clear()
    reload_gate(config)
    assert injected.asked and set(injected.asked) == {"what-if"}, "the reload case gate"

    injected.asked.clear()
    recorded = tmp_path / "decisions.jsonl"
    recorded.write_text(json.dumps(gateway.decision(correlation_id)) + "\n")
    assert main(["replay", "--config", str(config), str(recorded)]) == 0
    assert injected.asked == [correlation_id], "replay"


def reload_gate(config: Path) -> None:
    """A reload of ``config`` by a gateway's own reloader: its case gate runs the directory's cases."""
    async def reload() -> None:
        operations = await operations_for(config)
        try:
            outcome = await operations.reloader.reload("test")
            assert outcome.applied, outcome.problems
        finally:
            operations.service.close()

    asyncio.run(reload())
