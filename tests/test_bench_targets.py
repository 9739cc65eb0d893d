"""bench/run.py's verdicts on issue 14's demo targets: met or not met, from the measured values."""

from __future__ import annotations

import sys
from types import SimpleNamespace

from conftest import REPO, bench_module


def report(delta: float, distinct: float, nll_rise: float, prompts: int = 64, samples: int = 128) -> SimpleNamespace:
    return SimpleNamespace(judge_delta=delta, judge_delta_stderr=0.04, prompts=prompts, samples=samples,
                           policy=SimpleNamespace(distinct_2=distinct), ref_nll_rise=nll_rise)


def test_each_demo_target_is_met_or_not_by_its_own_value() -> None:
    sys.path.insert(0, str(REPO / "bench"))  # run.py imports its sibling trl_baseline
    run = bench_module("run")
    rows = run.demo_target_rows(11.5, {"dpo": report(0.321, 0.81, 0.06), "ppo": report(0.24, 0.35, 0.31)},
                                0.82, 128)
    verdicts = {name.removeprefix("target: "): verdict for name, _, _, verdict in rows}
    assert verdicts == {
        "demo chain <= 12 min": "met",
        "demo-dpo judge rise >= +0.30 (64 prompts x 2, >= 64 x 2)": "met",
        "demo-dpo distinct-2 >= 0.4": "met",
        "demo-dpo reference-NLL rise <= 0.3": "met",
        "demo-ppo judge rise >= +0.25 (64 prompts x 2, >= 64 x 2)": "not met",
        "demo-ppo distinct-2 >= 0.4": "not met",
        "demo-ppo reference-NLL rise <= 0.3": "not met",
        "demo-rm held-out accuracy >= 0.80 on >= 96 pairs": "met",
    }
    small = run.demo_target_rows(12.5, {"dpo": report(0.4, 0.8, 0.0, prompts=32, samples=64),
                                        "ppo": report(0.3, 0.8, 0.0)}, 0.9, 48)
    assert [verdict for _, _, _, verdict in small] == ["not met", "not met", "met", "met", "met", "met", "met",
                                                       "not met"]
