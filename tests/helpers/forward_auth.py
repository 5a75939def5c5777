"""A test gateway with a forward-auth listener, forwarding to the session's demo backends, and
signing its assertions with the session gateway's key (so the demo backends verify them)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from ruamel.yaml import YAML

from gateway.app import bootstrap
from gateway.identity.assertion import assertion_key_path
from tests.conftest import Gateway, Ports, free_port, gateway_config
from tests.helpers.running import Started, started

OUTSIDER = "127.0.0.2"  # a loopback address that is not one of the edge's: a client calling the endpoint directly


def forward_auth_config(gateway: Gateway, directory: Path, demo_ports: Ports,
                        hosts: list[str] | None = None) -> Path:
    """The demo config with a ``forwardAuth`` section trusting 127.0.0.1 only."""
    config_dir = gateway_config(directory, gateway.ca, Ports(free_port(), demo_ports.idp, demo_ports.mail,
                                                             demo_ports.docs))
    yaml = YAML()
    path = config_dir / "portcullis.yaml"
    data = yaml.load(path)
    data["forwardAuth"] = {"listen": {"host": "127.0.0.1", "port": free_port()}, "trustedProxies": ["127.0.0.1/32"],
                           **({"hosts": hosts} if hosts is not None else {})}
    session_key = assertion_key_path(bootstrap.load(gateway.config_dir).config)
    assert session_key.is_file()
    data["upstreamAssertion"] = {"keyFile": str(session_key)}
    yaml.dump(data, path)
    return config_dir


@pytest.fixture(scope="module")
def portcullis(gateway: Gateway, demo_ports: Ports, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Started]:
    """The edges' tests' gateway with a forward-auth listener, one per test module (import it there)."""
    with forward_auth_gateway(gateway, tmp_path_factory.mktemp("forward-auth"), demo_ports) as running:
        yield running


@contextlib.contextmanager
def forward_auth_gateway(gateway: Gateway, directory: Path, demo_ports: Ports,
                         hosts: list[str] | None = None) -> Iterator[Started]:
    with started(gateway, forward_auth_config(gateway, directory, demo_ports, hosts)) as running:
        assert running.running.forward_auth is not None
        yield running


def endpoint(running: Started) -> str:
    assert running.running.forward_auth is not None
    host, port = running.running.forward_auth
    return f"http://{host}:{port}"


def ask(running: Started, headers: dict[str, str], *, source: str = "127.0.0.1", method: str = "GET",
        path: str = "/") -> httpx.Response:
    """One forward-auth question, as an edge asks it (from ``source``; Envoy's keeps the original
    method and puts the original target in the path)."""
    with httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=10) as client:
        return client.request(method, f"{endpoint(running)}{path}", headers=headers)
