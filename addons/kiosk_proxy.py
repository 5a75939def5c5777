"""KioskProxy: the forward proxy kiosk browsers are configured with. For each CONNECT it asks the
core whether the destination is intercepted (a protected host, or one the config allows), passed
through untouched (``ignore_hosts``, e.g. the identity provider), or refused (403)."""

from __future__ import annotations

from mitmproxy import http
from mitmproxy.proxy.mode_specs import RegularMode

from addons.safety import fail_closed, respond
from gateway.access import AccessService

KIOSK_KEY = "portcullis.kiosk"


def is_kiosk(flow: http.HTTPFlow) -> bool:
    return isinstance(flow.client_conn.proxy_mode, RegularMode)


class KioskProxy:
    def __init__(self, service: AccessService) -> None:
        self.service = service

    @fail_closed
    async def http_connect(self, flow: http.HTTPFlow) -> None:
        if not is_kiosk(flow) or flow.response:
            return
        if self.service.kiosk_destination(flow.request.host.lower().rstrip(".")) == "deny":
            respond(flow, 403, b'{"error": "destination_not_allowed"}', (("Content-Type", "application/json"),))
