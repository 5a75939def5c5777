"""One canonical path per request target, used to match resources.

A target whose meaning could differ between the gateway and the upstream is refused (None, the
caller answers 400) rather than guessed at: encoded slashes or backslashes, double encoding,
dot segments, empty segments, trailing dots or spaces (IIS strips them), control characters,
``;`` path parameters (Tomcat and Jetty read ``/owa/..;/ecp`` as ``/ecp``), bytes that are not
UTF-8, and non-ASCII letters whose case mapping is ASCII (``ſ`` upper-cases to ``S``, the Kelvin
sign lower-cases to ``k``), which would let a case-insensitive upstream see another resource.
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
    if not path.startswith("/") or any(c in path for c in "#\\;") or BAD_ESCAPE.search(path):
        return None
    try:
        decoded = unquote(path, errors="strict") if "%" in path else path
    except UnicodeDecodeError:
        return None
    if ";" in decoded or any(_folds_to_ascii(c) for c in decoded if not c.isascii()):
        return None
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


def _folds_to_ascii(char: str) -> bool:
    """A one-to-one case mapping onto ASCII, as char-by-char comparisons (.NET, Java) apply it.
    Multi-character mappings (``ß`` -> ``SS``) are not applied by them, so such names stay usable."""
    if char == "\u0130":  # İ: its simple lower-case mapping is ASCII i
        return True
    return any(len(mapped) == 1 and mapped.isascii() for mapped in (char.upper(), char.lower(), char.casefold()))
