"""A real redis-server for tests: on a free 127.0.0.1 port (and a Unix socket) in a temporary
directory, persisting nothing. ``stop()`` kills it as a crash would; ``start()`` brings it back
on the same port, empty; ``pause()`` freezes it (SIGSTOP: connections stay open, nothing answers)
until ``resume()``."""

from __future__ import annotations

import atexit
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
START_TIMEOUT = 10.0


def _ephemeral_ports() -> range:
    try:
        low, high = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


EPHEMERAL = _ephemeral_ports()
_handed_out: set[int] = set()


def _worker_ports() -> range:
    """This test process's share of the ports below the ephemeral range: under pytest-xdist each
    worker picks from its own slice, so two workers never hand out the same port."""
    low, high = 10_000, EPHEMERAL.start
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(worker) if worker.isdigit() else 0
    size = (high - low) // max(1, count)
    return range(low + index * size, low + (index + 1) * size)


WORKER_PORTS = _worker_ports()


def free_port() -> int:
    """A port free now, for a listener a test starts a little later. Taken below the kernel's
    ephemeral range: there, the outgoing connections of a busy suite are given local ports and can
    take the port before the listener binds it (EADDRINUSE). From this worker's slice only."""
    for _ in range(200):
        port = random.randrange(WORKER_PORTS.start, WORKER_PORTS.stop)  # noqa: S311  (a port, not a secret)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as sock:  # the low range is crowded: any free port will do
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def started_or_skipped() -> RedisServer:
    """A started server for a fixture; skips the test without redis-server, unless CI requires it."""
    import os

    import pytest

    if not Path(REDIS_SERVER).exists():
        if os.environ.get("PORTCULLIS_REQUIRE_REDIS") == "1":
            pytest.fail(f"PORTCULLIS_REQUIRE_REDIS=1 but {REDIS_SERVER} is missing (apt-get install redis-server)")
        pytest.skip(f"{REDIS_SERVER} is missing (apt-get install redis-server); the Redis cases are skipped")
    return RedisServer().start()


class RedisServer:
    def __init__(self, executable: str = REDIS_SERVER) -> None:
        self.executable = executable
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="portcullis-redis-"))
        self.socket_path = self.directory / "redis.sock"
        self._process: subprocess.Popen[bytes] | None = None
        atexit.register(self.close)  # a test run that dies early leaves no server behind

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket_path}?db=0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> RedisServer:
        if self.running:
            return self
        self._process = subprocess.Popen(
            [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--unixsocket", str(self.socket_path), "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--loglevel", "warning", "--logfile", str(self.directory / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while not self._answers_ping():
            if self._process.poll() is not None or time.monotonic() > deadline:
                log = (self.directory / "redis.log").read_text(errors="replace") if \
                    (self.directory / "redis.log").exists() else ""
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}: {log[-2000:]}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """SIGKILL: the server vanishes as in a crash; the kernel closes its clients' connections."""
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=10)
            self._process = None

    def pause(self) -> None:
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGCONT)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False
