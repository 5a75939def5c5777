"""One canonical path per request target, used to match resources.

A target whose meaning could differ between the gateway and the upstream is refused (None, the
caller answers 400) rather than guessed at: encoded slashes or backslashes, double encoding,
dot segments, empty segments, trailing dots or spaces (IIS strips them), control characters,
``;`` path parameters (Tomcat and Jetty read ``/owa/..;/ecp`` as ``/ecp``), bytes that are not
UTF-8 (overlong forms such as ``%c0%ae`` included), and non-ASCII letters whose case mapping is
ASCII (``ſ`` upper-cases to ``S``, the Kelvin sign lower-cases to ``k``), which would let a
case-insensitive upstream see another resource.

The target itself must be ASCII without spaces or a fragment (``#``): raw bytes above 0x7E, such
as an unencoded overlong ``\\xc0\\xae``, are decoded differently by each server. An encoded ``?``
(``%3f``) is refused: a proxy or rewrite rule that decodes the path before splitting off the
query would cut the path short, and a shorter path can match another resource. Compatibility
forms that Windows' best-fit mapping turns into ASCII (fullwidth ``．``, ``／``, ``＼``) are checked
as that ASCII too: no separator and no dot segment may appear that way (other fullwidth punctuation,
common in CJK file names, stays usable).

Exchange's explicit logon (ProxyShell, ProxyNotShell) rewrites the URL when Autodiscover's
``Email`` parameter names ``autodiscover.json``: ``/autodiscover/autodiscover.json?@x/mapi/nspi/``
then reaches ``/mapi/nspi/`` behind a rule matched for Autodiscover. A query naming
``autodiscover.json`` in any encoding, or a segment that extends it (``autodiscover.json@x``), is
refused under ``/autodiscover/``.

What is left decodes one way only, so matching the decoded path and forwarding the original
target address the same resource.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import unquote

ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
TARGET_CHARACTERS = re.compile(r"[!-~]+")  # visible ASCII: what RFC 3986 allows unencoded, and more
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
EXPLICIT_LOGON = "autodiscover.json"
MAX_QUERY_DECODINGS = 8  # ``%25`` nested deeper than this is refused, not decoded further


def canonical_path(target: str) -> str | None:
    """The decoded path of an origin-form target (``/a/b?q``), or None if it is ambiguous."""
    if not TARGET_CHARACTERS.fullmatch(target) or "#" in target:
        return None
    path, _, query = target.partition("?")
    if not path.startswith("/") or any(c in path for c in "\\;") or BAD_ESCAPE.search(path):
        return None
    try:
        decoded = unquote(path, errors="strict") if "%" in path else path
    except UnicodeDecodeError:
        return None
    plain = decoded.isascii()  # most paths: no case folding onto ASCII, NFKC leaves them as they are
    if ";" in decoded or "?" in decoded or (not plain and any(_folds_to_ascii(c) for c in decoded if not c.isascii())):
        return None
    if ESCAPE.search(decoded) or "\\" in decoded or "%2f" in path.lower() or CONTROL.search(decoded):
        return None
    if not _plain_segments(decoded) or _explicit_logon(decoded, query):
        return None
    if plain:
        return decoded
    folded = unicodedata.normalize("NFKC", decoded)
    if folded != decoded and (any(folded.count(c) != decoded.count(c) for c in "/\\")
                              or not _plain_segments(folded)):
        return None
    return decoded


def _plain_segments(decoded: str) -> bool:
    """No dot segments, no empty segment but the last, nothing a server strips from a segment's end."""
    segments = decoded.split("/")[1:]
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment in (".", "..") or (segment == "" and not last):
            return False
        if segment.endswith((".", " ")):
            return False
    return True


def _explicit_logon(decoded: str, query: str) -> bool:
    """The shapes Exchange's explicit-logon rewrite reads as another path (see the module docstring).
    Only under ``/autodiscover/``, its entry point: elsewhere the name is just a name (a SharePoint
    file ``autodiscover.json.bak``, a search for it)."""
    if decoded.lower().split("/")[1] != "autodiscover":
        return False
    if any(EXPLICIT_LOGON in segment and segment != EXPLICIT_LOGON for segment in decoded.lower().split("/")):
        return True
    for _ in range(MAX_QUERY_DECODINGS):
        if EXPLICIT_LOGON in query.lower():
            return True
        decoded_query = unquote(query.replace("+", " "))
        if decoded_query == query:
            return False
        query = decoded_query
    return True  # still encoded after several rounds: nobody legitimate nests encodings this deep


def _folds_to_ascii(char: str) -> bool:
    """A one-to-one case mapping onto ASCII, as char-by-char comparisons (.NET, Java) apply it.
    Multi-character mappings (``ß`` -> ``SS``) are not applied by them, so such names stay usable."""
    if char == "\u0130":  # İ: its simple lower-case mapping is ASCII i
        return True
    return any(len(mapped) == 1 and mapped.isascii() for mapped in (char.upper(), char.lower(), char.casefold()))
