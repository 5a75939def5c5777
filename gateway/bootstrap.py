"""Build a ready-to-use access service from a config directory (what ``run`` and ``check`` share)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx

from gateway.access import AccessService, Clock, utc_now
from gateway.audit import DecisionLog
from gateway.config import Config, load_config
from gateway.identity.jwks import JwksCache
from gateway.identity.tokens import BearerValidator
from gateway.signals.devices import DeviceInventory, FileDeviceInventory


@dataclass(frozen=True, slots=True)
class Loaded:
    config: Config
    inventory: FileDeviceInventory


def load(config_dir: Path) -> Loaded:
    """Validate everything a gateway reads at start; raises ConfigError listing every problem."""
    config = load_config(config_dir)
    inventory_path = config.path(config.gateway_file.device_signals.inventory)
    return Loaded(config, FileDeviceInventory.load(inventory_path))


def build_service(
    loaded: Loaded,
    *,
    clock: Clock = utc_now,
    transport: httpx.AsyncBaseTransport | None = None,
    inventory: DeviceInventory | None = None,
) -> tuple[AccessService, JwksCache]:
    """``transport`` and ``inventory`` let tests put a failing issuer or signal source in place."""
    config = loaded.config
    identity = config.gateway_file.identity
    jwks = JwksCache(
        identity.issuer,
        cache_seconds=identity.jwks_cache_seconds,
        min_refresh_interval=identity.jwks_refresh_min_interval_seconds,
        timeout=identity.http_timeout_seconds,
        transport=transport,
    )
    service = AccessService(
        config,
        validator=BearerValidator(identity, jwks),
        inventory=inventory or loaded.inventory,
        decision_log=DecisionLog(config.path(config.gateway_file.decision_log.path)),
        clock=clock,
    )
    return service, jwks
