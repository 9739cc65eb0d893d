"""Artifact integrity: what a version's files were when written, and whether they still are.

Publishing records every file of the version (`Manifest.files`: relative path -> size and SHA-256); a file added to
a version later (`eval.json`, benchmark results) is recorded in the version's `added_files.json` by
`Registry.add_file`. Two checks read those records:

- `align artifacts verify` (`verify_version`) re-hashes every recorded file and reports each one missing, resized
  or changed, and (as a note) files present but recorded nowhere.
- Stages (`check_loadable`), before any weights load: every recorded file of the artifact they read, and of the
  adapters under it, still has its recorded size, and every `.safetensors` file has a sound header. This costs a
  stat and a few bytes per file, so a damaged parent is one clear error instead of a loader's traceback.

Artifacts written before schema 2 have no record: they are reported as such (not as damaged), and their
`.safetensors` headers are still checked. No ML library is imported here.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, ClassVar

from align.errors import ArtifactError
from align.hashing import sha256_file
from align.manifest import MANIFEST_FILE, ChainEntry, FileRecord, Manifest
from align.records import Record

if TYPE_CHECKING:
    from align.artifacts import Artifact, Registry

ADDED_FILES = "added_files.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The safetensors library refuses headers above 100 MB; a larger length is damage, and must not be read into memory.
_MAX_SAFETENSORS_HEADER = 100_000_000
# Never part of a version's own record: the manifest (it cannot hash itself) and the added-files record.
_UNRECORDED = frozenset({MANIFEST_FILE, ADDED_FILES})


class AddedFiles(Record):
    """`vN/added_files.json`: files written into a version after it was published, each as written."""

    SCHEMA_VERSION: ClassVar[int] = 1

    schema_version: int
    files: dict[str, FileRecord]


# ---- recording -------------------------------------------------------------------------------------------------


def file_record(path: Path) -> FileRecord:
    return FileRecord(sha256=sha256_file(path), size=path.stat().st_size)


def _relative_files(directory: Path) -> list[str]:
    """Every regular file under `directory` as a relative POSIX path, sorted."""
    found = []
    for root, _dirs, files in os.walk(directory):
        for name in files:
            path = Path(root) / name
            if path.is_file():
                found.append(path.relative_to(directory).as_posix())
    return sorted(found)


def record_directory(directory: Path) -> dict[str, FileRecord]:
    """The record `publish` stores in the manifest: every file of a staging directory but manifest.json."""
    return {rel: file_record(directory / rel) for rel in _relative_files(directory) if rel not in _UNRECORDED}


def read_added(version_dir: Path) -> AddedFiles | None:
    path = version_dir / ADDED_FILES
    return AddedFiles.read(path) if path.is_file() else None


def added_file_path(relpath: str, manifest: Manifest) -> str:
    """`relpath` normalised, if it may be added to a version with `manifest`: relative, inside the version, and
    neither the manifest, the added-files record nor a file recorded at publish (published files never change)."""
    rel = PurePosixPath(relpath)
    if rel.is_absolute() or not rel.parts or ".." in rel.parts or str(rel) in (".", ""):
        raise ValueError(f"{relpath!r}: an added file is a relative path inside the version directory")
    name = rel.as_posix()
    if name in _UNRECORDED or (manifest.files is not None and name in manifest.files):
        raise ValueError(f"{manifest.ref}: {name} was written at publish (or is a record) and cannot be replaced")
    return name


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` beside `path`, fsync it and rename it over `path`: a reader never sees half a file."""
    scratch = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(scratch, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(scratch, path)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise


def record_added(version_dir: Path, relpath: str, data: bytes) -> None:
    """Add (or replace) `relpath`'s entry in the version's added-files record. The caller holds the artifact's lock."""
    added = read_added(version_dir) or AddedFiles(schema_version=AddedFiles.SCHEMA_VERSION, files={})
    entry = FileRecord(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    updated = added.model_copy(update={"files": {**added.files, relpath: entry}})
    write_bytes_atomic(version_dir / ADDED_FILES, updated.to_json().encode("utf-8"))


# ---- checking --------------------------------------------------------------------------------------------------


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a .safetensors file's framing, or None: an 8-byte little-endian header length, a JSON
    object of that length, and tensor data ending exactly at the end of the file (what a truncated or overwritten
    file breaks). The tensors' contents are not read."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                return f"{size} bytes, too short for a safetensors header"
            length = int.from_bytes(prefix, "little")
            if length == 0 or length > _MAX_SAFETENSORS_HEADER or 8 + length > size:
                return f"not a safetensors file: header length {length} does not fit its {size} bytes"
            header = handle.read(length)
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    try:
        tensors = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "not a safetensors file: its header is not JSON"
    if not isinstance(tensors, dict):
        return "not a safetensors file: its header is not a JSON object"
    end = 0
    for name, info in tensors.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            return f"safetensors header: tensor {name[:80]!r} has no valid data_offsets"
        end = max(end, offsets[1])
    if 8 + length + end != size:
        guess = "truncated?" if size < 8 + length + end else "bytes appended?"
        return f"safetensors data should end at byte {8 + length + end}, the file has {size} bytes ({guess})"
    return None


@dataclass(frozen=True)
class Finding:
    """One thing `verify` found about a file of a version; `damage` False is a note (nothing is wrong)."""

    file: str
    problem: str
    damage: bool = True


@dataclass
class VersionCheck:
    """What checking one version found: its ref, how many recorded files were checked, and the findings."""

    ref: str
    path: Path
    checked: int = 0
    recorded: bool = True  # False: written before schema 2, no file record
    findings: list[Finding] = field(default_factory=list)

    @property
    def damaged(self) -> list[Finding]:
        return [f for f in self.findings if f.damage]

    def lines(self) -> list[str]:
        """One line per damage, then per note, or one `ok` line."""
        out = [f"{self.ref}: {f.file}: {f.problem}" for f in self.damaged]
        out += [f"note {self.ref}: {f.file}: {f.problem}" for f in self.findings if not f.damage]
        if not self.damaged:
            what = (f"{self.checked} recorded file(s) match" if self.recorded
                    else "no file record (written before schema 2); safetensors headers checked")
            out.append(f"ok {self.ref}: {what}")
        return out


def _check_file(directory: Path, rel: str, record: FileRecord, deep: bool) -> Finding | None:
    path = directory / rel
    if not path.is_file():
        return Finding(rel, "missing")
    size = path.stat().st_size
    if size != record.size:
        return Finding(rel, f"size changed: {size} bytes, recorded {record.size}")
    if deep:
        digest = sha256_file(path)
        if digest != record.sha256:
            return Finding(rel, f"content changed: sha256 {digest[:12]}..., recorded {record.sha256[:12]}...")
    elif path.suffix == ".safetensors" and (problem := safetensors_problem(path)):
        return Finding(rel, problem)
    return None


def check_version(directory: Path, manifest: Manifest, ref: str, *, deep: bool) -> VersionCheck:
    """Check a version directory (known as `ref`) against its records. `deep` re-hashes every recorded file and
    notes unrecorded ones (`align artifacts verify`); otherwise sizes and safetensors headers only (what stages do
    before loading)."""
    result = VersionCheck(ref, directory, recorded=manifest.files is not None)
    records = dict(manifest.files or {})
    try:
        added = read_added(directory)
    except ArtifactError as exc:
        result.findings.append(Finding(ADDED_FILES, f"unreadable: {exc}"))
        added = None
    records.update(added.files if added else {})
    for rel, record in sorted(records.items()):
        result.checked += 1
        if finding := _check_file(directory, rel, record, deep):
            result.findings.append(finding)
    if manifest.files is None:  # nothing recorded: the weights' framing is still checkable
        for rel in _relative_files(directory):
            problem = safetensors_problem(directory / rel) if rel.endswith(".safetensors") else None
            if problem and rel not in records:
                result.findings.append(Finding(rel, problem))
    elif deep:
        for rel in _relative_files(directory):
            if rel not in records and rel not in _UNRECORDED:
                result.findings.append(Finding(rel, "present but recorded nowhere", damage=False))
    return result


def verify_version(directory: Path, ref: str) -> VersionCheck:
    """`align artifacts verify` of one version directory; an unreadable manifest is itself the damage found."""
    try:
        manifest = Manifest.read(directory)
    except ArtifactError as exc:
        return VersionCheck(ref, directory, findings=[Finding(MANIFEST_FILE, f"unreadable: {exc}")])
    return check_version(directory, manifest, ref, deep=True)


# ---- what stages call before loading weights -----------------------------------------------------------------------


def chain_adapter_dir(entry: ChainEntry, registry: Registry | None) -> Path:
    """The adapter directory of a chain entry: its recorded path, else its ref in `registry` (a moved registry)."""
    path = Path(entry.path)
    if (path / "adapter_config.json").exists() or registry is None:
        return path
    return registry.resolve(entry.ref).adapter_path


def _refuse_if_damaged(directory: Path, manifest: Manifest, ref: str, where: str, under: str = "") -> None:
    damaged = check_version(directory, manifest, ref, deep=False).damaged
    if damaged:
        first = damaged[0]
        more = f" (and {len(damaged) - 1} more damaged file(s))" if len(damaged) > 1 else ""
        raise ArtifactError(f"{where}artifact {ref}{under} is damaged: {directory / first.file}: "
                            f"{first.problem}{more}; `align artifacts verify {ref}` lists every problem")


def check_loadable(artifact: Artifact, registry: Registry | None, needed_by: str | None = None) -> None:
    """Refuse, before any weights load, an artifact whose files (or those of an adapter it sits on) are missing,
    resized or not sound safetensors: one ArtifactError naming the artifact and the file (and `needed_by`, the
    recipe field or command that named it). Without a registry, chain adapters found only by their ref are left
    to the check the loader makes."""
    where = f"{needed_by}: " if needed_by else ""
    _refuse_if_damaged(artifact.path, artifact.manifest, artifact.ref, where)
    for entry in artifact.manifest.adapter_chain:
        if registry is None and not (Path(entry.path) / "adapter_config.json").exists():
            continue
        directory = chain_adapter_dir(entry, registry).parent
        _refuse_if_damaged(directory, Manifest.read(directory), entry.ref, where, f" (an adapter under {artifact.ref})")


@contextmanager
def loading_adapter(adapter_dir: Path) -> Iterator[None]:
    """Turn what PEFT, transformers or safetensors raise for a damaged adapter (SafetensorError, OSError, a
    config that is not JSON) into one ArtifactError naming the file: the check before loading covers sizes and
    headers, not every byte."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError, json.JSONDecodeError) as exc:
        weights = adapter_dir / ADAPTER_WEIGHTS
        named = getattr(exc, "filename", None) or (weights if weights.exists() else adapter_dir)
        reason = " ".join(str(exc).split())[:200]
        raise ArtifactError(f"{named}: cannot load the adapter ({type(exc).__name__}: {reason}); the artifact "
                            "is damaged, `align artifacts verify` checks it") from None
