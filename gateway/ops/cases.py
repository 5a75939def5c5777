"""Policy tests: named What If questions with the answer a team expects, kept in YAML beside the
policies (OPA-style), run by ``portcullis test`` and ``portcullis check``.

    cases:
      - name: Outlook on a compliant phone reaches ActiveSync
        user: alex@contoso.test
        app: outlook-mobile              # a configured application name, or a client id
        device: 3c5f0b1e-...             # looked up in the config's inventory; omit for none
        url: https://mail.contoso.test/Microsoft-Server-ActiveSync
        ip: 10.20.1.5                    # optional (default 203.0.113.10, outside every location)
        clientAppType: browser           # optional; else worked out as the gateway does
        groups: [finance]                # optional: the token's groups claim
        mfa: true                        # optional: amr contains mfa
        platform: iOS                    # optional: when the device is not in the inventory
        listener: kiosk                  # optional: gateway (default), kiosk (an unmanaged browser) or forwardAuth
        objectId: 790e6855-...           # optional: the token's oid (a rollout's percentOfUsers share uses it)
        expect:
          result: block                  # allow | block
          errorCode: 53002               # optional
          failedPolicy: exchange-outlook-only   # optional: the deciding policy's name
          sessionControls: [blockDownloads]     # optional: exactly these
          restriction: blockDownloads           # optional: what refused it besides policy (blockDownloads,
                                                # blockUploads, activeSyncDeviceIdMismatch), as at the gateway
          policyResults:                        # optional: per policy name, e.g. for report-only trials
            new-mfa-trial: reportOnlyFailure
          policyRollouts:                       # optional: per policy with a rollout, in its cohort or not
            mfa-pilot: inCohort:group
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import Field, IPvAnyAddress

from gateway.config.loader import raise_if, read_yaml, validate
from gateway.config.models import Model
from gateway.ops.whatif import DEFAULT_IP, Question, WhatIf, WhatIfError
from gateway.policy.model import (
    ClientAppType,
    Decision,
    DevicePlatform,
    Listener,
    PolicyResultKind,
    Restriction,
    RolloutCohort,
)


class ExpectedResult(StrEnum):
    allow = "allow"
    block = "block"


class Expectation(Model):
    result: ExpectedResult
    error_code: int | None = None
    failed_policy: str | None = None
    session_controls: list[str] | None = None
    restriction: Restriction | None = None
    policy_results: dict[str, PolicyResultKind] = {}
    policy_rollouts: dict[str, RolloutCohort] = {}


class QuestionInput(Model):
    """A What If question as YAML or JSON: a case's keys, and the admin API's ``POST /admin/whatif``."""

    user: Annotated[str, Field(min_length=1)]
    url: Annotated[str, Field(min_length=1)]
    app: str | None = None
    device: str | None = None
    ip: IPvAnyAddress = ipaddress.ip_address(DEFAULT_IP)
    client_app_type: ClientAppType | None = None
    groups: list[str] = []
    mfa: bool = False
    platform: DevicePlatform | None = None
    listener: Listener = Listener.gateway
    object_id: str | None = None
    device_certificate: str | None = None  # the device a verified certificate names (azureADDeviceId)
    amr: list[Annotated[str, Field(min_length=1, max_length=32)]] = []  # more authentication methods (fido)
    acrs: list[Annotated[str, Field(pattern=r"^c([1-9]|[1-9][0-9])$")]] = []  # authentication contexts
    issuer: str | None = None  # the token's issuer by name (identity.issuers); default the first

    def question(self) -> Question:
        return Question(user=self.user, url=self.url, app=self.app, device=self.device, ip=str(self.ip),
                        client_app_type=self.client_app_type, groups=tuple(self.groups), mfa=self.mfa,
                        platform=self.platform, listener=self.listener, object_id=self.object_id,
                        device_certificate=self.device_certificate, authentication_methods=tuple(self.amr),
                        authentication_contexts=tuple(self.acrs), issuer=self.issuer)


class Case(QuestionInput):
    name: Annotated[str, Field(min_length=1)]
    expect: Expectation


class CasesFile(Model):
    cases: Annotated[list[Case], Field(min_length=1)]


@dataclass(frozen=True, slots=True)
class CaseOutcome:
    name: str
    differences: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.differences


def load_cases(path: Path) -> list[Case]:
    """Raises ConfigError (file:line) for a malformed cases file."""
    data, problems = read_yaml(path, str(path))
    cases_file = None
    if not problems:
        cases_file, problems = validate(CasesFile, data, str(path))
    raise_if(problems)
    assert cases_file is not None  # no problems
    return cases_file.cases


async def run_cases(what_if: WhatIf, cases: list[Case], now: datetime) -> list[CaseOutcome]:
    return [await _run(what_if, case, now) for case in cases]


async def _run(what_if: WhatIf, case: Case, now: datetime) -> CaseOutcome:
    try:
        decision = await what_if.ask(case.question(), now)
    except WhatIfError as error:
        return CaseOutcome(case.name, (f"cannot ask: {error}",))
    differences = [*_decision_differences(case.expect, decision), *_policy_differences(case.expect, decision)]
    return CaseOutcome(case.name, tuple(differences))


def _decision_differences(expected: Expectation, decision: Decision) -> list[str]:
    """Where the decision itself is not what the case expects."""
    differences = []
    got_code = int(decision.error_code) if decision.error_code else None
    if decision.result.value != expected.result.value:
        by = f", {decision.failed_policy_id}" if decision.failed_policy_id else ""
        differences.append(f"result: expected {expected.result.value}, got {decision.result.value}"
                           f" ({decision.reason}{by})")
    if expected.error_code is not None and got_code != expected.error_code:
        differences.append(f"errorCode: expected {expected.error_code}, got {got_code}")
    if expected.failed_policy is not None and decision.failed_policy_id != expected.failed_policy:
        differences.append(f"failedPolicy: expected {expected.failed_policy}, got {decision.failed_policy_id}")
    got_session = list(decision.session_controls.names())
    if expected.session_controls is not None and sorted(got_session) != sorted(expected.session_controls):
        differences.append(f"sessionControls: expected {expected.session_controls}, got {got_session}")
    if expected.restriction is not None and decision.restriction is not expected.restriction:
        got_restriction = decision.restriction.value if decision.restriction else None
        differences.append(f"restriction: expected {expected.restriction.value}, got {got_restriction}")
    return differences


def _policy_differences(expected: Expectation, decision: Decision) -> list[str]:
    """Where a named policy's result or rollout cohort is not what the case expects."""
    differences = []
    results = {r.name: r.result for r in decision.all_policies()}
    for name, wanted in expected.policy_results.items():
        if results.get(name) is not wanted:
            differences.append(f"policyResults.{name}: expected {wanted.value}, got "
                               f"{results[name].value if name in results else 'no such policy'}")
    rollouts = {r.name: r.rollout for r in decision.all_policies()}
    for name, cohort in expected.policy_rollouts.items():
        if rollouts.get(name) is not cohort:
            got = rollouts.get(name, "no such policy") or "no rollout"
            differences.append(f"policyRollouts.{name}: expected {cohort.value}, got {got}")
    return differences
