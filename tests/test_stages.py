"""The stage registry is the one declaration of a stage: each entry has its command, its recipe section, its
README row, a tiny recipe and a manifest model fixed to its name."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
from typer.testing import CliRunner

from align.cli import app
from align.recipe import Recipe, load_recipe
from align.stages import STAGES

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_each_stage_has_its_command_section_readme_row_and_tiny_recipe(name: str) -> None:
    stage = STAGES[name]
    result = CliRunner().invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert stage.summary.split(":")[0] in " ".join(result.output.split())
    assert ("--resume" in result.output) == stage.resumable
    assert stage.section in Recipe.model_fields and stage.section in stage.sections
    readme = (REPO / "README.md").read_text()
    assert f"| `align {name} RECIPE" in readme, f"README's command table has no row for align {name}"
    recipe = load_recipe(REPO / "recipes" / "tiny" / f"{name}.yaml")
    assert recipe.stage == name
    assert typing.get_args(stage.manifest.model_fields["stage"].annotation) == (name,)
    metrics = stage.manifest.model_fields["metrics"].annotation
    assert set(stage.headline) <= set(metrics.model_fields), "bench headlines name metrics the stage records"


def test_policy_stages_are_what_eval_accepts() -> None:
    from align.stages import stages_producing

    assert set(stages_producing("policy")) == {"sft", "dpo", "kto", "orpo", "simpo", "ppo", "grpo", "rloo"}
    assert stages_producing("reward") == ("reward",) and stages_producing("dataset") == ("pairs",)
