"""A local server in Microsoft Graph's shapes for the connector's tests: the v2.0 token endpoint
(client credentials), /deviceManagement/managedDevices with $select (only the properties it
names are answered, as Graph does), $filter on azureADDeviceId, and
/deviceAppManagement/managedAppRegistrations (iOS and Android registrations, appliedPolicies only
with $expand); both paged by @odata.nextLink and throttled (429/503 with Retry-After)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.signals.graph import GraphSettings
from gateway.web.embedded import EmbeddedServer

TENANT = "c0a7e1d5-0000-4000-8000-00000000c0de"
CLIENT_ID = "portcullis-connector"
CLIENT_SECRET = "connector-secret-0123456789"  # a test server's fake credential


def managed_device(index: int, **overrides: Any) -> dict[str, Any]:
    """A managedDevice as Graph v1.0 returns it (the fields the connector selects, plus noise).
    ``id`` is Intune's managed device id; ``serialNumber`` is "" for a device Intune has none of."""
    return {
        "id": f"1b2c3d4e-0000-4000-8000-{index:012d}",
        "azureADDeviceId": f"aa000000-0000-4000-8000-{index:012d}",
        "serialNumber": f"F2LX{index:08d}",
        "imei": f"35 000000 {index:06d} 0",
        "easDeviceId": f"Appl{index:08d}",
        "deviceName": f"Phone {index}",
        "userPrincipalName": f"user{index}@contoso.test",
        "operatingSystem": "iOS",
        "osVersion": "18.1",
        "jailBroken": "False",
        "managedDeviceOwnerType": "company",
        "managementAgent": "mdm",
        "lastSyncDateTime": "2026-11-23T08:00:00Z",
        "complianceState": "compliant",
        "complianceGracePeriodExpirationDateTime": "9999-12-31T23:59:59Z",
        "partnerReportedThreatState": "secured",
        "manufacturer": "Apple",
        "model": "iPhone 16",
        **overrides,
    }


def app_registration(index: int, *, android: bool = False, **overrides: Any) -> dict[str, Any]:
    """A managedAppRegistration as Graph v1.0 returns it (with ``$expand=appliedPolicies``), noise included."""
    kind = "android" if android else "ios"
    identifier = {"@odata.type": "#microsoft.graph.androidMobileAppIdentifier",
                  "packageId": "com.microsoft.office.outlook"} if android else \
        {"@odata.type": "#microsoft.graph.iosMobileAppIdentifier", "bundleId": "com.microsoft.Office.Outlook"}
    return {
        "@odata.type": f"#microsoft.graph.{kind}ManagedAppRegistration",
        "id": f"{kind}-registration-{index}",
        "createdDateTime": "2026-10-01T08:00:00Z",
        "lastSyncDateTime": "2026-11-23T08:00:00Z",
        "applicationVersion": "4.2445.0",
        "managementSdkVersion": "19.6.0",
        "platformVersion": "18.1",
        "deviceType": "iPhone" if not android else "Pixel 9",
        "deviceTag": f"tag-{index}",
        "deviceName": f"Phone {index}",
        "managedDeviceId": None,
        "azureADDeviceId": None,
        "flaggedReasons": [],
        "userId": f"0b000000-0000-4000-8000-{index:012d}",
        "appIdentifier": identifier,
        "version": "3",
        "appliedPolicies": [{"@odata.type": f"#microsoft.graph.{kind}ManagedAppProtection", "id": f"T_{kind}-mail",
                             "displayName": "Mail apps", "description": "", "version": "1",
                             "createdDateTime": "2026-09-01T08:00:00Z", "roleScopeTagIds": ["0"]}],
        **overrides,
    }


def settings(base: str, *, secret: str = CLIENT_SECRET, rate: float = 5) -> GraphSettings:
    return GraphSettings(token_url=f"{base}/{TENANT}/oauth2/v2.0/token", graph_url=f"{base}/v1.0",
                         client_id=CLIENT_ID, client_secret=secret, lookups_per_second=rate)


@dataclass
class GraphState:
    devices: list[dict[str, Any]]
    page_size: int = 2
    throttle: list[int] = field(default_factory=list)  # statuses to answer before the next page
    tokens_issued: int = 0
    requests: list[str] = field(default_factory=list)
    app_registrations: list[dict[str, Any]] = field(default_factory=list)


def _refused(state: GraphState, request: Request) -> JSONResponse | None:
    """Graph's answer before any page: no token (401), or throttled (429/503 with Retry-After)."""
    state.requests.append(str(request.url))
    if not request.headers.get("authorization", "").startswith("Bearer t"):
        return JSONResponse({"error": {"code": "InvalidAuthenticationToken"}}, status_code=401)
    if state.throttle:
        status = state.throttle.pop(0)
        return JSONResponse({"error": {"code": "TooManyRequests"}}, status_code=status,
                            headers={"Retry-After": "0"})
    return None


def _paged(state: GraphState, request: Request, selected: list[dict[str, Any]], context: str) -> JSONResponse:
    start = int(request.query_params.get("$skiptoken", "0"))
    page = selected[start:start + state.page_size]
    if "$select" in request.query_params:
        properties = request.query_params["$select"].split(",")
        page = [{name: item[name] for name in properties if name in item} for item in page]
    body: dict[str, Any] = {"@odata.context": f"https://graph.microsoft.com/v1.0/$metadata#{context}",
                            "value": page}
    if start + state.page_size < len(selected):
        body["@odata.nextLink"] = str(request.url.include_query_params(**{"$skiptoken": start + state.page_size}))
    return JSONResponse(body)


def graph_app(state: GraphState) -> Starlette:
    async def token(request: Request) -> JSONResponse:
        form = await request.form()
        basic = request.headers.get("authorization", "")
        credentials = base64.b64decode(basic.removeprefix("Basic ")).decode() if basic.startswith("Basic ") else \
            f"{form.get('client_id')}:{form.get('client_secret')}"
        if form.get("grant_type") != "client_credentials" or credentials != f"{CLIENT_ID}:{CLIENT_SECRET}":
            return JSONResponse({"error": "invalid_client"}, status_code=401)
        state.tokens_issued += 1
        return JSONResponse({"token_type": "Bearer", "expires_in": 3599, "access_token": f"t{state.tokens_issued}"})

    async def devices(request: Request) -> JSONResponse:
        if (refusal := _refused(state, request)) is not None:
            return refusal
        selected = state.devices
        wanted = request.query_params.get("$filter", "")
        if wanted.startswith("azureADDeviceId eq '"):
            key = wanted.removeprefix("azureADDeviceId eq '").rstrip("'")
            selected = [d for d in selected if d["azureADDeviceId"] == key]
        return _paged(state, request, selected, "deviceManagement/managedDevices")

    async def app_registrations(request: Request) -> JSONResponse:
        if (refusal := _refused(state, request)) is not None:
            return refusal
        selected = state.app_registrations
        if request.query_params.get("$expand") != "appliedPolicies":  # a navigation property: only when expanded
            selected = [{k: v for k, v in r.items() if k != "appliedPolicies"} for r in selected]
        return _paged(state, request, selected, "deviceAppManagement/managedAppRegistrations")

    return Starlette(routes=[
        Route(f"/{TENANT}/oauth2/v2.0/token", token, methods=["POST"]),
        Route("/v1.0/deviceManagement/managedDevices", devices),
        Route("/v1.0/deviceAppManagement/managedAppRegistrations", app_registrations),
    ])


@contextlib.asynccontextmanager
async def serving(state: GraphState) -> AsyncIterator[str]:
    """The Graph-shaped server on a free loopback port; yields its base URL."""
    sock = socket.create_server(("127.0.0.1", 0))
    server = EmbeddedServer(uvicorn.Config(graph_app(state), log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
