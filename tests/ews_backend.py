"""A small Exchange Web Services backend for the real-client tests (issue 15): a real HTTP/1.1
server on 127.0.0.1 that answers ``POST /EWS/Exchange.asmx`` with the SOAP shapes Exchange 2016
sends (Microsoft's EWS reference, and what exchangelib parses) for GetFolder, FindItem,
ResolveNames, Subscribe and GetStreamingEvents, and records every request it received.

GetStreamingEvents is answered as Exchange does: ``Transfer-Encoding: chunked``, one whole SOAP
envelope per chunk, the connection held open between them, a last envelope saying
``ConnectionStatus Closed``. Its pace is the test's: see ``NotificationStream``.
"""

from __future__ import annotations

import threading
import uuid
import xml.etree.ElementTree as ET  # parses only what the test's own client sent
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from xml.sax.saxutils import escape

SOAP = "http://schemas.xmlsoap.org/soap/envelope/"
MESSAGES = "http://schemas.microsoft.com/exchange/services/2006/messages"
TYPES = "http://schemas.microsoft.com/exchange/services/2006/types"
EWS_PATH = "/EWS/Exchange.asmx"
BODY_LIMIT = 1024 * 1024  # a SOAP request larger than this is not one the tests send

# What the mailbox holds: the tests compare what exchangelib returns with these.
ROOT_ID, INBOX_ID = "AAMkAGRvb3Q=", "AAMkAGluYm94"
INBOX_MESSAGES = (("AAMkAG1lc3NhZ2Ux", "Quarterly numbers", "casey@contoso.test"),
                  ("AAMkAG1lc3NhZ2Uy", "Lunch on Friday?", "drew@contoso.test"))
DIRECTORY = (("Alex Wilber", "alex@contoso.test"), ("Alex Kim", "alex.kim@contoso.test"))


@dataclass(frozen=True)
class EwsCall:
    """One request as the backend received it: the SOAP operation, the HTTP headers (names in
    lower case) and the body."""

    operation: str
    headers: dict[str, str]
    body: bytes


@dataclass
class NotificationStream:
    """The events the next GetStreamingEvents answer sends, one NewMailEvent per chunk.

    Event ``n + 1`` is sent when the test calls ``release()``, having seen event ``n``; without it,
    after ``interval`` seconds (Exchange's own pace), so that a gateway holding the answer back still
    sees it end. ``sent`` says how many events have left the backend (counted before each is
    written), so a client can tell which events had been sent when it received one."""

    count: int = 3
    interval: float = 1.0
    sent: int = 0
    _released: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))

    def release(self) -> None:
        self._released.release()

    def wait_for_release(self) -> None:
        self._released.acquire(timeout=self.interval)


def item_id(number: int) -> str:
    """The ItemId of the message event ``number`` announces."""
    return f"AAMkAGV2ZW50{number:04d}"


def _envelope(body: str) -> bytes:
    return ('<?xml version="1.0" encoding="utf-8"?>'
            f'<s:Envelope xmlns:s="{SOAP}"><s:Header>'
            '<h:ServerVersionInfo MajorVersion="15" MinorVersion="1" MajorBuildNumber="2507" MinorBuildNumber="6" '
            f'Version="V2017_07_11" xmlns:h="{TYPES}" xmlns="{TYPES}"/></s:Header>'
            f'<s:Body><m:{body}</s:Body></s:Envelope>').encode()


def _response(operation: str, *messages: str) -> bytes:
    """``<m:{operation}Response>`` with one ``{operation}ResponseMessage`` per message content."""
    wrapped = "".join(f'<m:{operation}ResponseMessage ResponseClass="Success"><m:ResponseCode>NoError'
                      f'</m:ResponseCode>{content}</m:{operation}ResponseMessage>' for content in messages)
    return _envelope(f'{operation}Response xmlns:m="{MESSAGES}" xmlns:t="{TYPES}">'
                     f'<m:ResponseMessages>{wrapped}</m:ResponseMessages></m:{operation}Response>')


def _folder(requested: ET.Element) -> str:
    distinguished = requested.get("Id", "")
    folder_id, name, kind = (INBOX_ID, "Inbox", "IPF.Note") if distinguished == "inbox" else (ROOT_ID, "Top of "
                                                                                              "Information Store", "")
    folder_class = f"<t:FolderClass>{kind}</t:FolderClass>" if kind else ""
    return (f'<m:Folders><t:Folder><t:FolderId Id="{folder_id}" ChangeKey="AQAAABYAAAA="/>{folder_class}'
            f"<t:DisplayName>{name}</t:DisplayName><t:TotalCount>{len(INBOX_MESSAGES)}</t:TotalCount>"
            "<t:ChildFolderCount>0</t:ChildFolderCount><t:UnreadCount>1</t:UnreadCount></t:Folder></m:Folders>")


def get_folder(request: ET.Element) -> bytes:
    ids = request.find(f"{{{MESSAGES}}}FolderIds")
    return _response("GetFolder", *(_folder(requested) for requested in (ids if ids is not None else ())))


def _message(message_id: str, subject: str, sender: str) -> str:
    return (f'<t:Message><t:ItemId Id="{message_id}" ChangeKey="CQAAABYAAAA="/><t:Subject>{escape(subject)}</t:Subject>'
            f"<t:From><t:Mailbox><t:EmailAddress>{sender}</t:EmailAddress><t:RoutingType>SMTP</t:RoutingType>"
            "</t:Mailbox></t:From></t:Message>")


def find_item(_request: ET.Element) -> bytes:
    items = "".join(_message(*message) for message in INBOX_MESSAGES)
    return _response("FindItem", f'<m:RootFolder IndexedPagingOffset="{len(INBOX_MESSAGES)}" '
                                 f'TotalItemsInView="{len(INBOX_MESSAGES)}" IncludesLastItemInRange="true">'
                                 f"<t:Items>{items}</t:Items></m:RootFolder>")


def get_item(request: ET.Element) -> bytes:
    """The messages FindItem listed, by ItemId (exchangelib fetches the fields FindItem did not return)."""
    messages = {message[0]: message for message in INBOX_MESSAGES}
    wanted = [i.get("Id", "") for i in request.iter(f"{{{TYPES}}}ItemId")]
    return _response("GetItem", *(f"<m:Items>{_message(*messages[i])}</m:Items>" for i in wanted if i in messages))


def resolve_names(request: ET.Element) -> bytes:
    wanted = (request.findtext(f"{{{MESSAGES}}}UnresolvedEntry") or "").lower()
    found = [(name, address) for name, address in DIRECTORY if wanted in name.lower() or wanted in address]
    resolutions = "".join(f"<t:Resolution><t:Mailbox><t:Name>{escape(name)}</t:Name><t:EmailAddress>{address}"
                          "</t:EmailAddress><t:RoutingType>SMTP</t:RoutingType><t:MailboxType>Mailbox"
                          "</t:MailboxType></t:Mailbox></t:Resolution>" for name, address in found)
    return _response("ResolveNames", f'<m:ResolutionSet TotalItemsInView="{len(found)}" '
                                     f'IncludesLastItemInRange="true">{resolutions}</m:ResolutionSet>')


def subscribe(_request: ET.Element) -> bytes:
    return _response("Subscribe", f"<m:SubscriptionId>{uuid.uuid4()}</m:SubscriptionId>")


def unsubscribe(_request: ET.Element) -> bytes:
    return _response("Unsubscribe", "")


def streaming_envelope(subscription_id: str, *, event: int | None = None, status: str | None = None) -> bytes:
    """One GetStreamingEvents envelope: a NewMailEvent for ``event``, or only a ``status``."""
    notification = "" if event is None else (
        f"<m:Notifications><m:Notification><t:SubscriptionId>{escape(subscription_id)}</t:SubscriptionId>"
        f"<t:NewMailEvent><t:TimeStamp>2026-01-15T09:00:{event % 60:02d}Z</t:TimeStamp>"
        f'<t:ItemId Id="{item_id(event)}" ChangeKey="CQAAAA=="/><t:ParentFolderId Id="{INBOX_ID}" '
        'ChangeKey="AQAAAA=="/></t:NewMailEvent></m:Notification></m:Notifications>')
    connection = "" if status is None else f"<m:ConnectionStatus>{status}</m:ConnectionStatus>"
    return _response("GetStreamingEvents", notification + connection)


ANSWERS = {"GetFolder": get_folder, "FindItem": find_item, "GetItem": get_item, "ResolveNames": resolve_names,
           "Subscribe": subscribe, "Unsubscribe": unsubscribe}


class EwsBackend:
    """Stands in for Exchange's EWS endpoint, on a port of its own; ``calls`` lists what it received.
    The next GetStreamingEvents answer follows ``stream``."""

    def __init__(self) -> None:
        self.calls: list[EwsCall] = []
        self.stream = NotificationStream()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def operations(self) -> list[str]:
        with self._lock:
            return [call.operation for call in self.calls]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _received(self, call: EwsCall) -> None:
        with self._lock:
            self.calls.append(call)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        return type("Exchange", (ExchangeHandler,), {"backend": self})


class ExchangeHandler(BaseHTTPRequestHandler):
    """Exchange's EWS endpoint, answering for ``backend``."""

    backend: EwsBackend
    protocol_version = "HTTP/1.1"  # keep-alive, and chunked answers

    def do_POST(self) -> None:
        declared = self.headers.get("Content-Length", "")
        if self.path.split("?", 1)[0].lower() != EWS_PATH.lower():
            self._plain(404, b"not an EWS path")
        elif not declared.isdigit() or int(declared) > BODY_LIMIT:
            self._plain(411, b"a declared Content-Length is required")
        else:
            self._answer(self.rfile.read(int(declared)))

    def _answer(self, body: bytes) -> None:
        envelope_body = ET.fromstring(body).find(f"{{{SOAP}}}Body")  # noqa: S314  (the test's own client)
        operation = envelope_body[0] if envelope_body is not None and len(envelope_body) else None
        name = operation.tag.rsplit("}", 1)[-1] if operation is not None else ""
        self.backend._received(EwsCall(name, {k.lower(): v for k, v in self.headers.items()}, body))
        if operation is None or (name not in ANSWERS and name != "GetStreamingEvents"):
            self._plain(400, f"unexpected EWS operation {name!r}".encode())
        elif name == "GetStreamingEvents":
            self._stream(operation.findtext(f".//{{{TYPES}}}SubscriptionId") or "")
        else:
            answer = ANSWERS[name](operation)
            self.send_response(200)
            self.send_header("Content-Type", "text/xml; charset=utf-8")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

    def _stream(self, subscription_id: str) -> None:
        """One envelope per chunk, flushed as it is made; the events are paced by the test."""
        stream = self.backend.stream
        self.send_response(200)
        self.send_header("Content-Type", "text/xml; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._chunk(streaming_envelope(subscription_id, status="OK"))
        for event in range(1, stream.count + 1):
            stream.sent = event
            self._chunk(streaming_envelope(subscription_id, event=event))
            stream.wait_for_release()
        self._chunk(streaming_envelope(subscription_id, status="Closed"))
        self._chunk(b"")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _plain(self, status: int, text: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)

    def log_message(self, *_: object) -> None:
        pass
