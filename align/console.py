"""How results look in a terminal: rich tables and trees for the CLI's commands (the HTML report has its own).

Every text that comes from data (prompts, replies, refs, notes) is escaped: rich would read "[sft]" as markup.
Rich is imported inside the functions, so importing this module (and `align --help`) stays cheap.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from rich.markup import escape

if TYPE_CHECKING:
    from align.artifacts import Artifact
    from align.data import DataCard, LoadedData
    from align.eval_result import EvalResult
    from align.lineage import LineageNode
    from align.rewards import RowScores


def console(stderr: bool = False) -> Any:
    from rich.console import Console

    # Piped output (make, CI logs) gets 120 columns rather than rich's 80, so tables keep their numbers whole.
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=None if stream.isatty() else 120)


def summary_table(artifact: Artifact) -> Any:
    """What a stage just published: where, from what, how long, and its metrics."""
    from rich.table import Table

    manifest = artifact.manifest
    table = Table(title=escape(f"{manifest.stage} -> {artifact.ref}"), show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("artifact", escape(artifact.ref))
    table.add_row("path", escape(str(artifact.path)))
    table.add_row("started from", escape(manifest.started_from))
    table.add_row("duration", f"{manifest.duration_s:.1f} s")
    for key, value in manifest.metrics.model_dump().items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else escape(str(value)))
    return table


def eval_table(result: EvalResult) -> Any:
    """`align eval`'s numbers, artifact against parent (`report.comparison.eval_summary_rows`)."""
    from rich.table import Table

    from align.report.comparison import eval_summary_rows

    settings = result.settings
    table = Table(title=escape(f"{result.artifact} vs its parent {result.parent}: {result.prompts} prompts x "
                               f"{settings.num_samples} samples (seed {settings.seed}, temperature "
                               f"{settings.temperature}); ± is a standard error clustered by prompt"))
    for column in ("metric", "parent", "artifact", "change"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for row in eval_summary_rows(result):
        table.add_row(escape(row.metric), row.parent, row.artifact, row.change)
    if result.kl_note:
        table.caption = escape(f"KL {result.kl_note}")
    return table


def examples_table(result: EvalResult) -> Any:
    """The first sample of the first prompts, parent beside artifact, with their judge scores."""
    from rich.table import Table

    table = Table(title="samples (first sample of the first prompts)", show_lines=True)
    for column in ("prompt", "parent", "artifact"):
        table.add_column(column, overflow="fold")
    for example in result.examples[:4]:
        table.add_row(escape(example.prompt), escape(f"{example.parent}  [{example.judge_parent:+.2f}]"),
                      escape(f"{example.artifact}  [{example.judge_artifact:+.2f}]"))
    return table


def comparison_table(evals: list[tuple[Artifact, EvalResult]]) -> Any:
    """`align compare`: the report's comparison rows turned on their side (one column per model), so the table
    fits a terminal."""
    from rich.table import Table

    from align.report.comparison import COMPARISON_HEADERS, comparison_rows

    rows = comparison_rows(evals)
    table = Table(title="evaluations against their parents (± standard errors clustered by prompt)")
    table.add_column(COMPARISON_HEADERS[0])
    for row in rows:
        table.add_column(escape(row.model + (" (parent)" if row.is_parent else "")), justify="right",
                         style="dim" if row.is_parent else None)
    for index, header in enumerate(COMPARISON_HEADERS[1:], start=1):
        table.add_row(header, *(escape(row.cells[index]) for row in rows))
    return table


def scores_table(source: str, rows: list[dict[str, Any]], scores: RowScores) -> Any:
    """`align score`: each row's prompt and the score of each of its replies."""
    from rich.table import Table

    table = Table(title=escape(f"{source} scores"))
    for column in ("#", "prompt", *scores.columns):
        table.add_column(column, justify="left" if column == "prompt" else "right")
    for row, record in zip(rows, scores.records(), strict=True):
        table.add_row(str(record["index"]), escape(row["prompt"][-1]["content"][:60]),
                      *(f"{record[key]:+.4f}" for key in scores.columns))
    if scores.pairwise:
        metrics = scores.pairwise
        table.caption = (f"accuracy {metrics['accuracy']:.3f}, mean margin {metrics['margin_mean']:+.4f} over "
                         f"{metrics['pairs']} pairs")
    return table


def card_summary(label: str, card: DataCard, data: LoadedData, shown: int = 20) -> Any:
    """`align data validate`: row counts, the files read with their hashes, the first rejected rows with their
    file:line and reason."""
    from rich.console import Group
    from rich.text import Text

    lines = [Text(f"{label}: {card.name} ({card.format}): {len(data.train)} train, {len(data.eval)} eval rows, "
                  f"{len(data.rejected)} rejected")]
    lines += [Text(f"  {file['path']}  sha256 {file['sha256'][:16]}...") for file in data.files]
    lines += [Text.assemble("  ", ("rejected", "red"), f" {rejected.location}: {rejected.reason}")
              for rejected in data.rejected[:shown]]
    if len(data.rejected) > shown:
        lines.append(Text(f"  ... and {len(data.rejected) - shown} more"))
    return Group(*lines)


def artifacts_table(title: str, artifacts: list[Artifact]) -> Any:
    """`align artifacts list`: every version with its stage, creation time, parents and data."""
    from rich.table import Table

    table = Table(title=escape(title))
    for column in ("ref", "stage", "created", "from", "data"):
        table.add_column(column)
    for artifact in artifacts:
        manifest = artifact.manifest
        parents = ", ".join(p.ref for p in manifest.parents) or manifest.base_model.spec
        table.add_row(*map(escape, (artifact.ref, manifest.stage, manifest.created[:19], parents,
                                    ", ".join(d.name for d in manifest.data))))
    return table


def lineage_tree(root: LineageNode) -> Any:
    """`align artifacts lineage`: the registry's lineage tree, each node with its role, stage, base and data."""
    from rich.tree import Tree

    def label(node: LineageNode) -> str:
        if node.missing:
            return escape(f"{node.ref} (missing)")
        role = f"{node.role}: " if node.role else ""
        data = f" data={','.join(node.data)}" if node.data else ""
        return escape(f"{role}{node.ref} [{node.stage}] base={node.base_model}{data}")

    shown: set[str] = set()  # a DAG drawn as a tree: an ancestor reached twice (iterative DPO) is expanded once

    def grow(branch: Any, node: LineageNode) -> Any:
        for parent in node.parents:
            if parent.ref in shown and parent.parents:
                branch.add(label(parent) + " (as above)")
                continue
            shown.add(parent.ref)
            grow(branch.add(label(parent)), parent)
        return branch

    return grow(Tree(label(root)), root)
