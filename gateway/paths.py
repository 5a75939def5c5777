"""One canonical path per request target, used to match resources.

A target whose meaning could differ between the gateway and the upstream is refused (None, the
caller answers 400) rather than guessed at: encoded slashes or backslashes, double encoding,
dot segments, empty segments, trailing dots or spaces (IIS strips them), control characters.
What is left decodes one way only, so matching the decoded path and forwarding the original
target address the same resource.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def canonical_path(target: str) -> str | None:
    """The decoded path of an origin-form target (``/a/b?q``), or None if it is ambiguous."""
    path = target.split("?", 1)[0]
    if not path.startswith("/") or "#" in path or "\\" in path or BAD_ESCAPE.search(path):
        return None
    decoded = unquote(path, errors="strict") if "%" in path else path
    if ESCAPE.search(decoded) or any(c in decoded for c in "\\\x00") or "%2f" in path.lower():
        return None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
        return None
    segments = decoded.split("/")[1:]
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment in (".", "..") or (segment == "" and not last):
            return None
        if segment.endswith((".", " ")):
            return None
    return decoded
