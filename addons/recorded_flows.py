"""Recording traffic for replay, and reading it back.

``FlowRecording`` is mitmproxy's own ``Save`` addon (``save_stream_file``: a flow is written when
its response or error is in), with two changes a gateway needs. The file is created readable by
its owner only, before anything is written: a recording holds bearer tokens and cookies. And flow
metadata is written as plain values only: Portcullis keeps live objects there (the access request
and session controls of an open flow) that mitmproxy's tnetstring writer refuses, which would
make ``Save`` fail on every allowed request.

``read_flow_file`` turns a flow file (recorded here, or by any mitmproxy) into the core's
``RecordedRequest`` values; nothing here decides anything.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from mitmproxy import ctx, exceptions, flowfilter, http, io
from mitmproxy.addons.save import Save
from mitmproxy.flow import Flow
from mitmproxy.io import tnetstring
from mitmproxy.master import Master

from addons.kiosk_proxy import KIOSK_KEY
from addons.routing import HOST_KEY
from addons.safety import ALLOWED_KEY, CORRELATION_KEY
from gateway.headers import CORRELATION_ID
from gateway.identity.browser import COOKIE_NAME
from gateway.replay.recorded import RecordedRequest, Skipped, UnreadableSource

logger = logging.getLogger(__name__)

PLAIN = (str, bool, int, float)
GATEWAY_ANSWERS_UNAUTHENTICATED = (401, 302)  # a 401 challenge, or a browser sent to sign in


class FlowRecording(Save):
    """``Save``, writing a private file with plain metadata."""

    def maybe_rotate_to_new_file(self) -> None:
        path = Path(datetime.today().strftime(os.path.expanduser(ctx.options.save_stream_file.removeprefix("+"))))
        if str(path) != self.current_path:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            path.chmod(0o600)  # an existing file too: it is about to hold tokens
        super().maybe_rotate_to_new_file()
        if self.stream is not None and not isinstance(self.stream, PlainMetadataWriter):
            self.stream = PlainMetadataWriter(self.stream.fo, self.stream.flt)


class PlainMetadataWriter(io.FilteredFlowWriter):
    """Writes a flow with its metadata reduced to strings, numbers and booleans."""

    def add(self, f: Flow) -> None:
        if self.flt and not flowfilter.match(self.flt, f):
            return
        state = f.get_state()
        state["metadata"] = {k: v for k, v in state["metadata"].items() if isinstance(v, PLAIN)}
        tnetstring.dump(state, self.fo)
        self.fo.flush()


def record_flows(master: Master, path: Path) -> None:
    """Record every flow of ``master`` to ``path`` (``+path`` appends)."""
    master.addons.add(FlowRecording())
    master.options.update(save_stream_file=str(path))
    logger.warning("recording every request to %s: it holds bearer tokens and cookies, keep it like a secret", path)


def read_flow_file(path: Path) -> Iterator[RecordedRequest | Skipped]:
    """A damaged or cut-short end (the gateway stopped mid-write) is one counted skip; the flows
    before it are kept. A file with no readable flow at all is an error."""
    count = 0
    with path.open("rb") as file:
        try:
            for flow in io.FlowReader(file).stream():
                count += 1
                yield recorded_request(flow, f"{path}:flow {count}")
        except exceptions.FlowReadException as error:
            if count == 0:
                raise UnreadableSource(f"{path}:flow 1: not a readable mitmproxy flow file ({error})") from error
            yield Skipped(f"{path}:flow {count + 1}", f"unreadable ({error}): the file is cut short or damaged "
                                                      f"there; the {count} flows before it were read")


def recorded_request(flow: Flow, place: str) -> RecordedRequest | Skipped:
    if not isinstance(flow, http.HTTPFlow) or flow.request.method.upper() == "CONNECT":
        return Skipped(place, "not an HTTP request (a tunnel or another protocol)")
    metadata = flow.metadata
    portcullis = CORRELATION_KEY in metadata
    if portcullis and HOST_KEY not in metadata:
        return Skipped(place, "not an access decision (a gateway endpoint, an unprotected kiosk destination, or "
                              "refused before routing)", str(metadata[CORRELATION_KEY]))
    request, headers = flow.request, flow.request.headers
    response = flow.response
    answered = response.status_code if portcullis and response and metadata.get(ALLOWED_KEY) is not True else None
    return RecordedRequest(
        place=place,
        correlation_id=metadata.get(CORRELATION_KEY) or (response.headers.get(CORRELATION_ID) if response else None),
        time=datetime.fromtimestamp(request.timestamp_start, UTC),
        method=request.method.upper(),
        host=str(metadata[HOST_KEY]) if portcullis else request.pretty_host.lower(),
        target=request.path,
        query_recorded=True,
        client_ip=flow.client_conn.peername[0] if flow.client_conn.peername else None,
        user_agent=headers.get("user-agent", ""),
        accepts_html="text/html" in headers.get("accept", "").lower(),
        content_type=headers.get("content-type", ""),
        content_length=headers.get("content-length", ""),
        chunked="chunked" in headers.get("transfer-encoding", "").lower(),
        kiosk=metadata.get(KIOSK_KEY) is True,
        authorization=tuple(headers.get_all("authorization")),
        session_cookie=any(f"{COOKIE_NAME}=" in cookie for cookie in headers.get_all("cookie")),
        authenticated=_authenticated(metadata.get(ALLOWED_KEY) is True, answered),
    )


def _authenticated(allowed: bool, answered: int | None) -> bool | None:
    """Whether the gateway accepted the request's credentials: it forwards or blocks by policy
    (403) only past authentication (a 403 for a path no resource names comes before it, but such
    a request needs no identity under the config it was recorded with)."""
    if allowed or answered == 403:
        return True
    return False if answered in GATEWAY_ANSWERS_UNAUTHENTICATED else None
