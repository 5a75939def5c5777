"""The decision log record of an authorization: built here, written by the consumer (a refusal at
once, a forwarded request's when its answer is known: ``AccessService.record_answer``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from gateway.decision.log import sign_in_record
from gateway.decision.outcome import Authorization
from gateway.decision.rules import Rules


def decision_record(result: Authorization, rules: Rules, now: datetime) -> dict[str, Any]:
    """The sign-in record, in Entra's sign-in log shape, with the signals the decision used."""
    return sign_in_record(request=result.request, decision=result.decision, now=now, identity=result.identity,
                          device=result.device, app=result.app, identity_source=result.identity_source,
                          locations=rules.locations(result.request))
