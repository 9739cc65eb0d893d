"""`make pipeline` as CI and users run it: the whole tiny chain once (few steps; two stages at a time, as
`make demo` runs it), then nothing re-runs when nothing changed, and touching a data card re-runs exactly the
stages downstream of it."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from conftest import REPO, align_env

# The commands a stage or an evaluation runs, as make prints them.
STAGE_COMMANDS = {stage: f"align {stage} " for stage in ("sft", "pairs", "reward", "dpo", "ppo")}
STAGE_COMMANDS["eval"] = "align eval "


def make(tmp_path: Path, *extra: str, target: str = "pipeline") -> subprocess.CompletedProcess:
    recipes = tmp_path / "recipes" / "tiny"
    args = [
        "make", "--no-print-directory", *extra, target, f"RECIPES={recipes}", f"REGISTRY={tmp_path / 'registry'}",
        f"EVAL_CARD={tmp_path / 'data_cards' / 'tiny-story-prompts.yaml'}",
        "ARGS_sft=--set train.max_steps=2 --set sft.num_samples=0",
        "ARGS_pairs=--set data.limit=16 --set data.eval_limit=8 --set pairs.max_new_tokens=16",
        "ARGS_reward=--set train.max_steps=2",
        "ARGS_dpo=--set train.max_steps=2",
        "ARGS_ppo=--set train.max_steps=1 --set ppo.rollout_batch_size=16 --set data.eval_limit=4 "
        "--set ppo.max_new_tokens=16",
        "EVAL_ARGS=--limit 4 --num-samples 1 --max-new-tokens 16",
    ]
    env = align_env(tmp_path / "cache")
    env.pop("MAKEFLAGS", None)
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def commands(output: str) -> set[str]:
    return {stage for stage, command in STAGE_COMMANDS.items() if command in output}


def test_pipeline_runs_once_and_then_only_downstream_of_a_change(tmp_path: Path, stories_dir: Path) -> None:
    # A private copy of the recipes and cards, so touching a card does not touch the repository.
    shutil.copytree(REPO / "data_cards", tmp_path / "data_cards")
    shutil.copytree(REPO / "recipes" / "tiny", tmp_path / "recipes" / "tiny")
    sft = tmp_path / "recipes" / "tiny" / "sft.yaml"
    sft.write_text(sft.read_text().replace("../../../shared/models/stories260K", str(stories_dir)))

    # As `make demo` runs it: two lanes on half the cores each (one thread on this machine's two), reward -> ppo
    # beside dpo -> its evaluation; sft, pairs and ppo's evaluation alone on all of them.
    first = make(tmp_path, target="pipeline-j2")
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    assert commands(first.stdout) == set(STAGE_COMMANDS)
    runs = [line for line in first.stdout.splitlines()
            if any(command in line for command in STAGE_COMMANDS.values()) and "recipe deps" not in line]
    side_by_side = {"reward", "dpo", "ppo", "eval tiny-dpo"}
    assert len(runs) == 7, runs  # each stage once, two evaluations
    half = f"OMP_NUM_THREADS={max(1, len(os.sched_getaffinity(0)) // 2)} "
    for line in runs:
        stage = next(stage for stage, command in STAGE_COMMANDS.items() if command in line)
        name = f"eval {line.split('align eval ')[1].split('@')[0]}" if stage == "eval" else stage
        assert line.startswith(half) == (name in side_by_side), line
    # A stage whose output is held back until it ends says when it starts.
    started = {name for name in ("sft", "pairs", "dpo", "reward", "ppo", "eval-dpo", "eval-ppo")
               if f"] {name} started; its output follows when it ends" in first.stdout}
    assert started == {"dpo", "reward", "ppo", "eval-dpo"}, first.stdout[-3000:]
    assert "tiny-ppo@v1" in first.stdout and "tiny-dpo@v1" in first.stdout  # the comparison table
    assert (tmp_path / "registry" / "report-tiny.html").is_file()

    unchanged = make(tmp_path, "-n")
    assert unchanged.returncode == 0, unchanged.stderr[-3000:]
    assert commands(unchanged.stdout) == set(), unchanged.stdout

    # The prompt card feeds pairs (and through them reward and dpo), ppo and the evaluations, not sft.
    card = tmp_path / "data_cards" / "tiny-story-prompts.yaml"
    later = time.time() + 5
    os.utime(card, (later, later))
    downstream = make(tmp_path, "-n")
    assert commands(downstream.stdout) == {"pairs", "reward", "dpo", "ppo", "eval"}, downstream.stdout

    sft_card = tmp_path / "data_cards" / "tiny-sft.yaml"
    os.utime(sft_card, (later, later))
    everything = make(tmp_path, "-n")
    assert commands(everything.stdout) == set(STAGE_COMMANDS), everything.stdout
