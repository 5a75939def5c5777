"""Every place Portcullis reaches past mitmproxy's and h11's public API, in one module.

mitmproxy's public API is its addon API: hooks, the flow and connection objects, options, ``ctx``.
In a few places a gateway needs what that API does not offer (strict framing inside the HTTP/1
layer, a deadline on a client's reads, closing a client connection from a hook, SO_REUSEPORT, a
private recording file), and reaches into internals that may change in any release, a patch
release included. A changed internal must stop the gateway, never quietly drop a check (a strict
reader no longer installed would leave mitmproxy's lenient one in place). Hence:

- ``TESTED_VERSIONS``: the only versions these touches were tested on. ``pyproject.toml`` pins
  exactly these (``==``), and ``require_tested_versions()`` refuses any other at start-up, before
  anything is replaced (``install_http_layers``, called by ``strict_http.install()``, and
  ``listen_with_reuse_port``).
- ``tests/test_mitm_internals.py``: a test per touch below; each names its touch when it fails.
- The other addons reach internals only through this module (a test checks their imports and
  attribute names). It holds no logic of its own: the strict framing that subclasses mitmproxy's
  HTTP layer stays in ``strict_http.py`` (it is the gateway's framing, not a way into mitmproxy),
  and takes every internal name from here; its overrides are listed below and tested.

Moving to another version: install it, run ``tests/test_mitm_internals.py``, then the suites named
below; read mitmproxy's and h11's changes to the modules named here; then change
``TESTED_VERSIONS`` and the pins together.

The touches (tested on mitmproxy 12.3.1 and h11 0.16.0), each with its user and its test in
``tests/test_mitm_internals.py``:

h11 (private modules ``h11._receivebuffer``, ``h11._readers``)
 1. ``ReceiveBuffer``: its private ``_data`` (the unread bytes, read in place: ``unread_bytes``)
    and ``maybe_extract_at_most``, ``maybe_extract_next_line``, ``len``, ``bytes``. strict_http's
    head check and chunked reader. ``test_h11_receive_buffer_keeps_exactly_the_unread_bytes``.
 2. ``ChunkedReader``: the reader mitmproxy's ``Http1Server`` sets for a chunked body; strict_http
    puts its own reader (h11's interface: ``reader(buf)``, ``reader.read_eof()``) in its place.
    ``test_a_chunked_request_body_is_read_by_h11s_chunked_reader_until_the_strict_one_replaces_it``.

mitmproxy's HTTP layer (``mitmproxy.proxy.layers.http``, its private ``_http1``, ``_base``,
``_events``, ``_hooks``; ``mitmproxy.proxy.commands`` and ``events``)
 3. Module globals ``Http1Server`` and ``HttpStream``, replaced by ``install_http_layers``:
    ``HttpLayer`` looks both up each time it builds a connection or a stream.
    ``test_the_http_layer_builds_the_installed_classes``.
 4. ``Http1Server`` subclassed by ``StrictHttp1Server``: ``HTTP1_SERVER_OVERRIDES`` and
    ``HTTP1_SERVER_READS``. ``test_the_strict_classes_override_only_the_listed_methods``,
    ``test_the_layer_methods_strict_http_overrides_or_calls_keep_their_signatures``,
    ``test_the_layer_attributes_strict_http_reads_exist``.
 5. ``HttpStream`` subclassed by ``StrictHttpStream``: ``HTTP_STREAM_OVERRIDES`` and
    ``HTTP_STREAM_READS`` (same tests).
 6. The layer's commands and events strict_http reads, yields or replaces (re-exported below,
    ``LAYER_MESSAGES``); ``ErrorCode.http_status_code``.
    ``test_the_layer_messages_strict_http_uses_keep_their_fields``, ``test_error_codes_map_to_statuses``.
 7. Hooks of the gateway's own: a ``StartHook`` subclass registers its ``name`` with the addon
    manager (``refused_body_read``, ``error_answered``, ``request_refused`` in strict_http); ``HttpResponseHeadersHook``
    is run by StrictHttpStream. ``test_a_start_hook_subclass_is_dispatched_to_addons_by_its_name``.

mitmproxy's proxy server (``mitmproxy.addons.proxyserver``, ``mitmproxy.proxy.server``,
``mitmproxy.proxy.mode_servers``)
 8. ``Proxyserver.connections`` → ``ConnectionHandler.transports[client]`` → ``ConnectionIO.reader``:
    RequestFraming times a client's reads (``wrap_client_reader``); ``.writer``: it closes a socket
    mitmproxy left open (``close_client_socket``).
 9. ``ConnectionHandler.close_connection``: ContinuousAccess closes a client whose access was
    withdrawn (``close_client_connection``).
10. ``Proxyserver.servers.update([])``: Drain stops listening (``stop_listening``).
11. ``Proxyserver.listen_addrs()``: the runner's bound addresses (``listen_addresses``).
    8-11: ``test_the_proxy_servers_connections_can_be_read_timed_closed_and_stopped``.
12. ``mode_servers.asyncio``, replaced by a namespace whose ``start_server`` sets SO_REUSEPORT
    (``listen_with_reuse_port``, for ``--workers``). ``test_reuse_port_lets_two_listeners_share_a_port``.

mitmproxy's flow files (``mitmproxy.addons.save``, ``mitmproxy.io``)
13. ``Save.maybe_rotate_to_new_file`` (called by ``configure`` and before each flow is written)
    and its ``stream``, ``filt``, ``current_path``; ``FilteredFlowWriter.add``, ``fo``, ``flt``:
    ``SaveStreamFile``, for recorded_flows' ``FlowRecording``.
    ``test_a_recording_is_private_and_keeps_plain_metadata``.
14. ``FlowReader`` reads its file through ``peek``, ``read``, ``tell`` and ``seek`` only:
    recorded_flows' ``BoundedFlowFile`` stands in for the file (lives there).
    ``test_the_flow_reader_reads_only_through_the_bounded_file``.

mitmproxy's addon manager (``mitmproxy.addonmanager``)
15. ``AddonManager`` subclassed by ``HookTable``, the runner's ``master.addons``: its ``chain``,
    ``add``, ``remove``, ``register``, ``clear`` (which change what a hook reaches),
    ``trigger_event`` and ``handle_lifecycle`` (replaced: the same dispatch from a table of each
    hook's callables, built once per change of the chain, instead of a walk of every addon for
    every hook of every flow), ``traverse`` and the module's ``logger``, ``cut_traceback``.
    ``test_the_hook_table_dispatches_as_mitmproxys_addon_manager``.

Undocumented names that are not private, listed so that an upgrade looks at them too
(``test_undocumented_helpers_keep_their_signatures``): ``mitmproxy.net.http.http1``'s
``assemble_response`` (strict_http) and ``connection_close`` (AccessGate),
``mitmproxy.addons.asgiapp.serve`` (ServiceEndpoints), ``mitmproxy.io.tnetstring.dump`` (13),
``mitmproxy.utils.human.format_address`` (strict_http).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import sys
import types
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import h11
from h11._readers import ChunkedReader
from h11._receivebuffer import ReceiveBuffer
from mitmproxy import addonmanager, connection, ctx, exceptions, flowfilter, hooks, io, version
from mitmproxy.addons import proxyserver
from mitmproxy.addons.asgiapp import serve
from mitmproxy.flow import Flow
from mitmproxy.io import tnetstring
from mitmproxy.net.http.http1 import assemble_response, connection_close
from mitmproxy.proxy import mode_servers
from mitmproxy.proxy.commands import CloseConnection, Command, Log, SendData, StartHook
from mitmproxy.proxy.events import ConnectionClosed, ConnectionEvent, DataReceived, Event
from mitmproxy.proxy.layers import http as http_layer
from mitmproxy.proxy.layers.http import (
    ErrorCode,
    Http1Server,
    HttpResponseHeadersHook,
    HttpStream,
    ReceiveHttp,
    RequestEndOfMessage,
    RequestHeaders,
    RequestProtocolError,
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
    SendHttp,
)
from mitmproxy.proxy.server import ConnectionHandler, ConnectionIO
from mitmproxy.utils.human import format_address

__all__ = [
    "HTTP1_SERVER_OVERRIDES", "HTTP1_SERVER_READS", "HTTP_STREAM_OVERRIDES", "HTTP_STREAM_READS", "LAYER_MESSAGES",
    "TESTED_VERSIONS", "ChunkedReader", "CloseConnection", "Command", "ConnectionClosed", "ConnectionEvent",
    "DataReceived", "ErrorCode", "Event", "Http1Server", "HttpResponseHeadersHook", "HttpStream", "Log",
    "ReceiveBuffer", "ReceiveHttp", "RequestEndOfMessage", "RequestHeaders", "RequestProtocolError", "ResponseData",
    "ResponseEndOfMessage", "ResponseHeaders", "ResponseProtocolError", "SaveStreamFile", "SendData", "SendHttp",
    "StartHook", "UntestedVersion", "assemble_response", "close_client_connection", "close_client_socket",
    "connection_close", "format_address", "install_http_layers", "listen_addresses", "listen_with_reuse_port",
    "require_tested_versions", "serve", "stop_listening", "unread_bytes", "wrap_client_reader",
]

TESTED_VERSIONS = {"mitmproxy": "12.3.1", "h11": "0.16.0"}


class UntestedVersion(RuntimeError):
    """mitmproxy or h11 is not the version the touches here were tested on."""


def installed_versions() -> dict[str, str]:
    return {"mitmproxy": version.VERSION, "h11": h11.__version__}


def require_tested_versions() -> None:
    """Refuse to go on with a mitmproxy or h11 other than ``TESTED_VERSIONS``."""
    installed = installed_versions()
    if installed != TESTED_VERSIONS:
        raise UntestedVersion(
            f"addons/mitm_internals.py is written for {_named(TESTED_VERSIONS)}, and this is {_named(installed)}: "
            "the gateway reaches into their internals (strict HTTP/1 framing, client deadlines), which may have "
            "changed. Install the tested versions (pip install -e . pins them), or run "
            "tests/test_mitm_internals.py on these and then update TESTED_VERSIONS and the pins in pyproject.toml")


def _named(versions: dict[str, str]) -> str:
    return " and ".join(f"{name} {number}" for name, number in versions.items())


# ---------------------------------------------------------------------------------------------
# h11 (1, 2)

def unread_bytes(buf: ReceiveBuffer) -> bytearray:
    """The bytes ``buf`` holds and has not handed out, read in place (no copy per read)."""
    return buf._data


# ---------------------------------------------------------------------------------------------
# mitmproxy's HTTP layer (3-7)

# What StrictHttp1Server and StrictHttpStream override (each keeps its base's signature) and
# what else of their bases they call or read.
HTTP1_SERVER_OVERRIDES = frozenset({"read_headers", "read_body", "wait"})
HTTP1_SERVER_READS = ("buf", "body_reader", "state", "done", "response", "conn", "stream_id")
HTTP_STREAM_OVERRIDES = frozenset({"_handle_event", "state_wait_for_request_headers", "state_consume_request_body",
                                   "state_wait_for_response_headers", "flow_done", "handle_protocol_error"})
HTTP_STREAM_READS = ("flow", "context", "stream_id", "client_state", "server_state", "state_done", "state_errored",
                     "check_killed", "send_response")
# Commands and events strict_http builds, reads or replaces: the fields it uses, in order.
LAYER_MESSAGES: dict[type, tuple[str, ...]] = {
    SendData: ("connection", "data"),
    CloseConnection: ("connection",),
    Log: ("message", "level"),
    DataReceived: ("connection", "data"),
    ConnectionClosed: ("connection",),
    ReceiveHttp: ("event",),
    SendHttp: ("event", "connection"),
    RequestHeaders: ("stream_id", "request", "end_stream", "replay_flow"),
    ResponseHeaders: ("stream_id", "response", "end_stream"),
    RequestProtocolError: ("stream_id", "message", "code"),
    ResponseProtocolError: ("stream_id", "message", "code"),
    ResponseData: ("stream_id", "data"),
    RequestEndOfMessage: ("stream_id",),
    ResponseEndOfMessage: ("stream_id",),
    HttpResponseHeadersHook: ("flow",),
}


def install_http_layers(http1_server: type[Http1Server], http_stream: type[HttpStream]) -> None:
    """Every HTTP/1 client connection and every HTTP stream of this process, from now on, is
    built from these subclasses; refused (before anything is replaced) on an untested version."""
    require_tested_versions()
    http_layer.Http1Server = http1_server  # type: ignore[misc]  # a module global, replaced on purpose
    http_layer.HttpStream = http_stream  # type: ignore[misc]  # likewise


# ---------------------------------------------------------------------------------------------
# mitmproxy's proxy server (8-12)

class StreamRead(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


def wrap_client_reader[R: StreamRead](client: connection.Client, wrap: Callable[[asyncio.StreamReader], R]) -> R | None:
    """Have mitmproxy read ``client``'s connection through ``wrap(its stream reader)``. In
    ``client_connected``: mitmproxy's read loop takes the reader from the connection's handler
    after those hooks. None (nothing wrapped) when there is no such connection or no asyncio reader."""
    transport = _client_transport(client)
    if transport is None or not isinstance(transport.reader, asyncio.StreamReader):
        return None
    wrapped = wrap(transport.reader)
    transport.reader = wrapped  # type: ignore[assignment]  # mitmproxy only awaits read(n) on it
    return wrapped


def close_client_socket(client: connection.Client) -> bool:
    """Close ``client``'s socket if it is still open; whether it was."""
    transport = _client_transport(client)
    writer = transport.writer if transport is not None else None
    if writer is None or writer.is_closing():
        return False
    writer.close()
    return True


def close_client_connection(client: connection.Client) -> None:
    """Close ``client``'s connection as mitmproxy does when a layer commands it (its flows end)."""
    handler = _connection_handler(client)
    if handler is not None:
        handler.close_connection(client)


async def stop_listening() -> None:
    """Close every listener of the running master; open connections go on."""
    await _proxyserver().servers.update([])


def listen_addresses() -> list[tuple[str, int]]:
    """The (host, port) of every listener of the running master."""
    return [(address[0], address[1]) for address in _proxyserver().listen_addrs()]


def listen_with_reuse_port() -> None:
    """mitmproxy has no SO_REUSEPORT option: its TCP listeners come from ``asyncio.start_server``
    in ``mode_servers``. That module gets (in this process only) an asyncio whose start_server sets
    it, so that every worker binds the same ports and the kernel spreads connections across them."""
    require_tested_versions()
    shim = types.SimpleNamespace(**vars(asyncio))
    shim.start_server = functools.partial(asyncio.start_server, reuse_port=True)
    mode_servers.asyncio = shim  # type: ignore[assignment]  # a module global, replaced on purpose


def _proxyserver() -> proxyserver.Proxyserver:
    server: proxyserver.Proxyserver = ctx.master.addons.get("proxyserver")
    return server


def _connection_handler(client: connection.Client) -> ConnectionHandler | None:
    server: proxyserver.Proxyserver | None = ctx.master.addons.get("proxyserver")
    return server.connections.get(client.id) if server is not None else None


def _client_transport(client: connection.Client) -> ConnectionIO | None:
    handler = _connection_handler(client)
    return handler.transports.get(client) if handler is not None else None


# ---------------------------------------------------------------------------------------------
# mitmproxy's flow files (13)

class SaveStreamFile:
    """Mixed into a subclass of mitmproxy's ``Save`` addon (``class X(SaveStreamFile, Save)``):
    ``save_stream_file`` is opened by ``open_stream_file``, and each flow is written as
    ``flow_state`` returns it. (Save calls ``maybe_rotate_to_new_file`` when the option is set and
    before it writes each flow; a new file is opened whenever the strftime path changes.)"""

    stream: io.FilteredFlowWriter | None
    filt: flowfilter.TFilter | None
    current_path: str | None

    def open_stream_file(self, path: Path, *, append: bool) -> BinaryIO:
        raise NotImplementedError

    def flow_state(self, flow: Flow) -> dict[str, Any]:
        return flow.get_state()

    def maybe_rotate_to_new_file(self) -> None:
        spec = ctx.options.save_stream_file
        path = datetime.today().strftime(os.path.expanduser(spec.removeprefix("+")))
        if path == self.current_path:
            return
        if self.stream is not None:
            self.stream.fo.close()
            self.stream = None
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        file = self.open_stream_file(Path(path), append=spec.startswith("+"))
        self.stream = _StateWriter(file, self.filt, self.flow_state)
        self.current_path = path


class _StateWriter(io.FilteredFlowWriter):
    def __init__(self, fo: BinaryIO, flt: flowfilter.TFilter | None, state: Callable[[Flow], dict[str, Any]]) -> None:
        super().__init__(fo, flt)
        self.state = state

    def add(self, f: Flow) -> None:
        if self.flt and not flowfilter.match(self.flt, f):
            return
        tnetstring.dump(self.state(f), self.fo)
        self.fo.flush()


# ---------------------------------------------------------------------------------------------
# mitmproxy's addon manager (15)

type HookCallables = tuple[tuple[Callable[..., Any], ...], ...]


def _changing(name: str) -> Any:
    """``list.<name>``, telling the chain's owner first."""
    def method(self: _Chain, *args: Any, **kwargs: Any) -> Any:
        self._changed()
        return getattr(list, name)(self, *args, **kwargs)
    method.__name__ = name
    return method


class _Chain(list[Any]):
    """The addon chain: any change to it (mitmproxy's ``add`` and ``remove``, or a test that inserts
    an addon) empties the hook table that was built from it."""

    def __init__(self, addons: Any, changed: Callable[[], None]) -> None:
        super().__init__(addons)
        self._changed = changed


for _method in ("append", "extend", "insert", "remove", "pop", "clear", "sort", "reverse", "__setitem__",
                "__delitem__", "__iadd__", "__imul__"):  # every list method that changes the list
    setattr(_Chain, _method, _changing(_method))


class HookTable(addonmanager.AddonManager):
    """mitmproxy's addon manager, dispatching each hook from a table: per hook name, for each addon
    of the chain that has it (in chain order), its callables and its sub-addons'. mitmproxy walks
    every addon (and its sub-addons) for every hook of every flow, and runs each flow hook a second
    time as ``update``; the table skips the addons without the hook, and ``update`` when no addon
    has it. The table is rebuilt after any change of the chain or of what is registered. The same
    semantics otherwise: an addon's error is logged as mitmproxy logs it and the next addon runs;
    ``AddonHalt`` stops the chain; ``OptionsError`` propagates."""

    def __init__(self, master: Any) -> None:
        self._table: dict[str, HookCallables] = {}
        super().__init__(master)

    @property
    def chain(self) -> _Chain:
        return self._chain

    @chain.setter
    def chain(self, addons: list[Any]) -> None:  # mitmproxy assigns a new list in __init__, remove and clear
        self._table.clear()
        self._chain = _Chain(addons, self._table.clear)

    def hook_callables(self, name: str) -> HookCallables:
        """Per addon of the chain that has hook ``name``, its callables and its sub-addons'. A
        sub-addon list changed in place after the addon joined (mitmproxy's script loader does;
        no gateway addon has sub-addons) is seen once the chain changes next."""
        found = self._table.get(name)
        if found is None:
            found = tuple(funcs for funcs in (self._callables(addon, name) for addon in self._chain) if funcs)
            self._table[name] = found
        return found

    @staticmethod
    def _callables(addon: Any, name: str) -> tuple[Callable[..., Any], ...]:
        """What mitmproxy's ``_iter_hooks`` yields for one addon of the chain."""
        found = []
        for each in addonmanager.traverse([addon]):
            func = getattr(each, name, None)
            if not func or isinstance(func, types.ModuleType):
                continue
            if not callable(func):
                raise exceptions.AddonManagerError(f"Addon handler {name} ({each}) not callable")
            found.append(func)
        return tuple(found)

    def register(self, addon: Any) -> Any:
        self._table.clear()  # a registered addon's sub-addons join its parent's callables
        return super().register(addon)

    async def trigger_event(self, event: hooks.Hook) -> None:
        table = self.hook_callables(event.name)
        if not table:
            return
        args = event.args()
        for funcs in table:
            try:
                for func in funcs:
                    result = func(*args)
                    if result is not None and inspect.isawaitable(result):
                        await result
            except exceptions.AddonHalt:
                return
            except exceptions.OptionsError:
                raise
            except Exception:  # noqa: BLE001  (an addon's error: logged as mitmproxy's safecall logs it; the next addon runs)
                _log_addon_error()

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        message = event.args()[0]
        await self.trigger_event(event)
        if isinstance(message, Flow) and self.hook_callables("update"):
            await self.trigger_event(hooks.UpdateHook([message]))


def use_hook_table(master: Any) -> HookTable:
    """Before any addon is added: the master's addons become a ``HookTable`` (the manager mitmproxy
    made is disconnected from the options it listened to)."""
    require_tested_versions()
    assert not master.addons.chain, "the hook table replaces an empty addon manager only"
    master.options.changed.disconnect(master.addons._configure_all)
    master.addons = HookTable(master)
    return master.addons


def _log_addon_error() -> None:
    etype, value, tb = sys.exc_info()
    tb = addonmanager.cut_traceback(tb, "trigger_event")
    addonmanager.logger.error(f"Addon error: {value}", exc_info=(etype, value, tb))  # type: ignore[arg-type]
