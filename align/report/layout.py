"""The lineage of several artifacts as one graph: which boxes, which arrows, and where each box goes.

Built from the registry's lineage trees (`align.lineage`): an artifact's parents are its tree node's parents;
artifacts with no parent artifact hang from a box for their base model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from align.lineage import LineageNode, lineage_tree

if TYPE_CHECKING:
    from align.artifacts import Artifact, Registry


@dataclass
class GraphNode:
    """One box of the lineage drawing: a base model or an artifact (maybe missing from the registry)."""

    key: str
    label: str
    stage: str
    data: tuple[str, ...] = ()
    included: bool = False
    missing: bool = False
    parents: list[tuple[str, str]] = field(default_factory=list)  # (parent key, role)


def lineage_trees(registry: Registry, artifacts: list[Artifact]) -> dict[str, LineageNode]:
    """`{ref: lineage tree}` of every artifact."""
    return {artifact.ref: lineage_tree(registry, artifact) for artifact in artifacts}


def top_trees(trees: dict[str, LineageNode]) -> list[LineageNode]:
    """The trees of artifacts that no other given artifact descends from (the others show inside them)."""
    ancestors = {node.ref for tree in trees.values() for depth, node in tree.walk() if depth > 0}
    return [tree for ref, tree in trees.items() if ref not in ancestors]


def lineage_graph(trees: dict[str, LineageNode]) -> dict[str, GraphNode]:
    """Union of the lineage trees, rooted at base-model boxes, as `{key: GraphNode}`; the trees' own roots are
    the `included` boxes."""
    nodes: dict[str, GraphNode] = {}

    def add(node: LineageNode) -> GraphNode:
        box = nodes.get(node.ref)
        if box is None:
            box = nodes[node.ref] = GraphNode(key=node.ref, label=node.ref, stage=node.stage or "?", data=node.data,
                                              missing=node.missing)
        edges = [(add(parent).key, parent.role or "model") for parent in node.parents]
        if not node.parents and not node.missing and node.base_model:
            base = nodes.setdefault(f"base:{node.base_model}", GraphNode(
                key=f"base:{node.base_model}", label=node.base_model, stage="base"))
            edges.append((base.key, "base"))
        box.parents += [edge for edge in edges if edge not in box.parents]
        return box

    for ref, tree in trees.items():
        add(tree)
        nodes[ref].included = True
    return nodes


def graph_levels(nodes: dict[str, GraphNode]) -> dict[str, int]:
    """Column of each node: 0 for roots, else one more than its deepest parent (cycles are cut)."""
    levels: dict[str, int] = {}

    def level(key: str, seen: frozenset[str]) -> int:
        if key in levels:
            return levels[key]
        parents = [p for p, _ in nodes[key].parents if p in nodes and p not in seen]
        value = 1 + max((level(p, seen | {key}) for p in parents), default=-1)
        levels[key] = value
        return value

    for key in nodes:
        level(key, frozenset())
    # A parent missing from the registry has no parents itself; put it next to its child, not in column 0,
    # so its arrow does not cross the whole drawing.
    for key, node in nodes.items():
        if not node.parents and node.stage != "base":
            children = [levels[k] for k, n in nodes.items() if any(p == key for p, _ in n.parents)]
            if children:
                levels[key] = max(min(children) - 1, 0)
    return levels


def graph_positions(nodes: dict[str, GraphNode]) -> dict[str, tuple[float, float]]:
    """(column, row) of every node; rows follow the mean row of the parents, which keeps arrows short."""
    levels = graph_levels(nodes)
    positions: dict[str, tuple[float, float]] = {}
    for column in range(max(levels.values(), default=-1) + 1):
        keys = [k for k in nodes if levels[k] == column]

        def order(key: str, column: int = column) -> tuple[float, str]:
            rows = [positions[p][1] for p, _ in nodes[key].parents if p in positions and positions[p][0] < column]
            return (sum(rows) / len(rows) if rows else 0.0, key)

        for row, key in enumerate(sorted(keys, key=order)):
            positions[key] = (float(column), float(row))
    return positions
