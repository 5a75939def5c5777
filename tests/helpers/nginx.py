"""Debian's nginx in a temporary prefix, in front of the demo backends, with the shipped
forward-auth snippets (deploy/nginx/), as a non-daemon process the test stops
(gateway/app/edges.py starts it, as ``portcullis demo --edge nginx`` does)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from gateway.app.edges import Site, running_edge
from tests.conftest import free_port
from tests.helpers.edges import MAIL, needs_edge

needs_nginx = needs_edge("nginx")


@contextlib.contextmanager
def nginx_edge(directory: Path, *, forward_auth: int, backend: int) -> Iterator[int]:
    """nginx asking the forward-auth listener on port ``forward_auth`` and proxying to ``backend``; its port."""
    with running_edge("nginx", directory, port=free_port(), forward_auth=forward_auth,
                      sites=[Site(MAIL, backend)]) as port:
        yield port
