"""YAML loading that remembers where every key came from, and pydantic errors phrased as `file:line: key.path: problem`.

Shared by recipes and data cards so both report mistakes the same way.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from align.errors import AlignError

KeyPath = tuple[str | int, ...]


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that records the 1-based line of each mapping key and sequence item."""


def _compose_with_lines(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key_path = (*path, key_node.value)
            lines[key_path] = key_node.start_mark.line + 1
            _compose_with_lines(value_node, key_path, lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*path, index)] = item.start_mark.line + 1
            _compose_with_lines(item, (*path, index), lines)


def load_yaml(path: Path, error: type[AlignError]) -> tuple[Any, dict[KeyPath, int]]:
    """Parse `path`; return the data and a map from key path to line. Raises `error` naming file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read: {exc}") from None
    try:
        node = yaml.compose(text, Loader=_LineLoader)
        data = yaml.load(text, Loader=_LineLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = " ".join(p for p in (exc.context, exc.problem) if p)
        raise error(f"{where}: YAML syntax error: {problem}") from None
    except yaml.YAMLError as exc:
        raise error(f"{path}: YAML error: {exc}") from None
    lines: dict[KeyPath, int] = {}
    if node is not None:
        _compose_with_lines(node, (), lines)
    return data, lines


def format_key_path(path: KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _suggest(model: Any, path: KeyPath) -> str:
    """'did you mean' for an unknown key, looked up in the pydantic model that owns its parent."""
    owner = model
    for part in path[:-1]:
        fields = getattr(owner, "model_fields", None)
        if not fields or part not in fields:
            return ""
        annotation = fields[part].annotation
        owner = next((a for a in getattr(annotation, "__args__", (annotation,)) if hasattr(a, "model_fields")), None)
        if owner is None:
            return ""
    fields = getattr(owner, "model_fields", None) or {}
    known = list(fields) + [f.alias for f in fields.values() if f.alias]
    close = difflib.get_close_matches(str(path[-1]), known, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(sorted(known))})"


def describe_validation_error(
    path: Path, exc: Any, lines: dict[KeyPath, int | str], model: Any, max_errors: int = 5
) -> str:
    """Render a pydantic ValidationError as one line per problem: `file:line: key.path: message`."""
    messages = []
    for err in exc.errors()[:max_errors]:
        loc: KeyPath = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        line = None
        for cut in range(len(loc), 0, -1):
            line = lines.get(loc[:cut])
            if line is not None:
                break
        # Lines are ints for keys read from the file; a string names another origin such as "--set a.b=c".
        where = line if isinstance(line, str) else (f"{path}:{line}" if line else str(path))
        if err["type"] == "extra_forbidden":
            text = f"unknown key{_suggest(model, loc)}"
        elif err["type"] == "missing":
            text = "required key is missing"
        else:
            text = err["msg"]
            shows_input = err["type"] not in ("value_error", "assertion_error")
            if "input" in err and shows_input and not isinstance(err["input"], dict):
                text += f" (got {err['input']!r})"
        messages.append(f"{where}: {format_key_path(loc)}: {text}")
    extra = len(exc.errors()) - max_errors
    if extra > 0:
        messages.append(f"... and {extra} more problem(s)")
    return "\n".join(messages)
