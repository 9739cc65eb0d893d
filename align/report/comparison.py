"""The numbers of evaluations as table cells, formatted once for every front end (the HTML report, the console).

Plain strings only (no rich, no HTML): `value ± stderr` with standard errors clustered by prompt, and '–' for a
value that was not measured (a null KL: greedy or top_p < 1 sampling; no reward model given).
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from align.artifacts import Artifact
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
