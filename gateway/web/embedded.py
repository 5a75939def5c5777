"""uvicorn servers that run inside a Portcullis process (the admin API, the demo's identity provider
and backends) rather than own it."""

import contextlib
from collections.abc import Generator

import uvicorn


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves SIGINT and SIGTERM alone: the process that embeds it (the
    CLI, or a test off the main thread) owns the signals and stops the server itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None]:
        yield
