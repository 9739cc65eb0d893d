"""`align grpo` and `align rloo` on stories260K: online RL with the tiny reward model raises held-out sentiment
without buying it with broken text; the reward callable reads replies as the reward model was trained to; user
mistakes exit 2 before anything trains or publishes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO

from align.rewards import RewardSpec, reward_function

TINY_GRPO = REPO / "recipes" / "tiny" / "grpo.yaml"
TINY_RLOO = REPO / "recipes" / "tiny" / "rloo.yaml"
STORY_PROMPTS = REPO / "data_cards" / "tiny-story-prompts.yaml"


def _parents(artifact: Path) -> list[tuple[str, str]]:
    return [(p["role"], p["ref"]) for p in json.loads((artifact / "manifest.json").read_text())["parents"]]


@pytest.fixture(scope="module")
def grpo_artifact(reward_artifact: Path, sft_registry: Path, run_align: Callable) -> Path:
    """tiny-grpo@v1: GRPO of tiny-sft@latest rewarded by tiny-rm@latest."""
    result = run_align("grpo", TINY_GRPO, "--registry", sft_registry)
    assert result.returncode == 0, result.stderr[-3000:]
    return sft_registry / "tiny-grpo" / "v1"


def test_reward_callable_reads_replies_after_their_prompt(stories_dir: Path) -> None:
    """Plain-text replies are decoded after their prompt (keeping the leading space), the judge is weighted and
    a reply cut off before EOS pays the penalty."""
    from align.models import BaseModelSpec, load_tokenizer

    tokenizer = load_tokenizer(BaseModelSpec(str(stories_dir), "local", str(stories_dir)), "none")
    seen: list[str] = []

    def judge(prompts: list, replies: list[str]) -> list[float]:
        seen.extend(replies)
        return [1.0 if "happy" in reply else 0.0 for reply in replies]

    spec = RewardSpec(None, None, "tests:judge", 2.0, 0.5, judge)
    reward = reward_function(spec, None, tokenizer, [tokenizer.eos_token_id])
    prompt = "Once upon a time, there was a cat. It"
    full = tokenizer(prompt + " was happy.")["input_ids"]
    reply_ids = full[len(tokenizer(prompt)["input_ids"]):]
    assert reward.__name__ == "judge"
    scores = reward(prompts=[prompt, prompt], completions=["", ""],
                    completion_ids=[[*reply_ids, tokenizer.eos_token_id], reply_ids])
    assert seen == [" was happy.", " was happy."]
    assert scores == [2.0, 1.5]


@pytest.mark.slow
def test_grpo_raises_sentiment_without_breaking_text(grpo_artifact: Path, sft_registry: Path,
                                                     run_align: Callable) -> None:
    manifest = json.loads((grpo_artifact / "manifest.json").read_text())
    assert _parents(grpo_artifact) == [("model", "tiny-sft@v2"), ("reward", "tiny-rm@v1")]
    assert manifest["data"][0]["name"] == "tiny-story-prompts" and manifest["data"][0]["format"] == "prompts"
    assert manifest["stage"] == "grpo" and manifest["grpo"]["beta"] > 0
    rm_manifest = json.loads((sft_registry / "tiny-rm" / "v1" / "manifest.json").read_text())
    assert manifest["online_reward"]["normalisation"] == rm_manifest["adapter"]["normalisation"]
    metrics = manifest["metrics"]
    assert metrics["reward_last"] > metrics["reward_first"] and metrics["kl_last"] > 0

    result = run_align("eval", "tiny-grpo@v1", "--data", STORY_PROMPTS, "--limit", "64", "--num-samples", "4",
                       "--reward", "tiny-rm@latest", "--registry", sft_registry)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((grpo_artifact / "eval.json").read_text())
    assert report["prompts"] == 64 and report["samples"] == 256
    assert report["judge_delta"] >= 0.25, report  # VADER of held-out continuations
    assert report["policy"]["reward"] > report["parent_model"]["reward"] and report["win_rate"] > 0.5
    assert report["policy"]["distinct_2"] >= 0.4  # 'friend friend friend ...' collapse scores ~0.005
    assert report["ref_nll_rise"] <= 0.3
    assert 0 < report["kl"] < 50


@pytest.mark.slow
def test_rloo_publishes_with_its_parents_and_reward_log(reward_artifact: Path, sft_registry: Path,
                                                        run_align: Callable) -> None:
    result = run_align("rloo", TINY_RLOO, "--set", "train.max_steps=4", "--set", "train.logging_steps=2",
                       "--set", "data.limit=32", "--registry", sft_registry)
    assert result.returncode == 0, result.stderr[-3000:]
    artifact = sft_registry / "tiny-rloo" / "v1"
    assert _parents(artifact) == [("model", "tiny-sft@v2"), ("reward", "tiny-rm@v1")]
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["metrics"]["global_step"] == 4 and manifest["rloo"]["num_generations"] == 4
    logs = [e for e in json.loads((artifact / "log_history.json").read_text()) if "reward" in e]
    assert len(logs) == 2 and all("rewards/reward_model/mean" in e and "kl" in e for e in logs)
    assert all("reward_parts/reward_model" in e for e in logs)


@pytest.mark.slow
def test_grpo_with_a_reward_function_only(sft_registry: Path, run_align: Callable) -> None:
    result = run_align("grpo", TINY_GRPO, "--set", "name=tiny-grpo-vader", "--set", "grpo.reward_model=null",
                       "--set", "grpo.reward_function=vader", "--set", "grpo.missing_eos_penalty=0.5",
                       "--set", "train.max_steps=2", "--set", "train.logging_steps=1", "--set", "data.limit=16",
                       "--registry", sft_registry)
    assert result.returncode == 0, result.stderr[-3000:]
    artifact = sft_registry / "tiny-grpo-vader" / "v1"
    assert _parents(artifact) == [("model", "tiny-sft@v2")]
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["online_reward"]["reward_function"] == "vader"
    assert manifest["online_reward"]["reward_model"] is None
    logs = [e for e in json.loads((artifact / "log_history.json").read_text()) if "reward" in e]
    assert logs and all("rewards/vader/mean" in e and "reward_parts/missing_eos" in e for e in logs)


@pytest.mark.parametrize(("stage", "overrides", "message"), [
    ("grpo", ["grpo.reward_model=null"], r"give a reward: 'reward_model'"),
    ("grpo", ["grpo.reward_model=tiny-sft@latest"], r"tiny-sft@v2 is a sft artifact, not a reward model"),
    ("grpo", ["grpo.num_generations=3"],
     r"train.per_device_train_batch_size \(16\) x train.gradient_accumulation_steps \(1\) = 16 .* "
     r"not a multiple of grpo.num_generations \(3\)"),
    ("rloo", ["train.per_device_train_batch_size=6", "rloo.num_generations=4"], r"rloo.num_generations \(4\)"),
    ("rloo", ["rloo.reward_model=missing-rm@latest"], r"missing-rm"),
], ids=["no-reward", "not-a-reward-model", "grpo-groups", "rloo-groups", "unknown-reward-model"])
def test_user_errors_exit_2_and_publish_nothing(stage: str, overrides: list[str], message: str,
                                                sft_registry: Path, run_align: Callable) -> None:
    import re

    recipe = TINY_GRPO if stage == "grpo" else TINY_RLOO
    sets = [arg for override in [*overrides, f"name=bad-{stage}"] for arg in ("--set", override)]
    result = run_align(stage, recipe, *sets, "--registry", sft_registry)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert not (sft_registry / f"bad-{stage}").exists()
