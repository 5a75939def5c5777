"""The ASGI protocol, named once (as Starlette does), so addons need not import Starlette; and what
the proxy tells the gateway's own apps about a request besides its HTTP."""

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.policy.model import DeviceCertificate

__all__ = ["DEVICE_CERTIFICATE", "ASGIApp", "device_certificate", "with_device_certificate"]

DEVICE_CERTIFICATE = "portcullis.device_certificate"  # an ASGI scope extension (the connection is the proxy's)


def with_device_certificate(app: ASGIApp, certificate: DeviceCertificate | None) -> ASGIApp:
    """``app`` seeing the connection's device certificate verdict in its scope's extensions."""
    if certificate is None:
        return app

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        await app({**scope, "extensions": {**scope.get("extensions", {}), DEVICE_CERTIFICATE: certificate}},
                  receive, send)

    return wrapped


def device_certificate(scope: Scope) -> DeviceCertificate | None:
    found = scope.get("extensions", {}).get(DEVICE_CERTIFICATE)
    return found if isinstance(found, DeviceCertificate) else None
