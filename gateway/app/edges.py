"""The edge proxies ``portcullis demo --edge`` starts in front of the demo backends, each asking the
forward-auth listener about every request: Debian's nginx or Caddy, a child process in a directory
of its own, with a config that includes the shipped snippets (deploy/nginx/, deploy/caddy/)
unchanged. The tests start them the same way, so what they test is what the demo shows."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from gateway.config import Config
from gateway.config.models import ForwardAuthListen, ForwardAuthSettings

if TYPE_CHECKING:
    from gateway.web.demo_idp import DemoIdentityProvider

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"  # beside the package in a checkout
START_SECONDS = 10
LOG_TAIL = 2000  # characters of a child's log quoted when it fails to start


@dataclass(frozen=True, slots=True)
class Site:
    """One protected host the edge serves, and its upstream's port on 127.0.0.1."""

    host: str
    backend: int


@dataclass(frozen=True, slots=True)
class Edge:
    """How to run one edge: its binary, its snippets, its config and command line."""

    name: str
    package: str  # Debian's, named when the binary is missing
    candidates: tuple[str, ...]  # where the binary may be when it is not on PATH
    snippets: str  # the directory under deploy/
    write_config: Callable[[Path, int, int, Sequence[Site], Path, str], Path]
    command: Callable[[str, Path, Path], list[str]]

    def find(self) -> str | None:
        """The edge's executable on PATH or where Debian puts it, or None."""
        return shutil.which(self.name) or next((c for c in self.candidates if Path(c).is_file()), None)

    def binary(self) -> str:
        """The edge's executable, or a clear error naming the package that provides it."""
        found = self.find()
        if found is None:
            raise RuntimeError(f"{self.name} is not installed: apt-get install {self.package}")
        return found

    def snippet_directory(self) -> Path:
        directory = DEPLOY / self.snippets
        if not directory.is_dir():
            raise RuntimeError(f"the shipped {self.name} snippets are not at {directory} (run from a checkout)")
        return directory


NGINX_CONF = """
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
{servers}}}
"""
NGINX_SERVER = """    server {{
        listen 127.0.0.1:{port};
        server_name {host};
{lines}        include {snippets}/portcullis-forward-auth.conf;
        location / {{
            include {snippets}/portcullis-protect.conf;
            proxy_pass http://127.0.0.1:{backend};
        }}
    }}
"""


def write_nginx_config(directory: Path, port: int, forward_auth: int, sites: Sequence[Site], snippets: Path,
                       lines: str) -> Path:
    """nginx.conf: one server per site on ``port``, each with ``lines`` and including the snippets."""
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""  # workers read the prefix
    indented = "".join(f"        {line}\n" for line in lines.splitlines())
    servers = "".join(NGINX_SERVER.format(port=port, host=site.host, lines=indented, snippets=snippets,
                                          backend=site.backend) for site in sites)
    path = directory / "nginx.conf"
    path.write_text(NGINX_CONF.format(user=user, prefix=directory, forward_auth=forward_auth, servers=servers))
    return path


CADDYFILE = """{{
\tadmin off
\tauto_https off
\tstorage file_system {directory}/data
}}
import {snippets}/Caddyfile
{sites}"""
CADDY_SITE = """http://{host}:{port} {{
\tbind 127.0.0.1
{lines}\timport portcullis 127.0.0.1:{forward_auth}
\treverse_proxy 127.0.0.1:{backend}
}}
"""


def write_caddyfile(directory: Path, port: int, forward_auth: int, sites: Sequence[Site], snippets: Path,
                    lines: str) -> Path:
    """A Caddyfile: one plain-HTTP site per host on ``port``, each with ``lines`` and importing the snippet."""
    indented = "".join(f"\t{line}\n" for line in lines.splitlines())
    text = CADDYFILE.format(directory=directory, snippets=snippets, sites="".join(
        CADDY_SITE.format(host=site.host, port=port, lines=indented, forward_auth=forward_auth, backend=site.backend)
        for site in sites))
    path = directory / "Caddyfile"
    path.write_text(text)
    return path


EDGES: Mapping[str, Edge] = {
    "nginx": Edge("nginx", "nginx", ("/usr/sbin/nginx",), "nginx", write_nginx_config,
                  lambda binary, directory, config: [binary, "-p", str(directory), "-c", str(config)]),
    "caddy": Edge("caddy", "caddy", ("/usr/bin/caddy",), "caddy", write_caddyfile,
                  lambda binary, directory, config: [binary, "run", "--adapter", "caddyfile", "--config", str(config)]),
}


@contextlib.contextmanager
def child_process(command: list[str], *, port: int, log: Path, name: str,
                  env: Mapping[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """``command`` as a child process (its output in ``log``) while the context lasts, once it
    listens on 127.0.0.1:``port``; terminated (killed if it lingers) on the way out."""
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,  # noqa: S603  (our own command)
                                   stdin=subprocess.DEVNULL, env=dict(env) if env is not None else None)
    try:
        _wait_listening(process, port, log, name)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(START_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(START_SECONDS)


def _wait_listening(process: subprocess.Popen[bytes], port: int, log: Path, name: str) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited ({process.returncode}): {_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{name} is not listening on 127.0.0.1:{port} after {START_SECONDS} s: {_tail(log)}")


def check_port_free(name: str, port: int) -> None:
    """A port another program listens on is said clearly (waiting for the edge to listen there would
    find the other program, and the edge's own failure to bind would go unseen)."""
    try:
        socket.create_server(("127.0.0.1", port)).close()
    except OSError as error:
        raise RuntimeError(f"{name} cannot listen on 127.0.0.1:{port}: {os.strerror(error.errno or 0)}") from error


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-LOG_TAIL:] if log.is_file() else ""


@contextlib.contextmanager
def running_edge(name: str, directory: Path, *, port: int, forward_auth: int, sites: Sequence[Site],
                 snippets: Path | None = None, lines: str = "") -> Iterator[int]:
    """The edge ``name`` on 127.0.0.1:``port``, asking the forward-auth listener on
    127.0.0.1:``forward_auth`` and proxying each site to its backend; its config, logs and state
    in ``directory``. Yields the port. ``snippets``: a directory of changed snippets instead of
    the shipped ones; ``lines``: more directives in each site (both for tests, e.g. TLS to Portcullis)."""
    edge = EDGES[name]
    binary = edge.binary()
    check_port_free(name, port)
    directory.mkdir(parents=True, exist_ok=True)
    config = edge.write_config(directory, port, forward_auth, sites, snippets or edge.snippet_directory(), lines)
    # Caddy keeps its state under $HOME / $XDG_*: here, in the edge's own directory
    env = {**os.environ, "HOME": str(directory), "XDG_DATA_HOME": str(directory / "data"),
           "XDG_CONFIG_HOME": str(directory / "config")}
    with child_process(edge.command(binary, directory, config), port=port, log=directory / "out.log",
                       name=name, env=env):
        yield port



def with_forward_auth(config: Config) -> Config:
    """The config with a forward-auth listener for the edge: its own section if it has one, else
    one on a free loopback port trusting loopback (the edge runs beside the demo)."""
    if config.gateway_file.forward_auth is not None:
        return config
    added = ForwardAuthSettings(listen=ForwardAuthListen(host="127.0.0.1", port=0))
    return replace(config, gateway_file=config.gateway_file.model_copy(update={"forward_auth": added}))


def check_plain_forward_auth(config: Config) -> None:
    """The demo's edge asks over plain HTTP: a ``forwardAuth.tls`` section would refuse it."""
    section = config.gateway_file.forward_auth
    if section is not None and section.tls is not None:
        raise ValueError("demo --edge asks the forward-auth listener over plain HTTP: use a config without "
                         "forwardAuth.tls (docs/forward-auth.md shows an edge asking over TLS)")


def demo_sites(config: Config) -> list[Site]:
    """Each protected host, in front of its demo backend (on 127.0.0.1, as the demo serves it)."""
    sites = []
    for host, protected in config.gateway_file.protected_hosts.items():
        upstream = urlsplit(protected.upstream)
        sites.append(Site(host, upstream.port or 80))
    return sites


def edge_banner(name: str, port: int, idp: DemoIdentityProvider, sites: Sequence[Site]) -> str:
    """What to try through the edge: its URLs, and the demo's requests in plain HTTP to its port."""
    from gateway.app.demo import SCENARIOS, curl_command, expectation, scenario_token  # the demo's web parts

    hosts = ", ".join(f"http://{site.host}:{port}" for site in sites)
    lines = [f"# {name} is up in front of the demo backends: {hosts} (on 127.0.0.1), asking Portcullis "
             "about every request (forward auth, with the shipped snippets in deploy/).", ""]
    for number, scenario in enumerate(SCENARIOS, start=1):
        lines += [f"# {name} {number}. {scenario.title}", f"#    {expectation(scenario)}",
                  curl_command(scenario, scenario_token(idp, scenario), port=port, ca_file=None), ""]
    lines += [f"# Ctrl-C stops the demo and {name}."]
    return "\n".join(lines)
