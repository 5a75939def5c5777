"""Recording traffic for replay, and reading it back.

``FlowRecording`` is mitmproxy's own ``Save`` addon (``save_stream_file``: a flow is written when
its response or error is in), with two changes a gateway needs. The file is private: a recording
holds bearer tokens and cookies, so it is created readable by its owner only, and an existing file
is written only if it is already a regular file of this user that no one else may read (never
through a symbolic link). And flow
metadata is written as plain values only: Portcullis keeps its notes on a flow in one live object
(``addons/flow_state.py``: the access request and session controls of an open flow among them)
that mitmproxy's tnetstring writer refuses, which would make ``Save`` fail on every allowed
request. The recording gets the notes replay reads instead, as plain values under their own keys
(``RECORDED_*``, the keys recordings have always had).

``read_flow_file`` turns a flow file (recorded here, or by any mitmproxy) into the core's
``RecordedRequest`` values; nothing here decides anything.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from io import BufferedReader
from pathlib import Path
from typing import Any, BinaryIO

from mitmproxy import exceptions, http, io
from mitmproxy.addons.save import Save
from mitmproxy.flow import Flow
from mitmproxy.master import Master

from addons.flow_state import FLOW_STATE_KEY, FlowState
from addons.mitm_internals import SaveStreamFile
from gateway.http.headers import CORRELATION_ID
from gateway.identity.browser import COOKIE_NAME
from gateway.replay.recorded import RecordedRequest, Skipped, UnreadableSource

logger = logging.getLogger(__name__)

PLAIN = (str, bool, int, float)
GATEWAY_ANSWERS_UNAUTHENTICATED = (401, 302)  # a 401 challenge, or a browser sent to sign in

# A recording's plain metadata: the flow's notes (``FlowState``) that ``recorded_request`` reads back.
RECORDED_CORRELATION_ID = "portcullis.correlation_id"  # present: the gateway saw the request
RECORDED_HOST = "portcullis.host"  # the protected host it was routed to (absent: not an access decision)
RECORDED_ALLOWED = "portcullis.allowed"  # True: forwarded
RECORDED_CLIENT_IP = "portcullis.client_ip"  # the address decided for
RECORDED_KIOSK = "portcullis.kiosk"  # True: through the kiosk forward proxy


class RecordingRefused(OSError):
    """The recording file may not be written: the message says why (an ``OSError``, so that
    mitmproxy's ``Save`` reports it as an option error at start, and stops on it at a rotation)."""


class FlowRecording(SaveStreamFile, Save):
    """``Save``, writing a private file with plain metadata."""

    def open_stream_file(self, path: Path, *, append: bool) -> BinaryIO:
        return open_private(path, append=append)

    def flow_state(self, flow: Flow) -> dict[str, Any]:
        """The flow with its metadata reduced to strings, numbers and booleans."""
        saved = flow.get_state()
        notes = saved["metadata"].get(FLOW_STATE_KEY)
        saved["metadata"] = {k: v for k, v in saved["metadata"].items() if isinstance(v, PLAIN)}
        if isinstance(notes, FlowState):
            saved["metadata"].update(recorded_notes(notes))
        return saved


def recorded_notes(notes: FlowState) -> dict[str, str | bool]:
    """What replay reads of the gateway's notes on a flow, under the keys it reads them by."""
    recorded: dict[str, str | bool] = {RECORDED_ALLOWED: notes.allowed, RECORDED_KIOSK: notes.kiosk}
    for key, value in ((RECORDED_CORRELATION_ID, notes.correlation_id), (RECORDED_HOST, notes.host),
                       (RECORDED_CLIENT_IP, notes.client_ip)):
        if value is not None:
            recorded[key] = value
    return recorded


def open_private(path: Path, *, append: bool) -> BinaryIO:
    """``path`` for writing, created with mode 0600; an existing file must be a regular file owned
    by this user with no group or other permissions. A symbolic link is never followed."""
    flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_APPEND if append else 0)
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)  # O_EXCL: a symlink, even dangling, exists
    except FileExistsError:
        try:
            fd = os.open(path, flags | os.O_NONBLOCK)  # O_NONBLOCK: a FIFO does not hang the start
        except OSError as error:
            why = "it is a symbolic link" if error.errno == errno.ELOOP else error.strerror
            raise RecordingRefused(f"cannot record to {path}: {why}") from None
        try:
            _check_private(os.fstat(fd), path)
            if not append:
                os.ftruncate(fd, 0)
        except BaseException:
            os.close(fd)
            raise
    except OSError as error:
        raise RecordingRefused(f"cannot record to {path}: {error.strerror}") from None
    return os.fdopen(fd, "ab" if append else "wb")


def _check_private(status: os.stat_result, path: Path) -> None:
    if not stat.S_ISREG(status.st_mode):
        raise RecordingRefused(f"cannot record to {path}: not a regular file")
    if status.st_uid != os.geteuid():
        raise RecordingRefused(f"cannot record to {path}: it is owned by uid {status.st_uid}, not by this user "
                               f"(uid {os.geteuid()}); a recording holds bearer tokens, remove it or name another")
    if status.st_mode & 0o077:
        raise RecordingRefused(f"cannot record to {path}: its mode {stat.S_IMODE(status.st_mode):04o} lets others "
                               "read or write it; a recording holds bearer tokens: chmod 600 it, or remove it")


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
            # not a BinaryIO: a file-like object, which FlowReader reads through peek and read (mitm_internals, 14)
            for flow in io.FlowReader(BoundedFlowFile(file)).stream():  # type: ignore[arg-type]
                count += 1
                place = f"{path}:flow {count}"
                try:
                    item = recorded_request(flow, place)
                except (LookupError, TypeError, ValueError, AttributeError, ArithmeticError, OSError,
                        RecursionError) as error:  # the flow's values are the sender's
                    item = Skipped(place, f"flow not readable: {_short(error)}")
                yield item
        except (exceptions.FlowReadException, LookupError, TypeError, ValueError, AttributeError, ArithmeticError,
                RecursionError) as error:  # mitmproxy passes on what its tnetstring and state readers raise
            if count == 0:
                raise UnreadableSource(f"{path}:flow 1: not a readable mitmproxy flow file ({_short(error)})") \
                    from error
            yield Skipped(f"{path}:flow {count + 1}", f"unreadable ({_short(error)}): the file is cut short or "
                                                      f"damaged there; the {count} flows before it were read")


class FlowTooLong(exceptions.FlowReadException):
    """A record claims more bytes than the file has left."""


class BoundedFlowFile:
    """A flow file as mitmproxy's ``FlowReader`` reads it, refusing a read past the file's end:
    its tnetstring reader allocates the length a record claims (up to 10^12 bytes) before reading,
    so a damaged or hostile length prefix would be a ``MemoryError`` rather than a damaged flow."""

    def __init__(self, file: BufferedReader) -> None:
        self.file = file
        status = os.fstat(file.fileno())
        self.size = status.st_size if stat.S_ISREG(status.st_mode) else None

    def peek(self, n: int) -> bytes:
        return self.file.peek(n)

    def read(self, n: int = -1) -> bytes:
        if self.size is not None and n > 1 and n > (left := self.size - self.file.tell()):
            raise FlowTooLong(f"a record claims {n} bytes, the file has {max(left, 0)} left")
        return self.file.read(n)

    def tell(self) -> int:
        return self.file.tell()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.file.seek(offset, whence)


def _short(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error).strip() else type(error).__name__
    return text[:200]


def recorded_request(flow: Flow, place: str) -> RecordedRequest | Skipped:
    if not isinstance(flow, http.HTTPFlow) or flow.request.method.upper() == "CONNECT":
        return Skipped(place, "not an HTTP request (a tunnel or another protocol)")
    metadata = flow.metadata
    portcullis = RECORDED_CORRELATION_ID in metadata
    if portcullis and RECORDED_HOST not in metadata:
        return Skipped(place, "not an access decision (a gateway endpoint, an unprotected kiosk destination, or "
                              "refused before routing)", str(metadata[RECORDED_CORRELATION_ID]))
    request, headers = flow.request, flow.request.headers
    response = flow.response
    answered = response.status_code if portcullis and response and metadata.get(RECORDED_ALLOWED) is not True else None
    return RecordedRequest(
        place=place,
        correlation_id=metadata.get(RECORDED_CORRELATION_ID) or (
            response.headers.get(CORRELATION_ID) if response else None),
        time=datetime.fromtimestamp(request.timestamp_start, UTC),
        method=request.method.upper(),
        host=str(metadata[RECORDED_HOST]) if portcullis else request.pretty_host.lower(),
        target=request.path,
        query_recorded=True,
        client_ip=metadata.get(RECORDED_CLIENT_IP) or (
            flow.client_conn.peername[0] if flow.client_conn.peername else None),
        user_agent=headers.get("user-agent", ""),
        accepts_html="text/html" in headers.get("accept", "").lower(),
        content_type=headers.get("content-type", ""),
        content_length=headers.get("content-length", ""),
        chunked="chunked" in headers.get("transfer-encoding", "").lower(),
        kiosk=metadata.get(RECORDED_KIOSK) is True,
        authorization=tuple(headers.get_all("authorization")),
        session_cookie=any(f"{COOKIE_NAME}=" in cookie for cookie in headers.get_all("cookie")),
        authenticated=_authenticated(metadata.get(RECORDED_ALLOWED) is True, answered),
    )


def _authenticated(allowed: bool, answered: int | None) -> bool | None:
    """Whether the gateway accepted the request's credentials: it forwards or blocks by policy
    (403) only past authentication (a 403 for a path no resource names comes before it, but such
    a request needs no identity under the config it was recorded with)."""
    if allowed or answered == 403:
        return True
    return False if answered in GATEWAY_ANSWERS_UNAUTHENTICATED else None
