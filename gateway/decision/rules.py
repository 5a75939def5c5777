"""The rules a decision reads, built once per (re)load and swapped whole."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import Config
from gateway.config.compile import compile_policies
from gateway.policy.conditions import request_locations
from gateway.policy.model import AccessRequest, ClientApp, ComplianceSettings, Identity
from gateway.policy.policy_set import PolicySet
from gateway.routing import Router


@dataclass(frozen=True, slots=True)
class Rules:
    """Everything a decision reads from the config, built once per (re)load and swapped whole: a
    request takes the rules in force when it starts and finishes under them."""

    config: Config
    policy_set: PolicySet
    app_names: dict[str, str]
    compliance: ComplianceSettings
    router: Router

    @classmethod
    def of(cls, config: Config) -> Rules:
        return cls(config, compile_policies(config),
                   config.app_names_by_client_id(), config.gateway_file.device_signals.compliance.settings(),
                   Router(config.gateway_file))

    def device_certificate_required(self, host: str) -> bool:
        """The host refuses requests on a connection without a device certificate."""
        return False  # no host asks for device certificates yet

    def device_certificate_verifier(self, host: str) -> None:
        """The verifier of the host's device certificates; None: the host does not ask for one."""
        return None  # no host asks for device certificates yet

    def legacy_active_sync(self, host: str) -> bool:
        """The host takes Basic authentication on ActiveSync from devices with a certificate."""
        protected = self.config.gateway_file.protected_hosts.get(host)
        return protected is not None and protected.legacy_active_sync

    def app(self, identity: Identity) -> ClientApp:
        return ClientApp(client_id=identity.client_id, name=self.app_names.get(identity.client_id or ""))

    def locations(self, request: AccessRequest) -> set[str]:
        """The named locations the request is in, as policy saw them (for the decision log's signals)."""
        return request_locations(request, self.policy_set.named_locations)[0]
