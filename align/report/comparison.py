"""The numbers of evaluations as table cells, formatted once for every front end (the HTML report, the console).

Plain strings only (no rich, no HTML): `value ± stderr` with standard errors clustered by prompt, and '–' for a
value that was not measured (a null KL: greedy or top_p < 1 sampling; no reward model given).
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from align.artifacts import Artifact
    from align.bench_eval import BenchResult, BenchTask
    from align.eval_result import EvalResult, EvalSide

NOT_MEASURED = "–"

COMPARISON_HEADERS = ("model", "vs parent", "judge", "Δ judge", "reward", "KL to parent", "win rate",
                      "length (tokens)", "distinct-2", "ref NLL / token", "eval setup")


def plus_minus(value: float | None, stderr: float | None, spec: str = ".3f") -> str:
    """`value ± stderr` with the value in format `spec`; the value alone without a stderr; '–' without a value."""
    if value is None:
        return NOT_MEASURED
    text = format(value, spec)
    return f"{text} ± {stderr:.3f}" if stderr is not None else text


@dataclass(frozen=True)
class ComparisonRow:
    """One line of the comparison table, cells in `COMPARISON_HEADERS` order: an evaluated policy, or (with
    `is_parent`) the parent its following policies were measured against (then `parent` and the deltas are
    empty and its KL to itself is 0)."""

    model: str
    parent: str
    judge: str
    judge_delta: str
    reward: str
    kl: str
    win_rate: str
    length: str
    distinct_2: str
    ref_nll: str
    setup: str
    is_parent: bool = False

    @property
    def cells(self) -> tuple[str, ...]:
        return astuple(self)[:len(COMPARISON_HEADERS)]


def _side_cells(side: EvalSide) -> dict[str, str]:
    return {"judge": plus_minus(side.judge, side.judge_stderr, "+.3f"),
            "reward": plus_minus(side.reward, side.reward_stderr, "+.3f"),
            "length": f"{side.length_tokens:.1f}", "distinct_2": f"{side.distinct_2:.3f}",
            "ref_nll": f"{side.ref_nll_per_token:.3f}"}


def comparison_rows(evals: list[tuple[Artifact, EvalResult]]) -> list[ComparisonRow]:
    """Every evaluated policy beside its parent: each parent once (per distinct measurement of it), followed by
    the policies evaluated against it, in the order given."""
    groups: dict[tuple[str, str], list[tuple[Artifact, EvalResult]]] = {}
    for artifact, result in evals:
        groups.setdefault((result.parent, result.parent_model.model_dump_json()), []).append((artifact, result))
    rows = []
    for (parent_ref, _), members in groups.items():
        rows.append(ComparisonRow(model=parent_ref, parent="", judge_delta="", kl="0", win_rate="", setup="",
                                  is_parent=True, **_side_cells(members[0][1].parent_model)))
        for artifact, result in members:
            settings = result.settings
            rows.append(ComparisonRow(
                model=artifact.ref, parent=result.parent,
                judge_delta=plus_minus(result.judge_delta, result.judge_delta_stderr, "+.3f"),
                kl=plus_minus(result.kl, result.kl_stderr),
                win_rate=plus_minus(result.win_rate, result.win_rate_stderr),
                setup=f"{result.prompts} prompts × {settings.num_samples}, judge {settings.judge}, "
                      f"seed {settings.seed}",
                **_side_cells(result.policy)))
    return rows


@dataclass(frozen=True)
class SummaryRow:
    """One line of `align eval`'s table: a metric for the parent and the artifact, and the change."""

    metric: str
    parent: str
    artifact: str
    change: str


def eval_summary_rows(result: EvalResult) -> list[SummaryRow]:
    """The metrics of one evaluation, artifact against parent: judge, reward, KL, win rate, fluency guards."""
    policy, parent = result.policy, result.parent_model
    rows = [SummaryRow(f"judge ({result.settings.judge})", plus_minus(parent.judge, parent.judge_stderr, "+.3f"),
                       plus_minus(policy.judge, policy.judge_stderr, "+.3f"),
                       plus_minus(result.judge_delta, result.judge_delta_stderr, "+.3f"))]
    if policy.reward is not None and parent.reward is not None:
        rows.append(SummaryRow("reward", plus_minus(parent.reward, parent.reward_stderr, "+.3f"),
                               plus_minus(policy.reward, policy.reward_stderr, "+.3f"),
                               plus_minus(policy.reward - parent.reward, result.reward_delta_stderr, "+.3f")))
    # KL at the sampling temperature; null (shown '–', kl_note says why) when greedy or top_p < 1 sampled.
    rows += [SummaryRow("KL to parent (nats/seq)", "0", plus_minus(result.kl, result.kl_stderr), ""),
             SummaryRow("KL to parent (nats/token)", "0", plus_minus(result.kl_per_token, None, ".4f"), ""),
             SummaryRow(f"win rate ({result.win_rate_by})", "", plus_minus(result.win_rate, result.win_rate_stderr),
                        "")]
    for label, parent_value, policy_value in (
            ("length (tokens)", parent.length_tokens, policy.length_tokens),
            ("distinct-2", parent.distinct_2, policy.distinct_2),
            ("reference NLL / token", parent.ref_nll_per_token, policy.ref_nll_per_token)):
        rows.append(SummaryRow(label, f"{parent_value:.3f}", f"{policy_value:.3f}",
                               f"{policy_value - parent_value:+.3f}"))
    return rows


BENCH_HEADERS = ("model", "vs parent", "task", "metric", "parent", "artifact", "Δ", "setup")


@dataclass(frozen=True)
class BenchRow:
    """One metric of one lm-eval task of `align bench-eval`: the parent's and the artifact's value (± lm-eval's
    standard error) and the change, cells in `BENCH_HEADERS` order."""

    model: str
    parent: str
    task: str
    metric: str
    parent_value: str
    artifact_value: str
    delta: str
    setup: str

    @property
    def cells(self) -> tuple[str, ...]:
        return astuple(self)


def bench_setup(task: BenchTask) -> str:
    """How a task was measured, in a few words: documents, shots, precision, lm-eval version, and the first 8 hex
    digits of the hashes of its config and documents (equal where two artifacts ran the same task the same way)."""
    documents = "group" if task.samples is None else f"{task.samples} docs"
    shots = "default shots" if task.num_fewshot is None else f"{task.num_fewshot}-shot"
    hashes = "".join(f", {label} {digest[:8]}" for label, digest in (("config", task.config_sha256),
                                                                     ("docs", task.docs_sha256)) if digest)
    return f"{documents}, {shots}, {task.precision}, lm-eval {task.lm_eval_version}{hashes}"


def bench_differences(benches: list[tuple[Artifact, BenchResult]]) -> list[str]:
    """The tasks that the given artifacts' bench_eval.json files measured in more than one way (another config,
    other documents, limit, shots, precision or lm-eval version): their scores are not comparable across rows."""
    setups: dict[str, set[str]] = {}
    for _, result in benches:
        for name, task in result.tasks.items():
            setups.setdefault(name, set()).add(bench_setup(task))
    return sorted(name for name, seen in setups.items() if len(seen) > 1)


def bench_rows(benches: list[tuple[Artifact, BenchResult]]) -> list[BenchRow]:
    """Every metric of every task of every artifact's bench_eval.json, tasks by name, in the order given.
    The change is artifact minus parent; '–' where either side has no value."""
    rows = []
    for artifact, result in benches:
        for name, task in sorted(result.tasks.items()):
            for metric, measured in task.artifact.items():
                parent = task.parent.get(metric)
                parent_value = parent.value if parent is not None else None
                delta = (measured.value - parent_value if measured.value is not None and parent_value is not None
                         else None)
                rows.append(BenchRow(
                    model=artifact.ref, parent=result.parent, task=name, metric=metric,
                    parent_value=plus_minus(parent_value, parent.stderr if parent is not None else None, ".4f"),
                    artifact_value=plus_minus(measured.value, measured.stderr, ".4f"),
                    delta=plus_minus(delta, None, "+.4f"), setup=bench_setup(task)))
    return rows
