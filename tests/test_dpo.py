"""`align dpo` and `align eval` on stories260K: DPO raises the judge's score of held-out continuations without
buying it with broken text, and every loss TRL implements runs."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO

from align.artifacts import Registry
from align.errors import RecipeError
from align.recipe import DPO_LOSS_TYPES, load_recipe

TINY_DPO = REPO / "recipes" / "tiny" / "dpo.yaml"
STORY_PROMPTS = REPO / "data_cards" / "tiny-story-prompts.yaml"


def test_loss_types_match_trl() -> None:
    import trl.trainer.dpo_trainer as dpo_trainer

    source = Path(dpo_trainer.__file__).read_text()
    assert set(re.findall(r'loss_type == "(\w+)"', source)) == set(DPO_LOSS_TYPES)


def test_unknown_loss_type_is_a_recipe_error() -> None:
    with pytest.raises(RecipeError, match=r"dpo.loss_type\[0\]: Input should be 'sigmoid', 'hinge'.*\(got 'sigmod'\)"):
        load_recipe(TINY_DPO, ["dpo.loss_type=sigmod"])
    with pytest.raises(RecipeError, match="loss_weights has 1 values for 2 loss types"):
        load_recipe(TINY_DPO, ["dpo.loss_type=[sigmoid, sft]", "dpo.loss_weights=[1.0]"])
    with pytest.raises(RecipeError, match="'exo_pair' needs label_smoothing > 0"):
        load_recipe(TINY_DPO, ["dpo.loss_type=exo_pair"])


@pytest.mark.slow
def test_dpo_manifest_names_exact_parents(dpo_artifact: Path) -> None:
    manifest = json.loads((dpo_artifact / "manifest.json").read_text())
    assert [(p["role"], p["ref"]) for p in manifest["parents"]] == [("model", "tiny-sft@v2"),
                                                                    ("data", "tiny-pairs@v1")]
    assert manifest["dpo"]["beta"] == 0.3 and manifest["metrics"]["global_step"] == 200
    assert manifest["metrics"]["eval_reward_accuracy"] > 0.6


@pytest.mark.slow
def test_dpo_raises_the_judge_score_without_breaking_text(dpo_artifact: Path, reward_artifact: Path,
                                                           sft_registry: Path, run_align: Callable) -> None:
    result = run_align("eval", "tiny-dpo@v1", "--data", STORY_PROMPTS, "--limit", "64", "--num-samples", "4",
                       "--reward", "tiny-rm@latest", "--registry", sft_registry)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "±" in result.stdout  # the table prints every score with its standard error
    report = json.loads((dpo_artifact / "eval.json").read_text())
    assert report["prompts"] == 64 and report["samples"] == 256
    # Plain TRL on this setup: +0.44..+0.60 VADER; garbled text at lr 5e-4 showed ref-NLL 1.78 -> 3.59.
    assert report["judge_delta"] >= 0.25, report
    assert report["policy"]["distinct_2"] >= 0.4
    assert report["ref_nll_rise"] <= 0.3
    assert report["policy"]["reward"] > report["parent_model"]["reward"] and report["win_rate"] > 0.5
    assert 0 < report["kl"] < 50


@pytest.mark.slow
def test_every_loss_type_runs_a_step(pairs_artifact: Path, sft_registry: Path) -> None:
    """All of TRL's loss types at once (TRL sums them, MPO-style): one step runs every loss's own code path,
    in one model load instead of fifteen. EXO needs label smoothing; TRL refuses 0."""
    import math

    from align.stages import dpo

    recipe = load_recipe(TINY_DPO, ["name=tiny-dpo-every-loss", f"dpo.loss_type=[{', '.join(DPO_LOSS_TYPES)}]",
                                    "dpo.label_smoothing=0.001", "train.max_steps=1", "data.limit=16",
                                    "data.eval_limit=8"], stage="dpo")
    artifact = dpo.run(recipe, Registry(sft_registry), say=lambda _: None)
    assert artifact.manifest.dpo.loss_type == list(DPO_LOSS_TYPES)
    assert artifact.manifest.metrics.global_step == 1
    assert math.isfinite(artifact.manifest.metrics.train_loss)


def test_the_sigmoid_loss_at_the_reference_is_known_without_evaluating() -> None:
    """`dpo` skips the before-training eval pass for the sigmoid loss: the value TRL measured there (recorded
    by a version-0 run in the fixtures) is ln 2, whatever the data; other losses are still evaluated."""
    from align.recipe import DpoSection
    from align.stages.dpo import loss_at_reference

    measured = json.loads((Path(__file__).parent / "fixtures" / "v0" / "dpo.manifest.json").read_text())
    assert abs(loss_at_reference(DpoSection()) - measured["metrics"]["eval_loss_before"]) < 1e-6
    assert loss_at_reference(DpoSection(label_smoothing=0.1, loss_weights=[2.0])) == pytest.approx(2 * math.log(2))
    assert loss_at_reference(DpoSection(loss_type=["hinge"])) is None
    assert loss_at_reference(DpoSection(loss_type=["sigmoid", "sft"])) is None
