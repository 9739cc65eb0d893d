"""The report page, rendered from the Jinja2 templates in `templates/` with autoescaping on: every name, number
and sample text that comes from an artifact is escaped by the template engine, never by hand."""

from __future__ import annotations

import base64
import functools
import re
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from jinja2 import Environment, PackageLoader, StrictUndefined

from align.report.comparison import BENCH_HEADERS, COMPARISON_HEADERS, bench_rows, comparison_rows
from align.report.extract import (
    LOG_FILE,
    artifact_benches,
    artifact_evals,
    artifact_facts,
    artifact_metrics,
    curve_series,
    frontier_series,
    group_curves,
    read_log_history,
)
from align.report.layout import lineage_graph, lineage_trees, top_trees
from align.report.plots import plot_curves, plot_frontier, plot_lineage
from align.stages import STAGES

if TYPE_CHECKING:
    from align.artifacts import Artifact, Registry
    from align.eval_result import EvalResult


def anchor(ref: str) -> str:
    """The id of an artifact's section (refs hold '@', which is awkward in a URL fragment)."""
    return "artifact-" + re.sub(r"[^A-Za-z0-9_-]+", "-", ref)


@functools.cache
def _environment() -> Environment:
    environment = Environment(loader=PackageLoader("align.report"), autoescape=True, undefined=StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    environment.filters["anchor"] = anchor
    environment.globals["comparison_headers"] = COMPARISON_HEADERS
    environment.globals["bench_headers"] = BENCH_HEADERS
    return environment


def _macro(name: str, *args: Any) -> str:
    """One macro of `macros.html.j2` rendered alone."""
    return str(getattr(_environment().get_template("macros.html.j2").module, name)(*args))


@dataclass(frozen=True)
class Image:
    """A PNG inlined as a `data:` URI, with its alt text."""

    src: str
    alt: str

    @classmethod
    def of(cls, png: bytes, alt: str) -> Image:
        return cls("data:image/png;base64," + base64.b64encode(png).decode("ascii"), alt)


@dataclass(frozen=True)
class ArtifactSection:
    """What the page shows of one artifact: its manifest facts and metrics, and its training curves."""

    ref: str
    stage: str
    facts: list[tuple[str, str]]
    metrics: list[tuple[str, str]]
    curves: Image | None
    no_curves_because: str


def artifact_section(artifact: Artifact) -> ArtifactSection:
    stage = artifact.manifest.stage
    grouped = group_curves(curve_series(read_log_history(artifact)))
    curves = Image.of(plot_curves(grouped, f"{artifact.ref} training curves"),
                      f"training curves of {artifact.ref}: {', '.join(grouped)}") if grouped else None
    why = "a dataset artifact" if STAGES[stage].produces == "dataset" else f"no numeric entries in {LOG_FILE}"
    return ArtifactSection(ref=artifact.ref, stage=stage, facts=artifact_facts(artifact),
                           metrics=artifact_metrics(artifact), curves=curves, no_curves_because=why)


def render_report(registry: Registry, artifacts: list[Artifact]) -> str:
    """The whole HTML document for `artifacts`: lineage, one section per artifact, and (when any has an
    eval.json) the reward–KL frontier, the comparison table and samples."""
    evals = artifact_evals(artifacts)
    trees = lineage_trees(registry, artifacts)
    nav = [("lineage", "lineage"), ("artifacts", "artifacts"), ("frontier", "reward–KL frontier")]
    context: dict[str, Any] = {}
    if evals:
        nav += [("comparison", "comparison"), ("samples", "samples")]
        context = {
            "frontier_image": Image.of(plot_frontier(frontier_series(evals)),
                                       "reward-KL frontier of " + ", ".join(a.ref for a, _ in evals)),
            "unplaced": [(a.ref, r.kl_note or "no kl in eval.json") for a, r in evals if r.kl is None],
            "comparison_rows": comparison_rows(evals),
        }
    # lm-eval benchmarks (bench_eval.json): their own table, with or without any eval.json.
    benches = bench_rows(artifact_benches(artifacts))
    if benches:
        nav.append(("benchmarks", "benchmarks"))
    return _environment().get_template("report.html.j2").render(
        title=f"align report: {', '.join(a.ref for a in artifacts)}", registry_root=registry.root,
        generated=datetime.now().astimezone().isoformat(timespec="seconds"), nav=nav, artifacts=artifacts,
        lineage_image=Image.of(plot_lineage(lineage_graph(trees)), "lineage graph: base model, then each artifact "
                               "with its stage and data cards, arrows from parent to child"),
        lineage_trees=top_trees(trees), sections=[artifact_section(a) for a in artifacts], evals=evals,
        bench_rows=benches, **context)


def render_samples(artifact_ref: str, result: EvalResult) -> str:
    """Prompt | parent reply | artifact reply, with judge scores, as the report shows them."""
    return _macro("samples", artifact_ref, result)


def render_comparison(evals: list[tuple[Artifact, EvalResult]]) -> str:
    """The comparison table of evaluated policies and their parents, as the report shows it."""
    return _macro("comparison", comparison_rows(evals))
