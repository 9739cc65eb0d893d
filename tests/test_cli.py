"""The CLI as users meet it: start-up cost, and one clear exit-2 message (no traceback, nothing published)
for every mistake a user can make."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO


def test_importing_the_cli_does_not_import_torch() -> None:
    code = ("import sys, align.cli; heavy = {'torch', 'transformers', 'trl', 'peft', 'datasets'} & set(sys.modules);"
            "print(sorted(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_cli_builds_no_pydantic_model_to_start() -> None:
    """`align --help` reads the stage registry; the manifest models behind it load only when a manifest does."""
    code = "import sys, align.cli; print(sorted({'pydantic', 'align.recipe', 'align.manifest'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_help_lists_every_command(run_align: Callable) -> None:
    result = run_align("--help")
    assert result.returncode == 0
    for command in ("sft", "recipe", "data", "artifacts"):
        assert command in result.stdout


CARD = """\
name: errs
description: test card
license: MIT
source:
  path: {data}
format: messages
eval:
  size: 2
"""
GOOD_ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}


def make_recipe(tmp_path: Path, *, recipe_extra: str = "", rows: list[str] | None = None,
                data: str = "rows.jsonl", model: str = "base: some-org/model-we-never-load") -> Path:
    lines = rows if rows is not None else [json.dumps(GOOD_ROW)] * 8
    (tmp_path / "rows.jsonl").write_text("".join(line + "\n" for line in lines))
    (tmp_path / "card.yaml").write_text(CARD.format(data=data))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"stage: sft\nname: errs\nmodel:\n  {model}\ndata:\n  card: card.yaml\n{recipe_extra}")
    return recipe


ERROR_CASES = {
    "unknown key": (dict(recipe_extra="train:\n  learnin_rate: 0.1\n"),
                    r"recipe.yaml:8: train.learnin_rate: unknown key \(did you mean 'learning_rate'\?\)"),
    "wrong type": (dict(recipe_extra="train:\n  per_device_train_batch_size: many\n"),
                   r"recipe.yaml:8: train.per_device_train_batch_size: Input should be a valid integer"),
    "yaml syntax": (dict(recipe_extra="train: {learning_rate: 1\n"), r"recipe.yaml:\d+: YAML syntax error"),
    "missing data file": (dict(data="nowhere.jsonl"), r"nowhere.jsonl"),
    "malformed jsonl line": (dict(rows=[json.dumps(GOOD_ROW)] * 3 + ['{"messages": [}'] + [json.dumps(GOOD_ROW)] * 4),
                             r"rows.jsonl:4"),
    "missing field": (dict(rows=[json.dumps(GOOD_ROW)] * 5 + ['{"conversation": []}'] + [json.dumps(GOOD_ROW)] * 2),
                      r"rows.jsonl:6: .*messages"),
    "empty dataset": (dict(rows=[]), r"no usable rows"),
    "unknown artifact": (dict(model="from: nothing-here@v1"), r"nothing-here"),
    "missing base dir": (dict(model="base: ./no/such/model"), r"model.base: .*does not exist"),
    "hub model offline": (dict(model="base: align-tests/model-that-is-not-cached"),
                          r"model.base: cannot load 'align-tests/model-that-is-not-cached' from the Hugging Face hub: "
                          r"the hub is unreachable offline"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES), ids=list(ERROR_CASES))
def test_user_errors_exit_2_with_one_message(case: str, tmp_path: Path, run_align: Callable) -> None:
    kwargs, pattern = ERROR_CASES[case]
    recipe = make_recipe(tmp_path, **kwargs)
    registry = tmp_path / "registry"
    result = run_align("sft", recipe, "--registry", registry)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")
    assert pytest.importorskip("re").search(pattern, result.stderr), result.stderr
    assert not list(registry.glob("*/v*")), "a failed run must not publish anything"


@pytest.mark.parametrize("args", [["score"], ["eval", "x", "--data", "y", "--limit", "0"],
                                  ["data", "preview", "card.yaml", "--split", "test"], ["sft"]],
                         ids=["missing argument", "out of range", "not a choice", "no recipe"])
def test_usage_errors_exit_2_without_a_traceback(args: list[str], run_align: Callable) -> None:
    """Typer >= 0.29 raises its own vendored click's exceptions; they are usage errors all the same."""
    result = run_align(*args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Error:" in result.stderr, result.stderr[-2000:]


def test_hub_dataset_offline_is_reported_plainly(tmp_path: Path, run_align: Callable) -> None:
    card = tmp_path / "hub.yaml"
    card.write_text("name: hub\ndescription: d\nlicense: MIT\nsource:\n  hub: align-tests/dataset-not-cached\n"
                    "format: messages\n")
    result = run_align("data", "validate", card)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "align-tests/dataset-not-cached" in result.stderr and "offline" in result.stderr, result.stderr


def test_recipe_show_applies_overrides(run_align: Callable) -> None:
    result = run_align("recipe", "show", "recipes/tiny/sft.yaml", "--set", "train.learning_rate=0.5")
    assert result.returncode == 0, result.stderr
    assert "learning_rate: 0.5" in result.stdout


def test_recipe_show_resolved_picks_cpu_precision_by_model_size(tmp_path: Path, run_align: Callable,
                                                                 stories_dir: Path) -> None:
    """`auto` is bf16 autocast only on a CPU with bf16 units and a model of hidden size >= 256, from the config
    alone (the large model here is a config without weights); fp32 for stories260K (hidden 64) and when
    ALIGN_CPU_BF16=0."""
    from align.device import cpu_bf16_flags

    large = tmp_path / "large"
    large.mkdir()
    (large / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 512, "num_hidden_layers": 2,
                                                   "num_attention_heads": 8, "intermediate_size": 1024,
                                                   "vocab_size": 512}))

    def precision(base: Path, **env: str) -> str:
        command = [sys.executable, "-m", "align", "recipe", "show", str(REPO / "recipes/tiny/sft.yaml"), "--resolved",
                   "--set", f"model.base={base}", "--registry", str(tmp_path / "registry")]
        shown = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
        assert shown.returncode == 0, shown.stderr[-2000:]
        return next(line.split(":")[1].strip() for line in shown.stdout.splitlines() if "precision:" in line)

    assert precision(stories_dir) == "fp32"
    assert precision(large) == ("bf16" if cpu_bf16_flags() else "fp32")
    assert precision(large, ALIGN_CPU_BF16="0") == "fp32"


def test_recipe_validate_checks_references(run_align: Callable, stories_dir: Path) -> None:
    assert run_align("recipe", "validate", "recipes/tiny/sft.yaml").returncode == 0
    result = run_align("recipe", "validate", "recipes/tiny/sft.yaml", "--set", "data.card=missing.yaml")
    assert result.returncode == 2 and "missing.yaml: file not found" in result.stderr


def test_data_validate_reports_counts_and_token_lengths(run_align: Callable, stories_dir: Path) -> None:
    result = run_align("data", "validate", "data_cards/tiny-sft.yaml", "--tokenizer", stories_dir)
    assert result.returncode == 0, result.stderr
    assert "568 train, 32 eval rows, 0 rejected" in result.stdout
    assert "p90" in result.stdout


def test_data_validate_lists_rejected_rows(tmp_path: Path, run_align: Callable) -> None:
    make_recipe(tmp_path, rows=[json.dumps(GOOD_ROW)] * 4 + ["not json"] + [json.dumps(GOOD_ROW)] * 3)
    result = run_align("data", "validate", tmp_path / "card.yaml")
    assert result.returncode == 2
    assert "rows.jsonl:5" in result.stdout and "1 rejected" in result.stdout


def test_data_preview_shows_converted_rows(run_align: Callable) -> None:
    result = run_align("data", "preview", REPO / "data_cards/demo-sft.yaml", "-n", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("train row") == 2 and "assistant" in result.stdout
