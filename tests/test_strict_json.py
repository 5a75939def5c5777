"""gateway.http.strict_json: one reading of JSON from the network, each refusal next to the twin that
is still read. The callers' answers (401, 400, 503) are tested through the real listeners in
tests/test_security_tokens.py, tests/test_mtd_webhook.py and tests/test_security_signals.py."""

from __future__ import annotations

import json

import pytest

from gateway.http.strict_json import MAX_DEPTH, DuplicateMember, JsonRefused, NotUtf8Json, TooDeep, TooLarge, loads

CLAIMS = {"sub": "alex", "azp": "outlook", "deviceid": "3c5f", "amr": ["pwd"], "cnf": {"x5t#S256": "abc"}}
TEXT = json.dumps(CLAIMS)


@pytest.mark.parametrize(("data", "refused"), [
    pytest.param(TEXT.encode(), None, id="twin: UTF-8"),
    pytest.param(json.dumps({"upn": "zoë@contoso.test"}, ensure_ascii=False).encode(), None,
                 id="twin: UTF-8 beyond ASCII"),
    pytest.param(TEXT, None, id="twin: a str"),
    pytest.param(b"\xef\xbb\xbf" + TEXT.encode(), NotUtf8Json, id="UTF-8 with a byte-order mark"),
    pytest.param("\ufeff" + TEXT, NotUtf8Json, id="a str with a byte-order mark"),
    pytest.param(TEXT.encode("utf-16"), NotUtf8Json, id="UTF-16 with its byte-order mark"),
    pytest.param(TEXT.encode("utf-16-le"), NotUtf8Json, id="UTF-16-LE, no byte-order mark"),
    pytest.param(TEXT.encode("utf-16-be"), NotUtf8Json, id="UTF-16-BE, no byte-order mark"),
    pytest.param(TEXT.encode("utf-32"), NotUtf8Json, id="UTF-32 with its byte-order mark"),
    pytest.param(TEXT.encode("utf-32-le"), NotUtf8Json, id="UTF-32-LE, no byte-order mark"),
    pytest.param('{"upn": "zoë"}'.encode("latin-1"), NotUtf8Json, id="Latin-1"),
    pytest.param(b'{"sub": "a\xc0\xafb"}', NotUtf8Json, id="an overlong UTF-8 sequence"),
    pytest.param(b'{"sub": "\xed\xa0\x80"}', NotUtf8Json, id="a surrogate encoded in UTF-8"),
    pytest.param(b'{"sub": "\\ud800"}', NotUtf8Json, id="an escaped unpaired high surrogate"),
    pytest.param(b'{"sub": ["x", "\\udc00"]}', NotUtf8Json, id="an escaped unpaired low surrogate in a list"),
    pytest.param(b'{"\\ud800": 1}', NotUtf8Json, id="an unpaired surrogate in a member name"),
    pytest.param(b'{"sub": "\\ud83d\\ude00"}', None, id="twin: an escaped surrogate pair"),
    pytest.param(b'{"sub": "\\\\ud800"}', None, id="twin: an escaped backslash before ud800"),
    pytest.param('{"sub": "a\udc80"}', NotUtf8Json, id="a str holding a lone surrogate"),
])
def test_only_utf8_json_is_read(data: bytes | str, refused: type[JsonRefused] | None) -> None:
    read_as_python_reads_it_or_refused(data, refused)


def read_as_python_reads_it_or_refused(data: bytes | str, refused: type[JsonRefused] | None) -> None:
    if refused is None:
        assert loads(data) == json.loads(data)
    else:
        with pytest.raises(refused):
            loads(data)


@pytest.mark.parametrize(("text", "refused"), [
    pytest.param('{"azp": "a", "sub": "b"}', None, id="twin: each member once"),
    pytest.param('{"azp": "evil", "azp": "outlook"}', DuplicateMember, id="azp twice"),
    pytest.param('{"sub": "alex", "sub": "ceo"}', DuplicateMember, id="sub twice"),
    pytest.param('{"deviceid": "x", "sub": "a", "deviceid": "y"}', DuplicateMember, id="deviceid twice, apart"),
    pytest.param('{"sub": "a", "s\\u0075b": "b"}', DuplicateMember, id="twice, once escaped"),
    pytest.param('{"sub": "a", "sub": "a"}', DuplicateMember, id="twice with the same value"),
    pytest.param('{"cnf": {"jkt": "a", "jkt": "b"}}', DuplicateMember, id="twice in a nested object"),
    pytest.param('[{"a": 1}, {"a": 2}]', None, id="twin: one name in two objects"),
    pytest.param('[{"a": 1, "a": 2}]', DuplicateMember, id="twice in an object in a list"),
    pytest.param('{"Sub": "a", "sub": "b"}', None, id="twin: names differing in case are two names"),
])
def test_a_member_named_twice_is_refused(text: str, refused: type[JsonRefused] | None) -> None:
    read_as_python_reads_it_or_refused(text.encode(), refused)


@pytest.mark.parametrize(("text", "refused"), [
    pytest.param("[" * MAX_DEPTH + "]" * MAX_DEPTH, False, id="twin: at the bound"),
    pytest.param("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), True, id="one level past the bound"),
    pytest.param("[" * 20_000, True, id="20,000 [ unclosed"),
    pytest.param("[" * 20_000 + "]" * 20_000, True, id="20,000 [ closed"),
    pytest.param('{"a":' * 20_000 + "1" + "}" * 20_000, True, id="20,000 objects"),
    pytest.param(json.dumps({"s": "[" * 20_000}), False, id="twin: 20,000 [ inside a string"),
    pytest.param(json.dumps({"s": '\\"' + "[" * 20_000}), False, id="twin: brackets after an escaped quote"),
    pytest.param("[" * 20 + '"unterminated' + "[" * 20_000, False, id="brackets after an unterminated string"),
])
def test_nesting_is_bounded_before_the_parser_recurses(text: str, refused: bool) -> None:
    """Never a RecursionError: too deep is TooDeep, anything else the parser's own refusal."""
    if refused:
        with pytest.raises(TooDeep):
            loads(text.encode())
        return
    try:
        assert loads(text.encode()) == json.loads(text)
    except TooDeep:
        pytest.fail("refused as too deep although it is not")
    except JsonRefused as error:
        assert "is not JSON" in str(error)


def test_the_depth_bound_is_the_callers() -> None:
    assert loads(b"[[[]]]", max_depth=3) == [[[]]]
    with pytest.raises(TooDeep):
        loads(b"[[[[]]]]", max_depth=3)


@pytest.mark.parametrize("text", [
    pytest.param("NaN", id="NaN"),
    pytest.param('{"exp": Infinity}', id="Infinity"),
    pytest.param("[-Infinity]", id="-Infinity"),
    pytest.param("9" * 5000, id="5,000 digits"),
    pytest.param("{'sub': 'a'}", id="single quotes"),
    pytest.param('{"sub": "a",}', id="trailing comma"),
    pytest.param("", id="empty"),
    pytest.param('{"sub": "a"} {"sub": "b"}', id="two documents"),
    pytest.param('{"sub": "a\nb"}', id="a raw newline in a string"),
])
def test_what_is_not_json_is_refused(text: str) -> None:
    with pytest.raises(JsonRefused, match="is not JSON"):
        loads(text.encode())


def test_a_number_too_large_for_a_double_reads_as_infinity_as_json_allows() -> None:
    """No refusal: RFC 8259 leaves the range of numbers to the reader (the token rules refuse a
    time claim that is not finite, as pyjwt does)."""
    assert loads(b"1e400") == float("inf")


def test_a_size_bound_is_applied_when_given() -> None:
    assert loads(b"[1, 2]", max_bytes=6) == [1, 2]
    with pytest.raises(TooLarge):
        loads(b"[1, 2] ", max_bytes=6)


def test_a_refusal_never_quotes_the_document() -> None:
    for data in (b'{"\x1b[31mred": 1, "\x1b[31mred": 2}', b'{"x": "\x1b[31m', b"\xff\x1b[31m"):
        with pytest.raises(JsonRefused) as refused:
            loads(data)
        assert "\x1b" not in str(refused.value) and "red" not in str(refused.value)
