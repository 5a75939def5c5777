"""Run mitmproxy embedded, with only the addons a gateway needs.

Stock mitmdump loads ~31 addons; a gateway wants none of Block (drops public clients),
Onboarding (answers mitm.it), script loading or flow saving. The listener is a TLS reverse proxy
whose upstream is chosen per flow by ``Routing``; ``lazy`` connections mean nothing is opened
upstream before the access decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from mitmproxy import certs, options
from mitmproxy.addons import core, errorcheck, next_layer, proxyserver, tlsconfig
from mitmproxy.master import Master

from addons import strict_http
from addons.access_gate import AccessGate
from addons.continuous_access import ContinuousAccess, DecisionsUnderWay
from addons.decision_records import DecisionRecords
from addons.device_certificates import CertificateVerdicts, DeviceCertificates
from addons.drain import Drain, KeepAliveLimits
from addons.framing import PassThroughDeadline, RequestFraming, UpstreamFraming, UpstreamHttp1
from addons.kiosk_proxy import KioskProxy
from addons.mitm_internals import listen_addresses, listen_with_reuse_port, use_hook_table
from addons.recorded_flows import record_flows
from addons.routing import Routing
from addons.server_names import ServerNames
from addons.service_endpoints import ServiceEndpoints
from addons.session_enforcement import SessionEnforcement
from gateway.app.bootstrap import Loaded, build_service, seed_store
from gateway.app.certs import CA_FILE, CA_KEY_FILE, ensure_server_certificate
from gateway.app.demo import DemoUpstreams
from gateway.config import Config
from gateway.config.models import ClientLimitSettings
from gateway.decision.service import AccessService, utc_now
from gateway.errors import ConfigError, ConfigProblem, SignalUnavailable
from gateway.http import framing
from gateway.http.response_streaming import BUFFERED_BODY_BYTES
from gateway.identity.issuers import fetch_issuer_keys
from gateway.ops.operations import Operations
from gateway.routing import BROWSER_ENDPOINTS, MTD_ENDPOINTS
from gateway.signals.graph import GraphInventory
from gateway.signals.mtd import MtdReceiver, partners_from_config
from gateway.web.admin import admin_listener
from gateway.web.assertion_keys import service_host_app
from gateway.web.browser_pages import browser_app
from gateway.web.forward_auth import forward_auth_listener
from gateway.web.mtd_webhook import mtd_webhook_app
from gateway.web.types import ASGIApp

logger = logging.getLogger(__name__)

# Routing sets each flow's upstream (and its scheme: TLS upstream or not). The placeholder is
# http:// because a reverse:https:// mode also listens on UDP (QUIC), which no gateway needs and
# which cannot be shared by workers; the client side is TLS either way (a ClientHello is TLS).
PLACEHOLDER_UPSTREAM = "http://upstream.invalid:80"
# mitmproxy's idle timeout (no byte either way) is the only limit while an answer is owed, and an
# ActiveSync Ping is owed its answer for up to its HeartbeatInterval (at most 3540 s). The client's
# own time limits (head, keep-alive, body) are RequestFraming's deadlines.
IDLE_TIMEOUT_SECONDS = 3540 + 120


class Ready:
    """Signals when the listener is bound, with the addresses it bound."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.addresses: list[tuple[str, int]] = []

    def running(self) -> None:
        self.addresses = listen_addresses()
        self.event.set()


def build_master(service: AccessService, endpoints: dict[str, ASGIApp] | None = None,
                 drain: Drain | None = None) -> tuple[Master, Ready]:
    """Must be called inside the event loop that will run the master."""
    config = service.config
    settings = config.gateway_file.gateway
    opts = options.Options()
    master = Master(opts, with_termlog=False)
    use_hook_table(master)  # each hook reaches only the addons that have it (addons/mitm_internals.py)
    ready = Ready()
    strict_http.install()  # strict request framing in mitmproxy's HTTP/1 layer (see addons/strict_http.py)
    request_framing = RequestFraming(client_limits(settings.client_limits), service)
    continuous_access = ContinuousAccess(service)
    device_certificates = DeviceCertificates(lambda: service.rules)
    master.addons.add(
        drain or Drain(keep_alive_limits(settings.client_limits)),
        core.Core(),
        proxyserver.Proxyserver(),
        next_layer.NextLayer(),
        ServerNames([host for c in settings.certificates for host in c.hosts]),  # before TlsConfig mints one
        UpstreamHttp1(),  # before TlsConfig offers the upstream what the client offered (h2)
        tlsconfig.TlsConfig(),
        device_certificates,  # after TlsConfig made the connection: asks it for a device certificate
        errorcheck.ErrorCheck(),
        request_framing,  # first: client deadlines, upgrades refused
        Routing(service),
        CertificateVerdicts(device_certificates, lambda: service.rules),  # after Routing, before AccessGate
        DecisionsUnderWay(continuous_access),  # before any decision: changes heard meanwhile are kept
        AccessGate(service),
        continuous_access,
        SessionEnforcement(service),
        KioskProxy(service),
        PassThroughDeadline(request_framing),  # after KioskProxy: its pass-through tunnels have no head deadline
        UpstreamFraming(),  # last in requestheaders: sees every refusal and every request to forward
        DecisionRecords(service),  # last: a record says what the client got, after any hook changed it
        ready,
    )
    if endpoints:
        master.addons.add(ServiceEndpoints(service, endpoints))
    state_dir = config.path(settings.state_dir)
    (state_dir / "mitmproxy").mkdir(parents=True, exist_ok=True)
    _use_gateway_ca(config, state_dir / "mitmproxy")
    modes = [f"reverse:{PLACEHOLDER_UPSTREAM}@{settings.listen.host}:{settings.listen.port}"]
    kiosk = config.gateway_file.kiosk
    if kiosk is not None:
        modes.append(f"regular@{kiosk.listen.host}:{kiosk.listen.port}")
    opts.update(
        mode=modes,
        confdir=str(state_dir / "mitmproxy"),
        certs=[f"{host}={config.path(c.file)}" for c in settings.certificates for host in c.hosts],
        connection_strategy="lazy",
        keep_host_header=True,
        rawtcp=False,
        http3=False,
        websocket=False,
        stream_large_bodies=str(BUFFERED_BODY_BYTES),  # declared longer: streamed; unknown length: SessionEnforcement
        validate_inbound_headers=True,
        tcp_timeout=IDLE_TIMEOUT_SECONDS,
    )
    return master, ready


def client_limits(settings: ClientLimitSettings) -> framing.ClientLimits:
    return framing.ClientLimits(header_seconds=settings.header_timeout_seconds,
                                keepalive_seconds=settings.keep_alive_timeout_seconds,
                                body_grace_seconds=settings.body_grace_seconds,
                                body_min_rate=settings.body_min_bytes_per_second)


def keep_alive_limits(settings: ClientLimitSettings) -> KeepAliveLimits:
    return KeepAliveLimits(max_requests=settings.max_requests_per_connection,
                           max_age_seconds=settings.max_connection_age_seconds)


@dataclass(frozen=True, slots=True)
class RunningGateway:
    service: AccessService
    addresses: list[tuple[str, int]]
    upstreams: DemoUpstreams | None
    operations: Operations
    drain: Drain  # SIGTERM: ``await gateway.drain.drain(seconds)`` before leaving the context
    admin: tuple[str, int] | None = None  # the admin API's address, when the config has an admin section
    forward_auth: tuple[str, int] | None = None  # the forward-auth listener's, when it has a forwardAuth section


def _service_endpoints(loaded: Loaded, service: AccessService) -> dict[str, ASGIApp]:
    """The gateway's own endpoints: browser sign-in on every protected host; the MTD webhook and
    the assertion keys on the service host."""
    partners = partners_from_config(loaded.config.gateway_file.mtd_partners)
    endpoints: dict[str, ASGIApp] = {BROWSER_ENDPOINTS: browser_app(service)}
    if partners:
        endpoints[MTD_ENDPOINTS] = mtd_webhook_app(MtdReceiver(partners, loaded.nonces), service, utc_now)
    if service.assertions is not None:  # the service host publishes the assertion keys too
        endpoints[MTD_ENDPOINTS] = service_host_app(service.assertions, endpoints.get(MTD_ENDPOINTS))
    return endpoints


def _background_jobs(loaded: Loaded, service: AccessService, operations: Operations,
                     graph: GraphInventory | None) -> list[asyncio.Task[None]]:
    """What runs beside the listeners: the change feed, config watching, the shared change feed,
    and (worker 0 only: one Graph sync per gateway, not one per worker) the Graph sync."""
    background = [asyncio.create_task(service.watch_changes()), asyncio.create_task(operations.reloader.watch())]
    if loaded.shared is not None:  # changes and logouts announced by other processes and hosts
        service.shared_feed_up = False
        events = loaded.shared.events(on_devices=service.shared_devices_changed,
                                      on_connected=service.shared_feed_restored,
                                      on_lost=service.shared_feed_lost,
                                      on_apps=service.feed.shared_apps_changed)
        background.append(asyncio.create_task(events.run()))
    if graph is not None and loaded.worker.primary:
        background.append(asyncio.create_task(_sync_from_graph(loaded, graph)))
    return background


@contextlib.asynccontextmanager
async def running_gateway(loaded: Loaded, *, demo: bool = False,
                          record: Path | None = None) -> AsyncIterator[RunningGateway]:
    """Start the gateway (and, for the demo, its issuer and backends) in the running loop;
    ``record`` names a flow file that receives every flow (for ``portcullis replay``)."""
    config = loaded.config
    worker = loaded.worker
    upstreams = None
    if demo:
        for certificate in config.gateway_file.gateway.certificates:
            ensure_server_certificate(config.path(certificate.file), certificate.hosts)
        upstreams = DemoUpstreams(config)
        await upstreams.start()
    if worker.shares_listeners:
        listen_with_reuse_port()  # the supervisor prepared the state (``prepare_state``)
    else:
        prepare_state(loaded)
    service, issuers = build_service(loaded)
    try:
        await fetch_issuer_keys(issuers.refresh(), loaded.config)
        endpoints = _service_endpoints(loaded, service)
        drain = Drain(keep_alive_limits(config.gateway_file.gateway.client_limits))
        master, ready = build_master(service, endpoints, drain)
        if record is not None:
            record_flows(master, record)
        task = asyncio.create_task(master.run())
        waiter = asyncio.create_task(ready.event.wait())
        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
        if not ready.event.is_set():
            waiter.cancel()
            raise RuntimeError("the gateway listener did not start; see the log above")
        gc.freeze()  # what start-up built lives as long as the process: full collections need not walk it
        graph = service.inventory.source if isinstance(service.inventory.source, GraphInventory) else None
        # only worker 0 syncs from Graph, so only its readiness covers the sync
        operations = Operations.of(service, issuers, loaded.inventory, graph if worker.primary else None,
                                   drain=drain.state)
        background = _background_jobs(loaded, service, operations, graph)
        try:
            async with admin_listener(operations, worker=worker) as admin, \
                    forward_auth_listener(service, worker=worker) as forward_auth:
                yield RunningGateway(service, ready.addresses, upstreams, operations, drain, admin, forward_auth)
        finally:
            for job in background:
                job.cancel()
            master.shutdown()
            await task
    finally:
        service.close()
        if loaded.shared is not None:
            await loaded.shared.aclose()
        if upstreams is not None:
            await upstreams.stop()


async def _sync_from_graph(loaded: Loaded, inventory: GraphInventory) -> None:
    """A full Graph sync at start and every ``syncIntervalSeconds``; failures are logged and the
    cache's staleness rules apply to what the inventory already holds."""
    graph = loaded.config.gateway_file.device_signals.graph
    assert graph is not None  # graph configured
    while True:
        try:
            count = await inventory.full_sync()
            logger.info("Graph sync: %d managed devices", count)
        except SignalUnavailable as error:
            logger.warning("Graph sync failed: %s", error)
        await asyncio.sleep(graph.sync_interval_seconds)


def prepare_state(loaded: Loaded) -> None:
    """What a gateway does once before it serves, whatever its number of workers: check the
    certificates, seed the inventory, and set up mitmproxy's private confdir with its CA."""
    config = loaded.config
    _check_certificates(config)
    seed_store(loaded)
    confdir = config.path(config.gateway_file.gateway.state_dir) / "mitmproxy"
    confdir.mkdir(parents=True, exist_ok=True)
    _use_gateway_ca(config, confdir)
    certs.CertStore.from_store(str(confdir), "mitmproxy", 2048)  # made here once, not raced by workers


def _use_gateway_ca(config: Config, confdir: Path) -> None:
    """Kiosks trust the gateway's CA: let mitmproxy sign intercepted destinations with it (the CA
    beside the first certificate file, as ``portcullis demo`` makes it), not with a CA of its own.
    Written to a temporary file and renamed: a worker starting meanwhile never reads half of it."""
    first = config.path(config.gateway_file.gateway.certificates[0].file).parent
    cert, key = first / CA_FILE, first / CA_KEY_FILE
    if cert.is_file() and key.is_file():
        target = confdir / "mitmproxy-ca.pem"
        temporary = confdir / f".mitmproxy-ca.pem.{os.getpid()}"
        temporary.touch(mode=0o600)
        temporary.write_bytes(key.read_bytes() + cert.read_bytes())
        temporary.replace(target)


def _check_certificates(config: Config) -> None:
    missing = [config.path(c.file) for c in config.gateway_file.gateway.certificates
               if not config.path(c.file).is_file()]
    if missing:
        raise ConfigError([ConfigProblem(str(p), None, None, "gateway.certificates",
                                         "certificate file not found: a PEM with the certificate chain "
                                         "and its private key (`portcullis demo` creates its own)")
                           for p in missing])
