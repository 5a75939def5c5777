"""Several trusted issuers at once (``identity.issuers``), through the real listener: the session's
demo issuer (Contoso's own tenant), a partner Entra tenant signing v1 and v2 tokens with one key
set, a Keycloak-shaped issuer for contractors, and issuers that fail or are not trusted at all.
Each issuer is a real HTTP server on its own loopback port that counts what is fetched from it;
tokens are signed by each issuer's own RSA key."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import pytest
import uvicorn
from ruamel.yaml import YAML
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.app.demo import EXCHANGE, OUTLOOK_MOBILE
from gateway.errors import SignalUnavailable
from gateway.identity.issuers import IssuersUnavailable, TrustedIssuers, fetch_issuer_keys
from gateway.identity.tokens import BearerValidator, RejectedToken
from gateway.ops.operations import Operations
from gateway.ops.whatif import Question, WhatIf, WhatIfError
from gateway.policy.model import Identity
from gateway.web.admin import admin_listener
from gateway.web.demo_idp import DemoIdentityProvider
from gateway.web.embedded import EmbeddedServer
from tests.conftest import Background, Gateway, Ports
from tests.helpers.admin import ADMIN_APP, ADMIN_AUDIENCE, READER, admin
from tests.helpers.browser import BROWSER, sign_in
from tests.helpers.config import problems
from tests.helpers.decision_log import logged
from tests.helpers.reload import own_config, reloading_gateway, save, wait_for_reloads
from tests.helpers.replay import replay, totals

MAIL, DOCS = "mail.contoso.test", "docs.contoso.test"
SHAREPOINT = "00000003-0000-0ff1-ce00-000000000000"
FABRIKAM_TENANT = "4f1e2d3c-0000-4000-8000-00000000fab1"
MAPI, EWS, SHAREPOINT_API = "/autodiscover/autodiscover.json", "/EWS/Exchange.asmx", "/_api/web"
MFA = ["pwd", "mfa"]

POLICIES = """\
policies:
  - name: mfa-for-members
    state: enabled
    conditions:
      users: {includeUsers: [All], excludeIssuers: [contractors]}
      resources: {include: [All]}
    grantControls: {builtInControls: [mfa]}
  - name: no-ews-for-partner-guests
    state: enabled
    conditions:
      users: {includeIssuers: [fabrikam]}
      resources: {include: [exchange-ews]}
    grantControls: {builtInControls: [block]}
"""
COMPLIANT_DEVICE = """\
policies:
  - name: compliant-devices
    state: enabled
    conditions: {resources: {include: [All]}}
    grantControls: {builtInControls: [compliantDevice]}
"""
OUTLOOK_ONLY = """\
policies:
  - name: outlook-only
    state: enabled
    conditions: {resources: {include: [All]}}
    grantControls: {builtInControls: [approvedApplication], approvedApplications: [outlook-mobile]}
"""


class IssuerServer:
    """An OIDC issuer on a loopback port of its own: its discovery document (under the issuer, or
    at ``discovery_path`` as Entra's v1 issuer has it) and its JWKS, each fetch counted by path.
    ``failing``: discovery answers 503."""

    def __init__(self, path: str, *, discovery_path: str | None = None, failing: bool = False) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.base = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.idp = DemoIdentityProvider(self.base + path)
        self.discovery_path = discovery_path or f"{path.rstrip('/')}/.well-known/openid-configuration"
        self.keys_path = f"{path.rstrip('/')}/keys"
        self.failing = failing
        self.fetches: Counter[str] = Counter()

    @property
    def issuer(self) -> str:
        return self.idp.issuer

    @property
    def discovery_url(self) -> str:
        return self.base + self.discovery_path

    def app(self) -> Starlette:
        async def discovery(_: Request) -> Response:
            self.fetches["discovery"] += 1
            if self.failing:
                return Response(status_code=503)
            return JSONResponse({"issuer": self.issuer, "jwks_uri": self.base + self.keys_path})

        async def keys(_: Request) -> Response:
            self.fetches["keys"] += 1
            return JSONResponse(self.idp.jwks())

        return Starlette(routes=[Route(self.discovery_path, discovery), Route(self.keys_path, keys)])

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        server = EmbeddedServer(uvicorn.Config(self.app(), log_level="warning", lifespan="off"))
        task = asyncio.create_task(server.serve(sockets=[self.socket]))
        while not server.started:
            await asyncio.sleep(0.01)
        try:
            yield
        finally:
            server.should_exit = True
            await task


class Partner:
    """Fabrikam's Entra tenant: v1 tokens (``iss`` of sts, the issuer its discovery document names,
    found at login's tenant URL) and v2 tokens, signed with one key set."""

    def __init__(self) -> None:
        self.server = IssuerServer(f"/sts/{FABRIKAM_TENANT}/",
                                   discovery_path=f"/{FABRIKAM_TENANT}/.well-known/openid-configuration")
        self.v1 = self.server.issuer
        self.v2 = f"{self.server.base}/{FABRIKAM_TENANT}/v2.0"

    def token(self, user: str = "guest@fabrikam.test", *, version: int = 2, audience: str = EXCHANGE,
              **extra: object) -> str:
        claims: dict[str, object] = {"tid": FABRIKAM_TENANT, "amr": MFA, **extra}
        if version == 2:
            claims["iss"] = self.v2
        else:
            claims.update({"appid": OUTLOOK_MOBILE, "ver": "1.0"})
        return self.server.idp.mint(user=user, client_id=OUTLOOK_MOBILE, audience=audience, extra=claims)

    def entry(self) -> dict[str, object]:
        return {"name": "fabrikam", "issuer": self.v1, "additionalIssuers": [self.v2],
                "discoveryUrl": self.server.discovery_url, "tenantIds": [FABRIKAM_TENANT]}


def keycloak_token(server: IssuerServer, *, audience: str = EXCHANGE, key: Any = None) -> str:
    """A Keycloak access token: no upn, oid or tid; ``preferred_username``, ``email``, ``azp`` and
    ``groups`` as its mappers put them."""
    now = int(time.time())
    claims = {"iss": server.issuer, "aud": audience, "sub": str(uuid.uuid4()), "iat": now, "nbf": now,
              "exp": now + 600, "typ": "Bearer", "azp": OUTLOOK_MOBILE, "preferred_username": "c.jones",
              "email": "c.jones@contractors.test", "groups": ["contractors"], "acr": "1"}
    return jwt.encode(claims, key or server.idp.key, algorithm="RS256", headers={"kid": server.idp.kid})


def keycloak_entry(server: IssuerServer) -> dict[str, object]:
    return {"name": "contractors", "issuer": server.issuer, "audiences": [EXCHANGE],
            "claims": {"userName": "email", "groups": "groups"}}


def issuers_config(tmp_path: Path, gateway: Gateway, demo_ports: Ports, *entries: dict[str, object]) -> Path:
    """The demo config with the session's issuer as ``contoso``, then ``entries``; POLICIES."""
    config_dir = own_config(tmp_path, gateway, demo_ports)
    write_issuers(config_dir, gateway, *entries)
    (config_dir / "policies.yaml").write_text(POLICIES)
    return config_dir


def write_issuers(config_dir: Path, gateway: Gateway, *entries: dict[str, object], first: bool = True) -> None:
    """``first``: the session's issuer (``contoso``, the browsers' and the admin API's) comes first."""
    yaml = YAML()
    data = yaml.load(config_dir / "portcullis.yaml")
    contoso = [{"name": "contoso", "issuer": gateway.idp.issuer}] if first else []
    data["identity"] = {"issuers": [*contoso, *entries], "clockSkewSeconds": 30}
    save(config_dir / "portcullis.yaml", _dumped(yaml, data))


def _dumped(yaml: YAML, data: object) -> str:
    text = io.StringIO()
    yaml.dump(data, text)
    return text.getvalue()


@contextlib.asynccontextmanager
async def issuers_and_gateway(config_dir: Path, servers: list[IssuerServer]) -> AsyncIterator[tuple[int, Operations]]:
    """The issuers' servers, then a watched gateway (and its admin listener) started as ``portcullis
    run`` starts one: every issuer's keys fetched, a failure logged and left to that issuer's tokens
    (503)."""
    async with contextlib.AsyncExitStack() as stack:
        for server in servers:
            await stack.enter_async_context(server.serving())
        port, operations = await stack.enter_async_context(reloading_gateway(config_dir, fetch_keys=False))
        with contextlib.suppress(SignalUnavailable):
            await operations.health.issuers.refresh()
        await stack.enter_async_context(admin_listener(operations))
        yield port, operations


class Several:
    """One gateway trusting contoso, fabrikam, contractors and broken; a stranger serves keys too,
    but is trusted by no one. The contractors' key id is contoso's."""

    def __init__(self, gateway: Gateway, port: int, operations: Operations, partner: Partner,
                 contractors: IssuerServer, broken: IssuerServer, stranger: IssuerServer) -> None:
        self.gateway, self.port, self.operations = gateway, port, operations
        self.partner, self.contractors, self.broken, self.stranger = partner, contractors, broken, stranger

    def send(self, token: str, path: str = MAPI, host: str = MAIL) -> tuple[int, str, dict[str, Any]]:
        """The status, the reason in WWW-Authenticate or the failure, and the logged record."""
        response = self.gateway.request(host, path, token=token, port=self.port)
        record = logged(self.operations.service.decision_log.path, response.headers["x-portcullis-correlation-id"])
        return response.status_code, response.headers.get("www-authenticate", ""), record

    def contoso(self, amr: list[str] = MFA) -> str:
        return self.gateway.idp.mint(user="alex@contoso.test", client_id=OUTLOOK_MOBILE, audience=EXCHANGE,
                                     extra={"amr": amr})


@pytest.fixture(scope="module")
def several(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory, demo_ports: Ports) -> Iterator[Several]:
    partner, contractors = Partner(), IssuerServer("/realms/contractors")
    contractors.idp.kid = gateway.idp.kid  # two issuers, one kid: only the token's own issuer's key may verify it
    broken, stranger = IssuerServer("/broken", failing=True), IssuerServer("/stranger")
    config_dir = issuers_config(tmp_path_factory.mktemp("issuers"), gateway, demo_ports, partner.entry(),
                                keycloak_entry(contractors), {"name": "broken", "issuer": broken.issuer})
    servers = [partner.server, contractors, broken, stranger]
    with Background(lambda: issuers_and_gateway(config_dir, servers)) as (port, operations):
        yield Several(gateway, port, operations, partner, contractors, broken, stranger)


def signal(record: dict[str, Any], name: str) -> Any:
    return next(s["value"] for s in record["signals"] if s["name"] == name)


def test_each_issuers_tokens_are_accepted_and_logged_with_their_issuer(several: Several) -> None:
    for token, issuer, user in [(several.contoso(), "contoso", "alex@contoso.test"),
                                (several.partner.token(), "fabrikam", "guest@fabrikam.test"),
                                (keycloak_token(several.contractors), "contractors", "c.jones@contractors.test")]:
        status, _, record = several.send(token)
        assert status == 200, (issuer, record["status"])
        assert signal(record, "issuer") == issuer and record["evaluationInput"]["issuer"] == issuer
        assert record["userPrincipalName"] == user  # the contractors' user name is their email claim
    _, _, record = several.send(keycloak_token(several.contractors))
    assert record["evaluationInput"]["groups"] == ["contractors"]


def test_an_issuers_audiences_narrow_the_hosts(several: Several) -> None:
    """The contractors' issuer lists Exchange only: its SharePoint token does not open SharePoint,
    where Contoso's does."""
    status, challenge, _ = several.send(keycloak_token(several.contractors, audience=SHAREPOINT), SHAREPOINT_API,
                                        DOCS)
    assert status == 401 and "token audience not accepted for this host" in challenge
    contoso = several.gateway.idp.mint(user="alex@contoso.test", client_id=OUTLOOK_MOBILE, audience=SHAREPOINT,
                                       extra={"amr": MFA})
    assert several.send(contoso, SHAREPOINT_API, DOCS)[0] == 200


def test_a_token_signed_by_another_issuer_with_the_same_kid_is_refused(several: Several) -> None:
    """The contractors' JWKS has a key under contoso's kid: a token naming the contractors but
    signed with contoso's key is checked against the contractors' key only."""
    forged = keycloak_token(several.contractors, key=several.gateway.idp.key)
    status, challenge, record = several.send(forged)
    assert status == 401 and "token signature invalid" in challenge
    assert record["status"]["failureReason"] == "token signature invalid"


def test_an_unknown_issuer_is_refused_without_any_fetch(several: Several) -> None:
    before = {s.issuer: Counter(s.fetches) for s in (several.partner.server, several.contractors, several.broken)}
    token = several.stranger.idp.mint(user="mallory@stranger.test", client_id=OUTLOOK_MOBILE, audience=EXCHANGE,
                                      extra={"amr": MFA})
    status, challenge, _ = several.send(token)
    assert status == 401 and "token issuer not accepted" in challenge
    assert several.stranger.fetches == Counter(), "the token's own iss was never asked for keys"
    assert {s.issuer: s.fetches for s in (several.partner.server, several.contractors, several.broken)} == before


def test_v1_and_v2_tokens_of_one_tenant_share_one_key_fetch(several: Several) -> None:
    for version in (1, 2, 1):
        status, _, record = several.send(several.partner.token(version=version))
        assert status == 200 and signal(record, "issuer") == "fabrikam"
    assert several.partner.server.fetches == Counter({"discovery": 1, "keys": 1})


def test_a_token_of_another_tenant_is_refused(several: Several) -> None:
    status, challenge, _ = several.send(several.partner.token(tid="0b0b0b0b-0000-4000-8000-000000000bad"))
    assert status == 401 and "token tenant not accepted" in challenge


def test_an_issuer_whose_discovery_fails_gets_503_and_the_others_keep_working(several: Several) -> None:
    token = several.broken.idp.mint(user="x@broken.test", client_id=OUTLOOK_MOBILE, audience=EXCHANGE,
                                    extra={"amr": MFA})
    assert several.send(token)[0] == 503
    assert several.send(several.contoso())[0] == 200
    checks = {c.name: c.status for c in several.operations.health.checks()}
    assert checks["jwks:broken"] == "fail"
    assert checks["jwks:contoso"] == checks["jwks:fabrikam"] == checks["jwks:contractors"] == "pass"


def test_policies_include_and_exclude_issuers(several: Several) -> None:
    status, _, record = several.send(several.partner.token(), EWS)
    assert status == 403
    assert {p["id"]: p["result"] for p in record["appliedConditionalAccessPolicies"]}["no-ews-for-partner-guests"] \
        == "failure"
    assert several.send(several.contoso(), EWS)[0] == 200  # the block names fabrikam's guests only
    assert several.send(several.contoso(amr=["pwd"]))[0] == 403  # members need MFA
    status, _, record = several.send(keycloak_token(several.contractors))  # contractors are excluded: no amr
    assert status == 200
    assert {p["id"]: p["result"] for p in record["appliedConditionalAccessPolicies"]}["mfa-for-members"] \
        == "notApplied"


def test_replay_decides_the_logged_requests_again_with_their_issuers(several: Several,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """``evaluationInput.issuer`` keeps the issuer a policy named: the guest's EWS request stays blocked."""
    assert several.send(several.partner.token(), EWS)[0] == 403
    assert several.send(keycloak_token(several.contractors))[0] == 200
    service = several.operations.service
    code, out, _ = replay(capsys, "--config", service.config.directory, service.decision_log.path)
    assert code == 0, out
    counted = totals(out)
    assert counted["same result"] >= 2 and counted["allow→block"] == counted["block→allow"] == 0, out


def test_the_admin_api_takes_tokens_of_its_own_issuer_only(several: Several) -> None:
    """A partner tenant (or a contractors' Keycloak) can put any ``roles`` in its tokens."""
    admin_port = several.operations.service.config.gateway_file.admin.listen.port  # type: ignore[union-attr]
    guest = several.partner.token(audience=ADMIN_AUDIENCE, roles=[READER])
    refused = admin(admin_port, "GET", "/metrics", guest)
    assert refused.status_code == 401 and "its own issuer only" in refused.headers["www-authenticate"]
    member = several.gateway.idp.mint(user="olivia@contoso.test", client_id=ADMIN_APP, audience=ADMIN_AUDIENCE,
                                      roles=(READER,))
    assert admin(admin_port, "GET", "/metrics", member).status_code == 200


def test_browser_sign_in_takes_id_tokens_of_its_issuer_only(several: Several) -> None:
    """The code flow's ID token must come from the browsers' issuer, not from any trusted one."""
    settings = several.operations.service.config.gateway_file.identity
    validator = BearerValidator(settings, TrustedIssuers(settings))
    id_token = several.partner.token(audience="portcullis-demo", nonce="n-1")

    async def as_signed_in_by(issuer: str) -> Identity | RejectedToken:
        return await validator.validate_id_token(id_token, "portcullis-demo", "n-1", issuer=issuer)

    assert asyncio.run(as_signed_in_by("contoso")) == RejectedToken("token issuer not accepted")
    identity = asyncio.run(as_signed_in_by("fabrikam"))
    assert isinstance(identity, Identity) and identity.issuer == "fabrikam"


def test_what_if_and_cases_name_the_issuer(several: Several) -> None:
    whatif = WhatIf(several.operations.service.config, several.operations.whatif_inventory)
    now = datetime.now(UTC)

    def ask(issuer: str | None) -> str:
        question = Question(user="guest@fabrikam.test", url=f"https://{MAIL}{EWS}", app="outlook-mobile",
                            mfa=True, issuer=issuer)
        return asyncio.run(whatif.ask(question, now)).result.value

    assert ask("fabrikam") == "block"
    assert ask(None) == "allow"  # the first issuer: contoso
    with pytest.raises(WhatIfError, match="'partner' is not an issuer; known: contoso, fabrikam"):
        ask("partner")


def test_reload_adds_an_issuer_and_removing_it_refuses_its_tokens_at_once(gateway: Gateway, tmp_path: Path,
                                                                           demo_ports: Ports) -> None:
    contractors = IssuerServer("/realms/contractors")
    config_dir = issuers_config(tmp_path, gateway, demo_ports)
    (config_dir / "policies.yaml").write_text(OUTLOOK_ONLY)  # names no issuer: each may come and go
    token = keycloak_token(contractors)

    def send(port: int) -> int:
        return gateway.request(MAIL, MAPI, token=token, port=port).status_code

    with Background(lambda: issuers_and_gateway(config_dir, [contractors])) as (port, operations):
        assert send(port) == 401
        write_issuers(config_dir, gateway, keycloak_entry(contractors))
        wait_for_reloads(operations, 1)
        assert operations.reloader.last is not None and operations.reloader.last.applied, operations.reloader.last
        assert send(port) == 200, "the new issuer's keys were fetched with the reload"
        assert contractors.fetches == Counter({"discovery": 1, "keys": 1})
        assert {c.name for c in operations.health.checks()} >= {"jwks:contoso", "jwks:contractors"}
        save(config_dir / "policies.yaml", OUTLOOK_ONLY.replace("outlook-only", "outlook-only-again"))
        wait_for_reloads(operations, 2)
        assert send(port) == 200 and contractors.fetches == Counter({"discovery": 1, "keys": 1}), \
            "an issuer a reload keeps keeps its keys"
        write_issuers(config_dir, gateway)
        wait_for_reloads(operations, 3)
        assert operations.reloader.last is not None and operations.reloader.last.applied
        assert send(port) == 401, "a verified token of a removed issuer is not served from the cache"
        assert "jwks:contractors" not in {c.name for c in operations.health.checks()}


def test_removing_the_issuer_of_a_browser_session_ends_the_session(gateway: Gateway, tmp_path: Path,
                                                                    demo_ports: Ports) -> None:
    contractors = IssuerServer("/realms/contractors")
    config_dir = issuers_config(tmp_path, gateway, demo_ports, keycloak_entry(contractors))
    (config_dir / "policies.yaml").write_text(COMPLIANT_DEVICE)
    with Background(lambda: issuers_and_gateway(config_dir, [contractors])) as (port, operations):
        answer, cookie = sign_in(gateway, port=port)
        inbox = gateway.request(MAIL, "/owa/", headers={**BROWSER, "Cookie": cookie}, port=port)
        assert answer.status_code == 302 and inbox.status_code == 200
        write_issuers(config_dir, gateway, keycloak_entry(contractors), first=False)
        wait_for_reloads(operations, 1)
        assert operations.reloader.last is not None and operations.reloader.last.applied, operations.reloader.last
        again = gateway.request(MAIL, "/owa/", headers={**BROWSER, "Cookie": cookie}, port=port)
    assert again.status_code == 503, "no session of a removed issuer, and no sign-in at it"


def test_issuer_config_errors_are_reported_at_their_line(gateway: Gateway, tmp_path: Path,
                                                         demo_ports: Ports) -> None:
    config_dir = issuers_config(tmp_path, gateway, demo_ports, {"name": "twin", "issuer": gateway.idp.issuer},
                                {"name": "twin", "issuer": "https://idp.example.com/x"})
    (config_dir / "policies.yaml").write_text(OUTLOOK_ONLY)
    assert problems(config_dir) == [
        f"{config_dir / 'portcullis.yaml'}:19:13: identity.issuers[1].issuer: '{gateway.idp.issuer}' is already an iss "
        "of issuers[0] (each iss belongs to one)",
        f"{config_dir / 'portcullis.yaml'}:20:11: identity.issuers[2].name: 'twin' already names issuers[1]"]
    write_issuers(config_dir, gateway, {"name": "bad", "issuer": "http://idp.example.com/x", "claim": {}})
    found = problems(config_dir)
    assert any("identity.issuers[1].issuer: issuer 'http://idp.example.com/x' must use https" in p for p in found)
    assert any("identity.issuers[1].claim:" in p for p in found), found
    write_issuers(config_dir, gateway, {"name": "contractors", "issuer": "https://keycloak.example.com/realms/c"})
    (config_dir / "policies.yaml").write_text(POLICIES.replace("includeIssuers: [fabrikam]", "includeIssuers: [fab]"))
    assert problems(config_dir) == [f"{config_dir / 'policies.yaml'}:11:32: policies[1].conditions.users."
                                    "includeIssuers[0]: 'fab' is not an issuer; known: contoso, contractors"]


def test_an_issuer_whose_keys_cannot_be_fetched_is_named_at_its_line(several: Several,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """At start and after a reload, each issuer whose discovery or keys failed is logged at its
    entry in portcullis.yaml, so the operator knows which one to look at."""
    config = several.operations.service.config

    async def failing() -> None:
        raise IssuersUnavailable([("broken", "discovery answered 500")])

    with caplog.at_level(logging.WARNING, "gateway.identity.issuers"):
        asyncio.run(fetch_issuer_keys(failing(), config, "config reload (adminApi): "))
    [message] = [r.getMessage() for r in caplog.records if "not fetched" in r.getMessage()]
    index = [entry.name for entry in config.gateway_file.identity.issuers].index("broken")
    assert re.fullmatch(rf"config reload \(adminApi\): .*portcullis\.yaml:\d+:\d+: identity\.issuers\[{index}\]: "
                        r"discovery or signing keys not fetched \(discovery answered 500\); this issuer's tokens get "
                        r"503 until they are", message), message
