"""Build the gateway's parts from a config directory (what ``run``, ``demo``, ``check``,
``whatif`` and ``test`` share)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import httpx
from cryptography.fernet import Fernet

from gateway.app.workers import ONLY_WORKER, Worker
from gateway.config import Config, load_config, load_gateway_file, resolve
from gateway.config.models import GraphConnectorSettings, MtdPartnerSettings, StateSettings
from gateway.decision.log import DecisionLog, Pseudonymizer
from gateway.decision.service import AccessService, Clock, utc_now
from gateway.identity.assertion import assertion_signer
from gateway.identity.browser import BrowserSignIn
from gateway.identity.issuers import TrustedIssuers
from gateway.identity.tokens import BearerValidator
from gateway.ops.metrics import GatewayMetrics
from gateway.signals.app_protection import (
    AppProtectionSource,
    AppRegistrationStore,
    MemoryAppRegistrations,
    OverlayAppRegistrations,
    parse_registrations,
)
from gateway.signals.app_registrations_sqlite import SqliteAppRegistrations
from gateway.signals.cache import CachedInventory
from gateway.signals.devices import DeviceInventory, FileDeviceInventory, OverlayInventory
from gateway.signals.graph import GraphClient, GraphInventory, GraphSettings
from gateway.signals.sqlite_store import SqliteDeviceStore
from gateway.signals.store import DeviceStore, StoreInventory
from gateway.state.nonces import MemoryNonces, NonceStore, SqliteNonces
from gateway.state.redis_state import RedisState
from gateway.state.sessions import MemorySessionStore, SessionStore, SqliteSessionStore
from gateway.state_files import warn_if_readable_by_others, write_once

MIN_SECRET_BYTES = 16


@dataclass(frozen=True, slots=True)
class Loaded:
    config: Config
    file_inventory: FileDeviceInventory | None
    store: DeviceStore | None
    _graph_client: GraphClient | None = None
    worker: Worker = ONLY_WORKER  # which of ``--workers N`` processes this is (files of its own, Graph sync)
    shared: RedisState | None = None  # ``state: redis://...``: devices, sessions and nonces live there
    sessions: SessionStore = field(default_factory=MemorySessionStore)
    nonces: NonceStore = field(default_factory=MemoryNonces)
    apps: AppRegistrationStore | None = None  # app protection registrations (None: none configured)
    app_seed: MemoryAppRegistrations | None = None  # deviceSignals.appProtection.registrations, read at load

    @property
    def app_protection(self) -> AppProtectionSource | None:
        """The app registrations as the pipeline reads them (the gateway, What If, cases)."""
        return AppProtectionSource(self.apps, name=self.store_name if self.store is not None else "file") \
            if self.apps is not None else None

    @property
    def whatif_app_protection(self) -> AppProtectionSource | None:
        """What a gateway started now would read: the stored registrations with the seed's laid
        over them (the seed is written at start). For the rule tools, like ``inventory``."""
        if self.apps is None or self.app_seed is None or self.apps is self.app_seed:
            return self.app_protection
        return AppProtectionSource(OverlayAppRegistrations(self.app_seed, self.apps), name=self.store_name)

    @property
    def inventory(self) -> DeviceInventory:
        """What a gateway started now would see: the store with the YAML seed laid over it (the
        seed is written at start), or whichever of the two is configured. For the rule tools."""
        if self.store is None:
            assert self.file_inventory is not None  # the config requires one of them
            return self.file_inventory
        if self.file_inventory is None:
            return StoreInventory(self.store, name=self.store_name)
        return OverlayInventory(self.file_inventory, StoreInventory(self.store, name=self.store_name))

    @property
    def store_name(self) -> str:
        return "redis" if self.shared is not None else "sqlite"

    @property
    def local_inventory(self) -> StoreInventory | None:
        """The store as policy reads it: unresponsive partners' verdicts left out."""
        if self.store is None:
            return None
        return StoreInventory(self.store, unresponsive_after(self.config.gateway_file.mtd_partners),
                              name=self.store_name)

    @property
    def live_inventory(self) -> DeviceInventory:
        """What a running gateway reads: the store when configured (seeded at start), else the file."""
        local = self.local_inventory
        if local is None:
            return self.inventory
        if self.graph_client is None:
            return local
        assert self.store is not None  # local inventory implies a store
        syncs_apps = bool(self.config.gateway_file.device_signals.app_protection.app_identifiers) and \
            self.apps is not self.app_seed  # only where app protection is used: a permission more
        return GraphInventory(self.store, local, self.graph_client, clock=utc_now,
                              apps=self.apps if syncs_apps else None)

    @property
    def graph_client(self) -> GraphClient | None:
        graph = self.config.gateway_file.device_signals.graph
        if graph is None:
            return None
        if self._graph_client is None:
            object.__setattr__(self, "_graph_client", GraphClient(graph_settings(graph, os.environ)))
        return self._graph_client

    def device_count(self) -> int:
        seeded = {r.azure_ad_device_id.lower() for r in self.file_inventory.records} if self.file_inventory else set()
        stored = {str(r["azureADDeviceId"]).lower() for r in self.store.records()} if self.store else set()
        return len(seeded | stored)


def load(config_dir: Path, worker: Worker = ONLY_WORKER) -> Loaded:
    """Validate everything a gateway reads at start; raises ConfigError listing every problem."""
    config = load_config(config_dir)
    signals = config.gateway_file.device_signals
    file_inventory = FileDeviceInventory.load(config.path(signals.inventory)) if signals.inventory else None
    seed_path = signals.app_protection.registrations
    seed = MemoryAppRegistrations(parse_registrations(config.path(seed_path)), location=str(config.path(seed_path))) \
        if seed_path is not None else None  # read now, with the other files: ``check`` reports a bad entry's line
    shared = shared_state(config.gateway_file.state, os.environ)
    if shared is not None:
        return Loaded(config, file_inventory, shared.devices, worker=worker, shared=shared, sessions=shared.sessions,
                      nonces=shared.nonces, apps=shared.apps, app_seed=seed)
    store = SqliteDeviceStore(config.path(signals.database)) if signals.database else None
    # beside the devices (the SQLite file), else the seed alone in memory
    apps = SqliteAppRegistrations(config.path(signals.database)) if signals.database else seed
    if worker.shares_listeners:  # the workers of one host: sessions and nonces in the state directory
        state_dir = config.path(config.gateway_file.gateway.state_dir)
        return Loaded(config, file_inventory, store, worker=worker,
                      sessions=SqliteSessionStore(state_dir / "sessions.sqlite"),
                      nonces=SqliteNonces(state_dir / "nonces.sqlite"), apps=apps, app_seed=seed)
    return Loaded(config, file_inventory, store, worker=worker, apps=apps, app_seed=seed)


def device_commands_inventory(config_dir: Path) -> StoreInventory | None:
    """The device store as policy reads it, from ``portcullis.yaml`` alone (``portcullis devices``):
    an invalid ``policies.yaml`` on disk must not stop an operator from raising a device's risk
    while the gateway serves its last good rules. None when no store is configured."""
    gateway_file = load_gateway_file(config_dir)
    shared = shared_state(gateway_file.state, os.environ)
    database = gateway_file.device_signals.database
    store: DeviceStore | None = (shared.devices if shared is not None
                                 else SqliteDeviceStore(resolve(config_dir, database)) if database else None)
    if store is None:
        return None
    return StoreInventory(store, unresponsive_after(gateway_file.mtd_partners),
                          name="redis" if shared is not None else "sqlite")


def app_commands_store(config_dir: Path) -> AppRegistrationStore | None:
    """The app registrations' store, from ``portcullis.yaml`` alone (``portcullis apps``), as
    ``device_commands_inventory`` finds the devices'. None without a database or state."""
    gateway_file = load_gateway_file(config_dir)
    shared = shared_state(gateway_file.state, os.environ)
    if shared is not None:
        return shared.apps
    database = gateway_file.device_signals.database
    return SqliteAppRegistrations(resolve(config_dir, database)) if database else None


def unresponsive_after(partners: Mapping[str, MtdPartnerSettings]) -> dict[str, timedelta]:
    """After how long without contact each MTD partner's verdicts are ignored."""
    return {name: timedelta(seconds=p.unresponsive_after_seconds) for name, p in partners.items()}


def prepare_worker_files(config: Config) -> None:
    """Create the workers' shared SQLite files once, before the workers start: new files made by
    several processes at once race over their journal mode."""
    if config.gateway_file.state is None:
        state_dir = config.path(config.gateway_file.gateway.state_dir)
        SqliteSessionStore(state_dir / "sessions.sqlite").close()
        SqliteNonces(state_dir / "nonces.sqlite").close()


def shared_state(settings: StateSettings | None, environ: Mapping[str, str]) -> RedisState | None:
    """The Redis connection of ``state:``; its password comes from the environment."""
    if settings is None:
        return None
    password = None
    if settings.password_env:
        password = environ.get(settings.password_env)
        if not password:
            raise ValueError(f"state: environment variable {settings.password_env} must hold the Redis password")
    return RedisState.from_url(settings.redis, password=password, prefix=settings.key_prefix)


def graph_settings(graph: GraphConnectorSettings, environ: Mapping[str, str]) -> GraphSettings:
    secret = environ.get(graph.client_secret_env, "")
    if not secret:
        raise ValueError(f"deviceSignals.graph: environment variable {graph.client_secret_env} must hold the "
                         "client secret")
    return GraphSettings(token_url=f"{graph.authority}/{graph.tenant_id}/oauth2/v2.0/token",
                         graph_url=graph.graph_url, client_id=graph.client_id, client_secret=secret,
                         lookups_per_second=graph.lookups_per_second)


def session_key(config: Config, environ: Mapping[str, str]) -> bytes:
    """The key that encrypts and signs session cookies: from the environment when configured
    (every worker and host must share it), else a file made once in the state directory."""
    settings = config.gateway_file.browser_sign_in
    if settings is not None and settings.session_key_env:
        value = environ.get(settings.session_key_env, "")
        if not value:
            raise ValueError(f"browserSignIn: environment variable {settings.session_key_env} must hold a "
                             "Fernet key (Fernet.generate_key())")
        return value.encode()
    return _state_secret(config.path(config.gateway_file.gateway.state_dir) / "session.key", Fernet.generate_key)


def pseudonym_key(config: Config, environ: Mapping[str, str]) -> bytes:
    """The key of the decision log's user pseudonyms: from the environment when configured (so
    every worker and host writes the same pseudonym for a user), else a file made once."""
    settings = config.gateway_file.decision_log
    if settings.pseudonym_key_env:
        value = environ.get(settings.pseudonym_key_env, "")
        if len(value) < 16:
            raise ValueError(f"decisionLog: environment variable {settings.pseudonym_key_env} must hold the "
                             "pseudonym key (at least 16 characters)")
        return value.encode()
    return _state_secret(config.path(config.gateway_file.gateway.state_dir) / "pseudonym.key",
                         lambda: secrets.token_urlsafe(32).encode())


def _state_secret(path: Path, make: Callable[[], bytes]) -> bytes:
    """A secret kept in the state directory: made once, readable by this user only. A file too
    short to be a key (emptied, truncated by hand) is refused, never used as a weak key."""
    write_once(path, make)
    warn_if_readable_by_others(path)
    value = path.read_bytes().strip()
    if len(value) < MIN_SECRET_BYTES:
        raise ValueError(f"{path} holds {len(value)} bytes, fewer than a key needs ({MIN_SECRET_BYTES}); "
                         "delete it to have a new one made (sessions or pseudonyms made with the old one end)")
    return value


def decision_log(config: Config, metrics: GatewayMetrics | None = None, worker: Worker = ONLY_WORKER) -> DecisionLog:
    settings = config.gateway_file.decision_log
    pseudonymizer = Pseudonymizer(pseudonym_key(config, os.environ)) if settings.pseudonymize_users else None
    return DecisionLog(worker.own_file(config.path(settings.path)), max_bytes=settings.max_file_bytes,
                       keep_files=settings.keep_files, configured_path=config.path(settings.path),
                       queue_size=settings.queue_size, pseudonymizer=pseudonymizer,
                       on_drop=metrics.log_dropped.inc if metrics else None,
                       on_error=metrics.log_errors.inc if metrics else None)


def seed_store(loaded: Loaded, now_clock: Clock = utc_now) -> None:
    """With both a YAML inventory and a database, the YAML file seeds the store at start; so does
    the app registrations' seed (its registrations are written over the stored ones of their ids)."""
    if loaded.store is not None and loaded.file_inventory is not None:
        loaded.store.replace_all(loaded.file_inventory.records, now=now_clock(), seed=True)
    if loaded.app_seed is not None and loaded.apps is not None and loaded.apps is not loaded.app_seed:
        loaded.apps.replace_all(loaded.app_seed.registrations(), now=now_clock())


def build_service(
    loaded: Loaded,
    *,
    clock: Clock = utc_now,
    transport: httpx.AsyncBaseTransport | None = None,
    inventory: DeviceInventory | None = None,
) -> tuple[AccessService, TrustedIssuers]:
    """``transport`` and ``inventory`` let tests put a failing issuer or signal source in place.
    The trusted issuers are returned for their keys to be fetched at start and checked for readiness."""
    config = loaded.config
    identity = config.gateway_file.identity
    cache = config.gateway_file.device_signals.cache
    issuers = TrustedIssuers(identity, transport)
    cached = CachedInventory(inventory or loaded.live_inventory, ttl=cache.ttl_seconds, miss_ttl=cache.miss_ttl_seconds,
                             max_staleness=cache.max_staleness_seconds, max_entries=cache.max_entries)
    cached.trust_fresh = loaded.shared is None  # with Redis: only once its change feed is up
    validator = BearerValidator(identity, issuers)
    metrics = GatewayMetrics()
    browser = None
    if config.gateway_file.browser_sign_in is not None:
        settings = config.gateway_file.browser_sign_in
        browser = BrowserSignIn(client_id=settings.client_id, issuer=config.gateway_file.browser_issuer.name,
                                validator=validator,
                                key=session_key(config, os.environ), lifetime_seconds=settings.session_lifetime_seconds,
                                sessions=loaded.sessions)
    service = AccessService(
        config,
        browser=browser,
        validator=validator,
        inventory=cached,
        decision_log=decision_log(config, metrics, loaded.worker),
        clock=clock,
        store=loaded.store,
        apps=loaded.app_protection,
        metrics=metrics,
        assertions=assertion_signer(config),
    )
    return service, issuers
