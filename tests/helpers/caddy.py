"""Debian's Caddy in a temporary directory (admin API off, plain HTTP on 127.0.0.1), in front of
the demo backends, importing the shipped forward-auth snippet (deploy/caddy/Caddyfile), as a
non-daemon process the test stops (gateway/app/edges.py starts it, as ``portcullis demo --edge
caddy`` does)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from gateway.app.edges import Site, running_edge
from tests.conftest import free_port
from tests.helpers.edges import needs_edge

needs_caddy = needs_edge("caddy")


@contextlib.contextmanager
def caddy_edge(directory: Path, *, forward_auth: int, sites: Sequence[Site]) -> Iterator[int]:
    """Caddy asking the forward-auth listener on port ``forward_auth`` and proxying each site to
    its backend; its port."""
    with running_edge("caddy", directory, port=free_port(), forward_auth=forward_auth, sites=sites) as port:
        yield port
