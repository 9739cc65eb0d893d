"""Lineage: what an artifact was built from, as a tree read from the registry (the CLI and the report draw it).

Each node is an artifact (or a parent that no longer exists); its `parents` are the artifacts it was built
from, each with the role it played. A cycle in a damaged registry ends the branch instead of recursing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from align.hashing import sha256_file
from align.manifest import MANIFEST_FILE

if TYPE_CHECKING:
    from align.artifacts import Artifact, Registry


@dataclass(frozen=True)
class LineageNode:
    """One artifact in a lineage tree; `role` is how its child used it (None at the root)."""

    ref: str
    role: str | None
    stage: str | None
    created: str | None
    base_model: str | None
    data: tuple[str, ...]
    path: Path | None
    missing: bool = False
    # The child recorded a different manifest hash: the ref now names something else (e.g. re-created after deletion).
    manifest_changed: bool = False
    parents: tuple[LineageNode, ...] = field(default=())

    def walk(self, depth: int = 0) -> Iterator[tuple[int, LineageNode]]:
        """(depth, node) for this node and every ancestor, depth first, parents in recorded order."""
        yield depth, self
        for parent in self.parents:
            yield from parent.walk(depth + 1)


def lineage_tree(registry: Registry, artifact: Artifact) -> LineageNode:
    """The lineage tree of `artifact`; parents that no longer exist become `missing` leaves."""
    return _node(registry, artifact, role=None, recorded_sha=None, on_path=frozenset())


def _node(registry: Registry, artifact: Artifact, role: str | None, recorded_sha: str | None,
          on_path: frozenset[Path]) -> LineageNode:
    manifest = artifact.manifest
    changed = recorded_sha is not None and recorded_sha != sha256_file(artifact.path / MANIFEST_FILE)
    parents: list[LineageNode] = []
    if artifact.path not in on_path:  # a damaged registry could loop; stop rather than recurse forever
        for entry in manifest.parents:
            parent = registry.find_parent(entry)
            if parent is None:
                parents.append(LineageNode(ref=entry.ref, role=entry.role, stage=None, created=None,
                                           base_model=None, data=(), path=None, missing=True))
            else:
                parents.append(_node(registry, parent, entry.role, entry.manifest_sha256,
                                     on_path | {artifact.path}))
    return LineageNode(ref=artifact.ref, role=role, stage=manifest.stage, created=manifest.created,
                       base_model=manifest.base_model.spec, data=tuple(d.name for d in manifest.data),
                       path=artifact.path, manifest_changed=changed, parents=tuple(parents))
