"""ServerNames: the TLS listener serves only the certificates it is configured with.

mitmproxy's TlsConfig signs a certificate on the spot, with the CA in its confdir, for any server
name no ``certs`` entry matches. The gateway listener must not: a client asking for a name the
gateway has no certificate for (or for none at all) has its handshake ended without any
certificate: OpenSSL fails it (no shared cipher) and mitmproxy closes the connection (it does not
flush OpenSSL's alert). The kiosk's interception of protected hosts (a forward proxy) still
gets TlsConfig's certificates. Must run before TlsConfig's ``tls_start_client``.
"""

from __future__ import annotations

import logging

from mitmproxy import tls
from mitmproxy.proxy.mode_specs import RegularMode
from OpenSSL import SSL

logger = logging.getLogger(__name__)


class ServerNames:
    def __init__(self, hosts: list[str]) -> None:
        self.hosts = frozenset(host.lower().rstrip(".") for host in hosts)

    def tls_start_client(self, data: tls.TlsData) -> None:
        """Fails closed by itself (``fail_closed`` guards flows and clients, not handshakes): a
        check that raises refuses the handshake, it never leaves TlsConfig to mint a certificate."""
        try:
            refusal = self.refusal(data)
        except Exception:  # an edge: log, then refuse
            logger.exception("TLS server-name check failed; refusing the handshake")
            refusal = "the server-name check failed"
        if refusal is None:
            return
        # No certificate at all: OpenSSL fails the handshake, and TlsConfig (which returns when a
        # connection is already set) mints nothing. Set before the log line, which could fail too.
        connection = SSL.Connection(SSL.Context(SSL.TLS_SERVER_METHOD))
        connection.set_accept_state()
        data.ssl_conn = connection
        logger.warning("TLS handshake from %s refused: %s", data.context.client.peername[0], refusal)

    def refusal(self, data: tls.TlsData) -> str | None:
        """Why this handshake gets no certificate; None for a configured name (or the kiosk)."""
        client = data.context.client
        if data.ssl_conn is not None or isinstance(client.proxy_mode, RegularMode):
            return None
        name = (client.sni or "").lower().rstrip(".")
        if name in self.hosts or f"*.{name.partition('.')[2]}" in self.hosts:  # mitmproxy's certs take wildcards
            return None
        return f"no certificate is configured for server name {name!r}" if name \
            else "the client sent no server name (SNI)"
