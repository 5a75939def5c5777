"""A decision log record told as a trace a person can follow: what was asked, who asked with
which app and device, every signal with its source and age, and each policy's verdict with the
first condition that did not match or the controls that failed. ``portcullis why`` prints it;
the admin dashboard shows it."""

from __future__ import annotations

from typing import Any

from gateway.decision.log import REDECIDED, signal_text

RESULT_MARKS = {
    "success": "+", "failure": "x", "notApplied": "-", "notEnabled": " ",
    "reportOnlySuccess": "+", "reportOnlyFailure": "x", "reportOnlyNotApplied": "-",
}


def explain(record: dict[str, Any]) -> str:
    request = record.get("request") or {}
    status = record.get("status") or {}
    device = record.get("deviceDetail") or {}
    result = record.get("result", "?")
    lines = [
        f"Decision {record.get('correlationId')} at {record.get('createdDateTime')}",
        f"  result:   {result} ({_answer(record)}"
        + (f", error {status['errorCode']}" if status.get("errorCode") else "") + ")",
    ]
    if record.get(REDECIDED):
        lines.append("  decided again while the request was open (continuous access evaluation): the client got "
                     "no answer from this decision")
    if status.get("failureReason"):
        restriction = f" [restriction: {record['restriction']}]" if record.get("restriction") else ""
        lines.append(f"  reason:   {status['failureReason']}{restriction}")
    elif record.get("restriction"):  # allowed, but a session control replaced the upstream's answer
        lines.append(f"  restriction: {record['restriction']} (the upstream's answer was replaced)")
    lines += [
        f"  request:  {request.get('method')} https://{request.get('host')}{request.get('path')} "
        f"from {record.get('ipAddress')} via the {request.get('listener', 'gateway')} listener",
        f"  client:   {record.get('clientAppUsed')}; app {_app(record)}",
        f"  user:     {record.get('userPrincipalName') or record.get('userId') or '(no identity)'}",
        f"  device:   {device.get('deviceId') or '(none)'}"
        + (f" ({device.get('displayName')}, {device.get('operatingSystem')})" if device.get("displayName") else ""),
        f"  resource: {record.get('resourceDisplayName') or '(none)'}" + _also(record),
    ]
    certificate = record.get("deviceCertificate")
    if isinstance(certificate, dict):
        lines.append(f"  certificate: {_certificate(certificate)}")
    signals = record.get("signals") or []
    if signals:
        lines.append("  signals:")
        lines += [f"    {signal_text(s)}" for s in signals]
    policies = record.get("appliedConditionalAccessPolicies") or []
    if policies:
        lines.append("  policies:")
        lines += [f"    {_policy_line(p)}" for p in policies]
    else:
        lines.append("  policies: none evaluated (decided before policy: see the reason)")
    controls = record.get("enforcedSessionControls") or []
    if controls:
        lines.append(f"  session controls: {', '.join(controls)}")
    return "\n".join(lines)


def _answer(record: dict[str, Any]) -> str:
    """What the client got and, for a forwarded request, what the upstream answered."""
    status, upstream = record.get("httpStatus"), record.get("upstreamStatus")
    text = f"HTTP {status}" if status is not None else "no HTTP answer"
    return text + (f", upstream {upstream}" if upstream is not None else "")


def _also(record: dict[str, Any]) -> str:
    others = [r for r in record.get("matchedResources") or [] if r != record.get("resourceDisplayName")]
    return f" (also {', '.join(others)})" if others else ""


def _app(record: dict[str, Any]) -> str:
    name, client_id = record.get("appDisplayName"), record.get("appId")
    if name and client_id:
        return f"{name} ({client_id})"
    return name or client_id or "(none)"


def _policy_line(policy: dict[str, Any]) -> str:
    result = policy.get("result", "?")
    text = f"[{RESULT_MARKS.get(result, '?')}] {policy.get('id')}: {result}"
    if policy.get("rollout"):
        text += f" (rollout: {policy['rollout']})"
    if policy.get("notAppliedBecause"):
        text += f" - {policy['notAppliedBecause']}"
    failures = policy.get("failedControls") or []
    if failures:
        text += " - " + "; ".join(f"{f.get('control')}: {f.get('reason')}" for f in failures)
    elif result in ("success", "reportOnlySuccess") and policy.get("enforcedGrantControls"):
        text += f" - satisfied: {', '.join(policy['enforcedGrantControls'])}"
    return text


def _certificate(certificate: dict[str, object]) -> str:
    """``verified, names intuneDeviceId b7e2... (CN=..., issued by CN=..., serial 0a1b)``"""
    verdict = "verified" if certificate.get("verified") is True else f"not accepted: {certificate.get('problem')}"
    named = f", names {certificate.get('deviceKey')} {certificate.get('deviceValue')}" \
        if certificate.get("deviceValue") else ""
    return (f"{verdict}{named} ({certificate.get('subject')}, issued by {certificate.get('issuer')}, "
            f"serial {certificate.get('serialNumber')})")
