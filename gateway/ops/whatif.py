"""The What If tool and policy tests: "what if this user, with this app, on this device, opened
this URL (a GET)?" answered by the gateway's own decision pipeline
(``gateway.decision.pipeline.authorize``), with the question's identity in place of a token and
the device taken from the configured inventory as the gateway takes it. So, as at the gateway, a
path no resource names is denied and a public resource allowed before any identity (200, "public
resource", no policy evaluated), then the ActiveSync device binding, ``evaluate`` and the session
controls that refuse the request itself. What If cannot see the
upstream's answer: an attachment a ``blockDownloads`` session would have replaced on its way back
is an allow here, as it is in the decision log.

JSON output (``portcullis whatif --json``), stable::

    {"input": {...the question, with "listener": "gateway" | "kiosk"...},
     "result": "allow" | "block", "httpStatus": 200 | 403, "errorCode": 0 | 53000 | ...,
     "reason": "...", "resource": "exchange-owa" | null, "clientAppType": "browser" | ...,
     "failedPolicy": "policy-name" | null, "sessionControls": ["blockDownloads", ...],
     "restriction": "blockDownloads" | "blockUploads" | "activeSyncDeviceIdMismatch" | "deviceCertificate"
                    | "tokenIssuedToAnotherDevice" | "tokenProtection" | null,
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

from gateway.config import Config
from gateway.decision.log import policy_entry
from gateway.decision.pipeline import authorize
from gateway.decision.rules import Rules
from gateway.decision.sources import GivenIdentity, InventorySignals
from gateway.http.paths import canonical_path
from gateway.policy.model import (
    AccessRequest,
    ClientAppType,
    Decision,
    DeviceCertificate,
    DeviceKey,
    DevicePlatform,
    Identity,
    Listener,
)
from gateway.signals.app_protection import AppProtectionSource
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
    # the connection's device certificate, verified and naming this device (its azureADDeviceId); the token's
    # device is ``device``: both set and different is the stolen-token case
    device_certificate: str | None = None
    authentication_methods: tuple[str, ...] = ()  # the token's amr beyond --mfa (e.g. fido): authentication strength
    authentication_contexts: tuple[str, ...] = ()  # the token's acrs (c1..c99): authentication contexts
    issuer: str | None = None  # the name of the token's issuer (identity.issuers); None: the first

    def as_json(self) -> dict[str, Any]:
        return {"user": self.user, "url": self.url, "app": self.app, "device": self.device, "ip": self.ip,
                "clientAppType": self.client_app_type.value if self.client_app_type else None,
                "groups": list(self.groups), "mfa": self.mfa,
                "platform": self.platform.value if self.platform else None, "listener": self.listener.value,
                "objectId": self.object_id, "deviceCertificate": self.device_certificate,
                "amr": list(self.authentication_methods), "acrs": list(self.authentication_contexts),
                "issuer": self.issuer}


class WhatIf:
    def __init__(self, config: Config, inventory: DeviceInventory, apps: AppProtectionSource | None = None) -> None:
        self.config = config
        self.inventory = inventory
        self.apps = apps  # app protection registrations, as the gateway reads them
        self.rules = Rules.of(config)

    async def ask(self, question: Question, now: datetime) -> Decision:
        """What the gateway decides for this question, as it answers a live request."""
        result = await authorize(self.request(question), rules=self.rules,
                                 identity=GivenIdentity(lambda: self.identity(question)),
                                 signals=InventorySignals(self.inventory, apps=self.apps), now=now)
        return result.decision

    def request(self, question: Question) -> AccessRequest:
        """The request the question stands for: a GET of its URL (query included: ActiveSync names
        its device there), from its address, through its listener, with a User-Agent that says
        its platform."""
        host, path, target = self._target(question.url)
        user_agent = USER_AGENTS.get(question.client_app_type or ClientAppType.other, "What-If/1.0")
        if question.platform is not None:
            user_agent += f" ({question.platform.value})"
        return AccessRequest(correlation_id="what-if", host=host, path=path, target=target, method="GET",
                             client_ip=question.ip, user_agent=user_agent,
                             accepts_html=question.client_app_type is ClientAppType.browser,
                             declared_client_app_type=question.client_app_type,
                             kiosk_location=self._kiosk_location(question.listener),
                             device_certificate=_certificate(question),
                             forward_auth=self._forward_auth(question.listener))

    def identity(self, question: Question) -> Identity:
        """The token the question stands for: its ``deviceid`` is the question's device, which
        the decision then uses or ignores (the kiosk) as the gateway does."""
        return Identity(subject=question.user, user_principal_name=question.user, object_id=question.object_id,
                        tenant_id=None, client_id=self._client_id(question.app),
                        device_id=question.device.lower() if question.device else None,
                        groups=frozenset(question.groups), audience="what-if", expires_at=0,
                        authentication_methods=frozenset({"pwd", "mfa"} if question.mfa else {"pwd"})
                        | frozenset(question.authentication_methods),
                        authentication_contexts=frozenset(question.authentication_contexts),
                        issuer=self._issuer(question.issuer))

    def _issuer(self, name: str | None) -> str:
        """The question's issuer, by name; none given: the first of ``identity`` (the only one of
        the single ``identity.issuer`` form)."""
        trusted = [entry.name for entry in self.config.gateway_file.identity.trusted]
        if name is None:
            return trusted[0]
        if name not in trusted:
            raise WhatIfError(f"{name!r} is not an issuer; known: {', '.join(trusted)}")
        return name

    def _target(self, url: str) -> tuple[str, str, str]:
        """Host, canonical path and the request target (path and query) as a client sends it."""
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if parts.scheme != "https" or host not in self.config.gateway_file.protected_hosts:
            known = ", ".join(f"https://{h}/..." for h in self.config.gateway_file.protected_hosts)
            raise WhatIfError(f"{url!r} is not on a protected host ({known})")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        path = canonical_path(target)
        if path is None:
            raise WhatIfError(f"{url!r} has an ambiguous path: the gateway answers it with 400")
        return host, path, target

    def _kiosk_location(self, listener: Listener) -> str | None:
        """A kiosk request is an unmanaged browser at the kiosk location, whatever device it names."""
        if listener is not Listener.kiosk:
            return None
        if self.config.gateway_file.kiosk is None:
            raise WhatIfError("this config has no kiosk listener")
        return self.config.gateway_file.kiosk.location

    def _forward_auth(self, listener: Listener) -> bool:
        """An edge proxy asks about the request: no client certificate reaches the gateway."""
        if listener is not Listener.forward_auth:
            return False
        if self.config.gateway_file.forward_auth is None:
            raise WhatIfError("this config has no forwardAuth listener")
        return True

    def _client_id(self, app: str | None) -> str | None:
        """The token's client id (``azp``) for a configured application's name or a client id."""
        if app is None:
            return None
        if app in self.config.gateway_file.applications:
            return self.config.gateway_file.applications[app][0].lower()
        if GUID.match(app):
            return app.lower()
        known = ", ".join(self.config.gateway_file.applications)
        raise WhatIfError(f"{app!r} is neither a configured application ({known}) nor a client id")


def _certificate(question: Question) -> DeviceCertificate | None:
    """A verified certificate naming the question's certificate device (the kiosk never asks for one;
    an edge proxy terminates TLS, so none reaches the forward-auth listener)."""
    if question.device_certificate is None or question.listener is not Listener.gateway:
        return None
    return DeviceCertificate(device_key=DeviceKey.azure_ad_device_id, device_value=question.device_certificate.lower(),
                             subject="(What If)", issuer="(What If)")


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
        "restriction": decision.restriction.value if decision.restriction else None,
        "policies": [{**policy_entry(p), "state": states[p.name]} for p in decision.all_policies()],
    }


def as_text(question: Question, decision: Decision, states: dict[str, str]) -> str:
    verdict = f"{decision.result.value.upper()} ({decision.status_code})"
    if decision.error_code:
        verdict += f", error {int(decision.error_code)}: {decision.reason}"
    elif not decision.allowed or not decision.all_policies():  # an allow before policy: a public resource
        verdict += f": {decision.reason}"
    if decision.restriction is not None:
        verdict += f" [restriction: {decision.restriction.value}]"
    through = " through the kiosk listener" if question.listener is Listener.kiosk else ""
    if question.device_certificate:
        through += f", on a connection whose device certificate names {question.device_certificate}"
    lines = [f"What if {question.user} opened {question.url}"
             f" with {question.app or 'no app'} on {question.device or 'no device'} from {question.ip}{through}?",
             f"  resource: {decision.resource or '(none: denied)'}; client app type: {decision.client_app_type.value}",
             f"  result: {verdict}"]
    if decision.failed_policy_id:
        lines.append(f"  decided by: {decision.failed_policy_id} ({decision.failed_policy})")
    if decision.session_controls.names():
        lines.append(f"  session controls: {', '.join(decision.session_controls.names())}")
    lines.append("  policies:" if decision.all_policies() else "  policies: none evaluated")
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
