"""The What If tool and policy tests: "what if this user, with this app, on this device, opened
this URL?" answered by the same ``evaluate`` the gateway runs, with the device taken from the
configured inventory.

JSON output (``portcullis whatif --json``), stable::

    {"input": {...the question, with "listener": "gateway" | "kiosk"...},
     "result": "allow" | "block", "httpStatus": 200 | 403, "errorCode": 0 | 53000 | ...,
     "reason": "...", "resource": "exchange-owa" | null, "clientAppType": "browser" | ...,
     "failedPolicy": "policy-name" | null, "sessionControls": ["blockDownloads", ...],
     "policies": [{"id", "displayName", "state", "result", "notAppliedBecause"?,
                   "enforcedGrantControls", "enforcedSessionControls", "failedControls"?,
                   "rollout"?: "inCohort:group" | "inCohort:percentOfUsers" | "inCohort:listener"
                               | "outsideCohort"}, ...]}
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from gateway.audit import policy_entry
from gateway.config import Config
from gateway.paths import canonical_path
from gateway.policy.evaluate import evaluate
from gateway.policy.model import (
    AccessRequest,
    ClientApp,
    ClientAppType,
    Decision,
    DevicePlatform,
    DeviceSignals,
    Identity,
    Listener,
)
from gateway.policy.policy_set import PolicySet
from gateway.signals.devices import DeviceInventory

GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE)
DEFAULT_IP = "203.0.113.10"  # TEST-NET-3: outside every named location unless a case says otherwise
USER_AGENTS = {
    ClientAppType.browser: "Mozilla/5.0 (What If)",
    ClientAppType.exchange_active_sync: "What-If-ActiveSync/1.0",
}


class WhatIfError(ValueError):
    """The question cannot be asked of this config (unknown app, host, ...)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Question:
    user: str
    url: str
    app: str | None = None
    device: str | None = None
    ip: str = DEFAULT_IP
    client_app_type: ClientAppType | None = None
    groups: tuple[str, ...] = ()
    mfa: bool = False
    platform: DevicePlatform | None = None
    listener: Listener = Listener.gateway  # kiosk: through the kiosk forward proxy (an unmanaged browser)
    object_id: str | None = None  # the token's oid: a rollout's percentOfUsers share is drawn on it (else on user)

    def as_json(self) -> dict[str, Any]:
        return {"user": self.user, "url": self.url, "app": self.app, "device": self.device, "ip": self.ip,
                "clientAppType": self.client_app_type.value if self.client_app_type else None,
                "groups": list(self.groups), "mfa": self.mfa,
                "platform": self.platform.value if self.platform else None, "listener": self.listener.value,
                "objectId": self.object_id}


class WhatIf:
    def __init__(self, config: Config, inventory: DeviceInventory) -> None:
        self.config = config
        self.inventory = inventory
        self.policy_set = PolicySet.build(config.resources, config.policies, config.gateway_file.named_locations)
        self._app_names = config.app_names_by_client_id()

    async def ask(self, question: Question, now: datetime) -> Decision:
        host, path = self._target(question.url)
        app = self._app(question.app)
        kiosk_location = self._kiosk_location(question.listener)
        device_id = question.device.lower() if question.device and kiosk_location is None else None  # as the gateway
        record = await self.inventory.managed_device(device_id) if device_id else None
        device = DeviceSignals(device_id=device_id, device=record, source=self.inventory.name,
                               compliance=self.config.gateway_file.device_signals.compliance.settings())
        user_agent = USER_AGENTS.get(question.client_app_type or ClientAppType.other, "What-If/1.0")
        if question.platform is not None:
            user_agent += f" ({question.platform.value})"
        request = AccessRequest(correlation_id="what-if", host=host, path=path, method="GET",
                                client_ip=question.ip, user_agent=user_agent,
                                accepts_html=question.client_app_type is ClientAppType.browser,
                                declared_client_app_type=question.client_app_type, kiosk_location=kiosk_location)
        identity = Identity(subject=question.user, user_principal_name=question.user, object_id=question.object_id,
                            tenant_id=None, client_id=app.client_id, device_id=device.device_id,
                            groups=frozenset(question.groups), audience="what-if", expires_at=0,
                            authentication_methods=frozenset({"pwd", "mfa"} if question.mfa else {"pwd"}))
        found = self.policy_set.match(host, path)
        if found is not None and found.public:
            raise WhatIfError(f"{question.url!r} is a public resource ({found.primary}): no policy applies to it")
        return evaluate(request=request, identity=identity, device=device, app=app,
                        resources=found.names if found else (), policy_set=self.policy_set, now=now)

    def _target(self, url: str) -> tuple[str, str]:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if parts.scheme != "https" or host not in self.config.gateway_file.protected_hosts:
            known = ", ".join(f"https://{h}/..." for h in self.config.gateway_file.protected_hosts)
            raise WhatIfError(f"{url!r} is not on a protected host ({known})")
        path = canonical_path(parts.path or "/")
        if path is None:
            raise WhatIfError(f"{url!r} has an ambiguous path: the gateway answers it with 400")
        return host, path

    def _kiosk_location(self, listener: Listener) -> str | None:
        """A kiosk request is an unmanaged browser at the kiosk location, whatever device it names."""
        if listener is Listener.gateway:
            return None
        if self.config.gateway_file.kiosk is None:
            raise WhatIfError("this config has no kiosk listener")
        return self.config.gateway_file.kiosk.location

    def _app(self, app: str | None) -> ClientApp:
        if app is None:
            return ClientApp(client_id=None, name=None)
        if app in self.config.gateway_file.applications:
            return ClientApp(client_id=self.config.gateway_file.applications[app][0].lower(), name=app)
        if GUID.match(app):
            return ClientApp(client_id=app.lower(), name=self._app_names.get(app.lower()))
        known = ", ".join(self.config.gateway_file.applications)
        raise WhatIfError(f"{app!r} is neither a configured application ({known}) nor a client id")


def as_json(question: Question, decision: Decision, states: dict[str, str]) -> dict[str, Any]:
    return {
        "input": question.as_json(),
        "result": decision.result.value,
        "httpStatus": decision.status_code,
        "errorCode": int(decision.error_code) if decision.error_code else 0,
        "reason": decision.reason,
        "resource": decision.resource,
        "clientAppType": decision.client_app_type.value,
        "failedPolicy": decision.failed_policy_id,
        "sessionControls": list(decision.session_controls.names()),
        "policies": [{**policy_entry(p), "state": states[p.name]} for p in decision.all_policies()],
    }


def as_text(question: Question, decision: Decision, states: dict[str, str]) -> str:
    verdict = f"{decision.result.value.upper()} ({decision.status_code})"
    if decision.error_code:
        verdict += f", error {int(decision.error_code)}: {decision.reason}"
    through = " through the kiosk listener" if question.listener is Listener.kiosk else ""
    lines = [f"What if {question.user} opened {question.url}"
             f" with {question.app or 'no app'} on {question.device or 'no device'} from {question.ip}{through}?",
             f"  resource: {decision.resource or '(none: denied)'}; client app type: {decision.client_app_type.value}",
             f"  result: {verdict}"]
    if decision.failed_policy_id:
        lines.append(f"  decided by: {decision.failed_policy_id} ({decision.failed_policy})")
    if decision.session_controls.names():
        lines.append(f"  session controls: {', '.join(decision.session_controls.names())}")
    lines.append("  policies:")
    for result in decision.all_policies():
        rollout = f", rollout: {result.rollout.value}" if result.rollout else ""
        line = f"    {result.name} [{states[result.name]}{rollout}]: {result.result.value}"
        if result.not_applied_because:
            line += f" ({result.not_applied_because})"
        elif result.enforced_grant_controls or result.enforced_session_controls:
            required = [*result.enforced_grant_controls, *result.enforced_session_controls]
            line += f"; requires {', '.join(required)}"
        lines.append(line)
        lines += [f"      failed {f.control}: {f.reason} ({int(f.error_code)})" for f in result.failures]
    return "\n".join(lines)


def policy_states(config: Config) -> dict[str, str]:
    return {p.name: p.state.value for p in config.policies}
