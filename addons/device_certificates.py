"""DeviceCertificates: asks for the client's device certificate on the TLS listener, for the hosts
whose ``deviceCertificates`` setting says so, and hands the core's verdict on it to each request.

mitmproxy can request a client certificate (``request_client_cert``) but accepts any: its verify
callback says yes to everything. So the certificate is asked for per connection (never on the
kiosk's forward proxy, never for a host without the setting), accepted by the TLS handshake, and
verified by the core (``gateway/identity/device_certificates.py``) once the handshake is done: once
per connection, not per request. A connection without one still completes its handshake: a host
that requires a certificate answers its requests with a page saying what to install, which a
browser shows; a TLS alert would show an error the user cannot act on.

Each request carries its connection's verdict, checked again against the rules in force (a
certificate that expired or was revoked since the handshake is refused from then on).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import Protocol

from cryptography.hazmat.primitives.serialization import Encoding
from mitmproxy import connection, http, tls
from mitmproxy.proxy.mode_specs import ReverseMode
from OpenSSL import SSL

from addons.flow_state import state
from addons.safety import fail_closed
from gateway.decision.service import utc_now
from gateway.policy.model import DeviceCertificate

logger = logging.getLogger(__name__)


class Verifiers(Protocol):
    """The verifier of each host that asks for device certificates (``Rules.device_certificates``)."""

    def device_certificate_verifier(self, host: str) -> Verifier | None: ...


class Verifier(Protocol):
    def verify(self, chain: list[bytes], now: datetime) -> DeviceCertificate: ...

    def recheck(self, certificate: DeviceCertificate, now: datetime) -> str | None: ...


def _accept(_connection: SSL.Connection, _certificate: object, _error: int, _depth: int, _ok: int) -> bool:
    """The handshake takes any certificate: the core verifies it afterwards and refuses with a page."""
    return True


class DeviceCertificates:
    def __init__(self, rules: Callable[[], Verifiers], clock: Callable[[], datetime] = utc_now) -> None:
        self._rules = rules  # the rules in force: a reload changes which hosts ask and which CAs they trust
        self._clock = clock
        # the host (SNI) each connection was asked for a certificate for: Routing holds its requests to it
        self._asked: weakref.WeakKeyDictionary[connection.Client, str] = weakref.WeakKeyDictionary()
        self._verdicts: weakref.WeakKeyDictionary[connection.Client, DeviceCertificate] = \
            weakref.WeakKeyDictionary()

    def tls_start_client(self, data: tls.TlsData) -> None:
        """After TlsConfig made the connection: ask this one for a certificate (the context is
        shared between connections, so the connection's own verify mode is set)."""
        client = data.context.client
        if data.ssl_conn is None or not isinstance(client.proxy_mode, ReverseMode):
            return
        host = (client.sni or "").lower().rstrip(".")
        if self._rules().device_certificate_verifier(host) is None:
            return
        data.ssl_conn.set_verify(SSL.VERIFY_PEER, _accept)
        self._asked[client] = host

    def tls_established_client(self, data: tls.TlsData) -> None:
        client = data.context.client
        host = self._asked.get(client)
        if host is None or not client.certificate_list:
            return  # not asked, or no certificate sent: the host's setting decides per request
        verifier = self._rules().device_certificate_verifier(host)
        chain = [certificate.to_cryptography().public_bytes(Encoding.DER) for certificate in client.certificate_list]
        if verifier is None:  # a reload removed the setting during the handshake
            return
        try:
            verdict = verifier.verify(chain, self._clock())
        except Exception:  # an edge: a certificate that could not be read is not believed, never ignored
            logger.exception("device certificate from %s for %s could not be verified", client.peername[0], host)
            verdict = DeviceCertificate(problem="the certificate could not be verified")
        self._verdicts[client] = verdict
        if verdict.problem is not None:
            logger.warning("device certificate from %s for %s not accepted: %s (subject %s, issuer %s, serial %s)",
                           client.peername[0], host, verdict.problem, verdict.subject, verdict.issuer,
                           verdict.serial_number)

    def verdict(self, client: connection.Client) -> tuple[str, DeviceCertificate] | None:
        """The host the connection's certificate was asked for, and the verdict on it."""
        verdict = self._verdicts.get(client)
        host = self._asked.get(client)
        return (host, verdict) if verdict is not None and host is not None else None


class CertificateVerdicts:
    """Each request gets its connection's verdict. After Routing (the host is the SNI's) and before
    AccessGate, which reads it; the TLS hooks run before either, so this is an addon of its own."""

    def __init__(self, certificates: DeviceCertificates, rules: Callable[[], Verifiers],
                 clock: Callable[[], datetime] = utc_now) -> None:
        self._certificates, self._rules, self._clock = certificates, rules, clock

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Every request on the connection, the gateway's own endpoints (sign-in) included."""
        flow_state = state(flow)
        found = self._certificates.verdict(flow.client_conn)
        if found is None or flow.response is not None:
            return
        host, verdict = found
        verifier = self._rules().device_certificate_verifier(host)
        if verifier is None:  # the host no longer asks: the certificate is not read
            return
        if verdict.problem is None:
            problem = verifier.recheck(verdict, self._clock())
            if problem is not None:
                verdict = replace(verdict, problem=problem)
        flow_state.device_certificate = verdict
