"""The device binding steps of the pipeline (``gateway/decision/device_binding.py``), on the demo
rules and inventory: a certificate beats a claim, a bad certificate refuses, a token naming
another device than the certificate refuses, and ``tokenProtection`` honours a token only on a
connection whose certificate names its device. The live listener tests drive real certificates."""

from __future__ import annotations

import asyncio
import base64
import shutil
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.app import bootstrap
from gateway.app.demo import ACTIVESYNC, ALEX_IPHONE, BLAKE_ANDROID, OUTLOOK_MOBILE, activesync
from gateway.decision.device_binding import (
    LEGACY_NEEDS_CERTIFICATE,
    SESSION_BOUND,
    TOKEN_ISSUED_TO_ANOTHER_DEVICE,
    TOKEN_NOT_BOUND,
)
from gateway.decision.pipeline import Decided, Signals, certificate_refusal, restrict_and_evaluate
from gateway.decision.rules import Rules
from gateway.identity.legacy_activesync import basic_user, legacy_identity
from gateway.identity.tokens import RejectedToken
from gateway.policy.model import (
    AccessRequest,
    DecisionResult,
    DeviceCertificate,
    DeviceKey,
    DeviceSignals,
    ErrorCode,
    Identity,
    Restriction,
)
from tests.conftest import REPO

NOW = datetime.now(UTC)
MAIL = "mail.contoso.test"
REQUEST = AccessRequest(correlation_id="c", host=MAIL, path=ACTIVESYNC.partition("?")[0], target=ACTIVESYNC,
                        method="POST", client_ip="203.0.113.10", user_agent="Outlook-iOS/2.0", accepts_html=False)
EXCHANGE = ("exchange-activesync",)


def certificate(device_id: str, problem: str | None = None) -> DeviceCertificate:
    return DeviceCertificate(device_key=DeviceKey.azure_ad_device_id, device_value=device_id,
                             subject=f"CN={device_id}", issuer="CN=Contoso Device CA", serial_number="0a",
                             sha256="00" * 32, not_after=NOW, problem=problem)


def identity(device_id: str | None) -> Identity:
    return Identity(subject="s", user_principal_name="alex@contoso.test", object_id="oid", tenant_id="t",
                    client_id=OUTLOOK_MOBILE, device_id=device_id, groups=frozenset(), audience=f"https://{MAIL}",
                    expires_at=NOW.timestamp() + 3600)


def rules_of(config_dir: Path) -> tuple[Rules, bootstrap.Loaded]:
    loaded = bootstrap.load(config_dir)
    return Rules.of(loaded.config), loaded


@pytest.fixture(scope="module")
def demo() -> tuple[Rules, bootstrap.Loaded]:
    return rules_of(REPO / "config")


@pytest.fixture(scope="module")
def protected(tmp_path_factory: pytest.TempPathFactory) -> tuple[Rules, bootstrap.Loaded]:
    """The demo rules with ``tokenProtection`` on the Exchange policy."""
    copy = tmp_path_factory.mktemp("token-protection") / "config"
    shutil.copytree(REPO / "config", copy)
    policies = copy / "policies.yaml"
    text = policies.read_text()
    anchor = "      maxDeviceThreatLevel: low\n"
    assert text.count(anchor) >= 1
    policies.write_text(text.replace(anchor, anchor + "    sessionControls: {tokenProtection: true}\n", 1))
    return rules_of(copy)


def decide(setup: tuple[Rules, bootstrap.Loaded], *, token_device: str | None, certificate_of: str | None = None,
           problem: str | None = None, target: str = ACTIVESYNC) -> Decided:
    """Through the pipeline's restrict and evaluate step, with the device the certificate (if any,
    else the token) names looked up in the demo inventory, as the gateway's signal source does."""
    rules, loaded = setup
    presented = certificate(certificate_of, problem) if certificate_of is not None else None
    decided_for = certificate_of if presented is not None and presented.verified else token_device
    device = asyncio.run(loaded.inventory.managed_device(decided_for)) if decided_for else None
    signals = Signals(device=DeviceSignals(device_id=decided_for, device=device, source="inventory",
                                           compliance=rules.compliance),
                      certificate_device_id=certificate_of if presented is not None and presented.verified else None)
    request = replace(REQUEST, device_certificate=presented, target=target, path=target.partition("?")[0])
    return restrict_and_evaluate(rules, request, identity(token_device), signals, EXCHANGE, NOW)


def test_a_certificate_naming_the_tokens_device_is_allowed(demo: tuple[Rules, bootstrap.Loaded]) -> None:
    assert decide(demo, token_device=ALEX_IPHONE, certificate_of=ALEX_IPHONE).decision.result is DecisionResult.allow


def test_a_token_replayed_on_another_devices_certificate_is_refused(demo: tuple[Rules, bootstrap.Loaded]) -> None:
    """A stolen compliant phone's token, from a connection whose certificate names another device."""
    decision = decide(demo, token_device=ALEX_IPHONE, certificate_of=BLAKE_ANDROID).decision
    assert (decision.result, decision.status_code, decision.error_code) == \
        (DecisionResult.block, 403, ErrorCode.device_not_compliant)
    assert (decision.restriction, decision.reason) == (Restriction.token_device_mismatch,
                                                       TOKEN_ISSUED_TO_ANOTHER_DEVICE)


def test_the_certificate_names_the_device_a_token_without_deviceid_is_decided_for(
        demo: tuple[Rules, bootstrap.Loaded]) -> None:
    """An issuer without a deviceid claim (Keycloak, Okta): the certificate's device is the one
    policy sees, compliant or not."""
    assert decide(demo, token_device=None, certificate_of=ALEX_IPHONE).decision.allowed
    blake = decide(demo, token_device=None, certificate_of=BLAKE_ANDROID, target=activesync(BLAKE_ANDROID, "blake"))
    assert not blake.decision.allowed and blake.decision.restriction is None  # policy refused it
    assert blake.device.device_id == BLAKE_ANDROID and blake.decision.error_code is ErrorCode.device_not_compliant


def test_a_certificate_that_is_not_believed_refuses_before_identity_even_where_none_is_required(
        demo: tuple[Rules, bootstrap.Loaded]) -> None:
    rules, _ = demo
    refused = certificate_refusal(rules, replace(REQUEST, device_certificate=certificate(ALEX_IPHONE, "expired")))
    assert refused is not None and refused.identity is None  # before any token is read
    decision = refused.decision
    assert (decision.result, decision.restriction, decision.error_code) == \
        (DecisionResult.block, Restriction.device_certificate, ErrorCode.device_not_compliant)
    assert "expired" in decision.reason
    assert certificate_refusal(rules, replace(REQUEST, device_certificate=certificate(ALEX_IPHONE))) is None
    assert certificate_refusal(rules, REQUEST) is None  # none presented, none required


@pytest.mark.parametrize(("token_device", "certificate_of", "allowed"), [
    pytest.param(ALEX_IPHONE, ALEX_IPHONE, True, id="the token's device on its certificate -> allowed"),
    pytest.param(ALEX_IPHONE, None, False, id="the token without a certificate -> refused"),
    pytest.param(None, ALEX_IPHONE, False, id="a token naming no device -> refused: it is bound to none"),
])
def test_token_protection_honours_a_token_only_on_its_devices_certificate(
        protected: tuple[Rules, bootstrap.Loaded], demo: tuple[Rules, bootstrap.Loaded], token_device: str | None,
        certificate_of: str | None, allowed: bool) -> None:
    decision = decide(protected, token_device=token_device, certificate_of=certificate_of).decision
    assert decision.allowed is allowed
    if not allowed:
        assert (decision.restriction, decision.reason, decision.error_code) == \
            (Restriction.token_protection, TOKEN_NOT_BOUND, ErrorCode.device_not_compliant)
        assert "tokenProtection" in decision.session_controls.names()
    if token_device is not None:  # the same request where no policy asks for token protection
        assert decide(demo, token_device=token_device, certificate_of=certificate_of).decision.allowed


def test_the_kiosk_never_reads_a_certificate(demo: tuple[Rules, bootstrap.Loaded]) -> None:
    rules, _ = demo
    request = replace(REQUEST, kiosk_location="kiosk", device_certificate=certificate(ALEX_IPHONE, "expired"))
    assert certificate_refusal(rules, request) is None
    signals = Signals(device=DeviceSignals(device_id=None, device=None, source="inventory"),
                      certificate_problem="named no device")
    decided = restrict_and_evaluate(rules, request, identity(None), signals, EXCHANGE, NOW)
    assert decided.decision.restriction is not Restriction.device_certificate


@pytest.mark.parametrize(("certificate_of", "allowed"), [
    pytest.param(ALEX_IPHONE, True, id="on its device's certificate -> allowed"),
    pytest.param(None, False, id="its cookie in a browser without the certificate -> refused"),
    pytest.param(BLAKE_ANDROID, False, id="on another device's certificate -> refused"),
])
def test_a_session_signed_in_with_a_certificate_is_honoured_only_on_that_device(
        demo: tuple[Rules, bootstrap.Loaded], certificate_of: str | None, allowed: bool) -> None:
    rules, loaded = demo
    presented = certificate(certificate_of) if certificate_of else None
    device = asyncio.run(loaded.inventory.managed_device(certificate_of or ALEX_IPHONE))
    signals = Signals(device=DeviceSignals(device_id=certificate_of or ALEX_IPHONE, device=device,
                                           source="inventory", compliance=rules.compliance),
                      certificate_device_id=certificate_of)
    owa = replace(REQUEST, device_certificate=presented, path="/owa/", target="/owa/", method="GET",
                  accepts_html=True, user_agent="Mozilla/5.0")
    decided = restrict_and_evaluate(rules, owa, identity(ALEX_IPHONE), signals, ("exchange-owa",), NOW,
                                    certificate_bound=True)
    assert decided.decision.allowed is allowed
    if not allowed:
        assert (decided.decision.restriction, decided.decision.reason) == \
            (Restriction.token_device_mismatch, SESSION_BOUND)


def basic(user: str, password: str = "secret") -> list[str]:  # noqa: S107  (a test credential)
    return ["Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()]


def test_only_a_basic_user_principal_name_is_read_never_the_password() -> None:
    assert basic_user(basic("Alex@Contoso.test")) == "alex@contoso.test"
    assert basic_user(["Bearer eyJ"]) is None and basic_user([]) is None
    for refused in (basic("CONTOSO\\alex"), basic("alex"), ["Basic !!!"], ["Basic " + "A" * 2000]):
        assert isinstance(basic_user(refused), RejectedToken), refused


@pytest.mark.parametrize(("user", "certificate_of", "reason"), [
    pytest.param("alex@contoso.test", ALEX_IPHONE, None, id="the user's compliant device -> on to policy"),
    pytest.param("alex@contoso.test", None, LEGACY_NEEDS_CERTIFICATE, id="no certificate -> refused"),
    pytest.param("drew@contoso.test", ALEX_IPHONE, "another user", id="another user's device -> refused"),
    pytest.param("blake@contoso.test", BLAKE_ANDROID, "noncompliant", id="a noncompliant device -> refused"),
])
def test_legacy_activesync_is_believed_only_with_a_certificate_of_a_compliant_device_of_that_user(
        demo: tuple[Rules, bootstrap.Loaded], user: str, certificate_of: str | None, reason: str | None) -> None:
    rules, loaded = demo
    device = asyncio.run(loaded.inventory.managed_device(certificate_of)) if certificate_of else None
    signals = Signals(device=DeviceSignals(device_id=certificate_of, device=device, source="inventory",
                                           compliance=rules.compliance), certificate_device_id=certificate_of,
                      check_binding=False)
    request = replace(REQUEST, device_certificate=certificate(certificate_of) if certificate_of else None)
    decision = restrict_and_evaluate(rules, request, legacy_identity(user, MAIL), signals, EXCHANGE, NOW,
                                     legacy=True).decision
    if reason is None:  # past the legacy check: policy decides (the demo's Exchange policy wants an approved app)
        assert decision.restriction is None and decision.failed_policy_id == "exchange-outlook-only"
    else:
        assert (decision.result, decision.restriction) == (DecisionResult.block, Restriction.legacy_active_sync)
        assert reason in decision.reason
