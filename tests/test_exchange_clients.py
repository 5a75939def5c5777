"""A real, independently written EWS client through the gateway (issue 15): exchangelib, from PyPI,
against ``tests/ews_backend.py`` (Exchange's SOAP shapes on a real HTTP server), over real TLS, with
tokens the demo issuer signs. Allowed calls succeed; refusals reach exchangelib as the 403 or 401
it understands, without retries piling up; streaming notifications arrive one by one.

exchangelib starts without autodiscover or version probing (the endpoint and the server's build are
given), resolves ``mail.contoso.test`` to 127.0.0.1 (as curl's ``--resolve`` does) and trusts the
test CA through ``REQUESTS_CA_BUNDLE``, as any ``requests`` client would.
The discovery challenge an empty ``Bearer`` gets is tests/test_sign_in_discovery.py's.
"""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from exchangelib import DELEGATE, OAUTH2, Account, Build, Configuration, FailFast, FaultTolerance, Version
from exchangelib.credentials import OAuth2AuthorizationCodeCredentials
from exchangelib.errors import EWSError, MalformedResponseError, UnauthorizedError
from exchangelib.ewsdatetime import UTC
from exchangelib.protocol import BaseProtocol, RetryPolicy, close_connections
from oauthlib.oauth2 import OAuth2Token

from gateway.app.demo import ALEX_IPHONE, BLAKE_ANDROID, EXCHANGE, OUTLOOK_MOBILE, SCENARIOS, TEAMS, scenario_token
from gateway.http.headers import CORRELATION_ID
from tests.conftest import Background, Gateway, Ports
from tests.ews_backend import (
    DIRECTORY,
    EWS_PATH,
    INBOX_ID,
    INBOX_MESSAGES,
    EwsBackend,
    NotificationStream,
    item_id,
)
from tests.helpers.decision_log import listener, own_config
from tests.helpers.hosts import MAIL

EXCHANGE_2016 = Build(15, 1, 2507, 6)


@dataclass
class Ews:
    gateway: Gateway  # a listener of its own in front of ``backend``, the session's issuer and CA
    backend: EwsBackend


@pytest.fixture(scope="module")
def ews(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory, demo_ports: Ports) -> Iterator[Ews]:
    """The demo config and rules (Outlook only, compliant devices, for exchange-ews), with the EWS
    backend as mail.contoso.test's upstream."""
    backend = EwsBackend()
    config_dir = own_config(tmp_path_factory.mktemp("ews"), gateway,
                            Ports(0, demo_ports.idp, backend.port, demo_ports.docs))
    try:
        with Background(lambda: listener(config_dir)) as (port, decision_log):
            yield Ews(replace(gateway, port=port, config_dir=config_dir, decision_log=decision_log), backend)
    finally:
        backend.close()


@dataclass
class Client:
    """Opens exchangelib accounts at the gateway; every request it sends carries ``user_agent``."""

    ews: Ews
    user_agent: str

    def account(self, *, client_id: str = OUTLOOK_MOBILE, device_id: str = ALEX_IPHONE,
                user: str = "alex@contoso.test", token: str | None = None,
                retry_policy: RetryPolicy | None = None) -> Account:
        """``user``'s mailbox, with a token the demo issuer minted for this app and device (or ``token``)."""
        token = token or self.ews.gateway.idp.mint(user=user, client_id=client_id, audience=EXCHANGE,
                                                   device_id=device_id)
        credentials = OAuth2AuthorizationCodeCredentials(
            access_token=OAuth2Token({"access_token": token, "token_type": "Bearer"}))
        config = Configuration(service_endpoint=f"https://{MAIL}:{self.ews.gateway.port}{EWS_PATH}",
                               credentials=credentials, auth_type=OAUTH2, version=Version(build=EXCHANGE_2016),
                               retry_policy=retry_policy or FailFast())
        return Account(primary_smtp_address=user, config=config, autodiscover=False, access_type=DELEGATE,
                       locale="en_US", default_timezone=UTC)

    def attempts(self) -> list[dict[str, Any]]:
        """The gateway's decisions on this client's requests. The log is written in order by one
        thread: once a later request's record is there, every earlier one is too."""
        marker = self.ews.gateway.request(MAIL, EWS_PATH, method="POST", headers={"User-Agent": "marker"})
        self.ews.gateway.decision(marker.headers[CORRELATION_ID])
        mine = f'"userAgent":"{self.user_agent}"'
        return [json.loads(line) for line in self.ews.gateway.decision_log.read_text().splitlines() if mine in line]


@pytest.fixture
def client(ews: Ews, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Client]:
    ca_file = tmp_path / "ca.pem"
    ews.gateway.ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca_file))
    real_getaddrinfo = socket.getaddrinfo

    def resolve(host: Any, *args: Any, **kwargs: Any) -> Any:  # mail.contoso.test is the gateway, on loopback
        return real_getaddrinfo("127.0.0.1" if host == MAIL else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    user_agent = f"exchangelib-test/{uuid.uuid4().hex}"
    monkeypatch.setattr(BaseProtocol, "USERAGENT", user_agent)
    yield Client(ews, user_agent)
    close_connections()


def test_folders_items_and_names_pass_through(client: Client) -> None:
    """GetFolder (the root, then the inbox), FindItem (and the GetItem exchangelib follows it with)
    and ResolveNames, as exchangelib sends them: each reaches Exchange with the user's token and
    identity, and comes back as Exchange answered."""
    token = client.ews.gateway.idp.mint(user="alex@contoso.test", client_id=OUTLOOK_MOBILE, audience=EXCHANGE,
                                        device_id=ALEX_IPHONE)
    account = client.account(token=token)
    calls = len(client.ews.backend.calls)
    assert account.root.name == "Top of Information Store"
    assert (account.inbox.id, account.inbox.name, account.inbox.total_count) == (INBOX_ID, "Inbox", 2)
    messages = list(account.inbox.all()[:10])
    assert [(m.id, m.subject, m.author.email_address) for m in messages] == list(INBOX_MESSAGES)
    resolved = account.protocol.resolve_names(["alex"])
    assert [(m.name, m.email_address) for m in resolved] == list(DIRECTORY)
    received = client.ews.backend.calls[calls:]
    assert [call.operation for call in received] == ["GetFolder", "GetFolder", "FindItem", "GetItem", "ResolveNames"]
    for call in received:
        assert (call.headers["user-agent"], call.headers["authorization"], call.headers["x-portcullis-user"]) == \
            (client.user_agent, f"Bearer {token}", "alex@contoso.test")
    assert [record["httpStatus"] for record in client.attempts()] == [200] * 5


@pytest.mark.parametrize(("opened", "reason"), [
    pytest.param({"client_id": TEAMS}, "app not approved", id="an app the rules do not approve (Teams)"),
    pytest.param({"user": "blake@contoso.test", "device_id": BLAKE_ANDROID},
                 "device not compliant (complianceState: noncompliant)",
                 id="Outlook on a noncompliant device"),
])
def test_a_refusal_reaches_exchangelib_as_a_403_it_does_not_retry(client: Client, monkeypatch: pytest.MonkeyPatch,
                                                                   opened: dict[str, str], reason: str) -> None:
    """exchangelib's fault-tolerant policy retries what looks transient (a closed connection, a 401, a
    503) until ``max_wait``; a 403 it raises at once, with the gateway's reason. Its first back-off
    (10 s) is made 50 ms so that retries, if any, pile up within this test."""
    monkeypatch.setattr(BaseProtocol, "RETRY_WAIT", 0.05)
    account = client.account(retry_policy=FaultTolerance(max_wait=1), **opened)
    with pytest.raises(EWSError) as refused:
        account.root  # noqa: B018  (GetFolder, sent when the root folder is first asked for)
    attempts = client.attempts()
    assert [(a["httpStatus"], a["status"]["failureReason"]) for a in attempts] == [(403, reason)]
    assert isinstance(refused.value, MalformedResponseError), repr(refused.value)
    assert "Code: 403" in str(refused.value) and reason in str(refused.value)
    assert not [call for call in client.ews.backend.calls if call.headers["user-agent"] == client.user_agent]


@pytest.mark.parametrize(("token", "reason"), [
    pytest.param("tampered", "token signature invalid", id="a tampered signature"),
    pytest.param("expired", "token expired", id="an expired token"),
])
def test_a_bad_token_reaches_exchangelib_as_a_401(client: Client, token: str, reason: str) -> None:
    """With its default (fail-fast) policy exchangelib reports a 401 as UnauthorizedError. (Its
    fault-tolerant policy retries 401s by design: Exchange sends them when throttling.)"""
    idp = client.ews.gateway.idp
    sent = scenario_token(idp, next(s for s in SCENARIOS if s.credential == "tampered")) if token == "tampered" \
        else idp.mint(user="alex@contoso.test", client_id=OUTLOOK_MOBILE, audience=EXCHANGE, device_id=ALEX_IPHONE,
                      lifetime=-120)
    account = client.account(token=sent)
    with pytest.raises(EWSError) as refused:
        account.root  # noqa: B018
    attempts = client.attempts()
    assert [(a["httpStatus"], a["status"]["failureReason"]) for a in attempts] == [(401, reason)]
    assert isinstance(refused.value, UnauthorizedError), repr(refused.value)
    assert not [call for call in client.ews.backend.calls if call.headers["user-agent"] == client.user_agent]


def test_streaming_notifications_arrive_one_by_one(client: Client) -> None:
    """GetStreamingEvents through the gateway, with exchangelib's streaming API: the backend sends
    event n + 1 only once the client has event n (or, if it never arrives, after 5 s), so each
    notification must reach exchangelib while the backend has sent no later one."""
    account = client.account()
    stream = client.ews.backend.stream = NotificationStream(count=3, interval=5)
    subscription_id = account.inbox.subscribe_to_streaming()
    received = []
    for notification in account.inbox.get_streaming_events(subscription_id, connection_timeout=1):
        received.append(([event.item_id.id for event in notification.events], stream.sent))
        stream.release()
    assert received == [([item_id(n)], n) for n in (1, 2, 3)], "(events, events the backend had sent by then)"
    assert client.ews.backend.operations()[-2:] == ["Subscribe", "GetStreamingEvents"]
