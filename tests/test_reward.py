"""`align reward` and `align score` on stories260K: the score head trains, is saved, and reloads exactly."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.conftest import REPO

pytestmark = pytest.mark.slow
TINY_REWARD = REPO / "recipes" / "tiny" / "reward.yaml"
TONE_PAIRS = REPO / "data_cards" / "tiny-tone-pairs.yaml"


@pytest.fixture(scope="session")
def reward_artifact(sft_registry: Path, run_align: Callable) -> Path:
    result = run_align("reward", TINY_REWARD, "--registry", sft_registry)
    assert result.returncode == 0, result.stderr[-3000:]
    return sft_registry / "tiny-rm" / "v1"


def test_reward_model_learns_and_names_its_sft_parent(reward_artifact: Path) -> None:
    manifest = json.loads((reward_artifact / "manifest.json").read_text())
    assert manifest["stage"] == "reward"
    assert [(p["role"], p["ref"]) for p in manifest["parents"]] == [("model", "tiny-sft@v2")]
    metrics = manifest["metrics"]
    assert metrics["eval_pairs"] == 64
    assert metrics["eval_accuracy"] >= 0.95 and metrics["eval_accuracy"] > metrics["eval_accuracy_before"]
    assert metrics["eval_margin_mean"] > 0 and metrics["eval_reward_std"] > 0
    assert manifest["adapter"]["normalisation"] == {"mean": metrics["eval_reward_mean"],
                                                     "std": metrics["eval_reward_std"]}


def test_score_head_is_saved_in_the_adapter(reward_artifact: Path) -> None:
    with safe_open(str(reward_artifact / "adapter" / "adapter_model.safetensors"), "pt") as tensors:
        keys = list(tensors.keys())
    assert any(".score." in key for key in keys), keys[:10]


def test_reloaded_reward_model_reproduces_its_eval_scores(reward_artifact: Path, sft_registry: Path,
                                                          run_align: Callable) -> None:
    result = run_align("score", "tiny-rm@latest", "--data", TONE_PAIRS, "--output", "jsonl",
                       "--registry", sft_registry)
    assert result.returncode == 0, result.stderr[-3000:]
    rescored = [json.loads(line) for line in result.stdout.splitlines()]
    recorded = json.loads((reward_artifact / "eval_scores.json").read_text())
    assert len(rescored) == len(recorded) == 64
    for new, old in zip(rescored, recorded, strict=True):
        assert new["chosen"] == pytest.approx(old["chosen"], abs=1e-5)
        assert new["rejected"] == pytest.approx(old["rejected"], abs=1e-5)


def test_score_a_single_reply(reward_artifact: Path, sft_registry: Path, run_align: Callable) -> None:
    result = run_align("score", "tiny-rm@v1", "--prompt", "Write one sentence about a red cat.",
                       "--response", "The red cat naps in the warm grass, and it looks very happy.",
                       "--response", "Ugh. Nobody cares about that.", "--output", "jsonl", "--registry", sft_registry)
    assert result.returncode == 0, result.stderr[-3000:]
    warm, curt = (json.loads(line)["completion"] for line in result.stdout.splitlines())
    assert warm > curt


def test_reward_and_score_refuse_the_wrong_inputs(sft_registry: Path, run_align: Callable) -> None:
    sft_card = run_align("reward", TINY_REWARD, "--registry", sft_registry,
                         "--set", "data.card=../../data_cards/tiny-sft.yaml")
    assert sft_card.returncode == 2 and "no chosen/rejected pairs" in sft_card.stderr
    not_reward = run_align("score", "tiny-sft@v1", "--prompt", "hi", "--response", "hello",
                           "--registry", sft_registry)
    assert not_reward.returncode == 2 and "needs a reward artifact" in not_reward.stderr
    both = run_align("score", "tiny-sft@v1", "--registry", sft_registry)
    assert both.returncode == 2 and "either --data" in both.stderr
    assert not list((sft_registry / "tiny-rm").glob("v2")), "a refused run publishes nothing"
