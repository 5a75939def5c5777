"""Entra's device filter rules: parsed once at config load, evaluated per request.

Grammar (operators and attribute names case-insensitive, values compared case-insensitively)::

    rule       := term ("-or" term)*
    term       := factor ("-and" factor)*
    factor     := "(" rule ")" | comparison
    comparison := "device." ATTRIBUTE OPERATOR value
    OPERATOR   := -eq -ne -startsWith -notStartsWith -endsWith -notEndsWith
                  -contains -notContains -in -notIn
    value      := "text" | 'text' | True | False | "[" value ("," value)* "]"

Example: ``device.deviceOwnership -eq "Company" -and device.model -startsWith "Surface"``.

Entra: an unregistered device has every attribute null, so positive operators never match it
and negative ones (-ne, -notStartsWith, -notIn, ...) do.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

ATTRIBUTES = (
    "deviceId", "displayName", "deviceOwnership", "isCompliant", "manufacturer", "model",
    "operatingSystem", "operatingSystemVersion", "trustType",
    *(f"extensionAttribute{i}" for i in range(1, 16)),
)
POSITIVE = ("eq", "startsWith", "endsWith", "contains", "in")
NEGATIVE = {"ne": "eq", "notStartsWith": "startsWith", "notEndsWith": "endsWith", "notContains": "contains",
            "notIn": "in"}
OPERATORS = {op.lower(): op for op in (*POSITIVE, *NEGATIVE)}
ATTRIBUTE_NAMES = {a.lower(): a for a in ATTRIBUTES}
TOKEN = re.compile(
    r'\s*(?:(\()|(\))|(\[)|(\])|(,)|"([^"]*)"|\'([^\']*)\'|(-[A-Za-z]+)|([Dd][Ee][Vv][Ii][Cc][Ee]\.[A-Za-z0-9]+)|([A-Za-z]+))'
)

type Value = str | bool | tuple[str | bool, ...]
type DeviceAttributes = Mapping[str, str | bool | None]


@dataclass(frozen=True, slots=True)
class Comparison:
    attribute: str
    operator: str
    value: Value

    def matches(self, device: DeviceAttributes | None) -> bool:
        actual = None if device is None else device.get(self.attribute)
        positive = NEGATIVE.get(self.operator, self.operator)
        result = actual is not None and _compare(positive, actual, self.value)
        return not result if self.operator in NEGATIVE else result


@dataclass(frozen=True, slots=True)
class BooleanRule:
    operator: str  # "and" | "or"
    operands: tuple[Rule, ...]

    def matches(self, device: DeviceAttributes | None) -> bool:
        results = (operand.matches(device) for operand in self.operands)
        return all(results) if self.operator == "and" else any(results)


type Rule = Comparison | BooleanRule


def _compare(operator: str, actual: str | bool, expected: Value) -> bool:
    if isinstance(actual, bool) or isinstance(expected, bool):
        values = expected if isinstance(expected, tuple) else (expected,)
        return any(str(actual).lower() == str(v).lower() for v in values)
    text = actual.lower()
    if operator == "in":
        return isinstance(expected, tuple) and text in {str(v).lower() for v in expected}
    wanted = str(expected).lower()
    return {"eq": text == wanted, "startsWith": text.startswith(wanted), "endsWith": text.endswith(wanted),
            "contains": wanted in text}[operator]


class RuleSyntaxError(ValueError):
    pass


def parse_rule(text: str) -> Rule:
    """Parse a rule; raises RuleSyntaxError saying where and what was expected."""
    parser = _Parser(_tokenize(text))
    rule = parser.rule()
    if (extra := parser.peek()) is not None:
        raise RuleSyntaxError(f"unexpected {extra[1]!r} after a complete rule")
    return rule


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens, position = [], 0
    kinds = ("(", ")", "[", "]", ",", "string", "string", "operator", "attribute", "word")
    while position < len(text.rstrip()):
        match = TOKEN.match(text, position)
        if match is None or match.end() == position:
            at = len(text) - len(text[position:].lstrip())
            raise RuleSyntaxError(f"cannot read the rule at character {at + 1}: {text[at:at + 20]!r}")
        index = next(i for i, group in enumerate(match.groups()) if group is not None)
        tokens.append((kinds[index], match.group(index + 1)))
        position = match.end()
    return tokens


MAX_DEPTH = 16


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.tokens, self.position, self.depth = tokens, 0, 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self, kind: str, what: str) -> str:
        token = self.peek()
        if token is None or token[0] != kind:
            found = "the end of the rule" if token is None else repr(token[1])
            raise RuleSyntaxError(f"expected {what}, found {found}")
        self.position += 1
        return token[1]

    def rule(self) -> Rule:
        return self._joined("-or", self.term)

    def term(self) -> Rule:
        return self._joined("-and", self.factor)

    def _joined(self, keyword: str, operand: Callable[[], Rule]) -> Rule:
        parts = [operand()]
        while (token := self.peek()) is not None and token[0] == "operator" and token[1].lower() == keyword:
            self.position += 1
            parts.append(operand())
        return parts[0] if len(parts) == 1 else BooleanRule(keyword[1:], tuple(parts))

    def factor(self) -> Rule:
        token = self.peek()
        if token is not None and token[0] == "(":
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise RuleSyntaxError(f"parentheses nested deeper than {MAX_DEPTH}")
            self.position += 1
            inner = self.rule()
            self.take(")", "')'")
            self.depth -= 1
            return inner
        attribute = self.take("attribute", "'device.<attribute>'")
        name = ATTRIBUTE_NAMES.get(attribute.split(".", 1)[1].lower())
        if name is None:
            raise RuleSyntaxError(f"{attribute!r} is not a device attribute (allowed: {', '.join(ATTRIBUTES)})")
        operator = self.take("operator", "an operator such as -eq")
        canonical = OPERATORS.get(operator[1:].lower())
        if canonical is None:
            raise RuleSyntaxError(f"{operator!r} is not an operator (allowed: "
                                  f"{', '.join('-' + o for o in OPERATORS.values())})")
        value = self.value()
        if (canonical in ("in", "notIn")) != isinstance(value, tuple):
            raise RuleSyntaxError(f"-{canonical} takes {'a [list]' if canonical in ('in', 'notIn') else 'one value'}")
        return Comparison(name, canonical, value)

    def value(self) -> Value:
        token = self.peek()
        if token is not None and token[0] == "[":
            self.position += 1
            items: list[str | bool] = [self.scalar()]
            while (t := self.peek()) is not None and t[0] == ",":
                self.position += 1
                items.append(self.scalar())
            self.take("]", "']'")
            return tuple(items)
        return self.scalar()

    def scalar(self) -> str | bool:
        token = self.peek()
        if token is not None and token[0] == "string":
            self.position += 1
            return token[1]
        if token is not None and token[0] == "word" and token[1].lower() in ("true", "false"):
            self.position += 1
            return token[1].lower() == "true"
        raise RuleSyntaxError(f"expected a quoted value, True or False, found "
                              f"{'the end of the rule' if token is None else repr(token[1])}")
