"""Debian's nginx in a temporary prefix, in front of the demo backends, with the shipped
forward-auth snippets (deploy/nginx/), as a non-daemon process the test stops."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
# CI installs nginx and sets PORTCULLIS_REQUIRE_NGINX: there a missing nginx fails the tests instead of hiding them
needs_nginx = pytest.mark.skipif(not Path(NGINX).is_file() and not os.environ.get("PORTCULLIS_REQUIRE_NGINX"),
                                 reason="nginx is not installed (apt-get install nginx)")
SNIPPETS = REPO / "deploy" / "nginx"
START_SECONDS = 10
PLAIN_PASS = "proxy_pass http://portcullis_forward_auth"  # the snippet's questions and pages, over plain HTTP

CONF = """
{user}
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream portcullis_forward_auth {{
        server 127.0.0.1:{forward_auth};
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        server_name mail.contoso.test;
        {forward_auth_tls}
        include {forward_auth_snippet};
        location / {{
            include {snippets}/portcullis-protect.conf;
            proxy_pass http://127.0.0.1:{backend};
        }}
    }}
}}
"""


@contextlib.contextmanager
def nginx_edge(directory: Path, *, forward_auth: int, backend: int, forward_auth_tls: str = "") -> Iterator[int]:
    """nginx asking the forward-auth listener on port ``forward_auth`` and proxying to ``backend``; its port.
    With ``forward_auth_tls`` (the server-level ``proxy_ssl_*`` lines), it asks over https, with the
    shipped snippet changed as docs/forward-auth.md says: each ``proxy_pass https://`` instead of ``http://``."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""  # workers read the prefix
    snippet = SNIPPETS / "portcullis-forward-auth.conf"
    if forward_auth_tls:
        shipped = snippet.read_text()
        assert shipped.count(PLAIN_PASS) == 4  # the question, the held refusal, the browser's pages, RFC 9728
        snippet = directory / snippet.name
        snippet.write_text(shipped.replace(PLAIN_PASS, PLAIN_PASS.replace("http://", "https://")))
    (directory / "nginx.conf").write_text(CONF.format(user=user, prefix=directory, forward_auth=forward_auth,
                                                      port=port, snippets=SNIPPETS, backend=backend,
                                                      forward_auth_snippet=snippet, forward_auth_tls=forward_auth_tls))
    with (directory / "out.log").open("wb") as log:
        process = subprocess.Popen([NGINX, "-p", str(directory), "-c", str(directory / "nginx.conf")],
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_listening(process, port, directory)
        yield port
    finally:
        process.terminate()
        process.wait(START_SECONDS)


def _wait_listening(process: subprocess.Popen[bytes], port: int, directory: Path) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited: {(directory / 'error.log').read_text(errors='replace')}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nginx is not listening on {port}")
