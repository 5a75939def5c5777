"""ServiceEndpoints: the gateway's own HTTP endpoints (the MTD webhook), served inside the proxy
on ``gateway.serviceHost``. Routing marks those flows; no policy applies to them (each endpoint
authenticates its callers), and nothing of them is forwarded upstream."""

from __future__ import annotations

from mitmproxy import http
from mitmproxy.addons.asgiapp import serve

from addons.safety import fail_closed, respond
from gateway.web.types import ASGIApp

SERVICE_KEY = "portcullis.service"


class ServiceEndpoints:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        if not flow.metadata.get(SERVICE_KEY) or flow.response or flow.error or not flow.live:
            return
        await serve(self.app, flow)
        if flow.response is None:
            respond(flow, 500, b'{"error": "internal_error"}', (("Content-Type", "application/json"),))
