"""The admin dashboard's pages: recent decisions with filters, one decision explained, hits per
policy, signal freshness and the config's state. Plain server-rendered HTML with one inline
stylesheet, no JavaScript and no external assets, so a strict Content-Security-Policy holds (the
stylesheet is allowed by its hash). Every value taken from a record or a query is escaped.

Rendering only: the handlers (gateway/web/admin.py) gather the data and check who may see it.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from html import escape
from typing import Any
from urllib.parse import quote, urlencode

from gateway.ops.health import Check, overall
from gateway.ops.reload import ReloadOutcome
from gateway.policy.model import DecisionResult, Identity, PolicyResultKind

PAGE_SIZE, MAX_PAGE_SIZE = 50, 500
MAX_FILTER_LENGTH = 256
APPLIED = frozenset({PolicyResultKind.success, PolicyResultKind.failure, PolicyResultKind.report_only_success,
                     PolicyResultKind.report_only_failure})
HIT_COLUMNS = (PolicyResultKind.success, PolicyResultKind.failure, PolicyResultKind.report_only_success,
               PolicyResultKind.report_only_failure, PolicyResultKind.not_applied)

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1b1b1b;background:#f5f6f8}
header{background:#1f2937;color:#fff;padding:.6em 1.5em;display:flex;align-items:center;gap:1em}
header h1{font-size:1.15em;margin:0;flex:1}header a{color:#fff}header form{margin:0}
main{padding:1em 1.5em;max-width:90em}section{background:#fff;border:1px solid #dde1e6;border-radius:6px;
padding:.8em 1.2em;margin:0 0 1em}h2{font-size:1.05em;margin:.2em 0 .6em}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.3em .6em;border-bottom:1px solid #eceef1;
vertical-align:top}th{font-weight:600;color:#4b5563;font-size:.9em}td.num{text-align:right}
.allow,.pass,.success{color:#0a7d32;font-weight:600}.block,.fail,.failure{color:#b42318;font-weight:600}
.unauthenticated,.warn{color:#b54708;font-weight:600}form.filters{display:flex;gap:.8em;flex-wrap:wrap;
align-items:end;margin-bottom:.8em}label{display:flex;flex-direction:column;font-size:.85em;color:#4b5563}
input,select,button,textarea{font:inherit}pre{background:#f3f4f6;padding:.8em;overflow:auto;white-space:pre-wrap}
.muted{color:#6b7280}meter{width:8em}textarea{width:100%;min-height:8em}
"""
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'sha256-" + base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
    + "'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


@dataclass(frozen=True, slots=True)
class DecisionFilter:
    """The dashboard's filters, from query parameters; empty means any."""

    result: str = ""
    user: str = ""
    device: str = ""
    policy: str = ""
    limit: int = PAGE_SIZE

    @classmethod
    def of(cls, query: Mapping[str, str]) -> DecisionFilter | str:
        """The filter, or what is wrong with the query."""
        values = {k: query.get(k, "").strip() for k in ("result", "user", "device", "policy", "limit")}
        if any(len(v) > MAX_FILTER_LENGTH for v in values.values()):
            return f"a filter is longer than {MAX_FILTER_LENGTH} characters"
        if values["result"] and values["result"] not in DecisionResult:
            return f"result must be one of {', '.join(DecisionResult)}"
        limit = values.pop("limit") or str(PAGE_SIZE)
        if not limit.isdigit() or not 1 <= int(limit) <= MAX_PAGE_SIZE:
            return f"limit must be a number from 1 to {MAX_PAGE_SIZE}"
        return cls(**values, limit=int(limit))

    def matches(self, record: dict[str, Any], pseudonym: Callable[[str], str] | None = None) -> bool:
        """``user`` is part of a user principal name, or the whole of it when the log holds
        pseudonyms (the typed name is hashed as the log hashed it); ``device`` is part of the device's
        id or name; ``policy`` applied to the request (success or failure, enforced or report-only)."""
        if self.result and record.get("result") != self.result:
            return False
        if self.user and not _user_matches(self.user, record, pseudonym):
            return False
        device = record.get("deviceDetail") or {}
        names = f"{device.get('deviceId') or ''} {device.get('displayName') or ''}".lower()
        if self.device and self.device.lower() not in names:
            return False
        return not self.policy or any(p.get("id") == self.policy and p.get("result") in APPLIED
                                      for p in record.get("appliedConditionalAccessPolicies") or [])

    def query(self, pseudonym: Callable[[str], str] | None = None) -> str:
        """The filters as a query string; with ``pseudonym`` (the audit log's copy, when the
        decision log holds pseudonyms) the typed user name is written as its pseudonym."""
        user = pseudonym(self.user) if pseudonym is not None and self.user else self.user
        return urlencode({k: v for k, v in (("result", self.result), ("user", user), ("device", self.device),
                                            ("policy", self.policy)) if v})


def _user_matches(typed: str, record: dict[str, Any], pseudonym: Callable[[str], str] | None) -> bool:
    names = [str(record.get(k) or "") for k in ("userPrincipalName", "userId")]
    if pseudonym is not None and pseudonym(typed) in names:
        return True
    return any(typed.lower() in name.lower() for name in names)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigState:
    policies: int
    loaded_at: datetime
    last_reload: ReloadOutcome | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Overview:
    caller: Identity
    filters: DecisionFilter
    records: list[dict[str, Any]]  # the matching ones, newest first, at most filters.limit
    matching: int
    kept: int  # decisions held in memory
    policies: list[tuple[str, str]]  # name, state: every configured policy, hit or not
    hits: dict[str, dict[str, int]]
    checks: list[Check]
    config: ConfigState
    now: datetime


def overview_page(view: Overview) -> str:
    body = "".join((_decisions(view), _policy_hits(view.policies, view.hits), _freshness(view.checks),
                    _config_state(view.config, view.now)))
    return page("Dashboard", body, view.caller)


def decision_page(caller: Identity, record: dict[str, Any], explanation: str) -> str:
    correlation_id = str(record.get("correlationId"))
    body = (f'<p><a href="/">&larr; Recent decisions</a></p><section><h2>Decision {escape(correlation_id)}</h2>'
            f'<pre id="explanation">{escape(explanation)}</pre></section><section><details><summary>The record '
            f'(sign-in log shape)</summary><pre id="record">{escape(json.dumps(record, indent=2))}</pre></details>'
            "</section>")
    return page(f"Decision {correlation_id}", body, caller)


def message_page(caller: Identity | None, title: str, message: str) -> str:
    return page(title, f"<section><h2>{escape(title)}</h2><p>{escape(message)}</p>"
                       '<p><a href="/">Back to the dashboard</a></p></section>', caller)


def sign_in_page(message: str | None = None) -> str:
    """Paste an access token for the admin audience; it is kept in an HttpOnly cookie."""
    problem = f'<p class="failure" id="problem">{escape(message)}</p>' if message else ""
    body = (f'<section><h2>Sign in</h2>{problem}<p>Paste an access token from your identity provider for the '
            "admin API, with the role Portcullis.Reader or Portcullis.Operator. It is checked on every page "
            'and kept only in this browser, in a cookie scripts cannot read.</p><form method="post" '
            'action="/signin"><p><textarea name="token" id="token" required autocomplete="off" spellcheck="false">'
            '</textarea></p><p><button type="submit" id="sign-in">Sign in</button></p></form></section>')
    return page("Sign in", body, None)


def page(title: str, body: str, caller: Identity | None) -> str:
    who = ""
    if caller is not None:
        roles = ", ".join(sorted(caller.roles))
        who = (f'<span id="caller">{escape(caller.user_principal_name or caller.subject)} ({escape(roles)})</span>'
               '<form method="post" action="/signout"><button type="submit">Sign out</button></form>')
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width"><style>{STYLE}</style></head><body><header>'
            f'<h1><a href="/">Portcullis</a> · {escape(title)}</h1>{who}</header><main>{body}</main></body></html>')


def _decisions(view: Overview) -> str:
    shown = f"{len(view.records)} of {view.matching} matching" + (
        "" if view.matching == view.kept else f" ({view.kept} recent decisions kept)")
    rows = "".join(_decision_row(r) for r in view.records) or '<tr><td colspan="8" class="muted">none</td></tr>'
    return (f'<section id="decisions"><h2>Recent decisions</h2>{_filter_form(view)}<p class="muted" id="shown">'
            f'{escape(shown)}</p><table><thead><tr><th>time (UTC)</th><th>result</th><th>user</th><th>app</th>'
            "<th>device</th><th>resource</th><th>failed policy</th><th></th></tr></thead>"
            f"<tbody>{rows}</tbody></table></section>")


def _filter_form(view: Overview) -> str:
    chosen = view.filters
    results = _options([("", "any"), *((r.value, r.value) for r in DecisionResult)], chosen.result)
    policies = _options([("", "any"), *((name, name) for name, _ in view.policies)], chosen.policy)
    return ('<form class="filters" method="get" action="/">'
            f'<label>result<select name="result" id="filter-result">{results}</select></label>'
            f'<label>user<input name="user" id="filter-user" value="{escape(chosen.user)}"></label>'
            f'<label>device<input name="device" id="filter-device" value="{escape(chosen.device)}"></label>'
            f'<label>policy applied<select name="policy" id="filter-policy">{policies}</select></label>'
            f'<label>show<input name="limit" type="number" min="1" max="{MAX_PAGE_SIZE}" value="{chosen.limit}">'
            '</label><button type="submit" id="filter">Filter</button> <a href="/">clear</a></form>')


def _options(choices: Iterable[tuple[str, str]], chosen: str) -> str:
    return "".join(f'<option value="{escape(value)}"{" selected" if value == chosen else ""}>{escape(label)}</option>'
                   for value, label in choices)


def _decision_row(record: dict[str, Any]) -> str:
    correlation_id = str(record.get("correlationId") or "")
    result = str(record.get("result") or "")
    device = record.get("deviceDetail") or {}
    failed = next((p.get("id") for p in record.get("appliedConditionalAccessPolicies") or []
                   if p.get("result") == PolicyResultKind.failure), None)
    cells = [str(record.get("createdDateTime") or "")[:19].replace("T", " "), result,
             record.get("userPrincipalName") or "", record.get("appDisplayName") or record.get("appId") or "",
             device.get("displayName") or device.get("deviceId") or "", record.get("resourceDisplayName") or "",
             failed or ""]
    html = "".join(f'<td{f' class="{escape(result)}"' if i == 1 else ""}>{escape(str(c))}</td>'
                   for i, c in enumerate(cells))
    link = f'<a class="explain" href="/decisions/{quote(correlation_id, safe="")}">explain</a>'
    return f'<tr data-id="{escape(correlation_id)}">{html}<td>{link}</td></tr>'


def _policy_hits(policies: list[tuple[str, str]], hits: dict[str, dict[str, int]]) -> str:
    applied = {name: sum(hits.get(name, {}).get(k, 0) for k in APPLIED) for name, _ in policies}
    most = max(applied.values(), default=0) or 1
    heads = "".join(f"<th>{escape(k)}</th>" for k in HIT_COLUMNS)
    rows = "".join(
        f'<tr><td>{escape(name)}</td><td>{escape(state)}</td><td><meter min="0" max="{most}" value="{applied[name]}">'
        f"</meter> {applied[name]}</td>"
        + "".join(f'<td class="num">{hits.get(name, {}).get(k, 0)}</td>' for k in HIT_COLUMNS) + "</tr>"
        for name, state in policies)
    return (f'<section id="policy-hits"><h2>Hits per policy (since start)</h2><table><thead><tr><th>policy</th>'
            f"<th>state</th><th>applied</th>{heads}</tr></thead><tbody>{rows}</tbody></table></section>")


def _freshness(checks: list[Check]) -> str:
    rows = "".join(f'<tr><td>{escape(c.name)}</td><td class="{c.status}">{c.status}</td>'
                   f"<td>{escape(_age(c.age_seconds, unknown='-'))}</td><td>{escape(c.detail)}</td></tr>"
                   for c in checks)
    status = overall(checks)
    return (f'<section id="signals"><h2>Signal freshness: <span class="{status}">{status}</span></h2><table>'
            f"<thead><tr><th>source</th><th>status</th><th>age</th><th>detail</th></tr></thead><tbody>{rows}"
            "</tbody></table></section>")


def _config_state(state: ConfigState, now: datetime) -> str:
    age = _age((now - state.loaded_at).total_seconds())
    lines = [f"{state.policies} policies in force, loaded {state.loaded_at.isoformat(timespec='seconds')} "
             f"({age} ago)."]
    last = state.last_reload
    if last is None:
        lines.append("No reload since start.")
    else:
        verdict = "applied" if last.applied else "rejected: the previous rules stay in force"
        lines.append(f"Last reload ({last.trigger}, {last.at.isoformat(timespec='seconds')}): {verdict}.")
    problems = "".join(f"<li>{escape(p)}</li>" for p in (last.problems if last else ()))
    paragraphs = "".join(f"<p>{escape(line)}</p>" for line in lines)
    return (f'<section id="config"><h2>Configuration</h2>{paragraphs}'
            + (f'<ul class="failure">{problems}</ul>' if problems else "") + "</section>")


def _age(seconds: float | None, unknown: str = "never") -> str:
    if seconds is None:
        return unknown
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"
