"""ServiceEndpoints: the gateway's own HTTP endpoints, served inside the proxy: the MTD webhook and
the upstream assertion JWKS on ``gateway.serviceHost``, and the browser sign-in callback and logout
under ``/.portcullis/`` on each protected host. Routing marks those flows; no policy applies to them
(each endpoint authenticates its callers, or publishes only public keys), and nothing of them is
forwarded upstream."""

from __future__ import annotations

from mitmproxy import http

from addons.flow_state import state
from addons.mitm_internals import serve
from addons.safety import fail_closed, respond
from gateway.web.types import ASGIApp


class ServiceEndpoints:
    def __init__(self, apps: dict[str, ASGIApp]) -> None:
        self.apps = apps

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        kind = state(flow).service
        if not kind or flow.response or flow.error or not flow.live:
            return
        app = self.apps.get(kind)
        if app is None:
            respond(flow, 404, b'{"error": "not_found"}', (("Content-Type", "application/json"),))
            return
        await serve(app, flow)
        if flow.response is None:
            respond(flow, 500, b'{"error": "internal_error"}', (("Content-Type", "application/json"),))
