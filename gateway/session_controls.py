"""Enforcing the session controls of the policies that applied (``blockDownloads``,
``blockUploads``): what counts as a download or an upload. Pure functions; the addons apply them.

- A download is a request to a resource marked ``downloads: true`` (the presets mark SharePoint's
  ``download.aspx`` and OWA's attachment URLs; teams mark their own patterns), or any response
  with ``Content-Disposition: attachment``. Viewing a document in the browser still works.
- An upload is a ``multipart/form-data`` body, or a ``PUT`` with a body.
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.policy.model import SessionControls

DOWNLOAD_BLOCKED = "downloads are blocked in this session"
UPLOAD_BLOCKED = "uploads are blocked in this session"


def request_restriction(controls: SessionControls, *, method: str, content_type: str, content_length: str,
                        resources: tuple[str, ...], download_resources: frozenset[str]) -> str | None:
    """Why the session may not make this request, or None."""
    if controls.block_downloads and any(r in download_resources for r in resources):
        return DOWNLOAD_BLOCKED
    if controls.block_uploads and is_upload(method, content_type, content_length):
        return UPLOAD_BLOCKED
    return None


def is_upload(method: str, content_type: str, content_length: str) -> bool:
    if content_type.split(";")[0].strip().lower() == "multipart/form-data":
        return True
    return method.upper() == "PUT" and content_length not in ("", "0")


def response_restriction(controls: SessionControls, headers: Mapping[str, str]) -> str | None:
    """Why the session may not receive this response, or None."""
    disposition = headers.get("content-disposition", "").split(";")[0].strip().lower()
    if controls.block_downloads and disposition == "attachment":
        return DOWNLOAD_BLOCKED
    return None
