"""``portcullis run --workers N``: N gateway processes on the same listeners, supervised.

One mitmproxy process uses one core. Each worker binds the gateway's ports with SO_REUSEPORT and
the kernel spreads connections across them. The supervisor (this module; it never imports
mitmproxy) starts the workers, restarts one that exits (with a growing pause if it keeps
crashing at start), forwards SIGHUP (reload), and on SIGTERM or SIGINT asks every worker to
drain: stop accepting, finish the requests in flight, then exit.

What the workers share: the device inventory (SQLite on one host, or Redis), browser sessions
and MTD webhook nonces (SQLite in the state directory, or Redis). What each has of its own: its
token and device caches, its JWKS copy, its admin listener (``admin.listen`` port + index) and its
decision and admin audit logs (``<name>.worker<i><suffix>`` for worker i > 0).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

logger = logging.getLogger(__name__)

RESTART_PAUSES = (0.5, 1, 2, 5, 10, 30)  # seconds before restarting a worker that keeps dying young
HEALTHY_AFTER = 30.0  # a worker up this long resets its restart pause


@dataclass(frozen=True, slots=True)
class Worker:
    """Which of a gateway's processes this is. Worker 0 does the once-per-gateway jobs (the
    Graph sync); files a process appends to carry its index so no two processes share one."""

    index: int = 0
    count: int = 1

    @property
    def primary(self) -> bool:
        return self.index == 0

    @property
    def shares_listeners(self) -> bool:
        return self.count > 1

    def own_file(self, path: Path) -> Path:
        return path if self.index == 0 else path.with_name(f"{path.stem}.worker{self.index}{path.suffix}")

    def own_port(self, port: int) -> int:
        return port + self.index if port else 0


ONLY_WORKER = Worker()  # a gateway of one process
RELOAD_SIGNALS = {signal.SIGHUP}


def hold_reloads() -> None:
    """From here until ``release_reloads``, a SIGHUP waits in the kernel instead of killing the
    process (its default action) before a handler is in place: a reload asked for while the gateway
    starts is done once it can reload. Threads and processes started meanwhile inherit the block,
    so the signal is delivered to this (the main) thread once it is released."""
    signal.pthread_sigmask(signal.SIG_BLOCK, RELOAD_SIGNALS)


def release_reloads() -> None:
    """Call once the SIGHUP handler is installed: one that came meanwhile is handled now."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, RELOAD_SIGNALS)


@contextlib.contextmanager
def reloads_held() -> Iterator[None]:
    """``hold_reloads`` for a block, then the mask as it was (a worker started here inherits the
    block, so a SIGHUP forwarded while it starts waits for its handler)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, RELOAD_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@dataclass(slots=True)
class _Child:
    index: int
    process: subprocess.Popen[bytes]
    started: float
    crashes: int = 0


@dataclass(slots=True)
class Supervisor:
    """Runs ``command + [--worker-index, i]`` for each worker until told to stop."""

    command: list[str]
    count: int
    drain_seconds: float
    children: dict[int, _Child] = field(default_factory=dict)
    stopping: bool = False
    _pending: dict[int, tuple[float, int]] = field(default_factory=dict)  # index -> (restart at, crashes)

    def run(self) -> int:
        """Blocks until SIGTERM/SIGINT; returns the exit code. A SIGHUP held since start
        (``hold_reloads``) is forwarded once every worker is started."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            for index in range(self.count):
                self._start(index, crashes=0, restarted=False)
            logger.info("supervisor %d: %d workers started", os.getpid(), self.count)
            release_reloads()
            while not self.stopping:
                self._reap()
                self._restart_due()
                time.sleep(0.1)
            return self._drain()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, number: int, _frame: FrameType | None) -> None:
        if number == signal.SIGHUP:
            for child in self.children.values():
                child.process.send_signal(signal.SIGHUP)
            logger.info("SIGHUP sent to every worker: each reloads its config")
            return
        if not self.stopping:
            logger.info("%s: draining %d workers (up to %.0f s)", signal.Signals(number).name, len(self.children),
                        self.drain_seconds)
        self.stopping = True

    def _start(self, index: int, crashes: int, restarted: bool = True) -> None:
        """A restarted worker checks that the config on disk is the one the others run."""
        extra = ["--restarted"] if restarted else []
        with reloads_held():  # the worker holds a SIGHUP forwarded while it starts, and this one waits for the entry
            process = subprocess.Popen([*self.command, "--worker-index", str(index), *extra])  # noqa: S603  (our own)
            self.children[index] = _Child(index, process, time.monotonic(), crashes)
        logger.info("worker %d started (pid %d)", index, process.pid)

    def _reap(self) -> None:
        for index, child in list(self.children.items()):
            code = child.process.poll()
            if code is None:
                continue
            del self.children[index]
            lived = time.monotonic() - child.started
            crashes = 0 if lived >= HEALTHY_AFTER else child.crashes + 1
            pause = RESTART_PAUSES[min(crashes - 1, len(RESTART_PAUSES) - 1)] if crashes else 0.0
            logger.warning("worker %d (pid %d) exited with %s after %.1f s; restarting it in %.1f s", index,
                           child.process.pid, _exit_reason(code), lived, pause)
            self._pending[index] = (time.monotonic() + pause, crashes)

    def _restart_due(self) -> None:
        now = time.monotonic()
        for index, (at, crashes) in list(self._pending.items()):
            if at <= now:
                del self._pending[index]
                self._start(index, crashes)

    def _drain(self) -> int:
        """Every worker gets SIGTERM (it stops accepting and finishes what is in flight); one still
        running after the drain time and a margin is killed."""
        for child in self.children.values():
            child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.drain_seconds + 5
        killed = 0
        for child in self.children.values():
            try:
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.error("worker %d (pid %d) did not stop in time; killed", child.index, child.process.pid)
                child.process.kill()
                child.process.wait()
                killed += 1
        logger.info("all workers stopped")
        return 1 if killed else 0


def _exit_reason(code: int) -> str:
    if code >= 0:
        return f"code {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:  # a real-time signal has no name
        return f"signal {-code}"


def worker_command(config_dir: Path, count: int, drain_seconds: float, debug: bool) -> list[str]:
    """The command line of one worker (the supervisor appends ``--worker-index i``)."""
    command = [sys.executable, "-m", "gateway"]
    if debug:
        command.append("--debug")
    return [*command, "run", "--config", str(config_dir), "--workers", str(count),
            "--drain-seconds", str(drain_seconds)]
