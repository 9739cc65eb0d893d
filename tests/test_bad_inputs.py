"""Bad inputs a user can hand align: each is refused with exit 2, one bounded `error:` message naming the culprit,
no traceback and nothing published, before any weights load."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO

TINY_SFT = REPO / "recipes" / "tiny" / "sft.yaml"
TINY_DPO = REPO / "recipes" / "tiny" / "dpo.yaml"

CARD = "name: c\ndescription: d\nlicense: MIT\nsource:\n  path: rows.jsonl\nformat: messages\n"


def alias_bomb(levels: int = 9) -> str:
    """YAML of a few lines that expands to 10^levels values through aliases ("billion laughs")."""
    lines = ["bomb0: &b0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"bomb{i}: &b{i} [{', '.join([f'*b{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def refused(result: object, *fragments: str) -> None:
    stderr = result.stderr  # type: ignore[attr-defined]
    assert result.returncode == 2, stderr[-2000:]  # type: ignore[attr-defined]
    assert stderr.startswith("error: ") and "Traceback" not in stderr, stderr[-2000:]
    assert len(stderr) < 2000, "an error message must stay short whatever the input"
    for fragment in fragments:
        assert fragment in stderr, stderr


RECIPE_CASES = {
    "duplicate key": ("stage: sft\nname: a\nname: b\nmodel:\n  base: m\ndata:\n  card: c.yaml\n",
                      ("recipe.yaml:3", "'name' is given twice (first on line 2)")),
    "alias bomb": (alias_bomb() + "stage: sft\n", ("recipe.yaml", "expands to", "aliases")),
    "deep nesting": ("stage: sft\ndescription: " + "[" * 5000 + "]" * 5000 + "\n", ("recipe.yaml", "nested")),
    "moderately deep": ("stage: sft\ndescription: " + "[" * 100 + "]" * 100 + "\n", ("recipe.yaml:2", "nested")),
    "huge wrong value": ("stage: sft\nname: a\nmodel:\n  base: m\ndata:\n  card: c.yaml\ntrain:\n  seed: "
                         + "x" * 1_000_000 + "\n", ("recipe.yaml:8", "train.seed", "...")),
    "max_steps 0": ("stage: sft\nname: a\nmodel:\n  base: m\ndata:\n  card: c.yaml\ntrain:\n  max_steps: 0\n",
                    ("recipe.yaml:8", "train.max_steps", "0 is not a step count")),
    "max_steps -5": ("stage: sft\nname: a\nmodel:\n  base: m\ndata:\n  card: c.yaml\ntrain:\n  max_steps: -5\n",
                     ("train.max_steps", "-1 to train for num_train_epochs")),
}


@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_recipe_shapes_that_are_refused(case: str, tmp_path: Path, run_align: Callable) -> None:
    text, fragments = RECIPE_CASES[case]
    (tmp_path / "recipe.yaml").write_text(text)
    refused(run_align("recipe", "validate", tmp_path / "recipe.yaml", timeout=60), *fragments)


@pytest.mark.parametrize(("value", "fragments"), [
    ("lora.target_modules=[q_proj, v_proj", ("--set lora.target_modules=", "YAML syntax error", "quote it")),
    ("train.max_steps=0", ("--set train.max_steps=0", "0 is not a step count")),
])
def test_set_values_that_are_refused(value: str, fragments: tuple[str, ...], run_align: Callable) -> None:
    refused(run_align("recipe", "show", TINY_SFT, "--set", value, timeout=60), *fragments)


def test_flow_style_alias_bomb_in_set_is_bounded(run_align: Callable) -> None:
    bomb = "{" + ", ".join(alias_bomb().splitlines()) + "}"
    refused(run_align("recipe", "show", TINY_SFT, "--set", f"sft={bomb}", timeout=60), "--set sft=", "expands to")


def test_minus_one_still_means_epochs(run_align: Callable) -> None:
    result = run_align("recipe", "show", TINY_SFT, "--set", "train.max_steps=-1")
    assert result.returncode == 0 and "max_steps: -1" in result.stdout, result.stderr


@pytest.mark.parametrize("case", ["duplicate key", "alias bomb"])
def test_card_shapes_that_are_refused(case: str, tmp_path: Path, run_align: Callable) -> None:
    text = CARD.replace("name: c\n", "name: c\nname: d\n") if case == "duplicate key" else alias_bomb() + CARD
    (tmp_path / "card.yaml").write_text(text)
    (tmp_path / "rows.jsonl").write_text("")
    fragments = ("card.yaml:2", "'name' is given twice") if case == "duplicate key" else ("card.yaml", "expands to")
    refused(run_align("data", "validate", tmp_path / "card.yaml", timeout=60), *fragments)


@pytest.mark.parametrize(("start", "fragments"), [
    ("tiny-rm@v1", ("model.from: tiny-rm@v1 is a reward artifact", "reward_model")),
    ("tiny-pairs@v1", ("model.from: tiny-pairs@v1 is a dataset artifact", "data.card")),
])
def test_a_stage_starts_only_from_a_policy(start: str, fragments: tuple[str, ...], reward_artifact: Path,
                                           sft_registry: Path, run_align: Callable) -> None:
    """A DPO recipe starting from a reward artifact once merged the reward adapter into a causal LM, trained and
    published; a dataset artifact asked for sentencepiece. Both are refused by kind, before any weights load."""
    for command in (["recipe", "validate"], ["dpo"]):
        result = run_align(*command, TINY_DPO, "--set", f"model.from={start}", "--set", "name=from-wrong-kind",
                           "--registry", sft_registry)
        refused(result, *fragments)
    assert not (sft_registry / "from-wrong-kind").exists()
