"""``portcullis import entra`` and ``portcullis export entra``: Graph ``conditionalAccessPolicy``
JSON into policies.yaml and back. The mapping and its safety rule live in gateway/config/entra.py;
this module reads and writes the files and reports what was left out."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from gateway.config import POLICIES_FILE, Config, load_config
from gateway.config.entra import (
    Dropped,
    Imported,
    Names,
    ShapeError,
    export_policy,
    graph_policies,
    import_policies,
    names_for,
)
from gateway.config.loader import raise_if, read_yaml, validate
from gateway.config.models import PoliciesFile
from gateway.errors import ConfigError, ConfigProblem
from gateway.http import strict_json
from gateway.terminal import printable

MAX_GRAPH_FILE_BYTES = 32 * 1024 * 1024  # thousands of policies; Entra allows 195 per tenant
MAX_GRAPH_DEPTH = 16  # a policy nests 5 deep (value[].conditions.users.includeUsers[])


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    importing = commands.add_parser("import", help="import policies from another system").add_subparsers(
        required=True, metavar="SOURCE")
    source = importing.add_parser("entra", help="Graph conditionalAccessPolicy JSON into policies.yaml")
    source.add_argument("file", type=Path, metavar="POLICIES.json",
                        help="GET /identity/conditionalAccess/policies, the portal's download, or one policy")
    source.add_argument("--config", type=Path, required=True, help="config directory")
    source.add_argument("--out", type=Path, help=f"policies file to add them to (default: the config's "
                                                 f"{POLICIES_FILE})")
    source.add_argument("--dry-run", action="store_true", help="print the policies file instead of writing it")
    source.add_argument("--approved-apps", type=_names, metavar="APP[,APP]",
                        help="the config's applications that Entra's approvedApplication stands for")
    _naming_options(source)
    source.set_defaults(command=_import)
    exporting = commands.add_parser("export", help="export policies for another system").add_subparsers(
        required=True, metavar="TARGET")
    target = exporting.add_parser("entra", help="policies.yaml as Graph conditionalAccessPolicy JSON")
    target.add_argument("--config", type=Path, required=True, help="config directory")
    target.add_argument("--out", type=Path, help="JSON file to write (default: standard output)")
    _naming_options(target)
    target.set_defaults(command=_export)


def _naming_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--map", action="append", default=[], type=_mapping, metavar="ID=NAME[,NAME]",
                        help="a cloud app id and the resources it stands for (empty: not behind this gateway), or a "
                             "named location id and its named location (repeatable)")
    parser.add_argument("--locations", type=Path, metavar="NAMED_LOCATIONS.json",
                        help="GET /identity/conditionalAccess/namedLocations: ids matched to namedLocations by "
                             "display name (\"Head office\" is head-office)")


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _mapping(text: str) -> tuple[str, list[str]]:
    graph_id, equals, names = text.partition("=")
    if not equals or not graph_id.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected ID=NAME[,NAME] (or ID= for an app not behind the "
                                         "gateway)")
    return graph_id.strip(), _names(names)


def read_graph_json(path: Path) -> Any:
    """The JSON document, or a ConfigError at file:line:column (syntax) or at the file (the rest)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError([ConfigProblem(str(path), None, None, "", f"cannot read: {error.strerror or error}")]) \
            from None
    try:
        return strict_json.loads(data, max_depth=MAX_GRAPH_DEPTH, max_bytes=MAX_GRAPH_FILE_BYTES)
    except strict_json.JsonRefused as refused:
        line, column = _syntax_error_at(data)
        raise ConfigError([ConfigProblem(str(path), line, column, "", f"the file {refused}")]) from None


def _syntax_error_at(data: bytes) -> tuple[int | None, int | None]:
    try:
        json.loads(data.decode("utf-8", errors="replace"))
    except json.JSONDecodeError as error:
        return error.lineno, error.colno
    except (ValueError, RecursionError):  # not a syntax error: no position to give
        pass
    return None, None


def _graph_policies(path: Path) -> list[dict[str, Any]]:
    try:
        return graph_policies(read_graph_json(path))
    except ShapeError as error:
        raise ConfigError([ConfigProblem(str(path), 1, 1, "", str(error))]) from None


def _names_of(config: Config, args: argparse.Namespace, approved: list[str] | None = None) -> Names:
    locations = graph_named_locations(args.locations) if args.locations else []
    named = {*config.gateway_file.named_locations, *([config.gateway_file.kiosk.location] if config.gateway_file.kiosk
                                                      else [])}
    try:
        return names_for(config.resources, named, dict(args.map), locations, approved,
                         config.gateway_file.applications, config.gateway_file.authentication_strengths)
    except ValueError as error:
        raise ConfigError([ConfigProblem("command line", None, None, "", str(error))]) from None


def graph_named_locations(path: Path) -> list[dict[str, Any]]:
    """Graph's namedLocations answer (``{"value": [...]}`` or a list), each with an id and displayName."""
    document = read_graph_json(path)
    locations = document.get("value") if isinstance(document, dict) else document
    if not isinstance(locations, list) or not all(isinstance(item, dict) for item in locations):
        raise ConfigError([ConfigProblem(str(path), 1, 1, "", "expected Graph namedLocations JSON: "
                                                             "{\"value\": [{\"id\": ..., \"displayName\": ...}]}")])
    return locations


def _import(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    names = _names_of(config, args, args.approved_apps)
    out = args.out or args.config / POLICIES_FILE
    document = _policies_document(out)
    existing = [str(p.get("name")) for p in document["policies"] if isinstance(p, dict)]
    imported = import_policies(_graph_policies(args.file), names, existing)
    for result in imported:
        if result.policy is not None:
            _append(document["policies"], result)
    text = _yaml_text(document)
    _, problems = validate(PoliciesFile, _yaml().load(text), str(out))  # read back as the gateway will read it
    raise_if(problems)
    _report(imported)
    if args.dry_run:
        sys.stdout.write(text)
    else:
        _write_atomically(out, text)
        print(f"wrote {out}", file=sys.stderr)
    return 0


def _policies_document(path: Path) -> CommentedMap:
    """The policies file as ruamel reads it (comments kept), or a new one; its list in block style."""
    if not path.exists():
        document = CommentedMap()
        document["policies"] = CommentedSeq()
        return document
    _, problems = read_yaml(path, str(path))  # syntax errors at their line
    raise_if(problems)
    data = _yaml().load(path)
    if not isinstance(data, CommentedMap) or not isinstance(data.get("policies", []), list):
        raise ConfigError([ConfigProblem(str(path), 1, 1, "", "expected a mapping with a 'policies' list")])
    policies = data.get("policies") or CommentedSeq()
    if not isinstance(policies, CommentedSeq) or policies.fa.flow_style():
        block = CommentedSeq(policies)
        data["policies"] = block
    return data


def _append(policies: CommentedSeq, result: Imported) -> None:
    assert result.policy is not None  # only written policies are appended
    policies.append(_commented(result.policy))
    origin = f"From Entra policy {result.graph_id or '(no id)'}: {result.display_name!r}, state {result.graph_state}"
    lines = [origin]
    if result.dropped:
        lines.append(f"Written {result.policy['state']}, never enforced: Portcullis cannot express")
        lines += [f"  {dropped}" for dropped in result.dropped]
    # the text comes from the JSON: a line break in a name or key must not end the comment
    policies.yaml_set_comment_before_after_key(len(policies) - 1, before="\n".join(map(printable, lines)), indent=2)


def _commented(value: Any) -> Any:
    if isinstance(value, dict):
        node = CommentedMap()
        for key, item in value.items():
            node[key] = _commented(item)
        return node
    if isinstance(value, list):
        sequence = CommentedSeq(_commented(item) for item in value)
        if all(not isinstance(item, dict | list) for item in value):
            sequence.fa.set_flow_style()
        return sequence
    return value


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True  # the policies already in the file stay as written
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 120
    return yaml


def _yaml_text(document: CommentedMap) -> str:
    stream = io.StringIO()
    _yaml().dump(document, stream)
    return stream.getvalue()


def _write_atomically(path: Path, text: str) -> None:
    """A gateway reloading the file sees the old one or the new one, never half of it."""
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.",
                                     delete=False) as file:
        file.write(text)
    os.replace(file.name, path)


def _report(imported: list[Imported]) -> None:
    for result in imported:
        source = f"{result.display_name!r} ({result.graph_id or 'no id'}, {result.graph_state})"
        if result.policy is None:
            line = f"skipped {source}:"
        elif result.dropped:
            line = f"imported {source} as {result.name}, {result.policy['state']} because:"
        else:
            line = f"imported {source} as {result.name}, {result.policy['state']}"
        print(printable(line), file=sys.stderr)
        _print_dropped(result.dropped)


def _print_dropped(dropped: tuple[Dropped, ...]) -> None:
    for item in dropped:
        print(printable(f"  {item}"), file=sys.stderr)


def _export(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    names = _names_of(config, args)
    exported = [export_policy(policy, names) for policy in config.policies]
    for result in exported:
        if result.policy is None:
            print(f"not exported {result.name}: it applies to no Entra cloud app", file=sys.stderr)
        elif result.dropped:
            print(f"exported {result.name} as {result.policy['state']} because Graph cannot express:", file=sys.stderr)
        _print_dropped(result.dropped)
    text = json.dumps({"value": [r.policy for r in exported if r.policy is not None]}, indent=2) + "\n"
    if args.out:
        _write_atomically(args.out, text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
