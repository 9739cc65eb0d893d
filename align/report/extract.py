"""What the report shows, read from artifacts: training curves from TRL's log, manifest facts, frontier points.

Manifests and eval.json arrive typed (`Artifact.manifest`, `EvalResult`); only `log_history.json`, TRL's own
free-form log, is read defensively: a report shows whatever numbers it holds.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from align.eval_result import EvalResult
from align.stages import STAGES, stages_producing

if TYPE_CHECKING:
    from align.artifacts import Artifact
    from align.bench_eval import BenchResult

LOG_FILE = "log_history.json"

Series = dict[str, list[tuple[float, float]]]

# Keys in TRL's log_history that are bookkeeping, not curves worth a panel.
_SKIP_KEYS = {"step", "epoch", "total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second"}
_SKIP_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second", "_preparation_time")

# Panel order and how a log key joins a panel: a substring of the key, or (for short, ambiguous words like
# "kl", "lr", "len", "ratio") a whole `_`/`/`-separated token of it. First match wins, so the narrow groups
# (accuracies inside `rewards/accuracies`, KL inside `objective/kl`) come before the broad ones.
_GROUPS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("accuracies / win rates", ("accurac", "win_rate"), ("acc",)),
    ("margins", ("margin",), ()),
    ("fractions", ("clipfrac", "frac_", "fraction"), ("ratio", "frac")),
    ("KL", (), ("kl",)),
    ("losses", ("loss",), ()),
    ("rewards / scores", ("reward", "score", "advantage"), ()),
    ("lengths", ("length",), ("len",)),
    ("log-probs", ("logps", "logprob"), ()),
    ("logits", ("logits",), ()),
    ("learning rate", ("learning_rate",), ("lr",)),
    ("grad norm", ("grad_norm",), ()),
    ("entropy", ("entropy",), ()),
    ("throughput", ("per_second",), ()),
    ("tokens seen", ("num_tokens",), ()),
)
_OTHER = "other"


# ---- training curves (TRL's log_history.json) -----------------------------------------------------------------


def read_log_history(artifact: Artifact) -> Any:
    """The decoded `log_history.json` of an artifact; None when absent or unreadable (it then has no curves)."""
    try:
        return json.loads((artifact.path / LOG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _number(value: Any) -> float | None:
    """A finite float from an int/float/numeric string; None for bools, text, NaN and inf."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def _skipped_key(key: str) -> bool:
    return key in _SKIP_KEYS or key.endswith(_SKIP_SUFFIXES)


def curve_series(log_history: Any) -> Series:
    """`{key: [(step, value), ...]}` for every numeric key of a log history; the final summary entry is left out."""
    series: Series = {}
    if not isinstance(log_history, list):
        return series
    for index, entry in enumerate(log_history):
        # TRL ends with one summary entry (train_runtime, train_loss, ...): totals, not points on a curve.
        if not isinstance(entry, dict) or "train_runtime" in entry:
            continue
        step = _number(entry.get("step"))
        x = step if step is not None else float(index)
        for key, value in entry.items():
            number = _number(value)
            if number is not None and isinstance(key, str) and not _skipped_key(key):
                series.setdefault(key, []).append((x, number))
    return series


def curve_group(key: str) -> str:
    """The panel a log key belongs to, by name (`eval_` keys join their training counterparts)."""
    name = key.lower().removeprefix("eval_").removeprefix("eval/")
    tokens = set(re.split(r"[^a-z0-9]+", name))
    for group, substrings, words in _GROUPS:
        if any(part in name for part in substrings) or tokens & set(words):
            return group
    return _OTHER


def group_curves(series: Series) -> dict[str, Series]:
    """Series grouped into panels, in the fixed panel order, `other` last."""
    grouped: dict[str, Series] = {}
    for key, points in series.items():
        grouped.setdefault(curve_group(key), {})[key] = points
    order = [group[0] for group in _GROUPS] + [_OTHER]
    return {name: grouped[name] for name in order if name in grouped}


# ---- manifest facts ----------------------------------------------------------------------------------------------


def format_value(value: Any) -> str:
    """Numbers to 4 significant digits; containers as compact JSON; None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def artifact_facts(artifact: Artifact) -> list[tuple[str, str]]:
    """(label, text) of what the manifest says the artifact is and how it was made; empty facts left out."""
    manifest = artifact.manifest
    recipe_name = manifest.recipe.get("name")
    facts = [
        ("path", str(artifact.path)),
        ("created", manifest.created),
        ("parents", ", ".join(f"{entry.role}: {entry.ref}" for entry in manifest.parents)),
        ("base model", manifest.base_model.spec),
        ("data cards", ", ".join(summary.name for summary in manifest.data)),
        ("recipe", " · ".join(str(part) for part in (recipe_name, manifest.recipe_path) if part)),
        ("duration", f"{manifest.duration_s:.1f} s"),
        ("device", ", ".join(f"{key}={format_value(value)}" for key, value in manifest.device.model_dump().items()
                             if value not in (None, ""))),
    ]
    return [(label, text) for label, text in facts if text]


def artifact_metrics(artifact: Artifact) -> list[tuple[str, str]]:
    """(metric, formatted value) of every metric the stage recorded, in the manifest's order."""
    return [(key, format_value(value)) for key, value in artifact.manifest.metrics.model_dump().items()]


# ---- evaluations and the reward-KL frontier ----------------------------------------------------------------------


def artifact_benches(artifacts: list[Artifact]) -> list[tuple[Artifact, BenchResult]]:
    """The artifacts `align bench-eval` has run lm-eval tasks on, each with its bench_eval.json (typed: one that
    does not validate is an ArtifactError naming the file and the field)."""
    from align.bench_eval import BenchResult  # imports no ML library; kept local like the command that writes it

    return [(artifact, result) for artifact in artifacts if (result := BenchResult.of(artifact.path)) is not None]


def artifact_evals(artifacts: list[Artifact]) -> list[tuple[Artifact, EvalResult]]:
    """The artifacts `align eval` has evaluated, each with its eval.json (one that does not validate is an
    ArtifactError naming the file and the field)."""
    return [(artifact, result) for artifact in artifacts if (result := EvalResult.of(artifact.path)) is not None]


@dataclass(frozen=True)
class FrontierPoint:
    """One evaluated policy in one frontier panel: its rise over its parent at its KL to that parent."""

    ref: str
    stage: str
    kl: float  # nats per sequence
    kl_stderr: float | None
    rise: float  # policy minus parent, in the panel's score
    rise_stderr: float | None
    parent: str
    parent_score: float | None  # the parent's own score (the rise is measured from it)
    label: str  # the stage's KL coefficient from its settings, e.g. "β=0.1"; else the ref


_FRONTIER_STAGE_ORDER = stages_producing("policy")  # registry order: sft first, then the methods

Frontier = dict[str, dict[str, list[FrontierPoint]]]


def frontier_series(evals: list[tuple[Artifact, EvalResult]]) -> Frontier:
    """Frontier points by panel, then by stage (method), each stage's points in KL order.

    One panel per eval judge (`settings.judge`: the objective), titled `judge SPEC`, with the judge rise over the
    parent (`judge_delta` ± `judge_delta_stderr`, paired); and one per reward model scored beside it
    (`settings.reward`), titled `reward model REF`, with the reward rise (± `reward_delta_stderr`, or the parent's
    and policy's stderrs in quadrature for eval.json files written before it was recorded). x is `kl`, nats per
    sequence; an evaluation without a KL (null: greedy or top_p < 1) is left out."""
    panels: Frontier = {}

    def add(panel: str, stage: str, point: FrontierPoint) -> None:
        panels.setdefault(panel, {}).setdefault(stage, []).append(point)

    for artifact, result in evals:
        if result.kl is None:
            continue
        stage = artifact.manifest.stage
        policy, parent = result.policy, result.parent_model
        common = {"ref": artifact.ref, "stage": stage, "kl": result.kl, "kl_stderr": result.kl_stderr,
                  "parent": result.parent, "label": coefficient_label(artifact)}
        add(f"judge {result.settings.judge}", stage, FrontierPoint(
            rise=result.judge_delta, rise_stderr=result.judge_delta_stderr, parent_score=parent.judge, **common))
        if policy.reward is not None and parent.reward is not None:
            stderr = result.reward_delta_stderr
            if stderr is None and policy.reward_stderr is not None and parent.reward_stderr is not None:
                stderr = math.hypot(policy.reward_stderr, parent.reward_stderr)  # an overestimate: unpaired
            add(f"reward model {result.settings.reward or '?'}", stage, FrontierPoint(
                rise=policy.reward - parent.reward, rise_stderr=stderr, parent_score=parent.reward, **common))
    order = {stage: index for index, stage in enumerate(_FRONTIER_STAGE_ORDER)}
    return {panel: {stage: sorted(by_stage[stage], key=lambda p: (p.kl, p.ref))
                    for stage in sorted(by_stage, key=lambda s: (order.get(s, len(order)), s))}
            for panel, by_stage in sorted(panels.items(), key=lambda item: (item[0].startswith("reward"), item[0]))}


def coefficient_label(artifact: Artifact) -> str:
    """`β=0.1` / `kl_coef=0.05` / `target_kl=6` from the stage's settings (its registry entry's `kl_settings`,
    first one set); the ref for stages without one."""
    manifest = artifact.manifest
    section = getattr(manifest, STAGES[manifest.stage].section, None)
    for name in STAGES[manifest.stage].kl_settings:
        value = getattr(section, name, None)
        if value is not None:
            return f"{'β' if name == 'beta' else name}={value:g}"
    return artifact.ref
