"""Matching the request against policy assignments: resources and client app types.

No I/O here. Paths arrive canonical (see ``gateway.paths``); matching is case-insensitive
because Exchange and SharePoint run on IIS, where ``/OWA/`` and ``/owa/`` are the same page.
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.config.models import Include, Resource
from gateway.policy.model import AccessRequest, ClientAppType, Identity

ALL = "All"
ACTIVESYNC_PATH = "/microsoft-server-activesync"


def path_has_prefix(path: str, prefix: str) -> bool:
    """Prefix match on whole segments: ``/owa/`` matches ``/owa`` and ``/owa/x``, not ``/owax``."""
    path, base = path.lower(), prefix.lower().rstrip("/")
    return path == base or path.startswith(base + "/")


def match_resource(resources: Mapping[str, Resource], host: str, path: str) -> str | None:
    """The named resource for host + path, the longest matching prefix winning; None if none."""
    best: tuple[int, str] | None = None
    for name, resource in resources.items():
        if resource.host != host:
            continue
        for prefix in resource.paths:
            if path_has_prefix(path, prefix) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), name)
    return best[1] if best else None


def resource_not_included(assignment: Include, resource: str) -> str | None:
    """Why the resource is outside the assignment (exclude beats include), or None if inside."""
    if resource in assignment.exclude or ALL in assignment.exclude:
        return f"resource {resource!r} is excluded"
    if resource in assignment.include or ALL in assignment.include:
        return None
    return f"resource {resource!r} is not included"


def client_app_type(request: AccessRequest, identity: Identity | None) -> ClientAppType:
    """Entra's client app types, worked out from the request. The ActiveSync URL and a modern-auth
    client id are strong signals; a browser is recognised by what it asks for."""
    if path_has_prefix(request.path, ACTIVESYNC_PATH):
        return ClientAppType.exchange_active_sync
    if request.accepts_html and "mozilla/" in request.user_agent.lower():
        return ClientAppType.browser
    if identity is not None and identity.client_id:
        return ClientAppType.mobile_apps_and_desktop_clients
    return ClientAppType.other
