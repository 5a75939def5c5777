"""Throughput, latency and CPU per request of Portcullis next to a stock mitmdump and nginx.

All side by side in one run on 127.0.0.1, loaded by wrk. Run by hand, not in CI (it needs nginx and wrk;
Caddy for the caddy-fa row):

    apt-get install nginx wrk caddy
    .venv/bin/python bench/throughput.py [--duration 10] [--quick] [--only ROWS] [--profile] [--repeat N]

bench/README.md explains every row and column, what makes a row invalid, and the last results.

Targets (``--only`` takes their keys, comma-separated):
    direct         the nginx backend itself (plain http): a small static 200
    mitmdump       stock ``mitmdump -q --mode reverse:...`` with TLS, in front of the backend
    portcullis     ``portcullis run`` (one worker): token, device, policy, decision log, assertion
    portcullis-2w  ``portcullis run --workers 2`` (reported as unavailable where the option is missing)
    nginx          nginx (one worker) as a TLS reverse proxy: the ceiling of one proxy hop
    nginx-fa       nginx (TLS, one worker) with the shipped deploy/nginx/ snippets asking Portcullis's
                   forward-auth listener about every request, then proxying to the backend
    caddy-fa       Caddy (TLS) with forward_auth to the same listener (unavailable without caddy)
    cold           a fresh Portcullis per worker count; every request a new token and a new device

Every target gets the same request (Host, path, headers; see throughput_support/load.lua) under four
loads: keep-alive and ``Connection: close``, at 1 connection (``-t1 -c1``) and 32 (``-t2 -c32``).
The Portcullis and forward-auth rows carry a valid RS256 token for a compliant device among 100,000 in the SQLite
inventory; nginx serves the issuer's discovery document and JWKS as static files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import httpx
import jwt
import trustme
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gateway.signals.devices import DeviceRecord  # noqa: E402
from gateway.signals.sqlite_store import SqliteDeviceStore  # noqa: E402

SUPPORT = Path(__file__).resolve().parent / "throughput_support"
VENV_BIN = REPO / ".venv" / "bin"
HOST = "mail.contoso.test"
PATH = "/Microsoft-Server-ActiveSync"
TENANT = "contoso"
TENANT_ID = "c0a7e1d5-0000-4000-8000-00000000c0de"
AUDIENCE = "00000002-0000-0ff1-ce00-000000000000"  # Exchange Online
OUTLOOK = "27922004-5251-4030-b22d-91ecd9a37ea4"  # Outlook mobile's client id
KID = "bench-signing-key"
TOKEN_LIFETIME = 6 * 3600  # outlives any run: an expired token mid-run would turn rows into 401s
START_TIMEOUT = 60.0
PROFILE_RATE = 250  # py-spy samples per second
NOISY_CORES = 0.25  # other processes used more than this during a run: its numbers are suspect
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CADDY_SNIPPET = Path(__file__).resolve().parents[1] / "deploy" / "caddy" / "Caddyfile"  # imported as shipped
TARGETS = ("direct", "mitmdump", "portcullis", "portcullis-2w", "nginx", "nginx-fa", "caddy-fa", "cold")
FORWARD_AUTH_TARGETS = ("nginx-fa", "caddy-fa")
SNIPPETS = REPO / "deploy" / "nginx"  # the shipped nginx snippets, included as they are
ENTRY_POINTS = ("/gateway/cli.py", "/gateway/__main__.py")  # on every stack of the main thread: not a hot spot
NOT_OURS = ("mitmproxy", "TLS (pyOpenSSL, ssl)", "HTTP/1 parsing (h11, http1)", "ASGI (uvicorn, starlette)", "asyncio",
            "logging")


class BenchError(Exception):
    """A setup step failed: the run stops (after stopping every server) with this message."""


# ---------------------------------------------------------------------------------------------
# Machine


def machine_lines() -> list[str]:
    """What a reader needs to compare numbers across machines: CPU, cores and every tool's version."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    import mitmproxy.version

    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()  # noqa: S607  (from PATH)
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()[0]  # noqa: S607
    caddy = shutil.which("caddy")
    caddy_version = subprocess.run([caddy, "version"], capture_output=True,  # noqa: S603  (from PATH)
                                   text=True).stdout.split(" ")[0].strip() if caddy else "none"
    return [f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {code_version()}",
            f"cpu: {cpu}, {os.cpu_count()} cores; kernel {os.uname().release}",
            f"python {sys.version.split()[0]}, mitmproxy {mitmproxy.version.VERSION}, "
            f"{nginx.removeprefix('nginx version: ')}, {wrk.split(' Copyright')[0]}, caddy {caddy_version}"]


def code_version() -> str:
    """The commit measured, and whether the gateway's code differs from it (uncommitted work)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True,  # noqa: S603, S607
                              text=True).stdout.strip()

    changed = git("status", "--porcelain", "--", "gateway", "addons").splitlines()
    return f"commit {git('rev-parse', '--short', 'HEAD') or 'unknown'}" + (
        f" + {len(changed)} uncommitted files in gateway/ and addons/" if changed else "")


# ---------------------------------------------------------------------------------------------
# Fixtures: certificates, the issuer's key and static files, devices, tokens


@dataclass(frozen=True)
class Certificates:
    ca: trustme.CA
    combined: Path  # chain then key: what mitmproxy and Portcullis read
    chain: Path  # nginx reads the chain and the key from two files
    key: Path


def make_certificates(directory: Path) -> Certificates:
    """One trustme CA and a server certificate for HOST, used by every TLS target alike."""
    directory.mkdir(parents=True)
    ca = trustme.CA()
    server = ca.issue_cert(HOST)
    chain = b"".join(blob.bytes() for blob in server.cert_chain_pems)
    paths = Certificates(ca, directory / "server.pem", directory / "chain.pem", directory / "key.pem")
    paths.combined.write_bytes(chain + server.private_key_pem.bytes())
    paths.chain.write_bytes(chain)
    paths.key.write_bytes(server.private_key_pem.bytes())
    return paths


def issuer_url(backend_port: int) -> str:
    return f"http://127.0.0.1:{backend_port}/{TENANT}"


def write_issuer_files(root: Path, issuer: str, key: rsa.RSAPrivateKey) -> None:
    """The discovery document and JWKS the gateway fetches at start, as static files nginx serves."""
    well_known = root / TENANT / ".well-known"
    well_known.mkdir(parents=True)
    (root / TENANT / "discovery").mkdir()
    discovery = {"issuer": issuer, "jwks_uri": f"{issuer}/discovery/keys",
                 "id_token_signing_alg_values_supported": ["RS256"]}
    (well_known / "openid-configuration").write_text(json.dumps(discovery))
    public = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    (root / TENANT / "discovery" / "keys").write_text(
        json.dumps({"keys": [{**public, "kid": KID, "use": "sig", "alg": "RS256"}]}))


def device_id(index: int) -> str:
    return f"b0000000-0000-4000-8000-{index:012d}"


def write_devices(database: Path, count: int) -> None:
    """``count`` compliant, low-risk iPhones, synced now (Intune's 30-day validity holds)."""
    now = datetime.now(UTC)
    synced = now.isoformat().replace("+00:00", "Z")
    records = (DeviceRecord.model_validate_json(json.dumps({
        "azureADDeviceId": device_id(i), "deviceName": f"iPhone {i}", "userPrincipalName": f"user{i}@contoso.test",
        "operatingSystem": "iOS", "complianceState": "compliant", "lastSyncDateTime": synced,
        "threatLevel": "low", "threatSource": "bench-mtd"}), strict=True) for i in range(count))
    store = SqliteDeviceStore(database)
    try:
        store.replace_all(records, now=now)
    finally:
        store.close()


def mint_token(key: rsa.RSAPrivateKey, issuer: str, index: int) -> str:
    """An Entra v2-shaped access token for user ``index`` on device ``index``, from Outlook mobile."""
    now = int(time.time())
    user = f"user{index}@contoso.test"
    claims = {"iss": issuer, "aud": AUDIENCE, "iat": now, "nbf": now, "exp": now + TOKEN_LIFETIME,
              "sub": str(uuid.uuid5(uuid.NAMESPACE_URL, f"sub:{user}")),
              "oid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"oid:{user}")), "tid": TENANT_ID, "upn": user,
              "preferred_username": user, "azp": OUTLOOK, "ver": "2.0", "scp": "Mail.ReadWrite", "amr": ["pwd"],
              "deviceid": device_id(index)}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": KID})


# ---------------------------------------------------------------------------------------------
# Processes: start side by side, measure from /proc, always stop


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (which may hold spaces and parentheses)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def process_tree(root: int) -> list[int]:
    """The root and all its descendants: nginx's workers, a supervisor's worker processes."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, queue = [], [root]
    while queue:
        pid = queue.pop()
        tree.append(pid)
        queue.extend(children.get(pid, []))
    return tree


def cpu_seconds(pids: Sequence[int]) -> dict[int, float]:
    """utime + stime of each process (all its threads: the decision log's writer thread included)."""
    times = {}
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            times[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return times


def memory_kib(pid: int) -> dict[str, int]:
    """VmHWM (peak resident set) and VmRSS of one process, in KiB."""
    values = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmHWM", "VmRSS"):
                values[name] = int(value.split()[0])
    return values


@dataclass
class Server:
    """A server started in its own session (so Ctrl-C reaches only this script, which stops it)."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def pids(self) -> list[int]:
        return process_tree(self.pid)

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        """SIGTERM to the whole process group, SIGKILL to whatever of the tree is left after 10 s."""
        tree = self.pids()
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.process.wait(5)
        for pid in tree[1:]:  # a worker that left the group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def start(stack: contextlib.ExitStack, name: str, argv: list[str], log: Path, cwd: Path,
          env: dict[str, str] | None = None) -> Server:
    """Start ``argv`` and register its stop with ``stack`` before anything else can fail."""
    with log.open("wb") as output:
        process = subprocess.Popen(  # noqa: S603  (our own fixed commands)
            argv, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    server = Server(name, process, log)
    stack.callback(server.stop)
    return server


def wait_listening(server: Server, port: int, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise BenchError(f"{server.name} exited with {server.process.returncode}:\n{server.log_tail()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise BenchError(f"{server.name} is not listening on 127.0.0.1:{port} after {timeout:.0f} s:\n"
                     f"{server.log_tail()}")


def listening_sockets(port: int) -> int:
    """Listening sockets on ``port``: with SO_REUSEPORT each worker has its own."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                count += fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port
    return count


def wait_for_workers(server: Server, port: int, workers: int, timeout: float = START_TIMEOUT) -> None:
    """The port answers as soon as one worker listens; a measurement wants all of them."""
    deadline = time.monotonic() + timeout
    while listening_sockets(port) < workers:
        if time.monotonic() > deadline or server.process.poll() is not None:
            raise BenchError(f"{server.name}: {listening_sockets(port)} of {workers} workers listen on {port}:\n"
                             f"{server.log_tail()}")
        time.sleep(0.1)


def fill_template(template: str, values: dict[str, object]) -> str:
    text = (SUPPORT / template).read_text()
    for name, value in values.items():
        text = text.replace(f"@{name}@", str(value))
    if leftover := re.findall(r"@[A-Z_]+@", text):
        raise BenchError(f"{template}: no value for {', '.join(sorted(set(leftover)))}")
    return text


def start_nginx(stack: contextlib.ExitStack, name: str, template: str, directory: Path,
                values: dict[str, object]) -> Server:
    directory.mkdir(parents=True)
    running_as_root = os.geteuid() == 0  # workers would become "nobody" and could not read the temp dir
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if running_as_root else ""
    conf = directory / "nginx.conf"
    conf.write_text(fill_template(template, {"USER": user, "DIR": directory, **values}))
    server = start(stack, name, ["nginx", "-p", str(directory), "-c", str(conf)], directory / "out.log", directory)
    wait_listening(server, int(str(values["PORT"])))
    return server


def write_portcullis_config(directory: Path, port: int, backend: int, certificates: Certificates,
                            database: Path, forward_auth: int | None = None) -> Path:
    """The generated config; with ``forward_auth`` (a port) plus a ``forwardAuth`` section."""
    config = directory / "config"
    config.mkdir(parents=True)
    values = {"PORT": port, "HOST": HOST, "CERT": certificates.combined, "STATE": directory / "state",
              "ISSUER": issuer_url(backend), "BACKEND": backend, "AUDIENCE": AUDIENCE, "CLIENT_ID": OUTLOOK,
              "DATABASE": database}
    text = fill_template("portcullis.yaml", values)
    if forward_auth is not None:
        text += fill_template("forward-auth.portcullis.yaml", {"FORWARD_AUTH": forward_auth})
    (config / "portcullis.yaml").write_text(text)
    shutil.copy(SUPPORT / "policies.yaml", config / "policies.yaml")
    return config


@dataclass(frozen=True)
class Unavailable:
    reason: str


def start_portcullis(stack: contextlib.ExitStack, name: str, directory: Path, port: int, backend: int,
                     certificates: Certificates, database: Path, workers: int,
                     forward_auth: int | None = None) -> Server | Unavailable:
    """``portcullis run`` on a generated config; with ``workers`` > 1 the option may not exist yet
    (argparse's usage error, exit 2): that row is reported as unavailable, the others still run."""
    config = write_portcullis_config(directory, port, backend, certificates, database, forward_auth)
    argv = [str(VENV_BIN / "portcullis"), "run", "--config", str(config)]
    if workers > 1:
        argv += ["--workers", str(workers)]
    server = start(stack, name, argv, directory / "portcullis.log", directory)
    try:
        wait_listening(server, port)
    except BenchError:
        log = server.log_tail(5)
        if workers > 1 and server.process.returncode == 2 and "usage:" in log:
            return Unavailable(next((line for line in log.splitlines() if "error:" in line), log))
        raise
    wait_for_workers(server, port, workers)
    if forward_auth is not None:
        wait_listening(server, forward_auth)
    return server


# ---------------------------------------------------------------------------------------------
# Forward auth: the Portcullis the edges ask, and its decision log counted around each run


@dataclass(frozen=True)
class Decider:
    """The Portcullis behind the forward-auth rows: its CPU and its decision log are read around
    each run, so the endpoint's own cost and the decisions per request are measured, not assumed."""

    server: Server
    listener: int  # the forward-auth port
    decisions: Path  # its decisionLog.path


def start_decider(stack: contextlib.ExitStack, root: Path, backend: int, fixtures: Fixtures) -> Decider:
    """One Portcullis (1 worker) on the same generated config as the Portcullis row, plus a
    ``forwardAuth`` section; both edges ask its listener."""
    listener, directory = free_port(), root / "portcullis-fa"
    server = start_portcullis(stack, "portcullis forward-auth", directory, free_port(), backend,
                              fixtures.certificates, fixtures.database, 1, forward_auth=listener)
    assert isinstance(server, Server)  # only a --workers option can be unavailable
    return Decider(server, listener, directory / "state" / "decisions.jsonl")


@dataclass(frozen=True)
class LogMark:
    """Where the decision log ended: its current file (by inode, since rotation renames it) and size."""

    inode: int
    size: int


def decision_files(path: Path) -> list[Path]:
    """The decision log and its rotated files (``decisions.jsonl.1``, ...), newest first."""
    rotated = sorted((p for p in path.parent.glob(f"{path.name}.*") if p.suffix[1:].isdigit()),
                     key=lambda p: int(p.suffix[1:]))
    return [p for p in (path, *rotated) if p.is_file()]


def mark_decision_log(path: Path) -> LogMark:
    with contextlib.suppress(FileNotFoundError):
        status = path.stat()
        return LogMark(status.st_ino, status.st_size)
    return LogMark(-1, 0)  # nothing written yet: every line counts


def _lines(handle: BinaryIO, offset: int = 0) -> int:
    handle.seek(offset)
    return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))


def decisions_since(path: Path, mark: LogMark) -> int | None:
    """Records written since ``mark``: the rest of the file it was taken on (rotated since, maybe)
    and every newer file. None when that file was rotated away (deleted) meanwhile."""
    count = 0
    for file in decision_files(path):
        try:
            with file.open("rb") as handle:
                if os.fstat(handle.fileno()).st_ino == mark.inode:
                    return count + _lines(handle, mark.size)
                count += _lines(handle)
        except FileNotFoundError:
            return None
    return count if mark.inode == -1 else None


def wait_for_decision_log(path: Path, quiet: float = 0.3, limit: float = 10.0) -> None:
    """Until the writer thread is through (it writes a batch every 50 ms): no file changed for ``quiet`` s."""
    def state() -> list[tuple[str, int]]:
        found = []
        for file in decision_files(path):
            with contextlib.suppress(FileNotFoundError):
                found.append((file.name, file.stat().st_size))
        return found

    deadline, last, since = time.monotonic() + limit, state(), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet:
        time.sleep(0.05)
        if (now := state()) != last:
            last, since = now, time.monotonic()


def start_caddy(stack: contextlib.ExitStack, directory: Path, values: dict[str, object]) -> Server | Unavailable:
    """Caddy with forward_auth (throughput_support/forward-auth.Caddyfile), its data and config
    directories in ``directory``; unavailable, not an error, where caddy is not installed."""
    caddy = shutil.which("caddy")
    if caddy is None:
        return Unavailable("caddy is not installed (apt-get install caddy)")
    directory.mkdir(parents=True)
    conf = directory / "Caddyfile"
    conf.write_text(fill_template("forward-auth.Caddyfile", {"DIR": directory, "SNIPPET": CADDY_SNIPPET, **values}))
    home = {"HOME": str(directory), "XDG_DATA_HOME": str(directory / "data"),
            "XDG_CONFIG_HOME": str(directory / "config")}
    server = start(stack, "caddy", [caddy, "run", "--config", str(conf), "--adapter", "caddyfile"],
                   directory / "out.log", directory, env=home)
    wait_listening(server, int(str(values["PORT"])))
    return server


# ---------------------------------------------------------------------------------------------
# Targets and the one-request check before loading them


@dataclass(frozen=True)
class Target:
    key: str
    label: str
    scheme: str
    port: int
    server: Server
    token: str | None = None  # a bearer token for the Portcullis and forward-auth rows
    decider: Decider | None = None  # the forward-auth rows: the Portcullis the edge asks

    @property
    def url(self) -> str:
        """The URL names the protected host; load.lua connects to 127.0.0.1 whatever it says."""
        return f"{self.scheme}://{HOST}:{self.port}{PATH}"


def check_target(target: Target, ca: trustme.CA) -> str:
    """One request as wrk will send it must answer 200: a gateway that answers 401/403/503 fast is
    not a measurement. Returns a one-line summary (status and the gateway's correlation id)."""
    headers = {"Host": HOST, "Accept": "application/json", "User-Agent": "Outlook-iOS-Android/1.0"}
    if target.token:
        headers["Authorization"] = f"Bearer {target.token}"
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with httpx.Client(verify=context, timeout=10, trust_env=False) as client:
        response = client.get(f"{target.scheme}://127.0.0.1:{target.port}{PATH}", headers=headers,
                              extensions={"sni_hostname": HOST} if target.scheme == "https" else {})
    if response.status_code != 200:
        raise BenchError(f"{target.label}: a single request answered {response.status_code}, not 200: "
                         f"{response.text[:300]}\n{target.server.log_tail()}")
    correlation = response.headers.get("x-portcullis-correlation-id")
    return f"200{f', correlation id {correlation}' if correlation else ''}"


def check_decided(target: Target, ca: trustme.CA) -> str:
    """``check_target``; behind an edge, also that this one request was decided by Portcullis (one
    decision log record), so the edge is wired to the listener and caches nothing."""
    decider = target.decider
    if decider is None:
        return check_target(target, ca)
    wait_for_decision_log(decider.decisions)
    mark = mark_decision_log(decider.decisions)
    summary = check_target(target, ca)
    wait_for_decision_log(decider.decisions)
    decisions = decisions_since(decider.decisions, mark)
    if decisions != 1:
        raise BenchError(f"{target.label}: one request made {decisions} decision log records in "
                         f"{decider.decisions}, not 1\n{decider.server.log_tail()}")
    return f"{summary}, decided by the forward-auth listener on {decider.listener} (pid {decider.server.pid})"


# ---------------------------------------------------------------------------------------------
# Load


@dataclass(frozen=True)
class Load:
    connection: str  # keep-alive | close
    threads: int
    connections: int

    @property
    def label(self) -> str:
        return f"{self.connection} c{self.connections}"


KEEP_ALIVE_1, KEEP_ALIVE_32 = Load("keep-alive", 1, 1), Load("keep-alive", 2, 32)
LOADS = (KEEP_ALIVE_1, KEEP_ALIVE_32, Load("close", 1, 1), Load("close", 2, 32))


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: dict[str, int]  # wrk's socket errors and its status count (>= 400)
    non2xx: int | None  # counted by load.lua (every status outside 2xx), when it counted
    kept_open: int  # "close" runs: responses without "Connection: close" (wrk then reuses the connection)
    cpu_seconds: float  # the server's process tree, over the run
    wrk_cores: float = 0.0  # wrk's CPU over the run, in cores
    other_cores: float = 0.0  # everything else on the machine (other tenants, tests), in cores
    connections: int = 0  # wrk's -c: requests still in flight when it stops were decided but not counted
    decider_cpu_seconds: float | None = None  # forward-auth rows: the Portcullis the edge asks, over the run
    decisions: int | None = None  # forward-auth rows: its decision log records written during the run

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_seconds / self.requests * 1e6 if self.requests else 0.0

    @property
    def decider_us_per_request(self) -> float | None:
        if self.decider_cpu_seconds is None or not self.requests:
            return None
        return self.decider_cpu_seconds / self.requests * 1e6

    @property
    def decisions_per_request(self) -> float | None:
        return self.decisions / self.requests if self.decisions is not None and self.requests else None

    def problems(self) -> list[str]:
        """Why this row is not a valid measurement (empty when it is)."""
        found = [f"{count} {name} errors" for name, count in self.errors.items() if count and name != "status"]
        bad_statuses = self.non2xx if self.non2xx is not None else self.errors.get("status", 0)
        if bad_statuses:
            found.insert(0, f"{bad_statuses} non-2xx responses")
        if self.kept_open:
            found.append(f"{self.kept_open} responses kept the connection open despite the client's "
                         "'Connection: close' (so wrk reused it: not a close run)")
        if not self.requests:
            found.append("no requests completed")
        if self.decider_cpu_seconds is not None and self.decisions is None:
            found.append("the decision log rotated its file away during the run: decisions not counted")
        elif self.decisions is not None and self.requests and not (
                self.requests <= self.decisions <= self.requests * 1.01 + self.connections):
            found.append(f"{self.decisions:,} decisions for {self.requests:,} requests: not one decision per request")
        return found


def wrk_argv(target: Target, load: Load, seconds: float, token_argument: str, count_statuses: bool,
             done_prefix: str = "-") -> list[str]:
    return ["wrk", f"-t{load.threads}", f"-c{load.connections}", f"-d{seconds:g}s", "--timeout", "5s", "--latency",
            "-s", str(SUPPORT / "load.lua"), target.url, "--", HOST, load.connection,
            "1" if count_statuses else "0", token_argument, str(load.threads), done_prefix]


def parse_wrk(output: str) -> dict[str, int]:
    line = next((line for line in output.splitlines() if line.startswith("WRK-RESULT ")), None)
    if line is None:
        raise BenchError(f"wrk printed no result:\n{output[-2000:]}")
    return dict(json.loads(line.removeprefix("WRK-RESULT ")))


def host_busy_seconds() -> float:
    """CPU seconds all cores spent busy so far (/proc/stat: everything but idle and iowait)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / CLOCK_TICKS


def children_cpu_seconds() -> float:
    """CPU of this script's finished children: wrk, once waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class CpuSnapshot:
    server: dict[int, float]
    backend: dict[int, float]
    decider: dict[int, float]
    wrk: float
    host: float

    @classmethod
    def take(cls, server: Server, backend: Server | None, decider: Decider | None = None) -> CpuSnapshot:
        return cls(cpu_seconds(server.pids()), cpu_seconds(backend.pids()) if backend else {},
                   cpu_seconds(decider.server.pids()) if decider else {}, children_cpu_seconds(), host_busy_seconds())


def _tree_delta(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(after.get(pid, before.get(pid, 0.0)) - before.get(pid, 0.0) for pid in {*before, *after})


def run_wrk(target: Target, load: Load, seconds: float, log: Path, *, tokens_file: Path | None = None,
            count_statuses: bool = False, backend: Server | None = None) -> WrkResult:
    """One wrk run. CPU is the server tree's utime+stime delta over it; wrk's own CPU and what the
    rest of the machine used meanwhile (``other``: neither server, backend nor wrk) are kept too,
    because on two cores both can decide the result. Behind an edge (``target.decider``) the
    Portcullis it asks is measured apart: its CPU, and its decision log records written meanwhile.
    With ``tokens_file`` (one pass, then stop) wrk is interrupted once every thread is done, and the
    rate is over that pass only: wrk itself would report the whole ``-d`` duration."""
    done_prefix = str(log.parent / f"pass-done-{time.monotonic_ns()}-") if tokens_file else "-"
    token_argument = f"@{tokens_file}" if tokens_file else (target.token or "-")
    argv = wrk_argv(target, load, seconds, token_argument, count_statuses or tokens_file is not None, done_prefix)
    backend = backend if backend is not None and backend is not target.server else None
    decider = target.decider
    mark = mark_decision_log(decider.decisions) if decider else None
    before = CpuSnapshot.take(target.server, backend, decider)
    started = time.monotonic()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # noqa: S603
    pass_seconds = _wait_for_pass(process, done_prefix, load.threads, seconds) if tokens_file else None
    if pass_seconds is not None:
        process.send_signal(signal.SIGINT)  # wrk stops and prints its results at once
    try:
        stdout, stderr = process.communicate(timeout=seconds + 120)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise BenchError(f"wrk did not finish within {seconds + 120:.0f} s: {' '.join(argv)}") from None
    after = CpuSnapshot.take(target.server, backend, decider)
    decider_seconds = decisions = None
    if decider is not None and mark is not None:
        wait_for_decision_log(decider.decisions)  # the records of the last requests, and the CPU writing them
        decider_seconds = _tree_delta(before.decider, cpu_seconds(decider.server.pids()))
        decisions = decisions_since(decider.decisions, mark)
    with log.open("a") as output:
        output.write(f"$ {' '.join(argv)}\n{stdout}{stderr}\n")
    values = parse_wrk(stdout)
    elapsed = pass_seconds or values["duration_us"] / 1e6
    measured = pass_seconds or time.monotonic() - started
    server = _tree_delta(before.server, after.server)
    wrk = after.wrk - before.wrk
    other = (after.host - before.host) - server - _tree_delta(before.backend, after.backend) - wrk \
        - _tree_delta(before.decider, after.decider)
    return WrkResult(
        requests=values["counted"] if pass_seconds else values["requests"], seconds=elapsed,
        p50_ms=values["p50_us"] / 1000, p99_ms=values["p99_us"] / 1000,
        errors={name: values[name] for name in ("connect", "read", "write", "timeout", "status")},
        non2xx=values["non2xx"] if values["counted"] > 0 else None,
        kept_open=values["kept_open"] if load.connection == "close" else 0,
        cpu_seconds=server, wrk_cores=wrk / measured, other_cores=max(0.0, other / measured),
        connections=load.connections, decider_cpu_seconds=decider_seconds, decisions=decisions,
    )


def wait_until_quiet(limit: float = 30.0, sample: float = 0.5) -> None:
    """Before a run: wait (up to ``limit`` seconds) for the machine to be idle, because on two cores
    anything else running (another user's tests) halves a server's share. Runs that still overlap
    with other work show it in their ``other cores`` column."""
    deadline = time.monotonic() + limit
    while True:
        before = host_busy_seconds()
        time.sleep(sample)
        if (host_busy_seconds() - before) / sample < NOISY_CORES / 2 or time.monotonic() > deadline:
            return


def _wait_for_pass(process: subprocess.Popen[str], done_prefix: str, threads: int, seconds: float) -> float | None:
    """Seconds until every wrk thread has written its done file, or None if wrk ended first."""
    started = time.monotonic()
    markers = [Path(f"{done_prefix}{index}") for index in range(threads)]
    while process.poll() is None and time.monotonic() - started < seconds:
        if all(marker.exists() for marker in markers):
            return time.monotonic() - started
        time.sleep(0.02)
    return None


@dataclass
class Row:
    target: str
    load: str
    result: WrkResult | None
    note: str = ""


def measure(targets: list[Target], backend: Server, settings: Settings, log: Path) -> list[Row]:
    """Every target under every load, one after the other, while all of them run side by side;
    with ``--repeat N`` each row is the run with the median req/s of N (the runs interleaved)."""
    rows = []
    for load in LOADS:
        runs: dict[str, list[WrkResult]] = {target.key: [] for target in targets}
        for _ in range(settings.repeat):
            for target in targets:
                wait_until_quiet()  # also lets the previous run's connections drain
                runs[target.key].append(run_wrk(target, load, settings.seconds, log, backend=backend,
                                                count_statuses=settings.count_statuses))
        for target in targets:
            results = sorted(runs[target.key], key=lambda r: r.rps)
            spread = f"{len(results)} runs: {results[0].rps:,.0f}–{results[-1].rps:,.0f} req/s" \
                if len(results) > 1 else ""
            rows.append(Row(target.label, load.label, results[len(results) // 2], spread))
            print(f"  {format_row(rows[-1])}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# Cold caches and memory


@dataclass(frozen=True)
class ColdRun:
    row: Row
    memory: list[tuple[str, dict[str, int]]]  # (role and pid, VmHWM / VmRSS)


def cold_run(target: Target, backend: Server, tokens_file: Path, token_count: int, seconds: float,
             ca: trustme.CA, log: Path) -> ColdRun:
    """A fresh gateway, then each request with a token never seen, for a device never looked up
    (one pass over ``tokens_file``: every request verifies an RS256 signature and reads SQLite).
    Peak RSS is read afterwards, with 10,000 tokens and devices cached on top of the 100,000 known."""
    check_target(target, ca)  # warms one token and one device, not among the cold ones
    wait_until_quiet()
    result = run_wrk(target, KEEP_ALIVE_32, seconds, log, tokens_file=tokens_file, backend=backend)
    note = "" if result.requests >= token_count else f"only {result.requests} of {token_count} tokens sent"
    pids = target.server.pids()
    roles = ["process"] if len(pids) == 1 else ["supervisor"] + ["worker"] * (len(pids) - 1)
    memory = [(f"{role} {pid}", memory_kib(pid)) for role, pid in zip(roles, pids, strict=True)]
    return ColdRun(Row(target.label, f"cold {KEEP_ALIVE_32.label}", result, note), memory)


# ---------------------------------------------------------------------------------------------
# Profile


FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*):(?P<line>\d+)\)$")
# Innermost frames of a thread that is blocked, not running. py-spy's own idle detection did not work
# on the VM this was written on (the decision log's idle writer thread showed as busy): such samples
# are counted apart.
WAITING = frozenset({("Condition.wait", "threading.py"), ("Event.wait", "threading.py"),
                     ("Thread._wait_for_tstate_lock", "threading.py"), ("_worker", "concurrent/futures/thread.py"),
                     ("_PollLikeSelector.select", "selectors.py"), ("EpollSelector.select", "selectors.py")})


@dataclass(frozen=True)
class Frame:
    function: str
    file: str

    @classmethod
    def parse(cls, text: str) -> Frame:
        match = FRAME.match(text)
        return cls(match["function"], match["file"]) if match else cls(text, "")

    @property
    def category(self) -> str:
        """Where a sample's own (self) time is spent, by the file of the innermost Python frame
        (C code such as OpenSSL or json's encoder counts for the Python function that called it)."""
        path = self.file
        if path.startswith((str(REPO / "gateway"), str(REPO / "addons"))):
            return "Portcullis"
        if path.endswith(("/ssl.py", "/asyncio/sslproto.py", "/mitmproxy/proxy/layers/tls.py")) or "/OpenSSL/" in path:
            return "TLS (pyOpenSSL, ssl)"
        if "/h11/" in path or "/mitmproxy/net/http/http1/" in path or path.endswith("/layers/http/_http1.py"):
            return "HTTP/1 parsing (h11, http1)"
        if "/mitmproxy/" in path:
            return "mitmproxy"
        if "/uvicorn/" in path or "/starlette/" in path:  # the forward-auth listener's server
            return "ASGI (uvicorn, starlette)"
        if "/asyncio/" in path:
            return "asyncio"
        if "/logging/" in path:
            return "logging"
        return "other"

    @property
    def module_path(self) -> str:
        """The file relative to the repository, site-packages or the standard library."""
        path = self.file.removeprefix(f"{REPO}/")
        path = re.sub(r"^.*/site-packages/", "", path)
        return re.sub(r"^.*/lib/python3\.\d+/", "", path)

    @property
    def waiting(self) -> bool:
        return (self.function, self.module_path) in WAITING

    @property
    def short(self) -> str:
        return f"{self.function} ({self.module_path})"

    @property
    def library(self) -> str:
        """The package (or stdlib module) a frame is in, for the breakdown of "other"."""
        return self.module_path.split("/", 1)[0].removesuffix(".py")


@dataclass
class Profile:
    samples: int = 0  # running samples (waiting ones are counted in ``waiting`` only)
    waiting: int = 0
    self_time: Counter[str] = field(default_factory=Counter)  # category -> samples
    charged: Counter[str] = field(default_factory=Counter)  # category with libraries charged to their caller
    other_libraries: Counter[str] = field(default_factory=Counter)
    ours_self: Counter[str] = field(default_factory=Counter)  # Portcullis function -> self samples
    ours_inclusive: Counter[str] = field(default_factory=Counter)  # Portcullis function -> samples on stack
    ours_with_libraries: Counter[str] = field(default_factory=Counter)  # library leaf called by Portcullis code
    top_self: Counter[str] = field(default_factory=Counter)  # any function -> self samples
    logging_for_ours: int = 0  # logging samples under a Portcullis frame: the decision log's file handler

    def add(self, stack: list[Frame], count: int) -> None:
        leaf = stack[-1]
        if leaf.waiting:
            self.waiting += count
            return
        self.samples += count
        self.self_time[leaf.category] += count
        self.top_self[leaf.short] += count
        owner = next((f.category for f in reversed(stack) if f.category != "other"), "other")
        self.charged[leaf.category if leaf.category != "other" else owner] += count
        if leaf.category == "other":
            self.other_libraries[leaf.library] += count
            if owner == "Portcullis":
                self.ours_with_libraries[leaf.short] += count
        if leaf.category == "Portcullis":
            self.ours_self[leaf.short] += count
        if leaf.category == "logging" and any(f.category == "Portcullis" for f in stack):
            self.logging_for_ours += count
        for name in {f.short for f in stack if f.category == "Portcullis" and not f.file.endswith(ENTRY_POINTS)}:
            self.ours_inclusive[name] += count


def parse_profile(raw: str) -> Profile:
    """py-spy's raw format: one line per distinct stack, ``outer;...;inner COUNT``."""
    profile = Profile()
    for line in raw.splitlines():
        frames, _, count = line.rpartition(" ")
        if frames and count.isdigit():
            profile.add([Frame.parse(f) for f in frames.split(";")], int(count))
    return profile


def profile_run(target: Target, seconds: float, directory: Path, log: Path,
                pid: int | None = None) -> tuple[Profile, WrkResult]:
    """py-spy samples the 1-worker gateway (or process ``pid``: the forward-auth Portcullis behind
    an edge) during a keep-alive c32 run (``--nonblocking`` so it is never paused; the run's req/s
    is lower than the table's because of sampling)."""
    output = directory / f"profile-{target.key}.txt"
    sample_seconds = max(2, int(seconds) - 2)
    argv = [str(VENV_BIN / "py-spy"), "record", "--pid", str(pid or target.server.pid),
            "--duration", str(sample_seconds), "--rate", str(PROFILE_RATE), "--nonblocking", "--full-filenames",
            "--format", "raw", "--output", str(output)]
    result: list[WrkResult] = []
    load = threading.Thread(target=lambda: result.append(run_wrk(target, KEEP_ALIVE_32, seconds, log)))
    wait_until_quiet()
    load.start()  # wrk first; sampling starts once it runs at full load
    time.sleep(1)
    spy_log = directory / f"py-spy-{target.key}.log"
    with spy_log.open("wb") as spy_output:
        spy = subprocess.run(argv, stdout=spy_output, stderr=subprocess.STDOUT,  # noqa: S603  (our own command)
                             timeout=sample_seconds + 60)
    load.join()
    if spy.returncode != 0 or not output.exists():
        raise BenchError(f"py-spy failed ({spy.returncode}): {spy_log.read_text()[-1000:]}")
    return parse_profile(output.read_text()), result[0]


# ---------------------------------------------------------------------------------------------
# Report


def remarks(row: Row) -> str:
    """Invalid (errors, non-2xx) loudly; a run disturbed by other processes; the repeat spread."""
    assert row.result is not None  # rows without a result are printed apart
    found = []
    if problems := row.result.problems():
        found.append(f"!!! INVALID: {', '.join(problems)} !!!")
    if row.result.other_cores > NOISY_CORES:
        found.append(f"noisy: other processes used {row.result.other_cores:.2f} cores")
    if row.note:
        found.append(row.note)
    return "; ".join(found)


def format_row(row: Row) -> str:
    if row.result is None:
        return f"{row.target:<28} {row.load:<20} {row.note}"
    r = row.result
    return (f"{row.target:<28} {row.load:<20} {r.rps:>9,.0f} req/s  p50 {r.p50_ms:>7.2f} ms  "
            f"p99 {r.p99_ms:>7.2f} ms  CPU {r.cpu_us_per_request:>6,.0f} µs/req  {forward_auth_text(r)}"
            f"wrk {r.wrk_cores:.2f} cores  other {r.other_cores:.2f} cores  {r.requests:>7,} requests  {remarks(row)}")


def forward_auth_text(result: WrkResult) -> str:
    """The forward-auth rows' extra: the endpoint's own CPU per request and decisions per request."""
    if result.decider_us_per_request is None:
        return ""
    per_request = result.decisions_per_request
    return (f"+ forward-auth {result.decider_us_per_request:,.0f} µs/req, "
            f"{'n/a' if per_request is None else f'{per_request:.3f}'} decisions/req  ")


def _or_blank(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown_table(rows: list[Row]) -> list[str]:
    lines = ["| target | load | req/s | p50 ms | p99 ms | CPU µs/req | forward-auth CPU µs/req | decisions/req "
             "| requests | wrk cores | other cores | remarks |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in rows:
        if row.result is None:
            lines.append(f"| {row.target} | {row.load} | | | | | | | | | | {row.note} |")
            continue
        r = row.result
        lines.append(f"| {row.target} | {row.load} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | "
                     f"{r.cpu_us_per_request:,.0f} | {_or_blank(r.decider_us_per_request, ',.0f')} | "
                     f"{_or_blank(r.decisions_per_request, '.3f')} | {r.requests:,} | {r.wrk_cores:.2f} | "
                     f"{r.other_cores:.2f} | {remarks(row)} |")
    return lines


def find(rows: list[Row], target: str, load: Load) -> WrkResult | None:
    return next((row.result for row in rows if row.target == target and row.load == load.label), None)


def ratio_lines(rows: list[Row], labels: dict[str, str]) -> list[str]:
    """The issue's targets, each marked PASS/FAIL (or n/a when a row is missing or invalid)."""
    def valid(key: str, load: Load) -> WrkResult | None:
        result = find(rows, labels.get(key, ""), load)
        return result if result is not None and not result.problems() else None

    lines = []
    checks: list[tuple[str, str, str, float | None]] = [
        ("Portcullis (1 worker) / stock mitmdump req/s, keep-alive c32", "portcullis", "mitmdump", 1.5),
        ("Portcullis (2 workers) / Portcullis (1 worker) req/s, keep-alive c32", "portcullis-2w", "portcullis", 1.8),
        ("nginx + Portcullis forward-auth / Portcullis reverse proxy (1 worker) req/s, keep-alive c32",
         "nginx-fa", "portcullis", 5.0),
        ("Caddy + Portcullis forward-auth / Portcullis reverse proxy (1 worker) req/s, keep-alive c32",
         "caddy-fa", "portcullis", None),
    ]
    for text, numerator, denominator, goal in checks:
        load = KEEP_ALIVE_32
        top, bottom = valid(numerator, load), valid(denominator, load)
        wanted = f"target >= {goal}" if goal is not None else "no target"
        if top is None or bottom is None:
            lines.append(f"{text}: n/a ({wanted})")
        else:
            value = top.rps / bottom.rps
            verdict = "" if goal is None else " PASS" if value >= goal else " FAIL"
            lines.append(f"{text}: {value:.2f} ({wanted}){verdict}")
    ours, stock = valid("portcullis", KEEP_ALIVE_1), valid("mitmdump", KEEP_ALIVE_1)
    text = "added p50 latency, Portcullis (1 worker) over stock mitmdump, keep-alive c1"
    if ours is None or stock is None:
        lines.append(f"{text}: n/a (target <= 0.2 ms)")
    else:
        added = ours.p50_ms - stock.p50_ms
        lines.append(f"{text}: {added:+.3f} ms (target <= 0.2 ms) {'PASS' if added <= 0.2 else 'FAIL'}")
    return lines + forward_auth_lines(valid, lambda key, load: find(rows, labels.get(key, ""), load))


def forward_auth_lines(valid: Callable[[str, Load], WrkResult | None],
                       measured: Callable[[str, Load], WrkResult | None]) -> list[str]:
    """CPU per request of the forward-auth endpoint alone next to the reverse proxy's and the edge's,
    at keep-alive c32 (valid rows only), and the decisions per request of every forward-auth run."""
    proxy, nginx = valid("portcullis", KEEP_ALIVE_32), valid("nginx", KEEP_ALIVE_32)
    lines = []
    for key, edge in (("nginx-fa", "nginx"), ("caddy-fa", "Caddy")):
        result = valid(key, KEEP_ALIVE_32)
        if result is None or result.decider_us_per_request is None:
            continue
        endpoint = result.decider_us_per_request
        text = (f"CPU per request, keep-alive c32, {edge} + forward-auth: the forward-auth endpoint alone (Portcullis) "
                f"{endpoint:,.0f} µs, the {edge} edge {result.cpu_us_per_request:,.0f} µs")
        if key == "nginx-fa" and nginx is not None:
            text += f" (the plain nginx TLS proxy: {nginx.cpu_us_per_request:,.0f} µs)"
        if proxy is not None and endpoint:
            text += (f"; the Portcullis reverse proxy (1 worker) {proxy.cpu_us_per_request:,.0f} µs: "
                     f"reverse proxy / forward-auth endpoint {proxy.cpu_us_per_request / endpoint:.1f}x")
        lines.append(text)
    for key, edge in (("nginx-fa", "nginx"), ("caddy-fa", "Caddy")):
        runs = [(load, measured(key, load)) for load in LOADS]
        counted = [f"{load.label} {r.decisions_per_request:.3f}" for load, r in runs
                   if r is not None and r.decisions_per_request is not None]
        if counted:
            lines.append(f"decisions per request (decision log records / requests), {edge} + forward-auth: "
                         f"{', '.join(counted)} (1.0: every request decided, none served from an edge cache)")
    return lines


def peak_lines(cold: list[ColdRun]) -> list[str]:
    """Peak RSS per worker process after the cold run (no target: what a host must provision)."""
    lines = []
    for run in cold:
        peaks = [values.get("VmHWM", 0) / 1024 for role, values in run.memory if not role.startswith("supervisor")]
        supervisor = [values.get("VmHWM", 0) / 1024 for role, values in run.memory if role.startswith("supervisor")]
        lines.append(f"peak RSS (VmHWM) per worker after the cold run, {run.row.target}: "
                     f"{', '.join(f'{peak:.0f} MiB' for peak in peaks)}"
                     + (f" (supervisor {supervisor[0]:.0f} MiB)" if supervisor else ""))
    return lines


def memory_lines(cold: list[ColdRun], warm: list[Target]) -> list[str]:
    lines = []
    for run in cold:
        for role, values in run.memory:
            lines.append(f"{run.row.target}, after the cold run: {role}: peak RSS (VmHWM) "
                         f"{values.get('VmHWM', 0) / 1024:.0f} MiB, RSS now {values.get('VmRSS', 0) / 1024:.0f} MiB")
    for target in warm:
        for pid in target.server.pids():
            values = memory_kib(pid)
            lines.append(f"{target.label}, after the warm runs: pid {pid}: VmHWM {values.get('VmHWM', 0) / 1024:.0f} "
                         f"MiB, VmRSS {values.get('VmRSS', 0) / 1024:.0f} MiB")
    return lines


def forward_auth_memory(targets: list[Target]) -> list[Target]:
    """The Portcullis behind the edges, once, as a target of its own for ``memory_lines``."""
    edge = next((t for t in targets if t.decider is not None), None)
    if edge is None or edge.decider is None:
        return []
    return [Target("portcullis-fa", "Portcullis forward-auth (1 worker)", "http", edge.decider.listener,
                   edge.decider.server)]


def share(count: int, total: int) -> str:
    return f"{100 * count / total:5.1f}%" if total else "  n/a"


def profile_lines(profile: Profile, run: WrkResult, top: int = 15) -> list[str]:
    total = profile.samples
    lines = [f"{total:,} samples of running threads at {PROFILE_RATE} Hz during a keep-alive c32 run "
             f"({run.rps:,.0f} req/s while sampled); {profile.waiting:,} samples of blocked threads (a queue, the "
             "thread pool) left out",
             "", "where CPU goes: 'self' by the file of the innermost Python frame (C code, such as OpenSSL or "
             "a signature, counts for the Python function that called it); 'charged' also counts library code "
             "(json, pyjwt, uuid, sqlite3, threading, ...) for the nearest Portcullis or mitmproxy frame that "
             "called it", "",
             f"  {'category':<28} {'self':>6}  {'charged':>7}"]
    for category in ("mitmproxy", "Portcullis", *NOT_OURS[1:], "other"):
        lines.append(f"  {category:<28} {share(profile.self_time[category], total)}  "
                     f"{share(profile.charged[category], total):>7}")
    lines.append(f"  (logging called from Portcullis code, i.e. the decision log's file handler: "
                 f"{share(profile.logging_for_ours, total).strip()})")
    lines += ["", "other, by library (self): " + ", ".join(
        f"{name} {share(count, total).strip()}" for name, count in profile.other_libraries.most_common(10))]
    sections = (("top Portcullis functions by self time", profile.ours_self),
                ("top Portcullis functions by inclusive time (on the stack)", profile.ours_inclusive),
                ("library functions called from Portcullis code, by self time", profile.ours_with_libraries),
                ("top functions overall by self time", profile.top_self))
    for title, counter in sections:
        lines += ["", title]
        lines += [f"  {share(count, total)}  {name}" for name, count in counter.most_common(top)]
    return lines


# ---------------------------------------------------------------------------------------------
# Main


@dataclass(frozen=True)
class Settings:
    seconds: float
    devices: int
    tokens: int
    only: frozenset[str]
    profile: bool
    count_statuses: bool
    keep: bool
    repeat: int = 1


def parse_arguments(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--duration", type=float, default=10, metavar="SECONDS", help="each wrk run (default 10)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke check: 2 s runs, 10,000 devices, 1,000 cold tokens")
    parser.add_argument("--only", metavar="ROWS", help=f"comma-separated targets among {', '.join(TARGETS)}")
    parser.add_argument("--profile", action="store_true",
                        help="also sample the 1-worker gateway, and the forward-auth Portcullis behind nginx, "
                             "with py-spy during a keep-alive c32 run")
    parser.add_argument("--count-statuses", action="store_true",
                        help="count every non-2xx in Lua on the warm runs too (exact, but costs wrk CPU; "
                             "wrk alone counts statuses >= 400)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run each row N times, interleaved, and keep the median (noisy machines)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs) and print its path")
    args = parser.parse_args(argv)
    only = frozenset(TARGETS if not args.only else (t.strip() for t in args.only.split(",") if t.strip()))
    if unknown := only - set(TARGETS):
        parser.error(f"--only: unknown {', '.join(sorted(unknown))} (choose among {', '.join(TARGETS)})")
    return Settings(seconds=2 if args.quick else args.duration, devices=10_000 if args.quick else 100_000,
                    tokens=1_000 if args.quick else 10_000, only=only, profile=args.profile,
                    count_statuses=args.count_statuses, keep=args.keep, repeat=max(1, args.repeat))


def check_tools(profile: bool) -> None:
    missing = [tool for tool in ("nginx", "wrk") if shutil.which(tool) is None]
    missing += [str(path) for path in (VENV_BIN / "mitmdump", VENV_BIN / "portcullis") if not path.exists()]
    if profile and not (VENV_BIN / "py-spy").exists():
        missing.append(f"{VENV_BIN / 'py-spy'} (for --profile: .venv/bin/pip install py-spy)")
    if missing:
        raise BenchError(f"missing: {', '.join(missing)} (apt-get install nginx wrk; ./dev test sets up .venv)")


@dataclass
class Fixtures:
    certificates: Certificates
    database: Path
    warm_token: str
    cold_tokens: Path


@dataclass
class Issued:
    """What every bench's gateway runs on: certificates, the issuer's key, and the inventory."""

    certificates: Certificates
    key: rsa.RSAPrivateKey
    issuer: str
    database: Path


def issuer_and_inventory(root: Path, backend_port: int, devices: int) -> Issued:
    """Certificates, the issuer's key and static files (served by the nginx backend), and
    ``devices`` compliant devices in SQLite."""
    certificates = make_certificates(root / "certs")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    issuer = issuer_url(backend_port)
    write_issuer_files(root / "issuer", issuer, key)
    database = root / "devices.sqlite"
    write_devices(database, devices)
    return Issued(certificates, key, issuer, database)


def make_fixtures(root: Path, backend_port: int, settings: Settings) -> Fixtures:
    """Certificates, the issuer's key and static files, the device inventory and every token."""
    started = time.perf_counter()
    issued = issuer_and_inventory(root, backend_port, settings.devices)
    certificates, key, issuer, database = issued.certificates, issued.key, issued.issuer, issued.database
    print(f"  {settings.devices:,} compliant devices in {database.name} ({time.perf_counter() - started:.1f} s)")
    started = time.perf_counter()
    cold_tokens = root / "cold-tokens.txt"
    needs_cold = "cold" in settings.only
    cold_count = settings.tokens if needs_cold else 0
    cold_tokens.write_text("".join(f"{mint_token(key, issuer, i)}\n" for i in range(1, cold_count + 1)))
    print(f"  1 warm token + {cold_count:,} cold tokens minted ({time.perf_counter() - started:.1f} s)")
    return Fixtures(certificates, database, mint_token(key, issuer, 0), cold_tokens)


def start_targets(stack: contextlib.ExitStack, root: Path, backend: Server, backend_port: int, fixtures: Fixtures,
                  only: frozenset[str]) -> tuple[list[Target], list[Row]]:
    """Every selected target, side by side; a missing ``--workers`` option becomes a row that says so."""
    certificates, targets, unavailable = fixtures.certificates, [], []
    if "direct" in only:
        targets.append(Target("direct", "direct (nginx backend, http)", "http", backend_port, backend))
    if "mitmdump" in only:
        port = free_port()
        confdir = root / "mitmdump"
        confdir.mkdir()
        server = start(stack, "mitmdump", [str(VENV_BIN / "mitmdump"), "-q", "--mode",
                                           f"reverse:http://127.0.0.1:{backend_port}@127.0.0.1:{port}",
                                           "--certs", f"*={certificates.combined}", "--set", f"confdir={confdir}"],
                       confdir / "mitmdump.log", confdir)
        wait_listening(server, port)
        targets.append(Target("mitmdump", "stock mitmdump (TLS)", "https", port, server))
    for key, workers, label in (("portcullis", 1, "Portcullis, 1 worker"),
                                ("portcullis-2w", 2, "Portcullis, 2 workers")):
        if key in only:
            port = free_port()
            started = start_portcullis(stack, key, root / key, port, backend_port, certificates, fixtures.database,
                                       workers)
            if isinstance(started, Unavailable):
                unavailable.append(Row(label, "all", None, f"unavailable: {started.reason.strip()}"))
            else:
                targets.append(Target(key, label, "https", port, started, fixtures.warm_token))
    if "nginx" in only:
        port = free_port()
        server = start_nginx(stack, "nginx proxy", "proxy.nginx.conf", root / "nginx-proxy",
                             {"PORT": port, "BACKEND": backend_port, "CERT": certificates.chain,
                              "KEY": certificates.key})
        targets.append(Target("nginx", "nginx TLS proxy (1 worker)", "https", port, server))
    if only & set(FORWARD_AUTH_TARGETS):
        forward_auth_targets(stack, root, backend_port, fixtures, only, targets, unavailable)
    return targets, unavailable


def forward_auth_targets(stack: contextlib.ExitStack, root: Path, backend_port: int, fixtures: Fixtures,
                         only: frozenset[str], targets: list[Target], unavailable: list[Row]) -> None:
    """The edges that ask one Portcullis's forward-auth listener about every request, with the
    same token as the Portcullis row (so each request is a token and device cache hit, decided)."""
    decider = start_decider(stack, root, backend_port, fixtures)
    certificates = fixtures.certificates
    values = {"HOST": HOST, "BACKEND": backend_port, "FORWARD_AUTH": decider.listener, "CERT": certificates.chain,
              "KEY": certificates.key}
    if "nginx-fa" in only:
        port = free_port()
        server = start_nginx(stack, "nginx forward-auth", "forward-auth.nginx.conf", root / "nginx-fa",
                             {"PORT": port, "SNIPPETS": SNIPPETS, **values})
        targets.append(Target("nginx-fa", "nginx + Portcullis forward-auth", "https", port, server,
                              fixtures.warm_token, decider))
    if "caddy-fa" in only:
        label, port = "Caddy + Portcullis forward-auth", free_port()
        started = start_caddy(stack, root / "caddy-fa", {"PORT": port, **values})
        if isinstance(started, Unavailable):
            unavailable.append(Row(label, "all", None, f"unavailable: {started.reason}"))
        else:
            targets.append(Target("caddy-fa", label, "https", port, started, fixtures.warm_token, decider))


def run_cold(root: Path, backend: Server, backend_port: int, fixtures: Fixtures, settings: Settings,
             log: Path, workers_available: bool) -> list[ColdRun]:
    """A fresh gateway per worker count (so nothing is cached), stopped once measured."""
    runs = []
    for workers in (1, 2) if workers_available else (1,):
        port = free_port()
        name = f"cold-{workers}w"
        with contextlib.ExitStack() as own:
            started = start_portcullis(own, name, root / name, port, backend_port, fixtures.certificates,
                                       fixtures.database, workers)
            if isinstance(started, Unavailable):
                continue
            label = f"Portcullis, {workers} worker{'s' if workers > 1 else ''}, fresh"
            target = Target(name, label, "https", port, started, fixtures.warm_token)
            seconds = max(30.0, settings.seconds * 6)  # one pass over the tokens; stops early when done
            runs.append(cold_run(target, backend, fixtures.cold_tokens, settings.tokens, seconds,
                                 fixtures.certificates.ca, log))
            print(f"  {format_row(runs[-1].row)}", flush=True)
    return runs


def check_all(targets: list[Target], unavailable: list[Row], ca: trustme.CA) -> None:
    print("servers (each answered one request as wrk will send it):")
    for target in targets:
        print(f"  {target.label:<28} {target.url.replace(HOST, '127.0.0.1')}  pid {target.server.pid}: "
              f"{check_decided(target, ca)}", flush=True)
    for row in unavailable:
        print(f"  {row.target:<28} {row.note}")
    print(f"TLS session resumption ({RESUMPTION_PROBES} new connections, each offering the session of the one "
          "before, as wrk's do with Connection: close):")
    for target in targets:
        if target.scheme == "https":
            print(f"  {target.label:<28} {resumed(target, ca)} of {RESUMPTION_PROBES} resumed", flush=True)


RESUMPTION_PROBES = 20


def resumed(target: Target, ca: trustme.CA) -> int:
    """How many of ``RESUMPTION_PROBES`` connections resumed the TLS session the one before got. A
    process has its own session ticket keys: with several workers sharing the port (SO_REUSEPORT),
    a ticket from one is a full handshake at another, which is what a close row pays for."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    session, count = None, 0
    request = f"GET /resumption-probe HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()
    for _ in range(RESUMPTION_PROBES):
        with socket.create_connection(("127.0.0.1", target.port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname=HOST, session=session) as tls:
            tls.sendall(request)
            while tls.recv(65536):  # the answer (a 401 will do), and TLS 1.3's ticket with it
                pass
            count += bool(tls.session_reused)
            session = tls.session
    return count


ProfileResult = tuple[Profile, WrkResult] | str


def try_profile(target: Target, seconds: float, root: Path, log: Path, pid: int | None = None) -> ProfileResult:
    """The profile is an extra: when py-spy cannot attach (permissions), say so and keep the table."""
    print(f"profiling {target.label}{' (the Portcullis it asks)' if pid else ''} with py-spy ...", flush=True)
    try:
        return profile_run(target, seconds, root, log, pid)
    except (BenchError, OSError, subprocess.SubprocessError) as error:
        return f"no profile: {error}"


def profiles(targets: list[Target], settings: Settings, root: Path, log: Path) -> list[tuple[str, ProfileResult]]:
    """With ``--profile``: the 1-worker reverse proxy, and the forward-auth Portcullis behind nginx."""
    found: list[tuple[str, ProfileResult]] = []
    if not settings.profile:
        return found
    for target in targets:
        if target.key == "portcullis":
            found.append(("Portcullis reverse proxy (1 worker)", try_profile(target, settings.seconds, root, log)))
        elif target.key == "nginx-fa" and target.decider is not None:
            found.append(("the forward-auth endpoint (Portcullis behind nginx)",
                          try_profile(target, settings.seconds, root, log, target.decider.server.pid)))
    return found


def run(settings: Settings) -> int:
    check_tools(settings.profile)
    print("\n".join(machine_lines()), flush=True)
    with contextlib.ExitStack() as stack:
        root = Path(tempfile.mkdtemp(prefix="portcullis-bench-"))
        if settings.keep:
            print(f"temp dir (kept): {root}")
        else:
            stack.callback(shutil.rmtree, root, ignore_errors=True)
        log = root / "wrk.log"
        backend_port = free_port()
        print("fixtures:", flush=True)
        fixtures = make_fixtures(root, backend_port, settings)
        backend = start_nginx(stack, "nginx backend", "backend.nginx.conf", root / "nginx-backend",
                              {"PORT": backend_port, "TENANT": TENANT, "ROOT": root / "issuer"})
        targets, unavailable = start_targets(stack, root, backend, backend_port, fixtures, settings.only)
        check_all(targets, unavailable, fixtures.certificates.ca)
        print(f"runs of {settings.seconds:g} s:", flush=True)
        rows = measure(targets, backend, settings, log) + unavailable
        cold = []
        if "cold" in settings.only:
            print("cold caches (a fresh gateway; each request a new token and device):", flush=True)
            workers_available = not any(row.target == "Portcullis, 2 workers" for row in unavailable)
            cold = run_cold(root, backend, backend_port, fixtures, settings, log, workers_available)
        report(rows, cold, targets, profiles(targets, settings, root, log))
    return 0


def report(rows: list[Row], cold: list[ColdRun], targets: list[Target],
           profiled: list[tuple[str, ProfileResult]]) -> None:
    all_rows = rows + [run.row for run in cold]
    labels = {t.key: t.label for t in targets} | {"portcullis-2w": "Portcullis, 2 workers"}
    print("\nresults\n")
    print("\n".join(markdown_table(all_rows)))
    invalid = [row for row in all_rows if row.result is not None and row.result.problems()]
    if invalid:
        print(f"\n!!! {len(invalid)} rows are NOT valid measurements (errors, non-2xx responses, or a close run "
              "that was not one): see remarks !!!")
    print("\nratios\n")
    print("\n".join(f"- {line}" for line in ratio_lines(rows, labels) + peak_lines(cold)))
    print("\nmemory\n")
    print("\n".join(f"- {line}" for line in memory_lines(cold, [t for t in targets if t.key.startswith("portcullis")]
                                                          + forward_auth_memory(targets))))
    for title, profile in profiled:
        print(f"\nprofile: {title}\n")
        print(profile if isinstance(profile, str) else "\n".join(profile_lines(*profile)))


def run_guarded[S](name: str, run: Callable[[S], int], settings: S) -> int:
    """A bench's exit code: its own, 1 with the reason for a BenchError, 130 on Ctrl-C; SIGTERM
    unwinds the same way, so every server it started is stopped."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return run(settings)
    except BenchError as error:
        print(f"{name}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: servers stopped", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    return run_guarded("throughput", run, parse_arguments(argv))


if __name__ == "__main__":
    sys.exit(main())
