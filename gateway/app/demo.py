"""The embedded demo: the demo issuer and backends on the loopback ports the config names, and the
scenarios whose ready-to-paste curl commands ``portcullis demo`` prints (the tests run the same
scenarios through the real listener and check every expectation).
"""

from __future__ import annotations

import asyncio
import json
import shlex
import socket
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import uvicorn

from gateway.app.certs import demo_device_files
from gateway.config import Config
from gateway.identity.assertion import assertion_signer
from gateway.web.demo_backends import AssertionCheck, exchange_app, sharepoint_app
from gateway.web.demo_idp import DemoIdentityProvider
from gateway.web.embedded import EmbeddedServer
from gateway.web.types import ASGIApp

EXCHANGE = "00000002-0000-0ff1-ce00-000000000000"
SHAREPOINT = "00000003-0000-0ff1-ce00-000000000000"
OUTLOOK_MOBILE = "27922004-5251-4030-b22d-91ecd9a37ea4"
TEAMS = "1fec8e78-bce4-4aaf-ab1b-5451cc387264"
OFFICE = "d3590ed6-52b3-4102-aeff-aad2292ab01c"
ONEDRIVE = "ab9b8c07-8f02-4f72-87fa-80105867a763"
ADMIN_TOOL = "7d3e5f1a-9b2c-4d6e-8f10-a2b4c6d8e0f5"  # the operators' admin tool (a made-up client id)
ADMIN_USER = "sam@contoso.test"  # the demo's security operator

ALEX_IPHONE = "3c5f0b1e-7a2d-4e8f-9b61-0d2a4c8e1f01"  # compliant, threat level low
BLAKE_ANDROID = "8d2e6f4a-1b3c-4d5e-8f70-2a4b6c8d0e02"  # noncompliant
CASEY_IPAD = "1a7b9c3d-5e6f-4a8b-9c0d-4e6f8a0b2c03"  # in grace period
DREW_IPHONE = "5e9f1a2b-3c4d-4e5f-a6b7-6c8d0e2f4a04"  # compliant, threat level high
# Intune's device ids (config/devices.yaml): what the demo devices' certificates name, in Intune's SAN format
ALEX_IPHONE_INTUNE = "b7e2c4a1-5d3f-4e6a-9c8b-1f0e2d3c4a01"
BLAKE_ANDROID_INTUNE = "b7e2c4a1-5d3f-4e6a-9c8b-1f0e2d3c4a02"
DEMO_CERTIFICATES = (ALEX_IPHONE_INTUNE, BLAKE_ANDROID_INTUNE)

BROWSER_UA = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36"
ACTIVESYNC_UA = "Outlook-iOS-Android/1.0"


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    title: str
    host: str
    path: str
    expect_status: int
    expect_text: str | None = None
    method: str = "GET"
    credential: str = "valid"  # valid | none | tampered
    user: str = "alex@contoso.test"
    client_id: str = OUTLOOK_MOBILE
    audience: str = EXCHANGE
    device_id: str | None = ALEX_IPHONE
    headers: tuple[tuple[str, str], ...] = field(default=(("User-Agent", ACTIVESYNC_UA),))
    certificate: str | None = None  # the Intune device id whose demo device certificate the client presents


EAS_IDS = {ALEX_IPHONE: "ApplF17XK2ALEX1", BLAKE_ANDROID: "androidc0ffee42b1", CASEY_IPAD: "ApplDMPCASEY01",
           DREW_IPHONE: "ApplF17DREW001"}


def activesync(device_id: str, user: str = "alex") -> str:
    """An ActiveSync Sync command as the device's mail app sends it (DeviceId bound to the device)."""
    return f"/Microsoft-Server-ActiveSync?Cmd=Sync&User={user}&DeviceId={EAS_IDS[device_id]}&DeviceType=iPhone"


ACTIVESYNC = activesync(ALEX_IPHONE)

SCENARIOS: tuple[Scenario, ...] = (
    Scenario(title="Outlook (by its client id) on a compliant, low-risk device reaches ActiveSync",
             host="mail.contoso.test", path=ACTIVESYNC, method="POST", expect_status=200,
             expect_text='"backend":"exchange"'),
    Scenario(title="Another app (Teams) with the same user and device is refused",
             host="mail.contoso.test", path=ACTIVESYNC, method="POST", client_id=TEAMS,
             expect_status=403, expect_text="app not approved"),
    Scenario(title="Outlook on a noncompliant device is refused",
             host="mail.contoso.test", path=activesync(BLAKE_ANDROID, "blake"), method="POST",
             user="blake@contoso.test",
             device_id=BLAKE_ANDROID, expect_status=403, expect_text="device not compliant"),
    Scenario(title="Outlook on a device in its compliance grace period gets through",
             host="mail.contoso.test", path=activesync(CASEY_IPAD, "casey"), method="POST", user="casey@contoso.test",
             device_id=CASEY_IPAD, expect_status=200, expect_text='"backend":"exchange"'),
    Scenario(title="Outlook on a device whose MTD threat level is high is refused",
             host="mail.contoso.test", path=activesync(DREW_IPHONE, "drew"), method="POST", user="drew@contoso.test",
             device_id=DREW_IPHONE, expect_status=403, expect_text="device risk high, allowed: low"),
    Scenario(title="Alex's token replayed from another phone (another ActiveSync DeviceId) is refused",
             host="mail.contoso.test", path=activesync(DREW_IPHONE), method="POST", expect_status=403,
             expect_text="ActiveSync DeviceId is not the device the token was issued to"),
    Scenario(title="No token: 401 with a Bearer challenge that says where to sign in (no error: none was sent)",
             host="mail.contoso.test", path=ACTIVESYNC, method="POST", credential="none",
             expect_status=401, expect_text='resource_metadata="https://mail.contoso.test'),
    Scenario(title="A bad token (tampered signature): 401 with a Bearer challenge",
             host="mail.contoso.test", path=ACTIVESYNC, method="POST", credential="tampered",
             expect_status=401, expect_text='error="invalid_token"'),
    Scenario(title="A browser on the noncompliant device opening OWA gets the HTML block page",
             host="mail.contoso.test", path="/owa/", user="blake@contoso.test", client_id=OFFICE,
             device_id=BLAKE_ANDROID, expect_status=403, expect_text="You can't get there from here",
             headers=(("User-Agent", BROWSER_UA), ("Accept", "text/html,application/xhtml+xml"))),
    Scenario(title="OneDrive on a compliant device downloads a SharePoint document",
             host="docs.contoso.test", path="/_layouts/15/download.aspx?UniqueId=7f1c",
             client_id=ONEDRIVE, audience=SHAREPOINT, expect_status=200,
             expect_text="attachment", headers=(("User-Agent", "OneDrive/24.0"),)),
    Scenario(title="A path of a protected host that no resource names is denied",
             host="mail.contoso.test", path="/ecp/", expect_status=403,
             expect_text="path is not part of any protected resource"),
)


# Shown when the config trusts the demo device CA (the shipped demo does, for its mail host): the
# client presents its device's MDM certificate (curl --cert), made by the demo at first run.
CERTIFICATE_SCENARIOS: tuple[Scenario, ...] = (
    Scenario(title="Outlook on the compliant phone presenting its MDM device certificate (Intune's SAN) reaches "
                   "ActiveSync", host="mail.contoso.test", path=ACTIVESYNC, method="POST",
             certificate=ALEX_IPHONE_INTUNE, expect_status=200, expect_text='"backend":"exchange"'),
    Scenario(title="The noncompliant phone with its own certificate and token is refused",
             host="mail.contoso.test", path=activesync(BLAKE_ANDROID, "blake"), method="POST",
             user="blake@contoso.test", device_id=BLAKE_ANDROID, certificate=BLAKE_ANDROID_INTUNE,
             expect_status=403, expect_text="device not compliant"),
    Scenario(title="Alex's token stolen and replayed from the noncompliant phone (its certificate) is refused",
             host="mail.contoso.test", path=ACTIVESYNC, method="POST", certificate=BLAKE_ANDROID_INTUNE,
             expect_status=403, expect_text="token issued to another device"),
)


def shown_scenarios(with_certificates: bool) -> tuple[Scenario, ...]:
    return SCENARIOS + CERTIFICATE_SCENARIOS if with_certificates else SCENARIOS


def scenario_token(idp: DemoIdentityProvider, scenario: Scenario) -> str | None:
    if scenario.credential == "none":
        return None
    token = idp.mint(user=scenario.user, client_id=scenario.client_id, audience=scenario.audience,
                     device_id=scenario.device_id)
    if scenario.credential == "tampered":
        header, payload, signature = token.split(".")
        flipped = ("A" if signature[10] != "A" else "B")
        token = ".".join((header, payload, signature[:10] + flipped + signature[11:]))
    return token


def curl_command(scenario: Scenario, token: str | None, *, port: int, ca_file: str | None,
                 device_ca: Path | None = None) -> str:
    """``device_ca``: the demo device CA, beside whose ``devices/`` the scenario's certificate is;
    ``ca_file`` None: plain HTTP (an edge of ``demo --edge``)."""
    parts = ["curl", "-sS", "-i", *(["--cacert", ca_file] if ca_file else []),
             "--resolve", f"{scenario.host}:{port}:127.0.0.1"]
    if scenario.certificate is not None and device_ca is not None:
        cert_file, key_file = demo_device_files(device_ca, scenario.certificate)
        parts += ["--cert", _relative(cert_file), "--key", _relative(key_file)]
    if scenario.method != "GET":
        parts += ["-X", scenario.method]
    for name, value in scenario.headers:
        parts += ["-H", f"{name}: {value}"]
    if token:
        parts += ["-H", f"Authorization: Bearer {token}"]
    parts.append(f"{'https' if ca_file else 'http'}://{scenario.host}:{port}{scenario.path}")
    return shlex.join(parts)


def expectation(scenario: Scenario) -> str:
    text = f" and {scenario.expect_text}" if scenario.expect_text else ""
    return f"expect: {scenario.expect_status}{text}"


def banner(config: Config, idp: DemoIdentityProvider, ca_file: Path, port: int,
           partner_secrets: dict[str, str] | None = None, device_ca: Path | None = None) -> str:
    """``device_ca``: the demo device CA, when the config trusts it (scenarios with a certificate
    are shown only then)."""
    shown_ca = _relative(ca_file)
    hosts = ", ".join(f"https://{h}:{port}" for h in config.gateway_file.protected_hosts)
    lines = [
        f"Portcullis demo is up: {hosts} (on 127.0.0.1; trust {shown_ca})",
        f"Decision log: {_relative(config.path(config.gateway_file.decision_log.path))}",
        "Paste any command below; each token is fresh (valid for one hour). Ctrl-C stops the demo.",
        "",
    ]
    if config.gateway_file.browser_sign_in is not None:
        lines += [f"# In a browser that trusts {shown_ca} and maps *.contoso.test to 127.0.0.1: "
                  f"https://mail.contoso.test:{port}/owa/ (sign in at the demo issuer)"]
    if config.gateway_file.kiosk is not None:
        listen = config.gateway_file.kiosk.listen
        lines += [f"# Kiosk browsers use the forward proxy {listen.host}:{listen.port} "
                  f"(e.g. chromium --proxy-server={listen.host}:{listen.port}) and open https://mail.contoso.test/owa/"]
    lines += [""]
    for number, scenario in enumerate(shown_scenarios(device_ca is not None), start=1):
        token = scenario_token(idp, scenario)
        lines += [f"# {number}. {scenario.title}", f"#    {expectation(scenario)}",
                  curl_command(scenario, token, port=port, ca_file=shown_ca, device_ca=device_ca), ""]
    service_host = config.gateway_file.gateway.service_host
    for partner, secret in (partner_secrets or {}).items():
        if service_host is None:
            break
        lines += [f"# The MTD partner {partner!r} raises Alex's iPhone to high risk (try request 1 again; "
                  "send 'low' to restore):", webhook_command(service_host, port, partner, secret, shown_ca), ""]
    lines += admin_commands(config, idp)
    lines += [
        "# Mint more tokens from the demo issuer (dev only): user, client_id, audience, device_id",
        shlex.join(["curl", "-sS", "-X", "POST", f"{idp.issuer.rstrip('/')}/demo/token", "-d", "user=alex@contoso.test",
                    "-d", f"client_id={OUTLOOK_MOBILE}", "-d", f"audience={EXCHANGE}",
                    "-d", f"device_id={ALEX_IPHONE}"]),
    ]
    return "\n".join(lines)


def admin_commands(config: Config, idp: DemoIdentityProvider) -> list[str]:
    """The admin API with a fresh reader token (paste it into the dashboard's sign-in form too),
    and a reload by an operator."""
    admin = config.gateway_file.admin
    if admin is None:
        return []
    host = f"[{admin.listen.host}]" if ":" in admin.listen.host else admin.listen.host
    base = f"http://{host}:{admin.listen.port}"
    reader, operator = (idp.mint(user=ADMIN_USER, client_id=ADMIN_TOOL, audience=admin.audience, roles=(role,))
                        for role in ("Portcullis.Reader", "Portcullis.Operator"))
    return [f"# The admin API: Prometheus metrics with a Portcullis.Reader token. The dashboard is {base}/ "
            "(sign in by pasting the same token).",
            shlex.join(["curl", "-sS", "-H", f"Authorization: Bearer {reader}", f"{base}/metrics"]),
            "# Reload the config directory now (Portcullis.Operator only; a reader gets 403):",
            shlex.join(["curl", "-sS", "-X", "POST", "-H", f"Authorization: Bearer {operator}",
                        f"{base}/admin/reload"]),
            ""]


def webhook_command(host: str, port: int, partner: str, secret: str, ca_file: str) -> str:
    """A signed push as an MTD partner sends it, in plain shell (openssl computes the HMAC)."""
    body = json.dumps({"events": [{"deviceId": ALEX_IPHONE, "threatLevel": "highSeverity"}]}, separators=(",", ":"))
    return (f"ts=$(date +%s); body={shlex.quote(body)}; "
            f"sig=$(printf '%s.%s' \"$ts\" \"$body\" | openssl dgst -sha256 -hmac {shlex.quote(secret)} | "
            "sed 's/^.* //'); "
            f"curl -sS -i --cacert {ca_file} --resolve {host}:{port}:127.0.0.1 -H 'Content-Type: application/json' "
            f"-H \"X-Portcullis-Timestamp: $ts\" -H \"X-Portcullis-Signature: sha256=$sig\" --data \"$body\" "
            f"https://{host}:{port}/mtd/{partner}/events")


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


DEMO_BACKENDS = {"mail.contoso.test": exchange_app, "docs.contoso.test": sharepoint_app}


class DemoUpstreams:
    """The demo issuer and backends, served by uvicorn on the loopback ports the config names."""

    def __init__(self, config: Config) -> None:
        issuer = config.gateway_file.browser_issuer.issuer  # the demo issuer plays the browsers' issuer
        self.idp = DemoIdentityProvider(issuer)
        self._servers: list[uvicorn.Server] = [_server(self.idp.app(), issuer)]
        signer = assertion_signer(config)  # the gateway's key (made here on first run): backends get its JWKS
        self._holding: list[Counter[str]] = []  # each backend's long-polls held now, by User-Agent
        for host, protected in config.gateway_file.protected_hosts.items():
            if host not in DEMO_BACKENDS:
                raise ValueError(f"the demo has no backend for {host!r}; it serves {', '.join(DEMO_BACKENDS)}")
            check = AssertionCheck(header=signer.header, jwks=signer.jwks(), issuer=signer.issuer,
                                   audience=protected.upstream) if signer else None
            backend = DEMO_BACKENDS[host](check)
            self._holding.append(backend.state.holding)
            self._servers.append(_server(backend, protected.upstream))
        self._tasks: list[asyncio.Task[None]] = []

    def holding(self, user_agent: str) -> bool:
        """Whether a backend is holding a long-poll (``Cmd=Ping``) sent with this User-Agent."""
        return any(user_agent in held for held in self._holding)

    async def start(self) -> None:
        sockets = [_listen(server.config) for server in self._servers]
        for server, sock in zip(self._servers, sockets, strict=True):
            self._tasks.append(asyncio.create_task(server.serve(sockets=[sock])))
        while not all(s.started for s in self._servers):
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        for server in self._servers:
            server.should_exit = True
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _listen(config: uvicorn.Config) -> socket.socket:
    """Bind first, so a port in use is a clear error rather than uvicorn exiting the process."""
    try:
        return socket.create_server((config.host, config.port))
    except OSError as error:
        raise RuntimeError(f"the demo cannot listen on {config.host}:{config.port}: {error.strerror}") from error


def _server(app: ASGIApp, url: str) -> uvicorn.Server:
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost"):
        raise ValueError(f"the demo serves {url} itself, so it must be http on 127.0.0.1")
    config = uvicorn.Config(app, host=parts.hostname, port=parts.port or 80, log_level="warning",
                            lifespan="off", access_log=False, timeout_graceful_shutdown=2)
    return EmbeddedServer(config)
