"""A test per mitmproxy or h11 internal the gateway touches (``addons/mitm_internals.py`` lists
them, numbered as here). Each checks the shape the gateway relies on (the name exists, with the
signature or fields it uses) and, where cheap, the behaviour; a failure names the touch, so that
an upgrade shows what to read. Also: the start-up refusal of untested versions, the pins, and that
no other addon reaches past mitmproxy's public API except through that module."""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
import stat
import tomllib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import h11
import mitmproxy.options
import pytest
from mitmproxy import connection, exceptions, hooks, http, io, version
from mitmproxy.addons import core, next_layer, proxyserver
from mitmproxy.addons.save import Save
from mitmproxy.master import Master
from mitmproxy.proxy import events, mode_servers
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import http as http_layer
from mitmproxy.proxy.layers.http import _hooks as hooks_of_http
from mitmproxy.test import tflow
from mitmproxy.utils import human

from addons import mitm_internals, strict_http
from addons.mitm_internals import (
    HTTP1_SERVER_OVERRIDES,
    HTTP1_SERVER_READS,
    HTTP_STREAM_OVERRIDES,
    HTTP_STREAM_READS,
    LAYER_MESSAGES,
    TESTED_VERSIONS,
    ChunkedReader,
    ErrorCode,
    Http1Server,
    HttpStream,
    ReceiveBuffer,
    ReceiveHttp,
    UntestedVersion,
)
from addons.recorded_flows import BoundedFlowFile, FlowRecording, FlowTooLong
from addons.runner import Ready
from addons.strict_http import (
    ErrorAnsweredHook,
    RefusedBodyReadHook,
    RequestRefusedHook,
    StrictChunkedReader,
    StrictHttp1Server,
    StrictHttpStream,
)
from tests.conftest import REPO, addon_context, free_port, http1_layer, running_master

WAIT = 5.0  # seconds a step of the live test may take before it fails (never reached when it works)


def touch(number: int, what: str) -> str:
    """The failure message: which touch (numbered as in mitm_internals' docstring) no longer holds."""
    tested = " and ".join(f"{name} {number}" for name, number in TESTED_VERSIONS.items())
    return f"mitm_internals touch {number}, {what}: not as on {tested} (installed: mitmproxy {version.VERSION}, " \
           f"h11 {h11.__version__})"


@pytest.fixture
def original_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """mitmproxy's own HTTP layer classes in place for this test (put back as they were after it:
    a gateway started earlier in this process installed the strict ones)."""
    monkeypatch.setattr(http_layer, "Http1Server", Http1Server)
    monkeypatch.setattr(http_layer, "HttpStream", HttpStream)


# ---------------------------------------------------------------------------------------------
# Versions: pinned, and refused at start-up when others are installed

def test_the_installed_versions_are_the_tested_ones_and_pinned_exactly() -> None:
    assert mitm_internals.installed_versions() == TESTED_VERSIONS, \
        "run this module on the new versions, then update TESTED_VERSIONS and the pins in pyproject.toml"
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert {f"{name}=={number}" for name, number in TESTED_VERSIONS.items()} <= set(dependencies), dependencies


@pytest.mark.parametrize(("module", "attribute", "installed"), [
    pytest.param(version, "VERSION", "12.3.2", id="a mitmproxy patch release"),
    pytest.param(version, "VERSION", "13.0.0", id="the next mitmproxy"),
    pytest.param(h11, "__version__", "0.16.1", id="an h11 patch release"),
])
def test_start_up_refuses_an_untested_version_before_replacing_anything(
        monkeypatch: pytest.MonkeyPatch, original_layers: None, module: ModuleType, attribute: str,
        installed: str) -> None:
    monkeypatch.setattr(module, attribute, installed)
    monkeypatch.setattr(mode_servers, "asyncio", asyncio)
    with pytest.raises(UntestedVersion) as refused:
        strict_http.install()  # what build_master calls before mitmproxy starts
    message = str(refused.value)
    assert message.startswith("addons/mitm_internals.py is written for mitmproxy 12.3.1 and h11 0.16.0, and this is ")
    assert installed in message and "tests/test_mitm_internals.py" in message
    assert (http_layer.Http1Server, http_layer.HttpStream) == (Http1Server, HttpStream), "replaced though refused"
    with pytest.raises(UntestedVersion):
        mitm_internals.listen_with_reuse_port()  # a worker's first step
    assert mode_servers.asyncio is asyncio, "replaced though refused"


# ---------------------------------------------------------------------------------------------
# h11 (1, 2)

def test_h11_receive_buffer_keeps_exactly_the_unread_bytes() -> None:
    """1: the head check reads ``ReceiveBuffer._data`` in place: it must be the unread bytes, no more."""
    buf = ReceiveBuffer()
    buf += b"GET / HTTP/1.1\r\nHost: a\r\n\r\n5\r\nhel"
    unread = mitm_internals.unread_bytes(buf)
    assert isinstance(unread, bytearray) and unread == bytes(buf) and len(unread) == len(buf), touch(1, "_data")
    assert buf.maybe_extract_lines() is not None
    assert mitm_internals.unread_bytes(buf) == b"5\r\nhel", touch(1, "_data after a head was taken")
    assert buf.maybe_extract_next_line() == b"5\r\n" and buf.maybe_extract_at_most(2) == b"he", \
        touch(1, "maybe_extract_next_line, maybe_extract_at_most")
    assert mitm_internals.unread_bytes(buf) is mitm_internals.unread_bytes(buf) == b"l", touch(1, "read in place")
    assert buf.maybe_extract_next_line() is None and buf.maybe_extract_at_most(5) == b"l"


def test_a_chunked_request_body_is_read_by_h11s_chunked_reader_until_the_strict_one_replaces_it() -> None:
    """2 and 4: mitmproxy's Http1Server reads a chunked body with h11's ``ChunkedReader`` (which
    StrictHttp1Server recognises by its exact type) and calls it as ``reader(buf)``."""
    parameters = list(inspect.signature(ChunkedReader.__call__).parameters)
    assert parameters == ["self", "buf"] and callable(ChunkedReader.read_eof), touch(2, "the reader interface")
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel"
    for layer, reader in ((Http1Server, ChunkedReader), (StrictHttp1Server, StrictChunkedReader)):
        server, client = http1_layer(layer)
        sent = list(server.handle_event(events.DataReceived(client, head)))
        assert type(server.body_reader) is reader, touch(2, f"{layer.__name__}.body_reader for a chunked body")
        received = [type(c.event).__name__ for c in sent if isinstance(c, ReceiveHttp)]
        assert received == ["RequestHeaders", "RequestData"], touch(4, f"{layer.__name__} reading a head and body")


# ---------------------------------------------------------------------------------------------
# mitmproxy's HTTP layer (3-7)

def test_the_http_layer_builds_the_installed_classes(original_layers: None) -> None:
    """3: HttpLayer looks up ``Http1Server`` and ``HttpStream`` in its module each time."""
    for installed in (False, True):
        if installed:
            strict_http.install()
        client = connection.Client(peername=("192.0.2.1", 50000), sockname=("127.0.0.1", 443), timestamp_start=0,
                                   state=connection.ConnectionState.OPEN)
        layer = http_layer.HttpLayer(Context(client, mitmproxy.options.Options()), http_layer.HTTPMode.regular)
        list(layer.handle_event(events.Start()))
        list(layer.make_stream(1))
        built = (type(layer.connections[client]), type(layer.streams[1]))
        expected = (StrictHttp1Server, StrictHttpStream) if installed else (Http1Server, HttpStream)
        assert built == expected, touch(3, "the module globals HttpLayer builds from")


@pytest.mark.parametrize(("strict", "base", "listed"), [
    pytest.param(StrictHttp1Server, Http1Server, HTTP1_SERVER_OVERRIDES, id="Http1Server"),
    pytest.param(StrictHttpStream, HttpStream, HTTP_STREAM_OVERRIDES, id="HttpStream"),
])
def test_the_strict_classes_override_only_the_listed_methods(strict: type, base: type, listed: frozenset[str]) -> None:
    """4, 5: an override mitm_internals does not list would escape the tests below."""
    overridden = {name for name in vars(strict) if not name.startswith("__") and callable(getattr(base, name, None))}
    assert overridden == listed, \
        f"{strict.__name__} overrides {sorted(overridden)}; mitm_internals lists {sorted(listed)}"


# The shape of each layer method the strict classes override or call (mitmproxy 12.3.1).
LAYER_METHODS: dict[tuple[type, str], list[str]] = {
    (Http1Server, "read_headers"): ["self", "event"],
    (Http1Server, "read_body"): ["self", "event"],
    (Http1Server, "wait"): ["self", "event"],
    (Http1Server, "done"): ["self", "event"],
    (HttpStream, "_handle_event"): ["self", "event"],
    (HttpStream, "state_wait_for_request_headers"): ["self", "event"],
    (HttpStream, "state_consume_request_body"): ["self", "event"],
    (HttpStream, "state_wait_for_response_headers"): ["self", "event"],
    (HttpStream, "flow_done"): ["self"],
    (HttpStream, "handle_protocol_error"): ["self", "event"],
    (HttpStream, "check_killed"): ["self", "emit_error_hook"],
    (HttpStream, "send_response"): ["self", "already_streamed"],
    (HttpStream, "state_done"): ["self", "_"],
    (HttpStream, "state_errored"): ["self", "_"],
}


@pytest.mark.parametrize(("base", "name"), list(LAYER_METHODS), ids=lambda v: v if isinstance(v, str) else v.__name__)
def test_the_layer_methods_strict_http_overrides_or_calls_keep_their_signatures(base: type, name: str) -> None:
    number = 4 if base is Http1Server else 5
    method = getattr(base, name, None)
    assert callable(method), touch(number, f"{base.__name__}.{name} is gone")
    assert list(inspect.signature(method).parameters) == LAYER_METHODS[base, name], \
        touch(number, f"{base.__name__}.{name}{inspect.signature(method)}")
    strict = StrictHttp1Server if base is Http1Server else StrictHttpStream
    assert inspect.signature(getattr(strict, name)).parameters.keys() == inspect.signature(method).parameters.keys()


def _has(layer: object, name: str) -> bool:
    annotated = any(name in vars(cls).get("__annotations__", {}) for cls in type(layer).__mro__)
    return hasattr(layer, name) or annotated


def test_the_layer_attributes_strict_http_reads_exist() -> None:
    """4, 5: set when the layer is built, or declared for later (``body_reader``, ``flow``)."""
    client = connection.Client(peername=("192.0.2.1", 50000), sockname=("127.0.0.1", 443), timestamp_start=0,
                               state=connection.ConnectionState.OPEN)
    server = Http1Server(Context(client, mitmproxy.options.Options()))
    stream = HttpStream(Context(client, mitmproxy.options.Options()), 1)
    missing = [f"Http1Server.{name}" for name in HTTP1_SERVER_READS if not _has(server, name)]
    missing += [f"HttpStream.{name}" for name in HTTP_STREAM_READS if not _has(stream, name)]
    assert not missing, touch(4, f"attributes gone: {missing}")
    assert isinstance(server.buf, ReceiveBuffer) and server.conn is client, touch(4, "Http1Server.buf, .conn")
    assert stream.stream_id == 1 and stream.context.client is client, touch(5, "HttpStream.stream_id, .context")
    assert callable(stream.client_state) and callable(stream.server_state), touch(5, "HttpStream's state methods")


@pytest.mark.parametrize("message", list(LAYER_MESSAGES), ids=lambda m: m.__name__)
def test_the_layer_messages_strict_http_uses_keep_their_fields(message: type) -> None:
    """6: the commands and events strict_http builds, reads or replaces."""
    assert list(inspect.signature(message).parameters) == list(LAYER_MESSAGES[message]), \
        touch(6, f"{message.__name__}{inspect.signature(message)}")


def test_error_codes_map_to_statuses() -> None:
    """6: strict_http answers a protocol error with the status its code maps to, else 502."""
    statuses = {code: code.http_status_code() for code in (ErrorCode.GENERIC_CLIENT_ERROR,
                                                           ErrorCode.GENERIC_SERVER_ERROR, ErrorCode.KILL)}
    assert statuses == {ErrorCode.GENERIC_CLIENT_ERROR: 400, ErrorCode.GENERIC_SERVER_ERROR: 502,
                        ErrorCode.KILL: None}, touch(6, "ErrorCode.http_status_code")


def test_a_start_hook_subclass_is_dispatched_to_addons_by_its_name() -> None:
    """7: the hooks of the gateway's own reach the addon methods named after them."""
    assert hooks.all_hooks.get("refused_body_read") is RefusedBodyReadHook, touch(7, "StartHook registration")
    assert hooks.all_hooks.get("error_answered") is ErrorAnsweredHook, touch(7, "StartHook registration")
    assert hooks.all_hooks.get("request_refused") is RequestRefusedHook, touch(7, "StartHook registration")
    assert RefusedBodyReadHook.blocking and mitm_internals.HttpResponseHeadersHook.name == "responseheaders", \
        touch(7, "blocking hooks; HttpResponseHeadersHook's name")

    class Listener:
        def __init__(self) -> None:
            self.heard: list[tuple[str, http.HTTPFlow]] = []

        def refused_body_read(self, flow: http.HTTPFlow) -> None:
            self.heard.append(("refused_body_read", flow))

        def error_answered(self, flow: http.HTTPFlow) -> None:
            self.heard.append(("error_answered", flow))

    listener, flow = Listener(), tflow.tflow()
    with addon_context(listener) as context:
        for hook in (RefusedBodyReadHook(flow), ErrorAnsweredHook(flow)):
            context.master.addons.invoke_addon_sync(listener, hook)
    assert listener.heard == [("refused_body_read", flow), ("error_answered", flow)], touch(7, "hook dispatch")


# ---------------------------------------------------------------------------------------------
# mitmproxy's addon manager (15)

class AddonBug(Exception):
    pass


def recording_chain(heard: list[str]) -> list[object]:
    """Addons of every shape the manager handles: sync and async hooks, sub-addons, an addon that
    fails (logged, the next one runs), one that halts the chain, one after it, an ``update``."""
    return [*_plain_addons(heard), *_unusual_addons(heard)]


def _plain_addons(heard: list[str]) -> list[object]:
    class Sync:
        def requestheaders(self, flow: http.HTTPFlow) -> None:
            heard.append(f"sync {flow.id == probe.id}")

    class Async:
        async def requestheaders(self, flow: http.HTTPFlow) -> None:
            await asyncio.sleep(0)
            heard.append("async")

    class Child:
        def request(self, flow: http.HTTPFlow) -> None:
            heard.append("child request")

    class Parent:
        def __init__(self) -> None:
            self.addons = [Child()]

        def request(self, flow: http.HTTPFlow) -> None:
            heard.append("parent request")

    return [Sync(), Async(), Parent()]


def _unusual_addons(heard: list[str]) -> list[object]:
    class Failing:
        def requestheaders(self, flow: http.HTTPFlow) -> None:
            heard.append("failing")
            raise AddonBug("a bug in an addon")

    class Halting:
        def request(self, flow: http.HTTPFlow) -> None:
            heard.append("halting")
            raise exceptions.AddonHalt

    class Late:
        def requestheaders(self, flow: http.HTTPFlow) -> None:
            heard.append("late requestheaders")

        def request(self, flow: http.HTTPFlow) -> None:
            heard.append("late request (never: halted)")

        def update(self, flows: list[http.HTTPFlow]) -> None:
            heard.append(f"update {len(flows)}")

    return [Failing(), Halting(), Late()]


probe = tflow.tflow()


async def dispatched(hook_table: bool, caplog: pytest.LogCaptureFixture) -> list[str]:
    heard: list[str] = []
    previous = (getattr(mitmproxy.ctx, "master", None), getattr(mitmproxy.ctx, "options", None))
    master = Master(mitmproxy.options.Options(), with_termlog=False)
    try:
        if hook_table:
            assert isinstance(mitm_internals.use_hook_table(master), mitm_internals.HookTable)
        chain = recording_chain(heard)
        master.addons.add(*chain[:-1])
        caplog.clear()
        await master.addons.handle_lifecycle(hooks_of_http.HttpRequestHeadersHook(probe))
        await master.addons.handle_lifecycle(hooks_of_http.HttpRequestHook(probe))
        heard.append(f"logged {[r.getMessage() for r in caplog.records if r.levelname == 'ERROR']}")
        master.addons.chain.append(chain[-1])  # as a test or a dynamic addon would: the table follows
        await master.addons.handle_lifecycle(hooks_of_http.HttpRequestHeadersHook(probe))
        master.addons.remove(chain[0])
        await master.addons.handle_lifecycle(hooks_of_http.HttpRequestHeadersHook(probe))
    finally:
        master._legacy_log_events.uninstall()  # its log handler writes to this (then closed) loop
        mitmproxy.ctx.master, mitmproxy.ctx.options = previous  # type: ignore[assignment]
    return heard


def test_the_hook_table_dispatches_as_mitmproxys_addon_manager(caplog: pytest.LogCaptureFixture) -> None:
    """15: the same callables in the same order, errors logged alike, AddonHalt, update and changes
    of the chain (an appended addon is reached, a removed one no more) as mitmproxy's own manager."""
    ours, theirs = asyncio.run(dispatched(True, caplog)), asyncio.run(dispatched(False, caplog))
    assert ours == theirs, touch(15, "AddonManager's dispatch")
    assert "late requestheaders" in ours and "update 1" in ours and "logged ['Addon error: a bug in an addon']" in ours
    assert "late request (never: halted)" not in ours


# ---------------------------------------------------------------------------------------------
# mitmproxy's proxy server (8-12)

class SeenReader:
    """A client's stream reader, keeping what mitmproxy read through it."""

    def __init__(self, inner: asyncio.StreamReader) -> None:
        self.inner, self.seen, self.read_some = inner, bytearray(), asyncio.Event()

    async def read(self, n: int = -1) -> bytes:
        data = await self.inner.read(n)
        self.seen += data
        self.read_some.set()
        return data


class Clients:
    """Wraps each client's reader as it connects (``wrap_client_reader``) and hands both out."""

    def __init__(self) -> None:
        self.connected: asyncio.Queue[tuple[connection.Client, SeenReader | None]] = asyncio.Queue()

    def client_connected(self, client: connection.Client) -> None:
        self.connected.put_nowait((client, mitm_internals.wrap_client_reader(client, SeenReader)))


def bare_proxy(clients: Clients, port: int) -> Callable[[], tuple[Master, Ready]]:
    def build() -> tuple[Master, Ready]:
        master, ready = Master(mitmproxy.options.Options(), with_termlog=False), Ready()
        master.addons.add(core.Core(), proxyserver.Proxyserver(), next_layer.NextLayer(), clients, ready)
        master.options.update(mode=[f"regular@127.0.0.1:{port}"])
        return master, ready
    return build


async def closed_by_the_proxy(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(), WAIT) == b""


def test_the_proxy_servers_connections_can_be_read_timed_closed_and_stopped() -> None:
    """8-11, on a real listener: a client's reader is wrapped when it connects and mitmproxy reads
    through the wrapper; a connection is closed through its handler, a socket through its writer;
    the bound addresses are read; the listeners stop and open connections go on."""
    async def scenario() -> None:
        clients, port = Clients(), free_port()
        async with running_master(bare_proxy(clients, port)) as ready:
            assert ready.addresses == [("127.0.0.1", port)], touch(11, "Proxyserver.listen_addrs")
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            client, seen = await asyncio.wait_for(clients.connected.get(), WAIT)
            assert seen is not None, touch(8, "Proxyserver.connections -> ConnectionHandler.transports -> .reader")
            writer.write(b"GET http://example.test/ HTTP/1.1\r\n")  # half a head: the proxy keeps waiting
            await asyncio.wait_for(seen.read_some.wait(), WAIT)
            assert seen.seen == b"GET http://example.test/ HTTP/1.1\r\n", touch(8, "mitmproxy reads the reader set")
            mitm_internals.close_client_connection(client)
            assert await closed_by_the_proxy(reader), touch(9, "ConnectionHandler.close_connection")
            writer.close()

            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            client, _ = await asyncio.wait_for(clients.connected.get(), WAIT)
            assert mitm_internals.close_client_socket(client), touch(8, "ConnectionIO.writer")
            assert await closed_by_the_proxy(reader), touch(8, "ConnectionIO.writer")
            writer.close()

            open_reader, open_writer = await asyncio.open_connection("127.0.0.1", port)
            await asyncio.wait_for(clients.connected.get(), WAIT)
            await mitm_internals.stop_listening()
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", port)
            # the open connection goes on: a request to a closed port gets the proxy's 502
            open_writer.write(b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n")
            answer = await asyncio.wait_for(open_reader.readline(), WAIT)
            assert answer.startswith(b"HTTP/1.1 502 "), touch(10, "Proxyserver.servers.update")
            open_writer.close()

    asyncio.run(scenario())


def test_reuse_port_lets_two_listeners_share_a_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """12: mitmproxy's listeners come from ``mode_servers.asyncio.start_server``: two on one port
    fail as mitmproxy binds them, and succeed with the shim (a process-wide change: put back)."""
    monkeypatch.setattr(mode_servers, "asyncio", asyncio)

    async def bind_twice() -> str:
        port, manager = free_port(), proxyserver.Proxyserver()
        first: mode_servers.ServerInstance[Any] = mode_servers.ServerInstance.make(f"regular@127.0.0.1:{port}", manager)
        await first.start()
        try:
            second: mode_servers.ServerInstance[Any] = mode_servers.ServerInstance.make(first.mode, manager)
            try:
                await second.start()
            except OSError:
                return "refused"
            await second.stop()
            return "listening"
        finally:
            await first.stop()

    async def without_and_with_the_shim() -> list[str]:
        with addon_context():  # the listeners read their host and port options from mitmproxy.ctx
            outcomes = [await bind_twice()]
            mitm_internals.listen_with_reuse_port()
            return [*outcomes, await bind_twice()]

    assert asyncio.run(without_and_with_the_shim()) == ["refused", "listening"], touch(12, "mode_servers.asyncio")


# ---------------------------------------------------------------------------------------------
# mitmproxy's flow files (13, 14)

def test_a_recording_is_private_and_keeps_plain_metadata(tmp_path: Path) -> None:
    """13: Save opens its file and writes each flow through ``maybe_rotate_to_new_file`` and its
    writer; a live object in the metadata (the gateway keeps some) would make tnetstring fail."""
    assert callable(getattr(Save, "maybe_rotate_to_new_file", None)), touch(13, "Save.maybe_rotate_to_new_file")
    path = tmp_path / "made" / "recorded.mitm"
    flow = tflow.tflow(resp=True)
    flow.metadata.update({"portcullis.allowed": True, "portcullis.request": object()})
    recorder = FlowRecording()
    with addon_context(recorder) as context:
        context.configure(recorder, save_stream_file=str(path))
        recorder.response(flow)  # Save writes a flow once its response is in
        recorder.done()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, touch(13, "the file Save opens")
    with path.open("rb") as file:
        [read] = io.FlowReader(file).stream()
    assert (read.id, read.metadata) == (flow.id, {"portcullis.allowed": True}), touch(13, "the writer Save uses")


def test_the_flow_reader_reads_only_through_the_bounded_file(tmp_path: Path) -> None:
    """14: FlowReader reads a flow file through the bounded stand-in, which refuses a record
    longer than the file before anything is allocated for it."""
    path = tmp_path / "recorded.mitm"
    with path.open("wb") as file:
        io.FlowWriter(file).add(tflow.tflow(resp=True))
    with path.open("rb") as file:
        assert len(list(io.FlowReader(BoundedFlowFile(file)).stream())) == 1, touch(14, "FlowReader's reads")  # type: ignore[arg-type]
    path.write_bytes(path.read_bytes() + b"999999999999:" + b"x" * 10)
    with path.open("rb") as file, pytest.raises(FlowTooLong):
        list(io.FlowReader(BoundedFlowFile(file)).stream())  # type: ignore[arg-type]


def test_undocumented_helpers_keep_their_signatures() -> None:
    """Not private, but not documented either."""
    from mitmproxy.io import tnetstring

    helpers: dict[Callable[..., object], list[str]] = {
        mitm_internals.assemble_response: ["response"], mitm_internals.connection_close: ["http_version", "headers"],
        mitm_internals.serve: ["app", "flow"], tnetstring.dump: ["value", "file_handle"],
        human.format_address: ["address"]}
    for helper, parameters in helpers.items():
        assert list(inspect.signature(helper).parameters) == parameters, f"{helper.__qualname__} changed"
    assert inspect.iscoroutinefunction(mitm_internals.serve)
    assert mitm_internals.assemble_response(http.Response.make(204)).startswith(b"HTTP/1.1 204 No Content\r\n")
    assert mitm_internals.connection_close("HTTP/1.1", http.Headers(connection="close"))
    assert not mitm_internals.connection_close("HTTP/1.1", http.Headers())
    assert mitm_internals.format_address(("192.0.2.1", 443)) == "192.0.2.1:443"


# ---------------------------------------------------------------------------------------------
# One place

INTERNAL_MODULES = ("h11._", "mitmproxy.proxy.layers", "mitmproxy.proxy.commands", "mitmproxy.proxy.events",
                    "mitmproxy.proxy.server", "mitmproxy.proxy.mode_servers", "mitmproxy.net",
                    "mitmproxy.io.tnetstring", "mitmproxy.addons.asgiapp", "mitmproxy.utils")
INTERNAL_ATTRIBUTES = frozenset({"connections", "transports", "servers", "listen_addrs", "close_connection",
                                 "maybe_rotate_to_new_file", "current_path", "filt", "flt", "fo", "asyncio"})


def reaches_in(tree: ast.Module) -> list[str]:
    """Imports of internal modules, and attributes of mitmproxy's internals or private ones of
    another object, anywhere in a module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name.startswith(INTERNAL_MODULES)]
        elif isinstance(node, ast.ImportFrom):
            found += [f"line {node.lineno}: from {node.module} import {a.name}" for a in node.names
                      if f"{node.module}.{a.name}".startswith(INTERNAL_MODULES)]
        elif isinstance(node, ast.Attribute) and (node.attr in INTERNAL_ATTRIBUTES or (
                node.attr.startswith("_") and not node.attr.startswith("__") and not _own(node.value))):
            found.append(f"line {node.lineno}: .{node.attr}")
    return found


def _own(value: ast.expr) -> bool:
    """``self._x``, ``cls._x``, or ``super()._x`` (an override the strict classes' test checks)."""
    return isinstance(value, ast.Name) and value.id in ("self", "cls") or (
        isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "super")


def test_other_addons_reach_mitmproxy_and_h11_internals_only_through_mitm_internals() -> None:
    offenders = {path.name: found for path in sorted((REPO / "addons").glob("*.py"))
                 if path.name != "mitm_internals.py" and (found := reaches_in(ast.parse(path.read_text())))}
    assert not offenders, f"move these into addons/mitm_internals.py (listed and tested): {offenders}"
    assert reaches_in(ast.parse((REPO / "addons" / "mitm_internals.py").read_text())), "the check sees nothing"



def test_the_module_docstring_names_only_tests_that_exist() -> None:
    named = set(re.findall(r"``(test_\w+)``", mitm_internals.__doc__ or ""))
    assert len(named) >= 14 and named <= set(globals()), sorted(named - set(globals()))
