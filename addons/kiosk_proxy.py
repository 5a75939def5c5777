"""KioskProxy: the forward proxy kiosk browsers are configured with. For each CONNECT it asks the
core whether the destination is intercepted (a protected host, or one the config allows), passed
through untouched (``ignore_hosts``, e.g. the identity provider), or refused (403)."""

from __future__ import annotations

from mitmproxy import http, tls
from mitmproxy.proxy.mode_specs import RegularMode

from addons.refusals import refuse
from addons.safety import fail_closed
from gateway.decision.service import AccessService


def is_kiosk(flow: http.HTTPFlow) -> bool:
    return isinstance(flow.client_conn.proxy_mode, RegularMode)


class KioskProxy:
    def __init__(self, service: AccessService) -> None:
        self.service = service

    @fail_closed
    async def http_connect(self, flow: http.HTTPFlow) -> None:
        if not is_kiosk(flow) or flow.response:
            return
        host = flow.request.host.lower().rstrip(".")
        if self.service.rules.router.kiosk_destination(host, flow.request.port) == "deny":
            refuse(self.service, flow, 403, "the kiosk proxy does not allow this destination",
                   host=host, close=False, error="destination_not_allowed")

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        """Pass-through is decided by the CONNECT target alone (never by SNI or Host): only an
        exact ``passThrough`` host:port is tunnelled without interception."""
        if not isinstance(data.context.client.proxy_mode, RegularMode) or data.context.server.address is None:
            return
        host, port = data.context.server.address
        if self.service.rules.router.kiosk_destination(str(host).lower(), int(port)) == "pass":
            data.ignore_connection = True


def connect_target(flow: http.HTTPFlow) -> tuple[str, int] | None:
    """The destination the kiosk CONNECTed to (for requests inside the tunnel)."""
    address = flow.server_conn.address
    return (str(address[0]).lower().rstrip("."), int(address[1])) if address else None
