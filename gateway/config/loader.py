"""Load a config directory into validated models, reporting every problem as file:line.

ruamel.yaml's round-trip loader remembers where each key and item stood, so a pydantic error
location (``policies[2].state``) can be turned back into ``policies.yaml:14:12``. The YAML is
validated as JSON in strict mode: strings become enums and paths, but ``"8443"`` is not a port.
"""

from __future__ import annotations

import datetime as dt
import difflib
import json
import re
import types
import typing
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

from gateway.errors import ConfigError, ConfigProblem

type Loc = tuple[str | int, ...]


def read_yaml(path: Path, display_name: str) -> tuple[Any, list[ConfigProblem]]:
    """Parse one YAML file; syntax errors become problems with their line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, [ConfigProblem(display_name, None, None, "", "file not found")]
    except (OSError, UnicodeDecodeError) as error:
        return None, [ConfigProblem(display_name, None, None, "", f"cannot read: {error}")]
    try:
        return YAML(typ="rt").load(text), []
    except MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark else None
        column = mark.column + 1 if mark else None
        message = f"invalid YAML: {error.problem or error.context}"
        return None, [ConfigProblem(display_name, line, column, "", message)]


def validate[M: BaseModel](model: type[M], data: Any, display_name: str) -> tuple[M | None, list[ConfigProblem]]:
    """Validate parsed YAML against ``model``; every error is located in the file."""
    if not isinstance(data, dict):
        found = "an empty file" if data is None else "a list" if isinstance(data, list) else f"the value {data!r}"
        return None, [ConfigProblem(display_name, 1, 1, "", f"expected a mapping of keys, found {found}")]
    try:
        return model.model_validate_json(json.dumps(_plain(data)), strict=True), []
    except ValidationError as error:
        problems = [_problem(model, data, display_name, e) for e in error.errors()]
        return None, problems


def locate(data: Any, loc: Loc, display_name: str, message: str, *, at_value: bool = True) -> ConfigProblem:
    """A problem at ``loc`` inside ``data``, with the line and column of the deepest node found."""
    line, column = _position(data, loc, at_value=at_value)
    return ConfigProblem(display_name, line, column, format_loc(loc), message)


def format_loc(loc: Loc) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def raise_if(problems: list[ConfigProblem]) -> None:
    if problems:
        raise ConfigError(problems)


def _plain(node: Any) -> Any:
    """ruamel's node types and YAML timestamps, as plain JSON values."""
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    if isinstance(node, dt.datetime | dt.date):
        return node.isoformat()
    if isinstance(node, bool) or node is None:
        return node
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    return str(node)


def _position(data: Any, loc: Loc, *, at_value: bool) -> tuple[int | None, int | None]:
    node, where = data, None
    for index, part in enumerate(loc):
        last = index == len(loc) - 1
        if isinstance(node, CommentedMap) and part in node:
            where = node.lc.value(part) if (last and at_value) else node.lc.key(part)
            node = node[part]
        elif isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
            where = node.lc.item(part)
            node = node[part]
        else:
            if where is None and isinstance(node, CommentedMap | CommentedSeq):
                where = (node.lc.line, node.lc.col)
            break
    if where is None:
        return None, None
    return where[0] + 1, where[1] + 1


def _problem(model: type[BaseModel], data: Any, display_name: str, error: Any) -> ConfigProblem:
    loc: Loc = tuple(error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = sorted(_keys_at(model, loc[:-1]))
        message = f"unknown key {loc[-1]!r}{suggest(str(loc[-1]), allowed)} (allowed: {', '.join(allowed)})"
        return locate(data, loc, display_name, message, at_value=False)
    if kind == "missing":
        return locate(data, loc[:-1], display_name, f"required key {loc[-1]!r} is missing", at_value=False)
    if kind == "enum":
        allowed = re.findall(r"'([^']*)'", error["ctx"]["expected"])
        value = error["input"]
        message = f"{value!r} is not allowed{suggest(str(value), allowed)} (allowed: {', '.join(allowed)})"
        return locate(data, loc, display_name, message)
    message = error["msg"].removeprefix("Value error, ")
    if kind not in ("value_error", "assertion_error"):
        message += f", got {error['input']!r}" if not isinstance(error["input"], dict | list) else ""
    return locate(data, loc, display_name, message)


def suggest(value: str, allowed: list[str]) -> str:
    same_but_case = [a for a in allowed if a.lower() == value.lower()]
    close = same_but_case or difflib.get_close_matches(value, allowed, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _keys_at(model: type[BaseModel], loc: Loc) -> set[str]:
    """The keys a mapping at ``loc`` accepts, found by walking the model's type annotations."""
    current: Any = model
    for part in loc:
        current = _child_type(current, part)
        if current is None:
            return set()
    model_type = next(_models_in(current), None)
    if model_type is None:
        return set()
    return {field.alias or name for name, field in model_type.model_fields.items()}


def _child_type(annotation: Any, part: str | int) -> Any:
    for model_type in _models_in(annotation):
        for name, field in model_type.model_fields.items():
            if part in (name, field.alias):
                return field.annotation
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _child_type(args[0], part)
    if origin in (list, tuple) and isinstance(part, int):
        return args[0]
    if origin is dict and isinstance(part, str):
        return args[1]
    return None


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, typing.Annotated):
        for arg in typing.get_args(annotation):
            yield from _models_in(arg)


def plain(node: Any) -> Any:
    """Parsed YAML as JSON values (mappings with text keys, lists, times as ISO 8601), for a
    strict pydantic model to read the same way it reads JSON."""
    if isinstance(node, dict):
        return {str(k): plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [plain(v) for v in node]
    if isinstance(node, datetime):
        return node.isoformat()
    return node
