"""uvicorn servers that run inside a Portcullis process (the admin API, the forward-auth listener,
the demo's identity provider and backends) rather than own it."""

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Generator

import uvicorn
from starlette.types import ASGIApp


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves SIGINT and SIGTERM alone: the process that embeds it (the
    CLI, or a test off the main thread) owns the signals and stops the server itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None]:
        yield


@contextlib.asynccontextmanager
async def serving(app: ASGIApp, host: str, port: int, *, name: str) -> AsyncIterator[tuple[str, int]]:
    """uvicorn in the running loop. The socket is bound first, so a port in use is a clear error;
    client addresses are the ones the socket saw (uvicorn never reads X-Forwarded-For: the audit
    log and the forward-auth listener's proxy check name the real peer)."""
    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as error:
        raise RuntimeError(f"{name} cannot listen on {host}:{port}: {error.strerror}") from error
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False, proxy_headers=False,
                            timeout_graceful_shutdown=2)
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
