"""uvicorn servers that run inside a Portcullis process (the admin API, the forward-auth listener,
the demo's identity provider and backends) rather than own it."""

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from pathlib import Path
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

# ASGI's TLS extension: tls_version as the TLS record-layer number
TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves SIGINT and SIGTERM alone: the process that embeds it (the
    CLI, or a test off the main thread) owns the signals and stops the server itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None]:
        yield


class PeerCertificateProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, putting ASGI's TLS extension (``scope["extensions"]["tls"]``,
    with the verified client certificate in ``client_cert_chain``) into each request's scope: uvicorn
    (0.55, pinned in pyproject.toml) does not. The one touch of its internals, here only: the
    protocol's ``app`` attribute, wrapped per connection once the handshake is done. Were it
    ignored, requests would carry no certificate and be refused (tests/test_forward_auth_tls.py)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if isinstance(ssl_object, ssl.SSLObject):
            self.app = _with_tls_extension(self.app, _tls_extension(ssl_object))


def _tls_extension(ssl_object: ssl.SSLObject) -> dict[str, Any]:
    der = ssl_object.getpeercert(binary_form=True)
    return {"server_cert": None, "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
            "client_cert_name": None, "client_cert_error": None,
            "tls_version": TLS_VERSIONS.get(ssl_object.version() or ""), "cipher_suite": None}


def _with_tls_extension(app: Any, tls: dict[str, Any]) -> ASGIApp:
    async def with_tls(scope: Scope, receive: Receive, send: Send) -> None:
        await app({**scope, "extensions": {**scope.get("extensions", {}), "tls": tls}}, receive, send)
    return with_tls


def server_tls(certificate_file: Path, key_file: Path | None, client_ca_files: Sequence[Path]) -> ssl.SSLContext:
    """TLS 1.2 or later with this certificate; with ``client_ca_files``, the handshake requires a
    client certificate one of those CAs issued (a caller without one gets no answer at all)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certificate_file, key_file)
    except (OSError, ssl.SSLError) as error:
        raise RuntimeError(f"{certificate_file}{f' and {key_file}' if key_file else ''}: not a PEM certificate "
                           f"chain with its private key ({error})") from error
    for ca_file in client_ca_files:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as error:
            raise RuntimeError(f"{ca_file}: not a PEM bundle of CA certificates ({error})") from error
    if client_ca_files:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _given(context: ssl.SSLContext) -> Callable[[uvicorn.Config, Callable[[], ssl.SSLContext]], ssl.SSLContext]:
    """uvicorn's ``ssl_context_factory``: this context, not one uvicorn builds."""
    return lambda _config, _default: context


@contextlib.asynccontextmanager
async def serving(app: ASGIApp, host: str, port: int, *, name: str,
                  tls: ssl.SSLContext | None = None) -> AsyncIterator[tuple[str, int]]:
    """uvicorn in the running loop. The socket is bound first, so a port in use is a clear error;
    client addresses are the ones the socket saw (uvicorn never reads X-Forwarded-For: the audit
    log and the forward-auth listener's proxy check name the real peer). With ``tls`` (see
    ``server_tls``) it speaks HTTPS, and each request's scope carries ASGI's TLS extension. Always
    h11, never httptools even where it is installed: llhttp refuses a method it does not know
    before the app sees it (an Envoy check keeps the original one), so that refusal would be
    neither answered by Portcullis nor logged."""
    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as error:
        raise RuntimeError(f"{name} cannot listen on {host}:{port}: {error.strerror}") from error
    protocol = PeerCertificateProtocol if tls is not None else H11Protocol
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False, proxy_headers=False,
                            timeout_graceful_shutdown=2, http=protocol,
                            ssl_context_factory=_given(tls) if tls is not None else None)
    server = EmbeddedServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                await task
                raise RuntimeError(f"{name} on {host}:{port} did not start; see the log above")
            await asyncio.sleep(0.01)
        address = sock.getsockname()
        yield str(address[0]), int(address[1])
    finally:
        server.should_exit = True
        await asyncio.gather(task, return_exceptions=True)
        sock.close()
