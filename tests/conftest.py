"""Shared harness: the shipped demo config on free ports, trustme certificates, and a real gateway
(mitmproxy listener, demo issuer, demo backends) running in a background event loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import ssl
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import mitmproxy.ctx
import mitmproxy.options
import pytest
import trustme
from mitmproxy import connection
from mitmproxy.master import Master
from mitmproxy.proxy import events
from mitmproxy.proxy.context import Context
from mitmproxy.test import taddons
from ruamel.yaml import YAML

from addons.mitm_internals import Http1Server
from addons.runner import Ready, build_master, running_gateway
from gateway.app import bootstrap
from gateway.app.certs import DEVICE_CA_FILE, demo_device_files, ensure_demo_device_certificates, ensure_device_ca
from gateway.app.demo import DEMO_CERTIFICATES, DemoUpstreams
from gateway.decision.service import AccessService
from gateway.ops.operations import Operations
from gateway.web.demo_idp import DemoIdentityProvider
from gateway.web.types import ASGIApp
from tests.redis_server import RedisServer, free_port, started_or_skipped

if TYPE_CHECKING:
    from tests.helpers.scale_out import Instance

REPO = Path(__file__).resolve().parents[1]
# fixtures kept beside their helpers: ``portcullis``, a gateway with a forward-auth listener (the edges' tests)
pytest_plugins = ["tests.helpers.forward_auth"]
HOSTS = ["mail.contoso.test", "docs.contoso.test", "portcullis.contoso.test"]
MTD_SECRET = "test-mtd-shared-secret-0123456789"
os.environ["PORTCULLIS_DEMO_MTD_SECRET"] = MTD_SECRET  # the demo config's partner reads it at start
START_TIMEOUT = 30


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Browser tests skip where Debian's chromium is missing, except in CI (.ci/run installs it and sets
# PORTCULLIS_REQUIRE_CHROMIUM): there a missing browser fails them instead of hiding them.
needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists() and not os.environ.get("PORTCULLIS_REQUIRE_CHROMIUM"),
                                    reason="Debian's chromium is not installed (.ci/run installs it)")


def screenshot(page: Any, name: str, tmp_path: Path) -> None:
    """Saved to PORTCULLIS_SCREENSHOTS when set (the README's pictures), else to the test's own directory."""
    target = Path(os.environ.get("PORTCULLIS_SCREENSHOTS") or tmp_path)
    target.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(target / name), full_page=True)
    assert (target / name).stat().st_size > 1000


@dataclass(frozen=True)
class Ports:
    gateway: int
    idp: int
    mail: int
    docs: int
    kiosk: int = 0
    admin: int = 0

    @classmethod
    def fresh(cls) -> Ports:
        return cls(free_port(), free_port(), free_port(), free_port(), free_port(), free_port())


def demo_config_copy(directory: Path, ports: Ports) -> Path:
    """The shipped ``config/`` copied to ``directory/config`` with its ports replaced."""
    target = directory / "config"
    shutil.copytree(REPO / "config", target)
    yaml = YAML()
    path = target / "portcullis.yaml"
    data = yaml.load(path)
    data["gateway"]["listen"]["port"] = ports.gateway
    data["identity"]["issuer"] = f"http://127.0.0.1:{ports.idp}/contoso"
    data["protectedHosts"]["mail.contoso.test"]["upstream"] = f"http://127.0.0.1:{ports.mail}"
    data["protectedHosts"]["docs.contoso.test"]["upstream"] = f"http://127.0.0.1:{ports.docs}"
    data["kiosk"]["listen"]["port"] = ports.kiosk or free_port()
    data["kiosk"]["passThrough"] = [f"127.0.0.1:{ports.idp}"]
    data["admin"]["listen"]["port"] = ports.admin or free_port()
    yaml.dump(data, path)
    return target


def write_trustme_certificate(ca: trustme.CA, config_dir: Path) -> None:
    """A trustme server certificate where the config expects the gateway's PEM (chain + key); and,
    as the demo makes them, the demo device CA and its devices' certificates."""
    pem = config_dir.parent / "certs" / "gateway.pem"
    pem.parent.mkdir(parents=True, exist_ok=True)
    server = ca.issue_cert(*HOSTS)
    pem.write_bytes(b"".join(b.bytes() for b in server.cert_chain_pems) + server.private_key_pem.bytes())
    ensure_demo_device_certificates(ensure_device_ca(pem.parent), DEMO_CERTIFICATES, b"portcullis")


class Background[T]:
    """Runs an async context manager in its own thread and event loop, as a sync one."""

    def __init__(self, factory: Callable[[], contextlib.AbstractAsyncContextManager[T]]) -> None:
        self._factory = factory
        self._ready = threading.Event()
        self._value: T | None = None
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        try:
            async with self._factory() as value:
                self._value = value
                self._ready.set()
                await self._stop.wait()
        except BaseException as error:  # noqa: BLE001  (handed to the test thread)
            self._error = error
            self._ready.set()

    def __enter__(self) -> T:
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise TimeoutError("background service did not start")
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value

    def __exit__(self, *_: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(START_TIMEOUT)


def gateway_config(tmp_path: Path, ca: trustme.CA, ports: Ports) -> Path:
    """A copy of the demo config for a gateway a test starts itself, with the session's certificate."""
    config_dir = demo_config_copy(tmp_path, ports)
    write_trustme_certificate(ca, config_dir)
    return config_dir


async def operations_for(config_dir: Path, *, fetch_keys: bool = True) -> Operations:
    """What ``running_gateway`` wires (seeded inventory, service, keys, reloader, health), without
    listeners: the test adds the listener it needs (``proxy_for`` or the admin listener)."""
    loaded = bootstrap.load(config_dir)
    bootstrap.seed_store(loaded)
    service, jwks = bootstrap.build_service(loaded)
    if fetch_keys:
        await jwks.refresh()
    return Operations.of(service, jwks, loaded.inventory)


@contextlib.asynccontextmanager
async def proxy_for(service: AccessService, endpoints: dict[str, ASGIApp] | None = None) -> AsyncIterator[int]:
    """Only the mitmproxy listener (and the gateway's own ``endpoints``, if given), for a service
    a test built itself (fault injection)."""
    try:
        async with running_master(lambda: build_master(service, endpoints)) as ready:
            yield ready.addresses[0][1]
    finally:
        service.close()


@contextlib.asynccontextmanager
async def running_master(build: Callable[[], tuple[Master, Ready]]) -> AsyncIterator[Ready]:
    """The master ``build`` makes, running in this loop until the block ends.

    mitmproxy keeps one master per process in ``mitmproxy.ctx`` and hands every new connection
    to it, so the session's gateway is put back in place once this one stops."""
    previous = (getattr(mitmproxy.ctx, "master", None), getattr(mitmproxy.ctx, "options", None))
    master, ready = build()
    task = asyncio.create_task(master.run())
    await asyncio.wait_for(ready.event.wait(), START_TIMEOUT)
    try:
        yield ready
    finally:
        master.shutdown()
        await task
        mitmproxy.ctx.master, mitmproxy.ctx.options = previous  # type: ignore[assignment]  # None: there was none


@contextlib.contextmanager
def addon_context(*addons: object) -> Iterator[taddons.context]:
    """mitmproxy's ``taddons.context`` for ``addons``, leaving ``mitmproxy.ctx`` as it found it
    (the process's other masters, such as the session's gateway, keep theirs)."""
    before = {name: getattr(mitmproxy.ctx, name, None) for name in ("master", "options", "log")}
    try:
        with taddons.context(*addons) as context:
            try:
                yield context
            finally:
                context.master._legacy_log_events.uninstall()  # as Master.run does when it ends
    finally:
        for name, value in before.items():
            setattr(mitmproxy.ctx, name, value)


def http1_layer[L: Http1Server](layer: type[L]) -> tuple[L, connection.Client]:
    """An HTTP/1 server layer alone (mitmproxy's, or the gateway's strict one), fed bytes as one
    client's reads would bring them."""
    client = connection.Client(peername=("192.0.2.1", 50000), sockname=("127.0.0.1", 443), timestamp_start=0,
                               state=connection.ConnectionState.OPEN)
    server = layer(Context(client, mitmproxy.options.Options()))
    list(server.handle_event(events.Start()))
    return server, client


@dataclass
class Gateway:
    """A running gateway and a TLS client that trusts it."""

    port: int
    idp: DemoIdentityProvider
    ca: trustme.CA
    config_dir: Path
    decision_log: Path
    admin_port: int = 0  # the admin API (http on 127.0.0.1)
    upstreams: DemoUpstreams | None = None  # the demo backends every test gateway forwards to

    def demo_certificate(self, intune_device_id: str | None) -> tuple[Path, Path] | None:
        """The demo device certificate of a scenario's device (PEM certificate and key), as the demo makes it."""
        if intune_device_id is None:
            return None
        return demo_device_files(self.config_dir.parent / "certs" / DEVICE_CA_FILE, intune_device_id)

    def client(self, certificate: tuple[Path, Path] | None = None) -> httpx.Client:
        """``certificate``: a client certificate and its key (PEM files) to present, as a device does."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        if certificate is not None:
            context.load_cert_chain(*certificate)
        return httpx.Client(verify=context, timeout=10)

    def request(self, host: str, path: str, *, method: str = "GET", token: str | None = None,
                headers: dict[str, str] | None = None, port: int | None = None,
                sni: str | None = None, certificate: tuple[Path, Path] | None = None,
                **kwargs: Any) -> httpx.Response:
        """Connect to 127.0.0.1 but speak TLS (SNI, certificate check) and HTTP as ``host``."""
        sent = {"Host": host, **(headers or {})}
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        with self.client(certificate) as client:
            return client.request(method, f"https://127.0.0.1:{port or self.port}{path}", headers=sent,
                                  extensions={"sni_hostname": sni or host}, **kwargs)

    def decision(self, correlation_id: str) -> dict[str, Any]:
        """The logged record; the log is written by a thread of its own, so wait for it a little."""
        deadline = time.monotonic() + 5
        while True:
            for line in self.decision_log.read_text().splitlines():
                if f'"correlationId":"{correlation_id}"' in line:
                    with contextlib.suppress(json.JSONDecodeError):  # the writer may be mid-line
                        return json.loads(line)
            if time.monotonic() > deadline:
                raise AssertionError(f"no decision logged for {correlation_id}")
            time.sleep(0.01)


def logged_records(log: Path) -> list[dict[str, Any]]:
    """Every whole record of a decision log file, oldest first: the writer thread may be mid-line,
    and a half line is left out until it is whole."""
    records = []
    for line in log.read_text().splitlines() if log.exists() else ():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def demo_ports() -> Ports:
    return Ports.fresh()


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA, demo_ports: Ports) -> Iterator[Gateway]:
    """The shipped demo config, served for real: issuer, backends and the mitmproxy listener."""
    config_dir = demo_config_copy(tmp_path_factory.mktemp("demo"), demo_ports)
    write_trustme_certificate(ca, config_dir)
    loaded = bootstrap.load(config_dir)
    with Background(lambda: running_gateway(loaded, demo=True)) as running:
        assert running.upstreams is not None
        yield Gateway(
            port=running.addresses[0][1],
            idp=running.upstreams.idp,
            ca=ca,
            config_dir=config_dir,
            decision_log=loaded.config.path(loaded.config.gateway_file.decision_log.path),
            admin_port=running.admin[1] if running.admin else 0,
            upstreams=running.upstreams,
        )


class LongPoll:
    """A request held open through a gateway to the demo backends, in a thread: ``send(user_agent)``
    sends it and returns the answer's status. ``started()`` returns once the gateway has decided and
    forwarded it (the backend holds it); ``closed_after(t)`` waits for the end and says how long
    after ``t`` the connection was closed (None if the request was answered instead of closed)."""

    def __init__(self, send: Callable[[str], int], user_agent: str, decision_log: Path,
                 upstreams: DemoUpstreams | None) -> None:
        assert upstreams is not None, "a long-poll is held by the demo backends"
        self._send = send
        self._user_agent = f"{user_agent} (ping {uuid.uuid4().hex})"  # finds it upstream and in the log
        self._log = decision_log
        self._upstreams = upstreams
        self._error: Exception | None = None
        self._ended = 0.0
        self.status: int | None = None  # the answer's status when it was answered
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        try:
            self.status = self._send(self._user_agent)
        except httpx.HTTPError as error:
            self._error = error
        self._ended = time.monotonic()

    def start(self) -> LongPoll:
        self._thread.start()
        return self

    def started(self) -> LongPoll:
        """Waits until the backend holds this request: the gateway decided and forwarded it. (Its
        own decision record is written when it is answered or closed, not before.)"""
        self.start()
        deadline = time.monotonic() + 10
        while not self.held():
            assert self._thread.is_alive(), f"the long-poll ended before the backend held it ({self.status})"
            assert time.monotonic() < deadline, "the backend never received the long-poll"
            time.sleep(0.01)
        return self

    def held(self) -> bool:
        return self._upstreams.holding(self._user_agent)

    def decisions(self, count: int, *, again: bool | None = None) -> list[dict[str, Any]]:
        """Waits for ``count`` logged records of this request, in log order: its own (written once it
        is answered or closed) and one per re-decision while it was open (``continuousAccessEvaluation``,
        written at once); ``again``: only the re-decisions (True) or only its own (False). The log is
        written in batches, so a line that appears meanwhile may be half written."""
        deadline = time.monotonic() + 10
        while True:
            found = []
            for line in self._log.read_text().splitlines() if self._log.exists() else ():
                if f'"userAgent":"{self._user_agent}"' in line and \
                        again in (None, '"continuousAccessEvaluation":true' in line):
                    with contextlib.suppress(json.JSONDecodeError):  # the writer may be mid-line
                        found.append(json.loads(line))
            if len(found) >= count:
                return found
            assert time.monotonic() < deadline, f"the long-poll has {len(found)} such records, not {count}"
            time.sleep(0.01)

    def closed_after(self, since: float) -> float | None:
        self._thread.join(15)
        assert not self._thread.is_alive(), "the long-poll neither ended nor was closed within 15 s"
        return self._ended - since if self._error is not None else None


class AlexPing(LongPoll):
    """Alex's Outlook holding an ActiveSync Ping long-poll open through the gateway (the session's,
    or the one listening on ``port`` and logging to ``decision_log``)."""

    def __init__(self, gateway: Gateway, heartbeat_seconds: int = 8, *, port: int | None = None,
                 decision_log: Path | None = None) -> None:
        from gateway.app.demo import ALEX_IPHONE, EXCHANGE, OUTLOOK_MOBILE, activesync

        token = gateway.idp.mint(user="alex@contoso.test", client_id=OUTLOOK_MOBILE, audience=EXCHANGE,
                                 device_id=ALEX_IPHONE)
        path = activesync(ALEX_IPHONE).replace("Cmd=Sync", "Cmd=Ping") + f"&HeartbeatInterval={heartbeat_seconds}"

        def send(user_agent: str) -> int:
            return gateway.request("mail.contoso.test", path, method="POST", token=token,
                                   headers={"User-Agent": user_agent}, timeout=20, port=port).status_code

        super().__init__(send, "Outlook-iOS/2.0", decision_log or gateway.decision_log, gateway.upstreams)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server for the shared-state tests (skipped without one, unless CI requires it)."""
    server = started_or_skipped()
    yield server
    server.close()


@pytest.fixture
def run_log_levels(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Captured at the levels ``portcullis run`` sets (the libraries' INFO lines quieted): a line
    the test finds here is one an operator's log holds."""
    from gateway.app.cli import QUIET_LIBRARIES

    for name in QUIET_LIBRARIES:
        caplog.set_level(logging.WARNING, logger=name)
    caplog.set_level(logging.INFO)  # last: each call also sets the capturing handler's level
    return caplog


# Fixtures several test modules use. Their helpers live in tests/helpers/, which imports this module,
# so each fixture imports them when it runs.

@pytest.fixture
def kiosk(gateway: Gateway) -> httpx.Client:
    from tests.helpers.kiosk import kiosk_browser

    return kiosk_browser(gateway)


@pytest.fixture
def restore_alex(gateway: Gateway):
    from gateway.app.demo import ALEX_IPHONE
    from tests.helpers.mtd import level, push

    yield
    assert push(gateway, level(ALEX_IPHONE, "low")).status_code == 202


@pytest.fixture
def pair(gateway: Gateway, demo_ports: Ports, redis_server: RedisServer,
         tmp_path: Path) -> Iterator[tuple[Instance, Instance]]:
    from tests.helpers.scale_out import Instance, shared_config

    redis_server.start()  # a test before may have stopped it
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    first = Instance(gateway, shared_config(tmp_path / "a", gateway, demo_ports, redis_server, prefix))
    second = Instance(gateway, shared_config(tmp_path / "b", gateway, demo_ports, redis_server, prefix))
    try:
        yield first.ready(), second.ready()
    finally:
        for instance in (first, second):
            instance.process.stop()


@pytest.fixture
def alex(gateway: Gateway) -> str:
    from gateway.app.demo import ALEX_IPHONE, EXCHANGE, OUTLOOK_MOBILE

    return gateway.idp.mint(user="alex@contoso.test", client_id=OUTLOOK_MOBILE, audience=EXCHANGE,
                            device_id=ALEX_IPHONE)
