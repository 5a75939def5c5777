"""JSON from the network, read one way only: what the gateway reads is what any other reader of
the same bytes (an upstream it forwards a token to, a partner's own tooling) would read.

Python's ``json.loads`` guesses the encoding of bytes (UTF-16 and UTF-32, with or without a
byte-order mark), keeps the last of two members with one name, accepts ``NaN`` and
``Infinity``, and recurses once per nesting level until ``RecursionError``. ``loads`` refuses all
of that, as I-JSON (RFC 7493) asks of a sender:

- UTF-8 only: no byte-order mark, no NUL byte (UTF-16 and UTF-32 text holds them; JSON never
  does), no string holding an unpaired surrogate (``"\\ud800"``).
- No object naming a member twice, at any depth (``{"sub": "a", "sub": "b"}``).
- No ``NaN``, ``Infinity`` or ``-Infinity``.
- At most ``max_depth`` nested arrays and objects, counted by a scan of the brackets outside
  strings *before* the parser recurses (so 20,000 ``[`` costs one linear scan, never a stack).
- At most ``max_bytes`` bytes, where the caller has a bound.

No well-kept library does all of it: pydantic's ``from_json`` (jiter) reads UTF-8 only and
bounds the depth, but keeps the last duplicate; orjson and msgspec keep it too. A refusal is a
``JsonRefused`` (a ``ValueError``) whose message completes "the body ..."; each caller turns it
into its fail-closed answer (401, 400, source unavailable)::

    JsonRefused              not JSON (syntax, NaN), or not an object where one was needed
     ├── NotUtf8Json         another encoding, a byte-order mark, an unpaired surrogate
     ├── DuplicateMember     an object names a member twice
     ├── TooDeep             nested deeper than max_depth
     └── TooLarge            longer than max_bytes
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 32  # Entra tokens, JWKS, Graph pages and MTD pushes nest 4 deep at most
UTF8_BOM = b"\xef\xbb\xbf"
_ESCAPES = re.compile(r"\\.", re.DOTALL)  # a backslash outside a string is where the parser stops
_NOT_BRACKETS = re.compile(r"[^\[\]{}]++")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class JsonRefused(ValueError):
    """The document has no single reading; the message says why, without quoting it."""


class NotUtf8Json(JsonRefused):
    pass


class DuplicateMember(JsonRefused):
    pass


class TooDeep(JsonRefused):
    pass


class TooLarge(JsonRefused):
    pass


def loads(data: bytes | str, *, max_depth: int = MAX_DEPTH, max_bytes: int | None = None) -> Any:
    """The one reading of ``data`` (see the module docstring), or ``JsonRefused``."""
    text = _utf8_text(data, max_bytes)
    _check_depth(text, max_depth)
    value = _parse(text)
    if _SURROGATE_ESCAPE.search(text) and _holds_unpaired_surrogate(value):
        raise NotUtf8Json("is not UTF-8: a string holds an unpaired surrogate")
    return value


def _utf8_text(data: bytes | str, max_bytes: int | None) -> str:
    """The document as text, if it is UTF-8 (and small enough) as bytes."""
    if isinstance(data, str):
        try:
            data = data.encode()
        except UnicodeEncodeError:
            raise NotUtf8Json("is not UTF-8: it holds an unpaired surrogate") from None
    if max_bytes is not None and len(data) > max_bytes:
        raise TooLarge(f"is larger than {max_bytes} bytes")
    if data.startswith(UTF8_BOM):
        raise NotUtf8Json("is not UTF-8 JSON: it starts with a byte-order mark")
    if b"\x00" in data:
        raise NotUtf8Json("is not UTF-8 JSON: it holds NUL bytes (UTF-16 or UTF-32?)")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise NotUtf8Json("is not UTF-8") from None


def _parse(text: str) -> Any:
    """``json.loads`` refusing duplicate members and NaN/Infinity, its errors as ``JsonRefused``."""
    try:
        return json.loads(text, object_pairs_hook=_members_named_once, parse_constant=_no_constant)
    except JsonRefused:
        raise
    except json.JSONDecodeError as error:
        raise JsonRefused(f"is not JSON ({error.msg} at character {error.pos})") from None
    except ValueError:  # an integer longer than Python's int digit limit
        raise JsonRefused("is not JSON (a number too long to read)") from None


def _check_depth(text: str, max_depth: int) -> None:
    """The nesting the parser would reach, counted on the brackets outside strings: without the
    escapes (``\\"`` ends no string), every quote opens or closes one, so the pieces between quotes
    alternate outside and inside. Three passes in C and a loop over the brackets alone."""
    if text.count("[") + text.count("{") <= max_depth:
        return
    depth = 0
    unescaped = _ESCAPES.sub("", text) if "\\" in text else text
    outside_strings = "".join(unescaped.split('"')[::2])  # an unterminated string runs to the end
    for bracket in _NOT_BRACKETS.sub("", outside_strings):
        depth += 1 if bracket in "[{" else -1
        if depth > max_depth:
            raise TooDeep(f"is nested deeper than {max_depth} levels")


def _members_named_once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    members = dict(pairs)
    if len(members) != len(pairs):
        raise DuplicateMember("names a member twice in one object")
    return members


def _no_constant(name: str) -> Any:
    raise JsonRefused(f"is not JSON ({name} is no JSON number)")


def _holds_unpaired_surrogate(value: Any) -> bool:
    """Python joins escaped pairs into one character, so a surrogate left in a string is unpaired."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if not item.isascii() and _unencodable(item):
                return True
        elif isinstance(item, dict):
            pending += item.keys()
            pending += item.values()
        elif isinstance(item, list):
            pending += item
    return False


def _unencodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False
