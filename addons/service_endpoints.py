"""ServiceEndpoints: the gateway's own HTTP endpoints, served inside the proxy: the MTD webhook and
the upstream assertion JWKS on ``gateway.serviceHost``, and the browser sign-in callback and logout
under ``/.portcullis/`` on each protected host. Routing marks those flows; no policy applies to them
(each endpoint authenticates its callers, or publishes only public keys), and nothing of them is
forwarded upstream."""

from __future__ import annotations

from mitmproxy import http

from addons.flow_state import state
from addons.mitm_internals import serve
from addons.refusals import refuse
from addons.safety import fail_closed
from gateway.decision.service import AccessService
from gateway.web.types import ASGIApp, with_device_certificate


class ServiceEndpoints:
    def __init__(self, service: AccessService, apps: dict[str, ASGIApp]) -> None:
        self.service, self.apps = service, apps

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        kind = state(flow).service
        if not kind or flow.response or flow.error or not flow.live:
            return
        app = self.apps.get(kind)
        host = flow.request.host_header or ""
        if app is None:
            refuse(self.service, flow, 404, "no endpoint of the gateway is configured here", host=host, close=False)
            return
        await serve(with_device_certificate(app, state(flow).device_certificate), flow)
        if flow.response is None:
            refuse(self.service, flow, 500, f"the gateway's {kind} endpoint gave no answer", host=host, close=False)
