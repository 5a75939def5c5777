"""Debian's nginx in a temporary prefix, in front of the demo backends, with the shipped
forward-auth snippets (deploy/nginx/), as a non-daemon process the test stops
(gateway/app/edges.py starts it, as ``portcullis demo --edge nginx`` does)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from gateway.app.edges import EDGES, Site, running_edge
from tests.conftest import free_port
from tests.helpers.edges import MAIL, needs_edge

needs_nginx = needs_edge("nginx")
PLAIN_PASS = "proxy_pass http://portcullis_forward_auth"  # the snippet's questions and pages, over plain HTTP


@contextlib.contextmanager
def nginx_edge(directory: Path, *, forward_auth: int, backend: int, forward_auth_tls: str = "") -> Iterator[int]:
    """nginx asking the forward-auth listener on port ``forward_auth`` and proxying to ``backend``; its port.
    With ``forward_auth_tls`` (the server-level ``proxy_ssl_*`` lines), it asks over https, with the
    shipped snippet changed as docs/forward-auth.md says: each ``proxy_pass https://`` instead of ``http://``."""
    snippets = None
    if forward_auth_tls:
        shipped = EDGES["nginx"].snippet_directory()
        forward_auth_conf = (shipped / "portcullis-forward-auth.conf").read_text()
        assert forward_auth_conf.count(PLAIN_PASS) == 4  # the question, the held refusal, the browser's pages, RFC 9728
        snippets = directory / "snippets"
        snippets.mkdir(parents=True)
        (snippets / "portcullis-forward-auth.conf").write_text(
            forward_auth_conf.replace(PLAIN_PASS, PLAIN_PASS.replace("http://", "https://")))
        shutil.copy(shipped / "portcullis-protect.conf", snippets)
    with running_edge("nginx", directory, port=free_port(), forward_auth=forward_auth, sites=[Site(MAIL, backend)],
                      snippets=snippets, lines=forward_auth_tls) as port:
        yield port
