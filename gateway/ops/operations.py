"""What the admin API, the dashboard and the CLI's signal handlers operate on: one running
gateway's service, reloader, health checks and the inventory the What If tool reads."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.decision.service import AccessService
from gateway.identity.issuers import TrustedIssuers
from gateway.ops.drain import DrainState
from gateway.ops.health import GatewayHealth
from gateway.ops.metrics import CacheCollector, SignalAgeCollector
from gateway.ops.reload import ConfigReloader
from gateway.signals.devices import DeviceInventory
from gateway.signals.graph import GraphInventory


@dataclass(frozen=True, slots=True)
class Operations:
    service: AccessService
    reloader: ConfigReloader
    health: GatewayHealth
    whatif_inventory: DeviceInventory  # the devices policy tests and What If questions name

    @classmethod
    def of(cls, service: AccessService, issuers: TrustedIssuers, inventory: DeviceInventory,
           graph: GraphInventory | None = None, drain: DrainState | None = None) -> Operations:
        """Wire reloads, readiness and the scrape-time metrics of one gateway."""
        reloader = ConfigReloader(service, inventory)
        health = GatewayHealth(service, issuers, reloader, graph=graph, drain=drain)
        service.metrics.watch(CacheCollector(lambda: (
            ("accessTokens", service.validator.cache_hits, service.validator.cache_misses),
            ("devices", service.inventory.hits, service.inventory.misses),
        )))
        service.metrics.watch(SignalAgeCollector(health.signal_ages))
        return cls(service, reloader, health, inventory)
