"""Answers the gateway gives itself: 401 for missing or bad tokens, 403 block pages (HTML for
browsers, JSON for apps), refusals before policy (400/413/421/431/501/503), and 502 when an
upstream fails. Plain accessible HTML, no external assets, nothing internal (no upstream address,
no stack trace, no proxy name)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from html import escape

from gateway.http.headers import CORRELATION_ID
from gateway.policy.model import AccessRequest, ClientApp, Decision, DeviceSignals, ErrorCode

SECURITY_HEADERS = (
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'"),
)

HEADLINES = {
    ErrorCode.device_not_compliant:
        "This device does not meet your organisation's compliance requirements.",
    ErrorCode.app_not_approved: "This app is not approved to reach this resource.",
    ErrorCode.blocked_by_conditional_access: "Your organisation's policy blocks access to this resource.",
    ErrorCode.blocked_due_to_risk: "This device's threat level is too high to reach this resource.",
    ErrorCode.app_protection_required: "This app needs an app protection policy to reach this resource.",
}
FIXES = {
    ErrorCode.device_not_compliant:
        "Open the company portal on this device, check its compliance and fix what it lists.",
    ErrorCode.app_not_approved: "Use an approved app, such as Outlook, to open your mail and documents.",
    ErrorCode.blocked_by_conditional_access: "Contact your helpdesk with the details below.",
    ErrorCode.blocked_due_to_risk:
        "Open your threat defence app and resolve the threats it reports; "
        "access returns once the device is secure.",
    ErrorCode.app_protection_required:
        "Sign in to an app your organisation protects, such as Outlook, and let it apply the policy "
        "(install Microsoft Authenticator or the Company Portal if it asks).",
}


@dataclass(frozen=True, slots=True)
class GatewayResponse:
    status_code: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def unauthenticated(reason: str, correlation_id: str, *, presented: bool = True,
                    parameters: tuple[tuple[str, str], ...] = (), error: str = "invalid_token") -> GatewayResponse:
    """RFC 6750 §3.1 challenge: ``invalid_token`` only when a token was presented and failed; a
    request without credentials (an empty ``Bearer`` included) learns where to sign in and no
    error. The reason and ``parameters`` are ours or the config's (checked quotable), never client
    input, so they are safe to quote."""
    attributes = [*((("error", error), ("error_description", reason)) if presented else ()),
                  *parameters]
    challenge = "Bearer " + ", ".join(f'{name}="{value}"' for name, value in attributes)
    body = {"error": error if presented else "unauthorized", "error_description": reason,
            "correlationId": correlation_id}
    return _json(401, body, correlation_id, (("WWW-Authenticate", challenge),))


REFUSALS = {400: "bad_request", 403: "access_denied", 404: "not_found", 411: "length_required",
            413: "payload_too_large", 414: "uri_too_long", 421: "misdirected_request",
            431: "request_header_fields_too_large", 500: "internal_error", 501: "not_implemented",
            503: "temporarily_unavailable"}


def refused(status: int, reason: str, correlation_id: str, *, error: str | None = None) -> GatewayResponse:
    """An answer before policy: ambiguous (400), a body or request line too large (413, 414),
    misdirected (421), header fields too many or too large (431), a method never forwarded (501), a
    signal source down (503)."""
    body = {"error": error or REFUSALS[status], "error_description": reason, "correlationId": correlation_id}
    return _json(status, body, correlation_id, (("Retry-After", "30"),) if status == 503 else ())


INTERNAL_ERROR = "the gateway failed on this request; it was not forwarded or its answer was withheld"


def internal_error(correlation_id: str) -> GatewayResponse:
    """A hook failed (``addons/safety.py``): nothing was forwarded, or the upstream's answer is withheld."""
    return refused(500, INTERNAL_ERROR, correlation_id)


def redirect(location: str, correlation_id: str, *, set_cookie: str | None = None) -> GatewayResponse:
    headers = [("Location", location), (CORRELATION_ID, correlation_id), ("Cache-Control", "no-store")]
    if set_cookie:
        headers.append(("Set-Cookie", set_cookie))
    return GatewayResponse(302, tuple(headers), b"")


def signed_out(set_cookie: str) -> GatewayResponse:
    page = ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Signed out</title></head>"
            "<body><main><h1>You are signed out</h1><p>Close this window, or open the page again to sign in."
            "</p></main></body></html>")
    return GatewayResponse(200, (("Content-Type", "text/html; charset=utf-8"), ("Set-Cookie", set_cookie),
                                 *SECURITY_HEADERS), page.encode())


def sign_out_failed() -> GatewayResponse:
    """The session store could not record the sign-out: say so, keep the cookie, let them retry."""
    page = ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Sign-out failed</title></head>"
            "<body><main><h1>Sign-out failed</h1><p>The gateway could not end your session just now. Try again in "
            "a moment.</p></main></body></html>")
    return GatewayResponse(503, (("Content-Type", "text/html; charset=utf-8"), ("Retry-After", "5"),
                                 *SECURITY_HEADERS), page.encode())


def sign_in_failed(reason: str) -> GatewayResponse:
    page = (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Sign-in failed</title></head>"
            f"<body><main><h1>Sign-in failed</h1><p>{escape(reason)}</p></main></body></html>")
    return GatewayResponse(400, (("Content-Type", "text/html; charset=utf-8"), *SECURITY_HEADERS), page.encode())


def session_restricted(reason: str, correlation_id: str, *, html: bool, now: datetime) -> GatewayResponse:
    """Instead of a file the session may not save (or an upload it may not send): why, and that
    viewing in the browser still works."""
    if not html:
        return _json(403, {"error": "session_restricted", "error_description": reason,
                           "correlationId": correlation_id}, correlation_id)
    return _notice(403, "This file can't be saved here", f"""<p>Your organisation's policy for this session says: \
{escape(reason)}.
You can still read your mail and open documents in the browser.</p>
<p><strong>How to get the file:</strong> open it from a managed, compliant device.</p>""", correlation_id, now)


UPSTREAM_FAILED = "the service behind the gateway did not answer properly; try again in a moment"


def bad_gateway(correlation_id: str, *, html: bool, now: datetime) -> GatewayResponse:
    """The upstream refused the connection, dropped it, or answered what no client may get (a
    protocol switch, a malformed head): said in the gateway's words, never naming the upstream."""
    if not html:
        return _json(502, {"error": "bad_gateway", "error_description": UPSTREAM_FAILED,
                           "correlationId": correlation_id}, correlation_id)
    return _notice(502, "This service is not answering", """<p>The service behind the gateway did not answer \
properly. Try again in a moment.</p>
<p>If it keeps happening, give your helpdesk the details below.</p>""", correlation_id, now)


def _notice(status: int, title: str, paragraphs: str, correlation_id: str, now: datetime) -> GatewayResponse:
    """A plain page: a headline, what happened, and the details a helpdesk asks for."""
    page = f"""<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title, quote=False)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:40rem;margin:3rem auto;padding:0 1rem;color:#1b1b1b}}
h1{{font-size:1.6rem}}dt{{font-weight:bold}}</style></head>
<body><main>
<h1>{escape(title, quote=False)}</h1>
{paragraphs}
<dl><dt>Correlation ID</dt><dd>{escape(correlation_id)}</dd>
<dt>Timestamp</dt><dd>{escape(now.isoformat(timespec="seconds"))}</dd></dl>
</main></body></html>
"""
    headers = (("Content-Type", "text/html; charset=utf-8"), (CORRELATION_ID, correlation_id), *SECURITY_HEADERS)
    return GatewayResponse(status, headers, page.encode())


def blocked(
    *,
    decision: Decision,
    request: AccessRequest,
    app: ClientApp,
    device: DeviceSignals,
    remediation_url: str,
    now: datetime,
) -> GatewayResponse:
    code = decision.error_code or ErrorCode.blocked_by_conditional_access
    details = {
        "errorCode": int(code),
        "reason": decision.reason,
        "policy": decision.failed_policy,
        "correlationId": request.correlation_id,
        "timestamp": now.isoformat(timespec="seconds"),
        "app": app.name or app.client_id,
        "ipAddress": request.client_ip,
        "deviceId": device.device_id,
        "devicePlatform": device.device.operating_system if device.device else None,
        "deviceState": _device_state(device),
        "remediationUrl": remediation_url,
    }
    if not request.accepts_html:
        return _json(decision.status_code, {"error": "access_denied", **details}, request.correlation_id)
    return GatewayResponse(
        decision.status_code,
        (("Content-Type", "text/html; charset=utf-8"), (CORRELATION_ID, request.correlation_id), *SECURITY_HEADERS),
        _block_page(code, details).encode(),
    )


def _device_state(device: DeviceSignals) -> str:
    if device.device_id is None:
        return "not identified"
    if device.device is None:
        return "unregistered"
    return device.device.compliance_state.value


def _json(status: int, body: Mapping[str, object], correlation_id: str,
          extra: tuple[tuple[str, str], ...] = ()) -> GatewayResponse:
    headers = (("Content-Type", "application/json"), (CORRELATION_ID, correlation_id), *extra, *SECURITY_HEADERS)
    return GatewayResponse(status, headers, json.dumps(body).encode())


def _block_page(code: ErrorCode, details: dict[str, object]) -> str:
    labels = {
        "errorCode": "Error code", "reason": "Reason", "policy": "Policy", "correlationId": "Correlation ID",
        "timestamp": "Timestamp", "app": "App", "ipAddress": "IP address", "deviceId": "Device ID",
        "devicePlatform": "Device platform", "deviceState": "Device state",
    }
    rows = "\n".join(
        f"<tr><th scope=\"row\">{escape(label)}</th><td>{escape(str(details[key] or '—'))}</td></tr>"
        for key, label in labels.items()
    )
    url = escape(str(details["remediationUrl"]), quote=True)
    return f"""<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>You can't get there from here</title>
<style>body{{font-family:system-ui,sans-serif;max-width:40rem;margin:3rem auto;padding:0 1rem;color:#1b1b1b}}
h1{{font-size:1.6rem}}table{{border-collapse:collapse;width:100%}}th,td{{text-align:left;padding:.3rem .5rem;
border-bottom:1px solid #ddd;vertical-align:top}}th{{width:11rem}}a.button{{display:inline-block;padding:.6rem 1rem;
background:#0067b8;color:#fff;text-decoration:none;border-radius:2px}}</style></head>
<body><main>
<h1>You can't get there from here</h1>
<p>{escape(HEADLINES[code])}</p>
<p><strong>How to fix it:</strong> {escape(FIXES[code])}</p>
<p><a class="button" href="{url}">Check device compliance</a></p>
<details open><summary>More details</summary>
<table>
{rows}
</table></details>
</main></body></html>
"""
