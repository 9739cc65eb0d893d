"""What typed output files (manifests, eval results) share: a strict pydantic base, a schema version, one reader.

Every JSON file a stage or command writes for others to read is a `Record`: unknown and missing fields are
errors, the file records `schema_version`, and files written before versions existed read as version 0 and
are upgraded in memory by the model's `migrate` before validation. A file that does not validate is an
`ArtifactError` naming the file and the field, never a KeyError deep in a reader.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from align.errors import ArtifactError


class Strict(BaseModel):
    """A part of a record: every field declared, nothing else accepted."""

    model_config = ConfigDict(extra="forbid")


class Record(Strict):
    """A whole output file. Subclasses set SCHEMA_VERSION and teach `migrate` how older versions differ."""

    SCHEMA_VERSION: ClassVar[int] = 1
    schema_version: int

    @classmethod
    def migrate(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        """Upgrade the raw content of a version-`version` file to the current version (in memory)."""
        return data

    @classmethod
    def parse(cls, data: Any, source: str) -> Self:
        """Validate decoded JSON `data` read from `source` (a file name, for messages)."""
        if not isinstance(data, dict):
            raise ArtifactError(f"{source}: expected a JSON object, got {type(data).__name__}")
        version = data.get("schema_version", 0)
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ArtifactError(f"{source}: schema_version: expected a whole number, got {version!r}")
        if version > cls.SCHEMA_VERSION:
            raise ArtifactError(f"{source}: schema_version {version} is newer than this align understands "
                                f"({cls.SCHEMA_VERSION}); upgrade align to read it")
        if version < cls.SCHEMA_VERSION:
            data = {**cls.migrate(dict(data), version), "schema_version": cls.SCHEMA_VERSION}
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ArtifactError(f"{source}: {describe_record_error(exc)}") from None

    @classmethod
    def read(cls, path: Path) -> Self:
        return cls.parse(load_json(Path(path)), str(path))

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"

    def write(self, path: Path) -> None:
        write_atomic(Path(path), self.to_json())


def describe_record_error(exc: ValidationError, limit: int = 3) -> str:
    """`field a.b.0.c: problem` for the first few errors; values are never echoed (they can be huge)."""
    parts = []
    for error in exc.errors()[:limit]:
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        problem = "unknown field" if error["type"] == "extra_forbidden" else error["msg"]
        parts.append(f"field {where}: {problem}")
    more = len(exc.errors()) - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def load_json(path: Path) -> Any:
    """Decoded JSON of `path`; ArtifactError naming the file when it is missing, unreadable or not JSON."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArtifactError(f"{path}: not found") from None
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync it and rename it over `path`: a reader (or a crash)
    never sees half a file."""
    scratch = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(scratch, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(scratch, path)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise
