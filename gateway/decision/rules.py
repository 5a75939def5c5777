"""The rules a decision reads, built once per (re)load and swapped whole."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

from gateway.config import Config
from gateway.config.compile import compile_policies
from gateway.config.device_certificates import DeviceCertificateMode
from gateway.identity.device_certificates import DeviceCertificateVerifier
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
    # per host that asks for device certificates: its verifier, with the CAs and CRLs read at this (re)load
    device_certificates: Mapping[str, DeviceCertificateVerifier]
    # per client id: the bundle and package ids its app protection registrations name it by
    app_identifiers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    app_sync_age: timedelta | None = timedelta(hours=24)  # deviceSignals.appProtection.maxSyncAgeSeconds

    @classmethod
    def of(cls, config: Config) -> Rules:
        protection = config.gateway_file.device_signals.app_protection
        return cls(config, compile_policies(config),
                   config.app_names_by_client_id(), config.gateway_file.device_signals.compliance.settings(),
                   Router(config.gateway_file), _verifiers(config), config.app_identifiers_by_client_id(),
                   None if protection.max_sync_age_seconds is None else
                   timedelta(seconds=protection.max_sync_age_seconds))

    def app_identifiers_of(self, identity: Identity) -> tuple[str, ...]:
        """The bundle and package ids of the token's app (none: it has no registrations to find)."""
        return self.app_identifiers.get((identity.client_id or "").lower(), ())

    def device_certificate_required(self, host: str) -> bool:
        """The host refuses requests on a connection without a device certificate."""
        verifier = self.device_certificates.get(host)
        return verifier is not None and verifier.settings.mode is DeviceCertificateMode.required

    def device_certificate_verifier(self, host: str) -> DeviceCertificateVerifier | None:
        """The verifier of the host's device certificates; None: the host does not ask for one."""
        return self.device_certificates.get(host)

    def legacy_active_sync(self, host: str) -> bool:
        """The host takes Basic authentication on ActiveSync from devices with a certificate."""
        protected = self.config.gateway_file.protected_hosts.get(host)
        return protected is not None and protected.legacy_active_sync

    def app(self, identity: Identity) -> ClientApp:
        return ClientApp(client_id=identity.client_id, name=self.app_names.get(identity.client_id or ""))

    def locations(self, request: AccessRequest) -> set[str]:
        """The named locations the request is in, as policy saw them (for the decision log's signals)."""
        return request_locations(request, self.policy_set.named_locations)[0]


def _verifiers(config: Config) -> dict[str, DeviceCertificateVerifier]:
    return {host: DeviceCertificateVerifier(protected.device_certificates, config.device_trust[host])
            for host, protected in config.gateway_file.protected_hosts.items()
            if protected.device_certificates is not None}
