"""Versioned artifact registry: every stage publishes `ROOT/NAME/vN/` atomically and later stages name it `NAME@vN`.

Layout: `ROOT/NAME/vN/manifest.json` (+ whatever the stage wrote, each file's size and SHA-256 recorded in the
manifest), `ROOT/NAME/vN/added_files.json` (the record of files added later: `add_file`), `ROOT/NAME/.lock` (a
`filelock` lock), `ROOT/NAME/.staging-<pid>-<hex>/` (in-progress publishes), `ROOT/NAME/.runs/<key>/` (resumable
checkpoints). Manifests are read and written only as `align.manifest.Manifest` models. No ML library is imported
here, so `align artifacts list` stays fast.
"""

from __future__ import annotations

import difflib
import errno
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from align import integrity
from align.errors import ArtifactError
from align.hashing import sha256_file
from align.manifest import MANIFEST_FILE, Manifest, ParentEntry
from align.records import describe_record_error, write_atomic
from align.stages import stage_manifest

if TYPE_CHECKING:
    from align.lineage import LineageNode

DEFAULT_PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "align")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# A name is one path component (ROOT/NAME), and file systems cap components at 255 bytes; 100 leaves room for
# anything built from a name and keeps messages readable. `Recipe.name` has the same limit.
MAX_NAME_LENGTH = 100
# Strict: "v01" is not a version dir, so no two directories can claim the same number.
_VERSION_DIR_RE = re.compile(r"^v([1-9][0-9]*)$")
_VERSION_SPEC_RE = re.compile(r"^v([0-9]+)$")
_STAGING_PREFIX = ".staging-"
_STAGING_RE = re.compile(r"^\.staging-([0-9]+)-[0-9a-f]+$")


@dataclass(frozen=True)
class Artifact:
    """One published version; `manifest` is excluded from equality so artifacts compare by identity."""

    name: str
    version: int
    path: Path
    manifest: Manifest = field(compare=False, repr=False)

    @property
    def ref(self) -> str:
        return f"{self.name}@v{self.version}"

    @property
    def adapter_path(self) -> Path:
        return self.path / "adapter"


def _clip(value: object) -> str:
    from align.yamlio import clipped_repr  # only for messages: yaml stays out of `artifacts list`

    return clipped_repr(value)


def _check_name(name: str, what: str = "artifact name") -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ArtifactError(
            f"invalid {what} {_clip(name)}: use letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    if len(name) > MAX_NAME_LENGTH:
        raise ArtifactError(f"invalid {what} {_clip(name)}: {len(name)} characters long, at most "
                            f"{MAX_NAME_LENGTH} are allowed")
    return name


# Errors of a write that the user's machine causes (full disk, quota, file size limit, read-only or forbidden
# directory, name too long): a clear ArtifactError, never a traceback.
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                           errno.ENAMETOOLONG})


def _write_error(exc: OSError, where: Path, name: str) -> ArtifactError:
    """A failed write while building or publishing `name`, naming the file (or directory) that could not be written."""
    target = exc.filename or where
    return ArtifactError(f"cannot write {target}: {exc.strerror or exc}; nothing of {name!r} was published")


def _check_root(root: Path) -> None:
    """The registry root, or its nearest existing ancestor, must be a directory (not, say, a file named by mistake)."""
    for path in (root, *root.parents):
        if os.path.isdir(path):
            return
        if os.path.lexists(path):
            where = "" if path == root else f" ({path} is not a directory)"
            raise ArtifactError(f"registry {root} is not a directory{where}: point --registry (or $ALIGN_REGISTRY "
                                "or the recipe's output.root) at a directory")


def read_manifest(path: Path) -> Manifest:
    """Load and validate a manifest (given the file or its artifact directory); ArtifactError naming the file
    and the field if it is unusable."""
    return Manifest.read(Path(path))


def package_versions(names: tuple[str, ...] = DEFAULT_PACKAGES) -> dict[str, str | None]:
    """Installed distribution versions (None if absent), read from metadata so nothing heavy gets imported."""
    # Imported here: importlib.metadata is a third of this module's import time and `artifacts list` never needs it.
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git(args: list[str], cwd: Path | None) -> str | None:
    env = {**os.environ, "LC_ALL": "C", "GIT_OPTIONAL_LOCKS": "0"}  # never take the index lock of a live repo
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def git_state(cwd: Path | None = None) -> dict[str, Any]:
    """`{"commit": sha | None, "dirty": bool | None}` of the repo around `cwd`; never raises (no git, no repo)."""
    commit = _git(["rev-parse", "--verify", "HEAD"], cwd)
    if commit is None:
        return {"commit": None, "dirty": None}
    # Untracked files (outputs, caches) are not part of the code that ran, so they do not count as dirty.
    status = _git(["status", "--porcelain", "--untracked-files=no"], cwd)
    return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip())}


def parent_entry(artifact: Artifact, role: str) -> ParentEntry:
    """The manifest's `parents` entry recording that a new artifact was built from `artifact` as `role`."""
    return ParentEntry(role=role, ref=artifact.ref, name=artifact.name, version=artifact.version,
                       path=str(artifact.path), manifest_sha256=sha256_file(artifact.path / MANIFEST_FILE))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class Registry:
    """The artifact store under one root directory; safe for concurrent publishers of the same name."""

    def __init__(self, root: str | Path) -> None:
        # Absolute now, so a later chdir cannot move the registry.
        self.root = Path(root).expanduser().absolute()
        _check_root(self.root)

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    def _dir(self, name: str) -> Path:
        return self.root / _check_name(name)

    def versions(self, name: str) -> list[int]:
        """Sorted published versions of `name`: `vN` directories that contain a manifest."""
        base = self._dir(name)
        if not base.is_dir():
            return []
        found = []
        for entry in base.iterdir():
            match = _VERSION_DIR_RE.match(entry.name)
            if match and (entry / MANIFEST_FILE).is_file():
                found.append(int(match.group(1)))
        return sorted(found)

    def names(self) -> list[str]:
        """Sorted names that have at least one published version."""
        if not self.root.is_dir():
            return []
        return sorted(
            entry.name
            for entry in self.root.iterdir()
            if entry.is_dir() and _NAME_RE.match(entry.name) and len(entry.name) <= MAX_NAME_LENGTH
            and self.versions(entry.name)
        )

    def _artifact(self, name: str, version: int) -> Artifact:
        path = self.root / name / f"v{version}"
        return Artifact(name=name, version=version, path=path, manifest=read_manifest(path))

    def list(self, name: str | None = None) -> list[Artifact]:
        """All artifacts (or all versions of `name`), ordered by name then version; unknown `name` is an error."""
        if name is None:
            return [self._artifact(n, v) for n in self.names() for v in self.versions(n)]
        versions = self.versions(name)
        if not versions:
            raise self._unknown_name(name)
        return [self._artifact(name, v) for v in versions]

    def _unknown_name(self, name: str) -> ArtifactError:
        known = self.names()
        if not known:
            return ArtifactError(f"unknown artifact {name!r}: the registry at {self.root} has no artifacts yet")
        hint = ""
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        if close:
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?"
        if (self.root / name).is_dir():
            return ArtifactError(f"artifact {name!r} has no published versions yet (in {self.root}){hint}")
        return ArtifactError(f"unknown artifact {name!r} in {self.root}{hint} (known: {', '.join(known)})")

    def resolve(self, ref: str) -> Artifact:
        """Turn `name@vN`, `name@latest`, bare `name` (= latest) or an artifact directory path into an Artifact."""
        if not isinstance(ref, str) or not ref.strip():
            raise ArtifactError(f"empty artifact reference {ref!r}: expected NAME, NAME@vN, NAME@latest or a path")
        ref = ref.strip()
        if _looks_like_path(ref):
            return self._resolve_path(ref)
        if "@" in ref:
            name, _, spec = ref.partition("@")
            expected = "expected NAME@vN (e.g. sft@v3) or NAME@latest"
            if not _NAME_RE.match(name):
                raise ArtifactError(f"malformed artifact reference {_clip(ref)}: bad name {_clip(name)}; {expected}")
            _check_name(name)
            if spec == "latest":
                return self._latest(name)
            match = _VERSION_SPEC_RE.match(spec)
            if match is None:
                hint = f"; did you mean {name}@v{spec}?" if spec.isdigit() else ""
                raise ArtifactError(f"malformed artifact reference {ref!r}: {expected}{hint}")
            version = int(match.group(1))
            if (self.root / name / f"v{version}" / MANIFEST_FILE).is_file():
                return self._artifact(name, version)
            existing = self.versions(name)
            if not existing:
                raise self._unknown_name(name)
            listed = ", ".join(f"v{v}" for v in existing)
            raise ArtifactError(
                f"artifact {name}@v{version} does not exist; {name} has {listed} (latest v{existing[-1]})"
            )
        if _NAME_RE.match(ref) and (self.versions(ref) or not os.path.isdir(ref)):
            return self._latest(ref)
        if os.path.isdir(ref):  # a bare relative directory name that is not a registry name
            return self._resolve_path(ref)
        raise ArtifactError(f"malformed artifact reference {_clip(ref)}: expected NAME, NAME@vN, NAME@latest or a "
                            "path")

    def _latest(self, name: str) -> Artifact:
        existing = self.versions(name)
        if not existing:
            raise self._unknown_name(name)
        return self._artifact(name, existing[-1])

    def _resolve_path(self, ref: str) -> Artifact:
        path = Path(ref).expanduser()
        try:
            path = (path if path.is_absolute() else Path.cwd() / path).resolve()
        except OSError as exc:  # a component too long, a symlink loop
            raise ArtifactError(f"artifact path {_clip(ref)}: {exc.strerror or exc}") from None
        if os.path.isfile(path) and path.name == MANIFEST_FILE:
            path = path.parent
        if not os.path.isdir(path):
            raise ArtifactError(f"artifact path {_clip(ref)} does not exist (resolved to {_clip(str(path))})")
        if not (path / MANIFEST_FILE).is_file():
            raise ArtifactError(f"{path} is not an artifact directory: it has no {MANIFEST_FILE}")
        manifest = read_manifest(path)
        return Artifact(name=manifest.name, version=manifest.version, path=path, manifest=manifest)

    def check_writable(self, name: str) -> None:
        """Refuse now, before any model loads, a registry where `name` cannot be published: a probe file is
        written and removed in `ROOT/NAME`, or in the nearest directory above it that exists (which publishing
        would create it in), leaving nothing behind. Permission bits alone would not tell: a root user writes
        through them, a read-only mount refuses everyone."""
        base = self._dir(name)
        nearest = next((p for p in (base, *base.parents) if os.path.isdir(p)), self.root)
        probe = nearest / f".write-probe-{os.getpid()}-{uuid.uuid4().hex}"
        try:
            probe.touch()
            probe.unlink()
        except OSError as exc:
            raise ArtifactError(f"cannot publish {name!r}: the registry directory {nearest} is not writable "
                                f"({exc.strerror or exc})") from None

    def verify_targets(self, refs: list[str]) -> list[tuple[str, Path]]:
        """(ref, version directory) of what `align artifacts verify REF...` checks: every published version when
        `refs` is empty, every version of a bare NAME, else the version each reference resolves to. Versions are
        listed from the directories, not from their manifests, so one damaged manifest is a finding, not an error."""
        if not refs:
            return [(f"{name}@v{v}", self.root / name / f"v{v}") for name in self.names() for v in self.versions(name)]
        targets = []
        for ref in refs:
            if _NAME_RE.match(ref) and self.versions(ref):
                targets += [(f"{ref}@v{v}", self.root / ref / f"v{v}") for v in self.versions(ref)]
            else:
                artifact = self.resolve(ref)
                targets.append((artifact.ref, artifact.path))
        return targets

    def check_can_add(self, artifact: Artifact) -> None:
        """Refuse now a version directory `add_file` could not write into (before a command spends minutes on
        what it would write there). Its parent too: that is where the artifact's lock file lives."""
        for directory in (artifact.path, artifact.path.parent):
            probe = directory / f".write-probe-{os.getpid()}-{uuid.uuid4().hex}"
            try:
                probe.touch()
                probe.unlink()
            except OSError as exc:
                raise ArtifactError(f"cannot write into {artifact.ref}: {directory} is not writable "
                                    f"({exc.strerror or exc})") from None

    @contextmanager
    def staging(self, name: str) -> Iterator[Path]:
        """Yield a fresh `ROOT/NAME/.staging-<pid>-<hex>/` to build an artifact in; removed if the body raises.

        Call `publish` inside the block; the pid in the name lets `clean_stale` reclaim directories of dead runs.
        A write the machine refuses (full disk, file size limit, permissions) is an ArtifactError naming the file.
        """
        base = self._dir(name)
        path = base / f"{_STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
        try:
            base.mkdir(parents=True, exist_ok=True)
            path.mkdir()
        except OSError as exc:
            raise _write_error(exc, path, name) from None
        try:
            yield path
        except OSError as exc:
            shutil.rmtree(path, ignore_errors=True)
            if exc.errno in _WRITE_ERRNOS:
                raise _write_error(exc, path, name) from None
            raise
        except BaseException:  # KeyboardInterrupt/SystemExit too: a half-built artifact must not linger
            shutil.rmtree(path, ignore_errors=True)
            raise

    def _lock(self, name: str) -> Any:
        from filelock import FileLock

        base = self._dir(name)
        base.mkdir(parents=True, exist_ok=True)
        return FileLock(base / ".lock")

    def publish(self, staging_dir: Path, name: str, fields: dict[str, Any]) -> Artifact:
        """Atomically turn `staging_dir` into the next version of `name`, writing its manifest; returns the Artifact.

        `fields` are the manifest's fields except the ones publishing decides (schema_version, name, version,
        ref, created, files), which win over any given. They are validated against the stage's manifest model
        first: a manifest that would not read back is a stage bug (ValueError naming the field) and publishes
        nothing. `files` records the size and SHA-256 of every file of `staging_dir`, hashed after the stage
        finished writing it and outside the lock (the directory is this process's alone), so concurrent
        publishers do not queue behind each other's hashing. Staging directories of dead runs of `name` are
        removed on the way. A write the machine refuses is an ArtifactError naming the file; nothing is published.
        """
        staging_dir = Path(staging_dir)
        if not staging_dir.is_dir():
            raise ValueError(f"staging directory {staging_dir} does not exist")
        model = stage_manifest(str(fields.get("stage")), f"manifest for {name!r}")
        try:
            files = integrity.record_directory(staging_dir)
        except OSError as exc:
            raise _write_error(exc, staging_dir, name) from None
        identity = {"schema_version": model.SCHEMA_VERSION, "name": name, "version": 0, "ref": f"{name}@v0",
                    "created": datetime.now(UTC).isoformat(timespec="seconds"), "files": files}
        try:
            manifest = model.model_validate({**fields, **identity})
        except ValidationError as exc:
            raise ValueError(f"manifest for {name!r}: {describe_record_error(exc)}") from None
        base = self._dir(name)
        renamed = False
        try:
            with self._lock(name):
                self.clean_stale(name)
                # Any vN directory counts, even without a manifest, so the rename can never land on an existing one.
                taken = [int(m.group(1)) for e in base.iterdir() if (m := _VERSION_DIR_RE.match(e.name))]
                version = max(taken, default=0) + 1
                manifest = manifest.model_copy(update={"version": version, "ref": f"{name}@v{version}"})
                target = base / f"v{version}"
                write_atomic(staging_dir / MANIFEST_FILE, manifest.to_json())
                _fsync_dir(staging_dir)
                os.rename(staging_dir, target)
                renamed = True
                _fsync_dir(base)
        except OSError as exc:
            if renamed:  # the version is complete; a failing fsync of its directory is an I/O fault, not the user's
                raise
            # A write() on a full disk names no file; the manifest is the one file written here.
            raise _write_error(exc, staging_dir / MANIFEST_FILE, name) from None
        return Artifact(name=name, version=version, path=target, manifest=manifest)

    def add_file(self, artifact: Artifact, relpath: str, content: str | bytes) -> Path:
        """Write `content` as `relpath` into a published version (replacing an earlier added file of that name)
        and record its size and SHA-256 in the version's `added_files.json`, both atomically and under the
        artifact's lock, so `align artifacts verify` checks files added after publish (eval.json, benchmark
        results) too. Files written at publish cannot be replaced. Returns the file's path."""
        from filelock import FileLock

        rel = integrity.added_file_path(relpath, artifact.manifest)
        data = content.encode("utf-8") if isinstance(content, str) else content
        target = artifact.path / rel
        # The lock beside the version directory: ROOT/NAME/.lock, also for an artifact named by its path.
        try:
            with FileLock(artifact.path.parent / ".lock"):
                target.parent.mkdir(parents=True, exist_ok=True)
                integrity.write_bytes_atomic(target, data)
                integrity.record_added(artifact.path, rel, data)
        except OSError as exc:
            raise ArtifactError(f"cannot write {exc.filename or target} into {artifact.ref}: "
                                f"{exc.strerror or exc}") from None
        return target

    def run_dir(self, name: str, key: str) -> Path:
        """`ROOT/NAME/.runs/<key>/` (created): where an unfinished run keeps checkpoints for `--resume`."""
        path = self._dir(name) / ".runs" / _check_name(key, "run key")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def lineage(self, ref: str) -> LineageNode:
        """The tree of what `ref` was built from (see `align.lineage`)."""
        from align.lineage import lineage_tree

        return lineage_tree(self, self.resolve(ref))

    def find_parent(self, entry: ParentEntry) -> Artifact | None:
        """The artifact a parent entry names: by ref in this registry, else by its recorded absolute path (a
        parent resolved from another root); None when neither exists any more."""
        candidates = [entry.ref] if entry.ref else []
        if Path(entry.path).is_absolute():
            candidates.append(entry.path)
        for candidate in candidates:
            try:
                return self.resolve(candidate)
            except ArtifactError:
                continue
        return None

    def clean_stale(self, name: str) -> list[Path]:
        """Remove `name`'s staging directories whose owning process is dead; return what was removed."""
        base = self._dir(name)
        if not base.is_dir():
            return []
        removed = []
        for entry in sorted(base.iterdir()):
            match = _STAGING_RE.match(entry.name)
            if match and entry.is_dir() and not _pid_alive(int(match.group(1))):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
        return removed


def _looks_like_path(ref: str) -> bool:
    seps = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    return any(sep in ref for sep in seps) or ref.startswith("~") or ref in (".", "..")
