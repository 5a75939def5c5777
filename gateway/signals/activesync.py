"""The ActiveSync DeviceId a request names, so it can be bound to the device the token vouches
for: a stolen token must not sync from another phone.

Plain form (MS-ASHTTP): ``/Microsoft-Server-ActiveSync?Cmd=Sync&User=u&DeviceId=ABC&DeviceType=iPhone``.
Base64 form (protocol 12.1+): the whole query is base64 of: version (1 byte), command code (1),
locale (2), DeviceId length (1) + DeviceId, policy key length (1) + key, DeviceType length (1) +
DeviceType, then parameters.
"""

from __future__ import annotations

import base64
import binascii
from urllib.parse import parse_qs


class MalformedActiveSyncQuery(ValueError):
    pass


def activesync_device_ids(target: str) -> set[str]:
    """Every DeviceId the request target names (lower case); empty if it names none. A DeviceId
    that is present but empty is malformed: it must never match a device registered without one."""
    query = target.partition("?")[2]
    if not query:
        return set()
    if "=" in query.rstrip("=") or "&" in query:
        values = parse_qs(query, keep_blank_values=True)
        named = {v.lower() for key, vs in values.items() if key.strip().lower() == "deviceid" for v in vs}
    else:
        named = {_base64_device_id(query)}
    if "" in named:
        raise MalformedActiveSyncQuery("empty DeviceId")
    return named


def _base64_device_id(query: str) -> str:
    try:
        raw = base64.b64decode(query + "=" * (-len(query) % 4), validate=True)
    except (binascii.Error, ValueError) as error:
        raise MalformedActiveSyncQuery("not a base64 ActiveSync query") from error
    if len(raw) < 5 or len(raw) < 5 + raw[4]:
        raise MalformedActiveSyncQuery("base64 ActiveSync query too short for its DeviceId")
    device_id = raw[5:5 + raw[4]]
    text = device_id.decode("ascii", errors="replace")
    return (text if text.isprintable() and "\ufffd" not in text else device_id.hex()).lower()
