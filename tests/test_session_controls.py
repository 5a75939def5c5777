"""Session controls enforced through the real listener: a kiosk account (group kiosk-users in the
demo policies) reads pages, but downloads and uploads are replaced by a page saying why."""

from __future__ import annotations

import pytest

from tests.conftest import Gateway
from tests.helpers.session_controls import BROWSER, docs


@pytest.mark.parametrize("path", ["/_layouts/15/download.aspx?UniqueId=1",
                                  "/sites/team/_layouts/15/download.aspx?UniqueId=1"])
def test_download_urls_are_refused_for_the_session(gateway: Gateway, path: str) -> None:
    blocked = docs(gateway, path, kiosk=True, headers=BROWSER)
    assert blocked.status_code == 403
    assert "This file can't be saved here" in blocked.text
    assert "content-disposition" not in blocked.headers
    record = gateway.decision(blocked.headers["x-portcullis-correlation-id"])
    assert (record["result"], record["status"]["failureReason"]) == ("block", "downloads are blocked in this session")
    assert record["enforcedSessionControls"] == ["blockDownloads", "blockUploads"]


def test_an_attachment_from_an_ordinary_url_is_replaced_before_it_reaches_the_client(gateway: Gateway) -> None:
    replaced = docs(gateway, "/sites/team/Shared%20Documents/report.docx?download=1", kiosk=True, headers=BROWSER)
    assert replaced.status_code == 403
    assert "content-disposition" not in replaced.headers
    assert b"demo document bytes" not in replaced.content
    assert "This file can't be saved here" in replaced.text
    assert int(replaced.headers["content-length"]) == len(replaced.content)


def test_viewing_still_works_for_the_session(gateway: Gateway) -> None:
    page = docs(gateway, "/sites/team/", kiosk=True, headers=BROWSER)
    assert page.status_code == 200 and page.json()["backend"] == "sharepoint"


def test_other_sessions_download(gateway: Gateway) -> None:
    for path in ("/_layouts/15/download.aspx?UniqueId=1", "/sites/team/report.docx?download=1"):
        response = docs(gateway, path, kiosk=False)
        assert response.status_code == 200
        assert response.headers["content-disposition"].startswith("attachment")


def _chunks() -> object:
    yield b"secret "
    yield b"plans"


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [pytest.param("POST", {"files": {"file": ("a.txt", b"secret plans")}}, id="multipart"),
     pytest.param("PUT", {"content": b"secret plans", "headers": {"Content-Type": "application/octet-stream"}},
                  id="PUT"),
     pytest.param("PATCH", {"content": b"secret plans", "headers": {"Content-Type": "text/plain"}}, id="PATCH"),
     pytest.param("POST", {"content": b"secret plans", "headers": {"Content-Type": "application/octet-stream"}},
                  id="raw POST"),
     pytest.param("POST", {"content": b"--b\r\n", "headers": {"Content-Type": "multipart/related; boundary=b"}},
                  id="multipart/related"),
     pytest.param("PUT", {"content": _chunks, "headers": {"Content-Type": "application/octet-stream"}},
                  id="chunked PUT")],
)
def test_uploads_are_refused_for_the_session_only(gateway: Gateway, method: str, kwargs: dict[str, object]) -> None:
    if callable(kwargs.get("content")):
        kwargs = {**kwargs, "content": kwargs["content"]()}  # a fresh generator per request
    refused = docs(gateway, "/sites/team/Shared%20Documents/", kiosk=True, method=method, **kwargs)
    if callable(kwargs.get("content")) or hasattr(kwargs.get("content"), "__next__"):
        kwargs = {**kwargs, "content": _chunks()}
    assert refused.status_code == 403 and refused.json()["error_description"] == "uploads are blocked in this session"
    allowed = docs(gateway, "/sites/team/Shared%20Documents/", kiosk=False, method=method, **kwargs)
    assert allowed.status_code == 200 and allowed.json()["receivedHeaders"]["x-demo-body-bytes"] != "0"


def test_a_json_post_is_not_an_upload(gateway: Gateway) -> None:
    answer = docs(gateway, "/_api/web/lists", kiosk=True, method="POST", json={"query": "inbox"})
    assert answer.status_code == 200


@pytest.mark.parametrize("query", ["download=1", "download=1&disposition=ATTACHMENT",
                                   "download=1&disposition=x-unknown-type"])
def test_attachments_in_any_spelling_are_replaced(gateway: Gateway, query: str) -> None:
    answer = docs(gateway, f"/sites/team/report.docx?{query}", kiosk=True)
    assert answer.status_code == 403 and b"demo document bytes" not in answer.content
