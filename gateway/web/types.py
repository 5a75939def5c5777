"""The ASGI protocol, named once (as Starlette does), so addons need not import Starlette."""

from starlette.types import ASGIApp

__all__ = ["ASGIApp"]
