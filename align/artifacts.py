"""Versioned artifact registry: every stage publishes `ROOT/NAME/vN/` atomically and later stages name it `NAME@vN`.

Layout: `ROOT/NAME/vN/manifest.json` (+ whatever the stage wrote), `ROOT/NAME/.lock` (a `filelock` lock),
`ROOT/NAME/.staging-<pid>-<hex>/` (in-progress publishes), `ROOT/NAME/.runs/<key>/` (resumable checkpoints).
Manifests are read and written only as `align.manifest.Manifest` models. No ML library is imported here, so
`align artifacts list` stays fast.
"""

from __future__ import annotations

import difflib
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

from align.errors import ArtifactError
from align.hashing import sha256_file
from align.manifest import MANIFEST_FILE, Manifest, ParentEntry
from align.records import describe_record_error, write_atomic
from align.stages import stage_manifest

if TYPE_CHECKING:
    from align.lineage import LineageNode

DEFAULT_PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "align")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
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


def _check_name(name: str, what: str = "artifact name") -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ArtifactError(
            f"invalid {what} {name!r}: use letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


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
            if entry.is_dir() and _NAME_RE.match(entry.name) and self.versions(entry.name)
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
                raise ArtifactError(f"malformed artifact reference {ref!r}: bad name {name!r}; {expected}")
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
        if _NAME_RE.match(ref) and (self.versions(ref) or not Path(ref).is_dir()):
            return self._latest(ref)
        if Path(ref).is_dir():  # a bare relative directory name that is not a registry name
            return self._resolve_path(ref)
        raise ArtifactError(f"malformed artifact reference {ref!r}: expected NAME, NAME@vN, NAME@latest or a path")

    def _latest(self, name: str) -> Artifact:
        existing = self.versions(name)
        if not existing:
            raise self._unknown_name(name)
        return self._artifact(name, existing[-1])

    def _resolve_path(self, ref: str) -> Artifact:
        path = Path(ref).expanduser()
        path = (path if path.is_absolute() else Path.cwd() / path).resolve()
        if path.is_file() and path.name == MANIFEST_FILE:
            path = path.parent
        if not path.is_dir():
            raise ArtifactError(f"artifact path {ref!r} does not exist (resolved to {path})")
        if not (path / MANIFEST_FILE).is_file():
            raise ArtifactError(f"{path} is not an artifact directory: it has no {MANIFEST_FILE}")
        manifest = read_manifest(path)
        return Artifact(name=manifest.name, version=manifest.version, path=path, manifest=manifest)

    @contextmanager
    def staging(self, name: str) -> Iterator[Path]:
        """Yield a fresh `ROOT/NAME/.staging-<pid>-<hex>/` to build an artifact in; removed if the body raises.

        Call `publish` inside the block; the pid in the name lets `clean_stale` reclaim directories of dead runs.
        """
        base = self._dir(name)
        base.mkdir(parents=True, exist_ok=True)
        path = base / f"{_STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
        path.mkdir()
        try:
            yield path
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
        ref, created). They are validated against the stage's manifest model first: a manifest that would not
        read back is a stage bug (ValueError naming the field) and publishes nothing. Staging directories of
        dead runs of `name` are removed on the way.
        """
        staging_dir = Path(staging_dir)
        if not staging_dir.is_dir():
            raise ValueError(f"staging directory {staging_dir} does not exist")
        model = stage_manifest(str(fields.get("stage")), f"manifest for {name!r}")
        identity = {"schema_version": model.SCHEMA_VERSION, "name": name, "version": 0, "ref": f"{name}@v0",
                    "created": datetime.now(UTC).isoformat(timespec="seconds")}
        try:
            manifest = model.model_validate({**identity, **fields})
        except ValidationError as exc:
            raise ValueError(f"manifest for {name!r}: {describe_record_error(exc)}") from None
        base = self._dir(name)
        with self._lock(name):
            self.clean_stale(name)
            # Any vN directory counts, even without a manifest, so the rename can never land on an existing one.
            taken = [int(m.group(1)) for e in base.iterdir() if (m := _VERSION_DIR_RE.match(e.name))]
            version = max(taken, default=0) + 1
            manifest = manifest.model_copy(update={"version": version, "ref": f"{name}@v{version}"})
            write_atomic(staging_dir / MANIFEST_FILE, manifest.to_json())
            _fsync_dir(staging_dir)
            target = base / f"v{version}"
            os.rename(staging_dir, target)
            _fsync_dir(base)
        return Artifact(name=name, version=version, path=target, manifest=manifest)

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
