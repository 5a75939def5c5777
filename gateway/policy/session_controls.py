"""Enforcing the session controls of the policies that applied (``blockDownloads``,
``blockUploads``): what counts as a download or an upload. Pure functions; the addons apply them.

- A download is a request to a resource marked ``downloads: true`` (the presets mark SharePoint's
  ``download.aspx`` and OWA's attachment URLs; teams mark their own patterns), or any response
  with ``Content-Disposition: attachment``. Viewing a document in the browser still works.
- An upload is any request with a body (POST, PUT, PATCH; a length or chunked encoding) except
  the small form and JSON posts a web app needs to work (``application/x-www-form-urlencoded``,
  ``application/json`` and ``+json`` types); a ``PUT`` with a body is always an upload.
- A response is a download when its ``Content-Disposition`` is anything but ``inline``, or when
  its type is one a browser saves rather than shows (octet-stream, archives, office documents).
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.policy.model import Restriction, SessionControls

DOWNLOAD_BLOCKED = "downloads are blocked in this session"
UPLOAD_BLOCKED = "uploads are blocked in this session"
REASONS = {Restriction.block_downloads: DOWNLOAD_BLOCKED, Restriction.block_uploads: UPLOAD_BLOCKED}
NEEDS_REVERSE_PROXY = ("{control} applies to this request, and only Portcullis's reverse proxy enforces it; "
                       "this host is decided for an edge proxy (forward-auth), so the request is refused")
# what an edge proxy asking forward-auth cannot do: see a download in the answer, present the client's certificate
EDGE_UNENFORCEABLE = ("blockDownloads", "tokenProtection")


FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "application/json"})
SAVED_TYPES = ("application/octet-stream", "application/zip", "application/x-", "application/vnd.",
               "application/pdf", "application/msword")


def request_restriction(controls: SessionControls, *, method: str, content_type: str, content_length: str,
                        chunked: bool, resources: tuple[str, ...],
                        download_resources: frozenset[str]) -> Restriction | None:
    """The session control that refuses this request, or None (``REASONS`` says why to the user)."""
    if controls.block_downloads and any(r in download_resources for r in resources):
        return Restriction.block_downloads
    if controls.block_uploads and is_upload(method, content_type, content_length, chunked):
        return Restriction.block_uploads
    return None


def edge_unenforceable(controls: SessionControls) -> str | None:
    """The first session control in force that an edge proxy cannot enforce (``EDGE_UNENFORCEABLE``), or None."""
    if controls.block_downloads:
        return "blockDownloads"
    return "tokenProtection" if controls.token_protection else None


def is_upload(method: str, content_type: str, content_length: str, chunked: bool = False) -> bool:
    has_body = chunked or content_length not in ("", "0")
    if not has_body:
        return False
    if method.upper() == "PUT":
        return True
    kind = content_type.split(";")[0].strip().lower()
    return not (kind in FORM_TYPES or kind.endswith("+json"))


def response_restriction(controls: SessionControls, headers: Mapping[str, str]) -> str | None:
    """Why the session may not receive this response, or None."""
    if not controls.block_downloads:
        return None
    disposition = headers.get("content-disposition", "").split(";")[0].strip().lower()
    kind = headers.get("content-type", "").split(";")[0].strip().lower()
    if (disposition and disposition != "inline") or kind.startswith(SAVED_TYPES):
        return DOWNLOAD_BLOCKED
    return None
