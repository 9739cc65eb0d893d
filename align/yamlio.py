"""YAML loading that remembers where every key came from, and pydantic errors phrased as `file:line: key.path: problem`.

Shared by recipes and data cards so both report mistakes the same way.
"""

from __future__ import annotations

import difflib
import reprlib
from pathlib import Path
from typing import Any

import yaml

from align.errors import AlignError
from align.redaction import REDACTED, is_secret_path, redact_override

KeyPath = tuple[str | int, ...]


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that records the 1-based line of each mapping key and sequence item."""


# Bounds on what one YAML document may expand to: aliases can make a few lines stand for billions of values
# ("billion laughs"), and deep nesting exhausts the recursion of every reader after the parser.
MAX_EXPANDED_NODES = 100_000
MAX_DEPTH = 64


class YamlShapeError(ValueError):
    """A document that parses but that align refuses: a duplicated key, too many values, too deep."""

    def __init__(self, problem: str, line: int | None = None) -> None:
        super().__init__(problem)
        self.problem, self.line = problem, line


def _expanded_size(node: yaml.Node, sizes: dict[int, int], depth: int = 0) -> int:
    """How many values `node` stands for once every alias is expanded (memoised per node, so a document built
    to explode is measured in linear time), refusing nesting deeper than MAX_DEPTH on the way."""
    if depth > MAX_DEPTH:
        raise YamlShapeError(f"nested more than {MAX_DEPTH} levels deep", node.start_mark.line + 1)
    if id(node) not in sizes:
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        sizes[id(node)] = 1 + sum(_expanded_size(child, sizes, depth + 1) for child in children)
    return sizes[id(node)]


def _compose_with_lines(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int], seen: set[int]) -> None:
    """Record the line of every key and item; refuse a key given twice in one mapping (YAML keeps the last one
    silently). Each node is walked once, however many aliases point at it."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_line: dict[Any, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in first_line:
                    raise YamlShapeError(f"key '{key_node.value}' is given twice (first on line "
                                         f"{first_line[key_node.value]}); keep one", line)
                first_line[key_node.value] = line
            key_path = (*path, key_node.value)
            lines[key_path] = line
            _compose_with_lines(value_node, key_path, lines, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*path, index)] = item.start_mark.line + 1
            _compose_with_lines(item, (*path, index), lines, seen)


def check_shape(node: yaml.Node | None) -> dict[KeyPath, int]:
    """The key -> line map of a composed document, after refusing duplicated keys, documents that expand past
    MAX_EXPANDED_NODES values and nesting deeper than MAX_DEPTH (YamlShapeError, with the line)."""
    lines: dict[KeyPath, int] = {}
    if node is None:
        return lines
    size = _expanded_size(node, {})
    if size > MAX_EXPANDED_NODES:
        raise YamlShapeError(f"the document expands to {size} values through its aliases (&/*); at most "
                             f"{MAX_EXPANDED_NODES} are accepted")
    _compose_with_lines(node, (), lines, set())
    return lines


def load_yaml(path: Path, error: type[AlignError]) -> tuple[Any, dict[KeyPath, int]]:
    """Parse `path`; return the data and a map from key path to line. Raises `error` naming file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read: {exc}") from None
    return parse_yaml(text, str(path), error)


def parse_yaml(text: str, source: str, error: type[AlignError], hint: str = "") -> tuple[Any, dict[KeyPath, int]]:
    """Parse YAML `text` read from `source` (a file name, or e.g. `--set KEY=VALUE`) within the bounds of
    `check_shape`; the data and its key -> line map. Problems raise `error` naming source (and line, for a
    text of several lines); `hint` is added to a syntax error."""

    def where(line: int | None) -> str:
        return f"{source}:{line}" if line and "\n" in text.strip() else source

    try:
        node = yaml.compose(text, Loader=_LineLoader)
        lines = check_shape(node)
        data = yaml.load(text, Loader=_LineLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = " ".join(p for p in (exc.context, exc.problem) if p)
        raise error(f"{where(mark.line + 1 if mark else None)}: YAML syntax error: {problem}{hint}") from None
    except yaml.YAMLError as exc:
        raise error(f"{source}: YAML error: {exc}{hint}") from None
    except YamlShapeError as exc:
        raise error(f"{where(exc.line)}: {exc.problem}") from None
    except RecursionError:  # the parser itself recurses once per level of nesting
        raise error(f"{source}: nested too deeply to read (at most {MAX_DEPTH} levels)") from None
    return data, lines


def _override_value(key: str, raw: str, error: type[AlignError]) -> Any:
    """A `--set` value read as YAML (numbers, lists and booleans keep their type), bounded like a recipe file.
    Text that is not valid YAML is refused rather than passed on as a raw string (a list missing its bracket
    would otherwise reach PEFT as a regular expression)."""
    short = raw if len(raw) <= 80 else raw[:77] + "..."
    short = REDACTED if is_secret_path(key) else short  # a secret is never echoed
    hint = f"; quote it to pass text, e.g. {key}='...'"
    return parse_yaml(raw, f"--set {key}={short}", error, hint)[0] if raw.strip() else ""


def apply_override(data: dict, override: str, lines: dict, error: type[AlignError]) -> None:
    """Set `KEY.PATH=VALUE` (a `--set`) in the parsed document `data`, recording its origin in `lines`."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise error(f"--set {override!r}: expected KEY.PATH=VALUE, e.g. train.learning_rate=1e-4")
    parts = key.strip().split(".")
    value = _override_value(key.strip(), raw, error)
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise error(f"--set {redact_override(override)}: '{'.'.join(parts[: depth + 1])}' is not a section")
        node = child
    node[parts[-1]] = value
    lines[tuple(parts)] = f"--set {redact_override(override)}"


def clipped_repr(value: Any, width: int = 80) -> str:
    """repr() of a value for an error message, cut to `width` characters: the value may be megabytes long."""
    clipper = reprlib.Repr()
    clipper.maxstring = clipper.maxother = width
    text = clipper.repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


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
                text += f" (got {clipped_repr(err['input'])})"
        messages.append(f"{where}: {format_key_path(loc)}: {text}")
    extra = len(exc.errors()) - max_errors
    if extra > 0:
        messages.append(f"... and {extra} more problem(s)")
    return "\n".join(messages)
